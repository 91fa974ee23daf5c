//! The quantized KV caches inside real model code: the tiny transformers checkpoints (llama,
//! qwen2 with a sliding-window layer, qwen3) run with `kv_int8` and `kv_fp8`, full sequence and
//! prefill + one-token decode steps, against transformers' own logits and perplexity
//! (tests/fixtures/*/reference.*, made by scripts/make_llama_fixtures.py).

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, D};
use xllm::arch::CausalLm;
use xllm::quant::KvProfile;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

struct Fixture {
    model: Box<dyn CausalLm>,
    ids: Vec<u32>,
    logits: Tensor,
    perplexity: f64,
}

fn load(name: &str) -> Fixture {
    let dir = fixture(name);
    let model = common::build_f32_cpu(&dir);
    let (ids, logits) = common::reference_ids_and_logits(&dir);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    Fixture {
        model,
        ids,
        logits,
        perplexity: meta["perplexity"].as_f64().unwrap(),
    }
}

/// Perplexity of `ids[1..]` under `logits` (`[len, vocab]`, row i predicts token i + 1).
fn perplexity(logits: &Tensor, ids: &[u32]) -> f64 {
    let log_probs = candle_nn::ops::log_softmax(logits, D::Minus1).unwrap();
    let rows: Vec<Vec<f32>> = log_probs.to_vec2().unwrap();
    let nll: f64 = ids[1..]
        .iter()
        .zip(&rows)
        .map(|(&next, row)| -(row[next as usize] as f64))
        .sum();
    (nll / (ids.len() - 1) as f64).exp()
}

/// max |a - b| / max |b|.
fn relative_error(a: &Tensor, b: &Tensor) -> f64 {
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    let scale = b.abs().unwrap().max_all().unwrap();
    (diff.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap()) as f64
}

/// Runs the fixture with `profile` both ways and checks logits and perplexity against
/// transformers (unquantized): logits within `logit_tol` (relative), perplexity within
/// `ppl_tol` (relative).
fn check(name: &str, profile: KvProfile, logit_tol: f64, ppl_tol: f64) {
    let f = load(name);
    let info = f.model.info().clone();
    let mut cache = info.new_cache(profile, 256).unwrap();
    let logits = f.model.forward(&f.ids, &mut cache, false).unwrap();
    let err = relative_error(&logits, &f.logits);
    let ppl = perplexity(&logits, &f.ids);
    let ppl_err = (ppl / f.perplexity - 1.0).abs();
    eprintln!(
        "{name} {profile}: logits rel err {err:.2e}, perplexity {ppl:.4} vs {:.4} ({:+.3}%)",
        f.perplexity,
        (ppl / f.perplexity - 1.0) * 100.0
    );
    assert!(err <= logit_tol, "{name} {profile}: logits differ by {err}");
    assert!(
        ppl_err <= ppl_tol,
        "{name} {profile}: perplexity {ppl} vs {}",
        f.perplexity
    );
    let expected_bytes =
        profile.kv_bytes_per_token(info.cache_layers, info.kv_heads, info.head_dim, 4)
            * f.ids.len().div_ceil(xllm::state::BLOCK_TOKENS)
            * xllm::state::BLOCK_TOKENS;
    assert_eq!(cache.allocated_bytes(), expected_bytes);

    // Prefill, then one token at a time: every step's logits agree as well.
    let mut cache = info.new_cache(profile, 256).unwrap();
    let split = 30;
    f.model.forward(&f.ids[..split], &mut cache, true).unwrap();
    for (i, &id) in f.ids.iter().enumerate().skip(split) {
        let step = f.model.forward(&[id], &mut cache, true).unwrap();
        let err = relative_error(&step, &f.logits.narrow(0, i, 1).unwrap());
        assert!(
            err <= logit_tol,
            "{name} {profile}: decode step {i} differs by {err}"
        );
    }
    assert_eq!(cache.position(), f.ids.len());
}

#[test]
fn tiny_llama_with_quantized_kv_tracks_transformers() {
    check("tiny-llama", KvProfile::KvInt8, 1e-2, 0.01);
    check("tiny-llama", KvProfile::KvFp8, 5e-2, 0.03);
}

#[test]
fn tiny_qwen2_sliding_window_with_quantized_kv_tracks_transformers() {
    check("tiny-qwen2", KvProfile::KvInt8, 1e-2, 0.01);
    check("tiny-qwen2", KvProfile::KvFp8, 5e-2, 0.03);
}

