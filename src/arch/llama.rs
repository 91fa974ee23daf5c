//! Llama-family decoder (llama, mistral, qwen2, qwen3): RMSNorm, GQA attention with RoPE
//! (all scaling variants), optional q/k/v biases (qwen2), per-head q/k RMSNorm (qwen3), sliding
//! windows (mistral, qwen2), SwiGLU MLP, tied or separate LM head. Reads safetensors (HF names) or
//! GGUF (llama.cpp names, quantized matmuls through candle's `QMatMul`).

use std::sync::Arc;

use anyhow::{bail, Context};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Result, Tensor};

use super::bf16_linear::Bf16Matrix;
use super::cpu_attention::{cpu_attention, cpu_attention_batch, SeqQueries};
use super::mask::causal_mask;
use super::rope::{Rope, RopeLayout};
use super::{BatchPlan, BatchSeq, BuildOptions, CausalLm, ModelInfo, Span, WeightSource};
use crate::kernels::act_stats::{ActivationStats, Tap};
use crate::kernels::ggml_types::GgmlType;
use crate::kernels::quant_blocks::QuantMatrix;
use crate::model::config::{LlamaConfig, RopeConfig, RopeScaling};
use crate::model::gguf::GgufFile;
use crate::model::safetensors::SafetensorsWeights;
use crate::state::PagedKv;

/// Where the tensor-name mapping lives (shown by the architecture table).
pub const TENSOR_NAMES_DOC: &str = "llama::Role::{hf_name, gguf_name}";

/// A weight's role in the network, mapped to the names of each file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Embed,
    AttnNorm,
    Q,
    K,
    V,
    O,
    QNorm,
    KNorm,
    FfnNorm,
    /// Gemma 3's norms around each block's output (`post_attention_layernorm` there is the norm
    /// of the attention output, not the MLP input) and before its MLP.
    PostAttnNorm,
    PreFfnNorm,
    PostFfnNorm,
    /// BitNet's norms of the attention output (before `o_proj`) and of the gated MLP activation
    /// (before `down_proj`).
    AttnSubNorm,
    FfnSubNorm,
    Gate,
    Up,
    Down,
    FinalNorm,
    LmHead,
}

impl Role {
    /// Name in transformers checkpoints (without `.weight`/`.bias`).
    pub fn hf_name(self, layer: usize) -> String {
        let l = format!("model.layers.{layer}");
        match self {
            Role::Embed => "model.embed_tokens".into(),
            Role::AttnNorm => format!("{l}.input_layernorm"),
            Role::Q => format!("{l}.self_attn.q_proj"),
            Role::K => format!("{l}.self_attn.k_proj"),
            Role::V => format!("{l}.self_attn.v_proj"),
            Role::O => format!("{l}.self_attn.o_proj"),
            Role::QNorm => format!("{l}.self_attn.q_norm"),
            Role::KNorm => format!("{l}.self_attn.k_norm"),
            Role::FfnNorm | Role::PostAttnNorm => format!("{l}.post_attention_layernorm"),
            Role::PreFfnNorm => format!("{l}.pre_feedforward_layernorm"),
            Role::PostFfnNorm => format!("{l}.post_feedforward_layernorm"),
            Role::AttnSubNorm => format!("{l}.self_attn.attn_sub_norm"),
            Role::FfnSubNorm => format!("{l}.mlp.ffn_sub_norm"),
            Role::Gate => format!("{l}.mlp.gate_proj"),
            Role::Up => format!("{l}.mlp.up_proj"),
            Role::Down => format!("{l}.mlp.down_proj"),
            Role::FinalNorm => "model.norm".into(),
            Role::LmHead => "lm_head".into(),
        }
    }

    /// Name in llama.cpp GGUF files (without `.weight`/`.bias`).
    pub fn gguf_name(self, layer: usize) -> String {
        let l = format!("blk.{layer}");
        match self {
            Role::Embed => "token_embd".into(),
            Role::AttnNorm => format!("{l}.attn_norm"),
            Role::Q => format!("{l}.attn_q"),
            Role::K => format!("{l}.attn_k"),
            Role::V => format!("{l}.attn_v"),
            Role::O => format!("{l}.attn_output"),
            Role::QNorm => format!("{l}.attn_q_norm"),
            Role::KNorm => format!("{l}.attn_k_norm"),
            Role::FfnNorm | Role::PreFfnNorm => format!("{l}.ffn_norm"),
            Role::PostAttnNorm => format!("{l}.post_attention_norm"),
            Role::PostFfnNorm => format!("{l}.post_ffw_norm"),
            Role::AttnSubNorm => format!("{l}.attn_sub_norm"),
            Role::FfnSubNorm => format!("{l}.ffn_sub_norm"),
            Role::Gate => format!("{l}.ffn_gate"),
            Role::Up => format!("{l}.ffn_up"),
            Role::Down => format!("{l}.ffn_down"),
            Role::FinalNorm => "output_norm".into(),
            Role::LmHead => "output".into(),
        }
    }
}

