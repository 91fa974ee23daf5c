//! Broken and hostile model files through the real binary (issue 18): each class of problem must
//! end in a clean error — exit status 1 to 4 and a message naming the file, key or limit — never
//! a panic (101), an abort or a signal. The broken files are made here from the tiny fixtures.

#[allow(unused_imports)]
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Value as Gv;
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device};
use common::{Env, Run};
use serde_json::{json, Value};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn env() -> Env {
    Env::new("http://127.0.0.1:9")
}

/// Asserts a clean failure: status 1–4 (never 101 or a signal) and `needle` in the message.
#[track_caller]
fn fails_cleanly(run: Run, needle: &str) -> Run {
    assert!(
        (1..=4).contains(&run.code),
        "expected exit status 1-4, got {}\nstdout: {}\nstderr: {}",
        run.code,
        run.stdout,
        run.stderr
    );
    assert!(
        !run.stderr.contains("panicked"),
        "a panic was printed: {}",
        run.stderr
    );
    assert!(
        run.stderr.contains(needle),
        "stderr lacks {needle:?}: {}",
        run.stderr
    );
    run
}

/// `show` and `run` both refuse `model` with a message containing `needle`.
#[track_caller]
fn both_refuse(env: &Env, model: &Path, needle: &str) {
    let m = model.to_str().unwrap();
    fails_cleanly(env.run(&["show", m]), needle);
    fails_cleanly(env.run(&["run", m, "hi", "-n", "2", "--raw"]), needle);
}

/// A copy of tests/fixtures/tiny-llama in `env`'s folder, with `config` edited by `edit`.
fn llama_dir(env: &Env, name: &str, edit: impl FnOnce(&mut Value)) -> PathBuf {
    let dir = env.dir.path().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture("tiny-llama").join(f), dir.join(f)).unwrap();
    }
    let mut config: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("tiny-llama").join("config.json")).unwrap(),
    )
    .unwrap();
    edit(&mut config);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    dir
}

/// GGUF metadata and tensors of tiny-llama (f32, llama.cpp names, byte-level BPE tokenizer).
struct TinyGguf {
    metadata: BTreeMap<String, Gv>,
    tensors: Vec<(String, QTensor)>,
}

impl TinyGguf {
    fn new() -> TinyGguf {
        let dir = fixture("tiny-llama");
        let weights = xllm::model::safetensors::SafetensorsWeights::open_files(&[
            dir.join("model.safetensors")
        ])
        .unwrap();
        let mut tensors = Vec::new();
        for name in weights.names() {
            let t = weights.load(name, DType::F32, &Device::Cpu).unwrap();
            tensors.push((
                gguf_name(name),
                QTensor::quantize(&t, GgmlDType::F32).unwrap(),
            ));
        }
        let tok: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap())
                .unwrap();
        let vocab = tok["model"]["vocab"].as_object().unwrap();
        let mut tokens = vec![String::new(); vocab.len()];
        for (t, id) in vocab {
            tokens[id.as_u64().unwrap() as usize] = t.clone();
        }
        let merges: Vec<Gv> = tok["model"]["merges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| match m {
                Value::String(s) => Gv::String(s.clone()),
                Value::Array(p) => Gv::String(format!(
                    "{} {}",
                    p[0].as_str().unwrap(),
                    p[1].as_str().unwrap()
                )),
                other => panic!("merge {other}"),
            })
            .collect();
        let types: Vec<Gv> = (0..tokens.len())
            .map(|i| Gv::I32(if i < 3 { 3 } else { 1 }))
            .collect();
        let mut md = BTreeMap::new();
        let mut set = |k: &str, v: Gv| {
            md.insert(k.to_string(), v);
        };
        set("general.architecture", Gv::String("llama".into()));
        set("general.file_type", Gv::U32(0));
        set("llama.context_length", Gv::U32(256));
        set("llama.embedding_length", Gv::U32(64));
        set("llama.feed_forward_length", Gv::U32(128));
        set("llama.block_count", Gv::U32(2));
        set("llama.attention.head_count", Gv::U32(4));
        set("llama.attention.head_count_kv", Gv::U32(2));
        set("llama.attention.layer_norm_rms_epsilon", Gv::F32(1e-6));
        set("llama.rope.freq_base", Gv::F32(10000.0));
        set("tokenizer.ggml.model", Gv::String("gpt2".into()));
        set(
            "tokenizer.ggml.tokens",
            Gv::Array(tokens.into_iter().map(Gv::String).collect()),
        );
        set("tokenizer.ggml.merges", Gv::Array(merges));
        set("tokenizer.ggml.token_type", Gv::Array(types));
        set("tokenizer.ggml.bos_token_id", Gv::U32(1));
        set("tokenizer.ggml.eos_token_id", Gv::U32(2));
        TinyGguf {
            metadata: md,
            tensors,
        }
    }

    fn set(mut self, key: &str, value: Gv) -> Self {
        self.metadata.insert(key.to_string(), value);
        self
    }

    fn bytes(&self) -> Vec<u8> {
        let md: Vec<(&str, &Gv)> = self.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let ts: Vec<(&str, &QTensor)> = self.tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut cur = std::io::Cursor::new(Vec::new());
        gguf_file::write(&mut cur, &md, &ts).unwrap();
        cur.into_inner()
    }

    fn write(&self, env: &Env, name: &str) -> PathBuf {
        let path = env.dir.path().join(name);
        std::fs::write(&path, self.bytes()).unwrap();
        path
    }
}

