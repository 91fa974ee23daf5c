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

/// A `[rows, cols]` matrix of GGUF blocks: as stored in the file or, on a CPU with AVX-512 VNNI
/// (ternary types: AVX2) and rows that fill groups of 16, repacked for its type's group kernel
/// ([`Layout`]).
pub struct QuantMatrix {
    ty: GgmlType,
    layout: Layout,
    rows: usize,
    cols: usize,
}

/// How a [`QuantMatrix`] holds its blocks. The repacked forms rebuild every row's blocks exactly
/// (`row_blocks`), so no copy of the file's blocks is kept beside them. Boxed to keep the matrix
/// (held inline in architecture enums) small.
enum Layout {
    /// Row after row, as in the file.
    Rows(Vec<u8>),
    /// `Q4_0`/`Q4_1`/`Q8_0` ([`repacked`]).
    Legacy(Box<repacked::Repacked>),
    /// `Q4_K`/`Q5_K`/`Q6_K` ([`repacked_k`]).
    K(Box<repacked_k::RepackedK>),
    /// `Q5_0`/`Q5_1` ([`repacked_q5`]).
    Q5(Box<repacked_q5::RepackedQ5>),
    /// `TQ1_0`/`TQ2_0` ([`repacked_tq`]; AVX-512 VNNI or AVX2 kernels).
    Tq(Box<repacked_tq::RepackedTq>),
}

/// Rows per group, the same for every repacked form.
const GROUP: usize = repacked::GROUP;
const _: () = assert!(
    repacked_k::GROUP == GROUP && repacked_q5::GROUP == GROUP && repacked_tq::GROUP == GROUP
);

impl Layout {
    /// The repacked form when this CPU and type have a group kernel and the rows fill whole
    /// groups; the rows as stored otherwise.
    fn new(ty: GgmlType, data: Vec<u8>, rows: usize, cols: usize) -> Layout {
        if rows == 0 || rows % GROUP != 0 {
            return Layout::Rows(data);
        }
        let blocks = cols / ty.block_elems;
        // The ternary group kernels have an AVX2 form as well.
        if repacked_tq::supports(ty) && has_avx2_fma_f16c() {
            return Layout::Tq(Box::new(repacked_tq::RepackedTq::new(
                ty, &data, rows, blocks,
            )));
        }
        if !has_avx512_vnni() {
            return Layout::Rows(data);
        }
        if repacked::supports(ty) {
            Layout::Legacy(Box::new(repacked::Repacked::new(ty, &data, rows, blocks)))
        } else if repacked_k::supports(ty) {
            Layout::K(Box::new(repacked_k::RepackedK::new(
                ty, &data, rows, blocks,
            )))
        } else if repacked_q5::supports(ty) {
            Layout::Q5(Box::new(repacked_q5::RepackedQ5::new(
                ty, &data, rows, blocks,
            )))
        } else {
            Layout::Rows(data)
        }
    }

    /// The layouts one above the other: all repacked the same way, or all as stored. `None` for
    /// a mix (a part with rows outside whole groups): those are kept apart rather than rebuilt.
    fn stack(parts: &[&Layout]) -> Option<Layout> {
        macro_rules! same {
            ($variant:ident, $ty:ty) => {
                let all: Option<Vec<&$ty>> = parts
                    .iter()
                    .map(|p| match p {
                        Layout::$variant(r) => Some(&**r),
                        _ => None,
                    })
                    .collect();
                if let Some(all) = all {
                    return Some(Layout::$variant(Box::new(<$ty>::stack(&all))));
                }
            };
        }
        same!(Legacy, repacked::Repacked);
        same!(K, repacked_k::RepackedK);
        same!(Q5, repacked_q5::RepackedQ5);
        same!(Tq, repacked_tq::RepackedTq);
        let rows: Option<Vec<&[u8]>> = parts
            .iter()
            .map(|p| match p {
                Layout::Rows(data) => Some(data.as_slice()),
                _ => None,
            })
            .collect();
        rows.map(|rows| Layout::Rows(rows.concat()))
    }
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
        Ok(Self {
            ty,
            layout: Layout::new(ty, data, rows, cols),
            rows,
            cols,
        })
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

