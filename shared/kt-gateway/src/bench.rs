//! `kt bench gateway`: the gateway's own added latency and its throughput, against a
//! simulated worker that streams tokens at a fixed rate.
//!
//! Everything runs in this process: the sim worker behind a real TCP gRPC socket, the gateway
//! on a real HTTP socket, and N clients (a task each), each keeping one streaming
//! `/v1/chat/completions` request open at a time (HTTP/1.1, keep-alive). By default all of
//! it shares one tokio runtime with as many threads as CPUs; with a [`CpuSplit`] the gateway
//! gets a runtime of its own pinned to its CPUs, the sim and the clients another on theirs,
//! so the load generator's own queueing for CPU is not counted as the gateway's. The sim records when it received each request and when it handed each token
//! to gRPC; clients record when each token's SSE event arrived. Then, per request:
//!
//! * added time to first token = (client's first token − client's send) − (sim's first token
//!   − sim's receipt): everything the gateway path adds (HTTP parse, template, tokenize,
//!   admission, routing, gRPC both ways, detokenize, SSE), but not the simulated prefill;
//! * added time per token = client's arrival of token i − sim's send of token i.
//!
//! The client's own parsing and the sim's gRPC encoding are counted as "added" too, and
//! without a split all three parts compete for the same cores, so these are upper bounds on
//! the gateway's share. Throughput is generated tokens received by all clients per second of
//! wall time.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use kt_proto::v1::worker_server::WorkerServer;

use crate::affinity::{self, CpuList};
use crate::error::GatewayError;
use crate::sim::{SimConfig, SimWorker};
use crate::{Gateway, GatewayConfig, ModelCard, WorkerEndpoint};

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Concurrent streams per level.
    pub concurrency: Vec<usize>,
    /// Tokens generated per request.
    pub tokens: u32,
    /// The sim's time between tokens of one stream.
    pub token_interval: Duration,
    /// The sim's time to the first token.
    pub first_token_delay: Duration,
    /// Wall time per level (clients start new requests until it is over).
    pub duration: Duration,
    /// Start the clients spread evenly over one request's duration (first-token delay +
    /// tokens × interval) instead of all at once, so requests arrive steadily rather than in
    /// waves of N every request's length. The level's wall time includes the spread.
    pub stagger: bool,
}

impl Default for BenchConfig {
    fn default() -> Self {
        Self {
            concurrency: vec![1, 64, 256],
            tokens: 64,
            token_interval: Duration::from_millis(5),
            first_token_delay: Duration::from_millis(0),
            duration: Duration::from_secs(5),
            stagger: false,
        }
    }
}

/// One level's numbers (latencies in µs).
#[derive(Debug, Clone)]
pub struct BenchRow {
    pub concurrency: usize,
    pub requests: usize,
    pub tokens: u64,
    pub wall_s: f64,
    pub tokens_per_s: f64,
    /// What one stream at the sim's rate would give × concurrency (the ceiling).
    pub offered_tokens_per_s: f64,
    pub ttft_added_p50_us: f64,
    pub ttft_added_p99_us: f64,
    pub token_added_p50_us: f64,
    pub token_added_p99_us: f64,
    /// Requests that failed (non-200 or an error event).
    pub errors: usize,
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[i.min(v.len() - 1)]
}

/// One request as the client saw it.
struct Seen {
    rid: String,
    sent: Instant,
    arrivals: Vec<Instant>,
}

