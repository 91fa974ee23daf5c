//! The engine on a thread of its own (for `xllm serve`): requests are handed over through a
//! channel, the scheduler steps whenever it has work, and events go back through each request's
//! sink. The caller never waits for a step: [`EngineHandle::submit`] validates and queues.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::request::{EventSink, GenerationRequest, SeqEvent, SubmitError};
use super::scheduler::{EngineConfig, EngineStats, RequestId, Scheduler};
use super::session::ModelSession;
use super::threads::in_thread_pool;

enum Command {
    /// Boxed: a request is far larger than the other commands.
    Submit(RequestId, Box<GenerationRequest>, EventSink),
    Cancel(RequestId),
    /// Stop: finish running work first (`drain`) or cancel it.
    Shutdown {
        drain: bool,
    },
}

/// A running engine; cheap to clone, shared by every request of one model.
#[derive(Clone)]
pub struct EngineHandle {
    tx: Sender<Command>,
    session: Arc<ModelSession>,
    config: EngineConfig,
    stats: Arc<Mutex<EngineStats>>,
    /// Requests submitted but not yet admitted by the scheduler (bounded by `max_waiting`).
    queued: Arc<AtomicUsize>,
    next_id: Arc<AtomicU64>,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl EngineHandle {
    /// Starts the engine thread, with a pool of `threads` CPU workers (all cores by default).
    pub fn start(
        session: Arc<ModelSession>,
        config: EngineConfig,
        threads: Option<usize>,
    ) -> anyhow::Result<Self> {
        let (tx, rx) = channel();
        let stats = Arc::new(Mutex::new(EngineStats::default()));
        let queued = Arc::new(AtomicUsize::new(0));
        let scheduler = Scheduler::new(session.clone(), config.clone());
        let (s, q) = (stats.clone(), queued.clone());
        let thread = std::thread::Builder::new()
            .name("xllm-engine".into())
            .spawn(move || {
                let result = in_thread_pool(threads, move || {
                    engine_loop(scheduler, rx, s, q);
                    Ok(())
                });
                if let Err(e) = result {
                    eprintln!("engine thread failed: {e:#}");
                }
            })?;
        Ok(Self {
            tx,
            session,
            config,
            stats,
            queued,
            next_id: Arc::new(AtomicU64::new(0)),
            thread: Arc::new(Mutex::new(Some(thread))),
        })
    }

    pub fn session(&self) -> &Arc<ModelSession> {
        &self.session
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Queues a request. Refused at once when the queue is full or the prompt cannot fit; its
    /// events (then the final `Finished` or `Failed`) go to `sink` on the engine thread.
    pub fn submit(
        &self,
        request: GenerationRequest,
        sink: EventSink,
    ) -> Result<RequestId, SubmitError> {
        super::scheduler::validate(&self.session, &self.config, &request)?;
        let waiting = self.queued.fetch_add(1, Ordering::SeqCst);
        if waiting >= self.config.max_waiting {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::Overloaded { waiting });
        }
        let id = RequestId(self.next_id.fetch_add(1, Ordering::SeqCst));
        if self
            .tx
            .send(Command::Submit(id, Box::new(request), sink))
            .is_err()
        {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::Stopped);
        }
        Ok(id)
    }

    /// Cancels a request (its blocks are freed at the next step).
    pub fn cancel(&self, id: RequestId) {
        let _ = self.tx.send(Command::Cancel(id));
    }

    /// The scheduler's counters as of its last step.
    pub fn stats(&self) -> EngineStats {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Stops the engine and waits for its thread: running requests finish first when `drain`,
    /// else they are cancelled.
    pub fn shutdown(&self, drain: bool) {
        let _ = self.tx.send(Command::Shutdown { drain });
        let handle = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

fn engine_loop(
    mut scheduler: Scheduler,
    rx: Receiver<Command>,
    stats: Arc<Mutex<EngineStats>>,
    queued: Arc<AtomicUsize>,
) {
    let mut stopping: Option<bool> = None;
    loop {
        // Wait for work when idle; otherwise take whatever arrived since the last step.
        let first = if scheduler.has_work() || stopping.is_some() {
            rx.try_recv().ok()
        } else {
            match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(c) => Some(c),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => Some(Command::Shutdown { drain: false }),
            }
        };
        let mut commands: Vec<Command> = first.into_iter().collect();
        commands.extend(rx.try_iter());
        for command in commands {
            match command {
                Command::Submit(id, request, mut sink) => {
                    queued.fetch_sub(1, Ordering::SeqCst);
                    if stopping.is_some() {
                        sink(SeqEvent::Failed("the server is shutting down".into()));
                        continue;
                    }
                    // A refused request was already told so through its sink.
                    let _ = scheduler.submit_with_id(id, *request, sink);
                }
                Command::Cancel(id) => scheduler.cancel(id),
                Command::Shutdown { drain } => {
                    if !drain {
                        scheduler.cancel_all();
                    }
                    stopping = Some(drain);
                }
            }
        }
        if let Err(e) = scheduler.step() {
            eprintln!("engine step failed: {e:#}");
        }
        *stats.lock().unwrap_or_else(|e| e.into_inner()) = scheduler.stats();
        if stopping.is_some() && !scheduler.has_work() {
            break;
        }
    }
}
