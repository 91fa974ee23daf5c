//! `xllm quantize SOURCE --type TYPE [--output FILE | --name NAME] [--dry-run]`: renders the plan,
//! checks disk space, drives [`crate::quantize::execute`] with a progress bar, and registers the
//! result in the store for `--name`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};

use super::QuantizeArgs;
use crate::quantize::imatrix::Imatrix;
use crate::quantize::{self, FileType, Prepared};
use crate::store::lock::ModelLock;
use crate::store::manifest::{
    FileEntry, GgufVariant, Manifest, Source as ManifestSource, SCHEMA_VERSION,
};
use crate::store::{human_bytes, ModelFormat, Store};

/// The file or folder a SOURCE argument names: a path on disk, else a model in the store.
fn source_path(source: &str) -> anyhow::Result<PathBuf> {
    let p = Path::new(source);
    if p.exists() {
        return Ok(p.to_path_buf());
    }
    let opened = crate::store::resolve::open_model(source)?;
    Ok(opened.gguf_file.unwrap_or(opened.dir))
}

fn shape_text(ne: &[u64]) -> String {
    ne.iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(" x ")
}

/// Prints to stdout; a closed pipe (`| head`) is not an error.
fn emit(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

fn print_plan(p: &Prepared, json: bool) -> anyhow::Result<()> {
    if json {
        let tensors: Vec<serde_json::Value> = p
            .tensors
            .iter()
            .map(|(_, t)| {
                serde_json::json!({
                    "name": t.name,
                    "role": t.role.name(),
                    "shape": t.ne,
                    "source_type": t.source_type.name(),
                    "target_type": t.target_type.name(),
                    "bytes": t.bytes,
                    "fallback": t.note,
                })
            })
            .collect();
        let doc = serde_json::json!({
            "type": p.ftype.name(),
            "tensors": tensors,
            "output_bytes": p.total_bytes,
            "source_bytes": p.source_bytes,
            "fallbacks": p.fallbacks(),
        });
        return emit(&format!("{}\n", serde_json::to_string_pretty(&doc)?));
    }
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::NOTHING);
    table.set_header(["TENSOR", "ROLE", "SHAPE (ne0 x ne1 ...)", "TYPE", "BYTES"]);
    for (_, t) in &p.tensors {
        let mark = if t.note.is_some() { " *" } else { "" };
        table.add_row([
            t.name.clone(),
            t.role.name().to_string(),
            shape_text(&t.ne),
            format!("{} -> {}{mark}", t.source_type, t.target_type),
            human_bytes(t.bytes),
        ]);
    }
    let mut text = format!("{table}\n");
    for (_, t) in &p.tensors {
        if let Some(n) = &t.note {
            text.push_str(&format!("* {}: {n}\n", t.name));
        }
    }
    text.push_str(&format!(
        "{} tensors, {} -> {} ({}), output size {} ({} bytes){}\n",
        p.tensors.len(),
        human_bytes(p.source_bytes),
        human_bytes(p.total_bytes),
        p.ftype,
        human_bytes(p.total_bytes),
        p.total_bytes,
        match p.fallbacks() {
            0 => String::new(),
            n => format!("; {n} tensors fall back to another type (row sizes)"),
        }
    ));
    emit(&text)
}

/// `--stats`: relative reconstruction error per tensor (both ternary scales for TQ types).
fn print_stats(errors: &[quantize::TensorError], json: bool) -> anyhow::Result<()> {
    if json {
        let doc: Vec<serde_json::Value> = errors
            .iter()
            .map(|e| {
                let by: serde_json::Map<String, serde_json::Value> = e
                    .errors
                    .iter()
                    .map(|(k, v)| (k.clone(), serde_json::json!(v)))
                    .collect();
                serde_json::json!({"name": e.name, "type": e.target_type.name(), "relative_rms_error": by})
            })
            .collect();
        return emit(&format!(
            "{}\n",
            serde_json::to_string_pretty(&serde_json::json!({ "reconstruction": doc }))?
        ));
    }
    let ternary = errors.iter().any(|e| e.errors.len() > 1);
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::NOTHING);
    if ternary {
        table.set_header(["TENSOR", "TYPE", "ERROR absmax", "ERROR absmean-channel"]);
    } else {
        table.set_header(["TENSOR", "TYPE", "ERROR"]);
    }
    for e in errors {
        let mut row = vec![e.name.clone(), e.target_type.name()];
        row.extend(e.errors.iter().map(|(_, v)| format!("{v:.4}")));
        table.add_row(row);
    }
    emit(&format!(
        "{table}\nreconstruction error: ‖w − ŵ‖ / ‖w‖ over each tensor\n"
    ))
}

