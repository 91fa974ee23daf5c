//! MXFP4 matmul with integer activations: the CPU path of gpt-oss's experts.
//!
//! Same weight layout and result as [`super::mxfp4::mxfp4_matmul_cpu`] (the f32 reference the GPU
//! kernels and this path are tested against). Each 32-element activation block is first turned
//! into 24-bit integers (`q = round(x / d)`, `d = max|x| / (2²³ − 1)`, `d` kept in f32) split into
//! three byte planes (`q = 65536·hi + 256·mid + lo`, `hi` signed, `mid` and `lo` unsigned), so
//! the dot of a weight block with an activation block is integer byte dot products:
//!
//! - E2M1 codes become integers by doubling (`2 · {0, ½, 1, 1½, 2, 3, 4, 6}` = `{0, 1, 2, 3, 4, 6,
//!   8, 12}`, with sign), looked up with `vpermb` (AVX-512 VBMI) or `vpshufb` (AVX2) in two
//!   16-entry byte tables: the signed value `w` (against the unsigned `mid` and `lo` planes) and
//!   `w + 12 ∈ [0, 24]` (unsigned, against the signed `hi` plane; the `+12` is taken out with
//!   `12 · Σhi` of the activation block, computed once per activation row);
//! - `vpdpbusd` (AVX-512 VNNI) or `vpmaddubsw` (AVX2) multiply unsigned by signed bytes; the three
//!   planes' sums are recombined exactly in i32 and the block's sum is scaled once by
//!   `2^(s − 127) · d / 2` in f32.
//!
//! Why 24 bits and not llama.cpp's 8 (`Q8_0`): with 8-bit activations the tiny random test fixture's
//! logits moved by up to 0.43 from transformers' (llama.cpp's own: 1.2), and a rounding level that
//! flips between a chunked and a one-shot prefill (their upstream f32 sums differ in the last bit)
//! changed logits by 0.045, breaking the batch-invariance and greedy-token tests. 24 bits put the
//! activation rounding (at most one level, `max|x| · 1.2e-7`) at the level of f32's own rounding, so
//! results match the f32 kernel within its tolerances. Decode stays memory-bound on these kernels
//! (docs/performance.md), so the extra byte planes cost little there.
//!
//! Why our own kernel: a 4-bit E2M1 code widened to f32 costs a table permute, a sign xor and a
//! widening per 8 values (the f32 path, port-bound); here one instruction does 64 products.
//!
//! Batch invariance: a token's activations are converted on their own and every token's dot runs
//! the same operations in the same order whatever the number of tokens sharing the call, so an
//! expert's output for a token does not depend on which other tokens were routed to it.
//!
//! E8M0 edge values: the scale is built as the f32 bit pattern `s << 23`, so `s = 0` gives `0`
//! instead of `2^-127` (a contribution below f32 resolution of anything non-tiny) and `s = 255`
//! gives `∞` instead of NaN (the output is still non-finite). Neither occurs in real checkpoints.

use candle_core::Result;
use rayon::prelude::*;

use super::mxfp4::{check_shapes, BLOCK_BYTES, BLOCK_VALUES};

/// Blocks per "quad": the 64 code bytes of four blocks fill one 512-bit register.
const QUAD_BLOCKS: usize = 4;
/// Tokens whose dots share one decode of a weight row's quad.
pub const TOKEN_GROUP: usize = 8;
/// The largest level: activations are 24-bit signed integers.
const LEVELS: f32 = 8_388_607.0;
/// `2v` for each E2M1 code `v`, as a signed byte.
const LUT_SIGNED: [u8; 16] = [
    0, 1, 2, 3, 4, 6, 8, 12, 0, 255, 254, 253, 252, 250, 248, 244,
];
/// `2v + 12` for each E2M1 code `v` (unsigned).
const LUT_OFFSET: [u8; 16] = [12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0];
const OFFSET: i32 = 12;
/// Bytes of packed codes prefetched ahead of the one being read (about three 1.5 KB rows of a
/// gpt-oss expert). Decode reads each expert row once, straight from memory: without it the
/// loads wait on DRAM and two threads read ~15 GB/s; with it ~25 GB/s, near what two cores can
/// stream (a C copy of this loop over 32 real-width experts, 2 threads: 15.0 GB/s without,
/// 22.6 / 24.9 / 25.4 / 22.8 GB/s at 2 / 4 / 6 / 8 KB ahead). Rows of one task are contiguous, so
/// the prefetch runs on into the next row; past the matrix it is a harmless no-op.
const AHEAD: usize = 4096;
/// Scale bytes prefetched ahead: the same rows' worth as [`AHEAD`] (one scale per 16 code bytes).
const AHEAD_SCALES: usize = AHEAD / BLOCK_BYTES;

