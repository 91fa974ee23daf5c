//! Turning what the user typed into something the loader can open.

use std::path::{Path, PathBuf};

use crate::quant::KvProfile;

/// On-disk format of a model's weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelFormat {
    Safetensors,
    Gguf,
}

/// A model ready to load: where its files are and which quantization profile applies.
#[derive(Debug, Clone)]
pub struct ResolvedModel {
    /// What to call it in messages (`org/name`, or the path given).
    pub display_name: String,
    pub format: ModelFormat,
    /// Folder holding config.json, tokenizer files, chat template and weights (safetensors), or
    /// the folder of the .gguf file.
    pub dir: PathBuf,
    /// The GGUF file to load (GGUF models only).
    pub gguf_file: Option<PathBuf>,
    /// KV-cache profile (always `Default` for GGUF models).
    pub kv_profile: KvProfile,
    /// GGUF weight type in use, e.g. `Q4_K_M` (GGUF models only).
    pub gguf_type: Option<String>,
}

use anyhow::Context;

use super::manifest::Manifest;
use super::reference::ModelRef;
use super::{EntryState, Store};
use crate::error::NotFound;
use crate::model::inspect::{self, ModelMetadata};
use crate::quant::{self, QuantChoice, QuantTarget};

/// A model found on disk with its metadata and resolved quantization; what `show` displays and
/// what [`resolve_for_run`] hands to the engines.
#[derive(Debug, Clone)]
pub struct OpenedModel {
    pub reference: ModelRef,
    pub display_name: String,
    pub format: ModelFormat,
    pub dir: PathBuf,
    pub gguf_file: Option<PathBuf>,
    pub metadata: ModelMetadata,
    /// Present for store models.
    pub manifest: Option<Manifest>,
    pub choice: QuantChoice,
}

/// Resolves a user reference (`org/name[:token]`, a local directory with config.json, or a local
/// .gguf file) to a complete model on disk, applying quantization-profile resolution
/// (suffix > manifest > none) and the typed errors. Never downloads. A name not in the store (or
/// only partially pulled) is a [`NotFound`] whose message says how to pull or resume.
pub fn resolve_for_run(reference: &str) -> anyhow::Result<ResolvedModel> {
    Ok(open_model(reference)?.resolved())
}

impl OpenedModel {
    /// The files and profile to run (what [`resolve_for_run`] returns).
    pub fn resolved(&self) -> ResolvedModel {
        ResolvedModel {
            display_name: self.display_name.clone(),
            format: self.format,
            dir: self.dir.clone(),
            gguf_file: self.gguf_file.clone(),
            kv_profile: self.choice.kv_profile,
            gguf_type: self.choice.gguf_type.clone(),
        }
    }
}

/// Like [`resolve_for_run`], keeping the metadata and manifest for display.
pub fn open_model(reference: &str) -> anyhow::Result<OpenedModel> {
    open_ref(ModelRef::parse(reference)?)
}

