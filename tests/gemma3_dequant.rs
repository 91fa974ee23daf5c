//! Gemma 3 270M from safetensors (`gemma3_text`) against transformers' Gemma3ForCausalLM in f32,
//! on the Q4_K_M GGUF dequantized to a transformers checkpoint: models/gemma3-dequant/, made with
//! its reference logits by scripts/make_gemma3_dequant.py (gguf-py's dequantizers, transformers,
//! eager attention, f32). Skipped with a note when that folder is absent (it needs torch, so CI
//! does not have it).

use std::path::PathBuf;

use candle_core::{DType, Device, IndexOp};
use xllm::arch::{BuildOptions, WeightSource};
use xllm::model::safetensors::SafetensorsWeights;
use xllm::quant::KvProfile;

fn dir() -> Option<PathBuf> {
    let d = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/gemma3-dequant");
    if d.join("reference.json").is_file() && d.join("model.safetensors").is_file() {
        Some(d)
    } else {
        eprintln!(
            "skipped: {} absent (run scripts/make_gemma3_dequant.py)",
            d.display()
        );
        None
    }
}

#[test]
fn dequantized_gemma3_matches_transformers_in_f32() {
    let Some(dir) = dir() else { return };
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let vocab = r["vocab"].as_u64().unwrap() as usize;
    let raw = std::fs::read(dir.join("reference_logits.f32")).unwrap();
    let want: Vec<f32> = raw
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let weights = SafetensorsWeights::open_dir(&dir).unwrap();
    let model = xllm::arch::build(
        &WeightSource::Safetensors {
            config: &config,
            weights: &weights,
        },
        &BuildOptions {
            device: Device::Cpu,
            dtype: DType::F32,
            keep_weight_dtype: false,
        },
    )
    .unwrap();
    assert_eq!(model.info().architecture, "gemma3");
    let mut row = 0;
    let mut worst = 0f64;
    for case in r["cases"].as_array().unwrap() {
        let ids: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let mut state = model.info().new_cache(KvProfile::Default, 1024).unwrap();
        let logits = model.forward(&ids, &mut state, false).unwrap();
        for (k, p) in case["positions"].as_array().unwrap().iter().enumerate() {
            let p = p.as_u64().unwrap() as usize;
            let got = logits.i(p).unwrap().to_vec1::<f32>().unwrap();
            let w = &want[row * vocab..(row + 1) * vocab];
            row += 1;
            let scale = w.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
            let diff = got
                .iter()
                .zip(w)
                .map(|(a, b)| (*a as f64 - *b as f64).abs())
                .fold(0f64, f64::max);
            worst = worst.max(diff / scale);
            let top = got
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0;
            assert_eq!(
                top as u64, case["top5"][k][0],
                "position {p}: our top token differs from transformers'"
            );
            assert!(
                diff / scale < 1e-4,
                "position {p} of a {}-token input: max |logit diff| {diff} (row max {scale})",
                ids.len()
            );
        }
    }
    eprintln!("worst relative logit difference vs transformers f32: {worst:.2e}");
}
