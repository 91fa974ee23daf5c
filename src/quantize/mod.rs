//! `xllm quantize`: safetensors or GGUF in, GGUF out, one tensor (and one chunk of rows) at a time.
//!
//! Flow: [`open_source`] maps the input (nothing is read yet) → [`prepare`] plans every tensor's
//! type ([`plan`], llama-quantize's rules) and the output layout → [`execute`] streams rows
//! through the quantizers ([`blocks`]) into a [`gguf::GgufWriter`] (temp file + rename). Peak
//! memory is a few chunks of rows, whatever the model size: source pages are dropped from the
//! mapping once converted.

pub mod blocks;
pub mod gguf;
pub mod hf;
pub mod imatrix;
pub mod plan;
pub mod source;
pub mod tokenizer_md;
pub mod types;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context};
use rayon::prelude::*;

use gguf::{Metadata, OutTensor, Value};
use plan::{PlanInput, PlannedTensor};
use source::Source;
pub use types::{FileType, GgmlType};

/// f32 elements converted per chunk (16 MiB of f32): bounds memory and gives the progress bar
/// steps inside large tensors.
const CHUNK_ELEMS: usize = 4 << 20;

/// Opens a quantization source: a safetensors model folder, or a GGUF file (any name, so Ollama's
/// extensionless blobs work: the magic decides).
pub fn open_source(path: &Path) -> anyhow::Result<Box<dyn Source>> {
    if path.is_dir() {
        if path.join("config.json").is_file() {
            return Ok(Box::new(hf::HfSource::open(path)?));
        }
        let ggufs: Vec<_> = std::fs::read_dir(path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
            .collect();
        if ggufs.len() == 1 {
            return Ok(Box::new(source::GgufSource::open(&ggufs[0])?));
        }
        bail!(
            "{} has no config.json (safetensors model) and not exactly one .gguf file",
            path.display()
        );
    }
    let mut magic = [0u8; 4];
    {
        use std::io::Read;
        let mut f =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        if f.read_exact(&mut magic).is_err() {
            bail!("{} is too short to be a model file", path.display());
        }
    }
    if u32::from_le_bytes(magic) == gguf::MAGIC {
        return Ok(Box::new(source::GgufSource::open(path)?));
    }
    bail!(
        "{} is neither a GGUF file nor a safetensors model folder (quantize takes a folder with config.json \
         and *.safetensors, a .gguf file or an Ollama blob)",
        path.display()
    )
}

/// Fails with "need vs have" when `dir`'s file system cannot hold `need` more bytes.
pub fn ensure_disk_space(dir: &Path, need: u64) -> anyhow::Result<()> {
    let have = fs4::available_space(dir)
        .with_context(|| format!("cannot read the free space of {}", dir.display()))?;
    if need > have {
        bail!(
            "not enough disk space in {}: need {} ({need} bytes), have {} ({have} bytes)",
            dir.display(),
            crate::store::human_bytes(need),
            crate::store::human_bytes(have),
        );
    }
    Ok(())
}

/// Everything decided before a byte is written.
pub struct Prepared {
    pub ftype: FileType,
    /// Planned tensors in output order, with the index of each in the source's tensor list.
    pub tensors: Vec<(usize, PlannedTensor)>,
    pub metadata: Metadata,
    pub alignment: u64,
    pub header_len: u64,
    /// Output file size in bytes.
    pub total_bytes: u64,
    /// Source bytes of the planned tensors.
    pub source_bytes: u64,
    /// How TQ1_0/TQ2_0 tensors are scaled (`--ternary-scale`).
    pub ternary_scale: blocks::ternary::TernaryScale,
}

impl Prepared {
    pub fn fallbacks(&self) -> usize {
        self.tensors
            .iter()
            .filter(|(_, t)| t.note.is_some())
            .count()
    }

    fn out_tensors(&self) -> Vec<OutTensor> {
        self.tensors
            .iter()
            .map(|(_, t)| OutTensor {
                name: t.name.clone(),
                ne: t.ne.clone(),
                ty: t.target_type,
                size: t.bytes,
            })
            .collect()
    }
}

/// Plans the output for `ftype`. `imatrix`: the path as given and the importance matrix, which
/// changes a few type choices and adds llama-quantize's `quantize.imatrix.*` keys.
pub fn prepare(
    source: &dyn Source,
    ftype: FileType,
    imatrix: Option<(&str, &imatrix::Imatrix)>,
) -> anyhow::Result<Prepared> {
    let mut inputs: Vec<(usize, PlanInput)> = source
        .tensors()
        .iter()
        .enumerate()
        .map(|(i, t)| {
            (
                i,
                PlanInput {
                    name: t.name.clone(),
                    ne: t.ne.clone(),
                    source_type: t.ty,
                    keep_type: t.keep_type,
                },
            )
        })
        .collect();
    {
        let mut only: Vec<PlanInput> = inputs.iter().map(|(_, p)| p.clone()).collect();
        plan::sort_like_llama_cpp(&mut only);
        let pos: std::collections::HashMap<&str, usize> =
            inputs.iter().map(|(i, p)| (p.name.as_str(), *i)).collect();
        inputs = only
            .into_iter()
            .map(|p| (pos[p.name.as_str()], p))
            .collect();
    }
    let plain: Vec<PlanInput> = inputs.iter().map(|(_, p)| p.clone()).collect();
    let planned = plan::plan(&source.shape(), ftype, &plain, imatrix.is_some())?;
    // As llama-quantize: both keys move to the end (its gguf_set_val removes, then appends), and
    // the split keys of a sharded source go (the output is one file).
    let mut metadata = source.metadata().clone();
    for key in [
        "general.quantization_version",
        "general.file_type",
        "split.no",
        "split.count",
        "split.tensors.count",
    ] {
        metadata.remove(key);
    }
    metadata.set("general.quantization_version", Value::U32(2));
    metadata.set("general.file_type", Value::U32(ftype.ftype_id()));
    if let Some((file, m)) = imatrix {
        // llama-quantize's keys (strings cut at 127 bytes, counts as u32), in its order.
        let cut = |s: &str| -> String {
            let mut end = s.len().min(127);
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            s[..end].to_string()
        };
        for key in [
            "quantize.imatrix.file",
            "quantize.imatrix.dataset",
            "quantize.imatrix.entries_count",
            "quantize.imatrix.chunks_count",
        ] {
            metadata.remove(key);
        }
        metadata.set("quantize.imatrix.file", Value::Str(cut(file)));
        if let Some(d) = m.datasets.first() {
            metadata.set("quantize.imatrix.dataset", Value::Str(cut(d)));
        }
        metadata.set(
            "quantize.imatrix.entries_count",
            Value::U32(m.entries.len() as u32),
        );
        if m.chunk_count > 0 {
            metadata.set("quantize.imatrix.chunks_count", Value::U32(m.chunk_count));
        }
    }
    let alignment = metadata
        .get_u64("general.alignment")
        .unwrap_or(gguf::DEFAULT_ALIGNMENT);
    let tensors: Vec<(usize, PlannedTensor)> =
        inputs.iter().map(|(i, _)| *i).zip(planned).collect();
    let source_bytes = tensors
        .iter()
        .map(|(i, _)| {
            let t = &source.tensors()[*i];
            t.ty.row_bytes(t.n_per_row()).unwrap_or(0) as u64 * t.n_rows() as u64
        })
        .sum();
    let mut p = Prepared {
        ftype,
        tensors,
        metadata,
        alignment,
        header_len: 0,
        total_bytes: 0,
        source_bytes,
        ternary_scale: Default::default(),
    };
    let outs = p.out_tensors();
    p.header_len = gguf::header_bytes(&p.metadata, &outs, alignment)?.len() as u64;
    p.total_bytes = gguf::file_size(p.header_len, &outs, alignment);
    Ok(p)
}

/// Reconstruction error of one tensor (`--dry-run --stats`): `‖w − ŵ‖ / ‖w‖` over the whole
/// tensor, for its planned type and, for TQ1_0/TQ2_0, each ternary scale.
#[derive(Debug, Clone)]
pub struct TensorError {
    pub name: String,
    pub target_type: GgmlType,
    /// (scale name or the type name, relative RMS error).
    pub errors: Vec<(String, f64)>,
}

/// Quantizes and dequantizes every tensor the plan quantizes, without writing anything, and
/// reports its relative reconstruction error (rows in chunks, in parallel).
pub fn reconstruction_errors(
    source: &dyn Source,
    prepared: &Prepared,
) -> anyhow::Result<Vec<TensorError>> {
    use blocks::ternary::TernaryScale;
    let mut out = Vec::new();
    for (si, t) in &prepared.tensors {
        let st = &source.tensors()[*si];
        if t.target_type == st.ty || !t.target_type.is_quantized() {
            continue;
        }
        let scales: Vec<(String, TernaryScale)> =
            if matches!(t.target_type, GgmlType::TQ1_0 | GgmlType::TQ2_0) {
                [TernaryScale::Absmax, TernaryScale::AbsmeanChannel]
                    .map(|s| (s.name().to_string(), s))
                    .to_vec()
            } else {
                vec![(t.target_type.name(), TernaryScale::Absmax)]
            };
        let n = st.n_per_row();
        let rows = st.n_rows();
        let row_bytes = t.target_type.row_bytes(n).context("planned row size")?;
        let rows_per_chunk = (CHUNK_ELEMS / n.max(1)).max(1);
        // Σ (w − ŵ)² per scale, and Σ w².
        let mut err = vec![0f64; scales.len()];
        let mut norm = 0f64;
        let mut r0 = 0;
        while r0 < rows {
            let r1 = (r0 + rows_per_chunk).min(rows);
            let sums: Vec<(Vec<f64>, f64)> = (r0..r1)
                .into_par_iter()
                .map(|r| -> anyhow::Result<(Vec<f64>, f64)> {
                    let mut x = vec![0f32; n];
                    source.read_rows(*si, r, &mut x)?;
                    let mut q = vec![0u8; row_bytes];
                    let mut y = vec![0f32; n];
                    let mut e = Vec::with_capacity(scales.len());
                    for (_, scale) in &scales {
                        blocks::quantize_rows_scaled(t.target_type, &x, n, None, *scale, &mut q)?;
                        blocks::dequantize(t.target_type, &q, &mut y)?;
                        e.push(
                            x.iter()
                                .zip(&y)
                                .map(|(a, b)| ((a - b) as f64).powi(2))
                                .sum(),
                        );
                    }
                    Ok((e, x.iter().map(|v| (*v as f64).powi(2)).sum()))
                })
                .collect::<anyhow::Result<_>>()
                .with_context(|| format!("tensor '{}'", t.name))?;
            for (e, w) in sums {
                for (acc, v) in err.iter_mut().zip(e) {
                    *acc += v;
                }
                norm += w;
            }
            source.release(*si, r0, r1);
            r0 = r1;
        }
        out.push(TensorError {
            name: t.name.clone(),
            target_type: t.target_type,
            errors: scales
                .iter()
                .zip(err)
                .map(|((name, _), e)| {
                    (
                        name.clone(),
                        if norm > 0.0 { (e / norm).sqrt() } else { 0.0 },
                    )
                })
                .collect(),
        });
    }
    Ok(out)
}

/// Progress of [`execute`], reported after every chunk.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub tensors_done: usize,
    pub tensors_total: usize,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// Per-column importance weights for a tensor (llama.cpp's `quant_weights`, from an imatrix
/// file): `ne0` values, times the expert count for a 3-D expert tensor (expert by expert).
pub trait Importance: Sync {
    fn weights(&self, tensor: &str) -> Option<&[f32]>;
}

/// Streams the planned tensors into `dest`. On error or when `cancel` becomes true, the temp file
/// is removed and `dest` is untouched. `sha256`: hash the output as it is written (for a store
/// manifest); [`gguf::Written::sha256`] is `None` otherwise.
pub fn execute(
    source: &dyn Source,
    prepared: &Prepared,
    dest: &Path,
    sha256: bool,
    importance: Option<&dyn Importance>,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(Progress),
) -> anyhow::Result<gguf::Written> {
    let outs = prepared.out_tensors();
    let mut writer =
        gguf::GgufWriter::create(dest, &prepared.metadata, &outs, prepared.alignment, sha256)?;
    let total = prepared.tensors.len();
    let mut done_bytes = 0u64;
    for (k, (si, t)) in prepared.tensors.iter().enumerate() {
        let st = &source.tensors()[*si];
        let n = st.n_per_row();
        let rows = st.n_rows();
        let rows_per_chunk = (CHUNK_ELEMS / n.max(1)).max(1);
        let copy = t.target_type == st.ty;
        let row_bytes = t.target_type.row_bytes(n).context("planned row size")?;
        let n_mat = if st.ne.len() >= 3 {
            st.ne[2..].iter().product::<u64>() as usize
        } else {
            1
        };
        // As llama-quantize: the weights must cover every matrix of the tensor; a mismatch is an
        // error (an imatrix of another model), except for token_embd, which is never collected.
        let imatrix = match importance.and_then(|imp| imp.weights(&t.name)) {
            Some(w) if w.len() == n * n_mat => Some(w),
            Some(_) if t.name.starts_with("token_embd") => None,
            Some(w) => bail!(
                "the importance matrix has {} values for '{}', which needs {} ({n} columns x {n_mat} matrices); \
                 was it made for another model?",
                w.len(),
                t.name,
                n * n_mat
            ),
            None => None,
        };
        let mut r0 = 0;
        while r0 < rows {
            if cancel.load(Ordering::Relaxed) {
                bail!("interrupted; no output was written");
            }
            let r1 = (r0 + rows_per_chunk).min(rows);
            if copy {
                let raw = source.raw_rows(*si, r0, r1)?;
                writer.write(&raw)?;
            } else {
                let mut out = vec![0u8; (r1 - r0) * row_bytes];
                // Split the chunk among threads by rows; each task reads and converts its own rows.
                let threads = rayon::current_num_threads().max(1);
                let task_rows = (r1 - r0).div_ceil(threads * 4).max(1);
                let rows_per_expert = st.ne.get(1).copied().unwrap_or(1).max(1) as usize;
                out.par_chunks_mut(task_rows * row_bytes)
                    .enumerate()
                    .try_for_each(|(ti, ob)| -> anyhow::Result<()> {
                        let a = r0 + ti * task_rows;
                        let nrows = ob.len() / row_bytes;
                        let mut x = vec![0f32; nrows * n];
                        source.read_rows(*si, a, &mut x)?;
                        // One expert per slice of rows: split at expert boundaries for the weights.
                        let mut r = 0;
                        while r < nrows {
                            let expert = (a + r) / rows_per_expert;
                            let end = ((expert + 1) * rows_per_expert - a).min(nrows);
                            let w = imatrix.map(|w| &w[expert * n..(expert + 1) * n]);
                            blocks::quantize_rows_scaled(
                                t.target_type,
                                &x[r * n..end * n],
                                n,
                                w,
                                prepared.ternary_scale,
                                &mut ob[r * row_bytes..end * row_bytes],
                            )
                            .with_context(|| format!("tensor '{}'", t.name))?;
                            r = end;
                        }
                        Ok(())
                    })?;
                writer.write(&out)?;
            }
            source.release(*si, r0, r1);
            done_bytes += ((r1 - r0) * row_bytes) as u64;
            progress(Progress {
                tensors_done: k,
                tensors_total: total,
                bytes_done: done_bytes,
                bytes_total: prepared.total_bytes,
            });
            r0 = r1;
        }
        if rows == 0 {
            writer.write(&[])?;
        }
    }
    if cancel.load(Ordering::Relaxed) {
        bail!("interrupted; no output was written");
    }
    let written = writer.finish()?;
    progress(Progress {
        tensors_done: total,
        tensors_total: total,
        bytes_done: prepared.total_bytes,
        bytes_total: prepared.total_bytes,
    });
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_space_check_says_need_and_have() {
        let dir = tempfile::tempdir().unwrap();
        ensure_disk_space(dir.path(), 1).unwrap();
        let err = ensure_disk_space(dir.path(), u64::MAX)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("not enough disk space") && err.contains("need") && err.contains("have"),
            "{err}"
        );
    }
}
