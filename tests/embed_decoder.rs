//! A decoder used as an embedder, in the Qwen3-Embedding layout (a Qwen3 base model without an
//! LM head, sentence-transformers modules with last-token pooling and Normalize), against
//! sentence-transformers: tests/fixtures/tiny-qwen3-embedding, made by
//! scripts/make_qwen3_embedding_fixture.py. Token ids identical, cosine ≥ 0.9999 alone, in one
//! batch, from token ids, with mean pooling of the same weights, and through inputs longer than
//! one 512-token piece; plus the hidden-state contract of the causal architectures.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use xllm::arch::{BatchSeq, Logits};
use xllm::engine::embed::{describe, EmbedOptions, EmbeddingModel, Overflow};
use xllm::quant::KvProfile;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture() -> PathBuf {
    root().join("tests/fixtures/tiny-qwen3-embedding")
}

struct Case {
    text: String,
    ids: Vec<u32>,
    alone: Vec<f32>,
    batch: Vec<f32>,
    mean: Vec<f32>,
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn cases() -> Vec<Case> {
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("reference.json")).unwrap())
            .unwrap();
    doc["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            text: c["text"].as_str().unwrap().to_string(),
            ids: c["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect(),
            alone: floats(&c["alone"]),
            batch: floats(&c["batch"]),
            mean: floats(&c["mean"]),
        })
        .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn load(dir: &Path) -> EmbeddingModel {
    EmbeddingModel::load_dir(dir, "tiny-qwen3-embedding").unwrap()
}

fn check(what: &str, cases: &[Case], vectors: &[Vec<f32>], want: impl Fn(&Case) -> &[f32]) {
    assert_eq!(cases.len(), vectors.len());
    for (c, v) in cases.iter().zip(vectors) {
        let cos = cosine(want(c), v);
        assert!(cos >= 0.9999, "{what}: cosine {cos} for {:?}", c.text);
        let norm: f64 = v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{what}: norm {norm}");
    }
}

#[test]
fn last_token_pooling_matches_sentence_transformers() {
    let cases = cases();
    let model = load(&fixture());
    assert_eq!(model.architecture(), "qwen3");
    assert_eq!(model.dimensions(), 64);
    assert_eq!(model.max_tokens, 600);
    assert_eq!(model.spec.pooling.name(), "lasttoken");
    assert!(model.spec.normalize);
    let opts = EmbedOptions::default();
    let texts: Vec<&str> = cases.iter().map(|c| c.text.as_str()).collect();
    let ids = model.tokenize(&texts, Overflow::Truncate).unwrap();
    for (c, got) in cases.iter().zip(&ids) {
        assert_eq!(got, &c.ids, "token ids of {:?}", c.text);
    }
    assert!(
        ids.iter().any(|s| s.len() > 512),
        "an input runs in more than one piece"
    );

    let alone: Vec<Vec<f32>> = texts
        .iter()
        .map(|t| model.embed(&[t], &opts).unwrap().vectors.remove(0))
        .collect();
    check("alone", &cases, &alone, |c| &c.alone);
    let batch = model.embed(&texts, &opts).unwrap();
    check("batch", &cases, &batch.vectors, |c| &c.batch);
    assert_eq!(
        batch.token_counts,
        cases.iter().map(|c| c.ids.len()).collect::<Vec<_>>()
    );
    // Packing does not change a vector.
    for (a, b) in alone.iter().zip(&batch.vectors) {
        let diff = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-5, "alone vs batch differ by {diff}");
    }
    let from_ids = model
        .embed_tokens(cases.iter().map(|c| c.ids.clone()).collect(), &opts)
        .unwrap();
    check("token ids", &cases, &from_ids.vectors, |c| &c.batch);
}

