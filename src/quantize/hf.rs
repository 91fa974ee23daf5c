//! A Hugging Face safetensors checkpoint as a quantization source: tensor names mapped to GGUF's,
//! the architecture metadata llama.cpp needs (from config.json) and the tokenizer (from
//! tokenizer.json + tokenizer_config.json), as llama.cpp's convert_hf_to_gguf.py writes them.
//!
//! Supported: llama / mistral (GGUF arch `llama`, Q and K rows permuted to GGUF's rotary layout),
//! qwen2, qwen3, and BitNet b1.58 (`bitnet`, rows permuted as llama's): its BitLinear weights, packed
//! or bf16 masters, become their exact ternary values (held in memory, one byte per weight) with
//! the per-tensor scale written beside each as `<name>.scale` (llama.cpp's bitnet scale tensors),
//! so TQ1_0/TQ2_0 blocks store them with unit scales and nothing is rounded. Shards are memory-mapped; rows are converted to f32 a chunk at a time.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use half::bf16;
use memmap2::Mmap;
use safetensors::SafeTensors;

use super::gguf::{release_range, Metadata, Value};
use super::plan::ModelShape;
use super::source::{Source, SourceTensor};
use super::types::GgmlType;

mod gpt_oss;

/// A safetensors tensor as listed in a shard's header: name, shard, byte range, dtype, shape.
type RawTensor = (String, usize, usize, usize, safetensors::Dtype, Vec<usize>);

struct Shard {
    mmap: Mmap,
}

/// Where a source tensor's bytes are and how its rows are ordered.
struct Entry {
    shard: usize,
    /// Byte range in the shard's mapping.
    start: usize,
    end: usize,
    dtype: safetensors::Dtype,
    /// Q/K rotary permutation: number of heads (llama's `permute`), 0 = none.
    permute_heads: usize,
    /// BitNet ternary weights: levels (weight + 1) in source row order, instead of the bytes.
    levels: Option<std::sync::Arc<Vec<u8>>>,
    /// Every `stride`-th row of a larger tensor (gpt-oss's interleaved gate/up rows).
    split: Option<RowSplit>,
    /// gpt-oss MXFP4 experts: the `*_scales` range (shard, start, end); `start..end` above are the
    /// `*_blocks`. Rows are repacked into ggml's `block_mxfp4` as they are read.
    mxfp4_scales: Option<(usize, usize, usize)>,
}

/// Output row `r` of group `g = r / rows_per_group` is source row
/// `(g · rows_per_group + r % rows_per_group) · stride + offset`.
#[derive(Debug, Clone, Copy)]
struct RowSplit {
    rows_per_group: usize,
    stride: usize,
    offset: usize,
}

pub struct HfSource {
    dir: PathBuf,
    shards: Vec<Shard>,
    entries: Vec<Entry>,
    tensors: Vec<SourceTensor>,
    metadata: Metadata,
    shape: ModelShape,
}

fn cfg_u64(cfg: &serde_json::Value, keys: &[&str]) -> Option<u64> {
    let text = cfg.get("text_config");
    keys.iter().find_map(|k| {
        cfg.get(*k)
            .or_else(|| text.and_then(|t| t.get(*k)))
            .and_then(|v| v.as_u64())
    })
}

fn cfg_f64(cfg: &serde_json::Value, keys: &[&str]) -> Option<f64> {
    keys.iter()
        .find_map(|k| cfg.get(*k).and_then(|v| v.as_f64()))
}

/// GGUF architecture for a config.json `model_type`.
fn gguf_arch(model_type: &str) -> Option<&'static str> {
    Some(match model_type {
        "llama" | "mistral" => "llama",
        "qwen2" => "qwen2",
        "qwen3" => "qwen3",
        "bitnet" => "bitnet",
        "gpt_oss" => "gpt-oss",
        _ => return None,
    })
}

