//! GGUF files through candle's quantized module: header, metadata accessors, tensor loading.
//!
//! Before candle parses the header, our own walk checks it (see [`check_header`]): candle's reader
//! bounds strings and arrays by the file size but divides by a zero `general.alignment`, keeps a
//! 32-byte `Value` per array element (a 1 GB array of bytes would take 32 GB), and leaves tensor
//! shapes, types and byte ranges to whoever reads them. After the walk every tensor is known to
//! have a supported type, a shape whose rows are whole blocks, and bytes inside the file, so a
//! truncated download is reported (file, tensor, bytes missing) before loading starts.
//!
//! Tensors of a type candle's reader does not know (MXFP4, IQ*, TQ*) would make candle refuse the
//! whole file. They are kept out of what candle parses (its header copy omits their entries) and
//! listed as [`SideTensor`]s: their raw bytes are read here, for the loaders that know the type
//! (gpt-oss's MXFP4 experts); any other use names the type and why it is not supported.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use std::collections::HashMap;

use anyhow::{bail, Context};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;

use crate::kernels::ggml_types::GgmlType;

/// Longest metadata key or tensor name accepted.
const MAX_NAME_LEN: u64 = 1 << 16;
/// Most elements in one metadata array (the largest vocabularies have ~262k tokens).
const MAX_ARRAY_LEN: u64 = 1 << 24;
/// Arrays of arrays deeper than this are refused (llama.cpp writes none).
const MAX_ARRAY_DEPTH: usize = 2;
/// Most tensors in a file (a 1000-layer model has ~10k).
const MAX_TENSORS: u64 = 1 << 20;
/// Largest `general.alignment` accepted (llama.cpp writes 32).
const MAX_ALIGNMENT: u64 = 1 << 16;
/// Most elements in one tensor (2^40, 2 TB at one byte each).
const MAX_TENSOR_ELEMS: u64 = 1 << 40;

/// Where tensor bytes are read from: the file, or memory (fuzzing, tests).
trait Source: Read + Seek + Send {}
impl<T: Read + Seek + Send> Source for T {}

/// An open GGUF file.
pub struct GgufFile {
    pub path: PathBuf,
    /// Metadata and the tensors candle can read.
    pub content: Content,
    /// Tensors of types candle's reader does not know, by name.
    side: HashMap<String, SideTensor>,
    reader: Mutex<Box<dyn Source>>,
}

/// A tensor candle's reader does not know (MXFP4, IQ*, TQ*): where its bytes are.
#[derive(Debug, Clone)]
pub struct SideTensor {
    pub ty: GgmlType,
    /// Dimensions outermost first (candle's order: `[rows, cols]` for a matrix).
    pub dims: Vec<usize>,
    /// Absolute byte offset in the file.
    offset: u64,
    pub bytes: usize,
}

/// One tensor of the file, whichever reader holds it (`show`, format names).
pub struct TensorSummary<'a> {
    pub name: &'a str,
    pub ty: GgmlType,
    pub elems: u64,
    /// Number of dimensions.
    pub rank: usize,
}

