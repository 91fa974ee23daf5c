//! `xllm serve` end to end: the real binary on a free port, driven over HTTP. The API shapes,
//! errors, security, registry and shutdown run on the tiny fixtures (always); answers,
//! tokenizer counts, concurrency and disconnects run on the real SmolLM2 (skipped with a note
//! when scripts/get_smollm2.sh has not fetched it; CI fetches it).

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::server::{fixture, path_str, read_then_drop, smollm2_gguf, Server};
use common::{MockHub, Repo, RepoFile};
use serde_json::{json, Value};

fn tiny() -> String {
    format!("tiny={}", path_str(&fixture("tiny-llama")))
}

/// The text and finish reason of an OpenAI SSE chat stream, checking its shape on the way:
/// role first, one id, usage chunk (when asked) before `[DONE]`.
fn parse_chat_stream(payloads: &[String], include_usage: bool) -> (String, String, Option<Value>) {
    assert_eq!(
        payloads.last().map(String::as_str),
        Some("[DONE]"),
        "{payloads:?}"
    );
    let chunks: Vec<Value> = payloads[..payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str(p).unwrap())
        .collect();
    let id = chunks[0]["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("chatcmpl-"));
    assert_eq!(
        chunks[0]["choices"][0]["delta"]["role"], "assistant",
        "role-first: {:?}",
        chunks[0]
    );
    let mut text = String::new();
    let mut finish = None;
    let mut usage = None;
    for (i, c) in chunks.iter().enumerate() {
        assert_eq!(c["id"], id.as_str());
        assert_eq!(c["object"], "chat.completion.chunk");
        if include_usage {
            assert!(
                c.get("usage").is_some(),
                "every chunk carries usage (null) with include_usage"
            );
        } else {
            assert!(c.get("usage").is_none());
        }
        let choices = c["choices"].as_array().unwrap();
        if choices.is_empty() {
            assert_eq!(i, chunks.len() - 1, "the usage chunk is last");
            usage = Some(c["usage"].clone());
            continue;
        }
        if i > 0 {
            assert!(choices[0]["delta"].get("role").is_none(), "role only once");
        }
        if let Some(t) = choices[0]["delta"]["content"].as_str() {
            text.push_str(t);
        }
        if let Some(f) = choices[0]["finish_reason"].as_str() {
            assert!(finish.is_none(), "one finish chunk");
            assert_eq!(choices[0]["delta"], json!({}), "the finish delta is empty");
            finish = Some(f.to_string());
        }
    }
    (text, finish.expect("a finish chunk"), usage)
}

#[test]
fn probes_models_and_routes() {
    let s = Server::start(&["--model", &tiny()]);
    let r = s.get("/");
    assert_eq!((r.status, r.text.as_str()), (200, "Ollama is running"));
    let head = s.client.head(s.url("/")).send().unwrap();
    assert_eq!(head.status().as_u16(), 200);
    assert_eq!(
        s.get("/api/version").json()["version"],
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(s.get("/health").json()["status"], "ok");

    let models = s.get("/v1/models").json();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "tiny");
    assert_eq!(models["data"][0]["object"], "model");
    assert_eq!(s.get("/v1/models/tiny").json()["id"], "tiny");
    assert_eq!(s.get("/v1/models/nope").status, 404);

    let tags = s.get("/api/tags").json();
    let m = &tags["models"][0];
    assert_eq!(m["name"], "tiny");
    assert_eq!(m["details"]["format"], "safetensors");
    assert_eq!(m["details"]["family"], "llama");
    assert!(m["size"].as_u64().unwrap() > 400_000);

    let show = s.post("/api/show", &json!({"model": "tiny:latest"})).json();
    assert_eq!(show["model_info"]["general.architecture"], "llama");
    assert_eq!(show["model_info"]["llama.context_length"], 256);
    assert_eq!(show["capabilities"], json!(["completion", "tools"]));
    assert_eq!(
        s.get("/api/ps").json()["models"],
        json!([]),
        "nothing loaded before use"
    );

    let r = s.get("/v1/nothing");
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["type"], "not_found_error");
    let r = s.get("/api/nothing");
    assert_eq!(r.status, 404);
    assert!(r.json()["error"].is_string(), "Ollama's envelope off /v1");
    let r = s.get("/v1/chat/completions");
    assert_eq!(r.status, 405);
    assert!(r.headers.get("x-request-id").is_some());
    let metrics = s.get("/metrics");
    assert_eq!(metrics.status, 200);
    assert!(
        metrics.text.contains("xllm_models_loaded 0"),
        "{}",
        metrics.text
    );
}

