//! Activation values on the wire: f32 ↔ bf16 conversion and the finiteness check, over whole
//! slices. They run on every expert-seam hop, four conversions per call, so they are written
//! to vectorize: branch-free element functions in plain loops, compiled for the baseline
//! target, AVX2 and AVX-512, plus AVX512-BF16's conversion instruction (the widest this CPU
//! has is chosen at run time; the same binary runs on any x86-64). They convert straight
//! between a slice and wire bytes behind a raw pointer — no staging copy, and no reference
//! into a shared mapping — and decoding bf16 checks finiteness as it goes. The element
//! functions are the reference; tests compare every version this CPU runs with them.

/// `v` rounded to bfloat16 (nearest, ties to even), as bits. Branch-free so that loops over
/// it vectorize; NaN stays NaN (activations are checked for finiteness anyway), overflow
/// rounds to infinity, as `half::bf16::from_f32` does.
#[inline(always)]
pub fn bf16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    let nan = (b & 0x7fff_ffff) > 0x7f80_0000;
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    if nan {
        ((b >> 16) as u16) | 0x0040
    } else {
        rounded
    }
}

/// The f32 value of bfloat16 bits (exact).
#[inline(always)]
pub fn bf16_value(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

// Wire bytes are little-endian; the conversions below write and read them as native u16
// and f32, which are the same bytes only on such targets.
#[cfg(not(target_endian = "little"))]
compile_error!("kt's wire conversions assume a little-endian target");

/// `src` as bf16 bits at `dst`.
///
/// # Safety
/// `dst` is valid for writes of `src.len()` u16 (any alignment).
#[inline(always)]
unsafe fn to_bf16_loop(src: &[f32], dst: *mut u16) {
    for (i, v) in src.iter().enumerate() {
        // SAFETY: `i < src.len()`, within what the caller vouches for.
        unsafe { dst.add(i).write_unaligned(bf16_bits(*v)) };
    }
}

/// The f32 values of the bf16 bits at `src` into `out`; whether all of them are finite.
///
/// # Safety
/// `src` is valid for reads of `out.len()` u16 (any alignment).
#[inline(always)]
unsafe fn from_bf16_loop(src: *const u16, out: &mut [MaybeUninit<f32>]) -> bool {
    let mut bad = 0u16;
    for (i, o) in out.iter_mut().enumerate() {
        // SAFETY: `i < out.len()`, within what the caller vouches for.
        let b = unsafe { src.add(i).read_unaligned() };
        bad |= u16::from(b & 0x7f80 == 0x7f80);
        o.write(bf16_value(b));
    }
    bad == 0
}

/// Whether every value is finite, in blocks without an early exit (so the block vectorizes).
#[inline(always)]
fn finite_loop(v: &[f32]) -> bool {
    v.chunks(256).all(|c| c.iter().fold(0u32, |acc, x| acc | u32::from(!x.is_finite())) == 0)
}

/// The loops compiled for AVX2, and again for AVX-512 (16 lanes; BW for the 16-bit lanes).
#[cfg(target_arch = "x86_64")]
macro_rules! compiled_for {
    ($name:ident, $features:literal) => {
        mod $name {
            use std::mem::MaybeUninit;

            /// # Safety
            /// The CPU has the features; as [`super::to_bf16_loop`].
            #[target_feature(enable = $features)]
            pub(super) unsafe fn to_bf16(src: &[f32], dst: *mut u16) {
                // SAFETY: as the caller vouches.
                unsafe { super::to_bf16_loop(src, dst) }
            }

            /// # Safety
            /// The CPU has the features; as [`super::from_bf16_loop`].
            #[target_feature(enable = $features)]
            pub(super) unsafe fn from_bf16(src: *const u16, out: &mut [MaybeUninit<f32>]) -> bool {
                // SAFETY: as the caller vouches.
                unsafe { super::from_bf16_loop(src, out) }
            }

            #[target_feature(enable = $features)]
            pub(super) fn finite(v: &[f32]) -> bool {
                super::finite_loop(v)
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
compiled_for!(avx2, "avx2");
#[cfg(target_arch = "x86_64")]
compiled_for!(avx512, "avx512f,avx512bw");

/// f32 → bf16 with AVX512-BF16's conversion instruction (`VCVTNEPS2BF16`: nearest, ties to
/// even, NaN quieted by setting bit 6 — the element function's bits), except that the
/// instruction flushes subnormal inputs to zero: a vector holding one is converted by the
/// element function instead.
#[cfg(target_arch = "x86_64")]
mod avx512bf16 {
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU has AVX-512 F, BW and BF16; as [`super::to_bf16_loop`].
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn to_bf16(src: &[f32], dst: *mut u16) {
        let exponent = _mm512_set1_epi32(0x7f80_0000);
        let mantissa = _mm512_set1_epi32(0x007f_ffff);
        let mut chunks = src.chunks_exact(16);
        for (i, s) in (&mut chunks).enumerate() {
            // SAFETY: `s` holds 16 f32; the 16 u16 at `dst + 16 i` are within what the caller
            // vouches for (unaligned loads and stores).
            unsafe {
                let v = _mm512_loadu_ps(s.as_ptr());
                let bits = _mm512_castps_si512(v);
                let subnormal = _mm512_testn_epi32_mask(bits, exponent)
                    & _mm512_test_epi32_mask(bits, mantissa);
                if subnormal == 0 {
                    let b: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
                    _mm256_storeu_si256(dst.add(i * 16).cast(), b);
                } else {
                    super::to_bf16_loop(s, dst.add(i * 16));
                }
            }
        }
        let done = src.len() - chunks.remainder().len();
        // SAFETY: the tail, within what the caller vouches for.
        unsafe { super::to_bf16_loop(chunks.remainder(), dst.add(done)) };
    }
}

/// The widest version this CPU runs (detected once by std, then relaxed loads); `KT_ISA`
/// does not apply here: every version computes the same bits.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Width {
    Baseline,
    Avx2,
    Avx512,
    /// AVX-512 with BF16 (its f32 → bf16 instruction).
    Avx512Bf16,
}

#[inline]
fn width() -> Width {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
        {
            if std::arch::is_x86_feature_detected!("avx512bf16") {
                return Width::Avx512Bf16;
            }
            return Width::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            return Width::Avx2;
        }
    }
    Width::Baseline
}

/// Writes `src` as bf16 wire bytes (2 per value, little-endian) at `dst`, written only
/// through the pointer: `dst` may be memory another process maps, to which no reference is
/// ever formed.
///
/// # Safety
/// `dst` is valid for writes of `2 × src.len()` bytes (any alignment).
pub unsafe fn f32_to_bf16_raw(src: &[f32], dst: *mut u8) {
    let dst = dst.cast::<u16>();
    // SAFETY: in every arm, the features were detected on this CPU; `dst` as the caller vouches.
    unsafe {
        match width() {
            #[cfg(target_arch = "x86_64")]
            Width::Avx512Bf16 => avx512bf16::to_bf16(src, dst),
            #[cfg(target_arch = "x86_64")]
            Width::Avx512 => avx512::to_bf16(src, dst),
            #[cfg(target_arch = "x86_64")]
            Width::Avx2 => avx2::to_bf16(src, dst),
            _ => to_bf16_loop(src, dst),
        }
    }
}

/// Appends the f32 values of the `count` bf16 wire elements at `src` to `out`, read only
/// through the pointer (see [`f32_to_bf16_raw`]); whether all of them are finite.
///
/// # Safety
/// `src` is valid for reads of `2 × count` bytes (any alignment).
pub unsafe fn extend_from_bf16_raw(out: &mut Vec<f32>, src: *const u8, count: usize) -> bool {
    out.reserve(count);
    let len = out.len();
    let spare = &mut out.spare_capacity_mut()[..count];
    let src = src.cast::<u16>();
    // SAFETY: in every arm, the features were detected on this CPU; `src` as the caller vouches.
    let finite = unsafe {
        match width() {
            #[cfg(target_arch = "x86_64")]
            Width::Avx512 | Width::Avx512Bf16 => avx512::from_bf16(src, spare),
            #[cfg(target_arch = "x86_64")]
            Width::Avx2 => avx2::from_bf16(src, spare),
            _ => from_bf16_loop(src, spare),
        }
    };
    // SAFETY: the `count` values after `len` were just written.
    unsafe { out.set_len(len + count) };
    finite
}

/// `src` as bf16 wire bytes into `out` (as many values as fit).
pub fn to_bf16_bytes(src: &[f32], out: &mut [u8]) {
    let src = &src[..src.len().min(out.len() / 2)];
    // SAFETY: `out` holds at least `2 × src.len()` bytes.
    unsafe { f32_to_bf16_raw(src, out.as_mut_ptr()) }
}

/// Appends the f32 values of bf16 wire `bytes` to `out` (a trailing odd byte is ignored);
/// whether all of them are finite.
pub fn extend_from_bf16_bytes(out: &mut Vec<f32>, bytes: &[u8]) -> bool {
    // SAFETY: `bytes` holds `2 × (len / 2)` bytes.
    unsafe { extend_from_bf16_raw(out, bytes.as_ptr(), bytes.len() / 2) }
}

/// Whether every value of `v` is finite (no NaN, no infinity).
pub fn all_finite(v: &[f32]) -> bool {
    // SAFETY: in every arm, the features were detected on this CPU.
    unsafe {
        match width() {
            #[cfg(target_arch = "x86_64")]
            Width::Avx512 | Width::Avx512Bf16 => avx512::finite(v),
            #[cfg(target_arch = "x86_64")]
            Width::Avx2 => avx2::finite(v),
            _ => finite_loop(v),
        }
    }
}

/// The first value of `v` that is not finite, if any (a fast check first, the search only
/// when it fails).
pub fn first_non_finite(v: &[f32]) -> Option<f32> {
    if all_finite(v) {
        None
    } else {
        v.iter().copied().find(|x| !x.is_finite())
    }
}

/// The wire bytes of f32 values (little-endian: the values' own bytes).
pub fn f32_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: u8 has alignment 1 and every byte of initialized f32s is initialized.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), v.len() * 4) }
}

