//! `kt-worker`: serves `kt.v1.Worker` — a model's dense parts, a paged KV cache and sampling,
//! with continuous batching — over gRPC. Wiring only; the engine lives in `kt-worker`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use kt_worker::setup::{ExpertAddr, ModelOptions};
use kt_worker::{CpuBackend, CudaBackend, Engine, EngineOptions, KvSize, WorkerService};

/// Environment variable names of the flags (one place, as STYLE.md asks).
mod env {
    pub const MODEL: &str = "KT_WORKER_MODEL";
    pub const GGUF: &str = "KT_WORKER_GGUF";
    pub const PLAN: &str = "KT_WORKER_PLAN";
    pub const DEVICE: &str = "KT_WORKER_DEVICE";
    pub const EXPERT: &str = "KT_WORKER_EXPERT";
    pub const LISTEN: &str = "KT_WORKER_LISTEN";
    pub const KV_BLOCKS: &str = "KT_WORKER_KV_BLOCKS";
    pub const KV_MEMORY: &str = "KT_WORKER_KV_MEMORY";
    pub const BLOCK_TOKENS: &str = "KT_WORKER_BLOCK_TOKENS";
    pub const MAX_BATCH: &str = "KT_WORKER_MAX_BATCH";
    pub const MAX_BATCH_TOKENS: &str = "KT_WORKER_MAX_BATCH_TOKENS";
    pub const EXPERTS_PER_TOKEN: &str = "KT_WORKER_EXPERTS_PER_TOKEN";
    pub const EXPERT_TIMEOUT: &str = "KT_WORKER_EXPERT_TIMEOUT";
    pub const EXPERT_WAIT: &str = "KT_WORKER_EXPERT_WAIT";
    pub const MATMUL: &str = "KT_WORKER_MATMUL";
}

