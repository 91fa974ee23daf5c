//! GGUF files through candle's quantized module: header, metadata accessors, tensor loading.
//!
//! The header is read once and every tensor's byte range is checked against the file size, so a
//! truncated download is reported (file, tensor, bytes missing) before loading starts.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{bail, Context};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::QTensor;
use candle_core::Device;

/// An open GGUF file.
pub struct GgufFile {
    pub path: PathBuf,
    pub content: Content,
    reader: Mutex<BufReader<File>>,
}

impl GgufFile {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let file_size = file.metadata()?.len();
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|e| {
            anyhow::anyhow!(
                "{} is not a valid GGUF file ({e}); it may be truncated or corrupt: download it again",
                path.display()
            )
        })?;
        for (name, info) in &content.tensor_infos {
            let elems = info.shape.elem_count();
            let dtype = info.ggml_dtype;
            let bytes = (elems / dtype.block_size()) * dtype.type_size();
            let end = content.tensor_data_offset + info.offset + bytes as u64;
            if end > file_size {
                bail!(
                    "{} is truncated: tensor '{name}' ends at byte {end} but the file has {file_size} bytes; download it again",
                    path.display()
                );
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            content,
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

    pub fn get_usize(&self, key: &str) -> Option<usize> {
        self.get_f64(key).map(|v| v as usize)
    }

    /// A required numeric value, with an error naming the key and file.
    pub fn require_usize(&self, key: &str) -> anyhow::Result<usize> {
        self.get_usize(key)
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
        self.content.tensor_infos.contains_key(name)
    }

    /// Reads one tensor onto `device` (quantized blocks stay quantized).
    pub fn tensor(&self, name: &str, device: &Device) -> anyhow::Result<QTensor> {
        if !self.has_tensor(name) {
            bail!("tensor '{name}' is missing from {}", self.path.display());
        }
        let mut reader = self.reader.lock().expect("reader lock");
        self.content
            .tensor(&mut *reader, name, device)
            .with_context(|| format!("cannot read tensor '{name}' from {}", self.path.display()))
    }
}
