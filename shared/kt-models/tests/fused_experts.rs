//! The fused MoE expert kernel (`ExpertKernel::Fused`) against the reference path
//! (`ExpertKernel::Reference`: expert after expert, `Mlp::forward`): bit-identical outputs, in
//! both matmul modes, on random experts of several formats (decode and prefill regimes,
//! duplicate and empty routing slots, experts not held) and on the fixture models' experts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use half::f16;
use kt_core::{GgmlType, SharedBytes, WeightTensor};
use kt_models::linear::Linear;
use kt_models::moe::{ExpertKernel, FusedConfig, Mlp};
use kt_models::{load_experts, open, Experts, LocalExperts, MatmulMode, Routing, NO_EXPERT};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A `[rows, cols]` matrix of `ty` with random quants and small finite scales.
fn matrix(ty: GgmlType, rows: usize, cols: usize, rng: &mut Rng) -> WeightTensor {
    let n = rows * cols;
    let bytes = match ty {
        GgmlType::F32 | GgmlType::Q8_0 => {
            let x: Vec<f32> = (0..n).map(|_| rng.f32() * 0.2).collect();
            let mut out = vec![0u8; ty.row_bytes(n).unwrap()];
            kt_quant::quantize_row(ty, &x, &mut out).unwrap();
            out
        }
        _ => {
            let mut out: Vec<u8> =
                (0..ty.row_bytes(n).unwrap()).map(|_| rng.next() as u8).collect();
            let fields: &[usize] = match ty {
                GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
                GgmlType::Q6_K => &[208],
                GgmlType::IQ4_XS => &[0],
                _ => panic!("no scale fields for {ty}"),
            };
            for blk in out.chunks_exact_mut(ty.type_size()) {
                for &f in fields {
                    let v = f16::from_f32(0.001 + 0.002 * rng.f32().abs());
                    blk[f..f + 2].copy_from_slice(&v.to_bits().to_le_bytes());
                }
            }
            out
        }
    };
    WeightTensor::new("w", ty, vec![rows, cols], SharedBytes::new(bytes)).unwrap()
}

fn experts(
    types: [GgmlType; 3],
    hidden: usize,
    ff: usize,
    n_experts: usize,
    mode: MatmulMode,
    rng: &mut Rng,
) -> LocalExperts {
    let mlps = (0..n_experts)
        .map(|e| {
            // Expert 2 is not held here (another shard computes it).
            (e != 2).then(|| Mlp {
                gate: Linear::new(matrix(types[0], ff, hidden, rng), None, mode).unwrap(),
                up: Linear::new(matrix(types[1], ff, hidden, rng), None, mode).unwrap(),
                down: Linear::new(matrix(types[2], hidden, ff, rng), None, mode).unwrap(),
            })
        })
        .collect();
    LocalExperts::new(hidden, vec![Vec::new(), mlps])
}

/// Top-`k` routing of `n` tokens over `n_experts`, never to expert 2 (not held), with some
/// [`NO_EXPERT`] slots and some duplicate ids.
fn routing(n: usize, k: usize, n_experts: usize, rng: &mut Rng) -> Routing {
    let mut ids = Vec::new();
    let mut weights = Vec::new();
    for _ in 0..n {
        for j in 0..k {
            let id = match rng.below(10) {
                0 => NO_EXPERT,
                1 if j > 0 => *ids.last().unwrap(),
                _ => loop {
                    let e = rng.below(n_experts);
                    if e != 2 {
                        break e as u32;
                    }
                },
            };
            ids.push(id);
            weights.push(rng.f32().abs());
        }
    }
    Routing { k, ids, weights }
}

fn assert_bit_identical(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(x.to_bits(), y.to_bits(), "{what}: element {i}: {x} vs {y}");
    }
}

