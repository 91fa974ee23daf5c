//! `TQ1_0` and `TQ2_0` weights repacked at load into groups of 16 rows, for CPUs with AVX-512
//! VNNI: one `vpdpbusd` with a broadcast activation word advances 16 rows by four elements each,
//! and the float work is one multiply-add per super-block for all 16 rows (the pattern of
//! [`super::repacked`]). CPUs with AVX2 only run the same layout through `vpmaddubsw` kernels
//! (module `avx2` below), which give the same bits.
//!
//! Layout per group of 16 rows and per super-block `b`: `W` registers of 64 bytes, register `w`,
//! lane `r` holding bytes `4w..4w+4` of row `r`'s block as stored (`TQ2_0`: the 64 bytes of `qs`,
//! `W = 16`; `TQ1_0`: `qs` and `qh`, `W = 13`), and the 16 rows' f16 scales. The bytes are the
//! file's own, so [`RepackedTq::row_blocks`] rebuilds every block exactly and the matrix keeps no
//! second copy.
//!
//! Multiply-free where it pays: the weights are never unpacked to levels one by one.
//! - `TQ2_0`: byte `p = Σ 4ⁿ·lₙ` (levels `lₙ` ∈ {0, 1, 2} for −1, 0, 1). `p & (3 << 2n)` is
//!   `4ⁿ·lₙ`, a valid unsigned byte for `vpdpbusd`, so each of the four masks sums into its own
//!   accumulator and the four are joined once per super-block, `Σ acc_n >> 2n` (exact: each is a
//!   multiple of 4ⁿ). One AND and one `vpdpbusd` per 64 weights; no shift per weight register.
//! - `TQ1_0`: byte `q₀` holds five trits, trit `n` = `⌊3·qₙ/256⌋` with `qₙ₊₁ = 3·qₙ mod 256`
//!   (byte tripling by two additions). Since `3·qₙ = 256·tritₙ + qₙ₊₁`, `Σ tritₙ·x = (3·Σ qₙ·x −
//!   Σ qₙ₊₁·x) / 256`: the raw tripled bytes go straight into `vpdpbusd` (two per 64 trits) and
//!   no comparison or table ever extracts a trit.
//! - Both: `Σ (l − 1)·x = Σ l·x − Σ x`, with `Σ x` from the activation block's group sums.
//!
//! Why not BitNet's TL table lookups (`vpshufb` over sums of activation pairs): a 128-bit lane of
//! `vpshufb` holds one 16-entry table, so 16 rows share one activation pair per lane, and the
//! pair sums need 16-bit entries (two lookups, then widening adds): about 25 weights per
//! instruction against 32 here (TQ2_0: AND + `vpdpbusd` per 64), with tables to rebuild for every
//! activation row. The VNNI form was measured against llama.cpp in docs/performance.md.
//!
//! Every row's value is computed with the same operations whatever the number of activation rows
//! (batch invariance, as in the row-by-row kernels). The weights are prefetched a few
//! super-blocks ahead: decode streams each weight once and was waiting on those loads.

use super::q8::{BlockQ8K, QK_K};
use crate::kernels::cpu_matmul::has_avx512_vnni;
use crate::kernels::ggml_types::GgmlType;

/// Rows per group (lanes of a 512-bit register of i32).
pub const GROUP: usize = 16;

pub(super) struct RepackedTq {
    ty: GgmlType,
    /// Whether the AVX-512 VNNI kernels run (else the AVX2 ones), fixed when the matrix is made.
    vnni: bool,
    rows: usize,
    blocks: usize,
    qs: Vec<u8>,
    d: Vec<u16>,
}

/// Whether `ty` has a repacked ternary kernel.
pub(super) fn supports(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::TQ1_0 | GgmlType::TQ2_0)
}

/// 64-byte registers (4-byte words per row) per group and super-block, and the scale's offset.
fn layout(ty: GgmlType) -> (usize, usize) {
    if ty == GgmlType::TQ2_0 {
        (16, 64)
    } else {
        (13, 52)
    }
}

