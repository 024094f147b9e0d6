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

fn log_softmax(v: &[f32]) -> Vec<f32> {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = v.iter().map(|x| (x - max).exp()).sum();
    v.iter().map(|x| x - max - sum.ln()).collect()
}

/// Log-probabilities over the vocabulary after the prompt and after each of `tokens` fed one
/// by one (the greedy tokens of another run: both models see the same inputs).
fn teacher_forced(model: &kt_models::Model, prompt: &[u32], tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut seq = model.new_sequence();
    let mut out = vec![log_softmax(&model.forward(&mut seq, prompt).unwrap())];
    for t in &tokens[..tokens.len() - 1] {
        out.push(log_softmax(&model.forward(&mut seq, &[*t]).unwrap()));
    }
    out
}

/// `int8_from: Some(0)`: every step on the `amx_int8` copies, another quantization than the
/// GGUF file's, so log-probabilities within int8 rounding of the GGUF kernels'. Measured, max
/// |Δ logprob| over the whole vocabulary and 4 teacher-forced steps: qwen2moe q4_k 0.164
/// (its ggml-vs-f32 matmul difference is 0.154), deepseek2-lite HF 0.072; the greedy tokens'
/// own logprobs within 0.05. Greedy: qwen2moe's 4th token flips on a 0.10 near tie,
/// deepseek2-lite's 4 all match. Asserted: < 0.5, and the greedy rule below.
#[test]
fn int8_experts_generate_within_rounding_of_the_gguf_kernels() {
    for rel in ["qwen2moe/gguf/q4_k.gguf", "deepseek2-lite/hf"] {
        let path = fixture(rel);
        let gguf = bench_generate::run(&path, None, &cfg(1)).unwrap();
        let int8 = GenerateBenchConfig { int8_from: Some(0), ..cfg(1) };
        let r = bench_generate::run(&path, None, &int8).unwrap();
        assert_eq!(r.tokens[0].len(), 4, "{rel}");
        let kernel = r.experts_kernel.unwrap().to_string();
        assert!(kernel.starts_with("amx_int8"), "{rel}: {kernel}");
        assert!(r.repack_s.unwrap() >= 0.0, "{rel}");
        assert!(gguf.repack_s.is_none() && gguf.experts_kernel.unwrap().to_string() == "fused");

        let base = kt_models::load(&path, None, MatmulMode::Ggml).unwrap().model;
        let mut packed = kt_models::load(&path, None, MatmulMode::Ggml).unwrap().model;
        packed.repack_experts_int8(0, |_, _| {}).unwrap();
        let prompt = synthetic_prompt(base.config.vocab_size, 0, 0, 8);
        let want = teacher_forced(&base, &prompt, &gguf.tokens[0]);
        let got = teacher_forced(&packed, &prompt, &gguf.tokens[0]);
        let diff = want
            .iter()
            .flatten()
            .zip(got.iter().flatten())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        eprintln!("{rel}: max |logprob diff| int8 vs GGUF kernels = {diff}");
        assert!(diff < 0.5, "{rel}: max |logprob diff| {diff}");
        assert!(diff > 0.0, "{rel}: the int8 kernel was not used");
        // Greedy choices: the first 3 tokens the same; later ones the same or a near tie the
        // int8 rounding flipped (one the GGUF kernels rank within 0.5 of their best).
        let (ours, theirs) = (&r.tokens[0], &gguf.tokens[0]);
        assert_eq!(ours[..3], theirs[..3], "{rel}: greedy tokens");
        let margin = want[3][theirs[3] as usize] - want[3][ours[3] as usize];
        assert!(margin < 0.5, "{rel}: step 3 took {} (margin {margin})", ours[3]);
    }
}

/// An `int8_from` no step reaches leaves every step on the GGUF kernels: bit-identical
/// logits and tokens to not repacking.
#[test]
fn int8_from_beyond_every_step_is_bit_identical() {
    let path = fixture("qwen2moe/gguf/q4_k.gguf");
    let plain = bench_generate::run(&path, None, &cfg(2)).unwrap();
    let far = GenerateBenchConfig { int8_from: Some(1_000_000), ..cfg(2) };
    let r = bench_generate::run(&path, None, &far).unwrap();
    assert_eq!(r.tokens, plain.tokens);
    assert!(r.experts_kernel.unwrap().to_string().starts_with("fused below 1000000 tokens"));

    let base = kt_models::load(&path, None, MatmulMode::Ggml).unwrap().model;
    let mut packed = kt_models::load(&path, None, MatmulMode::Ggml).unwrap().model;
    packed.repack_experts_int8(1_000_000, |_, _| {}).unwrap();
    let prompt = synthetic_prompt(base.config.vocab_size, 0, 0, 8);
    let want = teacher_forced(&base, &prompt, &plain.tokens[0]);
    let got = teacher_forced(&packed, &prompt, &plain.tokens[0]);
    let bits = |v: &Vec<Vec<f32>>| v.iter().flatten().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&got), bits(&want));
}

/// Repacking needs the experts loaded with the model, not shared: refused otherwise, the
/// model unchanged and still computing.
#[test]
fn repack_refuses_replaced_or_shared_experts() {
    let path = fixture("qwen2moe/gguf/q4_k.gguf");
    let mut model = kt_models::load(&path, None, MatmulMode::Ggml).unwrap().model;
    let shared = model.experts().clone();
    assert!(model.repack_experts_int8(0, |_, _| {}).is_err());
    assert_eq!(model.experts_kernel().unwrap().to_string(), "fused");
    let mut seq = model.new_sequence();
    assert!(model.forward(&mut seq, &[1, 2, 3]).is_ok());
    drop(shared);
    let done = std::sync::atomic::AtomicUsize::new(0);
    let kernel = model
        .repack_experts_int8(0, |_, _| {
            done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        })
        .unwrap();
    assert_eq!(Some(kernel), model.experts_kernel());
    assert!(done.into_inner() > 0);

    let other = model.experts().clone();
    let mut replaced = model.with_experts(other);
    assert!(replaced.experts_kernel().is_none());
    assert!(replaced.repack_experts_int8(0, |_, _| {}).is_err());
}
