//! The kernel seam: one table of plain function pointers per block format, chosen once at run
//! time.
//!
//! [`kernels`] returns the table for a format. Today only the scalar tables exist
//! ([`scalar_kernels`]); they are the bit-exact reference. A SIMD implementation slots in as a
//! sibling module (`avx2.rs`, `avx512.rs`) exporting its own `table(ty) -> Option<&'static
//! Kernels>` that returns `None` (or falls back to the scalar entry) for formats it does not
//! cover, and the private `select` picks it once, on first use:
//!
//! ```text
//! fn select() -> Table {
//!     #[cfg(target_arch = "x86_64")]
//!     if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
//!         return avx2::table;
//!     }
//!     scalar::table
//! }
//! ```
//!
//! Binaries are never built with `-C target-cpu=native`; the SIMD module compiles its functions
//! with `#[target_feature(enable = "avx2,fma")]` and wraps each in a safe function pointer that
//! is only handed out after detection succeeded (that `unsafe` call, with its `// SAFETY:`
//! line, lives in the SIMD module and nowhere else; the crate denies `unsafe_code` elsewhere).
//! Its tests compare every entry against [`scalar_kernels`] on the same inputs: `dequantize` and
//! `vec_dot` bit for bit where the SIMD code keeps ggml's operation order, `dot_f32` within the
//! summation tolerance.
//!
//! Table entries take whole rows and never panic, whatever the lengths; on mismatched lengths
//! they process only the whole blocks present in both operands. The checked wrappers in the
//! crate root ([`crate::dequantize_row`], [`crate::vec_dot`], ...) validate lengths first.

use std::sync::OnceLock;

use kt_core::GgmlType;

use crate::blocks::*;

pub(crate) mod scalar;

/// Expands one quantized row (`src`, whole blocks) into f32 values (`dst`).
pub type DequantizeFn = fn(src: &[u8], dst: &mut [f32]);
/// Dot product of one quantized row with f32 activations of the same length.
pub type DotF32Fn = fn(src: &[u8], x: &[f32]) -> f32;
/// Dot product of one quantized weight row with an activation row in `vec_dot_type`.
pub type VecDotFn = fn(w: &[u8], a: &[u8]) -> f32;
/// Quantizes f32 activations into the `vec_dot_type` of the table's format.
pub type QuantizeFn = fn(x: &[f32], dst: &mut [u8]);

/// The kernels of one block format.
#[derive(Debug)]
pub struct Kernels {
    /// The weight format these kernels read.
    pub ty: GgmlType,
    /// The format activations must be in for [`Kernels::vec_dot`] (ggml's `vec_dot_type`).
    pub vec_dot_type: GgmlType,
    /// Which implementation this is (`"scalar"`, later `"avx2"`, ...), for logs and benches.
    pub isa: &'static str,
    /// Row to f32 (ggml's `to_float`).
    pub dequantize: DequantizeFn,
    /// Row · f32 vector, accumulated in f32 block by block. The exact summation order is not
    /// part of the contract (SIMD tables may differ in the last bits).
    pub dot_f32: DotF32Fn,
    /// Row · activation row in `vec_dot_type`, with ggml's integer arithmetic.
    pub vec_dot: VecDotFn,
    /// f32 activations → `vec_dot_type` (ggml's `from_float` of the vec-dot type). For the
    /// activation formats (F32, F16, BF16, Q8_0, Q8_1, Q8_K) `vec_dot_type == ty`, so this is
    /// their `quantize_row`.
    pub quantize: QuantizeFn,
}

/// A kernel table lookup, as chosen by [`select`].
type Table = fn(GgmlType) -> Option<&'static Kernels>;

static SELECTED: OnceLock<Table> = OnceLock::new();

/// The best kernels for `ty` on this CPU, or `None` when kt cannot compute with `ty`
/// (IQ2_XXS, IQ1_S, TQ1_0, MXFP4, integer types, ...). The choice is made once per process.
pub fn kernels(ty: GgmlType) -> Option<&'static Kernels> {
    (SELECTED.get_or_init(select))(ty)
}

/// The scalar reference kernels for `ty`, whatever the CPU offers.
pub fn scalar_kernels(ty: GgmlType) -> Option<&'static Kernels> {
    scalar_table(ty)
}

/// Picks the kernel family for this CPU. Only the scalar family exists today.
fn select() -> Table {
    scalar_table
}

