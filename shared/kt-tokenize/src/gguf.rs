//! Rebuilding a tokenizer from the `tokenizer.ggml.*` metadata of a GGUF file.
//!
//! Two vocabulary kinds (`tokenizer.ggml.model`) are supported, the ones every MoE and dense
//! model kt serves uses:
//!
//! * `gpt2`: byte-level BPE. Tokens and ranked merges are stored; the pre-tokenizer comes from
//!   the family named by `tokenizer.ggml.pre` (see [`crate::pretok`]).
//! * `llama`: SentencePiece BPE (Llama 2, Mistral, Mixtral, Phi-3). Tokens, scores and token
//!   types are stored, no merges. As llama.cpp does, a space is put in front of the text (and
//!   after every special token) when `tokenizer.ggml.add_space_prefix` is on (the default),
//!   spaces become `▁`, and the text is merged greedily: the adjacent pair whose concatenation
//!   is a token with the highest score goes first, the leftmost pair on a tie. Characters with
//!   no token fall back to `<0xXX>` byte tokens. This is expressed as a Hugging Face BPE model
//!   whose merge list is every split of every token into two tokens, ranked by the score of the
//!   whole (how `transformers` converts SentencePiece models too).
//!
//! Defaults, flags and fix-ups follow llama.cpp's `llama_vocab::impl::load`: default special
//! ids per kind (SentencePiece: BOS 1, EOS 2, UNK 0; BPE: BOS = EOS = 11), ids out of range
//! ignored, `add_bos` on for SentencePiece and for the Llama 3 family, metadata overriding
//! both.

use std::collections::HashMap;

use kt_formats::{Array, Metadata};
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::pieces::{PieceStyle, SPM_SPACE};
use crate::pretok::{bpe_family, known_families};
use crate::vocab::{FimTokens, SpecialTokens, TokenInfo, TokenKind};
use crate::{Parts, Result, TokenizeError, Tokenizer};

const KEY_MODEL: &str = "tokenizer.ggml.model";
const KEY_PRE: &str = "tokenizer.ggml.pre";
const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_SCORES: &str = "tokenizer.ggml.scores";
const KEY_TYPES: &str = "tokenizer.ggml.token_type";
const KEY_MERGES: &str = "tokenizer.ggml.merges";
const KEY_ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
const KEY_ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
const KEY_ADD_PREFIX: &str = "tokenizer.ggml.add_space_prefix";

