//! `kt bench experts`: the time of one MoE layer's routed experts on this CPU, against the
//! machine's limits.
//!
//! For each token count: µs per layer call (median over calls, each with a fresh random top-k
//! routing so that the active experts come from DRAM, not from the cache of the previous
//! call), the effective weight bandwidth (bytes of the distinct active experts' gate, up and
//! down weights ÷ time) and the arithmetic rate (`6 · hidden · ff` flops per token-expert
//! pair ÷ time), each schedule of the fused kernel (decode: every row meets all of an
//! expert's tokens; tiled: tokens in tiles) and optionally the reference path. The DRAM read
//! bandwidth is measured first ([`dram_read_bandwidth`]) and every GB/s is also printed as a
//! share of it. The smallest token count from which the tiled schedule is faster is the
//! measured switch point ([`FusedConfig::prefill_min_tokens`]).
//!
//! With `int8`, the layer's experts are also repacked to `amx_int8` and timed (`int8`: AMX for
//! multi-token experts where the CPU has it, `int8-vnni`: VNNI only), with the AMX int8 peak of
//! every pool thread measured at once (register-resident `TDPBSSD`s) and each `int8` row's
//! int8 operations per second printed as a share of it.

use std::time::Instant;

use rayon::prelude::*;

use kt_quant::packed::Path;

use super::{ExpertKernel, FusedConfig, LocalExperts, Routing};
use crate::{load_experts, open, MatmulMode, ModelError};

/// What to measure.
#[derive(Clone, Debug)]
pub struct ExpertsBenchConfig {
    /// The MoE layer (default: the first one).
    pub layer: Option<usize>,
    /// Tokens per call.
    pub tokens: Vec<usize>,
    /// Threads of the compute pool (0: all CPUs).
    pub threads: usize,
    /// Also time the reference path up to this many tokens (0: never).
    pub reference_up_to: usize,
    /// Tokens per tile of the tiled schedule.
    pub token_tile: usize,
    /// Seconds of measuring per case (at least 3 calls).
    pub seconds: f64,
    /// MiB of the DRAM read-bandwidth buffer (≫ the last-level cache).
    pub dram_mib: usize,
    /// Seed of the hidden states and routings.
    pub seed: u64,
    /// Also repack the layer's experts to `amx_int8` and time them (`int8`: AMX from
    /// `AMX_MIN_TOKENS` tokens per expert, VNNI below; `int8-vnni`: VNNI at every count), and
    /// measure the AMX int8 peak of the pool's threads.
    pub int8: bool,
    /// Only the `amx_int8` schedules (with `int8`), not the GGUF ones.
    pub int8_only: bool,
}

impl Default for ExpertsBenchConfig {
    fn default() -> Self {
        Self {
            layer: None,
            tokens: vec![1, 4, 16, 64, 512, 2048],
            threads: 0,
            reference_up_to: 0,
            token_tile: FusedConfig::default().token_tile,
            seconds: 1.0,
            dram_mib: 1024,
            seed: 1,
            int8: false,
            int8_only: false,
        }
    }
}

/// One measured case.
#[derive(Clone, Debug)]
pub struct ExpertsBenchRow {
    pub tokens: usize,
    /// `decode`, `tiled` or `reference`.
    pub schedule: &'static str,
    pub calls: usize,
    pub median_us: f64,
    pub min_us: f64,
    /// Median bytes of distinct active experts' weights per call.
    pub bytes: f64,
    pub gbps: f64,
    pub tflops: f64,
    /// `gbps` ÷ the measured DRAM read bandwidth.
    pub bw_share: f64,
    /// For the `amx_int8` schedules on a CPU with AMX: `tflops` (int8 operations) ÷ the
    /// measured AMX int8 peak of all the pool's threads.
    pub amx_share: Option<f64>,
}

/// The whole measurement.
#[derive(Clone, Debug)]
pub struct ExpertsBench {
    pub layer: usize,
    pub hidden: usize,
    pub ff: usize,
    pub n_experts: usize,
    pub top_k: usize,
    /// Formats of gate / up / down.
    pub formats: String,
    /// Kernel families (`dot_f32/vec_dot`, `+tile` where `vec_dot_tile` has a multi-token
    /// kernel) of gate / up / down.
    pub isa: String,
    pub threads: usize,
    pub dram_gbps: f64,
    /// AMX int8 peak of all the pool's threads together, in TOPS (`int8` on a CPU with AMX).
    pub amx_int8_tops: Option<f64>,
    pub rows: Vec<ExpertsBenchRow>,
    /// Smallest measured token count from which `tiled` beats `decode` at every larger count.
    pub switch_tokens: Option<usize>,
}

