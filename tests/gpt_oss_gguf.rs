//! gpt-oss from GGUF: tests/fixtures/quantize/gpt_oss_tiny.bf16.gguf is llama.cpp's own
//! `convert_hf_to_gguf.py` run on tests/fixtures/gpt_oss_tiny (scripts/make_quantize_fixtures.py:
//! bf16 dense weights, experts repacked into ggml MXFP4 blocks, type 39, gate and up split,
//! llama.cpp's tensor names). The same weights must give the same model: logits, greedy tokens,
//! tokenizer, harmony chat template and `show` facts as the safetensors fixture.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

use candle_core::{DType, Device};
use common::gpt_oss::{fixture, greedy, ids};
use xllm::arch::gpt_oss::GptOss;
use xllm::arch::CausalLm;
use xllm::quant::KvProfile;

const FIXTURE: &str = "gpt_oss_tiny";

fn gguf_path() -> PathBuf {
    fixture("quantize/gpt_oss_tiny.bf16.gguf")
}

fn logits(model: &GptOss, tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = model.info().new_cache(KvProfile::Default, 4096).unwrap();
    model
        .forward(tokens, &mut cache, false)
        .unwrap()
        .to_vec2()
        .unwrap()
}

#[test]
fn gguf_logits_match_the_safetensors_fixture() {
    let st = common::gpt_oss::load(FIXTURE);
    let gg = GptOss::load_gguf(&gguf_path(), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(gg.config.vocab_size, st.config.vocab_size);
    assert_eq!(gg.config.num_hidden_layers, st.config.num_hidden_layers);
    assert_eq!(gg.config.sliding_window, st.config.sliding_window);
    let r = common::gpt_oss::reference(FIXTURE);
    // Longer than the sliding window (16), so windowed and full layers both matter.
    let tokens = ids(&r["text_ids"]);
    assert!(tokens.len() > 64);
    let (a, b) = (logits(&st, &tokens), logits(&gg, &tokens));
    let mut worst = 0f64;
    for (row_st, row_gg) in a.iter().zip(&b) {
        let scale = row_st.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
        let diff = row_st
            .iter()
            .zip(row_gg)
            .map(|(x, y)| (*x as f64 - *y as f64).abs())
            .fold(0f64, f64::max);
        worst = worst.max(diff / scale);
    }
    eprintln!("worst relative logit difference GGUF vs safetensors: {worst:.2e}");
    assert!(worst < 1e-3, "relative difference {worst}");
    // And against transformers' own logits on the same fixture.
    for (pos, want) in r["logits_at"].as_object().unwrap() {
        let p: usize = pos.parse().unwrap();
        let max_diff = b[p]
            .iter()
            .zip(want.as_array().unwrap())
            .map(|(g, w)| (*g as f64 - w.as_f64().unwrap()).abs())
            .fold(0f64, f64::max);
        assert!(max_diff < 2e-3, "position {p}: max |logit diff| {max_diff}");
    }
    // Cached decode past the window gives the same tokens.
    let prompt = &tokens[..20];
    assert_eq!(greedy(&st, prompt, 24), greedy(&gg, prompt, 24));
}

fn xllm(args: &[&str]) -> Output {
    let home = tempfile::tempdir().unwrap();
    Command::new(env!("CARGO_BIN_EXE_xllm"))
        .args(args)
        .env("XLLM_HOME", home.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap()
}

fn stdout_json(args: &[&str]) -> serde_json::Value {
    let out = xllm(args);
    assert!(
        out.status.success(),
        "xllm {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}

/// The GGUF's tokenizer and harmony template come from its metadata and agree with the
/// safetensors fixture's tokenizer.json and chat_template.jinja: the same prompt tokens, the same
/// greedy harmony turn (thinking and answer apart), through the real binary.
#[test]
fn run_and_tokenize_agree_with_the_safetensors_fixture() {
    let gguf = gguf_path();
    let gguf = gguf.to_str().unwrap();
    let dir = fixture(FIXTURE);
    let dir = dir.to_str().unwrap();
    let text = "Hello world! It's 2+2=4, isn't it?\n  <|start|>";
    let a = stdout_json(&["tokenize", dir, "--json", text]);
    let b = stdout_json(&["tokenize", gguf, "--json", text]);
    assert_eq!((&a["ids"], &a["pieces"]), (&b["ids"], &b["pieces"]));
    let turn = |model: &str| {
        stdout_json(&[
            "run",
            model,
            "What is 2+2?",
            "--format",
            "json",
            "--temperature",
            "0",
            "--max-tokens",
            "30",
        ])
    };
    let (a, b) = (turn(dir), turn(gguf));
    for key in [
        "tokens",
        "thinking",
        "text",
        "finish_reason",
        "reasoning_effort",
    ] {
        assert_eq!(a[key], b[key], "'{key}' differs: safetensors {a}, GGUF {b}");
    }
    assert!(!a["tokens"].as_array().unwrap().is_empty());
}

#[test]
fn show_names_the_mxfp4_file_type_and_counts_the_parameters() {
    let gguf = gguf_path();
    let v = stdout_json(&["show", gguf.to_str().unwrap(), "--json"]);
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture(FIXTURE).join("config.json")).unwrap(),
    )
    .unwrap();
    let (total, active) = xllm::arch::gpt_oss::GptOssConfig::from_value(&config)
        .unwrap()
        .parameter_counts();
    assert_eq!(v["architecture"], "gpt-oss", "{v}");
    assert_eq!(v["quantization"], "MXFP4", "{v}");
    assert_eq!(v["parameters"], total, "{v}");
    assert_eq!(v["active_parameters"], active, "{v}");
    assert_eq!(
        (&v["experts"], &v["experts_active"]),
        (&8.into(), &4.into())
    );
    // Three MXFP4 expert tensors per layer (gate, up, down), listed with the others.
    let types = &v["tensor_types"];
    assert_eq!(types["MXFP4"], 12, "{v}");
    assert!(types["BF16"].as_u64().unwrap() > 0, "{v}");
}
