//! The `amx_int8` expert format: weights re-quantized to int8 with one scale per output row,
//! laid out in panels that AMX tile loads and AVX-512 VNNI read directly.
//!
//! A GGUF block format keeps a scale per 32 (or 16) values, so an integer dot product must be
//! rescaled block by block; AMX's `TDPBSSD` sums 64 products per lane pass and cannot. Like
//! KTransformers' AMX backends, kt therefore repacks routed experts once, at load, into:
//!
//! * `q[r][k] = round(w[r][k] / s[r])` with `s[r] = max_k |w[r][k]| / 127` (symmetric, per row);
//! * panels of [`PANEL_ROWS`] rows × [`PANEL_K`] columns, 1 KiB each, stored as 16 groups of
//!   four consecutive columns × 16 rows (`panel[g][r][i] = q[r][4g + i]`): one AMX B tile, and
//!   for VNNI one 64-byte load holding four columns of each of the 16 rows. The panels of a row
//!   block follow each other along k, so a block of 16 rows is one contiguous stream;
//! * rows padded with zeros to a multiple of [`ROW_ALIGN`], columns to a multiple of
//!   [`PANEL_K`].
//!
//! Activations ([`QuantActs`]) are quantized per token the same way (symmetric int8, one scale
//! per row), zero rows padding the token count to [`TOKEN_ALIGN`].
//!
//! Every path computes the exact integer sum `acc = Σ_k qa[t][k] · q[r][k]` (no overflow: at
//! most 127 · 128 · k < 2^31 for k < 131072) and then `y = acc · (sa[t] · s[r])` in f32 in that
//! order, so the scalar reference, the VNNI kernel and the AMX kernel are **bit-identical**
//! (`tests/packed.rs`). Against the f32 product of the original weights the error is the int8
//! rounding of both operands (stated in the tests).
//!
//! [`Path`] picks the kernel: AMX (`TDPBSSD` on 32 × 32 blocks of tokens × rows) when the CPU
//! and the OS allow it and [`crate::kernels`]' family is not lowered below it by `KT_ISA`,
//! VNNI (`VPDPBUSD`, up to 8 tokens per pass over the weights) otherwise, the scalar loop as
//! the reference.

use std::ops::Range;

use kt_core::GgmlType;

use crate::{kernels, Isa, QuantError, Result};

/// Rows per panel (the columns of one AMX B tile).
pub const PANEL_ROWS: usize = 16;
/// Columns (values along k) per panel: 64 int8 values, one AMX tile row.
pub const PANEL_K: usize = 64;
/// Bytes of one panel.
const PANEL_BYTES: usize = PANEL_ROWS * PANEL_K;
/// Rows are padded to this multiple (the AMX kernel computes two panels of rows at once).
pub const ROW_ALIGN: usize = 32;
/// Token rows of [`QuantActs`] are padded to this multiple (two 16-row A tiles).
pub const TOKEN_ALIGN: usize = 32;

/// Quantizes `x` to symmetric int8 (`q = round(x / s)`, ties to even, `s = max |x| / 127`) into
/// `q` (`q.len() >= x.len()`; the rest of `q` is left alone) and returns `s` (0 for an all-zero
/// or empty row; a NaN or infinite value gives a non-finite `s`, and zeros in `q` for NaN).
pub fn quantize_row_i8(x: &[f32], q: &mut [i8]) -> f32 {
    // Eight running maxima so the loop vectorizes (an f32 `max` fold does not).
    let mut m = [0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (m, v) in m.iter_mut().zip(c) {
            *m = m.max(v.abs());
        }
    }
    let amax = chunks
        .remainder()
        .iter()
        .fold(m.iter().fold(0f32, |a, b| a.max(*b)), |a, v| a.max(v.abs()));
    // `max` skips NaN: look for one separately, so that it shows in the scale.
    let amax = if x.iter().any(|v| v.is_nan()) { f32::NAN } else { amax };
    if amax == 0.0 || amax.is_nan() {
        q[..x.len()].fill(0);
        return if amax == 0.0 { 0.0 } else { f32::NAN };
    }
    let id = 127.0 / amax;
    for (q, v) in q.iter_mut().zip(x) {
        // Round to nearest, ties to even: adding and removing 1.5 · 2^23 leaves the integer
        // part (|v · id| <= 127); no libm call, so the loop vectorizes.
        const MAGIC: f32 = 12_582_912.0;
        *q = ((v * id + MAGIC) - MAGIC) as i8;
    }
    amax / 127.0
}

