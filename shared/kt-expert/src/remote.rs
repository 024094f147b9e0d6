//! [`RemoteExperts`]: the worker's side of the expert stream.
//!
//! One long-lived `Forward` stream per server (a *link*). At connect the client checks the
//! server with `Info` (same model config hash; and the same placement as expected: name,
//! plan, experts, slice) and, when the server is on the same host — same boot id and
//! `/dev/shm`, proved with a nonce through the ring itself — attaches a shared-memory ring to
//! the stream ([`ShmMode`]). Calls then go through the ring (spin-then-back-off polling) when
//! they fit a slot, and over the stream otherwise.
//!
//! Each [`Experts::forward`] call blocks (the seam is synchronous) until its answer arrives,
//! the link dies, or [`RemoteOptions::timeout`] passes. A dead link fails every waiting call
//! at once with the reason, and a background task reconnects with exponential backoff
//! (re-checking model and placement); calls made while it is down fail at once, and the same
//! `RemoteExperts` serves again as soon as the server is back.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use kt_models::{Experts, ModelError, Routing};
use kt_proto::shm::{self, Backoff, HostId, Layout, Ring, ShmError};
use kt_proto::v1::expert_client::ExpertClient;
use kt_proto::v1::{
    expert_response, ExpertInfo, ExpertInfoRequest, ExpertRequest, ExpertResponse, ExpertSlice,
    LayerExperts, ModelIdentity, PlanIdentity, ShmOpenRequest,
};
use kt_proto::{
    decode_tensor_f32, encode_request, hash_hex, WireDType, CONFIG_HASH_HEADER, SHM_RING_HEADER,
    SHM_STATUS_HEADER,
};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::Streaming;

use crate::ExpertError;

/// Whether calls may go through shared memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ShmMode {
    /// Use a ring when both sides prove they share memory; gRPC otherwise.
    #[default]
    Auto,
    /// gRPC only.
    Off,
    /// A ring or nothing: connecting fails when it cannot be proved and attached.
    Required,
}

/// Which transport a link uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkKind {
    /// Calls that fit a slot go through a shared-memory ring (the rest over gRPC).
    Shm,
    /// Every call over the gRPC stream.
    Grpc,
}

/// What a server must hold, checked at connect and at every reconnect.
#[derive(Debug, Clone, PartialEq)]
pub struct Holding {
    /// `Info.name`.
    pub name: String,
    /// `Info.plan`; `None` = started without a plan.
    pub plan: Option<PlanIdentity>,
    /// `Info.held`.
    pub held: Vec<LayerExperts>,
    /// `Info.slice`.
    pub slice: Option<ExpertSlice>,
}

impl Holding {
    /// What `info` says the server holds.
    pub fn of(info: &ExpertInfo) -> Self {
        Self {
            name: info.name.clone(),
            plan: info.plan.clone(),
            held: info.held.clone(),
            slice: info.slice,
        }
    }

    /// The first way `info` differs from `self`, in words.
    pub fn mismatch(&self, info: &ExpertInfo) -> Option<String> {
        if info.name != self.name {
            return Some(format!("it is named `{}`, `{}` was expected", info.name, self.name));
        }
        if info.plan != self.plan {
            let show = |p: &Option<PlanIdentity>| match p {
                Some(p) => format!("plan `{}` (hash {})", p.file, hash_hex(p.hash)),
                None => "no plan".to_string(),
            };
            return Some(format!(
                "it was started from {}, this worker expects {}",
                show(&info.plan),
                show(&self.plan)
            ));
        }
        if info.slice != self.slice {
            let show = |s: &Option<ExpertSlice>| match s {
                Some(s) => format!("rows {}..{} of {}", s.start, s.end, s.expert_ff),
                None => "whole experts".to_string(),
            };
            return Some(format!(
                "it holds {}, this worker expects {}",
                show(&info.slice),
                show(&self.slice)
            ));
        }
        if info.held != self.held {
            let count = |h: &[LayerExperts]| h.iter().map(|l| l.experts.len()).sum::<usize>();
            let first = info
                .held
                .iter()
                .zip(&self.held)
                .find(|(a, b)| a != b)
                .map(|(a, _)| a.layer)
                .or_else(|| self.held.get(info.held.len()).map(|l| l.layer))
                .or_else(|| info.held.get(self.held.len()).map(|l| l.layer));
            return Some(format!(
                "it holds {} experts in {} layers, this worker expects {} in {} (first difference at layer {})",
                count(&info.held),
                info.held.len(),
                count(&self.held),
                self.held.len(),
                first.map_or_else(|| "?".into(), |l| l.to_string())
            ));
        }
        None
    }
}

