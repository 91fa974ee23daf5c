//! `xllm` binary: parses the command line and maps failures to exit codes.
//! All behaviour lives in the library (`xllm::cli`), so integration tests drive the same code.

fn main() -> std::process::ExitCode {
    xllm::cli::main()
}