/// A weight matrix `[rows × cols]` in the `amx_int8` layout (see the module docs).
#[derive(Clone, Debug)]
pub struct PackedI8 {
    rows: usize,
    cols: usize,
    rows_p: usize,
    cols_p: usize,
    data: Vec<i8>,
    scale: Vec<f32>,
    /// `Σ_k q[r][k]`, for the VNNI kernel's unsigned-activation offset.
    sums: Vec<i32>,
}

impl PackedI8 {
    /// Packs the matrix whose row `r` `row(r, out)` writes into `out` (`cols` values).
    pub fn from_rows(rows: usize, cols: usize, mut row: impl FnMut(usize, &mut [f32])) -> Self {
        let rows_p = rows.next_multiple_of(ROW_ALIGN);
        let cols_p = cols.next_multiple_of(PANEL_K).max(PANEL_K);
        let kb = cols_p / PANEL_K;
        let mut data = vec![0i8; rows_p * cols_p];
        let (mut scale, mut sums) = (vec![0f32; rows_p], vec![0i32; rows_p]);
        let (mut x, mut q) = (vec![0f32; cols], vec![0i8; cols_p]);
        for r in 0..rows {
            row(r, &mut x);
            scale[r] = quantize_row_i8(&x, &mut q);
            sums[r] = q.iter().map(|&v| v as i32).sum();
            let (p, rr) = (r / PANEL_ROWS, r % PANEL_ROWS);
            for (b, chunk) in q.chunks_exact(PANEL_K).enumerate() {
                let panel = &mut data[(p * kb + b) * PANEL_BYTES..][..PANEL_BYTES];
                for (g, four) in chunk.chunks_exact(4).enumerate() {
                    panel[g * PANEL_K + rr * 4..][..4].copy_from_slice(four);
                }
            }
        }
        Self { rows, cols, rows_p, cols_p, data, scale, sums }
    }

    /// Packs `rows` rows of `cols` values stored contiguously in `data` in the GGUF format `ty`
    /// (dequantized row by row, then re-quantized).
    pub fn from_tensor(ty: GgmlType, data: &[u8], rows: usize, cols: usize) -> Result<Self> {
        let k = kernels(ty).ok_or(QuantError::Unsupported { ty, op: "pack to amx_int8" })?;
        let rb = ty.row_bytes(cols).ok_or(QuantError::PartialBlock {
            ty,
            n: cols,
            block: ty.block_size(),
        })?;
        let want = rb.checked_mul(rows).ok_or(QuantError::TooLarge { ty, n: cols })?;
        if data.len() != want {
            return Err(QuantError::Length {
                ty,
                what: "matrix",
                expected: want,
                actual: data.len(),
            });
        }
        Ok(Self::from_rows(rows, cols, |r, out| (k.dequantize)(&data[r * rb..(r + 1) * rb], out)))
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held (int8 values with padding, scales and row sums).
    pub fn bytes(&self) -> usize {
        self.data.len() + self.scale.len() * 4 + self.sums.len() * 4
    }

    /// Row `r` as the f32 values the packed form stands for (`q · s`), for tests and checks.
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        for (k, o) in out.iter_mut().enumerate().take(self.cols) {
            *o = self.q(r, k) as f32 * self.scale[r];
        }
    }

    /// The quantized value at row `r`, column `k`.
    fn q(&self, r: usize, k: usize) -> i8 {
        let kb = self.cols_p / PANEL_K;
        let (p, rr, b, kk) = (r / PANEL_ROWS, r % PANEL_ROWS, k / PANEL_K, k % PANEL_K);
        self.data[(p * kb + b) * PANEL_BYTES + (kk / 4) * PANEL_K + rr * 4 + kk % 4]
    }
}

