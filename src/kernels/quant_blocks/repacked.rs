//! `Q4_0`, `Q4_1` and `Q8_0` weights repacked at load into groups of 16 rows, for CPUs with
//! AVX-512 VNNI or AVX2 (llama.cpp's "repack" idea, our own layout; [`avx2`] says how the AVX2
//! kernel reads it).
//!
//! Why: in the row-by-row kernels ([`super::legacy`]) every 32-element block of every row costs
//! float work of its own (two f16 scales, `d · x.d`, the min term) beside a small integer dot, so
//! on an AVX-512 machine they ran at 0.65–0.78× llama.cpp's batched decode (docs/performance.md).
//! Here one 512-bit register holds the same four-element slice of a block for 16 rows, so one
//! `vpdpbusd` with a broadcast activation word advances 16 rows at once, and the float work is one
//! multiply-add per block for all 16 rows.
//!
//! Layout per group of 16 rows and per block `b` (elements `32b..32b+32` of each row):
//! - `qs`: `V` registers of 64 bytes; register `j`, lane `r` holds bytes `4j..4j+4` of row `r`'s
//!   block as stored (`Q4_*`: the packed nibbles, elements `4j..4j+4` low and `16+4j..16+4j+4`
//!   high, `V = 4`; `Q8_0`: four signed levels, `V = 8`);
//! - `d`: the 16 rows' f16 scales; `m` (`Q4_1`): the 16 mins; `wsum` (`Q8_0`): Σ q of each row's
//!   block, so activations can enter `vpdpbusd` as unsigned bytes (`x + 128`).
//!
//! Every row's value is computed with the same operations whatever the number of activation rows
//! (batch invariance, as in the row-by-row kernels), and the original blocks can be rebuilt
//! exactly ([`Repacked::row_blocks`]), so the matrix keeps no second copy.

use super::q8::{BlockQ8, QK};
use crate::kernels::ggml_types::GgmlType;

/// Rows per group (lanes of a 512-bit register of i32).
pub const GROUP: usize = 16;

pub(super) struct Repacked {
    ty: GgmlType,
    rows: usize,
    blocks: usize,
    qs: Vec<u8>,
    d: Vec<u16>,
    m: Vec<u16>,
    wsum: Vec<i16>,
}

/// Whether `ty` has a repacked kernel.
pub(super) fn supports(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0)
}

/// 64-byte registers per group and block.
fn registers(ty: GgmlType) -> usize {
    if ty == GgmlType::Q8_0 {
        8
    } else {
        4
    }
}

impl Repacked {
    /// `data`: `rows` (a multiple of [`GROUP`]) rows of `blocks` blocks of `ty`, as in the file.
    pub(super) fn new(ty: GgmlType, data: &[u8], rows: usize, blocks: usize) -> Repacked {
        debug_assert!(supports(ty) && rows % GROUP == 0);
        let bb = ty.block_bytes;
        let v = registers(ty);
        let groups = rows / GROUP;
        let mut qs = vec![0u8; groups * blocks * v * 64];
        let mut d = vec![0u16; rows * blocks];
        let mut m = if ty == GgmlType::Q4_1 {
            vec![0u16; rows * blocks]
        } else {
            Vec::new()
        };
        let mut wsum = if ty == GgmlType::Q8_0 {
            vec![0i16; rows * blocks]
        } else {
            Vec::new()
        };
        let q_at = if ty == GgmlType::Q4_1 { 4 } else { 2 };
        for g in 0..groups {
            for b in 0..blocks {
                let gb = g * blocks + b;
                for lane in 0..GROUP {
                    let r = g * GROUP + lane;
                    let block = &data[(r * blocks + b) * bb..][..bb];
                    d[gb * GROUP + lane] = u16::from_le_bytes([block[0], block[1]]);
                    if ty == GgmlType::Q4_1 {
                        m[gb * GROUP + lane] = u16::from_le_bytes([block[2], block[3]]);
                    }
                    let q = &block[q_at..];
                    if ty == GgmlType::Q8_0 {
                        wsum[gb * GROUP + lane] = q[..QK].iter().map(|&b| b as i8 as i16).sum();
                    }
                    for j in 0..v {
                        let at = ((gb * v + j) * GROUP + lane) * 4;
                        qs[at..at + 4].copy_from_slice(&q[4 * j..4 * j + 4]);
                    }
                }
            }
        }
        Repacked {
            ty,
            rows,
            blocks,
            qs,
            d,
            m,
            wsum,
        }
    }

