//! Grammar-constrained decoding in the engine, on the real SmolLM2 (GGUF byte-level BPE) and
//! Gemma 3 (GGUF SentencePiece) when scripts/get_smollm2.sh / get_gemma3.sh have run: the token
//! bytes llguidance sees agree with what the tokenizer decodes, constrained sequences inside a
//! continuous batch follow their grammars while an unconstrained neighbour is unchanged, the
//! grammar's end is finish reason `stop`, and unsupported schema keywords are refused by name.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{json, Value};
use xllm::engine::chat_template::Message;
use xllm::engine::generate::FinishReason;
use xllm::engine::request::GenerationRequest;
use xllm::engine::sampler::SamplingParams;
use xllm::engine::scheduler::{collecting_sink, EngineConfig, Scheduler};
use xllm::engine::session::{self, ChatOptions, ModelSession, OpenOptions};
use xllm::engine::structured::{token_bytes, Grammar};

fn open(model: &std::path::Path) -> Arc<ModelSession> {
    let options = OpenOptions {
        device: Some("cpu".into()),
        ctx: Some(1024),
        ..OpenOptions::default()
    };
    Arc::new(session::open(&model.display().to_string(), &options).unwrap())
}

fn gemma3() -> Option<PathBuf> {
    let p =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/gemma3/gemma-3-270m-q4_k_m.gguf");
    p.is_file().then_some(p)
}

/// Every token whose text decodes cleanly stands for exactly those bytes (SentencePiece decoders
/// drop the leading space of a text, so a `▁word` token may decode without it).
fn check_token_bytes(session: &ModelSession) {
    let tokenizer = &session.loaded.tokenizer;
    let vocab = session.info().vocab_size;
    let bytes = token_bytes(tokenizer, vocab).unwrap();
    assert!(bytes.len() >= vocab);
    let (mut checked, mut special) = (0, 0);
    for (id, b) in bytes.iter().enumerate().take(tokenizer.vocab_size()) {
        if b.first() == Some(&0xFF) {
            special += 1;
            continue;
        }
        let text = tokenizer.decode(&[id as u32]).unwrap();
        if text.contains('\u{FFFD}') || b.is_empty() {
            continue;
        }
        let spaced = format!(" {text}");
        assert!(
            b.as_slice() == text.as_bytes() || b.as_slice() == spaced.as_bytes(),
            "token {id}: bytes {:?}, decodes to {text:?}",
            String::from_utf8_lossy(b)
        );
        checked += 1;
    }
    assert!(
        checked > vocab / 2,
        "only {checked} of {vocab} tokens checked"
    );
    assert!(
        special > 0,
        "control tokens carry llguidance's special marker"
    );
}

fn prompt(session: &ModelSession, text: &str) -> Vec<u32> {
    session
        .chat_prompt(&[Message::new("user", text)], ChatOptions::default())
        .unwrap()
}

fn greedy() -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        ..SamplingParams::default()
    }
}

#[test]
fn smollm2_token_bytes_match_the_tokenizer() {
    let Some(gguf) = common::smollm2::smollm2_gguf() else {
        eprintln!("skipped: models/smollm2 absent (scripts/get_smollm2.sh)");
        return;
    };
    check_token_bytes(&open(&gguf));
}

#[test]
fn gemma3_sentencepiece_token_bytes_match_the_tokenizer() {
    let Some(gguf) = gemma3() else {
        eprintln!("skipped: models/gemma3 absent (scripts/get_gemma3.sh)");
        return;
    };
    let session = open(&gguf);
    check_token_bytes(&session);
    // A schema-constrained answer on a SentencePiece vocabulary parses.
    let mut scheduler = Scheduler::new(session.clone(), EngineConfig::for_sequences(1, 1024));
    let schema = json!({"type": "object", "properties": {"animal": {"enum": ["cat", "dog"]}, "legs": {"type": "integer", "minimum": 0, "maximum": 8}}, "required": ["animal", "legs"], "additionalProperties": false});
    let mut r = GenerationRequest::new(prompt(&session, "Describe a pet."), greedy());
    r.max_tokens = Some(60);
    r.constraint = Some(session.compile(&Grammar::JsonSchema(schema)).unwrap());
    let (sink, out) = collecting_sink();
    scheduler.submit(r, sink).unwrap();
    scheduler.run_to_completion().unwrap();
    let out = out.lock().unwrap().clone();
    let v: Value = serde_json::from_str(&out.text).unwrap_or_else(|e| panic!("{e}: {}", out.text));
    assert!(
        ["cat", "dog"].contains(&v["animal"].as_str().unwrap()),
        "{v}"
    );
    assert!((0..=8).contains(&v["legs"].as_i64().unwrap()), "{v}");
    assert_eq!(out.finish, Some(FinishReason::Stop));
}

