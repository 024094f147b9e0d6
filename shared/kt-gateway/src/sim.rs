//! A simulated worker: serves `kt.v1.Worker` with deterministic tokens at a fixed rate and no
//! model, so that the gateway's routing, admission, streaming and failure handling can be
//! tested and measured without a GPU (STYLE.md: "a GPU-free simulator of the worker").
//!
//! What it does, per `Generate`:
//! * checks the request as the real worker must (non-empty id and prompt, ids below
//!   `vocab_size`, `top_logprobs` ≤ 20, prompt shorter than the context, id not live);
//! * waits `first_token_delay` (the "prefill"), then sends one token every `token_interval`;
//! * picks tokens from [`SimConfig::vocab`]: a token with a logit bias ≥ 100 is always chosen,
//!   tokens with a bias ≤ -100 never are; otherwise the choice is a hash of the prompt, the
//!   position and (when given) the seed — greedy requests (temperature 0) and seeded requests
//!   are reproducible, unseeded sampled requests are not;
//! * a [`SimReply`] whose `needle` token sequence occurs in the prompt replaces the hashed
//!   tokens: its `reply` ids come out in order, then the first stop token id of the request
//!   (finish STOP), so tests can script tool calls, JSON or stop strings;
//! * ends with STOP after a token in `stop_token_ids`, LENGTH at `max_tokens` (or the
//!   context), CANCELLED on `Cancel` or when the client drops the stream;
//! * reports logprobs: the chosen token `-0.1 × (1 + position mod 5)`, alternatives below it.
//!
//! KV blocks are accounted (prompt + budget, rounded up to blocks) and freed when a sequence
//! ends for any reason, which is what the gateway's cancel tests look at ([`SimStats`]).

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kt_proto::v1::health_response::Status as HealthStatus;
use kt_proto::v1::worker_server::Worker;
use kt_proto::v1::{
    generate_event, CancelRequest, CancelResponse, FinishReason, FinishedEvent, GenerateEvent,
    GenerateRequest, HealthRequest, HealthResponse, TokenEvent, TokenLogprob, WorkerInfo,
    WorkerInfoRequest,
};
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// A scripted answer: when `needle` occurs in the prompt, generate `reply`.
#[derive(Debug, Clone)]
pub struct SimReply {
    pub needle: Vec<u32>,
    pub reply: Vec<u32>,
}

/// How the simulated worker behaves.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub model: String,
    pub arch: String,
    /// Context length in tokens.
    pub max_context: u32,
    /// Ids ≥ this are rejected with INVALID_ARGUMENT.
    pub vocab_size: u32,
    /// Ids generated tokens are drawn from (use ids whose text is non-empty).
    pub vocab: Vec<u32>,
    /// "Prefill": time from the request to the first token.
    pub first_token_delay: Duration,
    /// Time between tokens of one sequence.
    pub token_interval: Duration,
    pub kv_blocks_total: u32,
    pub kv_block_tokens: u32,
    pub max_batch: u32,
    pub replies: Vec<SimReply>,
    /// Record when each token was sent, per request id (for `kt bench gateway`).
    pub record_timeline: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            model: "sim".into(),
            arch: "sim".into(),
            max_context: 4096,
            vocab_size: 256,
            vocab: (b'a'..=b'z').map(u32::from).collect(),
            first_token_delay: Duration::from_millis(0),
            token_interval: Duration::from_millis(1),
            kv_blocks_total: 4096,
            kv_block_tokens: 16,
            max_batch: 256,
            replies: Vec::new(),
            record_timeline: false,
        }
    }
}

impl SimConfig {
    /// A sim for `card`'s tokenizer: its vocabulary size and context, drawing tokens whose
    /// text is one ASCII letter or digit (each token then shows as text at once).
    pub fn for_model(card: &crate::ModelCard) -> Self {
        let tok = &card.tokenizer;
        let vocab: Vec<u32> = (0..tok.vocab_size() as u32)
            .filter(|&id| !tok.is_special(id) && !tok.is_eog(id))
            .filter(|&id| {
                tok.token_to_piece(id, true)
                    .is_ok_and(|p| p.len() == 1 && p[0].is_ascii_alphanumeric())
            })
            .collect();
        Self {
            model: card.name.clone(),
            arch: card.facts.arch.clone(),
            max_context: card.facts.context_length.unwrap_or(4096),
            vocab_size: tok.vocab_size() as u32,
            vocab,
            ..Self::default()
        }
    }
}

