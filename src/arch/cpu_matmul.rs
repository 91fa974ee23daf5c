//! Plumbing shared by our CPU matmul kernels (`qlinear` for Q4_1, `bf16_linear` for bf16): the
//! input shape check, spreading weight rows over rayon threads, and turning the transposed
//! `[rows, m]` result back into `[.., rows]`. Kept in one place so both kernels split work and
//! report shape errors the same way.

use candle_core::{Device, Result, Tensor};
use rayon::prelude::*;

/// Checks that `x` is `[.., cols]`; returns its dims and the number of activation rows.
/// `kernel` names the weight format in the error ("Q4_1", "bf16").
pub(crate) fn input_rows(x: &Tensor, cols: usize, kernel: &str) -> Result<(Vec<usize>, usize)> {
    let dims = x.dims().to_vec();
    let k = *dims.last().unwrap();
    if k != cols {
        candle_core::bail!("{kernel} matmul: input has {k} columns, weight has {cols}");
    }
    let m = x.elem_count() / k;
    Ok((dims, m))
}

/// Output rows per parallel task: about four tasks per thread, at least `min` rows.
pub(crate) fn rows_per_task(rows: usize, min: usize) -> usize {
    rows.div_ceil(4 * rayon::current_num_threads()).max(min)
}

/// Runs `f(chunk_index, chunk)` over `out` split in `chunk_len` pieces: on the rayon pool, or in
/// this thread when the pool has one thread (no hand-off and wake-up per matmul).
pub(crate) fn for_each_chunk(
    out: &mut [f32],
    chunk_len: usize,
    f: impl Fn(usize, &mut [f32]) + Sync + Send,
) {
    if rayon::current_num_threads() == 1 {
        out.chunks_mut(chunk_len)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    } else {
        out.par_chunks_mut(chunk_len)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    }
}

/// The kernels write `yt` as `[n, m]` (each thread owns whole weight rows); this returns the
/// `[.., n]` tensor for input dims `dims` (`m` activation rows).
pub(crate) fn transposed_output(
    yt: Vec<f32>,
    n: usize,
    m: usize,
    mut dims: Vec<usize>,
) -> Result<Tensor> {
    let y = if m == 1 {
        yt
    } else {
        let mut y = vec![0f32; n * m];
        for r in 0..n {
            for i in 0..m {
                y[i * n + r] = yt[r * m + i];
            }
        }
        y
    };
    *dims.last_mut().unwrap() = n;
    Tensor::from_vec(y, dims, &Device::Cpu)
}

/// Whether the AVX2 kernels can run: AVX2, FMA and F16C, detected at run time (the binary itself
/// targets baseline x86-64, so it runs everywhere).
pub(crate) fn has_avx2_fma_f16c() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Sum of the eight lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn hsum(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// Largest absolute element, for kernel tests that compare against a reference product.
#[cfg(test)]
pub(crate) fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
