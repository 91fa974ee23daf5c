//! `xllm list`.

use super::ListArgs;

pub fn run(_args: ListArgs) -> anyhow::Result<()> {
    anyhow::bail!("`xllm list` is not implemented yet")
}
