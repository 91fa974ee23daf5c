//! Gemma 3 text decoder (`gemma3` in GGUF, `gemma3_text` / `Gemma3ForCausalLM` in safetensors).
//!
//! What sets it apart from the Llama family (and why it is its own module rather than flags on
//! `llama`): embeddings scaled by √hidden; RMSNorm weights used as `1 + w` (llama.cpp's converter
//! stores `1 + w` in the GGUF, a safetensors checkpoint stores `w`); a norm after attention and
//! after the MLP as well as before each; q/k RMSNorm per head; GELU-tanh gating; attention scaled
//! by `query_pre_attn_scalar^-½`; and two kinds of layers — sliding-window ones (5 of every 6,
//! RoPE base `rope_local_base_freq` = 10000, which the GGUF does not store) and global ones (the
//! stored base, 1e6, and any RoPE scaling). The weights load through the same [`Loader`]s as
//! llama (GGUF blocks on our own kernels, bf16 on ours), so every matmul is shared code.

use anyhow::bail;
use candle_core::{DType, Device, Result, Tensor};
use serde_json::Value;

use super::llama::{
    attend_batch, config_from_gguf, embed, rope_tables, AttentionShape, GgufLoader, Linear, Loader,
    Projections, Role, SafetensorsLoader, Weight,
};
use super::rope::{Rope, RopeLayout};
use super::{BatchPlan, BatchSeq, BuildOptions, CausalLm, ModelInfo, StateSlot, WeightSource};
use crate::model::config::{LlamaConfig, RopeConfig, RopeScaling};

/// Where the tensor-name mapping lives (shown by the architecture table).
pub const TENSOR_NAMES_DOC: &str =
    "llama::Role::{hf_name, gguf_name} (+ PostAttnNorm, PreFfnNorm, PostFfnNorm)";

/// RoPE base of the sliding-window layers when the checkpoint does not say (GGUF never does;
/// llama.cpp hard-codes the same value for gemma3).
const LOCAL_ROPE_BASE: f64 = 10_000.0;

/// Every `SLIDING_PATTERN`-th layer is global, the others slide (Gemma 3's
/// `sliding_window_pattern`, which llama.cpp also fixes at 6 for gemma3).
const SLIDING_PATTERN: usize = 6;

/// What Gemma 3 adds to the shared Llama-family config.
#[derive(Debug, Clone)]
pub struct Gemma3Extra {
    /// Queries are scaled by `query_pre_attn_scalar^-½` (not always `head_dim^-½`).
    pub query_pre_attn_scalar: f64,
    pub local_rope_base: f64,
    /// `tanh` soft-capping of the final logits (`None`: off, as in every Gemma 3 release).
    pub final_logit_softcapping: Option<f64>,
}

struct Layer {
    attn_norm: Tensor,
    /// q, k, v.
    qkv: Projections,
    o: Linear,
    q_norm: Tensor,
    k_norm: Tensor,
    post_attn_norm: Tensor,
    ffn_norm: Tensor,
    /// gate, up.
    gate_up: Projections,
    down: Linear,
    post_ffn_norm: Tensor,
    /// `Some(window)` for sliding layers (which also use the local RoPE).
    window: Option<usize>,
}

pub struct Gemma3 {
    embed: Weight,
    embed_scale: f64,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    rope_global: Rope,
    rope_local: Rope,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    /// Multiplies the queries so that the `head_dim^-½` both attention paths apply gives
    /// `query_pre_attn_scalar^-½` (1 for the released models, then skipped).
    query_factor: f64,
    final_softcap: Option<f64>,
    eps: f64,
    dtype: DType,
    info: ModelInfo,
}

