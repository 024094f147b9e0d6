//! Finding a model's chat template: Hugging Face `tokenizer_config.json` and GGUF metadata.

use std::path::Path;

use kt_formats::Metadata;
use serde_json::Value as Json;

use crate::{ChatTemplate, TemplateError};

/// GGUF key of the default chat template.
pub const GGUF_CHAT_TEMPLATE: &str = "tokenizer.chat_template";
/// GGUF key of the tool-use chat template (llama.cpp writes named templates as
/// `tokenizer.chat_template.<name>`).
pub const GGUF_CHAT_TEMPLATE_TOOL_USE: &str = "tokenizer.chat_template.tool_use";
const GGUF_TOKENS: &str = "tokenizer.ggml.tokens";
const GGUF_BOS_ID: &str = "tokenizer.ggml.bos_token_id";
const GGUF_EOS_ID: &str = "tokenizer.ggml.eos_token_id";

impl ChatTemplate {
    /// Reads `chat_template`, `bos_token` and `eos_token` from a Hugging Face
    /// `tokenizer_config.json`.
    ///
    /// `chat_template` is a string, or a list of `{"name", "template"}` objects: the one named
    /// `default` (else the first) is used, and the one named `tool_use` for requests with
    /// tools. When the config has no `chat_template`, a `chat_template.jinja` file next to it
    /// (where newer transformers versions save it) is used. Tokens are strings or
    /// `AddedToken` objects (`{"content": ...}`).
    pub fn from_tokenizer_config(path: impl AsRef<Path>) -> Result<Self, TemplateError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|source| TemplateError::Io { path: path.to_owned(), source })?;
        let config: Json = serde_json::from_str(&text)
            .map_err(|source| TemplateError::Json { path: path.to_owned(), source })?;
        let origin = path.display().to_string();
        let bos = token(&config, "bos_token", &origin)?;
        let eos = token(&config, "eos_token", &origin)?;
        let invalid = |reason: &str| TemplateError::Invalid {
            origin: origin.clone(),
            field: "chat_template".into(),
            reason: reason.into(),
        };
        match config.get("chat_template") {
            Some(Json::String(source)) => Self::new(source, bos, eos),
            Some(Json::Array(list)) => {
                let mut named = Vec::with_capacity(list.len());
                for entry in list {
                    let name = entry.get("name").and_then(Json::as_str);
                    let source = entry.get("template").and_then(Json::as_str);
                    match (name, source) {
                        (Some(n), Some(s)) => named.push((n, s)),
                        _ => return Err(invalid("list entries need string `name` and `template`")),
                    }
                }
                let default = named
                    .iter()
                    .find(|(n, _)| *n == "default")
                    .or_else(|| named.first())
                    .map(|(_, s)| *s)
                    .ok_or_else(|| invalid("empty list"))?;
                let tool_use = named.iter().find(|(n, _)| *n == "tool_use").map(|(_, s)| *s);
                Self::with_variants(default, tool_use, bos, eos)
            }
            Some(Json::Null) | None => {
                let sibling = path.with_file_name("chat_template.jinja");
                match std::fs::read_to_string(&sibling) {
                    Ok(source) => Self::new(&source, bos, eos),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        Err(TemplateError::Missing(origin))
                    }
                    Err(source) => Err(TemplateError::Io { path: sibling, source }),
                }
            }
            Some(_) => Err(invalid("expected a string or a list of named templates")),
        }
    }

    /// Reads the chat template of a GGUF file (`tokenizer.chat_template`, and
    /// `tokenizer.chat_template.tool_use` if present); bos/eos are the entries of
    /// `tokenizer.ggml.tokens` at `tokenizer.ggml.bos_token_id`/`eos_token_id`.
    pub fn from_gguf(md: &Metadata) -> Result<Self, TemplateError> {
        let source = md
            .get_str(GGUF_CHAT_TEMPLATE)
            .ok_or_else(|| TemplateError::Missing("GGUF metadata".into()))?;
        let tool_use = md.get_str(GGUF_CHAT_TEMPLATE_TOOL_USE);
        let tokens = md.get_array(GGUF_TOKENS).and_then(|a| a.as_strings());
        let lookup = |key: &str| -> Option<String> {
            let id = usize::try_from(md.get_u32(key)?).ok()?;
            tokens?.get(id).map(|s| s.to_string())
        };
        Self::with_variants(source, tool_use, lookup(GGUF_BOS_ID), lookup(GGUF_EOS_ID))
    }
}

