//! `kt bench transport`: the round-trip time of one MoE-layer hop over each transport.
//!
//! One hop is what a worker's MoE layer does per call at the expert seam: hidden states
//! `[n × hidden]` plus top-k expert ids and weights `[n × k]` go out, the weighted expert sum
//! `[n × hidden]` comes back. Behind every transport sits the same stand-in, [`NullExperts`],
//! which answers zeros at once, so the numbers are the transport's alone, not expert compute.
//!
//! Transports measured:
//! * [`Transport::InProcess`]: a call through `Arc<dyn Experts>` (the floor: one virtual call
//!   and the answer's allocation).
//! * [`Transport::Shm`]: [`RemoteExperts::forward`] through a shared-memory ring to an
//!   [`ExpertService`] in the same process (the ring, its polling thread, the compute pool
//!   hand-off and back; the bytes are copied and converted as between two processes).
//! * [`Transport::Grpc`]: [`RemoteExperts::forward`] over one long-lived `Forward` stream to an
//!   [`ExpertService`] on 127.0.0.1 (encode, HTTP/2 over loopback TCP, decode, the server's
//!   compute pool hand-off, and back).

use std::sync::Arc;
use std::time::Instant;

use kt_models::{Experts, ModelError, Routing};
use kt_proto::v1::{LayerExperts, ModelIdentity};
use kt_proto::{Limits, WireDType};

use crate::{
    ExpertError, ExpertService, LinkKind, RemoteExperts, RemoteOptions, ServerHandle,
    ServerOptions, ShmMode,
};

/// Bytes moved per case (both ways) that sizes the default number of iterations.
const BYTES_PER_CASE: usize = 2 << 30;
/// Bounds of the default number of measured hops per case.
const MIN_ITERS: usize = 100;
const MAX_ITERS: usize = 2000;

/// A transport to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    InProcess,
    Shm,
    Grpc,
}

impl Transport {
    /// Every transport that exists.
    pub const ALL: [Transport; 3] = [Transport::InProcess, Transport::Shm, Transport::Grpc];

    pub fn name(self) -> &'static str {
        match self {
            Transport::InProcess => "in-process",
            Transport::Shm => "shm",
            Transport::Grpc => "grpc",
        }
    }

    /// By [`Transport::name`].
    pub fn parse(name: &str) -> Option<Transport> {
        Transport::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Hidden sizes (elements per token row).
    pub hiddens: Vec<usize>,
    /// Tokens per hop (`n`).
    pub tokens: Vec<usize>,
    /// Measured hops per case; `None` sizes it by the payload (100 to 2000 hops, about 2 GiB
    /// moved per case).
    pub iters: Option<usize>,
    /// Element type of hidden states on the wire (gRPC); in process they stay f32.
    pub dtype: WireDType,
    /// Experts per token.
    pub top_k: usize,
    /// Routed experts per layer (bounds the ids).
    pub n_experts: usize,
    /// Where the shared-memory transport makes its ring.
    pub shm_dir: std::path::PathBuf,
    /// How long either side of the ring spins before backing off.
    pub shm_spin: std::time::Duration,
    /// The server's [`ServerOptions::answer_spin`].
    pub answer_spin: std::time::Duration,
}

impl Default for BenchConfig {
    fn default() -> Self {
        Self {
            hiddens: vec![2048, 7168],
            tokens: vec![1, 16, 512],
            iters: None,
            dtype: WireDType::Bf16,
            top_k: 8,
            n_experts: 256,
            shm_dir: crate::DEFAULT_SHM_DIR.into(),
            shm_spin: std::time::Duration::ZERO,
            answer_spin: crate::DEFAULT_ANSWER_SPIN,
        }
    }
}