/// A projection `y = x Wᵀ (+ b)` with dense or GGUF-quantized weights.
#[derive(Clone)]
pub enum Weight {
    /// `[out, in]` in any float dtype; the input is cast to it if needed.
    Dense(Tensor),
    /// GGUF blocks through candle's quantized matmul (f32 activations).
    Quantized(Arc<QTensor>),
    /// GGUF blocks (every type but IQ/ternary) through our own CPU kernels (candle's are scalar
    /// in a baseline x86-64 build); also serves embedding lookups, so a tied LM head shares the
    /// table.
    OwnQuant(Arc<QuantMatrix>),
    /// bf16 safetensors weights kept as stored, through our own kernel (CPU).
    Bf16(Arc<Bf16Matrix>),
}

pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
    /// `xllm imatrix` only: where this projection's inputs are recorded.
    tap: Option<Tap>,
}

impl Linear {
    pub fn new(weight: Weight, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            tap: None,
        }
    }

    /// Records this projection's inputs under `name` (the GGUF weight name) when `stats` is set.
    pub fn tapped(mut self, stats: Option<&Arc<ActivationStats>>, name: String) -> Self {
        if let Some(stats) = stats {
            self.tap = Some(Tap::new(stats, vec![name]));
        }
        self
    }

    /// Records this projection's inputs through `tap` (e.g. one expert's slice of a 3-D
    /// expert tensor); `None` leaves the layer untapped.
    pub fn with_tap(mut self, tap: Option<Tap>) -> Self {
        self.tap = tap;
        self
    }

    /// `x`: `[.., in]` → `[.., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(tap) = &self.tap {
            tap.record(x)?;
        }
        let y = match &self.weight {
            Weight::Dense(w) => {
                let dims = x.dims().to_vec();
                let rows: usize = dims[..dims.len() - 1].iter().product();
                let x2 = x.reshape((rows, dims[dims.len() - 1]))?;
                let y = if w.dtype() == x.dtype() {
                    x2.matmul(&w.t()?)?
                } else {
                    x2.to_dtype(w.dtype())?
                        .matmul(&w.t()?)?
                        .to_dtype(x.dtype())?
                };
                let mut out = dims;
                *out.last_mut().unwrap() = w.dim(0)?;
                y.reshape(out)?
            }
            Weight::Quantized(q) => QMatMul::QTensor(q.clone()).forward(x)?,
            Weight::OwnQuant(q) => q.forward(x)?,
            Weight::Bf16(w) => w.forward(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype())?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// Projections of one input (q/k/v, gate/up). On the CPU their weights are stacked into one
/// matrix when they allow it: one parallel matmul instead of several (each a rayon fork/join,
/// which at decode costs as much as a small matmul) and the input quantized once.
pub(crate) enum Projections {
    /// One matrix; the output is split into parts of these widths.
    Stacked {
        linear: Linear,
        widths: Vec<usize>,
    },
    Separate(Vec<Linear>),
}

impl Projections {
    pub(crate) fn new(parts: Vec<Linear>) -> Self {
        let widths: Vec<usize> = parts.iter().map(|l| l.weight.rows()).collect();
        match Linear::stack(parts) {
            Ok(linear) => Self::Stacked { linear, widths },
            Err(parts) => Self::Separate(parts),
        }
    }

    /// The outputs of every projection, in order.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        match self {
            Self::Separate(parts) => parts.iter().map(|l| l.forward(x)).collect(),
            Self::Stacked { linear, widths } => {
                let y = linear.forward(x)?;
                let last = y.rank() - 1;
                let mut start = 0;
                widths
                    .iter()
                    .map(|&w| {
                        // Contiguous again (a copy only when several rows ran): candle's
                        // element-wise ops are much slower on strided views.
                        let part = y.narrow(last, start, w)?.contiguous();
                        start += w;
                        part
                    })
                    .collect()
            }
        }
    }
}

impl Weight {
    /// Output features (rows of `[out, in]`).
    fn rows(&self) -> usize {
        match self {
            Weight::Dense(w) => w.dims()[0],
            Weight::Quantized(q) => q.shape().dims()[0],
            Weight::OwnQuant(q) => q.rows(),
            Weight::Bf16(w) => w.rows(),
        }
    }
}

impl Linear {
    /// One linear whose output is the parts' outputs side by side, for weights held by our own
    /// CPU kernels (and biases on all parts or none); else the parts back.
    fn stack(parts: Vec<Linear>) -> std::result::Result<Linear, Vec<Linear>> {
        if parts.len() < 2 {
            return Err(parts);
        }
        let weight = {
            let quant: Option<Vec<&QuantMatrix>> = parts
                .iter()
                .map(|l| match &l.weight {
                    Weight::OwnQuant(q) => Some(q.as_ref()),
                    _ => None,
                })
                .collect();
            let bf16: Option<Vec<&Bf16Matrix>> = parts
                .iter()
                .map(|l| match &l.weight {
                    Weight::Bf16(w) => Some(w.as_ref()),
                    _ => None,
                })
                .collect();
            if let Some(m) = quant.and_then(|q| QuantMatrix::stack(&q)) {
                Weight::OwnQuant(Arc::new(m))
            } else if let Some(m) = bf16.and_then(|w| Bf16Matrix::stack(&w)) {
                Weight::Bf16(Arc::new(m))
            } else {
                return Err(parts);
            }
        };
        // Stacked parts share one input: one tap records it under every part's name.
        let tap = parts.iter().find_map(|l| l.tap.as_ref()).map(|t| Tap {
            names: parts
                .iter()
                .filter_map(|l| l.tap.as_ref())
                .flat_map(|t| t.names.iter().cloned())
                .collect(),
            ..t.clone()
        });
        let biases: Vec<&Tensor> = parts.iter().filter_map(|l| l.bias.as_ref()).collect();
        let bias = match biases.len() {
            0 => None,
            n if n == parts.len() => match Tensor::cat(&biases, 0) {
                Ok(b) => Some(b),
                Err(_) => return Err(parts),
            },
            _ => return Err(parts),
        };
        let mut linear = Linear::new(weight, bias);
        linear.tap = tap;
        Ok(linear)
    }
}