/// Multi-threaded streaming read of a buffer of `mib` MiB on the current rayon pool: GB/s of
/// the best of five passes.
pub fn dram_read_bandwidth(mib: usize) -> f64 {
    let n = mib.max(1) * (1 << 20) / 8;
    let mut buf = vec![0u64; n];
    buf.par_chunks_mut(1 << 16).enumerate().for_each(|(i, c)| {
        for (j, v) in c.iter_mut().enumerate() {
            *v = (i ^ j) as u64 | 1;
        }
    });
    let chunk = n.div_ceil(rayon::current_num_threads() * 8).max(1 << 12);
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        let s: u64 = buf
            .par_chunks(chunk)
            .map(|c| {
                let mut acc = [0u64; 8];
                for v in c.chunks_exact(8) {
                    for k in 0..8 {
                        acc[k] = acc[k].wrapping_add(v[k]);
                    }
                }
                acc.iter().fold(0u64, |a, b| a.wrapping_add(*b))
            })
            .reduce(|| 0, u64::wrapping_add);
        std::hint::black_box(s);
        best = best.min(t.elapsed().as_secs_f64());
    }
    (n * 8) as f64 / best / 1e9
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

/// Uniformly random top-`k` distinct experts per token, softmax-like weights.
fn random_routing(n: usize, k: usize, n_experts: usize, rng: &mut Rng) -> Routing {
    let mut ids = Vec::with_capacity(n * k);
    for _ in 0..n {
        let start = ids.len();
        while ids.len() < start + k.min(n_experts) {
            let e = (rng.next() % n_experts as u64) as u32;
            if !ids[start..].contains(&e) {
                ids.push(e);
            }
        }
    }
    let weights = (0..ids.len()).map(|_| 1.0 / k as f32).collect();
    Routing { k: k.min(n_experts), ids, weights }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Loads layer `cfg.layer`'s routed experts of the GGUF model `path` (`MatmulMode::Ggml`, the
/// quantized-activation path the fused kernel is fast on) and measures them; `on_row` sees
/// each case as it finishes.
pub fn run(
    path: &std::path::Path,
    cfg: &ExpertsBenchConfig,
    mut on_row: impl FnMut(&ExpertsBench, &ExpertsBenchRow),
) -> Result<ExpertsBench, ModelError> {
    let mode = MatmulMode::Ggml;
    let parts = open(path, None, mode)?;
    let c = &parts.config;
    let moe = c.moe.as_ref().ok_or_else(|| ModelError::Config("not an MoE model".into()))?;
    let layer = match cfg.layer {
        Some(l) if c.is_moe_layer(l) => l,
        Some(l) => return Err(ModelError::Input(format!("layer {l} is not an MoE layer"))),
        None => (0..c.n_layers)
            .find(|&l| c.is_moe_layer(l))
            .ok_or_else(|| ModelError::Config("no MoE layer".into()))?,
    };
    let mut experts: LocalExperts =
        load_experts(c, parts.source.tensors(), parts.scheme, mode, &|l, _| l == layer)?;
    let mlp0 = experts
        .expert(layer, 0)
        .ok_or_else(|| ModelError::Config(format!("layer {layer} has no expert 0")))?;
    let expert_bytes: Vec<f64> = (0..moe.n_experts)
        .map(|e| {
            experts.expert(layer, e).map_or(0.0, |m| {
                (m.gate.weight().data.len() + m.up.weight().data.len() + m.down.weight().data.len())
                    as f64
            })
        })
        .collect();
    let fam = |l: &crate::linear::Linear| {
        let k = l.kernels();
        let tile = if k.has_vec_dot_tile() { "+tile" } else { "" };
        format!("{}/{}{tile}", k.isa, k.vec_dot_isa)
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(cfg.threads)
        .build()
        .map_err(|e| ModelError::Input(format!("thread pool: {e}")))?;
    let mut bench = ExpertsBench {
        layer,
        hidden: c.hidden,
        ff: moe.expert_ff,
        n_experts: moe.n_experts,
        top_k: moe.top_k,
        formats: format!(
            "{}/{}/{}",
            mlp0.gate.weight().ty,
            mlp0.up.weight().ty,
            mlp0.down.weight().ty
        ),
        isa: format!("{} {} {}", fam(&mlp0.gate), fam(&mlp0.up), fam(&mlp0.down)),
        threads: pool.current_num_threads(),
        dram_gbps: pool.install(|| dram_read_bandwidth(cfg.dram_mib)),
        amx_int8_tops: None,
        rows: Vec::new(),
        switch_tokens: None,
    };
    let mut int8_bytes = Vec::new();
    if cfg.int8 {
        pool.install(|| experts.repack_int8(|l| l == layer, |_, _| {}))?;
        int8_bytes = (0..moe.n_experts).map(|e| experts.packed_bytes(layer, e) as f64).collect();
        // Every thread of the pool at once, so the figure is the machine's, not one core's.
        let per_thread = pool.broadcast(|_| kt_quant::packed::amx_int8_peak(0.3));
        if per_thread.iter().all(Option::is_some) {
            bench.amx_int8_tops = Some(per_thread.iter().flatten().sum::<f64>() / 1e12);
        }
    }
    let mut rng = Rng(cfg.seed | 1);
    let tiled = FusedConfig {
        prefill_min_tokens: 0,
        token_tile: cfg.token_tile.max(1),
        ..FusedConfig::default()
    };
    let decode = FusedConfig { prefill_min_tokens: usize::MAX, ..FusedConfig::default() };
    for &n in &cfg.tokens {
        let x: Vec<f32> = (0..n * c.hidden).map(|_| rng.f32()).collect();
        let mut schedules = Vec::new();
        if !(cfg.int8 && cfg.int8_only) {
            schedules.push(("decode", ExpertKernel::Fused(decode)));
            if n > 1 {
                schedules.push(("tiled", ExpertKernel::Fused(tiled)));
            }
            if n <= cfg.reference_up_to {
                schedules.push(("reference", ExpertKernel::Reference));
            }
        }
        if cfg.int8 {
            schedules.push(("int8", ExpertKernel::Int8 { path: None }));
            if Path::for_tokens(usize::MAX) == Path::Amx {
                schedules.push(("int8-vnni", ExpertKernel::Int8 { path: Some(Path::Vnni) }));
            }
        }
        for (name, kernel) in schedules {
            let is_int8 = matches!(kernel, ExpertKernel::Int8 { .. });
            let sizes = if is_int8 { &int8_bytes } else { &expert_bytes };
            let (mut times, mut bytes) = (Vec::new(), Vec::new());
            let mut spent = 0.0;
            // One warm-up call, then until the time budget is spent (at least 3 calls).
            for call in 0.. {
                if call > 3 && spent >= cfg.seconds {
                    break;
                }
                let r = random_routing(n, moe.top_k, moe.n_experts, &mut rng);
                let mut hit = vec![false; moe.n_experts];
                r.ids.iter().for_each(|&e| hit[e as usize] = true);
                let b: f64 = hit.iter().zip(sizes).filter(|(h, _)| **h).map(|(_, b)| b).sum();
                let t = Instant::now();
                let y = pool.install(|| experts.forward_with(kernel, layer, &x, &r))?;
                let dt = t.elapsed().as_secs_f64();
                std::hint::black_box(y);
                if call > 0 {
                    spent += dt;
                    times.push(dt);
                    bytes.push(b);
                }
            }
            let calls = times.len();
            let min = times.iter().copied().fold(f64::MAX, f64::min);
            let t = median(&mut times);
            let b = median(&mut bytes);
            let flops = 6.0 * (c.hidden * moe.expert_ff * n * moe.top_k) as f64;
            let gbps = b / t / 1e9;
            let row = ExpertsBenchRow {
                tokens: n,
                schedule: name,
                calls,
                median_us: t * 1e6,
                min_us: min * 1e6,
                bytes: b,
                gbps,
                tflops: flops / t / 1e12,
                bw_share: gbps / bench.dram_gbps,
                amx_share: bench
                    .amx_int8_tops
                    .filter(|_| is_int8)
                    .map(|peak| flops / t / 1e12 / peak),
            };
            on_row(&bench, &row);
            bench.rows.push(row);
        }
    }
    bench.switch_tokens = switch_point(&bench.rows);
    Ok(bench)
}

/// Smallest token count from which `tiled` is faster than `decode` at every measured count.
fn switch_point(rows: &[ExpertsBenchRow]) -> Option<usize> {
    let time = |n: usize, s: &str| {
        rows.iter().find(|r| r.tokens == n && r.schedule == s).map(|r| r.median_us)
    };
    let mut ns: Vec<usize> = rows.iter().map(|r| r.tokens).collect();
    ns.sort_unstable();
    ns.dedup();
    let mut switch = None;
    for &n in ns.iter().rev() {
        match (time(n, "tiled"), time(n, "decode")) {
            (Some(t), Some(d)) if t < d => switch = Some(n),
            (Some(_), Some(_)) => break,
            _ => {}
        }
    }
    switch
}