#[test]
fn openai_chat_and_completions_on_the_tiny_model() {
    let s = Server::start(&["--model", &tiny()]);
    let body = json!({
        "model": "tiny",
        "messages": [{"role": "user", "content": "hello there ".repeat(12)}],
        "max_tokens": 12, "temperature": 0, "ignore_eos": true,
        "some_unknown_field": {"is": "ignored"},
    });
    let r = s.post("/v1/chat/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 12);
    let prompt_tokens = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens > 0);
    assert_eq!(v["usage"]["total_tokens"], prompt_tokens + 12);
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();

    let mut stream_body = body.clone();
    stream_body["stream"] = true.into();
    stream_body["stream_options"] = json!({"include_usage": true});
    let payloads = s.sse("/v1/chat/completions", &stream_body);
    let (streamed, finish, usage) = parse_chat_stream(&payloads, true);
    assert_eq!(
        streamed, text,
        "streamed text equals the reply at temperature 0"
    );
    assert_eq!(finish, "length");
    let usage = usage.expect("usage chunk");
    assert_eq!(usage["completion_tokens"], 12);
    assert_eq!(usage["prompt_tokens"], prompt_tokens);
    assert!(
        usage["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            > 0,
        "the second identical prompt reuses the prefix cache: {usage}"
    );

    // n choices, logprobs.
    let mut b = body.clone();
    b["n"] = 2.into();
    b["logprobs"] = true.into();
    b["top_logprobs"] = 3.into();
    let v = s.post("/v1/chat/completions", &b).json();
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
    assert_eq!(v["choices"][1]["index"], 1);
    assert_eq!(
        v["choices"][0]["message"]["content"],
        v["choices"][1]["message"]["content"]
    );
    let lp = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(lp.len(), 12);
    let first = &lp[0];
    assert!(first["logprob"].as_f64().unwrap() <= 0.0);
    let tops = first["top_logprobs"].as_array().unwrap();
    assert_eq!(tops.len(), 3);
    assert_eq!(
        tops[0]["logprob"], first["logprob"],
        "greedy: the chosen token is the most likely"
    );
    assert_eq!(v["usage"]["completion_tokens"], 24);

    // Completions, streamed and not.
    let cbody = json!({"model": "tiny", "prompt": "once upon a time", "max_tokens": 10,
                       "temperature": 0, "ignore_eos": true, "logprobs": 2});
    let v = s.post("/v1/completions", &cbody).json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(
        v["choices"][0]["logprobs"]["tokens"]
            .as_array()
            .unwrap()
            .len(),
        10
    );
    let ctext = v["choices"][0]["text"].as_str().unwrap().to_string();
    let mut sb = cbody.clone();
    sb["stream"] = true.into();
    let payloads = s.sse("/v1/completions", &sb);
    assert_eq!(payloads.last().unwrap(), "[DONE]");
    let mut streamed = String::new();
    for p in &payloads[..payloads.len() - 1] {
        let c: Value = serde_json::from_str(p).unwrap();
        assert_eq!(c["object"], "text_completion");
        streamed.push_str(c["choices"][0]["text"].as_str().unwrap());
    }
    assert_eq!(streamed, ctext);
    // Default max_tokens of completions is 16, as OpenAI's.
    let v = s
        .post(
            "/v1/completions",
            &json!({"model": "tiny", "prompt": "x", "temperature": 0, "ignore_eos": true}),
        )
        .json();
    assert_eq!(v["usage"]["completion_tokens"], 16);
}

#[test]
fn ollama_chat_and_generate_stream_ndjson_with_durations() {
    let s = Server::start(&["--model", &tiny()]);
    let body = json!({
        "model": "tiny:latest",
        "messages": [{"role": "user", "content": "hello"}],
        "options": {"temperature": 0, "num_predict": 6, "seed": 1},
        "stream": false,
    });
    let v = s.post("/api/chat", &body).json();
    assert_eq!(v["done"], true);
    assert_eq!(v["done_reason"], "length");
    assert_eq!(v["eval_count"], 6);
    assert!(v["total_duration"].as_u64().unwrap() >= v["eval_duration"].as_u64().unwrap());
    assert!(
        v["load_duration"].as_u64().unwrap() > 0,
        "loaded by this request"
    );
    assert!(v["prompt_eval_count"].as_u64().unwrap() > 0);
    let text = v["message"]["content"].as_str().unwrap().to_string();

    let mut b = body.clone();
    b.as_object_mut().unwrap().remove("stream");
    let (status, lines) = s.stream_lines("/api/chat", &b);
    assert_eq!(status, 200);
    let objs: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let last = objs.last().unwrap();
    assert_eq!(last["done"], true);
    assert_eq!(last["load_duration"], 0, "already loaded");
    let streamed: String = objs
        .iter()
        .map(|o| o["message"]["content"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(streamed, text);
    assert!(objs[..objs.len() - 1].iter().all(|o| o["done"] == false));

    let g = json!({"model": "tiny", "prompt": "hello", "raw": true, "stream": false,
                   "options": {"temperature": 0, "num_predict": 5}});
    let v = s.post("/api/generate", &g).json();
    assert_eq!(v["done"], true);
    assert_eq!(v["eval_count"], 5);
    let context = v["context"].as_array().unwrap();
    assert_eq!(
        context.len() as u64,
        v["prompt_eval_count"].as_u64().unwrap() + 5
    );

    let ps = s.get("/api/ps").json();
    assert_eq!(ps["models"][0]["name"], "tiny");
    assert_eq!(ps["models"][0]["context_length"], 256);

    // An empty prompt with keep_alive 0 unloads.
    let v = s
        .post("/api/generate", &json!({"model": "tiny", "keep_alive": 0}))
        .json();
    assert_eq!(v["done_reason"], "unload");
    assert_eq!(s.get("/api/ps").json()["models"], json!([]));
    let v = s.post("/api/generate", &json!({"model": "tiny"})).json();
    assert_eq!(v["done_reason"], "load");
    assert_eq!(s.get("/api/ps").json()["models"][0]["name"], "tiny");
}

#[test]
fn errors_have_the_envelopes_and_statuses_clients_expect() {
    let s = Server::start(&["--model", &tiny(), "--body-limit", "4KB"]);
    let chat = |model: &str| json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});

    let r = s.post("/v1/chat/completions", &chat("org/not-here"));
    assert_eq!(r.status, 404, "{}", r.text);
    let e = &r.json()["error"];
    assert_eq!(e["type"], "not_found_error");
    assert_eq!(e["code"], "model_not_found");
    assert!(e["message"].as_str().unwrap().contains("org/not-here"));
    let r = s.post("/api/chat", &chat("org/not-here"));
    assert_eq!(r.status, 404);
    assert!(r.json()["error"].as_str().unwrap().contains("not found"));

    // A client can never name a path, even one that is a model.
    let fixture_path = path_str(&fixture("tiny-llama"));
    for name in [
        fixture_path.as_str(),
        "../../etc/passwd",
        "/etc/passwd",
        "~/x",
    ] {
        let r = s.post("/v1/chat/completions", &chat(name));
        assert_eq!(r.status, 404, "{name}: {}", r.text);
    }
    assert_eq!(s.get("/api/ps").json()["models"], json!([]));

    let r = s.post_raw("/v1/chat/completions", b"{not json".to_vec());
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    let r = s.post_raw("/api/chat", b"[1,2".to_vec());
    assert_eq!(r.status, 400);
    assert!(r.json()["error"].is_string());

    for (field, value) in [
        ("temperature", json!(5)),
        ("top_p", json!(0)),
        ("n", json!(0)),
        ("max_tokens", json!(0)),
        ("presence_penalty", json!(3)),
        ("top_logprobs", json!(2)),
    ] {
        let mut b = chat("tiny");
        b[field] = value;
        let r = s.post("/v1/chat/completions", &b);
        assert_eq!(r.status, 400, "{field}: {}", r.text);
        assert_eq!(r.json()["error"]["param"], field, "{}", r.text);
    }
    let mut b = chat("tiny");
    b["temperature"] = json!("hot");
    assert_eq!(s.post("/v1/chat/completions", &b).status, 400);
    let r = s.post("/api/chat", &json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "options": {"temperature": -1}}));
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]
        .as_str()
        .unwrap()
        .contains("options.temperature"));

    // A prompt longer than the context, checked before any work: 400.
    let long = "word ".repeat(400);
    let r = s.post(
        "/v1/chat/completions",
        &json!({"model": "tiny", "messages": [{"role": "user", "content": long}]}),
    );
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.json()["error"]["type"], "exceed_context_size_error");
    let r = s.post(
        "/api/generate",
        &json!({"model": "tiny", "prompt": "a b c d e f g", "raw": true,
                                          "options": {"num_ctx": 3}}),
    );
    assert_eq!(r.status, 400, "{}", r.text);

    // Too large a body: 413.
    let big = json!({"model": "tiny", "messages": [{"role": "user", "content": "x".repeat(5000)}]});
    let r = s.post("/v1/chat/completions", &big);
    assert_eq!(r.status, 413, "{}", r.text);
    assert_eq!(r.json()["error"]["code"], "request_too_large");
}

