//! Our own CPU matmul and dequantization for the GGUF block formats a current GGUF holds:
//! `Q4_0`, `Q4_1`, `Q5_0`, `Q5_1`, `Q8_0` ([`legacy`]), `Q2_K` … `Q6_K` ([`k_quants`]) and the
//! ternary `TQ1_0`, `TQ2_0` ([`ternary`]).
//!
//! Why our own: candle 0.11's quantized CPU kernels choose SIMD at compile time (`cfg(target_feature
//! = "avx")`), so the baseline x86-64 binary we ship ran them as scalar loops — Q4_K_M decode was
//! 0.20× llama.cpp's. Here the activations are quantized to 8-bit blocks (llama.cpp's `Q8_1` /
//! `Q8_K`), every weight block is dotted with them in integer arithmetic, an AVX2/FMA path is
//! chosen at run time (portable scalar elsewhere), and weight rows are spread over rayon threads
//! (in the calling thread when the pool has one). IQ types are refused by name.
//!
//! A [`QuantMatrix`] also serves as a token embedding table (rows dequantized on lookup), so a tied
//! LM head costs no second copy.

pub mod k_quants;
pub mod legacy;
pub mod q8;
mod repacked;
mod repacked_k;
mod repacked_q5;
mod repacked_tq;
pub mod ternary;

#[cfg(target_arch = "x86_64")]
use crate::kernels::cpu_matmul::for_each_column_range;
use crate::kernels::cpu_matmul::{
    for_each_chunk, has_avx2_fma_f16c, has_avx512_vnni, input_rows, output_tensor, rows_per_task,
    transposed,
};
use crate::kernels::ggml_types::GgmlType;
use candle_core::{Device, Result, Tensor};
use q8::{BlockQ8, BlockQ8K};

/// Why a GGUF type has no CPU kernel here, as a sentence for the user.
pub fn unsupported_reason(ty: GgmlType) -> String {
    if ty.is_lattice() {
        format!(
            "{ty} (an importance-matrix/lattice quantization) is not supported yet; \
             use a Q*_K, Q4_0, Q5_0 or Q8_0 GGUF of the model instead"
        )
    } else {
        format!("GGUF tensor type {ty} has no matmul kernel here")
    }
}

