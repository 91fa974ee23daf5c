//! `xllm bench`: prefill and decode throughput like llama-bench (`pp<p>` and `tg<n>`), median of
//! repeats after one warm-up run, plus the KV cache bytes the run allocated.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::run::open_session;
use super::BenchArgs;
use crate::engine::request::{GenerationRequest, SeqEvent};
use crate::engine::sampler::SamplingParams;
use crate::engine::scheduler::{EngineConfig, Scheduler};
use crate::engine::session::ModelSession;
use crate::engine::structured::Constraint;

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

/// A deterministic pseudo-random prompt of `len` tokens that avoids the first 100 (special)
/// ids; `salt` makes the prompts of parallel sequences differ (no prefix sharing).
fn bench_prompt(len: usize, vocab: u32, salt: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| {
            let x = i
                .wrapping_add(salt.wrapping_mul(7919))
                .wrapping_mul(2_654_435_761);
            100 + (x % (vocab - 100))
        })
        .collect()
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.prompt_tokens == 0 && args.gen_tokens == 0 {
        anyhow::bail!("nothing to measure: -p and -n are both 0");
    }
    let mut runtime = args.runtime.clone();
    let needed = args.prompt_tokens + args.gen_tokens;
    if runtime.ctx.is_none() {
        runtime.ctx = Some(needed.max(1));
    }
    let session = open_session(&args.model, &runtime)?;
    let ctx = session.context;
    if needed > ctx {
        anyhow::bail!(
            "-p {} + -n {} = {needed} tokens do not fit in --ctx {ctx}",
            args.prompt_tokens,
            args.gen_tokens
        );
    }
    if session.info().vocab_size <= 100 {
        anyhow::bail!("the model's vocabulary is too small to benchmark");
    }
    let constraint = super::run::constraint_from_args(&session, &args.constraint)?;
    match (args.parallel, constraint) {
        (Some(0), _) => anyhow::bail!("--parallel must be at least 1"),
        (Some(n), c) => parallel(&args, Arc::new(session), n, c),
        // A grammar needs the scheduler's sampling: one sequence through it.
        (None, Some(c)) => parallel(&args, Arc::new(session), 1, Some(c)),
        (None, None) => single(&args, &session),
    }
}

/// llama-bench's `pp`/`tg`: one sequence, the model called directly.
fn single(args: &BenchArgs, session: &ModelSession) -> anyhow::Result<()> {
    let model = session.loaded.model.as_ref();
    let ctx = session.context;
    let vocab = model.info().vocab_size as u32;
    let prompt = bench_prompt(args.prompt_tokens, vocab, 0);
    let mut state = model.info().new_cache(session.kv_profile(), ctx)?;
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    let mut kv_bytes = 0;
    for rep in 0..=args.repeats.max(1) {
        if args.prompt_tokens > 0 {
            state.clear();
            let t = Instant::now();
            model.forward(&prompt, &mut state, true)?;
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
                let logits = model.forward(&[token], &mut state, true)?;
                token = logits.squeeze(0)?.argmax(0)?.to_scalar::<u32>()?;
            }
            let rate = args.gen_tokens as f64 / t.elapsed().as_secs_f64();
            if rep > 0 {
                decode.push(rate);
            }
        }
        kv_bytes = kv_bytes.max(state.allocated_bytes());
        state.clear();
    }
    let report = BenchReport {
        model: session.display_name().to_string(),
        architecture: model.info().architecture.clone(),
        weights: model.info().weight_format.clone(),
        kv_profile: session.kv_profile().to_string(),
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
        load_seconds: session.loaded.load_duration.as_secs_f64(),
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

/// What one parallel run measured.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ParallelRun {
    /// Generated tokens per second over all sequences, once every sequence is decoding.
    pub aggregate_decode_tokens_per_second: f64,
    /// Median over sequences of their own decode rate (first token to last).
    pub per_sequence_decode_tokens_per_second: f64,
    /// Prompt tokens per second until the last sequence had its first token.
    pub aggregate_prefill_tokens_per_second: f64,
    pub ttft_ms_p50: f64,
    pub ttft_ms_max: f64,
    pub wall_seconds: f64,
    pub generated_tokens: usize,
    pub peak_kv_blocks: usize,
    /// With a grammar: its time per generated token (checks, masks, advancing) and the share
    /// of tokens that needed a full mask.
    pub grammar_ms_per_token: f64,
    pub grammar_mask_share: f64,
}

