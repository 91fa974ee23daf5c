//! The 32-element block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0): ggml's reference quantizers
//! (`quantize_row_*_ref` in ggml-quants.c), reimplemented so the bytes match llama-quantize's.
//!
//! C's `(int8_t)(v + 8.5f)` truncates toward zero; `as i8` on values in range does the same. The
//! order of float operations follows the reference so results are bit-identical.

// Index loops mirror ggml's reference code, which keeps the float operation order reviewable.
#![allow(clippy::needless_range_loop)]

use half::f16;

pub const QK: usize = 32;

fn put_f16(out: &mut [u8], v: f32) {
    out.copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

/// Absolute max and the value that has it (first one on ties), as the reference scans.
fn signed_amax(x: &[f32]) -> (f32, f32) {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    (amax, max)
}

fn min_max(x: &[f32]) -> (f32, f32) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

/// Q4_0: `d = max/-8`, 16 bytes of nibbles (element j low, j+16 high). 18 bytes.
pub fn q4_0(x: &[f32], out: &mut [u8]) {
    let (_, max) = signed_amax(x);
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(&mut out[0..2], d);
    for j in 0..QK / 2 {
        let x0 = x[j] * id;
        let x1 = x[QK / 2 + j] * id;
        let q0 = ((x0 + 8.5) as i8).min(15) as u8;
        let q1 = ((x1 + 8.5) as i8).min(15) as u8;
        out[2 + j] = q0 | (q1 << 4);
    }
}

/// Q4_1: `d = (max-min)/15`, `m = min`. 20 bytes.
pub fn q4_1(x: &[f32], out: &mut [u8]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(&mut out[0..2], d);
    put_f16(&mut out[2..4], min);
    for j in 0..QK / 2 {
        let x0 = (x[j] - min) * id;
        let x1 = (x[QK / 2 + j] - min) * id;
        let q0 = ((x0 + 0.5) as i8).min(15) as u8;
        let q1 = ((x1 + 0.5) as i8).min(15) as u8;
        out[4 + j] = q0 | (q1 << 4);
    }
}

/// Q5_0: `d = max/-16`, fifth bits in a u32. 22 bytes (d, qh[4], qs[16]).
pub fn q5_0(x: &[f32], out: &mut [u8]) {
    let (_, max) = signed_amax(x);
    let d = max / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(&mut out[0..2], d);
    let mut qh = 0u32;
    for j in 0..QK / 2 {
        let x0 = x[j] * id;
        let x1 = x[QK / 2 + j] * id;
        let q0 = ((x0 + 16.5) as i8).min(31) as u8;
        let q1 = ((x1 + 16.5) as i8).min(31) as u8;
        out[6 + j] = (q0 & 0x0F) | ((q1 & 0x0F) << 4);
        qh |= (((q0 & 0x10) as u32) >> 4) << j;
        qh |= (((q1 & 0x10) as u32) >> 4) << (j + QK / 2);
    }
    out[2..6].copy_from_slice(&qh.to_le_bytes());
}

/// Q5_1: `d = (max-min)/31`, `m = min`. 24 bytes (d, m, qh[4], qs[16]).
pub fn q5_1(x: &[f32], out: &mut [u8]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 31.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(&mut out[0..2], d);
    put_f16(&mut out[2..4], min);
    let mut qh = 0u32;
    for j in 0..QK / 2 {
        let x0 = (x[j] - min) * id;
        let x1 = (x[QK / 2 + j] - min) * id;
        let q0 = (x0 + 0.5) as u8;
        let q1 = (x1 + 0.5) as u8;
        out[8 + j] = (q0 & 0x0F) | ((q1 & 0x0F) << 4);
        qh |= (((q0 & 0x10) as u32) >> 4) << j;
        qh |= (((q1 & 0x10) as u32) >> 4) << (j + QK / 2);
    }
    out[4..8].copy_from_slice(&qh.to_le_bytes());
}

/// Q8_0: `d = amax/127`, `q = round(x/d)`. 34 bytes.
pub fn q8_0(x: &[f32], out: &mut [u8]) {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(&mut out[0..2], d);
    for j in 0..QK {
        out[2 + j] = round_away(x[j] * id) as i8 as u8;
    }
}

/// C's `roundf` (halves away from zero) as an integer, exact for |v| < 2^31 (NaN gives 0, as
/// `roundf(NaN)` cast does here). `f32::round` is a libm call on x86-64's baseline target, one per
/// value; this is a truncating convert and two compares, which vectorize.
#[inline(always)]
fn round_away(v: f32) -> i32 {
    let t = v as i32;
    // Exact: |v| < 2^23 has a representable fraction; larger floats are integers (f = 0).
    let f = v - t as f32;
    t + (f >= 0.5) as i32 - (f <= -0.5) as i32
}

fn get_f16(b: &[u8]) -> f32 {
    f16::from_le_bytes([b[0], b[1]]).to_f32()
}

pub fn dq4_0(b: &[u8], y: &mut [f32]) {
    let d = get_f16(b);
    for j in 0..QK / 2 {
        y[j] = ((b[2 + j] & 0x0F) as i32 - 8) as f32 * d;
        y[j + QK / 2] = ((b[2 + j] >> 4) as i32 - 8) as f32 * d;
    }
}

pub fn dq4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (get_f16(b), get_f16(&b[2..]));
    for j in 0..QK / 2 {
        y[j] = (b[4 + j] & 0x0F) as f32 * d + m;
        y[j + QK / 2] = (b[4 + j] >> 4) as f32 * d + m;
    }
}

