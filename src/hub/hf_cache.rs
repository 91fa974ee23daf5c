//! Reuse of blobs already in the user's Hugging Face cache
//! (`$HF_HOME/hub/models--org--name/blobs/<sha256>`): a verified hard link (or copy) instead of a
//! second download of the same gigabytes.

use std::path::{Path, PathBuf};

use super::download::{part_path, sha256_file};
use super::select::RepoFile;

/// The cached blob for an LFS file of `repo`, if one with the right size exists.
pub fn find_blob(repo: &str, file: &RepoFile) -> Option<PathBuf> {
    let sha = file.sha256.as_deref()?;
    if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let folder = format!("models--{}", repo.replace('/', "--"));
    let blob = hf_hub::resolve_cache_dir()
        .join(folder)
        .join("blobs")
        .join(sha);
    let len = std::fs::metadata(&blob).ok()?.len();
    (file.size.is_none_or(|s| s == len)).then_some(blob)
}

/// Places a verified copy of `blob` at `dest` (hard link when on the same file system). Returns
/// false, leaving nothing behind, when the blob's sha256 is not what the Hub published.
pub fn adopt_blob(blob: &Path, file: &RepoFile, dest: &Path) -> anyhow::Result<bool> {
    let Some(expected) = file.sha256.as_deref() else {
        return Ok(false);
    };
    if !sha256_file(blob)?.eq_ignore_ascii_case(expected) {
        return Ok(false);
    }
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let tmp = part_path(dest);
    let _ = std::fs::remove_file(&tmp);
    if std::fs::hard_link(blob, &tmp).is_err() {
        std::fs::copy(blob, &tmp)?;
    }
    std::fs::rename(&tmp, dest)?;
    Ok(true)
}
