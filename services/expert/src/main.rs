//! `kt-expert`: serves the routed experts of one model over gRPC (`kt.v1.Expert`) and, to
//! workers on the same host, over shared-memory rings. Which experts: the placement plan's
//! share for `--name` (`--plan`), or `--experts`. Wiring only; the server lives in the
//! `kt-expert` library.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use kt_expert::{Selection, ServerOptions};

/// Environment variable names of the flags (one place, as STYLE.md asks).
mod env {
    pub const MODEL: &str = "KT_EXPERT_MODEL";
    pub const GGUF: &str = "KT_EXPERT_GGUF";
    pub const LISTEN: &str = "KT_EXPERT_LISTEN";
    pub const NAME: &str = "KT_EXPERT_NAME";
    pub const NUMA: &str = "KT_EXPERT_NUMA";
    pub const EXPERTS: &str = "KT_EXPERT_EXPERTS";
    pub const THREADS: &str = "KT_EXPERT_THREADS";
    pub const MATMUL: &str = "KT_EXPERT_MATMUL";
    pub const PLAN: &str = "KT_EXPERT_PLAN";
    pub const METRICS: &str = "KT_EXPERT_METRICS";
    pub const SHM_DIR: &str = "KT_EXPERT_SHM_DIR";
    pub const NO_SHM: &str = "KT_EXPERT_NO_SHM";
    pub const MAX_MESSAGE_BYTES: &str = "KT_EXPERT_MAX_MESSAGE_BYTES";
    pub const MAX_TOKENS: &str = "KT_EXPERT_MAX_TOKENS";
    pub const ANSWER_SPIN_US: &str = "KT_EXPERT_ANSWER_SPIN_US";
    pub const INT8_FROM: &str = "KT_EXPERT_INT8_FROM";
    pub const AWAKE_AFTER_GRPC: &str = "KT_EXPERT_AWAKE_AFTER_GRPC";
}

