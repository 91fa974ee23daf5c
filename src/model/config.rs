//! `config.json` of Llama-family checkpoints (llama, mistral, qwen2, qwen3), including both RoPE
//! spellings: the older top-level `rope_theta` + `rope_scaling`, and the newer `rope_parameters`.

use std::path::Path;

use anyhow::{bail, Context};
use serde::Deserialize;
use serde_json::Value;

use super::bounds::{self, check_float, check_multiple, check_range};

/// How rotary position embeddings are scaled beyond the trained context.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Positions divided by `factor` (inverse frequencies divided by it).
    Linear { factor: f64 },
    /// NTK-aware: the base grows with the sequence once it exceeds the trained context.
    Dynamic {
        factor: f64,
        original_max_position_embeddings: usize,
    },
    /// Llama 3.1: low frequencies scaled by `factor`, high ones kept, smooth in between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// YaRN: per-dimension blend of interpolation and extrapolation plus an attention factor.
    Yarn {
        factor: f64,
        original_max_position_embeddings: usize,
        beta_fast: f64,
        beta_slow: f64,
        /// Multiplies cos/sin (`0.1 ln(factor) + 1` unless given).
        attention_factor: f64,
        /// Whether the correction range is truncated to integers (HF default true).
        truncate: bool,
    },
}

/// RoPE settings resolved from either spelling.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub scaling: RopeScaling,
    /// Dimensions rotated per head (`partial_rotary_factor` < 1 rotates only the first ones).
    pub rotary_dim: usize,
}

