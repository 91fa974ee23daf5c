//! Writing command output to stdout without panicking when the reader goes away
//! (`xllm list | head` closes the pipe early; that is not an error).

use std::io::Write;

/// Writes `text` to stdout; a closed pipe ends the output quietly.
pub fn print_stdout(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}
