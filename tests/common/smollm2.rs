//! SmolLM2 (the real model from scripts/get_smollm2.sh) and its bf16 safetensors copy.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use xllm::arch::llama::{config_from_gguf, Role};
use xllm::engine::tokenizer::TextTokenizer;
use xllm::model::gguf::GgufFile;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn smollm2_gguf() -> Option<PathBuf> {
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

/// Writes a bf16 safetensors folder (config, tokenizer, weights) made from the GGUF.
pub fn convert(gguf: &Path, out: &Path) {
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
