//! The vocabulary table shared by both sources: what each id is, how its bytes are written out,
//! which tokens are cut out of the text before the model sees it, and which ids end generation.
//!
//! The rules follow llama.cpp's `llama_vocab` so that a GGUF model tokenizes and detokenizes
//! here exactly as it does there:
//!
//! * Token kinds are GGUF's token types. Control and unknown tokens are "special": they are
//!   written out only when special tokens are not skipped, and recognised in input text only
//!   when `parse_special` is on. User-defined tokens (Hugging Face "added tokens" that are not
//!   special) are always recognised in text and always written out.
//! * Recognition in text ([`partition`]) takes the tokens longest first, and for each one cuts
//!   every occurrence out of the text fragments that are left; a token marked `lstrip`/`rstrip`
//!   also swallows the white space on that side.
//! * End-of-generation ids are the EOS/EOT/EOM ids plus the tokens whose text marks an end of
//!   turn in the families llama.cpp knows (`<|im_end|>`, `<|eot_id|>`, ...).

use std::collections::{BTreeSet, HashMap};

/// What a token is. Mirrors GGUF's `tokenizer.ggml.token_type` values (and llama.cpp's token
/// attributes); Hugging Face added tokens map to [`TokenKind::Control`] (special) or
/// [`TokenKind::UserDefined`] (not special).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenKind {
    /// An ordinary piece of text.
    Normal,
    /// The unknown token (`<unk>`); special.
    Unknown,
    /// A control token (`<s>`, `<|im_start|>`, ...); special.
    Control,
    /// A user-defined token: matched in text before the model runs, written out verbatim.
    UserDefined,
    /// A reserved token that is never produced and writes out nothing.
    Unused,
    /// A byte-fallback token `<0xXX>` that writes out one raw byte.
    Byte,
    /// No type recorded (or an id with no token); writes out nothing.
    Undefined,
}

impl TokenKind {
    /// The kind for a GGUF `tokenizer.ggml.token_type` value.
    pub fn from_gguf(token_type: i64) -> Self {
        match token_type {
            1 => TokenKind::Normal,
            2 => TokenKind::Unknown,
            3 => TokenKind::Control,
            4 => TokenKind::UserDefined,
            5 => TokenKind::Unused,
            6 => TokenKind::Byte,
            _ => TokenKind::Undefined,
        }
    }

    /// Control and unknown tokens: skipped by `decode(.., skip_special = true)` and recognised
    /// in text only when `parse_special` is on.
    pub fn is_special(self) -> bool {
        matches!(self, TokenKind::Control | TokenKind::Unknown)
    }

    /// Whether the token is cut out of input text before the model tokenizes it (always for
    /// user-defined tokens, with `parse_special` for special ones).
    pub(crate) fn is_matched_in_text(self) -> bool {
        matches!(self, TokenKind::Control | TokenKind::Unknown | TokenKind::UserDefined)
    }
}

/// One id of the vocabulary.
#[derive(Debug, Clone)]
pub(crate) struct TokenInfo {
    /// The token as stored (byte-level alphabet, `▁` for spaces, `<0x0A>`, ...).
    pub text: String,
    pub kind: TokenKind,
    /// When matched in text, also remove the white space before it.
    pub lstrip: bool,
    /// When matched in text, also remove the white space after it.
    pub rstrip: bool,
}

impl TokenInfo {
    pub fn new(text: String, kind: TokenKind) -> Self {
        Self { text, kind, lstrip: false, rstrip: false }
    }
}

/// The special token ids of a vocabulary; `None` where the model has none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    /// Beginning of sequence.
    pub bos: Option<u32>,
    /// End of sequence.
    pub eos: Option<u32>,
    /// End of turn (`<|eot_id|>`, `<|im_end|>`, ...).
    pub eot: Option<u32>,
    /// End of message (`<|eom_id|>`, Llama 3.1 tool calls).
    pub eom: Option<u32>,
    /// Unknown token.
    pub unk: Option<u32>,
    /// Padding.
    pub pad: Option<u32>,
    /// Separator.
    pub sep: Option<u32>,
}

/// Fill-in-the-middle ids that also end generation (llama.cpp adds them to its EOG set).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct FimTokens {
    pub pad: Option<u32>,
    pub rep: Option<u32>,
    pub sep: Option<u32>,
}

/// Token texts that mark the end of a turn, in order of preference for the EOT id.
const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];
const EOM_TEXTS: &[&str] = &["<|eom_id|>"];
const FIM_PAD_TEXTS: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
const FIM_REP_TEXTS: &[&str] =
    &["<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"];
const FIM_SEP_TEXTS: &[&str] = &["<|file_sep|>"];
/// Token texts that end generation wherever they appear in a vocabulary.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];
/// gpt-oss (harmony) tokens that llama.cpp always writes out.
const ALWAYS_RENDERED: &[&str] = &["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"];

