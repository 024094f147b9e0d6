//! Generation with the routed experts on two expert servers (in-process tonic servers on
//! 127.0.0.1) equals single-process generation: same greedy tokens, logprobs within 1e-5 —
//! with experts split by id parity (`--experts`), and from placement plans split by expert id
//! and by intermediate slice (`load_plan` + `connect_plan`), over gRPC and shared memory.
//! Plus the failure cases: a server dropped mid-generation, a server of another model,
//! malformed messages.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kt_expert::{identity, RemoteExperts, RemoteOptions, Selection, ServerHandle, ServerOptions};
use kt_models::{generate, GenerateParams, Generation, MatmulMode, Model, ShardedExperts};
use kt_sample::{Sampler, SamplingParams};
use serde::Deserialize;

const TOL: f64 = 1e-5;

#[derive(Deserialize)]
struct Reference {
    prompt_tokens: Vec<u32>,
}

fn hf(model: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models").join(model).join("hf")
}

fn prompt(model: &str) -> Vec<u32> {
    let p = hf(model).join("../reference/hf.json");
    serde_json::from_slice::<Reference>(&std::fs::read(p).unwrap()).unwrap().prompt_tokens
}

fn params() -> GenerateParams {
    GenerateParams { max_tokens: 32, top_logprobs: 8, stop_ids: vec![] }
}

fn greedy() -> Sampler {
    Sampler::new(SamplingParams::greedy()).unwrap()
}

fn server(model: &str, spec: &str) -> ServerHandle {
    let sel: Selection = spec.parse().unwrap();
    let opts = ServerOptions { threads: Some(2), name: spec.into(), ..ServerOptions::default() };
    let svc = kt_expert::load(&hf(model), None, &sel, opts).unwrap();
    ServerHandle::start(svc, "127.0.0.1:0").unwrap()
}

/// The worker side: a model holding no routed experts, calling the servers.
fn worker(
    model: &str,
    addrs: &[String],
    opts: &RemoteOptions,
) -> Result<Model, kt_expert::ExpertError> {
    let parts = kt_models::open(&hf(model), None, MatmulMode::F32).unwrap();
    let ours = identity("hf", &parts.config);
    let (nl, ne) = (parts.config.n_layers, parts.config.moe.as_ref().unwrap().n_experts);
    let mut sharded = ShardedExperts::new(parts.config.hidden);
    for addr in addrs {
        let remote = RemoteExperts::connect(addr, &ours, opts.clone())?;
        let owns = remote.owns(nl, ne);
        sharded = sharded.add(Arc::new(remote), owns);
    }
    let model = Model::load_with(
        parts.config.clone(),
        parts.source.tensors(),
        parts.scheme,
        MatmulMode::F32,
        &|_, _| false,
    )
    .unwrap();
    Ok(model.with_experts(Arc::new(sharded)))
}

fn compare(model: &str, want: &Generation, got: &Generation) {
    let ids = |g: &Generation| g.tokens.iter().map(|t| t.id).collect::<Vec<_>>();
    assert_eq!(ids(want), ids(got), "{model}: tokens differ");
    let mut worst = 0f64;
    for (w, g) in want.tokens.iter().zip(&got.tokens) {
        worst = worst.max((w.logprob - g.logprob).abs());
        for (a, b) in w.top_logprobs.iter().zip(&g.top_logprobs) {
            assert_eq!(a.id, b.id, "{model}: top logprob ids differ");
            worst = worst.max((a.logprob - b.logprob).abs());
        }
    }
    assert!(worst <= TOL, "{model}: max |logprob diff| {worst:.3e} > {TOL:.0e}");
    eprintln!("{model}: split over two expert servers, max |logprob diff| {worst:.3e}");
}

