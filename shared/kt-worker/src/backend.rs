//! The backend seam: what the scheduler needs from a device to run iterations.
//!
//! A backend owns the model's dense parts on its device(s) and one paged KV cache. The
//! scheduler ([`crate::engine`]) only decides which tokens of which sequences run together;
//! it never touches weights or cache memory. [`CpuBackend`] is the CPU reference; a CUDA
//! backend implements the same trait with its own sequence handle (block table on the GPU).

use std::sync::Arc;

use kt_models::{KvPool, Model, ModelConfig, ModelError, SeqKv, Step};

/// One sequence's part of an iteration: `tokens` after the positions `seq` holds.
#[derive(Debug)]
pub struct BatchStep<'a, S> {
    pub seq: &'a mut S,
    pub tokens: &'a [u32],
}

/// A device (or group of devices) that runs batched iterations over a paged KV cache.
pub trait Backend: Send + 'static {
    /// A sequence's place in the KV cache (its block table and length). A fresh one is empty.
    type Seq: Default + Send;

    fn config(&self) -> &ModelConfig;
    /// Devices computed on, e.g. `["cpu"]` or `["cuda:0", "cuda:1"]`.
    fn devices(&self) -> Vec<String>;
    /// Routed experts per token in force.
    fn experts_per_token(&self) -> usize;
    /// Positions per KV block.
    fn block_tokens(&self) -> usize;
    fn total_blocks(&self) -> usize;
    fn free_blocks(&self) -> usize;
    /// Positions `seq` holds.
    fn seq_len(&self, seq: &Self::Seq) -> usize;
    /// Blocks `seq` must still take to hold `tokens` positions in all.
    fn blocks_needed(&self, seq: &Self::Seq, tokens: usize) -> usize;
    /// Blocks a sequence of `tokens` positions occupies.
    fn blocks_for(&self, tokens: usize) -> usize;
    /// Gives every block of `seq` back; `seq` is empty afterwards.
    fn release(&mut self, seq: &mut Self::Seq);
    /// Runs one iteration and returns, per step, the logits after its last token. Fails with
    /// [`ModelError::KvFull`], running nothing, when the steps need more blocks than are free.
    fn forward(
        &mut self,
        steps: &mut [BatchStep<'_, Self::Seq>],
    ) -> Result<Vec<Vec<f32>>, ModelError>;
}

/// How big a KV cache to make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvSize {
    Blocks(usize),
    /// As many blocks as fit in this many bytes.
    Bytes(usize),
}

/// The CPU reference backend: a [`Model`] and one [`KvPool`].
#[derive(Debug)]
pub struct CpuBackend {
    model: Arc<Model>,
    pool: KvPool,
    experts_per_token: usize,
}

impl CpuBackend {
    /// `model` with a KV cache of `n_blocks` blocks of `block_tokens` positions.
    pub fn new(model: Arc<Model>, block_tokens: usize, n_blocks: usize) -> Self {
        let pool = KvPool::new(&model.config, block_tokens, n_blocks.max(1));
        let experts_per_token = model.experts_per_token();
        Self { model, pool, experts_per_token }
    }

    /// `model` with a KV cache of `size`; a byte budget is capped at what `max_batch`
    /// sequences of the full context can use.
    pub fn sized(model: Arc<Model>, block_tokens: usize, size: KvSize, max_batch: usize) -> Self {
        match size {
            KvSize::Blocks(n) => Self::new(model, block_tokens, n),
            KvSize::Bytes(bytes) => {
                let bt = block_tokens.max(1);
                let most = max_batch.max(1).saturating_mul(model.config.max_position.div_ceil(bt));
                let fit = bytes / KvPool::block_bytes_for(&model.config, bt).max(1);
                Self::new(model, bt, fit.min(most))
            }
        }
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }
}

impl Backend for CpuBackend {
    type Seq = SeqKv;

    fn config(&self) -> &ModelConfig {
        &self.model.config
    }

    fn devices(&self) -> Vec<String> {
        vec!["cpu".to_string()]
    }

    fn experts_per_token(&self) -> usize {
        self.experts_per_token
    }

    fn block_tokens(&self) -> usize {
        self.pool.block_tokens()
    }

    fn total_blocks(&self) -> usize {
        self.pool.total_blocks()
    }

    fn free_blocks(&self) -> usize {
        self.pool.free_blocks()
    }

    fn seq_len(&self, seq: &SeqKv) -> usize {
        seq.len()
    }

    fn blocks_needed(&self, seq: &SeqKv, tokens: usize) -> usize {
        self.pool.blocks_needed(seq, tokens)
    }

    fn blocks_for(&self, tokens: usize) -> usize {
        self.pool.blocks_for(tokens)
    }

    fn release(&mut self, seq: &mut SeqKv) {
        self.pool.release(seq);
    }

    fn forward(&mut self, steps: &mut [BatchStep<'_, SeqKv>]) -> Result<Vec<Vec<f32>>, ModelError> {
        let mut steps: Vec<Step<'_>> =
            steps.iter_mut().map(|s| Step { kv: &mut *s.seq, tokens: s.tokens }).collect();
        self.model.forward_batch(&mut self.pool, &mut steps)
    }
}
