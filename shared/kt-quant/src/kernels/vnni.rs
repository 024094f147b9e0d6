//! AVX-512 VNNI kernels (x86-64 only), reached only through [`table`] after
//! [`super::Isa::Vnni`] was detected (AVX-512 F/BW/VL + VNNI, on top of the AVX2 set).
//!
//! `vec_dot` of Q4_0, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K and IQ4_XS against Q8_0/Q8_K activations with
//! `VPDPBUSD` (`_mm512_dpbusd_epi32` / `_mm256_dpbusd_epi32`: four u8 × i8 products added to an
//! i32 lane), and, where the CPU also has AVX512_BF16, `vec_dot` of BF16 × BF16 with
//! `VDPBF16PS`.
//!
//! Accuracy: the integer sums of every block (and sub-block scale products) are exact, as in
//! the scalar kernels; what differs is the f32 part: Q4_K multiplies exact per-sub-block
//! integer sums by `d · scale` in f32 (sixteen lanes), the others scale VPDPBUSD lanes (four
//! consecutive products each) by the block scale `d`, all with FMA in their own order rather than ggml's eight `i % 8` lanes. So
//! results are not bit-identical to the scalar reference (nor are ggml's own SIMD kernels to
//! its generic ones); `tests/simd.rs` states the tolerance. `vec_dot` and `vec_dot_tile` are
//! the same code per (row, token), so they agree bit for bit (`tests/tile.rs`). The BF16
//! product follows VDPBF16PS semantics (pairs of bf16 products added in f32 with
//! round-to-nearest-even, denormal inputs and outputs flushed to zero), against the scalar
//! kernel's f64 sum.
//!
//! Unsigned × signed: VPDPBUSD multiplies unsigned bytes by signed ones. Q4_K/Q5_K/Q6_K
//! weights are stored unsigned (Q6_K's `q - 32` offset is applied through the activations'
//! block sums; Q4_0/Q5_0's `q - 8`/`q - 16` through `c · Σa`, computed with VPDPBUSD too, or
//! for Q5_0's single row as `nib − 16 (1 − h)`); Q8_0 and IQ4_XS weights are signed, so they
//! are offset by +128 (`w ^ 0x80`) and `128 · Σa` is subtracted, which is exact for every byte
//! value (-128 included).
//!
//! Q8_0-family single rows (the 1-token decode path of the MoE down projections): two blocks
//! per 512-bit register, the f16 scales of four blocks gathered with integer loads and
//! converted by one `VCVTPH2PS` (per-block `half` calls, or `VPINSRW` gathers that compete
//! with the permutes for Intel's port 5, were slower), two FMA accumulators.
//!
//! Q8_K block sums: the K-quant kernels here take `Σa` per 16 values from the activations'
//! `bsums` (as ggml's SIMD kernels do), which every Q8_K quantizer writes as the sums of the
//! quants. Q4_K and Q5_K's scalar kernels read them too; for Q6_K and IQ4_XS a Q8_K row whose
//! `bsums` disagree with its quants gives another (finite) number than the scalar kernel.
#![allow(unsafe_code)] // std::arch loads and calls of #[target_feature] functions
#![allow(clippy::needless_range_loop)] // block offsets mirror the layouts in blocks.rs

use std::arch::x86_64::*;

use half::f16;

use super::{avx512, Kernels};
use crate::blocks::KVALUES_IQ4NL;
use kt_core::GgmlType;

macro_rules! entry {
    ($name:ident => $imp:ident($a:ident: $ta:ty, $b:ident: $tb:ty) -> $r:ty) => {
        fn $name($a: $ta, $b: $tb) -> $r {
            // SAFETY: these functions are only stored in the tables of this module, which
            // `kernels_for_isa`/`select` hand out only after `Isa::Vnni.available()` returned
            // true: AVX-512 F/BW/VL/VNNI, AVX2, FMA and F16C are present.
            unsafe { $imp($a, $b) }
        }
    };
}

/// Builds a `vnni` table entry from the AVX-512 one (its `dot_f32`, `isa` and scalar
/// entries stay).
macro_rules! with_vec_dot {
    ($ty:ident, $f:expr) => {{
        match avx512::table(GgmlType::$ty) {
            Some(base) => Kernels { vec_dot: $f, vec_dot_isa: "vnni", ..*base },
            None => return None,
        }
    }};
    ($ty:ident, $f:expr, $tile:expr) => {{
        match avx512::table(GgmlType::$ty) {
            Some(base) => {
                Kernels { vec_dot: $f, vec_dot_isa: "vnni", vec_dot_tile: Some($tile), ..*base }
            }
            None => return None,
        }
    }};
}

/// The VNNI table of `ty`: the AVX-512 table with VNNI `vec_dot`s where this module has them.
pub(super) fn table(ty: GgmlType) -> Option<&'static Kernels> {
    use std::sync::OnceLock;
    static T: OnceLock<[Option<Kernels>; 8]> = OnceLock::new();
    let t = T.get_or_init(|| {
        let mk = |ty: GgmlType| -> Option<Kernels> {
            Some(match ty {
                GgmlType::Q8_0 => with_vec_dot!(Q8_0, vec_dot_q8_0, tile_q8_0),
                GgmlType::Q4_0 => with_vec_dot!(Q4_0, vec_dot_q4_0, tile_q4_0),
                GgmlType::Q5_0 => with_vec_dot!(Q5_0, vec_dot_q5_0, tile_q5_0),
                GgmlType::Q4_K => with_vec_dot!(Q4_K, vec_dot_q4_k, tile_q4_k),
                GgmlType::Q5_K => with_vec_dot!(Q5_K, vec_dot_q5_k, tile_q5_k),
                GgmlType::Q6_K => with_vec_dot!(Q6_K, vec_dot_q6_k),
                GgmlType::IQ4_XS => with_vec_dot!(IQ4_XS, vec_dot_iq4_xs),
                GgmlType::BF16 if bf16_available() => with_vec_dot!(BF16, vec_dot_bf16),
                _ => return None,
            })
        };
        [
            mk(GgmlType::Q8_0),
            mk(GgmlType::Q4_K),
            mk(GgmlType::Q5_K),
            mk(GgmlType::Q6_K),
            mk(GgmlType::IQ4_XS),
            mk(GgmlType::BF16),
            mk(GgmlType::Q4_0),
            mk(GgmlType::Q5_0),
        ]
    });
    let i = match ty {
        GgmlType::Q8_0 => 0,
        GgmlType::Q4_K => 1,
        GgmlType::Q5_K => 2,
        GgmlType::Q6_K => 3,
        GgmlType::IQ4_XS => 4,
        GgmlType::BF16 => 5,
        GgmlType::Q4_0 => 6,
        GgmlType::Q5_0 => 7,
        _ => return avx512::table(ty),
    };
    t[i].as_ref().or_else(|| avx512::table(ty))
}

/// Whether the CPU has AVX512_BF16 (the BF16 `vec_dot` of this table needs it on top of
/// [`super::Isa::Vnni`]).
pub(super) fn bf16_available() -> bool {
    is_x86_feature_detected!("avx512bf16")
}

