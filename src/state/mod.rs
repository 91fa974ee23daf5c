//! Per-sequence state: what a model keeps between forward passes for one sequence.
//!
//! It lives below `arch` (models write into it) and `engine` (the scheduler owns it), so neither
//! imports the other. Per layer the state is either keys/values ([`PagedKv`], in fixed-size
//! blocks) or a recurrent state ([`RecurrentState`], e.g. Mamba conv + SSM state). Memory is
//! accounted in blocks of [`BLOCK_TOKENS`] tokens from a [`BlockPool`] that many sequences share:
//! a block is one lease for `BLOCK_TOKENS` tokens across every layer of a sequence.
//!
//! Blocks that are full are immutable and can be shared between sequences (prefix reuse): the
//! engine's prefix cache keeps `Arc`s of them, and a new sequence adopts them instead of
//! recomputing the prompt. Only the last, partially filled block of a sequence is ever written,
//! and it is never shared.
//!
//! A recurrent state cannot be cut back to an earlier token, so a model with recurrent layers
//! shares a prefix only up to a block boundary where a [`RecurrentSnapshot`] was taken (a copy of
//! every recurrent layer's state right after that block): the engine takes them at chosen
//! boundaries (the last one of a prompt, the latest one while generating) and a sequence that
//! adopts the prefix starts from a copy.

pub mod kv_cache;
pub mod kv_quant;

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Tensor};

use crate::quant::KvProfile;
use kv_cache::{new_store, KvLayout, KvStore};

/// Tokens per block: the unit of KV memory, of sharing between sequences and of preemption.
///
/// 64 keeps the decode loop over blocks short (8 blocks at 512 tokens) while a shared prompt
/// prefix is reused to within 63 tokens.
pub const BLOCK_TOKENS: usize = 64;

/// A budget of blocks shared by every sequence of one model.
#[derive(Debug)]
pub struct BlockPool {
    total: usize,
    used: Mutex<usize>,
}

impl BlockPool {
    pub fn new(total_blocks: usize) -> Arc<Self> {
        Arc::new(Self {
            total: total_blocks,
            used: Mutex::new(0),
        })
    }

    /// A pool large enough for one sequence of `max_tokens` (single-sequence callers and tests).
    pub fn for_tokens(max_tokens: usize) -> Arc<Self> {
        Self::new(blocks_for(max_tokens))
    }

    pub fn total_blocks(&self) -> usize {
        self.total
    }

