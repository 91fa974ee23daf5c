//! `xllm quantize` end to end on the tiny llama fixture (safetensors): the plan, the file it
//! writes (which xllm loads with the same perplexity as the safetensors model for F32, close for
//! Q8_0), the store entry for `--name`, and the errors.

mod common;

use common::*;

const TINY: &str = "tests/fixtures/tiny-llama";
const TEXT: &str = "tests/fixtures/tiny-llama/text.txt";

fn ppl(env: &Env, model: &str) -> f64 {
    env.run(&["perplexity", model, "-f", TEXT, "--json"])
        .ok()
        .json()["perplexity"]
        .as_f64()
        .unwrap()
}

#[test]
fn dry_run_prints_the_plan_and_writes_nothing() {
    let env = Env::new("http://127.0.0.1:9");
    let out = env.dir.path().join("never.gguf");
    let run = env
        .run(&[
            "quantize",
            TINY,
            "--type",
            "Q4_K_M",
            "--dry-run",
            "-o",
            out.to_str().unwrap(),
        ])
        .ok();
    assert!(
        run.stdout.contains("blk.0.attn_q.weight") && run.stdout.contains("F32 -> Q5_0 *"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("falls back"), "{}", run.stdout);
    assert!(run.stdout.contains("output size"), "{}", run.stdout);
    assert!(!out.exists());
    let plan = env
        .run(&["quantize", TINY, "--type", "Q8_0", "--dry-run", "--json"])
        .ok()
        .json();
    let tensors = plan["tensors"].as_array().unwrap();
    let q = tensors
        .iter()
        .find(|t| t["name"] == "blk.1.ffn_up.weight")
        .unwrap();
    assert_eq!(
        (q["role"].as_str(), q["target_type"].as_str()),
        (Some("ffn"), Some("Q8_0"))
    );
    let norm = tensors
        .iter()
        .find(|t| t["name"] == "output_norm.weight")
        .unwrap();
    assert_eq!(norm["target_type"], "F32");
    // The planned size is the file size.
    let real = env.dir.path().join("q8.gguf");
    env.run(&[
        "quantize",
        TINY,
        "--type",
        "Q8_0",
        "-o",
        real.to_str().unwrap(),
    ])
    .ok();
    assert_eq!(
        std::fs::metadata(&real).unwrap().len(),
        plan["output_bytes"].as_u64().unwrap()
    );
}

#[test]
fn written_files_load_in_xllm_with_the_source_perplexity() {
    let env = Env::new("http://127.0.0.1:9");
    let base = ppl(&env, TINY);
    for (ty, tol) in [
        ("F32", 1e-6),
        ("F16", 1e-3),
        ("Q8_0", 1e-3),
        ("Q4_K_M", 0.05),
        ("Q2_K", 0.5),
    ] {
        let f = env.dir.path().join(format!("{ty}.gguf"));
        env.run(&["quantize", TINY, "--type", ty, "-o", f.to_str().unwrap()])
            .ok();
        let p = ppl(&env, f.to_str().unwrap());
        assert!(
            (p / base - 1.0).abs() < tol,
            "{ty}: perplexity {p} vs safetensors {base}"
        );
        // Re-quantizing our own GGUF works too (GGUF source).
        if ty == "Q8_0" {
            let g = env.dir.path().join("requant.gguf");
            env.run(&[
                "quantize",
                f.to_str().unwrap(),
                "--type",
                "Q4_0",
                "-o",
                g.to_str().unwrap(),
            ])
            .ok();
            assert!(ppl(&env, g.to_str().unwrap()).is_finite());
        }
    }
}

#[test]
fn name_adds_a_store_model_with_its_quantization() {
    let env = Env::new("http://127.0.0.1:9");
    env.run(&["quantize", TINY, "--type", "Q8_0", "--name", "me/tiny-q8"])
        .ok();
    let list = env.run(&["list", "--json"]).ok().json();
    let entry = list
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "me/tiny-q8")
        .expect("listed");
    assert_eq!(entry["quantization"], "Q8_0", "{entry}");
    let show = env.run(&["show", "me/tiny-q8", "--json"]).ok().json();
    assert_eq!(show["quantization"], "Q8_0", "{show}");
    assert!(ppl(&env, "me/tiny-q8").is_finite());
    // The manifest records the file's real sha256 (hashed while writing, not read back).
    let dir = env.model_dir("me/tiny-q8");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    let file = &manifest["files"][0];
    let bytes = std::fs::read(dir.join(file["path"].as_str().unwrap())).unwrap();
    use sha2::Digest;
    assert_eq!(
        file["sha256"].as_str().unwrap(),
        hex::encode(sha2::Sha256::digest(&bytes)),
        "{manifest}"
    );
    assert_eq!(file["size"].as_u64().unwrap(), bytes.len() as u64);
    // The store model is itself a quantize source; the name cannot be taken twice.
    let out = env.dir.path().join("from-store.gguf");
    env.run(&[
        "quantize",
        "me/tiny-q8",
        "--type",
        "Q4_0",
        "-o",
        out.to_str().unwrap(),
    ])
    .ok();
    env.run(&["quantize", TINY, "--type", "Q8_0", "--name", "me/tiny-q8"])
        .fails_with(1, "already in the store");
}

