//! Every kernel family this CPU has (`Isa::available`: scalar, AVX2, AVX-512) against the
//! scalar reference, calling each family's table directly (not only the selected one), on
//! random rows of 1, 2, 3, 4, 7 and 16 blocks (F32/F16/BF16: 1..=40, 100, 4096 elements), at
//! unaligned byte offsets and with mismatched operand lengths.
//!
//! * `dot_f32`: the SIMD families rebuild every weight bit-identically to `dequantize` and only
//!   sum in another order (with FMA), so each result must lie within the f32 summation bound
//!   of the exact dot product of the dequantized row: `|dot - exact| <= (n/8 + 5) * 2^-23 *
//!   Σ|w_i x_i|` (the bound `tests/dots.rs` states for the scalar kernels; it covers eight or
//!   sixteen lanes of depth `n/lanes`, the combination of the accumulators and the final
//!   reduction).
//! * `vec_dot`: bit-identical to the scalar kernels (the integer sums are exact and kept in
//!   ggml's lanes; the f32 operations are ggml's, in its order), on quantized activations and
//!   on raw random activation bytes (-128 included).
//! * `dequantize` / `quantize`: bit-identical.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Rng;
use half::f16;
use kt_core::GgmlType;
use kt_quant::{kernels_for_isa, scalar_kernels, Isa, SUPPORTED};

const U: f64 = f32::EPSILON as f64;

fn families() -> Vec<Isa> {
    let v: Vec<Isa> = Isa::ALL.into_iter().filter(|i| i.available()).collect();
    println!("kernel families on this CPU: {v:?}");
    v
}

/// Offsets of the f16 scale fields of a block format, and of an f32 one (Q8_K).
fn scale_fields(ty: GgmlType) -> (&'static [usize], Option<usize>) {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 | GgmlType::IQ4_NL | GgmlType::IQ4_XS => {
            (&[0], None)
        }
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q8_1 => (&[0, 2], None),
        GgmlType::Q2_K => (&[80, 82], None),
        GgmlType::Q4_K | GgmlType::Q5_K => (&[0, 2], None),
        GgmlType::Q6_K => (&[208], None),
        GgmlType::Q3_K => (&[108], None),
        GgmlType::Q8_K => (&[], Some(0)),
        _ => (&[], None),
    }
}

/// `n` elements of `ty`: random bytes with finite, varied scales (F32/F16/BF16: values in
/// [-2, 2)).
fn random_row(ty: GgmlType, n: usize, rng: &mut Rng) -> Vec<u8> {
    let bytes = ty.row_bytes(n).unwrap();
    if matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
        let x: Vec<f32> = rng.vec(n).iter().map(|v| v * 2.0).collect();
        let mut out = vec![0u8; bytes];
        (scalar_kernels(ty).unwrap().quantize)(&x, &mut out);
        return out;
    }
    let mut out: Vec<u8> = (0..bytes).map(|_| rng.next_u64() as u8).collect();
    let (f16s, f32s) = scale_fields(ty);
    for blk in out.chunks_exact_mut(ty.type_size()) {
        for &at in f16s {
            let v = f16::from_f32(rng.vec(1)[0] * 0.2);
            blk[at..at + 2].copy_from_slice(&v.to_bits().to_le_bytes());
        }
        if let Some(at) = f32s {
            blk[at..at + 4].copy_from_slice(&(rng.vec(1)[0] * 0.05).to_le_bytes());
        }
    }
    out
}

/// `src` copied to byte offset `off` of a fresh buffer.
fn at_offset<T: Copy + Default>(src: &[T], off: usize) -> Vec<T> {
    let mut v = vec![T::default(); off];
    v.extend_from_slice(src);
    v
}

fn lengths(ty: GgmlType) -> Vec<usize> {
    if ty.block_size() == 1 {
        (1..=40).chain([100, 4096]).collect()
    } else {
        [1, 2, 3, 4, 7, 16].iter().map(|b| b * ty.block_size()).collect()
    }
}

