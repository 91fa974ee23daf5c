//! gpt-oss (`model_type: gpt_oss`): attention with learned per-head sinks, alternating
//! sliding-window / full layers (`layer_types`), YaRN RoPE, and a top-k MoE whose experts stay
//! MXFP4 in memory (the checkpoint's `*_blocks`/`*_scales`, mmapped, never expanded).
//!
//! Semantics follow transformers' `modeling_gpt_oss.py` and OpenAI's reference implementation:
//! - RMSNorm in f32 (eps from config), pre-norm residual blocks, untied `lm_head`.
//! - Attention: q/k/v/o with biases, GQA, scale `head_dim^-0.5`; the sink logit of each head is an
//!   extra softmax column that is dropped after normalisation. On sliding layers key `k` is visible
//!   from query `q` iff `q − window < k ≤ q`.
//! - RoPE: half-split rotation with YaRN frequencies (`factor`, `beta_fast`, `beta_slow`,
//!   `original_max_position_embeddings`, `truncate`), cos and sin scaled by `0.1·ln(factor) + 1`.
//! - MoE: router `linear + bias` → top-k → softmax over the selected logits; experts run the
//!   clamped SwiGLU (see [`crate::kernels::moe`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Result, Tensor, D};
use serde::Deserialize;

use crate::arch::llama::{Linear, Projections, Weight};
use crate::arch::mask::causal_mask;
use crate::arch::{BatchPlan, BatchSeq, BuildOptions, CausalLm, ModelInfo, Span, WeightSource};
use crate::kernels::act_stats::{ExpertTaps, Tap};
use crate::kernels::bytes::SharedBytes;
use crate::kernels::ggml_types::GgmlType;
use crate::kernels::moe::{MoeExperts, SwigluParams};
use crate::model::gguf::GgufFile;
use crate::model::safetensors::{shard_files, SafetensorsWeights};
use crate::state::PagedKv;

/// RoPE parameters as they appear under `rope_scaling` (or transformers 5's `rope_parameters`).
#[derive(Debug, Clone, Deserialize, Default)]
pub struct RopeScaling {
    #[serde(default)]
    pub rope_type: Option<String>,
    #[serde(default, alias = "type")]
    pub kind: Option<String>,
    pub factor: Option<f64>,
    pub beta_fast: Option<f64>,
    pub beta_slow: Option<f64>,
    pub original_max_position_embeddings: Option<usize>,
    pub truncate: Option<bool>,
    pub rope_theta: Option<f64>,
}

/// The fields of `config.json` gpt-oss needs.
#[derive(Debug, Clone, Deserialize)]
pub struct GptOssConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: Option<usize>,
    pub num_local_experts: usize,
    /// transformers' name; openai's configs also carry `experts_per_token`.
    #[serde(default)]
    num_experts_per_tok: Option<usize>,
    #[serde(default)]
    experts_per_token: Option<usize>,
    pub sliding_window: Option<usize>,
    pub layer_types: Option<Vec<String>>,
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<RopeScaling>,
    pub rope_parameters: Option<RopeScaling>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_limit")]
    pub swiglu_limit: f64,
    #[serde(default = "default_alpha")]
    pub swiglu_alpha: f64,
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub quantization_config: Option<serde_json::Value>,
}

fn default_eps() -> f64 {
    1e-5
}
fn default_limit() -> f64 {
    7.0
}
fn default_alpha() -> f64 {
    1.702
}

/// Bad or unsupported configuration, with the field to fix.
fn config_error(msg: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("gpt-oss config.json: {msg}"))
}

