//! The gateway tier: OpenAI- and Ollama-compatible HTTP APIs in front of kt workers.
//!
//! Requests are tokenized and templated here (the model's tokenizer and chat template, read
//! from its GGUF header or Hugging Face folder; no weights), admitted through a bounded queue,
//! routed to a worker by load with prefix affinity ([`pool`] docs), generated through the
//! `kt.v1.Worker` `Generate` stream, and streamed back with streaming detokenization and stop
//! strings. A client that goes away cancels its sequence on the worker.
//!
//! # Routes
//! * OpenAI: `POST /v1/chat/completions`, `POST /v1/completions` (with `suffix` for
//!   fill-in-the-middle where the tokenizer has FIM tokens), `GET /v1/models`,
//!   `GET /v1/models/{id}`;
//! * Ollama: `POST /api/chat`, `POST /api/generate`, `GET /api/tags`, `POST /api/show`,
//!   `GET /api/ps`, `GET /api/version`;
//! * operations: `GET /health` (liveness), `GET /ready` (503 while no worker is healthy),
//!   `GET /metrics` (Prometheus, names in [`names::metrics`]);
//! * the web UI at `/` and `/web/` (files embedded from `web/`).
//!
//! Errors follow one table ([`ApiError`]): OpenAI-shaped bodies everywhere except `/api`,
//! which gets Ollama's `{"error": ...}`.
//!
//! # Embedding (`kt serve`)
//! The gateway takes its workers as `tonic` channels, so in-process workers use the same code
//! as remote ones. [`in_process_channel`] turns a `WorkerServer` in this process into a
//! channel over an in-memory pipe:
//!
//! ```no_run
//! use kt_gateway::{in_process_channel, Gateway, GatewayConfig, ModelCard, WorkerEndpoint};
//! use kt_proto::v1::worker_server::WorkerServer;
//!
//! # async fn serve(my_worker: kt_gateway::sim::SimWorker) -> Result<(), Box<dyn std::error::Error>> {
//! // Any `kt_proto::v1::worker_server::Worker` implementation; the real one is kt-worker's.
//! let channel = in_process_channel(WorkerServer::new(my_worker));
//! let workers = vec![WorkerEndpoint { name: "local".into(), channel }];
//! let model = ModelCard::embedded()?; // or ModelCard::from_path(path, None)?
//! let gateway = Gateway::new(GatewayConfig::default(), model, workers)?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:11434").await?;
//! println!("listening on {}", listener.local_addr()?);
//! gateway.serve(listener, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```
//!
//! Remote workers: [`WorkerEndpoint::connect_lazy`]`("host:port")`. To mount the routes in a
//! bigger axum app, use [`Gateway::router`].
//!
//! # What JSON mode guarantees
//! See [`jsoncheck`]: the output is checked as it streams and cut at the end of the first
//! JSON object; the gateway cannot constrain the worker's sampling.
//!
//! # Tool calls and `tool_choice`
//! For chat templates that define tool calling ([`tools`] names the formats), calls are parsed
//! from the model's text and, when streaming, sent as `delta.tool_calls` pieces as soon as a
//! call's name is complete (then its arguments as they grow). `tool_choice: "required"` starts
//! the assistant's turn with the format's call marker, a named function also with the call's
//! name, so the model writes a call (for a named one only its arguments; generation stops where
//! the call's object closes). Sampling is not constrained: a reply that still is no valid call
//! is an error (500, naming `tool_choice`); one cut by `max_tokens` comes back as the partial
//! call with finish reason `length`.

mod admission;
pub mod affinity;
mod api;
pub mod bench;
mod engine;
pub mod error;
mod inproc;
pub mod jsoncheck;
pub mod metrics;
pub mod model;
pub mod names;
mod ollama;
mod openai;
pub mod pool;
mod server;
pub mod sim;
pub mod tools;
mod web;

pub use error::{ApiError, Flavor, GatewayError};
pub use inproc::in_process_channel;
pub use model::{ModelCard, ModelFacts};
pub use pool::{RoutingConfig, WorkerEndpoint};
pub use server::{Gateway, GatewayConfig};