pub fn dq5_0(b: &[u8], y: &mut [f32]) {
    let d = get_f16(b);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    for j in 0..QK / 2 {
        let h0 = (((qh >> j) << 4) & 0x10) as i32;
        let h1 = ((qh >> (j + 12)) & 0x10) as i32;
        y[j] = (((b[6 + j] & 0x0F) as i32 | h0) - 16) as f32 * d;
        y[j + QK / 2] = (((b[6 + j] >> 4) as i32 | h1) - 16) as f32 * d;
    }
}

pub fn dq5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (get_f16(b), get_f16(&b[2..]));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    for j in 0..QK / 2 {
        let h0 = (((qh >> j) << 4) & 0x10) as i32;
        let h1 = ((qh >> (j + 12)) & 0x10) as i32;
        y[j] = ((b[8 + j] & 0x0F) as i32 | h0) as f32 * d + m;
        y[j + QK / 2] = ((b[8 + j] >> 4) as i32 | h1) as f32 * d + m;
    }
}

pub fn dq8_0(b: &[u8], y: &mut [f32]) {
    let d = get_f16(b);
    for j in 0..QK {
        y[j] = (b[2 + j] as i8) as f32 * d;
    }
}

/// MXFP4 (gpt-oss experts): e8m0 scale byte, 16 bytes of E2M1 nibbles (j low, j+16 high).
pub fn dmxfp4(b: &[u8], y: &mut [f32]) {
    const VALUES: [f32; 16] = [
        0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
    ];
    // e8m0: 2^(e-127); e = 0 is the subnormal 2^-127 (ggml's GGML_E8M0_TO_FP32).
    let scale = if b[0] == 0 {
        f32::from_bits(0x0040_0000)
    } else {
        f32::from_bits((b[0] as u32) << 23)
    };
    for j in 0..QK / 2 {
        y[j] = VALUES[(b[1 + j] & 0x0F) as usize] * scale;
        y[j + QK / 2] = VALUES[(b[1 + j] >> 4) as usize] * scale;
    }
}

#[cfg(test)]
mod tests {
    use super::round_away;

    #[test]
    fn round_away_is_roundf() {
        let mut vals = vec![
            0.0f32,
            -0.0,
            0.5,
            -0.5,
            1.5,
            -1.5,
            2.5,
            -2.5,
            0.49999997,
            -0.49999997,
            126.5,
            -127.5,
            8388607.5,
            8388608.0,
            1e9,
            -1e9,
            f32::NAN,
        ];
        let mut s = 99u32;
        for _ in 0..100_000 {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            vals.push((s as i32) as f32 / 1.6e7);
        }
        for v in vals {
            assert_eq!(round_away(v), v.round() as i32, "{v}");
        }
    }
}
