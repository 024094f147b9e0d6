//! The fused MoE expert kernel: one MoE layer's routed experts computed as one schedule
//! instead of expert after expert and matrix after matrix.
//!
//! * Tokens are grouped by expert once (in token order, as the reference does).
//! * Activations are prepared once per layer: in `MatmulMode::Ggml` every token's hidden row is
//!   quantized to the gate/up `vec_dot_type` once (not per expert per projection); experts
//!   read the quantized rows by token index, without gathering copies.
//! * Gate and up are computed in one pass: each work item takes a block of intermediate rows
//!   of one expert and, for every row, dots the gate row and the up row with the expert's
//!   tokens and stores `silu(gate) · up`. Each row is streamed from memory once for all of
//!   the expert's tokens.
//! * Work items are (expert × block of output rows), sized so that every thread gets several
//!   and each streams different weight memory; rayon runs them (kt-expert's pinned pool, when
//!   the server installs one, is the pool they run on).
//! * The down projection is the same over the hidden rows; the weighted sum is added per token
//!   in expert id order.
//! * Multi-token kernels: in `MatmulMode::Ggml` each expert's quantized token rows are
//!   gathered into consecutive rows once, and every work item calls
//!   [`kt_quant::Kernels::vec_dot_tile`] on its weight rows × all the expert's tokens: the
//!   VNNI kernels unpack each weight block once for up to 8 tokens (register-blocked), and are
//!   bit-identical to `vec_dot` pair by pair. Outputs are assembled per expert and the weighted
//!   sum is added per token in parallel; with at most [`SERIAL_PAIRS`] (token, expert) pairs
//!   (decode) those small steps stay on the calling thread, so a layer call has two rayon
//!   hand-offs (gate/up, down).
//! * Regimes: with fewer than [`FusedConfig::prefill_min_tokens`] tokens on an expert
//!   (decode), each row meets all of the expert's tokens before the next row is read; with
//!   more (prefill), tokens are taken in tiles of [`FusedConfig::token_tile`] so that a block
//!   of weight rows stays in cache across the tile and the tile's activations stay in L2. The
//!   switch point and the tile are parameters; `kt bench experts` measures both regimes at
//!   every token count so they can be set from the machine.
//!
//! Every product is the same kernel call on the same operands as in the reference path
//! (`Linear::forward`: `dot_f32` in `MatmulMode::F32`, `vec_dot` on the same quantized bytes in
//! `MatmulMode::Ggml`), and the weighted sum is added in the same order, so the fused path's
//! output is bit-identical to the reference path's in both modes (tested in `moe.rs`).

use kt_quant::Kernels;
use rayon::prelude::*;

use super::{Mlp, Routing, NO_EXPERT};
use crate::linear::Linear;
use crate::ops::silu;

/// One expert's share of a layer call: its id, the tokens routed to it (in token order) and
/// their routing weights.
pub(super) type Routed = (usize, Vec<usize>, Vec<f32>);

/// The tokens routed to each expert, in expert id order, or `None` when an id is not below
/// `n_experts`.
pub(super) fn group_by_expert(
    routing: &Routing,
    n: usize,
    n_experts: usize,
) -> Option<Vec<Routed>> {
    let mut slots: Vec<Option<(Vec<usize>, Vec<f32>)>> = vec![None; n_experts];
    for t in 0..n {
        for j in 0..routing.k {
            let id = routing.ids[t * routing.k + j];
            if id == NO_EXPERT {
                continue;
            }
            let (tokens, weights) = slots.get_mut(id as usize)?.get_or_insert_default();
            tokens.push(t);
            weights.push(routing.weights[t * routing.k + j]);
        }
    }
    Some(slots.into_iter().enumerate().filter_map(|(e, s)| s.map(|(t, w)| (e, t, w))).collect())
}

/// Parameters of the fused schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FusedConfig {
    /// Tokens on one expert from which the prefill (token-tiled) schedule is used.
    pub prefill_min_tokens: usize,
    /// Tokens per tile in the prefill schedule.
    pub token_tile: usize,
    /// Work items per thread the rows are split into (more balance vs. less overhead).
    pub items_per_thread: usize,
}

impl Default for FusedConfig {
    fn default() -> Self {
        // Measured with `kt bench experts` (BENCHMARKS.md, "MoE expert kernels").
        Self { prefill_min_tokens: 32, token_tile: 32, items_per_thread: 4 }
    }
}

