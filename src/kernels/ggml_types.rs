//! The GGML tensor types and GGUF file types, as one table: id, name, block size and bytes per
//! block (ggml's `ggml_type_traits` / gguf-py's `GGML_QUANT_SIZES`), and which of them our CPU
//! kernels read. Everything that reads or writes GGUF blocks (loaders, `show`, the quantizer)
//! takes sizes from here, so a layout is stated once.

/// A GGML tensor element type (the `type` field of a GGUF tensor info).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GgmlType {
    /// The numeric id stored in GGUF files.
    pub id: u32,
    /// The name llama.cpp and gguf-py print (`Q4_K`, `IQ2_XS`, …).
    pub name: &'static str,
    /// Elements per block (1 for plain float and integer types).
    pub block_elems: usize,
    /// Bytes per block.
    pub block_bytes: usize,
}

macro_rules! ggml_types {
    ($($konst:ident = $id:literal, $name:literal, $elems:literal, $bytes:literal;)*) => {
        impl GgmlType {
            $(pub const $konst: GgmlType = GgmlType {
                id: $id,
                name: $name,
                block_elems: $elems,
                block_bytes: $bytes,
            };)*

            /// Every type this table knows, in id order.
            pub const ALL: &'static [GgmlType] = &[$(GgmlType::$konst),*];
        }
    };
}

ggml_types! {
    F32 = 0, "F32", 1, 4;
    F16 = 1, "F16", 1, 2;
    Q4_0 = 2, "Q4_0", 32, 18;
    Q4_1 = 3, "Q4_1", 32, 20;
    Q5_0 = 6, "Q5_0", 32, 22;
    Q5_1 = 7, "Q5_1", 32, 24;
    Q8_0 = 8, "Q8_0", 32, 34;
    // ggml's current block_q8_1 (f16 d, f16 s, 32 × i8); gguf-py still lists the old f32 layout (40).
    Q8_1 = 9, "Q8_1", 32, 36;
    Q2_K = 10, "Q2_K", 256, 84;
    Q3_K = 11, "Q3_K", 256, 110;
    Q4_K = 12, "Q4_K", 256, 144;
    Q5_K = 13, "Q5_K", 256, 176;
    Q6_K = 14, "Q6_K", 256, 210;
    Q8_K = 15, "Q8_K", 256, 292;
    IQ2_XXS = 16, "IQ2_XXS", 256, 66;
    IQ2_XS = 17, "IQ2_XS", 256, 74;
    IQ3_XXS = 18, "IQ3_XXS", 256, 98;
    IQ1_S = 19, "IQ1_S", 256, 50;
    IQ4_NL = 20, "IQ4_NL", 32, 18;
    IQ3_S = 21, "IQ3_S", 256, 110;
    IQ2_S = 22, "IQ2_S", 256, 82;
    IQ4_XS = 23, "IQ4_XS", 256, 136;
    I8 = 24, "I8", 1, 1;
    I16 = 25, "I16", 1, 2;
    I32 = 26, "I32", 1, 4;
    I64 = 27, "I64", 1, 8;
    F64 = 28, "F64", 1, 8;
    IQ1_M = 29, "IQ1_M", 256, 56;
    BF16 = 30, "BF16", 1, 2;
    TQ1_0 = 34, "TQ1_0", 256, 54;
    TQ2_0 = 35, "TQ2_0", 256, 66;
    MXFP4 = 39, "MXFP4", 32, 17;
}

impl GgmlType {
    /// The type with GGUF id `id`, if known.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        Self::ALL.iter().copied().find(|t| t.id == id)
    }

    /// The type named `name` (as llama.cpp spells it, any case).
    pub fn from_name(name: &str) -> Option<GgmlType> {
        Self::ALL
            .iter()
            .copied()
            .find(|t| t.name.eq_ignore_ascii_case(name))
    }

    /// Bytes of a row of `elems` elements, or `None` when `elems` is not a whole number of blocks.
    pub fn row_bytes(self, elems: usize) -> Option<usize> {
        (elems % self.block_elems == 0).then(|| elems / self.block_elems * self.block_bytes)
    }

    /// The importance-matrix / lattice types (`IQ*`) and the ternary ones (`TQ*`).
    pub fn is_lattice(self) -> bool {
        self.name.starts_with("IQ") || self.name.starts_with("TQ")
    }

    /// A block format our CPU matmul kernels read (`kernels::quant_matrix`).
    pub fn has_cpu_kernel(self) -> bool {
        matches!(
            self,
            Self::Q4_0
                | Self::Q4_1
                | Self::Q5_0
                | Self::Q5_1
                | Self::Q8_0
                | Self::Q2_K
                | Self::Q3_K
                | Self::Q4_K
                | Self::Q5_K
                | Self::Q6_K
                | Self::TQ1_0
                | Self::TQ2_0
        )
    }
}

impl GgmlType {
    /// Our entry for one of candle's GGUF types (candle's reader knows a subset of the table).
    pub fn from_candle(dtype: candle_core::quantized::GgmlDType) -> GgmlType {
        use candle_core::quantized::GgmlDType as C;
        match dtype {
            C::F32 => Self::F32,
            C::F16 => Self::F16,
            C::BF16 => Self::BF16,
            C::Q4_0 => Self::Q4_0,
            C::Q4_1 => Self::Q4_1,
            C::Q5_0 => Self::Q5_0,
            C::Q5_1 => Self::Q5_1,
            C::Q8_0 => Self::Q8_0,
            C::Q8_1 => Self::Q8_1,
            C::Q2K => Self::Q2_K,
            C::Q3K => Self::Q3_K,
            C::Q4K => Self::Q4_K,
            C::Q5K => Self::Q5_K,
            C::Q6K => Self::Q6_K,
            C::Q8K => Self::Q8_K,
        }
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

/// The name of a GGUF `general.file_type` (llama.cpp's `llama_ftype`, without `MOSTLY_`):
/// what users call a file's quantization (`Q4_K_M`). `None` for ids this table lacks.
pub fn file_type_name(id: u32) -> Option<&'static str> {
    Some(match id {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        36 => "TQ1_0",
        37 => "TQ2_0",
        // llama.cpp: MOSTLY_MXFP4_MOE; `show` has always said MXFP4.
        38 => "MXFP4",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_names_are_unique_and_round_trip() {
        for t in GgmlType::ALL {
            assert_eq!(GgmlType::from_id(t.id), Some(*t));
            assert_eq!(GgmlType::from_name(&t.name.to_lowercase()), Some(*t));
        }
        assert_eq!(
            GgmlType::from_id(5),
            None,
            "ids 4 and 5 (Q4_2, Q4_3) were removed"
        );
    }

    #[test]
    fn row_bytes_follow_the_block_layout() {
        assert_eq!(GgmlType::Q4_K.row_bytes(512), Some(288));
        assert_eq!(GgmlType::Q8_0.row_bytes(64), Some(68));
        assert_eq!(GgmlType::Q6_K.row_bytes(100), None);
        assert_eq!(GgmlType::F32.row_bytes(3), Some(12));
    }

    #[test]
    fn file_types_use_llama_cpp_names() {
        assert_eq!(file_type_name(15), Some("Q4_K_M"));
        assert_eq!(file_type_name(7), Some("Q8_0"));
        assert_eq!(file_type_name(4), None);
        assert!(GgmlType::IQ4_XS.is_lattice() && !GgmlType::Q4_K.is_lattice());
    }
}
