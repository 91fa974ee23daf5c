//! SmolLM2 as a bf16 safetensors folder, made without torch: the Q4_1 GGUF is dequantized with
//! candle, llama.cpp's q/k row permutation is undone, and config/tokenizer files are written from
//! the GGUF metadata — the same steps transformers' `from_pretrained(gguf_file=...)` takes
//! (scripts/convert_smollm2_safetensors.py). Checks perplexity against transformers f32 on the
//! transformers-made copy (tests/fixtures/smollm2_ppl.json) and peak memory against the file size.
//! Needs models/smollm2 (scripts/get_smollm2.sh); skipped with a note when absent.

mod common;

use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

use common::smollm2::{convert, smollm2_gguf};

#[test]
fn converted_safetensors_matches_transformers_and_stays_in_memory_budget() {
    let Some(gguf) = smollm2_gguf() else {
        eprintln!("skipped: models/smollm2 absent (scripts/get_smollm2.sh)");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("smollm2-st");
    convert(&gguf, &dir);
    let home = tempfile::tempdir().unwrap();
    let xllm = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_xllm"))
            .args(args)
            .env("XLLM_HOME", home.path())
            .output()
            .unwrap()
    };

    let out = xllm(&[
        "perplexity",
        dir.to_str().unwrap(),
        "-f",
        root().join("tests/fixtures/ppl_text.txt").to_str().unwrap(),
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ours: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/smollm2_ppl.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(ours["tokens"], reference["tokens"]);
    let (a, b) = (
        ours["perplexity"].as_f64().unwrap(),
        reference["transformers_f32"]["perplexity"]
            .as_f64()
            .unwrap(),
    );
    assert!(
        (a - b).abs() / b < 0.01,
        "perplexity {a} vs transformers f32 {b}"
    );

    let out = xllm(&[
        "run",
        dir.to_str().unwrap(),
        "What is the capital of France?",
        "--temperature",
        "0",
        "-n",
        "16",
        "--verbose",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("Paris"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let peak_mib: f64 = stderr
        .lines()
        .find_map(|l| l.strip_prefix("peak memory:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("peak memory line (Linux)");
    let file_mib = std::fs::metadata(dir.join("model.safetensors"))
        .unwrap()
        .len() as f64
        / (1024.0 * 1024.0);
    assert!(
        peak_mib < 1.5 * file_mib,
        "peak RSS {peak_mib:.1} MiB vs file {file_mib:.1} MiB"
    );
}
