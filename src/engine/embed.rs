//! Text embeddings: tokenizer → packed batch → hidden states → pooling → normalisation →
//! optional Matryoshka truncation. Nothing here prints; the CLI and the server drive it.
//!
//! Two kinds of models embed: encoders (the [`encoder`] table: BERT and its relatives) and
//! decoders of the causal table whose folder declares sentence-transformers pooling (the
//! Qwen3-Embedding layout: a Qwen3 base model, `modules.json`, `1_Pooling` with `lasttoken`,
//! `Normalize`), pooled from the final hidden state ([`CausalLm::hidden_batch`]).
//!
//! The model folder says how to pool, in sentence-transformers' layout: `modules.json` lists the
//! modules (Transformer, Pooling, Normalize), `1_Pooling/config.json` (or whatever path the
//! Pooling module names) picks the modes, `sentence_bert_config.json` the longest input. A folder
//! without `modules.json` gets what sentence-transformers gives a plain transformers model: mean
//! pooling, no normalisation.
//!
//! The tokenizer's own padding and truncation settings (`tokenizer.json` may fix both, e.g. pad
//! everything to 128) are switched off on purpose: batches are packed, so nothing is padded, and
//! truncation is applied here to the model's limit (or refused, when asked).

use std::path::Path;

use anyhow::{bail, Context};
use serde_json::Value;
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use crate::arch::encoder::{self, Encoder, PackedBatch};
use crate::arch::{BatchSeq, BuildOptions, CausalLm, Logits, WeightSource};
use crate::model::safetensors::SafetensorsWeights;
use crate::quant::KvProfile;
use crate::store::{ModelFormat, ResolvedModel};

/// Tokens per packed forward pass: bounds the activations (`tokens × intermediate` floats, about
/// 50 MB for MiniLM) while keeping the matmuls large enough to run at full speed.
pub const TOKENS_PER_PASS: usize = 8192;

/// Tokens per sequence per pass of a decoder embedder: its attention builds `[heads · t, len]`
/// scores per sequence, so long inputs run in pieces through their own KV cache (the same
/// chunking generation uses, [`crate::arch::PROMPT_CHUNK`]); the result does not change.
const DECODER_CHUNK: usize = crate::arch::PROMPT_CHUNK;

/// Architectures of the causal table that expose their final hidden states
/// ([`CausalLm::hidden_batch`]) and so can embed when their folder declares pooling.
pub const DECODER_EMBEDDERS: &[&str] = &["llama", "mistral", "qwen2", "qwen3"];

/// How token states become one vector (sentence-transformers' pooling modes). Several modes may
/// be on at once; their vectors are concatenated in sentence-transformers' order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Pooling {
    pub cls: bool,
    pub max: bool,
    pub mean: bool,
    pub mean_sqrt_len: bool,
    pub last_token: bool,
}

impl Pooling {
    pub const MEAN: Pooling = Pooling {
        cls: false,
        max: false,
        mean: true,
        mean_sqrt_len: false,
        last_token: false,
    };

    pub const LAST_TOKEN: Pooling = Pooling {
        cls: false,
        max: false,
        mean: false,
        mean_sqrt_len: false,
        last_token: true,
    };

    /// Reads `1_Pooling/config.json`: sentence-transformers 6.3's `pooling_mode` (a name or a
    /// list of names), or the older `pooling_mode_*_tokens: true` flags.
    pub fn from_config(c: &Value) -> anyhow::Result<Self> {
        if let Some(mode) = c.get("pooling_mode") {
            return Self::from_names(mode);
        }
        let on = |k: &str| c.get(k).and_then(Value::as_bool).unwrap_or(false);
        if on("pooling_mode_weightedmean_tokens") {
            bail!("weighted-mean pooling is not supported (supported: mean, cls, max, lasttoken, mean_sqrt_len)");
        }
        let p = Pooling {
            cls: on("pooling_mode_cls_token"),
            max: on("pooling_mode_max_tokens"),
            mean: on("pooling_mode_mean_tokens"),
            mean_sqrt_len: on("pooling_mode_mean_sqrt_len_tokens"),
            last_token: on("pooling_mode_lasttoken"),
        };
        if p.modes() == 0 {
            bail!("the pooling config turns on no pooling mode");
        }
        Ok(p)
    }

