//! `xllm rm`: deletes model folders (complete or partial) and says what it deleted.

use super::RmArgs;
use crate::error::NotFound;
use crate::store::lock::ModelLock;
use crate::store::{human_bytes, ModelRef, Store};

pub fn run(args: RmArgs) -> anyhow::Result<()> {
    let store = Store::open_default()?;
    let mut missing = Vec::new();
    for name in &args.models {
        let repo = match ModelRef::parse(name)? {
            ModelRef::Hub { repo, .. } => repo,
            other => anyhow::bail!(
                "'{other}' is a local path; `xllm rm` only removes models from the store"
            ),
        };
        let Some(entry) = store.find(&repo)? else {
            missing.push(repo);
            continue;
        };
        let Some(lock) = ModelLock::try_acquire(&entry.dir)? else {
            anyhow::bail!(
                "'{repo}' is being pulled right now; stop that pull first, then remove it"
            );
        };
        let mut bytes = 0;
        crate::store::for_each_file(&entry.dir, &mut |_, m| bytes += m.len())?;
        drop(lock);
        std::fs::remove_dir_all(&entry.dir)
            .map_err(|e| anyhow::anyhow!("cannot delete {}: {e}", entry.dir.display()))?;
        let what = if entry.is_ready() {
            ""
        } else {
            " (partial download)"
        };
        println!("deleted {repo}{what}, {} freed", human_bytes(bytes));
    }
    if !missing.is_empty() {
        return Err(NotFound {
            message: format!("not in the store: {} (see `xllm list`)", missing.join(", ")),
        }
        .into());
    }
    Ok(())
}
