//! MXFP4 matmul: `y[t, o] = Σ_i x[t, i] · W[o, i]` with `W` kept packed as it ships in gpt-oss.
//!
//! # Layout (what every backend must read, byte for byte)
//!
//! A weight of `out_features × in_features` (`in_features % 32 == 0`, `G = in_features / 32`):
//! - `blocks`: `out_features · G · 16` bytes, row-major `[out, G, 16]`. Byte `j` of block `g` of row
//!   `o` holds elements `i = 32·g + 2·j` (low nibble) and `i = 32·g + 2·j + 1` (high nibble).
//! - each nibble is an E2M1 code: bit 3 is the sign, bits 0..2 index the magnitudes
//!   `[0, 0.5, 1, 1.5, 2, 3, 4, 6]` ([`E2M1_VALUES`]).
//! - `scales`: `out_features · G` bytes, row-major `[out, G]`, E8M0: the block's values are
//!   multiplied by `2^(s − 127)` (`s = 0` is `2^-127`, `s = 255` is NaN as in the OCP MX spec).
//!
//! This is the checkpoint's `*_blocks` / `*_scales` pair of one expert: gpt-oss stores
//! `gate_up_proj_blocks` as `[experts, 2·intermediate, hidden/32, 16]`, i.e. per expert a weight with
//! `out = 2·intermediate` rows over `in = hidden`, and `down_proj_blocks` as `[experts, hidden,
//! intermediate/32, 16]`. Activations `x` are `[tokens, in]` f32 row-major, output `[tokens, out]`.
//!
//! # CPU strategy
//! Nothing is expanded beyond one 32-value block in registers. Activations are first reordered per
//! block into "even elements, then odd elements" so that the 16 low nibbles of a block multiply 16
//! consecutive floats and the 16 high nibbles the next 16: no interleaving of decoded values is
//! needed. Rows are split across threads (rayon); each row's blocks are decoded once per group of
//! up to [`TOKEN_GROUP`] tokens. On x86-64 with AVX2+FMA the decode is a `vpermps` table lookup plus
//! a sign xor; elsewhere a portable scalar loop computes the same sums.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::bytes::SharedBytes;

/// Values per MXFP4 block.
pub const BLOCK_VALUES: usize = 32;
/// Bytes of packed E2M1 codes per block.
pub const BLOCK_BYTES: usize = 16;
/// Tokens whose dot products share one decode of a row's block.
pub const TOKEN_GROUP: usize = 4;

/// The 16 E2M1 values, indexed by the 4-bit code.
pub const E2M1_VALUES: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// `2^(s − 127)` for every E8M0 byte `s` (255 → NaN).
pub static E8M0_TO_F32: [f32; 256] = e8m0_table();

const fn e8m0_table() -> [f32; 256] {
    let mut t = [0f32; 256];
    // s = 0 is the subnormal 2^-127.
    t[0] = f32::from_bits(1 << 22);
    let mut s = 1;
    while s < 255 {
        t[s] = f32::from_bits((s as u32) << 23);
        s += 1;
    }
    t[255] = f32::NAN;
    t
}

/// Decodes an E8M0 scale byte.
#[inline]
pub fn e8m0_to_f32(s: u8) -> f32 {
    E8M0_TO_F32[s as usize]
}

/// Checks that slice lengths agree with the shape; the message names what is wrong.
pub fn check_shapes(
    x_len: usize,
    blocks_len: usize,
    scales_len: usize,
    tokens: usize,
    in_features: usize,
    out_features: usize,
    out_len: usize,
) -> Result<()> {
    if in_features == 0 || in_features % BLOCK_VALUES != 0 {
        candle_core::bail!("mxfp4: in_features {in_features} is not a positive multiple of 32");
    }
    let groups = in_features / BLOCK_VALUES;
    let checks = [
        ("activations", x_len, tokens * in_features),
        ("blocks", blocks_len, out_features * groups * BLOCK_BYTES),
        ("scales", scales_len, out_features * groups),
        ("output", out_len, tokens * out_features),
    ];
    for (what, got, want) in checks {
        if got != want {
            candle_core::bail!(
                "mxfp4: {what} hold {got} elements, expected {want} for tokens={tokens} in={in_features} out={out_features}"
            );
        }
    }
    Ok(())
}

