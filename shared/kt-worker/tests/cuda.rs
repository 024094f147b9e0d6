//! The worker's engine on the CUDA backend: concurrent sequences (greedy and seeded sampling)
//! give the tokens the CPU reference gives each alone, with logprobs within 1e-4 (f32 weights
//! and KV on the GPU; the order of float sums differs). Needs an NVIDIA GPU; without one each
//! test prints `SKIPPED (no CUDA device): <why>` and passes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};

use common::{alone, collect, load, prompt, MODELS};
use kt_cuda::{CudaOptions, Gpu, KvDtype, WeightDtype};
use kt_sample::SamplingParams;
use kt_worker::{CudaBackend, Engine, EngineOptions, Request};

fn gpu() -> Option<Gpu> {
    match Gpu::open(0) {
        Ok(g) => Some(g),
        Err(e @ kt_cuda::CudaError::Unavailable(_)) => {
            eprintln!("SKIPPED (no CUDA device): {e}");
            None
        }
        Err(e) => panic!("opening the GPU: {e}"),
    }
}

/// The fixture folder, also when the test binary runs from a copy of the repository root.
fn fixture(name: &str) -> PathBuf {
    let built = common::fixture(name);
    if built.exists() {
        built
    } else {
        Path::new("tests/fixtures/models").join(name)
    }
}

#[test]
fn concurrent_sequences_on_the_gpu_equal_the_cpu_alone() {
    if gpu().is_none() {
        return;
    }
    for name in MODELS {
        let model = load(&fixture(name).join("hf"));
        let opts = CudaOptions {
            dtype: WeightDtype::F32,
            kv_dtype: KvDtype::F32,
            block_tokens: 16,
            kv_blocks: 128,
        };
        let backend = CudaBackend::with_options(model.clone(), vec![gpu().unwrap()], opts).unwrap();
        let e =
            Engine::start(backend, EngineOptions { max_batch: 8, max_batch_tokens: 32 }).unwrap();
        let vocab = model.config.vocab_size;
        let reqs: Vec<Request> = (0..8)
            .map(|i| Request {
                id: format!("r{i}"),
                prompt: prompt(3 + 9 * i, i, vocab),
                sampling: if i % 2 == 0 {
                    SamplingParams::greedy()
                } else {
                    SamplingParams { temperature: 0.8, seed: Some(i as u64), ..Default::default() }
                },
                max_tokens: 10,
                stop_ids: vec![],
                top_logprobs: 2,
            })
            .collect();
        let streams: Vec<_> = reqs.iter().map(|r| e.submit(r.clone()).unwrap()).collect();
        let mut worst = 0f64;
        for (r, events) in reqs.iter().zip(streams) {
            let (tokens, finished) = collect(events);
            let (want, reason) = alone(&model, r);
            let ids = |t: &[kt_worker::Token]| t.iter().map(|t| t.id).collect::<Vec<_>>();
            assert_eq!(
                ids(&tokens),
                ids(&want),
                "{name} {}: tokens differ from the CPU ({:?}: {})",
                r.id,
                finished.reason,
                finished.message
            );
            assert_eq!(finished.reason, reason);
            for (a, b) in tokens.iter().zip(&want) {
                worst = worst.max((a.logprob - b.logprob).abs());
            }
        }
        assert!(worst <= 1e-4, "{name}: logprobs differ by {worst}");
        let st = e.stats();
        assert_eq!(st.free_blocks, st.total_blocks, "every block is back");
        eprintln!(
            "{name:18} 8 concurrent sequences on cuda:0 = CPU alone (logprobs ≤ {worst:.1e})"
        );
    }
}
