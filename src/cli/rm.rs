//! `xllm rm`: deletes model folders (complete or partial) and says what it deleted.

use super::RmArgs;
use crate::error::NotFound;
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
        let Some((entry, bytes)) = store.remove(&repo)? else {
            missing.push(repo);
            continue;
        };
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