/// Dequantizes whole blocks of `ty` (`data`) into `out` (f32, block-elements per block): the
/// reference dequantizer, equal bit for bit to gguf-py's.
pub fn dequantize(ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<()> {
    if !ty.has_cpu_kernel() {
        candle_core::bail!("{}", unsupported_reason(ty));
    }
    let blocks = data.len() / ty.block_bytes;
    if data.len() % ty.block_bytes != 0 || out.len() != blocks * ty.block_elems {
        candle_core::bail!(
            "{ty}: {} bytes do not make whole blocks for {} values",
            data.len(),
            out.len()
        );
    }
    for (b, o) in data
        .chunks_exact(ty.block_bytes)
        .zip(out.chunks_exact_mut(ty.block_elems))
    {
        if ty.block_elems == q8::QK {
            legacy::dequantize_block(ty, b, o);
        } else if is_ternary(ty) {
            ternary::dequantize_block(ty, b, o);
        } else {
            k_quants::dequantize_block(ty, b, o);
        }
    }
    Ok(())
}

/// Activation rows per prefill tile (see [`QuantMatrix::matmul`]).
const ACT_TILE: usize = 64;

/// A `[rows, cols]` matrix of GGUF blocks, as stored in the file — or, for `Q4_0`/`Q4_1`/`Q8_0`
/// on a CPU with AVX-512 VNNI, repacked in groups of 16 rows ([`repacked`]; `data` is then
/// empty: the repacked form rebuilds any row exactly); `TQ1_0`/`TQ2_0` likewise in
/// [`repacked_tq`].
pub struct QuantMatrix {
    ty: GgmlType,
    data: Vec<u8>,
    repacked: Option<repacked::Repacked>,
    /// `Q4_K`/`Q5_K`/`Q6_K` repacked the same way ([`repacked_k`]; `data` empty too).
    repacked_k: Option<Box<repacked_k::RepackedK>>,
    /// `Q5_0`/`Q5_1` repacked the same way ([`repacked_q5`]; `data` empty too).
    repacked_q5: Option<Box<repacked_q5::RepackedQ5>>,
    // Boxed: keeps the matrix (held inline in architecture enums) small.
    repacked_tq: Option<Box<repacked_tq::RepackedTq>>,
    rows: usize,
    cols: usize,
}

impl QuantMatrix {
    pub fn new(ty: GgmlType, data: Vec<u8>, rows: usize, cols: usize) -> Result<Self> {
        if !ty.has_cpu_kernel() {
            candle_core::bail!("{}", unsupported_reason(ty));
        }
        let need = ty.row_bytes(cols).map(|b| b * rows);
        if need != Some(data.len()) {
            candle_core::bail!(
                "{ty} matrix [{rows}, {cols}] needs {} bytes, got {}",
                need.map_or_else(
                    || format!("a multiple of {} columns and", ty.block_elems),
                    |n| n.to_string()
                ),
                data.len()
            );
        }
        Ok(Self::with_layout(ty, data, rows, cols))
    }

    /// Repacks when this CPU and type have the repacked kernels and the rows fill whole groups.
    fn with_layout(ty: GgmlType, data: Vec<u8>, rows: usize, cols: usize) -> Self {
        if rows > 0 && rows % repacked::GROUP == 0 && repacked::supports(ty) && has_avx512_vnni() {
            let rep = repacked::Repacked::new(ty, &data, rows, cols / ty.block_elems);
            return Self {
                ty,
                data: Vec::new(),
                repacked: Some(rep),
                repacked_k: None,
                repacked_q5: None,
                repacked_tq: None,
                rows,
                cols,
            };
        }
        if rows > 0
            && rows % repacked_k::GROUP == 0
            && repacked_k::supports(ty)
            && has_avx512_vnni()
        {
            let rep = repacked_k::RepackedK::new(ty, &data, rows, cols / ty.block_elems);
            return Self {
                ty,
                data: Vec::new(),
                repacked: None,
                repacked_k: Some(Box::new(rep)),
                repacked_tq: None,
                repacked_q5: None,
                rows,
                cols,
            };
        }
        if rows > 0
            && rows % repacked_q5::GROUP == 0
            && repacked_q5::supports(ty)
            && has_avx512_vnni()
        {
            let rep = repacked_q5::RepackedQ5::new(ty, &data, rows, cols / ty.block_elems);
            return Self {
                ty,
                data: Vec::new(),
                repacked: None,
                repacked_k: None,
                repacked_q5: Some(Box::new(rep)),
                repacked_tq: None,
                rows,
                cols,
            };
        }
        if rows > 0
            && rows % repacked_tq::GROUP == 0
            && repacked_tq::supports(ty)
            && has_avx512_vnni()
        {
            let rep = repacked_tq::RepackedTq::new(ty, &data, rows, cols / ty.block_elems);
            return Self {
                ty,
                data: Vec::new(),
                repacked: None,
                repacked_k: None,
                repacked_q5: None,
                repacked_tq: Some(Box::new(rep)),
                rows,
                cols,
            };
        }
        Self {
            ty,
            data,
            repacked: None,
            repacked_k: None,
            repacked_q5: None,
            repacked_tq: None,
            rows,
            cols,
        }
    }

    pub fn ggml_type(&self) -> GgmlType {
        self.ty
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The matrices one above the other (`[Σ rows, cols]`), or `None` when their types or
    /// widths differ.
    pub fn stack(parts: &[&Self]) -> Option<Self> {
        let first = parts.first()?;
        let (ty, cols) = (first.ty, first.cols);
        if parts.iter().any(|p| p.ty != ty || p.cols != cols) {
            return None;
        }
        let rows = parts.iter().map(|p| p.rows).sum();
        let reps: Vec<&repacked::Repacked> =
            parts.iter().filter_map(|p| p.repacked.as_ref()).collect();
        if reps.len() == parts.len() {
            let rep = repacked::Repacked::stack(&reps);
            debug_assert_eq!(rep.rows(), rows);
            return Some(Self {
                ty,
                data: Vec::new(),
                repacked: Some(rep),
                repacked_k: None,
                repacked_q5: None,
                repacked_tq: None,
                rows,
                cols,
            });
        }
        let reps_k: Vec<&repacked_k::RepackedK> = parts
            .iter()
            .filter_map(|p| p.repacked_k.as_deref())
            .collect();
        if reps_k.len() == parts.len() {
            let rep = repacked_k::RepackedK::stack(&reps_k);
            debug_assert_eq!(rep.rows(), rows);
            return Some(Self {
                ty,
                data: Vec::new(),
                repacked: None,
                repacked_k: Some(Box::new(rep)),
                repacked_q5: None,
                repacked_tq: None,
                rows,
                cols,
            });
        }
        let reps_q5: Vec<&repacked_q5::RepackedQ5> = parts
            .iter()
            .filter_map(|p| p.repacked_q5.as_deref())
            .collect();
        if reps_q5.len() == parts.len() {
            let rep = repacked_q5::RepackedQ5::stack(&reps_q5);
            debug_assert_eq!(rep.rows(), rows);
            return Some(Self {
                ty,
                data: Vec::new(),
                repacked: None,
                repacked_k: None,
                repacked_q5: Some(Box::new(rep)),
                repacked_tq: None,
                rows,
                cols,
            });
        }
        let tqs: Vec<&repacked_tq::RepackedTq> = parts
            .iter()
            .filter_map(|p| p.repacked_tq.as_deref())
            .collect();
        if tqs.len() == parts.len() {
            let rep = repacked_tq::RepackedTq::stack(&tqs);
            debug_assert_eq!(rep.rows(), rows);
            return Some(Self {
                ty,
                data: Vec::new(),
                repacked: None,
                repacked_k: None,
                repacked_q5: None,
                repacked_tq: Some(Box::new(rep)),
                rows,
                cols,
            });
        }
        if !reps.is_empty() || !reps_k.is_empty() || !reps_q5.is_empty() || !tqs.is_empty() {
            // Some parts repacked, some not (a part with rows outside whole groups): keep them
            // apart rather than rebuild.
            return None;
        }
        let mut data = Vec::with_capacity(parts.iter().map(|p| p.data.len()).sum());
        for p in parts {
            data.extend_from_slice(&p.data);
        }
        Some(Self {
            ty,
            data,
            repacked: None,
            repacked_k: None,
            repacked_q5: None,
            repacked_tq: None,
            rows,
            cols,
        })
    }

    fn row_bytes(&self) -> usize {
        self.cols / self.ty.block_elems * self.ty.block_bytes
    }

    fn row(&self, r: usize) -> &[u8] {
        let rb = self.row_bytes();
        &self.data[r * rb..(r + 1) * rb]
    }

    /// `x`: `[.., cols]` f32 on the CPU → `[.., rows]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (dims, m) = input_rows(x, self.cols, self.ty.name)?;
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let y = self.matmul(&xs, m);
        output_tensor(y, self.rows, dims)
    }

    /// `xs` (`m` rows of `cols`) times the matrix transposed: `[m, rows]`.
    pub fn matmul(&self, xs: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(xs.len(), m * self.cols, "activation shape");
        let avx2 = has_avx2_fma_f16c();
        if self.ty.block_elems == q8::QK {
            self.run(&q8::quantize_q8(xs, avx2), m, legacy_kernels(self.ty, avx2))
        } else {
            self.run(&q8::quantize_q8k(xs, avx2), m, q8k_kernels(self.ty, avx2))
        }
    }

    /// Like [`Self::matmul`] with activations the caller quantized (`m` rows of `cols / 256`
    /// blocks: BitNet's per-token int8, [`q8::quantize_per_token`]). 256-element formats only.
    pub fn matmul_q8k(&self, xq: &[BlockQ8K], m: usize) -> Result<Vec<f32>> {
        if self.ty.block_elems != q8::QK_K || xq.len() != m * self.cols / q8::QK_K {
            candle_core::bail!(
                "{}: {} activation blocks do not fit {m} rows of {} columns",
                self.ty,
                xq.len(),
                self.cols
            );
        }
        Ok(self.run(xq, m, q8k_kernels(self.ty, has_avx2_fma_f16c())))
    }

    /// BitNet's BitLinear on `x` `[.., cols]`: each row quantized to int8 with its own scale
    /// ([`q8::quantize_per_token`], as the model was trained), times the matrix; the output rows
    /// come in parts (stacked projections), `(rows, scale)` each, multiplied by their scale.
    pub fn forward_per_token(&self, x: &Tensor, parts: &[(usize, f32)]) -> Result<Tensor> {
        let (dims, m) = input_rows(x, self.cols, self.ty.name)?;
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let xq = q8::quantize_per_token(&xs, self.cols);
        let mut y = self.matmul_q8k(&xq, m)?;
        for row in y.chunks_exact_mut(self.rows) {
            let mut r0 = 0;
            for &(rows, scale) in parts {
                for v in &mut row[r0..r0 + rows] {
                    *v *= scale;
                }
                r0 += rows;
            }
        }
        output_tensor(y, self.rows, dims)
    }

    /// `[m, rows]`.
    fn run<A: Activations>(&self, xq: &[A], m: usize, k: RowKernels<A>) -> Vec<f32> {
        #[cfg(target_arch = "x86_64")]
        if let (Some(rep), Some(xq)) = (&self.repacked, A::as_q8(xq)) {
            return self.run_repacked(rep, xq, m);
        }
        #[cfg(target_arch = "x86_64")]
        if let (Some(rep), Some(xq)) = (&self.repacked_q5, A::as_q8(xq)) {
            let groups = self.rows / repacked_q5::GROUP;
            let mut yt = vec![0f32; self.rows * m];
            let per_task = rows_per_task(groups, 1);
            for_each_chunk(&mut yt, per_task * repacked_q5::GROUP * m, |c, out| {
                // SAFETY: AVX-512 VNNI was detected when the matrix was repacked.
                unsafe { rep.run_groups(c * per_task, xq, m, out) }
            });
            return transposed(yt, self.rows, m);
        }
        #[cfg(target_arch = "x86_64")]
        if let (Some(rep), Some(xq)) = (&self.repacked_k, A::as_q8k(xq)) {
            return self.run_repacked_k(rep, xq, m);
        }
        #[cfg(target_arch = "x86_64")]
        if let (Some(rep), Some(xq)) = (&self.repacked_tq, A::as_q8k(xq)) {
            return self.run_repacked_tq(rep, xq, m);
        }
        let n = self.rows;
        let blocks = self.cols / self.ty.block_elems;
        // Output transposed ([n, m]) so each thread writes whole rows; weight rows stay in cache
        // while every activation row passes over them.
        let mut yt = vec![0f32; n * m];
        let chunk_rows = rows_per_task(n, 16);
        for_each_chunk(&mut yt, chunk_rows * m, |c, out| {
            let first = c * chunk_rows;
            if m == 1 {
                // Decode: two weight rows per pass share each activation block and give the
                // CPU two independent accumulation chains.
                let last_row = first + out.len() - 1;
                let mut pairs = out.chunks_exact_mut(2);
                for (p, pair) in (&mut pairs).enumerate() {
                    let r = first + 2 * p;
                    pair.copy_from_slice(&(k.dot2)(self.row(r), self.row(r + 1), xq));
                }
                if let [last] = pairs.into_remainder() {
                    *last = (k.dot)(self.row(last_row), xq);
                }
                return;
            }
            let x_row = |i: usize| &xq[i * blocks..(i + 1) * blocks];
            // Activation rows in tiles that stay in L2 while this task's weight rows pass over
            // them (a whole 512-token prompt of quantized activations does not).
            for t0 in (0..m).step_by(ACT_TILE) {
                let t1 = (t0 + ACT_TILE).min(m);
                for (r_local, out_row) in out.chunks_mut(m).enumerate() {
                    let w = self.row(first + r_local);
                    let mut i = t0;
                    // Four activation rows per pass share each unpacked weight block.
                    while i + 4 <= t1 {
                        let x4 = [x_row(i), x_row(i + 1), x_row(i + 2), x_row(i + 3)];
                        out_row[i..i + 4].copy_from_slice(&(k.dot4)(w, x4));
                        i += 4;
                    }
                    for (i, y) in out_row.iter_mut().enumerate().take(t1).skip(i) {
                        *y = (k.dot)(w, x_row(i));
                    }
                }
            }
        });
        transposed(yt, n, m)
    }

    /// The repacked kernel over groups of 16 rows, spread over threads like [`Self::run`],
    /// written straight into `[m, rows]`.
    #[cfg(target_arch = "x86_64")]
    fn run_repacked(&self, rep: &repacked::Repacked, xq: &[BlockQ8], m: usize) -> Vec<f32> {
        let groups = self.rows / repacked::GROUP;
        let mut y = vec![0f32; self.rows * m];
        let per_task = rows_per_task(groups, 1) * repacked::GROUP;
        for_each_column_range(&mut y, self.rows, m, per_task, |mut out| {
            // SAFETY: AVX-512 VNNI was detected when the matrix was repacked.
            unsafe { rep.run_groups(xq, m, &mut out) }
        });
        y
    }

    /// The repacked ternary kernel over groups of 16 rows, spread over threads like
    /// [`Self::run`] (it writes `[rows, m]` per task; transposed to `[m, rows]` at the end).
    #[cfg(target_arch = "x86_64")]
    fn run_repacked_tq(
        &self,
        rep: &repacked_tq::RepackedTq,
        xq: &[BlockQ8K],
        m: usize,
    ) -> Vec<f32> {
        let groups = self.rows / repacked_tq::GROUP;
        let mut yt = vec![0f32; self.rows * m];
        let per_task = rows_per_task(groups, 1);
        for_each_chunk(&mut yt, per_task * repacked_tq::GROUP * m, |c, out| {
            // SAFETY: AVX-512 VNNI was detected when the matrix was repacked.
            unsafe { rep.run_groups(c * per_task, xq, m, out) }
        });
        transposed(yt, self.rows, m)
    }

    /// The repacked k-quant kernel over groups of 16 rows, spread over threads like
    /// [`Self::run_repacked`] (it writes `[rows, m]` per task; transposed to `[m, rows]`).
    #[cfg(target_arch = "x86_64")]
    fn run_repacked_k(&self, rep: &repacked_k::RepackedK, xq: &[BlockQ8K], m: usize) -> Vec<f32> {
        let groups = self.rows / repacked_k::GROUP;
        let mut yt = vec![0f32; self.rows * m];
        let per_task = rows_per_task(groups, 1);
        for_each_chunk(&mut yt, per_task * repacked_k::GROUP * m, |c, out| {
            // SAFETY: AVX-512 VNNI was detected when the matrix was repacked.
            unsafe { rep.run_groups(c * per_task, xq, m, out) }
        });
        transposed(yt, self.rows, m)
    }

    /// Row `r` dequantized into `out` (`cols` values).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        if let Some(rep) = &self.repacked {
            dequantize(self.ty, &rep.row_blocks(r), out)
        } else if let Some(rep) = &self.repacked_k {
            dequantize(self.ty, &rep.row_blocks(r), out)
        } else if let Some(rep) = &self.repacked_q5 {
            dequantize(self.ty, &rep.row_blocks(r), out)
        } else if let Some(rep) = &self.repacked_tq {
            dequantize(self.ty, &rep.row_blocks(r), out)
        } else {
            dequantize(self.ty, self.row(r), out)
        }
        .expect("row of a checked matrix");
    }

    /// Rows `ids` dequantized to f32: `[ids.len(), cols]` (token embedding lookup).
    pub fn gather_rows(&self, ids: &[u32]) -> Result<Tensor> {
        let mut out = vec![0f32; ids.len() * self.cols];
        for (&id, o) in ids.iter().zip(out.chunks_exact_mut(self.cols)) {
            let r = id as usize;
            if r >= self.rows {
                candle_core::bail!("token id {id} is outside the {} embedding rows", self.rows);
            }
            self.dequantize_row(r, o);
        }
        Tensor::from_vec(out, (ids.len(), self.cols), &Device::Cpu)
    }

    /// The whole matrix as f32 `[rows, cols]` (tests, and weights a kernel cannot take).
    pub fn dequantize_all(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        if self.data.is_empty() && self.rows > 0 {
            for (r, o) in out.chunks_exact_mut(self.cols.max(1)).enumerate() {
                self.dequantize_row(r, o);
            }
            return out;
        }
        dequantize(self.ty, &self.data, &mut out).expect("checked matrix");
        out
    }
}

