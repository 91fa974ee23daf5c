//! MXFP4 matmul and MoE dispatch against naive f64 references on fresh random inputs.
//!
//! Each run draws a new seed (printed; set `XLLM_TEST_SEED` to replay one).

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use xllm::kernels::bytes::SharedBytes;
use xllm::kernels::moe::{self, MoeExperts, MoeWeightsRef, SwigluParams};
use xllm::kernels::mxfp4::{self, Mxfp4Weight, E2M1_VALUES};
use xllm::kernels::mxfp4_int;

fn rng(test: &str) -> StdRng {
    let seed = std::env::var("XLLM_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("{test}: XLLM_TEST_SEED={seed}");
    StdRng::seed_from_u64(seed)
}

/// Random packed weight: every code equally likely, scales around 2^-4 .. 2^3.
fn random_packed(rng: &mut StdRng, out: usize, inp: usize) -> (Vec<u8>, Vec<u8>) {
    let blocks = (0..out * inp / 2).map(|_| rng.random::<u8>()).collect();
    let scales = (0..out * inp / 32)
        .map(|_| rng.random_range(123u8..=130))
        .collect();
    (blocks, scales)
}

fn random_vec(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect()
}

/// Naive f64 dequantization straight from the layout definition.
fn dequant_f64(blocks: &[u8], scales: &[u8], out: usize, inp: usize) -> Vec<f64> {
    let mut w = vec![0f64; out * inp];
    for o in 0..out {
        for i in 0..inp {
            let byte = blocks[o * inp / 2 + i / 2];
            let code = if i % 2 == 0 { byte & 15 } else { byte >> 4 };
            let scale = 2f64.powi(scales[o * inp / 32 + i / 32] as i32 - 127);
            w[o * inp + i] = E2M1_VALUES[code as usize] as f64 * scale;
        }
    }
    w
}

/// `y = x·Wᵀ` in f64 plus, per output, Σ|x·w| (the scale of the rounding error).
fn matmul_f64(x: &[f32], w: &[f64], tokens: usize, inp: usize, out: usize) -> (Vec<f64>, Vec<f64>) {
    let mut y = vec![0f64; tokens * out];
    let mut mag = vec![0f64; tokens * out];
    for t in 0..tokens {
        for o in 0..out {
            for i in 0..inp {
                let p = x[t * inp + i] as f64 * w[o * inp + i];
                y[t * out + o] += p;
                mag[t * out + o] += p.abs();
            }
        }
    }
    (y, mag)
}

fn assert_close(got: &[f32], want: &[f64], mag: &[f64], what: &str) {
    assert_eq!(got.len(), want.len());
    for (k, ((g, w), m)) in got.iter().zip(want).zip(mag).enumerate() {
        let tol = 2e-6 * m + 1e-6;
        assert!(
            (*g as f64 - w).abs() <= tol,
            "{what}: element {k}: got {g}, want {w} (tolerance {tol})"
        );
    }
}

#[test]
fn matmul_matches_f64_dequantize_then_matmul() {
    let mut rng = rng("matmul");
    // (tokens, in, out): one block, odd row counts, token counts around the group size of 4,
    // and a gpt-oss-like row length.
    for (tokens, inp, out) in [
        (1, 32, 1),
        (1, 64, 7),
        (2, 96, 33),
        (3, 160, 5),
        (4, 32, 64),
        (5, 224, 71),
        (9, 2880, 13),
        (17, 96, 130),
        (1, 2880, 300),
    ] {
        let (blocks, scales) = random_packed(&mut rng, out, inp);
        let x = random_vec(&mut rng, tokens * inp);
        let mut y = vec![f32::NAN; tokens * out];
        mxfp4::mxfp4_matmul_cpu(&x, &blocks, &scales, tokens, inp, out, &mut y).unwrap();
        let w = dequant_f64(&blocks, &scales, out, inp);
        let (want, mag) = matmul_f64(&x, &w, tokens, inp, out);
        assert_close(
            &y,
            &want,
            &mag,
            &format!("tokens={tokens} in={inp} out={out}"),
        );
    }
}

/// The integer-activation path (what gpt-oss's experts run on the CPU) within the same tolerance
/// as the f32 kernel: its 24-bit activations move each element by at most `max|x| · 1.2e-7`.
#[test]
fn integer_activation_matmul_matches_f64_dequantize_then_matmul() {
    let mut rng = rng("matmul-int");
    for (tokens, inp, out) in [
        (1, 32, 1),
        (1, 64, 7),
        (2, 96, 33),
        (3, 160, 5),
        (8, 128, 64),
        (9, 2880, 13),
        (17, 96, 130),
        (1, 2880, 300),
    ] {
        let (blocks, scales) = random_packed(&mut rng, out, inp);
        let x = random_vec(&mut rng, tokens * inp);
        let mut y = vec![f32::NAN; tokens * out];
        mxfp4_int::mxfp4_int_matmul_cpu(&x, &blocks, &scales, tokens, inp, out, &mut y).unwrap();
        let w = dequant_f64(&blocks, &scales, out, inp);
        let (want, mag) = matmul_f64(&x, &w, tokens, inp, out);
        assert_close(
            &y,
            &want,
            &mag,
            &format!("tokens={tokens} in={inp} out={out}"),
        );
        // A token's result does not depend on the others in the call (batch invariance).
        let t = tokens - 1;
        let mut alone = vec![0f32; out];
        mxfp4_int::mxfp4_int_matmul_cpu(&x[t * inp..], &blocks, &scales, 1, inp, out, &mut alone)
            .unwrap();
        assert_eq!(alone, y[t * out..]);
    }
}

#[test]
fn dequantize_rows_matches_the_layout_definition() {
    let mut rng = rng("dequantize");
    let (out, inp) = (5, 128);
    let (blocks, scales) = random_packed(&mut rng, out, inp);
    let weight = Mxfp4Weight::new(
        SharedBytes::from_vec(blocks.clone()),
        SharedBytes::from_vec(scales.clone()),
        out,
        inp,
    )
    .unwrap();
    let got = weight.dequantize();
    let want = dequant_f64(&blocks, &scales, out, inp);
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(*g as f64, *w);
    }
}

