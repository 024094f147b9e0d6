//! The `kt.v1.Expert` service over held experts.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use kt_models::moe::{ExpertKernel, FusedConfig};
use kt_models::{load_experts, Experts, LocalExperts, MatmulMode, ModelConfig, ModelError};
use kt_plan::ExpertFormat;
use kt_proto::shm::{self, Backoff, HostId, Layout, Ring};
use kt_proto::v1::expert_error::Code;
use kt_proto::v1::expert_server::{Expert, ExpertServer};
use kt_proto::v1::health_response::Status as Serving;
use kt_proto::v1::{
    expert_response, ExpertError as WireExpertError, ExpertInfo, ExpertInfoRequest, ExpertRequest,
    ExpertResponse, HealthRequest, HealthResponse, LayerExperts, ModelIdentity, ShmOffer,
    ShmOpenRequest,
};
use kt_proto::{
    decode_request, encode_tensor_f32, finish_call, hash_hex, ExpertCall, Limits, SeamShape,
    CONFIG_HASH_HEADER, SHM_RING_HEADER, SHM_STATUS_HEADER,
};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::metrics::{ErrorKind, Metrics, Via};
use crate::placement::{slice_mlp, Assignment};
use crate::{identity, numa, ExpertError, Selection};

/// Default shared-memory directory.
pub const DEFAULT_SHM_DIR: &str = shm::HOST_SHM_DIR;
/// A ring offered by `OpenShm` and not attached to a stream within this time is removed.
const PENDING_RING_TTL: Duration = Duration::from_secs(30);
/// Most rings offered and not yet attached at once.
const MAX_PENDING_RINGS: usize = 64;

/// How a server computes and what it accepts.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The server's name in placement plans (reported by `Info`).
    pub name: String,
    /// Pin compute threads to this NUMA node's CPUs.
    pub numa: Option<usize>,
    /// Compute threads; `None` = the node's CPUs (or all CPUs).
    pub threads: Option<usize>,
    pub limits: Limits,
    /// How products with the weights are computed (`F32` exact, `Ggml` as llama.cpp).
    pub mode: MatmulMode,
    /// Where shared-memory rings are created (`/dev/shm`); `None` offers none (gRPC only).
    pub shm_dir: Option<PathBuf>,
    /// How long the ring poller busy-spins after its last request before it yields the CPU
    /// (then, after 2 ms without requests, sleeps in 50 µs steps). Default 0: yield at once
    /// (~1 µs where cores are free; an oversubscribed host keeps running its other threads).
    pub shm_spin: Duration,
    /// How long a gRPC call's task waits for its answer awake (re-polling, its tokio thread
    /// kept from sleeping, so the answer goes out without a thread wake-up) when recent calls
    /// computed within it; longer computations are awaited asleep. Zero: always asleep.
    pub answer_spin: Duration,
    /// The weight formats calls are computed on (a plan's `experts.kernel`): `native` (the
    /// stored GGUF blocks) or `amx_int8` (repacked at load, on the pinned compute threads).
    pub decode: ExpertFormat,
    pub prefill: ExpertFormat,
    /// Tokens per call from which a `prefill` format applies when it differs from `decode`.
    pub prefill_from: usize,
    /// Whether the ring poller (a compute-pool thread) stays awake — yielding, not sleeping —
    /// for 2 ms after running a gRPC call, so that the next call's job starts without a thread
    /// wake-up (16-core host: p50 hop 72-75 → 59.5-61.5 µs). It keeps one core busy while
    /// gRPC calls flow. Default: on where the machine has at least 4 CPUs.
    pub awake_after_grpc: bool,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            name: String::new(),
            numa: None,
            threads: None,
            limits: Limits::default(),
            mode: MatmulMode::F32,
            shm_dir: Some(PathBuf::from(DEFAULT_SHM_DIR)),
            shm_spin: Duration::ZERO,
            answer_spin: DEFAULT_ANSWER_SPIN,
            decode: ExpertFormat::Native,
            prefill: ExpertFormat::Native,
            prefill_from: kt_models::moe::DEFAULT_INT8_FROM,
            awake_after_grpc: std::thread::available_parallelism().is_ok_and(|n| n.get() >= 4),
        }
    }
}

/// The kernel of `opts`' formats, and whether the experts must be repacked to `amx_int8`;
/// an error names a format kt-expert does not compute.
fn kernel_of(opts: &ServerOptions) -> Result<(ExpertKernel, bool), ExpertError> {
    let int8_from = ExpertFormat::int8_from(opts.decode, opts.prefill, opts.prefill_from)
        .map_err(|reason| ExpertError::Plan { file: String::new(), reason })?;
    Ok(match int8_from {
        None => (ExpertKernel::Fused(FusedConfig::default()), false),
        Some(0) => (ExpertKernel::Int8 { path: None }, true),
        Some(int8_from) => {
            (ExpertKernel::Hybrid { fused: FusedConfig::default(), int8_from }, true)
        }
    })
}

