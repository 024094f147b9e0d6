//! From a token to the bytes it stands for.
//!
//! Detokenization works on bytes, not strings: one token may hold half of a UTF-8 character
//! (byte-level BPE pieces and `<0xXX>` byte-fallback tokens do), so text is only formed once
//! the bytes of several tokens are joined. Each token's bytes are computed once, when the
//! tokenizer is built.

use crate::vocab::{TokenInfo, TokenKind};

/// How the text of a normal token maps to bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PieceStyle {
    /// GPT-2 byte-level BPE: every character of a token stands for one byte (see
    /// [`byte_level_char_to_byte`]).
    ByteLevel,
    /// SentencePiece: the token is UTF-8 text with `▁` (U+2581) for a space; `<0xXX>` tokens
    /// stand for single bytes.
    SentencePiece,
    /// The token text is the text.
    Raw,
}

/// SentencePiece's visible space.
pub(crate) const SPM_SPACE: char = '\u{2581}';

/// The GPT-2 byte alphabet: printable Latin-1 bytes stand for themselves, the other 68 bytes
/// (controls, space, DEL, NBSP, soft hyphen) take the code points from U+0100 on, in order.
/// Returns the byte a character stands for, or `None` for a character outside the alphabet.
pub(crate) fn byte_level_char_to_byte(c: char) -> Option<u8> {
    let cp = c as u32;
    let printable = |b: u32| {
        (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b)
    };
    if cp < 0x100 {
        return printable(cp).then_some(cp as u8);
    }
    // The n-th non-printable byte (in increasing order) is written as U+0100 + n.
    let n = cp - 0x100;
    (0u32..=0xff).filter(|&b| !printable(b)).nth(n as usize).map(|b| b as u8)
}

/// A precomputed table of the byte-level alphabet (U+0000..U+0143 → byte).
pub(crate) struct ByteLevelTable {
    map: [Option<u8>; 0x144],
}

impl ByteLevelTable {
    pub fn new() -> Self {
        let mut map = [None; 0x144];
        for (cp, slot) in map.iter_mut().enumerate() {
            *slot = char::from_u32(cp as u32).and_then(byte_level_char_to_byte);
        }
        Self { map }
    }

    /// The bytes a byte-level token stands for. A character outside the alphabet (never in a
    /// well-formed vocabulary) is kept as its own UTF-8 bytes.
    pub fn decode(&self, text: &str, out: &mut Vec<u8>) {
        for c in text.chars() {
            match self.map.get(c as usize).copied().flatten() {
                Some(b) => out.push(b),
                None => {
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
            }
        }
    }
}

/// The byte of a `<0xXX>` token, if `text` is one.
pub(crate) fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// The bytes every token writes out when special tokens are not skipped (llama.cpp's
/// `token_to_piece(.., special = true)`, without stripping any leading space).
pub(crate) fn compute_pieces(tokens: &[TokenInfo], style: PieceStyle) -> Vec<Box<[u8]>> {
    let table = (style == PieceStyle::ByteLevel).then(ByteLevelTable::new);
    tokens
        .iter()
        .map(|t| {
            let mut out = Vec::with_capacity(t.text.len());
            match t.kind {
                TokenKind::Control | TokenKind::Unknown | TokenKind::UserDefined => {
                    out.extend_from_slice(t.text.as_bytes());
                }
                TokenKind::Unused | TokenKind::Undefined => {}
                TokenKind::Byte => match parse_byte_token(&t.text) {
                    Some(b) => out.push(b),
                    None => normal_piece(&t.text, style, table.as_ref(), &mut out),
                },
                TokenKind::Normal => normal_piece(&t.text, style, table.as_ref(), &mut out),
            }
            out.into_boxed_slice()
        })
        .collect()
}

fn normal_piece(text: &str, style: PieceStyle, table: Option<&ByteLevelTable>, out: &mut Vec<u8>) {
    match (style, table) {
        (PieceStyle::ByteLevel, Some(table)) => table.decode(text, out),
        (PieceStyle::SentencePiece, _) => {
            let mut buf = [0u8; 4];
            for c in text.chars() {
                let c = if c == SPM_SPACE { ' ' } else { c };
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
        _ => out.extend_from_slice(text.as_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_alphabet_is_a_bijection() {
        let table = ByteLevelTable::new();
        let mut seen = [false; 256];
        for cp in 0..0x144u32 {
            if let Some(b) = table.map[cp as usize] {
                assert!(!seen[b as usize], "byte {b} twice");
                seen[b as usize] = true;
            }
        }
        assert!(seen.iter().all(|&s| s));
        // Known points of the GPT-2 alphabet.
        assert_eq!(byte_level_char_to_byte('Ġ'), Some(b' '));
        assert_eq!(byte_level_char_to_byte('Ċ'), Some(b'\n'));
        assert_eq!(byte_level_char_to_byte('ĉ'), Some(b'\t'));
        assert_eq!(byte_level_char_to_byte('A'), Some(b'A'));
        assert_eq!(byte_level_char_to_byte('Ń'), Some(0xad));
        assert_eq!(byte_level_char_to_byte('ń'), None);
        let mut out = Vec::new();
        table.decode("ĠHello", &mut out);
        assert_eq!(out, b" Hello");
    }

    #[test]
    fn pieces_by_kind() {
        let toks = vec![
            TokenInfo::new("▁Hello".into(), TokenKind::Normal),
            TokenInfo::new("<0x0A>".into(), TokenKind::Byte),
            TokenInfo::new("<s>".into(), TokenKind::Control),
            TokenInfo::new("<unused0>".into(), TokenKind::Unused),
        ];
        let p = compute_pieces(&toks, PieceStyle::SentencePiece);
        assert_eq!(&*p[0], b" Hello");
        assert_eq!(&*p[1], b"\n");
        assert_eq!(&*p[2], b"<s>");
        assert!(p[3].is_empty());
        assert_eq!(parse_byte_token("<0xFF>"), Some(0xff));
        assert_eq!(parse_byte_token("<0xF>"), None);
    }
}
