//! The `kt.v1.Expert` service over held experts.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use kt_models::{load_experts, Experts, LocalExperts, MatmulMode, ModelConfig, ModelError};
use kt_proto::v1::expert_error::Code;
use kt_proto::v1::expert_server::{Expert, ExpertServer};
use kt_proto::v1::health_response::Status as Serving;
use kt_proto::v1::{
    expert_response, ExpertError as WireExpertError, ExpertInfo, ExpertInfoRequest, ExpertRequest,
    ExpertResponse, HealthRequest, HealthResponse, LayerExperts, ModelIdentity,
};
use kt_proto::{
    decode_request, encode_tensor_f32, hash_hex, ExpertCall, Limits, SeamShape, CONFIG_HASH_HEADER,
};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::{identity, numa, ExpertError, Selection};

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
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            name: String::new(),
            numa: None,
            threads: None,
            limits: Limits::default(),
            mode: MatmulMode::F32,
        }
    }
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
}

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

impl ExpertService {
    /// Serves `experts` of the model `config` (named `model_name` in `Info`).
    pub fn new(
        model_name: &str,
        config: &ModelConfig,
        experts: LocalExperts,
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
        let info = ExpertInfo {
            model: Some(model.clone()),
            held,
            weight_type: weight_ty.map(|t| t.name().to_string()).unwrap_or_default(),
            kernel_isa: weight_ty
                .and_then(kt_quant::kernels)
                .map(|k| k.isa.to_string())
                .unwrap_or_default(),
            bytes_held: bytes,
            ..ExpertInfo::default()
        };
        Self::build(Arc::new(experts), &model, info, opts)
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
        Self::build(experts, &model, info, opts)
    }

    /// The compute pool and the rest of `info` (name, NUMA node, limits) from `opts`.
    fn build(
        experts: Arc<dyn Experts>,
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
        info.name = opts.name.clone();
        info.numa_node = numa_node;
        info.max_message_bytes = opts.limits.max_message_bytes as u64;
        info.max_tokens = opts.limits.max_tokens as u32;
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
            }),
        })
    }

    /// What `Info` answers.
    pub fn info(&self) -> &ExpertInfo {
        &self.inner.info
    }
}

impl Inner {
    fn compute(&self, call: ExpertCall) -> ExpertResponse {
        let result = match self.experts.forward(call.layer, &call.hidden, &call.routing) {
            Ok(out) => expert_response::Result::Output(encode_tensor_f32(
                &out,
                &[call.n, self.shape.hidden],
                call.dtype,
            )),
            Err(err) => {
                let code = match err {
                    ModelError::Input(_) => Code::NotHeld,
                    _ => Code::Internal,
                };
                expert_response::Result::Error(WireExpertError {
                    code: code as i32,
                    message: err.to_string(),
                })
            }
        };
        ExpertResponse { request_id: call.request_id, result: Some(result) }
    }
}

#[tonic::async_trait]
impl Expert for ExpertService {
    type ForwardStream = ReceiverStream<Result<ExpertResponse, Status>>;

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
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let inner = self.inner.clone();
        tokio::spawn(async move {
            tracing::debug!(?peer, "forward stream opened");
            loop {
                let msg = match inbound.message().await {
                    Ok(Some(msg)) => msg,
                    Ok(None) => break,
                    Err(status) => {
                        tracing::warn!(?peer, %status, "forward stream failed");
                        let _ = tx.send(Err(status)).await;
                        break;
                    }
                };
                let call = match decode_request(&msg, &inner.shape, &inner.limits) {
                    Ok(call) => call,
                    Err(err) => {
                        tracing::debug!(?peer, %err, "malformed expert request");
                        let resp = ExpertResponse {
                            request_id: msg.request_id,
                            result: Some(expert_response::Result::Error(WireExpertError {
                                code: Code::InvalidArgument as i32,
                                message: err.to_string(),
                            })),
                        };
                        if tx.send(Ok(resp)).await.is_err() {
                            break;
                        }
                        continue;
                    }
                };
                let Ok(permit) = inner.in_flight.clone().acquire_owned().await else { break };
                let (inner2, tx2) = (inner.clone(), tx.clone());
                inner.pool.spawn(move || {
                    let resp = inner2.compute(call);
                    drop(permit);
                    let _ = tx2.blocking_send(Ok(resp));
                });
            }
            tracing::debug!(?peer, "forward stream closed");
        });
        Ok(Response::new(ReceiverStream::new(rx)))
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
        .add_service(
            ExpertServer::new(service)
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| ExpertError::Transport(e.to_string()))
}

/// An expert server on its own runtime (tests, in-process tiers). Dropping it stops the server
/// at once, as a killed process would: its connections are closed mid-stream.
pub struct ServerHandle {
    addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl ServerHandle {
    /// Binds `addr` (e.g. `127.0.0.1:0`) and serves `service` there.
    pub fn start(service: ExpertService, addr: &str) -> Result<Self, ExpertError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kt-expert-io")
            .enable_all()
            .build()?;
        let listener = runtime.block_on(TcpListener::bind(addr))?;
        let addr = listener.local_addr()?;
        runtime.spawn(async move {
            if let Err(err) = serve(service, listener, std::future::pending()).await {
                tracing::error!(%err, "expert server stopped");
            }
        });
        Ok(Self { addr, runtime: Some(runtime) })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}
