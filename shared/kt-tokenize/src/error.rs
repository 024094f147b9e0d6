//! The one error type of this crate.

use std::path::PathBuf;

/// Why a tokenizer could not be built, or a text or an id list could not be converted.
///
/// Every variant names what it was reading (a file path, or the GGUF source) so that the
/// message alone tells the user what to fix.
#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{}: not valid JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("{}: cannot open as a GGUF model: {source}", path.display())]
    Gguf {
        path: PathBuf,
        #[source]
        source: kt_formats::FormatError,
    },

    /// The Hugging Face `tokenizers` library refused the tokenizer or the text.
    #[error("{source_name}: {message}")]
    Hf { source_name: String, message: String },

    /// A GGUF metadata key that the vocabulary needs is absent.
    #[error("{source_name}: metadata key `{key}` is missing")]
    MissingKey { source_name: String, key: String },

    /// A metadata key or JSON field has the wrong type or an impossible value.
    #[error("{source_name}: `{key}`: {reason}")]
    BadValue { source_name: String, key: String, reason: String },

    /// `tokenizer.ggml.model` names a tokenizer kind kt does not implement.
    #[error(
        "{source_name}: tokenizer model `{model}` is not supported \
         (kt reads `gpt2` byte-level BPE and `llama` SentencePiece vocabularies)"
    )]
    UnsupportedModel { source_name: String, model: String },

    /// `tokenizer.ggml.pre` names a pre-tokenizer family kt does not know. Never silently
    /// replaced by another family: a wrong split gives wrong ids without any other symptom.
    #[error(
        "{source_name}: unknown pre-tokenizer family `{family}` (tokenizer.ggml.pre); \
         kt knows: {known}"
    )]
    UnknownPreTokenizer { source_name: String, family: String, known: String },

    /// A `tokenizer.json` whose model, decoder or settings kt cannot mirror exactly.
    #[error("{source_name}: {what} is not supported: {reason}")]
    Unsupported { source_name: String, what: String, reason: String },

    /// An id at or past the vocabulary size.
    #[error("token id {id} is out of range: the vocabulary has {vocab_size} tokens")]
    TokenOutOfRange { id: u32, vocab_size: usize },

    /// `for_model_path` found neither a `tokenizer.json` nor a GGUF file.
    #[error(
        "{}: no tokenizer found (expected a Hugging Face folder with tokenizer.json, \
         a .gguf file, or a folder of .gguf files)",
        path.display()
    )]
    NotFound { path: PathBuf },
}

/// Shorthand used throughout the crate.
pub type Result<T, E = TokenizeError> = std::result::Result<T, E>;

impl TokenizeError {
    pub(crate) fn hf(source_name: &str, e: impl std::fmt::Display) -> Self {
        TokenizeError::Hf { source_name: source_name.to_owned(), message: e.to_string() }
    }

    pub(crate) fn bad(source_name: &str, key: &str, reason: impl Into<String>) -> Self {
        TokenizeError::BadValue {
            source_name: source_name.to_owned(),
            key: key.to_owned(),
            reason: reason.into(),
        }
    }

    pub(crate) fn missing(source_name: &str, key: &str) -> Self {
        TokenizeError::MissingKey { source_name: source_name.to_owned(), key: key.to_owned() }
    }

    pub(crate) fn unsupported(
        source_name: &str,
        what: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        TokenizeError::Unsupported {
            source_name: source_name.to_owned(),
            what: what.into(),
            reason: reason.into(),
        }
    }
}
