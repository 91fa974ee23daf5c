//! Checks on tokenizer.json before the `tokenizers` crate sees it, for the malformed files that
//! make it panic later instead of failing to load: a post-processor template naming a special
//! token it does not define, a SentencePiece `precompiled_charsmap` whose trie points outside
//! itself. Plus what tokenizing a text may cost: the worst-case growth of the text through the
//! normalizer, so a normalizer that multiplies each character ten-thousandfold is refused
//! before it allocates gigabytes.

use anyhow::{bail, Context};
use base64::Engine;
use serde_json::Value;

/// Bytes a normalized text may reach: enough for any real normalizer on long documents.
pub const MAX_NORMALIZED_BASE: usize = 64 << 20;
/// Largest text tokenized at once.
pub const MAX_ENCODE_BYTES: usize = 256 << 20;

/// Checks `json` (a parsed tokenizer.json); the error names the part that is wrong.
pub fn check_tokenizer_json(json: &Value) -> anyhow::Result<()> {
    if let Some(p) = json.get("post_processor").filter(|p| !p.is_null()) {
        check_post_processor(p).context("in post_processor")?;
    }
    if let Some(n) = json.get("normalizer").filter(|n| !n.is_null()) {
        for_each_normalizer(n, &mut |n| {
            if n.get("type").and_then(Value::as_str) == Some("Precompiled") {
                let map = n
                    .get("precompiled_charsmap")
                    .and_then(Value::as_str)
                    .context("a Precompiled normalizer without precompiled_charsmap")?;
                check_precompiled_charsmap(map).context("in normalizer.precompiled_charsmap")?;
            }
            Ok(())
        })?;
    }
    Ok(())
}

fn for_each_normalizer(
    n: &Value,
    f: &mut dyn FnMut(&Value) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    if n.get("type").and_then(Value::as_str) == Some("Sequence") {
        for inner in n
            .get("normalizers")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            for_each_normalizer(inner, f)?;
        }
        return Ok(());
    }
    f(n)
}

