//! One CUDA device as kt uses it: a context and stream, the NVRTC-compiled kernels, cuBLAS,
//! and small launch helpers over raw device addresses.
//!
//! Event tracking is turned off: everything runs on the one stream, in order, so cudarc's
//! per-buffer events would only add overhead; buffers live as long as the [`Gpu`] that
//! allocated them.

use std::cell::{Cell, RefCell};
use std::sync::Arc;

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr,
    LaunchConfig, PushKernelArg, ValidAsZeroBits,
};

use crate::CudaError;

const KERNELS: &str = include_str!("kernels.cu");

/// The kernels of kernels.cu, loaded once per device.
pub(crate) struct Kernels {
    pub rms_norm: CudaFunction,
    pub rope: CudaFunction,
    pub kv_write: CudaFunction,
    pub kv_write_bf16: CudaFunction,
    pub gather_rows: CudaFunction,
    pub silu_mul: CudaFunction,
    pub add_inplace: CudaFunction,
    pub add_bias: CudaFunction,
    pub scale_rows_sigmoid: CudaFunction,
    pub to_bf16: CudaFunction,
    pub attend: CudaFunction,
    pub attend_bf16: CudaFunction,
    pub scatter_add_weighted: CudaFunction,
    pub fill_zero: CudaFunction,
    _module: Arc<CudaModule>,
}

/// A device buffer for one step's intermediate values, carved from the [`Gpu`]'s arena: valid
/// until the next [`Gpu::reset_scratch`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dev {
    ptr: u64,
}

/// Anything with a device address.
pub(crate) trait DevAddr {
    fn addr(&self, stream: &CudaStream) -> u64;
}

impl<T> DevAddr for CudaSlice<T> {
    fn addr(&self, stream: &CudaStream) -> u64 {
        let (p, _) = self.device_ptr(stream);
        p
    }
}

impl DevAddr for Dev {
    fn addr(&self, _: &CudaStream) -> u64 {
        self.ptr
    }
}

/// Bytes of the scratch arena; a step that needs more gets extra allocations, freed at the
/// next reset.
const ARENA_BYTES: usize = 256 << 20;

/// A device, its stream, kernels and cuBLAS handle.
pub struct Gpu {
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) k: Kernels,
    blas: CudaBlas,
    ordinal: usize,
    /// One allocation that a step's intermediate buffers are bumped from (no allocation per
    /// kernel on the hot path), and what did not fit.
    arena: CudaSlice<u8>,
    arena_used: Cell<usize>,
    overflow: RefCell<Vec<CudaSlice<u8>>>,
    /// The last f32 → bf16 conversion of this step: (source, elements, bf16 copy).
    last_bf16: Cell<Option<(u64, usize, Dev)>>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu").field("ordinal", &self.ordinal).finish_non_exhaustive()
    }
}

/// How a weight matrix is stored on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightDtype {
    /// f32, products in strict f32 (no TF32): the parity reference against the CPU backend.
    F32,
    /// bf16 weights, activations rounded to bf16, f32 accumulation (tensor cores).
    Bf16,
}