macro_rules! scalar_tables {
    ($( $ty:ident => $vdt:ident, $deq:expr, $dot:expr, $vec_dot:expr, $quant:expr; )*) => {
        #[allow(non_upper_case_globals)]
        mod tables {
            use super::*;
            $(
                pub(super) static $ty: Kernels = Kernels {
                    ty: GgmlType::$ty,
                    vec_dot_type: GgmlType::$vdt,
                    isa: "scalar",
                    dequantize: $deq,
                    dot_f32: $dot,
                    vec_dot: $vec_dot,
                    quantize: $quant,
                };
            )*
        }

        fn scalar_table(ty: GgmlType) -> Option<&'static Kernels> {
            match ty {
                $( GgmlType::$ty => Some(&tables::$ty), )*
                _ => None,
            }
        }
    };
}

use scalar::{
    dequantize_row as deq, dequantize_scalar, dot_f32_row as dot, dot_f32_scalar, quantize_q8_0,
    quantize_q8_1, quantize_q8_k, quantize_scalar, vec_dot_scalar, BF16, F16, F32,
};

scalar_tables! {
    F32 => F32, dequantize_scalar::<F32>, dot_f32_scalar::<F32>, vec_dot_scalar::<F32>,
        quantize_scalar::<F32>;
    F16 => F16, dequantize_scalar::<F16>, dot_f32_scalar::<F16>, vec_dot_scalar::<F16>,
        quantize_scalar::<F16>;
    BF16 => BF16, dequantize_scalar::<BF16>, dot_f32_scalar::<BF16>, vec_dot_scalar::<BF16>,
        quantize_scalar::<BF16>;
    Q4_0 => Q8_0, deq::<BlockQ4_0>, dot::<BlockQ4_0>, scalar::vec_dot_q4_0_q8_0, quantize_q8_0;
    Q4_1 => Q8_1, deq::<BlockQ4_1>, dot::<BlockQ4_1>, scalar::vec_dot_q4_1_q8_1, quantize_q8_1;
    Q5_0 => Q8_0, deq::<BlockQ5_0>, dot::<BlockQ5_0>, scalar::vec_dot_q5_0_q8_0, quantize_q8_0;
    Q5_1 => Q8_1, deq::<BlockQ5_1>, dot::<BlockQ5_1>, scalar::vec_dot_q5_1_q8_1, quantize_q8_1;
    Q8_0 => Q8_0, deq::<BlockQ8_0>, dot::<BlockQ8_0>, scalar::vec_dot_q8_0_q8_0, quantize_q8_0;
    Q8_1 => Q8_1, deq::<BlockQ8_1>, dot::<BlockQ8_1>, scalar::vec_dot_q8_1_q8_1, quantize_q8_1;
    Q2_K => Q8_K, deq::<BlockQ2_K>, dot::<BlockQ2_K>, scalar::vec_dot_q2_k_q8_k, quantize_q8_k;
    Q3_K => Q8_K, deq::<BlockQ3_K>, dot::<BlockQ3_K>, scalar::vec_dot_q3_k_q8_k, quantize_q8_k;
    Q4_K => Q8_K, deq::<BlockQ4_K>, dot::<BlockQ4_K>, scalar::vec_dot_q4_k_q8_k, quantize_q8_k;
    Q5_K => Q8_K, deq::<BlockQ5_K>, dot::<BlockQ5_K>, scalar::vec_dot_q5_k_q8_k, quantize_q8_k;
    Q6_K => Q8_K, deq::<BlockQ6_K>, dot::<BlockQ6_K>, scalar::vec_dot_q6_k_q8_k, quantize_q8_k;
    Q8_K => Q8_K, deq::<BlockQ8_K>, dot::<BlockQ8_K>, scalar::vec_dot_q8_k_q8_k, quantize_q8_k;
    IQ4_NL => Q8_0, deq::<BlockIQ4_NL>, dot::<BlockIQ4_NL>, scalar::vec_dot_iq4_nl_q8_0,
        quantize_q8_0;
    IQ4_XS => Q8_K, deq::<BlockIQ4_XS>, dot::<BlockIQ4_XS>, scalar::vec_dot_iq4_xs_q8_k,
        quantize_q8_k;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_consistent() {
        for ty in GgmlType::ALL {
            let Some(k) = kernels(ty) else { continue };
            assert_eq!(k.ty, ty);
            let v = kernels(k.vec_dot_type).expect("vec_dot_type has kernels");
            // Activation formats quantize to themselves.
            assert_eq!(v.vec_dot_type, k.vec_dot_type, "{ty}");
            let x: Vec<f32> = (0..512).map(|i| (i as f32 * 0.37).sin()).collect();
            let n = k.vec_dot_type.row_bytes(x.len()).unwrap();
            let (mut a, mut b) = (vec![0u8; n], vec![1u8; n]);
            (k.quantize)(&x, &mut a);
            (v.quantize)(&x, &mut b);
            assert_eq!(a, b, "{ty}");
        }
    }
}