/// The fields the Llama-family model code needs, normalised across model types.
#[derive(Debug, Clone)]
pub struct LlamaConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope: RopeConfig,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (qwen2 always; llama when `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (llama `attention_bias`).
    pub o_bias: bool,
    /// Bias on the MLP projections (llama `mlp_bias`).
    pub mlp_bias: bool,
    /// Per-head RMSNorm of queries and keys before RoPE (qwen3).
    pub qk_norm: bool,
    /// Sliding attention window per layer (`None`: full attention).
    pub sliding_window: Vec<Option<usize>>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The dtype the checkpoint was saved in (`torch_dtype` / `dtype`), if stated.
    pub torch_dtype: Option<String>,
}

#[derive(Deserialize)]
struct Raw {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    partial_rotary_factor: Option<f64>,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    sliding_window: Option<Value>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<usize>,
    layer_types: Option<Vec<String>>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    2048
}

/// Token ids that may be a number, a list of numbers, or null.
pub fn token_ids(value: Option<&Value>) -> Vec<u32> {
    match value {
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(|n| vec![n])
            .unwrap_or_default(),
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_u64().and_then(|n| u32::try_from(n).ok()))
            .collect(),
        _ => Vec::new(),
    }
}

impl LlamaConfig {
    /// Reads and normalises `config.json` from a model folder.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let value: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        Self::from_value(&value).with_context(|| format!("in {}", path.display()))
    }

    pub fn from_value(value: &Value) -> anyhow::Result<Self> {
        bounds::check_json_integers(
            value,
            &[
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
                "max_position_embeddings",
                "max_window_layers",
            ],
        )?;
        let raw: Raw = serde_json::from_value(value.clone())
            .context("config.json lacks a field the Llama-family architectures need")?;
        let model_type = raw.model_type.clone().unwrap_or_else(|| "llama".into());
        let head_dim = raw
            .head_dim
            .unwrap_or(raw.hidden_size / raw.num_attention_heads.max(1));
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        if raw.num_attention_heads == 0
            || num_kv_heads == 0
            || raw.num_attention_heads % num_kv_heads != 0
        {
            bail!(
                "num_attention_heads ({}) must be a positive multiple of num_key_value_heads ({num_kv_heads})",
                raw.num_attention_heads
            );
        }
        let rope = parse_rope(&raw, head_dim)?;
        let sliding_window = sliding_windows(&raw, &model_type)?;
        let is_qwen2 = model_type == "qwen2";
        let cfg = Self {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps,
            rope,
            max_position_embeddings: raw.max_position_embeddings,
            tie_word_embeddings: raw.tie_word_embeddings,
            qkv_bias: is_qwen2 || raw.attention_bias,
            o_bias: !is_qwen2 && raw.attention_bias,
            mlp_bias: raw.mlp_bias,
            qk_norm: model_type == "qwen3",
            sliding_window,
            bos_token_id: token_ids(raw.bos_token_id.as_ref()).first().copied(),
            eos_token_ids: token_ids(raw.eos_token_id.as_ref()),
            torch_dtype: raw.torch_dtype.or(raw.dtype),
            model_type,
        };
        cfg.validate(json_key)?;
        Ok(cfg)
    }

    /// Checks every size and factor against the bounds in [`bounds`] and against each other, so
    /// nothing downstream divides by zero, allocates from an absurd value or indexes past a
    /// table. `key` names each field as the file spells it (config.json or GGUF metadata).
    pub fn validate(&self, key: impl Fn(Field) -> String) -> anyhow::Result<()> {
        use Field::*;
        check_range(&key(VocabSize), self.vocab_size, &bounds::VOCAB)?;
        check_range(&key(HiddenSize), self.hidden_size, &bounds::HIDDEN)?;
        check_range(
            &key(IntermediateSize),
            self.intermediate_size,
            &bounds::INTERMEDIATE,
        )?;
        check_range(&key(NumLayers), self.num_layers, &bounds::LAYERS)?;
        check_range(&key(NumHeads), self.num_heads, &bounds::HEADS)?;
        check_range(&key(NumKvHeads), self.num_kv_heads, &bounds::HEADS)?;
        check_multiple(
            &key(NumHeads),
            self.num_heads,
            &key(NumKvHeads),
            self.num_kv_heads,
            "query heads share key/value heads in equal groups",
        )?;
        check_range(&key(HeadDim), self.head_dim, &bounds::HEAD_DIM)?;
        if self.head_dim % 2 != 0 {
            bail!(
                "{} = {} must be even (RoPE rotates pairs)",
                key(HeadDim),
                self.head_dim
            );
        }
        check_range(
            &key(ContextLength),
            self.max_position_embeddings,
            &bounds::CONTEXT,
        )?;
        check_float(
            &key(RmsNormEps),
            self.rms_norm_eps,
            |v| (0.0..1.0).contains(&v),
            "a number in [0, 1)",
        )?;
        let rope = &self.rope;
        check_float(
            &key(RopeTheta),
            rope.theta,
            |v| v > 0.0,
            "a positive number",
        )?;
        if rope.rotary_dim < 2 || rope.rotary_dim > self.head_dim || rope.rotary_dim % 2 != 0 {
            bail!(
                "{} = {} is invalid (expected an even number from 2 to the head dimension {})",
                key(RotaryDim),
                rope.rotary_dim,
                self.head_dim
            );
        }
        let positive = |v: f64| v > 0.0;
        let check_original = |n: usize| check_range(&key(RopeOriginalContext), n, &bounds::CONTEXT);
        match &rope.scaling {
            RopeScaling::Default => {}
            RopeScaling::Linear { factor } => {
                check_float(&key(RopeFactor), *factor, positive, "a positive number")?
            }
            RopeScaling::Dynamic {
                factor,
                original_max_position_embeddings,
            } => {
                check_float(&key(RopeFactor), *factor, |v| v >= 1.0, "a number ≥ 1")?;
                check_original(*original_max_position_embeddings)?;
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                check_float(&key(RopeFactor), *factor, positive, "a positive number")?;
                check_original(*original_max_position_embeddings)?;
                let low = format!("{}.low_freq_factor", key(RopeScalingGroup));
                let high = format!("{}.high_freq_factor", key(RopeScalingGroup));
                check_float(&low, *low_freq_factor, positive, "a positive number")?;
                check_float(
                    &high,
                    *high_freq_factor,
                    |v| v > *low_freq_factor,
                    "a number above low_freq_factor",
                )?;
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                attention_factor,
                ..
            } => {
                check_float(&key(RopeFactor), *factor, positive, "a positive number")?;
                check_original(*original_max_position_embeddings)?;
                let group = key(RopeScalingGroup);
                for (name, v) in [
                    ("beta_fast", beta_fast),
                    ("beta_slow", beta_slow),
                    ("attention_factor", attention_factor),
                ] {
                    check_float(
                        &format!("{group}.{name}"),
                        *v,
                        positive,
                        "a positive number",
                    )?;
                }
            }
        }
        if self.sliding_window.len() != self.num_layers {
            bail!(
                "{} has {} entries for {} layers",
                key(SlidingWindow),
                self.sliding_window.len(),
                self.num_layers
            );
        }
        for w in self.sliding_window.iter().flatten() {
            check_range(&key(SlidingWindow), *w, &bounds::CONTEXT)?;
        }
        Ok(())
    }
}

/// A field of [`LlamaConfig`], for naming it as each file format spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    VocabSize,
    HiddenSize,
    IntermediateSize,
    NumLayers,
    NumHeads,
    NumKvHeads,
    HeadDim,
    ContextLength,
    RmsNormEps,
    RopeTheta,
    RotaryDim,
    RopeFactor,
    RopeOriginalContext,
    /// The object holding the scaling parameters (`rope_scaling` / `rope.scaling`).
    RopeScalingGroup,
    SlidingWindow,
}

/// The config.json key of each field.
pub fn json_key(field: Field) -> String {
    match field {
        Field::VocabSize => "vocab_size",
        Field::HiddenSize => "hidden_size",
        Field::IntermediateSize => "intermediate_size",
        Field::NumLayers => "num_hidden_layers",
        Field::NumHeads => "num_attention_heads",
        Field::NumKvHeads => "num_key_value_heads",
        Field::HeadDim => "head_dim",
        Field::ContextLength => "max_position_embeddings",
        Field::RmsNormEps => "rms_norm_eps",
        Field::RopeTheta => "rope_theta",
        Field::RotaryDim => "rotary dimensions (head_dim × partial_rotary_factor)",
        Field::RopeFactor => "rope_scaling.factor",
        Field::RopeOriginalContext => "rope_scaling.original_max_position_embeddings",
        Field::RopeScalingGroup => "rope_scaling",
        Field::SlidingWindow => "sliding_window",
    }
    .to_string()
}

/// The GGUF metadata key of each field for architecture `arch` (llama.cpp's names).
pub fn gguf_key(arch: &str, field: Field) -> String {
    let k = match field {
        Field::VocabSize => "vocab_size (or the length of tokenizer.ggml.tokens)",
        Field::HiddenSize => "embedding_length",
        Field::IntermediateSize => "feed_forward_length",
        Field::NumLayers => "block_count",
        Field::NumHeads => "attention.head_count",
        Field::NumKvHeads => "attention.head_count_kv",
        Field::HeadDim => "attention.key_length",
        Field::ContextLength => "context_length",
        Field::RmsNormEps => "attention.layer_norm_rms_epsilon",
        Field::RopeTheta => "rope.freq_base",
        Field::RotaryDim => "rope.dimension_count",
        Field::RopeFactor => "rope.scaling.factor",
        Field::RopeOriginalContext => "rope.scaling.original_context_length",
        Field::RopeScalingGroup => "rope.scaling",
        Field::SlidingWindow => "attention.sliding_window",
    };
    format!("{arch}.{k}")
}

fn sliding_windows(raw: &Raw, model_type: &str) -> anyhow::Result<Vec<Option<usize>>> {
    let window = match &raw.sliding_window {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .and_then(|w| usize::try_from(w).ok())
                .with_context(|| {
                    format!("sliding_window = {v} is invalid (expected a positive integer)")
                })?,
        ),
    };
    let n = raw.num_hidden_layers;
    // Vectors sized by the layer count are built below: refuse absurd counts first.
    check_range("num_hidden_layers", n, &bounds::LAYERS)?;
    if let (Some(types), Some(w)) = (&raw.layer_types, window) {
        return Ok((0..n)
            .map(|i| (types.get(i).map(String::as_str) == Some("sliding_attention")).then_some(w))
            .collect());
    }
    Ok(match model_type {
        // qwen2/qwen3 only slide when asked, and only from `max_window_layers` on.
        "qwen2" | "qwen3" => {
            let on = raw.use_sliding_window.unwrap_or(false);
            let from = raw.max_window_layers.unwrap_or(n);
            (0..n)
                .map(|i| if on && i >= from { window } else { None })
                .collect()
        }
        _ => vec![window; n],
    })
}

fn num(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

fn parse_rope(raw: &Raw, head_dim: usize) -> anyhow::Result<RopeConfig> {
    // The newer form keeps everything (theta included) in `rope_parameters`; the older one has
    // `rope_theta` at the top level and the scaling (or null) in `rope_scaling`.
    let params = raw.rope_parameters.as_ref().filter(|v| v.is_object());
    let scaling = params.or(raw.rope_scaling.as_ref().filter(|v| v.is_object()));
    let theta = params
        .and_then(|p| num(p, "rope_theta"))
        .or(raw.rope_theta)
        .unwrap_or(10_000.0);
    let partial = params
        .and_then(|p| num(p, "partial_rotary_factor"))
        .or(raw.partial_rotary_factor)
        .unwrap_or(1.0);
    check_float(
        "partial_rotary_factor",
        partial,
        |v| v > 0.0 && v <= 1.0,
        "a number in (0, 1]",
    )?;
    let rotary_dim = ((head_dim as f64 * partial) as usize).max(2) & !1;
    let scaling = match scaling {
        None => RopeScaling::Default,
        Some(s) => {
            let kind = s
                .get("rope_type")
                .or_else(|| s.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("default");
            let factor = num(s, "factor").unwrap_or(1.0);
            let original = match num(s, "original_max_position_embeddings") {
                None => raw.max_position_embeddings,
                Some(v) if v >= 1.0 && v <= *bounds::CONTEXT.end() as f64 && v.fract() == 0.0 => {
                    v as usize
                }
                Some(v) => bail!(
                    "rope_scaling.original_max_position_embeddings = {v} is invalid (expected an integer from 1 to {})",
                    bounds::CONTEXT.end()
                ),
            };
            match kind {
                "default" => RopeScaling::Default,
                "linear" => RopeScaling::Linear { factor },
                "dynamic" => RopeScaling::Dynamic {
                    factor,
                    original_max_position_embeddings: original,
                },
                "llama3" => RopeScaling::Llama3 {
                    factor,
                    low_freq_factor: num(s, "low_freq_factor").unwrap_or(1.0),
                    high_freq_factor: num(s, "high_freq_factor").unwrap_or(4.0),
                    original_max_position_embeddings: original,
                },
                "yarn" => {
                    let mscale = num(s, "mscale");
                    let mscale_all_dim = num(s, "mscale_all_dim");
                    let get_mscale = |scale: f64, m: f64| {
                        if scale <= 1.0 {
                            1.0
                        } else {
                            0.1 * m * scale.ln() + 1.0
                        }
                    };
                    let attention_factor = num(s, "attention_factor").unwrap_or_else(|| {
                        match (mscale, mscale_all_dim) {
                            (Some(m), Some(a)) => get_mscale(factor, m) / get_mscale(factor, a),
                            _ => get_mscale(factor, 1.0),
                        }
                    });
                    RopeScaling::Yarn {
                        factor,
                        original_max_position_embeddings: original,
                        beta_fast: num(s, "beta_fast").unwrap_or(32.0),
                        beta_slow: num(s, "beta_slow").unwrap_or(1.0),
                        attention_factor,
                        truncate: s.get("truncate").and_then(Value::as_bool).unwrap_or(true),
                    }
                }
                other => bail!(
                    "unsupported rope_scaling type '{other}' (supported: default, linear, dynamic, llama3, yarn)"
                ),
            }
        }
    };
    Ok(RopeConfig {
        theta,
        scaling,
        rotary_dim,
    })
}

/// Checks the sampling defaults of a generation_config.json: each present value must be a
/// number in the range the sampler accepts (the error names the key and value).
pub fn check_generation_config(gen: &Value) -> anyhow::Result<()> {
    let float = |key: &str, ok: &dyn Fn(f64) -> bool, expected: &str| -> anyhow::Result<()> {
        match gen.get(key) {
            None | Some(Value::Null) => Ok(()),
            Some(v) => match v.as_f64() {
                Some(x) => check_float(key, x, ok, expected),
                None => bail!("{key} = {v} is invalid (expected {expected})"),
            },
        }
    };
    float("temperature", &|v| v >= 0.0, "a number ≥ 0")?;
    float("top_p", &|v| v > 0.0 && v <= 1.0, "a number in (0, 1]")?;
    float("min_p", &|v| (0.0..=1.0).contains(&v), "a number in [0, 1]")?;
    float("repetition_penalty", &|v| v > 0.0, "a positive number")?;
    bounds::check_json_integers(gen, &["top_k"])?;
    for key in ["eos_token_id", "bos_token_id", "pad_token_id"] {
        let ok = match gen.get(key) {
            None | Some(Value::Null) => true,
            Some(Value::Array(items)) => items.iter().all(is_token_id),
            Some(v) => is_token_id(v),
        };
        if !ok {
            bail!(
                "{key} = {} is invalid (expected a token id or a list of them)",
                gen[key]
            );
        }
    }
    Ok(())
}

fn is_token_id(v: &Value) -> bool {
    v.as_u64().is_some_and(|n| n <= u32::MAX as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({"model_type": "llama", "vocab_size": 10, "hidden_size": 64, "intermediate_size": 128,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "max_position_embeddings": 4096})
    }

    #[test]
    fn old_and_new_rope_spellings_agree() {
        let mut old = base();
        old["rope_theta"] = json!(500000.0);
        old["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let mut new = base();
        new["rope_parameters"] = json!({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let a = LlamaConfig::from_value(&old).unwrap();
        let b = LlamaConfig::from_value(&new).unwrap();
        assert_eq!(a.rope, b.rope);
        assert_eq!(a.rope.theta, 500000.0);
        assert!(matches!(a.rope.scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
        assert_eq!(a.head_dim, 16);
    }

    #[test]
    fn yarn_attention_factor_defaults_from_factor() {
        let mut c = base();
        c["rope_scaling"] =
            json!({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024});
        let cfg = LlamaConfig::from_value(&c).unwrap();
        match cfg.rope.scaling {
            RopeScaling::Yarn {
                attention_factor, ..
            } => {
                assert!((attention_factor - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-12)
            }
            other => panic!("expected yarn, got {other:?}"),
        }
    }

    #[test]
    fn unknown_rope_type_is_an_error_naming_supported_ones() {
        let mut c = base();
        c["rope_scaling"] = json!({"rope_type": "longrope2", "factor": 2.0});
        let err = LlamaConfig::from_value(&c).unwrap_err().to_string();
        assert!(err.contains("longrope2") && err.contains("yarn"), "{err}");
    }

    #[test]
    fn qwen2_sliding_window_only_from_max_window_layers() {
        let mut c = base();
        c["model_type"] = json!("qwen2");
        c["sliding_window"] = json!(128);
        c["use_sliding_window"] = json!(true);
        c["max_window_layers"] = json!(1);
        let cfg = LlamaConfig::from_value(&c).unwrap();
        assert_eq!(cfg.sliding_window, vec![None, Some(128)]);
        assert!(cfg.qkv_bias && !cfg.o_bias);
        let mut m = base();
        m["model_type"] = json!("mistral");
        m["sliding_window"] = json!(64);
        assert_eq!(
            LlamaConfig::from_value(&m).unwrap().sliding_window,
            vec![Some(64); 2]
        );
    }
}
