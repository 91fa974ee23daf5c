//! Model metadata without loading weights: config.json fields, parameter counts from safetensors
//! headers (only the JSON header of each file is read) or GGUF tensor infos. Feeds manifests and
//! `xllm show`, for store models and local paths alike.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::quant::KvProfile;

/// What `show`, `list` and the manifest report about a model.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelMetadata {
    /// `model_type` from config.json, or `general.architecture` from GGUF.
    pub architecture: Option<String>,
    pub parameters: Option<u64>,
    /// Parameters used per token for mixture-of-experts models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_parameters: Option<u64>,
    pub context_length: Option<u64>,
    pub embedding_length: Option<u64>,
    pub layers: Option<u64>,
    /// Layers with attention (and so a KV cache); less than `layers` for hybrid models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_layers: Option<u64>,
    pub attention_heads: Option<u64>,
    pub kv_heads: Option<u64>,
    pub head_dim: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experts: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experts_active: Option<u64>,
    /// Attention window of the sliding-window layers, when the model has them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<u64>,
    /// Block kinds in order for hybrid models (Nemotron-H: `M` Mamba2, `E` MoE, `*` attention,
    /// `-` MLP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_pattern: Option<String>,
    /// Recurrent (Mamba conv + SSM) state bytes one sequence holds, whatever its length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recurrent_state_bytes: Option<u64>,
    /// Weight storage, e.g. `bf16`, `mxfp4+bf16`, `Q4_K_M`.
    pub quantization: String,
    /// GGUF: how many tensors each block type holds (`Q4_K` → 97); a file type like `Q4_K_M`
    /// mixes several.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tensor_types: BTreeMap<String, u64>,
    /// KV-cache profiles this model can run with.
    pub kv_profiles: Vec<KvProfile>,
}

impl ModelMetadata {
    /// KV-cache bytes per token for each supported profile; `default_elem_bytes` is the element
    /// size of the unquantized cache (2 for bf16/f16).
    pub fn kv_bytes_per_token(&self, default_elem_bytes: usize) -> Vec<(KvProfile, u64)> {
        let (Some(layers), Some(kv_heads), Some(head_dim)) = (
            self.attention_layers.or(self.layers),
            self.kv_heads,
            self.head_dim,
        ) else {
            return Vec::new();
        };
        self.kv_profiles
            .iter()
            .map(|p| {
                let b = p.kv_bytes_per_token(
                    layers as usize,
                    kv_heads as usize,
                    head_dim as usize,
                    default_elem_bytes,
                );
                (*p, b as u64)
            })
            .collect()
    }
}

/// Inspects a safetensors model directory (config.json + `*.safetensors`).
pub fn inspect_dir(dir: &Path) -> anyhow::Result<ModelMetadata> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("cannot read {}", config_path.display()))?;
    let config: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", config_path.display()))?;
    let mut meta = metadata_from_config(&config);

    let mut shards: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    shards.sort();
    if shards.is_empty() {
        anyhow::bail!(
            "{} has config.json but no .safetensors weights",
            dir.display()
        );
    }
    let mut counts = ParamCounts::default();
    for shard in &shards {
        super::files::check_inside(dir, shard, dir)?;
        let header = read_safetensors_header(shard)?;
        counts.add_safetensors(&header);
    }
    meta.parameters = Some(counts.total);
    meta.active_parameters = counts.active(meta.experts, meta.experts_active);
    super::arch_facts::apply(&config, &mut meta);
    let method = config
        .get("quantization_config")
        .and_then(|q| q.get("quant_method"))
        .and_then(|m| m.as_str());
    meta.quantization = counts.safetensors_quantization(method);
    Ok(meta)
}

