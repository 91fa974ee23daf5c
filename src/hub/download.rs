//! Resumable, verified download of one file: bytes go to `<file>.part`, a later attempt continues
//! from its length with `Range: bytes=N-`, and the file only takes its real name once its size and
//! (for LFS files) sha256 match what the Hub published.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use reqwest::StatusCode;
use sha2::{Digest, Sha256};

use super::select::RepoFile;
use super::HubClient;

/// Attempts per file when the connection drops; each continues where the last stopped.
pub const ATTEMPTS: usize = 3;

/// Receives progress; the CLI draws bars, tests and scripts can ignore it.
pub trait Progress {
    /// A file starts (or resumes at `done` bytes).
    fn start_file(&self, path: &str, total: Option<u64>, done: u64) -> Box<dyn FileProgress>;
    /// A one-line note for the user (waiting for a lock, resuming, reusing a cached blob...).
    fn note(&self, message: &str);
}

pub trait FileProgress {
    fn advance(&self, bytes: u64);
    /// The count restarts (the server ignored Range).
    fn restart(&self);
    fn finish(&self);
}

/// A progress sink that shows nothing.
pub struct NoProgress;

impl Progress for NoProgress {
    fn start_file(&self, _: &str, _: Option<u64>, _: u64) -> Box<dyn FileProgress> {
        Box::new(NoProgress)
    }
    fn note(&self, _: &str) {}
}

impl FileProgress for NoProgress {
    fn advance(&self, _: u64) {}
    fn restart(&self) {}
    fn finish(&self) {}
}

/// What a completed download produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Downloaded {
    pub size: u64,
    pub sha256: String,
    /// Bytes received over the network in this run (less than `size` after a resume).
    pub fetched: u64,
}

pub fn part_path(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".part");
    dest.with_file_name(name)
}

/// Downloads `file` of `repo` at `commit` into `dest`, resuming a `.part` left by an earlier run.
pub fn download(
    client: &HubClient,
    repo: &str,
    commit: &str,
    file: &RepoFile,
    dest: &Path,
    progress: &dyn Progress,
) -> anyhow::Result<Downloaded> {
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let part = part_path(dest);
    let mut fetched = 0u64;
    // What to verify against; the `resolve` headers fill in what the repo listing lacked.
    let mut file = file.clone();
    let file = &mut file;
    let mut last_err = None;
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            std::thread::sleep(Duration::from_millis(300 * attempt as u64));
        }
        match attempt_once(client, repo, commit, file, &part, progress, &mut fetched) {
            Ok(hash) => {
                let size = std::fs::metadata(&part)?.len();
                verify(file, &part, size, &hash)?;
                std::fs::rename(&part, dest)
                    .with_context(|| format!("cannot move {} into place", part.display()))?;
                return Ok(Downloaded {
                    size,
                    sha256: hash,
                    fetched,
                });
            }
            Err(AttemptError::Fatal(e)) => return Err(e),
            Err(AttemptError::Retry(e)) => {
                progress.note(&format!("{}: {e:#}; resuming", file.path));
                last_err = Some(e);
            }
        }
    }
    let e = last_err.expect("at least one attempt");
    Err(e.context(format!(
        "download of '{}' was interrupted; run the same `xllm pull` again to resume from where it stopped",
        file.path
    )))
}

enum AttemptError {
    /// The connection dropped: try again from the current length.
    Retry(anyhow::Error),
    /// An answer that another attempt would not change.
    Fatal(anyhow::Error),
}

