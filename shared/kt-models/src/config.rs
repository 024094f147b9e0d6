//! Model hyperparameters, read from a Hugging Face `config.json` or from GGUF metadata (with
//! llama.cpp's key names), into one typed [`ModelConfig`] that the CPU backend builds from.

use kt_formats::gguf::Metadata;
use serde_json::Value as Json;

use crate::ModelError;

/// The architectures kt computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
    Mixtral,
    Qwen2Moe,
    Qwen3Moe,
    Deepseek2,
    Deepseek3,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Mixtral => "mixtral",
            Arch::Qwen2Moe => "qwen2moe",
            Arch::Qwen3Moe => "qwen3moe",
            Arch::Deepseek2 => "deepseek2",
            Arch::Deepseek3 => "deepseek3",
        }
    }
}

/// How RoPE pairs the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs (i, i + d/2): HF's `rotate_half`, llama.cpp's NEOX mode.
    Neox,
    /// Pairs (2i, 2i + 1): llama.cpp's normal mode, DeepSeek's interleaved RoPE, and what HF
    /// Llama weights become after llama.cpp's converter permutes q and k.
    Interleaved,
}

/// YaRN context extension (DeepSeek V2/V3).
#[derive(Clone, Debug, PartialEq)]
pub struct Yarn {
    pub factor: f32,
    pub original_max_position: usize,
    pub beta_fast: f32,
    pub beta_slow: f32,
    /// Multiplies cos and sin (transformers' `attention_factor`).
    pub attention_factor: f32,
    /// Extra multiplier of the softmax scale (DeepSeek's `mscale(factor, mscale_all_dim)^2`).
    pub softmax_scale_mult: f32,
}