/// Inspects a GGUF file: llama.cpp metadata keys and tensor infos.
pub fn inspect_gguf(path: &Path) -> anyhow::Result<ModelMetadata> {
    // The same checked open as loading (a header `run` would refuse is refused here too).
    let file = super::gguf::GgufFile::open(path)?;
    let content = &file.content;
    let md = &content.metadata;
    let arch = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned();
    let key = |suffix: &str| -> Option<u64> {
        let a = arch.as_deref()?;
        md.get(&format!("{a}.{suffix}")).and_then(gguf_u64)
    };
    let mut meta = ModelMetadata {
        architecture: arch.clone(),
        context_length: key("context_length"),
        embedding_length: key("embedding_length"),
        layers: key("block_count"),
        attention_heads: key("attention.head_count"),
        kv_heads: key("attention.head_count_kv").or(key("attention.head_count")),
        experts: key("expert_count").filter(|n| *n > 0),
        experts_active: key("expert_used_count").filter(|n| *n > 0),
        sliding_window: key("attention.sliding_window").filter(|n| *n > 0),
        kv_profiles: vec![KvProfile::Default],
        ..Default::default()
    };
    meta.head_dim = key("attention.key_length")
        .or_else(|| Some(meta.embedding_length? / meta.attention_heads.filter(|h| *h > 0)?));
    let mut counts = ParamCounts::default();
    let mut dtype_elems: BTreeMap<String, u64> = BTreeMap::new();
    for t in file.tensor_summaries() {
        let (name, n, ty) = (t.name, t.elems, t.ty.name);
        counts.add(name, n, name.contains("_exps"));
        *dtype_elems.entry(ty.to_string()).or_default() += n;
        *meta.tensor_types.entry(ty.to_string()).or_default() += 1;
    }
    meta.parameters = Some(counts.total);
    meta.active_parameters = counts.active(meta.experts, meta.experts_active);
    if arch.as_deref() == Some("gpt-oss") {
        // Counted as for openai's checkpoints (the input embedding table is not active); a
        // header the loader would refuse keeps the generic counts.
        if let Ok(c) = crate::arch::gpt_oss::config_from_gguf(&file) {
            let (total, active) = c.parameter_counts();
            meta.parameters = Some(total);
            meta.active_parameters = Some(active);
        }
    }
    meta.quantization = md
        .get("general.file_type")
        .and_then(gguf_u64)
        .and_then(gguf_file_type_name)
        .map(str::to_string)
        .or_else(|| {
            path.file_name()
                .and_then(|n| crate::quant::gguf_type_in_file_name(&n.to_string_lossy()))
                .map(str::to_string)
        })
        .or_else(|| {
            dtype_elems
                .iter()
                .max_by_key(|(_, n)| **n)
                .map(|(d, _)| d.clone())
        })
        .unwrap_or_else(|| "unknown".to_string());
    Ok(meta)
}

fn gguf_u64(v: &candle_core::quantized::gguf_file::Value) -> Option<u64> {
    v.to_u64()
        .ok()
        .or_else(|| v.to_u32().ok().map(u64::from))
        .or_else(|| v.to_i32().ok().and_then(|x| u64::try_from(x).ok()))
        .or_else(|| v.to_i64().ok().and_then(|x| u64::try_from(x).ok()))
        .or_else(|| v.to_u16().ok().map(u64::from))
}

/// llama.cpp's `llama_ftype` numbering (`general.file_type`) to its user-facing name.
pub fn gguf_file_type_name(ftype: u64) -> Option<&'static str> {
    crate::kernels::ggml_types::file_type_name(u32::try_from(ftype).ok()?)
}

/// config.json fields, with the usual aliases and a nested `text_config` for multimodal models.
pub fn metadata_from_config(config: &serde_json::Value) -> ModelMetadata {
    let text = config.get("text_config").filter(|t| t.is_object());
    let get = |keys: &[&str]| -> Option<u64> {
        for src in [Some(config), text].into_iter().flatten() {
            for k in keys {
                if let Some(v) = src.get(*k).and_then(|v| v.as_u64()) {
                    return Some(v);
                }
            }
        }
        None
    };
    let architecture = config
        .get("model_type")
        .and_then(|v| v.as_str())
        .map(str::to_string);
    let hidden = get(&["hidden_size", "n_embd", "d_model"]);
    let heads = get(&["num_attention_heads", "n_head"]);
    let layers = get(&["num_hidden_layers", "n_layer", "num_layers"]);
    let kv_heads = get(&["num_key_value_heads", "num_kv_heads", "n_head_kv"]).or(heads);
    let head_dim = get(&["head_dim", "attention_head_dim"])
        .or_else(|| Some(hidden? / heads.filter(|h| *h > 0)?));
    let attention_layers = attention_layer_count(config, layers);
    let kv_profiles = if attention_layers == Some(0) {
        vec![KvProfile::Default]
    } else {
        vec![KvProfile::Default, KvProfile::KvInt8, KvProfile::KvFp8]
    };
    ModelMetadata {
        architecture,
        context_length: get(&[
            "max_position_embeddings",
            "n_positions",
            "max_seq_len",
            "seq_length",
        ]),
        embedding_length: hidden,
        layers,
        attention_layers: attention_layers.filter(|a| Some(*a) != layers),
        attention_heads: heads,
        kv_heads,
        head_dim,
        experts: get(&["num_local_experts", "num_experts", "n_routed_experts"]).filter(|n| *n > 0),
        experts_active: get(&["num_experts_per_tok", "experts_per_token", "moe_topk"])
            .filter(|n| *n > 0),
        kv_profiles,
        ..Default::default()
    }
}

