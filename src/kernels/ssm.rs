//! Mamba2 (selective state space) kernels: the causal depthwise conv1d with a per-sequence conv
//! state, the chunked scan for prefill and the one-token recurrence for decode, and the grouped
//! gated RMSNorm. CPU reference; all state is f32.
//!
//! Semantics are transformers' `NemotronHMamba2Mixer.torch_forward` (the reference our fixtures
//! come from). For one sequence, with `heads = H`, `head_dim = P`, `groups = G`, `state = N`:
//!
//! ```text
//! conv:   u[t, c] = silu(bias[c] + Σ_j w[c, j] · in[t − (K−1) + j, c])      in[<0] = conv state
//! dt:     dt[t, h] = max(softplus(dt_raw[t, h] + dt_bias[h]), dt_min)
//! scan:   g = h / (H / G)                                                     (heads share B, C)
//!         s[h, p, n] ← s[h, p, n] · exp(dt·A[h]) + dt · x[t, h, p] · B[t, g, n]
//!         y[t, h, p] = Σ_n s[h, p, n] · C[t, g, n] + D[h] · x[t, h, p]
//! norm:   v = y · silu(z);  per group of `group_size`: v · rsqrt(mean(v²) + eps) · weight
//! ```
//!
//! The chunked scan computes the same as the recurrence, one chunk of tokens at a time (the SSD
//! form): within a chunk `y[t] = Σ_{s≤t} (C_t·B_s) e^{a_t − a_s} dt_s x_s + e^{a_t} C_t·S₀ + D x_t`
//! with `a` the cumulative `dt·A` of the chunk and `S₀` the state entering it, and the state
//! leaving it `e^{a_L} S₀ + Σ_s e^{a_L − a_s} dt_s x_s B_sᵀ`. Every exponent is ≤ 0 (A < 0, dt > 0),
//! so nothing overflows. Its loops are axpy/dot products over contiguous rows, which the
//! compiler vectorises; the recurrence is the same loops for one token.
//!
//! Why our own code: candle 0.11 has no selective-scan op, and its `mamba2.rs` example runs the
//! scan as many small tensor ops per token and normalises over all of `d_inner` instead of per
//! group (wrong for `n_groups > 1`).

use candle_core::Result;
use rayon::prelude::*;

