//! all-MiniLM-L6-v2 (scripts/get_minilm.sh, as CI runs it) against sentence-transformers: token
//! ids identical and cosine ≥ 0.9999 for 100 texts of varied length and language, alone, in one
//! batch of 32 mixed lengths and all together; and `xllm embed` end to end. The reference numbers
//! are tests/fixtures/minilm_reference.json (scripts/make_minilm_reference.py).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine as _;
use xllm::engine::embed::{EmbedOptions, EmbeddingModel, Overflow};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn model_dir() -> Option<PathBuf> {
    let dir = root().join("models/minilm");
    if dir.join("model.safetensors").is_file() {
        Some(dir)
    } else {
        eprintln!("skipped: models/minilm absent (scripts/get_minilm.sh)");
        None
    }
}

struct Case {
    text: String,
    ids: Vec<u32>,
    embedding: Vec<f32>,
}

fn reference() -> (serde_json::Value, Vec<Case>) {
    let path = root().join("tests/fixtures/minilm_reference.json");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases = doc["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(c["embedding"].as_str().unwrap())
                .unwrap();
            Case {
                text: c["text"].as_str().unwrap().to_string(),
                ids: c["ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as u32)
                    .collect(),
                embedding: bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
            }
        })
        .collect();
    (doc, cases)
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn load(dir: &Path) -> EmbeddingModel {
    EmbeddingModel::load_dir(dir, "minilm").unwrap()
}

fn assert_close(cases: &[&Case], vectors: &[Vec<f32>], what: &str) {
    assert_eq!(cases.len(), vectors.len());
    for (c, v) in cases.iter().zip(vectors) {
        let cos = cosine(&c.embedding, v);
        assert!(cos >= 0.9999, "{what}: cosine {cos} for {:?}", c.text);
    }
}

#[test]
fn token_ids_match_sentence_transformers() {
    let Some(dir) = model_dir() else { return };
    let (doc, cases) = reference();
    let model = load(&dir);
    assert_eq!(
        model.max_tokens as u64,
        doc["max_seq_length"].as_u64().unwrap()
    );
    let texts: Vec<&str> = cases.iter().map(|c| c.text.as_str()).collect();
    let ids = model.tokenize(&texts, Overflow::Truncate).unwrap();
    for (c, got) in cases.iter().zip(&ids) {
        assert_eq!(&c.ids, got, "token ids of {:?}", c.text);
    }
    // The fixture exercises truncation: some inputs are longer than the limit.
    assert!(cases.iter().any(|c| c.ids.len() == model.max_tokens));
    // Refusing instead names the input and the limit.
    let long = (0..cases.len())
        .max_by_key(|&i| cases[i].text.len())
        .unwrap();
    let err = model
        .tokenize(&texts[long..=long], Overflow::Refuse)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("input 0") && err.contains("limit of 256"),
        "{err}"
    );
}

#[test]
fn embeddings_match_sentence_transformers_alone_and_batched() {
    let Some(dir) = model_dir() else { return };
    let (doc, cases) = reference();
    let model = load(&dir);
    assert_eq!(
        model.dimensions() as u64,
        doc["dimensions"].as_u64().unwrap()
    );
    assert_eq!(model.spec.normalize, doc["normalized"].as_bool().unwrap());
    assert_eq!(model.spec.pooling.name(), doc["pooling"].as_str().unwrap());
    let opts = EmbedOptions::default();
    // Each text alone.
    let alone: Vec<Vec<f32>> = cases
        .iter()
        .map(|c| {
            model
                .embed(&[c.text.as_str()], &opts)
                .unwrap()
                .vectors
                .remove(0)
        })
        .collect();
    assert_close(&cases.iter().collect::<Vec<_>>(), &alone, "alone");
    // One batch of 32 mixed lengths (every third text: short, long and truncated ones).
    let picked: Vec<&Case> = cases.iter().step_by(3).take(32).collect();
    assert_eq!(picked.len(), 32);
    let lens: Vec<usize> = picked.iter().map(|c| c.ids.len()).collect();
    assert!(
        lens.iter().min().unwrap() < &10 && lens.iter().max().unwrap() > &100,
        "{lens:?}"
    );
    let texts: Vec<&str> = picked.iter().map(|c| c.text.as_str()).collect();
    let batch = model.embed(&texts, &opts).unwrap();
    assert_close(&picked, &batch.vectors, "batch of 32");
    // Batching never changes a vector beyond rounding: the packed batch has no padding.
    for (i, v) in batch.vectors.iter().enumerate() {
        let alone_v = &alone[3 * i];
        let diff = v
            .iter()
            .zip(alone_v)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-5, "text {} differs by {diff} in a batch", 3 * i);
    }
    // All 100 at once, and from token ids.
    let texts: Vec<&str> = cases.iter().map(|c| c.text.as_str()).collect();
    let all = model.embed(&texts, &opts).unwrap();
    assert_close(&cases.iter().collect::<Vec<_>>(), &all.vectors, "all 100");
    let from_ids = model
        .embed_tokens(cases.iter().map(|c| c.ids.clone()).collect(), &opts)
        .unwrap();
    assert_close(
        &cases.iter().collect::<Vec<_>>(),
        &from_ids.vectors,
        "token ids",
    );
    for v in &all.vectors {
        let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "norm {norm}");
    }
}