/// Quantized activation blocks; the repacked kernels take the 32-element ones, the repacked
/// ternary kernels the 256-element ones.
trait Activations: Sync + Sized {
    fn as_q8(blocks: &[Self]) -> Option<&[BlockQ8]>;
    fn as_q8k(blocks: &[Self]) -> Option<&[BlockQ8K]>;
}

impl Activations for BlockQ8 {
    fn as_q8(blocks: &[Self]) -> Option<&[BlockQ8]> {
        Some(blocks)
    }
    fn as_q8k(_: &[Self]) -> Option<&[BlockQ8K]> {
        None
    }
}

impl Activations for BlockQ8K {
    fn as_q8(_: &[Self]) -> Option<&[BlockQ8]> {
        None
    }
    fn as_q8k(blocks: &[Self]) -> Option<&[BlockQ8K]> {
        Some(blocks)
    }
}

/// The dot products of one format: a weight row with one activation row (`dot`), two weight rows
/// with one activation row (`dot2`, decode) and one weight row with four activation rows (`dot4`,
/// prefill).
struct RowKernels<A: 'static> {
    dot: fn(&[u8], &[A]) -> f32,
    dot2: Dot2<A>,
    dot4: fn(&[u8], [&[A]; 4]) -> [f32; 4],
}

type Dot2<A> = fn(&[u8], &[u8], &[A]) -> [f32; 2];

