//! What the OpenAI and Ollama layers share: sampling parameters, the context check, chat
//! prompts, and merging several generations (`n`, several prompts) into one event stream.

use std::sync::Arc;
use std::time::Instant;

use axum::http::HeaderMap;
use futures::stream::{BoxStream, StreamExt};
use kt_chat_template::ChatRequest;
use serde_json::Value;

use crate::engine::{self, Event, GenSpec, GenStream};
use crate::error::ApiError;
use crate::server::AppState;
use crate::tools::{ToolChoice, ToolFormat};

/// Sampling as the API layers collect it (already defaulted per API).
#[derive(Debug, Clone, Default)]
pub(crate) struct Sampling {
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub min_p: f32,
    pub repetition_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub penalty_window: Option<usize>,
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
}

impl Sampling {
    /// Validates (errors name the parameter) and converts to the wire form.
    pub fn to_proto(&self, vocab: usize) -> Result<kt_proto::v1::SamplingParams, ApiError> {
        let p = kt_sample::SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            penalty_window: self.penalty_window,
            logit_bias: self.logit_bias.iter().copied().collect(),
            seed: self.seed,
            stop: self.stop.clone(),
            ..kt_sample::SamplingParams::default()
        };
        if let Err(kt_sample::SampleError::InvalidParam { name, value, reason }) = p.validate() {
            return Err(ApiError::param(
                name,
                format!("Invalid value for `{name}` ({value}): {reason}."),
            ));
        }
        if let Some((id, _)) = self.logit_bias.iter().find(|(id, _)| *id as usize >= vocab) {
            return Err(ApiError::param(
                "logit_bias",
                format!(
                    "Token id {id} in `logit_bias` is outside the vocabulary of {vocab} tokens."
                ),
            ));
        }
        Ok(kt_proto::v1::SamplingParams {
            temperature: p.temperature,
            top_k: p.top_k as u32,
            top_p: Some(p.top_p),
            min_p: p.min_p,
            repetition_penalty: Some(p.repetition_penalty),
            presence_penalty: p.presence_penalty,
            frequency_penalty: p.frequency_penalty,
            penalty_window: p.penalty_window.map(|w| w as u32),
            logit_bias: p.logit_bias.into_iter().collect(),
            seed: p.seed,
        })
    }
}

/// Everything needed to start generations for one API request.
#[derive(Debug, Clone)]
pub(crate) struct Job {
    pub prompts: Vec<Vec<u32>>,
    pub sampling: Sampling,
    /// Requested budget; `None` = up to the context.
    pub max_tokens: Option<u32>,
    /// A context limit below the model's (Ollama's `num_ctx`).
    pub num_ctx: Option<u32>,
    pub n: usize,
    pub extra_stop_ids: Vec<u32>,
    pub top_logprobs: u32,
    pub logprobs: bool,
    pub json: bool,
    pub tools: Option<ToolFormat>,
    /// Whether the reply must be a call; the prompts then end with the call's opening
    /// ([`chat_prompt`]'s `prefill`).
    pub tool_choice: ToolChoice,
    /// Tool calls as events while they stream (OpenAI streaming).
    pub stream_calls: bool,
}

/// Resolves the budget against the context: 400 with the numbers when it cannot fit.
pub(crate) fn budget(
    state: &AppState,
    prompt: usize,
    max_tokens: Option<u32>,
    num_ctx: Option<u32>,
) -> Result<u32, ApiError> {
    let mut ctx = state.context_length();
    if let Some(n) = num_ctx.filter(|&n| n > 0) {
        ctx = ctx.min(n);
    }
    let over = |completion: usize| ApiError::ContextLength { max: ctx, prompt, completion };
    if prompt == 0 {
        return Err(ApiError::param("prompt", "The prompt is empty."));
    }
    if prompt >= ctx as usize {
        return Err(over(max_tokens.unwrap_or(1) as usize));
    }
    let room = ctx - prompt as u32;
    match max_tokens {
        Some(m) if m > room => Err(over(m as usize)),
        Some(m) => Ok(m),
        None => Ok(room),
    }
}

