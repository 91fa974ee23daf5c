//! Our own matmul for GGUF `Q4_1` weights. candle 0.11 has no SIMD kernel for Q4_1 (its AVX
//! paths are compile-time gated and cover Q4_0/Q8_0/k-quants only), so Q4_1 models ran with a
//! scalar loop. This kernel quantizes activations to 8-bit blocks (like llama.cpp's Q8_1), takes
//! an AVX2 path chosen at run time (scalar elsewhere), and spreads weight rows over rayon threads.

#[cfg(target_arch = "x86_64")]
use super::cpu_matmul::hsum;
use super::cpu_matmul::{for_each_chunk, input_rows, rows_per_task, transposed_output};
use candle_core::{Result, Tensor};
use half::f16;

/// Elements per Q4_1 block.
const QK: usize = 32;
/// Bytes per Q4_1 block: f16 scale, f16 min, 16 bytes of nibbles.
const Q4_1_BYTES: usize = 20;

/// A `[rows, cols]` Q4_1 matrix as stored in GGUF.
pub struct Q41Matrix {
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

impl Q41Matrix {
    pub fn new(data: Vec<u8>, rows: usize, cols: usize) -> Result<Self> {
        if cols % QK != 0 || data.len() != rows * cols / QK * Q4_1_BYTES {
            candle_core::bail!(
                "Q4_1 matrix [{rows}, {cols}] needs {} bytes, got {}",
                rows * cols / QK * Q4_1_BYTES,
                data.len()
            );
        }
        Ok(Self { data, rows, cols })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// `x`: `[.., cols]` f32 on the CPU → `[.., rows]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (dims, m) = input_rows(x, self.cols, "Q4_1")?;
        let k = self.cols;
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let blocks = k / QK;
        let xq: Vec<BlockQ8> = xs.chunks_exact(QK).map(quantize_block).collect();
        let n = self.rows;
        // Output transposed ([n, m]) so each thread writes whole rows; weight rows stay in cache
        // while every activation row passes over them.
        let mut yt = vec![0f32; n * m];
        let avx2 = has_avx2();
        let row_bytes = blocks * Q4_1_BYTES;
        let chunk_rows = rows_per_task(n, 16);
        for_each_chunk(&mut yt, chunk_rows * m, |c, out| {
            for (r_local, out_row) in out.chunks_mut(m).enumerate() {
                let r = c * chunk_rows + r_local;
                let w = &self.data[r * row_bytes..(r + 1) * row_bytes];
                let mut i = 0;
                // Four activation rows per pass share each unpacked weight block.
                while avx2 && i + 4 <= m {
                    // SAFETY: as below.
                    let y4 = unsafe { dot4_avx2(w, &xq[i * blocks..(i + 4) * blocks], blocks) };
                    out_row[i..i + 4].copy_from_slice(&y4);
                    i += 4;
                }
                for (i, y) in out_row.iter_mut().enumerate().skip(i) {
                    let xb = &xq[i * blocks..(i + 1) * blocks];
                    *y = if avx2 {
                        // SAFETY: AVX2, FMA and F16C were detected at run time.
                        unsafe { dot_avx2(w, xb) }
                    } else {
                        dot_scalar(w, xb)
                    };
                }
            }
        });
        transposed_output(yt, n, m, dims)
    }
}

fn has_avx2() -> bool {
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

fn quantize_block(x: &[f32]) -> BlockQ8 {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0i8; QK];
    let mut sum = 0i32;
    for (q, v) in qs.iter_mut().zip(x) {
        *q = (v * id).round() as i8;
        sum += *q as i32;
    }
    BlockQ8 {
        qs,
        d,
        s: d * sum as f32,
    }
}

fn block_header(w: &[u8]) -> (f32, f32) {
    let d = f16::from_le_bytes([w[0], w[1]]).to_f32();
    let m = f16::from_le_bytes([w[2], w[3]]).to_f32();
    (d, m)
}

fn dot_scalar(w: &[u8], xb: &[BlockQ8]) -> f32 {
    let mut acc = 0f32;
    for (b, x) in w.chunks_exact(Q4_1_BYTES).zip(xb) {
        let (d, m) = block_header(b);
        let mut isum = 0i32;
        for j in 0..QK / 2 {
            let q = b[4 + j];
            isum += (q & 0x0F) as i32 * x.qs[j] as i32 + (q >> 4) as i32 * x.qs[j + QK / 2] as i32;
        }
        acc += d * x.d * isum as f32 + m * x.s;
    }
    acc
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_avx2(w: &[u8], xb: &[BlockQ8]) -> f32 {
    use std::arch::x86_64::*;
    let mask = _mm_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    let mut acc_min = 0f32;
    for (b, x) in w.chunks_exact(Q4_1_BYTES).zip(xb) {
        // Both f16 halves (scale, min) converted at once with F16C.
        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from_le_bytes([
            b[0], b[1], b[2], b[3],
        ])));
        let d = _mm_cvtss_f32(dm);
        let m = _mm_cvtss_f32(_mm_shuffle_ps(dm, dm, 1));
        let packed = _mm_loadu_si128(b.as_ptr().add(4) as *const __m128i);
        let lo = _mm_and_si128(packed, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
        let q4 = _mm256_set_m128i(hi, lo);
        let q8 = _mm256_load_si256(x.qs.as_ptr() as *const __m256i);
        // u8 × i8 pairs → i16 (|15·127·2| fits), then pairs → i32.
        let prod = _mm256_madd_epi16(_mm256_maddubs_epi16(q4, q8), ones);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(prod), _mm256_set1_ps(d * x.d), acc);
        acc_min += m * x.s;
    }
    hsum(acc) + acc_min
}

