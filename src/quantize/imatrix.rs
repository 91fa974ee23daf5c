//! Importance matrices in llama.cpp's two file formats, and their use by `xllm quantize`.
//!
//! GGUF (llama-imatrix's default since 2025): metadata `general.type = "imatrix"`,
//! `imatrix.datasets` (strings), `imatrix.chunk_count`, `imatrix.chunk_size` (u32); per weight,
//! F32 tensors `<name>.in_sum2` `{ne0, n_mat}` (sums of squared input activations per column, one
//! row per expert) and `<name>.counts` `{1, n_mat}` (tokens seen by each matrix), sorted by name.
//!
//! Legacy `.dat`: i32 entry count; per entry i32 name length, name, i32 ncall, i32 nval,
//! f32[nval] = (sum / count) * ncall; then optionally i32 chunk count, i32 length + dataset.
//!
//! llama-quantize uses `sum / count` per matrix (GGUF; a matrix never used gets 1.0) or
//! `value / ncall` (legacy) as the per-column weight; [`Imatrix::importance`] does the same.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::Path;

use anyhow::{bail, Context};

use super::gguf::{GgufReader, GgufWriter, Metadata, OutTensor, Value, DEFAULT_ALIGNMENT, MAGIC};
use super::types::GgmlType;
use super::Importance;

/// One weight's statistics: `sums` has `counts.len()` rows of `sums.len() / counts.len()`.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub sums: Vec<f32>,
    pub counts: Vec<f32>,
}

/// An importance matrix as stored.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Imatrix {
    /// By weight name (`blk.0.attn_q.weight`), in name order.
    pub entries: BTreeMap<String, Entry>,
    pub datasets: Vec<String>,
    pub chunk_count: u32,
    pub chunk_size: u32,
    /// Read from a legacy `.dat` file: `sums` hold `(sum / count) * ncall`, `counts` `[ncall]`.
    pub legacy: bool,
}

impl Imatrix {
    /// Reads either format (GGUF by its magic, else legacy).
    pub fn read(path: &Path) -> anyhow::Result<Imatrix> {
        let mut magic = [0u8; 4];
        std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .with_context(|| format!("cannot read importance matrix {}", path.display()))?;
        let m = if u32::from_le_bytes(magic) == MAGIC {
            Self::read_gguf(path)
        } else {
            Self::read_dat(path)
        };
        m.with_context(|| format!("importance matrix {}", path.display()))
    }

    fn read_gguf(path: &Path) -> anyhow::Result<Imatrix> {
        let r = GgufReader::open(path)?;
        let mut m = Imatrix {
            datasets: match r.metadata.get("imatrix.datasets") {
                Some(Value::Array(_, items)) => items
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect(),
                _ => Vec::new(),
            },
            chunk_count: r.metadata.get_u64("imatrix.chunk_count").unwrap_or(0) as u32,
            chunk_size: r.metadata.get_u64("imatrix.chunk_size").unwrap_or(0) as u32,
            ..Default::default()
        };
        for key in [
            "imatrix.datasets",
            "imatrix.chunk_count",
            "imatrix.chunk_size",
        ] {
            if r.metadata.get(key).is_none() {
                bail!("it has no '{key}' (not an imatrix written by llama-imatrix or xllm)");
            }
        }
        // Per weight: (sums, counts) as found.
        type Found = (Option<Vec<f32>>, Option<Vec<f32>>);
        let mut parts: BTreeMap<String, Found> = BTreeMap::new();
        for t in &r.tensors {
            let (base, is_sum) = if let Some(b) = t.name.strip_suffix(".in_sum2") {
                (b, true)
            } else if let Some(b) = t.name.strip_suffix(".counts") {
                (b, false)
            } else {
                continue;
            };
            if t.ty != GgmlType::F32 {
                bail!("tensor '{}' is {}, expected F32", t.name, t.ty);
            }
            let values: Vec<f32> = r
                .data(t)
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            let slot = parts.entry(base.to_string()).or_default();
            if is_sum {
                slot.0 = Some(values);
            } else {
                slot.1 = Some(values);
            }
        }
        for (name, (sums, counts)) in parts {
            let (Some(sums), Some(counts)) = (sums, counts) else {
                bail!("'{name}' has sums without counts or counts without sums");
            };
            if counts.is_empty() || sums.len() % counts.len() != 0 {
                bail!(
                    "'{name}' has {} sums for {} matrices",
                    sums.len(),
                    counts.len()
                );
            }
            m.entries.insert(name, Entry { sums, counts });
        }
        if m.entries.is_empty() {
            bail!("it holds no entries");
        }
        Ok(m)
    }

