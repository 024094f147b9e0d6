//! Prometheus metrics of an expert server, and the small HTTP endpoint that serves them
//! (`kt-expert --metrics ADDR`, `GET /metrics`, text exposition format 0.0.4).
//!
//! Counters are plain atomics updated on the hot path (a few relaxed adds per layer call);
//! rendering reads them without stopping anything.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::ExpertError;

/// Metric names (Prometheus conventions: `_total` counters, `_seconds`, `_bytes`).
pub mod names {
    /// Layer calls answered, by `transport` (`grpc`, `shm`).
    pub const REQUESTS: &str = "kt_expert_requests_total";
    /// Tokens (rows of hidden states) in the calls answered.
    pub const TOKENS: &str = "kt_expert_tokens_total";
    /// Calls answered with an error, by `code` (`invalid_argument`, `not_held`, `internal`),
    /// plus streams and rings that failed (`stream`, `shm_ring`).
    pub const ERRORS: &str = "kt_expert_errors_total";
    /// Time from a call's arrival (decoded) to its answer being computed, seconds.
    pub const LAYER_SECONDS: &str = "kt_expert_layer_seconds";
    /// Bytes of expert weights held.
    pub const BYTES_HELD: &str = "kt_expert_bytes_held";
    /// `Forward` streams open now.
    pub const STREAMS: &str = "kt_expert_streams";
    /// Shared-memory rings being served now.
    pub const SHM_RINGS: &str = "kt_expert_shm_rings";
}

/// Upper bounds of the latency histogram's buckets, seconds.
const BUCKETS: [f64; 18] = [
    10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 0.1,
    0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Transports a call can arrive on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Grpc,
    Shm,
}

/// Error classes counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidArgument,
    NotHeld,
    Internal,
    Stream,
    ShmRing,
}

const ERROR_KINDS: [(ErrorKind, &str); 5] = [
    (ErrorKind::InvalidArgument, "invalid_argument"),
    (ErrorKind::NotHeld, "not_held"),
    (ErrorKind::Internal, "internal"),
    (ErrorKind::Stream, "stream"),
    (ErrorKind::ShmRing, "shm_ring"),
];

/// The server's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: [AtomicU64; 2],
    tokens: AtomicU64,
    errors: [AtomicU64; 5],
    buckets: [AtomicU64; BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_ns: AtomicU64,
    bytes_held: AtomicU64,
    streams: AtomicI64,
    shm_rings: AtomicI64,
}

