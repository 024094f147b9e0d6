//! The engine: iteration-level continuous batching over one [`Backend`].
//!
//! One scheduler thread owns the backend (the model and its KV cache) and every sequence's
//! state. Each iteration it
//! 1. takes new requests and cancellations from its command channel, and drops sequences
//!    whose client went away (their event receiver was dropped);
//! 2. admits waiting sequences in arrival order while fewer than `max_batch` run and the
//!    free KV blocks (less what the running sequences still need for their prompts) hold the
//!    next one's prompt — no user-facing cache-size rule;
//! 3. plans one batch: a decode step (one token) for every sequence past its prompt, then
//!    prefill chunks of the others, oldest first, within `max_batch_tokens`;
//! 4. when the batch needs more blocks than are free, preempts the youngest running sequence
//!    back to the front of the waiting queue (its blocks freed; its prompt and generated
//!    tokens are recomputed when it is admitted again, its sampler state kept) and plans again;
//! 5. runs the batch in one [`Backend::forward`], samples a token for every sequence whose
//!    step reached its end, streams it, and finishes sequences (stop id, length, error),
//!    freeing their blocks at once.
//!
//! Batching does not change results: a sequence's tokens and logprobs are those it gets alone
//! (the backend computes every row independently; each sequence has its own seeded sampler).
//! An expert-tier failure ends the sequences of the failed iteration with
//! [`FinishReason::Error`]; the engine keeps running.

use std::collections::{HashSet, VecDeque};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, PoisonError};

use kt_models::{ModelConfig, ModelError};
use kt_sample::{Sampler, SamplingParams, TokenLogprob};
use tokio::sync::mpsc;

use crate::backend::{Backend, BatchStep};

/// Most alternatives a request may ask logprobs for.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Scheduling limits.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Most sequences running (scheduled in one iteration).
    pub max_batch: usize,
    /// Most tokens (decode steps + prefill chunk tokens) in one iteration.
    pub max_batch_tokens: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self { max_batch: 32, max_batch_tokens: 512 }
    }
}

/// One generation request, as the engine takes it.
#[derive(Debug, Clone)]
pub struct Request {
    /// Unique among live sequences of this engine.
    pub id: String,
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    /// Most tokens to generate; 0 = up to the context length.
    pub max_tokens: usize,
    /// Generation ends after any of these ids (the id is streamed).
    pub stop_ids: Vec<u32>,
    /// Alternatives reported per token, 0..=[`MAX_TOP_LOGPROBS`].
    pub top_logprobs: usize,
}

/// A generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    /// 0-based position among the generated tokens.
    pub index: usize,
    pub id: u32,
    /// Natural-log probability under the raw logits.
    pub logprob: f64,
    /// The most likely alternatives, most likely first.
    pub top_logprobs: Vec<TokenLogprob>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop id was generated (it is the last token).
    Stop,
    /// `max_tokens` reached or the context (or KV cache) is full.
    Length,
    /// Cancelled, or the client went away.
    Cancelled,
    /// The sequence failed; see [`Finished::message`].
    Error,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    pub reason: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Empty unless `reason` is [`FinishReason::Error`].
    pub message: String,
}

/// What a sequence's stream carries: tokens, then exactly one `Finished`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Token(Token),
    Finished(Finished),
}

/// Why a request was refused before it was queued (the client's fault: INVALID_ARGUMENT).
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum SubmitError {
    #[error("request_id is empty")]
    EmptyId,
    #[error("request_id `{0}` is already in use by a live sequence")]
    DuplicateId(String),
    #[error("prompt_tokens is empty: at least one token is required")]
    EmptyPrompt,
    #[error("prompt_tokens[{index}] = {id} is outside the vocabulary of {vocab}")]
    TokenOutOfVocab { index: usize, id: u32, vocab: usize },
    #[error("stop_token_ids contains {id}, outside the vocabulary of {vocab}")]
    StopOutOfVocab { id: u32, vocab: usize },
    #[error("top_logprobs = {0} is out of range 0..={MAX_TOP_LOGPROBS}")]
    TopLogprobs(usize),
    #[error("the prompt of {prompt} tokens leaves no room in the model's context of {context}")]
    PromptTooLong { prompt: usize, context: usize },
    #[error(
        "the prompt of {prompt} tokens needs {needed} KV blocks; this worker has {total} in all"
    )]
    PromptExceedsCache { prompt: usize, needed: usize, total: usize },
    #[error("sampling: {0}")]
    Sampling(String),
    #[error("the worker is shutting down")]
    ShuttingDown,
}

