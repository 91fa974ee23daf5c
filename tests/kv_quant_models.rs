//! The quantized KV caches inside real model code: the tiny transformers checkpoints (llama,
//! qwen2 with a sliding-window layer, qwen3) run with `kv_int8` and `kv_fp8`, full sequence and
//! prefill + one-token decode steps, against transformers' own logits and perplexity
//! (tests/fixtures/*/reference.*, made by scripts/make_llama_fixtures.py).

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, D};
use xllm::arch::{self, BuildOptions, CausalLm, WeightSource};
use xllm::model::safetensors::SafetensorsWeights;
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
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let weights = SafetensorsWeights::open_dir(&dir).unwrap();
    let options = BuildOptions {
        device: Device::Cpu,
        dtype: DType::F32,
        keep_weight_dtype: false,
    };
    let source = WeightSource::Safetensors {
        config: &config,
        weights: &weights,
    };
    let model = arch::build(&source, &options).unwrap();
    let reference = SafetensorsWeights::open_files(&[dir.join("reference.safetensors")]).unwrap();
    let ids = reference
        .load("input_ids", DType::I64, &Device::Cpu)
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as u32)
        .collect();
    let logits = reference.load("logits", DType::F32, &Device::Cpu).unwrap();
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
            * f.ids.len().div_ceil(256)
            * 256;
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
