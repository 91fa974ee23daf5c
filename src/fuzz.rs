//! Fuzzing on stable Rust: targets for every parser of untrusted model data, seed corpora built
//! from the fixtures, and a small mutational driver.
//!
//! Why our own driver: `cargo fuzz` (libFuzzer) needs nightly sanitizer flags and cargo-afl an
//! extra toolchain, and neither can run in CI here. This driver is deterministic (a seed and an
//! iteration count reproduce an input), keeps the current input in a memory-mapped file so an
//! abort or a hang leaves it on disk, treats a panic as a finding, and grows its corpus with
//! mutants a target accepted (no coverage feedback: acceptance is the signal that a mutant got
//! past the parsers, into the deeper checks). `examples/fuzz.rs` runs campaigns;
//! `tests/fuzz_smoke.rs` runs a few seconds of each target in CI. docs/robustness.md has the
//! commands and counts.
//!
//! Adding a target: write a
//! `fn(&[u8]) -> bool` (true when the input got past parsing) that must never panic, abort or
//! hang, add seeds to [`seeds`], and a row to [`TARGETS`].

use std::io::Write;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A fuzz target: never panics, aborts or hangs; returns whether the input was accepted.
pub type TargetFn = fn(&[u8]) -> bool;

/// One fuzz target.
pub struct Target {
    pub name: &'static str,
    pub run: TargetFn,
    /// Inputs are JSON (structure-aware mutations apply).
    pub json: bool,
    /// Tokens spliced into text inputs.
    pub dictionary: &'static [&'static str],
}

const JINJA_DICT: &[&str] = &[
    "{{ ",
    " }}",
    "{% ",
    " %}",
    "{% for i in range(99999) %}",
    "{% endfor %}",
    "{% if ",
    "{% endif %}",
    "{% set ns = namespace(s='x') %}",
    "{% set ns.s = ns.s ~ ns.s %}",
    "ns.s",
    " ~ ",
    " * ",
    "|indent(",
    "|tojson",
    "|length",
    "messages",
    "message['content']",
    "strftime_now('",
    "raise_exception('",
    "{% macro m(x) %}",
    "{% endmacro %}",
    "m(",
    "loop.index",
    "'x' * 99999999",
    "9999999999",
    "|replace('x', 'xx')",
    "|join",
    ".upper()",
    ".split(",
    "range(",
    "add_generation_prompt",
    "bos_token",
    "{% raw %}",
    "{% endraw %}",
    "{#",
    "#}",
    "|center(",
    ".ljust(",
    "|batch(",
    "|format(",
    "[::-1]",
];

const NAME_DICT: &[&str] = &[
    "/",
    ":",
    "..",
    "-GGUF",
    ":kv_int8",
    ":kv_fp8",
    ":Q4_K_M",
    ":q8_0",
    "hf.co/",
    "https://huggingface.co/",
    "huggingface.co/",
    "\0",
    "%2F",
    "./",
    "~",
    ".gguf",
    "@main",
    "org",
    "name",
];

/// Every target, by name.
pub const TARGETS: &[Target] = &[
    Target {
        name: "safetensors_header",
        run: targets::safetensors_header,
        json: false,
        dictionary: &[],
    },
    Target {
        name: "gguf",
        run: targets::gguf,
        json: false,
        dictionary: &[],
    },
    Target {
        name: "config_json",
        run: targets::config_json,
        json: true,
        dictionary: &[],
    },
    Target {
        name: "generation_config",
        run: targets::generation_config,
        json: true,
        dictionary: &[],
    },
    Target {
        name: "tokenizer_json",
        run: targets::tokenizer_json,
        json: true,
        dictionary: &[],
    },
    Target {
        name: "chat_template",
        run: targets::chat_template,
        json: false,
        dictionary: JINJA_DICT,
    },
    Target {
        name: "model_name",
        run: targets::model_name,
        json: false,
        dictionary: NAME_DICT,
    },
    Target {
        name: "http_request",
        run: targets::http_request,
        json: true,
        dictionary: &[],
    },
];

pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// The targets themselves.
pub mod targets {
    use super::*;
    use crate::model::config::LlamaConfig;

