//! The validated plan: every regex compiled, every device parsed, every server named in the
//! split or in a replica list known, ranges non-overlapping. Holding a [`Plan`] means the file
//! made sense on its own; [`crate::resolve`] then checks it against a model.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use regex::Regex;

use crate::error::PlanError;
use crate::model::Kind;
use crate::schema::{RawAssign, RawExperts, RawPlan, RawSplitKind};

/// A worker device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Device {
    Cpu,
    Cuda(u32),
}

impl Device {
    /// Parses `cpu` or `cuda:N`.
    pub fn parse(s: &str) -> Option<Device> {
        match s {
            "cpu" => Some(Device::Cpu),
            _ => s.strip_prefix("cuda:").and_then(|n| n.parse().ok()).map(Device::Cuda),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Where a rule puts the tensors it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    Device(Device),
    /// The expert tier: the servers, as the split says.
    Experts,
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Place::Device(d) => d.fmt(f),
            Place::Experts => f.write_str("experts"),
        }
    }
}

/// One rule: tensors whose name matches `pattern` (a regex search; anchor it with `^`) and,
/// when given, whose kind is `kind`, go to `place`. The first matching rule wins.
#[derive(Clone, Debug)]
pub struct Rule {
    /// Position in the `rules` list, from 0.
    pub index: usize,
    /// 1-based line in the plan file, where it could be found.
    pub line: Option<usize>,
    pub pattern: Regex,
    pub kind: Option<Kind>,
    pub place: Place,
}

impl Rule {
    pub fn matches(&self, name: &str, kind: Option<Kind>) -> bool {
        self.kind.is_none_or(|k| Some(k) == kind) && self.pattern.is_match(name)
    }

    /// `rule #3 (line 17, '^model\.')` — how errors name a rule.
    pub fn label(&self) -> String {
        match self.line {
            Some(l) => format!("rule #{} (line {l}, '{}')", self.index, self.pattern.as_str()),
            None => format!("rule #{} ('{}')", self.index, self.pattern.as_str()),
        }
    }
}

/// One expert server (a process pinned to one NUMA node).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Server {
    pub name: String,
    pub numa: u32,
    /// Indices (into [`ExpertTier::servers`]) of the servers that also hold this server's
    /// experts, for failover.
    pub replicas: Vec<usize>,
}

/// Inclusive ranges of layer or expert indices.
pub type Ranges = Vec<(usize, usize)>;

/// How routed experts are divided among servers. Weights are never copied to several servers
/// except as declared replicas.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Split {
    /// Server `i` holds every expert of the layers in `layers[i]`.
    ByLayer(Vec<Ranges>),
    /// Each (layer, expert) goes to one server by expert id.
    ByExpert(ExpertAssign),
    /// Every expert's intermediate dimension is sliced across all servers, server `i` taking
    /// `shares[i] / sum(shares)` of the rows.
    Intermediate(Vec<u32>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExpertAssign {
    /// Expert `e` to server `e % n` (servers in name order).
    RoundRobin,
    /// Equal consecutive blocks of expert ids, in server name order.
    Contiguous,
    /// Server `i` holds the expert ids in `ranges[i]`.
    Ranges(Vec<Ranges>),
}

/// The weight format an expert kernel runs on; repacking formats set the bytes a server holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpertFormat {
    /// Whatever the weights are stored as (GGUF blocks, or the `--dtype` of a config).
    Native,
    Bf16,
    AmxBf16,
    AmxInt8,
    AmxInt4,
}