async fn one_request(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    body: &Bytes,
) -> Option<Seen> {
    let req = hyper::Request::builder()
        .method("POST")
        .uri("/v1/chat/completions")
        .header("host", "bench")
        .header("content-type", "application/json")
        .body(Full::new(body.clone()))
        .ok()?;
    let sent = Instant::now();
    sender.ready().await.ok()?;
    let res = sender.send_request(req).await.ok()?;
    if res.status() != 200 {
        return None;
    }
    let rid = res.headers().get("x-request-id")?.to_str().ok()?.to_owned();
    let mut body = res.into_body();
    let mut arrivals = Vec::with_capacity(128);
    let mut carry = Vec::new();
    while let Some(frame) = body.frame().await {
        let now = Instant::now();
        let data = frame.ok()?.into_data().ok()?;
        carry.extend_from_slice(&data);
        // Count complete events carrying content; keep an incomplete tail.
        let mut start = 0;
        while let Some(pos) = carry[start..].windows(2).position(|w| w == b"\n\n") {
            let event = &carry[start..start + pos];
            if event.windows(12).any(|w| w == b"{\"content\":\"") {
                arrivals.push(now);
            }
            if event.windows(9).any(|w| w == b"\"error\":{") {
                return None;
            }
            start += pos + 2;
        }
        carry.drain(..start);
    }
    Some(Seen { rid, sent, arrivals })
}

async fn client(
    addr: SocketAddr,
    id: usize,
    start: Instant,
    until: Instant,
    tokens: u32,
) -> Vec<Seen> {
    let mut out = Vec::new();
    let Ok(stream) = tokio::net::TcpStream::connect(addr).await else { return out };
    let _ = stream.set_nodelay(true);
    let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    else {
        return out;
    };
    tokio::spawn(conn);
    tokio::time::sleep_until(start.into()).await;
    let mut k = 0;
    while Instant::now() < until {
        let body = serde_json::json!({
            "model": "bench",
            "messages": [{"role": "user", "content": format!("client {id} request {k}")}],
            "max_tokens": tokens, "temperature": 0, "stream": true,
        });
        k += 1;
        match one_request(&mut sender, &Bytes::from(body.to_string())).await {
            Some(s) => out.push(s),
            None => {
                out.push(Seen { rid: String::new(), sent: Instant::now(), arrivals: Vec::new() })
            }
        }
    }
    out
}

/// Which CPUs the gateway and the load generator (sim worker and clients) run on.
#[derive(Debug, Clone)]
pub struct CpuSplit {
    /// The gateway's runtime: one worker thread per CPU, every thread pinned to this list.
    pub gateway: CpuList,
    /// The sim's and the clients' runtime, likewise.
    pub load: CpuList,
}

/// A multi-thread runtime with `threads` workers; with `pin`, every thread it starts (workers
/// and blocking threads) is pinned to those CPUs, and the first failure is kept in `failed`.
fn runtime(
    name: &str,
    threads: usize,
    pin: Option<(CpuList, Arc<OnceLock<String>>)>,
) -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.worker_threads(threads.max(1)).thread_name(name).enable_all();
    if let Some((cpus, failed)) = pin {
        b.on_thread_start(move || {
            if let Err(e) = affinity::pin_current_thread(&cpus) {
                let _ = failed.set(format!("pinning a thread to CPUs {cpus}: {e}"));
            }
        });
    }
    b.build()
}

/// Starts the sim worker behind a TCP gRPC socket on the current runtime.
async fn start_sim(
    cfg: &BenchConfig,
    card: &ModelCard,
) -> std::io::Result<(SimWorker, SocketAddr)> {
    let mut sc = SimConfig::for_model(card);
    sc.max_context = 8192;
    sc.token_interval = cfg.token_interval;
    sc.first_token_delay = cfg.first_token_delay;
    sc.record_timeline = true;
    sc.kv_blocks_total = 1 << 20;
    let sim = SimWorker::new(sc);
    let wl = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let waddr = wl.local_addr()?;
    let server = WorkerServer::new(sim.clone());
    tokio::spawn(async move {
        let incoming =
            tokio_stream::StreamExt::map(tokio_stream::wrappers::TcpListenerStream::new(wl), |s| {
                s.inspect(|tcp| {
                    let _ = tcp.set_nodelay(true);
                })
            });
        let _ = tonic::transport::Server::builder()
            .add_service(server)
            .serve_with_incoming(incoming)
            .await;
    });
    Ok((sim, waddr))
}

