//! Loading a Hugging Face `tokenizer.json` (+ `tokenizer_config.json`,
//! `generation_config.json`).
//!
//! The normalizer, pre-tokenizer and BPE model are handed to the `tokenizers` crate as they
//! are. Added tokens and the post-processor are taken out of the JSON and handled by kt, the
//! same way as for GGUF vocabularies:
//!
//! * added tokens marked `special` become control tokens, the others user-defined tokens; their
//!   `lstrip`/`rstrip` flags are kept (`single_word` and `normalized` are not used);
//! * the post-processor is run once on a marker to learn which ids it puts before and after the
//!   text; `add_bos_token` / `add_eos_token` in `tokenizer_config.json` override it, as
//!   `transformers` does for Llama-style tokenizers;
//! * how a token turns into bytes is read from the decoder: `ByteLevel` (GPT-2 byte alphabet)
//!   or SentencePiece style (`Metaspace`, or `Replace ▁ → " "` with `ByteFallback`); a decoder
//!   `Strip` of one leading space, or a `Metaspace` that prepends, makes decoding drop the
//!   first token's leading space.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;

use serde_json::Value;
use tokenizers::{Encoding, ModelWrapper, PostProcessor, PostProcessorWrapper, Token};

use crate::pieces::{parse_byte_token, PieceStyle, SPM_SPACE};
use crate::vocab::{FimTokens, SpecialTokens, TokenInfo, TokenKind};
use crate::{Parts, Result, TokenizeError, Tokenizer};

fn read_json(path: &Path) -> Result<Value> {
    let bytes = std::fs::read(path)
        .map_err(|source| TokenizeError::Io { path: path.to_owned(), source })?;
    serde_json::from_slice(&bytes)
        .map_err(|source| TokenizeError::Json { path: path.to_owned(), source })
}

/// One entry of `added_tokens`.
struct Added {
    id: u32,
    content: String,
    special: bool,
    lstrip: bool,
    rstrip: bool,
}

fn parse_added(json: &Value, name: &str) -> Result<Vec<Added>> {
    let Some(list) = json.get("added_tokens") else { return Ok(Vec::new()) };
    let list =
        list.as_array().ok_or_else(|| TokenizeError::bad(name, "added_tokens", "is not a list"))?;
    list.iter()
        .enumerate()
        .map(|(i, t)| {
            let key = format!("added_tokens[{i}]");
            let id = t
                .get("id")
                .and_then(Value::as_u64)
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(|| TokenizeError::bad(name, &key, "has no valid `id`"))?;
            let content = t
                .get("content")
                .and_then(Value::as_str)
                .ok_or_else(|| TokenizeError::bad(name, &key, "has no `content` string"))?
                .to_owned();
            let flag = |k: &str| t.get(k).and_then(Value::as_bool).unwrap_or(false);
            Ok(Added {
                id,
                content,
                special: flag("special"),
                lstrip: flag("lstrip"),
                rstrip: flag("rstrip"),
            })
        })
        .collect()
}

