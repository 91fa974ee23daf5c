//! GGML tensor types and llama.cpp file types (the `--type` names), with their block geometry.
//!
//! Private to `quantize` until the shared GGML type table in `kernels/` lands; the numbering is
//! ggml's (`enum ggml_type`, `enum llama_ftype`), which GGUF files store.

use std::fmt;

/// Elements per K-quant / ternary super-block.
pub const QK_K: usize = 256;

/// A tensor storage type of GGML (the id written in GGUF tensor infos).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    I8,
    I16,
    I32,
    I64,
    F64,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
    /// A type this table does not describe (IQ*, future types): copied as is when its size is known
    /// from the file layout, never converted.
    Other(u32),
}

impl GgmlType {
    pub fn from_id(id: u32) -> GgmlType {
        use GgmlType::*;
        match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2K,
            11 => Q3K,
            12 => Q4K,
            13 => Q5K,
            14 => Q6K,
            15 => Q8K,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            30 => BF16,
            34 => TQ1_0,
            35 => TQ2_0,
            39 => MXFP4,
            other => Other(other),
        }
    }

    pub fn id(self) -> u32 {
        use GgmlType::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q5_0 => 6,
            Q5_1 => 7,
            Q8_0 => 8,
            Q8_1 => 9,
            Q2K => 10,
            Q3K => 11,
            Q4K => 12,
            Q5K => 13,
            Q6K => 14,
            Q8K => 15,
            I8 => 24,
            I16 => 25,
            I32 => 26,
            I64 => 27,
            F64 => 28,
            BF16 => 30,
            TQ1_0 => 34,
            TQ2_0 => 35,
            MXFP4 => 39,
            Other(id) => id,
        }
    }

    /// ggml's name (`ggml_type_name`).
    pub fn name(self) -> String {
        use GgmlType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2K => "Q2_K",
            Q3K => "Q3_K",
            Q4K => "Q4_K",
            Q5K => "Q5_K",
            Q6K => "Q6_K",
            Q8K => "Q8_K",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
            F64 => "F64",
            BF16 => "BF16",
            TQ1_0 => "TQ1_0",
            TQ2_0 => "TQ2_0",
            MXFP4 => "MXFP4",
            Other(id) => return format!("type{id}"),
        }
        .to_string()
    }

    /// (elements per block, bytes per block); `None` for types this table does not know.
    pub fn block(self) -> Option<(usize, usize)> {
        use GgmlType::*;
        Some(match self {
            F32 | I32 => (1, 4),
            F16 | BF16 | I16 => (1, 2),
            I8 => (1, 1),
            I64 | F64 => (1, 8),
            Q4_0 => (32, 18),
            Q4_1 => (32, 20),
            Q5_0 => (32, 22),
            Q5_1 => (32, 24),
            Q8_0 => (32, 34),
            Q8_1 => (32, 36),
            Q2K => (QK_K, 84),
            Q3K => (QK_K, 110),
            Q4K => (QK_K, 144),
            Q5K => (QK_K, 176),
            Q6K => (QK_K, 210),
            Q8K => (QK_K, 292),
            TQ1_0 => (QK_K, 54),
            TQ2_0 => (QK_K, 66),
            MXFP4 => (32, 17),
            Other(_) => return None,
        })
    }

    pub fn block_size(self) -> usize {
        self.block().map_or(1, |b| b.0)
    }

    /// Bytes of one row of `n` elements (`ggml_row_size`); `None` when `n` does not divide by the
    /// block size or the type is unknown.
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        let (bs, bytes) = self.block()?;
        (n % bs == 0).then(|| n / bs * bytes)
    }

    /// Whether the type is block-quantized (not a plain float or integer type).
    pub fn is_quantized(self) -> bool {
        !matches!(
            self,
            GgmlType::F32
                | GgmlType::F16
                | GgmlType::BF16
                | GgmlType::F64
                | GgmlType::I8
                | GgmlType::I16
                | GgmlType::I32
                | GgmlType::I64
        )
    }

    /// Whether this crate can turn f32 values into this type.
    pub fn can_quantize_to(self) -> bool {
        use GgmlType::*;
        matches!(
            self,
            F32 | F16
                | BF16
                | Q4_0
                | Q4_1
                | Q5_0
                | Q5_1
                | Q8_0
                | Q2K
                | Q3K
                | Q4K
                | Q5K
                | Q6K
                | TQ1_0
                | TQ2_0
        )
    }

    /// Whether this crate can turn this type back into f32 values (to re-quantize it).
    pub fn can_dequantize(self) -> bool {
        self.can_quantize_to() || matches!(self, GgmlType::MXFP4 | GgmlType::Q8_1 | GgmlType::Q8K)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// A target of `xllm quantize --type`: llama.cpp's `llama_ftype`, a file-level recipe that picks
/// a tensor type per tensor (the K-quant mixes raise some tensors above the base type).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q2K,
    Q3KS,
    Q3KM,
    Q3KL,
    Q4KS,
    Q4KM,
    Q5KS,
    Q5KM,
    Q6K,
    TQ1_0,
    TQ2_0,
}

