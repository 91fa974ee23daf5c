//! `xllm quantize` on the gpt-oss safetensors fixture (tests/fixtures/gpt_oss_tiny): the GGUF it
//! writes runs in xllm like the safetensors it came from, and llama.cpp (llama-server, through
//! scripts/make_gpt_oss_quantize_greedy.py) generates the same greedy tokens on the same files as
//! xllm does. Byte equality with llama.cpp's converter + llama-quantize is in
//! tests/quantize_reference.rs.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device};
use common::gpt_oss::{fixture, greedy, ids};
use xllm::arch::gpt_oss::GptOss;
use xllm::arch::CausalLm;
use xllm::quant::KvProfile;
use xllm::quantize::{self, FileType};

const FIXTURE: &str = "gpt_oss_tiny";

/// Quantizes a safetensors fixture to `ty` in `dir`; returns the file and its sha256.
fn quantize_fixture(name: &str, dir: &Path, ty: &str) -> (PathBuf, String) {
    let out = dir.join(format!("{name}-{ty}.gguf"));
    let source = quantize::open_source(&fixture(name)).unwrap();
    let prepared = quantize::prepare(source.as_ref(), FileType::parse(ty).unwrap(), None).unwrap();
    let written = quantize::execute(
        source.as_ref(),
        &prepared,
        &out,
        true,
        None,
        &AtomicBool::new(false),
        &mut |_| {},
    )
    .unwrap();
    (out, written.sha256.unwrap())
}

fn logits(model: &GptOss, tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = model.info().new_cache(KvProfile::Default, 4096).unwrap();
    model
        .forward(tokens, &mut cache, false)
        .unwrap()
        .to_vec2()
        .unwrap()
}

/// Largest |a − b| over a row, relative to the row's largest |a|, worst over rows.
fn worst_relative(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    let mut worst = 0f64;
    for (ra, rb) in a.iter().zip(b) {
        let scale = ra.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
        let diff = ra
            .iter()
            .zip(rb)
            .map(|(x, y)| (*x as f64 - *y as f64).abs())
            .fold(0f64, f64::max);
        worst = worst.max(diff / scale);
    }
    worst
}