/// Token embedding table, dense or quantized (looked up row by row without dequantizing all).
pub(crate) fn embed(weight: &Weight, ids: &Tensor, dtype: DType) -> Result<Tensor> {
    match weight {
        Weight::Dense(w) => w.index_select(ids, 0)?.to_dtype(dtype),
        Weight::Quantized(q) => q.embedding(ids)?.to_dtype(dtype),
        Weight::OwnQuant(q) => q.gather_rows(&ids.to_vec1::<u32>()?)?.to_dtype(dtype),
        Weight::Bf16(w) => w.gather_rows(&ids.to_vec1::<u32>()?)?.to_dtype(dtype),
    }
}

struct Layer {
    attn_norm: Tensor,
    /// q, k, v.
    qkv: Projections,
    o: Linear,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    ffn_norm: Tensor,
    /// gate, up.
    gate_up: Projections,
    down: Linear,
    window: Option<usize>,
}

/// The model: weights plus shapes. Owns no cache.
pub struct Llama {
    embed: Weight,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    rope: Rope,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    eps: f64,
    dtype: DType,
    info: ModelInfo,
}

/// Reads weights by role from one file format.
pub(crate) trait Loader {
    fn has(&self, role: Role, layer: usize, suffix: &str) -> bool;
    /// A matrix `[out, in]` checked against the config.
    fn matrix(&self, role: Role, layer: usize, shape: [usize; 2]) -> anyhow::Result<Weight>;
    /// A vector (norm weight, bias) in the compute dtype.
    fn vector(&self, role: Role, layer: usize, suffix: &str, len: usize) -> anyhow::Result<Tensor>;
    /// What the weights are stored as, for `show`/`bench`.
    fn format(&self) -> String;
}

pub(crate) struct SafetensorsLoader<'a> {
    pub(crate) weights: &'a SafetensorsWeights,
    pub(crate) options: &'a BuildOptions,
}

impl SafetensorsLoader<'_> {
    /// The checkpoint's name for a role. Sentence-transformers saves a decoder embedder's base
    /// model alone (Qwen3-Embedding): the transformers names without their `model.` prefix.
    fn hf_name(&self, role: Role, layer: usize) -> String {
        let name = role.hf_name(layer);
        let bare = !self.weights.contains("model.embed_tokens.weight")
            && self.weights.contains("embed_tokens.weight");
        match name.strip_prefix("model.") {
            Some(short) if bare => short.to_string(),
            _ => name,
        }
    }
}

impl Loader for SafetensorsLoader<'_> {
    fn has(&self, role: Role, layer: usize, suffix: &str) -> bool {
        self.weights
            .contains(&format!("{}.{suffix}", self.hf_name(role, layer)))
    }

    fn matrix(&self, role: Role, layer: usize, shape: [usize; 2]) -> anyhow::Result<Weight> {
        let name = format!("{}.weight", self.hf_name(role, layer));
        safetensors_matrix(self.weights, &name, shape, self.options)
    }

    fn vector(&self, role: Role, layer: usize, suffix: &str, len: usize) -> anyhow::Result<Tensor> {
        let name = format!("{}.{suffix}", self.hf_name(role, layer));
        self.weights
            .load_shaped(&name, &[len], self.options.dtype, &self.options.device)
    }

    fn format(&self) -> String {
        let name = self.hf_name(Role::Embed, 0) + ".weight";
        self.weights
            .stored_dtype(&name)
            .map(|d| d.as_str().to_string())
            .unwrap_or_else(|_| "?".into())
    }
}

pub(crate) struct GgufLoader<'a> {
    pub(crate) file: &'a GgufFile,
    pub(crate) options: &'a BuildOptions,
}

impl Loader for GgufLoader<'_> {
    fn has(&self, role: Role, layer: usize, suffix: &str) -> bool {
        self.file
            .has_tensor(&format!("{}.{suffix}", role.gguf_name(layer)))
    }

    fn matrix(&self, role: Role, layer: usize, shape: [usize; 2]) -> anyhow::Result<Weight> {
        let name = format!("{}.weight", role.gguf_name(layer));
        gguf_matrix(self.file, &name, shape, self.options)
    }

    fn vector(&self, role: Role, layer: usize, suffix: &str, len: usize) -> anyhow::Result<Tensor> {
        let name = format!("{}.{suffix}", role.gguf_name(layer));
        let t = self
            .file
            .tensor(&name, &self.options.device)?
            .dequantize(&self.options.device)?
            .to_dtype(self.options.dtype)?;
        if t.dims() != [len] {
            bail!("tensor '{name}' has shape {:?}, expected [{len}]", t.dims());
        }
        Ok(t)
    }

    fn format(&self) -> String {
        self.file.format_name()
    }
}