/// Starts the gateway, with the worker at `waddr`, on an HTTP socket on the current runtime.
async fn start_gateway(
    card: ModelCard,
    waddr: SocketAddr,
    max_streams: usize,
) -> Result<SocketAddr, GatewayError> {
    let worker = WorkerEndpoint::connect_lazy(&waddr.to_string())
        .map_err(|e| GatewayError::Config { what: "bench worker".into(), reason: e.to_string() })?;
    let gcfg = GatewayConfig {
        max_running: max_streams * 2,
        max_queue: max_streams * 2,
        ..GatewayConfig::default()
    };
    let gateway = Gateway::new(gcfg, card, vec![worker])?;
    gateway.check_workers().await;
    let hl = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let haddr = hl.local_addr()?;
    tokio::spawn(gateway.serve(hl, std::future::pending()));
    Ok(haddr)
}

/// `n` clients, each on a task of its own, the `i`-th starting at `t0 + i × spread / n`,
/// until `until`.
async fn clients(
    addr: SocketAddr,
    n: usize,
    spread: Duration,
    until: Instant,
    tokens: u32,
) -> Vec<Seen> {
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let start = t0 + spread.mul_f64(i as f64 / n as f64);
            tokio::spawn(client(addr, i, start, until, tokens))
        })
        .collect();
    futures::future::join_all(tasks).await.into_iter().flatten().flatten().collect()
}

/// Runs the levels, calling `on_row` after each. Needs no tokio runtime (it makes its own:
/// one for everything, or with `split` one for the gateway and one for the load, each on its
/// CPUs).
pub fn run(
    cfg: &BenchConfig,
    split: Option<&CpuSplit>,
    mut on_row: impl FnMut(&BenchRow),
) -> Result<Vec<BenchRow>, GatewayError> {
    let pin_failed = Arc::new(OnceLock::<String>::new());
    let pinned = || match pin_failed.get() {
        Some(reason) => {
            Err(GatewayError::Config { what: "CPU pinning".into(), reason: reason.clone() })
        }
        None => Ok(()),
    };
    let (load_rt, gateway_rt) = match split {
        None => {
            let threads = std::thread::available_parallelism().map_or(2, usize::from);
            (runtime("kt-bench", threads, None)?, None)
        }
        Some(s) => {
            for (what, cpus) in [("gateway CPUs", &s.gateway), ("load CPUs", &s.load)] {
                cpus.check_allowed().map_err(|e| GatewayError::Config {
                    what: what.into(),
                    reason: e.to_string(),
                })?;
            }
            let pin = |cpus: &CpuList| Some((cpus.clone(), Arc::clone(&pin_failed)));
            let load = runtime("kt-bench-load", s.load.len(), pin(&s.load))?;
            let gateway = runtime("kt-bench-gateway", s.gateway.len(), pin(&s.gateway))?;
            (load, Some(gateway))
        }
    };
    let rows = load_rt.block_on(async {
        let mut card = ModelCard::embedded()?;
        card.name = "bench".into();
        let (sim, waddr) = start_sim(cfg, &card).await?;
        let max = cfg.concurrency.iter().copied().max().unwrap_or(1);
        let haddr = match &gateway_rt {
            None => start_gateway(card, waddr, max).await?,
            Some(rt) => rt.spawn(start_gateway(card, waddr, max)).await.map_err(|e| {
                GatewayError::Config { what: "bench gateway".into(), reason: e.to_string() }
            })??,
        };
        pinned()?;
        // Warm-up: connections, allocator, caches.
        let warm = Instant::now() + Duration::from_millis(300);
        let _ = clients(haddr, 8, Duration::ZERO, warm, 8).await;
        let spread = if cfg.stagger {
            cfg.first_token_delay + cfg.token_interval * cfg.tokens
        } else {
            Duration::ZERO
        };
        let mut rows = Vec::new();
        for &n in &cfg.concurrency {
            let t0 = Instant::now();
            let seen = clients(haddr, n, spread, t0 + cfg.duration, cfg.tokens).await;
            let wall_s = t0.elapsed().as_secs_f64();
            let row = summarize(&sim, n, seen, wall_s, cfg);
            on_row(&row);
            rows.push(row);
        }
        pinned()?;
        Ok(rows)
    });
    // The gateway's streams to the sim end with its runtime: stop the gateway first.
    drop(gateway_rt);
    rows
}

