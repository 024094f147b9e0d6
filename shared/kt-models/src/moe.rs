//! Mixture-of-experts: the router (which stays in the layer) and the expert seam.
//!
//! The seam is a function: routed experts receive `(layer, hidden states, top-k ids, top-k
//! weights)` and return the weighted sum of their outputs. [`LocalExperts`] computes it in
//! process; the expert tier's transports (shared memory, gRPC) implement the same trait.

use kt_core::WeightTensor;
use rayon::prelude::*;

use crate::config::{MoeConfig, RoutedScaling, Scoring, TopkMethod};
use crate::linear::Linear;
use crate::ops::{sigmoid, silu, softmax, top_k};
use crate::ModelError;

pub mod bench;
mod fused;
mod int8;
pub use fused::FusedConfig;
pub use int8::PackedMlp;

/// An empty slot of a [`Routing`]: the expert there is computed elsewhere.
pub const NO_EXPERT: u32 = u32::MAX;

/// The top-k choice of experts for a batch of tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct Routing {
    /// Experts per token.
    pub k: usize,
    /// `[n × k]` expert ids; [`NO_EXPERT`] marks a slot another shard computes.
    pub ids: Vec<u32>,
    /// `[n × k]` weights of those experts' outputs.
    pub weights: Vec<f32>,
}

/// Routed experts as a function of (layer, hidden, ids, weights).
pub trait Experts: Send + Sync {
    /// `hidden` holds `n` rows of the model's hidden size; returns `n` rows: for each token the
    /// sum over its `k` experts of `weight * expert(hidden)`.
    fn forward(
        &self,
        layer: usize,
        hidden: &[f32],
        routing: &Routing,
    ) -> Result<Vec<f32>, ModelError>;
}

/// Chooses experts for each token from the router's logits (`[n × n_experts]`), as the
/// reference implementation of each architecture does.
pub fn route(cfg: &MoeConfig, logits: &[f32], bias: Option<&[f32]>) -> Routing {
    let e = cfg.n_experts;
    let k = cfg.top_k;
    let n = logits.len() / e;
    let mut ids = Vec::with_capacity(n * k);
    let mut weights = Vec::with_capacity(n * k);
    for row in logits.chunks_exact(e) {
        let mut scores = row.to_vec();
        match cfg.scoring {
            Scoring::Softmax => softmax(&mut scores),
            Scoring::Sigmoid => scores.iter_mut().for_each(|s| *s = sigmoid(*s)),
        }
        let chosen = match cfg.topk_method {
            TopkMethod::Greedy => top_k(&scores, k),
            TopkMethod::GroupLimitedGreedy => {
                let per = e / cfg.n_group;
                let group_scores: Vec<f32> = scores
                    .chunks_exact(per)
                    .map(|g| g.iter().copied().fold(f32::NEG_INFINITY, f32::max))
                    .collect();
                let masked = mask_groups(&scores, &group_scores, cfg.topk_group, per, 0.0);
                top_k(&masked, k)
            }
            TopkMethod::NoAuxTc => {
                let per = e / cfg.n_group;
                let choice: Vec<f32> = match bias {
                    Some(b) => scores.iter().zip(b).map(|(s, b)| s + b).collect(),
                    None => scores.clone(),
                };
                let group_scores: Vec<f32> = choice
                    .chunks_exact(per)
                    .map(|g| top_k(g, 2.min(per)).iter().map(|&i| g[i]).sum())
                    .collect();
                let masked =
                    mask_groups(&choice, &group_scores, cfg.topk_group, per, f32::NEG_INFINITY);
                top_k(&masked, k)
            }
        };
        let mut w: Vec<f32> = chosen.iter().map(|&i| scores[i]).collect();
        let normalize = cfg.norm_topk_prob;
        if normalize {
            let denom = w.iter().sum::<f32>() + 1e-20;
            w.iter_mut().for_each(|v| *v /= denom);
        }
        if cfg.routed_scaling == RoutedScaling::Always || !normalize {
            w.iter_mut().for_each(|v| *v *= cfg.routed_scaling_factor);
        }
        ids.extend(chosen.iter().map(|&i| i as u32));
        weights.extend(w);
    }
    Routing { k, ids, weights }
}