/// A matrix `[out, in]` of a safetensors checkpoint: bf16 kept as stored through our own kernel
/// on the CPU (when the options keep weight dtypes), else dense in the compute dtype.
pub(crate) fn safetensors_matrix(
    weights: &SafetensorsWeights,
    name: &str,
    shape: [usize; 2],
    options: &BuildOptions,
) -> anyhow::Result<Weight> {
    let name = name.to_string();
    let stored = weights.stored_dtype(&name)?;
    if options.keep_weight_dtype && stored == DType::BF16 && options.device.is_cpu() {
        let raw = weights.raw(&name)?;
        if raw.shape != shape {
            bail!(
                "tensor '{name}' has shape {:?}, expected {shape:?} from config.json",
                raw.shape
            );
        }
        let m = Bf16Matrix::from_le_bytes(raw.data, shape[0], shape[1])?;
        weights.release_pages(&name);
        return Ok(Weight::Bf16(Arc::new(m)));
    }
    let dtype = if options.keep_weight_dtype && matches!(stored, DType::BF16 | DType::F16) {
        stored
    } else {
        options.dtype
    };
    Ok(Weight::Dense(weights.load_shaped(
        &name,
        &shape,
        dtype,
        &options.device,
    )?))
}

/// A matrix `[out, in]` of a GGUF file: block types through our own CPU kernels, bf16 through
/// ours too (when the options keep weight dtypes), other floats dense.
pub(crate) fn gguf_matrix(
    file: &GgufFile,
    name: &str,
    shape: [usize; 2],
    options: &BuildOptions,
) -> anyhow::Result<Weight> {
    // Types candle's reader does not know but our kernels read (TQ1_0, TQ2_0).
    if let Some(side) = file.side_tensor(name).filter(|t| t.ty.has_cpu_kernel()) {
        if side.dims != shape {
            bail!(
                "tensor '{name}' in {} has shape {:?}, expected {shape:?} from the metadata",
                file.path.display(),
                side.dims
            );
        }
        if !options.device.is_cpu() {
            bail!(
                "tensor '{name}' in {} is {}, which only the CPU kernels read; use --device cpu",
                file.path.display(),
                side.ty
            );
        }
        let m = QuantMatrix::new(side.ty, file.side_bytes(name)?, shape[0], shape[1])
            .with_context(|| format!("tensor '{name}' in {}", file.path.display()))?;
        return Ok(Weight::OwnQuant(Arc::new(m)));
    }
    let q = file.tensor(name, &options.device)?;
    if q.shape().dims() != shape {
        bail!(
            "tensor '{name}' in {} has shape {:?}, expected {shape:?} from the metadata",
            file.path.display(),
            q.shape().dims()
        );
    }
    Ok(match q.dtype() {
        // bf16 as stored, through our own kernel (as bf16 safetensors are).
        GgmlDType::BF16 if options.keep_weight_dtype && options.device.is_cpu() => {
            let m = Bf16Matrix::from_le_bytes(&q.data()?, shape[0], shape[1])?;
            Weight::Bf16(Arc::new(m))
        }
        GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
            Weight::Dense(q.dequantize(&options.device)?.to_dtype(options.dtype)?)
        }
        dtype if options.device.is_cpu() => {
            let (rows, cols) = q.shape().dims2()?;
            let ty = GgmlType::from_candle(dtype);
            let m = QuantMatrix::new(ty, q.data()?.into_owned(), rows, cols)
                .with_context(|| format!("tensor '{name}' in {}", file.path.display()))?;
            Weight::OwnQuant(Arc::new(m))
        }
        _ => Weight::Quantized(Arc::new(q)),
    })
}

/// Builds a Llama-family model from safetensors or GGUF.
pub fn build(
    source: &WeightSource<'_>,
    options: &BuildOptions,
) -> anyhow::Result<Box<dyn CausalLm>> {
    let model = match source {
        WeightSource::Safetensors { config, weights } => {
            let cfg = LlamaConfig::from_value(config).context("config.json")?;
            let loader = SafetensorsLoader { weights, options };
            Llama::load(&cfg, &loader, RopeLayout::Halves, None, options)?
        }
        WeightSource::Gguf(file) => {
            let cfg = config_from_gguf(file)?;
            // llama.cpp's converter permutes llama q/k rows for adjacent-pair rotation; qwen
            // models keep the halves layout (NEOX).
            let layout = if file.architecture()? == "llama" || file.architecture()? == "mistral" {
                RopeLayout::Interleaved
            } else {
                RopeLayout::Halves
            };
            let freq_factors = if file.has_tensor("rope_freqs.weight") {
                let t = file
                    .tensor("rope_freqs.weight", &Device::Cpu)?
                    .dequantize(&Device::Cpu)?;
                Some(t.to_vec1::<f32>()?)
            } else {
                None
            };
            let loader = GgufLoader { file, options };
            Llama::load(&cfg, &loader, layout, freq_factors.as_deref(), options)?
        }
    };
    Ok(Box::new(model))
}

