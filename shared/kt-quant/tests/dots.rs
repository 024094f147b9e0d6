//! Dot products against f64 evaluations of the (bit-exact, see `reference.rs`) dequantized
//! values.
//!
//! Tolerances are stated as multiples of f32's epsilon `u = 2^-23` times a magnitude `S`:
//!
//! * `dot_f32`: `|dot - exact| <= (n/8 + 5) * u * Σ|w_i x_i|`, the classic bound for f32
//!   summation of that depth (eight lanes of `n/8` products, then a 3-level reduction), plus
//!   `n * 2^-149` for products that underflow.
//! * `vec_dot`: `|vec_dot - exact| <= (n/8 + 16) * u * S`, where `S = Σ (|scale part_i| +
//!   |min part_i|) * |a_i|` (the two terms of `w_i = d*sc*q_i - dmin*m`, so cancellation in
//!   `w_i` does not shrink the bound), plus, for Q4_1/Q5_1, the f16 roundings of Q8_1's
//!   `s = d * Σq`, which ggml's dot product uses for the offset term instead of the activations
//!   (see `q8_1_offset_error`; large where the activation scale is an f16 subnormal).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

mod common;

use common::{dequant_vectors, Rng};
use kt_core::GgmlType;
use kt_quant::{kernels, Block, SUPPORTED};

const U: f64 = f32::EPSILON as f64;

/// Weight rows for a format: the gguf fixture blocks, except for F32/F16/BF16, whose fixtures
/// span the whole exponent range (sums would overflow); those get values in [-4, 4).
fn weights(ty: GgmlType) -> Vec<u8> {
    match ty {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
            let x: Vec<f32> = Rng::new(7).vec(2048).iter().map(|v| v * 4.0).collect();
            let mut w = vec![0u8; ty.row_bytes(x.len()).unwrap()];
            kt_quant::quantize_row(ty, &x, &mut w).unwrap();
            w
        }
        _ => dequant_vectors(ty).0,
    }
}

/// Offsets of the (scale, min) f16 fields of formats with an offset term.
fn scale_and_min_fields(ty: GgmlType) -> Option<(usize, usize)> {
    match ty {
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => Some((0, 2)),
        GgmlType::Q2_K => Some((80, 82)),
        _ => None,
    }
}

/// Per element `|scale part| + |min part|` of the weights (see the module docs).
fn magnitudes(ty: GgmlType, w: &[u8], n: usize) -> Vec<f64> {
    let Some((d_at, m_at)) = scale_and_min_fields(ty) else {
        return kt_quant::dequantize(ty, w, n).unwrap().iter().map(|v| v.abs() as f64).collect();
    };
    let part = |zero_at: usize| {
        let mut w = w.to_vec();
        for block in w.chunks_exact_mut(ty.type_size()) {
            block[zero_at..zero_at + 2].fill(0);
        }
        kt_quant::dequantize(ty, &w, n).unwrap()
    };
    let (scale_part, min_part) = (part(m_at), part(d_at));
    scale_part.iter().zip(&min_part).map(|(s, m)| (s.abs() + m.abs()) as f64).collect()
}

fn min_part(ty: GgmlType, w: &[u8], n: usize) -> Vec<f64> {
    let (d_at, _) = scale_and_min_fields(ty).unwrap();
    let mut w = w.to_vec();
    for block in w.chunks_exact_mut(ty.type_size()) {
        block[d_at..d_at + 2].fill(0);
    }
    kt_quant::dequantize(ty, &w, n).unwrap().iter().map(|v| v.abs() as f64).collect()
}

/// Bound on the error of ggml's offset term `m * s` of Q4_1/Q5_1 · Q8_1: `s = fp16(Σq * d)`
/// is computed from the f32 scale `d` before `d` itself is rounded to f16, and then rounded to
/// f16; each rounding is relative `2^-11`, or absolute `2^-25` in f16's subnormal range.
fn q8_1_offset_error(min_part: &[f64], a: &[u8]) -> f64 {
    let f16_err = |v: f64| (v.abs() * 2f64.powi(-11)).max(2f64.powi(-25));
    let mut tol = 0.0;
    for (m, b) in min_part.chunks_exact(32).zip(a.chunks_exact(36)) {
        let b = kt_quant::blocks::BlockQ8_1::read(b).unwrap();
        let sum_abs: f64 = b.qs.iter().map(|q| (*q as f64).abs()).sum();
        let (d, s) = (b.d.to_f64(), b.s.to_f64());
        tol += m[0] * (sum_abs * f16_err(d) + f16_err(s));
    }
    tol
}