/// The activation rows one projection reads: f32 rows (`MatmulMode::F32`) or rows quantized
/// to the weight format's `vec_dot_type` (`MatmulMode::Ggml`).
enum Acts<'a> {
    F32 { x: &'a [f32], dim: usize },
    Quant { q: Vec<u8>, row_bytes: usize },
}

impl Acts<'_> {
    #[inline]
    fn dot(&self, k: &Kernels, w: &[u8], t: usize) -> f32 {
        match self {
            Acts::F32 { x, dim } => (k.dot_f32)(w, &x[t * dim..(t + 1) * dim]),
            Acts::Quant { q, row_bytes } => (k.vec_dot)(w, &q[t * row_bytes..(t + 1) * row_bytes]),
        }
    }
}

/// `x` (`n` rows) prepared for `lin`: quantized as `Linear::forward` would, or borrowed.
fn prepare<'a>(lin: &Linear, x: &'a [f32], dim: usize) -> Acts<'a> {
    match lin.act_quantizer() {
        None => Acts::F32 { x, dim },
        Some((quantize, row_bytes)) => {
            let n = x.len() / dim;
            let mut q = vec![0u8; n * row_bytes];
            for (row, out) in x.chunks_exact(dim).zip(q.chunks_exact_mut(row_bytes)) {
                quantize(row, out);
            }
            Acts::Quant { q, row_bytes }
        }
    }
}

/// Whether two linears take their activations the same way (same kernels family, same
/// quantizer and row size), so one prepared activation set serves both.
fn same_acts(a: &Linear, b: &Linear) -> bool {
    let (qa, qb) = (a.act_quantizer(), b.act_quantizer());
    a.kernels().vec_dot_type == b.kernels().vec_dot_type
        && qa.map(|(_, r)| r) == qb.map(|(_, r)| r)
        && qa.is_some() == qb.is_some()
        && a.in_dim() == b.in_dim()
}

/// Whether the fused path computes `m` (hidden size `h`): no biases, gate and up reading the
/// same activations, consistent shapes.
pub(super) fn supports(m: &Mlp, h: usize) -> bool {
    let ff = m.gate.out_dim();
    let shapes_ok = m.gate.in_dim() == h
        && m.up.in_dim() == h
        && m.up.out_dim() == ff
        && m.down.in_dim() == ff
        && m.down.out_dim() == h;
    let no_bias = m.gate.bias().is_none() && m.up.bias().is_none() && m.down.bias().is_none();
    shapes_ok && no_bias && same_acts(&m.gate, &m.up)
}

/// One expert's share of a layer call.
struct Active<'a> {
    mlp: &'a Mlp,
    /// Token indices (into the layer's hidden rows), in token order.
    tokens: Vec<usize>,
    /// The routing weight of each of those tokens.
    weights: Vec<f32>,
}

/// Rows per work item for an expert with `tokens` tokens, so that the layer's total work
/// (`Σ rows · tokens`) splits into about `threads · items_per_thread` items.
fn rows_per_item(rows: usize, tokens: usize, total_work: usize, cfg: &FusedConfig) -> usize {
    let items = rayon::current_num_threads() * cfg.items_per_thread.max(1);
    let target = total_work.div_ceil(items.max(1));
    target.div_ceil(tokens.max(1)).clamp(4, rows.max(4))
}

