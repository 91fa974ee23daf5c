//! Our own matmul for the GGUF block formats small models ship in, `Q4_1` and `Q8_0`. candle 0.11
//! has no SIMD kernel for Q4_1 (its AVX paths are compile-time gated and cover Q4_0/Q8_0/k-quants
//! only), so Q4_1 models ran with a scalar loop; its Q8_0 path (the tied LM head of most small
//! GGUFs, often the largest matrix) converts each block scale through a function call and always
//! hands work to rayon. These kernels quantize activations to 8-bit blocks (like llama.cpp's Q8_1),
//! take an AVX2 path chosen at run time (scalar elsewhere), and spread weight rows over rayon
//! threads — in the calling thread when the pool has one. The matrix also serves as a token
//! embedding table (rows dequantized on lookup), so a tied LM head costs no second copy.

#[cfg(target_arch = "x86_64")]
use super::cpu_matmul::hsum;
use super::cpu_matmul::{
    for_each_chunk, has_avx2_fma_f16c, input_rows, rows_per_task, transposed_output,
};
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Result, Tensor};
use half::f16;

/// Elements per block (both formats).
const QK: usize = 32;

/// The GGUF block formats this kernel reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockFormat {
    /// f16 scale, f16 min, 16 bytes of nibbles: `w = d·q + m`, q in 0..16.
    Q4_1,
    /// f16 scale, 32 signed bytes: `w = d·q`.
    Q8_0,
}

impl BlockFormat {
    /// The format of a GGUF tensor type, if these kernels handle it.
    pub fn of(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q4_1 => Some(Self::Q4_1),
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            _ => None,
        }
    }

    fn block_bytes(self) -> usize {
        match self {
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Q4_1 => "Q4_1",
            Self::Q8_0 => "Q8_0",
        }
    }
}

/// A `[rows, cols]` matrix of GGUF blocks, as stored in the file.
pub struct QuantMatrix {
    format: BlockFormat,
    data: Vec<u8>,
    rows: usize,
    cols: usize,
}

/// One block of activations quantized to i8: `x ≈ d * q`, `s = d * Σq`.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
struct BlockQ8 {
    qs: [i8; QK],
    d: f32,
    s: f32,
}

