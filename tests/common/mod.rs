//! Shared helpers for integration tests: the mock Hub, tiny models built on the fly, and a runner
//! for the real `xllm` binary against a temporary store.

#![allow(dead_code)]

pub mod gpt_oss;
pub mod hub_server;
pub mod server;
pub mod smollm2;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[allow(unused_imports)]
pub use hub_server::{Behaviour, MockHub, Repo, RepoFile, GOOD_TOKEN};

/// A temporary XLLM_HOME and HF_HOME, and the binary pointed at a mock Hub.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub endpoint: String,
}

impl Env {
    pub fn new(endpoint: &str) -> Env {
        Env {
            dir: tempfile::tempdir().unwrap(),
            endpoint: endpoint.to_string(),
        }
    }

    pub fn home(&self) -> PathBuf {
        self.dir.path().join("xllm")
    }

    pub fn hf_home(&self) -> PathBuf {
        self.dir.path().join("hf")
    }

    pub fn model_dir(&self, repo: &str) -> PathBuf {
        self.home().join("models").join(repo.replace('/', "--"))
    }

    pub fn command(&self, args: &[&str]) -> Command {
        // XLLM_TEST_BIN lets a developer test a copied binary when several checkouts share
        // one CARGO_TARGET_DIR (and so overwrite each other's `xllm`).
        let bin =
            std::env::var_os("XLLM_TEST_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_xllm").into());
        let mut c = Command::new(bin);
        c.args(args)
            .env("XLLM_HOME", self.home())
            .env("HF_HOME", self.hf_home())
            .env("HF_ENDPOINT", &self.endpoint)
            .env_remove("HF_TOKEN")
            .env_remove("HF_TOKEN_PATH")
            .env_remove("HF_HUB_CACHE")
            .env_remove("HUGGINGFACE_HUB_CACHE")
            .env_remove("HF_HUB_OFFLINE");
        c
    }

    pub fn run(&self, args: &[&str]) -> Run {
        Run::from(self.command(args).output().unwrap())
    }

    pub fn run_with(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let mut c = self.command(args);
        for (k, v) in env {
            c.env(k, v);
        }
        Run::from(c.output().unwrap())
    }
}

#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Run {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).to_string(),
            stderr: String::from_utf8_lossy(&o.stderr).to_string(),
        }
    }
}

impl Run {
    pub fn ok(self) -> Run {
        assert_eq!(
            self.code, 0,
            "expected success\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self
    }

    pub fn fails_with(self, code: i32, text: &str) -> Run {
        assert_eq!(
            self.code, code,
            "stdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        assert!(
            self.stderr.contains(text),
            "stderr lacks {text:?}: {}",
            self.stderr
        );
        self
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }
}

/// A safetensors file with these tensors (zero-filled except a deterministic pattern).
pub fn safetensors_bytes(tensors: &[(&str, &str, Vec<u64>)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for (name, dtype, shape) in tensors {
        let elem = match *dtype {
            "F32" => 4,
            "BF16" | "F16" => 2,
            _ => 1,
        };
        let size = elem * shape.iter().product::<u64>();
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}),
        );
        offset += size;
    }
    let json = serde_json::to_vec(&header).unwrap();
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend(json);
    bytes.extend((0..offset).map(|i| (i * 31 % 251) as u8));
    bytes
}

/// config.json of a tiny llama-like model.
pub const TINY_CONFIG: &str = r#"{"model_type":"llama","hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"max_position_embeddings":2048,"vocab_size":1000}"#;

/// A minimal tokenizer.json the `tokenizers` crate loads (a two-word vocabulary): `show` checks
/// the tokenizer as `run` does, so store fixtures need a real one.
pub const TINY_TOKENIZER: &str = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,"pre_tokenizer":null,"post_processor":null,"decoder":null,"model":{"type":"WordLevel","vocab":{"a":0,"<unk>":1},"unk_token":"<unk>"}}"#;

/// A tiny safetensors repo: config, tokenizer files, one weight file of about `weight_kib` KiB, a
/// README, and an `original/` copy that a pull must skip.
pub fn tiny_safetensors_repo(commit: &str, weight_kib: u64) -> Repo {
    let rows = weight_kib * 1024 / (64 * 2);
    let weights = safetensors_bytes(&[
        ("model.embed_tokens.weight", "BF16", vec![rows, 64]),
        ("model.norm.weight", "BF16", vec![64]),
    ]);
    let file = |path: &str, data: Vec<u8>, lfs: bool| RepoFile {
        path: path.into(),
        data,
        lfs,
    };
    Repo {
        commit: commit.into(),
        files: vec![
            file("config.json", TINY_CONFIG.as_bytes().to_vec(), false),
            file("tokenizer.json", TINY_TOKENIZER.as_bytes().to_vec(), false),
            file(
                "tokenizer_config.json",
                br#"{"chat_template":"{{ messages }}"}"#.to_vec(),
                false,
            ),
            file("README.md", b"# tiny".to_vec(), false),
            file("model.safetensors", weights.clone(), true),
            file("original/model.safetensors", weights, true),
        ],
        ..Default::default()
    }
}