/// Scores of experts outside the `keep` best groups set to `fill` (DeepSeek-V2's reference
/// fills 0.0, which its softmax scores never go below; V3's fills -inf, since its biased
/// scores can be negative).
fn mask_groups(
    scores: &[f32],
    group_scores: &[f32],
    keep: usize,
    per: usize,
    fill: f32,
) -> Vec<f32> {
    let kept = top_k(group_scores, keep);
    let mut masked = vec![fill; scores.len()];
    for g in kept {
        masked[g * per..(g + 1) * per].copy_from_slice(&scores[g * per..(g + 1) * per]);
    }
    masked
}

/// A SwiGLU MLP: `down(silu(gate(x)) * up(x))`.
#[derive(Clone, Debug)]
pub struct Mlp {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

impl Mlp {
    pub fn forward(&self, x: &[f32], n: usize) -> Vec<f32> {
        let mut g = self.gate.forward(x, n);
        let u = self.up.forward(x, n);
        for (g, u) in g.iter_mut().zip(&u) {
            *g = silu(*g) * u;
        }
        self.down.forward(&g, n)
    }
}

/// How [`LocalExperts`] computes a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpertKernel {
    /// Expert after expert in id order, each `Mlp::forward` (three `Linear::forward`s): the
    /// reference.
    Reference,
    /// The fused schedule of [`FusedConfig`] (`moe/fused.rs`): bit-identical results, one
    /// parallel pass over all active experts per projection. Falls back to the reference for
    /// experts it does not cover (biases, gate/up in different activation formats).
    Fused(FusedConfig),
    /// The experts repacked to `amx_int8` ([`LocalExperts::repack_int8`], `moe/int8.rs`): AMX
    /// for multi-token products, VNNI below that; `path` forces one kernel path. Another
    /// quantization than the GGUF file's, so results differ from the other kernels by its
    /// rounding.
    Int8 { path: Option<kt_quant::packed::Path> },
    /// KTransformers' split: calls of fewer than `int8_from` tokens (decode) on the GGUF
    /// weights with the fused kernel, longer ones (prefill) on the `amx_int8` copies.
    Hybrid { fused: FusedConfig, int8_from: usize },
}

/// Tokens per call from which [`ExpertKernel::Hybrid`] takes the `amx_int8` copies by default
/// (measured with `kt bench experts --int8`; BENCHMARKS.md).
pub const DEFAULT_INT8_FROM: usize = 128;

/// `reference`, `fused`, `amx_int8 (<path>)` (the path of long calls on this CPU, or the
/// forced one), `fused below N tokens, amx_int8 (<path>) from N`.
impl std::fmt::Display for ExpertKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let long = || kt_quant::packed::Path::for_tokens(usize::MAX);
        match *self {
            ExpertKernel::Reference => f.write_str("reference"),
            ExpertKernel::Fused(_) => f.write_str("fused"),
            ExpertKernel::Int8 { path } => write!(f, "amx_int8 ({})", path.unwrap_or_else(long)),
            ExpertKernel::Hybrid { int8_from, .. } => {
                write!(f, "fused below {int8_from} tokens, amx_int8 ({}) from {int8_from}", long())
            }
        }
    }
}

impl Default for ExpertKernel {
    fn default() -> Self {
        ExpertKernel::Fused(FusedConfig::default())
    }
}

/// Routed experts held in this process: per layer, per expert id, the MLP when it is held
/// here (an expert server holds the part of the experts its plan gives it).
#[derive(Default)]
pub struct LocalExperts {
    hidden: usize,
    layers: Vec<Vec<Option<Mlp>>>,
    kernel: ExpertKernel,
    /// The `amx_int8` copies made by [`LocalExperts::repack_int8`] (empty before).
    packed: Vec<Vec<Option<PackedMlp>>>,
}

impl LocalExperts {
    /// Experts computed with the default kernel ([`ExpertKernel::Fused`]).
    pub fn new(hidden: usize, layers: Vec<Vec<Option<Mlp>>>) -> Self {
        Self { hidden, layers, kernel: ExpertKernel::default(), packed: Vec::new() }
    }