/// `--name` takes the model's store lock before the model appears: while another process (here
/// this test, as a pull would) holds it, quantize refuses, and neither a partial model nor the
/// staging file is left behind.
#[test]
fn name_refuses_while_the_model_is_locked_and_leaves_nothing() {
    let env = Env::new("http://127.0.0.1:9");
    let dir = env.model_dir("me/locked");
    std::fs::create_dir_all(&dir).unwrap();
    let lock = xllm::store::lock::ModelLock::try_acquire(&dir)
        .unwrap()
        .expect("free lock");
    env.run(&["quantize", TINY, "--type", "Q8_0", "--name", "me/locked"])
        .fails_with(1, "writing 'me/locked' right now");
    let list = env.run(&["list", "--json"]).ok().json();
    assert!(
        !list.to_string().contains("me/locked"),
        "a locked, unfinished model must not be listed: {list}"
    );
    assert!(
        files_under(&env.home().join("tmp")).is_empty(),
        "staging files left: {:?}",
        files_under(&env.home().join("tmp"))
    );
    drop(lock);
    env.run(&["quantize", TINY, "--type", "Q8_0", "--name", "me/locked"])
        .ok();
    let list = env.run(&["list", "--json"]).ok().json();
    assert!(list.to_string().contains("me/locked"), "{list}");
    assert!(files_under(&env.home().join("tmp")).is_empty());
}

/// A llama-shaped F32 GGUF with rows of 48 elements, which Q8_0's 32-element blocks cannot hold.
fn write_narrow_gguf(path: &std::path::Path) {
    use xllm::quantize::gguf::{GgufWriter, Metadata, OutTensor, Value};
    use xllm::quantize::GgmlType;
    let mut md = Metadata::default();
    md.set("general.architecture", Value::Str("llama".into()));
    md.set("llama.block_count", Value::U32(1));
    md.set("llama.embedding_length", Value::U32(48));
    md.set("llama.attention.head_count", Value::U32(4));
    let shapes: [(&str, Vec<u64>); 3] = [
        ("token_embd.weight", vec![48, 8]),
        ("output_norm.weight", vec![48]),
        ("blk.0.attn_q.weight", vec![48, 48]),
    ];
    let outs: Vec<OutTensor> = shapes
        .iter()
        .map(|(n, ne)| OutTensor {
            name: n.to_string(),
            ne: ne.clone(),
            ty: GgmlType::F32,
            size: ne.iter().product::<u64>() * 4,
        })
        .collect();
    let mut w = GgufWriter::create(path, &md, &outs, 32, false).unwrap();
    for (_, ne) in &shapes {
        let n = ne.iter().product::<u64>() as usize;
        let bytes: Vec<u8> = (0..n)
            .flat_map(|i| (i as f32 * 0.01).to_le_bytes())
            .collect();
        w.write(&bytes).unwrap();
    }
    w.finish().unwrap();
}

#[test]
fn bad_requests_get_clear_errors_and_leave_no_file() {
    let env = Env::new("http://127.0.0.1:9");
    let out = env.dir.path().join("x.gguf");
    let o = out.to_str().unwrap();
    // Quantization errors exit 3, like `xllm run model:Q7_K` (docs/quantization.md).
    env.run(&["quantize", TINY, "--type", "Q7_K", "-o", o])
        .fails_with(3, "valid types: F32, F16, BF16, Q8_0");
    let narrow = env.dir.path().join("narrow.gguf");
    write_narrow_gguf(&narrow);
    env.run(&[
        "quantize",
        narrow.to_str().unwrap(),
        "--type",
        "Q8_0",
        "-o",
        o,
    ])
    .fails_with(3, "Q8_0 cannot hold tensor 'token_embd.weight'");
    // An architecture without tensor roles.
    let odd = env.dir.path().join("odd");
    std::fs::create_dir_all(&odd).unwrap();
    let cfg = serde_json::json!({"model_type": "rwkv7", "hidden_size": 48, "num_attention_heads": 4, "num_hidden_layers": 1});
    std::fs::write(odd.join("config.json"), cfg.to_string()).unwrap();
    env.run(&["quantize", odd.to_str().unwrap(), "--type", "Q8_0", "-o", o])
        .fails_with(1, "no tensor roles for architecture 'rwkv7'");
    // A corrupt source: a truncated GGUF.
    let good = env.dir.path().join("good.gguf");
    env.run(&[
        "quantize",
        TINY,
        "--type",
        "F16",
        "-o",
        good.to_str().unwrap(),
    ])
    .ok();
    let bytes = std::fs::read(&good).unwrap();
    let bad = env.dir.path().join("bad.gguf");
    std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    env.run(&["quantize", bad.to_str().unwrap(), "--type", "Q8_0", "-o", o])
        .fails_with(1, "truncated");
    // An extensionless blob (Ollama's store) is read by its magic.
    let blob = env.dir.path().join("sha256-0123abcd");
    std::fs::copy(&good, &blob).unwrap();
    env.run(&[
        "quantize",
        blob.to_str().unwrap(),
        "--type",
        "Q8_0",
        "-o",
        o,
    ])
    .ok();
    std::fs::remove_file(&out).unwrap();
    // (Not enough disk space: `quantize::ensure_disk_space`'s unit test.)
    assert!(!out.exists());
    let leftovers: Vec<_> = std::fs::read_dir(env.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".partial"))
        .collect();
    assert!(leftovers.is_empty());
}
