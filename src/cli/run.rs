//! `xllm run`: one-shot answers (streamed, or one JSON object) and the interactive chat REPL.
//! Also the helpers `perplexity` and `bench` share: resolving, threads, loading.

use std::io::{BufRead, IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use super::{OutputFormat, RunArgs, RuntimeArgs, SamplingArgs};
use crate::engine::chat_template::Message;
use crate::engine::generate::{
    FinishReason, Generation, GenerationStats, Sequence, StopConditions,
};
use crate::engine::harmony_chat::HarmonyChat;
use crate::engine::load::{self, LoadOptions, LoadedModel};
use crate::engine::sampler::SamplingParams;
use crate::store::ResolvedModel;

/// Context allocated when neither `--ctx` nor a smaller model limit says otherwise.
pub const DEFAULT_CTX: usize = 4096;

/// Turns a model name or path into files on disk (the store's resolution: `org/name[:quant]`,
/// a local folder with config.json, or a .gguf file).
pub(crate) fn resolve(name: &str) -> anyhow::Result<ResolvedModel> {
    crate::store::resolve_for_run(name)
}

/// Runs `command` on a rayon pool of `--threads` threads (all cores by default).
///
/// The command runs *inside* the pool, not beside it: candle's CPU ops (softmax, norms, RoPE,
/// quantized matmul) and our kernels split their work with rayon, and a parallel call made from a
/// thread outside the pool must hand the work over and sleep until a worker finishes it — two
/// context switches per op, hundreds per decoded token. From a worker, the work starts in place
/// and the other workers join in (with one thread, it simply runs inline).
pub(crate) fn with_thread_pool<T: Send>(
    threads: Option<usize>,
    command: impl FnOnce() -> anyhow::Result<T> + Send,
) -> anyhow::Result<T> {
    let n = match threads {
        Some(0) => anyhow::bail!("--threads must be at least 1"),
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    // candle sizes its matmul (gemm) parallelism from this variable.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("xllm-worker-{i}"))
        .build()
        .context("cannot start the CPU worker threads")?;
    pool.install(command)
}

/// Resolves and loads (the caller runs inside [`with_thread_pool`]).
pub(crate) fn load_for(
    name: &str,
    runtime: &RuntimeArgs,
) -> anyhow::Result<(ResolvedModel, LoadedModel)> {
    let resolved = resolve(name)?;
    // A KV profile the device cannot run is refused before anything is opened or loaded
    // (checked again once `auto` has picked a device).
    if let Some(spec) = runtime.device.as_deref() {
        let request: crate::device::DeviceRequest = spec.parse()?;
        crate::engine::kv_quant::check_kv_profile_on_request(resolved.kv_profile, request)?;
    }
    let device = crate::device::select_device(runtime.device.as_deref())?;
    crate::engine::kv_quant::check_kv_profile_on_device(resolved.kv_profile, device.location())?;
    crate::engine::memory_plan::ensure_fits(&resolved, &device, runtime.ctx, DEFAULT_CTX)?;
    let options = LoadOptions {
        device,
        ..LoadOptions::default()
    };
    let loaded = load::load(&resolved, &options)
        .with_context(|| format!("cannot load model '{}'", resolved.display_name))?;
    Ok((resolved, loaded))
}

/// The context to allocate: `--ctx`, else the model's limit capped at [`DEFAULT_CTX`].
pub(crate) fn context_size(loaded: &LoadedModel, ctx: Option<usize>) -> anyhow::Result<usize> {
    let model_ctx = loaded.model.info().context_length;
    match ctx {
        Some(0) => anyhow::bail!("--ctx must be at least 1"),
        Some(n) if n > model_ctx => {
            anyhow::bail!("--ctx {n} exceeds the model's context length of {model_ctx} tokens")
        }
        Some(n) => Ok(n),
        None => Ok(model_ctx.min(DEFAULT_CTX)),
    }
}

pub(crate) fn new_sequence(
    loaded: &LoadedModel,
    resolved: &ResolvedModel,
    ctx: usize,
) -> anyhow::Result<Sequence> {
    let cache = loaded.model.info().new_cache(resolved.kv_profile, ctx)?;
    Ok(Sequence::new(cache, ctx))
}

fn sampling_params(defaults: &SamplingParams, args: &SamplingArgs) -> SamplingParams {
    let mut p = defaults.clone();
    if let Some(v) = args.temperature {
        p.temperature = v;
    }
    if let Some(v) = args.top_k {
        p.top_k = Some(v);
    }
    if let Some(v) = args.top_p {
        p.top_p = Some(v);
    }
    if let Some(v) = args.min_p {
        p.min_p = Some(v);
    }
    if let Some(v) = args.repeat_penalty {
        p.repeat_penalty = v;
    }
    p.repeat_last_n = args.repeat_last_n;
    if let Some(v) = args.presence_penalty {
        p.presence_penalty = v;
    }
    if let Some(v) = args.frequency_penalty {
        p.frequency_penalty = v;
    }
    p.seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    });
    p
}

