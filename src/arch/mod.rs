//! Architecture plugins: one table maps `model_type` to a builder, tensor-name mapping and
//! capability flags. Model code runs on candle and owns no cache: caches belong to sequences.

use candle_core::{DType, Device, Result, Tensor};

use crate::engine::kv_cache::{KvLayout, SequenceCache};
use crate::model::gguf::GgufFile;
use crate::model::safetensors::SafetensorsWeights;
use crate::quant::KvProfile;

pub mod bert;
pub mod bf16_linear;
mod cpu_matmul;
mod decode_attention;
pub mod encoder;
pub mod gemma3;
pub mod llama;
mod mask;
pub mod nemotron_h;
pub mod rope;

/// A causal language model ready to run on a device.
pub trait CausalLm: Send {
    /// Runs `tokens` (the continuation of the sequence whose cache is `cache`) and appends their
    /// keys/values to it. Returns f32 logits `[tokens.len(), vocab]`, or `[1, vocab]` for the
    /// last token only when `last_only` (decode, and prefill that needs no per-position logits).
    fn forward(&self, tokens: &[u32], cache: &mut SequenceCache, last_only: bool)
        -> Result<Tensor>;

    /// Shapes and limits the engine needs around the model.
    fn info(&self) -> &ModelInfo;
}

/// Tokens run per pass of a long prompt. Attention builds `[heads · t, len]` scores, masks and
/// probabilities: at 1024 prompt tokens that is ~37 MB per temporary per layer (SmolLM2), fresh
/// pages every time. Passes of 512 (llama.cpp's default micro-batch) keep them small; the result
/// is the same because later passes read the earlier ones from the cache.
const PROMPT_CHUNK: usize = 512;

/// Runs `tokens` through `pass` (one forward over some tokens, appending them to the sequence's
/// cache) in pieces of at most [`PROMPT_CHUNK`], and returns what a single pass would: the logits
/// of every position, or of the last one when `last_only`.
pub(crate) fn forward_in_passes(
    tokens: &[u32],
    last_only: bool,
    mut pass: impl FnMut(&[u32]) -> Result<Tensor>,
) -> Result<Tensor> {
    if tokens.len() <= PROMPT_CHUNK {
        return pass(tokens);
    }
    let mut logits = Vec::new();
    for piece in tokens.chunks(PROMPT_CHUNK) {
        let out = pass(piece)?;
        if last_only {
            logits = vec![out];
        } else {
            logits.push(out);
        }
    }
    Tensor::cat(&logits, 0)
}

/// What the engine needs to know about a built model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// Registry name (`llama`, `qwen3`, ...).
    pub architecture: String,
    pub vocab_size: usize,
    /// Longest sequence the model was trained for.
    pub context_length: usize,
    /// Attention layers that keep a KV cache.
    pub cache_layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Dtype keys/values are handed to attention in.
    pub cache_dtype: DType,
    pub device: Device,
    /// Human-readable weight format, e.g. `bf16` or `Q4_1`.
    pub weight_format: String,
}

impl ModelInfo {
    /// A fresh cache for one sequence of at most `max_tokens` tokens.
    pub fn new_cache(&self, profile: KvProfile, max_tokens: usize) -> Result<SequenceCache> {
        let layout = KvLayout {
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            max_tokens,
        };
        SequenceCache::new(
            profile,
            self.cache_layers,
            layout,
            self.cache_dtype,
            &self.device,
        )
    }
}

/// Where a model's weights come from.
pub enum WeightSource<'a> {
    /// `config.json` (parsed) and the memory-mapped safetensors of a model folder.
    Safetensors {
        config: &'a serde_json::Value,
        weights: &'a SafetensorsWeights,
    },
    Gguf(&'a GgufFile),
}

/// How to build: device and compute dtype.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub device: Device,
    /// Dtype of activations (and of dense weights unless `keep_weight_dtype`).
    pub dtype: DType,
    /// Keep bf16/f16 safetensors weights in their stored dtype instead of converting them.
    pub keep_weight_dtype: bool,
}

