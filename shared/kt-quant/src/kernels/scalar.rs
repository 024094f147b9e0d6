//! Scalar kernels: the reference every other implementation is compared against.
//!
//! * `dequantize_*` reproduce ggml's `dequantize_row_*` bit for bit: the same f32 operations in
//!   the same order, never fused into FMAs (Rust does not contract `a * b + c`).
//! * `vec_dot_*` reproduce ggml's `ggml_vec_dot_*_generic` (`ggml-cpu/quants.c`): integer sums
//!   per block, then exactly ggml's f32 scale products and accumulation order, including the
//!   eight f32 lanes of the K-quant dot products. F32/F16/BF16 accumulate in f64 like
//!   `ggml_vec_dot_f32`/`_f16`/`_bf16` without SIMD.
//! * `quantize_*` reproduce `quantize_row_*_ref` (Q8_0/Q8_1 round half away from zero, Q8_K
//!   rounds half to even through ggml's `nearest_int` trick).
//!
//! Kernels take whole rows and never panic: given mismatched lengths they process the whole
//! blocks both operands have (the checked wrappers in the crate root reject such calls first).
#![allow(clippy::needless_range_loop)] // index arithmetic mirrors ggml's C loops on purpose

use half::{bf16, f16, slice::HalfFloatSliceExt};

use crate::blocks::*;

// ---------------------------------------------------------------------------------------------
// Generic row drivers
// ---------------------------------------------------------------------------------------------

/// A block format that can be expanded to f32.
pub(crate) trait Dequantize: Block {
    /// Writes the block's `ELEMS` values into `y[..ELEMS]`.
    fn dequantize(&self, y: &mut [f32]);
}

/// The blocks of `w` and `a` side by side.
#[inline(always)]
fn pairs<'a, W: Block, A: Block>(w: &'a [u8], a: &'a [u8]) -> impl Iterator<Item = (W, A)> + 'a {
    w.chunks_exact(W::BYTES)
        .zip(a.chunks_exact(A::BYTES))
        .filter_map(|(w, a)| Some((W::read(w)?, A::read(a)?)))
}

pub(crate) fn dequantize_row<B: Dequantize>(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(B::BYTES).zip(dst.chunks_exact_mut(B::ELEMS)) {
        if let Some(block) = B::read(b) {
            block.dequantize(y);
        }
    }
}

/// Dot product of a quantized row with f32 activations: each block is expanded into a stack
/// buffer and multiplied into eight f32 lane accumulators that run along the whole row
/// (vectorizable, and a shallower sum than one running total); the lanes are added at the end.
pub(crate) fn dot_f32_row<B: Dequantize>(src: &[u8], x: &[f32]) -> f32 {
    let mut buf = [0f32; QK_K];
    let mut acc = [0f32; 8];
    for (b, x) in src.chunks_exact(B::BYTES).zip(x.chunks_exact(B::ELEMS)) {
        if let Some(block) = B::read(b) {
            let w = &mut buf[..B::ELEMS];
            block.dequantize(w);
            lanes_mul_add(&mut acc, w, x);
        }
    }
    reduce(&acc)
}

/// `acc[l] += a[8i + l] * b[8i + l]` (separate multiply and add, no FMA); `a.len()` must be a
/// multiple of 8 (every block format's is).
#[inline(always)]
fn lanes_mul_add(acc: &mut [f32; 8], a: &[f32], b: &[f32]) {
    for (x, y) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
}

