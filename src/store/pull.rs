//! `pull` as a library operation: repo info → file selection (quantization checked first, so a bad
//! token writes nothing) → lock → disk-space check → resumable downloads (or verified reuse of
//! HF-cache blobs) → inspection → manifest.json, written last.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::Context;

use super::lock::ModelLock;
use super::manifest::{FileEntry, GgufVariant, Manifest, Source, SCHEMA_VERSION};
use super::pull_state::{PullState, VerifiedFile};
use super::reference::ModelRef;
use super::{ModelFormat, Store};
use crate::hub::download::{self, part_path, Progress};
use crate::hub::select::{self, RepoFile, Selection, SAFETENSORS_INDEX};
use crate::hub::{hf_cache, HubClient, HubConfig};
use crate::model::inspect;

/// What a pull did, for the summary line.
#[derive(Debug, Clone)]
pub struct PullReport {
    pub name: String,
    pub dir: PathBuf,
    pub commit: String,
    pub format: ModelFormat,
    pub gguf_type: Option<String>,
    pub files: usize,
    pub total_size: u64,
    /// Bytes received over the network.
    pub downloaded: u64,
    /// Bytes taken from the Hugging Face cache instead of the network.
    pub reused: u64,
    /// Nothing had to be fetched.
    pub up_to_date: bool,
}

/// Pulls `reference` (`org/name[:token]`) at `revision` into `store`.
pub fn pull(
    store: &Store,
    reference: &str,
    revision: &str,
    progress: &dyn Progress,
) -> anyhow::Result<PullReport> {
    let (repo, token) = match ModelRef::parse(reference)? {
        ModelRef::Hub { repo, token } => (repo, token),
        other => anyhow::bail!(
            "'{other}' is a local path; `xllm pull` downloads from the Hub (`org/name`), local models run as they are"
        ),
    };
    let config = HubConfig::from_env();
    if config.offline {
        // Offline, a complete model is as good as pulled; anything else needs the network.
        if let Some(super::StoreEntry {
            state: super::EntryState::Ready(m),
            ..
        }) = store.find(&repo)?
        {
            if token.is_none() || super::resolve::open_model(reference).is_ok() {
                return Ok(PullReport {
                    name: repo,
                    dir: store.model_dir(&m.name),
                    commit: m.source.commit.clone(),
                    format: m.format,
                    gguf_type: None,
                    files: m.files.len(),
                    total_size: m.total_size(),
                    downloaded: 0,
                    reused: 0,
                    up_to_date: true,
                });
            }
        }
    }
    let client = HubClient::new(config)?;
    let info = client.repo_info(&repo, revision)?;
    let commit = info
        .sha
        .clone()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| revision.to_string());
    let gated = !matches!(
        info.gated,
        serde_json::Value::Null | serde_json::Value::Bool(false)
    );
    if gated && client.config().token.is_none() {
        return Err(crate::hub::HubError::Gated {
            repo,
            endpoint: client.config().endpoint.clone(),
            authenticated: false,
        }
        .into());
    }
    let selection = select::select_files(&repo, &info.siblings, token.as_ref())?;

    let dir = store.model_dir(&repo);
    let existed = dir.exists();
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let result = pull_into(
        store, &client, &repo, revision, &commit, selection, &dir, progress,
    );
    if result.is_err() && !existed {
        remove_if_nothing_downloaded(&dir);
    }
    result
}