impl GptOssConfig {
    pub fn from_value(value: &serde_json::Value) -> Result<Self> {
        crate::model::bounds::check_json_integers(
            value,
            &[
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
                "num_local_experts",
                "num_experts_per_tok",
                "experts_per_token",
                "sliding_window",
                "max_position_embeddings",
            ],
        )
        .map_err(config_error)?;
        let cfg = Self::deserialize(value).map_err(config_error)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Experts each token is routed to.
    pub fn top_k(&self) -> usize {
        self.num_experts_per_tok
            .or(self.experts_per_token)
            .unwrap_or(4)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    fn rope(&self) -> RopeScaling {
        self.rope_scaling
            .clone()
            .or_else(|| self.rope_parameters.clone())
            .unwrap_or_default()
    }

    pub fn rope_theta(&self) -> f64 {
        self.rope_theta
            .or_else(|| self.rope().rope_theta)
            .unwrap_or(150000.0)
    }

    /// Whether layer `i` uses the sliding window (default: even layers, as gpt-oss ships).
    pub fn is_sliding(&self, layer: usize) -> bool {
        match &self.layer_types {
            Some(types) => types[layer] == "sliding_attention",
            None => layer % 2 == 0,
        }
    }

    fn validate(&self) -> Result<()> {
        use crate::model::bounds::{self, check_float, check_range};
        let sizes = [
            ("vocab_size", self.vocab_size, &bounds::VOCAB),
            ("hidden_size", self.hidden_size, &bounds::HIDDEN),
            (
                "intermediate_size",
                self.intermediate_size,
                &bounds::INTERMEDIATE,
            ),
            ("num_hidden_layers", self.num_hidden_layers, &bounds::LAYERS),
            (
                "num_attention_heads",
                self.num_attention_heads,
                &bounds::HEADS,
            ),
            (
                "num_key_value_heads",
                self.num_key_value_heads,
                &bounds::HEADS,
            ),
            (
                "num_local_experts",
                self.num_local_experts,
                &bounds::EXPERTS,
            ),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                &bounds::CONTEXT,
            ),
        ];
        for (key, value, range) in sizes {
            check_range(key, value, range).map_err(config_error)?;
        }
        check_range("head_dim", self.head_dim(), &bounds::HEAD_DIM).map_err(config_error)?;
        if let Some(w) = self.sliding_window {
            check_range("sliding_window", w, &bounds::CONTEXT).map_err(config_error)?;
        }
        let rope = self.rope();
        let floats = [
            ("rms_norm_eps", Some(self.rms_norm_eps)),
            ("rope_theta", Some(self.rope_theta())),
            ("rope_scaling.factor", rope.factor),
            ("rope_scaling.beta_fast", rope.beta_fast),
            ("rope_scaling.beta_slow", rope.beta_slow),
        ];
        for (key, value) in floats {
            if let Some(v) = value {
                check_float(key, v, |v| v >= 0.0, "a non-negative number").map_err(config_error)?;
            }
        }
        if let Some(n) = rope.original_max_position_embeddings {
            check_range(
                "rope_scaling.original_max_position_embeddings",
                n,
                &bounds::CONTEXT,
            )
            .map_err(config_error)?;
        }
        for (key, v) in [
            ("swiglu_limit", self.swiglu_limit),
            ("swiglu_alpha", self.swiglu_alpha),
        ] {
            check_float(key, v, |_| true, "a finite number").map_err(config_error)?;
        }
        let hd = self.head_dim();
        if self.num_attention_heads == 0
            || self.num_key_value_heads == 0
            || self.num_attention_heads % self.num_key_value_heads != 0
        {
            return Err(config_error(format!(
                "num_attention_heads {} must be a positive multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            )));
        }
        if hd % 2 != 0 {
            return Err(config_error(format!("head_dim {hd} must be even for RoPE")));
        }
        if self.top_k() == 0 || self.top_k() > self.num_local_experts {
            return Err(config_error(format!(
                "num_experts_per_tok {} must be between 1 and num_local_experts {}",
                self.top_k(),
                self.num_local_experts
            )));
        }
        if let Some(types) = &self.layer_types {
            if types.len() != self.num_hidden_layers {
                return Err(config_error(format!(
                    "layer_types has {} entries for {} layers",
                    types.len(),
                    self.num_hidden_layers
                )));
            }
            if let Some(bad) = types
                .iter()
                .find(|t| *t != "sliding_attention" && *t != "full_attention")
            {
                return Err(config_error(format!(
                    "unknown layer type '{bad}' (expected sliding_attention or full_attention)"
                )));
            }
            if types.iter().any(|t| t == "sliding_attention") && self.sliding_window.is_none() {
                return Err(config_error("sliding layers need `sliding_window`"));
            }
        }
        if let Some(q) = &self.quantization_config {
            let method = q.get("quant_method").and_then(|m| m.as_str()).unwrap_or("");
            if method != "mxfp4" {
                return Err(config_error(format!(
                    "quantization_config.quant_method '{method}' is not supported (only mxfp4)"
                )));
            }
        }
        let rope = self.rope();
        let kind = rope
            .rope_type
            .or(rope.kind)
            .unwrap_or_else(|| "default".into());
        if kind != "yarn" && kind != "default" {
            return Err(config_error(format!(
                "rope type '{kind}' is not supported for gpt_oss (yarn or default)"
            )));
        }
        Ok(())
    }

    /// `(inv_freq [head_dim/2], attention_scaling)` exactly as transformers' YaRN computes them.
    pub fn rope_frequencies(&self) -> (Vec<f32>, f32) {
        let dim = self.head_dim();
        let base = self.rope_theta();
        let rope = self.rope();
        let kind = rope
            .rope_type
            .clone()
            .or(rope.kind.clone())
            .unwrap_or_default();
        let pos_freqs: Vec<f64> = (0..dim / 2)
            .map(|i| base.powf((2 * i) as f64 / dim as f64))
            .collect();
        if kind != "yarn" {
            return (pos_freqs.iter().map(|p| (1.0 / p) as f32).collect(), 1.0);
        }
        let factor = rope.factor.unwrap_or(1.0);
        let beta_fast = rope.beta_fast.unwrap_or(32.0);
        let beta_slow = rope.beta_slow.unwrap_or(1.0);
        let original = rope
            .original_max_position_embeddings
            .unwrap_or(self.max_position_embeddings) as f64;
        let truncate = rope.truncate.unwrap_or(true);
        let correction_dim = |rotations: f64| {
            dim as f64 * (original / (rotations * 2.0 * std::f64::consts::PI)).ln()
                / (2.0 * base.ln())
        };
        let (mut low, mut high) = (correction_dim(beta_fast), correction_dim(beta_slow));
        if truncate {
            low = low.floor();
            high = high.ceil();
        }
        let low = low.max(0.0);
        let mut high = high.min(dim as f64 - 1.0);
        if low == high {
            high += 0.001;
        }
        let inv_freq = pos_freqs
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                let extrapolation = 1.0 - ramp;
                let f = (1.0 / (factor * p)) * ramp + (1.0 / p) * extrapolation;
                f as f32
            })
            .collect();
        let scaling = if factor <= 1.0 {
            1.0
        } else {
            0.1 * factor.ln() + 1.0
        };
        (inv_freq, scaling as f32)
    }

    /// `(total, active)` parameter counts from the shapes. Active = what one token computes
    /// with: `top_k` experts per layer, and not the input embedding table (a token reads one row
    /// of it); the output head is counted. For gpt-oss-20b this gives 20.9B / 3.6B.
    pub fn parameter_counts(&self) -> (u64, u64) {
        let (h, i, e, k) = (
            self.hidden_size as u64,
            self.intermediate_size as u64,
            self.num_local_experts as u64,
            self.top_k() as u64,
        );
        let (nh, nkv, hd) = (
            self.num_attention_heads as u64,
            self.num_key_value_heads as u64,
            self.head_dim() as u64,
        );
        let v = self.vocab_size as u64;
        let attn = (h * nh * hd + nh * hd) + 2 * (h * nkv * hd + nkv * hd) + (nh * hd * h + h) + nh;
        let router = e * h + e;
        let expert = 2 * i * h + 2 * i + i * h + h;
        let layers = self.num_hidden_layers as u64;
        let dense_layers = layers * (attn + router + 2 * h) + h;
        let head = v * h;
        let embedding = if self.tie_word_embeddings { 0 } else { v * h };
        let total = dense_layers + head + embedding + layers * e * expert;
        let active = dense_layers + head + layers * k * expert;
        (total, active)
    }
}

/// The MXFP4 tensors of the checkpoint: shards mapped once (shared by every expert weight that
/// points into them), bytes read in place.
struct PackedTensors {
    shards: Vec<Arc<memmap2::Mmap>>,
    /// Tensor name → (shard, dtype, shape, byte range in the shard).
    entries: HashMap<String, (usize, safetensors::Dtype, Vec<usize>, usize, usize)>,
}

impl PackedTensors {
    fn open(files: &[PathBuf]) -> anyhow::Result<Self> {
        let mut shards = Vec::new();
        let mut entries = HashMap::new();
        for (s, path) in files.iter().enumerate() {
            let file = std::fs::File::open(path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            // SAFETY: the store never rewrites a model's files in place (downloads are renamed
            // into place), so the mapping is not modified under us.
            let mmap = unsafe { memmap2::Mmap::map(&file) }
                .with_context(|| format!("cannot memory-map {}", path.display()))?;
            let (header_len, metadata) =
                safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| {
                    anyhow::anyhow!("{} is not a valid safetensors file ({e})", path.display())
                })?;
            for (name, info) in metadata.tensors() {
                if info.dtype == safetensors::Dtype::U8 {
                    let (a, b) = info.data_offsets;
                    entries.insert(
                        name,
                        (s, info.dtype, info.shape.clone(), 8 + header_len + a, b - a),
                    );
                }
            }
            shards.push(Arc::new(mmap));
        }
        Ok(Self { shards, entries })
    }

    /// Raw bytes of a u8 tensor of the expected shape, left in the mapping.
    fn bytes(&self, name: &str, shape: &[usize]) -> anyhow::Result<SharedBytes> {
        let (shard, _, got, start, len) = self.entries.get(name).with_context(|| {
            format!("tensor '{name}' is missing or not U8 (MXFP4 blocks/scales are stored as U8)")
        })?;
        if got != shape {
            bail!("tensor '{name}' has shape {got:?}, expected {shape:?} from config.json");
        }
        let owner: Arc<dyn AsRef<[u8]> + Send + Sync> = self.shards[*shard].clone();
        SharedBytes::new(owner, *start, *len)
            .with_context(|| format!("tensor '{name}' lies outside its shard"))
    }
}

struct Attention {
    /// q, k, v.
    qkv: Projections,
    o: Linear,
    /// `[heads, 1, 1]` in the compute dtype.
    sinks: Tensor,
    window: Option<usize>,
}

struct Layer {
    input_norm: Tensor,
    post_attention_norm: Tensor,
    attn: Attention,
    router: Linear,
    experts: MoeExperts,
    /// `xllm imatrix` only: where each expert's inputs are recorded.
    expert_taps: Option<ExpertTaps>,
}

/// A loaded gpt-oss model.
pub struct GptOss {
    pub config: GptOssConfig,
    info: ModelInfo,
    device: Device,
    dtype: DType,
    /// Kept as stored: rows are widened (or dequantized) on lookup.
    embed: Weight,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    inv_freq: Vec<f32>,
    rope_scaling: f32,
}

/// Where the weights come from, by transformers name (the GGUF side maps names to llama.cpp's).
trait GptOssWeights {
    fn has(&self, name: &str) -> bool;
    /// A small tensor (norm, bias, sinks) in `dtype`, checked against `shape`.
    fn tensor(&self, name: &str, shape: &[usize], dtype: DType) -> anyhow::Result<Tensor>;
    /// A matrix `[out, in]`, through our own CPU kernels where its format allows.
    fn matrix(&self, name: &str, shape: [usize; 2]) -> anyhow::Result<Weight>;
    /// Layer `l`'s MXFP4 experts in the checkpoint layout of [`crate::kernels::moe`].
    fn experts(&self, l: usize, c: &GptOssConfig) -> anyhow::Result<MoeExperts>;
    fn format(&self) -> String;
}

struct SafetensorsSource<'a> {
    weights: &'a SafetensorsWeights,
    packed: &'a PackedTensors,
    options: &'a BuildOptions,
}

impl GptOssWeights for SafetensorsSource<'_> {
    fn has(&self, name: &str) -> bool {
        self.weights.contains(name)
    }

