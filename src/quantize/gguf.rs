//! GGUF v3 reading (memory-mapped, every type, metadata kept in file order) and streaming writing.
//!
//! Our own reader rather than candle's: candle's `gguf_file` refuses files holding types it does not
//! know (MXFP4, TQ*), and rewriting metadata needs the keys in order with their exact value types.
//! The writer lays out the header first (all tensor types and sizes are planned up front), then
//! tensor data is streamed in, each tensor padded to the alignment, as llama-quantize writes it.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use memmap2::Mmap;

use super::types::GgmlType;

pub const MAGIC: u32 = 0x4655_4747; // "GGUF"
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// A metadata value with its exact GGUF type.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    /// Element type id and the elements.
    Array(u32, Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::Str(_) => 8,
            Value::Array(..) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    pub fn as_u64(&self) -> Option<u64> {
        Some(match *self {
            Value::U8(v) => v as u64,
            Value::U16(v) => v as u64,
            Value::U32(v) => v as u64,
            Value::U64(v) => v,
            Value::I8(v) => u64::try_from(v).ok()?,
            Value::I16(v) => u64::try_from(v).ok()?,
            Value::I32(v) => u64::try_from(v).ok()?,
            Value::I64(v) => u64::try_from(v).ok()?,
            _ => return None,
        })
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// An array of strings.
    pub fn strings(items: Vec<String>) -> Value {
        Value::Array(8, items.into_iter().map(Value::Str).collect())
    }

    fn write(&self, w: &mut impl Write) -> std::io::Result<()> {
        match self {
            Value::U8(v) => w.write_all(&[*v]),
            Value::I8(v) => w.write_all(&v.to_le_bytes()),
            Value::U16(v) => w.write_all(&v.to_le_bytes()),
            Value::I16(v) => w.write_all(&v.to_le_bytes()),
            Value::U32(v) => w.write_all(&v.to_le_bytes()),
            Value::I32(v) => w.write_all(&v.to_le_bytes()),
            Value::F32(v) => w.write_all(&v.to_le_bytes()),
            Value::Bool(v) => w.write_all(&[*v as u8]),
            Value::Str(s) => write_str(w, s),
            Value::Array(ty, items) => {
                w.write_all(&ty.to_le_bytes())?;
                w.write_all(&(items.len() as u64).to_le_bytes())?;
                for it in items {
                    it.write(w)?;
                }
                Ok(())
            }
            Value::U64(v) => w.write_all(&v.to_le_bytes()),
            Value::I64(v) => w.write_all(&v.to_le_bytes()),
            Value::F64(v) => w.write_all(&v.to_le_bytes()),
        }
    }
}

fn write_str(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

/// Ordered metadata (GGUF keeps insertion order; llama-quantize preserves it).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metadata(pub Vec<(String, Value)>);

impl Metadata {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Replaces the value in place, or appends the key.
    pub fn set(&mut self, key: &str, value: Value) {
        match self.0.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.0.push((key.to_string(), value)),
        }
    }

    pub fn remove(&mut self, key: &str) {
        self.0.retain(|(k, _)| k != key);
    }

    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(Value::as_u64)
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }
}

/// One tensor of a GGUF file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions, innermost first (ggml's `ne`).
    pub ne: Vec<u64>,
    pub ty: GgmlType,
    /// Offset in the data section.
    pub offset: u64,
    pub size: u64,
}

/// A memory-mapped GGUF file.
pub struct GgufReader {
    pub path: PathBuf,
    mmap: Mmap,
    pub version: u32,
    pub metadata: Metadata,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    data_start: u64,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> anyhow::Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let Some(end) = end else {
            bail!(
                "header ends early at byte {} (wanted {n} more bytes)",
                self.pos
            );
        };
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> anyhow::Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> anyhow::Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into()?))
    }
    fn u32(&mut self) -> anyhow::Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into()?))
    }
    fn u64(&mut self) -> anyhow::Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into()?))
    }
    fn string(&mut self) -> anyhow::Result<String> {
        let n = self.u64()?;
        if n > self.buf.len() as u64 {
            bail!(
                "string length {n} at byte {} is larger than the file",
                self.pos
            );
        }
        let b = self.take(n as usize)?;
        String::from_utf8(b.to_vec())
            .with_context(|| format!("string at byte {} is not UTF-8", self.pos))
    }
    fn value(&mut self, ty: u32, depth: usize) -> anyhow::Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.u8()?),
            1 => Value::I8(self.u8()? as i8),
            2 => Value::U16(self.u16()?),
            3 => Value::I16(self.u16()? as i16),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(self.u32()? as i32),
            6 => Value::F32(f32::from_bits(self.u32()?)),
            7 => Value::Bool(self.u8()? != 0),
            8 => Value::Str(self.string()?),
            9 => {
                if depth > 2 {
                    bail!("arrays nested too deep at byte {}", self.pos);
                }
                let ety = self.u32()?;
                let n = self.u64()?;
                if n > self.buf.len() as u64 {
                    bail!(
                        "array length {n} at byte {} is larger than the file",
                        self.pos
                    );
                }
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(ety, depth + 1)?);
                }
                Value::Array(ety, items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(self.u64()? as i64),
            12 => Value::F64(f64::from_bits(self.u64()?)),
            other => bail!("unknown metadata value type {other} at byte {}", self.pos),
        })
    }
}

