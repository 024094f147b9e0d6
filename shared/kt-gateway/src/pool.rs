//! The workers behind the gateway: routing by load with prefix affinity, and health checks
//! that take a dead worker out and bring it back.
//!
//! # Load
//! A worker's load is the number of tokens the gateway expects it still to process: for each
//! live sequence routed to it, the prompt plus the part of the token budget not generated yet
//! (decremented as tokens arrive), plus `waiting × 256` for sequences its last `Info` says are
//! waiting for admission. A worker whose last `Info` reports no free KV blocks counts as loaded
//! by one more full context.
//!
//! # Prefix affinity
//! Prompts are cut into blocks of [`RoutingConfig::affinity_block_tokens`]; the hash of every
//! whole-block prefix maps to the worker that last served it (a bounded table, oldest entries
//! dropped first). A new request goes to the worker of its longest known prefix — whose KV
//! cache is likely to hold that prefix — unless that worker's load exceeds the least loaded
//! worker's by more than [`RoutingConfig::affinity_slack_tokens`]; then to the least loaded.
//!
//! # Health
//! Every [`RoutingConfig::health_interval`] each worker gets `Health` and `Info` calls with a
//! [`RoutingConfig::health_timeout`]; a failed call, `NOT_SERVING` or two timeouts in a row
//! take it out of routing, the next success brings it back. A `Generate` that fails at the transport level takes the
//! worker out at once (the request is retried on another worker if no token was sent yet).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kt_proto::v1::health_response::Status as HealthStatus;
use kt_proto::v1::worker_client::WorkerClient;
use kt_proto::v1::{HealthRequest, WorkerInfo, WorkerInfoRequest};
use tonic::transport::Channel;

use crate::metrics::WorkerGauges;

/// A worker as the gateway is given it: a name (for logs and metrics) and a gRPC channel
/// (TCP from [`WorkerEndpoint::connect_lazy`], or in-process from
/// [`crate::in_process_channel`]).
#[derive(Debug, Clone)]
pub struct WorkerEndpoint {
    pub name: String,
    pub channel: Channel,
}

impl WorkerEndpoint {
    /// A lazily connecting channel to `addr` (`host:port` or `http://host:port`); connection
    /// failures show up as failed health checks, and the channel reconnects by itself.
    pub fn connect_lazy(addr: &str) -> Result<Self, tonic::transport::Error> {
        let uri = if addr.contains("://") { addr.to_owned() } else { format!("http://{addr}") };
        let channel = tonic::transport::Endpoint::from_shared(uri)?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .connect_lazy();
        Ok(Self { name: addr.to_owned(), channel })
    }
}

/// Routing and health-check settings.
#[derive(Debug, Clone)]
pub struct RoutingConfig {
    /// Block size of prefix hashing, in tokens. Default 64.
    pub affinity_block_tokens: usize,
    /// How much more loaded (tokens) the affine worker may be than the least loaded one.
    /// Default 8192.
    pub affinity_slack_tokens: i64,
    /// Prefix hashes remembered. Default 65536.
    pub affinity_capacity: usize,
    /// Time between health checks. Default 2 s.
    pub health_interval: Duration,
    /// Deadline of one health check. Default 1 s.
    pub health_timeout: Duration,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            affinity_block_tokens: 64,
            affinity_slack_tokens: 8192,
            affinity_capacity: 65536,
            health_interval: Duration::from_secs(2),
            health_timeout: Duration::from_secs(1),
        }
    }
}

/// One worker's state.
#[derive(Debug)]
pub(crate) struct Slot {
    pub index: usize,
    pub name: String,
    pub client: WorkerClient<Channel>,
    healthy: AtomicBool,
    /// Health checks that timed out in a row.
    timeouts: std::sync::atomic::AtomicU32,
    outstanding: AtomicI64,
    requests: AtomicU64,
    info: Mutex<Option<WorkerInfo>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Slot {
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::SeqCst)
    }

    pub fn info(&self) -> Option<WorkerInfo> {
        lock(&self.info).clone()
    }

    fn load(&self) -> i64 {
        let mut load = self.outstanding.load(Ordering::SeqCst);
        if let Some(info) = lock(&self.info).as_ref() {
            load += i64::from(info.waiting) * 256;
            if info.kv_blocks_total > 0 && info.kv_blocks_free == 0 {
                load += i64::from(info.max_context);
            }
        }
        load
    }

    fn set_healthy(&self, healthy: bool, why: &str) {
        let was = self.healthy.swap(healthy, Ordering::SeqCst);
        if was != healthy {
            if healthy {
                tracing::info!(worker = %self.name, "worker is back in routing");
            } else {
                tracing::warn!(worker = %self.name, reason = why, "worker taken out of routing");
            }
        }
    }
}

