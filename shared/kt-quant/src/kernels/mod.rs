//! The kernel seam: one table of plain function pointers per block format, chosen once at run
//! time.
//!
//! [`kernels`] returns the table for a format. These families exist:
//!
//! * `scalar` ([`scalar_kernels`]): the bit-exact reference, on every target;
//! * `avx2` (x86-64 with AVX2 + FMA + F16C): SIMD `dot_f32` for F32, F16, BF16, Q4_0, Q8_0,
//!   Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS and SIMD `vec_dot` for Q4_0/Q5_0/Q8_0·Q8_0, Q4_K·Q8_K,
//!   Q6_K·Q8_K;
//! * `avx512` (AVX-512 F + BW + VL, on top of the AVX2 set): 16-lane `dot_f32` for the same
//!   formats; its `vec_dot` entries are the AVX2 ones.
//! * `vnni` (AVX-512 + VNNI): the AVX-512 table with `VPDPBUSD` `vec_dot` for
//!   Q4_0/Q5_0/Q8_0·Q8_0,
//!   Q4_K/Q5_K/Q6_K/IQ4_XS·Q8_K, and `VDPBF16PS` BF16·BF16 where the CPU has AVX512_BF16.
//! * `amx` (VNNI + AMX-TILE/AMX-INT8, permission granted by the OS): the `vnni` table for the
//!   block formats; AMX itself serves the repacked `amx_int8` format ([`crate::packed`]).
//!
//! Every family's table covers all formats: entries without a SIMD version are the scalar
//! ones ([`Kernels::isa`] names the family of `dot_f32`, [`Kernels::vec_dot_isa`] that of
//! `vec_dot`; [`describe`] prints both). The family is chosen once per process, on first use:
//! the best one the CPU has, or the one the environment variable `KT_ISA` names
//! (`scalar`, `avx2`, `avx512`, `vnni`, `amx`). `KT_ISA` can only lower the choice: naming a
//! family the CPU lacks (or an unknown name) keeps the best available one and records a message
//! ([`isa_note`], also printed once to stderr).
//!
//! Binaries are never built with `-C target-cpu=native`: the SIMD modules compile their
//! functions with `#[target_feature(enable = ...)]` and wrap each in a plain function pointer
//! that is only handed out after `is_x86_feature_detected!` succeeded ([`kernels_for_isa`]
//! returns `None` for a family the CPU lacks); those `unsafe` calls, each with its
//! `// SAFETY:` line, live in the SIMD modules and nowhere else.
//!
//! Accuracy: `dequantize` and `quantize` of every family are bit-identical to the scalar ones,
//! and so are the AVX2/AVX-512 `vec_dot`s (they keep ggml's integer lanes and f32 operation
//! order); the `vnni` `vec_dot`s have exact integer sums but their own f32 order (tolerance
//! in `tests/simd.rs`, see `vnni.rs`);
//! `dot_f32` rebuilds each weight with the dequantizer's exact operations and differs only in
//! summation order and FMA (tolerance in `tests/simd.rs`).
//!
//! Table entries take whole rows and never panic, whatever the lengths; on mismatched lengths
//! they process only the whole blocks present in both operands. The checked wrappers in the
//! crate root ([`crate::dequantize_row`], [`crate::vec_dot`], ...) validate lengths first.

use std::sync::OnceLock;

use kt_core::GgmlType;

use crate::blocks::*;

#[cfg(target_arch = "x86_64")]
pub(crate) mod amx;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
pub(crate) mod scalar;
#[cfg(target_arch = "x86_64")]
mod vnni;

/// Expands one quantized row (`src`, whole blocks) into f32 values (`dst`).
pub type DequantizeFn = fn(src: &[u8], dst: &mut [f32]);
/// Dot product of one quantized row with f32 activations of the same length.
pub type DotF32Fn = fn(src: &[u8], x: &[f32]) -> f32;
/// Dot product of one quantized weight row with an activation row in `vec_dot_type`.
pub type VecDotFn = fn(w: &[u8], a: &[u8]) -> f32;
/// Quantizes f32 activations into the `vec_dot_type` of the table's format.
pub type QuantizeFn = fn(x: &[f32], dst: &mut [u8]);
/// A tile of `vec_dot`s: `w` holds `rows` weight rows of `w_row_bytes`, `a` holds `tokens`
/// activation rows of `a_row_bytes`; writes `out[t * ldo + r] = vec_dot(row r, row t)`. Called
/// only through [`Kernels::vec_dot_tile`], which has checked that `w_row_bytes` and
/// `a_row_bytes` are nonzero and hold the same number of whole blocks, `rows <= ldo` and that
/// `out` holds `(tokens - 1) * ldo + rows` values.
pub type VecDotTileFn =
    fn(w: &[u8], w_row_bytes: usize, a: &[u8], a_row_bytes: usize, out: &mut [f32], ldo: usize);