fn split_matches_single_process(model: &str) {
    let prompt = prompt(model);
    let local = kt_models::load(&hf(model), None, MatmulMode::F32).unwrap();
    let want = generate(&local.model, &prompt, &params(), &mut greedy(), |_| true).unwrap();
    let (a, b) = (server(model, "mod:2:0"), server(model, "mod:2:1"));
    let addrs = [a.addr().to_string(), b.addr().to_string()];
    let worker = worker(model, &addrs, &RemoteOptions::default()).unwrap();
    let got = generate(&worker, &prompt, &params(), &mut greedy(), |_| true).unwrap();
    assert_eq!(got.tokens.len(), 32);
    compare(model, &want, &got);
}

/// A two-server plan for `model` (its architecture from the shipped fixture plan) with the
/// given split, written to a temporary file.
fn plan_file(model: &str, split: &str) -> PathBuf {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../rules/fixtures")
        .join(format!("{model}.yaml"));
    let arch = kt_plan::Plan::load(&fixture).unwrap().arch;
    let split = match split {
        "by_expert" => "split: by_expert\n  assign: round_robin",
        "intermediate" => "split: intermediate\n  slices: {numa0: 1, numa1: 1}",
        other => panic!("{other}"),
    };
    let text = format!(
        "model: {{arch: {arch}}}\nworker: {{devices: [cpu]}}\nexperts:\n  servers: {{numa0: {{numa: 0}}, numa1: {{numa: 1}}}}\n  {split}\n  kernel: {{decode: native, prefill: native}}\nrules:\n  - {{match: '\\.experts\\.\\d+\\.', kind: experts, place: experts}}\n  - {{match: '.*', place: cpu}}\n"
    );
    let dir = std::env::temp_dir().join(format!("kt-split-plans-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{model}-{}.yaml", split.split_whitespace().nth(1).unwrap()));
    // Tests running at once write the same plan: each writes its own file and renames it into
    // place, so no test ever reads a half-written one.
    let name = path.file_name().unwrap().to_string_lossy();
    let tmp = dir.join(format!("{name}.{:?}.tmp", std::thread::current().id()));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path
}

fn plan_server(model: &str, plan: &Path, name: &str) -> ServerHandle {
    let opts = ServerOptions { threads: Some(2), name: name.into(), ..ServerOptions::default() };
    let svc = kt_expert::load_plan(&hf(model), None, plan, opts).unwrap();
    ServerHandle::start(svc, "127.0.0.1:0").unwrap()
}

/// Two servers started from a plan (`--plan --name`), a worker connected by the same plan.
fn plan_split_matches_single_process(model: &str, split: &str, shm: kt_expert::ShmMode) {
    let path = plan_file(model, split);
    let plan = kt_plan::Plan::load(&path).unwrap();
    let shape = kt_plan::ModelShape::open(hf(model), None).unwrap();
    let (a, b) = (plan_server(model, &path, "numa0"), plan_server(model, &path, "numa1"));
    if split == "intermediate" {
        let (sa, sb) = (a_slice(&a, model), a_slice(&b, model));
        assert_eq!((sa.start, sb.end), (0, sa.expert_ff), "{model}: {sa:?} {sb:?}");
        assert_eq!(sa.end, sb.start);
    }
    let addrs = vec![
        ("numa0".to_string(), a.addr().to_string()),
        ("numa1".to_string(), b.addr().to_string()),
    ];
    let parts = kt_models::open(&hf(model), None, MatmulMode::F32).unwrap();
    let ours = identity("hf", &parts.config);
    let opts = RemoteOptions { shm, ..RemoteOptions::default() };
    let experts = kt_expert::connect_plan(&plan, &shape, &ours, &addrs, &opts).unwrap();
    let worker = Model::load_with(
        parts.config.clone(),
        parts.source.tensors(),
        parts.scheme,
        MatmulMode::F32,
        &|_, _| false,
    )
    .unwrap()
    .with_experts(experts);
    let prompt = prompt(model);
    let local = kt_models::load(&hf(model), None, MatmulMode::F32).unwrap();
    let want = generate(&local.model, &prompt, &params(), &mut greedy(), |_| true).unwrap();
    let got = generate(&worker, &prompt, &params(), &mut greedy(), |_| true).unwrap();
    compare(&format!("{model} ({split}, {shm:?})"), &want, &got);
}

