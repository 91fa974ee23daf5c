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
pub mod hub;
pub mod kernels;
pub mod model;
pub mod quant;
pub mod server;
pub mod state;
pub mod store;
