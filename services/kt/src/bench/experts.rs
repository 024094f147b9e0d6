//! `kt bench experts`: flags and printing; the measuring is `kt_models::moe::bench`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use kt_models::moe::bench::{self, ExpertsBench, ExpertsBenchConfig, ExpertsBenchRow};

#[derive(Args)]
pub struct ExpertsArgs {
    /// The GGUF model (e.g. from `kt synth`).
    #[arg(long, env = "KT_BENCH_MODEL")]
    model: PathBuf,
    /// The MoE layer to measure (default: the first one).
    #[arg(long, env = "KT_BENCH_LAYER")]
    layer: Option<usize>,
    /// Tokens per call, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,4,16,64,512,2048",
        env = "KT_BENCH_TOKENS"
    )]
    tokens: Vec<usize>,
    /// Compute threads (0: all CPUs).
    #[arg(long, default_value_t = 0, env = "KT_BENCH_THREADS")]
    threads: usize,
    /// Also time the reference expert path for token counts up to this (0: never).
    #[arg(long, default_value_t = 0, env = "KT_BENCH_REFERENCE_UP_TO")]
    reference_up_to: usize,
    /// Tokens per tile of the tiled (prefill) schedule.
    #[arg(long, default_value_t = ExpertsBenchConfig::default().token_tile, env = "KT_BENCH_TILE")]
    tile: usize,
    /// Seconds of measuring per case (at least 3 calls after one warm-up).
    #[arg(long, default_value_t = 1.0, env = "KT_BENCH_SECONDS")]
    seconds: f64,
    /// MiB of the buffer the DRAM read bandwidth is measured on.
    #[arg(long, default_value_t = 1024, env = "KT_BENCH_DRAM_MIB")]
    dram_mib: usize,
    /// Also repack the layer's experts to `amx_int8` and time them (AMX prefill where the CPU
    /// has it); prints the AMX int8 peak and each int8 row's share of it.
    #[arg(long, env = "KT_BENCH_INT8")]
    int8: bool,
    /// With `--int8`: only the int8 schedules.
    #[arg(long, env = "KT_BENCH_INT8_ONLY", requires = "int8")]
    int8_only: bool,
    /// Print one JSON object on stdout instead of a table.
    #[arg(long, env = "KT_BENCH_JSON")]
    json: bool,
}

pub fn run(a: ExpertsArgs) -> Result<()> {
    let cfg = ExpertsBenchConfig {
        layer: a.layer,
        tokens: a.tokens,
        threads: a.threads,
        reference_up_to: a.reference_up_to,
        token_tile: a.tile,
        seconds: a.seconds,
        dram_mib: a.dram_mib,
        int8: a.int8,
        int8_only: a.int8_only,
        ..ExpertsBenchConfig::default()
    };
    let json = a.json;
    let mut out = std::io::stdout().lock();
    let mut header = false;
    let res = bench::run(&a.model, &cfg, |b: &ExpertsBench, r: &ExpertsBenchRow| {
        if json {
            return;
        }
        if !header {
            header = true;
            let _ = writeln!(
                out,
                "layer {} of {}: hidden {}, ff {}, {} experts top-{}, {} ({}); {} threads; \
                 DRAM read {:.1} GB/s",
                b.layer,
                a.model.display(),
                b.hidden,
                b.ff,
                b.n_experts,
                b.top_k,
                b.formats,
                b.isa,
                b.threads,
                b.dram_gbps
            );
            if let Some(peak) = b.amx_int8_tops {
                let _ = writeln!(out, "AMX int8 peak (all {} threads): {peak:.2} TOPS", b.threads);
            }
            let _ = writeln!(
                out,
                "{:>6} {:<9} {:>5} {:>11} {:>11} {:>9} {:>7} {:>7} {:>8} {:>6}",
                "tokens",
                "schedule",
                "calls",
                "median µs",
                "min µs",
                "MB/call",
                "GB/s",
                "% DRAM",
                "TFLOPS",
                "% AMX"
            );
        }
        let amx = r.amx_share.map_or(String::new(), |s| format!("{:.1}%", 100.0 * s));
        let _ = writeln!(
            out,
            "{:>6} {:<9} {:>5} {:>11.1} {:>11.1} {:>9.1} {:>7.2} {:>6.1}% {:>8.4} {amx:>6}",
            r.tokens,
            r.schedule,
            r.calls,
            r.median_us,
            r.min_us,
            r.bytes / 1e6,
            r.gbps,
            100.0 * r.bw_share,
            r.tflops
        );
        let _ = out.flush();
    })?;
    if json {
        let rows: Vec<serde_json::Value> = res
            .rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "tokens": r.tokens, "schedule": r.schedule, "calls": r.calls,
                    "median_us": r.median_us, "min_us": r.min_us, "bytes": r.bytes,
                    "gbps": r.gbps, "dram_share": r.bw_share, "tflops": r.tflops,
                    "amx_share": r.amx_share,
                })
            })
            .collect();
        let v = serde_json::json!({
            "layer": res.layer, "hidden": res.hidden, "ff": res.ff, "experts": res.n_experts,
            "top_k": res.top_k, "formats": res.formats, "isa": res.isa, "threads": res.threads,
            "dram_gbps": res.dram_gbps, "amx_int8_tops": res.amx_int8_tops,
            "switch_tokens": res.switch_tokens, "results": rows,
        });
        writeln!(out, "{v}")?;
    } else {
        match res.switch_tokens {
            Some(n) => writeln!(out, "tiled schedule faster from {n} tokens per call")?,
            None => writeln!(out, "tiled schedule not faster at any measured token count")?,
        }
    }
    Ok(())
}