impl BenchConfig {
    /// Hops measured for `n` tokens at `hidden` (warm-up hops come on top).
    pub fn iters_for(&self, n: usize, hidden: usize) -> usize {
        self.iters.unwrap_or_else(|| {
            let bytes = 2 * n * hidden * dtype_size(self.dtype) + 8 * n * self.top_k;
            (BYTES_PER_CASE / bytes.max(1)).clamp(MIN_ITERS, MAX_ITERS)
        })
    }
}

/// Unmeasured hops before measuring: connections open, buffers and caches warm.
pub fn warmup_for(iters: usize) -> usize {
    (iters / 5).clamp(5, 200)
}

fn dtype_size(dtype: WireDType) -> usize {
    match dtype {
        WireDType::F32 => 4,
        WireDType::Bf16 => 2,
    }
}

/// Summary of one case's hop times, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub iters: usize,
    pub mean_us: f64,
    pub min_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

impl Stats {
    /// Nearest-rank percentiles of `samples_us` (sorted in place); `None` when empty.
    pub fn from_samples(samples_us: &mut [f64]) -> Option<Self> {
        samples_us.sort_by(f64::total_cmp);
        let n = samples_us.len();
        let rank = |p: usize| samples_us[(p * n).div_ceil(100).clamp(1, n) - 1];
        Some(Self {
            iters: n,
            mean_us: samples_us.iter().sum::<f64>() / n as f64,
            min_us: *samples_us.first()?,
            p50_us: rank(50),
            p99_us: rank(99),
            max_us: *samples_us.last()?,
        })
    }
}

/// One (transport, n, hidden) case.
#[derive(Debug, Clone)]
pub struct Measurement {
    pub transport: Transport,
    pub tokens: usize,
    pub hidden: usize,
    /// The wire dtype; `None` in process (f32 slices, nothing encoded).
    pub dtype: Option<WireDType>,
    /// Payload bytes of one request (hidden states + ids + weights) and of one answer, on the
    /// wire before framing; 0 in process.
    pub bytes_out: usize,
    pub bytes_back: usize,
    pub stats: Stats,
}

/// Routed experts that answer zeros at once: the transport is all that is left to time.
#[derive(Debug, Clone, Copy)]
pub struct NullExperts {
    pub hidden: usize,
}

impl Experts for NullExperts {
    fn forward(
        &self,
        _layer: usize,
        hidden: &[f32],
        routing: &Routing,
    ) -> Result<Vec<f32>, ModelError> {
        let h = self.hidden;
        let n = hidden.len().checked_div(h).unwrap_or(0);
        if n * h != hidden.len() || routing.ids.len() != n * routing.k {
            return Err(ModelError::Input(format!(
                "{} values and {} ids are not {n} rows of {h} with top-{}",
                hidden.len(),
                routing.ids.len(),
                routing.k
            )));
        }
        Ok(vec![0.0; hidden.len()])
    }
}

/// The model identity the benchmark's server and client agree on.
fn bench_identity(cfg: &BenchConfig, hidden: usize) -> ModelIdentity {
    ModelIdentity {
        name: "kt-bench-transport".into(),
        arch: "bench".into(),
        config_hash: 0x6b74_6265_6e63_6800 | hidden as u64 & 0xff,
        hidden: hidden as u32,
        n_layers: 1,
        n_experts: cfg.n_experts as u32,
        top_k: cfg.top_k as u32,
    }
}

/// Deterministic finite inputs for `n` tokens: hidden states in [-1, 1) and a spread of ids.
fn inputs(cfg: &BenchConfig, n: usize, hidden: usize) -> (Vec<f32>, Routing) {
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let values = (0..n * hidden)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    let k = cfg.top_k;
    let ids = (0..n * k).map(|i| ((i * 37 + i / k) % cfg.n_experts.max(1)) as u32).collect();
    let weights = vec![1.0 / k as f32; n * k];
    (values, Routing { k, ids, weights })
}

