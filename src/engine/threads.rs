//! The CPU worker pool every command runs in.

use anyhow::Context;

/// Runs `command` on a rayon pool of `threads` threads (all cores by default).
///
/// The command runs *inside* the pool, not beside it: candle's CPU ops (softmax, norms, RoPE,
/// quantized matmul) and our kernels split their work with rayon, and a parallel call made from a
/// thread outside the pool must hand the work over and sleep until a worker finishes it — two
/// context switches per op, hundreds per decoded token. From a worker, the work starts in place
/// and the other workers join in (with one thread, it simply runs inline).
pub fn in_thread_pool<T: Send>(
    threads: Option<usize>,
    command: impl FnOnce() -> anyhow::Result<T> + Send,
) -> anyhow::Result<T> {
    let n = match threads {
        Some(0) => anyhow::bail!("--threads must be at least 1"),
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    // candle sizes its matmul (gemm) parallelism from this variable.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("xllm-worker-{i}"))
        .build()
        .context("cannot start the CPU worker threads")?;
    pool.install(command)
}