impl GgufReader {
    pub fn open(path: &Path) -> anyhow::Result<GgufReader> {
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: read-only private mapping; model files are never rewritten in place by xllm.
        let mmap = unsafe { Mmap::map(&file) }
            .with_context(|| format!("cannot memory-map {}", path.display()))?;
        Self::parse(path, mmap).map_err(|e| {
            anyhow::anyhow!(
                "{} is not a valid GGUF file ({e:#}); it may be truncated or corrupt",
                path.display()
            )
        })
    }

    fn parse(path: &Path, mmap: Mmap) -> anyhow::Result<GgufReader> {
        let mut c = Cursor { buf: &mmap, pos: 0 };
        if c.u32()? != MAGIC {
            bail!("no GGUF magic");
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            bail!("GGUF version {version} is not supported (2 and 3 are)");
        }
        let n_tensors = c.u64()?;
        let n_kv = c.u64()?;
        if n_tensors > 1 << 24 || n_kv > 1 << 24 {
            bail!("implausible counts ({n_tensors} tensors, {n_kv} keys)");
        }
        let mut metadata = Metadata::default();
        for _ in 0..n_kv {
            let key = c.string()?;
            let ty = c.u32()?;
            let v = c.value(ty, 0).with_context(|| format!("key '{key}'"))?;
            metadata.0.push((key, v));
        }
        let alignment = metadata
            .get_u64("general.alignment")
            .unwrap_or(DEFAULT_ALIGNMENT);
        if alignment == 0 || !alignment.is_power_of_two() {
            bail!("general.alignment {alignment} is not a power of two");
        }
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = c.string()?;
            let n_dims = c.u32()?;
            if n_dims == 0 || n_dims > 4 {
                bail!("tensor '{name}' has {n_dims} dimensions");
            }
            let mut ne = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                ne.push(c.u64()?);
            }
            let ty = GgmlType::from_id(c.u32()?);
            let offset = c.u64()?;
            tensors.push(TensorInfo {
                name,
                ne,
                ty,
                offset,
                size: 0,
            });
        }
        let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
        let file_len = mmap.len() as u64;
        // Sizes: from the type where known, else the distance to the next tensor.
        let mut by_offset: Vec<usize> = (0..tensors.len()).collect();
        by_offset.sort_by_key(|&i| tensors[i].offset);
        for (k, &i) in by_offset.iter().enumerate() {
            let t = &tensors[i];
            let elems: u64 = t.ne.iter().product();
            let size = match t.ty.block() {
                Some((bs, bb)) => {
                    if t.ne[0] % bs as u64 != 0 {
                        bail!("tensor '{}' has rows of {} elements, not a multiple of {}'s block {bs}", t.name, t.ne[0], t.ty);
                    }
                    elems / bs as u64 * bb as u64
                }
                None => {
                    let next = by_offset
                        .get(k + 1)
                        .map_or(file_len - data_start, |&j| tensors[j].offset);
                    next.saturating_sub(t.offset)
                }
            };
            let end = data_start + t.offset + size;
            if end > file_len {
                bail!(
                    "tensor '{}' ends at byte {end} but the file has {file_len} bytes (truncated)",
                    t.name
                );
            }
            tensors[i].size = size;
        }
        Ok(GgufReader {
            path: path.to_path_buf(),
            mmap,
            version,
            metadata,
            tensors,
            alignment,
            data_start,
        })
    }

    pub fn architecture(&self) -> anyhow::Result<&str> {
        self.metadata
            .get_str("general.architecture")
            .with_context(|| format!("{} lacks general.architecture", self.path.display()))
    }

    /// The stored bytes of a tensor.
    pub fn data(&self, t: &TensorInfo) -> &[u8] {
        let start = (self.data_start + t.offset) as usize;
        &self.mmap[start..start + t.size as usize]
    }

    /// The whole mapping (for releasing pages of ranges handed out by [`Self::data`]).
    pub fn mmap(&self) -> &Mmap {
        &self.mmap
    }
}

