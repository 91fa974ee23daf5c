//! `Q4_K`, `Q5_K` and `Q6_K` weights repacked at load into groups of 16 rows, for CPUs with
//! AVX-512 VNNI or AVX2 ([`avx2`]) — the k-quant counterpart of [`super::repacked`].
//!
//! Why: the row-by-row AVX2 kernel ([`super::k_quants::avx2`]) unpacks every super-block of every
//! row and dots it with `maddubs`/`madd` pairs, 32 bytes at a time: it ran at 0.46–0.86× llama.cpp's
//! prefill. Here one 512-bit register holds the same four-element slice of a super-block for 16
//! rows, so one `vpdpbusd` with a broadcast activation word advances 16 rows, and the per-row
//! sub-block scales, mins and f16 factors are applied once per sub-block / super-block for all 16.
//!
//! Layout per group of 16 rows and per super-block `b` (elements `256b..256b+256` of each row):
//! - `qs`: `V` registers of 64 bytes; register `j`, lane `r` holds bytes `4j..4j+4` of row `r`'s
//!   super-block region that holds the levels, as stored: `Q4_K` `qs[128]` (`V = 32`), `Q5_K`
//!   `qh[32] qs[128]` (`V = 40`), `Q6_K` `ql[128] qh[64]` (`V = 48`);
//! - `sc`: 256 bytes, eight registers of 32 bytes; register `k`, lane `r` holds two 8-bit values
//!   of row `r`, so one `vpmovzxbw`/`vpmovsxbw` gives 16-bit pairs for `vpdpwssd`: `Q4_K`/`Q5_K`
//!   scale pairs `(sc[2k], sc[2k+1])` for `k < 4`, then min pairs; `Q6_K` its 16 signed scales;
//! - `d` (and `dmin` for `Q4_K`/`Q5_K`): the 16 rows' f16 factors.
//!
//! Each super-block's value for a row is `x.d · (d · Σ_s sc[s] · Σ q·xq − dmin · Σ_s mn[s] ·
//! bsum[s])` (for `Q6_K`: `d · Σ_g sc[g] · (Σ q·xq − 32 · bsum[g])`), every product in integers, so
//! only the final multiply-adds round. Every row's value is computed with the same operations
//! whatever the number of activation rows (batch invariance), and the original super-blocks can be
//! rebuilt exactly ([`RepackedK::row_blocks`]: the 6-bit scale packing is a bijection), so the
//! matrix keeps no second copy.

use super::q8::{BlockQ8K, QK_K};
use crate::kernels::ggml_types::GgmlType;

/// Rows per group (lanes of a 512-bit register of i32).
pub const GROUP: usize = 16;

/// Bytes of the repacked scales per group and super-block.
const SC_BYTES: usize = 256;

pub(super) struct RepackedK {
    ty: GgmlType,
    rows: usize,
    blocks: usize,
    qs: Vec<u8>,
    sc: Vec<u8>,
    d: Vec<u16>,
    dmin: Vec<u16>,
}

/// Whether `ty` has a repacked kernel.
pub(super) fn supports(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K)
}

/// (start of the levels region in a super-block, its length in 4-byte words = registers).
fn levels(ty: GgmlType) -> (usize, usize) {
    match ty {
        GgmlType::Q4_K => (16, 32),
        GgmlType::Q5_K => (16, 40),
        _ => (0, 48),
    }
}