/// transformers' tensor names to llama.cpp's.
fn gguf_name(hf: &str) -> String {
    let mut n = hf.to_string();
    for (a, b) in [
        ("model.embed_tokens", "token_embd"),
        ("model.norm", "output_norm"),
        ("lm_head", "output"),
        ("model.layers.", "blk."),
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "ffn_norm"),
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
    ] {
        n = n.replace(a, b);
    }
    n
}

#[test]
fn the_unbroken_fixtures_load_and_run() {
    let env = env();
    let dir = llama_dir(&env, "ok", |_| {});
    let d = dir.to_str().unwrap();
    env.run(&["show", d]).ok();
    env.run(&["run", d, "hello", "-n", "3", "--raw"]).ok();
    let gguf = TinyGguf::new().write(&env, "ok.gguf");
    let g = gguf.to_str().unwrap();
    env.run(&["show", g]).ok();
    env.run(&["run", g, "hello", "-n", "3", "--raw"]).ok();
}

#[test]
fn gguf_zero_and_absurd_sizes_are_clean_errors() {
    let env = env();
    let cases: Vec<(&str, Gv, &str)> = vec![
        ("general.alignment", Gv::U32(0), "'general.alignment' = 0"),
        ("general.alignment", Gv::U32(3), "'general.alignment' = 3"),
        (
            "llama.attention.head_count_kv",
            Gv::U32(0),
            "llama.attention.head_count_kv = 0",
        ),
        (
            "llama.attention.head_count_kv",
            Gv::U32(3),
            "llama.attention.head_count_kv = 3",
        ),
        (
            "llama.rope.dimension_count",
            Gv::U32(0),
            "llama.rope.dimension_count = 0",
        ),
        (
            "llama.rope.dimension_count",
            Gv::U32(1 << 31),
            "llama.rope.dimension_count = 2147483648",
        ),
        (
            "llama.feed_forward_length",
            Gv::U32(0),
            "llama.feed_forward_length = 0",
        ),
        (
            "llama.context_length",
            Gv::U32(0),
            "llama.context_length = 0",
        ),
        ("llama.block_count", Gv::F32(1e30), "'llama.block_count'"),
        ("llama.block_count", Gv::U64(1 << 40), "llama.block_count"),
        (
            "llama.embedding_length",
            Gv::I32(-64),
            "'llama.embedding_length' = -64",
        ),
        (
            "llama.attention.head_count",
            Gv::U32(0),
            "llama.attention.head_count = 0",
        ),
        ("llama.vocab_size", Gv::U32(0), "llama.vocab_size"),
        (
            "llama.rope.freq_base",
            Gv::F32(f32::NAN),
            "'llama.rope.freq_base'",
        ),
        (
            "tokenizer.ggml.merges",
            Gv::Array(vec![Gv::String("x qqq".into())]),
            "needs the token \"qqq\"",
        ),
        (
            "tokenizer.ggml.token_type",
            Gv::Array(vec![Gv::I32(1); 400]),
            "'tokenizer.ggml.token_type' has 400 entries for 320 tokens",
        ),
    ];
    for (i, (key, value, needle)) in cases.into_iter().enumerate() {
        let path = TinyGguf::new()
            .set(key, value)
            .write(&env, &format!("bad{i}.gguf"));
        both_refuse(&env, &path, needle);
    }
}

#[test]
fn gguf_with_a_zero_row_matrix_is_a_clean_error() {
    let env = env();
    let mut g = TinyGguf::new();
    let empty = candle_core::Tensor::zeros((0, 64), DType::F32, &Device::Cpu).unwrap();
    for (name, t) in g.tensors.iter_mut() {
        if name == "blk.0.ffn_up.weight" {
            *t = QTensor::quantize(&empty, GgmlDType::F32).unwrap();
        }
    }
    let path = g.write(&env, "zero-rows.gguf");
    fails_cleanly(
        env.run(&["run", path.to_str().unwrap(), "hi", "-n", "2", "--raw"]),
        "blk.0.ffn_up.weight",
    );
}

