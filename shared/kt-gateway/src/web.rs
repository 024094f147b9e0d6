//! The web chat UI: static files embedded in the binary (no build step, no CDN), served at
//! `/` and `/web/`. The files themselves live in `shared/kt-gateway/web/`.

use axum::extract::Path;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::error::{ApiError, Flavor};

const INDEX: &str = include_str!("../web/index.html");
const APP_JS: &str = include_str!("../web/app.js");
const STYLE_CSS: &str = include_str!("../web/style.css");

fn file(body: &'static str, content_type: &'static str) -> Response {
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
        .into_response()
}

pub(crate) async fn index() -> Response {
    file(INDEX, "text/html; charset=utf-8")
}

pub(crate) async fn asset(Path(name): Path<String>) -> Response {
    match name.as_str() {
        "" | "index.html" => file(INDEX, "text/html; charset=utf-8"),
        "app.js" => file(APP_JS, "text/javascript; charset=utf-8"),
        "style.css" => file(STYLE_CSS, "text/css; charset=utf-8"),
        _ => ApiError::RouteNotFound { method: "GET".into(), path: format!("/web/{name}") }
            .into_response_as(Flavor::OpenAi),
    }
}