/// The Llama-family config from GGUF metadata (`{arch}.*` keys).
pub fn config_from_gguf(file: &GgufFile) -> anyhow::Result<LlamaConfig> {
    let arch = file.architecture()?.to_string();
    let key = |k: &str| format!("{arch}.{k}");
    let hidden = file.require_usize(&key("embedding_length"))?;
    let heads = file.require_usize(&key("attention.head_count"))?;
    let kv_heads = file
        .usize_value(&key("attention.head_count_kv"))?
        .unwrap_or(heads);
    let head_dim = file
        .usize_value(&key("attention.key_length"))?
        .unwrap_or(hidden / heads.max(1));
    let layers = file.require_usize(&key("block_count"))?;
    // Sized by the layer count below: refuse an absurd one before building vectors of it.
    crate::model::bounds::check_range(&key("block_count"), layers, &crate::model::bounds::LAYERS)
        .with_context(|| file.path.display().to_string())?;
    let context = file.usize_value(&key("context_length"))?.unwrap_or(2048);
    let vocab = match file.usize_value(&key("vocab_size"))? {
        Some(v) => v,
        None => file
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.to_vec().ok())
            .map(|v| v.len())
            .context("GGUF has neither a vocab_size nor a token list")?,
    };
    let factor = file.f64_value(&key("rope.scaling.factor"))?.unwrap_or(1.0);
    let original = file
        .usize_value(&key("rope.scaling.original_context_length"))?
        .unwrap_or(context);
    let scaling = match file.get_str(&key("rope.scaling.type")) {
        Some("linear") if factor != 1.0 => RopeScaling::Linear { factor },
        Some("yarn") => RopeScaling::Yarn {
            factor,
            original_max_position_embeddings: original,
            beta_fast: file
                .f64_value(&key("rope.scaling.yarn_beta_fast"))?
                .unwrap_or(32.0),
            beta_slow: file
                .f64_value(&key("rope.scaling.yarn_beta_slow"))?
                .unwrap_or(1.0),
            attention_factor: 0.1 * factor.ln() + 1.0,
            truncate: true,
        },
        _ => RopeScaling::Default,
    };
    let window = file.usize_value(&key("attention.sliding_window"))?;
    let eos = file
        .get_usize("tokenizer.ggml.eos_token_id")
        .and_then(|v| u32::try_from(v).ok())
        .map(|v| vec![v])
        .unwrap_or_default();
    let cfg = LlamaConfig {
        model_type: arch.clone(),
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: file.require_usize(&key("feed_forward_length"))?,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim,
        rms_norm_eps: file
            .f64_value(&key("attention.layer_norm_rms_epsilon"))?
            .unwrap_or(1e-5),
        rope: RopeConfig {
            theta: file.f64_value(&key("rope.freq_base"))?.unwrap_or(10_000.0),
            scaling,
            rotary_dim: file
                .usize_value(&key("rope.dimension_count"))?
                .unwrap_or(head_dim),
        },
        max_position_embeddings: context,
        tie_word_embeddings: !file.has_tensor("output.weight"),
        qkv_bias: file.has_tensor("blk.0.attn_q.bias"),
        o_bias: file.has_tensor("blk.0.attn_output.bias"),
        mlp_bias: file.has_tensor("blk.0.ffn_up.bias"),
        qk_norm: file.has_tensor("blk.0.attn_q_norm.weight"),
        sliding_window: vec![window; layers],
        bos_token_id: file
            .get_usize("tokenizer.ggml.bos_token_id")
            .and_then(|v| u32::try_from(v).ok()),
        eos_token_ids: eos,
        torch_dtype: None,
    };
    cfg.validate(|field| crate::model::config::gguf_key(&arch, field))
        .with_context(|| format!("{}: invalid metadata", file.path.display()))?;
    Ok(cfg)
}