fn first_present(ids: &HashMap<String, u32>, texts: &[&str]) -> Option<u32> {
    texts.iter().find_map(|t| ids.get(*t).copied())
}

/// Applies llama.cpp's text-based fix-ups and returns the sorted end-of-generation ids.
///
/// Fills `eot`/`eom` (and the FIM ids) when the source did not name them, marks every
/// end-of-generation token as a control token, and applies the two gpt-oss / Gemma special
/// cases llama.cpp has. `extra_eog` adds ids the source names elsewhere (Hugging Face
/// `generation_config.json`).
pub(crate) fn resolve_eog(
    tokens: &mut [TokenInfo],
    ids: &HashMap<String, u32>,
    special: &mut SpecialTokens,
    fim: &mut FimTokens,
    extra_eog: &[u32],
) -> Vec<u32> {
    special.eot = special.eot.or_else(|| first_present(ids, EOT_TEXTS));
    special.eom = special.eom.or_else(|| first_present(ids, EOM_TEXTS));
    fim.pad = fim.pad.or_else(|| first_present(ids, FIM_PAD_TEXTS));
    fim.rep = fim.rep.or_else(|| first_present(ids, FIM_REP_TEXTS));
    fim.sep = fim.sep.or_else(|| first_present(ids, FIM_SEP_TEXTS));

    let mut eog: BTreeSet<u32> = BTreeSet::new();
    eog.extend(
        [fim.pad, fim.rep, fim.sep, special.eos, special.eot, special.eom].into_iter().flatten(),
    );
    eog.extend(EOG_TEXTS.iter().filter_map(|t| ids.get(*t).copied()));
    eog.extend(extra_eog.iter().copied());
    eog.retain(|&id| (id as usize) < tokens.len());

    // Tokens found by their text must not be tokenized as plain text or written out when
    // special tokens are skipped.
    let by_text = [special.eot, special.eom, fim.pad, fim.rep, fim.sep];
    for id in eog.iter().copied().chain(by_text.into_iter().flatten()) {
        if let Some(t) = tokens.get_mut(id as usize) {
            if !t.kind.is_special() {
                t.kind = TokenKind::Control;
            }
        }
    }

    for text in ALWAYS_RENDERED {
        if let Some(t) = ids.get(*text).and_then(|&id| tokens.get_mut(id as usize)) {
            t.kind = TokenKind::UserDefined;
        }
    }

    let text_of = |id: u32| tokens.get(id as usize).map(|t| t.text.as_str());
    let has = |s: &str| eog.iter().any(|&id| text_of(id) == Some(s));
    // Harmony's `<|end|>` closes a message, not the generation, when `<|return|>`/`<|call|>`
    // (or solar-open's `<|calls|>`/`<|flush|>`) exist.
    let end_not_eog = has("<|end|>")
        && ((has("<|return|>") && has("<|call|>")) || (has("<|calls|>") && has("<|flush|>")));
    // Gemma 4 and PLaMo have an ordinary `</s>`.
    let s_is_normal = has("</s>") && (has("<|tool_response>") || has("<|plamo:eos|>"));
    let mut demote = Vec::new();
    if end_not_eog {
        demote.extend(ids.get("<|end|>").map(|&id| (id, TokenKind::UserDefined)));
    }
    if s_is_normal {
        demote.extend(ids.get("</s>").map(|&id| (id, TokenKind::Normal)));
    }
    for (id, kind) in demote {
        eog.remove(&id);
        if let Some(t) = tokens.get_mut(id as usize) {
            t.kind = kind;
        }
    }

    eog.into_iter().collect()
}

/// The ids matched in input text, longest text first (ties by id, for determinism).
pub(crate) fn partition_order(tokens: &[TokenInfo]) -> Vec<u32> {
    let mut order: Vec<u32> = (0..tokens.len() as u32)
        .filter(|&id| {
            tokens
                .get(id as usize)
                .is_some_and(|t| t.kind.is_matched_in_text() && !t.text.is_empty())
        })
        .collect();
    order.sort_by_key(|&id| std::cmp::Reverse(tokens.get(id as usize).map_or(0, |t| t.text.len())));
    order
}

/// A piece of input text after special tokens were cut out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fragment<'a> {
    Text(&'a str),
    Token(u32),
}

