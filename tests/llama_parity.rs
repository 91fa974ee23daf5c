//! Numerical parity of our Llama-family code with transformers (f32), on tiny random checkpoints
//! made by scripts/make_llama_fixtures.py: full-sequence logits, and the same logits when the
//! sequence is fed as a prefill followed by one-token decode steps through the KV cache.

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use xllm::arch::CausalLm;
use xllm::model::safetensors::SafetensorsWeights;
use xllm::quant::KvProfile;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn load(name: &str) -> (Box<dyn CausalLm>, Vec<u32>, Tensor) {
    let dir = fixture(name);
    let model = common::build_f32_cpu(&dir);
    let (ids, logits) = common::reference_ids_and_logits(&dir);
    (model, ids, logits)
}

/// max |ours - ref| / max |ref| over the rows compared.
fn relative_error(ours: &Tensor, reference: &Tensor) -> f32 {
    let diff = (ours - reference)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    let scale = reference.abs().unwrap().max_all().unwrap();
    diff.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap()
}

fn check_full_and_incremental(name: &str) {
    let (model, ids, reference) = load(name);
    let info = model.info().clone();
    let mut cache = info.new_cache(KvProfile::Default, 256).unwrap();
    let logits = model.forward(&ids, &mut cache, false).unwrap();
    assert_eq!(logits.dims(), reference.dims());
    let err = relative_error(&logits, &reference);
    assert!(
        err <= 1e-3,
        "{name}: full-sequence logits differ by {err} (relative)"
    );

    // Prefill 30 tokens (last position only), then decode one token at a time.
    let mut cache = info.new_cache(KvProfile::Default, 256).unwrap();
    let split = 30;
    let last = model.forward(&ids[..split], &mut cache, true).unwrap();
    let err = relative_error(&last, &reference.narrow(0, split - 1, 1).unwrap());
    assert!(err <= 1e-3, "{name}: prefill last logits differ by {err}");
    for (i, &id) in ids.iter().enumerate().skip(split) {
        let step = model.forward(&[id], &mut cache, true).unwrap();
        let err = relative_error(&step, &reference.narrow(0, i, 1).unwrap());
        assert!(
            err <= 1e-3,
            "{name}: decode step at position {i} differs by {err}"
        );
    }
    assert_eq!(cache.position(), ids.len());
}

#[test]
fn tiny_llama_matches_transformers() {
    check_full_and_incremental("tiny-llama");
}

#[test]
fn tiny_qwen3_matches_transformers() {
    check_full_and_incremental("tiny-qwen3");
}

#[test]
fn tiny_qwen2_with_sliding_window_matches_transformers() {
    check_full_and_incremental("tiny-qwen2");
}

/// Splits tiny-llama's weights over two shards, with and without model.safetensors.index.json:
/// both load and give the reference logits.
#[test]
fn sharded_checkpoints_load_with_and_without_index() {
    let src = fixture("tiny-llama");
    let reference_weights = SafetensorsWeights::open_dir(&src).unwrap();
    let names: Vec<String> = reference_weights
        .names()
        .into_iter()
        .map(str::to_string)
        .collect();
    for with_index in [true, false] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
        let mut map = serde_json::Map::new();
        for (i, part) in names.chunks(names.len().div_ceil(2)).enumerate() {
            let file = format!("model-{:05}-of-00002.safetensors", i + 1);
            let tensors: std::collections::HashMap<String, Tensor> = part
                .iter()
                .map(|n| {
                    map.insert(n.clone(), serde_json::Value::String(file.clone()));
                    (
                        n.clone(),
                        reference_weights.load(n, DType::F32, &Device::Cpu).unwrap(),
                    )
                })
                .collect();
            candle_core::safetensors::save(&tensors, dir.join(&file)).unwrap();
        }
        if with_index {
            let index = serde_json::json!({"metadata": {}, "weight_map": map});
            std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
        }
        let model = common::build_f32_cpu(dir);
        let (_, ids, reference) = load("tiny-llama");
        let mut cache = model.info().new_cache(KvProfile::Default, 256).unwrap();
        let logits = model.forward(&ids, &mut cache, false).unwrap();
        assert!(relative_error(&logits, &reference) <= 1e-3);

        // A missing shard is named in the error.
        std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
        let err = SafetensorsWeights::open_dir(dir).err().unwrap().to_string();
        assert!(
            err.contains("00002") || err.contains("expected 2 shards"),
            "{err}"
        );
    }
}

/// A prompt longer than one pass (512 tokens) runs in passes through the cache; the logits of
/// every position, and the last-position logits, are those of feeding it in small pieces —
/// with and without a sliding window (tiny-qwen2 has one).
#[test]
fn long_prompts_run_in_passes_with_the_same_logits() {
    for name in ["tiny-llama", "tiny-qwen2"] {
        let (model, ids, _) = load(name);
        let info = model.info().clone();
        let vocab = info.vocab_size as u32;
        let long: Vec<u32> = (0..1100u32)
            .map(|i| ids[i as usize % ids.len()].wrapping_add(i / 7) % vocab)
            .collect();
        let mut cache = info.new_cache(KvProfile::Default, 2048).unwrap();
        let whole = model.forward(&long, &mut cache, false).unwrap();
        assert_eq!(whole.dims(), [long.len(), info.vocab_size]);
        let mut cache = info.new_cache(KvProfile::Default, 2048).unwrap();
        let pieces: Vec<Tensor> = long
            .chunks(100)
            .map(|c| model.forward(c, &mut cache, false).unwrap())
            .collect();
        let pieces = Tensor::cat(&pieces, 0).unwrap();
        let err = relative_error(&whole, &pieces);
        assert!(err <= 1e-4, "{name}: passes vs pieces differ by {err}");
        let mut cache = info.new_cache(KvProfile::Default, 2048).unwrap();
        let last = model.forward(&long, &mut cache, true).unwrap();
        let err = relative_error(&last, &whole.narrow(0, long.len() - 1, 1).unwrap());
        assert!(err <= 1e-4, "{name}: last-only logits differ by {err}");
        assert_eq!(cache.position(), long.len());
    }
}
