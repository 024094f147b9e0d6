//! Throughput of the kernels of every format and every kernel family this CPU has:
//! `cargo run --release -p kt-quant --example bench [-- --quick | --tiles | --moe]`.
//!
//! With `--moe`: the MoE decode kernels at DeepSeek-V2-Lite's expert shapes (gate/up rows of
//! 2048 in Q4_K/Q5_K/Q6_K, down rows of 1408 in Q8_0/Q5_0/Q4_0), per format and family:
//! ns per weight row and GB/s of weight bytes for `vec_dot` (one row · one activation row) and
//! `vec_dot_tile` with 1, 4 and 8 tokens (ns per row and token), one thread, on 64
//! cache-resident rows; best of many passes (the machine may be shared: rerun and take the
//! best).
//!
//! Prints, per format and family (scalar, avx2, avx512), nanoseconds per 4096-element row for
//! `dequantize`, `dot_f32` and `vec_dot` on random blocks (scale fields made finite), and the
//! weight bandwidth of `dot_f32` (GB/s of weight bytes streamed), single-threaded, over a
//! 4096 x 4096 matrix-vector product (every row once per pass, so the matrix, 9-64 MiB, comes
//! from DRAM rather than cache). `--quick` uses 512 rows (cache-resident for small formats).
//!
//! With `--tiles` instead, for the formats with a multi-token `vec_dot_tile` kernel: single-thread GOPS
//! (2 · multiply-adds per second) of a 16-row × T-token tile (cache-resident, the fused MoE
//! kernel's inner step) for T = 1, 2, 4, 8, 16, 64, against `vec_dot` pair by pair.
//!
//! With `--packed`: the `amx_int8` format (`kt_quant::packed`), one thread, a 1408 × 2048 matrix
//! (a V2-Lite expert's gate) × T tokens for T = 1 … 512, every available path: GOPS (int8
//! operations) and, for AMX, the share of the single-thread AMX peak measured alongside.

use std::hint::black_box;
use std::time::Instant;

use kt_quant::{kernels_for_isa, Isa, SUPPORTED};

const N: usize = 4096;

