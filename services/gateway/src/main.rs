//! `kt-gateway`: the OpenAI- and Ollama-compatible HTTP front of kt workers. Wiring only; the
//! gateway lives in the `kt-gateway` library.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use kt_gateway::{Gateway, GatewayConfig, ModelCard, RoutingConfig, WorkerEndpoint};

/// Environment variable names of the flags (one place, as STYLE.md asks).
mod env {
    pub const WORKERS: &str = "KT_GATEWAY_WORKERS";
    pub const LISTEN: &str = "KT_GATEWAY_LISTEN";
    pub const MODEL: &str = "KT_GATEWAY_MODEL";
    pub const MODEL_NAME: &str = "KT_GATEWAY_MODEL_NAME";
    pub const CHAT_TEMPLATE: &str = "KT_GATEWAY_CHAT_TEMPLATE";
    pub const API_KEYS: &str = "KT_GATEWAY_API_KEYS";
    pub const MAX_BODY_BYTES: &str = "KT_GATEWAY_MAX_BODY_BYTES";
    pub const MAX_RUNNING: &str = "KT_GATEWAY_MAX_RUNNING";
    pub const MAX_QUEUE: &str = "KT_GATEWAY_MAX_QUEUE";
    pub const QUEUE_TIMEOUT_S: &str = "KT_GATEWAY_QUEUE_TIMEOUT_S";
    pub const CORS_ORIGINS: &str = "KT_GATEWAY_CORS_ORIGINS";
    pub const DEFAULT_CONTEXT: &str = "KT_GATEWAY_DEFAULT_CONTEXT";
    pub const HEALTH_INTERVAL_MS: &str = "KT_GATEWAY_HEALTH_INTERVAL_MS";
    pub const HEALTH_TIMEOUT_MS: &str = "KT_GATEWAY_HEALTH_TIMEOUT_MS";
    pub const AFFINITY_BLOCK_TOKENS: &str = "KT_GATEWAY_AFFINITY_BLOCK_TOKENS";
    pub const AFFINITY_SLACK_TOKENS: &str = "KT_GATEWAY_AFFINITY_SLACK_TOKENS";
}

#[derive(Parser, Debug)]
#[command(
    name = "kt-gateway",
    version,
    about = "OpenAI- and Ollama-compatible HTTP front of kt workers"
)]
struct Args {
    /// Worker addresses (host:port), repeatable or comma-separated.
    #[arg(long = "worker", env = env::WORKERS, value_delimiter = ',', required = true)]
    workers: Vec<String>,
    /// Address to listen on; port 0 picks one. The bound address is printed on stdout as
    /// `listening on ADDR`.
    #[arg(long, env = env::LISTEN, default_value = "127.0.0.1:8080")]
    listen: String,
    /// The model's GGUF file or folder, or HF folder (only its tokenizer, chat template and
    /// header are read). Without it, the embedded default model's.
    #[arg(long, env = env::MODEL)]
    model: Option<PathBuf>,
    /// The model id clients use (default: the file name; `qwen3moe-tiny` for the embedded).
    #[arg(long, env = env::MODEL_NAME)]
    model_name: Option<String>,
    /// A jinja chat template file that replaces the model's.
    #[arg(long, env = env::CHAT_TEMPLATE)]
    chat_template: Option<PathBuf>,
    /// Accepted API keys, repeatable or comma-separated; none = no key needed.
    #[arg(long = "api-key", env = env::API_KEYS, value_delimiter = ',', hide_env_values = true)]
    api_keys: Vec<String>,
    /// Largest request body in bytes.
    #[arg(long, env = env::MAX_BODY_BYTES, default_value_t = 4 << 20)]
    max_body_bytes: usize,
    /// Generations admitted at once across all workers.
    #[arg(long, env = env::MAX_RUNNING, default_value_t = 512)]
    max_running: usize,
    /// Requests that may wait for admission (429 beyond).
    #[arg(long, env = env::MAX_QUEUE, default_value_t = 1024)]
    max_queue: usize,
    /// Longest wait for admission in seconds (503 after).
    #[arg(long, env = env::QUEUE_TIMEOUT_S, default_value_t = 30.0)]
    queue_timeout_s: f64,
    /// Origins allowed by CORS, repeatable or comma-separated (`*` = any); none = no CORS.
    #[arg(long = "cors-origin", env = env::CORS_ORIGINS, value_delimiter = ',')]
    cors_origins: Vec<String>,
    /// Context length when neither workers nor model say.
    #[arg(long, env = env::DEFAULT_CONTEXT, default_value_t = 4096)]
    default_context: u32,
    /// Time between worker health checks in ms.
    #[arg(long, env = env::HEALTH_INTERVAL_MS, default_value_t = 2000)]
    health_interval_ms: u64,
    /// Deadline of one health check in ms.
    #[arg(long, env = env::HEALTH_TIMEOUT_MS, default_value_t = 1000)]
    health_timeout_ms: u64,
    /// Prefix-affinity block size in tokens.
    #[arg(long, env = env::AFFINITY_BLOCK_TOKENS, default_value_t = 64)]
    affinity_block_tokens: usize,
    /// How many more outstanding tokens the affine worker may have than the least loaded.
    #[arg(long, env = env::AFFINITY_SLACK_TOKENS, default_value_t = 8192)]
    affinity_slack_tokens: i64,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let mut model = match &args.model {
        Some(p) => ModelCard::from_path(p, args.model_name.clone())
            .with_context(|| format!("reading the model at {}", p.display()))?,
        None => {
            let mut m = ModelCard::embedded()?;
            if let Some(n) = &args.model_name {
                m.name = n.clone();
            }
            m
        }
    };
    if let Some(t) = &args.chat_template {
        let src = std::fs::read_to_string(t).with_context(|| format!("reading {}", t.display()))?;
        model = model
            .with_template_source(&src)
            .with_context(|| format!("compiling {}", t.display()))?;
    }
    if !args.queue_timeout_s.is_finite() || args.queue_timeout_s < 0.0 {
        anyhow::bail!("--queue-timeout-s must be a number ≥ 0");
    }
    let cfg = GatewayConfig {
        api_keys: args.api_keys.clone(),
        max_body_bytes: args.max_body_bytes,
        max_running: args.max_running,
        max_queue: args.max_queue,
        queue_timeout: Duration::from_secs_f64(args.queue_timeout_s),
        cors_origins: args.cors_origins.clone(),
        default_context: args.default_context,
        routing: RoutingConfig {
            affinity_block_tokens: args.affinity_block_tokens,
            affinity_slack_tokens: args.affinity_slack_tokens,
            health_interval: Duration::from_millis(args.health_interval_ms),
            health_timeout: Duration::from_millis(args.health_timeout_ms),
            ..RoutingConfig::default()
        },
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let mut workers = Vec::new();
        for w in &args.workers {
            workers.push(
                WorkerEndpoint::connect_lazy(w).with_context(|| format!("worker address {w}"))?,
            );
        }
        let gateway = Gateway::new(cfg, model, workers)?;
        // Know the workers (health, context length) before answering anyone.
        gateway.check_workers().await;
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        let addr = listener.local_addr()?;
        println!("listening on {addr}");
        tracing::info!(%addr, workers = args.workers.len(), "kt-gateway serving");
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("shutting down; in-flight requests finish first");
        };
        gateway.serve(listener, shutdown).await?;
        Ok(())
    })
}