#[test]
fn fused_equals_reference_on_random_experts() {
    let mut rng = Rng(0x5EED_1234_ABCD_0001);
    let (hidden, ff, ne, k) = (512, 256, 8, 3);
    let kinds = [
        [GgmlType::Q4_K, GgmlType::Q4_K, GgmlType::Q6_K],
        [GgmlType::Q8_0, GgmlType::Q8_0, GgmlType::Q8_0],
        [GgmlType::Q5_K, GgmlType::Q5_K, GgmlType::IQ4_XS],
        [GgmlType::F32, GgmlType::F32, GgmlType::F32],
    ];
    // Small tiles and switch point so that both regimes and ragged tiles are exercised.
    let cfgs = [
        FusedConfig::default(),
        FusedConfig { prefill_min_tokens: 4, token_tile: 3, items_per_thread: 1 },
        FusedConfig { prefill_min_tokens: usize::MAX, token_tile: 1, items_per_thread: 64 },
    ];
    let mut checked = 0;
    for types in kinds {
        for mode in [MatmulMode::F32, MatmulMode::Ggml] {
            let ex = experts(types, hidden, ff, ne, mode, &mut rng);
            assert!(ex.fused_supports(1));
            for n in [1, 2, 5, 40] {
                let x: Vec<f32> = (0..n * hidden).map(|_| rng.f32()).collect();
                let r = routing(n, k, ne, &mut rng);
                let want = ex.forward_with(ExpertKernel::Reference, 1, &x, &r).unwrap();
                assert!(want.iter().any(|v| *v != 0.0) && want.iter().all(|v| v.is_finite()));
                for cfg in cfgs {
                    let got = ex.forward_with(ExpertKernel::Fused(cfg), 1, &x, &r).unwrap();
                    assert_bit_identical(&got, &want, &format!("{types:?} {mode:?} n={n} {cfg:?}"));
                    checked += 1;
                }
                // The default kernel is the fused one.
                assert_bit_identical(&ex.forward(1, &x, &r).unwrap(), &want, "default");
            }
        }
    }
    assert_eq!(checked, 4 * 2 * 4 * 3);
}

#[test]
fn fused_reports_the_same_errors() {
    let mut rng = Rng(7);
    let ex = experts([GgmlType::Q8_0; 3], 64, 32, 4, MatmulMode::Ggml, &mut rng);
    let x = vec![0.5f32; 64];
    let to = |id: u32| Routing { k: 1, ids: vec![id], weights: vec![1.0] };
    for kernel in [ExpertKernel::Reference, ExpertKernel::Fused(FusedConfig::default())] {
        let e = ex.forward_with(kernel, 1, &x, &to(2)).unwrap_err().to_string();
        assert!(e.contains("not held here"), "{e}");
        let e = ex.forward_with(kernel, 0, &x, &to(1)).unwrap_err().to_string();
        assert!(e.contains("no routed experts"), "{e}");
        let e = ex.forward_with(kernel, 1, &x[..63], &to(1)).unwrap_err().to_string();
        assert!(e.contains("not rows of 64"), "{e}");
        let only_empty = ex.forward_with(kernel, 1, &x, &to(NO_EXPERT)).unwrap();
        assert!(only_empty.iter().all(|v| *v == 0.0));
    }
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models")
}

#[test]
fn fused_equals_reference_on_fixture_models() {
    let mut rng = Rng(99);
    let mut checked = 0;
    for model in ["deepseek2-lite", "qwen3moe", "mixtral", "deepseek3"] {
        for (file, mode) in [
            ("q4_k.gguf", MatmulMode::Ggml),
            ("q8_0.gguf", MatmulMode::Ggml),
            ("q4_k.gguf", MatmulMode::F32),
            ("f16.gguf", MatmulMode::F32),
        ] {
            let path = fixtures().join(model).join("gguf").join(file);
            if !path.is_file() {
                continue;
            }
            let parts = open(&path, None, mode).unwrap();
            let c = &parts.config;
            let moe = c.moe.as_ref().unwrap();
            let ex =
                load_experts(c, parts.source.tensors(), parts.scheme, mode, &|_, _| true).unwrap();
            for layer in (0..c.n_layers).filter(|&l| c.is_moe_layer(l)) {
                assert!(ex.fused_supports(layer), "{model} {file} layer {layer}");
                for n in [1, 7, 64] {
                    let x: Vec<f32> = (0..n * c.hidden).map(|_| rng.f32()).collect();
                    let mut ids = Vec::new();
                    for _ in 0..n * moe.top_k {
                        ids.push(rng.below(moe.n_experts) as u32);
                    }
                    let weights = (0..ids.len()).map(|_| rng.f32().abs()).collect();
                    let r = Routing { k: moe.top_k, ids, weights };
                    let want = ex.forward_with(ExpertKernel::Reference, layer, &x, &r).unwrap();
                    let got = ex.forward(layer, &x, &r).unwrap();
                    assert_bit_identical(&got, &want, &format!("{model} {file} {mode:?} {n}"));
                    checked += 1;
                }
            }
        }
    }
    assert!(checked >= 12, "{checked}");
}