/// One byte plane of four activation blocks, in the order the kernels read them.
#[derive(Clone, Copy)]
#[repr(C)]
struct Plane {
    /// Byte `16b + j`: element `2j` of block `b` (the low nibbles' partners).
    even: [u8; 64],
    /// Byte `16b + j`: element `2j + 1` of block `b` (the high nibbles').
    odd: [u8; 64],
}

/// Four converted activation blocks.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub struct QuadI24 {
    /// Bits 0–7 (unsigned), 8–15 (unsigned) and 16–23 (signed) of each level.
    planes: [Plane; 3],
    /// `−12 · Σhi` of block `b` in lane `4b`, zero elsewhere: the top plane's starting value.
    neg_offset: [i32; 16],
    /// `d / 2` of block `b` in lanes `4b..4b + 4` (the `/2` undoes the doubled tables).
    half_d: [f32; 16],
}

const ZERO_PLANE: Plane = Plane {
    even: [0; 64],
    odd: [0; 64],
};
const ZERO_QUAD: QuadI24 = QuadI24 {
    planes: [ZERO_PLANE; 3],
    neg_offset: [0; 16],
    half_d: [0.0; 16],
};

/// Quads per row of `in_features` (the last one zero-padded).
fn quads(in_features: usize) -> usize {
    (in_features / BLOCK_VALUES).div_ceil(QUAD_BLOCKS)
}

/// Converts `tokens` rows of `in_features` activations to [`QuadI24`]s (`quads(in)` per row).
pub fn convert_activations(x: &[f32], tokens: usize, in_features: usize) -> Vec<QuadI24> {
    let nq = quads(in_features);
    let mut out = vec![ZERO_QUAD; tokens * nq];
    for (row, dst) in x
        .chunks_exact(in_features)
        .zip(out.chunks_exact_mut(nq.max(1)))
    {
        for (b, blk) in row.chunks_exact(BLOCK_VALUES).enumerate() {
            let (q, d) = quantize_block(blk);
            let quad = &mut dst[b / QUAD_BLOCKS];
            let k = b % QUAD_BLOCKS;
            let mut hi_sum = 0i32;
            for j in 0..BLOCK_BYTES {
                for (half, &v) in [q[2 * j], q[2 * j + 1]].iter().enumerate() {
                    let bytes = v.to_le_bytes();
                    for (p, plane) in quad.planes.iter_mut().enumerate() {
                        let dst = if half == 0 {
                            &mut plane.even
                        } else {
                            &mut plane.odd
                        };
                        dst[16 * k + j] = bytes[p];
                    }
                    hi_sum += bytes[2] as i8 as i32;
                }
            }
            quad.neg_offset[4 * k] = -OFFSET * hi_sum;
            quad.half_d[4 * k..4 * k + 4].fill(0.5 * d);
        }
    }
    out
}

/// One block's 24-bit levels and step (`d = max|x| / (2²³ − 1)`, `q = round(x / d)`).
pub fn quantize_block(x: &[f32]) -> ([i32; BLOCK_VALUES], f32) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    // A NaN anywhere makes the step NaN, so the block's dots come out NaN.
    let amax = if x.iter().any(|v| v.is_nan()) {
        f32::NAN
    } else {
        amax
    };
    let d = amax / LEVELS;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut q = [0i32; BLOCK_VALUES];
    for (q, v) in q.iter_mut().zip(x) {
        // `x · id` can round to just past ±(2²³ − 1); the clamp keeps the top byte in range.
        *q = ((v * id).round() as i32).clamp(-(LEVELS as i32), LEVELS as i32);
    }
    (q, d)
}

