//! Errors of plan parsing and model shape loading. Every plan error names the file, the line
//! where known, and the field or rule.

use std::path::PathBuf;

/// A plan file that cannot be read, parsed or validated.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{file}: cannot read: {source}")]
    Io {
        file: String,
        #[source]
        source: std::io::Error,
    },
    /// The YAML does not parse or does not fit the schema (unknown key, wrong type).
    #[error("{file}:{line}:{column}: {message}")]
    Yaml { file: String, line: usize, column: usize, message: String },
    /// The YAML fits the schema but says something impossible.
    #[error("{file}{}: {field}: {reason}", line.map(|l| format!(":{l}")).unwrap_or_default())]
    Invalid { file: String, line: Option<usize>, field: String, reason: String },
}

/// A model description that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ModelShapeError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: {source}", path.display())]
    Config {
        path: PathBuf,
        #[source]
        source: kt_models::ModelError,
    },
    #[error("{}: {source}", path.display())]
    Format {
        path: PathBuf,
        #[source]
        source: kt_formats::FormatError,
    },
    #[error("{}: {reason}", path.display())]
    Unsupported { path: PathBuf, reason: String },
}
