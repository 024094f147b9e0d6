//! The `amx_int8` format (`kt_quant::packed`): every kernel path this CPU has (scalar, VNNI,
//! AMX) is **bit-identical** to the scalar reference on ragged shapes (rows, columns and
//! tokens that are not multiples of the panel and tile sizes, row ranges that start inside a
//! panel), the packed product is within the int8 rounding bound of the f32 product of the
//! original weights, and bad arguments give errors, not panics.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Rng;
use kt_core::GgmlType;
use kt_quant::packed::{self, matmul, PackedI8, Path, QuantActs};

fn pack(w: &[f32], rows: usize, cols: usize) -> PackedI8 {
    PackedI8::from_rows(rows, cols, |r, out| out.copy_from_slice(&w[r * cols..(r + 1) * cols]))
}

fn product(
    p: &PackedI8,
    rows: std::ops::Range<usize>,
    a: &QuantActs,
    path: Path,
    ldo: usize,
) -> Vec<f32> {
    let mut out = vec![f32::NAN; a.tokens().max(1) * ldo];
    matmul(p, rows, a, &mut out, ldo, path).unwrap();
    out
}

#[test]
fn every_path_equals_the_scalar_reference_bit_for_bit() {
    let paths: Vec<Path> = Path::ALL.into_iter().filter(|p| p.available()).collect();
    println!("paths on this CPU: {paths:?}");
    let mut rng = Rng::new(7);
    for &(rows, cols) in &[(1, 64), (17, 100), (64, 256), (100, 1408), (33, 2048)] {
        let w: Vec<f32> = rng.vec(rows * cols).iter().map(|v| v * 0.05).collect();
        let p = pack(&w, rows, cols);
        for &tokens in &[1, 3, 8, 9, 16, 31, 33, 70] {
            let mut x = rng.vec(tokens * cols);
            // An outlier per token row, as real activations have.
            for t in 0..tokens {
                x[t * cols + (t * 7) % cols] *= 20.0;
            }
            let a = QuantActs::new(&x, cols);
            for range in [0..rows, 32.min(rows)..rows, 16.min(rows)..rows, 5.min(rows)..rows] {
                let ldo = range.len() + 3;
                let want = product(&p, range.clone(), &a, Path::Scalar, ldo);
                for &path in &paths {
                    let got = product(&p, range.clone(), &a, path, ldo);
                    for t in 0..tokens {
                        for i in 0..range.len() {
                            let (g, e) = (got[t * ldo + i], want[t * ldo + i]);
                            assert_eq!(
                                g.to_bits(),
                                e.to_bits(),
                                "{path} rows {rows} cols {cols} tokens {tokens} range {range:?}: \
                                 t {t} r {i}: {g} vs {e}"
                            );
                        }
                        // Nothing outside the rows asked for is written.
                        for i in range.len()..ldo.min(got.len() - t * ldo) {
                            assert!(got[t * ldo + i].is_nan(), "{path}: wrote past the rows");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn packed_product_is_within_the_int8_rounding_bound_of_the_f32_product() {
    let mut rng = Rng::new(11);
    let (rows, cols, tokens) = (48, 1408, 5);
    let w: Vec<f32> = rng.vec(rows * cols).iter().map(|v| v * 0.02).collect();
    let x = rng.vec(tokens * cols);
    let p = pack(&w, rows, cols);
    let a = QuantActs::new(&x, cols);
    let y = product(&p, 0..rows, &a, Path::best(), rows);
    let mut worst = 0f32;
    for t in 0..tokens {
        let xt = &x[t * cols..(t + 1) * cols];
        let sa = xt.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
        for r in 0..rows {
            let wr = &w[r * cols..(r + 1) * cols];
            let sw = wr.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            let exact: f64 = xt.iter().zip(wr).map(|(a, b)| *a as f64 * *b as f64).sum();
            // |x̂ŵ − xw| ≤ |x|·|w − ŵ| + |ŵ|·|x − x̂|, each rounding error at most half a step.
            let bound: f64 = xt
                .iter()
                .zip(wr)
                .map(|(a, b)| (a.abs() * sw / 2.0 + (b.abs() + sw / 2.0) * sa / 2.0) as f64)
                .sum();
            let err = (y[t * rows + r] as f64 - exact).abs();
            assert!(err <= bound * 1.001 + 1e-6, "t {t} r {r}: error {err} > bound {bound}");
            worst = worst.max((err / bound.max(1e-30)) as f32);
        }
    }
    println!("worst error: {worst:.3} of the rounding bound");
}

#[test]
fn packing_a_gguf_tensor_dequantizes_then_requantizes_per_row() {
    let (rows, cols) = (20, 256);
    let mut rng = Rng::new(3);
    let w = rng.vec(rows * cols);
    let rb = GgmlType::Q8_0.row_bytes(cols).unwrap();
    let mut q8 = vec![0u8; rows * rb];
    for (x, o) in w.chunks_exact(cols).zip(q8.chunks_exact_mut(rb)) {
        kt_quant::quantize_row(GgmlType::Q8_0, x, o).unwrap();
    }
    let p = PackedI8::from_tensor(GgmlType::Q8_0, &q8, rows, cols).unwrap();
    assert_eq!((p.rows(), p.cols()), (rows, cols));
    assert!(p.bytes() >= rows * cols);
    let (mut deq, mut back) = (vec![0f32; cols], vec![0f32; cols]);
    for r in 0..rows {
        kt_quant::dequantize_row(GgmlType::Q8_0, &q8[r * rb..(r + 1) * rb], &mut deq).unwrap();
        p.row_f32(r, &mut back);
        let step = deq.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
        for (a, b) in deq.iter().zip(&back) {
            assert!((a - b).abs() <= step * 0.5001, "row {r}: {a} vs {b}");
        }
    }
    // Wrong length, unsupported format, partial block: errors.
    assert!(PackedI8::from_tensor(GgmlType::Q8_0, &q8[1..], rows, cols).is_err());
    assert!(PackedI8::from_tensor(GgmlType::Q8_0, &q8, rows, cols + 32).is_err());
    assert!(PackedI8::from_tensor(GgmlType::Q8_0, &q8, rows, 100).is_err());
    assert!(PackedI8::from_tensor(GgmlType::I32, &q8, rows, cols).is_err());
}

#[test]
fn bad_arguments_are_errors() {
    let p = pack(&vec![0.5; 32 * 64], 32, 64);
    let a = QuantActs::new(&vec![1.0; 2 * 128], 128);
    let mut out = vec![0f32; 64];
    assert!(matmul(&p, 0..32, &a, &mut out, 32, Path::Scalar).is_err(), "columns differ");
    let a = QuantActs::new(&vec![1.0; 2 * 64], 64);
    assert!(matmul(&p, 0..32, &a, &mut out[..40], 32, Path::Scalar).is_err(), "out too short");
    assert!(matmul(&p, 0..32, &a, &mut out, 16, Path::Scalar).is_err(), "ldo < rows");
    // Empty ranges and ranges past the end are clipped, not errors.
    matmul(&p, 40..50, &a, &mut out, 32, Path::best()).unwrap();
    matmul(&p, 0..100, &a, &mut out, 32, Path::best()).unwrap();
    assert!(out.iter().all(|&v| (v - 64.0 * 0.5).abs() < 0.5), "{out:?}");
    // Zero rows quantize to zero with scale 0.
    let z = QuantActs::new(&[0.0; 64], 64);
    matmul(&p, 0..32, &z, &mut out, 32, Path::best()).unwrap();
    assert!(out[..32].iter().all(|&v| v == 0.0));
    // A gather picks rows by index.
    let x: Vec<f32> = (0..3 * 64).map(|i| (i / 64) as f32 + 1.0).collect();
    let a = QuantActs::new(&x, 64).gather(&[2, 0]);
    assert_eq!(a.tokens(), 2);
    matmul(&p, 0..32, &a, &mut out, 32, Path::best()).unwrap();
    assert!((out[0] - 3.0 * 32.0).abs() < 0.5 && (out[32] - 32.0).abs() < 0.5, "{out:?}");
}

#[test]
fn amx_peak_is_measured_only_where_amx_runs() {
    let peak = packed::amx_int8_peak(0.01);
    assert_eq!(peak.is_some(), Path::Amx.available());
    if let Some(p) = peak {
        println!("AMX int8 peak, one thread: {:.2} TOPS", p / 1e12);
        assert!(p > 1e11, "{p}");
    }
    assert_ne!(Path::for_tokens(1), Path::Amx, "one token is never worth an AMX tile");
}

#[test]
fn non_finite_rows_give_non_finite_scales() {
    let mut q = [5i8; 4];
    assert!(packed::quantize_row_i8(&[1.0, f32::NAN, 2.0, 3.0], &mut q).is_nan());
    assert!(packed::quantize_row_i8(&[1.0, f32::INFINITY, 2.0, 3.0], &mut q).is_infinite());
    assert_eq!(packed::quantize_row_i8(&[0.0; 4], &mut q), 0.0);
    assert_eq!(q, [0; 4]);
    // Ties round to even: 0.5 and 1.5 steps (amax 127 makes the step exactly 1).
    let s = packed::quantize_row_i8(&[0.5, 1.5, -2.5, 127.0], &mut q);
    assert_eq!((s, q), (1.0, [0, 2, -2, 127]));
}
