//! GGML block layouts, byte for byte as `ggml-common.h` declares them.
//!
//! A quantized tensor row is a sequence of blocks; every block holds `ELEMS` weights in `BYTES`
//! bytes and stands alone (scales inside the block). All multi-byte fields are little-endian.
//! The formats, in short (`d` = scale, `m`/`dmin` = offset, `q` = quantized value):
//!
//! | format | elems | bytes | value |
//! |--------|------:|------:|-------|
//! | Q4_0   | 32  | 18  | `d * (q4 - 8)` |
//! | Q4_1   | 32  | 20  | `d * q4 + m` |
//! | Q5_0   | 32  | 22  | `d * (q5 - 16)`, 5th bits packed in `qh` |
//! | Q5_1   | 32  | 24  | `d * q5 + m` |
//! | Q8_0   | 32  | 34  | `d * q8` |
//! | Q8_1   | 32  | 36  | `d * q8`, plus `s = d * sum(q8)` for Q4_1/Q5_1 dot products |
//! | Q2_K   | 256 | 84  | 16 groups of 16: `d*sc4 * q2 - dmin*m4` |
//! | Q3_K   | 256 | 110 | 16 groups of 16: `d*(sc6-32) * (q3 - 4)`; high bit in `hmask` |
//! | Q4_K   | 256 | 144 | 8 groups of 32: `d*sc6 * q4 - dmin*m6` |
//! | Q5_K   | 256 | 176 | 8 groups of 32: `d*sc6 * q5 - dmin*m6` |
//! | Q6_K   | 256 | 210 | 16 groups of 16: `d*sc8 * (q6 - 32)` |
//! | Q8_K   | 256 | 292 | `d * q8` with an f32 `d` and per-16 sums; only an activation format |
//! | IQ4_NL | 32  | 18  | `d * kvalues_iq4nl[q4]` (non-linear 4-bit grid) |
//! | IQ4_XS | 256 | 136 | 8 groups of 32: `d*(sc6-32) * kvalues_iq4nl[q4]` |
//!
//! Each struct is `#[repr(C)]` with exactly ggml's field order and size (checked at compile
//! time, and without padding), so a later SIMD kernel may view blocks in place. The scalar code
//! parses blocks out of byte slices with [`Block::read`], which works at any alignment: GGUF only
//! aligns tensor starts, and a row of an odd-sized block format can begin anywhere.

use half::f16;
use kt_core::GgmlType;

/// Elements in a K-quant super-block.
pub const QK_K: usize = 256;
/// Elements in a Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q8_1/IQ4_NL block.
pub const QK: usize = 32;
/// Bytes of the packed 6-bit scales and mins of Q4_K/Q5_K.
pub const K_SCALE_SIZE: usize = 12;

/// The 16 values of the IQ4_NL/IQ4_XS non-linear grid (`kvalues_iq4nl` in ggml).
pub const KVALUES_IQ4NL: [i8; 16] =
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];

/// A GGML block format: a fixed number of elements in a fixed number of bytes.
pub trait Block: Copy + Sized + Send + Sync + 'static {
    /// The GGML type whose tensors are made of these blocks.
    const TYPE: GgmlType;
    /// Bytes per block; equals `size_of::<Self>()` and `TYPE.type_size()`.
    const BYTES: usize;
    /// Elements per block; equals `TYPE.block_size()`.
    const ELEMS: usize;

    /// Parses the block from the first `BYTES` bytes of `bytes`, at any alignment.
    /// `None` when `bytes` is shorter than a block.
    fn read(bytes: &[u8]) -> Option<Self>;

    /// Writes the block into the first `BYTES` bytes of `out`; `None` when `out` is too short.
    fn write(&self, out: &mut [u8]) -> Option<()>;
}

/// A fixed-size little-endian field of a block.
trait Field: Sized {
    const SIZE: usize;
    /// Reads from the start of `b` (at least `SIZE` bytes: guaranteed by the block parser).
    fn get(b: &[u8]) -> Self;
    fn put(&self, b: &mut [u8]);
}

impl Field for f16 {
    const SIZE: usize = 2;
    #[inline(always)]
    fn get(b: &[u8]) -> Self {
        f16::from_bits(u16::from_le_bytes([b[0], b[1]]))
    }
    #[inline(always)]
    fn put(&self, b: &mut [u8]) {
        b[..2].copy_from_slice(&self.to_bits().to_le_bytes());
    }
}

