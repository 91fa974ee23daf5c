//! `xllm show` / `run` / `perplexity` on the tiny Nemotron-H fixture through the real binary. The
//! weights are random: these check the plumbing (facts `show` reports, the chat template's think
//! switch, stop tokens, determinism), not what the model says. Numbers are checked against
//! transformers in `tests/nemotron_parity.rs`.

use std::process::{Command, Output};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/nemotron_h_a");

fn xllm(args: &[&str]) -> Output {
    let home = tempfile::tempdir().unwrap();
    Command::new(env!("CARGO_BIN_EXE_xllm"))
        .args(args)
        .env("XLLM_HOME", home.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[test]
fn show_reports_pattern_experts_params_and_state() {
    let j: serde_json::Value =
        serde_json::from_str(&ok(&xllm(&["show", FIXTURE, "--json"]))).unwrap();
    assert_eq!(j["architecture"], "nemotron_h");
    assert_eq!(j["layer_pattern"], "MEM*EMEM*E");
    assert_eq!(j["layers"], 10);
    assert_eq!(j["attention_layers"], 2);
    assert_eq!(
        (j["experts"].as_u64(), j["experts_active"].as_u64()),
        (Some(12), Some(4))
    );
    // 4 Mamba layers × (conv 3 × 128 + SSM 8 heads × 8 × 16) f32.
    assert_eq!(j["recurrent_state_bytes"], 4 * (3 * 128 + 64 * 16) * 4);
    let (total, active) = (
        j["parameters"].as_u64().unwrap(),
        j["active_parameters"].as_u64().unwrap(),
    );
    assert!(active < total, "{active} < {total}");
    // KV only for the two attention layers: 2 layers × (k, v) × 2 KV heads × 16 × 2 bytes.
    assert_eq!(j["kv_bytes_per_token"][0]["bytes"], 2 * 2 * 2 * 16 * 2);
    let text = ok(&xllm(&["show", FIXTURE]));
    assert!(
        text.contains("4 Mamba (M), 4 MoE (E), 2 attention (*)"),
        "{text}"
    );
    assert!(text.contains("recurrent state"), "{text}");
    assert!(
        text.contains("experts             4 active of 12"),
        "{text}"
    );
}

#[test]
fn run_is_deterministic_and_stops_within_the_limit() {
    let run = || -> serde_json::Value {
        serde_json::from_str(&ok(&xllm(&[
            "run",
            FIXTURE,
            "Tell me about the river.",
            "--format",
            "json",
            "--temperature",
            "0",
            "--max-tokens",
            "12",
        ])))
        .unwrap()
    };
    let a = run();
    let tokens = a["tokens"].as_array().unwrap();
    assert!(!tokens.is_empty() && tokens.len() <= 12, "{a}");
    let reason = a["finish_reason"].as_str().unwrap();
    if reason == "stop" {
        // </s> (2) or <|im_end|> (4), from config.json and generation_config.json.
        let last = tokens.last().unwrap().as_u64().unwrap();
        assert!([2, 4].contains(&last), "stopped on {last}");
    } else {
        assert_eq!(reason, "length");
    }
    assert_eq!(run()["tokens"], a["tokens"]);
}

#[test]
fn perplexity_runs_over_a_text() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("t.txt");
    std::fs::write(
        &file,
        "The river runs past the old mill and under the stone bridge.",
    )
    .unwrap();
    let out = ok(&xllm(&[
        "perplexity",
        FIXTURE,
        "--file",
        file.to_str().unwrap(),
        "--json",
    ]));
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    let ppl = j["perplexity"].as_f64().unwrap();
    assert!(ppl.is_finite() && ppl > 1.0, "{j}");
}