/// Reorders each 32-value block of every row of `x` into its 16 even elements followed by its
/// 16 odd elements (the order in which a block's low and high nibbles are laid out).
fn deinterleave_blocks(x: &[f32]) -> Vec<f32> {
    let mut xp = vec![0f32; x.len()];
    for (src, dst) in x
        .chunks_exact(BLOCK_VALUES)
        .zip(xp.chunks_exact_mut(BLOCK_VALUES))
    {
        for j in 0..BLOCK_BYTES {
            dst[j] = src[2 * j];
            dst[BLOCK_BYTES + j] = src[2 * j + 1];
        }
    }
    xp
}

/// `out[t·out_features + o] = Σ_i x[t·in + i] · W[o, i]` for packed MXFP4 `W` (layout in the module
/// doc). Multithreaded over output rows. This is the reference the GPU kernels are tested against.
pub fn mxfp4_matmul_cpu(
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
    let groups = in_features / BLOCK_VALUES;
    let xp = deinterleave_blocks(x);
    let row_bytes = groups * BLOCK_BYTES;
    // Enough chunks to balance threads, big enough to amortise scheduling.
    let threads = rayon::current_num_threads().max(1);
    let rows_per_task = (out_features / (threads * 8)).clamp(4, 64);
    let kernel = select_row_kernel();

    if tokens == 1 {
        out.par_chunks_mut(rows_per_task)
            .enumerate()
            .for_each(|(chunk, dst)| {
                let first = chunk * rows_per_task;
                for (r, d) in dst.iter_mut().enumerate() {
                    let o = first + r;
                    let mut acc = [0f32; TOKEN_GROUP];
                    kernel(
                        &blocks[o * row_bytes..(o + 1) * row_bytes],
                        &scales[o * groups..(o + 1) * groups],
                        &xp,
                        in_features,
                        1,
                        &mut acc,
                    );
                    *d = acc[0];
                }
            });
        return Ok(());
    }

    // Rows are computed into a transposed buffer ([out, tokens], contiguous per task) and then
    // written out as [tokens, out].
    let mut out_t = vec![0f32; out_features * tokens];
    out_t
        .par_chunks_mut(rows_per_task * tokens)
        .enumerate()
        .for_each(|(chunk, dst)| {
            let first = chunk * rows_per_task;
            let rows = dst.len() / tokens;
            for t0 in (0..tokens).step_by(TOKEN_GROUP) {
                let n = TOKEN_GROUP.min(tokens - t0);
                let xs = &xp[t0 * in_features..(t0 + n) * in_features];
                for r in 0..rows {
                    let o = first + r;
                    let mut acc = [0f32; TOKEN_GROUP];
                    kernel(
                        &blocks[o * row_bytes..(o + 1) * row_bytes],
                        &scales[o * groups..(o + 1) * groups],
                        xs,
                        in_features,
                        n,
                        &mut acc,
                    );
                    dst[r * tokens + t0..r * tokens + t0 + n].copy_from_slice(&acc[..n]);
                }
            }
        });
    for o in 0..out_features {
        for t in 0..tokens {
            out[t * out_features + o] = out_t[o * tokens + t];
        }
    }
    Ok(())
}

/// Dot products of one packed row with `n ≤ TOKEN_GROUP` deinterleaved activation rows
/// (`xs` is `[n, in]`), written to `acc[..n]`.
type RowKernel = fn(&[u8], &[u8], &[f32], usize, usize, &mut [f32; TOKEN_GROUP]);

fn select_row_kernel() -> RowKernel {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return row_dot_avx2_entry;
        }
    }
    row_dot_portable
}

