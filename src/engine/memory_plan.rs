//! What a model will need on its device, worked out from its files before any weight is read,
//! so a model that cannot fit is refused with the numbers instead of failing half-loaded (or
//! pushing the machine into swap). Weights count as their file bytes (the loader keeps MXFP4,
//! GGUF blocks and bf16 as stored), the KV cache as bytes per token of the selected profile at
//! the context that will be allocated, a hybrid model's recurrent state (fixed per sequence),
//! activations by [`crate::device::activation_bytes`].

use std::path::Path;

use anyhow::Context;
use candle_core::Device;
use serde_json::Value;

use crate::device::{activation_bytes, ActivationShape, MemoryEstimate};
use crate::model::inspect::{inspect_dir, inspect_gguf, ModelMetadata};
use crate::store::{ModelFormat, ResolvedModel};

/// Tokens of the largest forward pass assumed for activations: a prompt is prefilled in one
/// pass, but prompts near the full context are rare and the attention scores of one that long
/// would dominate every other term; 512 covers the common case.
const PREFILL_TOKENS: usize = 512;

/// The engine computes in f32 and keeps the default KV cache in the compute dtype.
const COMPUTE_DTYPE_BYTES: usize = 4;

/// Shape facts the estimate needs beyond [`ModelMetadata`].
struct Shape {
    meta: ModelMetadata,
    intermediate: usize,
    vocab: usize,
}

fn safetensors_shape(dir: &Path, known: Option<&ModelMetadata>) -> anyhow::Result<Shape> {
    let meta = match known {
        Some(m) => m.clone(),
        None => inspect_dir(dir)?,
    };
    let text = std::fs::read_to_string(dir.join("config.json"))
        .with_context(|| format!("cannot read {}/config.json", dir.display()))?;
    let config: Value = serde_json::from_str(&text)
        .with_context(|| format!("{}/config.json is not valid JSON", dir.display()))?;
    // Sizes are validated before they are multiplied into an estimate.
    super::preflight::check_architecture_config(&config)
        .with_context(|| format!("in {}/config.json", dir.display()))?;
    let config = config
        .get("text_config")
        .filter(|t| t.is_object())
        .unwrap_or(&config);
    let get = |k: &str| config.get(k).and_then(Value::as_u64).unwrap_or(0) as usize;
    let hidden = meta.embedding_length.unwrap_or(0) as usize;
    let intermediate = match get("intermediate_size") {
        0 => 4 * hidden,
        n => n,
    };
    Ok(Shape {
        meta,
        intermediate,
        vocab: get("vocab_size"),
    })
}

fn gguf_shape(path: &Path, known: Option<&ModelMetadata>) -> anyhow::Result<Shape> {
    let meta = match known {
        Some(m) => m.clone(),
        None => inspect_gguf(path)?,
    };
    let file = crate::model::gguf::GgufFile::open(path)?;
    super::preflight::check_gguf_config(&file)?;
    let arch = meta.architecture.clone().unwrap_or_default();
    let hidden = meta.embedding_length.unwrap_or(0) as usize;
    let intermediate = file
        .get_usize(&format!("{arch}.feed_forward_length"))
        .unwrap_or(4 * hidden);
    let vocab = file
        .get_usize(&format!("{arch}.vocab_size"))
        .or_else(|| {
            file.get("tokenizer.ggml.tokens")
                .and_then(|v| v.to_vec().ok())
                .map(|v| v.len())
        })
        .unwrap_or(0);
    Ok(Shape {
        meta,
        intermediate,
        vocab,
    })
}

/// Bytes of the files holding the weights.
fn weight_bytes(resolved: &ResolvedModel) -> anyhow::Result<u64> {
    if let Some(gguf) = &resolved.gguf_file {
        return Ok(std::fs::metadata(gguf)
            .with_context(|| format!("cannot read {}", gguf.display()))?
            .len());
    }
    let mut total = 0;
    for entry in std::fs::read_dir(&resolved.dir)
        .with_context(|| format!("cannot read {}", resolved.dir.display()))?
    {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            total += std::fs::metadata(&path)?.len();
        }
    }
    Ok(total)
}

/// The estimate for running `resolved` with a context of `ctx` tokens (`None`: the model's
/// limit capped at `default_ctx`, as `run` allocates it).
pub fn estimate(
    resolved: &ResolvedModel,
    ctx: Option<usize>,
    default_ctx: usize,
) -> anyhow::Result<MemoryEstimate> {
    let shape = match (&resolved.format, &resolved.gguf_file) {
        (ModelFormat::Gguf, Some(path)) => gguf_shape(path, None)?,
        _ => safetensors_shape(&resolved.dir, None)?,
    };
    estimate_from_shape(resolved, &shape, ctx, default_ctx)
}