#[test]
fn candle_op_handles_batches_dtypes_and_strides() {
    let mut rng = rng("candle-op");
    let (inp, out) = (96, 40);
    let (blocks, scales) = random_packed(&mut rng, out, inp);
    let weight = Mxfp4Weight::new(
        SharedBytes::from_vec(blocks.clone()),
        SharedBytes::from_vec(scales.clone()),
        out,
        inp,
    )
    .unwrap();
    let x = random_vec(&mut rng, 2 * 3 * inp);
    let xt = Tensor::from_vec(x.clone(), (2, 3, inp), &Device::Cpu).unwrap();
    let y = weight.forward(&xt).unwrap();
    assert_eq!(y.dims(), &[2, 3, out]);
    let w = dequant_f64(&blocks, &scales, out, inp);
    let (want, mag) = matmul_f64(&x, &w, 6, inp, out);
    assert_close(
        &y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        &want,
        &mag,
        "3-d f32",
    );

    // A transposed (non-contiguous) input gives the same result as its contiguous copy.
    let xt2 = Tensor::from_vec(x.clone(), (inp, 6), &Device::Cpu)
        .unwrap()
        .t()
        .unwrap();
    let a = weight.forward(&xt2).unwrap().to_vec2::<f32>().unwrap();
    let b = weight
        .forward(&xt2.contiguous().unwrap())
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(a, b);

    // bf16 activations come back as bf16.
    let yb = weight.forward(&xt.to_dtype(DType::BF16).unwrap()).unwrap();
    assert_eq!(yb.dtype(), DType::BF16);

    // A wrong feature count is an error naming both sizes.
    let bad = Tensor::zeros((1, 64), DType::F32, &Device::Cpu).unwrap();
    let err = weight.forward(&bad).unwrap_err().to_string();
    assert!(err.contains("64") && err.contains("96"), "{err}");
}

