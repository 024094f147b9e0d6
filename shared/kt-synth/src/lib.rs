//! Synthetic GGUF models for benchmarking without downloads: the real shapes of known MoE
//! models (DeepSeek-V2-Lite, DeepSeek-V3, Qwen3-30B-A3B, Mixtral-8x7B), llama.cpp's metadata
//! keys, tensor names and quantization mix, and random but valid weights: random quants under
//! finite f16 scales chosen so that every matrix has a standard deviation of
//! `1 / sqrt(fan_in)`, norms close to 1. Both kt and llama.cpp load the files.
//!
//! [`write`] streams the tensors to the file (a full DeepSeek-V2-Lite Q4_K_M is ~9 GB), with
//! generation on rayon threads overlapping the writes.

mod fill;
mod preset;
mod tensors;
mod vocab;

use std::io::{self, Write};
use std::path::Path;
use std::sync::mpsc;

use kt_formats::gguf::writer::GgufWriter;
use kt_formats::{Array, StringArray, Value};
use rayon::prelude::*;

pub use fill::Rng;
pub use preset::{Mla, Preset, Shape, SynthArch, YarnShape};
pub use tensors::{plan, Init, Quant, TensorPlan};
pub use vocab::{byte_symbols, Vocab, MIN_VOCAB};

/// Errors of planning or writing a synthetic model.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("{0}")]
    Plan(String),
    #[error("writing {path}: {source}")]
    Io { path: String, source: io::Error },
    #[error(transparent)]
    Format(#[from] kt_formats::FormatError),
}

/// What to synthesize.
#[derive(Clone, Debug, PartialEq)]
pub struct SynthOptions {
    pub preset: Preset,
    pub quant: Quant,
    /// Keep only the first `layers` layers.
    pub layers: Option<usize>,
    /// A smaller (or larger) vocabulary than the preset's, for small test files.
    pub vocab: Option<usize>,
    pub seed: u64,
}

impl SynthOptions {
    pub fn new(preset: Preset, quant: Quant) -> Self {
        Self { preset, quant, layers: None, vocab: None, seed: 0 }
    }

    /// The preset's shape with the overrides applied.
    pub fn shape(&self) -> Result<Shape, SynthError> {
        let mut s = self.preset.shape();
        if let Some(l) = self.layers {
            if l == 0 || l > s.n_layers {
                return Err(SynthError::Plan(format!(
                    "--layers {l}: {} has 1 to {} layers",
                    self.preset.name(),
                    s.n_layers
                )));
            }
            s.n_layers = l;
        }
        if let Some(v) = self.vocab {
            if !(MIN_VOCAB..=1 << 24).contains(&v) {
                return Err(SynthError::Plan(format!(
                    "--vocab {v}: the vocabulary needs {MIN_VOCAB} to {} tokens",
                    1 << 24
                )));
            }
            s.vocab = v;
        }
        Ok(s)
    }
}

/// What [`write`] reports as it goes.
#[derive(Clone, Copy, Debug)]
pub struct Progress<'a> {
    /// The tensor being written (0-based) and how many there are.
    pub tensor: usize,
    pub n_tensors: usize,
    pub name: &'a str,
    /// Tensor bytes written before this tensor, and in all.
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// What [`write`] wrote.
#[derive(Clone, Debug)]
pub struct Summary {
    pub shape: Shape,
    pub n_tensors: usize,
    /// The size of the file.
    pub file_bytes: u64,
}

