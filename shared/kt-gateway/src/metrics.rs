//! Prometheus metrics in the text exposition format, kept with atomics (no registry crate):
//! the names are in [`crate::names::metrics`].

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::names::metrics as n;

/// Latency buckets in seconds (upper bounds; `+Inf` is implied).
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// A histogram with fixed [`BUCKETS`].
#[derive(Debug)]
pub struct Histogram {
    counts: Vec<AtomicU64>,
    /// Sum of observations in nanoseconds.
    sum_ns: AtomicU64,
    count: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: BUCKETS.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn observe(&self, seconds: f64) {
        if let Some(i) = BUCKETS.iter().position(|&b| seconds <= b) {
            if let Some(c) = self.counts.get(i) {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_ns.fetch_add((seconds.max(0.0) * 1e9) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cum = 0;
        for (b, c) in BUCKETS.iter().zip(&self.counts) {
            cum += c.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cum}");
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// Everything the gateway counts.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    rejected: Mutex<BTreeMap<&'static str, u64>>,
    pub ttft: Histogram,
    pub tpot: Histogram,
    pub duration: Histogram,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
}

/// Per-worker numbers the pool reports at scrape time.
#[derive(Debug, Clone)]
pub struct WorkerGauges {
    pub name: String,
    pub healthy: bool,
    pub outstanding_tokens: i64,
    pub requests_total: u64,
    pub kv_blocks_free: Option<u32>,
}

/// Escapes a label value.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Metrics {
    pub fn count_request(&self, route: &str, status: u16) {
        *lock(&self.requests).entry((route.to_owned(), status)).or_insert(0) += 1;
    }

    pub fn count_rejected(&self, reason: &'static str) {
        *lock(&self.rejected).entry(reason).or_insert(0) += 1;
    }

    /// Requests counted for `route` with `status` (for tests).
    pub fn requests(&self, route: &str, status: u16) -> u64 {
        lock(&self.requests).get(&(route.to_owned(), status)).copied().unwrap_or(0)
    }

    /// The text exposition of every metric.
    pub fn render(&self, queue_depth: usize, running: usize, workers: &[WorkerGauges]) -> String {
        let mut out = String::with_capacity(4096);
        let _ = writeln!(
            out,
            "# HELP {0} HTTP requests by route and status.\n# TYPE {0} counter",
            n::REQUESTS_TOTAL
        );
        for ((route, status), v) in lock(&self.requests).iter() {
            let _ = writeln!(
                out,
                "{}{{route=\"{}\",status=\"{status}\"}} {v}",
                n::REQUESTS_TOTAL,
                esc(route)
            );
        }
        let _ = writeln!(
            out,
            "# HELP {0} Requests refused by admission, by reason.\n# TYPE {0} counter",
            n::REJECTED_TOTAL
        );
        for (reason, v) in lock(&self.rejected).iter() {
            let _ = writeln!(out, "{}{{reason=\"{reason}\"}} {v}", n::REJECTED_TOTAL);
        }
        self.ttft.render(
            &mut out,
            n::TIME_TO_FIRST_TOKEN_SECONDS,
            "Request arrival to the first generated text leaving the gateway.",
        );
        self.tpot.render(
            &mut out,
            n::TIME_PER_OUTPUT_TOKEN_SECONDS,
            "Time between consecutive generated tokens of a sequence.",
        );
        self.duration.render(
            &mut out,
            n::REQUEST_DURATION_SECONDS,
            "Generation requests, arrival to the last event.",
        );
        let gauges: [(&str, &str, &str, u64); 4] = [
            (n::QUEUE_DEPTH, "gauge", "Requests waiting for admission.", queue_depth as u64),
            (n::RUNNING, "gauge", "Admitted generations.", running as u64),
            (
                n::PROMPT_TOKENS_TOTAL,
                "counter",
                "Prompt tokens sent to workers.",
                self.prompt_tokens.load(Ordering::Relaxed),
            ),
            (
                n::COMPLETION_TOKENS_TOTAL,
                "counter",
                "Generated tokens received from workers.",
                self.completion_tokens.load(Ordering::Relaxed),
            ),
        ];
        for (name, ty, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {ty}\n{name} {v}");
        }
        let per_worker: [(&str, &str, &str); 4] = [
            (n::WORKER_HEALTHY, "gauge", "1 while the worker passes health checks."),
            (n::WORKER_OUTSTANDING_TOKENS, "gauge", "Tokens the worker is expected to process."),
            (n::WORKER_REQUESTS_TOTAL, "counter", "Generations routed to the worker."),
            (n::WORKER_KV_BLOCKS_FREE, "gauge", "Free KV-cache blocks the worker last reported."),
        ];
        for (name, ty, help) in per_worker {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {ty}");
            for w in workers {
                let v = match name {
                    n::WORKER_HEALTHY => i64::from(w.healthy),
                    n::WORKER_OUTSTANDING_TOKENS => w.outstanding_tokens,
                    n::WORKER_REQUESTS_TOTAL => w.requests_total as i64,
                    _ => match w.kv_blocks_free {
                        Some(f) => i64::from(f),
                        None => continue,
                    },
                };
                let _ = writeln!(out, "{name}{{worker=\"{}\"}} {v}", esc(&w.name));
            }
        }
        out
    }
}
