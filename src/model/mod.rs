//! Reading model files: config.json, safetensors (mmap), GGUF; metadata for `show`/manifests.
pub mod inspect;
