//! The paged KV cache: one pool of fixed-size blocks per model, from which every sequence
//! takes the blocks it needs as it grows and to which it gives them back when it ends.
//!
//! A block holds `block_tokens` positions of every layer. A sequence is a [`SeqKv`]: the list
//! of its blocks (its block table) and its length. Position `p` of a sequence lives in block
//! `blocks[p / block_tokens]` at offset `p % block_tokens`, so sequences never need
//! contiguous memory and a finished sequence's blocks are reused at once by others.
//!
//! What one position holds per layer depends on the attention: GQA keeps keys and values
//! (`n_kv_heads × head_dim` each); MLA keeps the normalized compressed latent (`kv_lora`) and
//! the shared RoPE key (`rope`) — the weight-absorbed form, which is what makes MLA's cache
//! small.

use crate::config::{AttentionConfig, ModelConfig};
use crate::ModelError;

/// Floats per position of one layer: (first, second) = GQA (keys, values), MLA (latent,
/// RoPE key).
pub fn widths(config: &ModelConfig) -> (usize, usize) {
    match config.attention {
        AttentionConfig::Gqa { n_kv_heads, head_dim, .. } => {
            (n_kv_heads * head_dim, n_kv_heads * head_dim)
        }
        AttentionConfig::Mla { kv_lora_rank, qk_rope_head_dim, .. } => {
            (kv_lora_rank, qk_rope_head_dim)
        }
    }
}

/// One layer's share of every block: `[block][offset][width]` for each of the two parts.
#[derive(Debug, Default)]
struct LayerBlocks {
    k: Vec<f32>,
    v: Vec<f32>,
}

/// Which blocks of a cache are free, and the block tables of sequences: the bookkeeping of a
/// paged cache without its storage (shared by the CPU pool and device backends' pools).
#[derive(Debug, Clone)]
pub struct KvBlocks {
    block_tokens: usize,
    /// Free block ids; taken from the end.
    free: Vec<u32>,
    total: usize,
    /// Grows by a block when none is free instead of failing (a pool owned by one sequence).
    growable: bool,
}

impl KvBlocks {
    /// `n_blocks` blocks of `block_tokens` positions (at least 1).
    pub fn new(block_tokens: usize, n_blocks: usize) -> Self {
        // Reversed so that blocks are handed out in id order.
        let free = (0..n_blocks as u32).rev().collect();
        Self { block_tokens: block_tokens.max(1), free, total: n_blocks, growable: false }
    }

    /// No blocks at first; [`KvBlocks::reserve`] adds blocks instead of failing.
    pub fn growable(block_tokens: usize) -> Self {
        Self { growable: true, ..Self::new(block_tokens, 0) }
    }

    pub fn block_tokens(&self) -> usize {
        self.block_tokens
    }

    pub fn total_blocks(&self) -> usize {
        self.total
    }

    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    pub fn is_growable(&self) -> bool {
        self.growable
    }

    /// Blocks a sequence of `tokens` positions occupies.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_tokens)
    }

    /// Blocks `seq` must still take to hold `tokens` positions in all.
    pub fn blocks_needed(&self, seq: &SeqKv, tokens: usize) -> usize {
        self.blocks_for(tokens).saturating_sub(seq.blocks.len())
    }

    /// Gives `seq` enough blocks for `tokens` positions. Fails, taking nothing, when too few
    /// are free (a growable pool grows instead: see [`KvBlocks::total_blocks`]).
    pub fn reserve(&mut self, seq: &mut SeqKv, tokens: usize) -> Result<(), ModelError> {
        let need = self.blocks_needed(seq, tokens);
        if need > self.free.len() {
            if !self.growable {
                return Err(ModelError::KvFull { needed: need, free: self.free.len() });
            }
            let grow = need - self.free.len();
            self.free.extend((self.total as u32..(self.total + grow) as u32).rev());
            self.total += grow;
        }
        let at = self.free.len() - need;
        seq.blocks.extend(self.free.drain(at..).rev());
        Ok(())
    }

    /// Returns every block of `seq`; `seq` is empty afterwards.
    pub fn release(&mut self, seq: &mut SeqKv) {
        self.free.extend(seq.blocks.drain(..).rev());
        seq.len = 0;
    }

    /// Forgets positions `len..` of `seq`, giving back the blocks no longer needed.
    pub fn truncate(&mut self, seq: &mut SeqKv, len: usize) {
        if len >= seq.len {
            return;
        }
        let keep = self.blocks_for(len);
        self.free.extend(seq.blocks.drain(keep..).rev());
        seq.len = len;
    }

    /// Index of position `pos` of a sequence with block table `table` among all positions.
    #[inline]
    pub fn slot(&self, table: &[u32], pos: usize) -> usize {
        table[pos / self.block_tokens] as usize * self.block_tokens + pos % self.block_tokens
    }
}