impl Gpu {
    /// Opens device `ordinal`: loads the CUDA driver, NVRTC and cuBLAS at run time and
    /// compiles the kernels. Fails with a clear message where any of them is missing.
    pub fn open(ordinal: usize) -> Result<Self, CudaError> {
        // SAFETY: these only try to dlopen the libraries by name and close them again.
        let present = unsafe {
            [
                ("the CUDA driver (libcuda.so)", cudarc::driver::sys::is_culib_present()),
                ("NVRTC (libnvrtc.so)", cudarc::nvrtc::sys::is_culib_present()),
                ("cuBLAS (libcublas.so)", cudarc::cublas::sys::is_culib_present()),
            ]
        };
        if let Some((name, _)) = present.iter().find(|(_, ok)| !ok) {
            return Err(CudaError::Unavailable(format!(
                "{name} was not found; install the NVIDIA driver and CUDA libraries (or add \
                 their folder to LD_LIBRARY_PATH)"
            )));
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| CudaError::Unavailable(format!("cuda:{ordinal}: {e:?}")))?;
        // SAFETY: kt uses one stream per device and keeps every buffer alive as long as the
        // model that uses it, so the ordering events cudarc would record are not needed.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let ptx = cudarc::nvrtc::compile_ptx(KERNELS)
            .map_err(|e| CudaError::Kernel(format!("compiling kernels.cu: {e:?}")))?;
        let module = ctx.load_module(ptx)?;
        let f = |name: &str| module.load_function(name);
        let k = Kernels {
            rms_norm: f("rms_norm")?,
            rope: f("rope")?,
            kv_write: f("kv_write")?,
            kv_write_bf16: f("kv_write_bf16")?,
            gather_rows: f("gather_rows")?,
            silu_mul: f("silu_mul")?,
            add_inplace: f("add_inplace")?,
            add_bias: f("add_bias")?,
            scale_rows_sigmoid: f("scale_rows_sigmoid")?,
            to_bf16: f("to_bf16")?,
            attend: f("attend")?,
            attend_bf16: f("attend_bf16")?,
            scatter_add_weighted: f("scatter_add_weighted")?,
            fill_zero: f("fill_zero")?,
            _module: module,
        };
        let blas = std::panic::catch_unwind(|| CudaBlas::new(stream.clone()))
            .map_err(|_| {
                CudaError::Unavailable("cuBLAS (libcublas.so) could not be loaded".into())
            })?
            .map_err(|e| CudaError::Unavailable(format!("cuBLAS: {e:?}")))?;
        // SAFETY: scratch memory is written by kernels before it is read (see `scratch`).
        let arena = unsafe { stream.alloc::<u8>(ARENA_BYTES) }?;
        Ok(Self {
            ctx,
            stream,
            k,
            blas,
            ordinal,
            arena,
            arena_used: Cell::new(0),
            overflow: RefCell::new(Vec::new()),
            last_bf16: Cell::new(None),
        })
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The device's name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn name(&self) -> String {
        self.ctx.name().unwrap_or_else(|_| format!("cuda:{}", self.ordinal))
    }

    pub(crate) fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>, CudaError> {
        Ok(self.stream.clone_htod(host)?)
    }

