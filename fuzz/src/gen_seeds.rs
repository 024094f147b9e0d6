//! Writes seed inputs for the fuzz targets: small valid files made with kt-formats' writer, so
//! the fuzzer starts from inputs that get past the magic and the counts.
//!
//! `cargo run --bin gen_seeds` (from `fuzz/`) fills `corpus/gguf_parse` and
//! `corpus/safetensors_parse`.

use std::fs;

use kt_core::GgmlType;
use kt_formats::gguf::writer::GgufWriter;
use kt_formats::Array;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let gguf = "corpus/gguf_parse";
    fs::create_dir_all(gguf)?;

    let mut w = GgufWriter::new();
    w.metadata("general.architecture", "llama")
        .metadata("llama.block_count", 1u32)
        .metadata("f", 0.5f32)
        .metadata("b", true)
        .metadata("i", -1i64)
        .metadata("tokenizer.ggml.tokens", Array::from(vec!["a", "b"]))
        .metadata("n", Array::Array(vec![Array::from(vec![1u8]), Array::from(vec![2.0f64])]));
    w.tensor("t", GgmlType::F32, vec![2, 2], vec![1; 16])?;
    w.tensor("q", GgmlType::Q8_0, vec![1, 32], vec![2; 34])?;
    fs::write(format!("{gguf}/small.gguf"), w.to_bytes())?;

    let mut w = GgufWriter::new();
    w.version(2).alignment(8);
    w.metadata("general.alignment2", 1u16);
    w.tensor("k", GgmlType::Q4_K, vec![1, 256], vec![3; 144])?;
    fs::write(format!("{gguf}/v2_align8.gguf"), w.to_bytes())?;

    fs::write(format!("{gguf}/empty.gguf"), GgufWriter::new().to_bytes())?;

    let st = "corpus/safetensors_parse";
    fs::create_dir_all(st)?;
    let header = r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F16","shape":[2],"data_offsets":[0,4]},"b":{"dtype":"I64","shape":[1],"data_offsets":[4,12]}}"#;
    let mut h = header.as_bytes().to_vec();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&[7; 12]);
    fs::write(format!("{st}/small.safetensors"), out)?;
    Ok(())
}
