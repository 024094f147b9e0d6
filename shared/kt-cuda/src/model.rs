//! A [`Model`]'s worker half on one GPU: embedding, attention (GQA and MLA with weight
//! absorption) over a paged KV cache in device memory, norms, dense MLPs, router gates and
//! shared experts. Routed experts stay behind the model's [`kt_models::Experts`] seam (the
//! CPU tier): each MoE layer sends the normed hidden states and the routing to it while the
//! GPU computes the shared experts, and adds the answer.
//!
//! The computation mirrors `kt_models::Model::forward_batch` step by step; tests compare the
//! two (tests/parity.rs).

use std::cell::Cell;
use std::sync::Arc;

use cudarc::driver::CudaSlice;
use kt_models::config::RopeStyle;
use kt_models::linear::{to_f32, Linear};
use kt_models::model::{Attention, Ffn, MlaQuery};
use kt_models::moe::{route, LocalExperts, Mlp, NO_EXPERT};
use kt_models::{KvBlocks, Model, ModelError, Step};

use crate::device::{Arg, Dev, Gpu, WeightDtype};
use crate::CudaError;

/// Weights of one matrix on the device.
enum Weights {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<u16>),
}

struct GpuLinear {
    w: Weights,
    bias: Option<CudaSlice<f32>>,
    out: usize,
    inp: usize,
}

impl GpuLinear {
    fn new(gpu: &Gpu, l: &Linear, dtype: WeightDtype) -> Result<Self, CudaError> {
        let host = to_f32(l.weight())?;
        Self::from_f32(gpu, &host, l.out_dim(), l.in_dim(), l.bias(), dtype)
    }

    fn from_f32(
        gpu: &Gpu,
        host: &[f32],
        out: usize,
        inp: usize,
        bias: Option<&[f32]>,
        dtype: WeightDtype,
    ) -> Result<Self, CudaError> {
        let w = match dtype {
            WeightDtype::F32 => Weights::F32(gpu.upload(host)?),
            WeightDtype::Bf16 => {
                let bits: Vec<u16> =
                    host.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
                Weights::Bf16(gpu.upload(&bits)?)
            }
        };
        let bias = bias.map(|b| gpu.upload(b)).transpose()?;
        Ok(Self { w, bias, out, inp })
    }

    fn bytes(&self) -> usize {
        let per = match self.w {
            Weights::F32(_) => 4,
            Weights::Bf16(_) => 2,
        };
        self.out * self.inp * per
    }

    /// `y[n × out] = x[n × in] W^T (+ b)`, x's rows `ldx` apart.
    fn forward(&self, gpu: &Gpu, x: u64, ldx: usize, n: usize) -> Result<Dev, CudaError> {
        let y = gpu.scratch::<f32>(n * self.out)?;
        let dims = (n, self.out, self.inp);
        match &self.w {
            Weights::F32(w) => gpu.gemm(
                WeightDtype::F32,
                gpu.ptr(w),
                x,
                gpu.ptr(&y),
                dims,
                (ldx, self.out),
                (1, 0, 0, 0),
            )?,
            Weights::Bf16(w) => {
                // Round the activations to bf16 for the tensor-core product (once per input:
                // q/kv_a, gate/up and the shared expert read the same normed hidden states).
                let cached = gpu.bf16_of(x, n * self.inp).filter(|_| ldx == self.inp);
                let xb = match cached {
                    Some(xb) => xb,
                    None => gpu.scratch::<u16>(n * self.inp)?,
                };
                if cached.is_some() {
                } else if ldx == self.inp {
                    gpu.remember_bf16(x, n * self.inp, xb);
                    gpu.launch_1d(
                        &gpu.k.to_bf16,
                        n * self.inp,
                        &[Arg::Ptr(x), Arg::Ptr(gpu.ptr(&xb)), Arg::I64((n * self.inp) as i64)],
                    )?;
                } else {
                    for r in 0..n {
                        gpu.launch_1d(
                            &gpu.k.to_bf16,
                            self.inp,
                            &[
                                Arg::Ptr(x + (r * ldx * 4) as u64),
                                Arg::Ptr(gpu.ptr(&xb) + (r * self.inp * 2) as u64),
                                Arg::I64(self.inp as i64),
                            ],
                        )?;
                    }
                }
                gpu.gemm(
                    WeightDtype::Bf16,
                    gpu.ptr(w),
                    gpu.ptr(&xb),
                    gpu.ptr(&y),
                    dims,
                    (self.inp, self.out),
                    (1, 0, 0, 0),
                )?;
            }
        }
        if let Some(b) = &self.bias {
            let total = n * self.out;
            gpu.launch_1d(
                &gpu.k.add_bias,
                total,
                &[
                    Arg::Ptr(gpu.ptr(&y)),
                    Arg::Ptr(gpu.ptr(b)),
                    Arg::I32(self.out as i32),
                    Arg::I64(total as i64),
                ],
            )?;
        }
        Ok(y)
    }
}

struct GpuMlp {
    gate: GpuLinear,
    up: GpuLinear,
    down: GpuLinear,
}