/// The slice a server reports in `Info`.
fn a_slice(server: &ServerHandle, model: &str) -> kt_proto::v1::ExpertSlice {
    let parts = kt_models::open(&hf(model), None, MatmulMode::F32).unwrap();
    let r = RemoteExperts::connect(
        &server.addr().to_string(),
        &identity("hf", &parts.config),
        RemoteOptions::default(),
    )
    .unwrap();
    let info = r.info();
    assert!(info.plan.is_some(), "a server started from a plan reports it");
    info.slice.unwrap()
}

macro_rules! split_tests {
    ($($name:ident => $model:literal),* $(,)?) => {
        $(
            mod $name {
                use super::*;

                #[test]
                fn by_parity() {
                    split_matches_single_process($model);
                }

                #[test]
                fn plan_by_expert_grpc() {
                    plan_split_matches_single_process($model, "by_expert", kt_expert::ShmMode::Off);
                }

                #[test]
                fn plan_by_expert_shm() {
                    plan_split_matches_single_process($model, "by_expert", kt_expert::ShmMode::Required);
                }

                #[test]
                fn plan_intermediate_grpc() {
                    plan_split_matches_single_process($model, "intermediate", kt_expert::ShmMode::Off);
                }

                #[test]
                fn plan_intermediate_shm() {
                    plan_split_matches_single_process(
                        $model,
                        "intermediate",
                        kt_expert::ShmMode::Required,
                    );
                }
            }
        )*
    };
}

#[test]
fn plan_servers_refuse_names_the_plan_lacks() {
    let path = plan_file("qwen2moe", "by_expert");
    let opts = ServerOptions { name: "numa7".into(), ..ServerOptions::default() };
    let err = kt_expert::load_plan(&hf("qwen2moe"), None, &path, opts).unwrap_err().to_string();
    assert!(err.contains("no expert server `numa7`") && err.contains("numa0"), "{err}");
    // A plan for another architecture.
    let other = plan_file("qwen3moe", "by_expert");
    let opts = ServerOptions { name: "numa0".into(), ..ServerOptions::default() };
    let err = kt_expert::load_plan(&hf("qwen2moe"), None, &other, opts).unwrap_err().to_string();
    assert!(err.contains("arch"), "{err}");
}

split_tests! {
    mixtral => "mixtral",
    qwen2moe => "qwen2moe",
    qwen3moe => "qwen3moe",
    deepseek2_lite => "deepseek2-lite",
    deepseek2_group => "deepseek2-group",
    deepseek3 => "deepseek3",
    deepseek3_nolora => "deepseek3-nolora",
}

#[test]
fn server_dropped_mid_generation_fails_the_generation_in_bounded_time() {
    let model = "qwen2moe";
    let a = server(model, "mod:2:0");
    let mut b = Some(server(model, "mod:2:1"));
    let addrs = [a.addr().to_string(), b.as_ref().unwrap().addr().to_string()];
    let timeout = Duration::from_secs(5);
    let opts = RemoteOptions { timeout, ..RemoteOptions::default() };
    let worker = worker(model, &addrs, &opts).unwrap();
    let mut seen = 0;
    let mut killed_at = None;
    let res = generate(&worker, &prompt(model), &params(), &mut greedy(), |_| {
        seen += 1;
        if seen == 3 {
            drop(b.take());
            killed_at = Some(Instant::now());
        }
        true
    });
    let err = res.expect_err("generation must fail once an expert server is gone");
    let elapsed = killed_at.unwrap().elapsed();
    assert!(elapsed < timeout + Duration::from_secs(2), "took {elapsed:?}");
    assert!(err.to_string().contains(&addrs[1]), "{err}");
    eprintln!("after the kill: {err} (in {elapsed:?})");
    // Later calls fail at once with the same reason, without waiting for the timeout.
    let t = Instant::now();
    assert!(generate(&worker, &prompt(model), &params(), &mut greedy(), |_| true).is_err());
    assert!(t.elapsed() < timeout);
}