/// Builds the tokenizer described by `md`. `source_name` is used in error messages.
pub(crate) fn from_metadata(md: &Metadata, source_name: &str) -> Result<Tokenizer> {
    let model =
        md.get_str(KEY_MODEL).ok_or_else(|| TokenizeError::missing(source_name, KEY_MODEL))?;
    let spm = match model {
        "llama" => true,
        "gpt2" => false,
        other => {
            return Err(TokenizeError::UnsupportedModel {
                source_name: source_name.to_owned(),
                model: other.to_owned(),
            })
        }
    };

    let texts = md
        .get_array(KEY_TOKENS)
        .ok_or_else(|| TokenizeError::missing(source_name, KEY_TOKENS))?
        .as_strings()
        .ok_or_else(|| TokenizeError::bad(source_name, KEY_TOKENS, "is not an array of strings"))?;
    let n = texts.len();
    if n == 0 {
        return Err(TokenizeError::bad(source_name, KEY_TOKENS, "is empty"));
    }
    if u32::try_from(n).is_err() {
        return Err(TokenizeError::bad(source_name, KEY_TOKENS, format!("has {n} tokens")));
    }
    let scores = match md.get_array(KEY_SCORES) {
        None => None,
        Some(a) => Some(numbers(a, n, source_name, KEY_SCORES)?),
    };
    let types = match md.get_array(KEY_TYPES) {
        None => None,
        Some(a) => Some(integers(a, n, source_name, KEY_TYPES)?),
    };

    let mut tokens = Vec::with_capacity(n);
    let mut ids: HashMap<String, u32> = HashMap::with_capacity(n);
    for (i, text) in texts.iter().enumerate() {
        // llama.cpp names empty tokens so that every id keeps a distinct text.
        let text = if text.is_empty() { format!("[EMPTY_{i}]") } else { text.to_owned() };
        let kind = types
            .as_ref()
            .and_then(|t| t.get(i))
            .map_or(TokenKind::Normal, |&t| TokenKind::from_gguf(t));
        if let Some(first) = ids.insert(text.clone(), i as u32) {
            return Err(TokenizeError::bad(
                source_name,
                KEY_TOKENS,
                format!("token {text:?} appears twice (ids {first} and {i})"),
            ));
        }
        tokens.push(TokenInfo::new(text, kind));
    }

    // SentencePiece vocabularies have no pre-tokenizer; llama.cpp ignores
    // `tokenizer.ggml.pre` for them, and so does kt.
    let pre = md.get_str(KEY_PRE);
    let (family_name, model_tok, style, strip_first_space, add_bos_default, no_bos) = if spm {
        let add_space_prefix = md.get_bool(KEY_ADD_PREFIX).unwrap_or(true);
        let unk = in_range(md.get_u32("tokenizer.ggml.unknown_token_id").or(Some(0)), n);
        let tok = build_spm(&tokens, scores.as_deref(), unk, add_space_prefix, source_name)?;
        (
            "llama (SentencePiece)".to_owned(),
            tok,
            PieceStyle::SentencePiece,
            add_space_prefix,
            true,
            false,
        )
    } else {
        // llama.cpp reads a missing `tokenizer.ggml.pre` (files converted before May 2024)
        // as `default`; an unknown name is an error.
        let pre = pre.unwrap_or("default");
        let family = bpe_family(pre).ok_or_else(|| TokenizeError::UnknownPreTokenizer {
            source_name: source_name.to_owned(),
            family: pre.to_owned(),
            known: known_families(),
        })?;
        let merges = md
            .get_array(KEY_MERGES)
            .ok_or_else(|| TokenizeError::missing(source_name, KEY_MERGES))?
            .as_strings()
            .ok_or_else(|| {
                TokenizeError::bad(source_name, KEY_MERGES, "is not an array of strings")
            })?;
        let merges: Vec<&str> = merges.iter().collect();
        let tok =
            build_bpe(&tokens, &ids, &merges, family.regexes, family.ignore_merges, source_name)?;
        (format!("gpt2 ({pre})"), tok, PieceStyle::ByteLevel, false, family.add_bos, family.no_bos)
    };

    let id_key = |key: &str| in_range(md.get_u32(key), n);
    let (default_bos, default_eos, default_unk) =
        if spm { (Some(1), Some(2), Some(0)) } else { (Some(11), Some(11), None) };
    let default_bos = if no_bos { None } else { default_bos };
    let special = SpecialTokens {
        bos: id_key("tokenizer.ggml.bos_token_id").or(in_range(default_bos, n)),
        eos: id_key("tokenizer.ggml.eos_token_id").or(in_range(default_eos, n)),
        eot: id_key("tokenizer.ggml.eot_token_id"),
        eom: id_key("tokenizer.ggml.eom_token_id"),
        unk: id_key("tokenizer.ggml.unknown_token_id").or(in_range(default_unk, n)),
        pad: id_key("tokenizer.ggml.padding_token_id"),
        sep: id_key("tokenizer.ggml.seperator_token_id"),
    };
    let fim = FimTokens {
        pad: id_key("tokenizer.ggml.fim_pad_token_id"),
        rep: id_key("tokenizer.ggml.fim_rep_token_id"),
        sep: id_key("tokenizer.ggml.fim_sep_token_id"),
    };
    let add_bos = md.get_bool(KEY_ADD_BOS).unwrap_or(add_bos_default);
    let add_eos = md.get_bool(KEY_ADD_EOS).unwrap_or(false);

    // llama.cpp strips the white space after Phi-3's special tokens (its tokenizer.json marks
    // them `rstrip`), recognising the family by name.
    let name = md.get_str("general.name").unwrap_or_default().to_lowercase();
    let phi3 = name.contains("phi-3") || name.contains("phi3");

    Ok(Tokenizer::from_parts(Parts {
        name: source_name.to_owned(),
        family: family_name,
        model: model_tok,
        tokens,
        ids,
        style,
        strip_first_space,
        special,
        fim,
        prefix: if add_bos { special.bos.into_iter().collect() } else { Vec::new() },
        suffix: if add_eos { special.eos.into_iter().collect() } else { Vec::new() },
        extra_eog: Vec::new(),
        phi3_rstrip: phi3,
    }))
}

