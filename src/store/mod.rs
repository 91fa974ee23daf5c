//! The local model store under `$XLLM_HOME`: one folder per model with its files and manifest.json.

pub mod lock;
pub mod manifest;
pub mod pull;
pub mod pull_state;
pub mod reference;
pub mod resolve;

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::Context;

pub use manifest::Manifest;
pub use reference::ModelRef;
pub use resolve::{open_model, resolve_for_run, ModelFormat, OpenedModel, ResolvedModel};

/// Environment variable naming the store root.
pub const XLLM_HOME: &str = "XLLM_HOME";

/// The store: `<root>/models/<org>--<name>/`.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// A model folder's state.
#[derive(Debug, Clone)]
pub enum EntryState {
    /// A complete, verified pull.
    Ready(Box<Manifest>),
    /// A pull that did not finish (or is running); `xllm pull <name>` resumes it.
    Partial {
        revision: Option<String>,
        downloaded_bytes: u64,
    },
}

#[derive(Debug, Clone)]
pub struct StoreEntry {
    /// `org/name`.
    pub name: String,
    pub dir: PathBuf,
    pub state: EntryState,
    /// Last modification of the manifest (ready) or of the folder's newest file (partial).
    pub modified: SystemTime,
}

impl StoreEntry {
    pub fn is_ready(&self) -> bool {
        matches!(self.state, EntryState::Ready(_))
    }
}

impl Store {
    /// `$XLLM_HOME` if set, else the platform data directory (e.g. `~/.local/share/xllm`).
    pub fn open_default() -> anyhow::Result<Store> {
        if let Some(home) = std::env::var_os(XLLM_HOME).filter(|v| !v.is_empty()) {
            return Ok(Store::at(PathBuf::from(home)));
        }
        let dirs = directories::ProjectDirs::from("", "", "xllm").context(
            "cannot find a data directory for the model store (no home directory); set XLLM_HOME",
        )?;
        Ok(Store::at(dirs.data_dir().to_path_buf()))
    }

    pub fn at(root: PathBuf) -> Store {
        Store { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn models_dir(&self) -> PathBuf {
        self.root.join("models")
    }

    /// Folder of a repository. Hub names never contain `--`, so `org--name` is unambiguous.
    pub fn model_dir(&self, repo: &str) -> PathBuf {
        self.models_dir().join(repo.replace('/', "--"))
    }

    /// Every model folder, ready or partial, sorted by name.
    pub fn entries(&self) -> anyhow::Result<Vec<StoreEntry>> {
        let models = self.models_dir();
        let read = match std::fs::read_dir(&models) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", models.display())),
        };
        let mut out = Vec::new();
        for dir in read {
            let dir = dir?.path();
            if dir.is_dir() {
                if let Some(entry) = self.entry_at(&dir)? {
                    out.push(entry);
                }
            }
        }
        out.sort_by_key(|e| e.name.to_lowercase());
        Ok(out)
    }

    /// The entry for `repo`, if its folder exists.
    pub fn find(&self, repo: &str) -> anyhow::Result<Option<StoreEntry>> {
        let dir = self.model_dir(repo);
        if !dir.is_dir() {
            return Ok(None);
        }
        self.entry_at(&dir)
    }

    /// Deletes the folder of `repo` (complete or partial pull) and returns it with the bytes
    /// freed; `None` when it is not in the store. Refused while a pull of it holds the lock.
    pub fn remove(&self, repo: &str) -> anyhow::Result<Option<(StoreEntry, u64)>> {
        let Some(entry) = self.find(repo)? else {
            return Ok(None);
        };
        let Some(lock) = lock::ModelLock::try_acquire(&entry.dir)? else {
            anyhow::bail!(
                "'{repo}' is being pulled right now; stop that pull first, then remove it"
            );
        };
        let mut bytes = 0;
        for_each_file(&entry.dir, &mut |_, m| bytes += m.len())?;
        drop(lock);
        std::fs::remove_dir_all(&entry.dir)
            .map_err(|e| anyhow::anyhow!("cannot delete {}: {e}", entry.dir.display()))?;
        Ok(Some((entry, bytes)))
    }

    fn entry_at(&self, dir: &Path) -> anyhow::Result<Option<StoreEntry>> {
        let folder = dir
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        let fallback_name = folder.replace("--", "/");
        if let Some(manifest) = Manifest::read(dir)? {
            let modified = std::fs::metadata(dir.join(manifest::MANIFEST_FILE))
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            return Ok(Some(StoreEntry {
                name: manifest.name.clone(),
                dir: dir.to_path_buf(),
                state: EntryState::Ready(Box::new(manifest)),
                modified,
            }));
        }
        let state = pull_state::PullState::read(dir).ok().flatten();
        let (mut bytes, mut modified) = (0u64, SystemTime::UNIX_EPOCH);
        let mut any = false;
        for_each_file(dir, &mut |_, meta| {
            any = true;
            bytes += meta.len();
            if let Ok(m) = meta.modified() {
                modified = modified.max(m);
            }
        })?;
        if !any && state.is_none() {
            return Ok(None);
        }
        Ok(Some(StoreEntry {
            name: state
                .as_ref()
                .map(|s| s.name.clone())
                .unwrap_or(fallback_name),
            dir: dir.to_path_buf(),
            state: EntryState::Partial {
                revision: state.map(|s| s.revision),
                downloaded_bytes: bytes,
            },
            modified,
        }))
    }
}

/// Calls `f` for every regular file under `dir`, recursively, skipping xllm's bookkeeping files.
pub fn for_each_file(
    dir: &Path,
    f: &mut dyn FnMut(&Path, &std::fs::Metadata),
) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        let meta = entry.metadata()?;
        if meta.is_dir() {
            for_each_file(&path, f)?;
        } else if meta.is_file() {
            let name = entry.file_name();
            if name != lock::LOCK_FILE && name != pull_state::STATE_FILE {
                f(&path, &meta);
            }
        }
    }
    Ok(())
}

/// Decimal byte size as people read it: `4.7 GB`, `812 MB`, `12 kB`, `512 B`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["kB", "MB", "GB", "TB", "PB"];
    if n < 1000 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut unit = "B";
    for u in UNITS {
        if v < 1000.0 {
            break;
        }
        v /= 1000.0;
        unit = u;
    }
    if v < 10.0 {
        format!("{v:.1} {unit}")
    } else {
        format!("{v:.0} {unit}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_bytes_are_decimal() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(4_700_000_000), "4.7 GB");
        assert_eq!(human_bytes(812_300_000), "812 MB");
        assert_eq!(human_bytes(13_800_000_000), "14 GB");
    }

    #[test]
    fn partial_folders_are_listed_as_partial() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::at(root.path().to_path_buf());
        assert!(store.entries().unwrap().is_empty());
        let dir = store.model_dir("org/m");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("model.safetensors.part"), [0u8; 100]).unwrap();
        let entries = store.entries().unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].name, "org/m");
        assert!(matches!(
            entries[0].state,
            EntryState::Partial {
                downloaded_bytes: 100,
                ..
            }
        ));
    }
}