    pub fn used_blocks(&self) -> usize {
        *self.used.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn free_blocks(&self) -> usize {
        self.total - self.used_blocks()
    }

    /// One block, or `None` when the pool is exhausted.
    pub fn try_lease(self: &Arc<Self>) -> Option<BlockLease> {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        if *used >= self.total {
            return None;
        }
        *used += 1;
        Some(BlockLease { pool: self.clone() })
    }
}

/// One block of the pool, returned when dropped (when the last sequence or cache entry holding
/// it lets go).
#[derive(Debug)]
pub struct BlockLease {
    pool: Arc<BlockPool>,
}

impl Drop for BlockLease {
    fn drop(&mut self) {
        let mut used = self.pool.used.lock().unwrap_or_else(|e| e.into_inner());
        *used = used.saturating_sub(1);
    }
}

/// Blocks needed to hold `tokens` tokens.
pub fn blocks_for(tokens: usize) -> usize {
    tokens.div_ceil(BLOCK_TOKENS)
}

/// One block of one layer's keys/values: a store of capacity [`BLOCK_TOKENS`].
pub type KvBlock = Arc<dyn KvStore>;

/// Keys and values of one attention layer for one sequence, in blocks.
pub struct PagedKv {
    profile: KvProfile,
    layout: KvLayout,
    dtype: DType,
    device: Device,
    blocks: Vec<KvBlock>,
    len: usize,
}

impl PagedKv {
    pub fn new(
        profile: KvProfile,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Self {
        Self {
            profile,
            layout: KvLayout {
                kv_heads,
                head_dim,
                max_tokens: BLOCK_TOKENS,
            },
            dtype,
            device: device.clone(),
            blocks: Vec::new(),
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `k`, `v` (`[1, kv_heads, t, head_dim]`) after the stored tokens.
    pub fn write(&mut self, k: &Tensor, v: &Tensor) -> Result<()> {
        let t = k.dim(2)?;
        let mut done = 0;
        while done < t {
            let offset = self.len % BLOCK_TOKENS;
            if offset == 0 {
                let store = new_store(self.profile, self.layout, self.dtype, &self.device)?;
                self.blocks.push(Arc::from(store));
            }
            let n = (BLOCK_TOKENS - offset).min(t - done);
            let block = self.blocks.last_mut().expect("a block was just ensured");
            let Some(store) = Arc::get_mut(block) else {
                candle_core::bail!("internal error: writing into a shared KV block");
            };
            let (kp, vp) = if n == t {
                (k.clone(), v.clone())
            } else {
                (k.narrow(2, done, n)?, v.narrow(2, done, n)?)
            };
            store.write(&kp.contiguous()?, &vp.contiguous()?)?;
            done += n;
            self.len += n;
        }
        Ok(())
    }

    /// The stored keys/values block by block, `[1, kv_heads, n_i, head_dim]` in the compute dtype,
    /// read in place where the store allows it (dense) and dequantized otherwise.
    pub fn segments(&self) -> Result<Vec<(Tensor, Tensor)>> {
        self.blocks.iter().map(|b| b.read()).collect()
    }

    /// Every stored key and value as one `[1, kv_heads, len, head_dim]` pair (a copy when the
    /// sequence spans several blocks).
    pub fn gathered(&self) -> Result<(Tensor, Tensor)> {
        let segments = self.segments()?;
        if segments.len() == 1 {
            return Ok(segments.into_iter().next().expect("one segment"));
        }
        let ks: Vec<&Tensor> = segments.iter().map(|s| &s.0).collect();
        let vs: Vec<&Tensor> = segments.iter().map(|s| &s.1).collect();
        Ok((Tensor::cat(&ks, 2)?, Tensor::cat(&vs, 2)?))
    }

    /// Writes `k`, `v` and returns all keys/values so far (what attention over the whole
    /// sequence needs).
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        self.write(k, v)?;
        self.gathered()
    }

    fn truncate(&mut self, len: usize) {
        let len = len.min(self.len);
        let keep = blocks_for(len);
        self.blocks.truncate(keep);
        if let Some(last) = self.blocks.last_mut() {
            let in_block = len - (keep - 1) * BLOCK_TOKENS;
            if in_block < BLOCK_TOKENS {
                match Arc::get_mut(last) {
                    Some(store) => store.truncate(in_block),
                    // A shared (full) block cannot be cut: the caller recomputes from its start.
                    None => {
                        self.blocks.pop();
                        self.len = (keep - 1) * BLOCK_TOKENS;
                        return;
                    }
                }
            }
        }
        self.len = len;
    }

    fn allocated_bytes(&self) -> usize {
        self.blocks.iter().map(|b| b.allocated_bytes()).sum()
    }

    /// The first `n` (full) blocks, to share with another sequence.
    fn full_blocks(&self, n: usize) -> Vec<KvBlock> {
        self.blocks[..n.min(self.len / BLOCK_TOKENS)].to_vec()
    }

    fn adopt(&mut self, blocks: &[KvBlock]) {
        self.blocks = blocks.to_vec();
        self.len = blocks.len() * BLOCK_TOKENS;
    }
}

/// State a recurrent layer (a Mamba mixer: conv window and SSM state) keeps per sequence instead
/// of keys/values: f32 buffers whose sizes and meaning the model gives. It summarises every token
/// read, so it can only be rewound to a [`RecurrentSnapshot`] or to the start.
#[derive(Debug, Clone, PartialEq)]
pub struct RecurrentState {
    pub buffers: Vec<Vec<f32>>,
}

impl RecurrentState {
    /// Zeroed buffers of the given lengths.
    pub fn zeros(lengths: &[usize]) -> Self {
        Self {
            buffers: lengths.iter().map(|&n| vec![0.0; n]).collect(),
        }
    }

    /// Bytes held.
    pub fn allocated_bytes(&self) -> usize {
        self.buffers.iter().map(|b| 4 * b.len()).sum()
    }

    /// Forgets everything.
    pub fn reset(&mut self) {
        self.buffers.iter_mut().for_each(|b| b.fill(0.0));
    }
}

/// Every recurrent layer's state (in layer order) right after block `blocks` of a sequence.
#[derive(Debug, Clone)]
pub struct RecurrentSnapshot {
    /// Whole blocks read when it was taken: the state holds `blocks * BLOCK_TOKENS` tokens.
    pub blocks: usize,
    pub layers: Arc<Vec<RecurrentState>>,
}

impl RecurrentSnapshot {
    /// Bytes it holds.
    pub fn allocated_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(RecurrentState::allocated_bytes)
            .sum()
    }
}

/// One layer's state.
pub enum LayerState {
    Kv(PagedKv),
    Recurrent(RecurrentState),
}

/// The state of one sequence across all layers, and its share of the block pool.
pub struct SequenceState {
    pub layers: Vec<LayerState>,
    pool: Arc<BlockPool>,
    leases: Vec<Arc<BlockLease>>,
    len: usize,
    /// Hard limit on the sequence's length (the context allocated to it).
    max_tokens: usize,
    /// Recurrent layers' snapshots at block boundaries, oldest first (see [`Self::snapshot`]).
    snapshots: Vec<RecurrentSnapshot>,
    /// The newest snapshot may be replaced by the next one.
    last_replaceable: bool,
}

/// Full blocks of a sequence's prefix, shareable with another sequence of the same model.
#[derive(Clone)]
pub struct SharedBlocks {
    /// Per layer, per block (empty for recurrent layers).
    pub layers: Vec<Vec<KvBlock>>,
    pub leases: Vec<Arc<BlockLease>>,
    /// The recurrent layers' state after the last block (models with recurrent layers only).
    pub recurrent: Option<RecurrentSnapshot>,
}

impl SharedBlocks {
    pub fn len(&self) -> usize {
        self.leases.len()
    }

    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }
}

impl SequenceState {
    pub fn new(layers: Vec<LayerState>, pool: Arc<BlockPool>, max_tokens: usize) -> Self {
        Self {
            layers,
            pool,
            leases: Vec::new(),
            len: 0,
            max_tokens,
            snapshots: Vec::new(),
            last_replaceable: false,
        }
    }