fn time_hops(
    experts: &dyn Experts,
    hidden: &[f32],
    routing: &Routing,
    iters: usize,
) -> Result<Stats, ExpertError> {
    for _ in 0..warmup_for(iters) {
        experts.forward(0, hidden, routing)?;
    }
    let mut samples = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        let out = experts.forward(0, hidden, routing)?;
        samples.push(t.elapsed().as_secs_f64() * 1e6);
        drop(out);
    }
    Stats::from_samples(&mut samples)
        .ok_or_else(|| ExpertError::Bench("no hops measured (--iters 0?)".into()))
}

/// A client and its bench server on 127.0.0.1 serving [`NullExperts`] at `hidden` (in that
/// order, so the client goes first on drop and its stream ends quietly), over gRPC only or
/// with a shared-memory ring (required: no silent fallback).
fn pair(
    cfg: &BenchConfig,
    hidden: usize,
    shm: bool,
) -> Result<(RemoteExperts, ServerHandle), ExpertError> {
    let model = bench_identity(cfg, hidden);
    let max_tokens = cfg.tokens.iter().copied().max().unwrap_or(1);
    let defaults = Limits::default();
    let need = max_tokens * (hidden * 4 + cfg.top_k * 8) + (64 << 10);
    let limits = Limits {
        max_tokens: defaults.max_tokens.max(max_tokens),
        max_message_bytes: defaults.max_message_bytes.max(need),
    };
    let held =
        vec![LayerExperts { layer: 0, experts: (0..cfg.n_experts as u32).collect::<Vec<_>>() }];
    let opts = ServerOptions {
        name: "bench".into(),
        threads: Some(1),
        limits,
        shm_dir: shm.then(|| cfg.shm_dir.clone()),
        shm_spin: cfg.shm_spin,
        answer_spin: cfg.answer_spin,
        ..ServerOptions::default()
    };
    let service =
        ExpertService::with_experts(Arc::new(NullExperts { hidden }), model.clone(), held, opts)?;
    let server = ServerHandle::start(service, "127.0.0.1:0")?;
    let client = RemoteExperts::connect(
        &server.addr().to_string(),
        &model,
        RemoteOptions {
            dtype: cfg.dtype,
            max_message_bytes: limits.max_message_bytes,
            shm: if shm { ShmMode::Required } else { ShmMode::Off },
            shm_dir: cfg.shm_dir.clone(),
            shm_slots: 1,
            shm_max_tokens: max_tokens,
            shm_spin: cfg.shm_spin,
            ..RemoteOptions::default()
        },
    )?;
    let want = if shm { LinkKind::Shm } else { LinkKind::Grpc };
    if client.transport() != Some(want) {
        return Err(ExpertError::Bench(format!(
            "the {want:?} link did not come up: {:?}",
            client.shm_note()
        )));
    }
    Ok((client, server))
}