    pub fn safetensors_header(data: &[u8]) -> bool {
        use candle_core::safetensors::Load;
        if let Ok((n, _)) = safetensors::SafeTensors::read_metadata(data) {
            let _ = crate::model::inspect::parse_safetensors_header(&data[8..8 + n]);
        }
        let Ok(st) = safetensors::SafeTensors::deserialize(data) else {
            return false;
        };
        for (_, view) in st.tensors() {
            if view.data().len() <= 1 << 20 {
                let _ = view.load(&candle_core::Device::Cpu);
            }
        }
        true
    }

    pub fn gguf(data: &[u8]) -> bool {
        let Ok(file) =
            crate::model::gguf::GgufFile::from_bytes(Path::new("fuzz.gguf"), data.to_vec())
        else {
            return false;
        };
        let config = crate::arch::llama::config_from_gguf(&file);
        if let Ok(cfg) = &config {
            rope_of(cfg);
        }
        if let Ok(tok) = crate::engine::tokenizer::TextTokenizer::from_gguf(&file) {
            tokenize(&tok);
        }
        // Read the small tensors (candle's reader on checked ranges).
        let small: Vec<String> = file
            .content
            .tensor_infos
            .iter()
            .filter(|(_, i)| i.shape.elem_count() <= 1 << 16)
            .map(|(n, _)| n.clone())
            .collect();
        for name in small {
            if let Ok(t) = file.tensor(&name, &candle_core::Device::Cpu) {
                let _ = t.dequantize(&candle_core::Device::Cpu);
            }
        }
        config.is_ok()
    }

    fn rope_of(cfg: &LlamaConfig) {
        use crate::arch::rope::{Rope, RopeLayout};
        let rope = Rope::new(cfg.rope.clone(), RopeLayout::Halves, None);
        let _ = rope.cos_sin(0, 2, &candle_core::Device::Cpu);
        let _ = rope.cos_sin(
            cfg.max_position_embeddings.saturating_sub(1),
            1,
            &candle_core::Device::Cpu,
        );
    }

    fn tokenize(tok: &crate::engine::tokenizer::TextTokenizer) {
        for text in ["Hello world, 123 ünïcode <s> </s>", "", " \n\t  "] {
            if let Ok(ids) = tok.encode(text, true) {
                let _ = tok.decode(&ids);
            }
        }
        let _ = tok.decode(&[0, 1, 2, 3, u32::MAX]);
    }

    pub fn config_json(data: &[u8]) -> bool {
        let Ok(value) = serde_json::from_slice::<Value>(data) else {
            return false;
        };
        let mut meta = crate::model::inspect::metadata_from_config(&value);
        crate::model::arch_facts::apply(&value, &mut meta);
        let _ = meta.kv_bytes_per_token(2);
        let mut accepted = false;
        if let Ok(cfg) = LlamaConfig::from_value(&value) {
            rope_of(&cfg);
            accepted = true;
        }
        if let Ok(cfg) = crate::arch::gpt_oss::GptOssConfig::from_value(&value) {
            let _ = cfg.parameter_counts();
            let _ = cfg.rope_frequencies();
            for l in 0..cfg.num_hidden_layers {
                let _ = cfg.is_sliding(l);
            }
            accepted = true;
        }
        accepted
    }

    pub fn generation_config(data: &[u8]) -> bool {
        let Ok(value) = serde_json::from_slice::<Value>(data) else {
            return false;
        };
        let _ = crate::model::config::token_ids(value.get("eos_token_id"));
        crate::model::config::check_generation_config(&value).is_ok()
    }

    pub fn tokenizer_json(data: &[u8]) -> bool {
        let Ok(text) = std::str::from_utf8(data) else {
            return false;
        };
        let config = json!({"bos_token": "<s>", "eos_token": {"content": "</s>"}});
        match crate::engine::tokenizer::TextTokenizer::from_parts(
            Path::new("tokenizer.json"),
            text,
            &config,
            None,
            &[],
        ) {
            Ok(mut tok) => {
                tok.limit_to_vocab(tok.vocab_size());
                tokenize(&tok);
                true
            }
            Err(_) => false,
        }
    }

    pub fn chat_template(data: &[u8]) -> bool {
        use crate::engine::chat_template::{ChatTemplate, Message};
        let Ok(src) = std::str::from_utf8(data) else {
            return false;
        };
        let Ok(t) = ChatTemplate::new(src, Some("<s>"), Some("</s>")) else {
            return false;
        };
        let messages = [
            Message::new("system", "Be brief."),
            Message::new("user", "Hi {{ there }} {% raw %}"),
            Message::new("assistant", "Hello."),
            Message::new("user", "Again"),
        ];
        t.render(&messages, true).is_ok()
    }

