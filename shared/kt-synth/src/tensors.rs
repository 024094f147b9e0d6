//! The tensors of a synthetic model: llama.cpp's names and layouts, and the block format each
//! one gets under a quantization recipe.

use kt_core::GgmlType;

use crate::preset::{Shape, SynthArch};

/// How the weights are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quant {
    /// llama.cpp's Q4_K_M mix.
    Q4KM,
    /// Every matrix Q8_0.
    Q8_0,
    /// Every matrix BF16.
    Bf16,
}

impl Quant {
    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Quant::Q4KM => "q4_k_m",
            Quant::Q8_0 => "q8_0",
            Quant::Bf16 => "bf16",
        }
    }

    /// `general.file_type` (llama.cpp's `llama_ftype`).
    pub fn file_type(self) -> u32 {
        match self {
            Quant::Q4KM => 15,
            Quant::Q8_0 => 7,
            Quant::Bf16 => 32,
        }
    }
}

/// What a tensor's values look like.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// Weights of standard deviation `1 / sqrt(fan_in)` (the row length).
    Matrix,
    /// Norm weights close to 1.
    Norm,
    /// Small values around 0 (the router's correction bias).
    Bias,
}

/// One tensor of the file.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorPlan {
    pub name: String,
    pub ty: GgmlType,
    /// Row-major (the reverse of ggml's `ne`).
    pub shape: Vec<usize>,
    pub init: Init,
}

impl TensorPlan {
    /// Elements in a row (ggml's `ne0`).
    pub fn row_len(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }

    pub fn n_bytes(&self) -> usize {
        let rows: usize = self.shape[..self.shape.len().saturating_sub(1)].iter().product();
        rows * self.ty.row_bytes(self.row_len()).unwrap_or(0)
    }
}

/// Which of llama.cpp's Q4_K_M rules applies to a matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Embed,
    Output,
    AttnK,
    AttnV,
    AttnOutput,
    FfnDown,
    Other,
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers and every third
/// between get more bits.
fn use_more_bits(layer: usize, n_layers: usize) -> bool {
    let eighth = n_layers / 8;
    match layer.checked_sub(eighth) {
        None => true,
        Some(k) => layer >= 7 * n_layers / 8 || k % 3 == 2,
    }
}

/// The format of a matrix of rows of `row_len`, as llama.cpp's quantizer chooses it
/// (`llama_tensor_get_type`), including its fallbacks for rows that are not whole K-blocks.
fn matrix_type(quant: Quant, role: Role, layer: usize, shape: &Shape, row_len: usize) -> GgmlType {
    let want = match quant {
        Quant::Q8_0 => return GgmlType::Q8_0,
        Quant::Bf16 => return GgmlType::BF16,
        Quant::Q4KM => match role {
            Role::Embed | Role::Other => GgmlType::Q4_K,
            Role::Output => GgmlType::Q6_K,
            Role::AttnK if shape.n_experts == 8 => GgmlType::Q8_0,
            Role::AttnK => GgmlType::Q4_K,
            Role::AttnV if shape.n_experts == 8 => GgmlType::Q8_0,
            Role::AttnV | Role::FfnDown if use_more_bits(layer, shape.n_layers) => GgmlType::Q6_K,
            Role::AttnV | Role::FfnDown => GgmlType::Q4_K,
            Role::AttnOutput if shape.n_experts >= 8 => GgmlType::Q5_K,
            Role::AttnOutput => GgmlType::Q4_K,
        },
    };
    if row_len.is_multiple_of(want.block_size()) {
        return want;
    }
    match want {
        GgmlType::Q4_K => GgmlType::Q5_0,
        GgmlType::Q5_K => GgmlType::Q5_1,
        _ => GgmlType::Q8_0,
    }
}

