//! Kernels of our own (CPU reference; CUDA and Metal behind features): MXFP4 matmul, MoE dispatch.

pub mod bytes;
pub mod encoder;
pub mod moe;
pub mod mxfp4;

#[cfg(feature = "cuda")]
pub mod cuda;
