//! CPU kernels for encoder (bidirectional) layers over *packed* f32 rows: the tokens of many
//! sequences side by side in one `[tokens, width]` matrix, no padding.
//!
//! Why our own and not candle ops: an encoder batch is thousands of rows through a few small
//! matrices, and candle's CPU element-wise ops (GELU, bias, residual, layer norm statistics) run
//! on one thread and allocate a tensor per op. Here the matmul is the same `gemm` crate candle
//! uses (bias and residual preloaded into the output, so they cost no extra pass), and the
//! element-wise work is fused and spread over the rayon pool. Attention runs per sequence inside
//! the packed matrix, so no token ever sees another sequence and padding costs nothing.

use rayon::prelude::*;

/// Rows of `width` floats per parallel task: about four tasks per thread.
fn rows_per_task(rows: usize) -> usize {
    rows.div_ceil(4 * rayon::current_num_threads()).max(1)
}

/// `out[rows, n] = x[rows, k] · wᵀ + bias[n] (+ residual[rows, n])`, with `w` `[n, k]` as
/// checkpoints store it (gemm reads it through strides and packs it itself).
pub fn linear(
    x: &[f32],
    k: usize,
    w: &[f32],
    bias: &[f32],
    residual: Option<&[f32]>,
    out: &mut Vec<f32>,
) {
    let n = bias.len();
    let rows = x.len() / k;
    assert_eq!(x.len(), rows * k, "linear: input is not [rows, {k}]");
    assert_eq!(w.len(), n * k, "linear: weight is not [{n}, {k}]");
    out.clear();
    out.reserve(rows * n);
    match residual {
        Some(r) => {
            assert_eq!(r.len(), rows * n, "linear: residual is not [rows, {n}]");
            for row in r.chunks_exact(n) {
                out.extend(row.iter().zip(bias).map(|(a, b)| a + b));
            }
        }
        None => {
            for _ in 0..rows {
                out.extend_from_slice(bias);
            }
        }
    }
    if rows == 0 {
        return;
    }
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the three buffers have exactly the sizes the strides describe (checked above):
    // out [rows, n], x [rows, k] and w [n, k], all row-major; `out` is not aliased.
    unsafe {
        gemm::gemm(
            rows,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            true,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Layer norm of every row of `x` (`[rows, gamma.len()]`) in place.
pub fn layer_norm(x: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
    let width = gamma.len();
    let per_task = rows_per_task(x.len() / width) * width;
    x.par_chunks_mut(per_task).for_each(|chunk| {
        for row in chunk.chunks_exact_mut(width) {
            // Two passes in f64-free f32 with a shifted mean: rows are a few hundred wide and the
            // reference (torch) also accumulates in f32.
            let mean = row.iter().sum::<f32>() / width as f32;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / width as f32;
            let rstd = 1.0 / (var + eps).sqrt();
            for ((v, g), b) in row.iter_mut().zip(gamma).zip(beta) {
                *v = (*v - mean) * rstd * g + b;
            }
        }
    });
}

/// Activation functions BERT-family configs name (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Exact GELU, `x · Φ(x)` (`gelu`).
    GeluErf,
    /// The tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    Relu,
}

impl Activation {
    pub fn from_config(name: &str) -> Option<Self> {
        match name {
            "gelu" => Some(Self::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Self::GeluTanh),
            "relu" => Some(Self::Relu),
            _ => None,
        }
    }
}

/// Applies `act` to every element of `x`, in parallel.
pub fn activate(x: &mut [f32], act: Activation) {
    let per_task = (x.len() / (4 * rayon::current_num_threads())).max(4096);
    x.par_chunks_mut(per_task).for_each(|chunk| match act {
        Activation::GeluErf => gelu_erf(chunk),
        Activation::GeluTanh => chunk.iter_mut().for_each(|v| *v = gelu_tanh_scalar(*v)),
        Activation::Relu => chunk.iter_mut().for_each(|v| *v = v.max(0.0)),
    });
}

fn gelu_tanh_scalar(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2 / pi)
    0.5 * x * (1.0 + (C * (x + 0.044_715 * x * x * x)).tanh())
}

/// Exact GELU over a slice: AVX2+FMA build of the same code when the CPU has it.
fn gelu_erf(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the features were just detected.
            unsafe { gelu_erf_avx2(x) };
            return;
        }
    }
    gelu_erf_portable(x);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_erf_avx2(x: &mut [f32]) {
    gelu_erf_portable(x)
}

#[inline(always)]
fn gelu_erf_portable(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = 0.5 * *v * (1.0 + erf(*v * std::f32::consts::FRAC_1_SQRT_2));
    }
}

