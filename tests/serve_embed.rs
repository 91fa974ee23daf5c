//! Embeddings through `xllm serve`: `/v1/embeddings`, `/api/embed`, `/api/embeddings` on the tiny
//! Qwen3-Embedding-layout fixture (always) checked against sentence-transformers' vectors and
//! against `xllm embed`; the errors (chat to an embedding model, embeddings from a causal one,
//! bad fields); the registry (capabilities, `/api/ps`, keep-alive, LRU beside a causal model);
//! concurrent requests packed into shared passes on the real all-MiniLM-L6-v2 (skipped without
//! models/minilm); and the official `openai`/`ollama` clients (tests/clients/
//! test_embed_clients.py, skipped without the client venv or models/minilm).

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::server::{fixture, path_str, root, Server};
use serde_json::{json, Value};

fn qe() -> String {
    format!("qe={}", path_str(&fixture("tiny-qwen3-embedding")))
}

fn tiny() -> String {
    format!("tiny={}", path_str(&fixture("tiny-llama")))
}

fn reference() -> Vec<Value> {
    let doc: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("tiny-qwen3-embedding").join("reference.json")).unwrap(),
    )
    .unwrap();
    doc["cases"].as_array().unwrap().clone()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn bin() -> std::ffi::OsString {
    std::env::var_os("XLLM_TEST_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_xllm").into())
}

/// `xllm embed MODEL --json TEXTS…`: the vectors the CLI prints.
fn cli_embed(model: &str, texts: &[&str]) -> Vec<Vec<f32>> {
    let out = Command::new(bin())
        .args(["embed", model, "--json", "--threads", "2", "--"])
        .args(texts)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    doc["embeddings"]
        .as_array()
        .unwrap()
        .iter()
        .map(floats)
        .collect()
}

