//! The local model store under `$XLLM_HOME`: one folder per model with its files and manifest.json.

pub mod resolve;

pub use resolve::{ModelFormat, ResolvedModel};
