//! The k-quant GGUF super-block formats: `Q2_K`, `Q3_K`, `Q4_K`, `Q5_K`, `Q6_K` (256 elements
//! each, ggml-common.h).
//!
//! Every format is, per group `g` of 16 elements, `w = da · sc[g] · q − db · mn[g]` with `q`
//! unsigned levels: `Q4_K`/`Q5_K`/`Q2_K` store a scale and a min per group (`db` = `dmin`),
//! `Q6_K`/`Q3_K` a signed scale with a fixed offset of 32 / 4 levels (`mn = 32·sc`, `4·sc`,
//! `db = d`). With [`BlockQ8K`] activations a super-block's dot is
//! `x.d · (da · Σ_g sc[g]·Σ q·xq − db · Σ_g mn[g]·bsum[g])`: every product in integers. That one
//! shape serves all five formats — each only says how to unpack its bits ([`Unpacked`]) — in
//! the scalar reference and in the AVX2 kernel.
//!
//! [`dequantize_block`] follows gguf-py's `gguf.quants` dequantizers operation for operation (the
//! tests check it bit for bit); it is written apart from the unpacking so each checks the other.

use super::q8::{BlockQ8K, QK_K};
use crate::kernels::ggml_types::GgmlType;
use half::f16;

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// `Q4_K`/`Q5_K`'s 12 bytes of packed 6-bit scales and mins → (8 scales, 8 mins).
pub(super) fn k4_scales_mins(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for j in 0..4 {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 6) << 4);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
    (sc, mn)
}

/// `Q3_K`'s 12 bytes of packed 6-bit scales → 16 signed scales.
fn q3k_scales(s: &[u8]) -> [i8; 16] {
    std::array::from_fn(|i| {
        let lo = (s[i % 8] >> (4 * (i / 8))) & 0x0F;
        let hi = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
        (lo | (hi << 4)) as i8 - 32
    })
}

/// One super-block as f32 values, exactly as gguf-py's reference dequantizer computes them.
pub fn dequantize_block(ty: GgmlType, b: &[u8], out: &mut [f32]) {
    match ty {
        GgmlType::Q2_K => {
            let (scales, qs) = (&b[..16], &b[16..80]);
            let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
            for (e, o) in out.iter_mut().enumerate().take(QK_K) {
                let (n, j, l) = (e / 128, (e / 32) % 4, e % 32);
                let sc = scales[e / 16];
                let dl = d * (sc & 0x0F) as f32;
                let ml = dmin * (sc >> 4) as f32;
                let q = (qs[32 * n + l] >> (2 * j)) & 3;
                *o = dl * q as f32 - ml;
            }
        }
        GgmlType::Q3_K => {
            let (hmask, qs) = (&b[..32], &b[32..96]);
            let scales = q3k_scales(&b[96..108]);
            let d = f16_at(b, 108);
            for (e, o) in out.iter_mut().enumerate().take(QK_K) {
                let (n, j, l) = (e / 128, (e / 32) % 4, e % 32);
                let low = ((qs[32 * n + l] >> (2 * j)) & 3) as i8;
                let high = (hmask[l] >> (e / 32)) & 1;
                let q = low - (((high ^ 1) << 2) as i8);
                let dl = d * scales[e / 16] as f32;
                *o = dl * q as f32;
            }
        }
        GgmlType::Q4_K | GgmlType::Q5_K => {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let (sc, mn) = k4_scales_mins(&b[4..16]);
            let (qh, qs) = if ty == GgmlType::Q5_K {
                (Some(&b[16..48]), &b[48..176])
            } else {
                (None, &b[16..144])
            };
            for (e, o) in out.iter_mut().enumerate().take(QK_K) {
                let s = e / 32;
                let (c, h, l) = (e / 64, s % 2, e % 32);
                let mut q = (qs[32 * c + l] >> (4 * h)) & 0x0F;
                if let Some(qh) = qh {
                    q |= ((qh[l] >> s) & 1) << 4;
                }
                let dl = d * sc[s] as f32;
                let ml = dmin * mn[s] as f32;
                *o = dl * q as f32 - ml;
            }
        }
        GgmlType::Q6_K => {
            let (ql, qh, scales) = (&b[..128], &b[128..192], &b[192..208]);
            let d = f16_at(b, 208);
            for (e, o) in out.iter_mut().enumerate().take(QK_K) {
                let (n, j, l) = (e / 128, (e / 32) % 4, e % 32);
                let low = (ql[64 * n + e % 64] >> (4 * ((e / 64) % 2))) & 0x0F;
                let high = (qh[32 * n + l] >> (2 * j)) & 3;
                let q = (low | (high << 4)) as i8 - 32;
                let dl = d * scales[e / 16] as i8 as f32;
                *o = dl * q as f32;
            }
        }
        _ => unreachable!("{ty} is not a k-quant"),
    }
}

