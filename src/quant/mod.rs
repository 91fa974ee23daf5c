//! Quantization profiles: the `:token` after a model name.
//!
//! Two families, never mixed: KV-cache profiles (`kv_int8`, `kv_fp8`) apply to safetensors models,
//! GGUF weight types (`Q4_K_M`, ...) select a file of a GGUF repo. Resolution order is
//! name suffix, then the manifest's recorded quantization (GGUF), then none. There is no silent
//! fallback: a malformed token is [`QuantError::Invalid`], a well-formed one that does not apply
//! to the model or device is [`QuantError::Unsupported`].

use std::fmt;

/// How the KV cache stores keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvProfile {
    /// Unquantized: the compute dtype (f32 on CPU, bf16/f16 on GPU).
    Default,
    /// Symmetric int8 with one f16 scale per token per KV head.
    KvInt8,
    /// FP8 E4M3 with one f16 scale per token per KV head.
    KvFp8,
}

impl KvProfile {
    /// Quantized profiles a safetensors model may request by suffix.
    pub const QUANTIZED: [KvProfile; 2] = [KvProfile::KvInt8, KvProfile::KvFp8];

    pub fn token(self) -> &'static str {
        match self {
            KvProfile::Default => "default",
            KvProfile::KvInt8 => "kv_int8",
            KvProfile::KvFp8 => "kv_fp8",
        }
    }

    /// Bytes of KV cache one token needs in this profile: K and V for every layer and KV head,
    /// `head_dim` elements each, plus the per-token per-head scale of quantized profiles.
    /// `default_elem_bytes` is the element size of the unquantized cache (2 for bf16/f16, 4 for f32).
    pub fn kv_bytes_per_token(
        self,
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        default_elem_bytes: usize,
    ) -> usize {
        let per_head = match self {
            KvProfile::Default => head_dim * default_elem_bytes,
            KvProfile::KvInt8 | KvProfile::KvFp8 => head_dim + KV_SCALE_BYTES,
        };
        2 * layers * kv_heads * per_head
    }
}

/// Size of one quantization scale in the KV cache (stored as f16).
pub const KV_SCALE_BYTES: usize = 2;

impl fmt::Display for KvProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.token())
    }
}

/// GGUF weight types users can name in a tag (llama.cpp's file-type names).
pub const GGUF_TYPES: &[&str] = &[
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q2_K_S", "Q3_K_S",
    "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "IQ1_S", "IQ1_M",
    "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M", "IQ4_NL",
    "IQ4_XS", "TQ1_0", "TQ2_0", "MXFP4",
];

/// A well-formed quantization token.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum QuantToken {
    Kv(KvProfile),
    /// A GGUF type in canonical upper case, e.g. `Q4_K_M`.
    Gguf(String),
}

impl fmt::Display for QuantToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QuantToken::Kv(p) => f.write_str(p.token()),
            QuantToken::Gguf(t) => f.write_str(t),
        }
    }
}

/// Why a quantization token was refused. Both messages name what would work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantError {
    #[error("invalid quantization '{token}': expected one of kv_int8, kv_fp8 (safetensors models) or a GGUF type ({})", GGUF_TYPES.join(", "))]
    Invalid { token: String },
    #[error("unsupported quantization '{token}' for {subject}: {reason}; {alternatives}")]
    Unsupported {
        token: String,
        /// What it was applied to, e.g. `model 'org/name' (gguf)` or `device cuda:0`.
        subject: String,
        reason: String,
        /// What would work, e.g. `available: Q4_K_M, Q8_0`.
        alternatives: String,
    },
}

impl QuantToken {
    /// Parses the text after `:`. Case-insensitive; `-` and `_` are not interchangeable.
    pub fn parse(token: &str) -> Result<QuantToken, QuantError> {
        let invalid = || QuantError::Invalid {
            token: token.to_string(),
        };
        let lower = token.to_ascii_lowercase();
        match lower.as_str() {
            "kv_int8" => return Ok(QuantToken::Kv(KvProfile::KvInt8)),
            "kv_fp8" => return Ok(QuantToken::Kv(KvProfile::KvFp8)),
            _ => {}
        }
        let upper = token.to_ascii_uppercase();
        if GGUF_TYPES.contains(&upper.as_str()) {
            Ok(QuantToken::Gguf(upper))
        } else {
            Err(invalid())
        }
    }
}

/// What a model offers, as far as quantization profiles are concerned.
#[derive(Debug, Clone)]
pub struct QuantTarget {
    /// How to name the model in messages, e.g. `model 'org/name' (gguf)`.
    pub subject: String,
    pub format: crate::store::ModelFormat,
    /// KV-cache profiles the model supports (safetensors models).
    pub kv_profiles: Vec<KvProfile>,
    /// GGUF weight types available locally or in the repo (GGUF models), canonical upper case.
    pub gguf_types: Vec<String>,
    /// The GGUF type recorded as the default in the manifest, used when the name has no suffix.
    pub default_gguf_type: Option<String>,
}