/// Starts every generation of a job (`prompts × n`, choice index = prompt × n + i; seeds
/// `seed + i` so that choices differ but stay reproducible).
pub(crate) async fn start_all(
    state: &Arc<AppState>,
    job: &Job,
    headers: &HeaderMap,
    arrived: Instant,
) -> Result<Vec<GenStream>, ApiError> {
    let vocab = state.model.tokenizer.vocab_size();
    let sampling = job.sampling.to_proto(vocab)?;
    if state.pool.max_context().is_none() {
        // No worker has told its context length yet (e.g. its first check timed out): ask
        // now rather than judge the prompt by the model file's number alone.
        state.pool.check_all().await;
    }
    let mut stop_ids = state.model.eog_ids();
    stop_ids.extend(&job.extra_stop_ids);
    stop_ids.sort_unstable();
    stop_ids.dedup();
    let mut specs = Vec::with_capacity(job.prompts.len() * job.n);
    for prompt in &job.prompts {
        let max_tokens = budget(state, prompt.len(), job.max_tokens, job.num_ctx)?;
        for i in 0..job.n {
            let mut s = sampling.clone();
            s.seed = s.seed.map(|seed| seed.wrapping_add(i as u64));
            specs.push(GenSpec {
                prompt: prompt.clone(),
                sampling: s,
                max_tokens,
                stop: job.sampling.stop.clone(),
                stop_ids: stop_ids.clone(),
                top_logprobs: job.top_logprobs,
                logprobs: job.logprobs,
                json: job.json,
                tools: job.tools,
                tool_choice: job.tool_choice.clone(),
                stream_calls: job.stream_calls,
                skip_special: true,
                trace: state.trace(headers),
                arrived,
            });
        }
    }
    let mut streams = Vec::with_capacity(specs.len());
    for spec in specs {
        // Dropping already started streams on error cancels them on their workers.
        streams.push(engine::start(state, spec).await?);
    }
    Ok(streams)
}

/// All generations' events, tagged with their choice index, as they come.
pub(crate) fn merge(streams: Vec<GenStream>) -> BoxStream<'static, (usize, Event)> {
    let tagged = streams.into_iter().enumerate().map(|(i, s)| {
        futures::stream::unfold(s, |mut s| async move { s.next().await.map(|ev| (ev, s)) })
            .map(move |ev| (i, ev))
            .boxed()
    });
    futures::stream::select_all(tagged).boxed()
}

