//! `xllm perplexity`.

use super::PerplexityArgs;

pub fn run(_args: PerplexityArgs) -> anyhow::Result<()> {
    anyhow::bail!("`xllm perplexity` is not implemented yet")
}