entry!(vec_dot_q8_0 => q8_0_q8_0(w: &[u8], a: &[u8]) -> f32);
entry!(vec_dot_q4_0 => q4_0_q8_0(w: &[u8], a: &[u8]) -> f32);
entry!(vec_dot_q5_0 => q5_0_q8_0(w: &[u8], a: &[u8]) -> f32);
entry!(vec_dot_q4_k => q4_k_q8_k(w: &[u8], a: &[u8]) -> f32);
entry!(vec_dot_q5_k => q5_k_q8_k(w: &[u8], a: &[u8]) -> f32);
entry!(vec_dot_q6_k => q6_k_q8_k(w: &[u8], a: &[u8]) -> f32);
entry!(vec_dot_iq4_xs => iq4_xs_q8_k(w: &[u8], a: &[u8]) -> f32);

macro_rules! tile_entry {
    ($name:ident => $imp:ident) => {
        fn $name(w: &[u8], wrb: usize, a: &[u8], arb: usize, out: &mut [f32], ldo: usize) {
            // SAFETY: as for `entry!`: only stored in this module's tables, handed out only
            // after `Isa::Vnni.available()` returned true.
            unsafe { $imp(w, wrb, a, arb, out, ldo) }
        }
    };
}

tile_entry!(tile_q8_0 => q8_0_tile);
tile_entry!(tile_q4_0 => q4_0_tile);
tile_entry!(tile_q5_0 => q5_0_tile);
tile_entry!(tile_q4_k => q4_k_tile);
tile_entry!(tile_q5_k => q5_k_tile);

fn vec_dot_bf16(w: &[u8], a: &[u8]) -> f32 {
    // SAFETY: this function is only stored in the BF16 entry of this module's table, which is
    // built only when `bf16_available()` (AVX512_BF16) holds, and the table is only handed out
    // after `Isa::Vnni.available()` (AVX-512 F/BW/VL) returned true.
    unsafe { bf16_bf16(w, a) }
}

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

/// `b[at..at + 16]`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn ld128(b: &[u8], at: usize) -> __m128i {
    let s = &b[at..at + 16];
    // SAFETY: `s` holds 16 readable bytes; the load is unaligned.
    unsafe { _mm_loadu_si128(s.as_ptr().cast()) }
}

/// `b[at..at + 32]`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn ld256(b: &[u8], at: usize) -> __m256i {
    let s = &b[at..at + 32];
    // SAFETY: `s` holds 32 readable bytes; the load is unaligned.
    unsafe { _mm256_loadu_si256(s.as_ptr().cast()) }
}

/// `b[at..at + 64]`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn ld512(b: &[u8], at: usize) -> __m512i {
    let s = &b[at..at + 64];
    // SAFETY: `s` holds 64 readable bytes; the load is unaligned.
    unsafe { _mm512_loadu_si512(s.as_ptr().cast()) }
}

/// Two 32-byte halves as one register (`lo` in bytes 0..32).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn join(lo: __m256i, hi: __m256i) -> __m512i {
    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
}

/// Σ over the 16 i16 `bsums` of a Q8_K block at `y[260..292]` times `mult[i]` (i16 each).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn bsums_dot(y: &[u8], mult: __m256i) -> i32 {
    let p = _mm256_madd_epi16(ld256(y, 260), mult);
    let s = _mm_add_epi32(_mm256_castsi256_si128(p), _mm256_extracti128_si256::<1>(p));
    let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32::<0b01>(s)))
}

// ---------------------------------------------------------------------------------------------
// vec_dot
// ---------------------------------------------------------------------------------------------

/// The four f16 at `b[stride * i..]`, `i` in 0..4, as one u64 (`i` in bits 16i..16i + 16),
/// read by integer loads (no vector shuffles: `VPINSRW` would compete with the kernels'
/// permutes for the same port).
#[inline(always)]
fn f16_bits4(b: &[u8], stride: usize) -> u64 {
    let h = |at: usize| {
        let mut v = [0u8; 2];
        v.copy_from_slice(&b[at..at + 2]);
        u16::from_le_bytes(v) as u64
    };
    h(0) | h(stride) << 16 | h(2 * stride) << 32 | h(3 * stride) << 48
}

/// `VPERMPS` indices that spread the scales of a group of four blocks (lanes 0..4) over the
/// lanes of its pairs: `[k]` puts block 2k's in lanes 0..8 and block 2k + 1's in lanes 8..16.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn pair_lanes() -> [__m512i; 2] {
    let lanes = |k: i32| {
        _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi32(2 * k), _mm512_set1_epi32(2 * k + 1))
    };
    [lanes(0), lanes(1)]
}

/// Q8_0, Q4_0 and Q5_0 against Q8_0, one row: [`q8_rows`] with one row.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn q8_family_row(
    w: &[u8],
    a: &[u8],
    bytes: usize,
    split2: impl Fn(&[u8], &[u8]) -> (__m512i, __m512i),
) -> f32 {
    let nb = (w.len() / bytes).min(a.len() / 34);
    q8_rows::<1>([w], a, nb, bytes, &split2)[0]
}

/// Pair `p` (blocks 2p, 2p + 1) of every row of [`q8_rows`] into its accumulator `p % 2`;
/// `d[i]` the lane scales of row `i`.
///
/// # Safety
/// The CPU must have the features of [`super::Isa::Vnni`] (only called from this module's
/// `#[target_feature]` kernels); `#[inline(always)]` so that the accumulators stay in
/// registers (as a closure it was not always inlined).
#[inline(always)]
unsafe fn q8_pair<const R: usize>(
    acc: &mut [[__m512; 2]; R],
    p: usize,
    d: [__m512; R],
    ws: &[&[u8]; R],
    a: &[u8],
    bytes: usize,
    split2: &impl Fn(&[u8], &[u8]) -> (__m512i, __m512i),
) {
    // SAFETY: the caller guarantees the CPU features (see the function's contract).
    unsafe {
        let y = &a[68 * p..68 * p + 68];
        let aq = join(ld256(y, 2), ld256(y, 36));
        for i in 0..R {
            let x = &ws[i][2 * bytes * p..2 * bytes * (p + 1)];
            // Σ (u − o) a = Σ u a − Σ o a, four products per lane.
            let (u, o) = split2(x, &x[bytes..]);
            let s = _mm512_sub_epi32(
                _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, aq),
                _mm512_dpbusd_epi32(_mm512_setzero_si512(), o, aq),
            );
            acc[i][p % 2] = _mm512_fmadd_ps(d[i], _mm512_cvtepi32_ps(s), acc[i][p % 2]);
        }
    }
}