impl QuantMatrix {
    pub fn new(format: BlockFormat, data: Vec<u8>, rows: usize, cols: usize) -> Result<Self> {
        let need = rows * cols / QK * format.block_bytes();
        if cols % QK != 0 || data.len() != need {
            candle_core::bail!(
                "{} matrix [{rows}, {cols}] needs {need} bytes, got {}",
                format.name(),
                data.len()
            );
        }
        Ok(Self {
            format,
            data,
            rows,
            cols,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The matrices one above the other (`[Σ rows, cols]`), or `None` when their formats or
    /// widths differ.
    pub fn stack(parts: &[&Self]) -> Option<Self> {
        let first = parts.first()?;
        let (format, cols) = (first.format, first.cols);
        if parts.iter().any(|p| p.format != format || p.cols != cols) {
            return None;
        }
        let rows = parts.iter().map(|p| p.rows).sum();
        let mut data = Vec::with_capacity(parts.iter().map(|p| p.data.len()).sum());
        for p in parts {
            data.extend_from_slice(&p.data);
        }
        Some(Self {
            format,
            data,
            rows,
            cols,
        })
    }

    fn row_bytes(&self) -> usize {
        self.cols / QK * self.format.block_bytes()
    }

    /// `x`: `[.., cols]` f32 on the CPU → `[.., rows]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (dims, m) = input_rows(x, self.cols, self.format.name())?;
        let blocks = self.cols / QK;
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let avx2 = has_avx2_fma_f16c();
        let xq = quantize_activations(&xs, avx2);
        let n = self.rows;
        // Output transposed ([n, m]) so each thread writes whole rows; weight rows stay in cache
        // while every activation row passes over them.
        let mut yt = vec![0f32; n * m];
        let row_bytes = self.row_bytes();
        let chunk_rows = rows_per_task(n, 16);
        let k = self.format.kernels(avx2);
        for_each_chunk(&mut yt, chunk_rows * m, |c, out| {
            let first = c * chunk_rows;
            let row = |r: usize| &self.data[r * row_bytes..(r + 1) * row_bytes];
            if m == 1 {
                // Decode: two weight rows per pass share each activation block and give the
                // CPU two independent accumulation chains.
                let last_row = first + out.len() - 1;
                let mut pairs = out.chunks_exact_mut(2);
                for (p, pair) in (&mut pairs).enumerate() {
                    let r = first + 2 * p;
                    pair.copy_from_slice(&(k.dot2)(row(r), row(r + 1), &xq));
                }
                if let [last] = pairs.into_remainder() {
                    *last = (k.dot)(row(last_row), &xq);
                }
                return;
            }
            for (r_local, out_row) in out.chunks_mut(m).enumerate() {
                let w = row(first + r_local);
                let mut i = 0;
                // Four activation rows per pass share each unpacked weight block.
                while i + 4 <= m {
                    out_row[i..i + 4]
                        .copy_from_slice(&(k.dot4)(w, &xq[i * blocks..(i + 4) * blocks]));
                    i += 4;
                }
                for (i, y) in out_row.iter_mut().enumerate().skip(i) {
                    *y = (k.dot)(w, &xq[i * blocks..(i + 1) * blocks]);
                }
            }
        });
        transposed_output(yt, n, m, dims)
    }

    /// Rows `ids` dequantized to f32: `[ids.len(), cols]` (token embedding lookup).
    pub fn gather_rows(&self, ids: &[u32]) -> Result<Tensor> {
        let row_bytes = self.row_bytes();
        let mut out = Vec::with_capacity(ids.len() * self.cols);
        for &id in ids {
            let r = id as usize;
            if r >= self.rows {
                candle_core::bail!("token id {id} is outside the {} embedding rows", self.rows);
            }
            let row = &self.data[r * row_bytes..(r + 1) * row_bytes];
            for b in row.chunks_exact(self.format.block_bytes()) {
                let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
                match self.format {
                    BlockFormat::Q4_1 => {
                        let m = f16::from_le_bytes([b[2], b[3]]).to_f32();
                        let nibbles = &b[4..4 + QK / 2];
                        out.extend(nibbles.iter().map(|q| d * (q & 0x0F) as f32 + m));
                        out.extend(nibbles.iter().map(|q| d * (q >> 4) as f32 + m));
                    }
                    BlockFormat::Q8_0 => out.extend(b[2..].iter().map(|&q| d * q as i8 as f32)),
                }
            }
        }
        Tensor::from_vec(out, (ids.len(), self.cols), &Device::Cpu)
    }
}

/// The dot products of one format: a weight row with one activation row (`dot`), two weight rows
/// with one activation row (`dot2`, decode) and one weight row with four activation rows (`dot4`,
/// prefill; `xq` holds 4 × blocks).
struct RowKernels {
    dot: DotFn,
    dot2: Dot2Fn,
    dot4: fn(&[u8], &[BlockQ8]) -> [f32; 4],
}

type DotFn = fn(&[u8], &[BlockQ8]) -> f32;
type Dot2Fn = fn(&[u8], &[u8], &[BlockQ8]) -> [f32; 2];

impl BlockFormat {
    /// The row kernels for this format: AVX2 when `avx2` (detected at run time), else scalar.
    fn kernels(self, avx2: bool) -> RowKernels {
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY (each closure): AVX2, FMA and F16C were detected at run time.
            return match self {
                Self::Q4_1 => RowKernels {
                    dot: |w, x| unsafe { q4_1_dot_avx2(w, x) },
                    dot2: |w0, w1, x| unsafe { q4_1_dot2_avx2(w0, w1, x) },
                    dot4: |w, x| unsafe { q4_1_dot4_avx2(w, x) },
                },
                Self::Q8_0 => RowKernels {
                    dot: |w, x| unsafe { q8_0_dot_avx2(w, x) },
                    dot2: |w0, w1, x| unsafe { [q8_0_dot_avx2(w0, x), q8_0_dot_avx2(w1, x)] },
                    dot4: |w, x| unsafe { q8_0_dot4_avx2(w, x) },
                },
            };
        }
        let _ = avx2;
        match self {
            Self::Q4_1 => RowKernels {
                dot: q4_1_dot_scalar,
                dot2: |w0, w1, x| [q4_1_dot_scalar(w0, x), q4_1_dot_scalar(w1, x)],
                dot4: |w, x| dot4_with(w, x, q4_1_dot_scalar),
            },
            Self::Q8_0 => RowKernels {
                dot: q8_0_dot_scalar,
                dot2: |w0, w1, x| [q8_0_dot_scalar(w0, x), q8_0_dot_scalar(w1, x)],
                dot4: |w, x| dot4_with(w, x, q8_0_dot_scalar),
            },
        }
    }
}

/// Four single-row dots (the scalar fallback of the four-row kernels).
fn dot4_with(w: &[u8], xq4: &[BlockQ8], dot: DotFn) -> [f32; 4] {
    let blocks = xq4.len() / 4;
    std::array::from_fn(|r| dot(w, &xq4[r * blocks..(r + 1) * blocks]))
}

/// Activations `xs` (a multiple of 32 long) as 8-bit blocks.
fn quantize_activations(xs: &[f32], avx2: bool) -> Vec<BlockQ8> {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: AVX2, FMA and F16C were detected at run time.
        return xs
            .chunks_exact(QK)
            .map(|x| unsafe { quantize_block_avx2(x) })
            .collect();
    }
    let _ = avx2;
    xs.chunks_exact(QK).map(quantize_block).collect()
}