/// Builds a model from its weights.
pub type Builder = fn(&WeightSource<'_>, &BuildOptions) -> anyhow::Result<Box<dyn CausalLm>>;

/// What an architecture can do.
#[derive(Debug, Clone, Copy)]
pub struct Capabilities {
    pub safetensors: bool,
    pub gguf: bool,
    /// KV-cache quantization profiles apply (the cache goes through `SequenceCache`).
    pub kv_quantization: bool,
}

/// One row of the architecture table.
pub struct Architecture {
    /// `model_type` in config.json.
    pub model_type: &'static str,
    /// `general.architecture` values in GGUF files that this builder reads.
    pub gguf_names: &'static [&'static str],
    pub build: Builder,
    pub capabilities: Capabilities,
    /// Where tensor names are mapped (for readers of the table).
    pub tensor_names: &'static str,
}

const LLAMA_CAPS: Capabilities = Capabilities {
    safetensors: true,
    gguf: true,
    kv_quantization: true,
};

/// The architecture table. To add one: write `src/arch/<name>.rs` with a [`Builder`] and add a
/// row here.
pub const ARCHITECTURES: &[Architecture] = &[
    Architecture {
        model_type: "llama",
        gguf_names: &["llama"],
        build: llama::build,
        capabilities: LLAMA_CAPS,
        tensor_names: llama::TENSOR_NAMES_DOC,
    },
    Architecture {
        model_type: "mistral",
        gguf_names: &["mistral"],
        build: llama::build,
        capabilities: LLAMA_CAPS,
        tensor_names: llama::TENSOR_NAMES_DOC,
    },
    Architecture {
        model_type: "qwen2",
        gguf_names: &["qwen2"],
        build: llama::build,
        capabilities: LLAMA_CAPS,
        tensor_names: llama::TENSOR_NAMES_DOC,
    },
    Architecture {
        model_type: "qwen3",
        gguf_names: &["qwen3"],
        build: llama::build,
        capabilities: LLAMA_CAPS,
        tensor_names: llama::TENSOR_NAMES_DOC,
    },
    Architecture {
        model_type: "gemma3_text",
        gguf_names: &["gemma3"],
        build: gemma3::build,
        capabilities: LLAMA_CAPS,
        tensor_names: gemma3::TENSOR_NAMES_DOC,
    },
    Architecture {
        model_type: "gpt_oss",
        gguf_names: &[],
        build: gpt_oss::build,
        capabilities: Capabilities {
            safetensors: true,
            gguf: false,
            kv_quantization: true,
        },
        tensor_names: gpt_oss::TENSOR_NAMES_DOC,
    },
    Architecture {
        model_type: "nemotron_h",
        gguf_names: &[],
        build: nemotron_h::build,
        capabilities: Capabilities {
            safetensors: true,
            gguf: false,
            kv_quantization: true,
        },
        tensor_names: nemotron_h::TENSOR_NAMES_DOC,
    },
];

/// Names of every supported architecture, for error messages and `show`.
pub fn supported_names() -> Vec<&'static str> {
    ARCHITECTURES.iter().map(|a| a.model_type).collect()
}

/// The table row for a safetensors `model_type`.
pub fn lookup(model_type: &str) -> anyhow::Result<&'static Architecture> {
    ARCHITECTURES
        .iter()
        .find(|a| a.model_type == model_type)
        .ok_or_else(|| unsupported(model_type))
}

/// The table row for a GGUF `general.architecture`.
pub fn lookup_gguf(name: &str) -> anyhow::Result<&'static Architecture> {
    ARCHITECTURES
        .iter()
        .find(|a| a.gguf_names.contains(&name))
        .ok_or_else(|| unsupported(name))
}

fn unsupported(name: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "unsupported architecture '{name}'; supported: {}",
        supported_names().join(", ")
    )
}

/// Builds the model for `source` with the architecture its metadata names.
pub fn build(
    source: &WeightSource<'_>,
    options: &BuildOptions,
) -> anyhow::Result<Box<dyn CausalLm>> {
    let arch = match source {
        WeightSource::Safetensors { config, .. } => {
            let model_type = config
                .get("model_type")
                .and_then(|v| v.as_str())
                .ok_or_else(|| anyhow::anyhow!("config.json has no model_type"))?;
            lookup(model_type)?
        }
        WeightSource::Gguf(file) => lookup_gguf(file.architecture()?)?,
    };
    (arch.build)(source, options)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_architecture_lists_supported_ones() {
        let err = lookup("mamba9").err().unwrap().to_string();
        assert!(err.contains("unsupported architecture 'mamba9'"), "{err}");
        for name in ["llama", "mistral", "qwen2", "qwen3"] {
            assert!(err.contains(name), "{err}");
        }
        assert_eq!(lookup_gguf("qwen3").unwrap().model_type, "qwen3");
    }
}

pub mod gpt_oss;