/// A failed first pull that got no bytes (no access, network down) leaves no folder behind, so
/// `list` does not show a partial pull there is nothing to resume of.
fn remove_if_nothing_downloaded(dir: &Path) {
    let mut bytes = 0u64;
    let _ = super::for_each_file(dir, &mut |_, m| bytes += m.len());
    if bytes == 0 {
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[allow(clippy::too_many_arguments)]
fn pull_into(
    _store: &Store,
    client: &HubClient,
    repo: &str,
    revision: &str,
    commit: &str,
    mut selection: Selection,
    dir: &Path,
    progress: &dyn Progress,
) -> anyhow::Result<PullReport> {
    let (repo, commit, dir) = (repo.to_string(), commit.to_string(), dir.to_path_buf());
    let _lock = ModelLock::acquire(&dir, || {
        progress.note(&format!(
            "another `xllm pull` of {repo} is running; waiting for it to finish"
        ))
    })?;

    let previous = Manifest::read(&dir).ok().flatten();
    let mut state = PullState::read(&dir)?.unwrap_or_default();
    state.name = repo.clone();
    state.revision = revision.to_string();
    if let Some(m) = &previous {
        for f in &m.files {
            state
                .verified
                .entry(f.path.clone())
                .or_insert(VerifiedFile {
                    size: f.size,
                    sha256: f.sha256.clone(),
                    blob_id: None,
                });
        }
    }

    let is_done =
        |state: &PullState, f: &RepoFile| is_verified(&dir, state, f, previous.as_ref(), &commit);
    let everything_done = selection.files.iter().all(|f| is_done(&state, f));
    let same_variant = match (&previous, &selection.gguf) {
        (Some(m), Some((ty, _))) => m.gguf_variants.iter().any(|v| &v.quantization == ty),
        (Some(_), None) => true,
        (None, _) => false,
    };
    if everything_done
        && same_variant
        && previous.as_ref().is_some_and(|m| m.source.commit == commit)
    {
        let m = previous.expect("checked above");
        return Ok(PullReport {
            name: repo,
            dir,
            commit,
            format: m.format,
            gguf_type: selection.gguf.map(|g| g.0),
            files: m.files.len(),
            total_size: m.total_size(),
            downloaded: 0,
            reused: 0,
            up_to_date: true,
        });
    }

    // From here on the folder is a partial pull until the new manifest is written, unless this
    // pull only adds another GGUF variant beside intact ones (those stay usable meanwhile).
    state.write(&dir)?;
    let adds_variant_only = previous.as_ref().is_some_and(|m| {
        m.format == ModelFormat::Gguf
            && selection.format == ModelFormat::Gguf
            && m.source.commit == commit
            && selection
                .files
                .iter()
                .all(|f| !m.files.iter().any(|x| x.path == f.path))
    });
    if !adds_variant_only {
        let _ = std::fs::remove_file(dir.join(super::manifest::MANIFEST_FILE));
    }

    let mut downloaded = 0u64;
    let mut reused = 0u64;
    if let Some(index) = selection
        .files
        .iter()
        .find(|f| f.path == SAFETENSORS_INDEX)
        .cloned()
    {
        let (d, r) = fetch_one(
            client,
            &repo,
            &commit,
            &index,
            &dir,
            &mut state,
            previous.as_ref(),
            progress,
        )?;
        downloaded += d;
        reused += r;
        restrict_to_index(&mut selection, &dir.join(SAFETENSORS_INDEX), &repo)?;
    }

    check_disk_space(&dir, &selection, &state, previous.as_ref(), &commit)?;

    for file in selection.files.clone() {
        let (d, r) = fetch_one(
            client,
            &repo,
            &commit,
            &file,
            &dir,
            &mut state,
            previous.as_ref(),
            progress,
        )?;
        downloaded += d;
        reused += r;
    }

    if selection.format == ModelFormat::Safetensors {
        prune_stale_files(&dir, &selection)?;
    }
    let manifest = build_manifest(
        &repo,
        revision,
        &commit,
        client,
        &dir,
        &selection,
        &state,
        previous.as_ref(),
    )?;
    manifest.write(&dir)?;
    let _ = std::fs::remove_file(dir.join(super::pull_state::STATE_FILE));
    Ok(PullReport {
        name: repo,
        dir,
        commit,
        format: manifest.format,
        gguf_type: selection.gguf.map(|g| g.0),
        files: manifest.files.len(),
        total_size: manifest.total_size(),
        downloaded,
        reused,
        up_to_date: false,
    })
}

/// A file is done when it exists with the verified size and the same identity the Hub reports
/// now (LFS sha256, git blob id, or the same commit for small files).
fn is_verified(
    dir: &Path,
    state: &PullState,
    f: &RepoFile,
    previous: Option<&Manifest>,
    commit: &str,
) -> bool {
    let Some(v) = state.verified.get(&f.path) else {
        return false;
    };
    let on_disk = std::fs::metadata(dir.join(&f.path)).map(|m| m.len()).ok();
    if on_disk != Some(v.size) || f.size.is_some_and(|s| s != v.size) {
        return false;
    }
    if let Some(sha) = &f.sha256 {
        return sha.eq_ignore_ascii_case(&v.sha256);
    }
    if let (Some(a), Some(b)) = (&f.blob_id, &v.blob_id) {
        return a == b;
    }
    previous.is_some_and(|m| m.source.commit == commit)
}

#[allow(clippy::too_many_arguments)]
fn fetch_one(
    client: &HubClient,
    repo: &str,
    commit: &str,
    file: &RepoFile,
    dir: &Path,
    state: &mut PullState,
    previous: Option<&Manifest>,
    progress: &dyn Progress,
) -> anyhow::Result<(u64, u64)> {
    if is_verified(dir, state, file, previous, commit) {
        return Ok((0, 0));
    }
    let dest = dir.join(&file.path);
    if let Some(blob) = hf_cache::find_blob(repo, file) {
        progress.note(&format!(
            "{}: verifying the copy in the Hugging Face cache",
            file.path
        ));
        if hf_cache::adopt_blob(&blob, file, &dest)? {
            let size = std::fs::metadata(&dest)?.len();
            record(
                state,
                dir,
                file,
                size,
                file.sha256.clone().unwrap_or_default(),
            )?;
            let bar = progress.start_file(&file.path, Some(size), size);
            bar.finish();
            return Ok((0, size));
        }
        progress.note(&format!(
            "{}: the cached copy does not match; downloading",
            file.path
        ));
    }
    let got = download::download(client, repo, commit, file, &dest, progress)?;
    record(state, dir, file, got.size, got.sha256)?;
    Ok((got.fetched, 0))
}

fn record(
    state: &mut PullState,
    dir: &Path,
    file: &RepoFile,
    size: u64,
    sha256: String,
) -> anyhow::Result<()> {
    state.verified.insert(
        file.path.clone(),
        VerifiedFile {
            size,
            sha256,
            blob_id: file.blob_id.clone(),
        },
    );
    state.write(dir)
}

/// With a shard index, fetch exactly the shards it names (and fail if the repo lacks one).
fn restrict_to_index(selection: &mut Selection, index: &Path, repo: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(index)?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{SAFETENSORS_INDEX} of '{repo}' is not valid JSON"))?;
    let shards: BTreeSet<String> = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .map(|m| {
            m.values()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    if shards.is_empty() {
        return Ok(());
    }
    for shard in &shards {
        if !select::is_safe_relative_path(shard) {
            anyhow::bail!("refusing to pull '{repo}': its index names a shard that would escape the model folder: {shard:?}");
        }
        if !selection.files.iter().any(|f| &f.path == shard) {
            anyhow::bail!("'{repo}' is incomplete: {SAFETENSORS_INDEX} names '{shard}', which the repository does not have");
        }
    }
    selection
        .files
        .retain(|f| !f.path.ends_with(".safetensors") || shards.contains(&f.path));
    Ok(())
}

/// Refuses before downloading when the remaining bytes do not fit.
fn check_disk_space(
    dir: &Path,
    selection: &Selection,
    state: &PullState,
    previous: Option<&Manifest>,
    commit: &str,
) -> anyhow::Result<()> {
    let need: u64 = selection
        .files
        .iter()
        .filter(|f| !is_verified(dir, state, f, previous, commit))
        .map(|f| {
            let have = std::fs::metadata(part_path(&dir.join(&f.path)))
                .map(|m| m.len())
                .unwrap_or(0);
            f.size.unwrap_or(0).saturating_sub(have)
        })
        .sum();
    let have = fs4::available_space(dir)
        .with_context(|| format!("cannot read free space of {}", dir.display()))?;
    disk_space_verdict(need, have, dir)
}

/// The disk-space rule on its own, so it can be tested without filling a disk.
pub fn disk_space_verdict(need: u64, have: u64, dir: &Path) -> anyhow::Result<()> {
    if need > have {
        anyhow::bail!(
            "not enough disk space in {}: need {}, have {}; free some space or set XLLM_HOME to a larger disk",
            dir.display(),
            crate::store::human_bytes(need),
            crate::store::human_bytes(have)
        );
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn build_manifest(
    repo: &str,
    revision: &str,
    commit: &str,
    client: &HubClient,
    dir: &Path,
    selection: &Selection,
    state: &PullState,
    previous: Option<&Manifest>,
) -> anyhow::Result<Manifest> {
    let entry = |path: &str| -> anyhow::Result<FileEntry> {
        let v = state
            .verified
            .get(path)
            .with_context(|| format!("'{path}' was not verified"))?;
        Ok(FileEntry {
            path: path.to_string(),
            size: v.size,
            sha256: v.sha256.clone(),
        })
    };
    let mut files: Vec<FileEntry> = selection
        .files
        .iter()
        .map(|f| entry(&f.path))
        .collect::<anyhow::Result<_>>()?;
    let mut variants = Vec::new();
    let metadata;
    match &selection.gguf {
        None => metadata = inspect::inspect_dir(dir)?,
        Some((ty, main)) => {
            // Keep GGUF variants pulled earlier whose files are still intact.
            if let Some(prev) = previous.filter(|p| p.format == ModelFormat::Gguf) {
                for v in prev.gguf_variants.iter().filter(|v| &v.quantization != ty) {
                    let kept: Vec<&FileEntry> = prev
                        .files
                        .iter()
                        .filter(|f| gguf_set_of(&f.path) == gguf_set_of(&v.file))
                        .collect();
                    let intact = kept.iter().all(|f| {
                        std::fs::metadata(dir.join(&f.path)).is_ok_and(|m| m.len() == f.size)
                    });
                    if intact && !kept.is_empty() {
                        variants.push(v.clone());
                        for f in kept {
                            if !files.iter().any(|x| x.path == f.path) {
                                files.push(f.clone());
                            }
                        }
                    }
                }
            }
            let mut meta = inspect::inspect_gguf(&dir.join(main))?;
            let quant = if ty == "unknown" {
                meta.quantization.clone()
            } else {
                ty.clone()
            };
            meta.quantization = quant.clone();
            variants.insert(
                0,
                GgufVariant {
                    quantization: quant,
                    file: main.clone(),
                },
            );
            metadata = meta;
        }
    }
    Ok(Manifest {
        schema_version: SCHEMA_VERSION,
        name: repo.to_string(),
        source: Source {
            repo: repo.to_string(),
            revision: revision.to_string(),
            commit: commit.to_string(),
            endpoint: client.config().endpoint.clone(),
        },
        format: selection.format,
        metadata,
        gguf_variants: variants,
        files,
        pulled_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    })
}

/// Deletes files a previous revision left that the new selection does not have (old shards would
/// otherwise be counted by inspection and waste disk).
fn prune_stale_files(dir: &Path, selection: &Selection) -> anyhow::Result<()> {
    let keep: BTreeSet<PathBuf> = selection.files.iter().map(|f| dir.join(&f.path)).collect();
    let mut stale = Vec::new();
    super::for_each_file(dir, &mut |path, _| {
        if !keep.contains(path) && path.file_name() != Some(super::manifest::MANIFEST_FILE.as_ref())
        {
            stale.push(path.to_path_buf());
        }
    })?;
    for path in stale {
        std::fs::remove_file(&path)
            .with_context(|| format!("cannot remove stale {}", path.display()))?;
    }
    Ok(())
}

/// Split GGUF parts share the name before `-NNNNN-of-NNNNN`.
fn gguf_set_of(path: &str) -> &str {
    match path.find("-0000") {
        Some(i) if path.contains("-of-") => &path[..i],
        _ => path,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_space_refusal_names_both_numbers() {
        let err = disk_space_verdict(5_000_000_000, 1_200_000_000, Path::new("/s"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("need 5.0 GB, have 1.2 GB"), "{err}");
        assert!(disk_space_verdict(10, 10, Path::new("/s")).is_ok());
    }
}
