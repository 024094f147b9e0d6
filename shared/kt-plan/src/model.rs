//! A model as placement sees it: the list of its tensors (Hugging Face names, shapes, bytes,
//! kind, layer and expert), built from a `config.json` alone or from a GGUF header. GGUF names
//! are translated to HF names and fused expert tensors are listed per expert, so one plan's
//! regexes serve both.

use std::fmt;
use std::path::{Path, PathBuf};

use kt_formats::GgufModel;
use kt_models::config::AttentionConfig;
use kt_models::{Arch, ModelConfig};

use crate::error::ModelShapeError;

/// What a tensor is, for rules that select by kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Attention,
    /// Dense MLPs and shared experts.
    Mlp,
    /// Routed experts.
    Experts,
    /// Routers (and their bias / the shared-expert gate).
    Gate,
    Norm,
    Embedding,
    LmHead,
}

impl Kind {
    pub fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "attention" => Kind::Attention,
            "mlp" => Kind::Mlp,
            "experts" => Kind::Experts,
            "gate" => Kind::Gate,
            "norm" => Kind::Norm,
            "embedding" => Kind::Embedding,
            "lm_head" => Kind::LmHead,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Attention => "attention",
            Kind::Mlp => "mlp",
            Kind::Experts => "experts",
            Kind::Gate => "gate",
            Kind::Norm => "norm",
            Kind::Embedding => "embedding",
            Kind::LmHead => "lm_head",
        }
    }
}

/// Storage type assumed for a model described by its config alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightDtype {
    F32,
    F16,
    Bf16,
    Q8_0,
    Q6K,
    Q5K,
    Q4K,
    Q4_0,
    Q3K,
    Q2K,
}

impl WeightDtype {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => WeightDtype::F32,
            "f16" | "float16" => WeightDtype::F16,
            "bf16" | "bfloat16" => WeightDtype::Bf16,
            "q8_0" => WeightDtype::Q8_0,
            "q6_k" => WeightDtype::Q6K,
            "q5_k" | "q5_k_m" => WeightDtype::Q5K,
            "q4_k" | "q4_k_m" => WeightDtype::Q4K,
            "q4_0" => WeightDtype::Q4_0,
            "q3_k" | "q3_k_m" => WeightDtype::Q3K,
            "q2_k" => WeightDtype::Q2K,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            WeightDtype::F32 => "f32",
            WeightDtype::F16 => "f16",
            WeightDtype::Bf16 => "bf16",
            WeightDtype::Q8_0 => "q8_0",
            WeightDtype::Q6K => "q6_k",
            WeightDtype::Q5K => "q5_k",
            WeightDtype::Q4K => "q4_k",
            WeightDtype::Q4_0 => "q4_0",
            WeightDtype::Q3K => "q3_k",
            WeightDtype::Q2K => "q2_k",
        }
    }

    /// (weights per block, bytes per block).
    fn block(self) -> (u64, u64) {
        match self {
            WeightDtype::F32 => (1, 4),
            WeightDtype::F16 | WeightDtype::Bf16 => (1, 2),
            WeightDtype::Q8_0 => (32, 34),
            WeightDtype::Q6K => (256, 210),
            WeightDtype::Q5K => (256, 176),
            WeightDtype::Q4K => (256, 144),
            WeightDtype::Q4_0 => (32, 18),
            WeightDtype::Q3K => (256, 110),
            WeightDtype::Q2K => (256, 84),
        }
    }

    /// Bytes of a tensor of this shape; quantized types keep 1-D tensors (norms, biases) in f32
    /// as llama.cpp does.
    pub fn bytes(self, shape: &[usize]) -> u64 {
        let numel: u64 = shape.iter().map(|&d| d as u64).product();
        let (n, b) = if shape.len() < 2 && !matches!(self, WeightDtype::F16 | WeightDtype::Bf16) {
            (1, 4)
        } else {
            self.block()
        };
        numel.div_ceil(n) * b
    }
}

/// One tensor of the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorDesc {
    /// HF name (GGUF names translated; tensors kt cannot translate keep their GGUF name).
    pub name: String,
    pub shape: Vec<usize>,
    pub bytes: u64,
    /// `None` for tensors kt does not recognise (only kind-less rules match them).
    pub kind: Option<Kind>,
    pub layer: Option<usize>,
    /// Set for routed experts.
    pub expert: Option<usize>,
    /// Storage type, for display.
    pub dtype: String,
}

impl TensorDesc {
    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }
}

