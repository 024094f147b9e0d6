//! Real `kt-worker` (and `kt-expert`) processes on 127.0.0.1, configured through their
//! environment variables:
//! * a self-contained worker equals single-process generation;
//! * a worker whose routed experts live on two `kt-expert` processes (split by expert id, as
//!   the fixture plans say) equals single-process generation for every MoE fixture;
//! * an expert server killed mid-generation ends the affected request with
//!   FINISH_REASON_ERROR; the worker keeps running and serves again once the server is back;
//! * with the shipped replica plan, an expert server killed mid-generation is replaced by its
//!   replica: the request ends as in one process, and `Health` follows the servers;
//! * malformed flags fail with a clear message.
//!
//! The `kt-expert` binary is expected next to `kt-worker` (any `cargo test --workspace` or
//! `cargo build -p kt-expert-service` puts it there).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kt_models::{generate, GenerateParams, MatmulMode};
use kt_proto::v1::health_response::Status as Serving;
use kt_proto::v1::worker_client::WorkerClient;
use kt_proto::v1::{
    generate_event, FinishReason as Wire, FinishedEvent, GenerateRequest, HealthRequest,
    HealthResponse, TokenEvent, WorkerInfoRequest,
};
use kt_sample::{Sampler, SamplingParams};
use tonic::transport::Channel;

struct Proc {
    child: Child,
    addr: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture(model: &str) -> PathBuf {
    root().join("tests/fixtures/models").join(model)
}

fn expert_bin() -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_kt-worker")).with_file_name("kt-expert");
    assert!(
        bin.is_file(),
        "{} is missing: build it first (cargo build -p kt-expert-service, same profile)",
        bin.display()
    );
    bin
}

/// Starts a process and reads the address from its `listening on ADDR` line.
fn start(mut cmd: Command) -> Proc {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("no `listening on` line, got {line:?}"))
        .to_string();
    Proc { child, addr }
}

fn expert(model: &str, spec: &str, listen: &str) -> Proc {
    let mut cmd = Command::new(expert_bin());
    cmd.env("KT_EXPERT_MODEL", fixture(model).join("hf"))
        .env("KT_EXPERT_LISTEN", listen)
        .env("KT_EXPERT_EXPERTS", spec)
        .env("KT_EXPERT_THREADS", "1");
    start(cmd)
}

fn worker(model: &Path, env: &[(&str, String)]) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kt-worker"));
    cmd.env("KT_WORKER_MODEL", model).env("KT_WORKER_LISTEN", "127.0.0.1:0");
    for (k, v) in env {
        cmd.env(k, v);
    }
    start(cmd)
}

fn prompt(model: &str) -> Vec<u32> {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture(model).join("reference/hf.json")).unwrap())
            .unwrap();
    v["prompt_tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect()
}

/// Greedy single-process generation: (ids, logprobs).
fn local(path: &Path, prompt: &[u32], max_tokens: usize) -> (Vec<u32>, Vec<f64>) {
    let m = kt_models::load(path, None, MatmulMode::F32).unwrap();
    let params = GenerateParams { max_tokens, top_logprobs: 0, stop_ids: vec![] };
    let mut s = Sampler::new(SamplingParams::greedy()).unwrap();
    let g = generate(&m.model, prompt, &params, &mut s, |_| true).unwrap();
    (g.tokens.iter().map(|t| t.id).collect(), g.tokens.iter().map(|t| t.logprob).collect())
}

fn request(id: &str, prompt: Vec<u32>, max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        request_id: id.into(),
        prompt_tokens: prompt,
        sampling: None,
        max_tokens,
        stop_token_ids: vec![],
        top_logprobs: 0,
    }
}

async fn client(addr: &str) -> WorkerClient<Channel> {
    WorkerClient::connect(format!("http://{addr}")).await.unwrap()
}

/// Runs a request to its end (bounded by a generous deadline, so that a hang fails).
async fn run(
    c: &mut WorkerClient<Channel>,
    req: GenerateRequest,
) -> (Vec<TokenEvent>, FinishedEvent) {
    let work = async {
        let mut stream = c.generate(req).await.unwrap().into_inner();
        let mut tokens = Vec::new();
        while let Some(ev) = stream.message().await.unwrap() {
            match ev.event.unwrap() {
                generate_event::Event::Token(t) => tokens.push(t),
                generate_event::Event::Finished(f) => return (tokens, f),
            }
        }
        panic!("no finished event");
    };
    tokio::time::timeout(Duration::from_secs(120), work).await.expect("the request hung")
}