fn in_range(id: Option<u32>, n: usize) -> Option<u32> {
    id.filter(|&id| (id as usize) < n)
}

/// Scores as `f32`, at least one per token.
fn numbers(a: &Array, n: usize, source_name: &str, key: &str) -> Result<Vec<f32>> {
    let v = a
        .to_f32s()
        .ok_or_else(|| TokenizeError::bad(source_name, key, "is not an array of numbers"))?;
    if v.len() < n {
        return Err(TokenizeError::bad(
            source_name,
            key,
            format!("has {} entries for {n} tokens", v.len()),
        ));
    }
    Ok(v)
}

/// Token types, at least one per token.
fn integers(a: &Array, n: usize, source_name: &str, key: &str) -> Result<Vec<i64>> {
    let v = a
        .to_i64s()
        .ok_or_else(|| TokenizeError::bad(source_name, key, "is not an array of integers"))?;
    if v.len() < n {
        return Err(TokenizeError::bad(
            source_name,
            key,
            format!("has {} entries for {n} tokens", v.len()),
        ));
    }
    Ok(v)
}

fn vocab_of(tokens: &[TokenInfo]) -> Vocab {
    tokens.iter().enumerate().map(|(i, t)| (t.text.clone(), i as u32)).collect()
}

/// A SentencePiece vocabulary as a Hugging Face BPE model (see the module docs).
fn build_spm(
    tokens: &[TokenInfo],
    scores: Option<&[f32]>,
    unk: Option<u32>,
    add_space_prefix: bool,
    source_name: &str,
) -> Result<tokenizers::Tokenizer> {
    let ids: HashMap<&str, u32> =
        tokens.iter().enumerate().map(|(i, t)| (t.text.as_str(), i as u32)).collect();
    let score = |id: u32| scores.and_then(|s| s.get(id as usize)).copied().unwrap_or(0.0);

    // (score of the whole, id of the whole, left id, right id, left, right)
    let mut merges: Vec<(f32, u32, u32, u32, &str, &str)> = Vec::new();
    for (whole, t) in tokens.iter().enumerate() {
        let text = t.text.as_str();
        for (cut, _) in text.char_indices().skip(1) {
            let (l, r) = text.split_at(cut);
            if let (Some(&li), Some(&ri)) = (ids.get(l), ids.get(r)) {
                merges.push((score(whole as u32), whole as u32, li, ri, l, r));
            }
        }
    }
    // Highest score first; equal scores in id order.
    merges.sort_by(|a, b| {
        b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)).then(a.3.cmp(&b.3))
    });
    let merges: Merges = merges.into_iter().map(|m| (m.4.to_owned(), m.5.to_owned())).collect();

    let mut builder = BPE::builder()
        .vocab_and_merges(vocab_of(tokens), merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = unk.and_then(|id| tokens.get(id as usize)) {
        builder = builder.unk_token(unk.text.clone());
    }
    let bpe = builder.build().map_err(|e| TokenizeError::hf(source_name, e))?;

    let space = SPM_SPACE.to_string();
    let mut norms: Vec<NormalizerWrapper> = Vec::new();
    if add_space_prefix {
        norms.push(Prepend::new(space.clone()).into());
    }
    norms.push(Replace::new(" ", space).map_err(|e| TokenizeError::hf(source_name, e))?.into());

    let mut tok = tokenizers::Tokenizer::new(bpe);
    tok.with_normalizer(Some(NormSequence::new(norms)));
    Ok(tok)
}

