//! KV-cache quantization quality on a TRAINED tiny gpt-oss (tests/fixtures/gpt_oss_trained, made by
//! scripts/make_gpt_oss_trained_fixture.py): the real checkpoint layout (MXFP4 experts, sliding
//! window 16, YaRN, sinks) with weights trained on text, so its perplexity on held-out text is low
//! and stable, unlike the random fixture whose routing flips on any perturbation. Here the issue's
//! budgets apply as written: `kv_int8` within 1 % and `kv_fp8` within 3 % of the unquantized cache,
//! and the unquantized cache within 0.5 % of transformers.

mod common;

use common::gpt_oss::{greedy, ids, mean_nll};
use serde_json::Value;
use xllm::arch::gpt_oss::GptOss;
use xllm::arch::CausalLm;
use xllm::quant::KvProfile;

const FIXTURE: &str = "gpt_oss_trained";

fn reference() -> Value {
    common::gpt_oss::reference(FIXTURE)
}

fn load() -> GptOss {
    common::gpt_oss::load(FIXTURE)
}

/// Perplexity with `profile`, the text fed through the cache in chunks of 50 tokens, so every chunk
/// after the first attends to keys/values read back from the (quantized) cache, across 25 windows.
fn cached_perplexity(model: &GptOss, profile: KvProfile, tokens: &[u32]) -> f64 {
    let mut cache = model.info().new_cache(profile, 4096).unwrap();
    let mut rows: Vec<Vec<f32>> = Vec::new();
    for chunk in tokens.chunks(50) {
        let logits = model.forward(chunk, &mut cache, false).unwrap();
        rows.extend(logits.to_vec2::<f32>().unwrap());
    }
    assert_eq!(cache.position(), tokens.len());
    mean_nll(&rows[..tokens.len() - 1], tokens).exp()
}

#[test]
fn the_trained_fixture_is_a_real_instrument() {
    // Far below the vocabulary size (360): the model predicts, it does not guess.
    let r = reference();
    let ppl = r["perplexity"].as_f64().unwrap();
    let held_out = r["text_ids"].as_array().unwrap().len();
    assert!(ppl < 60.0, "transformers' held-out perplexity {ppl}");
    assert!(held_out >= 400, "held-out text of {held_out} tokens");
}

#[test]
fn unquantized_perplexity_matches_transformers() {
    let model = load();
    let r = reference();
    let tokens = ids(&r["text_ids"]);
    let ours = cached_perplexity(&model, KvProfile::Default, &tokens);
    let want = r["perplexity"].as_f64().unwrap();
    let rel = (ours - want).abs() / want;
    eprintln!("trained gpt-oss: perplexity ours {ours:.4}, transformers {want:.4} ({rel:.2e})");
    assert!(rel < 0.005, "perplexity {ours} vs transformers {want}");
}

#[test]
fn quantized_kv_perplexity_is_within_budget() {
    let model = load();
    let tokens = ids(&reference()["text_ids"]);
    let base = cached_perplexity(&model, KvProfile::Default, &tokens);
    for (profile, budget) in [(KvProfile::KvInt8, 0.01), (KvProfile::KvFp8, 0.03)] {
        let ppl = cached_perplexity(&model, profile, &tokens);
        let change = ppl / base - 1.0;
        eprintln!(
            "trained gpt-oss {profile}: perplexity {ppl:.4} vs {base:.4} ({:+.3} %)",
            change * 100.0
        );
        assert!(
            change.abs() <= budget,
            "{profile}: perplexity {ppl} vs unquantized {base} ({:+.3} %)",
            change * 100.0
        );
    }
}

#[test]
fn greedy_continuations_match_transformers() {
    let model = load();
    for case in reference()["greedy"].as_array().unwrap() {
        let prompt = ids(&case["prompt"]);
        let want = ids(&case["continuation"]);
        let margins: Vec<f64> = case["margins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_f64().unwrap())
            .collect();
        let got = greedy(&model, &prompt, want.len());
        // Tokens must agree up to the first step whose top-2 margin is within float noise.
        let decisive = margins.iter().take_while(|&&m| m > 1e-3).count();
        let same = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
        assert!(
            same >= decisive,
            "prompt of {} tokens: first {same} tokens agree, {decisive} decisive\n ours {got:?}\n want {want:?}",
            prompt.len()
        );
    }
}