/// Client settings.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// Longest wait for one answer before the call fails.
    pub timeout: Duration,
    /// Longest wait for the connection, `Info` and the stream to open.
    pub connect_timeout: Duration,
    /// Element type of hidden states on the wire (answers come back in the same).
    pub dtype: WireDType,
    /// Largest message sent or accepted, in bytes.
    pub max_message_bytes: usize,
    /// Shared memory: automatic, off (force gRPC), or required.
    pub shm: ShmMode,
    /// The shared-memory directory (normally `/dev/shm`).
    pub shm_dir: PathBuf,
    /// Ring slots: calls in flight at once through the ring (more go over gRPC).
    pub shm_slots: usize,
    /// Tokens a ring slot holds (bigger calls go over gRPC).
    pub shm_max_tokens: usize,
    /// How long a call waiting on the ring busy-spins before it yields the CPU (then, after
    /// 2 ms, sleeps in 50 µs steps). Default 0: yield at once, which costs ~1 µs where cores
    /// are free and keeps an oversubscribed host from starving the server's poller.
    pub shm_spin: Duration,
    /// How long a call waiting for a gRPC answer polls for it (yielding the CPU between
    /// looks) before it blocks: an answer that comes within it is taken without a sleep and a
    /// wake-up.
    pub reply_poll: Duration,
    /// First wait before reconnecting a dead link; doubled after each failure…
    pub reconnect_initial: Duration,
    /// …up to this.
    pub reconnect_max: Duration,
    /// How long the first connect keeps retrying a server that cannot be reached yet
    /// (refused, no answer, `Info` failing): tiers started together need not be started in
    /// order. Zero: fail at once. A server that answers with the wrong model or placement
    /// fails at once either way.
    pub start_wait: Duration,
    /// What the server must hold; `None` = whatever it held at the first connect.
    pub expect: Option<Holding>,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            dtype: WireDType::F32,
            max_message_bytes: kt_proto::Limits::default().max_message_bytes,
            shm: ShmMode::Auto,
            shm_dir: PathBuf::from(crate::server::DEFAULT_SHM_DIR),
            shm_slots: 4,
            shm_max_tokens: 256,
            shm_spin: Duration::ZERO,
            reply_poll: Duration::from_micros(100),
            reconnect_initial: Duration::from_millis(50),
            reconnect_max: Duration::from_secs(2),
            start_wait: Duration::ZERO,
            expect: None,
        }
    }
}

/// Why a gRPC call got no values.
#[derive(Debug)]
enum Failure {
    /// The server answered with an error (or an answer that does not decode).
    Refused(String),
    /// The stream ended before the answer.
    Lost(String),
}

type Reply = oneshot::Sender<Result<Vec<f32>, Failure>>;

/// A ring attached to a link.
struct ShmLink {
    ring: Ring,
    /// Slots no call is using.
    free: Mutex<Vec<usize>>,
    /// Slots whose caller gave up (timeout) before the answer came; reclaimed once answered.
    abandoned: Mutex<Vec<usize>>,
    next_seq: AtomicU64,
    /// Set when the ring broke (corrupt contents, closed by the server): calls use gRPC.
    broken: AtomicBool,
}

impl ShmLink {
    fn acquire(&self) -> Option<usize> {
        if self.broken.load(Ordering::Relaxed) {
            return None;
        }
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        if free.is_empty() {
            let mut ab = self.abandoned.lock().unwrap_or_else(PoisonError::into_inner);
            ab.retain(|&s| {
                let answered = self.ring.reclaim(s).unwrap_or(false);
                if answered {
                    free.push(s);
                }
                !answered
            });
        }
        free.pop()
    }

    fn release(&self, slot: usize) {
        self.free.lock().unwrap_or_else(PoisonError::into_inner).push(slot);
    }

    fn abandon(&self, slot: usize) {
        self.abandoned.lock().unwrap_or_else(PoisonError::into_inner).push(slot);
    }

    fn break_with(&self, why: &str) {
        if !self.broken.swap(true, Ordering::Relaxed) {
            tracing::warn!(%why, "shared-memory ring unusable; calls go over gRPC");
        }
    }
}

/// One connection: the stream's sender, maybe a ring, and whether it died.
struct Link {
    /// The stream's sender; taken (ending the stream) when the client is dropped.
    tx: Mutex<Option<mpsc::UnboundedSender<ExpertRequest>>>,
    shm: Option<ShmLink>,
    dead: AtomicBool,
}

#[derive(Default)]
struct State {
    /// Waiting gRPC calls: request id → (tokens, reply slot).
    pending: HashMap<u64, (usize, Reply)>,
    /// The live link, if any.
    link: Option<Arc<Link>>,
    /// Why there is no live link.
    down: Option<String>,
    /// Why the last link does not use shared memory (when it does not).
    shm_note: Option<String>,
}