/// Normalises OpenAI-style messages for a chat template: text parts joined into a string,
/// `developer` as `system`, tool-call arguments given as JSON text parsed into objects (the
/// form templates expect). Errors name the message and field.
pub(crate) fn normalize_messages(messages: &[Value]) -> Result<Vec<Value>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::param("messages", "`messages` must contain at least one message."));
    }
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let Some(obj) = m.as_object() else {
            return Err(ApiError::param(
                format!("messages[{i}]"),
                format!("`messages[{i}]` must be an object."),
            ));
        };
        let mut obj = obj.clone();
        let role = match obj.get("role").and_then(Value::as_str) {
            Some(r @ ("system" | "user" | "assistant" | "tool")) => r.to_owned(),
            Some("developer") => "system".to_owned(),
            Some(other) => {
                return Err(ApiError::param(
                    format!("messages[{i}].role"),
                    format!("`messages[{i}].role` is `{other}`; expected system, developer, user, assistant or tool."),
                ))
            }
            None => {
                return Err(ApiError::param(format!("messages[{i}].role"), format!("`messages[{i}].role` is missing.")))
            }
        };
        obj.insert("role".into(), Value::String(role));
        match obj.get("content") {
            // Templates concatenate `content`; an assistant turn with only tool calls has none.
            None | Some(Value::Null) => {
                obj.insert("content".into(), Value::String(String::new()));
            }
            Some(Value::String(_)) => {}
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for (k, p) in parts.iter().enumerate() {
                    match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => text.push_str(t),
                        (Some(kind), _) if kind != "text" => {
                            return Err(ApiError::param(
                                format!("messages[{i}].content[{k}].type"),
                                format!("Content parts of type `{kind}` are not supported; this model takes text only."),
                            ))
                        }
                        _ => {
                            return Err(ApiError::param(
                                format!("messages[{i}].content[{k}]"),
                                "A text content part needs `type: \"text\"` and a string `text`.".to_owned(),
                            ))
                        }
                    }
                }
                obj.insert("content".into(), Value::String(text));
            }
            Some(_) => {
                return Err(ApiError::param(
                    format!("messages[{i}].content"),
                    format!("`messages[{i}].content` must be a string or a list of text parts."),
                ))
            }
        }
        if let Some(Value::Array(calls)) = obj.get_mut("tool_calls") {
            for call in calls.iter_mut() {
                if let Some(f) = call.get_mut("function") {
                    if let Some(Value::String(args)) = f.get("arguments") {
                        if let Ok(parsed) = serde_json::from_str::<Value>(args) {
                            f["arguments"] = parsed;
                        }
                    }
                }
            }
        }
        out.push(Value::Object(obj));
    }
    Ok(out)
}

/// Renders and tokenizes a chat prompt (the template writes BOS and special tokens itself);
/// `prefill` is text the assistant's turn starts with (a required tool call's opening).
pub(crate) fn chat_prompt(
    state: &AppState,
    messages: Vec<Value>,
    tools: Option<Vec<Value>>,
    extra: serde_json::Map<String, Value>,
    prefill: &str,
) -> Result<Vec<u32>, ApiError> {
    let req = ChatRequest { messages, tools, add_generation_prompt: true, extra };
    let mut text = state.model.template.render(&req).map_err(|e| {
        ApiError::param(
            "messages",
            format!("The model's chat template could not render these messages: {e}"),
        )
    })?;
    text.push_str(prefill);
    state
        .model
        .tokenizer
        .encode_with(&text, false, true)
        .map_err(|e| ApiError::Internal(format!("tokenizing the prompt failed: {e}")))
}

/// Tokenizes plain prompt text (adds BOS as the model asks).
pub(crate) fn text_prompt(state: &AppState, text: &str) -> Result<Vec<u32>, ApiError> {
    state
        .model
        .tokenizer
        .encode(text, true)
        .map_err(|e| ApiError::Internal(format!("tokenizing the prompt failed: {e}")))
}

/// Fill-in-the-middle prompt ids, or a 400 on `suffix` if the tokenizer has no FIM tokens.
pub(crate) fn fim_prompt(
    state: &AppState,
    prefix: &str,
    suffix: &str,
) -> Result<Vec<u32>, ApiError> {
    let Some(fim) = state.model.fim else {
        return Err(ApiError::param(
            "suffix",
            "This model's tokenizer has no fill-in-the-middle tokens, so `suffix` is not supported.",
        ));
    };
    let tok = &state.model.tokenizer;
    let enc = |t: &str| {
        tok.encode_with(t, false, false)
            .map_err(|e| ApiError::Internal(format!("tokenizing failed: {e}")))
    };
    let mut ids = Vec::new();
    if tok.add_bos() {
        ids.extend(tok.bos_id());
    }
    ids.push(fim.prefix);
    ids.extend(enc(prefix)?);
    ids.push(fim.suffix);
    ids.extend(enc(suffix)?);
    ids.push(fim.middle);
    Ok(ids)
}

/// Whether `model` names the served model (`name`, or Ollama's `name:latest`).
pub(crate) fn model_matches(state: &AppState, model: &str) -> bool {
    let name = &state.model.name;
    model == name || model.strip_suffix(":latest") == Some(name.as_str())
}
