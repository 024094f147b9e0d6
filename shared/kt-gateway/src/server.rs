//! The HTTP server: state, router, middleware (API keys, CORS, metrics, body limit), and the
//! small routes (`/health`, `/ready`, `/metrics`, the web UI).

use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRequest, MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;

use crate::admission::Admission;
use crate::engine::Trace;
use crate::error::{ApiError, Flavor, Flavored, GatewayError};
use crate::metrics::Metrics;
use crate::model::ModelCard;
use crate::pool::{Pool, RoutingConfig, WorkerEndpoint};
use crate::{names, ollama, openai, web};

/// Gateway settings (the binary's flags map onto these one to one).
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Accepted API keys; empty = no key needed.
    pub api_keys: Vec<String>,
    /// Largest request body in bytes (413 above). Default 4 MiB.
    pub max_body_bytes: usize,
    /// Generations admitted at once (across all workers). Default 512.
    pub max_running: usize,
    /// Requests allowed to wait for admission (429 beyond). Default 1024.
    pub max_queue: usize,
    /// Longest wait for admission (503 after). Default 30 s.
    pub queue_timeout: Duration,
    /// Origins allowed by CORS: empty = no CORS headers; `*` = any.
    pub cors_origins: Vec<String>,
    /// Context length to assume when neither the workers nor the model say. Default 4096.
    pub default_context: u32,
    pub routing: RoutingConfig,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            api_keys: Vec::new(),
            max_body_bytes: 4 << 20,
            max_running: 512,
            max_queue: 1024,
            queue_timeout: Duration::from_secs(30),
            cors_origins: Vec::new(),
            default_context: 4096,
            routing: RoutingConfig::default(),
        }
    }
}

impl GatewayConfig {
    /// Checks the settings; errors name the setting.
    pub fn validate(&self) -> Result<(), GatewayError> {
        let bad = |what: &str, reason: &str| {
            Err(GatewayError::Config { what: what.into(), reason: reason.into() })
        };
        if self.max_body_bytes < 1024 {
            return bad("max_body_bytes", "must be at least 1024");
        }
        if self.max_running == 0 {
            return bad("max_running", "must be at least 1");
        }
        if self.api_keys.iter().any(String::is_empty) {
            return bad("api_keys", "an API key must not be empty");
        }
        if self.routing.affinity_block_tokens == 0 {
            return bad("affinity_block_tokens", "must be at least 1");
        }
        Ok(())
    }
}

/// Shared by every request.
#[derive(Debug)]
pub struct AppState {
    pub(crate) cfg: GatewayConfig,
    pub(crate) model: ModelCard,
    pub(crate) pool: Arc<Pool>,
    pub(crate) admission: Admission,
    pub(crate) metrics: Metrics,
    ids: AtomicU64,
    seed: u64,
}

impl AppState {
    /// The context length in force: what healthy workers report, else the model's, else
    /// the configured default.
    pub(crate) fn context_length(&self) -> u32 {
        self.pool
            .max_context()
            .or(self.model.facts.context_length)
            .unwrap_or(self.cfg.default_context)
    }

    /// A new request id (unique in this process, unpredictable across processes).
    pub(crate) fn new_id(&self) -> String {
        let n = self.ids.fetch_add(1, Ordering::Relaxed);
        format!("{:016x}{n:08x}", self.seed ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }

    /// The trace of a request: its `traceparent` if valid, else a new one.
    pub(crate) fn trace(&self, headers: &HeaderMap) -> Trace {
        let request_id = self.new_id();
        let incoming = headers
            .get(names::http::TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .filter(|v| v.len() == 55 && v.split('-').count() == 4);
        let traceparent = match incoming {
            Some(tp) => tp.to_owned(),
            None => {
                let trace_id = format!("{:016x}{}", self.seed, &request_id[8..]);
                let span: String = request_id.chars().rev().take(16).collect();
                format!("00-{:0>32}-{:0>16}-01", &trace_id[..32.min(trace_id.len())], span)
            }
        };
        Trace { traceparent, request_id }
    }
}

/// The gateway: build it with [`Gateway::new`], then [`Gateway::serve`] it or mount
/// [`Gateway::router`] in a bigger app.
#[derive(Debug, Clone)]
pub struct Gateway {
    state: Arc<AppState>,
}

impl Gateway {
    /// Builds the gateway over `workers` and starts its health checks (call inside a tokio
    /// runtime).
    pub fn new(
        cfg: GatewayConfig,
        model: ModelCard,
        workers: Vec<WorkerEndpoint>,
    ) -> Result<Self, GatewayError> {
        cfg.validate()?;
        if workers.is_empty() {
            return Err(GatewayError::Config {
                what: "workers".into(),
                reason: "at least one worker is needed".into(),
            });
        }
        let pool = Arc::new(Pool::new(workers, cfg.routing.clone()));
        tokio::spawn(Arc::clone(&pool).health_loop());
        let seed = {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0),
            );
            h.write_u32(std::process::id());
            h.finish()
        };
        let admission = Admission::new(cfg.max_running, cfg.max_queue, cfg.queue_timeout);
        let state = Arc::new(AppState {
            cfg,
            model,
            pool,
            admission,
            metrics: Metrics::default(),
            ids: AtomicU64::new(0),
            seed,
        });
        Ok(Self { state })
    }