/// A routed request's claim on a worker's load; gives it back on drop.
#[derive(Debug)]
pub(crate) struct Lease {
    pub slot: Arc<Slot>,
    remaining: i64,
}

impl Lease {
    /// `n` more tokens were processed.
    pub fn consumed(&mut self, n: i64) {
        let n = n.min(self.remaining);
        self.remaining -= n;
        self.slot.outstanding.fetch_sub(n, Ordering::SeqCst);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.slot.outstanding.fetch_sub(self.remaining, Ordering::SeqCst);
    }
}

#[derive(Debug, Default)]
struct Affinity {
    map: HashMap<u64, usize>,
    order: VecDeque<u64>,
}

/// The workers and the routing table.
#[derive(Debug)]
pub(crate) struct Pool {
    slots: Vec<Arc<Slot>>,
    affinity: Mutex<Affinity>,
    cfg: RoutingConfig,
}

/// Hashes of every whole-block prefix of `prompt`, shortest first.
fn prefix_hashes(prompt: &[u32], block: usize) -> Vec<u64> {
    let block = block.max(1);
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut out = Vec::with_capacity(prompt.len() / block);
    for (i, &id) in prompt.iter().enumerate() {
        for b in id.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100_0000_01b3);
        }
        if (i + 1) % block == 0 {
            out.push(h);
        }
    }
    out
}

impl Pool {
    pub fn new(endpoints: Vec<WorkerEndpoint>, cfg: RoutingConfig) -> Self {
        let slots = endpoints
            .into_iter()
            .enumerate()
            .map(|(index, e)| {
                Arc::new(Slot {
                    index,
                    name: e.name,
                    client: WorkerClient::new(e.channel)
                        .max_decoding_message_size(64 << 20)
                        .max_encoding_message_size(64 << 20),
                    // Optimistic until the first check says otherwise.
                    healthy: AtomicBool::new(true),
                    timeouts: std::sync::atomic::AtomicU32::new(0),
                    outstanding: AtomicI64::new(0),
                    requests: AtomicU64::new(0),
                    info: Mutex::new(None),
                })
            })
            .collect();
        Self { slots, affinity: Mutex::new(Affinity::default()), cfg }
    }

    pub fn slots(&self) -> &[Arc<Slot>] {
        &self.slots
    }

    pub fn healthy_count(&self) -> usize {
        self.slots.iter().filter(|s| s.is_healthy()).count()
    }

    /// The smallest context length the workers last reported (healthy or not: it is a fact
    /// of the model, and a worker that is briefly out must not change what requests may ask).
    pub fn max_context(&self) -> Option<u32> {
        self.slots.iter().filter_map(|s| s.info().map(|i| i.max_context)).filter(|&c| c > 0).min()
    }

    /// Chooses a worker for `prompt` expected to cost `cost` tokens, skipping `exclude`.
    pub fn pick(&self, prompt: &[u32], cost: i64, exclude: &[usize]) -> Option<Lease> {
        let candidates: Vec<&Arc<Slot>> =
            self.slots.iter().filter(|s| s.is_healthy() && !exclude.contains(&s.index)).collect();
        let least =
            candidates.iter().min_by_key(|s| (s.load(), s.requests.load(Ordering::SeqCst)))?;
        let least_load = least.load();
        let hashes = prefix_hashes(prompt, self.cfg.affinity_block_tokens);
        let mut table = lock(&self.affinity);
        let affine = hashes.iter().rev().find_map(|h| {
            let i = *table.map.get(h)?;
            candidates
                .iter()
                .find(|s| s.index == i && s.load() <= least_load + self.cfg.affinity_slack_tokens)
        });
        let chosen = Arc::clone(affine.unwrap_or(least));
        for h in hashes {
            if table.map.insert(h, chosen.index).is_none() {
                table.order.push_back(h);
            }
        }
        while table.order.len() > self.cfg.affinity_capacity {
            if let Some(old) = table.order.pop_front() {
                table.map.remove(&old);
            }
        }
        drop(table);
        chosen.outstanding.fetch_add(cost, Ordering::SeqCst);
        chosen.requests.fetch_add(1, Ordering::SeqCst);
        Some(Lease { slot: chosen, remaining: cost })
    }

