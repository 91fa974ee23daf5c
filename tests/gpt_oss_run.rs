//! `xllm run` on the tiny gpt-oss fixture through the real binary. The weights are random, so
//! these tests check the harmony plumbing (flags, JSON shape, exit codes, determinism, how the
//! text view relates to the JSON of the same turn), not what the model says. The exact
//! thinking/answer rendering is tested on scripted token streams in `engine::postprocess` and
//! `cli::turn_view`.

use std::process::{Command, Output};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/gpt_oss_tiny");
const TINY_LLAMA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-llama");

fn xllm(args: &[&str]) -> Output {
    let home = tempfile::tempdir().unwrap();
    Command::new(env!("CARGO_BIN_EXE_xllm"))
        .args(args)
        .env("XLLM_HOME", home.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap()
}

fn json_turn(extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["run", FIXTURE, "What is 2+2?", "--format", "json"];
    args.extend_from_slice(extra);
    if !extra.contains(&"--max-tokens") {
        args.extend_from_slice(&["--max-tokens", "40"]);
    }
    let out = xllm(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

#[test]
fn json_has_thinking_and_text_apart_and_greedy_is_deterministic() {
    let a = json_turn(&["--temperature", "0"]);
    for key in ["thinking", "text", "tool_calls", "tokens", "finish_reason"] {
        assert!(a.get(key).is_some(), "missing '{key}' in {a}");
    }
    assert_eq!(a["reasoning_effort"], "medium", "default effort");
    let tokens = a["tokens"].as_array().unwrap();
    assert!(!tokens.is_empty() && tokens.len() <= 40, "{a}");
    let reason = a["finish_reason"].as_str().unwrap();
    assert!(reason == "stop" || reason == "length", "{reason}");
    if reason == "stop" {
        // The turn ends on a harmony stop token: <|return|> (2), <|endoftext|> (1), <|call|> (8).
        let last = tokens.last().unwrap().as_u64().unwrap();
        assert!([1, 2, 8].contains(&last), "stopped on {last}");
    }
    let b = json_turn(&["--temperature", "0"]);
    assert_eq!(a["tokens"], b["tokens"]);
    assert_eq!(a["text"], b["text"]);
    assert_eq!(a["thinking"], b["thinking"]);
}

#[test]
fn reasoning_effort_reaches_the_prompt() {
    let low = json_turn(&["--temperature", "0", "--reasoning-effort", "low"]);
    let high = json_turn(&["--temperature", "0", "--reasoning-effort", "high"]);
    assert_eq!(low["reasoning_effort"], "low");
    assert_eq!(high["reasoning_effort"], "high");
    // The fixture's tokenizer spells "low" and "high" differently, so the prompts differ.
    let (lp, hp) = (
        &low["stats"]["prompt_eval_count"],
        &high["stats"]["prompt_eval_count"],
    );
    assert!(lp.as_u64().unwrap() > 100 && hp.as_u64().unwrap() > 100);
    let bad = xllm(&["run", FIXTURE, "hi", "--reasoning-effort", "extreme"]);
    assert_eq!(bad.status.code(), Some(2), "clap usage error");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("low, medium, high"));
}

/// The text view of a turn is what the JSON of the same turn says: the answer (with the
/// reasoning above it unless hidden), no ANSI codes when stdout is not a terminal.
#[test]
fn text_view_matches_json_of_the_same_turn() {
    for seed in ["2", "9", "11"] {
        let common = [
            "--temperature",
            "1.5",
            "--seed",
            seed,
            "--max-tokens",
            "60",
            "--threads",
            "1",
        ];
        let json = json_turn(&common);
        let mut args = vec!["run", FIXTURE, "What is 2+2?", "--hide-thinking"];
        args.extend_from_slice(&common);
        let hidden = xllm(&args);
        assert!(hidden.status.success());
        let hidden = String::from_utf8(hidden.stdout).unwrap();
        assert!(!hidden.contains('\x1b'), "no ANSI codes into a pipe");
        let text = json["text"].as_str().unwrap();
        if json["tool_calls"].as_array().unwrap().is_empty() {
            let expected = if text.ends_with('\n') {
                text.to_string()
            } else {
                format!("{text}\n")
            };
            assert_eq!(hidden, expected, "seed {seed}");
        }
        args.retain(|a| *a != "--hide-thinking");
        let shown = String::from_utf8(xllm(&args).stdout).unwrap();
        let thinking = json["thinking"].as_str().unwrap();
        assert_eq!(
            shown.starts_with("Thinking...\n"),
            !thinking.is_empty(),
            "seed {seed}: {shown:?}"
        );
        assert!(shown.ends_with(&hidden), "seed {seed}");
    }
}

#[test]
fn raw_prompt_bypasses_harmony_and_other_models_ignore_the_flags_with_a_note() {
    let raw = xllm(&[
        "run",
        FIXTURE,
        "hello",
        "--raw",
        "--format",
        "json",
        "--max-tokens",
        "5",
        "--temperature",
        "0",
    ]);
    assert!(raw.status.success());
    let v: serde_json::Value = serde_json::from_slice(&raw.stdout).unwrap();
    assert!(
        v.get("thinking").is_none(),
        "--raw is plain generation: {v}"
    );

    let llama = xllm(&[
        "run",
        TINY_LLAMA,
        "hello",
        "--reasoning-effort",
        "high",
        "--max-tokens",
        "3",
        "--temperature",
        "0",
    ]);
    assert!(llama.status.success());
    let err = String::from_utf8_lossy(&llama.stderr);
    assert!(
        err.contains("applies to gpt-oss (harmony) chat only"),
        "{err}"
    );
}

#[test]
fn show_reports_gpt_oss_parameters_experts_weights_and_window() {
    let out = xllm(&["show", FIXTURE, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{FIXTURE}/config.json")).unwrap())
            .unwrap();
    let (total, active) = xllm::arch::gpt_oss::GptOssConfig::from_value(&config)
        .unwrap()
        .parameter_counts();
    assert_eq!(v["parameters"], total);
    assert_eq!(v["active_parameters"], active);
    // The count from config shapes agrees with the tensors actually stored (MXFP4: 2 per byte).
    let mut stored = 0u64;
    for shard in ["model-00000-of-00001", "model-00001-of-00001"] {
        let header = xllm::model::inspect::read_safetensors_header(std::path::Path::new(&format!(
            "{FIXTURE}/{shard}.safetensors"
        )))
        .unwrap();
        for (name, t) in header {
            let n: u64 = t.shape.iter().product();
            stored += if name.ends_with("_blocks") {
                2 * n
            } else if name.ends_with("_scales") {
                0
            } else {
                n
            };
        }
    }
    assert_eq!(total, stored, "parameters from config vs from tensors");
    assert!(active < total);
    assert_eq!(
        (&v["experts"], &v["experts_active"]),
        (&8.into(), &4.into())
    );
    assert_eq!(v["quantization"], "mxfp4+bf16");
    assert_eq!(v["context_length"], 131072);
    assert_eq!(v["sliding_window"], 16);

    let text = xllm(&["show", FIXTURE]);
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(text.contains("experts             4 active of 8"), "{text}");
    assert!(text.contains("sliding window      16"), "{text}");
    assert!(text.contains("weights             mxfp4+bf16"), "{text}");
}

/// `run`, `perplexity` and `bench` share the device selection: a GPU asked of a CPU-only build
/// is a clear error and a non-zero exit, before anything is loaded.
#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_on_a_cpu_build_is_a_clear_error_for_every_command() {
    let text = format!("{FIXTURE}/tokenizer_config.json");
    let runs: [Vec<&str>; 3] = [
        vec!["run", FIXTURE, "hi", "--device", "cuda"],
        vec!["perplexity", FIXTURE, "--file", &text, "--device", "cuda:0"],
        vec!["bench", FIXTURE, "-p", "8", "-n", "2", "--device", "cuda"],
    ];
    for args in runs {
        let out = xllm(&args);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("cuda:0 requested, but this xllm was built without CUDA support")
                && err.contains("--device cpu"),
            "{args:?}: {err}"
        );
    }
    let out = xllm(&["run", FIXTURE, "hi", "--device", "tpu"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid device 'tpu'"));
}