    /// An HTTP request body, sent in-process through the server's real router (every layer,
    /// handler and the engine) to a route chosen by the body's shape, with the tiny llama
    /// fixture loaded under the name `tiny` (context capped so accepted requests stay cheap).
    /// A handler panic surfaces here as a panic; one caught by tokio (a 500 naming a panic) is
    /// turned back into one, so both count as findings.
    pub fn http_request(data: &[u8]) -> bool {
        let Some(server) = http::server() else {
            return false;
        };
        let (status, body) = server.send(http::route_for(data), data.to_vec());
        if status == 500 && String::from_utf8_lossy(&body).contains("panic") {
            panic!(
                "the server answered 500 with a panic: {}",
                String::from_utf8_lossy(&body[..body.len().min(400)])
            );
        }
        (200..300).contains(&status)
    }

    pub fn model_name(data: &[u8]) -> bool {
        use crate::store::reference::ModelRef;
        let Ok(text) = std::str::from_utf8(data) else {
            return false;
        };
        if let Some((_, token)) = text.rsplit_once(':') {
            let _ = crate::quant::QuantToken::parse(token);
        }
        let _ = crate::quant::gguf_type_in_file_name(text);
        match ModelRef::parse(text) {
            Ok(ModelRef::Hub { repo, .. }) => {
                // The store keeps a repo in one folder named from it: that name must be one
                // plain path component, or a name could reach outside the store.
                let folder = repo.replace('/', "--");
                let mut parts = Path::new(&folder).components();
                let plain = matches!(parts.next(), Some(std::path::Component::Normal(_)))
                    && parts.next().is_none();
                assert!(plain, "repo {repo:?} maps to the store folder {folder:?}");
                true
            }
            Ok(_) => true,
            Err(_) => false,
        }
    }
}

/// The in-process server the `http_request` target talks to.
pub mod http {
    use std::sync::OnceLock;

    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    use crate::server::registry::{Alias, KeepAlive, Registry, RegistryOptions};
    use crate::server::{router, AppState};

    /// Routes that take a JSON body. `/api/pull` is left out: it would reach for the network.
    pub const ROUTES: &[&str] = &[
        "/v1/chat/completions",
        "/v1/completions",
        "/api/chat",
        "/api/generate",
        "/api/show",
        "/api/delete",
        "/v1/embeddings",
        "/api/embed",
        "/api/embeddings",
    ];

    pub struct FuzzServer {
        runtime: tokio::runtime::Runtime,
        app: axum::Router,
    }

    impl FuzzServer {
        /// Sends one POST and reads the whole answer (a stream runs to its end).
        pub fn send(&self, route: &str, body: Vec<u8>) -> (u16, Vec<u8>) {
            let request = Request::post(route)
                .header("content-type", "application/json")
                .body(Body::from(body))
                .expect("a valid request line");
            self.runtime.block_on(async {
                let response = match self.app.clone().oneshot(request).await {
                    Ok(r) => r,
                    Err(never) => match never {},
                };
                let status = response.status().as_u16();
                let bytes = axum::body::to_bytes(response.into_body(), 64 << 20)
                    .await
                    .map(|b| b.to_vec())
                    .unwrap_or_default();
                (status, bytes)
            })
        }
    }

    /// The route for a body: chat bodies to the two chat APIs, prompts to the two completion
    /// APIs, embedding inputs to the embedding routes, a bare model name to `/api/show`,
    /// anything else to any route (picked by a hash of the body).
    pub fn route_for(data: &[u8]) -> &'static str {
        let h = super::fnv(data) as usize;
        let value: Option<serde_json::Value> = serde_json::from_slice(data).ok();
        let has = |k: &str| value.as_ref().and_then(|v| v.get(k)).is_some();
        let pick = |choices: &[&'static str]| choices[h % choices.len()];
        if has("messages") {
            pick(&["/v1/chat/completions", "/api/chat"])
        } else if has("prompt") {
            pick(&["/v1/completions", "/api/generate"])
        } else if has("input") {
            pick(&["/v1/embeddings", "/api/embed"])
        } else if has("model") || has("name") {
            "/api/show"
        } else {
            pick(ROUTES)
        }
    }

