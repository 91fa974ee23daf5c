//! `xllm show`.

use super::ShowArgs;

pub fn run(_args: ShowArgs) -> anyhow::Result<()> {
    anyhow::bail!("`xllm show` is not implemented yet")
}