/// HF tensor name → GGUF name, for the llama family.
fn gguf_name(hf: &str) -> Option<String> {
    let direct = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(d) = direct {
        return Some(d.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let mapped = match tail {
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "self_attn.q_proj.bias" => "attn_q.bias",
        "self_attn.k_proj.bias" => "attn_k.bias",
        "self_attn.v_proj.bias" => "attn_v.bias",
        "self_attn.o_proj.bias" => "attn_output.bias",
        "self_attn.q_norm.weight" => "attn_q_norm.weight",
        "self_attn.k_norm.weight" => "attn_k_norm.weight",
        "self_attn.attn_sub_norm.weight" => "attn_sub_norm.weight",
        "mlp.ffn_sub_norm.weight" => "ffn_sub_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        _ => return None,
    };
    Some(format!("blk.{layer}.{mapped}"))
}

impl HfSource {
    pub fn open(dir: &Path) -> anyhow::Result<HfSource> {
        let cfg_path = dir.join("config.json");
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&cfg_path)
                .with_context(|| format!("cannot read {}", cfg_path.display()))?,
        )
        .with_context(|| format!("{} is not valid JSON", cfg_path.display()))?;
        let model_type = cfg.get("model_type").and_then(|v| v.as_str()).unwrap_or("");
        let Some(arch) = gguf_arch(model_type) else {
            bail!(
                "no tensor roles for architecture '{model_type}' yet (safetensors sources: llama, mistral, qwen2, qwen3, bitnet, gpt_oss; \
                 GGUF sources also gemma3)"
            );
        };
        let files = crate::model::safetensors::shard_files(dir)?;
        let mut shards = Vec::new();
        let mut raw: Vec<RawTensor> = Vec::new();
        for (si, path) in files.iter().enumerate() {
            let file = std::fs::File::open(path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            // SAFETY: read-only private mapping of a checkpoint that is not modified meanwhile.
            let mmap = unsafe { Mmap::map(&file) }
                .with_context(|| format!("cannot memory-map {}", path.display()))?;
            let (header_len, md) = SafeTensors::read_metadata(&mmap).map_err(|e| {
                anyhow::anyhow!(
                    "{} is not a valid safetensors file ({e}); it may be truncated or corrupt",
                    path.display()
                )
            })?;
            let data_start = 8 + header_len;
            for (name, info) in md.tensors() {
                let (s, e) = info.data_offsets;
                if data_start + e > mmap.len() {
                    bail!(
                        "{} is truncated: tensor '{name}' ends past the end of the file",
                        path.display()
                    );
                }
                raw.push((
                    name.clone(),
                    si,
                    data_start + s,
                    data_start + e,
                    info.dtype,
                    info.shape.clone(),
                ));
            }
            shards.push(Shard { mmap });
        }
        if arch == "gpt-oss" {
            return gpt_oss::open(dir, &cfg, shards, raw);
        }
        let n_head = cfg_u64(&cfg, &["num_attention_heads"])
            .context("config.json lacks num_attention_heads")? as usize;
        let n_head_kv = cfg_u64(&cfg, &["num_key_value_heads"]).unwrap_or(n_head as u64) as usize;
        let hidden = cfg_u64(&cfg, &["hidden_size"]).context("config.json lacks hidden_size")?;
        let n_layer = cfg_u64(&cfg, &["num_hidden_layers"])
            .context("config.json lacks num_hidden_layers")? as usize;
        let tied = cfg
            .get("tie_word_embeddings")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let mut entries = Vec::new();
        let mut tensors = Vec::new();
        raw.sort_by(|a, b| a.0.cmp(&b.0));
        let bitnet = if arch == "bitnet" {
            let layout = crate::arch::bitnet::BitLinearLayout::from_config(&cfg)?;
            if layout == crate::arch::bitnet::BitLinearLayout::Plain {
                bail!(
                    "this bitnet checkpoint has no quantization_config: its linear layers are plain, not ternary \
                     (xllm quantize reads BitNet checkpoints with packed ternary or master weights)"
                );
            }
            Some((
                crate::model::safetensors::SafetensorsWeights::open_dir(dir)?,
                layout,
            ))
        } else {
            None
        };
        let mut scales: Vec<(String, f32)> = Vec::new();
        for (name, shard, start, end, dtype, shape) in raw {
            if name.ends_with("rotary_emb.inv_freq") || (tied && name == "lm_head.weight") {
                continue;
            }
            if bitnet.is_some() && name.ends_with(".weight_scale") {
                continue; // written as `<gguf name>.scale` beside its weight
            }
            let bit_linear = bitnet.as_ref().filter(|_| {
                name.starts_with("model.layers.")
                    && [
                        "q_proj",
                        "k_proj",
                        "v_proj",
                        "o_proj",
                        "gate_proj",
                        "up_proj",
                        "down_proj",
                    ]
                    .iter()
                    .any(|p| name.ends_with(&format!(".{p}.weight")))
            });
            let Some(gname) = gguf_name(&name) else {
                bail!("tensor '{name}' has no GGUF name for architecture '{model_type}' (unsupported checkpoint layout)");
            };
            if let Some((weights, layout)) = bit_linear {
                let base = name.strip_suffix(".weight").expect("a weight");
                let (out, inp) = match (dtype, shape.as_slice()) {
                    (safetensors::Dtype::U8, [o, i]) => (o * 4, *i),
                    (_, [o, i]) => (*o, *i),
                    _ => bail!("tensor '{name}' has shape {shape:?}, expected a matrix"),
                };
                let t = crate::arch::bitnet::ternary_from_safetensors(
                    weights,
                    base,
                    *layout,
                    [out, inp],
                )?;
                let permute_heads = if name.contains("q_proj.") {
                    n_head
                } else if name.contains("k_proj.") {
                    n_head_kv
                } else {
                    0
                };
                if permute_heads > 0 && out % (2 * permute_heads) != 0 {
                    bail!("tensor '{name}' has {out} rows, not divisible into {permute_heads} rotary heads");
                }
                scales.push((gname.replace(".weight", ".scale"), t.scale));
                entries.push(Entry {
                    shard,
                    start,
                    end,
                    dtype: safetensors::Dtype::F32,
                    permute_heads,
                    levels: Some(std::sync::Arc::new(t.levels)),
                    split: None,
                    mxfp4_scales: None,
                });
                tensors.push(SourceTensor {
                    name: gname,
                    ne: vec![inp as u64, out as u64],
                    ty: GgmlType::F32,
                    keep_type: GgmlType::F32,
                });
                continue;
            }
            let ty = match dtype {
                safetensors::Dtype::F32 => GgmlType::F32,
                safetensors::Dtype::F16 => GgmlType::F16,
                safetensors::Dtype::BF16 => GgmlType::BF16,
                other => bail!("tensor '{name}' is {other:?}; only F32, F16 and BF16 safetensors can be quantized"),
            };
            let elems: usize = shape.iter().product();
            if elems * dtype.bitsize() / 8 != end - start {
                bail!(
                    "tensor '{name}' has {} bytes, expected {} for {shape:?}: the file is corrupt",
                    end - start,
                    elems * dtype.bitsize() / 8
                );
            }
            let permute_heads = if arch == "llama" || arch == "bitnet" {
                if name.contains("q_proj.") {
                    n_head
                } else if name.contains("k_proj.") {
                    n_head_kv
                } else {
                    0
                }
            } else {
                0
            };
            if permute_heads > 0 && shape[0] % (2 * permute_heads) != 0 {
                bail!(
                    "tensor '{name}' has {} rows, not divisible into {permute_heads} rotary heads",
                    shape[0]
                );
            }
            let ne: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
            entries.push(Entry {
                shard,
                start,
                end,
                dtype,
                permute_heads,
                levels: None,
                split: None,
                mxfp4_scales: None,
            });
            // BitNet's embedding and LM head are full precision in training: kept as stored.
            let keep_type =
                if bitnet.is_some() && (gname == "token_embd.weight" || gname == "output.weight") {
                    ty
                } else {
                    GgmlType::F32
                };
            tensors.push(SourceTensor {
                name: gname,
                ne,
                ty,
                keep_type,
            });
        }
        let mut metadata = Metadata::default();
        let a = |k: &str| format!("{arch}.{k}");
        metadata.set("general.architecture", Value::Str(arch.into()));
        metadata.set("general.type", Value::Str("model".into()));
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "model".into());
        metadata.set("general.name", Value::Str(name));
        metadata.set(&a("block_count"), Value::U32(n_layer as u32));
        let ctx = cfg_u64(&cfg, &["max_position_embeddings"]).unwrap_or(2048);
        metadata.set(&a("context_length"), Value::U32(ctx as u32));
        metadata.set(&a("embedding_length"), Value::U32(hidden as u32));
        if let Some(ff) = cfg_u64(&cfg, &["intermediate_size"]) {
            metadata.set(&a("feed_forward_length"), Value::U32(ff as u32));
        }
        metadata.set(&a("attention.head_count"), Value::U32(n_head as u32));
        metadata.set(&a("attention.head_count_kv"), Value::U32(n_head_kv as u32));
        let rope_params = cfg
            .get("rope_parameters")
            .or_else(|| cfg.get("rope_scaling"))
            .filter(|v| v.is_object());
        let theta = cfg_f64(&cfg, &["rope_theta"])
            .or_else(|| {
                rope_params
                    .and_then(|r| r.get("rope_theta"))
                    .and_then(|v| v.as_f64())
            })
            .unwrap_or(10000.0);
        metadata.set(&a("rope.freq_base"), Value::F32(theta as f32));
        let eps = cfg_f64(&cfg, &["rms_norm_eps"]).unwrap_or(1e-6);
        metadata.set(
            &a("attention.layer_norm_rms_epsilon"),
            Value::F32(eps as f32),
        );
        // convert_hf_to_gguf writes key/value lengths whenever config.json names head_dim.
        let explicit_head_dim = cfg_u64(&cfg, &["head_dim"]);
        let head_dim = explicit_head_dim.unwrap_or(hidden / n_head as u64);
        if explicit_head_dim.is_some() {
            metadata.set(&a("attention.key_length"), Value::U32(head_dim as u32));
            metadata.set(&a("attention.value_length"), Value::U32(head_dim as u32));
        }
        let vocab_size = cfg_u64(&cfg, &["vocab_size"]);
        if let Some(v) = vocab_size {
            metadata.set(&a("vocab_size"), Value::U32(v as u32));
        }
        metadata.set(&a("rope.dimension_count"), Value::U32(head_dim as u32));
        let mut extra_rope_freqs = None;
        if let Some(rp) = rope_params {
            let kind = rp
                .get("rope_type")
                .or_else(|| rp.get("type"))
                .and_then(|v| v.as_str())
                .unwrap_or("default");
            match kind {
                "default" => {}
                "linear" => {
                    let f = rp.get("factor").and_then(|v| v.as_f64()).unwrap_or(1.0);
                    metadata.set(&a("rope.scaling.type"), Value::Str("linear".into()));
                    metadata.set(&a("rope.scaling.factor"), Value::F32(f as f32));
                }
                "llama3" => {
                    extra_rope_freqs = Some(llama3_rope_factors(rp, theta, head_dim as usize))
                }
                other => bail!("rope scaling '{other}' is not supported by xllm quantize yet"),
            }
        }
        super::tokenizer_md::add_tokenizer(&mut metadata, dir, &cfg, vocab_size)?;
        let mut src = HfSource {
            dir: dir.to_path_buf(),
            shards,
            entries,
            tensors,
            metadata,
            shape: ModelShape {
                architecture: arch.into(),
                n_layer,
                n_head,
                n_head_kv,
                n_expert: 0,
            },
        };
        if let Some(factors) = extra_rope_freqs {
            src.push_generated("rope_freqs.weight", factors);
        }
        for (name, scale) in scales {
            src.push_generated(&name, vec![scale]);
        }
        Ok(src)
    }

    /// A tensor computed at conversion time (llama3's `rope_freqs`), kept in memory (tiny).
    fn push_generated(&mut self, name: &str, values: Vec<f32>) {
        let ne = vec![values.len() as u64];
        self.push_generated_shaped(name, values, ne);
    }

    /// [`Self::push_generated`] with dimensions `ne` (innermost first).
    fn push_generated_shaped(&mut self, name: &str, values: Vec<f32>, ne: Vec<u64>) {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let len = bytes.len();
        let mut anon = memmap2::MmapMut::map_anon(len.max(1)).expect("anonymous map");
        anon[..len].copy_from_slice(&bytes);
        let mmap = anon.make_read_only().expect("read-only map");
        self.shards.push(Shard { mmap });
        self.entries.push(Entry {
            shard: self.shards.len() - 1,
            start: 0,
            end: len,
            dtype: safetensors::Dtype::F32,
            permute_heads: 0,
            levels: None,
            split: None,
            mxfp4_scales: None,
        });
        self.tensors.push(SourceTensor {
            name: name.into(),
            ne,
            ty: GgmlType::F32,
            keep_type: GgmlType::F32,
        });
    }

    /// Source row for output row `r` (llama's rotary `permute`: per head, interleave the halves).
    fn source_row(e: &Entry, rows: usize, r: usize) -> usize {
        if let Some(s) = e.split {
            let (g, within) = (r / s.rows_per_group, r % s.rows_per_group);
            return (g * s.rows_per_group + within) * s.stride + s.offset;
        }
        if e.permute_heads == 0 {
            return r;
        }
        let per_head = rows / e.permute_heads;
        let half = per_head / 2;
        let (h, within) = (r / per_head, r % per_head);
        // output (h, i, j) with j in 0..2 comes from source (h, j, i)
        let (i, j) = (within / 2, within % 2);
        h * per_head + j * half + i
    }
}

