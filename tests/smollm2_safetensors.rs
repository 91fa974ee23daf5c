//! SmolLM2 as a bf16 safetensors folder, made without torch: the Q4_1 GGUF is dequantized with
//! candle, llama.cpp's q/k row permutation is undone, and config/tokenizer files are written from
//! the GGUF metadata — the same steps transformers' `from_pretrained(gguf_file=...)` takes
//! (scripts/convert_smollm2_safetensors.py). Checks perplexity against transformers f32 on the
//! transformers-made copy (tests/fixtures/smollm2_ppl.json) and peak memory against the file size.
//! Needs models/smollm2 (scripts/get_smollm2.sh); skipped with a note when absent.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use xllm::arch::llama::{config_from_gguf, Role};
use xllm::engine::tokenizer::TextTokenizer;
use xllm::model::gguf::GgufFile;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn smollm2_gguf() -> Option<PathBuf> {
    std::fs::read_dir(root().join("models/smollm2"))
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "gguf"))
}

/// Undoes llama.cpp's `permute(w, n_head)` on q/k rows (adjacent pairs → halves).
fn unpermute(w: &Tensor, heads: usize) -> Tensor {
    let (rows, cols) = w.dims2().unwrap();
    w.reshape((heads, rows / heads / 2, 2, cols))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((rows, cols))
        .unwrap()
}

fn convert(gguf: &Path, out: &Path) {
    std::fs::create_dir_all(out).unwrap();
    let file = GgufFile::open(gguf).unwrap();
    let cfg = config_from_gguf(&file).unwrap();
    let dev = Device::Cpu;
    let mut names: Vec<(String, String)> = vec![
        (Role::Embed.gguf_name(0), Role::Embed.hf_name(0)),
        (Role::FinalNorm.gguf_name(0), Role::FinalNorm.hf_name(0)),
    ];
    let roles = [
        Role::AttnNorm,
        Role::Q,
        Role::K,
        Role::V,
        Role::O,
        Role::FfnNorm,
        Role::Gate,
        Role::Up,
        Role::Down,
    ];
    for layer in 0..cfg.num_layers {
        for role in roles {
            names.push((role.gguf_name(layer), role.hf_name(layer)));
        }
    }
    let mut tensors = HashMap::new();
    for (g, h) in names {
        let mut t = file
            .tensor(&format!("{g}.weight"), &dev)
            .unwrap()
            .dequantize(&dev)
            .unwrap();
        if g.ends_with("attn_q") {
            t = unpermute(&t, cfg.num_heads);
        } else if g.ends_with("attn_k") {
            t = unpermute(&t, cfg.num_kv_heads);
        }
        tensors.insert(format!("{h}.weight"), t.to_dtype(DType::BF16).unwrap());
    }
    candle_core::safetensors::save(&tensors, out.join("model.safetensors")).unwrap();
    let config = serde_json::json!({
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope.theta,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_ids,
        "torch_dtype": "bfloat16",
    });
    std::fs::write(out.join("config.json"), config.to_string()).unwrap();
    let tok = TextTokenizer::from_gguf(&file).unwrap();
    tok.save_json(&out.join("tokenizer.json")).unwrap();
    let tok_config = serde_json::json!({
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "chat_template": tok.chat_template,
    });
    std::fs::write(out.join("tokenizer_config.json"), tok_config.to_string()).unwrap();
}

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