/// erf with absolute error below 1.5e-7 (Abramowitz & Stegun 7.1.26), branch-free so the loops
/// above vectorise (std has no erf, and a libm call per element would not).
#[inline(always)]
fn erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_7,
        -1.453_152_1,
        1.061_405_4,
    ];
    let ax = x.abs();
    let t = 1.0 / (1.0 + P * ax);
    let poly = ((((A[4] * t + A[3]) * t + A[2]) * t + A[1]) * t + A[0]) * t;
    let y = 1.0 - poly * exp(-ax * ax);
    y.copysign(x)
}

/// e^x for x ≤ 0 down to about -87 (0 below), relative error ~2e-7: Cody-Waite reduction to
/// `2^n · e^r` with |r| ≤ ln2/2 and a degree-6 polynomial. Rounds with the 1.5·2^23 trick so it
/// needs no SSE4.1 `round` and vectorises on any x86-64.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (0.166_666_67
                    + r * (0.041_666_668 + r * (0.008_333_334 + r * 0.001_388_889)))));
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    p * scale
}

/// Self-attention of packed sequences: `qkv` is `[tokens, 3 · heads · head_dim]` (queries, keys,
/// values side by side per row), `lens` the sequence lengths in order (summing to `tokens`).
/// Every query attends to all keys of its own sequence (bidirectional). Returns `[tokens,
/// heads · head_dim]`.
///
/// Per sequence and head: `S = Q·Kᵀ·scale` and `O = softmax(S)·V` as two small gemm calls on
/// strided views of `qkv` (no copies), one sequence per parallel task; each task owns its
/// sequence's output rows.
pub fn packed_attention(
    qkv: &[f32],
    lens: &[usize],
    heads: usize,
    head_dim: usize,
    out: &mut Vec<f32>,
) {
    let hidden = heads * head_dim;
    let tokens: usize = lens.iter().sum();
    assert_eq!(
        qkv.len(),
        tokens * 3 * hidden,
        "attention: qkv is not [tokens, 3·hidden]"
    );
    out.clear();
    out.resize(tokens * hidden, 0.0);
    // (first row, output rows) of each sequence.
    let mut pieces = Vec::with_capacity(lens.len());
    let mut rest: &mut [f32] = out;
    let mut start = 0;
    for &len in lens {
        let (piece, tail) = std::mem::take(&mut rest).split_at_mut(len * hidden);
        pieces.push((start, piece));
        rest = tail;
        start += len;
    }
    let scale = 1.0 / (head_dim as f32).sqrt();
    pieces
        .into_par_iter()
        .for_each_init(Vec::new, |scores, (s0, o)| {
            let len = o.len() / hidden;
            scores.resize(len * len, 0.0);
            for h in 0..heads {
                sequence_head(qkv, s0, len, h, head_dim, hidden, scale, scores, o);
            }
        });
}

