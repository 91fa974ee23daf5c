//! BERT encoders as sentence-embedding models use them (all-MiniLM, bge, e5, gte ...): learned
//! absolute positions, token types, post-norm layers (residual, then layer norm), GELU MLP,
//! bidirectional attention. Runs on the CPU over packed batches with the kernels in
//! [`crate::kernels::encoder`].
//!
//! Checkpoints name tensors with or without a `bert.` prefix (`BertModel` vs `BertFor…` heads);
//! the `pooler.*` head, `embeddings.position_ids` (an I64 buffer) and any task heads are not
//! read.

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use serde_json::Value;

use super::encoder::{Encoder, EncoderInfo, PackedBatch};
use crate::kernels::encoder::{self as k, Activation};
use crate::model::safetensors::SafetensorsWeights;

/// Tensor names read (with an optional `bert.` prefix), for the architecture table.
pub const TENSOR_NAMES_DOC: &str = "embeddings.{word,position,token_type}_embeddings.weight, \
embeddings.LayerNorm.{weight,bias}; encoder.layer.N.attention.self.{query,key,value}.{weight,bias}, \
encoder.layer.N.attention.output.{dense,LayerNorm}.*, encoder.layer.N.intermediate.dense.*, \
encoder.layer.N.output.{dense,LayerNorm}.*";

/// The fields of a BERT `config.json` the forward pass depends on.
#[derive(Debug, Clone, PartialEq)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub layers: usize,
    pub heads: usize,
    pub intermediate_size: usize,
    pub max_positions: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f32,
    pub activation: Activation,
}

impl BertConfig {
    pub fn from_value(c: &Value) -> anyhow::Result<Self> {
        let get = |k: &str| -> anyhow::Result<usize> {
            c.get(k)
                .and_then(Value::as_u64)
                .map(|v| v as usize)
                .with_context(|| format!("config.json lacks '{k}' (a positive integer)"))
        };
        let act = c
            .get("hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("gelu");
        let activation = Activation::from_config(act).with_context(|| {
            format!("hidden_act '{act}' is not supported (supported: gelu, gelu_new, relu)")
        })?;
        if let Some(p) = c.get("position_embedding_type").and_then(Value::as_str) {
            if p != "absolute" {
                bail!("position_embedding_type '{p}' is not supported (supported: absolute)");
            }
        }
        let cfg = BertConfig {
            vocab_size: get("vocab_size")?,
            hidden_size: get("hidden_size")?,
            layers: get("num_hidden_layers")?,
            heads: get("num_attention_heads")?,
            intermediate_size: get("intermediate_size")?,
            max_positions: get("max_position_embeddings")?,
            type_vocab_size: c
                .get("type_vocab_size")
                .and_then(Value::as_u64)
                .unwrap_or(2) as usize,
            layer_norm_eps: c
                .get("layer_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-12) as f32,
            activation,
        };
        if cfg.heads == 0 || cfg.hidden_size % cfg.heads != 0 {
            bail!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                cfg.hidden_size,
                cfg.heads
            );
        }
        Ok(cfg)
    }
}

struct Linear {
    /// `[out, in]` as stored.
    weight: Vec<f32>,
    bias: Vec<f32>,
}

struct Norm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
}

struct Layer {
    /// Queries, keys and values stacked into one `[3·hidden, hidden]` matrix: one matmul.
    qkv: Linear,
    attn_out: Linear,
    attn_norm: Norm,
    up: Linear,
    down: Linear,
    out_norm: Norm,
}

pub struct Bert {
    cfg: BertConfig,
    info: EncoderInfo,
    word: Vec<f32>,
    position: Vec<f32>,
    token_type: Vec<f32>,
    embed_norm: Norm,
    layers: Vec<Layer>,
}

/// Reads tensors by their names without the optional `bert.` prefix, checking shapes.
struct Reader<'a> {
    weights: &'a SafetensorsWeights,
    prefix: &'static str,
}