/// Token rows quantized to symmetric int8, one scale per token, padded with zero rows to a
/// multiple of [`TOKEN_ALIGN`] and with zero columns to a multiple of [`PANEL_K`].
#[derive(Clone, Debug, Default)]
pub struct QuantActs {
    tokens: usize,
    cols: usize,
    cols_p: usize,
    /// Bytes from one token row to the next: `cols_p` plus one panel, so that the 16 rows an
    /// AMX tile load reads do not all fall into the same few L1 sets (a power-of-two stride
    /// such as 2048 maps them to two sets of a 48 KiB, 12-way cache).
    stride: usize,
    q: Vec<i8>,
    scale: Vec<f32>,
}

impl QuantActs {
    /// Quantizes the rows of `x` (`x.len() / cols` tokens of `cols` values).
    pub fn new(x: &[f32], cols: usize) -> Self {
        let tokens = x.len().checked_div(cols).unwrap_or(0);
        let mut a = Self::zeroed(tokens, cols);
        for (t, row) in x.chunks_exact(cols.max(1)).take(tokens).enumerate() {
            a.scale[t] = quantize_row_i8(row, &mut a.q[t * a.stride..]);
        }
        a
    }

    /// `tokens` zero rows of `cols` values, to be filled through [`QuantActs::parts_mut`].
    pub fn zeroed(tokens: usize, cols: usize) -> Self {
        let cols_p = cols.next_multiple_of(PANEL_K).max(PANEL_K);
        let stride = cols_p + PANEL_K;
        let rows = tokens.next_multiple_of(TOKEN_ALIGN).max(TOKEN_ALIGN);
        Self { tokens, cols, cols_p, stride, q: vec![0; rows * stride], scale: vec![0.0; rows] }
    }

    /// The rows `idx` (token indices into `self`, in that order) as a new set.
    pub fn gather(&self, idx: &[usize]) -> Self {
        let mut a = Self::zeroed(idx.len(), self.cols);
        for (s, &t) in idx.iter().enumerate() {
            a.q[s * a.stride..][..a.cols_p]
                .copy_from_slice(&self.q[t * self.stride..][..self.cols_p]);
            a.scale[s] = self.scale[t];
        }
        a
    }

    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// The quantized rows (row `t` at `t * stride`, `cols` values used) and the scales, for
    /// filling rows in parallel with [`quantize_row_i8`]: `scale[t] = quantize_row_i8(x_t,
    /// &mut q[t * stride..])`.
    pub fn parts_mut(&mut self) -> (&mut [i8], usize, &mut [f32]) {
        (&mut self.q, self.stride, &mut self.scale)
    }

    pub fn cols(&self) -> usize {
        self.cols
    }
}

/// Which kernel computes [`matmul`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Path {
    /// The reference loop, on every target.
    Scalar,
    /// AVX-512 VNNI (`VPDPBUSD`).
    Vnni,
    /// AMX (`TDPBSSD`).
    Amx,
}

impl Path {
    /// Every path, lowest first.
    pub const ALL: [Path; 3] = [Path::Scalar, Path::Vnni, Path::Amx];