impl GgufFile {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            bail!("{} is not a regular file", path.display());
        }
        Self::from_reader(path, Box::new(BufReader::new(file)), meta.len())
    }

    /// A GGUF file held in memory; `path` only names it in messages.
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> anyhow::Result<Self> {
        let len = bytes.len() as u64;
        Self::from_reader(path, Box::new(std::io::Cursor::new(bytes)), len)
    }

    fn from_reader(
        path: &Path,
        mut reader: Box<dyn Source>,
        file_size: u64,
    ) -> anyhow::Result<Self> {
        let scan = scan_header(&mut reader, file_size).map_err(|e| {
            anyhow::anyhow!(
                "{} is not a valid GGUF file: {e:#}; it may be truncated or corrupt: download it again",
                path.display()
            )
        })?;
        let invalid = |e: candle_core::Error| {
            anyhow::anyhow!(
                "{} is not a valid GGUF file ({e}); it may be truncated or corrupt: download it again",
                path.display()
            )
        };
        let mut side = HashMap::new();
        let content = if scan.side.is_empty() {
            reader.seek(SeekFrom::Start(0))?;
            Content::read(&mut reader).map_err(invalid)?
        } else {
            // candle parses a copy of the header without the entries of the types it does not
            // know; the data section stays where the full header puts it.
            let mut header = vec![0u8; scan.header_end as usize];
            reader.seek(SeekFrom::Start(0))?;
            reader.read_exact(&mut header)?;
            let mut kept = Vec::with_capacity(header.len());
            let mut from = 0usize;
            for entry in &scan.side {
                kept.extend_from_slice(&header[from..entry.info_start as usize]);
                from = entry.info_end as usize;
            }
            kept.extend_from_slice(&header[from..]);
            let count = scan.tensor_count - scan.side.len() as u64;
            if scan.wide {
                kept[8..16].copy_from_slice(&count.to_le_bytes());
            } else {
                kept[8..12].copy_from_slice(&(count as u32).to_le_bytes());
            }
            let mut content = Content::read(&mut std::io::Cursor::new(kept)).map_err(invalid)?;
            content.tensor_data_offset = scan.data_start;
            for entry in scan.side {
                side.insert(
                    entry.name,
                    SideTensor {
                        ty: entry.ty,
                        dims: entry.dims,
                        offset: scan.data_start + entry.offset,
                        bytes: entry.bytes as usize,
                    },
                );
            }
            content
        };
        Ok(Self {
            path: path.to_path_buf(),
            content,
            side,
            reader: Mutex::new(reader),
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key)
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
    }

    /// A numeric metadata value of any integer or float type.
    pub fn get_f64(&self, key: &str) -> Option<f64> {
        Some(match self.get(key)? {
            Value::U8(v) => *v as f64,
            Value::I8(v) => *v as f64,
            Value::U16(v) => *v as f64,
            Value::I16(v) => *v as f64,
            Value::U32(v) => *v as f64,
            Value::I32(v) => *v as f64,
            Value::U64(v) => *v as f64,
            Value::I64(v) => *v as f64,
            Value::F32(v) => *v as f64,
            Value::F64(v) => *v,
            _ => return None,
        })
    }

    /// A count or size: `None` when absent or not a whole non-negative number (use
    /// [`Self::usize_value`] where a bad value must be an error).
    pub fn get_usize(&self, key: &str) -> Option<usize> {
        self.usize_value(key).ok().flatten()
    }

    /// A count or size when present; a negative, fractional, non-numeric or huge value (a
    /// `block_count` of 1e30) is an error naming the file, key and value.
    pub fn usize_value(&self, key: &str) -> anyhow::Result<Option<usize>> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        let n = match value {
            Value::U8(v) => Some(*v as u64),
            Value::U16(v) => Some(*v as u64),
            Value::U32(v) => Some(*v as u64),
            Value::U64(v) => Some(*v),
            Value::I8(v) => u64::try_from(*v).ok(),
            Value::I16(v) => u64::try_from(*v).ok(),
            Value::I32(v) => u64::try_from(*v).ok(),
            Value::I64(v) => u64::try_from(*v).ok(),
            Value::F32(v) => whole(*v as f64),
            Value::F64(v) => whole(*v),
            _ => None,
        };
        // 2^53: past it a float is no longer a whole number one can trust, and no size is that big.
        match n.filter(|n| *n <= 1 << 53) {
            Some(n) => Ok(Some(n as usize)),
            None => bail!(
                "{}: metadata '{key}' = {} is invalid (expected a non-negative integer)",
                self.path.display(),
                describe(value)
            ),
        }
    }

    /// A float when present; NaN, infinities and non-numbers are errors naming the key.
    pub fn f64_value(&self, key: &str) -> anyhow::Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(value) => match self.get_f64(key).filter(|v| v.is_finite()) {
                Some(v) => Ok(Some(v)),
                None => bail!(
                    "{}: metadata '{key}' = {} is invalid (expected a finite number)",
                    self.path.display(),
                    describe(value)
                ),
            },
        }
    }

    /// A required numeric value, with an error naming the key and file.
    pub fn require_usize(&self, key: &str) -> anyhow::Result<usize> {
        self.usize_value(key)?
            .with_context(|| format!("{} lacks metadata '{key}'", self.path.display()))
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> anyhow::Result<&str> {
        self.get_str("general.architecture").with_context(|| {
            format!(
                "{} lacks metadata 'general.architecture'",
                self.path.display()
            )
        })
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name) || self.side.contains_key(name)
    }

    /// Every tensor with its type and element count (candle's and the side tensors).
    pub fn tensor_summaries(&self) -> Vec<TensorSummary<'_>> {
        let mut out: Vec<TensorSummary<'_>> = self
            .content
            .tensor_infos
            .iter()
            .map(|(name, info)| TensorSummary {
                name,
                ty: GgmlType::from_candle(info.ggml_dtype),
                elems: info.shape.elem_count() as u64,
                rank: info.shape.rank(),
            })
            .collect();
        out.extend(self.side.iter().map(|(name, t)| TensorSummary {
            name,
            ty: t.ty,
            elems: t.dims.iter().map(|&d| d as u64).product(),
            rank: t.dims.len(),
        }));
        out
    }

    /// What the weights are stored as, for `show`/`bench`: the file type (`Q4_K_M`) when stored
    /// (a k-quant file mixes several block types), else the type of most matrices (the
    /// embedding is often kept at a higher precision).
    pub fn format_name(&self) -> String {
        if let Some(name) = self
            .get_usize("general.file_type")
            .and_then(|id| crate::kernels::ggml_types::file_type_name(id as u32))
        {
            return name.to_string();
        }
        let mut counts = HashMap::new();
        for t in self.tensor_summaries() {
            if t.rank >= 2 {
                *counts.entry(t.ty.name.to_string()).or_insert(0usize) += 1;
            }
        }
        counts
            .into_iter()
            .max_by_key(|(name, n)| (*n, name.clone()))
            .map(|(t, _)| t)
            .unwrap_or_default()
    }

    /// A tensor of a type candle does not read (MXFP4, IQ*, TQ*), if there is one named `name`.
    pub fn side_tensor(&self, name: &str) -> Option<&SideTensor> {
        self.side.get(name)
    }

    /// The stored bytes of a side tensor (see [`Self::side_tensor`]).
    pub fn side_bytes(&self, name: &str) -> anyhow::Result<Vec<u8>> {
        let t = self
            .side
            .get(name)
            .with_context(|| format!("tensor '{name}' is missing from {}", self.path.display()))?;
        let mut reader = self.reader.lock().unwrap_or_else(|e| e.into_inner());
        let mut bytes = vec![0u8; t.bytes];
        reader.seek(SeekFrom::Start(t.offset))?;
        reader
            .read_exact(&mut bytes)
            .with_context(|| format!("cannot read tensor '{name}' from {}", self.path.display()))?;
        Ok(bytes)
    }

    /// Reads one tensor onto `device` (quantized blocks stay quantized).
    pub fn tensor(&self, name: &str, device: &Device) -> anyhow::Result<QTensor> {
        if let Some(t) = self.side.get(name) {
            bail!(
                "tensor '{name}' in {}: {}",
                self.path.display(),
                crate::kernels::quant_blocks::unsupported_reason(t.ty)
            );
        }
        if !self.has_tensor(name) {
            bail!("tensor '{name}' is missing from {}", self.path.display());
        }
        let mut reader = self.reader.lock().unwrap_or_else(|e| e.into_inner());
        self.content
            .tensor(&mut *reader, name, device)
            .with_context(|| format!("cannot read tensor '{name}' from {}", self.path.display()))
    }
}