fn validate_sampling(p: &SamplingParams) -> anyhow::Result<()> {
    if p.temperature.is_nan() || p.temperature < 0.0 {
        anyhow::bail!("--temperature must be 0 or more (0 is greedy)");
    }
    if let Some(v) = p.top_p {
        if !(v > 0.0 && v <= 1.0) {
            anyhow::bail!("--top-p must be in (0, 1]");
        }
    }
    if let Some(v) = p.min_p {
        if !(0.0..=1.0).contains(&v) {
            anyhow::bail!("--min-p must be in [0, 1]");
        }
    }
    if p.repeat_penalty.is_nan() || p.repeat_penalty <= 0.0 {
        anyhow::bail!("--repeat-penalty must be positive (1 is off)");
    }
    Ok(())
}

/// Ctrl-C state: 0 idle at a prompt, 1 generating, 2 pressed once at the prompt.
struct Interrupts {
    state: Arc<AtomicU8>,
    cancel: Arc<AtomicBool>,
}

impl Interrupts {
    /// Stop conditions for one turn, cancelled by this handler's Ctrl-C.
    fn stop_conditions(&self, max_tokens: Option<usize>, stop: &[String]) -> StopConditions {
        StopConditions {
            max_tokens,
            stop_strings: stop.to_vec(),
            cancel: Some(self.cancel.clone()),
        }
    }

    fn install(interactive: bool) -> Self {
        let state = Arc::new(AtomicU8::new(1));
        let cancel = Arc::new(AtomicBool::new(false));
        let (s, c) = (state.clone(), cancel.clone());
        let _ = ctrlc::set_handler(move || {
            if s.load(Ordering::SeqCst) == 1 {
                // Stop the current answer; a second Ctrl-C while it winds down exits.
                if c.swap(true, Ordering::SeqCst) && !interactive {
                    std::process::exit(130);
                }
            } else if interactive && s.swap(2, Ordering::SeqCst) == 0 {
                eprint!("\n(press Ctrl-C again or type /bye to exit)\n>>> ");
                let _ = std::io::stderr().flush();
            } else {
                eprintln!();
                std::process::exit(130);
            }
        });
        Self { state, cancel }
    }

    fn generating(&self) {
        self.cancel.store(false, Ordering::SeqCst);
        self.state.store(1, Ordering::SeqCst);
    }

    fn at_prompt(&self) {
        self.state.store(0, Ordering::SeqCst);
    }
}

/// Prints Ollama-style statistics.
pub(crate) fn print_stats(
    out: &mut dyn Write,
    load: Option<Duration>,
    total: Duration,
    stats: &GenerationStats,
    kv_bytes: usize,
) {
    let _ = writeln!(out, "total duration:       {total:.3?}");
    if let Some(load) = load {
        let _ = writeln!(out, "load duration:        {load:.3?}");
    }
    let _ = writeln!(
        out,
        "prompt eval count:    {} token(s)",
        stats.prompt_eval_count
    );
    let _ = writeln!(
        out,
        "prompt eval duration: {:.3?}",
        stats.prompt_eval_duration
    );
    let _ = writeln!(
        out,
        "prompt eval rate:     {:.2} tokens/s",
        stats.prompt_rate()
    );
    let _ = writeln!(out, "eval count:           {} token(s)", stats.eval_count);
    let _ = writeln!(out, "eval duration:        {:.3?}", stats.eval_duration);
    let _ = writeln!(
        out,
        "eval rate:            {:.2} tokens/s",
        stats.eval_rate()
    );
    let _ = writeln!(
        out,
        "kv cache:             {:.1} MiB allocated",
        kv_bytes as f64 / (1024.0 * 1024.0)
    );
    if let Some(peak) = peak_rss_bytes() {
        let _ = writeln!(
            out,
            "peak memory:          {:.1} MiB resident",
            peak as f64 / (1024.0 * 1024.0)
        );
    }
}