    /// The matrices one above the other (`[sum of rows, cols]`), or `None` when their types or
    /// widths differ or their layouts cannot be joined.
    pub fn stack(parts: &[&Self]) -> Option<Self> {
        let first = parts.first()?;
        let (ty, cols) = (first.ty, first.cols);
        if parts.iter().any(|p| p.ty != ty || p.cols != cols) {
            return None;
        }
        let layouts: Vec<&Layout> = parts.iter().map(|p| &p.layout).collect();
        Some(Self {
            ty,
            layout: Layout::stack(&layouts)?,
            rows: parts.iter().map(|p| p.rows).sum(),
            cols,
        })
    }

    fn row_bytes(&self) -> usize {
        self.cols / self.ty.block_elems * self.ty.block_bytes
    }

    /// Row `r` as stored (the row-by-row kernels' input: a matrix kept as stored).
    fn row(&self, r: usize) -> &[u8] {
        let Layout::Rows(data) = &self.layout else {
            unreachable!("row-by-row kernels on a repacked matrix")
        };
        let rb = self.row_bytes();
        &data[r * rb..(r + 1) * rb]
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
        // SAFETY (each kernel call below): AVX-512 VNNI (ternary: AVX2, FMA and F16C, and VNNI
        // when the matrix chose those kernels) was detected when the matrix was repacked.
        #[cfg(target_arch = "x86_64")]
        match (&self.layout, A::as_q8(xq), A::as_q8k(xq)) {
            (Layout::Legacy(rep), Some(xq), _) => return self.run_repacked(rep, xq, m),
            (Layout::Q5(rep), Some(xq), _) => {
                return self
                    .run_groups_transposed(m, |g0, out| unsafe { rep.run_groups(g0, xq, m, out) })
            }
            (Layout::K(rep), _, Some(xq)) => {
                return self
                    .run_groups_transposed(m, |g0, out| unsafe { rep.run_groups(g0, xq, m, out) })
            }
            (Layout::Tq(rep), _, Some(xq)) => {
                return self
                    .run_groups_transposed(m, |g0, out| unsafe { rep.run_groups(g0, xq, m, out) })
            }
            _ => {}
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
        let groups = self.rows / GROUP;
        let mut y = vec![0f32; self.rows * m];
        let per_task = rows_per_task(groups, 1) * GROUP;
        for_each_column_range(&mut y, self.rows, m, per_task, |mut out| {
            // SAFETY: AVX-512 VNNI was detected when the matrix was repacked.
            unsafe { rep.run_groups(xq, m, &mut out) }
        });
        y
    }

    /// A repacked kernel that writes `[rows, m]` per task (`run(first group, out)`), spread over
    /// threads like [`Self::run`] and transposed to `[m, rows]` at the end.
    #[cfg(target_arch = "x86_64")]
    fn run_groups_transposed(
        &self,
        m: usize,
        run: impl Fn(usize, &mut [f32]) + Sync + Send,
    ) -> Vec<f32> {
        let mut yt = vec![0f32; self.rows * m];
        let per_task = rows_per_task(self.rows / GROUP, 1);
        for_each_chunk(&mut yt, per_task * GROUP * m, |c, out| {
            run(c * per_task, out)
        });
        transposed(yt, self.rows, m)
    }

    /// Row `r` dequantized into `out` (`cols` values).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        match &self.layout {
            Layout::Rows(_) => dequantize(self.ty, self.row(r), out),
            Layout::Legacy(rep) => dequantize(self.ty, &rep.row_blocks(r), out),
            Layout::K(rep) => dequantize(self.ty, &rep.row_blocks(r), out),
            Layout::Q5(rep) => dequantize(self.ty, &rep.row_blocks(r), out),
            Layout::Tq(rep) => dequantize(self.ty, &rep.row_blocks(r), out),
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
        if let Layout::Rows(data) = &self.layout {
            dequantize(self.ty, data, &mut out).expect("checked matrix");
            return out;
        }
        for (r, o) in out.chunks_exact_mut(self.cols.max(1)).enumerate() {
            self.dequantize_row(r, o);
        }
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