/// A tiny GGUF file (one Q8_0 tensor) whose metadata says `file_type`.
pub fn gguf_bytes(file_type: u32) -> Vec<u8> {
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    let t = Tensor::arange(0f32, 256f32, &Device::Cpu)
        .unwrap()
        .reshape((8, 32))
        .unwrap();
    let q = QTensor::quantize(&t, GgmlDType::Q8_0).unwrap();
    let arch = gguf_file::Value::String("llama".into());
    let ctx = gguf_file::Value::U32(2048);
    let ftype = gguf_file::Value::U32(file_type);
    let heads = gguf_file::Value::U32(4);
    let kv = gguf_file::Value::U32(2);
    let emb = gguf_file::Value::U32(32);
    let blocks = gguf_file::Value::U32(2);
    let ffn = gguf_file::Value::U32(64);
    let tok_model = gguf_file::Value::String("gpt2".into());
    let tokens = gguf_file::Value::Array(vec![
        gguf_file::Value::String("a".into()),
        gguf_file::Value::String("b".into()),
        gguf_file::Value::String("ab".into()),
    ]);
    let merges = gguf_file::Value::Array(vec![gguf_file::Value::String("a b".into())]);
    let mut cur = std::io::Cursor::new(Vec::new());
    gguf_file::write(
        &mut cur,
        &[
            ("general.architecture", &arch),
            ("general.file_type", &ftype),
            ("llama.context_length", &ctx),
            ("llama.attention.head_count", &heads),
            ("llama.attention.head_count_kv", &kv),
            ("llama.embedding_length", &emb),
            ("llama.block_count", &blocks),
            ("llama.feed_forward_length", &ffn),
            ("tokenizer.ggml.model", &tok_model),
            ("tokenizer.ggml.tokens", &tokens),
            ("tokenizer.ggml.merges", &merges),
        ],
        &[("token_embd.weight", &q)],
    )
    .unwrap();
    cur.into_inner()
}

/// A GGUF repo shipping Q4_K_M and Q8_0 files.
pub fn tiny_gguf_repo(commit: &str) -> Repo {
    Repo {
        commit: commit.into(),
        files: vec![
            RepoFile {
                path: "tiny-q4_k_m.gguf".into(),
                data: gguf_bytes(15),
                lfs: true,
            },
            RepoFile {
                path: "tiny-q8_0.gguf".into(),
                data: gguf_bytes(7),
                lfs: true,
            },
            RepoFile {
                path: "README.md".into(),
                data: b"# gguf".to_vec(),
                lfs: false,
            },
        ],
        ..Default::default()
    }
}

/// Every file under `dir`, relative, sorted.
pub fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(base, &p, out);
                } else {
                    out.push(
                        p.strip_prefix(base)
                            .unwrap()
                            .to_string_lossy()
                            .replace('\\', "/"),
                    );
                }
            }
        }
    }
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// A model built from a safetensors folder (config.json + weights) on the CPU in f32, the way
/// the parity and KV-cache tests compare it with transformers.
pub fn build_f32_cpu(dir: &Path) -> Box<dyn xllm::arch::CausalLm> {
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let weights = xllm::model::safetensors::SafetensorsWeights::open_dir(dir).unwrap();
    let options = xllm::arch::BuildOptions {
        device: candle_core::Device::Cpu,
        dtype: candle_core::DType::F32,
        keep_weight_dtype: false,
        activation_stats: None,
    };
    let source = xllm::arch::WeightSource::Safetensors {
        config: &config,
        weights: &weights,
    };
    xllm::arch::build(&source, &options).unwrap()
}

/// Token ids and transformers' logits stored beside a fixture checkpoint
/// (`reference.safetensors`, made by scripts/make_llama_fixtures.py).
pub fn reference_ids_and_logits(dir: &Path) -> (Vec<u32>, candle_core::Tensor) {
    use candle_core::{DType, Device};
    let reference = xllm::model::safetensors::SafetensorsWeights::open_files(&[
        dir.join("reference.safetensors")
    ])
    .unwrap();
    let ids = reference
        .load("input_ids", DType::I64, &Device::Cpu)
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as u32)
        .collect();
    let logits = reference.load("logits", DType::F32, &Device::Cpu).unwrap();
    (ids, logits)
}