#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    Yarn(Yarn),
    /// Llama 3.1 frequency smoothing.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position: usize,
    },
    /// Plain position interpolation.
    Linear {
        factor: f32,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct RopeConfig {
    pub theta: f32,
    /// Number of rotated dimensions in each head.
    pub dim: usize,
    pub style: RopeStyle,
    pub scaling: RopeScaling,
}

#[derive(Clone, Debug, PartialEq)]
pub enum AttentionConfig {
    /// Multi-head / grouped-query attention.
    Gqa { n_heads: usize, n_kv_heads: usize, head_dim: usize, qkv_bias: bool, qk_norm: bool },
    /// DeepSeek's multi-head latent attention.
    Mla {
        n_heads: usize,
        q_lora_rank: Option<usize>,
        kv_lora_rank: usize,
        qk_nope_head_dim: usize,
        qk_rope_head_dim: usize,
        v_head_dim: usize,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scoring {
    Softmax,
    Sigmoid,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopkMethod {
    /// Plain top-k over the scores.
    Greedy,
    /// DeepSeek-V2: keep the `topk_group` groups with the highest max score.
    GroupLimitedGreedy,
    /// DeepSeek-V3: scores + correction bias choose; groups ranked by their top-2 sum.
    NoAuxTc,
}

/// When the routed scaling factor multiplies the top-k weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoutedScaling {
    /// DeepSeek-V2 (reference code): only when the weights are not normalized.
    UnlessNormalized,
    /// DeepSeek-V3 and llama.cpp: always.
    Always,
}

#[derive(Clone, Debug, PartialEq)]
pub struct MoeConfig {
    pub n_experts: usize,
    pub top_k: usize,
    pub expert_ff: usize,
    pub scoring: Scoring,
    pub topk_method: TopkMethod,
    pub n_group: usize,
    pub topk_group: usize,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f32,
    pub routed_scaling: RoutedScaling,
    /// Intermediate size of the shared expert MLP (0: none).
    pub shared_ff: usize,
    /// Qwen2-MoE: the shared expert's output is scaled by sigmoid(shared_expert_gate(x)).
    pub shared_gate: bool,
    /// Layers before this one use a dense MLP.
    pub first_dense: usize,
    /// Every `layer_freq`-th layer (from `first_dense`) is MoE.
    pub layer_freq: usize,
    /// Layers that use a dense MLP regardless (Qwen's `mlp_only_layers`).
    pub dense_layers: Vec<usize>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden: usize,
    pub n_layers: usize,
    /// Intermediate size of dense MLPs.
    pub ff: usize,
    pub rms_eps: f32,
    pub max_position: usize,
    pub rope: RopeConfig,
    pub attention: AttentionConfig,
    pub moe: Option<MoeConfig>,
    pub tie_embeddings: bool,
}

impl ModelConfig {
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        match &self.moe {
            None => false,
            Some(m) => {
                layer >= m.first_dense
                    && (layer - m.first_dense).is_multiple_of(m.layer_freq.max(1))
                    && !m.dense_layers.contains(&layer)
            }
        }
    }

    /// Where llama.cpp computes a model differently from its reference implementation, makes
    /// this config compute what llama.cpp does (used with `MatmulMode::Ggml`, whose purpose is
    /// reproducing llama.cpp). Today one difference: llama.cpp ranks DeepSeek-V2's expert groups
    /// by the sum of their top-2 scores, as V3 does, where DeepSeek-V2's reference takes the max.
    pub fn imitate_llama_cpp(&mut self) {
        if let Some(m) = &mut self.moe {
            if m.topk_method == TopkMethod::GroupLimitedGreedy {
                m.topk_method = TopkMethod::NoAuxTc;
            }
        }
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_hf(cfg: &Json) -> Result<Self, ModelError> {
        let h = HfReader(cfg);
        let model_type = h.str("model_type")?;
        let arch = match model_type {
            "llama" | "mistral" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "mixtral" => Arch::Mixtral,
            "qwen2_moe" => Arch::Qwen2Moe,
            "qwen3_moe" => Arch::Qwen3Moe,
            "deepseek_v2" => Arch::Deepseek2,
            "deepseek_v3" => Arch::Deepseek3,
            other => {
                return Err(ModelError::Unsupported(format!(
                    "model_type `{other}` (kt knows llama, mistral, qwen2, mixtral, qwen2_moe, \
                     qwen3_moe, deepseek_v2, deepseek_v3)"
                )))
            }
        };
        let hidden = h.usize("hidden_size")?;
        let n_layers = h.usize("num_hidden_layers")?;
        let n_heads = h.usize("num_attention_heads")?;
        let max_position = h.opt_usize("max_position_embeddings")?.unwrap_or(4096);
        let rope_params = h.rope_parameters();
        let theta = match h.opt_f64("rope_theta")? {
            Some(t) => t,
            None => rope_params
                .and_then(|p| p.get("rope_theta"))
                .and_then(Json::as_f64)
                .unwrap_or(10000.0),
        } as f32;
        let deepseek = matches!(arch, Arch::Deepseek2 | Arch::Deepseek3);

        let attention = if deepseek {
            AttentionConfig::Mla {
                n_heads,
                q_lora_rank: h.opt_usize("q_lora_rank")?.filter(|&r| r > 0),
                kv_lora_rank: h.usize("kv_lora_rank")?,
                qk_nope_head_dim: h.usize("qk_nope_head_dim")?,
                qk_rope_head_dim: h.usize("qk_rope_head_dim")?,
                v_head_dim: h.usize("v_head_dim")?,
            }
        } else {
            let head_dim = h.opt_usize("head_dim")?.unwrap_or(hidden / n_heads.max(1));
            AttentionConfig::Gqa {
                n_heads,
                n_kv_heads: h.opt_usize("num_key_value_heads")?.unwrap_or(n_heads),
                head_dim,
                qkv_bias: match arch {
                    Arch::Qwen2 | Arch::Qwen2Moe => true,
                    _ => h.opt_bool("attention_bias")?.unwrap_or(false),
                },
                qk_norm: arch == Arch::Qwen3Moe,
            }
        };
        let rope_dim = match &attention {
            AttentionConfig::Mla { qk_rope_head_dim, .. } => *qk_rope_head_dim,
            AttentionConfig::Gqa { head_dim, .. } => {
                let partial = h.opt_f64("partial_rotary_factor")?.unwrap_or(1.0);
                (*head_dim as f64 * partial) as usize
            }
        };
        let scaling = h.rope_scaling(theta, rope_dim, max_position)?;
        let rope = RopeConfig {
            theta,
            dim: rope_dim,
            // DeepSeek pairs adjacent dimensions unless a V3 config says `rope_interleave: false`.
            style: if deepseek && h.opt_bool("rope_interleave")?.unwrap_or(true) {
                RopeStyle::Interleaved
            } else {
                RopeStyle::Neox
            },
            scaling,
        };

        let moe = match arch {
            Arch::Llama | Arch::Qwen2 => None,
            Arch::Mixtral => Some(MoeConfig {
                n_experts: h.usize("num_local_experts")?,
                top_k: h.usize("num_experts_per_tok")?,
                expert_ff: h.usize("intermediate_size")?,
                scoring: Scoring::Softmax,
                topk_method: TopkMethod::Greedy,
                n_group: 1,
                topk_group: 1,
                norm_topk_prob: true,
                routed_scaling_factor: 1.0,
                routed_scaling: RoutedScaling::Always,
                shared_ff: 0,
                shared_gate: false,
                first_dense: 0,
                layer_freq: 1,
                dense_layers: Vec::new(),
            }),
            Arch::Qwen2Moe | Arch::Qwen3Moe => {
                // Layer l is MoE when (l + 1) % decoder_sparse_step == 0 and l is not listed
                // in mlp_only_layers.
                let sparse_step = h.opt_usize("decoder_sparse_step")?.unwrap_or(1).max(1);
                let dense_layers = match cfg.get("mlp_only_layers") {
                    None | Some(Json::Null) => Vec::new(),
                    Some(Json::Array(a)) => a
                        .iter()
                        .map(|v| v.as_u64().map(|v| v as usize))
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| {
                            ModelError::Config(
                                "config.json: `mlp_only_layers` is not a list of layer indices"
                                    .into(),
                            )
                        })?,
                    Some(other) => {
                        return Err(ModelError::Config(format!(
                            "config.json: `mlp_only_layers` = {other} is not a list"
                        )))
                    }
                };
                Some(MoeConfig {
                    // transformers 5 writes `num_local_experts`; checkpoints carry `num_experts`.
                    n_experts: h.usize_any(&["num_experts", "num_local_experts"])?,
                    top_k: h.usize("num_experts_per_tok")?,
                    expert_ff: h.usize("moe_intermediate_size")?,
                    scoring: Scoring::Softmax,
                    topk_method: TopkMethod::Greedy,
                    n_group: 1,
                    topk_group: 1,
                    norm_topk_prob: h.opt_bool("norm_topk_prob")?.unwrap_or(arch == Arch::Qwen3Moe),
                    routed_scaling_factor: 1.0,
                    routed_scaling: RoutedScaling::Always,
                    shared_ff: if arch == Arch::Qwen2Moe {
                        h.opt_usize("shared_expert_intermediate_size")?.unwrap_or(0)
                    } else {
                        0
                    },
                    shared_gate: arch == Arch::Qwen2Moe,
                    first_dense: sparse_step - 1,
                    layer_freq: sparse_step,
                    dense_layers,
                })
            }
            Arch::Deepseek2 | Arch::Deepseek3 => {
                let v3 = arch == Arch::Deepseek3;
                let topk_method = match h.opt_str("topk_method")?.unwrap_or(if v3 {
                    "noaux_tc"
                } else {
                    "greedy"
                }) {
                    "greedy" => TopkMethod::Greedy,
                    "group_limited_greedy" => TopkMethod::GroupLimitedGreedy,
                    "noaux_tc" => TopkMethod::NoAuxTc,
                    other => return Err(ModelError::Unsupported(format!("topk_method `{other}`"))),
                };
                let scoring = match h.opt_str("scoring_func")?.unwrap_or(if v3 {
                    "sigmoid"
                } else {
                    "softmax"
                }) {
                    "softmax" => Scoring::Softmax,
                    "sigmoid" => Scoring::Sigmoid,
                    other => {
                        return Err(ModelError::Unsupported(format!("scoring_func `{other}`")))
                    }
                };
                let n_shared = h.opt_usize("n_shared_experts")?.unwrap_or(0);
                let expert_ff = h.usize("moe_intermediate_size")?;
                Some(MoeConfig {
                    n_experts: h.usize_any(&["n_routed_experts", "num_local_experts"])?,
                    top_k: h.usize("num_experts_per_tok")?,
                    expert_ff,
                    scoring,
                    topk_method,
                    n_group: h.opt_usize("n_group")?.unwrap_or(1).max(1),
                    topk_group: h.opt_usize("topk_group")?.unwrap_or(1).max(1),
                    norm_topk_prob: h.opt_bool("norm_topk_prob")?.unwrap_or(false),
                    routed_scaling_factor: h.opt_f64("routed_scaling_factor")?.unwrap_or(1.0)
                        as f32,
                    routed_scaling: if v3 {
                        RoutedScaling::Always
                    } else {
                        RoutedScaling::UnlessNormalized
                    },
                    shared_ff: n_shared * expert_ff,
                    shared_gate: false,
                    first_dense: h.opt_usize("first_k_dense_replace")?.unwrap_or(0),
                    layer_freq: h.opt_usize("moe_layer_freq")?.unwrap_or(1),
                    dense_layers: Vec::new(),
                })
            }
        };

        let cfg = ModelConfig {
            arch,
            vocab_size: h.usize("vocab_size")?,
            hidden,
            n_layers,
            ff: h.usize("intermediate_size")?,
            rms_eps: h.opt_f64("rms_norm_eps")?.unwrap_or(1e-6) as f32,
            max_position,
            rope,
            attention,
            moe,
            tie_embeddings: h.opt_bool("tie_word_embeddings")?.unwrap_or(false),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads GGUF metadata with llama.cpp's key names.
    pub fn from_gguf(md: &Metadata) -> Result<Self, ModelError> {
        let arch_name = md
            .get_str("general.architecture")
            .ok_or_else(|| ModelError::Config("missing general.architecture".into()))?
            .to_string();
        let g = GgufReader { md, arch: &arch_name };
        let expert_count = g.opt_usize("expert_count")?.unwrap_or(0);
        let arch = match arch_name.as_str() {
            "llama" if expert_count > 0 => Arch::Mixtral,
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "qwen2moe" => Arch::Qwen2Moe,
            "qwen3moe" => Arch::Qwen3Moe,
            "deepseek2" => {
                // DeepSeek-V3 is stored as deepseek2 with sigmoid gating.
                if g.opt_usize("expert_gating_func")? == Some(2) {
                    Arch::Deepseek3
                } else {
                    Arch::Deepseek2
                }
            }
            other => {
                return Err(ModelError::Unsupported(format!(
                    "GGUF architecture `{other}` (kt knows llama, qwen2, qwen2moe, qwen3moe, \
                     deepseek2)"
                )))
            }
        };
        let hidden = g.usize("embedding_length")?;
        let n_layers = g.usize("block_count")?;
        let n_heads = g.usize("attention.head_count")?;
        let vocab_size = match g.opt_usize("vocab_size")? {
            Some(v) => v,
            None => md.get_array("tokenizer.ggml.tokens").map(|a| a.len()).ok_or_else(|| {
                ModelError::Config(format!(
                    "missing {arch_name}.vocab_size and tokenizer.ggml.tokens"
                ))
            })?,
        };
        let deepseek = matches!(arch, Arch::Deepseek2 | Arch::Deepseek3);
        let attention = if deepseek {
            let kv_lora_rank = g.usize("attention.kv_lora_rank")?;
            let rope = g.usize("rope.dimension_count")?;
            // Newer converters store the MLA head sizes under *_mla and the absorbed sizes
            // under key_length/value_length.
            let k_len = match g.opt_usize("attention.key_length_mla")? {
                Some(k) => k,
                None => g.usize("attention.key_length")?,
            };
            let v_len = match g.opt_usize("attention.value_length_mla")? {
                Some(v) => v,
                None => g.usize("attention.value_length")?,
            };
            if k_len <= rope {
                return Err(ModelError::Config(format!(
                    "MLA key length {k_len} is not larger than the rope dimension {rope}"
                )));
            }
            AttentionConfig::Mla {
                n_heads,
                q_lora_rank: g.opt_usize("attention.q_lora_rank")?.filter(|&r| r > 0),
                kv_lora_rank,
                qk_nope_head_dim: k_len - rope,
                qk_rope_head_dim: rope,
                v_head_dim: v_len,
            }
        } else {
            let head_dim = match g.opt_usize("attention.key_length")? {
                Some(k) => k,
                None => hidden / n_heads.max(1),
            };
            AttentionConfig::Gqa {
                n_heads,
                n_kv_heads: g.opt_usize("attention.head_count_kv")?.unwrap_or(n_heads),
                head_dim,
                // Biases are optional tensors; the loader looks for them.
                qkv_bias: matches!(arch, Arch::Qwen2 | Arch::Qwen2Moe),
                qk_norm: arch == Arch::Qwen3Moe,
            }
        };
        let rope_dim = match &attention {
            AttentionConfig::Mla { qk_rope_head_dim, .. } => *qk_rope_head_dim,
            AttentionConfig::Gqa { head_dim, .. } => {
                g.opt_usize("rope.dimension_count")?.unwrap_or(*head_dim)
            }
        };
        let theta = g.opt_f64("rope.freq_base")?.unwrap_or(10000.0) as f32;
        let max_position = g.opt_usize("context_length")?.unwrap_or(4096);
        let scaling = match g.opt_str("rope.scaling.type")? {
            None | Some("none") => RopeScaling::None,
            Some("linear") => RopeScaling::Linear { factor: g.f64("rope.scaling.factor")? as f32 },
            Some("yarn") => {
                let factor = g.f64("rope.scaling.factor")? as f32;
                let original = g.usize("rope.scaling.original_context_length")?;
                // llama.cpp's deepseek2 takes the softmax scale multiplier from
                // yarn_log_multiplier (0.1 * mscale_all_dim) and leaves cos/sin unscaled.
                let log_mul = g.opt_f64("rope.scaling.yarn_log_multiplier")?.unwrap_or(0.0) as f32;
                let m = if factor > 1.0 { 1.0 + log_mul * factor.ln() } else { 1.0 };
                RopeScaling::Yarn(Yarn {
                    factor,
                    original_max_position: original,
                    beta_fast: g.opt_f64("rope.scaling.yarn_beta_fast")?.unwrap_or(32.0) as f32,
                    beta_slow: g.opt_f64("rope.scaling.yarn_beta_slow")?.unwrap_or(1.0) as f32,
                    attention_factor: 1.0,
                    softmax_scale_mult: m * m,
                })
            }
            Some(other) => {
                return Err(ModelError::Unsupported(format!("rope scaling type `{other}`")))
            }
        };
        let rope = RopeConfig {
            theta,
            dim: rope_dim,
            style: match arch {
                Arch::Llama | Arch::Mixtral | Arch::Deepseek2 | Arch::Deepseek3 => {
                    RopeStyle::Interleaved
                }
                Arch::Qwen2 | Arch::Qwen2Moe | Arch::Qwen3Moe => RopeStyle::Neox,
            },
            scaling,
        };
        let ff = g.opt_usize("feed_forward_length")?.unwrap_or(0);
        let moe = if expert_count == 0 {
            None
        } else {
            let top_k = g.usize("expert_used_count")?;
            let expert_ff = match g.opt_usize("expert_feed_forward_length")? {
                Some(f) => f,
                None => ff,
            };
            let gating = g.opt_usize("expert_gating_func")?;
            let n_group = g.opt_usize("expert_group_count")?.unwrap_or(1).max(1);
            let topk_group = g.opt_usize("expert_group_used_count")?.unwrap_or(1).max(1);
            let (scoring, topk_method) = match (arch, gating) {
                (Arch::Deepseek3, _) => (Scoring::Sigmoid, TopkMethod::NoAuxTc),
                (Arch::Deepseek2, _) if n_group > 1 => {
                    (Scoring::Softmax, TopkMethod::GroupLimitedGreedy)
                }
                _ => (Scoring::Softmax, TopkMethod::Greedy),
            };
            let shared_count = g.opt_usize("expert_shared_count")?.unwrap_or(0);
            let shared_ff = match arch {
                Arch::Qwen2Moe => g.opt_usize("expert_shared_feed_forward_length")?.unwrap_or(0),
                Arch::Deepseek2 | Arch::Deepseek3 => shared_count * expert_ff,
                _ => 0,
            };
            let norm_default = matches!(arch, Arch::Mixtral | Arch::Qwen3Moe);
            Some(MoeConfig {
                n_experts: expert_count,
                top_k,
                expert_ff,
                scoring,
                topk_method,
                n_group,
                topk_group,
                norm_topk_prob: g.opt_bool("expert_weights_norm")?.unwrap_or(norm_default),
                routed_scaling_factor: match g.opt_f64("expert_weights_scale")? {
                    Some(s) if s != 0.0 => s as f32,
                    _ => 1.0,
                },
                routed_scaling: RoutedScaling::Always,
                shared_ff,
                shared_gate: arch == Arch::Qwen2Moe,
                first_dense: g.opt_usize("leading_dense_block_count")?.unwrap_or(0),
                layer_freq: 1,
                dense_layers: Vec::new(),
            })
        };
        let cfg = ModelConfig {
            arch,
            vocab_size,
            hidden,
            n_layers,
            ff,
            rms_eps: g.opt_f64("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-6) as f32,
            max_position,
            rope,
            attention,
            moe,
            // Decided by the loader: GGUF files without `output.weight` tie the embeddings.
            tie_embeddings: false,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Rejects sizes that cannot describe a model, before any allocation is sized from them.
    fn validate(&self) -> Result<(), ModelError> {
        let bad =
            |what: &str, v: usize| Err(ModelError::Config(format!("{what} = {v} is invalid")));
        const LIMIT: usize = 1 << 24;
        for (what, v) in [
            ("hidden size", self.hidden),
            ("vocab size", self.vocab_size),
            ("layer count", self.n_layers),
        ] {
            if v == 0 || v > LIMIT {
                return bad(what, v);
            }
        }
        match &self.attention {
            AttentionConfig::Gqa { n_heads, n_kv_heads, head_dim, .. } => {
                if *n_heads == 0 || *n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
                    return Err(ModelError::Config(format!(
                        "{n_heads} attention heads cannot be grouped over {n_kv_heads} KV heads"
                    )));
                }
                if *head_dim == 0 || self.rope.dim > *head_dim || !self.rope.dim.is_multiple_of(2) {
                    return Err(ModelError::Config(format!(
                        "rope dimension {} does not fit head dimension {head_dim}",
                        self.rope.dim
                    )));
                }
            }
            AttentionConfig::Mla { n_heads, kv_lora_rank, qk_rope_head_dim, .. } => {
                if *n_heads == 0 || *kv_lora_rank == 0 || !qk_rope_head_dim.is_multiple_of(2) {
                    return Err(ModelError::Config("invalid MLA dimensions".into()));
                }
            }
        }
        if let Some(m) = &self.moe {
            if m.n_experts == 0 || m.top_k == 0 || m.top_k > m.n_experts {
                return Err(ModelError::Config(format!(
                    "top-{} of {} experts is invalid",
                    m.top_k, m.n_experts
                )));
            }
            if !m.n_experts.is_multiple_of(m.n_group) || m.topk_group > m.n_group {
                return Err(ModelError::Config(format!(
                    "{} experts cannot form {} groups of which {} are used",
                    m.n_experts, m.n_group, m.topk_group
                )));
            }
            if m.topk_group * (m.n_experts / m.n_group) < m.top_k {
                return Err(ModelError::Config(format!(
                    "top-{} experts do not fit in {} groups of {}",
                    m.top_k,
                    m.topk_group,
                    m.n_experts / m.n_group
                )));
            }
        }
        Ok(())
    }
}

struct HfReader<'a>(&'a Json);

impl HfReader<'_> {
    fn get(&self, key: &str) -> Option<&Json> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    fn str(&self, key: &str) -> Result<&str, ModelError> {
        self.opt_str(key)?
            .ok_or_else(|| ModelError::Config(format!("config.json: missing `{key}`")))
    }

    fn opt_str(&self, key: &str) -> Result<Option<&str>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| ModelError::Config(format!("config.json: `{key}` is not a string"))),
        }
    }

    fn usize(&self, key: &str) -> Result<usize, ModelError> {
        self.opt_usize(key)?
            .ok_or_else(|| ModelError::Config(format!("config.json: missing `{key}`")))
    }

    /// The first of `keys` present (names that differ between checkpoints and transformers).
    fn usize_any(&self, keys: &[&str]) -> Result<usize, ModelError> {
        for k in keys {
            if let Some(v) = self.opt_usize(k)? {
                return Ok(v);
            }
        }
        Err(ModelError::Config(format!("config.json: missing `{}`", keys.join("` or `"))))
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => {
                v.as_u64().and_then(|v| usize::try_from(v).ok()).map(Some).ok_or_else(|| {
                    ModelError::Config(format!(
                        "config.json: `{key}` = {v} is not a non-negative integer"
                    ))
                })
            }
        }
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                ModelError::Config(format!("config.json: `{key}` = {v} is not a number"))
            }),
        }
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| {
                ModelError::Config(format!("config.json: `{key}` = {v} is not a boolean"))
            }),
        }
    }

    /// transformers 5 writes `rope_parameters`; checkpoints carry `rope_scaling`.
    fn rope_parameters(&self) -> Option<&Json> {
        self.get("rope_parameters")
    }

    fn rope_scaling(
        &self,
        theta: f32,
        rope_dim: usize,
        max_position: usize,
    ) -> Result<RopeScaling, ModelError> {
        let Some(s) = self.get("rope_scaling").or_else(|| self.rope_parameters()) else {
            return Ok(RopeScaling::None);
        };
        let num = |k: &str| s.get(k).and_then(Json::as_f64);
        let kind = s
            .get("rope_type")
            .or_else(|| s.get("type"))
            .and_then(Json::as_str)
            .unwrap_or("default");
        match kind {
            "default" => Ok(RopeScaling::None),
            "linear" => Ok(RopeScaling::Linear { factor: num("factor").unwrap_or(1.0) as f32 }),
            "llama3" => Ok(RopeScaling::Llama3 {
                factor: num("factor").unwrap_or(8.0) as f32,
                low_freq_factor: num("low_freq_factor").unwrap_or(1.0) as f32,
                high_freq_factor: num("high_freq_factor").unwrap_or(4.0) as f32,
                original_max_position: num("original_max_position_embeddings").unwrap_or(8192.0)
                    as usize,
            }),
            "yarn" => {
                let original = num("original_max_position_embeddings");
                // transformers derives a missing factor from the two context lengths.
                let factor = match (num("factor"), original) {
                    (Some(f), _) => f,
                    (None, Some(orig)) if orig > 0.0 => max_position as f64 / orig,
                    (None, _) => 1.0,
                };
                let get_mscale = |scale: f64, m: f64| {
                    if scale <= 1.0 {
                        1.0
                    } else {
                        0.1 * m * scale.ln() + 1.0
                    }
                };
                let mscale = num("mscale");
                let mscale_all_dim = num("mscale_all_dim");
                let attention_factor = match num("attention_factor") {
                    Some(a) => a,
                    None => match (mscale, mscale_all_dim) {
                        (Some(m), Some(ma)) if m != 0.0 && ma != 0.0 => {
                            get_mscale(factor, m) / get_mscale(factor, ma)
                        }
                        _ => get_mscale(factor, 1.0),
                    },
                };
                let softmax_mult = match mscale_all_dim {
                    Some(ma) if ma != 0.0 => get_mscale(factor, ma).powi(2),
                    _ => 1.0,
                };
                let _ = (theta, rope_dim);
                Ok(RopeScaling::Yarn(Yarn {
                    factor: factor as f32,
                    original_max_position: original.map(|o| o as usize).unwrap_or(max_position),
                    beta_fast: num("beta_fast").unwrap_or(32.0) as f32,
                    beta_slow: num("beta_slow").unwrap_or(1.0) as f32,
                    attention_factor: attention_factor as f32,
                    softmax_scale_mult: softmax_mult as f32,
                }))
            }
            other => Err(ModelError::Unsupported(format!("rope scaling `{other}`"))),
        }
    }
}