/// `out[t·out_features + o] = Σ_i x̂[t·in + i] · W[o, i]` with `x̂` the 24-bit activations
/// (module doc) and `W` packed MXFP4 (layout in [`super::mxfp4`]). Multithreaded over output rows.
pub fn mxfp4_int_matmul_cpu(
    x: &[f32],
    blocks: &[u8],
    scales: &[u8],
    tokens: usize,
    in_features: usize,
    out_features: usize,
    out: &mut [f32],
) -> Result<()> {
    check_shapes(
        x.len(),
        blocks.len(),
        scales.len(),
        tokens,
        in_features,
        out_features,
        out.len(),
    )?;
    if tokens == 0 || out_features == 0 {
        return Ok(());
    }
    let xq = convert_activations(x, tokens, in_features);
    matmul_converted(&xq, blocks, scales, tokens, in_features, out_features, out);
    Ok(())
}

/// The matmul on already converted activations (`xq`: `tokens · quads(in)` quads).
fn matmul_converted(
    xq: &[QuadI24],
    blocks: &[u8],
    scales: &[u8],
    tokens: usize,
    in_features: usize,
    out_features: usize,
    out: &mut [f32],
) {
    let groups = in_features / BLOCK_VALUES;
    let row_bytes = groups * BLOCK_BYTES;
    let nq = quads(in_features);
    let threads = rayon::current_num_threads().max(1);
    let rows_per_task = (out_features / (threads * 8)).clamp(4, 64);
    let kernel = select_kernel();
    let row = |o: usize, xs: &[QuadI24], n: usize, acc: &mut [f32; TOKEN_GROUP]| {
        kernel(
            &blocks[o * row_bytes..(o + 1) * row_bytes],
            &scales[o * groups..(o + 1) * groups],
            xs,
            nq,
            n,
            acc,
        )
    };

    if tokens == 1 {
        out.par_chunks_mut(rows_per_task)
            .enumerate()
            .for_each(|(chunk, dst)| {
                for (r, d) in dst.iter_mut().enumerate() {
                    let mut acc = [0f32; TOKEN_GROUP];
                    row(chunk * rows_per_task + r, xq, 1, &mut acc);
                    *d = acc[0];
                }
            });
        return;
    }
    // Rows into a transposed buffer ([out, tokens], contiguous per task), then out as [tokens, out].
    let mut out_t = vec![0f32; out_features * tokens];
    out_t
        .par_chunks_mut(rows_per_task * tokens)
        .enumerate()
        .for_each(|(chunk, dst)| {
            let first = chunk * rows_per_task;
            let rows = dst.len() / tokens;
            for t0 in (0..tokens).step_by(TOKEN_GROUP) {
                let n = TOKEN_GROUP.min(tokens - t0);
                let xs = &xq[t0 * nq..(t0 + n) * nq];
                for r in 0..rows {
                    let mut acc = [0f32; TOKEN_GROUP];
                    row(first + r, xs, n, &mut acc);
                    dst[r * tokens + t0..r * tokens + t0 + n].copy_from_slice(&acc[..n]);
                }
            }
        });
    for o in 0..out_features {
        for t in 0..tokens {
            out[t * out_features + o] = out_t[o * tokens + t];
        }
    }
}

/// Dots of one packed row (`blocks`, `scales`) with `n ≤ TOKEN_GROUP` converted activation rows
/// (`xs`: `n · nq` quads) into `acc[..n]`.
type Kernel = fn(&[u8], &[u8], &[QuadI24], usize, usize, &mut [f32; TOKEN_GROUP]);

/// Whether this CPU runs the AVX-512 (VNNI + VBMI) form, the one the experts use.
pub fn has_fast_kernel() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::cpu_matmul::has_avx512_vnni() && std::is_x86_feature_detected!("avx512vbmi")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn select_kernel() -> Kernel {
    #[cfg(target_arch = "x86_64")]
    {
        if super::cpu_matmul::has_avx512_vnni() && std::is_x86_feature_detected!("avx512vbmi") {
            return avx512_entry;
        }
        if super::cpu_matmul::has_avx2_fma_f16c() {
            return avx2_entry;
        }
    }
    portable
}