    /// Started once per process: the tiny llama fixture as `tiny`, a throwaway store.
    pub fn server() -> Option<&'static FuzzServer> {
        static SERVER: OnceLock<Option<FuzzServer>> = OnceLock::new();
        SERVER.get_or_init(start).as_ref()
    }

    fn start() -> Option<FuzzServer> {
        let fixture =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
        let store_dir =
            std::env::temp_dir().join(format!("xllm-fuzz-store-{}", std::process::id()));
        std::fs::create_dir_all(&store_dir).ok()?;
        crate::server::set_logging(false);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        let registry = Registry::new(
            crate::store::Store::at(store_dir),
            vec![Alias {
                name: "tiny".into(),
                path: fixture,
            }],
            RegistryOptions {
                device: Some("cpu".into()),
                ctx: Some(48),
                threads: Some(1),
                parallel: 4,
                max_waiting: 16,
                max_models: 1,
                memory_limit: None,
                keep_alive: KeepAlive::Forever,
            },
        )
        .ok()?;
        let state = std::sync::Arc::new(AppState::new(
            std::sync::Arc::new(registry),
            None,
            1 << 20,
            Vec::new(),
        ));
        state.set_ready();
        Some(FuzzServer {
            runtime,
            app: router::router(state),
        })
    }
}

