//! `Kernels::vec_dot_tile` (several weight rows × several activation rows per call) against
//! `vec_dot` called pair by pair, for every kernel family this CPU has and every supported
//! format: the results must be **bit-identical** (the multi-token kernels do each pair's
//! integer and f32 operations in the single-row kernel's order; the other formats loop over
//! `vec_dot`). Token counts 1..=19 cover every register-block size (8, 4, 2, 1) and their
//! remainders; rows 1..=5 and 16; an output stride larger than the row count; unaligned
//! operands; and inconsistent arguments, which must not panic.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Rng;
use half::f16;
use kt_core::GgmlType;
use kt_quant::{kernels_for_isa, Isa, SUPPORTED};

/// Offsets of the f16 scale fields of a block format.
fn f16_fields(ty: GgmlType) -> &'static [usize] {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 | GgmlType::IQ4_NL | GgmlType::IQ4_XS => {
            &[0]
        }
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q8_1 => &[0, 2],
        GgmlType::Q2_K => &[80, 82],
        GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
        GgmlType::Q6_K => &[208],
        GgmlType::Q3_K => &[108],
        _ => &[],
    }
}

/// `rows` random weight rows of `n` elements of `ty` with finite scales.
fn weights(ty: GgmlType, n: usize, rows: usize, rng: &mut Rng) -> Vec<u8> {
    let bytes = ty.row_bytes(n).unwrap() * rows;
    if matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::Q8_K) {
        let k = kernels_for_isa(Isa::Scalar, ty).unwrap();
        let x: Vec<f32> = rng.vec(n * rows);
        let mut out = vec![0u8; bytes];
        let rb = ty.row_bytes(n).unwrap();
        for (xr, o) in x.chunks_exact(n).zip(out.chunks_exact_mut(rb)) {
            (k.quantize)(xr, o);
        }
        return out;
    }
    let mut out: Vec<u8> = (0..bytes).map(|_| rng.next_u64() as u8).collect();
    for blk in out.chunks_exact_mut(ty.type_size()) {
        for &at in f16_fields(ty) {
            let v = f16::from_f32(rng.vec(1)[0] * 0.2);
            blk[at..at + 2].copy_from_slice(&v.to_bits().to_le_bytes());
        }
    }
    out
}

/// Every pair of `vec_dot_tile(w, a)` (with output stride `ldo`) equals `vec_dot` bit for
/// bit; slots outside the rows are untouched.
fn check(
    k: &kt_quant::Kernels,
    w: &[u8],
    wrb: usize,
    a: &[u8],
    arb: usize,
    ldo: usize,
    what: &str,
) {
    let (rows, tokens) = (w.len() / wrb, a.len() / arb);
    let mut out = vec![f32::NAN; (tokens.max(1) - 1) * ldo + rows];
    k.vec_dot_tile(w, wrb, a, arb, &mut out, ldo);
    for t in 0..tokens {
        for r in 0..rows {
            let want = (k.vec_dot)(&w[r * wrb..(r + 1) * wrb], &a[t * arb..(t + 1) * arb]);
            let got = out[t * ldo + r];
            assert_eq!(got.to_bits(), want.to_bits(), "{what} row {r} token {t}: {got} vs {want}");
        }
        if t + 1 < tokens {
            assert!(out[t * ldo + rows..(t + 1) * ldo].iter().all(|v| v.is_nan()), "{what}");
        }
    }
}

#[test]
fn vec_dot_tile_is_bit_identical_to_vec_dot() {
    let mut rng = Rng::new(61);
    let mut tiled = Vec::new();
    for isa in Isa::ALL.into_iter().filter(|i| i.available()) {
        for ty in SUPPORTED {
            let k = kernels_for_isa(isa, ty).unwrap();
            if k.has_vec_dot_tile() {
                tiled.push(format!("{isa}:{ty}"));
            }
            let blocks: &[usize] = if ty.block_size() == 1 { &[64, 96] } else { &[1, 2, 3, 8] };
            for &nbk in blocks {
                let n = nbk * ty.block_size();
                let (wrb, arb) = (ty.row_bytes(n).unwrap(), k.vec_dot_type.row_bytes(n).unwrap());
                for (rows, tokens) in [(1, 1), (3, 19), (16, 8), (5, 11), (2, 7), (4, 3)] {
                    let w = weights(ty, n, rows, &mut rng);
                    let x: Vec<f32> = rng.vec(n * tokens).iter().map(|v| v * 3.0).collect();
                    let mut a = vec![0u8; arb * tokens];
                    for (xr, o) in x.chunks_exact(n).zip(a.chunks_exact_mut(arb)) {
                        (k.quantize)(xr, o);
                    }
                    let what = format!("{isa} {ty} n={n} rows={rows} tokens={tokens}");
                    check(k, &w, wrb, &a, arb, rows, &what);
                    check(k, &w, wrb, &a, arb, rows + 3, &format!("{what} ldo+3"));
                    // Unaligned operands.
                    let mut wu = vec![0u8; 3];
                    wu.extend_from_slice(&w);
                    let mut au = vec![0u8; 5];
                    au.extend_from_slice(&a);
                    check(k, &wu[3..], wrb, &au[5..], arb, rows, &format!("{what} unaligned"));
                }
            }
        }
    }
    println!("families with their own tile kernels: {tiled:?}");
}

#[test]
fn vec_dot_tile_never_panics_on_inconsistent_arguments() {
    let mut rng = Rng::new(7);
    for isa in Isa::ALL.into_iter().filter(|i| i.available()) {
        for ty in [GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q5_0] {
            let k = kernels_for_isa(isa, ty).unwrap();
            let n = 512;
            let (wrb, arb) = (ty.row_bytes(n).unwrap(), k.vec_dot_type.row_bytes(n).unwrap());
            let w = weights(ty, n, 4, &mut rng);
            let x = rng.vec(n * 3);
            let mut a = vec![0u8; arb * 3];
            for (xr, o) in x.chunks_exact(n).zip(a.chunks_exact_mut(arb)) {
                (k.quantize)(xr, o);
            }
            let mut out = vec![0f32; 12];
            k.vec_dot_tile(&w, 0, &a, arb, &mut out, 4);
            k.vec_dot_tile(&w, wrb, &a, 0, &mut out, 4);
            k.vec_dot_tile(&w, wrb, &a, arb, &mut out, 0);
            k.vec_dot_tile(&w, wrb, &a, arb, &mut out[..5], 4);
            k.vec_dot_tile(&w, wrb, &a, arb, &mut out[..3], 4);
            // Rows of different block counts: only whole blocks of both, like vec_dot.
            k.vec_dot_tile(&w, wrb, &a, arb - k.vec_dot_type.type_size(), &mut out, 4);
            k.vec_dot_tile(&w[..wrb * 2 - 1], wrb, &a[..arb + 7], arb, &mut out, 4);
            // Too short an output: only the tokens that fit are written.
            let mut short = vec![f32::NAN; 4 + 2];
            k.vec_dot_tile(&w, wrb, &a, arb, &mut short, 4);
            assert!(short[..4].iter().all(|v| v.is_finite()), "{isa} {ty}");
            assert!(short[4..].iter().all(|v| v.is_nan()), "{isa} {ty}");
        }
    }
}
