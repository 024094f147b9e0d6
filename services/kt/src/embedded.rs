//! The embedded default model: a tiny random-weight Qwen3-MoE (Q8_0 GGUF, from the reference
//! fixtures) compiled into the binary, so that `kt` runs on a fresh machine with no download.

use anyhow::{Context, Result};
use kt_core::SharedBytes;
use kt_formats::gguf::{GgufFile, GgufModel};
use kt_models::{LoadedModel, MatmulMode};

const NAME: &str = "embedded:qwen3moe-tiny-q8_0.gguf";
static BYTES: &[u8] = include_bytes!("../../../tests/fixtures/models/qwen3moe/gguf/q8_0.gguf");

pub fn load(mode: MatmulMode) -> Result<LoadedModel> {
    let file = GgufFile::from_bytes(NAME, SharedBytes::new(BYTES)).context("embedded model")?;
    let gguf = GgufModel::from_parts(NAME, vec![file], vec![])?;
    Ok(kt_models::load_gguf(gguf, NAME.as_ref(), mode)?)
}
