//! Resolution: a [`Plan`] against a [`ModelShape`]. Every tensor gets the first rule that
//! matches it; routed experts sent to the expert tier are divided among servers by the split;
//! bytes are summed per worker device and per server and checked against limits. Everything
//! wrong is collected as [`Problem`]s so one run reports all of it.

use std::collections::BTreeSet;
use std::fmt::{self, Write as _};

use crate::model::{Kind, ModelShape};
use crate::plan::{Device, ExpertAssign, Place, Plan, Ranges, Split};
use crate::GIB;

/// Memory limits, in bytes, each optional.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Per `cuda:N` device.
    pub gpu: Option<u64>,
    /// Per expert server (one NUMA node), and for the worker's `cpu` device.
    pub host: Option<u64>,
}

/// Something that makes the plan unusable for this model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    ArchMismatch {
        plan: String,
        model: String,
    },
    /// Tensors no rule matches.
    Unplaced {
        names: Vec<String>,
    },
    /// A rule sends something other than a routed expert to the expert tier.
    NotAnExpert {
        rule: String,
        tensor: String,
    },
    /// `by_layer`: MoE layers no server holds.
    LayersNotCovered {
        layers: Vec<usize>,
    },
    /// A range names a layer or expert the model does not have.
    OutOfRange {
        server: String,
        what: &'static str,
        index: usize,
        count: usize,
    },
    /// `by_expert` with explicit ranges: expert ids no server holds.
    ExpertsNotCovered {
        experts: Vec<usize>,
    },
    /// `intermediate`: a server's share rounds to no rows.
    EmptySlice {
        server: String,
        expert_ff: usize,
    },
    TooManyHot {
        per_layer: usize,
        n_experts: usize,
    },
    OverLimit {
        what: String,
        used: u64,
        limit: u64,
    },
}

fn list<T: fmt::Display>(items: &[T], max: usize) -> String {
    let mut s: Vec<String> = items.iter().take(max).map(|x| x.to_string()).collect();
    if items.len() > max {
        s.push(format!("… ({} more)", items.len() - max));
    }
    s.join(", ")
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::ArchMismatch { plan, model } => {
                write!(f, "the plan is for arch `{plan}` but the model is `{model}`")
            }
            Problem::Unplaced { names } => write!(
                f,
                "{} tensor(s) match no rule (add a catch-all rule such as {{match: '.*', place: cuda:0}}): {}",
                names.len(),
                list(names, 8)
            ),
            Problem::NotAnExpert { rule, tensor } => write!(
                f,
                "{rule} places `{tensor}` on `experts`, but only routed experts live on the expert tier"
            ),
            Problem::LayersNotCovered { layers } => {
                write!(f, "experts.layers: no server holds MoE layer(s) {}", list(layers, 16))
            }
            Problem::OutOfRange { server, what, index, count } => write!(
                f,
                "experts: server `{server}` is given {what} {index}, but the model has {count} ({what}s 0-{})",
                count.saturating_sub(1)
            ),
            Problem::ExpertsNotCovered { experts } => {
                write!(f, "experts.assign: no server holds expert id(s) {}", list(experts, 16))
            }
            Problem::EmptySlice { server, expert_ff } => write!(
                f,
                "experts.slices: server `{server}` gets no rows of the {expert_ff} intermediate rows"
            ),
            Problem::TooManyHot { per_layer, n_experts } => write!(
                f,
                "experts.hot_on_gpu.per_layer = {per_layer} but MoE layers have {n_experts} experts"
            ),
            Problem::OverLimit { what, used, limit } => {
                write!(f, "{what} needs {} but the limit is {}", gib(*used), gib(*limit))
            }
        }
    }
}

