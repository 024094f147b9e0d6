//! kt's contracts between processes: the messages and services of `proto/kt/v1` (generated at
//! build time, see `build.rs`), and checked conversions between wire messages and kt types.
//!
//! Every conversion from a wire message treats it as hostile: shapes are checked against
//! payload lengths, dtypes and ids against their ranges, and sizes against [`Limits`], before
//! anything is allocated; a bad message gives a [`WireError`], never a panic.

pub mod convert;
pub mod shm;
pub mod values;

/// Generated code of package `kt.v1`.
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::doc_markdown
)]
pub mod v1 {
    tonic::include_proto!("kt.v1");
}

pub use convert::{
    check_k, check_layer, decode_request, decode_tensor_f32, encode_request, encode_tensor_f32,
    finish_call, read_values, write_values, CallParts, ExpertCall, Limits, SeamShape, WireDType,
    WireError,
};

/// Request metadata key carrying the client's model config hash on `Expert.Forward`
/// (16 lower-case hex digits).
pub const CONFIG_HASH_HEADER: &str = "kt-config-hash";

/// `Forward` request metadata key naming the shared-memory ring (from `OpenShm`) the stream
/// should serve as well.
pub const SHM_RING_HEADER: &str = "kt-shm-ring";

/// `Forward` response metadata key: `attached`, or `refused: <reason>`.
pub const SHM_STATUS_HEADER: &str = "kt-shm";

/// The text form of a config hash, as sent in [`CONFIG_HASH_HEADER`].
pub fn hash_hex(hash: u64) -> String {
    format!("{hash:016x}")
}
