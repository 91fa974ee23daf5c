//! `xllm run`.

use super::RunArgs;

pub fn run(_args: RunArgs) -> anyhow::Result<()> {
    anyhow::bail!("`xllm run` is not implemented yet")
}
