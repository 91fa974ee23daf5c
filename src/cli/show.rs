//! `xllm show`: model, quantization (with KV-cache bytes per token for each profile) and files,
//! for store models and local paths alike. `show name:token` displays the resolved profile and
//! fails exactly as `run` would on a bad token.

use anyhow::Context;
use serde::Serialize;

use super::ShowArgs;
use crate::cli::list::human_params;
use crate::engine::embed::{describe, EmbeddingSpec};
use crate::model::inspect::ModelMetadata;
use crate::quant::KvProfile;
use crate::store::human_bytes;
use crate::store::manifest::{FileEntry, Source};
use crate::store::resolve::{format_name, open_model, OpenedModel};

/// Element size of the unquantized KV cache reported by `show` (bf16/f16, as on GPUs).
const DEFAULT_KV_ELEM_BYTES: usize = 2;

#[derive(Debug, Serialize)]
struct ShowJson<'a> {
    name: &'a str,
    format: &'static str,
    path: String,
    #[serde(flatten)]
    metadata: &'a ModelMetadata,
    selected: Selected<'a>,
    /// `completion` and/or `embedding`.
    capabilities: Vec<&'static str>,
    /// Embedding models: pooling, normalisation and input limit the folder declares.
    #[serde(skip_serializing_if = "Option::is_none")]
    embedding: Option<EmbeddingSpec>,
    /// KV-cache bytes per token for each profile (unquantized at 2 bytes per element).
    kv_bytes_per_token: Vec<KvBytes>,
    #[serde(skip_serializing_if = "Option::is_none")]
    source: Option<&'a Source>,
    #[serde(skip_serializing_if = "Option::is_none")]
    gguf_variants: Option<Vec<&'a str>>,
    files: Vec<FileEntry>,
}

#[derive(Debug, Serialize)]
struct Selected<'a> {
    kv_profile: KvProfile,
    gguf_type: Option<&'a str>,
}

#[derive(Debug, Serialize)]
struct KvBytes {
    profile: KvProfile,
    bytes: u64,
}

pub fn run(args: ShowArgs) -> anyhow::Result<()> {
    let model = open_model(&args.model)?;
    // The same file checks `run` makes before loading: `show` accepts no model `run` refuses.
    crate::engine::preflight::check(&crate::store::ResolvedModel {
        display_name: model.display_name.clone(),
        format: model.format,
        dir: model.dir.clone(),
        gguf_file: model.gguf_file.clone(),
        kv_profile: model.choice.kv_profile,
        gguf_type: model.choice.gguf_type.clone(),
    })
    .with_context(|| format!("model '{}' would not load", model.display_name))?;
    let files = files_of(&model)?;
    let (capabilities, embedding) = describe(&model.dir, model.metadata.architecture.as_deref());
    // An encoder keeps no KV cache: nothing to report per token.
    let keeps_kv = capabilities != ["embedding"];
    if args.json {
        let out = ShowJson {
            name: &model.display_name,
            format: format_name(model.format),
            path: model
                .gguf_file
                .as_ref()
                .unwrap_or(&model.dir)
                .display()
                .to_string(),
            metadata: &model.metadata,
            selected: Selected {
                kv_profile: model.choice.kv_profile,
                gguf_type: model.choice.gguf_type.as_deref(),
            },
            capabilities,
            embedding,
            kv_bytes_per_token: model
                .metadata
                .kv_bytes_per_token(DEFAULT_KV_ELEM_BYTES)
                .into_iter()
                .filter(|_| keeps_kv)
                .map(|(profile, bytes)| KvBytes { profile, bytes })
                .collect(),
            source: model.manifest.as_ref().map(|m| &m.source),
            gguf_variants: model
                .manifest
                .as_ref()
                .filter(|m| !m.gguf_variants.is_empty())
                .map(|m| {
                    m.gguf_variants
                        .iter()
                        .map(|v| v.quantization.as_str())
                        .collect()
                }),
            files,
        };
        return super::output::print_stdout(&format!("{}\n", serde_json::to_string_pretty(&out)?));
    }
    super::output::print_stdout(&render_text(
        &model,
        &files,
        &capabilities,
        embedding.as_ref(),
    ))
}

