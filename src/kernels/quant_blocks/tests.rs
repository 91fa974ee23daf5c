//! Dequantization bit for bit against gguf-py's reference (stored fixtures), and our matmul (AVX2
//! as detected, and scalar) against a dequantize-then-f64 product.

use super::*;
use half::f16;

/// Every format our kernels read.
const TYPES: [GgmlType; 12] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::TQ1_0,
    GgmlType::TQ2_0,
];

/// Byte offsets of a format's f16 scale fields (ggml-common.h).
fn f16_fields(ty: GgmlType) -> &'static [usize] {
    match ty {
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
        GgmlType::Q2_K => &[80, 82],
        GgmlType::Q3_K => &[108],
        GgmlType::Q6_K => &[208],
        GgmlType::TQ1_0 => &[52],
        GgmlType::TQ2_0 => &[64],
        _ => &[0],
    }
}

/// `n` blocks of random bytes (a fixed generator from `seed`) whose f16 fields hold finite
/// values of both signs, as quantizers write.
pub(super) fn random_blocks(ty: GgmlType, n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut next = move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 33) as u32
    };
    let mut out: Vec<u8> = (0..n * ty.block_bytes).map(|_| next() as u8).collect();
    for b in out.chunks_exact_mut(ty.block_bytes) {
        for &at in f16_fields(ty) {
            let mag = 0.001 + (next() % 1000) as f32 / 20000.0;
            let v = if next() % 4 == 0 { -mag } else { mag };
            b[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
        }
    }
    out
}

/// (blocks, values) from `tests/fixtures/ggml_blocks/<type>.bin`.
fn fixture(ty: GgmlType) -> (Vec<u8>, Vec<f32>) {
    let path = format!(
        "{}/tests/fixtures/ggml_blocks/{}.bin",
        env!("CARGO_MANIFEST_DIR"),
        ty.name.to_lowercase()
    );
    let raw = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let n = u32::from_le_bytes(raw[..4].try_into().unwrap()) as usize;
    let split = 4 + n * ty.block_bytes;
    let values = raw[split..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect::<Vec<_>>();
    assert_eq!(values.len(), n * ty.block_elems, "{path}");
    (raw[4..split].to_vec(), values)
}

#[test]
fn dequantization_is_bit_exact_against_gguf_py() {
    for ty in TYPES {
        let (blocks, want) = fixture(ty);
        let mut got = vec![0f32; want.len()];
        dequantize(ty, &blocks, &mut got).unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "{ty} element {i}: {g} vs gguf-py {w}"
            );
        }
    }
}

#[test]
fn unsupported_types_are_refused_by_name() {
    let err = QuantMatrix::new(GgmlType::IQ4_XS, vec![0; 136], 1, 256)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("IQ4_XS") && err.contains("not supported"),
        "{err}"
    );
    let err = QuantMatrix::new(GgmlType::Q4_K, vec![0; 100], 1, 256)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("144"), "{err}");
    assert!(QuantMatrix::new(GgmlType::Q4_K, vec![0; 144], 1, 250).is_err());
}

