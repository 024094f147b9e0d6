//! Properties of the CPU backend that hold for any weights, checked on small synthetic GGUF
//! models built in memory: prefill in one batch equals feeding tokens one by one (KV cache and
//! batching are right), quantized weights stay close to f32, and broken models are errors.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use kt_core::{GgmlType, SharedBytes};
use kt_formats::gguf::writer::GgufWriter;
use kt_formats::{GgufFile, GgufModel};
use kt_models::{load_gguf, MatmulMode, Model};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

const H: usize = 64;
const VOCAB: usize = 96;

/// How to store the synthetic weights.
#[derive(Clone, Copy)]
enum Store {
    F32,
    Q8_0,
}

struct Builder {
    w: GgufWriter,
    rng: Rng,
    store: Store,
}

impl Builder {
    fn new(arch: &str, store: Store) -> Self {
        let mut w = GgufWriter::new();
        w.metadata("general.architecture", arch);
        Self { w, rng: Rng(42), store }
    }

    fn kv(&mut self, key: &str, v: impl Into<kt_formats::Value>) {
        self.w.metadata(key, v);
    }

    fn tensor(&mut self, name: &str, shape: &[usize], scale: f32, offset: f32) {
        let n: usize = shape.iter().product();
        let vals: Vec<f32> = (0..n).map(|_| offset + scale * self.rng.next()).collect();
        let quantize = shape.len() >= 2 && matches!(self.store, Store::Q8_0);
        let (ty, data) = if quantize {
            let mut q = vec![0u8; GgmlType::Q8_0.row_bytes(n).unwrap()];
            kt_quant::quantize_row(GgmlType::Q8_0, &vals, &mut q).unwrap();
            (GgmlType::Q8_0, q)
        } else {
            (GgmlType::F32, vals.iter().flat_map(|v| v.to_le_bytes()).collect())
        };
        self.w.tensor(name, ty, shape.to_vec(), data).unwrap();
    }

    fn matrix(&mut self, name: &str, out: usize, inp: usize) {
        self.tensor(name, &[out, inp], 1.0 / (inp as f32).sqrt(), 0.0);
    }

    fn norm(&mut self, name: &str, n: usize) {
        self.tensor(name, &[n], 0.2, 1.0);
    }

    fn finish(&self) -> Model {
        let bytes = self.w.to_bytes();
        let file = GgufFile::from_bytes("synthetic.gguf", SharedBytes::new(bytes)).unwrap();
        let g = GgufModel::from_parts("synthetic.gguf", vec![file], vec![]).unwrap();
        load_gguf(g, "synthetic.gguf".as_ref(), MatmulMode::F32).unwrap().model
    }
}