/// Everything the background tasks share with the calls.
struct Core {
    addr: String,
    ours: ModelIdentity,
    opts: RemoteOptions,
    expect: Mutex<Option<Holding>>,
    state: Mutex<State>,
    /// Calls driving (or waiting to drive) the runtime now.
    callers: AtomicUsize,
    /// When the last call began, in µs since `epoch`.
    last_call_us: AtomicU64,
    epoch: Instant,
    /// Tells the idle driver to hand the runtime back to a call.
    release: Notify,
    /// Set when the client is dropped: the idle driver stops, no reconnects start.
    stopping: AtomicBool,
    /// Notified when a stream's dispatcher ends.
    stream_ended: Notify,
}

impl Core {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn gone(&self, reason: &str) -> ModelError {
        ModelError::Experts(format!("expert server {} is unavailable: {reason}", self.addr))
    }
}

/// Routed experts on an expert server, over one gRPC stream and, on the same host, a
/// shared-memory ring.
pub struct RemoteExperts {
    core: Arc<Core>,
    info: ExpertInfo,
    hidden: usize,
    next_id: AtomicU64,
    runtime: Option<Arc<tokio::runtime::Runtime>>,
    idle_driver: Option<std::thread::JoinHandle<()>>,
}

/// The client's connection work (HTTP/2, the stream's dispatcher, reconnects) runs on a
/// single-threaded runtime that each call drives itself while it waits for its answer: the
/// request is written and the answer read on the caller's thread, with no hand-off to a
/// runtime thread and back (each such wake-up costs several µs, more in a VM). Between calls
/// the idle driver thread drives it, so that keep-alives, a closed stream and reconnects are
/// handled while no call is made; it takes the runtime only after [`IDLE_AFTER`] without
/// calls and gives it back as soon as a call comes.
const IDLE_AFTER: Duration = Duration::from_millis(5);
/// Longest stretch the idle driver holds the runtime before it looks again.
const IDLE_SLICE: Duration = Duration::from_millis(50);

fn idle_driver(rt: Arc<tokio::runtime::Runtime>, core: Arc<Core>) {
    while !core.stopping.load(Ordering::Acquire) {
        let since = core.epoch.elapsed().as_micros() as u64;
        let idle =
            Duration::from_micros(since.saturating_sub(core.last_call_us.load(Ordering::Relaxed)));
        if core.callers.load(Ordering::Acquire) == 0 && idle >= IDLE_AFTER {
            rt.block_on(async {
                tokio::select! {
                    () = tokio::time::sleep(IDLE_SLICE) => {}
                    () = core.release.notified() => {}
                }
            });
        } else {
            std::thread::sleep(IDLE_AFTER);
        }
    }
}

impl std::fmt::Debug for RemoteExperts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteExperts").field("addr", &self.core.addr).finish_non_exhaustive()
    }
}

impl RemoteExperts {
    /// Connects to the server at `addr` (`host:port` or a URI), checks with `Info` that it
    /// serves the model `ours` (and holds `opts.expect`, when set), attaches a shared-memory
    /// ring when allowed and proved, and opens the stream.
    pub fn connect(
        addr: &str,
        ours: &ModelIdentity,
        opts: RemoteOptions,
    ) -> Result<Self, ExpertError> {
        Self::open(addr, ours, opts, false)
    }

    /// Like [`RemoteExperts::connect`] (one attempt, no `start_wait`), but a server that
    /// cannot be reached yet is not an error: the client starts disconnected
    /// ([`RemoteExperts::connected`] is false, calls fail at once with the reason) and keeps
    /// reconnecting in the background, checking the server as `connect` does once it
    /// answers. A server that answers and does not match (model, placement) is still an
    /// error. `info()` is empty until a first connect.
    pub fn connect_or_retry(
        addr: &str,
        ours: &ModelIdentity,
        opts: RemoteOptions,
    ) -> Result<Self, ExpertError> {
        Self::open(addr, ours, opts, true)
    }

    /// Why the client has no live link, while it has none.
    pub fn down_reason(&self) -> Option<String> {
        let st = self.core.lock();
        if st.link.is_some() {
            None
        } else {
            Some(st.down.clone().unwrap_or_else(|| "not connected".into()))
        }
    }