#[inline(always)]
fn reduce(acc: &[f32; 8]) -> f32 {
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

// ---------------------------------------------------------------------------------------------
// F32 / F16 / BF16
// ---------------------------------------------------------------------------------------------

/// A one-element "block" format, converted a slice at a time (half's slice conversions detect
/// F16C once per call, not once per element).
pub(crate) trait Scalar {
    const BYTES: usize;
    /// Converts `out.len()` elements from the start of `b`.
    fn decode(b: &[u8], out: &mut [f32]);
    /// Converts `x` into the start of `out`.
    fn encode(x: &[f32], out: &mut [u8]);
}

/// Elements converted per step (stack buffers).
const CHUNK: usize = 64;

pub(crate) struct F32;
pub(crate) struct F16;
pub(crate) struct BF16;

impl Scalar for F32 {
    const BYTES: usize = 4;
    #[inline(always)]
    fn decode(b: &[u8], out: &mut [f32]) {
        for (y, b) in out.iter_mut().zip(b.chunks_exact(4)) {
            *y = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
    }
    #[inline(always)]
    fn encode(x: &[f32], out: &mut [u8]) {
        for (v, o) in x.iter().zip(out.chunks_exact_mut(4)) {
            o.copy_from_slice(&v.to_le_bytes());
        }
    }
}

impl Scalar for F16 {
    const BYTES: usize = 2;
    #[inline(always)]
    fn decode(b: &[u8], out: &mut [f32]) {
        let mut h = [f16::ZERO; CHUNK];
        for (out, b) in out.chunks_mut(CHUNK).zip(b.chunks(2 * CHUNK)) {
            let h = &mut h[..out.len()];
            for (h, b) in h.iter_mut().zip(b.chunks_exact(2)) {
                *h = f16::from_bits(u16::from_le_bytes([b[0], b[1]]));
            }
            h.convert_to_f32_slice(out);
        }
    }
    /// Round to nearest even, as `ggml_cpu_fp32_to_fp16` (F16C or software) does.
    #[inline(always)]
    fn encode(x: &[f32], out: &mut [u8]) {
        let mut h = [f16::ZERO; CHUNK];
        for (x, out) in x.chunks(CHUNK).zip(out.chunks_mut(2 * CHUNK)) {
            let h = &mut h[..x.len()];
            h.convert_from_f32_slice(x);
            for (h, o) in h.iter().zip(out.chunks_exact_mut(2)) {
                o.copy_from_slice(&h.to_bits().to_le_bytes());
            }
        }
    }
}

impl Scalar for BF16 {
    const BYTES: usize = 2;
    #[inline(always)]
    fn decode(b: &[u8], out: &mut [f32]) {
        for (y, b) in out.iter_mut().zip(b.chunks_exact(2)) {
            *y = bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
        }
    }
    /// Round to nearest even with NaNs kept quiet, as `ggml_compute_fp32_to_bf16` does.
    #[inline(always)]
    fn encode(x: &[f32], out: &mut [u8]) {
        for (v, o) in x.iter().zip(out.chunks_exact_mut(2)) {
            o.copy_from_slice(&bf16::from_f32(*v).to_bits().to_le_bytes());
        }
    }
}

pub(crate) fn dequantize_scalar<T: Scalar>(src: &[u8], dst: &mut [f32]) {
    let n = (src.len() / T::BYTES).min(dst.len());
    T::decode(src, &mut dst[..n]);
}

/// Converted `CHUNK` elements at a time into a stack buffer, then dotted like the block formats.
pub(crate) fn dot_f32_scalar<T: Scalar>(src: &[u8], x: &[f32]) -> f32 {
    let mut buf = [0f32; CHUNK];
    let mut acc = [0f32; 8];
    let mut tail = 0f32;
    for (b, x) in src.chunks(CHUNK * T::BYTES).zip(x.chunks(CHUNK)) {
        let n = (b.len() / T::BYTES).min(x.len());
        T::decode(b, &mut buf[..n]);
        let m = n / 8 * 8;
        lanes_mul_add(&mut acc, &buf[..m], &x[..m]);
        for (w, x) in buf[m..n].iter().zip(&x[m..n]) {
            tail += w * x;
        }
    }
    reduce(&acc) + tail
}

/// `ggml_vec_dot_f32`/`_f16`/`_bf16` without SIMD: f32 products summed in f64.
pub(crate) fn vec_dot_scalar<T: Scalar>(w: &[u8], a: &[u8]) -> f32 {
    let (mut wb, mut ab) = ([0f32; CHUNK], [0f32; CHUNK]);
    let mut sum = 0f64;
    for (w, a) in w.chunks(CHUNK * T::BYTES).zip(a.chunks(CHUNK * T::BYTES)) {
        let n = w.len().min(a.len()) / T::BYTES;
        T::decode(w, &mut wb[..n]);
        T::decode(a, &mut ab[..n]);
        for (w, a) in wb[..n].iter().zip(&ab[..n]) {
            sum += (w * a) as f64;
        }
    }
    sum as f32
}

pub(crate) fn quantize_scalar<T: Scalar>(x: &[f32], dst: &mut [u8]) {
    let n = x.len().min(dst.len() / T::BYTES);
    T::encode(&x[..n], dst);
}

// ---------------------------------------------------------------------------------------------
// Dequantization, one block (ggml-quants.c `dequantize_row_*`)
// ---------------------------------------------------------------------------------------------

impl Dequantize for BlockQ4_0 {
    #[inline(always)]
    fn dequantize(&self, y: &mut [f32]) {
        let y = &mut y[..QK];
        let d = self.d.to_f32();
        for j in 0..QK / 2 {
            let x0 = (self.qs[j] & 0x0F) as i32 - 8;
            let x1 = (self.qs[j] >> 4) as i32 - 8;
            y[j] = x0 as f32 * d;
            y[j + QK / 2] = x1 as f32 * d;
        }
    }
}

impl Dequantize for BlockQ4_1 {
    #[inline(always)]
    fn dequantize(&self, y: &mut [f32]) {
        let y = &mut y[..QK];
        let d = self.d.to_f32();
        let m = self.m.to_f32();
        for j in 0..QK / 2 {
            let x0 = (self.qs[j] & 0x0F) as i32;
            let x1 = (self.qs[j] >> 4) as i32;
            y[j] = x0 as f32 * d + m;
            y[j + QK / 2] = x1 as f32 * d + m;
        }
    }
}

impl Dequantize for BlockQ5_0 {
    #[inline(always)]
    fn dequantize(&self, y: &mut [f32]) {
        let y = &mut y[..QK];
        let d = self.d.to_f32();
        let qh = u32::from_le_bytes(self.qh);
        for j in 0..QK / 2 {
            let xh_0 = (((qh >> j) << 4) & 0x10) as u8;
            let xh_1 = ((qh >> (j + 12)) & 0x10) as u8;
            let x0 = ((self.qs[j] & 0x0F) | xh_0) as i32 - 16;
            let x1 = ((self.qs[j] >> 4) | xh_1) as i32 - 16;
            y[j] = x0 as f32 * d;
            y[j + QK / 2] = x1 as f32 * d;
        }
    }
}

impl Dequantize for BlockQ5_1 {
    #[inline(always)]
    fn dequantize(&self, y: &mut [f32]) {
        let y = &mut y[..QK];
        let d = self.d.to_f32();
        let m = self.m.to_f32();
        let qh = u32::from_le_bytes(self.qh);
        for j in 0..QK / 2 {
            let xh_0 = (((qh >> j) << 4) & 0x10) as u8;
            let xh_1 = ((qh >> (j + 12)) & 0x10) as u8;
            let x0 = ((self.qs[j] & 0x0F) | xh_0) as i32;
            let x1 = ((self.qs[j] >> 4) | xh_1) as i32;
            y[j] = x0 as f32 * d + m;
            y[j + QK / 2] = x1 as f32 * d + m;
        }
    }
}

impl Dequantize for BlockQ8_0 {
    #[inline(always)]
    fn dequantize(&self, y: &mut [f32]) {
        let d = self.d.to_f32();
        for (y, q) in y[..QK].iter_mut().zip(self.qs) {
            *y = q as f32 * d;
        }
    }
}

/// ggml has no `dequantize_row_q8_1`; by definition `d * q`, as for Q8_0.
impl Dequantize for BlockQ8_1 {
    #[inline(always)]
    fn dequantize(&self, y: &mut [f32]) {
        let d = self.d.to_f32();
        for (y, q) in y[..QK].iter_mut().zip(self.qs) {
            *y = q as f32 * d;
        }
    }
}

impl Dequantize for BlockQ2_K {
    #[inline(always)]
    fn dequantize(&self, y: &mut [f32]) {
        let y = &mut y[..QK_K];
        let d = self.d.to_f32();
        let min = self.dmin.to_f32();
        // Groups of 16 in element order: half n (128), shift j, then bytes 0..16 or 16..32.
        for (g, y) in y.chunks_exact_mut(16).enumerate() {
            let (n, shift, half) = (g / 8, 2 * ((g / 2) % 4), g % 2);
            let q = &self.qs[32 * n + 16 * half..32 * n + 16 * half + 16];
            let sc = self.scales[g];
            let dl = d * (sc & 0xF) as f32;
            let ml = min * (sc >> 4) as f32;
            for (y, q) in y.iter_mut().zip(q) {
                *y = dl * ((q >> shift) & 3) as f32 - ml;
            }
        }
    }
}

impl Dequantize for BlockQ3_K {
    #[inline(always)]
    fn dequantize(&self, y: &mut [f32]) {
        let y = &mut y[..QK_K];
        let d_all = self.d.to_f32();
        let scales = q3_k_scales(&self.scales);
        // Groups of 16 as in Q2_K; the high bit of group g is bit g / 2 of `hmask`.
        for (g, y) in y.chunks_exact_mut(16).enumerate() {
            let (n, j, half) = (g / 8, (g / 2) % 4, g % 2);
            let (lo, hi) = (32 * n + 16 * half, 16 * half);
            let q = &self.qs[lo..lo + 16];
            let hm = &self.hmask[hi..hi + 16];
            let m = 1u8 << (4 * n + j);
            let dl = d_all * (scales[g] as i32 - 32) as f32;
            for ((y, q), h) in y.iter_mut().zip(q).zip(hm) {
                let low = ((q >> (2 * j)) & 3) as i32;
                let high = if h & m != 0 { 0 } else { 4 };
                *y = dl * (low - high) as f32;
            }
        }
    }
}

impl Dequantize for BlockQ4_K {
    #[inline(always)]
    fn dequantize(&self, y: &mut [f32]) {
        let y = &mut y[..QK_K];
        let d = self.d.to_f32();
        let min = self.dmin.to_f32();
        let (sc, mn) = k4_scales_mins(&self.scales);
        for j in 0..QK_K / 64 {
            let q = &self.qs[32 * j..32 * j + 32];
            let d1 = d * sc[2 * j] as f32;
            let m1 = min * mn[2 * j] as f32;
            let d2 = d * sc[2 * j + 1] as f32;
            let m2 = min * mn[2 * j + 1] as f32;
            let y = &mut y[64 * j..64 * j + 64];
            for l in 0..32 {
                y[l] = d1 * (q[l] & 0xF) as f32 - m1;
            }
            for l in 0..32 {
                y[32 + l] = d2 * (q[l] >> 4) as f32 - m2;
            }
        }
    }
}

impl Dequantize for BlockQ5_K {
    #[inline(always)]
    fn dequantize(&self, y: &mut [f32]) {
        let y = &mut y[..QK_K];
        let d = self.d.to_f32();
        let min = self.dmin.to_f32();
        let (sc, mn) = k4_scales_mins(&self.scales);
        for j in 0..QK_K / 64 {
            let ql = &self.qs[32 * j..32 * j + 32];
            let (u1, u2) = (1u8 << (2 * j), 2u8 << (2 * j));
            let d1 = d * sc[2 * j] as f32;
            let m1 = min * mn[2 * j] as f32;
            let d2 = d * sc[2 * j + 1] as f32;
            let m2 = min * mn[2 * j + 1] as f32;
            let y = &mut y[64 * j..64 * j + 64];
            for l in 0..32 {
                let h = if self.qh[l] & u1 != 0 { 16 } else { 0 };
                y[l] = d1 * ((ql[l] & 0xF) + h) as f32 - m1;
            }
            for l in 0..32 {
                let h = if self.qh[l] & u2 != 0 { 16 } else { 0 };
                y[32 + l] = d2 * ((ql[l] >> 4) + h) as f32 - m2;
            }
        }
    }
}

/// The 256 signed 6-bit quants of a Q6_K block (`q - 32`), in element order.
#[inline(always)]
fn q6_k_values(b: &BlockQ6_K) -> [i8; QK_K] {
    let mut a = [0i8; QK_K];
    for n in 0..QK_K / 128 {
        let ql = &b.ql[64 * n..64 * n + 64];
        let qh = &b.qh[32 * n..32 * n + 32];
        let a = &mut a[128 * n..128 * n + 128];
        for l in 0..32 {
            a[l] = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
            a[l + 32] = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
            a[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
            a[l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
        }
    }
    a
}

impl Dequantize for BlockQ6_K {
    #[inline(always)]
    fn dequantize(&self, y: &mut [f32]) {
        let y = &mut y[..QK_K];
        let d = self.d.to_f32();
        let q = q6_k_values(self);
        for (g, (y, q)) in y.chunks_exact_mut(16).zip(q.chunks_exact(16)).enumerate() {
            // ggml: `d * sc[is] * q`, i.e. (d * sc) * q.
            let ds = d * self.scales[g] as f32;
            for (y, q) in y.iter_mut().zip(q) {
                *y = ds * *q as f32;
            }
        }
    }
}

impl Dequantize for BlockQ8_K {
    #[inline(always)]
    fn dequantize(&self, y: &mut [f32]) {
        for (y, q) in y[..QK_K].iter_mut().zip(self.qs) {
            *y = self.d * q as f32;
        }
    }
}

impl Dequantize for BlockIQ4_NL {
    #[inline(always)]
    fn dequantize(&self, y: &mut [f32]) {
        let y = &mut y[..QK];
        let d = self.d.to_f32();
        for j in 0..QK / 2 {
            y[j] = d * KVALUES_IQ4NL[(self.qs[j] & 0xf) as usize] as f32;
            y[j + QK / 2] = d * KVALUES_IQ4NL[(self.qs[j] >> 4) as usize] as f32;
        }
    }
}

impl Dequantize for BlockIQ4_XS {
    #[inline(always)]
    fn dequantize(&self, y: &mut [f32]) {
        let y = &mut y[..QK_K];
        let d = self.d.to_f32();
        for ib in 0..QK_K / 32 {
            let dl = d * (iq4_xs_scale(self, ib) as i32 - 32) as f32;
            let qs = &self.qs[16 * ib..16 * ib + 16];
            let y = &mut y[32 * ib..32 * ib + 32];
            for j in 0..16 {
                y[j] = dl * KVALUES_IQ4NL[(qs[j] & 0xf) as usize] as f32;
                y[j + 16] = dl * KVALUES_IQ4NL[(qs[j] >> 4) as usize] as f32;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Activation quantization (ggml-quants.c `quantize_row_*_ref`)
// ---------------------------------------------------------------------------------------------

/// C's `MAX(a, b)`: `a > b ? a : b` (differs from `f32::max` only for NaN).
#[inline(always)]
fn c_max(a: f32, b: f32) -> f32 {
    if a > b {
        a
    } else {
        b
    }
}

/// ggml's `nearest_int`: round half to even through the float mantissa (valid for
/// `|v| <= 4194303`, which Q8_K guarantees).
#[inline(always)]
pub(crate) fn nearest_int(v: f32) -> i32 {
    let i = (v + 12_582_912.0f32).to_bits() as i32;
    (i & 0x007f_ffff) - 0x0040_0000
}

/// Scale and its inverse for an 8-bit block with absolute maximum `amax`.
#[inline(always)]
fn q8_scale(x: &[f32]) -> (f32, f32) {
    let amax = x.iter().fold(0f32, |m, v| c_max(m, v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    (d, id)
}

pub(crate) fn quantize_q8_0(x: &[f32], dst: &mut [u8]) {
    for (x, out) in x.chunks_exact(QK).zip(dst.chunks_exact_mut(BlockQ8_0::BYTES)) {
        let (d, id) = q8_scale(x);
        let mut b = BlockQ8_0 { d: f16::from_f32(d), qs: [0; QK] };
        for (q, v) in b.qs.iter_mut().zip(x) {
            *q = (v * id).round() as i8;
        }
        let _ = b.write(out);
    }
}

pub(crate) fn quantize_q8_1(x: &[f32], dst: &mut [u8]) {
    for (x, out) in x.chunks_exact(QK).zip(dst.chunks_exact_mut(BlockQ8_1::BYTES)) {
        let (d, id) = q8_scale(x);
        let mut b = BlockQ8_1 { d: f16::from_f32(d), s: f16::ZERO, qs: [0; QK] };
        let mut sum = 0i32;
        for (q, v) in b.qs.iter_mut().zip(x) {
            *q = (v * id).round() as i8;
            sum += *q as i32;
        }
        b.s = f16::from_f32(sum as f32 * d);
        let _ = b.write(out);
    }
}

/// Q8_0 as ggml's x86 SIMD `quantize_row_q8_0` (AVX/AVX2/AVX-512) computes it, which is what
/// llama.cpp uses on x86 instead of the reference: the inverse scale is `127 / amax` rather
/// than `1 / d`, and ties round to even rather than away from zero.
pub(crate) fn quantize_q8_0_x86(x: &[f32], dst: &mut [u8]) {
    for (x, out) in x.chunks_exact(QK).zip(dst.chunks_exact_mut(BlockQ8_0::BYTES)) {
        let (d, id) = q8_scale_x86(x);
        let mut b = BlockQ8_0 { d: f16::from_f32(d), qs: [0; QK] };
        for (q, v) in b.qs.iter_mut().zip(x) {
            *q = (v * id).round_ties_even() as i8;
        }
        let _ = b.write(out);
    }
}

/// Q8_1 as ggml's x86 SIMD `quantize_row_q8_1` computes it (see [`quantize_q8_0_x86`]).
pub(crate) fn quantize_q8_1_x86(x: &[f32], dst: &mut [u8]) {
    for (x, out) in x.chunks_exact(QK).zip(dst.chunks_exact_mut(BlockQ8_1::BYTES)) {
        let (d, id) = q8_scale_x86(x);
        let mut b = BlockQ8_1 { d: f16::from_f32(d), s: f16::ZERO, qs: [0; QK] };
        let mut sum = 0i32;
        for (q, v) in b.qs.iter_mut().zip(x) {
            *q = (v * id).round_ties_even() as i8;
            sum += *q as i32;
        }
        b.s = f16::from_f32(d * sum as f32);
        let _ = b.write(out);
    }
}

#[inline(always)]
fn q8_scale_x86(x: &[f32]) -> (f32, f32) {
    let amax = x.iter().fold(0f32, |m, v| c_max(m, v.abs()));
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    (amax / 127.0, id)
}

pub(crate) fn quantize_q8_k(x: &[f32], dst: &mut [u8]) {
    for (x, out) in x.chunks_exact(QK_K).zip(dst.chunks_exact_mut(BlockQ8_K::BYTES)) {
        let mut b = BlockQ8_K { d: 0.0, qs: [0; QK_K], bsums: [0; QK_K / 16] };
        let (mut max, mut amax) = (0f32, 0f32);
        for &v in x {
            let ax = v.abs();
            if ax > amax {
                amax = ax;
                max = v;
            }
        }
        // ggml leaves `bsums` unset for an all-zero block; kt writes zeros.
        if amax != 0.0 {
            let iscale = -127.0f32 / max;
            for (q, v) in b.qs.iter_mut().zip(x) {
                *q = nearest_int(iscale * v).min(127) as i8;
            }
            for (s, q) in b.bsums.iter_mut().zip(b.qs.chunks_exact(16)) {
                *s = q.iter().map(|&q| q as i32).sum::<i32>() as i16;
            }
            b.d = 1.0 / iscale;
        }
        let _ = b.write(out);
    }
}

// ---------------------------------------------------------------------------------------------
// Quantized dot products (ggml-cpu/quants.c `ggml_vec_dot_*_generic`)
// ---------------------------------------------------------------------------------------------

pub(crate) fn vec_dot_q4_0_q8_0(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in pairs::<BlockQ4_0, BlockQ8_0>(w, a) {
        let (mut sumi0, mut sumi1) = (0i32, 0i32);
        for j in 0..QK / 2 {
            let v0 = (x.qs[j] & 0x0F) as i32 - 8;
            let v1 = (x.qs[j] >> 4) as i32 - 8;
            sumi0 += v0 * y.qs[j] as i32;
            sumi1 += v1 * y.qs[j + QK / 2] as i32;
        }
        let sumi = sumi0 + sumi1;
        sumf += sumi as f32 * x.d.to_f32() * y.d.to_f32();
    }
    sumf
}

pub(crate) fn vec_dot_q4_1_q8_1(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in pairs::<BlockQ4_1, BlockQ8_1>(w, a) {
        let (mut sumi0, mut sumi1) = (0i32, 0i32);
        for j in 0..QK / 2 {
            let v0 = (x.qs[j] & 0x0F) as i32;
            let v1 = (x.qs[j] >> 4) as i32;
            sumi0 += v0 * y.qs[j] as i32;
            sumi1 += v1 * y.qs[j + QK / 2] as i32;
        }
        let sumi = sumi0 + sumi1;
        sumf += (x.d.to_f32() * y.d.to_f32()) * sumi as f32 + x.m.to_f32() * y.s.to_f32();
    }
    sumf
}

pub(crate) fn vec_dot_q5_0_q8_0(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in pairs::<BlockQ5_0, BlockQ8_0>(w, a) {
        let qh = u32::from_le_bytes(x.qh);
        let (mut sumi0, mut sumi1) = (0i32, 0i32);
        for j in 0..QK / 2 {
            let xh_0 = (((qh & (1 << j)) >> j) << 4) as u8;
            let xh_1 = ((qh & (1 << (j + 16))) >> (j + 12)) as u8;
            let x0 = ((x.qs[j] & 0x0F) | xh_0) as i32 - 16;
            let x1 = ((x.qs[j] >> 4) | xh_1) as i32 - 16;
            sumi0 += x0 * y.qs[j] as i32;
            sumi1 += x1 * y.qs[j + QK / 2] as i32;
        }
        let sumi = sumi0 + sumi1;
        sumf += (x.d.to_f32() * y.d.to_f32()) * sumi as f32;
    }
    sumf
}

pub(crate) fn vec_dot_q5_1_q8_1(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in pairs::<BlockQ5_1, BlockQ8_1>(w, a) {
        let qh = u32::from_le_bytes(x.qh);
        let (mut sumi0, mut sumi1) = (0i32, 0i32);
        for j in 0..QK / 2 {
            let xh_0 = (((qh >> j) << 4) & 0x10) as u8;
            let xh_1 = ((qh >> (j + 12)) & 0x10) as u8;
            let x0 = ((x.qs[j] & 0xF) | xh_0) as i32;
            let x1 = ((x.qs[j] >> 4) | xh_1) as i32;
            sumi0 += x0 * y.qs[j] as i32;
            sumi1 += x1 * y.qs[j + QK / 2] as i32;
        }
        let sumi = sumi0 + sumi1;
        sumf += (x.d.to_f32() * y.d.to_f32()) * sumi as f32 + x.m.to_f32() * y.s.to_f32();
    }
    sumf
}

pub(crate) fn vec_dot_q8_0_q8_0(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in pairs::<BlockQ8_0, BlockQ8_0>(w, a) {
        let sumi: i32 = x.qs.iter().zip(y.qs).map(|(&a, b)| a as i32 * b as i32).sum();
        sumf += sumi as f32 * (x.d.to_f32() * y.d.to_f32());
    }
    sumf
}

/// Not in ggml (Q8_1 is never a weight format there); defined like Q8_0·Q8_0.
pub(crate) fn vec_dot_q8_1_q8_1(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in pairs::<BlockQ8_1, BlockQ8_1>(w, a) {
        let sumi: i32 = x.qs.iter().zip(y.qs).map(|(&a, b)| a as i32 * b as i32).sum();
        sumf += sumi as f32 * (x.d.to_f32() * y.d.to_f32());
    }
    sumf
}

/// Not in ggml (Q8_K is never a weight format there); defined like Q8_0·Q8_0 per super-block.
pub(crate) fn vec_dot_q8_k_q8_k(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in pairs::<BlockQ8_K, BlockQ8_K>(w, a) {
        let sumi: i32 = x.qs.iter().zip(y.qs).map(|(&a, b)| a as i32 * b as i32).sum();
        sumf += sumi as f32 * (x.d * y.d);
    }
    sumf
}

pub(crate) fn vec_dot_iq4_nl_q8_0(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in pairs::<BlockIQ4_NL, BlockQ8_0>(w, a) {
        let d = y.d.to_f32() * x.d.to_f32();
        let (mut sumi1, mut sumi2) = (0i32, 0i32);
        for j in 0..QK / 2 {
            sumi1 += y.qs[j] as i32 * KVALUES_IQ4NL[(x.qs[j] & 0xf) as usize] as i32;
            sumi2 += y.qs[j + QK / 2] as i32 * KVALUES_IQ4NL[(x.qs[j] >> 4) as usize] as i32;
        }
        sumf += d * (sumi1 + sumi2) as f32;
    }
    sumf
}

pub(crate) fn vec_dot_q2_k_q8_k(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in pairs::<BlockQ2_K, BlockQ8_K>(w, a) {
        let mut summs = 0i32;
        for j in 0..16 {
            summs += y.bsums[j] as i32 * (x.scales[j] >> 4) as i32;
        }
        let dall = y.d * x.d.to_f32();
        let dmin = y.d * x.dmin.to_f32();

        let mut isum = 0i32;
        let mut is = 0;
        for k in 0..QK_K / 128 {
            let q2 = &x.qs[32 * k..32 * k + 32];
            for (j, shift) in [0, 2, 4, 6].into_iter().enumerate() {
                let q8 = &y.qs[128 * k + 32 * j..128 * k + 32 * j + 32];
                for half in 0..2 {
                    let d = (x.scales[is] & 0xF) as i32;
                    is += 1;
                    let mut isuml = 0i32;
                    for l in 16 * half..16 * half + 16 {
                        isuml += q8[l] as i32 * ((q2[l] >> shift) & 3) as i32;
                    }
                    isum += d * isuml;
                }
            }
        }
        sumf += dall * isum as f32 - dmin * summs as f32;
    }
    sumf
}

/// Adds `scale(i / group) * q8[i] * a[i]` into lane `i % 8`, as ggml's `aux16`/`aux32` loops.
/// Integer sums are exact, so only the lane assignment matters.
#[inline(always)]
fn lanes(q8: &[i8; QK_K], a: &[i8; QK_K], group: usize, scale: impl Fn(usize) -> i32) -> [i32; 8] {
    let mut aux32 = [0i32; 8];
    for (g, (q8, a)) in q8.chunks_exact(group).zip(a.chunks_exact(group)).enumerate() {
        let s = scale(g);
        for (i, (q, a)) in q8.iter().zip(a).enumerate() {
            aux32[i % 8] += s * (*q as i32 * *a as i32);
        }
    }
    aux32
}

pub(crate) fn vec_dot_q3_k_q8_k(w: &[u8], a: &[u8]) -> f32 {
    let mut sums = [0f32; 8];
    for (x, y) in pairs::<BlockQ3_K, BlockQ8_K>(w, a) {
        let mut aux8 = [0i8; QK_K];
        let mut m = 1u8;
        let mut o = 0;
        for n in 0..QK_K / 128 {
            let q3 = &x.qs[32 * n..32 * n + 32];
            for shift in [0, 2, 4, 6] {
                for l in 0..32 {
                    let high = if x.hmask[l] & m != 0 { 0 } else { 4 };
                    aux8[o + l] = ((q3[l] >> shift) & 3) as i8 - high;
                }
                o += 32;
                m = m.wrapping_shl(1);
            }
        }
        let scales = q3_k_scales(&x.scales);
        let aux32 = lanes(&y.qs, &aux8, 16, |g| scales[g] as i32 - 32);
        let d = x.d.to_f32() * y.d;
        for l in 0..8 {
            sums[l] += d * aux32[l] as f32;
        }
    }
    let mut sumf = 0f32;
    for s in sums {
        sumf += s;
    }
    sumf
}

pub(crate) fn vec_dot_q4_k_q8_k(w: &[u8], a: &[u8]) -> f32 {
    let mut sums = [0f32; 8];
    let mut sumf = 0f32;
    for (x, y) in pairs::<BlockQ4_K, BlockQ8_K>(w, a) {
        let mut aux8 = [0i8; QK_K];
        for j in 0..QK_K / 64 {
            let q4 = &x.qs[32 * j..32 * j + 32];
            for l in 0..32 {
                aux8[64 * j + l] = (q4[l] & 0xF) as i8;
                aux8[64 * j + 32 + l] = (q4[l] >> 4) as i8;
            }
        }
        let (scales, mins) = k4_scales_mins(&x.scales);
        let mut sumi = 0i32;
        for j in 0..QK_K / 16 {
            sumi += y.bsums[j] as i32 * mins[j / 2] as i32;
        }
        let aux32 = lanes(&y.qs, &aux8, 32, |g| scales[g] as i32);
        let d = x.d.to_f32() * y.d;
        for l in 0..8 {
            sums[l] += d * aux32[l] as f32;
        }
        let dmin = x.dmin.to_f32() * y.d;
        sumf -= dmin * sumi as f32;
    }
    for s in sums {
        sumf += s;
    }
    sumf
}

pub(crate) fn vec_dot_q5_k_q8_k(w: &[u8], a: &[u8]) -> f32 {
    let mut sums = [0f32; 8];
    let mut sumf = 0f32;
    for (x, y) in pairs::<BlockQ5_K, BlockQ8_K>(w, a) {
        let mut aux8 = [0i8; QK_K];
        let mut m = 1u8;
        for j in 0..QK_K / 64 {
            let q4 = &x.qs[32 * j..32 * j + 32];
            for l in 0..32 {
                aux8[64 * j + l] = (q4[l] & 0xF) as i8 + if x.qh[l] & m != 0 { 16 } else { 0 };
            }
            m = m.wrapping_shl(1);
            for l in 0..32 {
                aux8[64 * j + 32 + l] = (q4[l] >> 4) as i8 + if x.qh[l] & m != 0 { 16 } else { 0 };
            }
            m = m.wrapping_shl(1);
        }
        let (scales, mins) = k4_scales_mins(&x.scales);
        let mut sumi = 0i32;
        for j in 0..QK_K / 16 {
            sumi += y.bsums[j] as i32 * mins[j / 2] as i32;
        }
        let aux32 = lanes(&y.qs, &aux8, 32, |g| scales[g] as i32);
        let d = x.d.to_f32() * y.d;
        for l in 0..8 {
            sums[l] += d * aux32[l] as f32;
        }
        let dmin = x.dmin.to_f32() * y.d;
        sumf -= dmin * sumi as f32;
    }
    for s in sums {
        sumf += s;
    }
    sumf
}

pub(crate) fn vec_dot_q6_k_q8_k(w: &[u8], a: &[u8]) -> f32 {
    let mut sums = [0f32; 8];
    for (x, y) in pairs::<BlockQ6_K, BlockQ8_K>(w, a) {
        let aux8 = q6_k_values(&x);
        let aux32 = lanes(&y.qs, &aux8, 16, |g| x.scales[g] as i32);
        let d = x.d.to_f32() * y.d;
        for l in 0..8 {
            sums[l] += d * aux32[l] as f32;
        }
    }
    let mut sumf = 0f32;
    for s in sums {
        sumf += s;
    }
    sumf
}

pub(crate) fn vec_dot_iq4_xs_q8_k(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in pairs::<BlockIQ4_XS, BlockQ8_K>(w, a) {
        let d4d8 = x.d.to_f32() * y.d;
        for ib in 0..QK_K / 32 {
            let dl = d4d8 * (iq4_xs_scale(&x, ib) as i32 - 32) as f32;
            let qs = &x.qs[16 * ib..16 * ib + 16];
            let q8 = &y.qs[32 * ib..32 * ib + 32];
            let (mut sumi1, mut sumi2) = (0i32, 0i32);
            for j in 0..16 {
                sumi1 += q8[j] as i32 * KVALUES_IQ4NL[(qs[j] & 0xf) as usize] as i32;
                sumi2 += q8[j + 16] as i32 * KVALUES_IQ4NL[(qs[j] >> 4) as usize] as i32;
            }
            sumf += dl * (sumi1 + sumi2) as f32;
        }
    }
    sumf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn x86_q8_0_differs_from_the_reference_only_in_rounding() {
        // 0.5 * 127/127 ties: the reference rounds away from zero, x86 to even.
        let mut x = [0f32; QK];
        x[0] = 127.0;
        x[1] = 0.5;
        x[2] = -2.5;
        let (mut r, mut v) = ([0u8; 34], [0u8; 34]);
        quantize_q8_0(&x, &mut r);
        quantize_q8_0_x86(&x, &mut v);
        assert_eq!((r[2] as i8, r[3] as i8, r[4] as i8), (127, 1, -3));
        assert_eq!((v[2] as i8, v[3] as i8, v[4] as i8), (127, 0, -2));
    }

    #[test]
    fn nearest_int_rounds_half_to_even() {
        for (v, r) in
            [(0.5, 0), (1.5, 2), (2.5, 2), (-0.5, 0), (-1.5, -2), (126.7, 127), (-127.0, -127)]
        {
            assert_eq!(nearest_int(v), r, "{v}");
        }
    }

    #[test]
    fn q8_k_all_zero_block_is_zero() {
        let mut out = vec![0xAAu8; BlockQ8_K::BYTES];
        quantize_q8_k(&[0.0; QK_K], &mut out);
        assert!(out.iter().all(|&b| b == 0));
    }

    #[test]
    fn q8_k_quantization_follows_its_definition() {
        let x: Vec<f32> = (0..QK_K).map(|i| ((i * 7919) % 513) as f32 / 97.0 - 2.5).collect();
        let mut out = vec![0u8; BlockQ8_K::BYTES];
        quantize_q8_k(&x, &mut out);
        let b = BlockQ8_K::read(&out).unwrap();
        let max = x.iter().copied().fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
        assert_eq!(b.d, 1.0 / (-127.0 / max));
        for (i, &q) in b.qs.iter().enumerate() {
            let exact = x[i] * (-127.0 / max);
            assert!((q as f32 - exact).abs() <= 0.5 + 1e-4, "{i}: {q} vs {exact}");
        }
        for (g, s) in b.bsums.iter().enumerate() {
            assert_eq!(*s as i32, b.qs[16 * g..16 * g + 16].iter().map(|&q| q as i32).sum::<i32>());
        }
    }
}