/// One head of one sequence (rows `s0..s0 + len` of `qkv`) into that sequence's output rows `o`.
#[allow(clippy::too_many_arguments)]
fn sequence_head(
    qkv: &[f32],
    s0: usize,
    len: usize,
    h: usize,
    d: usize,
    hidden: usize,
    scale: f32,
    scores: &mut [f32],
    o: &mut [f32],
) {
    let stride = 3 * hidden as isize;
    let q = &qkv[s0 * 3 * hidden + h * d..];
    let k = &qkv[s0 * 3 * hidden + hidden + h * d..];
    let v = &qkv[s0 * 3 * hidden + 2 * hidden + h * d..];
    // The last row read is (len - 1) · stride + d ≤ what the slices hold, so all reads below
    // stay inside `qkv`, and writes stay inside `scores` ([len, len]) and `o` ([len, hidden]).
    debug_assert!(v.len() >= (len - 1) * 3 * hidden + d);
    // SAFETY: bounds as argued above; `scores` and `o` are exclusively borrowed.
    unsafe {
        gemm::gemm(
            len,
            len,
            d,
            scores.as_mut_ptr(),
            1,
            len as isize,
            false,
            q.as_ptr(),
            1,
            stride,
            k.as_ptr(),
            stride,
            1,
            0.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    softmax_rows(scores, len);
    // SAFETY: as above; the output columns h·d..(h+1)·d of rows 0..len of `o`.
    unsafe {
        gemm::gemm(
            len,
            d,
            len,
            o.as_mut_ptr().add(h * d),
            1,
            hidden as isize,
            false,
            scores.as_ptr(),
            1,
            len as isize,
            v.as_ptr(),
            1,
            stride,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Softmax of each row of `x` (`[rows, width]`) in place.
fn softmax_rows(x: &mut [f32], width: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the features were just detected.
            unsafe { softmax_rows_avx2(x, width) };
            return;
        }
    }
    softmax_rows_portable(x, width);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_rows_avx2(x: &mut [f32], width: usize) {
    softmax_rows_portable(x, width)
}

#[inline(always)]
fn softmax_rows_portable(x: &mut [f32], width: usize) {
    for row in x.chunks_exact_mut(width) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let mut sum = 0.0;
        for v in row.iter_mut() {
            *v = exp(*v - max);
            sum += *v;
        }
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|v| *v *= inv);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_and_exp_match_f64_references() {
        for i in -400..=400 {
            let x = i as f32 * 0.01;
            // exp against std on the range softmax and erf use.
            let arg = -x.abs() * 20.0;
            let (e, want) = (exp(arg) as f64, (arg as f64).exp());
            assert!(
                (e - want).abs() <= 1e-6 * want,
                "exp({arg}) = {e}, want {want}"
            );
            // erf against a series (x small) / known values through GELU identities.
            let g = {
                let mut v = [x];
                gelu_erf(&mut v);
                v[0] as f64
            };
            let want = 0.5 * x as f64 * (1.0 + erf_f64(x as f64 / std::f64::consts::SQRT_2));
            assert!((g - want).abs() < 1e-6, "gelu({x}) = {g}, want {want}");
        }
    }

    /// erf by its Taylor series (converges fast for |x| ≤ 3) — the test's independent reference.
    fn erf_f64(x: f64) -> f64 {
        let mut term = x;
        let mut sum = x;
        for n in 1..200 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn linear_adds_bias_and_residual() {
        // x [2, 3], w [2, 3]
        let x = [1.0, 2.0, 3.0, -1.0, 0.5, 2.0];
        let w_t = [1.0, 0.0, 1.0, 0.0, 1.0, 1.0];
        let bias = [0.5, -0.5];
        let mut out = Vec::new();
        linear(&x, 3, &w_t, &bias, None, &mut out);
        assert_eq!(out, vec![4.5, 4.5, 1.5, 2.0]);
        let residual = [1.0, 1.0, 2.0, 2.0];
        linear(&x, 3, &w_t, &bias, Some(&residual), &mut out);
        assert_eq!(out, vec![5.5, 5.5, 3.5, 4.0]);
    }

    #[test]
    fn layer_norm_rows_have_zero_mean_unit_variance() {
        let mut x: Vec<f32> = (0..12).map(|i| (i * i) as f32).collect();
        layer_norm(&mut x, &[1.0; 4], &[0.0; 4], 1e-12);
        for row in x.chunks(4) {
            let mean: f32 = row.iter().sum::<f32>() / 4.0;
            let var: f32 = row.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 4.0;
            assert!(mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-4, "{row:?}");
        }
    }

    /// Packed attention equals attention of each sequence computed alone, naively in f64.
    #[test]
    fn packed_attention_keeps_sequences_apart() {
        let (heads, d) = (2, 8);
        let hidden = heads * d;
        let lens = [3usize, 1, 5];
        let tokens: usize = lens.iter().sum();
        let qkv: Vec<f32> = (0..tokens * 3 * hidden)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
            .collect();
        let mut out = Vec::new();
        packed_attention(&qkv, &lens, heads, d, &mut out);
        let mut start = 0;
        for &len in &lens {
            for i in start..start + len {
                for h in 0..heads {
                    let q = |r: usize, c: usize| qkv[r * 3 * hidden + h * d + c] as f64;
                    let k = |r: usize, c: usize| qkv[r * 3 * hidden + hidden + h * d + c] as f64;
                    let v =
                        |r: usize, c: usize| qkv[r * 3 * hidden + 2 * hidden + h * d + c] as f64;
                    let s: Vec<f64> = (start..start + len)
                        .map(|j| (0..d).map(|c| q(i, c) * k(j, c)).sum::<f64>() / (d as f64).sqrt())
                        .collect();
                    let m = s.iter().cloned().fold(f64::MIN, f64::max);
                    let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                    for c in 0..d {
                        let want: f64 = (start..start + len)
                            .zip(&s)
                            .map(|(j, x)| (x - m).exp() / z * v(j, c))
                            .sum();
                        let got = out[i * hidden + h * d + c] as f64;
                        assert!(
                            (got - want).abs() < 1e-5,
                            "row {i} head {h} col {c}: {got} vs {want}"
                        );
                    }
                }
            }
            start += len;
        }
    }
}