fn quantize_block(x: &[f32]) -> BlockQ8 {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0i8; QK];
    let mut sum = 0i32;
    for (q, v) in qs.iter_mut().zip(x) {
        *q = (v * id).round_ties_even() as i8;
        sum += *q as i32;
    }
    BlockQ8 {
        qs,
        d,
        s: d * sum as f32,
    }
}

/// [`quantize_block`] in AVX2: the libm `roundf` call per element cost more than the
/// quantization itself. Both round half to even, as llama.cpp's x86 `quantize_row_q8_1` does
/// (`_mm256_round_ps`). Exact ties are rare, yet on SmolLM2 Q4_1 half-away rounding moves the
/// 338-token perplexity by 0.25 %: the noise floor of such comparisons.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_block_avx2(x: &[f32]) -> BlockQ8 {
    use std::arch::x86_64::*;
    let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(x.as_ptr().add(8 * i)));
    let sign = _mm256_set1_ps(-0.0);
    let amax8 = v.iter().fold(_mm256_setzero_ps(), |a, &x| {
        _mm256_max_ps(a, _mm256_andnot_ps(sign, x))
    });
    let amax4 = _mm_max_ps(
        _mm256_extractf128_ps(amax8, 1),
        _mm256_castps256_ps128(amax8),
    );
    let amax2 = _mm_max_ps(amax4, _mm_movehl_ps(amax4, amax4));
    let amax = _mm_cvtss_f32(_mm_max_ss(amax2, _mm_shuffle_ps(amax2, amax2, 1)));
    let d = amax / 127.0;
    let id = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
    let q: [__m256i; 4] = std::array::from_fn(|i| {
        _mm256_cvtps_epi32(_mm256_round_ps(
            _mm256_mul_ps(v[i], id),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        ))
    });
    let sum32 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    let sum = hsum(_mm256_cvtepi32_ps(sum32));
    // i32 → i16 → i8 packs interleave the 128-bit lanes; the permute restores element order.
    let q16a = _mm256_packs_epi32(q[0], q[1]);
    let q16b = _mm256_packs_epi32(q[2], q[3]);
    let q8 = _mm256_packs_epi16(q16a, q16b);
    let q8 = _mm256_permutevar8x32_epi32(q8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    let mut out = BlockQ8 {
        qs: [0; QK],
        d,
        s: d * sum,
    };
    _mm256_store_si256(out.qs.as_mut_ptr() as *mut __m256i, q8);
    out
}