/// The `amx_int8` experts (`ExpertKernel::Int8`): every kernel path this CPU has gives the same
/// bits as the scalar path, and the layer is within the int8 rounding of the f32 reference of
/// the GGUF weights (normwise: max |difference| ≤ 4 % of max |reference| on these random
/// experts; seen 1.5–2.2 %).
#[test]
fn int8_experts_match_across_paths_and_stay_near_the_f32_reference() {
    use kt_quant::packed::Path;
    let mut rng = Rng(0x1A7E_0008);
    let (hidden, ff, ne, k) = (256, 96, 8, 3);
    let paths: Vec<Path> = Path::ALL.into_iter().filter(|p| p.available()).collect();
    for types in [[GgmlType::Q8_0; 3], [GgmlType::Q4_K, GgmlType::Q4_K, GgmlType::Q6_K]] {
        let ff = if types[2] == GgmlType::Q6_K { 256 } else { ff };
        // The same weights twice (same seed): one set stays GGUF for the f32 reference.
        let seed = rng.next();
        let reference = experts(types, hidden, ff, ne, MatmulMode::F32, &mut Rng(seed));
        let mut ex = experts(types, hidden, ff, ne, MatmulMode::F32, &mut Rng(seed));
        let progress = std::sync::atomic::AtomicUsize::new(0);
        ex.repack_int8(
            |l| l == 1,
            |done, total| {
                assert!(done <= total && total == ne - 1);
                progress.fetch_max(done, std::sync::atomic::Ordering::Relaxed);
            },
        )
        .unwrap();
        assert_eq!(progress.into_inner(), ne - 1, "one progress call per held expert");
        assert_eq!(ex.kernel(), ExpertKernel::Int8 { path: None });
        assert!(ex.packed_bytes(1, 0) >= 3 * hidden * ff && ex.packed_bytes(1, 2) == 0);
        for n in [1, 5, 40, 100] {
            let x: Vec<f32> = (0..n * hidden).map(|_| rng.f32()).collect();
            let r = routing(n, k, ne, &mut rng);
            let want = reference.forward_with(ExpertKernel::Reference, 1, &x, &r).unwrap();
            let scalar = ex
                .forward_with(ExpertKernel::Int8 { path: Some(Path::Scalar) }, 1, &x, &r)
                .unwrap();
            for &p in &paths {
                let got = ex.forward_with(ExpertKernel::Int8 { path: Some(p) }, 1, &x, &r).unwrap();
                assert_bit_identical(&got, &scalar, &format!("{types:?} n={n} {p}"));
            }
            assert_bit_identical(&ex.forward(1, &x, &r).unwrap(), &scalar, "default kernel");
            let max_ref = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let max_err = want.iter().zip(&scalar).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            println!("{types:?} n={n}: max |int8 − f32| = {:.2e} of max |y|", max_err / max_ref);
            assert!(
                max_ref > 0.0 && max_err <= 0.04 * max_ref,
                "{types:?} n={n}: {max_err} vs {max_ref}"
            );
        }
        // Errors are the same as the other kernels'; a layer not repacked is named.
        let to = |id: u32| Routing { k: 1, ids: vec![id], weights: vec![1.0] };
        let x = vec![0.5f32; hidden];
        let e = ex.forward_with(ExpertKernel::Int8 { path: None }, 1, &x, &to(2)).unwrap_err();
        assert!(e.to_string().contains("not held here"), "{e}");
    }
    let plain = experts([GgmlType::Q8_0; 3], 64, 32, 4, MatmulMode::Ggml, &mut Rng(5));
    let to1 = Routing { k: 1, ids: vec![1], weights: vec![1.0] };
    let e = plain.forward_with(ExpertKernel::Int8 { path: None }, 1, &[0.5; 64], &to1).unwrap_err();
    assert!(e.to_string().contains("no amx_int8 copy"), "{e}");
}
