//! Reuse of computed prompt prefixes across sequences (a shared system prompt, a RAG preamble,
//! the history of a chat): full KV blocks of finished or running sequences, keyed by a hash
//! chain over their tokens (block `i`'s key covers every token before its end, so equal keys
//! mean equal prefixes). Entries hold `Arc`s of the blocks; a block is evicted, least recently
//! used first, only when no sequence holds it and the pool needs room.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use crate::state::{SequenceState, SharedBlocks, BLOCK_TOKENS};

struct Entry {
    parent: u64,
    tokens: Vec<u32>,
    /// This one block: per layer one block, one lease.
    block: SharedBlocks,
    last_used: u64,
}

#[derive(Default)]
pub(crate) struct PrefixCache {
    entries: HashMap<u64, Entry>,
    clock: u64,
}

/// Key of the block holding `tokens` after the prefix whose key is `parent`.
fn chain(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

impl PrefixCache {
    /// Blocks cached.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// The longest cached prefix of `prompt` in whole blocks, leaving at least one prompt token
    /// to run (its logits start the answer).
    pub(crate) fn lookup(&mut self, prompt: &[u32]) -> Option<SharedBlocks> {
        let usable = prompt.len().saturating_sub(1) / BLOCK_TOKENS;
        let mut found: Option<SharedBlocks> = None;
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
            key = next;
        }
        found
    }

    /// Records the full blocks of `state`, whose tokens are `tokens` (at least `state.len()`).
    pub(crate) fn insert(&mut self, state: &SequenceState, tokens: &[u32]) {
        let full = state.len() / BLOCK_TOKENS;
        let Some(shared) = state.share(full) else {
            return;
        };
        self.clock += 1;
        let mut key = 0u64;
        for (i, block) in tokens.chunks_exact(BLOCK_TOKENS).take(full).enumerate() {
            let next = chain(key, block);
            let entry = self.entries.entry(next).or_insert_with(|| Entry {
                parent: key,
                tokens: block.to_vec(),
                block: SharedBlocks {
                    layers: shared.layers.iter().map(|l| vec![l[i].clone()]).collect(),
                    leases: vec![shared.leases[i].clone()],
                },
                last_used: 0,
            });
            entry.last_used = self.clock;
            key = next;
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