#[test]
fn server_of_another_model_is_refused_at_connect() {
    let other = server("qwen3moe", "all");
    let err = worker("qwen2moe", &[other.addr().to_string()], &RemoteOptions::default())
        .expect_err("a server of another model must be refused");
    let text = err.to_string();
    assert!(matches!(err, kt_expert::ExpertError::ModelMismatch { .. }), "{text}");
    assert!(text.contains("different model") && text.contains("config hash"), "{text}");
}

#[test]
fn nobody_listening_is_a_clear_connect_error() {
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let err =
        worker("qwen2moe", std::slice::from_ref(&addr), &RemoteOptions::default()).unwrap_err();
    assert!(err.to_string().contains(&addr), "{err}");
}

/// Raw protocol: malformed messages get an error answer on the same stream, which stays
/// usable; a Forward stream with another model's hash is refused.
#[test]
fn malformed_messages_get_errors_and_the_server_keeps_serving() {
    use kt_proto::v1::expert_client::ExpertClient;
    use kt_proto::v1::{expert_error::Code, expert_response::Result as R, ExpertInfoRequest};
    use kt_proto::{encode_request, hash_hex, WireDType, CONFIG_HASH_HEADER};

    let model = "qwen2moe";
    let s = server(model, "all");
    let parts = kt_models::open(&hf(model), None, MatmulMode::F32).unwrap();
    let ours = identity("hf", &parts.config);
    let h = parts.config.hidden;
    let layer = (0..parts.config.n_layers).find(|&l| parts.config.is_moe_layer(l)).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut client = ExpertClient::connect(format!("http://{}", s.addr())).await.unwrap();
        let st = client.info(ExpertInfoRequest { expected_config_hash: 1 }).await.unwrap_err();
        assert_eq!(st.code(), tonic::Code::FailedPrecondition);

        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut req = tonic::Request::new(tokio_stream::wrappers::UnboundedReceiverStream::new(rx));
        req.metadata_mut().insert(CONFIG_HASH_HEADER, hash_hex(ours.config_hash).parse().unwrap());
        let mut inbound = client.forward(req).await.unwrap().into_inner();
        let routing = kt_models::Routing { k: 1, ids: vec![0], weights: vec![1.0] };
        let hidden = vec![0.5f32; h];
        let mut bad = encode_request(1, layer, &hidden, h, &routing, WireDType::F32);
        bad.hidden.as_mut().unwrap().shape = vec![2, h as u64]; // payload holds one row
        tx.send(bad).unwrap();
        let mut bad = encode_request(2, layer, &hidden, h, &routing, WireDType::F32);
        bad.expert_ids = vec![10_000];
        tx.send(bad).unwrap();
        let mut bad = encode_request(3, 10_000, &hidden, h, &routing, WireDType::F32);
        bad.hidden = None;
        tx.send(bad).unwrap();
        for id in 1..=3 {
            let resp = inbound.message().await.unwrap().unwrap();
            assert_eq!(resp.request_id, id);
            let Some(R::Error(e)) = resp.result else { panic!("request {id} was not refused") };
            assert_eq!(e.code, Code::InvalidArgument as i32, "{}", e.message);
        }
        tx.send(encode_request(4, layer, &hidden, h, &routing, WireDType::Bf16)).unwrap();
        let resp = inbound.message().await.unwrap().unwrap();
        assert_eq!(resp.request_id, 4);
        assert!(matches!(resp.result, Some(R::Output(_))), "{:?}", resp.result);

        let mut req = tonic::Request::new(tokio_stream::iter(Vec::new()));
        req.metadata_mut()
            .insert(CONFIG_HASH_HEADER, hash_hex(ours.config_hash ^ 1).parse().unwrap());
        let st = client.forward(req).await.unwrap_err();
        assert_eq!(st.code(), tonic::Code::FailedPrecondition);
        assert!(st.message().contains("model mismatch"), "{}", st.message());
    });
}