#[test]
fn api_key_guards_every_route_but_health() {
    let s = Server::start(&["--model", &tiny(), "--api-key", "sekret-key"]);
    let anonymous = reqwest::blocking::Client::new();
    assert_eq!(
        anonymous
            .get(s.url("/health"))
            .send()
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    for path in ["/v1/models", "/api/tags", "/metrics", "/"] {
        let r = anonymous.get(s.url(path)).send().unwrap();
        assert_eq!(r.status().as_u16(), 401, "{path}");
        let r = anonymous
            .get(s.url(path))
            .bearer_auth("sekret-kez")
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 401, "{path} with a wrong key");
        let r = anonymous
            .get(s.url(path))
            .bearer_auth("sekret-key-longer")
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 401, "{path} with a longer key");
    }
    let r = anonymous.get(s.url("/v1/models")).send().unwrap();
    let v: Value = serde_json::from_str(&r.text().unwrap()).unwrap();
    assert_eq!(v["error"]["type"], "authentication_error");
    assert_eq!(s.get("/v1/models").status, 200, "with the key");
    // No CORS headers unless origins are configured.
    let r = s
        .client
        .get(s.url("/v1/models"))
        .bearer_auth("sekret-key")
        .header("origin", "http://evil.example")
        .send()
        .unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
}

