//! Test harness: simulated workers on their own runtimes (so a test can kill one like a
//! process), a gateway on a real socket, and a small HTTP/1 client.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use kt_gateway::sim::{SimConfig, SimReply, SimWorker};
use kt_gateway::{Gateway, GatewayConfig, ModelCard, RoutingConfig, WorkerEndpoint};
use kt_proto::v1::worker_server::WorkerServer;
use serde_json::Value;

/// A sim worker served over TCP from its own runtime.
pub struct SimHandle {
    pub addr: SocketAddr,
    pub sim: SimWorker,
    rt: Option<tokio::runtime::Runtime>,
}

impl SimHandle {
    pub fn start(sim: SimWorker, addr: SocketAddr) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let s = sim.clone();
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(WorkerServer::new(s))
                .serve_with_incoming(incoming)
                .await;
        });
        let addr = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        Self { addr, sim, rt: Some(rt) }
    }

    /// Kills the worker as a crashed process would go: every task and socket dropped.
    pub fn kill(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn card() -> ModelCard {
    ModelCard::embedded().unwrap()
}

pub fn tools_card() -> ModelCard {
    let src = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/chat-templates/templates/Qwen-Qwen3-0.6B.jinja"
    ))
    .unwrap();
    card().with_template_source(&src).unwrap()
}

pub fn sim_config(card: &ModelCard) -> SimConfig {
    let mut cfg = SimConfig::for_model(card);
    cfg.max_context = 256;
    cfg.token_interval = Duration::from_millis(1);
    cfg.replies = [
        SimReply::text(card, "stopword", "Hello world. STOP here and more"),
        SimReply::text(card, "weather", "Let me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"),
        SimReply::text(card, "jsonplease", "  {\"a\": [1, 2], \"b\": \"x\"} trailing words"),
        SimReply::text(card, "badjson", "this is not json"),
        // Continuations of a required call's opening (tool_choice): a named one's arguments,
        // a whole call, and no call at all.
        SimReply::text(card, "forcecity", " {\"city\": \"Paris\"}}\n</tool_call> and more"),
        SimReply::text(card, "anycall", "{\"name\": \"get_time\", \"arguments\": {\"zone\": \"CET\"}}\n</tool_call>"),
        SimReply::text(card, "nocall", "I would rather not."),
    ]
    .concat();
    cfg
}

pub fn fast_routing() -> RoutingConfig {
    RoutingConfig {
        health_interval: Duration::from_millis(100),
        health_timeout: Duration::from_millis(300),
        ..RoutingConfig::default()
    }
}

/// A gateway on 127.0.0.1:0 over the given workers; returns its base address.
pub struct GatewayHandle {
    pub addr: SocketAddr,
    pub gateway: Gateway,
}

pub async fn start_gateway(
    cfg: GatewayConfig,
    card: ModelCard,
    workers: &[SocketAddr],
) -> GatewayHandle {
    let eps =
        workers.iter().map(|a| WorkerEndpoint::connect_lazy(&a.to_string()).unwrap()).collect();
    let gateway = Gateway::new(cfg, card, eps).unwrap();
    gateway.check_workers().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let g = gateway.clone();
    tokio::spawn(async move { g.serve(listener, std::future::pending()).await.unwrap() });
    GatewayHandle { addr, gateway }
}

/// One sim + one gateway with default settings.
pub struct Setup {
    pub sim: SimHandle,
    pub gw: GatewayHandle,
}

pub async fn setup_with(cfg: GatewayConfig, card: ModelCard) -> Setup {
    setup_sim(cfg, card, |_| {}).await
}

/// As [`setup_with`], with the sim's settings adjusted by `tweak`.
pub async fn setup_sim(
    cfg: GatewayConfig,
    card: ModelCard,
    tweak: impl FnOnce(&mut SimConfig),
) -> Setup {
    let mut sc = sim_config(&card);
    tweak(&mut sc);
    let sim = SimHandle::start(SimWorker::new(sc), "127.0.0.1:0".parse().unwrap());
    let gw =
        start_gateway(GatewayConfig { routing: fast_routing(), ..cfg }, card, &[sim.addr]).await;
    Setup { sim, gw }
}

pub async fn setup() -> Setup {
    setup_with(GatewayConfig::default(), card()).await
}

pub struct Resp {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).map(|v| v.to_str().unwrap().to_owned())
    }
}

async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> hyper::Response<Incoming> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let mut req = hyper::Request::builder().method(method).uri(path).header("host", "localhost");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    sender.send_request(req.body(Full::new(Bytes::from(body))).unwrap()).await.unwrap()
}

pub async fn raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Resp {
    let res = send(addr, method, path, headers, body).await;
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    Resp { status, headers, body }
}

pub async fn post(addr: SocketAddr, path: &str, body: Value) -> Resp {
    raw(addr, "POST", path, &[("content-type", "application/json")], body.to_string().into_bytes())
        .await
}

pub async fn get(addr: SocketAddr, path: &str) -> Resp {
    raw(addr, "GET", path, &[], Vec::new()).await
}

/// A streaming response read frame by frame.
pub struct Streamed {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    body: Incoming,
    buf: String,
}

impl Streamed {
    pub async fn open(addr: SocketAddr, path: &str, body: Value) -> Self {
        let res = send(
            addr,
            "POST",
            path,
            &[("content-type", "application/json")],
            body.to_string().into_bytes(),
        )
        .await;
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        Self { status, headers, body: res.into_body(), buf: String::new() }
    }

    /// The next complete record (SSE event data without `data: `, or one NDJSON line).
    pub async fn next_record(&mut self, sep: &str) -> Option<String> {
        loop {
            if let Some(i) = self.buf.find(sep) {
                let rec = self.buf[..i].to_owned();
                self.buf.drain(..i + sep.len());
                return Some(rec.strip_prefix("data: ").unwrap_or(&rec).to_owned());
            }
            match self.body.frame().await {
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        self.buf.push_str(&String::from_utf8_lossy(&d));
                    }
                }
                _ => return None,
            }
        }
    }

    pub async fn sse_all(mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(r) = self.next_record("\n\n").await {
            out.push(r);
        }
        out
    }

    pub async fn ndjson_all(mut self) -> Vec<Value> {
        let mut out = Vec::new();
        while let Some(r) = self.next_record("\n").await {
            out.push(serde_json::from_str(&r).unwrap());
        }
        out
    }
}

/// Waits until `cond` holds (polling), or panics after `secs`.
pub async fn eventually(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn arc<T>(t: T) -> Arc<T> {
    Arc::new(t)
}
