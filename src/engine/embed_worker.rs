//! An embedding model on a thread of its own (for `xllm serve`). Requests queue on a channel;
//! each pass takes every request waiting at that moment and packs all their sequences into one
//! [`EmbeddingModel::pooled`] call, so concurrent requests to one model share passes (an
//! embedding has no decode phase: batching is packing whoever waits). The caller never waits
//! for a pass: [`EmbedHandle::submit`] checks and queues, the result goes to the request's
//! callback on the worker thread.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::embed::{EmbeddingModel, TOKENS_PER_PASS};
use super::request::SubmitError;
use super::threads::in_thread_pool;

/// Tokens one pass takes from the queue (whole requests; one request alone may exceed it). The
/// model still runs them in passes of [`TOKENS_PER_PASS`]; a bound keeps a burst from delaying
/// the first request by more than a few passes.
const TOKENS_PER_TURN: usize = 4 * TOKENS_PER_PASS;

/// What a request gets back: its vectors, in input order, or why not.
pub type EmbedReply = Box<dyn FnOnce(Result<Vec<Vec<f32>>, String>) + Send>;

struct Job {
    /// Prepared sequences ([`EmbeddingModel::prepare`]).
    ids: Vec<Vec<u32>>,
    /// Width of the returned vectors ([`EmbeddingModel::check_dimensions`]).
    dims: usize,
    reply: EmbedReply,
}

enum Command {
    Embed(Job),
    Shutdown,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct EmbedStats {
    /// Requests answered.
    pub requests: AtomicU64,
    /// Turns of the worker (each packs every request waiting at its start).
    pub batches: AtomicU64,
    /// Inputs and tokens embedded.
    pub inputs: AtomicU64,
    pub tokens: AtomicU64,
    /// Requests queued and not yet taken by a turn.
    pub waiting: AtomicUsize,
    /// Requests in the turn running now.
    pub running: AtomicUsize,
}

/// A running embedding worker; cheap to clone, shared by every request of one model.
#[derive(Clone)]
pub struct EmbedHandle {
    tx: Sender<Command>,
    model: Arc<EmbeddingModel>,
    stats: Arc<EmbedStats>,
    max_waiting: usize,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl EmbedHandle {
    /// Starts the worker thread, with a pool of `threads` CPU workers (all cores by default).
    /// More than `max_waiting` queued requests are refused ([`SubmitError::Overloaded`]).
    pub fn start(
        model: Arc<EmbeddingModel>,
        threads: Option<usize>,
        max_waiting: usize,
    ) -> anyhow::Result<Self> {
        let (tx, rx) = channel();
        let stats = Arc::new(EmbedStats::default());
        let (m, s) = (model.clone(), stats.clone());
        let thread = std::thread::Builder::new()
            .name("xllm-embed".into())
            .spawn(move || {
                let result = in_thread_pool(threads, move || {
                    worker_loop(&m, rx, &s);
                    Ok(())
                });
                if let Err(e) = result {
                    eprintln!("embedding thread failed: {e:#}");
                }
            })?;
        Ok(Self {
            tx,
            model,
            stats,
            max_waiting: max_waiting.max(1),
            thread: Arc::new(Mutex::new(Some(thread))),
        })
    }

    pub fn model(&self) -> &Arc<EmbeddingModel> {
        &self.model
    }

    pub fn stats(&self) -> &EmbedStats {
        &self.stats
    }

    /// Queues prepared sequences; `reply` gets their `dims`-wide vectors.
    pub fn submit(
        &self,
        ids: Vec<Vec<u32>>,
        dims: usize,
        reply: EmbedReply,
    ) -> Result<(), SubmitError> {
        let waiting = self.stats.waiting.fetch_add(1, Ordering::SeqCst);
        if waiting >= self.max_waiting {
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::Overloaded { waiting });
        }
        if self
            .tx
            .send(Command::Embed(Job { ids, dims, reply }))
            .is_err()
        {
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::Stopped);
        }
        Ok(())
    }

    /// Stops the worker after the turn it is running; queued requests are told so.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown);
        let handle = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

fn worker_loop(model: &EmbeddingModel, rx: Receiver<Command>, stats: &EmbedStats) {
    let mut stopping = false;
    while !stopping {
        // Wait for a request, then take whatever else is waiting, up to the turn's budget.
        let Ok(first) = rx.recv() else { break };
        let mut jobs = Vec::new();
        let mut tokens = 0;
        let mut next = Some(first);
        while let Some(command) = next.take() {
            match command {
                Command::Shutdown => stopping = true,
                Command::Embed(job) => {
                    stats.waiting.fetch_sub(1, Ordering::SeqCst);
                    if stopping {
                        (job.reply)(Err("the server is shutting down".into()));
                        continue;
                    }
                    tokens += job.ids.iter().map(Vec::len).sum::<usize>();
                    jobs.push(job);
                }
            }
            if tokens < TOKENS_PER_TURN {
                next = rx.try_recv().ok();
            }
        }
        if jobs.is_empty() {
            continue;
        }
        stats.running.store(jobs.len(), Ordering::SeqCst);
        run_turn(model, jobs, stats);
        stats.running.store(0, Ordering::SeqCst);
    }
    // Requests still queued when the worker stops are told so.
    for command in rx.try_iter() {
        if let Command::Embed(job) = command {
            stats.waiting.fetch_sub(1, Ordering::SeqCst);
            (job.reply)(Err("the server is shutting down".into()));
        }
    }
}

/// One packed call for every job's sequences; each job gets its own rows back.
fn run_turn(model: &EmbeddingModel, jobs: Vec<Job>, stats: &EmbedStats) {
    let all: Vec<Vec<u32>> = jobs.iter().flat_map(|j| j.ids.iter().cloned()).collect();
    let tokens: usize = all.iter().map(Vec::len).sum();
    let result = model.pooled(&all);
    stats.batches.fetch_add(1, Ordering::Relaxed);
    match result {
        Ok(vectors) => {
            stats.inputs.fetch_add(all.len() as u64, Ordering::Relaxed);
            stats.tokens.fetch_add(tokens as u64, Ordering::Relaxed);
            let mut rest = vectors.into_iter();
            for job in jobs {
                let mut mine: Vec<Vec<f32>> = rest.by_ref().take(job.ids.len()).collect();
                for v in &mut mine {
                    model.shorten(v, job.dims);
                }
                stats.requests.fetch_add(1, Ordering::Relaxed);
                (job.reply)(Ok(mine));
            }
        }
        Err(e) => {
            let message = format!("{e:#}");
            for job in jobs {
                stats.requests.fetch_add(1, Ordering::Relaxed);
                (job.reply)(Err(message.clone()));
            }
        }
    }
}
