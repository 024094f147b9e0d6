//! AVX2 + FMA + F16C kernels (x86-64 only), reached only through [`table`] after
//! [`super::Isa::Avx2`] was detected.
//!
//! * `dot_f32`: every weight is rebuilt with the scalar dequantizer's exact f32 operations
//!   (`d * q`, `d1 * q - m1`, never fused), so the weights are bit-identical to
//!   `dequantize`; only the accumulation differs (eight FMA lanes, several accumulators), which
//!   is the tolerance `tests/simd.rs` states.
//! * `vec_dot` (Q4_0, Q5_0, Q8_0, Q4_K, Q6_K): the integer sums are computed in SIMD
//!   registers (exact; the K-quants keep ggml's eight lanes `i % 8`, Q4_K by reordering bytes
//!   so that each lane's values share a dword, see `lanes_to_dwords`; Q4_0/Q5_0 sum eight
//!   blocks at a time), and the f32 scale products and sums follow
//!   `ggml_vec_dot_*_generic` operation by operation (lane-wise products, then the block
//!   results added one after the other), so the results are bit-identical to the scalar
//!   kernels.
//!
//! Entries without an AVX2 version (dequantize, quantize, the other formats) are the scalar
//! ones.
#![allow(unsafe_code)] // std::arch loads and calls of #[target_feature] functions
#![allow(clippy::needless_range_loop)] // block offsets mirror the layouts in blocks.rs

use std::arch::x86_64::*;

use half::{bf16, f16};

use super::{scalar_tables as st, Kernels};
use crate::blocks::{k4_scales_mins, KVALUES_IQ4NL};
use kt_core::GgmlType;

/// Wraps a `#[target_feature]` kernel into the plain fn the tables hold (the AVX-512 tables
/// reuse some of them).
macro_rules! entry {
    ($name:ident => $imp:ident($a:ident: $ta:ty, $b:ident: $tb:ty) -> $r:ty) => {
        pub(super) fn $name($a: $ta, $b: $tb) -> $r {
            // SAFETY: these functions are only stored in the tables of this module, which
            // `kernels_for_isa`/`select` hand out only after `Isa::Avx2.available()` (or
            // Avx512, which implies it) returned true: AVX2, FMA and F16C are present.
            unsafe { $imp($a, $b) }
        }
    };
}

macro_rules! table {
    ($( $ty:ident { $($field:ident: $val:expr),* } )*) => {
        #[allow(non_upper_case_globals)]
        mod t {
            use super::*;
            $(
                pub(super) static $ty: Kernels =
                    Kernels { isa: "avx2", $($field: $val,)* ..st::$ty };
            )*
        }
        /// The AVX2 table of `ty`: the SIMD entries where this module has them, scalar ones
        /// otherwise (and the scalar table for formats without any AVX2 kernel).
        pub(super) fn table(ty: GgmlType) -> Option<&'static Kernels> {
            match ty {
                $( GgmlType::$ty => Some(&t::$ty), )*
                _ => super::scalar_table(ty),
            }
        }
    };
}

table! {
    F32 { dot_f32: dot_f32_f32 }
    F16 { dot_f32: dot_f32_f16 }
    BF16 { dot_f32: dot_f32_bf16 }
    Q4_0 { dot_f32: dot_f32_q4_0, vec_dot: vec_dot_q4_0, vec_dot_isa: "avx2" }
    Q5_0 { vec_dot: vec_dot_q5_0, vec_dot_isa: "avx2" }
    Q8_0 { dot_f32: dot_f32_q8_0, vec_dot: vec_dot_q8_0, vec_dot_isa: "avx2" }
    Q4_K { dot_f32: dot_f32_q4_k, vec_dot: vec_dot_q4_k, vec_dot_isa: "avx2" }
    Q5_K { dot_f32: dot_f32_q5_k }
    Q6_K { dot_f32: dot_f32_q6_k, vec_dot: vec_dot_q6_k, vec_dot_isa: "avx2" }
    IQ4_NL { dot_f32: dot_f32_iq4_nl }
    IQ4_XS { dot_f32: dot_f32_iq4_xs }
}

