//! Every shipped plan under `rules/` resolves cleanly against its model's committed shape
//! description, and every fixture plan against its fixture (HF folder and every GGUF file),
//! with realistic memory limits.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use kt_plan::{resolve, Limits, ModelShape, Plan, WeightDtype, GIB};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn yamls(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    v.sort();
    v
}

fn check(plan: &Plan, model: &ModelShape, limits: &Limits) {
    let p = resolve(plan, model, limits);
    assert!(p.ok(), "{} on {}:\n{}", plan.file, model.name, p.render(false));
    assert!(p.warnings.is_empty(), "{}:\n{}", plan.file, p.render(false));
    // Every tensor was placed exactly once, by some rule.
    assert!(p.rule_of.iter().all(Option::is_some));
    let on_devices: u64 = p.devices.iter().map(|d| d.bytes - d.hot_bytes).sum();
    let by_rules: u64 = p.rules.iter().map(|r| r.1).sum();
    let total: u64 = model.tensors.iter().map(|t| t.bytes).sum();
    assert_eq!(by_rules, total);
    assert!(on_devices <= total);
}

#[test]
fn shipped_plans_fit_their_models() {
    let rules = root().join("rules");
    let limits = Limits { gpu: Some(80 * GIB), host: Some(512 * GIB) };
    let mut n = 0;
    for entry in std::fs::read_dir(&rules).unwrap() {
        let dir = entry.unwrap().path();
        let name = dir.file_name().unwrap().to_str().unwrap().to_string();
        if !dir.is_dir() || name == "models" || name == "fixtures" {
            continue;
        }
        let shape = rules.join("models").join(format!("{name}.json"));
        assert!(shape.is_file(), "no shape description {}", shape.display());
        // The largest models are served from 4-bit GGUF files.
        let dtype = match name.as_str() {
            "deepseek-v2" | "deepseek-v3" => WeightDtype::Q4K,
            _ => WeightDtype::Bf16,
        };
        let model = ModelShape::open(&shape, Some(dtype)).unwrap();
        let plans = yamls(&dir);
        assert_eq!(plans.len(), 3, "{name}: one GPU × 1 NUMA, one GPU × 2 NUMA, two GPUs");
        for p in plans {
            let plan = Plan::load(&p).unwrap_or_else(|e| panic!("{e}"));
            check(&plan, &model, &limits);
            n += 1;
        }
    }
    assert_eq!(n, 24);
}

#[test]
fn fixture_plans_fit_hf_and_gguf() {
    let fixtures = root().join("tests/fixtures/models");
    let limits = Limits { gpu: None, host: Some(GIB) };
    let plans = yamls(&root().join("rules/fixtures"));
    assert_eq!(plans.len(), 9);
    for p in plans {
        let plan = Plan::load(&p).unwrap_or_else(|e| panic!("{e}"));
        let name = p.file_stem().unwrap().to_str().unwrap();
        let dir = fixtures.join(name);
        check(&plan, &ModelShape::open(dir.join("hf"), None).unwrap(), &limits);
        let mut ggufs = 0;
        for g in std::fs::read_dir(dir.join("gguf")).unwrap() {
            let g = g.unwrap().path();
            if g.extension().is_some_and(|x| x == "gguf") {
                check(&plan, &ModelShape::open(&g, None).unwrap(), &limits);
                ggufs += 1;
            }
        }
        assert!(ggufs >= 1, "{name}: no GGUF files");
    }
}

/// The tensor list computed from config.json alone equals the fixture checkpoint's tensors
/// (names and shapes), and the GGUF translation lands on the same names.
#[test]
fn config_tensor_lists_match_checkpoints() {
    let fixtures = root().join("tests/fixtures/models");
    for entry in std::fs::read_dir(&fixtures).unwrap() {
        let dir = entry.unwrap().path();
        if !dir.join("hf/config.json").is_file() {
            continue;
        }
        let model = ModelShape::open(dir.join("hf"), None).unwrap();
        let hf = kt_formats::HfFolder::open(dir.join("hf")).unwrap();
        let mut want: Vec<(String, Vec<usize>)> = hf
            .tensor_names()
            .into_iter()
            .map(|n| {
                let shape = hf.tensor_info(&n).unwrap().shape.clone();
                (n, shape)
            })
            .collect();
        want.sort();
        let mut got: Vec<(String, Vec<usize>)> =
            model.tensors.iter().map(|t| (t.name.clone(), t.shape.clone())).collect();
        got.sort();
        assert_eq!(got, want, "{}", dir.display());

        // GGUF: same names except llama.cpp's split of kv_b_proj.
        let gguf = ModelShape::open(dir.join("gguf/f32.gguf"), None).unwrap();
        let mut g: Vec<String> = gguf
            .tensors
            .iter()
            .map(|t| t.name.clone())
            .filter(|n| !n.contains("k_b_proj") && !n.contains("v_b_proj"))
            .collect();
        g.sort();
        let mut h: Vec<String> =
            want.iter().map(|w| w.0.clone()).filter(|n| !n.contains("kv_b_proj")).collect();
        h.sort();
        assert_eq!(g, h, "{}", dir.display());
    }
}