/// A super-block in the common form: `w[e] = da·scales[g]·q[e] − db·mins[g]`, `g = e / 16`.
pub(super) struct Unpacked {
    pub q: [u8; QK_K],
    pub scales: [i8; 16],
    pub mins: [i16; 16],
    pub da: f32,
    pub db: f32,
}

/// The scalar unpacking of every k-quant (the reference the AVX2 kernel is checked against).
/// Indexed loops: they read as the layout definitions do.
#[allow(clippy::needless_range_loop)]
pub(super) fn unpack(ty: GgmlType, b: &[u8]) -> Unpacked {
    let mut u = Unpacked {
        q: [0; QK_K],
        scales: [0; 16],
        mins: [0; 16],
        da: 0.0,
        db: 0.0,
    };
    match ty {
        GgmlType::Q2_K => {
            for e in 0..QK_K {
                let (n, j, l) = (e / 128, (e / 32) % 4, e % 32);
                u.q[e] = (b[16 + 32 * n + l] >> (2 * j)) & 3;
            }
            for g in 0..16 {
                u.scales[g] = (b[g] & 0x0F) as i8;
                u.mins[g] = (b[g] >> 4) as i16;
            }
            (u.da, u.db) = (f16_at(b, 80), f16_at(b, 82));
        }
        GgmlType::Q3_K => {
            for e in 0..QK_K {
                let (n, j, l) = (e / 128, (e / 32) % 4, e % 32);
                let low = (b[32 + 32 * n + l] >> (2 * j)) & 3;
                let high = (b[l] >> (e / 32)) & 1;
                u.q[e] = low | (high << 2);
            }
            u.scales = q3k_scales(&b[96..108]);
            for g in 0..16 {
                u.mins[g] = 4 * u.scales[g] as i16;
            }
            u.da = f16_at(b, 108);
            u.db = u.da;
        }
        GgmlType::Q4_K | GgmlType::Q5_K => {
            let (sc, mn) = k4_scales_mins(&b[4..16]);
            let qs_at = if ty == GgmlType::Q5_K { 48 } else { 16 };
            for e in 0..QK_K {
                let s = e / 32;
                let (c, h, l) = (e / 64, s % 2, e % 32);
                u.q[e] = (b[qs_at + 32 * c + l] >> (4 * h)) & 0x0F;
                if ty == GgmlType::Q5_K {
                    u.q[e] |= ((b[16 + l] >> s) & 1) << 4;
                }
            }
            for g in 0..16 {
                u.scales[g] = sc[g / 2] as i8;
                u.mins[g] = mn[g / 2] as i16;
            }
            (u.da, u.db) = (f16_at(b, 0), f16_at(b, 2));
        }
        GgmlType::Q6_K => {
            for e in 0..QK_K {
                let (n, j, l) = (e / 128, (e / 32) % 4, e % 32);
                let low = (b[64 * n + e % 64] >> (4 * ((e / 64) % 2))) & 0x0F;
                let high = (b[128 + 32 * n + l] >> (2 * j)) & 3;
                u.q[e] = low | (high << 4);
            }
            for g in 0..16 {
                u.scales[g] = b[192 + g] as i8;
                u.mins[g] = 32 * u.scales[g] as i16;
            }
            u.da = f16_at(b, 208);
            u.db = u.da;
        }
        _ => unreachable!("{ty} is not a k-quant"),
    }
    u
}

