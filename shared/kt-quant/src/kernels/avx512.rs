//! AVX-512 (F + BW + VL) kernels (x86-64 only), reached only through [`table`] after
//! [`super::Isa::Avx512`] was detected (which includes the AVX2 + FMA + F16C set).
//!
//! `dot_f32` works like the AVX2 version on sixteen lanes: every weight is rebuilt with the
//! scalar dequantizer's exact f32 operations, only the accumulation order differs. The
//! `vec_dot` entries are the AVX2 ones (bit-identical to scalar); the other entries are scalar.
#![allow(unsafe_code)] // std::arch loads and calls of #[target_feature] functions
#![allow(clippy::needless_range_loop)] // block offsets mirror the layouts in blocks.rs

use std::arch::x86_64::*;

use half::{bf16, f16};

use super::{avx2, scalar_tables as st, Kernels};
use crate::blocks::{k4_scales_mins, KVALUES_IQ4NL};
use kt_core::GgmlType;

macro_rules! entry {
    ($name:ident => $imp:ident($a:ident: $ta:ty, $b:ident: $tb:ty) -> $r:ty) => {
        fn $name($a: $ta, $b: $tb) -> $r {
            // SAFETY: these functions are only stored in the tables of this module, which
            // `kernels_for_isa`/`select` hand out only after `Isa::Avx512.available()` returned
            // true: AVX-512 F/BW/VL, AVX2, FMA and F16C are present.
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
                    Kernels { isa: "avx512", $($field: $val,)* ..st::$ty };
            )*
        }
        /// The AVX-512 table of `ty`, falling back to the AVX2 one (itself falling back to
        /// scalar) for formats without AVX-512 kernels.
        pub(super) fn table(ty: GgmlType) -> Option<&'static Kernels> {
            match ty {
                $( GgmlType::$ty => Some(&t::$ty), )*
                _ => avx2::table(ty),
            }
        }
    };
}

table! {
    F32 { dot_f32: dot_f32_f32 }
    F16 { dot_f32: dot_f32_f16 }
    BF16 { dot_f32: dot_f32_bf16 }
    Q4_0 { dot_f32: dot_f32_q4_0, vec_dot: avx2::vec_dot_q4_0, vec_dot_isa: "avx2" }
    Q8_0 { dot_f32: dot_f32_q8_0, vec_dot: avx2::vec_dot_q8_0, vec_dot_isa: "avx2" }
    Q4_K { dot_f32: dot_f32_q4_k, vec_dot: avx2::vec_dot_q4_k, vec_dot_isa: "avx2" }
    Q5_K { dot_f32: dot_f32_q5_k }
    Q6_K { dot_f32: dot_f32_q6_k, vec_dot: avx2::vec_dot_q6_k, vec_dot_isa: "avx2" }
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

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

#[inline(always)]
fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// `x[at..at + 16]`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn ld_ps(x: &[f32], at: usize) -> __m512 {
    let s = &x[at..at + 16];
    // SAFETY: `s` holds 16 readable f32; the load is unaligned.
    unsafe { _mm512_loadu_ps(s.as_ptr()) }
}

/// `b[at..at + 16]`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn ld128(b: &[u8], at: usize) -> __m128i {
    let s = &b[at..at + 16];
    // SAFETY: `s` holds 16 readable bytes; the load is unaligned.
    unsafe { _mm_loadu_si128(s.as_ptr().cast()) }
}

/// `b[at..at + 32]`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn ld256(b: &[u8], at: usize) -> __m256i {
    let s = &b[at..at + 32];
    // SAFETY: `s` holds 32 readable bytes; the load is unaligned.
    unsafe { _mm256_loadu_si256(s.as_ptr().cast()) }
}