/// Seed inputs for `target`, from the fixtures in tests/fixtures plus small synthetic files.
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let read = |rel: &str| std::fs::read(fixtures.join(rel)).ok();
    let files = |names: &[&str]| -> Vec<Vec<u8>> { names.iter().filter_map(|n| read(n)).collect() };
    let models = [
        "tiny-llama",
        "tiny-qwen2",
        "tiny-qwen3",
        "gpt_oss_tiny",
        "gpt_oss_trained",
    ];
    let mut out = match target {
        "safetensors_header" => {
            let mut v = files(&["tiny-llama/reference.safetensors"]);
            v.push(synthetic::safetensors());
            v
        }
        "gguf" => vec![synthetic::gguf(false), synthetic::gguf(true)],
        "config_json" => {
            let names: Vec<String> = models.iter().map(|m| format!("{m}/config.json")).collect();
            let mut v = files(&names.iter().map(String::as_str).collect::<Vec<_>>());
            v.push(
                json!({"model_type": "qwen2", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                    "sliding_window": 16, "use_sliding_window": true, "max_window_layers": 1,
                    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
                    "partial_rotary_factor": 0.5})
                .to_string()
                .into_bytes(),
            );
            v
        }
        "generation_config" => {
            let mut v = files(&["gpt_oss_tiny/generation_config.json"]);
            v.push(
                json!({"do_sample": true, "temperature": 0.7, "top_p": 0.9, "top_k": 40, "min_p": 0.05,
                    "repetition_penalty": 1.1, "eos_token_id": [1, 2], "bos_token_id": 0})
                .to_string()
                .into_bytes(),
            );
            v
        }
        "tokenizer_json" => {
            let names: Vec<String> = models
                .iter()
                .map(|m| format!("{m}/tokenizer.json"))
                .collect();
            let mut v = files(&names.iter().map(String::as_str).collect::<Vec<_>>());
            v.push(synthetic::spm_like_tokenizer());
            v
        }
        "chat_template" => {
            let mut v = files(&["gpt_oss_tiny/chat_template.jinja"]);
            for t in [
                "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
                "{{ bos_token }}{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools') }}{% endif %}[{{ m.role|upper }}] {{ m.content.strip() }}{{ eos_token }}{% endfor %}{{ strftime_now('%Y-%m-%d') }}|{{ messages|tojson }}",
                "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + m.content|length %}{% endfor %}{{ ns.n }}{{ 'x' * 3 }}{{ messages[-1]['content']|indent(2, true) }}",
            ] {
                v.push(t.as_bytes().to_vec());
            }
            v
        }
        "model_name" => [
            "org/name",
            "org/name:kv_int8",
            "org/name-GGUF:Q4_K_M",
            "hf.co/org/name:Q8_0",
            "https://huggingface.co/org/name",
            "name",
            "Org/Name-GGUF:iq4_xs",
            "Qwen/Qwen3-0.6B",
            "ggml-org/gpt-oss-20b-GGUF:mxfp4",
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect(),
        "http_request" => [
            json!({"model": "tiny", "messages": [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}),
            json!({"model": "tiny", "messages": [{"role": "user", "content": "Count"}], "stream": true,
                "stream_options": {"include_usage": true}, "max_completion_tokens": 3, "seed": 3,
                "temperature": 0.8, "top_p": 0.9, "stop": ["\n", "x"], "n": 2, "logprobs": true,
                "top_logprobs": 2, "presence_penalty": 0.5, "frequency_penalty": 0.1,
                "ignore_eos": true, "min_tokens": 1}),
            json!({"model": "tiny", "prompt": ["Once upon", "a time"], "max_tokens": 3, "echo": true,
                "logprobs": 1, "stream": false}),
            json!({"model": "tiny", "prompt": "Hello", "max_tokens": 2, "stream": true, "stop": "l"}),
            json!({"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "stream": false,
                "options": {"num_predict": 3, "temperature": 0, "seed": 1, "top_k": 5, "stop": ["a"]},
                "keep_alive": "5m", "think": false}),
            json!({"model": "tiny", "messages": [{"role": "user", "content": "Hi"}],
                "options": {"num_predict": 2}}),
            json!({"model": "tiny", "prompt": "Why", "system": "Be brief.", "stream": false,
                "raw": false, "options": {"num_predict": 3, "repeat_penalty": 1.1}}),
            json!({"model": "tiny:latest", "prompt": "Why", "options": {"num_predict": 2}}),
            json!({"model": "tiny"}),
            json!({"name": "tiny", "verbose": true}),
        ]
        .iter()
        .map(|v| v.to_string().into_bytes())
        .collect(),
        _ => Vec::new(),
    };
    if out.is_empty() {
        out.push(Vec::new());
    }
    out
}

/// Small valid files built in code (the fixtures have no GGUF, and their weights are larger
/// than a fuzz input should be).
pub mod synthetic {
    use super::*;
    use candle_core::quantized::gguf_file::{self, Value as Gv};
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    /// A safetensors file with one tensor of each common dtype.
    pub fn safetensors() -> Vec<u8> {
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for (name, dtype, shape, elem) in [
            ("a", "F32", vec![2u64, 3], 4u64),
            ("b", "BF16", vec![4], 2),
            ("c", "F16", vec![1, 2, 2], 2),
            ("d", "U8", vec![5], 1),
            ("e", "I64", vec![2], 8),
        ] {
            let n = shape.iter().product::<u64>() * elem;
            let start = data.len() as u64;
            data.extend((0..n).map(|i| (i * 37 % 251) as u8));
            header.insert(
                name.into(),
                json!({"dtype": dtype, "shape": shape, "data_offsets": [start, start + n]}),
            );
        }
        header.insert("__metadata__".into(), json!({"format": "pt"}));
        let json = serde_json::to_vec(&header).unwrap();
        let mut out = (json.len() as u64).to_le_bytes().to_vec();
        out.extend(json);
        out.extend(data);
        out
    }

    /// A llama GGUF with a byte-level BPE tokenizer (tiny-llama's vocabulary when `full`) and two
    /// small tensors.
    pub fn gguf(full: bool) -> Vec<u8> {
        let mut tokens: Vec<String> = ["<unk>", "<s>", "</s>", "a", "b", "ab", "Ġ", "Ġa"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut merges = vec!["a b".to_string(), "Ġ a".to_string()];
        if full {
            let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/tiny-llama/tokenizer.json");
            if let Some(tok) = std::fs::read_to_string(path)
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            {
                if let Some(vocab) = tok["model"]["vocab"].as_object() {
                    let mut v: Vec<(u64, String)> = vocab
                        .iter()
                        .map(|(t, id)| (id.as_u64().unwrap_or(0), t.clone()))
                        .collect();
                    v.sort();
                    tokens = v.into_iter().map(|(_, t)| t).collect();
                }
                if let Some(m) = tok["model"]["merges"].as_array() {
                    merges = m
                        .iter()
                        .filter_map(|m| match m {
                            Value::String(s) => Some(s.clone()),
                            Value::Array(p) => {
                                Some(format!("{} {}", p[0].as_str()?, p[1].as_str()?))
                            }
                            _ => None,
                        })
                        .collect();
                }
            }
        }
        let types: Vec<Gv> = (0..tokens.len())
            .map(|i| Gv::I32(if i < 3 { 3 } else { 1 }))
            .collect();
        let md: Vec<(&str, Gv)> = vec![
            ("general.architecture", Gv::String("llama".into())),
            ("general.alignment", Gv::U32(32)),
            ("llama.context_length", Gv::U32(256)),
            ("llama.embedding_length", Gv::U32(64)),
            ("llama.feed_forward_length", Gv::U32(128)),
            ("llama.block_count", Gv::U32(2)),
            ("llama.attention.head_count", Gv::U32(4)),
            ("llama.attention.head_count_kv", Gv::U32(2)),
            ("llama.attention.layer_norm_rms_epsilon", Gv::F32(1e-6)),
            ("llama.rope.freq_base", Gv::F32(10000.0)),
            ("llama.rope.dimension_count", Gv::U32(16)),
            ("llama.rope.scaling.type", Gv::String("yarn".into())),
            ("llama.rope.scaling.factor", Gv::F32(2.0)),
            ("tokenizer.ggml.model", Gv::String("gpt2".into())),
            // Both kinds of pre-tokenizer: regex splits (slow to build) and byte-level only.
            (
                "tokenizer.ggml.pre",
                Gv::String(if full { "llama-bpe" } else { "smollm" }.into()),
            ),
            (
                "tokenizer.ggml.tokens",
                Gv::Array(tokens.into_iter().map(Gv::String).collect()),
            ),
            (
                "tokenizer.ggml.merges",
                Gv::Array(merges.into_iter().map(Gv::String).collect()),
            ),
            ("tokenizer.ggml.token_type", Gv::Array(types)),
            ("tokenizer.ggml.bos_token_id", Gv::U32(1)),
            ("tokenizer.ggml.eos_token_id", Gv::U32(2)),
            ("tokenizer.ggml.add_bos_token", Gv::Bool(true)),
            (
                "tokenizer.chat_template",
                Gv::String("{% for m in messages %}{{ m.content }}{% endfor %}".into()),
            ),
        ];
        let norm = Tensor::ones(64, candle_core::DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::arange(0f32, 2048f32, &Device::Cpu)
            .unwrap()
            .reshape((32, 64))
            .unwrap();
        let norm = QTensor::quantize(&norm, GgmlDType::F32).unwrap();
        let w = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let md_ref: Vec<(&str, &Gv)> = md.iter().map(|(k, v)| (*k, v)).collect();
        let mut cur = std::io::Cursor::new(Vec::new());
        gguf_file::write(
            &mut cur,
            &md_ref,
            &[("output_norm.weight", &norm), ("blk.0.ffn_up.weight", &w)],
        )
        .unwrap();
        cur.into_inner()
    }

    /// A tokenizer.json in the SentencePiece style (Replace + Prepend normalizers, byte fallback,
    /// a TemplateProcessing post-processor).
    pub fn spm_like_tokenizer() -> Vec<u8> {
        json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [
                {"id": 0, "content": "<unk>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
                {"id": 1, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
                {"id": 2, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
            "pre_tokenizer": null,
            "post_processor": {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
            "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                "vocab": {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3, "a": 4, "b": 5, "▁a": 6, "ab": 7, "<0x41>": 8},
                "merges": ["▁ a", "a b"]}
        })
        .to_string()
        .into_bytes()
    }
}

/// A small deterministic generator (SplitMix64): same seed, same campaign.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
}

const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    3,
    7,
    16,
    31,
    32,
    64,
    127,
    128,
    255,
    256,
    1023,
    4096,
    65535,
    65536,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    1 << 32,
    1 << 40,
    1 << 53,
    0x7fff_ffff_ffff_ffff,
    u64::MAX,
    u64::MAX - 1,
];

/// Mutates `data` in place with 1–4 byte-level edits (and `dict` tokens for text).
pub fn mutate_bytes(
    data: &mut Vec<u8>,
    rng: &mut Rng,
    other: &[u8],
    dict: &[&str],
    max_len: usize,
) {
    for _ in 0..1 + rng.below(4) {
        let len = data.len();
        match rng.below(if dict.is_empty() { 9 } else { 11 }) {
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                data[i] = rng.next_u64() as u8;
            }
            2 if len > 0 => {
                let i = rng.below(len);
                data[i] =
                    [0u8, 0xff, 0x7f, 0x80, b'0', b'9', b'-', b'"', b'{', b'}'][rng.below(10)];
            }
            3 | 4 if len >= 8 => {
                // An interesting integer, 1/2/4/8 bytes little-endian, maybe negated.
                let width = [1usize, 2, 4, 8][rng.below(4)];
                let i = rng.below(len - width + 1);
                let mut v = INTERESTING[rng.below(INTERESTING.len())];
                if rng.chance(4) {
                    v = v.wrapping_neg();
                }
                data[i..i + width].copy_from_slice(&v.to_le_bytes()[..width]);
            }
            5 if len > 0 => {
                let a = rng.below(len);
                let b = (a + 1 + rng.below(64.min(len - a))).min(len);
                data.drain(a..b);
            }
            6 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                data.splice(i..i, bytes);
            }
            7 if len > 0 => {
                // Duplicate a chunk.
                let a = rng.below(len);
                let b = (a + 1 + rng.below(256.min(len - a))).min(len);
                let chunk = data[a..b].to_vec();
                let at = rng.below(len + 1);
                data.splice(at..at, chunk);
            }
            8 if !other.is_empty() => {
                // Splice: our head, the other's tail.
                let cut = rng.below(len + 1);
                let from = rng.below(other.len());
                data.truncate(cut);
                data.extend_from_slice(&other[from..]);
            }
            9 | 10 => {
                let tok = dict[rng.below(dict.len())].as_bytes();
                let i = rng.below(len + 1);
                data.splice(i..i, tok.iter().copied());
            }
            _ => {}
        }
    }
    data.truncate(max_len);
}

/// A JSON value to drop into a document: boundaries, wrong types, huge and deep things.
fn interesting_json(rng: &mut Rng) -> Value {
    match rng.below(16) {
        0 => json!(0),
        1 => json!(-1),
        2 => json!(1),
        3 => json!(INTERESTING[rng.below(INTERESTING.len())]),
        4 => json!(1e30),
        5 => json!(-1e30),
        6 => json!(0.5),
        7 => json!(2147483648.0),
        8 => Value::Null,
        9 => json!(true),
        10 => json!(""),
        11 => json!("x".repeat(1 + rng.below(5000))),
        12 => json!([]),
        13 => json!({}),
        14 => {
            let mut v = json!(1);
            for _ in 0..rng.below(200) {
                v = json!([v]);
            }
            v
        }
        _ => json!(["a", 1, null, {"type": "x"}]),
    }
}

/// Mutates a JSON document at the value level: replace, delete or copy a node somewhere along a
/// random path.
fn mutate_json(node: &mut Value, rng: &mut Rng) {
    let descend = rng.below(3) != 0;
    match node {
        Value::Object(m) if descend && !m.is_empty() => {
            let k = m
                .keys()
                .nth(rng.below(m.len()))
                .cloned()
                .unwrap_or_default();
            if rng.chance(6) {
                m.remove(&k);
            } else if rng.chance(8) {
                let v = m[&k].clone();
                m.insert(format!("{k}_{}", rng.below(9)), v);
            } else if let Some(child) = m.get_mut(&k) {
                mutate_json(child, rng);
            }
            return;
        }
        Value::Array(a) if descend && !a.is_empty() => {
            let i = rng.below(a.len());
            if rng.chance(6) {
                a.remove(i);
            } else if rng.chance(8) {
                let v = a[i].clone();
                let at = rng.below(a.len() + 1);
                a.insert(at, v);
            } else {
                mutate_json(&mut a[i], rng);
            }
            return;
        }
        _ => {}
    }
    let number = node.as_f64().filter(|_| rng.chance(2));
    *node = match number {
        Some(f) => json!(match rng.below(4) {
            0 => f * 2f64.powi(rng.below(64) as i32),
            1 => -f,
            2 => f + 1.0,
            _ => f.trunc() - 1.0,
        }),
        None => interesting_json(rng),
    };
}

/// What a campaign found.
#[derive(Debug, Default)]
pub struct Report {
    pub executions: u64,
    pub accepted: u64,
    /// Panicking inputs (saved under the crash folder) with their messages.
    pub crashes: Vec<(PathBuf, String)>,
    pub seconds: f64,
}

/// Campaign settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub iterations: u64,
    pub time_limit: Option<Duration>,
    pub seed: u64,
    pub max_len: usize,
    /// Where crashing inputs and the current input (`<target>.current`) are written.
    pub out_dir: PathBuf,
    /// An execution taking longer than this is a hang: reported and the process exits.
    pub hang_after: Duration,
}