/// Hybrid models keep a KV cache only in their attention layers: Nemotron-H marks them `*` in
/// `hybrid_override_pattern`; others list `layer_types` where linear/mamba layers have none.
fn attention_layer_count(config: &serde_json::Value, layers: Option<u64>) -> Option<u64> {
    if let Some(p) = config
        .get("hybrid_override_pattern")
        .and_then(|p| p.as_str())
    {
        return Some(p.chars().filter(|c| *c == '*').count() as u64);
    }
    if let Some(types) = config.get("layer_types").and_then(|t| t.as_array()) {
        let n = types
            .iter()
            .filter_map(|t| t.as_str())
            .filter(|t| !(t.contains("linear") || t.contains("mamba") || t.contains("ssm")))
            .count();
        return Some(n as u64);
    }
    layers
}

/// One tensor entry of a safetensors header.
#[derive(Debug, Deserialize)]
pub struct HeaderTensor {
    pub dtype: String,
    pub shape: Vec<u64>,
}

/// Reads only the JSON header of a safetensors file (8-byte little-endian length, then JSON).
pub fn read_safetensors_header(path: &Path) -> anyhow::Result<BTreeMap<String, HeaderTensor>> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let file_len = file.metadata()?.len();
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes)
        .with_context(|| format!("{} is too short to be safetensors", path.display()))?;
    let len = u64::from_le_bytes(len_bytes);
    if len > 100_000_000 || len + 8 > file_len {
        anyhow::bail!(
            "{} has a corrupt safetensors header (length {len})",
            path.display()
        );
    }
    let mut buf = vec![0u8; len as usize];
    file.read_exact(&mut buf)?;
    parse_safetensors_header(&buf)
        .with_context(|| format!("{} has a corrupt safetensors header", path.display()))
}

/// The tensor entries of a safetensors JSON header (without `__metadata__`).
pub fn parse_safetensors_header(json: &[u8]) -> anyhow::Result<BTreeMap<String, HeaderTensor>> {
    let raw: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(json).context("the header is not a JSON object")?;
    let mut out = BTreeMap::new();
    for (name, v) in raw {
        if name == "__metadata__" {
            continue;
        }
        let t: HeaderTensor =
            serde_json::from_value(v).with_context(|| format!("bad entry for tensor {name}"))?;
        out.insert(name, t);
    }
    Ok(out)
}

#[derive(Debug, Default)]
struct ParamCounts {
    total: u64,
    experts: u64,
    /// Elements per dtype of non-MXFP4 tensors, to name the weight storage.
    float_dtypes: BTreeMap<String, u64>,
    mxfp4: bool,
}

impl ParamCounts {
    fn add(&mut self, _name: &str, n: u64, is_expert: bool) {
        // Saturating: a header may declare absurd shapes; `show` must still not overflow.
        self.total = self.total.saturating_add(n);
        if is_expert {
            self.experts = self.experts.saturating_add(n);
        }
    }

    /// MXFP4 `*_blocks` tensors pack two 4-bit values per byte; their `*_scales` are not
    /// parameters. Expert tensors are those under `.experts.` (shared experts always run).
    fn add_safetensors(&mut self, header: &BTreeMap<String, HeaderTensor>) {
        for (name, t) in header {
            let elems: u64 = t.shape.iter().fold(1u64, |a, &d| a.saturating_mul(d));
            let is_expert = name.contains(".experts.") && !name.contains("shared_expert");
            if t.dtype == "U8" && name.ends_with("_blocks") {
                self.mxfp4 = true;
                self.add(name, elems.saturating_mul(2), is_expert);
            } else if t.dtype == "U8" && name.ends_with("_scales") {
                continue;
            } else {
                self.add(name, elems, is_expert);
                let n = self
                    .float_dtypes
                    .entry(t.dtype.to_ascii_lowercase())
                    .or_default();
                *n = n.saturating_add(elems);
            }
        }
    }

    /// total − experts × (1 − active/total experts).
    fn active(&self, experts: Option<u64>, active: Option<u64>) -> Option<u64> {
        let (e, a) = (experts?, active?);
        if self.experts == 0 || e == 0 || a >= e {
            return None;
        }
        let inactive = (self.experts as u128 * (e - a) as u128 / e as u128) as u64;
        Some(self.total - inactive)
    }

