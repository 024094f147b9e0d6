//! Streaming detokenization: text out as ids come in, one sampled token at a time.
//!
//! A token does not always end on a character boundary: byte-level BPE splits a 4-byte emoji
//! over two or three tokens, and SentencePiece writes characters it has no piece for as
//! `<0xXX>` byte tokens. [`StreamDecoder`] keeps the bytes of an unfinished character until
//! the token that completes it arrives, and hands out only whole characters.
//!
//! The contract: for any id sequence, the strings returned by [`StreamDecoder::push`] followed
//! by [`StreamDecoder::finish`] concatenate to exactly [`Tokenizer::decode`] of the whole
//! sequence. Bytes that can never become valid UTF-8 come out as U+FFFD at the point where
//! that is certain, as `String::from_utf8_lossy` would write them.

use crate::{Result, Tokenizer};

/// Turns a stream of ids into text, one piece per id, never splitting a character.
///
/// Made by [`Tokenizer::stream_decoder`]; owns a cheap clone of the tokenizer, so it can move
/// into the task that streams a response.
#[derive(Debug, Clone)]
pub struct StreamDecoder {
    tokenizer: Tokenizer,
    skip_special: bool,
    /// Bytes of a character that is not complete yet (at most 3).
    pending: Vec<u8>,
    /// No id pushed yet: the next one may lose its SentencePiece leading space.
    first: bool,
}

impl StreamDecoder {
    pub(crate) fn new(tokenizer: Tokenizer, skip_special: bool) -> Self {
        Self { tokenizer, skip_special, pending: Vec::with_capacity(8), first: true }
    }

    /// Adds one id. Returns the text that is now complete, or `None` when the id completed no
    /// character (it wrote nothing, or only part of a character).
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        let piece = self.tokenizer.piece_for_decode(id, self.skip_special, self.first)?;
        self.first = false;
        self.pending.extend_from_slice(piece);
        let out = drain_complete(&mut self.pending);
        Ok((!out.is_empty()).then_some(out))
    }

    /// Ends the stream: whatever is left (an incomplete character) comes out as U+FFFD, and
    /// the decoder is ready for a new sequence.
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        self.first = true;
        out
    }

    /// Bytes held back because they may still become a character.
    pub fn pending_bytes(&self) -> usize {
        self.pending.len()
    }
}

/// Takes every byte of `buf` whose fate is settled: valid characters as they are, invalid
/// sequences as U+FFFD. Keeps only a trailing incomplete-but-valid prefix of a character.
fn drain_complete(buf: &mut Vec<u8>) -> String {
    let mut out = String::new();
    let mut rest: &[u8] = buf;
    loop {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                out.push_str(s);
                rest = &[];
                break;
            }
            Err(e) => {
                let (valid, after) = rest.split_at(e.valid_up_to());
                // `valid` is valid UTF-8 by the error's own account.
                out.push_str(&String::from_utf8_lossy(valid));
                match e.error_len() {
                    Some(n) => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        rest = after.get(n..).unwrap_or(&[]);
                    }
                    None => {
                        rest = after;
                        break;
                    }
                }
            }
        }
    }
    let keep = rest.len();
    let drop = buf.len() - keep;
    buf.drain(..drop);
    out
}

#[cfg(test)]
mod tests {
    use super::drain_complete;

    /// Feeding bytes in any split gives the same text as decoding them at once.
    #[test]
    fn drain_matches_lossy_for_every_split() {
        let samples: Vec<Vec<u8>> = vec![
            "héllo 🦙 wörld".as_bytes().to_vec(),
            vec![0xf0, 0x9f, 0xa6, b'a', 0xff, 0xe2, 0x82, 0xac, 0xe2, 0x82],
            vec![0xc3, 0xc3, 0xa9, 0x80, 0xed, 0xa0, 0x80],
        ];
        for s in samples {
            let want = String::from_utf8_lossy(&s).into_owned();
            for cut_every in 1..=4 {
                let mut pending = Vec::new();
                let mut got = String::new();
                for chunk in s.chunks(cut_every) {
                    pending.extend_from_slice(chunk);
                    got.push_str(&drain_complete(&mut pending));
                    assert!(pending.len() <= 3);
                }
                got.push_str(&String::from_utf8_lossy(&pending));
                assert_eq!(got, want, "chunks of {cut_every} of {s:?}");
            }
        }
    }
}
