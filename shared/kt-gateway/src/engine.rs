//! One generation through the gateway: admission → routing → `Generate` on a worker →
//! streaming detokenization → stop strings → JSON check / tool-call split → events for the
//! API layers. Dropping a [`GenStream`] before it ends cancels the sequence on the worker
//! (an explicit `Cancel`, besides the gRPC stream reset that dropping the call causes).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use kt_proto::v1::worker_client::WorkerClient;
use kt_proto::v1::{
    generate_event, CancelRequest, FinishReason, GenerateEvent, GenerateRequest, SamplingParams,
    TokenEvent,
};
use kt_sample::StopChecker;
use kt_tokenize::StreamDecoder;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

use crate::admission::{self, Permit};
use crate::error::ApiError;
use crate::jsoncheck::{JsonChecker, JsonState};
use crate::names;
use crate::pool::Lease;
use crate::server::AppState;
use crate::tools::{PartialCall, ToolCall, ToolChoice, ToolFormat};

/// Request tracing: the W3C `traceparent` and the gateway's request id.
#[derive(Debug, Clone)]
pub(crate) struct Trace {
    pub traceparent: String,
    pub request_id: String,
}

/// What the API layer asks for.
#[derive(Debug, Clone)]
pub(crate) struct GenSpec {
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    /// Resolved budget (≥ 1; prompt + budget ≤ context).
    pub max_tokens: u32,
    pub stop: Vec<String>,
    /// End-of-generation ids of the model plus any the request adds.
    pub stop_ids: Vec<u32>,
    /// Alternatives per token to ask the worker for.
    pub top_logprobs: u32,
    /// Report per-token logprobs.
    pub logprobs: bool,
    pub json: bool,
    pub tools: Option<ToolFormat>,
    /// Whether the reply must be a call (with `tools`): the prompt then ends with
    /// `tools.prefill(..)`, which this stream counts as the start of the reply.
    pub tool_choice: ToolChoice,
    /// Send calls as [`Event::ToolCall`] while they stream (OpenAI streaming); otherwise they
    /// come only in the outcome.
    pub stream_calls: bool,
    /// Leave special tokens out of the text.
    pub skip_special: bool,
    pub trace: Trace,
    /// Arrival of the HTTP request (for time to first token).
    pub arrived: Instant,
}

/// One generated token with its logprob and alternatives (text is the token's piece).
#[derive(Debug, Clone)]
pub(crate) struct TokenLp {
    pub text: String,
    pub bytes: Vec<u8>,
    pub logprob: f64,
    pub top: Vec<(String, Vec<u8>, f64)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Finish {
    Stop,
    Length,
    ToolCalls,
    Error,
}

impl Finish {
    pub fn openai(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
            Finish::ToolCalls => "tool_calls",
            Finish::Error => "error",
        }
    }
}

/// How a generation ended.
#[derive(Debug, Clone)]
pub(crate) struct Outcome {
    pub finish: Finish,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub tool_calls: Vec<ToolCall>,
    pub error: Option<ApiError>,
    /// Generated ids (Ollama's `context`).
    pub tokens: Vec<u32>,
    /// When admission let it through, the first token arrived, and it ended.
    pub admitted: Instant,
    pub first_token: Option<Instant>,
    pub ended: Instant,
}

#[derive(Debug)]
pub(crate) enum Event {
    Delta {
        text: String,
        logprobs: Vec<TokenLp>,
    },
    /// A piece of the `index`-th tool call: its name comes with the first piece, then more of
    /// its arguments' JSON text (only with [`GenSpec::stream_calls`]).
    ToolCall {
        index: usize,
        name: Option<String>,
        arguments: String,
    },
    Done(Box<Outcome>),
}

/// Sends `Cancel` on drop unless disarmed.
struct CancelGuard {
    client: WorkerClient<Channel>,
    trace: Trace,
    armed: bool,
}

impl CancelGuard {
    fn fire(&mut self) {
        if !std::mem::replace(&mut self.armed, false) {
            return;
        }
        let mut client = self.client.clone();
        let req =
            with_trace(CancelRequest { request_id: self.trace.request_id.clone() }, &self.trace);
        // Dropping the stream already resets it; the explicit Cancel makes sure the worker
        // stops even if the reset is lost. It is fire-and-forget.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = client.cancel(req).await {
                    tracing::debug!("cancel failed: {}", e.message());
                }
            });
        }
    }
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        self.fire();
    }
}

