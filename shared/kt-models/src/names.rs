//! Tensor names in the two naming schemes kt reads: Hugging Face checkpoints and llama.cpp's
//! GGUF files. The loader asks for a logical tensor; each scheme lists the names it may have.

/// Which naming scheme the weight files use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Hf,
    Gguf,
}

/// A logical tensor of a decoder layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerTensor {
    AttnNorm,
    FfnNorm,
    Q,
    K,
    V,
    O,
    QBias,
    KBias,
    VBias,
    QNorm,
    KNorm,
    QA,
    QANorm,
    QB,
    KvAMqa,
    KvANorm,
    KvB,
    /// GGUF only: the key half of kv_b, transposed per head ([heads, kv_lora, nope]).
    KB,
    /// GGUF only: the value half of kv_b ([heads, v_dim, kv_lora]).
    VB,
    FfnGate,
    FfnUp,
    FfnDown,
    Router,
    RouterBias,
    /// Fused expert tensors ([experts, out, in]).
    ExpsGate,
    ExpsUp,
    ExpsDown,
    /// transformers 5's fused gate and up projections ([experts, 2 * ff, hidden]).
    ExpsGateUp,
    ShexpGate,
    ShexpUp,
    ShexpDown,
    ShexpRouter,
}

/// A logical tensor of one routed expert (HF checkpoints store experts one by one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpertTensor {
    Gate,
    Up,
    Down,
}

impl Scheme {
    pub fn embed(self) -> Vec<String> {
        match self {
            Scheme::Hf => vec!["model.embed_tokens.weight".into()],
            Scheme::Gguf => vec!["token_embd.weight".into()],
        }
    }

    pub fn final_norm(self) -> Vec<String> {
        match self {
            Scheme::Hf => vec!["model.norm.weight".into()],
            Scheme::Gguf => vec!["output_norm.weight".into()],
        }
    }

    pub fn lm_head(self) -> Vec<String> {
        match self {
            Scheme::Hf => vec!["lm_head.weight".into()],
            Scheme::Gguf => vec!["output.weight".into()],
        }
    }

    /// Candidate names of a layer tensor, most common first.
    pub fn layer(self, l: usize, t: LayerTensor) -> Vec<String> {
        use LayerTensor::*;
        match self {
            Scheme::Gguf => {
                let n = match t {
                    AttnNorm => "attn_norm.weight",
                    FfnNorm => "ffn_norm.weight",
                    Q => "attn_q.weight",
                    K => "attn_k.weight",
                    V => "attn_v.weight",
                    O => "attn_output.weight",
                    QBias => "attn_q.bias",
                    KBias => "attn_k.bias",
                    VBias => "attn_v.bias",
                    QNorm => "attn_q_norm.weight",
                    KNorm => "attn_k_norm.weight",
                    QA => "attn_q_a.weight",
                    QANorm => "attn_q_a_norm.weight",
                    QB => "attn_q_b.weight",
                    KvAMqa => "attn_kv_a_mqa.weight",
                    KvANorm => "attn_kv_a_norm.weight",
                    KvB => "attn_kv_b.weight",
                    KB => "attn_k_b.weight",
                    VB => "attn_v_b.weight",
                    FfnGate => "ffn_gate.weight",
                    FfnUp => "ffn_up.weight",
                    FfnDown => "ffn_down.weight",
                    Router => "ffn_gate_inp.weight",
                    RouterBias => "exp_probs_b.bias",
                    ExpsGate => "ffn_gate_exps.weight",
                    ExpsUp => "ffn_up_exps.weight",
                    ExpsDown => "ffn_down_exps.weight",
                    ExpsGateUp => return vec![],
                    ShexpGate => "ffn_gate_shexp.weight",
                    ShexpUp => "ffn_up_shexp.weight",
                    ShexpDown => "ffn_down_shexp.weight",
                    ShexpRouter => "ffn_gate_inp_shexp.weight",
                };
                vec![format!("blk.{l}.{n}")]
            }
            Scheme::Hf => {
                let p = format!("model.layers.{l}");
                let one = |s: &str| vec![format!("{p}.{s}")];
                match t {
                    AttnNorm => one("input_layernorm.weight"),
                    FfnNorm => one("post_attention_layernorm.weight"),
                    Q => one("self_attn.q_proj.weight"),
                    K => one("self_attn.k_proj.weight"),
                    V => one("self_attn.v_proj.weight"),
                    O => one("self_attn.o_proj.weight"),
                    QBias => one("self_attn.q_proj.bias"),
                    KBias => one("self_attn.k_proj.bias"),
                    VBias => one("self_attn.v_proj.bias"),
                    QNorm => one("self_attn.q_norm.weight"),
                    KNorm => one("self_attn.k_norm.weight"),
                    QA => one("self_attn.q_a_proj.weight"),
                    QANorm => one("self_attn.q_a_layernorm.weight"),
                    QB => one("self_attn.q_b_proj.weight"),
                    KvAMqa => one("self_attn.kv_a_proj_with_mqa.weight"),
                    KvANorm => one("self_attn.kv_a_layernorm.weight"),
                    KvB => one("self_attn.kv_b_proj.weight"),
                    KB | VB => vec![],
                    FfnGate => one("mlp.gate_proj.weight"),
                    FfnUp => one("mlp.up_proj.weight"),
                    FfnDown => one("mlp.down_proj.weight"),
                    Router => vec![
                        format!("{p}.mlp.gate.weight"),
                        format!("{p}.block_sparse_moe.gate.weight"),
                    ],
                    RouterBias => one("mlp.gate.e_score_correction_bias"),
                    ExpsGate => vec![],
                    ExpsUp => vec![],
                    ExpsDown => vec![
                        format!("{p}.mlp.experts.down_proj"),
                        format!("{p}.block_sparse_moe.experts.down_proj"),
                    ],
                    ExpsGateUp => vec![
                        format!("{p}.mlp.experts.gate_up_proj"),
                        format!("{p}.block_sparse_moe.experts.gate_up_proj"),
                    ],
                    ShexpGate => vec![
                        format!("{p}.mlp.shared_expert.gate_proj.weight"),
                        format!("{p}.mlp.shared_experts.gate_proj.weight"),
                    ],
                    ShexpUp => vec![
                        format!("{p}.mlp.shared_expert.up_proj.weight"),
                        format!("{p}.mlp.shared_experts.up_proj.weight"),
                    ],
                    ShexpDown => vec![
                        format!("{p}.mlp.shared_expert.down_proj.weight"),
                        format!("{p}.mlp.shared_experts.down_proj.weight"),
                    ],
                    ShexpRouter => one("mlp.shared_expert_gate.weight"),
                }
            }
        }
    }

    /// Candidate names of one routed expert's tensor (HF only; GGUF fuses experts).
    pub fn expert(self, l: usize, e: usize, t: ExpertTensor) -> Vec<String> {
        if self == Scheme::Gguf {
            return vec![];
        }
        let p = format!("model.layers.{l}");
        let (hf, mixtral) = match t {
            ExpertTensor::Gate => ("gate_proj", "w1"),
            ExpertTensor::Up => ("up_proj", "w3"),
            ExpertTensor::Down => ("down_proj", "w2"),
        };
        vec![
            format!("{p}.mlp.experts.{e}.{hf}.weight"),
            format!("{p}.block_sparse_moe.experts.{e}.{mixtral}.weight"),
            format!("{p}.mlp.experts.{e}.{mixtral}.weight"),
        ]
    }
}