impl RepackedTq {
    /// `data`: `rows` (a multiple of [`GROUP`]) rows of `blocks` super-blocks of `ty`, as in the
    /// file.
    pub(super) fn new(ty: GgmlType, data: &[u8], rows: usize, blocks: usize) -> RepackedTq {
        debug_assert!(supports(ty) && rows % GROUP == 0);
        let bb = ty.block_bytes;
        let (v, d_at) = layout(ty);
        let groups = rows / GROUP;
        let mut qs = vec![0u8; groups * blocks * v * 64];
        let mut d = vec![0u16; rows * blocks];
        for g in 0..groups {
            for b in 0..blocks {
                let gb = g * blocks + b;
                for lane in 0..GROUP {
                    let r = g * GROUP + lane;
                    let block = &data[(r * blocks + b) * bb..][..bb];
                    d[gb * GROUP + lane] = u16::from_le_bytes([block[d_at], block[d_at + 1]]);
                    for w in 0..v {
                        let at = ((gb * v + w) * GROUP + lane) * 4;
                        qs[at..at + 4].copy_from_slice(&block[4 * w..4 * w + 4]);
                    }
                }
            }
        }
        RepackedTq {
            ty,
            vnni: has_avx512_vnni(),
            rows,
            blocks,
            qs,
            d,
        }
    }

    /// Row `r`'s blocks exactly as they were stored in the file.
    pub(super) fn row_blocks(&self, r: usize) -> Vec<u8> {
        let (g, lane) = (r / GROUP, r % GROUP);
        let (v, d_at) = layout(self.ty);
        let bb = self.ty.block_bytes;
        let mut out = vec![0u8; self.blocks * bb];
        for (b, block) in out.chunks_exact_mut(bb).enumerate() {
            let gb = g * self.blocks + b;
            block[d_at..d_at + 2].copy_from_slice(&self.d[gb * GROUP + lane].to_le_bytes());
            for w in 0..v {
                let at = ((gb * v + w) * GROUP + lane) * 4;
                block[4 * w..4 * w + 4].copy_from_slice(&self.qs[at..at + 4]);
            }
        }
        out
    }

    /// The matrices one above the other (all repacked, same type and width).
    pub(super) fn stack(parts: &[&RepackedTq]) -> RepackedTq {
        let first = parts[0];
        RepackedTq {
            ty: first.ty,
            vnni: first.vnni,
            rows: parts.iter().map(|p| p.rows).sum(),
            blocks: first.blocks,
            qs: parts.iter().flat_map(|p| p.qs.iter().copied()).collect(),
            d: parts.iter().flat_map(|p| p.d.iter().copied()).collect(),
        }
    }

