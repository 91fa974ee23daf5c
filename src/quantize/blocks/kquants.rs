//! K-quant super-blocks (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K; 256 elements each): ggml's reference
//! quantizers (`quantize_row_q*_K_ref` and their helpers in ggml-quants.c), reimplemented with the
//! same float operation order so the bytes match llama-quantize's without an importance matrix.
//!
//! With an importance matrix (`--imatrix`) Q2_K..Q5_K go through `super::weighted` instead
//! (llama.cpp's `quantize_row_*_impl`); Q6_K's weighted path is here (`q6_k` with `Some`).

// Index loops mirror ggml's reference code, which keeps the float operation order reviewable.
#![allow(clippy::needless_range_loop)]

use half::f16;

use super::super::types::QK_K;

const GROUP_MAX_EPS: f32 = 1e-15;

/// ggml's `nearest_int`: round half to even through the 1.5·2^23 trick (valid for |x| < 2^22).
#[inline]
pub(super) fn nearest_int(x: f32) -> i32 {
    let v = x + 12_582_912.0f32;
    (v.to_bits() as i32 & 0x007f_ffff) - 0x0040_0000
}

pub(super) fn f16_round(v: f32) -> (u16, f32) {
    let h = f16::from_f32(v);
    (h.to_bits(), h.to_f32())
}

fn get_f16(b: &[u8]) -> f32 {
    f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// `make_qx_quants`: symmetric scale for `nmax` levels each side; `rmse_type` 1 = x² weights.
pub(super) fn make_qx_quants(
    x: &[f32],
    nmax: i32,
    l_out: &mut [i8],
    rmse_type: i32,
    qw: Option<&[f32]>,
) -> f32 {
    let n = x.len();
    let (mut max, mut amax) = (0.0f32, 0.0f32);
    for &v in x {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l_out[..n].iter_mut().for_each(|l| *l = 0);
        return 0.0;
    }
    let mut iscale = -(nmax as f32) / max;
    if rmse_type == 0 {
        for i in 0..n {
            let l = nearest_int(iscale * x[i]);
            l_out[i] = (nmax + l.clamp(-nmax, nmax - 1)) as i8;
        }
        return 1.0 / iscale;
    }
    let weight = |i: usize| -> f32 {
        match qw {
            Some(w) => w[i],
            None => match rmse_type {
                1 => x[i] * x[i],
                2 => 1.0,
                3 => x[i].abs(),
                _ => x[i].abs().sqrt(),
            },
        }
    };
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for i in 0..n {
        let l = nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1);
        l_out[i] = (l + nmax) as i8;
        let w = weight(i);
        sumlx += w * x[i] * l as f32;
        suml2 += w * l as f32 * l as f32;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        let (mut slx, mut sl2) = (0.0f32, 0.0f32);
        for i in 0..n {
            let l = nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1);
            let w = weight(i);
            slx += w * x[i] * l as f32;
            sl2 += w * l as f32 * l as f32;
        }
        if sl2 > 0.0 && slx * slx > best * sl2 {
            for i in 0..n {
                let l = nearest_int(iscale * x[i]);
                l_out[i] = (nmax + l.clamp(-nmax, nmax - 1)) as i8;
            }
            scale = slx / sl2;
            best = scale * slx;
        }
    }
    scale
}

/// Q6_K's 16 sub-block scales without importance weights: `make_qx_quants(16, 32, x, L, 1, NULL)`
/// for all 16 sub-blocks at once, one sub-block per lane. Each lane does ggml's float operations
/// in ggml's order (so the bytes stay llama-quantize's), but the lanes are independent, so the
/// compiler vectorizes across them; the scalar search is one chain of dependent adds per
/// sub-block and made Q6_K 0.78x llama-quantize's speed. Written by hand because no kept crate
/// offers ggml's search; `make_qx_quants` above stays the reference (and the weighted path).
fn q6_sub_scales(x: &[f32], l_out: &mut [i8]) -> [f32; 16] {
    const NMAX: i32 = 32;
    // Transposed: xt[i][j] = element i of sub-block j (lanes contiguous).
    let mut xt = [[0.0f32; 16]; 16];
    let mut lt = [[0i8; 16]; 16];
    for j in 0..16 {
        for i in 0..16 {
            xt[i][j] = x[16 * j + i];
        }
    }
    let (mut max, mut amax) = ([0.0f32; 16], [0.0f32; 16]);
    for row in &xt {
        for j in 0..16 {
            let ax = row[j].abs();
            if ax > amax[j] {
                amax[j] = ax;
                max[j] = row[j];
            }
        }
    }
    // Lanes whose sub-block is all (near) zero give NaN/inf here; they are reset at the end.
    let mut iscale = [0.0f32; 16];
    for j in 0..16 {
        iscale[j] = -(NMAX as f32) / max[j];
    }
    let (mut sumlx, mut suml2) = ([0.0f32; 16], [0.0f32; 16]);
    for i in 0..16 {
        for j in 0..16 {
            let xv = xt[i][j];
            let l = nearest_int(iscale[j] * xv).clamp(-NMAX, NMAX - 1);
            lt[i][j] = (l + NMAX) as i8;
            let w = xv * xv;
            sumlx[j] += w * xv * l as f32;
            suml2[j] += w * l as f32 * l as f32;
        }
    }
    let (mut scale, mut best) = ([0.0f32; 16], [0.0f32; 16]);
    for j in 0..16 {
        scale[j] = if suml2[j] != 0.0 {
            sumlx[j] / suml2[j]
        } else {
            0.0
        };
        best[j] = scale[j] * sumlx[j];
    }
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        for j in 0..16 {
            iscale[j] = -(NMAX as f32 + 0.1 * is as f32) / max[j];
        }
        let (mut slx, mut sl2) = ([0.0f32; 16], [0.0f32; 16]);
        for i in 0..16 {
            for j in 0..16 {
                let xv = xt[i][j];
                let l = nearest_int(iscale[j] * xv).clamp(-NMAX, NMAX - 1);
                let w = xv * xv;
                slx[j] += w * xv * l as f32;
                sl2[j] += w * l as f32 * l as f32;
            }
        }
        let mut better = [false; 16];
        for j in 0..16 {
            better[j] = sl2[j] > 0.0 && slx[j] * slx[j] > best[j] * sl2[j];
            if better[j] {
                scale[j] = slx[j] / sl2[j];
                best[j] = scale[j] * slx[j];
            }
        }
        if better.iter().any(|&b| b) {
            for i in 0..16 {
                for j in 0..16 {
                    if better[j] {
                        let l = nearest_int(iscale[j] * xt[i][j]);
                        lt[i][j] = (NMAX + l.clamp(-NMAX, NMAX - 1)) as i8;
                    }
                }
            }
        }
    }
    for j in 0..16 {
        if amax[j] < GROUP_MAX_EPS {
            scale[j] = 0.0;
            for row in lt.iter_mut() {
                row[j] = 0;
            }
        }
        for i in 0..16 {
            l_out[16 * j + i] = lt[i][j];
        }
    }
    scale
}