/// Peak resident set size of this process (Linux `VmHWM`), if the platform reports it.
pub(crate) fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Prompt tokens for a conversation (chat template) or raw text.
fn prompt_tokens(
    loaded: &LoadedModel,
    messages: &[Message],
    raw: bool,
) -> anyhow::Result<Vec<u32>> {
    match (&loaded.template, raw) {
        (Some(t), false) => {
            let text = t.render(messages, true)?;
            loaded.tokenizer.encode(&text, false)
        }
        _ => {
            let text: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
            loaded.tokenizer.encode(&text.join("\n"), true)
        }
    }
}

/// Prompt tokens for one turn: the system prompt, earlier turns, then `user`; in the harmony
/// format for gpt-oss models, else through the chat template (or raw text).
fn turn_prompt(
    loaded: &LoadedModel,
    harmony: Option<&HarmonyChat>,
    system: Option<&str>,
    history: &[Message],
    user: String,
    raw: bool,
) -> anyhow::Result<Vec<u32>> {
    let mut messages = Vec::new();
    if let Some(s) = system {
        messages.push(Message::new("system", s));
    }
    messages.extend(history.iter().cloned());
    messages.push(Message::new("user", user));
    match harmony {
        Some(chat) => chat.prompt_tokens(loaded, &messages),
        None => prompt_tokens(loaded, &messages, raw),
    }
}

