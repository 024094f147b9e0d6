//! Opening a model from what users point kt at: an HF folder, a GGUF file or folder, or an HF
//! folder for config and tokenizer paired with GGUF weights (as KTransformers' `--gguf_path`).

use std::path::{Path, PathBuf};

use kt_formats::{GgufModel, HfFolder, TensorSource};

use crate::config::{Arch, ModelConfig, RopeStyle};
use crate::linear::MatmulMode;
use crate::names::Scheme;
use crate::{Model, ModelError};

/// Where the weights came from (kept open: the tokenizer layer reads the same files).
pub enum ModelSource {
    Hf(HfFolder),
    Gguf(GgufModel),
    /// Config (and tokenizer) from the HF folder, weights from GGUF.
    Paired {
        hf: HfFolder,
        gguf: GgufModel,
    },
}

impl std::fmt::Debug for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelSource::Hf(_) => f.write_str("Hf"),
            ModelSource::Gguf(_) => f.write_str("Gguf"),
            ModelSource::Paired { .. } => f.write_str("Paired"),
        }
    }
}

#[derive(Debug)]
pub struct LoadedModel {
    pub model: Model,
    pub source: ModelSource,
    /// End-of-sequence token ids declared by the model files.
    pub eos_ids: Vec<u32>,
    pub path: PathBuf,
}

/// A model's parts before any weight is loaded: the parsed config, the opened (memory-mapped)
/// weight files, and the tensor naming scheme. An expert server builds only its experts from
/// these ([`crate::load_experts`]); a worker builds a model holding none
/// ([`Model::load_with`]).
#[derive(Debug)]
pub struct ModelParts {
    pub config: ModelConfig,
    pub source: ModelSource,
    pub scheme: Scheme,
    /// End-of-sequence token ids declared by the model files.
    pub eos_ids: Vec<u32>,
}

impl ModelSource {
    /// The files the weights are read from.
    pub fn tensors(&self) -> &dyn TensorSource {
        match self {
            ModelSource::Hf(hf) => hf,
            ModelSource::Gguf(g) | ModelSource::Paired { gguf: g, .. } => g,
        }
    }
}

/// Opens `path` (HF folder, GGUF file, or folder of GGUF files), optionally taking the weights
/// from `gguf` instead, and derives the config and naming scheme as [`load`] does.
pub fn open(path: &Path, gguf: Option<&Path>, mode: MatmulMode) -> Result<ModelParts, ModelError> {
    let is_hf = path.is_dir() && path.join("config.json").is_file();
    match (is_hf, gguf) {
        (true, None) => {
            let hf = HfFolder::open(path)?;
            let mut config = ModelConfig::from_hf(hf.config())?;
            config.tie_embeddings |= !hf.contains("lm_head.weight");
            let eos_ids = hf_eos(hf.config());
            Ok(ModelParts { config, source: ModelSource::Hf(hf), scheme: Scheme::Hf, eos_ids })
        }
        (true, Some(g)) => {
            let hf = HfFolder::open(path)?;
            let weights = GgufModel::open(g)?;
            let mut config = ModelConfig::from_hf(hf.config())?;
            // llama.cpp's converter permutes Llama/Mixtral q and k so that pairs are adjacent.
            if matches!(config.arch, Arch::Llama | Arch::Mixtral) {
                config.rope.style = RopeStyle::Interleaved;
            }
            config.tie_embeddings |= !weights.contains("output.weight");
            let eos_ids = hf_eos(hf.config());
            let source = ModelSource::Paired { hf, gguf: weights };
            Ok(ModelParts { config, source, scheme: Scheme::Gguf, eos_ids })
        }
        (false, Some(_)) => Err(ModelError::Input(format!(
            "--gguf pairs GGUF weights with an HF folder, but {} has no config.json",
            path.display()
        ))),
        (false, None) => gguf_parts(GgufModel::open(path)?, mode),
    }
}

fn gguf_parts(g: GgufModel, mode: MatmulMode) -> Result<ModelParts, ModelError> {
    let mut config = ModelConfig::from_gguf(g.metadata())?;
    if mode == MatmulMode::Ggml {
        config.imitate_llama_cpp();
    }
    config.tie_embeddings = !g.contains("output.weight");
    let eos_ids = ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"]
        .iter()
        .filter_map(|k| g.metadata().get_u32(k))
        .collect();
    Ok(ModelParts { config, source: ModelSource::Gguf(g), scheme: Scheme::Gguf, eos_ids })
}

/// Opens `path` (HF folder, GGUF file, or folder of GGUF files), optionally taking the weights
/// from `gguf` instead.
pub fn load(path: &Path, gguf: Option<&Path>, mode: MatmulMode) -> Result<LoadedModel, ModelError> {
    build(open(path, gguf, mode)?, path, mode)
}

/// Builds a model from an opened GGUF model (a file, a split set, or bytes in memory).
pub fn load_gguf(g: GgufModel, path: &Path, mode: MatmulMode) -> Result<LoadedModel, ModelError> {
    build(gguf_parts(g, mode)?, path, mode)
}

fn build(parts: ModelParts, path: &Path, mode: MatmulMode) -> Result<LoadedModel, ModelError> {
    let ModelParts { config, source, scheme, eos_ids } = parts;
    let model = Model::load(config, source.tensors(), scheme, mode)?;
    Ok(LoadedModel { model, source, eos_ids, path: path.to_path_buf() })
}

fn hf_eos(cfg: &serde_json::Value) -> Vec<u32> {
    match cfg.get("eos_token_id") {
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().map(|v| vec![v as u32]).unwrap_or_default()
        }
        Some(serde_json::Value::Array(a)) => {
            a.iter().filter_map(|v| v.as_u64()).map(|v| v as u32).collect()
        }
        _ => Vec::new(),
    }
}
