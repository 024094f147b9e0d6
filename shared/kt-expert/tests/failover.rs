//! Replicas for failover, end to end with in-process expert servers on 127.0.0.1: a server
//! that a plan names as a replica loads and reports its primary's share too; the worker sends
//! a stopped primary's calls to the replica with bit-identical results, goes back to the
//! primary once it is restarted (counted by each server's metrics), reports the tier's health,
//! and names every server when none of a share's holders is up.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kt_expert::metrics::{Metrics, Via};
use kt_expert::{identity, PlanExperts, RemoteOptions, ServerHandle, ServerOptions, ShmMode};
use kt_models::{Experts, MatmulMode, Routing, ShardedExperts};
use kt_plan::{ModelShape, Plan};

const MODEL: &str = "qwen3moe";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn hf() -> PathBuf {
    root().join("tests/fixtures/models").join(MODEL).join("hf")
}

/// The shipped fixture plan: `by_expert` round robin over numa0/numa1, each the other's
/// replica.
fn shipped_plan() -> PathBuf {
    root().join("rules/fixtures").join(format!("{MODEL}.yaml"))
}

fn write_plan(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kt-failover-plans-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// A server started from `plan` as `name` (at `addr`, e.g. `127.0.0.1:0`), with its metrics.
fn start(plan: &Path, name: &str, addr: &str) -> (ServerHandle, Arc<Metrics>) {
    let opts = ServerOptions { threads: Some(1), name: name.into(), ..ServerOptions::default() };
    let svc = kt_expert::load_plan(&hf(), None, plan, opts).unwrap();
    let metrics = svc.metrics();
    // A restarted server binds its old port again; the old listener may take a moment to go.
    let t = Instant::now();
    loop {
        match ServerHandle::start(svc.clone(), addr) {
            Ok(h) => return (h, metrics),
            Err(e) if t.elapsed() < Duration::from_secs(10) => {
                eprintln!("binding {addr}: {e}; retrying");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("binding {addr}: {e}"),
        }
    }
}

fn calls(m: &Metrics) -> u64 {
    m.requests(Via::Grpc) + m.requests(Via::Shm)
}

fn worker_opts(shm: ShmMode) -> RemoteOptions {
    RemoteOptions {
        shm,
        timeout: Duration::from_secs(5),
        reconnect_initial: Duration::from_millis(20),
        reconnect_max: Duration::from_millis(200),
        ..RemoteOptions::default()
    }
}

fn connect(plan: &Path, addrs: &[(&str, String)], opts: &RemoteOptions) -> PlanExperts {
    let plan = Plan::load(plan).unwrap();
    let shape = ModelShape::open(hf(), None).unwrap();
    let config = kt_models::open(&hf(), None, MatmulMode::F32).unwrap().config;
    let addrs: Vec<(String, String)> =
        addrs.iter().map(|(n, a)| (n.to_string(), a.clone())).collect();
    kt_expert::connect_plan_tier(&plan, &shape, &identity("hf", &config), &addrs, opts).unwrap()
}

/// The same split, every holder in this process: each server's own share as a
/// `LocalExperts`, summed by a `ShardedExperts` in plan order, as the worker sums the
/// servers' answers.
fn local_reference(plan: &Path) -> ShardedExperts {
    let plan = Plan::load(plan).unwrap();
    let shape = ModelShape::open(hf(), None).unwrap();
    let parts = kt_models::open(&hf(), None, MatmulMode::F32).unwrap();
    let c = &parts.config;
    let (nl, ne) = (c.n_layers, c.moe.as_ref().unwrap().n_experts);
    let mut sharded = ShardedExperts::new(c.hidden);
    for a in kt_expert::placement::assignments(&plan, &shape).unwrap() {
        let own = a.own.clone();
        let local = kt_models::load_experts(
            c,
            parts.source.tensors(),
            parts.scheme,
            MatmulMode::F32,
            &|l, e| own.contains(&(l, e)),
        )
        .unwrap();
        let mut owns = vec![vec![false; ne]; nl];
        for &(l, e) in &a.own {
            owns[l][e] = true;
        }
        sharded = sharded.add(Arc::new(local), owns);
    }
    sharded
}

/// Call `i` of a deterministic sequence: (layer, hidden of 3 tokens, top-2 routing).
fn call(i: usize) -> (usize, Vec<f32>, Routing) {
    let (h, ne, k, n) = (256, 4u32, 2, 3);
    let layer = i % 2;
    let hidden: Vec<f32> =
        (0..n * h).map(|j| (((i * 131 + j) as f32) * 0.013).sin() * 0.7).collect();
    let mut ids = Vec::new();
    let mut weights = Vec::new();
    for t in 0..n {
        let first = ((i * 3 + t) as u32) % ne;
        ids.extend([first, (first + 1 + (i as u32 % 3)) % ne]);
        weights.extend([0.625, 0.375]);
    }
    (layer, hidden, Routing { k, ids, weights })
}

/// Runs calls `range` through `experts` and checks each against `reference`, bit for bit.
fn run(experts: &dyn Experts, reference: &dyn Experts, range: std::ops::Range<usize>) {
    for i in range {
        let (layer, hidden, routing) = call(i);
        let want = reference.forward(layer, &hidden, &routing).unwrap();
        let got = experts
            .forward(layer, &hidden, &routing)
            .unwrap_or_else(|e| panic!("call {i} (layer {layer}): {e}"));
        let same = want.len() == got.len()
            && want.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "call {i}: the answer differs from the all-local reference");
    }
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ok() {
        assert!(t.elapsed() < Duration::from_secs(15), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_replica_loads_and_reports_its_primarys_share() {
    let plan = shipped_plan();
    let (a, _) = start(&plan, "numa0", "127.0.0.1:0");
    let parts = kt_models::open(&hf(), None, MatmulMode::F32).unwrap();
    let r = kt_expert::RemoteExperts::connect(
        &a.addr().to_string(),
        &identity("hf", &parts.config),
        RemoteOptions { shm: ShmMode::Off, ..RemoteOptions::default() },
    )
    .unwrap();
    // numa0 owns the even experts and replicates numa1's odd ones: it holds all four of
    // both layers, and says so.
    let held: Vec<(u32, Vec<u32>)> =
        r.info().held.iter().map(|l| (l.layer, l.experts.clone())).collect();
    assert_eq!(held, vec![(0, vec![0, 1, 2, 3]), (1, vec![0, 1, 2, 3])]);
    let shape = ModelShape::open(hf(), None).unwrap();
    let all = kt_expert::placement::assignments(&Plan::load(&plan).unwrap(), &shape).unwrap();
    assert_eq!(all[0].own.iter().map(|&(_, e)| e).collect::<Vec<_>>(), vec![0, 2, 0, 2]);
    assert_eq!(all[0].replica_of, vec!["numa1".to_string()]);
    assert_eq!(all[0].held.len(), 8);
}

fn failover_round_trip(shm: ShmMode) {
    let plan = shipped_plan();
    let reference = local_reference(&plan);
    let (a, ma) = start(&plan, "numa0", "127.0.0.1:0");
    let (b, mb) = start(&plan, "numa1", "127.0.0.1:0");
    let b_addr = b.addr().to_string();
    let addrs = [("numa0", a.addr().to_string()), ("numa1", b_addr.clone())];
    let tier = connect(&plan, &addrs, &worker_opts(shm));
    let experts = tier.experts.clone();
    assert!(tier.health.check().serving);

    // Everybody up: each server answers for its own share.
    run(&*experts, &reference, 0..20);
    let (a0, b0) = (calls(&ma), calls(&mb));
    assert!(a0 > 0 && b0 > 0, "both servers answered ({a0}, {b0})");

    // numa1 stops mid-run: its calls go to numa0, with the same numbers.
    drop(b);
    run(&*experts, &reference, 20..60);
    assert_eq!(calls(&mb), b0, "the stopped server answered nothing");
    let a1 = calls(&ma);
    assert!(a1 >= a0 + 40 * 2 - 5, "numa0 answered for both shares ({a0} -> {a1})");
    let h = tier.health.check();
    assert!(h.serving, "{h:?}");
    assert!(h.message.contains("`numa1`") && h.message.contains("replica `numa0`"), "{h:?}");

    // numa1 comes back on its address: once the worker has reconnected, calls go to it again.
    let (b, mb2) = start(&plan, "numa1", &b_addr);
    wait_for("the worker to reconnect to numa1", || tier.health.check().message.is_empty());
    let a2 = calls(&ma);
    run(&*experts, &reference, 60..100);
    let (a3, b3) = (calls(&ma), calls(&mb2));
    assert!(b3 >= 35, "the restarted numa1 answers its share again ({b3} calls)");
    assert!(a3 - a2 <= 45, "numa0 is back to its own share ({} calls for 40)", a3 - a2);

    // Neither holder up: a clear error naming both, and Health says not serving.
    drop(a);
    drop(b);
    wait_for("both links to drop", || !tier.health.check().serving);
    let (layer, hidden, routing) = call(1);
    let err = experts.forward(layer, &hidden, &routing).unwrap_err().to_string();
    assert!(err.contains("`numa1`") && err.contains("`numa0`"), "{err}");
    assert!(err.contains(&b_addr), "{err}");
    let h = tier.health.check();
    assert!(!h.serving && h.message.contains("`numa0`") && h.message.contains("`numa1`"), "{h:?}");
    eprintln!("with no server up: {err}\nhealth: {}", h.message);
}

#[test]
fn a_stopped_primary_fails_over_to_its_replica_and_comes_back_grpc() {
    failover_round_trip(ShmMode::Off);
}

#[test]
fn a_stopped_primary_fails_over_to_its_replica_and_comes_back_shm() {
    failover_round_trip(ShmMode::Required);
}

/// A whole generation through the tier, numa1 stopped after the third token: the tokens and
/// logprobs equal, bit for bit, those of the same generation with every server up.
#[test]
fn generation_continues_on_the_replica_with_identical_results() {
    use kt_models::{generate, GenerateParams, Model};
    use kt_sample::{Sampler, SamplingParams};

    let plan = shipped_plan();
    let (a, _) = start(&plan, "numa0", "127.0.0.1:0");
    let (b, _) = start(&plan, "numa1", "127.0.0.1:0");
    let addrs = [("numa0", a.addr().to_string()), ("numa1", b.addr().to_string())];
    let tier = connect(&plan, &addrs, &worker_opts(ShmMode::Off));
    let parts = kt_models::open(&hf(), None, MatmulMode::F32).unwrap();
    let model = Model::load_with(
        parts.config.clone(),
        parts.source.tensors(),
        parts.scheme,
        MatmulMode::F32,
        &|_, _| false,
    )
    .unwrap()
    .with_experts(tier.experts.clone());
    let params = GenerateParams { max_tokens: 24, top_logprobs: 4, stop_ids: vec![] };
    let greedy = || Sampler::new(SamplingParams::greedy()).unwrap();
    let prompt = vec![3u32, 17, 42, 99, 7, 150, 201];
    let want = generate(&model, &prompt, &params, &mut greedy(), |_| true).unwrap();
    let mut b = Some(b);
    let mut seen = 0;
    let got = generate(&model, &prompt, &params, &mut greedy(), |_| {
        seen += 1;
        if seen == 3 {
            drop(b.take());
        }
        true
    })
    .unwrap();
    assert!(b.is_none());
    assert_eq!(got.tokens.len(), want.tokens.len());
    for (w, g) in want.tokens.iter().zip(&got.tokens) {
        assert_eq!(w.id, g.id);
        assert_eq!(w.logprob.to_bits(), g.logprob.to_bits(), "token {}", w.id);
    }
}

/// `by_layer` with a pure standby: numa2 owns nothing and replicates both others; numa0
/// replicates numa1 as well. Stopping numa1 sends its layer to numa0 (the first replica);
/// stopping numa0 too sends both layers to numa2.
#[test]
fn by_layer_with_a_standby_replica() {
    let text = "\
model: {arch: qwen3moe}
worker: {devices: [cpu]}
experts:
  servers:
    numa0: {numa: 0, replicas: [numa2]}
    numa1: {numa: 1, replicas: [numa0, numa2]}
    numa2: {numa: 2}
  split: by_layer
  layers: {numa0: \"0\", numa1: \"1\"}
rules:
  - {match: '\\.experts\\.\\d+\\.', kind: experts, place: experts}
  - {match: '.*', place: cpu}
";
    let plan = write_plan("by-layer-standby.yaml", text);
    let reference = local_reference(&plan);
    let (s0, m0) = start(&plan, "numa0", "127.0.0.1:0");
    let (s1, m1) = start(&plan, "numa1", "127.0.0.1:0");
    let (s2, m2) = start(&plan, "numa2", "127.0.0.1:0");
    let addrs = [
        ("numa0", s0.addr().to_string()),
        ("numa1", s1.addr().to_string()),
        ("numa2", s2.addr().to_string()),
    ];
    let tier = connect(&plan, &addrs, &worker_opts(ShmMode::Off));
    run(&*tier.experts, &reference, 0..10);
    assert_eq!((calls(&m0), calls(&m1), calls(&m2)), (5, 5, 0), "layer 0 / layer 1 / standby");
    drop(s1);
    run(&*tier.experts, &reference, 10..20);
    assert_eq!((calls(&m0), calls(&m2)), (15, 0), "numa0 answers layer 1 for numa1");
    drop(s0);
    run(&*tier.experts, &reference, 20..30);
    assert_eq!(calls(&m2), 10, "the standby answers both layers");
    let h = tier.health.check();
    assert!(h.serving && h.message.contains("replica `numa2`"), "{h:?}");
}

/// A server started from the same plan without its `replicas` lines holds only its own share;
/// a worker whose plan makes it a replica refuses it at connect (the plans' placements
/// differ), naming the server.
#[test]
fn a_server_started_without_the_replicas_is_refused() {
    let plain = std::fs::read_to_string(shipped_plan())
        .unwrap()
        .replace("{numa: 0, replicas: [numa1]}", "{numa: 0}")
        .replace("{numa: 1, replicas: [numa0]}", "{numa: 1}");
    // Same file name as the shipped plan, so only the placement differs.
    let dir = std::env::temp_dir().join(format!("kt-failover-plain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let plain_path = dir.join(format!("{MODEL}.yaml"));
    std::fs::write(&plain_path, plain).unwrap();
    let (a, _) = start(&plain_path, "numa0", "127.0.0.1:0");
    let (b, _) = start(&shipped_plan(), "numa1", "127.0.0.1:0");
    let plan = Plan::load(shipped_plan()).unwrap();
    let shape = ModelShape::open(hf(), None).unwrap();
    let config = kt_models::open(&hf(), None, MatmulMode::F32).unwrap().config;
    let addrs = vec![
        ("numa0".to_string(), a.addr().to_string()),
        ("numa1".to_string(), b.addr().to_string()),
    ];
    let err = kt_expert::connect_plan_tier(
        &plan,
        &shape,
        &identity("hf", &config),
        &addrs,
        &worker_opts(ShmMode::Off),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains(&a.addr().to_string()) && err.contains("does not hold"), "{err}");
}

/// Replicas of intermediate slices are refused when the server loads the plan, naming the
/// file, the line and the field.
#[test]
fn replicas_of_intermediate_slices_are_refused() {
    let text = std::fs::read_to_string(shipped_plan())
        .unwrap()
        .replace("split: by_expert\n  assign: round_robin", "split: intermediate");
    let path = write_plan("sliced-replicas.yaml", &text);
    let opts = ServerOptions { name: "numa0".into(), ..ServerOptions::default() };
    let err = kt_expert::load_plan(&hf(), None, &path, opts).unwrap_err().to_string();
    let file = path.display().to_string();
    assert!(err.contains(&format!("{file}:5:")), "{err}");
    assert!(
        err.contains("experts.servers.numa0.replicas") && err.contains("intermediate"),
        "{err}"
    );
}

/// A port nothing listens on (bound, then released).
fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// Tiers started together: the worker's first connect waits (`start_wait`) for servers that
/// are still loading, then answers as the all-local split does; without the wait it fails at
/// once naming the server; a server holding the wrong share fails the start at once even
/// with the wait.
#[test]
fn the_first_connect_waits_for_servers_still_starting() {
    let plan = shipped_plan();
    let (a0, a1) = (free_addr(), free_addr());
    let addrs = [("numa0", a0.clone()), ("numa1", a1.clone())];
    let p = Plan::load(&plan).unwrap();
    let shape = ModelShape::open(hf(), None).unwrap();
    let config = kt_models::open(&hf(), None, MatmulMode::F32).unwrap().config;
    let named: Vec<(String, String)> =
        addrs.iter().map(|(n, a)| (n.to_string(), a.clone())).collect();
    let ours = identity("hf", &config);
    let err = kt_expert::connect_plan_tier(&p, &shape, &ours, &named, &worker_opts(ShmMode::Off))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains(&a0) && err.contains("cannot connect"), "{err}");

    let starter = std::thread::spawn({
        let (plan, a0, a1) = (plan.clone(), a0.clone(), a1.clone());
        move || {
            std::thread::sleep(Duration::from_millis(700));
            (start(&plan, "numa0", &a0), start(&plan, "numa1", &a1))
        }
    });
    let waiting =
        RemoteOptions { start_wait: Duration::from_secs(60), ..worker_opts(ShmMode::Off) };
    let tier = connect(&plan, &addrs, &waiting);
    let servers = starter.join().unwrap();
    assert!(tier.health.check().serving, "{:?}", tier.health.check());
    run(tier.experts.as_ref(), &local_reference(&plan), 0..6);

    // Addresses swapped: each answers under the other name, a wrong placement: no waiting.
    let swapped = vec![("numa0".to_string(), a1.clone()), ("numa1".to_string(), a0.clone())];
    let t = Instant::now();
    let err = kt_expert::connect_plan_tier(&p, &shape, &ours, &swapped, &waiting)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("is named `numa1`, `numa0` was expected"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(30), "waited {:?} on a wrong placement", t.elapsed());
    drop(servers);
}

/// A primary down at start while its replica is up: the worker starts at once on the replica
/// and takes the primary in when it comes up; with no holder up the start fails naming both.
#[test]
fn a_worker_starts_while_a_primary_is_down_and_picks_it_up_later() {
    let plan = shipped_plan();
    let reference = local_reference(&plan);
    let (a, ma) = start(&plan, "numa0", "127.0.0.1:0");
    let b_addr = free_addr();
    let addrs = [("numa0", a.addr().to_string()), ("numa1", b_addr.clone())];
    let tier = connect(&plan, &addrs, &worker_opts(ShmMode::Off));
    let h = tier.health.check();
    assert!(h.serving && h.message.contains("`numa1`"), "a replica stands in: {h:?}");
    run(&*tier.experts, &reference, 0..10);
    assert!(calls(&ma) >= 20, "numa0 answered for both shares");

    let (_b, mb) = start(&plan, "numa1", &b_addr);
    wait_for("the worker to reach numa1", || tier.health.check().message.is_empty());
    run(&*tier.experts, &reference, 10..30);
    assert!(calls(&mb) >= 15, "numa1 answers its share once it is up ({})", calls(&mb));

    // A share nobody can serve at start is an error naming the server and its replica.
    drop(a);
    let plan_ = Plan::load(&plan).unwrap();
    let shape = ModelShape::open(hf(), None).unwrap();
    let config = kt_models::open(&hf(), None, MatmulMode::F32).unwrap().config;
    let nobody = [("numa0".to_string(), free_addr()), ("numa1".to_string(), free_addr())];
    let Err(err) = kt_expert::connect_plan_tier(
        &plan_,
        &shape,
        &identity("hf", &config),
        &nobody,
        &worker_opts(ShmMode::Off),
    ) else {
        panic!("no holder up must be an error");
    };
    let err = err.to_string();
    assert!(err.contains("`numa0`") && err.contains("`numa1`"), "{err}");
}
