//! End-to-end tests of `xllm run`, `xllm perplexity` and `xllm bench` driving the real binary:
//! on the tiny transformers fixtures (always), and on SmolLM2 Q4_1 GGUF against llama.cpp's
//! numbers (when scripts/get_smollm2.sh has fetched it, as CI does).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures").join(name)
}

fn xllm(args: &[&str]) -> Output {
    let home = tempfile::tempdir().unwrap();
    Command::new(env!("CARGO_BIN_EXE_xllm"))
        .args(args)
        .env("XLLM_HOME", home.path())
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .expect("xllm runs")
}

fn json_of(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "xllm failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn smollm2_gguf() -> Option<PathBuf> {
    std::fs::read_dir(root().join("models/smollm2"))
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "gguf"))
}

fn reference(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name).join("reference.json")).unwrap())
        .unwrap()
}

#[test]
fn perplexity_of_tiny_models_matches_transformers() {
    for name in ["tiny-llama", "tiny-qwen3", "tiny-qwen2"] {
        let dir = fixture(name);
        let out = xllm(&[
            "perplexity",
            dir.to_str().unwrap(),
            "--file",
            dir.join("text.txt").to_str().unwrap(),
            "--json",
        ]);
        let ours = json_of(&out);
        let expected = reference(name);
        assert_eq!(
            ours["tokens"], expected["tokens"],
            "{name}: same tokenization"
        );
        assert_eq!(ours["scored_tokens"], expected["scored_tokens"]);
        let (a, b) = (
            ours["perplexity"].as_f64().unwrap(),
            expected["perplexity"].as_f64().unwrap(),
        );
        assert!(
            (a - b).abs() / b < 1e-4,
            "{name}: perplexity {a} vs transformers {b}"
        );
    }
}

#[test]
fn perplexity_windows_split_long_texts() {
    let dir = fixture("tiny-llama");
    let out = xllm(&[
        "perplexity",
        dir.to_str().unwrap(),
        "-f",
        dir.join("text.txt").to_str().unwrap(),
        "--ctx",
        "32",
        "--json",
    ]);
    let ours = json_of(&out);
    // 85 tokens in windows of 32, 32, 21: each window scores all but its first token.
    assert_eq!(ours["windows"], 3);
    assert_eq!(ours["scored_tokens"], 85 - 3);
}

#[test]
fn greedy_run_is_deterministic_and_json_reports_everything() {
    let dir = fixture("tiny-qwen3");
    let args = [
        "run",
        dir.to_str().unwrap(),
        "--raw",
        "The quick brown",
        "--temperature",
        "0",
        "-n",
        "12",
        "--format",
        "json",
    ];
    let a = json_of(&xllm(&args));
    let b = json_of(&xllm(&args));
    assert_eq!(a["tokens"], b["tokens"]);
    assert_eq!(a["text"], b["text"]);
    let stats = &a["stats"];
    let n = a["tokens"].as_array().unwrap().len();
    // A random model rarely hits its end-of-sequence id, but either outcome is consistent.
    match a["finish_reason"].as_str().unwrap() {
        "length" => assert_eq!(n, 12),
        "stop" => assert!(n < 12),
        other => panic!("unexpected finish reason {other}"),
    }
    assert_eq!(stats["eval_count"].as_u64().unwrap() as usize, n);
    assert!(stats["prompt_eval_count"].as_u64().unwrap() > 0);
    assert!(stats["kv_cache_bytes"].as_u64().unwrap() > 0);
}

#[test]
fn sampling_with_a_seed_is_reproducible() {
    let dir = fixture("tiny-llama");
    let run = |seed: &str| {
        json_of(&xllm(&[
            "run",
            dir.to_str().unwrap(),
            "--raw",
            "Paris is",
            "--temperature",
            "1.5",
            "--top-k",
            "0",
            "--seed",
            seed,
            "-n",
            "20",
            "--format",
            "json",
        ]))["tokens"]
            .clone()
    };
    assert_eq!(run("1"), run("1"));
    assert_ne!(
        run("1"),
        run("2"),
        "different seeds should sample differently"
    );
}

#[test]
fn stop_string_ends_the_answer_before_it() {
    // This prompt gives tiny-qwen3 a greedy answer of whole characters (" the the ... theSSS").
    let dir = fixture("tiny-qwen3");
    let base = [
        "run",
        dir.to_str().unwrap(),
        "--raw",
        "Paris is the",
        "--temperature",
        "0",
        "-n",
        "30",
        "--format",
        "json",
    ];
    let full = json_of(&xllm(&base));
    let text = full["text"].as_str().unwrap().to_string();
    assert!(text.chars().count() > 6, "need some text to cut: {text:?}");
    assert!(
        !text.contains('\u{FFFD}'),
        "need whole characters: {text:?}"
    );
    // Stop on a piece from the middle of the greedy answer.
    let start = text.char_indices().nth(text.chars().count() / 2).unwrap().0;
    let stop: String = text[start..].chars().take(3).collect();
    let mut args = base.to_vec();
    args.extend(["--stop", &stop]);
    let cut = json_of(&xllm(&args));
    assert_eq!(cut["finish_reason"], "stop_string");
    let cut_text = cut["text"].as_str().unwrap();
    assert_eq!(cut_text, &text[..text.find(&stop).unwrap()]);
}

