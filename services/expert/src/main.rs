//! `kt-expert`: serves the routed experts of one model (those `--experts` selects) over gRPC
//! (`kt.v1.Expert`). Wiring only; the server lives in the `kt-expert` library.

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
    /// This server's name, as placement plans refer to it.
    #[arg(long, env = env::NAME, default_value = "")]
    name: String,
    /// Pin compute threads to this NUMA node's CPUs (ignored, with a warning, where the node
    /// is not described in /sys/devices/system/node).
    #[arg(long, env = env::NUMA)]
    numa: Option<usize>,
    /// Experts to hold: all | none | mod:M:R | range:A-B | list:A,B,..., optionally per
    /// layer range as `0-3@all;4-@mod:2:0`.
    #[arg(long, env = env::EXPERTS, default_value = "all")]
    experts: String,
    /// Compute threads (default: the NUMA node's CPUs, or all CPUs).
    #[arg(long, env = env::THREADS)]
    threads: Option<usize>,
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
    let selection: Selection = args.experts.parse()?;
    let opts = ServerOptions {
        name: args.name.clone(),
        numa: args.numa,
        threads: args.threads,
        ..ServerOptions::default()
    };
    let service = kt_expert::load(&args.model, args.gguf.as_deref(), &selection, opts)
        .with_context(|| format!("loading experts of {}", args.model.display()))?;
    let info = service.info();
    tracing::info!(
        name = %info.name,
        layers = info.held.len(),
        experts = info.held.iter().map(|l| l.experts.len()).sum::<usize>(),
        bytes = info.bytes_held,
        weight_type = %info.weight_type,
        isa = %info.kernel_isa,
        "experts loaded"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        let addr = listener.local_addr()?;
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