/// Q8_0, Q4_0 and Q5_0 weight rows `ws` (`nb` blocks of `bytes` each) against one Q8_0
/// activation row `a`: `split2(x0, x1)` gives two weight blocks as unsigned bytes `(u, o)` in
/// value order with `u − o` their quants (`o` the offset the format subtracts, taken out as
/// `Σ o a` with `VPDPBUSD`; Q8_0's weights are flipped by +128). The activations are loaded
/// once for the `R` rows (and a constant offset's `Σ o a` computed once).
///
/// Per row, whatever `R`: two blocks per register (lanes 0..8 block 2p, lanes 8..16 block
/// 2p + 1), the exact integer sums of four products per lane, times `dx · dy` (the f16 scales
/// of four blocks converted at once, spread to the lanes by `VPERMPS`), added with FMA into
/// accumulator `p % 2` (two chains, so that consecutive pairs do not wait on each other); an
/// odd last block is added after the reduction, in the scalar kernel's way. [`q8_row`] does
/// the same per token, so every path gives the same bits.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn q8_rows<const R: usize>(
    ws: [&[u8]; R],
    a: &[u8],
    nb: usize,
    bytes: usize,
    split2: &impl Fn(&[u8], &[u8]) -> (__m512i, __m512i),
) -> [f32; R] {
    let idx = pair_lanes();
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    let groups = nb / 4;
    for g in 0..groups {
        let dy = f16_bits4(&a[136 * g..136 * (g + 1)], 34) as i64;
        // dx · dy of the four blocks: their f16 scales converted by one VCVTPH2PS (exact).
        let mut d4 = [_mm512_setzero_ps(); R];
        for i in 0..R {
            let xg = &ws[i][4 * bytes * g..4 * bytes * (g + 1)];
            let d = _mm256_cvtph_ps(_mm_set_epi64x(dy, f16_bits4(xg, bytes) as i64));
            let d = _mm_mul_ps(_mm256_castps256_ps128(d), _mm256_extractf128_ps::<1>(d));
            d4[i] = _mm512_castps128_ps512(d);
        }
        for k in 0..2 {
            let mut d = [_mm512_setzero_ps(); R];
            for i in 0..R {
                d[i] = _mm512_permutexvar_ps(idx[k], d4[i]);
            }
            // SAFETY: this function's `#[target_feature]` set is that of `Isa::Vnni`.
            unsafe { q8_pair(&mut acc, 2 * g + k, d, &ws, a, bytes, split2) };
        }
    }
    let mut b = 4 * groups;
    if b + 2 <= nb {
        let y = &a[34 * b..34 * (b + 2)];
        let mut d = [_mm512_setzero_ps(); R];
        for i in 0..R {
            let x = &ws[i][bytes * b..bytes * (b + 2)];
            d[i] = _mm512_mask_blend_ps(
                0xFF00,
                _mm512_set1_ps(f16_at(x, 0) * f16_at(y, 0)),
                _mm512_set1_ps(f16_at(x, bytes) * f16_at(y, 34)),
            );
        }
        // SAFETY: as above.
        unsafe { q8_pair(&mut acc, b / 2, d, &ws, a, bytes, split2) };
        b += 2;
    }
    let mut out = [0f32; R];
    for i in 0..R {
        out[i] = _mm512_reduce_add_ps(_mm512_add_ps(acc[i][0], acc[i][1]));
        if b < nb {
            let (x, y) = (&ws[i][bytes * b..bytes * (b + 1)], &a[34 * b..34 * b + 34]);
            let (u, o) = split2(x, x);
            let (u, o) = (_mm512_castsi512_si256(u), _mm512_castsi512_si256(o));
            out[i] += tail_sumi(u, o, y) as f32 * (f16_at(x, 0) * f16_at(y, 0));
        }
    }
    out
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn q8_0_q8_0(w: &[u8], a: &[u8]) -> f32 {
    q8_family_row(w, a, 34, |x0, x1| (q8_0_unpack2(x0, x1), _mm512_set1_epi8(-128)))
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn q4_0_q8_0(w: &[u8], a: &[u8]) -> f32 {
    q8_family_row(w, a, 18, |x0, x1| (nibbles64(x0, x1, 2), _mm512_set1_epi8(8)))
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn q5_0_q8_0(w: &[u8], a: &[u8]) -> f32 {
    q8_family_row(w, a, 22, |x0, x1| q5_0_split2(x0, x1))
}

/// The quants of two Q8_0 blocks, offset by +128 (`w ^ 0x80`) to unsigned bytes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn q8_0_unpack2(x0: &[u8], x1: &[u8]) -> __m512i {
    _mm512_xor_si512(join(ld256(x0, 2), ld256(x1, 2)), _mm512_set1_epi8(-128))
}

/// The 16 bytes at `at` of two blocks split into 64 nibbles: those of `x0` (low nibbles,
/// values 0..16, then high ones), then those of `x1`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn nibbles64(x0: &[u8], x1: &[u8], at: usize) -> __m512i {
    let q = join(
        _mm256_broadcastsi128_si256(ld128(x0, at)),
        _mm256_broadcastsi128_si256(ld128(x1, at)),
    );
    // Each block's bytes sit in two 128-bit lanes: shifted by 0 (low nibbles) and by 4.
    let q = _mm512_srlv_epi64(q, _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0));
    _mm512_and_si512(q, _mm512_set1_epi8(0xF))
}

/// The unsigned quants (0..32) of two Q5_0 blocks in value order.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn q5_0_unpack2(x0: &[u8], x1: &[u8]) -> __m512i {
    // Bit j of qh is the fifth bit of value j: 16 added to the nibbles whose bit is set.
    let n = nibbles64(x0, x1, 6);
    _mm512_mask_add_epi8(n, q5_0_qh(x0) | q5_0_qh(x1) << 32, n, _mm512_set1_epi8(16))
}

/// The fifth bits of a Q5_0 block (`x[2..6]`, bit j for value j), read as one 32-bit load.
#[inline(always)]
fn q5_0_qh(x: &[u8]) -> u64 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&x[2..6]);
    u32::from_le_bytes(v) as u64
}

/// Two Q5_0 blocks as `(u, o)` with `u − o` their quants minus 16 (`q8_family_row`'s form):
/// `u` the low four bits, `o` 16 where the fifth bit is clear (`q − 16 = nib − 16 (1 − h)`),
/// one masked move instead of [`q5_0_unpack2`]'s OR and blend.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn q5_0_split2(x0: &[u8], x1: &[u8]) -> (__m512i, __m512i) {
    let o = _mm512_maskz_mov_epi8(!(q5_0_qh(x0) | q5_0_qh(x1) << 32), _mm512_set1_epi8(16));
    (nibbles64(x0, x1, 6), o)
}

/// The scales and mins of a Q4_K/Q5_K block (`x[4..16]`), as eight bytes each in one u64
/// (ggml's `utmp` shuffle; the same values as [`k4_scales_mins`]).
#[inline(always)]
fn k4_scales_mins_u64(x: &[u8]) -> (u64, u64) {
    const KMASK1: u32 = 0x3f3f_3f3f;
    const KMASK2: u32 = 0x0f0f_0f0f;
    const KMASK3: u32 = 0x0303_0303;
    let u = |i: usize| u32::from_le_bytes([x[4 + 4 * i], x[5 + 4 * i], x[6 + 4 * i], x[7 + 4 * i]]);
    let (u0, u1, u2) = (u(0), u(1), u(2));
    let sc_lo = u0 & KMASK1;
    let sc_hi = (u2 & KMASK2) | (((u0 >> 6) & KMASK3) << 4);
    let mn_lo = u1 & KMASK1;
    let mn_hi = ((u2 >> 4) & KMASK2) | (((u1 >> 6) & KMASK3) << 4);
    (sc_lo as u64 | (sc_hi as u64) << 32, mn_lo as u64 | (mn_hi as u64) << 32)
}