/// Where the description came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShapeSource {
    /// A `config.json` (or a committed shape description with the same content), weights
    /// assumed stored in the given dtype.
    Config {
        path: PathBuf,
        dtype: WeightDtype,
    },
    Gguf {
        path: PathBuf,
    },
}

impl fmt::Display for ShapeSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ShapeSource::Config { path, dtype } => {
                write!(f, "{} (weights as {})", path.display(), dtype.name())
            }
            ShapeSource::Gguf { path } => write!(f, "{} (GGUF)", path.display()),
        }
    }
}

/// A model's tensors and the hyperparameters placement needs.
#[derive(Clone, Debug)]
pub struct ModelShape {
    pub name: String,
    pub source: ShapeSource,
    pub config: ModelConfig,
    pub tensors: Vec<TensorDesc>,
}

impl ModelShape {
    pub fn arch(&self) -> Arch {
        self.config.arch
    }

    pub fn n_layers(&self) -> usize {
        self.config.n_layers
    }

    pub fn n_experts(&self) -> usize {
        self.config.moe.as_ref().map_or(0, |m| m.n_experts)
    }

    /// Intermediate size of one routed expert.
    pub fn expert_ff(&self) -> usize {
        self.config.moe.as_ref().map_or(0, |m| m.expert_ff)
    }

    pub fn moe_layers(&self) -> Vec<usize> {
        (0..self.config.n_layers).filter(|&l| self.config.is_moe_layer(l)).collect()
    }

    /// Opens an HF folder (its `config.json` is enough), a `config.json` / shape description
    /// file, a GGUF file, or a folder holding one GGUF model. `dtype` applies to configs
    /// (default bf16); a GGUF file has its own types.
    pub fn open(
        path: impl AsRef<Path>,
        dtype: Option<WeightDtype>,
    ) -> Result<ModelShape, ModelShapeError> {
        let path = path.as_ref();
        let unsupported =
            |reason: String| ModelShapeError::Unsupported { path: path.to_path_buf(), reason };
        let meta = std::fs::metadata(path)
            .map_err(|source| ModelShapeError::Io { path: path.to_path_buf(), source })?;
        if meta.is_dir() {
            let cfg = path.join("config.json");
            if cfg.is_file() {
                return ModelShape::from_config_file(&cfg, dtype.unwrap_or(WeightDtype::Bf16));
            }
            let mut ggufs: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|source| ModelShapeError::Io { path: path.to_path_buf(), source })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
                .collect();
            ggufs.sort();
            // A split model opens from its first part; otherwise there must be one file.
            let first_parts: Vec<&PathBuf> = ggufs
                .iter()
                .filter(|p| {
                    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                        kt_formats::gguf::SplitName::parse(n).is_none_or(|s| s.no == 1)
                    })
                })
                .collect();
            return match first_parts.as_slice() {
                [one] => ModelShape::from_gguf(one, dtype),
                [] => Err(unsupported("no config.json and no .gguf file here".into())),
                many => Err(unsupported(format!(
                    "several GGUF models here ({}); name one file",
                    many.iter()
                        .filter_map(|p| p.file_name()?.to_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))),
            };
        }
        if path.extension().is_some_and(|x| x == "gguf") {
            ModelShape::from_gguf(path, dtype)
        } else {
            ModelShape::from_config_file(path, dtype.unwrap_or(WeightDtype::Bf16))
        }
    }

    fn from_config_file(path: &Path, dtype: WeightDtype) -> Result<ModelShape, ModelShapeError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ModelShapeError::Io { path: path.to_path_buf(), source })?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|source| ModelShapeError::Json { path: path.to_path_buf(), source })?;
        let config = ModelConfig::from_hf(&json)
            .map_err(|source| ModelShapeError::Config { path: path.to_path_buf(), source })?;
        let name = json
            .get("_name_or_path")
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .unwrap_or_else(|| model_name_from_path(path));
        let tensors = hf_tensors(&config, dtype);
        Ok(ModelShape {
            name,
            source: ShapeSource::Config { path: path.to_path_buf(), dtype },
            config,
            tensors,
        })
    }

    fn from_gguf(path: &Path, dtype: Option<WeightDtype>) -> Result<ModelShape, ModelShapeError> {
        if dtype.is_some() {
            return Err(ModelShapeError::Unsupported {
                path: path.to_path_buf(),
                reason: "--dtype applies to config.json models; a GGUF file has its own types"
                    .into(),
            });
        }
        let g = GgufModel::open(path)
            .map_err(|source| ModelShapeError::Format { path: path.to_path_buf(), source })?;
        let config = ModelConfig::from_gguf(g.metadata())
            .map_err(|source| ModelShapeError::Config { path: path.to_path_buf(), source })?;
        let name = g
            .metadata()
            .get_str("general.name")
            .map(str::to_string)
            .unwrap_or_else(|| model_name_from_path(path));
        let mut tensors = Vec::new();
        for t in g.tensor_infos() {
            gguf_tensor(&config, &t.name, &t.shape, t.n_bytes as u64, t.ty.name(), &mut tensors);
        }
        Ok(ModelShape {
            name,
            source: ShapeSource::Gguf { path: path.to_path_buf() },
            config,
            tensors,
        })
    }
}