impl ExpertFormat {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "native" | "gguf" | "llamafile" => ExpertFormat::Native,
            "bf16" => ExpertFormat::Bf16,
            "amx_bf16" => ExpertFormat::AmxBf16,
            "amx_int8" => ExpertFormat::AmxInt8,
            "amx_int4" => ExpertFormat::AmxInt4,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            ExpertFormat::Native => "native",
            ExpertFormat::Bf16 => "bf16",
            ExpertFormat::AmxBf16 => "amx_bf16",
            ExpertFormat::AmxInt8 => "amx_int8",
            ExpertFormat::AmxInt4 => "amx_int4",
        }
    }

    /// The `--int8-from` of a process that computes routed experts with `decode` and
    /// `prefill` as its formats: `Some(0)` (every call on the `amx_int8` copies) for decode
    /// `amx_int8`, `Some(prefill_from)` for prefill `amx_int8` alone, `None` (the stored weights
    /// only) for `native` both; an error names any other format, which kt does not compute.
    pub fn int8_from(
        decode: ExpertFormat,
        prefill: ExpertFormat,
        prefill_from: usize,
    ) -> Result<Option<usize>, String> {
        for f in [decode, prefill] {
            if !matches!(f, ExpertFormat::Native | ExpertFormat::AmxInt8) {
                return Err(format!(
                    "expert kernel format `{}` is not implemented (kt computes `native`, the \
                     stored weights, and `amx_int8`)",
                    f.name()
                ));
            }
        }
        Ok(match (decode, prefill) {
            (ExpertFormat::AmxInt8, _) => Some(0),
            (_, ExpertFormat::AmxInt8) => Some(prefill_from),
            _ => None,
        })
    }

    /// Bytes of `numel` weights in this format; `None` keeps the stored bytes.
    pub fn bytes(self, numel: u64) -> Option<u64> {
        match self {
            ExpertFormat::Native => None,
            ExpertFormat::Bf16 | ExpertFormat::AmxBf16 => Some(numel * 2),
            ExpertFormat::AmxInt8 => Some(numel),
            ExpertFormat::AmxInt4 => Some(numel.div_ceil(2)),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HotChoice {
    /// Fixed at load time (e.g. from a profile).
    Static,
    /// Re-chosen from routing counts while serving.
    Frequency,
}

/// Experts of each MoE layer that the worker keeps on a GPU as well.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hot {
    pub per_layer: usize,
    pub choose: HotChoice,
    pub device: Device,
}

#[derive(Clone, Debug)]
pub struct ExpertTier {
    /// Sorted by name.
    pub servers: Vec<Server>,
    pub split: Split,
    pub decode: ExpertFormat,
    pub prefill: ExpertFormat,
    pub hot: Option<Hot>,
}

impl ExpertTier {
    pub fn server(&self, name: &str) -> Option<usize> {
        self.servers.iter().position(|s| s.name == name)
    }
}

/// A validated placement plan.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The file it came from, as errors name it.
    pub file: String,
    /// Architecture name as [`kt_models::Arch::name`] spells it.
    pub arch: String,
    pub name: Option<String>,
    pub devices: Vec<Device>,
    pub experts: Option<ExpertTier>,
    pub rules: Vec<Rule>,
}

const ARCHES: [&str; 7] =
    ["llama", "qwen2", "mixtral", "qwen2moe", "qwen3moe", "deepseek2", "deepseek3"];

/// Normalizes HF spellings (`qwen2_moe`, `deepseek_v3`) to kt's arch names.
fn arch_name(s: &str) -> Option<&'static str> {
    let n = s.to_ascii_lowercase().replace(['_', '-'], "");
    let n = match n.as_str() {
        "deepseekv2" => "deepseek2",
        "deepseekv3" => "deepseek3",
        "mistral" => "llama",
        other => other,
    };
    ARCHES.iter().copied().find(|a| *a == n)
}

impl Plan {
    /// Reads and validates a plan file.
    pub fn load(path: impl AsRef<Path>) -> Result<Plan, PlanError> {
        let path = path.as_ref();
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|source| PlanError::Io { file: file.clone(), source })?;
        Plan::parse(&file, &text)
    }

    /// Parses and validates plan text; `file` is how errors name it.
    pub fn parse(file: &str, text: &str) -> Result<Plan, PlanError> {
        let raw: RawPlan = serde_norway::from_str(text).map_err(|e| {
            let (line, column) = e.location().map(|l| (l.line(), l.column())).unwrap_or((0, 0));
            PlanError::Yaml { file: file.to_string(), line, column, message: e.to_string() }
        })?;
        Validator { file, text, rule_lines: rule_lines(text) }.plan(raw)
    }
}

struct Validator<'a> {
    file: &'a str,
    text: &'a str,
    rule_lines: Vec<usize>,
}

