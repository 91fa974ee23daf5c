//! Opening the files of a model folder safely: paths named inside model files stay inside the
//! folder, and text files are regular files of a bounded size (a FIFO named `tokenizer.json`
//! would block a read forever; a symlink to `/dev/zero` would never end).

use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context};

/// Largest JSON or template file read whole (gpt-oss's tokenizer.json is 28 MB).
pub const MAX_TEXT_FILE: u64 = 512 << 20;

/// Reads a text file of the model, refusing anything but a regular file of at most `limit`
/// bytes.
pub fn read_text(path: &Path, limit: u64) -> anyhow::Result<String> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if !meta.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    if meta.len() > limit {
        bail!(
            "{} is {} bytes, more than the {limit} bytes accepted for it",
            path.display(),
            meta.len()
        );
    }
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// The folder that files of the model in `dir` may live in: `dir` itself, or for a Hugging Face
/// cache snapshot (`models--org--name/snapshots/<rev>/`, whose files are symlinks to
/// `../../blobs/<sha>`) the repo folder holding both.
fn containment_root(dir: &Path) -> PathBuf {
    let canonical = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    if let Some(snapshots) = canonical.parent() {
        if snapshots.file_name().is_some_and(|n| n == "snapshots") {
            if let Some(repo) = snapshots.parent() {
                if repo.join("blobs").is_dir() {
                    return repo.to_path_buf();
                }
            }
        }
    }
    canonical
}

/// The regular file that `name` (read from `source`, a file of the model) means inside `dir`.
/// Absolute paths, `..`, and symlinks resolving outside the model folder are refused: a model
/// file must not make us read (or map) files elsewhere on the machine.
pub fn contained_file(dir: &Path, name: &str, source: &Path) -> anyhow::Result<PathBuf> {
    let rel = Path::new(name);
    let plain = !name.is_empty()
        && !name.contains('\0')
        && rel
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if !plain {
        bail!(
            "{} names the file {name:?}, which is not a plain relative path inside the model folder",
            source.display()
        );
    }
    let path = dir.join(rel);
    check_inside(dir, &path, source)?;
    Ok(path)
}

/// `path` (a file found in `dir`) must be a regular file whose real location is inside the
/// model folder.
pub fn check_inside(dir: &Path, path: &Path, source: &Path) -> anyhow::Result<()> {
    let meta = std::fs::metadata(path).with_context(|| {
        format!(
            "{} names shard {} which is missing",
            source.display(),
            path.display()
        )
    })?;
    if !meta.is_file() {
        bail!(
            "{}: {} is not a regular file",
            source.display(),
            path.display()
        );
    }
    let real = path
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", path.display()))?;
    let root = containment_root(dir);
    if !real.starts_with(&root) {
        bail!(
            "{}: {} resolves to {}, outside the model folder {}",
            source.display(),
            path.display(),
            real.display(),
            root.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside_the_folder() {
        let outer = tempfile::tempdir().unwrap();
        let dir = outer.path().join("model");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("a.safetensors"), b"x").unwrap();
        std::fs::write(outer.path().join("secret"), b"x").unwrap();
        let src = dir.join("model.safetensors.index.json");
        assert!(contained_file(&dir, "a.safetensors", &src).is_ok());
        assert!(contained_file(&dir, "./a.safetensors", &src).is_ok());
        for bad in ["../secret", "/etc/passwd", "", "sub/../../secret"] {
            let e = contained_file(&dir, bad, &src).unwrap_err().to_string();
            assert!(e.contains("model.safetensors.index.json"), "{e}");
        }
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(outer.path().join("secret"), dir.join("link")).unwrap();
            let e = contained_file(&dir, "link", &src).unwrap_err().to_string();
            assert!(e.contains("outside the model folder"), "{e}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn hf_cache_snapshots_may_link_to_their_blobs() {
        let repo = tempfile::tempdir().unwrap();
        let blobs = repo.path().join("blobs");
        let snap = repo.path().join("snapshots").join("abc");
        std::fs::create_dir_all(&blobs).unwrap();
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(blobs.join("0123"), b"x").unwrap();
        std::os::unix::fs::symlink("../../blobs/0123", snap.join("model.safetensors")).unwrap();
        let src = snap.join("model.safetensors.index.json");
        assert!(contained_file(&snap, "model.safetensors", &src).is_ok());
    }

    #[test]
    fn text_files_are_bounded_regular_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        std::fs::write(&p, "{}").unwrap();
        assert_eq!(read_text(&p, 10).unwrap(), "{}");
        assert!(read_text(&p, 1)
            .unwrap_err()
            .to_string()
            .contains("more than"));
        assert!(read_text(dir.path(), 10).is_err());
    }
}