impl Reader<'_> {
    fn tensor(&self, name: &str, shape: &[usize]) -> anyhow::Result<Vec<f32>> {
        let full = format!("{}{name}", self.prefix);
        let t = self
            .weights
            .load_shaped(&full, shape, DType::F32, &Device::Cpu)?;
        Ok(t.flatten_all()?.to_vec1::<f32>()?)
    }

    /// Old TF-converted checkpoints call layer-norm parameters gamma/beta.
    fn norm(&self, name: &str, width: usize) -> anyhow::Result<Norm> {
        let has = |s: &str| self.weights.contains(&format!("{}{name}.{s}", self.prefix));
        let (g, b) = if !has("weight") && has("gamma") {
            ("gamma", "beta")
        } else {
            ("weight", "bias")
        };
        Ok(Norm {
            gamma: self.tensor(&format!("{name}.{g}"), &[width])?,
            beta: self.tensor(&format!("{name}.{b}"), &[width])?,
        })
    }

    fn linear(&self, name: &str, out: usize, inp: usize) -> anyhow::Result<Linear> {
        Ok(Linear {
            weight: self.tensor(&format!("{name}.weight"), &[out, inp])?,
            bias: self.tensor(&format!("{name}.bias"), &[out])?,
        })
    }
}

/// The architecture table's builder.
pub fn build(config: &Value, weights: &SafetensorsWeights) -> anyhow::Result<Box<dyn Encoder>> {
    Ok(Box::new(Bert::load(config, weights)?))
}

impl Bert {
    pub fn load(config: &Value, weights: &SafetensorsWeights) -> anyhow::Result<Self> {
        let cfg = BertConfig::from_value(config)?;
        let word_name = "embeddings.word_embeddings.weight";
        let prefix = if weights.contains(word_name) {
            ""
        } else if weights.contains(&format!("bert.{word_name}")) {
            "bert."
        } else {
            bail!("the checkpoint has no '{word_name}' (with or without a 'bert.' prefix): is it a BERT model?");
        };
        let format = weights
            .stored_dtype(&format!("{prefix}{word_name}"))
            .map(|d| format!("{d:?}").to_ascii_lowercase())
            .unwrap_or_else(|_| "f32".into());
        let r = Reader { weights, prefix };
        let h = cfg.hidden_size;
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let p = format!("encoder.layer.{i}");
            let q = r.linear(&format!("{p}.attention.self.query"), h, h)?;
            let kk = r.linear(&format!("{p}.attention.self.key"), h, h)?;
            let v = r.linear(&format!("{p}.attention.self.value"), h, h)?;
            let qkv = Linear {
                weight: [q.weight, kk.weight, v.weight].concat(),
                bias: [q.bias, kk.bias, v.bias].concat(),
            };
            layers.push(Layer {
                qkv,
                attn_out: r.linear(&format!("{p}.attention.output.dense"), h, h)?,
                attn_norm: r.norm(&format!("{p}.attention.output.LayerNorm"), h)?,
                up: r.linear(&format!("{p}.intermediate.dense"), cfg.intermediate_size, h)?,
                down: r.linear(&format!("{p}.output.dense"), h, cfg.intermediate_size)?,
                out_norm: r.norm(&format!("{p}.output.LayerNorm"), h)?,
            });
        }
        let info = EncoderInfo {
            architecture: "bert".into(),
            hidden_size: h,
            max_positions: cfg.max_positions,
            vocab_size: cfg.vocab_size,
            weight_format: format,
        };
        Ok(Bert {
            word: r.tensor(word_name, &[cfg.vocab_size, h])?,
            position: r.tensor(
                "embeddings.position_embeddings.weight",
                &[cfg.max_positions, h],
            )?,
            token_type: r.tensor(
                "embeddings.token_type_embeddings.weight",
                &[cfg.type_vocab_size, h],
            )?,
            embed_norm: r.norm("embeddings.LayerNorm", h)?,
            layers,
            info,
            cfg,
        })
    }

    /// Word + position + token-type embeddings, layer-normed: `[tokens, hidden]`.
    fn embed(&self, batch: &PackedBatch<'_>) -> anyhow::Result<Vec<f32>> {
        let h = self.cfg.hidden_size;
        let mut x = Vec::with_capacity(batch.tokens.len() * h);
        let mut i = 0;
        for &len in batch.lens {
            for pos in 0..len {
                let (tok, ty) = (batch.tokens[i] as usize, batch.type_ids[i] as usize);
                if tok >= self.cfg.vocab_size {
                    bail!(
                        "token id {tok} is outside the vocabulary ({} tokens)",
                        self.cfg.vocab_size
                    );
                }
                if ty >= self.cfg.type_vocab_size {
                    bail!(
                        "token type {ty} is outside the model's {} types",
                        self.cfg.type_vocab_size
                    );
                }
                let w = &self.word[tok * h..][..h];
                let p = &self.position[pos * h..][..h];
                let t = &self.token_type[ty * h..][..h];
                x.extend(w.iter().zip(p).zip(t).map(|((a, b), c)| a + b + c));
                i += 1;
            }
        }
        k::layer_norm(
            &mut x,
            &self.embed_norm.gamma,
            &self.embed_norm.beta,
            self.cfg.layer_norm_eps,
        );
        Ok(x)
    }
}