/// Runs `target` on mutants of `seeds` until `settings` say stop.
pub fn campaign(
    target: &Target,
    seeds: Vec<Vec<u8>>,
    settings: &Settings,
) -> anyhow::Result<Report> {
    std::fs::create_dir_all(&settings.out_dir)?;
    let current_path = settings.out_dir.join(format!("{}.current", target.name));
    let mut current = CurrentInput::create(&current_path, settings.max_len)?;
    let started = Arc::new(AtomicU64::new(0));
    let epoch = Instant::now();
    watchdog(
        started.clone(),
        epoch,
        settings.hang_after,
        current_path.clone(),
        target.name,
    );
    let mut rng = Rng::new(settings.seed);
    let mut corpus = seeds;
    let seed_count = corpus.len();
    let mut report = Report::default();
    let t0 = Instant::now();
    while report.executions < settings.iterations {
        if let Some(limit) = settings.time_limit {
            if t0.elapsed() >= limit {
                break;
            }
        }
        let base = &corpus[rng.below(corpus.len())];
        let other = &corpus[rng.below(corpus.len())];
        let mut input = base.clone();
        let parsed = if target.json && rng.below(3) != 0 {
            serde_json::from_slice::<Value>(&input).ok()
        } else {
            None
        };
        match parsed {
            Some(mut v) => {
                for _ in 0..1 + rng.below(3) {
                    mutate_json(&mut v, &mut rng);
                }
                input = serde_json::to_vec(&v).unwrap_or_default();
                input.truncate(settings.max_len);
            }
            None => mutate_bytes(
                &mut input,
                &mut rng,
                other,
                target.dictionary,
                settings.max_len,
            ),
        }
        current.set(&input);
        started.store(epoch.elapsed().as_millis() as u64 + 1, Ordering::SeqCst);
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| (target.run)(&input)));
        started.store(0, Ordering::SeqCst);
        report.executions += 1;
        match outcome {
            Ok(true) => {
                report.accepted += 1;
                // Keep some accepted mutants: they reach the checks past parsing.
                if corpus.len() < seed_count + 256 {
                    corpus.push(input);
                } else if rng.chance(8) {
                    let i = seed_count + rng.below(256);
                    corpus[i] = input;
                }
            }
            Ok(false) => {}
            Err(payload) => {
                let message = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "panic".into());
                let path =
                    settings
                        .out_dir
                        .join(format!("{}-crash-{:016x}", target.name, fnv(&input)));
                std::fs::write(&path, &input)?;
                report.crashes.push((path, message));
            }
        }
    }
    report.seconds = t0.elapsed().as_secs_f64();
    Ok(report)
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Exits the process (status 70) when one execution runs longer than `after`, naming the file
/// holding the input.
fn watchdog(
    started: Arc<AtomicU64>,
    epoch: Instant,
    after: Duration,
    input: PathBuf,
    name: &'static str,
) {
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(250));
        let s = started.load(Ordering::SeqCst);
        if s != 0 {
            let now = epoch.elapsed().as_millis() as u64 + 1;
            if now.saturating_sub(s) > after.as_millis() as u64 {
                eprintln!(
                    "fuzz {name}: an execution has run for more than {} s (a hang); the input is in {}",
                    after.as_secs(),
                    input.display()
                );
                let _ = std::io::stderr().flush();
                std::process::exit(70);
            }
        }
    });
}

/// The input under test, in a shared memory-mapped file: after an abort or a kill, the file holds
/// the input that caused it (`[u64 length][bytes]`).
struct CurrentInput {
    map: memmap2::MmapMut,
}

impl CurrentInput {
    fn create(path: &Path, max_len: usize) -> anyhow::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        file.set_len(8 + max_len as u64)?;
        // SAFETY: the file is ours alone for the campaign's duration.
        let map = unsafe { memmap2::MmapMut::map_mut(&file)? };
        Ok(Self { map })
    }

    fn set(&mut self, input: &[u8]) {
        let n = input.len().min(self.map.len() - 8);
        self.map[..8].copy_from_slice(&(n as u64).to_le_bytes());
        self.map[8..8 + n].copy_from_slice(&input[..n]);
    }
}

/// The input stored in a `<target>.current` file.
pub fn read_current(path: &Path) -> anyhow::Result<Vec<u8>> {
    let bytes = std::fs::read(path)?;
    anyhow::ensure!(
        bytes.len() >= 8,
        "{} is not a current-input file",
        path.display()
    );
    let n = (u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize).min(bytes.len() - 8);
    Ok(bytes[8..8 + n].to_vec())
}