/// Every tensor of the model `shape` describes, in file order.
pub fn plan(shape: &Shape, quant: Quant) -> Vec<TensorPlan> {
    let h = shape.hidden;
    let mut out = Vec::new();
    let mut matrix = |name: String, role: Role, layer: usize, dims: Vec<usize>| {
        let row_len = dims.last().copied().unwrap_or(1);
        let ty = matrix_type(quant, role, layer, shape, row_len);
        out.push(TensorPlan { name, ty, shape: dims, init: Init::Matrix });
    };
    matrix("token_embd.weight".into(), Role::Embed, 0, vec![shape.vocab, h]);
    let mut small = Vec::new();
    for l in 0..shape.n_layers {
        let p = |n: &str| format!("blk.{l}.{n}");
        small.push((p("attn_norm.weight"), vec![h], Init::Norm));
        match &shape.mla {
            Some(m) => {
                let qk = m.qk_nope + m.qk_rope;
                match m.q_lora_rank {
                    Some(r) => {
                        matrix(p("attn_q_a.weight"), Role::Other, l, vec![r, h]);
                        small.push((p("attn_q_a_norm.weight"), vec![r], Init::Norm));
                        matrix(p("attn_q_b.weight"), Role::Other, l, vec![shape.n_heads * qk, r]);
                    }
                    None => matrix(p("attn_q.weight"), Role::Other, l, vec![shape.n_heads * qk, h]),
                }
                let kv = m.kv_lora_rank;
                matrix(p("attn_kv_a_mqa.weight"), Role::Other, l, vec![kv + m.qk_rope, h]);
                small.push((p("attn_kv_a_norm.weight"), vec![kv], Init::Norm));
                matrix(p("attn_k_b.weight"), Role::Other, l, vec![shape.n_heads, kv, m.qk_nope]);
                matrix(p("attn_v_b.weight"), Role::Other, l, vec![shape.n_heads, m.v_head_dim, kv]);
                let o_in = shape.n_heads * m.v_head_dim;
                matrix(p("attn_output.weight"), Role::AttnOutput, l, vec![h, o_in]);
            }
            None => {
                let (q, kv) = (shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim);
                matrix(p("attn_q.weight"), Role::Other, l, vec![q, h]);
                matrix(p("attn_k.weight"), Role::AttnK, l, vec![kv, h]);
                matrix(p("attn_v.weight"), Role::AttnV, l, vec![kv, h]);
                if shape.arch == SynthArch::Qwen3Moe {
                    small.push((p("attn_q_norm.weight"), vec![shape.head_dim], Init::Norm));
                    small.push((p("attn_k_norm.weight"), vec![shape.head_dim], Init::Norm));
                }
                matrix(p("attn_output.weight"), Role::AttnOutput, l, vec![h, q]);
            }
        }
        small.push((p("ffn_norm.weight"), vec![h], Init::Norm));
        if shape.is_moe_layer(l) {
            let (e, f) = (shape.n_experts, shape.expert_ff);
            small.push((p("ffn_gate_inp.weight"), vec![e, h], Init::Matrix));
            if shape.sigmoid {
                small.push((p("exp_probs_b.bias"), vec![e], Init::Bias));
            }
            matrix(p("ffn_gate_exps.weight"), Role::Other, l, vec![e, f, h]);
            matrix(p("ffn_up_exps.weight"), Role::Other, l, vec![e, f, h]);
            matrix(p("ffn_down_exps.weight"), Role::FfnDown, l, vec![e, h, f]);
            if shape.n_shared > 0 {
                let sf = shape.n_shared * f;
                matrix(p("ffn_gate_shexp.weight"), Role::Other, l, vec![sf, h]);
                matrix(p("ffn_up_shexp.weight"), Role::Other, l, vec![sf, h]);
                matrix(p("ffn_down_shexp.weight"), Role::FfnDown, l, vec![h, sf]);
            }
        } else {
            matrix(p("ffn_gate.weight"), Role::Other, l, vec![shape.ff, h]);
            matrix(p("ffn_up.weight"), Role::Other, l, vec![shape.ff, h]);
            matrix(p("ffn_down.weight"), Role::FfnDown, l, vec![h, shape.ff]);
        }
    }
    matrix("output.weight".into(), Role::Output, 0, vec![shape.vocab, h]);
    // Norms, routers and biases stay F32, as llama.cpp keeps them.
    small.push(("output_norm.weight".into(), vec![h], Init::Norm));
    out.extend(small.into_iter().map(|(name, shape, init)| TensorPlan {
        name,
        ty: GgmlType::F32,
        shape,
        init,
    }));
    out.sort_by_key(|t| order_key(&t.name));
    out
}