/// The outcome of profile resolution: what the loader must use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantChoice {
    pub kv_profile: KvProfile,
    /// The GGUF weight type to load (GGUF models only).
    pub gguf_type: Option<String>,
}

impl QuantTarget {
    /// The tokens that would work for this model, for error messages.
    pub fn alternatives(&self) -> String {
        match self.format {
            crate::store::ModelFormat::Safetensors => {
                let kv: Vec<&str> = self
                    .kv_profiles
                    .iter()
                    .filter(|p| **p != KvProfile::Default)
                    .map(|p| p.token())
                    .collect();
                if kv.is_empty() {
                    "this model supports no quantization suffix".to_string()
                } else {
                    format!("available: {} (or no suffix)", kv.join(", "))
                }
            }
            crate::store::ModelFormat::Gguf => {
                if self.gguf_types.is_empty() {
                    "no GGUF types are available".to_string()
                } else {
                    format!("available: {}", self.gguf_types.join(", "))
                }
            }
        }
    }
}

/// Resolves the profile for `target`: the name suffix if given, else the manifest's recorded
/// quantization (GGUF), else none. Never falls back silently: a suffix that does not apply is an
/// [`QuantError::Unsupported`] naming what would work.
pub fn resolve(
    token: Option<&QuantToken>,
    target: &QuantTarget,
) -> Result<QuantChoice, QuantError> {
    use crate::store::ModelFormat;
    let unsupported = |token: &QuantToken, reason: String| QuantError::Unsupported {
        token: token.to_string(),
        subject: target.subject.clone(),
        reason,
        alternatives: target.alternatives(),
    };
    match (target.format, token) {
        (ModelFormat::Safetensors, None) => Ok(QuantChoice {
            kv_profile: KvProfile::Default,
            gguf_type: None,
        }),
        (ModelFormat::Safetensors, Some(t @ QuantToken::Kv(p))) => {
            if target.kv_profiles.contains(p) {
                Ok(QuantChoice {
                    kv_profile: *p,
                    gguf_type: None,
                })
            } else {
                Err(unsupported(
                    t,
                    "this model has no attention KV cache that profile applies to".to_string(),
                ))
            }
        }
        (ModelFormat::Safetensors, Some(t @ QuantToken::Gguf(_))) => Err(unsupported(
            t,
            "GGUF weight types select a file of a GGUF repo, and this model is safetensors"
                .to_string(),
        )),
        (ModelFormat::Gguf, Some(t @ QuantToken::Kv(_))) => Err(unsupported(
            t,
            "KV-cache profiles apply to safetensors models only".to_string(),
        )),
        (ModelFormat::Gguf, Some(t @ QuantToken::Gguf(name))) => {
            if target.gguf_types.iter().any(|a| a == name) {
                Ok(QuantChoice {
                    kv_profile: KvProfile::Default,
                    gguf_type: Some(name.clone()),
                })
            } else {
                Err(unsupported(t, format!("no {name} file is available")))
            }
        }
        (ModelFormat::Gguf, None) => {
            let chosen = target
                .default_gguf_type
                .clone()
                .or_else(|| (target.gguf_types.len() == 1).then(|| target.gguf_types[0].clone()));
            Ok(QuantChoice {
                kv_profile: KvProfile::Default,
                gguf_type: chosen,
            })
        }
    }
}

