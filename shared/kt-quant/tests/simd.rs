//! Every kernel family this CPU has (`Isa::available`: scalar, AVX2, AVX-512, VNNI) against the
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
//! * `vec_dot`: AVX2 and AVX-512 bit-identical to the scalar kernels (the integer sums are
//!   exact and kept in ggml's lanes; the f32 operations are ggml's, in its order), on quantized
//!   activations and on raw random activation bytes (-128 included); `vnni` within a stated
//!   bound of the exact product (see `vec_dot_of_every_family_matches_scalar`).
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

/// A Q8_K row's `bsums` recomputed from its quants (random bytes have arbitrary ones; every
/// quantizer writes the sums, which the `vnni` K-quant kernels rely on).
fn fix_bsums(ty: GgmlType, row: &mut [u8]) {
    if ty != GgmlType::Q8_K {
        return;
    }
    for blk in row.chunks_exact_mut(292) {
        for g in 0..16 {
            let s: i16 = blk[4 + 16 * g..20 + 16 * g].iter().map(|&q| q as i8 as i16).sum();
            blk[260 + 2 * g..262 + 2 * g].copy_from_slice(&s.to_le_bytes());
        }
    }
}

/// The exact (f64) product of the dequantized operands and the magnitude the f32 error of a
/// block-scaled `vec_dot` is measured against: `Σ_i |w_i a_i|`, where for formats with
/// several scale fields (`d` and `dmin`) each field's part of `w_i` counts separately (their
/// products with the integer sums are rounded separately and may cancel).
fn exact_and_magnitude(ty: GgmlType, w: &[u8], a: &[u8], n: usize) -> (f64, f64) {
    let (s, at) = (scalar_kernels(ty).unwrap(), scalar_kernels(ty).unwrap().vec_dot_type);
    let mut af = vec![0f32; n];
    (scalar_kernels(at).unwrap().dequantize)(a, &mut af);
    let mut wf = vec![0f32; n];
    (s.dequantize)(w, &mut wf);
    let exact: f64 = wf.iter().zip(&af).map(|(w, a)| *w as f64 * *a as f64).sum();
    let (fields, _) = scale_fields(ty);
    let mut mag = 0f64;
    let parts: Vec<Vec<u8>> = if fields.len() < 2 {
        vec![w.to_vec()]
    } else {
        fields
            .iter()
            .map(|&keep| {
                let mut c = w.to_vec();
                for blk in c.chunks_exact_mut(ty.type_size()) {
                    for &f in fields.iter().filter(|&&f| f != keep) {
                        blk[f..f + 2].fill(0);
                    }
                }
                c
            })
            .collect()
    };
    for part in parts {
        (s.dequantize)(&part, &mut wf);
        mag += wf.iter().zip(&af).map(|(w, a)| (*w as f64 * *a as f64).abs()).sum::<f64>();
    }
    (exact, mag)
}

/// `vec_dot`: the AVX2/AVX-512 families are bit-identical to scalar; the `vnni` kernels keep
/// exact integer sums but scale and add them in f32 in their own order (16 FMA lanes, block
/// by block), so both they and the scalar kernels must lie within `(blocks + 16) · 4u · S` of
/// the exact product of the dequantized operands (S: [`exact_and_magnitude`]); BF16 (VDPBF16PS
/// adds pairs of exact bf16 products in f32): `(n / 32 + 8) · 2u · Σ|w_i a_i|`.
#[test]
fn vec_dot_of_every_family_matches_scalar() {
    let mut rng = Rng::new(12);
    for isa in families() {
        let mut simd = Vec::new();
        let mut worst = 0f64;
        for ty in SUPPORTED {
            let (k, s) = (kernels_for_isa(isa, ty).unwrap(), scalar_kernels(ty).unwrap());
            let exact_bits = k.vec_dot_isa != "vnni";
            if k.vec_dot_isa != "scalar" {
                simd.push(format!("{}={}", ty.name(), k.vec_dot_isa));
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
                let mut raw = random_row(k.vec_dot_type, n, &mut rng);
                if !exact_bits {
                    fix_bsums(k.vec_dot_type, &mut raw);
                }
                for a in [&a, &raw] {
                    let (wo, ao) = (case % 5, (case + 1) % 4);
                    let (wb, ab) = (at_offset(&w, wo), at_offset(a, ao));
                    let got = (k.vec_dot)(&wb[wo..], &ab[ao..]);
                    let want = (s.vec_dot)(&w, a);
                    if exact_bits {
                        assert_eq!(
                            got.to_bits(),
                            want.to_bits(),
                            "{isa} {ty} n={n}: {got} vs {want}"
                        );
                        continue;
                    }
                    let (exact, mag) = exact_and_magnitude(ty, &w, a, n);
                    let blocks = (n / ty.block_size()) as f64;
                    let tol = if ty.block_size() == 1 {
                        (n / 32 + 8) as f64 * 2.0 * U * mag
                    } else {
                        (blocks + 16.0) * 4.0 * U * mag
                    } + 1e-30;
                    for (who, v) in [("kernel", got), ("scalar", want)] {
                        let err = (v as f64 - exact).abs();
                        assert!(
                            err <= tol,
                            "{isa} {ty} n={n} {who}: {v} vs {exact} (err {err:e}, tol {tol:e})"
                        );
                    }
                    worst = worst.max((got as f64 - exact).abs() / (U * mag).max(1e-300));
                }
                if n > ty.block_size() {
                    let bytes = k.vec_dot_type.row_bytes(n - ty.block_size()).unwrap();
                    let got = (k.vec_dot)(&w, &a[..bytes]);
                    let want = (s.vec_dot)(&w, &a[..bytes]);
                    if exact_bits {
                        assert_eq!(got.to_bits(), want.to_bits(), "{isa} {ty}");
                    } else {
                        let scale = want.abs().max(got.abs()).max(1e-30);
                        assert!((got - want).abs() <= 1e-3 * scale + 1e-6, "{isa} {ty}");
                    }
                }
            }
        }
        println!("{isa}: SIMD vec_dot for {simd:?}; worst vnni error {worst:.2} u*S");
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