/// One weight row dotted with one row of activation super-blocks (portable reference).
pub(super) fn dot_scalar(ty: GgmlType, w: &[u8], x: &[BlockQ8K]) -> f32 {
    let mut acc = 0f32;
    for (b, x) in w.chunks_exact(ty.block_bytes).zip(x) {
        let u = unpack(ty, b);
        let mut sumi = 0i32;
        let mut off = 0i32;
        for g in 0..16 {
            let s: i32 = (16 * g..16 * g + 16)
                .map(|e| u.q[e] as i32 * x.qs[e] as i32)
                .sum();
            sumi += u.scales[g] as i32 * s;
            off += u.mins[g] as i32 * x.bsums[g] as i32;
        }
        acc += x.d * (u.da * sumi as f32 - u.db * off as f32);
    }
    acc
}

/// The AVX2 kernel: one unpacking per format into registers, one shared dot (`F` is the GGUF
/// type id, so each format compiles to its own loop).
#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use super::super::q8::BlockQ8K;
    use crate::kernels::cpu_matmul::hsum;
    use std::arch::x86_64::*;

    /// [`super::Unpacked`] in registers: 8 × 32 levels, the 16 group scales as i8, the 16 mins
    /// as i16.
    struct Unpacked {
        q: [__m256i; 8],
        scales: __m128i,
        mins: __m256i,
        da: f32,
        db: f32,
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn f16_at(b: *const u8, at: usize) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
            (b.add(at) as *const u16).read_unaligned() as i32,
        )))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load(b: *const u8) -> __m256i {
        _mm256_loadu_si256(b as *const __m256i)
    }

    /// 2-bit fields: `v >> 0, 2, 4, 6` masked to two bits (levels of four 32-element groups).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn crumbs(v: __m256i) -> [__m256i; 4] {
        let m3 = _mm256_set1_epi8(3);
        [
            _mm256_and_si256(v, m3),
            _mm256_and_si256(_mm256_srli_epi16(v, 2), m3),
            _mm256_and_si256(_mm256_srli_epi16(v, 4), m3),
            _mm256_and_si256(_mm256_srli_epi16(v, 6), m3),
        ]
    }

    /// `Q4_K`/`Q5_K` scales and mins (12 packed bytes) as (16 i8 scales, 16 i16 mins), each
    /// 32-element value repeated for both of its 16-element groups.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn k4_scales(s: *const u8) -> (__m128i, __m256i) {
        const KMASK1: u32 = 0x3f3f_3f3f;
        const KMASK2: u32 = 0x0f0f_0f0f;
        const KMASK3: u32 = 0x0303_0303;
        let u = |i: usize| (s.add(4 * i) as *const u32).read_unaligned();
        let (u0, u1, u2) = (u(0), u(1), u(2));
        let sc_lo = u0 & KMASK1;
        let sc_hi = (u2 & KMASK2) | (((u0 >> 6) & KMASK3) << 4);
        let mn_lo = u1 & KMASK1;
        let mn_hi = ((u2 >> 4) & KMASK2) | (((u1 >> 6) & KMASK3) << 4);
        let v = _mm_set_epi32(mn_hi as i32, mn_lo as i32, sc_hi as i32, sc_lo as i32);
        let scales = _mm_unpacklo_epi8(v, v);
        let mins = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(v, v));
        (scales, mins)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn unpack<const F: u32>(b: *const u8) -> Unpacked {
        let m4 = _mm256_set1_epi8(0x0F);
        match F {
            // Q2_K: scales[16] | qs[64] | d | dmin.
            10 => {
                let s = _mm_loadu_si128(b as *const __m128i);
                let m4x = _mm_set1_epi8(0x0F);
                let [a0, a1, a2, a3] = crumbs(load(b.add(16)));
                let [b0, b1, b2, b3] = crumbs(load(b.add(48)));
                Unpacked {
                    q: [a0, a1, a2, a3, b0, b1, b2, b3],
                    scales: _mm_and_si128(s, m4x),
                    mins: _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(s, 4), m4x)),
                    da: f16_at(b, 80),
                    db: f16_at(b, 82),
                }
            }
            // Q3_K: hmask[32] | qs[64] | scales[12] | d.
            11 => {
                let s = super::q3k_scales(std::slice::from_raw_parts(b.add(96), 12));
                let scales = _mm_loadu_si128(s.as_ptr() as *const __m128i);
                let lo = crumbs(load(b.add(32)));
                let hi = crumbs(load(b.add(64)));
                let mut hm = load(b);
                let one = _mm256_set1_epi8(1);
                let q = std::array::from_fn(|k| {
                    let low = if k < 4 { lo[k] } else { hi[k - 4] };
                    let h = _mm256_and_si256(hm, one);
                    hm = _mm256_srli_epi16(hm, 1);
                    _mm256_or_si256(low, _mm256_slli_epi16(h, 2))
                });
                Unpacked {
                    q,
                    scales,
                    mins: _mm256_slli_epi16(_mm256_cvtepi8_epi16(scales), 2),
                    da: f16_at(b, 108),
                    db: f16_at(b, 108),
                }
            }
            // Q4_K: d | dmin | scales[12] | qs[128].
            12 => {
                let (scales, mins) = k4_scales(b.add(4));
                let mut q = [_mm256_setzero_si256(); 8];
                for c in 0..4 {
                    let v = load(b.add(16 + 32 * c));
                    q[2 * c] = _mm256_and_si256(v, m4);
                    q[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                }
                Unpacked {
                    q,
                    scales,
                    mins,
                    da: f16_at(b, 0),
                    db: f16_at(b, 2),
                }
            }
            // Q5_K: d | dmin | scales[12] | qh[32] | qs[128].
            13 => {
                let (scales, mins) = k4_scales(b.add(4));
                let mut hb = load(b.add(16));
                let one = _mm256_set1_epi8(1);
                let mut q = [_mm256_setzero_si256(); 8];
                for c in 0..4 {
                    let v = load(b.add(48 + 32 * c));
                    let h0 = _mm256_slli_epi16(_mm256_and_si256(hb, one), 4);
                    hb = _mm256_srli_epi16(hb, 1);
                    let h1 = _mm256_slli_epi16(_mm256_and_si256(hb, one), 4);
                    hb = _mm256_srli_epi16(hb, 1);
                    q[2 * c] = _mm256_or_si256(_mm256_and_si256(v, m4), h0);
                    q[2 * c + 1] =
                        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), m4), h1);
                }
                Unpacked {
                    q,
                    scales,
                    mins,
                    da: f16_at(b, 0),
                    db: f16_at(b, 2),
                }
            }
            // Q6_K: ql[128] | qh[64] | scales[16] | d.
            _ => {
                let scales = _mm_loadu_si128(b.add(192) as *const __m128i);
                let mut q = [_mm256_setzero_si256(); 8];
                for n in 0..2 {
                    let ql0 = load(b.add(64 * n));
                    let ql1 = load(b.add(64 * n + 32));
                    let h = crumbs(load(b.add(128 + 32 * n)));
                    let hi = |k: usize| _mm256_slli_epi16(h[k], 4);
                    q[4 * n] = _mm256_or_si256(_mm256_and_si256(ql0, m4), hi(0));
                    q[4 * n + 1] = _mm256_or_si256(_mm256_and_si256(ql1, m4), hi(1));
                    q[4 * n + 2] =
                        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4), hi(2));
                    q[4 * n + 3] =
                        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4), hi(3));
                }
                Unpacked {
                    q,
                    scales,
                    mins: _mm256_slli_epi16(_mm256_cvtepi8_epi16(scales), 5),
                    da: f16_at(b, 208),
                    db: f16_at(b, 208),
                }
            }
        }
    }

    const fn bytes<const F: u32>() -> usize {
        match F {
            10 => 84,
            11 => 110,
            12 => 144,
            13 => 176,
            _ => 210,
        }
    }

    /// `pshufb` controls putting group scale `2k` in bytes 0..8 and `2k + 1` in bytes 8..16.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn scale_pair(scales: __m128i, k: usize) -> __m256i {
        let lo = (2 * k) as i8;
        let hi = lo + 1;
        let ctl = _mm_setr_epi8(
            lo, lo, lo, lo, lo, lo, lo, lo, hi, hi, hi, hi, hi, hi, hi, hi,
        );
        _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, ctl))
    }

    /// One weight row dotted with `N` activation rows (`x[r]`, one super-block per weight
    /// super-block): each weight super-block is unpacked once for all of them.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::needless_range_loop)]
    pub unsafe fn dot_n<const F: u32, const N: usize>(w: &[u8], x: [&[BlockQ8K]; N]) -> [f32; N] {
        let bb = bytes::<F>();
        let blocks = w.len() / bb;
        let mut acc = [_mm256_setzero_ps(); N];
        let mut acc_off = [_mm256_setzero_ps(); N];
        for i in 0..blocks {
            let u = unpack::<F>(w.as_ptr().add(i * bb));
            let sc: [__m256i; 8] = std::array::from_fn(|k| scale_pair(u.scales, k));
            for r in 0..N {
                let xb = x[r].get_unchecked(i);
                let xq = xb.qs.as_ptr();
                let mut sumi = _mm256_setzero_si256();
                for k in 0..8 {
                    let x8 = _mm256_load_si256(xq.add(32 * k) as *const __m256i);
                    let p16 = _mm256_maddubs_epi16(u.q[k], x8);
                    sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p16, sc[k]));
                }
                let bs = _mm256_loadu_si256(xb.bsums.as_ptr() as *const __m256i);
                let off = _mm256_madd_epi16(u.mins, bs);
                acc[r] = _mm256_fmadd_ps(
                    _mm256_set1_ps(u.da * xb.d),
                    _mm256_cvtepi32_ps(sumi),
                    acc[r],
                );
                acc_off[r] = _mm256_fmadd_ps(
                    _mm256_set1_ps(u.db * xb.d),
                    _mm256_cvtepi32_ps(off),
                    acc_off[r],
                );
            }
        }
        std::array::from_fn(|r| hsum(acc[r]) - hsum(acc_off[r]))
    }
}