entry!(dot_f32_f32 => f32_dot(w: &[u8], x: &[f32]) -> f32);
entry!(dot_f32_f16 => f16_dot(w: &[u8], x: &[f32]) -> f32);
entry!(dot_f32_bf16 => bf16_dot(w: &[u8], x: &[f32]) -> f32);
entry!(dot_f32_q4_0 => q4_0_dot(w: &[u8], x: &[f32]) -> f32);
entry!(dot_f32_q8_0 => q8_0_dot(w: &[u8], x: &[f32]) -> f32);
entry!(dot_f32_q4_k => q4_k_dot(w: &[u8], x: &[f32]) -> f32);
entry!(dot_f32_q5_k => q5_k_dot(w: &[u8], x: &[f32]) -> f32);
entry!(dot_f32_q6_k => q6_k_dot(w: &[u8], x: &[f32]) -> f32);
entry!(dot_f32_iq4_nl => iq4_nl_dot(w: &[u8], x: &[f32]) -> f32);
entry!(dot_f32_iq4_xs => iq4_xs_dot(w: &[u8], x: &[f32]) -> f32);
entry!(vec_dot_q8_0 => q8_0_q8_0(w: &[u8], a: &[u8]) -> f32);
entry!(vec_dot_q4_0 => q4_0_q8_0(w: &[u8], a: &[u8]) -> f32);
entry!(vec_dot_q5_0 => q5_0_q8_0(w: &[u8], a: &[u8]) -> f32);
entry!(vec_dot_q4_k => q4_k_q8_k(w: &[u8], a: &[u8]) -> f32);
entry!(vec_dot_q6_k => q6_k_q8_k(w: &[u8], a: &[u8]) -> f32);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

#[inline(always)]
fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

#[inline(always)]
fn f32_at(b: &[u8], at: usize) -> f32 {
    f32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// `x[at..at + 8]`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn ld_ps(x: &[f32], at: usize) -> __m256 {
    let s = &x[at..at + 8];
    // SAFETY: `s` holds 8 readable f32; the load is unaligned.
    unsafe { _mm256_loadu_ps(s.as_ptr()) }
}

/// `b[at..at + 8]` zero-extended to eight i32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn u8x8(b: &[u8], at: usize) -> __m256i {
    let s = &b[at..at + 8];
    // SAFETY: `s` holds 8 readable bytes; the load is unaligned.
    _mm256_cvtepu8_epi32(unsafe { _mm_loadl_epi64(s.as_ptr().cast()) })
}

/// `b[at..at + 8]` sign-extended to eight i32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn i8x8(b: &[u8], at: usize) -> __m256i {
    let s = &b[at..at + 8];
    // SAFETY: `s` holds 8 readable bytes; the load is unaligned.
    _mm256_cvtepi8_epi32(unsafe { _mm_loadl_epi64(s.as_ptr().cast()) })
}

/// `b[at..at + 16]`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn ld128(b: &[u8], at: usize) -> __m128i {
    let s = &b[at..at + 16];
    // SAFETY: `s` holds 16 readable bytes; the load is unaligned.
    unsafe { _mm_loadu_si128(s.as_ptr().cast()) }
}

/// `b[at..at + 32]`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn ld256(b: &[u8], at: usize) -> __m256i {
    let s = &b[at..at + 32];
    // SAFETY: `s` holds 32 readable bytes; the load is unaligned.
    unsafe { _mm256_loadu_si256(s.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum4(acc: [__m256; 4]) -> f32 {
    hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum_i32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32::<0b01>(s)))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn cvt(v: __m256i) -> __m256 {
    _mm256_cvtepi32_ps(v)
}

// ---------------------------------------------------------------------------------------------
// dot_f32: F32 / F16 / BF16
// ---------------------------------------------------------------------------------------------

/// Shared driver of the plain float formats: `load(src, i)` gives elements `i..i + 8`; the
/// tail (`n % 8`) is added one product at a time with `one(src, i)`.
macro_rules! float_dot {
    ($imp:ident, $bytes:expr, |$s:ident, $i:ident| $load:expr, |$s1:ident, $j:ident| $one:expr) => {
        #[target_feature(enable = "avx2,fma,f16c")]
        fn $imp(src: &[u8], x: &[f32]) -> f32 {
            let n = (src.len() / $bytes).min(x.len());
            let load = |$s: &[u8], $i: usize| $load;
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i + 32 <= n {
                for k in 0..4 {
                    acc[k] = _mm256_fmadd_ps(load(src, i + 8 * k), ld_ps(x, i + 8 * k), acc[k]);
                }
                i += 32;
            }
            while i + 8 <= n {
                acc[0] = _mm256_fmadd_ps(load(src, i), ld_ps(x, i), acc[0]);
                i += 8;
            }
            let mut sum = hsum4(acc);
            for $j in i..n {
                let $s1 = src;
                sum += $one * x[$j];
            }
            sum
        }
    };
}

float_dot!(
    f32_dot,
    4,
    |s, i| {
        let s = &s[4 * i..4 * i + 32];
        // SAFETY: `s` holds 8 f32 (32 bytes); the load is unaligned.
        unsafe { _mm256_loadu_ps(s.as_ptr().cast()) }
    },
    |s, j| f32_at(s, 4 * j)
);

float_dot!(f16_dot, 2, |s, i| _mm256_cvtph_ps(ld128(s, 2 * i)), |s, j| f16_at(s, 2 * j));

float_dot!(
    bf16_dot,
    2,
    |s, i| _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(ld128(s, 2 * i)))),
    |s, j| bf16::from_bits(u16::from_le_bytes([s[2 * j], s[2 * j + 1]])).to_f32()
);