impl Llama {
    fn load(
        cfg: &LlamaConfig,
        loader: &dyn Loader,
        layout: RopeLayout,
        freq_factors: Option<&[f32]>,
        options: &BuildOptions,
    ) -> anyhow::Result<Self> {
        let (h, q_out, kv_out) = (
            cfg.hidden_size,
            cfg.num_heads * cfg.head_dim,
            cfg.num_kv_heads * cfg.head_dim,
        );
        let linear = |role: Role, layer: usize, out: usize, inp: usize, bias: bool| {
            let w = loader.matrix(role, layer, [out, inp])?;
            let b = if bias && loader.has(role, layer, "bias") {
                Some(loader.vector(role, layer, "bias", out)?)
            } else {
                None
            };
            anyhow::Ok(Linear::new(w, b).tapped(
                options.activation_stats.as_ref(),
                format!("{}.weight", role.gguf_name(layer)),
            ))
        };
        let embed = loader.matrix(Role::Embed, 0, [cfg.vocab_size, h])?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let norm = |role| -> anyhow::Result<Option<Tensor>> {
                Ok(if cfg.qk_norm {
                    Some(loader.vector(role, i, "weight", cfg.head_dim)?)
                } else {
                    None
                })
            };
            layers.push(Layer {
                attn_norm: loader.vector(Role::AttnNorm, i, "weight", h)?,
                qkv: Projections::new(vec![
                    linear(Role::Q, i, q_out, h, cfg.qkv_bias)?,
                    linear(Role::K, i, kv_out, h, cfg.qkv_bias)?,
                    linear(Role::V, i, kv_out, h, cfg.qkv_bias)?,
                ]),
                o: linear(Role::O, i, h, q_out, cfg.o_bias)?,
                q_norm: norm(Role::QNorm)?,
                k_norm: norm(Role::KNorm)?,
                ffn_norm: loader.vector(Role::FfnNorm, i, "weight", h)?,
                gate_up: Projections::new(vec![
                    linear(Role::Gate, i, cfg.intermediate_size, h, cfg.mlp_bias)?,
                    linear(Role::Up, i, cfg.intermediate_size, h, cfg.mlp_bias)?,
                ]),
                down: linear(Role::Down, i, h, cfg.intermediate_size, cfg.mlp_bias)?,
                window: cfg.sliding_window.get(i).copied().flatten(),
            });
        }
        let norm = loader.vector(Role::FinalNorm, 0, "weight", h)?;
        let lm_head = if !cfg.tie_word_embeddings || loader.has(Role::LmHead, 0, "weight") {
            if loader.has(Role::LmHead, 0, "weight") {
                Linear::new(loader.matrix(Role::LmHead, 0, [cfg.vocab_size, h])?, None)
            } else {
                bail!("the checkpoint has no LM head weight and tie_word_embeddings is false")
            }
        } else {
            Linear::new(embed.clone(), None)
        };
        let info = ModelInfo {
            architecture: cfg.model_type.clone(),
            vocab_size: cfg.vocab_size,
            context_length: cfg.max_position_embeddings,
            cache_layers: cfg.num_layers,
            state_slots: vec![super::StateSlot::Kv; cfg.num_layers],
            kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            cache_dtype: options.dtype,
            device: options.device.clone(),
            weight_format: loader.format(),
        };
        Ok(Self {
            embed,
            layers,
            norm,
            lm_head,
            rope: Rope::new(cfg.rope.clone(), layout, freq_factors),
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            eps: cfg.rms_norm_eps,
            dtype: options.dtype,
            info,
        })
    }

    fn hidden_size(&self) -> usize {
        self.norm.dims()[0]
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(&x.contiguous()?, w, self.eps as f32)
    }

    /// Attention of one layer for every sequence of the batch: projections, q/k norms and RoPE
    /// over all rows at once, then each sequence's rows attend over its own cache.
    fn attention(
        &self,
        layer: &Layer,
        index: usize,
        x: &Tensor,
        batch: &mut [BatchSeq<'_>],
        plan: &BatchPlan,
        cos_sin: &(Tensor, Tensor),
    ) -> Result<Tensor> {
        let (_, t, _) = x.dims3()?;
        let (h, kvh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let [q, k, v]: [Tensor; 3] = layer
            .qkv
            .forward(x)?
            .try_into()
            .map_err(|_| candle_core::Error::Msg("q/k/v projections".into()))?;
        let mut q = q.reshape((1, t, h, d))?;
        let mut k = k.reshape((1, t, kvh, d))?;
        let v = v.reshape((1, t, kvh, d))?;
        if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
            q = self.rms_norm(&q, qn)?;
            k = self.rms_norm(&k, kn)?;
        }
        // RoPE is per row, so one table with each token's own position serves the whole batch.
        let q = self
            .rope
            .apply(&q.transpose(1, 2)?, &cos_sin.0, &cos_sin.1)?;
        let k = self
            .rope
            .apply(&k.transpose(1, 2)?, &cos_sin.0, &cos_sin.1)?;
        let v = v.transpose(1, 2)?.contiguous()?;
        let out = attend_batch(&self.shape(), layer.window, &q, &k, &v, batch, plan, index)?;
        layer.o.forward(&out)
    }

    fn shape(&self) -> AttentionShape<'_> {
        AttentionShape {
            heads: self.num_heads,
            kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
            device: &self.info.device,
            dtype: self.dtype,
        }
    }
}

/// What per-sequence attention needs to know of its model.
pub(super) struct AttentionShape<'a> {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub device: &'a Device,
    pub dtype: DType,
}

/// Additive mask `[t, len]` for queries at `start..start+t` over keys `0..len`, or `None` when
/// every query may see every key.
fn attention_mask(
    shape: &AttentionShape<'_>,
    start: usize,
    t: usize,
    len: usize,
    window: Option<usize>,
) -> Result<Option<Tensor>> {
    let windowed = window.is_some_and(|w| len > w);
    if t == 1 && !windowed {
        return Ok(None);
    }
    Ok(Some(causal_mask(
        start..start + t,
        0..len,
        window,
        shape.device,
        shape.dtype,
    )?))
}