#[test]
fn dot_f32_of_every_family_is_within_the_summation_bound() {
    let mut rng = Rng::new(11);
    let mut checked = 0;
    for isa in families() {
        let mut worst = 0f64;
        for ty in SUPPORTED {
            let (k, s) = (kernels_for_isa(isa, ty).unwrap(), scalar_kernels(ty).unwrap());
            for (case, n) in lengths(ty).into_iter().enumerate() {
                let w = random_row(ty, n, &mut rng);
                let x: Vec<f32> = rng.vec(n).iter().map(|v| v * 3.0).collect();
                let mut wf = vec![0f32; n];
                (s.dequantize)(&w, &mut wf);
                let exact: f64 = wf.iter().zip(&x).map(|(w, x)| *w as f64 * *x as f64).sum();
                let mag: f64 = wf.iter().zip(&x).map(|(w, x)| (*w as f64 * *x as f64).abs()).sum();
                let tol = (n / 8 + 5) as f64 * U * mag + n as f64 * 2f64.powi(-149);
                let (wo, xo) = (case % 4, case % 3);
                let (wb, xb) = (at_offset(&w, wo), at_offset(&x, xo));
                let got = (k.dot_f32)(&wb[wo..], &xb[xo..]) as f64;
                let err = (got - exact).abs();
                assert!(
                    err <= tol,
                    "{isa} {ty} n={n}: {got} vs {exact} (err {err:e}, tol {tol:e})"
                );
                worst = worst.max(err / (U * mag).max(f64::MIN_POSITIVE));
                checked += 1;

                // Mismatched lengths: both kernels use the whole blocks present in both.
                if n > ty.block_size() {
                    let short = n - ty.block_size();
                    let a = (k.dot_f32)(&w, &x[..short]) as f64;
                    let b = (s.dot_f32)(&w, &x[..short]) as f64;
                    let bytes = ty.row_bytes(short).unwrap();
                    let c = (k.dot_f32)(&w[..bytes], &x) as f64;
                    assert!((a - b).abs() <= 2.0 * tol && (c - b).abs() <= 2.0 * tol, "{isa} {ty}");
                }
            }
            // The other entries are the scalar ones (bit-identical).
            let n = 2 * ty.block_size().max(32);
            let w = random_row(ty, n, &mut rng);
            let (mut d1, mut d2) = (vec![0f32; n], vec![0f32; n]);
            (k.dequantize)(&w, &mut d1);
            (s.dequantize)(&w, &mut d2);
            assert!(d1.iter().zip(&d2).all(|(a, b)| a.to_bits() == b.to_bits()), "{isa} {ty}");
        }
        println!("{isa}: worst dot_f32 error {worst:.2} u*S");
    }
    assert!(checked > 0);
}

#[test]
fn vec_dot_of_every_family_is_bit_identical_to_scalar() {
    let mut rng = Rng::new(12);
    for isa in families() {
        let mut simd = Vec::new();
        for ty in SUPPORTED {
            let (k, s) = (kernels_for_isa(isa, ty).unwrap(), scalar_kernels(ty).unwrap());
            if k.vec_dot_isa != "scalar" {
                simd.push(ty.name());
            }
            for (case, n) in lengths(ty).into_iter().enumerate() {
                let w = random_row(ty, n, &mut rng);
                let x: Vec<f32> =
                    rng.vec(n).iter().map(|v| v * [1.0, 1e-3, 50.0][case % 3]).collect();
                let mut a = vec![0u8; k.vec_dot_type.row_bytes(n).unwrap()];
                (k.quantize)(&x, &mut a);
                let mut a_ref = vec![0u8; a.len()];
                (s.quantize)(&x, &mut a_ref);
                assert_eq!(a, a_ref, "{isa} {ty} quantize");
                let raw = random_row(k.vec_dot_type, n, &mut rng);
                for a in [&a, &raw] {
                    let (wo, ao) = (case % 5, (case + 1) % 4);
                    let (wb, ab) = (at_offset(&w, wo), at_offset(a, ao));
                    let got = (k.vec_dot)(&wb[wo..], &ab[ao..]);
                    let want = (s.vec_dot)(&w, a);
                    assert_eq!(got.to_bits(), want.to_bits(), "{isa} {ty} n={n}: {got} vs {want}");
                }
                if n > ty.block_size() {
                    let bytes = k.vec_dot_type.row_bytes(n - ty.block_size()).unwrap();
                    let got = (k.vec_dot)(&w, &a[..bytes]);
                    assert_eq!(got.to_bits(), (s.vec_dot)(&w, &a[..bytes]).to_bits(), "{isa} {ty}");
                }
            }
        }
        println!("{isa}: SIMD vec_dot for {simd:?}");
    }
}

#[test]
fn the_selected_family_is_one_of_the_available_ones() {
    let sel = kt_quant::selected_isa();
    assert!(families().iter().any(|i| i.name() == sel), "{sel}");
    for ty in SUPPORTED {
        println!("{}", kt_quant::describe(ty).unwrap());
    }
}