    fn tensor(&self, name: &str, shape: &[usize], dtype: DType) -> anyhow::Result<Tensor> {
        self.weights
            .load_shaped(name, shape, dtype, &self.options.device)
    }

    fn matrix(&self, name: &str, shape: [usize; 2]) -> anyhow::Result<Weight> {
        super::llama::safetensors_matrix(self.weights, name, shape, self.options)
    }

    fn experts(&self, l: usize, c: &GptOssConfig) -> anyhow::Result<MoeExperts> {
        let (h, i, e) = (c.hidden_size, c.intermediate_size, c.num_local_experts);
        let x = format!("model.layers.{l}.mlp.experts");
        if !self.weights.contains(&format!("{x}.gate_up_proj_blocks")) {
            bail!(
                "layer {l}: experts are not MXFP4 ('{x}.gate_up_proj_blocks' missing); \
                 xllm runs gpt-oss checkpoints as openai ships them (quant_method mxfp4)"
            );
        }
        let f32_vec = |name: &str, shape: &[usize]| -> anyhow::Result<Vec<f32>> {
            Ok(self
                .weights
                .load_shaped(name, shape, DType::F32, &Device::Cpu)?
                .flatten_all()?
                .to_vec1()?)
        };
        let packed = self.packed;
        Ok(MoeExperts {
            experts: e,
            hidden: h,
            intermediate: i,
            top_k: c.top_k(),
            gate_up_blocks: packed
                .bytes(&format!("{x}.gate_up_proj_blocks"), &[e, 2 * i, h / 32, 16])?,
            gate_up_scales: packed
                .bytes(&format!("{x}.gate_up_proj_scales"), &[e, 2 * i, h / 32])?,
            gate_up_bias: f32_vec(&format!("{x}.gate_up_proj_bias"), &[e, 2 * i])?,
            down_blocks: packed.bytes(&format!("{x}.down_proj_blocks"), &[e, h, i / 32, 16])?,
            down_scales: packed.bytes(&format!("{x}.down_proj_scales"), &[e, h, i / 32])?,
            down_bias: f32_vec(&format!("{x}.down_proj_bias"), &[e, h])?,
            swiglu: SwigluParams {
                limit: c.swiglu_limit as f32,
                alpha: c.swiglu_alpha as f32,
            },
        })
    }

