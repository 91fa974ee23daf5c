//! Models that turn text into per-token hidden states for embeddings: the encoder table (BERT and
//! its relatives, one row per `model_type` like [`super::ARCHITECTURES`]) and the packed batch
//! they run on.
//!
//! A batch is the tokens of many sequences side by side (the flattened layout of llama.cpp's
//! `llama_batch` and vLLM), each sequence's positions starting at 0. Nothing is padded, so
//! padding cannot change a result and costs no compute.

use serde_json::Value;

use crate::model::safetensors::SafetensorsWeights;

/// Sequences packed into one batch.
#[derive(Debug, Clone, Copy)]
pub struct PackedBatch<'a> {
    /// Token ids of all sequences, one after another.
    pub tokens: &'a [u32],
    /// Token type (segment) ids, as long as `tokens`; all 0 for single texts.
    pub type_ids: &'a [u32],
    /// Length of each sequence, in order; they sum to `tokens.len()`.
    pub lens: &'a [usize],
}

impl PackedBatch<'_> {
    /// Checks the lengths add up and no sequence is longer than `max_positions`.
    pub fn validate(&self, max_positions: usize) -> anyhow::Result<()> {
        let total: usize = self.lens.iter().sum();
        if total != self.tokens.len() || self.type_ids.len() != self.tokens.len() {
            anyhow::bail!(
                "packed batch: {} tokens, {} type ids, lengths summing to {total}",
                self.tokens.len(),
                self.type_ids.len()
            );
        }
        if let Some(len) = self.lens.iter().find(|&&l| l > max_positions) {
            anyhow::bail!(
                "a sequence of {len} tokens is longer than the model's {max_positions} positions"
            );
        }
        Ok(())
    }
}

/// What the embedding engine needs to know about an encoder.
#[derive(Debug, Clone)]
pub struct EncoderInfo {
    /// Registry name (`bert`, ...).
    pub architecture: String,
    /// Width of the hidden states (the embedding length before pooling options).
    pub hidden_size: usize,
    /// Longest sequence the position table allows.
    pub max_positions: usize,
    pub vocab_size: usize,
    /// Human-readable weight format, e.g. `f32`.
    pub weight_format: String,
}

/// A model that maps a packed batch to its final hidden states.
pub trait Encoder: Send + Sync {
    /// `[tokens, hidden_size]` row-major, rows in the batch's token order.
    fn hidden_states(&self, batch: &PackedBatch<'_>) -> anyhow::Result<Vec<f32>>;

    fn info(&self) -> &EncoderInfo;
}

/// Builds an encoder from `config.json` and the checkpoint.
pub type EncoderBuilder = fn(&Value, &SafetensorsWeights) -> anyhow::Result<Box<dyn Encoder>>;

/// One row of the encoder table. Every row has the `embedding` capability (and no other: an
/// encoder cannot generate text).
pub struct EncoderArchitecture {
    /// `model_type` in config.json.
    pub model_type: &'static str,
    pub build: EncoderBuilder,
    /// Where tensor names are mapped (for readers of the table).
    pub tensor_names: &'static str,
}

/// The encoder table. To add one: write `src/arch/<name>.rs` with an [`EncoderBuilder`] and add a
/// row here.
pub const ENCODERS: &[EncoderArchitecture] = &[EncoderArchitecture {
    model_type: "bert",
    build: super::bert::build,
    tensor_names: super::bert::TENSOR_NAMES_DOC,
}];

/// The encoder row for `model_type`, if it is one.
pub fn lookup(model_type: &str) -> Option<&'static EncoderArchitecture> {
    ENCODERS.iter().find(|a| a.model_type == model_type)
}

/// Builds the encoder `config.json` names; an unknown `model_type` is an error listing the
/// supported encoders.
pub fn build(config: &Value, weights: &SafetensorsWeights) -> anyhow::Result<Box<dyn Encoder>> {
    let model_type = config
        .get("model_type")
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow::anyhow!("config.json has no model_type"))?;
    let arch = lookup(model_type).ok_or_else(|| {
        anyhow::anyhow!(
            "'{model_type}' is not an encoder architecture xllm can embed with; supported: {}",
            ENCODERS
                .iter()
                .map(|a| a.model_type)
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    (arch.build)(config, weights)
}

/// What a model of this `model_type` can do, in Ollama's words: `completion` for the causal
/// table's architectures, `embedding` for encoders (decoder models add `embedding` when their
/// folder declares pooling, which the engine decides).
pub fn capabilities(model_type: &str) -> Vec<&'static str> {
    let mut caps = Vec::new();
    if super::lookup(model_type).is_ok() {
        caps.push("completion");
    }
    if lookup(model_type).is_some() {
        caps.push("embedding");
    }
    caps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bert_is_an_embedding_architecture_and_llama_a_completion_one() {
        assert_eq!(capabilities("bert"), vec!["embedding"]);
        assert_eq!(capabilities("llama"), vec!["completion"]);
        assert!(capabilities("mamba9").is_empty());
    }

    #[test]
    fn batch_lengths_must_add_up() {
        let b = PackedBatch {
            tokens: &[1, 2, 3],
            type_ids: &[0, 0, 0],
            lens: &[2, 2],
        };
        assert!(b.validate(8).is_err());
        let b = PackedBatch { lens: &[1, 2], ..b };
        b.validate(8).unwrap();
        assert!(b.validate(1).unwrap_err().to_string().contains("longer"));
    }
}
