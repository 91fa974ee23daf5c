//! From a resolved model to something that generates: weights through the architecture table,
//! tokenizer, chat template and generation defaults.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use candle_core::{DType, Device};
use serde_json::Value;

use super::chat_template::ChatTemplate;
use super::sampler::SamplingParams;
use super::tokenizer::TextTokenizer;
use crate::arch::{self, BuildOptions, CausalLm, WeightSource};
use crate::model::config::token_ids;
use crate::model::gguf::GgufFile;
use crate::model::safetensors::SafetensorsWeights;
use crate::store::{ModelFormat, ResolvedModel};

/// A model with everything needed to talk to it.
pub struct LoadedModel {
    pub model: Box<dyn CausalLm>,
    pub tokenizer: TextTokenizer,
    pub template: Option<ChatTemplate>,
    /// Sampling defaults from generation_config.json, over our own defaults.
    pub sampling: SamplingParams,
    pub load_duration: Duration,
    /// Bytes of the weight files.
    pub file_bytes: u64,
}

/// Where and how to load.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// Keep bf16/f16 weights as stored (activations stay f32); `false` converts them to f32.
    pub keep_weight_dtype: bool,
    /// `xllm imatrix`: where the layers record their input activations.
    pub activation_stats: Option<std::sync::Arc<crate::kernels::act_stats::ActivationStats>>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            keep_weight_dtype: true,
            activation_stats: None,
        }
    }
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

/// Sampling defaults a checkpoint's generation_config.json asks for.
fn sampling_from_generation_config(gen: Option<&Value>) -> SamplingParams {
    let mut p = SamplingParams::default();
    let Some(gen) = gen else { return p };
    if gen.get("do_sample").and_then(Value::as_bool) == Some(false) {
        p.temperature = 0.0;
    }
    if let Some(t) = gen.get("temperature").and_then(Value::as_f64) {
        p.temperature = t;
    }
    if let Some(v) = gen.get("top_p").and_then(Value::as_f64) {
        p.top_p = Some(v);
    }
    if let Some(v) = gen.get("top_k").and_then(Value::as_u64) {
        p.top_k = Some(v as usize);
    }
    if let Some(v) = gen.get("min_p").and_then(Value::as_f64) {
        p.min_p = Some(v);
    }
    if let Some(v) = gen.get("repetition_penalty").and_then(Value::as_f64) {
        p.repeat_penalty = v as f32;
    }
    p
}

/// The tokenizer of `resolved` alone (no weights read): `xllm tokenize`.
pub fn load_tokenizer(resolved: &ResolvedModel) -> anyhow::Result<TextTokenizer> {
    match resolved.format {
        ModelFormat::Safetensors => {
            let dir = &resolved.dir;
            let config = read_json(&dir.join("config.json"))?.unwrap_or(Value::Null);
            TextTokenizer::from_dir(dir, &token_ids(config.get("eos_token_id")))
        }
        ModelFormat::Gguf => {
            let path = resolved
                .gguf_file
                .as_ref()
                .context("GGUF model without a .gguf file")?;
            TextTokenizer::from_gguf(&GgufFile::open(path)?)
        }
    }
}

/// Loads weights, tokenizer and template of `resolved`.
pub fn load(resolved: &ResolvedModel, options: &LoadOptions) -> anyhow::Result<LoadedModel> {
    let t0 = Instant::now();
    let build = BuildOptions {
        device: options.device.clone(),
        dtype: DType::F32,
        keep_weight_dtype: options.keep_weight_dtype,
        activation_stats: options.activation_stats.clone(),
    };
    let (model, tokenizer, sampling, file_bytes) = match resolved.format {
        ModelFormat::Safetensors => {
            let dir = &resolved.dir;
            let config_path = dir.join("config.json");
            let config = read_json(&config_path)?
                .with_context(|| format!("{} has no config.json", dir.display()))?;
            let weights = SafetensorsWeights::open_dir(dir)?;
            let model = arch::build(
                &WeightSource::Safetensors {
                    config: &config,
                    weights: &weights,
                },
                &build,
            )
            .with_context(|| format!("cannot load the model in {}", dir.display()))?;
            let gen = read_json(&dir.join("generation_config.json"))?;
            if let Some(g) = &gen {
                crate::model::config::check_generation_config(g)
                    .context("in generation_config.json")?;
            }
            let mut eos = token_ids(config.get("eos_token_id"));
            if let Some(g) = &gen {
                eos.extend(token_ids(g.get("eos_token_id")));
            }
            let tokenizer = TextTokenizer::from_dir(dir, &eos)?;
            (
                model,
                tokenizer,
                sampling_from_generation_config(gen.as_ref()),
                weights.total_bytes(),
            )
        }
        ModelFormat::Gguf => {
            let path = resolved
                .gguf_file
                .as_ref()
                .context("GGUF model without a .gguf file")?;
            let file = GgufFile::open(path)?;
            let model = arch::build(&WeightSource::Gguf(&file), &build)
                .with_context(|| format!("cannot load {}", path.display()))?;
            let tokenizer = TextTokenizer::from_gguf(&file)?;
            let bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            (model, tokenizer, SamplingParams::default(), bytes)
        }
    };
    let mut tokenizer = tokenizer;
    tokenizer.limit_to_vocab(model.info().vocab_size);
    if tokenizer.chat_template.is_none() {
        tokenizer.chat_template =
            super::chat_template::builtin_template(&model.info().architecture).map(String::from);
    }
    let template = match &tokenizer.chat_template {
        Some(src) => Some(ChatTemplate::new(
            src,
            tokenizer.bos_token.as_deref(),
            tokenizer.eos_token.as_deref(),
        )?),
        None => None,
    };
    Ok(LoadedModel {
        model,
        tokenizer,
        template,
        sampling,
        load_duration: t0.elapsed(),
        file_bytes,
    })
}
