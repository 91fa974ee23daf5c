//! The tokenizer we build from GGUF metadata against the reference token ids llama.cpp produced
//! for the same GGUF (tests/fixtures/smollm2_tokens.json, made by scripts/make_smollm2_reference.py).
//! Needs models/smollm2/ (scripts/get_smollm2.sh); skipped with a note when it is absent.

use std::path::PathBuf;

use xllm::engine::tokenizer::TextTokenizer;
use xllm::model::gguf::GgufFile;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn smollm2_gguf() -> Option<PathBuf> {
    let dir = root().join("models/smollm2");
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "gguf"))
}

#[test]
fn gguf_tokenizer_matches_llama_cpp() {
    let Some(path) = smollm2_gguf() else {
        eprintln!("skipped: models/smollm2/*.gguf absent (run scripts/get_smollm2.sh)");
        return;
    };
    let file = GgufFile::open(&path).unwrap();
    let tok = TextTokenizer::from_gguf(&file).unwrap();
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/smollm2_tokens.json")).unwrap(),
    )
    .unwrap();
    for case in reference["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let expected: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(ids, expected, "tokens of {text:?}");
        assert_eq!(
            tok.decode(&ids)
                .unwrap()
                .replace("<|im_start|>", "")
                .replace("<|im_end|>", ""),
            text.replace("<|im_start|>", "").replace("<|im_end|>", "")
        );
    }
    assert_eq!(tok.eos_ids, vec![2]);
    assert!(tok
        .chat_template
        .as_deref()
        .unwrap()
        .contains("<|im_start|>"));
}

/// Gemma 3 270M (a 262144-token SentencePiece vocabulary read from GGUF metadata, with
/// user-defined whitespace tokens and byte fallback) against llama.cpp's ids
/// (tests/fixtures/gemma3/tokens.json, made by tests/fixtures/gemma3/make_tokens.py).
/// Needs models/gemma3/ (scripts/get_gemma3.sh); skipped with a note when it is absent.
#[test]
fn sentencepiece_gguf_tokenizer_matches_llama_cpp() {
    let path = root().join("models/gemma3/gemma-3-270m-q4_k_m.gguf");
    if !path.is_file() {
        eprintln!(
            "skipped: {} absent (run scripts/get_gemma3.sh)",
            path.display()
        );
        return;
    }
    let fixture = root().join("tests/fixtures/gemma3/tokens.json");
    if !fixture.is_file() {
        eprintln!(
            "skipped: {} absent (tests/fixtures/gemma3/make_tokens.py)",
            fixture.display()
        );
        return;
    }
    let file = GgufFile::open(&path).unwrap();
    let tok = TextTokenizer::from_gguf(&file).unwrap();
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture).unwrap()).unwrap();
    let mut mismatches = Vec::new();
    for case in reference["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let expected: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let ids = tok.encode(text, true).unwrap();
        if ids != expected {
            mismatches.push(format!("{text:?}:\n  ours  {ids:?}\n  llama {expected:?}"));
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
    assert_eq!(tok.bos_id, Some(2));
    assert!(tok.is_eos(1), "<eos> ends generation");
    assert_eq!(
        tok.decode(&tok.encode("Hello  world\n", true).unwrap())
            .unwrap(),
        "Hello  world\n"
    );
}
