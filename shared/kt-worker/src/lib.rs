//! The worker tier: everything of a model that is not a routed expert, many sequences at once.
//!
//! * [`Backend`] is the device seam: a model's dense parts and one paged KV cache, running
//!   one batched iteration at a time. [`CpuBackend`] is the reference; a CUDA backend plugs
//!   in behind the same trait.
//! * [`Engine`] schedules: one thread owns the backend and runs iteration-level continuous
//!   batching (chunked prefill, admission by free KV blocks, preemption by recompute when
//!   the cache runs dry, per-sequence seeded sampling, cancellation that frees blocks at
//!   once). Requests go in through [`Engine::submit`]; each sequence's [`Event`]s come back
//!   on its own channel.
//! * [`WorkerService`] implements `kt.v1.Worker` over an engine; [`serve`] runs it on a TCP
//!   listener, and [`WorkerService::into_server`] gives the tonic server for an in-process
//!   channel (`kt serve` hands it to the gateway's `in_process_channel`).
//! * [`setup`] loads a model for a worker: routed experts held locally, or on expert servers
//!   ([`setup::ModelOptions::experts`], optionally ordered and checked by a placement plan).
//!
//! Embedding a worker in another process:
//!
//! ```no_run
//! # fn main() -> Result<(), kt_worker::WorkerError> {
//! use std::sync::Arc;
//! use kt_worker::{CpuBackend, Engine, EngineOptions, WorkerService};
//! let loaded = kt_worker::setup::load_model(&kt_worker::setup::ModelOptions::new("model/"))?;
//! let backend = CpuBackend::new(Arc::new(loaded.model), 16, 1024);
//! let engine = Engine::start(backend, EngineOptions::default())?;
//! let service = WorkerService::new(engine, &loaded.name);
//! // tonic: Server::builder().add_service(service.into_server()) ...
//! # let _ = service;
//! # Ok(())
//! # }
//! ```

pub mod backend;
pub mod cuda;
pub mod engine;
pub mod service;
pub mod setup;

pub use backend::{Backend, BatchStep, CpuBackend, KvSize};
pub use cuda::CudaBackend;
pub use engine::{
    Engine, EngineOptions, Event, Events, FinishReason, Finished, ModelSummary, Request, Stats,
    SubmitError, Token,
};
pub use service::{serve, WorkerService};

/// Errors of building or running a worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Model(#[from] kt_models::ModelError),
    #[error("{0}")]
    Config(String),
    #[error("expert server {0}")]
    Experts(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}