/// The `stats` object of `--format json` output (the same for plain and harmony models).
pub(crate) fn stats_json(
    loaded: &LoadedModel,
    stats: &GenerationStats,
    kv_cache_bytes: usize,
) -> serde_json::Value {
    serde_json::json!({
        "load_duration_ms": loaded.load_duration.as_secs_f64() * 1e3,
        "prompt_eval_count": stats.prompt_eval_count,
        "prompt_eval_duration_ms": stats.prompt_eval_duration.as_secs_f64() * 1e3,
        "prompt_eval_rate": stats.prompt_rate(),
        "eval_count": stats.eval_count,
        "eval_duration_ms": stats.eval_duration.as_secs_f64() * 1e3,
        "eval_rate": stats.eval_rate(),
        "kv_cache_bytes": kv_cache_bytes,
    })
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let t0 = std::time::Instant::now();
    let stdin_prompt = if args.prompt.is_none() && !std::io::stdin().is_terminal() {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .context("cannot read the prompt from stdin")?;
        Some(s)
    } else {
        None
    };
    let one_shot = args.prompt.clone().or(stdin_prompt);
    let (resolved, loaded) = load_for(&args.model, &args.runtime)?;
    let ctx = context_size(&loaded, args.runtime.ctx)?;
    let mut sampling = sampling_params(&loaded.sampling, &args.sampling);
    validate_sampling(&sampling)?;
    let mut seq = new_sequence(&loaded, &resolved, ctx)?;
    let harmony = super::harmony_view::chat_for(&loaded, &args);
    if !args.raw && loaded.template.is_none() {
        eprintln!("note: the model has no chat template; the prompt is used as raw text");
    }
    let mut system = args.system.clone();
    let mut max_tokens = args.max_tokens;
    let interrupts = Interrupts::install(one_shot.is_none());

    if let Some(prompt) = one_shot {
        let tokens = turn_prompt(
            &loaded,
            harmony.as_ref(),
            system.as_deref(),
            &[],
            prompt,
            args.raw,
        )?;
        let stop = interrupts.stop_conditions(max_tokens, &args.stop);
        interrupts.generating();
        if let Some(chat) = &harmony {
            let inputs = super::harmony_view::TurnInputs {
                chat,
                loaded: &loaded,
                seq: &mut seq,
                prompt: &tokens,
                sampling,
                stop,
            };
            return super::harmony_view::one_shot(inputs, &args, &resolved, t0);
        }
        let mut generation = Generation::start(
            loaded.model.as_ref(),
            &loaded.tokenizer,
            &mut seq,
            &tokens,
            sampling,
            stop,
        )?;
        let mut text = String::new();
        let json = args.format == OutputFormat::Json;
        let stdout = std::io::stdout();
        let reason = generation.run(|piece| {
            text.push_str(piece);
            if !json {
                let mut out = stdout.lock();
                let _ = out.write_all(piece.as_bytes());
                let _ = out.flush();
            }
        })?;
        let stats = generation.stats.clone();
        let ids = generation.generated.clone();
        drop(generation);
        if json {
            let value = serde_json::json!({
                "model": resolved.display_name,
                "text": text,
                "tokens": ids,
                "finish_reason": reason.as_str(),
                "stats": stats_json(&loaded, &stats, seq.cache.allocated_bytes()),
            });
            println!("{}", serde_json::to_string_pretty(&value)?);
        } else {
            println!();
            if reason == FinishReason::ContextFull {
                eprintln!(
                    "note: stopped because the context of {ctx} tokens is full (raise --ctx)"
                );
            }
        }
        if args.verbose {
            print_stats(
                &mut std::io::stderr(),
                Some(loaded.load_duration),
                t0.elapsed(),
                &stats,
                seq.cache.allocated_bytes(),
            );
        }
        return Ok(());
    }

    // Interactive chat.
    let mut history: Vec<Message> = Vec::new();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    eprintln!(
        "Chatting with {} (type /? for help, /bye to exit)",
        resolved.display_name
    );
    loop {
        interrupts.at_prompt();
        eprint!(">>> ");
        let _ = std::io::stderr().flush();
        let Some(line) = lines.next() else { break };
        let line = line?;
        let mut input = line.trim_end().to_string();
        if let Some(rest) = input.strip_prefix("\"\"\"") {
            // Multi-line input until a line ending with """.
            let mut buf = rest.to_string();
            while !buf.trim_end().ends_with("\"\"\"") {
                eprint!("... ");
                let _ = std::io::stderr().flush();
                let Some(next) = lines.next() else { break };
                buf.push('\n');
                buf.push_str(&next?);
            }
            input = buf.trim_end().trim_end_matches("\"\"\"").to_string();
        }
        if input.trim().is_empty() {
            continue;
        }
        if let Some(cmd) = input.strip_prefix('/') {
            let mut parts = cmd.split_whitespace();
            match parts.next().unwrap_or("") {
                "bye" | "exit" => break,
                "clear" => {
                    history.clear();
                    seq.clear();
                    eprintln!("Cleared session context");
                }
                "show" => match parts.next() {
                    Some("info") => {
                        let info = loaded.model.info();
                        eprintln!("  architecture      {}", info.architecture);
                        eprintln!("  weights           {}", info.weight_format);
                        eprintln!(
                            "  context length    {} (allocated {ctx})",
                            info.context_length
                        );
                        eprintln!("  vocabulary        {}", info.vocab_size);
                        eprintln!(
                            "  kv cache          {} ({} bytes allocated)",
                            resolved.kv_profile,
                            seq.cache.allocated_bytes()
                        );
                        eprintln!("  tokens in context {}", seq.tokens.len());
                    }
                    _ => eprintln!("usage: /show info"),
                },
                "set" => {
                    let key = parts.next().unwrap_or("");
                    let value: Vec<&str> = parts.collect();
                    let value = value.join(" ");
                    if let Err(e) =
                        set_parameter(key, &value, &mut sampling, &mut max_tokens, &mut system)
                    {
                        eprintln!("{e}");
                    }
                }
                "?" | "help" => {
                    eprintln!("  /set parameter <temperature|top_k|top_p|min_p|repeat_penalty|presence_penalty|frequency_penalty|seed|num_predict> <value>");
                    eprintln!("  /set system <text>   set the system prompt");
                    eprintln!("  /show info           model details");
                    eprintln!("  /clear               forget the conversation");
                    eprintln!("  /bye                 exit");
                    eprintln!("  \"\"\" ... \"\"\"          multi-line input");
                }
                other => eprintln!("unknown command '/{other}' (type /? for help)"),
            }
            continue;
        }
        let tokens = turn_prompt(
            &loaded,
            harmony.as_ref(),
            system.as_deref(),
            &history,
            input.clone(),
            args.raw,
        )?;
        let stop = interrupts.stop_conditions(max_tokens, &args.stop);
        interrupts.generating();
        if let Some(chat) = &harmony {
            let inputs = super::harmony_view::TurnInputs {
                chat,
                loaded: &loaded,
                seq: &mut seq,
                prompt: &tokens,
                sampling: sampling.clone(),
                stop,
            };
            // Only the final answer goes into the history: prior reasoning is not fed back.
            if let Some(answer) = super::harmony_view::repl_turn(inputs, &args)? {
                history.push(Message::new("user", input));
                history.push(Message::new("assistant", answer));
            }
            continue;
        }
        let mut generation = match Generation::start(
            loaded.model.as_ref(),
            &loaded.tokenizer,
            &mut seq,
            &tokens,
            sampling.clone(),
            stop,
        ) {
            Ok(g) => g,
            Err(e) => {
                eprintln!("Error: {e:#}");
                continue;
            }
        };
        let mut answer = String::new();
        let t_turn = std::time::Instant::now();
        let reason = generation.run(|piece| {
            answer.push_str(piece);
            print!("{piece}");
            let _ = std::io::stdout().flush();
        })?;
        let stats = generation.stats.clone();
        drop(generation);
        println!();
        match reason {
            FinishReason::Cancelled => eprintln!("(stopped)"),
            FinishReason::ContextFull => {
                eprintln!("(the context of {ctx} tokens is full: /clear to start over)")
            }
            _ => {}
        }
        history.push(Message::new("user", input));
        history.push(Message::new("assistant", answer));
        if args.verbose {
            print_stats(
                &mut std::io::stderr(),
                None,
                t_turn.elapsed(),
                &stats,
                seq.cache.allocated_bytes(),
            );
        }
    }
    Ok(())
}

