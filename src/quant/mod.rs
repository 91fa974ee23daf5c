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
