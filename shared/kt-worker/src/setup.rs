//! Building a worker's model from what the command line names: the weights, an optional
//! placement plan, and the expert servers that hold the routed experts.
//!
//! Without expert servers the worker holds every routed expert itself (a self-contained
//! worker). With them it loads none: each MoE layer asks, concurrently, every server that
//! holds some of the chosen experts ([`kt_models::ShardedExperts`]) over one long-lived
//! stream per server, and adds the answers. A server that fails is reconnected on a later
//! call ([`Reconnecting`]), so the worker serves again once the server is back.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use kt_expert::{identity, RemoteExperts, RemoteOptions};
use kt_models::{Experts, MatmulMode, Model, ModelError, Routing, ShardedExperts};
use kt_plan::{Plan, Split};
use kt_proto::v1::ModelIdentity;

use crate::WorkerError;

/// An expert server as the command line names it: `NAME=ADDR`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertAddr {
    pub name: String,
    pub addr: String,
}

impl std::str::FromStr for ExpertAddr {
    type Err = WorkerError;

    fn from_str(s: &str) -> Result<Self, WorkerError> {
        match s.split_once('=') {
            Some((name, addr)) if !name.is_empty() && !addr.is_empty() => {
                Ok(Self { name: name.to_string(), addr: addr.to_string() })
            }
            _ => Err(WorkerError::Config(format!(
                "--expert `{s}`: expected NAME=ADDR, e.g. numa0=127.0.0.1:50061"
            ))),
        }
    }
}

/// What to load.
#[derive(Debug, Clone)]
pub struct ModelOptions {
    /// HF folder, GGUF file, or folder of GGUF files.
    pub path: PathBuf,
    /// GGUF weights paired with the HF folder `path`.
    pub gguf: Option<PathBuf>,
    /// Placement plan: which expert servers hold the routed experts.
    pub plan: Option<PathBuf>,
    /// Expert servers; empty = routed experts held in this process.
    pub experts: Vec<ExpertAddr>,
    /// Routed experts per token, lower than the model's top-k ("selective experts").
    pub experts_per_token: Option<usize>,
    pub mode: MatmulMode,
    pub remote: RemoteOptions,
}

impl ModelOptions {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            gguf: None,
            plan: None,
            experts: Vec::new(),
            experts_per_token: None,
            mode: MatmulMode::F32,
            remote: RemoteOptions::default(),
        }
    }
}

/// A loaded worker model.
#[derive(Debug)]
pub struct WorkerModel {
    pub model: Model,
    /// The model's name in `Info` (the file or folder name, as kt-expert names it).
    pub name: String,
    /// End-of-sequence ids declared by the model files.
    pub eos_ids: Vec<u32>,
}

/// Loads the model `opts` names, connecting to its expert servers when there are any.
/// Blocks (connects on a runtime of its own): call it outside an async context.
pub fn load_model(opts: &ModelOptions) -> Result<WorkerModel, WorkerError> {
    let plan = opts
        .plan
        .as_ref()
        .map(Plan::load)
        .transpose()
        .map_err(|e| WorkerError::Config(format!("plan: {e}")))?;
    let parts = kt_models::open(&opts.path, opts.gguf.as_deref(), opts.mode)?;
    let config = parts.config.clone();
    let name = opts.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if let Some(plan) = &plan {
        if plan.arch != config.arch.name() {
            return Err(WorkerError::Config(format!(
                "plan {} is for arch `{}`, the model is `{}`",
                plan.file,
                plan.arch,
                config.arch.name()
            )));
        }
    }
    let servers = expert_servers(plan.as_ref(), &opts.experts)?;
    let model = if servers.is_empty() {
        Model::load(config, parts.source.tensors(), parts.scheme, opts.mode)?
    } else {
        let Some(moe) = &config.moe else {
            return Err(WorkerError::Config(
                "expert servers were given, but the model has no routed experts".into(),
            ));
        };
        let ours = identity(&name, &config);
        let (nl, ne) = (config.n_layers, moe.n_experts);
        let mut sharded = ShardedExperts::new(config.hidden);
        let mut covered = vec![vec![false; ne]; nl];
        for s in &servers {
            let remote = Reconnecting::connect(s, &ours, &opts.remote, nl, ne)?;
            for (l, row) in remote.owns.iter().enumerate() {
                for (e, &o) in row.iter().enumerate() {
                    covered[l][e] |= o;
                }
            }
            let owns = remote.owns.clone();
            sharded = sharded.add(Arc::new(remote), owns);
        }
        let missing: Vec<String> = (0..nl)
            .filter(|&l| config.is_moe_layer(l))
            .flat_map(|l| (0..ne).map(move |e| (l, e)))
            .filter(|&(l, e)| !covered[l][e])
            .take(8)
            .map(|(l, e)| format!("layer {l} expert {e}"))
            .collect();
        if !missing.is_empty() {
            return Err(WorkerError::Config(format!(
                "no expert server holds {} (and maybe more)",
                missing.join(", ")
            )));
        }
        Model::load_with(config, parts.source.tensors(), parts.scheme, opts.mode, &|_, _| false)?
            .with_experts(Arc::new(sharded))
    };
    let model = match opts.experts_per_token {
        Some(k) => model.with_experts_per_token(k)?,
        None => model,
    };
    Ok(WorkerModel { model, name, eos_ids: parts.eos_ids })
}

