//! Architecture plugins: one table maps `model_type` to a builder, tensor-name mapping and
//! capability flags. Model code runs on candle and owns no cache: caches belong to sequences.

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};

use crate::model::gguf::GgufFile;
use crate::model::safetensors::SafetensorsWeights;
use crate::quant::KvProfile;
use crate::state::{BlockPool, LayerState, PagedKv, RecurrentState, SequenceState};

pub mod bert;
pub mod bf16_linear;
pub mod bitnet;
mod cpu_attention;
mod cpu_matmul;
pub mod encoder;
pub mod gemma3;
pub mod llama;
mod mask;
pub mod nemotron_h;
pub mod rope;

/// Which logits one sequence of a batch wants back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// None (a prompt chunk that is not the prompt's end).
    None,
    /// The last token's (decode, and the end of a prompt).
    Last,
    /// Every token's (perplexity).
    All,
}

/// One sequence's part of a batch: its next tokens, at positions `state.len()..`, and its state.
///
/// A batch is vLLM's flattened layout (and llama.cpp's `llama_batch` with runs of one `seq_id`):
/// the tokens of every sequence are concatenated into one activation matrix, so each weight is
/// read once per step for all of them; attention then runs per sequence over its own state.
pub struct BatchSeq<'a> {
    pub tokens: &'a [u32],
    pub state: &'a mut SequenceState,
    pub logits: Logits,
}