/// One Q4_K/Q5_K weight block unpacked for `VPDPBUSD`: `q[j]` the unsigned quants of values
/// `64j..64j + 64`, `s[j]` the scales of its two 32-value sub-blocks as i16 in the low half
/// of each i32 lane (lanes 0..8: sub-block 2j, 8..16: 2j + 1), `mins` the mins per 16-value
/// group as i16, `d`/`dmin` the block scales.
struct K4Block {
    q: [__m512i; 4],
    s: [__m512i; 4],
    mins: __m256i,
    d: f32,
    dmin: f32,
}

///
/// # Safety
/// The CPU must have the features of [`super::Isa::Vnni`] (only called from this module's
/// `#[target_feature]` kernels). Not itself a `#[target_feature]` function so that it can be
/// `#[inline(always)]`: a K4Block returned through memory would cost more than the unpacking.
#[inline(always)]
unsafe fn k4_unpack(x: &[u8], qs: usize, hbits: &impl Fn(&[u8], usize) -> __m512i) -> K4Block {
    // SAFETY: the caller guarantees the CPU features (see the function's contract).
    unsafe {
        let m4 = _mm256_set1_epi8(0xF);
        let (sc, mn) = k4_scales_mins_u64(x);
        let sv = _mm_cvtsi64_si128(sc as i64);
        // Plain loops rather than `array::from_fn`, which is not always inlined here.
        let mut s = [_mm512_setzero_si512(); 4];
        for (j, s) in s.iter_mut().enumerate() {
            let idx = _mm_set_epi64x(
                0x0101_0101_0101_0101 * (2 * j as i64 + 1),
                0x0101_0101_0101_0101 * (2 * j as i64),
            );
            *s = _mm512_cvtepu8_epi32(_mm_shuffle_epi8(sv, idx));
        }
        let mins = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(
            _mm_cvtsi64_si128(mn as i64),
            _mm_set_epi64x(0x0707_0606_0505_0404, 0x0303_0202_0101_0000),
        ));
        let mut q = [_mm512_setzero_si512(); 4];
        for (j, q) in q.iter_mut().enumerate() {
            let q4 = ld256(x, qs + 32 * j);
            let lo = _mm256_and_si256(q4, m4);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q4), m4);
            *q = _mm512_or_si512(join(lo, hi), hbits(x, j));
        }
        K4Block { q, s, mins, d: f16_at(x, 0), dmin: f16_at(x, 2) }
    }
}

/// Prefetches the cache lines `bytes` bytes from `at` on, `super::prefetch_distance()` bytes
/// ahead of `at` (nothing when the distance is 0). A prefetch never faults, so the address may
/// lie past the end of `x` (the next weight row, or nothing).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn prefetch_ahead(x: &[u8], at: usize, bytes: usize, dist: usize) {
    if dist == 0 {
        return;
    }
    let p = x.as_ptr().wrapping_add(at + dist);
    let mut off = 0;
    while off < bytes {
        // `_mm_prefetch` is a safe hint that never faults; `wrapping_add` forms the address
        // without asserting that it is in bounds.
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(off).cast());
        off += 64;
    }
}

/// Σ of the eight f32 lanes of `v`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn hsum256_ps(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// One Q4_K/Q5_K weight row `x` (`nb` blocks of `bytes`) against the `G` Q8_K activation
/// rows `ys`: each block is unpacked once for the `G` rows.
///
/// Per (row, token) the operations are always the same, whatever `G` (so every `G`, and the
/// single-row `vec_dot`, give bit-identical results): per block, the exact integer sum
/// `Σ_j Σ q a · scale` in sixteen i32 lanes (`VPDPBUSD`, then `VPDPWSSD` with the scales:
/// each `VPDPBUSD` lane is `|Σ4 q a| ≤ 4 · 31 · 128 < 2^15`, an exact i16) times `d · y.d`
/// added with FMA into sixteen f32 lanes, and the mins' integer sums (eight i32 lanes of
/// `bsums · min`) times `dmin · y.d` into eight more; the result is the sum of the first
/// lanes minus the sum of the second.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn k4_row<const G: usize>(
    x: &[u8],
    nb: usize,
    bytes: usize,
    ys: [&[u8]; G],
    qs: usize,
    hbits: &impl Fn(&[u8], usize) -> __m512i,
    dist: usize,
) -> [f32; G] {
    {
        let mut acc = [_mm512_setzero_ps(); G];
        let mut macc = [_mm256_setzero_ps(); G];
        for b in 0..nb {
            prefetch_ahead(x, bytes * b, bytes, dist);
            // SAFETY: this function's `#[target_feature]` set is that of `Isa::Vnni`.
            let blk = unsafe { k4_unpack(&x[bytes * b..bytes * (b + 1)], qs, hbits) };
            for t in 0..G {
                let y = &ys[t][292 * b..292 * (b + 1)];
                let yd = f32_at(y, 0);
                let mut isum = _mm512_setzero_si512();
                for j in 0..4 {
                    let p =
                        _mm512_dpbusd_epi32(_mm512_setzero_si512(), blk.q[j], ld512(y, 4 + 64 * j));
                    isum = _mm512_dpwssd_epi32(isum, p, blk.s[j]);
                }
                acc[t] =
                    _mm512_fmadd_ps(_mm512_set1_ps(blk.d * yd), _mm512_cvtepi32_ps(isum), acc[t]);
                let m = _mm256_madd_epi16(ld256(y, 260), blk.mins);
                macc[t] =
                    _mm256_fmadd_ps(_mm256_set1_ps(blk.dmin * yd), _mm256_cvtepi32_ps(m), macc[t]);
            }
        }
        let mut out = [0f32; G];
        for t in 0..G {
            out[t] = _mm512_reduce_add_ps(acc[t]) - hsum256_ps(macc[t]);
        }
        out
    }
}

/// Token groups of a tile: 8 tokens at a time, the rest in groups of 4, 2 and 1.
#[inline(always)]
fn group_of(left: usize) -> usize {
    match left {
        8.. => 8,
        4..=7 => 4,
        2..=3 => 2,
        _ => 1,
    }
}

