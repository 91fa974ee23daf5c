//! `Q5_0` and `Q5_1` weights repacked at load into groups of 16 rows, for CPUs with AVX-512
//! VNNI or AVX2 ([`avx2`]) — the 5-bit counterpart of [`super::repacked`] (same idea: one `vpdpbusd` with a
//! broadcast activation word advances 16 rows, one multiply-add per block for all 16).
//!
//! Why: llama.cpp's `Q4_K_M`/`Q5_K_M` give `Q5_0`/`Q5_1` to every matrix whose width is not a
//! multiple of 256 (most of SmolLM2) and to Gemma 3's q/k/v/gate/up, so these row-by-row AVX2
//! dots capped those files' prefill at ~0.45× llama.cpp's.
//!
//! Layout per group of 16 rows and per block `b` (elements `32b..32b+32` of each row): five
//! registers of 64 bytes, register `j`, lane `r` holding bytes `4j..4j+4` of row `r`'s
//! `qh[4] qs[16]` as stored (register 0: the 32 high bits; registers 1–4: the packed nibbles,
//! elements `4j'..4j'+4` low and `16+4j'..` high); `d` (and `m` for `Q5_1`): the 16 rows' f16
//! factors. The high bit of each element is moved to bit 4 of its byte with one `vpshufb`
//! (the qh byte that holds it) and one `vptestmb` (its bit), so the levels enter `vpdpbusd`
//! as unsigned bytes `0..32`; `Q5_0`'s offset of 16 is `16 · Σ x` per block.
//!
//! Every row's value is computed with the same operations whatever the number of activation
//! rows (batch invariance), and the original blocks are rebuilt exactly
//! ([`RepackedQ5::row_blocks`]), so the matrix keeps no second copy.

use super::q8::BlockQ8;
use crate::kernels::ggml_types::GgmlType;

/// Rows per group (lanes of a 512-bit register of i32).
pub const GROUP: usize = 16;

/// 64-byte registers per group and block: `qh`, then four of `qs`.
const V: usize = 5;

pub(super) struct RepackedQ5 {
    ty: GgmlType,
    rows: usize,
    blocks: usize,
    qs: Vec<u8>,
    d: Vec<u16>,
    m: Vec<u16>,
}

/// Whether `ty` has a repacked kernel here.
pub(super) fn supports(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q5_0 | GgmlType::Q5_1)
}

/// Where `qh` starts in a block (after `d`, and `m` for `Q5_1`).
fn levels_at(ty: GgmlType) -> usize {
    if ty == GgmlType::Q5_1 {
        4
    } else {
        2
    }
}

impl RepackedQ5 {
    /// `data`: `rows` (a multiple of [`GROUP`]) rows of `blocks` blocks of `ty`, as stored.
    pub(super) fn new(ty: GgmlType, data: &[u8], rows: usize, blocks: usize) -> RepackedQ5 {
        debug_assert!(supports(ty) && rows % GROUP == 0);
        let bb = ty.block_bytes;
        let at = levels_at(ty);
        let groups = rows / GROUP;
        let mut qs = vec![0u8; groups * blocks * V * 64];
        let mut d = vec![0u16; rows * blocks];
        let mut m = if ty == GgmlType::Q5_1 {
            vec![0u16; rows * blocks]
        } else {
            Vec::new()
        };
        for g in 0..groups {
            for b in 0..blocks {
                let gb = g * blocks + b;
                for lane in 0..GROUP {
                    let r = g * GROUP + lane;
                    let block = &data[(r * blocks + b) * bb..][..bb];
                    d[gb * GROUP + lane] = u16::from_le_bytes([block[0], block[1]]);
                    if ty == GgmlType::Q5_1 {
                        m[gb * GROUP + lane] = u16::from_le_bytes([block[2], block[3]]);
                    }
                    for j in 0..V {
                        let to = ((gb * V + j) * GROUP + lane) * 4;
                        qs[to..to + 4].copy_from_slice(&block[at + 4 * j..at + 4 * j + 4]);
                    }
                }
            }
        }
        RepackedQ5 {
            ty,
            rows,
            blocks,
            qs,
            d,
            m,
        }
    }

