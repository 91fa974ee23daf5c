//! Activations quantized to 8-bit blocks, so weight blocks are dotted with them in integer
//! arithmetic: the 32-element blocks of llama.cpp's `Q8_0`/`Q8_1` and the 256-element `Q8_K`,
//! quantized as llama.cpp does it, so the integer products are the same as llama.cpp's:
//!
//! - 32-element blocks: `d = amax / 127`, `q = round(x · 127 / amax)` half to even (as x86
//!   `quantize_row_q8_1` with `_mm256_round_ps`), `d` and `s = d · Σq` kept at f16 precision as its
//!   block stores them. Exact ties are rare, yet on SmolLM2 Q4_1 half-away rounding moved the
//!   338-token perplexity by 0.25 %: such details are the noise floor of perplexity comparisons.
//! - 256-element blocks: the largest-magnitude value maps to −128 (`iscale = −128 / max`),
//!   `q = min(127, round(iscale · x))`, `d = 1 / iscale` in f32, plus the sums of each 16 `q`.

#[cfg(target_arch = "x86_64")]
use crate::kernels::cpu_matmul::hsum;

/// Elements of a 32-element block.
pub const QK: usize = 32;
/// Elements of a k-quant super-block.
pub const QK_K: usize = 256;

/// 32 activations: `x ≈ d · q`, with `s = d · Σq` (for formats with a min or an offset).
#[derive(Clone, Copy)]
#[repr(C, align(32))]
pub struct BlockQ8 {
    pub qs: [i8; QK],
    pub d: f32,
    pub s: f32,
}

/// 256 activations: `x ≈ d · q`, with the sums of each 16 `q` (for the k-quants' mins/offsets).
#[derive(Clone, Copy)]
#[repr(C, align(32))]
pub struct BlockQ8K {
    pub qs: [i8; QK_K],
    pub d: f32,
    pub bsums: [i16; QK_K / 16],
}

impl BlockQ8 {
    /// The values this block stands for (tests compare products against them).
    #[cfg(test)]
    pub fn dequantize(&self) -> Vec<f32> {
        self.qs.iter().map(|&q| self.d * q as f32).collect()
    }
}

impl BlockQ8K {
    #[cfg(test)]
    pub fn dequantize(&self) -> Vec<f32> {
        self.qs.iter().map(|&q| self.d * q as f32).collect()
    }
}

/// `xs` (a multiple of 32 long) as 32-element blocks.
pub fn quantize_q8(xs: &[f32], avx2: bool) -> Vec<BlockQ8> {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: AVX2, FMA and F16C were detected at run time by the caller.
        return xs
            .chunks_exact(QK)
            .map(|x| unsafe { quantize_q8_avx2(x) })
            .collect();
    }
    let _ = avx2;
    xs.chunks_exact(QK).map(quantize_q8_scalar).collect()
}

/// `xs` (a multiple of 256 long) as 256-element blocks.
pub fn quantize_q8k(xs: &[f32], avx2: bool) -> Vec<BlockQ8K> {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: AVX2, FMA and F16C were detected at run time by the caller.
        return xs
            .chunks_exact(QK_K)
            .map(|x| unsafe { quantize_q8k_avx2(x) })
            .collect();
    }
    let _ = avx2;
    xs.chunks_exact(QK_K).map(quantize_q8k_scalar).collect()
}

/// BitNet b1.58's activation quantization (transformers' `BitLinear.activation_quant`): each row
/// of `cols` values (a multiple of 256) to int8 with one scale per row, `s = 127 / max(amax,
/// 1e-5)`, `q = clamp(round_half_even(x · s), −128, 127)`, stored as 256-element blocks that all
/// carry `d = 1 / s`. The model was trained with exactly this rounding, so it is part of the model.
pub fn quantize_per_token(xs: &[f32], cols: usize) -> Vec<BlockQ8K> {
    let mut out = Vec::with_capacity(xs.len() / QK_K);
    for row in xs.chunks_exact(cols) {
        let amax = row.iter().fold(0f32, |a, v| a.max(v.abs()));
        let s = 127.0 / amax.max(1e-5);
        for x in row.chunks_exact(QK_K) {
            let mut qs = [0i8; QK_K];
            for (q, v) in qs.iter_mut().zip(x) {
                *q = (v * s).round_ties_even().clamp(-128.0, 127.0) as i8;
            }
            out.push(BlockQ8K {
                qs,
                d: 1.0 / s,
                bsums: bsums(&qs),
            });
        }
    }
    out
}