fn row_dot_portable(
    blocks: &[u8],
    scales: &[u8],
    xs: &[f32],
    in_features: usize,
    n: usize,
    acc: &mut [f32; TOKEN_GROUP],
) {
    let groups = in_features / BLOCK_VALUES;
    for g in 0..groups {
        let mut lo = [0f32; BLOCK_BYTES];
        let mut hi = [0f32; BLOCK_BYTES];
        let bytes = &blocks[g * BLOCK_BYTES..(g + 1) * BLOCK_BYTES];
        for j in 0..BLOCK_BYTES {
            lo[j] = E2M1_VALUES[(bytes[j] & 0x0f) as usize];
            hi[j] = E2M1_VALUES[(bytes[j] >> 4) as usize];
        }
        let scale = e8m0_to_f32(scales[g]);
        for (t, a) in acc.iter_mut().enumerate().take(n) {
            let x =
                &xs[t * in_features + g * BLOCK_VALUES..t * in_features + (g + 1) * BLOCK_VALUES];
            let mut s = [0f32; 8];
            for j in 0..BLOCK_BYTES {
                s[j % 8] += lo[j] * x[j] + hi[j] * x[BLOCK_BYTES + j];
            }
            *a += scale * s.iter().sum::<f32>();
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn row_dot_avx2_entry(
    blocks: &[u8],
    scales: &[u8],
    xs: &[f32],
    in_features: usize,
    n: usize,
    acc: &mut [f32; TOKEN_GROUP],
) {
    debug_assert!(blocks.len() * 2 == in_features && scales.len() * BLOCK_VALUES == in_features);
    debug_assert!((1..=TOKEN_GROUP).contains(&n) && xs.len() >= n * in_features);
    // SAFETY: selected only when AVX2 and FMA are available; slice lengths are checked by
    // `check_shapes` and the asserts above, and every load stays inside them.
    unsafe { row_dot_avx2(blocks, scales, xs, in_features, n, acc) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_dot_avx2(
    blocks: &[u8],
    scales: &[u8],
    xs: &[f32],
    in_features: usize,
    n: usize,
    acc: &mut [f32; TOKEN_GROUP],
) {
    use std::arch::x86_64::*;
    let groups = in_features / BLOCK_VALUES;
    // Code → twice its E2M1 value as a signed byte (every 2·value is an integer: 0, 1, 2, 3, 4,
    // 6, 8, 12, sign in bit 3), one `vpshufb` for 16 codes; the block scale is halved to match.
    // Doubling a weight and halving the scale are exact, so the sums are the same floats as
    // with the values themselves (but for the sign of an exact zero), in fewer instructions
    // than decoding each code as a float (decode was compute-bound on AVX2).
    let table = _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
    let low4 = _mm_set1_epi8(0x0f);
    let widen = |codes: __m128i| -> (__m256, __m256) {
        let w = _mm_shuffle_epi8(table, codes);
        (
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(w)),
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(w, 8))),
        )
    };
    let mut total = [_mm256_setzero_ps(); TOKEN_GROUP];
    let bp = blocks.as_ptr();
    let xp = xs.as_ptr();
    for g in 0..groups {
        let p = bp.add(g * BLOCK_BYTES);
        if g % 4 == 0 {
            // The weights stream from DRAM once per token group: ask for them 4 KB ahead
            // (a prefetch past the end of the slice is only a hint, never a fault).
            _mm_prefetch(p.wrapping_add(4096) as *const i8, _MM_HINT_T0);
        }
        let v = _mm_loadu_si128(p as *const __m128i);
        let (w_lo0, w_lo1) = widen(_mm_and_si128(v, low4));
        let (w_hi0, w_hi1) = widen(_mm_and_si128(_mm_srli_epi16(v, 4), low4));
        let scale =
            _mm256_set1_ps(0.5 * *E8M0_TO_F32.get_unchecked(*scales.get_unchecked(g) as usize));
        for (t, tot) in total.iter_mut().enumerate().take(n) {
            let x = xp.add(t * in_features + g * BLOCK_VALUES);
            let mut s = _mm256_mul_ps(w_lo0, _mm256_loadu_ps(x));
            s = _mm256_fmadd_ps(w_lo1, _mm256_loadu_ps(x.add(8)), s);
            s = _mm256_fmadd_ps(w_hi0, _mm256_loadu_ps(x.add(16)), s);
            s = _mm256_fmadd_ps(w_hi1, _mm256_loadu_ps(x.add(24)), s);
            *tot = _mm256_fmadd_ps(s, scale, *tot);
        }
    }
    for t in 0..n {
        let v = total[t];
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s4 = _mm_add_ps(lo, hi);
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
        acc[t] = _mm_cvtss_f32(s1);
    }
}

/// Dequantizes rows `[row0, row0 + rows)` of a packed weight into `dst` (`rows · in` values in the
/// natural element order). Used by the dequantizing baseline and by tests, not by the matmul.
pub fn dequantize_rows(
    blocks: &[u8],
    scales: &[u8],
    in_features: usize,
    row0: usize,
    rows: usize,
    dst: &mut [f32],
) {
    let groups = in_features / BLOCK_VALUES;
    for r in 0..rows {
        let o = row0 + r;
        for g in 0..groups {
            let scale = e8m0_to_f32(scales[o * groups + g]);
            let b = &blocks[(o * groups + g) * BLOCK_BYTES..(o * groups + g + 1) * BLOCK_BYTES];
            let d = &mut dst[r * in_features + g * BLOCK_VALUES..];
            for j in 0..BLOCK_BYTES {
                d[2 * j] = E2M1_VALUES[(b[j] & 0x0f) as usize] * scale;
                d[2 * j + 1] = E2M1_VALUES[(b[j] >> 4) as usize] * scale;
            }
        }
    }
}

/// Bytes of one block in ggml's layout (`block_mxfp4`: the E8M0 scale, then 16 bytes of codes).
pub const GGML_BLOCK_BYTES: usize = 1 + BLOCK_BYTES;

/// ggml's MXFP4 blocks (GGUF type 39, as llama.cpp's converter writes gpt-oss experts) → the
/// checkpoint layout of the module doc: `(blocks, scales)`. In a ggml block the scale comes first
/// and byte `j` of the codes holds element `j` (low nibble) and element `j + 16` (high nibble);
/// here the scales are a separate array and byte `j` holds elements `2j` and `2j + 1`. The
/// element values are unchanged (the same E2M1 codes and E8M0 scales, reordered).
pub fn from_ggml_blocks(data: &[u8]) -> Result<(Vec<u8>, Vec<u8>)> {
    if data.len() % GGML_BLOCK_BYTES != 0 {
        candle_core::bail!(
            "mxfp4: {} bytes are not whole ggml blocks of {GGML_BLOCK_BYTES}",
            data.len()
        );
    }
    let n = data.len() / GGML_BLOCK_BYTES;
    let mut blocks = vec![0u8; n * BLOCK_BYTES];
    let mut scales = vec![0u8; n];
    for ((src, dst), scale) in data
        .chunks_exact(GGML_BLOCK_BYTES)
        .zip(blocks.chunks_exact_mut(BLOCK_BYTES))
        .zip(scales.iter_mut())
    {
        *scale = src[0];
        let code = |e: usize| {
            let b = src[1 + e % BLOCK_BYTES];
            if e < BLOCK_BYTES {
                b & 0x0f
            } else {
                b >> 4
            }
        };
        for (j, d) in dst.iter_mut().enumerate() {
            *d = code(2 * j) | (code(2 * j + 1) << 4);
        }
    }
    Ok((blocks, scales))
}

/// A packed MXFP4 weight matrix `[out_features, in_features]` whose bytes stay where they were
/// loaded from (usually the mmapped checkpoint).
#[derive(Debug, Clone)]
pub struct Mxfp4Weight {
    pub blocks: SharedBytes,
    pub scales: SharedBytes,
    pub out_features: usize,
    pub in_features: usize,
}

impl Mxfp4Weight {
    pub fn new(
        blocks: SharedBytes,
        scales: SharedBytes,
        out_features: usize,
        in_features: usize,
    ) -> Result<Self> {
        check_shapes(
            0,
            blocks.len(),
            scales.len(),
            0,
            in_features,
            out_features,
            0,
        )?;
        Ok(Self {
            blocks,
            scales,
            out_features,
            in_features,
        })
    }

    /// Bytes held (blocks + scales).
    pub fn nbytes(&self) -> usize {
        self.blocks.len() + self.scales.len()
    }

    /// `x [.., in] → [.., out]` through [`Mxfp4Matmul`]; the output has the dtype of `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.apply_op1_no_bwd(&Mxfp4Matmul { weight: self })
    }

    /// The whole weight dequantized (`[out, in]` f32): the baseline path, and a test helper.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.out_features * self.in_features];
        dequantize_rows(
            self.blocks.as_slice(),
            self.scales.as_slice(),
            self.in_features,
            0,
            self.out_features,
            &mut w,
        );
        w
    }
}