// ---------------------------------------------------------------------------------------------
// dot_f32: block formats
// ---------------------------------------------------------------------------------------------

#[target_feature(enable = "avx2,fma,f16c")]
fn q8_0_dot(src: &[u8], x: &[f32]) -> f32 {
    let mut acc = [_mm256_setzero_ps(); 4];
    for (b, x) in src.chunks_exact(34).zip(x.chunks_exact(32)) {
        let d = _mm256_set1_ps(f16_at(b, 0));
        for k in 0..4 {
            let w = _mm256_mul_ps(d, cvt(i8x8(b, 2 + 8 * k)));
            acc[k] = _mm256_fmadd_ps(w, ld_ps(x, 8 * k), acc[k]);
        }
    }
    hsum4(acc)
}

#[target_feature(enable = "avx2,fma,f16c")]
fn q4_0_dot(src: &[u8], x: &[f32]) -> f32 {
    let mut acc = [_mm256_setzero_ps(); 4];
    let (m4, c8) = (_mm256_set1_epi32(0xF), _mm256_set1_epi32(8));
    for (b, x) in src.chunks_exact(18).zip(x.chunks_exact(32)) {
        let d = _mm256_set1_ps(f16_at(b, 0));
        for k in 0..2 {
            let v = u8x8(b, 2 + 8 * k);
            let lo = _mm256_sub_epi32(_mm256_and_si256(v, m4), c8);
            let hi = _mm256_sub_epi32(_mm256_srli_epi32::<4>(v), c8);
            let (wl, wh) = (_mm256_mul_ps(d, cvt(lo)), _mm256_mul_ps(d, cvt(hi)));
            acc[k] = _mm256_fmadd_ps(wl, ld_ps(x, 8 * k), acc[k]);
            acc[2 + k] = _mm256_fmadd_ps(wh, ld_ps(x, 16 + 8 * k), acc[2 + k]);
        }
    }
    hsum4(acc)
}

/// IQ4_NL values `KVALUES_IQ4NL[idx]` (idx in 0..16) as f32, via two 8-entry permutes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn iq4_lookup(lo: __m256, hi: __m256, idx: __m256i) -> __m256 {
    let a = _mm256_permutevar8x32_ps(lo, idx);
    let b = _mm256_permutevar8x32_ps(hi, idx);
    // Bit 3 of the index moved to the sign bit selects the upper half.
    _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32::<28>(idx)))
}

#[target_feature(enable = "avx2,fma,f16c")]
fn iq4_tables() -> (__m256, __m256) {
    let k: [f32; 16] = std::array::from_fn(|i| KVALUES_IQ4NL[i] as f32);
    (ld_ps(&k, 0), ld_ps(&k, 8))
}