fn q4_1_dot_scalar(w: &[u8], xb: &[BlockQ8]) -> f32 {
    let mut acc = 0f32;
    for (b, x) in w.chunks_exact(BlockFormat::Q4_1.block_bytes()).zip(xb) {
        let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
        let m = f16::from_le_bytes([b[2], b[3]]).to_f32();
        let mut isum = 0i32;
        for j in 0..QK / 2 {
            let q = b[4 + j];
            isum += (q & 0x0F) as i32 * x.qs[j] as i32 + (q >> 4) as i32 * x.qs[j + QK / 2] as i32;
        }
        acc += d * x.d * isum as f32 + m * x.s;
    }
    acc
}

fn q8_0_dot_scalar(w: &[u8], xb: &[BlockQ8]) -> f32 {
    let mut acc = 0f32;
    for (b, x) in w.chunks_exact(BlockFormat::Q8_0.block_bytes()).zip(xb) {
        let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
        let isum: i32 = b[2..]
            .iter()
            .zip(&x.qs)
            .map(|(&q, &v)| q as i8 as i32 * v as i32)
            .sum();
        acc += d * x.d * isum as f32;
    }
    acc
}

/// One Q4_1 block unpacked: scale, min and the 32 nibbles as bytes (low halves first).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_1_block(b: &[u8]) -> (f32, f32, std::arch::x86_64::__m256i) {
    use std::arch::x86_64::*;
    // Both f16 halves (scale, min) converted at once with F16C.
    let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from_le_bytes([
        b[0], b[1], b[2], b[3],
    ])));
    let d = _mm_cvtss_f32(dm);
    let m = _mm_cvtss_f32(_mm_shuffle_ps(dm, dm, 1));
    let mask = _mm_set1_epi8(0x0F);
    let packed = _mm_loadu_si128(b.as_ptr().add(4) as *const __m128i);
    let lo = _mm_and_si128(packed, mask);
    let hi = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
    (d, m, _mm256_set_m128i(hi, lo))
}

/// Σ u8 × i8 over 32 pairs, as eight i32 lanes converted to f32 (|15·127·2| fits in i16).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_u8_i8(u: std::arch::x86_64::__m256i, x: &BlockQ8) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let q8 = _mm256_load_si256(x.qs.as_ptr() as *const __m256i);
    let prod = _mm256_madd_epi16(_mm256_maddubs_epi16(u, q8), _mm256_set1_epi16(1));
    _mm256_cvtepi32_ps(prod)
}

/// Σ i8 × i8 over 32 pairs: the sign of `w` moved onto `x` so `maddubs` sees |w| (≤ 128) × i8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_i8_i8(w: std::arch::x86_64::__m256i, x: &BlockQ8) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let q8 = _mm256_load_si256(x.qs.as_ptr() as *const __m256i);
    let prod = _mm256_madd_epi16(
        _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(q8, w)),
        _mm256_set1_epi16(1),
    );
    _mm256_cvtepi32_ps(prod)
}

/// One accumulation chain per row, the same operations in the same order as
/// [`q4_1_dot2_avx2`] and [`q4_1_dot4_avx2`]: a row's result never depends on which kernel (decode,
/// prefill, remainder) ran it, so batching and prompt chunking do not change results — with
/// activations quantized to 8 bits, a last-bit difference can flip a rounding downstream.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_1_dot_avx2(w: &[u8], xb: &[BlockQ8]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = _mm256_setzero_ps();
    let mut acc_min = 0f32;
    for (b, x) in w.chunks_exact(20).zip(xb) {
        let (d, m, q4) = q4_1_block(b);
        acc = _mm256_fmadd_ps(dot_u8_i8(q4, x), _mm256_set1_ps(d * x.d), acc);
        acc_min += m * x.s;
    }
    hsum(acc) + acc_min
}

/// Two weight rows dotted with one activation row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_1_dot2_avx2(w0: &[u8], w1: &[u8], xb: &[BlockQ8]) -> [f32; 2] {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_ps(); 2];
    let mut acc_min = [0f32; 2];
    for ((b0, b1), x) in w0.chunks_exact(20).zip(w1.chunks_exact(20)).zip(xb) {
        for (r, b) in [b0, b1].into_iter().enumerate() {
            let (d, m, q4) = q4_1_block(b);
            acc[r] = _mm256_fmadd_ps(dot_u8_i8(q4, x), _mm256_set1_ps(d * x.d), acc[r]);
            acc_min[r] += m * x.s;
        }
    }
    [hsum(acc[0]) + acc_min[0], hsum(acc[1]) + acc_min[1]]
}