    fn format(&self) -> String {
        "mxfp4+bf16".into()
    }
}

/// A GGUF file as llama.cpp's `convert_hf_to_gguf.py` writes gpt-oss (`general.architecture`
/// `gpt-oss`): llama.cpp's tensor names, experts as ggml MXFP4 blocks (type 39) with gate and
/// up split into two tensors, which are repacked into the checkpoint layout at load.
struct GgufSource<'a> {
    file: &'a GgufFile,
    options: &'a BuildOptions,
}

/// The llama.cpp name of a transformers tensor name (those the loader asks for).
fn gguf_name(hf: &str) -> String {
    match hf {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        _ => {}
    }
    let Some(rest) = hf.strip_prefix("model.layers.") else {
        return hf.into();
    };
    let (layer, tail) = rest.split_once('.').unwrap_or((rest, ""));
    let tail = match tail {
        "input_layernorm.weight" => "attn_norm.weight".to_string(),
        "post_attention_layernorm.weight" => "post_attention_norm.weight".to_string(),
        "self_attn.sinks" => "attn_sinks.weight".to_string(),
        t => {
            let (module, suffix) = t.rsplit_once('.').unwrap_or((t, ""));
            let module = match module {
                "self_attn.q_proj" => "attn_q",
                "self_attn.k_proj" => "attn_k",
                "self_attn.v_proj" => "attn_v",
                "self_attn.o_proj" => "attn_output",
                "mlp.router" => "ffn_gate_inp",
                other => other,
            };
            format!("{module}.{suffix}")
        }
    };
    format!("blk.{layer}.{tail}")
}

impl GgufSource<'_> {
    /// One expert tensor `[experts, rows, cols]` of ggml MXFP4 blocks, repacked: `(blocks,
    /// scales)` of `experts · rows` checkpoint rows.
    fn mxfp4(&self, name: &str, shape: [usize; 3]) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
        let path = self.file.path.display();
        let Some(t) = self.file.side_tensor(name) else {
            if self.file.has_tensor(name) {
                bail!(
                    "tensor '{name}' in {path} is not MXFP4; xllm runs gpt-oss experts in MXFP4 only \
                     (as llama.cpp's converter and openai ship them)"
                );
            }
            bail!("tensor '{name}' is missing from {path}");
        };
        if t.ty != GgmlType::MXFP4 {
            bail!(
                "tensor '{name}' in {path}: {}",
                crate::kernels::quant_blocks::unsupported_reason(t.ty)
            );
        }
        if t.dims != shape {
            bail!(
                "tensor '{name}' in {path} has shape {:?}, expected {shape:?} from the metadata",
                t.dims
            );
        }
        Ok(crate::kernels::mxfp4::from_ggml_blocks(
            &self.file.side_bytes(name)?,
        )?)
    }

    fn f32_vec(&self, name: &str, shape: &[usize]) -> anyhow::Result<Vec<f32>> {
        Ok(self
            .tensor_named(name, shape, DType::F32)?
            .flatten_all()?
            .to_vec1()?)
    }

    fn tensor_named(&self, name: &str, shape: &[usize], dtype: DType) -> anyhow::Result<Tensor> {
        let t = self
            .file
            .tensor(name, &Device::Cpu)?
            .dequantize(&Device::Cpu)?;
        if t.dims() != shape {
            bail!(
                "tensor '{name}' in {} has shape {:?}, expected {shape:?} from the metadata",
                self.file.path.display(),
                t.dims()
            );
        }
        Ok(t.to_dtype(dtype)?.to_device(&self.options.device)?)
    }
}

