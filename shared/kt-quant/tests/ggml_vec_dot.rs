//! `vec_dot` and the activation quantizers against ggml's own C code: the results that
//! `tests/fixtures/quant/ggml_vec_dot.c` (linked with ggml's `quants.c` and `ggml-quants.c`)
//! wrote to `ggml_vec_dot.txt`, compared bit for bit. The `vec_dot`s checked are the scalar
//! reference ones ([`kt_quant::scalar_kernels`]); `tests/simd.rs` compares every SIMD family
//! with them (AVX2/AVX-512 bit for bit, `vnni` within its stated bound).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

mod common;

use common::{fixture_dir, ty_by_name};
use kt_core::GgmlType;

/// The activations of `ggml_vec_dot.c`: a 64-bit LCG, `x = v * 2^(e - 23)`, exact in f32.
fn activations(n: usize, e: i32) -> Vec<f32> {
    let mut state = 0x6b74_5f71_7665_6364u64 ^ (e + 1000) as u64;
    let scale = f32::from_bits(((127 + e - 23) as u32) << 23);
    (0..n)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let v = (state >> 40) as i32 - (1 << 23);
            v as f32 * scale
        })
        .collect()
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x100000001b3))
}

struct Line {
    kind: String,
    ty: GgmlType,
    n: usize,
    e: i32,
    value: u64,
}

fn lines() -> Vec<Line> {
    let text = std::fs::read_to_string(fixture_dir().join("ggml_vec_dot.txt")).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Line {
                kind: f[0].to_string(),
                ty: ty_by_name(f[1]),
                n: f[2].parse().unwrap(),
                e: f[3].parse().unwrap(),
                value: u64::from_str_radix(f[4], 16).unwrap(),
            }
        })
        .collect()
}

#[test]
fn activation_quantizers_are_bit_exact_with_ggml() {
    let mut seen = Vec::new();
    for l in lines().into_iter().filter(|l| l.kind == "quantize") {
        let x = activations(l.n, l.e);
        let mut out = vec![0u8; l.ty.row_bytes(l.n).unwrap()];
        kt_quant::quantize_row(l.ty, &x, &mut out).unwrap();
        assert_eq!(fnv1a(&out), l.value, "{} e={}", l.ty, l.e);
        seen.push(l.ty);
    }
    for ty in [GgmlType::Q8_0, GgmlType::Q8_1, GgmlType::Q8_K, GgmlType::F16, GgmlType::BF16] {
        assert!(seen.contains(&ty), "{ty} not covered");
    }
}

#[test]
fn vec_dot_is_bit_exact_with_ggml_generic_kernels() {
    let mut seen = Vec::new();
    for l in lines().into_iter().filter(|l| l.kind == "vec_dot") {
        let (blocks, _) = common::dequant_vectors(l.ty);
        let w = &blocks[..l.ty.row_bytes(l.n).unwrap()];
        let a = kt_quant::quantize_for_vec_dot(l.ty, &activations(l.n, l.e)).unwrap();
        let got = reference_vec_dot(l.ty, w, &a);
        let want = f32::from_bits(l.value as u32);
        // F32/BF16 weights span the whole f32 range: some sums overflow into inf - inf.
        if want.is_nan() {
            assert!(got.is_nan(), "{} n={} e={}: {got} vs NaN", l.ty, l.n, l.e);
        } else {
            assert_eq!(
                got.to_bits(),
                want.to_bits(),
                "{} n={} e={}: {got} vs {want}",
                l.ty,
                l.n,
                l.e
            );
        }
        seen.push(l.ty);
    }
    // Every format with a ggml vec_dot (Q8_1 and Q8_K have none there).
    check_coverage(&seen);
}

#[test]
fn vec_dot_of_each_block_is_bit_exact_with_ggml() {
    let mut seen = Vec::new();
    for l in lines().into_iter().filter(|l| l.kind == "vec_dot_chunks") {
        let (w, _) = common::dequant_vectors(l.ty);
        let n = w.len() / l.ty.type_size() * l.ty.block_size();
        let a = kt_quant::quantize_for_vec_dot(l.ty, &activations(n, l.e)).unwrap();
        let vt = kt_quant::vec_dot_type(l.ty).unwrap();
        let (wb, ab) = (l.ty.row_bytes(l.n).unwrap(), vt.row_bytes(l.n).unwrap());
        let results: Vec<u8> = w
            .chunks_exact(wb)
            .zip(a.chunks_exact(ab))
            .flat_map(|(w, a)| reference_vec_dot(l.ty, w, a).to_le_bytes())
            .collect();
        assert_eq!(results.len(), n / l.n * 4);
        assert_eq!(fnv1a(&results), l.value, "{} e={}: per-chunk results differ", l.ty, l.e);
        seen.push(l.ty);
    }
    check_coverage(&seen);
}

fn reference_vec_dot(ty: GgmlType, w: &[u8], a: &[u8]) -> f32 {
    assert_eq!(w.len() / ty.type_size(), a.len() / kt_quant::vec_dot_type(ty).unwrap().type_size());
    (kt_quant::scalar_kernels(ty).unwrap().vec_dot)(w, a)
}

fn check_coverage(seen: &[GgmlType]) {
    for ty in kt_quant::SUPPORTED {
        let expected = !matches!(ty, GgmlType::Q8_1 | GgmlType::Q8_K);
        assert_eq!(seen.contains(&ty), expected, "{ty}");
    }
}