/// `MADV_DONTNEED` on the whole pages inside `[start, start+len)` of a read-only mapping.
pub fn release_range(mmap: &Mmap, start: usize, len: usize) {
    #[cfg(unix)]
    {
        let page = 4096;
        let s = start.div_ceil(page) * page;
        let e = ((start + len) / page) * page;
        if e > s {
            // SAFETY: the mapping is private and read-only; dropped pages are re-read on access.
            let _ = unsafe {
                mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, s, e - s)
            };
        }
    }
    #[cfg(not(unix))]
    let _ = (mmap, start, len);
}

/// A tensor as it will be written: name, dims (innermost first), type and byte size.
#[derive(Debug, Clone)]
pub struct OutTensor {
    pub name: String,
    pub ne: Vec<u64>,
    pub ty: GgmlType,
    pub size: u64,
}

fn pad(n: u64, align: u64) -> u64 {
    n.div_ceil(align) * align
}

/// The header bytes (magic, counts, metadata, tensor infos, padding) for these tensors.
pub fn header_bytes(
    metadata: &Metadata,
    tensors: &[OutTensor],
    alignment: u64,
) -> anyhow::Result<Vec<u8>> {
    let mut h = Vec::new();
    h.write_all(&MAGIC.to_le_bytes())?;
    h.write_all(&3u32.to_le_bytes())?;
    h.write_all(&(tensors.len() as u64).to_le_bytes())?;
    h.write_all(&(metadata.0.len() as u64).to_le_bytes())?;
    for (k, v) in &metadata.0 {
        write_str(&mut h, k)?;
        h.write_all(&v.type_id().to_le_bytes())?;
        v.write(&mut h)?;
    }
    let mut offset = 0u64;
    for t in tensors {
        if t.name.len() >= 64 {
            bail!("tensor name '{}' is longer than GGUF's 63 bytes", t.name);
        }
        write_str(&mut h, &t.name)?;
        h.write_all(&(t.ne.len() as u32).to_le_bytes())?;
        for d in &t.ne {
            h.write_all(&d.to_le_bytes())?;
        }
        h.write_all(&t.ty.id().to_le_bytes())?;
        h.write_all(&offset.to_le_bytes())?;
        offset += pad(t.size, alignment);
    }
    let padded = pad(h.len() as u64, alignment) as usize;
    h.resize(padded, 0);
    Ok(h)
}

/// Total file size for these tensors.
pub fn file_size(header_len: u64, tensors: &[OutTensor], alignment: u64) -> u64 {
    header_len + tensors.iter().map(|t| pad(t.size, alignment)).sum::<u64>()
}

/// Streams a GGUF into a temp file next to `dest`; [`GgufWriter::finish`] renames it into place.
/// Dropping the writer before `finish` (an error, Ctrl-C) deletes the temp file.
pub struct GgufWriter {
    file: std::io::BufWriter<tempfile::NamedTempFile>,
    dest: PathBuf,
    alignment: u64,
    /// Bytes of the current tensor written so far, and its expected size.
    current: u64,
    expected: std::collections::VecDeque<u64>,
    /// sha256 of everything written, when the caller needs it (a store manifest; no second read).
    /// Off otherwise: on a byte-copy conversion (F16 → F16) hashing was a third of the time.
    hasher: Option<sha2::Sha256>,
    written: u64,
    writeback: Writeback,
}

/// What [`GgufWriter::finish`] wrote.
#[derive(Debug, Clone)]
pub struct Written {
    pub size: u64,
    /// Present when asked for ([`GgufWriter::create`]'s `sha256`).
    pub sha256: Option<String>,
}

/// Bytes written between two nudges of the background writeback.
const WRITEBACK_EVERY: u64 = 64 << 20;

/// Starts the disk writeback of what is already written while the rest is still being produced.
/// The file is synced before the rename (a crash must not leave a short file under the final
/// name), and syncing only at the end made that wait a third of a byte-copy conversion's time; a
/// thread syncing every [`WRITEBACK_EVERY`] bytes overlaps it with the conversion instead.
struct Writeback {
    nudge: Option<std::sync::mpsc::SyncSender<()>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
    since: u64,
    /// [`WRITEBACK_EVERY`]; smaller in tests.
    every: u64,
}

