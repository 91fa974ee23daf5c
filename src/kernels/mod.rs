//! Kernels of our own (CPU reference; CUDA and Metal behind features): GGUF block matmuls, MXFP4
//! matmul, MoE dispatch, Mamba2 conv/scan/gated norm (CPU only so far).

pub mod act_stats;
pub mod bytes;
pub(crate) mod cpu_matmul;
pub mod encoder;
pub mod gelu;
pub mod ggml_types;
pub mod moe;
pub mod mxfp4;
pub mod mxfp4_int;
pub mod quant_blocks;
pub mod ssm;

#[cfg(feature = "cuda")]
pub mod cuda;
