//! `kt bench generate`: the whole model's prefill and decode rates on the CPU backend, in
//! this process.
//!
//! `batch` sequences, each a synthetic prompt of `prompt_len` token ids (consecutive ids from
//! a seed, wrapping at the vocabulary; sequence `b` starts `b · prompt_len` further on), are
//! prefilled in one batched step; then `gen_len` tokens per sequence are chosen greedily
//! (argmax of the logits, end-of-sequence ids ignored), the sequences decoding together one
//! token each per step. This is the forward pass `kt generate` runs ([`Model::forward_batch`]
//! with one sequence is [`Model::forward`]).
//!
//! Prefill rate: `batch · prompt_len` ÷ the time to the first generated token (the prompt's
//! step and the first argmax). Decode rate: `batch · (gen_len - 1)` ÷ the rest (none when
//! `gen_len` is 1). Loading, and the optional warm-up (one untimed prefill of the same shape,
//! so that memory-mapped weights are paged in as a benchmark's later runs would find them),
//! run on the same pool of `threads` threads as the measured steps.
//!
//! With `int8_from`, the routed experts are repacked to `amx_int8` after loading, on that pool
//! too ([`Model::repack_experts_int8`]: timed apart from loading), and computed with
//! [`ExpertKernel::Hybrid`]: steps of fewer than `int8_from` tokens (decode) on the GGUF
//! weights, longer ones (prefill) on the int8 copies (AMX on CPUs that have it).

use std::path::Path;
use std::time::Instant;

use crate::kv::{KvPool, SeqKv};
use crate::moe::ExpertKernel;
use crate::{load, MatmulMode, Model, ModelError, Step};

/// Positions per KV block of the benchmark's pool (as a [`Model::new_sequence`] holds).
const BLOCK_TOKENS: usize = 64;

/// What to measure.
#[derive(Clone, Debug)]
pub struct GenerateBenchConfig {
    /// Prompt tokens per sequence.
    pub prompt_len: usize,
    /// Generated tokens per sequence (exactly: end-of-sequence ids do not stop it).
    pub gen_len: usize,
    /// Sequences run together.
    pub batch: usize,
    /// Threads of the compute pool (0: all CPUs).
    pub threads: usize,
    /// First prompt token id (taken modulo the vocabulary).
    pub seed: u64,
    /// Run one untimed prefill of the same shape first.
    pub warmup: bool,
    /// How activations meet quantized weights.
    pub mode: MatmulMode,
    /// Repack the routed experts to `amx_int8` after loading and compute calls of at least
    /// this many tokens on them (0: every call); None keeps the GGUF kernels. Only [`run`]
    /// repacks ([`measure`] takes the model as it is).
    pub int8_from: Option<usize>,
}

impl Default for GenerateBenchConfig {
    fn default() -> Self {
        Self {
            prompt_len: 512,
            gen_len: 64,
            batch: 1,
            threads: 0,
            seed: 0,
            warmup: true,
            mode: MatmulMode::Ggml,
            int8_from: None,
        }
    }
}

/// What was measured.
#[derive(Clone, Debug)]
pub struct GenerateBench {
    pub threads: usize,
    pub batch: usize,
    pub prompt_len: usize,
    pub gen_len: usize,
    /// Seconds to load the model (0 when the caller passed a loaded one).
    pub load_s: f64,
    /// Seconds to repack the routed experts to `amx_int8` (None when they were not).
    pub repack_s: Option<f64>,
    /// The routed experts' kernel (None when the model computes them elsewhere).
    pub experts_kernel: Option<ExpertKernel>,
    /// Seconds from the prompt's step to the first generated token.
    pub prefill_s: f64,
    /// Seconds of the remaining `gen_len - 1` decode steps.
    pub decode_s: f64,
    /// `batch · prompt_len / prefill_s`.
    pub prefill_tokens_per_s: f64,
    /// `batch · (gen_len - 1) / decode_s`; `None` when `gen_len` is 1.
    pub decode_tokens_per_s: Option<f64>,
    /// The generated ids, per sequence (`gen_len` each).
    pub tokens: Vec<Vec<u32>>,
}

/// Loads the model at `path` (with `gguf` weights paired to an HF folder, as `kt generate`
/// takes them) on a pool of `cfg.threads` threads, repacks its experts there when
/// `cfg.int8_from` asks, and measures it there.
pub fn run(
    path: &Path,
    gguf: Option<&Path>,
    cfg: &GenerateBenchConfig,
) -> Result<GenerateBench, ModelError> {
    let pool = pool(cfg.threads)?;
    let t0 = Instant::now();
    let mut loaded = pool.install(|| load(path, gguf, cfg.mode))?;
    let load_s = t0.elapsed().as_secs_f64();
    let repack_s = match cfg.int8_from {
        Some(from) => {
            let t1 = Instant::now();
            pool.install(|| loaded.model.repack_experts_int8(from, |_, _| {}))?;
            Some(t1.elapsed().as_secs_f64())
        }
        None => None,
    };
    let mut res = pool.install(|| measure_here(&loaded.model, cfg))?;
    res.load_s = load_s;
    res.repack_s = repack_s;
    Ok(res)
}

