//! The decoder: every supported architecture as one layer stack whose attention (GQA or MLA)
//! and feed-forward (dense or MoE) are chosen by the config.

use std::sync::Arc;

use kt_core::{GgmlType, SharedBytes, WeightTensor};
use kt_formats::TensorSource;

use rayon::prelude::*;

use crate::config::{AttentionConfig, ModelConfig, RopeScaling};
use crate::kv::{KvPool, SeqKv};
use crate::linear::{row_f32, to_f32, Linear, MatmulMode};
use crate::moe::{route, ExpertKernel, Experts, LocalExperts, Mlp};
use crate::names::{ExpertTensor, LayerTensor as T, Scheme};
use crate::ops::{rms_norm, sigmoid, softmax, Rope};
use crate::ModelError;

/// Grouped-query attention weights.
#[derive(Debug)]
pub struct Gqa {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// Multi-head latent attention weights, with `kv_b` split per head for absorption.
#[derive(Debug)]
pub struct Mla {
    pub q: MlaQuery,
    pub kv_a: Linear,
    pub kv_a_norm: Vec<f32>,
    /// Per head, `[kv_lora, nope]`: maps the head's no-RoPE query into the latent space.
    pub k_b_t: Vec<Linear>,
    /// Per head, `[v_dim, kv_lora]`: maps the attended latent to the head's value.
    pub v_b: Vec<Linear>,
    pub o: Linear,
    pub n_heads: usize,
    pub kv_lora: usize,
    pub nope: usize,
    pub rope: usize,
    pub v_dim: usize,
}

#[derive(Debug)]
pub enum MlaQuery {
    Direct(Linear),
    LowRank { a: Linear, norm: Vec<f32>, b: Linear },
}

#[derive(Debug)]
pub enum Attention {
    Gqa(Gqa),
    Mla(Mla),
}

#[derive(Debug)]
pub struct MoeBlock {
    pub router: Linear,
    pub router_bias: Option<Vec<f32>>,
    pub shared: Option<Mlp>,
    pub shared_gate: Option<Linear>,
}

#[derive(Debug)]
// One per layer, built once: the size difference of the variants costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Ffn {
    Dense(Mlp),
    Moe(MoeBlock),
}

#[derive(Debug)]
pub struct Layer {
    pub attn_norm: Vec<f32>,
    pub ffn_norm: Vec<f32>,
    pub attn: Attention,
    pub ffn: Ffn,
}

/// A sequence run on its own, outside a batching scheduler: its KV cache in a pool of its own
/// that grows as needed. A scheduler keeps one [`KvPool`] for all sequences instead and calls
/// [`Model::forward_batch`].
#[derive(Debug)]
pub struct Sequence {
    pool: KvPool,
    kv: SeqKv,
}

impl Sequence {
    /// Number of tokens already processed.
    pub fn len(&self) -> usize {
        self.kv.len()
    }

    pub fn is_empty(&self) -> bool {
        self.kv.is_empty()
    }

    /// Forgets every position from `len` on, so that a conversation can continue from a
    /// shared prefix (no-op when `len` is not shorter).
    pub fn truncate(&mut self, len: usize) {
        self.pool.truncate(&mut self.kv, len);
    }
}

/// One sequence's part of a batched step: `tokens` to run after the positions `kv` holds.
#[derive(Debug)]
pub struct Step<'a> {
    pub kv: &'a mut SeqKv,
    pub tokens: &'a [u32],
}

/// Where a step's tokens sit in the batch: rows `start..start + n` at positions `pos..`.
#[derive(Debug, Clone, Copy)]
struct Segment {
    start: usize,
    pos: usize,
}

/// The batch as attention sees it: each token's segment, and the segments' block tables.
struct Batch<'a> {
    segments: Vec<Segment>,
    tables: Vec<&'a [u32]>,
    /// For every row of the batch, the index of its segment.
    row_segment: Vec<usize>,
}

impl Batch<'_> {
    fn rows(&self) -> usize {
        self.row_segment.len()
    }

    /// Segment index and position of batch row `row`.
    fn locate(&self, row: usize) -> (usize, usize) {
        let s = self.row_segment[row];
        let seg = self.segments[s];
        (s, seg.pos + row - seg.start)
    }
}

/// Positions per block of a lone [`Sequence`]'s own cache.
const SEQUENCE_BLOCK_TOKENS: usize = 64;

