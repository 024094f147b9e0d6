//! Building a worker's model from what the command line names: the weights, an optional
//! placement plan, and the expert servers that hold the routed experts.
//!
//! Without expert servers the worker holds every routed expert itself (a self-contained
//! worker). With them it loads none: each MoE layer asks, concurrently, every server that
//! holds some of the chosen experts ([`kt_models::ShardedExperts`]; with a plan's
//! `intermediate` split every server's partial sum, [`kt_expert::SlicedExperts`]) over one
//! long-lived link per server (shared memory on the same host, else gRPC), and adds the
//! answers. [`RemoteExperts`] reconnects a lost server with backoff, so the worker serves
//! again once the server is back; calls meanwhile fail with [`ModelError::Experts`] — unless
//! the plan gives the server replicas, which then answer its calls
//! ([`kt_expert::FailoverExperts`]). [`WorkerModel::experts_health`] tells the worker's
//! `Health` whether every share has a reachable holder.

use std::path::PathBuf;
use std::sync::Arc;

use kt_expert::failover::Member;
use kt_expert::{identity, RemoteExperts, RemoteOptions, TierHealth};
use kt_models::{Experts, MatmulMode, Model, ModelConfig, ShardedExperts};
use kt_plan::{ModelShape, Plan};

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
    /// The expert servers' state, when the routed experts are on servers.
    pub experts_health: Option<TierHealth>,
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
    let experts = match &plan {
        Some(plan) if plan.experts.is_some() && !opts.experts.is_empty() => {
            let shape = ModelShape::open(&opts.path, None)
                .map_err(|e| WorkerError::Config(format!("plan {}: {e}", plan.file)))?;
            let ours = identity(&name, &config);
            let addrs: Vec<(String, String)> =
                opts.experts.iter().map(|a| (a.name.clone(), a.addr.clone())).collect();
            let tier = kt_expert::connect_plan_tier(plan, &shape, &ours, &addrs, &opts.remote)
                .map_err(|e| WorkerError::Experts(e.to_string()))?;
            Some((tier.experts, tier.health))
        }
        Some(plan) if plan.experts.is_none() && !opts.experts.is_empty() => {
            return Err(WorkerError::Config(format!(
                "plan {} has no expert tier, but --expert servers were given",
                plan.file
            )));
        }
        _ if opts.experts.is_empty() => None,
        _ => Some(connect_servers(&name, &config, &opts.experts, &opts.remote)?),
    };
    let (model, experts_health) = match experts {
        None => (Model::load(config, parts.source.tensors(), parts.scheme, opts.mode)?, None),
        Some((experts, health)) => (
            Model::load_with(config, parts.source.tensors(), parts.scheme, opts.mode, &|_, _| {
                false
            })?
            .with_experts(experts),
            Some(health),
        ),
    };
    let model = match opts.experts_per_token {
        Some(k) => model.with_experts_per_token(k)?,
        None => model,
    };
    Ok(WorkerModel { model, name, eos_ids: parts.eos_ids, experts_health })
}

/// Without a plan: connects to every server, learns from `Info` what each holds, checks that
/// together they hold every routed expert, and shards calls by owner (no replicas: the
/// health is down while any server is).
fn connect_servers(
    name: &str,
    config: &ModelConfig,
    servers: &[ExpertAddr],
    opts: &RemoteOptions,
) -> Result<(Arc<dyn Experts>, TierHealth), WorkerError> {
    let Some(moe) = &config.moe else {
        return Err(WorkerError::Config(
            "expert servers were given, but the model has no routed experts".into(),
        ));
    };
    for (i, a) in servers.iter().enumerate() {
        if servers[..i].iter().any(|b| b.name == a.name) {
            return Err(WorkerError::Config(format!("--expert {} is given twice", a.name)));
        }
    }
    let ours = identity(name, config);
    let (nl, ne) = (config.n_layers, moe.n_experts);
    let mut sharded = ShardedExperts::new(config.hidden);
    let mut covered = vec![vec![false; ne]; nl];
    let mut groups = Vec::with_capacity(servers.len());
    for s in servers {
        let remote = RemoteExperts::connect(&s.addr, &ours, opts.clone())
            .map_err(|e| WorkerError::Experts(format!("{}: {e}", s.name)))?;
        let owns = remote.owns(nl, ne);
        for (row, mine) in covered.iter_mut().zip(&owns) {
            for (c, &o) in row.iter_mut().zip(mine) {
                *c |= o;
            }
        }
        let remote = Arc::new(remote);
        groups.push((Member::new(&s.name, &s.addr, remote.clone()), Vec::new(), None));
        sharded = sharded.add(remote, owns);
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
    Ok((Arc::new(sharded), TierHealth::new(groups)))
}