/// A causal language model ready to run on a device.
pub trait CausalLm: Send + Sync {
    /// Runs one step for a batch of sequences: appends every sequence's tokens to its state and
    /// returns f32 logits `[rows, vocab]`, the rows each sequence asked for, in batch order.
    fn forward_batch(&self, batch: &mut [BatchSeq<'_>]) -> Result<Tensor>;

    /// Shapes and limits the engine needs around the model.
    fn info(&self) -> &ModelInfo;

    /// The same step as [`Self::forward_batch`], returning the final hidden states instead of
    /// logits: f32 `[rows, hidden]`, after the final norm (what the LM head would read), the
    /// rows each sequence asked for with its [`Logits`], in batch order. Decoder models used as
    /// embedders pool these. Architectures that do not expose them say so.
    fn hidden_batch(&self, batch: &mut [BatchSeq<'_>]) -> Result<Tensor> {
        let _ = batch;
        candle_core::bail!(
            "the '{}' architecture does not expose its hidden states, so it cannot embed",
            self.info().architecture
        )
    }

    /// One sequence: `tokens` continue the sequence whose state is `state`. Returns logits
    /// `[tokens.len(), vocab]`, or `[1, vocab]` for the last token only when `last_only`. Long
    /// inputs run in passes of [`PROMPT_CHUNK`] tokens.
    fn forward(
        &self,
        tokens: &[u32],
        state: &mut SequenceState,
        last_only: bool,
    ) -> Result<Tensor> {
        forward_in_passes(tokens, last_only, |pass| {
            let logits = if last_only { Logits::Last } else { Logits::All };
            self.forward_batch(&mut [BatchSeq {
                tokens: pass,
                state: &mut *state,
                logits,
            }])
        })
    }
}

/// Tokens run per pass of a long prompt. Attention builds `[heads · t, len]` scores, masks and
/// probabilities: at 1024 prompt tokens that is ~37 MB per temporary per layer (SmolLM2), fresh
/// pages every time. Passes of 512 (llama.cpp's default micro-batch) keep them small; the result
/// is the same because later passes read the earlier ones from the cache.
pub const PROMPT_CHUNK: usize = 512;

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

/// Where each sequence's tokens sit in a batch's activation rows.
pub(crate) struct BatchPlan {
    /// Per sequence: first row, token count, position of its first token.
    pub spans: Vec<Span>,
    /// Every token of the batch, in order.
    pub tokens: Vec<u32>,
    /// Rows whose logits are returned, in order.
    pub logit_rows: Vec<u32>,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Span {
    pub offset: usize,
    pub len: usize,
    pub start: usize,
}

impl BatchPlan {
    /// Checks the batch (tokens present and inside the vocabulary, room in every state) and
    /// reserves the states' blocks before any layer is touched, so a refused batch changes
    /// nothing but reserved-and-unused blocks.
    pub(crate) fn new(batch: &mut [BatchSeq<'_>], vocab: usize, layers: usize) -> Result<Self> {
        if batch.is_empty() {
            candle_core::bail!("forward called with an empty batch");
        }
        let mut spans = Vec::with_capacity(batch.len());
        let mut tokens = Vec::new();
        let mut logit_rows = Vec::new();
        for seq in batch.iter_mut() {
            if seq.tokens.is_empty() {
                candle_core::bail!("forward called with no tokens for a sequence");
            }
            if let Some(&bad) = seq.tokens.iter().find(|&&id| id as usize >= vocab) {
                candle_core::bail!("token id {bad} is outside the vocabulary of {vocab}");
            }
            if seq.state.layers.len() != layers {
                candle_core::bail!(
                    "the sequence state has {} layers, the model {layers}",
                    seq.state.layers.len()
                );
            }
            seq.state.begin(seq.tokens.len())?;
            let span = Span {
                offset: tokens.len(),
                len: seq.tokens.len(),
                start: seq.state.len(),
            };
            match seq.logits {
                Logits::None => {}
                Logits::Last => logit_rows.push((span.offset + span.len - 1) as u32),
                Logits::All => {
                    logit_rows.extend((span.offset..span.offset + span.len).map(|r| r as u32))
                }
            }
            tokens.extend_from_slice(seq.tokens);
            spans.push(span);
        }
        Ok(Self {
            spans,
            tokens,
            logit_rows,
        })
    }

    /// Records the written tokens in every state (after all layers ran).
    pub(crate) fn commit(&self, batch: &mut [BatchSeq<'_>]) {
        for (seq, span) in batch.iter_mut().zip(&self.spans) {
            seq.state.commit(span.len);
        }
    }

    /// True when every row is returned in order (no selection needed).
    pub(crate) fn returns_every_row(&self) -> bool {
        self.logit_rows.len() == self.tokens.len()
    }
}

/// What one stateful layer keeps per sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateSlot {
    /// Keys and values of every token (attention).
    Kv,
    /// f32 buffers of these lengths (a recurrent mixer's state).
    Recurrent(Vec<usize>),
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
    /// What a sequence keeps, one slot per stateful layer in layer order.
    pub state_slots: Vec<StateSlot>,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Dtype keys/values are handed to attention in.
    pub cache_dtype: DType,
    pub device: Device,
    /// Human-readable weight format, e.g. `bf16` or `Q4_1`.
    pub weight_format: String,
}

impl ModelInfo {
    /// Empty state for one sequence of at most `max_tokens` tokens, drawing blocks from `pool`.
    pub fn new_state(
        &self,
        profile: KvProfile,
        pool: &Arc<BlockPool>,
        max_tokens: usize,
    ) -> SequenceState {
        let layers = self
            .state_slots
            .iter()
            .map(|slot| match slot {
                StateSlot::Kv => LayerState::Kv(PagedKv::new(
                    profile,
                    self.kv_heads,
                    self.head_dim,
                    self.cache_dtype,
                    &self.device,
                )),
                StateSlot::Recurrent(lengths) => {
                    LayerState::Recurrent(RecurrentState::zeros(lengths))
                }
            })
            .collect();
        SequenceState::new(layers, pool.clone(), max_tokens)
    }

    /// A fresh state for one sequence of at most `max_tokens` tokens, with a pool of its own.
    pub fn new_cache(&self, profile: KvProfile, max_tokens: usize) -> Result<SequenceState> {
        crate::state::kv_cache::new_store(
            profile,
            crate::state::kv_cache::KvLayout {
                kv_heads: self.kv_heads,
                head_dim: self.head_dim,
                max_tokens: 1,
            },
            self.cache_dtype,
            &self.device,
        )?;
        Ok(self.new_state(profile, &BlockPool::for_tokens(max_tokens), max_tokens))
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
    /// `xllm imatrix`: record every matmul weight's input activations here (`None`: no cost).
    pub activation_stats: Option<std::sync::Arc<crate::kernels::act_stats::ActivationStats>>,
}

/// Builds a model from its weights.
pub type Builder = fn(&WeightSource<'_>, &BuildOptions) -> anyhow::Result<Box<dyn CausalLm>>;

/// What an architecture can do.
#[derive(Debug, Clone, Copy)]
pub struct Capabilities {
    pub safetensors: bool,
    pub gguf: bool,
    /// KV-cache quantization profiles apply (the cache goes through `SequenceState`).
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
        model_type: "bitnet",
        gguf_names: &["bitnet"],
        build: bitnet::build,
        capabilities: LLAMA_CAPS,
        tensor_names: bitnet::TENSOR_NAMES_DOC,
    },
    Architecture {
        model_type: "gpt_oss",
        gguf_names: &["gpt-oss"],
        build: gpt_oss::build,
        capabilities: Capabilities {
            safetensors: true,
            gguf: true,
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