    fn safetensors_quantization(&self, method: Option<&str>) -> String {
        let main = self
            .float_dtypes
            .iter()
            .max_by_key(|(_, n)| **n)
            .map(|(d, _)| d.clone())
            .unwrap_or_else(|| "unknown".into());
        if self.mxfp4 {
            format!("mxfp4+{main}")
        } else if let Some(m) = method.filter(|m| !m.is_empty()) {
            format!("{}+{main}", m.to_ascii_lowercase())
        } else {
            main
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_safetensors(path: &Path, tensors: &[(&str, &str, Vec<u64>)]) {
        let mut header = serde_json::Map::new();
        let mut offset = 0u64;
        for (name, dtype, shape) in tensors {
            let size = match *dtype {
                "BF16" | "F16" => 2,
                "F32" => 4,
                _ => 1,
            } * shape.iter().product::<u64>();
            header.insert(
                name.to_string(),
                serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}),
            );
            offset += size;
        }
        let json = serde_json::to_vec(&header).unwrap();
        let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
        bytes.extend(json);
        bytes.resize(bytes.len() + offset as usize, 0);
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn gpt_oss_like_counts_mxfp4_and_active_params() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"model_type":"gpt_oss","hidden_size":64,"num_hidden_layers":2,"num_attention_heads":4,
                "num_key_value_heads":2,"head_dim":16,"max_position_embeddings":4096,
                "num_local_experts":4,"num_experts_per_tok":1,
                "quantization_config":{"quant_method":"mxfp4"}}"#,
        )
        .unwrap();
        write_safetensors(
            &dir.path().join("model-00000-of-00001.safetensors"),
            &[
                ("model.embed_tokens.weight", "BF16", vec![100, 64]),
                (
                    "model.layers.0.mlp.experts.gate_up_proj_blocks",
                    "U8",
                    vec![4, 128, 2, 16],
                ),
                (
                    "model.layers.0.mlp.experts.gate_up_proj_scales",
                    "U8",
                    vec![4, 128, 2],
                ),
                (
                    "model.layers.0.mlp.experts.gate_up_proj_bias",
                    "BF16",
                    vec![4, 128],
                ),
                ("model.layers.0.mlp.router.weight", "BF16", vec![4, 64]),
            ],
        );
        let m = inspect_dir(dir.path()).unwrap();
        let experts = 2 * 4 * 128 * 2 * 16 + 4 * 128;
        let total = 100 * 64 + experts + 4 * 64;
        assert_eq!(m.parameters, Some(total));
        assert_eq!(m.active_parameters, Some(total - experts * 3 / 4));
        assert_eq!(m.quantization, "mxfp4+bf16");
        assert_eq!(m.architecture.as_deref(), Some("gpt_oss"));
        assert_eq!((m.experts, m.experts_active), (Some(4), Some(1)));
        let kv = m.kv_bytes_per_token(2);
        assert_eq!(kv[0], (KvProfile::Default, 2 * 2 * 2 * 16 * 2));
        assert_eq!(kv[1], (KvProfile::KvInt8, 2 * 2 * 2 * (16 + 2)));
    }

    #[test]
    fn nemotron_h_counts_only_attention_layers_for_kv() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"model_type":"nemotron_h","hidden_size":32,"num_hidden_layers":4,"num_attention_heads":4,
                "num_key_value_heads":1,"hybrid_override_pattern":"M*M-"}"#,
        )
        .unwrap();
        write_safetensors(
            &dir.path().join("model.safetensors"),
            &[("w", "BF16", vec![8, 8])],
        );
        let m = inspect_dir(dir.path()).unwrap();
        assert_eq!(m.attention_layers, Some(1));
        assert_eq!(m.head_dim, Some(8));
        assert_eq!(m.quantization, "bf16");
        assert_eq!(m.kv_bytes_per_token(2)[0].1, 2 * 8 * 2);
    }

    #[test]
    fn corrupt_header_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        std::fs::write(dir.path().join("model.safetensors"), [255u8; 16]).unwrap();
        let err = inspect_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("corrupt safetensors header"), "{err}");
    }

    #[test]
    fn gguf_metadata_and_params() {
        use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
        use candle_core::{Device, Tensor};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny-Q8_0.gguf");
        let t = Tensor::zeros((4, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, GgmlDType::Q8_0).unwrap();
        let arch = gguf_file::Value::String("llama".into());
        let ctx = gguf_file::Value::U32(2048);
        let ftype = gguf_file::Value::U32(7);
        let heads = gguf_file::Value::U32(4);
        let emb = gguf_file::Value::U32(32);
        let mut f = std::fs::File::create(&path).unwrap();
        gguf_file::write(
            &mut f,
            &[
                ("general.architecture", &arch),
                ("llama.context_length", &ctx),
                ("general.file_type", &ftype),
                ("llama.attention.head_count", &heads),
                ("llama.embedding_length", &emb),
            ],
            &[("token_embd.weight", &q)],
        )
        .unwrap();
        drop(f);
        let m = inspect_gguf(&path).unwrap();
        assert_eq!(m.architecture.as_deref(), Some("llama"));
        assert_eq!(m.context_length, Some(2048));
        assert_eq!(m.parameters, Some(128));
        assert_eq!(m.quantization, "Q8_0");
        assert_eq!(m.tensor_types, BTreeMap::from([("Q8_0".to_string(), 1)]));
        assert_eq!(m.kv_heads, Some(4));
        assert_eq!(m.head_dim, Some(8));
        assert_eq!(m.kv_profiles, vec![KvProfile::Default]);
    }
}