    fn open(
        addr: &str,
        ours: &ModelIdentity,
        opts: RemoteOptions,
        unreachable_ok: bool,
    ) -> Result<Self, ExpertError> {
        let runtime = Arc::new(
            tokio::runtime::Builder::new_current_thread()
                .thread_name("kt-remote-experts")
                .enable_all()
                .build()?,
        );
        let core = Arc::new(Core {
            addr: addr.to_string(),
            ours: ours.clone(),
            expect: Mutex::new(opts.expect.clone()),
            opts,
            state: Mutex::new(State::default()),
            callers: AtomicUsize::new(0),
            last_call_us: AtomicU64::new(0),
            epoch: Instant::now(),
            release: Notify::new(),
            stopping: AtomicBool::new(false),
            stream_ended: Notify::new(),
        });
        let first = if unreachable_ok {
            runtime.block_on(establish(core.clone()))
        } else {
            runtime.block_on(first_connect(core.clone()))
        };
        let info = match first {
            Ok(info) => {
                tracing::info!(
                    addr,
                    name = %info.name,
                    transport = ?core.lock().link.as_ref().map(|l| kind_of(l)),
                    "connected to expert server"
                );
                info
            }
            Err(ExpertError::Connect { reason, .. }) if unreachable_ok => {
                tracing::info!(addr, %reason, "expert server unreachable; retrying in the background");
                core.lock().down = Some(reason.clone());
                runtime.spawn(reconnect(core.clone(), reason));
                ExpertInfo::default()
            }
            Err(e) => return Err(e),
        };
        let driver = std::thread::Builder::new().name("kt-remote-idle".into()).spawn({
            let (rt, core) = (runtime.clone(), core.clone());
            move || idle_driver(rt, core)
        })?;
        Ok(Self {
            core,
            info,
            hidden: ours.hidden as usize,
            next_id: AtomicU64::new(0),
            runtime: Some(runtime),
            idle_driver: Some(driver),
        })
    }

    /// What the server said about itself at the first connect.
    pub fn info(&self) -> &ExpertInfo {
        &self.info
    }

    /// The transport of the live link (`None` while disconnected).
    pub fn transport(&self) -> Option<LinkKind> {
        let st = self.core.lock();
        st.link.as_ref().map(|l| kind_of(l))
    }

    /// Why the live link does not use shared memory, when it does not.
    pub fn shm_note(&self) -> Option<String> {
        self.core.lock().shm_note.clone()
    }

    /// Whether a link is up (false while reconnecting).
    pub fn connected(&self) -> bool {
        self.core.lock().link.is_some()
    }

    /// `owns[layer][expert]` for a model of `n_layers` × `n_experts`, from `Info`.
    pub fn owns(&self, n_layers: usize, n_experts: usize) -> Vec<Vec<bool>> {
        let mut owns = vec![vec![false; n_experts]; n_layers];
        for l in &self.info.held {
            if let Some(row) = owns.get_mut(l.layer as usize) {
                for &e in &l.experts {
                    if let Some(slot) = row.get_mut(e as usize) {
                        *slot = true;
                    }
                }
            }
        }
        owns
    }

    fn forward_shm(
        &self,
        link: &Link,
        shm: &ShmLink,
        slot: usize,
        layer: usize,
        hidden: &[f32],
        routing: &Routing,
    ) -> Option<Result<Vec<f32>, ModelError>> {
        let core = &self.core;
        let (h, dtype) = (self.hidden, core.opts.dtype);
        let n = hidden.len() / h;
        let seq = shm.next_seq.fetch_add(1, Ordering::Relaxed);
        let ring = &shm.ring;
        let posted = ring.post_request(
            slot,
            seq,
            layer,
            hidden,
            h,
            &routing.ids,
            &routing.weights,
            routing.k,
            dtype,
        );
        match posted {
            Ok(()) => {}
            Err(ShmError::TooLarge(_)) => {
                shm.release(slot);
                return None; // over gRPC instead
            }
            Err(e) => {
                shm.break_with(&e.to_string());
                return Some(Err(ModelError::Experts(format!("expert server {}: {e}", core.addr))));
            }
        }
        let broken = |e: String| {
            shm.break_with(&e);
            Some(Err(ModelError::Experts(format!("expert server {}: {e}", core.addr))))
        };
        let mut backoff = Backoff::new(core.opts.shm_spin);
        loop {
            match ring.slot_state(slot) {
                Ok(shm::RESPONSE) => break,
                Ok(shm::REQUEST | shm::TAKEN) => {}
                Ok(other) => {
                    return broken(format!(
                        "shared-memory ring is corrupt: slot {slot} went to state {other} while waiting"
                    ))
                }
                Err(e) => return broken(e.to_string()),
            }
            if link.dead.load(Ordering::Acquire) {
                shm.abandon(slot);
                let why = core.lock().down.clone().unwrap_or_else(|| "the stream ended".into());
                return Some(Err(core.gone(&why)));
            }
            if ring.ring_state() == shm::RING_CLOSED {
                return broken("the server closed the shared-memory ring".into());
            }
            if backoff.elapsed() > core.opts.timeout {
                shm.abandon(slot);
                return Some(Err(ModelError::Experts(format!(
                    "expert server {} did not answer layer {layer} within {:?} (shared memory)",
                    core.addr, core.opts.timeout
                ))));
            }
            backoff.snooze();
        }
        match ring.take_response(slot, seq, n, h, dtype) {
            Ok(Ok(out)) => {
                shm.release(slot);
                Some(Ok(out))
            }
            Ok(Err((code, msg))) => {
                shm.release(slot);
                let code = i32::try_from(code)
                    .ok()
                    .and_then(|c| kt_proto::v1::expert_error::Code::try_from(c).ok())
                    .map_or("unknown error", |c| c.as_str_name());
                Some(Err(ModelError::ExpertsRefused(format!(
                    "expert server {}: {code}: {msg}",
                    core.addr
                ))))
            }
            Err(e) => broken(e.to_string()),
        }
    }
}