    /// Repacks the experts of the layers `which` selects to `amx_int8` (in parallel on the
    /// current rayon pool, so the copies are first touched by its threads: NUMA-local when the
    /// pool is pinned; `progress(done, total)` after each expert) and makes
    /// [`ExpertKernel::Int8`] the kernel (set [`ExpertKernel::Hybrid`] after it to keep the
    /// GGUF weights for decode). The GGUF views stay: memory-mapped file pages, read only by
    /// the kernels that use them.
    pub fn repack_int8(
        &mut self,
        which: impl Fn(usize) -> bool + Sync,
        progress: impl Fn(usize, usize) + Sync,
    ) -> Result<(), ModelError> {
        self.packed = int8::repack_layers(&self.layers, which, progress)?;
        self.kernel = ExpertKernel::Int8 { path: None };
        Ok(())
    }

    /// Bytes of the `amx_int8` copies of `layer`'s experts (0 when not repacked).
    pub fn packed_bytes(&self, layer: usize, expert: usize) -> usize {
        self.packed
            .get(layer)
            .and_then(|es| es.get(expert))
            .and_then(Option::as_ref)
            .map_or(0, PackedMlp::bytes)
    }

    /// The same experts computed with `kernel`.
    pub fn with_kernel(mut self, kernel: ExpertKernel) -> Self {
        self.kernel = kernel;
        self
    }

    pub fn kernel(&self) -> ExpertKernel {
        self.kernel
    }

    /// The hidden size.
    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// Whether [`ExpertKernel::Fused`] computes every expert of `layer` held here (otherwise
    /// calls that route to one it does not cover take the reference path).
    pub fn fused_supports(&self, layer: usize) -> bool {
        self.layers
            .get(layer)
            .is_some_and(|es| es.iter().flatten().all(|m| fused::supports(m, self.hidden)))
    }

    /// [`Experts::forward`] with `kernel` instead of the configured one (benches, tests).
    pub fn forward_with(
        &self,
        kernel: ExpertKernel,
        layer: usize,
        hidden: &[f32],
        routing: &Routing,
    ) -> Result<Vec<f32>, ModelError> {
        let experts = self.check(layer, hidden, routing)?;
        match kernel {
            ExpertKernel::Fused(cfg) => {
                if let Some(out) = fused::forward(&cfg, self.hidden, experts, hidden, routing) {
                    return Ok(out);
                }
            }
            ExpertKernel::Int8 { path } => {
                let packed = self.packed.get(layer).map_or(&[][..], |p| &p[..]);
                return int8::forward(self.hidden, packed, hidden, routing, path).ok_or_else(
                    || {
                        ModelError::Input(format!(
                        "layer {layer}: a routed expert has no amx_int8 copy (not repacked) or \
                         inconsistent shapes"
                    ))
                    },
                );
            }
            ExpertKernel::Hybrid { fused, int8_from } => {
                let n = hidden.len() / self.hidden.max(1);
                let kernel = if n >= int8_from && !self.packed.is_empty() {
                    ExpertKernel::Int8 { path: None }
                } else {
                    ExpertKernel::Fused(fused)
                };
                return self.forward_with(kernel, layer, hidden, routing);
            }
            ExpertKernel::Reference => {}
        }
        Ok(self.reference(experts, hidden, routing))
    }

    /// The layer's experts, after checking the call's shapes and that every routed expert is
    /// held here.
    fn check(
        &self,
        layer: usize,
        hidden: &[f32],
        routing: &Routing,
    ) -> Result<&[Option<Mlp>], ModelError> {
        let h = self.hidden;
        let n = hidden.len() / h.max(1);
        if h == 0 || hidden.len() != n * h {
            return Err(ModelError::Input(format!(
                "{} hidden values are not rows of {h}",
                hidden.len()
            )));
        }
        let experts = self.layers.get(layer).filter(|es| !es.is_empty()).ok_or_else(|| {
            ModelError::Input(format!("layer {layer} has no routed experts here"))
        })?;
        if routing.ids.len() != n * routing.k || routing.weights.len() != n * routing.k {
            return Err(ModelError::Input(format!(
                "routing for {n} tokens of top-{} has {} ids and {} weights",
                routing.k,
                routing.ids.len(),
                routing.weights.len()
            )));
        }
        for (i, &id) in routing.ids.iter().enumerate() {
            if id != NO_EXPERT && experts.get(id as usize).is_none_or(Option::is_none) {
                return Err(ModelError::Input(format!(
                    "token {} routed to expert {id} of layer {layer}, which is not held here",
                    i / routing.k
                )));
            }
        }
        Ok(experts)
    }

