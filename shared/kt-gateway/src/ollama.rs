//! The Ollama API: `/api/chat`, `/api/generate` (NDJSON streaming, on by default),
//! `/api/tags`, `/api/show`, `/api/ps`, `/api/version`.
//!
//! Durations are nanoseconds, as Ollama writes them: `load_duration` is the time the request
//! waited for admission and routing (kt has no per-request model load), `prompt_eval_duration`
//! admission to the first token, `eval_duration` first token to the end.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::api::{self, Job, Sampling};
use crate::engine::{self, Event, Finish, Outcome};
use crate::error::{ApiError, Flavor};
use crate::model::parameter_size;
use crate::server::{stream_response, ApiJson, AppState};
use crate::tools::ToolChoice;

type Res = Result<Response, Response>;

fn err(e: ApiError) -> Response {
    e.into_response_as(Flavor::Ollama)
}

/// `options` (llama.cpp-style names). Unknown options are accepted and ignored, as Ollama
/// does for options that do not apply.
#[derive(Debug, Deserialize, Default)]
struct Options {
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    min_p: Option<f32>,
    num_predict: Option<i64>,
    stop: Option<Vec<String>>,
    seed: Option<i64>,
    repeat_penalty: Option<f32>,
    repeat_last_n: Option<i64>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    num_ctx: Option<i64>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ChatBody {
    model: String,
    #[serde(default)]
    messages: Vec<Value>,
    tools: Option<Vec<Value>>,
    format: Option<Value>,
    #[serde(default)]
    options: Options,
    stream: Option<bool>,
    #[allow(dead_code)]
    keep_alive: Option<Value>,
    think: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct GenerateBody {
    model: String,
    #[serde(default)]
    prompt: String,
    suffix: Option<String>,
    system: Option<String>,
    template: Option<String>,
    context: Option<Vec<u32>>,
    raw: Option<bool>,
    format: Option<Value>,
    images: Option<Vec<Value>>,
    #[serde(default)]
    options: Options,
    stream: Option<bool>,
    #[allow(dead_code)]
    keep_alive: Option<Value>,
    think: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ShowBody {
    #[serde(alias = "name")]
    model: String,
}

fn sampling(o: &Options) -> Result<Sampling, ApiError> {
    let top_k = match o.top_k {
        None => 40,
        Some(k) if k <= 0 => 0,
        Some(k) => k as usize,
    };
    let penalty_window = match o.repeat_last_n {
        None => Some(64),
        Some(-1) => None,
        Some(n) if n >= 0 => Some(n as usize),
        Some(n) => {
            return Err(ApiError::param(
                "options.repeat_last_n",
                format!("repeat_last_n {n} must be -1 or ≥ 0"),
            ))
        }
    };
    Ok(Sampling {
        temperature: o.temperature.unwrap_or(0.8),
        top_p: o.top_p.unwrap_or(0.9),
        top_k,
        min_p: o.min_p.unwrap_or(0.0),
        repetition_penalty: o.repeat_penalty.unwrap_or(1.1),
        presence_penalty: o.presence_penalty.unwrap_or(0.0),
        frequency_penalty: o.frequency_penalty.unwrap_or(0.0),
        penalty_window,
        logit_bias: Vec::new(),
        seed: o.seed.filter(|&s| s >= 0).map(|s| s as u64),
        stop: o.stop.clone().unwrap_or_default(),
    })
}

/// `num_predict`: -1 (default) = until the context is full, -2 = fill the context, n > 0.
fn max_tokens(o: &Options) -> Result<Option<u32>, ApiError> {
    match o.num_predict {
        None | Some(-1) | Some(-2) => Ok(None),
        Some(n) if n > 0 => Ok(Some(n.min(u32::MAX as i64) as u32)),
        Some(n) => Err(ApiError::param(
            "options.num_predict",
            format!("num_predict {n} must be -1, -2 or > 0"),
        )),
    }
}

fn num_ctx(o: &Options) -> Option<u32> {
    o.num_ctx.filter(|&n| n > 0).map(|n| n.min(u32::MAX as i64) as u32)
}

/// `format`: `"json"`, or a JSON schema (checked as JSON syntax only; the schema itself is
/// not enforced).
fn json_mode(format: &Option<Value>) -> Result<bool, ApiError> {
    match format {
        None => Ok(false),
        Some(Value::String(s)) if s.is_empty() => Ok(false),
        Some(Value::String(s)) if s == "json" => Ok(true),
        Some(Value::Object(_)) => Ok(true),
        Some(other) => {
            Err(ApiError::param("format", format!("format {other} is not supported; use \"json\"")))
        }
    }
}

fn check_model(state: &AppState, model: &str) -> Result<(), ApiError> {
    if api::model_matches(state, model) {
        Ok(())
    } else {
        Err(ApiError::ModelNotFound(model.to_owned()))
    }
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

fn ns(d: std::time::Duration) -> u64 {
    d.as_nanos().min(u128::from(u64::MAX)) as u64
}

fn done_reason(f: Finish) -> &'static str {
    match f {
        Finish::Length => "length",
        _ => "stop",
    }
}

/// The counts and durations of a final object.
fn final_fields(o: &Outcome, arrived: Instant, v: &mut Value) {
    let first = o.first_token.unwrap_or(o.ended);
    v["done"] = json!(true);
    v["done_reason"] = json!(done_reason(o.finish));
    v["total_duration"] = json!(ns(o.ended.duration_since(arrived)));
    v["load_duration"] = json!(ns(o.admitted.duration_since(arrived)));
    v["prompt_eval_count"] = json!(o.prompt_tokens);
    v["prompt_eval_duration"] = json!(ns(first.duration_since(o.admitted)));
    v["eval_count"] = json!(o.completion_tokens);
    v["eval_duration"] = json!(ns(o.ended.duration_since(first)));
}

fn ndjson(v: &Value) -> Bytes {
    Bytes::from(format!("{v}\n"))
}

fn tool_calls(o: &Outcome) -> Vec<Value> {
    o.tool_calls
        .iter()
        .map(|c| {
            let args: Value =
                serde_json::from_str(&c.arguments).unwrap_or(Value::String(c.arguments.clone()));
            json!({"function": {"name": c.name, "arguments": args}})
        })
        .collect()
}

pub(crate) async fn chat(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<ChatBody>,
) -> Res {
    let arrived = Instant::now();
    check_model(&state, &body.model).map_err(err)?;
    for (i, m) in body.messages.iter().enumerate() {
        if m.get("images").and_then(Value::as_array).is_some_and(|a| !a.is_empty()) {
            return Err(err(ApiError::param(
                format!("messages[{i}].images"),
                "images are not supported; this model takes text only",
            )));
        }
    }
    let messages = api::normalize_messages(&body.messages).map_err(err)?;
    let mut extra = Map::new();
    if let Some(t) = body.think {
        extra.insert("enable_thinking".into(), Value::Bool(t));
    }
    let tools = body.tools.clone().filter(|t| !t.is_empty());
    let json = json_mode(&body.format).map_err(err)?;
    let prompt = api::chat_prompt(&state, messages, tools.clone(), extra, "").map_err(err)?;
    let job = Job {
        prompts: vec![prompt],
        sampling: sampling(&body.options).map_err(err)?,
        max_tokens: max_tokens(&body.options).map_err(err)?,
        num_ctx: num_ctx(&body.options),
        n: 1,
        extra_stop_ids: Vec::new(),
        top_logprobs: 0,
        logprobs: false,
        json,
        tools: if tools.is_some() && !json { state.model.tool_format } else { None },
        tool_choice: ToolChoice::Auto,
        stream_calls: false,
    };
    let mut streams = api::start_all(&state, &job, &headers, arrived).await.map_err(err)?;
    let Some(stream) = streams.pop() else {
        return Err(err(ApiError::Internal("no generation started".into())));
    };
    let rid = stream.request_id().to_owned();
    let model = state.model.name.clone();
    if !body.stream.unwrap_or(true) {
        let (text, _, o) = engine::collect(stream).await;
        if let Some(e) = o.error.clone() {
            return Err(err(e));
        }
        let mut message = json!({"role": "assistant", "content": text});
        if !o.tool_calls.is_empty() {
            message["content"] = json!(text.trim());
            message["tool_calls"] = Value::Array(tool_calls(&o));
        }
        let mut v = json!({"model": model, "created_at": now_rfc3339(), "message": message});
        final_fields(&o, arrived, &mut v);
        return Ok(axum::Json(v).into_response());
    }
    let events = futures::stream::unfold(stream, |mut s| async move {
        s.next().await.map(|ev| (ev, s))
    })
    .map(move |ev| {
        let bytes = match ev {
            Event::Delta { text, .. } => ndjson(&json!({
                "model": model, "created_at": now_rfc3339(),
                "message": {"role": "assistant", "content": text}, "done": false,
            })),
            // Not asked for (`stream_calls: false`): calls come with the last object.
            Event::ToolCall { .. } => Bytes::new(),
            Event::Done(o) => match &o.error {
                Some(e) => ndjson(&e.body(Flavor::Ollama)),
                None => {
                    let mut message = json!({"role": "assistant", "content": ""});
                    if !o.tool_calls.is_empty() {
                        message["tool_calls"] = Value::Array(tool_calls(&o));
                    }
                    let mut v =
                        json!({"model": model, "created_at": now_rfc3339(), "message": message});
                    final_fields(&o, arrived, &mut v);
                    ndjson(&v)
                }
            },
        };
        Ok::<_, Infallible>(bytes)
    });
    Ok(stream_response("application/x-ndjson", Body::from_stream(events), &rid))
}

pub(crate) async fn generate(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<GenerateBody>,
) -> Res {
    let arrived = Instant::now();
    check_model(&state, &body.model).map_err(err)?;
    if body.images.as_ref().is_some_and(|i| !i.is_empty()) {
        return Err(err(ApiError::param(
            "images",
            "images are not supported; this model takes text only",
        )));
    }
    if body.template.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(err(ApiError::param("template", "template overrides (Go templates) are not supported; use raw: true with a formatted prompt")));
    }
    if body.prompt.is_empty() && body.suffix.is_none() {
        // Ollama answers an empty prompt with an empty, finished response (a model "load").
        let v = json!({"model": state.model.name, "created_at": now_rfc3339(), "response": "", "done": true, "done_reason": "load"});
        return Ok(axum::Json(v).into_response());
    }
    let json = json_mode(&body.format).map_err(err)?;
    let raw = body.raw.unwrap_or(false);
    let mut prompt = match (&body.suffix, raw) {
        (Some(suffix), _) => api::fim_prompt(&state, &body.prompt, suffix).map_err(err)?,
        (None, true) => state
            .model
            .tokenizer
            .encode(&body.prompt, false)
            .map_err(|e| err(ApiError::Internal(format!("tokenizing failed: {e}"))))?,
        (None, false) => {
            let mut messages = Vec::new();
            if let Some(s) = &body.system {
                messages.push(json!({"role": "system", "content": s}));
            }
            messages.push(json!({"role": "user", "content": body.prompt}));
            let mut extra = Map::new();
            if let Some(t) = body.think {
                extra.insert("enable_thinking".into(), Value::Bool(t));
            }
            api::chat_prompt(&state, messages, None, extra, "").map_err(err)?
        }
    };
    if let Some(ctx) = &body.context {
        let vocab = state.model.tokenizer.vocab_size();
        if ctx.iter().any(|&id| id as usize >= vocab) {
            return Err(err(ApiError::param(
                "context",
                "context has token ids outside the vocabulary",
            )));
        }
        let mut all = ctx.clone();
        all.extend(prompt);
        prompt = all;
    }
    let job = Job {
        prompts: vec![prompt.clone()],
        sampling: sampling(&body.options).map_err(err)?,
        max_tokens: max_tokens(&body.options).map_err(err)?,
        num_ctx: num_ctx(&body.options),
        n: 1,
        extra_stop_ids: Vec::new(),
        top_logprobs: 0,
        logprobs: false,
        json,
        tools: None,
        tool_choice: ToolChoice::Auto,
        stream_calls: false,
    };
    let mut streams = api::start_all(&state, &job, &headers, arrived).await.map_err(err)?;
    let Some(stream) = streams.pop() else {
        return Err(err(ApiError::Internal("no generation started".into())));
    };
    let rid = stream.request_id().to_owned();
    let model = state.model.name.clone();
    let context = move |o: &Outcome| {
        let mut c = prompt.clone();
        c.extend(&o.tokens);
        c
    };
    if !body.stream.unwrap_or(true) {
        let (text, _, o) = engine::collect(stream).await;
        if let Some(e) = o.error.clone() {
            return Err(err(e));
        }
        let mut v = json!({"model": model, "created_at": now_rfc3339(), "response": text});
        final_fields(&o, arrived, &mut v);
        v["context"] = json!(context(&o));
        return Ok(axum::Json(v).into_response());
    }
    let events = futures::stream::unfold(stream, |mut s| async move { s.next().await.map(|ev| (ev, s)) }).map(move |ev| {
        let bytes = match ev {
            Event::Delta { text, .. } => {
                ndjson(&json!({"model": model, "created_at": now_rfc3339(), "response": text, "done": false}))
            }
            Event::ToolCall { .. } => Bytes::new(),
            Event::Done(o) => match &o.error {
                Some(e) => ndjson(&e.body(Flavor::Ollama)),
                None => {
                    let mut v = json!({"model": model, "created_at": now_rfc3339(), "response": ""});
                    final_fields(&o, arrived, &mut v);
                    v["context"] = json!(context(&o));
                    ndjson(&v)
                }
            },
        };
        Ok::<_, Infallible>(bytes)
    });
    Ok(stream_response("application/x-ndjson", Body::from_stream(events), &rid))
}

fn details(state: &AppState) -> Value {
    let f = &state.model.facts;
    json!({
        "parent_model": "",
        "format": f.format,
        "family": f.family,
        "families": [f.family],
        "parameter_size": f.parameter_count.map(parameter_size).unwrap_or_default(),
        "quantization_level": f.quantization,
    })
}

fn digest(state: &AppState) -> String {
    // Not a content hash (kt does not read the weights); stable per name, size and format.
    let f = &state.model.facts;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in
        state.model.name.bytes().chain(f.size_bytes.to_le_bytes()).chain(f.quantization.bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    format!("{h:016x}")
}

fn modified_at(state: &AppState) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp(state.model.created as i64, 0)
        .map(|t| t.to_rfc3339())
        .unwrap_or_default()
}

pub(crate) async fn tags(State(state): State<Arc<AppState>>) -> Response {
    let name = format!("{}:latest", state.model.name);
    axum::Json(json!({"models": [{
        "name": name, "model": name, "modified_at": modified_at(&state),
        "size": state.model.facts.size_bytes, "digest": digest(&state), "details": details(&state),
    }]}))
    .into_response()
}

pub(crate) async fn ps(State(state): State<Arc<AppState>>) -> Response {
    let name = format!("{}:latest", state.model.name);
    let expires = chrono::Utc::now() + chrono::Duration::days(365);
    axum::Json(json!({"models": [{
        "name": name, "model": name, "size": state.model.facts.size_bytes, "digest": digest(&state),
        "details": details(&state), "expires_at": expires.to_rfc3339(), "size_vram": 0,
        "context_length": state.context_length(),
    }]}))
    .into_response()
}

pub(crate) async fn show(
    State(state): State<Arc<AppState>>,
    ApiJson(body): ApiJson<ShowBody>,
) -> Res {
    check_model(&state, &body.model).map_err(err)?;
    let f = &state.model.facts;
    let mut info = Map::new();
    info.insert("general.architecture".into(), json!(f.arch));
    if let Some(p) = f.parameter_count {
        info.insert("general.parameter_count".into(), json!(p));
    }
    if let Some(c) = f.context_length {
        info.insert(format!("{}.context_length", f.arch), json!(c));
    }
    info.insert("general.file_type".into(), json!(f.quantization));
    let mut capabilities = vec!["completion"];
    if state.model.tool_format.is_some() {
        capabilities.push("tools");
    }
    if state.model.fim.is_some() {
        capabilities.push("insert");
    }
    let v = json!({
        "modelfile": format!("# served by kt-gateway\nFROM {}\n", state.model.name),
        "parameters": "",
        "template": state.model.template_source,
        "details": details(&state),
        "model_info": info,
        "capabilities": capabilities,
        "modified_at": modified_at(&state),
    });
    Ok(axum::Json(v).into_response())
}

pub(crate) async fn version() -> Response {
    axum::Json(json!({"version": env!("CARGO_PKG_VERSION")})).into_response()
}
