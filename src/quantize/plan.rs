//! The quantization plan: each tensor's role and the type it is written in.
//!
//! Type choice follows llama.cpp's llama-quantize (`llama_tensor_get_type` in src/llama-quant.cpp)
//! for the file types we write, so a `Q4_K_M` from xllm has the same per-tensor mix as one from
//! llama.cpp: output/tied embeddings get Q6_K, some attn_v/ffn_down layers get more bits
//! (`use_more_bits`), and rows that do not divide by a type's block fall back (Q4_K → Q5_0, ...).
//! Tensors are planned in llama.cpp's order (by layer, then name), which its layer counters use.

use std::fmt;

use anyhow::bail;

use super::types::{FileType, GgmlType};

/// What a tensor does in the model; decides whether and how it is quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    TokenEmbedding,
    Output,
    AttnQ,
    AttnK,
    AttnV,
    AttnQkv,
    AttnOutput,
    FfnGate,
    FfnUp,
    FfnDown,
    /// Mixture-of-experts weights (3-D, one matrix per expert).
    Experts,
    /// The MoE router (`ffn_gate_inp`): kept in full precision.
    Router,
    /// Norm weights, biases, attention sinks and other 1-D tensors: never quantized.
    Norm,
    /// Mamba/SSM tensors kept exact: A, D, dt (and its bias), conv1d.
    SsmKept,
    /// SSM input/output projections: quantized like FFN weights.
    SsmProjection,
    /// Multi-token-prediction head weights.
    Mtp,
    Other,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::TokenEmbedding => "embeddings",
            Role::Output => "output",
            Role::AttnQ | Role::AttnK | Role::AttnV | Role::AttnQkv | Role::AttnOutput => {
                "attention"
            }
            Role::FfnGate | Role::FfnUp | Role::FfnDown => "ffn",
            Role::Experts => "experts",
            Role::Router => "router",
            Role::Norm => "norm/1-D",
            Role::SsmKept => "ssm (kept)",
            Role::SsmProjection => "ssm projection",
            Role::Mtp => "mtp",
            Role::Other => "other",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Architectures whose tensor roles are known (GGUF `general.architecture` names).
pub const SUPPORTED_ARCHITECTURES: [&str; 10] = [
    "llama",
    "bitnet",
    "qwen2",
    "qwen3",
    "gemma3",
    "gpt-oss",
    "nemotron_h",
    "nemotron_h_moe",
    "mamba2",
    "granitehybrid",
];

/// The hyperparameters llama-quantize's rules look at.
#[derive(Debug, Clone, Default)]
pub struct ModelShape {
    pub architecture: String,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub n_expert: usize,
}

impl ModelShape {
    fn n_gqa(&self) -> usize {
        self.n_head.checked_div(self.n_head_kv).unwrap_or(1)
    }
    fn is_70b(&self) -> bool {
        self.architecture == "llama" && self.n_layer == 80 && self.n_head != self.n_head_kv
    }
}

/// A tensor the plan is made for.
#[derive(Debug, Clone)]
pub struct PlanInput {
    pub name: String,
    pub ne: Vec<u64>,
    pub source_type: GgmlType,
    /// The type a tensor keeps when it is not quantized (F32 for float safetensors tensors).
    pub keep_type: GgmlType,
}

#[derive(Debug, Clone)]
pub struct PlannedTensor {
    pub name: String,
    pub role: Role,
    pub ne: Vec<u64>,
    pub source_type: GgmlType,
    pub target_type: GgmlType,
    /// Why the type differs from the mix's choice (row-size fallback), for `--dry-run`.
    pub note: Option<String>,
    pub bytes: u64,
}