/// The kernels of one block format.
#[derive(Debug)]
pub struct Kernels {
    /// The weight format these kernels read.
    pub ty: GgmlType,
    /// The format activations must be in for [`Kernels::vec_dot`] (ggml's `vec_dot_type`).
    pub vec_dot_type: GgmlType,
    /// The family of [`Kernels::dot_f32`] (`"scalar"`, `"avx2"` or `"avx512"`; the `vnni`
    /// tables keep the AVX-512 `dot_f32`), for logs and
    /// benches.
    pub isa: &'static str,
    /// The family of [`Kernels::vec_dot`] (a SIMD table may keep the scalar one).
    pub vec_dot_isa: &'static str,
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
    /// A multi-row, multi-token `vec_dot` that unpacks each weight block once for several
    /// activation rows (register-blocked), where the family has one; reached through
    /// [`Kernels::vec_dot_tile`], which otherwise loops over [`Kernels::vec_dot`].
    pub(crate) vec_dot_tile: Option<VecDotTileFn>,
}

impl Kernels {
    /// Whether [`Kernels::vec_dot_tile`] has its own multi-token kernel here (rather than a
    /// loop over `vec_dot`).
    pub fn has_vec_dot_tile(&self) -> bool {
        self.vec_dot_tile.is_some()
    }

    /// `out[t * ldo + r] = (self.vec_dot)(w row r, a row t)` for every weight row `r` of `w`
    /// (rows of `w_row_bytes`) and activation row `t` of `a` (rows of `a_row_bytes`), i.e. a
    /// `[tokens × rows]` block of the product in token-major order with row stride `ldo`.
    ///
    /// Bit-identical to calling `vec_dot` per pair (the multi-token kernels do each pair's
    /// integer and f32 operations in the single-row kernel's order; `tests/tile.rs`). Never
    /// panics: with inconsistent arguments (zero row sizes, rows of different block counts,
    /// `ldo` < rows, `out` too short) it computes only the pairs whose rows and output slots
    /// are whole and leaves the rest of `out` as it was.
    pub fn vec_dot_tile(
        &self,
        w: &[u8],
        w_row_bytes: usize,
        a: &[u8],
        a_row_bytes: usize,
        out: &mut [f32],
        ldo: usize,
    ) {
        if w_row_bytes == 0 || a_row_bytes == 0 {
            return;
        }
        let rows = (w.len() / w_row_bytes).min(ldo);
        if rows == 0 || out.len() < rows {
            return;
        }
        let tokens = (a.len() / a_row_bytes).min((out.len() - rows) / ldo.max(1) + 1);
        let (w, a) = (&w[..rows * w_row_bytes], &a[..tokens * a_row_bytes]);
        let same_blocks = self.ty.block_size() > 0
            && self.vec_dot_type.block_size() > 0
            && w_row_bytes.is_multiple_of(self.ty.type_size())
            && a_row_bytes.is_multiple_of(self.vec_dot_type.type_size())
            && w_row_bytes / self.ty.type_size() * self.ty.block_size()
                == a_row_bytes / self.vec_dot_type.type_size() * self.vec_dot_type.block_size();
        match self.vec_dot_tile {
            Some(f) if same_blocks && tokens > 0 => f(w, w_row_bytes, a, a_row_bytes, out, ldo),
            _ => {
                for (t, at) in a.chunks_exact(a_row_bytes).enumerate() {
                    let o = &mut out[t * ldo..t * ldo + rows];
                    for (v, wr) in o.iter_mut().zip(w.chunks_exact(w_row_bytes)) {
                        *v = (self.vec_dot)(wr, at);
                    }
                }
            }
        }
    }
}

/// A kernel table lookup.
type Table = fn(GgmlType) -> Option<&'static Kernels>;