impl GptOssWeights for GgufSource<'_> {
    fn has(&self, name: &str) -> bool {
        self.file.has_tensor(&gguf_name(name))
    }

    fn tensor(&self, name: &str, shape: &[usize], dtype: DType) -> anyhow::Result<Tensor> {
        self.tensor_named(&gguf_name(name), shape, dtype)
    }

    fn matrix(&self, name: &str, shape: [usize; 2]) -> anyhow::Result<Weight> {
        super::llama::gguf_matrix(self.file, &gguf_name(name), shape, self.options)
    }

    fn experts(&self, l: usize, c: &GptOssConfig) -> anyhow::Result<MoeExperts> {
        let (h, i, e) = (c.hidden_size, c.intermediate_size, c.num_local_experts);
        let p = format!("blk.{l}");
        let (gate_b, gate_s) = self.mxfp4(&format!("{p}.ffn_gate_exps.weight"), [e, i, h])?;
        let (up_b, up_s) = self.mxfp4(&format!("{p}.ffn_up_exps.weight"), [e, i, h])?;
        let (down_b, down_s) = self.mxfp4(&format!("{p}.ffn_down_exps.weight"), [e, h, i])?;
        let gate_bias = self.f32_vec(&format!("{p}.ffn_gate_exps.bias"), &[e, i])?;
        let up_bias = self.f32_vec(&format!("{p}.ffn_up_exps.bias"), &[e, i])?;
        // The checkpoint interleaves gate and up rows (gate = even rows, up = odd rows).
        let interleave = |gate: &[u8], up: &[u8], row: usize| -> Vec<u8> {
            gate.chunks_exact(row)
                .zip(up.chunks_exact(row))
                .flat_map(|(g, u)| g.iter().chain(u).copied())
                .collect()
        };
        let groups = h / 32;
        let gate_up_blocks = interleave(&gate_b, &up_b, groups * 16);
        let gate_up_scales = interleave(&gate_s, &up_s, groups);
        let gate_up_bias = gate_bias
            .iter()
            .zip(&up_bias)
            .flat_map(|(g, u)| [*g, *u])
            .collect();
        Ok(MoeExperts {
            experts: e,
            hidden: h,
            intermediate: i,
            top_k: c.top_k(),
            gate_up_blocks: SharedBytes::from_vec(gate_up_blocks),
            gate_up_scales: SharedBytes::from_vec(gate_up_scales),
            gate_up_bias,
            down_blocks: SharedBytes::from_vec(down_b),
            down_scales: SharedBytes::from_vec(down_s),
            down_bias: self.f32_vec(&format!("{p}.ffn_down_exps.bias"), &[e, h])?,
            swiglu: SwigluParams {
                limit: c.swiglu_limit as f32,
                alpha: c.swiglu_alpha as f32,
            },
        })
    }

    fn format(&self) -> String {
        self.file.format_name()
    }
}

/// The gpt-oss config from GGUF metadata (`gpt-oss.*` keys), as the transformers config.json
/// it was converted from would say, so that the same validation runs.
///
/// The GGUF records neither `layer_types` nor YaRN's `truncate`: layers alternate sliding / full
/// from layer 0 (llama.cpp's gpt-oss pattern, and openai's), and `truncate` is `false`, as every
/// openai gpt-oss config.json says (llama.cpp itself always rounds YaRN's correction range).
/// `swiglu_limit` and `alpha` are not stored either; gpt-oss's 7.0 and 1.702 apply.
pub fn config_from_gguf(file: &GgufFile) -> anyhow::Result<GptOssConfig> {
    let arch = file.architecture()?.to_string();
    let key = |k: &str| format!("{arch}.{k}");
    let req = |k: &str| file.require_usize(&key(k));
    let hidden = req("embedding_length")?;
    let vocab = match file.get("tokenizer.ggml.tokens") {
        Some(v) => v.to_vec().map(|v| v.len()).unwrap_or(0),
        None => 0,
    };
    let vocab = match file.content.tensor_infos.get("token_embd.weight") {
        Some(info) => info.shape.dims()[0],
        None => vocab,
    };
    let heads = req("attention.head_count")?;
    let head_dim = file
        .usize_value(&key("attention.key_length"))?
        .unwrap_or(hidden / heads.max(1));
    let intermediate = match file.usize_value(&key("expert_feed_forward_length"))? {
        Some(n) => n,
        None => req("feed_forward_length")?,
    };
    let mut cfg = serde_json::json!({
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": req("block_count")?,
        "num_attention_heads": heads,
        "num_key_value_heads": file.usize_value(&key("attention.head_count_kv"))?.unwrap_or(heads),
        "head_dim": head_dim,
        "num_local_experts": req("expert_count")?,
        "num_experts_per_tok": req("expert_used_count")?,
        "max_position_embeddings": req("context_length")?,
        "tie_word_embeddings": !file.has_tensor("output.weight"),
    });
    if let Some(w) = file.usize_value(&key("attention.sliding_window"))? {
        cfg["sliding_window"] = w.into();
    }
    if let Some(eps) = file.f64_value(&key("attention.layer_norm_rms_epsilon"))? {
        cfg["rms_norm_eps"] = eps.into();
    }
    if let Some(theta) = file.f64_value(&key("rope.freq_base"))? {
        cfg["rope_theta"] = theta.into();
    }
    if let Some(kind) = file.get_str(&key("rope.scaling.type")) {
        let mut rope = serde_json::json!({ "rope_type": kind, "truncate": false });
        for (gguf, hf) in [
            ("rope.scaling.factor", "factor"),
            ("rope.scaling.yarn_beta_fast", "beta_fast"),
            ("rope.scaling.yarn_beta_slow", "beta_slow"),
        ] {
            if let Some(v) = file.f64_value(&key(gguf))? {
                rope[hf] = v.into();
            }
        }
        if let Some(n) = file.usize_value(&key("rope.scaling.original_context_length"))? {
            rope["original_max_position_embeddings"] = n.into();
        }
        cfg["rope_scaling"] = rope;
    }
    GptOssConfig::from_value(&cfg).map_err(|e| anyhow::anyhow!("{}: {e}", file.path.display()))
}

