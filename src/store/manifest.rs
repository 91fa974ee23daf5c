//! `manifest.json`: what a completed pull left in a model folder. Written last and atomically
//! (temp file + rename), so its presence means every listed file was verified.

use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::ModelFormat;
use crate::model::inspect::ModelMetadata;

/// Bumped on incompatible changes; readers refuse newer schemas.
pub const SCHEMA_VERSION: u32 = 1;
pub const MANIFEST_FILE: &str = "manifest.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub schema_version: u32,
    /// `org/name` as pulled.
    pub name: String,
    pub source: Source,
    pub format: ModelFormat,
    #[serde(flatten)]
    pub metadata: ModelMetadata,
    /// GGUF variants present in the folder (GGUF models only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gguf_variants: Vec<GgufVariant>,
    pub files: Vec<FileEntry>,
    /// RFC 3339 time the pull completed.
    pub pulled_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    /// Hub repository id.
    pub repo: String,
    /// What was asked for (`--revision`).
    pub revision: String,
    /// The commit sha it resolved to.
    pub commit: String,
    pub endpoint: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GgufVariant {
    /// Canonical GGUF type, e.g. `Q4_K_M`.
    pub quantization: String,
    /// Path of the file to load, relative to the model folder (the first part of split files).
    pub file: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Path relative to the model folder, `/`-separated.
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

impl Manifest {
    pub fn total_size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// Reads and checks a manifest; `None` when the file does not exist.
    pub fn read(dir: &Path) -> anyhow::Result<Option<Manifest>> {
        let path = dir.join(MANIFEST_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let manifest: Manifest = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is corrupt; remove the model and pull it again",
                path.display()
            )
        })?;
        if manifest.schema_version > SCHEMA_VERSION {
            anyhow::bail!(
                "{} has schema version {} but this xllm understands up to {SCHEMA_VERSION}; upgrade xllm",
                path.display(),
                manifest.schema_version
            );
        }
        Ok(Some(manifest))
    }

    /// Writes the manifest atomically: a temp file in the same folder renamed over the old one.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        write_json_atomically(dir, MANIFEST_FILE, self)
    }
}

/// Serializes `value` to `dir/name` through a temp file + rename, so readers never see half a file.
pub fn write_json_atomically<T: Serialize>(
    dir: &Path,
    name: &str,
    value: &T,
) -> anyhow::Result<()> {
    use std::io::Write;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot create a temp file in {}", dir.display()))?;
    serde_json::to_writer_pretty(&mut tmp, value)?;
    tmp.write_all(b"\n")?;
    tmp.as_file().sync_all()?;
    tmp.persist(dir.join(name))
        .with_context(|| format!("cannot write {}", dir.join(name).display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Manifest::read(dir.path()).unwrap().is_none());
        let mut m = Manifest {
            schema_version: SCHEMA_VERSION,
            name: "org/m".into(),
            source: Source {
                repo: "org/m".into(),
                revision: "main".into(),
                commit: "abc".into(),
                endpoint: "https://huggingface.co".into(),
            },
            format: ModelFormat::Safetensors,
            metadata: ModelMetadata {
                quantization: "bf16".into(),
                ..Default::default()
            },
            gguf_variants: vec![],
            files: vec![FileEntry {
                path: "config.json".into(),
                size: 2,
                sha256: "00".into(),
            }],
            pulled_at: "2026-01-01T00:00:00Z".into(),
        };
        m.write(dir.path()).unwrap();
        assert_eq!(Manifest::read(dir.path()).unwrap().unwrap(), m);
        m.schema_version = SCHEMA_VERSION + 1;
        m.write(dir.path()).unwrap();
        let err = Manifest::read(dir.path()).unwrap_err().to_string();
        assert!(err.contains("upgrade xllm"), "{err}");
        std::fs::write(dir.path().join(MANIFEST_FILE), "{").unwrap();
        let err = format!("{:#}", Manifest::read(dir.path()).unwrap_err());
        assert!(err.contains("corrupt"), "{err}");
    }
}
