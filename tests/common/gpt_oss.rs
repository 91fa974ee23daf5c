//! The gpt-oss fixtures (tests/fixtures/gpt_oss_tiny, gpt_oss_trained) and what transformers
//! computed on them (reference.json), loaded the same way by every gpt-oss test.

use std::path::PathBuf;

use candle_core::{DType, Device, IndexOp};
use serde_json::Value;
use xllm::arch::gpt_oss::GptOss;
use xllm::arch::CausalLm;
use xllm::quant::KvProfile;

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The fixture's reference.json.
pub fn reference(name: &str) -> Value {
    let text = std::fs::read_to_string(fixture(name).join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A JSON array of token ids.
pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The fixture on the CPU in f32, as transformers computed it.
pub fn load(name: &str) -> GptOss {
    GptOss::load(&fixture(name), &Device::Cpu, DType::F32).unwrap()
}

/// Mean NLL of `tokens[1..]` given logits rows for positions `0..` (one row per predicted token).
pub fn mean_nll(rows: &[Vec<f32>], tokens: &[u32]) -> f64 {
    let mut total = 0f64;
    for (row, &next) in rows.iter().zip(&tokens[1..]) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
        let lse = row
            .iter()
            .map(|&v| (v as f64 - max).exp())
            .sum::<f64>()
            .ln()
            + max;
        total += lse - row[next as usize] as f64;
    }
    total / (tokens.len() - 1) as f64
}

/// `n` greedy tokens after `prompt`: prefill, then one cached decode step per token.
pub fn greedy(model: &GptOss, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut cache = model.info().new_cache(KvProfile::Default, 4096).unwrap();
    let mut logits = model.forward(prompt, &mut cache, true).unwrap();
    let mut got = Vec::new();
    for _ in 0..n {
        let next = logits
            .i(0)
            .unwrap()
            .argmax(0)
            .unwrap()
            .to_scalar::<u32>()
            .unwrap();
        got.push(next);
        logits = model.forward(&[next], &mut cache, true).unwrap();
    }
    got
}
