//! `xllm perplexity`: mean negative log-likelihood and perplexity of a text under the model.
//!
//! The text is split into windows of `--ctx` tokens (default: the whole text up to the model's
//! context, capped at 2048); inside a window every token after the first is scored given all the
//! tokens before it in that window. No BOS is added unless `--add-bos`.
//!
//! `--llama-cpp` scores as `llama-perplexity` does instead (its numbers are what users compare
//! against): the text tokenized with BOS, cut into chunks of `--ctx` tokens (default 512, partial
//! chunk dropped), the first token of each chunk replaced by BOS, and only positions
//! `ctx/2 .. ctx-1` of each chunk scored (each predicting the next token of the chunk).

use std::time::Instant;

use anyhow::Context;

use super::run::open_session;
use super::PerplexityArgs;

/// Tokens run through the model at once (bounds the logits buffer to ~50 MB for a 49k vocab).
const BATCH: usize = 256;

/// `llama-perplexity`'s default context (`-c 512`).
const LLAMA_CPP_CTX: usize = 512;

/// Result of scoring a text.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PerplexityReport {
    pub model: String,
    pub tokens: usize,
    pub scored_tokens: usize,
    pub windows: usize,
    pub ctx: usize,
    pub mean_nll: f64,
    pub perplexity: f64,
    pub seconds: f64,
    pub tokens_per_second: f64,
}

/// `-log p(target)` for each row of `logits` (`[rows, vocab]` flattened), in f64.
fn nll_rows(logits: &[f32], vocab: usize, targets: &[u32]) -> f64 {
    let mut total = 0.0;
    for (row, &target) in logits.chunks_exact(vocab).zip(targets) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let sum: f64 = row.iter().map(|&l| (l as f64 - max).exp()).sum();
        total += max + sum.ln() - row[target as usize] as f64;
    }
    total
}

pub fn run(args: PerplexityArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let session = open_session(&args.model, &args.runtime)?;
    if args.llama_cpp {
        return run_llama_cpp(&args, &text, &session);
    }
    let loaded = &session.loaded;
    let mut tokens = loaded.tokenizer.encode(&text, false)?;
    if args.add_bos {
        let bos = loaded
            .tokenizer
            .bos_id
            .context("--add-bos: the model has no BOS token")?;
        tokens.insert(0, bos);
    }
    if tokens.len() < 2 {
        anyhow::bail!(
            "{} has {} token(s); at least 2 are needed to measure perplexity",
            args.file.display(),
            tokens.len()
        );
    }
    let model_ctx = loaded.model.info().context_length;
    let ctx = match args.runtime.ctx {
        Some(n) if n < 2 => anyhow::bail!("--ctx must be at least 2"),
        Some(n) if n > model_ctx => {
            anyhow::bail!("--ctx {n} exceeds the model's context length of {model_ctx} tokens")
        }
        Some(n) => n,
        None => tokens.len().min(model_ctx).min(2048),
    };
    let vocab = loaded.model.info().vocab_size;
    let mut state = loaded.model.info().new_cache(session.kv_profile(), ctx)?;
    let t0 = Instant::now();
    let (mut total, mut scored, mut windows) = (0.0f64, 0usize, 0usize);
    for window in tokens.chunks(ctx) {
        if window.len() < 2 {
            continue;
        }
        windows += 1;
        state.clear();
        for (b, batch) in window.chunks(BATCH).enumerate() {
            let logits = loaded
                .model
                .forward(batch, &mut state, false)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            // Row i predicts window[b * BATCH + i + 1].
            let start = b * BATCH;
            let targets =
                &window[(start + 1).min(window.len())..(start + batch.len() + 1).min(window.len())];
            total += nll_rows(&logits, vocab, targets);
            scored += targets.len();
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    let mean_nll = total / scored as f64;
    let report = PerplexityReport {
        model: session.display_name().to_string(),
        tokens: tokens.len(),
        scored_tokens: scored,
        windows,
        ctx,
        mean_nll,
        perplexity: mean_nll.exp(),
        seconds,
        tokens_per_second: tokens.len() as f64 / seconds,
    };
    print_report(&report, args.json)
}

/// `--llama-cpp`: llama-perplexity's chunks (see the module doc).
fn run_llama_cpp(
    args: &PerplexityArgs,
    text: &str,
    session: &crate::engine::session::ModelSession,
) -> anyhow::Result<()> {
    let loaded = &session.loaded;
    let tokenizer = &loaded.tokenizer;
    let tokens = tokenizer.encode(text, true)?;
    let ctx = args.runtime.ctx.unwrap_or(LLAMA_CPP_CTX);
    let model_ctx = loaded.model.info().context_length;
    if ctx < 4 || ctx > model_ctx {
        anyhow::bail!("--ctx must be between 4 and the model's context length ({model_ctx})");
    }
    let chunks = tokens.len() / ctx;
    if chunks == 0 {
        anyhow::bail!(
            "{} has {} tokens; --llama-cpp needs at least one chunk of --ctx {ctx}",
            args.file.display(),
            tokens.len()
        );
    }
    // BOS starts every chunk when the model adds it to a raw prompt (as encoding just did).
    let bos = tokenizer.bos_id.filter(|b| tokens.first() == Some(b));
    let vocab = loaded.model.info().vocab_size;
    let first = ctx / 2;
    let mut state = loaded.model.info().new_cache(session.kv_profile(), ctx)?;
    let t0 = Instant::now();
    let (mut total, mut scored) = (0.0f64, 0usize);
    for c in 0..chunks {
        let mut chunk = tokens[c * ctx..(c + 1) * ctx].to_vec();
        if let Some(bos) = bos {
            chunk[0] = bos;
        }
        state.clear();
        for (b, batch) in chunk.chunks(BATCH).enumerate() {
            let logits = loaded
                .model
                .forward(batch, &mut state, false)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            // Row i is position b * BATCH + i; positions first..ctx-1 are scored.
            for (i, row) in logits.chunks_exact(vocab).enumerate() {
                let pos = b * BATCH + i;
                if pos >= first && pos + 1 < ctx {
                    total += nll_rows(row, vocab, &chunk[pos + 1..pos + 2]);
                    scored += 1;
                }
            }
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    let mean_nll = total / scored as f64;
    let report = PerplexityReport {
        model: session.display_name().to_string(),
        tokens: tokens.len(),
        scored_tokens: scored,
        windows: chunks,
        ctx,
        mean_nll,
        perplexity: mean_nll.exp(),
        seconds,
        tokens_per_second: (chunks * ctx) as f64 / seconds,
    };
    print_report(&report, args.json)
}

fn print_report(report: &PerplexityReport, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        println!("model:          {}", report.model);
        println!(
            "tokens:         {} ({} scored, {} window(s) of up to {} tokens)",
            report.tokens, report.scored_tokens, report.windows, report.ctx
        );
        println!("mean NLL:       {:.6}", report.mean_nll);
        println!("perplexity:     {:.4}", report.perplexity);
        println!(
            "speed:          {:.1} tokens/s ({:.2} s)",
            report.tokens_per_second, report.seconds
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nll_of_uniform_logits_is_log_vocab() {
        let logits = vec![0.5f32; 8];
        let nll = nll_rows(&logits, 4, &[1, 3]);
        assert!((nll - 2.0 * 4f64.ln()).abs() < 1e-12);
    }
}