#[test]
fn endpoints_return_the_reference_vectors() {
    let cases = reference();
    let texts: Vec<&str> = cases.iter().map(|c| c["text"].as_str().unwrap()).collect();
    let total_tokens: usize = cases
        .iter()
        .map(|c| c["ids"].as_array().unwrap().len())
        .sum();
    let s = Server::start(&["--model", &qe(), "--model", &tiny()]);

    // OpenAI, floats.
    let r = s.post("/v1/embeddings", &json!({"model": "qe", "input": texts}));
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], "qe");
    assert_eq!(v["usage"]["prompt_tokens"], total_tokens);
    assert_eq!(v["usage"]["total_tokens"], total_tokens);
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), cases.len());
    let vectors: Vec<Vec<f32>> = data.iter().map(|d| floats(&d["embedding"])).collect();
    for (i, (d, c)) in data.iter().zip(&cases).enumerate() {
        assert_eq!(d["object"], "embedding");
        assert_eq!(d["index"], i);
        let cos = cosine(&vectors[i], &floats(&c["batch"]));
        assert!(cos >= 0.9999, "cosine {cos} for {:?}", c["text"]);
    }
    // The same vectors as `xllm embed` prints for the same inputs, to the last bit.
    let cli = cli_embed(&path_str(&fixture("tiny-qwen3-embedding")), &texts);
    assert_eq!(vectors, cli, "server and CLI vectors differ");

    // base64: little-endian f32, the same numbers.
    let r = s.post(
        "/v1/embeddings",
        &json!({"model": "qe", "input": texts, "encoding_format": "base64"}),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    let decoded: Vec<Vec<f32>> = r.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(d["embedding"].as_str().unwrap())
                .unwrap();
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect()
        })
        .collect();
    assert_eq!(decoded, vectors);

    // Token ids (one list, and a list of lists) embed as given.
    let ids: Vec<Value> = cases.iter().map(|c| c["ids"].clone()).collect();
    let r = s.post("/v1/embeddings", &json!({"model": "qe", "input": ids}));
    assert_eq!(r.status, 200, "{}", r.text);
    let from_ids: Vec<Vec<f32>> = r.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| floats(&d["embedding"]))
        .collect();
    assert_eq!(from_ids, vectors);
    let r = s.post(
        "/v1/embeddings",
        &json!({"model": "qe", "input": cases[1]["ids"]}),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    let one = floats(&r.json()["data"][0]["embedding"]);
    assert!(cosine(&one, &vectors[1]) > 0.99999);

    // Matryoshka.
    let r = s.post(
        "/v1/embeddings",
        &json!({"model": "qe", "input": texts[1], "dimensions": 16}),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    let short = floats(&r.json()["data"][0]["embedding"]);
    assert_eq!(short.len(), 16);
    assert!(cosine(&short, &vectors[1][..16]) > 0.99999);
    let norm: f32 = short.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5);

    // Ollama.
    let r = s.post(
        "/api/embed",
        &json!({"model": "qe", "input": texts, "options": {"num_ctx": 2048}}),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    assert_eq!(v["model"], "qe");
    assert_eq!(v["prompt_eval_count"], total_tokens);
    assert!(v["total_duration"].as_u64().unwrap() > 0);
    assert!(v["load_duration"].is_u64());
    let ollama: Vec<Vec<f32>> = v["embeddings"]
        .as_array()
        .unwrap()
        .iter()
        .map(floats)
        .collect();
    assert_eq!(ollama, vectors);
    let r = s.post("/api/embed", &json!({"model": "qe", "input": texts[2]}));
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["embeddings"].as_array().unwrap().len(), 1);
    let r = s.post(
        "/api/embeddings",
        &json!({"model": "qe", "prompt": texts[3]}),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(cosine(&floats(&r.json()["embedding"]), &vectors[3]) > 0.99999);
    // An empty input only loads the model.
    let r = s.post("/api/embed", &json!({"model": "qe", "input": []}));
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["embeddings"], json!([]));
    let r = s.post("/api/embeddings", &json!({"model": "qe", "prompt": ""}));
    assert_eq!(r.json()["embedding"], json!([]));

    // The model is listed as an embedding model.
    let show = s.post("/api/show", &json!({"model": "qe"})).json();
    assert_eq!(show["capabilities"], json!(["embedding"]));
    let show = s.post("/api/show", &json!({"model": "tiny"})).json();
    assert_eq!(show["capabilities"], json!(["completion", "tools"]));
    let ps = s.get("/api/ps").json();
    let entry = ps["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "qe")
        .expect("qe is loaded")
        .clone();
    assert_eq!(entry["context_length"], 600);
    assert!(s.metric("xllm_embedding_requests", "qe").unwrap() >= 8.0);
    assert!(s.metric("xllm_embedding_tokens", "qe").unwrap() >= 2.0 * total_tokens as f64);
}

#[test]
fn wrong_model_kinds_and_bad_fields_are_clear_400s() {
    let s = Server::start(&["--model", &qe(), "--model", &tiny()]);
    let chat = json!({"model": "qe", "messages": [{"role": "user", "content": "hi"}]});
    for path in ["/v1/chat/completions", "/api/chat"] {
        let r = s.post(path, &chat);
        assert_eq!(r.status, 400, "{path}: {}", r.text);
        assert!(r.text.contains("embedding model"), "{path}: {}", r.text);
    }
    let r = s.post("/v1/chat/completions", &chat);
    assert_eq!(r.json()["error"]["param"], "model");
    for (path, body) in [
        ("/v1/completions", json!({"model": "qe", "prompt": "hi"})),
        ("/api/generate", json!({"model": "qe", "prompt": "hi"})),
        ("/api/generate", json!({"model": "qe"})),
    ] {
        let r = s.post(path, &body);
        assert_eq!(r.status, 400, "{path}: {}", r.text);
        assert!(r.text.contains("does not support"), "{path}: {}", r.text);
    }
    assert_eq!(
        s.get("/api/ps").json()["models"],
        json!([]),
        "refused before loading"
    );
    for (path, body) in [
        ("/v1/embeddings", json!({"model": "tiny", "input": "hi"})),
        ("/api/embed", json!({"model": "tiny", "input": "hi"})),
        ("/api/embeddings", json!({"model": "tiny", "prompt": "hi"})),
    ] {
        let r = s.post(path, &body);
        assert_eq!(r.status, 400, "{path}: {}", r.text);
        assert!(
            r.text.contains("does not support embeddings"),
            "{path}: {}",
            r.text
        );
    }
    let r = s.post("/v1/embeddings", &json!({"model": "tiny", "input": "hi"}));
    assert_eq!(r.json()["error"]["code"], "model_not_embedding");

    let long = reference().last().unwrap()["text"]
        .as_str()
        .unwrap()
        .to_string();
    for (body, param, needle) in [
        (
            json!({"model": "qe", "input": "hi", "encoding_format": "hex"}),
            "encoding_format",
            "base64",
        ),
        (
            json!({"model": "qe", "input": "hi", "dimensions": 0}),
            "dimensions",
            "at least 1",
        ),
        (
            json!({"model": "qe", "input": "hi", "dimensions": 65}),
            "dimensions",
            "64-dimensional",
        ),
        (json!({"model": "qe", "input": []}), "input", "empty"),
        (json!({"model": "qe", "input": [""]}), "input", "empty"),
        (
            json!({"model": "qe", "input": [[1, 2], "x"]}),
            "input",
            "list",
        ),
        (
            json!({"model": "qe", "input": [[5, 99999]]}),
            "input",
            "outside the vocabulary",
        ),
        (
            json!({"model": "qe", "input": long, "truncate": false}),
            "input",
            "limit of 600",
        ),
    ] {
        let r = s.post("/v1/embeddings", &body);
        assert_eq!(r.status, 400, "{body}: {}", r.text);
        let e = &r.json()["error"];
        assert_eq!(e["param"], param, "{body}: {e}");
        assert!(
            e["message"].as_str().unwrap().contains(needle),
            "{body}: {e}"
        );
    }
    // Truncated by default.
    let r = s.post("/v1/embeddings", &json!({"model": "qe", "input": long}));
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["usage"]["prompt_tokens"], 600);
    let r = s.post(
        "/api/embed",
        &json!({"model": "qe", "input": long, "truncate": false}),
    );
    assert_eq!(r.status, 400);
    assert!(r.json()["error"].as_str().unwrap().contains("limit of 600"));
    let r = s.post(
        "/api/embed",
        &json!({"model": "qe", "input": "x", "keep_alive": "soon"}),
    );
    assert_eq!(r.status, 400);
    let r = s.post(
        "/v1/embeddings",
        &json!({"model": "nope/nothing", "input": "x"}),
    );
    assert_eq!(r.status, 404, "{}", r.text);
}

