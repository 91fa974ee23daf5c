//! Tokenizer and chat-template metadata for GGUF from a Hugging Face tokenizer.json, as
//! convert_hf_to_gguf.py writes it for byte-level BPE vocabularies (`tokenizer.ggml.model = gpt2`).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context};

use super::gguf::{Metadata, Value};

/// llama.cpp token types.
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

fn read_json(path: &Path) -> anyhow::Result<Option<serde_json::Value>> {
    match std::fs::read_to_string(path) {
        Ok(t) => {
            Ok(Some(serde_json::from_str(&t).with_context(|| {
                format!("{} is not valid JSON", path.display())
            })?))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// llama.cpp's `tokenizer.ggml.pre` name for a byte-level BPE pre-tokenizer (the regex decides
/// how text is split before merges; convert_hf_to_gguf identifies it by hashing a tokenization,
/// we recognise the patterns themselves).
fn pre_name(pre: Option<&serde_json::Value>) -> &'static str {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    // o200k (gpt-4o, gpt-oss): llama.cpp's `gpt-4o` pre-tokenizer.
    const O200K: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    let Some(pre) = pre else { return "default" };
    let mut found = Vec::new();
    collect_regexes(pre, &mut found);
    if found.iter().any(|r| r == O200K) {
        return "gpt-4o";
    }
    if found.iter().any(|r| r == LLAMA3) {
        return "llama-bpe";
    }
    if found.iter().any(|r| r == QWEN2) {
        return "qwen2";
    }
    let kind = pre.get("type").and_then(|t| t.as_str()).unwrap_or("");
    if kind == "Sequence" {
        let parts = pre
            .get("pretokenizers")
            .and_then(|p| p.as_array())
            .cloned()
            .unwrap_or_default();
        let types: Vec<&str> = parts
            .iter()
            .filter_map(|p| p.get("type").and_then(|t| t.as_str()))
            .collect();
        let digits = parts.iter().any(|p| {
            p.get("type").and_then(|t| t.as_str()) == Some("Digits")
                && p.get("individual_digits").and_then(|v| v.as_bool()) == Some(true)
        });
        if digits && types == ["Digits", "ByteLevel"] {
            return "smollm";
        }
    }
    if kind == "ByteLevel" {
        return "gpt-2";
    }
    "default"
}

fn collect_regexes(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("Regex", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => collect_regexes(x, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_regexes(x, out)),
        _ => {}
    }
}

/// Adds `tokenizer.ggml.*` and `tokenizer.chat_template` from the files in `dir`.
pub fn add_tokenizer(
    md: &mut Metadata,
    dir: &Path,
    config: &serde_json::Value,
    vocab_size: Option<u64>,
) -> anyhow::Result<()> {
    let tok_path = dir.join("tokenizer.json");
    let Some(tok) = read_json(&tok_path)? else {
        bail!(
            "{} is missing: llama.cpp needs the tokenizer in the GGUF",
            tok_path.display()
        );
    };
    let model = tok.get("model").context("tokenizer.json has no model")?;
    if model.get("type").and_then(|t| t.as_str()) != Some("BPE") {
        bail!("tokenizer.json is not a BPE tokenizer; xllm quantize writes byte-level BPE (gpt2) vocabularies only");
    }
    let vocab = model
        .get("vocab")
        .and_then(|v| v.as_object())
        .context("tokenizer.json has no model.vocab")?;
    let mut by_id: HashMap<u64, String> = HashMap::new();
    for (tok, id) in vocab {
        if let Some(id) = id.as_u64() {
            by_id.insert(id, tok.clone());
        }
    }
    let mut special: HashMap<u64, bool> = HashMap::new();
    for added in tok
        .get("added_tokens")
        .and_then(|a| a.as_array())
        .into_iter()
        .flatten()
    {
        let (Some(id), Some(content)) = (
            added.get("id").and_then(|v| v.as_u64()),
            added.get("content").and_then(|v| v.as_str()),
        ) else {
            continue;
        };
        by_id.insert(id, content.to_string());
        special.insert(
            id,
            added
                .get("special")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
        );
    }
    let max_id = by_id.keys().max().copied().unwrap_or(0);
    let n = vocab_size.unwrap_or(max_id + 1).max(max_id + 1);
    let mut tokens = Vec::with_capacity(n as usize);
    let mut types = Vec::with_capacity(n as usize);
    for id in 0..n {
        match by_id.get(&id) {
            Some(t) => {
                tokens.push(t.clone());
                types.push(match special.get(&id) {
                    Some(true) => CONTROL,
                    Some(false) => USER_DEFINED,
                    None => NORMAL,
                });
            }
            None => {
                tokens.push(format!("[PAD{id}]"));
                types.push(UNUSED);
            }
        }
    }
    let merges: Vec<String> = model
        .get("merges")
        .and_then(|m| m.as_array())
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(pair) if pair.len() == 2 => {
                Some(format!("{} {}", pair[0].as_str()?, pair[1].as_str()?))
            }
            _ => None,
        })
        .collect();
    md.set("tokenizer.ggml.model", Value::Str("gpt2".into()));
    md.set(
        "tokenizer.ggml.pre",
        Value::Str(pre_name(tok.get("pre_tokenizer")).into()),
    );
    md.set("tokenizer.ggml.tokens", Value::strings(tokens.clone()));
    md.set(
        "tokenizer.ggml.token_type",
        Value::Array(5, types.into_iter().map(Value::I32).collect()),
    );
    md.set("tokenizer.ggml.merges", Value::strings(merges));

    let tcfg = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(serde_json::Value::Null);
    let id_of = |key: &str, cfg_key: &str| -> Option<u64> {
        let by_text = tcfg
            .get(key)
            .and_then(|v| {
                v.as_str()
                    .or_else(|| v.get("content").and_then(|c| c.as_str()))
            })
            .and_then(|text| tokens.iter().position(|t| t == text))
            .map(|p| p as u64);
        by_text.or_else(|| {
            let v = config.get(cfg_key)?;
            v.as_u64().or_else(|| v.as_array()?.first()?.as_u64())
        })
    };
    for (key, cfg_key, gguf) in [
        ("bos_token", "bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token", "eos_token_id", "tokenizer.ggml.eos_token_id"),
        (
            "unk_token",
            "unk_token_id",
            "tokenizer.ggml.unknown_token_id",
        ),
        (
            "pad_token",
            "pad_token_id",
            "tokenizer.ggml.padding_token_id",
        ),
    ] {
        if let Some(id) = id_of(key, cfg_key) {
            md.set(gguf, Value::U32(id as u32));
        }
    }
    if let Some(b) = tcfg.get("add_bos_token").and_then(|v| v.as_bool()) {
        md.set("tokenizer.ggml.add_bos_token", Value::Bool(b));
    }
    if let Some(b) = tcfg.get("add_eos_token").and_then(|v| v.as_bool()) {
        md.set("tokenizer.ggml.add_eos_token", Value::Bool(b));
    }
    let template = match tcfg.get("chat_template") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .or(list.first())
            .and_then(|t| t.get("template").and_then(|s| s.as_str()))
            .map(str::to_string),
        _ => None,
    };
    let template = match template {
        Some(t) => Some(t),
        None => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
    };
    if let Some(t) = template {
        md.set("tokenizer.chat_template", Value::Str(t));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_pre_tokenizers() {
        let smol = serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]});
        assert_eq!(pre_name(Some(&smol)), "smollm");
        assert_eq!(
            pre_name(Some(&serde_json::json!({"type": "ByteLevel"}))),
            "gpt-2"
        );
        assert_eq!(pre_name(None), "default");
        // gpt-oss's tokenizer.json (o200k): a Split on this regex, then ByteLevel without one.
        let o200k = serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
             "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]});
        assert_eq!(pre_name(Some(&o200k)), "gpt-4o");
    }
}
