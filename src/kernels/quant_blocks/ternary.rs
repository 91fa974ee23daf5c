//! The ternary GGUF super-blocks `TQ1_0` (1.6875 bits per weight) and `TQ2_0` (2.0625), BitNet
//! b1.58 / TriLM weights in {−1, 0, 1} times one f16 scale per 256 elements (ggml-common.h).
//!
//! With [`BlockQ8K`] activations a super-block's dot is `d · x.d · (Σ l·q − Σ q)` where `l` ∈
//! {0, 1, 2} is the stored level (weight `l − 1`) and `Σ q` comes from the activation block's
//! group sums: no weight is ever multiplied as a float, and the level products are one `maddubs`
//! per 32 elements. Unpacking is shifts and masks (`TQ2_0`) or, for `TQ1_0`'s base-3 bytes,
//! repeated byte tripling (`3·v = v + v + v`, wrapping: the trit `n` of a byte is the top trit of
//! `3ⁿ·byte mod 256`) and two comparisons (`⌊3q/256⌋ = [q ≥ 86] + [q ≥ 171]`): multiply-free.
//!
//! Why not BitNet's TL table lookups (pshufb over per-activation-group sums): with 8-bit
//! activations the maddubs form already reads each weight byte once and does 32 level products
//! per instruction; the lookup tables must be rebuilt per activation row, which only pays when
//! many weight rows share them *and* the unpack is the bottleneck. Measured in
//! docs/performance.md.
//!
//! On CPUs with AVX-512 VNNI the matrices are repacked instead ([`super::repacked_tq`]), and
//! these row kernels serve the rest (and `XLLM_NO_AVX512=1`).
//!
//! [`dequantize_block`] is gguf-py's `dequantize_blocks` for each type, written apart from
//! [`unpack`] so each checks the other.

use super::q8::{BlockQ8K, QK_K};
use crate::kernels::ggml_types::GgmlType;
use half::f16;

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// The trit `n` (0 = most significant) of a TQ1_0 byte: `⌊3 · (byte · 3ⁿ mod 256) / 256⌋`.
fn trit(byte: u8, n: u32) -> u8 {
    let q = byte.wrapping_mul(3u8.pow(n));
    ((q as u16 * 3) >> 8) as u8
}

/// One super-block's levels (0, 1, 2 for −1, 0, 1) in element order, and its scale.
pub fn unpack(ty: GgmlType, b: &[u8]) -> ([u8; QK_K], f32) {
    let mut l = [0u8; QK_K];
    match ty {
        GgmlType::TQ1_0 => {
            for n in 0..5 {
                for m in 0..32 {
                    l[32 * n + m] = trit(b[m], n as u32);
                }
                for m in 0..16 {
                    l[160 + 16 * n + m] = trit(b[32 + m], n as u32);
                }
            }
            for n in 0..4 {
                for j in 0..4 {
                    l[240 + 4 * n + j] = trit(b[48 + j], n as u32);
                }
            }
            (l, f16_at(b, 52))
        }
        GgmlType::TQ2_0 => {
            for (e, v) in l.iter_mut().enumerate() {
                let (half, n, m) = (e / 128, (e / 32) % 4, e % 32);
                *v = (b[32 * half + m] >> (2 * n)) & 3;
            }
            (l, f16_at(b, 64))
        }
        _ => unreachable!("{ty} is not a ternary type"),
    }
}

/// One super-block as f32 values, as gguf-py computes them (`(l − 1) · d`).
pub fn dequantize_block(ty: GgmlType, b: &[u8], out: &mut [f32]) {
    match ty {
        GgmlType::TQ1_0 => {
            const POW3: [u8; 5] = [1, 3, 9, 27, 81];
            let d = f16_at(b, 52);
            let val = |byte: u8, n: usize| {
                let q = byte.wrapping_mul(POW3[n]);
                (((q as u16 * 3) >> 8) as i16 - 1) as f32 * d
            };
            // qs[0..32] × 5 trits, qs[32..48] × 5 trits, qh[0..4] × 4 trits.
            let mut e = 0;
            for (bytes, trits) in [(&b[..32], 5), (&b[32..48], 5), (&b[48..52], 4)] {
                for n in 0..trits {
                    for &byte in bytes {
                        out[e] = val(byte, n);
                        e += 1;
                    }
                }
            }
        }
        GgmlType::TQ2_0 => {
            let d = f16_at(b, 64);
            let mut e = 0;
            for j in 0..2 {
                for n in 0..4 {
                    for m in 0..32 {
                        let q = (b[32 * j + m] >> (2 * n)) & 3;
                        out[e] = (q as i16 - 1) as f32 * d;
                        e += 1;
                    }
                }
            }
        }
        _ => unreachable!("{ty} is not a ternary type"),
    }
}

