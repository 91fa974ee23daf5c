//! Hugging Face Hub client and our resumable, verified downloader.
//!
//! We speak the Hub protocol ourselves (on reqwest) instead of using hf-hub's downloader because
//! hf-hub 1.0 neither resumes interrupted downloads (huggingface/hf-hub#196) nor verifies sha256;
//! hf-hub still provides the HF cache layout (`hf_home`, `resolve_cache_dir`) and the repo-info
//! types we deserialize.

pub mod client;
pub mod config;
pub mod download;
pub mod error;
pub mod hf_cache;
pub mod select;

pub use client::HubClient;
pub use config::HubConfig;
pub use error::HubError;
