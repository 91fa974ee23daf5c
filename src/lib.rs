//! xllm: pull open-weight models from the Hugging Face Hub into a local store and run them.
//!
//! Data flow (see docs/architecture.md):
//! name → [`store::reference::ModelRef`] → [`store::Store`] + manifest → [`quant`] profile
//! → [`model`] loader (safetensors / GGUF) → [`arch`] plugin → [`engine`] generation loop → [`cli`].

pub mod arch;
pub mod cli;
pub mod device;
pub mod engine;
pub mod error;
#[doc(hidden)]
pub mod fuzz;
pub mod guard;
pub mod hub;
pub mod kernels;
pub mod model;
pub mod quant;
pub mod quantize;
pub mod server;
pub mod state;
pub mod store;

/// The system allocator with per-thread budgets for work on untrusted data (chat templates):
/// see [`guard`].
#[global_allocator]
static ALLOCATOR: guard::BudgetAllocator = guard::BudgetAllocator;
