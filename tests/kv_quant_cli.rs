//! KV-cache quantization through the real binary: what `show` reports for each profile, and every
//! invalid or unsupported combination failing with exit code 3 and a message naming what works.

#[allow(unused_imports)]
mod common;

use std::path::PathBuf;

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
