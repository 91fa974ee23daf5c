//! `xllm tokenize`: ids and pieces, as text (llama-tokenize's `<id> -> '<piece>'`) and JSON, for a
//! safetensors folder (tokenizer.json) and a GGUF (vocabulary from its metadata).

use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn xllm(args: &[&str]) -> std::process::Output {
    let home = tempfile::tempdir().unwrap();
    Command::new(env!("CARGO_BIN_EXE_xllm"))
        .args(args)
        .env("XLLM_HOME", home.path())
        .output()
        .unwrap()
}

#[test]
fn tokenize_prints_ids_and_pieces_of_a_folder_model() {
    let dir = root().join("tests/fixtures/tiny-llama");
    let out = xllm(&["tokenize", dir.to_str().unwrap(), "--json", "Hello world"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids = json["ids"].as_array().unwrap();
    let pieces = json["pieces"].as_array().unwrap();
    assert!(!ids.is_empty());
    assert_eq!(ids.len(), pieces.len());
    let text: String = pieces.iter().map(|p| p.as_str().unwrap()).collect();
    assert!(text.contains("Hello") && text.contains("world"), "{text}");

    let out = xllm(&["tokenize", dir.to_str().unwrap(), "Hello world"]);
    let text = String::from_utf8(out.stdout).unwrap();
    let first = text.lines().next().unwrap();
    assert!(
        first.trim_start().starts_with(&ids[0].to_string()) && first.contains(" -> '"),
        "{text}"
    );
}

#[test]
fn tokenize_a_gguf_matches_llama_cpp() {
    let Some(gguf) = std::fs::read_dir(root().join("models/smollm2"))
        .ok()
        .and_then(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| p.extension().is_some_and(|e| e == "gguf"))
        })
    else {
        eprintln!("skipped: models/smollm2 absent (scripts/get_smollm2.sh)");
        return;
    };
    // tests/fixtures/smollm2_tokens.json: llama.cpp gives [19556, 905] for "Hello world".
    let out = xllm(&[
        "tokenize",
        gguf.to_str().unwrap(),
        "--no-bos",
        "--json",
        "Hello world",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["ids"], serde_json::json!([19556, 905]));
    assert_eq!(json["pieces"], serde_json::json!(["Hello", " world"]));
}

#[test]
fn tokenize_an_unknown_model_is_a_clear_error() {
    let out = xllm(&["tokenize", "/nonexistent/model.gguf", "x"]);
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
}