#[test]
fn registry_keeps_embedding_models_like_causal_ones() {
    let s = Server::start(&["--model", &qe(), "--model", &tiny(), "--max-models", "1"]);
    let loaded = |s: &Server| -> Vec<String> {
        s.get("/api/ps").json()["models"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["name"].as_str().unwrap().to_string())
            .collect()
    };
    let r = s.post("/api/embed", &json!({"model": "qe", "input": "hello"}));
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(
        r.json()["load_duration"].as_u64().unwrap() > 0,
        "loaded now"
    );
    assert_eq!(loaded(&s), vec!["qe"]);
    let r = s.post(
        "/api/generate",
        &json!({"model": "tiny", "prompt": "hi", "stream": false, "options": {"num_predict": 2}}),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        loaded(&s),
        vec!["tiny"],
        "the idle embedding model made room"
    );
    let r = s.post(
        "/api/embed",
        &json!({"model": "qe", "input": "hello", "keep_alive": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(loaded(&s), vec!["qe"]);
    // keep_alive 0: unloaded once the request is done.
    let t0 = Instant::now();
    while !loaded(&s).is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "keep_alive 0 did not unload"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn minilm() -> Option<PathBuf> {
    let dir = root().join("models/minilm");
    if dir.join("model.safetensors").is_file() {
        Some(dir)
    } else {
        eprintln!("skipped: models/minilm absent (scripts/get_minilm.sh)");
        None
    }
}

/// Sixteen clients at once: every answer equals its solo answer, and the worker packed
/// concurrent requests into shared passes (fewer passes than requests).
#[test]
fn concurrent_requests_share_packed_passes() {
    let Some(dir) = minilm() else { return };
    let s = Server::start(&["--model", &format!("minilm={}", path_str(&dir))]);
    let texts: Vec<String> = (0..16)
        .map(|i| {
            format!(
                "Request {i}: embeddings map text to vectors so that similar meanings are close. "
            )
            .repeat(1 + i % 5)
        })
        .collect();
    let solo: Vec<Vec<f32>> = texts
        .iter()
        .map(|t| {
            let r = s.post(
                "/v1/embeddings",
                &json!({"model": "minilm", "input": [t, t]}),
            );
            assert_eq!(r.status, 200, "{}", r.text);
            floats(&r.json()["data"][0]["embedding"])
        })
        .collect();
    let before_requests = s.metric("xllm_embedding_requests", "minilm").unwrap();
    let before_batches = s.metric("xllm_embedding_batches", "minilm").unwrap();
    let answers: Vec<Vec<Vec<f32>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = texts
            .iter()
            .map(|t| {
                let s = &s;
                scope.spawn(move || {
                    // Eight copies: each request is a few passes' worth of work.
                    let input = vec![t.clone(); 8];
                    let r = s.post(
                        "/v1/embeddings",
                        &json!({"model": "minilm", "input": input}),
                    );
                    assert_eq!(r.status, 200, "{}", r.text);
                    r.json()["data"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|d| floats(&d["embedding"]))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, got) in answers.iter().enumerate() {
        assert_eq!(got.len(), 8);
        for v in got {
            let diff = v
                .iter()
                .zip(&solo[i])
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                diff < 1e-5,
                "request {i}: differs from its solo answer by {diff}"
            );
        }
    }
    let requests = s.metric("xllm_embedding_requests", "minilm").unwrap() - before_requests;
    let batches = s.metric("xllm_embedding_batches", "minilm").unwrap() - before_batches;
    assert_eq!(requests, 16.0);
    assert!(
        batches < requests,
        "{batches} passes for {requests} concurrent requests: nothing was packed together"
    );
}

#[test]
fn official_clients_get_the_vectors_of_xllm_embed() {
    let python = std::env::var_os("XLLM_CLIENTS_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".venv-clients/bin/python"));
    if !python.exists() {
        eprintln!(
            "skipped: no client venv at {} (.ci/run makes it)",
            python.display()
        );
        return;
    }
    let Some(dir) = minilm() else { return };
    let out = Command::new(&python)
        .arg(root().join("tests/clients/test_embed_clients.py"))
        .arg(bin())
        .arg(&dir)
        .arg(fixture("tiny-llama"))
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "client checks failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("all embedding client checks passed"),
        "{stdout}"
    );
}