/// A loaded model on the CPU backend.
pub struct Model {
    pub config: ModelConfig,
    embed: WeightTensor,
    final_norm: Vec<f32>,
    lm_head: Linear,
    layers: Vec<Layer>,
    rope: Rope,
    softmax_scale_mult: f32,
    experts: Arc<dyn Experts>,
    /// The routed experts loaded with the model, typed: the same allocation as `experts` until
    /// [`Model::with_experts`] replaces them (how [`Model::repack_experts_int8`] reaches them).
    local: Option<Arc<LocalExperts>>,
    /// The MoE config routing uses when fewer experts per token than the model's top-k are
    /// in force ("selective experts", [`Model::with_experts_per_token`]).
    selective: Option<crate::config::MoeConfig>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model").field("config", &self.config).finish_non_exhaustive()
    }
}

struct Loader<'a> {
    src: &'a dyn TensorSource,
    scheme: Scheme,
    mode: MatmulMode,
}

impl Loader<'_> {
    fn find(&self, names: &[String]) -> Option<String> {
        names.iter().find(|n| self.src.contains(n)).cloned()
    }

    fn opt(&self, names: Vec<String>, shape: &[usize]) -> Result<Option<WeightTensor>, ModelError> {
        let Some(name) = self.find(&names) else { return Ok(None) };
        let mut t = self.src.tensor(&name)?;
        if t.shape != shape {
            // Writers differ on unit dimensions (llama.cpp stores Qwen2-MoE's [1, n] shared
            // expert gate as [n]); the same elements in the same order are the same tensor.
            let squeeze = |s: &[usize]| s.iter().copied().filter(|&d| d != 1).collect::<Vec<_>>();
            // Rows must keep their length: blocks of quantized formats run along them.
            if squeeze(&t.shape) != squeeze(shape) || t.shape.last() != shape.last() {
                return Err(ModelError::Shape(format!(
                    "tensor `{name}` has shape {:?}, the config implies {shape:?}",
                    t.shape
                )));
            }
            t.shape = shape.to_vec();
        }
        Ok(Some(t))
    }

    fn get(&self, names: Vec<String>, shape: &[usize]) -> Result<WeightTensor, ModelError> {
        let shown = names.join("` or `");
        self.opt(names, shape)?.ok_or(ModelError::MissingTensor(shown))
    }

    fn vec(&self, names: Vec<String>, len: usize) -> Result<Vec<f32>, ModelError> {
        to_f32(&self.get(names, &[len])?)
    }

    fn opt_vec(&self, names: Vec<String>, len: usize) -> Result<Option<Vec<f32>>, ModelError> {
        self.opt(names, &[len])?.map(|t| to_f32(&t)).transpose()
    }

    fn linear(&self, names: Vec<String>, out: usize, inp: usize) -> Result<Linear, ModelError> {
        Linear::new(self.get(names, &[out, inp])?, None, self.mode)
    }

    fn mlp(&self, l: usize, g: T, u: T, d: T, hidden: usize, ff: usize) -> Result<Mlp, ModelError> {
        Ok(Mlp {
            gate: self.linear(self.scheme.layer(l, g), ff, hidden)?,
            up: self.linear(self.scheme.layer(l, u), ff, hidden)?,
            down: self.linear(self.scheme.layer(l, d), hidden, ff)?,
        })
    }
}

impl Model {
    /// Builds the model from weight files whose names follow `scheme`. Routed experts are
    /// loaded into a [`LocalExperts`]; use [`Model::with_experts`] to put another
    /// implementation behind the seam.
    pub fn load(
        config: ModelConfig,
        src: &dyn TensorSource,
        scheme: Scheme,
        mode: MatmulMode,
    ) -> Result<Self, ModelError> {
        Self::load_with(config, src, scheme, mode, &|_, _| true)
    }