struct Inner {
    experts: Arc<dyn Experts>,
    info: ExpertInfo,
    hash: u64,
    shape: SeamShape,
    limits: Limits,
    pool: rayon::ThreadPool,
    /// Requests computing or queued for the pool, over all streams.
    in_flight: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    /// This host for shared memory, when rings are offered.
    host: Option<HostId>,
    shm_dir: Option<PathBuf>,
    shm_spin: Duration,
    /// Why rings are not offered (for `OpenShm`'s answer), when they are not.
    shm_off: Option<String>,
    /// Rings offered by `OpenShm`, waiting for their `Forward` stream.
    pending: Mutex<HashMap<String, (Ring, Instant)>>,
    rings_made: AtomicU64,
    /// Rings attached to streams, served by one poller job on the pool.
    rings: Mutex<Rings>,
    /// Whether the poller sleeps (parked) and must be woken for a queued call.
    poller_parked: AtomicBool,
    /// The poller's thread, while it runs (to wake it). Apart from `rings`, which the poller
    /// locks on every round: waking it must not make it wait for the lock next.
    poller_thread: Mutex<Option<std::thread::Thread>>,
    /// Recent computation time of a gRPC call, ns (a moving average): decides whether the
    /// call's task waits for the answer awake (within `answer_spin`).
    recent_compute_ns: AtomicU64,
    answer_spin: Duration,
    /// Whether pool work the poller ran (a gRPC call) counts as activity, keeping it awake.
    awake_after_grpc: bool,
}

/// [`ServerOptions::answer_spin`]'s default.
pub const DEFAULT_ANSWER_SPIN: Duration = Duration::from_micros(50);

/// The Expert service; cheap to clone.
#[derive(Clone)]
pub struct ExpertService {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ExpertService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExpertService").field("info", &self.inner.info).finish_non_exhaustive()
    }
}

/// Opens the model at `path` (optionally with GGUF weights) and loads the experts `selection`
/// gives this server, memory-mapped.
pub fn load(
    path: &Path,
    gguf: Option<&Path>,
    selection: &Selection,
    opts: ServerOptions,
) -> Result<ExpertService, ExpertError> {
    let parts = kt_models::open(path, gguf, opts.mode)?;
    let experts =
        load_experts(&parts.config, parts.source.tensors(), parts.scheme, opts.mode, &|l, e| {
            selection.holds(l, e)
        })?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    ExpertService::new(&name, &parts.config, experts, opts)
}

/// Opens the model at `path` and loads what the placement plan `plan_path` gives the server
/// named `opts.name`: its experts, and with the `intermediate` split only its slice of each.
/// Refuses a plan that is not for this model, has no server of that name, or gives it nothing.
pub fn load_plan(
    path: &Path,
    gguf: Option<&Path>,
    plan_path: &Path,
    opts: ServerOptions,
) -> Result<ExpertService, ExpertError> {
    let plan = kt_plan::Plan::load(plan_path).map_err(|e| ExpertError::Plan {
        file: plan_path.display().to_string(),
        reason: e.to_string(),
    })?;
    let shape = kt_plan::ModelShape::open(path, None).map_err(|e| ExpertError::Plan {
        file: plan_path.display().to_string(),
        reason: format!("reading the model's shape: {e}"),
    })?;
    let a = crate::placement::assignment(&plan, &shape, &opts.name)?;
    let mut opts = opts;
    if let Some(tier) = &plan.experts {
        (opts.decode, opts.prefill) = (tier.decode, tier.prefill);
    }
    // A format kt-expert cannot compute is refused before anything is loaded.
    kernel_of(&opts).map_err(|e| match e {
        ExpertError::Plan { reason, .. } => ExpertError::Plan { file: plan.file.clone(), reason },
        e => e,
    })?;
    let parts = kt_models::open(path, gguf, opts.mode)?;
    if parts.config.hidden != shape.config.hidden
        || parts.config.n_layers != shape.config.n_layers
        || parts.config.moe.as_ref().map(|m| (m.n_experts, m.expert_ff))
            != shape.config.moe.as_ref().map(|m| (m.n_experts, m.expert_ff))
    {
        return Err(ExpertError::Plan {
            file: plan.file.clone(),
            reason: "the weights' shapes differ from the config the plan was resolved against"
                .into(),
        });
    }
    let experts =
        load_experts(&parts.config, parts.source.tensors(), parts.scheme, opts.mode, &|l, e| {
            a.held.contains(&(l, e))
        })?;
    let experts = match &a.slice {
        Some(rows) => slice_experts(&experts, &parts.config, rows.clone(), opts.mode)?,
        None => experts,
    };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    tracing::info!(
        plan = %plan.file,
        server = %opts.name,
        experts = a.held.len(),
        slice = ?a.slice,
        "placement from the plan"
    );
    ExpertService::with_placement(&name, &parts.config, experts, Some(&a), opts)
}

/// Repacks every held expert to `amx_int8` on the current pool, logging the progress every
/// tenth of the way (a large model takes minutes).
fn repack_int8(experts: &mut LocalExperts) -> Result<(), ExpertError> {
    let start = Instant::now();
    let step = AtomicU64::new(0);
    experts.repack_int8(
        |_| true,
        |done, total| {
            let tenth = (done * 10 / total.max(1)) as u64;
            if step.fetch_max(tenth, Ordering::Relaxed) < tenth {
                tracing::info!(
                    done,
                    total,
                    secs = start.elapsed().as_secs_f32(),
                    "repacking experts to amx_int8: {}%",
                    tenth * 10
                );
            }
        },
    )?;
    Ok(())
}

