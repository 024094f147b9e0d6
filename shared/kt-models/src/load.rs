//! Opening a model from what users point kt at: an HF folder, a GGUF file or folder, or an HF
//! folder for config and tokenizer paired with GGUF weights (as KTransformers' `--gguf_path`).

use std::path::{Path, PathBuf};

use kt_formats::{GgufModel, HfFolder};

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

/// Opens `path` (HF folder, GGUF file, or folder of GGUF files), optionally taking the weights
/// from `gguf` instead.
pub fn load(path: &Path, gguf: Option<&Path>, mode: MatmulMode) -> Result<LoadedModel, ModelError> {
    let is_hf = path.is_dir() && path.join("config.json").is_file();
    let (model, source, eos_ids) = match (is_hf, gguf) {
        (true, None) => {
            let hf = HfFolder::open(path)?;
            let mut cfg = ModelConfig::from_hf(hf.config())?;
            cfg.tie_embeddings |= !hf.contains("lm_head.weight");
            let model = Model::load(cfg, &hf, Scheme::Hf, mode)?;
            let eos = hf_eos(hf.config());
            (model, ModelSource::Hf(hf), eos)
        }
        (true, Some(g)) => {
            let hf = HfFolder::open(path)?;
            let weights = GgufModel::open(g)?;
            let mut cfg = ModelConfig::from_hf(hf.config())?;
            // llama.cpp's converter permutes Llama/Mixtral q and k so that pairs are adjacent.
            if matches!(cfg.arch, Arch::Llama | Arch::Mixtral) {
                cfg.rope.style = RopeStyle::Interleaved;
            }
            cfg.tie_embeddings |= !weights.contains("output.weight");
            let model = Model::load(cfg, &weights, Scheme::Gguf, mode)?;
            let eos = hf_eos(hf.config());
            (model, ModelSource::Paired { hf, gguf: weights }, eos)
        }
        (false, Some(_)) => {
            return Err(ModelError::Input(format!(
                "--gguf pairs GGUF weights with an HF folder, but {} has no config.json",
                path.display()
            )))
        }
        (false, None) => return load_gguf(GgufModel::open(path)?, path, mode),
    };
    Ok(LoadedModel { model, source, eos_ids, path: path.to_path_buf() })
}

/// Builds a model from an opened GGUF model (a file, a split set, or bytes in memory).
pub fn load_gguf(g: GgufModel, path: &Path, mode: MatmulMode) -> Result<LoadedModel, ModelError> {
    let mut cfg = ModelConfig::from_gguf(g.metadata())?;
    if mode == MatmulMode::Ggml {
        cfg.imitate_llama_cpp();
    }
    cfg.tie_embeddings = !g.contains("output.weight");
    let model = Model::load(cfg, &g, Scheme::Gguf, mode)?;
    let eos_ids = ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"]
        .iter()
        .filter_map(|k| g.metadata().get_u32(k))
        .collect();
    Ok(LoadedModel { model, source: ModelSource::Gguf(g), eos_ids, path: path.to_path_buf() })
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
