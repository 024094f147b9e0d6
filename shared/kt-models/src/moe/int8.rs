//! Routed experts in the `amx_int8` format: every expert's gate, up and down weights repacked
//! once (at load) into [`kt_quant::packed::PackedI8`] — int8 with one scale per output row, in
//! AMX/VNNI panels — and a layer computed on them with AMX tiles for multi-token products
//! (prefill) and AVX-512 VNNI below [`kt_quant::packed::AMX_MIN_TOKENS`] tokens per expert.
//!
//! The schedule is the fused kernel's (`fused.rs`): tokens grouped by expert, every token's
//! hidden row quantized once per layer, gate and up in one pass per block of intermediate rows,
//! `silu(gate) · up` quantized per token for the down projection, the weighted sum added per
//! token in expert id order. Work items are blocks of a multiple of 32 rows (the AMX kernel's
//! register block), all of an expert's tokens.
//!
//! Accuracy: this is a different quantization from the GGUF file's (per-row int8 of the
//! dequantized weights, per-token int8 activations), so results differ from the GGUF kernels
//! by that rounding; `tests/int8_experts.rs` bounds the difference against the f32 reference.
//! Within the format every kernel path (scalar, VNNI, AMX) gives bit-identical results.

use std::sync::atomic::{AtomicUsize, Ordering};

use kt_quant::packed::{self, PackedI8, Path, QuantActs, ROW_ALIGN};
use rayon::prelude::*;

use super::fused::{
    assemble, group_by_expert, item_starts, map_items, row_blocks, weighted_sum, FusedConfig,
    SERIAL_PAIRS,
};
use super::{Mlp, Routing};
use crate::linear::Linear;
use crate::ops::silu_mul_fast;
use crate::ModelError;

/// One expert's three projections in the `amx_int8` format.
#[derive(Clone, Debug)]
pub struct PackedMlp {
    pub gate: PackedI8,
    pub up: PackedI8,
    pub down: PackedI8,
}

impl PackedMlp {
    /// Repacks `m` (dequantized from its GGUF format, then re-quantized per row).
    pub fn from_mlp(m: &Mlp) -> Result<Self, ModelError> {
        Ok(Self { gate: pack(&m.gate)?, up: pack(&m.up)?, down: pack(&m.down)? })
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.gate.bytes() + self.up.bytes() + self.down.bytes()
    }
}

fn pack(l: &Linear) -> Result<PackedI8, ModelError> {
    let w = l.weight();
    if l.bias().is_some() {
        return Err(ModelError::Unsupported(format!(
            "`{}` has a bias; amx_int8 experts take none",
            w.name
        )));
    }
    PackedI8::from_tensor(w.ty, &w.data, l.out_dim(), l.in_dim())
        .map_err(|e| ModelError::Shape(format!("`{}`: {e}", w.name)))
}

/// Repacks the experts `experts` (per layer, per expert id) of the layers `which` selects, in
/// parallel on the current rayon pool, calling `progress(done, total)` after each expert.
pub fn repack_layers(
    experts: &[Vec<Option<Mlp>>],
    which: impl Fn(usize) -> bool + Sync,
    progress: impl Fn(usize, usize) + Sync,
) -> Result<Vec<Vec<Option<PackedMlp>>>, ModelError> {
    let todo: Vec<(usize, usize)> = experts
        .iter()
        .enumerate()
        .filter(|(l, _)| which(*l))
        .flat_map(|(l, es)| {
            es.iter().enumerate().filter(|(_, m)| m.is_some()).map(move |(e, _)| (l, e))
        })
        .collect();
    let done = AtomicUsize::new(0);
    let packed: Vec<((usize, usize), PackedMlp)> = todo
        .par_iter()
        .map(|&(l, e)| {
            let m = experts[l][e].as_ref().ok_or_else(|| {
                ModelError::Input(format!("expert {e} of layer {l} vanished during the repack"))
            })?;
            let p = PackedMlp::from_mlp(m)?;
            progress(done.fetch_add(1, Ordering::Relaxed) + 1, todo.len());
            Ok(((l, e), p))
        })
        .collect::<Result<_, ModelError>>()?;
    let mut out: Vec<Vec<Option<PackedMlp>>> =
        experts.iter().map(|es| es.iter().map(|_| None).collect()).collect();
    for ((l, e), p) in packed {
        out[l][e] = Some(p);
    }
    Ok(out)
}