/// Layer `index`'s attention for every sequence of the batch (scaled by `head_dim^-1/2`): `q`
/// `[1, heads, t, d]`, `k`/`v` `[1, kv_heads, t, d]` for the batch's `t` new tokens (each
/// sequence's rows at its span), written to each sequence's cache first. Returns
/// `[1, t, heads * d]`. Our batch-invariant CPU kernel over all sequences at once where it
/// applies, grouped GEMMs with an additive mask per sequence otherwise.
#[allow(clippy::too_many_arguments)]
pub(super) fn attend_batch(
    shape: &AttentionShape<'_>,
    window: Option<usize>,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    batch: &mut [BatchSeq<'_>],
    plan: &BatchPlan,
    index: usize,
) -> Result<Tensor> {
    let t = q.dim(2)?;
    let pick = |x: &Tensor, span: &Span| -> Result<Tensor> {
        if span.len == t {
            Ok(x.clone())
        } else {
            x.narrow(2, span.offset, span.len)?.contiguous()
        }
    };
    for (seq, span) in batch.iter_mut().zip(&plan.spans) {
        seq.state
            .kv_mut(index)?
            .write(&pick(k, span)?, &pick(v, span)?)?;
    }
    if shape.device.is_cpu() {
        let segments = batch
            .iter_mut()
            .map(|seq| seq.state.kv_mut(index)?.segments())
            .collect::<Result<Vec<_>>>()?;
        let seqs: Vec<SeqQueries<'_>> = segments
            .iter()
            .zip(&plan.spans)
            .map(|(segments, span)| SeqQueries {
                segments,
                offset: span.offset,
                len: span.len,
            })
            .collect();
        if let Some(out) = cpu_attention_batch(q, &seqs, window, None)? {
            return Ok(out);
        }
    }
    let mut outs = Vec::with_capacity(batch.len());
    for (seq, span) in batch.iter_mut().zip(&plan.spans) {
        let store = seq.state.kv_mut(index)?;
        outs.push(attend_written(shape, window, &pick(q, span)?, store, span)?);
    }
    if outs.len() == 1 {
        Ok(outs.pop().expect("one output"))
    } else {
        Tensor::cat(&outs, 1)
    }
}

/// One sequence's attention over its cache, its new keys/values already written: `q`
/// `[1, heads, n, d]` for its `n` new tokens. Returns `[1, n, heads * d]`.
fn attend_written(
    shape: &AttentionShape<'_>,
    window: Option<usize>,
    q: &Tensor,
    store: &mut PagedKv,
    span: &Span,
) -> Result<Tensor> {
    let (h, kvh, d) = (shape.heads, shape.kv_heads, shape.head_dim);
    let t = span.len;
    if let Some(out) = cpu_attention(q, &store.segments()?, window, None)? {
        return Ok(out);
    }
    let (k_all, v_all) = store.gathered()?;
    let len = k_all.dim(2)?;
    let n_rep = h / kvh;
    // Query heads sharing a KV head are stacked as rows: [kvh, n_rep * t, d], so grouped
    // attention needs no copy of the keys/values.
    let q = q.reshape((kvh, n_rep * t, d))?;
    let k_all = k_all.squeeze(0)?;
    let v_all = v_all.squeeze(0)?;
    let scale = 1.0 / (d as f64).sqrt();
    let mut scores = (q.matmul(&k_all.t()?)? * scale)?;
    if let Some(mask) = attention_mask(shape, span.start, t, len, window)? {
        scores = scores
            .reshape((kvh, n_rep, t, len))?
            .broadcast_add(&mask)?
            .reshape((kvh, n_rep * t, len))?;
    }
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    probs
        .matmul(&v_all.contiguous()?)?
        .reshape((1, h, t, d))?
        .transpose(1, 2)?
        .reshape((1, t, h * d))
}

/// `cos`, `sin` rows for every token of the batch at its own position (each sequence's table
/// computed for its length, as dynamic scaling needs).
pub(super) fn rope_tables(
    rope: &Rope,
    plan: &BatchPlan,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let mut cos = Vec::with_capacity(plan.spans.len());
    let mut sin = Vec::with_capacity(plan.spans.len());
    for span in &plan.spans {
        let (c, s) = rope.cos_sin(span.start, span.len, device)?;
        cos.push(c);
        sin.push(s);
    }
    if cos.len() == 1 {
        return Ok((cos.pop().expect("one"), sin.pop().expect("one")));
    }
    Ok((Tensor::cat(&cos, 0)?, Tensor::cat(&sin, 0)?))
}

impl Llama {
    /// Every layer over the batch, then the final norm of the rows the sequences asked for:
    /// `[1, rows, hidden]`, or `None` when no row is asked for. What the LM head reads
    /// ([`CausalLm::forward_batch`]) and what embedders pool ([`CausalLm::hidden_batch`]).
    fn final_hidden(&self, batch: &mut [BatchSeq<'_>]) -> Result<Option<Tensor>> {
        let plan = BatchPlan::new(batch, self.info.vocab_size, self.layers.len())?;
        let device = &self.info.device;
        let ids = Tensor::new(plan.tokens.as_slice(), device)?;
        let mut x = embed(&self.embed, &ids, self.dtype)?.unsqueeze(0)?;
        let cos_sin = rope_tables(&self.rope, &plan, device)?;
        for (index, layer) in self.layers.iter().enumerate() {
            let normed = self.rms_norm(&x, &layer.attn_norm)?;
            let attn = self.attention(layer, index, &normed, batch, &plan, &cos_sin)?;
            x = (x + attn)?;
            let normed = self.rms_norm(&x, &layer.ffn_norm)?;
            let [gate, up]: [Tensor; 2] = layer
                .gate_up
                .forward(&normed)?
                .try_into()
                .map_err(|_| candle_core::Error::Msg("gate/up projections".into()))?;
            // silu(gate)·up, vectorized on AVX-512 CPUs (candle's silu calls expf per value).
            let act = crate::kernels::gelu::silu_mul(&gate, &up)?;
            x = (x + layer.down.forward(&act)?)?;
        }
        plan.commit(batch);
        if plan.logit_rows.is_empty() {
            return Ok(None);
        }
        let x = if plan.returns_every_row() {
            x
        } else {
            let rows = Tensor::new(plan.logit_rows.as_slice(), device)?;
            x.index_select(&rows, 1)?
        };
        self.rms_norm(&x, &self.norm).map(Some)
    }
}

impl CausalLm for Llama {
    fn forward_batch(&self, batch: &mut [BatchSeq<'_>]) -> Result<Tensor> {
        match self.final_hidden(batch)? {
            None => Tensor::zeros((0, self.info.vocab_size), DType::F32, &self.info.device),
            Some(x) => {
                let logits = self.lm_head.forward(&x)?.squeeze(0)?;
                logits.to_dtype(DType::F32)?.contiguous()
            }
        }
    }

    fn hidden_batch(&self, batch: &mut [BatchSeq<'_>]) -> Result<Tensor> {
        match self.final_hidden(batch)? {
            None => Tensor::zeros((0, self.hidden_size()), DType::F32, &self.info.device),
            Some(x) => x.squeeze(0)?.to_dtype(DType::F32)?.contiguous(),
        }
    }

    fn info(&self) -> &ModelInfo {
        &self.info
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_each_format() {
        assert_eq!(Role::Q.hf_name(3), "model.layers.3.self_attn.q_proj");
        assert_eq!(Role::Q.gguf_name(3), "blk.3.attn_q");
        assert_eq!(Role::FfnNorm.gguf_name(0), "blk.0.ffn_norm");
        assert_eq!(Role::LmHead.hf_name(0), "lm_head");
    }

    #[test]
    fn dense_linear_matches_manual_product() {
        let w = Tensor::new(&[[1f32, 2.], [3., 4.], [5., 6.]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[0.5f32, 0., -1.], &Device::Cpu).unwrap();
        let lin = Linear::new(Weight::Dense(w), Some(b));
        let x = Tensor::new(&[[[1f32, 1.]]], &Device::Cpu).unwrap();
        let y: Vec<f32> = lin
            .forward(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(y, vec![3.5, 7., 10.]);
    }

    #[test]
    fn stacked_projections_equal_separate_ones() {
        let dev = Device::Cpu;
        // bf16 weights (our kernel) with biases: q [4, 8], k [2, 8], v [2, 8].
        let part = |rows: usize, seed: f32| {
            let w: Vec<f32> = (0..rows * 8)
                .map(|i| ((i as f32 + seed) * 0.37).sin())
                .collect();
            let bytes: Vec<u8> = w
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect();
            let m = Bf16Matrix::from_le_bytes(&bytes, rows, 8).unwrap();
            let b = Tensor::arange(0f32, rows as f32, &dev).unwrap();
            Linear::new(Weight::Bf16(Arc::new(m)), Some(b))
        };
        let make = || vec![part(4, 0.0), part(2, 1.0), part(2, 2.0)];
        let x = Tensor::randn(0f32, 1.0, (1, 3, 8), &dev).unwrap();
        let stacked = Projections::new(make());
        assert!(matches!(stacked, Projections::Stacked { .. }));
        let separate = Projections::Separate(make());
        for (a, b) in stacked
            .forward(&x)
            .unwrap()
            .iter()
            .zip(separate.forward(&x).unwrap())
        {
            assert_eq!(a.dims(), b.dims());
            assert_eq!(super::super::cpu_matmul::max_abs(&(a - b).unwrap()), 0.0);
        }
        // A part with a bias beside one without cannot be stacked: kept apart.
        let mut mixed = make();
        mixed[1].bias = None;
        assert!(matches!(Projections::new(mixed), Projections::Separate(_)));
    }
}

#[cfg(test)]
mod quantized_tests {
    use super::super::cpu_matmul::max_abs;
    use super::*;

    /// The quantized path must agree with a dense matmul on the dequantized weight.
    #[test]
    fn quantized_linear_matches_dequantized() {
        for dtype in [
            GgmlDType::Q4_1,
            GgmlDType::Q4_0,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
        ] {
            for rows in [1usize, 7] {
                let dev = Device::Cpu;
                let w = Tensor::randn(0f32, 1.0, (192, 512), &dev).unwrap();
                let q = QTensor::quantize(&w, dtype).unwrap();
                let dense = q.dequantize(&dev).unwrap();
                let x = Tensor::randn(0f32, 1.0, (1, rows, 512), &dev).unwrap();
                let a = Linear::new(Weight::Quantized(Arc::new(q)), None)
                    .forward(&x)
                    .unwrap();
                let b = Linear::new(Weight::Dense(dense), None).forward(&x).unwrap();
                let err = max_abs(&(&a - &b).unwrap());
                let scale = max_abs(&b);
                assert!(
                    err / scale < 0.05,
                    "{dtype:?} rows={rows}: error {err} vs scale {scale}"
                );
            }
        }
    }

    #[test]
    fn quantized_embedding_matches_dequantized() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (300, 576), &dev).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let dense = q.dequantize(&dev).unwrap();
        let ids = Tensor::new(&[5u32, 299, 0, 17], &dev).unwrap();
        let a = embed(&Weight::Quantized(Arc::new(q)), &ids, DType::F32).unwrap();
        let b = embed(&Weight::Dense(dense), &ids, DType::F32).unwrap();
        let err = max_abs(&(&a - &b).unwrap());
        assert!(err < 1e-6, "embedding rows differ by {err}");
    }
}