/// `y[i][r] = Σ_c x[i][c] · w[r][c]` in f64, and Σ|x·w| per output (the rounding scale).
fn f64_product(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> (Vec<f64>, Vec<f64>) {
    let mut y = vec![0f64; m * n];
    let mut mag = vec![0f64; m * n];
    for i in 0..m {
        for r in 0..n {
            for c in 0..k {
                let p = x[i * k + c] as f64 * w[r * k + c] as f64;
                y[i * n + r] += p;
                mag[i * n + r] += p.abs();
            }
        }
    }
    (y, mag)
}

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

/// What the kernels compute for 32-element formats, in f64: per block
/// `d_w·d_x·Σ q_w·q_x + c_w·s_x` (the min term uses the block's stored activation sum, as
/// llama.cpp's `Q8_1` does).
fn legacy_product(ty: GgmlType, w: &QuantMatrix, xs: &[f32], m: usize) -> Vec<f64> {
    let xq = q8::quantize_q8(xs, false);
    let blocks = w.cols() / q8::QK;
    let mut y = vec![0f64; m * w.rows()];
    for i in 0..m {
        for r in 0..w.rows() {
            let mut acc = 0f64;
            for (b, x) in w.row(r).chunks_exact(ty.block_bytes).zip(&xq[i * blocks..]) {
                let (q, d, c) = legacy::unpack(ty, b);
                let isum: i64 = q
                    .iter()
                    .zip(&x.qs)
                    .map(|(&a, &b)| a as i64 * b as i64)
                    .sum();
                acc += d as f64 * x.d as f64 * isum as f64 + c as f64 * x.s as f64;
            }
            y[i * w.rows() + r] = acc;
        }
    }
    y
}

/// The activations as the kernels see them (after 8-bit block quantization).
fn quantized_activations(ty: GgmlType, xs: &[f32]) -> Vec<f32> {
    if ty.block_elems == q8::QK {
        q8::quantize_q8(xs, false)
            .iter()
            .flat_map(|b| b.dequantize())
            .collect()
    } else {
        q8::quantize_q8k(xs, false)
            .iter()
            .flat_map(|b| b.dequantize())
            .collect()
    }
}

#[test]
fn matmul_matches_a_dequantized_f64_product() {
    let (n, k) = (37, 512);
    for ty in TYPES {
        let w = QuantMatrix::new(ty, random_blocks(ty, n * k / ty.block_elems, 3), n, k).unwrap();
        let dense = w.dequantize_all();
        for m in [1usize, 2, 4, 7] {
            let xs = activations(m, k, m as u64);
            // Against the quantized activations only float summation order separates the two.
            // (32-element formats: per block `d·x.d·Σq·xq + c·s`, the f16-rounded `s` included.)
            let (quantized, mag) = f64_product(&quantized_activations(ty, &xs), &dense, m, n, k);
            let want = if ty.block_elems == q8::QK {
                legacy_product(ty, &w, &xs, m)
            } else {
                quantized
            };
            let (raw, _) = f64_product(&xs, &dense, m, n, k);
            let x = Tensor::from_vec(xs.clone(), (m, k), &Device::Cpu).unwrap();
            let fast: Vec<f32> = w
                .forward(&x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let scalar = if ty.block_elems == q8::QK {
                w.run(&q8::quantize_q8(&xs, false), m, legacy_kernels(ty, false))
            } else {
                w.run(&q8::quantize_q8k(&xs, false), m, q8k_kernels(ty, false))
            };
            let scale = raw.iter().fold(0f64, |a, v| a.max(v.abs()));
            for i in 0..m {
                for r in 0..n {
                    let j = i * n + r;
                    let tol = 1e-5 * mag[j] + 1e-6;
                    for (path, got) in [("detected", fast[j]), ("scalar", scalar[j])] {
                        assert!(
                            (got as f64 - want[j]).abs() <= tol,
                            "{ty} {path} m={m} [{i},{r}]: {got} vs {} (tol {tol})",
                            want[j]
                        );
                        // Against the unquantized activations: the 8-bit rounding only.
                        assert!(
                            (got as f64 - raw[j]).abs() <= 0.03 * scale,
                            "{ty} {path} m={m} [{i},{r}]: {got} vs exact {}",
                            raw[j]
                        );
                    }
                }
            }
        }
    }
}

/// A row's output is bit-identical whatever the number of activation rows in the matmul (decode
/// alone vs in a batch, prefill tiles), in the detected (AVX2) path and in the scalar one.
#[test]
fn each_output_row_is_independent_of_the_batch_size() {
    let (n, k) = (9, 512);
    for ty in TYPES {
        let w = QuantMatrix::new(ty, random_blocks(ty, n * k / ty.block_elems, 5), n, k).unwrap();
        let xs = activations(9, k, 11);
        for avx2 in [has_avx2_fma_f16c(), false] {
            let run = |rows: &[f32], m: usize| {
                if ty.block_elems == q8::QK {
                    w.run(&q8::quantize_q8(rows, avx2), m, legacy_kernels(ty, avx2))
                } else {
                    w.run(&q8::quantize_q8k(rows, avx2), m, q8k_kernels(ty, avx2))
                }
            };
            let solo: Vec<Vec<f32>> = (0..9).map(|i| run(&xs[i * k..(i + 1) * k], 1)).collect();
            for m in 2..=9 {
                let y = run(&xs[..m * k], m);
                for (i, solo) in solo.iter().enumerate().take(m) {
                    let batched = &y[i * n..(i + 1) * n];
                    assert_eq!(&batched, solo, "{ty} avx2={avx2} m={m} row {i}");
                }
            }
        }
    }
}

#[test]
fn stacked_matrices_give_the_concatenated_outputs() {
    let x = Tensor::from_vec(activations(2, 256, 9), (2, 256), &Device::Cpu).unwrap();
    let make = |rows: usize, ty: GgmlType| {
        QuantMatrix::new(
            ty,
            random_blocks(ty, rows * 256 / ty.block_elems, rows as u64),
            rows,
            256,
        )
        .unwrap()
    };
    let (a, b) = (make(24, GgmlType::Q4_K), make(8, GgmlType::Q4_K));
    let want = Tensor::cat(&[a.forward(&x).unwrap(), b.forward(&x).unwrap()], 1).unwrap();
    let stacked = QuantMatrix::stack(&[&a, &b]).unwrap();
    assert_eq!(stacked.rows(), 32);
    let diff = (stacked.forward(&x).unwrap() - want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0);
    let (c, d) = (make(8, GgmlType::Q4_K), make(8, GgmlType::Q6_K));
    assert!(QuantMatrix::stack(&[&c, &d]).is_none(), "types differ");
}

#[test]
fn gather_rows_returns_dequantized_rows() {
    for ty in [GgmlType::Q5_0, GgmlType::Q6_K] {
        let w =
            QuantMatrix::new(ty, random_blocks(ty, 10 * 256 / ty.block_elems, 1), 10, 256).unwrap();
        let dense = w.dequantize_all();
        let got: Vec<Vec<f32>> = w.gather_rows(&[7, 0, 7]).unwrap().to_vec2().unwrap();
        for (row, id) in got.iter().zip([7usize, 0, 7]) {
            assert_eq!(row.as_slice(), &dense[id * 256..(id + 1) * 256]);
        }
        assert!(w.gather_rows(&[10]).is_err(), "an id past the table");
    }
}

/// Ternary matrices whose rows fill groups of 16 run the group kernels (AVX2 or AVX-512 VNNI, as
/// detected) and the rest the row kernels; both against the dequantize-then-f64 product, decode
/// and prefill shapes, with rows in whole groups, one row past them and a remainder.
#[test]
fn ternary_matrices_in_and_outside_whole_groups_match_the_f64_product() {
    let k = 768;
    for ty in [GgmlType::TQ1_0, GgmlType::TQ2_0] {
        for n in [48usize, 49, 40] {
            let data = random_blocks(ty, n * k / q8::QK_K, 17 + n as u64);
            let w = QuantMatrix::new(ty, data, n, k).unwrap();
            assert_eq!(
                matches!(w.layout, Layout::Tq(_)),
                n % 16 == 0 && has_avx2_fma_f16c(),
                "{ty} rows {n}: layout"
            );
            let dense = w.dequantize_all();
            for m in [1usize, 3, 6] {
                let xs = activations(m, k, 5 + m as u64);
                let (want, mag) = f64_product(&quantized_activations(ty, &xs), &dense, m, n, k);
                let got = w.matmul(&xs, m);
                for (j, (&g, &e)) in got.iter().zip(&want).enumerate() {
                    let tol = 1e-5 * mag[j] + 1e-6;
                    assert!(
                        (g as f64 - e).abs() <= tol,
                        "{ty} rows {n} m={m} [{j}]: {g} vs {e} (tol {tol})"
                    );
                }
            }
        }
    }
}