/// Scalar version of the same sums (per block: exact integer dot, then one f32 scale).
fn portable(
    blocks: &[u8],
    scales: &[u8],
    xs: &[QuadI24],
    nq: usize,
    n: usize,
    acc: &mut [f32; TOKEN_GROUP],
) {
    for (g, &scale) in scales.iter().enumerate() {
        let (q, k) = (g / QUAD_BLOCKS, g % QUAD_BLOCKS);
        let codes = &blocks[g * BLOCK_BYTES..(g + 1) * BLOCK_BYTES];
        let ws = f32::from_bits((scale as u32) << 23);
        for (t, a) in acc.iter_mut().enumerate().take(n) {
            let x = &xs[t * nq + q];
            let mut s = 0i32;
            for (j, &c) in codes.iter().enumerate() {
                for (code, plane_half) in [(c & 15, 0), (c >> 4, 1)] {
                    let level = |p: usize| {
                        let pl = &x.planes[p];
                        if plane_half == 0 {
                            pl.even[16 * k + j]
                        } else {
                            pl.odd[16 * k + j]
                        }
                    };
                    let w = LUT_SIGNED[code as usize] as i8 as i32;
                    s += w * (level(0) as i32 + 256 * level(1) as i32)
                        + 65536 * w * (level(2) as i8 as i32);
                }
            }
            *a += s as f32 * (ws * x.half_d[4 * k]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn avx512_entry(
    blocks: &[u8],
    scales: &[u8],
    xs: &[QuadI24],
    nq: usize,
    n: usize,
    acc: &mut [f32; TOKEN_GROUP],
) {
    assert!(blocks.len() == scales.len() * BLOCK_BYTES && (1..=TOKEN_GROUP).contains(&n));
    assert!(scales.len().div_ceil(QUAD_BLOCKS) == nq && xs.len() >= n * nq);
    macro_rules! go {
        ($($n:literal)*) => {
            match n {
                // SAFETY: selected only when AVX-512 F/BW/VBMI/VNNI are available; the asserts
                // above bound every load (whole quads via `nq`, the last one masked).
                $($n => unsafe { avx512::row::<$n>(blocks, scales, xs, nq, acc) },)*
                _ => unreachable!(),
            }
        };
    }
    go!(1 2 3 4 5 6 7 8)
}

#[cfg(target_arch = "x86_64")]
fn avx2_entry(
    blocks: &[u8],
    scales: &[u8],
    xs: &[QuadI24],
    nq: usize,
    n: usize,
    acc: &mut [f32; TOKEN_GROUP],
) {
    assert!(blocks.len() == scales.len() * BLOCK_BYTES && (1..=TOKEN_GROUP).contains(&n));
    assert!(scales.len().div_ceil(QUAD_BLOCKS) == nq && xs.len() >= n * nq);
    macro_rules! go {
        ($($n:literal)*) => {
            match n {
                // SAFETY: selected only when AVX2/FMA are available; loads bounded as above.
                $($n => unsafe { avx2::row::<$n>(blocks, scales, xs, nq, acc) },)*
                _ => unreachable!(),
            }
        };
    }
    go!(1 2 3 4 5 6 7 8)
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    /// `N` tokens against one row; see the module doc for the arithmetic. `vpermb` looks codes up
    /// in 64-byte tables (the 16 entries four times), so bits 4–5 of an index do not matter and
    /// neither nibble needs masking; the 4 scale bytes go to dword lanes with one masked `vpermb`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vnni,avx2,fma")]
    pub(super) unsafe fn row<const N: usize>(
        blocks: &[u8],
        scales: &[u8],
        xs: &[QuadI24],
        nq: usize,
        acc: &mut [f32; TOKEN_GROUP],
    ) {
        let lut_s = _mm512_broadcast_i32x4(_mm_loadu_si128(LUT_SIGNED.as_ptr() as *const __m128i));
        let lut_o = _mm512_broadcast_i32x4(_mm_loadu_si128(LUT_OFFSET.as_ptr() as *const __m128i));
        // Byte 4k of the result ← scale byte k (lanes 4k..4k+4 of block k), other bytes zeroed
        // (as dwords: byte 0 of lane l is l / 4; the other bytes are masked off).
        let spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
        let low_bytes: __mmask64 = 0x1111_1111_1111_1111;
        let mut total = [_mm512_setzero_ps(); N];
        let groups = scales.len();
        macro_rules! ld {
            ($p:expr) => {
                _mm512_load_si512($p.as_ptr() as *const _)
            };
        }
        for q in 0..nq {
            let first = q * QUAD_BLOCKS;
            _mm_prefetch::<_MM_HINT_T0>(blocks.as_ptr().wrapping_add(q * 64 + AHEAD) as *const i8);
            if q % 16 == 0 {
                _mm_prefetch::<_MM_HINT_T0>(
                    scales.as_ptr().wrapping_add(first + AHEAD_SCALES) as *const i8
                );
            }
            let (codes, sc) = if first + QUAD_BLOCKS <= groups {
                (
                    _mm512_loadu_si512(blocks.as_ptr().add(q * 64) as *const _),
                    _mm512_set1_epi32((scales.as_ptr().add(first) as *const i32).read_unaligned()),
                )
            } else {
                // The partial last quad: masked loads, zeros past the row's end (zero codes and
                // scales meet zero activations, so the padding adds exactly nothing).
                let left = groups - first;
                let cm: __mmask64 = (1u64 << (16 * left)) - 1;
                let sm: __mmask16 = (1u16 << left) - 1;
                (
                    _mm512_maskz_loadu_epi8(cm, blocks.as_ptr().add(q * 64) as *const _),
                    _mm512_set1_epi32(_mm_cvtsi128_si32(_mm_maskz_loadu_epi8(
                        sm,
                        scales.as_ptr().add(first) as *const _,
                    ))),
                )
            };
            let codes_hi = _mm512_srli_epi16(codes, 4);
            let s_even = _mm512_permutexvar_epi8(codes, lut_s);
            let s_odd = _mm512_permutexvar_epi8(codes_hi, lut_s);
            let o_even = _mm512_permutexvar_epi8(codes, lut_o);
            let o_odd = _mm512_permutexvar_epi8(codes_hi, lut_o);
            let s = _mm512_maskz_permutexvar_epi8(low_bytes, spread, sc);
            let wscale = _mm512_castsi512_ps(_mm512_slli_epi32(s, 23));
            for (t, tot) in total.iter_mut().enumerate() {
                let x = xs.get_unchecked(t * nq + q);
                let [p0, p1, p2] = &x.planes;
                // Horner over the planes: ((top · 256 + mid) · 256 + low); |top| ≤ 8·12·128 and
                // |mid|, |low| ≤ 8·12·255 per lane, so every step fits in i32.
                let mut i = _mm512_load_si512(x.neg_offset.as_ptr() as *const _);
                i = _mm512_dpbusd_epi32(i, o_even, ld!(p2.even));
                i = _mm512_dpbusd_epi32(i, o_odd, ld!(p2.odd));
                i = _mm512_slli_epi32(i, 8);
                i = _mm512_dpbusd_epi32(i, ld!(p1.even), s_even);
                i = _mm512_dpbusd_epi32(i, ld!(p1.odd), s_odd);
                i = _mm512_slli_epi32(i, 8);
                i = _mm512_dpbusd_epi32(i, ld!(p0.even), s_even);
                i = _mm512_dpbusd_epi32(i, ld!(p0.odd), s_odd);
                let f = _mm512_mul_ps(wscale, _mm512_load_ps(x.half_d.as_ptr()));
                *tot = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), f, *tot);
            }
        }
        for (a, tot) in acc.iter_mut().zip(total) {
            *a = _mm512_reduce_add_ps(tot);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    /// `N` tokens against one row, two blocks per 256-bit step.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn row<const N: usize>(
        blocks: &[u8],
        scales: &[u8],
        xs: &[QuadI24],
        nq: usize,
        acc: &mut [f32; TOKEN_GROUP],
    ) {
        let lut_s =
            _mm256_broadcastsi128_si256(_mm_loadu_si128(LUT_SIGNED.as_ptr() as *const __m128i));
        let lut_o =
            _mm256_broadcastsi128_si256(_mm_loadu_si128(LUT_OFFSET.as_ptr() as *const __m128i));
        let low4 = _mm256_set1_epi8(0x0f);
        let ones = _mm256_set1_epi16(1);
        let spread = _mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
        let mut total = [_mm256_setzero_ps(); N];
        let groups = scales.len();
        let mut tail = [0u8; 64];
        for q in 0..nq {
            let first = q * QUAD_BLOCKS;
            _mm_prefetch::<_MM_HINT_T0>(blocks.as_ptr().wrapping_add(q * 64 + AHEAD) as *const i8);
            if q % 16 == 0 {
                _mm_prefetch::<_MM_HINT_T0>(
                    scales.as_ptr().wrapping_add(first + AHEAD_SCALES) as *const i8
                );
            }
            let (cp, sc) = if first + QUAD_BLOCKS <= groups {
                (
                    blocks.as_ptr().add(q * 64),
                    (scales.as_ptr().add(first) as *const i32).read_unaligned(),
                )
            } else {
                // The partial last quad, zero-padded (zero codes and scales meet zero
                // activations, so the padding adds exactly nothing).
                let rest = &blocks[q * 64..];
                tail[..rest.len()].copy_from_slice(rest);
                let mut sb = [0u8; 4];
                sb[..groups - first].copy_from_slice(&scales[first..]);
                (tail.as_ptr(), i32::from_le_bytes(sb))
            };
            let s = _mm_shuffle_epi8(_mm_cvtsi32_si128(sc), spread);
            for h in 0..2 {
                let codes = _mm256_loadu_si256(cp.add(32 * h) as *const __m256i);
                let c_lo = _mm256_and_si256(codes, low4);
                let c_hi = _mm256_and_si256(_mm256_srli_epi16(codes, 4), low4);
                let s_even = _mm256_shuffle_epi8(lut_s, c_lo);
                let s_odd = _mm256_shuffle_epi8(lut_s, c_hi);
                let o_even = _mm256_shuffle_epi8(lut_o, c_lo);
                let o_odd = _mm256_shuffle_epi8(lut_o, c_hi);
                let sh = if h == 0 { s } else { _mm_srli_si128(s, 8) };
                let wscale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu8_epi32(sh), 23));
                for (t, tot) in total.iter_mut().enumerate() {
                    let x = xs.get_unchecked(t * nq + q);
                    macro_rules! ld {
                        ($p:expr) => {
                            _mm256_load_si256($p.as_ptr().add(32 * h) as *const __m256i)
                        };
                    }
                    let [p0, p1, p2] = &x.planes;
                    // Pair sums stay below 2·255·12 and 2·24·128: `vpmaddubsw` never saturates.
                    macro_rules! dot {
                        ($u:expr, $v:expr, $u2:expr, $v2:expr) => {
                            _mm256_madd_epi16(
                                _mm256_add_epi16(
                                    _mm256_maddubs_epi16($u, $v),
                                    _mm256_maddubs_epi16($u2, $v2),
                                ),
                                ones,
                            )
                        };
                    }
                    let top = _mm256_add_epi32(
                        dot!(o_even, ld!(p2.even), o_odd, ld!(p2.odd)),
                        _mm256_load_si256(x.neg_offset.as_ptr().add(8 * h) as *const __m256i),
                    );
                    let mid = dot!(ld!(p1.even), s_even, ld!(p1.odd), s_odd);
                    let low = dot!(ld!(p0.even), s_even, ld!(p0.odd), s_odd);
                    let i = _mm256_add_epi32(
                        _mm256_add_epi32(_mm256_slli_epi32(top, 16), _mm256_slli_epi32(mid, 8)),
                        low,
                    );
                    let f = _mm256_mul_ps(wscale, _mm256_load_ps(x.half_d.as_ptr().add(8 * h)));
                    *tot = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), f, *tot);
                }
            }
        }
        for (a, tot) in acc.iter_mut().zip(total) {
            *a = super::super::cpu_matmul::hsum(tot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::mxfp4::{dequantize_rows, E2M1_VALUES};

    fn lcg(seed: &mut u64) -> u32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (*seed >> 33) as u32
    }

    #[test]
    fn tables_are_doubled_e2m1() {
        for (c, &v) in E2M1_VALUES.iter().enumerate() {
            assert_eq!(LUT_SIGNED[c] as i8 as i32, (2.0 * v) as i32, "code {c}");
            assert_eq!(LUT_OFFSET[c] as i32 - OFFSET, (2.0 * v) as i32, "code {c}");
        }
    }

    /// Every kernel available here against the f64 sum over the converted activations, with the
    /// block count both a multiple of 4 and not (the tail), and extreme levels (±(2²³ − 1)).
    #[test]
    fn kernels_agree_with_the_f64_sums() {
        let mut seed = 7u64;
        for groups in [1usize, 2, 3, 4, 5, 8, 90] {
            let inp = groups * BLOCK_VALUES;
            let blocks: Vec<u8> = (0..inp / 2).map(|_| lcg(&mut seed) as u8).collect();
            let scales: Vec<u8> = (0..groups)
                .map(|_| 118 + (lcg(&mut seed) % 16) as u8)
                .collect();
            let mut x: Vec<f32> = (0..TOKEN_GROUP * inp)
                .map(|_| (lcg(&mut seed) % 2001) as f32 / 500.0 - 2.0)
                .collect();
            // Blocks whose largest element is negative, and all-equal codes with full levels.
            x[5] = -3.0;
            x[inp + 7] = 3.0;
            let xq = convert_activations(&x, TOKEN_GROUP, inp);
            let mut w = vec![0f32; inp];
            dequantize_rows(&blocks, &scales, inp, 0, 1, &mut w);
            let mut kernels: Vec<Kernel> = vec![portable, select_kernel()];
            #[cfg(target_arch = "x86_64")]
            if crate::kernels::cpu_matmul::has_avx2_fma_f16c() {
                kernels.push(avx2_entry);
            }
            for n in 1..=TOKEN_GROUP {
                for k in &kernels {
                    let mut acc = [0f32; TOKEN_GROUP];
                    k(&blocks, &scales, &xq, quads(inp), n, &mut acc);
                    for t in 0..n {
                        let mut want = 0f64;
                        let mut mag = 0f64;
                        for (b, xb) in x[t * inp..(t + 1) * inp].chunks_exact(32).enumerate() {
                            let (q, d) = quantize_block(xb);
                            for i in 0..32 {
                                let p = q[i] as f64 * d as f64 * w[b * 32 + i] as f64;
                                want += p;
                                mag += p.abs();
                            }
                        }
                        let tol = 1e-6 * mag + 1e-9;
                        assert!(
                            (acc[t] as f64 - want).abs() <= tol,
                            "groups={groups} n={n} t={t}: {} vs {want}",
                            acc[t]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn levels_span_24_bits_and_round_trip() {
        let x: Vec<f32> = (0..32).map(|i| (i as f32 - 15.5) / 7.0).collect();
        let (q, d) = quantize_block(&x);
        assert_eq!(q.iter().map(|v| v.abs()).max(), Some(LEVELS as i32));
        for (q, x) in q.iter().zip(&x) {
            assert!((*q as f32 * d - x).abs() <= d, "{q} · {d} vs {x}");
        }
    }

    #[test]
    fn nan_activations_give_nan() {
        let inp = 64;
        let blocks = vec![0x11u8; inp / 2];
        let scales = vec![127u8; 2];
        let mut x = vec![1f32; inp];
        x[40] = f32::NAN;
        let mut out = [0f32];
        mxfp4_int_matmul_cpu(&x, &blocks, &scales, 1, inp, 1, &mut out).unwrap();
        assert!(out[0].is_nan());
    }
}