/// The kernels of a 32-element format: AVX2 when `avx2` (detected at run time), else scalar.
fn legacy_kernels(ty: GgmlType, avx2: bool) -> RowKernels<BlockQ8> {
    macro_rules! pick {
        ($($id:literal => $t:ident),*) => {
            match ty.id {
                $($id => {
                    #[cfg(target_arch = "x86_64")]
                    if avx2 {
                        // SAFETY (each closure): AVX2, FMA and F16C were detected at run time.
                        return RowKernels {
                            dot: |w, x| unsafe { legacy::avx2::dot_n::<$id, 1>(w, [x])[0] },
                            dot2: |w0, w1, x| unsafe { legacy::avx2::dot2::<$id>(w0, w1, x) },
                            dot4: |w, x| unsafe { legacy::avx2::dot_n::<$id, 4>(w, x) },
                        };
                    }
                    RowKernels {
                        dot: |w, x| legacy::dot_scalar(GgmlType::$t, w, x),
                        dot2: |w0, w1, x| {
                            [
                                legacy::dot_scalar(GgmlType::$t, w0, x),
                                legacy::dot_scalar(GgmlType::$t, w1, x),
                            ]
                        },
                        dot4: |w, x| x.map(|x| legacy::dot_scalar(GgmlType::$t, w, x)),
                    }
                })*
                _ => unreachable!("{ty} is not a 32-element block format"),
            }
        };
    }
    let _ = avx2;
    pick!(2 => Q4_0, 3 => Q4_1, 6 => Q5_0, 7 => Q5_1, 8 => Q8_0)
}

