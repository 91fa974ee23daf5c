//! Reading model files: config.json, safetensors (mmap), GGUF; metadata for `show`/manifests.

pub mod arch_facts;
pub mod bounds;
pub mod config;
pub mod files;
pub mod gguf;
pub mod inspect;
pub mod safetensors;