    #[cfg(test)]
    pub(super) fn rows(&self) -> usize {
        self.rows
    }

    /// Row `r`'s blocks exactly as they were stored in the file.
    pub(super) fn row_blocks(&self, r: usize) -> Vec<u8> {
        let (g, lane) = (r / GROUP, r % GROUP);
        let at = levels_at(self.ty);
        let bb = self.ty.block_bytes;
        let mut out = vec![0u8; self.blocks * bb];
        for (b, block) in out.chunks_exact_mut(bb).enumerate() {
            let gb = g * self.blocks + b;
            block[..2].copy_from_slice(&self.d[gb * GROUP + lane].to_le_bytes());
            if self.ty == GgmlType::Q5_1 {
                block[2..4].copy_from_slice(&self.m[gb * GROUP + lane].to_le_bytes());
            }
            for j in 0..V {
                let from = ((gb * V + j) * GROUP + lane) * 4;
                block[at + 4 * j..at + 4 * j + 4].copy_from_slice(&self.qs[from..from + 4]);
            }
        }
        out
    }

    /// The matrices one above the other (all repacked, same type and width).
    pub(super) fn stack(parts: &[&RepackedQ5]) -> RepackedQ5 {
        let first = parts[0];
        RepackedQ5 {
            ty: first.ty,
            rows: parts.iter().map(|p| p.rows).sum(),
            blocks: first.blocks,
            qs: parts.iter().flat_map(|p| p.qs.iter().copied()).collect(),
            d: parts.iter().flat_map(|p| p.d.iter().copied()).collect(),
            m: parts.iter().flat_map(|p| p.m.iter().copied()).collect(),
        }
    }

