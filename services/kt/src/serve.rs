//! `kt serve`: the gateway, a worker and its routed experts in one process. The worker is
//! kt-worker's engine behind its `kt.v1.Worker` service, reached by the gateway over an
//! in-process channel (the same code paths as separate services); the routed experts are
//! held in this process and called directly through the expert seam.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use kt_gateway::{in_process_channel, Gateway, GatewayConfig, ModelCard, WorkerEndpoint};
use kt_plan::{Device, ExpertFormat, Limits, ModelShape, Plan};
use kt_worker::{CpuBackend, Engine, EngineOptions, KvSize, WorkerService};

use crate::ModelArgs;

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Address of the HTTP API (OpenAI, Ollama, web UI). Port 0 picks one; the bound address
    /// is printed on stdout as `listening on ADDR`.
    #[arg(long, env = "KT_SERVE_LISTEN", default_value = "127.0.0.1:11434")]
    listen: String,
    /// KV-cache memory in GiB (never more than --max-batch full contexts are allocated).
    #[arg(long, env = "KT_SERVE_KV_MEMORY", default_value_t = 2.0)]
    kv_memory: f64,
    /// Positions per KV-cache block.
    #[arg(long, env = "KT_SERVE_BLOCK_TOKENS", default_value_t = 16)]
    block_tokens: usize,
    /// Most sequences running at once.
    #[arg(long, env = "KT_SERVE_MAX_BATCH", default_value_t = 32)]
    max_batch: usize,
    /// Most tokens in one iteration (decode steps plus prefill chunks).
    #[arg(long, env = "KT_SERVE_MAX_BATCH_TOKENS", default_value_t = 512)]
    max_batch_tokens: usize,
    /// Routed experts per token, lower than the model's top-k ("selective experts").
    #[arg(long, env = "KT_SERVE_EXPERTS_PER_TOKEN")]
    experts_per_token: Option<usize>,
    /// API keys the gateway accepts (repeatable or comma-separated); none = no key needed.
    #[arg(long, env = "KT_SERVE_API_KEYS", value_delimiter = ',', hide_env_values = true)]
    api_key: Vec<String>,
    /// The model id clients use (default: the file or folder name; `qwen3moe-tiny` for the
    /// embedded model).
    #[arg(long, env = "KT_SERVE_MODEL_NAME")]
    model_name: Option<String>,
    /// A jinja chat template file that replaces the model's (e.g. one that defines tool calls).
    #[arg(long, env = "KT_SERVE_CHAT_TEMPLATE")]
    chat_template: Option<PathBuf>,
    /// Largest request body in bytes (413 above).
    #[arg(long, env = "KT_SERVE_MAX_BODY_BYTES", default_value_t = 4 << 20)]
    max_body_bytes: usize,
    /// Generations admitted at once (the gateway's admission limit, besides --max-batch).
    #[arg(long, env = "KT_SERVE_MAX_RUNNING", default_value_t = 512)]
    max_running: usize,
    /// Requests that may wait for admission (429 beyond).
    #[arg(long, env = "KT_SERVE_MAX_QUEUE", default_value_t = 1024)]
    max_queue: usize,
    /// Longest wait for admission in seconds (503 after).
    #[arg(long, env = "KT_SERVE_QUEUE_TIMEOUT_S", default_value_t = 30.0)]
    queue_timeout_s: f64,
    /// Origins allowed by CORS, repeatable or comma-separated (`*` = any); none = no CORS.
    #[arg(long = "cors-origin", env = "KT_SERVE_CORS_ORIGINS", value_delimiter = ',')]
    cors_origins: Vec<String>,
    /// A placement plan (rules/*.yaml), checked against the model as `kt plan check` does.
    /// Its expert kernel (`experts.kernel`) sets how the routed experts are computed here;
    /// all of them are held in this process, and `cuda:N` devices are not used (CPU only).
    #[arg(long, env = "KT_SERVE_PLAN", requires = "model")]
    plan: Option<PathBuf>,
}

