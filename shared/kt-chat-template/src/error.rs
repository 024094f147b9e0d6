//! Errors of loading and rendering chat templates.

use std::path::PathBuf;

/// What went wrong with a chat template.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The template source does not parse.
    #[error("chat template does not compile: {0}")]
    Syntax(String),
    /// The template called `raise_exception(message)`: the template rejects the
    /// conversation (say, roles that do not alternate). The message is the template's own.
    #[error("{0}")]
    Raised(String),
    /// Rendering failed (an undefined attribute, a type error, an unknown method...).
    #[error("chat template failed to render: {0}")]
    Render(String),
    /// The request itself is malformed (a message that is not a JSON object).
    #[error("invalid chat request: {0}")]
    InvalidRequest(String),
    /// No chat template in the tokenizer config or GGUF metadata.
    #[error("no chat template in {0}")]
    Missing(String),
    /// The `chat_template` or token entries have an unexpected shape.
    #[error("invalid chat template field {field} in {origin}: {reason}")]
    Invalid { origin: String, field: String, reason: String },
    /// Reading a tokenizer config failed.
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// A tokenizer config is not JSON.
    #[error("cannot parse {path}: {source}")]
    Json { path: PathBuf, source: serde_json::Error },
}