/// A call that drives the runtime: the idle driver stays away (and hands the runtime back
/// if it holds it) while one is counted.
struct Driving<'a>(&'a Core);

impl<'a> Driving<'a> {
    fn begin(core: &'a Core) -> Self {
        core.callers.fetch_add(1, Ordering::AcqRel);
        core.last_call_us.store(core.epoch.elapsed().as_micros() as u64, Ordering::Relaxed);
        core.release.notify_one();
        Driving(core)
    }
}

impl Drop for Driving<'_> {
    fn drop(&mut self) {
        self.0.callers.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why no answer came.
enum NoAnswer {
    /// The stream was closed before the request could be sent.
    NotSent,
    Timeout,
    Disconnected,
}

impl RemoteExperts {
    /// Sends a gRPC request (`send` queues it on the stream; false: the stream is closed) and
    /// waits for its answer, driving the client's runtime on this thread (see [`IDLE_AFTER`]):
    /// for `reply_poll` it yields between looks (the runtime polls the socket without sleeping
    /// each time), then it sleeps until the answer, the stream's end or the timeout.
    fn wait_answer(
        &self,
        send: impl FnOnce() -> bool + Send,
        answer: oneshot::Receiver<Result<Vec<f32>, Failure>>,
    ) -> Result<Result<Vec<f32>, Failure>, NoAnswer> {
        let core = &self.core;
        let Some(rt) = self.runtime.as_ref() else { return Err(NoAnswer::Disconnected) };
        let (timeout, poll) = (core.opts.timeout, core.opts.reply_poll.min(core.opts.timeout));
        let wait = async move {
            // Sent from inside the runtime: waking the stream's task is then a local
            // schedule, not a remote one that writes the runtime's eventfd.
            if !send() {
                return Err(NoAnswer::NotSent);
            }
            match tokio::time::timeout(timeout, poll_then_await(answer, poll)).await {
                Ok(Some(v)) => Ok(v),
                Ok(None) => Err(NoAnswer::Disconnected),
                Err(_) => Err(NoAnswer::Timeout),
            }
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            // Called from inside some async runtime, where `block_on` is not allowed: wait
            // on a thread of its own (slower, and only seen in tests).
            return std::thread::scope(|s| {
                s.spawn(|| rt.block_on(wait)).join().unwrap_or(Err(NoAnswer::Disconnected))
            });
        }
        rt.block_on(wait)
    }
}

/// An answer from another thread: re-polled for `poll` (the task yields between looks, so the
/// thread driving it stays awake and takes an early answer without a wake-up), then awaited
/// asleep. `None` if the sender was dropped. Both ends of a gRPC call wait this way.
pub(crate) async fn poll_then_await<T>(
    mut answer: oneshot::Receiver<T>,
    poll: Duration,
) -> Option<T> {
    let start = Instant::now();
    while start.elapsed() < poll {
        match answer.try_recv() {
            Ok(v) => return Some(v),
            Err(oneshot::error::TryRecvError::Closed) => return None,
            Err(oneshot::error::TryRecvError::Empty) => tokio::task::yield_now().await,
        }
    }
    answer.await.ok()
}

fn kind_of(link: &Link) -> LinkKind {
    match &link.shm {
        Some(s) if !s.broken.load(Ordering::Relaxed) => LinkKind::Shm,
        _ => LinkKind::Grpc,
    }
}

impl Experts for RemoteExperts {
    fn forward(
        &self,
        layer: usize,
        hidden: &[f32],
        routing: &Routing,
    ) -> Result<Vec<f32>, ModelError> {
        let h = self.hidden;
        if hidden.len().checked_rem(h) != Some(0) {
            return Err(ModelError::Input(format!("{} values are not rows of {h}", hidden.len())));
        }
        let n = hidden.len() / h;
        let core = &self.core;
        let link = {
            let st = core.lock();
            match &st.link {
                Some(l) => l.clone(),
                None => {
                    let why = st.down.clone().unwrap_or_else(|| "not connected".into());
                    return Err(core.gone(&why));
                }
            }
        };
        if let Some(shm) = &link.shm {
            if n <= core.opts.shm_max_tokens {
                if let Some(slot) = shm.acquire() {
                    if let Some(res) = self.forward_shm(&link, shm, slot, layer, hidden, routing) {
                        return res;
                    }
                }
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        {
            let mut st = core.lock();
            if link.dead.load(Ordering::Acquire) {
                let why = st.down.clone().unwrap_or_else(|| "the stream ended".into());
                return Err(core.gone(&why));
            }
            st.pending.insert(id, (n, reply));
        }
        let req = encode_request(id, layer, hidden, h, routing, core.opts.dtype);
        let forget = || {
            core.lock().pending.remove(&id);
        };
        let _driving = Driving::begin(core);
        let send = move || {
            link.tx
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_ref()
                .is_some_and(|tx| tx.send(req).is_ok())
        };
        match self.wait_answer(send, answer) {
            Err(NoAnswer::NotSent) => {
                forget();
                Err(core.gone("the stream is closed"))
            }
            Ok(Ok(out)) => Ok(out),
            Ok(Err(Failure::Refused(reason))) => {
                Err(ModelError::ExpertsRefused(format!("expert server {}: {reason}", core.addr)))
            }
            Ok(Err(Failure::Lost(reason))) => {
                Err(ModelError::Experts(format!("expert server {}: {reason}", core.addr)))
            }
            Err(NoAnswer::Timeout) => {
                forget();
                Err(ModelError::Experts(format!(
                    "expert server {} did not answer layer {layer} within {:?}",
                    core.addr, core.opts.timeout
                )))
            }
            Err(NoAnswer::Disconnected) => Err(core.gone("the stream ended")),
        }
    }
}

impl Drop for RemoteExperts {
    /// Ends the stream cleanly (the server sees the client finish, not a broken connection),
    /// waiting for that at most [`CLOSE_WAIT`], then stops the runtime.
    fn drop(&mut self) {
        let core = &self.core;
        core.stopping.store(true, Ordering::Release);
        core.release.notify_one();
        if let Some(t) = self.idle_driver.take() {
            let _ = t.join();
        }
        let link = core.lock().link.take();
        let open = link.and_then(|l| l.tx.lock().unwrap_or_else(PoisonError::into_inner).take());
        if let Some(rt) = self.runtime.take().and_then(|rt| Arc::try_unwrap(rt).ok()) {
            if open.is_some() && tokio::runtime::Handle::try_current().is_err() {
                drop(open);
                rt.block_on(async {
                    let _ = tokio::time::timeout(CLOSE_WAIT, core.stream_ended.notified()).await;
                });
            }
            rt.shutdown_background();
        }
    }
}

/// How long dropping a client waits for its stream to close.
const CLOSE_WAIT: Duration = Duration::from_millis(200);

/// The first connect: [`establish`], retried while the server cannot be reached and
/// `start_wait` lasts (backing off from `reconnect_initial` to `reconnect_max`, a line in the
/// log every few seconds).
async fn first_connect(core: Arc<Core>) -> Result<ExpertInfo, ExpertError> {
    let deadline = Instant::now() + core.opts.start_wait;
    let mut pause = core.opts.reconnect_initial;
    let mut logged: Option<Instant> = None;
    loop {
        match establish(core.clone()).await {
            Err(ExpertError::Connect { reason, .. }) if Instant::now() + pause < deadline => {
                if logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
                    let left = deadline.saturating_duration_since(Instant::now());
                    tracing::info!(
                        addr = %core.addr,
                        %reason,
                        "waiting for the expert server ({:.0} s left)",
                        left.as_secs_f64()
                    );
                    logged = Some(Instant::now());
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(core.opts.reconnect_max);
            }
            other => return other,
        }
    }
}

/// Connects (or reconnects) `core`: channel, `Info` and its checks, a ring when allowed and
/// proved, the stream and its dispatcher. Installs the new link; returns the `Info`.
/// (Boxed: it spawns the dispatcher, which spawns the reconnect loop, which calls it.)
fn establish(
    core: Arc<Core>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<ExpertInfo, ExpertError>> + Send>> {
    Box::pin(establish_link(core))
}

async fn establish_link(core: Arc<Core>) -> Result<ExpertInfo, ExpertError> {
    let addr = core.addr.clone();
    let opts = &core.opts;
    let conn = |reason: String| ExpertError::Connect { addr: addr.clone(), reason };
    let uri = if addr.contains("://") { addr.clone() } else { format!("http://{addr}") };
    let endpoint = Endpoint::from_shared(uri)
        .map_err(|e| conn(e.to_string()))?
        .connect_timeout(opts.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(opts.timeout)
        .keep_alive_while_idle(true)
        // Large windows: a prefill chunk of hidden states is megabytes, and HTTP/2's default
        // 64 KiB window would make it wait for window updates round trip after round trip.
        .initial_stream_window_size(Some(16 << 20))
        .initial_connection_window_size(Some(32 << 20));
    let channel = tokio::time::timeout(opts.connect_timeout, endpoint.connect())
        .await
        .map_err(|_| conn(format!("no connection within {:?}", opts.connect_timeout)))?
        .map_err(|e| conn(format!("{e} ({})", source_chain(&e))))?;
    let mut client = ExpertClient::new(channel)
        .max_decoding_message_size(opts.max_message_bytes)
        .max_encoding_message_size(opts.max_message_bytes);
    let info = tokio::time::timeout(
        opts.connect_timeout,
        client.info(ExpertInfoRequest { expected_config_hash: 0 }),
    )
    .await
    .map_err(|_| conn(format!("no Info answer within {:?}", opts.connect_timeout)))?
    .map_err(|s| conn(format!("Info: {}", s.message())))?
    .into_inner();
    let theirs = info.model.clone().ok_or_else(|| ExpertError::Protocol {
        addr: addr.clone(),
        reason: "Info carries no model identity".into(),
    })?;
    let ours = &core.ours;
    if theirs.config_hash != ours.config_hash {
        return Err(ExpertError::ModelMismatch {
            addr: addr.clone(),
            ours: ours.name.clone(),
            ours_hash: ours.config_hash,
            theirs: theirs.name,
            theirs_hash: theirs.config_hash,
        });
    }
    {
        let mut expect = core.expect.lock().unwrap_or_else(PoisonError::into_inner);
        match expect.as_ref() {
            Some(want) => {
                if let Some(reason) = want.mismatch(&info) {
                    return Err(ExpertError::PlacementMismatch { addr: addr.clone(), reason });
                }
            }
            None => *expect = Some(Holding::of(&info)),
        }
    }
    let (ring, shm_note) = match opts.shm {
        ShmMode::Off => (None, Some("shared memory is off (--expert-transport grpc)".to_string())),
        ShmMode::Auto | ShmMode::Required => match open_ring(&mut client, &core, &info).await {
            Ok(ring) => (Some(ring), None),
            Err(why) if opts.shm == ShmMode::Required => {
                return Err(conn(format!("shared memory is required: {why}")))
            }
            Err(why) => {
                tracing::info!(%addr, %why, "not using shared memory; gRPC only");
                (None, Some(why))
            }
        },
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let mut request = tonic::Request::new(UnboundedReceiverStream::new(rx));
    let hash = hash_hex(ours.config_hash)
        .parse()
        .map_err(|_| conn("config hash is not valid metadata".into()))?;
    request.metadata_mut().insert(CONFIG_HASH_HEADER, hash);
    if let Some((name, _)) = &ring {
        let v = name.parse().map_err(|_| conn("ring name is not valid metadata".into()))?;
        request.metadata_mut().insert(SHM_RING_HEADER, v);
    }
    let response = tokio::time::timeout(opts.connect_timeout, client.forward(request))
        .await
        .map_err(|_| conn(format!("the stream did not open within {:?}", opts.connect_timeout)))?
        .map_err(|s| conn(format!("Forward refused: {}", s.message())))?;
    let (shm, shm_note) = match ring {
        None => (None, shm_note),
        Some((_, ring)) => {
            let status = response
                .metadata()
                .get(SHM_STATUS_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("(no answer)")
                .to_string();
            if status == "attached" && ring.ring_state() == shm::RING_SERVING {
                let slots = ring.layout().slots;
                (
                    Some(ShmLink {
                        ring,
                        free: Mutex::new((0..slots).rev().collect()),
                        abandoned: Mutex::new(Vec::new()),
                        next_seq: AtomicU64::new(1),
                        broken: AtomicBool::new(false),
                    }),
                    None,
                )
            } else if opts.shm == ShmMode::Required {
                return Err(conn(format!("shared memory is required, the server said: {status}")));
            } else {
                (None, Some(format!("the server did not attach the ring: {status}")))
            }
        }
    };
    let inbound = response.into_inner();
    let link = Arc::new(Link { tx: Mutex::new(Some(tx)), shm, dead: AtomicBool::new(false) });
    {
        let mut st = core.lock();
        st.link = Some(link.clone());
        st.down = None;
        st.shm_note = shm_note;
    }
    tokio::spawn(dispatch(inbound, core.clone(), link));
    Ok(info)
}

/// Asks the server for a ring after checking the host proof, maps it and acknowledges the
/// nonce. Errors are reasons to stay on gRPC.
async fn open_ring(
    client: &mut ExpertClient<Channel>,
    core: &Core,
    info: &ExpertInfo,
) -> Result<(String, Ring), String> {
    let opts = &core.opts;
    let theirs = info
        .shm
        .as_ref()
        .and_then(HostId::from_proto)
        .ok_or_else(|| "the server offers no shared memory".to_string())?;
    let here = HostId::of(&opts.shm_dir).map_err(|e| e.to_string())?;
    if let Some(why) = here.differs(&theirs) {
        return Err(why);
    }
    let max_tokens = opts.shm_max_tokens.min(info.max_tokens.max(1) as usize).max(1);
    let k = (core.ours.top_k as usize).max(1);
    let layout = Layout::for_calls(
        opts.shm_slots.clamp(1, shm::MAX_SLOTS),
        max_tokens,
        core.ours.hidden as usize,
        k,
        opts.dtype,
    )
    .filter(|l| l.slot_bytes as u64 <= info.max_message_bytes)
    .ok_or_else(|| format!("{max_tokens} tokens per slot exceed the server's message limit"))?;
    let offer = tokio::time::timeout(
        opts.connect_timeout,
        client.open_shm(ShmOpenRequest {
            config_hash: core.ours.config_hash,
            host: Some(here.to_proto()),
            slots: layout.slots as u32,
            slot_bytes: layout.slot_bytes as u64,
        }),
    )
    .await
    .map_err(|_| "OpenShm timed out".to_string())?
    .map_err(|s| format!("OpenShm: {}", s.message()))?
    .into_inner();
    if offer.slots as usize != layout.slots
        || offer.slot_bytes != layout.slot_bytes as u64
        || layout.size().map(|s| s as u64) != Some(offer.size)
    {
        return Err(format!(
            "the server offered {} slots of {} bytes ({} in all), {} of {} were asked",
            offer.slots, offer.slot_bytes, offer.size, layout.slots, layout.slot_bytes
        ));
    }
    let dir = opts.shm_dir.clone();
    let name = offer.name.clone();
    let ring = tokio::task::spawn_blocking(move || Ring::open(&dir, &name, layout, offer.nonce))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    Ok((offer.name, ring))
}

/// Hands each answer to its waiting call; when the stream ends, fails all of them, marks the
/// link dead and starts reconnecting.
async fn dispatch(mut inbound: Streaming<ExpertResponse>, core: Arc<Core>, link: Arc<Link>) {
    let hidden = core.ours.hidden as usize;
    let reason = loop {
        match inbound.message().await {
            Ok(Some(resp)) => {
                let slot = core.lock().pending.remove(&resp.request_id);
                let Some((n, reply)) = slot else {
                    tracing::debug!(
                        id = resp.request_id,
                        "answer for no waiting call (timed out?)"
                    );
                    continue;
                };
                let _ = reply.send(answer(resp, n, hidden).map_err(Failure::Refused));
            }
            Ok(None) => break "the server closed the stream".to_string(),
            Err(status) => break format!("{} ({:?})", status.message(), status.code()),
        }
    };
    core.stream_ended.notify_one();
    if core.stopping.load(Ordering::Acquire) {
        tracing::debug!(addr = %core.addr, %reason, "expert stream closed");
        return;
    }
    tracing::warn!(addr = %core.addr, %reason, "expert stream ended; reconnecting");
    {
        let mut st = core.lock();
        link.dead.store(true, Ordering::Release);
        st.link = None;
        st.down = Some(reason.clone());
        for (_, (_, reply)) in st.pending.drain() {
            let _ = reply.send(Err(Failure::Lost(reason.clone())));
        }
    }
    drop(link);
    tokio::spawn(reconnect(core, reason));
}

/// Reconnects with exponential backoff until it works (or the client is dropped, which stops
/// the runtime this runs on).
async fn reconnect(core: Arc<Core>, reason: String) {
    let mut delay = core.opts.reconnect_initial.max(Duration::from_millis(1));
    loop {
        tokio::time::sleep(delay).await;
        match establish(core.clone()).await {
            Ok(_) => {
                tracing::info!(addr = %core.addr, "expert server reconnected");
                return;
            }
            Err(err) => {
                tracing::debug!(addr = %core.addr, %err, ?delay, "reconnect failed");
                core.lock().down = Some(format!("{reason}; reconnecting: {err}"));
                delay = (delay * 2).min(core.opts.reconnect_max.max(delay));
            }
        }
    }
}

fn answer(resp: ExpertResponse, n: usize, hidden: usize) -> Result<Vec<f32>, String> {
    match resp.result {
        Some(expert_response::Result::Output(t)) => {
            let (values, shape, _) =
                decode_tensor_f32(&t, n * hidden).map_err(|e| e.to_string())?;
            if shape != [n, hidden] {
                return Err(format!("answered shape {shape:?} for [{n}, {hidden}]"));
            }
            Ok(values)
        }
        Some(expert_response::Result::Error(e)) => Err(format!(
            "{}: {}",
            kt_proto::v1::expert_error::Code::try_from(e.code)
                .map_or("unknown error", |c| c.as_str_name()),
            e.message
        )),
        None => Err("an empty answer".into()),
    }
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        parts.push(s.to_string());
        cur = s.source();
    }
    parts.join(": ")
}
