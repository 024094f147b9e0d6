//! kt's shared vocabulary: the GGML element/block types, cheap shared byte slices (backed by a
//! memory map or an owned buffer) and the weight tensor that points into them.

mod bytes;
mod dtype;
mod tensor;

pub use bytes::SharedBytes;
pub use dtype::GgmlType;
pub use tensor::{TensorError, WeightTensor};