/// The kernels of a 256-element format (k-quant or ternary).
fn q8k_kernels(ty: GgmlType, avx2: bool) -> RowKernels<BlockQ8K> {
    if is_ternary(ty) {
        ternary_kernels(ty, avx2)
    } else {
        k_quant_kernels(ty, avx2)
    }
}

fn is_ternary(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::TQ1_0 | GgmlType::TQ2_0)
}

/// The kernels of a ternary type: AVX2 when `avx2` (detected at run time), else scalar.
fn ternary_kernels(ty: GgmlType, avx2: bool) -> RowKernels<BlockQ8K> {
    macro_rules! pick {
        ($($id:literal => $t:ident),*) => {
            match ty.id {
                $($id => {
                    #[cfg(target_arch = "x86_64")]
                    if avx2 {
                        // SAFETY (each closure): AVX2, FMA and F16C were detected at run time.
                        return RowKernels {
                            dot: |w, x| unsafe { ternary::avx2::dot_n::<$id, 1>(w, [x])[0] },
                            dot2: |w0, w1, x| unsafe { ternary::avx2::dot2::<$id>(w0, w1, x) },
                            dot4: |w, x| unsafe { ternary::avx2::dot_n::<$id, 4>(w, x) },
                        };
                    }
                    RowKernels {
                        dot: |w, x| ternary::dot_scalar(GgmlType::$t, w, x),
                        dot2: |w0, w1, x| {
                            [
                                ternary::dot_scalar(GgmlType::$t, w0, x),
                                ternary::dot_scalar(GgmlType::$t, w1, x),
                            ]
                        },
                        dot4: |w, x| x.map(|x| ternary::dot_scalar(GgmlType::$t, w, x)),
                    }
                })*
                _ => unreachable!("{ty} is not a ternary type"),
            }
        };
    }
    let _ = avx2;
    pick!(34 => TQ1_0, 35 => TQ2_0)
}

