//! The worker's `Health` follows its expert servers (in-process `kt-expert` servers on
//! 127.0.0.1): serving while every share has a reachable holder — with a message while a
//! replica stands in for a stopped server —, not serving, naming the servers, while a share
//! has none, and serving again once they are back, without a worker restart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fixture;
use kt_expert::{RemoteOptions, ServerHandle, ServerOptions, ShmMode};
use kt_proto::v1::health_response::Status;
use kt_proto::v1::worker_client::WorkerClient;
use kt_proto::v1::{HealthRequest, HealthResponse};
use kt_worker::setup::{load_model, ExpertAddr, ModelOptions};
use kt_worker::{CpuBackend, Engine, EngineOptions, WorkerService};

fn hf() -> PathBuf {
    fixture("qwen3moe").join("hf")
}

/// The shipped fixture plan (numa0 and numa1, each the other's replica), or the same without
/// the replicas.
fn plan(replicas: bool) -> PathBuf {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../rules/fixtures/qwen3moe.yaml");
    if replicas {
        return shipped;
    }
    let text = std::fs::read_to_string(&shipped)
        .unwrap()
        .replace("{numa: 0, replicas: [numa1]}", "{numa: 0}")
        .replace("{numa: 1, replicas: [numa0]}", "{numa: 1}");
    let dir = std::env::temp_dir().join(format!("kt-worker-health-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("qwen3moe-no-replicas.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

fn start(plan: &Path, name: &str, addr: &str) -> ServerHandle {
    let opts = ServerOptions { threads: Some(1), name: name.into(), ..ServerOptions::default() };
    let svc = kt_expert::load_plan(&hf(), None, plan, opts).unwrap();
    let t = Instant::now();
    loop {
        match ServerHandle::start(svc.clone(), addr) {
            Ok(h) => return h,
            Err(e) if t.elapsed() < Duration::from_secs(10) => {
                eprintln!("binding {addr}: {e}; retrying");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("binding {addr}: {e}"),
        }
    }
}

fn worker(plan: &Path, servers: &[(&str, &ServerHandle)]) -> WorkerService {
    let mut opts = ModelOptions::new(hf());
    opts.plan = Some(plan.to_path_buf());
    opts.experts = servers
        .iter()
        .map(|(n, s)| ExpertAddr { name: n.to_string(), addr: s.addr().to_string() })
        .collect();
    opts.remote = RemoteOptions {
        shm: ShmMode::Off,
        timeout: Duration::from_secs(5),
        reconnect_initial: Duration::from_millis(20),
        reconnect_max: Duration::from_millis(200),
        ..RemoteOptions::default()
    };
    let loaded = load_model(&opts).unwrap();
    assert!(loaded.experts_health.is_some());
    let engine =
        Engine::start(CpuBackend::new(Arc::new(loaded.model), 16, 64), EngineOptions::default())
            .unwrap();
    WorkerService::new(engine, &loaded.name).with_expert_health(loaded.experts_health)
}

fn wait_for(svc: &WorkerService, what: &str, ok: impl Fn(&HealthResponse) -> bool) {
    let t = Instant::now();
    loop {
        let h = svc.health_status();
        if ok(&h) {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(15), "timed out waiting for {what}: {h:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `Health` over gRPC, from a worker served on 127.0.0.1.
fn health_over_grpc(svc: &WorkerService) -> HealthResponse {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(kt_worker::serve(svc.clone(), listener, std::future::pending()));
        let mut client = WorkerClient::connect(format!("http://{addr}")).await.unwrap();
        client.health(HealthRequest {}).await.unwrap().into_inner()
    })
}

#[test]
fn health_follows_the_expert_servers_and_their_replicas() {
    let plan = plan(true);
    let a = start(&plan, "numa0", "127.0.0.1:0");
    let b = start(&plan, "numa1", "127.0.0.1:0");
    let (a_addr, b_addr) = (a.addr().to_string(), b.addr().to_string());
    let svc = worker(&plan, &[("numa0", &a), ("numa1", &b)]);
    let h = svc.health_status();
    assert_eq!((h.status, h.message.as_str()), (Status::Serving as i32, ""));

    // numa1 stops: numa0 answers for it, the worker still serves and says so.
    drop(b);
    wait_for(&svc, "numa1 to be seen down", |h| !h.message.is_empty());
    let h = svc.health_status();
    assert_eq!(h.status, Status::Serving as i32, "{h:?}");
    assert!(h.message.contains("`numa1`") && h.message.contains("replica `numa0`"), "{h:?}");

    // numa0 stops too: nobody holds either share.
    drop(a);
    wait_for(&svc, "not serving", |h| h.status == Status::NotServing as i32);
    let h = health_over_grpc(&svc);
    assert_eq!(h.status, Status::NotServing as i32, "{h:?}");
    assert!(h.message.contains(&format!("`numa0` ({a_addr})")), "{h:?}");
    assert!(h.message.contains(&format!("`numa1` ({b_addr})")), "{h:?}");
    eprintln!("not serving: {}", h.message);

    // Both back on their addresses: serving again, nothing to report.
    let _a = start(&plan, "numa0", &a_addr);
    let _b = start(&plan, "numa1", &b_addr);
    wait_for(&svc, "serving again", |h| h.status == Status::Serving as i32 && h.message.is_empty());
}

#[test]
fn without_replicas_a_stopped_server_makes_the_worker_not_serving() {
    let plan = plan(false);
    let a = start(&plan, "numa0", "127.0.0.1:0");
    let b = start(&plan, "numa1", "127.0.0.1:0");
    let b_addr = b.addr().to_string();
    let svc = worker(&plan, &[("numa0", &a), ("numa1", &b)]);
    assert_eq!(svc.health_status().status, Status::Serving as i32);
    drop(b);
    wait_for(&svc, "not serving", |h| h.status == Status::NotServing as i32);
    let h = svc.health_status();
    assert!(
        h.message.contains(&format!("`numa1` ({b_addr})")) && h.message.contains("no replica"),
        "{h:?}"
    );
    assert!(!h.message.contains("`numa0`"), "numa0 is up: {h:?}");
    let _b = start(&plan, "numa1", &b_addr);
    wait_for(&svc, "serving again", |h| h.status == Status::Serving as i32);
}

/// A worker without expert servers has nothing to ask: always serving.
#[test]
fn a_self_contained_worker_is_serving() {
    let loaded = load_model(&ModelOptions::new(hf())).unwrap();
    assert!(loaded.experts_health.is_none());
    let engine =
        Engine::start(CpuBackend::new(Arc::new(loaded.model), 16, 64), EngineOptions::default())
            .unwrap();
    let svc = WorkerService::new(engine, &loaded.name).with_expert_health(loaded.experts_health);
    let h = svc.health_status();
    assert_eq!((h.status, h.message.as_str()), (Status::Serving as i32, ""));
}