/// Measures a loaded model on a pool of `cfg.threads` threads (`cfg.mode` is the model's
/// already).
pub fn measure(model: &Model, cfg: &GenerateBenchConfig) -> Result<GenerateBench, ModelError> {
    pool(cfg.threads)?.install(|| measure_here(model, cfg))
}

fn pool(threads: usize) -> Result<rayon::ThreadPool, ModelError> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| ModelError::Config(format!("thread pool of {threads}: {e}")))
}

/// The synthetic prompt of sequence `b`: `len` consecutive ids from `seed + b · len`, modulo
/// `vocab`.
pub fn synthetic_prompt(vocab: usize, seed: u64, b: usize, len: usize) -> Vec<u32> {
    let vocab = vocab.max(1) as u64;
    let start = seed.wrapping_add((b * len) as u64);
    (0..len as u64).map(|i| (start.wrapping_add(i) % vocab) as u32).collect()
}

/// Index of the largest logit (the first one of equals; NaN never wins).
fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

/// Measures on the current rayon pool.
fn measure_here(model: &Model, cfg: &GenerateBenchConfig) -> Result<GenerateBench, ModelError> {
    if cfg.prompt_len == 0 || cfg.gen_len == 0 || cfg.batch == 0 {
        return Err(ModelError::Input(format!(
            "prompt length {}, generated length {} and batch {} must all be at least 1",
            cfg.prompt_len, cfg.gen_len, cfg.batch
        )));
    }
    let context = model.config.max_position;
    if cfg.prompt_len + cfg.gen_len > context {
        tracing::warn!(
            "{} prompt + {} generated tokens exceed the model's context of {context}",
            cfg.prompt_len,
            cfg.gen_len
        );
    }
    let vocab = model.config.vocab_size;
    let prompts: Vec<Vec<u32>> =
        (0..cfg.batch).map(|b| synthetic_prompt(vocab, cfg.seed, b, cfg.prompt_len)).collect();
    if cfg.warmup {
        let mut pool = KvPool::growable(&model.config, BLOCK_TOKENS);
        let mut kvs: Vec<SeqKv> = (0..cfg.batch).map(|_| SeqKv::new()).collect();
        step(model, &mut pool, &mut kvs, &prompts)?;
    }
    let mut pool = KvPool::growable(&model.config, BLOCK_TOKENS);
    let mut kvs: Vec<SeqKv> = (0..cfg.batch).map(|_| SeqKv::new()).collect();
    let mut tokens: Vec<Vec<u32>> = vec![Vec::with_capacity(cfg.gen_len); cfg.batch];

    let t0 = Instant::now();
    let logits = step(model, &mut pool, &mut kvs, &prompts)?;
    for (out, l) in tokens.iter_mut().zip(&logits) {
        out.push(argmax(l));
    }
    let prefill_s = t0.elapsed().as_secs_f64();

    let t1 = Instant::now();
    for _ in 1..cfg.gen_len {
        let last: Vec<Vec<u32>> = tokens.iter().map(|t| t[t.len() - 1..].to_vec()).collect();
        let logits = step(model, &mut pool, &mut kvs, &last)?;
        for (out, l) in tokens.iter_mut().zip(&logits) {
            out.push(argmax(l));
        }
    }
    let decode_s = t1.elapsed().as_secs_f64();

    let decoded = cfg.batch * (cfg.gen_len - 1);
    Ok(GenerateBench {
        threads: rayon::current_num_threads(),
        batch: cfg.batch,
        prompt_len: cfg.prompt_len,
        gen_len: cfg.gen_len,
        load_s: 0.0,
        repack_s: None,
        experts_kernel: model.experts_kernel(),
        prefill_s,
        decode_s,
        prefill_tokens_per_s: (cfg.batch * cfg.prompt_len) as f64 / prefill_s.max(1e-9),
        decode_tokens_per_s: (decoded > 0).then(|| decoded as f64 / decode_s.max(1e-9)),
        tokens,
    })
}

/// One batched step: `inputs[b]` after what `kvs[b]` holds; the last logits of each.
fn step(
    model: &Model,
    pool: &mut KvPool,
    kvs: &mut [SeqKv],
    inputs: &[Vec<u32>],
) -> Result<Vec<Vec<f32>>, ModelError> {
    let mut steps: Vec<Step<'_>> =
        kvs.iter_mut().zip(inputs).map(|(kv, t)| Step { kv, tokens: t }).collect();
    model.forward_batch(pool, &mut steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_cycle_through_the_vocabulary() {
        assert_eq!(synthetic_prompt(5, 3, 0, 4), vec![3, 4, 0, 1]);
        assert_eq!(synthetic_prompt(5, 3, 1, 4), vec![2, 3, 4, 0]);
    }

    #[test]
    fn argmax_takes_the_first_largest() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5, 0.25]), 1);
    }
}