/// Measures every case of `cfg` over `transports`, hidden size by hidden size, then tokens,
/// then transport. `each` sees every measurement as it is made (progress output).
pub fn run(
    cfg: &BenchConfig,
    transports: &[Transport],
    mut each: impl FnMut(&Measurement),
) -> Result<Vec<Measurement>, ExpertError> {
    if cfg.top_k == 0 || cfg.top_k > cfg.n_experts {
        return Err(ExpertError::Bench(format!(
            "top-{} of {} experts is not a routing",
            cfg.top_k, cfg.n_experts
        )));
    }
    let mut out = Vec::new();
    for &hidden in &cfg.hiddens {
        if hidden == 0 {
            return Err(ExpertError::Bench("hidden size 0".into()));
        }
        let local: Arc<dyn Experts> = Arc::new(NullExperts { hidden });
        let grpc = if transports.contains(&Transport::Grpc) {
            Some(pair(cfg, hidden, false)?)
        } else {
            None
        };
        let shm = if transports.contains(&Transport::Shm) {
            Some(pair(cfg, hidden, true)?)
        } else {
            None
        };
        for &n in &cfg.tokens {
            if n == 0 {
                return Err(ExpertError::Bench("0 tokens per hop".into()));
            }
            let (values, routing) = inputs(cfg, n, hidden);
            let iters = cfg.iters_for(n, hidden);
            for &t in transports {
                let (experts, dtype): (&dyn Experts, _) = match (t, &grpc, &shm) {
                    (Transport::InProcess, _, _) => (local.as_ref(), None),
                    (Transport::Grpc, Some((client, _)), _) => (client, Some(cfg.dtype)),
                    (Transport::Shm, _, Some((client, _))) => (client, Some(cfg.dtype)),
                    (Transport::Grpc | Transport::Shm, _, _) => continue,
                };
                let stats = time_hops(experts, &values, &routing, iters)?;
                let (bytes_out, bytes_back) = match dtype {
                    Some(d) => {
                        let rows = n * hidden * dtype_size(d);
                        (rows + n * cfg.top_k * 8, rows)
                    }
                    None => (0, 0),
                };
                let m = Measurement {
                    transport: t,
                    tokens: n,
                    hidden,
                    dtype,
                    bytes_out,
                    bytes_back,
                    stats,
                };
                each(&m);
                out.push(m);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut s: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        let st = Stats::from_samples(&mut s).unwrap();
        assert_eq!((st.min_us, st.p50_us, st.p99_us, st.max_us), (1.0, 50.0, 99.0, 100.0));
        assert_eq!(st.mean_us, 50.5);
        let st = Stats::from_samples(&mut [7.0]).unwrap();
        assert_eq!((st.p50_us, st.p99_us), (7.0, 7.0));
        assert!(Stats::from_samples(&mut []).is_none());
    }

    #[test]
    fn default_iters_follow_the_payload() {
        let cfg = BenchConfig::default();
        assert_eq!(cfg.iters_for(1, 2048), MAX_ITERS);
        assert_eq!(
            cfg.iters_for(512, 7168),
            MIN_ITERS.max(BYTES_PER_CASE / (2 * 512 * 7168 * 2 + 8 * 512 * 8))
        );
        assert_eq!(BenchConfig { iters: Some(5), ..cfg }.iters_for(512, 7168), 5);
    }

    #[test]
    fn tiny_run_gives_sane_numbers_for_every_transport() {
        for dtype in [WireDType::Bf16, WireDType::F32] {
            let cfg = BenchConfig {
                hiddens: vec![64],
                tokens: vec![1],
                iters: Some(5),
                dtype,
                ..BenchConfig::default()
            };
            let mut seen = 0;
            let ms = run(&cfg, &Transport::ALL, |_| seen += 1).unwrap();
            assert_eq!(ms.len(), 3);
            assert_eq!(seen, 3);
            for (m, t) in ms.iter().zip(Transport::ALL) {
                assert_eq!((m.transport, m.tokens, m.hidden), (t, 1, 64));
                let s = m.stats;
                assert_eq!(s.iters, 5);
                assert!(s.min_us > 0.0, "{m:?}");
                assert!(
                    s.min_us <= s.p50_us && s.p50_us <= s.p99_us && s.p99_us <= s.max_us,
                    "{m:?}"
                );
                assert!(s.min_us <= s.mean_us && s.mean_us <= s.max_us, "{m:?}");
            }
            for m in &ms[1..] {
                assert_eq!(m.dtype, Some(dtype));
                assert_eq!(m.bytes_back, 64 * dtype_size(dtype));
                assert_eq!(m.bytes_out, 64 * dtype_size(dtype) + 8 * 8);
            }
        }
    }

    #[test]
    fn null_experts_refuse_ragged_input() {
        let e = NullExperts { hidden: 4 };
        let r = Routing { k: 1, ids: vec![0], weights: vec![1.0] };
        assert_eq!(e.forward(0, &[0.0; 4], &r).unwrap(), vec![0.0; 4]);
        assert!(e.forward(0, &[0.0; 5], &r).is_err());
    }
}