/// `make_q3_quants` with `do_rmse`: symmetric 3-bit levels refined by coordinate descent. The
/// one-sub-block reference the lanes of [`q3_sub_scales`] are tested against.
#[cfg(test)]
fn make_q3_quants(x: &[f32], nmax: i32, l_out: &mut [i8]) -> f32 {
    let n = x.len();
    let (mut max, mut amax) = (0.0f32, 0.0f32);
    for &v in x {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l_out[..n].iter_mut().for_each(|l| *l = 0);
        return 0.0;
    }
    let iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    let mut l_i = [0i32; 16];
    for i in 0..n {
        let l = nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1);
        l_i[i] = l;
        let w = x[i] * x[i];
        sumlx += w * x[i] * l as f32;
        suml2 += w * l as f32 * l as f32;
    }
    for _ in 0..5 {
        let mut n_changed = 0;
        for i in 0..n {
            let w = x[i] * x[i];
            let mut slx = sumlx - w * x[i] * l_i[i] as f32;
            if slx > 0.0 {
                let mut sl2 = suml2 - w * l_i[i] as f32 * l_i[i] as f32;
                let new_l = nearest_int(x[i] * sl2 / slx).clamp(-nmax, nmax - 1);
                if new_l != l_i[i] {
                    slx += w * x[i] * new_l as f32;
                    sl2 += w * new_l as f32 * new_l as f32;
                    if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                        l_i[i] = new_l;
                        sumlx = slx;
                        suml2 = sl2;
                        n_changed += 1;
                    }
                }
            }
        }
        if n_changed == 0 {
            break;
        }
    }
    for i in 0..n {
        l_out[i] = (l_i[i] + nmax) as i8;
    }
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