struct RandomMoe {
    experts: usize,
    hidden: usize,
    inter: usize,
    gu: (Vec<u8>, Vec<u8>),
    dn: (Vec<u8>, Vec<u8>),
    gu_bias: Vec<f32>,
    dn_bias: Vec<f32>,
}

fn random_moe(rng: &mut StdRng, experts: usize, hidden: usize, inter: usize) -> RandomMoe {
    let mut gu = random_packed(rng, experts * 2 * inter, hidden);
    let mut dn = random_packed(rng, experts * hidden, inter);
    // Small scales keep the activations in the interesting range of the clamp.
    gu.1.iter_mut().for_each(|s| *s -= 4);
    dn.1.iter_mut().for_each(|s| *s -= 4);
    RandomMoe {
        experts,
        hidden,
        inter,
        gu,
        dn,
        gu_bias: random_vec(rng, experts * 2 * inter),
        dn_bias: random_vec(rng, experts * hidden),
    }
}

const SWIGLU: SwigluParams = SwigluParams {
    limit: 7.0,
    alpha: 1.702,
};

impl RandomMoe {
    fn weights(&self) -> MoeWeightsRef<'_> {
        MoeWeightsRef {
            experts: self.experts,
            hidden: self.hidden,
            intermediate: self.inter,
            gate_up_blocks: &self.gu.0,
            gate_up_scales: &self.gu.1,
            gate_up_bias: &self.gu_bias,
            down_blocks: &self.dn.0,
            down_scales: &self.dn.1,
            down_bias: &self.dn_bias,
            swiglu: SWIGLU,
        }
    }

    /// Per token, per selected expert, in f64 straight from the formulas.
    fn naive(&self, x: &[f32], logits: &[f32], tokens: usize, top_k: usize) -> Vec<f64> {
        let (e, h, i) = (self.experts, self.hidden, self.inter);
        let gu_w = dequant_f64(&self.gu.0, &self.gu.1, e * 2 * i, h);
        let dn_w = dequant_f64(&self.dn.0, &self.dn.1, e * h, i);
        let mut out = vec![0f64; tokens * h];
        for t in 0..tokens {
            let row = &logits[t * e..(t + 1) * e];
            let mut order: Vec<usize> = (0..e).collect();
            order.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap());
            let sel = &order[..top_k];
            let max = row[sel[0]] as f64;
            let z: f64 = sel.iter().map(|&k| (row[k] as f64 - max).exp()).sum();
            for &ex in sel {
                let weight = (row[ex] as f64 - max).exp() / z;
                let mut act = vec![0f64; i];
                for (j, a) in act.iter_mut().enumerate() {
                    let mut g = self.gu_bias[ex * 2 * i + 2 * j] as f64;
                    let mut u = self.gu_bias[ex * 2 * i + 2 * j + 1] as f64;
                    for k in 0..h {
                        let xv = x[t * h + k] as f64;
                        g += xv * gu_w[(ex * 2 * i + 2 * j) * h + k];
                        u += xv * gu_w[(ex * 2 * i + 2 * j + 1) * h + k];
                    }
                    let g = g.min(7.0);
                    let u = u.clamp(-7.0, 7.0);
                    *a = (u + 1.0) * g / (1.0 + (-1.702 * g).exp());
                }
                for o in 0..h {
                    let mut y = self.dn_bias[ex * h + o] as f64;
                    for (k, a) in act.iter().enumerate() {
                        y += a * dn_w[(ex * h + o) * i + k];
                    }
                    out[t * h + o] += weight * y;
                }
            }
        }
        out
    }
}

fn assert_close_rel(got: &[f32], want: &[f64], what: &str) {
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs())).max(1.0);
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (*g as f64 - w).abs() <= 1e-4 * scale,
            "{what}: element {k}: got {g}, want {w} (max |value| {scale})"
        );
    }
}