#[cfg(test)]
mod tests {
    use super::super::q8::quantize_q8k;
    use super::super::tests::random_blocks;
    use super::*;
    use crate::kernels::cpu_matmul::has_avx2_fma_f16c;

    const TYPES: [GgmlType; 5] = [
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ];

    #[test]
    #[allow(clippy::needless_range_loop)]
    fn unpacked_form_reconstructs_the_reference_values() {
        for ty in TYPES {
            let b = random_blocks(ty, 1, 7 + ty.id as u64);
            let mut want = [0f32; QK_K];
            dequantize_block(ty, &b, &mut want);
            let u = unpack(ty, &b);
            for e in 0..QK_K {
                let g = e / 16;
                let got = u.da * u.scales[g] as f32 * u.q[e] as f32 - u.db * u.mins[g] as f32;
                let tol = 1e-5 * (u.da.abs() + u.db.abs()) * 64.0 * 64.0;
                assert!(
                    (got - want[e]).abs() <= tol,
                    "{ty} [{e}]: {got} vs {}",
                    want[e]
                );
            }
        }
    }

    #[test]
    fn avx2_dot_matches_the_scalar_dot() {
        if !has_avx2_fma_f16c() {
            return;
        }
        let nb = 3;
        let xs: Vec<f32> = (0..4 * nb * QK_K)
            .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 97.0)
            .collect();
        let xq = quantize_q8k(&xs, true);
        let x: [&[BlockQ8K]; 4] = std::array::from_fn(|r| &xq[r * nb..(r + 1) * nb]);
        for ty in TYPES {
            let w = random_blocks(ty, nb, ty.id as u64);
            let want: Vec<f32> = x.iter().map(|x| dot_scalar(ty, &w, x)).collect();
            // SAFETY: features detected above.
            let (one, four) = unsafe {
                match ty.id {
                    10 => (
                        avx2::dot_n::<10, 1>(&w, [x[0]]),
                        avx2::dot_n::<10, 4>(&w, x),
                    ),
                    11 => (
                        avx2::dot_n::<11, 1>(&w, [x[0]]),
                        avx2::dot_n::<11, 4>(&w, x),
                    ),
                    12 => (
                        avx2::dot_n::<12, 1>(&w, [x[0]]),
                        avx2::dot_n::<12, 4>(&w, x),
                    ),
                    13 => (
                        avx2::dot_n::<13, 1>(&w, [x[0]]),
                        avx2::dot_n::<13, 4>(&w, x),
                    ),
                    _ => (
                        avx2::dot_n::<14, 1>(&w, [x[0]]),
                        avx2::dot_n::<14, 4>(&w, x),
                    ),
                }
            };
            for (a, b) in four.iter().chain(&one).zip(want.iter().chain(&want[..1])) {
                assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{ty}: {a} vs {b}");
            }
        }
    }
}