fn with_trace<T>(msg: T, trace: &Trace) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    let md = req.metadata_mut();
    if let Ok(v) = MetadataValue::try_from(trace.traceparent.as_str()) {
        md.insert(names::grpc::TRACEPARENT, v);
    }
    if let Ok(v) = MetadataValue::try_from(trace.request_id.as_str()) {
        md.insert(names::grpc::REQUEST_ID, v);
    }
    req
}

/// A running generation; pull events with [`GenStream::next`].
pub(crate) struct GenStream {
    state: Arc<AppState>,
    spec: GenSpec,
    stream: Streaming<GenerateEvent>,
    lease: Lease,
    _permit: Permit,
    cancel: CancelGuard,
    decoder: StreamDecoder,
    stops: StopChecker,
    json: Option<JsonChecker>,
    /// Tool-call handling: text not yet emitted, and whether calls have started.
    tool_buf: String,
    in_calls: bool,
    /// Per streamed call, how many bytes of its arguments were sent.
    calls_sent: Vec<usize>,
    emitted_any: bool,
    pending: VecDeque<Event>,
    pending_lps: Vec<TokenLp>,
    tokens: Vec<u32>,
    admitted: Instant,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    done: bool,
}

/// Admits, routes and starts a generation. Transport failures before the stream starts take
/// the worker out and try the next one.
pub(crate) async fn start(state: &Arc<AppState>, spec: GenSpec) -> Result<GenStream, ApiError> {
    let permit = match state.admission.admit().await {
        Ok(p) => p,
        Err(e) => {
            state.metrics.count_rejected(admission::reason(&e));
            return Err(e);
        }
    };
    let admitted = Instant::now();
    let cost = spec.prompt.len() as i64 + i64::from(spec.max_tokens);
    let mut tried = Vec::new();
    loop {
        let Some(lease) = state.pool.pick(&spec.prompt, cost, &tried) else {
            state.metrics.count_rejected("no_worker");
            return Err(ApiError::Unavailable {
                message: "No healthy worker is available; retry later.".into(),
                retry_after_s: 5,
            });
        };
        let req = GenerateRequest {
            request_id: spec.trace.request_id.clone(),
            prompt_tokens: spec.prompt.clone(),
            sampling: Some(spec.sampling.clone()),
            max_tokens: spec.max_tokens,
            stop_token_ids: spec.stop_ids.clone(),
            top_logprobs: spec.top_logprobs,
        };
        let mut client = lease.slot.client.clone();
        match client.generate(with_trace(req, &spec.trace)).await {
            Ok(resp) => {
                state.metrics.prompt_tokens.fetch_add(spec.prompt.len() as u64, Ordering::Relaxed);
                let cancel = CancelGuard { client, trace: spec.trace.clone(), armed: true };
                let stops = StopChecker::new(spec.stop.clone(), Vec::new());
                let decoder = state.model.tokenizer.stream_decoder(spec.skip_special);
                let json = spec.json.then(JsonChecker::new);
                let tool_buf = match spec.tools {
                    Some(fmt) if spec.tool_choice.forces() => fmt.prefill(spec.tool_choice.name()),
                    _ => String::new(),
                };
                return Ok(GenStream {
                    state: Arc::clone(state),
                    stream: resp.into_inner(),
                    lease,
                    _permit: permit,
                    cancel,
                    decoder,
                    stops,
                    json,
                    in_calls: !tool_buf.is_empty(),
                    tool_buf,
                    calls_sent: Vec::new(),
                    emitted_any: false,
                    pending: VecDeque::new(),
                    pending_lps: Vec::new(),
                    tokens: Vec::new(),
                    admitted,
                    first_token: None,
                    last_token: None,
                    done: false,
                    spec,
                });
            }
            Err(status) => match status.code() {
                Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded => {
                    state.pool.mark_down(&lease.slot, status.message());
                    tried.push(lease.slot.index);
                }
                Code::InvalidArgument => {
                    return Err(ApiError::InvalidParam {
                        param: None,
                        message: status.message().to_owned(),
                    })
                }
                Code::ResourceExhausted => {
                    return Err(ApiError::Unavailable {
                        message: "The worker is at capacity; retry later.".into(),
                        retry_after_s: 1,
                    })
                }
                _ => {
                    return Err(ApiError::Generation(format!(
                        "the worker refused the request: {}",
                        status.message()
                    )))
                }
            },
        }
    }
}