    /// `pooling_mode`: `"lasttoken"` or `["cls", "mean"]`. Several modes concatenate in the
    /// listed order; only sentence-transformers' canonical order (the one [`Self::pool`]
    /// writes) is accepted.
    fn from_names(mode: &Value) -> anyhow::Result<Self> {
        let names: Vec<&str> = match mode {
            Value::String(s) => vec![s.as_str()],
            Value::Array(items) => items
                .iter()
                .map(|v| v.as_str().context("pooling_mode lists a non-string"))
                .collect::<anyhow::Result<_>>()?,
            _ => bail!("pooling_mode must be a mode name or a list of them"),
        };
        const ORDER: [&str; 5] = ["cls", "max", "mean", "mean_sqrt_len_tokens", "lasttoken"];
        let mut p = Pooling::default();
        let mut last = None;
        for name in names {
            let slot = match name {
                "cls" => &mut p.cls,
                "max" => &mut p.max,
                "mean" => &mut p.mean,
                "mean_sqrt_len_tokens" => &mut p.mean_sqrt_len,
                "lasttoken" => &mut p.last_token,
                "weightedmean" => bail!("weighted-mean pooling is not supported (supported: mean, cls, max, lasttoken, mean_sqrt_len_tokens)"),
                other => bail!("unknown pooling mode '{other}' (supported: mean, cls, max, lasttoken, mean_sqrt_len_tokens)"),
            };
            *slot = true;
            let rank = ORDER.iter().position(|o| *o == name);
            if rank <= last {
                bail!(
                    "pooling modes listed out of the order {ORDER:?} (or twice) are not supported"
                );
            }
            last = rank;
        }
        if p.modes() == 0 {
            bail!("the pooling config turns on no pooling mode");
        }
        Ok(p)
    }

    fn modes(&self) -> usize {
        [
            self.cls,
            self.max,
            self.mean,
            self.mean_sqrt_len,
            self.last_token,
        ]
        .iter()
        .filter(|&&b| b)
        .count()
    }

    /// Short name for `show` and errors: `mean`, `cls+mean`, ...
    pub fn name(&self) -> String {
        let names = [
            (self.cls, "cls"),
            (self.max, "max"),
            (self.mean, "mean"),
            (self.mean_sqrt_len, "mean_sqrt_len"),
            (self.last_token, "lasttoken"),
        ];
        names
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, n)| *n)
            .collect::<Vec<_>>()
            .join("+")
    }

    /// Pools `rows` (`[len, width]`, one sequence's hidden states) into `out`.
    fn pool(&self, rows: &[f32], width: usize, out: &mut Vec<f32>) {
        let len = rows.len() / width;
        let row = |i: usize| &rows[i * width..(i + 1) * width];
        if self.cls {
            out.extend_from_slice(row(0));
        }
        if self.max {
            let mut m = row(0).to_vec();
            for i in 1..len {
                for (a, b) in m.iter_mut().zip(row(i)) {
                    *a = a.max(*b);
                }
            }
            out.extend(m);
        }
        if self.mean || self.mean_sqrt_len {
            let mut sum = vec![0f32; width];
            for i in 0..len {
                for (a, b) in sum.iter_mut().zip(row(i)) {
                    *a += b;
                }
            }
            if self.mean {
                out.extend(sum.iter().map(|s| s / len as f32));
            }
            if self.mean_sqrt_len {
                out.extend(sum.iter().map(|s| s / (len as f32).sqrt()));
            }
        }
        if self.last_token {
            out.extend_from_slice(row(len - 1));
        }
    }
}

/// What a model folder declares about its embeddings.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EmbeddingSpec {
    pub pooling: Pooling,
    /// L2-normalise the pooled vector (a `Normalize` module).
    pub normalize: bool,
    /// Longest input in tokens (`max_seq_length`, else the tokenizer's or the model's limit).
    pub max_tokens: Option<usize>,
}

fn read_json(path: &Path) -> anyhow::Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text)
        .map(Some)
        .with_context(|| format!("{} is not valid JSON", path.display()))
}