/// `12.34 GiB`.
pub fn gib(bytes: u64) -> String {
    let g = bytes as f64 / GIB as f64;
    if g >= 0.01 || bytes == 0 {
        format!("{g:.2} GiB")
    } else {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceUsage {
    pub bytes: u64,
    pub tensors: usize,
    /// Copies of hot experts kept here (included in `bytes`).
    pub hot_bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerUsage {
    /// Bytes of the experts this server owns (decode format, plus prefill format if it differs).
    pub bytes: u64,
    /// Bytes held as another server's replica.
    pub replica_bytes: u64,
    /// Expert tensors (or slices of them) it owns.
    pub tensors: usize,
    /// (layer, expert) pairs of which it owns all or a slice.
    pub experts: usize,
    pub layers: BTreeSet<usize>,
    /// `intermediate`: rows of each expert it holds.
    pub rows: Option<usize>,
    /// `intermediate`: which rows, `[start, end)` of each expert's intermediate dimension.
    pub slice: Option<(usize, usize)>,
    /// The (layer, expert) pairs of which it owns all (or, `intermediate`, a slice).
    pub held: BTreeSet<(usize, usize)>,
}

impl ServerUsage {
    pub fn total(&self) -> u64 {
        self.bytes + self.replica_bytes
    }
}

/// Where everything went.
#[derive(Debug)]
pub struct Placement<'a> {
    pub plan: &'a Plan,
    pub model: &'a ModelShape,
    /// For each tensor of `model.tensors`, the index of the rule that placed it.
    pub rule_of: Vec<Option<usize>>,
    /// Indexed like `plan.devices`.
    pub devices: Vec<DeviceUsage>,
    /// Indexed like the plan's servers.
    pub servers: Vec<ServerUsage>,
    /// (tensors, bytes) per rule.
    pub rules: Vec<(usize, u64)>,
    pub problems: Vec<Problem>,
    /// Legal but suspicious: rules that match nothing, servers that hold nothing.
    pub warnings: Vec<String>,
}

impl Placement<'_> {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

fn in_ranges(r: &Ranges, i: usize) -> bool {
    r.iter().any(|&(a, b)| a <= i && i <= b)
}

/// Places every tensor of `model` as `plan` says and checks the result against `limits`.
pub fn resolve<'a>(plan: &'a Plan, model: &'a ModelShape, limits: &Limits) -> Placement<'a> {
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    if plan.arch != model.arch().name() {
        problems.push(Problem::ArchMismatch {
            plan: plan.arch.clone(),
            model: model.arch().name().to_string(),
        });
    }
    let n_layers = model.n_layers();
    let n_experts = model.n_experts();
    let moe_layers = model.moe_layers();
    let tier = plan.experts.as_ref();
    let n_servers = tier.map_or(0, |t| t.servers.len());
    let mut devices = vec![DeviceUsage::default(); plan.devices.len()];
    let mut servers = vec![ServerUsage::default(); n_servers];
    let mut rules = vec![(0usize, 0u64); plan.rules.len()];
    let mut rule_of = Vec::with_capacity(model.tensors.len());
    let mut unplaced = Vec::new();

    // Row boundaries of the intermediate split, and split-level checks.
    let ff = model.expert_ff();
    let mut bounds = Vec::new();
    if let Some(t) = tier {
        match &t.split {
            Split::Intermediate(shares) => {
                let total: u64 = shares.iter().map(|&w| w as u64).sum::<u64>().max(1);
                let mut acc = 0u64;
                bounds.push(0usize);
                for &w in shares {
                    acc += w as u64;
                    bounds.push((ff as u64 * acc / total) as usize);
                }
                for (i, s) in t.servers.iter().enumerate() {
                    let rows = bounds[i + 1] - bounds[i];
                    servers[i].rows = Some(rows);
                    servers[i].slice = Some((bounds[i], bounds[i + 1]));
                    if rows == 0 && ff > 0 {
                        problems
                            .push(Problem::EmptySlice { server: s.name.clone(), expert_ff: ff });
                    }
                }
            }
            Split::ByLayer(per) => {
                for (i, r) in per.iter().enumerate() {
                    if let Some(&(_, b)) = r.iter().find(|&&(_, b)| b >= n_layers) {
                        let index = r
                            .iter()
                            .flat_map(|&(a, b)| a..=b)
                            .find(|&x| x >= n_layers)
                            .unwrap_or(b);
                        problems.push(Problem::OutOfRange {
                            server: t.servers[i].name.clone(),
                            what: "layer",
                            index,
                            count: n_layers,
                        });
                    }
                }
                let missing: Vec<usize> = moe_layers
                    .iter()
                    .copied()
                    .filter(|&l| !per.iter().any(|r| in_ranges(r, l)))
                    .collect();
                if !missing.is_empty() {
                    problems.push(Problem::LayersNotCovered { layers: missing });
                }
            }
            Split::ByExpert(ExpertAssign::Ranges(per)) => {
                for (i, r) in per.iter().enumerate() {
                    if let Some(index) =
                        r.iter().flat_map(|&(a, b)| a..=b).find(|&x| x >= n_experts)
                    {
                        problems.push(Problem::OutOfRange {
                            server: t.servers[i].name.clone(),
                            what: "expert",
                            index,
                            count: n_experts,
                        });
                    }
                }
                let missing: Vec<usize> =
                    (0..n_experts).filter(|&e| !per.iter().any(|r| in_ranges(r, e))).collect();
                if !missing.is_empty() && !moe_layers.is_empty() {
                    problems.push(Problem::ExpertsNotCovered { experts: missing });
                }
            }
            Split::ByExpert(_) => {}
        }
        if let Some(h) = t.hot {
            if h.per_layer > n_experts {
                problems.push(Problem::TooManyHot { per_layer: h.per_layer, n_experts });
            }
        }
    }

    // Per layer: bytes of routed experts sent to the tier, for hot copies.
    let mut tier_layer_bytes = vec![0u64; n_layers];
    let mut held: Vec<BTreeSet<(usize, usize)>> = vec![BTreeSet::new(); n_servers];
    for t in &model.tensors {
        let Some(rule) = plan.rules.iter().find(|r| r.matches(&t.name, t.kind)) else {
            unplaced.push(t.name.clone());
            rule_of.push(None);
            continue;
        };
        rule_of.push(Some(rule.index));
        rules[rule.index].0 += 1;
        rules[rule.index].1 += t.bytes;
        match rule.place {
            Place::Device(d) => {
                if let Some(i) = plan.devices.iter().position(|x| *x == d) {
                    devices[i].bytes += t.bytes;
                    devices[i].tensors += 1;
                }
            }
            Place::Experts => {
                let (Some(tier), Some(Kind::Experts), Some(layer), Some(expert)) =
                    (tier, t.kind, t.layer, t.expert)
                else {
                    problems
                        .push(Problem::NotAnExpert { rule: rule.label(), tensor: t.name.clone() });
                    continue;
                };
                if layer < n_layers {
                    tier_layer_bytes[layer] += t.bytes;
                }
                let numel = t.numel();
                let fmt_bytes = |f: crate::plan::ExpertFormat| f.bytes(numel).unwrap_or(t.bytes);
                let mut full = fmt_bytes(tier.decode);
                if tier.prefill != tier.decode {
                    full += fmt_bytes(tier.prefill);
                }
                // (server, bytes) this tensor puts on each owner.
                let owners: Vec<(usize, u64)> = match &tier.split {
                    Split::ByLayer(per) => per
                        .iter()
                        .position(|r| in_ranges(r, layer))
                        .map(|s| (s, full))
                        .into_iter()
                        .collect(),
                    Split::ByExpert(ExpertAssign::RoundRobin) => vec![(expert % n_servers, full)],
                    Split::ByExpert(ExpertAssign::Contiguous) => {
                        let per = n_experts.div_ceil(n_servers).max(1);
                        vec![((expert / per).min(n_servers - 1), full)]
                    }
                    Split::ByExpert(ExpertAssign::Ranges(per)) => per
                        .iter()
                        .position(|r| in_ranges(r, expert))
                        .map(|s| (s, full))
                        .into_iter()
                        .collect(),
                    Split::Intermediate(_) => (0..n_servers)
                        .map(|s| {
                            let rows = (bounds[s + 1] - bounds[s]) as u128;
                            (s, (full as u128 * rows / ff.max(1) as u128) as u64)
                        })
                        .filter(|&(_, b)| b > 0)
                        .collect(),
                };
                for (s, b) in owners {
                    servers[s].bytes += b;
                    servers[s].tensors += 1;
                    servers[s].layers.insert(layer);
                    held[s].insert((layer, expert));
                    for &r in &tier.servers[s].replicas {
                        servers[r].replica_bytes += b;
                    }
                }
            }
        }
    }
    for (s, h) in held.into_iter().enumerate() {
        servers[s].experts = h.len();
        servers[s].held = h;
    }
    if !unplaced.is_empty() {
        problems.push(Problem::Unplaced { names: unplaced });
    }

    // Hot experts: per MoE layer on the tier, `per_layer` experts' worth of bytes on the GPU.
    if let Some(h) = tier.and_then(|t| t.hot) {
        if let Some(i) = plan.devices.iter().position(|d| *d == h.device) {
            let n = h.per_layer.min(n_experts) as u64;
            let hot: u64 = tier_layer_bytes.iter().map(|&b| b / n_experts.max(1) as u64 * n).sum();
            devices[i].bytes += hot;
            devices[i].hot_bytes += hot;
        }
    }

    for (i, d) in plan.devices.iter().enumerate() {
        let limit = match d {
            Device::Cuda(_) => limits.gpu,
            Device::Cpu => limits.host,
        };
        if let Some(limit) = limit.filter(|&l| devices[i].bytes > l) {
            problems.push(Problem::OverLimit {
                what: format!("device {d}"),
                used: devices[i].bytes,
                limit,
            });
        }
    }
    if let Some(t) = tier {
        for (i, s) in t.servers.iter().enumerate() {
            if let Some(limit) = limits.host.filter(|&l| servers[i].total() > l) {
                problems.push(Problem::OverLimit {
                    what: format!("expert server `{}` (numa {})", s.name, s.numa),
                    used: servers[i].total(),
                    limit,
                });
            }
            if servers[i].tensors == 0 && !moe_layers.is_empty() {
                warnings.push(format!("expert server `{}` holds no experts", s.name));
            }
        }
    }
    for (r, &(n, _)) in plan.rules.iter().zip(&rules) {
        if n == 0 {
            warnings.push(format!("{} matches no tensor", r.label()));
        }
    }
    Placement { plan, model, rule_of, devices, servers, rules, problems, warnings }
}

fn layer_list(layers: &BTreeSet<usize>) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut it = layers.iter().copied().peekable();
    while let Some(a) = it.next() {
        let mut b = a;
        while it.peek() == Some(&(b + 1)) {
            b += 1;
            it.next();
        }
        out.push(if a == b { a.to_string() } else { format!("{a}-{b}") });
    }
    out.join(",")
}

impl Placement<'_> {
    /// The human-readable summary `kt plan show` prints; `tensors` adds one line per tensor.
    pub fn render(&self, tensors: bool) -> String {
        let (p, m) = (self.plan, self.model);
        let mut s = String::new();
        let _ = writeln!(
            s,
            "plan   {}{}",
            p.file,
            p.name.as_ref().map(|n| format!(" ({n})")).unwrap_or_default()
        );
        let _ = writeln!(
            s,
            "model  {} [{}]: {} layers, {} MoE layers × {} experts; {} tensors, {} in all",
            m.name,
            m.arch().name(),
            m.n_layers(),
            m.moe_layers().len(),
            m.n_experts(),
            m.tensors.len(),
            gib(m.tensors.iter().map(|t| t.bytes).sum())
        );
        let _ = writeln!(s, "from   {}", m.source);
        let _ = writeln!(s, "\nworker devices");
        for (d, u) in p.devices.iter().zip(&self.devices) {
            let hot = if u.hot_bytes > 0 {
                format!("  (hot experts {})", gib(u.hot_bytes))
            } else {
                String::new()
            };
            let _ = writeln!(
                s,
                "  {:<8} {:>12}  {:>6} tensors{hot}",
                d.to_string(),
                gib(u.bytes),
                u.tensors
            );
        }
        if let Some(t) = &p.experts {
            let split = match &t.split {
                Split::ByLayer(_) => "by_layer".to_string(),
                Split::ByExpert(ExpertAssign::RoundRobin) => "by_expert (round_robin)".to_string(),
                Split::ByExpert(ExpertAssign::Contiguous) => "by_expert (contiguous)".to_string(),
                Split::ByExpert(ExpertAssign::Ranges(_)) => "by_expert (ranges)".to_string(),
                Split::Intermediate(_) => "intermediate".to_string(),
            };
            let _ = writeln!(
                s,
                "\nexpert servers (split {split}; kernel decode {}, prefill {}{})",
                t.decode.name(),
                t.prefill.name(),
                t.hot
                    .map(|h| format!(
                        "; {} hot per layer on {} ({:?})",
                        h.per_layer, h.device, h.choose
                    ))
                    .unwrap_or_default()
            );
            for (sv, u) in t.servers.iter().zip(&self.servers) {
                let rows = u.rows.map(|r| format!(", {r} rows each")).unwrap_or_default();
                let rep = if u.replica_bytes > 0 {
                    format!(" + replicas {}", gib(u.replica_bytes))
                } else {
                    String::new()
                };
                let of: Vec<&str> =
                    sv.replicas.iter().map(|&r| t.servers[r].name.as_str()).collect();
                let mirrored = if of.is_empty() {
                    String::new()
                } else {
                    format!("; replicated on {}", of.join(", "))
                };
                let _ = writeln!(
                    s,
                    "  {:<8} numa {:<2} {:>12}{rep}  {} experts in layers {}{rows}{mirrored}",
                    sv.name,
                    sv.numa,
                    gib(u.bytes),
                    u.experts,
                    if u.layers.is_empty() { "-".to_string() } else { layer_list(&u.layers) },
                );
            }
        }
        let _ = writeln!(s, "\nrules (first match wins)");
        for (r, &(n, b)) in p.rules.iter().zip(&self.rules) {
            let kind = r.kind.map(|k| format!(" kind {}", k.name())).unwrap_or_default();
            let line = r.line.map(|l| format!("line {l}")).unwrap_or_default();
            let _ = writeln!(
                s,
                "  #{:<3} {:<8} '{}'{kind} -> {}: {n} tensors, {}",
                r.index,
                line,
                r.pattern.as_str(),
                r.place,
                gib(b)
            );
        }
        if tensors {
            let _ = writeln!(s, "\ntensors");
            for (t, r) in m.tensors.iter().zip(&self.rule_of) {
                let place =
                    r.map(|r| p.rules[r].place.to_string()).unwrap_or_else(|| "UNPLACED".into());
                let _ = writeln!(
                    s,
                    "  {:<60} {:<20} {:<6} {:>12} {place}",
                    t.name,
                    format!("{:?}", t.shape),
                    t.dtype,
                    t.bytes
                );
            }
        }
        for w in &self.warnings {
            let _ = writeln!(s, "warning: {w}");
        }
        for pr in &self.problems {
            let _ = writeln!(s, "error: {pr}");
        }
        s
    }
}
