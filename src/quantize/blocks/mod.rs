//! f32 rows to GGML blocks and back, for every type `xllm quantize` writes or reads.
//!
//! Our own code rather than candle's quantizers: candle has no TQ1_0/TQ2_0/MXFP4, and its K-quant
//! quantizers use a different search (`make_qkx1_quants`), so its bytes differ from llama.cpp's.

pub mod kquants;
pub mod legacy;
pub mod ternary;
pub mod weighted;

use anyhow::bail;
use half::{bf16, f16};

use super::types::GgmlType;

/// A weighted super-block quantizer: (values, output block, importance).
type WeightedBlock = fn(&[f32], &mut [u8], &[f32]);

/// Quantizes `rows` rows of `n_per_row` f32 values into `out` (exactly `rows * row_bytes`).
/// `weights` (importance, one per column) is the hook for `xllm imatrix`; types that ignore it
/// in llama.cpp (Q8_0, TQ*) ignore it here too.
pub fn quantize_rows(
    ty: GgmlType,
    x: &[f32],
    n_per_row: usize,
    weights: Option<&[f32]>,
    out: &mut [u8],
) -> anyhow::Result<()> {
    let Some(row_bytes) = ty.row_bytes(n_per_row) else {
        bail!("{ty} cannot hold rows of {n_per_row} elements");
    };
    if x.len() % n_per_row != 0 || out.len() != x.len() / n_per_row * row_bytes {
        bail!("quantize_rows: buffer sizes do not match ({ty})");
    }
    match ty {
        GgmlType::F32 => {
            for (o, v) in out.chunks_exact_mut(4).zip(x) {
                o.copy_from_slice(&v.to_le_bytes());
            }
            return Ok(());
        }
        GgmlType::F16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&f16::from_f32(*v).to_le_bytes());
            }
            return Ok(());
        }
        GgmlType::BF16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&f32_to_bf16_ggml(*v).to_le_bytes());
            }
            return Ok(());
        }
        _ => {}
    }
    let (bs, bb) = ty.block().expect("row_bytes checked the type");
    if let Some(qw) = weights {
        if qw.len() != n_per_row {
            bail!(
                "importance weights have {} values for rows of {n_per_row}",
                qw.len()
            );
        }
        // llama.cpp's weighted quantizers; the other types ignore importance, as there.
        let weighted: Option<WeightedBlock> = match ty {
            GgmlType::Q2K => Some(weighted::q2_k),
            GgmlType::Q3K => Some(weighted::q3_k),
            GgmlType::Q4K => Some(weighted::q4_k),
            GgmlType::Q5K => Some(weighted::q5_k),
            _ => None,
        };
        if let Some(f) = weighted {
            for (row, orow) in x
                .chunks_exact(n_per_row)
                .zip(out.chunks_exact_mut(row_bytes))
            {
                for (i, (xb, ob)) in row
                    .chunks_exact(bs)
                    .zip(orow.chunks_exact_mut(bb))
                    .enumerate()
                {
                    f(xb, ob, &qw[i * bs..(i + 1) * bs]);
                }
            }
            return Ok(());
        }
        if matches!(
            ty,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1
        ) {
            for (row, orow) in x
                .chunks_exact(n_per_row)
                .zip(out.chunks_exact_mut(row_bytes))
            {
                weighted::legacy_row(ty, row, qw, orow);
            }
            return Ok(());
        }
    }
    for (row, orow) in x
        .chunks_exact(n_per_row)
        .zip(out.chunks_exact_mut(row_bytes))
    {
        for (i, (xb, ob)) in row
            .chunks_exact(bs)
            .zip(orow.chunks_exact_mut(bb))
            .enumerate()
        {
            let w = weights.map(|w| &w[i * bs..(i + 1) * bs]);
            match ty {
                GgmlType::Q4_0 => legacy::q4_0(xb, ob),
                GgmlType::Q4_1 => legacy::q4_1(xb, ob),
                GgmlType::Q5_0 => legacy::q5_0(xb, ob),
                GgmlType::Q5_1 => legacy::q5_1(xb, ob),
                GgmlType::Q8_0 => legacy::q8_0(xb, ob),
                GgmlType::Q2K => kquants::q2_k(xb, ob),
                GgmlType::Q3K => kquants::q3_k(xb, ob),
                GgmlType::Q4K => kquants::q4_k(xb, ob),
                GgmlType::Q5K => kquants::q5_k(xb, ob),
                GgmlType::Q6K => kquants::q6_k(xb, ob, w),
                GgmlType::TQ1_0 => ternary::tq1_0(xb, ob),
                GgmlType::TQ2_0 => ternary::tq2_0(xb, ob),
                other => bail!("quantizing to {other} is not supported"),
            }
        }
    }
    Ok(())
}