/// The Q4_K/Q5_K tile (see [`super::VecDotTileFn`] for the arguments' contract).
#[allow(clippy::too_many_arguments)] // the tile contract plus the format's parameters
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn k4_tile(
    w: &[u8],
    wrb: usize,
    a: &[u8],
    arb: usize,
    out: &mut [f32],
    ldo: usize,
    bytes: usize,
    qs: usize,
    hbits: impl Fn(&[u8], usize) -> __m512i,
) {
    let nb = (wrb / bytes).min(arb / 292);
    let dist = super::prefetch_distance();
    let (rows, tokens) = (w.len() / wrb, a.len() / arb);
    let row = |t: usize| &a[t * arb..(t + 1) * arb];
    let mut t0 = 0;
    while t0 < tokens {
        let g = group_of(tokens - t0);
        let ys8: [&[u8]; 8] = std::array::from_fn(|i| row((t0 + i).min(tokens - 1)));
        for (r, x) in w.chunks_exact(wrb).enumerate().take(rows) {
            macro_rules! go {
                ($g:literal) => {{
                    let mut ys: [&[u8]; $g] = [&[]; $g];
                    ys.copy_from_slice(&ys8[..$g]);
                    let v = k4_row::<$g>(x, nb, bytes, ys, qs, &hbits, dist);
                    for (i, v) in v.into_iter().enumerate() {
                        out[(t0 + i) * ldo + r] = v;
                    }
                }};
            }
            match g {
                8 => go!(8),
                4 => go!(4),
                2 => go!(2),
                _ => go!(1),
            }
        }
        t0 += g;
    }
}

/// The single-row Q4_K/Q5_K `vec_dot`: the tile kernel with one row and one token.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn k4_q8_k(
    w: &[u8],
    a: &[u8],
    bytes: usize,
    qs: usize,
    hbits: impl Fn(&[u8], usize) -> __m512i,
) -> f32 {
    let nb = (w.len() / bytes).min(a.len() / 292);
    k4_row::<1>(w, nb, bytes, [a], qs, &hbits, 0)[0]
}

// ---------------------------------------------------------------------------------------------
// Q4_K: scales applied in f32 after an integer reduction
// ---------------------------------------------------------------------------------------------

/// One Q4_K weight block prepared for `VPDPBUSD`: `w[j]` holds values `64j..64j + 64` as
/// unsigned bytes in value order, the low nibbles (sub-block 2j) as they are and the high
/// nibbles (sub-block 2j + 1) left in place, i.e. times 16 (one AND, no shift: the factor is
/// taken out of `dsc`); `dsc` the f32 factor `d · scale` of each lane of [`q4k_reduce`]'s
/// result (sub-blocks 0, 2, 4, 6 twice, then 1, 3, 5, 7 twice, divided by 16); `mins` the
/// mins per 16-value group as i16 (for the activations' `bsums`), `dmin` the block's min
/// scale.
struct Q4kBlock {
    w: [__m512i; 4],
    dsc: __m512,
    mins: __m256i,
    dmin: f32,
}

/// Unpacks one Q4_K block (`x`, 144 bytes) for [`q4k_row`].
///
/// # Safety
/// The CPU must have the features of [`super::Isa::Vnni`] (only called from this module's
/// `#[target_feature]` kernels); `#[inline(always)]` so that the block stays in registers.
#[inline(always)]
unsafe fn q4k_unpack(x: &[u8]) -> Q4kBlock {
    // SAFETY: the caller guarantees the CPU features (see the function's contract).
    unsafe {
        let mask = _mm512_inserti64x4::<1>(_mm512_set1_epi8(0x0F), _mm256_set1_epi8(0xF0u8 as i8));
        let mut w = [_mm512_setzero_si512(); 4];
        for (j, w) in w.iter_mut().enumerate() {
            // Both halves get the same 32 bytes (a broadcast load); the mask keeps the low
            // nibbles in the lower half and the high ones in the upper half.
            *w = _mm512_and_si512(_mm512_broadcast_i64x4(ld256(x, 16 + 32 * j)), mask);
        }
        let (sc, mn) = k4_scales_mins_u64(x);
        let order = _mm_setr_epi8(0, 2, 4, 6, 0, 2, 4, 6, 1, 3, 5, 7, 1, 3, 5, 7);
        let sc16 = _mm512_cvtepu8_epi32(_mm_shuffle_epi8(_mm_cvtsi64_si128(sc as i64), order));
        // d and dmin: two f16 at x[0..4], converted exactly.
        let dd =
            _mm_cvtph_ps(_mm_cvtsi32_si128(u32::from_le_bytes([x[0], x[1], x[2], x[3]]) as i32));
        let d = _mm512_broadcastss_ps(dd);
        // 1/16 for the high-nibble lanes: a power of two, so `d / 16` is exact.
        let d16 = _mm512_mask_mul_ps(d, 0xFF00, d, _mm512_set1_ps(1.0 / 16.0));
        let mins = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(
            _mm_cvtsi64_si128(mn as i64),
            _mm_set_epi64x(0x0707_0606_0505_0404, 0x0303_0202_0101_0000),
        ));
        Q4kBlock {
            w,
            dsc: _mm512_mul_ps(d16, _mm512_cvtepi32_ps(sc16)),
            mins,
            dmin: _mm_cvtss_f32(_mm_movehdup_ps(dd)),
        }
    }
}

/// Four `VPDPBUSD` results (sixteen i32 lanes each; lanes 0..8 of `p[j]` belong to sub-block
/// 2j, lanes 8..16 to 2j + 1) summed per 128-bit quarter: quarter `c` of the result holds the
/// sums of quarter `c` of `p[0]`, `p[1]`, `p[2]`, `p[3]`, i.e. lanes for sub-blocks 0, 2, 4, 6
/// (quarters 0 and 1) and 1, 3, 5, 7 (quarters 2 and 3). Exact (integer adds).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn q4k_reduce(p: [__m512i; 4]) -> __m512i {
    let t01 =
        _mm512_add_epi32(_mm512_unpacklo_epi32(p[0], p[1]), _mm512_unpackhi_epi32(p[0], p[1]));
    let t23 =
        _mm512_add_epi32(_mm512_unpacklo_epi32(p[2], p[3]), _mm512_unpackhi_epi32(p[2], p[3]));
    _mm512_add_epi32(_mm512_unpacklo_epi64(t01, t23), _mm512_unpackhi_epi64(t01, t23))
}