/// Opens an already parsed reference (the server parses client names with
/// [`ModelRef::parse_hub`], so they can only name store models).
pub fn open_ref(parsed: ModelRef) -> anyhow::Result<OpenedModel> {
    match &parsed {
        ModelRef::LocalDir { path, token } => {
            let metadata = inspect::inspect_dir(path)?;
            let target = QuantTarget {
                subject: format!("model '{}' (safetensors)", path.display()),
                format: ModelFormat::Safetensors,
                kv_profiles: metadata.kv_profiles.clone(),
                gguf_types: vec![],
                default_gguf_type: None,
            };
            let choice = quant::resolve(token.as_ref(), &target)?;
            Ok(OpenedModel {
                display_name: path.display().to_string(),
                format: ModelFormat::Safetensors,
                dir: path.clone(),
                gguf_file: None,
                metadata,
                manifest: None,
                choice,
                reference: parsed.clone(),
            })
        }
        ModelRef::LocalGguf { path, token } => {
            let metadata = inspect::inspect_gguf(path)?;
            let known = crate::quant::GGUF_TYPES.contains(&metadata.quantization.as_str());
            let types = if known {
                vec![metadata.quantization.clone()]
            } else {
                vec![]
            };
            let target = QuantTarget {
                subject: format!("file '{}' (gguf)", path.display()),
                format: ModelFormat::Gguf,
                kv_profiles: metadata.kv_profiles.clone(),
                default_gguf_type: types.first().cloned(),
                gguf_types: types,
            };
            let choice = quant::resolve(token.as_ref(), &target)?;
            let dir = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("."));
            Ok(OpenedModel {
                display_name: path.display().to_string(),
                format: ModelFormat::Gguf,
                dir,
                gguf_file: Some(path.clone()),
                metadata,
                manifest: None,
                choice,
                reference: parsed.clone(),
            })
        }
        ModelRef::Hub { repo, token } => {
            let store = Store::open_default()?;
            let entry = store.find(repo)?.ok_or_else(|| NotFound {
                message: format!(
                    "model '{repo}' is not in the store ({}); download it with `xllm pull {}`",
                    store.root().display(),
                    parsed
                ),
            })?;
            let manifest = match entry.state {
                EntryState::Ready(m) => *m,
                EntryState::Partial { .. } => {
                    return Err(NotFound {
                        message: format!(
                            "model '{repo}' is only partially downloaded; resume with `xllm pull {parsed}`"
                        ),
                    }
                    .into())
                }
            };
            if let Some(f) = manifest.files.iter().find(|f| {
                std::fs::metadata(entry.dir.join(&f.path))
                    .map(|m| m.len())
                    .ok()
                    != Some(f.size)
            }) {
                return Err(NotFound {
                    message: format!(
                        "model '{repo}' is damaged: '{}' is missing or has the wrong size; repair it with `xllm pull {repo}`",
                        f.path
                    ),
                }
                .into());
            }
            let gguf_types: Vec<String> = manifest
                .gguf_variants
                .iter()
                .map(|v| v.quantization.clone())
                .collect();
            let target = QuantTarget {
                subject: format!("model '{repo}' ({})", format_name(manifest.format)),
                format: manifest.format,
                kv_profiles: manifest.metadata.kv_profiles.clone(),
                default_gguf_type: (manifest.format == ModelFormat::Gguf)
                    .then(|| manifest.metadata.quantization.clone())
                    .filter(|q| gguf_types.contains(q)),
                gguf_types,
            };
            let choice = quant::resolve(token.as_ref(), &target).with_context(|| {
                match token {
                    Some(t @ quant::QuantToken::Gguf(_)) if manifest.format == ModelFormat::Gguf => {
                        format!("'{repo}:{t}' is not in the store; `xllm pull {repo}:{t}` fetches it if the repo ships it")
                    }
                    _ => format!("cannot use '{parsed}'"),
                }
            })?;
            let gguf_file = match (&choice.gguf_type, manifest.format) {
                (Some(t), ModelFormat::Gguf) => manifest
                    .gguf_variants
                    .iter()
                    .find(|v| &v.quantization == t)
                    .map(|v| entry.dir.join(&v.file)),
                (None, ModelFormat::Gguf) => manifest
                    .gguf_variants
                    .first()
                    .map(|v| entry.dir.join(&v.file)),
                _ => None,
            };
            let choice = QuantChoice {
                gguf_type: choice.gguf_type.or_else(|| {
                    (manifest.format == ModelFormat::Gguf)
                        .then(|| {
                            manifest
                                .gguf_variants
                                .first()
                                .map(|v| v.quantization.clone())
                        })
                        .flatten()
                }),
                ..choice
            };
            Ok(OpenedModel {
                display_name: repo.clone(),
                format: manifest.format,
                dir: entry.dir.clone(),
                gguf_file,
                metadata: manifest.metadata.clone(),
                manifest: Some(manifest),
                choice,
                reference: parsed.clone(),
            })
        }
    }
}

pub fn format_name(format: ModelFormat) -> &'static str {
    match format {
        ModelFormat::Safetensors => "safetensors",
        ModelFormat::Gguf => "gguf",
    }
}