fn attempt_once(
    client: &HubClient,
    repo: &str,
    commit: &str,
    file: &mut RepoFile,
    part: &Path,
    progress: &dyn Progress,
    fetched: &mut u64,
) -> Result<String, AttemptError> {
    let fatal = |e: anyhow::Error| AttemptError::Fatal(e);
    let mut have = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
    if file.size.is_some_and(|size| have > size) {
        have = 0;
    }
    let mut hasher = Sha256::new();
    if have > 0 {
        hash_prefix(part, have, &mut hasher).map_err(fatal)?;
    }
    let bar = progress.start_file(&file.path, file.size, have);
    if file.size == Some(have) && have > 0 {
        bar.finish();
        return Ok(hex::encode(hasher.finalize()));
    }
    let (mut resp, meta) = match client.get_file(repo, commit, &file.path, have) {
        Ok(r) => r,
        Err(e) if is_network(&e) => return Err(AttemptError::Retry(e)),
        Err(e) => return Err(fatal(e)),
    };
    if file.sha256.is_none() && meta.etag_is_linked {
        file.sha256 = meta
            .etag
            .filter(|e| e.len() == 64 && e.bytes().all(|b| b.is_ascii_hexdigit()))
            .map(|e| e.to_ascii_lowercase());
    }
    if file.size.is_none() {
        file.size = meta.linked_size;
    }
    let status = resp.status();
    let mut out = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(part)
        .with_context(|| format!("cannot write {}", part.display()))
        .map_err(fatal)?;
    let start = match status {
        StatusCode::PARTIAL_CONTENT => {
            // No Content-Range on a 206: trust that it honoured the range we asked for.
            let from = content_range_start(resp.headers()).or(Some(have));
            if from != Some(have) {
                // A range we did not ask for: start over rather than splice bytes wrongly.
                let _ = std::fs::remove_file(part);
                return Err(AttemptError::Retry(anyhow::anyhow!(
                    "server answered a different range ({from:?}, expected {have})"
                )));
            }
            have
        }
        StatusCode::RANGE_NOT_SATISFIABLE => {
            let _ = std::fs::remove_file(part);
            return Err(AttemptError::Retry(anyhow::anyhow!(
                "server refused to resume (HTTP 416); starting over"
            )));
        }
        _ => {
            if have > 0 {
                progress.note(&format!(
                    "{}: server ignored the resume request; starting over",
                    file.path
                ));
                bar.restart();
                hasher = Sha256::new();
            }
            0
        }
    };
    out.set_len(start).map_err(|e| fatal(e.into()))?;
    use std::io::Seek;
    out.seek(std::io::SeekFrom::Start(start))
        .map_err(|e| fatal(e.into()))?;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match resp.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let _ = out.flush();
                return Err(AttemptError::Retry(anyhow::anyhow!("connection lost: {e}")));
            }
        };
        out.write_all(&buf[..n])
            .with_context(|| format!("cannot write {}", part.display()))
            .map_err(fatal)?;
        hasher.update(&buf[..n]);
        *fetched += n as u64;
        bar.advance(n as u64);
    }
    out.sync_all().map_err(|e| fatal(e.into()))?;
    let len = out.metadata().map_err(|e| fatal(e.into()))?.len();
    if let Some(size) = file.size {
        if len < size {
            return Err(AttemptError::Retry(anyhow::anyhow!(
                "connection closed after {len} of {size} bytes"
            )));
        }
    }
    bar.finish();
    Ok(hex::encode(hasher.finalize()))
}

/// Size and sha256 against the Hub's numbers; a mismatch deletes the file.
fn verify(file: &RepoFile, part: &Path, size: u64, sha256: &str) -> anyhow::Result<()> {
    if let Some(expected) = file.size {
        if size != expected {
            let _ = std::fs::remove_file(part);
            anyhow::bail!(
                "'{}' has {size} bytes but the Hub says {expected}; the bad download was deleted, run `xllm pull` again",
                file.path
            );
        }
    }
    if let Some(expected) = &file.sha256 {
        if !expected.eq_ignore_ascii_case(sha256) {
            let _ = std::fs::remove_file(part);
            anyhow::bail!(
                "'{}' is corrupt: sha256 {sha256} does not match the Hub's {expected}; the bad download was deleted, run `xllm pull` again",
                file.path
            );
        }
    }
    Ok(())
}

fn hash_prefix(path: &Path, len: u64, hasher: &mut Sha256) -> anyhow::Result<()> {
    let mut f = File::open(path)?.take(len);
    std::io::copy(&mut f, hasher)?;
    Ok(())
}

/// sha256 of a whole file, as lowercase hex.
pub fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut hasher = Sha256::new();
    let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    std::io::copy(&mut f, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

fn content_range_start(headers: &reqwest::header::HeaderMap) -> Option<u64> {
    let v = headers.get(reqwest::header::CONTENT_RANGE)?.to_str().ok()?;
    let range = v.strip_prefix("bytes ")?;
    range.split('-').next()?.trim().parse().ok()
}

fn is_network(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<super::HubError>(),
            Some(super::HubError::Network { .. })
        )
    })
}