/// One level's row from what its clients saw and the sim's timelines.
fn summarize(
    sim: &SimWorker,
    n: usize,
    seen: Vec<Seen>,
    wall_s: f64,
    cfg: &BenchConfig,
) -> BenchRow {
    let mut ttft = Vec::new();
    let mut per_token = Vec::new();
    let (mut requests, mut tokens, mut errors) = (0usize, 0u64, 0usize);
    for s in seen {
        requests += 1;
        let timeline = sim.take_timeline(&s.rid);
        let (Some(tl), false) = (timeline, s.rid.is_empty()) else {
            errors += 1;
            continue;
        };
        if s.arrivals.len() != tl.tokens.len() || s.arrivals.is_empty() {
            errors += 1;
            continue;
        }
        tokens += s.arrivals.len() as u64;
        let client_ttft = s.arrivals[0].duration_since(s.sent).as_secs_f64();
        let sim_ttft = tl.tokens[0].duration_since(tl.received).as_secs_f64();
        ttft.push((client_ttft - sim_ttft) * 1e6);
        for (a, t) in s.arrivals.iter().zip(&tl.tokens) {
            per_token.push(a.saturating_duration_since(*t).as_secs_f64() * 1e6);
        }
    }
    BenchRow {
        concurrency: n,
        requests,
        tokens,
        wall_s,
        tokens_per_s: tokens as f64 / wall_s,
        offered_tokens_per_s: n as f64 / cfg.token_interval.as_secs_f64().max(1e-9),
        ttft_added_p50_us: pct(&mut ttft.clone(), 50.0),
        ttft_added_p99_us: pct(&mut ttft, 99.0),
        token_added_p50_us: pct(&mut per_token.clone(), 50.0),
        token_added_p99_us: pct(&mut per_token, 99.0),
        errors,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// A short run with the gateway and the load on runtimes of their own, pinned (both to the
    /// first CPU this process may use, so it runs anywhere): every request streams all its
    /// tokens and is matched to the sim's timeline.
    #[cfg(target_os = "linux")]
    #[test]
    fn split_runtimes_stream_every_token() {
        let first = affinity::allowed_cpus().unwrap().cpus()[0].to_string();
        let cpus = CpuList::parse(&first).unwrap();
        let split = CpuSplit { gateway: cpus.clone(), load: cpus };
        let cfg = BenchConfig {
            concurrency: vec![4],
            tokens: 8,
            token_interval: Duration::from_millis(1),
            duration: Duration::from_millis(300),
            ..BenchConfig::default()
        };
        let rows = run(&cfg, Some(&split), |_| {}).unwrap();
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!(r.errors, 0);
        assert!(r.requests >= 4);
        assert_eq!(r.tokens, r.requests as u64 * 8);
        assert!(r.ttft_added_p50_us.is_finite());
    }

    #[test]
    fn refuses_cpus_the_process_may_not_use() {
        let Some(allowed) = affinity::allowed_cpus() else { return };
        let Some(outside) = (0..1024).find(|c| !allowed.cpus().contains(c)) else { return };
        let split =
            CpuSplit { gateway: CpuList::parse(&outside.to_string()).unwrap(), load: allowed };
        let err = run(&BenchConfig::default(), Some(&split), |_| {}).unwrap_err();
        assert!(err.to_string().contains("not available"), "{err}");
    }
}
