//! kt's shared vocabulary: the GGML element/block types, cheap shared byte slices (backed by a
//! memory map or an owned buffer), the weight tensor that points into them, and pinning a
//! thread to CPUs.

mod bytes;
mod dtype;
mod tensor;
mod thread;

pub use bytes::SharedBytes;
pub use dtype::GgmlType;
pub use tensor::{TensorError, WeightTensor};
pub use thread::pin_current_thread;