#[test]
fn tiny_qwen3_with_quantized_kv_tracks_transformers() {
    check("tiny-qwen3", KvProfile::KvInt8, 1e-2, 0.01);
    check("tiny-qwen3", KvProfile::KvFp8, 5e-2, 0.03);
}

mod gpt_oss {
    //! gpt-oss (sliding-window and full layers, attention sinks) on its tiny fixture
    //! (scripts/make_gpt_oss_fixture.py), 270 tokens so the window of 16 is crossed many times.
    //!
    //! This random-weight MoE is chaotic: a perturbation as small as rounding the KV cache to bf16
    //! (relative error 0.16 %) moves its perplexity by 1.4 % and its logits by up to 3.7, because
    //! expert routing flips. The 1 % / 3 % budgets are therefore checked on SmolLM2 (a trained
    //! model, tests/kv_quant_quality.rs); here we check that the quantized caches behave exactly
    //! the same however the sequence is fed, and bound the drift (measured: int8 +5.5 %, fp8 +8.3 %).

    use super::*;
    use candle_core::IndexOp;
    use serde_json::Value;
    use xllm::arch::gpt_oss::GptOss;

    fn fixture() -> PathBuf {
        super::fixture("gpt_oss_tiny")
    }

    fn tokens() -> Vec<u32> {
        let r: Value = serde_json::from_str(
            &std::fs::read_to_string(fixture().join("reference.json")).unwrap(),
        )
        .unwrap();
        r["text_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    }

    /// Logits rows for every position, fed as uneven chunks then one token at a time, so the
    /// quantized cache is read back across chunk boundaries and sliding windows.
    fn chunked_logits(model: &GptOss, profile: KvProfile, tokens: &[u32]) -> (Tensor, usize) {
        let mut cache = model.info().new_cache(profile, 4096).unwrap();
        let mut rows: Vec<Vec<f32>> = Vec::new();
        let mut at = 0;
        for size in [40, 7, 1, 17, 90] {
            let logits = model
                .forward(&tokens[at..at + size], &mut cache, false)
                .unwrap();
            rows.extend(logits.to_vec2::<f32>().unwrap());
            at += size;
        }
        while at < tokens.len() {
            let logits = model
                .forward(&tokens[at..at + 1], &mut cache, true)
                .unwrap();
            rows.push(logits.i(0).unwrap().to_vec1().unwrap());
            at += 1;
        }
        (
            Tensor::new(rows, &Device::Cpu).unwrap(),
            cache.allocated_bytes(),
        )
    }

    #[test]
    fn quantized_kv_is_consistent_across_chunking_and_bounded_in_drift() {
        let model = GptOss::load(&fixture(), &Device::Cpu, DType::F32).unwrap();
        let tokens = tokens();
        let one_shot = |profile| {
            let mut cache = model.info().new_cache(profile, 4096).unwrap();
            model.forward(&tokens, &mut cache, false).unwrap()
        };
        let base = perplexity(&one_shot(KvProfile::Default), &tokens);
        let (base_chunked, base_bytes) = chunked_logits(&model, KvProfile::Default, &tokens);
        // Unquantized, chunking changes only float rounding (f32 GEMMs over other row counts).
        let noise = relative_error(&base_chunked, &one_shot(KvProfile::Default));
        assert!(
            noise < 1e-4,
            "default: chunked vs one-shot logits differ by {noise}"
        );
        // Per-token scales: the same codes whatever the chunking, but for the odd code that flips
        // on that float noise; one fp8 step (3 mantissa bits) is 1/8 of a value, an int8 step
        // 1/127, hence the wider bound for fp8.
        for (profile, drift, chunk_tol) in [
            (KvProfile::KvInt8, 0.08, 5e-3),
            (KvProfile::KvFp8, 0.12, 3e-2),
        ] {
            let whole = one_shot(profile);
            let (chunked, bytes) = chunked_logits(&model, profile, &tokens);
            let err = relative_error(&chunked, &whole);
            assert!(
                err < chunk_tol,
                "{profile}: chunked vs one-shot logits differ by {err}"
            );
            let ppl = perplexity(&whole, &tokens);
            let change = ppl / base - 1.0;
            eprintln!(
                "gpt-oss tiny {profile}: perplexity {ppl:.3} vs {base:.3} ({:+.3}%), KV {bytes} vs {base_bytes} bytes",
                change * 100.0
            );
            assert!(change.abs() <= drift, "{profile}: {ppl} vs {base}");
            // head_dim 24: (24 + 2) / (24 × 4) of the f32 cache.
            assert_eq!(bytes * 96, base_bytes * 26, "{profile}");
        }
    }
}