    /// [`Model::load`], holding only the routed experts `(layer, expert)` for which `keep` is
    /// true (a worker whose experts live on expert servers keeps none and calls
    /// [`Model::with_experts`]).
    pub fn load_with(
        config: ModelConfig,
        src: &dyn TensorSource,
        scheme: Scheme,
        mode: MatmulMode,
        keep: &dyn Fn(usize, usize) -> bool,
    ) -> Result<Self, ModelError> {
        let ld = Loader { src, scheme, mode };
        let c = &config;
        let h = c.hidden;
        let embed = ld.get(scheme.embed(), &[c.vocab_size, h])?;
        let final_norm = ld.vec(scheme.final_norm(), h)?;
        let lm_head = match ld.opt(scheme.lm_head(), &[c.vocab_size, h])? {
            Some(w) if !c.tie_embeddings => Linear::new(w, None, mode)?,
            _ => Linear::new(embed.clone(), None, mode)?,
        };
        let mut layers = Vec::with_capacity(c.n_layers);
        for l in 0..c.n_layers {
            let attn = Self::load_attention(&ld, c, l)?;
            let ffn = if c.is_moe_layer(l) {
                Ffn::Moe(Self::load_moe(&ld, c, l)?)
            } else {
                Ffn::Dense(ld.mlp(l, T::FfnGate, T::FfnUp, T::FfnDown, h, c.ff)?)
            };
            layers.push(Layer {
                attn_norm: ld.vec(scheme.layer(l, T::AttnNorm), h)?,
                ffn_norm: ld.vec(scheme.layer(l, T::FfnNorm), h)?,
                attn,
                ffn,
            });
        }
        let experts = load_experts_with(&ld, c, keep)?;
        let softmax_scale_mult = match &c.rope.scaling {
            RopeScaling::Yarn(y) => y.softmax_scale_mult,
            _ => 1.0,
        };
        let local = Arc::new(experts);
        Ok(Self {
            rope: Rope::new(&c.rope),
            experts: local.clone(),
            local: Some(local),
            config,
            embed,
            final_norm,
            lm_head,
            layers,
            softmax_scale_mult,
            selective: None,
        })
    }

    /// The layers, read-only: what another backend (CUDA) uploads and computes the same way.
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// The token embedding table `[vocab, hidden]`.
    pub fn embedding(&self) -> &WeightTensor {
        &self.embed
    }

    pub fn final_norm(&self) -> &[f32] {
        &self.final_norm
    }

    pub fn lm_head(&self) -> &Linear {
        &self.lm_head
    }

    pub fn rope(&self) -> &Rope {
        &self.rope
    }

    /// MLA's softmax scale multiplier (YaRN's mscale², 1 otherwise).
    pub fn softmax_scale_mult(&self) -> f32 {
        self.softmax_scale_mult
    }

    /// The routed-expert implementation in use.
    pub fn experts(&self) -> &Arc<dyn Experts> {
        &self.experts
    }

    /// The routing in force: the model's MoE config, or its "selective experts" variant
    /// (None for a dense model).
    pub fn routing_config(&self) -> Option<&crate::config::MoeConfig> {
        self.selective.as_ref().or(self.config.moe.as_ref())
    }

    /// Replaces the routed-expert implementation (e.g. with a remote expert tier).
    pub fn with_experts(mut self, experts: Arc<dyn Experts>) -> Self {
        self.experts = experts;
        self.local = None;
        self
    }

    /// The kernel of the routed experts loaded with the model (None after
    /// [`Model::with_experts`]).
    pub fn experts_kernel(&self) -> Option<ExpertKernel> {
        self.local.as_ref().map(|l| l.kernel())
    }

    /// Repacks the routed experts loaded with the model to `amx_int8` on the current rayon
    /// pool ([`LocalExperts::repack_int8`]: its threads first touch the copies;
    /// `progress(done, total)` after each expert) and computes them with
    /// [`ExpertKernel::Hybrid`]: calls of fewer than `int8_from` tokens on the GGUF weights
    /// with the fused kernel, longer ones on the int8 copies; `int8_from` 0 is
    /// [`ExpertKernel::Int8`] (every call). Returns the kernel now in force.
    ///
    /// Fails, leaving the model as it was, when its experts were replaced
    /// ([`Model::with_experts`]) or are shared (a clone of [`Model::experts`] is alive).
    pub fn repack_experts_int8(
        &mut self,
        int8_from: usize,
        progress: impl Fn(usize, usize) + Sync,
    ) -> Result<ExpertKernel, ModelError> {
        let Some(mut local) = self.local.take() else {
            return Err(ModelError::Unsupported(
                "repacking experts to amx_int8: the model's routed experts are not the ones \
                 loaded with it"
                    .into(),
            ));
        };
        // `experts` is the same allocation: let go of that handle while the experts change.
        self.experts = Arc::new(LocalExperts::default());
        let res = match Arc::get_mut(&mut local) {
            None => Err(ModelError::Unsupported(
                "repacking experts to amx_int8: the model's routed experts are shared".into(),
            )),
            Some(experts) => experts.repack_int8(|_| true, progress).map(|()| {
                let kernel = if int8_from == 0 {
                    ExpertKernel::Int8 { path: None }
                } else {
                    ExpertKernel::Hybrid { fused: Default::default(), int8_from }
                };
                *experts = std::mem::take(experts).with_kernel(kernel);
                kernel
            }),
        };
        self.experts = local.clone();
        self.local = Some(local);
        res
    }