struct GgufReader<'a> {
    md: &'a Metadata,
    arch: &'a str,
}

impl GgufReader<'_> {
    fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.arch)
    }

    fn missing(&self, k: &str) -> ModelError {
        ModelError::Config(format!("GGUF metadata: missing `{}`", self.key(k)))
    }

    fn wrong(&self, k: &str, want: &str) -> ModelError {
        ModelError::Config(format!("GGUF metadata: `{}` is not {want}", self.key(k)))
    }

    fn opt_usize(&self, k: &str) -> Result<Option<usize>, ModelError> {
        let key = self.key(k);
        match self.md.get(&key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|v| usize::try_from(v).ok())
                .map(Some)
                .ok_or_else(|| self.wrong(k, "a non-negative integer")),
        }
    }

    fn usize(&self, k: &str) -> Result<usize, ModelError> {
        self.opt_usize(k)?.ok_or_else(|| self.missing(k))
    }

    fn opt_f64(&self, k: &str) -> Result<Option<f64>, ModelError> {
        match self.md.get(&self.key(k)) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.wrong(k, "a number")),
        }
    }

    fn f64(&self, k: &str) -> Result<f64, ModelError> {
        self.opt_f64(k)?.ok_or_else(|| self.missing(k))
    }

    fn opt_bool(&self, k: &str) -> Result<Option<bool>, ModelError> {
        match self.md.get(&self.key(k)) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| self.wrong(k, "a boolean")),
        }
    }

    fn opt_str(&self, k: &str) -> Result<Option<&str>, ModelError> {
        match self.md.get(&self.key(k)) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| self.wrong(k, "a string")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deepseek_v3() -> Json {
        json!({
            "model_type": "deepseek_v3", "hidden_size": 256, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 512, "vocab_size": 320,
            "q_lora_rank": 64, "kv_lora_rank": 32, "qk_nope_head_dim": 32,
            "qk_rope_head_dim": 16, "v_head_dim": 32, "n_routed_experts": 8,
            "num_experts_per_tok": 2, "moe_intermediate_size": 64, "n_shared_experts": 1,
            "n_group": 4, "topk_group": 2, "norm_topk_prob": true,
            "routed_scaling_factor": 2.5, "first_k_dense_replace": 1,
            "max_position_embeddings": 256, "rope_theta": 10000.0,
            "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                              "mscale": 1.0, "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1}
        })
    }

    #[test]
    fn reads_deepseek_v3() {
        let c = ModelConfig::from_hf(&deepseek_v3()).unwrap();
        assert_eq!(c.arch, Arch::Deepseek3);
        let m = c.moe.as_ref().unwrap();
        assert_eq!((m.topk_method, m.scoring), (TopkMethod::NoAuxTc, Scoring::Sigmoid));
        assert_eq!(m.shared_ff, 64);
        assert!(!c.is_moe_layer(0) && c.is_moe_layer(1));
        assert_eq!(c.rope.style, RopeStyle::Interleaved);
        let RopeScaling::Yarn(y) = &c.rope.scaling else { panic!("yarn expected") };
        let ms = |m: f32| 0.1 * m * 4f32.ln() + 1.0;
        assert!((y.attention_factor - ms(1.0) / ms(0.707)).abs() < 1e-6);
        assert!((y.softmax_scale_mult - ms(0.707).powi(2)).abs() < 1e-6);
    }

    #[test]
    fn qwen_sparse_step_and_mlp_only_layers() {
        let c = ModelConfig::from_hf(&json!({
            "model_type": "qwen2_moe", "hidden_size": 64, "num_hidden_layers": 4,
            "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 100,
            "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 64, "decoder_sparse_step": 2,
            "mlp_only_layers": [3]
        }))
        .unwrap();
        let moe: Vec<bool> = (0..4).map(|l| c.is_moe_layer(l)).collect();
        assert_eq!(moe, vec![false, true, false, false]);
    }

    #[test]
    fn bad_configs_are_errors_naming_the_field() {
        let mut v = deepseek_v3();
        v["model_type"] = json!("gpt_neox");
        assert!(ModelConfig::from_hf(&v).unwrap_err().to_string().contains("gpt_neox"));
        let mut v = deepseek_v3();
        v["hidden_size"] = json!("big");
        assert!(ModelConfig::from_hf(&v).unwrap_err().to_string().contains("hidden_size"));
        let mut v = deepseek_v3();
        v.as_object_mut().unwrap().remove("kv_lora_rank");
        assert!(ModelConfig::from_hf(&v).unwrap_err().to_string().contains("kv_lora_rank"));
        let mut v = deepseek_v3();
        v["num_experts_per_tok"] = json!(9);
        assert!(ModelConfig::from_hf(&v).is_err());
        let mut v = deepseek_v3();
        v["n_group"] = json!(3);
        assert!(ModelConfig::from_hf(&v).is_err());
        let mut v = deepseek_v3();
        v["hidden_size"] = json!(0);
        assert!(ModelConfig::from_hf(&v).is_err());
    }
}
