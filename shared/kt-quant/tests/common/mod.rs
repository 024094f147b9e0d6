//! Shared helpers of the integration tests: the gguf reference vectors and a small PRNG.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use kt_core::GgmlType;

/// One vector set of `tests/fixtures/quant/manifest.txt`.
#[derive(Debug)]
pub struct Vectors {
    /// `dequantize` or `quantize`.
    pub kind: String,
    pub ty: GgmlType,
    pub elements: usize,
    pub input: Vec<u8>,
    pub expected: Vec<u8>,
    /// `gguf` (the package's reference) or `definition` (gguf has none; ggml's formula).
    pub source: String,
}

pub fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/quant")
}

pub fn ty_by_name(name: &str) -> GgmlType {
    GgmlType::ALL
        .into_iter()
        .find(|t| t.name() == name)
        .unwrap_or_else(|| panic!("unknown format {name} in manifest"))
}

pub fn vectors() -> Vec<Vectors> {
    let dir = fixture_dir();
    let manifest = std::fs::read_to_string(dir.join("manifest.txt"))
        .expect("tests/fixtures/quant/manifest.txt (run gen_vectors.py)");
    manifest
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 6, "manifest line {l:?}");
            let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
            Vectors {
                kind: f[0].to_string(),
                ty: ty_by_name(f[1]),
                elements: f[2].parse().unwrap(),
                input: read(f[3]),
                expected: read(f[4]),
                source: f[5].to_string(),
            }
        })
        .collect()
}

/// The dequantization vectors of `ty`: (blocks, expected values).
pub fn dequant_vectors(ty: GgmlType) -> (Vec<u8>, Vec<f32>) {
    let v = vectors()
        .into_iter()
        .find(|v| v.kind == "dequantize" && v.ty == ty)
        .unwrap_or_else(|| panic!("no dequantize vectors for {ty}"));
    (v.input, f32s(&v.expected))
}

pub fn f32s(bytes: &[u8]) -> Vec<f32> {
    assert_eq!(bytes.len() % 4, 0);
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

/// xorshift64*: deterministic test data without a dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [-1, 1).
    pub fn unit(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    pub fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.unit()).collect()
    }
}