    /// Routes each token to only its `k` best experts instead of the model's top-k
    /// (KTransformers' "selective experts"); the routing weights are computed over those `k`
    /// as the architecture computes them over its top-k. `k` must be in 1..=top-k; the
    /// model's top-k restores the default. Fails for a dense model.
    pub fn with_experts_per_token(mut self, k: usize) -> Result<Self, ModelError> {
        let Some(moe) = &self.config.moe else {
            return Err(ModelError::Input(format!(
                "experts per token {k}: the model has no routed experts"
            )));
        };
        if k == 0 || k > moe.top_k {
            return Err(ModelError::Input(format!(
                "experts per token {k} is out of range 1..={} (the model's top-k)",
                moe.top_k
            )));
        }
        self.selective =
            (k < moe.top_k).then(|| crate::config::MoeConfig { top_k: k, ..moe.clone() });
        Ok(self)
    }

    /// Routed experts per token in force (0 for a dense model).
    pub fn experts_per_token(&self) -> usize {
        self.selective.as_ref().or(self.config.moe.as_ref()).map_or(0, |m| m.top_k)
    }

    fn load_attention(ld: &Loader<'_>, c: &ModelConfig, l: usize) -> Result<Attention, ModelError> {
        let h = c.hidden;
        let s = ld.scheme;
        match c.attention {
            AttentionConfig::Gqa { n_heads, n_kv_heads, head_dim, qkv_bias, qk_norm } => {
                let (qd, kd) = (n_heads * head_dim, n_kv_heads * head_dim);
                let with_bias = |w: T, b: T, out: usize| -> Result<Linear, ModelError> {
                    let bias = if qkv_bias { ld.opt_vec(s.layer(l, b), out)? } else { None };
                    Linear::new(ld.get(s.layer(l, w), &[out, h])?, bias, ld.mode)
                };
                Ok(Attention::Gqa(Gqa {
                    q: with_bias(T::Q, T::QBias, qd)?,
                    k: with_bias(T::K, T::KBias, kd)?,
                    v: with_bias(T::V, T::VBias, kd)?,
                    o: ld.linear(s.layer(l, T::O), h, qd)?,
                    q_norm: if qk_norm {
                        Some(ld.vec(s.layer(l, T::QNorm), head_dim)?)
                    } else {
                        None
                    },
                    k_norm: if qk_norm {
                        Some(ld.vec(s.layer(l, T::KNorm), head_dim)?)
                    } else {
                        None
                    },
                    n_heads,
                    n_kv_heads,
                    head_dim,
                }))
            }
            AttentionConfig::Mla {
                n_heads,
                q_lora_rank,
                kv_lora_rank,
                qk_nope_head_dim: nope,
                qk_rope_head_dim: rope,
                v_head_dim: v_dim,
            } => {
                let qd = n_heads * (nope + rope);
                let q = match q_lora_rank {
                    None => MlaQuery::Direct(ld.linear(s.layer(l, T::Q), qd, h)?),
                    Some(r) => MlaQuery::LowRank {
                        a: ld.linear(s.layer(l, T::QA), r, h)?,
                        norm: ld.vec(s.layer(l, T::QANorm), r)?,
                        b: ld.linear(s.layer(l, T::QB), qd, r)?,
                    },
                };
                // llama.cpp's converter stores kv_b already split (k_b transposed per head);
                // HF checkpoints store kv_b whole, which is split here the same way.
                let (k_b_t, v_b) = if let Some(kv_b) =
                    ld.opt(s.layer(l, T::KvB), &[n_heads * (nope + v_dim), kv_lora_rank])?
                {
                    let w = to_f32(&kv_b)?;
                    let per = (nope + v_dim) * kv_lora_rank;
                    let mut k_b_t = Vec::with_capacity(n_heads);
                    let mut v_b = Vec::with_capacity(n_heads);
                    for hd in 0..n_heads {
                        let head = &w[hd * per..(hd + 1) * per];
                        let mut kt = vec![0f32; kv_lora_rank * nope];
                        for i in 0..nope {
                            for j in 0..kv_lora_rank {
                                kt[j * nope + i] = head[i * kv_lora_rank + j];
                            }
                        }
                        let name = |part: &str| format!("{}[{part} head {hd}]", kv_b.name);
                        k_b_t.push(f32_linear(name("k"), kt, kv_lora_rank, nope, ld.mode)?);
                        let vb = head[nope * kv_lora_rank..].to_vec();
                        v_b.push(f32_linear(name("v"), vb, v_dim, kv_lora_rank, ld.mode)?);
                    }
                    (k_b_t, v_b)
                } else {
                    let kb = ld.get(s.layer(l, T::KB), &[n_heads, kv_lora_rank, nope])?;
                    let vb = ld.get(s.layer(l, T::VB), &[n_heads, v_dim, kv_lora_rank])?;
                    let per_head = |t: &WeightTensor, rows: usize| {
                        (0..n_heads)
                            .map(|hd| {
                                let w = LocalExperts::slice_expert(t, hd, 0..rows)?;
                                Linear::new(w, None, ld.mode)
                            })
                            .collect::<Result<Vec<_>, ModelError>>()
                    };
                    (per_head(&kb, kv_lora_rank)?, per_head(&vb, v_dim)?)
                };
                Ok(Attention::Mla(Mla {
                    q,
                    kv_a: ld.linear(s.layer(l, T::KvAMqa), kv_lora_rank + rope, h)?,
                    kv_a_norm: ld.vec(s.layer(l, T::KvANorm), kv_lora_rank)?,
                    k_b_t,
                    v_b,
                    o: ld.linear(s.layer(l, T::O), h, n_heads * v_dim)?,
                    n_heads,
                    kv_lora: kv_lora_rank,
                    nope,
                    rope,
                    v_dim,
                }))
            }
        }
    }