/// A kernel family, in increasing order of capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// The reference kernels, on every target.
    Scalar,
    /// x86-64 with AVX2, FMA and F16C.
    Avx2,
    /// x86-64 with AVX-512 F, BW and VL (and the AVX2 set).
    Avx512,
    /// AVX-512 plus VNNI (`VPDPBUSD`); its BF16 `vec_dot` also needs AVX512_BF16 and is the
    /// AVX-512 one without it.
    Vnni,
    /// VNNI plus AMX (AMX-TILE + AMX-INT8, with the OS's permission for tile data): the block
    /// formats keep the VNNI kernels; the `amx_int8` expert format ([`crate::packed`]) runs
    /// its multi-token products on AMX tiles.
    Amx,
}

impl Isa {
    /// Every family, lowest first.
    pub const ALL: [Isa; 5] = [Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Vnni, Isa::Amx];

    /// The name `KT_ISA` accepts and [`Kernels::isa`] reports.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Vnni => "vnni",
            Isa::Amx => "amx",
        }
    }

    /// Parses a `KT_ISA` value.
    pub fn from_name(name: &str) -> Option<Isa> {
        Isa::ALL.into_iter().find(|i| i.name() == name.trim().to_ascii_lowercase())
    }

    /// Whether this CPU can run the family (detected at run time).
    pub fn available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                Isa::Avx2.available()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Vnni => Isa::Avx512.available() && is_x86_feature_detected!("avx512vnni"),
            #[cfg(target_arch = "x86_64")]
            Isa::Amx => Isa::Vnni.available() && amx::usable(),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The best family this CPU has.
    pub fn best() -> Isa {
        Isa::ALL.into_iter().rev().find(|i| i.available()).unwrap_or(Isa::Scalar)
    }

    fn table(self) -> Table {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => avx2::table,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => avx512::table,
            #[cfg(target_arch = "x86_64")]
            Isa::Vnni | Isa::Amx => vnni::table,
            _ => scalar_table,
        }
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

struct Selection {
    isa: Isa,
    note: Option<String>,
}

static SELECTED: OnceLock<Selection> = OnceLock::new();

fn selection() -> &'static Selection {
    SELECTED.get_or_init(|| {
        let sel = select(std::env::var("KT_ISA").ok().as_deref());
        if let Some(note) = &sel.note {
            eprintln!("kt-quant: {note}");
        }
        sel
    })
}

/// The best kernels for `ty` on this CPU (or the family `KT_ISA` forces), or `None` when kt
/// cannot compute with `ty` (IQ2_XXS, IQ1_S, TQ1_0, MXFP4, integer types, ...). The choice is
/// made once per process.
pub fn kernels(ty: GgmlType) -> Option<&'static Kernels> {
    (selection().isa.table())(ty)
}

/// Default of [`prefetch_distance`].
pub const DEFAULT_PREFETCH_BYTES: usize = 1024;

/// How far ahead (bytes) the multi-token `vec_dot_tile` kernels prefetch the weight rows they
/// stream (software prefetch into L1, on top of the hardware prefetchers): the environment
/// variable `KT_PREFETCH` (bytes; `0` turns it off), else [`DEFAULT_PREFETCH_BYTES`]. Read
/// once per process.
pub fn prefetch_distance() -> usize {
    static D: OnceLock<usize> = OnceLock::new();
    *D.get_or_init(|| {
        std::env::var("KT_PREFETCH")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(DEFAULT_PREFETCH_BYTES)
            .min(1 << 16)
    })
}

/// The kernel family [`kernels`] uses (`"scalar"`, `"avx2"`, `"avx512"`, `"vnni"` or `"amx"`).
pub fn selected_isa() -> &'static str {
    selection().isa.name()
}

/// The kernel family [`kernels`] uses.
pub fn selected() -> Isa {
    selection().isa
}

/// Why the family differs from what `KT_ISA` asked for, if it does.
pub fn isa_note() -> Option<&'static str> {
    selection().note.as_deref()
}

/// One line for logs: the selected family's implementation of each entry of `ty`, e.g.
/// `q4_K: dot_f32=avx2 vec_dot=avx2 dequantize=scalar quantize=scalar`.
pub fn describe(ty: GgmlType) -> Option<String> {
    let k = kernels(ty)?;
    Some(format!(
        "{ty}: dot_f32={} vec_dot={} dequantize=scalar quantize=scalar",
        k.isa, k.vec_dot_isa
    ))
}

