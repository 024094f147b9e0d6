//! Malformed calls give errors, never panics; unsupported formats are refused.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

mod common;

use common::Rng;
use kt_core::GgmlType;
use kt_quant::{kernels, QuantError, SUPPORTED};

#[test]
fn exactly_the_supported_formats_have_kernels() {
    for ty in GgmlType::ALL {
        assert_eq!(kernels(ty).is_some(), SUPPORTED.contains(&ty), "{ty}");
    }
    for ty in [GgmlType::IQ2_XXS, GgmlType::IQ1_S, GgmlType::TQ2_0, GgmlType::MXFP4, GgmlType::I8] {
        assert!(kernels(ty).is_none());
        let err = kt_quant::dequantize(ty, &[], 0).unwrap_err();
        assert!(matches!(err, QuantError::Unsupported { ty: t, .. } if t == ty), "{err}");
        assert!(kt_quant::dot_f32(ty, &[], &[]).is_err());
        assert!(kt_quant::vec_dot(ty, &[], &[]).is_err());
        assert!(kt_quant::vec_dot_type(ty).is_none());
    }
}

#[test]
fn vec_dot_types_are_ggmls() {
    use GgmlType::*;
    for (ty, vt) in [
        (F32, F32),
        (F16, F16),
        (BF16, BF16),
        (Q4_0, Q8_0),
        (Q5_0, Q8_0),
        (Q8_0, Q8_0),
        (IQ4_NL, Q8_0),
        (Q4_1, Q8_1),
        (Q5_1, Q8_1),
        (Q8_1, Q8_1),
        (Q2_K, Q8_K),
        (Q3_K, Q8_K),
        (Q4_K, Q8_K),
        (Q5_K, Q8_K),
        (Q6_K, Q8_K),
        (Q8_K, Q8_K),
        (IQ4_XS, Q8_K),
    ] {
        assert_eq!(kt_quant::vec_dot_type(ty), Some(vt), "{ty}");
    }
}

#[test]
fn dequantize_rejects_wrong_lengths() {
    let ty = GgmlType::Q4_K;
    let src = vec![0u8; 144 * 2];
    let mut dst = vec![0f32; 512];
    assert!(kt_quant::dequantize_row(ty, &src, &mut dst).is_ok());
    assert_eq!(
        kt_quant::dequantize_row(ty, &src[1..], &mut dst),
        Err(QuantError::Length { ty, what: "quantized row", expected: 288, actual: 287 })
    );
    assert_eq!(
        kt_quant::dequantize_row(ty, &src, &mut dst[..500]),
        Err(QuantError::PartialBlock { ty, n: 500, block: 256 })
    );
    assert!(kt_quant::dequantize_row(ty, &src, &mut dst[..256]).is_err());
    assert!(kt_quant::dequantize(ty, &src, 256).is_err());
    assert!(kt_quant::dequantize(ty, &src, 100).is_err());
    // A huge element count is refused before anything is allocated.
    let n = usize::MAX / 256 * 256;
    assert!(matches!(kt_quant::dequantize(ty, &src, n), Err(QuantError::Length { .. })));
    let (q8, n) = (GgmlType::Q8_0, usize::MAX / 32 * 32);
    assert_eq!(kt_quant::dequantize(q8, &src, n), Err(QuantError::TooLarge { ty: q8, n }));
    // Scalar formats: any element count, but bytes must match.
    assert!(kt_quant::dequantize(GgmlType::F16, &[0, 0, 0], 1).is_err());
    assert_eq!(kt_quant::dequantize(GgmlType::F16, &[0, 0x3c], 1).unwrap(), [1.0]);
    assert_eq!(kt_quant::dequantize(GgmlType::Q8_0, &[], 0).unwrap(), Vec::<f32>::new());
}