#[test]
fn matryoshka_dimensions_truncate_and_renormalise() {
    let Some(dir) = model_dir() else { return };
    let model = load(&dir);
    let text = ["Embeddings map text to vectors."];
    let full = model.embed(&text, &EmbedOptions::default()).unwrap();
    let opts = EmbedOptions {
        dimensions: Some(64),
        ..Default::default()
    };
    let short = model.embed(&text, &opts).unwrap();
    let v = &short.vectors[0];
    assert_eq!(v.len(), 64);
    let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5);
    assert!(cosine(v, &full.vectors[0][..64]) > 0.99999);
    let too_many = EmbedOptions {
        dimensions: Some(385),
        ..Default::default()
    };
    let err = model.embed(&text, &too_many).unwrap_err().to_string();
    assert!(err.contains("384"), "{err}");
}

fn xllm(args: &[&str], stdin: Option<&str>) -> std::process::Output {
    let home = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_xllm"))
        .args(args)
        .env("XLLM_HOME", home.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    }
    child.wait_with_output().unwrap()
}

#[test]
fn embed_cli_formats_agree_with_the_reference() {
    let Some(dir) = model_dir() else { return };
    let (_, cases) = reference();
    let d = dir.to_str().unwrap();
    let (a, b) = (&cases[1], &cases[9]);
    // Arguments, JSON document.
    let out = xllm(
        &["embed", d, &a.text, &b.text, "--json", "--threads", "2"],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["dimensions"], 384);
    assert_eq!(doc["pooling"], "mean");
    assert_eq!(doc["normalized"], true);
    let vecs: Vec<Vec<f32>> = serde_json::from_value(doc["embeddings"].clone()).unwrap();
    assert_close(&[a, b], &vecs, "cli --json");
    assert_eq!(doc["tokens"][0].as_u64().unwrap() as usize, a.ids.len());
    // Stdin lines, JSON Lines: same vectors, bit for bit.
    let stdin = format!("{}\n\n{}\n", a.text, b.text);
    let out = xllm(&["embed", d, "--format", "jsonl"], Some(&stdin));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2, "the empty line is not an input");
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row["index"], i);
        let v: Vec<f32> = serde_json::from_value(row["embedding"].clone()).unwrap();
        assert_eq!(v, vecs[i]);
    }
    // --file, plain arrays, --dimensions.
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("in.txt");
    std::fs::write(&file, format!("{}\n", a.text)).unwrap();
    let out = xllm(
        &[
            "embed",
            d,
            "--file",
            file.to_str().unwrap(),
            "--dimensions",
            "32",
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Vec<f32> = serde_json::from_str(String::from_utf8(out.stdout).unwrap().trim()).unwrap();
    assert_eq!(v.len(), 32);
    // Bad input: clear errors, no panic.
    let out = xllm(&["embed", d, "x", "--dimensions", "0"], None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("dimensions"));
    let long = cases.iter().max_by_key(|c| c.text.len()).unwrap();
    let out = xllm(&["embed", d, "short", &long.text, "--no-truncate"], None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(err.contains("input 1") && err.contains("256"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn embedding_a_causal_model_is_a_clear_error() {
    let dir = root().join("tests/fixtures/tiny-llama");
    let out = xllm(&["embed", dir.to_str().unwrap(), "hello"], None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        err.contains("cannot embed") && err.contains("bert"),
        "{err}"
    );
}

#[test]
fn show_lists_the_embedding_capability() {
    let Some(dir) = model_dir() else { return };
    let d = dir.to_str().unwrap();
    let out = xllm(&["show", d, "--json"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["capabilities"], serde_json::json!(["embedding"]));
    assert_eq!(doc["architecture"], "bert");
    assert_eq!(doc["embedding_length"], 384);
    assert_eq!(doc["embedding"]["pooling"]["mean"], true);
    assert_eq!(doc["embedding"]["normalize"], true);
    assert_eq!(doc["embedding"]["max_tokens"], 256);
    assert_eq!(doc["kv_bytes_per_token"], serde_json::json!([]));
    let out = xllm(&["show", d], None);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("Capabilities\n  embedding\n"), "{text}");
    assert!(text.contains("pooling             mean"), "{text}");
    assert!(!text.contains("KV cache per token"), "{text}");
    // A causal model says completion, not embedding.
    let tiny = root().join("tests/fixtures/tiny-llama");
    let out = xllm(&["show", tiny.to_str().unwrap(), "--json"], None);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["capabilities"], serde_json::json!(["completion"]));
}
