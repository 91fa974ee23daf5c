//! Text embeddings: tokenizer → packed batch → encoder hidden states → pooling → normalisation
//! → optional Matryoshka truncation. Nothing here prints; the CLI and the server drive it.
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
use crate::model::safetensors::SafetensorsWeights;
use crate::store::{ModelFormat, ResolvedModel};

/// Tokens per packed forward pass: bounds the activations (`tokens × intermediate` floats, about
/// 50 MB for MiniLM) while keeping the matmuls large enough to run at full speed.
const TOKENS_PER_PASS: usize = 8192;

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

    /// Reads `1_Pooling/config.json`.
    pub fn from_config(c: &Value) -> anyhow::Result<Self> {
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
        let max_tokens = read_json(&dir.join("sentence_bert_config.json"))?
            .and_then(|c| c.get("max_seq_length").and_then(Value::as_u64))
            .map(|v| v as usize);
        Ok(Some(EmbeddingSpec {
            pooling: pooling.unwrap_or(Pooling::MEAN),
            normalize,
            max_tokens,
        }))
    }
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

/// An embedding model ready to run.
pub struct EmbeddingModel {
    pub name: String,
    encoder: Box<dyn Encoder>,
    /// The tokenizer without padding or truncation (for `Overflow::Refuse`) and the same one
    /// truncating to `max_tokens` (kept apart because cloning a vocabulary per call is slow).
    tokenizer: Tokenizer,
    truncating: Tokenizer,
    pub spec: EmbeddingSpec,
    /// The effective input limit in tokens.
    pub max_tokens: usize,
}

/// Whether a model of this `model_type` can embed, without loading it.
pub fn can_embed(model_type: &str) -> bool {
    encoder::lookup(model_type).is_some()
}

/// What `show` reports for a model folder: its capabilities (Ollama's words: `completion`,
/// `embedding`) and, for embedding models, what the folder declares about pooling.
pub fn describe(
    dir: &Path,
    model_type: Option<&str>,
) -> (Vec<&'static str>, Option<EmbeddingSpec>) {
    let caps = model_type.map(encoder::capabilities).unwrap_or_default();
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
        let config = read_json(&dir.join("config.json"))?
            .with_context(|| format!("{} has no config.json", dir.display()))?;
        let model_type = config
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("");
        if !can_embed(model_type) {
            let names: Vec<&str> = encoder::ENCODERS.iter().map(|a| a.model_type).collect();
            bail!(
                "model '{name}' cannot embed: its architecture '{model_type}' is not an embedding model (embedding architectures: {})",
                names.join(", ")
            );
        }
        let weights = SafetensorsWeights::open_dir(dir)?;
        let encoder = encoder::build(&config, &weights)
            .with_context(|| format!("cannot load the embedding model in {}", dir.display()))?;
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
        let positions = encoder.info().max_positions;
        let tokenizer_limit = read_json(&dir.join("tokenizer_config.json"))?
            .and_then(|c| c.get("model_max_length").and_then(Value::as_u64))
            .filter(|&n| n > 0 && n < 1 << 20)
            .map(|n| n as usize);
        let max_tokens = spec
            .max_tokens
            .or(tokenizer_limit)
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
            encoder,
            tokenizer,
            truncating,
            spec,
            max_tokens,
        })
    }

    /// Width of the vectors [`Self::embed`] returns without `dimensions`.
    pub fn dimensions(&self) -> usize {
        self.encoder.info().hidden_size * self.spec.pooling.modes()
    }

    pub fn architecture(&self) -> &str {
        &self.encoder.info().architecture
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
        mut ids: Vec<Vec<u32>>,
        options: &EmbedOptions,
    ) -> anyhow::Result<Embeddings> {
        let full = self.dimensions();
        let dims = match options.dimensions {
            None => full,
            Some(0) => bail!("dimensions must be at least 1"),
            Some(n) if n > full => {
                bail!("dimensions {n} is more than the model's {full}-dimensional embeddings")
            }
            Some(n) => n,
        };
        let vocab = self.encoder.info().vocab_size;
        for (i, seq) in ids.iter_mut().enumerate() {
            self.check_length(i, seq.len(), options.overflow)?;
            seq.truncate(self.max_tokens);
            if let Some(bad) = seq.iter().find(|&&t| t as usize >= vocab) {
                bail!("input {i}: token id {bad} is outside the vocabulary ({vocab} tokens)");
            }
        }
        let width = self.encoder.info().hidden_size;
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
            let group = &ids[start..end];
            let flat: Vec<u32> = group.iter().flatten().copied().collect();
            let types = vec![0u32; flat.len()];
            let lens: Vec<usize> = group.iter().map(Vec::len).collect();
            let hidden = self.encoder.hidden_states(&PackedBatch {
                tokens: &flat,
                type_ids: &types,
                lens: &lens,
            })?;
            let mut offset = 0;
            for &len in &lens {
                let rows = &hidden[offset * width..(offset + len) * width];
                let mut v = Vec::with_capacity(full);
                self.spec.pooling.pool(rows, width, &mut v);
                if self.spec.normalize {
                    l2_normalize(&mut v);
                }
                if dims < full {
                    v.truncate(dims);
                    if self.spec.normalize {
                        l2_normalize(&mut v);
                    }
                }
                vectors.push(v);
                offset += len;
            }
            start = end;
        }
        Ok(Embeddings {
            vectors,
            token_counts: ids.iter().map(Vec::len).collect(),
        })
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