/// White space as C's `isspace` sees it (llama.cpp strips with it).
fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// Cuts the tokens of `order` out of `text`, as llama.cpp's `tokenizer_st_partition` does:
/// longest token first, every occurrence, left to right. Special (control/unknown) tokens are
/// cut only when `parse_special` is on.
pub(crate) fn partition<'a>(
    text: &'a str,
    tokens: &[TokenInfo],
    order: &[u32],
    parse_special: bool,
) -> Vec<Fragment<'a>> {
    // Fragments as byte ranges of `text` (or token ids), so that slices stay on `text`.
    #[derive(Clone, Copy)]
    enum Frag {
        Text(usize, usize),
        Token(u32),
    }
    let mut frags = if text.is_empty() { Vec::new() } else { vec![Frag::Text(0, text.len())] };
    let bytes = text.as_bytes();

    for &id in order {
        let Some(info) = tokens.get(id as usize) else { continue };
        if !parse_special && info.kind.is_special() {
            continue;
        }
        let pat = info.text.as_str();
        if pat.is_empty() || !text.contains(pat) {
            continue;
        }
        let mut next = Vec::with_capacity(frags.len() + 2);
        for frag in frags {
            let Frag::Text(mut start, end) = frag else {
                next.push(frag);
                continue;
            };
            loop {
                let found = text.get(start..end).and_then(|s| s.find(pat));
                let Some(rel) = found else {
                    if start < end {
                        next.push(Frag::Text(start, end));
                    }
                    break;
                };
                let at = start + rel;
                let mut left_end = at;
                if info.lstrip {
                    while left_end > start
                        && bytes.get(left_end - 1).copied().is_some_and(is_c_space)
                    {
                        left_end -= 1;
                    }
                }
                if left_end > start {
                    next.push(Frag::Text(start, left_end));
                }
                next.push(Frag::Token(id));
                let mut right = at + pat.len();
                if info.rstrip {
                    while right < end && bytes.get(right).copied().is_some_and(is_c_space) {
                        right += 1;
                    }
                }
                start = right;
                if start >= end {
                    break;
                }
            }
        }
        frags = next;
    }

    frags
        .into_iter()
        .filter_map(|f| match f {
            Frag::Text(s, e) => text.get(s..e).map(Fragment::Text),
            Frag::Token(id) => Some(Fragment::Token(id)),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(specs: &[(&str, TokenKind)]) -> Vec<TokenInfo> {
        specs.iter().map(|(t, k)| TokenInfo::new((*t).to_owned(), *k)).collect()
    }

    #[test]
    fn partition_cuts_longest_first_and_respects_parse_special() {
        let tokens = table(&[
            ("a", TokenKind::Normal),
            ("<|im_start|>", TokenKind::Control),
            ("<|im", TokenKind::UserDefined),
            ("<tool>", TokenKind::UserDefined),
        ]);
        let order = partition_order(&tokens);
        assert_eq!(order, vec![1, 3, 2]);

        let text = "x<|im_start|>y<tool>z<|im";
        let got = partition(text, &tokens, &order, true);
        assert_eq!(
            got,
            vec![
                Fragment::Text("x"),
                Fragment::Token(1),
                Fragment::Text("y"),
                Fragment::Token(3),
                Fragment::Text("z"),
                Fragment::Token(2),
            ]
        );
        // Without parse_special the control token is text, but user-defined ones still match.
        let got = partition(text, &tokens, &order, false);
        assert_eq!(
            got,
            vec![
                Fragment::Text("x"),
                Fragment::Token(2),
                Fragment::Text("_start|>y"),
                Fragment::Token(3),
                Fragment::Text("z"),
                Fragment::Token(2),
            ]
        );
        assert!(partition("", &tokens, &order, true).is_empty());
    }

    #[test]
    fn partition_strips_white_space_where_marked() {
        let mut tokens = table(&[("<|end|>", TokenKind::Control)]);
        tokens[0].rstrip = true;
        tokens[0].lstrip = true;
        let order = partition_order(&tokens);
        let got = partition("a \n<|end|>\n b<|end|>  ", &tokens, &order, true);
        assert_eq!(
            got,
            vec![Fragment::Text("a"), Fragment::Token(0), Fragment::Text("b"), Fragment::Token(0)]
        );
    }

    #[test]
    fn eog_collects_texts_and_marks_them_control() {
        let mut tokens = table(&[
            ("hello", TokenKind::Normal),
            ("<|im_end|>", TokenKind::Normal),
            ("<|endoftext|>", TokenKind::Control),
            ("<|file_sep|>", TokenKind::Control),
        ]);
        let ids: HashMap<String, u32> =
            tokens.iter().enumerate().map(|(i, t)| (t.text.clone(), i as u32)).collect();
        let mut special = SpecialTokens { eos: Some(2), ..Default::default() };
        let mut fim = FimTokens::default();
        let eog = resolve_eog(&mut tokens, &ids, &mut special, &mut fim, &[]);
        assert_eq!(eog, vec![1, 2, 3]);
        assert_eq!(special.eot, Some(1));
        assert_eq!(tokens[1].kind, TokenKind::Control);
    }
}