/// Builds Gemma 3 from safetensors or GGUF.
pub fn build(
    source: &WeightSource<'_>,
    options: &BuildOptions,
) -> anyhow::Result<Box<dyn CausalLm>> {
    let model = match source {
        WeightSource::Safetensors { config, weights } => {
            let (cfg, extra) = config_from_json(config)?;
            let loader = SafetensorsLoader { weights, options };
            // transformers' Gemma3RMSNorm multiplies by `1 + weight`.
            Gemma3::load(&cfg, &extra, &loader, 1.0, options)?
        }
        WeightSource::Gguf(file) => {
            let mut cfg = config_from_gguf(file)?;
            let window = cfg.sliding_window.first().copied().flatten();
            cfg.sliding_window = sliding_pattern(cfg.num_layers, window);
            let extra = Gemma3Extra {
                query_pre_attn_scalar: cfg.head_dim as f64,
                local_rope_base: LOCAL_ROPE_BASE,
                final_logit_softcapping: file.f64_value("gemma3.final_logit_softcapping")?,
            };
            let loader = GgufLoader { file, options };
            // The converter already stored `1 + weight`.
            Gemma3::load(&cfg, &extra, &loader, 0.0, options)?
        }
    };
    Ok(Box::new(model))
}

/// Sliding windows per layer: all but every [`SLIDING_PATTERN`]-th layer.
fn sliding_pattern(layers: usize, window: Option<usize>) -> Vec<Option<usize>> {
    (0..layers)
        .map(|i| window.filter(|_| (i + 1) % SLIDING_PATTERN != 0))
        .collect()
}

/// The config of a `gemma3_text` checkpoint: the shared fields plus Gemma's own.
pub fn config_from_json(value: &Value) -> anyhow::Result<(LlamaConfig, Gemma3Extra)> {
    let mut cfg = LlamaConfig::from_value(value)?;
    let num = |k: &str| value.get(k).and_then(Value::as_f64);
    if value.get("layer_types").is_none() {
        let window = cfg.sliding_window.first().copied().flatten();
        let pattern = value
            .get("sliding_window_pattern")
            .and_then(Value::as_u64)
            .unwrap_or(SLIDING_PATTERN as u64) as usize;
        cfg.sliding_window = (0..cfg.num_layers)
            .map(|i| window.filter(|_| pattern == 0 || (i + 1) % pattern != 0))
            .collect();
    }
    // Gemma3TextConfig ties the embeddings unless told otherwise.
    cfg.tie_word_embeddings = value
        .get("tie_word_embeddings")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    if let Some(act) = value
        .get("hidden_activation")
        .or(value.get("hidden_act"))
        .and_then(Value::as_str)
    {
        if act != "gelu_pytorch_tanh" {
            bail!(
                "gemma3: hidden_activation '{act}' is not supported (expected gelu_pytorch_tanh)"
            );
        }
    }
    if num("attn_logit_softcapping").is_some() {
        bail!("gemma3: attn_logit_softcapping is not supported (no Gemma 3 release uses it)");
    }
    let extra = Gemma3Extra {
        query_pre_attn_scalar: num("query_pre_attn_scalar").unwrap_or(cfg.head_dim as f64),
        local_rope_base: num("rope_local_base_freq").unwrap_or(LOCAL_ROPE_BASE),
        final_logit_softcapping: num("final_logit_softcapping"),
    };
    if extra.query_pre_attn_scalar <= 0.0 || extra.local_rope_base <= 0.0 {
        bail!("gemma3: query_pre_attn_scalar and rope_local_base_freq must be positive");
    }
    Ok((cfg, extra))
}