#[test]
fn dot_f32_rejects_wrong_lengths() {
    let w = vec![0u8; 34 * 4];
    let x = vec![1f32; 128];
    assert_eq!(kt_quant::dot_f32(GgmlType::Q8_0, &w, &x), Ok(0.0));
    assert!(kt_quant::dot_f32(GgmlType::Q8_0, &w, &x[..96]).is_err());
    assert!(kt_quant::dot_f32(GgmlType::Q8_0, &w, &x[..100]).is_err());
    assert!(kt_quant::dot_f32(GgmlType::Q8_0, &w[..135], &x).is_err());
}

#[test]
fn quantize_row_rejects_weight_formats_and_wrong_lengths() {
    let x = vec![0.5f32; 256];
    let mut out = vec![0u8; 292];
    assert!(kt_quant::quantize_row(GgmlType::Q8_K, &x, &mut out).is_ok());
    assert_eq!(
        kt_quant::quantize_row(GgmlType::Q4_K, &x, &mut out),
        Err(QuantError::Unsupported { ty: GgmlType::Q4_K, op: "quantize_row" })
    );
    assert!(kt_quant::quantize_row(GgmlType::IQ2_XXS, &x, &mut out).is_err());
    assert!(kt_quant::quantize_row(GgmlType::Q8_K, &x, &mut out[..291]).is_err());
    assert!(kt_quant::quantize_row(GgmlType::Q8_K, &x[..255], &mut out).is_err());
    assert!(kt_quant::quantize_row(GgmlType::Q8_0, &x, &mut out).is_err());
    assert!(kt_quant::quantize_for_vec_dot(GgmlType::Q4_0, &x[..31]).is_err());
}

#[test]
fn vec_dot_rejects_wrong_lengths() {
    let ty = GgmlType::Q4_0;
    let w = vec![0u8; 18 * 2];
    let a = kt_quant::quantize_for_vec_dot(ty, &[1.0; 64]).unwrap();
    assert_eq!(kt_quant::vec_dot(ty, &w, &a), Ok(0.0));
    assert_eq!(
        kt_quant::vec_dot(ty, &w[..35], &a),
        Err(QuantError::PartialBlockBytes { ty, bytes: 35, block_bytes: 18 })
    );
    assert_eq!(
        kt_quant::vec_dot(ty, &w, &a[..34]),
        Err(QuantError::Length {
            ty: GgmlType::Q8_0,
            what: "activation row",
            expected: 68,
            actual: 34
        })
    );
}

/// The raw kernel tables do not check lengths, but must not panic either: they process the
/// whole blocks both operands have.
#[test]
fn raw_kernels_tolerate_any_lengths() {
    let mut rng = Rng::new(9);
    let bytes: Vec<u8> = (0..4096).map(|_| rng.next_u64() as u8).collect();
    let floats: Vec<f32> = rng.vec(2048);
    for ty in SUPPORTED {
        let k = kernels(ty).unwrap();
        for _ in 0..50 {
            let (nb, nf) = ((rng.next_u64() % 1200) as usize, (rng.next_u64() % 600) as usize);
            let mut out = vec![0f32; nf];
            (k.dequantize)(&bytes[..nb], &mut out);
            let _ = (k.dot_f32)(&bytes[..nb], &floats[..nf]);
            let na = (rng.next_u64() % 1200) as usize;
            let _ = (k.vec_dot)(&bytes[..nb], &bytes[2000..2000 + na]);
            let mut q = vec![0u8; nb];
            (k.quantize)(&floats[..nf], &mut q);
        }
    }
}

#[test]
fn errors_read_well() {
    let e = kt_quant::dequantize(GgmlType::IQ2_XXS, &[], 0).unwrap_err();
    assert_eq!(e.to_string(), "dequantize is not supported for iq2_xxs");
    let e = kt_quant::dot_f32(GgmlType::Q8_0, &[0; 33], &[0.0; 32]).unwrap_err();
    assert_eq!(e.to_string(), "quantized row has length 33, expected 34 (q8_0)");
}