/// llama3 rope frequency factors (convert_hf_to_gguf's LlamaModel.generate_extra_tensors).
fn llama3_rope_factors(rp: &serde_json::Value, base: f64, dim: usize) -> Vec<f32> {
    let g = |k: &str, d: f64| rp.get(k).and_then(|v| v.as_f64()).unwrap_or(d);
    let factor = g("factor", 8.0);
    let low = g("low_freq_factor", 1.0);
    let high = g("high_freq_factor", 4.0);
    let old_ctx = g("original_max_position_embeddings", 8192.0);
    let low_wavelen = old_ctx / low;
    let high_wavelen = old_ctx / high;
    (0..dim)
        .step_by(2)
        .map(|i| {
            // torch computes the frequencies in float32.
            let freq = 1.0f32 / (base as f32).powf(i as f32 / dim as f32);
            let wavelen = 2.0 * std::f64::consts::PI / freq as f64;
            let f = if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (old_ctx / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            f as f32
        })
        .collect()
}

impl Source for HfSource {
    fn metadata(&self) -> &Metadata {
        &self.metadata
    }
    fn tensors(&self) -> &[SourceTensor] {
        &self.tensors
    }
    fn shape(&self) -> ModelShape {
        self.shape.clone()
    }
    fn read_rows(&self, i: usize, r0: usize, out: &mut [f32]) -> anyhow::Result<()> {
        let t = &self.tensors[i];
        let e = &self.entries[i];
        let n = t.n_per_row();
        let rows = t.n_rows();
        if let Some(levels) = &e.levels {
            for (k, orow) in out.chunks_exact_mut(n).enumerate() {
                let sr = Self::source_row(e, rows, r0 + k);
                for (o, l) in orow.iter_mut().zip(&levels[sr * n..(sr + 1) * n]) {
                    *o = *l as f32 - 1.0;
                }
            }
            return Ok(());
        }
        if e.mxfp4_scales.is_some() {
            let raw = self.raw_rows(i, r0, r0 + out.len() / n)?;
            return super::blocks::dequantize(GgmlType::MXFP4, &raw, out);
        }
        let data = &self.shards[e.shard].mmap[e.start..e.end];
        let es = e.dtype.bitsize() / 8;
        if e.permute_heads != 0 && t.ne.len() == 1 {
            // A rotary-permuted bias: the permutation runs over its elements.
            let raw = self.raw_rows(i, 0, 1)?;
            return super::blocks::dequantize(t.ty, &raw, out);
        }
        for (k, orow) in out.chunks_exact_mut(n).enumerate() {
            let sr = Self::source_row(e, rows, r0 + k);
            let b = &data[sr * n * es..(sr + 1) * n * es];
            match e.dtype {
                safetensors::Dtype::F32 => {
                    for (o, c) in orow.iter_mut().zip(b.chunks_exact(4)) {
                        *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    }
                }
                safetensors::Dtype::F16 => super::blocks::f16_bytes_to_f32(b, orow),
                _ => {
                    for (o, c) in orow.iter_mut().zip(b.chunks_exact(2)) {
                        *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
                    }
                }
            }
        }
        Ok(())
    }
    fn raw_rows(&self, i: usize, r0: usize, r1: usize) -> anyhow::Result<Cow<'_, [u8]>> {
        let e = &self.entries[i];
        let t = &self.tensors[i];
        if e.levels.is_some() {
            let mut x = vec![0f32; (r1 - r0) * t.n_per_row()];
            self.read_rows(i, r0, &mut x)?;
            return Ok(Cow::Owned(x.iter().flat_map(|v| v.to_le_bytes()).collect()));
        }
        if let Some((shard, s0, s1)) = e.mxfp4_scales {
            let blocks = &self.shards[e.shard].mmap[e.start..e.end];
            let scales = &self.shards[shard].mmap[s0..s1];
            let groups = t.n_per_row() / crate::kernels::mxfp4::BLOCK_VALUES;
            let mut out =
                Vec::with_capacity((r1 - r0) * groups * crate::kernels::mxfp4::GGML_BLOCK_BYTES);
            for r in r0..r1 {
                let sr = Self::source_row(e, t.n_rows(), r);
                gpt_oss::push_ggml_row(
                    &blocks[sr * groups * 16..(sr + 1) * groups * 16],
                    &scales[sr * groups..(sr + 1) * groups],
                    &mut out,
                );
            }
            return Ok(Cow::Owned(out));
        }
        let rb = t.n_per_row() * (e.dtype.bitsize() / 8);
        let data = &self.shards[e.shard].mmap[e.start..e.end];
        if e.permute_heads == 0 && e.split.is_none() {
            return Ok(Cow::Borrowed(&data[r0 * rb..r1 * rb]));
        }
        let mut out = Vec::with_capacity((r1 - r0) * rb);
        if t.ne.len() == 1 {
            let es = e.dtype.bitsize() / 8;
            for k in 0..t.n_per_row() {
                let sk = Self::source_row(e, t.n_per_row(), k);
                out.extend_from_slice(&data[sk * es..(sk + 1) * es]);
            }
            return Ok(Cow::Owned(out));
        }
        // Rotary-permuted or split rows are gathered one by one (a chunk at most).
        for r in r0..r1 {
            let sr = Self::source_row(e, t.n_rows(), r);
            out.extend_from_slice(&data[sr * rb..(sr + 1) * rb]);
        }
        Ok(Cow::Owned(out))
    }
    fn release(&self, i: usize, r0: usize, r1: usize) {
        let e = &self.entries[i];
        let t = &self.tensors[i];
        if e.levels.is_some() {
            return;
        }
        if let Some((shard, s0, s1)) = e.mxfp4_scales {
            // Split experts read rows from all over the source: released with the last rows.
            if r1 == t.n_rows() {
                release_range(&self.shards[e.shard].mmap, e.start, e.end - e.start);
                release_range(&self.shards[shard].mmap, s0, s1 - s0);
            }
            return;
        }
        let rb = t.n_per_row() * e.dtype.bitsize() / 8;
        if e.permute_heads != 0 || e.split.is_some() {
            // Permuted rows come from all over the tensor: release it when the last rows are done.
            if r1 == t.n_rows() {
                release_range(&self.shards[e.shard].mmap, e.start, e.end - e.start);
            }
            return;
        }
        release_range(
            &self.shards[e.shard].mmap,
            e.start + r0 * rb,
            (r1 - r0) * rb,
        );
    }
    fn describe(&self) -> String {
        format!("safetensors {}", self.dir.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotary_permutation_matches_convert_hf_to_gguf() {
        // permute(w, n_head=2) on 8 rows: reshape(2, 2, 2).swapaxes(1, 2) -> rows 0,2,1,3,4,6,5,7
        let e = Entry {
            shard: 0,
            start: 0,
            end: 0,
            dtype: safetensors::Dtype::F32,
            permute_heads: 2,
            levels: None,
            split: None,
            mxfp4_scales: None,
        };
        let order: Vec<usize> = (0..8).map(|r| HfSource::source_row(&e, 8, r)).collect();
        assert_eq!(order, vec![0, 2, 1, 3, 4, 6, 5, 7]);
    }

    #[test]
    fn names_map_to_gguf() {
        assert_eq!(
            gguf_name("model.layers.3.self_attn.o_proj.weight").unwrap(),
            "blk.3.attn_output.weight"
        );
        assert_eq!(
            gguf_name("model.embed_tokens.weight").unwrap(),
            "token_embd.weight"
        );
        assert!(gguf_name("model.layers.0.mystery.weight").is_none());
    }
}
