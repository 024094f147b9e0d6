//! The expert tier: routed experts served over gRPC (`kt.v1.Expert`), and the worker's client.
//!
//! * [`ExpertService`] answers the `Forward` stream over a [`kt_models::LocalExperts`],
//!   computing on a dedicated thread pool (pinned to a NUMA node's CPUs when asked, see
//!   [`numa`]), never on the async executor. [`serve`] runs it on a listener; [`ServerHandle`]
//!   runs it on its own runtime (tests, `kt serve`).
//!   It also offers shared-memory rings (`OpenShm`, kt-proto's [`kt_proto::shm`]) to clients
//!   on the same host, all served by one polling job on the compute pool (no hand-off
//!   between threads per call).
//! * [`RemoteExperts`] implements [`kt_models::Experts`] over ONE long-lived `Forward` stream
//!   per server, plus a shared-memory ring when both sides prove they share `/dev/shm`; each
//!   call blocks on its answer with a timeout; a dead link reconnects with backoff.
//! * [`Selection`] parses `--experts` specs (which experts a server holds); [`load_plan`]
//!   takes them from a placement plan instead ([`placement`]), slices included.
//! * [`metrics`]: the server's Prometheus counters and their HTTP endpoint.
//! * [`failover`]: a plan's replicas on the worker's side — a server's calls go to a replica
//!   while it is unreachable ([`FailoverExperts`]) — and [`TierHealth`], whether every share
//!   has a reachable holder (the worker's `Health`). [`connect_plan_tier`] builds both.
//!
//! Both sides prove they serve the same model at connect: the worker calls `Info` and compares
//! the [`config_hash`]es (and, from a plan, the placement: [`Holding`]), and sends its hash on
//! `Forward`, where the server refuses a different one.

pub mod bench;
pub mod failover;
pub mod metrics;
pub mod numa;
pub mod placement;
mod remote;
mod select;
mod server;

pub use failover::{FailoverExperts, TierHealth, TierStatus};
pub use kt_proto::{Limits, WireDType};
pub use placement::{connect_plan, connect_plan_tier, PlanExperts, SlicedExperts};
pub use remote::{Holding, LinkKind, RemoteExperts, RemoteOptions, ShmMode};
pub use select::Selection;
pub use server::{
    io_runtime, load, load_plan, serve, ExpertService, ServerHandle, ServerOptions,
    DEFAULT_ANSWER_SPIN, DEFAULT_SHM_DIR,
};

use kt_models::ModelConfig;
use kt_proto::v1::ModelIdentity;

/// Errors of the expert tier.
#[derive(Debug, thiserror::Error)]
pub enum ExpertError {
    #[error(transparent)]
    Model(#[from] kt_models::ModelError),
    #[error("--experts `{spec}`: {reason}")]
    Spec { spec: String, reason: String },
    #[error("expert server {addr}: cannot connect: {reason}")]
    Connect { addr: String, reason: String },
    #[error(
        "expert server {addr} serves a different model: it has `{theirs}` (config hash {theirs_hash:016x}), this process has `{ours}` (config hash {ours_hash:016x})"
    )]
    ModelMismatch { addr: String, ours: String, ours_hash: u64, theirs: String, theirs_hash: u64 },
    #[error("expert server {addr}: {reason}")]
    Protocol { addr: String, reason: String },
    #[error("expert server {addr} does not hold what this worker expects: {reason}")]
    PlacementMismatch { addr: String, reason: String },
    #[error("plan {file}: {reason}")]
    Plan { file: String, reason: String },
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("transport: {0}")]
    Transport(String),
    #[error("bench: {0}")]
    Bench(String),
}

/// 64-bit FNV-1a of the parsed config's text form: equal hashes mean both processes compute
/// the same function at the expert seam (and around it).
pub fn config_hash(config: &ModelConfig) -> u64 {
    let text = format!("{config:?}");
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// What `Info` says about the model `config` loaded from `name`.
pub fn identity(name: &str, config: &ModelConfig) -> ModelIdentity {
    let moe = config.moe.as_ref();
    ModelIdentity {
        name: name.to_string(),
        arch: format!("{:?}", config.arch).to_lowercase(),
        config_hash: config_hash(config),
        hidden: config.hidden as u32,
        n_layers: config.n_layers as u32,
        n_experts: moe.map_or(0, |m| m.n_experts as u32),
        top_k: moe.map_or(0, |m| m.top_k as u32),
    }
}