/// The model an engine serves, for `Info`.
#[derive(Debug, Clone)]
pub struct ModelSummary {
    pub config: ModelConfig,
    pub devices: Vec<String>,
    pub experts_per_token: usize,
    pub block_tokens: usize,
    pub total_blocks: usize,
}

/// Counters of the scheduler, as of its last iteration or command.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub free_blocks: usize,
    pub total_blocks: usize,
    pub running: usize,
    pub waiting: usize,
    /// Iterations run since start.
    pub iterations: u64,
    /// Sequences preempted (blocks freed, recomputed later) since start.
    pub preemptions: u64,
}

struct Submission {
    request: Request,
    sampler: Sampler,
    events: mpsc::UnboundedSender<Event>,
}

enum Command {
    Submit(Box<Submission>),
    Cancel(String),
}

struct Shared {
    /// Ids of sequences submitted and not yet finished.
    live: Mutex<HashSet<String>>,
    stats: Mutex<Stats>,
}

/// A handle to a running engine; cheap to clone. The scheduler thread finishes the work it
/// has and ends when every handle is dropped.
#[derive(Clone)]
pub struct Engine {
    commands: std_mpsc::Sender<Command>,
    shared: Arc<Shared>,
    model: Arc<ModelSummary>,
    opts: EngineOptions,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("opts", &self.opts).finish_non_exhaustive()
    }
}

/// The receiving end of a sequence's events. Dropping it cancels the sequence.
pub type Events = mpsc::UnboundedReceiver<Event>;

impl Engine {
    /// Starts the scheduler thread over `backend`.
    pub fn start<B: Backend>(backend: B, opts: EngineOptions) -> std::io::Result<Self> {
        let opts = EngineOptions {
            max_batch: opts.max_batch.max(1),
            max_batch_tokens: opts.max_batch_tokens.max(1),
        };
        let model = Arc::new(ModelSummary {
            config: backend.config().clone(),
            devices: backend.devices(),
            experts_per_token: backend.experts_per_token(),
            block_tokens: backend.block_tokens(),
            total_blocks: backend.total_blocks(),
        });
        let shared = Arc::new(Shared {
            live: Mutex::new(HashSet::new()),
            stats: Mutex::new(Stats {
                free_blocks: backend.free_blocks(),
                total_blocks: backend.total_blocks(),
                ..Stats::default()
            }),
        });
        let (tx, rx) = std_mpsc::channel();
        let scheduler = Scheduler {
            backend,
            opts: opts.clone(),
            commands: rx,
            shared: shared.clone(),
            running: Vec::new(),
            waiting: VecDeque::new(),
            next_arrival: 0,
            closing: false,
            stats: Stats::default(),
        };
        std::thread::Builder::new().name("kt-worker-scheduler".into()).spawn(move || {
            scheduler.run();
        })?;
        Ok(Self { commands: tx, shared, model, opts })
    }

    pub fn model(&self) -> &ModelSummary {
        &self.model
    }

    pub fn options(&self) -> &EngineOptions {
        &self.opts
    }