fn files_of(model: &OpenedModel) -> anyhow::Result<Vec<FileEntry>> {
    if let Some(m) = &model.manifest {
        return Ok(m.files.clone());
    }
    // Local paths have no manifest: list sizes, no hashes (hashing gigabytes to show them is too slow).
    let mut out = Vec::new();
    if let Some(f) = &model.gguf_file {
        out.push(FileEntry {
            path: f.file_name().unwrap_or_default().to_string_lossy().into(),
            size: std::fs::metadata(f)?.len(),
            sha256: String::new(),
        });
        return Ok(out);
    }
    crate::store::for_each_file(&model.dir, &mut |p, m| {
        let rel = p.strip_prefix(&model.dir).unwrap_or(p);
        out.push(FileEntry {
            path: rel.to_string_lossy().replace('\\', "/"),
            size: m.len(),
            sha256: String::new(),
        });
    })?;
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// `23 Mamba (M), 23 MoE (E), 6 attention (*)` for a Nemotron-H pattern (kinds that occur).
fn pattern_counts(pattern: &str) -> String {
    [
        ('M', "Mamba"),
        ('E', "MoE"),
        ('*', "attention"),
        ('-', "MLP"),
    ]
    .iter()
    .filter_map(|&(c, name)| {
        let n = pattern.chars().filter(|x| *x == c).count();
        (n > 0).then(|| format!("{n} {name} ({c})"))
    })
    .collect::<Vec<_>>()
    .join(", ")
}

fn render_text(
    model: &OpenedModel,
    files: &[FileEntry],
    capabilities: &[&str],
    embedding: Option<&EmbeddingSpec>,
) -> String {
    use std::fmt::Write;
    let m = &model.metadata;
    let mut s = String::new();
    let row = |s: &mut String, k: &str, v: String| {
        let _ = writeln!(s, "  {k:<20}{v}");
    };
    let opt = |v: Option<u64>| v.map(|x| x.to_string()).unwrap_or_else(|| "-".into());
    let _ = writeln!(s, "Model");
    row(&mut s, "name", model.display_name.clone());
    row(&mut s, "format", format_name(model.format).into());
    row(
        &mut s,
        "architecture",
        m.architecture.clone().unwrap_or_else(|| "-".into()),
    );
    let params = match (m.parameters, m.active_parameters) {
        (Some(p), Some(a)) => format!("{} ({} active)", human_params(p), human_params(a)),
        (Some(p), None) => human_params(p),
        _ => "-".into(),
    };
    row(&mut s, "parameters", params);
    row(&mut s, "context length", opt(m.context_length));
    row(&mut s, "embedding length", opt(m.embedding_length));
    let layers = match m.attention_layers {
        Some(a) => format!("{} ({a} with attention)", opt(m.layers)),
        None => opt(m.layers),
    };
    row(&mut s, "layers", layers);
    if let Some(pattern) = &m.layer_pattern {
        row(&mut s, "layer pattern", pattern_counts(pattern));
    }
    row(
        &mut s,
        "heads / KV heads",
        format!("{} / {}", opt(m.attention_heads), opt(m.kv_heads)),
    );
    row(&mut s, "head dim", opt(m.head_dim));
    if let Some(window) = m.sliding_window {
        row(&mut s, "sliding window", window.to_string());
    }
    if let (Some(total), Some(active)) = (m.experts, m.experts_active) {
        row(&mut s, "experts", format!("{active} active of {total}"));
    }
    if let Some(bytes) = m.recurrent_state_bytes {
        row(
            &mut s,
            "recurrent state",
            format!(
                "{} per sequence (Mamba conv + SSM, f32)",
                human_bytes(bytes)
            ),
        );
    }
    if !capabilities.is_empty() {
        let _ = writeln!(s, "\nCapabilities");
        for c in capabilities {
            let _ = writeln!(s, "  {c}");
        }
    }
    if let Some(e) = embedding {
        let _ = writeln!(s, "\nEmbedding");
        row(&mut s, "pooling", e.pooling.name());
        row(
            &mut s,
            "normalized",
            if e.normalize { "yes" } else { "no" }.into(),
        );
        if let Some(n) = e.max_tokens {
            row(&mut s, "max input tokens", n.to_string());
        }
    }
    let _ = writeln!(s, "\nQuantization");
    row(
        &mut s,
        "weights",
        model
            .choice
            .gguf_type
            .clone()
            .unwrap_or_else(|| m.quantization.clone()),
    );
    if !m.tensor_types.is_empty() {
        let types: Vec<String> = m
            .tensor_types
            .iter()
            .map(|(t, n)| format!("{t} ×{n}"))
            .collect();
        row(&mut s, "tensor types", types.join(", "));
    }
    if let Some(man) = model
        .manifest
        .as_ref()
        .filter(|x| x.gguf_variants.len() > 1)
    {
        let v: Vec<&str> = man
            .gguf_variants
            .iter()
            .map(|v| v.quantization.as_str())
            .collect();
        row(&mut s, "GGUF variants", v.join(", "));
    }
    row(
        &mut s,
        "KV profile",
        model.choice.kv_profile.token().to_string(),
    );
    let kv = m.kv_bytes_per_token(DEFAULT_KV_ELEM_BYTES);
    if !kv.is_empty() && capabilities != ["embedding"] {
        let _ = writeln!(s, "  KV cache per token:");
        for (p, bytes) in kv {
            let label = match p {
                KvProfile::Default => "default (bf16)".to_string(),
                other => other.token().to_string(),
            };
            let mark = if p == model.choice.kv_profile {
                "  <- selected"
            } else {
                ""
            };
            let _ = writeln!(s, "    {label:<18}{:>10}{mark}", human_bytes(bytes));
        }
    }
    if let Some(man) = &model.manifest {
        let _ = writeln!(s, "\nSource");
        row(&mut s, "repo", man.source.repo.clone());
        row(&mut s, "revision", man.source.revision.clone());
        row(&mut s, "commit", man.source.commit.clone());
        row(&mut s, "pulled", man.pulled_at.clone());
    }
    row(
        &mut s,
        "path",
        model
            .gguf_file
            .as_ref()
            .unwrap_or(&model.dir)
            .display()
            .to_string(),
    );
    let total: u64 = files.iter().map(|f| f.size).sum();
    let _ = writeln!(s, "\nFiles ({}, {})", files.len(), human_bytes(total));
    for f in files {
        let hash = if f.sha256.is_empty() {
            String::new()
        } else {
            format!("  sha256:{}", &f.sha256[..f.sha256.len().min(12)])
        };
        let _ = writeln!(s, "  {:<48}{:>10}{hash}", f.path, human_bytes(f.size));
    }
    s
}