/// The kernels of a k-quant: AVX2 when `avx2` (detected at run time), else scalar.
fn k_quant_kernels(ty: GgmlType, avx2: bool) -> RowKernels<BlockQ8K> {
    macro_rules! pick {
        ($($id:literal => $t:ident),*) => {
            match ty.id {
                $($id => {
                    #[cfg(target_arch = "x86_64")]
                    if avx2 {
                        // SAFETY (each closure): AVX2, FMA and F16C were detected at run time.
                        return RowKernels {
                            dot: |w, x| unsafe { k_quants::avx2::dot_n::<$id, 1>(w, [x])[0] },
                            dot2: |w0, w1, x| unsafe {
                                [
                                    k_quants::avx2::dot_n::<$id, 1>(w0, [x])[0],
                                    k_quants::avx2::dot_n::<$id, 1>(w1, [x])[0],
                                ]
                            },
                            dot4: |w, x| unsafe { k_quants::avx2::dot_n::<$id, 4>(w, x) },
                        };
                    }
                    RowKernels {
                        dot: |w, x| k_quants::dot_scalar(GgmlType::$t, w, x),
                        dot2: |w0, w1, x| {
                            [
                                k_quants::dot_scalar(GgmlType::$t, w0, x),
                                k_quants::dot_scalar(GgmlType::$t, w1, x),
                            ]
                        },
                        dot4: |w, x| x.map(|x| k_quants::dot_scalar(GgmlType::$t, w, x)),
                    }
                })*
                _ => unreachable!("{ty} is not a k-quant"),
            }
        };
    }
    let _ = avx2;
    pick!(10 => Q2_K, 11 => Q3_K, 12 => Q4_K, 13 => Q5_K, 14 => Q6_K)
}

#[cfg(test)]
mod tests;