/// The candle op: activations in, weight carried by the op. The CUDA/Metal versions add
/// `cuda_fwd`/`metal_fwd` reading the same layout from device copies of `blocks`/`scales`.
pub struct Mxfp4Matmul<'a> {
    pub weight: &'a Mxfp4Weight,
}

impl CustomOp1 for Mxfp4Matmul<'_> {
    fn name(&self) -> &'static str {
        "mxfp4-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let w = self.weight;
        let dims = layout.shape().dims();
        let Some((&in_features, lead)) = dims.split_last() else {
            candle_core::bail!("mxfp4-matmul: activations must have at least one dimension");
        };
        if in_features != w.in_features {
            candle_core::bail!(
                "mxfp4-matmul: activations have {in_features} features, the weight expects {}",
                w.in_features
            );
        }
        let tokens: usize = lead.iter().product();
        let (dtype, x) = contiguous_f32(storage, layout)?;
        let mut out = vec![0f32; tokens * w.out_features];
        mxfp4_matmul_cpu(
            &x,
            w.blocks.as_slice(),
            w.scales.as_slice(),
            tokens,
            in_features,
            w.out_features,
            &mut out,
        )?;
        let mut shape = lead.to_vec();
        shape.push(w.out_features);
        Ok((from_f32(out, dtype), Shape::from(shape)))
    }

    /// Our CUDA kernels (src/kernels/cuda/mxfp4.cu), weights uploaded once.
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::mxfp4_op_cuda_fwd(self.weight, storage, layout)
    }
}

