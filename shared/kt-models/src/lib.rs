//! Model architectures on the CPU reference backend: Llama/Mistral, Qwen2, Mixtral,
//! Qwen2-MoE, Qwen3-MoE, DeepSeek-V2 and DeepSeek-V3, with f32 activations and weights in
//! any block format `kt-quant` computes.
//!
//! [`load`] opens weight files (an HF folder, a GGUF file or folder, or the KTransformers
//! pairing of an HF folder with GGUF weights), reads the config, and builds a [`Model`];
//! [`generate`] runs the decode loop.

pub mod bench_generate;
pub mod config;
pub mod generate;
pub mod kv;
pub mod linear;
mod load;
pub mod model;
pub mod moe;
pub mod names;
pub mod ops;

pub use config::{Arch, ModelConfig};
pub use generate::{
    generate, generate_in, FinishReason, GenerateParams, Generation, TokenLogprob, TokenOut,
};
pub use kv::{KvBlocks, KvPool, SeqKv};
pub use linear::MatmulMode;
pub use load::{load, load_gguf, open, LoadedModel, ModelParts, ModelSource};
pub use model::{load_experts, Model, Sequence, Step};
pub use moe::{Experts, LocalExperts, Routing, ShardedExperts, NO_EXPERT};

/// Errors of building or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Format(#[from] kt_formats::FormatError),
    #[error("config: {0}")]
    Config(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("shape: {0}")]
    Shape(String),
    #[error("missing tensor `{0}`")]
    MissingTensor(String),
    /// The KV cache has too few free blocks for a step; nothing was run.
    #[error("KV cache full: the step needs {needed} blocks, {free} free")]
    KvFull { needed: usize, free: usize },
    /// The device a backend computes on failed (a CUDA error, out of device memory).
    #[error("device: {0}")]
    Device(String),
    #[error("input: {0}")]
    Input(String),
    /// The routed experts could not answer: an expert server is gone, its link broke, or it
    /// did not answer in time (another holder of the same experts may answer instead).
    #[error("experts: {0}")]
    Experts(String),
    /// An expert server answered the call with an error: the link works, and any holder of
    /// the same experts would refuse the same call (a malformed request, an expert it does
    /// not hold, a failed computation).
    #[error("experts: {0}")]
    ExpertsRefused(String),
    #[error(transparent)]
    Sample(#[from] kt_sample::SampleError),
}