    /// Groups `g0..g0 + out.len() / (GROUP · m)` times the `m` activation rows `xq` (`blocks`
    /// blocks per row), written `[row, m]` into `out` (the contract of `Repacked::run_groups`).
    ///
    /// `vnni`: the AVX-512 VNNI kernel, else the AVX2 one (the same results bit for bit).
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available, and AVX-512 F/BW/VNNI when `vnni`.
    #[cfg(target_arch = "x86_64")]
    pub(super) unsafe fn run_groups(
        &self,
        g0: usize,
        xq: &[BlockQ8],
        m: usize,
        out: &mut [f32],
        vnni: bool,
    ) {
        let groups = out.len() / (GROUP * m);
        let x_row = |i: usize| &xq[i * self.blocks..(i + 1) * self.blocks];
        // Activation sums (`Q5_0`'s offset of 16), once per call.
        let xsum: Vec<i32> = if self.ty == GgmlType::Q5_0 {
            xq.iter()
                .map(|b| b.qs.iter().map(|&q| q as i32).sum())
                .collect()
        } else {
            Vec::new()
        };
        for gl in 0..groups {
            let g = g0 + gl;
            let out_g = &mut out[gl * GROUP * m..(gl + 1) * GROUP * m];
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
                    let acc = match (self.ty == GgmlType::Q5_1, vnni) {
                        (false, true) => avx512::group::<false, $t>(self, g, x, sums),
                        (true, true) => avx512::group::<true, $t>(self, g, x, sums),
                        (false, false) => avx2::group::<false, $t>(self, g, x, sums),
                        (true, false) => avx2::group::<true, $t>(self, g, x, sums),
                    };
                    for (k, lanes) in acc.iter().enumerate() {
                        for (lane, v) in lanes.iter().enumerate() {
                            out_g[lane * m + i + k] = *v;
                        }
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

/// The same kernel for CPUs with AVX2 but no AVX-512 VNNI, on each 32-byte half (rows 0–7,
/// 8–15) of a group's registers in turn. The high bits reach bit 4 with `vpshufb` (the qh byte
/// that holds them), a compare against each byte's bit and a mask; `vpdpbusd` becomes
/// `vpmaddubsw` + `vpmaddwd` by ones. Levels are at most 31, so the low and the high halves of
/// a block each sum their 8 products per row in one i16 lane (≤ 31744). The integer sums equal
/// the VNNI kernel's and the float work per row is the same, so both give the same bits.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{BlockQ8, RepackedQ5, GROUP, V};
    use std::arch::x86_64::*;

    /// One group of 16 rows times `T` activation rows (`MIN`: `Q5_1`), 16 f32 per activation
    /// row.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn group<const MIN: bool, const T: usize>(
        w: &RepackedQ5,
        g: usize,
        x: [&[BlockQ8]; T],
        xsum: [&[i32]; T],
    ) -> [[f32; GROUP]; T] {
        super::super::repacked::avx2::two_halves::<T>(w.blocks, |b, half, acc| {
            block::<MIN, T>(w, g, b, half, &x, &xsum, acc)
        })
    }

    /// Block `b` of rows `8·half..8·half + 8` of group `g`, added into `acc`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block<const MIN: bool, const T: usize>(
        w: &RepackedQ5,
        g: usize,
        b: usize,
        half: usize,
        x: &[&[BlockQ8]; T],
        xsum: &[&[i32]; T],
        acc: &mut [__m256; T],
    ) {
        let nibble = _mm256_set1_epi8(0x0F);
        let bit4 = _mm256_set1_epi8(0x10);
        let ones = _mm256_set1_epi16(1);
        // Byte offsets of the four 32-bit lanes of each 128-bit lane (for `vpshufb`).
        let base = _mm256_setr_epi32(
            0,
            0x0404_0404,
            0x0808_0808,
            0x0C0C_0C0C,
            0,
            0x0404_0404,
            0x0808_0808,
            0x0C0C_0C0C,
        );
        // Register `j`'s elements `4j + t` (low) / `16 + 4j + t` (high) have their high bit in
        // qh byte `j / 2` / `2 + j / 2`, at bit `4(j % 2) + t`.
        let bits = [
            _mm256_set1_epi32(0x0804_0201),
            _mm256_set1_epi32(0x8040_2010_u32 as i32),
        ];
        let high = |qh: __m256i, byte: usize, bits: __m256i| {
            let sel = _mm256_add_epi8(base, _mm256_set1_epi8(byte as i8));
            let v = _mm256_and_si256(_mm256_shuffle_epi8(qh, sel), bits);
            _mm256_and_si256(_mm256_cmpeq_epi8(v, bits), bit4)
        };
        let gb = g * w.blocks + b;
        let qs = w.qs.as_ptr().add(gb * V * 64 + 32 * half);
        let qh = _mm256_loadu_si256(qs as *const __m256i);
        let mut lo = [_mm256_setzero_si256(); 4];
        let mut hi = [_mm256_setzero_si256(); 4];
        for j in 0..4 {
            let r = _mm256_loadu_si256(qs.add(64 * (1 + j)) as *const __m256i);
            let l = _mm256_and_si256(r, nibble);
            lo[j] = _mm256_or_si256(l, high(qh, j / 2, bits[j % 2]));
            let h = _mm256_and_si256(_mm256_srli_epi16::<4>(r), nibble);
            hi[j] = _mm256_or_si256(h, high(qh, 2 + j / 2, bits[j % 2]));
        }
        let at = gb * GROUP + 8 * half;
        let d = _mm256_cvtph_ps(_mm_loadu_si128(w.d.as_ptr().add(at) as *const __m128i));
        let mins = if MIN {
            _mm256_cvtph_ps(_mm_loadu_si128(w.m.as_ptr().add(at) as *const __m128i))
        } else {
            _mm256_setzero_ps()
        };
        for t in 0..T {
            let xb = x[t].get_unchecked(b);
            let xw = xb.qs.as_ptr() as *const i32;
            let mut s0 = _mm256_setzero_si256();
            let mut s1 = _mm256_setzero_si256();
            for j in 0..4 {
                let x0 = _mm256_set1_epi32(xw.add(j).read_unaligned());
                let x1 = _mm256_set1_epi32(xw.add(4 + j).read_unaligned());
                s0 = _mm256_add_epi16(s0, _mm256_maddubs_epi16(lo[j], x0));
                s1 = _mm256_add_epi16(s1, _mm256_maddubs_epi16(hi[j], x1));
            }
            let mut isum =
                _mm256_add_epi32(_mm256_madd_epi16(s0, ones), _mm256_madd_epi16(s1, ones));
            if !MIN {
                // Q5_0 levels carry an offset of 16: Σ (q − 16)·x = Σ q·x − 16·Σ x.
                let offset = 16 * *xsum[t].get_unchecked(b);
                isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(offset));
            }
            acc[t] = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(isum),
                _mm256_mul_ps(d, _mm256_set1_ps(xb.d)),
                acc[t],
            );
            if MIN {
                acc[t] = _mm256_fmadd_ps(mins, _mm256_set1_ps(xb.s), acc[t]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{BlockQ8, RepackedQ5, GROUP, V};
    use std::arch::x86_64::*;

    /// One group of 16 rows times `T` activation rows (`MIN`: `Q5_1`), 16 f32 per activation
    /// row.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn group<const MIN: bool, const T: usize>(
        w: &RepackedQ5,
        g: usize,
        x: [&[BlockQ8]; T],
        xsum: [&[i32]; T],
    ) -> [[f32; GROUP]; T] {
        let mut acc = [_mm512_setzero_ps(); T];
        let nibble = _mm512_set1_epi8(0x0F);
        let bit4 = _mm512_set1_epi8(0x10);
        // Byte offsets of the four 32-bit lanes of each 128-bit lane (for `vpshufb`).
        let base = _mm512_set4_epi32(0x0C0C_0C0C, 0x0808_0808, 0x0404_0404, 0);
        // Register `j`'s elements `4j + t` (low) / `16 + 4j + t` (high) have their high bit in
        // qh byte `j / 2` / `2 + j / 2`, at bit `4(j % 2) + t`.
        let bits = [
            _mm512_set1_epi32(0x0804_0201),
            _mm512_set1_epi32(0x8040_2010_u32 as i32),
        ];
        for b in 0..w.blocks {
            let gb = g * w.blocks + b;
            let qs = w.qs.as_ptr().add(gb * V * 64);
            let qh = _mm512_loadu_si512(qs as *const _);
            let mut lo = [_mm512_setzero_si512(); 4];
            let mut hi = [_mm512_setzero_si512(); 4];
            for j in 0..4 {
                let r = _mm512_loadu_si512(qs.add(64 * (1 + j)) as *const _);
                let sel_lo = _mm512_add_epi8(base, _mm512_set1_epi8((j / 2) as i8));
                let sel_hi = _mm512_add_epi8(base, _mm512_set1_epi8((2 + j / 2) as i8));
                let k_lo = _mm512_test_epi8_mask(_mm512_shuffle_epi8(qh, sel_lo), bits[j % 2]);
                let k_hi = _mm512_test_epi8_mask(_mm512_shuffle_epi8(qh, sel_hi), bits[j % 2]);
                let l = _mm512_and_si512(r, nibble);
                lo[j] = _mm512_mask_add_epi8(l, k_lo, l, bit4);
                let h = _mm512_and_si512(_mm512_srli_epi16::<4>(r), nibble);
                hi[j] = _mm512_mask_add_epi8(h, k_hi, h, bit4);
            }
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(
                w.d.as_ptr().add(gb * GROUP) as *const __m256i
            ));
            let mins = if MIN {
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
                if !MIN {
                    // Q5_0 levels carry an offset of 16: Σ (q − 16)·x = Σ q·x − 16·Σ x.
                    let offset = 16 * *xsum[t].get_unchecked(b);
                    isum = _mm512_sub_epi32(isum, _mm512_set1_epi32(offset));
                }
                acc[t] = _mm512_fmadd_ps(
                    _mm512_cvtepi32_ps(isum),
                    _mm512_mul_ps(d, _mm512_set1_ps(xb.d)),
                    acc[t],
                );
                if MIN {
                    acc[t] = _mm512_fmadd_ps(mins, _mm512_set1_ps(xb.s), acc[t]);
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

#[cfg(test)]
mod tests {
    use super::super::q8::{quantize_q8, QK};
    use super::super::tests::random_blocks;
    use super::super::{legacy, QuantMatrix};
    use super::*;
    use crate::kernels::cpu_matmul::has_avx512_vnni;

    const TYPES: [GgmlType; 2] = [GgmlType::Q5_0, GgmlType::Q5_1];

    #[test]
    fn row_blocks_rebuild_the_stored_blocks_bit_for_bit() {
        let (rows, blocks) = (32, 5);
        for ty in TYPES {
            let data = random_blocks(ty, rows * blocks, 41 + ty.id as u64);
            let rep = RepackedQ5::new(ty, &data, rows, blocks);
            let row_bytes = blocks * ty.block_bytes;
            for r in 0..rows {
                assert_eq!(
                    rep.row_blocks(r),
                    &data[r * row_bytes..(r + 1) * row_bytes],
                    "{ty} row {r}"
                );
            }
            let stacked = RepackedQ5::stack(&[&rep, &rep]);
            assert_eq!(stacked.rows(), 2 * rows);
            assert_eq!(stacked.row_blocks(rows + 3), rep.row_blocks(3), "{ty}");
        }
    }

    /// The repacked matmul against the f64 product of the unpacked levels and the 8-bit
    /// activations (`d·x.d·Σ q·xq + m·x.s` per block, as the row-by-row kernels compute it), and
    /// each output row bit-identical whatever the number of activation rows.
    #[test]
    fn repacked_matmul_matches_f64_and_is_batch_invariant() {
        if !has_avx512_vnni() {
            eprintln!("skipped: no AVX-512 VNNI (or XLLM_NO_AVX512 set)");
            return;
        }
        let (n, k) = (48, 576);
        let blocks = k / QK;
        let mut s = 7u64;
        let xs: Vec<f32> = (0..16 * k)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
            })
            .collect();
        let xq = quantize_q8(&xs, false);
        for ty in TYPES {
            let data = random_blocks(ty, n * blocks, 43 + ty.id as u64);
            let w = QuantMatrix::new(ty, data.clone(), n, k).unwrap();
            assert!(
                matches!(w.layout, crate::kernels::quant_blocks::Layout::Q5(_)),
                "{ty} was not repacked"
            );
            let full = w.matmul(&xs, 16);
            let bb = ty.block_bytes;
            for i in 0..16 {
                for r in 0..n {
                    let (mut want, mut mag) = (0f64, 0f64);
                    for b in 0..blocks {
                        let (q, d, c) = legacy::unpack(ty, &data[(r * blocks + b) * bb..][..bb]);
                        let x = &xq[i * blocks + b];
                        let isum: i64 = q
                            .iter()
                            .zip(&x.qs)
                            .map(|(&a, &b)| a as i64 * b as i64)
                            .sum();
                        let p = d as f64 * x.d as f64 * isum as f64 + c as f64 * x.s as f64;
                        want += p;
                        mag += p.abs() + (d as f64 * x.d as f64).abs() * 16.0 * 128.0;
                    }
                    let got = full[i * n + r] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * mag + 1e-6,
                        "{ty} [{i},{r}]: {got} vs {want}"
                    );
                }
            }
            for m in [1usize, 5] {
                for i0 in [0usize, 16 - m] {
                    let part = w.matmul(&xs[i0 * k..(i0 + m) * k], m);
                    for r in 0..n {
                        for i in 0..m {
                            assert_eq!(
                                part[i * n + r].to_bits(),
                                full[(i0 + i) * n + r].to_bits(),
                                "{ty} m={m} row {r} activation {}",
                                i0 + i
                            );
                        }
                    }
                }
            }
        }
    }
}
