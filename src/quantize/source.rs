//! Where tensors come from: a GGUF file (re-quantization) or a safetensors checkpoint (through
//! [`super::hf`]). Either way a source lists tensors under their GGUF names and dimensions and
//! hands out rows as f32, a slice at a time, so nothing larger than a chunk is ever copied.

use std::borrow::Cow;
use std::path::Path;

use anyhow::{bail, Context};

use super::blocks;
use super::gguf::{GgufReader, Metadata};
use super::plan::ModelShape;
use super::types::GgmlType;

/// A tensor of the source, under its GGUF name.
#[derive(Debug, Clone)]
pub struct SourceTensor {
    pub name: String,
    /// Dimensions, innermost first.
    pub ne: Vec<u64>,
    /// Storage type (for safetensors: F32, F16, BF16 or MXFP4).
    pub ty: GgmlType,
    /// The type it keeps when not quantized.
    pub keep_type: GgmlType,
}

impl SourceTensor {
    pub fn n_per_row(&self) -> usize {
        self.ne[0] as usize
    }
    pub fn n_rows(&self) -> usize {
        self.ne[1..].iter().product::<u64>() as usize
    }
}

/// A model to quantize.
pub trait Source: Sync {
    /// Metadata for the output (architecture, hyperparameters, tokenizer, chat template).
    fn metadata(&self) -> &Metadata;
    fn tensors(&self) -> &[SourceTensor];
    fn shape(&self) -> ModelShape;
    /// Rows `r0..r0+out.len()/n_per_row` of tensor `i` as f32.
    fn read_rows(&self, i: usize, r0: usize, out: &mut [f32]) -> anyhow::Result<()>;
    /// The bytes of rows `r0..r1` of tensor `i` in its own type, for tensors copied unchanged.
    fn raw_rows(&self, i: usize, r0: usize, r1: usize) -> anyhow::Result<Cow<'_, [u8]>>;
    /// Drops the pages of rows `r0..r1` from memory once converted.
    fn release(&self, i: usize, r0: usize, r1: usize);
    /// A short description for messages ("GGUF Q8_0", "safetensors bf16").
    fn describe(&self) -> String;
}

/// The ModelShape llama-quantize's rules need, from GGUF metadata.
pub fn shape_from_metadata(md: &Metadata, tensors: &[SourceTensor]) -> anyhow::Result<ModelShape> {
    let arch = md
        .get_str("general.architecture")
        .context("the source lacks general.architecture")?
        .to_string();
    let get = |k: &str| md.get_u64(&format!("{arch}.{k}")).map(|v| v as usize);
    // head_count_kv may be an array (per layer) in hybrids: take the largest.
    let arr_max = |k: &str| match md.get(&format!("{arch}.{k}")) {
        Some(super::gguf::Value::Array(_, items)) => items
            .iter()
            .filter_map(|v| v.as_u64())
            .max()
            .map(|v| v as usize),
        _ => None,
    };
    let n_layer = match get("block_count") {
        Some(n) => n,
        None => tensors
            .iter()
            .filter_map(|t| {
                t.name
                    .strip_prefix("blk.")?
                    .split('.')
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .max()
            .map_or(0, |m| m + 1),
    };
    let n_head = get("attention.head_count")
        .or_else(|| arr_max("attention.head_count"))
        .unwrap_or(0);
    Ok(ModelShape {
        architecture: arch.clone(),
        n_layer,
        n_head,
        n_head_kv: get("attention.head_count_kv")
            .or_else(|| arr_max("attention.head_count_kv"))
            .unwrap_or(n_head),
        n_expert: get("expert_count").unwrap_or(0),
    })
}

/// A GGUF file (or an extensionless Ollama blob holding one).
pub struct GgufSource {
    reader: GgufReader,
    tensors: Vec<SourceTensor>,
    metadata: Metadata,
}

impl GgufSource {
    pub fn open(path: &Path) -> anyhow::Result<GgufSource> {
        let reader = GgufReader::open(path)?;
        if reader
            .metadata
            .get_u64("split.count")
            .is_some_and(|n| n > 1)
        {
            bail!(
                "{} is one part of a split GGUF; merge it first (llama-gguf-split --merge)",
                path.display()
            );
        }
        reader.architecture()?;
        let tensors = reader
            .tensors
            .iter()
            .map(|t| SourceTensor {
                name: t.name.clone(),
                ne: t.ne.clone(),
                ty: t.ty,
                keep_type: t.ty,
            })
            .collect();
        let mut metadata = reader.metadata.clone();
        for k in ["split.no", "split.count", "split.tensors.count"] {
            metadata.remove(k);
        }
        Ok(GgufSource {
            reader,
            tensors,
            metadata,
        })
    }

    pub fn alignment(&self) -> u64 {
        self.reader.alignment
    }

    fn row_range(&self, i: usize, r0: usize, r1: usize) -> anyhow::Result<(&[u8], GgmlType)> {
        let info = &self.reader.tensors[i];
        let rb =
            info.ty
                .row_bytes(info.ne[0] as usize)
                .map(|b| b as u64)
                .unwrap_or(info.size / self.tensors[i].n_rows().max(1) as u64) as usize;
        let data = self.reader.data(info);
        Ok((&data[r0 * rb..r1 * rb], info.ty))
    }
}

impl Source for GgufSource {
    fn metadata(&self) -> &Metadata {
        &self.metadata
    }
    fn tensors(&self) -> &[SourceTensor] {
        &self.tensors
    }
    fn shape(&self) -> ModelShape {
        shape_from_metadata(&self.metadata, &self.tensors).unwrap_or_default()
    }
    fn read_rows(&self, i: usize, r0: usize, out: &mut [f32]) -> anyhow::Result<()> {
        let n = self.tensors[i].n_per_row();
        let (bytes, ty) = self.row_range(i, r0, r0 + out.len() / n)?;
        blocks::dequantize(ty, bytes, out)
            .with_context(|| format!("tensor '{}'", self.tensors[i].name))
    }
    fn raw_rows(&self, i: usize, r0: usize, r1: usize) -> anyhow::Result<Cow<'_, [u8]>> {
        Ok(Cow::Borrowed(self.row_range(i, r0, r1)?.0))
    }
    fn release(&self, i: usize, r0: usize, r1: usize) {
        if let Ok((bytes, _)) = self.row_range(i, r0, r1) {
            let mmap = self.reader.mmap();
            let start = bytes.as_ptr() as usize - mmap.as_ptr() as usize;
            super::gguf::release_range(mmap, start, bytes.len());
        }
    }
    fn describe(&self) -> String {
        format!("GGUF {}", self.reader.path.display())
    }
}
