//! A byte-level BPE vocabulary of any size that llama.cpp's `gpt2` tokenizer accepts: the 256
//! byte symbols, a few merges, two control tokens and unique filler tokens.

use crate::SynthError;

/// llama.cpp's token types.
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;

/// The pairs merged by the vocabulary's few merges (each result is a token).
const MERGES: [(&str, &str); 6] =
    [("Ġ", "t"), ("h", "e"), ("i", "n"), ("e", "r"), ("a", "n"), ("Ġt", "he")];

/// The smallest vocabulary: two control tokens, 256 bytes and the merges.
pub const MIN_VOCAB: usize = 2 + 256 + MERGES.len();

/// A vocabulary and its special ids.
#[derive(Clone, Debug, PartialEq)]
pub struct Vocab {
    pub tokens: Vec<String>,
    pub types: Vec<i32>,
    pub merges: Vec<String>,
    pub bos: u32,
    pub eos: u32,
}

/// GPT-2's `bytes_to_unicode`: the printable stand-in of each byte, in byte order.
pub fn byte_symbols() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut next = 256u32;
    (0u32..256)
        .map(|b| {
            let c = if printable(b) {
                b
            } else {
                next += 1;
                next - 1
            };
            char::from_u32(c).unwrap_or('?')
        })
        .collect()
}

/// `size` tokens with the control tokens at `bos` and `eos` (at 0 and 1 when those do not fit).
pub fn build(size: usize, bos: u32, eos: u32) -> Result<Vocab, SynthError> {
    if size < MIN_VOCAB {
        return Err(SynthError::Plan(format!(
            "a vocabulary of {size} tokens is too small (at least {MIN_VOCAB})"
        )));
    }
    let (bos, eos) = if (bos as usize) < size && (eos as usize) < size && bos != eos {
        (bos, eos)
    } else {
        (0, 1)
    };
    let mut fixed = byte_symbols().into_iter().map(String::from).collect::<Vec<_>>();
    fixed.extend(MERGES.iter().map(|(a, b)| format!("{a}{b}")));
    let mut fixed = fixed.into_iter();
    let mut tokens = Vec::with_capacity(size);
    let mut types = Vec::with_capacity(size);
    for id in 0..size {
        let (t, ty) = if id == bos as usize {
            ("<|synth_bos|>".to_owned(), CONTROL)
        } else if id == eos as usize {
            ("<|synth_eos|>".to_owned(), CONTROL)
        } else {
            (fixed.next().unwrap_or_else(|| format!("<synth_{id}>")), NORMAL)
        };
        tokens.push(t);
        types.push(ty);
    }
    let merges = MERGES.iter().map(|(a, b)| format!("{a} {b}")).collect();
    Ok(Vocab { tokens, types, merges, bos, eos })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_unique_and_specials_sit_where_asked() {
        let v = build(1000, 500, 501).unwrap();
        assert_eq!(v.tokens.len(), 1000);
        let mut seen = std::collections::HashSet::new();
        assert!(v.tokens.iter().all(|t| seen.insert(t.clone())));
        assert_eq!((v.bos, v.eos), (500, 501));
        assert_eq!(v.types[500], CONTROL);
        assert_eq!((v.tokens[0].as_str(), v.tokens[33].as_str()), ("Ā", "!"));
        assert!(v.tokens.contains(&"Ċ".to_owned()), "newline byte symbol");
        let small = build(MIN_VOCAB, 100_000, 100_001).unwrap();
        assert_eq!((small.bos, small.eos), (0, 1));
        assert!(build(MIN_VOCAB - 1, 0, 1).is_err());
    }
}
