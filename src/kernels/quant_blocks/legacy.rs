//! The 32-element GGUF block formats: `Q4_0`, `Q4_1`, `Q5_0`, `Q5_1`, `Q8_0` (ggml-common.h).
//!
//! Every format is `w = d · q + c` per block, with `q` small integers: `c` is the stored min
//! (`_1` formats) and zero for the others (`Q4_0` / `Q5_0` store `q` unsigned with an offset of
//! 8 / 16, removed on unpacking as llama.cpp does). A dot with [`BlockQ8`] activations is then
//! `d · x.d · Σ q·xq + c · x.s`: integer products, two float terms per block.
//!
//! Batch invariance: every kernel (`dot_n` for any `N`, `dot2`) computes each output row with the
//! same operations in the same order, so a row's value does not depend on how many activation
//! rows are in the matmul (a sequence decoded alone or in a batch gives the same logits).
//!
//! [`dequantize_block`] is the reference (it follows gguf-py's `gguf.quants` operation for
//! operation, and the tests check it bit for bit); the dot kernels have a scalar version and an
//! AVX2 one chosen at run time.

use super::q8::{BlockQ8, QK};
use crate::kernels::ggml_types::GgmlType;
use half::f16;

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// The 32 high bits of a `Q5_*` block (one per element).
fn qh_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The block's 32 integer levels (elements in order) with `d` and `c`: `w = d·q + c`.
/// `Q4_0`/`Q5_0` levels come back signed (offset removed, `c = 0`).
pub(super) fn unpack(ty: GgmlType, b: &[u8]) -> ([i8; QK], f32, f32) {
    let mut q = [0i8; QK];
    let nibbles = |q: &mut [i8; QK], qs: &[u8], qh: u32, offset: i8| {
        for j in 0..QK / 2 {
            let hi_lo = (((qh >> j) & 1) << 4) as u8;
            let hi_hi = (((qh >> (j + 16)) & 1) << 4) as u8;
            q[j] = ((qs[j] & 0x0F) | hi_lo) as i8 - offset;
            q[j + 16] = ((qs[j] >> 4) | hi_hi) as i8 - offset;
        }
    };
    match ty {
        GgmlType::Q4_0 => {
            nibbles(&mut q, &b[2..18], 0, 8);
            (q, f16_at(b, 0), 0.0)
        }
        GgmlType::Q4_1 => {
            nibbles(&mut q, &b[4..20], 0, 0);
            (q, f16_at(b, 0), f16_at(b, 2))
        }
        GgmlType::Q5_0 => {
            nibbles(&mut q, &b[6..22], qh_at(b, 2), 16);
            (q, f16_at(b, 0), 0.0)
        }
        GgmlType::Q5_1 => {
            nibbles(&mut q, &b[8..24], qh_at(b, 4), 0);
            (q, f16_at(b, 0), f16_at(b, 2))
        }
        GgmlType::Q8_0 => {
            for (q, &v) in q.iter_mut().zip(&b[2..34]) {
                *q = v as i8;
            }
            (q, f16_at(b, 0), 0.0)
        }
        _ => unreachable!("{ty} is not a 32-element block format"),
    }
}

/// One block as f32 values, exactly as gguf-py's reference dequantizer computes them
/// (`d * q` for the symmetric formats, `d * q + m` for the `_1` ones).
pub fn dequantize_block(ty: GgmlType, b: &[u8], out: &mut [f32]) {
    let (q, d, m) = unpack(ty, b);
    let with_min = matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1);
    for (o, &q) in out.iter_mut().zip(&q) {
        *o = if with_min {
            d * q as f32 + m
        } else {
            d * q as f32
        };
    }
}

/// One weight row (`w`, whole blocks of `ty`) dotted with one row of activation blocks.
pub(super) fn dot_scalar(ty: GgmlType, w: &[u8], x: &[BlockQ8]) -> f32 {
    let mut acc = 0f32;
    for (b, x) in w.chunks_exact(ty.block_bytes).zip(x) {
        let (q, d, c) = unpack(ty, b);
        let isum: i32 = q
            .iter()
            .zip(&x.qs)
            .map(|(&a, &b)| a as i32 * b as i32)
            .sum();
        acc += d * x.d * isum as f32 + c * x.s;
    }
    acc
}