/// The weight row `w` dotted with four activation rows (`xq4`: 4 × `blocks` blocks).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_1_dot4_avx2(w: &[u8], xq4: &[BlockQ8]) -> [f32; 4] {
    use std::arch::x86_64::*;
    let blocks = xq4.len() / 4;
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut acc_min = [0f32; 4];
    for (bi, b) in w.chunks_exact(20).enumerate() {
        let (d, m, q4) = q4_1_block(b);
        for r in 0..4 {
            let x = &xq4[r * blocks + bi];
            acc[r] = _mm256_fmadd_ps(dot_u8_i8(q4, x), _mm256_set1_ps(d * x.d), acc[r]);
            acc_min[r] += m * x.s;
        }
    }
    std::array::from_fn(|r| hsum(acc[r]) + acc_min[r])
}

/// The f16 scale at the start of a block, with F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_scale(b: &[u8]) -> f32 {
    use std::arch::x86_64::*;
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
        u16::from_le_bytes([b[0], b[1]]) as i32,
    )))
}

/// One accumulation chain, as [`q8_0_dot4_avx2`] per row (see [`q4_1_dot_avx2`] for why).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_dot_avx2(w: &[u8], xb: &[BlockQ8]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = _mm256_setzero_ps();
    for (b, x) in w.chunks_exact(34).zip(xb) {
        let q = _mm256_loadu_si256(b.as_ptr().add(2) as *const __m256i);
        acc = _mm256_fmadd_ps(dot_i8_i8(q, x), _mm256_set1_ps(f16_scale(b) * x.d), acc);
    }
    hsum(acc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_dot4_avx2(w: &[u8], xq4: &[BlockQ8]) -> [f32; 4] {
    use std::arch::x86_64::*;
    let blocks = xq4.len() / 4;
    let mut acc = [_mm256_setzero_ps(); 4];
    for (bi, b) in w.chunks_exact(34).enumerate() {
        let q = _mm256_loadu_si256(b.as_ptr().add(2) as *const __m256i);
        let d = f16_scale(b);
        for r in 0..4 {
            let x = &xq4[r * blocks + bi];
            acc[r] = _mm256_fmadd_ps(dot_i8_i8(q, x), _mm256_set1_ps(d * x.d), acc[r]);
        }
    }
    std::array::from_fn(|r| hsum(acc[r]))
}

#[cfg(test)]
mod tests {
    use super::super::cpu_matmul::max_abs;
    use super::*;
    use candle_core::quantized::QTensor;

    /// Our product against the dense product of candle's dequantized weights, for 1 to 6
    /// activation rows (the single-row and four-row kernels, AVX2 or scalar as detected).
    fn check_against_dense(dtype: GgmlDType) {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (40, 96), &dev).unwrap();
        let q = QTensor::quantize(&w, dtype).unwrap();
        let dense = q.dequantize(&dev).unwrap();
        let format = BlockFormat::of(dtype).unwrap();
        let mat = QuantMatrix::new(format, q.data().unwrap().into_owned(), 40, 96).unwrap();
        for rows in [1usize, 3, 4, 6] {
            let x = Tensor::randn(0f32, 1.0, (1, rows, 96), &dev).unwrap();
            let ours = mat.forward(&x).unwrap();
            let reference = x
                .reshape((rows, 96))
                .unwrap()
                .matmul(&dense.t().unwrap())
                .unwrap();
            let diff = (ours.reshape((rows, 40)).unwrap() - &reference).unwrap();
            // Only the 8-bit activation rounding separates the two.
            let rel = max_abs(&diff) / max_abs(&reference);
            assert!(rel < 0.02, "{dtype:?} rows={rows}: relative error {rel}");
        }
    }

    #[test]
    fn q4_1_matches_dense_product_of_dequantized_weights() {
        check_against_dense(GgmlDType::Q4_1);
    }

    #[test]
    fn q8_0_matches_dense_product_of_dequantized_weights() {
        check_against_dense(GgmlDType::Q8_0);
    }

    #[test]
    fn simd_and_scalar_paths_agree() {
        if !has_avx2_fma_f16c() {
            return;
        }
        let dev = Device::Cpu;
        let xs: Vec<f32> = Tensor::randn(0f32, 3.0, 4 * 96, &dev)
            .unwrap()
            .to_vec1()
            .unwrap();
        let scalar = quantize_activations(&xs, false);
        let simd = quantize_activations(&xs, true);
        for (a, b) in scalar.iter().zip(&simd) {
            assert_eq!(a.qs, b.qs);
            assert!(
                (a.d - b.d).abs() <= 1e-7 * a.d && (a.s - b.s).abs() <= 1e-5 * a.s.abs().max(1.0)
            );
        }
        let w = Tensor::randn(0f32, 1.0, (1, 96), &dev).unwrap();
        for format in [BlockFormat::Q4_1, BlockFormat::Q8_0] {
            let dtype = match format {
                BlockFormat::Q4_1 => GgmlDType::Q4_1,
                BlockFormat::Q8_0 => GgmlDType::Q8_0,
            };
            let data = QTensor::quantize(&w, dtype)
                .unwrap()
                .data()
                .unwrap()
                .into_owned();
            let (simd_k, scalar_k) = (format.kernels(true), format.kernels(false));
            let one = (simd_k.dot)(&data, &simd[..3]);
            assert!((one - (scalar_k.dot)(&data, &simd[..3])).abs() < 1e-3 * one.abs().max(1.0));
            let two = (simd_k.dot2)(&data, &data, &simd[3..6]);
            let two_s = (scalar_k.dot2)(&data, &data, &simd[3..6]);
            let four = (simd_k.dot4)(&data, &simd);
            let four_s = (scalar_k.dot4)(&data, &simd);
            for (a, b) in two.iter().zip(two_s).chain(four.iter().zip(four_s)) {
                assert!(
                    (a - b).abs() < 1e-3 * a.abs().max(1.0),
                    "{format:?}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn stacked_matrices_give_the_concatenated_outputs() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 64), &dev).unwrap();
        let make = |rows: usize, dtype: GgmlDType| {
            let w = Tensor::randn(0f32, 1.0, (rows, 64), &dev).unwrap();
            let data = QTensor::quantize(&w, dtype)
                .unwrap()
                .data()
                .unwrap()
                .into_owned();
            QuantMatrix::new(BlockFormat::of(dtype).unwrap(), data, rows, 64).unwrap()
        };
        let (a, b) = (make(24, GgmlDType::Q4_1), make(8, GgmlDType::Q4_1));
        let want = Tensor::cat(&[a.forward(&x).unwrap(), b.forward(&x).unwrap()], 1).unwrap();
        let stacked = QuantMatrix::stack(&[&a, &b]).unwrap();
        assert_eq!(stacked.rows(), 32);
        let diff = max_abs(&(stacked.forward(&x).unwrap() - want).unwrap());
        assert_eq!(diff, 0.0);
        let (c, d) = (make(8, GgmlDType::Q4_1), make(8, GgmlDType::Q8_0));
        assert!(QuantMatrix::stack(&[&c, &d]).is_none(), "formats differ");
    }

    #[test]
    fn gather_rows_matches_candle_dequantization() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (10, 64), &dev).unwrap();
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let dense = q.dequantize(&dev).unwrap();
            let format = BlockFormat::of(dtype).unwrap();
            let mat = QuantMatrix::new(format, q.data().unwrap().into_owned(), 10, 64).unwrap();
            let ids = [7u32, 0, 7, 9];
            let ours = mat.gather_rows(&ids).unwrap();
            let want = dense
                .index_select(&Tensor::new(&ids, &dev).unwrap(), 0)
                .unwrap();
            let diff = max_abs(&(ours - want).unwrap());
            assert!(diff < 1e-6, "{dtype:?}: rows differ by {diff}");
            assert!(
                mat.gather_rows(&[10]).is_err(),
                "an id past the table is an error"
            );
        }
    }
}