/// `x · σ(x)`.
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `ln(1 + eˣ)`, exact to f32 for large `x` (torch's threshold is 20).
#[inline]
pub fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

/// A depthwise causal conv1d layer: taps stored `[kernel, channels]` (tap-major, so each step is
/// an axpy over channels), bias `[channels]`.
#[derive(Debug, Clone)]
pub struct CausalConv1d {
    pub channels: usize,
    pub kernel: usize,
    taps: Vec<f32>,
    bias: Vec<f32>,
}

impl CausalConv1d {
    /// From the checkpoint's `conv1d.weight [channels, 1, kernel]` (flattened) and bias.
    pub fn new(
        weight: &[f32],
        bias: Option<&[f32]>,
        channels: usize,
        kernel: usize,
    ) -> Result<Self> {
        if kernel == 0 || weight.len() != channels * kernel {
            candle_core::bail!(
                "conv1d: weight holds {} values, expected {channels}×{kernel}",
                weight.len()
            );
        }
        if let Some(b) = bias {
            if b.len() != channels {
                candle_core::bail!("conv1d: bias holds {} values, expected {channels}", b.len());
            }
        }
        let mut taps = vec![0f32; channels * kernel];
        for c in 0..channels {
            for j in 0..kernel {
                taps[j * channels + c] = weight[c * kernel + j];
            }
        }
        Ok(Self {
            channels,
            kernel,
            taps,
            bias: bias.map_or_else(|| vec![0.0; channels], <[f32]>::to_vec),
        })
    }

    /// Values of conv state per sequence: the last `kernel − 1` inputs, `[kernel − 1, channels]`.
    pub fn state_len(&self) -> usize {
        (self.kernel - 1) * self.channels
    }

    /// Runs `x [tokens, channels]` (rows `stride` apart, the first `channels` of each used),
    /// continuing from `state`, writes `silu(conv)` to `out [tokens, channels]` and leaves the
    /// last `kernel − 1` inputs in `state` (oldest first).
    pub fn forward(
        &self,
        x: &[f32],
        stride: usize,
        tokens: usize,
        state: &mut [f32],
        out: &mut [f32],
    ) -> Result<()> {
        let c = self.channels;
        let k = self.kernel;
        if state.len() != self.state_len()
            || out.len() != tokens * c
            || stride < c
            || (tokens > 0 && x.len() < (tokens - 1) * stride + c)
        {
            candle_core::bail!(
                "conv1d: input, state or output do not match {tokens} tokens of {c} channels"
            );
        }
        // The window: conv state then the new inputs, `[k − 1 + tokens, c]`.
        let mut window = Vec::with_capacity((k - 1 + tokens) * c);
        window.extend_from_slice(state);
        for t in 0..tokens {
            window.extend_from_slice(&x[t * stride..t * stride + c]);
        }
        out.par_chunks_mut(c)
            .enumerate()
            .with_min_len(8)
            .for_each(|(t, row)| {
                row.copy_from_slice(&self.bias);
                for j in 0..k {
                    let tap = &self.taps[j * c..(j + 1) * c];
                    let input = &window[(t + j) * c..(t + j + 1) * c];
                    for ((o, w), v) in row.iter_mut().zip(tap).zip(input) {
                        *o += w * v;
                    }
                }
                for o in row.iter_mut() {
                    *o = silu(*o);
                }
            });
        state.copy_from_slice(&window[tokens * c..]);
        Ok(())
    }
}

/// Shapes and per-head constants of one Mamba2 scan.
#[derive(Debug, Clone)]
pub struct SsmScan {
    pub heads: usize,
    pub head_dim: usize,
    pub groups: usize,
    pub state: usize,
    /// `A = −exp(A_log)` per head.
    pub a: Vec<f32>,
    /// Skip `D` per head.
    pub d: Vec<f32>,
    pub dt_bias: Vec<f32>,
    /// Lower bound of `dt` after softplus (transformers' torch path: `time_step_min`).
    pub dt_min: f32,
    /// Tokens per chunk of the prefill scan.
    pub chunk: usize,
}

/// The inputs of a scan over `tokens` tokens of one sequence: conv outputs `xbc [tokens, stride]`
/// holding `x [H·P] | B [G·N] | C [G·N]` at the start of each row, and raw `dt [tokens, H]`.
#[derive(Clone, Copy)]
pub struct ScanInput<'a> {
    pub xbc: &'a [f32],
    pub stride: usize,
    pub dt: &'a [f32],
    pub tokens: usize,
}

impl SsmScan {
    /// Values of SSM state per sequence: `[heads, head_dim, state]`.
    pub fn state_len(&self) -> usize {
        self.heads * self.head_dim * self.state
    }

    fn inner(&self) -> usize {
        self.heads * self.head_dim
    }

    fn check(&self, input: &ScanInput, state: &[f32], out: &[f32]) -> Result<()> {
        let (h, g) = (self.heads, self.groups);
        let width = self.inner() + 2 * g * self.state;
        let t = input.tokens;
        if g == 0 || h % g != 0 {
            candle_core::bail!("ssm scan: {h} heads do not split into {g} groups");
        }
        if self.a.len() != h || self.d.len() != h || self.dt_bias.len() != h || self.chunk == 0 {
            candle_core::bail!("ssm scan: A, D and dt_bias need {h} values each");
        }
        if input.stride < width
            || (t > 0 && input.xbc.len() < (t - 1) * input.stride + width)
            || input.dt.len() != t * h
            || state.len() != self.state_len()
            || out.len() != t * self.inner()
        {
            candle_core::bail!(
                "ssm scan: inputs, state or output do not match {t} tokens ({h} heads × {}, {g} groups × {})",
                self.head_dim,
                self.state
            );
        }
        Ok(())
    }

    /// `dt` after softplus, bias and clamp, `[tokens, heads]`.
    fn discretised_dt(&self, raw: &[f32]) -> Vec<f32> {
        raw.chunks_exact(self.heads)
            .flat_map(|row| {
                row.iter()
                    .zip(&self.dt_bias)
                    .map(|(&v, &b)| softplus(v + b).max(self.dt_min))
            })
            .collect()
    }