/// A two-layer DeepSeek-V3-shaped model: MLA with q_lora, a dense layer, then sigmoid +
/// noaux_tc routing over 8 experts in 4 groups with a shared expert.
fn deepseek3(store: Store) -> Builder {
    let mut b = Builder::new("deepseek2", store);
    let a = "deepseek2";
    let (heads, q_lora, kv_lora, nope, rope, v) = (2, 32, 32, 32, 16, 32);
    for (k, val) in [
        ("embedding_length", H),
        ("block_count", 2),
        ("attention.head_count", heads),
        ("attention.head_count_kv", heads),
        ("feed_forward_length", 128),
        ("attention.q_lora_rank", q_lora),
        ("attention.kv_lora_rank", kv_lora),
        ("attention.key_length", nope + rope),
        ("attention.value_length", v),
        ("rope.dimension_count", rope),
        ("expert_count", 8),
        ("expert_used_count", 2),
        ("expert_feed_forward_length", 32),
        ("expert_shared_count", 1),
        ("leading_dense_block_count", 1),
        ("expert_group_count", 4),
        ("expert_group_used_count", 2),
        ("expert_gating_func", 2),
        ("vocab_size", VOCAB),
        ("context_length", 128),
    ] {
        b.kv(&format!("{a}.{k}"), val as u32);
    }
    b.kv(&format!("{a}.expert_weights_scale"), 2.5f32);
    b.kv(&format!("{a}.expert_weights_norm"), true);
    b.kv(&format!("{a}.attention.layer_norm_rms_epsilon"), 1e-6f32);
    b.matrix("token_embd.weight", VOCAB, H);
    b.norm("output_norm.weight", H);
    b.matrix("output.weight", VOCAB, H);
    for l in 0..2 {
        let p = format!("blk.{l}");
        b.norm(&format!("{p}.attn_norm.weight"), H);
        b.norm(&format!("{p}.ffn_norm.weight"), H);
        b.matrix(&format!("{p}.attn_q_a.weight"), q_lora, H);
        b.norm(&format!("{p}.attn_q_a_norm.weight"), q_lora);
        b.matrix(&format!("{p}.attn_q_b.weight"), heads * (nope + rope), q_lora);
        b.matrix(&format!("{p}.attn_kv_a_mqa.weight"), kv_lora + rope, H);
        b.norm(&format!("{p}.attn_kv_a_norm.weight"), kv_lora);
        b.matrix(&format!("{p}.attn_kv_b.weight"), heads * (nope + v), kv_lora);
        b.matrix(&format!("{p}.attn_output.weight"), H, heads * v);
        if l == 0 {
            b.matrix(&format!("{p}.ffn_gate.weight"), 128, H);
            b.matrix(&format!("{p}.ffn_up.weight"), 128, H);
            b.matrix(&format!("{p}.ffn_down.weight"), H, 128);
        } else {
            b.matrix(&format!("{p}.ffn_gate_inp.weight"), 8, H);
            b.tensor(&format!("{p}.exp_probs_b.bias"), &[8], 0.3, 0.0);
            b.tensor(&format!("{p}.ffn_gate_exps.weight"), &[8, 32, H], 0.125, 0.0);
            b.tensor(&format!("{p}.ffn_up_exps.weight"), &[8, 32, H], 0.125, 0.0);
            b.tensor(&format!("{p}.ffn_down_exps.weight"), &[8, H, 32], 0.18, 0.0);
            b.matrix(&format!("{p}.ffn_gate_shexp.weight"), 32, H);
            b.matrix(&format!("{p}.ffn_up_shexp.weight"), 32, H);
            b.matrix(&format!("{p}.ffn_down_shexp.weight"), H, 32);
        }
    }
    b
}

/// A two-layer Qwen3-MoE-shaped model: GQA with q/k norms and softmax top-2 of 4 experts.
fn qwen3moe(store: Store) -> Builder {
    qwen3moe_declaring(store, H)
}

/// The Qwen3-MoE model with `declared` as the hidden size in its metadata.
fn qwen3moe_declaring(store: Store, declared: usize) -> Builder {
    let mut b = Builder::new("qwen3moe", store);
    let a = "qwen3moe";
    let (heads, kv_heads, hd) = (4, 2, 32);
    for (k, val) in [
        ("embedding_length", declared),
        ("block_count", 2),
        ("attention.head_count", heads),
        ("attention.head_count_kv", kv_heads),
        ("attention.key_length", hd),
        ("attention.value_length", hd),
        ("expert_count", 4),
        ("expert_used_count", 2),
        ("expert_feed_forward_length", 32),
        ("context_length", 128),
    ] {
        b.kv(&format!("{a}.{k}"), val as u32);
    }
    b.kv(&format!("{a}.rope.freq_base"), 1_000_000f32);
    b.kv(
        "tokenizer.ggml.tokens",
        kt_formats::Value::Array((0..VOCAB).map(|i| format!("t{i}")).collect::<Vec<_>>().into()),
    );
    b.matrix("token_embd.weight", VOCAB, H);
    b.norm("output_norm.weight", H);
    for l in 0..2 {
        let p = format!("blk.{l}");
        b.norm(&format!("{p}.attn_norm.weight"), H);
        b.norm(&format!("{p}.ffn_norm.weight"), H);
        b.matrix(&format!("{p}.attn_q.weight"), heads * hd, H);
        b.matrix(&format!("{p}.attn_k.weight"), kv_heads * hd, H);
        b.matrix(&format!("{p}.attn_v.weight"), kv_heads * hd, H);
        b.matrix(&format!("{p}.attn_output.weight"), H, heads * hd);
        b.norm(&format!("{p}.attn_q_norm.weight"), hd);
        b.norm(&format!("{p}.attn_k_norm.weight"), hd);
        b.matrix(&format!("{p}.ffn_gate_inp.weight"), 4, H);
        b.tensor(&format!("{p}.ffn_gate_exps.weight"), &[4, 32, H], 0.125, 0.0);
        b.tensor(&format!("{p}.ffn_up_exps.weight"), &[4, 32, H], 0.125, 0.0);
        b.tensor(&format!("{p}.ffn_down_exps.weight"), &[4, H, 32], 0.18, 0.0);
    }
    b
}