/// One Q4_K weight row `x` (`nb` blocks) against the `G` Q8_K activation rows `ys`: each
/// block is unpacked once for the `G` rows.
///
/// Per (row, token) the operations are the same whatever `G` (so every `G`, and the
/// single-row `vec_dot`, give bit-identical results): per block, four `VPDPBUSD` (exact
/// integer products, four per i32 lane), the exact integer reduction [`q4k_reduce`] to
/// sixteen lanes of one sub-block each, converted to f32 and multiplied with `dsc · y.d`
/// (FMA into sixteen f32 lanes); the mins' integer sums (eight i32 lanes of `bsums · min`)
/// times `dmin · y.d` into eight more; the result is the sum of the first lanes minus the sum
/// of the second.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn q4k_row<const G: usize>(x: &[u8], nb: usize, ys: [&[u8]; G], dist: usize) -> [f32; G] {
    let mut acc = [_mm512_setzero_ps(); G];
    let mut macc = [_mm256_setzero_ps(); G];
    for (b, xb) in x.chunks_exact(144).take(nb).enumerate() {
        prefetch_ahead(x, 144 * b, 144, dist);
        // SAFETY: this function's `#[target_feature]` set is that of `Isa::Vnni`.
        let blk = unsafe { q4k_unpack(xb) };
        for t in 0..G {
            let y = &ys[t][292 * b..292 * (b + 1)];
            let z = _mm512_setzero_si512();
            let mut p = [z; 4];
            for j in 0..4 {
                p[j] = _mm512_dpbusd_epi32(z, blk.w[j], ld512(y, 4 + 64 * j));
            }
            let yd = f32_at(y, 0);
            let f = _mm512_mul_ps(blk.dsc, _mm512_set1_ps(yd));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q4k_reduce(p)), f, acc[t]);
            let m = _mm256_madd_epi16(ld256(y, 260), blk.mins);
            macc[t] =
                _mm256_fmadd_ps(_mm256_set1_ps(blk.dmin * yd), _mm256_cvtepi32_ps(m), macc[t]);
        }
    }
    let mut out = [0f32; G];
    for t in 0..G {
        out[t] = _mm512_reduce_add_ps(acc[t]) - hsum256_ps(macc[t]);
    }
    out
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn q4_k_q8_k(w: &[u8], a: &[u8]) -> f32 {
    let nb = (w.len() / 144).min(a.len() / 292);
    q4k_row::<1>(w, nb, [a], 0)[0]
}

/// The Q4_K tile (see [`super::VecDotTileFn`] for the arguments' contract).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn q4_k_tile(w: &[u8], wrb: usize, a: &[u8], arb: usize, out: &mut [f32], ldo: usize) {
    let nb = (wrb / 144).min(arb / 292);
    let dist = super::prefetch_distance();
    let (rows, tokens) = (w.len() / wrb, a.len() / arb);
    let row = |t: usize| &a[t * arb..(t + 1) * arb];
    let mut t0 = 0;
    while t0 < tokens {
        let g = group_of(tokens - t0);
        let ys8: [&[u8]; 8] = std::array::from_fn(|i| row((t0 + i).min(tokens - 1)));
        for (r, x) in w.chunks_exact(wrb).enumerate().take(rows) {
            macro_rules! go {
                ($g:literal) => {{
                    let mut ys: [&[u8]; $g] = [&[]; $g];
                    ys.copy_from_slice(&ys8[..$g]);
                    let v = q4k_row::<$g>(x, nb, ys, dist);
                    for (i, v) in v.into_iter().enumerate() {
                        out[(t0 + i) * ldo + r] = v;
                    }
                }};
            }
            match g {
                8 => go!(8),
                4 => go!(4),
                2 => go!(2),
                _ => go!(1),
            }
        }
        t0 += g;
    }
}

/// Q5_K's fifth bits of chunk `j`: `qh[l]` bit 2j → value 64j + l, bit 2j + 1 → value
/// 64j + 32 + l; moved to bit 4.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn q5_k_hbits(x: &[u8], j: usize) -> __m512i {
    {
        let c16 = _mm256_set1_epi8(16);
        let h = ld256(x, 16);
        let sh = _mm_cvtsi32_si128(2 * j as i32);
        let h1 = _mm256_srl_epi16(h, sh);
        let lo = _mm256_and_si256(_mm256_slli_epi16::<4>(h1), c16);
        let hi = _mm256_and_si256(_mm256_slli_epi16::<3>(h1), c16);
        join(lo, hi)
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn q5_k_q8_k(w: &[u8], a: &[u8]) -> f32 {
    k4_q8_k(w, a, 176, 48, |x, j| q5_k_hbits(x, j))
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn q5_k_tile(w: &[u8], wrb: usize, a: &[u8], arb: usize, out: &mut [f32], ldo: usize) {
    k4_tile(w, wrb, a, arb, out, ldo, 176, 48, |x, j| q5_k_hbits(x, j))
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn q6_k_q8_k(w: &[u8], a: &[u8]) -> f32 {
    let (m4, m3) = (_mm256_set1_epi8(0xF), _mm256_set1_epi8(3));
    // Lane l of register c (values 64c..64c + 64) belongs to group 4c + l / 4.
    let idx: [__m128i; 4] = std::array::from_fn(|c| {
        let v: [u8; 16] = std::array::from_fn(|l| (4 * c + l / 4) as u8);
        // SAFETY: `v` holds 16 readable bytes; the load is unaligned.
        unsafe { _mm_loadu_si128(v.as_ptr().cast()) }
    });
    let mut sumf = 0f32;
    for (x, y) in w.chunks_exact(210).zip(a.chunks_exact(292)) {
        let scales = ld128(x, 192);
        // The −32 offset: 32 · Σ_g scale[g] · bsums[g].
        let off = bsums_dot(y, _mm256_cvtepi8_epi16(scales));
        let mut isum = _mm512_setzero_si512();
        for n in 0..2 {
            let a0 = ld256(x, 64 * n);
            let a1 = ld256(x, 64 * n + 32);
            let h = ld256(x, 128 + 32 * n);
            let hb = |s: __m256i| _mm256_slli_epi16::<4>(_mm256_and_si256(s, m3));
            let nib = |s: __m256i| _mm256_and_si256(_mm256_srli_epi16::<4>(s), m4);
            // Values 128n + 32m + l for m = 0..4, unsigned 0..64.
            let q0 = _mm256_or_si256(_mm256_and_si256(a0, m4), hb(h));
            let q1 = _mm256_or_si256(_mm256_and_si256(a1, m4), hb(_mm256_srli_epi16::<2>(h)));
            let q2 = _mm256_or_si256(nib(a0), hb(_mm256_srli_epi16::<4>(h)));
            let q3 = _mm256_or_si256(nib(a1), hb(_mm256_srli_epi16::<6>(h)));
            for (c, q) in [(2 * n, join(q0, q1)), (2 * n + 1, join(q2, q3))] {
                let p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, ld512(y, 4 + 64 * c));
                let s = _mm512_cvtepi8_epi32(_mm_shuffle_epi8(scales, idx[c]));
                isum = _mm512_add_epi32(isum, _mm512_mullo_epi32(p, s));
            }
        }
        // Exact in i32: |Σ q a s| < 64 · 128 · 128 · 256 and |32 · off| < 32 · 128 · 2048 · 16.
        let total = _mm512_reduce_add_epi32(isum) - 32 * off;
        sumf += (f16_at(x, 208) * f32_at(y, 0)) * total as f32;
    }
    sumf
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn iq4_xs_q8_k(w: &[u8], a: &[u8]) -> f32 {
    // KVALUES_IQ4NL + 128 as unsigned bytes (1..=241), in every 128-bit lane.
    let t: [u8; 16] = std::array::from_fn(|i| (KVALUES_IQ4NL[i] as i32 + 128) as u8);
    // SAFETY: `t` holds 16 readable bytes; the load is unaligned.
    let table = _mm512_broadcast_i32x4(unsafe { _mm_loadu_si128(t.as_ptr().cast()) });
    let m4 = _mm_set1_epi8(0xF);
    let mut sumf = 0f32;
    for (x, y) in w.chunks_exact(136).zip(a.chunks_exact(292)) {
        let sh = u16::from_le_bytes([x[2], x[3]]);
        // Scales of the eight 32-value groups; lane l of register c is in group 2c + l / 8.
        let ls: [i32; 8] = std::array::from_fn(|ib| {
            (((x[4 + ib / 2] >> (4 * (ib % 2))) & 0xf) | ((((sh >> (2 * ib)) & 3) as u8) << 4))
                as i32
                - 32
        });
        // Offset: 128 · Σ_ib ls[ib] · (bsums[2ib] + bsums[2ib + 1]).
        let m16: [i16; 16] = std::array::from_fn(|g| ls[g / 2] as i16);
        // SAFETY: `m16` holds 16 readable i16 (32 bytes); the load is unaligned.
        let off = bsums_dot(y, unsafe { _mm256_loadu_si256(m16.as_ptr().cast()) });
        let mut isum = _mm512_setzero_si512();
        for c in 0..4 {
            // Groups 2c and 2c + 1: 16 bytes each, low nibbles first.
            let b0 = ld128(x, 8 + 32 * c);
            let b1 = ld128(x, 8 + 32 * c + 16);
            let lo0 = _mm_and_si128(b0, m4);
            let hi0 = _mm_and_si128(_mm_srli_epi16::<4>(b0), m4);
            let lo1 = _mm_and_si128(b1, m4);
            let hi1 = _mm_and_si128(_mm_srli_epi16::<4>(b1), m4);
            let i0 = _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(lo0), hi0);
            let i1 = _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(lo1), hi1);
            let q = _mm512_shuffle_epi8(table, join(i0, i1));
            let p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, ld512(y, 4 + 64 * c));
            let s = _mm512_mask_blend_epi32(
                0xFF00,
                _mm512_set1_epi32(ls[2 * c]),
                _mm512_set1_epi32(ls[2 * c + 1]),
            );
            isum = _mm512_add_epi32(isum, _mm512_mullo_epi32(p, s));
        }
        // Exact in i32: |Σ (k + 128) a ls| < 241 · 128 · 256 · 32 and |128 · off| < 2^27.
        let total = _mm512_reduce_add_epi32(isum) - 128 * off;
        sumf += (f16_at(x, 0) * f32_at(y, 0)) * total as f32;
    }
    sumf
}