    /// Takes a worker out after a failed call.
    pub fn mark_down(&self, slot: &Slot, why: &str) {
        slot.set_healthy(false, why);
    }

    /// One round of health checks, all workers at once.
    pub async fn check_all(&self) {
        let checks = self.slots.iter().map(|s| self.check(s));
        futures::future::join_all(checks).await;
    }

    async fn check(&self, slot: &Slot) {
        let mut client = slot.client.clone();
        let t = self.cfg.health_timeout;
        let t0 = std::time::Instant::now();
        let health = tokio::time::timeout(t, client.health(HealthRequest {})).await;
        tracing::debug!(worker = %slot.name, elapsed = ?t0.elapsed(), ok = matches!(health, Ok(Ok(_))), "health check");
        let serving = match health {
            Ok(Ok(r)) => {
                let r = r.into_inner();
                if r.status == HealthStatus::Serving as i32 {
                    Ok(())
                } else {
                    Err(format!("not serving: {}", r.message))
                }
            }
            Ok(Err(status)) => Err(format!("health check failed: {}", status.message())),
            Err(_) => {
                // One slow answer on a busy host is not a dead worker: two in a row are.
                if slot.timeouts.fetch_add(1, Ordering::SeqCst) + 1 < 2 {
                    return;
                }
                Err(format!("health check timed out twice after {t:?}"))
            }
        };
        if let Err(why) = serving {
            slot.set_healthy(false, &why);
            return;
        }
        match tokio::time::timeout(t, client.info(WorkerInfoRequest {})).await {
            Ok(Ok(info)) => {
                slot.timeouts.store(0, Ordering::SeqCst);
                *lock(&slot.info) = Some(info.into_inner());
                slot.set_healthy(true, "");
            }
            Ok(Err(status)) => {
                slot.set_healthy(false, &format!("info failed: {}", status.message()))
            }
            Err(_) => slot.set_healthy(false, "info timed out"),
        }
    }

    /// Runs health checks forever (spawned by the gateway).
    pub async fn health_loop(self: Arc<Self>) {
        loop {
            self.check_all().await;
            tokio::time::sleep(self.cfg.health_interval).await;
        }
    }

    pub fn gauges(&self) -> Vec<WorkerGauges> {
        self.slots
            .iter()
            .map(|s| WorkerGauges {
                name: s.name.clone(),
                healthy: s.is_healthy(),
                outstanding_tokens: s.outstanding.load(Ordering::SeqCst),
                requests_total: s.requests.load(Ordering::SeqCst),
                kv_blocks_free: s.info().map(|i| i.kv_blocks_free),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(n: usize) -> Pool {
        let eps = (0..n)
            .map(|i| WorkerEndpoint {
                name: format!("w{i}"),
                channel: tonic::transport::Endpoint::from_static("http://127.0.0.1:1")
                    .connect_lazy(),
            })
            .collect();
        Pool::new(
            eps,
            RoutingConfig {
                affinity_block_tokens: 4,
                affinity_slack_tokens: 100,
                ..Default::default()
            },
        )
    }

    #[tokio::test]
    async fn spreads_by_load_and_keeps_prefix_affinity() {
        let p = pool(2);
        let a: Vec<u32> = (0..16).collect();
        let b: Vec<u32> = (100..116).collect();
        let la = p.pick(&a, 50, &[]).unwrap();
        let lb = p.pick(&b, 50, &[]).unwrap();
        assert_ne!(la.slot.index, lb.slot.index, "second request goes to the idle worker");
        // The same conversation, longer: same worker while within the slack.
        let mut a2 = a.clone();
        a2.extend(200..208);
        let la2 = p.pick(&a2, 10, &[]).unwrap();
        assert_eq!(la2.slot.index, la.slot.index);
        // Overloaded: affinity gives way.
        let heavy = p.pick(&(300..304).collect::<Vec<_>>(), 1000, &[lb.slot.index]).unwrap();
        assert_eq!(heavy.slot.index, la.slot.index);
        let la3 = p.pick(&a2, 10, &[]).unwrap();
        assert_eq!(la3.slot.index, lb.slot.index);
        drop((la, lb, la2, heavy, la3));
        assert!(p.slots().iter().all(|s| s.outstanding.load(Ordering::SeqCst) == 0));
        // Unhealthy workers are skipped.
        p.mark_down(&p.slots()[0], "test");
        assert!((0..4).all(|_| p.pick(&a, 1, &[]).unwrap().slot.index == 1));
        p.mark_down(&p.slots()[1], "test");
        assert!(p.pick(&a, 1, &[]).is_none());
    }
}