/// The KV cache of a model on the CPU: [`KvBlocks`] and the blocks' storage.
#[derive(Debug)]
pub struct KvPool {
    blocks: KvBlocks,
    kw: usize,
    vw: usize,
    layers: Vec<LayerBlocks>,
}

impl KvPool {
    /// A pool of `n_blocks` blocks of `block_tokens` positions each, allocated up front.
    pub fn new(config: &ModelConfig, block_tokens: usize, n_blocks: usize) -> Self {
        Self::with_blocks(config, KvBlocks::new(block_tokens, n_blocks))
    }

    fn with_blocks(config: &ModelConfig, blocks: KvBlocks) -> Self {
        let (kw, vw) = widths(config);
        let mut pool = Self {
            blocks,
            kw,
            vw,
            layers: (0..config.n_layers).map(|_| Default::default()).collect(),
        };
        pool.fit_storage();
        pool
    }

    /// As many blocks as fit in `bytes` (at least one).
    pub fn with_budget(config: &ModelConfig, block_tokens: usize, bytes: usize) -> Self {
        let per = Self::block_bytes_for(config, block_tokens.max(1));
        Self::new(config, block_tokens, (bytes / per.max(1)).max(1))
    }

    /// A pool that starts empty and grows on demand: the cache of a single sequence outside
    /// a batching scheduler ([`crate::Sequence`]).
    pub fn growable(config: &ModelConfig, block_tokens: usize) -> Self {
        Self::with_blocks(config, KvBlocks::growable(block_tokens))
    }

    /// Bytes one block takes across all layers.
    pub fn block_bytes_for(config: &ModelConfig, block_tokens: usize) -> usize {
        let (kw, vw) = widths(config);
        config.n_layers * block_tokens * (kw + vw) * std::mem::size_of::<f32>()
    }

    /// The bookkeeping: free blocks, block size.
    pub fn blocks(&self) -> &KvBlocks {
        &self.blocks
    }

    pub fn block_tokens(&self) -> usize {
        self.blocks.block_tokens()
    }

    pub fn total_blocks(&self) -> usize {
        self.blocks.total_blocks()
    }

    pub fn free_blocks(&self) -> usize {
        self.blocks.free_blocks()
    }

    pub fn is_growable(&self) -> bool {
        self.blocks.is_growable()
    }

    /// Blocks a sequence of `tokens` positions occupies.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        self.blocks.blocks_for(tokens)
    }

    /// Blocks `seq` must still take to hold `tokens` positions in all.
    pub fn blocks_needed(&self, seq: &SeqKv, tokens: usize) -> usize {
        self.blocks.blocks_needed(seq, tokens)
    }

    /// Gives `seq` enough blocks for `tokens` positions. Fails, taking nothing, when the
    /// pool has too few free blocks.
    pub fn reserve(&mut self, seq: &mut SeqKv, tokens: usize) -> Result<(), ModelError> {
        self.blocks.reserve(seq, tokens)?;
        self.fit_storage();
        Ok(())
    }

    /// Storage for every block the bookkeeping knows (grows with a growable pool).
    fn fit_storage(&mut self) {
        let positions = self.blocks.total_blocks() * self.blocks.block_tokens();
        for l in &mut self.layers {
            l.k.resize(positions * self.kw, 0.0);
            l.v.resize(positions * self.vw, 0.0);
        }
    }

    /// Returns every block of `seq` to the pool; `seq` is empty afterwards.
    pub fn release(&mut self, seq: &mut SeqKv) {
        self.blocks.release(seq);
    }

    /// Forgets positions `len..` of `seq`, giving back the blocks no longer needed.
    pub fn truncate(&mut self, seq: &mut SeqKv, len: usize) {
        self.blocks.truncate(seq, len);
    }

    /// Whether this pool was made for a model of `config`'s shape.
    pub(crate) fn fits(&self, config: &ModelConfig) -> bool {
        self.layers.len() == config.n_layers && (self.kw, self.vw) == widths(config)
    }

    /// Writes one position of one layer.
    pub(crate) fn write(&mut self, layer: usize, blocks: &[u32], pos: usize, k: &[f32], v: &[f32]) {
        let s = self.blocks.slot(blocks, pos);
        let (kw, vw) = (self.kw, self.vw);
        let l = &mut self.layers[layer];
        l.k[s * kw..(s + 1) * kw].copy_from_slice(k);
        l.v[s * vw..(s + 1) * vw].copy_from_slice(v);
    }

    /// A read-only view of one layer for the attention of one sequence.
    pub(crate) fn view<'a>(&'a self, layer: usize, blocks: &'a [u32]) -> KvView<'a> {
        let l = &self.layers[layer];
        KvView { pool: self, k: &l.k, v: &l.v, blocks }
    }
}

