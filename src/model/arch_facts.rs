//! Facts `show` reports that a family defines its own way and the generic header walk in
//! [`super::inspect`] cannot know: gpt-oss counts its parameters as OpenAI does (active = what one
//! token touches: attention, router, top-k experts and the unembedding, not the embedding table),
//! models with sliding-window attention report the window, and Nemotron-H its layer pattern and
//! per-sequence recurrent state.

use serde_json::Value;

use super::inspect::ModelMetadata;
use crate::arch::gpt_oss::GptOssConfig;
use crate::arch::nemotron_h::NemotronHConfig;

/// Refines `meta` (already filled from config.json and tensor headers) with family facts.
pub fn apply(config: &Value, meta: &mut ModelMetadata) {
    meta.sliding_window = sliding_window(config);
    // Encoders (embedding models) keep no KV cache, so no KV-cache profile applies.
    if meta
        .architecture
        .as_deref()
        .is_some_and(|a| crate::arch::encoder::lookup(a).is_some())
    {
        meta.kv_profiles = vec![crate::quant::KvProfile::Default];
    }
    if meta.architecture.as_deref() == Some("gpt_oss") {
        // A config the loader would refuse keeps the generic counts; `run` reports the problem.
        if let Ok(c) = GptOssConfig::from_value(config) {
            let (total, active) = c.parameter_counts();
            meta.parameters = Some(total);
            meta.active_parameters = Some(active);
        }
    }
    if meta.architecture.as_deref() == Some("nemotron_h") {
        if let Ok(c) = NemotronHConfig::from_value(config) {
            let (total, active) = c.parameter_counts();
            meta.parameters = Some(total);
            meta.active_parameters = Some(active);
            meta.layers = Some(c.layers.len() as u64);
            meta.layer_pattern = Some(c.pattern());
            meta.recurrent_state_bytes = Some(c.state_bytes_per_sequence());
        }
    }
}

/// The attention window, when some layers use one: `layer_types` naming `sliding_attention`
/// (gpt-oss, Gemma, Qwen3), or a `sliding_window` that `use_sliding_window` does not switch off.
fn sliding_window(config: &Value) -> Option<u64> {
    let window = config.get("sliding_window").and_then(Value::as_u64)?;
    if let Some(types) = config.get("layer_types").and_then(Value::as_array) {
        return types
            .iter()
            .any(|t| t.as_str() == Some("sliding_attention"))
            .then_some(window);
    }
    if config.get("use_sliding_window").and_then(Value::as_bool) == Some(false) {
        return None;
    }
    Some(window)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// openai/gpt-oss-20b's config.json (the fields that shape the model).
    fn gpt_oss_20b() -> Value {
        let sliding = ["sliding_attention", "full_attention"];
        let layer_types: Vec<&str> = sliding.iter().cycle().take(24).copied().collect();
        serde_json::json!({
            "model_type": "gpt_oss", "hidden_size": 2880, "intermediate_size": 2880,
            "num_hidden_layers": 24, "num_attention_heads": 64, "num_key_value_heads": 8,
            "head_dim": 64, "num_local_experts": 32, "num_experts_per_tok": 4,
            "experts_per_token": 4, "vocab_size": 201088, "sliding_window": 128,
            "max_position_embeddings": 131072, "layer_types": layer_types,
            "tie_word_embeddings": false, "rope_theta": 150000, "rms_norm_eps": 1e-5,
            "swiglu_limit": 7.0, "attention_bias": true,
            "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                "beta_slow": 1.0, "truncate": false, "original_max_position_embeddings": 4096},
            "quantization_config": {"quant_method": "mxfp4"}
        })
    }

    #[test]
    fn gpt_oss_20b_is_21b_total_and_3_6b_active() {
        let mut meta = ModelMetadata {
            architecture: Some("gpt_oss".into()),
            ..Default::default()
        };
        apply(&gpt_oss_20b(), &mut meta);
        let (total, active) = (meta.parameters.unwrap(), meta.active_parameters.unwrap());
        // OpenAI's model card: 20.91B total, 3.61B active.
        assert!((20.85e9..20.95e9).contains(&(total as f64)), "{total}");
        assert!((3.58e9..3.64e9).contains(&(active as f64)), "{active}");
        assert_eq!(meta.sliding_window, Some(128));
    }

    #[test]
    fn nemotron_3_nano_is_31_6b_total_3_2b_active_with_its_pattern_and_state() {
        let mut meta = ModelMetadata {
            architecture: Some("nemotron_h".into()),
            ..Default::default()
        };
        apply(&crate::arch::nemotron_h::tests::nano_30b(), &mut meta);
        let (total, active) = (meta.parameters.unwrap(), meta.active_parameters.unwrap());
        assert!((31.5e9..31.7e9).contains(&(total as f64)), "{total}");
        assert!((3.1e9..3.3e9).contains(&(active as f64)), "{active}");
        let pattern = meta.layer_pattern.unwrap();
        assert_eq!(pattern.len(), 52);
        assert_eq!(pattern.matches('M').count(), 23);
        assert_eq!(
            meta.recurrent_state_bytes,
            Some(23 * (3 * 6144 + 4096 * 128) * 4)
        );
    }

    #[test]
    fn sliding_window_only_when_used() {
        let w = |v: Value| sliding_window(&v);
        assert_eq!(w(serde_json::json!({"sliding_window": 4096})), Some(4096));
        assert_eq!(
            w(serde_json::json!({"sliding_window": 4096, "use_sliding_window": false})),
            None
        );
        assert_eq!(
            w(serde_json::json!({"sliding_window": 64, "layer_types": ["full_attention"]})),
            None
        );
        assert_eq!(w(serde_json::json!({"sliding_window": null})), None);
        assert_eq!(w(serde_json::json!({})), None);
    }
}
