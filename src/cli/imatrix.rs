//! `xllm imatrix MODEL [--file TEXT] [--chunks N] [--ctx N] -o FILE`: runs the model on
//! calibration text and records, for every matmul weight of the layers (`blk.*`, as
//! llama-imatrix), the sum of squared input activations per column and the token count, then
//! writes them in llama.cpp's imatrix format for `xllm quantize --imatrix` or
//! `llama-quantize --imatrix`.
//!
//! The text is processed as llama-imatrix does: tokenized once (with BOS when the model adds
//! one), cut into chunks of `--ctx` tokens (the partial tail dropped), each chunk run alone from
//! an empty cache with its first token replaced by BOS.
//!
//! Results are cached in the model's folder (`.imatrix-cache/`), keyed by a fingerprint of the
//! model files, the text's sha256, `--ctx` and the chunk count, so a second run is a copy.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use sha2::{Digest, Sha256};

use super::ImatrixArgs;
use crate::engine::session::{self, OpenOptions};
use crate::kernels::act_stats::ActivationStats;
use crate::quantize::imatrix::{Entry, Imatrix};

/// The text used when neither `--file` nor a `calibration.txt` next to the model is there.
/// Written for xllm (Apache-2.0, like the project); see assets/calibration.txt.
const DEFAULT_TEXT: &str = include_str!("../../assets/calibration.txt");
const DEFAULT_NAME: &str = "xllm built-in calibration text (assets/calibration.txt, Apache-2.0)";

/// Where the calibration text came from, for the message and the file's `imatrix.datasets`.
struct Calibration {
    text: String,
    /// Recorded as the dataset (a path, or the built-in text's name).
    dataset: String,
    why: &'static str,
}

fn calibration(args: &ImatrixArgs, model_dir: &Path) -> anyhow::Result<Calibration> {
    if let Some(f) = &args.file {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("cannot read calibration text {}", f.display()))?;
        return Ok(Calibration {
            text,
            dataset: f.to_string_lossy().to_string(),
            why: "--file",
        });
    }
    let beside = model_dir.join("calibration.txt");
    if beside.is_file() {
        let text = std::fs::read_to_string(&beside)
            .with_context(|| format!("cannot read {}", beside.display()))?;
        return Ok(Calibration {
            text,
            dataset: beside.to_string_lossy().to_string(),
            why: "calibration.txt in the model's folder",
        });
    }
    Ok(Calibration {
        text: DEFAULT_TEXT.to_string(),
        dataset: DEFAULT_NAME.to_string(),
        why: "no --file and no calibration.txt in the model's folder",
    })
}

/// A cheap content fingerprint of the model's files: name, size and the first and last MiB of
/// each (hashing a whole multi-GB model would cost more than the imatrix run).
fn model_fingerprint(dir: &Path, gguf: Option<&Path>) -> anyhow::Result<String> {
    let mut files: Vec<PathBuf> = match gguf {
        Some(f) => vec![f.to_path_buf()],
        None => std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension()
                    .is_some_and(|e| e == "safetensors" || e == "json")
            })
            .collect(),
    };
    files.sort();
    let mut h = Sha256::new();
    for f in files {
        let mut file =
            std::fs::File::open(&f).with_context(|| format!("cannot read {}", f.display()))?;
        let len = file.metadata()?.len();
        h.update(f.file_name().unwrap_or_default().as_encoded_bytes());
        h.update(len.to_le_bytes());
        let mut buf = vec![0u8; (1 << 20).min(len as usize)];
        file.read_exact(&mut buf)?;
        h.update(&buf);
        if len > buf.len() as u64 {
            use std::io::{Seek, SeekFrom};
            file.seek(SeekFrom::Start(len - buf.len() as u64))?;
            file.read_exact(&mut buf)?;
            h.update(&buf);
        }
    }
    Ok(hex(&h.finalize()[..8]))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn write_output(m: &Imatrix, out: &Path) -> anyhow::Result<()> {
    if out.extension().is_some_and(|e| e == "dat") {
        m.write_dat(out)
    } else {
        m.write_gguf(out)
    }
}

