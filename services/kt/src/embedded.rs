//! The embedded default model (its bytes are `kt_formats::embedded`, shared with the gateway):
//! a tiny random-weight Qwen3-MoE that produces valid tokens, not sensible text.

use anyhow::{Context, Result};
use kt_formats::embedded;
use kt_models::{LoadedModel, MatmulMode};
use kt_tokenize::Tokenizer;

pub fn load(mode: MatmulMode) -> Result<LoadedModel> {
    let model = embedded::open().context("embedded model")?;
    Ok(kt_models::load_gguf(model, embedded::NAME.as_ref(), mode)?)
}

pub fn tokenizer() -> Result<Tokenizer> {
    Ok(Tokenizer::from_gguf(embedded::open().context("embedded model")?.metadata())?)
}
