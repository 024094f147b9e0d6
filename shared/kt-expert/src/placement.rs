//! What an expert server holds when a placement plan says so, and the worker's view of the
//! same plan.
//!
//! The resolution is kt-plan's ([`kt_plan::resolve`]): the server with `--name NAME` owns
//! `Placement::servers[i].held`, and with the `intermediate` split only rows
//! `[start, end)` of every expert's intermediate dimension ([`slice_mlp`]: rows of gate and
//! up, columns of down), so its answers are partial sums the worker adds ([`SlicedExperts`]).
//!
//! A server the plan names as a replica of others (`S: {replicas: [NAME]}`) holds their
//! shares too ([`Assignment::held`] vs [`Assignment::own`]), and the worker sends S's calls to
//! it while S is unreachable ([`crate::failover`]). Replicas go with `by_layer` and
//! `by_expert` only (kt-plan refuses them with `intermediate`).

use std::collections::BTreeSet;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use kt_core::{SharedBytes, WeightTensor};
use kt_models::linear::Linear;
use kt_models::moe::Mlp;
use kt_models::{Experts, MatmulMode, ModelError, Routing, ShardedExperts};
use kt_plan::{ModelShape, Plan, Split};
use kt_proto::v1::{ExpertSlice, LayerExperts, ModelIdentity, PlanIdentity};
use rayon::prelude::*;

use crate::failover::{FailoverExperts, Member, TierHealth};
use crate::{ExpertError, RemoteExperts, RemoteOptions};

/// What one server of a plan holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// The server's name in the plan.
    pub server: String,
    /// (layer, expert) pairs held (whole, or a slice of each): its own share and the shares
    /// of the servers it is a replica of. What it loads and reports in `Info`.
    pub held: BTreeSet<(usize, usize)>,
    /// Its own share: what the worker sends it while every server is up.
    pub own: BTreeSet<(usize, usize)>,
    /// The servers whose shares it also holds, as their replica (plan order).
    pub replica_of: Vec<String>,
    /// `intermediate` split: the rows of each expert's intermediate dimension held.
    pub slice: Option<Range<usize>>,
    /// The whole intermediate size of an expert.
    pub expert_ff: usize,
    pub plan: PlanIdentity,
}

impl Assignment {
    /// `held` as `Info` reports it (layers ascending, experts ascending).
    pub fn layer_experts(&self) -> Vec<LayerExperts> {
        let mut out: Vec<LayerExperts> = Vec::new();
        for &(l, e) in &self.held {
            match out.last_mut() {
                Some(last) if last.layer == l as u32 => last.experts.push(e as u32),
                _ => out.push(LayerExperts { layer: l as u32, experts: vec![e as u32] }),
            }
        }
        out
    }

    /// The slice as `Info` reports it.
    pub fn slice_info(&self) -> Option<ExpertSlice> {
        self.slice.as_ref().map(|r| ExpertSlice {
            start: r.start as u32,
            end: r.end as u32,
            expert_ff: self.expert_ff as u32,
        })
    }
}

fn fnv(text: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h.max(1)
}

/// The identity of `plan` as far as expert placement goes: its architecture and expert tier
/// (servers, split, formats). Two plan files that place experts the same way hash the same.
pub fn plan_identity(plan: &Plan) -> PlanIdentity {
    let file = Path::new(&plan.file)
        .file_name()
        .map_or_else(|| plan.file.clone(), |f| f.to_string_lossy().into_owned());
    PlanIdentity { file, hash: fnv(&format!("{}|{:?}", plan.arch, plan.experts)) }
}

/// Every server's assignment under `plan` for the model `shape`, in the plan's server order.
/// Refuses a plan that does not resolve cleanly for this model (the problems are named).
pub fn assignments(plan: &Plan, shape: &ModelShape) -> Result<Vec<Assignment>, ExpertError> {
    let bad = |reason: String| ExpertError::Plan { file: plan.file.clone(), reason };
    let tier = plan.experts.as_ref().ok_or_else(|| bad("the plan has no expert tier".into()))?;
    let placement = kt_plan::resolve(plan, shape, &kt_plan::Limits::default());
    if !placement.ok() {
        let problems: Vec<String> = placement.problems.iter().map(|p| p.to_string()).collect();
        return Err(bad(format!("does not fit the model: {}", problems.join("; "))));
    }
    let sliced = matches!(tier.split, Split::Intermediate(_));
    if let Some(s) = tier.servers.iter().find(|s| sliced && !s.replicas.is_empty()) {
        // kt-plan refuses this when it parses the file; a plan built in code may still try.
        return Err(bad(format!(
            "experts.servers.{}.replicas: replicas go with `split: by_layer` or `split: by_expert`, not `split: intermediate`",
            s.name
        )));
    }
    let id = plan_identity(plan);
    let expert_ff = shape.expert_ff();
    Ok(tier
        .servers
        .iter()
        .enumerate()
        .zip(&placement.servers)
        .map(|((i, s), u)| {
            let mut held = u.held.clone();
            let mut replica_of = Vec::new();
            for (primary, pu) in tier.servers.iter().zip(&placement.servers) {
                if primary.replicas.contains(&i) {
                    held.extend(pu.held.iter().copied());
                    replica_of.push(primary.name.clone());
                }
            }
            Assignment {
                server: s.name.clone(),
                held,
                own: u.held.clone(),
                replica_of,
                slice: if sliced { u.slice.map(|(a, b)| a..b) } else { None },
                expert_ff,
                plan: id.clone(),
            }
        })
        .collect())
}