// ---------------------------------------------------------------------------------------------
// Q8_0-family tiles
// ---------------------------------------------------------------------------------------------

/// One token's pair of Q8_0 activation blocks prepared once for all the rows of a tile: the
/// 64 quants, minus the offset correction `Σ c · a` per i32 lane (as the single-row kernels
/// compute it, with `VPDPBUSD`), and the two block scales per lane (lanes 0..8, 8..16).
#[derive(Clone, Copy)]
struct Q8Pair {
    aq: __m512i,
    negc: __m512i,
    da: __m512,
}

/// `Σ (u − o) a` over the 32 quants of the Q8_0 block `y` (exact).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn tail_sumi(u: __m256i, o: __m256i, y: &[u8]) -> i32 {
    let aq = ld256(y, 2);
    let p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, aq);
    let q = _mm256_dpbusd_epi32(_mm256_setzero_si256(), o, aq);
    let v = _mm256_sub_epi32(p, q);
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32::<0b01>(s)))
}

/// One weight row `x` (`nb` blocks of `bytes`; `unpack2` gives two blocks' 64 quants as
/// unsigned bytes, `c` the offset subtracted through the activations) against `G` prepared
/// tokens (`prep[t * pairs..]`, `ys[t]` their rows for the tail block). Per (row, token), the
/// same operations as [`q8_family_row`] in the same order (two accumulators, pair `p` into
/// `p % 2`): bit-identical results.
#[allow(clippy::too_many_arguments)] // a row, its tokens and the format's parameters
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn q8_row<const G: usize>(
    x: &[u8],
    nb: usize,
    bytes: usize,
    prep: &[Q8Pair],
    ys: [&[u8]; G],
    c: i8,
    unpack2: &impl Fn(&[u8], &[u8]) -> __m512i,
    dist: usize,
) -> [f32; G] {
    {
        let pairs = nb / 2;
        let idx = pair_lanes();
        let mut acc = [[_mm512_setzero_ps(); 2]; G];
        let mut step = |p: usize, dw: __m512| {
            let x2 = &x[2 * bytes * p..2 * bytes * (p + 1)];
            let wq = unpack2(x2, &x2[bytes..]);
            for t in 0..G {
                let pp = &prep[t * pairs + p];
                let s = _mm512_dpbusd_epi32(pp.negc, wq, pp.aq);
                let d = _mm512_mul_ps(dw, pp.da);
                acc[t][p % 2] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(s), acc[t][p % 2]);
            }
        };
        let groups = nb / 4;
        for (g, xg) in x.chunks_exact(4 * bytes).take(groups).enumerate() {
            prefetch_ahead(x, 4 * bytes * g, 4 * bytes, dist);
            let dw = _mm_cvtph_ps(_mm_cvtsi64_si128(f16_bits4(xg, bytes) as i64));
            let d4 = _mm512_castps128_ps512(dw);
            for k in 0..2 {
                step(2 * g + k, _mm512_permutexvar_ps(idx[k], d4));
            }
        }
        if pairs % 2 == 1 {
            let p = pairs - 1;
            prefetch_ahead(x, 2 * bytes * p, 2 * bytes, dist);
            let dw = _mm512_mask_blend_ps(
                0xFF00,
                _mm512_set1_ps(f16_at(x, 2 * bytes * p)),
                _mm512_set1_ps(f16_at(x, 2 * bytes * p + bytes)),
            );
            step(p, dw);
        }
        let mut out = [0f32; G];
        for t in 0..G {
            out[t] = _mm512_reduce_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]));
        }
        if nb % 2 == 1 {
            let b = nb - 1;
            let xb = &x[bytes * b..bytes * (b + 1)];
            let xq = _mm512_castsi512_si256(unpack2(xb, xb));
            let cv = _mm256_set1_epi8(c);
            for t in 0..G {
                let y = &ys[t][34 * b..34 * (b + 1)];
                out[t] += tail_sumi(xq, cv, y) as f32 * (f16_at(xb, 0) * f16_at(y, 0));
            }
        }
        out
    }
}