fn main() {
    let rows = if std::env::args().any(|a| a == "--quick") { 512 } else { N };
    if std::env::args().any(|a| a == "--moe") {
        moe();
        return;
    }
    if std::env::args().any(|a| a == "--packed") {
        packed();
        return;
    }
    if std::env::args().any(|a| a == "--tiles") {
        let isas: Vec<Isa> = Isa::ALL.into_iter().filter(|i| i.available()).collect();
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        tiles(&isas, &mut || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        });
        return;
    }
    let isas: Vec<Isa> = Isa::ALL.into_iter().filter(|i| i.available()).collect();
    println!("{N} x {rows} matrix-vector product, one thread; families {isas:?}");
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let x: Vec<f32> = (0..N).map(|_| (next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5).collect();
    println!(
        "{:<8} {:<7} {:>12} {:>12} {:>12} {:>12}",
        "format", "isa", "dequant ns", "dot_f32 ns", "vec_dot ns", "dot_f32 GB/s"
    );
    for ty in SUPPORTED {
        let Some(k) = kernels_for_isa(Isa::Scalar, ty) else { continue };
        let Some(row) = ty.row_bytes(N) else { continue };
        // Random bytes, then the weights re-encoded from f32 so that every scale is finite.
        let mut w = vec![0u8; row * rows];
        for r in w.chunks_exact_mut(row) {
            let vals: Vec<f32> =
                (0..N).map(|_| (next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5).collect();
            if ty == k.vec_dot_type {
                (k.quantize)(&vals, r);
            } else {
                r.iter_mut().for_each(|b| *b = next() as u8);
                let bs = ty.type_size();
                for blk in r.chunks_exact_mut(bs) {
                    // Every supported block format keeps an f16 scale in bytes 0..2 or at the end;
                    // a small positive f16 (0x2c00 = 1/16) at both places is finite everywhere.
                    blk[..2].copy_from_slice(&0x2c00u16.to_le_bytes());
                    blk[bs - 2..].copy_from_slice(&0x2c00u16.to_le_bytes());
                    if bs > 4 {
                        blk[2..4].copy_from_slice(&0x2c00u16.to_le_bytes());
                    }
                }
            }
        }
        let a = kt_quant::quantize_for_vec_dot(ty, &x).unwrap_or_default();
        let mut out = vec![0f32; N];
        // Best of several passes: the numbers are for comparing kernels, not machines.
        let time = |f: &mut dyn FnMut(&[u8])| {
            (0..5)
                .map(|_| {
                    let t = Instant::now();
                    for r in w.chunks_exact(row) {
                        f(r);
                    }
                    t.elapsed().as_nanos() as f64 / rows as f64
                })
                .fold(f64::INFINITY, f64::min)
        };
        for &isa in &isas {
            let Some(k) = kernels_for_isa(isa, ty) else { continue };
            // Families without their own kernels for this format repeat the scalar numbers.
            if isa != Isa::Scalar && k.isa == "scalar" && k.vec_dot_isa == "scalar" {
                continue;
            }
            let deq = time(&mut |r| (k.dequantize)(black_box(r), &mut out));
            let mut acc = 0f32;
            let dot = time(&mut |r| acc += (k.dot_f32)(black_box(r), &x));
            let vd = time(&mut |r| acc += (k.vec_dot)(black_box(r), &a));
            black_box(acc);
            println!(
                "{:<8} {:<7} {:>12.0} {:>12.0} {:>12.0} {:>12.2}",
                ty.name(),
                format!("{}/{}", short(k.isa), short(k.vec_dot_isa)),
                deq,
                dot,
                vd,
                row as f64 / dot
            );
        }
    }
}

/// GOPS of `vec_dot_tile` on cache-resident tiles vs `vec_dot` per pair.
fn tiles(isas: &[Isa], next: &mut dyn FnMut() -> u64) {
    const ROWS: usize = 16;
    println!("\n{N}-element rows, {ROWS}-row tiles, one thread: GOPS (2 x multiply-adds / s)");
    println!(
        "{:<8} {:<7} {:>6} {:>12} {:>12}",
        "format", "isa", "tokens", "tile GOPS", "pairs GOPS"
    );
    for ty in SUPPORTED {
        for &isa in isas {
            let Some(k) = kernels_for_isa(isa, ty) else { continue };
            if !k.has_vec_dot_tile() {
                continue;
            }
            let Some(wrb) = ty.row_bytes(N) else { continue };
            let Some(arb) = k.vec_dot_type.row_bytes(N) else { continue };
            let mut w = vec![0u8; wrb * ROWS];
            w.iter_mut().for_each(|b| *b = next() as u8);
            for blk in w.chunks_exact_mut(ty.type_size()) {
                blk[..2].copy_from_slice(&0x2c00u16.to_le_bytes());
                if ty.type_size() > 40 {
                    blk[2..4].copy_from_slice(&0x2c00u16.to_le_bytes());
                }
            }
            for tokens in [1usize, 2, 4, 8, 16, 64] {
                let x: Vec<f32> = (0..N * tokens)
                    .map(|_| (next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
                    .collect();
                let mut a = vec![0u8; arb * tokens];
                for (xr, o) in x.chunks_exact(N).zip(a.chunks_exact_mut(arb)) {
                    (k.quantize)(xr, o);
                }
                let mut out = vec![0f32; ROWS * tokens];
                let reps = (4096 / tokens).max(8);
                let ops = 2.0 * (N * ROWS * tokens * reps) as f64;
                let best = |f: &mut dyn FnMut()| {
                    (0..5)
                        .map(|_| {
                            let t = Instant::now();
                            for _ in 0..reps {
                                f();
                            }
                            t.elapsed().as_secs_f64()
                        })
                        .fold(f64::INFINITY, f64::min)
                };
                let tile = best(&mut || {
                    k.vec_dot_tile(black_box(&w), wrb, &a, arb, &mut out, ROWS);
                });
                let pairs = best(&mut || {
                    for (t, at) in a.chunks_exact(arb).enumerate() {
                        for (r, wr) in w.chunks_exact(wrb).enumerate() {
                            out[t * ROWS + r] = (k.vec_dot)(black_box(wr), at);
                        }
                    }
                });
                black_box(&out);
                println!(
                    "{:<8} {:<7} {:>6} {:>12.1} {:>12.1}",
                    ty.name(),
                    k.vec_dot_isa,
                    tokens,
                    ops / tile / 1e9,
                    ops / pairs / 1e9
                );
            }
        }
    }
}

/// ns per row of `vec_dot` and `vec_dot_tile` at the MoE expert shapes (see the module docs).
fn moe() {
    use kt_core::GgmlType as T;
    const ROWS: usize = 64;
    let shapes = [
        (T::Q4_K, 2048),
        (T::Q5_K, 2048),
        (T::Q6_K, 2048),
        (T::Q8_0, 1408),
        (T::Q5_0, 1408),
        (T::Q4_0, 1408),
    ];
    let isas: Vec<Isa> = Isa::ALL.into_iter().filter(|i| i.available()).collect();
    println!(
        "MoE expert rows ({ROWS} cache-resident rows), one thread; families {isas:?}; \
         ns per row (tiles: per row and token) and GB/s of weight bytes"
    );
    println!(
        "{:<6} {:>5} {:<7} {:>9} {:>7} {:>9} {:>7} {:>9} {:>7} {:>9} {:>7}",
        "format",
        "n",
        "isa",
        "vec_dot",
        "GB/s",
        "tile x1",
        "GB/s",
        "tile x4",
        "GB/s",
        "tile x8",
        "GB/s"
    );
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for (ty, n) in shapes {
        let Some(s) = kernels_for_isa(Isa::Scalar, ty) else { continue };
        let (Some(wrb), Some(arb)) = (ty.row_bytes(n), s.vec_dot_type.row_bytes(n)) else {
            continue;
        };
        let mut w = vec![0u8; wrb * ROWS];
        w.iter_mut().for_each(|b| *b = next() as u8);
        let bs = ty.type_size();
        for blk in w.chunks_exact_mut(bs) {
            // Small finite f16 scales (1/16) where the format keeps them.
            let fields: &[usize] = match ty {
                T::Q4_K | T::Q5_K => &[0, 2],
                T::Q6_K => &[208],
                _ => &[0],
            };
            for &at in fields {
                blk[at..at + 2].copy_from_slice(&0x2c00u16.to_le_bytes());
            }
        }
        let x: Vec<f32> =
            (0..n * 8).map(|_| (next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5).collect();
        let mut a = vec![0u8; arb * 8];
        for (xr, o) in x.chunks_exact(n).zip(a.chunks_exact_mut(arb)) {
            (s.quantize)(xr, o);
        }
        let mut out = vec![0f32; ROWS * 8];
        for &isa in &isas {
            let Some(k) = kernels_for_isa(isa, ty) else { continue };
            if isa != Isa::Scalar && k.vec_dot_isa == "scalar" && !k.has_vec_dot_tile() {
                continue;
            }
            // Best of 30 passes of `reps` sweeps over the rows: ns per (row, token).
            let best = |f: &mut dyn FnMut(), per: usize| {
                let reps = 8;
                (0..30)
                    .map(|_| {
                        let t = Instant::now();
                        for _ in 0..reps {
                            f();
                        }
                        t.elapsed().as_nanos() as f64 / (reps * per) as f64
                    })
                    .fold(f64::INFINITY, f64::min)
            };
            let a1 = &a[..arb];
            let vd = best(
                &mut || {
                    for (r, wr) in w.chunks_exact(wrb).enumerate() {
                        out[r] = (k.vec_dot)(black_box(wr), black_box(a1));
                    }
                },
                ROWS,
            );
            let mut line = format!(
                "{:<6} {:>5} {:<7} {:>9.1} {:>7.2}",
                ty.name(),
                n,
                k.vec_dot_isa,
                vd,
                wrb as f64 / vd
            );
            for tokens in [1usize, 4, 8] {
                let at = &a[..arb * tokens];
                let t = best(
                    &mut || k.vec_dot_tile(black_box(&w), wrb, black_box(at), arb, &mut out, ROWS),
                    ROWS * tokens,
                );
                line += &format!(" {:>9.1} {:>7.2}", t, wrb as f64 / t);
            }
            black_box(&out);
            println!("{line}");
        }
    }
}

/// `avx512` -> `512`, for the `dot_f32/vec_dot` family column.
fn short(isa: &str) -> &str {
    match isa {
        "scalar" => "sc",
        "avx2" => "avx2",
        "avx512" => "512",
        other => other,
    }
}

fn packed() {
    use kt_quant::packed::{amx_int8_peak, matmul, PackedI8, Path, QuantActs};
    let (rows, cols) = (1408, 2048);
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let w: Vec<f32> = (0..rows * cols).map(|_| next()).collect();
    let p = PackedI8::from_rows(rows, cols, |r, o| o.copy_from_slice(&w[r * cols..(r + 1) * cols]));
    let peak = amx_int8_peak(0.5);
    if let Some(pk) = peak {
        println!("AMX int8 peak, one thread: {:.2} TOPS", pk / 1e12);
    }
    println!("{:>6} {:<7} {:>12} {:>9} {:>7}", "tokens", "path", "µs/call", "GOPS", "% peak");
    for t in [1usize, 4, 8, 16, 32, 48, 64, 128, 256, 512] {
        let x: Vec<f32> = (0..t * cols).map(|_| next()).collect();
        let a = QuantActs::new(&x, cols);
        let mut out = vec![0f32; t * rows];
        for path in Path::ALL.into_iter().filter(|p| p.available()) {
            if path == Path::Scalar && t > 8 {
                continue;
            }
            let mut best = f64::MAX;
            let reps = (4096 / t).clamp(2, 64);
            for _ in 0..5 {
                let s = Instant::now();
                for _ in 0..reps {
                    if let Err(e) = matmul(&p, 0..rows, &a, &mut out, rows, path) {
                        eprintln!("{e}");
                        return;
                    }
                    black_box(&out);
                }
                best = best.min(s.elapsed().as_secs_f64() / reps as f64);
            }
            let ops = 2.0 * (rows * cols * t) as f64;
            let share = match (path, peak) {
                (Path::Amx, Some(pk)) => format!("{:.1}%", 100.0 * ops / best / pk),
                _ => String::new(),
            };
            println!(
                "{t:>6} {:<7} {:>12.1} {:>9.1} {share:>7}",
                path.name(),
                best * 1e6,
                ops / best / 1e9
            );
        }
    }
}