/// The assignment of the server named `name` (an error lists the plan's servers otherwise).
pub fn assignment(plan: &Plan, shape: &ModelShape, name: &str) -> Result<Assignment, ExpertError> {
    let all = assignments(plan, shape)?;
    let names: Vec<&str> = all.iter().map(|a| a.server.as_str()).collect();
    let reason =
        format!("the plan has no expert server `{name}` (its servers: {})", names.join(", "));
    let a = all
        .iter()
        .find(|a| a.server == name)
        .cloned()
        .ok_or_else(|| ExpertError::Plan { file: plan.file.clone(), reason })?;
    if a.held.is_empty() {
        return Err(ExpertError::Plan {
            file: plan.file.clone(),
            reason: format!("expert server `{name}` holds no experts in this plan"),
        });
    }
    if !a.replica_of.is_empty() {
        tracing::info!(
            server = name,
            replica_of = ?a.replica_of,
            own = a.own.len(),
            held = a.held.len(),
            "the plan makes this server a replica: it holds those servers' experts as well as its own"
        );
    }
    Ok(a)
}

/// Rows `rows` of `mlp`'s intermediate dimension: rows of gate and up (views, no copy) and
/// the same columns of down (copied; their start and end must fall on block boundaries of
/// down's format).
pub fn slice_mlp(mlp: &Mlp, rows: Range<usize>, mode: MatmulMode) -> Result<Mlp, ModelError> {
    let ff = mlp.gate.out_dim();
    if rows.start >= rows.end || rows.end > ff || mlp.down.in_dim() != ff {
        return Err(ModelError::Shape(format!(
            "cannot take rows {rows:?} of an expert with intermediate size {ff}"
        )));
    }
    let row_view = |lin: &Linear| -> Result<Linear, ModelError> {
        let w = lin.weight();
        let rb = w.row_bytes();
        let data = w.data.slice(rows.start * rb..rows.end * rb).ok_or_else(|| {
            ModelError::Shape(format!("`{}`: rows {rows:?} are out of bounds", w.name))
        })?;
        let t = WeightTensor::new(
            format!("{}[{}..{}]", w.name, rows.start, rows.end),
            w.ty,
            vec![rows.len(), w.shape[1]],
            data,
        )
        .map_err(|e| ModelError::Shape(e.to_string()))?;
        Linear::new(t, None, mode)
    };
    let d = mlp.down.weight();
    let (bs, ts) = (d.ty.block_size(), d.ty.type_size());
    if !rows.start.is_multiple_of(bs) || !rows.end.is_multiple_of(bs) {
        return Err(ModelError::Unsupported(format!(
            "`{}` is {} (blocks of {bs} along the intermediate dimension): a slice must start and end on a block boundary, rows {rows:?} do not",
            d.name, d.ty
        )));
    }
    let rb = d.row_bytes();
    let (from, len) = (rows.start / bs * ts, rows.len() / bs * ts);
    let mut bytes = Vec::with_capacity(len * d.shape[0]);
    for r in 0..d.shape[0] {
        let row = d
            .row(r)
            .ok_or_else(|| ModelError::Shape(format!("`{}`: row {r} is out of bounds", d.name)))?;
        bytes.extend_from_slice(&row[from..from + len]);
        debug_assert_eq!(row.len(), rb);
    }
    let down = WeightTensor::new(
        format!("{}[:, {}..{}]", d.name, rows.start, rows.end),
        d.ty,
        vec![d.shape[0], rows.len()],
        SharedBytes::new(bytes),
    )
    .map_err(|e| ModelError::Shape(e.to_string()))?;
    Ok(Mlp {
        gate: row_view(&mlp.gate)?,
        up: row_view(&mlp.up)?,
        down: Linear::new(down, None, mode)?,
    })
}

/// Routed experts held in slices by several holders (the `intermediate` split): every holder
/// computes its slice of every chosen expert and the partial sums are added, in holder order
/// (so the result does not depend on who answers first).
pub struct SlicedExperts {
    parts: Vec<Arc<dyn Experts>>,
}

