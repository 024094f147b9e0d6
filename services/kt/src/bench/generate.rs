//! `kt bench generate`: flags and printing; the measuring is `kt_models::bench_generate`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use kt_models::bench_generate::{self, GenerateBenchConfig};
use kt_models::MatmulMode;

use crate::Matmul;

#[derive(Args)]
pub struct GenerateArgs {
    /// HF folder, GGUF file, or folder of GGUF files (as `kt generate --model` takes).
    #[arg(long, env = "KT_BENCH_MODEL")]
    model: PathBuf,
    /// GGUF weights (file or folder) to pair with the HF folder given by --model.
    #[arg(long, env = "KT_GGUF")]
    gguf: Option<PathBuf>,
    /// Prompt tokens per sequence (synthetic ids, consecutive from --seed).
    #[arg(long, default_value_t = 512, env = "KT_BENCH_PROMPT_LEN")]
    prompt_len: usize,
    /// Tokens generated per sequence, greedily; end-of-sequence tokens do not stop it.
    #[arg(long, default_value_t = 64, env = "KT_BENCH_GEN_LEN")]
    gen_len: usize,
    /// Compute threads (0: all CPUs).
    #[arg(long, default_value_t = 0, env = "KT_BENCH_THREADS")]
    threads: usize,
    /// Sequences prefilled and decoded together (rates count the tokens of all).
    #[arg(long, default_value_t = 1, env = "KT_BENCH_BATCH")]
    batch: usize,
    /// How activations meet quantized weights (ggml: quantized activations, the fast path).
    #[arg(long, value_enum, default_value_t = Matmul::Ggml, env = "KT_MATMUL")]
    matmul: Matmul,
    /// Repack the routed experts to amx_int8 after loading (on the bench's threads; timed
    /// apart) and compute steps of at least this many tokens on them (prefill; AMX on CPUs
    /// that have it), shorter ones on the GGUF weights; 0: every step. Without it, the GGUF
    /// weights only.
    #[arg(long, env = "KT_INT8_FROM")]
    int8_from: Option<usize>,
    /// First token id of the synthetic prompt.
    #[arg(long, default_value_t = 0, env = "KT_BENCH_SEED")]
    seed: u64,
    /// Skip the untimed warm-up prefill.
    #[arg(long, env = "KT_BENCH_NO_WARMUP")]
    no_warmup: bool,
    /// Print one JSON object on stdout instead of lines.
    #[arg(long, env = "KT_BENCH_JSON")]
    json: bool,
}

pub fn run(a: GenerateArgs) -> Result<()> {
    let (mode, matmul) = match a.matmul {
        Matmul::F32 => (MatmulMode::F32, "f32"),
        Matmul::Ggml => (MatmulMode::Ggml, "ggml"),
    };
    let cfg = GenerateBenchConfig {
        prompt_len: a.prompt_len,
        gen_len: a.gen_len,
        batch: a.batch,
        threads: a.threads,
        seed: a.seed,
        warmup: !a.no_warmup,
        mode,
        int8_from: a.int8_from,
    };
    let r = bench_generate::run(&a.model, a.gguf.as_deref(), &cfg)
        .with_context(|| format!("benchmarking {}", a.model.display()))?;
    let mut out = std::io::stdout().lock();
    let model = a.model.display().to_string();
    if a.json {
        // Count fields avoid "tok" in their names: tests/bench/compare_peers.py takes the
        // first number whose key holds "prefill"/"decode" and looks like a rate.
        let v = serde_json::json!({
            "model": model,
            "matmul": matmul,
            "threads": r.threads,
            "batch": r.batch,
            "prompt_len": r.prompt_len,
            "gen_len": r.gen_len,
            "generated": r.tokens.first().map_or(0, Vec::len),
            "load_s": r.load_s,
            "repack_s": r.repack_s,
            "experts_kernel": r.experts_kernel.map(|k| k.to_string()),
            "prefill_s": r.prefill_s,
            "decode_s": r.decode_s,
            "prefill_tokens_per_s": r.prefill_tokens_per_s,
            "decode_tokens_per_s": r.decode_tokens_per_s,
        });
        writeln!(out, "{v}")?;
        return Ok(());
    }
    writeln!(out, "model    {model} (matmul {matmul})")?;
    writeln!(out, "threads  {}", r.threads)?;
    writeln!(out, "batch    {}", r.batch)?;
    writeln!(out, "load     {:.3} s", r.load_s)?;
    if let Some(k) = r.experts_kernel {
        writeln!(out, "experts  {k}")?;
    }
    if let Some(s) = r.repack_s {
        writeln!(out, "repack   {s:.3} s (routed experts to amx_int8)")?;
    }
    writeln!(
        out,
        "prefill  {:.2} tokens/s ({} × {} prompt tokens in {:.3} s, to the first generated token)",
        r.prefill_tokens_per_s, r.batch, r.prompt_len, r.prefill_s
    )?;
    match r.decode_tokens_per_s {
        Some(rate) => writeln!(
            out,
            "decode   {rate:.2} tokens/s ({} × {} tokens in {:.3} s)",
            r.batch,
            r.gen_len - 1,
            r.decode_s
        )?,
        None => writeln!(out, "decode   - (--gen-len 1: no token after the first)")?,
    }
    Ok(())
}