/// llama.cpp's metadata for `shape`, as its converter and quantizer write it.
pub fn metadata(shape: &Shape, quant: Quant) -> Result<Vec<(String, Value)>, SynthError> {
    let a = shape.arch.gguf_arch();
    let mut md: Vec<(String, Value)> = Vec::new();
    let mut put = |k: &str, v: Value| {
        let key = if k.starts_with("general.") || k.starts_with("tokenizer.") {
            k.to_owned()
        } else {
            format!("{a}.{k}")
        };
        md.push((key, v));
    };
    let u = |x: usize| Value::U32(x as u32);
    put("general.architecture", a.into());
    put("general.type", "model".into());
    put("general.name", format!("kt synth {} {}", shape.model_name, quant.name()).into());
    put("block_count", u(shape.n_layers));
    put("context_length", u(shape.context));
    put("embedding_length", u(shape.hidden));
    put("feed_forward_length", u(shape.ff));
    put("attention.head_count", u(shape.n_heads));
    put("attention.head_count_kv", u(if shape.mla.is_some() { 1 } else { shape.n_kv_heads }));
    if let Some(y) = &shape.yarn {
        put("rope.scaling.type", "yarn".into());
        put("rope.scaling.factor", y.factor.into());
        put("rope.scaling.original_context_length", u(y.original_context));
        put("rope.scaling.yarn_beta_fast", 32f32.into());
        put("rope.scaling.yarn_beta_slow", 1f32.into());
    }
    put("rope.freq_base", shape.rope_theta.into());
    put("attention.layer_norm_rms_epsilon", shape.rms_eps.into());
    put("expert_count", u(shape.n_experts));
    put("expert_used_count", u(shape.top_k));
    if let Some(m) = &shape.mla {
        put("expert_group_count", u(shape.n_group));
        put("expert_group_used_count", u(shape.topk_group));
        put("expert_gating_func", Value::U32(if shape.sigmoid { 2 } else { 1 }));
        // The absorbed sizes (what llama.cpp's MLA caches), then the per-head ones.
        put("attention.key_length", u(m.kv_lora_rank + m.qk_rope));
        put("attention.value_length", u(m.kv_lora_rank));
        put("leading_dense_block_count", u(shape.first_dense));
        put("vocab_size", u(shape.vocab));
        // llama.cpp guesses "no q_lora" from the layer count unless told.
        put("attention.q_lora_rank", u(m.q_lora_rank.unwrap_or(0)));
        put("attention.kv_lora_rank", u(m.kv_lora_rank));
        put("attention.key_length_mla", u(m.qk_nope + m.qk_rope));
        put("attention.value_length_mla", u(m.v_head_dim));
        put("expert_feed_forward_length", u(shape.expert_ff));
        put("expert_shared_count", u(shape.n_shared));
        put("expert_weights_scale", shape.routed_scale.into());
        if shape.norm_topk {
            put("expert_weights_norm", true.into());
        }
        put("rope.dimension_count", u(m.qk_rope));
        if let Some(y) = &shape.yarn {
            put("rope.scaling.yarn_log_multiplier", (0.1 * y.mscale_all_dim).into());
        }
    } else {
        put("attention.key_length", u(shape.head_dim));
        put("attention.value_length", u(shape.head_dim));
        match shape.arch {
            SynthArch::Qwen3Moe => put("expert_feed_forward_length", u(shape.expert_ff)),
            _ => {
                put("vocab_size", u(shape.vocab));
                put("rope.dimension_count", u(shape.head_dim));
            }
        }
    }
    let v = vocab::build(shape.vocab, shape.bos, shape.eos)?;
    put("tokenizer.ggml.model", "gpt2".into());
    put("tokenizer.ggml.pre", "qwen2".into());
    put("tokenizer.ggml.tokens", Array::String(v.tokens.iter().collect::<StringArray>()).into());
    put("tokenizer.ggml.token_type", Array::I32(v.types).into());
    put("tokenizer.ggml.merges", Array::String(v.merges.iter().collect::<StringArray>()).into());
    put("tokenizer.ggml.bos_token_id", Value::U32(v.bos));
    put("tokenizer.ggml.eos_token_id", Value::U32(v.eos));
    put("tokenizer.ggml.add_bos_token", false.into());
    put("tokenizer.ggml.add_eos_token", false.into());
    put("general.quantization_version", Value::U32(2));
    put("general.file_type", Value::U32(quant.file_type()));
    Ok(md)
}

/// Bytes generated at once (then written while the next chunk is generated), and the piece
/// one rayon task fills with its own random stream.
const CHUNK: usize = 16 << 20;
const PIECE: usize = 1 << 20;

/// Writes the synthetic model `opts` describes to `path`, reporting each tensor to
/// `progress`. The same options give the same bytes.
pub fn write(
    opts: &SynthOptions,
    path: &Path,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<Summary, SynthError> {
    let shape = opts.shape()?;
    let plan = plan(&shape, opts.quant);
    let mut w = GgufWriter::new();
    for (k, v) in metadata(&shape, opts.quant)? {
        w.metadata(k, v);
    }
    for t in &plan {
        w.zero_tensor(t.name.clone(), t.ty, t.shape.clone())?;
    }
    let bytes_total: u64 = plan.iter().map(|t| t.n_bytes() as u64).sum();
    let mut bytes_done = 0u64;
    let seed = opts.seed;
    let io_err = |source| SynthError::Io { path: path.display().to_string(), source };
    w.write_with(path, |i, out| {
        let t = &plan[i];
        progress(Progress {
            tensor: i,
            n_tensors: plan.len(),
            name: &t.name,
            bytes_done,
            bytes_total,
        });
        write_tensor(t, seed, i as u64, out)?;
        bytes_done += t.n_bytes() as u64;
        Ok(())
    })
    .map_err(io_err)?;
    let file_bytes = std::fs::metadata(path).map_err(io_err)?.len();
    Ok(Summary { shape, n_tensors: plan.len(), file_bytes })
}

/// Generates tensor `t` chunk by chunk on rayon threads while this thread writes the previous
/// chunk.
fn write_tensor(t: &TensorPlan, seed: u64, index: u64, out: &mut dyn Write) -> io::Result<()> {
    let bb = t.ty.type_size();
    let piece = (PIECE / bb).max(1) * bb;
    let chunk = (CHUNK / piece).max(1) * piece;
    let total = t.n_bytes();
    let row_len = t.row_len();
    let (tx, rx) = mpsc::sync_channel::<io::Result<Vec<u8>>>(1);
    std::thread::scope(|s| {
        s.spawn(move || {
            let mut start = 0;
            while start < total {
                let len = chunk.min(total - start);
                let mut buf = vec![0u8; len];
                let first_piece = (start / piece) as u64;
                let r = buf.par_chunks_mut(piece).enumerate().try_for_each(|(j, c)| {
                    let mut rng = Rng::stream(seed, index, first_piece + j as u64);
                    fill::fill(t.ty, t.init, row_len, &mut rng, c)
                });
                let msg = r.map(|()| buf).map_err(io::Error::other);
                let failed = msg.is_err();
                if tx.send(msg).is_err() || failed {
                    return;
                }
                start += len;
            }
        });
        let mut written = 0;
        while written < total {
            let buf = rx
                .recv()
                .map_err(|_| io::Error::other(format!("generating `{}` stopped", t.name)))??;
            out.write_all(&buf)?;
            written += buf.len();
        }
        Ok(())
    })
}
