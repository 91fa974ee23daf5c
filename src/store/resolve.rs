//! Turning what the user typed into something the loader can open.

use std::path::PathBuf;

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