/// `experts` with each held expert cut to `rows` of its intermediate dimension.
fn slice_experts(
    experts: &LocalExperts,
    config: &ModelConfig,
    rows: Range<usize>,
    mode: MatmulMode,
) -> Result<LocalExperts, ExpertError> {
    let n_experts = config.moe.as_ref().map_or(0, |m| m.n_experts);
    let mut layers: Vec<Vec<Option<kt_models::moe::Mlp>>> = (0..config.n_layers)
        .map(|l| if config.is_moe_layer(l) { vec![None; n_experts] } else { Vec::new() })
        .collect();
    for (l, e) in experts.held() {
        let (Some(mlp), Some(slot)) =
            (experts.expert(l, e), layers.get_mut(l).and_then(|r| r.get_mut(e)))
        else {
            continue;
        };
        *slot = Some(slice_mlp(mlp, rows.clone(), mode)?);
    }
    Ok(LocalExperts::new(config.hidden, layers))
}

impl ExpertService {
    /// Serves `experts` of the model `config` (named `model_name` in `Info`).
    pub fn new(
        model_name: &str,
        config: &ModelConfig,
        experts: LocalExperts,
        opts: ServerOptions,
    ) -> Result<Self, ExpertError> {
        Self::with_placement(model_name, config, experts, None, opts)
    }

    /// Serves `experts` placed by a plan: `Info` reports the plan and, with the
    /// `intermediate` split, the slice held.
    pub fn with_placement(
        model_name: &str,
        config: &ModelConfig,
        experts: LocalExperts,
        placement: Option<&Assignment>,
        opts: ServerOptions,
    ) -> Result<Self, ExpertError> {
        let model = identity(model_name, config);
        let mut held: Vec<LayerExperts> = Vec::new();
        let (mut bytes, mut weight_ty) = (0u64, None);
        for (l, e) in experts.held() {
            if let Some(mlp) = experts.expert(l, e) {
                for lin in [&mlp.gate, &mlp.up, &mlp.down] {
                    bytes += lin.weight().data.len() as u64;
                    weight_ty.get_or_insert(lin.weight().ty);
                }
            }
            match held.last_mut() {
                Some(last) if last.layer == l as u32 => last.experts.push(e as u32),
                _ => held.push(LayerExperts { layer: l as u32, experts: vec![e as u32] }),
            }
        }
        let (kernel, repack) = kernel_of(&opts)?;
        let mut isa = weight_ty
            .and_then(kt_quant::kernels)
            .map(|k| format!("{}/{}", k.isa, k.vec_dot_isa))
            .unwrap_or_default();
        if repack {
            let path = kt_quant::packed::Path::for_tokens(usize::MAX);
            isa = match kernel {
                ExpertKernel::Hybrid { int8_from, .. } => {
                    format!("{isa}; amx_int8 ({path}) from {int8_from} tokens")
                }
                _ => format!("amx_int8 ({path})"),
            };
        }
        let info = ExpertInfo {
            model: Some(model.clone()),
            held,
            weight_type: weight_ty.map(|t| t.name().to_string()).unwrap_or_default(),
            kernel_isa: isa,
            bytes_held: bytes,
            slice: placement.and_then(Assignment::slice_info),
            plan: placement.map(|a| a.plan.clone()),
            ..ExpertInfo::default()
        };
        let mut experts = experts;
        Self::build(
            move || {
                if repack {
                    repack_int8(&mut experts)?;
                }
                Ok(Arc::new(experts.with_kernel(kernel)) as Arc<dyn Experts>)
            },
            &model,
            info,
            opts,
        )
    }

    /// Serves any [`Experts`] implementation (benchmarks, tests, stand-ins) as the model
    /// `model` (its hidden size, layers and experts bound what requests may carry), reporting
    /// `held` in `Info`. The real server path is [`ExpertService::new`].
    pub fn with_experts(
        experts: Arc<dyn Experts>,
        model: ModelIdentity,
        held: Vec<LayerExperts>,
        opts: ServerOptions,
    ) -> Result<Self, ExpertError> {
        let info = ExpertInfo { model: Some(model.clone()), held, ..ExpertInfo::default() };
        Self::build(move || Ok(experts), &model, info, opts)
    }