fn f64_dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(a, b)| *a as f64 * *b as f64).sum()
}

#[test]
fn dot_f32_matches_f64_dot_of_dequantized_row() {
    let mut rng = Rng::new(1);
    let mut worst = 0f64;
    for ty in SUPPORTED {
        let w = weights(ty);
        let n = w.len() / ty.type_size() * ty.block_size();
        let wf = kt_quant::dequantize(ty, &w, n).unwrap();
        // Whole row, and a few short rows (one block, two blocks).
        for blocks in [n / ty.block_size(), 1, 2] {
            let m = blocks * ty.block_size();
            let x = rng.vec(m);
            let src = &w[..ty.row_bytes(m).unwrap()];
            let got = kt_quant::dot_f32(ty, src, &x).unwrap() as f64;
            let exact = f64_dot(&wf[..m], &x);
            let s: f64 = wf[..m].iter().zip(&x).map(|(w, x)| (*w as f64 * *x as f64).abs()).sum();
            let depth = (m / 8 + 5) as f64;
            let tol = depth * U * s + m as f64 * 2f64.powi(-149);
            assert!((got - exact).abs() <= tol, "{ty} n={m}: {got} vs {exact} (tol {tol})");
            worst = worst.max((got - exact).abs() / (U * s).max(f64::MIN_POSITIVE));
            assert_eq!(got as f32, (kernels(ty).unwrap().dot_f32)(src, &x), "{ty} table");
        }
    }
    println!("worst dot_f32 error: {worst:.2}u*S");
}

#[test]
fn vec_dot_matches_dot_of_dequantized_operands() {
    let mut rng = Rng::new(2);
    let mut worst = Vec::new();
    for ty in SUPPORTED {
        let k = kernels(ty).unwrap();
        let w = weights(ty);
        let n = w.len() / ty.type_size() * ty.block_size();
        let wf = kt_quant::dequantize(ty, &w, n).unwrap();
        let mag = magnitudes(ty, &w, n);
        let mut worst_rel = 0f64;
        for blocks in [n / ty.block_size(), 1, 3] {
            let m = blocks * ty.block_size();
            // Activations with a different magnitude per call.
            let scale = [1.0f32, 1e-3, 40.0][blocks % 3];
            let x: Vec<f32> = rng.vec(m).iter().map(|v| v * scale).collect();
            let a = kt_quant::quantize_for_vec_dot(ty, &x).unwrap();
            let af = kt_quant::dequantize(k.vec_dot_type, &a, m).unwrap();
            let src = &w[..ty.row_bytes(m).unwrap()];

            let got = kt_quant::vec_dot(ty, src, &a).unwrap() as f64;
            let exact = f64_dot(&wf[..m], &af);
            let s: f64 = mag[..m].iter().zip(&af).map(|(w, a)| w * (*a as f64).abs()).sum();
            let mut tol = (m / 8 + 16) as f64 * U * s;
            if k.vec_dot_type == GgmlType::Q8_1 && scale_and_min_fields(ty).is_some() {
                tol += q8_1_offset_error(&min_part(ty, src, m), &a);
            }
            let err = (got - exact).abs();
            assert!(err <= tol, "{ty} n={m}: {got} vs {exact} (err {err}, tol {tol})");
            worst_rel = worst_rel.max(err / (U * s).max(f64::MIN_POSITIVE));
        }
        worst.push(format!("{ty}: {worst_rel:.1}u*S"));
    }
    println!("worst vec_dot error: {}", worst.join(", "));
}