/// TQ2_0 blocks with scale 1 holding `levels` (0, 1, 2 for −1, 0, 1; a multiple of 256): ternary
/// weights stored exactly, their scale kept apart (BitNet's per-tensor `weight_scale`).
pub fn tq2_0_unit_blocks(levels: &[u8]) -> Vec<u8> {
    let one = f16::from_f32(1.0).to_le_bytes();
    let mut out = Vec::with_capacity(levels.len() / QK_K * 66);
    for l in levels.chunks_exact(QK_K) {
        for half in 0..2 {
            for m in 0..32 {
                let mut byte = 0u8;
                for n in 0..4 {
                    byte |= (l[128 * half + 32 * n + m] & 3) << (2 * n);
                }
                out.push(byte);
            }
        }
        out.extend_from_slice(&one);
    }
    out
}

/// Portable dot of a weight row with one activation row (and the reference for the AVX2 one).
pub fn dot_scalar(ty: GgmlType, w: &[u8], x: &[BlockQ8K]) -> f32 {
    let mut acc = 0f32;
    for (b, xb) in w.chunks_exact(ty.block_bytes).zip(x) {
        let (l, d) = unpack(ty, b);
        let mut sum = 0i32;
        for (&lv, &q) in l.iter().zip(&xb.qs) {
            sum += lv as i32 * q as i32;
        }
        let qsum: i32 = xb.bsums.iter().map(|&s| s as i32).sum();
        acc += d * xb.d * (sum - qsum) as f32;
    }
    acc
}

#[cfg(target_arch = "x86_64")]
pub mod avx2 {
    //! The AVX2 kernel: levels unpacked into eight 32-byte vectors per super-block, then one
    //! `maddubs` (unsigned level × signed activation) per vector, summed in 16 bits (8 × 512 fits)
    //! and widened once per super-block.

    use super::super::q8::BlockQ8K;
    use crate::kernels::cpu_matmul::hsum;
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn load(p: *const u8) -> __m256i {
        _mm256_loadu_si256(p as *const __m256i)
    }

    /// Bytes times 3, wrapping (multiply-free: two byte additions).
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn triple(v: __m256i) -> __m256i {
        _mm256_add_epi8(_mm256_add_epi8(v, v), v)
    }

    /// The top trit of each byte: `⌊3q/256⌋ = [q ≥ 86] + [q ≥ 171]` (unsigned; no closures here:
    /// a closure would not inherit the target features, and every intrinsic would become a call).
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn top_trit(q: __m256i) -> __m256i {
        let ge86 = _mm256_cmpeq_epi8(_mm256_max_epu8(q, _mm256_set1_epi8(86)), q);
        let ge171 = _mm256_cmpeq_epi8(_mm256_max_epu8(q, _mm256_set1_epi8(171u8 as i8)), q);
        // Each comparison is −1 where true: 0 − (−1) − (−1).
        _mm256_sub_epi8(_mm256_sub_epi8(_mm256_setzero_si256(), ge86), ge171)
    }