    /// The one-token recurrence applied to each token in turn (decode; also the reference the
    /// chunked scan is tested against). `state [H, P, N]` is updated, `out [tokens, H·P]` written.
    pub fn recurrent(&self, input: ScanInput, state: &mut [f32], out: &mut [f32]) -> Result<()> {
        self.check(&input, state, out)?;
        let dt = self.discretised_dt(input.dt);
        let (hd, n) = (self.head_dim, self.state);
        let heads_per_group = self.heads / self.groups;
        let inner = self.inner();
        let b_off = inner;
        let c_off = inner + self.groups * n;
        let per_head = hd * n;
        let run_head = |h: usize, s: &mut [f32], mut y_at: Vec<&mut [f32]>| {
            let g = h / heads_per_group;
            for t in 0..input.tokens {
                let row = &input.xbc[t * input.stride..];
                let x = &row[h * hd..(h + 1) * hd];
                let b = &row[b_off + g * n..b_off + (g + 1) * n];
                let c = &row[c_off + g * n..c_off + (g + 1) * n];
                let dth = dt[t * self.heads + h];
                let decay = (dth * self.a[h]).exp();
                let y = &mut y_at[t];
                for p in 0..hd {
                    let sp = &mut s[p * n..(p + 1) * n];
                    y[p] = update_and_dot(sp, decay, dth * x[p], b, c) + self.d[h] * x[p];
                }
            }
        };
        let mut rows = split_out_by_head(out, input.tokens, inner, hd);
        state
            .par_chunks_mut(per_head)
            .zip(rows.par_iter_mut())
            .enumerate()
            .for_each(|(h, (s, ys))| run_head(h, s, std::mem::take(ys)));
        Ok(())
    }

    /// The chunked scan (prefill): the same result as [`Self::recurrent`], computed chunk by
    /// chunk in the SSD form (module doc). Chunks are `self.chunk` tokens; the last may be shorter
    /// (no padding).
    pub fn chunked(&self, input: ScanInput, state: &mut [f32], out: &mut [f32]) -> Result<()> {
        self.check(&input, state, out)?;
        let dt = self.discretised_dt(input.dt);
        let (hd, n, heads) = (self.head_dim, self.state, self.heads);
        let heads_per_group = heads / self.groups;
        let inner = self.inner();
        let b_off = inner;
        let c_off = inner + self.groups * n;
        let per_head = hd * n;
        let stride = input.stride;
        let xbc = input.xbc;
        let mut rows = split_out_by_head(out, input.tokens, inner, hd);
        // Heads in parallel; each head walks its chunks in order (the state links them).
        state
            .par_chunks_mut(per_head)
            .zip(rows.par_iter_mut())
            .enumerate()
            .for_each(|(h, (s, ys))| {
                let g = h / heads_per_group;
                let bg =
                    |t: usize| &xbc[t * stride + b_off + g * n..t * stride + b_off + (g + 1) * n];
                let cg =
                    |t: usize| &xbc[t * stride + c_off + g * n..t * stride + c_off + (g + 1) * n];
                let xh = |t: usize| &xbc[t * stride + h * hd..t * stride + (h + 1) * hd];
                let mut acum = Vec::with_capacity(self.chunk);
                let mut weights = Vec::with_capacity(self.chunk);
                let mut start = 0;
                while start < input.tokens {
                    let len = self.chunk.min(input.tokens - start);
                    // Cumulative dt·A within the chunk.
                    acum.clear();
                    let mut a = 0f32;
                    for t in start..start + len {
                        a += dt[t * heads + h] * self.a[h];
                        acum.push(a);
                    }
                    for (i, t) in (start..start + len).enumerate() {
                        let y = &mut ys[t];
                        let ct = cg(t);
                        // Inter-chunk: e^{a_t} C_t · S₀ (state entering the chunk).
                        let into = acum[i].exp();
                        for (p, yp) in y.iter_mut().enumerate() {
                            *yp = into * dot(&s[p * n..(p + 1) * n], ct);
                        }
                        // Intra-chunk: Σ_{s≤t} (C_t·B_s) e^{a_t − a_s} dt_s x_s.
                        for (j, src) in (start..=t).enumerate() {
                            let m =
                                dot(ct, bg(src)) * (acum[i] - acum[j]).exp() * dt[src * heads + h];
                            axpy(m, xh(src), y);
                        }
                        let x = xh(t);
                        for (yp, xp) in y.iter_mut().zip(x) {
                            *yp += self.d[h] * xp;
                        }
                    }
                    // State leaving the chunk: e^{a_L} S₀ + Σ_s e^{a_L − a_s} dt_s x_s B_sᵀ.
                    let last = acum[len - 1];
                    weights.clear();
                    weights.extend(
                        (0..len).map(|j| (last - acum[j]).exp() * dt[(start + j) * heads + h]),
                    );
                    let keep = last.exp();
                    for p in 0..hd {
                        let sp = &mut s[p * n..(p + 1) * n];
                        sp.iter_mut().for_each(|v| *v *= keep);
                        for (j, w) in weights.iter().enumerate() {
                            axpy(w * xh(start + j)[p], bg(start + j), sp);
                        }
                    }
                    start += len;
                }
            });
        Ok(())
    }

