//! The YAML as written: serde structs that mirror a plan file, with no meaning checked beyond
//! types and key names (every struct denies unknown keys). [`crate::Plan::parse`] turns them
//! into a validated [`crate::Plan`].

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPlan {
    pub model: RawModel,
    pub worker: RawWorker,
    #[serde(default)]
    pub experts: Option<RawExperts>,
    pub rules: Vec<RawRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    pub arch: String,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWorker {
    pub devices: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawExperts {
    pub servers: BTreeMap<String, RawServer>,
    pub split: RawSplitKind,
    /// `split: by_layer`: server → layer ranges ("0-29", "3,5-9").
    #[serde(default)]
    pub layers: Option<BTreeMap<String, String>>,
    /// `split: by_expert`: `round_robin`, `contiguous`, or server → expert-id ranges.
    #[serde(default)]
    pub assign: Option<RawAssign>,
    /// `split: intermediate`: server → share of each expert's intermediate rows (default equal).
    #[serde(default)]
    pub slices: Option<BTreeMap<String, u32>>,
    #[serde(default)]
    pub kernel: Option<RawKernel>,
    #[serde(default)]
    pub hot_on_gpu: Option<RawHot>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub numa: u32,
    #[serde(default)]
    pub replicas: Vec<String>,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RawSplitKind {
    ByLayer,
    ByExpert,
    Intermediate,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawAssign {
    Rule(String),
    Ranges(BTreeMap<String, String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKernel {
    #[serde(default)]
    pub decode: Option<String>,
    #[serde(default)]
    pub prefill: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHot {
    pub per_layer: usize,
    #[serde(default)]
    pub choose: Option<String>,
    #[serde(default)]
    pub device: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    #[serde(rename = "match")]
    pub pattern: String,
    #[serde(default)]
    pub kind: Option<String>,
    pub place: String,
}
