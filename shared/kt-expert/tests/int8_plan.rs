//! A plan's `experts.kernel` reaches the expert server: `{decode: native, prefill: amx_int8}`
//! repacks the held experts at load and computes calls from `--int8-from` tokens on them (AMX
//! where the CPU has it) and shorter calls on the stored weights; `{decode: amx_int8}` computes
//! every call on them; a format kt-expert does not compute is refused naming the plan.
//! Answers over gRPC (f32 on the wire) equal the same kernel run in this process.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use kt_expert::{identity, RemoteExperts, RemoteOptions, ServerHandle, ServerOptions, WireDType};
use kt_models::moe::{ExpertKernel, FusedConfig};
use kt_models::{load_experts, Experts, MatmulMode, Routing};

const MODEL: &str = "qwen2moe";

fn hf() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models").join(MODEL).join("hf")
}

fn plan(kernel: &str) -> PathBuf {
    let text = format!(
        "model: {{arch: qwen2moe}}\nworker: {{devices: [cpu]}}\nexperts:\n  servers: {{numa0: {{numa: 0}}}}\n  split: by_expert\n  assign: round_robin\n  kernel: {kernel}\nrules:\n  - {{match: '\\.experts\\.\\d+\\.', kind: experts, place: experts}}\n  - {{match: '.*', place: cpu}}\n"
    );
    let dir = std::env::temp_dir().join(format!("kt-int8-plans-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let name: String = kernel.chars().filter(char::is_ascii_alphanumeric).collect();
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Top-`k` routing of `n` tokens, distinct experts per token.
fn routing(n: usize, k: usize, n_experts: usize) -> Routing {
    let ids = (0..n * k).map(|i| ((i / k * 3 + i % k) % n_experts) as u32).collect();
    Routing { k, ids, weights: (0..n * k).map(|i| 0.2 + (i % 5) as f32 * 0.1).collect() }
}

#[test]
fn plan_kernel_formats_reach_the_server() {
    let parts = kt_models::open(&hf(), None, MatmulMode::F32).unwrap();
    let c = &parts.config;
    let moe = c.moe.as_ref().unwrap();
    let layer = (0..c.n_layers).find(|&l| c.is_moe_layer(l)).unwrap();
    let ours = identity("hf", c);
    let local = || {
        load_experts(c, parts.source.tensors(), parts.scheme, MatmulMode::F32, &|_, _| true)
            .unwrap()
    };
    let mut int8 = local();
    int8.repack_int8(|_| true, |_, _| {}).unwrap();
    let native = local();
    let from = 4;
    for (kernel, int8_from) in [
        ("{decode: native, prefill: amx_int8}", Some(from)),
        ("{decode: amx_int8, prefill: amx_int8}", None),
    ] {
        let opts = ServerOptions {
            threads: Some(2),
            name: "numa0".into(),
            prefill_from: from,
            ..ServerOptions::default()
        };
        let svc = kt_expert::load_plan(&hf(), None, &plan(kernel), opts).unwrap();
        assert!(svc.info().kernel_isa.contains("amx_int8"), "{}", svc.info().kernel_isa);
        let server = ServerHandle::start(svc, "127.0.0.1:0").unwrap();
        let ropts = RemoteOptions { dtype: WireDType::F32, ..RemoteOptions::default() };
        let remote = RemoteExperts::connect(&server.addr().to_string(), &ours, ropts).unwrap();
        for n in [1, 3, 4, 9] {
            let x: Vec<f32> =
                (0..n * c.hidden).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
            let r = routing(n, moe.top_k, moe.n_experts);
            let got = remote.forward(layer, &x, &r).unwrap();
            let on_int8 = int8_from.is_none_or(|f| n >= f);
            let want = if on_int8 {
                int8.forward_with(ExpertKernel::Int8 { path: None }, layer, &x, &r).unwrap()
            } else {
                native
                    .forward_with(ExpertKernel::Fused(FusedConfig::default()), layer, &x, &r)
                    .unwrap()
            };
            assert_eq!(got, want, "{kernel} n={n} (int8: {on_int8})");
        }
    }
    // A format the server does not compute: refused before loading, naming the plan.
    let bad = plan("{decode: native, prefill: amx_bf16}");
    let opts = ServerOptions { name: "numa0".into(), ..ServerOptions::default() };
    let err = kt_expert::load_plan(&hf(), None, &bad, opts).unwrap_err().to_string();
    assert!(err.contains("amx_bf16") && err.contains(&bad.display().to_string()), "{err}");
}
