//! Runs tests/clients/test_clients.py: `xllm serve` driven by the official `openai` and
//! `ollama` Python libraries from PyPI, against the real SmolLM2. The venv is made by .ci/run
//! (`.venv-clients`, or `XLLM_CLIENTS_PYTHON` names an interpreter that has the libraries);
//! without it, or without models/smollm2, the test is skipped with a note.

use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The client venv's python and the SmolLM2 GGUF, or `None` (with a note) when absent.
fn setup() -> Option<(PathBuf, PathBuf)> {
    let python = std::env::var_os("XLLM_CLIENTS_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".venv-clients/bin/python"));
    if !python.exists() {
        eprintln!(
            "skipped: no client venv at {} (.ci/run makes it: python3 -m venv .venv-clients && .venv-clients/bin/pip install openai ollama jsonschema)",
            python.display()
        );
        return None;
    }
    let Some(gguf) = std::fs::read_dir(root().join("models/smollm2"))
        .ok()
        .and_then(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| p.extension().is_some_and(|e| e == "gguf"))
        })
    else {
        eprintln!("skipped: models/smollm2 is absent (run scripts/get_smollm2.sh)");
        return None;
    };
    Some((python, gguf))
}

fn binary() -> std::ffi::OsString {
    std::env::var_os("XLLM_TEST_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_xllm").into())
}

/// Structured output (response_format, Ollama format) and forced tool calls: every answer of
/// SmolLM2 parses and validates (jsonschema). `XLLM_STRUCTURED_PROMPTS=50` runs the full
/// 50 prompts x 10 schemas (CI runs 3).
#[test]
fn structured_output_and_tool_calls_validate_through_the_clients() {
    let Some((python, gguf)) = setup() else {
        return;
    };
    let prompts = std::env::var("XLLM_STRUCTURED_PROMPTS").unwrap_or_else(|_| "3".into());
    let out = Command::new(&python)
        .arg(root().join("tests/clients/test_structured.py"))
        .arg(binary())
        .arg(&gguf)
        .args(["--prompts", &prompts])
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "structured output checks failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("all structured output checks passed"),
        "{stdout}"
    );
}

#[test]
fn official_openai_and_ollama_clients_work_against_the_server() {
    let Some((python, gguf)) = setup() else {
        return;
    };
    let bin = binary();
    let out = Command::new(&python)
        .arg(root().join("tests/clients/test_clients.py"))
        .arg(&bin)
        .arg(&gguf)
        .arg(root().join("tests/fixtures/tiny-llama"))
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "client checks failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("all client checks passed"), "{stdout}");
}