    fn read_dat(path: &Path) -> anyhow::Result<Imatrix> {
        let bytes = std::fs::read(path)?;
        let mut pos = 0usize;
        let mut take = |n: usize| -> anyhow::Result<&[u8]> {
            if pos + n > bytes.len() {
                bail!("it ends early (neither a GGUF imatrix nor a complete legacy .dat)");
            }
            pos += n;
            Ok(&bytes[pos - n..pos])
        };
        fn i32_of(b: &[u8]) -> i32 {
            i32::from_le_bytes([b[0], b[1], b[2], b[3]])
        }
        let n_entries = i32_of(take(4)?);
        if n_entries < 1 {
            bail!("it holds no entries (not an imatrix file)");
        }
        let mut m = Imatrix {
            legacy: true,
            ..Default::default()
        };
        for i in 0..n_entries {
            let len = i32_of(take(4)?);
            if !(1..=4096).contains(&len) {
                bail!("entry {i} has a name of {len} bytes (not an imatrix file)");
            }
            let name = String::from_utf8_lossy(take(len as usize)?).to_string();
            let ncall = i32_of(take(4)?);
            let nval = i32_of(take(4)?);
            if nval < 1 {
                bail!("entry '{name}' has {nval} values");
            }
            let sums = take(nval as usize * 4)?
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            m.entries.insert(
                name,
                Entry {
                    sums,
                    counts: vec![ncall as f32],
                },
            );
        }
        // Optional trailer: chunk count, dataset.
        if let Ok(b) = take(4) {
            m.chunk_count = i32_of(b).max(0) as u32;
            if let Ok(b) = take(4) {
                let len = i32_of(b);
                if len > 0 {
                    if let Ok(d) = take(len as usize) {
                        m.datasets.push(String::from_utf8_lossy(d).to_string());
                    }
                }
            }
        }
        Ok(m)
    }

    /// Writes llama.cpp's GGUF imatrix format (what `llama-imatrix` writes by default).
    pub fn write_gguf(&self, path: &Path) -> anyhow::Result<()> {
        let mut md = Metadata(Vec::new());
        md.set("general.type", Value::Str("imatrix".into()));
        md.set("imatrix.datasets", Value::strings(self.datasets.clone()));
        md.set("imatrix.chunk_count", Value::U32(self.chunk_count));
        md.set("imatrix.chunk_size", Value::U32(self.chunk_size));
        let mut tensors = Vec::new();
        for (name, e) in &self.entries {
            let n_mat = e.counts.len() as u64;
            tensors.push(OutTensor {
                name: format!("{name}.in_sum2"),
                ne: vec![e.sums.len() as u64 / n_mat, n_mat],
                ty: GgmlType::F32,
                size: e.sums.len() as u64 * 4,
            });
            tensors.push(OutTensor {
                name: format!("{name}.counts"),
                ne: vec![1, n_mat],
                ty: GgmlType::F32,
                size: n_mat * 4,
            });
        }
        let mut w = GgufWriter::create(path, &md, &tensors, DEFAULT_ALIGNMENT, false)?;
        for e in self.entries.values() {
            w.write(&f32_bytes(&e.sums))?;
            w.write(&f32_bytes(&e.counts))?;
        }
        w.finish()?;
        Ok(())
    }

    /// Writes the legacy `.dat` format (`llama-imatrix --output-format dat`), atomically.
    pub fn write_dat(&self, path: &Path) -> anyhow::Result<()> {
        let mut out = Vec::new();
        let chunk = self.chunk_size.max(1) as f32;
        let stored: Vec<_> = self
            .entries
            .iter()
            .filter(|(_, e)| e.counts.iter().any(|&c| c > 0.0))
            .collect();
        out.extend((stored.len() as i32).to_le_bytes());
        for (name, e) in stored {
            out.extend((name.len() as i32).to_le_bytes());
            out.extend(name.as_bytes());
            let max_count = e.counts.iter().fold(0.0f32, |a, &c| a.max(c));
            // Ceiling division, as llama-imatrix, so no entry gets ncall 0.
            let ncall = ((max_count + chunk - 1.0) / chunk).floor() as i32;
            out.extend(ncall.to_le_bytes());
            out.extend((e.sums.len() as i32).to_le_bytes());
            let per = e.sums.len() / e.counts.len();
            for (i, &v) in e.sums.iter().enumerate() {
                let count = e.counts[i / per];
                let (v, c) = if count == 0.0 { (1.0, 1.0) } else { (v, count) };
                out.extend(((v / c) * ncall as f32).to_le_bytes());
            }
        }
        out.extend((self.chunk_count as i32).to_le_bytes());
        let dataset = self.datasets.last().cloned().unwrap_or_default();
        out.extend((dataset.len() as i32).to_le_bytes());
        out.extend(dataset.as_bytes());
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        };
        let mut tmp = tempfile::NamedTempFile::new_in(&dir)
            .with_context(|| format!("cannot create a temp file in {}", dir.display()))?;
        tmp.write_all(&out)?;
        tmp.persist(path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(())
    }