fn check_equal(what: &str, got: &[TokenEvent], want: &(Vec<u32>, Vec<f64>)) {
    let ids: Vec<u32> = got.iter().map(|t| t.token.as_ref().unwrap().id).collect();
    assert_eq!(ids, want.0, "{what}");
    for (g, w) in got.iter().zip(&want.1) {
        let lp = g.token.as_ref().unwrap().logprob;
        assert!((lp - w).abs() <= 1e-5, "{what}: logprob {lp} vs {w}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_self_contained_worker_matches_single_process() {
    for (model, path) in [
        ("deepseek3", fixture("deepseek3").join("hf")),
        ("qwen2", fixture("qwen2").join("gguf/q8_0.gguf")),
    ] {
        let w = worker(&path, &[("KT_WORKER_KV_BLOCKS", "32".into())]);
        let mut c = client(&w.addr).await;
        let info = c.info(WorkerInfoRequest {}).await.unwrap().into_inner();
        assert_eq!((info.kv_blocks_total, info.kv_block_tokens), (32, 16));
        let (tokens, fin) = run(&mut c, request("a", prompt(model), 20)).await;
        assert_eq!(fin.reason, Wire::Length as i32);
        check_equal(model, &tokens, &local(&path, &prompt(model), 20));
    }
}

const MOE: &[&str] = &[
    "mixtral",
    "qwen2moe",
    "qwen3moe",
    "deepseek2-lite",
    "deepseek2-group",
    "deepseek3",
    "deepseek3-nolora",
];

/// A plan for fixture `model` with two expert servers, numa0 and numa1, split as `split`.
fn plan_file(model: &str, tag: &str, split: &str) -> PathBuf {
    let arch = kt_models::open(&fixture(model).join("hf"), None, MatmulMode::F32)
        .unwrap()
        .config
        .arch
        .name();
    let text = format!(
        "model: {{arch: {arch}}}\nworker: {{devices: [cpu]}}\nexperts:\n  servers: {{numa0: {{numa: 0}}, numa1: {{numa: 1}}}}\n  {split}\n  kernel: {{decode: native, prefill: native}}\nrules:\n  - {{match: '\\.experts\\.\\d+\\.', kind: experts, place: experts}}\n  - {{match: '.*', place: cpu}}\n"
    );
    let dir = std::env::temp_dir().join(format!("kt-worker-proc-plans-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{model}-{tag}.yaml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Two expert servers for `model` and a worker over them: by `--experts mod:2:R` and no
/// plan, or both sides from `plan`.
fn cluster(model: &str, plan: Option<&Path>) -> (Proc, Proc, Proc) {
    let start = |i: usize| match plan {
        None => expert(model, &format!("mod:2:{i}"), "127.0.0.1:0"),
        Some(p) => {
            let mut cmd = Command::new(expert_bin());
            cmd.env("KT_EXPERT_MODEL", fixture(model).join("hf"))
                .env("KT_EXPERT_LISTEN", "127.0.0.1:0")
                .env("KT_EXPERT_PLAN", p)
                .env("KT_EXPERT_NAME", format!("numa{i}"))
                .env("KT_EXPERT_THREADS", "1");
            start(cmd)
        }
    };
    let (a, b) = (start(0), start(1));
    let mut env = vec![
        ("KT_WORKER_EXPERT", format!("numa0={},numa1={}", a.addr, b.addr)),
        ("KT_WORKER_KV_MEMORY", "0.01".into()),
    ];
    if let Some(p) = plan {
        env.push(("KT_WORKER_PLAN", p.display().to_string()));
    }
    let w = worker(&fixture(model).join("hf"), &env);
    (a, b, w)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_over_two_expert_processes_matches_single_process() {
    for model in MOE {
        let by_id = plan_file(model, "by-id", "split: by_expert\n  assign: round_robin");
        let sliced = plan_file(model, "sliced", "split: intermediate");
        for (how, plan) in [
            ("mod:2", None),
            ("plan by_expert", Some(&by_id)),
            ("plan intermediate", Some(&sliced)),
        ] {
            let what = format!("{model}, {how}");
            let (_a, _b, w) = cluster(model, plan.map(PathBuf::as_path));
            let mut c = client(&w.addr).await;
            let path = fixture(model).join("hf");
            let p = prompt(model);
            // Several at once, so that iterations batch them over the expert servers.
            let mut runs = Vec::new();
            for j in 0..4u32 {
                let mut c = c.clone();
                let p = p.clone();
                runs.push(tokio::spawn(async move {
                    run(&mut c, request(&format!("r{j}"), p, 24 + j)).await
                }));
            }
            for (j, r) in runs.into_iter().enumerate() {
                let (tokens, fin) = r.await.unwrap();
                assert_eq!(fin.reason, Wire::Length as i32, "{what}: {}", fin.message);
                check_equal(&what, &tokens, &local(&path, &p, 24 + j));
            }
            let info = c.info(WorkerInfoRequest {}).await.unwrap().into_inner();
            assert_eq!(info.kv_blocks_free, info.kv_blocks_total);
        }
    }
}

fn signal(p: &Proc, sig: &str) {
    let ok = Command::new("kill").args([sig, &p.child.id().to_string()]).status().unwrap();
    assert!(ok.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expert_server_killed_mid_generation_fails_its_requests_and_comes_back() {
    let model = "deepseek2-lite";
    let path = fixture(model).join("hf");
    let a = expert(model, "mod:2:0", "127.0.0.1:0");
    let mut b = Some(expert(model, "mod:2:1", "127.0.0.1:0"));
    let b_addr = b.as_ref().unwrap().addr.clone();
    let w = worker(
        &path,
        &[
            ("KT_WORKER_EXPERT", format!("numa0={},numa1={b_addr}", a.addr)),
            ("KT_WORKER_EXPERT_TIMEOUT", "5".into()),
        ],
    );
    let mut c = client(&w.addr).await;
    let p = prompt(model);

    // Mid-generation: after the first token, freeze b (the next call to it waits), then
    // kill it. A generation that raced to its end before the freeze is simply run again.
    let mut attempt = 0;
    let (seen, fin) = loop {
        attempt += 1;
        assert!(attempt <= 5, "generation always finished before the expert server froze");
        let mut stream =
            c.generate(request(&format!("k{attempt}"), p.clone(), 0)).await.unwrap().into_inner();
        let first = stream.message().await.unwrap().unwrap();
        assert!(matches!(first.event, Some(generate_event::Event::Token(_))));
        signal(b.as_ref().unwrap(), "-STOP");
        let mut seen = 1;
        let mut fin = None;
        // Drain what was produced before the freeze took hold.
        while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_millis(500), stream.message())
            .await
            .map(|m| m.unwrap())
        {
            match ev.event.unwrap() {
                generate_event::Event::Token(_) => seen += 1,
                generate_event::Event::Finished(f) => {
                    fin = Some(f);
                    break;
                }
            }
        }
        if fin.is_some() {
            signal(b.as_ref().unwrap(), "-CONT");
            continue;
        }
        drop(b.take()); // SIGKILL while the worker waits on it
        let rest = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(ev) = stream.message().await.unwrap() {
                match ev.event.unwrap() {
                    generate_event::Event::Token(_) => seen += 1,
                    generate_event::Event::Finished(f) => return f,
                }
            }
            panic!("no finished event");
        })
        .await
        .expect("the request did not end after its expert server was killed");
        break (seen, rest);
    };
    assert_eq!(fin.reason, Wire::Error as i32, "{fin:?}");
    assert!(fin.message.contains("expert"), "{}", fin.message);
    assert!(seen < 128 - p.len(), "ended before its length");
    eprintln!("killed mid-generation after {seen} tokens: {}", fin.message);

    // While b is down, new requests fail with an error (they do not hang).
    let (_, down) = run(&mut c, request("down", p.clone(), 8)).await;
    assert_eq!(down.reason, Wire::Error as i32, "{down:?}");
    let info = c.info(WorkerInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(
        info.kv_blocks_free, info.kv_blocks_total,
        "failed sequences gave their blocks back"
    );

    // b comes back on the same address; the worker serves again without a restart.
    let _b = expert(model, "mod:2:1", &b_addr);
    let want = local(&path, &p, 16);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut n = 0;
    loop {
        n += 1;
        let (tokens, fin) = run(&mut c, request(&format!("back{n}"), p.clone(), 16)).await;
        if fin.reason == Wire::Length as i32 {
            check_equal("after the restart", &tokens, &want);
            break;
        }
        assert_eq!(fin.reason, Wire::Error as i32);
        assert!(tokio::time::Instant::now() < deadline, "never served again: {}", fin.message);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn health(c: &mut WorkerClient<Channel>) -> HealthResponse {
    c.health(HealthRequest {}).await.unwrap().into_inner()
}

async fn wait_health(
    c: &mut WorkerClient<Channel>,
    what: &str,
    ok: impl Fn(&HealthResponse) -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let h = health(c).await;
        if ok(&h) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}: {h:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The shipped fixture plan gives each of numa0 and numa1 the other as a replica: with numa1
/// killed mid-generation the request goes on on numa0 and ends as it would in one process;
/// Health says who stands in, then not serving once numa0 is gone too, then serving again once
/// numa1 is back — no worker restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expert_server_killed_mid_generation_fails_over_to_its_replica() {
    let model = "qwen3moe";
    let path = fixture(model).join("hf");
    let plan = root().join("rules/fixtures/qwen3moe.yaml");
    let (a, b, w) = cluster(model, Some(&plan));
    let b_addr = b.addr.clone();
    let mut b = Some(b);
    let mut c = client(&w.addr).await;
    assert_eq!(health(&mut c).await.status, Serving::Serving as i32);
    let p = prompt(model);
    let want = local(&path, &p, 48);

    let mut stream = c.generate(request("f", p.clone(), 48)).await.unwrap().into_inner();
    let mut tokens = Vec::new();
    let fin = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(ev) = stream.message().await.unwrap() {
            match ev.event.unwrap() {
                generate_event::Event::Token(t) => {
                    tokens.push(t);
                    if tokens.len() == 2 {
                        drop(b.take()); // SIGKILL mid-generation
                    }
                }
                generate_event::Event::Finished(f) => return f,
            }
        }
        panic!("no finished event");
    })
    .await
    .expect("the request hung after its expert server was killed");
    assert!(b.is_none());
    assert_eq!(fin.reason, Wire::Length as i32, "{}", fin.message);
    check_equal("through the kill", &tokens, &want);

    // numa1 is gone: new requests are served by numa0 alone, and Health says so.
    let (tokens, fin) = run(&mut c, request("after", p.clone(), 48)).await;
    assert_eq!(fin.reason, Wire::Length as i32, "{}", fin.message);
    check_equal("with numa1 down", &tokens, &want);
    wait_health(&mut c, "numa1 seen down", |h| h.message.contains("`numa1`")).await;
    let h = health(&mut c).await;
    assert_eq!(h.status, Serving::Serving as i32, "{h:?}");
    assert!(h.message.contains("replica `numa0`"), "{h:?}");

    // numa0 too: nobody holds either share.
    drop(a);
    wait_health(&mut c, "not serving", |h| h.status == Serving::NotServing as i32).await;
    let h = health(&mut c).await;
    assert!(h.message.contains("`numa0`") && h.message.contains(&b_addr), "{h:?}");
    eprintln!("both expert servers down: {}", h.message);

    // numa1 back on its address: it holds both shares (it is numa0's replica), so the
    // worker serves again, without a restart.
    let mut cmd = Command::new(expert_bin());
    cmd.env("KT_EXPERT_MODEL", &path)
        .env("KT_EXPERT_LISTEN", &b_addr)
        .env("KT_EXPERT_PLAN", &plan)
        .env("KT_EXPERT_NAME", "numa1")
        .env("KT_EXPERT_THREADS", "1");
    let _b = start(cmd);
    wait_health(&mut c, "serving again", |h| h.status == Serving::Serving as i32).await;
    let (tokens, fin) = run(&mut c, request("back", p.clone(), 48)).await;
    assert_eq!(fin.reason, Wire::Length as i32, "{}", fin.message);
    check_equal("on numa1 alone", &tokens, &want);
}

#[test]
fn bad_flags_fail_clearly() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_kt-worker"))
            .args(["--model", &fixture("llama").join("hf").display().to_string()])
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run(&["--device", "tpu:0"]);
    assert!(err.contains("expected cpu, cuda:N"), "{err}");
    let err = run(&["--expert", "nonsense"]);
    assert!(err.contains("NAME=ADDR"), "{err}");
    let err = run(&["--expert", "numa0=127.0.0.1:1"]);
    assert!(err.contains("no routed experts"), "{err}");
    let err = run(&["--kv-memory=0"]);
    assert!(err.contains("--kv-memory"), "{err}");
    let err = run(&["--expert-wait=-1"]);
    assert!(err.contains("--expert-wait"), "{err}");
}

/// Tiers started together, the worker first: it waits for its expert servers (logging that
/// it does), then serves the same tokens as one process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_started_before_its_expert_servers_waits_for_them() {
    let model = "qwen3moe";
    let path = fixture(model).join("hf");
    let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (a0, a1) = (free().to_string(), free().to_string());
    let w = std::thread::spawn({
        let (path, a0, a1) = (path.clone(), a0.clone(), a1.clone());
        move || {
            worker(
                &path,
                &[
                    ("KT_WORKER_EXPERT", format!("numa0={a0},numa1={a1}")),
                    ("KT_WORKER_EXPERT_WAIT", "120".into()),
                    ("KT_WORKER_KV_MEMORY", "0.01".into()),
                ],
            )
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    let _e0 = expert(model, "mod:2:0", &a0);
    let _e1 = expert(model, "mod:2:1", &a1);
    let w = w.join().unwrap();
    let mut c = client(&w.addr).await;
    let p = prompt(model);
    let (tokens, fin) = run(&mut c, request("late", p.clone(), 16)).await;
    assert_eq!(fin.reason, Wire::Length as i32, "{}", fin.message);
    check_equal("experts started after the worker", &tokens, &local(&path, &p, 16));
}