    /// Tokens whose state is held: the position of the next token.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Alias of [`Self::len`] in the words of positions.
    pub fn position(&self) -> usize {
        self.len
    }

    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    pub fn pool(&self) -> &Arc<BlockPool> {
        &self.pool
    }

    /// Blocks this sequence holds (shared ones included).
    pub fn blocks(&self) -> usize {
        self.leases.len()
    }

    /// New blocks needed to grow by `tokens`.
    pub fn blocks_needed(&self, tokens: usize) -> usize {
        blocks_for(self.len + tokens).saturating_sub(self.leases.len())
    }

    /// Reserves room for `tokens` more tokens; called by the model before it writes any layer,
    /// so a sequence that does not fit is refused before anything changes.
    pub fn begin(&mut self, tokens: usize) -> Result<()> {
        if self.len + tokens > self.max_tokens {
            candle_core::bail!(
                "KV cache full: {} tokens exceed the context limit of {}",
                self.len + tokens,
                self.max_tokens
            );
        }
        let mut fresh = Vec::new();
        for _ in 0..self.blocks_needed(tokens) {
            match self.pool.try_lease() {
                Some(lease) => fresh.push(Arc::new(lease)),
                None => candle_core::bail!(
                    "KV block pool exhausted ({} blocks of {BLOCK_TOKENS} tokens in use)",
                    self.pool.total_blocks()
                ),
            }
        }
        self.leases.extend(fresh);
        Ok(())
    }

    /// Records that `tokens` tokens were written into every layer.
    pub fn commit(&mut self, tokens: usize) {
        self.len += tokens;
    }