fn estimate_from_shape(
    resolved: &ResolvedModel,
    shape: &Shape,
    ctx: Option<usize>,
    default_ctx: usize,
) -> anyhow::Result<MemoryEstimate> {
    let meta = &shape.meta;
    let model_ctx = meta.context_length.unwrap_or(default_ctx as u64) as usize;
    let context = ctx.unwrap_or(model_ctx.min(default_ctx));
    let kv_per_token = meta
        .kv_bytes_per_token(COMPUTE_DTYPE_BYTES)
        .into_iter()
        .find(|(p, _)| *p == resolved.kv_profile)
        .map(|(_, b)| b)
        .unwrap_or(0);
    let active_experts = meta.experts_active.unwrap_or(1) as usize;
    let activations = activation_bytes(&ActivationShape {
        hidden: meta.embedding_length.unwrap_or(0) as usize,
        intermediate: shape.intermediate * active_experts,
        vocab: shape.vocab,
        heads: meta.attention_heads.unwrap_or(0) as usize,
        batch_tokens: PREFILL_TOKENS.min(context),
        context,
        dtype_bytes: COMPUTE_DTYPE_BYTES,
    });
    Ok(
        MemoryEstimate::new(weight_bytes(resolved)?, kv_per_token, context, activations)
            .with_recurrent_state(meta.recurrent_state_bytes.unwrap_or(0)),
    )
}

/// [`ensure_fits`] with the metadata the resolver already read (not read again).
pub fn ensure_fits_with(
    resolved: &ResolvedModel,
    metadata: &ModelMetadata,
    device: &Device,
    ctx: Option<usize>,
    default_ctx: usize,
) -> anyhow::Result<()> {
    let shape = match (&resolved.format, &resolved.gguf_file) {
        (ModelFormat::Gguf, Some(path)) => gguf_shape(path, Some(metadata)),
        _ => safetensors_shape(&resolved.dir, Some(metadata)),
    };
    if let Ok(estimate) = shape.and_then(|s| estimate_from_shape(resolved, &s, ctx, default_ctx)) {
        crate::device::ensure_fits(device, &estimate)?;
    }
    Ok(())
}

/// Refuses, before loading, a model that does not fit `device` (see [`crate::device::ensure_fits`]).
/// Files too damaged to estimate are left to the loader, whose errors name the problem.
pub fn ensure_fits(
    resolved: &ResolvedModel,
    device: &Device,
    ctx: Option<usize>,
    default_ctx: usize,
) -> anyhow::Result<()> {
    if let Ok(estimate) = estimate(resolved, ctx, default_ctx) {
        crate::device::ensure_fits(device, &estimate)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::check_fits;
    use crate::quant::KvProfile;
    use std::path::PathBuf;

    fn gpt_oss_tiny(kv_profile: KvProfile) -> ResolvedModel {
        let dir = PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/gpt_oss_tiny"
        ));
        ResolvedModel {
            display_name: "gpt_oss_tiny".into(),
            format: ModelFormat::Safetensors,
            dir,
            gguf_file: None,
            kv_profile,
            gguf_type: None,
        }
    }

    #[test]
    fn weights_are_file_bytes_and_kv_follows_profile_and_context() {
        let m = gpt_oss_tiny(KvProfile::Default);
        let e = estimate(&m, Some(1000), 4096).unwrap();
        assert_eq!(e.weights, 292_352 + 292_552);
        // 4 layers × 2 (k, v) × 2 KV heads × 24 head dim × 4 bytes.
        assert_eq!(e.kv_bytes_per_token, 4 * 2 * 2 * 24 * 4);
        assert_eq!(e.kv_cache, 1000 * e.kv_bytes_per_token);
        assert!(e.activations > 0);
        let default_ctx = estimate(&m, None, 4096).unwrap();
        assert_eq!(default_ctx.context, 4096, "model limit 131072 capped");
        let int8 = estimate(&gpt_oss_tiny(KvProfile::KvInt8), Some(1000), 4096).unwrap();
        assert!(int8.kv_cache < e.kv_cache / 2, "{int8:?}");
    }

    #[test]
    fn too_little_memory_is_refused_with_the_numbers_and_advice() {
        let e = estimate(&gpt_oss_tiny(KvProfile::Default), Some(131072), 4096).unwrap();
        let err = check_fits("cpu", &e, 10_000_000).unwrap_err().to_string();
        assert!(err.starts_with("not enough memory on cpu"), "{err}");
        assert!(err.contains("for 131072 tokens"), "{err}");
        assert!(err.contains("only 10.0 MB is free"), "{err}");
        assert!(err.contains("Try a smaller --ctx"), "{err}");
        assert!(check_fits("cpu", &e, e.total()).is_ok());
    }
}
