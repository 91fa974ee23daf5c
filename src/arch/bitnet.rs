//! BitNet b1.58 (transformers' `bitnet`, `BitNetForCausalLM`; `bitnet` in GGUF): a Llama decoder
//! whose projections are BitLinear layers — ternary weights times one scale per tensor, inputs
//! quantized to int8 per token (absmax) — with an RMSNorm on the attention output before `o_proj`
//! (`attn_sub_norm`) and on the gated activation before `down_proj` (`ffn_sub_norm`), and a
//! `relu²` gate. Embeddings, norms and the LM head are full precision.
//!
//! Every BitLinear is held as TQ2_0/TQ1_0 blocks on our ternary kernels with the int8 activations
//! BitNet trains with ([`QuantMatrix::forward_per_token`]), whatever the checkpoint layout:
//! - packed (`quantization_config.linear_class` `bitlinear`, or `autobitlinear` offline): uint8
//!   `[out/4, in]`, row `r` of part `i` in bits `2i` of packed row `r mod out/4`, level = weight + 1,
//!   and `weight_scale` (`bitlinear` divides by it, `autobitlinear` multiplies);
//! - bf16/f32 master weights (`autobitlinear` online): ternarized at load with the per-tensor
//!   absmean rule transformers applies at every forward (`s = 1 / mean|w|`, `round(w·s)` clipped);
//! - GGUF: TQ1_0/TQ2_0 weights and an optional `<name>.scale` (llama.cpp's bitnet scales; what
//!   `xllm quantize` writes, with unit block scales, so nothing is rounded to f16).
//!
//! Without a `quantization_config` transformers runs plain linears, and so do we.

use anyhow::{bail, Context};
use candle_core::{DType, Device, Result, Tensor};
use serde_json::Value;

use super::llama::{
    attend_batch, config_from_gguf, embed, rope_tables, AttentionShape, GgufLoader, Linear, Loader,
    Projections, Role, SafetensorsLoader, Weight,
};
use super::rope::{Rope, RopeLayout};
use super::{BatchPlan, BatchSeq, BuildOptions, CausalLm, ModelInfo, StateSlot, WeightSource};
use crate::kernels::act_stats::Tap;
use crate::kernels::ggml_types::GgmlType;
use crate::kernels::quant_blocks::{ternary, QuantMatrix};
use crate::model::config::LlamaConfig;
use crate::model::gguf::GgufFile;
use crate::model::safetensors::SafetensorsWeights;

/// Where the tensor-name mapping lives (shown by the architecture table).
pub const TENSOR_NAMES_DOC: &str =
    "llama::Role::{hf_name, gguf_name} (+ AttnSubNorm, FfnSubNorm; scales `.weight_scale` / `.scale`)";

/// How a checkpoint stores its BitLinear weights (`quantization_config`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitLinearLayout {
    /// Ternary weights (packed uint8 or unpacked values) and `weight_scale`; `divide`: the output
    /// is divided by the scale (`bitlinear`) rather than multiplied (`autobitlinear`).
    Packed { divide: bool },
    /// Master weights ternarized with the per-tensor absmean rule (`autobitlinear` online).
    Online,
    /// No quantization config: plain linear layers (what transformers runs then).
    Plain,
}

impl BitLinearLayout {
    /// The layout `config.json` declares; configurations transformers would run differently
    /// (another method, an input RMSNorm inside each BitLinear) are refused.
    pub fn from_config(config: &Value) -> anyhow::Result<Self> {
        let Some(q) = config.get("quantization_config") else {
            return Ok(Self::Plain);
        };
        let field = |k: &str| q.get(k).and_then(|v| v.as_str());
        match field("quant_method") {
            Some("bitnet") => {}
            other => bail!(
                "config.json: quantization_config.quant_method {other:?} is not supported for bitnet (expected \"bitnet\")"
            ),
        }
        if q.get("use_rms_norm").and_then(|v| v.as_bool()) == Some(true) {
            bail!("config.json: quantization_config.use_rms_norm (an RMSNorm inside every BitLinear) is not supported yet");
        }
        Ok(
            match (
                field("linear_class").unwrap_or("bitlinear"),
                field("quantization_mode").unwrap_or("offline"),
            ) {
                ("bitlinear", _) => Self::Packed { divide: true },
                ("autobitlinear", "offline") => Self::Packed { divide: false },
                ("autobitlinear", "online") => Self::Online,
                (class, mode) => bail!(
                    "config.json: quantization_config linear_class '{class}' with quantization_mode '{mode}' is not supported \
                     (bitlinear; autobitlinear offline or online)"
                ),
            },
        )
    }
}