#[derive(Parser, Debug)]
#[command(name = "kt-expert", version, about = "Serve a model's routed experts over gRPC")]
struct Args {
    /// Model: HF folder, GGUF file, or folder of GGUF files.
    #[arg(long, env = env::MODEL)]
    model: PathBuf,
    /// GGUF weights paired with the HF folder given as --model.
    #[arg(long, env = env::GGUF)]
    gguf: Option<PathBuf>,
    /// Address to listen on, e.g. 0.0.0.0:50061 (port 0 picks one; the bound address is
    /// printed on stdout as `listening on ADDR`).
    #[arg(long, env = env::LISTEN, default_value = "127.0.0.1:50061")]
    listen: String,
    /// This server's name, as placement plans refer to it (required with --plan).
    #[arg(long, env = env::NAME, default_value = "")]
    name: String,
    /// Placement plan (rules/*.yaml): hold what its expert tier gives the server --name,
    /// including the intermediate slice. Overrides --experts' default; giving both is an
    /// error.
    #[arg(long, env = env::PLAN)]
    plan: Option<PathBuf>,
    /// Pin compute threads to this NUMA node's CPUs (ignored, with a warning, where the node
    /// is not described in /sys/devices/system/node).
    #[arg(long, env = env::NUMA)]
    numa: Option<usize>,
    /// Experts to hold (manual placement, without --plan): all | none | mod:M:R |
    /// range:A-B | list:A,B,..., optionally per layer range as `0-3@all;4-@mod:2:0`.
    /// Default: all.
    #[arg(long, env = env::EXPERTS)]
    experts: Option<String>,
    /// Compute threads (default: the NUMA node's CPUs, or all CPUs).
    #[arg(long, env = env::THREADS)]
    threads: Option<usize>,
    /// A gRPC call waits for its answer awake (its I/O thread kept from sleeping, which saves
    /// a wake-up per call) for up to this many µs, while recent calls computed within it;
    /// longer computations are awaited asleep. 0 = always asleep.
    #[arg(long, env = env::ANSWER_SPIN_US, default_value_t = 50)]
    answer_spin_us: u64,
    /// Serve Prometheus metrics on this address (`GET /metrics`), e.g. 0.0.0.0:9161; port 0
    /// picks one (printed on stdout as `metrics on ADDR`).
    #[arg(long, env = env::METRICS)]
    metrics: Option<String>,
    /// Directory for shared-memory rings offered to workers on this host.
    #[arg(long, env = env::SHM_DIR, default_value = kt_expert::DEFAULT_SHM_DIR)]
    shm_dir: PathBuf,
    /// Offer no shared memory (every worker uses gRPC).
    #[arg(long, env = env::NO_SHM)]
    no_shm: bool,
    /// Products: f32 (exact, the reference) or ggml (activations quantized as llama.cpp does:
    /// the fast fused/VNNI expert kernels for quantized weights).
    #[arg(long, env = env::MATMUL, value_enum, default_value_t = Matmul::F32)]
    matmul: Matmul,
    /// Largest request message accepted, bytes (bigger ones end their stream with
    /// OUT_OF_RANGE). Default 256 MiB.
    #[arg(long, env = env::MAX_MESSAGE_BYTES)]
    max_message_bytes: Option<usize>,
    /// Most tokens per request. Default 8192.
    #[arg(long, env = env::MAX_TOKENS)]
    max_tokens: Option<usize>,
    /// With a plan whose `experts.kernel` is `{decode: native, prefill: amx_int8}`: tokens per
    /// call from which the repacked amx_int8 experts (AMX where the CPU has it) compute it.
    #[arg(long, env = env::INT8_FROM, default_value_t = kt_models::moe::DEFAULT_INT8_FROM)]
    int8_from: usize,
    /// Keep the compute pool's poller awake for 2 ms after each gRPC call, so the next call
    /// starts without a thread wake-up (one core kept busy while calls flow). Default: on with
    /// at least 4 CPUs.
    #[arg(long, env = env::AWAKE_AFTER_GRPC)]
    awake_after_grpc: Option<bool>,
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
    let defaults = kt_expert::Limits::default();
    let limits = kt_expert::Limits {
        max_tokens: args.max_tokens.unwrap_or(defaults.max_tokens),
        max_message_bytes: args.max_message_bytes.unwrap_or(defaults.max_message_bytes),
    };
    let opts = ServerOptions {
        limits,
        name: args.name.clone(),
        numa: args.numa,
        threads: args.threads,
        answer_spin: std::time::Duration::from_micros(args.answer_spin_us),
        prefill_from: args.int8_from,
        awake_after_grpc: args
            .awake_after_grpc
            .unwrap_or(ServerOptions::default().awake_after_grpc),
        shm_dir: (!args.no_shm).then(|| args.shm_dir.clone()),
        mode: match args.matmul {
            Matmul::F32 => kt_models::MatmulMode::F32,
            Matmul::Ggml => kt_models::MatmulMode::Ggml,
        },
        ..ServerOptions::default()
    };
    let service = match (&args.plan, &args.experts) {
        (Some(_), Some(_)) => {
            anyhow::bail!("--plan and --experts both say which experts to hold; give one")
        }
        (Some(plan), None) => {
            if args.name.is_empty() {
                anyhow::bail!("--plan needs --name: which of the plan's expert servers this is");
            }
            kt_expert::load_plan(&args.model, args.gguf.as_deref(), plan, opts)
        }
        (None, spec) => {
            let selection: Selection = spec.as_deref().unwrap_or("all").parse()?;
            kt_expert::load(&args.model, args.gguf.as_deref(), &selection, opts)
        }
    }
    .with_context(|| format!("loading experts of {}", args.model.display()))?;
    let info = service.info();
    tracing::info!(
        name = %info.name,
        layers = info.held.len(),
        experts = info.held.iter().map(|l| l.experts.len()).sum::<usize>(),
        bytes = info.bytes_held,
        weight_type = %info.weight_type,
        isa = %info.kernel_isa,
        slice = ?info.slice.map(|s| (s.start, s.end)),
        plan = ?info.plan.as_ref().map(|p| p.file.as_str()),
        "experts loaded"
    );
    let metrics = service.metrics();
    // One I/O thread (kt_expert::io_runtime), as `kt bench transport` measures: the calls
    // compute on the pinned pool, and a call's request and answer are handled on one thread
    // without waking another.
    let runtime = kt_expert::io_runtime()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        let addr = listener.local_addr()?;
        if let Some(m) = &args.metrics {
            let ml = tokio::net::TcpListener::bind(m)
                .await
                .with_context(|| format!("binding the metrics address {m}"))?;
            println!("metrics on {}", ml.local_addr()?);
            tokio::spawn(async move {
                if let Err(err) =
                    kt_expert::metrics::serve_metrics(ml, metrics, std::future::pending()).await
                {
                    tracing::error!(%err, "metrics endpoint stopped");
                }
            });
        }
        println!("listening on {addr}");
        tracing::info!(%addr, "serving kt.v1.Expert");
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("shutting down");
        };
        kt_expert::serve(service, listener, shutdown).await?;
        Ok(())
    })
}