impl EmbeddingSpec {
    /// Reads `modules.json` and what it points to. `None` when the folder has no `modules.json`
    /// (not a sentence-transformers folder).
    pub fn from_dir(dir: &Path) -> anyhow::Result<Option<Self>> {
        let Some(modules) = read_json(&dir.join("modules.json"))? else {
            return Ok(None);
        };
        let list = modules
            .as_array()
            .context("modules.json is not a list of modules")?;
        let mut pooling = None;
        let mut normalize = false;
        for m in list {
            let kind = m.get("type").and_then(Value::as_str).unwrap_or("");
            let path = m.get("path").and_then(Value::as_str).unwrap_or("");
            match kind.rsplit('.').next().unwrap_or("") {
                "Transformer" => {}
                "Pooling" => {
                    if path.split('/').any(|c| c == "..") {
                        bail!("modules.json: pooling path '{path}' leaves the model folder");
                    }
                    let file = dir.join(path).join("config.json");
                    let c = read_json(&file)?
                        .with_context(|| format!("modules.json names a Pooling module but {} is missing", file.display()))?;
                    pooling = Some(Pooling::from_config(&c).with_context(|| file.display().to_string())?);
                }
                "Normalize" => normalize = true,
                other => bail!(
                    "modules.json: the sentence-transformers module '{other}' ({kind}) is not supported (supported: Transformer, Pooling, Normalize)"
                ),
            }
        }
        // sentence-transformers 6.3 keeps the limit in tokenizer_config.json instead.
        let max_tokens = read_json(&dir.join("sentence_bert_config.json"))?
            .and_then(|c| c.get("max_seq_length").and_then(Value::as_u64))
            .or(tokenizer_limit(dir)?.map(|n| n as u64))
            .map(|v| v as usize);
        Ok(Some(EmbeddingSpec {
            pooling: pooling.unwrap_or(Pooling::MEAN),
            normalize,
            max_tokens,
        }))
    }
}

/// `model_max_length` of tokenizer_config.json, unless it is transformers' "no limit" sentinel.
fn tokenizer_limit(dir: &Path) -> anyhow::Result<Option<usize>> {
    Ok(read_json(&dir.join("tokenizer_config.json"))?
        .and_then(|c| c.get("model_max_length").and_then(Value::as_u64))
        .filter(|&n| n > 0 && n < 1 << 20)
        .map(|n| n as usize))
}

/// What to do with inputs longer than the model's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overflow {
    /// Keep the first tokens (the end marker stays), like sentence-transformers.
    #[default]
    Truncate,
    /// Fail with an error naming the input.
    Refuse,
}

/// Per-call options.
#[derive(Debug, Clone, Copy, Default)]
pub struct EmbedOptions {
    pub overflow: Overflow,
    /// Matryoshka: keep the first N dimensions (renormalised when the model normalises).
    pub dimensions: Option<usize>,
}

/// Vectors in input order, with the tokens each input used.
#[derive(Debug, Clone)]
pub struct Embeddings {
    pub vectors: Vec<Vec<f32>>,
    pub token_counts: Vec<usize>,
}

impl Embeddings {
    pub fn total_tokens(&self) -> usize {
        self.token_counts.iter().sum()
    }
}

/// What turns token ids into per-token hidden states.
enum Backbone {
    /// An encoder: every sequence of a pass packed side by side, attending both ways.
    Encoder(Box<dyn Encoder>),
    /// A causal model's final hidden states; each sequence in a fresh KV cache of its own.
    Decoder {
        model: Box<dyn CausalLm>,
        hidden_size: usize,
    },
}

impl Backbone {
    fn hidden_size(&self) -> usize {
        match self {
            Backbone::Encoder(e) => e.info().hidden_size,
            Backbone::Decoder { hidden_size, .. } => *hidden_size,
        }
    }

    fn vocab_size(&self) -> usize {
        match self {
            Backbone::Encoder(e) => e.info().vocab_size,
            Backbone::Decoder { model, .. } => model.info().vocab_size,
        }
    }