    pub fn name(self) -> &'static str {
        match self {
            Path::Scalar => "scalar",
            Path::Vnni => "vnni",
            Path::Amx => "amx",
        }
    }

    /// Whether this CPU (and OS) runs the path.
    pub fn available(self) -> bool {
        match self {
            Path::Scalar => true,
            Path::Vnni => Isa::Vnni.available(),
            Path::Amx => Isa::Amx.available(),
        }
    }

    /// The best path allowed by the selected kernel family (`KT_ISA` lowers it: `vnni` turns
    /// AMX off, `avx512` and below leave the scalar loop).
    pub fn best() -> Path {
        match crate::kernels::selected() {
            Isa::Amx => Path::Amx,
            Isa::Vnni => Path::Vnni,
            _ => Path::Scalar,
        }
    }

    /// The path for a product with `tokens` token rows: AMX from [`AMX_MIN_TOKENS`] tokens
    /// when [`Path::best`] allows it, VNNI below that (or the best path when it is lower).
    pub fn for_tokens(tokens: usize) -> Path {
        match Path::best() {
            Path::Amx if tokens < AMX_MIN_TOKENS => Path::Vnni,
            p => p,
        }
    }
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Tokens from which [`Path::for_tokens`] takes AMX (measured with `kt bench experts`; see
/// BENCHMARKS.md).
pub const AMX_MIN_TOKENS: usize = 8;

/// `out[t * ldo + (r - rows.start)] = Σ_k a[t][k] · w[r][k]` (as the module docs define it) for
/// every token `t < a.tokens()` and weight row `r` in `rows` (clipped to `w.rows()`), with
/// `path`'s kernel (a path this CPU lacks falls back to the best one it has).
///
/// Errors, with nothing written, when `a` and `w` have different column counts, `ldo` is
/// smaller than the row count, or `out` is too short.
pub fn matmul(
    w: &PackedI8,
    rows: Range<usize>,
    a: &QuantActs,
    out: &mut [f32],
    ldo: usize,
    path: Path,
) -> Result<()> {
    let rows = rows.start.min(w.rows)..rows.end.min(w.rows);
    let nr = rows.len();
    if a.cols != w.cols {
        return Err(QuantError::Length {
            ty: GgmlType::I8,
            what: "activation row",
            expected: w.cols,
            actual: a.cols,
        });
    }
    if nr == 0 || a.tokens == 0 {
        return Ok(());
    }
    let need = (a.tokens - 1) * ldo + nr;
    if ldo < nr || out.len() < need {
        return Err(QuantError::Length {
            ty: GgmlType::F32,
            what: "output",
            expected: need.max(a.tokens * nr),
            actual: out.len(),
        });
    }
    let path = if path.available() { path } else { Path::best().min(path) };
    match path {
        #[cfg(target_arch = "x86_64")]
        Path::Amx if rows.start.is_multiple_of(ROW_ALIGN) => {
            crate::kernels::amx::matmul_amx(w.view(), rows, a.view(), out, ldo)
        }
        #[cfg(target_arch = "x86_64")]
        Path::Vnni | Path::Amx => {
            crate::kernels::amx::matmul_vnni(w.view(), rows, a.view(), out, ldo)
        }
        _ => matmul_scalar(w, rows, a, out, ldo),
    }
    Ok(())
}

/// The reference: the exact integer sum per (token, row), then the shared f32 epilogue.
fn matmul_scalar(w: &PackedI8, rows: Range<usize>, a: &QuantActs, out: &mut [f32], ldo: usize) {
    let mut wr = vec![0i8; w.cols];
    for r in rows.clone() {
        for (k, v) in wr.iter_mut().enumerate() {
            *v = w.q(r, k);
        }
        for t in 0..a.tokens {
            let qa = &a.q[t * a.stride..t * a.stride + w.cols];
            let acc: i32 = qa.iter().zip(&wr).map(|(&x, &y)| x as i32 * y as i32).sum();
            out[t * ldo + r - rows.start] = acc as f32 * (a.scale[t] * w.scale[r]);
        }
    }
}

/// Borrowed views for the SIMD module (which cannot see the private fields).
#[cfg(target_arch = "x86_64")]
pub(crate) struct WeightView<'a> {
    pub rows_p: usize,
    pub cols_p: usize,
    pub data: &'a [i8],
    pub scale: &'a [f32],
    pub sums: &'a [i32],
}

#[cfg(target_arch = "x86_64")]
pub(crate) struct ActsView<'a> {
    pub tokens: usize,
    pub cols_p: usize,
    pub stride: usize,
    pub q: &'a [i8],
    pub scale: &'a [f32],
}

#[cfg(target_arch = "x86_64")]
impl PackedI8 {
    fn view(&self) -> WeightView<'_> {
        WeightView {
            rows_p: self.rows_p,
            cols_p: self.cols_p,
            data: &self.data,
            scale: &self.scale,
            sums: &self.sums,
        }
    }
}

#[cfg(target_arch = "x86_64")]
impl QuantActs {
    fn view(&self) -> ActsView<'_> {
        ActsView {
            tokens: self.tokens,
            cols_p: self.cols_p,
            stride: self.stride,
            q: &self.q,
            scale: &self.scale,
        }
    }
}

/// Int8 operations per second one thread's AMX unit sustains on register-resident tiles
/// (`TDPBSSD` back to back, 2 operations per multiply-add) over about `seconds`: the peak that
/// `kt bench experts` reports AMX shares against. `None` without AMX.
pub fn amx_int8_peak(seconds: f64) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    if Path::Amx.available() {
        return Some(crate::kernels::amx::peak(seconds));
    }
    let _ = seconds;
    None
}