const PROMPT: [u32; 7] = [3, 17, 92, 40, 5, 5, 61];

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn batched_equals_sequential(model: &Model) {
    let mut batched = model.new_sequence();
    let a = model.forward(&mut batched, &PROMPT).unwrap();
    let mut seq = model.new_sequence();
    let mut b = Vec::new();
    for t in PROMPT {
        b = model.forward(&mut seq, &[t]).unwrap();
    }
    assert!(max_diff(&a, &b) < 1e-4, "prefill vs token-by-token: {}", max_diff(&a, &b));
    // and decoding continues identically from both caches
    let a2 = model.forward(&mut batched, &[7]).unwrap();
    let b2 = model.forward(&mut seq, &[7]).unwrap();
    assert!(max_diff(&a2, &b2) < 1e-4);
    assert_eq!(batched.len(), PROMPT.len() + 1);
}

#[test]
fn experts_split_over_shards_give_the_same_logits() {
    use std::sync::Arc;
    for b in [deepseek3(Store::F32), qwen3moe(Store::F32)] {
        let bytes = b.w.to_bytes();
        let open = || {
            let file = GgufFile::from_bytes("s.gguf", SharedBytes::new(bytes.clone())).unwrap();
            GgufModel::from_parts("s.gguf", vec![file], vec![]).unwrap()
        };
        let whole = load_gguf(open(), "s.gguf".as_ref(), MatmulMode::F32).unwrap().model;
        let g = open();
        let cfg = whole.config.clone();
        let scheme = kt_models::names::Scheme::Gguf;
        let n_exp = cfg.moe.as_ref().unwrap().n_experts;
        let mut sharded = kt_models::ShardedExperts::new(cfg.hidden);
        for parity in 0..2 {
            let keep = move |_l: usize, e: usize| e % 2 == parity;
            let part = kt_models::load_experts(&cfg, &g, scheme, MatmulMode::F32, &keep).unwrap();
            assert!(part.held().all(|(_, e)| e % 2 == parity));
            let owns = (0..cfg.n_layers)
                .map(|l| (0..n_exp).map(|e| cfg.is_moe_layer(l) && e % 2 == parity).collect())
                .collect();
            sharded = sharded.add(Arc::new(part), owns);
        }
        let split =
            kt_models::Model::load_with(cfg.clone(), &g, scheme, MatmulMode::F32, &|_, _| false)
                .unwrap()
                .with_experts(Arc::new(sharded));
        let a = whole.forward(&mut whole.new_sequence(), &PROMPT).unwrap();
        let b = split.forward(&mut split.new_sequence(), &PROMPT).unwrap();
        assert!(max_diff(&a, &b) < 1e-5, "{}", max_diff(&a, &b));
        // a model without its experts says so instead of computing something else
        let none =
            kt_models::Model::load_with(cfg, &g, scheme, MatmulMode::F32, &|_, _| false).unwrap();
        assert!(none.forward(&mut none.new_sequence(), &PROMPT).is_err());
    }
}

#[test]
fn truncating_the_cache_replays_identically() {
    for m in [deepseek3(Store::F32).finish(), qwen3moe(Store::F32).finish()] {
        let mut seq = m.new_sequence();
        let first = m.forward(&mut seq, &PROMPT[..4]).unwrap();
        m.forward(&mut seq, &PROMPT[4..]).unwrap();
        seq.truncate(3);
        assert_eq!(seq.len(), 3);
        let again = m.forward(&mut seq, &PROMPT[3..4]).unwrap();
        assert!(max_diff(&first, &again) < 1e-5);
    }
}