    /// The compute pool and the rest of `info` (name, NUMA node, limits) from `opts`;
    /// `prepare` makes the experts on the pool (a repack's copies are first touched by its
    /// pinned threads, so they live on their NUMA node).
    fn build(
        prepare: impl FnOnce() -> Result<Arc<dyn Experts>, ExpertError> + Send,
        model: &ModelIdentity,
        mut info: ExpertInfo,
        opts: ServerOptions,
    ) -> Result<Self, ExpertError> {
        let cpus = opts.numa.and_then(|n| {
            let cpus = numa::node_cpus(n);
            if cpus.is_none() {
                tracing::warn!(
                    node = n,
                    "no /sys/devices/system/node/node{n}: compute threads are not pinned"
                );
            }
            cpus
        });
        let threads = opts
            .threads
            .or(cpus.as_ref().map(Vec::len))
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
        let pin = cpus.clone();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("kt-expert-{i}"))
            .start_handler(move |i| {
                if let Some(cpus) = &pin {
                    if let Err(err) = numa::pin_current_thread(cpus) {
                        tracing::warn!(thread = i, %err, "cannot pin compute thread; running unpinned");
                    }
                }
            })
            .build()
            .map_err(|e| ExpertError::Io(std::io::Error::other(e)))?;
        let numa_node = match (opts.numa, &cpus) {
            (Some(n), Some(c)) => {
                tracing::info!(node = n, cpus = ?c, "compute threads pinned");
                n as i32
            }
            _ => -1,
        };
        let experts = pool.install(prepare)?;
        info.name = opts.name.clone();
        info.numa_node = numa_node;
        info.max_message_bytes = opts.limits.max_message_bytes as u64;
        info.max_tokens = opts.limits.max_tokens as u32;
        let (host, shm_off) = match &opts.shm_dir {
            None => (None, Some("started without shared memory".to_string())),
            Some(dir) => match HostId::of(dir) {
                Ok(h) => (Some(h), None),
                Err(err) => {
                    tracing::warn!(dir = %dir.display(), %err, "shared memory is not offered");
                    (None, Some(err.to_string()))
                }
            },
        };
        info.shm = host.as_ref().map(HostId::to_proto);
        let metrics = Arc::new(Metrics::default());
        metrics.set_bytes_held(info.bytes_held);
        let shape = SeamShape {
            hidden: model.hidden as usize,
            n_layers: model.n_layers as usize,
            n_experts: model.n_experts as usize,
        };
        Ok(Self {
            inner: Arc::new(Inner {
                experts,
                hash: model.config_hash,
                info,
                shape,
                limits: opts.limits,
                pool,
                in_flight: Arc::new(Semaphore::new(threads * 4)),
                metrics,
                host,
                shm_dir: opts.shm_dir.clone(),
                shm_spin: opts.shm_spin,
                shm_off,
                pending: Mutex::new(HashMap::new()),
                rings_made: AtomicU64::new(0),
                rings: Mutex::new(Rings::default()),
                poller_parked: AtomicBool::new(false),
                poller_thread: Mutex::new(None),
                recent_compute_ns: AtomicU64::new(0),
                answer_spin: opts.answer_spin,
                awake_after_grpc: opts.awake_after_grpc,
            }),
        })
    }

    /// What `Info` answers.
    pub fn info(&self) -> &ExpertInfo {
        &self.inner.info
    }

    /// The server's counters (for `--metrics`).
    pub fn metrics(&self) -> Arc<Metrics> {
        self.inner.metrics.clone()
    }
}

impl Inner {
    /// Computes a validated call, counting it.
    fn run(
        &self,
        call: &ExpertCall,
        via: Via,
        arrived: Instant,
    ) -> Result<Vec<f32>, (Code, String)> {
        let res = self.experts.forward(call.layer, &call.hidden, &call.routing).map_err(|err| {
            let code = match err {
                ModelError::Input(_) => Code::NotHeld,
                _ => Code::Internal,
            };
            self.metrics.error(match code {
                Code::NotHeld => ErrorKind::NotHeld,
                _ => ErrorKind::Internal,
            });
            (code, err.to_string())
        });
        self.metrics.call(via, call.n, arrived.elapsed());
        res
    }

    fn compute(&self, call: ExpertCall, arrived: Instant) -> ExpertResponse {
        let started = Instant::now();
        let result = self.run(&call, Via::Grpc, arrived);
        let took = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let avg = self.recent_compute_ns.load(Ordering::Relaxed);
        self.recent_compute_ns.store(avg - avg / 8 + took / 8, Ordering::Relaxed);
        let result = match result {
            Ok(out) => expert_response::Result::Output(encode_tensor_f32(
                &out,
                &[call.n, self.shape.hidden],
                call.dtype,
            )),
            Err((code, message)) => {
                expert_response::Result::Error(WireExpertError { code: code as i32, message })
            }
        };
        ExpertResponse { request_id: call.request_id, result: Some(result) }
    }

    /// The answer to a request that does not decode (counted; the stream goes on).
    fn malformed(
        &self,
        peer: &Option<SocketAddr>,
        request_id: u64,
        err: &kt_proto::WireError,
    ) -> ExpertResponse {
        tracing::debug!(?peer, %err, "malformed expert request");
        self.metrics.error(ErrorKind::InvalidArgument);
        ExpertResponse {
            request_id,
            result: Some(expert_response::Result::Error(WireExpertError {
                code: Code::InvalidArgument as i32,
                message: err.to_string(),
            })),
        }
    }

