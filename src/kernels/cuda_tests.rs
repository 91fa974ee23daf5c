//! GPU-vs-CPU parity of our CUDA kernels on fresh random inputs, and a bandwidth benchmark.
//! Built only with `--features cuda` and run on a machine with a GPU (`scripts/gpu_check.sh`).
//! The references below are straight loops over the checkpoint semantics (the MXFP4 and KV
//! layouts documented in the .cu files), independent of the kernels' tiling.

use super::*;
use half::{bf16, f16};
use rand::{rngs::StdRng, Rng, SeedableRng};

const FP4: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

fn gpu() -> Device {
    Device::new_cuda(0)
        .expect("these tests need a CUDA GPU (run them through scripts/gpu_check.sh)")
}

/// Largest |a - b| relative to the largest |b|.
fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    got.iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
        / scale
}

fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 1e-4,
        _ => 1e-2,
    }
}

/// `values` rounded through `dtype` (what the GPU actually receives).
fn round_through(values: &[f32], dtype: DType) -> Vec<f32> {
    values
        .iter()
        .map(|&v| match dtype {
            DType::BF16 => bf16::from_f32(v).to_f32(),
            DType::F16 => f16::from_f32(v).to_f32(),
            _ => v,
        })
        .collect()
}

fn to_vec(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

struct RandomMxfp4 {
    blocks: Vec<u8>,
    scales: Vec<u8>,
    bias: Vec<f32>,
}

fn random_mxfp4(rng: &mut StdRng, experts: usize, out: usize, inf: usize) -> RandomMxfp4 {
    let nb = inf / 32;
    RandomMxfp4 {
        blocks: (0..experts * out * nb * 16).map(|_| rng.random()).collect(),
        // Exponents around 2^-4..2^3 keep sums in a sane range.
        scales: (0..experts * out * nb)
            .map(|_| rng.random_range(123..=130))
            .collect(),
        bias: (0..experts * out)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect(),
    }
}

/// One expert's dequantized weight `[out, in]`.
fn dequant(w: &RandomMxfp4, expert: usize, out: usize, inf: usize) -> Vec<f32> {
    let nb = inf / 32;
    let mut dense = vec![0f32; out * inf];
    for o in 0..out {
        for b in 0..nb {
            let row = expert * out + o;
            let scale = 2f32.powi(w.scales[row * nb + b] as i32 - 127);
            for j in 0..16 {
                let byte = w.blocks[(row * nb + b) * 16 + j];
                dense[o * inf + b * 32 + 2 * j] = FP4[(byte & 15) as usize] * scale;
                dense[o * inf + b * 32 + 2 * j + 1] = FP4[(byte >> 4) as usize] * scale;
            }
        }
    }
    dense
}

fn matvec(w: &[f32], bias: &[f32], x: &[f32], out: usize, inf: usize) -> Vec<f32> {
    (0..out)
        .map(|o| (0..inf).map(|k| w[o * inf + k] * x[k]).sum::<f32>() + bias[o])
        .collect()
}

fn upload_weight(
    w: &RandomMxfp4,
    experts: Option<usize>,
    out: usize,
    inf: usize,
    dev: &Device,
) -> (Tensor, Tensor, Tensor) {
    let nb = inf / 32;
    let (blocks, scales, bias) = match experts {
        Some(e) => (
            Tensor::from_vec(w.blocks.clone(), (e, out, nb, 16), dev),
            Tensor::from_vec(w.scales.clone(), (e, out, nb), dev),
            Tensor::from_vec(w.bias.clone(), (e, out), dev),
        ),
        None => (
            Tensor::from_vec(w.blocks.clone(), (out, nb, 16), dev),
            Tensor::from_vec(w.scales.clone(), (out, nb), dev),
            Tensor::from_vec(w.bias.clone(), out, dev),
        ),
    };
    (blocks.unwrap(), scales.unwrap(), bias.unwrap())
}

#[test]
fn mxfp4_matmul_matches_cpu_reference() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(7);
    let (out, inf) = (200, 320);
    let w = random_mxfp4(&mut rng, 1, out, inf);
    let dense = dequant(&w, 0, out, inf);
    let (blocks, scales, bias) = upload_weight(&w, None, out, inf, &dev);
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        // 1..8 rows take the decode kernel, more the tiled prefill kernel (with ragged tiles).
        for tokens in [1, 3, 8, 9, 70, 130] {
            let x: Vec<f32> = (0..tokens * inf)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let x = round_through(&x, dtype);
            let xt = Tensor::from_vec(x.clone(), (tokens, inf), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let y = mxfp4_matmul(
                &xt,
                &DeviceMxfp4 {
                    blocks: &blocks,
                    scales: &scales,
                    bias: Some(&bias),
                },
            )
            .unwrap();
            assert_eq!(y.dims(), [tokens, out]);
            assert_eq!(y.dtype(), dtype);
            let bias_r = round_through(&w.bias, dtype);
            let want: Vec<f32> = x
                .chunks(inf)
                .flat_map(|row| matvec(&dense, &bias_r, row, out, inf))
                .collect();
            let err = rel_err(&to_vec(&y), &want);
            assert!(
                err <= tolerance(dtype),
                "{dtype:?} tokens={tokens}: relative error {err}"
            );
        }
    }
}