#[test]
fn gguf_truncated_or_garbled_headers_are_clean_errors() {
    let env = env();
    let bytes = TinyGguf::new().bytes();
    // Cut inside the metadata, inside the tensor infos, inside the data.
    for (i, cut) in [24usize, 3000, bytes.len() / 2, bytes.len() - 1]
        .iter()
        .enumerate()
    {
        let path = env.dir.path().join(format!("cut{i}.gguf"));
        std::fs::write(&path, &bytes[..*cut]).unwrap();
        both_refuse(&env, &path, "is not a valid GGUF file");
    }
    // A string length of 2^62 right after the counts.
    let mut b = bytes.clone();
    b[24..32].copy_from_slice(&(1u64 << 62).to_le_bytes());
    let path = env.dir.path().join("long-key.gguf");
    std::fs::write(&path, b).unwrap();
    both_refuse(&env, &path, "is not a valid GGUF file");
}

#[test]
fn config_json_zero_and_absurd_sizes_are_clean_errors() {
    let env = env();
    let cases: Vec<(&str, Value, &str)> = vec![
        ("intermediate_size", json!(0), "intermediate_size = 0"),
        (
            "max_position_embeddings",
            json!(0),
            "max_position_embeddings = 0",
        ),
        ("num_key_value_heads", json!(0), "num_key_value_heads"),
        ("num_attention_heads", json!(0), "num_attention_heads"),
        ("hidden_size", json!(1e30), "hidden_size = 1e+30"),
        ("vocab_size", json!(-5), "vocab_size = -5"),
        (
            "num_hidden_layers",
            json!(1u64 << 40),
            "num_hidden_layers = 1099511627776",
        ),
        ("head_dim", json!(0), "head_dim = 0"),
        (
            "partial_rotary_factor",
            json!(2147483648.0),
            "partial_rotary_factor = 2147483648",
        ),
        ("rms_norm_eps", json!(-1.0), "rms_norm_eps = -1"),
        ("sliding_window", json!(0), "sliding_window = 0"),
    ];
    for (i, (key, value, needle)) in cases.into_iter().enumerate() {
        let dir = llama_dir(&env, &format!("bad{i}"), |c| c[key] = value);
        both_refuse(&env, &dir, needle);
    }
    let dir = llama_dir(&env, "rope", |c| {
        c["rope_parameters"]["original_max_position_embeddings"] = json!(0)
    });
    both_refuse(&env, &dir, "original_max_position_embeddings = 0");
}

#[test]
fn generation_config_values_are_validated() {
    let env = env();
    for (i, (gen, needle)) in [
        (json!({"temperature": -1.0}), "temperature = -1"),
        (json!({"top_p": 7}), "top_p = 7"),
        (json!({"eos_token_id": [2, -1]}), "eos_token_id"),
        (json!({"top_k": "many"}), "top_k"),
    ]
    .into_iter()
    .enumerate()
    {
        let dir = llama_dir(&env, &format!("gen{i}"), |_| {});
        std::fs::write(dir.join("generation_config.json"), gen.to_string()).unwrap();
        both_refuse(&env, &dir, needle);
    }
}

#[test]
fn shard_index_paths_stay_inside_the_model_folder() {
    let env = env();
    let outside = env.dir.path().join("outside.safetensors");
    std::fs::copy(fixture("tiny-llama").join("model.safetensors"), &outside).unwrap();
    let index = |dir: &Path, file: &str| {
        let header =
            xllm::model::inspect::read_safetensors_header(&dir.join("model.safetensors")).unwrap();
        let map: serde_json::Map<String, Value> =
            header.keys().map(|k| (k.clone(), json!(file))).collect();
        std::fs::write(
            dir.join("model.safetensors.index.json"),
            json!({"metadata": {}, "weight_map": map}).to_string(),
        )
        .unwrap();
    };
    let abs = llama_dir(&env, "abs", |_| {});
    index(&abs, outside.to_str().unwrap());
    both_refuse(
        &env,
        &abs,
        "not a plain relative path inside the model folder",
    );
    let up = llama_dir(&env, "up", |_| {});
    index(&up, "../outside.safetensors");
    both_refuse(
        &env,
        &up,
        "not a plain relative path inside the model folder",
    );
    #[cfg(unix)]
    {
        let link = llama_dir(&env, "link", |_| {});
        std::os::unix::fs::symlink(&outside, link.join("shard.safetensors")).unwrap();
        index(&link, "shard.safetensors");
        both_refuse(&env, &link, "outside the model folder");
    }
    // A well-formed index still works.
    let ok = llama_dir(&env, "indexed", |_| {});
    index(&ok, "model.safetensors");
    env.run(&["show", ok.to_str().unwrap()]).ok();
}

