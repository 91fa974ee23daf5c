//! Sane bounds for the sizes model files declare, and the checks every format's validation uses.
//!
//! A value read from config.json or GGUF metadata sizes allocations and loops long before any
//! tensor is read (KV caches, RoPE tables, layer vectors), so it is checked once at load against
//! these bounds: each is far above any released model (the largest today: hidden 16384, 126
//! layers, 128 heads, vocab 262k, 10M context) and far below what would overflow or exhaust
//! memory. The error names the key and the value; callers add the file.

use std::fmt::Display;
use std::ops::RangeInclusive;

use anyhow::bail;

/// `hidden_size` / `embedding_length`.
pub const HIDDEN: RangeInclusive<usize> = 1..=1 << 17;
/// `intermediate_size` / `feed_forward_length`.
pub const INTERMEDIATE: RangeInclusive<usize> = 1..=1 << 20;
/// `num_hidden_layers` / `block_count`.
pub const LAYERS: RangeInclusive<usize> = 1..=1024;
/// Attention heads (query and key/value).
pub const HEADS: RangeInclusive<usize> = 1..=1024;
/// Dimensions per head.
pub const HEAD_DIM: RangeInclusive<usize> = 1..=4096;
/// Vocabulary entries.
pub const VOCAB: RangeInclusive<usize> = 1..=1 << 24;
/// Context length, trained or original (RoPE scaling), and attention windows.
pub const CONTEXT: RangeInclusive<usize> = 1..=1 << 24;
/// Mixture-of-experts: experts per layer.
pub const EXPERTS: RangeInclusive<usize> = 1..=4096;

/// `value` of `key` must lie in `range`.
pub fn check_range(key: &str, value: usize, range: &RangeInclusive<usize>) -> anyhow::Result<()> {
    if !range.contains(&value) {
        bail!(
            "{key} = {value} is out of range (expected {} to {})",
            range.start(),
            range.end()
        );
    }
    Ok(())
}

/// A float that must be finite and satisfy `ok`; `expected` says what was expected.
pub fn check_float(
    key: &str,
    value: f64,
    ok: impl Fn(f64) -> bool,
    expected: &str,
) -> anyhow::Result<()> {
    if !value.is_finite() || !ok(value) {
        bail!("{key} = {value} is invalid (expected {expected})");
    }
    Ok(())
}

/// `a` must be a multiple of `b` (both already known to be positive).
pub fn check_multiple(
    key_a: &str,
    a: usize,
    key_b: &str,
    b: usize,
    why: impl Display,
) -> anyhow::Result<()> {
    if b == 0 || a % b != 0 {
        bail!("{key_a} = {a} must be a multiple of {key_b} = {b} ({why})");
    }
    Ok(())
}

/// The keys of a JSON object that must hold non-negative integers when present: serde's own
/// error for `"hidden_size": 1e30` or `-1` does not say which field it was.
pub fn check_json_integers(value: &serde_json::Value, keys: &[&str]) -> anyhow::Result<()> {
    for key in keys {
        match value.get(*key) {
            None | Some(serde_json::Value::Null) => {}
            Some(v) if v.as_u64().is_some() => {}
            Some(v) => bail!("{key} = {v} is invalid (expected a non-negative integer)"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_key_and_value() {
        let e = check_range("num_key_value_heads", 0, &HEADS).unwrap_err();
        assert_eq!(
            e.to_string(),
            "num_key_value_heads = 0 is out of range (expected 1 to 1024)"
        );
        let e = check_float("rms_norm_eps", f64::NAN, |v| v >= 0.0, "≥ 0").unwrap_err();
        assert!(e.to_string().contains("rms_norm_eps = NaN"), "{e}");
        let e = check_json_integers(&serde_json::json!({"vocab_size": 1e30}), &["vocab_size"])
            .unwrap_err();
        assert!(e.to_string().contains("vocab_size = 1e+30"), "{e}");
        assert!(check_multiple("heads", 6, "kv", 4, "grouped attention").is_err());
        assert!(check_multiple("heads", 8, "kv", 4, "grouped attention").is_ok());
    }
}
