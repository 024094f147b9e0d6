//! The shapes of the models `kt synth` imitates, as their public `config.json` files give them.

/// The architectures a synthetic model can have (llama.cpp's names in brackets).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SynthArch {
    /// DeepSeek-V2 (`deepseek2`).
    Deepseek2,
    /// DeepSeek-V3 (`deepseek2` with sigmoid gating and a correction bias).
    Deepseek3,
    /// Qwen3-MoE (`qwen3moe`).
    Qwen3Moe,
    /// Mixtral (`llama` with experts).
    Mixtral,
}

impl SynthArch {
    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            SynthArch::Deepseek2 => "deepseek2",
            SynthArch::Deepseek3 => "deepseek3",
            SynthArch::Qwen3Moe => "qwen3moe",
            SynthArch::Mixtral => "mixtral",
        }
    }

    /// `general.architecture` as llama.cpp writes it.
    pub fn gguf_arch(self) -> &'static str {
        match self {
            SynthArch::Deepseek2 | SynthArch::Deepseek3 => "deepseek2",
            SynthArch::Qwen3Moe => "qwen3moe",
            SynthArch::Mixtral => "llama",
        }
    }
}

/// A model whose shape `kt synth` copies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// deepseek-ai/DeepSeek-V2-Lite.
    V2Lite,
    /// deepseek-ai/DeepSeek-V3.
    V3,
    /// Qwen/Qwen3-30B-A3B.
    Qwen3_30bA3b,
    /// mistralai/Mixtral-8x7B-v0.1.
    Mixtral8x7b,
}

impl Preset {
    pub const ALL: [Preset; 4] =
        [Preset::V2Lite, Preset::V3, Preset::Qwen3_30bA3b, Preset::Mixtral8x7b];

    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Preset::V2Lite => "v2-lite",
            Preset::V3 => "v3",
            Preset::Qwen3_30bA3b => "qwen3-30b-a3b",
            Preset::Mixtral8x7b => "mixtral-8x7b",
        }
    }

    /// The full shape.
    pub fn shape(self) -> Shape {
        match self {
            Preset::V2Lite => Shape {
                arch: SynthArch::Deepseek2,
                model_name: "DeepSeek-V2-Lite",
                vocab: 102_400,
                hidden: 2048,
                n_layers: 27,
                ff: 10_944,
                n_heads: 16,
                n_kv_heads: 16,
                head_dim: 128,
                mla: Some(Mla {
                    q_lora_rank: None,
                    kv_lora_rank: 512,
                    qk_nope: 128,
                    qk_rope: 64,
                    v_head_dim: 128,
                }),
                n_experts: 64,
                top_k: 6,
                expert_ff: 1408,
                n_shared: 2,
                first_dense: 1,
                n_group: 1,
                topk_group: 1,
                sigmoid: false,
                norm_topk: false,
                routed_scale: 1.0,
                rope_theta: 10_000.0,
                context: 163_840,
                rms_eps: 1e-6,
                yarn: Some(YarnShape {
                    factor: 40.0,
                    original_context: 4096,
                    mscale_all_dim: 0.707,
                }),
                bos: 100_000,
                eos: 100_001,
            },
            Preset::V3 => Shape {
                arch: SynthArch::Deepseek3,
                model_name: "DeepSeek-V3",
                vocab: 129_280,
                hidden: 7168,
                n_layers: 61,
                ff: 18_432,
                n_heads: 128,
                n_kv_heads: 128,
                head_dim: 128,
                mla: Some(Mla {
                    q_lora_rank: Some(1536),
                    kv_lora_rank: 512,
                    qk_nope: 128,
                    qk_rope: 64,
                    v_head_dim: 128,
                }),
                n_experts: 256,
                top_k: 8,
                expert_ff: 2048,
                n_shared: 1,
                first_dense: 3,
                n_group: 8,
                topk_group: 4,
                sigmoid: true,
                norm_topk: true,
                routed_scale: 2.5,
                rope_theta: 10_000.0,
                context: 163_840,
                rms_eps: 1e-6,
                yarn: Some(YarnShape { factor: 40.0, original_context: 4096, mscale_all_dim: 1.0 }),
                bos: 0,
                eos: 1,
            },
            Preset::Qwen3_30bA3b => Shape {
                arch: SynthArch::Qwen3Moe,
                model_name: "Qwen3-30B-A3B",
                vocab: 151_936,
                hidden: 2048,
                n_layers: 48,
                ff: 6144,
                n_heads: 32,
                n_kv_heads: 4,
                head_dim: 128,
                mla: None,
                n_experts: 128,
                top_k: 8,
                expert_ff: 768,
                n_shared: 0,
                first_dense: 0,
                n_group: 1,
                topk_group: 1,
                sigmoid: false,
                norm_topk: true,
                routed_scale: 1.0,
                rope_theta: 1_000_000.0,
                context: 40_960,
                rms_eps: 1e-6,
                yarn: None,
                bos: 151_643,
                eos: 151_645,
            },
            Preset::Mixtral8x7b => Shape {
                arch: SynthArch::Mixtral,
                model_name: "Mixtral-8x7B",
                vocab: 32_000,
                hidden: 4096,
                n_layers: 32,
                ff: 14_336,
                n_heads: 32,
                n_kv_heads: 8,
                head_dim: 128,
                mla: None,
                n_experts: 8,
                top_k: 2,
                expert_ff: 14_336,
                n_shared: 0,
                first_dense: 0,
                n_group: 1,
                topk_group: 1,
                sigmoid: false,
                norm_topk: true,
                routed_scale: 1.0,
                rope_theta: 1_000_000.0,
                context: 32_768,
                rms_eps: 1e-5,
                yarn: None,
                bos: 1,
                eos: 2,
            },
        }
    }
}

/// DeepSeek's multi-head latent attention.
#[derive(Clone, Debug, PartialEq)]
pub struct Mla {
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope: usize,
    pub qk_rope: usize,
    pub v_head_dim: usize,
}

/// YaRN context extension as DeepSeek configures it.
#[derive(Clone, Debug, PartialEq)]
pub struct YarnShape {
    pub factor: f32,
    pub original_context: usize,
    pub mscale_all_dim: f32,
}

/// Every hyperparameter a synthetic model is built from.
#[derive(Clone, Debug, PartialEq)]
pub struct Shape {
    pub arch: SynthArch,
    /// What `general.name` calls it.
    pub model_name: &'static str,
    pub vocab: usize,
    pub hidden: usize,
    pub n_layers: usize,
    /// Intermediate size of the dense MLPs.
    pub ff: usize,
    pub n_heads: usize,
    /// Grouped-query attention only (MLA has one latent KV head).
    pub n_kv_heads: usize,
    /// Grouped-query attention only.
    pub head_dim: usize,
    pub mla: Option<Mla>,
    pub n_experts: usize,
    pub top_k: usize,
    pub expert_ff: usize,
    /// Shared experts, each of `expert_ff`.
    pub n_shared: usize,
    /// Layers before this one are dense.
    pub first_dense: usize,
    pub n_group: usize,
    pub topk_group: usize,
    /// Sigmoid gating with a correction bias (DeepSeek-V3's noaux_tc), softmax otherwise.
    pub sigmoid: bool,
    pub norm_topk: bool,
    pub routed_scale: f32,
    pub rope_theta: f32,
    pub context: usize,
    pub rms_eps: f32,
    pub yarn: Option<YarnShape>,
    pub bos: u32,
    pub eos: u32,
}

impl Shape {
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        self.n_experts > 0 && layer >= self.first_dense
    }
}