/// vec_dot of activation formats with themselves equals the exact integer dot product times
/// the scales (Q8_0, Q8_1, Q8_K have no offset terms, so only the final products round).
#[test]
fn q8_vec_dot_is_scale_times_integer_dot() {
    let x = Rng::new(3).vec(512);
    let y = Rng::new(4).vec(512);
    for ty in [GgmlType::Q8_0, GgmlType::Q8_1, GgmlType::Q8_K] {
        let (a, b) = (
            kt_quant::quantize_for_vec_dot(ty, &x).unwrap(),
            kt_quant::quantize_for_vec_dot(ty, &y).unwrap(),
        );
        let got = kt_quant::vec_dot(ty, &a, &b).unwrap();
        let (af, bf) = (
            kt_quant::dequantize(ty, &a, 512).unwrap(),
            kt_quant::dequantize(ty, &b, 512).unwrap(),
        );
        let exact = f64_dot(&af, &bf);
        assert!(
            (got as f64 - exact).abs() <= 1e-5 * exact.abs().max(1.0),
            "{ty}: {got} vs {exact}"
        );
    }
}

#[test]
fn q8_1_quantization_follows_its_definition() {
    let mut x: Vec<f32> = Rng::new(5).vec(256).iter().map(|v| v * 3.0).collect();
    // A block of ties: amax 127 makes d = 1, so each k + 0.5 must round away from zero.
    x[..32].copy_from_slice(&std::array::from_fn::<f32, 32, _>(|i| {
        if i == 0 {
            127.0
        } else {
            i as f32 - 16.5
        }
    }));
    let mut q8_0 = vec![0u8; GgmlType::Q8_0.row_bytes(256).unwrap()];
    let mut q8_1 = vec![0u8; GgmlType::Q8_1.row_bytes(256).unwrap()];
    kt_quant::quantize_row(GgmlType::Q8_0, &x, &mut q8_0).unwrap();
    kt_quant::quantize_row(GgmlType::Q8_1, &x, &mut q8_1).unwrap();
    for (i, (b0, b1)) in q8_0.chunks_exact(34).zip(q8_1.chunks_exact(36)).enumerate() {
        let b0 = kt_quant::blocks::BlockQ8_0::read(b0).unwrap();
        let b1 = kt_quant::blocks::BlockQ8_1::read(b1).unwrap();
        // Same scale and quants as Q8_0 (quantize_row_q8_1_ref == quantize_row_q8_0_ref) ...
        assert_eq!((b0.d, b0.qs), (b1.d, b1.qs), "block {i}");
        // ... plus s = fp16(sum(q) * d) with the unrounded f32 d = amax / 127.
        let amax = x[32 * i..32 * i + 32].iter().fold(0f32, |m, v| m.max(v.abs()));
        let sum: i32 = b1.qs.iter().map(|&q| q as i32).sum();
        assert_eq!(b1.s, half::f16::from_f32(sum as f32 * (amax / 127.0)), "block {i}");
        if i == 0 {
            let want: Vec<i8> = (1..32).map(|k| (k as f32 - 16.5).round() as i8).collect();
            assert_eq!((b1.d.to_f32(), b1.qs[0], &b1.qs[1..]), (1.0, 127, &want[..]));
            assert_eq!((b1.qs[1], b1.qs[16], b1.qs[17], b1.qs[31]), (-16, -1, 1, 15));
        }
    }
}

#[test]
fn q8_k_round_trip_is_within_half_a_step() {
    let x: Vec<f32> = Rng::new(6).vec(1024).iter().map(|v| v * 10.0).collect();
    let mut q = vec![0u8; GgmlType::Q8_K.row_bytes(1024).unwrap()];
    kt_quant::quantize_row(GgmlType::Q8_K, &x, &mut q).unwrap();
    let y = kt_quant::dequantize(GgmlType::Q8_K, &q, 1024).unwrap();
    for (b, (xs, ys)) in q.chunks_exact(292).zip(x.chunks_exact(256).zip(y.chunks_exact(256))) {
        let d = kt_quant::blocks::BlockQ8_K::read(b).unwrap().d.abs();
        for (x, y) in xs.iter().zip(ys) {
            assert!((x - y).abs() <= 0.5 * d * (1.0 + 1e-5), "{x} vs {y} (d {d})");
        }
    }
}