impl Gemma3 {
    /// `norm_shift`: added to every RMSNorm weight on load (1 for transformers' `w`, 0 for the
    /// GGUF's stored `1 + w`).
    fn load(
        cfg: &LlamaConfig,
        extra: &Gemma3Extra,
        loader: &dyn Loader,
        norm_shift: f64,
        options: &BuildOptions,
    ) -> anyhow::Result<Self> {
        let (h, q_out, kv_out) = (
            cfg.hidden_size,
            cfg.num_heads * cfg.head_dim,
            cfg.num_kv_heads * cfg.head_dim,
        );
        let linear = |role: Role, layer: usize, out: usize, inp: usize| {
            anyhow::Ok(
                Linear::new(loader.matrix(role, layer, [out, inp])?, None).tapped(
                    options.activation_stats.as_ref(),
                    format!("{}.weight", role.gguf_name(layer)),
                ),
            )
        };
        let norm = |role: Role, layer: usize, len: usize| {
            let w = loader.vector(role, layer, "weight", len)?;
            anyhow::Ok(if norm_shift != 0.0 {
                (w + norm_shift)?
            } else {
                w
            })
        };
        let embed = loader.matrix(Role::Embed, 0, [cfg.vocab_size, h])?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            layers.push(Layer {
                attn_norm: norm(Role::AttnNorm, i, h)?,
                qkv: Projections::new(vec![
                    linear(Role::Q, i, q_out, h)?,
                    linear(Role::K, i, kv_out, h)?,
                    linear(Role::V, i, kv_out, h)?,
                ]),
                o: linear(Role::O, i, h, q_out)?,
                q_norm: norm(Role::QNorm, i, cfg.head_dim)?,
                k_norm: norm(Role::KNorm, i, cfg.head_dim)?,
                post_attn_norm: norm(Role::PostAttnNorm, i, h)?,
                ffn_norm: norm(Role::PreFfnNorm, i, h)?,
                gate_up: Projections::new(vec![
                    linear(Role::Gate, i, cfg.intermediate_size, h)?,
                    linear(Role::Up, i, cfg.intermediate_size, h)?,
                ]),
                down: linear(Role::Down, i, h, cfg.intermediate_size)?,
                post_ffn_norm: norm(Role::PostFfnNorm, i, h)?,
                window: cfg.sliding_window.get(i).copied().flatten(),
            });
        }
        let final_norm = norm(Role::FinalNorm, 0, h)?;
        let lm_head = if loader.has(Role::LmHead, 0, "weight") {
            Linear::new(loader.matrix(Role::LmHead, 0, [cfg.vocab_size, h])?, None)
        } else if cfg.tie_word_embeddings {
            Linear::new(embed.clone(), None)
        } else {
            bail!("the checkpoint has no LM head weight and tie_word_embeddings is false")
        };
        let local = RopeConfig {
            theta: extra.local_rope_base,
            scaling: RopeScaling::Default,
            rotary_dim: cfg.head_dim,
        };
        let info = ModelInfo {
            architecture: "gemma3".into(),
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
            embed_scale: (h as f64).sqrt(),
            layers,
            norm: final_norm,
            lm_head,
            // Gemma rotates the two halves of each head (NEOX), in both file formats.
            rope_global: Rope::new(cfg.rope.clone(), RopeLayout::Halves, None),
            rope_local: Rope::new(local, RopeLayout::Halves, None),
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            query_factor: (cfg.head_dim as f64 / extra.query_pre_attn_scalar).sqrt(),
            final_softcap: extra.final_logit_softcapping,
            eps: cfg.rms_norm_eps,
            dtype: options.dtype,
            info,
        })
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(&x.contiguous()?, w, self.eps as f32)
    }

    /// Attention of one layer for every sequence of the batch: projections, q/k norms and RoPE
    /// over all rows at once, then each sequence's rows attend over its own cache (llama's
    /// per-sequence attention, with the queries pre-scaled to `query_pre_attn_scalar^-½`).
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
        let q = self.rms_norm(&q.reshape((1, t, h, d))?, &layer.q_norm)?;
        let k = self.rms_norm(&k.reshape((1, t, kvh, d))?, &layer.k_norm)?;
        let v = v.reshape((1, t, kvh, d))?;
        let rope = if layer.window.is_some() {
            &self.rope_local
        } else {
            &self.rope_global
        };
        let mut q = rope.apply(&q.transpose(1, 2)?, &cos_sin.0, &cos_sin.1)?;
        if self.query_factor != 1.0 {
            q = (q * self.query_factor)?;
        }
        let k = rope.apply(&k.transpose(1, 2)?, &cos_sin.0, &cos_sin.1)?;
        let v = v.transpose(1, 2)?.contiguous()?;
        let shape = AttentionShape {
            heads: h,
            kv_heads: kvh,
            head_dim: d,
            device: &self.info.device,
            dtype: self.dtype,
        };
        let out = attend_batch(&shape, layer.window, &q, &k, &v, batch, plan, index)?;
        layer.o.forward(&out)
    }
}