#[target_feature(enable = "avx2,fma,f16c")]
fn iq4_nl_dot(src: &[u8], x: &[f32]) -> f32 {
    let mut acc = [_mm256_setzero_ps(); 4];
    let m4 = _mm256_set1_epi32(0xF);
    let (tl, th) = iq4_tables();
    for (b, x) in src.chunks_exact(18).zip(x.chunks_exact(32)) {
        let d = _mm256_set1_ps(f16_at(b, 0));
        for k in 0..2 {
            let v = u8x8(b, 2 + 8 * k);
            let lo = iq4_lookup(tl, th, _mm256_and_si256(v, m4));
            let hi = iq4_lookup(tl, th, _mm256_srli_epi32::<4>(v));
            acc[k] = _mm256_fmadd_ps(_mm256_mul_ps(d, lo), ld_ps(x, 8 * k), acc[k]);
            acc[2 + k] = _mm256_fmadd_ps(_mm256_mul_ps(d, hi), ld_ps(x, 16 + 8 * k), acc[2 + k]);
        }
    }
    hsum4(acc)
}

#[target_feature(enable = "avx2,fma,f16c")]
fn iq4_xs_dot(src: &[u8], x: &[f32]) -> f32 {
    let mut acc = [_mm256_setzero_ps(); 4];
    let m4 = _mm256_set1_epi32(0xF);
    let (tl, th) = iq4_tables();
    for (b, x) in src.chunks_exact(136).zip(x.chunks_exact(256)) {
        let d = f16_at(b, 0);
        let sh = u16::from_le_bytes([b[2], b[3]]);
        for ib in 0..8 {
            let ls =
                ((b[4 + ib / 2] >> (4 * (ib % 2))) & 0xf) | ((((sh >> (2 * ib)) & 3) as u8) << 4);
            let dl = _mm256_set1_ps(d * (ls as i32 - 32) as f32);
            for k in 0..2 {
                let v = u8x8(b, 8 + 16 * ib + 8 * k);
                let lo = iq4_lookup(tl, th, _mm256_and_si256(v, m4));
                let hi = iq4_lookup(tl, th, _mm256_srli_epi32::<4>(v));
                let (xl, xh) = (ld_ps(x, 32 * ib + 8 * k), ld_ps(x, 32 * ib + 16 + 8 * k));
                acc[k] = _mm256_fmadd_ps(_mm256_mul_ps(dl, lo), xl, acc[k]);
                acc[2 + k] = _mm256_fmadd_ps(_mm256_mul_ps(dl, hi), xh, acc[2 + k]);
            }
        }
    }
    hsum4(acc)
}

/// Q4_K and Q5_K: `hbits(j, k)` gives the fifth bits (already `<< 4`) of the low and high
/// nibbles of bytes `8k..8k + 8` of chunk `j`, `qs` is the offset of the nibbles.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn k4_dot(
    src: &[u8],
    x: &[f32],
    bytes: usize,
    qs: usize,
    hbits: impl Fn(&[u8], usize, usize) -> (__m256i, __m256i),
) -> f32 {
    let mut acc = [_mm256_setzero_ps(); 8];
    let m4 = _mm256_set1_epi32(0xF);
    for (b, x) in src.chunks_exact(bytes).zip(x.chunks_exact(256)) {
        let (d, min) = (f16_at(b, 0), f16_at(b, 2));
        let mut sc12 = [0u8; 12];
        sc12.copy_from_slice(&b[4..16]);
        let (sc, mn) = k4_scales_mins(&sc12);
        for j in 0..4 {
            let d1 = _mm256_set1_ps(d * sc[2 * j] as f32);
            let m1 = _mm256_set1_ps(min * mn[2 * j] as f32);
            let d2 = _mm256_set1_ps(d * sc[2 * j + 1] as f32);
            let m2 = _mm256_set1_ps(min * mn[2 * j + 1] as f32);
            for k in 0..4 {
                let v = u8x8(b, qs + 32 * j + 8 * k);
                let (h1, h2) = hbits(b, j, k);
                let lo = _mm256_or_si256(_mm256_and_si256(v, m4), h1);
                let hi = _mm256_or_si256(_mm256_srli_epi32::<4>(v), h2);
                let wl = _mm256_sub_ps(_mm256_mul_ps(d1, cvt(lo)), m1);
                let wh = _mm256_sub_ps(_mm256_mul_ps(d2, cvt(hi)), m2);
                acc[k] = _mm256_fmadd_ps(wl, ld_ps(x, 64 * j + 8 * k), acc[k]);
                acc[4 + k] = _mm256_fmadd_ps(wh, ld_ps(x, 64 * j + 32 + 8 * k), acc[4 + k]);
            }
        }
    }
    hsum4([
        _mm256_add_ps(acc[0], acc[4]),
        _mm256_add_ps(acc[1], acc[5]),
        _mm256_add_ps(acc[2], acc[6]),
        _mm256_add_ps(acc[3], acc[7]),
    ])
}

