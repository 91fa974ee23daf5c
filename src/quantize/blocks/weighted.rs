//! Importance-weighted quantizers: what llama-quantize does when given an importance matrix
//! (`quantize_row_{q2_K,q3_K,q4_K,q5_K,q4_0,q4_1,q5_0,q5_1}_impl` in ggml-quants.c), written from
//! its description with the same float operation order, so our bytes equal llama-quantize's for
//! the same imatrix (tests/quantize_reference.rs checks this against its output).
//!
//! Each quantizer weighs element i's rounding error by `qw[i] * sqrt(sigma2 + x[i]^2)`
//! (`qw` = mean squared activation of input column i, `sigma2` = the mean square of the block or
//! row), searches the scale/min of every sub-block with [`make_qkx3_quants`] (asymmetric) or
//! `make_qx_quants` (symmetric), and then quantizes the sub-block scales themselves with the
//! sub-blocks' summed weights ([`make_qp_quants`]) instead of a plain max. Q6_K's weighted path
//! (qw passed straight to `make_qx_quants`) lives in `kquants::q6_k`; Q8_0 and the ternary
//! types ignore importance, as in llama.cpp.

// Index loops mirror ggml's code, which keeps the float operation order reviewable.
#![allow(clippy::needless_range_loop)]

use half::f16;

use super::kquants::{f16_round, get_scale_min_k4, make_qx_quants, nearest_int};
use crate::quantize::types::QK_K;

const GROUP_MAX_EPS: f32 = 1e-15;
const QK: usize = 32;

/// Asymmetric levels `0..=nmax` with a weighted search over 37 inverse scales (ggml's
/// `make_qkx3_quants`, always called with rmin -0.9, rdelta 0.05, 36 steps, squared error — with
/// weights given, the same arithmetic as `make_qkx2_quants` with those arguments).
/// Returns (scale, -min).
fn make_qkx3_quants(x: &[f32], nmax: i32, weights: &[f32], l_out: &mut [u8]) -> (f32, f32) {
    super::kquants::make_qkx2_quants(x, nmax, weights, l_out, -0.9, 0.05, 36, false)
}