/// `Q4_K`/`Q5_K`'s 8 scales and 8 mins (6 bits each) packed back into their 12 bytes: the
/// inverse of [`super::k_quants::k4_scales_mins`].
fn k4_pack(sc: &[u8; 8], mn: &[u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..4 {
        s[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
        s[j + 4] = mn[j] | ((mn[j + 4] >> 4) << 6);
        s[j + 8] = (sc[j + 4] & 0x0F) | ((mn[j + 4] & 0x0F) << 4);
    }
    s
}

/// Index in a group's 256 scale bytes of 8-bit value `i` (of 16) of lane `lane`.
fn sc_at(i: usize, lane: usize) -> usize {
    ((i / 2) * GROUP + lane) * 2 + i % 2
}

impl RepackedK {
    /// `data`: `rows` (a multiple of [`GROUP`]) rows of `blocks` super-blocks of `ty`, as stored.
    pub(super) fn new(ty: GgmlType, data: &[u8], rows: usize, blocks: usize) -> RepackedK {
        debug_assert!(supports(ty) && rows % GROUP == 0);
        let bb = ty.block_bytes;
        let (at, v) = levels(ty);
        let groups = rows / GROUP;
        let mut qs = vec![0u8; groups * blocks * v * 64];
        let mut sc = vec![0u8; groups * blocks * SC_BYTES];
        let mut d = vec![0u16; rows * blocks];
        let mut dmin = if ty == GgmlType::Q6_K {
            Vec::new()
        } else {
            vec![0u16; rows * blocks]
        };
        for g in 0..groups {
            for b in 0..blocks {
                let gb = g * blocks + b;
                let scg = &mut sc[gb * SC_BYTES..(gb + 1) * SC_BYTES];
                for lane in 0..GROUP {
                    let r = g * GROUP + lane;
                    let block = &data[(r * blocks + b) * bb..][..bb];
                    if ty == GgmlType::Q6_K {
                        d[gb * GROUP + lane] = u16::from_le_bytes([block[208], block[209]]);
                        for i in 0..16 {
                            scg[sc_at(i, lane)] = block[192 + i];
                        }
                    } else {
                        d[gb * GROUP + lane] = u16::from_le_bytes([block[0], block[1]]);
                        dmin[gb * GROUP + lane] = u16::from_le_bytes([block[2], block[3]]);
                        let (s, m) = super::k_quants::k4_scales_mins(&block[4..16]);
                        for i in 0..8 {
                            scg[sc_at(i, lane)] = s[i];
                            scg[sc_at(8 + i, lane)] = m[i];
                        }
                    }
                    for j in 0..v {
                        let to = ((gb * v + j) * GROUP + lane) * 4;
                        qs[to..to + 4].copy_from_slice(&block[at + 4 * j..at + 4 * j + 4]);
                    }
                }
            }
        }
        RepackedK {
            ty,
            rows,
            blocks,
            qs,
            sc,
            d,
            dmin,
        }
    }

    #[cfg(test)]
    pub(super) fn rows(&self) -> usize {
        self.rows
    }

    /// Row `r`'s super-blocks exactly as they were stored in the file.
    pub(super) fn row_blocks(&self, r: usize) -> Vec<u8> {
        let (g, lane) = (r / GROUP, r % GROUP);
        let (at, v) = levels(self.ty);
        let bb = self.ty.block_bytes;
        let mut out = vec![0u8; self.blocks * bb];
        for (b, block) in out.chunks_exact_mut(bb).enumerate() {
            let gb = g * self.blocks + b;
            let scg = &self.sc[gb * SC_BYTES..(gb + 1) * SC_BYTES];
            let d = self.d[gb * GROUP + lane].to_le_bytes();
            if self.ty == GgmlType::Q6_K {
                for i in 0..16 {
                    block[192 + i] = scg[sc_at(i, lane)];
                }
                block[208..210].copy_from_slice(&d);
            } else {
                block[..2].copy_from_slice(&d);
                block[2..4].copy_from_slice(&self.dmin[gb * GROUP + lane].to_le_bytes());
                let s: [u8; 8] = std::array::from_fn(|i| scg[sc_at(i, lane)]);
                let m: [u8; 8] = std::array::from_fn(|i| scg[sc_at(8 + i, lane)]);
                block[4..16].copy_from_slice(&k4_pack(&s, &m));
            }
            for j in 0..v {
                let from = ((gb * v + j) * GROUP + lane) * 4;
                block[at + 4 * j..at + 4 * j + 4].copy_from_slice(&self.qs[from..from + 4]);
            }
        }
        out
    }

    /// The matrices one above the other (all repacked, same type and width).
    pub(super) fn stack(parts: &[&RepackedK]) -> RepackedK {
        let first = parts[0];
        RepackedK {
            ty: first.ty,
            rows: parts.iter().map(|p| p.rows).sum(),
            blocks: first.blocks,
            qs: parts.iter().flat_map(|p| p.qs.iter().copied()).collect(),
            sc: parts.iter().flat_map(|p| p.sc.iter().copied()).collect(),
            d: parts.iter().flat_map(|p| p.d.iter().copied()).collect(),
            dmin: parts.iter().flat_map(|p| p.dmin.iter().copied()).collect(),
        }
    }

    /// Groups `g0..g0 + out.len() / (GROUP · m)` times the `m` activation rows `xq` (`blocks`
    /// super-blocks per row), written `[row, m]` into `out` (the contract of
    /// `Repacked::run_groups`).
    ///
    /// `vnni`: the AVX-512 VNNI kernel, else the AVX2 one (the same results bit for bit).
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available, and AVX-512 F/BW/VNNI when `vnni`.
    #[cfg(target_arch = "x86_64")]
    pub(super) unsafe fn run_groups(
        &self,
        g0: usize,
        xq: &[BlockQ8K],
        m: usize,
        out: &mut [f32],
        vnni: bool,
    ) {
        let groups = out.len() / (GROUP * m);
        let x_row = |i: usize| &xq[i * self.blocks..(i + 1) * self.blocks];
        // `Q4_K`/`Q5_K`: sums of each 32 activations (one per scale), as 16-bit pairs.
        let pairs: Vec<[i32; 4]> = if self.ty == GgmlType::Q6_K {
            Vec::new()
        } else {
            xq.iter()
                .map(|x| {
                    std::array::from_fn(|k| {
                        let s = |i: usize| x.bsums[2 * i] as i32 + x.bsums[2 * i + 1] as i32;
                        (s(2 * k) & 0xFFFF) | (s(2 * k + 1) << 16)
                    })
                })
                .collect()
        };
        for gl in 0..groups {
            let g = g0 + gl;
            let out_g = &mut out[gl * GROUP * m..(gl + 1) * GROUP * m];
            let mut i = 0;
            macro_rules! tile {
                ($t:literal) => {{
                    let x: [&[BlockQ8K]; $t] = std::array::from_fn(|k| x_row(i + k));
                    let p: [&[[i32; 4]]; $t] = std::array::from_fn(|k| {
                        if pairs.is_empty() {
                            &[][..]
                        } else {
                            &pairs[(i + k) * self.blocks..(i + k + 1) * self.blocks]
                        }
                    });
                    let acc = match (self.ty, vnni) {
                        (GgmlType::Q4_K, true) => avx512::group_k4::<false, $t>(self, g, x, p),
                        (GgmlType::Q5_K, true) => avx512::group_k4::<true, $t>(self, g, x, p),
                        (_, true) => avx512::group_q6k::<$t>(self, g, x),
                        (GgmlType::Q4_K, false) => avx2::group::<12, $t>(self, g, x, p),
                        (GgmlType::Q5_K, false) => avx2::group::<13, $t>(self, g, x, p),
                        (_, false) => avx2::group::<14, $t>(self, g, x, p),
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

/// The same kernels for CPUs with AVX2 but no AVX-512 VNNI, on each 32-byte half (rows 0–7,
/// 8–15) of a group's registers. `vpdpbusd` becomes `vpmaddubsw` (u8 levels × i8 activations,
/// pairs into i16), a few of which are summed in i16 before one `vpmaddwd` by the sub-block's
/// scale (so no `vpmulld`): as many as keep every i16 lane exact with activations down to −128
/// (`Q4_K`: 8, 16 products ≤ 15·128 each; `Q5_K`: 4, levels ≤ 31; `Q6_K`: 2, levels ≤ 63).
/// The integer sums equal the VNNI kernels' and the float work per row is the same operations in
/// the same order, so both give the same bits.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{BlockQ8K, RepackedK, GROUP, SC_BYTES};
    use std::arch::x86_64::*;

    /// `v` shifted left by `k` bits (right by `−k`) in 16-bit lanes.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn shift(v: __m256i, k: i32) -> __m256i {
        if k >= 0 {
            _mm256_sll_epi16(v, _mm_cvtsi32_si128(k))
        } else {
            _mm256_srl_epi16(v, _mm_cvtsi32_si128(-k))
        }
    }

    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn word(x: &BlockQ8K, at: usize) -> __m256i {
        _mm256_set1_epi32((x.qs.as_ptr().add(at) as *const i32).read_unaligned())
    }

    /// 16-bit pairs `(a, b)` per 32-bit lane → `(a, a)` and `(b, b)`: `vpmaddwd` factors.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn split_pairs(p: __m256i) -> (__m256i, __m256i) {
        let a = _mm256_shufflehi_epi16::<0xA0>(_mm256_shufflelo_epi16::<0xA0>(p));
        let b = _mm256_shufflehi_epi16::<0xF5>(_mm256_shufflelo_epi16::<0xF5>(p));
        (a, b)
    }

    /// `Σ_a q[a] · x[at + 4a..at + 4a + 4]` per row lane times `scale` (the same in both 16-bit
    /// halves), summing `CHUNK` products of pairs in i16 before widening.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn scaled_dot<const CHUNK: usize>(
        q: &[__m256i],
        xb: &BlockQ8K,
        at: usize,
        scale: __m256i,
    ) -> __m256i {
        let mut sum = _mm256_setzero_si256();
        for (c, qc) in q.chunks_exact(CHUNK).enumerate() {
            let mut s16 = _mm256_setzero_si256();
            for (a, &qa) in qc.iter().enumerate() {
                let p = _mm256_maddubs_epi16(qa, word(xb, at + 4 * (CHUNK * c + a)));
                s16 = _mm256_add_epi16(s16, p);
            }
            sum = _mm256_add_epi32(sum, _mm256_madd_epi16(s16, scale));
        }
        sum
    }

    /// One group of 16 rows of `Q4_K` (`F = 12`), `Q5_K` (13) or `Q6_K` (14) times `T` activation
    /// rows, 16 f32 per activation row (`pairs`: as for the VNNI `group_k4`).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn group<const F: u32, const T: usize>(
        w: &RepackedK,
        g: usize,
        x: [&[BlockQ8K]; T],
        pairs: [&[[i32; 4]]; T],
    ) -> [[f32; GROUP]; T] {
        super::super::repacked::avx2::two_halves::<T>(w.blocks, |b, half, acc| {
            if F == 14 {
                q6k_block::<T>(w, g, b, half, &x, acc)
            } else {
                k4_block::<F, T>(w, g, b, half, &x, &pairs, acc)
            }
        })
    }

    /// `Q4_K`/`Q5_K` super-block `b` of rows `8·half..8·half + 8` of group `g`, into `acc`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn k4_block<const F: u32, const T: usize>(
        w: &RepackedK,
        g: usize,
        b: usize,
        half: usize,
        x: &[&[BlockQ8K]; T],
        pairs: &[&[[i32; 4]]; T],
        acc: &mut [__m256; T],
    ) {
        let h5 = F == 13;
        let v = if h5 { 40 } else { 32 };
        let q0 = if h5 { 8 } else { 0 };
        let nibble = _mm256_set1_epi8(0x0F);
        let bit4 = _mm256_set1_epi8(0x10);
        let gb = g * w.blocks + b;
        let qs = w.qs.as_ptr().add(gb * v * 64 + 32 * half);
        let reg = |j: usize| _mm256_loadu_si256(qs.add(64 * j) as *const __m256i);
        let sc = w.sc.as_ptr().add(gb * SC_BYTES + 16 * half);
        let mut sumi = [_mm256_setzero_si256(); T];
        for c in 0..4 {
            // Scales of sub-blocks 2c (low nibbles) and 2c + 1 (high nibbles).
            let pair = _mm256_cvtepu8_epi16(_mm_loadu_si128(sc.add(32 * c) as *const __m128i));
            let (s_lo, s_hi) = split_pairs(pair);
            for (nib, scale) in [(0, s_lo), (1, s_hi)] {
                let q: [__m256i; 8] = std::array::from_fn(|a| {
                    let r = reg(q0 + 8 * c + a);
                    let r = if nib == 1 {
                        _mm256_srli_epi16::<4>(r)
                    } else {
                        r
                    };
                    let l = _mm256_and_si256(r, nibble);
                    if h5 {
                        // Bit `s` of qh byte `l` is bit 4 of element `32s + l`.
                        let s = (2 * c + nib) as i32;
                        _mm256_or_si256(l, _mm256_and_si256(shift(reg(a), 4 - s), bit4))
                    } else {
                        l
                    }
                });
                for t in 0..T {
                    let xb = x[t].get_unchecked(b);
                    let at = 64 * c + 32 * nib;
                    let d = if h5 {
                        scaled_dot::<4>(&q, xb, at, scale)
                    } else {
                        scaled_dot::<8>(&q, xb, at, scale)
                    };
                    sumi[t] = _mm256_add_epi32(sumi[t], d);
                }
            }
        }
        let mins: [__m256i; 4] = std::array::from_fn(|k| {
            _mm256_cvtepu8_epi16(_mm_loadu_si128(sc.add(128 + 32 * k) as *const __m128i))
        });
        let at = gb * GROUP + 8 * half;
        let d = _mm256_cvtph_ps(_mm_loadu_si128(w.d.as_ptr().add(at) as *const __m128i));
        let dmin = _mm256_cvtph_ps(_mm_loadu_si128(w.dmin.as_ptr().add(at) as *const __m128i));
        for t in 0..T {
            let p = pairs[t].get_unchecked(b);
            let mut off = _mm256_setzero_si256();
            for (k, mins) in mins.iter().enumerate() {
                off = _mm256_add_epi32(off, _mm256_madd_epi16(*mins, _mm256_set1_epi32(p[k])));
            }
            let xd = _mm256_set1_ps(x[t].get_unchecked(b).d);
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi[t]), _mm256_mul_ps(d, xd), acc[t]);
            acc[t] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(off), _mm256_mul_ps(dmin, xd), acc[t]);
        }
    }

    /// `Q6_K` super-block `b` of rows `8·half..8·half + 8` of group `g`, into `acc`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn q6k_block<const T: usize>(
        w: &RepackedK,
        g: usize,
        b: usize,
        half: usize,
        x: &[&[BlockQ8K]; T],
        acc: &mut [__m256; T],
    ) {
        const V: usize = 48;
        let nibble = _mm256_set1_epi8(0x0F);
        let crumb = _mm256_set1_epi8(0x30);
        let gb = g * w.blocks + b;
        let qs = w.qs.as_ptr().add(gb * V * 64 + 32 * half);
        let reg = |j: usize| _mm256_loadu_si256(qs.add(64 * j) as *const __m256i);
        let sc = w.sc.as_ptr().add(gb * SC_BYTES + 16 * half);
        let scale_pair =
            |k: usize| _mm256_cvtepi8_epi16(_mm_loadu_si128(sc.add(32 * k) as *const __m128i));
        let mut sumi = [_mm256_setzero_si256(); T];
        // Element `128n + 32j + l`: low 4 bits in nibble `j / 2` of ql byte
        // `64n + 32(j % 2) + l`, high 2 bits at bit `2j` of qh byte `32n + l`.
        for n in 0..2 {
            for j in 0..4 {
                let q: [__m256i; 8] = std::array::from_fn(|a| {
                    let l = reg(16 * n + 8 * (j % 2) + a);
                    let l = if j >= 2 { _mm256_srli_epi16::<4>(l) } else { l };
                    let h = shift(reg(32 + 8 * n + a), 4 - 2 * j as i32);
                    _mm256_or_si256(_mm256_and_si256(l, nibble), _mm256_and_si256(h, crumb))
                });
                // Sub-blocks 8n + 2j (a < 4) and 8n + 2j + 1: scale pair 4n + j.
                let (s0, s1) = split_pairs(scale_pair(4 * n + j));
                for t in 0..T {
                    let xb = x[t].get_unchecked(b);
                    let at = 128 * n + 32 * j;
                    let d0 = scaled_dot::<2>(&q[..4], xb, at, s0);
                    let d1 = scaled_dot::<2>(&q[4..], xb, at + 16, s1);
                    sumi[t] = _mm256_add_epi32(sumi[t], _mm256_add_epi32(d0, d1));
                }
            }
        }
        let pairs: [__m256i; 8] = std::array::from_fn(scale_pair);
        let d = _mm256_cvtph_ps(_mm_loadu_si128(
            w.d.as_ptr().add(gb * GROUP + 8 * half) as *const __m128i
        ));
        for t in 0..T {
            let xb = x[t].get_unchecked(b);
            let bs = xb.bsums.as_ptr() as *const i32;
            // The levels' offset of 32: Σ_g sc[g] · 32 · bsum[g].
            let mut off = _mm256_setzero_si256();
            for (k, p) in pairs.iter().enumerate() {
                let bsum = _mm256_set1_epi32(bs.add(k).read_unaligned());
                off = _mm256_add_epi32(off, _mm256_madd_epi16(*p, bsum));
            }
            let isum = _mm256_sub_epi32(sumi[t], _mm256_slli_epi32::<5>(off));
            acc[t] = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(isum),
                _mm256_mul_ps(d, _mm256_set1_ps(xb.d)),
                acc[t],
            );
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{BlockQ8K, RepackedK, GROUP, QK_K, SC_BYTES};
    use std::arch::x86_64::*;

    /// `v` shifted left by `k` bits (right by `−k`) in 16-bit lanes.
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    unsafe fn shift(v: __m512i, k: i32) -> __m512i {
        if k >= 0 {
            _mm512_sll_epi16(v, _mm_cvtsi32_si128(k))
        } else {
            _mm512_srl_epi16(v, _mm_cvtsi32_si128(-k))
        }
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn word(x: &BlockQ8K, at: usize) -> __m512i {
        _mm512_set1_epi32((x.qs.as_ptr().add(at) as *const i32).read_unaligned())
    }

    /// `Q4_K` (`H = false`) / `Q5_K` (`H = true`): one group of 16 rows times `T` activation
    /// rows, 16 f32 per activation row.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn group_k4<const H: bool, const T: usize>(
        w: &RepackedK,
        g: usize,
        x: [&[BlockQ8K]; T],
        pairs: [&[[i32; 4]]; T],
    ) -> [[f32; GROUP]; T] {
        let v = if H { 40 } else { 32 };
        let q0 = if H { 8 } else { 0 };
        let mut acc = [_mm512_setzero_ps(); T];
        let nibble = _mm512_set1_epi8(0x0F);
        let bit4 = _mm512_set1_epi8(0x10);
        let low16 = _mm512_set1_epi32(0xFFFF);
        for b in 0..w.blocks {
            let gb = g * w.blocks + b;
            let qs = w.qs.as_ptr().add(gb * v * 64);
            let reg = |j: usize| _mm512_loadu_si512(qs.add(64 * j) as *const _);
            let sc = w.sc.as_ptr().add(gb * SC_BYTES);
            let mut sumi = [_mm512_setzero_si512(); T];
            for c in 0..4 {
                // Scales of sub-blocks 2c (low nibbles) and 2c + 1 (high nibbles) as i32.
                let pair = _mm512_cvtepu8_epi16(_mm256_loadu_si256(sc.add(32 * c) as *const _));
                let s_lo = _mm512_and_si512(pair, low16);
                let s_hi = _mm512_srli_epi32::<16>(pair);
                let mut lo = [_mm512_setzero_si512(); 8];
                let mut hi = [_mm512_setzero_si512(); 8];
                for a in 0..8 {
                    let r = reg(q0 + 8 * c + a);
                    lo[a] = _mm512_and_si512(r, nibble);
                    hi[a] = _mm512_and_si512(_mm512_srli_epi16::<4>(r), nibble);
                    if H {
                        // Bit `s` of qh byte `l` is bit 4 of element `32s + l`.
                        let h = reg(a);
                        let s = 2 * c as i32;
                        lo[a] = _mm512_or_si512(lo[a], _mm512_and_si512(shift(h, 4 - s), bit4));
                        hi[a] = _mm512_or_si512(hi[a], _mm512_and_si512(shift(h, 3 - s), bit4));
                    }
                }
                for t in 0..T {
                    let xb = x[t].get_unchecked(b);
                    // Four chains of four (shorter latency), joined per sub-block.
                    let mut d = [_mm512_setzero_si512(); 4];
                    for a in 0..4 {
                        d[0] = _mm512_dpbusd_epi32(d[0], lo[a], word(xb, 64 * c + 4 * a));
                        d[1] = _mm512_dpbusd_epi32(d[1], lo[4 + a], word(xb, 64 * c + 16 + 4 * a));
                        d[2] = _mm512_dpbusd_epi32(d[2], hi[a], word(xb, 64 * c + 32 + 4 * a));
                        d[3] = _mm512_dpbusd_epi32(d[3], hi[4 + a], word(xb, 64 * c + 48 + 4 * a));
                    }
                    let dl = _mm512_mullo_epi32(_mm512_add_epi32(d[0], d[1]), s_lo);
                    let dh = _mm512_mullo_epi32(_mm512_add_epi32(d[2], d[3]), s_hi);
                    sumi[t] = _mm512_add_epi32(sumi[t], _mm512_add_epi32(dl, dh));
                }
            }
            let mins: [__m512i; 4] = std::array::from_fn(|k| {
                _mm512_cvtepu8_epi16(_mm256_loadu_si256(sc.add(128 + 32 * k) as *const _))
            });
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(
                w.d.as_ptr().add(gb * GROUP) as *const __m256i
            ));
            let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(
                w.dmin.as_ptr().add(gb * GROUP) as *const __m256i
            ));
            for t in 0..T {
                let p = pairs[t].get_unchecked(b);
                let mut off = _mm512_setzero_si512();
                for k in 0..4 {
                    off = _mm512_dpwssd_epi32(off, mins[k], _mm512_set1_epi32(p[k]));
                }
                let xd = _mm512_set1_ps(x[t].get_unchecked(b).d);
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi[t]), _mm512_mul_ps(d, xd), acc[t]);
                acc[t] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(off), _mm512_mul_ps(dmin, xd), acc[t]);
            }
        }
        let mut out = [[0f32; GROUP]; T];
        for t in 0..T {
            _mm512_storeu_ps(out[t].as_mut_ptr(), acc[t]);
        }
        out
    }

    /// `Q6_K`: one group of 16 rows times `T` activation rows, 16 f32 per activation row.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn group_q6k<const T: usize>(
        w: &RepackedK,
        g: usize,
        x: [&[BlockQ8K]; T],
    ) -> [[f32; GROUP]; T] {
        const V: usize = 48;
        let mut acc = [_mm512_setzero_ps(); T];
        let nibble = _mm512_set1_epi8(0x0F);
        let crumb = _mm512_set1_epi8(0x30);
        for b in 0..w.blocks {
            let gb = g * w.blocks + b;
            let qs = w.qs.as_ptr().add(gb * V * 64);
            let reg = |j: usize| _mm512_loadu_si512(qs.add(64 * j) as *const _);
            let sc = w.sc.as_ptr().add(gb * SC_BYTES);
            let scale_pair =
                |k: usize| _mm512_cvtepi8_epi16(_mm256_loadu_si256(sc.add(32 * k) as *const _));
            let mut sumi = [_mm512_setzero_si512(); T];
            // Element `128n + 32j + l`: low 4 bits in nibble `j / 2` of ql byte
            // `64n + 32(j % 2) + l`, high 2 bits at bit `2j` of qh byte `32n + l`.
            for n in 0..2 {
                for j in 0..4 {
                    let mut q = [_mm512_setzero_si512(); 8];
                    for (a, q) in q.iter_mut().enumerate() {
                        let l = reg(16 * n + 8 * (j % 2) + a);
                        let l = if j >= 2 { _mm512_srli_epi16::<4>(l) } else { l };
                        let h = shift(reg(32 + 8 * n + a), 4 - 2 * j as i32);
                        *q = _mm512_or_si512(
                            _mm512_and_si512(l, nibble),
                            _mm512_and_si512(h, crumb),
                        );
                    }
                    // Sub-blocks 8n + 2j (a < 4) and 8n + 2j + 1: scale pair 4n + j.
                    let pair = scale_pair(4 * n + j);
                    let s0 = _mm512_srai_epi32::<16>(_mm512_slli_epi32::<16>(pair));
                    let s1 = _mm512_srai_epi32::<16>(pair);
                    for t in 0..T {
                        let xb = x[t].get_unchecked(b);
                        let at = 128 * n + 32 * j;
                        let mut d = [_mm512_setzero_si512(); 4];
                        for a in 0..2 {
                            d[0] = _mm512_dpbusd_epi32(d[0], q[a], word(xb, at + 4 * a));
                            d[1] = _mm512_dpbusd_epi32(d[1], q[2 + a], word(xb, at + 8 + 4 * a));
                            d[2] = _mm512_dpbusd_epi32(d[2], q[4 + a], word(xb, at + 16 + 4 * a));
                            d[3] = _mm512_dpbusd_epi32(d[3], q[6 + a], word(xb, at + 24 + 4 * a));
                        }
                        let d0 = _mm512_mullo_epi32(_mm512_add_epi32(d[0], d[1]), s0);
                        let d1 = _mm512_mullo_epi32(_mm512_add_epi32(d[2], d[3]), s1);
                        sumi[t] = _mm512_add_epi32(sumi[t], _mm512_add_epi32(d0, d1));
                    }
                }
            }
            let pairs: [__m512i; 8] = std::array::from_fn(scale_pair);
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(
                w.d.as_ptr().add(gb * GROUP) as *const __m256i
            ));
            for t in 0..T {
                let xb = x[t].get_unchecked(b);
                let bs = xb.bsums.as_ptr() as *const i32;
                // The levels' offset of 32: Σ_g sc[g] · 32 · bsum[g].
                let mut off = _mm512_setzero_si512();
                for (k, p) in pairs.iter().enumerate() {
                    off =
                        _mm512_dpwssd_epi32(off, *p, _mm512_set1_epi32(bs.add(k).read_unaligned()));
                }
                let isum = _mm512_sub_epi32(sumi[t], _mm512_slli_epi32::<5>(off));
                acc[t] = _mm512_fmadd_ps(
                    _mm512_cvtepi32_ps(isum),
                    _mm512_mul_ps(d, _mm512_set1_ps(xb.d)),
                    acc[t],
                );
            }
        }
        let mut out = [[0f32; GROUP]; T];
        for t in 0..T {
            _mm512_storeu_ps(out[t].as_mut_ptr(), acc[t]);
        }
        out
    }

    // `QK_K` names the super-block size the offsets above assume.
    const _: () = assert!(QK_K == 256);
}