    /// The key/value store of layer `i`, if that layer keeps one.
    pub fn kv_mut(&mut self, i: usize) -> Result<&mut PagedKv> {
        match self.layers.get_mut(i) {
            Some(LayerState::Kv(kv)) => Ok(kv),
            Some(LayerState::Recurrent(_)) => {
                candle_core::bail!("layer {i} keeps recurrent state, not keys/values")
            }
            None => candle_core::bail!("the sequence state has no layer {i}"),
        }
    }

    /// The recurrent state of layer `i`, if that layer keeps one.
    pub fn recurrent_mut(&mut self, i: usize) -> Result<&mut RecurrentState> {
        match self.layers.get_mut(i) {
            Some(LayerState::Recurrent(r)) => Ok(r),
            Some(LayerState::Kv(_)) => {
                candle_core::bail!("layer {i} keeps keys/values, not a recurrent state")
            }
            None => candle_core::bail!("the sequence state has no layer {i}"),
        }
    }

    /// Rewinds to at most `len` tokens; returns the length kept (shorter when a shared block or
    /// a recurrent layer cannot be cut there: the caller recomputes the rest).
    pub fn truncate(&mut self, len: usize) -> usize {
        let current = self.len;
        let mut kept = len.min(current);
        if kept < current && self.has_recurrent() {
            // A recurrent state goes back only to a snapshot (block-aligned, so the KV layers
            // cut exactly there), or to the start.
            let snap = self
                .snapshots
                .iter()
                .rev()
                .find(|s| s.blocks * BLOCK_TOKENS <= kept)
                .cloned();
            kept = snap.as_ref().map_or(0, |s| s.blocks * BLOCK_TOKENS);
            let mut from = snap.as_ref().map(|s| s.layers.iter());
            for layer in &mut self.layers {
                if let LayerState::Recurrent(r) = layer {
                    match from.as_mut().and_then(|f| f.next()) {
                        Some(state) => r.clone_from(state),
                        None => r.reset(),
                    }
                }
            }
            self.snapshots.retain(|s| s.blocks * BLOCK_TOKENS <= kept);
            self.last_replaceable = false;
        }
        // Layers may keep less than asked (a shared block, a recurrent state without a snapshot
        // there); cut again until every layer agrees on the shortest.
        loop {
            let mut agreed = kept;
            for layer in &mut self.layers {
                agreed = agreed.min(match layer {
                    LayerState::Kv(kv) => {
                        kv.truncate(agreed);
                        kv.len()
                    }
                    // Already at `kept` (above).
                    LayerState::Recurrent(_) => agreed,
                });
            }
            if agreed == kept {
                break;
            }
            kept = agreed;
        }
        self.len = kept;
        self.leases.truncate(blocks_for(kept));
        kept
    }

    /// Forgets every token and returns every block.
    pub fn clear(&mut self) {
        for layer in &mut self.layers {
            match layer {
                LayerState::Kv(kv) => kv.truncate(0),
                LayerState::Recurrent(r) => r.reset(),
            }
        }
        self.leases.clear();
        self.snapshots.clear();
        self.last_replaceable = false;
        self.len = 0;
    }