/// The weight row `w` dotted with four activation rows (`xq4`: 4 × `blocks` blocks).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot4_avx2(w: &[u8], xq4: &[BlockQ8], blocks: usize) -> [f32; 4] {
    use std::arch::x86_64::*;
    let mask = _mm_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut acc_min = [0f32; 4];
    for (bi, b) in w.chunks_exact(Q4_1_BYTES).enumerate() {
        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from_le_bytes([
            b[0], b[1], b[2], b[3],
        ])));
        let d = _mm_cvtss_f32(dm);
        let m = _mm_cvtss_f32(_mm_shuffle_ps(dm, dm, 1));
        let packed = _mm_loadu_si128(b.as_ptr().add(4) as *const __m128i);
        let lo = _mm_and_si128(packed, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
        let q4 = _mm256_set_m128i(hi, lo);
        for r in 0..4 {
            let x = &xq4[r * blocks + bi];
            let q8 = _mm256_load_si256(x.qs.as_ptr() as *const __m256i);
            let prod = _mm256_madd_epi16(_mm256_maddubs_epi16(q4, q8), ones);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(prod), _mm256_set1_ps(d * x.d), acc[r]);
            acc_min[r] += m * x.s;
        }
    }
    std::array::from_fn(|r| hsum(acc[r]) + acc_min[r])
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn dot4_avx2(w: &[u8], xq4: &[BlockQ8], blocks: usize) -> [f32; 4] {
    std::array::from_fn(|r| dot_scalar(w, &xq4[r * blocks..(r + 1) * blocks]))
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn dot_avx2(w: &[u8], xb: &[BlockQ8]) -> f32 {
    dot_scalar(w, xb)
}

#[cfg(test)]
mod tests {
    use super::super::cpu_matmul::max_abs;
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::Device;

    #[test]
    fn matches_dense_product_of_dequantized_weights() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (40, 96), &dev).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let dense = q.dequantize(&dev).unwrap();
        let mat = Q41Matrix::new(q.data().unwrap().into_owned(), 40, 96).unwrap();
        for rows in [1usize, 3, 6] {
            let x = Tensor::randn(0f32, 1.0, (1, rows, 96), &dev).unwrap();
            let ours = mat.forward(&x).unwrap();
            let reference = x
                .reshape((rows, 96))
                .unwrap()
                .matmul(&dense.t().unwrap())
                .unwrap();
            let diff = (ours.reshape((rows, 40)).unwrap() - &reference).unwrap();
            let err = max_abs(&diff);
            let scale = max_abs(&reference);
            // Only the 8-bit activation rounding separates the two.
            assert!(
                err / scale < 0.02,
                "rows={rows}: relative error {}",
                err / scale
            );
            let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let xq: Vec<BlockQ8> = xs[..96].chunks_exact(QK).map(quantize_block).collect();
            let row0 = &mat.data[..3 * Q4_1_BYTES];
            if has_avx2() {
                let a = unsafe { dot_avx2(row0, &xq) };
                assert!((a - dot_scalar(row0, &xq)).abs() < 1e-3 * a.abs().max(1.0));
            }
        }
    }
}