#[test]
fn mxfp4_matmul_rejects_mismatched_shapes() {
    let dev = gpu();
    let blocks = Tensor::zeros((4, 2, 16), DType::U8, &dev).unwrap();
    let scales = Tensor::zeros((4, 2), DType::U8, &dev).unwrap();
    let x = Tensor::zeros((1, 32), DType::F32, &dev).unwrap();
    let err = mxfp4_matmul(
        &x,
        &DeviceMxfp4 {
            blocks: &blocks,
            scales: &scales,
            bias: None,
        },
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("input has 32 features, the weight expects 64"),
        "{err}"
    );
}

fn swiglu(gate: f32, up: f32, limit: f32) -> f32 {
    let gate = gate.min(limit);
    let up = up.clamp(-limit, limit);
    (up + 1.0) * gate / (1.0 + (-SWIGLU_ALPHA * gate).exp())
}

#[test]
fn moe_forward_matches_cpu_reference() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(11);
    let (experts, hidden, inter, k) = (8, 64, 96, 3);
    let gu = random_mxfp4(&mut rng, experts, 2 * inter, hidden);
    let down = random_mxfp4(&mut rng, experts, hidden, inter);
    let gu_dense: Vec<Vec<f32>> = (0..experts)
        .map(|e| dequant(&gu, e, 2 * inter, hidden))
        .collect();
    let down_dense: Vec<Vec<f32>> = (0..experts)
        .map(|e| dequant(&down, e, hidden, inter))
        .collect();
    let (gub, gus, gubias) = upload_weight(&gu, Some(experts), 2 * inter, hidden, &dev);
    let (db, ds, dbias) = upload_weight(&down, Some(experts), hidden, inter, &dev);
    let moe = DeviceMoe {
        gate_up: DeviceMxfp4 {
            blocks: &gub,
            scales: &gus,
            bias: Some(&gubias),
        },
        down: DeviceMxfp4 {
            blocks: &db,
            scales: &ds,
            bias: Some(&dbias),
        },
        top_k: k,
        swiglu_limit: SWIGLU_LIMIT,
    };
    for tokens in [1, 5, 8, 40] {
        let x: Vec<f32> = (0..tokens * hidden)
            .map(|_| rng.random_range(-0.3..0.3))
            .collect();
        let logits: Vec<f32> = (0..tokens * experts)
            .map(|_| rng.random_range(-2.0..2.0))
            .collect();
        let xt = Tensor::from_vec(x.clone(), (tokens, hidden), &dev).unwrap();
        let lt = Tensor::from_vec(logits.clone(), (tokens, experts), &dev).unwrap();
        let got = to_vec(&moe_forward(&xt, &lt, &moe).unwrap());

        let mut want = vec![0f32; tokens * hidden];
        for t in 0..tokens {
            let row = &logits[t * experts..(t + 1) * experts];
            let mut order: Vec<usize> = (0..experts).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            let chosen = &order[..k];
            let top = row[chosen[0]];
            let denom: f32 = chosen.iter().map(|&e| (row[e] - top).exp()).sum();
            for &e in chosen {
                let weight = (row[e] - top).exp() / denom;
                let xs = &x[t * hidden..(t + 1) * hidden];
                let g = matvec(
                    &gu_dense[e],
                    &gu.bias[e * 2 * inter..(e + 1) * 2 * inter],
                    xs,
                    2 * inter,
                    hidden,
                );
                let act: Vec<f32> = (0..inter)
                    .map(|i| swiglu(g[2 * i], g[2 * i + 1], SWIGLU_LIMIT))
                    .collect();
                let d = matvec(
                    &down_dense[e],
                    &down.bias[e * hidden..(e + 1) * hidden],
                    &act,
                    hidden,
                    inter,
                );
                for h in 0..hidden {
                    want[t * hidden + h] += weight * d[h];
                }
            }
        }
        let err = rel_err(&got, &want);
        assert!(err <= 1e-4, "tokens={tokens}: relative error {err}");
    }
}

