//! Kernels of our own (CPU reference; CUDA and Metal behind features): MXFP4 matmul, MoE dispatch.

#[cfg(feature = "cuda")]
pub mod cuda;