    /// Groups `g0..g0 + out.len() / (GROUP · m)` times the `m` activation rows `xq` (`blocks`
    /// super-blocks per row), written `[row, m]` into `out`.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available, and AVX-512 F/BW/VNNI when they were detected as
    /// the matrix was made.
    #[cfg(target_arch = "x86_64")]
    pub(super) unsafe fn run_groups(&self, g0: usize, xq: &[BlockQ8K], m: usize, out: &mut [f32]) {
        let groups = out.len() / (GROUP * m);
        let x_row = |i: usize| &xq[i * self.blocks..(i + 1) * self.blocks];
        // Σ x of every activation block (the level offset of 1), once per call.
        let xsum: Vec<i32> = xq
            .iter()
            .map(|b| b.bsums.iter().map(|&s| s as i32).sum())
            .collect();
        let sums = |i: usize| &xsum[i * self.blocks..(i + 1) * self.blocks];
        for gl in 0..groups {
            let g = g0 + gl;
            let out_g = &mut out[gl * GROUP * m..(gl + 1) * GROUP * m];
            let mut i = 0;
            macro_rules! tile {
                ($t:literal) => {{
                    let x: [&[BlockQ8K]; $t] = std::array::from_fn(|k| x_row(i + k));
                    let s: [&[i32]; $t] = std::array::from_fn(|k| sums(i + k));
                    let acc = match (self.vnni, self.ty == GgmlType::TQ2_0) {
                        (true, true) => avx512::group_tq2::<$t>(self, g, x, s),
                        (true, false) => avx512::group_tq1::<$t>(self, g, x, s),
                        (false, true) => avx2::group_tq2::<$t>(self, g, x, s),
                        (false, false) => avx2::group_tq1::<$t>(self, g, x, s),
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

/// The activation word of trit `n` of register `w` (`TQ1_0`): `qs[0..32]` hold elements
/// `32n + m`, `qs[32..48]` elements `160 + 16n + m`, `qh[0..4]` elements `240 + 4n + j`.
#[inline(always)]
const fn tq1_word(w: usize, n: usize) -> usize {
    if w < 8 {
        8 * n + w
    } else if w < 12 {
        40 + 4 * n + (w - 8)
    } else {
        60 + n
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{tq1_word, BlockQ8K, RepackedTq, GROUP, QK_K};
    use std::arch::x86_64::*;

    /// Bytes ahead of the current weight register that are prefetched: four super-blocks of a
    /// group. Decode reads every weight once, so the loads wait on memory; with this prefetch
    /// decode ran 1.2–1.3× faster on a 2-core Sapphire Rapids (docs/performance.md).
    const AHEAD_TQ2: usize = 4 * 16 * 64;
    const AHEAD_TQ1: usize = 4 * 13 * 64;

    /// The 16 rows' scales of group-block `gb`, as f32.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    #[inline]
    unsafe fn scales(w: &RepackedTq, gb: usize) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(
            w.d.as_ptr().add(gb * GROUP) as *const __m256i
        ))
    }

    /// Activation word `k` (elements `4k..4k + 4`) of a block, in all 16 lanes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    #[inline]
    unsafe fn word(xb: &BlockQ8K, k: usize) -> __m512i {
        debug_assert!(k < QK_K / 4);
        _mm512_set1_epi32((xb.qs.as_ptr() as *const i32).add(k).read_unaligned())
    }

    /// One group of 16 `TQ2_0` rows times `T` activation rows: 16 f32 per activation row.
    /// Register `w` = (half `j`, word `u`) holds elements `128j + 32n + 4u + (0..4)` in bits `2n`,
    /// i.e. activation word `32j + 8n + u`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn group_tq2<const T: usize>(
        w: &RepackedTq,
        g: usize,
        x: [&[BlockQ8K]; T],
        xsum: [&[i32]; T],
    ) -> [[f32; GROUP]; T] {
        let mut acc = [_mm512_setzero_ps(); T];
        let masks = [
            _mm512_set1_epi8(0x03),
            _mm512_set1_epi8(0x0C),
            _mm512_set1_epi8(0x30),
            _mm512_set1_epi8(0xC0u8 as i8),
        ];
        for b in 0..w.blocks {
            let gb = g * w.blocks + b;
            let qs = w.qs.as_ptr().add(gb * 16 * 64);
            let d = scales(w, gb);
            // s[t][n]: Σ 4ⁿ·lₙ·x over the block, one accumulator per shift.
            let mut s = [[_mm512_setzero_si512(); 4]; T];
            for reg in 0..16 {
                let (j, u) = (reg / 8, reg % 8);
                // Past the matrix's end the address is only a hint (no fault).
                _mm_prefetch::<_MM_HINT_T0>(qs.wrapping_add(64 * reg + AHEAD_TQ2) as *const i8);
                let r = _mm512_loadu_si512(qs.add(64 * reg) as *const _);
                for n in 0..4 {
                    let lv = _mm512_and_si512(r, masks[n]);
                    for t in 0..T {
                        let xw = word(x[t].get_unchecked(b), 32 * j + 8 * n + u);
                        s[t][n] = _mm512_dpbusd_epi32(s[t][n], lv, xw);
                    }
                }
            }
            for t in 0..T {
                let lsum = _mm512_add_epi32(
                    _mm512_add_epi32(s[t][0], _mm512_srai_epi32::<2>(s[t][1])),
                    _mm512_add_epi32(
                        _mm512_srai_epi32::<4>(s[t][2]),
                        _mm512_srai_epi32::<6>(s[t][3]),
                    ),
                );
                let isum = _mm512_sub_epi32(lsum, _mm512_set1_epi32(*xsum[t].get_unchecked(b)));
                let xd = x[t].get_unchecked(b).d;
                acc[t] = _mm512_fmadd_ps(
                    _mm512_cvtepi32_ps(isum),
                    _mm512_mul_ps(d, _mm512_set1_ps(xd)),
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

    /// Bytes times 3, wrapping: two additions.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    #[inline]
    unsafe fn triple(v: __m512i) -> __m512i {
        _mm512_add_epi8(_mm512_add_epi8(v, v), v)
    }

    /// One group of 16 `TQ1_0` rows times `T` activation rows: 16 f32 per activation row.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn group_tq1<const T: usize>(
        w: &RepackedTq,
        g: usize,
        x: [&[BlockQ8K]; T],
        xsum: [&[i32]; T],
    ) -> [[f32; GROUP]; T] {
        let mut acc = [_mm512_setzero_ps(); T];
        for b in 0..w.blocks {
            let gb = g * w.blocks + b;
            let qs = w.qs.as_ptr().add(gb * 13 * 64);
            let d = scales(w, gb);
            // a: Σ qₙ·x, c: Σ qₙ₊₁·x (each x the activation of trit n), two chains each.
            let mut a = [[_mm512_setzero_si512(); 2]; T];
            let mut c = [[_mm512_setzero_si512(); 2]; T];
            for reg in 0..13 {
                let trits = if reg < 12 { 5 } else { 4 };
                let h = reg & 1;
                _mm_prefetch::<_MM_HINT_T0>(qs.wrapping_add(64 * reg + AHEAD_TQ1) as *const i8);
                let mut q = _mm512_loadu_si512(qs.add(64 * reg) as *const _);
                for n in 0..trits {
                    let next = triple(q);
                    for t in 0..T {
                        let xw = word(x[t].get_unchecked(b), tq1_word(reg, n));
                        a[t][h] = _mm512_dpbusd_epi32(a[t][h], q, xw);
                        c[t][h] = _mm512_dpbusd_epi32(c[t][h], next, xw);
                    }
                    q = next;
                }
            }
            for t in 0..T {
                let aa = _mm512_add_epi32(a[t][0], a[t][1]);
                let cc = _mm512_add_epi32(c[t][0], c[t][1]);
                // 256·Σ trit·x = 3·Σ qₙ·x − Σ qₙ₊₁·x, exactly.
                let three_a = _mm512_add_epi32(_mm512_add_epi32(aa, aa), aa);
                let lsum = _mm512_srai_epi32::<8>(_mm512_sub_epi32(three_a, cc));
                let isum = _mm512_sub_epi32(lsum, _mm512_set1_epi32(*xsum[t].get_unchecked(b)));
                let xd = x[t].get_unchecked(b).d;
                acc[t] = _mm512_fmadd_ps(
                    _mm512_cvtepi32_ps(isum),
                    _mm512_mul_ps(d, _mm512_set1_ps(xd)),
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
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! The same layout on CPUs without AVX-512 VNNI: each 64-byte register is read as two
    //! 256-bit halves of 8 rows (one pass over the blocks per half; the second finds the group in
    //! cache), and `vpmaddubsw` takes the place of `vpdpbusd`. Its products are summed in 16 bits,
    //! so the weights enter as levels (0–3), not as the shifted fields or raw base-3 bytes of the
    //! VNNI kernels, whose products would overflow 16 bits. The float work per row and block is
    //! the VNNI kernels' (`fmadd(cvt(isum), d·x.d, acc)`), so both give the same bits.

    use super::{tq1_word, BlockQ8K, RepackedTq, GROUP, QK_K};
    use std::arch::x86_64::*;

    /// Rows per 256-bit half of a register.
    const HALF: usize = GROUP / 2;
    /// Prefetch distance, as in the VNNI kernels (four super-blocks of a group ahead).
    const AHEAD_TQ2: usize = 4 * 16 * 64;
    const AHEAD_TQ1: usize = 4 * 13 * 64;

    /// The 8 scales of rows `8·half..8·half + 8` of group-block `gb`, as f32.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn scales(w: &RepackedTq, gb: usize, half: usize) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(
            w.d.as_ptr().add(gb * GROUP + half * HALF) as *const __m128i
        ))
    }

    /// Activation word `k` (elements `4k..4k + 4`) of a block, in all 8 lanes.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn word(xb: &BlockQ8K, k: usize) -> __m256i {
        debug_assert!(k < QK_K / 4);
        _mm256_set1_epi32((xb.qs.as_ptr() as *const i32).add(k).read_unaligned())
    }

    /// One block's integer sums (`isum`, per lane) into the float accumulator, as the VNNI
    /// kernels do it.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn scale_add(acc: __m256, isum: __m256i, xsum: i32, d: __m256, xd: f32) -> __m256 {
        let isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(xsum));
        _mm256_fmadd_ps(
            _mm256_cvtepi32_ps(isum),
            _mm256_mul_ps(d, _mm256_set1_ps(xd)),
            acc,
        )
    }

    /// One group of 16 `TQ2_0` rows times `T` activation rows (see the VNNI `group_tq2` for the
    /// register order). Levels are `(p >> 2n) & 3`; a 16-bit sum takes 32 products of at most
    /// 2·3·128 in magnitude (any byte, level 3 included) before it is widened.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn group_tq2<const T: usize>(
        w: &RepackedTq,
        g: usize,
        x: [&[BlockQ8K]; T],
        xsum: [&[i32]; T],
    ) -> [[f32; GROUP]; T] {
        if T == 1 {
            let r = group_tq2_decode(w, g, x[0], xsum[0]);
            return std::array::from_fn(|_| r);
        }
        let m3 = _mm256_set1_epi8(3);
        let ones = _mm256_set1_epi16(1);
        let mut out = [[0f32; GROUP]; T];
        for half in 0..2 {
            let mut acc = [_mm256_setzero_ps(); T];
            for b in 0..w.blocks {
                let gb = g * w.blocks + b;
                let qs = w.qs.as_ptr().add(gb * 16 * 64 + 32 * half);
                // Two 16-bit chains per activation row (levels 0, 1 and 2, 3): 32 products each.
                let mut s16 = [[_mm256_setzero_si256(); 2]; T];
                for reg in 0..16 {
                    let (j, u) = (reg / 8, reg % 8);
                    // Past the matrix's end the address is only a hint (no fault).
                    _mm_prefetch::<_MM_HINT_T0>(qs.wrapping_add(64 * reg + AHEAD_TQ2) as *const i8);
                    let r = _mm256_loadu_si256(qs.add(64 * reg) as *const __m256i);
                    let l = [
                        _mm256_and_si256(r, m3),
                        _mm256_and_si256(_mm256_srli_epi16::<2>(r), m3),
                        _mm256_and_si256(_mm256_srli_epi16::<4>(r), m3),
                        _mm256_and_si256(_mm256_srli_epi16::<6>(r), m3),
                    ];
                    for n in 0..4 {
                        for t in 0..T {
                            let xw = word(x[t].get_unchecked(b), 32 * j + 8 * n + u);
                            // Saturating adds (never saturating here: every partial sum is at
                            // most 32·2·3·128) keep LLVM from regrouping the chain into a tree
                            // whose terms all stay live (it spilled them to the stack).
                            s16[t][n / 2] =
                                _mm256_adds_epi16(s16[t][n / 2], _mm256_maddubs_epi16(l[n], xw));
                        }
                    }
                }
                let d = scales(w, gb, half);
                for t in 0..T {
                    let isum = _mm256_add_epi32(
                        _mm256_madd_epi16(s16[t][0], ones),
                        _mm256_madd_epi16(s16[t][1], ones),
                    );
                    let xd = x[t].get_unchecked(b).d;
                    acc[t] = scale_add(acc[t], isum, *xsum[t].get_unchecked(b), d, xd);
                }
            }
            for t in 0..T {
                _mm256_storeu_ps(out[t].as_mut_ptr().add(HALF * half), acc[t]);
            }
        }
        out
    }

    /// [`group_tq2`] for one activation row (decode): both halves of each register in one pass,
    /// so every 64-byte line is read once and every activation word is broadcast once for the 16
    /// rows. Per row the same operations as the tiled form (same bits).
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn group_tq2_decode(
        w: &RepackedTq,
        g: usize,
        x: &[BlockQ8K],
        xsum: &[i32],
    ) -> [f32; GROUP] {
        let m3 = _mm256_set1_epi8(3);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); 2];
        for b in 0..w.blocks {
            let gb = g * w.blocks + b;
            let qs = w.qs.as_ptr().add(gb * 16 * 64);
            let xb = x.get_unchecked(b);
            // [half][chain], as in the tiled form.
            let mut s16 = [[_mm256_setzero_si256(); 2]; 2];
            for reg in 0..16 {
                let (j, u) = (reg / 8, reg % 8);
                _mm_prefetch::<_MM_HINT_T0>(qs.wrapping_add(64 * reg + AHEAD_TQ2) as *const i8);
                let r = [
                    _mm256_loadu_si256(qs.add(64 * reg) as *const __m256i),
                    _mm256_loadu_si256(qs.add(64 * reg + 32) as *const __m256i),
                ];
                for n in 0..4 {
                    let xw = word(xb, 32 * j + 8 * n + u);
                    for h in 0..2 {
                        let l = match n {
                            0 => _mm256_and_si256(r[h], m3),
                            1 => _mm256_and_si256(_mm256_srli_epi16::<2>(r[h]), m3),
                            2 => _mm256_and_si256(_mm256_srli_epi16::<4>(r[h]), m3),
                            _ => _mm256_and_si256(_mm256_srli_epi16::<6>(r[h]), m3),
                        };
                        s16[h][n / 2] =
                            _mm256_adds_epi16(s16[h][n / 2], _mm256_maddubs_epi16(l, xw));
                    }
                }
            }
            for h in 0..2 {
                let isum = _mm256_add_epi32(
                    _mm256_madd_epi16(s16[h][0], ones),
                    _mm256_madd_epi16(s16[h][1], ones),
                );
                acc[h] = scale_add(acc[h], isum, *xsum.get_unchecked(b), scales(w, gb, h), xb.d);
            }
        }
        let mut out = [0f32; GROUP];
        _mm256_storeu_ps(out.as_mut_ptr(), acc[0]);
        _mm256_storeu_ps(out.as_mut_ptr().add(HALF), acc[1]);
        out
    }

    /// Bytes times 3, wrapping: two additions. The empty `asm!` hides the result from LLVM,
    /// which otherwise folds a chain of triplings into byte multiplies by 9, 27 and 81 (no such
    /// instruction: five each, `vpmullw` included).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn triple(v: __m256i) -> __m256i {
        let mut t = _mm256_add_epi8(_mm256_add_epi8(v, v), v);
        std::arch::asm!("/* {0} */", inout(ymm_reg) t, options(pure, nomem, nostack, preserves_flags));
        t
    }

    /// `TRITS` trits of the 8 rows' words at `p` (register `reg`) times the `T` activation rows'
    /// words, into two 16-bit chains per row (even and odd trits: at most 38 products of
    /// 2·2·128, so the saturating adds, there for the reason given in `group_tq2`, never
    /// saturate).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn tq1_reg<const T: usize, const TRITS: usize>(
        p: *const u8,
        reg: usize,
        x: &[&BlockQ8K; T],
        s16: &mut [[__m256i; 2]; T],
    ) {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(AHEAD_TQ1) as *const i8);
        let ge86 = _mm256_set1_epi8((85u8 ^ 0x80) as i8);
        let ge171 = _mm256_set1_epi8((170u8 ^ 0x80) as i8);
        let one8 = _mm256_set1_epi8(1);
        let mut q = _mm256_xor_si256(
            _mm256_loadu_si256(p as *const __m256i),
            _mm256_set1_epi8(0x80u8 as i8),
        );
        for n in 0..TRITS {
            // −1 where q ≥ 86 (resp. 171): trit = (c86 & 1) − c171.
            let c86 = _mm256_cmpgt_epi8(q, ge86);
            let c171 = _mm256_cmpgt_epi8(q, ge171);
            let trit = _mm256_sub_epi8(_mm256_and_si256(c86, one8), c171);
            for t in 0..T {
                let xw = word(x[t], tq1_word(reg, n));
                s16[t][n & 1] = _mm256_adds_epi16(s16[t][n & 1], _mm256_maddubs_epi16(trit, xw));
            }
            if n + 1 < TRITS {
                q = triple(q);
            }
        }
    }