fn model_name_from_path(path: &Path) -> String {
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
    if stem == "config" {
        path.parent()
            .and_then(|p| p.file_name())
            .and_then(|s| s.to_str())
            .unwrap_or(stem)
            .to_string()
    } else {
        stem.to_string()
    }
}

/// Builds the tensor list of an HF checkpoint of this config (transformers' names, per-expert
/// routed experts; DeepSeek-V3's multi-token-prediction layer is not listed).
pub fn hf_tensors(c: &ModelConfig, dtype: WeightDtype) -> Vec<TensorDesc> {
    let mut out = Vec::new();
    let mut push = |name: String,
                    shape: Vec<usize>,
                    kind: Kind,
                    layer: Option<usize>,
                    expert: Option<usize>| {
        let bytes = dtype.bytes(&shape);
        let dt = if shape.len() < 2 && bytes == 4 * shape.iter().product::<usize>() as u64 {
            "f32"
        } else {
            dtype.name()
        };
        out.push(TensorDesc {
            name,
            shape,
            bytes,
            kind: Some(kind),
            layer,
            expert,
            dtype: dt.to_string(),
        });
    };
    let h = c.hidden;
    push("model.embed_tokens.weight".into(), vec![c.vocab_size, h], Kind::Embedding, None, None);
    for l in 0..c.n_layers {
        let p = format!("model.layers.{l}.");
        let lay = Some(l);
        push(format!("{p}input_layernorm.weight"), vec![h], Kind::Norm, lay, None);
        push(format!("{p}post_attention_layernorm.weight"), vec![h], Kind::Norm, lay, None);
        let a = format!("{p}self_attn.");
        match &c.attention {
            AttentionConfig::Gqa { n_heads, n_kv_heads, head_dim, qkv_bias, qk_norm } => {
                let (q, kv) = (n_heads * head_dim, n_kv_heads * head_dim);
                push(format!("{a}q_proj.weight"), vec![q, h], Kind::Attention, lay, None);
                push(format!("{a}k_proj.weight"), vec![kv, h], Kind::Attention, lay, None);
                push(format!("{a}v_proj.weight"), vec![kv, h], Kind::Attention, lay, None);
                push(format!("{a}o_proj.weight"), vec![h, q], Kind::Attention, lay, None);
                if *qkv_bias {
                    push(format!("{a}q_proj.bias"), vec![q], Kind::Attention, lay, None);
                    push(format!("{a}k_proj.bias"), vec![kv], Kind::Attention, lay, None);
                    push(format!("{a}v_proj.bias"), vec![kv], Kind::Attention, lay, None);
                }
                if *qk_norm {
                    push(format!("{a}q_norm.weight"), vec![*head_dim], Kind::Norm, lay, None);
                    push(format!("{a}k_norm.weight"), vec![*head_dim], Kind::Norm, lay, None);
                }
            }
            AttentionConfig::Mla {
                n_heads,
                q_lora_rank,
                kv_lora_rank,
                qk_nope_head_dim,
                qk_rope_head_dim,
                v_head_dim,
            } => {
                let qk = qk_nope_head_dim + qk_rope_head_dim;
                match q_lora_rank {
                    Some(r) => {
                        push(
                            format!("{a}q_a_proj.weight"),
                            vec![*r, h],
                            Kind::Attention,
                            lay,
                            None,
                        );
                        push(format!("{a}q_a_layernorm.weight"), vec![*r], Kind::Norm, lay, None);
                        push(
                            format!("{a}q_b_proj.weight"),
                            vec![n_heads * qk, *r],
                            Kind::Attention,
                            lay,
                            None,
                        );
                    }
                    None => push(
                        format!("{a}q_proj.weight"),
                        vec![n_heads * qk, h],
                        Kind::Attention,
                        lay,
                        None,
                    ),
                }
                push(
                    format!("{a}kv_a_proj_with_mqa.weight"),
                    vec![kv_lora_rank + qk_rope_head_dim, h],
                    Kind::Attention,
                    lay,
                    None,
                );
                push(
                    format!("{a}kv_a_layernorm.weight"),
                    vec![*kv_lora_rank],
                    Kind::Norm,
                    lay,
                    None,
                );
                push(
                    format!("{a}kv_b_proj.weight"),
                    vec![n_heads * (qk_nope_head_dim + v_head_dim), *kv_lora_rank],
                    Kind::Attention,
                    lay,
                    None,
                );
                push(
                    format!("{a}o_proj.weight"),
                    vec![h, n_heads * v_head_dim],
                    Kind::Attention,
                    lay,
                    None,
                );
            }
        }
        let moe = c.moe.as_ref().filter(|_| c.is_moe_layer(l));
        match moe {
            None => {
                let m = format!("{p}mlp.");
                push(format!("{m}gate_proj.weight"), vec![c.ff, h], Kind::Mlp, lay, None);
                push(format!("{m}up_proj.weight"), vec![c.ff, h], Kind::Mlp, lay, None);
                push(format!("{m}down_proj.weight"), vec![h, c.ff], Kind::Mlp, lay, None);
            }
            Some(m) => {
                let (block, [g, u, d]) = match c.arch {
                    Arch::Mixtral => (format!("{p}block_sparse_moe."), ["w1", "w3", "w2"]),
                    _ => (format!("{p}mlp."), ["gate_proj", "up_proj", "down_proj"]),
                };
                push(format!("{block}gate.weight"), vec![m.n_experts, h], Kind::Gate, lay, None);
                if c.arch == Arch::Deepseek3 {
                    push(
                        format!("{block}gate.e_score_correction_bias"),
                        vec![m.n_experts],
                        Kind::Gate,
                        lay,
                        None,
                    );
                }
                for e in 0..m.n_experts {
                    let x = format!("{block}experts.{e}.");
                    push(
                        format!("{x}{g}.weight"),
                        vec![m.expert_ff, h],
                        Kind::Experts,
                        lay,
                        Some(e),
                    );
                    push(
                        format!("{x}{u}.weight"),
                        vec![m.expert_ff, h],
                        Kind::Experts,
                        lay,
                        Some(e),
                    );
                    push(
                        format!("{x}{d}.weight"),
                        vec![h, m.expert_ff],
                        Kind::Experts,
                        lay,
                        Some(e),
                    );
                }
                if m.shared_ff > 0 {
                    let s = match c.arch {
                        Arch::Qwen2Moe => format!("{block}shared_expert."),
                        _ => format!("{block}shared_experts."),
                    };
                    push(
                        format!("{s}gate_proj.weight"),
                        vec![m.shared_ff, h],
                        Kind::Mlp,
                        lay,
                        None,
                    );
                    push(format!("{s}up_proj.weight"), vec![m.shared_ff, h], Kind::Mlp, lay, None);
                    push(
                        format!("{s}down_proj.weight"),
                        vec![h, m.shared_ff],
                        Kind::Mlp,
                        lay,
                        None,
                    );
                }
                if m.shared_gate {
                    push(
                        format!("{block}shared_expert_gate.weight"),
                        vec![1, h],
                        Kind::Gate,
                        lay,
                        None,
                    );
                }
            }
        }
    }
    push("model.norm.weight".into(), vec![h], Kind::Norm, None, None);
    if !c.tie_embeddings {
        push("lm_head.weight".into(), vec![c.vocab_size, h], Kind::LmHead, None, None);
    }
    out
}