fn whole(v: f64) -> Option<u64> {
    (v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v <= u64::MAX as f64).then_some(v as u64)
}

/// A metadata value for an error message (arrays by length, not contents).
fn describe(value: &Value) -> String {
    match value {
        Value::Array(a) => format!("an array of {} values", a.len()),
        Value::String(s) => format!("{:?}", s.chars().take(64).collect::<String>()),
        Value::Bool(b) => b.to_string(),
        Value::F32(v) => v.to_string(),
        Value::F64(v) => v.to_string(),
        Value::U8(v) => v.to_string(),
        Value::I8(v) => v.to_string(),
        Value::U16(v) => v.to_string(),
        Value::I16(v) => v.to_string(),
        Value::U32(v) => v.to_string(),
        Value::I32(v) => v.to_string(),
        Value::U64(v) => v.to_string(),
        Value::I64(v) => v.to_string(),
    }
}

/// The ggml tensor types candle reads (its own mapping is private to candle).
fn ggml_dtype(id: u32) -> Option<GgmlDType> {
    Some(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// GGUF value type ids (gguf.md).
const TYPE_STRING: u32 = 8;
const TYPE_ARRAY: u32 = 9;

/// Bytes of a fixed-size value type, `None` for strings/arrays, error for unknown ids.
fn scalar_size(value_type: u32) -> anyhow::Result<Option<u64>> {
    Ok(Some(match value_type {
        0 | 1 | 7 => 1, // u8, i8, bool
        2 | 3 => 2,     // u16, i16
        4..=6 => 4,     // u32, i32, f32
        10..=12 => 8,   // u64, i64, f64
        TYPE_STRING | TYPE_ARRAY => return Ok(None),
        other => bail!("unknown metadata value type {other}"),
    }))
}

/// Reads the GGUF header with bounds of our own, allocating nothing sized by the file (strings
/// are skipped, not read): magic and version, counts, every metadata value (arrays bounded,
/// `general.alignment` a power of two), and every tensor (at most 4 dimensions, a type of the
/// GGML table, rows of whole blocks, byte range inside the file). What it accepts, candle's
/// reader can parse without panicking or allocating beyond a small multiple of the file size
/// (once the entries of types candle does not know are taken out, see [`GgufFile`]).
pub fn check_header<R: Read + Seek>(r: &mut R, file_size: u64) -> anyhow::Result<()> {
    scan_header(r, file_size).map(|_| ())
}

/// What [`scan_header`] learns beyond "valid".
struct Scan {
    wide: bool,
    tensor_count: u64,
    /// Where the header ends and where the data section starts (aligned).
    header_end: u64,
    data_start: u64,
    /// Entries of types candle's reader does not know, in file order.
    side: Vec<SideEntry>,
}

struct SideEntry {
    name: String,
    ty: GgmlType,
    dims: Vec<usize>,
    /// Offset in the data section, and byte size.
    offset: u64,
    bytes: u64,
    /// The entry's bytes in the header.
    info_start: u64,
    info_end: u64,
}

fn scan_header<R: Read + Seek>(r: &mut R, file_size: u64) -> anyhow::Result<Scan> {
    let mut h = Header {
        r,
        file_size,
        wide: true,
    };
    let magic = h.u32()?;
    if magic != 0x4655_4747 {
        bail!("it does not start with the GGUF magic (found 0x{magic:08x})");
    }
    let version = h.u32()?;
    match version {
        1 => h.wide = false,
        2 | 3 => {}
        v => bail!("GGUF version {v} is not supported (1 to 3 are)"),
    }
    let tensors = h.len()?;
    let kvs = h.len()?;
    if tensors > MAX_TENSORS {
        bail!("the header declares {tensors} tensors (at most {MAX_TENSORS} are accepted)");
    }
    // Every entry takes at least a length, a type and one byte: counts that cannot fit are lies.
    if kvs > h.remaining()? / 13 {
        bail!("the header declares {kvs} metadata entries, more than the file can hold");
    }
    let mut alignment = 32u64;
    for _ in 0..kvs {
        let key = h.name("metadata key")?;
        let value_type = h.u32()?;
        if key == "general.alignment" {
            let value = match value_type {
                0 => h.u8()? as u64,
                2 => h.u16()? as u64,
                4 => h.u32()? as u64,
                1 => h.u8()? as i8 as u64,
                3 => h.u16()? as i16 as u64,
                5 => h.u32()? as i32 as u64,
                t => bail!("metadata 'general.alignment' has value type {t}, expected an integer"),
            };
            if value == 0 || !value.is_power_of_two() || value > MAX_ALIGNMENT {
                bail!(
                    "metadata 'general.alignment' = {} is invalid (expected a power of two from 1 to {MAX_ALIGNMENT})",
                    value as i64
                );
            }
            alignment = value;
            continue;
        }
        h.skip_value(value_type, 0)
            .with_context(|| format!("in metadata '{key}'"))?;
    }
    let mut ranges = Vec::new();
    let mut side = Vec::new();
    for _ in 0..tensors {
        let info_start = h.r.stream_position()?;
        let name = h.name("tensor name")?;
        let dims = h.u32()?;
        if dims > 4 {
            bail!("tensor '{name}' has {dims} dimensions (at most 4)");
        }
        let mut shape = Vec::with_capacity(dims as usize);
        for _ in 0..dims {
            shape.push(if h.wide { h.u64()? } else { h.u32()? as u64 });
        }
        let type_id = h.u32()?;
        let ty = GgmlType::from_id(type_id).with_context(|| {
            format!("tensor '{name}' has type id {type_id}, which is not a GGML type xllm knows")
        })?;
        let offset = h.u64()?;
        let elems = shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|n| *n <= MAX_TENSOR_ELEMS)
            .with_context(|| format!("tensor '{name}' has an absurd shape {shape:?}"))?;
        let block = ty.block_elems as u64;
        // GGUF lists dimensions innermost first: rows are `shape[0]` long and must be whole blocks.
        if shape.first().is_some_and(|&row| row % block != 0) {
            bail!(
                "tensor '{name}' ({ty}) has rows of {} values, not a multiple of its block size {block}",
                shape[0]
            );
        }
        let bytes = elems / block * ty.block_bytes as u64;
        if ggml_dtype(type_id).is_none() {
            side.push(SideEntry {
                name: name.clone(),
                ty,
                dims: shape.iter().rev().map(|&d| d as usize).collect(),
                offset,
                bytes,
                info_start,
                info_end: h.r.stream_position()?,
            });
        }
        ranges.push((name, offset, bytes));
    }
    let position = h.r.stream_position()?;
    let data_start = position.div_ceil(alignment) * alignment;
    for (name, offset, bytes) in ranges {
        let end = data_start
            .checked_add(offset)
            .and_then(|s| s.checked_add(bytes))
            .with_context(|| format!("tensor '{name}' has an absurd offset {offset}"))?;
        if end > h.file_size {
            bail!(
                "tensor '{name}' ends at byte {end} but the file has {} bytes",
                h.file_size
            );
        }
    }
    Ok(Scan {
        wide: h.wide,
        tensor_count: tensors,
        header_end: position,
        data_start,
        side,
    })
}

/// Little-endian reads over the header with the file size at hand.
struct Header<'a, R> {
    r: &'a mut R,
    file_size: u64,
    /// Version 2+ lengths are u64 (version 1: u32).
    wide: bool,
}