    /// Hands a decoded gRPC call to the pool; its answer comes on the receiver, to be waited
    /// for awake for the returned time (see [`ServerOptions::answer_spin`]).
    fn dispatch(
        self: &Arc<Self>,
        call: ExpertCall,
        arrived: Instant,
        permit: OwnedSemaphorePermit,
    ) -> (oneshot::Receiver<ExpertResponse>, Duration) {
        let (done, answer) = oneshot::channel();
        let inner = self.clone();
        self.spawn_call(move || {
            let resp = inner.compute(call, arrived);
            drop(permit);
            let _ = done.send(resp);
        });
        let spin = if self.recent_compute_ns.load(Ordering::Relaxed)
            < self.answer_spin.as_nanos() as u64
        {
            self.answer_spin
        } else {
            Duration::ZERO
        };
        (answer, spin)
    }

    /// Removes offered rings nobody attached in time.
    fn expire_pending(&self) {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        pending.retain(|name, (_, at)| {
            let keep = at.elapsed() < PENDING_RING_TTL;
            if !keep {
                tracing::debug!(%name, "removing a shared-memory ring that was never attached");
            }
            keep
        });
    }

    /// Takes the offered ring `name` for a `Forward` stream and starts serving it; the
    /// returned guard stops serving it when dropped (the stream ended).
    fn attach(self: &Arc<Self>, name: &str) -> Result<RingGuard, String> {
        let ring = self
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name)
            .map(|(r, _)| r)
            .ok_or_else(|| format!("no ring `{name}` was offered (or it expired)"))?;
        let mut ring = ring;
        if !ring.acknowledged() {
            return Err("the client did not acknowledge the ring's nonce: it did not map the object this server created".into());
        }
        ring.unlink();
        ring.set_ring_state(shm::RING_SERVING);
        let entry = Arc::new(RingEntry { ring, stop: AtomicBool::new(false) });
        {
            let mut rings = self.rings.lock().unwrap_or_else(PoisonError::into_inner);
            rings.list.push(entry.clone());
            rings.changed = true;
            self.start_poller(&mut rings);
        }
        self.metrics.shm_rings(1);
        Ok(RingGuard { entry, metrics: self.metrics.clone() })
    }

    fn start_poller(self: &Arc<Self>, rings: &mut Rings) {
        if !rings.poller {
            rings.poller = true;
            let inner = self.clone();
            self.pool.spawn(move || inner.poll_rings());
        }
    }

    /// Counts an open `Forward` stream: while one is open the poller runs, so that the gRPC
    /// path's calls are picked up by a pool thread that is awake (yielding) instead of one
    /// that must be woken. The guard uncounts it.
    fn stream_opened(self: &Arc<Self>) -> StreamGuard {
        let mut rings = self.rings.lock().unwrap_or_else(PoisonError::into_inner);
        rings.streams += 1;
        self.start_poller(&mut rings);
        StreamGuard { inner: self.clone() }
    }

    /// Hands a gRPC call's job to the pool; when the poller is asleep (idle for a while), it
    /// is woken too, as a pool thread it may be the only one.
    fn spawn_call(&self, job: impl FnOnce() + Send + 'static) {
        self.pool.spawn(job);
        if self.poller_parked.load(Ordering::Acquire) {
            if let Some(t) =
                self.poller_thread.lock().unwrap_or_else(PoisonError::into_inner).as_ref()
            {
                t.unpark();
            }
        }
    }

    /// The poller: one job on the compute pool serving every attached ring, for as long as
    /// there is one. It spins on the slots' state words and computes each request right here
    /// on the pool (its parallel loops spread over the other pool threads), so a call costs
    /// no hand-off between threads. Idle, it runs queued pool work (the gRPC path's) and backs
    /// off: spin, yield, then sleep in short steps.
    fn poll_rings(self: &Arc<Self>) {
        let mut rings: Vec<Arc<RingEntry>> = Vec::new();
        let mut backoff = Backoff::new(self.shm_spin);
        *self.poller_thread.lock().unwrap_or_else(PoisonError::into_inner) =
            Some(std::thread::current());
        loop {
            {
                let mut shared = self.rings.lock().unwrap_or_else(PoisonError::into_inner);
                shared.list.retain(|e| !e.stop.load(Ordering::Acquire));
                if shared.list.is_empty() && shared.streams == 0 {
                    shared.poller = false;
                    *self.poller_thread.lock().unwrap_or_else(PoisonError::into_inner) = None;
                    return;
                }
                if shared.changed || rings.len() != shared.list.len() {
                    rings.clone_from(&shared.list);
                    shared.changed = false;
                }
            }
            let mut busy = false;
            for _ in 0..64 {
                for e in &rings {
                    if !e.stop.load(Ordering::Relaxed) && self.poll_ring_once(e) {
                        busy = true;
                    }
                }
                if busy {
                    break;
                }
                if rayon::yield_now() == Some(rayon::Yield::Executed) {
                    busy |= self.awake_after_grpc;
                    break;
                }
                if backoff.sleeping() {
                    // Idle for a while: sleep in short steps, and let `spawn_call` wake
                    // this thread early (it checks the flag after queueing its job).
                    self.poller_parked.store(true, Ordering::Release);
                    if rayon::yield_now() != Some(rayon::Yield::Executed) {
                        backoff.park();
                    }
                    self.poller_parked.store(false, Ordering::Release);
                } else {
                    backoff.snooze();
                }
            }
            if busy {
                backoff.reset();
            }
        }
    }

    /// Serves the requests waiting in one ring; whether there were any. A ring whose contents
    /// break the protocol is closed (its client falls back to gRPC).
    fn poll_ring_once(&self, e: &RingEntry) -> bool {
        let ring = &e.ring;
        let mut busy = false;
        for slot in 0..ring.layout().slots {
            let broken = match ring.slot_state(slot) {
                Ok(shm::REQUEST) => {
                    busy = true;
                    self.serve_slot(ring, slot).err().map(|err| err.to_string())
                }
                Ok(shm::FREE | shm::TAKEN | shm::RESPONSE) => None,
                Ok(other) => Some(format!("slot {slot} is in unknown state {other}")),
                Err(err) => Some(err.to_string()),
            };
            if let Some(why) = broken {
                tracing::warn!(%why, "closing a broken shared-memory ring");
                self.metrics.error(ErrorKind::ShmRing);
                e.stop.store(true, Ordering::Release);
                ring.set_ring_state(shm::RING_CLOSED);
                break;
            }
        }
        busy
    }

    fn serve_slot(&self, ring: &Ring, slot: usize) -> Result<(), shm::ShmError> {
        let arrived = Instant::now();
        let (seq, parts) = ring.take_request(slot, &self.shape, &self.limits)?;
        let call = parts.and_then(|p| finish_call(p, &self.shape));
        let call = match call {
            Ok(call) => call,
            Err(err) => {
                self.metrics.error(ErrorKind::InvalidArgument);
                let msg = err.to_string();
                return ring.post_response(slot, seq, Err((Code::InvalidArgument as u32, &msg)));
            }
        };
        match self.run(&call, Via::Shm, arrived) {
            Ok(out) => ring.post_response(slot, seq, Ok((&out, call.dtype))),
            Err((code, msg)) => ring.post_response(slot, seq, Err((code as u32, &msg))),
        }
    }
}