#[derive(Parser, Debug)]
#[command(
    name = "kt-worker",
    version,
    about = "Serve a model's dense parts and KV cache over gRPC"
)]
struct Args {
    /// Model: HF folder, GGUF file, or folder of GGUF files.
    #[arg(long, env = env::MODEL)]
    model: PathBuf,
    /// GGUF weights paired with the HF folder given as --model.
    #[arg(long, env = env::GGUF)]
    gguf: Option<PathBuf>,
    /// Placement plan (rules/*.yaml): names the expert servers that --expert gives addresses.
    #[arg(long, env = env::PLAN)]
    plan: Option<PathBuf>,
    /// Device to compute on: cpu, or cuda:N (attention, dense layers and the KV cache on GPU
    /// N in bf16; routed experts stay on the CPU tier), or cuda:0,cuda:1,... (layers split
    /// evenly across those GPUs).
    #[arg(long, env = env::DEVICE, default_value = "cpu")]
    device: String,
    /// An expert server holding routed experts, NAME=ADDR (repeat, or comma-separate in the
    /// environment variable). None: the routed experts are held in this process.
    #[arg(long = "expert", env = env::EXPERT, value_delimiter = ',')]
    experts: Vec<ExpertAddr>,
    /// Address to listen on, e.g. 0.0.0.0:50051 (port 0 picks one; the bound address is
    /// printed on stdout as `listening on ADDR`).
    #[arg(long, env = env::LISTEN, default_value = "127.0.0.1:50051")]
    listen: String,
    /// KV-cache blocks (default: as many as --kv-memory holds).
    #[arg(long, env = env::KV_BLOCKS, conflicts_with = "kv_memory")]
    kv_blocks: Option<usize>,
    /// KV-cache memory in GiB (default 2, and never more than --max-batch full contexts).
    #[arg(long, env = env::KV_MEMORY)]
    kv_memory: Option<f64>,
    /// Positions per KV-cache block.
    #[arg(long, env = env::BLOCK_TOKENS, default_value_t = 16)]
    block_tokens: usize,
    /// Most sequences running at once (scheduled in one iteration).
    #[arg(long, env = env::MAX_BATCH, default_value_t = 32)]
    max_batch: usize,
    /// Most tokens in one iteration (decode steps plus prefill chunks).
    #[arg(long, env = env::MAX_BATCH_TOKENS, default_value_t = 512)]
    max_batch_tokens: usize,
    /// Routed experts per token, lower than the model's top-k ("selective experts").
    #[arg(long, env = env::EXPERTS_PER_TOKEN)]
    experts_per_token: Option<usize>,
    /// Seconds to wait for an expert server's answer before the affected requests fail.
    #[arg(long, env = env::EXPERT_TIMEOUT, default_value_t = 30.0)]
    expert_timeout: f64,
    /// Seconds to keep retrying, at start, an expert server that cannot be reached yet (still
    /// loading, or started after the worker); 0 = fail at once. A server with the wrong model
    /// or placement fails the start at once.
    #[arg(long, env = env::EXPERT_WAIT, default_value_t = 120.0)]
    expert_wait: f64,
    /// Products on the CPU: f32 (exact, the reference) or ggml (activations quantized as
    /// llama.cpp does; the fast kernels for quantized weights, incl. locally held experts).
    #[arg(long, env = env::MATMUL, value_enum, default_value_t = Matmul::F32)]
    matmul: Matmul,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Matmul {
    F32,
    Ggml,
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
    let gpus: Option<Vec<usize>> = match args.device.as_str() {
        "cpu" => None,
        d => Some(
            d.split(',')
                .map(|one| match one.trim().strip_prefix("cuda:").map(str::parse::<usize>) {
                    Some(Ok(n)) => Ok(n),
                    _ => Err(anyhow::anyhow!(
                        "--device {d}: expected cpu, cuda:N or cuda:N,cuda:M,..."
                    )),
                })
                .collect::<anyhow::Result<_>>()?,
        ),
    };
    if !(args.expert_timeout > 0.0 && args.expert_timeout.is_finite()) {
        anyhow::bail!(
            "--expert-timeout {}: must be a positive number of seconds",
            args.expert_timeout
        );
    }
    if !(args.expert_wait >= 0.0 && args.expert_wait.is_finite()) {
        anyhow::bail!("--expert-wait {}: must be a number of seconds, 0 or more", args.expert_wait);
    }
    let mut opts = ModelOptions::new(&args.model);
    opts.gguf = args.gguf.clone();
    opts.plan = args.plan.clone();
    opts.experts = args.experts.clone();
    opts.experts_per_token = args.experts_per_token;
    opts.mode = match args.matmul {
        Matmul::F32 => kt_models::MatmulMode::F32,
        Matmul::Ggml => kt_models::MatmulMode::Ggml,
    };
    opts.remote.timeout = Duration::from_secs_f64(args.expert_timeout);
    opts.remote.start_wait = Duration::from_secs_f64(args.expert_wait);
    let loaded = kt_worker::setup::load_model(&opts)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let model = Arc::new(loaded.model);
    let size = match (args.kv_blocks, args.kv_memory) {
        (Some(n), _) => KvSize::Blocks(n),
        (None, gib) => {
            let gib = gib.unwrap_or(2.0);
            if !(gib > 0.0 && gib.is_finite()) {
                anyhow::bail!("--kv-memory {gib}: must be a positive number of GiB");
            }
            KvSize::Bytes((gib * (1u64 << 30) as f64) as usize)
        }
    };
    let engine_opts =
        EngineOptions { max_batch: args.max_batch, max_batch_tokens: args.max_batch_tokens };
    let engine = match gpus {
        None => Engine::start(
            CpuBackend::sized(model, args.block_tokens, size, args.max_batch),
            engine_opts,
        )?,
        Some(ns) => Engine::start(
            CudaBackend::open(model, &ns, args.block_tokens, size, args.max_batch)?,
            engine_opts,
        )?,
    };
    let m = engine.model();
    tracing::info!(
        model = %loaded.name,
        arch = m.config.arch.name(),
        kv_blocks = m.total_blocks,
        block_tokens = m.block_tokens,
        max_batch = args.max_batch,
        experts_per_token = m.experts_per_token,
        expert_servers = args.experts.len(),
        "worker ready"
    );
    // Health reports not serving while an expert server is down with no live replica.
    let service =
        WorkerService::new(engine, &loaded.name).with_expert_health(loaded.experts_health);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        let addr = listener.local_addr()?;
        println!("listening on {addr}");
        tracing::info!(%addr, "serving kt.v1.Worker");
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("shutting down");
        };
        kt_worker::serve(service, listener, shutdown).await?;
        Ok(())
    })
}
