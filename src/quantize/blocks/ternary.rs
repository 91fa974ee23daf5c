//! Ternary super-blocks (TQ1_0, TQ2_0; BitNet b1.58 / TriLM): ggml's reference quantizers
//! (`quantize_row_tq*_ref`). Both scale by the block's absolute max and ignore importance
//! weights, as llama.cpp does ([`tq1_0`], [`tq2_0`]); [`absmean_row`] is BitNet's absmean rule per
//! output row (`--ternary-scale absmean-channel`).

// Index loops mirror ggml's reference code, which keeps the float operation order reviewable.
#![allow(clippy::needless_range_loop)]

use half::f16;

use super::super::types::QK_K;

/// -1, 0, 1 as 0, 1, 2 (C's `lroundf`: half away from zero, which `f32::round` is).
#[inline]
fn trit(v: f32, id: f32) -> u8 {
    ((v * id).round() as i32 + 1) as u8
}

fn absmax(x: &[f32]) -> f32 {
    x.iter().fold(0.0f32, |a, v| a.max(v.abs()))
}

/// TQ1_0: qs[48] (5 trits per byte, base-3 fixed point), qh[4] (4 trits), d. 54 bytes.
pub fn tq1_0(x: &[f32], out: &mut [u8]) {
    let d = absmax(&x[..QK_K]);
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let pack = |q: u8| ((q as u16) * 256).div_ceil(243) as u8;
    // 32 bytes x 5 trits: element m + n*32.
    for m in 0..32 {
        let mut q = 0u8;
        for n in 0..5 {
            q = q * 3 + trit(x[m + n * 32], id);
        }
        out[m] = pack(q);
    }
    // 16 bytes x 5 trits over the next 80 elements: element 160 + m + n*16.
    for m in 0..16 {
        let mut q = 0u8;
        for n in 0..5 {
            q = q * 3 + trit(x[160 + m + n * 16], id);
        }
        out[32 + m] = pack(q);
    }
    // 4 bytes x 4 trits over the last 16: element 240 + j + m*4, first trit most significant.
    for j in 0..4 {
        let mut q = 0u8;
        for m in 0..4 {
            q = q * 3 + trit(x[240 + j + m * 4], id);
        }
        out[48 + j] = pack(q * 3);
    }
    out[52..54].copy_from_slice(&f16::from_f32(d).to_le_bytes());
}

/// TQ2_0: qs[64] (4 two-bit trits per byte, element m + n*32 of each 128), d. 66 bytes.
pub fn tq2_0(x: &[f32], out: &mut [u8]) {
    let d = absmax(&x[..QK_K]);
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for j in 0..2 {
        for m in 0..32 {
            let mut q = 0u8;
            for n in 0..4 {
                q |= (trit(x[128 * j + m + n * 32], id) & 3) << (2 * n);
            }
            out[32 * j + m] = q;
        }
    }
    out[64..66].copy_from_slice(&f16::from_f32(d).to_le_bytes());
}

pub fn dtq1_0(b: &[u8], y: &mut [f32]) {
    const POW3: [u8; 6] = [1, 3, 9, 27, 81, 243];
    let d = f16::from_le_bytes([b[52], b[53]]).to_f32();
    let val = |byte: u8, n: usize| -> f32 {
        let q = byte.wrapping_mul(POW3[n]);
        let xi = ((q as u16 * 3) >> 8) as i32;
        (xi - 1) as f32 * d
    };
    for n in 0..5 {
        for m in 0..32 {
            y[n * 32 + m] = val(b[m], n);
        }
    }
    for n in 0..5 {
        for m in 0..16 {
            y[160 + n * 16 + m] = val(b[32 + m], n);
        }
    }
    for n in 0..4 {
        for j in 0..4 {
            y[240 + n * 4 + j] = val(b[48 + j], n);
        }
    }
}

pub fn dtq2_0(b: &[u8], y: &mut [f32]) {
    let d = f16::from_le_bytes([b[64], b[65]]).to_f32();
    for j in 0..2 {
        for n in 0..4 {
            for m in 0..32 {
                let q = (b[32 * j + m] >> (2 * n)) & 3;
                y[128 * j + n * 32 + m] = (q as i32 - 1) as f32 * d;
            }
        }
    }
}

/// How TQ1_0/TQ2_0 blocks get their scale (`xllm quantize --ternary-scale`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TernaryScale {
    /// llama.cpp's: each 256-element block scaled by its largest magnitude (bytes identical to
    /// llama-quantize's).
    #[default]
    Absmax,
    /// BitNet b1.58's absmean rule per output row: `d = mean |w|` of the row, `w / d` rounded to
    /// {−1, 0, 1} and clipped; every block of the row stores the row's `d` (as f16).
    AbsmeanChannel,
}

impl TernaryScale {
    pub const NAMES: [&'static str; 2] = ["absmax", "absmean-channel"];

    pub fn parse(s: &str) -> anyhow::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "absmax" => Ok(Self::Absmax),
            "absmean-channel" | "absmean" => Ok(Self::AbsmeanChannel),
            _ => anyhow::bail!(
                "unknown ternary scale '{s}'; choose one of: {}",
                Self::NAMES.join(", ")
            ),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Absmax => Self::NAMES[0],
            Self::AbsmeanChannel => Self::NAMES[1],
        }
    }
}

/// One row (a multiple of 256 values) as TQ1_0/TQ2_0 blocks with the row's absmean scale.
pub fn absmean_row(ty: super::super::types::GgmlType, x: &[f32], out: &mut [u8]) {
    use super::super::types::GgmlType;
    let d = (x.iter().map(|v| v.abs() as f64).sum::<f64>() / x.len().max(1) as f64) as f32;
    // Rounded to the stored precision first, so the levels are chosen for the scale decoders see.
    let d = f16::from_f32(d).to_f32();
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    // Clipping to ±1 before the block quantizer's own rounding: `trit` then sees −1, 0 or 1.
    let mut clipped = [0f32; QK_K];
    let bb = if ty == GgmlType::TQ1_0 { 54 } else { 66 };
    for (xb, ob) in x.chunks_exact(QK_K).zip(out.chunks_exact_mut(bb)) {
        for (c, v) in clipped.iter_mut().zip(xb) {
            *c = (v * id).round_ties_even().clamp(-1.0, 1.0);
        }
        // The block quantizer stores values in {−1, 0, 1} exactly (its absmax is 1 or 0); the
        // row's scale then replaces the block's.
        if ty == GgmlType::TQ1_0 {
            tq1_0(&clipped, ob);
            ob[52..54].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        } else {
            tq2_0(&clipped, ob);
            ob[64..66].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        }
    }
}