    /// Checks `request` and queues it. Events arrive on the returned receiver; dropping it
    /// cancels the sequence.
    pub fn submit(&self, request: Request) -> Result<Events, SubmitError> {
        let sampler = self.check(&request)?;
        {
            let mut live = self.shared.live.lock().unwrap_or_else(PoisonError::into_inner);
            if !live.insert(request.id.clone()) {
                return Err(SubmitError::DuplicateId(request.id));
            }
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let id = request.id.clone();
        let submission = Box::new(Submission { request, sampler, events: tx });
        if self.commands.send(Command::Submit(submission)).is_err() {
            self.shared.live.lock().unwrap_or_else(PoisonError::into_inner).remove(&id);
            return Err(SubmitError::ShuttingDown);
        }
        Ok(rx)
    }

    fn check(&self, r: &Request) -> Result<Sampler, SubmitError> {
        let c = &self.model.config;
        if r.id.is_empty() {
            return Err(SubmitError::EmptyId);
        }
        if r.prompt.is_empty() {
            return Err(SubmitError::EmptyPrompt);
        }
        let vocab = c.vocab_size;
        if let Some((index, &id)) = r.prompt.iter().enumerate().find(|(_, &t)| t as usize >= vocab)
        {
            return Err(SubmitError::TokenOutOfVocab { index, id, vocab });
        }
        if let Some(&id) = r.stop_ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(SubmitError::StopOutOfVocab { id, vocab });
        }
        if r.top_logprobs > MAX_TOP_LOGPROBS {
            return Err(SubmitError::TopLogprobs(r.top_logprobs));
        }
        if r.prompt.len() >= c.max_position {
            return Err(SubmitError::PromptTooLong {
                prompt: r.prompt.len(),
                context: c.max_position,
            });
        }
        let needed = (r.prompt.len() + 1).div_ceil(self.model.block_tokens);
        if needed > self.model.total_blocks {
            return Err(SubmitError::PromptExceedsCache {
                prompt: r.prompt.len(),
                needed,
                total: self.model.total_blocks,
            });
        }
        let mut sampler =
            Sampler::new(r.sampling.clone()).map_err(|e| SubmitError::Sampling(e.to_string()))?;
        sampler.add_prompt(&r.prompt);
        Ok(sampler)
    }

    /// Stops the live sequence `id` (its stream ends with [`FinishReason::Cancelled`]).
    /// Returns whether one was live.
    pub fn cancel(&self, id: &str) -> bool {
        let found = self.shared.live.lock().unwrap_or_else(PoisonError::into_inner).contains(id);
        if found {
            let _ = self.commands.send(Command::Cancel(id.to_string()));
        }
        found
    }