/// [`quantize_rows`], with TQ1_0/TQ2_0 scaled by `scale` (BitNet's per-row absmean when asked;
/// every other type, and `Absmax`, exactly as `quantize_rows`).
pub fn quantize_rows_scaled(
    ty: GgmlType,
    x: &[f32],
    n_per_row: usize,
    weights: Option<&[f32]>,
    scale: ternary::TernaryScale,
    out: &mut [u8],
) -> anyhow::Result<()> {
    if scale == ternary::TernaryScale::AbsmeanChannel
        && matches!(ty, GgmlType::TQ1_0 | GgmlType::TQ2_0)
    {
        let Some(row_bytes) = ty.row_bytes(n_per_row) else {
            bail!("{ty} cannot hold rows of {n_per_row} elements");
        };
        if x.len() % n_per_row != 0 || out.len() != x.len() / n_per_row * row_bytes {
            bail!("quantize_rows: buffer sizes do not match ({ty})");
        }
        for (row, orow) in x
            .chunks_exact(n_per_row)
            .zip(out.chunks_exact_mut(row_bytes))
        {
            ternary::absmean_row(ty, row, orow);
        }
        return Ok(());
    }
    quantize_rows(ty, x, n_per_row, weights, out)
}

/// ggml's `GGML_FP32_TO_BF16`: round to nearest even, NaN kept quiet.
fn f32_to_bf16_ggml(v: f32) -> u16 {
    let u = v.to_bits();
    if (u & 0x7fff_ffff) > 0x7f80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    ((u + (0x7fff + ((u >> 16) & 1))) >> 16) as u16
}