/// `--parallel N` report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ParallelReport {
    pub model: String,
    pub architecture: String,
    pub weights: String,
    pub kv_profile: String,
    pub threads: usize,
    pub parallel: usize,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub repeats: usize,
    pub aggregate_decode_tokens_per_second: f64,
    pub per_sequence_decode_tokens_per_second: f64,
    pub aggregate_prefill_tokens_per_second: f64,
    pub ttft_ms_p50: f64,
    /// With a grammar (`--json-schema` etc.): its time per generated token and mask share.
    pub grammar_ms_per_token: f64,
    pub grammar_mask_share: f64,
    pub runs: Vec<ParallelRun>,
    pub ctx: usize,
    pub load_seconds: f64,
}

/// Per-sequence timestamps of one run.
#[derive(Default, Clone)]
struct Trace {
    token_times: Vec<Instant>,
    grammar: std::time::Duration,
    masks: usize,
}

fn parallel_run(
    session: &Arc<ModelSession>,
    args: &BenchArgs,
    n: usize,
    salt: u32,
    constraint: Option<&Constraint>,
) -> anyhow::Result<ParallelRun> {
    let ctx = session.context;
    let vocab = session.info().vocab_size as u32;
    let mut config = EngineConfig::for_sequences(n, ctx);
    config.prefix_cache = false;
    let mut scheduler = Scheduler::new(session.clone(), config);
    let traces: Vec<Arc<Mutex<Trace>>> = (0..n).map(|_| Arc::default()).collect();
    let start = Instant::now();
    for (i, trace) in traces.iter().enumerate() {
        let greedy = SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        };
        let prompt = bench_prompt(args.prompt_tokens.max(1), vocab, salt + i as u32);
        let mut request = GenerationRequest::new(prompt, greedy);
        request.max_tokens = Some(args.gen_tokens.max(1));
        request.ignore_eos = true;
        request.constraint = constraint.cloned();
        let trace = trace.clone();
        scheduler.submit(
            request,
            Box::new(move |event| {
                if let SeqEvent::Output { tokens, .. } = &event {
                    if !tokens.is_empty() {
                        let now = Instant::now();
                        let mut t = trace.lock().unwrap_or_else(|e| e.into_inner());
                        t.token_times.extend(tokens.iter().map(|_| now));
                    }
                }
                if let SeqEvent::Finished { stats, .. } = &event {
                    let mut t = trace.lock().unwrap_or_else(|e| e.into_inner());
                    t.grammar = stats.grammar_duration;
                    t.masks = stats.grammar_masks;
                }
                true
            }),
        )?;
    }
    let mut peak_blocks = 0;
    while scheduler.has_work() {
        scheduler.step()?;
        peak_blocks = peak_blocks.max(scheduler.stats().kv_blocks_used);
    }
    let end = Instant::now();
    let traces: Vec<Trace> = traces
        .iter()
        .map(|t| t.lock().unwrap_or_else(|e| e.into_inner()).clone())
        .collect();
    let firsts: Vec<Instant> = traces
        .iter()
        .filter_map(|t| t.token_times.first().copied())
        .collect();
    let all_started = firsts.iter().max().copied().unwrap_or(end);
    let steady: usize = traces
        .iter()
        .map(|t| t.token_times.iter().filter(|&&x| x > all_started).count())
        .sum();
    let steady_secs = (end - all_started).as_secs_f64();
    let mut ttft: Vec<f64> = firsts
        .iter()
        .map(|f| (*f - start).as_secs_f64() * 1e3)
        .collect();
    ttft.sort_by(f64::total_cmp);
    let per_seq: Vec<f64> = traces
        .iter()
        .filter(|t| t.token_times.len() > 1)
        .map(|t| {
            let span = (*t.token_times.last().unwrap() - t.token_times[0]).as_secs_f64();
            (t.token_times.len() - 1) as f64 / span.max(1e-9)
        })
        .collect();
    let generated: usize = traces.iter().map(|t| t.token_times.len()).sum();
    Ok(ParallelRun {
        aggregate_decode_tokens_per_second: if steady_secs > 0.0 {
            steady as f64 / steady_secs
        } else {
            0.0
        },
        per_sequence_decode_tokens_per_second: median(&per_seq),
        aggregate_prefill_tokens_per_second: (n * args.prompt_tokens) as f64
            / (all_started - start).as_secs_f64().max(1e-9),
        ttft_ms_p50: median(&ttft),
        ttft_ms_max: ttft.last().copied().unwrap_or(0.0),
        wall_seconds: (end - start).as_secs_f64(),
        generated_tokens: generated,
        peak_kv_blocks: peak_blocks,
        grammar_ms_per_token: traces
            .iter()
            .map(|t| t.grammar.as_secs_f64() * 1e3)
            .sum::<f64>()
            / generated.max(1) as f64,
        grammar_mask_share: traces.iter().map(|t| t.masks).sum::<usize>() as f64
            / generated.max(1) as f64,
    })
}