impl FileType {
    pub const ALL: [FileType; 19] = [
        FileType::F32,
        FileType::F16,
        FileType::BF16,
        FileType::Q8_0,
        FileType::Q4_0,
        FileType::Q4_1,
        FileType::Q5_0,
        FileType::Q5_1,
        FileType::Q2K,
        FileType::Q3KS,
        FileType::Q3KM,
        FileType::Q3KL,
        FileType::Q4KS,
        FileType::Q4KM,
        FileType::Q5KS,
        FileType::Q5KM,
        FileType::Q6K,
        FileType::TQ1_0,
        FileType::TQ2_0,
    ];

    /// The user-facing name (`Q4_K_M`), as llama-quantize and `general.file_type` readers spell it.
    pub fn name(self) -> &'static str {
        use FileType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            BF16 => "BF16",
            Q8_0 => "Q8_0",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q2K => "Q2_K",
            Q3KS => "Q3_K_S",
            Q3KM => "Q3_K_M",
            Q3KL => "Q3_K_L",
            Q4KS => "Q4_K_S",
            Q4KM => "Q4_K_M",
            Q5KS => "Q5_K_S",
            Q5KM => "Q5_K_M",
            Q6K => "Q6_K",
            TQ1_0 => "TQ1_0",
            TQ2_0 => "TQ2_0",
        }
    }

    /// `general.file_type` (llama_ftype numbering).
    pub fn ftype_id(self) -> u32 {
        use FileType::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q8_0 => 7,
            Q5_0 => 8,
            Q5_1 => 9,
            Q2K => 10,
            Q3KS => 11,
            Q3KM => 12,
            Q3KL => 13,
            Q4KS => 14,
            Q4KM => 15,
            Q5KS => 16,
            Q5KM => 17,
            Q6K => 18,
            BF16 => 32,
            TQ1_0 => 36,
            TQ2_0 => 37,
        }
    }

    /// The tensor type most tensors get (`llama_ftype_get_default_type`).
    pub fn base_type(self) -> GgmlType {
        use FileType::*;
        match self {
            F32 => GgmlType::F32,
            F16 => GgmlType::F16,
            BF16 => GgmlType::BF16,
            Q8_0 => GgmlType::Q8_0,
            Q4_0 => GgmlType::Q4_0,
            Q4_1 => GgmlType::Q4_1,
            Q5_0 => GgmlType::Q5_0,
            Q5_1 => GgmlType::Q5_1,
            Q2K => GgmlType::Q2K,
            Q3KS | Q3KM | Q3KL => GgmlType::Q3K,
            Q4KS | Q4KM => GgmlType::Q4K,
            Q5KS | Q5KM => GgmlType::Q5K,
            Q6K => GgmlType::Q6K,
            TQ1_0 => GgmlType::TQ1_0,
            TQ2_0 => GgmlType::TQ2_0,
        }
    }

    /// Parses a `--type` value, case-insensitively; the single-type K names (`Q3_K`, `Q4_K`,
    /// `Q5_K`) mean their `_M` mix, as llama-quantize reads them.
    pub fn parse(s: &str) -> Result<FileType, UnknownType> {
        let up = s.trim().to_ascii_uppercase();
        let alias = match up.as_str() {
            "Q3_K" => "Q3_K_M",
            "Q4_K" => "Q4_K_M",
            "Q5_K" => "Q5_K_M",
            other => other,
        };
        FileType::ALL
            .into_iter()
            .find(|t| t.name() == alias)
            .ok_or_else(|| UnknownType(s.to_string()))
    }
}

impl fmt::Display for FileType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `--type` named something that is not a known file type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownType(pub String);

impl fmt::Display for UnknownType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let valid: Vec<&str> = FileType::ALL.iter().map(|t| t.name()).collect();
        write!(
            f,
            "unknown quantization type '{}'; valid types: {} (Q3_K, Q4_K and Q5_K mean their _M mix)",
            self.0,
            valid.join(", ")
        )
    }
}

impl std::error::Error for UnknownType {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_sizes_match_ggml() {
        for id in 0..40 {
            assert_eq!(GgmlType::from_id(id).id(), id);
        }
        assert_eq!(GgmlType::Q4K.row_bytes(4096), Some(16 * 144));
        assert_eq!(GgmlType::Q4K.row_bytes(576), None);
        assert_eq!(GgmlType::TQ1_0.row_bytes(256), Some(54));
        assert_eq!(GgmlType::MXFP4.row_bytes(64), Some(34));
    }

    #[test]
    fn parses_names_and_lists_valid_ones() {
        assert_eq!(FileType::parse("q4_k_m").unwrap(), FileType::Q4KM);
        assert_eq!(FileType::parse("Q4_K").unwrap(), FileType::Q4KM);
        assert_eq!(FileType::parse("tq2_0").unwrap(), FileType::TQ2_0);
        let err = FileType::parse("Q7_K").unwrap_err().to_string();
        assert!(
            err.contains("Q7_K") && err.contains("Q4_K_M") && err.contains("TQ1_0"),
            "{err}"
        );
    }
}