/// A writable byte view of f32s (any bytes written form valid f32 values).
pub fn f32_bytes_mut(v: &mut [f32]) -> &mut [u8] {
    // SAFETY: as above; every bit pattern is a valid f32.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), v.len() * 4) }
}

use std::mem::MaybeUninit;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn values(n: usize) -> Vec<f32> {
        let mut x = 0x9e37_79b9u32;
        let mut out = vec![0.0, -0.0, 1.0, f32::MAX, f32::MIN_POSITIVE, f32::INFINITY, 1e-40];
        while out.len() < n {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            out.push(f32::from_bits(x));
        }
        out
    }

    type To = unsafe fn(&[f32], *mut u16);
    type From = unsafe fn(*const u16, &mut [MaybeUninit<f32>]) -> bool;
    type Finite = fn(&[f32]) -> bool;

    /// Every compiled version this CPU runs, by name.
    fn versions() -> Vec<(&'static str, To, From, Finite)> {
        let mut v: Vec<(&'static str, To, From, Finite)> =
            vec![("baseline", to_bf16_loop, from_bf16_loop, finite_loop)];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: called only when AVX2 was detected.
                let fin: Finite = |a| unsafe { avx2::finite(a) };
                v.push(("avx2", avx2::to_bf16, avx2::from_bf16, fin));
            }
            if matches!(width(), Width::Avx512 | Width::Avx512Bf16) {
                // SAFETY: called only when AVX-512 F and BW were detected.
                let fin: Finite = |a| unsafe { avx512::finite(a) };
                v.push(("avx512", avx512::to_bf16, avx512::from_bf16, fin));
                if width() == Width::Avx512Bf16 {
                    v.push(("avx512bf16", avx512bf16::to_bf16, avx512::from_bf16, fin));
                }
            }
        }
        v
    }

    /// Every version gives the element functions' bits (and `half`'s), converting and
    /// checking finiteness, at lengths that exercise vector bodies and tails.
    #[test]
    fn every_version_matches_the_element_functions() {
        let v = values(4099);
        let want: Vec<u16> = v.iter().map(|x| bf16_bits(*x)).collect();
        for (b, x) in want.iter().zip(&v) {
            if x.is_nan() {
                assert!(bf16_value(*b).is_nan());
            } else {
                assert_eq!(*b, half::bf16::from_f32(*x).to_bits(), "{x:e}");
            }
        }
        // Finite, also as bf16 (values near f32::MAX round to infinity).
        let finite: Vec<f32> =
            v.iter().copied().filter(|x| bf16_value(bf16_bits(*x)).is_finite()).collect();
        let finite_bits: Vec<u16> = finite.iter().map(|x| bf16_bits(*x)).collect();
        let names: Vec<&str> = versions().iter().map(|v| v.0).collect();
        eprintln!("versions run: {names:?}");
        for (name, to, from, fin) in versions() {
            for len in [0, 1, 15, 16, 17, 1023, v.len()] {
                let mut bits = vec![0u16; len];
                // SAFETY: `bits` holds `len` u16; the features were detected.
                unsafe { to(&v[..len], bits.as_mut_ptr()) };
                assert_eq!(bits, want[..len], "{name} to_bf16, {len} values");
                let mut back = vec![MaybeUninit::uninit(); len];
                // SAFETY: `want` holds at least `len` u16.
                let all = unsafe { from(want.as_ptr(), &mut back) };
                for (y, b) in back.iter().zip(&want) {
                    // SAFETY: every element was written.
                    let y = unsafe { y.assume_init() };
                    assert_eq!(y.to_bits(), half::bf16::from_bits(*b).to_f32().to_bits(), "{name}");
                }
                let expect = want[..len].iter().all(|b| bf16_value(*b).is_finite());
                assert_eq!(all, expect, "{name} from_bf16 finiteness, {len} values");
            }
            assert!(fin(&finite), "{name}");
            let mut out = vec![MaybeUninit::uninit(); finite_bits.len()];
            // SAFETY: as above.
            assert!(unsafe { from(finite_bits.as_ptr(), &mut out) }, "{name}");
            for at in [0, 16, finite.len() - 1] {
                let mut bad = finite.clone();
                bad[at] = f32::NAN;
                assert!(!fin(&bad), "{name}: NaN at {at}");
                let mut bits = finite_bits.clone();
                bits[at] = 0xff80; // -inf
                                   // SAFETY: as above.
                assert!(!unsafe { from(bits.as_ptr(), &mut out) }, "{name}: -inf at {at}");
            }
        }
    }

    #[test]
    fn wire_bytes_round_trip_at_any_alignment() {
        let v: Vec<f32> =
            values(3000).into_iter().filter(|x| bf16_value(bf16_bits(*x)).is_finite()).collect();
        // One byte in: the wire bytes of a message need not be aligned for u16.
        let mut wire = vec![0u8; v.len() * 2 + 1];
        to_bf16_bytes(&v, &mut wire[1..]);
        for (c, x) in wire[1..].chunks_exact(2).zip(&v) {
            assert_eq!(u16::from_le_bytes([c[0], c[1]]), half::bf16::from_f32(*x).to_bits());
        }
        let mut back = vec![7.0f32];
        assert!(extend_from_bf16_bytes(&mut back, &wire[1..]));
        assert_eq!(back.len(), v.len() + 1);
        assert_eq!(back[0], 7.0);
        for (y, x) in back[1..].iter().zip(&v) {
            assert_eq!(y.to_bits(), half::bf16::from_f32(*x).to_f32().to_bits());
        }
        // A short output takes what fits; a trailing odd byte is ignored.
        let mut short = [0u8; 5];
        to_bf16_bytes(&[1.0, 2.0, 3.0], &mut short);
        assert_eq!(short[..4], [0x80, 0x3f, 0x00, 0x40]);
        let mut two = Vec::new();
        assert!(extend_from_bf16_bytes(&mut two, &short));
        assert_eq!(two, [1.0, 2.0]);
        wire[1..3].copy_from_slice(&0x7fc0u16.to_le_bytes()); // NaN
        assert!(!extend_from_bf16_bytes(&mut Vec::new(), &wire[1..]));
        assert_eq!(f32_bytes(&[1.0]), 1.0f32.to_le_bytes());
    }

    #[test]
    fn finiteness_is_found_anywhere() {
        let mut v = vec![1.0f32; 1000];
        assert!(all_finite(&v) && finite_loop(&v));
        assert_eq!(first_non_finite(&v), None);
        for (i, bad) in [(0, f32::NAN), (517, f32::INFINITY), (999, f32::NEG_INFINITY)] {
            v[i] = bad;
            assert!(!all_finite(&v) && !finite_loop(&v));
            assert_eq!(first_non_finite(&v).map(f32::to_bits), Some(bad.to_bits()));
            v[i] = 1.0;
        }
        assert!(all_finite(&[]));
    }
}