impl Metrics {
    /// A call of `tokens` rows answered (with output or error) after `took`.
    pub fn call(&self, via: Via, tokens: usize, took: Duration) {
        self.requests[via as usize].fetch_add(1, Ordering::Relaxed);
        self.tokens.fetch_add(tokens as u64, Ordering::Relaxed);
        let secs = took.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|&b| secs <= b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.latency_sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    pub fn error(&self, kind: ErrorKind) {
        self.errors[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn set_bytes_held(&self, bytes: u64) {
        self.bytes_held.store(bytes, Ordering::Relaxed);
    }

    pub(crate) fn streams(&self, delta: i64) {
        self.streams.fetch_add(delta, Ordering::Relaxed);
    }

    pub(crate) fn shm_rings(&self, delta: i64) {
        self.shm_rings.fetch_add(delta, Ordering::Relaxed);
    }

    /// Calls answered so far over `via`.
    pub fn requests(&self, via: Via) -> u64 {
        self.requests[via as usize].load(Ordering::Relaxed)
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut s = String::with_capacity(4096);
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let _ = writeln!(s, "# HELP {} Layer calls answered.", names::REQUESTS);
        let _ = writeln!(s, "# TYPE {} counter", names::REQUESTS);
        for (via, name) in [(Via::Grpc, "grpc"), (Via::Shm, "shm")] {
            let _ = writeln!(
                s,
                "{}{{transport=\"{name}\"}} {}",
                names::REQUESTS,
                ld(&self.requests[via as usize])
            );
        }
        let _ = writeln!(s, "# HELP {} Tokens in the layer calls answered.", names::TOKENS);
        let _ = writeln!(s, "# TYPE {} counter", names::TOKENS);
        let _ = writeln!(s, "{} {}", names::TOKENS, ld(&self.tokens));
        let _ = writeln!(s, "# HELP {} Calls, streams and rings that failed.", names::ERRORS);
        let _ = writeln!(s, "# TYPE {} counter", names::ERRORS);
        for (kind, name) in ERROR_KINDS {
            let _ = writeln!(
                s,
                "{}{{code=\"{name}\"}} {}",
                names::ERRORS,
                ld(&self.errors[kind as usize])
            );
        }
        let h = names::LAYER_SECONDS;
        let _ = writeln!(s, "# HELP {h} Time to compute one layer call, seconds.");
        let _ = writeln!(s, "# TYPE {h} histogram");
        let mut cum = 0;
        for (b, c) in BUCKETS.iter().zip(&self.buckets) {
            cum += ld(c);
            let _ = writeln!(s, "{h}_bucket{{le=\"{b}\"}} {cum}");
        }
        let count = ld(&self.latency_count);
        let _ = writeln!(s, "{h}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(s, "{h}_sum {}", ld(&self.latency_sum_ns) as f64 / 1e9);
        let _ = writeln!(s, "{h}_count {count}");
        let gauges = [
            (names::BYTES_HELD, "Bytes of expert weights held.", ld(&self.bytes_held) as i64),
            (names::STREAMS, "Forward streams open.", self.streams.load(Ordering::Relaxed)),
            (
                names::SHM_RINGS,
                "Shared-memory rings served.",
                self.shm_rings.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(s, "# HELP {name} {help}");
            let _ = writeln!(s, "# TYPE {name} gauge");
            let _ = writeln!(s, "{name} {v}");
        }
        s
    }
}

/// Largest request head read before answering.
const MAX_HEAD: usize = 8 << 10;

/// Serves `GET /metrics` on `listener` until `shutdown` completes. Anything else gets 404 (or
/// 400/405); a slow or broken client is dropped after a few seconds.
pub async fn serve_metrics(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ExpertError> {
    tokio::pin!(shutdown);
    loop {
        let (mut sock, _) = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            r = listener.accept() => r?,
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let work = async {
                let mut head = Vec::with_capacity(512);
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
                    let got = sock.read(&mut buf).await?;
                    if got == 0 {
                        return Ok::<_, std::io::Error>(());
                    }
                    head.extend_from_slice(&buf[..got]);
                }
                let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
                let line = String::from_utf8_lossy(line);
                let mut parts = line.split(' ');
                let (status, body) = match (parts.next(), parts.next()) {
                    (Some("GET"), Some("/metrics")) => ("200 OK", metrics.render()),
                    (Some("GET"), Some(_)) => ("404 Not Found", "not found; try /metrics\n".into()),
                    (Some(_), Some(_)) => ("405 Method Not Allowed", "GET only\n".into()),
                    _ => ("400 Bad Request", "bad request\n".into()),
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                sock.write_all(resp.as_bytes()).await?;
                sock.shutdown().await
            };
            if let Ok(Err(err)) = tokio::time::timeout(Duration::from_secs(5), work).await {
                tracing::debug!(%err, "metrics request failed");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn render_counts_and_buckets() {
        let m = Metrics::default();
        m.call(Via::Shm, 3, Duration::from_micros(30));
        m.call(Via::Grpc, 1, Duration::from_millis(3));
        m.error(ErrorKind::NotHeld);
        m.set_bytes_held(1234);
        let text = m.render();
        for line in [
            "kt_expert_requests_total{transport=\"grpc\"} 1",
            "kt_expert_requests_total{transport=\"shm\"} 1",
            "kt_expert_tokens_total 4",
            "kt_expert_errors_total{code=\"not_held\"} 1",
            "kt_expert_layer_seconds_bucket{le=\"0.00005\"} 1",
            "kt_expert_layer_seconds_bucket{le=\"0.005\"} 2",
            "kt_expert_layer_seconds_bucket{le=\"+Inf\"} 2",
            "kt_expert_layer_seconds_count 2",
            "kt_expert_bytes_held 1234",
        ] {
            assert!(text.lines().any(|l| l == line), "missing `{line}` in\n{text}");
        }
    }
}
