//! The one table from gateway errors to HTTP status codes and OpenAI- or Ollama-shaped bodies.
//!
//! Clients see a message written for them, the parameter at fault where there is one, and
//! never a panic, a backtrace, an internal error chain or a file path.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::names;

/// Which API shape an error body takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// `{"error": {"message", "type", "param", "code"}}` (routes under `/v1` and the rest).
    OpenAi,
    /// `{"error": "message"}` (routes under `/api`).
    Ollama,
}

impl Flavor {
    /// The flavor of a request path.
    pub fn of_path(path: &str) -> Self {
        if path == "/api" || path.starts_with("/api/") {
            Flavor::Ollama
        } else {
            Flavor::OpenAi
        }
    }
}

/// Everything a request can fail with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// A request parameter is missing, of the wrong type or out of range.
    #[error("{message}")]
    InvalidParam { param: Option<String>, message: String },
    /// The body is not JSON, or not valid UTF-8.
    #[error("{0}")]
    BadBody(String),
    /// Prompt + completion budget exceed the context.
    #[error(
        "This model's maximum context length is {max} tokens. However, you requested {} tokens \
         ({prompt} in the messages, {completion} in the completion). Please reduce the length \
         of the messages or completion.", prompt + completion
    )]
    ContextLength { max: u32, prompt: usize, completion: usize },
    #[error("Incorrect or missing API key. Give it as `Authorization: Bearer KEY`.")]
    Unauthorized,
    #[error("The model `{0}` does not exist.")]
    ModelNotFound(String),
    #[error("No route for {method} {path}.")]
    RouteNotFound { method: String, path: String },
    #[error("Method {method} is not allowed on {path}.")]
    MethodNotAllowed { method: String, path: String },
    #[error("The request body is larger than the limit of {limit} bytes.")]
    PayloadTooLarge { limit: usize },
    /// The admission queue is full.
    #[error(
        "The server is at capacity ({queued} requests waiting); retry after {retry_after_s} s."
    )]
    QueueFull { queued: usize, retry_after_s: u64 },
    /// No worker can take the request (none healthy, queue wait timed out, worker lost).
    #[error("{message}")]
    Unavailable { message: String, retry_after_s: u64 },
    /// The worker failed the sequence or the model's output broke a promise (JSON mode).
    #[error("{0}")]
    Generation(String),
    /// A bug or an unexpected failure; the message is already sanitised.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// A 400 naming `param`.
    pub fn param(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::InvalidParam { param: Some(param.into()), message: message.into() }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidParam { .. }
            | ApiError::BadBody(_)
            | ApiError::ContextLength { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::ModelNotFound(_) | ApiError::RouteNotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::QueueFull { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Generation(_) | ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's `error.type`.
    pub fn kind(&self) -> &'static str {
        match self {
            ApiError::InvalidParam { .. }
            | ApiError::BadBody(_)
            | ApiError::ContextLength { .. }
            | ApiError::Unauthorized
            | ApiError::ModelNotFound(_)
            | ApiError::RouteNotFound { .. }
            | ApiError::MethodNotAllowed { .. }
            | ApiError::PayloadTooLarge { .. } => "invalid_request_error",
            ApiError::QueueFull { .. } => "rate_limit_error",
            ApiError::Unavailable { .. } => "service_unavailable",
            ApiError::Generation(_) | ApiError::Internal(_) => "server_error",
        }
    }

    /// OpenAI's `error.code`.
    pub fn code(&self) -> Option<&'static str> {
        match self {
            ApiError::InvalidParam { .. } => Some("invalid_value"),
            ApiError::BadBody(_) => Some("invalid_json"),
            ApiError::ContextLength { .. } => Some("context_length_exceeded"),
            ApiError::Unauthorized => Some("invalid_api_key"),
            ApiError::ModelNotFound(_) => Some("model_not_found"),
            ApiError::RouteNotFound { .. } => Some("unknown_url"),
            ApiError::MethodNotAllowed { .. } => Some("method_not_allowed"),
            ApiError::PayloadTooLarge { .. } => Some("request_too_large"),
            ApiError::QueueFull { .. } => Some("queue_full"),
            ApiError::Unavailable { .. } => Some("unavailable"),
            ApiError::Generation(_) => Some("generation_failed"),
            ApiError::Internal(_) => None,
        }
    }

    /// OpenAI's `error.param`.
    pub fn param_name(&self) -> Option<&str> {
        match self {
            ApiError::InvalidParam { param, .. } => param.as_deref(),
            ApiError::ContextLength { .. } => Some("messages"),
            ApiError::ModelNotFound(_) => Some("model"),
            _ => None,
        }
    }

    /// Seconds a client should wait before retrying, for 429 and 503.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::QueueFull { retry_after_s, .. }
            | ApiError::Unavailable { retry_after_s, .. } => Some(*retry_after_s),
            _ => None,
        }
    }

    /// The body in the given flavor.
    pub fn body(&self, flavor: Flavor) -> serde_json::Value {
        match flavor {
            Flavor::OpenAi => json!({
                "error": {
                    "message": self.to_string(),
                    "type": self.kind(),
                    "param": self.param_name(),
                    "code": self.code(),
                }
            }),
            Flavor::Ollama => json!({ "error": self.to_string() }),
        }
    }

    /// The full HTTP response in the given flavor.
    pub fn into_response_as(self, flavor: Flavor) -> Response {
        let status = self.status();
        let mut res = (status, axum::Json(self.body(flavor))).into_response();
        if let Some(s) = self.retry_after() {
            res.headers_mut().insert(names::http::RETRY_AFTER, HeaderValue::from(s));
        }
        res
    }
}