impl Validator<'_> {
    fn err(&self, key: &str, field: impl Into<String>, reason: impl Into<String>) -> PlanError {
        PlanError::Invalid {
            file: self.file.to_string(),
            line: key_line(self.text, key),
            field: field.into(),
            reason: reason.into(),
        }
    }

    fn rule_err(&self, i: usize, pattern: &str, reason: impl Into<String>) -> PlanError {
        PlanError::Invalid {
            file: self.file.to_string(),
            line: self.rule_lines.get(i).copied(),
            field: format!("rules[{i}] ('{pattern}')"),
            reason: reason.into(),
        }
    }

    fn plan(&self, raw: RawPlan) -> Result<Plan, PlanError> {
        let arch = arch_name(&raw.model.arch).ok_or_else(|| {
            self.err(
                "arch",
                "model.arch",
                format!(
                    "unknown architecture `{}` (kt knows {})",
                    raw.model.arch,
                    ARCHES.join(", ")
                ),
            )
        })?;
        if raw.worker.devices.is_empty() {
            return Err(self.err(
                "devices",
                "worker.devices",
                "no devices (give e.g. [cuda:0] or [cpu])",
            ));
        }
        let mut devices = Vec::new();
        for d in &raw.worker.devices {
            let dev = Device::parse(d).ok_or_else(|| {
                self.err(
                    "devices",
                    "worker.devices",
                    format!("unknown device `{d}` (use cpu or cuda:N)"),
                )
            })?;
            if devices.contains(&dev) {
                return Err(self.err(
                    "devices",
                    "worker.devices",
                    format!("`{d}` is listed twice"),
                ));
            }
            devices.push(dev);
        }
        let experts = raw.experts.map(|e| self.experts(e, &devices)).transpose()?;

        let mut rules = Vec::new();
        if raw.rules.is_empty() {
            return Err(self.err("rules", "rules", "no rules: every tensor needs a place"));
        }
        for (i, r) in raw.rules.into_iter().enumerate() {
            let pattern = Regex::new(&r.pattern)
                .map_err(|e| self.rule_err(i, &r.pattern, format!("bad regex: {e}")))?;
            let kind = match &r.kind {
                None => None,
                Some(k) => Some(Kind::parse(k).ok_or_else(|| {
                    self.rule_err(
                        i,
                        &r.pattern,
                        format!(
                            "unknown kind `{k}` (use attention, mlp, experts, gate, norm, \
                             embedding or lm_head)"
                        ),
                    )
                })?),
            };
            let place = if r.place == "experts" {
                if experts.is_none() {
                    return Err(self.rule_err(
                        i,
                        &r.pattern,
                        "places tensors on `experts` but the plan has no `experts` section",
                    ));
                }
                Place::Experts
            } else {
                let d = Device::parse(&r.place).ok_or_else(|| {
                    self.rule_err(
                        i,
                        &r.pattern,
                        format!("unknown place `{}` (use experts, cpu or cuda:N)", r.place),
                    )
                })?;
                if !devices.contains(&d) {
                    return Err(self.rule_err(
                        i,
                        &r.pattern,
                        format!("device `{d}` is not in worker.devices {:?}", raw.worker.devices),
                    ));
                }
                Place::Device(d)
            };
            rules.push(Rule {
                index: i,
                line: self.rule_lines.get(i).copied(),
                pattern,
                kind,
                place,
            });
        }
        Ok(Plan {
            file: self.file.to_string(),
            arch: arch.to_string(),
            name: raw.model.name,
            devices,
            experts,
            rules,
        })
    }

    fn experts(&self, raw: RawExperts, devices: &[Device]) -> Result<ExpertTier, PlanError> {
        if raw.servers.is_empty() {
            return Err(self.err("servers", "experts.servers", "no servers"));
        }
        let names: Vec<&String> = raw.servers.keys().collect();
        let index = |n: &str| names.iter().position(|s| s.as_str() == n);
        let mut servers = Vec::new();
        for (name, s) in &raw.servers {
            let mut replicas = Vec::new();
            for r in &s.replicas {
                let i = index(r).ok_or_else(|| {
                    self.err(
                        "replicas",
                        format!("experts.servers.{name}.replicas"),
                        format!("unknown server `{r}` (servers: {})", join(&names)),
                    )
                })?;
                if r == name {
                    return Err(self.err(
                        "replicas",
                        format!("experts.servers.{name}.replicas"),
                        "a server cannot be its own replica",
                    ));
                }
                if replicas.contains(&i) {
                    return Err(self.err(
                        "replicas",
                        format!("experts.servers.{name}.replicas"),
                        format!("`{r}` is listed twice"),
                    ));
                }
                replicas.push(i);
            }
            servers.push(Server { name: name.clone(), numa: s.numa, replicas });
        }
        let misplaced = |key: &str, field: &str, kind: &str| {
            self.err(key, format!("experts.{field}"), format!("only goes with `split: {kind}`"))
        };
        if raw.split != RawSplitKind::ByLayer && raw.layers.is_some() {
            return Err(misplaced("layers", "layers", "by_layer"));
        }
        if raw.split != RawSplitKind::ByExpert && raw.assign.is_some() {
            return Err(misplaced("assign", "assign", "by_expert"));
        }
        if raw.split != RawSplitKind::Intermediate && raw.slices.is_some() {
            return Err(misplaced("slices", "slices", "intermediate"));
        }
        // Per-server maps must name known servers and cover each server at most once.
        let per_server = |key: &str,
                          map: &BTreeMap<String, String>|
         -> Result<Vec<Ranges>, PlanError> {
            let mut out = vec![Vec::new(); servers.len()];
            for (name, text) in map {
                let i = index(name).ok_or_else(|| {
                    self.err(
                        name,
                        format!("experts.{key}.{name}"),
                        format!("unknown server `{name}` (servers: {})", join(&names)),
                    )
                })?;
                out[i] = parse_ranges(text).ok_or_else(|| {
                    self.err(
                        name,
                        format!("experts.{key}.{name}"),
                        format!("`{text}` is not a list of ranges like `0-29` or `0-3,8`"),
                    )
                })?;
            }
            check_overlap(&out).map_err(|(a, b, i)| {
                self.err(
                    key,
                    format!("experts.{key}"),
                    format!("{i} is given to both `{}` and `{}`", servers[a].name, servers[b].name),
                )
            })?;
            Ok(out)
        };
        let split = match raw.split {
            RawSplitKind::ByLayer => {
                let map = raw.layers.as_ref().ok_or_else(|| {
                    self.err(
                        "split",
                        "experts.layers",
                        "`split: by_layer` needs `layers: {SERVER: FIRST-LAST}`",
                    )
                })?;
                Split::ByLayer(per_server("layers", map)?)
            }
            RawSplitKind::ByExpert => Split::ByExpert(match &raw.assign {
                None => ExpertAssign::RoundRobin,
                Some(RawAssign::Rule(r)) if r == "round_robin" => ExpertAssign::RoundRobin,
                Some(RawAssign::Rule(r)) if r == "contiguous" => ExpertAssign::Contiguous,
                Some(RawAssign::Rule(r)) => {
                    return Err(self.err(
                        "assign",
                        "experts.assign",
                        format!(
                            "unknown rule `{r}` (use round_robin, contiguous or SERVER: RANGES)"
                        ),
                    ))
                }
                Some(RawAssign::Ranges(map)) => ExpertAssign::Ranges(per_server("assign", map)?),
            }),
            RawSplitKind::Intermediate => {
                let mut shares = vec![1; servers.len()];
                if let Some(map) = &raw.slices {
                    shares = vec![0; servers.len()];
                    for (name, &w) in map {
                        let i = index(name).ok_or_else(|| {
                            self.err(
                                name,
                                format!("experts.slices.{name}"),
                                format!("unknown server `{name}` (servers: {})", join(&names)),
                            )
                        })?;
                        shares[i] = w;
                    }
                    if let Some(i) = shares.iter().position(|&w| w == 0) {
                        return Err(self.err(
                            "slices",
                            "experts.slices",
                            format!(
                                "server `{}` gets no slice (give every server a share > 0)",
                                servers[i].name
                            ),
                        ));
                    }
                }
                Split::Intermediate(shares)
            }
        };
        // A replica answers for its primary over the same stream that carries its own calls,
        // and a call names experts, not rows: one server cannot hold two slices of an expert.
        if let (Split::Intermediate(_), Some(s)) =
            (&split, servers.iter().find(|s| !s.replicas.is_empty()))
        {
            return Err(self.err(
                "replicas",
                format!("experts.servers.{}.replicas", s.name),
                "replicas go with `split: by_layer` or `split: by_expert`; with `split: \
                 intermediate` a server would hold two slices of each expert, which a call \
                 cannot tell apart",
            ));
        }
        let format = |field: &str, v: &Option<String>| -> Result<ExpertFormat, PlanError> {
            match v {
                None => Ok(ExpertFormat::Native),
                Some(s) => ExpertFormat::parse(s).ok_or_else(|| {
                    self.err(
                        field,
                        format!("experts.kernel.{field}"),
                        format!("unknown kernel `{s}` (use gguf, native, bf16, amx_bf16, amx_int8, amx_int4)"),
                    )
                }),
            }
        };
        let (decode, prefill) = match &raw.kernel {
            None => (ExpertFormat::Native, ExpertFormat::Native),
            Some(k) => (format("decode", &k.decode)?, format("prefill", &k.prefill)?),
        };
        let hot = match raw.hot_on_gpu {
            None => None,
            Some(h) if h.per_layer == 0 => None,
            Some(h) => {
                let choose = match h.choose.as_deref() {
                    None | Some("static") => HotChoice::Static,
                    Some("frequency") => HotChoice::Frequency,
                    Some(other) => {
                        return Err(self.err(
                            "choose",
                            "experts.hot_on_gpu.choose",
                            format!("unknown choice `{other}` (use static or frequency)"),
                        ))
                    }
                };
                let device = match h.device.as_deref() {
                    Some(d) => {
                        Device::parse(d).filter(|d| devices.contains(d)).ok_or_else(|| {
                            self.err(
                                "device",
                                "experts.hot_on_gpu.device",
                                format!("`{d}` is not a worker device"),
                            )
                        })?
                    }
                    None => {
                        devices.iter().copied().find(|d| matches!(d, Device::Cuda(_))).ok_or_else(
                            || {
                                self.err(
                                    "hot_on_gpu",
                                    "experts.hot_on_gpu",
                                    "hot experts need a cuda device in worker.devices",
                                )
                            },
                        )?
                    }
                };
                Some(Hot { per_layer: h.per_layer, choose, device })
            }
        };
        Ok(ExpertTier { servers, split, decode, prefill, hot })
    }
}