impl Field for u16 {
    const SIZE: usize = 2;
    #[inline(always)]
    fn get(b: &[u8]) -> Self {
        u16::from_le_bytes([b[0], b[1]])
    }
    #[inline(always)]
    fn put(&self, b: &mut [u8]) {
        b[..2].copy_from_slice(&self.to_le_bytes());
    }
}

impl Field for f32 {
    const SIZE: usize = 4;
    #[inline(always)]
    fn get(b: &[u8]) -> Self {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
    #[inline(always)]
    fn put(&self, b: &mut [u8]) {
        b[..4].copy_from_slice(&self.to_le_bytes());
    }
}

impl<const N: usize> Field for [u8; N] {
    const SIZE: usize = N;
    #[inline(always)]
    fn get(b: &[u8]) -> Self {
        let mut a = [0u8; N];
        a.copy_from_slice(&b[..N]);
        a
    }
    #[inline(always)]
    fn put(&self, b: &mut [u8]) {
        b[..N].copy_from_slice(self);
    }
}

impl<const N: usize> Field for [i8; N] {
    const SIZE: usize = N;
    #[inline(always)]
    fn get(b: &[u8]) -> Self {
        let mut a = [0i8; N];
        for (a, b) in a.iter_mut().zip(&b[..N]) {
            *a = *b as i8;
        }
        a
    }
    #[inline(always)]
    fn put(&self, b: &mut [u8]) {
        for (b, a) in b[..N].iter_mut().zip(self) {
            *b = *a as u8;
        }
    }
}

impl<const N: usize> Field for [i16; N] {
    const SIZE: usize = 2 * N;
    #[inline(always)]
    fn get(b: &[u8]) -> Self {
        let mut a = [0i16; N];
        for (a, b) in a.iter_mut().zip(b[..2 * N].chunks_exact(2)) {
            *a = i16::from_le_bytes([b[0], b[1]]);
        }
        a
    }
    #[inline(always)]
    fn put(&self, b: &mut [u8]) {
        for (b, a) in b[..2 * N].chunks_exact_mut(2).zip(self) {
            b.copy_from_slice(&a.to_le_bytes());
        }
    }
}

/// Declares block structs: the `#[repr(C)]` struct, its size asserts (struct size, sum of field
/// sizes: no padding) and a [`Block`] impl that reads and writes the fields in declaration order.
macro_rules! blocks {
    ($(
        $(#[$meta:meta])*
        pub struct $name:ident($ty:ident, $elems:expr, $bytes:expr) {
            $( $(#[$fmeta:meta])* pub $field:ident: $fty:ty, )*
        }
    )*) => {$(
        $(#[$meta])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, PartialEq)]
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $fty, )*
        }

        const _: () = assert!(std::mem::size_of::<$name>() == $bytes);
        const _: () = assert!(0 $(+ <$fty as Field>::SIZE)* == $bytes);

        impl Block for $name {
            const TYPE: GgmlType = GgmlType::$ty;
            const BYTES: usize = $bytes;
            const ELEMS: usize = $elems;

            #[inline(always)]
            fn read(bytes: &[u8]) -> Option<Self> {
                let b: &[u8; $bytes] = bytes.get(..$bytes)?.try_into().ok()?;
                let mut _off = 0usize;
                $(
                    let $field = <$fty as Field>::get(&b[_off..]);
                    _off += <$fty as Field>::SIZE;
                )*
                Some(Self { $($field,)* })
            }

            #[inline(always)]
            fn write(&self, out: &mut [u8]) -> Option<()> {
                let b = out.get_mut(..$bytes)?;
                let mut _off = 0usize;
                $(
                    self.$field.put(&mut b[_off..]);
                    _off += <$fty as Field>::SIZE;
                )*
                Some(())
            }
        }
    )*};
}

blocks! {
    /// Q4_0: 32 weights `d * (q - 8)`, `q` in 0..16. Low nibbles of `qs` hold elements 0..16,
    /// high nibbles elements 16..32.
    pub struct BlockQ4_0(Q4_0, QK, 18) {
        /// Scale.
        pub d: f16,
        /// 4-bit quants, two per byte.
        pub qs: [u8; QK / 2],
    }

    /// Q4_1: 32 weights `d * q + m`, `q` in 0..16, nibbles as in Q4_0.
    pub struct BlockQ4_1(Q4_1, QK, 20) {
        /// Scale.
        pub d: f16,
        /// Minimum (offset).
        pub m: f16,
        /// 4-bit quants, two per byte.
        pub qs: [u8; QK / 2],
    }

    /// Q5_0: 32 weights `d * (q - 16)`, `q` in 0..32: low 4 bits as in Q4_0, bit 4 of element
    /// `j` is bit `j` of the little-endian u32 `qh`.
    pub struct BlockQ5_0(Q5_0, QK, 22) {
        /// Scale.
        pub d: f16,
        /// Fifth bits of the 32 quants.
        pub qh: [u8; 4],
        /// Low 4 bits, two per byte.
        pub qs: [u8; QK / 2],
    }

    /// Q5_1: 32 weights `d * q + m`, `q` in 0..32, bits as in Q5_0.
    pub struct BlockQ5_1(Q5_1, QK, 24) {
        /// Scale.
        pub d: f16,
        /// Minimum (offset).
        pub m: f16,
        /// Fifth bits of the 32 quants.
        pub qh: [u8; 4],
        /// Low 4 bits, two per byte.
        pub qs: [u8; QK / 2],
    }

    /// Q8_0: 32 weights `d * q`, `q` a signed byte. Also the activation format that Q4_0, Q5_0,
    /// Q8_0 and IQ4_NL weights are dotted with.
    pub struct BlockQ8_0(Q8_0, QK, 34) {
        /// Scale.
        pub d: f16,
        /// Signed 8-bit quants.
        pub qs: [i8; QK],
    }

    /// Q8_1: 32 values `d * q` plus `s = d * sum(q)`; the activation format that Q4_1 and Q5_1
    /// weights are dotted with (the sum carries their offset `m`).
    pub struct BlockQ8_1(Q8_1, QK, 36) {
        /// Scale.
        pub d: f16,
        /// `d * sum(qs)`.
        pub s: f16,
        /// Signed 8-bit quants.
        pub qs: [i8; QK],
    }

    /// Q2_K: 256 weights in 16 groups of 16. Group `g` has a 4-bit scale (`scales[g] & 15`) and
    /// a 4-bit min (`scales[g] >> 4`); weight = `d*scale * q - dmin*min`, `q` 2-bit. Byte `l` of
    /// each 32-byte half of `qs` holds four quants at bit shifts 0, 2, 4, 6 for elements `l`,
    /// `l+32`, `l+64`, `l+96` of that 128-element half.
    pub struct BlockQ2_K(Q2_K, QK_K, 84) {
        /// Packed 4-bit scales (low nibble) and mins (high nibble), one byte per group.
        pub scales: [u8; QK_K / 16],
        /// 2-bit quants, four per byte.
        pub qs: [u8; QK_K / 4],
        /// Super-block scale of the group scales.
        pub d: f16,
        /// Super-block scale of the group mins.
        pub dmin: f16,
    }

    /// Q3_K: 256 weights in 16 groups of 16, weight = `d*(scale - 32) * (q - 4*!hbit)`: a
    /// 2-bit low part in `qs` (laid out as in Q2_K), the high bit in `hmask` (a set bit
    /// means no offset), and 6-bit group scales packed into 12 bytes.
    pub struct BlockQ3_K(Q3_K, QK_K, 110) {
        /// High bits: bit `k` of byte `l` belongs to element `32*k + l`.
        pub hmask: [u8; QK_K / 8],
        /// Low 2 bits, four per byte.
        pub qs: [u8; QK_K / 4],
        /// Sixteen 6-bit scales (low nibbles in bytes 0..8, high pairs in 8..12).
        pub scales: [u8; 12],
        /// Super-block scale.
        pub d: f16,
    }

    /// Q4_K: 256 weights in 8 groups of 32, weight = `d*sc * q - dmin*m` with 6-bit `sc` and
    /// `m` per group packed into 12 bytes. Each 32-byte chunk of `qs` holds two groups: low
    /// nibbles the first, high nibbles the second.
    pub struct BlockQ4_K(Q4_K, QK_K, 144) {
        /// Super-block scale of the group scales.
        pub d: f16,
        /// Super-block scale of the group mins.
        pub dmin: f16,
        /// Eight 6-bit scales and eight 6-bit mins.
        pub scales: [u8; K_SCALE_SIZE],
        /// 4-bit quants.
        pub qs: [u8; QK_K / 2],
    }

    /// Q5_K: Q4_K with a fifth bit per weight: bit `g` of `qh[l]` is the high bit of element
    /// `l` of group `g`.
    pub struct BlockQ5_K(Q5_K, QK_K, 176) {
        /// Super-block scale of the group scales.
        pub d: f16,
        /// Super-block scale of the group mins.
        pub dmin: f16,
        /// Eight 6-bit scales and eight 6-bit mins.
        pub scales: [u8; K_SCALE_SIZE],
        /// Fifth bits.
        pub qh: [u8; QK_K / 8],
        /// Low 4 bits.
        pub qs: [u8; QK_K / 2],
    }

    /// Q6_K: 256 weights in 16 groups of 16, weight = `d * scale * (q - 32)` with a signed
    /// 8-bit scale per group and 6-bit `q`: low 4 bits in `ql`, high 2 bits in `qh`.
    pub struct BlockQ6_K(Q6_K, QK_K, 210) {
        /// Low 4 bits.
        pub ql: [u8; QK_K / 2],
        /// High 2 bits, four per byte.
        pub qh: [u8; QK_K / 4],
        /// Signed group scales.
        pub scales: [i8; QK_K / 16],
        /// Super-block scale.
        pub d: f16,
    }

    /// Q8_K: 256 values `d * q` with an f32 scale and the sums of each 16 quants. Only used
    /// for activations, the format all K-quants and IQ4_XS are dotted with.
    pub struct BlockQ8_K(Q8_K, QK_K, 292) {
        /// Scale (f32, unlike every other block).
        pub d: f32,
        /// Signed 8-bit quants.
        pub qs: [i8; QK_K],
        /// Sum of each group of 16 quants.
        pub bsums: [i16; QK_K / 16],
    }

    /// IQ4_NL: 32 weights `d * KVALUES_IQ4NL[q]`, nibbles laid out as in Q4_0.
    pub struct BlockIQ4_NL(IQ4_NL, QK, 18) {
        /// Scale.
        pub d: f16,
        /// 4-bit grid indices.
        pub qs: [u8; QK / 2],
    }

    /// IQ4_XS: 256 weights in 8 groups of 32, weight = `d*(ls - 32) * KVALUES_IQ4NL[q]` with
    /// a 6-bit `ls` per group: low 4 bits in `scales_l` (nibbles), high 2 bits in `scales_h`.
    pub struct BlockIQ4_XS(IQ4_XS, QK_K, 136) {
        /// Scale.
        pub d: f16,
        /// High 2 bits of the 8 group scales.
        pub scales_h: u16,
        /// Low 4 bits of the 8 group scales.
        pub scales_l: [u8; QK_K / 64],
        /// 4-bit grid indices; each 16-byte chunk holds one group as in IQ4_NL.
        pub qs: [u8; QK_K / 2],
    }
}

/// Unpacks the sixteen 6-bit Q3_K group scales (`0..64`, before subtracting 32), as the
/// `kmask` shuffle in ggml's `dequantize_row_q3_K` does.
#[inline]
pub fn q3_k_scales(scales: &[u8; 12]) -> [u8; 16] {
    const KMASK1: u32 = 0x0303_0303;
    const KMASK2: u32 = 0x0f0f_0f0f;
    let le =
        |i: usize| u32::from_le_bytes([scales[i], scales[i + 1], scales[i + 2], scales[i + 3]]);
    let (a0, a1, tmp) = (le(0), le(4), le(8));
    let aux = [
        (a0 & KMASK2) | ((tmp & KMASK1) << 4),
        (a1 & KMASK2) | (((tmp >> 2) & KMASK1) << 4),
        ((a0 >> 4) & KMASK2) | (((tmp >> 4) & KMASK1) << 4),
        ((a1 >> 4) & KMASK2) | (((tmp >> 6) & KMASK1) << 4),
    ];
    let mut out = [0u8; 16];
    for (o, a) in out.chunks_exact_mut(4).zip(aux) {
        o.copy_from_slice(&a.to_le_bytes());
    }
    out
}

/// Unpacks the eight 6-bit scales and eight 6-bit mins of Q4_K/Q5_K (ggml's
/// `get_scale_min_k4` for `j` in `0..8`).
#[inline]
pub fn k4_scales_mins(q: &[u8; K_SCALE_SIZE]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut m = [0u8; 8];
    for j in 0..4 {
        sc[j] = q[j] & 63;
        m[j] = q[j + 4] & 63;
    }
    for j in 4..8 {
        sc[j] = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        m[j] = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
    (sc, m)
}

/// The 6-bit scale of IQ4_XS group `ib` (`0..64`, before subtracting 32).
#[inline]
pub fn iq4_xs_scale(b: &BlockIQ4_XS, ib: usize) -> u8 {
    ((b.scales_l[ib / 2] >> (4 * (ib % 2))) & 0xf) | ((((b.scales_h >> (2 * ib)) & 3) as u8) << 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check<B: Block>() {
        assert_eq!(B::BYTES, std::mem::size_of::<B>(), "{}", B::TYPE);
        assert_eq!(B::BYTES, B::TYPE.type_size(), "{}", B::TYPE);
        assert_eq!(B::ELEMS, B::TYPE.block_size(), "{}", B::TYPE);
        // Round trip through bytes, at an odd offset.
        let bytes: Vec<u8> = (0..B::BYTES + 1).map(|i| (i * 37 + 11) as u8).collect();
        let b = B::read(&bytes[1..]).unwrap();
        let mut out = vec![0u8; B::BYTES];
        b.write(&mut out).unwrap();
        assert_eq!(out, bytes[1..]);
        assert!(B::read(&bytes[2..]).is_none());
        assert!(b.write(&mut out[1..]).is_none());
    }

    #[test]
    fn sizes_agree_with_ggml_type_and_bytes_round_trip() {
        check::<BlockQ4_0>();
        check::<BlockQ4_1>();
        check::<BlockQ5_0>();
        check::<BlockQ5_1>();
        check::<BlockQ8_0>();
        check::<BlockQ8_1>();
        check::<BlockQ2_K>();
        check::<BlockQ3_K>();
        check::<BlockQ4_K>();
        check::<BlockQ5_K>();
        check::<BlockQ6_K>();
        check::<BlockQ8_K>();
        check::<BlockIQ4_NL>();
        check::<BlockIQ4_XS>();
    }

    #[test]
    fn fields_are_little_endian_at_ggml_offsets() {
        let mut bytes = [0u8; 292];
        bytes[0..4].copy_from_slice(&1.5f32.to_le_bytes());
        bytes[4] = 0xff;
        bytes[260..262].copy_from_slice(&(-3i16).to_le_bytes());
        let b = BlockQ8_K::read(&bytes).unwrap();
        assert_eq!((b.d, b.qs[0], b.bsums[0]), (1.5, -1, -3));

        let mut bytes = [0u8; 84];
        bytes[80..82].copy_from_slice(&f16::from_f32(2.0).to_bits().to_le_bytes());
        bytes[82..84].copy_from_slice(&f16::from_f32(-0.5).to_bits().to_le_bytes());
        let b = BlockQ2_K::read(&bytes).unwrap();
        assert_eq!((b.d.to_f32(), b.dmin.to_f32()), (2.0, -0.5));
    }

    /// ggml's vec_dot functions unpack Q4_K scales with a `utmp` word shuffle instead of
    /// `get_scale_min_k4`; both must agree.
    #[test]
    fn k4_scale_unpacking_matches_ggml_utmp_shuffle() {
        const KMASK1: u32 = 0x3f3f3f3f;
        const KMASK2: u32 = 0x0f0f0f0f;
        const KMASK3: u32 = 0x03030303;
        let mut seed = 0x1234_5678u32;
        for _ in 0..1000 {
            let mut q = [0u8; 12];
            for b in &mut q {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                *b = seed as u8;
            }
            let w =
                |i: usize| u32::from_le_bytes([q[4 * i], q[4 * i + 1], q[4 * i + 2], q[4 * i + 3]]);
            let mut utmp = [w(0), w(1), w(2), 0];
            utmp[3] = ((utmp[2] >> 4) & KMASK2) | (((utmp[1] >> 6) & KMASK3) << 4);
            let uaux = utmp[1] & KMASK1;
            utmp[1] = (utmp[2] & KMASK2) | (((utmp[0] >> 6) & KMASK3) << 4);
            utmp[2] = uaux;
            utmp[0] &= KMASK1;
            let bytes: Vec<u8> = utmp.iter().flat_map(|u| u.to_le_bytes()).collect();
            let (sc, m) = k4_scales_mins(&q);
            assert_eq!(sc[..], bytes[0..8]);
            assert_eq!(m[..], bytes[8..16]);
        }
    }
}
