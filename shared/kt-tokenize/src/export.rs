//! Writing a tokenizer out as a Hugging Face `tokenizer.json`.
//!
//! Lets a GGUF model's vocabulary be used by tools that read `tokenizer.json`, and lets the
//! tests check that the Hugging Face loading path reproduces the GGUF one id for id.

use serde_json::{json, Value};

use crate::pieces::{PieceStyle, SPM_SPACE};
use crate::{Result, TokenizeError, Tokenizer};

impl Tokenizer {
    /// This tokenizer as a `tokenizer.json`: its normalizer, pre-tokenizer and BPE model, the
    /// control and user-defined tokens as added tokens, a decoder for its piece style, and a
    /// `TemplateProcessing` post-processor for the ids `add_special` adds.
    ///
    /// Loading the result with [`Tokenizer::from_hf_file`] gives the same ids for every text.
    pub fn to_hf_json(&self) -> Result<String> {
        let inner = &*self.inner;
        let model_json =
            inner.model.to_string(false).map_err(|e| TokenizeError::hf(&inner.name, e))?;
        let mut doc: Value = serde_json::from_str(&model_json)
            .map_err(|e| TokenizeError::hf(&inner.name, format!("serialized tokenizer: {e}")))?;

        let added: Vec<Value> = inner
            .tokens
            .iter()
            .enumerate()
            .filter(|(_, t)| t.kind.is_matched_in_text())
            .map(|(id, t)| {
                json!({
                    "id": id,
                    "content": t.text,
                    "single_word": false,
                    "lstrip": t.lstrip,
                    "rstrip": t.rstrip,
                    "normalized": false,
                    "special": t.kind.is_special(),
                })
            })
            .collect();

        let decoder = match inner.style {
            PieceStyle::ByteLevel => json!({
                "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false
            }),
            PieceStyle::SentencePiece => {
                let mut steps = vec![
                    json!({"type": "Replace", "pattern": {"String": SPM_SPACE.to_string()}, "content": " "}),
                    json!({"type": "ByteFallback"}),
                    json!({"type": "Fuse"}),
                ];
                if inner.strip_first_space {
                    steps.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
                }
                json!({"type": "Sequence", "decoders": steps})
            }
            PieceStyle::Raw => Value::Null,
        };

        let post = if inner.prefix.is_empty() && inner.suffix.is_empty() {
            Value::Null
        } else {
            let text_of = |id: u32| self.id_to_token(id).unwrap_or_default().to_owned();
            let special = |id: u32| json!({"SpecialToken": {"id": text_of(id), "type_id": 0}});
            let seq =
                |name: &str, type_id: u32| json!({"Sequence": {"id": name, "type_id": type_id}});
            let mut single: Vec<Value> = inner.prefix.iter().map(|&id| special(id)).collect();
            single.push(seq("A", 0));
            single.extend(inner.suffix.iter().map(|&id| special(id)));
            let mut pair = single.clone();
            pair.extend(inner.prefix.iter().map(|&id| special(id)));
            pair.push(seq("B", 1));
            pair.extend(inner.suffix.iter().map(|&id| special(id)));
            let mut tokens = serde_json::Map::new();
            for &id in inner.prefix.iter().chain(&inner.suffix) {
                let text = text_of(id);
                tokens.insert(text.clone(), json!({"id": text, "ids": [id], "tokens": [text]}));
            }
            json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": tokens})
        };

        if let Some(obj) = doc.as_object_mut() {
            obj.insert("added_tokens".to_owned(), Value::Array(added));
            obj.insert("decoder".to_owned(), decoder);
            obj.insert("post_processor".to_owned(), post);
        }
        serde_json::to_string(&doc).map_err(|e| TokenizeError::hf(&inner.name, e))
    }
}