fn join(names: &[&String]) -> String {
    names.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
}

/// Parses `0-29`, `5`, `0-3,8,10-12` into inclusive ranges.
pub fn parse_ranges(text: &str) -> Option<Ranges> {
    let mut out = Vec::new();
    for part in text.split(',') {
        let part = part.trim();
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.trim().parse().ok()?, b.trim().parse().ok()?),
            None => {
                let v = part.parse().ok()?;
                (v, v)
            }
        };
        if a > b {
            return None;
        }
        out.push((a, b));
    }
    Some(out)
}

/// The first index claimed twice: (owner a, owner b, index).
fn check_overlap(per_owner: &[Ranges]) -> Result<(), (usize, usize, usize)> {
    let mut all: Vec<(usize, usize, usize)> = per_owner
        .iter()
        .enumerate()
        .flat_map(|(o, rs)| rs.iter().map(move |&(a, b)| (a, b, o)))
        .collect();
    all.sort_unstable();
    for w in all.windows(2) {
        if w[1].0 <= w[0].1 {
            return Err((w[0].2, w[1].2, w[1].0));
        }
    }
    Ok(())
}

/// 1-based line of the first `key:` in the text (best effort, for error messages).
fn key_line(text: &str, key: &str) -> Option<usize> {
    let re = Regex::new(&format!(r"(^|[\s{{,]){}\s*:", regex::escape(key))).ok()?;
    text.lines().position(|l| re.is_match(strip_comment(l))).map(|i| i + 1)
}

fn strip_comment(line: &str) -> &str {
    match line.find(" #") {
        Some(i) => &line[..i],
        None if line.trim_start().starts_with('#') => "",
        None => line,
    }
}

/// 1-based lines of the items of the top-level `rules:` list, in order.
fn rule_lines(text: &str) -> Vec<usize> {
    let mut out = Vec::new();
    let mut inside = false;
    let mut item_indent = None;
    for (i, line) in text.lines().enumerate() {
        let code = strip_comment(line);
        if code.trim().is_empty() {
            continue;
        }
        let indent = code.len() - code.trim_start().len();
        if !inside {
            if indent == 0 && code.trim_end().starts_with("rules:") {
                inside = true;
            }
            continue;
        }
        let body = code.trim_start();
        if indent == 0 && !body.starts_with('-') {
            break;
        }
        if body.starts_with("- ") || body == "-" {
            match item_indent {
                None => {
                    item_indent = Some(indent);
                    out.push(i + 1);
                }
                Some(n) if n == indent => out.push(i + 1),
                Some(_) => {}
            }
        }
    }
    out
}