/// Dequantizes whole blocks of `ty` from `data` into `out` (`out.len()` elements).
pub fn dequantize(ty: GgmlType, data: &[u8], out: &mut [f32]) -> anyhow::Result<()> {
    let (bs, bb) = match ty.block() {
        Some(b) => b,
        None => bail!("cannot convert tensors of type {ty}"),
    };
    if out.len() % bs != 0 || data.len() != out.len() / bs * bb {
        bail!("dequantize: buffer sizes do not match ({ty})");
    }
    match ty {
        GgmlType::F32 => {
            for (o, b) in out.iter_mut().zip(data.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
            return Ok(());
        }
        GgmlType::F16 => {
            f16_bytes_to_f32(data, out);
            return Ok(());
        }
        GgmlType::BF16 => {
            for (o, b) in out.iter_mut().zip(data.chunks_exact(2)) {
                *o = bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
            return Ok(());
        }
        _ => {}
    }
    for (b, y) in data.chunks_exact(bb).zip(out.chunks_exact_mut(bs)) {
        match ty {
            GgmlType::Q4_0 => legacy::dq4_0(b, y),
            GgmlType::Q4_1 => legacy::dq4_1(b, y),
            GgmlType::Q5_0 => legacy::dq5_0(b, y),
            GgmlType::Q5_1 => legacy::dq5_1(b, y),
            GgmlType::Q8_0 => legacy::dq8_0(b, y),
            GgmlType::MXFP4 => legacy::dmxfp4(b, y),
            GgmlType::Q2K => kquants::dq2_k(b, y),
            GgmlType::Q3K => kquants::dq3_k(b, y),
            GgmlType::Q4K => kquants::dq4_k(b, y),
            GgmlType::Q5K => kquants::dq5_k(b, y),
            GgmlType::Q6K => kquants::dq6_k(b, y),
            GgmlType::Q8K => kquants::dq8_k(b, y),
            GgmlType::TQ1_0 => ternary::dtq1_0(b, y),
            GgmlType::TQ2_0 => ternary::dtq2_0(b, y),
            other => bail!("cannot convert tensors of type {other}"),
        }
    }
    Ok(())
}

/// Little-endian f16 bytes to f32 (`out.len()` values). Through half's slice conversion, which
/// converts 8 values per F16C instruction where the CPU has it; one `f16::to_f32` per value
/// checks the CPU each time and does not vectorize (the f16 read was a visible share of
/// quantizing an f16 source).
pub fn f16_bytes_to_f32(data: &[u8], out: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    const STEP: usize = 256;
    let mut buf = [f16::ZERO; STEP];
    for (o, b) in out.chunks_mut(STEP).zip(data.chunks(2 * STEP)) {
        let h = &mut buf[..o.len()];
        for (v, c) in h.iter_mut().zip(b.chunks_exact(2)) {
            *v = f16::from_bits(u16::from_le_bytes([c[0], c[1]]));
        }
        h.convert_to_f32_slice(o);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic test values with the shape of real weights: mostly small, a few outliers.
    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).max(1);
        (0..n)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                let u = (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
                if i % 97 == 3 {
                    u * 0.4
                } else {
                    u * 0.05
                }
            })
            .collect()
    }

    /// Round trip error per type: a format bug (wrong nibble, wrong scale bits) shows as an
    /// error far above the type's resolution. The decoders are checked against candle's in
    /// `candle_decodes_our_blocks`.
    #[test]
    fn round_trip_error_is_within_each_types_resolution() {
        let x = values(4096, 7);
        let rms = (x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32).sqrt();
        for (ty, max_rel) in [
            (GgmlType::F16, 0.001),
            (GgmlType::BF16, 0.01),
            (GgmlType::Q8_0, 0.02),
            (GgmlType::Q6K, 0.05),
            (GgmlType::Q5_0, 0.1),
            (GgmlType::Q5_1, 0.1),
            (GgmlType::Q5K, 0.1),
            (GgmlType::Q4_0, 0.2),
            (GgmlType::Q4_1, 0.2),
            (GgmlType::Q4K, 0.2),
            (GgmlType::Q3K, 0.4),
            (GgmlType::Q2K, 0.7),
            (GgmlType::TQ2_0, 1.5),
            (GgmlType::TQ1_0, 1.5),
        ] {
            let mut q = vec![0u8; ty.row_bytes(4096).unwrap()];
            quantize_rows(ty, &x, 4096, None, &mut q).unwrap();
            let mut y = vec![0f32; 4096];
            dequantize(ty, &q, &mut y).unwrap();
            let err = (x
                .iter()
                .zip(&y)
                .map(|(a, b)| (a - b) * (a - b))
                .sum::<f32>()
                / 4096.0)
                .sqrt();
            assert!(err / rms < max_rel, "{ty}: rms error {} of rms {rms}", err);
        }
    }

    #[test]
    fn absmean_channel_scales_each_row_by_its_mean_magnitude() {
        // Row 0: mean |w| = 0.25 (values ±0.5, 0, ±0.125 …); row 1: all zero.
        let mut x: Vec<f32> = (0..256)
            .map(|i| [0.5f32, -0.5, 0.0, 0.0][i % 4] * if i % 8 < 4 { 1.0 } else { 0.5 })
            .collect();
        let mean = x.iter().map(|v| v.abs()).sum::<f32>() / 256.0;
        x.extend(std::iter::repeat_n(0.0, 256));
        for ty in [GgmlType::TQ1_0, GgmlType::TQ2_0] {
            let rb = ty.row_bytes(256).unwrap();
            let mut q = vec![0u8; 2 * rb];
            quantize_rows_scaled(
                ty,
                &x,
                256,
                None,
                ternary::TernaryScale::AbsmeanChannel,
                &mut q,
            )
            .unwrap();
            let mut y = vec![0f32; 512];
            dequantize(ty, &q, &mut y).unwrap();
            let d = half::f16::from_f32(mean).to_f32();
            for (i, (a, b)) in x.iter().zip(&y).enumerate() {
                let want = (a / d).round_ties_even().clamp(-1.0, 1.0) * d;
                assert_eq!(*b, want, "{ty} [{i}]");
            }
            // Absmax keeps llama.cpp's bytes.
            let mut q_max = vec![0u8; 2 * rb];
            let mut q_ref = vec![0u8; 2 * rb];
            quantize_rows_scaled(ty, &x, 256, None, ternary::TernaryScale::Absmax, &mut q_max)
                .unwrap();
            quantize_rows(ty, &x, 256, None, &mut q_ref).unwrap();
            assert_eq!(q_max, q_ref);
        }
    }

    #[test]
    fn ternary_values_survive_exactly() {
        // A ternary tensor (values in {-a, 0, a}) must come back exactly.
        let x: Vec<f32> = (0..512).map(|i| [0.25f32, 0.0, -0.25][i * 7 % 3]).collect();
        for ty in [GgmlType::TQ1_0, GgmlType::TQ2_0] {
            let mut q = vec![0u8; ty.row_bytes(512).unwrap()];
            quantize_rows(ty, &x, 512, None, &mut q).unwrap();
            let mut y = vec![0f32; 512];
            dequantize(ty, &q, &mut y).unwrap();
            assert_eq!(x, y, "{ty}");
        }
    }

    /// candle's GGML block decoders are an independent reading of the same formats.
    #[test]
    fn candle_decodes_our_blocks() {
        use candle_core::quantized::k_quants::{
            BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1,
            BlockQ6K, BlockQ8_0, GgmlType as CandleBlock,
        };
        fn decode<B: CandleBlock>(bytes: &[u8], n: usize) -> Vec<f32> {
            assert_eq!(std::mem::size_of::<B>() * (n / B::BLCK_SIZE), bytes.len());
            let blocks: Vec<B> = bytes
                .chunks_exact(std::mem::size_of::<B>())
                // SAFETY: candle's blocks are plain #[repr(C)] structs of integers and f16.
                .map(|c| unsafe { std::ptr::read_unaligned(c.as_ptr() as *const B) })
                .collect();
            let mut y = vec![0f32; n];
            B::to_float(&blocks, &mut y);
            y
        }
        let n = 1024;
        let x = values(n, 11);
        for ty in [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q8_0,
            GgmlType::Q2K,
            GgmlType::Q3K,
            GgmlType::Q4K,
            GgmlType::Q5K,
            GgmlType::Q6K,
        ] {
            let mut q = vec![0u8; ty.row_bytes(n).unwrap()];
            quantize_rows(ty, &x, n, None, &mut q).unwrap();
            let mut ours = vec![0f32; n];
            dequantize(ty, &q, &mut ours).unwrap();
            let theirs = match ty {
                GgmlType::Q4_0 => decode::<BlockQ4_0>(&q, n),
                GgmlType::Q4_1 => decode::<BlockQ4_1>(&q, n),
                GgmlType::Q5_0 => decode::<BlockQ5_0>(&q, n),
                GgmlType::Q5_1 => decode::<BlockQ5_1>(&q, n),
                GgmlType::Q8_0 => decode::<BlockQ8_0>(&q, n),
                GgmlType::Q2K => decode::<BlockQ2K>(&q, n),
                GgmlType::Q3K => decode::<BlockQ3K>(&q, n),
                GgmlType::Q4K => decode::<BlockQ4K>(&q, n),
                GgmlType::Q5K => decode::<BlockQ5K>(&q, n),
                _ => decode::<BlockQ6K>(&q, n),
            };
            for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-6 * (1.0 + a.abs()),
                    "{ty} element {i}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn nearest_int_rounds_half_to_even_like_ggml() {
        use super::kquants::nearest_int_for_tests as ni;
        assert_eq!(
            (ni(0.5), ni(1.5), ni(2.5), ni(-0.5), ni(-1.5)),
            (0, 2, 2, 0, -2)
        );
        assert_eq!((ni(3.49), ni(-3.51)), (3, -4));
    }
}
