//! Every preset, truncated to two layers, written at Q8_0 and Q4_K_M, loads in kt with the
//! preset's config and gives finite logits.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

use std::path::PathBuf;
use std::time::Instant;

use kt_models::config::{AttentionConfig, RopeScaling, Scoring};
use kt_models::{Arch, MatmulMode, ModelConfig};
use kt_synth::{write, Preset, Quant, Shape, SynthArch, SynthOptions};

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kt-synth-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn assert_config_is(c: &ModelConfig, s: &Shape) {
    let arch = match s.arch {
        SynthArch::Deepseek2 => Arch::Deepseek2,
        SynthArch::Deepseek3 => Arch::Deepseek3,
        SynthArch::Qwen3Moe => Arch::Qwen3Moe,
        SynthArch::Mixtral => Arch::Mixtral,
    };
    assert_eq!(c.arch, arch);
    assert_eq!(
        (c.vocab_size, c.hidden, c.n_layers, c.ff),
        (s.vocab, s.hidden, s.n_layers, s.ff),
        "{}",
        s.model_name
    );
    assert_eq!(c.rms_eps, s.rms_eps);
    assert_eq!(c.max_position, s.context);
    assert_eq!(c.rope.theta, s.rope_theta);
    let want = match &s.mla {
        Some(m) => AttentionConfig::Mla {
            n_heads: s.n_heads,
            q_lora_rank: m.q_lora_rank,
            kv_lora_rank: m.kv_lora_rank,
            qk_nope_head_dim: m.qk_nope,
            qk_rope_head_dim: m.qk_rope,
            v_head_dim: m.v_head_dim,
        },
        None => AttentionConfig::Gqa {
            n_heads: s.n_heads,
            n_kv_heads: s.n_kv_heads,
            head_dim: s.head_dim,
            qkv_bias: false,
            qk_norm: s.arch == SynthArch::Qwen3Moe,
        },
    };
    assert_eq!(c.attention, want);
    match (&c.rope.scaling, &s.yarn) {
        (RopeScaling::Yarn(y), Some(w)) => {
            assert_eq!((y.factor, y.original_max_position), (w.factor, w.original_context));
        }
        (RopeScaling::None, None) => {}
        (got, want) => panic!("rope scaling {got:?}, want {want:?}"),
    }
    let m = c.moe.as_ref().unwrap();
    assert_eq!(
        (m.n_experts, m.top_k, m.expert_ff, m.n_group, m.topk_group),
        (s.n_experts, s.top_k, s.expert_ff, s.n_group, s.topk_group)
    );
    assert_eq!((m.shared_ff, m.first_dense), (s.n_shared * s.expert_ff, s.first_dense));
    assert_eq!(m.scoring, if s.sigmoid { Scoring::Sigmoid } else { Scoring::Softmax });
    assert_eq!((m.norm_topk_prob, m.routed_scaling_factor), (s.norm_topk, s.routed_scale));
}

fn check(preset: Preset, quant: Quant, layers: usize, vocab: Option<usize>) {
    let dir = temp_dir(&format!("{}-{}", preset.name(), quant.name()));
    let path = dir.join("model.gguf");
    let opts =
        SynthOptions { layers: Some(layers), vocab, seed: 3, ..SynthOptions::new(preset, quant) };
    let t0 = Instant::now();
    let summary = write(&opts, &path, &mut |_| {}).unwrap();
    let t_write = t0.elapsed();
    let loaded = kt_models::load(&path, None, MatmulMode::F32).unwrap();
    let c = &loaded.model.config;
    assert_config_is(c, &summary.shape);
    let mut seq = loaded.model.new_sequence();
    let logits = loaded.model.forward(&mut seq, &[1, 2, 3]).unwrap();
    assert_eq!(logits.len(), summary.shape.vocab);
    assert!(logits.iter().all(|x| x.is_finite()), "{} {}", preset.name(), quant.name());
    let spread = logits.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(spread > 1e-3 && spread < 1e3, "logits of magnitude {spread}");
    // One decode step after the prompt.
    let next = loaded.model.forward(&mut seq, &[4]).unwrap();
    assert!(next.iter().all(|x| x.is_finite()));
    eprintln!(
        "{} {} --layers {layers}: {:.2} GB written in {:.1?}, load + 4 tokens {:.1?}",
        preset.name(),
        quant.name(),
        summary.file_bytes as f64 / 1e9,
        t_write,
        t0.elapsed() - t_write
    );
    drop(loaded);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The cheap presets, on every run: DeepSeek-V2-Lite and Qwen3-30B-A3B with a small
/// vocabulary (~1.5 GB of files in all).
#[test]
fn v2_lite_and_qwen3_load_in_kt() {
    for quant in [Quant::Q4KM, Quant::Q8_0] {
        check(Preset::V2Lite, quant, 2, Some(512));
        check(Preset::Qwen3_30bA3b, quant, 2, Some(512));
    }
}

/// Every preset and quantization at the full vocabulary (~11 GB of files, a few minutes):
/// `cargo test -p kt-synth --release -- --ignored`.
#[test]
#[ignore]
fn every_preset_loads_in_kt_at_full_vocab() {
    for preset in Preset::ALL {
        for quant in [Quant::Q4KM, Quant::Q8_0, Quant::Bf16] {
            if quant == Quant::Bf16 && preset != Preset::V2Lite {
                continue;
            }
            check(preset, quant, 2, None);
        }
    }
}
