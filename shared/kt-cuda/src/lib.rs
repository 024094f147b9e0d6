//! kt-worker's CUDA backend: the worker half of a model (attention with a paged KV cache,
//! MLA with weight absorption, norms, dense MLPs, router gates, shared experts, lm_head) on a
//! GPU, through cudarc. The CUDA driver, NVRTC and cuBLAS are loaded when a device is opened,
//! so kt builds and its tests run without a GPU or CUDA toolkit; [`Gpu::open`] says clearly
//! when they are missing. Kernels (kernels.cu) are compiled with NVRTC at start-up.
//!
//! Not done yet (said, not hidden): sampling on the GPU (logits are copied to the host and
//! sampled there), CUDA graphs, quantized weights on the device (GGUF weights are converted to
//! bf16 or f32 at load), fp8 KV, multi-GPU (layer split and NCCL tensor parallelism).

mod device;
mod model;

pub use device::{Gpu, WeightDtype};
pub use model::{matmul, CudaModel, CudaOptions, KvDtype};

/// Errors of the CUDA backend.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// No usable CUDA installation or device.
    #[error("CUDA is not available: {0}")]
    Unavailable(String),
    #[error("CUDA driver: {0}")]
    Driver(String),
    #[error("cuBLAS: {0}")]
    Blas(String),
    #[error("kernel: {0}")]
    Kernel(String),
    #[error(transparent)]
    Model(#[from] kt_models::ModelError),
}

impl From<cudarc::driver::DriverError> for CudaError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        Self::Driver(format!("{e:?}"))
    }
}

impl From<cudarc::cublas::result::CublasError> for CudaError {
    fn from(e: cudarc::cublas::result::CublasError) -> Self {
        Self::Blas(format!("{e:?}"))
    }
}