#[test]
fn constrained_sequences_share_a_batch_with_an_unconstrained_one() {
    let Some(gguf) = common::smollm2::smollm2_gguf() else {
        eprintln!("skipped: models/smollm2 absent (scripts/get_smollm2.sh)");
        return;
    };
    let session = open(&gguf);
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 18, "maximum": 99},
            "score": {"type": "number", "minimum": 0.5, "maximum": 1.5},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 2, "maxItems": 2},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}
        },
        "required": ["name", "age", "score", "tags", "zip"],
        "additionalProperties": false
    });
    let grammars = [
        Grammar::JsonSchema(schema),
        Grammar::Regex("(yes|no), because [a-z ]{1,30}\\.".into()),
        Grammar::Lark("start: \"Answer: \" NUMBER\nNUMBER: /[0-9]{1,3}/\n".into()),
        Grammar::JsonObject,
    ];
    let question = prompt(&session, "Tell me about a person you know.");
    // The unconstrained answer alone, then the same request inside a batch of constrained ones.
    let run = |with_constrained: bool| {
        let mut scheduler = Scheduler::new(session.clone(), EngineConfig::for_sequences(5, 1024));
        let mut outs = Vec::new();
        let mut free = GenerationRequest::new(question.clone(), greedy());
        free.max_tokens = Some(24);
        let (sink, out) = collecting_sink();
        scheduler.submit(free, sink).unwrap();
        outs.push(out);
        if with_constrained {
            for (i, g) in grammars.iter().enumerate() {
                let sampling = SamplingParams {
                    temperature: 0.9,
                    seed: 7 + i as u64,
                    ..SamplingParams::default()
                };
                let mut r = GenerationRequest::new(question.clone(), sampling);
                r.max_tokens = Some(120);
                r.constraint = Some(session.compile(g).unwrap());
                let (sink, out) = collecting_sink();
                scheduler.submit(r, sink).unwrap();
                outs.push(out);
            }
        }
        scheduler.run_to_completion().unwrap();
        outs.into_iter()
            .map(|o| o.lock().unwrap().clone())
            .collect::<Vec<_>>()
    };
    let alone = run(false);
    let batch = run(true);
    assert_eq!(
        batch[0].tokens, alone[0].tokens,
        "the unconstrained neighbour is unchanged"
    );
    for (g, out) in grammars.iter().zip(&batch[1..]) {
        assert!(out.error.is_none(), "{g:?}: {:?}", out.error);
        assert_eq!(out.finish, Some(FinishReason::Stop), "{g:?}: {}", out.text);
    }
    let v: Value =
        serde_json::from_str(&batch[1].text).unwrap_or_else(|e| panic!("{e}: {}", batch[1].text));
    assert!(v["name"].as_str().unwrap().chars().count() <= 20, "{v}");
    assert!((18..=99).contains(&v["age"].as_i64().unwrap()), "{v}");
    let score = v["score"].as_f64().unwrap();
    assert!((0.5..=1.5).contains(&score), "{v}");
    let tags = v["tags"].as_array().unwrap();
    assert!(
        tags.len() == 2
            && tags
                .iter()
                .all(|t| ["a", "b", "c"].contains(&t.as_str().unwrap())),
        "{v}"
    );
    let zip = v["zip"].as_str().unwrap();
    assert!(
        zip.len() == 5 && zip.bytes().all(|b| b.is_ascii_digit()),
        "{v}"
    );
    assert_eq!(v.as_object().unwrap().len(), 5, "{v}");

    let text = &batch[2].text;
    let rest = text
        .strip_prefix("yes, because ")
        .or_else(|| text.strip_prefix("no, because "))
        .unwrap_or_else(|| panic!("regex: {text:?}"));
    let body = rest.strip_suffix('.').unwrap();
    assert!(
        !body.is_empty()
            && body.len() <= 30
            && body.chars().all(|c| c.is_ascii_lowercase() || c == ' '),
        "{text:?}"
    );

    let number = batch[3]
        .text
        .strip_prefix("Answer: ")
        .unwrap_or_else(|| panic!("{:?}", batch[3].text));
    assert!(
        !number.is_empty() && number.len() <= 3 && number.bytes().all(|b| b.is_ascii_digit()),
        "{number:?}"
    );

    let obj: Value =
        serde_json::from_str(&batch[4].text).unwrap_or_else(|e| panic!("{e}: {}", batch[4].text));
    assert!(obj.is_object());
}

#[test]
fn unsupported_schema_keywords_and_bad_grammars_are_refused_by_name() {
    let Some(gguf) = common::smollm2::smollm2_gguf() else {
        eprintln!("skipped: models/smollm2 absent (scripts/get_smollm2.sh)");
        return;
    };
    let session = open(&gguf);
    let err = session
        .compile(&Grammar::JsonSchema(
            json!({"type": "array", "items": {"type": "integer"}, "uniqueItems": true}),
        ))
        .unwrap_err()
        .to_string();
    assert!(err.contains("uniqueItems"), "{err}");
    let err = session
        .compile(&Grammar::JsonSchema(
            json!({"type": "object", "not": {"required": ["a"]}}),
        ))
        .unwrap_err()
        .to_string();
    assert!(err.contains("not"), "{err}");
    let err = session
        .compile(&Grammar::JsonSchema(
            json!({"type": "string", "format": "ipv9"}),
        ))
        .unwrap_err()
        .to_string();
    assert!(err.contains("ipv9"), "{err}");
    let err = session
        .compile(&Grammar::Lark("start: undefined_rule\n".into()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("undefined_rule"), "{err}");
    assert!(session
        .compile(&Grammar::Regex("(unclosed".into()))
        .is_err());
}