/// A ring being served.
struct RingEntry {
    ring: Ring,
    /// Set when its stream ended (or the ring broke): the poller drops it.
    stop: AtomicBool,
}

/// The rings the poller serves.
#[derive(Default)]
struct Rings {
    list: Vec<Arc<RingEntry>>,
    /// `list` changed since the poller last copied it.
    changed: bool,
    /// Whether the poller job is running.
    poller: bool,
    /// Open `Forward` streams (the poller runs while there is one, or a ring).
    streams: usize,
}

/// Counts an open `Forward` stream for the poller.
struct StreamGuard {
    inner: Arc<Inner>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.inner.rings.lock().unwrap_or_else(PoisonError::into_inner).streams -= 1;
    }
}

/// Keeps a ring served while its `Forward` stream lives.
struct RingGuard {
    entry: Arc<RingEntry>,
    metrics: Arc<Metrics>,
}

impl Drop for RingGuard {
    fn drop(&mut self) {
        self.entry.stop.store(true, Ordering::Release);
        self.entry.ring.set_ring_state(shm::RING_CLOSED);
        self.metrics.shm_rings(-1);
    }
}

/// Waiting for a compute permit (`None`: the semaphore closed).
type Acquire = Pin<Box<dyn Future<Output = Option<OwnedSemaphorePermit>> + Send>>;

/// A `Forward` stream served by the response body's own task: each poll reads the requests
/// that have arrived (decoding them and handing them to the pool) and gives back the first
/// answer that is ready. While an answer is expected soon (within the answer spin) the task
/// yields instead of sleeping, so the answer is written without a wake-up; the request side
/// and the answer side need no channel or task between them.
pub struct Answers {
    /// `None` once the client finished sending (or the stream failed).
    inbound: Option<Streaming<ExpertRequest>>,
    inner: Arc<Inner>,
    peer: Option<SocketAddr>,
    /// A permit being waited for (all are in use), with the call that needs it.
    acquiring: Option<(Acquire, ExpertCall, Instant)>,
    /// Calls on the pool: their answer and until when to wait for it awake.
    waiting: Vec<(oneshot::Receiver<ExpertResponse>, Instant)>,
    _guards: (Option<RingGuard>, StreamGuard),
}

impl Drop for Answers {
    fn drop(&mut self) {
        self.inner.metrics.streams(-1);
        tracing::debug!(peer = ?self.peer, "forward stream closed");
    }
}

impl Stream for Answers {
    type Item = Result<ExpertResponse, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_answer(cx)
    }
}

