//! Architecture plugins: one table maps `model_type` to a builder, tensor-name mapping and
//! capability flags. Model code runs on candle and owns no cache: caches belong to sequences.

use candle_core::{Result, Tensor};

use crate::engine::kv_cache::SequenceCache;

/// A causal language model ready to run on a device.
pub trait CausalLm: Send {
    /// Runs `tokens` (the continuation of the sequence whose cache is `cache`) and appends their
    /// keys/values to it. Returns f32 logits `[tokens.len(), vocab]`, or `[1, vocab]` for the
    /// last token only when `last_only` (decode, and prefill that needs no per-position logits).
    fn forward(&self, tokens: &[u32], cache: &mut SequenceCache, last_only: bool)
        -> Result<Tensor>;
}

pub mod gpt_oss;