/// Ternary weights of one tensor: levels (weight + 1) row by row, and the factor its outputs
/// are multiplied by.
pub struct TernaryTensor {
    pub levels: Vec<u8>,
    pub rows: usize,
    pub cols: usize,
    pub scale: f32,
}

/// The ternary form of BitLinear weight `name` (`[out, in]`) as a checkpoint in `layout` stores
/// it; also what `xllm quantize` writes for a BitNet source.
pub fn ternary_from_safetensors(
    weights: &SafetensorsWeights,
    name: &str,
    layout: BitLinearLayout,
    shape: [usize; 2],
) -> anyhow::Result<TernaryTensor> {
    let [out, inp] = shape;
    let raw = weights.raw(&format!("{name}.weight"))?;
    let mut levels = vec![1u8; out * inp];
    let scale = match layout {
        BitLinearLayout::Plain => bail!("'{name}' is a plain linear layer"),
        BitLinearLayout::Packed { divide } => {
            if raw.dtype == safetensors::Dtype::U8 {
                if out % 4 != 0 || raw.shape != [out / 4, inp] {
                    bail!(
                        "tensor '{name}.weight' has shape {:?}, expected [{}, {inp}] (packed ternary for [{out}, {inp}])",
                        raw.shape,
                        out / 4
                    );
                }
                let part = out / 4;
                for r in 0..out {
                    let (i, pr) = (r / part, r % part);
                    let src = &raw.data[pr * inp..(pr + 1) * inp];
                    for (l, b) in levels[r * inp..(r + 1) * inp].iter_mut().zip(src) {
                        *l = (b >> (2 * i)) & 3;
                    }
                }
                if levels.contains(&3) {
                    bail!("tensor '{name}.weight' holds the 2-bit value 3, which is no ternary weight");
                }
            } else {
                // autobitlinear offline may store the ternary values unpacked.
                let w = dense(weights, name, shape)?;
                for (l, v) in levels.iter_mut().zip(&w) {
                    if !matches!(*v, -1.0 | 0.0 | 1.0) {
                        bail!("tensor '{name}.weight' holds {v}, which is no ternary weight");
                    }
                    *l = (*v + 1.0) as u8;
                }
            }
            let s = weights
                .load_shaped(
                    &format!("{name}.weight_scale"),
                    &[1],
                    DType::F32,
                    &Device::Cpu,
                )?
                .to_vec1::<f32>()?[0];
            if !s.is_finite() || s == 0.0 {
                bail!("tensor '{name}.weight_scale' is {s}, not a usable scale");
            }
            if divide {
                1.0 / s
            } else {
                s
            }
        }
        BitLinearLayout::Online => {
            let w = dense(weights, name, shape)?;
            let (levels_of, scale) = absmean_ternary(&w);
            levels = levels_of;
            scale
        }
    };
    Ok(TernaryTensor {
        levels,
        rows: out,
        cols: inp,
        scale,
    })
}

fn dense(weights: &SafetensorsWeights, name: &str, shape: [usize; 2]) -> anyhow::Result<Vec<f32>> {
    Ok(weights
        .load_shaped(&format!("{name}.weight"), &shape, DType::F32, &Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

/// transformers' `WeightQuant` (BitNet b1.58 training): `s = 1 / max(mean|w|, 1e-5)` over the
/// whole tensor, levels `round(w·s)` clipped to ±1 (+1 to store), scale `1 / s`.
pub fn absmean_ternary(w: &[f32]) -> (Vec<u8>, f32) {
    let mean = (w.iter().map(|v| v.abs() as f64).sum::<f64>() / w.len().max(1) as f64) as f32;
    let s = 1.0 / mean.max(1e-5);
    let levels = w
        .iter()
        .map(|v| ((v * s).round_ties_even().clamp(-1.0, 1.0) + 1.0) as u8)
        .collect();
    (levels, 1.0 / s)
}

/// Projections of one input through BitLinear layers: one stacked ternary matrix, the input
/// quantized once, each part's rows scaled by its own factor.
struct BitProjections {
    matrix: QuantMatrix,
    /// (rows, scale) per part, in order.
    parts: Vec<(usize, f32)>,
    /// `xllm imatrix` only: records the shared input under every part's name.
    tap: Option<Tap>,
}

impl BitProjections {
    fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        if let Some(tap) = &self.tap {
            tap.record(x)?;
        }
        let y = self
            .matrix
            .forward_per_token(&x.to_dtype(DType::F32)?, &self.parts)?;
        if self.parts.len() == 1 {
            return Ok(vec![y]);
        }
        let last = y.rank() - 1;
        let mut start = 0;
        self.parts
            .iter()
            .map(|&(w, _)| {
                let part = y.narrow(last, start, w)?.contiguous();
                start += w;
                part
            })
            .collect()
    }
}

/// A group of projections: BitLinear (ternary) or plain.
enum Proj {
    Bit(BitProjections),
    Plain(Projections),
}

impl Proj {
    fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        match self {
            Proj::Bit(b) => b.forward(x),
            Proj::Plain(p) => p.forward(x),
        }
    }

    fn forward_one(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward(x)?.remove(0))
    }
}