    /// Runs one round of worker health checks now (the loop runs them periodically).
    pub async fn check_workers(&self) {
        self.state.pool.check_all().await;
    }

    /// Workers passing health checks now.
    pub fn healthy_workers(&self) -> usize {
        self.state.pool.healthy_count()
    }

    /// The metrics text, as `/metrics` serves it.
    pub fn metrics_text(&self) -> String {
        render_metrics(&self.state)
    }

    /// The routes with their middleware.
    pub fn router(&self) -> Router {
        let state = Arc::clone(&self.state);
        let api = Router::new()
            .route("/v1/chat/completions", post(openai::chat_completions))
            .route("/v1/completions", post(openai::completions))
            .route("/v1/models", get(openai::list_models))
            .route("/v1/models/{*id}", get(openai::get_model))
            .route("/api/chat", post(ollama::chat))
            .route("/api/generate", post(ollama::generate))
            .route("/api/tags", get(ollama::tags))
            .route("/api/show", post(ollama::show))
            .route("/api/ps", get(ollama::ps))
            .route("/api/version", get(ollama::version))
            .route_layer(middleware::from_fn_with_state(Arc::clone(&state), auth));
        Router::new()
            .merge(api)
            .route("/health", get(health))
            .route("/ready", get(ready))
            .route("/metrics", get(metrics))
            .route("/", get(web::index))
            .route("/web", get(web::index))
            .route("/web/", get(web::index))
            .route("/web/{file}", get(web::asset))
            .fallback(not_found)
            .method_not_allowed_fallback(method_not_allowed)
            .layer(middleware::from_fn_with_state(Arc::clone(&state), observe))
            .layer(middleware::from_fn_with_state(Arc::clone(&state), cors))
            .with_state(state)
    }

    /// Serves on `listener` until `shutdown` resolves, then lets in-flight requests (streams
    /// included) finish. One round of worker health checks (with their `Info`: the context
    /// length, KV blocks) completes before the first request is answered.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        self.state.pool.check_all().await;
        use axum::serve::ListenerExt;
        // Small SSE writes must not wait for the client's delayed ACK (Nagle).
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let app = self.router().into_make_service_with_connect_info::<SocketAddr>();
        axum::serve(listener, app).with_graceful_shutdown(shutdown).await
    }
}

fn render_metrics(state: &AppState) -> String {
    state.metrics.render(state.admission.waiting(), state.admission.running(), &state.pool.gauges())
}

/// Constant-time comparison of a presented key with the accepted ones.
fn key_ok(presented: &[u8], keys: &[String]) -> bool {
    keys.iter().fold(false, |ok, k| {
        let k = k.as_bytes();
        let same_len = k.len() == presented.len();
        let diff = k.iter().zip(presented).fold(0u8, |d, (a, b)| d | (a ^ b));
        ok | (same_len && diff == 0)
    })
}

async fn auth(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if state.cfg.api_keys.is_empty() {
        return next.run(req).await;
    }
    let h = req.headers();
    let bearer = h
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim);
    let presented = bearer.or_else(|| h.get(names::http::X_API_KEY).and_then(|v| v.to_str().ok()));
    match presented {
        Some(k) if key_ok(k.as_bytes(), &state.cfg.api_keys) => next.run(req).await,
        _ => ApiError::Unauthorized.into_response_as(Flavor::of_path(req.uri().path())),
    }
}

