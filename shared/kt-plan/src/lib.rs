//! Placement plans (`rules/*.yaml`): which worker device or expert server holds each tensor of
//! a Mixture-of-Experts model.
//!
//! A plan is read in two stages: [`schema`] mirrors the YAML with serde, then
//! [`Plan::parse`] validates it into a typed [`Plan`] that cannot be invalid (regexes compiled,
//! devices parsed, servers known, the expert split well formed). [`ModelShape`] lists a model's
//! tensors with shapes and bytes, built from a Hugging Face `config.json` alone or from a GGUF
//! header; [`resolve`] places every tensor (first matching rule wins), assigns routed experts to
//! servers and sums memory per device and per server. The schema is documented in
//! `rules/README.md`.

pub mod error;
pub mod model;
pub mod plan;
pub mod resolve;
pub mod schema;

pub use error::{ModelShapeError, PlanError};
pub use model::{Kind, ModelShape, TensorDesc, WeightDtype};
pub use plan::{
    Device, ExpertAssign, ExpertFormat, ExpertTier, Hot, HotChoice, Place, Plan, Rule, Server,
    Split,
};
pub use resolve::{resolve, Limits, Placement, Problem};

/// Bytes in one GiB.
pub const GIB: u64 = 1 << 30;