pub fn run(args: ImatrixArgs) -> anyhow::Result<()> {
    if args.ctx < 16 {
        bail!("--ctx must be at least 16 tokens (llama-imatrix ignores smaller batches)");
    }
    if args.chunks == Some(0) {
        bail!("--chunks must be at least 1");
    }
    let opened = crate::store::open_model(&args.model)?;
    let model_dir = match &opened.gguf_file {
        Some(f) => f.parent().map(Path::to_path_buf).unwrap_or_default(),
        None => opened.dir.clone(),
    };
    let cal = calibration(&args, &model_dir)?;
    eprintln!("calibration text: {} ({})", cal.dataset, cal.why);

    let key = format!(
        "{}-{}-c{}-n{}",
        model_fingerprint(&opened.dir, opened.gguf_file.as_deref())?,
        hex(&Sha256::digest(cal.text.as_bytes())[..8]),
        args.ctx,
        args.chunks.map_or("all".to_string(), |n| n.to_string())
    );
    let cache_dir = model_dir.join(".imatrix-cache");
    let cached = cache_dir.join(format!("{key}.imatrix"));
    if !args.no_cache && cached.is_file() {
        if let Ok(m) = Imatrix::read(&cached) {
            write_output(&m, &args.output)?;
            eprintln!(
                "same model and text as a previous run: copied {} to {} (--no-cache recomputes)",
                cached.display(),
                args.output.display()
            );
            return Ok(());
        }
    }

    let stats = ActivationStats::new();
    let session = session::open(
        &args.model,
        &OpenOptions {
            device: Some("cpu".into()),
            ctx: Some(args.ctx),
            activation_stats: Some(stats.clone()),
        },
    )?;
    let loaded = &session.loaded;
    let tokens = loaded.tokenizer.encode(&cal.text, true)?;
    let available = tokens.len() / args.ctx;
    if available == 0 {
        bail!(
            "the calibration text has {} tokens, less than one chunk of --ctx {}; use a longer text or a smaller --ctx",
            tokens.len(),
            args.ctx
        );
    }
    let chunks = args.chunks.map_or(available, |n| n.min(available));

    // BOS starts every chunk when the model adds it to a raw prompt (as encoding just did).
    let bos = loaded
        .tokenizer
        .bos_id
        .filter(|b| tokens.first() == Some(b));
    let mut state = loaded
        .model
        .info()
        .new_cache(session.kv_profile(), args.ctx)?;
    let t0 = Instant::now();
    for c in 0..chunks {
        let mut chunk = tokens[c * args.ctx..(c + 1) * args.ctx].to_vec();
        if let Some(bos) = bos {
            chunk[0] = bos;
        }
        state.clear();
        loaded.model.forward(&chunk, &mut state, true)?;
        let secs = t0.elapsed().as_secs_f64();
        eprint!(
            "\rchunk {}/{chunks} ({:.1} s, {:.0} tokens/s)",
            c + 1,
            secs,
            ((c + 1) * args.ctx) as f64 / secs
        );
    }
    eprintln!();

    let collected = stats.snapshot();
    if collected.is_empty() {
        bail!(
            "no matmul inputs were recorded: the architecture of '{}' has no activation hooks yet",
            args.model
        );
    }
    let mut m = Imatrix {
        datasets: vec![cal.dataset.clone()],
        chunk_count: chunks as u32,
        chunk_size: args.ctx as u32,
        ..Default::default()
    };
    for (name, s) in collected {
        m.entries.insert(
            name,
            Entry {
                sums: s.sums.iter().map(|&v| v as f32).collect(),
                counts: s.counts.iter().map(|&c| c as f32).collect(),
            },
        );
    }
    write_output(&m, &args.output)?;
    eprintln!(
        "wrote {} ({} weights, {chunks} chunks of {} tokens) in {:.1} s",
        args.output.display(),
        m.entries.len(),
        args.ctx,
        t0.elapsed().as_secs_f64()
    );
    // The cache is a convenience: a read-only model folder only costs the next run.
    let saved = std::fs::create_dir_all(&cache_dir)
        .map_err(anyhow::Error::from)
        .and_then(|_| m.write_gguf(&cached));
    if let Err(e) = saved {
        eprintln!(
            "note: could not cache the result in {}: {e:#}",
            cache_dir.display()
        );
    }
    Ok(())
}