impl Answers {
    fn poll_answer(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<ExpertResponse, Status>>> {
        loop {
            // Answers first: they free permits and are what the client waits for.
            let mut i = 0;
            while i < self.waiting.len() {
                match Pin::new(&mut self.waiting[i].0).poll(cx) {
                    Poll::Ready(res) => {
                        self.waiting.swap_remove(i);
                        if let Ok(resp) = res {
                            return Poll::Ready(Some(Ok(resp)));
                        }
                    }
                    Poll::Pending => i += 1,
                }
            }
            if let Some((acq, _, _)) = &mut self.acquiring {
                match acq.as_mut().poll(cx) {
                    Poll::Pending => return self.pending(cx),
                    Poll::Ready(None) => {
                        self.acquiring = None;
                        self.inbound = None;
                        continue;
                    }
                    Poll::Ready(Some(permit)) => {
                        if let Some((_, call, arrived)) = self.acquiring.take() {
                            self.start(call, arrived, permit);
                        }
                        continue;
                    }
                }
            }
            let Some(inbound) = self.inbound.as_mut() else {
                return if self.waiting.is_empty() { Poll::Ready(None) } else { self.pending(cx) };
            };
            let msg = match Pin::new(inbound).poll_next(cx) {
                Poll::Pending => return self.pending(cx),
                Poll::Ready(None) => {
                    self.inbound = None;
                    continue;
                }
                Poll::Ready(Some(Err(status))) => {
                    tracing::warn!(peer = ?self.peer, %status, "forward stream failed");
                    self.inner.metrics.error(ErrorKind::Stream);
                    self.inbound = None;
                    self.waiting.clear();
                    return Poll::Ready(Some(Err(status)));
                }
                Poll::Ready(Some(Ok(msg))) => msg,
            };
            let arrived = Instant::now();
            let call = match decode_request(&msg, &self.inner.shape, &self.inner.limits) {
                Ok(call) => call,
                Err(err) => {
                    return Poll::Ready(Some(Ok(self.inner.malformed(
                        &self.peer,
                        msg.request_id,
                        &err,
                    ))))
                }
            };
            match self.inner.in_flight.clone().try_acquire_owned() {
                Ok(permit) => self.start(call, arrived, permit),
                Err(tokio::sync::TryAcquireError::Closed) => self.inbound = None,
                Err(tokio::sync::TryAcquireError::NoPermits) => {
                    let sem = self.inner.in_flight.clone();
                    self.acquiring = Some((
                        Box::pin(async move { sem.acquire_owned().await.ok() }),
                        call,
                        arrived,
                    ));
                }
            }
        }
    }

    fn start(&mut self, call: ExpertCall, arrived: Instant, permit: OwnedSemaphorePermit) {
        let (answer, spin) = self.inner.dispatch(call, arrived, permit);
        self.waiting.push((answer, Instant::now() + spin));
    }

    /// Nothing to give now: yield (to be polled again soon) while an answer is expected
    /// within its spin, otherwise sleep until a waker fires.
    fn pending<T>(&self, cx: &mut Context<'_>) -> Poll<T> {
        let now = Instant::now();
        if self.waiting.iter().any(|(_, until)| now < *until) {
            let mut y = std::pin::pin!(tokio::task::yield_now());
            let _ = y.as_mut().poll(cx);
        }
        Poll::Pending
    }
}

#[tonic::async_trait]
impl Expert for ExpertService {
    type ForwardStream = Answers;

    async fn forward(
        &self,
        request: Request<Streaming<ExpertRequest>>,
    ) -> Result<Response<Self::ForwardStream>, Status> {
        let ours = hash_hex(self.inner.hash);
        if let Some(theirs) = request.metadata().get(CONFIG_HASH_HEADER) {
            let theirs = theirs.to_str().unwrap_or("(not text)");
            if theirs != ours {
                tracing::warn!(%theirs, %ours, "refused a Forward stream for another model");
                return Err(Status::failed_precondition(format!(
                    "model mismatch: the client's config hash is {theirs}, this server's ({}) is {ours}",
                    self.inner.info.model.as_ref().map_or("", |m| m.name.as_str())
                )));
            }
        }
        let peer = request.remote_addr();
        let ring_name = request
            .metadata()
            .get(SHM_RING_HEADER)
            .map(|v| v.to_str().unwrap_or("(not text)").to_string());
        let (guard, shm_status) = match ring_name {
            None => (None, None),
            Some(name) => match self.inner.attach(&name) {
                Ok(g) => (Some(g), Some("attached".to_string())),
                Err(reason) => {
                    tracing::info!(?peer, %reason, "shared-memory ring refused; gRPC only");
                    (None, Some(format!("refused: {reason}")))
                }
            },
        };
        let inbound = request.into_inner();
        self.inner.metrics.streams(1);
        let polling = self.inner.stream_opened();
        tracing::debug!(?peer, "forward stream opened");
        let answers = Answers {
            inbound: Some(inbound),
            inner: self.inner.clone(),
            peer,
            acquiring: None,
            waiting: Vec::new(),
            _guards: (guard, polling),
        };
        let mut response = Response::new(answers);
        if let Some(status) = shm_status {
            let value = status.replace(|c: char| !c.is_ascii() || c.is_ascii_control(), "?");
            if let Ok(v) = value.parse() {
                response.metadata_mut().insert(SHM_STATUS_HEADER, v);
            }
        }
        Ok(response)
    }

    async fn info(
        &self,
        request: Request<ExpertInfoRequest>,
    ) -> Result<Response<ExpertInfo>, Status> {
        let expected = request.into_inner().expected_config_hash;
        if expected != 0 && expected != self.inner.hash {
            return Err(Status::failed_precondition(format!(
                "model mismatch: the client expects config hash {}, this server's is {}",
                hash_hex(expected),
                hash_hex(self.inner.hash)
            )));
        }
        Ok(Response::new(self.inner.info.clone()))
    }