struct Layer {
    attn_norm: Tensor,
    /// q, k, v.
    qkv: Proj,
    attn_sub_norm: Tensor,
    o: Proj,
    ffn_norm: Tensor,
    /// gate, up.
    gate_up: Proj,
    ffn_sub_norm: Tensor,
    down: Proj,
}

pub struct BitNet {
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

/// Reads the BitLinear weights of one format.
trait BitSource {
    /// The BitLinear `role` of layer `i` (`[out, in]`), as ternary blocks and a scale, or `None`
    /// for plain weights (read through the [`Loader`]).
    fn ternary(
        &self,
        role: Role,
        layer: usize,
        shape: [usize; 2],
    ) -> anyhow::Result<Option<(QuantMatrix, f32)>>;
}

struct SafetensorsBits<'a> {
    weights: &'a SafetensorsWeights,
    layout: BitLinearLayout,
}

impl BitSource for SafetensorsBits<'_> {
    fn ternary(
        &self,
        role: Role,
        layer: usize,
        shape: [usize; 2],
    ) -> anyhow::Result<Option<(QuantMatrix, f32)>> {
        if self.layout == BitLinearLayout::Plain {
            return Ok(None);
        }
        let name = role.hf_name(layer);
        let t = ternary_from_safetensors(self.weights, &name, self.layout, shape)?;
        if t.cols % 256 != 0 {
            bail!(
                "'{name}' has rows of {} weights; the ternary kernels need a multiple of 256",
                t.cols
            );
        }
        let m = QuantMatrix::new(
            GgmlType::TQ2_0,
            ternary::tq2_0_unit_blocks(&t.levels),
            t.rows,
            t.cols,
        )?;
        Ok(Some((m, t.scale)))
    }
}

struct GgufBits<'a> {
    file: &'a GgufFile,
}

impl BitSource for GgufBits<'_> {
    fn ternary(
        &self,
        role: Role,
        layer: usize,
        shape: [usize; 2],
    ) -> anyhow::Result<Option<(QuantMatrix, f32)>> {
        let name = format!("{}.weight", role.gguf_name(layer));
        let Some(info) = self.file.side_tensor(&name).cloned() else {
            bail!(
                "tensor '{name}' in {} is not TQ1_0/TQ2_0; bitnet GGUF files hold ternary BitLinear weights \
                 (make one with `xllm quantize MODEL --type TQ2_0`)",
                self.file.path.display()
            );
        };
        if !matches!(info.ty, GgmlType::TQ1_0 | GgmlType::TQ2_0) || info.dims != shape {
            bail!(
                "tensor '{name}' in {} is {} {:?}, expected TQ1_0/TQ2_0 {shape:?}",
                self.file.path.display(),
                info.ty,
                info.dims
            );
        }
        let data = self.file.side_bytes(&name)?;
        let scale_name = format!("{}.scale", role.gguf_name(layer));
        let scale = if self.file.has_tensor(&scale_name) {
            let v = self
                .file
                .tensor(&scale_name, &Device::Cpu)?
                .dequantize(&Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            match v.as_slice() {
                [s] if s.is_finite() => *s,
                _ => bail!("tensor '{scale_name}' must hold one finite value"),
            }
        } else {
            1.0
        };
        Ok(Some((
            QuantMatrix::new(info.ty, data, shape[0], shape[1])?,
            scale,
        )))
    }
}

