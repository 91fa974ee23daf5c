//! `xllm pull`.

use super::PullArgs;

pub fn run(_args: PullArgs) -> anyhow::Result<()> {
    anyhow::bail!("`xllm pull` is not implemented yet")
}
