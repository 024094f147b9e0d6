//! The embedded default model: a tiny random-weight Qwen3-MoE (Q8_0 GGUF, from the reference
//! fixtures) compiled into the binary, so that `kt` runs on a fresh machine with no download.
//! Its weights are random: it produces valid tokens, not sensible text.

use anyhow::{Context, Result};
use kt_core::SharedBytes;
use kt_formats::gguf::{GgufFile, GgufModel};
use kt_models::{LoadedModel, MatmulMode};
use kt_tokenize::Tokenizer;

const NAME: &str = "embedded:qwen3moe-tiny-q8_0.gguf";
static BYTES: &[u8] = include_bytes!("../../../tests/fixtures/models/qwen3moe/gguf/q8_0.gguf");

fn open() -> Result<GgufModel> {
    let file = GgufFile::from_bytes(NAME, SharedBytes::new(BYTES)).context("embedded model")?;
    Ok(GgufModel::from_parts(NAME, vec![file], vec![])?)
}

pub fn load(mode: MatmulMode) -> Result<LoadedModel> {
    Ok(kt_models::load_gguf(open()?, NAME.as_ref(), mode)?)
}

pub fn tokenizer() -> Result<Tokenizer> {
    Ok(Tokenizer::from_gguf(open()?.metadata())?)
}
