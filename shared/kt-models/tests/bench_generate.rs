//! `kt_models::bench_generate` on a fixture model: exactly `gen_len` greedy tokens per
//! sequence, the same ones `Model::forward` gives one token at a time, and positive rates (no
//! timing is asserted).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use kt_models::bench_generate::{self, synthetic_prompt, GenerateBenchConfig};
use kt_models::MatmulMode;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models").join(rel)
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

fn cfg(batch: usize) -> GenerateBenchConfig {
    GenerateBenchConfig {
        prompt_len: 8,
        gen_len: 4,
        batch,
        threads: 2,
        mode: MatmulMode::Ggml,
        ..GenerateBenchConfig::default()
    }
}

#[test]
fn generates_exactly_gen_len_tokens_greedily() {
    for rel in ["qwen2moe/gguf/q4_k.gguf", "deepseek2-lite/hf"] {
        let path = fixture(rel);
        let r = bench_generate::run(&path, None, &cfg(1)).unwrap();
        assert_eq!(r.tokens.len(), 1, "{rel}");
        assert_eq!(r.tokens[0].len(), 4, "{rel}");
        assert_eq!((r.prompt_len, r.gen_len, r.batch, r.threads), (8, 4, 1, 2));
        assert!(r.prefill_tokens_per_s > 0.0 && r.prefill_tokens_per_s.is_finite(), "{rel}");
        let decode = r.decode_tokens_per_s.unwrap();
        assert!(decode > 0.0 && decode.is_finite(), "{rel}");
        assert!(r.load_s >= 0.0 && r.prefill_s > 0.0 && r.decode_s > 0.0, "{rel}");

        // The same tokens as the plain decode loop (`kt generate`'s forward pass) picks.
        let model = kt_models::load(&path, None, MatmulMode::Ggml).unwrap().model;
        let prompt = synthetic_prompt(model.config.vocab_size, 0, 0, 8);
        let mut seq = model.new_sequence();
        let mut logits = model.forward(&mut seq, &prompt).unwrap();
        let mut want = Vec::new();
        for i in 0..4 {
            want.push(argmax(&logits));
            if i < 3 {
                logits = model.forward(&mut seq, &want[i..]).unwrap();
            }
        }
        assert_eq!(r.tokens[0], want, "{rel}");
    }
}

#[test]
fn batched_sequences_each_generate_gen_len_tokens() {
    let path = fixture("qwen2moe/gguf/q4_k.gguf");
    let model = kt_models::load(&path, None, MatmulMode::Ggml).unwrap().model;
    let r = bench_generate::measure(&model, &cfg(3)).unwrap();
    assert_eq!(r.tokens.len(), 3);
    assert!(r.tokens.iter().all(|t| t.len() == 4));
    assert!(r.prefill_tokens_per_s > 0.0 && r.decode_tokens_per_s.unwrap() > 0.0);
    // One generated token: a prefill rate, no decode rate.
    let one = GenerateBenchConfig { gen_len: 1, ..cfg(1) };
    let r = bench_generate::measure(&model, &one).unwrap();
    assert_eq!(r.tokens, vec![r.tokens[0].clone()]);
    assert_eq!(r.tokens[0].len(), 1);
    assert!(r.decode_tokens_per_s.is_none());
    assert!(bench_generate::measure(&model, &GenerateBenchConfig { gen_len: 0, ..cfg(1) }).is_err());
}
