//! Runs tests/clients/test_clients.py: `xllm serve` driven by the official `openai` and
//! `ollama` Python libraries from PyPI, against the real SmolLM2. The venv is made by .ci/run
//! (`.venv-clients`, or `XLLM_CLIENTS_PYTHON` names an interpreter that has the libraries);
//! without it, or without models/smollm2, the test is skipped with a note.

use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn official_openai_and_ollama_clients_work_against_the_server() {
    let python = std::env::var_os("XLLM_CLIENTS_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".venv-clients/bin/python"));
    if !python.exists() {
        eprintln!(
            "skipped: no client venv at {} (.ci/run makes it: python3 -m venv .venv-clients && .venv-clients/bin/pip install openai ollama jsonschema)",
            python.display()
        );
        return;
    }
    let Some(gguf) = std::fs::read_dir(root().join("models/smollm2"))
        .ok()
        .and_then(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| p.extension().is_some_and(|e| e == "gguf"))
        })
    else {
        eprintln!("skipped: models/smollm2 is absent (run scripts/get_smollm2.sh)");
        return;
    };
    let bin =
        std::env::var_os("XLLM_TEST_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_xllm").into());
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