#[test]
fn mean_pooling_of_the_same_weights_matches() {
    let cases = cases();
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    std::fs::create_dir(dir.path().join("1_Pooling")).unwrap();
    std::fs::write(
        dir.path().join("1_Pooling/config.json"),
        r#"{"embedding_dimension": 64, "pooling_mode": "mean", "include_prompt": true}"#,
    )
    .unwrap();
    let model = load(dir.path());
    assert_eq!(model.spec.pooling.name(), "mean");
    let texts: Vec<&str> = cases.iter().map(|c| c.text.as_str()).collect();
    let out = model.embed(&texts, &EmbedOptions::default()).unwrap();
    check("mean", &cases, &out.vectors, |c| &c.mean);
}

#[test]
fn limits_dimensions_and_capabilities() {
    let cases = cases();
    let model = load(&fixture());
    let long = cases.last().unwrap();
    assert_eq!(long.ids.len(), 600, "the reference truncated the last text");
    let err = model
        .embed(
            &[long.text.as_str()],
            &EmbedOptions {
                overflow: Overflow::Refuse,
                dimensions: None,
            },
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("limit of 600"), "{err}");
    // Matryoshka: the first 16 values, renormalised.
    let short = model
        .embed(
            &[cases[1].text.as_str()],
            &EmbedOptions {
                overflow: Overflow::Truncate,
                dimensions: Some(16),
            },
        )
        .unwrap()
        .vectors
        .remove(0);
    assert_eq!(short.len(), 16);
    assert!(cosine(&short, &cases[1].alone[..16]) > 0.9999);

    let (caps, spec) = describe(&fixture(), Some("qwen3"));
    assert_eq!(caps, vec!["embedding"]);
    let spec = spec.unwrap();
    assert_eq!(spec.pooling.name(), "lasttoken");
    // sentence-transformers 6.3 writes the limit to tokenizer_config.json only.
    assert_eq!(spec.max_tokens, Some(600));
    // The same architecture without declared pooling is a text-generation model.
    let plain = root().join("tests/fixtures/tiny-qwen3");
    assert_eq!(describe(&plain, Some("qwen3")).0, vec!["completion"]);
    let err = EmbeddingModel::load_dir(&plain, "tiny-qwen3")
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("declares no pooling"), "{err}");
}

/// `hidden_batch` returns what the LM head reads: for the tied tiny-qwen3, hidden states times
/// the embedding table are `forward_batch`'s logits, for the rows each sequence asked for.
#[test]
fn hidden_states_are_what_the_lm_head_reads() {
    let dir = root().join("tests/fixtures/tiny-qwen3");
    let model = common::build_f32_cpu(&dir);
    let info = model.info().clone();
    let seqs: [&[u32]; 2] = [&[5, 9, 33, 7, 100], &[12, 4, 250]];
    let run = |hidden: bool, modes: [Logits; 2]| -> Tensor {
        let mut states: Vec<_> = seqs
            .iter()
            .map(|s| info.new_cache(KvProfile::Default, s.len()).unwrap())
            .collect();
        let mut batch: Vec<BatchSeq<'_>> = seqs
            .iter()
            .zip(states.iter_mut())
            .zip(modes)
            .map(|((tokens, state), logits)| BatchSeq {
                tokens,
                state,
                logits,
            })
            .collect();
        if hidden {
            model.hidden_batch(&mut batch).unwrap()
        } else {
            model.forward_batch(&mut batch).unwrap()
        }
    };
    let weights = xllm::model::safetensors::SafetensorsWeights::open_dir(&dir).unwrap();
    let table = weights
        .load("model.embed_tokens.weight", DType::F32, &Device::Cpu)
        .unwrap();
    for modes in [[Logits::All, Logits::Last], [Logits::Last, Logits::None]] {
        let hidden = run(true, modes);
        let logits = run(false, modes);
        assert_eq!(hidden.dims()[1], 64);
        assert_eq!(hidden.dims()[0], logits.dims()[0]);
        let projected = hidden.matmul(&table.t().unwrap()).unwrap();
        let diff = (projected - &logits)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            diff < 1e-4,
            "{modes:?}: hidden × table differs from logits by {diff}"
        );
    }
}
