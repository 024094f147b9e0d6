use std::path::Path;

/// Everything that can go wrong reading weight files. Every variant names the file (or folder,
/// or model) it is about and says precisely what is wrong, so the message alone is enough to
/// find the problem.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{file}: not a GGUF file: it starts with {found:02x?}, not the magic \"GGUF\"")]
    NotGguf { file: String, found: Vec<u8> },

    #[error("{file}: unsupported GGUF version {version}: {reason}")]
    UnsupportedVersion { file: String, version: u32, reason: &'static str },

    /// A field, or a length or count read from the file, runs past the end of the bytes.
    #[error("{file}: at byte {offset}: {what} needs {need} bytes, but only {have} remain")]
    Truncated { file: String, offset: u64, what: String, need: u128, have: u64 },

    /// A structurally invalid value at a known position of the file.
    #[error("{file}: at byte {offset}: {reason}")]
    Malformed { file: String, offset: u64, reason: String },

    /// A tensor whose description or data is invalid.
    #[error("{file}: tensor `{name}` {reason}")]
    BadTensor { file: String, name: String, reason: String },

    #[error("{source_name}: no tensor named `{name}`")]
    TensorNotFound { source_name: String, name: String },

    #[error("tensor `{name}` appears twice: in {first} and in {second}")]
    DuplicateTensor { name: String, first: String, second: String },

    #[error(
        "{file}: tensor `{name}` has dtype {dtype}, which kt cannot load (only F32, F16 and BF16)"
    )]
    UnsupportedDtype { file: String, name: String, dtype: String },

    /// A split GGUF set that is incomplete or inconsistent.
    #[error("{path}: {reason}")]
    BadSplit { path: String, reason: String },

    /// A model folder that does not hold exactly one usable model.
    #[error("{dir}: {reason}")]
    BadFolder { dir: String, reason: String },

    #[error("{file}: invalid JSON: {source}")]
    Json {
        file: String,
        #[source]
        source: serde_json::Error,
    },
}

impl FormatError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io { path: path.display().to_string(), source }
    }

    pub(crate) fn bad_tensor(file: &str, name: &str, reason: impl Into<String>) -> Self {
        Self::BadTensor { file: file.to_owned(), name: name.to_owned(), reason: reason.into() }
    }
}