/// The 32-element block scale and its inverse (llama.cpp: `d = amax / 127`, `id = 127 / amax`).
fn scale_of(amax: f32) -> (f32, f32) {
    (amax / 127.0, if amax != 0.0 { 127.0 / amax } else { 0.0 })
}

/// An f32 rounded to f16 precision (the block stores it as f16).
fn f16_round(v: f32) -> f32 {
    half::f16::from_f32(v).to_f32()
}

pub(super) fn quantize_q8_scalar(x: &[f32]) -> BlockQ8 {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let (d, id) = scale_of(amax);
    let mut qs = [0i8; QK];
    let mut sum = 0i32;
    for (q, v) in qs.iter_mut().zip(x) {
        *q = (v * id).round_ties_even() as i8;
        sum += *q as i32;
    }
    BlockQ8 {
        qs,
        d: f16_round(d),
        s: f16_round(d * sum as f32),
    }
}

/// llama.cpp's `quantize_row_q8_K` (portable; [`quantize_q8k_avx2`] gives the same blocks).
pub(super) fn quantize_q8k_scalar(x: &[f32]) -> BlockQ8K {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    let mut qs = [0i8; QK_K];
    if amax == 0.0 {
        return BlockQ8K {
            qs,
            d: 0.0,
            bsums: [0; QK_K / 16],
        };
    }
    let iscale = -128.0 / max;
    for (q, v) in qs.iter_mut().zip(x) {
        *q = (iscale * v).round_ties_even().min(127.0) as i8;
    }
    BlockQ8K {
        qs,
        d: 1.0 / iscale,
        bsums: bsums(&qs),
    }
}

#[inline(always)]
fn bsums(qs: &[i8; QK_K]) -> [i16; QK_K / 16] {
    std::array::from_fn(|g| qs[16 * g..16 * g + 16].iter().map(|&q| q as i16).sum())
}

/// Largest |x| over `v`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn amax(v: &[std::arch::x86_64::__m256]) -> f32 {
    use std::arch::x86_64::*;
    let sign = _mm256_set1_ps(-0.0);
    let amax8 = v.iter().fold(_mm256_setzero_ps(), |a, &x| {
        _mm256_max_ps(a, _mm256_andnot_ps(sign, x))
    });
    let amax4 = _mm_max_ps(
        _mm256_extractf128_ps(amax8, 1),
        _mm256_castps256_ps128(amax8),
    );
    let amax2 = _mm_max_ps(amax4, _mm_movehl_ps(amax4, amax4));
    _mm_cvtss_f32(_mm_max_ss(amax2, _mm_shuffle_ps(amax2, amax2, 1)))
}

/// 32 values times `id`, rounded to i8 and stored in `out`; returns Σq.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn round_store_32(v: &[std::arch::x86_64::__m256], id: f32, out: &mut [i8]) -> i32 {
    use std::arch::x86_64::*;
    let id = _mm256_set1_ps(id);
    let q: [__m256i; 4] = std::array::from_fn(|i| {
        _mm256_cvtps_epi32(_mm256_round_ps(
            _mm256_mul_ps(v[i], id),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        ))
    });
    let sum32 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    let sum = hsum(_mm256_cvtepi32_ps(sum32)) as i32;
    // i32 → i16 → i8 packs interleave the 128-bit lanes; the permute restores element order.
    let q16a = _mm256_packs_epi32(q[0], q[1]);
    let q16b = _mm256_packs_epi32(q[2], q[3]);
    let q8 = _mm256_packs_epi16(q16a, q16b);
    let q8 = _mm256_permutevar8x32_epi32(q8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, q8);
    sum
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_q8_avx2(x: &[f32]) -> BlockQ8 {
    use std::arch::x86_64::*;
    let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(x.as_ptr().add(8 * i)));
    let (d, id) = scale_of(amax(&v));
    let mut out = BlockQ8 {
        qs: [0; QK],
        d: f16_round(d),
        s: 0.0,
    };
    let sum = round_store_32(&v, id, &mut out.qs);
    out.s = f16_round(d * sum as f32);
    out
}

