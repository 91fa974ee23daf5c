//! Safetensors weights, memory-mapped (never read whole into memory), single file or sharded.
//!
//! Shards come from `model.safetensors.index.json` when present, else from the file names
//! (`model.safetensors`, `model-00001-of-00003.safetensors`, any `*.safetensors`). Every header is
//! validated when the file is opened, so a truncated or corrupt file is reported by name before any
//! weight is loaded. After a tensor is copied out, its pages are released from the mapping
//! (`MADV_DONTNEED`) so peak memory stays near the size of the weights, not twice that.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::SafeTensors;

/// One mapped shard with its parsed header.
struct Shard {
    path: PathBuf,
    mmap: Mmap,
    /// Start of the data section (8-byte length + JSON header).
    data_start: usize,
    metadata: Metadata,
}

/// All weights of a safetensors checkpoint, by tensor name.
pub struct SafetensorsWeights {
    shards: Vec<Shard>,
    /// Tensor name → shard index.
    index: HashMap<String, usize>,
}

/// A tensor's bytes as stored, for loaders that decode formats candle does not know (MXFP4).
pub struct RawTensor<'a> {
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    pub data: &'a [u8],
}

/// The safetensors files of the model in `dir`, in a stable order.
pub fn shard_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = super::files::read_text(&index, super::files::MAX_TEXT_FILE)?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", index.display()))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{} has no weight_map object", index.display()))?;
        let mut files: Vec<String> = Vec::new();
        for (tensor, file) in map {
            match file.as_str() {
                Some(f) => files.push(f.to_string()),
                None => bail!(
                    "{}: weight_map entry '{tensor}' = {file} is not a file name",
                    index.display()
                ),
            }
        }
        files.sort();
        files.dedup();
        if files.is_empty() {
            bail!("{} has an empty weight_map", index.display());
        }
        return files
            .iter()
            .map(|f| super::files::contained_file(dir, f, &index))
            .collect();
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        super::files::check_inside(dir, &single, dir)?;
        return Ok(vec![single]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    for f in &files {
        super::files::check_inside(dir, f, dir)?;
    }
    // `model-00001-of-00003.safetensors`: all shards of the set must be there.
    if let Some(total) = files.iter().find_map(|f| shard_total(f)) {
        let found = files
            .iter()
            .filter(|f| shard_total(f) == Some(total))
            .count();
        if found != total {
            bail!(
                "{}: expected {total} shards (model-NNNNN-of-{total:05}.safetensors), found {found}",
                dir.display()
            );
        }
    }
    if files.is_empty() {
        bail!("no .safetensors files in {}", dir.display());
    }
    Ok(files)
}

fn shard_total(path: &Path) -> Option<usize> {
    let name = path.file_stem()?.to_str()?;
    let (_, total) = name.rsplit_once("-of-")?;
    total.parse().ok()
}

impl SafetensorsWeights {
    /// Maps and validates the checkpoint in `dir`.
    pub fn open_dir(dir: &Path) -> anyhow::Result<Self> {
        Self::open_files(&shard_files(dir)?)
    }

    pub fn open_files(files: &[PathBuf]) -> anyhow::Result<Self> {
        let mut shards = Vec::with_capacity(files.len());
        let mut index = HashMap::new();
        for (i, path) in files.iter().enumerate() {
            let file = std::fs::File::open(path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            // SAFETY: the store never rewrites a model's files in place (downloads are renamed
            // into place), so the mapping is not modified under us.
            let mmap = unsafe { Mmap::map(&file) }
                .with_context(|| format!("cannot memory-map {}", path.display()))?;
            let (header_len, metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| {
                anyhow::anyhow!(
                    "{} is not a valid safetensors file ({e}); it may be truncated or corrupt: download it again",
                    path.display()
                )
            })?;
            for name in metadata.tensors().keys() {
                index.insert(name.clone(), i);
            }
            shards.push(Shard {
                path: path.clone(),
                mmap,
                data_start: 8 + header_len,
                metadata,
            });
        }
        Ok(Self { shards, index })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.index.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    fn locate(&self, name: &str) -> anyhow::Result<(&Shard, &TensorInfo)> {
        let shard = self
            .index
            .get(name)
            .map(|&i| &self.shards[i])
            .with_context(|| format!("tensor '{name}' is missing from the checkpoint"))?;
        let info = shard.metadata.info(name).expect("indexed tensor has info");
        Ok((shard, info))
    }

    /// The stored bytes of a tensor (no copy).
    pub fn raw(&self, name: &str) -> anyhow::Result<RawTensor<'_>> {
        let (shard, info) = self.locate(name)?;
        let (start, end) = info.data_offsets;
        let data = &shard.mmap[shard.data_start + start..shard.data_start + end];
        Ok(RawTensor {
            dtype: info.dtype,
            shape: info.shape.clone(),
            data,
        })
    }

    /// Loads a tensor onto `device` converted to `dtype`, then releases its mapped pages.
    pub fn load(&self, name: &str, dtype: DType, device: &Device) -> anyhow::Result<Tensor> {
        let (shard, info) = self.locate(name)?;
        let raw = self.raw(name)?;
        let view = safetensors::tensor::TensorView::new(raw.dtype, raw.shape, raw.data)
            .with_context(|| format!("tensor '{name}' in {}", shard.path.display()))?;
        let tensor = view
            .load(device)
            .and_then(|t| t.to_dtype(dtype))
            .with_context(|| {
                format!("cannot load tensor '{name}' from {}", shard.path.display())
            })?;
        self.release(shard, info);
        Ok(tensor)
    }

    /// Loads a tensor and checks its shape.
    pub fn load_shaped(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> anyhow::Result<Tensor> {
        let (_, info) = self.locate(name)?;
        if info.shape != shape {
            bail!(
                "tensor '{name}' has shape {:?}, expected {shape:?} from config.json",
                info.shape
            );
        }
        self.load(name, dtype, device)
    }

    /// The dtype a tensor is stored in.
    pub fn stored_dtype(&self, name: &str) -> anyhow::Result<DType> {
        let (_, info) = self.locate(name)?;
        DType::try_from(info.dtype)
            .map_err(|e| anyhow::anyhow!("tensor '{name}' has an unsupported dtype: {e}"))
    }

    /// Drops the mapped pages of a tensor the caller has copied out (see [`Self::raw`]).
    pub fn release_pages(&self, name: &str) {
        if let Ok((shard, info)) = self.locate(name) {
            self.release(shard, info);
        }
    }

    /// Drops the pages of a copied tensor from this process's resident set (the data stays in the
    /// page cache and is read again if needed).
    fn release(&self, shard: &Shard, info: &TensorInfo) {
        #[cfg(unix)]
        {
            let page = 4096;
            let (start, end) = info.data_offsets;
            let start = (shard.data_start + start).div_ceil(page) * page;
            let end = ((shard.data_start + end) / page) * page;
            if end > start {
                // SAFETY: the mapping is private and read-only; DONTNEED only drops resident pages
                // of a file mapping, which are re-read from the file on the next access.
                let _ = unsafe {
                    shard.mmap.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        start,
                        end - start,
                    )
                };
            }
        }
    }

    /// The shard files, in load order (for loaders that map packed tensors themselves).
    pub fn files(&self) -> Vec<PathBuf> {
        self.shards.iter().map(|s| s.path.clone()).collect()
    }

    /// Bytes of all shards together.
    pub fn total_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.mmap.len() as u64).sum()
    }
}