    fn max_positions(&self) -> usize {
        match self {
            Backbone::Encoder(e) => e.info().max_positions,
            Backbone::Decoder { model, .. } => model.info().context_length,
        }
    }

    fn architecture(&self) -> &str {
        match self {
            Backbone::Encoder(e) => &e.info().architecture,
            Backbone::Decoder { model, .. } => &model.info().architecture,
        }
    }

    /// Hidden states of `group` in one pass: per sequence, all its rows (`last_only`: just the
    /// last one, all that last-token pooling reads), `[rows, hidden]` row-major.
    fn run(&self, group: &[Vec<u32>], last_only: bool) -> anyhow::Result<Vec<Vec<f32>>> {
        let width = self.hidden_size();
        match self {
            Backbone::Encoder(encoder) => {
                let flat: Vec<u32> = group.iter().flatten().copied().collect();
                let types = vec![0u32; flat.len()];
                let lens: Vec<usize> = group.iter().map(Vec::len).collect();
                let hidden = encoder.hidden_states(&PackedBatch {
                    tokens: &flat,
                    type_ids: &types,
                    lens: &lens,
                })?;
                let mut out = Vec::with_capacity(group.len());
                let mut offset = 0;
                for &len in &lens {
                    let rows = if last_only {
                        &hidden[(offset + len - 1) * width..(offset + len) * width]
                    } else {
                        &hidden[offset * width..(offset + len) * width]
                    };
                    out.push(rows.to_vec());
                    offset += len;
                }
                Ok(out)
            }
            Backbone::Decoder { model, .. } => {
                let info = model.info();
                let mut states = group
                    .iter()
                    .map(|seq| info.new_cache(KvProfile::Default, seq.len()))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                let mut out: Vec<Vec<f32>> = vec![Vec::new(); group.len()];
                // Step k runs piece k of every sequence that still has one, all in one batch.
                let longest = group.iter().map(Vec::len).max().unwrap_or(0);
                let mut start = 0;
                while start < longest {
                    let mut batch = Vec::new();
                    let mut owners = Vec::new();
                    for (i, (seq, state)) in group.iter().zip(states.iter_mut()).enumerate() {
                        if start >= seq.len() {
                            continue;
                        }
                        let end = (start + DECODER_CHUNK).min(seq.len());
                        let logits = match (last_only, end == seq.len()) {
                            (false, _) => Logits::All,
                            (true, true) => Logits::Last,
                            (true, false) => Logits::None,
                        };
                        if logits != Logits::None {
                            owners.push((
                                i,
                                if logits == Logits::All {
                                    end - start
                                } else {
                                    1
                                },
                            ));
                        }
                        batch.push(BatchSeq {
                            tokens: &seq[start..end],
                            state,
                            logits,
                        });
                    }
                    let hidden = model.hidden_batch(&mut batch)?;
                    let hidden: Vec<f32> = hidden.flatten_all()?.to_vec1()?;
                    let mut offset = 0;
                    for (i, rows) in owners {
                        out[i].extend_from_slice(&hidden[offset * width..(offset + rows) * width]);
                        offset += rows;
                    }
                    start += DECODER_CHUNK;
                }
                Ok(out)
            }
        }
    }
}

/// An embedding model ready to run.
pub struct EmbeddingModel {
    pub name: String,
    backbone: Backbone,
    /// The tokenizer without padding or truncation (for `Overflow::Refuse`) and the same one
    /// truncating to `max_tokens` (kept apart because cloning a vocabulary per call is slow).
    tokenizer: Tokenizer,
    truncating: Tokenizer,
    pub spec: EmbeddingSpec,
    /// The effective input limit in tokens.
    pub max_tokens: usize,
}

/// Whether `model_type` is an encoder architecture (the [`encoder`] table).
pub fn is_encoder(model_type: &str) -> bool {
    encoder::lookup(model_type).is_some()
}

/// Whether the folder declares sentence-transformers pooling (a `modules.json` naming a
/// Pooling module): what makes a decoder folder an embedding model.
fn declares_pooling(dir: &Path) -> bool {
    read_json(&dir.join("modules.json"))
        .ok()
        .flatten()
        .and_then(|m| m.as_array().cloned())
        .is_some_and(|list| {
            list.iter().any(|m| {
                m.get("type")
                    .and_then(Value::as_str)
                    .is_some_and(|t| t.rsplit('.').next() == Some("Pooling"))
            })
        })
}