/// Finds the GGUF type named in a file name (case-insensitive, on word boundaries so that `F16`
/// does not match `BF16` and `Q4_0` does not match `Q4_0_4_4`). The longest match wins.
pub fn gguf_type_in_file_name(file_name: &str) -> Option<&'static str> {
    let base = file_name.rsplit('/').next().unwrap_or(file_name);
    let upper = base.to_ascii_uppercase();
    let bytes = upper.as_bytes();
    let mut best: Option<&'static str> = None;
    for ty in GGUF_TYPES {
        let mut start = 0;
        while let Some(pos) = upper[start..].find(ty) {
            let at = start + pos;
            let end = at + ty.len();
            let before_ok = at == 0 || !bytes[at - 1].is_ascii_alphanumeric();
            let after_ok =
                end == bytes.len() || !(bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_');
            if before_ok && after_ok && best.is_none_or(|b| b.len() < ty.len()) {
                best = Some(ty);
            }
            start = at + 1;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ModelFormat;

    fn safetensors() -> QuantTarget {
        QuantTarget {
            subject: "model 'org/m' (safetensors)".into(),
            format: ModelFormat::Safetensors,
            kv_profiles: vec![KvProfile::Default, KvProfile::KvInt8, KvProfile::KvFp8],
            gguf_types: vec![],
            default_gguf_type: None,
        }
    }

    fn gguf() -> QuantTarget {
        QuantTarget {
            subject: "model 'org/m-GGUF' (gguf)".into(),
            format: ModelFormat::Gguf,
            kv_profiles: vec![KvProfile::Default],
            gguf_types: vec!["Q4_K_M".into(), "Q8_0".into()],
            default_gguf_type: Some("Q4_K_M".into()),
        }
    }

    #[test]
    fn parses_kv_and_gguf_tokens_case_insensitively() {
        assert_eq!(
            QuantToken::parse("kv_int8").unwrap(),
            QuantToken::Kv(KvProfile::KvInt8)
        );
        assert_eq!(
            QuantToken::parse("KV_FP8").unwrap(),
            QuantToken::Kv(KvProfile::KvFp8)
        );
        assert_eq!(
            QuantToken::parse("q4_k_m").unwrap(),
            QuantToken::Gguf("Q4_K_M".into())
        );
        assert_eq!(
            QuantToken::parse("bf16").unwrap(),
            QuantToken::Gguf("BF16".into())
        );
    }

    #[test]
    fn malformed_tokens_are_invalid_and_list_valid_ones() {
        for bad in ["", "kv_int9", "q4km!", "kv-int8", "Q4-K-M", "int8", " Q8_0"] {
            let err = QuantToken::parse(bad).unwrap_err();
            assert!(matches!(err, QuantError::Invalid { .. }), "{bad}");
            let text = err.to_string();
            assert!(text.contains("invalid quantization"), "{text}");
            assert!(
                text.contains("kv_int8") && text.contains("kv_fp8") && text.contains("Q4_K_M"),
                "{text}"
            );
        }
    }

    #[test]
    fn safetensors_resolution() {
        let t = safetensors();
        assert_eq!(resolve(None, &t).unwrap().kv_profile, KvProfile::Default);
        let c = resolve(Some(&QuantToken::Kv(KvProfile::KvFp8)), &t).unwrap();
        assert_eq!(
            c,
            QuantChoice {
                kv_profile: KvProfile::KvFp8,
                gguf_type: None
            }
        );
        let err = resolve(Some(&QuantToken::Gguf("Q4_K_M".into())), &t).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, QuantError::Unsupported { .. }));
        assert!(text.contains("unsupported quantization 'Q4_K_M'"), "{text}");
        assert!(text.contains("kv_int8, kv_fp8"), "{text}");
    }

    #[test]
    fn safetensors_without_kv_cache_refuses_kv_profiles() {
        let mut t = safetensors();
        t.kv_profiles = vec![KvProfile::Default];
        let err = resolve(Some(&QuantToken::Kv(KvProfile::KvInt8)), &t).unwrap_err();
        assert!(err
            .to_string()
            .contains("unsupported quantization 'kv_int8'"));
    }

    #[test]
    fn gguf_resolution() {
        let t = gguf();
        assert_eq!(
            resolve(None, &t).unwrap().gguf_type.as_deref(),
            Some("Q4_K_M")
        );
        let c = resolve(Some(&QuantToken::Gguf("Q8_0".into())), &t).unwrap();
        assert_eq!(c.gguf_type.as_deref(), Some("Q8_0"));
        let err = resolve(Some(&QuantToken::Kv(KvProfile::KvFp8)), &t)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unsupported quantization 'kv_fp8'") && err.contains("Q4_K_M, Q8_0"),
            "{err}"
        );
        let err = resolve(Some(&QuantToken::Gguf("Q6_K".into())), &t)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unsupported quantization 'Q6_K'") && err.contains("no Q6_K file"),
            "{err}"
        );
    }

    #[test]
    fn gguf_without_default_uses_the_only_file() {
        let mut t = gguf();
        t.default_gguf_type = None;
        t.gguf_types = vec!["Q8_0".into()];
        assert_eq!(
            resolve(None, &t).unwrap().gguf_type.as_deref(),
            Some("Q8_0")
        );
    }

    #[test]
    fn finds_gguf_type_in_file_names() {
        assert_eq!(
            gguf_type_in_file_name("smollm2-135m-instruct-q4_k_m.gguf"),
            Some("Q4_K_M")
        );
        assert_eq!(gguf_type_in_file_name("Model-BF16.gguf"), Some("BF16"));
        assert_eq!(gguf_type_in_file_name("model.F16.gguf"), Some("F16"));
        assert_eq!(gguf_type_in_file_name("model-Q4_0_4_4.gguf"), None);
        assert_eq!(
            gguf_type_in_file_name("Q2_K_S/model-Q2_K_S-00001-of-00002.gguf"),
            Some("Q2_K_S")
        );
        assert_eq!(gguf_type_in_file_name("model-IQ4_XS.gguf"), Some("IQ4_XS"));
        assert_eq!(gguf_type_in_file_name("model.gguf"), None);
    }
}