/// The Q8_0/Q4_0/Q5_0 × Q8_0 tile (see [`super::VecDotTileFn`]).
#[allow(clippy::too_many_arguments)] // the tile contract plus the format's parameters
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn q8_tile(
    w: &[u8],
    wrb: usize,
    a: &[u8],
    arb: usize,
    out: &mut [f32],
    ldo: usize,
    bytes: usize,
    c: i8,
    unpack2: impl Fn(&[u8], &[u8]) -> __m512i,
) {
    let nb = (wrb / bytes).min(arb / 34);
    let dist = super::prefetch_distance();
    let pairs = nb / 2;
    let (rows, tokens) = (w.len() / wrb, a.len() / arb);
    let row = |t: usize| &a[t * arb..(t + 1) * arb];
    let mut prep: Vec<Q8Pair> = Vec::with_capacity(group_of(tokens) * pairs);
    let cv = _mm512_set1_epi8(c);
    let mut t0 = 0;
    while t0 < tokens {
        let g = group_of(tokens - t0);
        prep.clear();
        for i in 0..g {
            let y = row(t0 + i);
            for p in 0..pairs {
                let (y0, y1) = (&y[68 * p..68 * p + 34], &y[68 * p + 34..68 * p + 68]);
                let aq = join(ld256(y0, 2), ld256(y1, 2));
                let corr = _mm512_dpbusd_epi32(_mm512_setzero_si512(), cv, aq);
                prep.push(Q8Pair {
                    aq,
                    negc: _mm512_sub_epi32(_mm512_setzero_si512(), corr),
                    da: _mm512_mask_blend_ps(
                        0xFF00,
                        _mm512_set1_ps(f16_at(y0, 0)),
                        _mm512_set1_ps(f16_at(y1, 0)),
                    ),
                });
            }
        }
        let ys8: [&[u8]; 8] = std::array::from_fn(|i| row((t0 + i).min(tokens - 1)));
        for (r, x) in w.chunks_exact(wrb).enumerate().take(rows) {
            macro_rules! go {
                ($g:literal) => {{
                    let mut ys: [&[u8]; $g] = [&[]; $g];
                    ys.copy_from_slice(&ys8[..$g]);
                    let v = q8_row::<$g>(x, nb, bytes, &prep, ys, c, &unpack2, dist);
                    for (i, v) in v.into_iter().enumerate() {
                        out[(t0 + i) * ldo + r] = v;
                    }
                }};
            }
            match g {
                8 => go!(8),
                4 => go!(4),
                2 => go!(2),
                _ => go!(1),
            }
        }
        t0 += g;
    }
}

/// Below this many tokens the Q8_0-family tiles run the single-row kernel four rows at a time
/// ([`rows_tile`]): preparing the activations costs more than it saves (measured: `q8_0_tile`
/// with one or two tokens per call was the hot spot of the decode layer; with one token the
/// prepared path took 107 ns per Q8_0 row of 1408 against the single row's 45).
const Q8_TILE_MIN_TOKENS: usize = 4;

/// Rows blocked by four against each token in turn ([`q8_rows`]: each token's activations
/// loaded once per four rows), for tiles of fewer than [`Q8_TILE_MIN_TOKENS`] tokens: the
/// same operations per (row, token) as `vec_dot`.
#[allow(clippy::too_many_arguments)] // the tile contract plus the format's parameters
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn rows_tile<const R: usize>(
    w: &[u8],
    wrb: usize,
    a: &[u8],
    arb: usize,
    out: &mut [f32],
    ldo: usize,
    bytes: usize,
    split2: impl Fn(&[u8], &[u8]) -> (__m512i, __m512i),
) {
    let nb = (wrb / bytes).min(arb / 34);
    let rows = w.len() / wrb;
    let row = |r: usize| &w[r * wrb..(r + 1) * wrb];
    for (t, at) in a.chunks_exact(arb).enumerate() {
        let o = &mut out[t * ldo..t * ldo + rows];
        let mut r = 0;
        while r + R <= rows {
            let mut ws: [&[u8]; R] = [&[]; R];
            for (i, x) in ws.iter_mut().enumerate() {
                *x = row(r + i);
            }
            o[r..r + R].copy_from_slice(&q8_rows::<R>(ws, at, nb, bytes, &split2));
            r += R;
        }
        for r in r..rows {
            o[r] = q8_rows::<1>([row(r)], at, nb, bytes, &split2)[0];
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn q8_0_tile(w: &[u8], wrb: usize, a: &[u8], arb: usize, out: &mut [f32], ldo: usize) {
    if a.len() / arb < Q8_TILE_MIN_TOKENS {
        let flip = _mm512_set1_epi8(-128);
        return rows_tile::<4>(w, wrb, a, arb, out, ldo, 34, |x0, x1| (q8_0_unpack2(x0, x1), flip));
    }
    q8_tile(w, wrb, a, arb, out, ldo, 34, -128, |x0, x1| q8_0_unpack2(x0, x1))
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn q4_0_tile(w: &[u8], wrb: usize, a: &[u8], arb: usize, out: &mut [f32], ldo: usize) {
    if a.len() / arb < Q8_TILE_MIN_TOKENS {
        let c = _mm512_set1_epi8(8);
        return rows_tile::<4>(w, wrb, a, arb, out, ldo, 18, |x0, x1| (nibbles64(x0, x1, 2), c));
    }
    q8_tile(w, wrb, a, arb, out, ldo, 18, 8, |x0, x1| nibbles64(x0, x1, 2))
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn q5_0_tile(w: &[u8], wrb: usize, a: &[u8], arb: usize, out: &mut [f32], ldo: usize) {
    if a.len() / arb < Q8_TILE_MIN_TOKENS {
        return rows_tile::<4>(w, wrb, a, arb, out, ldo, 22, |x0, x1| q5_0_split2(x0, x1));
    }
    q8_tile(w, wrb, a, arb, out, ldo, 22, 16, |x0, x1| q5_0_unpack2(x0, x1))
}

// ---------------------------------------------------------------------------------------------
// BF16
// ---------------------------------------------------------------------------------------------

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
fn ld_bh(b: &[u8], at: usize) -> __m512bh {
    let s = &b[at..at + 64];
    // SAFETY: `s` holds 64 readable bytes (32 bf16); the load is unaligned, and __m512i and
    // __m512bh are both 512-bit vectors of plain bits, so the transmute is a reinterpretation.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(s.as_ptr().cast())) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
fn bf16_bf16(w: &[u8], a: &[u8]) -> f32 {
    let n = w.len().min(a.len()) / 2;
    let mut acc = [_mm512_setzero_ps(); 2];
    let mut i = 0;
    while i + 64 <= n {
        acc[0] = _mm512_dpbf16_ps(acc[0], ld_bh(w, 2 * i), ld_bh(a, 2 * i));
        acc[1] = _mm512_dpbf16_ps(acc[1], ld_bh(w, 2 * i + 64), ld_bh(a, 2 * i + 64));
        i += 64;
    }
    while i + 32 <= n {
        acc[0] = _mm512_dpbf16_ps(acc[0], ld_bh(w, 2 * i), ld_bh(a, 2 * i));
        i += 32;
    }
    let mut sum = _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]));
    let bf = |b: &[u8], j: usize| {
        f32::from_bits((u16::from_le_bytes([b[2 * j], b[2 * j + 1]]) as u32) << 16)
    };
    for j in i..n {
        sum += bf(w, j) * bf(a, j);
    }
    sum
}