impl SimReply {
    /// Replies `reply` (text, tokenized with special tokens parsed) when the prompt contains
    /// `needle` — as a word at the start of a line or after a space (both tokenizations are
    /// registered).
    pub fn text(card: &crate::ModelCard, needle: &str, reply: &str) -> Vec<SimReply> {
        let tok = &card.tokenizer;
        let reply = tok.encode_with(reply, false, true).unwrap_or_default();
        [needle.to_owned(), format!(" {needle}")]
            .iter()
            .filter_map(|n| tok.encode_with(n, false, false).ok())
            .map(|needle| SimReply { needle, reply: reply.clone() })
            .collect()
    }
}

/// When the sim received a request and sent each of its tokens.
#[derive(Debug, Clone)]
pub struct Timeline {
    pub received: Instant,
    pub tokens: Vec<Instant>,
}

/// Counters a test can read while the sim runs.
#[derive(Debug, Default)]
pub struct SimStats {
    /// Sequences started.
    pub started: AtomicU64,
    /// Sequences that ended by Cancel or by the client dropping the stream.
    pub cancelled: AtomicU64,
    /// Sequences live now.
    pub live: AtomicU32,
    /// KV blocks in use now.
    pub kv_blocks_used: AtomicU32,
}

struct Live {
    stop: Arc<Notify>,
}

struct Inner {
    cfg: SimConfig,
    stats: Arc<SimStats>,
    live: Mutex<HashMap<String, Live>>,
    timelines: Mutex<HashMap<String, Timeline>>,
    serving: AtomicBool,
    hasher: std::collections::hash_map::RandomState,
}

/// The simulated worker; clone it freely (shared state). Serve it with
/// `WorkerServer::new(sim)` over TCP or [`crate::in_process_channel`].
#[derive(Clone)]
pub struct SimWorker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SimWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimWorker").field("cfg", &self.inner.cfg).finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// FNV-1a over the ids, then mixed with `extra` (splitmix64).
fn hash_ids(ids: &[u32], extra: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &id in ids {
        for b in id.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100_0000_01b3);
        }
    }
    mix(h ^ extra)
}

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl SimWorker {
    pub fn new(cfg: SimConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                cfg,
                stats: Arc::new(SimStats::default()),
                live: Mutex::new(HashMap::new()),
                timelines: Mutex::new(HashMap::new()),
                serving: AtomicBool::new(true),
                hasher: std::collections::hash_map::RandomState::new(),
            }),
        }
    }

    pub fn config(&self) -> &SimConfig {
        &self.inner.cfg
    }

    pub fn stats(&self) -> Arc<SimStats> {
        Arc::clone(&self.inner.stats)
    }

    /// Makes `Health` answer NOT_SERVING (false) or SERVING (true).
    pub fn set_serving(&self, serving: bool) {
        self.inner.serving.store(serving, Ordering::SeqCst);
    }

    /// Takes the recorded timeline of a finished request (with `record_timeline`).
    pub fn take_timeline(&self, request_id: &str) -> Option<Timeline> {
        lock(&self.inner.timelines).remove(request_id)
    }

    fn kv_blocks_free(&self) -> u32 {
        let used = self.inner.stats.kv_blocks_used.load(Ordering::SeqCst);
        self.inner.cfg.kv_blocks_total.saturating_sub(used)
    }

    fn check(&self, req: &GenerateRequest) -> Result<(), Status> {
        let cfg = &self.inner.cfg;
        if req.request_id.is_empty() {
            return Err(Status::invalid_argument("request_id is empty"));
        }
        if req.prompt_tokens.is_empty() {
            return Err(Status::invalid_argument("prompt_tokens is empty"));
        }
        if let Some(&id) = req.prompt_tokens.iter().find(|&&id| id >= cfg.vocab_size) {
            return Err(Status::invalid_argument(format!(
                "prompt token {id} is outside the vocabulary of {}",
                cfg.vocab_size
            )));
        }
        if req.top_logprobs > 20 {
            return Err(Status::invalid_argument("top_logprobs must be at most 20"));
        }
        if req.prompt_tokens.len() >= cfg.max_context as usize {
            return Err(Status::invalid_argument(format!(
                "prompt of {} tokens does not fit the context of {}",
                req.prompt_tokens.len(),
                cfg.max_context
            )));
        }
        Ok(())
    }
}

/// Chooses the token at `pos`.
struct Picker {
    vocab: Vec<u32>,
    forced: Option<u32>,
    base: u64,
    script: Option<Vec<u32>>,
}