impl Encoder for Bert {
    fn hidden_states(&self, batch: &PackedBatch<'_>) -> anyhow::Result<Vec<f32>> {
        batch.validate(self.cfg.max_positions)?;
        let h = self.cfg.hidden_size;
        let eps = self.cfg.layer_norm_eps;
        let mut x = self.embed(batch)?;
        let (mut qkv, mut ctx, mut up, mut y) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for l in &self.layers {
            k::linear(&x, h, &l.qkv.weight, &l.qkv.bias, None, &mut qkv);
            k::packed_attention(
                &qkv,
                batch.lens,
                self.cfg.heads,
                h / self.cfg.heads,
                &mut ctx,
            );
            k::linear(
                &ctx,
                h,
                &l.attn_out.weight,
                &l.attn_out.bias,
                Some(&x),
                &mut y,
            );
            k::layer_norm(&mut y, &l.attn_norm.gamma, &l.attn_norm.beta, eps);
            k::linear(&y, h, &l.up.weight, &l.up.bias, None, &mut up);
            k::activate(&mut up, self.cfg.activation);
            k::linear(
                &up,
                self.cfg.intermediate_size,
                &l.down.weight,
                &l.down.bias,
                Some(&y),
                &mut x,
            );
            k::layer_norm(&mut x, &l.out_norm.gamma, &l.out_norm.beta, eps);
        }
        Ok(x)
    }

    fn info(&self) -> &EncoderInfo {
        &self.info
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_of_all_minilm_l6_v2() {
        let c = serde_json::json!({
            "model_type": "bert", "hidden_act": "gelu", "hidden_size": 384,
            "intermediate_size": 1536, "layer_norm_eps": 1e-12, "max_position_embeddings": 512,
            "num_attention_heads": 12, "num_hidden_layers": 6, "type_vocab_size": 2,
            "vocab_size": 30522, "position_embedding_type": "absolute"
        });
        let cfg = BertConfig::from_value(&c).unwrap();
        assert_eq!((cfg.hidden_size, cfg.heads, cfg.layers), (384, 12, 6));
        assert_eq!(cfg.activation, Activation::GeluErf);
        let mut bad = c.clone();
        bad["position_embedding_type"] = "relative_key".into();
        let err = BertConfig::from_value(&bad).unwrap_err().to_string();
        assert!(err.contains("relative_key"), "{err}");
        let mut bad = c;
        bad["hidden_act"] = "swish".into();
        assert!(BertConfig::from_value(&bad).is_err());
    }
}