#[target_feature(enable = "avx2,fma,f16c")]
fn q4_k_dot(src: &[u8], x: &[f32]) -> f32 {
    let z = _mm256_setzero_si256();
    k4_dot(src, x, 144, 16, |_, _, _| (z, z))
}

#[target_feature(enable = "avx2,fma,f16c")]
fn q5_k_dot(src: &[u8], x: &[f32]) -> f32 {
    let c16 = _mm256_set1_epi32(16);
    k4_dot(src, x, 176, 48, |b, j, k| {
        // Bit 2j (low nibbles) and 2j + 1 (high nibbles) of qh[8k..8k + 8], moved to bit 4.
        let h = u8x8(b, 16 + 8 * k);
        let h1 = _mm256_srl_epi32(_mm256_slli_epi32::<4>(h), _mm_cvtsi32_si128(2 * j as i32));
        let h2 = _mm256_srl_epi32(h1, _mm_cvtsi32_si128(1));
        (_mm256_and_si256(h1, c16), _mm256_and_si256(h2, c16))
    })
}

#[target_feature(enable = "avx2,fma,f16c")]
fn q6_k_dot(src: &[u8], x: &[f32]) -> f32 {
    let mut acc = [_mm256_setzero_ps(); 4];
    let (m4, m3, c32) = (_mm256_set1_epi32(0xF), _mm256_set1_epi32(3), _mm256_set1_epi32(32));
    for (b, x) in src.chunks_exact(210).zip(x.chunks_exact(256)) {
        let d = f16_at(b, 208);
        let ds: [f32; 16] = std::array::from_fn(|g| d * (b[192 + g] as i8) as f32);
        for n in 0..2 {
            for l0 in [0, 8, 16, 24] {
                let a = u8x8(b, 64 * n + l0);
                let c = u8x8(b, 64 * n + 32 + l0);
                let h = u8x8(b, 128 + 32 * n + l0);
                let hb = |s: __m256i| _mm256_slli_epi32::<4>(_mm256_and_si256(s, m3));
                let q = [
                    _mm256_or_si256(_mm256_and_si256(a, m4), hb(h)),
                    _mm256_or_si256(_mm256_and_si256(c, m4), hb(_mm256_srli_epi32::<2>(h))),
                    _mm256_or_si256(_mm256_srli_epi32::<4>(a), hb(_mm256_srli_epi32::<4>(h))),
                    _mm256_or_si256(_mm256_srli_epi32::<4>(c), hb(_mm256_srli_epi32::<6>(h))),
                ];
                for (m, q) in q.into_iter().enumerate() {
                    let e = 128 * n + 32 * m + l0;
                    let w =
                        _mm256_mul_ps(_mm256_set1_ps(ds[e / 16]), cvt(_mm256_sub_epi32(q, c32)));
                    acc[m] = _mm256_fmadd_ps(w, ld_ps(x, e), acc[m]);
                }
            }
        }
    }
    hsum4(acc)
}

// ---------------------------------------------------------------------------------------------
// vec_dot (bit-exact with the scalar kernels)
// ---------------------------------------------------------------------------------------------