    async fn open_shm(
        &self,
        request: Request<ShmOpenRequest>,
    ) -> Result<Response<ShmOffer>, Status> {
        let inner = &self.inner;
        let (Some(host), Some(dir)) = (&inner.host, &inner.shm_dir) else {
            let why = inner.shm_off.clone().unwrap_or_default();
            return Err(Status::unavailable(format!("this server offers no shared memory: {why}")));
        };
        let req = request.into_inner();
        if req.config_hash != inner.hash {
            return Err(Status::failed_precondition(format!(
                "model mismatch: the client's config hash is {}, this server's is {}",
                hash_hex(req.config_hash),
                hash_hex(inner.hash)
            )));
        }
        let theirs = req
            .host
            .as_ref()
            .and_then(HostId::from_proto)
            .ok_or_else(|| Status::invalid_argument("`host`: missing or without a boot id"))?;
        if let Some(why) = host.differs(&theirs) {
            return Err(Status::failed_precondition(format!("cannot share memory: {why}")));
        }
        let layout = Layout {
            slots: req.slots as usize,
            slot_bytes: usize::try_from(req.slot_bytes).unwrap_or(usize::MAX),
        };
        layout
            .check(inner.limits.max_message_bytes)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        inner.expire_pending();
        if inner.pending.lock().unwrap_or_else(PoisonError::into_inner).len() >= MAX_PENDING_RINGS {
            return Err(Status::resource_exhausted(format!(
                "{MAX_PENDING_RINGS} rings are offered and not attached yet"
            )));
        }
        let n = inner.rings_made.fetch_add(1, Ordering::Relaxed);
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!("kt-expert-{}-{n}-{stamp:08x}", std::process::id());
        let ring = Ring::create(dir, &name, layout).map_err(|e| {
            tracing::warn!(%e, "cannot create a shared-memory ring");
            Status::unavailable(e.to_string())
        })?;
        let offer = ShmOffer {
            name: name.clone(),
            nonce: ring.nonce(),
            size: layout.size().unwrap_or(0) as u64,
            slots: layout.slots as u32,
            slot_bytes: layout.slot_bytes as u64,
        };
        inner
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name, (ring, Instant::now()));
        Ok(Response::new(offer))
    }

    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        Ok(Response::new(HealthResponse {
            status: Serving::Serving as i32,
            message: String::new(),
        }))
    }
}

/// Serves `service` on `listener` until `shutdown` completes.
pub async fn serve(
    service: ExpertService,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ExpertError> {
    let max = service.inner.limits.max_message_bytes;
    let incoming = TcpListenerStream::new(listener).map(|s| {
        let s = s?;
        // Small messages on the hot path: no Nagle delay.
        s.set_nodelay(true)?;
        Ok::<_, std::io::Error>(s)
    });
    tonic::transport::Server::builder()
        // Large windows: requests of a prefill chunk are megabytes (see RemoteExperts).
        .initial_stream_window_size(Some(16 << 20))
        .initial_connection_window_size(Some(32 << 20))
        .add_service(
            ExpertServer::new(service)
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| ExpertError::Transport(e.to_string()))
}

/// The runtime a server's connections run on: one thread (a current-thread runtime). A gRPC
/// call then costs no hand-off between I/O threads: the connection task that reads a request
/// and the stream's task that decodes it, hands it to the compute pool and writes the answer
/// run on the same thread, and no second worker is woken to look for work (on a 2-worker
/// runtime that cost about two futex calls and a thread switch per hop). Computation runs on
/// the compute pool, never here; what this thread does per call is framing and the wire
/// conversion of the hidden states.
pub fn io_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()
}

/// An expert server on its own runtime (tests, in-process tiers). Dropping it stops the server
/// at once, as a killed process would: its connections are closed mid-stream.
pub struct ServerHandle {
    addr: SocketAddr,
    /// The thread driving the server's runtime, and what stops it.
    driver: Option<(oneshot::Sender<()>, std::thread::JoinHandle<()>)>,
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl ServerHandle {
    /// Binds `addr` (e.g. `127.0.0.1:0`) and serves `service` there.
    pub fn start(service: ExpertService, addr: &str) -> Result<Self, ExpertError> {
        let runtime = io_runtime()?;
        let listener = runtime.block_on(TcpListener::bind(addr))?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new().name("kt-expert-io".into()).spawn(move || {
            runtime.block_on(async move {
                tokio::select! {
                    res = serve(service, listener, std::future::pending()) => {
                        if let Err(err) = res {
                            tracing::error!(%err, "expert server stopped");
                        }
                    }
                    _ = stopped => {}
                }
            });
            // Every connection task is dropped here: the sockets close mid-stream.
            runtime.shutdown_background();
        })?;
        Ok(Self { addr, driver: Some((stop, thread)) })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if let Some((stop, thread)) = self.driver.take() {
            let _ = stop.send(());
            let _ = thread.join();
        }
    }
}