#[cfg(test)]
mod tests {
    use super::super::q8::quantize_q8k;
    use super::super::tests::random_blocks;
    use super::super::{dequantize, QuantMatrix};
    use super::*;
    use crate::kernels::cpu_matmul::has_avx512_vnni;

    const TYPES: [GgmlType; 3] = [GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K];

    fn activations(m: usize, k: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..m * k)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
            })
            .collect()
    }

    #[test]
    fn row_blocks_rebuild_the_stored_super_blocks_bit_for_bit() {
        let (rows, blocks) = (32, 3);
        for ty in TYPES {
            let data = random_blocks(ty, rows * blocks, 17 + ty.id as u64);
            let rep = RepackedK::new(ty, &data, rows, blocks);
            let row_bytes = blocks * ty.block_bytes;
            for r in 0..rows {
                assert_eq!(
                    rep.row_blocks(r),
                    &data[r * row_bytes..(r + 1) * row_bytes],
                    "{ty} row {r}"
                );
            }
            // Stacking keeps every row where it was.
            let stacked = RepackedK::stack(&[&rep, &rep]);
            assert_eq!(stacked.rows(), 2 * rows);
            assert_eq!(stacked.row_blocks(rows + 5), rep.row_blocks(5), "{ty}");
        }
    }

    /// The repacked matmul against dequantize-then-f64 on the 8-bit activations the kernel sees
    /// (only the float summation order separates them), and each output row bit-identical
    /// whatever the number of activation rows.
    #[test]
    fn repacked_matmul_matches_f64_and_is_batch_invariant() {
        if !has_avx512_vnni() {
            eprintln!("skipped: no AVX-512 VNNI (or XLLM_NO_AVX512 set)");
            return;
        }
        let (n, k) = (48, 768);
        for ty in TYPES {
            let data = random_blocks(ty, n * k / QK_K, 29 + ty.id as u64);
            let w = QuantMatrix::new(ty, data.clone(), n, k).unwrap();
            assert!(
                matches!(w.layout, crate::kernels::quant_blocks::Layout::K(_)),
                "{ty} was not repacked"
            );
            let mut dense = vec![0f32; n * k];
            dequantize(ty, &data, &mut dense).unwrap();
            assert_eq!(
                w.dequantize_all(),
                dense,
                "{ty} dequantized from the repacked form"
            );
            let xs = activations(16, k, 3 + ty.id as u64);
            let xd: Vec<f32> = quantize_q8k(&xs, false)
                .iter()
                .flat_map(|b| b.dequantize())
                .collect();
            let full = w.matmul(&xs, 16);
            for i in 0..16 {
                for r in 0..n {
                    let (mut want, mut mag) = (0f64, 0f64);
                    for c in 0..k {
                        let p = xd[i * k + c] as f64 * dense[r * k + c] as f64;
                        want += p;
                        mag += p.abs();
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