    /// The reference: experts in id order, each over the tokens routed to it.
    fn reference(&self, experts: &[Option<Mlp>], hidden: &[f32], routing: &Routing) -> Vec<f32> {
        let h = self.hidden;
        let n = hidden.len() / h;
        let mut out = vec![0f32; n * h];
        for (e, mlp) in experts.iter().enumerate() {
            let Some(mlp) = mlp else { continue };
            let mut tokens = Vec::new();
            let mut ws = Vec::new();
            for t in 0..n {
                for j in 0..routing.k {
                    if routing.ids[t * routing.k + j] as usize == e {
                        tokens.push(t);
                        ws.push(routing.weights[t * routing.k + j]);
                    }
                }
            }
            if tokens.is_empty() {
                continue;
            }
            let x: Vec<f32> =
                tokens.iter().flat_map(|&t| &hidden[t * h..(t + 1) * h]).copied().collect();
            let y = mlp.forward(&x, tokens.len());
            for (i, (&t, w)) in tokens.iter().zip(&ws).enumerate() {
                for (o, v) in out[t * h..(t + 1) * h].iter_mut().zip(&y[i * h..(i + 1) * h]) {
                    *o += v * w;
                }
            }
        }
        out
    }

    /// The `(layer, expert)` pairs held here.
    pub fn held(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.layers.iter().enumerate().flat_map(|(l, es)| {
            es.iter().enumerate().filter(|(_, m)| m.is_some()).map(move |(e, _)| (l, e))
        })
    }

    /// Expert `expert` of `layer`, when it is held here.
    pub fn expert(&self, layer: usize, expert: usize) -> Option<&Mlp> {
        self.layers.get(layer).and_then(|es| es.get(expert)).and_then(Option::as_ref)
    }

    /// Expert `e` of a fused `[experts, out, in]` tensor as a 2-D view (no copy).
    pub fn slice_expert(
        t: &WeightTensor,
        e: usize,
        rows: std::ops::Range<usize>,
    ) -> Result<WeightTensor, ModelError> {
        let (n_exp, out, inp) = match t.shape[..] {
            [a, b, c] => (a, b, c),
            _ => {
                return Err(ModelError::Shape(format!(
                    "`{}` has shape {:?}, [experts, out, in] was expected",
                    t.name, t.shape
                )))
            }
        };
        if e >= n_exp || rows.end > out {
            return Err(ModelError::Shape(format!("`{}`: no expert {e} rows {rows:?}", t.name)));
        }
        let rb = t.row_bytes();
        let start = (e * out + rows.start) * rb;
        let data = t.data.slice(start..start + rows.len() * rb).ok_or_else(|| {
            ModelError::Shape(format!("`{}`: expert {e} is out of bounds", t.name))
        })?;
        WeightTensor::new(format!("{}[{e}]", t.name), t.ty, vec![rows.len(), inp], data)
            .map_err(|err| ModelError::Shape(err.to_string()))
    }
}

impl Experts for LocalExperts {
    fn forward(
        &self,
        layer: usize,
        hidden: &[f32],
        routing: &Routing,
    ) -> Result<Vec<f32>, ModelError> {
        self.forward_with(self.kernel, layer, hidden, routing)
    }
}

/// Routed experts spread over several holders (expert servers, NUMA nodes): each call is
/// split by owner, every shard computes its part, and the partial sums are added.
pub struct ShardedExperts {
    hidden: usize,
    shards: Vec<Shard>,
}

struct Shard {
    experts: std::sync::Arc<dyn Experts>,
    /// `owns[layer][expert]`.
    owns: Vec<Vec<bool>>,
}

impl ShardedExperts {
    pub fn new(hidden: usize) -> Self {
        Self { hidden, shards: Vec::new() }
    }

    /// Adds a holder of the experts for which `owns[layer][expert]` is true.
    pub fn add(mut self, experts: std::sync::Arc<dyn Experts>, owns: Vec<Vec<bool>>) -> Self {
        self.shards.push(Shard { experts, owns });
        self
    }
}