impl Picker {
    fn new(cfg: &SimConfig, req: &GenerateRequest, entropy: u64) -> Self {
        let sampling = req.sampling.clone().unwrap_or_default();
        let banned: HashSet<u32> =
            sampling.logit_bias.iter().filter(|(_, &b)| b <= -100.0).map(|(&id, _)| id).collect();
        let forced =
            sampling.logit_bias.iter().filter(|(_, &b)| b >= 100.0).map(|(&id, _)| id).min();
        let vocab: Vec<u32> = cfg.vocab.iter().copied().filter(|id| !banned.contains(id)).collect();
        let extra = match (sampling.seed, sampling.temperature > 0.0) {
            (Some(seed), _) => mix(seed),
            (None, true) => entropy,
            (None, false) => 0,
        };
        let script = cfg
            .replies
            .iter()
            .find(|r| {
                !r.needle.is_empty()
                    && req.prompt_tokens.windows(r.needle.len()).any(|w| w == r.needle.as_slice())
            })
            .map(|r| r.reply.clone());
        Self { vocab, forced, base: hash_ids(&req.prompt_tokens, extra), script }
    }

    /// The token at `pos`, or `None` when a scripted reply is over.
    fn pick(&self, pos: usize) -> Option<u32> {
        if let Some(script) = &self.script {
            return script.get(pos).copied();
        }
        if let Some(id) = self.forced {
            return Some(id);
        }
        if self.vocab.is_empty() {
            return Some(0);
        }
        let h = mix(self.base ^ (pos as u64).wrapping_mul(0x2545_f491_4f6c_dd1d));
        self.vocab.get((h % self.vocab.len() as u64) as usize).copied()
    }
}

fn token_event(index: u32, id: u32, top: u32, vocab: &[u32]) -> GenerateEvent {
    let lp = -0.1 * f64::from(1 + index % 5);
    let mut top_logprobs = Vec::with_capacity(top as usize);
    if top > 0 {
        top_logprobs.push(TokenLogprob { id, logprob: lp });
        for (k, &alt) in vocab.iter().filter(|&&v| v != id).take(top as usize - 1).enumerate() {
            top_logprobs.push(TokenLogprob { id: alt, logprob: lp - 0.5 * (k as f64 + 1.0) });
        }
    }
    GenerateEvent {
        event: Some(generate_event::Event::Token(TokenEvent {
            index,
            token: Some(TokenLogprob { id, logprob: lp }),
            top_logprobs,
        })),
    }
}

fn finished(reason: FinishReason, prompt: usize, completion: u32) -> GenerateEvent {
    GenerateEvent {
        event: Some(generate_event::Event::Finished(FinishedEvent {
            reason: reason as i32,
            prompt_tokens: prompt as u32,
            completion_tokens: completion,
            message: String::new(),
        })),
    }
}

/// Gives a sequence's KV blocks and live entry back, however it ends.
struct SeqGuard {
    sim: SimWorker,
    id: String,
    blocks: u32,
}

impl Drop for SeqGuard {
    fn drop(&mut self) {
        let s = &self.sim.inner.stats;
        s.kv_blocks_used.fetch_sub(self.blocks, Ordering::SeqCst);
        s.live.fetch_sub(1, Ordering::SeqCst);
        lock(&self.sim.inner.live).remove(&self.id);
    }
}

