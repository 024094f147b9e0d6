//! Random but valid tensor bytes: random quants under finite f16 scales chosen so that the
//! dequantized values have a chosen standard deviation.

use half::{bf16, f16};
use kt_core::GgmlType;

use crate::tensors::Init;
use crate::SynthError;

/// wyrand: fast, small, and good enough for weights nobody reads.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// A generator for stream `a`, `b` of `seed`, independent of the others.
    pub fn stream(seed: u64, a: u64, b: u64) -> Self {
        let mut r = Rng(seed ^ a.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        r.0 ^= r.next_u64() ^ b.wrapping_mul(0xd1b5_4a32_d192_ed03);
        r.next_u64();
        r
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = u128::from(self.0) * u128::from(self.0 ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) as u64) ^ (t as u64)
    }

    pub fn fill(&mut self, out: &mut [u8]) {
        let mut chunks = out.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let v = self.next_u64().to_le_bytes();
        rest.copy_from_slice(&v[..rest.len()]);
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in `lo..=hi` (small ranges).
    fn range(&mut self, lo: u8, hi: u8) -> u8 {
        lo + (self.next_u64() % u64::from(hi - lo + 1)) as u8
    }
}

/// Group scales of the K-quants: uniform in 32..=63, whose root mean square is this.
const SCALE_LO: u8 = 32;
const SCALE_HI: u8 = 63;
const SCALE_RMS: f32 = 48.2;

/// The standard deviation of `q - mean` for `q` uniform over `n` integers.
fn uniform_std(n: f32) -> f32 {
    ((n * n - 1.0) / 12.0).sqrt()
}