fn parallel(
    args: &BenchArgs,
    session: Arc<ModelSession>,
    n: usize,
    constraint: Option<Constraint>,
) -> anyhow::Result<()> {
    let constrained = constraint.is_some();
    let mut runs = Vec::new();
    for rep in 0..=args.repeats.max(1) {
        let run = parallel_run(&session, args, n, rep as u32 * 1000, constraint.as_ref())?;
        if rep > 0 {
            runs.push(run);
        }
    }
    let pick = |f: fn(&ParallelRun) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
    let info = session.info();
    let report = ParallelReport {
        model: session.display_name().to_string(),
        architecture: info.architecture.clone(),
        weights: info.weight_format.clone(),
        kv_profile: session.kv_profile().to_string(),
        threads: candle_core::utils::get_num_threads(),
        parallel: n,
        prompt_tokens: args.prompt_tokens,
        gen_tokens: args.gen_tokens,
        repeats: args.repeats.max(1),
        aggregate_decode_tokens_per_second: pick(|r| r.aggregate_decode_tokens_per_second),
        per_sequence_decode_tokens_per_second: pick(|r| r.per_sequence_decode_tokens_per_second),
        aggregate_prefill_tokens_per_second: pick(|r| r.aggregate_prefill_tokens_per_second),
        ttft_ms_p50: pick(|r| r.ttft_ms_p50),
        grammar_ms_per_token: pick(|r| r.grammar_ms_per_token),
        grammar_mask_share: pick(|r| r.grammar_mask_share),
        runs,
        ctx: session.context,
        load_seconds: session.loaded.load_duration.as_secs_f64(),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "model:    {} ({}, {}, kv {})",
            report.model, report.architecture, report.weights, report.kv_profile
        );
        println!(
            "threads:  {}   parallel: {}   pp {} / tg {} per sequence",
            report.threads, n, args.prompt_tokens, args.gen_tokens
        );
        println!("| measure                         |      value |");
        println!("| ------------------------------- | ---------: |");
        println!(
            "| aggregate decode t/s            | {:>10.2} |",
            report.aggregate_decode_tokens_per_second
        );
        println!(
            "| per-sequence decode t/s         | {:>10.2} |",
            report.per_sequence_decode_tokens_per_second
        );
        println!(
            "| aggregate prefill t/s           | {:>10.2} |",
            report.aggregate_prefill_tokens_per_second
        );
        println!(
            "| time to first token p50 (ms)    | {:>10.1} |",
            report.ttft_ms_p50
        );
        if constrained {
            println!(
                "| grammar ms per token            | {:>10.3} |",
                report.grammar_ms_per_token
            );
            println!(
                "| tokens needing a full mask      | {:>9.1}% |",
                report.grammar_mask_share * 100.0
            );
        }
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