impl GptOss {
    /// Loads the model folder `dir` (config.json + safetensors) on `device`; dense weights in
    /// `dtype` (f32 on CPU), MXFP4 experts left in the mapped files.
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> anyhow::Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let config: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        let weights = SafetensorsWeights::open_dir(dir)?;
        let packed = PackedTensors::open(&shard_files(dir)?)?;
        let options = BuildOptions {
            device: device.clone(),
            dtype,
            keep_weight_dtype: false,
            activation_stats: None,
        };
        let source = SafetensorsSource {
            weights: &weights,
            packed: &packed,
            options: &options,
        };
        Self::from_source(GptOssConfig::from_value(&config)?, &source, &options)
    }

    /// Loads a gpt-oss GGUF (llama.cpp's conversion) on `device`, weights kept as stored where
    /// our kernels read them (bf16, GGUF blocks), MXFP4 experts repacked.
    pub fn load_gguf(path: &Path, device: &Device, dtype: DType) -> anyhow::Result<Self> {
        let file = GgufFile::open(path)?;
        let options = BuildOptions {
            device: device.clone(),
            dtype,
            keep_weight_dtype: true,
            activation_stats: None,
        };
        Self::from_source(
            config_from_gguf(&file)?,
            &GgufSource {
                file: &file,
                options: &options,
            },
            &options,
        )
    }

    fn from_source(
        config: GptOssConfig,
        weights: &dyn GptOssWeights,
        options: &BuildOptions,
    ) -> anyhow::Result<Self> {
        let (device, dtype) = (&options.device, options.dtype);
        let c = &config;
        let (h, i, e) = (c.hidden_size, c.intermediate_size, c.num_local_experts);
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim());
        if h % 32 != 0 || i % 32 != 0 {
            bail!(
                "gpt-oss config.json: hidden_size {h} and intermediate_size {i} must be multiples of 32 for MXFP4 experts"
            );
        }
        let stats = options.activation_stats.as_ref();
        let linear = |p: &str, out: usize, inp: usize| -> anyhow::Result<Linear> {
            let w = weights.matrix(&format!("{p}.weight"), [out, inp])?;
            let b = weights.tensor(&format!("{p}.bias"), &[out], dtype)?;
            Ok(Linear::new(w, Some(b)).tapped(stats, gguf_name(&format!("{p}.weight"))))
        };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let experts = weights.experts(l, c)?;
            experts.validate()?;
            let sinks = weights
                .tensor(&format!("{p}.self_attn.sinks"), &[nh], dtype)?
                .reshape((nh, 1, 1))?;
            let qkv = Projections::new(vec![
                linear(&format!("{p}.self_attn.q_proj"), nh * hd, h)?,
                linear(&format!("{p}.self_attn.k_proj"), nkv * hd, h)?,
                linear(&format!("{p}.self_attn.v_proj"), nkv * hd, h)?,
            ]);
            layers.push(Layer {
                input_norm: weights.tensor(
                    &format!("{p}.input_layernorm.weight"),
                    &[h],
                    DType::F32,
                )?,
                post_attention_norm: weights.tensor(
                    &format!("{p}.post_attention_layernorm.weight"),
                    &[h],
                    DType::F32,
                )?,
                attn: Attention {
                    qkv,
                    o: linear(&format!("{p}.self_attn.o_proj"), h, nh * hd)?,
                    sinks,
                    window: if c.is_sliding(l) {
                        c.sliding_window
                    } else {
                        None
                    },
                },
                router: Linear::new(
                    Weight::Dense(weights.tensor(
                        &format!("{p}.mlp.router.weight"),
                        &[e, h],
                        DType::F32,
                    )?),
                    Some(weights.tensor(&format!("{p}.mlp.router.bias"), &[e], DType::F32)?),
                )
                .tapped(stats, gguf_name(&format!("{p}.mlp.router.weight"))),
                experts,
                // llama.cpp's names: gate and up are two tensors of one input.
                expert_taps: stats.map(|stats| {
                    let name = |t: &str| format!("blk.{l}.{t}.weight");
                    ExpertTaps {
                        input: Tap::expert(
                            stats,
                            vec![name("ffn_gate_exps"), name("ffn_up_exps")],
                            e,
                            0,
                        ),
                        hidden: Tap::expert(stats, vec![name("ffn_down_exps")], e, 0),
                    }
                }),
            });
        }
        // The embedding stays as stored: only looked-up rows are widened.
        let embed_name = "model.embed_tokens.weight";
        let embed = weights.matrix(embed_name, [c.vocab_size, h])?;
        let lm_head = if c.tie_word_embeddings && !weights.has("lm_head.weight") {
            Linear::new(embed.clone(), None)
        } else {
            Linear::new(weights.matrix("lm_head.weight", [c.vocab_size, h])?, None)
        };
        let norm = weights.tensor("model.norm.weight", &[h], DType::F32)?;
        let (inv_freq, rope_scaling) = config.rope_frequencies();
        let info = ModelInfo {
            architecture: "gpt_oss".into(),
            vocab_size: c.vocab_size,
            context_length: c.max_position_embeddings,
            cache_layers: c.num_hidden_layers,
            state_slots: vec![super::StateSlot::Kv; c.num_hidden_layers],
            kv_heads: nkv,
            head_dim: hd,
            cache_dtype: dtype,
            device: device.clone(),
            weight_format: weights.format(),
        };
        Ok(Self {
            config,
            info,
            device: device.clone(),
            dtype,
            embed,
            layers,
            norm,
            lm_head,
            inv_freq,
            rope_scaling,
        })
    }

    /// Bytes of MXFP4 expert weights (all layers), as held in the mapped checkpoint.
    pub fn packed_expert_bytes(&self) -> usize {
        self.layers.iter().map(|l| l.experts.packed_bytes()).sum()
    }

    /// `cos`, `sin` `[t, head_dim/2]` for positions `start..start + t`, YaRN-scaled.
    fn rope_tables(&self, start: usize, t: usize) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        for p in start..start + t {
            for &f in &self.inv_freq {
                // f32 product as the reference computes it, then cos/sin.
                let angle = p as f32 * f;
                cos.push(angle.cos() * self.rope_scaling);
                sin.push(angle.sin() * self.rope_scaling);
            }
        }
        let cos = Tensor::from_vec(cos, (t, half), &self.device)?.to_dtype(self.dtype)?;
        let sin = Tensor::from_vec(sin, (t, half), &self.device)?.to_dtype(self.dtype)?;
        Ok((cos, sin))
    }

    /// One layer's attention for the batch: projections and RoPE over all rows, then each
    /// sequence's rows attend over its own cache (sliding window and sinks per sequence).
    fn attention(
        &self,
        attn: &Attention,
        x: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        batch: &mut [BatchSeq<'_>],
        plan: &BatchPlan,
        layer: usize,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (t, _) = x.dims2()?;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim());
        let project = |y: &Tensor, heads: usize| -> Result<Tensor> {
            y.reshape((1, t, heads, hd))?.transpose(1, 2)?.contiguous()
        };
        let qkv = attn.qkv.forward(x)?;
        let q = candle_nn::rotary_emb::rope(&project(&qkv[0], nh)?, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&project(&qkv[1], nkv)?, cos, sin)?;
        let v = project(&qkv[2], nkv)?;
        let mut outs = Vec::with_capacity(batch.len());
        for (seq, span) in batch.iter_mut().zip(&plan.spans) {
            let pick = |x: &Tensor| -> Result<Tensor> {
                if span.len == t {
                    Ok(x.clone())
                } else {
                    x.narrow(2, span.offset, span.len)?.contiguous()
                }
            };
            let store = seq.state.kv_mut(layer)?;
            outs.push(self.attend(attn, &pick(&q)?, &pick(&k)?, &pick(&v)?, store, span)?);
        }
        let out = if outs.len() == 1 {
            outs.pop().expect("one output")
        } else {
            Tensor::cat(&outs, 0)?
        };
        attn.o.forward(&out)
    }

    /// One sequence's attention with sinks: `q` `[1, heads, n, d]`, `k`/`v` `[1, kv_heads, n, d]`
    /// for its `n` new tokens, written to `store` first. Returns `[n, heads · d]`.
    fn attend(
        &self,
        attn: &Attention,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        store: &mut PagedKv,
        span: &Span,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim());
        let group = nh / nkv;
        let (start, t) = (span.start, span.len);
        store.write(k, v)?;
        let sinks = attn
            .sinks
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        if let Some(out) =
            super::cpu_attention::cpu_attention(q, &store.segments()?, attn.window, Some(&sinks))?
        {
            return out.squeeze(0);
        }
        let (k_all, v_all) = store.gathered()?;
        let total = start + t;
        // Keys no query of this chunk can see are skipped on sliding layers.
        let first_key = match attn.window {
            Some(w) => (start + 1).saturating_sub(w),
            None => 0,
        };
        let keys = total - first_key;
        let k_all = k_all.narrow(2, first_key, keys)?.squeeze(0)?.contiguous()?;
        let v_all = v_all.narrow(2, first_key, keys)?.squeeze(0)?.contiguous()?;
        // Heads sharing a KV head are consecutive: fold them into the query axis.
        let q = q.reshape((nkv, group * t, hd))?;
        let scale = (hd as f64).powf(-0.5);
        let scores = (q.matmul(&k_all.t()?)? * scale)?.reshape((nh, t, keys))?;
        let mask = causal_mask(
            start..start + t,
            first_key..total,
            attn.window,
            &self.device,
            scores.dtype(),
        )?;
        let scores = scores.broadcast_add(&mask)?;
        let sinks = attn
            .sinks
            .broadcast_as((nh, t, 1))?
            .to_dtype(scores.dtype())?;
        let logits = Tensor::cat(&[&scores, &sinks], D::Minus1)?.contiguous()?;
        let probs = candle_nn::ops::softmax_last_dim(&logits)?.narrow(2, 0, keys)?;
        let probs = probs.reshape((nkv, group * t, keys))?.contiguous()?;
        probs
            .matmul(&v_all)?
            .reshape((nh, t, hd))?
            .transpose(0, 1)?
            .reshape((t, nh * hd))
    }
}

fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let var = x.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.broadcast_mul(weight)?.to_dtype(dtype)
}

/// Registry builder: safetensors (openai's checkpoints) or GGUF (llama.cpp's conversion).
pub fn build(
    source: &WeightSource<'_>,
    options: &BuildOptions,
) -> anyhow::Result<Box<dyn CausalLm>> {
    let model = match source {
        WeightSource::Safetensors { config, weights } => {
            let packed = PackedTensors::open(&weights.files())?;
            let source = SafetensorsSource {
                weights,
                packed: &packed,
                options,
            };
            GptOss::from_source(GptOssConfig::from_value(config)?, &source, options)?
        }
        WeightSource::Gguf(file) => GptOss::from_source(
            config_from_gguf(file)?,
            &GgufSource { file, options },
            options,
        )?,
    };
    Ok(Box::new(model))
}

/// Where the table finds tensor names (documentation for readers of the registry).
pub const TENSOR_NAMES_DOC: &str = "transformers names: model.layers.N.{self_attn.{q,k,v,o}_proj,self_attn.sinks,\
mlp.router,mlp.experts.{gate_up,down}_proj_{blocks,scales,bias}}, model.embed_tokens, model.norm, lm_head; \
GGUF: gpt_oss::gguf_name (blk.N.{attn_q,attn_k,attn_v,attn_output,attn_sinks,ffn_gate_inp,\
ffn_{gate,up,down}_exps}, token_embd, output_norm, output)";