/// Every special token a `TemplateProcessing` template names must be defined in its
/// `special_tokens`, with as many ids as tokens.
fn check_post_processor(p: &Value) -> anyhow::Result<()> {
    match p.get("type").and_then(Value::as_str) {
        Some("Sequence") => {
            for inner in p
                .get("processors")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                check_post_processor(inner)?;
            }
        }
        Some("TemplateProcessing") => {
            let specials = p.get("special_tokens").and_then(Value::as_object);
            for (name, special) in specials.into_iter().flatten() {
                let ids = special.get("ids").and_then(Value::as_array).map(Vec::len);
                let tokens = special
                    .get("tokens")
                    .and_then(Value::as_array)
                    .map(Vec::len);
                if ids != tokens {
                    bail!("special token {name:?} has {ids:?} ids for {tokens:?} tokens");
                }
            }
            for part in ["single", "pair"] {
                for piece in p.get(part).and_then(Value::as_array).into_iter().flatten() {
                    if let Some(id) = piece
                        .get("SpecialToken")
                        .and_then(|s| s.get("id"))
                        .and_then(Value::as_str)
                    {
                        if !specials.is_some_and(|s| s.contains_key(id)) {
                            bail!(
                                "the {part} template uses the special token {id:?}, which special_tokens does not define"
                            );
                        }
                    }
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// A SentencePiece charsmap (`[u32 trie bytes][trie: u32 units][normalized strings]`), as
/// `spm_precompiled` reads it: every trie node reachable from the root by any byte sequence must
/// lie inside the trie, and every value it yields must start a string inside the normalized
/// blob at a character boundary. `spm_precompiled` indexes both without checking.
fn check_precompiled_charsmap(b64: &str) -> anyhow::Result<()> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .context("not valid base64")?;
    if bytes.len() < 4 {
        bail!("{} bytes is too short", bytes.len());
    }
    let trie_bytes = u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
    if trie_bytes % 4 != 0 || trie_bytes == 0 || 4 + trie_bytes > bytes.len() {
        bail!(
            "the trie size {trie_bytes} does not fit the {} bytes",
            bytes.len()
        );
    }
    let units: Vec<usize> = bytes[4..4 + trie_bytes]
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()) as usize)
        .collect();
    let normalized = std::str::from_utf8(&bytes[4 + trie_bytes..])
        .context("the normalized strings are not UTF-8")?;
    // The unit layout of darts-clone (spm_precompiled's ArrayUnitTrait).
    let has_leaf = |u: usize| (u >> 8) & 1 == 1;
    let value = |u: usize| u & ((1usize << 31) - 1);
    let label = |u: usize| u & ((1usize << 31) | 0xFF);
    let offset = |u: usize| (u >> 10) << ((u & (1usize << 9)) >> 6);
    let unit = |pos: usize| {
        units
            .get(pos)
            .copied()
            .with_context(|| format!("a trie node points to unit {pos} of {}", units.len()))
    };
    let check_value = |v: usize| -> anyhow::Result<()> {
        if v > normalized.len() || !normalized.is_char_boundary(v) {
            bail!(
                "a trie value points to byte {v} of {} normalized bytes",
                normalized.len()
            );
        }
        Ok(())
    };
    // Walk every state reachable from the root: states are node positions after `^= offset`.
    let mut seen = vec![false; units.len()];
    let root = unit(0)?;
    let mut stack = vec![offset(root)];
    while let Some(node) = stack.pop() {
        for c in 1..=255usize {
            let pos = node ^ c;
            let Some(&u) = units.get(pos) else {
                bail!("a trie node points to unit {pos} of {}", units.len());
            };
            if label(u) != c {
                continue;
            }
            let next = pos ^ offset(u);
            if has_leaf(u) {
                check_value(value(unit(next)?))?;
            }
            if next < seen.len() && !seen[next] {
                seen[next] = true;
                stack.push(next);
            } else if next >= seen.len() {
                // Its children are looked up from here: at least one must be in range to
                // continue, and out-of-range lookups panic in spm_precompiled.
                bail!("a trie node points to unit {next} of {}", units.len());
            }
        }
    }
    Ok(())
}

/// Bytes of the longest replacement string in a charsmap (0 when it does not decode).
fn charsmap_longest_entry(b64: &str) -> usize {
    let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(b64) else {
        return 0;
    };
    let trie = bytes
        .get(..4)
        .map_or(0, |b| u32::from_le_bytes(b.try_into().unwrap()) as usize);
    bytes
        .get(4 + trie..)
        .unwrap_or_default()
        .split(|b| *b == 0)
        .map(<[u8]>::len)
        .max()
        .unwrap_or(0)
}

/// An upper bound on how many bytes the normalizer `n` can make of one input byte.
pub fn normalizer_growth(n: &Value) -> f64 {
    let kind = n.get("type").and_then(Value::as_str).unwrap_or("");
    let str_len = |key: &str| n.get(key).and_then(Value::as_str).map_or(0, str::len) as f64;
    match kind {
        "Sequence" => n
            .get("normalizers")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(normalizer_growth)
            .product(),
        // A pattern may match the empty string: one content per position.
        "Replace" => str_len("content") + 1.0,
        "Prepend" => str_len("prepend") + 1.0,
        // One grapheme becomes at most the longest string of the map.
        "Precompiled" => n
            .get("precompiled_charsmap")
            .and_then(Value::as_str)
            .map_or(16.0, |m| charsmap_longest_entry(m) as f64 + 1.0),
        "NFKC" | "NFKD" => 11.0,
        "NFC" | "NFD" => 4.0,
        "Lowercase" => 3.0,
        "BertNormalizer" => 6.0,
        "ByteLevel" => 2.0,
        "Strip" | "StripAccents" => 1.0,
        _ => 16.0,
    }
}

/// The most bytes normalizing a `text_len`-byte text may produce before it is refused.
pub fn normalized_limit(text_len: usize) -> usize {
    MAX_NORMALIZED_BASE.saturating_add(text_len.saturating_mul(4))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn undefined_special_tokens_in_templates_are_refused() {
        let t = json!({"post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [], "special_tokens": {}}});
        let e = format!("{:#}", check_tokenizer_json(&t).unwrap_err());
        assert!(e.contains("\"<s>\"") && e.contains("post_processor"), "{e}");
        let ok = json!({"post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}],
            "pair": [], "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}});
        check_tokenizer_json(&ok).unwrap();
    }

    #[test]
    fn broken_charsmaps_are_refused() {
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        for bad in [
            b64(&[1, 2]),
            b64(&[255, 255, 255, 0, 1, 2, 3, 4]),
            // A one-unit trie whose root offset sends every byte outside it.
            b64(&[4, 0, 0, 0, 0, 4, 0, 0]),
        ] {
            let t = json!({"normalizer": {"type": "Precompiled", "precompiled_charsmap": bad}});
            let e = format!("{:#}", check_tokenizer_json(&t).unwrap_err());
            assert!(e.contains("precompiled_charsmap"), "{e}");
        }
    }

    #[test]
    fn growth_multiplies_through_sequences() {
        let n = json!({"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]});
        assert_eq!(normalizer_growth(&n), 16.0);
        let hostile =
            json!({"type": "Replace", "pattern": {"Regex": "."}, "content": "x".repeat(10000)});
        assert_eq!(normalizer_growth(&hostile), 10001.0);
    }
}