    /// One group of 16 `TQ1_0` rows times `T` activation rows. Trit `n` of byte `q` is
    /// `⌊3q/256⌋ = [q ≥ 86] + [q ≥ 171]`, two signed compares on `q ^ 0x80`; the bytes are
    /// tripled (two additions) from one trit to the next, and tripling commutes with the `^ 0x80`
    /// (`3·(q + 128) ≡ 3q + 128 mod 256`), so the flip is done once per register. Trits are at
    /// most 2, so 16-bit sums hold the products (any byte).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn group_tq1<const T: usize>(
        w: &RepackedTq,
        g: usize,
        x: [&[BlockQ8K]; T],
        xsum: [&[i32]; T],
    ) -> [[f32; GROUP]; T] {
        let ones = _mm256_set1_epi16(1);
        let mut out = [[0f32; GROUP]; T];
        for half in 0..2 {
            let mut acc = [_mm256_setzero_ps(); T];
            for b in 0..w.blocks {
                let gb = g * w.blocks + b;
                let qs = w.qs.as_ptr().add(gb * 13 * 64 + 32 * half);
                let xb: [&BlockQ8K; T] = std::array::from_fn(|t| x[t].get_unchecked(b));
                let mut s16 = [[_mm256_setzero_si256(); 2]; T];
                for reg in 0..12 {
                    tq1_reg::<T, 5>(qs.add(64 * reg), reg, &xb, &mut s16);
                }
                tq1_reg::<T, 4>(qs.add(64 * 12), 12, &xb, &mut s16);
                let d = scales(w, gb, half);
                for t in 0..T {
                    let isum = _mm256_add_epi32(
                        _mm256_madd_epi16(s16[t][0], ones),
                        _mm256_madd_epi16(s16[t][1], ones),
                    );
                    acc[t] = scale_add(acc[t], isum, *xsum[t].get_unchecked(b), d, xb[t].d);
                }
            }
            for t in 0..T {
                _mm256_storeu_ps(out[t].as_mut_ptr().add(HALF * half), acc[t]);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::q8::quantize_q8k;
    use super::super::ternary::dot_scalar;
    use super::super::tests::random_blocks;
    use super::*;
    use crate::kernels::cpu_matmul::{has_avx2_fma_f16c, has_avx512_vnni};

    #[test]
    fn repacked_rows_rebuild_the_file_blocks() {
        for ty in [GgmlType::TQ1_0, GgmlType::TQ2_0] {
            let (rows, blocks) = (32, 3);
            let data = random_blocks(ty, rows * blocks, 7 + ty.id as u64);
            let rep = RepackedTq::new(ty, &data, rows, blocks);
            let rb = blocks * ty.block_bytes;
            for r in 0..rows {
                assert_eq!(
                    rep.row_blocks(r),
                    &data[r * rb..(r + 1) * rb],
                    "{ty} row {r}"
                );
            }
        }
    }

    /// The group kernels this CPU runs: AVX2 (`vnni: false`) and AVX-512 VNNI.
    fn kernels() -> Vec<bool> {
        let mut k = Vec::new();
        if has_avx2_fma_f16c() {
            k.push(false);
        }
        if has_avx512_vnni() {
            k.push(true);
        }
        k
    }

    fn run(rep: &RepackedTq, xq: &[BlockQ8K], m: usize) -> Vec<f32> {
        let mut out = vec![0f32; rep.rows * m];
        // SAFETY: only kernels() of this CPU are chosen (`vnni` set by the tests from it).
        unsafe { rep.run_groups(0, xq, m, &mut out) };
        out
    }

    /// The integer sums are exact, so against the scalar dot only the float order differs; and
    /// each row's value is the same bits alone (tile of 1) or in a tile of 4; AVX2 and VNNI
    /// kernels alike (random bytes: `TQ2_0` level 3 and every `TQ1_0` byte value occur).
    #[test]
    fn repacked_kernel_matches_the_scalar_dot_and_is_batch_invariant() {
        let (rows, blocks, m) = (32, 3, 6);
        let xs: Vec<f32> = (0..m * blocks * QK_K)
            .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 97.0)
            .collect();
        let mut xq = quantize_q8k(&xs, true);
        // Extremes: a block of −128 (the 16-bit sums' bound) and one of 127.
        xq[1].qs = [-128; QK_K];
        xq[2].qs = [127; QK_K];
        for b in &mut xq[1..3] {
            for (g, s) in b.bsums.iter_mut().enumerate() {
                *s = b.qs[16 * g..16 * (g + 1)].iter().map(|&q| q as i16).sum();
            }
        }
        for vnni in kernels() {
            for ty in [GgmlType::TQ1_0, GgmlType::TQ2_0] {
                let mut data = random_blocks(ty, rows * blocks, 3 + ty.id as u64);
                if ty == GgmlType::TQ2_0 {
                    // Row 0 all level 2 and row 1 all level 3 (not written by quantizers, but
                    // read by the reference): the largest 16-bit partial sums.
                    for (r, byte) in [(0, 0xAA), (1, 0xFF)] {
                        for b in data[r * blocks * 66..(r + 1) * blocks * 66].chunks_exact_mut(66) {
                            b[..64].fill(byte);
                        }
                    }
                }
                let mut rep = RepackedTq::new(ty, &data, rows, blocks);
                rep.vnni = vnni;
                let out = run(&rep, &xq, m);
                let rb = blocks * ty.block_bytes;
                for r in 0..rows {
                    for i in 0..m {
                        let want = dot_scalar(
                            ty,
                            &data[r * rb..(r + 1) * rb],
                            &xq[i * blocks..(i + 1) * blocks],
                        );
                        let got = out[r * m + i];
                        assert!(
                            (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                            "{ty} vnni={vnni} row {r} act {i}: {got} vs {want}"
                        );
                    }
                }
                for i in 0..m {
                    let solo = run(&rep, &xq[i * blocks..(i + 1) * blocks], 1);
                    for r in 0..rows {
                        assert_eq!(
                            solo[r].to_bits(),
                            out[r * m + i].to_bits(),
                            "{ty} vnni={vnni} {r} {i}"
                        );
                    }
                }
            }
        }
    }

    /// The AVX2 and VNNI kernels do the same float work per row on exact integer sums: the same
    /// bits, so a model gives the same logits with or without AVX-512.
    #[test]
    fn avx2_and_vnni_kernels_give_the_same_bits() {
        if kernels().len() < 2 {
            return;
        }
        let (rows, blocks, m) = (48, 2, 5);
        let xs: Vec<f32> = (0..m * blocks * QK_K)
            .map(|i| ((i * 4099 % 877) as f32 - 430.0) / 61.0)
            .collect();
        let xq = quantize_q8k(&xs, true);
        for ty in [GgmlType::TQ1_0, GgmlType::TQ2_0] {
            let data = random_blocks(ty, rows * blocks, 11 + ty.id as u64);
            let mut rep = RepackedTq::new(ty, &data, rows, blocks);
            rep.vnni = true;
            let a = run(&rep, &xq, m);
            rep.vnni = false;
            let b = run(&rep, &xq, m);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a), bits(&b), "{ty}");
        }
    }
}
