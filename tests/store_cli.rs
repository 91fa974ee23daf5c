//! `list`, `show`, `rm` and `resolve_for_run` on a store filled through the mock Hub, and `show`
//! on local paths (no manifest).

mod common;

use common::*;

const COMMIT: &str = "89abcdef0123456789abcdef0123456789abcdef";

fn filled_store() -> (MockHub, Env) {
    let hub = MockHub::start();
    hub.add_repo("org/tiny", tiny_safetensors_repo(COMMIT, 64));
    hub.add_repo("org/tiny-GGUF", tiny_gguf_repo(COMMIT));
    let env = Env::new(&hub.url);
    env.run(&["pull", "org/tiny"]).ok();
    env.run(&["pull", "org/tiny-GGUF"]).ok();
    (hub, env)
}

#[test]
fn empty_store_prints_a_hint() {
    let env = Env::new("http://127.0.0.1:9");
    let out = env.run(&["list"]).ok();
    assert!(
        out.stdout.contains("No models in") && out.stdout.contains("xllm pull"),
        "{}",
        out.stdout
    );
    assert_eq!(
        env.run(&["list", "--json"]).ok().json(),
        serde_json::json!([])
    );
}

#[test]
fn list_shows_table_and_json() {
    let (_hub, env) = filled_store();
    let out = env.run(&["list"]).ok();
    let header = out.stdout.lines().next().unwrap();
    let cols: Vec<&str> = header
        .split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    assert_eq!(
        cols,
        [
            "NAME",
            "FORMAT",
            "ARCH",
            "PARAMS",
            "QUANT",
            "KV PROFILES",
            "SIZE",
            "MODIFIED"
        ]
    );
    let tiny = out
        .stdout
        .lines()
        .find(|l| l.starts_with("org/tiny "))
        .unwrap_or_else(|| panic!("{}", out.stdout));
    for field in [
        "safetensors",
        "llama",
        "33K",
        "bf16",
        "default,kv_int8,kv_fp8",
        "just now",
    ] {
        assert!(tiny.contains(field), "{field} missing in {tiny}");
    }
    let gguf = out
        .stdout
        .lines()
        .find(|l| l.starts_with("org/tiny-GGUF"))
        .unwrap();
    assert!(
        gguf.contains("gguf") && gguf.contains("Q4_K_M") && gguf.contains("256"),
        "{gguf}"
    );

    let json = env.run(&["list", "--json"]).ok().json();
    let items = json.as_array().unwrap();
    assert_eq!(items.len(), 2);
    let t = &items[0];
    assert_eq!(t["name"], "org/tiny");
    assert_eq!(t["status"], "ready");
    assert_eq!(t["format"], "safetensors");
    assert_eq!(t["architecture"], "llama");
    assert_eq!(t["parameters"], 512 * 64 + 64);
    assert_eq!(t["quantization"], "bf16");
    assert_eq!(t["commit"], COMMIT);
    assert!(t["path"].as_str().unwrap().ends_with("org--tiny"));
    assert!(t["size"].as_u64().unwrap() > 64 * 1024);
    assert!(t["modified"].as_str().unwrap().ends_with('Z'));
}

#[test]
fn show_reports_model_quantization_and_files() {
    let (_hub, env) = filled_store();
    let text = env.run(&["show", "org/tiny"]).ok().stdout;
    for needle in [
        "Model",
        "architecture        llama",
        "context length      2048",
        "heads / KV heads    4 / 2",
        "Quantization",
        "weights             bf16",
        "default (bf16)",
        "kv_int8",
        "kv_fp8",
        "Files (4,",
        "model.safetensors",
    ] {
        assert!(text.contains(needle), "{needle:?} missing:\n{text}");
    }
    let json = env.run(&["show", "org/tiny:kv_int8", "--json"]).ok().json();
    assert_eq!(json["selected"]["kv_profile"], "kv_int8");
    // 2 layers x 2 KV heads x (K and V): head_dim 16 at 2 bytes, or 16 bytes + a 2-byte scale.
    assert_eq!(
        json["kv_bytes_per_token"],
        serde_json::json!([
            {"profile": "default", "bytes": 2 * 2 * 2 * 16 * 2},
            {"profile": "kv_int8", "bytes": 2 * 2 * 2 * 18},
            {"profile": "kv_fp8", "bytes": 2 * 2 * 2 * 18},
        ])
    );
    assert_eq!(json["source"]["commit"], COMMIT);
    let text = env.run(&["show", "org/tiny:kv_fp8"]).ok().stdout;
    assert!(text.contains("KV profile          kv_fp8"), "{text}");

    env.run(&["show", "org/tiny:"])
        .fails_with(3, "invalid quantization");
    env.run(&["show", "org/tiny:kv_int9"])
        .fails_with(3, "invalid quantization");
    env.run(&["show", "org/tiny:Q4_K_M"])
        .fails_with(3, "unsupported quantization");
    env.run(&["show", "org/absent"])
        .fails_with(4, "xllm pull org/absent");
}