    /// The f16 at `b + at` (F16C).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn f16_at(b: *const u8, at: usize) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
            (b.add(at) as *const u16).read_unaligned() as i32,
        )))
    }

    /// Eight vectors of 32 levels (elements `32k..32k + 32`) and the block scale.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn unpack<const F: u32>(b: *const u8) -> ([__m256i; 8], f32) {
        let mut q = [_mm256_setzero_si256(); 8];
        if F == 35 {
            // TQ2_0: qs[64] | d; byte m of half j holds elements 128j + 32n + m in bits 2n.
            let m3 = _mm256_set1_epi8(3);
            for j in 0..2 {
                let v = load(b.add(32 * j));
                q[4 * j] = _mm256_and_si256(v, m3);
                q[4 * j + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 2), m3);
                q[4 * j + 2] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m3);
                q[4 * j + 3] = _mm256_and_si256(_mm256_srli_epi16(v, 6), m3);
            }
            (q, f16_at(b, 64))
        } else {
            // TQ1_0: qs[0..32] (5 trits: elements 32n + m), qs[32..48] (5 trits: elements
            // 160 + 16n + m), qh[0..4] (4 trits: elements 240 + 4n + j), d.
            let mut v = load(b);
            for k in q.iter_mut().take(5) {
                *k = top_trit(v);
                v = triple(v);
            }
            // The 16 bytes in both lanes, the high lane one trit ahead: (n, n + 1) per vector.
            let s = _mm_loadu_si128(b.add(32) as *const __m128i);
            let s3 = _mm_add_epi8(_mm_add_epi8(s, s), s);
            let mut w = _mm256_set_m128i(s3, s);
            q[5] = top_trit(w); // trits 0, 1: elements 160..192
            w = triple(triple(w));
            q[6] = top_trit(w); // trits 2, 3: elements 192..224
            w = triple(triple(w));
            // Trit 4 (elements 224..240) and qh's 16 trits (240..256).
            let h = u32::from_le_bytes([*b.add(48), *b.add(49), *b.add(50), *b.add(51)]);
            let hv = _mm_set1_epi32(h as i32);
            // Byte 4n + j holds byte j tripled n times.
            let h1 = _mm_add_epi8(_mm_add_epi8(hv, hv), hv);
            let h2 = _mm_add_epi8(_mm_add_epi8(h1, h1), h1);
            let h3 = _mm_add_epi8(_mm_add_epi8(h2, h2), h2);
            let hq = _mm_blend_epi32(
                _mm_blend_epi32(hv, h1, 0b0010),
                _mm_blend_epi32(h2, h3, 0b1000),
                0b1100,
            );
            let last = _mm256_set_m128i(hq, _mm256_castsi256_si128(w));
            q[7] = top_trit(last);
            (q, f16_at(b, 52))
        }
    }

    const fn bytes<const F: u32>() -> usize {
        if F == 35 {
            66
        } else {
            54
        }
    }

    /// One weight row dotted with `N` activation rows: each weight super-block is unpacked once
    /// for all of them, and every row sees the same operations in the same order.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available; `w` holds whole blocks of type `F` and every `x[r]`
    /// at least as many activation blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::needless_range_loop)]
    pub unsafe fn dot_n<const F: u32, const N: usize>(w: &[u8], x: [&[BlockQ8K]; N]) -> [f32; N] {
        let bb = bytes::<F>();
        let blocks = w.len() / bb;
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); N];
        for i in 0..blocks {
            let (q, d) = unpack::<F>(w.as_ptr().add(i * bb));
            for r in 0..N {
                let xb = x[r].get_unchecked(i);
                let xq = xb.qs.as_ptr();
                let mut s16 = _mm256_setzero_si256();
                for k in 0..8 {
                    let x8 = _mm256_load_si256(xq.add(32 * k) as *const __m256i);
                    s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(q[k], x8));
                }
                let bs = _mm256_loadu_si256(xb.bsums.as_ptr() as *const __m256i);
                let sumi =
                    _mm256_sub_epi32(_mm256_madd_epi16(s16, ones), _mm256_madd_epi16(bs, ones));
                acc[r] =
                    _mm256_fmadd_ps(_mm256_set1_ps(d * xb.d), _mm256_cvtepi32_ps(sumi), acc[r]);
            }
        }
        std::array::from_fn(|r| hsum(acc[r]))
    }

    /// Two weight rows dotted with one activation row (decode): each activation vector is loaded
    /// once for both. Per row the same operations in the same order as [`dot_n`], so a row's
    /// result does not depend on which kernel computed it.
    ///
    /// # Safety
    /// As [`dot_n`]: AVX2, FMA and F16C available, `w0`/`w1` of equal length in whole blocks,
    /// `x` at least as many blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot2<const F: u32>(w0: &[u8], w1: &[u8], x: &[BlockQ8K]) -> [f32; 2] {
        let bb = bytes::<F>();
        let blocks = w0.len() / bb;
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); 2];
        for i in 0..blocks {
            let (q0, d0) = unpack::<F>(w0.as_ptr().add(i * bb));
            let (q1, d1) = unpack::<F>(w1.as_ptr().add(i * bb));
            let xb = x.get_unchecked(i);
            let xq = xb.qs.as_ptr();
            let mut s0 = _mm256_setzero_si256();
            let mut s1 = _mm256_setzero_si256();
            for k in 0..8 {
                let x8 = _mm256_load_si256(xq.add(32 * k) as *const __m256i);
                s0 = _mm256_add_epi16(s0, _mm256_maddubs_epi16(q0[k], x8));
                s1 = _mm256_add_epi16(s1, _mm256_maddubs_epi16(q1[k], x8));
            }
            let bs = _mm256_madd_epi16(
                _mm256_loadu_si256(xb.bsums.as_ptr() as *const __m256i),
                ones,
            );
            let i0 = _mm256_sub_epi32(_mm256_madd_epi16(s0, ones), bs);
            let i1 = _mm256_sub_epi32(_mm256_madd_epi16(s1, ones), bs);
            acc[0] = _mm256_fmadd_ps(_mm256_set1_ps(d0 * xb.d), _mm256_cvtepi32_ps(i0), acc[0]);
            acc[1] = _mm256_fmadd_ps(_mm256_set1_ps(d1 * xb.d), _mm256_cvtepi32_ps(i1), acc[1]);
        }
        [hsum(acc[0]), hsum(acc[1])]
    }
}