impl GpuMlp {
    fn new(gpu: &Gpu, m: &Mlp, dtype: WeightDtype) -> Result<Self, CudaError> {
        Ok(Self {
            gate: GpuLinear::new(gpu, &m.gate, dtype)?,
            up: GpuLinear::new(gpu, &m.up, dtype)?,
            down: GpuLinear::new(gpu, &m.down, dtype)?,
        })
    }

    fn forward(&self, gpu: &Gpu, x: u64, n: usize) -> Result<Dev, CudaError> {
        let g = self.gate.forward(gpu, x, self.gate.inp, n)?;
        let u = self.up.forward(gpu, x, self.up.inp, n)?;
        let total = n * self.gate.out;
        gpu.launch_1d(
            &gpu.k.silu_mul,
            total,
            &[Arg::Ptr(gpu.ptr(&g)), Arg::Ptr(gpu.ptr(&u)), Arg::I64(total as i64)],
        )?;
        self.down.forward(gpu, gpu.ptr(&g), self.gate.out, n)
    }
}

struct GpuGqa {
    q: GpuLinear,
    k: GpuLinear,
    v: GpuLinear,
    o: GpuLinear,
    q_norm: Option<CudaSlice<f32>>,
    k_norm: Option<CudaSlice<f32>>,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

enum GpuMlaQuery {
    Direct(GpuLinear),
    LowRank { a: GpuLinear, norm: CudaSlice<f32>, b: GpuLinear },
}

struct GpuMla {
    q: GpuMlaQuery,
    kv_a: GpuLinear,
    kv_a_norm: CudaSlice<f32>,
    /// `[head][kv_lora][nope]`, f32.
    k_b: CudaSlice<f32>,
    /// `[head][v_dim][kv_lora]`, f32.
    v_b: CudaSlice<f32>,
    o: GpuLinear,
    n_heads: usize,
    kv_lora: usize,
    nope: usize,
    rope: usize,
    v_dim: usize,
}

enum GpuAttention {
    Gqa(GpuGqa),
    Mla(GpuMla),
}

struct GpuMoe {
    router: GpuLinear,
    router_bias: Option<Vec<f32>>,
    shared: Option<GpuMlp>,
    shared_gate: Option<GpuLinear>,
    /// Routed experts computed on this GPU ("hot" experts), by expert id; tokens routed to
    /// them never go to the CPU tier.
    hot: Vec<(usize, GpuMlp)>,
}

// One per layer, built once: the size difference of the variants costs nothing.
#[allow(clippy::large_enum_variant)]
enum GpuFfn {
    Dense(GpuMlp),
    Moe(GpuMoe),
}

struct GpuLayer {
    attn_norm: CudaSlice<f32>,
    ffn_norm: CudaSlice<f32>,
    attn: GpuAttention,
    ffn: GpuFfn,
    /// The paged cache of this layer: `[slot][kw]` and `[slot][vw]` (GQA keys and values;
    /// MLA latents and RoPE keys).
    cache_k: KvBuf,
    cache_v: KvBuf,
}

/// How the KV cache stores its values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvDtype {
    F32,
    /// Half the memory of f32; values rounded to bf16 when written.
    Bf16,
}

enum KvBuf {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<u16>),
}

impl KvBuf {
    fn new(gpu: &Gpu, dtype: KvDtype, n: usize) -> Result<Self, CudaError> {
        Ok(match dtype {
            KvDtype::F32 => Self::F32(gpu.zeros(n)?),
            KvDtype::Bf16 => Self::Bf16(gpu.zeros(n)?),
        })
    }

    fn ptr(&self, gpu: &Gpu) -> u64 {
        match self {
            Self::F32(b) => gpu.ptr(b),
            Self::Bf16(b) => gpu.ptr(b),
        }
    }
}

/// Options of [`CudaModel::new`].
#[derive(Clone, Copy, Debug)]
pub struct CudaOptions {
    pub dtype: WeightDtype,
    pub kv_dtype: KvDtype,
    /// Positions per KV block.
    pub block_tokens: usize,
    /// KV blocks to allocate on the device.
    pub kv_blocks: usize,
}

impl Default for CudaOptions {
    fn default() -> Self {
        Self {
            dtype: WeightDtype::Bf16,
            kv_dtype: KvDtype::Bf16,
            block_tokens: 16,
            kv_blocks: 1024,
        }
    }
}

/// The worker half of a model on one or more GPUs (layers split across them), with its
/// paged KV cache (each layer's part on its layer's GPU).
pub struct CudaModel {
    gpus: Vec<Gpu>,
    /// The GPU of each layer; the embedding is on the first layer's, lm_head on the last's.
    layer_dev: Vec<usize>,
    /// The GPU the step in progress computes on.
    cur: Cell<usize>,
    model: Arc<Model>,
    opts: CudaOptions,
    embed: CudaSlice<f32>,
    final_norm: CudaSlice<f32>,
    lm_head: GpuLinear,
    layers: Vec<GpuLayer>,
    /// RoPE tables, one copy per GPU.
    cos: Vec<CudaSlice<f32>>,
    sin: Vec<CudaSlice<f32>>,
    rope_pairs: usize,
    interleaved: bool,
    max_positions: usize,
    blocks: KvBlocks,
    weight_bytes: usize,
}

impl std::fmt::Debug for CudaModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaModel").field("gpus", &self.gpus).field("opts", &self.opts).finish()
    }
}