    /// Row `r`'s blocks exactly as they were stored in the file.
    pub(super) fn row_blocks(&self, r: usize) -> Vec<u8> {
        let (g, lane) = (r / GROUP, r % GROUP);
        let v = registers(self.ty);
        let bb = self.ty.block_bytes;
        let mut out = vec![0u8; self.blocks * bb];
        for (b, block) in out.chunks_exact_mut(bb).enumerate() {
            let gb = g * self.blocks + b;
            block[..2].copy_from_slice(&self.d[gb * GROUP + lane].to_le_bytes());
            let q_at = if self.ty == GgmlType::Q4_1 {
                block[2..4].copy_from_slice(&self.m[gb * GROUP + lane].to_le_bytes());
                4
            } else {
                2
            };
            for j in 0..v {
                let at = ((gb * v + j) * GROUP + lane) * 4;
                block[q_at + 4 * j..q_at + 4 * j + 4].copy_from_slice(&self.qs[at..at + 4]);
            }
        }
        out
    }

    /// The matrices one above the other (all repacked, same type and width).
    pub(super) fn stack(parts: &[&Repacked]) -> Repacked {
        let first = parts[0];
        Repacked {
            ty: first.ty,
            rows: parts.iter().map(|p| p.rows).sum(),
            blocks: first.blocks,
            qs: parts.iter().flat_map(|p| p.qs.iter().copied()).collect(),
            d: parts.iter().flat_map(|p| p.d.iter().copied()).collect(),
            m: parts.iter().flat_map(|p| p.m.iter().copied()).collect(),
            wsum: parts.iter().flat_map(|p| p.wsum.iter().copied()).collect(),
        }
    }

    /// This task's columns of the `[m, rows]` product (whole groups: the range starts and ends
    /// on a multiple of [`GROUP`], or at the last row) times the `m` activation rows `xq`
    /// (blocks of [`BlockQ8`], `blocks` per row), each group's 16 results stored side by side.
    ///
    /// `vnni`: the AVX-512 VNNI kernel, else the AVX2 one (the same results bit for bit).
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available, and AVX-512 F/BW/VNNI when `vnni`.
    #[cfg(target_arch = "x86_64")]
    pub(super) unsafe fn run_groups(
        &self,
        xq: &[BlockQ8],
        m: usize,
        out: &mut crate::kernels::cpu_matmul::ColumnRange<'_>,
        vnni: bool,
    ) {
        let cols = out.cols();
        debug_assert!(cols.start % GROUP == 0 && cols.len() % GROUP == 0);
        let x_row = |i: usize| &xq[i * self.blocks..(i + 1) * self.blocks];
        // Activation sums (Q4_0's offset of 8) and unsigned activations (Q8_0), once per call.
        let xsum: Vec<i32> = if self.ty == GgmlType::Q4_0 {
            xq.iter()
                .map(|b| b.qs.iter().map(|&q| q as i32).sum())
                .collect()
        } else {
            Vec::new()
        };
        let xu: Vec<[u8; QK]> = if vnni && self.ty == GgmlType::Q8_0 {
            xq.iter().map(|b| b.qs.map(|q| (q as u8) ^ 0x80)).collect()
        } else {
            Vec::new()
        };
        for gl in 0..cols.len() / GROUP {
            let g = cols.start / GROUP + gl;
            let mut i = 0;
            macro_rules! tile {
                ($t:literal) => {{
                    let x: [&[BlockQ8]; $t] = std::array::from_fn(|k| x_row(i + k));
                    let sums: [&[i32]; $t] = std::array::from_fn(|k| {
                        if xsum.is_empty() {
                            &[][..]
                        } else {
                            &xsum[(i + k) * self.blocks..(i + k + 1) * self.blocks]
                        }
                    });
                    let us: [&[[u8; QK]]; $t] = std::array::from_fn(|k| {
                        if xu.is_empty() {
                            &[][..]
                        } else {
                            &xu[(i + k) * self.blocks..(i + k + 1) * self.blocks]
                        }
                    });
                    let acc = match (self.ty, vnni) {
                        (GgmlType::Q4_0, true) => avx512::group::<2, $t>(self, g, x, sums, us),
                        (GgmlType::Q4_1, true) => avx512::group::<3, $t>(self, g, x, sums, us),
                        (_, true) => avx512::group::<8, $t>(self, g, x, sums, us),
                        (GgmlType::Q4_0, false) => avx2::group::<2, $t>(self, g, x, sums),
                        (GgmlType::Q4_1, false) => avx2::group::<3, $t>(self, g, x, sums),
                        (_, false) => avx2::group::<8, $t>(self, g, x, sums),
                    };
                    for (k, lanes) in acc.iter().enumerate() {
                        out.row_mut(i + k)[gl * GROUP..(gl + 1) * GROUP].copy_from_slice(lanes);
                    }
                    i += $t;
                }};
            }
            while i + 4 <= m {
                tile!(4);
            }
            while i < m {
                tile!(1);
            }
        }
    }
}