/// One sequence's positions in one layer.
pub(crate) struct KvView<'a> {
    pool: &'a KvPool,
    k: &'a [f32],
    v: &'a [f32],
    blocks: &'a [u32],
}

impl KvView<'_> {
    #[inline]
    pub(crate) fn k(&self, pos: usize) -> &[f32] {
        let s = self.pool.blocks.slot(self.blocks, pos);
        &self.k[s * self.pool.kw..(s + 1) * self.pool.kw]
    }

    #[inline]
    pub(crate) fn v(&self, pos: usize) -> &[f32] {
        let s = self.pool.blocks.slot(self.blocks, pos);
        &self.v[s * self.pool.vw..(s + 1) * self.pool.vw]
    }
}

/// A sequence's place in a [`KvPool`]: its block table and how many positions it holds.
/// Give it back with [`KvPool::release`] when the sequence ends.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SeqKv {
    blocks: Vec<u32>,
    len: usize,
}

impl SeqKv {
    pub fn new() -> Self {
        Self::default()
    }

    /// Positions processed so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The block table.
    pub fn blocks(&self) -> &[u32] {
        &self.blocks
    }

    /// Records `n` more positions as processed: a backend calls this once it has written
    /// them into the blocks [`KvBlocks::reserve`] gave.
    pub fn advance(&mut self, n: usize) {
        self.len += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ModelConfig {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/models/llama/hf/config.json"
        );
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}"));
        ModelConfig::from_hf(&json).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn reserve_release_and_truncate_account_for_every_block() {
        let c = config();
        let mut pool = KvPool::new(&c, 4, 5);
        let (mut a, mut b) = (SeqKv::new(), SeqKv::new());
        pool.reserve(&mut a, 9).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((a.blocks().len(), pool.free_blocks()), (3, 2));
        // Too many: fails and takes nothing.
        let err = pool.reserve(&mut b, 12).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("3 blocks") && err.contains("2 free"), "{err}");
        assert_eq!((b.blocks().len(), pool.free_blocks()), (0, 2));
        a.advance(9);
        pool.truncate(&mut a, 4);
        assert_eq!((a.len(), a.blocks().len(), pool.free_blocks()), (4, 1, 4));
        pool.reserve(&mut b, 16).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(pool.free_blocks(), 0);
        pool.release(&mut a);
        pool.release(&mut b);
        assert_eq!((pool.free_blocks(), a.len(), a.blocks().len()), (5, 0, 0));
        let mut all: Vec<u32> = pool.blocks.free.clone();
        all.sort_unstable();
        assert_eq!(all, vec![0, 1, 2, 3, 4], "each block back exactly once");
    }

    #[test]
    fn positions_land_in_their_blocks() {
        let c = config();
        let mut pool = KvPool::growable(&c, 2);
        let mut s = SeqKv::new();
        pool.reserve(&mut s, 5).unwrap_or_else(|e| panic!("{e}"));
        let (kw, vw) = widths(&c);
        for p in 0..5 {
            pool.write(1, &s.blocks, p, &vec![p as f32; kw], &vec![-(p as f32); vw]);
        }
        let view = pool.view(1, &s.blocks);
        for p in 0..5 {
            assert!(view.k(p).iter().all(|&x| x == p as f32));
            assert!(view.v(p).iter().all(|&x| x == -(p as f32)));
        }
        assert_eq!(pool.total_blocks(), 3);
    }
}