/// [`quantize_q8k_scalar`] with AVX2, the same blocks bit for bit. Why: the portable loop's
/// `round_ties_even` is a libm call per value on baseline x86-64, and with the AVX-512 ternary
/// kernels it took ~7 % of a decoded token (docs/performance.md).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_q8k_avx2(x: &[f32]) -> BlockQ8K {
    use std::arch::x86_64::*;
    let v: [__m256; QK_K / 8] = std::array::from_fn(|i| _mm256_loadu_ps(x.as_ptr().add(8 * i)));
    let amax = amax(&v);
    // The first value of largest magnitude sets the scale's sign (as in the scalar loop); none
    // found (a NaN) or all zero: the portable path decides.
    let Some(&max) = x.iter().find(|v| v.abs() == amax).filter(|_| amax != 0.0) else {
        return quantize_q8k_scalar(x);
    };
    let iscale = -128.0 / max;
    let mut qs = [0i8; QK_K];
    for (c, q) in qs.chunks_exact_mut(32).enumerate() {
        // The i16 → i8 pack saturates at 127: the scalar loop's `min(127.0)`.
        round_store_32(&v[4 * c..4 * c + 4], iscale, q);
    }
    BlockQ8K {
        qs,
        d: 1.0 / iscale,
        bsums: bsums(&qs),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu_matmul::has_avx2_fma_f16c;

    fn sample(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 37.0)
            .collect()
    }

    #[test]
    fn simd_and_scalar_quantization_agree() {
        if !has_avx2_fma_f16c() {
            return;
        }
        let xs = sample(4 * QK_K);
        for (a, b) in quantize_q8(&xs, false).iter().zip(quantize_q8(&xs, true)) {
            assert_eq!(a.qs, b.qs);
            assert_eq!(a.d, b.d);
            assert!((a.s - b.s).abs() <= 1e-5 * a.s.abs().max(1.0));
        }
        // 256-element blocks: identical, including a block whose largest magnitude is positive
        // and one whose opposite-sign value of equal magnitude is clipped to 127, and zeros.
        let mut xs = sample(4 * QK_K);
        xs[QK_K + 5] = 100.0;
        xs[2 * QK_K + 7] = -100.0;
        xs[2 * QK_K + 9] = 100.0;
        xs[3 * QK_K..].fill(0.0);
        for (a, b) in quantize_q8k(&xs, false).iter().zip(quantize_q8k(&xs, true)) {
            assert_eq!(a.qs, b.qs);
            assert_eq!(a.d.to_bits(), b.d.to_bits());
            assert_eq!(a.bsums, b.bsums);
        }
    }

    #[test]
    fn blocks_reconstruct_their_input() {
        let xs = sample(QK_K);
        let k = &quantize_q8k(&xs, false)[0];
        let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
        for (x, y) in xs.iter().zip(k.dequantize()) {
            assert!((x - y).abs() <= amax / 254.0 * 1.0001, "{x} vs {y}");
        }
        assert_eq!(
            k.bsums[3],
            k.qs[48..64].iter().map(|&q| q as i16).sum::<i16>()
        );
        // llama.cpp's Q8_K: the largest magnitude becomes −128.
        let at = (0..QK_K)
            .max_by(|&a, &b| xs[a].abs().total_cmp(&xs[b].abs()))
            .unwrap();
        assert_eq!(k.qs[at], -128);
        let zero = quantize_q8(&[0.0; QK], false);
        assert_eq!((zero[0].d, zero[0].s, zero[0].qs), (0.0, 0.0, [0; QK]));
    }
}