/// E4M3 value of a byte (finite codes only are ever produced).
fn e4m3_value(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let (e, m) = (((b >> 3) & 15) as i32, (b & 7) as f32);
    sign * if e == 0 {
        m / 8.0 * 2f32.powi(-6)
    } else {
        (1.0 + m / 8.0) * 2f32.powi(e - 7)
    }
}

/// Nearest finite E4M3 code of the same sign, ties to the even code, saturating at ±448.
fn e4m3_encode(v: f32) -> u8 {
    let sign = if v.is_sign_negative() { 0x80u8 } else { 0 };
    let mag = v.abs().min(448.0);
    let mut best = 0u8;
    for code in 0u8..=0x7e {
        let (d_new, d_best) = (
            (e4m3_value(code) - mag).abs(),
            (e4m3_value(best) - mag).abs(),
        );
        if d_new < d_best || (d_new == d_best && code % 2 == 0 && best % 2 == 1) {
            best = code;
        }
    }
    sign | best
}

/// The bytes of state::kv_quant's host path, one row at a time.
fn quantize_row(row: &[f32], code: KvCode) -> (Vec<u8>, f16) {
    let max_code = if code == KvCode::Int8 { 127.0 } else { 448.0 };
    let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = f16::from_f32((amax / max_code).min(65504.0));
    let divisor = if scale.to_f32() == 0.0 {
        1.0
    } else {
        scale.to_f32()
    };
    let bytes = row
        .iter()
        .map(|v| match code {
            KvCode::Int8 => ((v / divisor).round().clamp(-127.0, 127.0) + 128.0) as u8,
            KvCode::Fp8 => e4m3_encode(v / divisor),
        })
        .collect();
    (bytes, scale)
}

fn activations(rng: &mut StdRng, n: usize, dim: usize) -> Vec<f32> {
    let mut data: Vec<f32> = (0..n * dim).map(|_| rng.random_range(-3.0..3.0)).collect();
    for (i, row) in data.chunks_mut(dim).enumerate() {
        match i % 7 {
            0 => row.fill(0.0),
            1 => row[i % dim] = 900.0,
            2 => row.iter_mut().for_each(|v| *v *= 1e-3),
            _ => {}
        }
    }
    data
}

#[test]
fn kv_quantize_writes_the_cpu_bytes() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(3);
    let (heads, cap, dim, pos, tokens) = (3, 16, 64, 5, 7);
    for code in [KvCode::Int8, KvCode::Fp8] {
        for dtype in [DType::F32, DType::BF16] {
            let src = round_through(&activations(&mut rng, heads * tokens, dim), dtype);
            let st = Tensor::from_vec(src.clone(), (1, heads, tokens, dim), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let code_dtype = if code == KvCode::Int8 {
                DType::U8
            } else {
                DType::F8E4M3
            };
            let codes = Tensor::zeros((1, heads, cap, dim), code_dtype, &dev).unwrap();
            let scales = Tensor::zeros((1, heads, cap, 1), DType::F16, &dev).unwrap();
            kv_quantize_into(
                &st,
                &QuantPlane {
                    codes: &codes,
                    scales: &scales,
                },
                pos,
                code,
            )
            .unwrap();
            // Codes read back as f32 (int8: the byte; fp8: candle's decoding): equal bit patterns
            // mean equal bytes, -0.0 included.
            let got_codes = to_vec(&codes);
            let got_scales = scales.flatten_all().unwrap().to_vec1::<f16>().unwrap();
            for h in 0..heads {
                for t in 0..cap {
                    let at = h * cap + t;
                    let (want_codes, want_scale) = if (pos..pos + tokens).contains(&t) {
                        let row = &src[(h * tokens + t - pos) * dim..][..dim];
                        quantize_row(row, code)
                    } else {
                        (vec![0u8; dim], f16::ZERO) // untouched
                    };
                    let want: Vec<u32> = want_codes
                        .iter()
                        .map(|&b| {
                            if code == KvCode::Int8 {
                                b as f32
                            } else {
                                e4m3_value(b)
                            }
                            .to_bits()
                        })
                        .collect();
                    let got: Vec<u32> = got_codes[at * dim..][..dim]
                        .iter()
                        .map(|v| v.to_bits())
                        .collect();
                    assert_eq!(got, want, "{code:?} {dtype:?} head {h} token {t}");
                    assert_eq!(
                        got_scales[at].to_bits(),
                        want_scale.to_bits(),
                        "{code:?} {dtype:?} scale head {h} token {t}"
                    );
                }
            }
        }
    }
}

