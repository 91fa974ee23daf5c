//! `.xllm-pull.json`: bookkeeping of an unfinished pull (what was asked, which files are already
//! verified), so `list` can name partial pulls and the next `pull` skips verified files.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

pub const STATE_FILE: &str = ".xllm-pull.json";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullState {
    pub name: String,
    pub revision: String,
    /// Files already downloaded and verified, by relative path.
    #[serde(default)]
    pub verified: BTreeMap<String, VerifiedFile>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifiedFile {
    pub size: u64,
    pub sha256: String,
    /// The Hub's git blob id, which identifies non-LFS files across revisions.
    #[serde(default)]
    pub blob_id: Option<String>,
}

impl PullState {
    pub fn read(dir: &Path) -> anyhow::Result<Option<PullState>> {
        match std::fs::read_to_string(dir.join(STATE_FILE)) {
            Ok(t) => Ok(serde_json::from_str(&t).ok()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        super::manifest::write_json_atomically(dir, STATE_FILE, self)
    }
}