    pub(crate) fn zeros<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        n: usize,
    ) -> Result<CudaSlice<T>, CudaError> {
        Ok(self.stream.alloc_zeros::<T>(n.max(1))?)
    }

    /// Frees every scratch buffer of the previous step. Work queued on the one stream runs in
    /// order, so the next step's kernels reuse the memory only after the last one's are done.
    pub(crate) fn reset_scratch(&self) {
        self.arena_used.set(0);
        self.overflow.borrow_mut().clear();
        self.last_bf16.set(None);
    }

    /// The bf16 copy of `n` values at `src` made earlier in this step, if it is the last one
    /// made. Sound because no kernel writes in place to a buffer after it fed a product.
    pub(crate) fn bf16_of(&self, src: u64, n: usize) -> Option<Dev> {
        match self.last_bf16.get() {
            Some((s, len, d)) if s == src && len == n => Some(d),
            _ => None,
        }
    }

    pub(crate) fn remember_bf16(&self, src: u64, n: usize, copy: Dev) {
        self.last_bf16.set(Some((src, n, copy)));
    }

    /// A buffer of `n` elements for a kernel or GEMM to fill completely (not cleared: no
    /// memset on the hot path); valid until [`Gpu::reset_scratch`].
    pub(crate) fn scratch<T: DeviceRepr>(&self, n: usize) -> Result<Dev, CudaError> {
        let bytes = (n.max(1) * std::mem::size_of::<T>()).next_multiple_of(256);
        let used = self.arena_used.get();
        if used + bytes <= ARENA_BYTES {
            self.arena_used.set(used + bytes);
            return Ok(Dev { ptr: self.ptr(&self.arena) + used as u64 });
        }
        // SAFETY: as for the arena: the memory is written before it is read.
        let extra = unsafe { self.stream.alloc::<u8>(bytes) }?;
        let ptr = self.ptr(&extra);
        self.overflow.borrow_mut().push(extra);
        Ok(Dev { ptr })
    }

    /// Copies `host` into a scratch buffer.
    pub(crate) fn put<T: DeviceRepr>(&self, host: &[T]) -> Result<Dev, CudaError> {
        let d = self.scratch::<T>(host.len())?;
        // SAFETY: `d` holds `host.len()` elements; a copy from pageable host memory returns
        // once the source has been staged, so `host` may go away afterwards.
        unsafe { cudarc::driver::result::memcpy_htod_async(d.ptr, host, self.stream.cu_stream()) }?;
        Ok(d)
    }

    /// The first `n` values of a scratch buffer, once the work before it is done.
    pub(crate) fn get(&self, d: Dev, n: usize) -> Result<Vec<f32>, CudaError> {
        Ok(self.get_many(&[(d, n)])?.pop().unwrap_or_default())
    }

    /// Several scratch buffers' first values, with one wait for the stream.
    pub(crate) fn get_many(&self, parts: &[(Dev, usize)]) -> Result<Vec<Vec<f32>>, CudaError> {
        let mut out: Vec<Vec<f32>> = parts.iter().map(|&(_, n)| vec![0f32; n]).collect();
        for (v, &(d, _)) in out.iter_mut().zip(parts) {
            // SAFETY: `v` holds as many values as the caller says the buffer has; the copies
            // are complete when the stream synchronizes, before `out` is returned.
            unsafe {
                cudarc::driver::result::memcpy_dtoh_async(v, d.ptr, self.stream.cu_stream())
            }?;
        }
        self.sync()?;
        Ok(out)
    }

    pub(crate) fn sync(&self) -> Result<(), CudaError> {
        Ok(self.stream.synchronize()?)
    }

    /// Device address of a buffer (valid while the buffer lives).
    pub(crate) fn ptr<A: DevAddr>(&self, a: &A) -> u64 {
        a.addr(&self.stream)
    }

    /// Runs `f` with a launch builder for `func`; the arguments are device addresses and
    /// scalars, as kernels.cu declares them.
    pub(crate) fn launch(
        &self,
        func: &CudaFunction,
        grid: u32,
        block: u32,
        shared: u32,
        args: &[Arg],
    ) -> Result<(), CudaError> {
        if grid == 0 {
            return Ok(());
        }
        let mut b = self.stream.launch_builder(func);
        for a in args {
            match a {
                Arg::Ptr(p) => b.arg(p),
                Arg::I32(v) => b.arg(v),
                Arg::I64(v) => b.arg(v),
                Arg::F32(v) => b.arg(v),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (block, 1, 1),
            shared_mem_bytes: shared,
        };
        // SAFETY: every call site passes the arguments in the order and of the types that
        // kernel declares in kernels.cu, addresses of live buffers large enough for the
        // grid it launches.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// Elementwise launch over `n` items.
    pub(crate) fn launch_1d(
        &self,
        func: &CudaFunction,
        n: usize,
        args: &[Arg],
    ) -> Result<(), CudaError> {
        self.launch(func, n.div_ceil(256) as u32, 256, 0, args)
    }

    /// `C[n × m] = A[n × k] · W[m × k]^T` for row-major A (rows `lda` apart) and W, C (rows
    /// `ldc` apart), repeated `batch` times with the given element strides; W is f32 or bf16
    /// (then A must be bf16 too), C is f32 with f32 accumulation.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm(
        &self,
        dtype: WeightDtype,
        w: u64,
        a: u64,
        c: u64,
        (n, m, k): (usize, usize, usize),
        (lda, ldc): (usize, usize),
        (batch, stride_w, stride_a, stride_c): (usize, usize, usize, usize),
    ) -> Result<(), CudaError> {
        let ty = match dtype {
            WeightDtype::F32 => cudaDataType::CUDA_R_32F,
            WeightDtype::Bf16 => cudaDataType::CUDA_R_16BF,
        };
        let (alpha, beta) = (1.0f32, 0.0f32);
        // Column-major view: C^T (m × n, ld ldc) = W (k × m, ld k)^T · A^T (k × n, ld lda).
        // SAFETY: the call sites pass addresses of live device buffers holding at least the
        // elements the dimensions, leading dimensions and strides address.
        unsafe {
            cudarc::cublas::result::gemm_strided_batched_ex(
                *self.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                m as i32,
                n as i32,
                k as i32,
                (&alpha as *const f32).cast(),
                w as *const std::ffi::c_void,
                ty,
                k as i32,
                stride_w as i64,
                a as *const std::ffi::c_void,
                ty,
                lda as i32,
                stride_a as i64,
                (&beta as *const f32).cast(),
                c as *mut std::ffi::c_void,
                cudaDataType::CUDA_R_32F,
                ldc as i32,
                stride_c as i64,
                batch as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )?;
        }
        Ok(())
    }
}

/// One kernel argument.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Arg {
    Ptr(u64),
    I32(i32),
    I64(i64),
    F32(f32),
}
