//! The OpenAI API: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::api::{self, Job, Sampling};
use crate::engine::{self, Event, Outcome, TokenLp};
use crate::error::{ApiError, Flavor};
use crate::server::{stream_response, ApiJson, AppState};
use crate::tools::{ToolCall, ToolChoice};

type Res = Result<Response, Response>;

fn err(e: ApiError) -> Response {
    e.into_response_as(Flavor::OpenAi)
}

/// `stop`: a string or a list of strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize, Default)]
struct StreamOptions {
    include_usage: Option<bool>,
}

/// Fields both completion routes take (copied out of the bodies; the bodies list them
/// inline, not with `serde(flatten)`, so that type errors keep the field's name).
#[derive(Debug)]
struct Common {
    model: String,
    max_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    n: Option<u32>,
    stream: Option<bool>,
    include_usage: bool,
    stop: Option<Stop>,
    seed: Option<i64>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    logit_bias: Option<HashMap<String, f32>>,
    user: Option<String>,
    top_k: Option<i64>,
    min_p: Option<f32>,
    repetition_penalty: Option<f32>,
}

/// Declares a request body with the common fields plus `extra` ones.
macro_rules! body_with_common {
    ($name:ident { $($field:ident : $ty:ty),* $(,)? }) => {
        #[derive(Debug, Deserialize)]
        pub(crate) struct $name {
            model: String,
            max_tokens: Option<u32>,
            temperature: Option<f32>,
            top_p: Option<f32>,
            n: Option<u32>,
            stream: Option<bool>,
            stream_options: Option<StreamOptions>,
            stop: Option<Stop>,
            seed: Option<i64>,
            presence_penalty: Option<f32>,
            frequency_penalty: Option<f32>,
            logit_bias: Option<HashMap<String, f32>>,
            user: Option<String>,
            // Extensions in vLLM's spelling.
            top_k: Option<i64>,
            min_p: Option<f32>,
            repetition_penalty: Option<f32>,
            $($field: $ty),*
        }

        impl $name {
            fn common(&mut self) -> Common {
                Common {
                    model: std::mem::take(&mut self.model),
                    max_tokens: self.max_tokens,
                    temperature: self.temperature,
                    top_p: self.top_p,
                    n: self.n,
                    stream: self.stream,
                    include_usage: self.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false),
                    stop: self.stop.take(),
                    seed: self.seed,
                    presence_penalty: self.presence_penalty,
                    frequency_penalty: self.frequency_penalty,
                    logit_bias: self.logit_bias.take(),
                    user: self.user.take(),
                    top_k: self.top_k,
                    min_p: self.min_p,
                    repetition_penalty: self.repetition_penalty,
                }
            }
        }
    };
}

body_with_common!(ChatBody {
    messages: Vec<Value>,
    max_completion_tokens: Option<u32>,
    logprobs: Option<bool>,
    top_logprobs: Option<u32>,
    tools: Option<Vec<Value>>,
    tool_choice: Option<Value>,
    response_format: Option<Value>,
    chat_template_kwargs: Option<serde_json::Map<String, Value>>,
});

/// `prompt`: text, texts, ids, or lists of ids.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

body_with_common!(CompletionBody {
    prompt: Prompt,
    suffix: Option<String>,
    logprobs: Option<u32>,
    echo: Option<bool>,
    response_format: Option<Value>,
});