/// Whether the model folder `dir` (of architecture `model_type`) embeds: an encoder, or a
/// decoder that exposes hidden states and whose folder declares pooling. Such a decoder is an
/// embedding model only (Ollama lists `qwen3-embedding` the same way): its checkpoint is the
/// base model, without a trained LM head.
pub fn embeds(dir: &Path, model_type: &str) -> bool {
    is_encoder(model_type) || (DECODER_EMBEDDERS.contains(&model_type) && declares_pooling(dir))
}

/// What an embedding model will need in memory, from its files (before any weight is read):
/// its weights as stored (encoders convert to f32: at most twice a bf16 file), the largest
/// pass's activations and, for decoders, the KV cache of one pass's tokens.
pub fn memory_estimate(
    resolved: &ResolvedModel,
    metadata: &crate::model::inspect::ModelMetadata,
) -> anyhow::Result<crate::device::MemoryEstimate> {
    let dir = &resolved.dir;
    let mut stored = 0u64;
    for file in crate::model::safetensors::shard_files(dir)? {
        stored += std::fs::metadata(&file)
            .with_context(|| format!("cannot read {}", file.display()))?
            .len();
    }
    let config = read_json(&dir.join("config.json"))?.unwrap_or(Value::Null);
    let get = |k: &str| config.get(k).and_then(Value::as_u64).unwrap_or(0) as usize;
    let hidden = metadata.embedding_length.unwrap_or(0) as usize;
    let model_type = metadata.architecture.as_deref().unwrap_or("");
    let encoder = is_encoder(model_type);
    let weights = if encoder {
        stored.saturating_mul(2)
    } else {
        stored
    };
    let kv_per_token = if encoder {
        0
    } else {
        metadata
            .kv_bytes_per_token(4)
            .into_iter()
            .find(|(p, _)| *p == KvProfile::Default)
            .map_or(0, |(_, b)| b)
    };
    let activations = crate::device::activation_bytes(&crate::device::ActivationShape {
        hidden,
        intermediate: match get("intermediate_size") {
            0 => 4 * hidden,
            n => n,
        },
        vocab: 0,
        heads: metadata.attention_heads.unwrap_or(0) as usize,
        batch_tokens: TOKENS_PER_PASS,
        context: DECODER_CHUNK,
        dtype_bytes: 4,
    });
    Ok(crate::device::MemoryEstimate::new(
        weights,
        kv_per_token,
        TOKENS_PER_PASS,
        activations,
    ))
}

/// What `show` reports for a model folder: its capabilities (Ollama's words: `completion`,
/// `embedding`) and, for embedding models, what the folder declares about pooling.
pub fn describe(
    dir: &Path,
    model_type: Option<&str>,
) -> (Vec<&'static str>, Option<EmbeddingSpec>) {
    let caps = match model_type {
        Some(t) if embeds(dir, t) => vec!["embedding"],
        Some(t) => encoder::capabilities(t),
        None => Vec::new(),
    };
    let spec = if caps.contains(&"embedding") {
        EmbeddingSpec::from_dir(dir)
            .ok()
            .flatten()
            .or(Some(EmbeddingSpec {
                pooling: Pooling::MEAN,
                normalize: false,
                max_tokens: None,
            }))
    } else {
        None
    };
    (caps, spec)
}

impl EmbeddingModel {
    /// Loads the embedding model `resolved` names; a model that cannot embed is a clear error.
    pub fn load(resolved: &ResolvedModel) -> anyhow::Result<Self> {
        if resolved.format != ModelFormat::Safetensors {
            bail!(
                "'{}' is a GGUF model; embeddings run from safetensors model folders (config.json + model.safetensors)",
                resolved.display_name
            );
        }
        Self::load_dir(&resolved.dir, &resolved.display_name)
    }