#[test]
fn bf16_gguf_gives_the_safetensors_logits() {
    // The fixture is bf16 and its experts stay MXFP4: BF16 keeps every weight exact, so the logits
    // are the safetensors model's bit for bit, past the sliding window, and so are greedy tokens.
    let dir = tempfile::tempdir().unwrap();
    let st = common::gpt_oss::load(FIXTURE);
    let tokens = ids(&common::gpt_oss::reference(FIXTURE)["text_ids"]);
    assert!(tokens.len() > 64, "longer than the sliding window");
    let (path, _) = quantize_fixture(FIXTURE, dir.path(), "BF16");
    let gg = GptOss::load_gguf(&path, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(gg.config.vocab_size, st.config.vocab_size);
    assert_eq!(gg.config.sliding_window, st.config.sliding_window);
    assert_eq!(gg.config.num_local_experts, st.config.num_local_experts);
    let (a, b) = (logits(&st, &tokens), logits(&gg, &tokens));
    let worst = worst_relative(&a, &b);
    assert_eq!(worst, 0.0, "BF16: relative logit difference {worst}");
    let prompt = &tokens[..20];
    assert_eq!(greedy(&st, prompt, 24), greedy(&gg, prompt, 24));
}

/// Quantized files of the trained fixture (the random one's routing flips on any rounding): held-out
/// perplexity close to the safetensors model's.
#[test]
fn quantized_gguf_perplexity_is_close_to_the_safetensors_model() {
    let dir = tempfile::tempdir().unwrap();
    let fixture_name = "gpt_oss_trained";
    let st = common::gpt_oss::load(fixture_name);
    let tokens = ids(&common::gpt_oss::reference(fixture_name)["text_ids"]);
    let ppl = |m: &GptOss| common::gpt_oss::mean_nll(&logits(m, &tokens), &tokens).exp();
    let base = ppl(&st);
    for (ty, budget) in [("Q8_0", 0.005), ("Q4_K_M", 0.03)] {
        let (path, _) = quantize_fixture(fixture_name, dir.path(), ty);
        let gg = GptOss::load_gguf(&path, &Device::Cpu, DType::F32).unwrap();
        let q = ppl(&gg);
        let rel = (q - base).abs() / base;
        eprintln!(
            "{ty}: perplexity {q:.4} vs safetensors {base:.4} ({:+.3} %)",
            100.0 * (q - base) / base
        );
        assert!(rel < budget, "{ty}: perplexity {q} vs {base}");
    }
}

/// `xllm run` on the written file: the same harmony turn as on the safetensors folder.
#[test]
fn xllm_run_on_the_quantized_file_matches_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = quantize_fixture(FIXTURE, dir.path(), "BF16");
    let turn = |model: &Path| -> serde_json::Value {
        let home = tempfile::tempdir().unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_xllm"))
            .args([
                "run",
                model.to_str().unwrap(),
                "What is 2+2?",
                "--format",
                "json",
                "--temperature",
                "0",
                "--max-tokens",
                "30",
            ])
            .env("XLLM_HOME", home.path())
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let (a, b) = (turn(&fixture(FIXTURE)), turn(&path));
    for key in ["tokens", "thinking", "text", "finish_reason"] {
        assert_eq!(a[key], b[key], "'{key}': folder {a}, quantized {b}");
    }
    assert!(!a["tokens"].as_array().unwrap().is_empty());
}

/// llama.cpp's greedy tokens on our files (stored by scripts/make_gpt_oss_quantize_greedy.py with
/// each file's sha256: llama.cpp loaded every one) equal xllm's on the same files: every token for
/// BF16 and Q8_0, the first one for Q4_K_M (the script says why).
#[test]
fn llama_cpp_and_xllm_generate_the_same_tokens_on_our_files() {
    let path = fixture("quantize/gpt_oss_tiny_llama_greedy.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        eprintln!("skipped: {} missing (run scripts/make_gpt_oss_quantize_greedy.py with llama.cpp built)", path.display());
        return;
    };
    let refj: serde_json::Value = serde_json::from_str(&text).unwrap();
    let n = refj["n_predict"].as_u64().unwrap() as usize;
    let dir = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for entry in refj["files"].as_array().unwrap() {
        let (name, ty) = (
            entry["fixture"].as_str().unwrap(),
            entry["type"].as_str().unwrap(),
        );
        let (file, sha) = quantize_fixture(name, dir.path(), ty);
        assert_eq!(
            sha,
            entry["file_sha256"].as_str().unwrap(),
            "{name} {ty}: the file differs from the one llama.cpp ran; rerun scripts/make_gpt_oss_quantize_greedy.py"
        );
        let model = GptOss::load_gguf(&file, &Device::Cpu, DType::F32).unwrap();
        let prompts = entry["prompts"].as_array().unwrap();
        for (prompt, want) in prompts.iter().zip(entry["tokens"].as_array().unwrap()) {
            let (prompt, want) = (ids(prompt), ids(want));
            let got = greedy(&model, &prompt, n);
            if entry["exact"].as_bool().unwrap() {
                assert_eq!(got, want, "{name} {ty}, prompt {prompt:?}");
            } else {
                // Different dot-product arithmetic (see the script): the first token agrees.
                assert_eq!(
                    got[0], want[0],
                    "{name} {ty}, prompt {prompt:?}: {got:?} vs {want:?}"
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 11, "{checked} prompts checked");
}

/// A checkpoint missing an expert tensor's scales, or with experts that are not MXFP4, is refused
/// with a message naming the tensor (not a panic, nothing written).
#[test]
fn broken_gpt_oss_checkpoints_are_refused_clearly() {
    use safetensors::tensor::TensorView;
    let src = fixture(FIXTURE);
    let cases: [(&str, &str); 2] = [
        (
            "model.layers.0.mlp.experts.down_proj_scales",
            "down_proj_scales' is missing",
        ),
        (
            "model.layers.2.mlp.experts.gate_up_proj_blocks",
            "expected 3 per layer",
        ),
    ];
    for (drop, want) in cases {
        let dir = tempfile::tempdir().unwrap();
        for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
        }
        let shards: Vec<Vec<u8>> = [
            "model-00000-of-00001.safetensors",
            "model-00001-of-00001.safetensors",
        ]
        .iter()
        .map(|f| std::fs::read(src.join(f)).unwrap())
        .collect();
        let parsed: Vec<safetensors::SafeTensors> = shards
            .iter()
            .map(|b| safetensors::SafeTensors::deserialize(b).unwrap())
            .collect();
        let mut kept: Vec<(String, TensorView)> = Vec::new();
        for st in &parsed {
            for (name, view) in st.tensors() {
                if name != drop {
                    kept.push((name, view));
                }
            }
        }
        safetensors::serialize_to_file(kept, None, &dir.path().join("model.safetensors")).unwrap();
        let err = match quantize::open_source(dir.path()) {
            Ok(_) => panic!("dropping {drop} was accepted"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains(want), "dropping {drop}: {err}");
    }
}
