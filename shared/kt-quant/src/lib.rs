//! GGML block formats: block layouts, scalar dequantizers and dot products, and the seam where
//! SIMD kernels plug in.
//!
//! Supported formats: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K, Q3_K, Q4_K, Q5_K,
//! Q6_K, Q8_K, IQ4_NL, IQ4_XS ([`blocks`] describes each layout). For each there is
//!
//! * a `#[repr(C)]` block struct with ggml's exact layout ([`blocks`]; F32/F16/BF16 are plain
//!   little-endian scalars);
//! * a dequantizer bit-exact with ggml's `dequantize_row_*`;
//! * `dot_f32`: quantized row · f32 vector, what kt's CPU reference backend uses;
//! * `vec_dot`: quantized row · activations quantized to the format's `vec_dot_type` (Q8_0,
//!   Q8_1, Q8_K, F16, BF16 or F32), reproducing ggml's scalar integer arithmetic, plus the
//!   activation quantizers (`quantize_row_*_ref`).
//!
//! Kernels are reached through [`kernels()`], a table of function pointers per format chosen once
//! at run time (see [`mod@kernels`]). The functions in this module are checked wrappers: they
//! validate every length and return [`QuantError`] instead of panicking.
//!
//! Correctness is pinned bit for bit by committed fixtures: dequantization and the Q8_0, F16 and
//! BF16 quantizers against the `gguf` Python package (`tests/fixtures/quant/gen_vectors.py`;
//! Q8_1 and Q8_K, which gguf lacks, against their definition), and `vec_dot` plus all activation
//! quantizers against ggml's own C kernels (`tests/fixtures/quant/ggml_vec_dot.c`).
//!
//! The crate has no `unsafe` code (`deny(unsafe_code)`) outside the x86-64 SIMD modules
//! (`kernels/avx2.rs`, `kernels/avx512.rs`): blocks are parsed field by field from byte slices at
//! any alignment. The SIMD family is chosen at run time; `KT_ISA=scalar|avx2|avx512` forces a
//! lower one (see [`mod@kernels`]).

#![deny(unsafe_code)]

pub mod blocks;
mod error;
pub mod kernels;
pub mod packed;

pub use blocks::Block;
pub use error::QuantError;
pub use kernels::{
    describe, isa_note, kernels, kernels_for_isa, prefetch_distance, scalar_kernels, selected,
    selected_isa, Isa, Kernels,
};

/// Activation quantizer for `ty` (a `vec_dot_type`) as llama.cpp's CPU backend runs it on
/// x86, for reproducing llama.cpp's numbers: its SIMD Q8_0/Q8_1 quantizers round differently
/// from the reference ones (`quantize_row`), while its Q8_K, F16 and BF16 ones do not.
pub fn ggml_x86_quantize(ty: GgmlType) -> Option<kernels::QuantizeFn> {
    match ty {
        GgmlType::Q8_0 => Some(kernels::scalar::quantize_q8_0_x86),
        GgmlType::Q8_1 => Some(kernels::scalar::quantize_q8_1_x86),
        _ => kernels(ty).map(|k| k.quantize),
    }
}

use kt_core::GgmlType;

/// Result of the checked entry points.
pub type Result<T, E = QuantError> = std::result::Result<T, E>;

/// Every format kt can compute with, in GGUF id order.
pub const SUPPORTED: [GgmlType; 17] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q8_1,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::Q8_K,
    GgmlType::IQ4_NL,
    GgmlType::IQ4_XS,
    GgmlType::BF16,
];

/// The format activations are quantized to for [`vec_dot`] with weights of type `ty`.
pub fn vec_dot_type(ty: GgmlType) -> Option<GgmlType> {
    kernels(ty).map(|k| k.vec_dot_type)
}

