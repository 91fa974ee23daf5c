//! The CPU matmul plumbing now lives with the kernels (`kernels::cpu_matmul`); re-exported here
//! so the architecture code that uses it keeps its paths.

pub(crate) use crate::kernels::cpu_matmul::*;