    fn load_moe(ld: &Loader<'_>, c: &ModelConfig, l: usize) -> Result<MoeBlock, ModelError> {
        let Some(m) = &c.moe else {
            return Err(ModelError::Config("MoE layer without an MoE config".into()));
        };
        let (h, ne) = (c.hidden, m.n_experts);
        let s = ld.scheme;
        let router = ld.linear(s.layer(l, T::Router), ne, h)?;
        let router_bias = ld.opt_vec(s.layer(l, T::RouterBias), ne)?;
        let shared = if m.shared_ff > 0 {
            Some(ld.mlp(l, T::ShexpGate, T::ShexpUp, T::ShexpDown, h, m.shared_ff)?)
        } else {
            None
        };
        let shared_gate =
            if m.shared_gate { Some(ld.linear(s.layer(l, T::ShexpRouter), 1, h)?) } else { None };
        Ok(MoeBlock { router, router_bias, shared, shared_gate })
    }

    /// A fresh sequence with an empty KV cache of its own.
    pub fn new_sequence(&self) -> Sequence {
        Sequence { pool: KvPool::growable(&self.config, SEQUENCE_BLOCK_TOKENS), kv: SeqKv::new() }
    }

    /// Runs `tokens` through the model after what `seq` holds and returns the logits of the
    /// last one.
    pub fn forward(&self, seq: &mut Sequence, tokens: &[u32]) -> Result<Vec<f32>, ModelError> {
        let Sequence { pool, kv } = seq;
        let mut logits = self.forward_batch(pool, &mut [Step { kv, tokens }])?;
        logits.pop().ok_or_else(|| ModelError::Input("no logits".into()))
    }