/// Naive attention for one head: softmax over visible keys plus the sink column.
#[allow(clippy::too_many_arguments)]
fn attention_ref(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dim: usize,
    pos: usize,
    window: usize,
    sink: Option<f32>,
    scale: f32,
) -> Vec<f32> {
    let first = if window > 0 {
        (pos + 1).saturating_sub(window)
    } else {
        0
    };
    let scores: Vec<f32> = (first..=pos)
        .map(|j| (0..dim).map(|d| q[d] * k[j * dim + d]).sum::<f32>() * scale)
        .collect();
    let big = scores
        .iter()
        .copied()
        .chain(sink)
        .fold(f32::NEG_INFINITY, f32::max);
    let denom: f32 =
        scores.iter().map(|s| (s - big).exp()).sum::<f32>() + sink.map_or(0.0, |s| (s - big).exp());
    (0..dim)
        .map(|d| {
            scores
                .iter()
                .enumerate()
                .map(|(i, s)| (s - big).exp() * v[(first + i) * dim + d])
                .sum::<f32>()
                / denom
        })
        .collect()
}

#[test]
fn attention_matches_cpu_reference_dense_and_quantized() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(5);
    let (heads, kv_heads, dim, cap) = (8, 2, 64, 96);
    let scale = 1.0 / (dim as f32).sqrt();
    for (q_len, kv_len, window, with_sinks) in [
        (1, 70, 0, true),
        (1, 70, 16, true),
        (20, 50, 0, false),
        (33, 90, 8, true),
    ] {
        for dtype in [DType::F32, DType::BF16] {
            let q = round_through(&activations(&mut rng, heads * q_len, dim), dtype);
            let k = round_through(&activations(&mut rng, kv_heads * cap, dim), dtype);
            let v = round_through(&activations(&mut rng, kv_heads * cap, dim), dtype);
            let sinks: Vec<f32> = (0..heads).map(|_| rng.random_range(-1.0..3.0)).collect();
            let qt = Tensor::from_vec(q.clone(), (1, heads, q_len, dim), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let kt = Tensor::from_vec(k.clone(), (1, kv_heads, cap, dim), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let vt = Tensor::from_vec(v.clone(), (1, kv_heads, cap, dim), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let st = Tensor::from_vec(sinks.clone(), heads, &dev).unwrap();
            let params = AttentionParams {
                sinks: with_sinks.then_some(&st),
                window,
                softmax_scale: scale,
                kv_len,
            };

            let reference = |k: &[f32], v: &[f32]| -> Vec<f32> {
                let mut out = Vec::with_capacity(heads * q_len * dim);
                for h in 0..heads {
                    let kvh = h / (heads / kv_heads);
                    let (kh, vh) = (
                        &k[kvh * cap * dim..][..cap * dim],
                        &v[kvh * cap * dim..][..cap * dim],
                    );
                    for i in 0..q_len {
                        let qrow = &q[(h * q_len + i) * dim..][..dim];
                        let sink = with_sinks.then_some(sinks[h]);
                        out.extend(attention_ref(
                            qrow,
                            kh,
                            vh,
                            dim,
                            kv_len - q_len + i,
                            window,
                            sink,
                            scale,
                        ));
                    }
                }
                out
            };

            let dense = attention(&qt, &KvView::Dense { k: &kt, v: &vt }, &params).unwrap();
            let err = rel_err(&to_vec(&dense), &reference(&k, &v));
            assert!(
                err <= tolerance(dtype),
                "dense {dtype:?} q_len={q_len} window={window}: {err}"
            );

            for code in [KvCode::Int8, KvCode::Fp8] {
                let code_dtype = if code == KvCode::Int8 {
                    DType::U8
                } else {
                    DType::F8E4M3
                };
                let plane = || {
                    (
                        Tensor::zeros((1, kv_heads, cap, dim), code_dtype, &dev).unwrap(),
                        Tensor::zeros((1, kv_heads, cap, 1), DType::F16, &dev).unwrap(),
                    )
                };
                let ((kc, ks), (vc, vs)) = (plane(), plane());
                kv_quantize_into(
                    &kt,
                    &QuantPlane {
                        codes: &kc,
                        scales: &ks,
                    },
                    0,
                    code,
                )
                .unwrap();
                kv_quantize_into(
                    &vt,
                    &QuantPlane {
                        codes: &vc,
                        scales: &vs,
                    },
                    0,
                    code,
                )
                .unwrap();
                // Reference on the host-dequantized cache: checks the attention math, not the codec
                // (kv_quantize_writes_the_cpu_bytes checks that).
                let dequant = |c: &Tensor, s: &Tensor| -> Vec<f32> {
                    let codes = to_vec(c);
                    let scales = to_vec(s);
                    codes
                        .iter()
                        .enumerate()
                        .map(|(i, &c)| if code == KvCode::Int8 { c - 128.0 } else { c } * scales[i / dim])
                        .collect()
                };
                let view = KvView::Quantized {
                    code,
                    k: QuantPlane {
                        codes: &kc,
                        scales: &ks,
                    },
                    v: QuantPlane {
                        codes: &vc,
                        scales: &vs,
                    },
                };
                let got = attention(&qt, &view, &params).unwrap();
                let err = rel_err(
                    &to_vec(&got),
                    &reference(&dequant(&kc, &ks), &dequant(&vc, &vs)),
                );
                assert!(
                    err <= tolerance(dtype),
                    "{code:?} {dtype:?} q_len={q_len} window={window}: {err}"
                );
            }
        }
    }
}

/// Decode-speed check against the device's own bandwidth, in one run: one token through a
/// gpt-oss-20b-shaped MoE layer (32 experts, top-4, hidden 2880, MXFP4) versus a device-to-device
/// copy. Prints the achieved fraction of the copy bandwidth. `--ignored` (scripts/gpu_check.sh).
#[test]
#[ignore = "benchmark: needs a GPU with ~1 GB free; run by scripts/gpu_check.sh"]
fn bench_moe_decode_against_copy_bandwidth() {
    let dev = gpu();
    let (experts, hidden, inter, k) = (32usize, 2880usize, 2880usize, 4usize);
    let mut state = 0x9e3779b97f4a7c15u64;
    let mut bytes = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    };
    let up = |v: Vec<u8>, shape: &[usize]| Tensor::from_vec(v, shape, &dev).unwrap();
    let gub = up(
        bytes(experts * 2 * inter * hidden / 2),
        &[experts, 2 * inter, hidden / 32, 16],
    );
    let gus = up(
        vec![124u8; experts * 2 * inter * hidden / 32],
        &[experts, 2 * inter, hidden / 32],
    );
    let db = up(
        bytes(experts * hidden * inter / 2),
        &[experts, hidden, inter / 32, 16],
    );
    let ds = up(
        vec![124u8; experts * hidden * inter / 32],
        &[experts, hidden, inter / 32],
    );
    let gubias = Tensor::zeros((experts, 2 * inter), DType::BF16, &dev).unwrap();
    let dbias = Tensor::zeros((experts, hidden), DType::BF16, &dev).unwrap();
    let moe = DeviceMoe {
        gate_up: DeviceMxfp4 {
            blocks: &gub,
            scales: &gus,
            bias: Some(&gubias),
        },
        down: DeviceMxfp4 {
            blocks: &db,
            scales: &ds,
            bias: Some(&dbias),
        },
        top_k: k,
        swiglu_limit: SWIGLU_LIMIT,
    };
    let time = |f: &dyn Fn(), reps: usize| -> f64 {
        f();
        dev.synchronize().unwrap();
        let start = std::time::Instant::now();
        for _ in 0..reps {
            f();
        }
        dev.synchronize().unwrap();
        start.elapsed().as_secs_f64() / reps as f64
    };

    // Peer: a 1 GiB device-to-device copy (bytes read + written).
    let big = Tensor::zeros(1usize << 28, DType::F32, &dev).unwrap();
    let copy_s = time(&|| drop(big.copy().unwrap()), 20);
    let copy_bw = 2.0 * (1u64 << 30) as f64 / copy_s;

    let x = Tensor::ones((1, hidden), DType::BF16, &dev)
        .unwrap()
        .affine(0.01, 0.0)
        .unwrap();
    // Distinct experts each step so nothing stays in L2 between steps.
    let mut rng = StdRng::seed_from_u64(1);
    let logits: Vec<Tensor> = (0..64)
        .map(|_| {
            Tensor::from_vec(
                (0..experts)
                    .map(|_| rng.random::<f32>())
                    .collect::<Vec<_>>(),
                (1, experts),
                &dev,
            )
            .unwrap()
        })
        .collect();
    let step = std::cell::Cell::new(0usize);
    let moe_s = time(
        &|| {
            let i = step.get();
            step.set(i + 1);
            drop(moe_forward(&x, &logits[i % logits.len()], &moe).unwrap());
        },
        200,
    );
    let per_expert = (2 * inter * hidden / 32) * 17 + (hidden * inter / 32) * 17;
    let touched = (k * per_expert) as f64;
    let moe_bw = touched / moe_s;
    println!(
        "device copy bandwidth: {:.0} GB/s (read + write)",
        copy_bw / 1e9
    );
    println!(
        "MoE decode (1 token, top-{k} of {experts}, MXFP4 {hidden}x{inter}): {:.1} us, {:.1} MB touched, {:.0} GB/s = {:.2} of copy bandwidth",
        moe_s * 1e6,
        touched / 1e6,
        moe_bw / 1e9,
        moe_bw / copy_bw
    );

    // Prefill: 512 tokens through one expert-sized dense MXFP4 matmul.
    let w0 = DeviceMxfp4 {
        blocks: &gub.get(0).unwrap(),
        scales: &gus.get(0).unwrap(),
        bias: None,
    };
    let xp = Tensor::ones((512, hidden), DType::BF16, &dev).unwrap();
    let mm_s = time(&|| drop(mxfp4_matmul(&xp, &w0).unwrap()), 20);
    let flops = 2.0 * 512.0 * (2 * inter) as f64 * hidden as f64;
    println!(
        "MXFP4 prefill matmul 512x{hidden} -> {}: {:.1} us, {:.1} TFLOP/s",
        2 * inter,
        mm_s * 1e6,
        flops / mm_s / 1e12
    );
}

/// The CPU ops of `kernels::mxfp4` / `kernels::moe` (the project's references) against their own
/// `cuda_fwd`, on the same inputs.
#[test]
fn cpu_ops_and_their_cuda_fwd_agree() {
    use crate::kernels::bytes::SharedBytes;
    use crate::kernels::{moe, mxfp4};
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(19);
    let (out, inf) = (96, 128);
    let w = random_mxfp4(&mut rng, 1, out, inf);
    let weight = mxfp4::Mxfp4Weight::new(
        SharedBytes::from_vec(w.blocks),
        SharedBytes::from_vec(w.scales),
        out,
        inf,
    )
    .unwrap();
    for tokens in [1, 5, 37] {
        let x = Tensor::from_vec(
            (0..tokens * inf)
                .map(|_| rng.random_range(-1.0f32..1.0))
                .collect::<Vec<_>>(),
            (tokens, inf),
            &Device::Cpu,
        )
        .unwrap();
        let cpu = to_vec(&weight.forward(&x).unwrap());
        let cuda = to_vec(&weight.forward(&x.to_device(&dev).unwrap()).unwrap());
        let err = rel_err(&cuda, &cpu);
        assert!(err <= 1e-4, "mxfp4 op, tokens={tokens}: {err}");
    }

    let (experts, hidden, inter, k) = (6, 64, 64, 2);
    let gu = random_mxfp4(&mut rng, experts, 2 * inter, hidden);
    let dn = random_mxfp4(&mut rng, experts, hidden, inter);
    let layer = moe::MoeExperts {
        experts,
        hidden,
        intermediate: inter,
        top_k: k,
        gate_up_blocks: SharedBytes::from_vec(gu.blocks),
        gate_up_scales: SharedBytes::from_vec(gu.scales),
        gate_up_bias: gu.bias,
        down_blocks: SharedBytes::from_vec(dn.blocks),
        down_scales: SharedBytes::from_vec(dn.scales),
        down_bias: dn.bias,
        swiglu: moe::SwigluParams {
            limit: SWIGLU_LIMIT,
            alpha: SWIGLU_ALPHA,
        },
    };
    for tokens in [1, 9, 30] {
        let x = Tensor::from_vec(
            (0..tokens * hidden)
                .map(|_| rng.random_range(-0.3f32..0.3))
                .collect::<Vec<_>>(),
            (tokens, hidden),
            &Device::Cpu,
        )
        .unwrap();
        let logits = Tensor::from_vec(
            (0..tokens * experts)
                .map(|_| rng.random_range(-2.0f32..2.0))
                .collect::<Vec<_>>(),
            (tokens, experts),
            &Device::Cpu,
        )
        .unwrap();
        let cpu = to_vec(&layer.forward(&x, &logits).unwrap());
        let cuda = to_vec(
            &layer
                .forward(
                    &x.to_device(&dev).unwrap(),
                    &logits.to_device(&dev).unwrap(),
                )
                .unwrap(),
        );
        let err = rel_err(&cuda, &cpu);
        assert!(err <= 1e-4, "moe op, tokens={tokens}: {err}");
    }
}

/// The engine's kv_int8 / kv_fp8 stores on CUDA (fused quantize kernel) return what the CPU
/// stores return, and hold less device memory than the bf16 cache (measured with cuMemGetInfo).
#[test]
fn quantized_kv_stores_on_cuda_match_cpu_and_save_device_memory() {
    use crate::quant::KvProfile;
    use crate::state::kv_cache::{new_store, KvLayout};
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(23);
    let layout = KvLayout {
        kv_heads: 8,
        head_dim: 64,
        max_tokens: 1024,
    };
    for profile in [KvProfile::KvInt8, KvProfile::KvFp8] {
        let mut cpu = new_store(profile, layout, DType::F32, &Device::Cpu).unwrap();
        let mut cuda = new_store(profile, layout, DType::F32, &dev).unwrap();
        for tokens in [37, 1, 300] {
            let k = Tensor::from_vec(
                activations(&mut rng, 8 * tokens, 64),
                (1, 8, tokens, 64),
                &Device::Cpu,
            )
            .unwrap();
            let v = Tensor::from_vec(
                activations(&mut rng, 8 * tokens, 64),
                (1, 8, tokens, 64),
                &Device::Cpu,
            )
            .unwrap();
            let (kc, vc) = cpu.append(&k, &v).unwrap();
            let (kg, vg) = cuda
                .append(&k.to_device(&dev).unwrap(), &v.to_device(&dev).unwrap())
                .unwrap();
            assert!(
                rel_err(&to_vec(&kg), &to_vec(&kc)) <= 1e-6,
                "{profile} K after {tokens}"
            );
            assert!(
                rel_err(&to_vec(&vg), &to_vec(&vc)) <= 1e-6,
                "{profile} V after {tokens}"
            );
        }
    }

    // gpt-oss-20b's cache shape (24 layers × 8 KV heads × 64) for 4096 tokens.
    let Device::Cuda(cuda_dev) = &dev else {
        unreachable!()
    };
    let free = || cuda_dev.cuda_stream().context().mem_get_info().unwrap().0 as i64;
    let layout = KvLayout {
        kv_heads: 8,
        head_dim: 64,
        max_tokens: 4096,
    };
    let kv = Tensor::zeros((1, 8, 4096, 64), DType::BF16, &dev).unwrap();
    let mut used = Vec::new();
    for profile in [KvProfile::Default, KvProfile::KvInt8, KvProfile::KvFp8] {
        dev.synchronize().unwrap();
        let before = free();
        let mut layers: Vec<_> = (0..24)
            .map(|_| new_store(profile, layout, DType::BF16, &dev).unwrap())
            .collect();
        for layer in &mut layers {
            drop(layer.append(&kv, &kv).unwrap());
        }
        dev.synchronize().unwrap();
        let bytes = before - free();
        println!(
            "{profile}: {:.1} MB of device memory for 4096 tokens × 24 layers",
            bytes as f64 / 1e6
        );
        used.push(bytes);
        drop(layers);
    }
    assert!(
        used[1] < used[0] && used[2] < used[0],
        "quantized caches must use less device memory: {used:?}"
    );
}

/// ssm.cu against the CPU Mamba2 kernels (`kernels::ssm`) at Nemotron 3 Nano's widths: conv with
/// its state, the scan over a prompt and then one decode token (states carried on each side),
/// and the grouped gated norm.
#[test]
fn ssm_kernels_match_the_cpu() {
    use crate::kernels::ssm::{CausalConv1d, GatedGroupNorm, ScanInput, SsmScan};
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(17);
    let mut vals = |len: usize, scale: f32| -> Vec<f32> {
        (0..len)
            .map(|_| rng.random_range(-1.0f32..1.0) * scale)
            .collect()
    };
    let (heads, p, g, n, k) = (64usize, 64usize, 8usize, 128usize, 4usize);
    let inner = heads * p;
    let cd = inner + 2 * g * n;
    let up = |v: &[f32], shape: &[usize]| Tensor::from_slice(v, shape, &dev).unwrap();
    let weight = vals(cd * k, 0.5);
    let bias = vals(cd, 0.1);
    let conv = CausalConv1d::new(&weight, Some(&bias), cd, k).unwrap();
    let mut taps = vec![0f32; k * cd];
    for c in 0..cd {
        for j in 0..k {
            taps[j * cd + c] = weight[c * k + j];
        }
    }
    let a: Vec<f32> = vals(heads, 1.0)
        .iter()
        .map(|v| -(v.abs() * 15.0 + 1.0))
        .collect();
    let d = vals(heads, 1.0);
    let dt_bias: Vec<f32> = vals(heads, 0.5).iter().map(|v| v - 3.0).collect();
    let scan = SsmScan {
        heads,
        head_dim: p,
        groups: g,
        state: n,
        a: a.clone(),
        d: d.clone(),
        dt_bias: dt_bias.clone(),
        dt_min: 0.001,
        chunk: 16,
    };
    let (a_t, d_t, bias_t) = (up(&a, &[heads]), up(&d, &[heads]), up(&dt_bias, &[heads]));
    let device_scan = DeviceScan {
        a: &a_t,
        d: &d_t,
        dt_bias: &bias_t,
        head_dim: p,
        groups: g,
        state: n,
        dt_min: 0.001,
    };
    let norm_weight = vals(inner, 1.0);
    let norm = GatedGroupNorm {
        weight: norm_weight.clone(),
        group_size: inner / g,
        eps: 1e-5,
    };
    let mut cpu_conv_state = vals((k - 1) * cd, 1.0);
    let mut cpu_ssm_state = vec![0f32; heads * p * n];
    let gpu_conv_state = up(&cpu_conv_state, &[k - 1, cd]);
    let gpu_ssm_state = up(&cpu_ssm_state, &[heads, p, n]);
    let (taps_t, bias_t2, norm_w) = (
        up(&taps, &[k, cd]),
        up(&bias, &[cd]),
        up(&norm_weight, &[inner]),
    );
    for tokens in [37usize, 1] {
        let stride = cd + 5;
        let x = vals(tokens * stride, 1.0);
        let dt = vals(tokens * heads, 1.0);
        let z = vals(tokens * (inner + 3), 1.0);
        let mut xbc = vec![0f32; tokens * cd];
        conv.forward(&x, stride, tokens, &mut cpu_conv_state, &mut xbc)
            .unwrap();
        let mut y = vec![0f32; tokens * inner];
        let input = ScanInput {
            xbc: &xbc,
            stride: cd,
            dt: &dt,
            tokens,
        };
        scan.forward(input, &mut cpu_ssm_state, &mut y).unwrap();
        let mut normed = vec![0f32; tokens * inner];
        norm.forward(&y, &z, inner + 3, &mut normed).unwrap();

        let g_xbc = ssm_conv1d(
            &up(&x, &[tokens, stride]),
            &taps_t,
            Some(&bias_t2),
            &gpu_conv_state,
        )
        .unwrap();
        assert!(
            rel_err(&to_vec(&g_xbc), &xbc) < 1e-5,
            "conv ({tokens} tokens)"
        );
        assert!(
            rel_err(&to_vec(&gpu_conv_state), &cpu_conv_state) < 1e-6,
            "conv state"
        );
        let g_y = ssm_scan(
            &g_xbc,
            &up(&dt, &[tokens, heads]),
            &device_scan,
            &gpu_ssm_state,
        )
        .unwrap();
        assert!(rel_err(&to_vec(&g_y), &y) < 1e-4, "scan ({tokens} tokens)");
        assert!(
            rel_err(&to_vec(&gpu_ssm_state), &cpu_ssm_state) < 1e-4,
            "ssm state"
        );
        let g_norm = ssm_gated_norm(
            &g_y,
            &up(&z, &[tokens, inner + 3]),
            &norm_w,
            inner / g,
            1e-5,
        )
        .unwrap();
        assert!(
            rel_err(&to_vec(&g_norm), &normed) < 1e-4,
            "gated norm ({tokens} tokens)"
        );
    }
}