impl CausalLm for Gemma3 {
    fn forward_batch(&self, batch: &mut [BatchSeq<'_>]) -> Result<Tensor> {
        let plan = BatchPlan::new(batch, self.info.vocab_size, self.layers.len())?;
        let device: &Device = &self.info.device;
        let ids = Tensor::new(plan.tokens.as_slice(), device)?;
        let mut x = (embed(&self.embed, &ids, self.dtype)? * self.embed_scale)?.unsqueeze(0)?;
        let global = rope_tables(&self.rope_global, &plan, device)?;
        let local = rope_tables(&self.rope_local, &plan, device)?;
        for (index, layer) in self.layers.iter().enumerate() {
            let cos_sin = if layer.window.is_some() {
                &local
            } else {
                &global
            };
            let normed = self.rms_norm(&x, &layer.attn_norm)?;
            let attn = self.attention(layer, index, &normed, batch, &plan, cos_sin)?;
            x = (x + self.rms_norm(&attn, &layer.post_attn_norm)?)?;
            let normed = self.rms_norm(&x, &layer.ffn_norm)?;
            let [gate, up]: [Tensor; 2] = layer
                .gate_up
                .forward(&normed)?
                .try_into()
                .map_err(|_| candle_core::Error::Msg("gate/up projections".into()))?;
            // transformers' gelu_pytorch_tanh (candle's `gelu`; vectorized on AVX-512 CPUs).
            let mlp = layer
                .down
                .forward(&crate::kernels::gelu::gelu_tanh_mul(&gate, &up)?)?;
            x = (x + self.rms_norm(&mlp, &layer.post_ffn_norm)?)?;
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
        let mut logits = self.lm_head.forward(&x)?.squeeze(0)?.to_dtype(DType::F32)?;
        if let Some(cap) = self.final_softcap {
            logits = ((logits / cap)?.tanh()? * cap)?;
        }
        logits.contiguous()
    }

    fn info(&self) -> &ModelInfo {
        &self.info
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn five_of_every_six_layers_slide() {
        let w = sliding_pattern(12, Some(512));
        let global: Vec<usize> = (0..12).filter(|&i| w[i].is_none()).collect();
        assert_eq!(global, vec![5, 11]);
        assert_eq!(sliding_pattern(3, None), vec![None; 3]);
    }

    #[test]
    fn config_defaults_follow_transformers() {
        let v = serde_json::json!({
            "model_type": "gemma3_text", "vocab_size": 64, "hidden_size": 16,
            "intermediate_size": 32, "num_hidden_layers": 6, "num_attention_heads": 2,
            "num_key_value_heads": 1, "head_dim": 8, "sliding_window": 4,
            "query_pre_attn_scalar": 16, "rope_theta": 1000000.0,
            "hidden_activation": "gelu_pytorch_tanh"
        });
        let (cfg, extra) = config_from_json(&v).unwrap();
        assert!(cfg.tie_word_embeddings);
        assert_eq!(cfg.sliding_window[5], None);
        assert_eq!(cfg.sliding_window[0], Some(4));
        assert_eq!(extra.local_rope_base, 10_000.0);
        assert_eq!(extra.query_pre_attn_scalar, 16.0);
        let mut bad = v.clone();
        bad["hidden_activation"] = "silu".into();
        assert!(config_from_json(&bad).is_err());
    }
}
