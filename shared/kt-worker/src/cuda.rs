//! The CUDA backend behind the worker's [`Backend`] seam: [`kt_cuda::CudaModel`] (attention,
//! dense layers, gates, shared experts and the paged KV cache on one GPU; routed experts on
//! the CPU tier through the model's expert seam).

use std::sync::Arc;

use kt_cuda::{CudaModel, CudaOptions, Gpu, KvDtype, WeightDtype};
use kt_models::{KvPool, Model, ModelConfig, ModelError, SeqKv, Step};

use crate::backend::{Backend, BatchStep, KvSize};
use crate::WorkerError;

/// A model's worker half on `cuda:N` (or on several GPUs, layers split across them).
pub struct CudaBackend {
    cuda: CudaModel,
    experts_per_token: usize,
    devices: Vec<String>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend").field("devices", &self.devices).finish_non_exhaustive()
    }
}

impl CudaBackend {
    /// Opens the GPUs `ordinals` (layers split evenly across them, in order), uploads
    /// `model`'s dense parts in bf16 and makes a bf16 KV cache of `size` (a byte budget is
    /// capped at what `max_batch` full-context sequences use; every GPU holds its layers' part
    /// of each block). Fails with a clear message where no CUDA driver or device is present.
    pub fn open(
        model: Arc<Model>,
        ordinals: &[usize],
        block_tokens: usize,
        size: KvSize,
        max_batch: usize,
    ) -> Result<Self, WorkerError> {
        let mut gpus = Vec::with_capacity(ordinals.len());
        for &n in ordinals {
            gpus.push(Gpu::open(n).map_err(|e| WorkerError::Config(format!("cuda:{n}: {e}")))?);
        }
        if gpus.is_empty() {
            return Err(WorkerError::Config("no GPU given".into()));
        }
        let bt = block_tokens.max(1);
        let kv_blocks = match size {
            KvSize::Blocks(n) => n.max(1),
            KvSize::Bytes(bytes) => {
                // bf16 KV: half the CPU pool's f32 bytes per block.
                let per = (KvPool::block_bytes_for(&model.config, bt) / 2).max(1);
                let most = max_batch.max(1).saturating_mul(model.config.max_position.div_ceil(bt));
                (bytes / per).clamp(1, most.max(1))
            }
        };
        let opts = CudaOptions {
            dtype: WeightDtype::Bf16,
            kv_dtype: KvDtype::Bf16,
            block_tokens: bt,
            kv_blocks,
        };
        Self::with_options(model, gpus, opts)
    }

    /// [`CudaBackend::open`] with every option given (f32 weights and KV for exact parity
    /// with the CPU backend, block size, blocks).
    pub fn with_options(
        model: Arc<Model>,
        gpus: Vec<Gpu>,
        opts: CudaOptions,
    ) -> Result<Self, WorkerError> {
        let devices: Vec<String> = gpus.iter().map(|g| format!("cuda:{}", g.ordinal())).collect();
        let device = devices.join(",");
        let kv_blocks = opts.kv_blocks;
        let experts_per_token = model.experts_per_token();
        let cuda = CudaModel::split_evenly(gpus, model, opts)
            .map_err(|e| WorkerError::Config(format!("{device}: {e}")))?;
        tracing::info!(
            %device,
            gpu = %cuda.gpu().name(),
            weights_gib = cuda.weight_bytes() as f64 / (1u64 << 30) as f64,
            kv_blocks,
            "CUDA backend ready"
        );
        Ok(Self { cuda, experts_per_token, devices })
    }
}

impl Backend for CudaBackend {
    type Seq = SeqKv;

    fn config(&self) -> &ModelConfig {
        &self.cuda.model().config
    }

    fn devices(&self) -> Vec<String> {
        self.devices.clone()
    }

    fn experts_per_token(&self) -> usize {
        self.experts_per_token
    }

    fn block_tokens(&self) -> usize {
        self.cuda.blocks().block_tokens()
    }

    fn total_blocks(&self) -> usize {
        self.cuda.blocks().total_blocks()
    }

    fn free_blocks(&self) -> usize {
        self.cuda.blocks().free_blocks()
    }

    fn seq_len(&self, seq: &SeqKv) -> usize {
        seq.len()
    }

    fn blocks_needed(&self, seq: &SeqKv, tokens: usize) -> usize {
        self.cuda.blocks().blocks_needed(seq, tokens)
    }

    fn blocks_for(&self, tokens: usize) -> usize {
        self.cuda.blocks().blocks_for(tokens)
    }

    fn release(&mut self, seq: &mut SeqKv) {
        self.cuda.blocks_mut().release(seq);
    }

    fn forward(&mut self, steps: &mut [BatchStep<'_, SeqKv>]) -> Result<Vec<Vec<f32>>, ModelError> {
        let mut steps: Vec<Step<'_>> =
            steps.iter_mut().map(|s| Step { kv: &mut *s.seq, tokens: s.tokens }).collect();
        self.cuda.forward_batch(&mut steps).map_err(|e| match e {
            kt_cuda::CudaError::Model(m) => m,
            other => ModelError::Device(other.to_string()),
        })
    }
}
