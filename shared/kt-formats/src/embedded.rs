//! The embedded default model: a tiny random-weight Qwen3-MoE (Q8_0 GGUF, from the reference
//! fixtures) compiled into the binary, so that `kt` and `kt-gateway` run on a fresh machine with
//! no download. Its weights are random: it produces valid tokens, not sensible text.
//!
//! The bytes live here, in the lowest crate every user of the model shares (`kt` loads its
//! weights, the gateway its tokenizer and header facts, the worker will load it for `kt serve`),
//! so they are compiled in once.

use kt_core::SharedBytes;

use crate::{FormatError, GgufFile, GgufModel};

/// The name the embedded model goes by in messages and model lists.
pub const NAME: &str = "embedded:qwen3moe-tiny-q8_0.gguf";

/// The GGUF file's bytes.
pub static BYTES: &[u8] = include_bytes!("../../../tests/fixtures/models/qwen3moe/gguf/q8_0.gguf");

/// Parses the embedded GGUF file (no copy: tensors point into [`BYTES`]).
pub fn open() -> Result<GgufModel, FormatError> {
    let file = GgufFile::from_bytes(NAME, SharedBytes::new(BYTES))?;
    GgufModel::from_parts(NAME, vec![file], vec![])
}

#[cfg(test)]
mod tests {
    #[test]
    fn embedded_model_parses() {
        let m = super::open().unwrap();
        assert_eq!(m.arch(), Some("qwen3moe"));
    }
}