/// The storage's elements in layout order as f32, with the original dtype.
pub(crate) fn contiguous_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
) -> Result<(DType, std::borrow::Cow<'a, [f32]>)> {
    use candle_core::backend::BackendStorage;
    use std::borrow::Cow;
    fn gather<T: Copy>(data: &[T], layout: &Layout) -> Vec<T> {
        if let Some((a, b)) = layout.contiguous_offsets() {
            return data[a..b].to_vec();
        }
        // Walk the multi-index in row-major order.
        let (dims, stride) = (layout.dims(), layout.stride());
        let count: usize = dims.iter().product();
        let mut idx = vec![0usize; dims.len()];
        let mut out = Vec::with_capacity(count);
        for _ in 0..count {
            let off: usize = idx.iter().zip(stride).map(|(i, s)| i * s).sum();
            out.push(data[layout.start_offset() + off]);
            for d in (0..dims.len()).rev() {
                idx[d] += 1;
                if idx[d] < dims[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        out
    }
    Ok(match storage {
        CpuStorage::F32(d) => match layout.contiguous_offsets() {
            Some((a, b)) => (DType::F32, Cow::Borrowed(&d[a..b])),
            None => (DType::F32, Cow::Owned(gather(d, layout))),
        },
        CpuStorage::BF16(d) => (
            DType::BF16,
            Cow::Owned(gather(d, layout).iter().map(|v| v.to_f32()).collect()),
        ),
        CpuStorage::F16(d) => (
            DType::F16,
            Cow::Owned(gather(d, layout).iter().map(|v| v.to_f32()).collect()),
        ),
        other => candle_core::bail!(
            "mxfp4 kernels take f32/bf16/f16 activations, got {:?}",
            other.dtype()
        ),
    })
}

/// Wraps f32 results in the storage of `dtype`.
pub(crate) fn from_f32(v: Vec<f32>, dtype: DType) -> CpuStorage {
    match dtype {
        DType::BF16 => CpuStorage::BF16(v.into_iter().map(half::bf16::from_f32).collect()),
        DType::F16 => CpuStorage::F16(v.into_iter().map(half::f16::from_f32).collect()),
        _ => CpuStorage::F32(v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Repacked ggml blocks dequantize to what the quantizer's ggml-layout dequantizer (checked
    /// against gguf-py there) gives for the same bytes.
    #[test]
    fn ggml_blocks_repack_to_the_same_values() {
        let mut s = 0x1234_5678u32;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            s
        };
        let rows = 3;
        let in_features = 64;
        let blocks_per_row = in_features / BLOCK_VALUES;
        let ggml: Vec<u8> = (0..rows * blocks_per_row * GGML_BLOCK_BYTES)
            .map(|i| {
                let v = next() as u8;
                // Scales in a sane range (the first byte of each block).
                if i % GGML_BLOCK_BYTES == 0 {
                    110 + v % 30
                } else {
                    v
                }
            })
            .collect();
        let (blocks, scales) = from_ggml_blocks(&ggml).unwrap();
        let mut ours = vec![0f32; rows * in_features];
        dequantize_rows(&blocks, &scales, in_features, 0, rows, &mut ours);
        let mut want = vec![0f32; rows * in_features];
        for (b, y) in ggml
            .chunks_exact(GGML_BLOCK_BYTES)
            .zip(want.chunks_exact_mut(BLOCK_VALUES))
        {
            crate::quantize::blocks::legacy::dmxfp4(b, y);
        }
        assert_eq!(
            ours.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        assert!(from_ggml_blocks(&ggml[1..]).is_err());
    }

    #[test]
    fn e8m0_scales_are_powers_of_two() {
        assert_eq!(e8m0_to_f32(127), 1.0);
        assert_eq!(e8m0_to_f32(128), 2.0);
        assert_eq!(e8m0_to_f32(120), 2f32.powi(-7));
        assert_eq!(e8m0_to_f32(1), 2f32.powi(-126));
        assert_eq!(e8m0_to_f32(0), 2f32.powi(-127));
        assert!(e8m0_to_f32(255).is_nan());
    }

    #[test]
    fn low_nibble_is_the_even_element() {
        // One row, one block: byte 0 = 0x72 → element 0 = code 2 (1.0), element 1 = code 7 (6.0).
        let mut blocks = vec![0u8; 16];
        blocks[0] = 0x72;
        blocks[15] = 0x9f; // element 30 = code 15 (−6), element 31 = code 9 (−0.5)
        let scales = vec![126u8]; // × 0.5
        let mut x = vec![0f32; 32];
        x[0] = 1.0;
        x[1] = 10.0;
        x[30] = 100.0;
        x[31] = 1000.0;
        let mut out = [0f32];
        mxfp4_matmul_cpu(&x, &blocks, &scales, 1, 32, 1, &mut out).unwrap();
        let want = 0.5 * (1.0 * 1.0 + 6.0 * 10.0 + -6.0 * 100.0 + -0.5 * 1000.0);
        assert_eq!(out[0], want);
    }

    #[test]
    fn portable_and_simd_row_kernels_agree() {
        // Every byte value in every position, several token counts, varied scales.
        let in_features = 256 * 2 / BLOCK_BYTES * BLOCK_VALUES / 2;
        let blocks: Vec<u8> = (0..in_features / 2).map(|b| (b * 37 % 256) as u8).collect();
        let scales: Vec<u8> = (0..in_features / 32).map(|g| 120 + g as u8).collect();
        let xs: Vec<f32> = (0..TOKEN_GROUP * in_features)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 250.0)
            .collect();
        for n in 1..=TOKEN_GROUP {
            let mut a = [0f32; TOKEN_GROUP];
            let mut b = [0f32; TOKEN_GROUP];
            row_dot_portable(&blocks, &scales, &xs, in_features, n, &mut a);
            select_row_kernel()(&blocks, &scales, &xs, in_features, n, &mut b);
            for t in 0..n {
                assert!(
                    (a[t] - b[t]).abs() <= 1e-4 * a[t].abs().max(1.0),
                    "{a:?} vs {b:?}"
                );
            }
        }
    }

    /// The AVX2 kernel doubles the codes and halves the scale; that must give exactly the floats
    /// of dotting the E2M1 values themselves with the full scale in the kernel's order (8 lanes,
    /// mul then three FMAs per block, one FMA by the scale, lanes summed 4+4, 2+2, 1+1).
    #[test]
    fn avx2_kernel_equals_the_undoubled_values_in_its_order_bit_for_bit() {
        #[cfg(target_arch = "x86_64")]
        {
            if !(std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")) {
                eprintln!("skipped: no AVX2/FMA");
                return;
            }
            let in_features = 512;
            let groups = in_features / BLOCK_VALUES;
            let blocks: Vec<u8> = (0..in_features / 2).map(|b| (b * 91 % 256) as u8).collect();
            let scales: Vec<u8> = (0..groups).map(|g| 110 + 3 * g as u8).collect();
            let xs: Vec<f32> = (0..TOKEN_GROUP * in_features)
                .map(|i| ((i * 7919 % 2003) as f32 - 1001.0) / 97.0)
                .collect();
            for n in 1..=TOKEN_GROUP {
                let mut got = [0f32; TOKEN_GROUP];
                row_dot_avx2_entry(&blocks, &scales, &xs, in_features, n, &mut got);
                for (t, &g) in got.iter().enumerate().take(n) {
                    let mut tot = [0f32; 8];
                    for b in 0..groups {
                        let bytes = &blocks[b * BLOCK_BYTES..(b + 1) * BLOCK_BYTES];
                        let w = |j: usize| {
                            let code = if j < 16 {
                                bytes[j] & 15
                            } else {
                                bytes[j - 16] >> 4
                            };
                            E2M1_VALUES[code as usize]
                        };
                        let x = &xs[t * in_features + b * BLOCK_VALUES..];
                        let scale = e8m0_to_f32(scales[b]);
                        for (l, tl) in tot.iter_mut().enumerate() {
                            let mut s = w(l) * x[l];
                            s = w(8 + l).mul_add(x[8 + l], s);
                            s = w(16 + l).mul_add(x[16 + l], s);
                            s = w(24 + l).mul_add(x[24 + l], s);
                            *tl = s.mul_add(scale, *tl);
                        }
                    }
                    let s4: Vec<f32> = (0..4).map(|l| tot[l] + tot[l + 4]).collect();
                    let want = (s4[0] + s4[2]) + (s4[1] + s4[3]);
                    assert_eq!(
                        g.to_bits(),
                        want.to_bits(),
                        "token {t} of {n}: {g} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors_not_panics() {
        let err = mxfp4_matmul_cpu(&[0.0; 30], &[0; 16], &[0], 1, 30, 1, &mut [0.0])
            .unwrap_err()
            .to_string();
        assert!(err.contains("multiple of 32"), "{err}");
        let err = mxfp4_matmul_cpu(&[0.0; 32], &[0; 15], &[0], 1, 32, 1, &mut [0.0])
            .unwrap_err()
            .to_string();
        assert!(err.contains("blocks"), "{err}");
    }
}