#[cfg(test)]
mod tests {
    use super::super::q8::quantize_q8k;
    use super::super::tests::random_blocks;
    use super::*;
    use crate::kernels::cpu_matmul::has_avx2_fma_f16c;

    #[test]
    fn unpacked_levels_reconstruct_the_reference_values() {
        for ty in [GgmlType::TQ1_0, GgmlType::TQ2_0] {
            let b = random_blocks(ty, 4, 3 + ty.id as u64);
            for blk in b.chunks_exact(ty.block_bytes) {
                let mut want = [0f32; QK_K];
                dequantize_block(ty, blk, &mut want);
                let (l, d) = unpack(ty, blk);
                for e in 0..QK_K {
                    assert_eq!((l[e] as f32 - 1.0) * d, want[e], "{ty} [{e}]");
                }
            }
        }
    }

    #[test]
    fn unit_blocks_hold_the_levels() {
        let levels: Vec<u8> = (0..512).map(|i| (i * 7 % 3) as u8).collect();
        let b = tq2_0_unit_blocks(&levels);
        assert_eq!(b.len(), 2 * 66);
        for (k, blk) in b.chunks_exact(66).enumerate() {
            let (l, d) = unpack(GgmlType::TQ2_0, blk);
            assert_eq!(d, 1.0);
            assert_eq!(&l[..], &levels[256 * k..256 * (k + 1)]);
        }
    }

    #[test]
    fn avx2_dot_matches_the_scalar_dot() {
        if !has_avx2_fma_f16c() {
            return;
        }
        let nb = 3;
        let xs: Vec<f32> = (0..4 * nb * QK_K)
            .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 97.0)
            .collect();
        let xq = quantize_q8k(&xs, true);
        let x: [&[BlockQ8K]; 4] = std::array::from_fn(|r| &xq[r * nb..(r + 1) * nb]);
        for ty in [GgmlType::TQ1_0, GgmlType::TQ2_0] {
            let w = random_blocks(ty, nb, ty.id as u64);
            let want: Vec<f32> = x.iter().map(|x| dot_scalar(ty, &w, x)).collect();
            // SAFETY: features detected above.
            let (one, four) = unsafe {
                if ty == GgmlType::TQ1_0 {
                    (
                        avx2::dot_n::<34, 1>(&w, [x[0]]),
                        avx2::dot_n::<34, 4>(&w, x),
                    )
                } else {
                    (
                        avx2::dot_n::<35, 1>(&w, [x[0]]),
                        avx2::dot_n::<35, 4>(&w, x),
                    )
                }
            };
            for (a, b) in four.iter().chain(&one).zip(want.iter().chain(&want[..1])) {
                assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{ty}: {a} vs {b}");
            }
        }
    }
}