/// `/set` in the REPL.
fn set_parameter(
    key: &str,
    value: &str,
    sampling: &mut SamplingParams,
    max_tokens: &mut Option<usize>,
    system: &mut Option<String>,
) -> anyhow::Result<()> {
    if key == "system" {
        *system = Some(value.trim_matches('"').to_string());
        eprintln!("Set system message.");
        return Ok(());
    }
    if key != "parameter" {
        anyhow::bail!("usage: /set parameter <name> <value> | /set system <text>");
    }
    let mut parts = value.split_whitespace();
    let (name, v) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let f = || {
        v.parse::<f64>()
            .with_context(|| format!("'{v}' is not a number"))
    };
    let mut next = sampling.clone();
    match name {
        "temperature" => next.temperature = f()?,
        "top_k" => next.top_k = Some(f()? as usize),
        "top_p" => next.top_p = Some(f()?),
        "min_p" => next.min_p = Some(f()?),
        "repeat_penalty" => next.repeat_penalty = f()? as f32,
        "repeat_last_n" => next.repeat_last_n = f()? as usize,
        "presence_penalty" => next.presence_penalty = f()? as f32,
        "frequency_penalty" => next.frequency_penalty = f()? as f32,
        "seed" => next.seed = f()? as u64,
        "num_predict" | "max_tokens" => {
            *max_tokens = Some(f()? as usize);
            eprintln!("Set parameter '{name}' to '{v}'");
            return Ok(());
        }
        other => anyhow::bail!("unknown parameter '{other}'"),
    }
    validate_sampling(&next)?;
    *sampling = next;
    eprintln!("Set parameter '{name}' to '{v}'");
    Ok(())
}
