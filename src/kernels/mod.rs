//! Kernels of our own (CPU reference; CUDA and Metal behind features): MXFP4 matmul, MoE dispatch,
//! Mamba2 conv/scan/gated norm (CPU only so far).

pub mod bytes;
pub mod encoder;
pub mod moe;
pub mod mxfp4;
pub mod ssm;

#[cfg(feature = "cuda")]
pub mod cuda;
