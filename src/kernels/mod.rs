//! Kernels of our own (CPU reference; CUDA and Metal behind features): GGUF block matmuls, MXFP4
//! matmul, MoE dispatch.

pub mod bytes;
pub(crate) mod cpu_matmul;
pub mod ggml_types;
pub mod moe;
pub mod mxfp4;
pub mod quant_blocks;

#[cfg(feature = "cuda")]
pub mod cuda;