#[test]
fn rm_deletes_models_and_reports_missing_ones() {
    let (_hub, env) = filled_store();
    let out = env.run(&["rm", "org/tiny", "org/tiny-GGUF"]).ok();
    assert!(
        out.stdout.contains("deleted org/tiny,") && out.stdout.contains("deleted org/tiny-GGUF,"),
        "{}",
        out.stdout
    );
    assert!(!env.model_dir("org/tiny").exists());
    assert_eq!(
        env.run(&["list", "--json"]).ok().json(),
        serde_json::json!([])
    );
    env.run(&["rm", "org/tiny"])
        .fails_with(4, "not in the store: org/tiny");
}

#[test]
fn rm_removes_partial_downloads() {
    let hub = MockHub::start();
    let repo = tiny_safetensors_repo(COMMIT, 512);
    hub.add_repo("org/tiny", repo);
    let env = Env::new(&hub.url);
    hub.set_behaviour(Behaviour {
        cut_at: Some(1000),
        ..Default::default()
    });
    env.run(&["pull", "org/tiny"]).fails_with(1, "interrupted");
    let out = env.run(&["rm", "org/tiny"]).ok();
    assert!(
        out.stdout.contains("deleted org/tiny (partial download)"),
        "{}",
        out.stdout
    );
    assert!(!env.model_dir("org/tiny").exists());
}

#[test]
fn show_works_on_local_directories_and_gguf_files() {
    let env = Env::new("http://127.0.0.1:9");
    let dir = env.dir.path().join("local");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), TINY_CONFIG).unwrap();
    std::fs::write(dir.join("tokenizer.json"), TINY_TOKENIZER).unwrap();
    std::fs::write(
        dir.join("model.safetensors"),
        safetensors_bytes(&[("w", "F32", vec![10, 10])]),
    )
    .unwrap();
    let d = dir.to_str().unwrap();
    let json = env.run(&["show", d, "--json"]).ok().json();
    assert_eq!(json["parameters"], 100);
    assert_eq!(json["quantization"], "f32");
    assert_eq!(json["format"], "safetensors");
    let json = env
        .run(&["show", &format!("{d}:kv_fp8"), "--json"])
        .ok()
        .json();
    assert_eq!(json["selected"]["kv_profile"], "kv_fp8");
    env.run(&["show", &format!("{d}:Q8_0")])
        .fails_with(3, "unsupported quantization 'Q8_0'");

    let gguf = env.dir.path().join("tiny-Q8_0.gguf");
    std::fs::write(&gguf, gguf_bytes(7)).unwrap();
    let g = gguf.to_str().unwrap();
    let json = env.run(&["show", g, "--json"]).ok().json();
    assert_eq!(json["format"], "gguf");
    assert_eq!(json["quantization"], "Q8_0");
    assert_eq!(json["context_length"], 2048);
    assert_eq!(json["layers"], 2);
    env.run(&["show", &format!("{g}:kv_int8")])
        .fails_with(3, "unsupported quantization 'kv_int8'");

    let broken = env.dir.path().join("broken.gguf");
    std::fs::write(&broken, b"not a gguf at all").unwrap();
    env.run(&["show", broken.to_str().unwrap()])
        .fails_with(1, "is not a valid GGUF file");
}

/// The engines' entry point, in-process (one test in this binary, so setting XLLM_HOME is safe).
#[test]
fn resolve_for_run_finds_complete_models_only() {
    let (hub, env) = filled_store();
    hub.add_repo("org/partial", tiny_safetensors_repo(COMMIT, 512));
    hub.set_behaviour(Behaviour {
        cut_at: Some(1000),
        ..Default::default()
    });
    env.run(&["pull", "org/partial"])
        .fails_with(1, "interrupted");
    std::env::set_var("XLLM_HOME", env.home());

    let r = xllm::store::resolve_for_run("org/tiny:kv_fp8").unwrap();
    assert_eq!(r.format, xllm::store::ModelFormat::Safetensors);
    assert_eq!(r.kv_profile, xllm::quant::KvProfile::KvFp8);
    assert!(r.dir.join("config.json").is_file());
    assert!(r.gguf_file.is_none());

    let g = xllm::store::resolve_for_run("org/tiny-GGUF").unwrap();
    assert_eq!(g.gguf_type.as_deref(), Some("Q4_K_M"));
    assert!(g.gguf_file.unwrap().ends_with("tiny-q4_k_m.gguf"));

    let code = |r: &str| xllm::error::exit_code_for(&xllm::store::resolve_for_run(r).unwrap_err());
    assert_eq!(code("org/partial"), xllm::error::EXIT_NOT_FOUND);
    assert_eq!(code("org/absent"), xllm::error::EXIT_NOT_FOUND);
    assert_eq!(code("org/tiny:kv_int9"), xllm::error::EXIT_QUANTIZATION);
    assert_eq!(code("org/tiny-GGUF:kv_fp8"), xllm::error::EXIT_QUANTIZATION);
    let msg = xllm::store::resolve_for_run("org/partial")
        .unwrap_err()
        .to_string();
    assert!(msg.contains("resume with `xllm pull org/partial`"), "{msg}");
}