/// How tokens become bytes, and whether the first token's leading space is dropped.
fn piece_style(decoder: Option<&Value>, name: &str) -> Result<(PieceStyle, bool)> {
    let Some(decoder) = decoder.filter(|d| !d.is_null()) else {
        return Ok((PieceStyle::Raw, false));
    };
    let kind = decoder.get("type").and_then(Value::as_str).unwrap_or_default();
    let metaspace = |d: &Value| -> Result<bool> {
        let replacement = d.get("replacement").and_then(Value::as_str).unwrap_or("▁");
        if replacement != SPM_SPACE.to_string() {
            return Err(TokenizeError::unsupported(
                name,
                "decoder Metaspace",
                format!("replacement {replacement:?} (kt reads `▁`)"),
            ));
        }
        Ok(match d.get("prepend_scheme").and_then(Value::as_str) {
            Some(scheme) => scheme != "never",
            None => d.get("add_prefix_space").and_then(Value::as_bool).unwrap_or(true),
        })
    };
    match kind {
        "ByteLevel" => Ok((PieceStyle::ByteLevel, false)),
        "Metaspace" => Ok((PieceStyle::SentencePiece, metaspace(decoder)?)),
        "Sequence" => {
            let parts =
                decoder.get("decoders").and_then(Value::as_array).cloned().unwrap_or_default();
            let type_of =
                |d: &Value| d.get("type").and_then(Value::as_str).unwrap_or_default().to_owned();
            if parts.iter().any(|d| type_of(d) == "ByteLevel") {
                return Ok((PieceStyle::ByteLevel, false));
            }
            if let Some(m) = parts.iter().find(|d| type_of(d) == "Metaspace") {
                return Ok((PieceStyle::SentencePiece, metaspace(m)?));
            }
            let replaces_space = parts.iter().any(|d| {
                type_of(d) == "Replace"
                    && d.pointer("/pattern/String").and_then(Value::as_str) == Some("▁")
                    && d.get("content").and_then(Value::as_str) == Some(" ")
            });
            if replaces_space {
                let strips = parts.iter().any(|d| {
                    type_of(d) == "Strip"
                        && d.get("content").and_then(Value::as_str) == Some(" ")
                        && d.get("start").and_then(Value::as_u64).unwrap_or(0) >= 1
                });
                return Ok((PieceStyle::SentencePiece, strips));
            }
            Err(TokenizeError::unsupported(
                name,
                "decoder",
                format!(
                    "a Sequence of {:?}; kt reads ByteLevel and SentencePiece-style decoders",
                    parts.iter().map(type_of).collect::<Vec<_>>()
                ),
            ))
        }
        other => Err(TokenizeError::unsupported(
            name,
            format!("decoder {other}"),
            "kt reads ByteLevel and SentencePiece-style (Metaspace, Replace ▁) decoders",
        )),
    }
}

/// The ids the post-processor puts before and after a single sequence.
fn post_processor_ids(post: Option<&Value>, name: &str) -> Result<(Vec<u32>, Vec<u32>)> {
    let Some(post) = post.filter(|p| !p.is_null()) else { return Ok((Vec::new(), Vec::new())) };
    let pp: PostProcessorWrapper = serde_json::from_value(post.clone())
        .map_err(|e| TokenizeError::bad(name, "post_processor", e.to_string()))?;
    const MARK: u32 = u32::MAX;
    let enc = Encoding::from_tokens(vec![Token::new(MARK, String::new(), (0, 0))], 0);
    let out = pp.process(enc, None, true).map_err(|e| TokenizeError::hf(name, e))?;
    let ids = out.get_ids();
    let at = ids.iter().position(|&i| i == MARK).ok_or_else(|| {
        TokenizeError::unsupported(name, "post_processor", "it drops the text it is given")
    })?;
    Ok((ids[..at].to_vec(), ids[at + 1..].to_vec()))
}

