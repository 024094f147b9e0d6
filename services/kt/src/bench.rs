//! `kt bench transport`: the round-trip time of one MoE-layer hop (worker ↔ expert seam) over
//! each transport that exists. The measuring is in `kt_expert::bench`.

use std::io::Write;

use anyhow::Result;
use clap::{Args, Subcommand, ValueEnum};
use kt_expert::bench::{self, BenchConfig, Measurement, Transport};
use kt_expert::WireDType;

mod experts;
mod gateway;
mod generate;

#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Round-trip time of one MoE-layer hop (hidden states + top-k out, expert sum back) per
    /// transport, with experts that answer at once: p50/p99/mean/min in µs.
    Transport(TransportArgs),
    /// One MoE layer's routed experts: µs per call, GB/s of expert weights (and share of the
    /// measured DRAM read bandwidth), TFLOPS, per token count and kernel schedule.
    Experts(experts::ExpertsArgs),
    /// The gateway's own added latency (p50/p99 to first token and per token) and its
    /// throughput at 1, 64 and 256 streams, against a simulated worker at a fixed rate.
    Gateway(gateway::GatewayArgs),
    /// The whole model on the CPU backend: prefill and decode tokens/s of a synthetic prompt
    /// and greedy generation.
    Generate(generate::GenerateArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum Dtype {
    Bf16,
    F32,
}

#[derive(Args)]
struct TransportArgs {
    /// Hidden sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "2048,7168", env = "KT_BENCH_HIDDEN")]
    hidden: Vec<usize>,
    /// Tokens per hop, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16,512", env = "KT_BENCH_TOKENS")]
    tokens: Vec<usize>,
    /// Measured hops per case (after warm-up). Default: by payload, 100 to 2000.
    #[arg(long, env = "KT_BENCH_ITERS")]
    iters: Option<usize>,
    /// Element type of hidden states on the wire.
    #[arg(long, value_enum, default_value_t = Dtype::Bf16, env = "KT_BENCH_DTYPE")]
    dtype: Dtype,
    /// Experts per token.
    #[arg(long, default_value_t = 8, env = "KT_BENCH_TOP_K")]
    top_k: usize,
    /// Transports to measure, comma-separated: in-process, shm, grpc.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "in-process,shm,grpc",
        env = "KT_BENCH_TRANSPORTS"
    )]
    transports: Vec<String>,
    /// Shared-memory directory for the shm transport.
    #[arg(long, default_value = kt_expert::DEFAULT_SHM_DIR, env = "KT_BENCH_SHM_DIR")]
    shm_dir: std::path::PathBuf,
    /// How long each side of the ring busy-spins before it yields the CPU, µs (0 = yield at
    /// once).
    #[arg(long, default_value_t = 0, env = "KT_BENCH_SHM_SPIN_US")]
    shm_spin_us: u64,
    /// How long the server's gRPC call task waits for a short computation awake, µs (0 =
    /// always asleep; see kt-expert --answer-spin-us).
    #[arg(long, default_value_t = 50, env = "KT_BENCH_ANSWER_SPIN_US")]
    answer_spin_us: u64,
    /// Print one JSON object on stdout instead of a table.
    #[arg(long, env = "KT_BENCH_JSON")]
    json: bool,
}

pub fn run(args: BenchArgs) -> Result<()> {
    match args.command {
        BenchCommand::Transport(a) => transport(a),
        BenchCommand::Experts(a) => experts::run(a),
        BenchCommand::Gateway(a) => gateway::run(a),
        BenchCommand::Generate(a) => generate::run(a),
    }
}

fn dtype_name(d: Option<WireDType>) -> &'static str {
    match d {
        Some(WireDType::Bf16) => "bf16",
        Some(WireDType::F32) => "f32",
        None => "-",
    }
}

fn transport(a: TransportArgs) -> Result<()> {
    let cfg = BenchConfig {
        hiddens: a.hidden,
        tokens: a.tokens,
        iters: a.iters,
        dtype: match a.dtype {
            Dtype::Bf16 => WireDType::Bf16,
            Dtype::F32 => WireDType::F32,
        },
        top_k: a.top_k,
        shm_dir: a.shm_dir,
        shm_spin: std::time::Duration::from_micros(a.shm_spin_us),
        answer_spin: std::time::Duration::from_micros(a.answer_spin_us),
        ..BenchConfig::default()
    };
    let transports = a
        .transports
        .iter()
        .map(|t| {
            Transport::parse(t.trim()).ok_or_else(|| {
                anyhow::anyhow!("--transports: `{t}` is not one of in-process, shm, grpc")
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let mut out = std::io::stdout().lock();
    if !a.json {
        writeln!(
            out,
            "one MoE-layer hop: [n × hidden] {} + top-{} ids/weights out, [n × hidden] back; \
             experts answer zeros at once (transport only); {cpus} CPUs",
            dtype_name(Some(cfg.dtype)),
            cfg.top_k
        )?;
        writeln!(
            out,
            "{:<13} {:>6} {:>6} {:>5} {:>6} {:>10} {:>10} {:>10} {:>10}",
            "transport", "hidden", "n", "wire", "iters", "p50 µs", "p99 µs", "mean µs", "min µs"
        )?;
        out.flush()?;
    }
    let json = a.json;
    let rows = bench::run(&cfg, &transports, |m: &Measurement| {
        if !json {
            let s = m.stats;
            let _ = writeln!(
                out,
                "{:<13} {:>6} {:>6} {:>5} {:>6} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
                m.transport.name(),
                m.hidden,
                m.tokens,
                dtype_name(m.dtype),
                s.iters,
                s.p50_us,
                s.p99_us,
                s.mean_us,
                s.min_us
            );
            let _ = out.flush();
        }
    })?;
    if json {
        let results: Vec<serde_json::Value> = rows
            .iter()
            .map(|m| {
                let s = m.stats;
                serde_json::json!({
                    "transport": m.transport.name(),
                    "hidden": m.hidden,
                    "tokens": m.tokens,
                    "wire_dtype": m.dtype.map(|d| dtype_name(Some(d))),
                    "bytes_out": m.bytes_out,
                    "bytes_back": m.bytes_back,
                    "iters": s.iters,
                    "p50_us": s.p50_us,
                    "p99_us": s.p99_us,
                    "mean_us": s.mean_us,
                    "min_us": s.min_us,
                    "max_us": s.max_us,
                })
            })
            .collect();
        let v = serde_json::json!({
            "dtype": dtype_name(Some(cfg.dtype)),
            "top_k": cfg.top_k,
            "cpus": cpus,
            "results": results,
        });
        writeln!(out, "{v}")?;
    }
    Ok(())
}