#[test]
fn cors_only_for_configured_origins() {
    let s = Server::start(&["--model", &tiny(), "--cors-origin", "http://ui.example"]);
    let r = s
        .client
        .get(s.url("/v1/models"))
        .header("origin", "http://ui.example")
        .send()
        .unwrap();
    assert_eq!(
        r.headers()
            .get("access-control-allow-origin")
            .map(|v| v.to_str().unwrap()),
        Some("http://ui.example")
    );
    let r = s
        .client
        .get(s.url("/v1/models"))
        .header("origin", "http://evil.example")
        .send()
        .unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
}

#[test]
fn registry_unloads_least_recently_used_and_refuses_what_does_not_fit() {
    let llama = format!("llama={}", path_str(&fixture("tiny-llama")));
    let qwen2 = format!("qwen2={}", path_str(&fixture("tiny-qwen2")));
    let qwen3 = format!("qwen3={}", path_str(&fixture("tiny-qwen3")));
    let s = Server::start(&[
        "--model",
        &llama,
        "--model",
        &qwen2,
        "--model",
        &qwen3,
        "--max-models",
        "2",
    ]);
    let gen = |m: &str| {
        let r = s.post(
            "/api/generate",
            &json!({"model": m, "prompt": "hi", "raw": true, "stream": false,
                                              "options": {"num_predict": 2}}),
        );
        assert_eq!(r.status, 200, "{}", r.text);
    };
    let loaded = || -> Vec<String> {
        s.get("/api/ps").json()["models"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["name"].as_str().unwrap().to_string())
            .collect()
    };
    gen("llama");
    gen("qwen2");
    assert_eq!(loaded(), vec!["llama", "qwen2"]);
    gen("llama"); // qwen2 is now the least recently used
    gen("qwen3");
    assert_eq!(loaded(), vec!["llama", "qwen3"]);

    // A memory limit nothing fits in: a clear refusal, not an abort.
    let s = Server::start(&["--model", &llama, "--memory-limit", "1KB"]);
    let r = s.post(
        "/v1/chat/completions",
        &json!({"model": "llama", "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(r.status, 507, "{}", r.text);
    let e = &r.json()["error"];
    assert!(
        e["message"].as_str().unwrap().contains("does not fit"),
        "{e}"
    );
    assert!(
        e["message"].as_str().unwrap().contains("not enough memory"),
        "{e}"
    );
    assert_eq!(r.headers.get("x-should-retry").unwrap(), "false");
    assert_eq!(s.get("/health").status, 200, "the server is still up");
}

#[test]
fn keep_alive_unloads_after_the_last_request() {
    let s = Server::start(&["--model", &tiny(), "--keep-alive", "1s"]);
    let r = s.post(
        "/api/generate",
        &json!({"model": "tiny", "prompt": "hi", "raw": true, "stream": false,
                                          "options": {"num_predict": 2}, "keep_alive": "2s"}),
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        s.get("/api/ps").json()["models"].as_array().unwrap().len(),
        1
    );
    let t0 = Instant::now();
    while !s.get("/api/ps").json()["models"]
        .as_array()
        .unwrap()
        .is_empty()
    {
        assert!(t0.elapsed() < Duration::from_secs(15), "never unloaded");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        t0.elapsed() >= Duration::from_millis(1500),
        "kept for keep_alive"
    );
}

#[test]
fn a_full_queue_answers_503_with_retry_after() {
    let s = Server::start(&["--model", &tiny(), "--max-queue", "0"]);
    let r = s.post(
        "/v1/chat/completions",
        &json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(r.status, 503, "{}", r.text);
    assert_eq!(r.json()["error"]["type"], "unavailable_error");
    assert!(r.headers.get("retry-after").is_some());
    assert_eq!(s.metric("xllm_requests_rejected_total", "tiny"), Some(1.0));
}

#[test]
fn pull_streams_progress_and_the_model_then_serves() {
    let hub = MockHub::start();
    let dir = fixture("tiny-llama");
    let file = |p: &str, lfs: bool| RepoFile {
        path: p.into(),
        data: std::fs::read(dir.join(p)).unwrap(),
        lfs,
    };
    hub.add_repo(
        "org/tiny-llama",
        Repo {
            commit: "0123456789abcdef0123456789abcdef01234567".into(),
            files: vec![
                file("config.json", false),
                file("tokenizer.json", false),
                file("model.safetensors", true),
            ],
            ..Default::default()
        },
    );
    let s = Server::start_with(&[], &[("HF_ENDPOINT", &hub.url)], None);
    let (status, lines) = s.stream_lines("/api/pull", &json!({"model": "org/tiny-llama"}));
    assert_eq!(status, 200);
    let objs: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(objs[0]["status"], "pulling manifest");
    let weights = objs
        .iter()
        .rfind(|o| o["status"] == "pulling model.safetensors")
        .expect("progress for the weights");
    assert_eq!(weights["total"], weights["completed"]);
    assert_eq!(weights["total"], 464504);
    assert_eq!(objs.last().unwrap()["status"], "success", "{objs:?}");
    let tags = s.get("/api/tags").json();
    assert_eq!(tags["models"][0]["name"], "org/tiny-llama");
    let r = s.post(
        "/v1/chat/completions",
        &json!({"model": "org/tiny-llama", "max_tokens": 3,
        "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(r.status, 200, "{}", r.text);

    // Only Hub ids.
    for name in ["../evil", "/tmp/x", "a/b/c"] {
        let r = s.post("/api/pull", &json!({"model": name}));
        assert_eq!(r.status, 400, "{name}: {}", r.text);
    }
    let r = s.post(
        "/api/pull",
        &json!({"model": "org/missing", "stream": false}),
    );
    assert_eq!(r.status, 404, "{}", r.text);
    let (_, lines) = s.stream_lines("/api/pull", &json!({"model": "org/missing"}));
    let last: Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert!(
        last["error"].as_str().unwrap().contains("not found"),
        "{last}"
    );

    // Delete: store models only.
    let r = s
        .client
        .delete(s.url("/api/delete"))
        .body(json!({"model": "org/tiny-llama"}).to_string())
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(s.get("/api/tags").json()["models"], json!([]));
    assert_eq!(
        s.post("/api/delete", &json!({"model": "org/tiny-llama"}))
            .status,
        404
    );
}

#[test]
fn sigterm_lets_running_streams_finish_and_exits_zero() {
    // SmolLM2, long enough (a few hundred tokens) that the stream is still running when the
    // signal comes: the tiny model finishes 60 tokens in milliseconds, before a poll sees it.
    let Some(mut s) = smol_server(&["--shutdown-timeout", "300s"]) else {
        return;
    };
    let client = s.client.clone();
    let url = s.url("/v1/chat/completions");
    let body = json!({"model": "smol", "messages": [{"role": "user", "content": "hi"}],
                      "max_tokens": 200, "ignore_eos": true, "stream": true});
    let stream = std::thread::spawn(move || {
        let r = client.post(url).body(body.to_string()).send().unwrap();
        common::server::drain(r)
    });
    // Wait until the request is running.
    let t0 = Instant::now();
    while s.metric_plain("xllm_active_generations") != Some(1.0) {
        assert!(t0.elapsed() < Duration::from_secs(60), "{}", s.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = s.terminate();
    assert!(status.success(), "exit status {status:?}");
    let text = stream.join().unwrap();
    assert!(
        text.trim_end().ends_with("data: [DONE]"),
        "the stream finished: {text}"
    );
    assert!(text.contains("\"finish_reason\":\"length\""));
}

// ---- SmolLM2 ----

fn smol_server(extra: &[&str]) -> Option<Server> {
    let Some(gguf) = smollm2_gguf() else {
        eprintln!("skipped: models/smollm2 is absent (run scripts/get_smollm2.sh)");
        return None;
    };
    let model = format!("smol={}", path_str(&gguf));
    let mut args = vec!["--model", model.as_str()];
    args.extend_from_slice(extra);
    Some(Server::start(&args))
}

fn chat_text(s: &Server, body: &Value) -> (String, Value) {
    let r = s.post("/v1/chat/completions", body);
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    (
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string(),
        v,
    )
}

#[test]
fn smollm2_answers_counts_seeds_and_stops() {
    let Some(s) = smol_server(&[]) else { return };
    let q = json!({"model": "smol", "messages": [{"role": "user", "content": "What is the capital of France?"}],
                   "temperature": 0, "max_tokens": 24});
    let (text, v) = chat_text(&s, &q);
    assert!(text.split_whitespace().count() >= 4, "{text}");
    let mut sq = q.clone();
    sq["stream"] = true.into();
    let (streamed, _, _) = parse_chat_stream(&s.sse("/v1/chat/completions", &sq), false);
    assert_eq!(streamed, text);
    let completion_tokens = v["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(completion_tokens > 0 && completion_tokens <= 24);

    // Prompt tokens as llama.cpp's tokenizer counts them (tests/fixtures/smollm2_tokens.json).
    let cases: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("smollm2_tokens.json")).unwrap())
            .unwrap();
    for case in cases["cases"].as_array().unwrap().iter().take(2) {
        let v = s
            .post(
                "/v1/completions",
                &json!({"model": "smol", "prompt": case["text"], "max_tokens": 1}),
            )
            .json();
        assert_eq!(
            v["usage"]["prompt_tokens"].as_u64().unwrap() as usize,
            case["ids"].as_array().unwrap().len(),
            "{}",
            case["text"]
        );
    }

    // Seeds reproduce; different seeds (almost surely) differ.
    let sampled = |seed: u64| {
        let b = json!({"model": "smol", "messages": [{"role": "user", "content": "Tell me a story."}],
                       "temperature": 1.0, "top_p": 1.0, "max_tokens": 24, "seed": seed});
        chat_text(&s, &b).0
    };
    let a = sampled(7);
    assert_eq!(a, sampled(7));
    assert!(a != sampled(8) || a != sampled(9));

    // Stop strings end the text and are not in it, streamed or not.
    let word = text.split_whitespace().nth(2).unwrap().to_string();
    let mut stop = q.clone();
    stop["stop"] = json!([word.clone()]);
    let (cut, v) = chat_text(&s, &stop);
    assert!(!cut.contains(&word), "{cut:?} still has {word:?}");
    assert!(text.starts_with(&cut), "{cut:?} is a prefix of {text:?}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    stop["stream"] = true.into();
    let (streamed_cut, finish, _) = parse_chat_stream(&s.sse("/v1/chat/completions", &stop), false);
    assert_eq!(streamed_cut, cut);
    assert_eq!(finish, "stop");

    // Ollama: the same answer.
    let o = s
        .post(
            "/api/chat",
            &json!({"model": "smol", "stream": false,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "options": {"temperature": 0, "num_predict": 24}}),
        )
        .json();
    assert_eq!(o["message"]["content"], text.as_str());
}

#[test]
fn sixteen_concurrent_streams_equal_their_solo_answers() {
    let Some(s) = smol_server(&["--parallel", "8"]) else {
        return;
    };
    let questions: Vec<String> = (0..16)
        .map(|i| format!("Write one sentence about the number {i}."))
        .collect();
    let body = |q: &str| {
        json!({"model": "smol", "messages": [{"role": "user", "content": q}], "temperature": 0,
               "max_tokens": 32, "stream": true})
    };
    let solo: Vec<String> = questions
        .iter()
        .map(|q| parse_chat_stream(&s.sse("/v1/chat/completions", &body(q)), false).0)
        .collect();
    let s = std::sync::Arc::new(s);
    let handles: Vec<_> = questions
        .iter()
        .map(|q| {
            let s = s.clone();
            let b = body(q);
            std::thread::spawn(move || {
                parse_chat_stream(&s.sse("/v1/chat/completions", &b), false).0
            })
        })
        .collect();
    let together: Vec<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for (i, (a, b)) in solo.iter().zip(&together).enumerate() {
        assert!(!a.is_empty());
        assert_eq!(
            a, b,
            "question {i}: batched answer differs from the solo one"
        );
    }
    // The engine updates its gauges after the step that sent the last event: wait for it.
    let t0 = Instant::now();
    while s.metric("xllm_num_requests_running", "smol") != Some(0.0) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "requests still running after every stream ended"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn two_hundred_requests_with_random_disconnects_leave_nothing_running() {
    let Some(s) = smol_server(&["--parallel", "8"]) else {
        return;
    };
    let s = std::sync::Arc::new(s);
    let completed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t0 = Instant::now();
    let workers: Vec<_> = (0..10)
        .map(|w| {
            let s = s.clone();
            let completed = completed.clone();
            std::thread::spawn(move || {
                for k in 0..20 {
                    let i = w * 20 + k;
                    // A small deterministic spread of behaviours.
                    let stream = i % 3 != 0;
                    let body = json!({"model": "smol", "stream": stream, "max_tokens": 8 + (i % 5) * 6,
                        "temperature": 0.7, "seed": i,
                        "messages": [{"role": "user", "content": format!("Say something about {i}.")}]});
                    let r = s
                        .client
                        .post(s.url("/v1/chat/completions"))
                        .body(body.to_string())
                        .send()
                        .unwrap();
                    assert_eq!(r.status().as_u16(), 200);
                    if stream && i % 4 == 1 {
                        read_then_drop(r, 1 + i % 7); // gone mid-stream
                    } else {
                        let text = common::server::drain(r);
                        if stream {
                            assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
                        } else {
                            let v: Value = serde_json::from_str(&text).unwrap();
                            assert_eq!(v["object"], "chat.completion");
                        }
                        completed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let elapsed = t0.elapsed();
    eprintln!(
        "200 requests in {:.1}s, {} read to the end",
        elapsed.as_secs_f64(),
        completed.load(std::sync::atomic::Ordering::SeqCst)
    );
    let t1 = Instant::now();
    loop {
        let running = s.metric("xllm_num_requests_running", "smol");
        let waiting = s.metric("xllm_num_requests_waiting", "smol");
        let active = s.metric_plain("xllm_active_generations");
        if running == Some(0.0) && waiting == Some(0.0) && active == Some(0.0) {
            break;
        }
        assert!(
            t1.elapsed() < Duration::from_secs(10),
            "still running after the clients left: running {running:?} waiting {waiting:?} active {active:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut finished: HashMap<String, f64> = HashMap::new();
    for line in s.get("/metrics").text.lines() {
        if let Some(rest) = line.strip_prefix("xllm_request_success_total{") {
            let reason = rest
                .split("finished_reason=\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap();
            let value: f64 = rest.rsplit(' ').next().unwrap().parse().unwrap();
            finished.insert(reason.to_string(), value);
        }
    }
    let total: f64 = finished.values().sum();
    assert_eq!(
        total, 200.0,
        "every request finished exactly once: {finished:?}"
    );
    assert!(
        finished.get("cancelled").copied().unwrap_or(0.0) > 0.0,
        "disconnects cancel: {finished:?}"
    );
}
