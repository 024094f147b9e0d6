//! [`RemoteExperts`]: the worker's side of the expert stream.
//!
//! One long-lived `Forward` stream per server. Each [`Experts::forward`] call gets a request
//! id, registers a reply slot, sends its request on the stream and blocks (the seam is
//! synchronous) until the dispatcher task hands it the answer, the stream dies, or the
//! timeout passes. A dead stream fails every waiting and later call at once with the reason.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex, PoisonError};
use std::time::Duration;

use kt_models::{Experts, ModelError, Routing};
use kt_proto::v1::expert_client::ExpertClient;
use kt_proto::v1::{
    expert_response, ExpertInfo, ExpertInfoRequest, ExpertRequest, ExpertResponse, ModelIdentity,
};
use kt_proto::{decode_tensor_f32, encode_request, hash_hex, WireDType, CONFIG_HASH_HEADER};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::Endpoint;
use tonic::Streaming;

use crate::ExpertError;

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
}

impl Default for RemoteOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            dtype: WireDType::F32,
            max_message_bytes: kt_proto::Limits::default().max_message_bytes,
        }
    }
}

type Reply = std_mpsc::SyncSender<Result<Vec<f32>, String>>;

#[derive(Default)]
struct State {
    /// Waiting calls: request id → (tokens, reply slot).
    pending: HashMap<u64, (usize, Reply)>,
    /// Why the stream ended, once it has.
    dead: Option<String>,
}

/// Routed experts on an expert server, over one gRPC stream.
pub struct RemoteExperts {
    addr: String,
    info: ExpertInfo,
    hidden: usize,
    opts: RemoteOptions,
    tx: mpsc::UnboundedSender<ExpertRequest>,
    state: Arc<Mutex<State>>,
    next_id: AtomicU64,
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for RemoteExperts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteExperts").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl RemoteExperts {
    /// Connects to the server at `addr` (`host:port` or a URI), checks with `Info` that it
    /// serves the model `ours`, and opens the stream.
    pub fn connect(
        addr: &str,
        ours: &ModelIdentity,
        opts: RemoteOptions,
    ) -> Result<Self, ExpertError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("kt-remote-experts")
            .enable_all()
            .build()?;
        let conn = |reason: String| ExpertError::Connect { addr: addr.to_string(), reason };
        let uri = if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") };
        let state = Arc::new(Mutex::new(State::default()));
        let (info, tx) = runtime.block_on(async {
            let endpoint = Endpoint::from_shared(uri)
                .map_err(|e| conn(e.to_string()))?
                .connect_timeout(opts.connect_timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(5))
                .keep_alive_timeout(opts.timeout)
                .keep_alive_while_idle(true);
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
                addr: addr.to_string(),
                reason: "Info carries no model identity".into(),
            })?;
            if theirs.config_hash != ours.config_hash {
                return Err(ExpertError::ModelMismatch {
                    addr: addr.to_string(),
                    ours: ours.name.clone(),
                    ours_hash: ours.config_hash,
                    theirs: theirs.name,
                    theirs_hash: theirs.config_hash,
                });
            }
            let (tx, rx) = mpsc::unbounded_channel();
            let mut request = tonic::Request::new(UnboundedReceiverStream::new(rx));
            let hash = hash_hex(ours.config_hash)
                .parse()
                .map_err(|_| conn("config hash is not valid metadata".into()))?;
            request.metadata_mut().insert(CONFIG_HASH_HEADER, hash);
            let inbound = tokio::time::timeout(opts.connect_timeout, client.forward(request))
                .await
                .map_err(|_| {
                    conn(format!("the stream did not open within {:?}", opts.connect_timeout))
                })?
                .map_err(|s| conn(format!("Forward refused: {}", s.message())))?
                .into_inner();
            tokio::spawn(dispatch(inbound, state.clone(), ours.hidden as usize));
            Ok::<_, ExpertError>((info, tx))
        })?;
        tracing::info!(addr, name = %info.name, "connected to expert server");
        Ok(Self {
            addr: addr.to_string(),
            info,
            hidden: ours.hidden as usize,
            opts,
            tx,
            state,
            next_id: AtomicU64::new(0),
            runtime: Some(runtime),
        })
    }

    /// What the server said about itself at connect.
    pub fn info(&self) -> &ExpertInfo {
        &self.info
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

    fn gone(&self, reason: &str) -> ModelError {
        ModelError::Experts(format!("expert server {} is gone: {reason}", self.addr))
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
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = std_mpsc::sync_channel(1);
        {
            let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(reason) = &st.dead {
                return Err(self.gone(reason));
            }
            st.pending.insert(id, (n, reply));
        }
        let req = encode_request(id, layer, hidden, h, routing, self.opts.dtype);
        let forget = || {
            self.state.lock().unwrap_or_else(PoisonError::into_inner).pending.remove(&id);
        };
        if self.tx.send(req).is_err() {
            forget();
            return Err(self.gone("the stream is closed"));
        }
        match answer.recv_timeout(self.opts.timeout) {
            Ok(Ok(out)) => Ok(out),
            Ok(Err(reason)) => {
                Err(ModelError::Experts(format!("expert server {}: {reason}", self.addr)))
            }
            Err(std_mpsc::RecvTimeoutError::Timeout) => {
                forget();
                Err(ModelError::Experts(format!(
                    "expert server {} did not answer layer {layer} within {:?}",
                    self.addr, self.opts.timeout
                )))
            }
            Err(std_mpsc::RecvTimeoutError::Disconnected) => Err(self.gone("the stream ended")),
        }
    }
}

impl Drop for RemoteExperts {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Hands each answer to its waiting call; when the stream ends, fails all of them.
async fn dispatch(mut inbound: Streaming<ExpertResponse>, state: Arc<Mutex<State>>, hidden: usize) {
    let reason = loop {
        match inbound.message().await {
            Ok(Some(resp)) => {
                let slot = state
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .pending
                    .remove(&resp.request_id);
                let Some((n, reply)) = slot else {
                    tracing::debug!(
                        id = resp.request_id,
                        "answer for no waiting call (timed out?)"
                    );
                    continue;
                };
                let _ = reply.send(answer(resp, n, hidden));
            }
            Ok(None) => break "the server closed the stream".to_string(),
            Err(status) => break format!("{} ({:?})", status.message(), status.code()),
        }
    };
    tracing::warn!(%reason, "expert stream ended");
    let mut st = state.lock().unwrap_or_else(PoisonError::into_inner);
    st.dead = Some(reason.clone());
    for (_, (_, reply)) in st.pending.drain() {
        let _ = reply.send(Err(reason.clone()));
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