/// Attention's view of the batch, on the device.
struct DeviceBatch {
    rows: usize,
    positions: Dev,
    seqs: Dev,
    slots: Dev,
    tables: Dev,
    table_stride: usize,
}

impl CudaModel {
    /// Uploads everything but the routed experts of `model` to `gpu` and allocates the KV
    /// cache. The routed experts stay where `model.experts()` computes them.
    pub fn new(gpu: Gpu, model: Arc<Model>, opts: CudaOptions) -> Result<Self, CudaError> {
        let n = model.layers().len();
        Self::split(vec![gpu], model, opts, vec![0; n])
    }

    /// Layers split evenly in contiguous ranges across `gpus`.
    pub fn split_evenly(
        gpus: Vec<Gpu>,
        model: Arc<Model>,
        opts: CudaOptions,
    ) -> Result<Self, CudaError> {
        let (n, k) = (model.layers().len(), gpus.len().max(1));
        let layer_dev = (0..n).map(|l| l * k / n.max(1)).collect();
        Self::split(gpus, model, opts, layer_dev)
    }

    /// Layer `l` on `gpus[layer_dev[l]]` (as a placement plan says); activations pass from
    /// one GPU to the next where the layer's GPU changes.
    pub fn split(
        gpus: Vec<Gpu>,
        model: Arc<Model>,
        opts: CudaOptions,
        layer_dev: Vec<usize>,
    ) -> Result<Self, CudaError> {
        let c = &model.config;
        if gpus.is_empty() || layer_dev.len() != model.layers().len() {
            return Err(ModelError::Config(format!(
                "{} GPUs for a split of {} layers (the model has {})",
                gpus.len(),
                layer_dev.len(),
                model.layers().len()
            ))
            .into());
        }
        if let Some(d) = layer_dev.iter().find(|&&d| d >= gpus.len()) {
            return Err(
                ModelError::Config(format!("layer split names GPU {d} of {}", gpus.len())).into()
            );
        }
        let dtype = opts.dtype;
        let mut weight_bytes = 0;
        let first = &gpus[layer_dev.first().copied().unwrap_or(0)];
        let last = &gpus[layer_dev.last().copied().unwrap_or(0)];
        first.ctx.bind_to_thread()?;
        let embed = first.upload(&to_f32(model.embedding())?)?;
        last.ctx.bind_to_thread()?;
        let final_norm = last.upload(model.final_norm())?;
        let lm_head = GpuLinear::new(last, model.lm_head(), dtype)?;
        weight_bytes += lm_head.bytes() + c.vocab_size * c.hidden * 4;
        let (kw, vw) = kt_models::kv::widths(c);
        let slots = opts.block_tokens.max(1) * opts.kv_blocks;
        let mut layers = Vec::with_capacity(model.layers().len());
        for (layer, &d) in model.layers().iter().zip(&layer_dev) {
            let gpu = &gpus[d];
            gpu.ctx.bind_to_thread()?;
            let attn = match &layer.attn {
                Attention::Gqa(g) => {
                    let gq = GpuGqa {
                        q: GpuLinear::new(gpu, &g.q, dtype)?,
                        k: GpuLinear::new(gpu, &g.k, dtype)?,
                        v: GpuLinear::new(gpu, &g.v, dtype)?,
                        o: GpuLinear::new(gpu, &g.o, dtype)?,
                        q_norm: g.q_norm.as_deref().map(|w| gpu.upload(w)).transpose()?,
                        k_norm: g.k_norm.as_deref().map(|w| gpu.upload(w)).transpose()?,
                        n_heads: g.n_heads,
                        n_kv_heads: g.n_kv_heads,
                        head_dim: g.head_dim,
                    };
                    weight_bytes += gq.q.bytes() + gq.k.bytes() + gq.v.bytes() + gq.o.bytes();
                    GpuAttention::Gqa(gq)
                }
                Attention::Mla(m) => {
                    let q = match &m.q {
                        MlaQuery::Direct(w) => GpuMlaQuery::Direct(GpuLinear::new(gpu, w, dtype)?),
                        MlaQuery::LowRank { a, norm, b } => GpuMlaQuery::LowRank {
                            a: GpuLinear::new(gpu, a, dtype)?,
                            norm: gpu.upload(norm)?,
                            b: GpuLinear::new(gpu, b, dtype)?,
                        },
                    };
                    let concat = |ls: &[Linear]| -> Result<Vec<f32>, ModelError> {
                        let mut all = Vec::new();
                        for l in ls {
                            all.extend(to_f32(l.weight())?);
                        }
                        Ok(all)
                    };
                    GpuAttention::Mla(GpuMla {
                        q,
                        kv_a: GpuLinear::new(gpu, &m.kv_a, dtype)?,
                        kv_a_norm: gpu.upload(&m.kv_a_norm)?,
                        k_b: gpu.upload(&concat(&m.k_b_t)?)?,
                        v_b: gpu.upload(&concat(&m.v_b)?)?,
                        o: GpuLinear::new(gpu, &m.o, dtype)?,
                        n_heads: m.n_heads,
                        kv_lora: m.kv_lora,
                        nope: m.nope,
                        rope: m.rope,
                        v_dim: m.v_dim,
                    })
                }
            };
            let ffn = match &layer.ffn {
                Ffn::Dense(mlp) => GpuFfn::Dense(GpuMlp::new(gpu, mlp, dtype)?),
                Ffn::Moe(b) => GpuFfn::Moe(GpuMoe {
                    router: GpuLinear::new(gpu, &b.router, WeightDtype::F32)?,
                    router_bias: b.router_bias.clone(),
                    shared: b.shared.as_ref().map(|m| GpuMlp::new(gpu, m, dtype)).transpose()?,
                    shared_gate: b
                        .shared_gate
                        .as_ref()
                        .map(|g| GpuLinear::new(gpu, g, WeightDtype::F32))
                        .transpose()?,
                    hot: Vec::new(),
                }),
            };
            layers.push(GpuLayer {
                attn_norm: gpu.upload(&layer.attn_norm)?,
                ffn_norm: gpu.upload(&layer.ffn_norm)?,
                attn,
                ffn,
                cache_k: KvBuf::new(gpu, opts.kv_dtype, slots * kw)?,
                cache_v: KvBuf::new(gpu, opts.kv_dtype, slots * vw)?,
            });
        }
        let max_positions = c.max_position.clamp(1, 1 << 17);
        let (cos_h, sin_h) = model.rope().table(max_positions);
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for gpu in &gpus {
            gpu.ctx.bind_to_thread()?;
            cos.push(gpu.upload(&cos_h)?);
            sin.push(gpu.upload(&sin_h)?);
            gpu.sync()?;
        }
        let rope_pairs = model.rope().pairs();
        let interleaved = model.rope().style() == RopeStyle::Interleaved;
        let blocks = KvBlocks::new(opts.block_tokens, opts.kv_blocks);
        Ok(Self {
            gpus,
            layer_dev,
            cur: Cell::new(0),
            model,
            opts,
            embed,
            final_norm,
            lm_head,
            layers,
            cos,
            sin,
            rope_pairs,
            interleaved,
            max_positions,
            blocks,
            weight_bytes,
        })
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// The first GPU (the embedding's).
    pub fn gpu(&self) -> &Gpu {
        &self.gpus[self.layer_dev.first().copied().unwrap_or(0)]
    }

    /// Every GPU, and which one each layer is on.
    pub fn gpus(&self) -> (&[Gpu], &[usize]) {
        (&self.gpus, &self.layer_dev)
    }

    /// The GPU of the step in progress.
    fn g(&self) -> &Gpu {
        &self.gpus[self.cur.get()]
    }

    /// Makes `dev` the GPU of what follows, moving the activations `x` (`n` values) there.
    fn switch(&self, dev: usize, x: Dev, n: usize) -> Result<Dev, CudaError> {
        let from = self.cur.get();
        if from == dev {
            return Ok(x);
        }
        let host = self.gpus[from].get(x, n)?;
        self.cur.set(dev);
        self.gpus[dev].ctx.bind_to_thread()?;
        self.gpus[dev].put(&host)
    }

    /// The KV cache's bookkeeping (free blocks, block size); [`CudaModel::blocks_mut`] to
    /// release a finished sequence's blocks.
    pub fn blocks(&self) -> &KvBlocks {
        &self.blocks
    }

    pub fn blocks_mut(&mut self) -> &mut KvBlocks {
        &mut self.blocks
    }

    /// Bytes of weights held on the device (matrices and embedding).
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// Keeps the routed experts `hot[l]` of each MoE layer `l` on the layer's GPU (copies from
    /// `local`, which must hold them) and computes the tokens routed to them there; the other
    /// experts stay with the CPU tier. Replaces any earlier choice; an empty list for a layer
    /// keeps all of its experts on the CPU tier.
    pub fn set_hot_experts(
        &mut self,
        local: &LocalExperts,
        hot: &[Vec<usize>],
    ) -> Result<(), CudaError> {
        if hot.len() != self.layers.len() {
            return Err(ModelError::Config(format!(
                "hot experts given for {} layers, the model has {}",
                hot.len(),
                self.layers.len()
            ))
            .into());
        }
        let dtype = self.opts.dtype;
        for (l, ids) in hot.iter().enumerate() {
            let gpu = &self.gpus[self.layer_dev[l]];
            gpu.ctx.bind_to_thread()?;
            let GpuFfn::Moe(m) = &mut self.layers[l].ffn else {
                if ids.is_empty() {
                    continue;
                }
                return Err(ModelError::Config(format!("layer {l} has no routed experts")).into());
            };
            let mut experts = Vec::with_capacity(ids.len());
            for &e in ids {
                let mlp = local.expert(l, e).ok_or_else(|| {
                    ModelError::Config(format!("hot expert {e} of layer {l} is not held locally"))
                })?;
                let g = GpuMlp::new(gpu, mlp, dtype)?;
                self.weight_bytes += g.gate.bytes() + g.up.bytes() + g.down.bytes();
                experts.push((e, g));
            }
            m.hot = experts;
        }
        Ok(())
    }

    /// The hot experts in force: per layer, the expert ids computed on the GPU.
    pub fn hot_experts(&self) -> Vec<Vec<usize>> {
        self.layers
            .iter()
            .map(|l| match &l.ffn {
                GpuFfn::Moe(m) => m.hot.iter().map(|(e, _)| *e).collect(),
                GpuFfn::Dense(_) => Vec::new(),
            })
            .collect()
    }

    /// One iteration for several sequences, as [`Model::forward_batch`]: returns each step's
    /// last-token logits. Blocks come from [`CudaModel::blocks`]; when too few are free,
    /// nothing runs.
    pub fn forward_batch(&mut self, steps: &mut [Step<'_>]) -> Result<Vec<Vec<f32>>, CudaError> {
        if steps.is_empty() {
            return Ok(Vec::new());
        }
        let (h, vocab) = (self.model.config.hidden, self.model.config.vocab_size);
        for step in steps.iter() {
            if step.tokens.is_empty() {
                return Err(ModelError::Input("no tokens to process".into()).into());
            }
            if let Some(id) = step.tokens.iter().find(|&&id| id as usize >= vocab) {
                return Err(ModelError::Input(format!(
                    "token id {id} is outside the vocabulary of {vocab}"
                ))
                .into());
            }
            if step.kv.len() + step.tokens.len() > self.max_positions {
                return Err(ModelError::Input(format!(
                    "position {} is beyond the context of {}",
                    step.kv.len() + step.tokens.len(),
                    self.max_positions
                ))
                .into());
            }
        }
        let needed: usize = steps
            .iter()
            .map(|s| self.blocks.blocks_needed(s.kv, s.kv.len() + s.tokens.len()))
            .sum();
        if needed > self.blocks.free_blocks() {
            return Err(ModelError::KvFull { needed, free: self.blocks.free_blocks() }.into());
        }
        for step in steps.iter_mut() {
            let total = step.kv.len() + step.tokens.len();
            self.blocks.reserve(step.kv, total)?;
        }
        // The batch's rows: ids, positions, sequence index, cache slot; block tables.
        let table_stride = steps.iter().map(|s| s.kv.blocks().len()).max().unwrap_or(1).max(1);
        let (mut ids, mut positions, mut seqs, mut slots) = (vec![], vec![], vec![], vec![]);
        let mut tables = vec![0i32; steps.len() * table_stride];
        let mut last_rows = Vec::with_capacity(steps.len());
        for (i, step) in steps.iter().enumerate() {
            for (j, &b) in step.kv.blocks().iter().enumerate() {
                tables[i * table_stride + j] = b as i32;
            }
            for (t, &id) in step.tokens.iter().enumerate() {
                let pos = step.kv.len() + t;
                ids.push(id as i32);
                positions.push(pos as i32);
                seqs.push(i as i32);
                slots.push(self.blocks.slot(step.kv.blocks(), pos) as i32);
            }
            last_rows.push((ids.len() - 1) as i32);
        }
        let rows = ids.len();
        // Every GPU's copy of the batch; the previous step's scratch buffers are free again.
        // The scheduler calls from its own thread: each context is made current there (the
        // raw copies do not do it themselves).
        let mut batches = Vec::with_capacity(self.gpus.len());
        for g in &self.gpus {
            g.ctx.bind_to_thread()?;
            g.reset_scratch();
            batches.push(DeviceBatch {
                rows,
                positions: g.put(&positions)?,
                seqs: g.put(&seqs)?,
                slots: g.put(&slots)?,
                tables: g.put(&tables)?,
                table_stride,
            });
        }
        let first = self.layer_dev.first().copied().unwrap_or(0);
        self.cur.set(first);
        let g = &self.gpus[first];
        g.ctx.bind_to_thread()?;
        let ids = g.put(&ids)?;
        let mut x = g.scratch::<f32>(rows * h)?;
        g.launch(
            &g.k.gather_rows,
            rows as u32,
            256,
            0,
            &[
                Arg::Ptr(g.ptr(&self.embed)),
                Arg::Ptr(g.ptr(&ids)),
                Arg::Ptr(g.ptr(&x)),
                Arg::I32(h as i32),
            ],
        )?;
        for l in 0..self.layers.len() {
            let layer = &self.layers[l];
            x = self.switch(self.layer_dev[l], x, rows * h)?;
            let g = self.g();
            let batch = &batches[self.cur.get()];
            let y = self.norm(&x, rows, &layer.attn_norm)?;
            let a = match &layer.attn {
                GpuAttention::Gqa(a) => self.gqa(a, layer, batch, &y)?,
                GpuAttention::Mla(m) => self.mla(m, layer, batch, &y)?,
            };
            self.add(x, a, rows * h)?;
            let y = self.norm(&x, rows, &layer.ffn_norm)?;
            let f = match &layer.ffn {
                GpuFfn::Dense(mlp) => mlp.forward(g, g.ptr(&y), rows)?,
                GpuFfn::Moe(m) => self.moe(l, m, &y, rows)?,
            };
            self.add(x, f, rows * h)?;
        }
        let last_dev = self.layer_dev.last().copied().unwrap_or(0);
        x = self.switch(last_dev, x, rows * h)?;
        let g = self.g();
        let last_idx = g.put(&last_rows)?;
        let m = steps.len();
        let last = g.scratch::<f32>(m * h)?;
        g.launch(
            &g.k.gather_rows,
            m as u32,
            256,
            0,
            &[
                Arg::Ptr(g.ptr(&x)),
                Arg::Ptr(g.ptr(&last_idx)),
                Arg::Ptr(g.ptr(&last)),
                Arg::I32(h as i32),
            ],
        )?;
        let last = self.norm(&last, m, &self.final_norm)?;
        let logits = self.lm_head.forward(g, g.ptr(&last), h, m)?;
        let host = g.get(logits, m * vocab)?;
        for step in steps.iter_mut() {
            step.kv.advance(step.tokens.len());
        }
        Ok(host.chunks_exact(vocab).map(<[f32]>::to_vec).collect())
    }

    fn norm(&self, x: &Dev, rows: usize, w: &CudaSlice<f32>) -> Result<Dev, CudaError> {
        let h = self.model.config.hidden;
        let y = self.g().scratch::<f32>(rows * h)?;
        self.rms(self.g().ptr(x), h, self.g().ptr(&y), h, w, h, rows)?;
        Ok(y)
    }

    #[allow(clippy::too_many_arguments)]
    fn rms(
        &self,
        x: u64,
        in_stride: usize,
        y: u64,
        out_stride: usize,
        w: &CudaSlice<f32>,
        d: usize,
        rows: usize,
    ) -> Result<(), CudaError> {
        let g = self.g();
        g.launch(
            &g.k.rms_norm,
            rows as u32,
            256,
            0,
            &[
                Arg::Ptr(x),
                Arg::I32(in_stride as i32),
                Arg::Ptr(y),
                Arg::I32(out_stride as i32),
                Arg::Ptr(g.ptr(w)),
                Arg::I32(d as i32),
                Arg::F32(self.model.config.rms_eps),
            ],
        )
    }

    fn add(&self, x: Dev, y: Dev, n: usize) -> Result<(), CudaError> {
        let g = self.g();
        g.launch_1d(
            &g.k.add_inplace,
            n,
            &[Arg::Ptr(g.ptr(&x)), Arg::Ptr(g.ptr(&y)), Arg::I64(n as i64)],
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn rope(
        &self,
        x: u64,
        rows: usize,
        heads: usize,
        row_stride: usize,
        head_stride: usize,
        offset: usize,
        b: &DeviceBatch,
    ) -> Result<(), CudaError> {
        let g = self.g();
        g.launch(
            &g.k.rope,
            (rows * heads) as u32,
            64,
            0,
            &[
                Arg::Ptr(x),
                Arg::I32(heads as i32),
                Arg::I32(row_stride as i32),
                Arg::I32(head_stride as i32),
                Arg::I32(offset as i32),
                Arg::Ptr(g.ptr(&b.positions)),
                Arg::Ptr(g.ptr(&self.cos[self.cur.get()])),
                Arg::Ptr(g.ptr(&self.sin[self.cur.get()])),
                Arg::I32(self.rope_pairs as i32),
                Arg::I32(self.interleaved as i32),
            ],
        )
    }

    fn kv_write(
        &self,
        src: u64,
        src_stride: usize,
        src_offset: usize,
        cache: &KvBuf,
        width: usize,
        b: &DeviceBatch,
    ) -> Result<(), CudaError> {
        let g = self.g();
        let f = match cache {
            KvBuf::F32(_) => &g.k.kv_write,
            KvBuf::Bf16(_) => &g.k.kv_write_bf16,
        };
        g.launch(
            f,
            b.rows as u32,
            128,
            0,
            &[
                Arg::Ptr(src),
                Arg::I32(src_stride as i32),
                Arg::I32(src_offset as i32),
                Arg::Ptr(cache.ptr(g)),
                Arg::Ptr(g.ptr(&b.slots)),
                Arg::I32(width as i32),
            ],
        )
    }

    fn gqa(
        &self,
        a: &GpuGqa,
        layer: &GpuLayer,
        b: &DeviceBatch,
        y: &Dev,
    ) -> Result<Dev, CudaError> {
        let g = self.g();
        let (n, hd, nh, nkv) = (b.rows, a.head_dim, a.n_heads, a.n_kv_heads);
        let h = self.model.config.hidden;
        let q = a.q.forward(g, g.ptr(y), h, n)?;
        let k = a.k.forward(g, g.ptr(y), h, n)?;
        let v = a.v.forward(g, g.ptr(y), h, n)?;
        if let Some(w) = &a.q_norm {
            self.rms(g.ptr(&q), hd, g.ptr(&q), hd, w, hd, n * nh)?;
        }
        if let Some(w) = &a.k_norm {
            self.rms(g.ptr(&k), hd, g.ptr(&k), hd, w, hd, n * nkv)?;
        }
        self.rope(g.ptr(&q), n, nh, nh * hd, hd, 0, b)?;
        self.rope(g.ptr(&k), n, nkv, nkv * hd, hd, 0, b)?;
        let kd = nkv * hd;
        self.kv_write(g.ptr(&k), kd, 0, &layer.cache_k, kd, b)?;
        self.kv_write(g.ptr(&v), kd, 0, &layer.cache_v, kd, b)?;
        let out = g.scratch::<f32>(n * nh * hd)?;
        let scale = 1.0 / (hd as f32).sqrt();
        self.attend(
            (g.ptr(&q), nh * hd, hd, hd),
            (0, 0, 0, 0),
            (layer.cache_k.ptr(g), kd, hd),
            (0, 0, 0),
            (layer.cache_v.ptr(g), kd, hd, hd),
            (g.ptr(&out), nh * hd, hd),
            b,
            nh,
            nh / nkv,
            scale,
        )?;
        a.o.forward(g, g.ptr(&out), nh * hd, n)
    }

    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        qa: (u64, usize, usize, usize),
        qb: (u64, usize, usize, usize),
        ka: (u64, usize, usize),
        kb: (u64, usize, usize),
        va: (u64, usize, usize, usize),
        out: (u64, usize, usize),
        b: &DeviceBatch,
        n_heads: usize,
        group: usize,
        scale: f32,
    ) -> Result<(), CudaError> {
        let g = self.g();
        if va.3 > 8 * 128 {
            return Err(CudaError::Kernel(format!("attention value width {} is over 1024", va.3)));
        }
        let shared = ((qa.3 + qb.3 + 256) * 4) as u32;
        let f = match self.opts.kv_dtype {
            KvDtype::F32 => &g.k.attend,
            KvDtype::Bf16 => &g.k.attend_bf16,
        };
        let i = |v: usize| Arg::I32(v as i32);
        g.launch(
            f,
            (b.rows * n_heads) as u32,
            128,
            shared,
            &[
                Arg::Ptr(qa.0),
                i(qa.1),
                i(qa.2),
                i(qa.3),
                Arg::Ptr(qb.0),
                i(qb.1),
                i(qb.2),
                i(qb.3),
                Arg::Ptr(ka.0),
                i(ka.1),
                i(ka.2),
                Arg::Ptr(kb.0),
                i(kb.1),
                i(kb.2),
                Arg::Ptr(va.0),
                i(va.1),
                i(va.2),
                i(va.3),
                Arg::Ptr(out.0),
                i(out.1),
                i(out.2),
                Arg::Ptr(g.ptr(&b.positions)),
                Arg::Ptr(g.ptr(&b.seqs)),
                Arg::Ptr(g.ptr(&b.tables)),
                i(b.table_stride),
                i(self.blocks.block_tokens()),
                i(n_heads),
                i(group),
                Arg::F32(scale),
            ],
        )
    }

    fn mla(
        &self,
        m: &GpuMla,
        layer: &GpuLayer,
        b: &DeviceBatch,
        y: &Dev,
    ) -> Result<Dev, CudaError> {
        let g = self.g();
        let (n, nh, r, nope, rope, vd) = (b.rows, m.n_heads, m.kv_lora, m.nope, m.rope, m.v_dim);
        let h = self.model.config.hidden;
        let qk = nope + rope;
        let q = match &m.q {
            GpuMlaQuery::Direct(w) => w.forward(g, g.ptr(y), h, n)?,
            GpuMlaQuery::LowRank { a, norm, b: bq } => {
                let c = a.forward(g, g.ptr(y), h, n)?;
                self.rms(g.ptr(&c), a.out, g.ptr(&c), a.out, norm, a.out, n)?;
                bq.forward(g, g.ptr(&c), a.out, n)?
            }
        };
        let kv = m.kv_a.forward(g, g.ptr(y), h, n)?;
        let latent = g.scratch::<f32>(n * r)?;
        self.rms(g.ptr(&kv), r + rope, g.ptr(&latent), r, &m.kv_a_norm, r, n)?;
        self.rope(g.ptr(&kv), n, 1, r + rope, 0, r, b)?;
        self.kv_write(g.ptr(&latent), r, 0, &layer.cache_k, r, b)?;
        self.kv_write(g.ptr(&kv), r + rope, r, &layer.cache_v, rope, b)?;
        self.rope(g.ptr(&q), n, nh, nh * qk, qk, nope, b)?;
        // Absorb k_b into the queries: q_lat[t][head] = k_b[head] · q_nope[t][head].
        let q_lat = g.scratch::<f32>(n * nh * r)?;
        g.gemm(
            WeightDtype::F32,
            g.ptr(&m.k_b),
            g.ptr(&q),
            g.ptr(&q_lat),
            (n, r, nope),
            (nh * qk, nh * r),
            (nh, r * nope, qk, r),
        )?;
        let ctx = g.scratch::<f32>(n * nh * r)?;
        let scale = self.model.softmax_scale_mult() / (qk as f32).sqrt();
        self.attend(
            (g.ptr(&q_lat), nh * r, r, r),
            (g.ptr(&q) + (nope * 4) as u64, nh * qk, qk, rope),
            (layer.cache_k.ptr(g), r, 0),
            (layer.cache_v.ptr(g), rope, 0),
            (layer.cache_k.ptr(g), r, 0, r),
            (g.ptr(&ctx), nh * r, r),
            b,
            nh,
            nh,
            scale,
        )?;
        // Each head's value: out[t][head] = v_b[head] · ctx[t][head].
        let out = g.scratch::<f32>(n * nh * vd)?;
        g.gemm(
            WeightDtype::F32,
            g.ptr(&m.v_b),
            g.ptr(&ctx),
            g.ptr(&out),
            (n, vd, r),
            (nh * r, nh * vd),
            (nh, vd * r, r, vd),
        )?;
        m.o.forward(g, g.ptr(&out), nh * vd, n)
    }

    fn moe(&self, l: usize, m: &GpuMoe, y: &Dev, n: usize) -> Result<Dev, CudaError> {
        let g = self.g();
        let Some(cfg) = self.model.routing_config() else {
            return Err(ModelError::Config("MoE layer without an MoE config".into()).into());
        };
        let h = self.model.config.hidden;
        let logits = m.router.forward(g, g.ptr(y), h, n)?;
        let mut host = g.get_many(&[(logits, n * cfg.n_experts), (*y, n * h)])?;
        let (hidden, logits) = (host.pop().unwrap_or_default(), host.pop().unwrap_or_default());
        // The shared experts are queued on the GPU first and run while the CPU tier
        // computes the routed experts.
        let shared = match &m.shared {
            Some(s) => {
                let out = s.forward(g, g.ptr(y), n)?;
                if let Some(gate) = &m.shared_gate {
                    let gv = gate.forward(g, g.ptr(y), h, n)?;
                    g.launch_1d(
                        &g.k.scale_rows_sigmoid,
                        n * h,
                        &[
                            Arg::Ptr(g.ptr(&out)),
                            Arg::Ptr(g.ptr(&gv)),
                            Arg::I32(h as i32),
                            Arg::I64((n * h) as i64),
                        ],
                    )?;
                }
                Some(out)
            }
            None => None,
        };
        let routing = route(cfg, &logits, m.router_bias.as_deref());
        // Tokens routed to hot experts are computed here, queued before the CPU tier's call
        // so that both run at once; the CPU tier sees those slots as NO_EXPERT.
        let hot_out = if m.hot.is_empty() {
            None
        } else {
            let acc = g.scratch::<f32>(n * h)?;
            g.launch_1d(&g.k.fill_zero, n * h, &[Arg::Ptr(g.ptr(&acc)), Arg::I64((n * h) as i64)])?;
            for (e, mlp) in &m.hot {
                let (mut rows, mut ws) = (Vec::new(), Vec::new());
                for t in 0..n {
                    for j in 0..routing.k {
                        if routing.ids[t * routing.k + j] as usize == *e {
                            rows.push(t as i32);
                            ws.push(routing.weights[t * routing.k + j]);
                        }
                    }
                }
                if rows.is_empty() {
                    continue;
                }
                let cnt = rows.len();
                let (rows_d, ws_d) = (g.put(&rows)?, g.put(&ws)?);
                let xe = g.scratch::<f32>(cnt * h)?;
                g.launch(
                    &g.k.gather_rows,
                    cnt as u32,
                    256,
                    0,
                    &[
                        Arg::Ptr(g.ptr(y)),
                        Arg::Ptr(g.ptr(&rows_d)),
                        Arg::Ptr(g.ptr(&xe)),
                        Arg::I32(h as i32),
                    ],
                )?;
                let ye = mlp.forward(g, g.ptr(&xe), cnt)?;
                g.launch(
                    &g.k.scatter_add_weighted,
                    cnt as u32,
                    256,
                    0,
                    &[
                        Arg::Ptr(g.ptr(&acc)),
                        Arg::Ptr(g.ptr(&ye)),
                        Arg::Ptr(g.ptr(&rows_d)),
                        Arg::Ptr(g.ptr(&ws_d)),
                        Arg::I32(h as i32),
                    ],
                )?;
            }
            Some(acc)
        };
        let mut cold = routing;
        if hot_out.is_some() {
            for id in cold.ids.iter_mut() {
                if m.hot.iter().any(|(e, _)| *e as u32 == *id) {
                    *id = NO_EXPERT;
                }
            }
        }
        let out = if cold.ids.iter().all(|&id| id == NO_EXPERT) {
            let z = g.scratch::<f32>(n * h)?;
            g.launch_1d(&g.k.fill_zero, n * h, &[Arg::Ptr(g.ptr(&z)), Arg::I64((n * h) as i64)])?;
            z
        } else {
            let routed = self.model.experts().forward(l, &hidden, &cold)?;
            g.put(&routed)?
        };
        if let Some(acc) = hot_out {
            self.add(out, acc, n * h)?;
        }
        if let Some(s) = shared {
            self.add(out, s, n * h)?;
        }
        Ok(out)
    }
}

/// `y[n × out] = x[n × inp] · W^T` on the GPU with `W[out × inp]` stored as `dtype`: the GEMM
/// path every layer uses, exposed for checks against the CPU and for tools.
pub fn matmul(
    gpu: &Gpu,
    w: &[f32],
    (out, inp): (usize, usize),
    x: &[f32],
    n: usize,
    dtype: WeightDtype,
) -> Result<Vec<f32>, CudaError> {
    if w.len() != out * inp || x.len() != n * inp {
        return Err(ModelError::Shape(format!(
            "matmul: {} weights for [{out} × {inp}], {} inputs for [{n} × {inp}]",
            w.len(),
            x.len()
        ))
        .into());
    }
    let lin = GpuLinear::from_f32(gpu, w, out, inp, None, dtype)?;
    gpu.ctx.bind_to_thread()?;
    gpu.reset_scratch();
    let xd = gpu.put(x)?;
    let y = lin.forward(gpu, gpu.ptr(&xd), inp, n)?;
    gpu.get(y, n * out)
}
