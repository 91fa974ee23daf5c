//! `xllm bench`.

use super::BenchArgs;

pub fn run(_args: BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("`xllm bench` is not implemented yet")
}