    /// Per-column weights as llama-quantize derives them from this file.
    pub fn importance(&self) -> ImportanceTable {
        let mut table = HashMap::new();
        for (name, e) in &self.entries {
            let mut w = e.sums.clone();
            if self.legacy {
                let ncall = e.counts.first().copied().unwrap_or(0.0);
                if ncall > 0.0 {
                    w.iter_mut().for_each(|v| *v /= ncall);
                }
            } else {
                let per = e.sums.len() / e.counts.len();
                for (j, &count) in e.counts.iter().enumerate() {
                    for v in &mut w[j * per..(j + 1) * per] {
                        *v = if count > 0.0 { *v / count } else { 1.0 };
                    }
                }
            }
            table.insert(name.clone(), w);
        }
        ImportanceTable(table)
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Per-column weights by tensor name, for [`super::execute`].
pub struct ImportanceTable(pub HashMap<String, Vec<f32>>);

impl Importance for ImportanceTable {
    fn weights(&self, tensor: &str) -> Option<&[f32]> {
        self.0.get(tensor).map(Vec::as_slice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Imatrix {
        let mut m = Imatrix {
            datasets: vec!["calibration.txt".into()],
            chunk_count: 3,
            chunk_size: 512,
            ..Default::default()
        };
        m.entries.insert(
            "blk.0.ffn_down.weight".into(),
            Entry {
                sums: vec![2.0, 4.0, 6.0, 8.0],
                counts: vec![1536.0],
            },
        );
        m.entries.insert(
            "blk.0.ffn_up_exps.weight".into(),
            Entry {
                sums: vec![3.0, 6.0, 5.0, 7.0],
                counts: vec![3.0, 0.0],
            },
        );
        m
    }

    #[test]
    fn gguf_round_trips_and_weights_are_sums_over_counts() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf");
        let m = sample();
        m.write_gguf(&p).unwrap();
        let back = Imatrix::read(&p).unwrap();
        assert_eq!(back, m);
        let w = back.importance();
        assert_eq!(
            w.weights("blk.0.ffn_down.weight").unwrap(),
            &[2.0 / 1536.0, 4.0 / 1536.0, 6.0 / 1536.0, 8.0 / 1536.0]
        );
        // Expert 1 was never routed to: weight 1, as llama-quantize.
        assert_eq!(
            w.weights("blk.0.ffn_up_exps.weight").unwrap(),
            &[1.0, 2.0, 1.0, 1.0]
        );
    }

    #[test]
    fn legacy_dat_round_trips_to_the_same_weights() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.dat");
        let m = sample();
        m.write_dat(&p).unwrap();
        let back = Imatrix::read(&p).unwrap();
        assert!(back.legacy);
        assert_eq!(back.chunk_count, 3);
        assert_eq!(back.datasets, vec!["calibration.txt".to_string()]);
        let (a, b) = (m.importance(), back.importance());
        for name in m.entries.keys() {
            let (x, y) = (a.weights(name).unwrap(), b.weights(name).unwrap());
            for (u, v) in x.iter().zip(y) {
                assert!((u - v).abs() <= 1e-6 * u.abs(), "{name}: {x:?} vs {y:?}");
            }
        }
    }

    #[test]
    fn garbage_is_refused_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.dat");
        std::fs::write(&p, [1u8, 0, 0, 0, 200, 200, 0, 0]).unwrap();
        let err = format!("{:#}", Imatrix::read(&p).unwrap_err());
        assert!(err.contains("importance matrix"), "{err}");
    }
}