#[test]
fn moe_matches_naive_per_token_loop() {
    let mut rng = rng("moe");
    for (experts, hidden, inter, top_k, tokens) in [
        (4, 64, 32, 2, 1),
        (8, 96, 64, 4, 1),
        (8, 96, 64, 4, 13),
        (5, 32, 96, 3, 7),
    ] {
        let m = random_moe(&mut rng, experts, hidden, inter);
        let x = random_vec(&mut rng, tokens * hidden);
        let logits = random_vec(&mut rng, tokens * experts);
        let routing = moe::route_top_k(&logits, tokens, experts, top_k).unwrap();
        let mut out = vec![f32::NAN; tokens * hidden];
        moe::moe_cpu(&x, &routing, tokens, &m.weights(), &mut out).unwrap();
        let want = m.naive(&x, &logits, tokens, top_k);
        assert_close_rel(
            &out,
            &want,
            &format!("E={experts} H={hidden} I={inter} k={top_k} T={tokens}"),
        );
    }
}

#[test]
fn decode_reads_only_the_active_experts() {
    let mut rng = rng("moe-active");
    let (experts, hidden, inter, top_k) = (8, 64, 64, 4);
    let mut m = random_moe(&mut rng, experts, hidden, inter);
    let x = random_vec(&mut rng, hidden);
    let logits = random_vec(&mut rng, experts);
    let routing = moe::route_top_k(&logits, 1, experts, top_k).unwrap();
    let active: Vec<usize> = routing.indices.iter().map(|&e| e as usize).collect();
    // Poison every inactive expert: NaN scales (E8M0 255) and NaN biases. Reading any of them
    // (even with a zero routing weight) would turn the output into NaN.
    for e in (0..experts).filter(|e| !active.contains(e)) {
        let gu_scales = 2 * inter * hidden / 32;
        let dn_scales = hidden * inter / 32;
        m.gu.1[e * gu_scales..(e + 1) * gu_scales].fill(255);
        m.dn.1[e * dn_scales..(e + 1) * dn_scales].fill(255);
        m.gu_bias[e * 2 * inter..(e + 1) * 2 * inter].fill(f32::NAN);
        m.dn_bias[e * hidden..(e + 1) * hidden].fill(f32::NAN);
    }
    let mut out = vec![0f32; hidden];
    moe::moe_cpu(&x, &routing, 1, &m.weights(), &mut out).unwrap();
    assert!(
        out.iter().all(|v| v.is_finite()),
        "an inactive expert was read"
    );
    let want = m.naive(&x, &logits, 1, top_k);
    assert_close_rel(&out, &want, "decode");
}

#[test]
fn moe_candle_op_matches_the_slice_function() {
    let mut rng = rng("moe-op");
    let (experts, hidden, inter, top_k, tokens) = (6, 64, 32, 2, 5);
    let m = random_moe(&mut rng, experts, hidden, inter);
    let layer = MoeExperts {
        experts,
        hidden,
        intermediate: inter,
        top_k,
        gate_up_blocks: SharedBytes::from_vec(m.gu.0.clone()),
        gate_up_scales: SharedBytes::from_vec(m.gu.1.clone()),
        gate_up_bias: m.gu_bias.clone(),
        down_blocks: SharedBytes::from_vec(m.dn.0.clone()),
        down_scales: SharedBytes::from_vec(m.dn.1.clone()),
        down_bias: m.dn_bias.clone(),
        swiglu: SWIGLU,
    };
    layer.validate().unwrap();
    let x = random_vec(&mut rng, tokens * hidden);
    let logits = random_vec(&mut rng, tokens * experts);
    let xt = Tensor::from_vec(x.clone(), (tokens, hidden), &Device::Cpu).unwrap();
    let lt = Tensor::from_vec(logits.clone(), (tokens, experts), &Device::Cpu).unwrap();
    let got = layer
        .forward(&xt, &lt)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let want = m.naive(&x, &logits, tokens, top_k);
    assert_close_rel(&got, &want, "candle op");
}
