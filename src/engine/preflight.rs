//! The checks loading makes on a model's files before any weight is read, runnable on their own
//! so `show` refuses exactly the files `run` would refuse: the architecture's config (bounds and
//! consistency), generation_config.json, the weight files' headers and paths (index entries stay
//! inside the folder), GGUF metadata, the tokenizer and the chat template. What only reading the
//! weights can find (a tensor of the wrong shape) is still found at load.

use anyhow::Context;
use serde_json::Value;

use super::chat_template::ChatTemplate;
use super::tokenizer::TextTokenizer;
use crate::model::config::{check_generation_config, token_ids, LlamaConfig};
use crate::model::files::{read_text, MAX_TEXT_FILE};
use crate::model::gguf::GgufFile;
use crate::model::safetensors::SafetensorsWeights;
use crate::store::{ModelFormat, ResolvedModel};

/// Validates every file `run` reads of `resolved`, without loading weights.
pub fn check(resolved: &ResolvedModel) -> anyhow::Result<()> {
    let tokenizer = match resolved.format {
        ModelFormat::Safetensors => {
            let dir = &resolved.dir;
            let config_path = dir.join("config.json");
            let config: Value = serde_json::from_str(&read_text(&config_path, MAX_TEXT_FILE)?)
                .with_context(|| format!("{} is not valid JSON", config_path.display()))?;
            check_architecture_config(&config)
                .with_context(|| format!("in {}", config_path.display()))?;
            SafetensorsWeights::open_dir(dir)?;
            let mut eos = token_ids(config.get("eos_token_id"));
            let gen_path = dir.join("generation_config.json");
            if gen_path.is_file() {
                let gen: Value = serde_json::from_str(&read_text(&gen_path, MAX_TEXT_FILE)?)
                    .with_context(|| format!("{} is not valid JSON", gen_path.display()))?;
                check_generation_config(&gen)
                    .with_context(|| format!("in {}", gen_path.display()))?;
                eos.extend(token_ids(gen.get("eos_token_id")));
            }
            TextTokenizer::from_dir(dir, &eos)?
        }
        ModelFormat::Gguf => {
            let path = resolved
                .gguf_file
                .as_ref()
                .context("GGUF model without a .gguf file")?;
            let file = GgufFile::open(path)?;
            check_gguf_config(&file)?;
            TextTokenizer::from_gguf(&file)?
        }
    };
    if let Some(src) = &tokenizer.chat_template {
        ChatTemplate::new(
            src,
            tokenizer.bos_token.as_deref(),
            tokenizer.eos_token.as_deref(),
        )?;
    }
    Ok(())
}

/// The metadata checks of the architecture a GGUF file names (the builder's own).
pub fn check_gguf_config(file: &GgufFile) -> anyhow::Result<()> {
    let arch = crate::arch::lookup_gguf(file.architecture()?)?;
    if arch.model_type == "gpt_oss" {
        crate::arch::gpt_oss::config_from_gguf(file)?;
    } else {
        // The other GGUF architectures of the table are Llama-family.
        crate::arch::llama::config_from_gguf(file)?;
    }
    Ok(())
}

/// The config checks of the architecture `model_type` names (the same functions its builder
/// calls first).
pub fn check_architecture_config(config: &Value) -> anyhow::Result<()> {
    let model_type = config
        .get("model_type")
        .and_then(Value::as_str)
        .context("config.json has no model_type")?;
    // Embedding encoders have their own table; their builders validate their configs.
    if super::embed::can_embed(model_type) {
        return Ok(());
    }
    crate::arch::lookup(model_type)?;
    match model_type {
        "gpt_oss" => {
            crate::arch::gpt_oss::GptOssConfig::from_value(config)?;
        }
        "llama" | "mistral" | "qwen2" | "qwen3" => {
            LlamaConfig::from_value(config)?;
        }
        "gemma3_text" => {
            crate::arch::gemma3::config_from_json(config)?;
        }
        // Architectures added later validate in their builders; loading reports their problems.
        _ => {}
    }
    Ok(())
}
