//! Matmul with bf16 weights and f32 activations on the CPU. Keeping safetensors bf16 weights as
//! stored halves memory against converting them to f32, but candle's CPU bf16 matmul is slow and
//! allocates converted copies. Here each weight row is widened to f32 once (a 16-bit shift) and
//! dotted with every activation row with AVX2/FMA chosen at run time; rows are spread over rayon
//! threads. Activations stay f32, so results match an f32 matmul on the bf16 values.

#[cfg(target_arch = "x86_64")]
use super::cpu_matmul::hsum;
use super::cpu_matmul::{
    for_each_chunk, has_avx2_fma_f16c, input_rows, rows_per_task, transposed_output,
};
use candle_core::{Device, Result, Tensor};

/// A `[rows, cols]` bf16 matrix (raw bits).
pub struct Bf16Matrix {
    data: Vec<u16>,
    rows: usize,
    cols: usize,
}

impl Bf16Matrix {
    /// From little-endian bf16 bytes as stored in safetensors.
    pub fn from_le_bytes(bytes: &[u8], rows: usize, cols: usize) -> Result<Self> {
        if bytes.len() != rows * cols * 2 {
            candle_core::bail!(
                "bf16 matrix [{rows}, {cols}] needs {} bytes, got {}",
                rows * cols * 2,
                bytes.len()
            );
        }
        let data = bytes
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect();
        Ok(Self { data, rows, cols })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The matrices one above the other (`[Σ rows, cols]`), or `None` when their widths differ.
    pub fn stack(parts: &[&Self]) -> Option<Self> {
        let cols = parts.first()?.cols;
        if parts.iter().any(|p| p.cols != cols) {
            return None;
        }
        let rows = parts.iter().map(|p| p.rows).sum();
        let mut data = Vec::with_capacity(parts.iter().map(|p| p.data.len()).sum());
        for p in parts {
            data.extend_from_slice(&p.data);
        }
        Some(Self { data, rows, cols })
    }

    /// Rows `ids` widened to f32: `[ids.len(), cols]` (token embedding lookup).
    pub fn gather_rows(&self, ids: &[u32]) -> Result<Tensor> {
        let mut out = Vec::with_capacity(ids.len() * self.cols);
        for &id in ids {
            let id = id as usize;
            if id >= self.rows {
                candle_core::bail!("token id {id} is outside the vocabulary of {}", self.rows);
            }
            out.extend(
                self.data[id * self.cols..(id + 1) * self.cols]
                    .iter()
                    .map(|&b| f32::from_bits((b as u32) << 16)),
            );
        }
        Tensor::from_vec(out, (ids.len(), self.cols), &Device::Cpu)
    }

    /// `x`: `[.., cols]` f32 → `[.., rows]` f32.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (dims, m) = input_rows(x, self.cols, "bf16")?;
        let k = self.cols;
        if m >= GEMM_MIN_ROWS {
            return self.forward_gemm(x, m);
        }
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let n = self.rows;
        let mut yt = vec![0f32; n * m];
        let chunk_rows = rows_per_task(n, 16);
        #[cfg(target_arch = "x86_64")]
        if super::cpu_matmul::has_avx512_vnni() {
            let xp = avx512::even_odd(&xs, k);
            for_each_chunk(&mut yt, chunk_rows * m, |c, out| {
                for (r_local, out_row) in out.chunks_mut(m).enumerate() {
                    let r = c * chunk_rows + r_local;
                    let w = &self.data[r * k..(r + 1) * k];
                    // SAFETY: AVX-512 F/BW was detected at run time; `xp` holds m rows of k.
                    unsafe { avx512::dot_rows(w, &xp, m, out_row) };
                }
            });
            return transposed_output(yt, n, m, dims);
        }
        let avx2 = has_avx2_fma_f16c();
        for_each_chunk(&mut yt, chunk_rows * m, |c, out| {
            let mut wrow = vec![0f32; k];
            for (r_local, out_row) in out.chunks_mut(m).enumerate() {
                let r = c * chunk_rows + r_local;
                let w = &self.data[r * k..(r + 1) * k];
                if m == 1 {
                    out_row[0] = if avx2 {
                        // SAFETY: AVX2 and FMA were detected at run time.
                        unsafe { dot_bf16_avx2(w, &xs) }
                    } else {
                        w.iter()
                            .zip(&xs)
                            .map(|(&b, &x)| f32::from_bits((b as u32) << 16) * x)
                            .sum()
                    };
                    continue;
                }
                for (o, &b) in wrow.iter_mut().zip(w) {
                    *o = f32::from_bits((b as u32) << 16);
                }
                let mut i = 0;
                // Four activation rows per pass share each load of the weight row.
                while avx2 && i + 4 <= m {
                    // SAFETY: as above.
                    let y4 = unsafe { dot4_f32_avx2(&wrow, &xs[i * k..(i + 4) * k]) };
                    out_row[i..i + 4].copy_from_slice(&y4);
                    i += 4;
                }
                for (i, y) in out_row.iter_mut().enumerate().skip(i) {
                    let xrow = &xs[i * k..(i + 1) * k];
                    *y = if avx2 {
                        // SAFETY: as above.
                        unsafe { dot_f32_avx2(&wrow, xrow) }
                    } else {
                        wrow.iter().zip(xrow).map(|(a, b)| a * b).sum()
                    };
                }
            }
        });
        transposed_output(yt, n, m, dims)
    }
}

