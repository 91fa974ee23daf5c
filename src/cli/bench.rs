//! `xllm bench`: prefill and decode throughput like llama-bench (`pp<p>` and `tg<n>`), median of
//! repeats after one warm-up run, plus the KV cache bytes the run allocated.

use std::time::Instant;

use super::run::{context_size, load_for, new_sequence};
use super::BenchArgs;

#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    pub model: String,
    pub architecture: String,
    pub weights: String,
    pub kv_profile: String,
    pub threads: usize,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub repeats: usize,
    pub prefill_tokens_per_second: f64,
    pub decode_tokens_per_second: f64,
    /// Every repeat's rates, for spread.
    pub prefill_runs: Vec<f64>,
    pub decode_runs: Vec<f64>,
    pub ctx: usize,
    pub kv_cache_bytes: usize,
    pub load_seconds: f64,
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        0.0
    } else if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    }
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.prompt_tokens == 0 && args.gen_tokens == 0 {
        anyhow::bail!("nothing to measure: -p and -n are both 0");
    }
    let (resolved, loaded) = load_for(&args.model, &args.runtime)?;
    let needed = args.prompt_tokens + args.gen_tokens;
    let ctx = match args.runtime.ctx {
        Some(_) => context_size(&loaded, args.runtime.ctx)?,
        None => needed.max(1),
    };
    if needed > ctx {
        anyhow::bail!(
            "-p {} + -n {} = {needed} tokens do not fit in --ctx {ctx}",
            args.prompt_tokens,
            args.gen_tokens
        );
    }
    let model = loaded.model.as_ref();
    let vocab = model.info().vocab_size as u32;
    // Deterministic pseudo-random prompt that avoids the first 100 (special) ids.
    let prompt: Vec<u32> = (0..args.prompt_tokens as u32)
        .map(|i| 100 + (i.wrapping_mul(2_654_435_761) % (vocab - 100)))
        .collect();
    let mut seq = new_sequence(&loaded, &resolved, ctx)?;
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    let mut kv_bytes = 0;
    for rep in 0..=args.repeats.max(1) {
        if args.prompt_tokens > 0 {
            seq.clear();
            let t = Instant::now();
            model.forward(&prompt, &mut seq.cache, true)?;
            let rate = args.prompt_tokens as f64 / t.elapsed().as_secs_f64();
            if rep > 0 {
                prefill.push(rate);
            }
        }
        if args.gen_tokens > 0 {
            // Decode continues after the prompt (as in a real answer), one token at a time.
            let mut token = 100 % vocab;
            let t = Instant::now();
            for _ in 0..args.gen_tokens {
                let logits = model.forward(&[token], &mut seq.cache, true)?;
                token = logits.squeeze(0)?.argmax(0)?.to_scalar::<u32>()?;
            }
            let rate = args.gen_tokens as f64 / t.elapsed().as_secs_f64();
            if rep > 0 {
                decode.push(rate);
            }
        }
        kv_bytes = kv_bytes.max(seq.cache.allocated_bytes());
        seq.clear();
    }
    let report = BenchReport {
        model: resolved.display_name.clone(),
        architecture: model.info().architecture.clone(),
        weights: model.info().weight_format.clone(),
        kv_profile: resolved.kv_profile.to_string(),
        threads: candle_core::utils::get_num_threads(),
        prompt_tokens: args.prompt_tokens,
        gen_tokens: args.gen_tokens,
        repeats: args.repeats.max(1),
        prefill_tokens_per_second: median(&prefill),
        decode_tokens_per_second: median(&decode),
        prefill_runs: prefill,
        decode_runs: decode,
        ctx,
        kv_cache_bytes: kv_bytes,
        load_seconds: loaded.load_duration.as_secs_f64(),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "model:    {} ({}, {}, kv {})",
            report.model, report.architecture, report.weights, report.kv_profile
        );
        println!("threads:  {}", report.threads);
        println!("| test   |        t/s |");
        println!("| ------ | ---------: |");
        if args.prompt_tokens > 0 {
            println!(
                "| pp{:<4} | {:>10.2} |",
                args.prompt_tokens, report.prefill_tokens_per_second
            );
        }
        if args.gen_tokens > 0 {
            println!(
                "| tg{:<4} | {:>10.2} |",
                args.gen_tokens, report.decode_tokens_per_second
            );
        }
        println!(
            "kv cache: {} bytes allocated (ctx {})",
            report.kv_cache_bytes, report.ctx
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