pub fn run(args: ServeArgs) -> Result<()> {
    if !(args.kv_memory > 0.0 && args.kv_memory.is_finite()) {
        anyhow::bail!("--kv-memory {}: must be a positive number of GiB", args.kv_memory);
    }
    if !(args.queue_timeout_s >= 0.0 && args.queue_timeout_s.is_finite()) {
        anyhow::bail!("--queue-timeout-s {}: must be a number ≥ 0", args.queue_timeout_s);
    }
    let mut args = args;
    if let Some(plan) = &args.plan {
        args.model.int8_from = apply_plan(plan, &args.model)?;
    }
    let loaded = crate::load_model(&args.model)?;
    let (name, mut card) = match &args.model.model {
        Some(path) => {
            let name = args.model_name.clone().unwrap_or_else(|| model_name(path));
            let card = ModelCard::from_path(path, Some(name.clone()))
                .with_context(|| format!("reading the tokenizer of {}", path.display()))?;
            (name, card)
        }
        None => {
            let mut card = ModelCard::embedded().context("embedded model")?;
            if let Some(n) = &args.model_name {
                card.name = n.clone();
            }
            (card.name.clone(), card)
        }
    };
    if let Some(t) = &args.chat_template {
        let src = std::fs::read_to_string(t).with_context(|| format!("reading {}", t.display()))?;
        card = card
            .with_template_source(&src)
            .with_context(|| format!("compiling {}", t.display()))?;
    }
    let cfg = GatewayConfig {
        api_keys: args.api_key.clone(),
        max_body_bytes: args.max_body_bytes,
        max_running: args.max_running,
        max_queue: args.max_queue,
        queue_timeout: Duration::from_secs_f64(args.queue_timeout_s),
        cors_origins: args.cors_origins.clone(),
        ..GatewayConfig::default()
    };
    cfg.validate()?;
    let model = match args.experts_per_token {
        Some(k) => loaded.model.with_experts_per_token(k)?,
        None => loaded.model,
    };
    let size = KvSize::Bytes((args.kv_memory * (1u64 << 30) as f64) as usize);
    let backend = CpuBackend::sized(Arc::new(model), args.block_tokens, size, args.max_batch);
    let engine = Engine::start(
        backend,
        EngineOptions { max_batch: args.max_batch, max_batch_tokens: args.max_batch_tokens },
    )?;
    let m = engine.model();
    tracing::info!(
        model = %name,
        kv_blocks = m.total_blocks,
        block_tokens = m.block_tokens,
        experts_per_token = m.experts_per_token,
        "worker ready"
    );
    let service = WorkerService::new(engine, &name);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let channel = in_process_channel(service.into_server());
        let workers = vec![WorkerEndpoint { name: "local".into(), channel }];
        let gateway = Gateway::new(cfg, card, workers)?;
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        let addr = listener.local_addr()?;
        println!("listening on {addr}");
        eprintln!("kt serve: {name} at http://{addr} (OpenAI /v1, Ollama /api, web UI /)");
        gateway
            .serve(listener, async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
        Ok(())
    })
}

/// A model's name: its file or folder name.
fn model_name(path: &std::path::Path) -> String {
    let p = PathBuf::from(path);
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into())
}

/// Checks the plan at `path` against the model as `kt plan check` does and returns the
/// `--int8-from` its expert kernel asks for. One process holds every routed expert and
/// computes on the CPU, so the plan's server split and GPU devices are reported, not applied.
fn apply_plan(path: &Path, model: &ModelArgs) -> Result<Option<usize>> {
    let Some(model_path) = &model.model else {
        bail!("--plan needs --model (the plan is checked against the model's shape)");
    };
    let plan = Plan::load(path)?;
    let shape = ModelShape::open(model_path, None)
        .with_context(|| format!("{}: reading the model's shape", plan.file))?;
    let placement = crate::plan::checked(&plan, &shape, &Limits::default())?;
    let (decode, prefill) = match &plan.experts {
        Some(t) => (t.decode, t.prefill),
        None => (ExpertFormat::Native, ExpertFormat::Native),
    };
    let int8_from = crate::plan::int8_from_for(decode, prefill, model.int8_from)
        .map_err(|reason| anyhow::anyhow!("{}: experts.kernel: {reason}", plan.file))?;
    if let Some(flag) = model.int8_from.filter(|_| int8_from != model.int8_from) {
        tracing::warn!(
            plan = %plan.file,
            "--int8-from {flag} is overridden by the plan's experts.kernel.decode amx_int8 \
             (every call)"
        );
    }
    let gpus: Vec<String> = plan
        .devices
        .iter()
        .chain(plan.experts.as_ref().and_then(|t| t.hot.as_ref()).map(|h| &h.device))
        .filter(|d| matches!(d, Device::Cuda(_)))
        .map(|d| d.to_string())
        .collect();
    if !gpus.is_empty() {
        tracing::warn!(
            plan = %plan.file,
            "the plan places tensors on {}, but kt serve computes on the CPU only: its GPU \
             placement is not applied (run kt-worker --plan for GPUs)",
            gpus.join(", ")
        );
    }
    let held: BTreeSet<(usize, usize)> =
        placement.servers.iter().flat_map(|s| s.held.iter().copied()).collect();
    let servers: Vec<&str> =
        plan.experts.iter().flat_map(|t| t.servers.iter().map(|s| s.name.as_str())).collect();
    let kernel = match int8_from {
        Some(0) => "amx_int8 (every call)".to_string(),
        Some(n) => format!("amx_int8 from {n} tokens, GGUF fused below"),
        None => "native (the weights as stored)".to_string(),
    };
    let layers = shape.moe_layers().len();
    eprintln!(
        "kt serve: plan {}: all {} routed experts ({layers} MoE layers x {}) held in this \
         process (plan servers [{}] hold {} of them); kernel: {kernel}",
        plan.file,
        layers * shape.n_experts(),
        shape.n_experts(),
        servers.join(", "),
        held.len()
    );
    Ok(int8_from)
}