    /// Bytes held by this sequence (shared blocks counted in full).
    pub fn allocated_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| match l {
                LayerState::Kv(kv) => kv.allocated_bytes(),
                LayerState::Recurrent(r) => r.allocated_bytes(),
            })
            .sum()
    }

    /// Whether some layer keeps a recurrent state (its prefix is shared only at snapshots).
    pub fn has_recurrent(&self) -> bool {
        self.layers
            .iter()
            .any(|l| matches!(l, LayerState::Recurrent(_)))
    }

    /// Copies every recurrent layer's state, when the sequence stands at a block boundary
    /// (`false` otherwise, or without recurrent layers). `replaceable`: the next snapshot taken
    /// replaces this one (the engine keeps a prompt's snapshot and only the latest of an answer).
    pub fn snapshot(&mut self, replaceable: bool) -> bool {
        if !self.has_recurrent() || self.len == 0 || self.len % BLOCK_TOKENS != 0 {
            return false;
        }
        let blocks = self.len / BLOCK_TOKENS;
        if self.snapshots.last().is_some_and(|s| s.blocks == blocks) {
            return true;
        }
        if self.last_replaceable {
            self.snapshots.pop();
        }
        self.last_replaceable = replaceable;
        let layers = self
            .layers
            .iter()
            .filter_map(|l| match l {
                LayerState::Recurrent(r) => Some(r.clone()),
                LayerState::Kv(_) => None,
            })
            .collect();
        self.snapshots.push(RecurrentSnapshot {
            blocks,
            layers: Arc::new(layers),
        });
        true
    }

    /// The snapshots taken, oldest first.
    pub fn snapshots(&self) -> &[RecurrentSnapshot] {
        &self.snapshots
    }

    /// Whether full blocks of this state can be shared: every layer keeps keys/values, or the
    /// recurrent layers have a snapshot to share with them.
    pub fn shareable(&self) -> bool {
        !self.has_recurrent() || !self.snapshots.is_empty()
    }

    /// The first `n` full blocks, to share (`None` when the state cannot be shared). With
    /// recurrent layers: as many blocks as the deepest snapshot within `n` covers, with it.
    pub fn share(&self, n: usize) -> Option<SharedBlocks> {
        let mut n = n.min(self.len / BLOCK_TOKENS);
        let recurrent = if self.has_recurrent() {
            let snap = self.snapshots.iter().rev().find(|s| s.blocks <= n)?;
            n = snap.blocks;
            Some(snap.clone())
        } else {
            None
        };
        let layers = self
            .layers
            .iter()
            .map(|l| match l {
                LayerState::Kv(kv) => kv.full_blocks(n),
                LayerState::Recurrent(_) => Vec::new(),
            })
            .collect();
        Some(SharedBlocks {
            layers,
            leases: self.leases[..n].to_vec(),
            recurrent,
        })
    }

    /// Starts an empty sequence from shared full blocks (a reused prompt prefix); recurrent
    /// layers start from a copy of the shared snapshot.
    pub fn adopt(&mut self, shared: &SharedBlocks) -> Result<()> {
        let recurrent_fits = match &shared.recurrent {
            None => !self.has_recurrent(),
            Some(snap) => {
                snap.blocks == shared.len()
                    && snap.layers.len()
                        == self
                            .layers
                            .iter()
                            .filter(|l| matches!(l, LayerState::Recurrent(_)))
                            .count()
            }
        };
        if !self.is_empty() || !recurrent_fits || shared.layers.len() != self.layers.len() {
            candle_core::bail!("internal error: prefix blocks adopted by an unfit sequence");
        }
        let mut snapshot = shared.recurrent.as_ref().map(|s| s.layers.iter());
        for (layer, blocks) in self.layers.iter_mut().zip(&shared.layers) {
            match layer {
                LayerState::Kv(kv) => kv.adopt(blocks),
                LayerState::Recurrent(r) => {
                    let from = snapshot.as_mut().and_then(|s| s.next()).ok_or_else(|| {
                        candle_core::Error::Msg("internal error: snapshot layers".into())
                    })?;
                    if from.buffers.len() != r.buffers.len()
                        || from
                            .buffers
                            .iter()
                            .zip(&r.buffers)
                            .any(|(a, b)| a.len() != b.len())
                    {
                        candle_core::bail!("internal error: a snapshot of another shape");
                    }
                    r.clone_from(from);
                }
            }
        }
        self.leases = shared.leases.clone();
        self.len = shared.len() * BLOCK_TOKENS;
        if let Some(snap) = &shared.recurrent {
            self.snapshots = vec![snap.clone()];
            self.last_replaceable = false;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(pool: &Arc<BlockPool>, layers: usize) -> SequenceState {
        let layers = (0..layers)
            .map(|_| {
                LayerState::Kv(PagedKv::new(
                    KvProfile::Default,
                    2,
                    4,
                    DType::F32,
                    &Device::Cpu,
                ))
            })
            .collect();
        SequenceState::new(layers, pool.clone(), 1024)
    }

    fn kv(t: usize, base: f32) -> Tensor {
        let data: Vec<f32> = (0..2 * t * 4).map(|i| base + i as f32).collect();
        Tensor::from_vec(data, (1, 2, t, 4), &Device::Cpu).unwrap()
    }

    fn write(s: &mut SequenceState, t: usize, base: f32) {
        s.begin(t).unwrap();
        for i in 0..s.layers.len() {
            let x = kv(t, base);
            s.kv_mut(i).unwrap().write(&x, &x).unwrap();
        }
        s.commit(t);
    }

    #[test]
    fn blocks_are_leased_as_tokens_arrive_and_returned_on_clear() {
        let pool = BlockPool::new(4);
        let mut s = state(&pool, 2);
        write(&mut s, 10, 0.0);
        assert_eq!(pool.used_blocks(), 1);
        write(&mut s, BLOCK_TOKENS, 0.0);
        assert_eq!((s.len(), pool.used_blocks()), (BLOCK_TOKENS + 10, 2));
        // Reading across the block boundary gives the tokens back in order.
        let (k, _) = s.kv_mut(0).unwrap().gathered().unwrap();
        assert_eq!(k.dims(), &[1, 2, BLOCK_TOKENS + 10, 4]);
        let row = |k: &Tensor, t: usize| {
            k.narrow(2, t, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(row(&k, 10)[..4], row(&kv(BLOCK_TOKENS, 0.0), 0)[..4]);
        s.clear();
        assert_eq!(pool.used_blocks(), 0);
    }

    #[test]
    fn an_exhausted_pool_refuses_before_anything_changes() {
        let pool = BlockPool::new(1);
        let mut s = state(&pool, 1);
        write(&mut s, BLOCK_TOKENS, 0.0);
        let err = s.begin(1).unwrap_err().to_string();
        assert!(err.contains("pool exhausted"), "{err}");
        assert_eq!((s.len(), s.blocks()), (BLOCK_TOKENS, 1));
    }

    #[test]
    fn shared_blocks_are_counted_once_and_survive_their_first_owner() {
        let pool = BlockPool::new(8);
        let mut a = state(&pool, 2);
        write(&mut a, 2 * BLOCK_TOKENS + 5, 1.0);
        assert_eq!(pool.used_blocks(), 3);
        let shared = a.share(8).unwrap();
        assert_eq!(shared.len(), 2, "only full blocks are shared");
        let mut b = state(&pool, 2);
        b.adopt(&shared).unwrap();
        drop(shared);
        assert_eq!((b.len(), pool.used_blocks()), (2 * BLOCK_TOKENS, 3));
        let want = a
            .kv_mut(1)
            .unwrap()
            .gathered()
            .unwrap()
            .0
            .narrow(2, 0, 2 * BLOCK_TOKENS)
            .unwrap();
        drop(a);
        assert_eq!(pool.used_blocks(), 2, "the unshared tail block went back");
        let got = b.kv_mut(1).unwrap().gathered().unwrap().0;
        assert_eq!(
            got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            want.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        // b grows into a block of its own, never into the shared ones.
        write(&mut b, 3, 9.0);
        assert_eq!((b.len(), pool.used_blocks()), (2 * BLOCK_TOKENS + 3, 3));
    }

    #[test]
    fn truncating_into_a_shared_block_keeps_only_whole_blocks() {
        let pool = BlockPool::new(8);
        let mut a = state(&pool, 1);
        write(&mut a, 2 * BLOCK_TOKENS, 0.0);
        let mut b = state(&pool, 1);
        b.adopt(&a.share(2).unwrap()).unwrap();
        assert_eq!(
            b.truncate(BLOCK_TOKENS + 7),
            BLOCK_TOKENS,
            "the shared block is dropped"
        );
        // b let go of the second block, so a owns it alone again and cuts it exactly.
        assert_eq!(a.truncate(BLOCK_TOKENS + 7), BLOCK_TOKENS + 7);
    }

    #[test]
    fn truncating_an_own_block_is_exact() {
        let pool = BlockPool::new(8);
        let mut a = state(&pool, 1);
        write(&mut a, BLOCK_TOKENS + 20, 0.0);
        assert_eq!(a.truncate(BLOCK_TOKENS + 7), BLOCK_TOKENS + 7);
        assert_eq!(a.blocks(), 2);
        assert_eq!(a.truncate(30), 30);
        assert_eq!((a.blocks(), pool.used_blocks()), (1, 1));
    }

    /// One KV layer and one recurrent layer whose "state" is the sum of the tokens' values.
    fn hybrid(pool: &Arc<BlockPool>) -> SequenceState {
        let layers = vec![
            LayerState::Kv(PagedKv::new(
                KvProfile::Default,
                2,
                4,
                DType::F32,
                &Device::Cpu,
            )),
            LayerState::Recurrent(RecurrentState::zeros(&[2])),
        ];
        SequenceState::new(layers, pool.clone(), 1024)
    }

    fn write_hybrid(s: &mut SequenceState, t: usize, base: f32) {
        s.begin(t).unwrap();
        let x = kv(t, base);
        s.kv_mut(0).unwrap().write(&x, &x).unwrap();
        let r = s.recurrent_mut(1).unwrap();
        r.buffers[0][0] += t as f32;
        r.buffers[0][1] += base;
        s.commit(t);
    }

    #[test]
    fn recurrent_states_share_and_rewind_only_at_snapshots() {
        let pool = BlockPool::new(16);
        let mut a = hybrid(&pool);
        write_hybrid(&mut a, BLOCK_TOKENS + 3, 1.0);
        assert!(!a.snapshot(false), "not at a block boundary");
        assert!(a.share(1).is_none(), "no snapshot: nothing to share");
        write_hybrid(&mut a, BLOCK_TOKENS - 3, 2.0);
        assert!(a.snapshot(false));
        let at_two = a.recurrent_mut(1).unwrap().clone();
        write_hybrid(&mut a, BLOCK_TOKENS, 3.0);
        assert!(a.snapshot(true));
        write_hybrid(&mut a, BLOCK_TOKENS, 4.0);
        assert!(a.snapshot(true), "replaces the previous replaceable one");
        let blocks: Vec<usize> = a.snapshots().iter().map(|s| s.blocks).collect();
        assert_eq!(blocks, [2, 4]);

        // Sharing 3 blocks gives the 2 the snapshot covers, with the state at block 2.
        let shared = a.share(3).unwrap();
        assert_eq!(shared.len(), 2);
        let mut b = hybrid(&pool);
        b.adopt(&shared).unwrap();
        assert_eq!(b.len(), 2 * BLOCK_TOKENS);
        assert_eq!(b.recurrent_mut(1).unwrap(), &at_two);
        // b's copy is its own: writing it leaves the snapshot (and a) alone.
        write_hybrid(&mut b, 5, 9.0);
        assert_eq!(a.share(3).unwrap().recurrent.unwrap().layers[0], at_two);

        // Rewinding goes back to the deepest snapshot at or before the cut.
        assert_eq!(a.truncate(3 * BLOCK_TOKENS + 1), 2 * BLOCK_TOKENS);
        assert_eq!(a.recurrent_mut(1).unwrap(), &at_two);
        assert_eq!(a.truncate(BLOCK_TOKENS), 0, "no snapshot before: the start");
        assert_eq!(a.recurrent_mut(1).unwrap(), &RecurrentState::zeros(&[2]));
        assert!(a.snapshots().is_empty());
    }

    #[test]
    fn a_snapshot_of_another_shape_is_refused() {
        let pool = BlockPool::new(8);
        let mut a = hybrid(&pool);
        write_hybrid(&mut a, BLOCK_TOKENS, 1.0);
        a.snapshot(false);
        let mut shared = a.share(1).unwrap();
        let snap = shared.recurrent.as_mut().unwrap();
        snap.layers = Arc::new(vec![RecurrentState::zeros(&[3])]);
        let mut b = hybrid(&pool);
        assert!(b.adopt(&shared).is_err());
    }
}