    pub fn load_dir(dir: &Path, name: &str) -> anyhow::Result<Self> {
        let mut config = read_json(&dir.join("config.json"))?
            .with_context(|| format!("{} has no config.json", dir.display()))?;
        let model_type = config
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if !embeds(dir, &model_type) {
            let names: Vec<&str> = encoder::ENCODERS.iter().map(|a| a.model_type).collect();
            let why = if DECODER_EMBEDDERS.contains(&model_type.as_str()) {
                format!(
                    "it is a text-generation model: its folder declares no pooling (a sentence-transformers modules.json with a Pooling module makes a {model_type} model an embedder; embedding encoders: {})",
                    names.join(", ")
                )
            } else {
                format!(
                    "its architecture '{model_type}' is not an embedding model (encoders: {}; decoders with declared pooling: {})",
                    names.join(", "),
                    DECODER_EMBEDDERS.join(", ")
                )
            };
            bail!("model '{name}' cannot embed: {why}");
        }
        let weights = SafetensorsWeights::open_dir(dir)?;
        let backbone = if is_encoder(&model_type) {
            Backbone::Encoder(
                encoder::build(&config, &weights).with_context(|| {
                    format!("cannot load the embedding model in {}", dir.display())
                })?,
            )
        } else {
            // The LM head is never read when embedding: a base-model checkpoint without one
            // (Qwen3-Embedding-4B/8B) is built with the embedding table in its place.
            let has_head = weights.contains("lm_head.weight");
            if !has_head {
                if let Some(o) = config.as_object_mut() {
                    o.insert("tie_word_embeddings".into(), Value::Bool(true));
                }
            }
            let hidden_size = config
                .get("hidden_size")
                .and_then(Value::as_u64)
                .context("config.json has no hidden_size")? as usize;
            let model = crate::arch::build(
                &WeightSource::Safetensors {
                    config: &config,
                    weights: &weights,
                },
                &BuildOptions {
                    device: candle_core::Device::Cpu,
                    dtype: candle_core::DType::F32,
                    keep_weight_dtype: true,
                    activation_stats: None,
                },
            )
            .with_context(|| format!("cannot load the embedding model in {}", dir.display()))?;
            Backbone::Decoder { model, hidden_size }
        };
        let spec = EmbeddingSpec::from_dir(dir)?.unwrap_or(EmbeddingSpec {
            pooling: Pooling::MEAN,
            normalize: false,
            max_tokens: None,
        });
        let path = dir.join("tokenizer.json");
        let mut tokenizer = Tokenizer::from_file(&path)
            .map_err(|e| anyhow::anyhow!("cannot load {}: {e}", path.display()))?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let positions = backbone.max_positions();
        let max_tokens = spec
            .max_tokens
            .or(tokenizer_limit(dir)?)
            .unwrap_or(positions)
            .min(positions);
        let mut truncating = tokenizer.clone();
        truncating
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                strategy: TruncationStrategy::LongestFirst,
                direction: TruncationDirection::Right,
                stride: 0,
            }))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(EmbeddingModel {
            name: name.to_string(),
            backbone,
            tokenizer,
            truncating,
            spec,
            max_tokens,
        })
    }

    /// Width of the vectors [`Self::embed`] returns without `dimensions`.
    pub fn dimensions(&self) -> usize {
        self.backbone.hidden_size() * self.spec.pooling.modes()
    }

    pub fn architecture(&self) -> &str {
        self.backbone.architecture()
    }

    /// Token ids (with the model's special tokens) of each text, limited per `overflow`.
    pub fn tokenize(&self, texts: &[&str], overflow: Overflow) -> anyhow::Result<Vec<Vec<u32>>> {
        let tok = match overflow {
            Overflow::Truncate => &self.truncating,
            Overflow::Refuse => &self.tokenizer,
        };
        let encodings = tok
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| anyhow::anyhow!("cannot tokenize: {e}"))?;
        let ids: Vec<Vec<u32>> = encodings.iter().map(|e| e.get_ids().to_vec()).collect();
        for (i, seq) in ids.iter().enumerate() {
            self.check_length(i, seq.len(), overflow)?;
        }
        Ok(ids)
    }

    fn check_length(&self, index: usize, len: usize, overflow: Overflow) -> anyhow::Result<()> {
        if len == 0 {
            bail!("input {index} has no tokens");
        }
        if len > self.max_tokens && overflow == Overflow::Refuse {
            bail!(
                "input {index} has {len} tokens, more than the model's limit of {}; shorten it or allow truncation",
                self.max_tokens
            );
        }
        Ok(())
    }

    /// Embeds texts.
    pub fn embed(&self, texts: &[&str], options: &EmbedOptions) -> anyhow::Result<Embeddings> {
        let ids = self.tokenize(texts, options.overflow)?;
        self.embed_tokens(ids, options)
    }

    /// Embeds token id sequences (as given: no special tokens are added), truncating or refusing
    /// long ones per `options`.
    pub fn embed_tokens(
        &self,
        ids: Vec<Vec<u32>>,
        options: &EmbedOptions,
    ) -> anyhow::Result<Embeddings> {
        let dims = self.check_dimensions(options.dimensions)?;
        let ids = self.prepare(ids, options.overflow)?;
        let mut vectors = self.pooled(&ids)?;
        for v in &mut vectors {
            self.shorten(v, dims);
        }
        Ok(Embeddings {
            vectors,
            token_counts: ids.iter().map(Vec::len).collect(),
        })
    }

    /// The width a request for `dimensions` gets, or why it cannot.
    pub fn check_dimensions(&self, dimensions: Option<usize>) -> anyhow::Result<usize> {
        let full = self.dimensions();
        match dimensions {
            None => Ok(full),
            Some(0) => bail!("dimensions must be at least 1"),
            Some(n) if n > full => {
                bail!("dimensions {n} is more than the model's {full}-dimensional embeddings")
            }
            Some(n) => Ok(n),
        }
    }

    /// Checks token id sequences (not empty, inside the vocabulary) and truncates long ones
    /// to the model's limit, or refuses them, per `overflow`.
    pub fn prepare(
        &self,
        mut ids: Vec<Vec<u32>>,
        overflow: Overflow,
    ) -> anyhow::Result<Vec<Vec<u32>>> {
        let vocab = self.backbone.vocab_size();
        for (i, seq) in ids.iter_mut().enumerate() {
            self.check_length(i, seq.len(), overflow)?;
            seq.truncate(self.max_tokens);
            if let Some(bad) = seq.iter().find(|&&t| t as usize >= vocab) {
                bail!("input {i}: token id {bad} is outside the vocabulary ({vocab} tokens)");
            }
        }
        Ok(ids)
    }

    /// Full-width vectors (pooled, normalised when the model normalises) of prepared sequences,
    /// in packed passes of at most [`TOKENS_PER_PASS`] tokens. The server packs the sequences
    /// of every waiting request into one call.
    pub fn pooled(&self, ids: &[Vec<u32>]) -> anyhow::Result<Vec<Vec<f32>>> {
        let width = self.backbone.hidden_size();
        let last_only = self.spec.pooling == Pooling::LAST_TOKEN;
        let mut vectors = Vec::with_capacity(ids.len());
        let mut start = 0;
        while start < ids.len() {
            // Sequences in input order until the pass holds TOKENS_PER_PASS tokens (at least one).
            let mut end = start;
            let mut tokens = 0;
            while end < ids.len() && (end == start || tokens + ids[end].len() <= TOKENS_PER_PASS) {
                tokens += ids[end].len();
                end += 1;
            }
            for rows in self.backbone.run(&ids[start..end], last_only)? {
                let mut v = Vec::with_capacity(self.dimensions());
                self.spec.pooling.pool(&rows, width, &mut v);
                if self.spec.normalize {
                    l2_normalize(&mut v);
                }
                vectors.push(v);
            }
            start = end;
        }
        Ok(vectors)
    }

    /// Matryoshka: keeps the first `dims` values of a full vector (renormalised when the model
    /// normalises).
    pub fn shorten(&self, v: &mut Vec<f32>, dims: usize) {
        if dims < v.len() {
            v.truncate(dims);
            if self.spec.normalize {
                l2_normalize(v);
            }
        }
    }
}