impl CausalLm for GptOss {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn forward_batch(&self, batch: &mut [BatchSeq<'_>]) -> Result<Tensor> {
        let plan = BatchPlan::new(batch, self.config.vocab_size, self.layers.len())?;
        let ids = Tensor::from_slice(&plan.tokens, plan.tokens.len(), &self.device)?;
        let mut x = super::llama::embed(&self.embed, &ids, self.dtype)?;
        let (cos, sin) = self.batch_rope_tables(&plan)?;
        let eps = self.config.rms_norm_eps;
        for (l, layer) in self.layers.iter().enumerate() {
            let h = rms_norm(&x, &layer.input_norm, eps)?;
            let a = self.attention(&layer.attn, &h, (&cos, &sin), batch, &plan, l)?;
            x = (x + a)?;
            let h = rms_norm(&x, &layer.post_attention_norm, eps)?;
            let router_logits = layer.router.forward(&h)?;
            let m = layer
                .experts
                .forward_tapped(&h, &router_logits, layer.expert_taps.as_ref())?;
            x = (x + m)?;
        }
        plan.commit(batch);
        if plan.logit_rows.is_empty() {
            return Tensor::zeros((0, self.config.vocab_size), DType::F32, &self.device);
        }
        let x = if plan.returns_every_row() {
            x
        } else {
            let rows = Tensor::new(plan.logit_rows.as_slice(), &self.device)?;
            x.index_select(&rows, 0)?
        };
        let x = rms_norm(&x, &self.norm, eps)?;
        self.lm_head.forward(&x)?.to_dtype(DType::F32)
    }
}

impl GptOss {
    /// RoPE tables for every token of the batch at its own position.
    fn batch_rope_tables(&self, plan: &BatchPlan) -> Result<(Tensor, Tensor)> {
        let mut cos = Vec::with_capacity(plan.spans.len());
        let mut sin = Vec::with_capacity(plan.spans.len());
        for span in &plan.spans {
            let (c, s) = self.rope_tables(span.start, span.len)?;
            cos.push(c);
            sin.push(s);
        }
        if cos.len() == 1 {
            return Ok((cos.pop().expect("one"), sin.pop().expect("one")));
        }
        Ok((Tensor::cat(&cos, 0)?, Tensor::cat(&sin, 0)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fields of openai/gpt-oss-20b's config.json that shape the model.
    fn gpt_oss_20b() -> GptOssConfig {
        GptOssConfig::from_value(&serde_json::json!({
            "vocab_size": 201088, "hidden_size": 2880, "intermediate_size": 2880,
            "num_hidden_layers": 24, "num_attention_heads": 64, "num_key_value_heads": 8,
            "head_dim": 64, "num_local_experts": 32, "num_experts_per_tok": 4,
            "experts_per_token": 4, "sliding_window": 128, "rope_theta": 150000,
            "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                "beta_slow": 1.0, "truncate": false, "original_max_position_embeddings": 4096},
            "max_position_embeddings": 131072, "tie_word_embeddings": false,
            "quantization_config": {"quant_method": "mxfp4"}
        }))
        .unwrap()
    }

    #[test]
    fn parameter_counts_of_gpt_oss_20b() {
        let (total, active) = gpt_oss_20b().parameter_counts();
        assert_eq!((total + 50_000_000) / 100_000_000, 209, "total {total}");
        assert_eq!((active + 50_000_000) / 100_000_000, 36, "active {active}");
    }

    #[test]
    fn yarn_attention_scaling_and_frequency_ends() {
        let cfg = gpt_oss_20b();
        let (inv, scale) = cfg.rope_frequencies();
        assert_eq!(inv.len(), 32);
        assert!((scale - (0.1 * 32f32.ln() + 1.0)).abs() < 1e-6);
        // Highest frequency is extrapolated (unchanged), lowest interpolated (divided by factor).
        assert!((inv[0] - 1.0).abs() < 1e-6);
        let plain_last = 1.0 / 150000f64.powf(62.0 / 64.0);
        assert!(((inv[31] as f64) - plain_last / 32.0).abs() < 1e-9);
    }

    #[test]
    fn config_errors_name_the_field() {
        let mut v = serde_json::json!({
            "vocab_size": 10, "hidden_size": 64, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 3,
            "num_local_experts": 4, "max_position_embeddings": 128
        });
        let err = GptOssConfig::from_value(&v).unwrap_err().to_string();
        assert!(err.contains("num_key_value_heads"), "{err}");
        v["num_key_value_heads"] = 2.into();
        v["quantization_config"] = serde_json::json!({"quant_method": "gptq"});
        let err = GptOssConfig::from_value(&v).unwrap_err().to_string();
        assert!(err.contains("gptq") && err.contains("mxfp4"), "{err}");
        v["quantization_config"] = serde_json::json!({"quant_method": "mxfp4"});
        v["layer_types"] = serde_json::json!(["sliding_attention"]);
        let err = GptOssConfig::from_value(&v).unwrap_err().to_string();
        assert!(err.contains("layer_types"), "{err}");
    }
}