impl SlicedExperts {
    pub fn new(parts: Vec<Arc<dyn Experts>>) -> Self {
        Self { parts }
    }
}

impl Experts for SlicedExperts {
    fn forward(
        &self,
        layer: usize,
        hidden: &[f32],
        routing: &Routing,
    ) -> Result<Vec<f32>, ModelError> {
        let answers = self
            .parts
            .par_iter()
            .map(|p| p.forward(layer, hidden, routing))
            .collect::<Result<Vec<_>, ModelError>>()?;
        let mut out = vec![0f32; hidden.len()];
        for (i, part) in answers.iter().enumerate() {
            if part.len() != out.len() {
                return Err(ModelError::ExpertsRefused(format!(
                    "slice {i} answered {} values for {}",
                    part.len(),
                    out.len()
                )));
            }
            for (o, p) in out.iter_mut().zip(part) {
                *o += p;
            }
        }
        Ok(out)
    }
}

/// The worker's side of a plan's expert tier: the experts to call, and their health.
pub struct PlanExperts {
    pub experts: Arc<dyn Experts>,
    /// Whether every server's share has a reachable holder (for the worker's `Health`).
    pub health: TierHealth,
}

impl std::fmt::Debug for PlanExperts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlanExperts").field("health", &self.health).finish_non_exhaustive()
    }
}

/// [`connect_plan_tier`]'s experts alone.
pub fn connect_plan(
    plan: &Plan,
    shape: &ModelShape,
    ours: &ModelIdentity,
    addrs: &[(String, String)],
    opts: &RemoteOptions,
) -> Result<Arc<dyn Experts>, ExpertError> {
    connect_plan_tier(plan, shape, ours, addrs, opts).map(|t| t.experts)
}

