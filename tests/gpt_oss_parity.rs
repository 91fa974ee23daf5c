//! gpt-oss against transformers on the tiny fixture (scripts/make_gpt_oss_fixture.py): logits,
//! perplexity and greedy continuations, through prefill, chunked prefill and cached decode, at
//! lengths that cross the sliding window (16 in the fixture).

mod common;

use candle_core::IndexOp;
use common::gpt_oss::{fixture, greedy, ids, mean_nll};
use serde_json::Value;
use xllm::arch::gpt_oss::GptOss;
use xllm::arch::CausalLm;
use xllm::quant::KvProfile;

const FIXTURE: &str = "gpt_oss_tiny";

fn reference() -> Value {
    common::gpt_oss::reference(FIXTURE)
}

fn load() -> GptOss {
    common::gpt_oss::load(FIXTURE)
}

#[test]
fn logits_and_perplexity_match_transformers() {
    let model = load();
    let r = reference();
    let tokens = ids(&r["text_ids"]);
    let mut cache = model.info().new_cache(KvProfile::Default, 4096).unwrap();
    let logits = model.forward(&tokens, &mut cache, false).unwrap();
    assert_eq!(logits.dims(), &[tokens.len(), model.config.vocab_size]);
    for (pos, want) in r["logits_at"].as_object().unwrap() {
        let p: usize = pos.parse().unwrap();
        let got = logits.i(p).unwrap().to_vec1::<f32>().unwrap();
        let max_diff = got
            .iter()
            .zip(want.as_array().unwrap())
            .map(|(g, w)| (*g as f64 - w.as_f64().unwrap()).abs())
            .fold(0f64, f64::max);
        assert!(max_diff < 2e-3, "position {p}: max |logit diff| {max_diff}");
    }
    let rows: Vec<Vec<f32>> = logits.to_vec2().unwrap();
    let nll = mean_nll(&rows[..tokens.len() - 1], &tokens);
    let ppl = nll.exp();
    let want = r["perplexity"].as_f64().unwrap();
    let rel = (ppl - want).abs() / want;
    eprintln!("perplexity: ours {ppl:.4}, transformers {want:.4}, relative difference {rel:.2e}");
    assert!(rel < 0.005, "perplexity {ppl} vs transformers {want}");
}

#[test]
fn chunked_prefill_and_decode_match_one_shot() {
    let model = load();
    let tokens = ids(&reference()["text_ids"]);
    let n = 120;
    let mut one = model.info().new_cache(KvProfile::Default, 4096).unwrap();
    let full: Vec<Vec<f32>> = model
        .forward(&tokens[..n], &mut one, false)
        .unwrap()
        .to_vec2()
        .unwrap();
    // Chunks of uneven sizes (some smaller, some larger than the window), then single tokens.
    let mut cache = model.info().new_cache(KvProfile::Default, 4096).unwrap();
    let mut rows = Vec::new();
    let mut at = 0;
    for size in [5, 17, 1, 30, 3, 9] {
        let l: Vec<Vec<f32>> = model
            .forward(&tokens[at..at + size], &mut cache, false)
            .unwrap()
            .to_vec2()
            .unwrap();
        rows.extend(l);
        at += size;
    }
    while at < n {
        let l = model
            .forward(&tokens[at..at + 1], &mut cache, true)
            .unwrap();
        rows.push(l.i(0).unwrap().to_vec1().unwrap());
        at += 1;
    }
    assert_eq!(cache.position(), n);
    for (p, (a, b)) in full.iter().zip(&rows).enumerate() {
        let d = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(d < 1e-3, "position {p}: chunked differs by {d}");
    }
}

#[test]
fn greedy_continuations_match_transformers() {
    let model = load();
    for case in reference()["greedy"].as_array().unwrap() {
        let prompt = ids(&case["prompt"]);
        let want = ids(&case["continuation"]);
        let got = greedy(&model, &prompt, want.len());
        let same = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
        assert!(
            same >= 24 && same == want.len(),
            "prompt of {} tokens: first {same} tokens agree\n ours {got:?}\n want {want:?}\n margins {}",
            prompt.len(),
            case["margins"]
        );
    }
}

#[test]
fn out_of_vocabulary_token_is_an_error() {
    let model = load();
    let mut cache = model.info().new_cache(KvProfile::Default, 64).unwrap();
    let err = model
        .forward(&[100_000], &mut cache, true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("vocabulary"), "{err}");
}

#[test]
fn registry_builds_gpt_oss_like_direct_load() {
    let dir = fixture(FIXTURE);
    let model = common::build_f32_cpu(&dir);
    assert_eq!(model.info().architecture, "gpt_oss");
    assert_eq!(model.info().weight_format, "mxfp4+bf16");
    let tokens = &ids(&reference()["text_ids"])[..40];
    let mut a = model.info().new_cache(KvProfile::Default, 64).unwrap();
    let mut b = model.info().new_cache(KvProfile::Default, 64).unwrap();
    let via_registry: Vec<f32> = model
        .forward(tokens, &mut a, true)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let direct: Vec<f32> = load()
        .forward(tokens, &mut b, true)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(via_registry, direct);
}

#[test]
/// The tiny random model has very peaked logits (perplexity ≈ 31500 over 360 tokens), so
/// quantization noise in keys moves perplexity by a few percent; the mean NLL moves < 0.1 nat,
/// while a broken cache moves it by several nats.
fn quantized_kv_cache_keeps_perplexity_close() {
    let model = load();
    let r = reference();
    let tokens = ids(&r["text_ids"]);
    let want = r["mean_nll"].as_f64().unwrap();
    for profile in [KvProfile::KvInt8, KvProfile::KvFp8] {
        let mut cache = model.info().new_cache(profile, 4096).unwrap();
        let rows: Vec<Vec<f32>> = model
            .forward(&tokens, &mut cache, false)
            .unwrap()
            .to_vec2()
            .unwrap();
        let nll = mean_nll(&rows[..tokens.len() - 1], &tokens);
        eprintln!("{profile}: mean NLL {nll:.4} vs {want:.4} (f32 cache, transformers)");
        assert!(
            (nll - want).abs() < 0.1,
            "{profile}: mean NLL {nll} vs {want}"
        );
    }
}

/// A prompt longer than one pass (512 tokens) gives the logits of feeding it in small pieces,
/// across the sliding window (16) and every pass boundary.
#[test]
fn long_prompts_run_in_passes_with_the_same_logits() {
    let model = load();
    let base = ids(&reference()["text_ids"]);
    let long: Vec<u32> = (0..700).map(|i| base[i % base.len()]).collect();
    let mut cache = model.info().new_cache(KvProfile::Default, 1024).unwrap();
    let whole = model.forward(&long, &mut cache, false).unwrap();
    let mut cache = model.info().new_cache(KvProfile::Default, 1024).unwrap();
    let pieces: Vec<candle_core::Tensor> = long
        .chunks(100)
        .map(|c| model.forward(c, &mut cache, false).unwrap())
        .collect();
    let pieces = candle_core::Tensor::cat(&pieces, 0).unwrap();
    assert_eq!(whole.dims(), pieces.dims());
    let diff: f32 = (whole - pieces)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(diff < 1e-3, "passes vs pieces differ by {diff}");
}