fn put_f16(out: &mut [u8], at: usize, v: f32) {
    out[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

/// Writes Q4_K/Q5_K's twelve bytes of 6-bit scales and mins (the inverse of
/// `get_scale_min_k4`).
fn pack_k4_scales(sc: &[u8; 8], m: &[u8; 8], q: &mut [u8]) {
    for j in 0..4 {
        q[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6);
        q[j + 4] = (m[j] & 63) | ((m[j + 4] >> 4) << 6);
        q[j + 8] = (sc[j + 4] & 15) | ((m[j + 4] & 15) << 4);
    }
}

/// Fills `out` (whole blocks of `ty`) with values of `init` for rows of `row_len`.
pub fn fill(
    ty: GgmlType,
    init: Init,
    row_len: usize,
    rng: &mut Rng,
    out: &mut [u8],
) -> Result<(), SynthError> {
    let std = match init {
        Init::Matrix => 1.0 / (row_len.max(1) as f32).sqrt(),
        Init::Norm => 0.05,
        Init::Bias => 0.01,
    };
    let center = if init == Init::Norm { 1.0 } else { 0.0 };
    let bb = ty.type_size();
    if !out.len().is_multiple_of(bb) {
        return Err(SynthError::Plan(format!("{} bytes are not whole {ty} blocks", out.len())));
    }
    match ty {
        GgmlType::F32 => {
            let a = std * 3f32.sqrt();
            for c in out.chunks_exact_mut(4) {
                let v = center + (rng.unit() * 2.0 - 1.0) * a;
                c.copy_from_slice(&v.to_le_bytes());
            }
        }
        GgmlType::F16 | GgmlType::BF16 => {
            let a = std * 3f32.sqrt();
            for c in out.chunks_exact_mut(2) {
                let v = center + (rng.unit() * 2.0 - 1.0) * a;
                let b = if ty == GgmlType::F16 {
                    f16::from_f32(v).to_le_bytes()
                } else {
                    bf16::from_f32(v).to_le_bytes()
                };
                c.copy_from_slice(&b);
            }
        }
        GgmlType::Q8_0 => {
            let d = std / uniform_std(256.0);
            rng.fill(out);
            for b in out.chunks_exact_mut(bb) {
                put_f16(b, 0, d);
            }
        }
        GgmlType::Q5_0 => {
            // d * (q - 16) with q in 0..32.
            let d = std / uniform_std(32.0);
            rng.fill(out);
            for b in out.chunks_exact_mut(bb) {
                put_f16(b, 0, d);
            }
        }
        GgmlType::Q5_1 => {
            // d * q + m with q in 0..32: m = -15.5 d centres the values.
            let d = std / uniform_std(32.0);
            rng.fill(out);
            for b in out.chunks_exact_mut(bb) {
                put_f16(b, 0, d);
                put_f16(b, 2, -15.5 * d);
            }
        }
        GgmlType::Q4_K | GgmlType::Q5_K => {
            // d*sc*q - dmin*m with m = sc and dmin = d * mean(q): centred values.
            let levels = if ty == GgmlType::Q4_K { 16.0 } else { 32.0 };
            let d = std / (uniform_std(levels) * SCALE_RMS);
            let dmin = d * (levels - 1.0) / 2.0;
            rng.fill(out);
            for b in out.chunks_exact_mut(bb) {
                put_f16(b, 0, d);
                put_f16(b, 2, dmin);
                let mut sc = [0u8; 8];
                sc.iter_mut().for_each(|s| *s = rng.range(SCALE_LO, SCALE_HI));
                pack_k4_scales(&sc, &sc, &mut b[4..16]);
            }
        }
        GgmlType::Q6_K => {
            // ql[128] qh[64] scales[16] d: d * scale * (q - 32).
            let d = std / (uniform_std(64.0) * SCALE_RMS);
            rng.fill(out);
            for b in out.chunks_exact_mut(bb) {
                for s in &mut b[192..208] {
                    *s = rng.range(SCALE_LO, SCALE_HI);
                }
                put_f16(b, 208, d);
            }
        }
        other => return Err(SynthError::Plan(format!("kt synth cannot write {other}"))),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(v: &[f32]) -> (f32, f32) {
        let n = v.len() as f32;
        let mean = v.iter().sum::<f32>() / n;
        let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / n;
        (mean, var.sqrt())
    }

    #[test]
    fn every_format_dequantizes_to_finite_values_of_the_asked_spread() {
        let row_len = 1024;
        let want = 1.0 / (row_len as f32).sqrt();
        for ty in [
            GgmlType::F32,
            GgmlType::F16,
            GgmlType::BF16,
            GgmlType::Q8_0,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q4_K,
            GgmlType::Q5_K,
            GgmlType::Q6_K,
        ] {
            let n = row_len * 64;
            let mut bytes = vec![0u8; ty.row_bytes(n).unwrap()];
            fill(ty, Init::Matrix, row_len, &mut Rng::new(7), &mut bytes).unwrap();
            let v = kt_quant::dequantize(ty, &bytes, n).unwrap();
            assert!(v.iter().all(|x| x.is_finite()), "{ty}");
            let (mean, std) = stats(&v);
            assert!(mean.abs() < 0.08 * want, "{ty}: mean {mean}");
            assert!((std / want - 1.0).abs() < 0.1, "{ty}: std {std}, want {want}");
        }
        let mut norm = vec![0u8; 4 * 256];
        fill(GgmlType::F32, Init::Norm, 256, &mut Rng::new(1), &mut norm).unwrap();
        let v = kt_quant::dequantize(GgmlType::F32, &norm, 256).unwrap();
        assert!(v.iter().all(|x| (0.9..1.1).contains(x)));
    }

    #[test]
    fn k4_scales_round_trip() {
        let sc = [32, 63, 40, 50, 33, 62, 47, 58];
        let m = [63, 32, 45, 36, 60, 34, 59, 44];
        let mut q = [0u8; 12];
        pack_k4_scales(&sc, &m, &mut q);
        assert_eq!(kt_quant::blocks::k4_scales_mins(&q), (sc, m));
    }
}