impl Writeback {
    fn start(file: &std::fs::File) -> Writeback {
        let Ok(file) = file.try_clone() else {
            // No second handle: the final sync does all the work.
            return Writeback {
                nudge: None,
                thread: None,
                since: 0,
                every: WRITEBACK_EVERY,
            };
        };
        let (nudge, rx) = std::sync::mpsc::sync_channel::<()>(1);
        let thread = std::thread::Builder::new()
            .name("gguf-writeback".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    file.sync_data()?;
                }
                Ok(())
            })
            .ok();
        Writeback {
            nudge: thread.as_ref().map(|_| nudge),
            thread,
            since: 0,
            every: WRITEBACK_EVERY,
        }
    }

    /// Called after `n` more bytes reached the file (not the buffer).
    fn wrote(&mut self, n: u64) {
        self.since += n;
        if self.since >= self.every {
            self.since = 0;
            if let Some(tx) = &self.nudge {
                // Full means a sync is already pending: it will cover these bytes too.
                let _ = tx.try_send(());
            }
        }
    }

    /// Stops the thread; its first error, if any.
    fn stop(&mut self) -> std::io::Result<()> {
        self.nudge = None;
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(std::io::Error::other("the writeback thread panicked")),
            None => Ok(()),
        }
    }
}

impl Drop for Writeback {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

impl GgufWriter {
    /// `sha256`: hash the file as it is written ([`Written::sha256`]).
    pub fn create(
        dest: &Path,
        metadata: &Metadata,
        tensors: &[OutTensor],
        alignment: u64,
        sha256: bool,
    ) -> anyhow::Result<GgufWriter> {
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let prefix = format!(".{name}.");
        let mut builder = tempfile::Builder::new();
        builder.prefix(&prefix).suffix(".partial");
        // Temp files are private (0600) by default; the finished model is an ordinary file
        // (0666 less the umask, as llama-quantize's output), so other users and services can read it.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            builder.permissions(std::fs::Permissions::from_mode(0o666));
        }
        let tmp = builder
            .tempfile_in(&dir)
            .with_context(|| format!("cannot create a temp file in {}", dir.display()))?;
        let writeback = Writeback::start(tmp.as_file());
        let file = std::io::BufWriter::with_capacity(4 << 20, tmp);
        let mut w = GgufWriter {
            file,
            dest: dest.to_path_buf(),
            alignment,
            current: 0,
            expected: tensors.iter().map(|t| t.size).collect(),
            hasher: sha256.then(sha2::Sha256::default),
            written: 0,
            writeback,
        };
        let header = header_bytes(metadata, tensors, alignment)?;
        w.put(&header)?;
        while w.expected.front() == Some(&0) {
            w.expected.pop_front();
        }
        Ok(w)
    }

    fn put(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        use sha2::Digest;
        self.file
            .write_all(bytes)
            .context("cannot write the output file")?;
        if let Some(h) = &mut self.hasher {
            h.update(bytes);
        }
        self.written += bytes.len() as u64;
        // The writeback syncs what has left the buffer by then; `finish` syncs the rest.
        self.writeback.wrote(bytes.len() as u64);
        Ok(())
    }

    /// Appends bytes of the current tensor; after its last byte, the padding follows.
    pub fn write(&mut self, mut bytes: &[u8]) -> anyhow::Result<()> {
        while !bytes.is_empty() {
            let Some(&size) = self.expected.front() else {
                bail!("more tensor data than planned");
            };
            let n = (size - self.current).min(bytes.len() as u64) as usize;
            self.put(&bytes[..n])?;
            self.current += n as u64;
            bytes = &bytes[n..];
            if self.current == size {
                let padding = pad(size, self.alignment) - size;
                self.put(&vec![0u8; padding as usize])?;
                self.expected.pop_front();
                self.current = 0;
            }
        }
        // Zero-sized tensors complete at once.
        while self.expected.front() == Some(&0) {
            self.expected.pop_front();
        }
        Ok(())
    }