/// Non-negative levels `0..=nmax` for the sub-block scales (or mins) of a super-block, weighted by
/// each sub-block's summed importance (ggml's `make_qp_quants`): 9 inverse scales, then up to 5
/// rounds of coordinate descent on the levels. Levels are stored as C's `uint8_t` stores them.
fn make_qp_quants(x: &[f32], nmax: i32, l: &mut [u8], qw: &[f32]) -> f32 {
    let n = x.len();
    let mut max = 0.0f32;
    for &v in x {
        max = if max > v { max } else { v };
    }
    if max < GROUP_MAX_EPS {
        l[..n].iter_mut().for_each(|v| *v = 0);
        return 0.0;
    }
    let mut iscale = nmax as f32 / max;
    for i in 0..n {
        l[i] = nearest_int(iscale * x[i]) as u8;
    }
    let scale = 1.0 / iscale;
    let mut best_mse = 0.0f32;
    for i in 0..n {
        let diff = x[i] - scale * l[i] as f32;
        best_mse += qw[i] * diff * diff;
    }
    for is in -4..=4 {
        if is == 0 {
            continue;
        }
        let iscale_is = (0.1 * is as f32 + nmax as f32) / max;
        let scale_is = 1.0 / iscale_is;
        let mut mse = 0.0f32;
        for i in 0..n {
            let li = nearest_int(iscale_is * x[i]).min(nmax);
            let diff = x[i] - scale_is * li as f32;
            mse += qw[i] * diff * diff;
        }
        if mse < best_mse {
            best_mse = mse;
            iscale = iscale_is;
        }
    }
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for i in 0..n {
        let li = nearest_int(iscale * x[i]).min(nmax);
        l[i] = li as u8;
        let w = qw[i];
        sumlx += w * x[i] * l[i] as f32;
        suml2 += w * l[i] as f32 * l[i] as f32;
    }
    for _ in 0..5 {
        let mut n_changed = 0;
        for i in 0..n {
            let w = qw[i];
            let li = l[i] as f32;
            let mut slx = sumlx - w * x[i] * li;
            let mut sl2 = suml2 - w * li * li;
            if slx > 0.0 && sl2 > 0.0 {
                let new_l = nearest_int(x[i] * sl2 / slx).min(nmax);
                if new_l != l[i] as i32 {
                    slx += w * x[i] * new_l as f32;
                    sl2 += w * new_l as f32 * new_l as f32;
                    if slx * slx * suml2 > sumlx * sumlx * sl2 {
                        l[i] = new_l as u8;
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
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

fn sum_squares(x: &[f32]) -> f32 {
    let mut s = 0.0f32;
    for v in x {
        s += v * v;
    }
    s
}

/// `qw[i] * sqrt(sigma2 + x[i]^2)` for one sub-block, and the sum of those weights.
fn element_weights(x: &[f32], qw: &[f32], sigma2: f32, w: &mut [f32]) -> f32 {
    for i in 0..x.len() {
        w[i] = qw[i] * (sigma2 + x[i] * x[i]).sqrt();
    }
    let mut sum = 0.0f32;
    for &v in &w[..x.len()] {
        sum += v;
    }
    sum
}

/// Q2_K (84 bytes) for one 256-element super-block with importance `qw`.
pub fn q2_k(x: &[f32], out: &mut [u8], qw: &[f32]) {
    let mut l = [0u8; QK_K];
    let mut scales = [0.0f32; 16];
    let mut mins = [0.0f32; 16];
    let mut sw = [0.0f32; 16];
    let mut w = [0.0f32; 16];
    let sigma2 = sum_squares(&x[..QK_K]) / QK_K as f32;
    for j in 0..16 {
        let xs = &x[16 * j..16 * j + 16];
        sw[j] = element_weights(xs, &qw[16 * j..16 * j + 16], sigma2, &mut w);
        let (s, m) = make_qkx3_quants(xs, 3, &w, &mut l[16 * j..16 * j + 16]);
        scales[j] = s;
        mins[j] = m;
    }
    let (mut ls, mut lm) = ([0u8; 16], [0u8; 16]);
    let dm = make_qp_quants(&scales, 15, &mut ls, &sw);
    let mm = make_qp_quants(&mins, 15, &mut lm, &sw);
    let (d_bits, d) = f16_round(dm);
    let (m_bits, m_all) = f16_round(mm);
    let (sc, rest) = out.split_at_mut(16);
    let (qs, dd) = rest.split_at_mut(64);
    for j in 0..16 {
        sc[j] = ls[j] | (lm[j] << 4);
    }
    dd[0..2].copy_from_slice(&d_bits.to_le_bytes());
    dd[2..4].copy_from_slice(&m_bits.to_le_bytes());
    for j in 0..16 {
        let dj = d * (sc[j] & 0xF) as f32;
        if dj == 0.0 {
            continue;
        }
        let mj = m_all * (sc[j] >> 4) as f32;
        for ii in 0..16 {
            l[16 * j + ii] = nearest_int((x[16 * j + ii] + mj) / dj).clamp(0, 3) as u8;
        }
    }
    for j in (0..QK_K).step_by(128) {
        for i in 0..32 {
            qs[j / 4 + i] =
                l[j + i] | (l[j + i + 32] << 2) | (l[j + i + 64] << 4) | (l[j + i + 96] << 6);
        }
    }
}

/// Q3_K (110 bytes) for one super-block with importance `qw`.
pub fn q3_k(x: &[f32], out: &mut [u8], qw: &[f32]) {
    let mut l = [0i8; QK_K];
    let mut scales = [0.0f32; 16];
    let mut sw = [0.0f32; 16];
    let mut w = [0.0f32; 16];
    let sigma2 = 2.0 * sum_squares(&x[..QK_K]) / QK_K as f32;
    for j in 0..16 {
        let xs = &x[16 * j..16 * j + 16];
        sw[j] = element_weights(xs, &qw[16 * j..16 * j + 16], sigma2, &mut w);
        scales[j] = make_qx_quants(xs, 4, &mut l[16 * j..16 * j + 16], 1, Some(&w));
    }
    let mut ls = [0i8; 16];
    let d_block = make_qx_quants(&scales, 32, &mut ls, 1, Some(&sw));
    let (hmask, rest) = out.split_at_mut(32);
    let (qs, rest) = rest.split_at_mut(64);
    let (sc, dd) = rest.split_at_mut(12);
    sc.iter_mut().for_each(|s| *s = 0);
    for j in 0..16 {
        let lj = ls[j] as u8;
        if j < 8 {
            sc[j] = lj & 0xF;
        } else {
            sc[j - 8] |= (lj & 0xF) << 4;
        }
        sc[j % 4 + 8] |= (lj >> 4) << (2 * (j / 4));
    }
    let (d_bits, d) = f16_round(d_block);
    dd[0..2].copy_from_slice(&d_bits.to_le_bytes());
    for j in 0..16 {
        let lo = if j < 8 { sc[j] & 0xF } else { sc[j - 8] >> 4 };
        let s = (lo | (((sc[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) as i8 - 32;
        let dj = d * s as f32;
        if dj == 0.0 {
            continue;
        }
        for ii in 0..16 {
            l[16 * j + ii] = (nearest_int(x[16 * j + ii] / dj).clamp(-4, 3) + 4) as i8;
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

/// Q4_K/Q5_K's scales and levels with importance: 8 sub-blocks of 32, `nmax` 15 or 31.
fn q45_weighted(x: &[f32], qw: &[f32], nmax: i32, l: &mut [u8; QK_K]) -> ([u8; 12], u16, u16) {
    let mut scales = [0.0f32; 8];
    let mut mins = [0.0f32; 8];
    let mut sw = [0.0f32; 8];
    let mut w = [0.0f32; 32];
    let sigma2 = 2.0 * sum_squares(&x[..QK_K]) / QK_K as f32;
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        sw[j] = element_weights(xs, &qw[32 * j..32 * j + 32], sigma2, &mut w);
        let (s, m) = make_qkx3_quants(xs, nmax, &w, &mut l[32 * j..32 * j + 32]);
        scales[j] = s;
        mins[j] = m;
    }
    let (mut ls, mut lm) = ([0u8; 8], [0u8; 8]);
    let d_block = make_qp_quants(&scales, 63, &mut ls, &sw);
    let m_block = make_qp_quants(&mins, 63, &mut lm, &sw);
    let mut sc = [0u8; 12];
    for j in 0..8 {
        // Q5_K clamps to 63 (a no-op: make_qp_quants keeps levels within nmax = 63).
        let (a, b) = (ls[j].min(63), lm[j].min(63));
        if j < 4 {
            sc[j] = a;
            sc[j + 4] = b;
        } else {
            sc[j + 4] = (a & 0xF) | ((b & 0xF) << 4);
            sc[j - 4] |= (a >> 4) << 6;
            sc[j] |= (b >> 4) << 6;
        }
    }
    let (d_bits, d) = f16_round(d_block);
    let (m_bits, dmin) = f16_round(m_block);
    for j in 0..8 {
        let (s, m) = get_scale_min_k4(j, &sc);
        let dj = d * s as f32;
        if dj == 0.0 {
            continue;
        }
        let dm = dmin * m as f32;
        for ii in 0..32 {
            l[32 * j + ii] = nearest_int((x[32 * j + ii] + dm) / dj).clamp(0, nmax) as u8;
        }
    }
    (sc, d_bits, m_bits)
}

/// Q4_K (144 bytes) for one super-block with importance `qw`.
pub fn q4_k(x: &[f32], out: &mut [u8], qw: &[f32]) {
    let mut l = [0u8; QK_K];
    let (sc, d, dmin) = q45_weighted(x, qw, 15, &mut l);
    out[0..2].copy_from_slice(&d.to_le_bytes());
    out[2..4].copy_from_slice(&dmin.to_le_bytes());
    out[4..16].copy_from_slice(&sc);
    let q = &mut out[16..144];
    for (c, j) in (0..QK_K).step_by(64).enumerate() {
        for i in 0..32 {
            q[32 * c + i] = l[j + i] | (l[j + i + 32] << 4);
        }
    }
}

/// Q5_K (176 bytes) for one super-block with importance `qw`.
pub fn q5_k(x: &[f32], out: &mut [u8], qw: &[f32]) {
    let mut l = [0u8; QK_K];
    let (sc, d, dmin) = q45_weighted(x, qw, 31, &mut l);
    out[0..2].copy_from_slice(&d.to_le_bytes());
    out[2..4].copy_from_slice(&dmin.to_le_bytes());
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

/// The 32-element types with importance, one whole row at a time: their `sigma2` is the mean
/// square of the row, not of a block. `ty` is one of Q4_0, Q4_1, Q5_0, Q5_1.
pub fn legacy_row(ty: super::GgmlType, row: &[f32], qw: &[f32], out: &mut [u8]) {
    use super::GgmlType;
    let sigma2 = sum_squares(row) / row.len() as f32;
    let bb = ty.block().expect("legacy type").1;
    let mut w = [0.0f32; QK];
    for (ib, (xb, ob)) in row
        .chunks_exact(QK)
        .zip(out.chunks_exact_mut(bb))
        .enumerate()
    {
        let q = &qw[QK * ib..QK * (ib + 1)];
        for j in 0..QK {
            w[j] = q[j] * (sigma2 + xb[j] * xb[j]).sqrt();
        }
        match ty {
            GgmlType::Q4_0 | GgmlType::Q5_0 => {
                let mut l = [0i8; QK];
                let nmax = if ty == GgmlType::Q4_0 { 8 } else { 16 };
                let d = make_qx_quants(xb, nmax, &mut l, 1, Some(&w));
                ob[0..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
                let l: [u8; QK] = l.map(|v| v as u8);
                if ty == GgmlType::Q4_0 {
                    for j in 0..16 {
                        ob[2 + j] = l[j] | (l[j + 16] << 4);
                    }
                } else {
                    pack_q5(&l, &mut ob[2..22]);
                }
            }
            _ => {
                let mut l = [0u8; QK];
                let nmax = if ty == GgmlType::Q4_1 { 15 } else { 31 };
                let (d, min) = make_qkx3_quants(xb, nmax, &w, &mut l);
                ob[0..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
                ob[2..4].copy_from_slice(&f16::from_f32(-min).to_le_bytes());
                if ty == GgmlType::Q4_1 {
                    for j in 0..16 {
                        ob[4 + j] = l[j] | (l[j + 16] << 4);
                    }
                } else {
                    pack_q5(&l, &mut ob[4..24]);
                }
            }
        }
    }
}

/// qh (u32, fifth bits: element j at bit j, element j+16 at bit j+16) then 16 bytes of nibbles.
fn pack_q5(l: &[u8; QK], out: &mut [u8]) {
    let mut qh = 0u32;
    for j in 0..16 {
        let (a, b) = (l[j], l[j + 16]);
        out[4 + j] = (a & 0x0F) | ((b & 0x0F) << 4);
        qh |= (((a & 0x10) as u32) >> 4) << j;
        qh |= (((b & 0x10) as u32) >> 4) << (j + 16);
    }
    out[0..4].copy_from_slice(&qh.to_le_bytes());
}
