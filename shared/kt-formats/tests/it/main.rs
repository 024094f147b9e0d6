//! Integration tests: synthetic files, valid and corrupted, built by the writers in `support`.

// Helpers outside `#[test]` functions may panic too: this whole crate is test code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod gguf;
mod hf;
mod safetensors;
mod split;
mod support;
