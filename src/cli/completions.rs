//! `xllm completions SHELL`: completions generated from the clap definitions. The copies in
//! `completions/` are kept in step by a test (tests/completions.rs).

use clap::CommandFactory;

use super::{Cli, CompletionsArgs};

/// Completion script for `shell` as text.
pub fn generate(shell: clap_complete::Shell) -> String {
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "xllm", &mut out);
    String::from_utf8(out).expect("clap_complete writes UTF-8")
}

pub fn run(args: CompletionsArgs) -> anyhow::Result<()> {
    print!("{}", generate(args.shell));
    Ok(())
}
