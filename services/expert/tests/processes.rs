//! Real `kt-expert` processes on 127.0.0.1 serving a worker-side model:
//! * two processes (experts split by id parity) give the single-process greedy output;
//! * a process killed mid-generation fails the generation within the configured timeout, and
//!   after it restarts on the same address the same `RemoteExperts` serves again;
//! * a stopped (SIGSTOP) process fails calls within the timeout, and serves again after
//!   SIGCONT;
//! * a process of another model, or started from another plan, is refused at connect with an
//!   error naming the mismatch;
//! * malformed, truncated and oversized messages get an error status and the process keeps
//!   serving;
//! * `--metrics` serves Prometheus text that counts the calls.
//!
//! Each runs over shared memory (same host: chosen automatically) and over gRPC.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kt_expert::{identity, LinkKind, RemoteExperts, RemoteOptions, ShmMode};
use kt_models::{generate, GenerateParams, Generation, MatmulMode, Model, ShardedExperts};
use kt_sample::{Sampler, SamplingParams};

struct Server {
    child: Child,
    addr: String,
    metrics: Option<String>,
}

impl Server {
    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
        let rc = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(rc, 0, "kill({sig})");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn hf(model: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models").join(model).join("hf")
}

/// Starts `kt-expert` configured through its environment variables (plus `extra`), reads the
/// bound addresses from its stdout.
fn spawn_env(model: &str, extra: &[(&str, &str)]) -> Server {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kt-expert"));
    cmd.env("KT_EXPERT_MODEL", hf(model))
        .env("KT_EXPERT_LISTEN", "127.0.0.1:0")
        .env("KT_EXPERT_THREADS", "2")
        .env("KT_EXPERT_NUMA", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    // From here the child is reaped by `Server`'s drop, whatever happens.
    let mut server = Server { child, addr: String::new(), metrics: None };
    let mut out = BufReader::new(stdout);
    while server.addr.is_empty() {
        let mut line = String::new();
        assert!(out.read_line(&mut line).unwrap() > 0, "kt-expert exited before listening");
        if let Some(m) = line.trim().strip_prefix("metrics on ") {
            server.metrics = Some(m.to_string());
        } else if let Some(a) = line.trim().strip_prefix("listening on ") {
            server.addr = a.to_string();
        }
    }
    server
}

fn spawn(model: &str, spec: &str) -> Server {
    spawn_env(model, &[("KT_EXPERT_EXPERTS", spec)])
}

fn prompt(model: &str) -> Vec<u32> {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(hf(model).join("../reference/hf.json")).unwrap())
            .unwrap();
    v["prompt_tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect()
}

fn params() -> GenerateParams {
    GenerateParams { max_tokens: 24, top_logprobs: 8, stop_ids: vec![] }
}

fn greedy() -> Sampler {
    Sampler::new(SamplingParams::greedy()).unwrap()
}

fn worker_model(model: &str, experts: Arc<dyn kt_models::Experts>) -> Model {
    let parts = kt_models::open(&hf(model), None, MatmulMode::F32).unwrap();
    Model::load_with(
        parts.config.clone(),
        parts.source.tensors(),
        parts.scheme,
        MatmulMode::F32,
        &|_, _| false,
    )
    .unwrap()
    .with_experts(experts)
}

fn remotes(model: &str, servers: &[&Server], opts: &RemoteOptions) -> Vec<Arc<RemoteExperts>> {
    let parts = kt_models::open(&hf(model), None, MatmulMode::F32).unwrap();
    let ours = identity("hf", &parts.config);
    servers
        .iter()
        .map(|s| Arc::new(RemoteExperts::connect(&s.addr, &ours, opts.clone()).unwrap()))
        .collect()
}

fn sharded(model: &str, remotes: &[Arc<RemoteExperts>]) -> Model {
    let parts = kt_models::open(&hf(model), None, MatmulMode::F32).unwrap();
    let (nl, ne) = (parts.config.n_layers, parts.config.moe.as_ref().unwrap().n_experts);
    let mut sharded = ShardedExperts::new(parts.config.hidden);
    for r in remotes {
        sharded = sharded.add(r.clone(), r.owns(nl, ne));
    }
    worker_model(model, Arc::new(sharded))
}

fn same(want: &Generation, got: &Generation) {
    let ids = |g: &Generation| g.tokens.iter().map(|t| t.id).collect::<Vec<_>>();
    assert_eq!(ids(want), ids(got));
    let worst = want
        .tokens
        .iter()
        .zip(&got.tokens)
        .map(|(x, y)| (x.logprob - y.logprob).abs())
        .fold(0f64, f64::max);
    assert!(worst <= 1e-5, "max |logprob diff| {worst:.3e}");
}

fn local(model: &str) -> Generation {
    let local = kt_models::load(&hf(model), None, MatmulMode::F32).unwrap();
    generate(&local.model, &prompt(model), &params(), &mut greedy(), |_| true).unwrap()
}

/// Retries `generate` until it succeeds (the client reconnects on its own) or `limit` passes.
fn until_served(w: &Model, model: &str, limit: Duration) -> Generation {
    let t = Instant::now();
    loop {
        match generate(w, &prompt(model), &params(), &mut greedy(), |_| true) {
            Ok(g) => return g,
            Err(e) if t.elapsed() < limit => {
                eprintln!("not yet: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("not served again within {limit:?}: {e}"),
        }
    }
}

fn kill_restart(shm: ShmMode) {
    let model = "deepseek2-lite";
    let want = local(model);
    let a = spawn(model, "mod:2:0");
    let mut b = Some(spawn(model, "mod:2:1"));
    let b_addr = b.as_ref().unwrap().addr.clone();
    let timeout = Duration::from_secs(5);
    let opts = RemoteOptions { timeout, shm, ..RemoteOptions::default() };
    let rs = remotes(model, &[&a, b.as_ref().unwrap()], &opts);
    let want_kind = if shm == ShmMode::Off { LinkKind::Grpc } else { LinkKind::Shm };
    assert!(rs.iter().all(|r| r.transport() == Some(want_kind)), "{:?}", rs[0].shm_note());
    let w = sharded(model, &rs);
    same(&want, &generate(&w, &prompt(model), &params(), &mut greedy(), |_| true).unwrap());

    let mut seen = 0;
    let mut killed_at = None;
    let res = generate(&w, &prompt(model), &params(), &mut greedy(), |_| {
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
    assert!(err.to_string().contains(&b_addr), "{err}");
    eprintln!("{shm:?}: after kill -9: {err} (in {elapsed:?})");
    // While it is down, calls fail at once.
    let t = Instant::now();
    assert!(generate(&w, &prompt(model), &params(), &mut greedy(), |_| true).is_err());
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());

    // Back on the same address: the same clients serve again, no restart.
    let _b2 = spawn_env(model, &[("KT_EXPERT_EXPERTS", "mod:2:1"), ("KT_EXPERT_LISTEN", &b_addr)]);
    let got = until_served(&w, model, Duration::from_secs(20));
    same(&want, &got);
    assert_eq!(rs[1].transport(), Some(want_kind), "{:?}", rs[1].shm_note());
}

#[test]
fn killed_server_fails_fast_and_is_used_again_after_restart_shm() {
    kill_restart(ShmMode::Auto);
}

#[test]
fn killed_server_fails_fast_and_is_used_again_after_restart_grpc() {
    kill_restart(ShmMode::Off);
}

fn stall(shm: ShmMode) {
    let model = "qwen2moe";
    let want = local(model);
    let s = spawn(model, "all");
    let timeout = Duration::from_secs(2);
    let opts = RemoteOptions { timeout, shm, ..RemoteOptions::default() };
    let rs = remotes(model, &[&s], &opts);
    let w = sharded(model, &rs);
    same(&want, &generate(&w, &prompt(model), &params(), &mut greedy(), |_| true).unwrap());
    s.signal(libc::SIGSTOP);
    let t = Instant::now();
    let err = generate(&w, &prompt(model), &params(), &mut greedy(), |_| true)
        .expect_err("a stopped server cannot answer");
    let elapsed = t.elapsed();
    assert!(elapsed >= timeout && elapsed < timeout + Duration::from_secs(2), "{elapsed:?}: {err}");
    assert!(err.to_string().contains("did not answer"), "{err}");
    eprintln!("{shm:?}: stopped server: {err} (in {elapsed:?})");
    s.signal(libc::SIGCONT);
    same(&want, &until_served(&w, model, Duration::from_secs(20)));
}

#[test]
fn stalled_server_fails_within_the_timeout_and_recovers_shm() {
    stall(ShmMode::Auto);
}

#[test]
fn stalled_server_fails_within_the_timeout_and_recovers_grpc() {
    stall(ShmMode::Off);
}

fn plan_file(name: &str, split: &str) -> PathBuf {
    let text = format!(
        "model: {{arch: qwen2moe}}\nworker: {{devices: [cpu]}}\nexperts:\n  servers: {{numa0: {{numa: 0}}, numa1: {{numa: 1}}}}\n  {split}\n  kernel: {{decode: native, prefill: native}}\nrules:\n  - {{match: '\\.experts\\.\\d+\\.', kind: experts, place: experts}}\n  - {{match: '.*', place: cpu}}\n"
    );
    let dir = std::env::temp_dir().join(format!("kt-expert-proc-plans-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn plan_servers_match_and_mismatches_are_refused_at_connect() {
    let model = "qwen2moe";
    let sliced = plan_file("sliced.yaml", "split: intermediate");
    let by_id = plan_file("by-id.yaml", "split: by_expert\n  assign: round_robin");
    let start = |plan: &Path, name: &str| {
        spawn_env(model, &[("KT_EXPERT_PLAN", plan.to_str().unwrap()), ("KT_EXPERT_NAME", name)])
    };
    let (a, b) = (start(&sliced, "numa0"), start(&sliced, "numa1"));
    let parts = kt_models::open(&hf(model), None, MatmulMode::F32).unwrap();
    let ours = identity("hf", &parts.config);
    let shape = kt_plan::ModelShape::open(hf(model), None).unwrap();
    let addrs = vec![("numa0".to_string(), a.addr.clone()), ("numa1".to_string(), b.addr.clone())];
    let opts = RemoteOptions::default();

    // The same plan: served, and equal to one process.
    let plan = kt_plan::Plan::load(&sliced).unwrap();
    let experts = kt_expert::connect_plan(&plan, &shape, &ours, &addrs, &opts).unwrap();
    same(
        &local(model),
        &generate(&worker_model(model, experts), &prompt(model), &params(), &mut greedy(), |_| {
            true
        })
        .unwrap(),
    );

    // Another plan: refused, naming both plans.
    let other = kt_plan::Plan::load(&by_id).unwrap();
    let err = kt_expert::connect_plan(&other, &shape, &ours, &addrs, &opts).err().unwrap();
    let text = err.to_string();
    assert!(matches!(err, kt_expert::ExpertError::PlacementMismatch { .. }), "{text}");
    assert!(text.contains("sliced.yaml") && text.contains("by-id.yaml"), "{text}");
    // Servers swapped: refused, naming the server.
    let swapped =
        vec![("numa0".to_string(), b.addr.clone()), ("numa1".to_string(), a.addr.clone())];
    let text =
        kt_expert::connect_plan(&plan, &shape, &ours, &swapped, &opts).err().unwrap().to_string();
    assert!(text.contains("named `numa1`, `numa0` was expected"), "{text}");

    // A plan/name that does not fit: the process refuses to start.
    let out = Command::new(env!("CARGO_BIN_EXE_kt-expert"))
        .env("KT_EXPERT_MODEL", hf(model))
        .env("KT_EXPERT_PLAN", &sliced)
        .env("KT_EXPERT_NAME", "numa9")
        .env("KT_EXPERT_LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no expert server `numa9`"), "{stderr}");

    // A process of another model: refused at connect, naming both config hashes.
    let other_model = spawn("qwen3moe", "all");
    let err =
        RemoteExperts::connect(&other_model.addr, &ours, RemoteOptions::default()).unwrap_err();
    assert!(
        err.to_string().contains("different model") && err.to_string().contains("config hash"),
        "{err}"
    );
}

mod raw {
    //! A gRPC client that sends arbitrary bytes as messages.

    use prost::bytes::{Buf, BufMut};
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
    use tonic::Status;

    #[derive(Debug, Default, Clone)]
    pub struct RawCodec;

    impl Codec for RawCodec {
        type Encode = Vec<u8>;
        type Decode = Vec<u8>;
        type Encoder = RawCodec;
        type Decoder = RawCodec;

        fn encoder(&mut self) -> Self::Encoder {
            RawCodec
        }

        fn decoder(&mut self) -> Self::Decoder {
            RawCodec
        }
    }

    impl Encoder for RawCodec {
        type Item = Vec<u8>;
        type Error = Status;

        fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
            buf.put_slice(&item);
            Ok(())
        }
    }

    impl Decoder for RawCodec {
        type Item = Vec<u8>;
        type Error = Status;

        fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
            let v = buf.copy_to_bytes(buf.remaining()).to_vec();
            Ok(Some(v))
        }
    }
}

#[test]
fn malformed_truncated_and_oversized_messages_get_errors_and_the_process_keeps_serving() {
    use kt_proto::v1::expert_client::ExpertClient;
    use kt_proto::v1::ExpertInfoRequest;
    use kt_proto::{encode_request, hash_hex, WireDType, CONFIG_HASH_HEADER};
    use prost::Message;
    use tonic::codegen::http::uri::PathAndQuery;

    let model = "qwen2moe";
    let s = spawn_env(model, &[("KT_EXPERT_MAX_MESSAGE_BYTES", "1048576")]);
    let parts = kt_models::open(&hf(model), None, MatmulMode::F32).unwrap();
    let ours = identity("hf", &parts.config);
    let h = parts.config.hidden;
    let layer = (0..parts.config.n_layers).find(|&l| parts.config.is_moe_layer(l)).unwrap();
    let routing = kt_models::Routing { k: 1, ids: vec![0], weights: vec![1.0] };
    let good = encode_request(1, layer, &vec![0.5; h], h, &routing, WireDType::F32).encode_to_vec();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let uri = format!("http://{}", s.addr);
    rt.block_on(async {
        let channel =
            tonic::transport::Endpoint::from_shared(uri.clone()).unwrap().connect().await.unwrap();
        // One raw Forward stream per bad message: each must end with an error status.
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("truncated", good[..good.len() / 2].to_vec()),
            ("garbage", vec![0xff; 64]),
            ("oversized", vec![0u8; 2 << 20]),
        ];
        for (what, bytes) in cases {
            let mut grpc = tonic::client::Grpc::new(channel.clone());
            grpc.ready().await.unwrap();
            let mut req = tonic::Request::new(tokio_stream::iter(vec![bytes]));
            req.metadata_mut()
                .insert(CONFIG_HASH_HEADER, hash_hex(ours.config_hash).parse().unwrap());
            let path = PathAndQuery::from_static("/kt.v1.Expert/Forward");
            let res = grpc.streaming(req, path, raw::RawCodec).await;
            let status = match res {
                Err(status) => status,
                Ok(resp) => {
                    let mut inbound = resp.into_inner();
                    loop {
                        match inbound.message().await {
                            Err(status) => break status,
                            Ok(Some(_)) => continue,
                            Ok(None) => panic!("{what}: the stream ended without an error"),
                        }
                    }
                }
            };
            assert_ne!(status.code(), tonic::Code::Ok, "{what}");
            eprintln!("{what}: {:?}: {}", status.code(), status.message());
        }
        // Not HTTP/2 at all, on a fresh connection.
        let mut sock = std::net::TcpStream::connect(&s.addr).unwrap();
        sock.write_all(b"GET / HTTP/1.0\r\n\r\nnot a gRPC client\r\n").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = Vec::new();
        let _ = sock.read_to_end(&mut buf);
        // Still serving, on the old connection and on new ones.
        let mut client = ExpertClient::new(channel);
        assert!(client.info(ExpertInfoRequest::default()).await.is_ok());
    });
    let rs = remotes(model, &[&s], &RemoteOptions::default());
    let w = sharded(model, &rs);
    same(&local(model), &generate(&w, &prompt(model), &params(), &mut greedy(), |_| true).unwrap());
}

fn scrape(addr: &str) -> String {
    let mut sock = std::net::TcpStream::connect(addr).unwrap();
    sock.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    sock.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    text
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no `{name}` in\n{text}"))
}

#[test]
fn metrics_endpoint_counts_calls() {
    let model = "qwen2moe";
    let s = spawn_env(model, &[("KT_EXPERT_METRICS", "127.0.0.1:0")]);
    let m = s.metrics.clone().unwrap();
    let before = scrape(&m);
    assert_eq!(metric(&before, "kt_expert_tokens_total "), 0.0);
    assert!(metric(&before, "kt_expert_bytes_held ") > 0.0);
    let rs = remotes(model, &[&s], &RemoteOptions::default());
    let grpc =
        remotes(model, &[&s], &RemoteOptions { shm: ShmMode::Off, ..RemoteOptions::default() });
    let g =
        generate(&sharded(model, &rs), &prompt(model), &params(), &mut greedy(), |_| true).unwrap();
    generate(&sharded(model, &grpc), &prompt(model), &params(), &mut greedy(), |_| true).unwrap();
    let after = scrape(&m);
    let shm = metric(&after, "kt_expert_requests_total{transport=\"shm\"} ");
    let over_grpc = metric(&after, "kt_expert_requests_total{transport=\"grpc\"} ");
    assert!(shm > 0.0 && over_grpc > 0.0, "{after}");
    let tokens = metric(&after, "kt_expert_tokens_total ");
    assert!(tokens >= 2.0 * (prompt(model).len() + g.tokens.len() - 1) as f64, "{after}");
    assert_eq!(metric(&after, "kt_expert_layer_seconds_count "), shm + over_grpc);
    assert_eq!(metric(&after, "kt_expert_shm_rings "), 1.0);
    assert_eq!(metric(&after, "kt_expert_streams "), 2.0);
    // Errors are counted: an expert this server is asked for with a bad id.
    let parts = kt_models::open(&hf(model), None, MatmulMode::F32).unwrap();
    let h = parts.config.hidden;
    let layer = (0..parts.config.n_layers).find(|&l| parts.config.is_moe_layer(l)).unwrap();
    let r = kt_models::Routing { k: 1, ids: vec![0], weights: vec![f32::NAN] };
    assert!(kt_models::Experts::forward(rs[0].as_ref(), layer, &vec![0.0; h], &r).is_err());
    let errs = scrape(&m);
    assert_eq!(metric(&errs, "kt_expert_errors_total{code=\"invalid_argument\"} "), 1.0);
    // Not found elsewhere.
    let mut sock = std::net::TcpStream::connect(&m).unwrap();
    sock.write_all(b"GET /nope HTTP/1.1\r\n\r\n").unwrap();
    let mut text = String::new();
    sock.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 404"), "{text}");
}