/// Globals first, then the layers in order (a stable sort keeps the order within a layer).
fn order_key(name: &str) -> (usize, usize) {
    match name.strip_prefix("blk.").and_then(|r| r.split('.').next()).and_then(|l| l.parse().ok()) {
        Some(l) => (1, l),
        None if name.starts_with("token_embd") => (0, 0),
        None => (2, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preset::Preset;

    fn find<'a>(p: &'a [TensorPlan], name: &str) -> &'a TensorPlan {
        p.iter().find(|t| t.name == name).unwrap_or_else(|| panic!("no {name}"))
    }

    #[test]
    fn v2_lite_q4_k_m_mix_follows_llama_cpp() {
        let s = Preset::V2Lite.shape();
        let p = plan(&s, Quant::Q4KM);
        assert_eq!(find(&p, "token_embd.weight").ty, GgmlType::Q4_K);
        assert_eq!(find(&p, "output.weight").ty, GgmlType::Q6_K);
        // 10944 is not a multiple of 256 either.
        assert_eq!(find(&p, "blk.0.ffn_down.weight").ty, GgmlType::Q8_0);
        assert_eq!(find(&p, "blk.0.ffn_up.weight").ty, GgmlType::Q4_K);
        // 1408 is not a multiple of 256: Q4_K falls back to Q5_0, Q6_K to Q8_0.
        assert_eq!(find(&p, "blk.1.ffn_down_exps.weight").ty, GgmlType::Q8_0);
        assert_eq!(find(&p, "blk.4.ffn_down_exps.weight").ty, GgmlType::Q5_0);
        assert_eq!(find(&p, "blk.4.ffn_gate_exps.weight").shape, vec![64, 1408, 2048]);
        assert_eq!(find(&p, "blk.4.attn_k_b.weight").shape, vec![16, 512, 128]);
        assert_eq!(find(&p, "blk.4.attn_k_b.weight").ty, GgmlType::Q5_0);
        assert_eq!(find(&p, "blk.4.attn_v_b.weight").shape, vec![16, 128, 512]);
        assert_eq!(find(&p, "blk.4.attn_output.weight").ty, GgmlType::Q5_K);
        assert_eq!(find(&p, "blk.4.ffn_gate_inp.weight").ty, GgmlType::F32);
        assert!(p.iter().all(|t| !t.name.contains("exp_probs_b")));
        assert_eq!(p.first().map(|t| t.name.as_str()), Some("token_embd.weight"));
        let n_bytes: usize = p.iter().map(TensorPlan::n_bytes).sum();
        assert!((8_500_000_000..10_500_000_000).contains(&n_bytes), "{n_bytes}");
    }

    #[test]
    fn v3_has_q_lora_and_bias_and_mixtral_bumps_k_and_v() {
        let p = plan(&Preset::V3.shape(), Quant::Q8_0);
        assert_eq!(find(&p, "blk.3.exp_probs_b.bias").shape, vec![256]);
        assert_eq!(find(&p, "blk.0.attn_q_b.weight").shape, vec![128 * 192, 1536]);
        assert!(p.iter().all(|t| t.name != "blk.3.ffn_gate.weight"));
        assert!(p.iter().any(|t| t.name == "blk.2.ffn_gate.weight"));
        let p = plan(&Preset::Mixtral8x7b.shape(), Quant::Q4KM);
        assert_eq!(find(&p, "blk.5.attn_k.weight").ty, GgmlType::Q8_0);
        assert_eq!(find(&p, "blk.5.attn_v.weight").ty, GgmlType::Q8_0);
        assert_eq!(find(&p, "blk.5.ffn_up_exps.weight").shape, vec![8, 14336, 4096]);
        let p = plan(&Preset::Qwen3_30bA3b.shape(), Quant::Bf16);
        assert_eq!(find(&p, "blk.0.attn_k.weight").shape, vec![512, 2048]);
        assert_eq!(find(&p, "blk.0.attn_k.weight").ty, GgmlType::BF16);
        assert_eq!(find(&p, "blk.0.attn_q_norm.weight").shape, vec![128]);
    }
}