#[test]
fn deepseek3_prefill_equals_decode() {
    let m = deepseek3(Store::F32).finish();
    assert_eq!(m.config.arch, kt_models::Arch::Deepseek3);
    batched_equals_sequential(&m);
}

#[test]
fn qwen3moe_prefill_equals_decode() {
    let m = qwen3moe(Store::F32).finish();
    // no output.weight: the embeddings are tied
    assert!(m.config.tie_embeddings);
    batched_equals_sequential(&m);
}

#[test]
fn q8_0_weights_stay_close_to_f32() {
    for (f32_model, q8_model) in [
        (deepseek3(Store::F32).finish(), deepseek3(Store::Q8_0).finish()),
        (qwen3moe(Store::F32).finish(), qwen3moe(Store::Q8_0).finish()),
    ] {
        let a = f32_model.forward(&mut f32_model.new_sequence(), &PROMPT).unwrap();
        let b = q8_model.forward(&mut q8_model.new_sequence(), &PROMPT).unwrap();
        let scale = a.iter().map(|v| v.abs()).fold(0.0, f32::max);
        // Q8_0 keeps ~8 bits per weight: logits move by well under 5 % of their range.
        assert!(max_diff(&a, &b) < 0.05 * scale, "{} vs scale {scale}", max_diff(&a, &b));
        assert!(max_diff(&a, &b) > 0.0, "quantization had no effect: the test is vacuous");
    }
}

#[test]
fn ggml_matmul_mode_stays_close_to_f32() {
    let bytes = qwen3moe(Store::Q8_0).w.to_bytes();
    let open = |mode| {
        let file = GgufFile::from_bytes("q.gguf", SharedBytes::new(bytes.clone())).unwrap();
        let g = GgufModel::from_parts("q.gguf", vec![file], vec![]).unwrap();
        load_gguf(g, "q.gguf".as_ref(), mode).unwrap().model
    };
    let (exact, ggml) = (open(MatmulMode::F32), open(MatmulMode::Ggml));
    let a = exact.forward(&mut exact.new_sequence(), &PROMPT).unwrap();
    let b = ggml.forward(&mut ggml.new_sequence(), &PROMPT).unwrap();
    let scale = a.iter().map(|v| v.abs()).fold(0.0, f32::max);
    assert!(max_diff(&a, &b) < 0.05 * scale);
    assert!(max_diff(&a, &b) > 0.0);
}

#[test]
fn broken_models_are_clear_errors() {
    let try_load = |b: &Builder| {
        let file = GgufFile::from_bytes("bad.gguf", SharedBytes::new(b.w.to_bytes())).unwrap();
        let g = GgufModel::from_parts("bad.gguf", vec![file], vec![]).unwrap();
        load_gguf(g, "bad.gguf".as_ref(), MatmulMode::F32).map(|_| ()).unwrap_err().to_string()
    };
    // a tensor whose shape disagrees with the config
    let e = try_load(&qwen3moe_declaring(Store::F32, 48));
    assert!(e.contains("token_embd.weight") && e.contains("config"), "{e}");
    // a missing tensor
    let mut b = Builder::new("qwen3moe", Store::F32);
    b.kv("qwen3moe.embedding_length", H as u32);
    b.kv("qwen3moe.block_count", 1u32);
    b.kv("qwen3moe.attention.head_count", 2u32);
    b.kv("qwen3moe.vocab_size", VOCAB as u32);
    let e = try_load(&b);
    assert!(e.contains("missing tensor `token_embd.weight`"), "{e}");
    // an architecture kt does not know
    let b = Builder::new("mamba", Store::F32);
    assert!(try_load(&b).contains("mamba"));
    // a token outside the vocabulary
    let m = qwen3moe(Store::F32).finish();
    let e = m.forward(&mut m.new_sequence(), &[VOCAB as u32]).unwrap_err().to_string();
    assert!(e.contains("outside the vocabulary"), "{e}");
}
