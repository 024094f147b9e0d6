//! Two real `kt-expert` processes on 127.0.0.1 (experts split by id parity) serve a worker-side
//! model: greedy output equals single-process generation; killing one process mid-generation
//! fails the generation within the configured timeout.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kt_expert::{identity, RemoteExperts, RemoteOptions};
use kt_models::{generate, GenerateParams, MatmulMode, Model, ShardedExperts};
use kt_sample::{Sampler, SamplingParams};

struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn hf(model: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models").join(model).join("hf")
}

/// Starts `kt-expert` configured through its environment variables, reads the bound address.
fn spawn(model: &str, spec: &str) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kt-expert"))
        .env("KT_EXPERT_MODEL", hf(model))
        .env("KT_EXPERT_LISTEN", "127.0.0.1:0")
        .env("KT_EXPERT_EXPERTS", spec)
        .env("KT_EXPERT_THREADS", "2")
        .env("KT_EXPERT_NUMA", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr =
        line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("{line:?}")).to_string();
    Server { child, addr }
}

fn prompt(model: &str) -> Vec<u32> {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(hf(model).join("../reference/hf.json")).unwrap())
            .unwrap();
    v["prompt_tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect()
}

fn worker(model: &str, servers: &[&Server], opts: &RemoteOptions) -> Model {
    let parts = kt_models::open(&hf(model), None, MatmulMode::F32).unwrap();
    let ours = identity("hf", &parts.config);
    let (nl, ne) = (parts.config.n_layers, parts.config.moe.as_ref().unwrap().n_experts);
    let mut sharded = ShardedExperts::new(parts.config.hidden);
    for s in servers {
        let remote = RemoteExperts::connect(&s.addr, &ours, opts.clone()).unwrap();
        let owns = remote.owns(nl, ne);
        sharded = sharded.add(Arc::new(remote), owns);
    }
    Model::load_with(
        parts.config.clone(),
        parts.source.tensors(),
        parts.scheme,
        MatmulMode::F32,
        &|_, _| false,
    )
    .unwrap()
    .with_experts(Arc::new(sharded))
}

#[test]
fn two_processes_match_single_process_and_a_kill_fails_fast() {
    let model = "deepseek2-lite";
    let params = GenerateParams { max_tokens: 32, top_logprobs: 8, stop_ids: vec![] };
    let greedy = || Sampler::new(SamplingParams::greedy()).unwrap();
    let prompt = prompt(model);
    let local = kt_models::load(&hf(model), None, MatmulMode::F32).unwrap();
    let want = generate(&local.model, &prompt, &params, &mut greedy(), |_| true).unwrap();

    let a = spawn(model, "mod:2:0");
    let mut b = Some(spawn(model, "mod:2:1"));
    let timeout = Duration::from_secs(5);
    let opts = RemoteOptions { timeout, ..RemoteOptions::default() };
    let w = worker(model, &[&a, b.as_ref().unwrap()], &opts);
    let got = generate(&w, &prompt, &params, &mut greedy(), |_| true).unwrap();
    let ids = |g: &kt_models::Generation| g.tokens.iter().map(|t| t.id).collect::<Vec<_>>();
    assert_eq!(ids(&want), ids(&got));
    let worst = want
        .tokens
        .iter()
        .zip(&got.tokens)
        .map(|(x, y)| (x.logprob - y.logprob).abs())
        .fold(0f64, f64::max);
    assert!(worst <= 1e-5, "max |logprob diff| {worst:.3e}");

    let mut seen = 0;
    let mut killed_at = None;
    let res = generate(&w, &prompt, &params, &mut greedy(), |_| {
        seen += 1;
        if seen == 2 {
            drop(b.take()); // SIGKILL
            killed_at = Some(Instant::now());
        }
        true
    });
    let err = res.expect_err("generation must fail once a kt-expert process is killed");
    let elapsed = killed_at.unwrap().elapsed();
    assert!(elapsed < timeout + Duration::from_secs(2), "took {elapsed:?}: {err}");
    eprintln!("after kill -9: {err} (in {elapsed:?})");
}
