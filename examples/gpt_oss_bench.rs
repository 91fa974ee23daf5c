//! gpt-oss speed and memory checks, peers measured in the same run.
//!
//! `cargo run --release --example gpt_oss_bench -- kernel`
//!     MXFP4 matmul (ours) vs dequantize-to-bf16-then-matmul and vs weights pre-expanded to
//!     bf16/f32 (candle matmul), on gpt-oss-20b's gate_up shape (5760 × 2880), cycling over 8
//!     experts so weights stream from memory as in decode. Prints times and ratios.
//! `cargo run --release --example gpt_oss_bench -- model DIR [prompt_tokens] [decode_tokens]`
//!     Loads a gpt-oss folder, prints RSS after load and peak RSS next to the checkpoint size,
//!     then prefill and decode throughput.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use xllm::arch::gpt_oss::GptOss;
use xllm::arch::CausalLm;
use xllm::kernels::mxfp4;
use xllm::quant::KvProfile;

fn proc_status_kb(key: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Deterministic pseudo-random bytes (xorshift), so runs are comparable.
fn bytes(n: usize, seed: u64, lo: u8, span: u8) -> Vec<u8> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            lo.wrapping_add((s % span as u64) as u8)
        })
        .collect()
}

fn time<F: FnMut()>(iters: usize, mut f: F) -> f64 {
    f(); // warm-up
    let t = Instant::now();
    for _ in 0..iters {
        f();
    }
    t.elapsed().as_secs_f64() / iters as f64
}

fn kernel() -> anyhow::Result<()> {
    let (out, inp, experts) = (5760usize, 2880usize, 8usize);
    let packed: Vec<(Vec<u8>, Vec<u8>)> = (0..experts)
        .map(|e| {
            (
                bytes(out * inp / 2, 11 + e as u64, 0, 255),
                bytes(out * inp / 32, 97 + e as u64, 120, 4),
            )
        })
        .collect();
    let dense_f32: Vec<Tensor> = packed
        .iter()
        .map(|(b, s)| {
            let mut w = vec![0f32; out * inp];
            mxfp4::dequantize_rows(b, s, inp, 0, out, &mut w);
            Tensor::from_vec(w, (out, inp), &Device::Cpu)
        })
        .collect::<candle_core::Result<_>>()?;
    let dense_bf16: Vec<Tensor> = dense_f32
        .iter()
        .map(|w| w.to_dtype(DType::BF16))
        .collect::<candle_core::Result<_>>()?;
    println!(
        "gpt-oss gate_up shape {out}x{inp}, {experts} experts cycled; threads {}",
        rayon::current_num_threads()
    );
    println!(
        "{:<8} {:>12} {:>16} {:>14} {:>14}",
        "tokens", "mxfp4 (ours)", "dequant→bf16+mm", "bf16 resident", "f32 resident"
    );
    for tokens in [1usize, 4, 32] {
        let x: Vec<f32> = bytes(tokens * inp, 5, 0, 200)
            .iter()
            .map(|&b| b as f32 / 100.0 - 1.0)
            .collect();
        let xt = Tensor::from_vec(x.clone(), (tokens, inp), &Device::Cpu)?;
        let xb = xt.to_dtype(DType::BF16)?;
        let iters = if tokens == 1 { 40 } else { 8 };
        let mut y = vec![0f32; tokens * out];
        let mut e = 0;
        let ours = time(iters, || {
            let (b, s) = &packed[e % experts];
            mxfp4::mxfp4_matmul_cpu(&x, b, s, tokens, inp, out, &mut y).unwrap();
            e += 1;
        });
        let mut buf = vec![0f32; out * inp];
        let dequant = time(iters.min(10), || {
            let (b, s) = &packed[e % experts];
            mxfp4::dequantize_rows(b, s, inp, 0, out, &mut buf);
            let w = Tensor::from_slice(&buf, (out, inp), &Device::Cpu)
                .and_then(|w| w.to_dtype(DType::BF16))
                .unwrap();
            let _ = xb.matmul(&w.t().unwrap()).unwrap();
            e += 1;
        });
        let bf16 = time(iters, || {
            let _ = xb.matmul(&dense_bf16[e % experts].t().unwrap()).unwrap();
            e += 1;
        });
        let f32t = time(iters, || {
            let _ = xt.matmul(&dense_f32[e % experts].t().unwrap()).unwrap();
            e += 1;
        });
        println!(
            "{tokens:<8} {:>10.3}ms {:>14.3}ms {:>12.3}ms {:>12.3}ms   ratios vs ours: dequant {:.1}x, bf16 {:.2}x, f32 {:.2}x",
            ours * 1e3,
            dequant * 1e3,
            bf16 * 1e3,
            f32t * 1e3,
            dequant / ours,
            bf16 / ours,
            f32t / ours
        );
    }
    Ok(())
}

fn model(dir: &str, prompt: usize, decode: usize) -> anyhow::Result<()> {
    let dir = std::path::Path::new(dir);
    let ckpt_bytes: u64 = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
        .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .sum();
    let base = proc_status_kb("VmRSS:");
    let t = Instant::now();
    let m = GptOss::load(dir, &Device::Cpu, DType::F32)?;
    let load_s = t.elapsed().as_secs_f64();
    let rss = proc_status_kb("VmRSS:");
    println!(
        "checkpoint {:.1} MB (MXFP4 experts {:.1} MB); load {:.2}s; RSS before {:.1} MB, after load {:.1} MB",
        ckpt_bytes as f64 / 1e6,
        m.packed_expert_bytes() as f64 / 1e6,
        load_s,
        base as f64 / 1e3,
        rss as f64 / 1e3
    );
    let vocab = m.config.vocab_size as u32;
    let tokens: Vec<u32> = (0..prompt as u32)
        .map(|i| (i * 7919 + 13) % vocab)
        .collect();
    let mut cache = m
        .info()
        .new_cache(KvProfile::Default, prompt + decode + 1)?;
    let t = Instant::now();
    let mut logits = m.forward(&tokens, &mut cache, true)?;
    let prefill = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..decode {
        let next = logits.squeeze(0)?.argmax(0)?.to_scalar::<u32>()?;
        logits = m.forward(&[next], &mut cache, true)?;
    }
    let dec = t.elapsed().as_secs_f64();
    println!(
        "prefill {prompt} tokens: {:.1} tok/s; decode {decode} tokens: {:.2} tok/s",
        prompt as f64 / prefill,
        decode as f64 / dec
    );
    let peak = proc_status_kb("VmHWM:");
    println!(
        "peak RSS {:.1} MB = {:.2}x checkpoint bytes (process baseline {:.1} MB)",
        peak as f64 / 1e3,
        peak as f64 * 1e3 / ckpt_bytes as f64,
        base as f64 / 1e3
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("kernel") => kernel(),
        Some("model") if args.len() >= 2 => {
            let p = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(64);
            let d = args.get(3).and_then(|v| v.parse().ok()).unwrap_or(16);
            model(&args[1], p, d)
        }
        _ => {
            anyhow::bail!("usage: gpt_oss_bench kernel | model DIR [prompt_tokens] [decode_tokens]")
        }
    }
}
