//! KV-cache quantization through the real binary: what `show` reports for each profile, and every
//! invalid or unsupported combination failing with exit code 3 and a message naming what works.

#[allow(unused_imports)]
mod common;

use std::path::PathBuf;
use xllm::state::BLOCK_TOKENS;

use common::*;

fn fixture(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
        .display()
        .to_string()
}

/// A local `.gguf` file (Q8_0 by name and metadata) in a fresh directory.
fn local_gguf(env: &Env) -> String {
    let path = env.dir.path().join("tiny-q8_0.gguf");
    std::fs::write(&path, gguf_bytes(7)).unwrap();
    path.display().to_string()
}

#[test]
fn show_reports_kv_bytes_per_token_and_the_resolved_profile() {
    let env = Env::new("http://127.0.0.1:9");
    let llama = fixture("tiny-llama");
    // tiny-llama: 2 layers × 2 KV heads × head_dim 16: 2 × 2 × 2 × 16 × 2 B = 256 B unquantized
    // (bf16), 2 × 2 × 2 × (16 + 2) = 144 B quantized.
    let plain = env.run(&["show", &llama]).ok();
    assert!(
        plain.stdout.contains("KV profile          default"),
        "{}",
        plain.stdout
    );
    for (profile, other) in [("kv_int8", "kv_fp8"), ("kv_fp8", "kv_int8")] {
        let out = env.run(&["show", &format!("{llama}:{profile}")]).ok();
        let line = |p: &str| {
            out.stdout
                .lines()
                .find(|l| l.trim_start().starts_with(p) && l.contains(" B"))
                .unwrap_or_else(|| panic!("no {p} line in\n{}", out.stdout))
                .to_string()
        };
        assert!(
            out.stdout
                .contains(&format!("KV profile          {profile}")),
            "{}",
            out.stdout
        );
        assert!(line(profile).contains("144 B") && line(profile).ends_with("<- selected"));
        assert!(line(other).contains("144 B") && !line(other).contains("selected"));
        assert!(line("default").contains("256 B"));

        let json = env
            .run(&["show", &format!("{llama}:{profile}"), "--json"])
            .ok()
            .json();
        assert_eq!(json["selected"]["kv_profile"], profile);
        let bytes: Vec<(String, u64)> = json["kv_bytes_per_token"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["profile"].as_str().unwrap().to_string(),
                    e["bytes"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            bytes,
            [
                ("default".to_string(), 256),
                ("kv_int8".to_string(), 144),
                ("kv_fp8".to_string(), 144)
            ]
        );
    }
}

#[test]
fn kv_profiles_on_a_gguf_file_are_unsupported_and_name_the_gguf_types() {
    let env = Env::new("http://127.0.0.1:9");
    let gguf = local_gguf(&env);
    for profile in ["kv_int8", "kv_fp8", "KV_INT8"] {
        let out = env.run(&["show", &format!("{gguf}:{profile}")]).fails_with(
            3,
            &format!("unsupported quantization '{}'", profile.to_lowercase()),
        );
        assert!(out.stderr.contains("(gguf)"), "{}", out.stderr);
        assert!(
            out.stderr.contains("safetensors models only"),
            "{}",
            out.stderr
        );
        assert!(out.stderr.contains("available: Q8_0"), "{}", out.stderr);
        assert!(out.stdout.is_empty(), "{}", out.stdout);
    }
}

#[test]
fn malformed_kv_tokens_are_invalid_and_list_the_valid_ones() {
    let env = Env::new("http://127.0.0.1:9");
    let llama = fixture("tiny-llama");
    for bad in ["kv_int4", "kv-int8", "kvint8", "kv_fp16", ""] {
        let out = env
            .run(&["show", &format!("{llama}:{bad}")])
            .fails_with(3, "invalid quantization");
        assert!(out.stderr.contains("kv_int8, kv_fp8"), "{}", out.stderr);
    }
}

/// A one-layer llama with SmolLM2's attention geometry (head_dim 64, 3 KV heads) and 4096
/// positions, small deterministic weights, and the tiny-llama tokenizer; written to `dir`.
fn long_context_model(dir: &std::path::Path) -> String {
    let (hidden, heads, kv_heads, head_dim, ffn, vocab) = (192usize, 3, 3, 64, 128, 320);
    std::fs::create_dir_all(dir).unwrap();
    let config = serde_json::json!({
        "model_type": "llama", "hidden_size": hidden, "num_hidden_layers": 1,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "intermediate_size": ffn, "vocab_size": vocab, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::copy(
        PathBuf::from(fixture("tiny-llama")).join("tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();
    let shapes: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![vocab, hidden]),
        ("model.norm.weight".into(), vec![hidden]),
        ("lm_head.weight".into(), vec![vocab, hidden]),
        ("model.layers.0.input_layernorm.weight".into(), vec![hidden]),
        (
            "model.layers.0.post_attention_layernorm.weight".into(),
            vec![hidden],
        ),
        (
            "model.layers.0.self_attn.q_proj.weight".into(),
            vec![heads * head_dim, hidden],
        ),
        (
            "model.layers.0.self_attn.k_proj.weight".into(),
            vec![kv_heads * head_dim, hidden],
        ),
        (
            "model.layers.0.self_attn.v_proj.weight".into(),
            vec![kv_heads * head_dim, hidden],
        ),
        (
            "model.layers.0.self_attn.o_proj.weight".into(),
            vec![hidden, heads * head_dim],
        ),
        (
            "model.layers.0.mlp.gate_proj.weight".into(),
            vec![ffn, hidden],
        ),
        (
            "model.layers.0.mlp.up_proj.weight".into(),
            vec![ffn, hidden],
        ),
        (
            "model.layers.0.mlp.down_proj.weight".into(),
            vec![hidden, ffn],
        ),
    ];
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = shapes
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let norm = name.ends_with("norm.weight");
            let bytes = (0..n)
                .flat_map(|i| {
                    let v = if norm {
                        1.0f32
                    } else {
                        ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * 0.1
                    };
                    v.to_le_bytes()
                })
                .collect();
            (name, shape, bytes)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(name, shape, bytes)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                    .unwrap();
            (name.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    dir.display().to_string()
}

#[test]
fn bench_reports_quantized_kv_bytes_at_most_055_of_f16_and_03_of_f32() {
    let env = Env::new("http://127.0.0.1:9");
    let model = long_context_model(&env.dir.path().join("long"));
    let bench = |suffix: &str| {
        let name = format!("{model}{suffix}");
        let args = [
            "bench", &name, "--ctx", "4096", "-p", "4000", "-n", "4", "-r", "1", "--json",
            "--device", "cpu",
        ];
        env.run(&args).ok().json()
    };
    let default = bench("");
    assert_eq!(default["kv_profile"], "default");
    assert_eq!(default["ctx"], 4096);
    let f32_bytes = default["kv_cache_bytes"].as_u64().unwrap();
    // 4004 tokens → 63 blocks of 64 = 4032 tokens × 3 heads × 64 × 4 B × 2 (K, V).
    let tokens = 4004usize.div_ceil(BLOCK_TOKENS) * BLOCK_TOKENS;
    assert_eq!(f32_bytes as usize, tokens * 3 * 64 * 4 * 2);
    // The f16 cache of the same capacity (what GPUs allocate) is exactly half.
    let f16_bytes = f32_bytes / 2;
    for profile in ["kv_int8", "kv_fp8"] {
        let report = bench(&format!(":{profile}"));
        assert_eq!(report["kv_profile"], profile);
        let bytes = report["kv_cache_bytes"].as_u64().unwrap();
        assert_eq!(bytes as usize, tokens * 3 * (64 + 2) * 2, "{profile}");
        let (vs_f16, vs_f32) = (
            bytes as f64 / f16_bytes as f64,
            bytes as f64 / f32_bytes as f64,
        );
        eprintln!("{profile}: {bytes} bytes, {vs_f16:.3}x f16, {vs_f32:.3}x f32");
        assert!(
            vs_f16 <= 0.55 && vs_f32 <= 0.30,
            "{profile}: {vs_f16} of f16, {vs_f32} of f32"
        );
        assert!(report["decode_tokens_per_second"].as_f64().unwrap() > 0.0);
    }
    // The text report carries the same number.
    let text = env
        .run(&[
            "bench",
            &format!("{model}:kv_int8"),
            "--ctx",
            "4096",
            "-p",
            "300",
            "-n",
            "2",
            "-r",
            "1",
        ])
        .ok();
    assert!(
        text.stdout.contains(&format!(
            "kv cache: {} bytes allocated (ctx 4096)",
            302usize.div_ceil(BLOCK_TOKENS) * BLOCK_TOKENS * 3 * 66 * 2
        )),
        "{}",
        text.stdout
    );
}

#[test]
fn kv_fp8_on_metal_is_refused_before_loading_and_names_the_alternatives() {
    let env = Env::new("http://127.0.0.1:9");
    let llama = fixture("tiny-llama");
    let fp8 = format!("{llama}:kv_fp8");
    let text = format!("{llama}/text.txt");
    for args in [
        vec!["run", &fp8, "hello", "--device", "metal"],
        vec!["bench", &fp8, "--device", "metal:1", "-p", "4", "-n", "1"],
        vec!["perplexity", &fp8, "--device", "metal", "--file", &text],
    ] {
        let out = env
            .run(&args)
            .fails_with(3, "unsupported quantization 'kv_fp8' for device metal:");
        assert!(
            out.stderr
                .contains("no FP8 (E4M3) conversion kernels on Metal"),
            "{}",
            out.stderr
        );
        assert!(
            out.stderr.contains("use kv_int8 there, or no suffix"),
            "{}",
            out.stderr
        );
    }
}

#[test]
fn kv_profiles_on_gguf_fail_the_same_way_in_run_bench_and_perplexity() {
    let env = Env::new("http://127.0.0.1:9");
    let gguf = local_gguf(&env);
    let int8 = format!("{gguf}:kv_int8");
    let text = format!("{}/text.txt", fixture("tiny-llama"));
    for args in [
        vec!["run", &int8, "hello"],
        vec!["bench", &int8, "-p", "4", "-n", "1"],
        vec!["perplexity", &int8, "--file", &text],
    ] {
        let out = env
            .run(&args)
            .fails_with(3, "unsupported quantization 'kv_int8'");
        assert!(out.stderr.contains("available: Q8_0"), "{}", out.stderr);
    }
}

#[test]
fn run_reports_the_kv_cache_actually_allocated() {
    let env = Env::new("http://127.0.0.1:9");
    let model = long_context_model(&env.dir.path().join("long"));
    // One block: 64 tokens × 3 heads × 2 (K, V) × (64 × 4 B) unquantized, × (64 + 2) B quantized.
    for (suffix, bytes) in [
        ("", BLOCK_TOKENS * 3 * 2 * 256),
        (":kv_int8", BLOCK_TOKENS * 3 * 2 * 66),
        (":kv_fp8", BLOCK_TOKENS * 3 * 2 * 66),
    ] {
        let name = format!("{model}{suffix}");
        let args = [
            "run",
            &name,
            "hello world",
            "--raw",
            "-n",
            "3",
            "--temperature",
            "0",
            "--format",
            "json",
            "--verbose",
        ];
        let out = env.run(&args).ok();
        let json = out.json();
        assert_eq!(json["stats"]["kv_cache_bytes"], bytes, "{suffix}");
        let mib = format!(
            "kv cache:             {:.1} MiB allocated",
            bytes as f64 / 1048576.0
        );
        assert!(out.stderr.contains(&mib), "{suffix}: {}", out.stderr);
    }
}
