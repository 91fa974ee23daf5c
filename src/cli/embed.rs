//! `xllm embed`: embedding vectors for texts given as arguments, read from `--file` (one per line)
//! or from stdin lines. Output: one JSON array per line (default), JSON Lines objects
//! (`--format jsonl`) or one JSON document (`--json` / `--format json`).

use std::io::{IsTerminal, Read};
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;

use super::{EmbedArgs, EmbedFormat};
use crate::engine::embed::{EmbedOptions, EmbeddingModel, Overflow};

#[derive(Serialize)]
struct JsonlRow<'a> {
    index: usize,
    tokens: usize,
    embedding: &'a [f32],
}

#[derive(Serialize)]
struct JsonDoc<'a> {
    model: &'a str,
    dimensions: usize,
    normalized: bool,
    pooling: String,
    /// Token count of each input, after truncation.
    tokens: &'a [usize],
    embeddings: &'a [Vec<f32>],
}

/// The inputs: arguments, else `--file` lines, else stdin lines (non-empty lines are inputs).
fn inputs(args: &EmbedArgs) -> anyhow::Result<Vec<String>> {
    if !args.texts.is_empty() {
        if args.file.is_some() {
            anyhow::bail!("give texts as arguments or with --file, not both");
        }
        return Ok(args.texts.clone());
    }
    let text = match &args.file {
        Some(path) if path.as_os_str() == "-" => read_stdin()?,
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?,
        None => {
            if std::io::stdin().is_terminal() {
                anyhow::bail!(
                    "nothing to embed: give texts as arguments, --file FILE, or lines on stdin"
                );
            }
            read_stdin()?
        }
    };
    let lines: Vec<String> = text
        .lines()
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    if lines.is_empty() {
        anyhow::bail!("nothing to embed: the input has no non-empty lines");
    }
    Ok(lines)
}

fn read_stdin() -> anyhow::Result<String> {
    let mut s = String::new();
    std::io::stdin()
        .lock()
        .read_to_string(&mut s)
        .context("cannot read stdin (is it UTF-8 text?)")?;
    Ok(s)
}

pub fn run(args: EmbedArgs) -> anyhow::Result<()> {
    let format = if args.json {
        EmbedFormat::Json
    } else {
        args.format
    };
    let texts = inputs(&args)?;
    if let Some(spec) = args.device.as_deref() {
        if spec != "cpu" {
            anyhow::bail!(
                "embedding models run on the CPU for now; use --device cpu or leave it out"
            );
        }
    }
    let resolved = crate::store::resolve_for_run(&args.model)?;
    let t0 = Instant::now();
    let model = EmbeddingModel::load(&resolved)
        .with_context(|| format!("cannot load model '{}'", resolved.display_name))?;
    let options = EmbedOptions {
        overflow: if args.no_truncate {
            Overflow::Refuse
        } else {
            Overflow::Truncate
        },
        dimensions: args.dimensions,
    };
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let t1 = Instant::now();
    let out = model.embed(&refs, &options)?;
    if args.verbose {
        let secs = t1.elapsed().as_secs_f64();
        eprintln!("load duration:        {:.3}s", (t1 - t0).as_secs_f64());
        eprintln!("embed duration:       {secs:.3}s");
        eprintln!("inputs:               {}", out.vectors.len());
        eprintln!("tokens:               {}", out.total_tokens());
        eprintln!(
            "rate:                 {:.1} inputs/s, {:.1} tokens/s",
            out.vectors.len() as f64 / secs,
            out.total_tokens() as f64 / secs
        );
    }
    let text = match format {
        EmbedFormat::Json => {
            let doc = JsonDoc {
                model: &model.name,
                dimensions: args.dimensions.unwrap_or(model.dimensions()),
                normalized: model.spec.normalize,
                pooling: model.spec.pooling.name(),
                tokens: &out.token_counts,
                embeddings: &out.vectors,
            };
            format!("{}\n", serde_json::to_string_pretty(&doc)?)
        }
        EmbedFormat::Jsonl | EmbedFormat::Text => {
            let mut text = String::new();
            for (index, (v, &tokens)) in out.vectors.iter().zip(&out.token_counts).enumerate() {
                let line = if format == EmbedFormat::Jsonl {
                    serde_json::to_string(&JsonlRow {
                        index,
                        tokens,
                        embedding: v,
                    })?
                } else {
                    serde_json::to_string(v)?
                };
                text.push_str(&line);
                text.push('\n');
            }
            text
        }
    };
    super::output::print_stdout(&text)
}