    /// Runs one iteration of a batch: every step's tokens after what its sequence holds in
    /// `pool` (a decode step is one token, a prefill chunk several), all through each weight
    /// matrix at once. Returns, per step, the logits of its last token.
    ///
    /// Each token's result is the same as when its sequence runs alone: every row of a
    /// product and every attention row is computed independently, in the same order.
    /// Blocks for the new positions are taken from `pool` first; when it has too few, nothing
    /// runs and [`ModelError::KvFull`] says how many were missing.
    pub fn forward_batch(
        &self,
        pool: &mut KvPool,
        steps: &mut [Step<'_>],
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let h = self.config.hidden;
        if steps.is_empty() {
            return Ok(Vec::new());
        }
        if !pool.fits(&self.config) {
            return Err(ModelError::Input("KV cache belongs to another model".into()));
        }
        let vocab = self.config.vocab_size;
        for step in steps.iter() {
            if step.tokens.is_empty() {
                return Err(ModelError::Input("no tokens to process".into()));
            }
            if let Some(id) = step.tokens.iter().find(|&&id| id as usize >= vocab) {
                return Err(ModelError::Input(format!(
                    "token id {id} is outside the vocabulary of {vocab}"
                )));
            }
        }
        let needed: usize =
            steps.iter().map(|s| pool.blocks_needed(s.kv, s.kv.len() + s.tokens.len())).sum();
        if needed > pool.free_blocks() && !pool.is_growable() {
            return Err(ModelError::KvFull { needed, free: pool.free_blocks() });
        }
        for step in steps.iter_mut() {
            let total = step.kv.len() + step.tokens.len();
            pool.reserve(step.kv, total)?;
        }
        let mut segments = Vec::with_capacity(steps.len());
        let mut row_segment = Vec::new();
        for (i, step) in steps.iter().enumerate() {
            segments.push(Segment { start: row_segment.len(), pos: step.kv.len() });
            row_segment.extend(std::iter::repeat_n(i, step.tokens.len()));
        }
        let rows = row_segment.len();
        let mut x = vec![0f32; rows * h];
        for (id, row) in steps.iter().flat_map(|s| s.tokens).zip(x.chunks_exact_mut(h)) {
            row_f32(&self.embed, *id as usize, row)?;
        }
        {
            let batch = Batch {
                tables: steps.iter().map(|s| s.kv.blocks()).collect(),
                segments,
                row_segment,
            };
            for (l, layer) in self.layers.iter().enumerate() {
                let mut y = x.clone();
                rms_norm(&mut y, &layer.attn_norm, self.config.rms_eps);
                let a = match &layer.attn {
                    Attention::Gqa(g) => self.gqa(g, pool, l, &batch, &y),
                    Attention::Mla(m) => self.mla(m, pool, l, &batch, &y),
                };
                add(&mut x, &a);
                let mut y = x.clone();
                rms_norm(&mut y, &layer.ffn_norm, self.config.rms_eps);
                let f = match &layer.ffn {
                    Ffn::Dense(mlp) => mlp.forward(&y, rows),
                    Ffn::Moe(b) => self.moe(l, b, &y, rows)?,
                };
                add(&mut x, &f);
            }
        }
        let mut last = Vec::with_capacity(steps.len() * h);
        let mut end = 0;
        for step in steps.iter_mut() {
            step.kv.advance(step.tokens.len());
            end += step.tokens.len();
            last.extend_from_slice(&x[(end - 1) * h..end * h]);
        }
        rms_norm(&mut last, &self.final_norm, self.config.rms_eps);
        let logits = self.lm_head.forward(&last, steps.len());
        Ok(logits.chunks_exact(vocab).map(<[f32]>::to_vec).collect())
    }

    fn moe(&self, l: usize, b: &MoeBlock, x: &[f32], n: usize) -> Result<Vec<f32>, ModelError> {
        let Some(cfg) = &self.config.moe else {
            return Err(ModelError::Config("MoE layer without an MoE config".into()));
        };
        let logits = b.router.forward(x, n);
        let cfg = self.selective.as_ref().unwrap_or(cfg);
        let routing = route(cfg, &logits, b.router_bias.as_deref());
        let mut out = self.experts.forward(l, x, &routing)?;
        if let Some(shared) = &b.shared {
            let mut s = shared.forward(x, n);
            if let Some(gate) = &b.shared_gate {
                let g = gate.forward(x, n);
                let h = self.config.hidden;
                for (row, g) in s.chunks_exact_mut(h).zip(&g) {
                    let w = sigmoid(*g);
                    row.iter_mut().for_each(|v| *v *= w);
                }
            }
            add(&mut out, &s);
        }
        Ok(out)
    }

    fn gqa(&self, g: &Gqa, pool: &mut KvPool, l: usize, b: &Batch<'_>, x: &[f32]) -> Vec<f32> {
        let hd = g.head_dim;
        let n = b.rows();
        let mut q = g.q.forward(x, n);
        let mut k = g.k.forward(x, n);
        let v = g.v.forward(x, n);
        let kd = g.n_kv_heads * hd;
        let rows = q.chunks_exact_mut(g.n_heads * hd).zip(k.chunks_exact_mut(kd));
        for (t, (qt, kt)) in rows.enumerate() {
            let (s, pos) = b.locate(t);
            for head in qt.chunks_exact_mut(hd) {
                if let Some(w) = &g.q_norm {
                    rms_norm(head, w, self.config.rms_eps);
                }
                self.rope.apply(head, pos);
            }
            for head in kt.chunks_exact_mut(hd) {
                if let Some(w) = &g.k_norm {
                    rms_norm(head, w, self.config.rms_eps);
                }
                self.rope.apply(head, pos);
            }
            pool.write(l, b.tables[s], pos, kt, &v[t * kd..(t + 1) * kd]);
        }
        let pool = &*pool;
        let group = g.n_heads / g.n_kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let mut out = vec![0f32; n * g.n_heads * hd];
        // One task per (token, head): each reads only its own sequence's blocks.
        out.par_chunks_mut(hd).enumerate().for_each_init(Vec::new, |scores, (i, o)| {
            let (t, head) = (i / g.n_heads, i % g.n_heads);
            let (s, pos) = b.locate(t);
            let cache = pool.view(l, b.tables[s]);
            let kv_off = (head / group) * hd;
            let qh = &q[i * hd..][..hd];
            scores.clear();
            scores.extend((0..=pos).map(|p| dot(qh, &cache.k(p)[kv_off..][..hd]) * scale));
            softmax(scores);
            for (p, s) in scores.iter().enumerate() {
                axpy(o, *s, &cache.v(p)[kv_off..][..hd]);
            }
        });
        g.o.forward(&out, n)
    }

    fn mla(&self, m: &Mla, pool: &mut KvPool, l: usize, b: &Batch<'_>, x: &[f32]) -> Vec<f32> {
        let (nh, r, nope, rope, vd) = (m.n_heads, m.kv_lora, m.nope, m.rope, m.v_dim);
        let n = b.rows();
        let qk = nope + rope;
        let mut q = match &m.q {
            MlaQuery::Direct(w) => w.forward(x, n),
            MlaQuery::LowRank { a, norm, b } => {
                let mut c = a.forward(x, n);
                rms_norm(&mut c, norm, self.config.rms_eps);
                b.forward(&c, n)
            }
        };
        let kv = m.kv_a.forward(x, n);
        for (t, row) in kv.chunks_exact(r + rope).enumerate() {
            let (s, pos) = b.locate(t);
            let mut c = row[..r].to_vec();
            rms_norm(&mut c, &m.kv_a_norm, self.config.rms_eps);
            let mut kpe = row[r..].to_vec();
            self.rope.apply(&mut kpe, pos);
            pool.write(l, b.tables[s], pos, &c, &kpe);
        }
        let pool = &*pool;
        let scale = self.softmax_scale_mult / (qk as f32).sqrt();
        // Absorb k_b into the queries, head by head for all tokens: q_lat = k_b^T q_nope.
        let mut q_lat = vec![0f32; n * nh * r];
        let mut q_nope = vec![0f32; n * nope];
        for head in 0..nh {
            for t in 0..n {
                let qh = &mut q[(t * nh + head) * qk..][..qk];
                self.rope.apply(&mut qh[nope..], b.locate(t).1);
                q_nope[t * nope..(t + 1) * nope].copy_from_slice(&qh[..nope]);
            }
            let lat = m.k_b_t[head].forward(&q_nope, n);
            for t in 0..n {
                q_lat[(t * nh + head) * r..][..r].copy_from_slice(&lat[t * r..(t + 1) * r]);
            }
        }
        // Attention over the cached latents and shared RoPE keys; ctx is in latent space,
        // `[head][token][kv_lora]`, one task per (head, token).
        let mut ctx = vec![0f32; nh * n * r];
        ctx.par_chunks_mut(r).enumerate().for_each_init(Vec::new, |scores, (i, c)| {
            let (head, t) = (i / n, i % n);
            let (s, pos) = b.locate(t);
            let cache = pool.view(l, b.tables[s]);
            let ql = &q_lat[(t * nh + head) * r..][..r];
            let qpe = &q[(t * nh + head) * qk + nope..][..rope];
            scores.clear();
            scores.extend((0..=pos).map(|p| (dot(ql, cache.k(p)) + dot(qpe, cache.v(p))) * scale));
            softmax(scores);
            for (p, s) in scores.iter().enumerate() {
                axpy(c, *s, cache.k(p));
            }
        });
        // Expand each head's latent context to its value: v = v_b ctx.
        let mut out = vec![0f32; n * nh * vd];
        for head in 0..nh {
            let v = m.v_b[head].forward(&ctx[head * n * r..(head + 1) * n * r], n);
            for t in 0..n {
                out[(t * nh + head) * vd..][..vd].copy_from_slice(&v[t * vd..(t + 1) * vd]);
            }
        }
        m.o.forward(&out, n)
    }
}

/// The routed experts `(layer, expert)` of a model for which `keep` is true, as an expert
/// server holds them: weights stay in the (memory-mapped) files, nothing else is loaded.
pub fn load_experts(
    config: &ModelConfig,
    src: &dyn TensorSource,
    scheme: Scheme,
    mode: MatmulMode,
    keep: &dyn Fn(usize, usize) -> bool,
) -> Result<LocalExperts, ModelError> {
    load_experts_with(&Loader { src, scheme, mode }, config, keep)
}

fn load_experts_with(
    ld: &Loader<'_>,
    c: &ModelConfig,
    keep: &dyn Fn(usize, usize) -> bool,
) -> Result<LocalExperts, ModelError> {
    let mut layers = Vec::with_capacity(c.n_layers);
    for l in 0..c.n_layers {
        let mut experts = Vec::new();
        if let (true, Some(m)) = (c.is_moe_layer(l), &c.moe) {
            for e in 0..m.n_experts {
                experts.push(if keep(l, e) { Some(load_expert(ld, c, l, e)?) } else { None });
            }
        }
        layers.push(experts);
    }
    Ok(LocalExperts::new(c.hidden, layers))
}

/// One routed expert, from fused `[experts, out, in]` tensors (GGUF), transformers 5's fused
/// gate_up, or per-expert tensors (HF checkpoints).
fn load_expert(ld: &Loader<'_>, c: &ModelConfig, l: usize, e: usize) -> Result<Mlp, ModelError> {
    let Some(m) = &c.moe else {
        return Err(ModelError::Config("routed experts without an MoE config".into()));
    };
    let (h, ff, ne) = (c.hidden, m.expert_ff, m.n_experts);
    let s = ld.scheme;
    let mk = |w: WeightTensor| Linear::new(w, None, ld.mode);
    let slice = LocalExperts::slice_expert;
    if let Some(gate) = ld.opt(s.layer(l, T::ExpsGate), &[ne, ff, h])? {
        let up = ld.get(s.layer(l, T::ExpsUp), &[ne, ff, h])?;
        let down = ld.get(s.layer(l, T::ExpsDown), &[ne, h, ff])?;
        Ok(Mlp {
            gate: mk(slice(&gate, e, 0..ff)?)?,
            up: mk(slice(&up, e, 0..ff)?)?,
            down: mk(slice(&down, e, 0..h)?)?,
        })
    } else if let Some(gate_up) = ld.opt(s.layer(l, T::ExpsGateUp), &[ne, 2 * ff, h])? {
        let down = ld.get(s.layer(l, T::ExpsDown), &[ne, h, ff])?;
        Ok(Mlp {
            gate: mk(slice(&gate_up, e, 0..ff)?)?,
            up: mk(slice(&gate_up, e, ff..2 * ff)?)?,
            down: mk(slice(&down, e, 0..h)?)?,
        })
    } else {
        Ok(Mlp {
            gate: ld.linear(s.expert(l, e, ExpertTensor::Gate), ff, h)?,
            up: ld.linear(s.expert(l, e, ExpertTensor::Up), ff, h)?,
            down: ld.linear(s.expert(l, e, ExpertTensor::Down), h, ff)?,
        })
    }
}

/// A matrix built from f32 values (the HF kv_b split per head).
fn f32_linear(
    name: String,
    values: Vec<f32>,
    rows: usize,
    cols: usize,
    mode: MatmulMode,
) -> Result<Linear, ModelError> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let w = WeightTensor::new(name, GgmlType::F32, vec![rows, cols], SharedBytes::new(bytes))
        .map_err(|e| ModelError::Shape(e.to_string()))?;
    Linear::new(w, None, mode)
}

fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}