/// tiny-llama's tokenizer.json with `edit` applied, in a copy of the model.
fn llama_with_tokenizer(env: &Env, name: &str, edit: impl FnOnce(&mut Value)) -> PathBuf {
    let dir = llama_dir(env, name, |_| {});
    let mut tok: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap())
            .unwrap();
    edit(&mut tok);
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    dir
}

#[test]
fn tokenizer_json_that_would_panic_the_tokenizers_crate_is_refused() {
    let env = env();
    // A charsmap whose one-unit trie sends every byte outside itself.
    let dir = llama_with_tokenizer(&env, "charsmap", |t| {
        t["normalizer"] = json!({"type": "Precompiled", "precompiled_charsmap": "BAAAAAAEAAA="})
    });
    both_refuse(&env, &dir, "precompiled_charsmap");
    let dir = llama_with_tokenizer(&env, "charsmap-b64", |t| {
        t["normalizer"] = json!({"type": "Precompiled", "precompiled_charsmap": "not base64!"})
    });
    both_refuse(&env, &dir, "precompiled_charsmap");
    // A post-processor template naming a special token it does not define.
    let dir = llama_with_tokenizer(&env, "post", |t| {
        t["post_processor"] = json!({"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<cls>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {}})
    });
    both_refuse(&env, &dir, "\"<cls>\"");
}

#[test]
fn truncation_settings_are_ignored_not_fatal() {
    // Generation never truncates a prompt; a stride ≥ max_length (which makes the tokenizers
    // crate panic when it truncates) is therefore harmless.
    let env = env();
    let dir = llama_with_tokenizer(&env, "stride", |t| {
        t["truncation"] =
            json!({"direction": "Right", "max_length": 2, "strategy": "LongestFirst", "stride": 8})
    });
    let d = dir.to_str().unwrap();
    env.run(&["run", d, "hello hello hello hello", "-n", "2", "--raw"])
        .ok();
}

#[test]
fn token_ids_past_the_model_vocabulary_are_a_clean_error() {
    let env = env();
    let dir = llama_with_tokenizer(&env, "extra-token", |t| {
        t["added_tokens"].as_array_mut().unwrap().push(json!({"id": 400, "content": "<extra>",
            "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": false}))
    });
    let text = env.dir.path().join("text.txt");
    std::fs::write(&text, "hello <extra> world").unwrap();
    fails_cleanly(
        env.run(&[
            "perplexity",
            dir.to_str().unwrap(),
            "-f",
            text.to_str().unwrap(),
        ]),
        "token id 320",
    );
    fails_cleanly(
        env.run(&[
            "run",
            dir.to_str().unwrap(),
            "a <extra>",
            "-n",
            "2",
            "--raw",
        ]),
        "token id 320",
    );
}

#[test]
fn a_normalizer_that_explodes_text_is_refused_before_it_allocates() {
    let env = env();
    let dir = llama_with_tokenizer(&env, "explode", |t| {
        t["normalizer"] =
            json!({"type": "Replace", "pattern": {"Regex": "."}, "content": "x".repeat(10000)})
    });
    let text = env.dir.path().join("long.txt");
    std::fs::write(&text, "word ".repeat(20000)).unwrap();
    fails_cleanly(
        env.run(&[
            "perplexity",
            dir.to_str().unwrap(),
            "-f",
            text.to_str().unwrap(),
        ]),
        "normalizer grows",
    );
}

/// tiny-llama with `template` as its chat template (tokenizer_config.json).
fn llama_with_template(env: &Env, name: &str, template: &str) -> PathBuf {
    let dir = llama_dir(env, name, |_| {});
    std::fs::write(
        dir.join("tokenizer_config.json"),
        json!({"chat_template": template, "bos_token": "<s>", "eos_token": "</s>"}).to_string(),
    )
    .unwrap();
    dir
}

#[test]
fn hostile_chat_templates_hit_limits() {
    let env = env();
    let cases = [
        (
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            "steps",
        ),
        ("{{ messages[0].content | indent(1000000000) }}", "MiB of memory"),
        (
            "{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
            "MiB of memory",
        ),
        ("{{ 'abcd' * 20000000 }}", "output exceeds"),
        ("{{ strftime_now('%Y %Q') }}", "strftime_now: invalid format"),
        ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursion"),
        ("{% for m in messages %}", "does not parse"),
    ];
    for (i, (template, needle)) in cases.into_iter().enumerate() {
        let dir = llama_with_template(&env, &format!("tpl{i}"), template);
        fails_cleanly(
            env.run(&["run", dir.to_str().unwrap(), "hello", "-n", "2"]),
            needle,
        );
    }
    // A sane template still works.
    let dir = llama_with_template(
        &env,
        "tpl-ok",
        "{% for m in messages %}{{ m.content }}{% endfor %}{{ strftime_now('%Y') }}",
    );
    env.run(&["run", dir.to_str().unwrap(), "hello", "-n", "2"])
        .ok();
}