/// Scales `v` to unit length (sentence-transformers' Normalize: divide by max(‖v‖, 1e-12)).
fn l2_normalize(v: &mut [f32]) {
    let norm = v
        .iter()
        .map(|x| (*x as f64) * (*x as f64))
        .sum::<f64>()
        .sqrt();
    let scale = (1.0 / norm.max(1e-12)) as f32;
    v.iter_mut().for_each(|x| *x *= scale);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_modes_concatenate_in_sentence_transformers_order() {
        let p = Pooling::from_config(&serde_json::json!({
            "pooling_mode_cls_token": true, "pooling_mode_mean_tokens": true,
            "pooling_mode_max_tokens": true, "pooling_mode_lasttoken": true
        }))
        .unwrap();
        assert_eq!(p.name(), "cls+max+mean+lasttoken");
        // Two rows of width 2: [1, 4], [3, 2].
        let mut out = Vec::new();
        p.pool(&[1.0, 4.0, 3.0, 2.0], 2, &mut out);
        assert_eq!(out, vec![1.0, 4.0, 3.0, 4.0, 2.0, 3.0, 3.0, 2.0]);
        let none = Pooling::from_config(&serde_json::json!({"pooling_mode_mean_tokens": false}));
        assert!(none.is_err());
        let weighted =
            Pooling::from_config(&serde_json::json!({"pooling_mode_weightedmean_tokens": true}));
        assert!(weighted.unwrap_err().to_string().contains("weighted"));
    }

    #[test]
    fn pooling_reads_sentence_transformers_6_3_names() {
        let p = |v: Value| {
            Pooling::from_config(&serde_json::json!({"embedding_dimension": 8, "pooling_mode": v}))
        };
        assert_eq!(p("lasttoken".into()).unwrap(), Pooling::LAST_TOKEN);
        assert_eq!(p("mean".into()).unwrap(), Pooling::MEAN);
        assert_eq!(
            p(serde_json::json!(["cls", "mean"])).unwrap().name(),
            "cls+mean"
        );
        assert!(
            p(serde_json::json!(["mean", "cls"])).is_err(),
            "listed order must be canonical"
        );
        assert!(p(serde_json::json!(["mean", "mean"])).is_err());
        assert!(p("weightedmean".into())
            .unwrap_err()
            .to_string()
            .contains("weighted"));
        assert!(p("median".into())
            .unwrap_err()
            .to_string()
            .contains("median"));
        assert!(p(serde_json::json!([])).is_err());
    }

    #[test]
    fn normalize_gives_unit_length() {
        let mut v = vec![3.0, 4.0];
        l2_normalize(&mut v);
        assert_eq!(v, vec![0.6, 0.8]);
        let mut zero = vec![0.0, 0.0];
        l2_normalize(&mut zero);
        assert_eq!(zero, vec![0.0, 0.0]);
    }

    #[test]
    fn spec_reads_sentence_transformers_folder() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("modules.json"),
            r#"[{"idx":0,"name":"0","path":"","type":"sentence_transformers.models.Transformer"},
               {"idx":1,"name":"1","path":"1_Pooling","type":"sentence_transformers.models.Pooling"},
               {"idx":2,"name":"2","path":"2_Normalize","type":"sentence_transformers.models.Normalize"}]"#,
        )
        .unwrap();
        std::fs::create_dir(dir.path().join("1_Pooling")).unwrap();
        std::fs::write(
            dir.path().join("1_Pooling/config.json"),
            r#"{"word_embedding_dimension": 384, "pooling_mode_cls_token": true}"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("sentence_bert_config.json"),
            r#"{"max_seq_length": 256, "do_lower_case": false}"#,
        )
        .unwrap();
        let spec = EmbeddingSpec::from_dir(dir.path()).unwrap().unwrap();
        assert_eq!(spec.pooling.name(), "cls");
        assert!(spec.normalize);
        assert_eq!(spec.max_tokens, Some(256));
        std::fs::write(
            dir.path().join("modules.json"),
            r#"[{"path":"2_Dense","type":"sentence_transformers.models.Dense"}]"#,
        )
        .unwrap();
        let err = EmbeddingSpec::from_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("Dense"), "{err}");
        assert!(EmbeddingSpec::from_dir(&dir.path().join("nope"))
            .unwrap()
            .is_none());
    }
}