/// The same kernel for CPUs with AVX2 but no AVX-512 VNNI (most CI runners and many laptops).
/// Each 64-byte register of a group is two 32-byte halves (rows 0–7, 8–15), taken one after
/// the other. `vpdpbusd` becomes `vpmaddubsw` (u8 levels × i8 activations, pairs into i16) and
/// one `vpmaddwd` by ones per block: `Q4_*` levels are at most 15 and activations at most 128
/// in magnitude, so all 16 products of a row's four-byte slices fit one i16 lane (≤ 30720).
/// `Q8_0` levels are signed: their sign moves onto the activations (`vpsignb`) and each
/// register's pairs widen to i32 at once. The integer sums equal the VNNI kernel's, and the
/// float work per row is the same operations in the same order, so both give the same bits.
#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use super::{BlockQ8, Repacked, GROUP};
    use std::arch::x86_64::*;

    /// The AVX2 group driver the repacked layouts share: `block(b, half, acc)` adds block `b` of
    /// rows `8·half..8·half + 8` into `acc` (one `__m256` per activation row); the two halves'
    /// accumulators come back as 16 f32 per activation row.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub(in crate::kernels::quant_blocks) unsafe fn two_halves<const T: usize>(
        blocks: usize,
        mut block: impl FnMut(usize, usize, &mut [__m256; T]),
    ) -> [[f32; GROUP]; T] {
        let mut acc = [[_mm256_setzero_ps(); T]; 2];
        if T == 1 {
            // Decode: both halves of each block in turn, so every 64-byte line of the group is
            // used whole in one pass over memory.
            for b in 0..blocks {
                for (half, acc) in acc.iter_mut().enumerate() {
                    block(b, half, acc);
                }
            }
        } else {
            // Prefill: one half at a time keeps the unpacked levels and 2·T accumulators
            // fewer than the 16 registers.
            for (half, acc) in acc.iter_mut().enumerate() {
                for b in 0..blocks {
                    block(b, half, acc);
                }
            }
        }
        let mut out = [[0f32; GROUP]; T];
        for t in 0..T {
            for (half, acc) in acc.iter().enumerate() {
                _mm256_storeu_ps(out[t].as_mut_ptr().add(8 * half), acc[t]);
            }
        }
        out
    }

    /// One group of 16 rows times `T` activation rows: 16 f32 per activation row.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn group<const F: u32, const T: usize>(
        w: &Repacked,
        g: usize,
        x: [&[BlockQ8]; T],
        xsum: [&[i32]; T],
    ) -> [[f32; GROUP]; T] {
        two_halves::<T>(w.blocks, |b, half, acc| {
            block::<F, T>(w, g, b, half, &x, &xsum, acc)
        })
    }

    /// Block `b` of rows `8·half..8·half + 8` of group `g`, added into `acc`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block<const F: u32, const T: usize>(
        w: &Repacked,
        g: usize,
        b: usize,
        half: usize,
        x: &[&[BlockQ8]; T],
        xsum: &[&[i32]; T],
        acc: &mut [__m256; T],
    ) {
        let v = if F == 8 { 8 } else { 4 };
        let nibble = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let gb = g * w.blocks + b;
        let qs = w.qs.as_ptr().add(gb * v * 64 + 32 * half);
        let reg = |j: usize| _mm256_loadu_si256(qs.add(64 * j) as *const __m256i);
        let at = gb * GROUP + 8 * half;
        let d = _mm256_cvtph_ps(_mm_loadu_si128(w.d.as_ptr().add(at) as *const __m128i));
        if F == 8 {
            let regs: [__m256i; 8] = std::array::from_fn(reg);
            let abs: [__m256i; 8] = std::array::from_fn(|j| _mm256_abs_epi8(regs[j]));
            for t in 0..T {
                let xb = x[t].get_unchecked(b);
                let xw = xb.qs.as_ptr() as *const i32;
                let mut s0 = _mm256_setzero_si256();
                let mut s1 = _mm256_setzero_si256();
                for j in 0..4 {
                    let x0 = _mm256_set1_epi32(xw.add(j).read_unaligned());
                    let x1 = _mm256_set1_epi32(xw.add(4 + j).read_unaligned());
                    let p0 = _mm256_maddubs_epi16(abs[j], _mm256_sign_epi8(x0, regs[j]));
                    let p1 = _mm256_maddubs_epi16(abs[4 + j], _mm256_sign_epi8(x1, regs[4 + j]));
                    s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(p0, ones));
                    s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(p1, ones));
                }
                let isum = _mm256_add_epi32(s0, s1);
                acc[t] = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(isum),
                    _mm256_mul_ps(d, _mm256_set1_ps(xb.d)),
                    acc[t],
                );
            }
        } else {
            let mut lo = [_mm256_setzero_si256(); 4];
            let mut hi = [_mm256_setzero_si256(); 4];
            for j in 0..4 {
                let r = reg(j);
                lo[j] = _mm256_and_si256(r, nibble);
                hi[j] = _mm256_and_si256(_mm256_srli_epi16::<4>(r), nibble);
            }
            let mins = if F == 3 {
                _mm256_cvtph_ps(_mm_loadu_si128(w.m.as_ptr().add(at) as *const __m128i))
            } else {
                _mm256_setzero_ps()
            };
            for t in 0..T {
                let xb = x[t].get_unchecked(b);
                let xw = xb.qs.as_ptr() as *const i32;
                let mut s16 = _mm256_setzero_si256();
                for j in 0..4 {
                    let x0 = _mm256_set1_epi32(xw.add(j).read_unaligned());
                    let x1 = _mm256_set1_epi32(xw.add(4 + j).read_unaligned());
                    s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(lo[j], x0));
                    s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(hi[j], x1));
                }
                let mut isum = _mm256_madd_epi16(s16, ones);
                if F == 2 {
                    // Q4_0 levels carry an offset of 8: Σ (q − 8)·x = Σ q·x − 8·Σ x.
                    let offset = 8 * *xsum[t].get_unchecked(b);
                    isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(offset));
                }
                acc[t] = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(isum),
                    _mm256_mul_ps(d, _mm256_set1_ps(xb.d)),
                    acc[t],
                );
                if F == 3 {
                    acc[t] = _mm256_fmadd_ps(mins, _mm256_set1_ps(xb.s), acc[t]);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{BlockQ8, Repacked, GROUP, QK};
    use std::arch::x86_64::*;

    /// One group of 16 rows times `T` activation rows: 16 f32 per activation row.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn group<const F: u32, const T: usize>(
        w: &Repacked,
        g: usize,
        x: [&[BlockQ8]; T],
        xsum: [&[i32]; T],
        xu: [&[[u8; QK]]; T],
    ) -> [[f32; GROUP]; T] {
        let v = if F == 8 { 8 } else { 4 };
        let mut acc = [_mm512_setzero_ps(); T];
        let nibble = _mm512_set1_epi8(0x0F);
        for b in 0..w.blocks {
            let gb = g * w.blocks + b;
            let qs = w.qs.as_ptr().add(gb * v * 64);
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(
                w.d.as_ptr().add(gb * GROUP) as *const __m256i
            ));
            if F == 8 {
                let regs: [__m512i; 8] =
                    std::array::from_fn(|j| _mm512_loadu_si512(qs.add(64 * j) as *const _));
                let corr = _mm512_slli_epi32::<7>(_mm512_cvtepi16_epi32(_mm256_loadu_si256(
                    w.wsum.as_ptr().add(gb * GROUP) as *const __m256i,
                )));
                for t in 0..T {
                    let xb = xu[t].get_unchecked(b).as_ptr() as *const i32;
                    // Two chains of four (shorter latency), joined before the correction.
                    let mut s0 = _mm512_setzero_si512();
                    let mut s1 = _mm512_setzero_si512();
                    for j in 0..4 {
                        s0 = _mm512_dpbusd_epi32(
                            s0,
                            _mm512_set1_epi32(xb.add(j).read_unaligned()),
                            regs[j],
                        );
                        s1 = _mm512_dpbusd_epi32(
                            s1,
                            _mm512_set1_epi32(xb.add(4 + j).read_unaligned()),
                            regs[4 + j],
                        );
                    }
                    let isum = _mm512_sub_epi32(_mm512_add_epi32(s0, s1), corr);
                    let xd = x[t].get_unchecked(b).d;
                    acc[t] = _mm512_fmadd_ps(
                        _mm512_cvtepi32_ps(isum),
                        _mm512_mul_ps(d, _mm512_set1_ps(xd)),
                        acc[t],
                    );
                }
            } else {
                let mut lo = [_mm512_setzero_si512(); 4];
                let mut hi = [_mm512_setzero_si512(); 4];
                for j in 0..4 {
                    let r = _mm512_loadu_si512(qs.add(64 * j) as *const _);
                    lo[j] = _mm512_and_si512(r, nibble);
                    hi[j] = _mm512_and_si512(_mm512_srli_epi16::<4>(r), nibble);
                }
                let mins = if F == 3 {
                    _mm512_cvtph_ps(_mm256_loadu_si256(
                        w.m.as_ptr().add(gb * GROUP) as *const __m256i
                    ))
                } else {
                    _mm512_setzero_ps()
                };
                for t in 0..T {
                    let xb = x[t].get_unchecked(b);
                    let xw = xb.qs.as_ptr() as *const i32;
                    let mut s0 = _mm512_setzero_si512();
                    let mut s1 = _mm512_setzero_si512();
                    for j in 0..4 {
                        s0 = _mm512_dpbusd_epi32(
                            s0,
                            lo[j],
                            _mm512_set1_epi32(xw.add(j).read_unaligned()),
                        );
                        s1 = _mm512_dpbusd_epi32(
                            s1,
                            hi[j],
                            _mm512_set1_epi32(xw.add(4 + j).read_unaligned()),
                        );
                    }
                    let mut isum = _mm512_add_epi32(s0, s1);
                    if F == 2 {
                        // Q4_0 levels carry an offset of 8: Σ (q − 8)·x = Σ q·x − 8·Σ x.
                        let offset = 8 * *xsum[t].get_unchecked(b);
                        isum = _mm512_sub_epi32(isum, _mm512_set1_epi32(offset));
                    }
                    acc[t] = _mm512_fmadd_ps(
                        _mm512_cvtepi32_ps(isum),
                        _mm512_mul_ps(d, _mm512_set1_ps(xb.d)),
                        acc[t],
                    );
                    if F == 3 {
                        acc[t] = _mm512_fmadd_ps(mins, _mm512_set1_ps(xb.s), acc[t]);
                    }
                }
            }
        }
        let mut out = [[0f32; GROUP]; T];
        for t in 0..T {
            _mm512_storeu_ps(out[t].as_mut_ptr(), acc[t]);
        }
        out
    }
}