/// Prefill: widen [`GEMM_ROWS`] weight rows at a time to f32 and let candle's f32 GEMM (packed,
/// cache-blocked) do the product; the f32 copy is bounded by one block, not the whole matrix.
impl Bf16Matrix {
    fn forward_gemm(&self, x: &Tensor, m: usize) -> Result<Tensor> {
        let k = self.cols;
        let x2 = x.reshape((m, k))?.to_dtype(candle_core::DType::F32)?;
        let mut parts = Vec::with_capacity(self.rows.div_ceil(GEMM_ROWS));
        for start in (0..self.rows).step_by(GEMM_ROWS) {
            let rows = GEMM_ROWS.min(self.rows - start);
            let mut block = vec![0f32; rows * k];
            for (o, &b) in block
                .iter_mut()
                .zip(&self.data[start * k..(start + rows) * k])
            {
                *o = f32::from_bits((b as u32) << 16);
            }
            let w = Tensor::from_vec(block, (rows, k), &Device::Cpu)?;
            parts.push(x2.matmul(&w.t()?)?);
        }
        let y = Tensor::cat(&parts, 1)?;
        let mut out_dims = x.dims().to_vec();
        *out_dims.last_mut().unwrap() = self.rows;
        y.reshape(out_dims)
    }
}

/// The AVX-512 decode path: a 512-bit load holds 32 bf16 weights as 16 dwords; the even
/// elements become f32 by a 16-bit left shift of each dword and the odd ones by masking its low
/// half, so no widening shuffle is needed. The activations are reordered once per call into the
/// same even/odd order. Products are exact f32 products of the bf16 weights, as in the AVX2 path;
/// only the summation order differs. One function serves every row count below the GEMM
/// threshold, with each activation row summed in the same order whatever the others, so a row's
/// result does not depend on the batch it is in.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// Elements per step.
    const STEP: usize = 32;
    /// Weights prefetched ahead of the ones being read (4 KB). Decode reads each weight once
    /// from memory; as for the MXFP4 experts (`kernels::mxfp4_int`), the loads otherwise wait on
    /// DRAM at well below what two cores can stream. A task's rows are contiguous, so the
    /// prefetch runs on into its next row; past the matrix it is a harmless no-op.
    const AHEAD: usize = 2048;

    /// Each row of `x` (`[m, k]`): every whole 32-element chunk as its 16 even then 16 odd
    /// elements; the tail (`k % 32`) as it is.
    pub(super) fn even_odd(x: &[f32], k: usize) -> Vec<f32> {
        let mut out = x.to_vec();
        for (src, dst) in x.chunks_exact(k).zip(out.chunks_exact_mut(k)) {
            for (s, d) in src.chunks_exact(STEP).zip(dst.chunks_exact_mut(STEP)) {
                for j in 0..STEP / 2 {
                    d[j] = s[2 * j];
                    d[STEP / 2 + j] = s[2 * j + 1];
                }
            }
        }
        out
    }

    /// `out[i] = Σ w · x_i` for the `m` rows of `xp` (in [`even_odd`] order), four rows per
    /// pass over `w`, then one at a time; the per-row arithmetic is the same in both.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
    pub(super) unsafe fn dot_rows(w: &[u16], xp: &[f32], m: usize, out: &mut [f32]) {
        let k = w.len();
        let mut i = 0;
        while i + 4 <= m {
            out[i..i + 4].copy_from_slice(&dot::<4>(w, &xp[i * k..(i + 4) * k]));
            i += 4;
        }
        while i < m {
            out[i] = dot::<1>(w, &xp[i * k..(i + 1) * k])[0];
            i += 1;
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
    unsafe fn dot<const R: usize>(w: &[u16], xp: &[f32]) -> [f32; R] {
        let k = w.len();
        let high = _mm512_set1_epi32(0xffff_0000u32 as i32);
        // Two chunks per iteration, even and odd accumulators each: four independent chains.
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        let wp = w.as_ptr();
        let mut i = 0;
        macro_rules! step {
            ($i:expr, $a:expr) => {{
                let raw = _mm512_loadu_si512(wp.add($i) as *const _);
                let even = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
                let odd = _mm512_castsi512_ps(_mm512_and_si512(raw, high));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let x = xp.as_ptr().add(r * k + $i);
                    acc[$a] = _mm512_fmadd_ps(even, _mm512_loadu_ps(x), acc[$a]);
                    acc[$a + 1] =
                        _mm512_fmadd_ps(odd, _mm512_loadu_ps(x.add(STEP / 2)), acc[$a + 1]);
                }
            }};
        }
        while i + 2 * STEP <= k {
            _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(i + AHEAD) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(i + AHEAD + STEP) as *const i8);
            step!(i, 0);
            step!(i + STEP, 2);
            i += 2 * STEP;
        }
        if i + STEP <= k {
            step!(i, 0);
            i += STEP;
        }
        let mut out = [0f32; R];
        for (r, (o, a)) in out.iter_mut().zip(&acc).enumerate() {
            let s = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
            *o = _mm512_reduce_add_ps(s);
            for j in i..k {
                *o += f32::from_bits((w[j] as u32) << 16) * xp[r * k + j];
            }
        }
        out
    }
}