type EventStream = Pin<Box<dyn futures::Stream<Item = Result<GenerateEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Worker for SimWorker {
    type GenerateStream = EventStream;

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let received = Instant::now();
        let req = request.into_inner();
        self.check(&req)?;
        let cfg = &self.inner.cfg;
        let prompt_len = req.prompt_tokens.len();
        let room = cfg.max_context as usize - prompt_len;
        let budget = match req.max_tokens {
            0 => room,
            n => (n as usize).min(room),
        };
        let stop = Arc::new(Notify::new());
        {
            let mut live = lock(&self.inner.live);
            if live.contains_key(&req.request_id) {
                return Err(Status::already_exists("request_id is already live"));
            }
            live.insert(req.request_id.clone(), Live { stop: Arc::clone(&stop) });
        }
        let bt = cfg.kv_block_tokens.max(1) as usize;
        let blocks = (prompt_len + budget).div_ceil(bt) as u32;
        let stats = &self.inner.stats;
        stats.started.fetch_add(1, Ordering::SeqCst);
        stats.live.fetch_add(1, Ordering::SeqCst);
        stats.kv_blocks_used.fetch_add(blocks, Ordering::SeqCst);
        let guard = SeqGuard { sim: self.clone(), id: req.request_id.clone(), blocks };
        let entropy = {
            let mut h = self.inner.hasher.build_hasher();
            h.write_u128(received.elapsed().as_nanos());
            h.write(req.request_id.as_bytes());
            h.finish()
        };
        let picker = Picker::new(cfg, &req, entropy);
        let (tx, rx) = mpsc::channel::<Result<GenerateEvent, Status>>(32);
        let sim = self.clone();
        tokio::spawn(async move {
            let _guard = guard;
            let cfg = &sim.inner.cfg;
            let mut times = Vec::new();
            let started = tokio::time::Instant::now() + cfg.first_token_delay;
            let mut produced: u32 = 0;
            let reason = loop {
                if produced as usize >= budget {
                    break FinishReason::Length;
                }
                let due = started + cfg.token_interval * produced;
                tokio::select! {
                    _ = tokio::time::sleep_until(due) => {}
                    _ = stop.notified() => break FinishReason::Cancelled,
                    _ = tx.closed() => break FinishReason::Cancelled,
                }
                let id = match picker.pick(produced as usize) {
                    Some(id) => id,
                    // A scripted reply is over: end it the way a model ends a turn.
                    None => match req.stop_token_ids.first() {
                        Some(&eos) => eos,
                        None => break FinishReason::Length,
                    },
                };
                let ev = token_event(produced, id, req.top_logprobs, &cfg.vocab);
                if tx.send(Ok(ev)).await.is_err() {
                    break FinishReason::Cancelled;
                }
                if cfg.record_timeline {
                    times.push(Instant::now());
                }
                produced += 1;
                if req.stop_token_ids.contains(&id) {
                    break FinishReason::Stop;
                }
            };
            if reason == FinishReason::Cancelled {
                sim.inner.stats.cancelled.fetch_add(1, Ordering::SeqCst);
            }
            if cfg.record_timeline {
                lock(&sim.inner.timelines)
                    .insert(req.request_id.clone(), Timeline { received, tokens: times });
            }
            let _ = tx.send(Ok(finished(reason, prompt_len, produced))).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn cancel(
        &self,
        request: Request<CancelRequest>,
    ) -> Result<Response<CancelResponse>, Status> {
        let id = request.into_inner().request_id;
        let found = match lock(&self.inner.live).get(&id) {
            Some(l) => {
                l.stop.notify_one();
                true
            }
            None => false,
        };
        Ok(Response::new(CancelResponse { found }))
    }

    async fn info(
        &self,
        _request: Request<WorkerInfoRequest>,
    ) -> Result<Response<WorkerInfo>, Status> {
        let cfg = &self.inner.cfg;
        let live = self.inner.stats.live.load(Ordering::SeqCst);
        Ok(Response::new(WorkerInfo {
            model: cfg.model.clone(),
            arch: cfg.arch.clone(),
            config_hash: 0,
            max_context: cfg.max_context,
            kv_blocks_free: self.kv_blocks_free(),
            kv_blocks_total: cfg.kv_blocks_total,
            kv_block_tokens: cfg.kv_block_tokens,
            max_batch: cfg.max_batch,
            running: live.min(cfg.max_batch),
            waiting: live.saturating_sub(cfg.max_batch),
            experts_per_token: 0,
            devices: vec!["sim".into()],
        }))
    }

    async fn health(
        &self,
        _request: Request<HealthRequest>,
    ) -> Result<Response<HealthResponse>, Status> {
        let serving = self.inner.serving.load(Ordering::SeqCst);
        Ok(Response::new(HealthResponse {
            status: if serving { HealthStatus::Serving } else { HealthStatus::NotServing } as i32,
            message: if serving { String::new() } else { "simulated: not serving".into() },
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_are_deterministic_and_honour_bias() {
        let cfg = SimConfig::default();
        let req = GenerateRequest {
            request_id: "a".into(),
            prompt_tokens: vec![1, 2, 3],
            ..Default::default()
        };
        let a = Picker::new(&cfg, &req, 1);
        let b = Picker::new(&cfg, &req, 2);
        let ta: Vec<_> = (0..8).map(|i| a.pick(i)).collect();
        let tb: Vec<_> = (0..8).map(|i| b.pick(i)).collect();
        assert_eq!(ta, tb, "greedy ignores entropy");
        let mut biased = req.clone();
        let mut s = kt_proto::v1::SamplingParams::default();
        s.logit_bias.insert(u32::from(b'q'), 100.0);
        biased.sampling = Some(s);
        let p = Picker::new(&cfg, &biased, 0);
        assert!((0..5).all(|i| p.pick(i) == Some(u32::from(b'q'))));
    }
}