#[test]
fn prompt_longer_than_the_context_is_a_clear_error() {
    let dir = fixture("tiny-llama");
    let out = xllm(&[
        "run",
        dir.to_str().unwrap(),
        "--raw",
        "The quick brown fox jumps over the lazy dog. Paris is the capital of France.",
        "--ctx",
        "8",
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("the context holds 8") && err.contains("--ctx"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn max_tokens_and_context_limit_end_generation() {
    let dir = fixture("tiny-llama");
    let out = json_of(&xllm(&[
        "run",
        dir.to_str().unwrap(),
        "--raw",
        "Paris",
        "--temperature",
        "0",
        "--ctx",
        "6",
        "-n",
        "100",
        "--format",
        "json",
    ]));
    let reason = out["finish_reason"].as_str().unwrap();
    assert!(reason == "context_full" || reason == "stop", "{reason}");
    let prompt = out["stats"]["prompt_eval_count"].as_u64().unwrap() as usize;
    assert!(prompt + out["tokens"].as_array().unwrap().len() <= 6);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn truncated_safetensors_is_reported_by_file_not_panicked() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    copy_dir(&fixture("tiny-llama"), &dir);
    let weights = dir.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let out = xllm(&["run", dir.to_str().unwrap(), "--raw", "hi", "-n", "2"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("model.safetensors"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn unknown_model_type_names_the_supported_architectures() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    copy_dir(&fixture("tiny-llama"), &dir);
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        config.replace("\"model_type\": \"llama\"", "\"model_type\": \"mamba9\""),
    )
    .unwrap();
    let out = xllm(&["run", dir.to_str().unwrap(), "--raw", "hi", "-n", "2"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("mamba9") && err.contains("qwen3") && err.contains("llama"),
        "{err}"
    );
}

#[test]
fn bench_reports_rates_and_allocated_kv_cache() {
    let dir = fixture("tiny-qwen2");
    let out = json_of(&xllm(&[
        "bench",
        dir.to_str().unwrap(),
        "-p",
        "16",
        "-n",
        "4",
        "-r",
        "2",
        "--ctx",
        "64",
        "--json",
    ]));
    assert!(out["prefill_tokens_per_second"].as_f64().unwrap() > 0.0);
    assert!(out["decode_tokens_per_second"].as_f64().unwrap() > 0.0);
    assert_eq!(out["prefill_runs"].as_array().unwrap().len(), 2);
    assert_eq!(out["ctx"], 64);
    // 2 layers × (K + V) × 2 KV heads × 16 head dim × 4 bytes (f32) × 64 slots (capacity is
    // capped by the context).
    assert_eq!(
        out["kv_cache_bytes"].as_u64().unwrap(),
        2 * 2 * 2 * 16 * 4 * 64
    );
}

#[test]
fn verbose_prints_ollama_style_stats() {
    let dir = fixture("tiny-llama");
    let out = xllm(&[
        "run",
        dir.to_str().unwrap(),
        "--raw",
        "Paris",
        "-n",
        "3",
        "--verbose",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    for key in [
        "load duration:",
        "prompt eval count:",
        "prompt eval rate:",
        "eval count:",
        "eval rate:",
        "kv cache:",
    ] {
        assert!(err.contains(key), "missing {key} in {err}");
    }
}

#[test]
fn smollm2_gguf_perplexity_within_one_percent_of_llama_cpp() {
    let Some(gguf) = smollm2_gguf() else {
        eprintln!("skipped: models/smollm2 absent (scripts/get_smollm2.sh)");
        return;
    };
    let out = json_of(&xllm(&[
        "perplexity",
        gguf.to_str().unwrap(),
        "-f",
        fixture("ppl_text.txt").to_str().unwrap(),
        "--json",
    ]));
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("smollm2_ppl.json")).unwrap())
            .unwrap();
    assert_eq!(
        out["tokens"], reference["tokens"],
        "same tokens as llama.cpp"
    );
    let ours = out["perplexity"].as_f64().unwrap();
    let peer = reference["llama_cpp"]["perplexity"].as_f64().unwrap();
    // 1.5 %: builds of the same kernels (the old and the new Q4_1 code, A/B in one binary) moved
    // this 338-token perplexity between 6.748 and 6.778 (+0.6 … +1.0 % over llama.cpp, transformers
    // f32 is +0.5 %) — last-bit differences re-rounded by every 8-bit activation quantization
    // (docs/performance.md, "perplexity noise").
    assert!(
        (ours - peer).abs() / peer < 0.015,
        "perplexity {ours} vs llama.cpp {peer}"
    );
}

#[test]
fn smollm2_gguf_greedy_answer_is_sane_and_follows_llama_cpp() {
    let Some(gguf) = smollm2_gguf() else {
        eprintln!("skipped: models/smollm2 absent (scripts/get_smollm2.sh)");
        return;
    };
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("smollm2_tokens.json")).unwrap())
            .unwrap();
    let greedy = &reference["greedy"];
    let out = json_of(&xllm(&[
        "run",
        gguf.to_str().unwrap(),
        "--raw",
        greedy["prompt"].as_str().unwrap(),
        "--temperature",
        "0",
        "-n",
        "16",
        "--format",
        "json",
    ]));
    assert!(out["text"].as_str().unwrap().contains("Paris"), "{out}");
    let ours: Vec<u64> = out["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let theirs: Vec<u64> = greedy["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    // Q4_1 kernels round differently; the first tokens (clear winners) must agree.
    assert_eq!(
        ours[..4],
        theirs[..4],
        "ours {ours:?} vs llama.cpp {theirs:?}"
    );
}

#[test]
fn smollm2_gguf_chat_uses_the_template_and_stops_at_im_end() {
    let Some(gguf) = smollm2_gguf() else {
        eprintln!("skipped: models/smollm2 absent (scripts/get_smollm2.sh)");
        return;
    };
    let out = json_of(&xllm(&[
        "run",
        gguf.to_str().unwrap(),
        // Not "Name three colors.": its first token is a near-tie that the AVX2 and the
        // repacked AVX-512 kernels break differently (one answer then rambles past 60 tokens).
        "Name three primary colors.",
        "--temperature",
        "0",
        "-n",
        "60",
        "--format",
        "json",
    ]));
    assert_eq!(out["finish_reason"], "stop", "ends on <|im_end|>: {out}");
    let text = out["text"].as_str().unwrap().to_lowercase();
    let colors = ["red", "blue", "green", "yellow"]
        .iter()
        .filter(|c| text.contains(*c))
        .count();
    assert!(colors >= 2, "{text}");
}

#[test]
fn truncated_gguf_is_a_clear_error() {
    let Some(gguf) = smollm2_gguf() else {
        eprintln!("skipped: models/smollm2 absent (scripts/get_smollm2.sh)");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("broken.gguf");
    let bytes = std::fs::read(&gguf).unwrap();
    std::fs::write(&bad, &bytes[..bytes.len() - 1_000_000]).unwrap();
    let out = xllm(&["run", bad.to_str().unwrap(), "--raw", "hi", "-n", "2"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("broken.gguf") && err.contains("truncated"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn prompt_is_read_from_stdin_when_not_a_terminal() {
    use std::io::Write;
    let dir = fixture("tiny-qwen3");
    let home = tempfile::tempdir().unwrap();
    let run = |stdin_text: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_xllm"));
        cmd.args([
            "run",
            dir.to_str().unwrap(),
            "--raw",
            "--temperature",
            "0",
            "-n",
            "5",
            "--format",
            "json",
        ])
        .env("XLLM_HOME", home.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
        if stdin_text.is_none() {
            cmd.arg("Paris is the");
        }
        let mut child = cmd.spawn().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        if let Some(text) = stdin_text {
            stdin.write_all(text.as_bytes()).unwrap();
        }
        drop(stdin);
        json_of(&child.wait_with_output().unwrap())
    };
    let piped = run(Some("Paris is the"));
    let argument = run(None);
    assert_eq!(piped["tokens"], argument["tokens"]);
    assert_eq!(
        piped["stats"]["prompt_eval_count"],
        argument["stats"]["prompt_eval_count"]
    );
}

/// The worker pool changes how rows are split, never the numbers: greedy tokens and perplexity
/// are identical with one and two threads (tiny llama: candle's paths; SmolLM2 Q4_1 GGUF: our
/// Q4_1/Q8_0 kernels, stacked projections and decode attention).
#[test]
fn results_do_not_depend_on_the_thread_count() {
    let mut models = vec![fixture("tiny-llama")];
    models.extend(smollm2_gguf());
    let text = fixture("ppl_text.txt");
    for model in &models {
        let model = model.to_str().unwrap();
        let run = |threads: &str| {
            let greedy = json_of(&xllm(&[
                "run",
                model,
                "--raw",
                "The capital of France is",
                "--temperature",
                "0",
                "-n",
                "12",
                "--format",
                "json",
                "--threads",
                threads,
            ]));
            let ppl = json_of(&xllm(&[
                "perplexity",
                model,
                "-f",
                text.to_str().unwrap(),
                "--json",
                "--threads",
                threads,
            ]));
            (
                greedy["tokens"].clone(),
                ppl["perplexity"].as_f64().unwrap(),
            )
        };
        let (one, two) = (run("1"), run("2"));
        assert_eq!(one.0, two.0, "{model}: greedy tokens");
        assert_eq!(one.1, two.1, "{model}: perplexity");
    }
    let zero = xllm(&["bench", models[0].to_str().unwrap(), "--threads", "0"]);
    assert!(!zero.status.success());
    assert!(stderr(&zero).contains("--threads must be at least 1"));
}