/// A token named in `tokenizer_config.json`: a string or an `AddedToken` object.
fn config_token(config: &Value, key: &str) -> Option<String> {
    match config.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

pub(crate) fn from_files(
    json_path: &Path,
    config_path: Option<&Path>,
    generation_path: Option<&Path>,
) -> Result<Tokenizer> {
    let name = json_path.display().to_string();
    let mut json = read_json(json_path)?;
    let added = parse_added(&json, &name)?;
    let (style, strip_first_space) = piece_style(json.get("decoder"), &name)?;
    let (mut prefix, mut suffix) = post_processor_ids(json.get("post_processor"), &name)?;
    let byte_fallback =
        json.pointer("/model/byte_fallback").and_then(Value::as_bool).unwrap_or(false);

    if let Some(obj) = json.as_object_mut() {
        obj.insert("added_tokens".to_owned(), Value::Array(Vec::new()));
        obj.insert("post_processor".to_owned(), Value::Null);
    }
    let model = tokenizers::Tokenizer::from_str(&json.to_string())
        .map_err(|e| TokenizeError::hf(&name, e))?;
    drop(json);
    let model_unk = match model.get_model() {
        ModelWrapper::BPE(bpe) => bpe.get_unk_token().clone(),
        _ => {
            return Err(TokenizeError::unsupported(
                &name,
                "model",
                "kt reads BPE tokenizer.json models",
            ));
        }
    };

    let vocab = model.get_vocab(false);
    let size =
        vocab.values().chain(added.iter().map(|a| &a.id)).max().map_or(0, |&m| m as usize + 1);
    let mut tokens = vec![TokenInfo::new(String::new(), TokenKind::Undefined); size];
    for (text, &id) in &vocab {
        let kind = if byte_fallback && parse_byte_token(text).is_some() {
            TokenKind::Byte
        } else {
            TokenKind::Normal
        };
        if let Some(slot) = tokens.get_mut(id as usize) {
            *slot = TokenInfo::new(text.clone(), kind);
        }
    }
    for a in &added {
        if let Some(slot) = tokens.get_mut(a.id as usize) {
            let kind = if a.special { TokenKind::Control } else { TokenKind::UserDefined };
            *slot = TokenInfo { text: a.content.clone(), kind, lstrip: a.lstrip, rstrip: a.rstrip };
        }
    }
    let mut ids: HashMap<String, u32> = HashMap::with_capacity(size);
    for (i, t) in tokens.iter().enumerate() {
        if t.kind != TokenKind::Undefined {
            ids.entry(t.text.clone()).or_insert(i as u32);
        }
    }

    let config = match config_path {
        Some(p) => read_json(p)?,
        None => Value::Null,
    };
    let lookup = |key: &str| config_token(&config, key).and_then(|t| ids.get(&t).copied());
    let single = |v: &[u32]| (v.len() == 1).then(|| v[0]);
    let special = SpecialTokens {
        bos: lookup("bos_token").or_else(|| single(&prefix)),
        eos: lookup("eos_token").or_else(|| single(&suffix)),
        unk: lookup("unk_token").or_else(|| model_unk.as_ref().and_then(|u| ids.get(u).copied())),
        pad: lookup("pad_token"),
        sep: lookup("sep_token"),
        eot: None,
        eom: None,
    };
    let flag = |key: &str| config.get(key).and_then(Value::as_bool);
    if let (Some(add), Some(bos)) = (flag("add_bos_token"), special.bos) {
        if add && !prefix.contains(&bos) {
            prefix.insert(0, bos);
        } else if !add {
            prefix.retain(|&i| i != bos);
        }
    }
    if let (Some(add), Some(eos)) = (flag("add_eos_token"), special.eos) {
        if add && !suffix.contains(&eos) {
            suffix.push(eos);
        } else if !add {
            suffix.retain(|&i| i != eos);
        }
    }

    let mut extra_eog = Vec::new();
    if let Some(p) = generation_path {
        let generation = read_json(p)?;
        match generation.get("eos_token_id") {
            Some(Value::Number(n)) => {
                extra_eog.extend(n.as_u64().and_then(|v| u32::try_from(v).ok()))
            }
            Some(Value::Array(list)) => extra_eog
                .extend(list.iter().filter_map(|v| v.as_u64().and_then(|v| u32::try_from(v).ok()))),
            _ => {}
        }
    }

    Ok(Tokenizer::from_parts(Parts {
        name,
        family: match style {
            PieceStyle::ByteLevel => "tokenizer.json (byte-level BPE)".to_owned(),
            PieceStyle::SentencePiece => "tokenizer.json (SentencePiece BPE)".to_owned(),
            PieceStyle::Raw => "tokenizer.json (BPE)".to_owned(),
        },
        model,
        tokens,
        ids,
        style,
        strip_first_space,
        special,
        fim: FimTokens::default(),
        prefix,
        suffix,
        extra_eog,
        phi3_rstrip: false,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A folder in the temp dir, removed on drop.
    struct TempDir(std::path::PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("kt-tokenize-unit-{tag}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn write(&self, name: &str, v: &Value) {
            std::fs::write(self.0.join(name), v.to_string()).unwrap();
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            std::fs::remove_dir_all(&self.0).ok();
        }
    }

    /// A byte-level BPE tokenizer.json over a handful of tokens.
    fn tiny_byte_level(decoder: Value) -> Value {
        json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [
                {"id": 5, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
                 "rstrip": false, "normalized": false, "special": true},
                {"id": 6, "content": "<think>", "single_word": false, "lstrip": false,
                 "rstrip": false, "normalized": false, "special": false}
            ],
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                              "use_regex": true},
            "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false,
                               "use_regex": true},
            "decoder": decoder,
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": {"h": 0, "i": 1, "hi": 2, "Ġ": 3, "Ġhi": 4, "<|endoftext|>": 5},
                      "merges": ["h i", "Ġ hi"]}
        })
    }

    fn byte_level_decoder() -> Value {
        json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true})
    }

    #[test]
    fn hf_folder_with_configs() {
        let dir = TempDir::new("configs");
        dir.write("tokenizer.json", &tiny_byte_level(byte_level_decoder()));
        dir.write(
            "tokenizer_config.json",
            &json!({
                "add_bos_token": true,
                "bos_token": {"__type": "AddedToken", "content": "<|endoftext|>", "special": true},
                "eos_token": "<|endoftext|>"
            }),
        );
        // Ids listed here end generation (and so become control tokens).
        dir.write("generation_config.json", &json!({"eos_token_id": [5, 2]}));
        let tok = Tokenizer::from_hf_dir(&dir.0).unwrap();

        assert_eq!(tok.vocab_size(), 7);
        assert_eq!(
            (tok.bos_id(), tok.eos_id(), tok.add_bos(), tok.add_eos()),
            (Some(5), Some(5), true, false)
        );
        assert_eq!(tok.eog_ids(), &[2, 5]);
        assert_eq!(tok.token_kind(2), Some(TokenKind::Control));
        assert_eq!(tok.token_kind(6), Some(TokenKind::UserDefined));
        assert!(tok.is_special(5) && !tok.is_special(6));

        // The user-defined token is recognised even without parse_special.
        let ids = tok.encode_with("i<think> hi", false, false).unwrap();
        assert_eq!(ids, vec![1, 6, 4]);
        assert_eq!(tok.encode("i<|endoftext|>", true).unwrap(), vec![5, 1, 5]);
        assert_eq!(tok.decode(&[5, 1, 6, 4], false).unwrap(), "<|endoftext|>i<think> hi");
        assert_eq!(tok.decode(&[5, 1, 6, 4], true).unwrap(), "i<think> hi");
        assert!(matches!(
            tok.decode(&[7], false),
            Err(TokenizeError::TokenOutOfRange { id: 7, vocab_size: 7 })
        ));
    }

    #[test]
    fn add_bos_false_in_config_overrides_the_post_processor() {
        let dir = TempDir::new("nobos");
        let mut json = tiny_byte_level(byte_level_decoder());
        json["post_processor"] = json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [5], "tokens": ["<|endoftext|>"]}}
        });
        dir.write("tokenizer.json", &json);
        let with_pp = Tokenizer::from_hf_file(dir.0.join("tokenizer.json"), None).unwrap();
        assert_eq!((with_pp.bos_id(), with_pp.add_bos()), (Some(5), true));
        assert_eq!(with_pp.encode("hi", true).unwrap(), vec![5, 2]);

        dir.write(
            "tokenizer_config.json",
            &json!({"add_bos_token": false, "bos_token": "<|endoftext|>"}),
        );
        let tok = Tokenizer::from_hf_dir(&dir.0).unwrap();
        assert!(!tok.add_bos());
        assert_eq!(tok.encode("hi", true).unwrap(), vec![2]);
    }

    #[test]
    fn unsupported_decoder_is_named() {
        let dir = TempDir::new("wordpiece");
        dir.write(
            "tokenizer.json",
            &tiny_byte_level(json!({"type": "WordPiece", "prefix": "##", "cleanup": true})),
        );
        let err = Tokenizer::from_hf_dir(&dir.0).unwrap_err().to_string();
        assert!(err.contains("decoder WordPiece"), "{err}");
        assert!(err.contains("tokenizer.json"), "{err}");
    }

    #[test]
    fn decoder_styles() {
        let name = "t";
        assert_eq!(piece_style(None, name).unwrap(), (PieceStyle::Raw, false));
        let meta = json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": false});
        assert_eq!(piece_style(Some(&meta), name).unwrap(), (PieceStyle::SentencePiece, true));
        let never = json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "never"});
        assert_eq!(piece_style(Some(&never), name).unwrap(), (PieceStyle::SentencePiece, false));
        let llama2 = json!({"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]});
        assert_eq!(piece_style(Some(&llama2), name).unwrap(), (PieceStyle::SentencePiece, true));
        assert!(piece_style(Some(&json!({"type": "CTC"})), name).is_err());
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = Tokenizer::from_hf_dir("/nonexistent/kt-model").unwrap_err().to_string();
        assert!(err.contains("/nonexistent/kt-model/tokenizer.json"), "{err}");
    }
}