/// Translates one GGUF tensor to HF naming (fused expert tensors become one entry per expert).
fn gguf_tensor(
    c: &ModelConfig,
    name: &str,
    shape: &[usize],
    bytes: u64,
    ty: &str,
    out: &mut Vec<TensorDesc>,
) {
    let mut push = |n: String, shape: Vec<usize>, bytes: u64, kind: Option<Kind>, layer, expert| {
        out.push(TensorDesc { name: n, shape, bytes, kind, layer, expert, dtype: ty.to_string() });
    };
    let top = match name {
        "token_embd.weight" => Some(("model.embed_tokens.weight", Kind::Embedding)),
        "output_norm.weight" => Some(("model.norm.weight", Kind::Norm)),
        "output.weight" => Some(("lm_head.weight", Kind::LmHead)),
        _ => None,
    };
    if let Some((n, k)) = top {
        return push(n.to_string(), shape.to_vec(), bytes, Some(k), None, None);
    }
    let parsed = name.strip_prefix("blk.").and_then(|rest| {
        let (l, t) = rest.split_once('.')?;
        Some((l.parse::<usize>().ok()?, t))
    });
    let Some((l, t)) = parsed else {
        return push(name.to_string(), shape.to_vec(), bytes, None, None, None);
    };
    let mixtral = c.arch == Arch::Mixtral;
    let block = if mixtral { "block_sparse_moe" } else { "mlp" };
    let shared = if c.arch == Arch::Qwen2Moe { "shared_expert" } else { "shared_experts" };
    let (stem, suffix) = match t.rsplit_once('.') {
        Some((s, x)) => (s, x),
        None => (t, ""),
    };
    let experts = match stem {
        "ffn_gate_exps" => Some(if mixtral { "w1" } else { "gate_proj" }),
        "ffn_up_exps" => Some(if mixtral { "w3" } else { "up_proj" }),
        "ffn_down_exps" => Some(if mixtral { "w2" } else { "down_proj" }),
        _ => None,
    };
    let p = format!("model.layers.{l}.");
    if let Some(proj) = experts {
        // [experts, out, in]: each expert is an equal, whole-row share of the bytes.
        let n = shape.first().copied().unwrap_or(1).max(1);
        let each = bytes / n as u64;
        for e in 0..n {
            push(
                format!("{p}{block}.experts.{e}.{proj}.{suffix}"),
                shape[1..].to_vec(),
                each,
                Some(Kind::Experts),
                Some(l),
                Some(e),
            );
        }
        return;
    }
    let (hf, kind) = match stem {
        "attn_norm" => ("input_layernorm".to_string(), Kind::Norm),
        "ffn_norm" => ("post_attention_layernorm".to_string(), Kind::Norm),
        "attn_q" => ("self_attn.q_proj".to_string(), Kind::Attention),
        "attn_k" => ("self_attn.k_proj".to_string(), Kind::Attention),
        "attn_v" => ("self_attn.v_proj".to_string(), Kind::Attention),
        "attn_output" => ("self_attn.o_proj".to_string(), Kind::Attention),
        "attn_q_norm" => ("self_attn.q_norm".to_string(), Kind::Norm),
        "attn_k_norm" => ("self_attn.k_norm".to_string(), Kind::Norm),
        "attn_q_a" => ("self_attn.q_a_proj".to_string(), Kind::Attention),
        "attn_q_a_norm" => ("self_attn.q_a_layernorm".to_string(), Kind::Norm),
        "attn_q_b" => ("self_attn.q_b_proj".to_string(), Kind::Attention),
        "attn_kv_a_mqa" => ("self_attn.kv_a_proj_with_mqa".to_string(), Kind::Attention),
        "attn_kv_a_norm" => ("self_attn.kv_a_layernorm".to_string(), Kind::Norm),
        "attn_kv_b" => ("self_attn.kv_b_proj".to_string(), Kind::Attention),
        // llama.cpp splits kv_b_proj into its key and value halves.
        "attn_k_b" => ("self_attn.k_b_proj".to_string(), Kind::Attention),
        "attn_v_b" => ("self_attn.v_b_proj".to_string(), Kind::Attention),
        "ffn_gate" => ("mlp.gate_proj".to_string(), Kind::Mlp),
        "ffn_up" => ("mlp.up_proj".to_string(), Kind::Mlp),
        "ffn_down" => ("mlp.down_proj".to_string(), Kind::Mlp),
        "ffn_gate_inp" => (format!("{block}.gate"), Kind::Gate),
        "exp_probs_b" => (format!("{block}.gate"), Kind::Gate),
        "ffn_gate_shexp" => (format!("{block}.{shared}.gate_proj"), Kind::Mlp),
        "ffn_up_shexp" => (format!("{block}.{shared}.up_proj"), Kind::Mlp),
        "ffn_down_shexp" => (format!("{block}.{shared}.down_proj"), Kind::Mlp),
        "ffn_gate_inp_shexp" => (format!("{block}.shared_expert_gate"), Kind::Gate),
        _ => return push(name.to_string(), shape.to_vec(), bytes, None, Some(l), None),
    };
    let suffix = if stem == "exp_probs_b" { "e_score_correction_bias" } else { suffix };
    push(format!("{p}{hf}.{suffix}"), shape.to_vec(), bytes, Some(kind), Some(l), None);
}