/// The scalar reference kernels for `ty`, whatever the CPU offers.
pub fn scalar_kernels(ty: GgmlType) -> Option<&'static Kernels> {
    scalar_table(ty)
}

/// The kernels of one family, or `None` when the CPU lacks it (or kt cannot compute with
/// `ty`): for tests and benchmarks that compare families.
pub fn kernels_for_isa(isa: Isa, ty: GgmlType) -> Option<&'static Kernels> {
    if isa.available() {
        (isa.table())(ty)
    } else {
        None
    }
}

/// Picks the family: the best available one, lowered to `forced` (a `KT_ISA` value).
fn select(forced: Option<&str>) -> Selection {
    let best = Isa::best();
    let Some(name) = forced.filter(|n| !n.trim().is_empty()) else {
        return Selection { isa: best, note: None };
    };
    match Isa::from_name(name) {
        Some(isa) if isa <= best => Selection { isa, note: None },
        Some(isa) => Selection {
            isa: best,
            note: Some(format!("KT_ISA={isa} is not available on this CPU; using {best}")),
        },
        None => Selection {
            isa: best,
            note: Some(format!(
                "KT_ISA={name:?} is not one of scalar, avx2, avx512, vnni, amx; using {best}"
            )),
        },
    }
}

macro_rules! scalar_tables {
    ($( $ty:ident => $vdt:ident, $deq:expr, $dot:expr, $vec_dot:expr, $quant:expr; )*) => {
        /// The scalar tables, as constants the SIMD tables start from.
        #[allow(non_upper_case_globals)]
        mod scalar_tables {
            use super::*;
            $(
                pub(super) const $ty: Kernels = Kernels {
                    ty: GgmlType::$ty,
                    vec_dot_type: GgmlType::$vdt,
                    isa: "scalar",
                    vec_dot_isa: "scalar",
                    dequantize: $deq,
                    dot_f32: $dot,
                    vec_dot: $vec_dot,
                    quantize: $quant,
                    vec_dot_tile: None,
                };
            )*
        }

        fn scalar_table(ty: GgmlType) -> Option<&'static Kernels> {
            match ty {
                $( GgmlType::$ty => Some(&scalar_tables::$ty), )*
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
    fn kt_isa_only_lowers_the_choice() {
        let best = Isa::best();
        assert_eq!(select(None).isa, best);
        assert_eq!(select(Some("")).isa, best);
        let s = select(Some("scalar"));
        assert_eq!((s.isa, s.note), (Isa::Scalar, None));
        for isa in Isa::ALL {
            let s = select(Some(isa.name()));
            if isa <= best {
                assert_eq!((s.isa, s.note), (isa, None));
            } else {
                assert_eq!(s.isa, best);
                assert!(s.note.unwrap().contains("not available"));
            }
        }
        let s = select(Some("avx1024"));
        assert_eq!(s.isa, best);
        assert!(s.note.unwrap().contains("not one of"));
        assert_eq!(select(Some(" AVX2 ")).isa, Isa::Avx2.min(best));
    }

    #[test]
    fn every_family_covers_every_format() {
        for isa in Isa::ALL.into_iter().filter(|i| i.available()) {
            for ty in GgmlType::ALL {
                let (k, s) = (kernels_for_isa(isa, ty), scalar_kernels(ty));
                assert_eq!(k.is_some(), s.is_some(), "{isa} {ty}");
                if let (Some(k), Some(s)) = (k, s) {
                    assert_eq!((k.ty, k.vec_dot_type), (s.ty, s.vec_dot_type), "{isa} {ty}");
                    let fam = |n: &str| Isa::from_name(n).unwrap();
                    assert!(fam(k.isa) <= isa && fam(k.vec_dot_isa) <= isa, "{isa} {ty}");
                }
            }
        }
        assert!(describe(GgmlType::Q4_K).unwrap().starts_with("q4_K: dot_f32="));
        let q4k = kernels(GgmlType::Q4_K).unwrap();
        // `amx` serves the block formats with the `vnni` table.
        let family = if selected() == Isa::Amx { "vnni" } else { selected_isa() };
        assert!(family == q4k.isa || family == q4k.vec_dot_isa);
    }

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