impl GenStream {
    pub fn request_id(&self) -> &str {
        &self.spec.trace.request_id
    }

    /// The next event; `None` after [`Event::Done`].
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Some(ev);
            }
            if self.done {
                return None;
            }
            match self.stream.message().await {
                Ok(Some(GenerateEvent { event: Some(generate_event::Event::Token(t)) })) => {
                    self.on_token(t)
                }
                Ok(Some(GenerateEvent { event: Some(generate_event::Event::Finished(f)) })) => {
                    self.cancel.armed = false;
                    let finish = match FinishReason::try_from(f.reason) {
                        Ok(FinishReason::Stop) => Finish::Stop,
                        Ok(FinishReason::Length) => Finish::Length,
                        Ok(FinishReason::Error) => {
                            let msg = if f.message.is_empty() {
                                "the worker failed the sequence".to_owned()
                            } else {
                                f.message
                            };
                            self.finish(Finish::Error, Some(ApiError::Generation(msg)));
                            continue;
                        }
                        _ => {
                            self.finish(
                                Finish::Error,
                                Some(ApiError::Generation(
                                    "the worker cancelled the sequence".into(),
                                )),
                            );
                            continue;
                        }
                    };
                    self.finish(finish, None);
                }
                Ok(Some(GenerateEvent { event: None })) => {}
                Ok(None) => {
                    self.cancel.armed = false;
                    self.finish(
                        Finish::Error,
                        Some(ApiError::Generation(
                            "the worker ended the stream without finishing".into(),
                        )),
                    );
                }
                Err(status) => {
                    self.cancel.armed = false;
                    self.state.pool.mark_down(&self.lease.slot, status.message());
                    self.finish(
                        Finish::Error,
                        Some(ApiError::Unavailable {
                            message: format!(
                                "The worker serving this request was lost ({}); retry.",
                                status.code().description()
                            ),
                            retry_after_s: 1,
                        }),
                    );
                }
            }
        }
    }

    fn piece(&self, id: u32) -> (String, Vec<u8>) {
        let bytes = self
            .state
            .model
            .tokenizer
            .token_to_piece(id, false)
            .map(<[u8]>::to_vec)
            .unwrap_or_default();
        (String::from_utf8_lossy(&bytes).into_owned(), bytes)
    }

    fn on_token(&mut self, t: TokenEvent) {
        let now = Instant::now();
        let m = &self.state.metrics;
        m.completion_tokens.fetch_add(1, Ordering::Relaxed);
        if let Some(last) = self.last_token {
            m.tpot.observe(now.duration_since(last).as_secs_f64());
        }
        self.last_token = Some(now);
        self.lease.consumed(1);
        let Some(tok) = t.token else { return };
        let id = tok.id;
        self.tokens.push(id);
        let at_budget = self.tokens.len() >= self.spec.max_tokens as usize;
        if self.spec.stop_ids.contains(&id) {
            // The worker ends the sequence itself after a stop id.
            self.cancel.armed = false;
            self.finish(Finish::Stop, None);
            return;
        }
        if self.spec.logprobs {
            let (text, bytes) = self.piece(id);
            let top = t
                .top_logprobs
                .iter()
                .map(|a| {
                    let (s, b) = self.piece(a.id);
                    (s, b, a.logprob)
                })
                .collect();
            self.pending_lps.push(TokenLp { text, bytes, logprob: tok.logprob, top });
        }
        let piece = match self.decoder.push(id) {
            Ok(p) => p.unwrap_or_default(),
            Err(e) => {
                self.finish(
                    Finish::Error,
                    Some(ApiError::Generation(format!("the worker sent a bad token: {e}"))),
                );
                return;
            }
        };
        let out = self.stops.push_text(&piece);
        let hit = out.stop.is_some();
        if !self.text(out.text) {
            return;
        }
        if hit {
            self.finish(Finish::Stop, None);
        } else if at_budget {
            self.cancel.armed = false;
            self.finish(Finish::Length, None);
        }
    }

    /// Passes text through the JSON check and the tool-call split; false once finished.
    fn text(&mut self, mut text: String) -> bool {
        if let Some(j) = self.json.as_mut() {
            match j.push(&text) {
                JsonState::Partial => {}
                JsonState::Complete(n) => {
                    text.truncate(n);
                    self.emit(text);
                    self.finish(Finish::Stop, None);
                    return false;
                }
                JsonState::Invalid(at) => {
                    self.finish(
                        Finish::Error,
                        Some(ApiError::Generation(format!(
                            "The model's output stopped being valid JSON at byte {at}; the gateway \
                             checks JSON mode output but cannot constrain sampling."
                        ))),
                    );
                    return false;
                }
            }
        }
        match self.spec.tools {
            None => self.emit(text),
            Some(fmt) => {
                self.tool_buf.push_str(&text);
                if self.in_calls {
                    return self.calls_progress(fmt);
                }
                let start = match fmt {
                    // A bare JSON call only counts at the very start of the reply.
                    ToolFormat::Llama3 if self.emitted_any => self.tool_buf.find("<|python_tag|>"),
                    _ => fmt.start_of_calls(&self.tool_buf),
                };
                if let Some(i) = start {
                    let rest = self.tool_buf.split_off(i);
                    let before = std::mem::replace(&mut self.tool_buf, rest);
                    self.in_calls = true;
                    self.emit(before);
                    return self.calls_progress(fmt);
                }
                let mut keep = fmt.partial_marker_len(&self.tool_buf);
                if fmt == ToolFormat::Llama3 && !self.emitted_any && self.tool_buf.trim().is_empty()
                {
                    keep = self.tool_buf.len();
                }
                let cut = self.tool_buf.len() - keep;
                let tail = self.tool_buf.split_off(cut);
                let now = std::mem::replace(&mut self.tool_buf, tail);
                self.emit(now);
            }
        }
        true
    }

    /// After calls grew: sends what is new of them (with `stream_calls`); ends a named
    /// choice's generation once its call is closed. False once finished.
    fn calls_progress(&mut self, fmt: ToolFormat) -> bool {
        let named = matches!(self.spec.tool_choice, ToolChoice::Named(_));
        if !self.spec.stream_calls && !named {
            return true;
        }
        let calls = fmt.scan(&self.tool_buf);
        if self.spec.stream_calls {
            self.send_calls(&calls);
        }
        if named && calls.first().is_some_and(|c| c.closed) {
            self.finish(Finish::Stop, None);
            return false;
        }
        true
    }

    /// Events for what is new of `calls` since the last time (calls go out in order, each once
    /// it has a name).
    fn send_calls(&mut self, calls: &[PartialCall]) {
        for (index, c) in calls.iter().enumerate() {
            let Some(name) = &c.name else { break };
            let (name, arguments) = match self.calls_sent.get_mut(index) {
                None => {
                    self.calls_sent.push(c.arguments.len());
                    (Some(name.clone()), c.arguments.clone())
                }
                Some(sent) => match c.arguments.get(*sent..) {
                    Some(more) if !more.is_empty() => {
                        *sent = c.arguments.len();
                        (None, more.to_owned())
                    }
                    _ => continue,
                },
            };
            self.first_output();
            self.pending.push_back(Event::ToolCall { index, name, arguments });
        }
    }

    /// Time to first token counts from the first text or call sent.
    fn first_output(&mut self) {
        if self.first_token.is_none() {
            let now = Instant::now();
            self.first_token = Some(now);
            self.state.metrics.ttft.observe(now.duration_since(self.spec.arrived).as_secs_f64());
        }
    }

    fn emit(&mut self, text: String) {
        if text.is_empty() {
            return;
        }
        self.first_output();
        self.emitted_any = true;
        let logprobs = std::mem::take(&mut self.pending_lps);
        self.pending.push_back(Event::Delta { text, logprobs });
    }

    fn finish(&mut self, mut finish: Finish, mut error: Option<ApiError>) {
        if self.done {
            return;
        }
        self.done = true;
        if error.is_none() {
            // Whatever is still held back: an unfinished character, a partial stop string.
            let tail = self.decoder.finish();
            let stopped = self.stops.stopped().is_some();
            let mut rest = self.stops.push_text(&tail).text;
            if !stopped {
                rest.push_str(&self.stops.finish());
            }
            let _ = self.text(rest);
            if let Some(j) = &self.json {
                if !j.is_complete() && finish == Finish::Stop && self.stops.stopped().is_none() {
                    error = Some(ApiError::Generation(
                        "The model ended its reply before the JSON object was complete.".into(),
                    ));
                    finish = Finish::Error;
                }
            }
        }
        let mut calls = Vec::new();
        // A required call cut by the token budget keeps finish reason `length` and comes as
        // far as it got (as the stream sent it).
        let forced_cut = self.spec.tool_choice.forces() && finish == Finish::Length;
        if let Some(fmt) = self.spec.tools {
            let buf = std::mem::take(&mut self.tool_buf);
            if self.in_calls {
                let scanned = fmt.scan(&buf);
                if self.spec.stream_calls && error.is_none() {
                    self.send_calls(&scanned);
                }
                // A named choice's call ends where its object closes (generation stops there,
                // maybe with more text in the last piece); other replies are parsed whole.
                let named = match (&self.spec.tool_choice, scanned.first()) {
                    (ToolChoice::Named(_), Some(c))
                        if c.closed
                            && serde_json::from_str::<serde_json::Value>(&c.arguments).is_ok() =>
                    {
                        c.name.clone().map(|name| ToolCall { name, arguments: c.arguments.clone() })
                    }
                    _ => None,
                };
                match named {
                    Some(call) => calls.push(call),
                    None if forced_cut && scanned.iter().any(|c| c.name.is_some()) => {
                        calls = scanned
                            .into_iter()
                            .filter_map(|c| {
                                c.name.map(|name| ToolCall { name, arguments: c.arguments })
                            })
                            .collect();
                    }
                    None => {
                        let (content, parsed) = fmt.parse(&buf);
                        self.emit(content);
                        calls = parsed;
                    }
                }
            } else {
                self.emit(buf);
            }
            if !calls.is_empty() && error.is_none() && !forced_cut {
                finish = Finish::ToolCalls;
            }
            if calls.is_empty()
                && error.is_none()
                && finish != Finish::Length
                && self.spec.tool_choice.forces()
            {
                finish = Finish::Error;
                error = Some(ApiError::Generation(
                    "`tool_choice` asks for a tool call, but the model's reply is not a valid \
                     call. The gateway starts the reply with the call's opening but cannot \
                     constrain sampling; retry, maybe with a lower temperature."
                        .into(),
                ));
            }
        }
        if !self.pending_lps.is_empty() {
            let logprobs = std::mem::take(&mut self.pending_lps);
            self.pending.push_back(Event::Delta { text: String::new(), logprobs });
        }
        // Stopped by the gateway (stop string, JSON end, error): stop the worker too.
        self.cancel.fire();
        let ended = Instant::now();
        self.state.metrics.duration.observe(ended.duration_since(self.spec.arrived).as_secs_f64());
        self.pending.push_back(Event::Done(Box::new(Outcome {
            finish,
            prompt_tokens: self.spec.prompt.len(),
            completion_tokens: self.tokens.len(),
            tool_calls: calls,
            error,
            tokens: std::mem::take(&mut self.tokens),
            admitted: self.admitted,
            first_token: self.first_token,
            ended,
        })));
    }
}

/// Runs a generation to its end, collecting text and logprobs.
pub(crate) async fn collect(mut s: GenStream) -> (String, Vec<TokenLp>, Outcome) {
    let mut text = String::new();
    let mut lps = Vec::new();
    while let Some(ev) = s.next().await {
        match ev {
            Event::Delta { text: t, logprobs } => {
                text.push_str(&t);
                lps.extend(logprobs);
            }
            Event::ToolCall { .. } => {}
            Event::Done(o) => return (text, lps, *o),
        }
    }
    let now = Instant::now();
    let o = Outcome {
        finish: Finish::Error,
        prompt_tokens: 0,
        completion_tokens: 0,
        tool_calls: Vec::new(),
        error: Some(ApiError::Internal("generation ended without an outcome".into())),
        tokens: Vec::new(),
        admitted: now,
        first_token: None,
        ended: now,
    };
    (text, lps, o)
}