/// Builds a BitNet model from safetensors or GGUF.
pub fn build(
    source: &WeightSource<'_>,
    options: &BuildOptions,
) -> anyhow::Result<Box<dyn CausalLm>> {
    if !options.device.is_cpu() {
        bail!("bitnet runs on the CPU only for now (its ternary kernels have no GPU twin yet); use --device cpu");
    }
    let model = match source {
        WeightSource::Safetensors { config, weights } => {
            let act = config
                .get("hidden_act")
                .and_then(|v| v.as_str())
                .unwrap_or("relu2");
            if act != "relu2" {
                bail!("config.json: hidden_act '{act}' is not supported for bitnet (relu2)");
            }
            let cfg = LlamaConfig::from_value(config).context("config.json")?;
            let bits = SafetensorsBits {
                weights,
                layout: BitLinearLayout::from_config(config)?,
            };
            let loader = SafetensorsLoader { weights, options };
            BitNet::load(&cfg, &loader, &bits, RopeLayout::Halves, options)?
        }
        WeightSource::Gguf(file) => {
            let cfg = config_from_gguf(file)?;
            let loader = GgufLoader { file, options };
            // `xllm quantize` writes bitnet q/k rows in GGUF's rotary layout, as for llama.
            BitNet::load(
                &cfg,
                &loader,
                &GgufBits { file },
                RopeLayout::Interleaved,
                options,
            )?
        }
    };
    Ok(Box::new(model))
}

impl BitNet {
    fn load(
        cfg: &LlamaConfig,
        loader: &dyn Loader,
        bits: &dyn BitSource,
        layout: RopeLayout,
        options: &BuildOptions,
    ) -> anyhow::Result<Self> {
        if cfg.qkv_bias || cfg.o_bias || cfg.mlp_bias {
            bail!("bitnet with linear biases is not supported (BitNet b1.58 has none)");
        }
        let (h, q_out, kv_out, ff) = (
            cfg.hidden_size,
            cfg.num_heads * cfg.head_dim,
            cfg.num_kv_heads * cfg.head_dim,
            cfg.intermediate_size,
        );
        // One group of projections of the same input: stacked ternary, or plain.
        let stats = options.activation_stats.as_ref();
        let group = |layer: usize, parts: &[(Role, usize, usize)]| -> anyhow::Result<Proj> {
            let name = |role: Role| format!("{}.weight", role.gguf_name(layer));
            let mut mats = Vec::new();
            let mut plain = Vec::new();
            for &(role, out, inp) in parts {
                match bits.ternary(role, layer, [out, inp])? {
                    Some(m) => mats.push(m),
                    None => plain.push(
                        Linear::new(loader.matrix(role, layer, [out, inp])?, None)
                            .tapped(stats, name(role)),
                    ),
                }
            }
            if !plain.is_empty() {
                return Ok(Proj::Plain(Projections::new(plain)));
            }
            let scales: Vec<(usize, f32)> = parts
                .iter()
                .zip(&mats)
                .map(|(&(_, out, _), (_, s))| (out, *s))
                .collect();
            let matrix = if mats.len() == 1 {
                mats.pop().expect("one").0
            } else {
                let refs: Vec<&QuantMatrix> = mats.iter().map(|(m, _)| m).collect();
                QuantMatrix::stack(&refs)
                    .context("BitLinear weights of one input differ in type")?
            };
            let names: Vec<String> = parts.iter().map(|&(role, _, _)| name(role)).collect();
            let tap = stats.map(|s| Tap::new(s, names));
            let parts = scales;
            Ok(Proj::Bit(BitProjections { matrix, parts, tap }))
        };
        let embed = loader.matrix(Role::Embed, 0, [cfg.vocab_size, h])?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            layers.push(Layer {
                attn_norm: loader.vector(Role::AttnNorm, i, "weight", h)?,
                qkv: group(
                    i,
                    &[
                        (Role::Q, q_out, h),
                        (Role::K, kv_out, h),
                        (Role::V, kv_out, h),
                    ],
                )?,
                attn_sub_norm: loader.vector(Role::AttnSubNorm, i, "weight", q_out)?,
                o: group(i, &[(Role::O, h, q_out)])?,
                ffn_norm: loader.vector(Role::FfnNorm, i, "weight", h)?,
                gate_up: group(i, &[(Role::Gate, ff, h), (Role::Up, ff, h)])?,
                ffn_sub_norm: loader.vector(Role::FfnSubNorm, i, "weight", ff)?,
                down: group(i, &[(Role::Down, h, ff)])?,
            });
        }
        let norm = loader.vector(Role::FinalNorm, 0, "weight", h)?;
        let lm_head = if loader.has(Role::LmHead, 0, "weight") {
            Linear::new(loader.matrix(Role::LmHead, 0, [cfg.vocab_size, h])?, None)
        } else if cfg.tie_word_embeddings {
            Linear::new(embed.clone(), None)
        } else {
            bail!("the checkpoint has no LM head weight and tie_word_embeddings is false")
        };
        let info = ModelInfo {
            architecture: "bitnet".into(),
            vocab_size: cfg.vocab_size,
            context_length: cfg.max_position_embeddings,
            cache_layers: cfg.num_layers,
            state_slots: vec![StateSlot::Kv; cfg.num_layers],
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
            rope: Rope::new(cfg.rope.clone(), layout, None),
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            eps: cfg.rms_norm_eps,
            dtype: options.dtype,
            info,
        })
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(&x.contiguous()?, w, self.eps as f32)
    }

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
        let q = q.to_dtype(self.dtype)?.reshape((1, t, h, d))?;
        let k = k.to_dtype(self.dtype)?.reshape((1, t, kvh, d))?;
        let v = v.to_dtype(self.dtype)?.reshape((1, t, kvh, d))?;
        let q = self
            .rope
            .apply(&q.transpose(1, 2)?, &cos_sin.0, &cos_sin.1)?;
        let k = self
            .rope
            .apply(&k.transpose(1, 2)?, &cos_sin.0, &cos_sin.1)?;
        let v = v.transpose(1, 2)?.contiguous()?;
        let shape = AttentionShape {
            heads: h,
            kv_heads: kvh,
            head_dim: d,
            device: &self.info.device,
            dtype: self.dtype,
        };
        let out = attend_batch(&shape, None, &q, &k, &v, batch, plan, index)?;
        let out = self.rms_norm(&out, &layer.attn_sub_norm)?;
        layer.o.forward_one(&out)?.to_dtype(self.dtype)
    }
}