/// A byte-level BPE vocabulary with its family's pre-tokenizer.
fn build_bpe(
    tokens: &[TokenInfo],
    ids: &HashMap<String, u32>,
    merges: &[&str],
    regexes: &[&str],
    ignore_merges: bool,
    source_name: &str,
) -> Result<tokenizers::Tokenizer> {
    // A merge is "LEFT RIGHT", split at the first space after the first byte (llama.cpp's
    // rule). Merges whose parts or result are not tokens can never fire in llama.cpp's
    // tokenizer either (the result would fall apart into bytes); they are left out because the
    // Hugging Face model refuses them.
    let mut list: Merges = Vec::with_capacity(merges.len());
    for m in merges {
        let Some(pos) = m.bytes().skip(1).position(|b| b == b' ').map(|p| p + 1) else { continue };
        let (l, r) = (&m[..pos], &m[pos + 1..]);
        if ids.contains_key(l) && ids.contains_key(r) && ids.contains_key(&format!("{l}{r}")) {
            list.push((l.to_owned(), r.to_owned()));
        }
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab_of(tokens), list)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(|e| TokenizeError::hf(source_name, e))?;

    let mut pre: Vec<PreTokenizerWrapper> = Vec::with_capacity(regexes.len() + 1);
    for re in regexes {
        let split = Split::new(
            SplitPattern::Regex((*re).to_owned()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| {
            TokenizeError::hf(source_name, format!("pre-tokenizer expression {re:?}: {e}"))
        })?;
        pre.push(split.into());
    }
    pre.push(ByteLevel::new(false, false, false).into());

    let mut tok = tokenizers::Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(PreSequence::new(pre)));
    Ok(tok)
}

#[cfg(test)]
mod tests {
    use kt_formats::{Array, Metadata, Value};

    use crate::{TokenKind, TokenizeError, Tokenizer};

    fn md(pairs: Vec<(&str, Value)>) -> Metadata {
        let mut m = Metadata::new();
        for (k, v) in pairs {
            m.insert(k.to_owned(), v).unwrap();
        }
        m
    }

    fn strings(v: &[&str]) -> Value {
        Value::Array(Array::from(v.to_vec()))
    }

    /// A SentencePiece vocabulary: `▁hi` beats `▁h`, `!` only exists as a byte token.
    fn tiny_spm() -> Metadata {
        md(vec![
            ("general.name", Value::from("tiny")),
            ("tokenizer.ggml.model", Value::from("llama")),
            (
                "tokenizer.ggml.tokens",
                strings(&["<unk>", "<s>", "</s>", "▁", "h", "i", "▁h", "▁hi", "<0x21>"]),
            ),
            (
                "tokenizer.ggml.scores",
                Value::Array(Array::from(vec![
                    0.0f32, 0.0, 0.0, -1.0, -2.0, -3.0, -5.0, -4.0, 0.0,
                ])),
            ),
            (
                "tokenizer.ggml.token_type",
                Value::Array(Array::from(vec![2i32, 3, 3, 1, 1, 1, 1, 1, 6])),
            ),
        ])
    }

    #[test]
    fn sentencepiece_merges_by_score_and_falls_back_to_bytes() {
        let tok = Tokenizer::from_gguf(&tiny_spm()).unwrap();
        assert_eq!(tok.family(), "llama (SentencePiece)");
        assert_eq!((tok.bos_id(), tok.eos_id(), tok.unk_id()), (Some(1), Some(2), Some(0)));
        assert!(tok.add_bos() && !tok.add_eos());
        assert_eq!(tok.token_kind(8), Some(TokenKind::Byte));
        assert_eq!(tok.encode_with("hi!", false, false).unwrap(), vec![7, 8]);
        assert_eq!(tok.encode_with("hi!", true, false).unwrap(), vec![1, 7, 8]);
        // The dummy prefix goes in front of the text and after each special token.
        assert_eq!(tok.encode_with("hi<s>hi", false, true).unwrap(), vec![7, 1, 7]);
        assert_eq!(tok.decode(&[7, 8], false).unwrap(), "hi!");
        assert_eq!(tok.decode(&[3, 7], false).unwrap(), " hi");
        assert_eq!(tok.token_to_piece(7, false).unwrap(), b" hi");
        assert!(tok.is_eog(2));
    }

