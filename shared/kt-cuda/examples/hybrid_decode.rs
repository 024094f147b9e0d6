//! Hybrid decode speed: attention, dense layers, gates and shared experts on the GPU (this
//! crate), routed experts on the CPU (the model's own LocalExperts, ggml-style quantized
//! kernels), on a synthetic DeepSeek-V2-Lite Q4_K_M written here when missing.
//!
//! `cargo run --release -p kt-cuda --example hybrid_decode -- [MODEL.gguf] [PROMPT] [GEN]`
//! prints prefill and decode tokens/s for batch sizes 1, 4 and 16, and the same single
//! sequence on the CPU backend alone.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use kt_cuda::{CudaModel, CudaOptions, Gpu, KvDtype, WeightDtype};
use kt_models::{Experts, MatmulMode, ModelError, Routing, SeqKv, Step};
use kt_synth::{Preset, Quant, SynthOptions};

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// The model's experts, timed: how much of a step the CPU tier takes.
struct Timed {
    inner: Arc<dyn Experts>,
    nanos: AtomicU64,
    /// Answer zeros without computing: the GPU side's own time.
    skip: std::sync::atomic::AtomicBool,
}

impl Experts for Timed {
    fn forward(
        &self,
        layer: usize,
        hidden: &[f32],
        routing: &Routing,
    ) -> Result<Vec<f32>, ModelError> {
        if self.skip.load(Ordering::Relaxed) {
            return Ok(vec![0.0; hidden.len()]);
        }
        let t = Instant::now();
        let out = self.inner.forward(layer, hidden, routing);
        self.nanos.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        out
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = PathBuf::from(args.get(1).cloned().unwrap_or("/tmp/v2-lite-q4km.gguf".into()));
    let prompt_len: usize = args.get(2).map_or(128, |s| s.parse().unwrap());
    let gen: usize = args.get(3).map_or(32, |s| s.parse().unwrap());
    // Hot experts per MoE layer to try (the first N ids: the synthetic model's routing is
    // uniform, so any N are as hot as any other).
    let hots: Vec<usize> = args
        .get(4)
        .map_or("0".into(), |s| s.clone())
        .split(',')
        .map(|s| s.parse().unwrap())
        .collect();
    if !path.exists() {
        let t = Instant::now();
        let opts = SynthOptions::new(Preset::V2Lite, Quant::Q4KM);
        kt_synth::write(&opts, &path, &mut |_| {}).unwrap();
        eprintln!("wrote {} in {:.1} s", path.display(), t.elapsed().as_secs_f64());
    }
    let t = Instant::now();
    let loaded = kt_models::load(&path, None, MatmulMode::Ggml).unwrap();
    let timed = Arc::new(Timed {
        inner: loaded.model.experts().clone(),
        nanos: AtomicU64::new(0),
        skip: Default::default(),
    });
    let model = Arc::new(loaded.model.with_experts(timed.clone()));
    eprintln!("loaded in {:.1} s", t.elapsed().as_secs_f64());
    let gpu = Gpu::open(0).unwrap();
    let name = gpu.name();
    let t = Instant::now();
    let opts = CudaOptions {
        dtype: WeightDtype::Bf16,
        kv_dtype: KvDtype::Bf16,
        block_tokens: 16,
        kv_blocks: 4096,
    };
    let mut cuda = CudaModel::new(gpu, model.clone(), opts).unwrap();
    eprintln!(
        "uploaded {:.2} GiB to {name} in {:.1} s",
        cuda.weight_bytes() as f64 / (1u64 << 30) as f64,
        t.elapsed().as_secs_f64()
    );
    let vocab = model.config.vocab_size as u32;
    println!(
        "model {} ({} layers), prompt {prompt_len}, gen {gen}, {name}",
        path.display(),
        model.config.n_layers
    );
    for &hot in &hots {
        // Hot experts: the first `hot` ids of every MoE layer (none: all on the CPU).
        let parts = kt_models::open(&path, None, MatmulMode::Ggml).unwrap();
        let c = &model.config;
        let ids: Vec<Vec<usize>> = (0..c.n_layers)
            .map(|l| if c.is_moe_layer(l) { (0..hot).collect() } else { vec![] })
            .collect();
        let local = kt_models::load_experts(
            &parts.config,
            parts.source.tensors(),
            parts.scheme,
            MatmulMode::Ggml,
            &|l, e| ids[l].contains(&e),
        )
        .unwrap();
        cuda.set_hot_experts(&local, &ids).unwrap();
        println!("hot experts per layer: {hot}");
        for batch in [1usize, 4, 16] {
            let prompts: Vec<Vec<u32>> = (0..batch)
                .map(|b| (0..prompt_len).map(|t| ((t * 31 + b * 7 + 1) as u32) % vocab).collect())
                .collect();
            let mut kvs: Vec<SeqKv> = (0..batch).map(|_| SeqKv::new()).collect();
            let t = Instant::now();
            let mut next = Vec::new();
            for (kv, p) in kvs.iter_mut().zip(&prompts) {
                let l = cuda.forward_batch(&mut [Step { kv, tokens: p }]).unwrap();
                next.push(vec![argmax(&l[0])]);
            }
            let prefill = t.elapsed().as_secs_f64();
            let t = Instant::now();
            timed.nanos.store(0, Ordering::Relaxed);
            for _ in 0..gen {
                let mut steps: Vec<Step<'_>> =
                    kvs.iter_mut().zip(&next).map(|(kv, tokens)| Step { kv, tokens }).collect();
                let logits = cuda.forward_batch(&mut steps).unwrap();
                next = logits.iter().map(|l| vec![argmax(l)]).collect();
            }
            let decode = t.elapsed().as_secs_f64();
            let experts = timed.nanos.load(Ordering::Relaxed) as f64 * 1e-9;
            println!(
            "hybrid GPU+CPU batch {batch:2}: prefill {:8.1} tok/s, decode {:7.2} tok/s ({:6.2} ms/step, CPU experts {:6.2} ms/step)",
            (batch * prompt_len) as f64 / prefill,
            (batch * gen) as f64 / decode,
            decode * 1e3 / gen as f64,
            experts * 1e3 / gen as f64
        );
            for kv in &mut kvs {
                cuda.blocks_mut().release(kv);
            }
        }
    }
    // The GPU side alone: the same decode with the routed experts answering zeros at once.
    timed.skip.store(true, Ordering::Relaxed);
    let mut kv = SeqKv::new();
    let prompt: Vec<u32> = (0..prompt_len).map(|t| ((t * 31 + 1) as u32) % vocab).collect();
    let mut next =
        vec![argmax(&cuda.forward_batch(&mut [Step { kv: &mut kv, tokens: &prompt }]).unwrap()[0])];
    let t = Instant::now();
    for _ in 0..gen {
        let l = cuda.forward_batch(&mut [Step { kv: &mut kv, tokens: &next }]).unwrap();
        next = vec![argmax(&l[0])];
    }
    println!(
        "GPU side alone (experts skipped) batch 1: {:6.2} ms/step",
        t.elapsed().as_secs_f64() * 1e3 / gen as f64
    );
    cuda.blocks_mut().release(&mut kv);
    timed.skip.store(false, Ordering::Relaxed);
    // The CPU backend alone, one sequence, for comparison.
    let prompt: Vec<u32> = (0..prompt_len).map(|t| ((t * 31 + 1) as u32) % vocab).collect();
    let mut seq = model.new_sequence();
    let t = Instant::now();
    let mut next = argmax(&model.forward(&mut seq, &prompt).unwrap());
    let prefill = t.elapsed().as_secs_f64();
    let steps = gen.min(16);
    let t = Instant::now();
    for _ in 0..steps {
        next = argmax(&model.forward(&mut seq, &[next]).unwrap());
    }
    let decode = t.elapsed().as_secs_f64();
    println!(
        "CPU only       batch  1: prefill {:8.1} tok/s, decode {:7.2} tok/s",
        prompt_len as f64 / prefill,
        steps as f64 / decode
    );
}
