//! Containment for code that runs on data from model files and cannot be fully checked first.
//!
//! Two tools, each a last resort behind our own checks:
//! - [`catch_panic`] turns a panic inside a dependency (the `tokenizers` crate on a malformed
//!   tokenizer.json) into an error, without the panic message on stderr.
//! - [`run_bounded`] runs a closure on its own thread with a memory budget and a deadline. Chat
//!   templates are programs: minijinja's fuel bounds their steps, but not the size of what one step
//!   builds (`s ~ s` doubles a string, and nothing in minijinja sees it). The process allocator
//!   below counts what the bounded thread holds; when it would pass its budget (or its deadline
//!   has passed), the allocation never returns: the thread parks forever, holding at most the
//!   budget, and the caller gets an error at once. Failing the allocation instead would abort the
//!   process (Rust has no stable way to make allocation failure recoverable), and an allocator
//!   must not unwind. The parked thread is leaked; callers stop using what made it (see
//!   `ChatTemplate`), so at most one leaks per broken template.

use std::alloc::{GlobalAlloc, Layout, System};
use std::any::Any;
use std::cell::Cell;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use anyhow::anyhow;

thread_local! {
    /// Panics on this thread are expected and reported as errors: don't print them.
    static QUIET: Cell<u32> = const { Cell::new(0) };
    /// The budget of this thread while it runs bounded work (null otherwise).
    static BUDGET: Cell<*const Budget> = const { Cell::new(std::ptr::null()) };
}

fn install_quiet_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if QUIET.with(Cell::get) == 0 {
                previous(info);
            }
        }));
    });
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Runs `f`; a panic inside it becomes an error saying `what` failed. Only for calls into
/// dependencies that can panic on data we could not fully validate first (each call site says
/// which); our own code reports errors instead.
pub fn catch_panic<T>(what: &str, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    install_quiet_hook();
    QUIET.with(|q| q.set(q.get() + 1));
    let result = std::panic::catch_unwind(AssertUnwindSafe(f));
    QUIET.with(|q| q.set(q.get() - 1));
    match result {
        Ok(r) => r,
        Err(payload) => Err(anyhow!(
            "{what} failed on malformed data: {}",
            panic_message(payload.as_ref())
        )),
    }
}

/// Limits for [`run_bounded`].
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes the work may hold at once (counted by the allocator on its thread).
    pub memory: usize,
    /// Wall-clock time allowed.
    pub time: Duration,
}

/// Why bounded work did not finish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LimitHit {
    #[error("it needed more than {0} MiB of memory")]
    Memory(usize),
    #[error("it did not finish within {0} s")]
    Time(u64),
}

struct Budget {
    live: AtomicIsize,
    limit: isize,
    /// Set by the caller at the deadline: the next allocation parks.
    cancelled: AtomicBool,
    /// Set by the allocator when the budget ran out.
    exceeded: AtomicBool,
}

/// Stack of the bounded thread: minijinja recurses up to 500 levels (macros, nested
/// expressions), more than a default 2 MiB thread stack may hold. Only touched pages are used.
const BOUNDED_STACK: usize = 64 << 20;

/// Runs `f` on a new thread within `limits`. A panic in `f` is an error too. When a limit is hit
/// the error is (or wraps) a [`LimitHit`], returned without waiting for the thread.
pub fn run_bounded<T: Send + 'static>(
    limits: Limits,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let budget = Arc::new(Budget {
        live: AtomicIsize::new(0),
        limit: isize::try_from(limits.memory).unwrap_or(isize::MAX),
        cancelled: AtomicBool::new(false),
        exceeded: AtomicBool::new(false),
    });
    let (tx, rx) = std::sync::mpsc::channel();
    let for_thread = budget.clone();
    let handle = std::thread::Builder::new()
        .name("xllm-bounded".into())
        .stack_size(BOUNDED_STACK)
        .spawn(move || {
            let raw = Arc::into_raw(for_thread);
            BUDGET.with(|b| b.set(raw));
            let result = catch_panic("the computation", f);
            BUDGET.with(|b| b.set(std::ptr::null()));
            // SAFETY: `raw` came from `Arc::into_raw` above and is released exactly once.
            drop(unsafe { Arc::from_raw(raw) });
            let _ = tx.send(result);
        })
        .map_err(|e| anyhow!("cannot start a worker thread: {e}"))?;
    let start = Instant::now();
    loop {
        match rx.recv_timeout(Duration::from_millis(10)) {
            Ok(result) => {
                let _ = handle.join();
                return result;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(anyhow!("the worker thread ended without a result"));
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if budget.exceeded.load(Ordering::SeqCst) {
                    return Err(LimitHit::Memory(limits.memory >> 20).into());
                }
                if start.elapsed() > limits.time {
                    budget.cancelled.store(true, Ordering::SeqCst);
                    return Err(LimitHit::Time(limits.time.as_secs()).into());
                }
            }
        }
    }
}