    fn tiny_bpe(pre: Option<&str>) -> Metadata {
        let mut pairs = vec![
            ("tokenizer.ggml.model", Value::from("gpt2")),
            ("tokenizer.ggml.tokens", strings(&["h", "i", "hi", "Ġ", "Ġhi", "<|endoftext|>", "Ċ"])),
            ("tokenizer.ggml.token_type", Value::Array(Array::from(vec![1i32, 1, 1, 1, 1, 3, 1]))),
            ("tokenizer.ggml.merges", strings(&["h i", "Ġ hi"])),
            ("tokenizer.ggml.eos_token_id", Value::U32(5)),
        ];
        if let Some(pre) = pre {
            pairs.push(("tokenizer.ggml.pre", Value::from(pre)));
        }
        md(pairs)
    }

    #[test]
    fn byte_level_bpe_with_family() {
        let tok = Tokenizer::from_gguf(&tiny_bpe(Some("qwen2"))).unwrap();
        assert_eq!(tok.family(), "gpt2 (qwen2)");
        assert_eq!(tok.encode_with("hi hi\n", false, false).unwrap(), vec![2, 4, 6]);
        assert_eq!(tok.decode(&[2, 4, 6], false).unwrap(), "hi hi\n");
        // No BOS (the BPE default id 11 is out of range), EOS from metadata.
        assert_eq!((tok.bos_id(), tok.eos_id(), tok.add_bos()), (None, Some(5), false));
        assert_eq!(tok.encode("hi<|endoftext|>", false).unwrap(), vec![2, 5]);
    }

    #[test]
    fn unknown_pre_tokenizer_is_an_error_naming_it() {
        let err = Tokenizer::from_gguf(&tiny_bpe(Some("my-new-family"))).unwrap_err();
        assert!(
            matches!(&err, TokenizeError::UnknownPreTokenizer { family, .. } if family == "my-new-family")
        );
        let msg = err.to_string();
        assert!(msg.contains("`my-new-family`") && msg.contains("qwen2"), "{msg}");
        // Files from before `tokenizer.ggml.pre` existed read as `default`, as in llama.cpp.
        assert_eq!(Tokenizer::from_gguf(&tiny_bpe(None)).unwrap().family(), "gpt2 (default)");
    }

    #[test]
    fn malformed_metadata_is_reported() {
        let mut m = tiny_bpe(Some("gpt-2"));
        m = md(m
            .iter()
            .filter(|(k, _)| *k != "tokenizer.ggml.merges")
            .map(|(k, v)| (k, v.clone()))
            .collect());
        let err = Tokenizer::from_gguf(&m).unwrap_err().to_string();
        assert!(err.contains("tokenizer.ggml.merges") && err.contains("missing"), "{err}");

        let m = md(vec![("tokenizer.ggml.model", Value::from("bert"))]);
        let err = Tokenizer::from_gguf(&m).unwrap_err().to_string();
        assert!(err.contains("`bert`"), "{err}");

        let m = md(vec![
            ("tokenizer.ggml.model", Value::from("llama")),
            ("tokenizer.ggml.tokens", strings(&["a", "b", "a"])),
        ]);
        let err = Tokenizer::from_gguf(&m).unwrap_err().to_string();
        assert!(err.contains("appears twice"), "{err}");

        let m = md(vec![
            ("tokenizer.ggml.model", Value::from("llama")),
            ("tokenizer.ggml.tokens", strings(&["a", "b"])),
            ("tokenizer.ggml.scores", Value::Array(Array::from(vec![0.0f32]))),
        ]);
        let err = Tokenizer::from_gguf(&m).unwrap_err().to_string();
        assert!(
            err.contains("tokenizer.ggml.scores") && err.contains("1 entries for 2 tokens"),
            "{err}"
        );
    }
}
