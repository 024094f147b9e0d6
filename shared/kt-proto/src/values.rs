//! Activation values on the wire: f32 ↔ bf16 conversion and the finiteness check, over whole
//! slices. They run on every expert-seam hop, four conversions and two checks per call, so
//! they are written to vectorize: branch-free element functions in plain loops, compiled once
//! for the baseline target and once with AVX2 (chosen at run time; the same binary runs on
//! any x86-64). The element functions are the reference; tests compare the slice functions
//! with them on every path this CPU has.

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

#[inline(always)]
fn to_bf16_loop(src: &[f32], out: &mut [u16]) {
    for (o, v) in out.iter_mut().zip(src) {
        *o = bf16_bits(*v);
    }
}

#[inline(always)]
fn from_bf16_loop(src: &[u16], out: &mut [f32]) {
    for (o, b) in out.iter_mut().zip(src) {
        *o = bf16_value(*b);
    }
}

/// Whether every value is finite, in blocks without an early exit (so the block vectorizes).
#[inline(always)]
fn finite_loop(v: &[f32]) -> bool {
    v.chunks(256).all(|c| c.iter().fold(0u32, |acc, x| acc | u32::from(!x.is_finite())) == 0)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    #[target_feature(enable = "avx2")]
    pub(super) fn to_bf16(src: &[f32], out: &mut [u16]) {
        super::to_bf16_loop(src, out);
    }

    #[target_feature(enable = "avx2")]
    pub(super) fn from_bf16(src: &[u16], out: &mut [f32]) {
        super::from_bf16_loop(src, out);
    }

    #[target_feature(enable = "avx2")]
    pub(super) fn finite(v: &[f32]) -> bool {
        super::finite_loop(v)
    }
}

/// Whether the AVX2 versions run (detected once by std, then a relaxed load); `KT_ISA=scalar`
/// does not apply here: both versions compute the same bits.
#[inline]
fn use_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Writes `src` as bf16 bits into `out` (the shorter of the two sets the count).
pub fn f32_to_bf16(src: &[f32], out: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: AVX2 was detected on this CPU.
        return unsafe { avx2::to_bf16(src, out) };
    }
    to_bf16_loop(src, out);
}

/// Writes the f32 values of bf16 bits `src` into `out` (the shorter of the two sets the count).
pub fn bf16_to_f32(src: &[u16], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: AVX2 was detected on this CPU.
        return unsafe { avx2::from_bf16(src, out) };
    }
    from_bf16_loop(src, out);
}

/// Whether every value of `v` is finite (no NaN, no infinity).
pub fn all_finite(v: &[f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: AVX2 was detected on this CPU.
        return unsafe { avx2::finite(v) };
    }
    finite_loop(v)
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

// Wire bytes are little-endian; the byte views below are the values only on such targets.
#[cfg(not(target_endian = "little"))]
compile_error!("kt's wire conversions assume a little-endian target");

/// Elements converted per step between f32 values and wire bytes: each step's bf16 bits
/// pass through a buffer on the stack (in L1), so the bytes can be any slice or a shared
/// mapping that is only ever copied from or into.
const STAGE: usize = 1024;

fn bytes_of(v: &[u16]) -> &[u8] {
    // SAFETY: u8 has alignment 1 and every byte of initialized u16s is initialized; the
    // length covers exactly the same memory.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), v.len() * 2) }
}

fn bytes_of_mut(v: &mut [u16]) -> &mut [u8] {
    // SAFETY: as above, and every byte pattern written through the view is a valid u16.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), v.len() * 2) }
}

/// Converts `src` to bf16 wire bytes step by step, handing each step's bytes and their byte
/// offset to `put`.
pub fn to_bf16_bytes<E>(
    src: &[f32],
    mut put: impl FnMut(usize, &[u8]) -> Result<(), E>,
) -> Result<(), E> {
    let mut stage = [0u16; STAGE];
    for (i, chunk) in src.chunks(STAGE).enumerate() {
        let bits = &mut stage[..chunk.len()];
        f32_to_bf16(chunk, bits);
        put(i * STAGE * 2, bytes_of(bits))?;
    }
    Ok(())
}

/// Appends the f32 values of `count` bf16 wire elements to `out`, fetched step by step by
/// `get(byte offset, buffer)` (no zero-filling of `out` first).
pub fn extend_from_bf16_bytes<E>(
    out: &mut Vec<f32>,
    count: usize,
    mut get: impl FnMut(usize, &mut [u8]) -> Result<(), E>,
) -> Result<(), E> {
    out.reserve(count);
    let mut stage = [0u16; STAGE];
    let mut values = [0f32; STAGE];
    let mut done = 0;
    while done < count {
        let step = (count - done).min(STAGE);
        let bits = &mut stage[..step];
        get(done * 2, bytes_of_mut(bits))?;
        bf16_to_f32(bits, &mut values[..step]);
        out.extend_from_slice(&values[..step]);
        done += step;
    }
    Ok(())
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

    #[test]
    fn slices_match_the_element_functions() {
        let v = values(10_007);
        let mut bits = vec![0u16; v.len()];
        f32_to_bf16(&v, &mut bits);
        let mut scalar = vec![0u16; v.len()];
        to_bf16_loop(&v, &mut scalar);
        for ((b, s), x) in bits.iter().zip(&scalar).zip(&v) {
            assert_eq!(b, s);
            if x.is_nan() {
                assert!(bf16_value(*b).is_nan());
            } else {
                assert_eq!(*b, half::bf16::from_f32(*x).to_bits(), "{x:e}");
            }
        }
        let mut back = vec![0.0f32; bits.len()];
        bf16_to_f32(&bits, &mut back);
        for (y, b) in back.iter().zip(&bits) {
            assert_eq!(y.to_bits(), half::bf16::from_bits(*b).to_f32().to_bits());
        }
    }

    #[test]
    fn staged_bytes_round_trip() {
        let v: Vec<f32> = values(3 * STAGE + 17).into_iter().filter(|x| !x.is_nan()).collect();
        let mut wire = vec![0u8; v.len() * 2];
        to_bf16_bytes::<()>(&v, |off, b| {
            wire[off..off + b.len()].copy_from_slice(b);
            Ok(())
        })
        .unwrap();
        for (c, x) in wire.chunks_exact(2).zip(&v) {
            assert_eq!(u16::from_le_bytes([c[0], c[1]]), half::bf16::from_f32(*x).to_bits());
        }
        let mut back = Vec::new();
        extend_from_bf16_bytes::<()>(&mut back, v.len(), |off, b| {
            b.copy_from_slice(&wire[off..off + b.len()]);
            Ok(())
        })
        .unwrap();
        for (y, x) in back.iter().zip(&v) {
            assert_eq!(y.to_bits(), half::bf16::from_f32(*x).to_f32().to_bits());
        }
        let mut appended = vec![7.0f32];
        extend_from_bf16_bytes::<()>(&mut appended, v.len(), |off, b| {
            b.copy_from_slice(&wire[off..off + b.len()]);
            Ok(())
        })
        .unwrap();
        assert_eq!(appended[0], 7.0);
        assert!(appended[1..].iter().zip(&back).all(|(a, b)| a.to_bits() == b.to_bits()));
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