impl Experts for ShardedExperts {
    fn forward(
        &self,
        layer: usize,
        hidden: &[f32],
        routing: &Routing,
    ) -> Result<Vec<f32>, ModelError> {
        let owner = |id: u32| {
            self.shards.iter().position(|s| {
                s.owns.get(layer).and_then(|l| l.get(id as usize)).copied().unwrap_or(false)
            })
        };
        if let Some(&id) = routing.ids.iter().find(|&&id| id != NO_EXPERT && owner(id).is_none()) {
            return Err(ModelError::Input(format!("no shard holds expert {id} of layer {layer}")));
        }
        // Every shard works at the same time (remote ones wait on the network); the partial
        // sums are added in shard order, so the result does not depend on who answers first.
        let parts = self
            .shards
            .par_iter()
            .enumerate()
            .map(|(i, shard)| {
                let ids: Vec<u32> = routing
                    .ids
                    .iter()
                    .map(|&id| if id != NO_EXPERT && owner(id) == Some(i) { id } else { NO_EXPERT })
                    .collect();
                if ids.iter().all(|&id| id == NO_EXPERT) {
                    return Ok(None);
                }
                let sub = Routing { k: routing.k, ids, weights: routing.weights.clone() };
                shard.experts.forward(layer, hidden, &sub).map(Some)
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        let mut out = vec![0f32; hidden.len()];
        for (i, part) in parts.into_iter().enumerate() {
            let Some(part) = part else { continue };
            if part.len() != out.len() {
                return Err(ModelError::Input(format!(
                    "shard {i} answered {} values for {} (hidden {})",
                    part.len(),
                    out.len(),
                    self.hidden
                )));
            }
            for (o, p) in out.iter_mut().zip(&part) {
                *o += p;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(method: TopkMethod, scoring: Scoring) -> MoeConfig {
        MoeConfig {
            n_experts: 8,
            top_k: 2,
            expert_ff: 4,
            scoring,
            topk_method: method,
            n_group: 4,
            topk_group: 2,
            norm_topk_prob: false,
            routed_scaling_factor: 1.0,
            routed_scaling: RoutedScaling::Always,
            shared_ff: 0,
            shared_gate: false,
            first_dense: 0,
            layer_freq: 1,
            dense_layers: Vec::new(),
        }
    }

    #[test]
    fn greedy_takes_the_best_scores() {
        let logits = [0.0, 5.0, 1.0, 0.0, 4.0, 0.0, 0.0, 0.0];
        let r = route(&cfg(TopkMethod::Greedy, Scoring::Softmax), &logits, None);
        assert_eq!(r.ids, vec![1, 4]);
        let mut s = logits.to_vec();
        softmax(&mut s);
        assert_eq!(r.weights, vec![s[1], s[4]]);
    }

    #[test]
    fn group_limited_keeps_groups_by_max() {
        // groups {0,1} {2,3} {4,5} {6,7}; maxima 5, 4.5, 4.8, 1 → keep groups 0 and 2.
        let logits = [5.0, 0.0, 4.5, 4.4, 4.8, 0.0, 1.0, 0.0];
        let r = route(&cfg(TopkMethod::GroupLimitedGreedy, Scoring::Softmax), &logits, None);
        assert_eq!(r.ids, vec![0, 4]);
    }

    #[test]
    fn noaux_tc_ranks_groups_by_top2_sum_with_bias_but_weights_without() {
        let logits = [2.0, -2.0, 1.0, 1.0, 0.0, 0.0, -1.0, -1.0];
        let bias = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0];
        let mut c = cfg(TopkMethod::NoAuxTc, Scoring::Sigmoid);
        c.norm_topk_prob = true;
        c.routed_scaling_factor = 2.5;
        let r = route(&c, &logits, Some(&bias));
        // group sums: 1.0+0.12, 0.73*2, 0.5*2, 0.27+5.27 → groups 3 and 1.
        assert_eq!(r.ids, vec![7, 2]);
        let (a, b) = (sigmoid(-1.0), sigmoid(1.0));
        assert!((r.weights[0] - 2.5 * a / (a + b)).abs() < 1e-6);
    }

    #[test]
    fn v2_scaling_applies_only_without_normalization() {
        let mut c = cfg(TopkMethod::Greedy, Scoring::Softmax);
        c.routed_scaling = RoutedScaling::UnlessNormalized;
        c.routed_scaling_factor = 2.0;
        let logits = [1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        let scaled = route(&c, &logits, None);
        c.norm_topk_prob = true;
        let normed = route(&c, &logits, None);
        assert!((normed.weights.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        let mut s = logits.to_vec();
        softmax(&mut s);
        assert!((scaled.weights[0] - 2.0 * s[1]).abs() < 1e-6);
    }
}
