//! Reuse of computed prompt prefixes across sequences (a shared system prompt, a RAG preamble,
//! the history of a chat): full KV blocks of finished or running sequences, keyed by a hash
//! chain over their tokens (block `i`'s key covers every token before its end, so equal keys
//! mean equal prefixes). Entries hold `Arc`s of the blocks; a block is evicted, least recently
//! used first, only when no sequence holds it and the pool needs room.
//!
//! Models with recurrent layers (Nemotron-H's Mamba) reuse a prefix only up to a block whose
//! entry holds a [`crate::state::RecurrentSnapshot`] (the recurrent state right after it). Snapshots are large
//! (Nemotron 3 Nano: 47.6 MiB) and not in the block pool, so at most `max_snapshots` are kept;
//! the least recently used lose theirs first (their KV blocks stay).

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use crate::state::{SequenceState, SharedBlocks, BLOCK_TOKENS};

struct Entry {
    parent: u64,
    tokens: Vec<u32>,
    /// This one block: per layer one block, one lease.
    block: SharedBlocks,
    /// The model has recurrent layers: a prefix may end here only with a snapshot.
    needs_snapshot: bool,
    last_used: u64,
}

pub(crate) struct PrefixCache {
    entries: HashMap<u64, Entry>,
    clock: u64,
    max_snapshots: usize,
}

/// Key of the block holding `tokens` after the prefix whose key is `parent`.
fn chain(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

impl PrefixCache {
    pub(crate) fn new(max_snapshots: usize) -> Self {
        Self {
            entries: HashMap::new(),
            clock: 0,
            max_snapshots,
        }
    }

    /// Recurrent snapshots held.
    pub(crate) fn snapshots(&self) -> usize {
        self.entries
            .values()
            .filter(|e| e.block.recurrent.is_some())
            .count()
    }

    /// Blocks cached.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// The longest cached prefix of `prompt` in whole blocks, leaving at least one prompt token
    /// to run (its logits start the answer); for recurrent models the longest that ends at a
    /// snapshot.
    pub(crate) fn lookup(&mut self, prompt: &[u32]) -> Option<SharedBlocks> {
        let usable = prompt.len().saturating_sub(1) / BLOCK_TOKENS;
        let mut found: Option<SharedBlocks> = None;
        // Blocks of `found` that may start a sequence (all, or up to the last snapshot).
        let mut usable_depth = 0;
        let mut snapshot = None;
        let mut key = 0u64;
        self.clock += 1;
        for block in prompt.chunks_exact(BLOCK_TOKENS).take(usable) {
            let next = chain(key, block);
            let Some(entry) = self.entries.get_mut(&next) else {
                break;
            };
            if entry.parent != key || entry.tokens != block {
                break;
            }
            entry.last_used = self.clock;
            match &mut found {
                None => found = Some(entry.block.clone()),
                Some(shared) => {
                    for (layer, b) in shared.layers.iter_mut().zip(&entry.block.layers) {
                        layer.extend(b.iter().cloned());
                    }
                    shared.leases.extend(entry.block.leases.iter().cloned());
                }
            }
            let depth = found.as_ref().map_or(0, SharedBlocks::len);
            if !entry.needs_snapshot {
                usable_depth = depth;
            } else if let Some(snap) = &entry.block.recurrent {
                usable_depth = depth;
                snapshot = Some(snap.clone());
            }
            key = next;
        }
        let mut shared = found?;
        if usable_depth == 0 {
            return None;
        }
        for layer in &mut shared.layers {
            layer.truncate(usable_depth);
        }
        shared.leases.truncate(usable_depth);
        shared.recurrent = snapshot;
        Some(shared)
    }

    /// Records the full blocks of `state`, whose tokens are `tokens` (at least `state.len()`).
    pub(crate) fn insert(&mut self, state: &SequenceState, tokens: &[u32]) {
        let full = state.len() / BLOCK_TOKENS;
        let Some(shared) = state.share(full) else {
            return;
        };
        self.clock += 1;
        let needs_snapshot = state.has_recurrent();
        let mut key = 0u64;
        let full = shared.len();
        for (i, block) in tokens.chunks_exact(BLOCK_TOKENS).take(full).enumerate() {
            let next = chain(key, block);
            let entry = self.entries.entry(next).or_insert_with(|| Entry {
                parent: key,
                tokens: block.to_vec(),
                block: SharedBlocks {
                    layers: shared
                        .layers
                        .iter()
                        .map(|l| l.get(i).cloned().into_iter().collect())
                        .collect(),
                    leases: vec![shared.leases[i].clone()],
                    recurrent: None,
                },
                needs_snapshot,
                last_used: 0,
            });
            entry.last_used = self.clock;
            if let Some(snap) = state.snapshots().iter().find(|s| s.blocks == i + 1) {
                entry.block.recurrent = Some(snap.clone());
            }
            key = next;
        }
        self.limit_snapshots();
    }

    /// Drops the least recently used snapshots beyond `max_snapshots` (of equally recent ones,
    /// the shallowest: a growing conversation needs its latest).
    fn limit_snapshots(&mut self) {
        while self.snapshots() > self.max_snapshots {
            let Some(entry) = self
                .entries
                .values_mut()
                .filter(|e| e.block.recurrent.is_some())
                .min_by_key(|e| {
                    (
                        e.last_used,
                        e.block.recurrent.as_ref().map_or(0, |s| s.blocks),
                    )
                })
            else {
                return;
            };
            entry.block.recurrent = None;
        }
    }

    /// Drops the least recently used block that no sequence holds; `false` when none can go.
    pub(crate) fn evict_one(&mut self) -> bool {
        let victim = self
            .entries
            .iter()
            .filter(|(_, e)| {
                e.block
                    .leases
                    .iter()
                    .all(|l| std::sync::Arc::strong_count(l) == 1)
            })
            .min_by_key(|(_, e)| e.last_used)
            .map(|(k, _)| *k);
        match victim {
            Some(k) => {
                self.entries.remove(&k);
                true
            }
            None => false,
        }
    }

    pub(crate) fn clear(&mut self) {
        self.entries.clear();
    }
}