/// Row blocks `(expert index, rows)` over the experts' `rows(mlp)` output rows.
fn items(
    active: &[Active<'_>],
    rows: impl Fn(&Mlp) -> usize,
    cfg: &FusedConfig,
) -> Vec<(usize, std::ops::Range<usize>)> {
    let shape: Vec<(usize, usize)> = active.iter().map(|a| (rows(a.mlp), a.tokens.len())).collect();
    row_blocks(&shape, 1, cfg)
}

/// Row blocks `(expert index, rows)` over experts of `shape` = (output rows, tokens) each, a
/// multiple of `align` rows per block (the last one of an expert may be shorter), sized so that
/// the layer's total work splits into about `threads · items_per_thread` blocks.
pub(super) fn row_blocks(
    shape: &[(usize, usize)],
    align: usize,
    cfg: &FusedConfig,
) -> Vec<(usize, std::ops::Range<usize>)> {
    let total: usize = shape.iter().map(|(rows, nt)| rows * nt).sum();
    let mut out = Vec::new();
    for (i, &(rows, nt)) in shape.iter().enumerate() {
        let step = rows_per_item(rows, nt, total, cfg).next_multiple_of(align.max(1));
        let mut r0 = 0;
        while r0 < rows {
            out.push((i, r0..(r0 + step).min(rows)));
            r0 += step;
        }
    }
    out
}

/// Weight rows kept in cache across a token tile in the prefill schedule (16 rows of gate
/// and up at hidden 2048-7168 in 4-8 bit formats: 20-120 KiB, within L2).
const TILE_ROWS: usize = 16;

/// Calls `f(row, token slot)` for `rows` × `0..tokens` in the regime's order, writing to
/// `out[(row - rows.start) * tokens + slot]`: decode, each row with all tokens; prefill, per
/// block of [`TILE_ROWS`] rows, per tile of tokens, each row of the block with the tile.
fn schedule(
    rows: std::ops::Range<usize>,
    tokens: usize,
    cfg: &FusedConfig,
    out: &mut [f32],
    mut f: impl FnMut(usize, usize) -> f32,
) {
    let prefill = tokens >= cfg.prefill_min_tokens;
    let (tile, block) =
        if prefill { (cfg.token_tile.max(1), TILE_ROWS) } else { (tokens, rows.len()) };
    let mut b0 = rows.start;
    while b0 < rows.end {
        let b1 = (b0 + block.max(1)).min(rows.end);
        let mut t0 = 0;
        while t0 < tokens {
            let t1 = (t0 + tile).min(tokens);
            for r in b0..b1 {
                let o = &mut out[(r - rows.start) * tokens..(r - rows.start + 1) * tokens];
                for (s, v) in o[t0..t1].iter_mut().enumerate() {
                    *v = f(r, t0 + s);
                }
            }
            t0 = t1;
        }
        b0 = b1;
    }
}

/// The fused forward of one layer, or `None` when the experts do not fit its assumptions
/// (biases, gate/up that read activations differently, mismatched shapes): the caller then
/// takes the reference path. `experts` and `routing` were validated by the caller.
pub(super) fn forward(
    cfg: &FusedConfig,
    h: usize,
    experts: &[Option<Mlp>],
    hidden: &[f32],
    routing: &Routing,
) -> Option<Vec<f32>> {
    let n = hidden.len() / h;
    let mut active = Vec::new();
    for (id, tokens, weights) in group_by_expert(routing, n, experts.len())? {
        active.push(Active { mlp: experts[id].as_ref()?, tokens, weights });
    }
    let mut out = vec![0f32; n * h];
    let Some(first) = active.first() else { return Some(out) };
    if !active.iter().all(|a| supports(a.mlp, h)) {
        return None;
    }

    if let Some(out) = forward_quant(cfg, h, &active, hidden, n) {
        return Some(out);
    }

    // Activations of the layer, once (per distinct way of taking them; usually one).
    let mut prepared: Vec<(&Linear, Acts<'_>)> =
        vec![(&first.mlp.gate, prepare(&first.mlp.gate, hidden, h))];
    let mut acts_of = Vec::with_capacity(active.len());
    for a in &active {
        let i = match prepared.iter().position(|(l, _)| same_acts(l, &a.mlp.gate)) {
            Some(i) => i,
            None => {
                prepared.push((&a.mlp.gate, prepare(&a.mlp.gate, hidden, h)));
                prepared.len() - 1
            }
        };
        acts_of.push(i);
    }

    // Gate + up, one pass: act[e] is [tokens × ff] (token-major, the down projection's input).
    let work = items(&active, |m| m.gate.out_dim(), cfg);
    let blocks: Vec<Vec<f32>> = work
        .par_iter()
        .map(|(i, rows)| {
            let a = &active[*i];
            let acts = &prepared[acts_of[*i]].1;
            let (gate, up) = (&a.mlp.gate, &a.mlp.up);
            let (kg, ku) = (gate.kernels(), up.kernels());
            let (dg, du): (&[u8], &[u8]) = (&gate.weight().data, &up.weight().data);
            let (rg, ru) = (gate.weight().row_bytes(), up.weight().row_bytes());
            let nt = a.tokens.len();
            let mut o = vec![0f32; rows.len() * nt];
            schedule(rows.clone(), nt, cfg, &mut o, |r, s| {
                let t = a.tokens[s];
                let g = acts.dot(kg, &dg[r * rg..(r + 1) * rg], t);
                let u = acts.dot(ku, &du[r * ru..(r + 1) * ru], t);
                silu(g) * u
            });
            o
        })
        .collect();
    let mut inter: Vec<Vec<f32>> =
        active.iter().map(|a| vec![0f32; a.tokens.len() * a.mlp.gate.out_dim()]).collect();
    for ((i, rows), b) in work.iter().zip(&blocks) {
        let (nt, ff) = (active[*i].tokens.len(), active[*i].mlp.gate.out_dim());
        for (dr, r) in rows.clone().enumerate() {
            for s in 0..nt {
                inter[*i][s * ff + r] = b[dr * nt + s];
            }
        }
    }
    drop(blocks);

    // Down: each expert's intermediate rows prepared for its down projection.
    let down_acts: Vec<Acts<'_>> = active
        .par_iter()
        .zip(&inter)
        .map(|(a, x)| prepare(&a.mlp.down, x, a.mlp.down.in_dim()))
        .collect();
    let work = items(&active, |m| m.down.out_dim(), cfg);
    let blocks: Vec<Vec<f32>> = work
        .par_iter()
        .map(|(i, rows)| {
            let a = &active[*i];
            let down = &a.mlp.down;
            let (k, rb) = (down.kernels(), down.weight().row_bytes());
            let d: &[u8] = &down.weight().data;
            let nt = a.tokens.len();
            let mut o = vec![0f32; rows.len() * nt];
            schedule(rows.clone(), nt, cfg, &mut o, |r, s| {
                down_acts[*i].dot(k, &d[r * rb..(r + 1) * rb], s)
            });
            o
        })
        .collect();
    // Weighted sum in expert id order per token (the reference order).
    let mut y: Vec<Vec<f32>> = active.iter().map(|a| vec![0f32; a.tokens.len() * h]).collect();
    for ((i, rows), b) in work.iter().zip(&blocks) {
        let nt = active[*i].tokens.len();
        for (dr, r) in rows.clone().enumerate() {
            for s in 0..nt {
                y[*i][s * h + r] = b[dr * nt + s];
            }
        }
    }
    for (a, y) in active.iter().zip(&y) {
        for (s, (&t, &w)) in a.tokens.iter().zip(&a.weights).enumerate() {
            for (o, v) in out[t * h..(t + 1) * h].iter_mut().zip(&y[s * h..(s + 1) * h]) {
                *o += v * w;
            }
        }
    }
    Some(out)
}

/// Below this many (token, expert) pairs in a layer call the small per-expert steps (gathering
/// activations, quantizing the down projection's input, scattering outputs) run on the
/// calling thread: a rayon hand-off costs more than they do.
pub(super) const SERIAL_PAIRS: usize = 64;

/// Runs `f` over `items`, in parallel when `parallel`.
pub(super) fn map_items<T: Sync, R: Send>(
    items: &[T],
    parallel: bool,
    f: impl Fn(&T) -> R + Sync + Send,
) -> Vec<R> {
    if parallel {
        items.par_iter().map(f).collect()
    } else {
        items.iter().map(f).collect()
    }
}

/// `out[t * rows.len() + (r - rows.start)]` for the weight rows `rows` of `lin` against the `nt`
/// quantized activation rows `acts` (row size `arb`), through [`Kernels::vec_dot_tile`]:
/// decode (`nt < prefill_min_tokens`), one tile of all rows and tokens (each row streamed
/// from memory once, then met by the tokens in register blocks of up to 8 from cache);
/// prefill, [`TILE_ROWS`]-row blocks × `token_tile`-token tiles, so that the weight block
/// stays in L1 and the tile's activations in L2.
fn tile_rows(
    lin: &Linear,
    rows: std::ops::Range<usize>,
    acts: &[u8],
    arb: usize,
    nt: usize,
    cfg: &FusedConfig,
    out: &mut [f32],
) {
    let ldo = rows.len();
    let k = lin.kernels();
    let rb = lin.weight().row_bytes();
    let d: &[u8] = &lin.weight().data;
    let (block, tile) = if nt >= cfg.prefill_min_tokens {
        (TILE_ROWS, cfg.token_tile.max(1))
    } else {
        (rows.len().max(1), nt.max(1))
    };
    let mut b0 = rows.start;
    while b0 < rows.end {
        let b1 = (b0 + block).min(rows.end);
        let w = &d[b0 * rb..b1 * rb];
        let mut t0 = 0;
        while t0 < nt {
            let t1 = (t0 + tile).min(nt);
            let o = &mut out[t0 * ldo + (b0 - rows.start)..];
            k.vec_dot_tile(w, rb, &acts[t0 * arb..t1 * arb], arb, o, ldo);
            t0 = t1;
        }
        b0 = b1;
    }
}

/// The fused forward in `MatmulMode::Ggml` (quantized activations) through the multi-token
/// tile kernels, or `None` when an expert takes f32 activations (the caller then runs the
/// per-pair schedule). Every product is `vec_dot` of the same bytes as in the reference path
/// (`vec_dot_tile` is bit-identical to it), so the output is bit-identical to the reference.
fn forward_quant(
    cfg: &FusedConfig,
    h: usize,
    active: &[Active<'_>],
    hidden: &[f32],
    n: usize,
) -> Option<Vec<f32>> {
    let quant = |l: &Linear| l.act_quantizer();
    if !active.iter().all(|a| quant(&a.mlp.gate).is_some() && quant(&a.mlp.down).is_some()) {
        return None;
    }
    let pairs: usize = active.iter().map(|a| a.tokens.len()).sum();
    let par = pairs > SERIAL_PAIRS;

    // Every token's hidden row quantized once per distinct gate/up activation format.
    let mut formats: Vec<(&Linear, Vec<u8>, usize)> = Vec::new();
    let mut fmt_of = Vec::with_capacity(active.len());
    for a in active {
        let i = match formats.iter().position(|(l, _, _)| same_acts(l, &a.mlp.gate)) {
            Some(i) => i,
            None => {
                let (quantize, arb) = quant(&a.mlp.gate)?;
                let mut q = vec![0u8; n * arb];
                let rows = hidden.par_chunks(h).zip(q.par_chunks_mut(arb));
                if n > 1 {
                    rows.for_each(|(x, o)| quantize(x, o));
                } else {
                    hidden
                        .chunks_exact(h)
                        .zip(q.chunks_exact_mut(arb))
                        .for_each(|(x, o)| quantize(x, o));
                }
                formats.push((&a.mlp.gate, q, arb));
                formats.len() - 1
            }
        };
        fmt_of.push(i);
    }
    // Each expert's tokens gathered into consecutive rows (the tile kernels' operand).
    let idx: Vec<usize> = (0..active.len()).collect();
    let gathered: Vec<Vec<u8>> = map_items(&idx, par, |&i| {
        let (_, q, arb) = &formats[fmt_of[i]];
        let mut g = Vec::with_capacity(active[i].tokens.len() * arb);
        for &t in &active[i].tokens {
            g.extend_from_slice(&q[t * arb..(t + 1) * arb]);
        }
        g
    });

    // Gate + up: each work item a block of intermediate rows of one expert, all its tokens.
    let work = items(active, |m| m.gate.out_dim(), cfg);
    let blocks: Vec<Vec<f32>> = work
        .par_iter()
        .map(|(i, rows)| {
            let a = &active[*i];
            let arb = formats[fmt_of[*i]].2;
            let (nt, nr) = (a.tokens.len(), rows.len());
            let (mut g, mut u) = (vec![0f32; nt * nr], vec![0f32; nt * nr]);
            tile_rows(&a.mlp.gate, rows.clone(), &gathered[*i], arb, nt, cfg, &mut g);
            tile_rows(&a.mlp.up, rows.clone(), &gathered[*i], arb, nt, cfg, &mut u);
            for (g, u) in g.iter_mut().zip(&u) {
                *g = silu(*g) * u;
            }
            g
        })
        .collect();
    drop(gathered);
    // Per expert: the intermediate rows assembled token-major, then quantized for down.
    let first_item = item_starts(&work, active.len());
    let down_acts: Vec<(Vec<u8>, usize)> = map_items(&idx, par, |&i| {
        let (nt, ff) = (active[i].tokens.len(), active[i].mlp.gate.out_dim());
        let x = assemble(&work, &blocks, first_item[i]..first_item[i + 1], nt, ff);
        // Checked above: every down projection quantizes its input.
        let Some((quantize, arb)) = active[i].mlp.down.act_quantizer() else {
            return (Vec::new(), 0);
        };
        let mut q = vec![0u8; nt * arb];
        for (x, o) in x.chunks_exact(ff).zip(q.chunks_exact_mut(arb)) {
            quantize(x, o);
        }
        (q, arb)
    });
    drop(blocks);

    // Down: blocks of hidden rows of one expert, all its tokens.
    let work = items(active, |m| m.down.out_dim(), cfg);
    let blocks: Vec<Vec<f32>> = work
        .par_iter()
        .map(|(i, rows)| {
            let a = &active[*i];
            let (q, arb) = &down_acts[*i];
            let (nt, nr) = (a.tokens.len(), rows.len());
            let mut o = vec![0f32; nt * nr];
            tile_rows(&a.mlp.down, rows.clone(), q, *arb, nt, cfg, &mut o);
            o
        })
        .collect();
    drop(down_acts);

    let routed: Vec<(&[usize], &[f32])> =
        active.iter().map(|a| (&a.tokens[..], &a.weights[..])).collect();
    Some(weighted_sum(&routed, &work, &blocks, n, h, par))
}

/// One expert's outputs `[nt × width]` (token-major) assembled from the blocks of its work
/// items `items` (item `j` covers rows `work[j].1`, its block holding `nt × rows` values,
/// token-major).
pub(super) fn assemble(
    work: &[(usize, std::ops::Range<usize>)],
    blocks: &[Vec<f32>],
    items: std::ops::Range<usize>,
    nt: usize,
    width: usize,
) -> Vec<f32> {
    let mut x = vec![0f32; nt * width];
    for (w, b) in work[items.clone()].iter().zip(&blocks[items]) {
        let nr = w.1.len();
        for s in 0..nt {
            x[s * width + w.1.start..s * width + w.1.end].copy_from_slice(&b[s * nr..(s + 1) * nr]);
        }
    }
    x
}

/// `out[t] = Σ_e w · y_e[t]` over the experts `routed` (each: its tokens and their routing
/// weights, in expert id order — the reference order) whose down-projection outputs are the
/// work items' `blocks` (as in [`assemble`]); tokens in parallel when `par`.
pub(super) fn weighted_sum(
    routed: &[(&[usize], &[f32])],
    work: &[(usize, std::ops::Range<usize>)],
    blocks: &[Vec<f32>],
    n: usize,
    h: usize,
    par: bool,
) -> Vec<f32> {
    let first_item = item_starts(work, routed.len());
    let mut contrib: Vec<Vec<(usize, usize, f32)>> = vec![Vec::new(); n];
    for (i, (tokens, weights)) in routed.iter().enumerate() {
        for (s, (&t, &w)) in tokens.iter().zip(weights.iter()).enumerate() {
            contrib[t].push((i, s, w));
        }
    }
    let mut out = vec![0f32; n * h];
    let add = |(o, c): (&mut [f32], &Vec<(usize, usize, f32)>)| {
        for &(i, s, w) in c {
            for (wk, b) in
                work[first_item[i]..first_item[i + 1]].iter().zip(&blocks[first_item[i]..])
            {
                let nr = wk.1.len();
                for (o, v) in o[wk.1.clone()].iter_mut().zip(&b[s * nr..(s + 1) * nr]) {
                    *o += v * w;
                }
            }
        }
    };
    if par {
        out.par_chunks_mut(h).zip(contrib.par_iter()).for_each(add);
    } else {
        out.chunks_mut(h).zip(contrib.iter()).for_each(add);
    }
    out
}

/// Index of each expert's first work item (items are in expert order), plus the end.
pub(super) fn item_starts(work: &[(usize, std::ops::Range<usize>)], experts: usize) -> Vec<usize> {
    let mut starts = vec![work.len(); experts + 1];
    for (j, (i, _)) in work.iter().enumerate().rev() {
        starts[*i] = j;
    }
    // Experts without items (none in practice) start where the next one does.
    for i in (0..experts).rev() {
        starts[i] = starts[i].min(starts[i + 1]);
    }
    starts
}