impl CausalLm for BitNet {
    fn forward_batch(&self, batch: &mut [BatchSeq<'_>]) -> Result<Tensor> {
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
            // relu²(gate) · up, then the sub-norm.
            let gate = gate.relu()?.sqr()?;
            let act = self.rms_norm(&(gate * up)?.to_dtype(self.dtype)?, &layer.ffn_sub_norm)?;
            x = (x + layer.down.forward_one(&act)?.to_dtype(self.dtype)?)?;
        }
        plan.commit(batch);
        if plan.logit_rows.is_empty() {
            return Tensor::zeros((0, self.info.vocab_size), DType::F32, device);
        }
        let x = if plan.returns_every_row() {
            x
        } else {
            let rows = Tensor::new(plan.logit_rows.as_slice(), device)?;
            x.index_select(&rows, 1)?
        };
        let x = self.rms_norm(&x, &self.norm)?;
        let logits = self.lm_head.forward(&x)?.squeeze(0)?;
        logits.to_dtype(DType::F32)?.contiguous()
    }

    fn info(&self) -> &ModelInfo {
        &self.info
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn layouts_follow_the_quantization_config() {
        let q = |c: Value| BitLinearLayout::from_config(&json!({ "quantization_config": c }));
        assert_eq!(
            BitLinearLayout::from_config(&json!({})).unwrap(),
            BitLinearLayout::Plain
        );
        assert_eq!(
            q(json!({"quant_method": "bitnet"})).unwrap(),
            BitLinearLayout::Packed { divide: true }
        );
        assert_eq!(
            q(json!({"quant_method": "bitnet", "linear_class": "autobitlinear"})).unwrap(),
            BitLinearLayout::Packed { divide: false }
        );
        assert_eq!(
            q(json!({"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"}))
                .unwrap(),
            BitLinearLayout::Online
        );
        let e = q(json!({"quant_method": "gptq"})).unwrap_err().to_string();
        assert!(e.contains("gptq"), "{e}");
        let e = q(json!({"quant_method": "bitnet", "use_rms_norm": true}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("use_rms_norm"), "{e}");
    }

    #[test]
    fn absmean_ternarization_is_bitnets_rule() {
        // mean |w| = 0.5: s = 2; w·s = 0.2, −0.8, 3.0, 0.0 → 0, −1, 1 (clipped), 0.
        let (levels, scale) = absmean_ternary(&[0.1, -0.4, 1.5, 0.0]);
        assert_eq!(levels, vec![1, 0, 2, 1]);
        assert_eq!(scale, 0.5);
    }
}
