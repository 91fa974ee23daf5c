//! `xllm rm`.

use super::RmArgs;

pub fn run(_args: RmArgs) -> anyhow::Result<()> {
    anyhow::bail!("`xllm rm` is not implemented yet")
}