/// The servers to connect to, in plan order when a plan names them.
fn expert_servers(
    plan: Option<&Plan>,
    given: &[ExpertAddr],
) -> Result<Vec<ExpertAddr>, WorkerError> {
    for (i, a) in given.iter().enumerate() {
        if given[..i].iter().any(|b| b.name == a.name) {
            return Err(WorkerError::Config(format!("--expert {} is given twice", a.name)));
        }
    }
    let Some(tier) = plan.and_then(|p| p.experts.as_ref()) else {
        if let Some(p) = plan {
            if !given.is_empty() {
                return Err(WorkerError::Config(format!(
                    "plan {} has no expert tier, but --expert servers were given",
                    p.file
                )));
            }
        }
        return Ok(given.to_vec());
    };
    if matches!(tier.split, Split::Intermediate(_)) {
        return Err(WorkerError::Config(
            "the plan splits experts by intermediate slices, which this worker cannot combine \
             yet; use a by_expert or by_layer plan"
                .into(),
        ));
    }
    if given.is_empty() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for s in &tier.servers {
        match given.iter().find(|a| a.name == s.name) {
            Some(a) => out.push(a.clone()),
            None => {
                return Err(WorkerError::Config(format!(
                    "the plan's expert server `{}` has no address: add --expert {}=HOST:PORT",
                    s.name, s.name
                )))
            }
        }
    }
    if let Some(extra) = given.iter().find(|a| tier.server(&a.name).is_none()) {
        return Err(WorkerError::Config(format!(
            "--expert {}: the plan names no such server (it has {})",
            extra.name,
            tier.servers.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ")
        )));
    }
    Ok(out)
}

/// Least time between two reconnection attempts to one server.
const RECONNECT_EVERY: Duration = Duration::from_millis(500);

/// One expert server behind [`RemoteExperts`], reconnected after a failure: a call that
/// fails drops the stream, and the next call (at most every [`RECONNECT_EVERY`]) connects
/// again. A server that comes back holding different experts is refused.
pub struct Reconnecting {
    name: String,
    addr: String,
    ours: ModelIdentity,
    opts: RemoteOptions,
    /// `owns[layer][expert]`, as the server said at the first connect.
    owns: Vec<Vec<bool>>,
    shape: (usize, usize),
    current: Mutex<Option<Arc<RemoteExperts>>>,
    last_attempt: Mutex<Instant>,
}

impl std::fmt::Debug for Reconnecting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconnecting").field("name", &self.name).field("addr", &self.addr).finish()
    }
}

impl Reconnecting {
    /// Connects to `server` (failing when it is unreachable or serves another model).
    pub fn connect(
        server: &ExpertAddr,
        ours: &ModelIdentity,
        opts: &RemoteOptions,
        n_layers: usize,
        n_experts: usize,
    ) -> Result<Self, WorkerError> {
        let remote = RemoteExperts::connect(&server.addr, ours, opts.clone())
            .map_err(|e| WorkerError::Experts(format!("{}: {e}", server.name)))?;
        let owns = remote.owns(n_layers, n_experts);
        Ok(Self {
            name: server.name.clone(),
            addr: server.addr.clone(),
            ours: ours.clone(),
            opts: opts.clone(),
            owns,
            shape: (n_layers, n_experts),
            current: Mutex::new(Some(Arc::new(remote))),
            last_attempt: Mutex::new(Instant::now()),
        })
    }

    /// `owns[layer][expert]`.
    pub fn owns(&self) -> &[Vec<bool>] {
        &self.owns
    }

    fn client(&self) -> Result<Arc<RemoteExperts>, ModelError> {
        if let Some(c) = self.current.lock().unwrap_or_else(PoisonError::into_inner).as_ref() {
            return Ok(c.clone());
        }
        {
            let mut last = self.last_attempt.lock().unwrap_or_else(PoisonError::into_inner);
            if last.elapsed() < RECONNECT_EVERY {
                return Err(ModelError::Experts(format!(
                    "expert server {} ({}) is down; reconnecting",
                    self.name, self.addr
                )));
            }
            *last = Instant::now();
        }
        let remote = RemoteExperts::connect(&self.addr, &self.ours, self.opts.clone())
            .map_err(|e| ModelError::Experts(format!("{}: {e}", self.name)))?;
        let owns = remote.owns(self.shape.0, self.shape.1);
        if owns != self.owns {
            return Err(ModelError::Experts(format!(
                "expert server {} ({}) came back holding different experts than at start",
                self.name, self.addr
            )));
        }
        tracing::info!(name = %self.name, addr = %self.addr, "reconnected to expert server");
        let remote = Arc::new(remote);
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = Some(remote.clone());
        Ok(remote)
    }
}

impl Experts for Reconnecting {
    fn forward(
        &self,
        layer: usize,
        hidden: &[f32],
        routing: &Routing,
    ) -> Result<Vec<f32>, ModelError> {
        let client = self.client()?;
        let out = client.forward(layer, hidden, routing);
        if let Err(ModelError::Experts(_)) = &out {
            // Dead, stalled or refusing: drop this stream; a later call connects again.
            let mut cur = self.current.lock().unwrap_or_else(PoisonError::into_inner);
            if cur.as_ref().is_some_and(|c| Arc::ptr_eq(c, &client)) {
                *cur = None;
                *self.last_attempt.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now();
            }
        }
        out
    }
}
