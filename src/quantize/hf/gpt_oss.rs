//! gpt-oss checkpoints (`model_type: gpt_oss`) as a quantization source, laid out as llama.cpp's
//! convert_hf_to_gguf.py (`GptOssModel`) writes them: llama.cpp's tensor names, the MXFP4 experts
//! repacked into ggml's `block_mxfp4` (GGUF type 39) with no value changed, the interleaved
//! `gate_up_proj` rows (gate even, up odd) split into `ffn_gate_exps` / `ffn_up_exps` (biases
//! likewise), and the `gpt-oss.*` metadata keys llama.cpp (and our `config_from_gguf`) read.
//! The experts stream: each chunk of rows is repacked from the mapped shards as it is written.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context};
use half::{bf16, f16};
use safetensors::Dtype;

use super::{cfg_f64, cfg_u64, Entry, HfSource, RawTensor, RowSplit, Shard};
use crate::kernels::mxfp4::{BLOCK_BYTES, BLOCK_VALUES};
use crate::quantize::gguf::{Metadata, Value};
use crate::quantize::plan::ModelShape;
use crate::quantize::source::SourceTensor;
use crate::quantize::types::GgmlType;

/// Appends one row of ggml `block_mxfp4`s (scale byte, then 16 code bytes whose byte `j` holds
/// element `j` in the low nibble and `j + 16` in the high one) from the checkpoint's layout
/// (separate scales; byte `j` holds elements `2j` and `2j + 1`).
pub(super) fn push_ggml_row(blocks: &[u8], scales: &[u8], out: &mut Vec<u8>) {
    for (b, s) in blocks.chunks_exact(BLOCK_BYTES).zip(scales) {
        out.push(*s);
        let code = |e: usize| (b[e / 2] >> (4 * (e % 2))) & 0x0f;
        for j in 0..BLOCK_BYTES {
            out.push(code(j) | (code(j + BLOCK_BYTES) << 4));
        }
    }
}

/// llama.cpp's name for a gpt-oss tensor that maps one to one (experts are handled apart).
fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let mapped = match tail {
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "post_attention_norm.weight",
        "self_attn.sinks" => "attn_sinks.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "self_attn.q_proj.bias" => "attn_q.bias",
        "self_attn.k_proj.bias" => "attn_k.bias",
        "self_attn.v_proj.bias" => "attn_v.bias",
        "self_attn.o_proj.bias" => "attn_output.bias",
        "mlp.router.weight" => "ffn_gate_inp.weight",
        "mlp.router.bias" => "ffn_gate_inp.bias",
        "mlp.experts.down_proj_bias" => "ffn_down_exps.bias",
        _ => return None,
    };
    Some(format!("blk.{layer}.{mapped}"))
}

fn float_type(name: &str, dtype: Dtype) -> anyhow::Result<GgmlType> {
    Ok(match dtype {
        Dtype::F32 => GgmlType::F32,
        Dtype::F16 => GgmlType::F16,
        Dtype::BF16 => GgmlType::BF16,
        other => {
            bail!("tensor '{name}' is {other:?}; gpt-oss dense tensors must be F32, F16 or BF16")
        }
    })
}

/// The values of a small float tensor (a bias), as f32.
fn floats(bytes: &[u8], dtype: Dtype) -> Vec<f32> {
    match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
    }
}