    /// Flushes, syncs and renames the file into place.
    pub fn finish(mut self) -> anyhow::Result<Written> {
        use sha2::Digest;
        if !self.expected.is_empty() {
            bail!(
                "{} tensors were planned but not written",
                self.expected.len()
            );
        }
        self.writeback
            .stop()
            .context("cannot sync the output file")?;
        let tmp = self
            .file
            .into_inner()
            .map_err(|e| e.into_error())
            .context("cannot write the output file")?;
        tmp.as_file()
            .sync_all()
            .context("cannot sync the output file")?;
        tmp.persist(&self.dest).with_context(|| {
            format!(
                "cannot move the output into place at {}",
                self.dest.display()
            )
        })?;
        Ok(Written {
            size: self.written,
            sha256: self.hasher.map(|h| hex::encode(h.finalize())),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_files_read_back_with_metadata_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let mut md = Metadata::default();
        md.set("general.architecture", Value::Str("llama".into()));
        md.set("llama.block_count", Value::U32(2));
        md.set(
            "tokenizer.ggml.tokens",
            Value::strings(vec!["a".into(), "b".into()]),
        );
        md.set("x.f", Value::F32(1.5));
        let tensors = vec![
            OutTensor {
                name: "a".into(),
                ne: vec![32, 2],
                ty: GgmlType::Q8_0,
                size: 68,
            },
            OutTensor {
                name: "b".into(),
                ne: vec![3],
                ty: GgmlType::F32,
                size: 12,
            },
        ];
        let mut w = GgufWriter::create(&path, &md, &tensors, 32, false).unwrap();
        w.write(&[7u8; 60]).unwrap();
        w.write(&[8u8; 8]).unwrap();
        w.write(&[1u8; 12]).unwrap();
        let written = w.finish().unwrap();
        assert_eq!(written.size, std::fs::metadata(&path).unwrap().len());
        let r = GgufReader::open(&path).unwrap();
        assert_eq!(r.version, 3);
        assert_eq!(r.metadata, md);
        assert_eq!(r.tensors.len(), 2);
        assert_eq!(r.tensors[1].offset % 32, 0);
        assert_eq!(r.data(&r.tensors[0]).len(), 68);
        assert_eq!(r.data(&r.tensors[1]), &[1u8; 12]);
        // candle reads it too.
        let mut f = std::fs::File::open(&path).unwrap();
        let c = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
        assert_eq!(c.tensor_infos.len(), 2);
        // Only the final file remains in the folder.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn syncing_while_writing_keeps_every_byte_and_the_hash_matches_the_file() {
        use sha2::Digest;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let tensors: Vec<OutTensor> = (0..40)
            .map(|i| OutTensor {
                name: format!("t{i}"),
                ne: vec![1000 + i],
                ty: GgmlType::F32,
                size: 4 * (1000 + i),
            })
            .collect();
        let mut w = GgufWriter::create(&path, &Metadata::default(), &tensors, 32, true).unwrap();
        // Nudge the writeback thread every few KB, so syncs run while later tensors are written.
        w.writeback.every = 3000;
        let datas: Vec<Vec<u8>> = tensors
            .iter()
            .map(|t| (0..t.size).map(|k| (k * 31 + t.size) as u8).collect())
            .collect();
        for d in &datas {
            for part in d.chunks(999) {
                w.write(part).unwrap();
            }
        }
        let written = w.finish().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(written.size, bytes.len() as u64);
        assert_eq!(
            written.sha256.as_deref(),
            Some(hex::encode(sha2::Sha256::digest(&bytes)).as_str())
        );
        let r = GgufReader::open(&path).unwrap();
        for (t, d) in r.tensors.iter().zip(&datas) {
            assert_eq!(r.data(t), &d[..], "{}", t.name);
        }
    }

    #[test]
    fn unfinished_writes_leave_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let tensors = vec![OutTensor {
            name: "a".into(),
            ne: vec![4],
            ty: GgmlType::F32,
            size: 16,
        }];
        let mut w = GgufWriter::create(&path, &Metadata::default(), &tensors, 32, false).unwrap();
        w.write(&[0u8; 8]).unwrap();
        drop(w);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn truncated_and_garbage_files_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let tensors = vec![OutTensor {
            name: "a".into(),
            ne: vec![64],
            ty: GgmlType::F32,
            size: 256,
        }];
        let mut w = GgufWriter::create(&path, &Metadata::default(), &tensors, 32, false).unwrap();
        w.write(&[0u8; 256]).unwrap();
        w.finish().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
        let err = format!("{:#}", GgufReader::open(&path).err().unwrap());
        assert!(err.contains("truncated"), "{err}");
        std::fs::write(&path, b"not a gguf at all").unwrap();
        let err = format!("{:#}", GgufReader::open(&path).err().unwrap());
        assert!(err.contains("not a valid GGUF"), "{err}");
    }
}