/// Waits (up to `wait`) until every share has a reachable holder — its server or one of its
/// replicas — and fails naming the server and its replicas when one still has none.
fn wait_for_holders(
    all: &[Assignment],
    tier: &kt_plan::ExpertTier,
    members: &[(Member, Arc<RemoteExperts>)],
    wait: std::time::Duration,
) -> Result<(), ExpertError> {
    let start = std::time::Instant::now();
    let mut logged: Option<std::time::Instant> = None;
    loop {
        let uncovered = all.iter().enumerate().find(|&(i, a)| {
            !a.own.is_empty()
                && !members[i].1.connected()
                && !tier.servers[i]
                    .replicas
                    .iter()
                    .any(|&r| members.get(r).is_some_and(|(_, m)| m.connected()))
        });
        let Some((i, a)) = uncovered else { return Ok(()) };
        if start.elapsed() >= wait {
            let replicas = &tier.servers[i].replicas;
            let reason = members[i].1.down_reason().unwrap_or_default();
            let with = if replicas.is_empty() {
                String::new()
            } else {
                let each: Vec<String> = replicas
                    .iter()
                    .filter_map(|&r| members.get(r))
                    .map(|(m, r)| {
                        format!(
                            "`{}` at {}: {}",
                            m.name,
                            m.addr,
                            r.down_reason().unwrap_or_default()
                        )
                    })
                    .collect();
                format!(" (nor any of its replicas: {})", each.join("; "))
            };
            return Err(ExpertError::Connect {
                addr: members[i].0.addr.clone(),
                reason: format!("expert server `{}`: {reason}{with}", a.server),
            });
        }
        if logged.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(5)) {
            tracing::info!(
                server = %a.server,
                addr = %members[i].0.addr,
                "waiting for the expert server or one of its replicas ({:.0} s left)",
                wait.saturating_sub(start.elapsed()).as_secs_f64()
            );
            logged = Some(std::time::Instant::now());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The worker's side of a plan's expert tier: connects to every server (`addrs` maps the
/// plan's server names to addresses), checks that each holds what the plan gives it (name,
/// plan, experts — its own share plus those it replicates —, slice), and combines them:
/// [`ShardedExperts`] for `by_layer`/`by_expert`, [`SlicedExperts`] for `intermediate`. A
/// server with replicas is called through a [`FailoverExperts`] (its own share only, going to
/// a replica while it is unreachable; a stalled one is tried again after
/// `opts.reconnect_max`). The connections keep reconnecting on their own.
/// At start it waits up to `opts.start_wait` until every share has a reachable holder (a
/// server still down then, whose share a replica holds, joins when it comes up).
pub fn connect_plan_tier(
    plan: &Plan,
    shape: &ModelShape,
    ours: &ModelIdentity,
    addrs: &[(String, String)],
    opts: &RemoteOptions,
) -> Result<PlanExperts, ExpertError> {
    let all = assignments(plan, shape)?;
    let tier = plan.experts.as_ref().ok_or_else(|| ExpertError::Plan {
        file: plan.file.clone(),
        reason: "the plan has no expert tier".into(),
    })?;
    if let Some(extra) = addrs.iter().find(|(n, _)| tier.server(n).is_none()) {
        return Err(ExpertError::Plan {
            file: plan.file.clone(),
            reason: format!("an address is given for `{}`, which the plan does not name", extra.0),
        });
    }
    let mut members = Vec::with_capacity(all.len());
    for a in &all {
        let addr =
            addrs.iter().find(|(n, _)| *n == a.server).map(|(_, ad)| ad).ok_or_else(|| {
                ExpertError::Plan {
                    file: plan.file.clone(),
                    reason: format!("no address given for expert server `{}`", a.server),
                }
            })?;
        let expect = crate::Holding {
            name: a.server.clone(),
            plan: Some(a.plan.clone()),
            held: a.layer_experts(),
            slice: a.slice_info(),
        };
        let opts = RemoteOptions { expect: Some(expect), ..opts.clone() };
        // Reachability is checked below, per share: a server may be down (or still loading)
        // while a replica holds its share; it joins when it comes up.
        let remote = Arc::new(RemoteExperts::connect_or_retry(addr, ours, opts)?);
        members.push((Member::new(&a.server, addr, remote.clone()), remote));
    }
    wait_for_holders(&all, tier, &members, opts.start_wait)?;
    let members: Vec<Member> = members.into_iter().map(|(m, _)| m).collect();
    let probe_after = opts.reconnect_max;
    // Per server that owns a share: what the worker calls for it, and the health group.
    let mut callers: Vec<(usize, Arc<dyn Experts>)> = Vec::new();
    let mut groups = Vec::new();
    for (i, (a, m)) in all.iter().zip(&members).enumerate() {
        if a.own.is_empty() {
            continue; // a pure standby: called only as a replica
        }
        let replicas: Vec<Member> =
            tier.servers[i].replicas.iter().filter_map(|&r| members.get(r).cloned()).collect();
        if replicas.is_empty() {
            callers.push((i, m.experts.clone() as Arc<dyn Experts>));
            groups.push((m.clone(), replicas, None));
        } else {
            let f = Arc::new(FailoverExperts::new(m.clone(), replicas.clone(), probe_after));
            callers.push((i, f.clone() as Arc<dyn Experts>));
            groups.push((m.clone(), replicas, Some(f)));
        }
    }
    let health = TierHealth::new(groups);
    if matches!(tier.split, Split::Intermediate(_)) {
        let parts = callers.into_iter().map(|(_, c)| c).collect();
        return Ok(PlanExperts { experts: Arc::new(SlicedExperts::new(parts)), health });
    }
    let (nl, ne) = (shape.n_layers(), shape.n_experts());
    let mut sharded = ShardedExperts::new(shape.config.hidden);
    for (i, caller) in callers {
        let mut owns = vec![vec![false; ne]; nl];
        for &(l, e) in &all[i].own {
            if let Some(slot) = owns.get_mut(l).and_then(|row| row.get_mut(e)) {
                *slot = true;
            }
        }
        sharded = sharded.add(caller, owns);
    }
    Ok(PlanExperts { experts: Arc::new(sharded), health })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use kt_core::GgmlType;

    fn f32_linear(rows: usize, cols: usize, seed: f32) -> Linear {
        let vals: Vec<f32> = (0..rows * cols).map(|i| ((i as f32 + seed) * 0.37).sin()).collect();
        let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let w = WeightTensor::new("w", GgmlType::F32, vec![rows, cols], SharedBytes::new(bytes))
            .unwrap();
        Linear::new(w, None, MatmulMode::F32).unwrap()
    }

    #[test]
    fn slices_add_up_to_the_whole_expert() {
        let (h, ff) = (6, 8);
        let mlp = Mlp {
            gate: f32_linear(ff, h, 1.0),
            up: f32_linear(ff, h, 2.0),
            down: f32_linear(h, ff, 3.0),
        };
        let x: Vec<f32> = (0..2 * h).map(|i| i as f32 * 0.1 - 0.5).collect();
        let whole = mlp.forward(&x, 2);
        let mut sum = vec![0f32; whole.len()];
        for r in [0..3, 3..5, 5..8] {
            let part = slice_mlp(&mlp, r, MatmulMode::F32).unwrap().forward(&x, 2);
            sum.iter_mut().zip(&part).for_each(|(s, p)| *s += p);
        }
        for (a, b) in whole.iter().zip(&sum) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        assert!(slice_mlp(&mlp, 4..4, MatmulMode::F32).is_err());
        assert!(slice_mlp(&mlp, 4..9, MatmulMode::F32).is_err());
    }
}