impl<R: Read + Seek> Header<'_, R> {
    fn bytes<const N: usize>(&mut self) -> anyhow::Result<[u8; N]> {
        let mut b = [0u8; N];
        self.r
            .read_exact(&mut b)
            .context("the header ends before the end of the file's declared contents")?;
        Ok(b)
    }
    fn u8(&mut self) -> anyhow::Result<u8> {
        Ok(self.bytes::<1>()?[0])
    }
    fn u16(&mut self) -> anyhow::Result<u16> {
        Ok(u16::from_le_bytes(self.bytes()?))
    }
    fn u32(&mut self) -> anyhow::Result<u32> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }
    fn u64(&mut self) -> anyhow::Result<u64> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }
    fn len(&mut self) -> anyhow::Result<u64> {
        if self.wide {
            self.u64()
        } else {
            Ok(self.u32()? as u64)
        }
    }
    fn remaining(&mut self) -> anyhow::Result<u64> {
        Ok(self.file_size.saturating_sub(self.r.stream_position()?))
    }
    /// Moves past `n` bytes that must lie inside the file.
    fn skip(&mut self, n: u64, what: &str) -> anyhow::Result<()> {
        let left = self.remaining()?;
        if n > left {
            bail!("{what} of {n} bytes runs past the end of the file ({left} bytes left)");
        }
        self.r.seek(SeekFrom::Current(n as i64))?;
        Ok(())
    }
    /// A short string (key or tensor name), read for messages.
    fn name(&mut self, what: &str) -> anyhow::Result<String> {
        let n = self.len()?;
        if n > MAX_NAME_LEN || n > self.remaining()? {
            bail!("a {what} of {n} bytes is too long");
        }
        let mut buf = vec![0u8; n as usize];
        self.r.read_exact(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }
    fn skip_value(&mut self, value_type: u32, depth: usize) -> anyhow::Result<()> {
        match value_type {
            TYPE_STRING => {
                let n = self.len()?;
                self.skip(n, "a string")
            }
            TYPE_ARRAY => {
                if depth >= MAX_ARRAY_DEPTH {
                    bail!("arrays nested deeper than {MAX_ARRAY_DEPTH}");
                }
                let elem = self.u32()?;
                let n = self.len()?;
                if n > MAX_ARRAY_LEN {
                    bail!("an array of {n} elements (at most {MAX_ARRAY_LEN} are accepted)");
                }
                match scalar_size(elem)? {
                    Some(size) => self.skip(n * size, "an array"),
                    None => {
                        // Strings or arrays: each takes at least a length.
                        if n > self.remaining()? / 8 {
                            bail!("an array of {n} elements is longer than the file");
                        }
                        for _ in 0..n {
                            self.skip_value(elem, depth + 1)?;
                        }
                        Ok(())
                    }
                }
            }
            other => {
                let size = scalar_size(other)?.expect("scalar type");
                self.skip(size, "a value")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file;
    use candle_core::Tensor;

    fn file_with(metadata: &[(&str, gguf_file::Value)]) -> Vec<u8> {
        let t = Tensor::zeros((2, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, GgmlDType::Q8_0).unwrap();
        let md: Vec<(&str, &gguf_file::Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
        let mut cur = std::io::Cursor::new(Vec::new());
        gguf_file::write(&mut cur, &md, &[("w", &q)]).unwrap();
        cur.into_inner()
    }

    fn check(bytes: &[u8]) -> anyhow::Result<()> {
        check_header(&mut std::io::Cursor::new(bytes), bytes.len() as u64)
    }

    #[test]
    fn accepts_what_candle_writes() {
        let b = file_with(&[
            (
                "general.architecture",
                gguf_file::Value::String("llama".into()),
            ),
            (
                "tokenizer.ggml.tokens",
                gguf_file::Value::Array(vec![gguf_file::Value::String("a".into()); 3]),
            ),
        ]);
        check(&b).unwrap();
        Content::read(&mut std::io::Cursor::new(&b)).unwrap();
    }

    /// A GGUF v3 file written by hand: no metadata, tensors `(name, dims innermost first, type
    /// id, bytes)` laid out in order at 32-byte alignment.
    fn raw_file(tensors: &[(&str, &[u64], u32, Vec<u8>)]) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(b"GGUF");
        h.extend_from_slice(&3u32.to_le_bytes());
        h.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        h.extend_from_slice(&0u64.to_le_bytes());
        let mut offset = 0u64;
        for (name, dims, ty, bytes) in tensors {
            h.extend_from_slice(&(name.len() as u64).to_le_bytes());
            h.extend_from_slice(name.as_bytes());
            h.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in *dims {
                h.extend_from_slice(&d.to_le_bytes());
            }
            h.extend_from_slice(&ty.to_le_bytes());
            h.extend_from_slice(&offset.to_le_bytes());
            offset += (bytes.len() as u64).div_ceil(32) * 32;
        }
        h.resize(h.len().div_ceil(32) * 32, 0);
        for (_, _, _, bytes) in tensors {
            h.extend_from_slice(bytes);
            h.resize(h.len().div_ceil(32) * 32, 0);
        }
        h
    }

    /// Tensors of types candle does not read (MXFP4, IQ*) no longer make the file unreadable:
    /// candle's tensors load as before, the others' bytes are read here, and using one where a
    /// candle tensor is needed names its type.
    #[test]
    fn types_candle_cannot_read_are_side_tensors() {
        let q8: Vec<u8> = (0..2 * 34).map(|i| (i * 7) as u8).collect();
        let mxfp4: Vec<u8> = (0..3 * 2 * 17).map(|i| (i * 13 + 1) as u8).collect();
        let iq2: Vec<u8> = vec![0; 74];
        let bytes = raw_file(&[
            ("a.q8", &[32, 2], 8, q8.clone()),
            ("b.experts", &[64, 3], 39, mxfp4.clone()),
            ("c.iq", &[256], 17, iq2),
            ("d.q8", &[32, 2], 8, q8.clone()),
        ]);
        let f = GgufFile::from_bytes(Path::new("side.gguf"), bytes).unwrap();
        assert!(f.has_tensor("b.experts") && f.has_tensor("a.q8"));
        let side = f.side_tensor("b.experts").unwrap();
        assert_eq!((side.ty, side.dims.clone()), (GgmlType::MXFP4, vec![3, 64]));
        assert_eq!(f.side_bytes("b.experts").unwrap(), mxfp4);
        for name in ["a.q8", "d.q8"] {
            let t = f.tensor(name, &Device::Cpu).unwrap();
            assert_eq!(t.data().unwrap().as_ref(), q8.as_slice(), "{name}");
        }
        let e = f.tensor("c.iq", &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("IQ2_XS") && e.contains("not supported"), "{e}");
        let mut types: Vec<_> = f
            .tensor_summaries()
            .iter()
            .map(|t| (t.name.to_string(), t.ty.name))
            .collect();
        types.sort();
        assert_eq!(
            types,
            [
                ("a.q8".to_string(), "Q8_0"),
                ("b.experts".to_string(), "MXFP4"),
                ("c.iq".to_string(), "IQ2_XS"),
                ("d.q8".to_string(), "Q8_0")
            ]
        );
        // A type id outside the GGML table is refused at open, by number.
        let bad = raw_file(&[("x", &[32], 99, vec![0; 32])]);
        let e = GgufFile::from_bytes(Path::new("bad.gguf"), bad)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("type id 99"), "{e}");
    }

    #[test]
    fn zero_alignment_is_an_error_not_a_division_by_zero() {
        let b = file_with(&[("general.alignment", gguf_file::Value::U32(0))]);
        let e = check(&b).unwrap_err().to_string();
        assert!(e.contains("'general.alignment' = 0"), "{e}");
        let b = file_with(&[("general.alignment", gguf_file::Value::U32(24))]);
        assert!(check(&b).is_err());
    }

    #[test]
    fn truncation_anywhere_is_an_error() {
        let b = file_with(&[("general.name", gguf_file::Value::String("x".repeat(100)))]);
        // The last 32 bytes may be alignment padding after the last tensor's data.
        for cut in 0..b.len() - 32 {
            assert!(check(&b[..cut]).is_err(), "accepted a file cut at {cut}");
        }
    }

    #[test]
    fn strict_integers_name_key_and_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        std::fs::write(
            &path,
            file_with(&[
                ("llama.block_count", gguf_file::Value::F32(1e30)),
                ("llama.head", gguf_file::Value::I32(-2)),
                ("llama.ok", gguf_file::Value::F64(3.0)),
            ]),
        )
        .unwrap();
        let f = GgufFile::open(&path).unwrap();
        let e = f.usize_value("llama.block_count").unwrap_err().to_string();
        assert!(
            e.contains("'llama.block_count' = 1") && e.contains("invalid"),
            "{e}"
        );
        assert!(f.usize_value("llama.head").is_err());
        assert_eq!(f.usize_value("llama.ok").unwrap(), Some(3));
        assert_eq!(f.usize_value("absent").unwrap(), None);
    }
}