/// The Q8_0-activation `vec_dot`s two blocks at a time, bit-identical to the scalar ones:
/// `lanes(x, y)` gives a block's exact integer sum in eight i32 lanes; the two blocks' lanes
/// are reduced together, their four f16 scales converted by one `VCVTPH2PS`, and
/// `scale(sumi, dx, dy)` applies the scalar kernel's f32 operations to lanes 0 and 1 (one
/// block each); the products are added to `sumf` one after the other, as the scalar loop does.
/// (Faster than reducing groups of eight blocks with a transpose: per 1408-value row on Zen 4,
/// Q8_0 80 -> 63 ns, Q4_0 99 -> 69, Q5_0 125 -> 90.)
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q8_pairs(
    w: &[u8],
    a: &[u8],
    bytes: usize,
    lanes: impl Fn(&[u8], &[u8]) -> __m256i,
    scale: impl Fn(__m128, __m128, __m128) -> __m128,
) -> f32 {
    let nb = (w.len() / bytes).min(a.len() / 34);
    let f16 = |b: &[u8], at: usize| {
        let mut v = [0u8; 2];
        v.copy_from_slice(&b[at..at + 2]);
        u16::from_le_bytes(v) as u64
    };
    let mut sumf = 0f32;
    let mut wp = w[..bytes * nb].chunks_exact(2 * bytes);
    let mut ap = a[..34 * nb].chunks_exact(68);
    for (x, y) in (&mut wp).zip(&mut ap) {
        let (v0, v1) = (lanes(x, y), lanes(&x[bytes..], &y[34..]));
        // Lanes of the 128-bit halves alternate between the blocks: b0, b1, b0, b1.
        let t = _mm256_add_epi32(_mm256_unpacklo_epi32(v0, v1), _mm256_unpackhi_epi32(v0, v1));
        let t = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256::<1>(t));
        let sumi = _mm_add_epi32(t, _mm_unpackhi_epi64(t, t));
        // dx0, dx1, dy0, dy1 (exact).
        let h = f16(x, 0) | f16(x, bytes) << 16 | f16(y, 0) << 32 | f16(y, 34) << 48;
        let d = _mm_cvtph_ps(_mm_cvtsi64_si128(h as i64));
        let p = scale(_mm_cvtepi32_ps(sumi), d, _mm_movehl_ps(d, d));
        sumf += _mm_cvtss_f32(p);
        sumf += _mm_cvtss_f32(_mm_movehdup_ps(p));
    }
    let (x, y) = (wp.remainder(), ap.remainder());
    if x.len() >= bytes && y.len() >= 34 {
        let sumi = _mm_cvtsi32_si128(hsum_i32(lanes(x, y)));
        let d = _mm_cvtph_ps(_mm_cvtsi64_si128((f16(x, 0) | f16(y, 0) << 16) as i64));
        sumf += _mm_cvtss_f32(scale(_mm_cvtepi32_ps(sumi), d, _mm_movehdup_ps(d)));
    }
    sumf
}

#[target_feature(enable = "avx2,fma,f16c")]
fn q8_0_q8_0(w: &[u8], a: &[u8]) -> f32 {
    // Scalar: sumf += sumi as f32 * (dx * dy).
    q8_pairs(
        w,
        a,
        34,
        |x, y| {
            let p0 = _mm256_madd_epi16(
                _mm256_cvtepi8_epi16(ld128(x, 2)),
                _mm256_cvtepi8_epi16(ld128(y, 2)),
            );
            let p1 = _mm256_madd_epi16(
                _mm256_cvtepi8_epi16(ld128(x, 18)),
                _mm256_cvtepi8_epi16(ld128(y, 18)),
            );
            _mm256_add_epi32(p0, p1)
        },
        |s, dx, dy| _mm_mul_ps(s, _mm_mul_ps(dx, dy)),
    )
}

/// `Σ (q - c) a` for 32 unsigned weights `q` (at most 31) and the signed activations of `y`,
/// in eight i32 lanes: `VPMADDUBSW` of `q` and of `c`, subtracted in i16 (exact: each pair
/// is at most 2 · 31 · 128 in magnitude), then summed in pairs.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn offset_dot(q: __m256i, c: i8, y: &[u8]) -> __m256i {
    let a = ld256(y, 2);
    let p =
        _mm256_sub_epi16(_mm256_maddubs_epi16(q, a), _mm256_maddubs_epi16(_mm256_set1_epi8(c), a));
    _mm256_madd_epi16(p, _mm256_set1_epi16(1))
}

/// The 16 bytes at `at` split into 32 nibbles: low nibbles (values 0..16), then high ones.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn nibbles32(x: &[u8], at: usize) -> __m256i {
    let q = _mm256_broadcastsi128_si256(ld128(x, at));
    _mm256_and_si256(_mm256_srlv_epi64(q, _mm256_set_epi64x(4, 4, 0, 0)), _mm256_set1_epi8(0xF))
}