/// The AVX2 kernels, one instance per format (`F` is the GGUF type id).
#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use super::super::q8::BlockQ8;
    use crate::kernels::cpu_matmul::hsum;
    use crate::kernels::ggml_types::GgmlType;
    use std::arch::x86_64::*;

    /// A block's levels as 32 bytes (unsigned for `Q4_1`/`Q5_1`, signed for the others) with
    /// `d` and `c`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn unpack<const F: u32>(b: *const u8) -> (__m256i, f32, f32) {
        let nibbles = |p: *const u8| {
            let packed = _mm_loadu_si128(p as *const __m128i);
            let mask = _mm_set1_epi8(0x0F);
            let lo = _mm_and_si128(packed, mask);
            let hi = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
            _mm256_set_m128i(hi, lo)
        };
        // Bit j of `qh` → 0x10 in byte j.
        let high_bits = |qh: u32| {
            let bytes = _mm256_shuffle_epi8(
                _mm256_set1_epi32(qh as i32),
                _mm256_setr_epi64x(
                    0,
                    0x0101_0101_0101_0101,
                    0x0202_0202_0202_0202,
                    0x0303_0303_0303_0303,
                ),
            );
            let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
            let set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
            _mm256_and_si256(set, _mm256_set1_epi8(0x10))
        };
        let f16_at = |at: usize| {
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(u16::from_le_bytes([
                *b.add(at),
                *b.add(at + 1),
            ]) as i32)))
        };
        let qh_at = |at: usize| (b.add(at) as *const u32).read_unaligned();
        // Q4_0 / Q5_0 levels are made signed (offset removed), as llama.cpp does: with the
        // offset applied through the f16 activation sum `s` instead, it would lose precision.
        match F {
            2 => (
                _mm256_sub_epi8(nibbles(b.add(2)), _mm256_set1_epi8(8)),
                f16_at(0),
                0.0,
            ),
            3 => (nibbles(b.add(4)), f16_at(0), f16_at(2)),
            6 => {
                let q = _mm256_or_si256(nibbles(b.add(6)), high_bits(qh_at(2)));
                (_mm256_sub_epi8(q, _mm256_set1_epi8(16)), f16_at(0), 0.0)
            }
            7 => {
                let q = _mm256_or_si256(nibbles(b.add(8)), high_bits(qh_at(4)));
                (q, f16_at(0), f16_at(2))
            }
            _ => (
                _mm256_loadu_si256(b.add(2) as *const __m256i),
                f16_at(0),
                0.0,
            ),
        }
    }

    /// Σ q·x over the block as eight f32 lanes. Unsigned levels go straight into `maddubs`
    /// (31·127·2 fits in i16); signed ones move their sign onto `x` first.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn block_dot<const F: u32>(q: __m256i, x: &BlockQ8) -> __m256 {
        let x8 = _mm256_load_si256(x.qs.as_ptr() as *const __m256i);
        let p16 = if F != GgmlType::Q4_1.id && F != GgmlType::Q5_1.id {
            _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(x8, q))
        } else {
            _mm256_maddubs_epi16(q, x8)
        };
        _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)))
    }

    const fn bytes<const F: u32>() -> usize {
        match F {
            2 => 18,
            3 => 20,
            6 => 22,
            7 => 24,
            _ => 34,
        }
    }

    /// One weight row dotted with `N` activation rows (`x[r]`, one block per weight block):
    /// each weight block is unpacked once for all of them.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_n<const F: u32, const N: usize>(w: &[u8], x: [&[BlockQ8]; N]) -> [f32; N] {
        let bb = bytes::<F>();
        let blocks = w.len() / bb;
        // Two accumulator sets (even/odd blocks) halve the FMA latency chain when N is small.
        let mut acc = [[_mm256_setzero_ps(); N]; 2];
        let mut acc_c = [[0f32; N]; 2];
        for i in 0..blocks {
            let (q, d, c) = unpack::<F>(w.as_ptr().add(i * bb));
            let a = i & 1;
            for r in 0..N {
                let xb = x[r].get_unchecked(i);
                acc[a][r] =
                    _mm256_fmadd_ps(block_dot::<F>(q, xb), _mm256_set1_ps(d * xb.d), acc[a][r]);
                acc_c[a][r] += c * xb.s;
            }
        }
        std::array::from_fn(|r| {
            hsum(_mm256_add_ps(acc[0][r], acc[1][r])) + acc_c[0][r] + acc_c[1][r]
        })
    }

    /// Two weight rows dotted with one activation row (decode), each row with exactly the
    /// arithmetic of [`dot_n`] (even/odd accumulators), so decode alone equals decode in a batch.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot2<const F: u32>(w0: &[u8], w1: &[u8], x: &[BlockQ8]) -> [f32; 2] {
        let bb = bytes::<F>();
        let blocks = w0.len() / bb;
        let mut acc = [[_mm256_setzero_ps(); 2]; 2];
        let mut acc_c = [[0f32; 2]; 2];
        for (i, xb) in x.iter().enumerate().take(blocks) {
            let a = i & 1;
            for (r, w) in [w0, w1].into_iter().enumerate() {
                let (q, d, c) = unpack::<F>(w.as_ptr().add(i * bb));
                acc[a][r] =
                    _mm256_fmadd_ps(block_dot::<F>(q, xb), _mm256_set1_ps(d * xb.d), acc[a][r]);
                acc_c[a][r] += c * xb.s;
            }
        }
        std::array::from_fn(|r| {
            hsum(_mm256_add_ps(acc[0][r], acc[1][r])) + acc_c[0][r] + acc_c[1][r]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::q8::quantize_q8;
    use super::super::tests::random_blocks;
    use super::*;
    use crate::kernels::cpu_matmul::has_avx2_fma_f16c;

    const TYPES: [GgmlType; 5] = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
    ];

    #[test]
    fn avx2_dots_match_the_scalar_dot() {
        if !has_avx2_fma_f16c() {
            return;
        }
        let xs: Vec<f32> = (0..3 * 256)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 9.0)
            .collect();
        let xq = quantize_q8(&xs, true);
        let nb = 8;
        let x: [&[BlockQ8]; 3] = std::array::from_fn(|r| &xq[r * nb..(r + 1) * nb]);
        for ty in TYPES {
            let w = random_blocks(ty, 2 * nb, ty.id as u64);
            let (w0, w1) = w.split_at(nb * ty.block_bytes);
            let want: Vec<f32> = x.iter().map(|x| dot_scalar(ty, w0, x)).collect();
            // SAFETY: features detected above.
            let (got, two) = unsafe {
                match ty.id {
                    2 => (avx2::dot_n::<2, 3>(w0, x), avx2::dot2::<2>(w0, w1, x[0])),
                    3 => (avx2::dot_n::<3, 3>(w0, x), avx2::dot2::<3>(w0, w1, x[0])),
                    6 => (avx2::dot_n::<6, 3>(w0, x), avx2::dot2::<6>(w0, w1, x[0])),
                    7 => (avx2::dot_n::<7, 3>(w0, x), avx2::dot2::<7>(w0, w1, x[0])),
                    _ => (avx2::dot_n::<8, 3>(w0, x), avx2::dot2::<8>(w0, w1, x[0])),
                }
            };
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{ty}: {a} vs {b}");
            }
            assert!(
                (two[0] - want[0]).abs() <= 1e-4 * want[0].abs().max(1.0),
                "{ty}"
            );
            let w1_want = dot_scalar(ty, w1, x[0]);
            assert!(
                (two[1] - w1_want).abs() <= 1e-4 * w1_want.abs().max(1.0),
                "{ty}"
            );
        }
    }
}
