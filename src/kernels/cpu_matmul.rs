//! Plumbing shared by our CPU matmul kernels (`quant_blocks` for GGUF blocks, `arch::bf16_linear`
//! for bf16): the input shape check, spreading weight rows over rayon threads, and turning the
//! transposed `[rows, m]` result back into `[.., rows]`. Kept in one place so every kernel splits
//! work and reports shape errors the same way.

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

/// `y` (`[m, n]`) as the `[.., n]` tensor for input dims `dims`.
pub(crate) fn output_tensor(y: Vec<f32>, n: usize, mut dims: Vec<usize>) -> Result<Tensor> {
    *dims.last_mut().unwrap() = n;
    Tensor::from_vec(y, dims, &Device::Cpu)
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

/// `[m, n]` output (activation rows × weight rows) that tasks fill column range by column range:
/// each task owns some weight rows, i.e. the same columns of every output row, and writes them
/// in place (no `[n, m]` copy to transpose afterwards; that copy was ~9 % of a batched decode).
pub(crate) struct ColumnRange<'a> {
    ptr: *mut f32,
    n: usize,
    m: usize,
    cols: std::ops::Range<usize>,
    _out: std::marker::PhantomData<&'a mut [f32]>,
}

// SAFETY: a `ColumnRange` only reaches its own columns; ranges handed to different tasks are
// disjoint (see `for_each_column_range`), so tasks never touch the same element.
unsafe impl Send for ColumnRange<'_> {}

impl ColumnRange<'_> {
    /// This task's columns (weight rows).
    pub(crate) fn cols(&self) -> std::ops::Range<usize> {
        self.cols.clone()
    }

    /// This task's part of output row `i`: columns `cols()`.
    pub(crate) fn row_mut(&mut self, i: usize) -> &mut [f32] {
        assert!(i < self.m, "output row {i} of {}", self.m);
        // SAFETY: row `i`'s columns `cols` lie inside the `[m, n]` buffer, belong to this task
        // only, and `&mut self` keeps one such slice alive at a time.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.ptr.add(i * self.n + self.cols.start),
                self.cols.len(),
            )
        }
    }
}

/// Fills `y` (`[m, n]`) by calling `f` on column ranges of `cols_per_task` columns (the last one
/// shorter), on the rayon pool or in this thread when the pool has one thread.
pub(crate) fn for_each_column_range(
    y: &mut [f32],
    n: usize,
    m: usize,
    cols_per_task: usize,
    f: impl Fn(ColumnRange<'_>) + Sync + Send,
) {
    assert_eq!(y.len(), n * m, "output shape");
    let step = cols_per_task.max(1);
    let tasks = n.div_ceil(step);
    struct Base(*mut f32);
    // SAFETY: only used to build disjoint `ColumnRange`s, one per task.
    unsafe impl Sync for Base {}
    impl Base {
        fn ptr(&self) -> *mut f32 {
            self.0
        }
    }
    let base = Base(y.as_mut_ptr());
    let range = |t: usize| ColumnRange {
        ptr: base.ptr(),
        n,
        m,
        cols: t * step..((t + 1) * step).min(n),
        _out: std::marker::PhantomData,
    };
    if rayon::current_num_threads() == 1 || tasks == 1 {
        (0..tasks).for_each(|t| f(range(t)));
    } else {
        (0..tasks).into_par_iter().for_each(|t| f(range(t)));
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
    let y = transposed(yt, n, m);
    *dims.last_mut().unwrap() = n;
    Tensor::from_vec(y, dims, &Device::Cpu)
}

/// `yt` `[n, m]` → `[m, n]`.
pub(crate) fn transposed(yt: Vec<f32>, n: usize, m: usize) -> Vec<f32> {
    if m == 1 {
        return yt;
    }
    // In tiles, so reads and writes both stay within a few cache lines and pages (a plain
    // double loop strides n floats per write and was 15 % of a prefill).
    const TILE: usize = 32;
    let mut y = vec![0f32; n * m];
    for r0 in (0..n).step_by(TILE) {
        for i0 in (0..m).step_by(TILE) {
            for r in r0..(r0 + TILE).min(n) {
                for i in i0..(i0 + TILE).min(m) {
                    y[i * n + r] = yt[r * m + i];
                }
            }
        }
    }
    y
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

/// Whether the AVX-512 VNNI kernels can run (AVX-512 F/BW/VNNI besides AVX2, FMA and F16C),
/// detected once at run time. `XLLM_NO_AVX512=1` turns them off (A/B measurements, and tests of
/// the AVX2 path on an AVX-512 machine).
pub(crate) fn has_avx512_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static DETECTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(|| {
            has_avx512f()
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512vnni")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the AVX-512 F float kernels can run (besides AVX2, FMA and F16C), detected once at run
/// time; `XLLM_NO_AVX512=1` turns them off as it does [`has_avx512_vnni`].
pub(crate) fn has_avx512f() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static DETECTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(|| {
            has_avx2_fma_f16c()
                && std::is_x86_feature_detected!("avx512f")
                && std::env::var_os("XLLM_NO_AVX512").is_none_or(|v| v.is_empty() || v == "0")
        })
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

#[cfg(test)]
#[test]
fn column_ranges_fill_every_element_once() {
    for (n, m, per) in [
        (48usize, 3usize, 16usize),
        (50, 1, 16),
        (7, 5, 3),
        (16, 4, 100),
    ] {
        let mut y = vec![-1f32; n * m];
        for_each_column_range(&mut y, n, m, per, |mut part| {
            for i in 0..m {
                let cols = part.cols();
                for (c, v) in cols.zip(part.row_mut(i)) {
                    assert_eq!(*v, -1.0, "written once");
                    *v = (1000 * i + c) as f32;
                }
            }
        });
        for (j, v) in y.iter().enumerate() {
            assert_eq!(*v, (1000 * (j / n) + j % n) as f32, "n {n} m {m}");
        }
    }
}

#[cfg(test)]
#[test]
fn transposed_output_restores_row_major_order() {
    // yt is [n, m] with yt[r][i] = 1000 r + i; the result must be [m, n] with y[i][r] = yt[r][i],
    // for sizes that are and are not multiples of the tile.
    for (n, m) in [(3usize, 5usize), (40, 33), (64, 64), (70, 1)] {
        let yt: Vec<f32> = (0..n * m)
            .map(|j| (1000 * (j / m) + j % m) as f32)
            .collect();
        let y = transposed_output(yt, n, m, vec![m, 7]).unwrap();
        assert_eq!(y.dims(), [m, n]);
        let y: Vec<Vec<f32>> = y.to_vec2().unwrap();
        for (i, row) in y.iter().enumerate() {
            for (r, &v) in row.iter().enumerate() {
                assert_eq!(v, (1000 * r + i) as f32);
            }
        }
    }
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