/// The role of a tensor from its GGUF name.
pub fn role_of(name: &str, n_dims: usize) -> Role {
    let base = name
        .strip_prefix("blk.")
        .map_or(name, |rest| rest.split_once('.').map_or(rest, |(_, r)| r));
    if name == "token_embd.weight" || name == "per_layer_token_embd.weight" {
        return Role::TokenEmbedding;
    }
    if name == "output.weight" {
        return Role::Output;
    }
    if base.starts_with("nextn.") || name.starts_with("mtp.") {
        return Role::Mtp;
    }
    if base.starts_with("ssm_a") || base.starts_with("ssm_d") || base.starts_with("ssm_conv1d") {
        // ssm_a, ssm_d, ssm_dt (+ .bias, both spellings), ssm_conv1d (+ .bias)
        return Role::SsmKept;
    }
    if base.starts_with("ssm_in") || base.starts_with("ssm_out") {
        return if n_dims >= 2 {
            Role::SsmProjection
        } else {
            Role::Norm
        };
    }
    if base.starts_with("ffn_gate_inp") {
        return Role::Router;
    }
    if n_dims < 2 || base.contains("_norm") || !name.ends_with("weight") {
        return Role::Norm;
    }
    if base.contains("_exps") {
        return Role::Experts;
    }
    if base.starts_with("attn_qkv") {
        return Role::AttnQkv;
    }
    if base.starts_with("attn_q.") {
        return Role::AttnQ;
    }
    if base.starts_with("attn_k.") {
        return Role::AttnK;
    }
    if base.starts_with("attn_v.") {
        return Role::AttnV;
    }
    if base.starts_with("attn_output") {
        return Role::AttnOutput;
    }
    if base.starts_with("ffn_gate") {
        return Role::FfnGate;
    }
    if base.starts_with("ffn_up") {
        return Role::FfnUp;
    }
    if base.starts_with("ffn_down") {
        return Role::FfnDown;
    }
    Role::Other
}

/// llama.cpp's `tensor_allows_quantization` for the names our architectures use.
fn allows_quantization(name: &str, n_dims: usize) -> bool {
    n_dims >= 2
        && name.ends_with("weight")
        && !name.contains("_norm.weight")
        && !name.contains("ffn_gate_inp.weight")
        && !name.contains("ssm_conv1d")
        && !name.contains("altup")
        && !name.contains("laurel")
        && !name.contains("per_layer_model_proj")
        && !name.contains("attn_rel_b.weight")
        && name != "position_embd.weight"
        && name != "token_types.weight"
}

/// llama.cpp's sort order for tensors: layer number (non-layer tensors first), then name.
pub fn sort_like_llama_cpp(names: &mut [PlanInput]) {
    fn layer(n: &str) -> i64 {
        n.strip_prefix("blk.")
            .and_then(|r| r.split('.').next())
            .and_then(|d| d.parse().ok())
            .unwrap_or(-1)
    }
    names.sort_by(|a, b| {
        layer(&a.name)
            .cmp(&layer(&b.name))
            .then_with(|| a.name.cmp(&b.name))
    });
}

fn use_more_bits(i_layer: usize, n_layers: usize) -> bool {
    i_layer < n_layers / 8
        || i_layer >= 7 * n_layers / 8
        || (i_layer as i64 - (n_layers / 8) as i64) % 3 == 2
}

fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// The requested type cannot store a tensor whose rows do not divide by its block (legacy types
/// have no fallback in llama.cpp either). Typed so the CLI exits with the quantization status (3),
/// like an unknown `--type`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CannotHold {
    pub ty: GgmlType,
    pub tensor: String,
    pub row: usize,
}

impl std::fmt::Display for CannotHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{ty} cannot hold tensor '{}': its rows have {} elements, not a multiple of {ty}'s block of {}; \
             choose a K-quant mix (which falls back per tensor) or F16/BF16",
            self.tensor,
            self.row,
            self.ty.block_size(),
            ty = self.ty
        )
    }
}

impl std::error::Error for CannotHold {}