    /// Chooses the chunked scan for several tokens and the recurrence for one.
    pub fn forward(&self, input: ScanInput, state: &mut [f32], out: &mut [f32]) -> Result<()> {
        if input.tokens > 1 {
            self.chunked(input, state, out)
        } else {
            self.recurrent(input, state, out)
        }
    }
}

/// `out [tokens, inner]` cut into per-head, per-token rows: `rows[h][t]` is `out[t, h·P..(h+1)·P]`.
fn split_out_by_head(
    out: &mut [f32],
    tokens: usize,
    inner: usize,
    hd: usize,
) -> Vec<Vec<&mut [f32]>> {
    let heads = inner / hd;
    let mut rows: Vec<Vec<&mut [f32]>> = (0..heads).map(|_| Vec::with_capacity(tokens)).collect();
    for token_row in out.chunks_mut(inner) {
        for (h, part) in token_row.chunks_mut(hd).enumerate() {
            rows[h].push(part);
        }
    }
    rows
}

/// `s ← s·decay + xdt·b` and returns `Σ s·c` (one state row of the recurrence).
#[inline]
fn update_and_dot(s: &mut [f32], decay: f32, xdt: f32, b: &[f32], c: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            // SAFETY: AVX2 and FMA were detected at run time.
            return unsafe { update_and_dot_avx2(s, decay, xdt, b, c) };
        }
    }
    update_and_dot_portable(s, decay, xdt, b, c)
}

#[inline]
fn update_and_dot_portable(s: &mut [f32], decay: f32, xdt: f32, b: &[f32], c: &[f32]) -> f32 {
    let n = s.len().min(b.len()).min(c.len());
    let whole = n / 8 * 8;
    let (s8, rest) = s[..n].split_at_mut(whole);
    let mut acc = [0f32; 8];
    for ((sc, bc), cc) in s8
        .chunks_exact_mut(8)
        .zip(b.chunks_exact(8))
        .zip(c.chunks_exact(8))
    {
        for l in 0..8 {
            sc[l] = sc[l] * decay + xdt * bc[l];
            acc[l] += sc[l] * cc[l];
        }
    }
    let mut tail = 0f32;
    for ((sv, bv), cv) in rest.iter_mut().zip(&b[whole..]).zip(&c[whole..]) {
        *sv = *sv * decay + xdt * bv;
        tail += *sv * cv;
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn update_and_dot_avx2(s: &mut [f32], decay: f32, xdt: f32, b: &[f32], c: &[f32]) -> f32 {
    // The same loop compiled with AVX2/FMA: eight lanes of partial sums vectorise.
    update_and_dot_portable(s, decay, xdt, b, c)
}

/// `Σ a·b` with eight partial sums (vectorisable without reassociating the compiler's sum).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            // SAFETY: AVX2 and FMA were detected at run time.
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_portable(a, b)
}

#[inline]
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, ar) = a.split_at(a.len() / 8 * 8);
    let (bc, br) = b.split_at(ac.len().min(b.len()));
    for (x, y) in ac.chunks_exact(8).zip(bc.chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f32 = ar.iter().zip(br).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_portable(a, b)
}