/// Charges `bytes` to the current thread's budget, if it has one; never returns once the budget
/// is spent or cancelled (see the module doc).
#[inline]
fn charge(bytes: isize) {
    let ptr = BUDGET.try_with(Cell::get).unwrap_or(std::ptr::null());
    if ptr.is_null() {
        return;
    }
    // SAFETY: the pointer is set only while the owning `Arc` is alive (it is released after the
    // pointer is cleared, or never when the thread parks).
    let budget = unsafe { &*ptr };
    let live = budget.live.fetch_add(bytes, Ordering::Relaxed) + bytes;
    let over = bytes > 0 && live > budget.limit;
    if over || (bytes > 0 && budget.cancelled.load(Ordering::Relaxed)) {
        if over {
            budget.exceeded.store(true, Ordering::SeqCst);
        }
        // Stop tracking (parking must not re-enter this), then never come back.
        let _ = BUDGET.try_with(|b| b.set(std::ptr::null()));
        loop {
            std::thread::park();
        }
    }
}

/// The process allocator: the system allocator, plus the per-thread budget of [`run_bounded`]
/// (one thread-local read per allocation elsewhere).
pub struct BudgetAllocator;

// SAFETY: every call is forwarded to `System` with the same arguments; `charge` only counts.
unsafe impl GlobalAlloc for BudgetAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        charge(layout.size() as isize);
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        charge(layout.size() as isize);
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        charge(-(layout.size() as isize));
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        charge(new_size as isize - layout.size() as isize);
        System.realloc(ptr, layout, new_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: Limits = Limits {
        memory: 64 << 20,
        time: Duration::from_secs(5),
    };

    #[test]
    fn bounded_work_returns_its_result() {
        let v = run_bounded(SMALL, || Ok(vec![1u8; 1 << 20].len())).unwrap();
        assert_eq!(v, 1 << 20);
    }

    #[test]
    fn a_memory_hog_is_stopped_with_an_error() {
        let err = run_bounded(SMALL, || {
            let mut s = String::from("x");
            for _ in 0..40 {
                s = format!("{s}{s}");
            }
            Ok(s.len())
        })
        .unwrap_err();
        assert_eq!(
            err.downcast_ref::<LimitHit>(),
            Some(&LimitHit::Memory(64)),
            "{err}"
        );
    }

    #[test]
    fn a_slow_computation_is_stopped_at_its_deadline() {
        let limits = Limits {
            memory: 64 << 20,
            time: Duration::from_millis(200),
        };
        let t = Instant::now();
        let err = run_bounded::<()>(limits, || loop {
            // Allocates, so it parks once cancelled.
            std::hint::black_box(vec![0u8; 16]);
        })
        .unwrap_err();
        assert!(matches!(
            err.downcast_ref::<LimitHit>(),
            Some(LimitHit::Time(_))
        ));
        assert!(t.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn panics_become_errors() {
        let err = catch_panic("parsing", || -> anyhow::Result<()> { panic!("index 9") })
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("parsing failed") && err.contains("index 9"),
            "{err}"
        );
        let err = run_bounded(SMALL, || -> anyhow::Result<()> { panic!("boom") }).unwrap_err();
        assert!(err.to_string().contains("boom"));
    }
}