#[target_feature(enable = "avx2,fma,f16c")]
fn q4_0_q8_0(w: &[u8], a: &[u8]) -> f32 {
    // Scalar: sumf += sumi as f32 * dx * dy.
    q8_pairs(
        w,
        a,
        18,
        |x, y| offset_dot(nibbles32(x, 2), 8, y),
        |s, dx, dy| _mm_mul_ps(_mm_mul_ps(s, dx), dy),
    )
}

#[target_feature(enable = "avx2,fma,f16c")]
fn q5_0_q8_0(w: &[u8], a: &[u8]) -> f32 {
    // Bit j of qh is the fifth bit of value j: qh's byte j / 8 spread over the bytes, each
    // tested against its own bit.
    let spread = _mm256_setr_epi8(
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3,
        3, 3,
    );
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    // Scalar: sumf += (dx * dy) * sumi as f32.
    q8_pairs(
        w,
        a,
        22,
        |x, y| {
            let mut qh = [0u8; 4];
            qh.copy_from_slice(&x[2..6]);
            let qh = u32::from_le_bytes(qh);
            let h = _mm256_shuffle_epi8(_mm256_set1_epi32(qh as i32), spread);
            let set = _mm256_cmpeq_epi8(_mm256_and_si256(h, bit), bit);
            let q = _mm256_or_si256(nibbles32(x, 6), _mm256_and_si256(set, _mm256_set1_epi8(16)));
            offset_dot(q, 16, y)
        },
        |s, dx, dy| _mm_mul_ps(_mm_mul_ps(dx, dy), s),
    )
}

/// ggml's eight integer lanes for `n` (16 or 32) values: `Σ q[i] * a[i]` over `i % 8 == l`
/// for lane `l`, times `scale`. `prod` holds the i16 products of the first and second 16
/// values (the second is zero for n = 16); every partial sum stays within i16.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn lanes_scaled(prod: __m256i, scale: i32) -> __m256i {
    let t = _mm_add_epi16(_mm256_castsi256_si128(prod), _mm256_extracti128_si256::<1>(prod));
    // (scale, 0) i16 pairs: madd multiplies the i16 in each i32's low half by the scale.
    _mm256_madd_epi16(_mm256_cvtepi16_epi32(t), _mm256_set1_epi32(scale & 0xFFFF))
}

/// i16 products of 16 bytes: `u` unsigned (if `unsigned`) or signed, `q` signed.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn mul16(u: __m128i, q: __m128i, unsigned: bool) -> __m256i {
    let u = if unsigned { _mm256_cvtepu8_epi16(u) } else { _mm256_cvtepi8_epi16(u) };
    _mm256_mullo_epi16(u, _mm256_cvtepi8_epi16(q))
}

/// Tail of the K-quant vec_dots: `sumf += s` for the eight lanes in order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn add_lanes(sumf: f32, sums: __m256) -> f32 {
    let lo = _mm256_castps256_ps128(sums);
    let hi = _mm256_extractf128_ps::<1>(sums);
    add4(add4(sumf, lo, 4), hi, 4)
}

/// `sumf += v[i]` for the first `k` (at most 4) lanes of `v`, in order, in registers.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn add4(sumf: f32, v: __m128, k: usize) -> f32 {
    let mut s = _mm_set_ss(sumf);
    if k > 0 {
        s = _mm_add_ss(s, v);
    }
    if k > 1 {
        s = _mm_add_ss(s, _mm_movehdup_ps(v));
    }
    if k > 2 {
        s = _mm_add_ss(s, _mm_movehl_ps(v, v));
    }
    if k > 3 {
        s = _mm_add_ss(s, _mm_shuffle_ps::<0b11>(v, v));
    }
    _mm_cvtss_f32(s)
}

/// ggml's lanes (`i % 8`) in whole dwords: 32 bytes reordered so that dword `l` holds the
/// four bytes of values `l, l + 8, l + 16, l + 24` (`VPERMD` gathers the dwords of values
/// `0..4, 8..12, 16..20, 24..28` in the low half and `4..8, ...` in the high half, `VPSHUFB`
/// transposes each half's 4 × 4 bytes).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn lanes_to_dwords(v: __m256i) -> __m256i {
    let perm = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    let t = _mm256_setr_epi8(
        0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15, 0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10,
        14, 3, 7, 11, 15,
    );
    _mm256_shuffle_epi8(_mm256_permutevar8x32_epi32(v, perm), t)
}

