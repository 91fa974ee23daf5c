//! One lock file per model folder so two `xllm pull` (or a pull and an `rm`) of the same model
//! never write the same files at once. The OS drops the lock when a process dies, so a killed
//! pull never leaves a stale lock behind.

use std::fs::File;
use std::path::Path;

use anyhow::Context;
use fs4::fs_std::FileExt;

pub const LOCK_FILE: &str = ".xllm.lock";

/// Held for as long as the value lives.
#[derive(Debug)]
pub struct ModelLock {
    file: File,
}

impl ModelLock {
    /// Takes the lock without waiting; `None` if another process holds it.
    pub fn try_acquire(dir: &Path) -> anyhow::Result<Option<ModelLock>> {
        let file = open(dir)?;
        if FileExt::try_lock_exclusive(&file)? {
            Ok(Some(ModelLock { file }))
        } else {
            Ok(None)
        }
    }

    /// Takes the lock, calling `on_wait` once and blocking if another process holds it.
    pub fn acquire(dir: &Path, on_wait: impl FnOnce()) -> anyhow::Result<ModelLock> {
        if let Some(lock) = Self::try_acquire(dir)? {
            return Ok(lock);
        }
        on_wait();
        let file = open(dir)?;
        FileExt::lock_exclusive(&file)
            .with_context(|| format!("cannot lock {}", dir.join(LOCK_FILE).display()))?;
        Ok(ModelLock { file })
    }
}

impl Drop for ModelLock {
    fn drop(&mut self) {
        let _ = FileExt::unlock(&self.file);
    }
}

fn open(dir: &Path) -> anyhow::Result<File> {
    let path = dir.join(LOCK_FILE);
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open lock file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = ModelLock::try_acquire(dir.path())
            .unwrap()
            .expect("free lock");
        assert!(ModelLock::try_acquire(dir.path()).unwrap().is_none());
        drop(first);
        assert!(ModelLock::try_acquire(dir.path()).unwrap().is_some());
    }
}