/// Builds the source for a gpt-oss folder whose shards are already mapped (`raw`: their tensors).
pub(super) fn open(
    dir: &Path,
    cfg: &serde_json::Value,
    shards: Vec<Shard>,
    mut raw: Vec<RawTensor>,
) -> anyhow::Result<HfSource> {
    let need = |k: &str| cfg_u64(cfg, &[k]).with_context(|| format!("config.json lacks {k}"));
    let hidden = need("hidden_size")?;
    let n_layer = need("num_hidden_layers")? as usize;
    let n_head = need("num_attention_heads")? as usize;
    let n_head_kv = cfg_u64(cfg, &["num_key_value_heads"]).unwrap_or(n_head as u64) as usize;
    let head_dim = cfg_u64(cfg, &["head_dim"]).unwrap_or(hidden / n_head.max(1) as u64);
    let ff = need("intermediate_size")? as usize;
    let n_expert = need("num_local_experts")? as usize;
    let n_used = cfg_u64(cfg, &["num_experts_per_tok", "experts_per_token"])
        .context("config.json lacks num_experts_per_tok")?;
    let tied = cfg
        .get("tie_word_embeddings")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);

    raw.sort_by(|a, b| a.0.cmp(&b.0));
    let by_name: HashMap<&str, &RawTensor> = raw.iter().map(|t| (t.0.as_str(), t)).collect();
    let mut entries = Vec::new();
    let mut tensors = Vec::new();
    let mut generated: Vec<(String, Vec<f32>, Vec<u64>)> = Vec::new();
    let plain = |shard, start, end, dtype| Entry {
        shard,
        start,
        end,
        dtype,
        permute_heads: 0,
        levels: None,
        split: None,
        mxfp4_scales: None,
    };
    for (name, shard, start, end, dtype, shape) in &raw {
        let (name, shard, start, end, dtype) = (name.as_str(), *shard, *start, *end, *dtype);
        if name.ends_with("rotary_emb.inv_freq")
            || (tied && name == "lm_head.weight")
            || name.ends_with("_scales")
        {
            continue; // scales are read with their blocks
        }
        if let Some(base) = name.strip_suffix("_blocks") {
            // `<layer>.mlp.experts.{gate_up,down}_proj`: u8 [experts, rows, groups, 16].
            let (layer, kind) = base
                .strip_prefix("model.layers.")
                .and_then(|r| r.split_once(".mlp.experts."))
                .with_context(|| format!("tensor '{name}' is not a gpt-oss expert tensor"))?;
            let [e, rows, groups, 16] = shape[..] else {
                bail!("tensor '{name}' has shape {shape:?}, expected [experts, rows, groups, 16]");
            };
            let scales_name = format!("{base}_scales");
            let Some((_, sshard, s0, s1, sdtype, sshape)) = by_name.get(scales_name.as_str())
            else {
                bail!("tensor '{scales_name}' is missing (the scales of '{name}')");
            };
            if dtype != Dtype::U8 || *sdtype != Dtype::U8 || sshape[..] != [e, rows, groups] {
                bail!(
                    "'{name}' ({dtype:?} {shape:?}) and '{scales_name}' ({sdtype:?} {sshape:?}) are not \
                     MXFP4 blocks [experts, rows, groups, 16] (u8) with scales [experts, rows, groups] (u8)"
                );
            }
            if end - start != e * rows * groups * BLOCK_BYTES || s1 - s0 != e * rows * groups {
                bail!(
                    "tensor '{name}' or its scales have the wrong byte count: the file is corrupt"
                );
            }
            let n = (groups * BLOCK_VALUES) as u64;
            let mxfp4 = |gname: String, split: Option<RowSplit>, out_rows: usize| {
                (
                    Entry {
                        split,
                        mxfp4_scales: Some((*sshard, *s0, *s1)),
                        ..plain(shard, start, end, Dtype::U8)
                    },
                    SourceTensor {
                        name: gname,
                        ne: vec![n, out_rows as u64, e as u64],
                        ty: GgmlType::MXFP4,
                        keep_type: GgmlType::MXFP4,
                    },
                )
            };
            match kind {
                "gate_up_proj" => {
                    if rows % 2 != 0 {
                        bail!("tensor '{name}' has {rows} rows, not gate and up interleaved");
                    }
                    // Rows alternate gate, up (convert_hf_to_gguf: `[:, ::2]` and `[:, 1::2]`).
                    for (offset, part) in [(0, "gate"), (1, "up")] {
                        let split = RowSplit {
                            rows_per_group: rows / 2,
                            stride: 2,
                            offset,
                        };
                        let (en, t) = mxfp4(
                            format!("blk.{layer}.ffn_{part}_exps.weight"),
                            Some(split),
                            rows / 2,
                        );
                        entries.push(en);
                        tensors.push(t);
                    }
                }
                "down_proj" => {
                    let (en, t) = mxfp4(format!("blk.{layer}.ffn_down_exps.weight"), None, rows);
                    entries.push(en);
                    tensors.push(t);
                }
                other => bail!("tensor '{name}': unknown expert projection '{other}'"),
            }
            continue;
        }
        if let Some(prefix) = name.strip_suffix(".mlp.experts.gate_up_proj_bias") {
            let layer = prefix.strip_prefix("model.layers.").unwrap_or(prefix);
            let [e, two_ff] = shape[..] else {
                bail!("tensor '{name}' has shape {shape:?}, expected [experts, 2·intermediate]");
            };
            if two_ff % 2 != 0 || end - start != e * two_ff * dtype.bitsize() / 8 {
                bail!(
                    "tensor '{name}' has shape {shape:?} and {} bytes: the file is corrupt",
                    end - start
                );
            }
            let _ = float_type(name, dtype)?;
            let all = floats(&shards[shard].mmap[start..end], dtype);
            for (offset, part) in [(0, "gate"), (1, "up")] {
                let values: Vec<f32> = all.iter().skip(offset).step_by(2).copied().collect();
                generated.push((
                    format!("blk.{layer}.ffn_{part}_exps.bias"),
                    values,
                    vec![(two_ff / 2) as u64, e as u64],
                ));
            }
            continue;
        }
        if name.contains(".mlp.experts.") && !name.ends_with("down_proj_bias") {
            bail!(
                "tensor '{name}': gpt-oss experts must be MXFP4 (`*_blocks` + `*_scales`, as openai ships them); \
                 dequantized expert checkpoints are not supported"
            );
        }
        let Some(gname) = gguf_name(name) else {
            bail!("tensor '{name}' has no GGUF name for gpt-oss (unsupported checkpoint layout)");
        };
        let ty = float_type(name, dtype)?;
        let elems: usize = shape.iter().product();
        if elems * dtype.bitsize() / 8 != end - start {
            bail!(
                "tensor '{name}' has {} bytes, expected {} for {shape:?}: the file is corrupt",
                end - start,
                elems * dtype.bitsize() / 8
            );
        }
        entries.push(plain(shard, start, end, dtype));
        tensors.push(SourceTensor {
            name: gname,
            ne: shape.iter().rev().map(|&d| d as u64).collect(),
            ty,
            keep_type: GgmlType::F32,
        });
    }
    let experts = tensors.iter().filter(|t| t.ty == GgmlType::MXFP4).count();
    if experts != 3 * n_layer {
        bail!(
            "found {experts} MXFP4 expert tensors, expected 3 per layer for {n_layer} layers \
             (gate_up_proj and down_proj `*_blocks` + `*_scales` in every layer)"
        );
    }

    // The keys convert_hf_to_gguf writes for gpt-oss, in its order.
    let mut md = Metadata::default();
    let a = |k: &str| format!("gpt-oss.{k}");
    md.set("general.architecture", Value::Str("gpt-oss".into()));
    md.set("general.type", Value::Str("model".into()));
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "model".into());
    md.set("general.name", Value::Str(name));
    let u32v = |v: u64| Value::U32(v as u32);
    md.set(&a("block_count"), u32v(n_layer as u64));
    let ctx = cfg_u64(cfg, &["max_position_embeddings"]).unwrap_or(131072);
    md.set(&a("context_length"), u32v(ctx));
    md.set(&a("embedding_length"), u32v(hidden));
    md.set(&a("feed_forward_length"), u32v(ff as u64));
    md.set(&a("attention.head_count"), u32v(n_head as u64));
    md.set(&a("attention.head_count_kv"), u32v(n_head_kv as u64));
    if let Some(rope) = cfg.get("rope_scaling").filter(|v| v.is_object()) {
        let kind = rope
            .get("rope_type")
            .or_else(|| rope.get("type"))
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        let f = |k: &str| rope.get(k).and_then(|v| v.as_f64());
        match kind {
            "yarn" => {
                md.set(&a("rope.scaling.type"), Value::Str("yarn".into()));
                md.set(
                    &a("rope.scaling.factor"),
                    Value::F32(f("factor").unwrap_or(1.0) as f32),
                );
                if let Some(n) = rope
                    .get("original_max_position_embeddings")
                    .and_then(|v| v.as_u64())
                {
                    md.set(&a("rope.scaling.original_context_length"), u32v(n));
                }
                if let Some(v) = f("beta_fast") {
                    md.set(&a("rope.scaling.yarn_beta_fast"), Value::F32(v as f32));
                }
                if let Some(v) = f("beta_slow") {
                    md.set(&a("rope.scaling.yarn_beta_slow"), Value::F32(v as f32));
                }
            }
            "default" => {}
            other => bail!("gpt-oss rope scaling '{other}' is not supported (only yarn)"),
        }
    }
    let theta = cfg_f64(cfg, &["rope_theta"]).unwrap_or(150000.0);
    md.set(&a("rope.freq_base"), Value::F32(theta as f32));
    let eps = cfg_f64(cfg, &["rms_norm_eps"]).unwrap_or(1e-5);
    md.set(
        &a("attention.layer_norm_rms_epsilon"),
        Value::F32(eps as f32),
    );
    md.set(&a("expert_count"), u32v(n_expert as u64));
    md.set(&a("expert_used_count"), u32v(n_used));
    md.set(&a("attention.key_length"), u32v(head_dim));
    md.set(&a("attention.value_length"), u32v(head_dim));
    if let Some(w) = cfg_u64(cfg, &["sliding_window"]) {
        md.set(&a("attention.sliding_window"), u32v(w));
    }
    md.set(&a("expert_feed_forward_length"), u32v(ff as u64));
    let vocab_size = cfg_u64(cfg, &["vocab_size"]);
    crate::quantize::tokenizer_md::add_tokenizer(&mut md, dir, cfg, vocab_size)?;

    let mut src = HfSource {
        dir: dir.to_path_buf(),
        shards,
        entries,
        tensors,
        metadata: md,
        shape: ModelShape {
            architecture: "gpt-oss".into(),
            n_layer,
            n_head,
            n_head_kv,
            n_expert,
        },
    };
    for (name, values, ne) in generated {
        src.push_generated_shaped(&name, values, ne);
    }
    Ok(src)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ggml_blocks_round_trip_through_the_kernel_repack() {
        // Two blocks of distinct codes: our repack, then the kernel's inverse, gives them back.
        let blocks: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(37) ^ 0x5a).collect();
        let scales = [120u8, 131];
        let mut ggml = Vec::new();
        push_ggml_row(&blocks, &scales, &mut ggml);
        assert_eq!(ggml.len(), 34);
        let (b, s) = crate::kernels::mxfp4::from_ggml_blocks(&ggml).unwrap();
        assert_eq!((b, s), (blocks, scales.to_vec()));
    }

    #[test]
    fn names_follow_llama_cpp() {
        assert_eq!(
            gguf_name("model.layers.2.post_attention_layernorm.weight").unwrap(),
            "blk.2.post_attention_norm.weight"
        );
        assert_eq!(
            gguf_name("model.layers.0.self_attn.sinks").unwrap(),
            "blk.0.attn_sinks.weight"
        );
        assert_eq!(
            gguf_name("model.layers.1.mlp.router.bias").unwrap(),
            "blk.1.ffn_gate_inp.bias"
        );
        assert!(gguf_name("model.layers.1.mlp.experts.gate_up_proj_blocks").is_none());
    }
}