/// `make_qkx2_quants`: asymmetric scale + min search; returns (scale, -min). The one-sub-block
/// reference the lanes of [`qkx2_lanes`] are tested against, and the imatrix-weighted search
/// (`make_qkx3_quants` in weighted.rs).
#[allow(clippy::too_many_arguments)]
pub(super) fn make_qkx2_quants(
    x: &[f32],
    nmax: i32,
    weights: &[f32],
    l_out: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> (f32, f32) {
    let n = x.len();
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l_out[..n].iter_mut().for_each(|l| *l = 0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l_out[i] = l as u8;
        let diff = scale * l as f32 + min - x[i];
        let diff = if use_mad { diff.abs() } else { diff * diff };
        best_error += weights[i] * diff;
    }
    if nstep < 1 {
        return (scale, -min);
    }
    let mut laux = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = l as u8;
            let w = weights[i];
            let lf = l as f32;
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                let diff = if use_mad { diff.abs() } else { diff * diff };
                cur_error += weights[i] * diff;
            }
            if cur_error < best_error {
                l_out[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

pub(super) fn get_scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Q2_K: scales[16] (4-bit scale | 4-bit min), qs[64], d, dmin. 84 bytes.
pub fn q2_k(x: &[f32], out: &mut [u8]) {
    let mut l = [0u8; QK_K];
    let mut mins = [0.0f32; 16];
    let mut scales = [0.0f32; 16];
    let q4scale = 15.0f32;
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    let (sub_scales, sub_mins) = q2_sub_scales(x, &mut l);
    for j in 0..16 {
        let (s, m) = (sub_scales[j], sub_mins[j]);
        scales[j] = s;
        mins[j] = m;
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    let (sc, rest) = out.split_at_mut(16);
    let (qs, dd) = rest.split_at_mut(64);
    let d;
    if max_scale > 0.0 {
        let iscale = q4scale / max_scale;
        for j in 0..16 {
            sc[j] = nearest_int(iscale * scales[j]) as u8;
        }
        d = f16_round(max_scale / q4scale);
    } else {
        sc.iter_mut().for_each(|s| *s = 0);
        d = f16_round(0.0);
    }
    let dmin = if max_min > 0.0 {
        let iscale = q4scale / max_min;
        for j in 0..16 {
            let lm = nearest_int(iscale * mins[j]);
            sc[j] |= (lm << 4) as u8;
        }
        f16_round(max_min / q4scale)
    } else {
        f16_round(0.0)
    };
    dd[0..2].copy_from_slice(&d.0.to_le_bytes());
    dd[2..4].copy_from_slice(&dmin.0.to_le_bytes());
    for j in 0..16 {
        let dj = d.1 * (sc[j] & 0xF) as f32;
        if dj == 0.0 {
            continue;
        }
        let dm = dmin.1 * (sc[j] >> 4) as f32;
        for ii in 0..16 {
            let q = nearest_int((x[16 * j + ii] + dm) / dj).clamp(0, 3);
            l[16 * j + ii] = q as u8;
        }
    }
    for j in (0..QK_K).step_by(128) {
        for i in 0..32 {
            qs[j / 4 + i] =
                l[j + i] | (l[j + i + 32] << 2) | (l[j + i + 64] << 4) | (l[j + i + 96] << 6);
        }
    }
}

/// Q3_K: hmask[32], qs[64], scales[12] (6-bit signed), d. 110 bytes.
pub fn q3_k(x: &[f32], out: &mut [u8]) {
    let mut l = [0i8; QK_K];
    let mut scales = [0.0f32; 16];
    let (mut max_scale, mut amax) = (0.0f32, 0.0f32);
    let sub = q3_sub_scales(x, &mut l);
    for j in 0..16 {
        scales[j] = sub[j];
        let s = scales[j].abs();
        if s > amax {
            amax = s;
            max_scale = scales[j];
        }
    }
    let (hmask, rest) = out.split_at_mut(32);
    let (qs, rest) = rest.split_at_mut(64);
    let (sc, dd) = rest.split_at_mut(12);
    sc.iter_mut().for_each(|s| *s = 0);
    let d;
    if max_scale != 0.0 {
        let iscale = -32.0 / max_scale;
        for j in 0..16 {
            let lq = nearest_int(iscale * scales[j]) as i8;
            let lq = (lq.clamp(-32, 31) + 32) as u8;
            if j < 8 {
                sc[j] = lq & 0xF;
            } else {
                sc[j - 8] |= (lq & 0xF) << 4;
            }
            let hi = lq >> 4;
            sc[j % 4 + 8] |= hi << (2 * (j / 4));
        }
        d = f16_round(1.0 / iscale);
    } else {
        d = f16_round(0.0);
    }
    dd[0..2].copy_from_slice(&d.0.to_le_bytes());
    for j in 0..16 {
        let lo = if j < 8 { sc[j] & 0xF } else { sc[j - 8] >> 4 };
        let s = (lo | (((sc[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) as i8 - 32;
        let dj = d.1 * s as f32;
        if dj == 0.0 {
            continue;
        }
        for ii in 0..16 {
            let q = nearest_int(x[16 * j + ii] / dj).clamp(-4, 3);
            l[16 * j + ii] = (q + 4) as i8;
        }
    }
    hmask.iter_mut().for_each(|h| *h = 0);
    let (mut m, mut hm) = (0usize, 1u8);
    for lj in l.iter_mut() {
        if *lj > 3 {
            hmask[m] |= hm;
            *lj -= 4;
        }
        m += 1;
        if m == QK_K / 8 {
            m = 0;
            hm <<= 1;
        }
    }
    for j in (0..QK_K).step_by(128) {
        for i in 0..32 {
            qs[j / 4 + i] =
                (l[j + i] | (l[j + i + 32] << 2) | (l[j + i + 64] << 4) | (l[j + i + 96] << 6))
                    as u8;
        }
    }
}

/// Q4_K/Q5_K's 8 sub-block (scale, -min) searches: ggml's `make_qkx2_quants(32, nmax, x, w, L,
/// .., rmin, 0.1, nstep, false)` with `w = av_x + |x|`, run for the 8 sub-blocks at once, one per
/// lane. Each lane does ggml's float operations in ggml's order (the bytes stay
/// llama-quantize's); the lanes are independent, so the compiler vectorizes across them (AVX2
/// when the CPU has it: 8 lanes in one register). The scalar search is a chain of dependent adds
/// per sub-block and left Q4_K_M at 0.99x llama-quantize's speed. Written by hand because no
/// kept crate offers ggml's search; `make_qkx2_quants` stays the one-block reference (tests).
fn q45_sub_scales(
    x: &[f32],
    nmax: i32,
    l: &mut [u8; QK_K],
    rmin: f32,
    nstep: i32,
) -> ([f32; 8], [f32; 8]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked above). No FMA is enabled, and Rust never fuses
            // a multiply and an add on its own, so the results are the same as the plain build.
            return unsafe { q45_sub_scales_avx2(x, nmax, l, rmin, nstep) };
        }
    }
    q45_sub_scales_lanes(x, nmax, l, rmin, nstep)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn q45_sub_scales_avx2(
    x: &[f32],
    nmax: i32,
    l: &mut [u8; QK_K],
    rmin: f32,
    nstep: i32,
) -> ([f32; 8], [f32; 8]) {
    q45_sub_scales_lanes(x, nmax, l, rmin, nstep)
}

#[inline(always)]
fn q45_sub_scales_lanes(
    x: &[f32],
    nmax: i32,
    l: &mut [u8; QK_K],
    rmin: f32,
    nstep: i32,
) -> ([f32; 8], [f32; 8]) {
    // Transposed: xt[i][j] = element i of sub-block j.
    let mut xt = [[0.0f32; 8]; 32];
    for j in 0..8 {
        for i in 0..32 {
            xt[i][j] = x[32 * j + i];
        }
    }
    let mut sum_x2 = [0.0f32; 8];
    for row in &xt {
        for j in 0..8 {
            sum_x2[j] += row[j] * row[j];
        }
    }
    let mut av_x = [0.0f32; 8];
    for j in 0..8 {
        av_x[j] = (sum_x2[j] / 32.0).sqrt();
    }
    let mut wt = [[0.0f32; 8]; 32];
    for i in 0..32 {
        for j in 0..8 {
            wt[i][j] = av_x[j] + xt[i][j].abs();
        }
    }
    let mut lt = [[0u8; 8]; 32];
    let out = qkx2_lanes::<8, 32, false>(&xt, &wt, nmax, rmin, nstep, &mut lt);
    for j in 0..8 {
        for i in 0..32 {
            l[32 * j + i] = lt[i][j];
        }
    }
    out
}

/// ggml's `make_qkx2_quants(N, nmax, x, w, L, .., rmin, 0.1, nstep, MAD)` for `LANES` sub-blocks
/// at once (`xt[i][j]`: element `i` of sub-block `j`, `wt` its weight), one sub-block per lane,
/// each lane in ggml's float operation order. Returns (scale, -min) per lane; levels in `lt`.
#[inline(always)]
fn qkx2_lanes<const LANES: usize, const N: usize, const MAD: bool>(
    xt: &[[f32; LANES]; N],
    wt: &[[f32; LANES]; N],
    nmax: i32,
    rmin: f32,
    nstep: i32,
    lt: &mut [[u8; LANES]; N],
) -> ([f32; LANES], [f32; LANES]) {
    const RDELTA: f32 = 0.1;
    let nmaxf = nmax as f32;
    let err = |d: f32| if MAD { d.abs() } else { d * d };
    let (mut min, mut max, mut sum_w) = (xt[0], xt[0], wt[0]);
    let mut sum_x = [0.0f32; LANES];
    for j in 0..LANES {
        sum_x[j] = sum_w[j] * xt[0][j];
    }
    for i in 1..N {
        for j in 0..LANES {
            let v = xt[i][j];
            if v < min[j] {
                min[j] = v;
            }
            if v > max[j] {
                max[j] = v;
            }
            sum_w[j] += wt[i][j];
            sum_x[j] += wt[i][j] * v;
        }
    }
    for m in &mut min {
        if *m > 0.0 {
            *m = 0.0;
        }
    }
    // Flat sub-blocks (max == min) return early in ggml: levels 0, scale 0. Their lanes compute
    // garbage (inf/NaN) below and are reset at the end.
    let min0 = min;
    let mut scale = [0.0f32; LANES];
    let mut best = [0.0f32; LANES];
    {
        let mut iscale = [0.0f32; LANES];
        for j in 0..LANES {
            iscale[j] = nmaxf / (max[j] - min[j]);
            scale[j] = 1.0 / iscale[j];
        }
        for i in 0..N {
            for j in 0..LANES {
                let q = nearest_int(iscale[j] * (xt[i][j] - min[j])).clamp(0, nmax);
                lt[i][j] = q as u8;
                let diff = scale[j] * q as f32 + min[j] - xt[i][j];
                best[j] += wt[i][j] * err(diff);
            }
        }
    }
    let mut laux = [[0u8; LANES]; N];
    for is in 0..=nstep {
        let mut iscale = [0.0f32; LANES];
        for j in 0..LANES {
            iscale[j] = (rmin + RDELTA * is as f32 + nmaxf) / (max[j] - min[j]);
        }
        let (mut sum_l, mut sum_l2, mut sum_xl) =
            ([0.0f32; LANES], [0.0f32; LANES], [0.0f32; LANES]);
        for i in 0..N {
            for j in 0..LANES {
                let q = nearest_int(iscale[j] * (xt[i][j] - min[j])).clamp(0, nmax);
                laux[i][j] = q as u8;
                let w = wt[i][j];
                let lf = q as f32;
                sum_l[j] += w * lf;
                sum_l2[j] += w * lf * lf;
                sum_xl[j] += w * lf * xt[i][j];
            }
        }
        let (mut this_scale, mut this_min) = ([0.0f32; LANES], [0.0f32; LANES]);
        let mut ok = [false; LANES];
        for j in 0..LANES {
            let d = sum_w[j] * sum_l2[j] - sum_l[j] * sum_l[j];
            ok[j] = d > 0.0;
            this_scale[j] = (sum_w[j] * sum_xl[j] - sum_x[j] * sum_l[j]) / d;
            this_min[j] = (sum_l2[j] * sum_x[j] - sum_l[j] * sum_xl[j]) / d;
            if this_min[j] > 0.0 {
                this_min[j] = 0.0;
                this_scale[j] = sum_xl[j] / sum_l2[j];
            }
        }
        let mut cur = [0.0f32; LANES];
        for i in 0..N {
            for j in 0..LANES {
                let diff = this_scale[j] * laux[i][j] as f32 + this_min[j] - xt[i][j];
                cur[j] += wt[i][j] * err(diff);
            }
        }
        let mut better = [false; LANES];
        for j in 0..LANES {
            better[j] = ok[j] && cur[j] < best[j];
            if better[j] {
                best[j] = cur[j];
                scale[j] = this_scale[j];
                min[j] = this_min[j];
            }
        }
        if better.iter().any(|&b| b) {
            for i in 0..N {
                for j in 0..LANES {
                    if better[j] {
                        lt[i][j] = laux[i][j];
                    }
                }
            }
        }
    }
    let mut neg_min = [0.0f32; LANES];
    for j in 0..LANES {
        if max[j] == min0[j] {
            scale[j] = 0.0;
            neg_min[j] = -min0[j];
            for row in lt.iter_mut() {
                row[j] = 0;
            }
        } else {
            neg_min[j] = -min[j];
        }
    }
    (scale, neg_min)
}

/// Q2_K's 16 sub-block (scale, -min) searches, `make_qkx2_quants(16, 3, x, |x|, L, .., -0.5, 0.1,
/// 15, true)`, as 16 lanes (see [`q45_sub_scales`]; the scalar search left Q2_K at 0.80x
/// llama-quantize's speed).
fn q2_sub_scales(x: &[f32], l: &mut [u8; QK_K]) -> ([f32; 16], [f32; 16]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked above); no FMA, so results equal the plain build.
            return unsafe { q2_sub_scales_avx2(x, l) };
        }
    }
    q2_sub_scales_lanes(x, l)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn q2_sub_scales_avx2(x: &[f32], l: &mut [u8; QK_K]) -> ([f32; 16], [f32; 16]) {
    q2_sub_scales_lanes(x, l)
}

#[inline(always)]
fn q2_sub_scales_lanes(x: &[f32], l: &mut [u8; QK_K]) -> ([f32; 16], [f32; 16]) {
    let mut xt = [[0.0f32; 16]; 16];
    let mut wt = [[0.0f32; 16]; 16];
    for j in 0..16 {
        for i in 0..16 {
            xt[i][j] = x[16 * j + i];
            wt[i][j] = xt[i][j].abs();
        }
    }
    let mut lt = [[0u8; 16]; 16];
    let out = qkx2_lanes::<16, 16, true>(&xt, &wt, 3, -0.5, 15, &mut lt);
    for j in 0..16 {
        for i in 0..16 {
            l[16 * j + i] = lt[i][j];
        }
    }
    out
}

/// Q3_K's 16 sub-block scales, `make_q3_quants(16, 4, x, L, true)`, as 16 lanes: the coordinate
/// descent updates one lane's sums element by element (a dependent chain per sub-block), so the
/// lanes run side by side, each with ggml's operations in ggml's order. A lane whose pass changed
/// nothing would stop in ggml; here it takes the remaining passes, which change nothing either
/// (the same state gives the same decisions), until every lane has stopped.
fn q3_sub_scales(x: &[f32], l: &mut [i8; QK_K]) -> [f32; 16] {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked above); no FMA, so results equal the plain build.
            return unsafe { q3_sub_scales_avx2(x, l) };
        }
    }
    q3_sub_scales_lanes(x, l)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn q3_sub_scales_avx2(x: &[f32], l: &mut [i8; QK_K]) -> [f32; 16] {
    q3_sub_scales_lanes(x, l)
}

#[inline(always)]
fn q3_sub_scales_lanes(x: &[f32], l_out: &mut [i8; QK_K]) -> [f32; 16] {
    const NMAX: i32 = 4;
    let mut xt = [[0.0f32; 16]; 16];
    for j in 0..16 {
        for i in 0..16 {
            xt[i][j] = x[16 * j + i];
        }
    }
    let (mut max, mut amax) = ([0.0f32; 16], [0.0f32; 16]);
    for row in &xt {
        for j in 0..16 {
            let ax = row[j].abs();
            if ax > amax[j] {
                amax[j] = ax;
                max[j] = row[j];
            }
        }
    }
    // All-zero lanes compute inf/NaN here and are reset at the end.
    let mut iscale = [0.0f32; 16];
    for j in 0..16 {
        iscale[j] = -(NMAX as f32) / max[j];
    }
    let (mut sumlx, mut suml2) = ([0.0f32; 16], [0.0f32; 16]);
    let mut li = [[0i32; 16]; 16];
    for i in 0..16 {
        for j in 0..16 {
            let xv = xt[i][j];
            let q = nearest_int(iscale[j] * xv).clamp(-NMAX, NMAX - 1);
            li[i][j] = q;
            let w = xv * xv;
            sumlx[j] += w * xv * q as f32;
            suml2[j] += w * q as f32 * q as f32;
        }
    }
    for _ in 0..5 {
        let mut changed = [false; 16];
        for i in 0..16 {
            for j in 0..16 {
                let xv = xt[i][j];
                let w = xv * xv;
                let old = li[i][j];
                let slx = sumlx[j] - w * xv * old as f32;
                let sl2 = suml2[j] - w * old as f32 * old as f32;
                let new_l = nearest_int(xv * sl2 / slx).clamp(-NMAX, NMAX - 1);
                let slx1 = slx + w * xv * new_l as f32;
                let sl21 = sl2 + w * new_l as f32 * new_l as f32;
                let take = slx > 0.0
                    && new_l != old
                    && sl21 > 0.0
                    && slx1 * slx1 * suml2[j] > sumlx[j] * sumlx[j] * sl21;
                if take {
                    li[i][j] = new_l;
                    sumlx[j] = slx1;
                    suml2[j] = sl21;
                    changed[j] = true;
                }
            }
        }
        if !changed.iter().any(|&c| c) {
            break;
        }
    }
    let mut scale = [0.0f32; 16];
    for j in 0..16 {
        if amax[j] < GROUP_MAX_EPS {
            for i in 0..16 {
                l_out[16 * j + i] = 0;
            }
            continue;
        }
        for i in 0..16 {
            l_out[16 * j + i] = (li[i][j] + NMAX) as i8;
        }
        scale[j] = if suml2[j] > 0.0 {
            sumlx[j] / suml2[j]
        } else {
            0.0
        };
    }
    scale
}

/// Q4_K and Q5_K share the 6-bit scale/min search; `nmax` 15 or 31.
fn q45_scales(
    x: &[f32],
    nmax: i32,
    l: &mut [u8; QK_K],
    (rmin, nstep): (f32, i32),
) -> ([u8; 12], (u16, f32), (u16, f32)) {
    let (scales, mins) = q45_sub_scales(x, nmax, l, rmin, nstep);
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    for j in 0..8 {
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut sc = [0u8; 12];
    for j in 0..8 {
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            sc[j] = ls;
            sc[j + 4] = lm;
        } else {
            sc[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            sc[j - 4] |= (ls >> 4) << 6;
            sc[j] |= (lm >> 4) << 6;
        }
    }
    let d = f16_round(max_scale / 63.0);
    let dmin = f16_round(max_min / 63.0);
    for j in 0..8 {
        let (s, m) = get_scale_min_k4(j, &sc);
        let dj = d.1 * s as f32;
        if dj == 0.0 {
            continue;
        }
        let dm = dmin.1 * m as f32;
        for ii in 0..32 {
            l[32 * j + ii] = nearest_int((x[32 * j + ii] + dm) / dj).clamp(0, nmax) as u8;
        }
    }
    (sc, d, dmin)
}

/// Q4_K: d, dmin, scales[12], qs[128]. 144 bytes.
pub fn q4_k(x: &[f32], out: &mut [u8]) {
    let mut l = [0u8; QK_K];
    let (sc, d, dmin) = q45_scales(x, 15, &mut l, (-1.0, 20));
    out[0..2].copy_from_slice(&d.0.to_le_bytes());
    out[2..4].copy_from_slice(&dmin.0.to_le_bytes());
    out[4..16].copy_from_slice(&sc);
    let q = &mut out[16..144];
    for (c, j) in (0..QK_K).step_by(64).enumerate() {
        for i in 0..32 {
            q[32 * c + i] = l[j + i] | (l[j + i + 32] << 4);
        }
    }
}

/// Q5_K: d, dmin, scales[12], qh[32], qs[128]. 176 bytes.
pub fn q5_k(x: &[f32], out: &mut [u8]) {
    let mut l = [0u8; QK_K];
    let (sc, d, dmin) = q45_scales(x, 31, &mut l, (-0.5, 15));
    out[0..2].copy_from_slice(&d.0.to_le_bytes());
    out[2..4].copy_from_slice(&dmin.0.to_le_bytes());
    out[4..16].copy_from_slice(&sc);
    let (qh, ql) = out[16..176].split_at_mut(32);
    qh.iter_mut().for_each(|h| *h = 0);
    let (mut m1, mut m2) = (1u8, 2u8);
    for (c, n) in (0..QK_K).step_by(64).enumerate() {
        for j in 0..32 {
            let mut l1 = l[n + j];
            if l1 > 15 {
                l1 -= 16;
                qh[j] |= m1;
            }
            let mut l2 = l[n + j + 32];
            if l2 > 15 {
                l2 -= 16;
                qh[j] |= m2;
            }
            ql[32 * c + j] = l1 | (l2 << 4);
        }
        m1 <<= 2;
        m2 <<= 2;
    }
}

/// Q6_K: ql[128], qh[64], scales[16] (i8), d. 210 bytes.
pub fn q6_k(x: &[f32], out: &mut [u8], weights: Option<&[f32]>) {
    let mut l = [0i8; QK_K];
    let mut scales = [0.0f32; 16];
    let (mut max_scale, mut max_abs) = (0.0f32, 0.0f32);
    match weights {
        None => scales = q6_sub_scales(x, &mut l),
        Some(w) => {
            for ib in 0..16 {
                scales[ib] = make_qx_quants(
                    &x[16 * ib..16 * ib + 16],
                    32,
                    &mut l[16 * ib..16 * ib + 16],
                    1,
                    Some(&w[16 * ib..16 * ib + 16]),
                );
            }
        }
    }
    for &s in &scales {
        if s.abs() > max_abs {
            max_abs = s.abs();
            max_scale = s;
        }
    }
    if max_abs < GROUP_MAX_EPS {
        out[..210].iter_mut().for_each(|b| *b = 0);
        return;
    }
    let iscale = -128.0 / max_scale;
    let d = f16_round(1.0 / iscale);
    out[208..210].copy_from_slice(&d.0.to_le_bytes());
    let mut sc = [0i8; 16];
    for ib in 0..16 {
        sc[ib] = nearest_int(iscale * scales[ib]).min(127) as i8;
        out[192 + ib] = sc[ib] as u8;
    }
    for j in 0..16 {
        let dj = d.1 * sc[j] as f32;
        if dj == 0.0 {
            continue;
        }
        for ii in 0..16 {
            let q = nearest_int(x[16 * j + ii] / dj).clamp(-32, 31);
            l[16 * j + ii] = (q + 32) as i8;
        }
    }
    let (ql, rest) = out.split_at_mut(128);
    let qh = &mut rest[..64];
    for (c, j) in (0..QK_K).step_by(128).enumerate() {
        for i in 0..32 {
            let lq = |k: usize| l[j + i + k] as u8;
            ql[64 * c + i] = (lq(0) & 0xF) | ((lq(64) & 0xF) << 4);
            ql[64 * c + i + 32] = (lq(32) & 0xF) | ((lq(96) & 0xF) << 4);
            qh[32 * c + i] =
                (lq(0) >> 4) | ((lq(32) >> 4) << 2) | ((lq(64) >> 4) << 4) | ((lq(96) >> 4) << 6);
        }
    }
}

pub fn dq2_k(b: &[u8], y: &mut [f32]) {
    let (sc, qs) = (&b[0..16], &b[16..80]);
    let d = get_f16(&b[80..]);
    let min = get_f16(&b[82..]);
    let mut o = 0;
    let mut is = 0;
    for n in 0..2 {
        let q = &qs[32 * n..];
        for shift in [0, 2, 4, 6] {
            for half in 0..2 {
                let s = sc[is];
                is += 1;
                let (dl, ml) = (d * (s & 0xF) as f32, min * (s >> 4) as f32);
                for i in 0..16 {
                    y[o] = dl * ((q[i + 16 * half] >> shift) & 3) as f32 - ml;
                    o += 1;
                }
            }
        }
    }
}

pub fn dq3_k(b: &[u8], y: &mut [f32]) {
    let (hm, qs, sc) = (&b[0..32], &b[32..96], &b[96..108]);
    let d_all = get_f16(&b[108..]);
    let mut scales = [0i8; 16];
    for (j, s) in scales.iter_mut().enumerate() {
        let lo = if j < 8 { sc[j] & 0xF } else { sc[j - 8] >> 4 };
        *s = (lo | (((sc[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) as i8 - 32;
    }
    let (mut o, mut is, mut m) = (0usize, 0usize, 1u8);
    for n in 0..2 {
        let q = &qs[32 * n..];
        for shift in [0, 2, 4, 6] {
            for half in 0..2 {
                let dl = d_all * scales[is] as f32;
                is += 1;
                for i in 0..16 {
                    let k = i + 16 * half;
                    let v = ((q[k] >> shift) & 3) as i32 - if hm[k] & m != 0 { 0 } else { 4 };
                    y[o] = dl * v as f32;
                    o += 1;
                }
            }
            m <<= 1;
        }
    }
}

pub fn dq4_k(b: &[u8], y: &mut [f32]) {
    let (d, min) = (get_f16(b), get_f16(&b[2..]));
    let sc = &b[4..16];
    let qs = &b[16..144];
    for c in 0..4 {
        let (s1, m1) = get_scale_min_k4(2 * c, sc);
        let (s2, m2) = get_scale_min_k4(2 * c + 1, sc);
        let q = &qs[32 * c..32 * c + 32];
        for i in 0..32 {
            y[64 * c + i] = d * s1 as f32 * (q[i] & 0xF) as f32 - min * m1 as f32;
            y[64 * c + 32 + i] = d * s2 as f32 * (q[i] >> 4) as f32 - min * m2 as f32;
        }
    }
}

pub fn dq5_k(b: &[u8], y: &mut [f32]) {
    let (d, min) = (get_f16(b), get_f16(&b[2..]));
    let sc = &b[4..16];
    let qh = &b[16..48];
    let ql = &b[48..176];
    let (mut u1, mut u2) = (1u8, 2u8);
    for c in 0..4 {
        let (s1, m1) = get_scale_min_k4(2 * c, sc);
        let (s2, m2) = get_scale_min_k4(2 * c + 1, sc);
        let q = &ql[32 * c..32 * c + 32];
        for i in 0..32 {
            let h1 = if qh[i] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[i] & u2 != 0 { 16 } else { 0 };
            y[64 * c + i] = d * s1 as f32 * ((q[i] & 0xF) + h1) as f32 - min * m1 as f32;
            y[64 * c + 32 + i] = d * s2 as f32 * ((q[i] >> 4) + h2) as f32 - min * m2 as f32;
        }
        u1 <<= 2;
        u2 <<= 2;
    }
}

pub fn dq6_k(b: &[u8], y: &mut [f32]) {
    let d = get_f16(&b[208..]);
    for n in 0..2 {
        let ql = &b[64 * n..];
        let qh = &b[128 + 32 * n..];
        let sc = &b[192 + 8 * n..];
        let yo = &mut y[128 * n..];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            yo[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            yo[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            yo[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            yo[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

/// Q8_K (only read, never written): f32 d, i8 qs[256], i16 bsums[16].
pub fn dq8_k(b: &[u8], y: &mut [f32]) {
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    for i in 0..QK_K {
        y[i] = d * (b[4 + i] as i8) as f32;
    }
}

#[cfg(test)]
pub(crate) fn nearest_int_for_tests(x: f32) -> i32 {
    nearest_int(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 8-lane search gives exactly the scalar `make_qkx2_quants` results, sub-block by
    /// sub-block, including flat and all-positive sub-blocks and with or without AVX2.
    #[test]
    fn lane_search_equals_the_scalar_search() {
        let mut s = 12345u32;
        for case in 0..64 {
            let mut x = [0.0f32; QK_K];
            for (i, v) in x.iter_mut().enumerate() {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                let u = (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
                *v = if i % 37 == 5 { u * 3.0 } else { u * 0.1 };
            }
            if case % 4 == 1 {
                x[64..96].iter_mut().for_each(|v| *v = 0.25); // flat sub-block
            }
            if case % 4 == 2 {
                x[128..160].iter_mut().for_each(|v| *v = v.abs() + 0.01); // min > 0
            }
            for (nmax, rmin, nstep) in [(15, -1.0f32, 20), (31, -0.5, 15)] {
                let mut l_lanes = [0u8; QK_K];
                let (scales, mins) = q45_sub_scales(&x, nmax, &mut l_lanes, rmin, nstep);
                let generic = q45_sub_scales_lanes(&x, nmax, &mut [0u8; QK_K], rmin, nstep);
                assert_eq!(
                    (scales.map(f32::to_bits), mins.map(f32::to_bits)),
                    (generic.0.map(f32::to_bits), generic.1.map(f32::to_bits))
                );
                for j in 0..8 {
                    let xs = &x[32 * j..32 * j + 32];
                    let mut sum_x2 = 0.0f32;
                    for v in xs {
                        sum_x2 += v * v;
                    }
                    let av_x = (sum_x2 / 32.0).sqrt();
                    let w: Vec<f32> = xs.iter().map(|v| av_x + v.abs()).collect();
                    let mut l = [0u8; 32];
                    let (sc, mn) = make_qkx2_quants(xs, nmax, &w, &mut l, rmin, 0.1, nstep, false);
                    assert_eq!(
                        (sc.to_bits(), mn.to_bits()),
                        (scales[j].to_bits(), mins[j].to_bits()),
                        "case {case} nmax {nmax} sub-block {j}"
                    );
                    assert_eq!(&l[..], &l_lanes[32 * j..32 * j + 32]);
                }
            }
        }
    }

    fn test_block(case: u32) -> [f32; QK_K] {
        let mut s = 777u32.wrapping_add(case.wrapping_mul(2_654_435_761)).max(1);
        let mut x = [0.0f32; QK_K];
        for (i, v) in x.iter_mut().enumerate() {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            let u = (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
            *v = if i % 29 == 3 { u * 2.0 } else { u * 0.07 };
        }
        match case % 5 {
            1 => x[48..64].iter_mut().for_each(|v| *v = 0.0), // all-zero sub-block
            2 => x[64..80].iter_mut().for_each(|v| *v = -0.125), // flat sub-block
            3 => x[128..144].iter_mut().for_each(|v| *v = v.abs() + 0.01), // min > 0
            _ => {}
        }
        x
    }

    /// Q2_K's 16 lanes and Q3_K's 16 lanes give exactly the scalar searches' results, sub-block by
    /// sub-block (with AVX2 where the CPU has it, and the plain build).
    #[test]
    fn q2_q3_lanes_equal_the_scalar_searches() {
        for case in 0..80 {
            let x = test_block(case);
            let mut l2 = [0u8; QK_K];
            let (scales, mins) = q2_sub_scales(&x, &mut l2);
            let plain = q2_sub_scales_lanes(&x, &mut [0u8; QK_K]);
            assert_eq!(
                (scales.map(f32::to_bits), mins.map(f32::to_bits)),
                (plain.0.map(f32::to_bits), plain.1.map(f32::to_bits))
            );
            let mut l3 = [0i8; QK_K];
            let s3 = q3_sub_scales(&x, &mut l3);
            assert_eq!(
                s3.map(f32::to_bits),
                q3_sub_scales_lanes(&x, &mut [0i8; QK_K]).map(f32::to_bits)
            );
            for j in 0..16 {
                let xs = &x[16 * j..16 * j + 16];
                let w: Vec<f32> = xs.iter().map(|v| v.abs()).collect();
                let mut l = [0u8; 16];
                let (sc, mn) = make_qkx2_quants(xs, 3, &w, &mut l, -0.5, 0.1, 15, true);
                assert_eq!(
                    (sc.to_bits(), mn.to_bits()),
                    (scales[j].to_bits(), mins[j].to_bits()),
                    "Q2_K case {case} sub-block {j}"
                );
                assert_eq!(
                    &l[..],
                    &l2[16 * j..16 * j + 16],
                    "Q2_K case {case} sub-block {j}"
                );
                let mut l = [0i8; 16];
                let sc = make_q3_quants(xs, 4, &mut l);
                assert_eq!(
                    sc.to_bits(),
                    s3[j].to_bits(),
                    "Q3_K case {case} sub-block {j}"
                );
                assert_eq!(
                    &l[..],
                    &l3[16 * j..16 * j + 16],
                    "Q3_K case {case} sub-block {j}"
                );
            }
        }
    }
}