fn kernels_for(ty: GgmlType, op: &'static str) -> Result<&'static Kernels> {
    kernels(ty).ok_or(QuantError::Unsupported { ty, op })
}

/// Bytes of `n` elements of `ty`.
fn bytes_of(ty: GgmlType, n: usize) -> Result<usize> {
    let block = ty.block_size();
    if !n.is_multiple_of(block) {
        return Err(QuantError::PartialBlock { ty, n, block });
    }
    ty.row_bytes(n).ok_or(QuantError::TooLarge { ty, n })
}

/// Elements held by `bytes` bytes of `ty`.
fn elems_of(ty: GgmlType, bytes: usize) -> Result<usize> {
    let block_bytes = ty.type_size();
    if !bytes.is_multiple_of(block_bytes) {
        return Err(QuantError::PartialBlockBytes { ty, bytes, block_bytes });
    }
    (bytes / block_bytes)
        .checked_mul(ty.block_size())
        .ok_or(QuantError::TooLarge { ty, n: usize::MAX })
}

fn expect_len(ty: GgmlType, what: &'static str, expected: usize, actual: usize) -> Result<()> {
    if expected == actual {
        Ok(())
    } else {
        Err(QuantError::Length { ty, what, expected, actual })
    }
}

/// Dequantizes one row: `src` holds exactly `dst.len()` elements of `ty`.
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<()> {
    let k = kernels_for(ty, "dequantize")?;
    expect_len(ty, "quantized row", bytes_of(ty, dst.len())?, src.len())?;
    (k.dequantize)(src, dst);
    Ok(())
}

/// Dequantizes a whole tensor of `n` elements stored contiguously in `src`. The length is
/// checked before anything is allocated.
pub fn dequantize(ty: GgmlType, src: &[u8], n: usize) -> Result<Vec<f32>> {
    let k = kernels_for(ty, "dequantize")?;
    expect_len(ty, "quantized tensor", bytes_of(ty, n)?, src.len())?;
    let mut out = vec![0f32; n];
    (k.dequantize)(src, &mut out);
    Ok(out)
}

/// Dot product of one quantized row (`src`, `x.len()` elements of `ty`) with f32 activations.
pub fn dot_f32(ty: GgmlType, src: &[u8], x: &[f32]) -> Result<f32> {
    let k = kernels_for(ty, "dot_f32")?;
    expect_len(ty, "quantized row", bytes_of(ty, x.len())?, src.len())?;
    Ok((k.dot_f32)(src, x))
}

/// Quantizes f32 values to an activation format (F32, F16, BF16, Q8_0, Q8_1 or Q8_K) with
/// ggml's reference rounding; `dst` must hold exactly `x.len()` elements of `ty`.
pub fn quantize_row(ty: GgmlType, x: &[f32], dst: &mut [u8]) -> Result<()> {
    let k = kernels_for(ty, "quantize_row")?;
    if k.vec_dot_type != ty {
        return Err(QuantError::Unsupported { ty, op: "quantize_row" });
    }
    expect_len(ty, "output row", bytes_of(ty, x.len())?, dst.len())?;
    (k.quantize)(x, dst);
    Ok(())
}

/// Quantizes f32 activations to the `vec_dot_type` of weights of type `ty`, ready for
/// [`vec_dot`].
pub fn quantize_for_vec_dot(ty: GgmlType, x: &[f32]) -> Result<Vec<u8>> {
    let k = kernels_for(ty, "vec_dot")?;
    let mut out = vec![0u8; bytes_of(k.vec_dot_type, x.len())?];
    (k.quantize)(x, &mut out);
    Ok(out)
}

/// ggml-style dot product: weight row `w` of type `ty` with activation row `a` in
/// [`vec_dot_type`]`(ty)` holding the same number of elements.
pub fn vec_dot(ty: GgmlType, w: &[u8], a: &[u8]) -> Result<f32> {
    let k = kernels_for(ty, "vec_dot")?;
    let n = elems_of(ty, w.len())?;
    expect_len(k.vec_dot_type, "activation row", bytes_of(k.vec_dot_type, n)?, a.len())?;
    Ok((k.vec_dot)(w, a))
}