/// Counts requests by route and status.
async fn observe(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let res = next.run(req).await;
    state.metrics.count_request(&route, res.status().as_u16());
    res
}

async fn cors(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let origins = &state.cfg.cors_origins;
    let origin = req.headers().get(header::ORIGIN).cloned();
    let allowed = match &origin {
        Some(o) if !origins.is_empty() => {
            let o_str = o.to_str().unwrap_or("");
            if origins.iter().any(|a| a == "*") {
                Some(HeaderValue::from_static("*"))
            } else if origins.iter().any(|a| a == o_str) {
                Some(o.clone())
            } else {
                None
            }
        }
        _ => None,
    };
    let preflight = req.method() == Method::OPTIONS
        && req.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut res = if preflight && allowed.is_some() {
        StatusCode::NO_CONTENT.into_response()
    } else {
        next.run(req).await
    };
    if let Some(a) = allowed {
        let h = res.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, a);
        h.insert(header::VARY, HeaderValue::from_static("origin"));
        if preflight {
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET, POST, HEAD, OPTIONS"),
            );
            h.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static("authorization, content-type, x-api-key, traceparent"),
            );
            h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
        }
    }
    res
}

async fn not_found(req: Request) -> Response {
    let path = req.uri().path().to_owned();
    let e = ApiError::RouteNotFound { method: req.method().to_string(), path: path.clone() };
    e.into_response_as(Flavor::of_path(&path))
}

async fn method_not_allowed(req: Request) -> Response {
    let path = req.uri().path().to_owned();
    let e = ApiError::MethodNotAllowed { method: req.method().to_string(), path: path.clone() };
    e.into_response_as(Flavor::of_path(&path))
}

async fn health() -> Response {
    axum::Json(serde_json::json!({"status": "ok"})).into_response()
}

async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let healthy = state.pool.healthy_count();
    let total = state.pool.slots().len();
    let body = serde_json::json!({"healthy_workers": healthy, "workers": total});
    if healthy > 0 {
        axum::Json(body).into_response()
    } else {
        let mut res = (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response();
        res.headers_mut().insert(names::http::RETRY_AFTER, HeaderValue::from(5u64));
        res
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        render_metrics(&state),
    )
        .into_response()
}

/// A JSON body, parsed with the limit and errors in the route's flavor that name the field
/// at fault (`messages[0].content: invalid type ...`).
pub(crate) struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Arc<AppState>> for ApiJson<T> {
    type Rejection = Flavored;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        let flavor = Flavor::of_path(req.uri().path());
        let limit = state.cfg.max_body_bytes;
        let too_large = Flavored(flavor, ApiError::PayloadTooLarge { limit });
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(too_large);
        }
        let body = http_body_util::Limited::new(req.into_body(), limit);
        let bytes = match http_body_util::BodyExt::collect(body).await {
            Ok(c) => c.to_bytes(),
            Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
                return Err(too_large)
            }
            Err(_) => {
                let e = ApiError::BadBody("The request body could not be read.".into());
                return Err(Flavored(flavor, e));
            }
        };
        parse_json(&bytes).map(ApiJson).map_err(|e| Flavored(flavor, e))
    }
}

/// Parses `bytes` as JSON into `T`, naming the field of a type error.
pub(crate) fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.is_empty() {
        return Err(ApiError::BadBody(
            "The request body is empty; a JSON object is expected.".into(),
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize::<_, T>(&mut de) {
        Ok(v) => {
            if de.end().is_err() {
                return Err(ApiError::BadBody("Trailing characters after the JSON body.".into()));
            }
            Ok(v)
        }
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if inner.is_syntax() || inner.is_eof() || inner.is_io() {
                Err(ApiError::BadBody(format!("The request body is not valid JSON: {inner}")))
            } else if path == "." || path.is_empty() {
                Err(ApiError::InvalidParam {
                    param: None,
                    message: format!("Invalid request: {inner}"),
                })
            } else {
                Err(ApiError::param(path.clone(), format!("Invalid value for `{path}`: {inner}")))
            }
        }
    }
}

/// Status code of a response body stream: SSE / NDJSON helpers.
pub(crate) fn stream_response(
    content_type: &'static str,
    body: Body,
    request_id: &str,
) -> Response {
    let mut res = Response::new(body);
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(request_id) {
        h.insert(names::http::REQUEST_ID, v);
    }
    res
}