/// `b[at..at + 16]` zero-extended to sixteen i32.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn u8x16(b: &[u8], at: usize) -> __m512i {
    _mm512_cvtepu8_epi32(ld128(b, at))
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn cvt(v: __m512i) -> __m512 {
    _mm512_cvtepi32_ps(v)
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn hsum4(acc: [__m512; 4]) -> f32 {
    _mm512_reduce_add_ps(_mm512_add_ps(
        _mm512_add_ps(acc[0], acc[1]),
        _mm512_add_ps(acc[2], acc[3]),
    ))
}

// ---------------------------------------------------------------------------------------------
// dot_f32: F32 / F16 / BF16
// ---------------------------------------------------------------------------------------------

macro_rules! float_dot {
    ($imp:ident, $bytes:expr, |$s:ident, $i:ident| $load:expr, |$s1:ident, $j:ident| $one:expr) => {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
        fn $imp(src: &[u8], x: &[f32]) -> f32 {
            let n = (src.len() / $bytes).min(x.len());
            let load = |$s: &[u8], $i: usize| $load;
            let mut acc = [_mm512_setzero_ps(); 4];
            let mut i = 0;
            while i + 64 <= n {
                for k in 0..4 {
                    acc[k] = _mm512_fmadd_ps(load(src, i + 16 * k), ld_ps(x, i + 16 * k), acc[k]);
                }
                i += 64;
            }
            while i + 16 <= n {
                acc[0] = _mm512_fmadd_ps(load(src, i), ld_ps(x, i), acc[0]);
                i += 16;
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
        let s = &s[4 * i..4 * i + 64];
        // SAFETY: `s` holds 16 f32 (64 bytes); the load is unaligned.
        unsafe { _mm512_loadu_ps(s.as_ptr().cast()) }
    },
    |s, j| f32::from_le_bytes([s[4 * j], s[4 * j + 1], s[4 * j + 2], s[4 * j + 3]])
);

float_dot!(f16_dot, 2, |s, i| _mm512_cvtph_ps(ld256(s, 2 * i)), |s, j| f16_at(s, 2 * j));

float_dot!(
    bf16_dot,
    2,
    |s, i| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(ld256(s, 2 * i)))),
    |s, j| bf16::from_bits(u16::from_le_bytes([s[2 * j], s[2 * j + 1]])).to_f32()
);

// ---------------------------------------------------------------------------------------------
// dot_f32: block formats
// ---------------------------------------------------------------------------------------------

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn q8_0_dot(src: &[u8], x: &[f32]) -> f32 {
    let mut acc = [_mm512_setzero_ps(); 4];
    for (i, (b, x)) in src.chunks_exact(34).zip(x.chunks_exact(32)).enumerate() {
        let d = _mm512_set1_ps(f16_at(b, 0));
        let o = 2 * (i % 2);
        for k in 0..2 {
            let w = _mm512_mul_ps(d, cvt(_mm512_cvtepi8_epi32(ld128(b, 2 + 16 * k))));
            acc[o + k] = _mm512_fmadd_ps(w, ld_ps(x, 16 * k), acc[o + k]);
        }
    }
    hsum4(acc)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn q4_0_dot(src: &[u8], x: &[f32]) -> f32 {
    let mut acc = [_mm512_setzero_ps(); 4];
    let (m4, c8) = (_mm512_set1_epi32(0xF), _mm512_set1_epi32(8));
    for (i, (b, x)) in src.chunks_exact(18).zip(x.chunks_exact(32)).enumerate() {
        let d = _mm512_set1_ps(f16_at(b, 0));
        let o = 2 * (i % 2);
        let v = u8x16(b, 2);
        let lo = _mm512_sub_epi32(_mm512_and_si512(v, m4), c8);
        let hi = _mm512_sub_epi32(_mm512_srli_epi32::<4>(v), c8);
        acc[o] = _mm512_fmadd_ps(_mm512_mul_ps(d, cvt(lo)), ld_ps(x, 0), acc[o]);
        acc[o + 1] = _mm512_fmadd_ps(_mm512_mul_ps(d, cvt(hi)), ld_ps(x, 16), acc[o + 1]);
    }
    hsum4(acc)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn iq4_table() -> __m512 {
    let k: [f32; 16] = std::array::from_fn(|i| KVALUES_IQ4NL[i] as f32);
    ld_ps(&k, 0)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn iq4_nl_dot(src: &[u8], x: &[f32]) -> f32 {
    let mut acc = [_mm512_setzero_ps(); 4];
    let m4 = _mm512_set1_epi32(0xF);
    let t = iq4_table();
    for (i, (b, x)) in src.chunks_exact(18).zip(x.chunks_exact(32)).enumerate() {
        let d = _mm512_set1_ps(f16_at(b, 0));
        let o = 2 * (i % 2);
        let v = u8x16(b, 2);
        let lo = _mm512_permutexvar_ps(_mm512_and_si512(v, m4), t);
        let hi = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(v), t);
        acc[o] = _mm512_fmadd_ps(_mm512_mul_ps(d, lo), ld_ps(x, 0), acc[o]);
        acc[o + 1] = _mm512_fmadd_ps(_mm512_mul_ps(d, hi), ld_ps(x, 16), acc[o + 1]);
    }
    hsum4(acc)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn iq4_xs_dot(src: &[u8], x: &[f32]) -> f32 {
    let mut acc = [_mm512_setzero_ps(); 4];
    let m4 = _mm512_set1_epi32(0xF);
    let t = iq4_table();
    for (b, x) in src.chunks_exact(136).zip(x.chunks_exact(256)) {
        let d = f16_at(b, 0);
        let sh = u16::from_le_bytes([b[2], b[3]]);
        for ib in 0..8 {
            let ls =
                ((b[4 + ib / 2] >> (4 * (ib % 2))) & 0xf) | ((((sh >> (2 * ib)) & 3) as u8) << 4);
            let dl = _mm512_set1_ps(d * (ls as i32 - 32) as f32);
            let o = 2 * (ib % 2);
            let v = u8x16(b, 8 + 16 * ib);
            let lo = _mm512_permutexvar_ps(_mm512_and_si512(v, m4), t);
            let hi = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(v), t);
            acc[o] = _mm512_fmadd_ps(_mm512_mul_ps(dl, lo), ld_ps(x, 32 * ib), acc[o]);
            acc[o + 1] = _mm512_fmadd_ps(_mm512_mul_ps(dl, hi), ld_ps(x, 32 * ib + 16), acc[o + 1]);
        }
    }
    hsum4(acc)
}

/// Q4_K and Q5_K (see `avx2::k4_dot`): `hbits(j, k)` gives the fifth bits (`<< 4`) of the low
/// and high nibbles of bytes `16k..16k + 16` of chunk `j`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn k4_dot(
    src: &[u8],
    x: &[f32],
    bytes: usize,
    qs: usize,
    hbits: impl Fn(&[u8], usize, usize) -> (__m512i, __m512i),
) -> f32 {
    let mut acc = [_mm512_setzero_ps(); 4];
    let m4 = _mm512_set1_epi32(0xF);
    for (b, x) in src.chunks_exact(bytes).zip(x.chunks_exact(256)) {
        let (d, min) = (f16_at(b, 0), f16_at(b, 2));
        let mut sc12 = [0u8; 12];
        sc12.copy_from_slice(&b[4..16]);
        let (sc, mn) = k4_scales_mins(&sc12);
        for j in 0..4 {
            let d1 = _mm512_set1_ps(d * sc[2 * j] as f32);
            let m1 = _mm512_set1_ps(min * mn[2 * j] as f32);
            let d2 = _mm512_set1_ps(d * sc[2 * j + 1] as f32);
            let m2 = _mm512_set1_ps(min * mn[2 * j + 1] as f32);
            for k in 0..2 {
                let v = u8x16(b, qs + 32 * j + 16 * k);
                let (h1, h2) = hbits(b, j, k);
                let lo = _mm512_or_si512(_mm512_and_si512(v, m4), h1);
                let hi = _mm512_or_si512(_mm512_srli_epi32::<4>(v), h2);
                let wl = _mm512_sub_ps(_mm512_mul_ps(d1, cvt(lo)), m1);
                let wh = _mm512_sub_ps(_mm512_mul_ps(d2, cvt(hi)), m2);
                acc[k] = _mm512_fmadd_ps(wl, ld_ps(x, 64 * j + 16 * k), acc[k]);
                acc[2 + k] = _mm512_fmadd_ps(wh, ld_ps(x, 64 * j + 32 + 16 * k), acc[2 + k]);
            }
        }
    }
    hsum4(acc)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn q4_k_dot(src: &[u8], x: &[f32]) -> f32 {
    let z = _mm512_setzero_si512();
    k4_dot(src, x, 144, 16, |_, _, _| (z, z))
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn q5_k_dot(src: &[u8], x: &[f32]) -> f32 {
    let c16 = _mm512_set1_epi32(16);
    k4_dot(src, x, 176, 48, |b, j, k| {
        // Bit 2j (low nibbles) and 2j + 1 (high nibbles) of qh[16k..16k + 16], moved to bit 4.
        let h = u8x16(b, 16 + 16 * k);
        let h1 = _mm512_srl_epi32(_mm512_slli_epi32::<4>(h), _mm_cvtsi32_si128(2 * j as i32));
        let h2 = _mm512_srl_epi32(h1, _mm_cvtsi32_si128(1));
        (_mm512_and_si512(h1, c16), _mm512_and_si512(h2, c16))
    })
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn q6_k_dot(src: &[u8], x: &[f32]) -> f32 {
    let mut acc = [_mm512_setzero_ps(); 4];
    let (m4, m3, c32) = (_mm512_set1_epi32(0xF), _mm512_set1_epi32(3), _mm512_set1_epi32(32));
    for (b, x) in src.chunks_exact(210).zip(x.chunks_exact(256)) {
        let d = f16_at(b, 208);
        let ds: [f32; 16] = std::array::from_fn(|g| d * (b[192 + g] as i8) as f32);
        for n in 0..2 {
            for l0 in [0, 16] {
                let a = u8x16(b, 64 * n + l0);
                let c = u8x16(b, 64 * n + 32 + l0);
                let h = u8x16(b, 128 + 32 * n + l0);
                let hb = |s: __m512i| _mm512_slli_epi32::<4>(_mm512_and_si512(s, m3));
                let q = [
                    _mm512_or_si512(_mm512_and_si512(a, m4), hb(h)),
                    _mm512_or_si512(_mm512_and_si512(c, m4), hb(_mm512_srli_epi32::<2>(h))),
                    _mm512_or_si512(_mm512_srli_epi32::<4>(a), hb(_mm512_srli_epi32::<4>(h))),
                    _mm512_or_si512(_mm512_srli_epi32::<4>(c), hb(_mm512_srli_epi32::<6>(h))),
                ];
                for (m, q) in q.into_iter().enumerate() {
                    let e = 128 * n + 32 * m + l0;
                    let w =
                        _mm512_mul_ps(_mm512_set1_ps(ds[e / 16]), cvt(_mm512_sub_epi32(q, c32)));
                    acc[m] = _mm512_fmadd_ps(w, ld_ps(x, e), acc[m]);
                }
            }
        }
    }
    hsum4(acc)
}