/// Plans every tensor (inputs must already be in llama.cpp order, see [`sort_like_llama_cpp`]).
/// `has_imatrix`: an importance matrix is given (llama-quantize then gives Q4_0/Q5_0 files'
/// first ffn_down layers Q4_1/Q5_1).
pub fn plan(
    shape: &ModelShape,
    ftype: FileType,
    inputs: &[PlanInput],
    has_imatrix: bool,
) -> anyhow::Result<Vec<PlannedTensor>> {
    if !SUPPORTED_ARCHITECTURES.contains(&shape.architecture.as_str()) {
        bail!(
            "no tensor roles for architecture '{}' yet; xllm quantize supports: {}",
            shape.architecture,
            SUPPORTED_ARCHITECTURES.join(", ")
        );
    }
    let base = ftype.base_type();
    let has_output = inputs.iter().any(|t| t.name == "output.weight");
    let n_attention_wv = inputs
        .iter()
        .filter(|t| matches!(role_of(&t.name, t.ne.len()), Role::AttnV | Role::AttnQkv))
        .count();
    let n_layer = shape.n_layer.max(1);
    let (mut i_attention_wv, mut i_ffn_down) = (0usize, 0usize);
    let mut out = Vec::with_capacity(inputs.len());
    for t in inputs {
        let n_dims = t.ne.len();
        let role = role_of(&t.name, n_dims);
        let mut note = None;
        let target = if role == Role::SsmKept {
            // A, D and dt stay F32; conv1d is never quantized (llama.cpp keeps it too).
            if t.keep_type.is_quantized() {
                t.keep_type
            } else {
                GgmlType::F32
            }
        } else if t.source_type == GgmlType::MXFP4 {
            // gpt-oss experts ship in MXFP4: kept as they are.
            GgmlType::MXFP4
        } else if !allows_quantization(&t.name, n_dims)
            || (shape.architecture == "bitnet"
                && matches!(role, Role::TokenEmbedding | Role::Output))
        {
            // BitNet trains its embedding and LM head at full precision: kept as stored.
            t.keep_type
        } else if !base.is_quantized() {
            base
        } else {
            let ne0 = t.ne[0] as usize;
            let mut ty = base;
            let is_output = role == Role::Output || (!has_output && role == Role::TokenEmbedding);
            let blk = |ty: GgmlType| ty.block_size();
            if is_output {
                if ne0 % blk(ty) != 0 {
                    ty = GgmlType::Q8_0;
                } else if ty != GgmlType::Q8_0 {
                    ty = GgmlType::Q6K;
                }
            } else if role == Role::TokenEmbedding {
                if matches!(ftype, FileType::TQ1_0 | FileType::TQ2_0) {
                    ty = GgmlType::Q4K;
                }
            } else if matches!(role, Role::AttnV | Role::AttnQkv) {
                ty = match ftype {
                    FileType::Q2K => {
                        if shape.n_gqa() >= 4 {
                            GgmlType::Q4K
                        } else {
                            GgmlType::Q3K
                        }
                    }
                    FileType::Q3KM => {
                        if i_attention_wv < 2 {
                            GgmlType::Q5K
                        } else {
                            GgmlType::Q4K
                        }
                    }
                    FileType::Q3KL => GgmlType::Q5K,
                    FileType::Q4KM | FileType::Q5KM
                        if use_more_bits(i_attention_wv, n_attention_wv) =>
                    {
                        GgmlType::Q6K
                    }
                    FileType::Q4KS if i_attention_wv < 4 => GgmlType::Q5K,
                    _ => ty,
                };
                if shape.is_70b() && matches!(ty, GgmlType::Q3K | GgmlType::Q4K) {
                    ty = GgmlType::Q5K;
                }
                if shape.n_expert == 8 {
                    ty = GgmlType::Q8_0;
                }
                i_attention_wv += 1;
            } else if role == Role::AttnK {
                if shape.n_expert == 8 {
                    ty = GgmlType::Q8_0;
                }
            } else if role == Role::FfnDown
                || (role == Role::Experts && t.name.contains("ffn_down"))
            {
                let i_layer = if shape.n_expert > 1 {
                    layer_of(&t.name).unwrap_or(i_ffn_down)
                } else {
                    i_ffn_down
                };
                ty = match ftype {
                    FileType::Q2K => GgmlType::Q3K,
                    FileType::Q3KM => {
                        if i_layer < n_layer / 16 {
                            GgmlType::Q5K
                        } else {
                            GgmlType::Q4K
                        }
                    }
                    FileType::Q3KL => GgmlType::Q5K,
                    FileType::Q4KM if use_more_bits(i_layer, n_layer) => GgmlType::Q6K,
                    FileType::Q5KM if use_more_bits(i_layer, n_layer) => GgmlType::Q6K,
                    FileType::Q4KS if i_layer < n_layer / 8 => GgmlType::Q5K,
                    FileType::Q4_0 if has_imatrix && i_layer < n_layer / 8 => GgmlType::Q4_1,
                    FileType::Q5_0 if has_imatrix && i_layer < n_layer / 8 => GgmlType::Q5_1,
                    _ => ty,
                };
                i_ffn_down += 1;
            } else if role == Role::AttnOutput {
                if shape.n_expert == 8 {
                    if matches!(
                        ftype,
                        FileType::Q2K
                            | FileType::Q3KS
                            | FileType::Q3KM
                            | FileType::Q4KS
                            | FileType::Q4KM
                    ) {
                        ty = GgmlType::Q5K;
                    }
                } else {
                    ty = match ftype {
                        FileType::Q2K => GgmlType::Q3K,
                        FileType::Q3KM => GgmlType::Q4K,
                        FileType::Q3KL => GgmlType::Q5K,
                        _ => ty,
                    };
                }
            }
            // Rows that do not divide by the block size (llama.cpp's tensor_type_fallback).
            if ne0 % ty.block_size() != 0 {
                let fallback = match ty {
                    GgmlType::Q2K | GgmlType::Q3K | GgmlType::TQ1_0 | GgmlType::TQ2_0 => {
                        GgmlType::Q4_0
                    }
                    GgmlType::Q4K => GgmlType::Q5_0,
                    GgmlType::Q5K => GgmlType::Q5_1,
                    GgmlType::Q6K => GgmlType::Q8_0,
                    other => {
                        return Err(CannotHold {
                            ty: other,
                            tensor: t.name.clone(),
                            row: ne0,
                        }
                        .into())
                    }
                };
                let chosen = if ne0 % fallback.block_size() != 0 {
                    GgmlType::F16
                } else {
                    fallback
                };
                note = Some(format!(
                    "rows of {ne0} do not divide by {}: {ty} falls back to {chosen}",
                    ty.block_size()
                ));
                ty = chosen;
            }
            ty
        };
        if target != t.source_type && target.is_quantized() && !target.can_quantize_to() {
            bail!(
                "tensor '{}' would need type {target}, which xllm cannot write",
                t.name
            );
        }
        if target != t.source_type && !t.source_type.can_dequantize() {
            bail!(
                "tensor '{}' is stored as {}, which xllm cannot convert (it can only copy it unchanged)",
                t.name,
                t.source_type
            );
        }
        let elems: u64 = t.ne.iter().product();
        let bytes = match target.row_bytes(t.ne[0] as usize) {
            Some(rb) => rb as u64 * (elems / t.ne[0].max(1)),
            None => bail!("tensor '{}' cannot be stored as {target}", t.name),
        };
        out.push(PlannedTensor {
            name: t.name.clone(),
            role,
            ne: t.ne.clone(),
            source_type: t.source_type,
            target_type: target,
            note,
            bytes,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama_inputs(n_layer: usize, hidden: u64, ff: u64, tied: bool) -> Vec<PlanInput> {
        let mut v = vec![];
        let t = |name: String, ne: Vec<u64>| PlanInput {
            name,
            ne,
            source_type: GgmlType::F32,
            keep_type: GgmlType::F32,
        };
        v.push(t("token_embd.weight".into(), vec![hidden, 1000]));
        if !tied {
            v.push(t("output.weight".into(), vec![hidden, 1000]));
        }
        v.push(t("output_norm.weight".into(), vec![hidden]));
        for i in 0..n_layer {
            for (n, ne) in [
                ("attn_norm.weight", vec![hidden]),
                ("attn_q.weight", vec![hidden, hidden]),
                ("attn_k.weight", vec![hidden, hidden / 4]),
                ("attn_v.weight", vec![hidden, hidden / 4]),
                ("attn_output.weight", vec![hidden, hidden]),
                ("ffn_norm.weight", vec![hidden]),
                ("ffn_gate.weight", vec![hidden, ff]),
                ("ffn_up.weight", vec![hidden, ff]),
                ("ffn_down.weight", vec![ff, hidden]),
            ] {
                v.push(t(format!("blk.{i}.{n}"), ne));
            }
        }
        sort_like_llama_cpp(&mut v);
        v
    }

    fn shape(n_layer: usize) -> ModelShape {
        ModelShape {
            architecture: "llama".into(),
            n_layer,
            n_head: 8,
            n_head_kv: 2,
            n_expert: 0,
        }
    }

    fn types_of<'a>(p: &'a [PlannedTensor], suffix: &str) -> Vec<&'a str> {
        p.iter()
            .filter(|t| t.name.ends_with(suffix))
            .map(|t| t.target_type.name().leak() as &str)
            .collect()
    }

    #[test]
    fn q4_k_m_mix_matches_llama_quantize_rules() {
        let p = plan(
            &shape(16),
            FileType::Q4KM,
            &llama_inputs(16, 512, 1536, false),
            false,
        )
        .unwrap();
        // use_more_bits(i, 16): i < 2, i >= 14, (i-2) % 3 == 2 -> 0,1,4,7,10,13,14,15
        let v = types_of(&p, "attn_v.weight");
        let want: Vec<&str> = (0..16)
            .map(|i| {
                if [0, 1, 4, 7, 10, 13, 14, 15].contains(&i) {
                    "Q6_K"
                } else {
                    "Q4_K"
                }
            })
            .collect();
        assert_eq!(v, want);
        assert_eq!(types_of(&p, "ffn_down.weight"), want);
        assert_eq!(types_of(&p, "attn_output.weight"), vec!["Q4_K"; 16]);
        let out = p.iter().find(|t| t.name == "output.weight").unwrap();
        assert_eq!(out.target_type, GgmlType::Q6K);
        assert_eq!(types_of(&p, "token_embd.weight"), vec!["Q4_K"]);
        assert!(types_of(&p, "_norm.weight").iter().all(|t| *t == "F32"));
    }

    #[test]
    fn tied_embeddings_take_the_output_rule_and_odd_rows_fall_back() {
        // SmolLM2-like: hidden 576 (not a multiple of 256), tied embeddings.
        let p = plan(
            &shape(4),
            FileType::Q4KM,
            &llama_inputs(4, 576, 1536, true),
            false,
        )
        .unwrap();
        let embd = p.iter().find(|t| t.name == "token_embd.weight").unwrap();
        assert_eq!(embd.target_type, GgmlType::Q8_0);
        let q = p.iter().find(|t| t.name == "blk.1.attn_q.weight").unwrap();
        assert_eq!(q.target_type, GgmlType::Q5_0);
        assert!(q.note.as_deref().unwrap().contains("falls back"));
        // ffn_down rows are 1536 = 6 x 256: no fallback (layer 1 of 4 gets no extra bits).
        let d = p
            .iter()
            .find(|t| t.name == "blk.1.ffn_down.weight")
            .unwrap();
        assert_eq!(d.target_type, GgmlType::Q4K);
    }

    #[test]
    fn legacy_types_refuse_rows_they_cannot_hold_and_unknown_archs_are_named() {
        let err = plan(
            &shape(1),
            FileType::Q8_0,
            &llama_inputs(1, 48, 64, false),
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("cannot hold") && err.contains("48"), "{err}");
        let mut s = shape(1);
        s.architecture = "rwkv7".into();
        let err = plan(&s, FileType::Q8_0, &llama_inputs(1, 64, 64, false), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("rwkv7") && err.contains("gemma3"), "{err}");
    }

    #[test]
    fn ssm_tensors_keep_precision_in_both_spellings() {
        for (name, ne, want) in [
            ("blk.0.ssm_a", vec![8u64], Role::SsmKept),
            ("blk.0.ssm_d", vec![8], Role::SsmKept),
            ("blk.0.ssm_dt.bias", vec![8], Role::SsmKept),
            ("blk.0.ssm_dt", vec![8], Role::SsmKept),
            ("blk.0.ssm_conv1d.weight", vec![4, 256], Role::SsmKept),
            ("blk.0.ssm_in.weight", vec![256, 512], Role::SsmProjection),
            ("blk.0.ffn_gate_inp.weight", vec![256, 8], Role::Router),
            ("blk.0.ffn_up_exps.weight", vec![256, 512, 8], Role::Experts),
        ] {
            assert_eq!(role_of(name, ne.len()), want, "{name}");
        }
    }
}