/// `x` (rows of `h`) quantized per token, rows in parallel when `par`.
fn quantize(x: &[f32], h: usize, par: bool) -> QuantActs {
    if !par {
        return QuantActs::new(x, h);
    }
    let mut a = QuantActs::zeroed(x.len() / h, h);
    let (q, stride, scale) = a.parts_mut();
    q.par_chunks_mut(stride)
        .zip(scale.par_iter_mut())
        .zip(x.par_chunks_exact(h))
        .for_each(|((q, s), x)| *s = packed::quantize_row_i8(x, q));
    a
}

/// One layer on packed experts: `hidden` holds `n` rows of `h`; `path` forces a kernel (else
/// [`Path::for_tokens`] of each expert's token count). `routing` was validated by the caller
/// (every routed id held here); `None` if an id has no packed expert.
pub(super) fn forward(
    h: usize,
    experts: &[Option<PackedMlp>],
    hidden: &[f32],
    routing: &Routing,
    path: Option<Path>,
) -> Option<Vec<f32>> {
    let n = hidden.len() / h;
    let cfg = FusedConfig::default();
    let groups = group_by_expert(routing, n, experts.len())?;
    let mut active = Vec::with_capacity(groups.len());
    for (id, tokens, weights) in &groups {
        let m = experts[*id].as_ref()?;
        let shapes_ok = m.gate.cols() == h
            && m.up.cols() == h
            && m.up.rows() == m.gate.rows()
            && m.down.cols() == m.gate.rows()
            && m.down.rows() == h;
        if !shapes_ok {
            return None;
        }
        active.push((m, &tokens[..], &weights[..]));
    }
    let pairs: usize = active.iter().map(|a| a.1.len()).sum();
    let par = pairs > SERIAL_PAIRS;
    let path_for = |nt: usize| path.unwrap_or_else(|| Path::for_tokens(nt));

    let acts = quantize(hidden, h, par);
    let idx: Vec<usize> = (0..active.len()).collect();
    let gathered: Vec<QuantActs> = map_items(&idx, par, |&i| acts.gather(active[i].1));

    // Gate + up: blocks of intermediate rows of one expert, all its tokens.
    let shape: Vec<(usize, usize)> = active.iter().map(|a| (a.0.gate.rows(), a.1.len())).collect();
    let work = row_blocks(&shape, ROW_ALIGN, &cfg);
    let blocks: Vec<Vec<f32>> = work
        .par_iter()
        .map(|(i, rows)| {
            let (m, tokens, _) = active[*i];
            let path = path_for(tokens.len());
            let mut g = project(&m.gate, rows.clone(), &gathered[*i], path);
            let u = project(&m.up, rows.clone(), &gathered[*i], path);
            silu_mul_fast(&mut g, &u);
            g
        })
        .collect();
    drop(gathered);
    let first_item = item_starts(&work, active.len());
    let down_acts: Vec<QuantActs> = map_items(&idx, par, |&i| {
        let (nt, ff) = (active[i].1.len(), active[i].0.gate.rows());
        let x = assemble(&work, &blocks, first_item[i]..first_item[i + 1], nt, ff);
        QuantActs::new(&x, ff)
    });
    drop(blocks);

    // Down: blocks of hidden rows of one expert, all its tokens.
    let shape: Vec<(usize, usize)> = active.iter().map(|a| (a.0.down.rows(), a.1.len())).collect();
    let work = row_blocks(&shape, ROW_ALIGN, &cfg);
    let blocks: Vec<Vec<f32>> = work
        .par_iter()
        .map(|(i, rows)| {
            let (m, tokens, _) = active[*i];
            project(&m.down, rows.clone(), &down_acts[*i], path_for(tokens.len()))
        })
        .collect();
    drop(down_acts);
    let routed: Vec<(&[usize], &[f32])> = active.iter().map(|a| (a.1, a.2)).collect();
    Some(weighted_sum(&routed, &work, &blocks, n, h, par))
}

/// `w`'s rows `rows` against the token rows `a`, token-major (`[tokens × rows]`). The caller
/// checked the shapes, so `matmul` cannot refuse them; if it did, NaN would show it.
fn project(w: &PackedI8, rows: std::ops::Range<usize>, a: &QuantActs, path: Path) -> Vec<f32> {
    let nr = rows.len();
    let mut o = vec![0f32; a.tokens() * nr];
    if packed::matmul(w, rows, a, &mut o, nr, path).is_err() {
        o.fill(f32::NAN);
    }
    o
}