fn sampling(c: &Common, vocab: usize) -> Result<Sampling, ApiError> {
    let mut logit_bias = Vec::new();
    for (k, &v) in c.logit_bias.iter().flatten() {
        let id: u32 = k.parse().map_err(|_| {
            ApiError::param(
                "logit_bias",
                format!("`logit_bias` keys must be token ids; got `{k}`."),
            )
        })?;
        if !(-100.0..=100.0).contains(&v) {
            return Err(ApiError::param(
                "logit_bias",
                format!("Bias {v} for token {id} is outside [-100, 100]."),
            ));
        }
        logit_bias.push((id, v));
    }
    let _ = vocab;
    for (name, v) in
        [("presence_penalty", c.presence_penalty), ("frequency_penalty", c.frequency_penalty)]
    {
        if let Some(v) = v {
            if !(-2.0..=2.0).contains(&v) {
                return Err(ApiError::param(
                    name,
                    format!("`{name}` is {v}; it must be in [-2, 2]."),
                ));
            }
        }
    }
    if let Some(t) = c.temperature {
        if !(0.0..=2.0).contains(&t) {
            return Err(ApiError::param(
                "temperature",
                format!("`temperature` is {t}; it must be in [0, 2]."),
            ));
        }
    }
    let top_k = match c.top_k {
        None | Some(-1) => 0,
        Some(k) if k >= 0 => k as usize,
        Some(k) => {
            return Err(ApiError::param("top_k", format!("`top_k` is {k}; use -1 or 0 for none.")))
        }
    };
    let stop = match &c.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if stop.len() > 4 {
        return Err(ApiError::param("stop", "Up to 4 stop sequences are allowed."));
    }
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::param("stop", "Stop sequences must not be empty."));
    }
    Ok(Sampling {
        temperature: c.temperature.unwrap_or(1.0),
        top_p: c.top_p.unwrap_or(1.0),
        top_k,
        min_p: c.min_p.unwrap_or(0.0),
        repetition_penalty: c.repetition_penalty.unwrap_or(1.0),
        presence_penalty: c.presence_penalty.unwrap_or(0.0),
        frequency_penalty: c.frequency_penalty.unwrap_or(0.0),
        penalty_window: None,
        logit_bias,
        seed: c.seed.map(|s| s as u64),
        stop,
    })
}

fn check_model(state: &AppState, c: &Common) -> Result<(), ApiError> {
    if api::model_matches(state, &c.model) {
        Ok(())
    } else {
        Err(ApiError::ModelNotFound(c.model.clone()))
    }
}

fn n_of(c: &Common) -> Result<usize, ApiError> {
    match c.n.unwrap_or(1) {
        n @ 1..=16 => Ok(n as usize),
        n => Err(ApiError::param("n", format!("`n` is {n}; it must be between 1 and 16."))),
    }
}