    /// The scheduler's counters as of its last iteration.
    pub fn stats(&self) -> Stats {
        self.shared.stats.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

/// A sequence in the scheduler.
struct Seq<S> {
    id: String,
    /// Admission order; preempted sequences keep theirs.
    arrival: u64,
    /// Prompt, then the generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Most tokens to generate.
    max_new: usize,
    stop_ids: Vec<u32>,
    top_logprobs: usize,
    sampler: Sampler,
    kv: S,
    events: mpsc::UnboundedSender<Event>,
    cancelled: bool,
}

impl<S> Seq<S> {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
}

struct Scheduler<B: Backend> {
    backend: B,
    opts: EngineOptions,
    commands: std_mpsc::Receiver<Command>,
    shared: Arc<Shared>,
    /// In arrival order.
    running: Vec<Seq<B::Seq>>,
    /// Front = next to admit.
    waiting: VecDeque<Seq<B::Seq>>,
    next_arrival: u64,
    /// Every handle is gone: finish what is there, then stop.
    closing: bool,
    stats: Stats,
}

impl<B: Backend> Scheduler<B> {
    fn run(mut self) {
        loop {
            let idle = self.running.is_empty() && self.waiting.is_empty();
            if idle && self.closing {
                break;
            }
            if idle {
                match self.commands.recv() {
                    Ok(cmd) => self.command(cmd),
                    Err(_) => break,
                }
            }
            loop {
                match self.commands.try_recv() {
                    Ok(cmd) => self.command(cmd),
                    Err(std_mpsc::TryRecvError::Empty) => break,
                    Err(std_mpsc::TryRecvError::Disconnected) => {
                        self.closing = true;
                        break;
                    }
                }
            }
            self.reap();
            self.admit();
            self.iterate();
            self.publish();
        }
        tracing::debug!("scheduler stopped");
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Submit(submission) => {
                let Submission { request, sampler, events } = *submission;
                let context = self.backend.config().max_position;
                let room = context.saturating_sub(request.prompt.len());
                let max_new =
                    if request.max_tokens == 0 { room } else { request.max_tokens.min(room) };
                let arrival = self.next_arrival;
                self.next_arrival += 1;
                self.waiting.push_back(Seq {
                    id: request.id,
                    arrival,
                    prompt_len: request.prompt.len(),
                    tokens: request.prompt,
                    max_new,
                    stop_ids: request.stop_ids,
                    top_logprobs: request.top_logprobs,
                    sampler,
                    kv: B::Seq::default(),
                    events,
                    cancelled: false,
                });
            }
            Command::Cancel(id) => {
                for s in self.running.iter_mut().chain(self.waiting.iter_mut()) {
                    if s.id == id {
                        s.cancelled = true;
                    }
                }
            }
        }
        self.publish();
    }

    /// Ends cancelled sequences and those whose client went away.
    fn reap(&mut self) {
        let gone = |s: &Seq<B::Seq>| s.cancelled || s.events.is_closed();
        let mut i = 0;
        while i < self.running.len() {
            if gone(&self.running[i]) {
                let s = self.running.remove(i);
                self.finish(s, FinishReason::Cancelled, String::new());
            } else {
                i += 1;
            }
        }
        let mut i = 0;
        while i < self.waiting.len() {
            if gone(&self.waiting[i]) {
                if let Some(s) = self.waiting.remove(i) {
                    self.finish(s, FinishReason::Cancelled, String::new());
                }
            } else {
                i += 1;
            }
        }
    }

    /// Blocks the running sequences still need for the tokens they have not processed.
    fn pending_blocks(&self) -> usize {
        self.running.iter().map(|s| self.backend.blocks_needed(&s.kv, s.tokens.len())).sum()
    }

    fn admit(&mut self) {
        while self.running.len() < self.opts.max_batch {
            let Some(next) = self.waiting.front() else { break };
            // The prompt (and, after a preemption, what was generated) plus the next token.
            let need = self.backend.blocks_for(next.tokens.len() + 1);
            if need > self.backend.total_blocks() {
                if let Some(s) = self.waiting.pop_front() {
                    self.finish(s, FinishReason::Length, String::new());
                }
                continue;
            }
            let free = self.backend.free_blocks().saturating_sub(self.pending_blocks());
            if need > free {
                break;
            }
            if let Some(s) = self.waiting.pop_front() {
                let at = self.running.partition_point(|r| r.arrival < s.arrival);
                self.running.insert(at, s);
            }
        }
    }

    /// Which running sequences run how many tokens this iteration: decode steps first, then
    /// prefill chunks, oldest first, within the token budget.
    fn plan(&self) -> Vec<(usize, usize)> {
        let mut budget = self.opts.max_batch_tokens;
        let mut plan = Vec::new();
        let remaining = |s: &Seq<B::Seq>| s.tokens.len() - self.backend.seq_len(&s.kv);
        for (i, s) in self.running.iter().enumerate() {
            if remaining(s) == 1 && budget > 0 {
                plan.push((i, 1));
                budget -= 1;
            }
        }
        for (i, s) in self.running.iter().enumerate() {
            let r = remaining(s);
            if r > 1 && budget > 0 {
                let n = r.min(budget);
                plan.push((i, n));
                budget -= n;
            }
        }
        plan.sort_unstable();
        plan
    }

    fn iterate(&mut self) {
        let plan = loop {
            if self.running.is_empty() {
                return;
            }
            let plan = self.plan();
            let need: usize = plan
                .iter()
                .map(|&(i, n)| {
                    let s = &self.running[i];
                    self.backend.blocks_needed(&s.kv, self.backend.seq_len(&s.kv) + n)
                })
                .sum();
            if need <= self.backend.free_blocks() {
                break plan;
            }
            // The youngest running sequence gives its blocks back and waits.
            let Some(mut s) = self.running.pop() else { return };
            if self.running.is_empty() {
                // Alone and still out of blocks: the cache cannot hold it any longer.
                self.finish(s, FinishReason::Length, String::new());
                continue;
            }
            tracing::debug!(id = %s.id, "KV cache full: preempting the youngest sequence");
            self.backend.release(&mut s.kv);
            self.stats.preemptions += 1;
            self.waiting.push_front(s);
        };
        if plan.is_empty() {
            return;
        }
        self.stats.iterations += 1;
        let inputs: Vec<(usize, Vec<u32>)> = plan
            .iter()
            .map(|&(i, n)| {
                let s = &self.running[i];
                let at = self.backend.seq_len(&s.kv);
                (i, s.tokens[at..at + n].to_vec())
            })
            .collect();
        let result = {
            let mut chosen: Vec<Option<&mut Seq<B::Seq>>> =
                self.running.iter_mut().map(Some).collect();
            let mut steps: Vec<BatchStep<'_, B::Seq>> = Vec::with_capacity(inputs.len());
            for (i, tokens) in &inputs {
                if let Some(s) = chosen[*i].take() {
                    steps.push(BatchStep { seq: &mut s.kv, tokens });
                }
            }
            self.backend.forward(&mut steps)
        };
        match result {
            Ok(logits) => self.after(&plan, logits),
            Err(err) => self.fail(&plan, &err),
        }
    }

    /// Samples for every step that reached its sequence's end; finishes sequences.
    fn after(&mut self, plan: &[(usize, usize)], logits: Vec<Vec<f32>>) {
        let mut done: Vec<(usize, FinishReason, String)> = Vec::new();
        for (&(i, _), logits) in plan.iter().zip(logits) {
            let s = &mut self.running[i];
            if self.backend.seq_len(&s.kv) < s.tokens.len() {
                continue; // prefill not complete yet
            }
            let sampled = s
                .sampler
                .sample(&logits)
                .and_then(|id| kt_sample::logprobs(&logits, id, s.top_logprobs).map(|lp| (id, lp)));
            let (id, lp) = match sampled {
                Ok(x) => x,
                Err(e) => {
                    done.push((i, FinishReason::Error, format!("sampling failed: {e}")));
                    continue;
                }
            };
            let token = Token {
                index: s.generated(),
                id,
                logprob: lp.chosen.logprob,
                top_logprobs: lp.top,
            };
            s.tokens.push(id);
            if s.events.send(Event::Token(token)).is_err() {
                done.push((i, FinishReason::Cancelled, String::new()));
            } else if s.stop_ids.contains(&id) {
                done.push((i, FinishReason::Stop, String::new()));
            } else if s.generated() >= s.max_new {
                done.push((i, FinishReason::Length, String::new()));
            }
        }
        // Highest index first, so that removals keep the other indices valid.
        for (i, reason, message) in done.into_iter().rev() {
            let s = self.running.remove(i);
            self.finish(s, reason, message);
        }
    }

    /// Ends every sequence of a failed iteration with an error.
    fn fail(&mut self, plan: &[(usize, usize)], err: &ModelError) {
        let message = match err {
            ModelError::Experts(m) | ModelError::ExpertsRefused(m) => {
                format!("the expert tier failed: {m}")
            }
            other => format!("the iteration failed: {other}"),
        };
        tracing::warn!(sequences = plan.len(), %message, "iteration failed");
        for &(i, _) in plan.iter().rev() {
            let s = self.running.remove(i);
            self.finish(s, FinishReason::Error, message.clone());
        }
    }

    fn finish(&mut self, mut s: Seq<B::Seq>, reason: FinishReason, message: String) {
        self.backend.release(&mut s.kv);
        self.shared.live.lock().unwrap_or_else(PoisonError::into_inner).remove(&s.id);
        let finished = Finished {
            reason,
            prompt_tokens: s.prompt_len,
            completion_tokens: s.generated(),
            message,
        };
        tracing::debug!(id = %s.id, ?reason, tokens = finished.completion_tokens, "finished");
        // Counters first: whoever sees the finished event sees the blocks back.
        self.publish();
        let _ = s.events.send(Event::Finished(finished));
    }

    fn publish(&mut self) {
        self.stats.free_blocks = self.backend.free_blocks();
        self.stats.total_blocks = self.backend.total_blocks();
        self.stats.running = self.running.len();
        self.stats.waiting = self.waiting.len();
        *self.shared.stats.lock().unwrap_or_else(PoisonError::into_inner) = self.stats.clone();
    }
}