fn default_output(source: &Path, ftype: FileType) -> PathBuf {
    let stem = source
        .file_stem()
        .or_else(|| source.file_name())
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "model".into());
    PathBuf::from(format!("{stem}-{}.gguf", ftype.name()))
}

pub fn run(a: QuantizeArgs) -> anyhow::Result<()> {
    let ftype = FileType::parse(&a.ty)?;
    let path = source_path(&a.source)?;
    let source = quantize::open_source(&path)?;
    let imatrix = match &a.imatrix {
        Some(p) => Some(Imatrix::read(p)?),
        None => None,
    };
    let imatrix_arg = a.imatrix.as_ref().map(|p| p.to_string_lossy().to_string());
    let mut prepared = quantize::prepare(
        source.as_ref(),
        ftype,
        imatrix_arg.as_deref().zip(imatrix.as_ref()),
    )?;
    match &imatrix {
        Some(m) => eprintln!(
            "importance matrix: {} entries, {} chunks{}",
            m.entries.len(),
            m.chunk_count,
            m.datasets
                .first()
                .map(|d| format!(", from {d}"))
                .unwrap_or_default()
        ),
        None if ftype == FileType::Q2K => eprintln!(
            "warning: {ftype} without an importance matrix loses much more than it needs to; \
             make one with `xllm imatrix MODEL -o imatrix.gguf` and pass --imatrix imatrix.gguf"
        ),
        None => {}
    }
    prepared.ternary_scale = quantize::blocks::ternary::TernaryScale::parse(&a.ternary_scale)?;
    let bitnet_source =
        source.metadata().get_str("general.architecture") == Some("bitnet") && !path.is_file();
    if bitnet_source && prepared.ternary_scale != Default::default() {
        bail!(
            "--ternary-scale {}: this BitNet checkpoint is already ternary; its BitLinear weights are written \
             exactly, with the scale its training used (`<name>.scale`)",
            a.ternary_scale
        );
    }
    if a.dry_run {
        print_plan(&prepared, a.json)?;
        if a.stats {
            print_stats(
                &quantize::reconstruction_errors(source.as_ref(), &prepared)?,
                a.json,
            )?;
        }
        return Ok(());
    }
    let store = if a.name.is_some() {
        Some(Store::open_default()?)
    } else {
        None
    };
    // With --name the file is written into a staging folder under the store root (never listed)
    // and moved into the model folder under the model's lock once complete, manifest last: the
    // model appears in `list` whole or not at all, and a concurrent pull/quantize of the same
    // name cannot interleave with it.
    let (dest, staging) = match (&a.output, &a.name, &store) {
        (Some(o), _, _) => (o.clone(), None),
        (None, Some(name), Some(store)) => {
            if name.is_empty()
                || name.contains("..")
                || name.starts_with('/')
                || name.split('/').count() > 2
            {
                bail!("--name '{name}' is not a valid model name (use `name` or `org/name`)");
            }
            if store.find(name)?.is_some() {
                bail!("model '{name}' is already in the store; remove it first (`xllm rm {name}`) or pick another --name");
            }
            let folder = store
                .model_dir(name)
                .file_name()
                .map(|f| f.to_string_lossy().to_string())
                .unwrap_or_default();
            let staging = store
                .root()
                .join("tmp")
                .join(format!("quantize-{folder}-{}", std::process::id()));
            let file = format!(
                "{}-{}.gguf",
                name.rsplit('/').next().unwrap_or(name),
                ftype.name()
            );
            (staging.join(file), Some(staging))
        }
        _ => (default_output(&path, ftype), None),
    };
    let out_dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let remove_staging = || {
        if let Some(d) = &staging {
            let _ = std::fs::remove_dir_all(d);
        }
    };
    if let Err(e) = quantize::ensure_disk_space(&out_dir, prepared.total_bytes) {
        remove_staging();
        return Err(e);
    }
    let cancel = Arc::new(AtomicBool::new(false));
    {
        let c = cancel.clone();
        // Ctrl-C stops at the next chunk; the temp file is removed as the writer drops.
        let _ = ctrlc::set_handler(move || c.store(true, Ordering::SeqCst));
    }
    let bar = indicatif::ProgressBar::new(prepared.total_bytes);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "quantizing {msg} ▕{bar:30}▏ {bytes}/{total_bytes} {bytes_per_sec} {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let start = std::time::Instant::now();
    let table = imatrix.as_ref().map(Imatrix::importance);
    let importance = table.as_ref().map(|t| t as &dyn quantize::Importance);
    // Only a store model needs the file's sha256 (its manifest); `-o` files skip the hashing.
    let into_store = store.is_some() && a.name.is_some();
    let result = quantize::execute(
        source.as_ref(),
        &prepared,
        &dest,
        into_store,
        importance,
        &cancel,
        &mut |p| {
            bar.set_position(p.bytes_done);
            bar.set_message(format!("{}/{} tensors", p.tensors_done, p.tensors_total));
        },
    );
    bar.finish_and_clear();
    let written = match result {
        Ok(w) => w,
        Err(e) => {
            remove_staging();
            return Err(e);
        }
    };
    let secs = start.elapsed().as_secs_f64();
    if let (Some(store), Some(name)) = (&store, &a.name) {
        let Some(sha256) = written.sha256.clone() else {
            remove_staging();
            bail!("internal error: the output's sha256 was not computed");
        };
        let file = dest
            .file_name()
            .map(|f| f.to_string_lossy().to_string())
            .unwrap_or_default();
        let mut metadata = crate::model::inspect::inspect_gguf(&dest).unwrap_or_default();
        metadata.quantization = ftype.name().to_string();
        let manifest = Manifest {
            schema_version: SCHEMA_VERSION,
            name: name.clone(),
            source: ManifestSource {
                repo: format!("quantized from {}", a.source),
                revision: ftype.name().to_string(),
                commit: String::new(),
                endpoint: "local".into(),
            },
            format: ModelFormat::Gguf,
            metadata,
            gguf_variants: vec![GgufVariant {
                quantization: ftype.name().to_string(),
                file: file.clone(),
            }],
            files: vec![FileEntry {
                path: file,
                size: written.size,
                sha256,
            }],
            pulled_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        };
        let dir = store.model_dir(name);
        let added = add_to_store(&dir, name, &dest, &manifest);
        remove_staging();
        added?;
        eprintln!(
            "added '{name}' to the store ({}; {ftype}, {} tensors, {}) in {secs:.1} s",
            dir.display(),
            prepared.tensors.len(),
            human_bytes(written.size)
        );
        return Ok(());
    }
    eprintln!(
        "wrote {} ({}, {} tensors, {}) in {secs:.1} s",
        dest.display(),
        ftype,
        prepared.tensors.len(),
        human_bytes(written.size)
    );
    Ok(())
}

/// Moves the finished file from its staging folder into the model folder `dir`, under the
/// model's lock, and writes the manifest last (atomically): until then the folder holds no
/// manifest and `list` does not show it as ready.
fn add_to_store(dir: &Path, name: &str, file: &Path, manifest: &Manifest) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let Some(_lock) = ModelLock::try_acquire(dir)? else {
        bail!("another xllm process (pull or quantize) is writing '{name}' right now; try again when it is done or pick another --name");
    };
    if Manifest::read(dir)?.is_some() {
        bail!("model '{name}' was added to the store while quantizing; remove it first (`xllm rm {name}`) or pick another --name");
    }
    let target = dir.join(file.file_name().context("output file name")?);
    std::fs::rename(file, &target)
        .with_context(|| format!("cannot move {} to {}", file.display(), target.display()))?;
    if let Err(e) = manifest.write(dir) {
        let _ = std::fs::remove_file(&target);
        return Err(e);
    }
    Ok(())
}