/// A special token from a tokenizer config: a string, an `AddedToken` object, or absent.
fn token(config: &Json, field: &str, origin: &str) -> Result<Option<String>, TemplateError> {
    match config.get(field) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(obj @ Json::Object(_)) => match obj.get("content") {
            Some(Json::String(s)) => Ok(Some(s.clone())),
            _ => Err(TemplateError::Invalid {
                origin: origin.into(),
                field: field.into(),
                reason: "AddedToken without a string `content`".into(),
            }),
        },
        Some(_) => Err(TemplateError::Invalid {
            origin: origin.into(),
            field: field.into(),
            reason: "expected a string or an AddedToken object".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ChatRequest;
    use kt_formats::{Array, Value};
    use serde_json::json;

    fn tmp_dir(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("kt-chat-template-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn one_user() -> ChatRequest {
        ChatRequest {
            messages: vec![json!({"role": "user", "content": "hi"})],
            ..Default::default()
        }
    }

    #[test]
    fn tokenizer_config_with_added_tokens() {
        let dir = tmp_dir("added");
        let path = dir.join("tokenizer_config.json");
        let config = json!({
            "bos_token": {"content": "<s>", "lstrip": false, "__type": "AddedToken"},
            "eos_token": "</s>",
            "chat_template": "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}"
        });
        std::fs::write(&path, config.to_string()).unwrap();
        let t = ChatTemplate::from_tokenizer_config(&path).unwrap();
        assert_eq!(t.render(&one_user()).unwrap(), "<s>hi</s>");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn tokenizer_config_with_named_templates() {
        let dir = tmp_dir("named");
        let path = dir.join("tokenizer_config.json");
        let config = json!({
            "chat_template": [
                {"name": "rag", "template": "rag"},
                {"name": "tool_use", "template": "tools:{{ tools | length }}"},
                {"name": "default", "template": "default"}
            ]
        });
        std::fs::write(&path, config.to_string()).unwrap();
        let t = ChatTemplate::from_tokenizer_config(&path).unwrap();
        assert_eq!(t.render(&one_user()).unwrap(), "default");
        let with_tools = ChatRequest { tools: Some(vec![json!({})]), ..one_user() };
        assert_eq!(t.render(&with_tools).unwrap(), "tools:1");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn tokenizer_config_without_template() {
        let dir = tmp_dir("missing");
        let path = dir.join("tokenizer_config.json");
        std::fs::write(&path, "{}").unwrap();
        assert!(matches!(
            ChatTemplate::from_tokenizer_config(&path),
            Err(TemplateError::Missing(_))
        ));
        std::fs::write(dir.join("chat_template.jinja"), "side").unwrap();
        let t = ChatTemplate::from_tokenizer_config(&path).unwrap();
        assert_eq!(t.render(&one_user()).unwrap(), "side");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn gguf_metadata() {
        let mut md = Metadata::new();
        md.insert(GGUF_CHAT_TEMPLATE.into(), Value::from("{{ bos_token }}|{{ eos_token }}"))
            .unwrap();
        md.insert(GGUF_TOKENS.into(), Value::Array(Array::from(vec!["<unk>", "<s>", "</s>"])))
            .unwrap();
        md.insert(GGUF_BOS_ID.into(), Value::U32(1)).unwrap();
        md.insert(GGUF_EOS_ID.into(), Value::U32(2)).unwrap();
        let t = ChatTemplate::from_gguf(&md).unwrap();
        assert_eq!(t.render(&one_user()).unwrap(), "<s>|</s>");
        assert!(matches!(
            ChatTemplate::from_gguf(&Metadata::new()),
            Err(TemplateError::Missing(_))
        ));
    }
}