#[target_feature(enable = "avx2,fma,f16c")]
fn q4_k_q8_k(w: &[u8], a: &[u8]) -> f32 {
    let mut sums = _mm256_setzero_ps();
    let mut sumf = 0f32;
    let m4 = _mm256_set1_epi8(0xF);
    for (x, y) in w.chunks_exact(144).zip(a.chunks_exact(292)) {
        let mut sc12 = [0u8; 12];
        sc12.copy_from_slice(&x[4..16]);
        let (sc, mn) = k4_scales_mins(&sc12);
        // Σ bsums[j] · mins[j / 2] (exact in i32, so the order is free).
        let mins = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(
            _mm_cvtsi64_si128(u64::from_le_bytes(mn) as i64),
            _mm_set_epi64x(0x0707_0606_0505_0404, 0x0303_0202_0101_0000),
        ));
        let sumi = hsum_i32(_mm256_madd_epi16(ld256(y, 260), mins));
        // aux32[l]: with values and activations both in `lanes_to_dwords` order, VPMADDUBSW
        // (|pair| <= 2 · 15 · 128) and VPMADDWD with the sub-block's scale leave lane l's
        // products in dword l.
        let mut aux = _mm256_setzero_si256();
        for j in 0..4 {
            let q4 = lanes_to_dwords(ld256(x, 16 + 32 * j));
            let lo = _mm256_and_si256(q4, m4);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q4), m4);
            for (g, v) in [(2 * j, lo), (2 * j + 1, hi)] {
                let p = _mm256_maddubs_epi16(v, lanes_to_dwords(ld256(y, 4 + 32 * g)));
                aux = _mm256_add_epi32(aux, _mm256_madd_epi16(p, _mm256_set1_epi16(sc[g] as i16)));
            }
        }
        let yd = f32_at(y, 0);
        let d = f16_at(x, 0) * yd;
        sums = _mm256_add_ps(sums, _mm256_mul_ps(_mm256_set1_ps(d), cvt(aux)));
        let dmin = f16_at(x, 2) * yd;
        sumf -= dmin * sumi as f32;
    }
    add_lanes(sumf, sums)
}

#[target_feature(enable = "avx2,fma,f16c")]
fn q6_k_q8_k(w: &[u8], a: &[u8]) -> f32 {
    let mut sums = _mm256_setzero_ps();
    let (m4, m3, c32) = (_mm256_set1_epi8(0xF), _mm256_set1_epi8(3), _mm256_set1_epi8(32));
    for (x, y) in w.chunks_exact(210).zip(a.chunks_exact(292)) {
        let mut aux = _mm256_setzero_si256();
        for n in 0..2 {
            let a0 = ld256(x, 64 * n);
            let a1 = ld256(x, 64 * n + 32);
            let h = ld256(x, 128 + 32 * n);
            let hb = |s: __m256i| _mm256_slli_epi16::<4>(_mm256_and_si256(s, m3));
            let nib = |s: __m256i| _mm256_and_si256(_mm256_srli_epi16::<4>(s), m4);
            let q = [
                _mm256_or_si256(_mm256_and_si256(a0, m4), hb(h)),
                _mm256_or_si256(_mm256_and_si256(a1, m4), hb(_mm256_srli_epi16::<2>(h))),
                _mm256_or_si256(nib(a0), hb(_mm256_srli_epi16::<4>(h))),
                _mm256_or_si256(nib(a1), hb(_mm256_srli_epi16::<6>(h))),
            ];
            for (m, q) in q.into_iter().enumerate() {
                let q = _mm256_sub_epi8(q, c32);
                let e = 128 * n + 32 * m;
                let p0 = mul16(_mm256_castsi256_si128(q), ld128(y, 4 + e), false);
                let p1 = mul16(_mm256_extracti128_si256::<1>(q), ld128(y, 4 + e + 16), false);
                aux = _mm256_add_epi32(aux, lanes_scaled(p0, x[192 + e / 16] as i8 as i32));
                aux = _mm256_add_epi32(aux, lanes_scaled(p1, x[192 + e / 16 + 1] as i8 as i32));
            }
        }
        let d = f16_at(x, 208) * f32_at(y, 0);
        sums = _mm256_add_ps(sums, _mm256_mul_ps(_mm256_set1_ps(d), cvt(aux)));
    }
    add_lanes(0.0, sums)
}