fn json_mode(rf: &Option<Value>) -> Result<bool, ApiError> {
    let Some(rf) = rf else { return Ok(false) };
    match rf.get("type").and_then(Value::as_str) {
        Some("text") => Ok(false),
        Some("json_object") => Ok(true),
        Some(other) => Err(ApiError::param(
            "response_format.type",
            format!(
                "`response_format.type` `{other}` is not supported; use `text` or `json_object`."
            ),
        )),
        None => Err(ApiError::param("response_format", "`response_format` needs a `type`.")),
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn fingerprint() -> String {
    format!("kt-{}", env!("CARGO_PKG_VERSION"))
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

fn chat_logprobs(lps: &[TokenLp]) -> Value {
    let content: Vec<Value> = lps
        .iter()
        .map(|t| {
            json!({
                "token": t.text,
                "logprob": t.logprob,
                "bytes": t.bytes,
                "top_logprobs": t.top.iter().map(|(s, b, lp)| json!({"token": s, "logprob": lp, "bytes": b})).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({ "content": content })
}

fn completion_logprobs(lps: &[TokenLp], offset0: usize) -> Value {
    let mut offset = offset0;
    let mut offsets = Vec::with_capacity(lps.len());
    for t in lps {
        offsets.push(offset);
        offset += t.text.len();
    }
    json!({
        "tokens": lps.iter().map(|t| t.text.clone()).collect::<Vec<_>>(),
        "token_logprobs": lps.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": lps.iter().map(|t| {
            let m: serde_json::Map<String, Value> = t.top.iter().map(|(s, _, lp)| (s.clone(), json!(lp))).collect();
            Value::Object(m)
        }).collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

/// The id of choice `choice`'s `k`-th call.
fn call_id(rid: &str, choice: usize, k: usize) -> String {
    format!("call_{rid}{choice}_{k}")
}

fn tool_calls_json(calls: &[ToolCall], rid: &str, choice: usize) -> Vec<Value> {
    calls
        .iter()
        .enumerate()
        .map(|(k, c)| {
            json!({
                "id": call_id(rid, choice, k),
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments},
            })
        })
        .collect()
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// The SSE events of one streamed response. The fields every chunk repeats (id, object,
/// created, model, fingerprint) are rendered once; the per-token events are written straight
/// into one buffer (no JSON tree, one allocation).
struct Frames {
    /// `data: {"id":..,"object":..,"created":..,"model":..,"system_fingerprint":..,"choices":`
    head: String,
    /// `}` or `,"usage":null}` (with `stream_options.include_usage`), then the blank line.
    tail: &'static str,
}

impl Frames {
    fn new(id: &str, object: &str, created: u64, model: &str, include_usage: bool) -> Self {
        let fixed = json!({"id": id, "object": object, "created": created, "model": model,
                           "system_fingerprint": fingerprint()})
        .to_string();
        // The object without its closing brace, then the key of the varying part.
        let head = format!("data: {},\"choices\":", &fixed[..fixed.len() - 1]);
        Frames { head, tail: if include_usage { ",\"usage\":null}\n\n" } else { "}\n\n" } }
    }

    fn write(&self, extra: usize, body: impl FnOnce(&mut Vec<u8>)) -> Bytes {
        let mut b = Vec::with_capacity(self.head.len() + extra + self.tail.len() + 64);
        b.extend_from_slice(self.head.as_bytes());
        body(&mut b);
        Bytes::from(b)
    }

    /// An event with these choices (a JSON array).
    fn event(&self, choices: &Value) -> Bytes {
        self.write(128, |b| {
            let _ = serde_json::to_writer(&mut *b, choices);
            b.extend_from_slice(self.tail.as_bytes());
        })
    }

    /// The common event: choice `index` gets `text` (chat: as `delta.content`; completions:
    /// as `text`), no logprobs, no finish reason.
    fn text(&self, index: usize, text: &str, chat: bool) -> Bytes {
        self.write(text.len() + 80, |b| {
            let _ = if chat {
                write!(b, "[{{\"index\":{index},\"delta\":")
            } else {
                b.extend_from_slice(b"[{\"text\":");
                Ok(())
            };
            if chat && text.is_empty() {
                b.extend_from_slice(b"{}");
            } else {
                if chat {
                    b.extend_from_slice(b"{\"content\":");
                }
                let _ = serde_json::to_writer(&mut *b, text);
                if chat {
                    b.push(b'}');
                }
            }
            if !chat {
                let _ = write!(b, ",\"index\":{index}");
            }
            b.extend_from_slice(b",\"logprobs\":null,\"finish_reason\":null}]");
            b.extend_from_slice(self.tail.as_bytes());
        })
    }

    /// The usage event after the last choice's end (`choices` empty).
    fn usage(&self, usage: &Value) -> Bytes {
        self.write(96, |b| {
            b.extend_from_slice(b"[],\"usage\":");
            let _ = serde_json::to_writer(&mut *b, usage);
            b.extend_from_slice(b"}\n\n");
        })
    }
}

/// A mid-stream error as an SSE event (the status was sent already).
fn sse_error(e: &ApiError) -> Bytes {
    sse(&e.body(Flavor::OpenAi))
}

/// The first error of the outcomes, as a response.
fn first_error(outcomes: &[Outcome]) -> Option<ApiError> {
    outcomes.iter().find_map(|o| o.error.clone())
}

/// Validates `tools` and `tool_choice`: the tools in force (none with `tool_choice: "none"`)
/// and what the reply must be. Errors name the field.
fn tools_and_choice(
    tools: &Option<Vec<Value>>,
    choice: &Option<Value>,
) -> Result<(Option<Vec<Value>>, ToolChoice), ApiError> {
    let names: Vec<&str> = tools
        .iter()
        .flatten()
        .filter_map(|t| t.pointer("/function/name").and_then(Value::as_str))
        .collect();
    for (i, t) in tools.iter().flatten().enumerate() {
        if t.get("type").and_then(Value::as_str) != Some("function")
            || t.pointer("/function/name").and_then(Value::as_str).is_none()
        {
            return Err(ApiError::param(
                format!("tools[{i}]"),
                "Each tool needs `type: \"function\"` and `function.name`.",
            ));
        }
    }
    let bad = |m: String| Err(ApiError::param("tool_choice", m));
    let choice = match choice {
        None => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "auto" => ToolChoice::Auto,
            "none" => return Ok((None, ToolChoice::Auto)),
            "required" => ToolChoice::Required,
            other => {
                return bad(format!("`tool_choice` `{other}` is not one of none, auto, required."))
            }
        },
        Some(Value::Object(o)) => {
            let name = o.get("function").and_then(|f| f.get("name")).and_then(Value::as_str);
            match (o.get("type").and_then(Value::as_str), name) {
                (Some("function"), Some(name)) if names.contains(&name) => {
                    ToolChoice::Named(name.to_owned())
                }
                (Some("function"), Some(name)) => {
                    return bad(format!(
                        "`tool_choice` names function `{name}`, which is not in `tools`."
                    ))
                }
                _ => {
                    return bad("`tool_choice` as an object must be {\"type\": \"function\", \"function\": {\"name\": ...}}.".into())
                }
            }
        }
        Some(_) => {
            return bad(
                "`tool_choice` must be none, auto, required or an object naming a function.".into(),
            )
        }
    };
    let tools = tools.clone().filter(|t| !t.is_empty());
    if choice.forces() && tools.is_none() {
        return bad("`tool_choice` that requires a tool call needs `tools`.".into());
    }
    Ok((tools, choice))
}

pub(crate) async fn chat_completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    ApiJson(mut body): ApiJson<ChatBody>,
) -> Res {
    let arrived = Instant::now();
    let common = body.common();
    let c = &common;
    check_model(&state, c).map_err(err)?;
    let vocab = state.model.tokenizer.vocab_size();
    let sampling = sampling(c, vocab).map_err(err)?;
    let n = n_of(c).map_err(err)?;
    let logprobs = body.logprobs.unwrap_or(false);
    let top = body.top_logprobs.unwrap_or(0);
    if top > 20 {
        return Err(err(ApiError::param(
            "top_logprobs",
            "`top_logprobs` must be between 0 and 20.",
        )));
    }
    if top > 0 && !logprobs {
        return Err(err(ApiError::param("top_logprobs", "`top_logprobs` needs `logprobs: true`.")));
    }
    let json = json_mode(&body.response_format).map_err(err)?;
    let (tools, tool_choice) = tools_and_choice(&body.tools, &body.tool_choice).map_err(err)?;
    let tool_format = if tools.is_some() && !json { state.model.tool_format } else { None };
    if tool_choice.forces() {
        if json {
            return Err(err(ApiError::param(
                "tool_choice",
                "`tool_choice` that requires a tool call cannot be combined with `response_format` `json_object`.",
            )));
        }
        if tool_format.is_none() {
            return Err(err(ApiError::param(
                "tool_choice",
                "This model's chat template defines no tool-call format, so `tool_choice` cannot require a call; use `auto` or `none`.",
            )));
        }
    }
    let prefill = match tool_format {
        Some(f) if tool_choice.forces() => f.prefill(tool_choice.name()),
        _ => String::new(),
    };
    let messages = api::normalize_messages(&body.messages).map_err(err)?;
    let extra = body.chat_template_kwargs.clone().unwrap_or_default();
    let prompt = api::chat_prompt(&state, messages, tools, extra, &prefill).map_err(err)?;
    let stream = c.stream.unwrap_or(false);
    let job = Job {
        prompts: vec![prompt],
        sampling,
        max_tokens: body.max_completion_tokens.or(c.max_tokens),
        num_ctx: None,
        n,
        extra_stop_ids: Vec::new(),
        top_logprobs: top,
        logprobs,
        json,
        tools: tool_format,
        tool_choice,
        stream_calls: stream,
    };
    if job.max_tokens == Some(0) {
        let name = if body.max_completion_tokens.is_some() {
            "max_completion_tokens"
        } else {
            "max_tokens"
        };
        return Err(err(ApiError::param(name, format!("`{name}` must be at least 1."))));
    }
    if let Some(u) = &c.user {
        tracing::debug!(user = %u, "chat completion");
    }
    let streams = api::start_all(&state, &job, &headers, arrived).await.map_err(err)?;
    let rid = streams.first().map(|s| s.request_id().to_owned()).unwrap_or_default();
    let id = format!("chatcmpl-{rid}");
    let created = unix_now();
    let model = state.model.name.clone();
    if !stream {
        let results = futures::future::join_all(streams.into_iter().map(engine::collect)).await;
        let outcomes: Vec<Outcome> = results.iter().map(|r| r.2.clone()).collect();
        if let Some(e) = first_error(&outcomes) {
            return Err(err(e));
        }
        let mut prompt_tokens = 0;
        let mut completion_tokens = 0;
        let choices: Vec<Value> = results
            .iter()
            .enumerate()
            .map(|(i, (text, lps, o))| {
                prompt_tokens = o.prompt_tokens;
                completion_tokens += o.completion_tokens;
                let mut message = json!({"role": "assistant", "content": text});
                if !o.tool_calls.is_empty() {
                    // Text before the calls, without the white space that separated them.
                    let text = text.trim();
                    message["content"] = json!(text);
                    message["tool_calls"] = Value::Array(tool_calls_json(&o.tool_calls, &rid, i));
                    if text.is_empty() {
                        message["content"] = Value::Null;
                    }
                }
                json!({
                    "index": i,
                    "message": message,
                    "logprobs": if logprobs { chat_logprobs(lps) } else { Value::Null },
                    "finish_reason": o.finish.openai(),
                })
            })
            .collect();
        let out = json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "system_fingerprint": fingerprint(), "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens),
        });
        return Ok(with_request_id(axum::Json(out).into_response(), &rid));
    }
    let include_usage = c.include_usage;
    let n_choices = streams.len();
    let frames = Frames::new(&id, "chat.completion.chunk", created, &model, include_usage);
    let mut head = Vec::with_capacity(n_choices);
    for i in 0..n_choices {
        head.push(Ok::<_, Infallible>(frames.event(&json!([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]))));
    }
    let rid2 = rid.clone();
    let mut totals = [0usize; 3];
    // Calls sent per choice as they streamed.
    let mut calls_sent = vec![0usize; n_choices];
    let events = api::merge(streams).filter_map(move |(i, ev)| {
        let out = match ev {
            Event::Delta { text, .. } if !logprobs => Some(frames.text(i, &text, true)),
            Event::Delta { text, logprobs: lps } => {
                let delta = if text.is_empty() { json!({}) } else { json!({"content": text}) };
                Some(frames.event(&json!([{"index": i, "delta": delta, "logprobs": chat_logprobs(&lps), "finish_reason": null}])))
            }
            Event::ToolCall { index, name, arguments } => {
                // The first piece of a call names it; later pieces add to its arguments.
                let call = match name {
                    Some(name) => {
                        calls_sent[i] = calls_sent[i].max(index + 1);
                        json!({"index": index, "id": call_id(&rid2, i, index), "type": "function",
                               "function": {"name": name, "arguments": arguments}})
                    }
                    None => json!({"index": index, "function": {"arguments": arguments}}),
                };
                Some(frames.event(&json!([{"index": i, "delta": {"tool_calls": [call]}, "logprobs": null, "finish_reason": null}])))
            }
            Event::Done(o) => {
                totals[0] = o.prompt_tokens;
                totals[1] += o.completion_tokens;
                totals[2] += 1;
                let mut bytes = Vec::new();
                if let Some(e) = &o.error {
                    bytes.extend_from_slice(&sse_error(e));
                } else {
                    // Calls the stream did not carry already (normally none).
                    if o.tool_calls.len() > calls_sent[i] {
                        let calls: Vec<Value> = tool_calls_json(&o.tool_calls, &rid2, i)
                            .into_iter()
                            .enumerate()
                            .skip(calls_sent[i])
                            .map(|(k, mut c)| {
                                c["index"] = json!(k);
                                c
                            })
                            .collect();
                        bytes.extend_from_slice(&frames.event(&json!([{"index": i, "delta": {"tool_calls": calls}, "logprobs": null, "finish_reason": null}])));
                    }
                    bytes.extend_from_slice(&frames.event(&json!([{"index": i, "delta": {}, "logprobs": null, "finish_reason": o.finish.openai()}])));
                }
                if totals[2] == n_choices {
                    if include_usage {
                        bytes.extend_from_slice(&frames.usage(&usage(totals[0], totals[1])));
                    }
                    bytes.extend_from_slice(b"data: [DONE]\n\n");
                }
                Some(Bytes::from(bytes))
            }
        };
        futures::future::ready(out.map(Ok::<_, Infallible>))
    });
    let body = Body::from_stream(futures::stream::iter(head).chain(events));
    Ok(stream_response("text/event-stream", body, &rid))
}

fn with_request_id(mut res: Response, rid: &str) -> Response {
    if let Ok(v) = axum::http::HeaderValue::from_str(rid) {
        res.headers_mut().insert(crate::names::http::REQUEST_ID, v);
    }
    res
}

pub(crate) async fn completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    ApiJson(mut body): ApiJson<CompletionBody>,
) -> Res {
    let arrived = Instant::now();
    let common = body.common();
    let c = &common;
    check_model(&state, c).map_err(err)?;
    let vocab = state.model.tokenizer.vocab_size();
    let sampling = sampling(c, vocab).map_err(err)?;
    let n = n_of(c).map_err(err)?;
    let top = body.logprobs.unwrap_or(0);
    if top > 5 {
        return Err(err(ApiError::param("logprobs", "`logprobs` must be between 0 and 5.")));
    }
    let logprobs = body.logprobs.is_some();
    let json = json_mode(&body.response_format).map_err(err)?;
    if c.max_tokens == Some(0) {
        return Err(err(ApiError::param("max_tokens", "`max_tokens` must be at least 1.")));
    }
    let echo = body.echo.unwrap_or(false);
    let (prompts, texts): (Vec<Vec<u32>>, Vec<String>) = match (&body.prompt, &body.suffix) {
        (Prompt::Text(t), Some(suffix)) => {
            (vec![api::fim_prompt(&state, t, suffix).map_err(err)?], vec![t.clone()])
        }
        (_, Some(_)) => {
            return Err(err(ApiError::param("suffix", "`suffix` needs a single text `prompt`.")))
        }
        (Prompt::Text(t), None) => {
            (vec![api::text_prompt(&state, t).map_err(err)?], vec![t.clone()])
        }
        (Prompt::Texts(ts), None) => {
            if ts.is_empty() {
                return Err(err(ApiError::param("prompt", "`prompt` is an empty list.")));
            }
            let mut ps = Vec::new();
            for t in ts {
                ps.push(api::text_prompt(&state, t).map_err(err)?);
            }
            (ps, ts.clone())
        }
        (Prompt::Ids(ids), None) => {
            (vec![ids.clone()], vec![state.model.tokenizer.decode(ids, false).unwrap_or_default()])
        }
        (Prompt::IdLists(l), None) => {
            if l.is_empty() {
                return Err(err(ApiError::param("prompt", "`prompt` is an empty list.")));
            }
            let texts = l
                .iter()
                .map(|ids| state.model.tokenizer.decode(ids, false).unwrap_or_default())
                .collect();
            (l.clone(), texts)
        }
    };
    if let Some((i, _)) =
        prompts.iter().enumerate().find(|(_, p)| p.iter().any(|&id| id as usize >= vocab))
    {
        return Err(err(ApiError::param(
            "prompt",
            format!("Prompt {i} has a token id outside the vocabulary of {vocab}."),
        )));
    }
    let job = Job {
        prompts,
        sampling,
        max_tokens: Some(c.max_tokens.unwrap_or(16)),
        num_ctx: None,
        n,
        extra_stop_ids: Vec::new(),
        top_logprobs: top,
        logprobs,
        json,
        tools: None,
        tool_choice: ToolChoice::Auto,
        stream_calls: false,
    };
    let streams = api::start_all(&state, &job, &headers, arrived).await.map_err(err)?;
    let rid = streams.first().map(|s| s.request_id().to_owned()).unwrap_or_default();
    let id = format!("cmpl-{rid}");
    let created = unix_now();
    let model = state.model.name.clone();
    let prompt_text = move |i: usize| texts.get(i / n).cloned().unwrap_or_default();
    if !c.stream.unwrap_or(false) {
        let results = futures::future::join_all(streams.into_iter().map(engine::collect)).await;
        let outcomes: Vec<Outcome> = results.iter().map(|r| r.2.clone()).collect();
        if let Some(e) = first_error(&outcomes) {
            return Err(err(e));
        }
        let (mut pt, mut ct) = (0, 0);
        let choices: Vec<Value> = results
            .iter()
            .enumerate()
            .map(|(i, (text, lps, o))| {
                if i % n == 0 {
                    pt += o.prompt_tokens;
                }
                ct += o.completion_tokens;
                let p = if echo { prompt_text(i) } else { String::new() };
                json!({
                    "text": format!("{p}{text}"),
                    "index": i,
                    "logprobs": if logprobs { completion_logprobs(lps, p.len()) } else { Value::Null },
                    "finish_reason": o.finish.openai(),
                })
            })
            .collect();
        let out = json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": fingerprint(), "choices": choices, "usage": usage(pt, ct),
        });
        return Ok(with_request_id(axum::Json(out).into_response(), &rid));
    }
    let include_usage = c.include_usage;
    let n_choices = streams.len();
    let frames = Frames::new(&id, "text_completion", created, &model, include_usage);
    let mut head = Vec::new();
    if echo {
        for i in 0..n_choices {
            head.push(Ok::<_, Infallible>(frames.text(i, &prompt_text(i), false)));
        }
    }
    let mut totals = [0usize; 3];
    let events = api::merge(streams).filter_map(move |(i, ev)| {
        let out = match ev {
            Event::Delta { text, .. } if !logprobs => Some(frames.text(i, &text, false)),
            Event::Delta { text, logprobs: lps } => {
                Some(frames.event(&json!([{"text": text, "index": i, "logprobs": completion_logprobs(&lps, 0), "finish_reason": null}])))
            }
            Event::ToolCall { .. } => None,
            Event::Done(o) => {
                if i % n == 0 {
                    totals[0] += o.prompt_tokens;
                }
                totals[1] += o.completion_tokens;
                totals[2] += 1;
                let mut bytes = Vec::new();
                match &o.error {
                    Some(e) => bytes.extend_from_slice(&sse_error(e)),
                    None => bytes.extend_from_slice(&frames.event(&json!([{"text": "", "index": i, "logprobs": null, "finish_reason": o.finish.openai()}]))),
                }
                if totals[2] == n_choices {
                    if include_usage {
                        bytes.extend_from_slice(&frames.usage(&usage(totals[0], totals[1])));
                    }
                    bytes.extend_from_slice(b"data: [DONE]\n\n");
                }
                Some(Bytes::from(bytes))
            }
        };
        futures::future::ready(out.map(Ok::<_, Infallible>))
    });
    let body = Body::from_stream(futures::stream::iter(head).chain(events));
    Ok(stream_response("text/event-stream", body, &rid))
}

fn model_object(state: &AppState) -> Value {
    json!({"id": state.model.name, "object": "model", "created": state.model.created, "owned_by": "kt"})
}

pub(crate) async fn list_models(State(state): State<Arc<AppState>>) -> Response {
    axum::Json(json!({"object": "list", "data": [model_object(&state)]})).into_response()
}

pub(crate) async fn get_model(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Response {
    if api::model_matches(&state, &id) {
        axum::Json(model_object(&state)).into_response()
    } else {
        err(ApiError::ModelNotFound(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the events were before [`Frames`]: a JSON tree per event, rendered whole.
    fn tree(choices: Value, include_usage: bool, object: &str) -> Bytes {
        let mut v = json!({"id": "x-1", "object": object, "created": 7, "model": "m\"q",
                           "system_fingerprint": fingerprint(), "choices": choices});
        if include_usage {
            v["usage"] = Value::Null;
        }
        sse(&v)
    }

    #[test]
    fn frames_write_the_same_bytes_as_the_json_tree() {
        for include_usage in [false, true] {
            for object in ["chat.completion.chunk", "text_completion"] {
                let f = Frames::new("x-1", object, 7, "m\"q", include_usage);
                for text in ["", "plain", "quote \" back\\slash \n tab\t ctl\u{1} é 🦀"] {
                    assert_eq!(
                        f.text(3, text, true),
                        tree(
                            if text.is_empty() {
                                json!([{"index": 3, "delta": {}, "logprobs": null, "finish_reason": null}])
                            } else {
                                json!([{"index": 3, "delta": {"content": text}, "logprobs": null, "finish_reason": null}])
                            },
                            include_usage,
                            object
                        )
                    );
                    assert_eq!(
                        f.text(2, text, false),
                        tree(
                            json!([{"text": text, "index": 2, "logprobs": null, "finish_reason": null}]),
                            include_usage,
                            object
                        )
                    );
                }
                let choices = json!([{"index": 0, "delta": {}, "finish_reason": "stop"}]);
                assert_eq!(f.event(&choices), tree(choices, include_usage, object));
                let u = usage(3, 4);
                let mut want = json!({"id": "x-1", "object": object, "created": 7, "model": "m\"q",
                                      "system_fingerprint": fingerprint(), "choices": []});
                want["usage"] = u.clone();
                assert_eq!(f.usage(&u), sse(&want));
            }
        }
    }
}
