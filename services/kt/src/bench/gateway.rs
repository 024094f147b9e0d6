//! `kt bench gateway`: the gateway's own added latency (to first token, per token) and its
//! throughput at several stream counts, against a simulated worker streaming at a fixed rate.
//! The measuring is in `kt_gateway::bench`.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use kt_gateway::affinity::CpuList;
use kt_gateway::bench::{self, BenchConfig, BenchRow, CpuSplit};

#[derive(Args)]
pub struct GatewayArgs {
    /// Concurrent streams per level, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,64,256", env = "KT_BENCH_CONCURRENCY")]
    concurrency: Vec<usize>,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 64, env = "KT_BENCH_GATEWAY_TOKENS")]
    tokens: u32,
    /// The simulated worker's time between tokens of one stream, ms.
    #[arg(long, default_value_t = 5.0, env = "KT_BENCH_TOKEN_INTERVAL_MS")]
    token_interval_ms: f64,
    /// Seconds per level.
    #[arg(long, default_value_t = 5.0, env = "KT_BENCH_SECONDS")]
    seconds: f64,
    /// Run the gateway on a runtime of its own, one thread per CPU, pinned to these CPUs
    /// (`0,1`, `2-9`, `0-3,8`); needs --load-cpus. Without both, everything shares one runtime
    /// on all CPUs.
    #[arg(long, env = "KT_BENCH_GATEWAY_CPUS", requires = "load_cpus")]
    gateway_cpus: Option<CpuList>,
    /// Run the sim worker and the clients on a runtime of their own, pinned to these CPUs;
    /// needs --gateway-cpus.
    #[arg(long, env = "KT_BENCH_LOAD_CPUS", requires = "gateway_cpus")]
    load_cpus: Option<CpuList>,
    /// Start the clients spread evenly over one request's duration instead of all at once,
    /// so requests arrive steadily rather than in waves of N.
    #[arg(long, env = "KT_BENCH_STAGGER")]
    stagger: bool,
    /// Print one JSON object on stdout instead of a table.
    #[arg(long, env = "KT_BENCH_JSON")]
    json: bool,
}

fn row_json(r: &BenchRow) -> serde_json::Value {
    serde_json::json!({
        "concurrency": r.concurrency, "requests": r.requests, "tokens": r.tokens,
        "wall_s": r.wall_s, "tokens_per_s": r.tokens_per_s,
        "offered_tokens_per_s": r.offered_tokens_per_s,
        "ttft_added_p50_us": r.ttft_added_p50_us, "ttft_added_p99_us": r.ttft_added_p99_us,
        "token_added_p50_us": r.token_added_p50_us, "token_added_p99_us": r.token_added_p99_us,
        "errors": r.errors,
    })
}

pub fn run(a: GatewayArgs) -> Result<()> {
    let positive = |v: f64| v > 0.0 && v.is_finite();
    if !positive(a.token_interval_ms) || !positive(a.seconds) {
        anyhow::bail!("--token-interval-ms and --seconds must be positive numbers");
    }
    let cfg = BenchConfig {
        concurrency: a.concurrency,
        tokens: a.tokens,
        token_interval: Duration::from_secs_f64(a.token_interval_ms / 1e3),
        duration: Duration::from_secs_f64(a.seconds),
        stagger: a.stagger,
        ..BenchConfig::default()
    };
    let split = match (a.gateway_cpus, a.load_cpus) {
        (Some(gateway), Some(load)) => {
            gateway.check_allowed().context("--gateway-cpus")?;
            load.check_allowed().context("--load-cpus")?;
            Some(CpuSplit { gateway, load })
        }
        _ => None,
    };
    let threads = |n: usize| if n == 1 { "1 thread".to_owned() } else { format!("{n} threads") };
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let placement = match &split {
        None => format!("sim, gateway and clients share {cpus} CPUs"),
        Some(s) => format!(
            "gateway on CPUs {} ({}), sim and clients on CPUs {} ({})",
            s.gateway,
            threads(s.gateway.len()),
            s.load,
            threads(s.load.len())
        ),
    };
    let mut out = std::io::stdout().lock();
    if !a.json {
        writeln!(
            out,
            "gateway added latency: sim worker at {} ms/token, {} tokens/request, streaming \
             /v1/chat/completions, clients starting {}; {placement}",
            a.token_interval_ms,
            a.tokens,
            if a.stagger { "spread over one request's duration" } else { "together" }
        )?;
        writeln!(
            out,
            "{:>7} {:>8} {:>9} {:>10} {:>10} {:>12} {:>12} {:>12} {:>12} {:>6}",
            "streams",
            "requests",
            "tokens",
            "tok/s",
            "offered",
            "ttft p50 µs",
            "ttft p99 µs",
            "tok p50 µs",
            "tok p99 µs",
            "errors"
        )?;
        out.flush()?;
    }
    let json = a.json;
    let rows = bench::run(&cfg, split.as_ref(), |r| {
        if !json {
            let _ = writeln!(
                out,
                "{:>7} {:>8} {:>9} {:>10.0} {:>10.0} {:>12.0} {:>12.0} {:>12.0} {:>12.0} {:>6}",
                r.concurrency,
                r.requests,
                r.tokens,
                r.tokens_per_s,
                r.offered_tokens_per_s,
                r.ttft_added_p50_us,
                r.ttft_added_p99_us,
                r.token_added_p50_us,
                r.token_added_p99_us,
                r.errors
            );
            let _ = out.flush();
        }
    })?;
    if json {
        let v = serde_json::json!({
            "cpus": cpus, "token_interval_ms": a.token_interval_ms, "tokens": a.tokens,
            "stagger": a.stagger,
            "gateway_cpus": split.as_ref().map(|s| s.gateway.to_string()),
            "load_cpus": split.as_ref().map(|s| s.load.to_string()),
            "results": rows.iter().map(row_json).collect::<Vec<_>>(),
        });
        writeln!(out, "{v}")?;
    }
    Ok(())
}