/// `y ← y + alpha·x`.
#[inline]
pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (yv, xv) in y.iter_mut().zip(x) {
        *yv += alpha * xv;
    }
}

#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    })
}

/// The grouped gated RMSNorm of the Mamba2 mixer (`norm_before_gate = False`): the gate first,
/// then RMS normalisation within each group of `group_size` features, then the weight.
#[derive(Debug, Clone)]
pub struct GatedGroupNorm {
    pub weight: Vec<f32>,
    pub group_size: usize,
    pub eps: f32,
}

impl GatedGroupNorm {
    /// `y [tokens, width]` and gate `z` (rows `z_stride` apart) → `out [tokens, width]`.
    pub fn forward(&self, y: &[f32], z: &[f32], z_stride: usize, out: &mut [f32]) -> Result<()> {
        let width = self.weight.len();
        if self.group_size == 0 || width % self.group_size != 0 {
            candle_core::bail!(
                "gated norm: width {width} is not a multiple of the group size {}",
                self.group_size
            );
        }
        let tokens = y.len() / width.max(1);
        if y.len() != tokens * width
            || out.len() != y.len()
            || z_stride < width
            || (tokens > 0 && z.len() < (tokens - 1) * z_stride + width)
        {
            candle_core::bail!("gated norm: inputs do not match rows of {width} features");
        }
        out.par_chunks_mut(width).enumerate().for_each(|(t, o)| {
            let yr = &y[t * width..(t + 1) * width];
            let zr = &z[t * z_stride..t * z_stride + width];
            for ((ov, yv), zv) in o.iter_mut().zip(yr).zip(zr) {
                *ov = yv * silu(*zv);
            }
            for (og, wg) in o
                .chunks_mut(self.group_size)
                .zip(self.weight.chunks(self.group_size))
            {
                let mean = dot(og, og) / self.group_size as f32;
                let r = 1.0 / (mean + self.eps).sqrt();
                for (v, w) in og.iter_mut().zip(wg) {
                    *v = w * (*v * r);
                }
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn scan(chunk: usize) -> SsmScan {
        SsmScan {
            heads: 4,
            head_dim: 3,
            groups: 2,
            state: 5,
            a: vec![-0.5, -1.0, -2.0, -0.1],
            d: vec![1.0, 0.5, -0.3, 0.2],
            dt_bias: vec![0.1, -0.2, 0.3, -1.0],
            dt_min: 0.001,
            chunk,
        }
    }

    #[test]
    fn chunked_scan_equals_the_recurrence_for_any_chunking() {
        let tokens = 23;
        let width = 4 * 3 + 2 * 2 * 5;
        let stride = width + 3; // rows with padding: strides are honoured
        let xbc = values(tokens * stride, 1);
        let dt = values(tokens * 4, 2);
        let init = values(4 * 3 * 5, 3);
        let input = ScanInput {
            xbc: &xbc,
            stride,
            dt: &dt,
            tokens,
        };
        let mut s_ref = init.clone();
        let mut y_ref = vec![0f32; tokens * 12];
        scan(1).recurrent(input, &mut s_ref, &mut y_ref).unwrap();
        for chunk in [1, 4, 7, 23, 64] {
            let mut s = init.clone();
            let mut y = vec![0f32; tokens * 12];
            scan(chunk).chunked(input, &mut s, &mut y).unwrap();
            let dy = y
                .iter()
                .zip(&y_ref)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let ds = s
                .iter()
                .zip(&s_ref)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                dy < 1e-5 && ds < 1e-5,
                "chunk {chunk}: |dy| {dy}, |ds| {ds}"
            );
        }
    }

    #[test]
    fn recurrence_matches_a_hand_computed_step() {
        // One head, one group, head_dim 1, state 2: every number by hand.
        let s = SsmScan {
            heads: 1,
            head_dim: 1,
            groups: 1,
            state: 2,
            a: vec![-2.0],
            d: vec![0.5],
            dt_bias: vec![0.0],
            dt_min: 0.0,
            chunk: 8,
        };
        let xbc = [3.0, 1.0, 2.0, 0.5, -1.0]; // x, B[2], C[2]
        let dt_raw = [0.3f32];
        let mut state = vec![1.0, -1.0];
        let mut y = [0f32];
        s.recurrent(
            ScanInput {
                xbc: &xbc,
                stride: 5,
                dt: &dt_raw,
                tokens: 1,
            },
            &mut state,
            &mut y,
        )
        .unwrap();
        let dt = (1.0f32 + 0.3f32.exp()).ln();
        let decay = (-2.0 * dt).exp();
        let s0 = decay + dt * 3.0 * 1.0;
        let s1 = -decay + dt * 3.0 * 2.0;
        assert!((state[0] - s0).abs() < 1e-6 && (state[1] - s1).abs() < 1e-6);
        assert!((y[0] - (s0 * 0.5 - s1 + 1.5)).abs() < 1e-5);
    }

    #[test]
    fn conv_in_pieces_equals_conv_at_once() {
        let (c, k, tokens) = (6, 4, 9);
        let conv = CausalConv1d::new(&values(c * k, 4), Some(&values(c, 5)), c, k).unwrap();
        let x = values(tokens * c, 6);
        let mut st = vec![0f32; conv.state_len()];
        let mut all = vec![0f32; tokens * c];
        conv.forward(&x, c, tokens, &mut st, &mut all).unwrap();
        // By hand for the first two tokens (zero history).
        let w = values(c * k, 4);
        let b = values(c, 5);
        for ch in 0..c {
            let want0 = silu(b[ch] + w[ch * k + 3] * x[ch]);
            let want1 = silu(b[ch] + w[ch * k + 2] * x[ch] + w[ch * k + 3] * x[c + ch]);
            assert!((all[ch] - want0).abs() < 1e-6 && (all[c + ch] - want1).abs() < 1e-6);
        }
        let mut st2 = vec![0f32; conv.state_len()];
        let mut pieces = Vec::new();
        for (a, b) in [(0, 1), (1, 3), (3, 4), (4, 9)] {
            let mut o = vec![0f32; (b - a) * c];
            conv.forward(&x[a * c..b * c], c, b - a, &mut st2, &mut o)
                .unwrap();
            pieces.extend(o);
        }
        assert_eq!(pieces, all);
        assert_eq!(st, st2);
        assert_eq!(&st[..], &x[(tokens - 3) * c..]);
    }

    #[test]
    fn gated_norm_normalises_each_group_separately() {
        let norm = GatedGroupNorm {
            weight: vec![1.0, 2.0, 1.0, 1.0],
            group_size: 2,
            eps: 0.0,
        };
        let big = 50.0; // silu(50) = 50 to f32 precision
        let y = [1.0, 1.0, 3.0, -4.0];
        let z = [big; 4];
        let mut out = [0f32; 4];
        norm.forward(&y, &z, 4, &mut out).unwrap();
        // Group 0: values 50, 50 → rms 50 → 1, 1 (times weights 1, 2); group 1: 150, −200 → rms
        // 176.78 → 0.8485, −1.1314.
        let r1 = (((150.0f32).powi(2) + 200f32.powi(2)) / 2.0).sqrt();
        let want = [1.0, 2.0, 150.0 / r1, -200.0 / r1];
        for (g, w) in out.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{out:?} vs {want:?}");
        }
    }

    #[test]
    fn shape_errors_are_errors() {
        let s = scan(4);
        let mut st = vec![0f32; 3];
        let mut y = vec![0f32; 12];
        let xbc = vec![0f32; 32];
        let dt = vec![0f32; 4];
        let input = ScanInput {
            xbc: &xbc,
            stride: 32,
            dt: &dt,
            tokens: 1,
        };
        assert!(s.recurrent(input, &mut st, &mut y).is_err());
        assert!(CausalConv1d::new(&[0.0; 5], None, 2, 3).is_err());
    }
}