/// Activation rows from which the GEMM path is used.
const GEMM_MIN_ROWS: usize = 16;
/// Weight rows widened per GEMM call (≈ 1 MiB of f32 for 576 columns).
const GEMM_ROWS: usize = 512;

/// Σ bf16(w) · x, 16 elements per step in two accumulators.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_bf16_avx2(w: &[u16], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let k = w.len();
    let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    while i + 16 <= k {
        // 4 KB ahead, as in the AVX-512 path (`avx512::AHEAD`); one line per 32 elements.
        if i % 32 == 0 {
            _mm_prefetch::<_MM_HINT_T0>(w.as_ptr().wrapping_add(i + 2048) as *const i8);
        }
        let raw = _mm256_loadu_si256(w.as_ptr().add(i) as *const __m256i);
        let lo = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(raw)), 16);
        let hi = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(raw, 1)), 16);
        a0 = _mm256_fmadd_ps(
            _mm256_castsi256_ps(lo),
            _mm256_loadu_ps(x.as_ptr().add(i)),
            a0,
        );
        a1 = _mm256_fmadd_ps(
            _mm256_castsi256_ps(hi),
            _mm256_loadu_ps(x.as_ptr().add(i + 8)),
            a1,
        );
        i += 16;
    }
    let mut s = hsum(_mm256_add_ps(a0, a1));
    while i < k {
        s += f32::from_bits((w[i] as u32) << 16) * x[i];
        i += 1;
    }
    s
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_f32_avx2(w: &[f32], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let k = w.len();
    let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    while i + 16 <= k {
        a0 = _mm256_fmadd_ps(
            _mm256_loadu_ps(w.as_ptr().add(i)),
            _mm256_loadu_ps(x.as_ptr().add(i)),
            a0,
        );
        a1 = _mm256_fmadd_ps(
            _mm256_loadu_ps(w.as_ptr().add(i + 8)),
            _mm256_loadu_ps(x.as_ptr().add(i + 8)),
            a1,
        );
        i += 16;
    }
    let mut s = hsum(_mm256_add_ps(a0, a1));
    while i < k {
        s += w[i] * x[i];
        i += 1;
    }
    s
}

/// `w` dotted with four consecutive rows of `x4` (`[4, k]`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot4_f32_avx2(w: &[f32], x4: &[f32]) -> [f32; 4] {
    use std::arch::x86_64::*;
    let k = w.len();
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 8 <= k {
        let wv = _mm256_loadu_ps(w.as_ptr().add(i));
        for (r, a) in acc.iter_mut().enumerate() {
            *a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x4.as_ptr().add(r * k + i)), *a);
        }
        i += 8;
    }
    let mut out = [0f32; 4];
    for r in 0..4 {
        out[r] = hsum(acc[r]);
        for j in i..k {
            out[r] += w[j] * x4[r * k + j];
        }
    }
    out
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn dot4_f32_avx2(w: &[f32], x4: &[f32]) -> [f32; 4] {
    let k = w.len();
    std::array::from_fn(|r| {
        w.iter()
            .zip(&x4[r * k..(r + 1) * k])
            .map(|(a, b)| a * b)
            .sum()
    })
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn dot_bf16_avx2(w: &[u16], x: &[f32]) -> f32 {
    w.iter()
        .zip(x)
        .map(|(&b, &x)| f32::from_bits((b as u32) << 16) * x)
        .sum()
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn dot_f32_avx2(w: &[f32], x: &[f32]) -> f32 {
    w.iter().zip(x).map(|(a, b)| a * b).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    #[test]
    fn matches_f32_matmul_on_the_same_values() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (37, 100), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let bits: Vec<u8> = w
            .flatten_all()
            .unwrap()
            .to_vec1::<half::bf16>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_bits().to_le_bytes())
            .collect();
        let mat = Bf16Matrix::from_le_bytes(&bits, 37, 100).unwrap();
        let wf = w.to_dtype(DType::F32).unwrap();
        for rows in [1usize, 5, 9, 40] {
            let x = Tensor::randn(0f32, 1.0, (rows, 100), &dev).unwrap();
            let ours = mat.forward(&x).unwrap();
            let reference = x.matmul(&wf.t().unwrap()).unwrap();
            let err = (ours - &reference)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            assert!(err.to_scalar::<f32>().unwrap() < 1e-4, "rows={rows}");
        }
        let emb = mat.gather_rows(&[3, 0]).unwrap();
        let reference = wf
            .index_select(&Tensor::new(&[3u32, 0], &dev).unwrap(), 0)
            .unwrap();
        assert_eq!(
            emb.to_vec2::<f32>().unwrap(),
            reference.to_vec2::<f32>().unwrap()
        );
        assert!(mat.gather_rows(&[37]).is_err());
    }
}