/// An [`ApiError`] with the flavor its route answers in.
#[derive(Debug)]
pub struct Flavored(pub Flavor, pub ApiError);

impl IntoResponse for Flavored {
    fn into_response(self) -> Response {
        self.1.into_response_as(self.0)
    }
}

/// Errors of building a gateway (bad model, bad config); for the binary's edge.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("tokenizer: {0}")]
    Tokenizer(Box<kt_tokenize::TokenizeError>),
    #[error("chat template: {0}")]
    Template(Box<kt_chat_template::TemplateError>),
    #[error("model file: {0}")]
    Format(Box<kt_formats::FormatError>),
    #[error("{what}: {reason}")]
    Config { what: String, reason: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl From<kt_tokenize::TokenizeError> for GatewayError {
    fn from(e: kt_tokenize::TokenizeError) -> Self {
        GatewayError::Tokenizer(Box::new(e))
    }
}

impl From<kt_chat_template::TemplateError> for GatewayError {
    fn from(e: kt_chat_template::TemplateError) -> Self {
        GatewayError::Template(Box::new(e))
    }
}

impl From<kt_formats::FormatError> for GatewayError {
    fn from(e: kt_formats::FormatError) -> Self {
        GatewayError::Format(Box::new(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_a_status_and_both_shapes() {
        let errors = [
            ApiError::param("temperature", "bad"),
            ApiError::ContextLength { max: 128, prompt: 100, completion: 50 },
            ApiError::Unauthorized,
            ApiError::QueueFull { queued: 3, retry_after_s: 1 },
            ApiError::Unavailable { message: "x".into(), retry_after_s: 2 },
        ];
        for e in errors {
            let o = e.body(Flavor::OpenAi);
            assert!(o["error"]["message"].is_string());
            assert!(o["error"]["type"].is_string());
            assert!(e.body(Flavor::Ollama)["error"].is_string());
        }
        let e = ApiError::ContextLength { max: 128, prompt: 100, completion: 50 };
        let m = e.to_string();
        assert!(m.contains("128") && m.contains("150") && m.contains("100") && m.contains("50"));
        assert_eq!(Flavor::of_path("/api/chat"), Flavor::Ollama);
        assert_eq!(Flavor::of_path("/v1/models"), Flavor::OpenAi);
    }
}
