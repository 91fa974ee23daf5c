//! `xllm run`: one-shot answers (streamed, or one JSON object) and the interactive chat REPL,
//! on the engine's session and scheduler (one sequence; the prefix cache makes each chat turn
//! run only its new tokens). Also the helpers `perplexity` and `bench` share: threads, opening.

use std::io::{BufRead, IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use super::turn_view::TurnPrinter;
use super::{
    ConstraintArgs, OutputFormat, ReasoningEffort as EffortArg, RunArgs, RuntimeArgs, SamplingArgs,
};
use crate::engine::chat_template::Message;
use crate::engine::generate::{FinishReason, GenerationStats};
use crate::engine::harmony::ReasoningEffort;
use crate::engine::request::{GenerationRequest, OutputMode, SeqEvent};
use crate::engine::sampler::SamplingParams;
use crate::engine::scheduler::{Collected, EngineConfig, Scheduler};
use crate::engine::session::{self, ChatOptions, ModelSession, OpenOptions};
use crate::engine::structured::{Constraint, Grammar};

/// The grammar the flags ask for, read from its file.
fn grammar_from_args(args: &ConstraintArgs) -> anyhow::Result<Option<(&'static str, Grammar)>> {
    let read = |path: &std::path::Path, flag: &str| {
        crate::model::files::read_text(path, crate::model::files::MAX_TEXT_FILE)
            .with_context(|| format!("{flag}: cannot read {}", path.display()))
    };
    if args.json_object {
        return Ok(Some(("--json-object", Grammar::JsonObject)));
    }
    if let Some(path) = &args.json_schema {
        let text = read(path, "--json-schema")?;
        let schema: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("--json-schema: {} is not JSON", path.display()))?;
        return Ok(Some(("--json-schema", Grammar::JsonSchema(schema))));
    }
    if let Some(path) = &args.grammar {
        return Ok(Some(("--grammar", Grammar::Lark(read(path, "--grammar")?))));
    }
    if let Some(rx) = &args.regex {
        return Ok(Some(("--regex", Grammar::Regex(rx.clone()))));
    }
    Ok(None)
}

/// The constraint the flags ask for, compiled for `session`'s vocabulary.
pub(crate) fn constraint_from_args(
    session: &ModelSession,
    args: &ConstraintArgs,
) -> anyhow::Result<Option<Constraint>> {
    let Some((flag, grammar)) = grammar_from_args(args)? else {
        return Ok(None);
    };
    session
        .compile(&grammar)
        .map(Some)
        .with_context(|| format!("{flag} cannot be used"))
}

/// Runs `command` on the CPU worker pool of `--threads` threads (see
/// [`crate::engine::threads::in_thread_pool`]).
pub(crate) fn with_thread_pool<T: Send>(
    threads: Option<usize>,
    command: impl FnOnce() -> anyhow::Result<T> + Send,
) -> anyhow::Result<T> {
    crate::engine::threads::in_thread_pool(threads, command)
}

/// Opens the model for `run`, `bench` and `perplexity` (the caller runs inside
/// [`with_thread_pool`]).
pub(crate) fn open_session(name: &str, runtime: &RuntimeArgs) -> anyhow::Result<ModelSession> {
    session::open(
        name,
        &OpenOptions {
            device: runtime.device.clone(),
            ctx: runtime.ctx,
            activation_stats: None,
        },
    )
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
    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
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
) {
    let kv_bytes = stats.kv_cache_bytes;
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

/// The `stats` object of `--format json` output (the same for plain and harmony models).
pub(crate) fn stats_json(session: &ModelSession, stats: &GenerationStats) -> serde_json::Value {
    serde_json::json!({
        "load_duration_ms": session.loaded.load_duration.as_secs_f64() * 1e3,
        "prompt_eval_count": stats.prompt_eval_count,
        "prompt_eval_duration_ms": stats.prompt_eval_duration.as_secs_f64() * 1e3,
        "prompt_eval_rate": stats.prompt_rate(),
        "eval_count": stats.eval_count,
        "eval_duration_ms": stats.eval_duration.as_secs_f64() * 1e3,
        "eval_rate": stats.eval_rate(),
        "kv_cache_bytes": stats.kv_cache_bytes,
    })
}

/// Runs one request through `scheduler`, showing its output through `printer` as it comes;
/// Ctrl-C cancels it.
fn run_turn(
    scheduler: &mut Scheduler,
    request: GenerationRequest,
    interrupts: &Interrupts,
    mut printer: Option<&mut TurnPrinter<std::io::Stdout>>,
) -> anyhow::Result<Collected> {
    let (tx, rx) = mpsc::channel();
    let id = scheduler.submit(request, Box::new(move |event| tx.send(event).is_ok()))?;
    let mut collected = Collected::default();
    interrupts.generating();
    while scheduler.has_work() {
        if interrupts.cancelled() {
            scheduler.cancel(id);
        }
        scheduler.step()?;
        for event in rx.try_iter() {
            if let (Some(p), SeqEvent::Output { outputs, .. }) = (printer.as_deref_mut(), &event) {
                outputs.iter().for_each(|o| p.show(o));
            }
            collected.push(event);
        }
    }
    if let Some(p) = printer {
        p.finish();
    }
    if let Some(e) = &collected.error {
        anyhow::bail!("{e}");
    }
    Ok(collected)
}

/// Reasoning effort from the flags (harmony models only).
fn effort(args: &RunArgs) -> ReasoningEffort {
    match args.reasoning_effort {
        Some(EffortArg::Low) => ReasoningEffort::Low,
        Some(EffortArg::High) => ReasoningEffort::High,
        Some(EffortArg::Medium) | None => ReasoningEffort::Medium,
    }
}

/// Prompt tokens for one turn: the system prompt, earlier turns, then `user`.
fn turn_prompt(
    session: &ModelSession,
    options: ChatOptions,
    system: Option<&str>,
    history: &[Message],
    user: String,
) -> anyhow::Result<Vec<u32>> {
    let mut messages = Vec::new();
    if let Some(s) = system {
        messages.push(Message::new("system", s));
    }
    messages.extend(history.iter().cloned());
    messages.push(Message::new("user", user));
    session.chat_prompt(&messages, options)
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
    let session = Arc::new(open_session(&args.model, &args.runtime)?);
    let ctx = session.context;
    let mut sampling = sampling_params(&session.loaded.sampling, &args.sampling);
    validate_sampling(&sampling)?;
    let harmony = !args.raw && session.harmony.is_some();
    let thinks = !args.raw && session.think.is_some();
    if !harmony && args.reasoning_effort.is_some() {
        eprintln!("note: --reasoning-effort applies to gpt-oss (harmony) chat only; ignored");
    }
    if !harmony && !thinks && args.hide_thinking {
        eprintln!("note: --hide-thinking applies to models that reason (gpt-oss, <think> templates); ignored");
    }
    if !thinks && (args.think || args.no_think) {
        eprintln!("note: --think/--no-think apply to models whose chat template reasons in <think> (Nemotron); ignored");
    }
    if !args.raw && session.loaded.template.is_none() {
        eprintln!("note: the model has no chat template; the prompt is used as raw text");
    }
    let options = ChatOptions {
        raw: args.raw,
        reasoning_effort: effort(&args),
        thinking: if args.no_think {
            Some(false)
        } else if args.think {
            Some(true)
        } else {
            None
        },
    };
    let constraint = constraint_from_args(&session, &args.constraint)?;
    let mut scheduler = Scheduler::new(session.clone(), EngineConfig::for_sequences(1, ctx));
    let mut system = args.system.clone();
    let mut max_tokens = args.max_tokens;
    let interrupts = Interrupts::install(one_shot.is_none());
    let request_for = |prompt: Vec<u32>, sampling: &SamplingParams, max_tokens: Option<usize>| {
        let output = if args.raw {
            OutputMode::Text
        } else {
            session.output_mode_for(&prompt)
        };
        let mut r = GenerationRequest::new(prompt, sampling.clone());
        r.max_tokens = max_tokens;
        r.stop_strings = args.stop.clone();
        r.output = output;
        // Each turn starts the grammar afresh.
        r.constraint = constraint.clone();
        r
    };

    if let Some(prompt) = one_shot {
        let tokens = turn_prompt(&session, options, system.as_deref(), &[], prompt)?;
        let json = args.format == OutputFormat::Json;
        let mut printer = TurnPrinter::stdout(args.hide_thinking);
        let result = run_turn(
            &mut scheduler,
            request_for(tokens, &sampling, max_tokens),
            &interrupts,
            (!json).then_some(&mut printer),
        )?;
        let reason = result.finish.unwrap_or(FinishReason::Stop);
        if json {
            let mut value = serde_json::json!({
                "model": session.display_name(),
                "text": result.text,
                "tokens": result.tokens,
                "finish_reason": reason.as_str(),
                "stats": stats_json(&session, &result.stats),
            });
            if thinks {
                value["thinking"] = result.reasoning.clone().into();
            }
            if harmony {
                let tool_calls: Vec<_> = result
                    .tool_calls
                    .iter()
                    .map(|(r, a)| serde_json::json!({"recipient": r, "arguments": a}))
                    .collect();
                value["thinking"] = result.reasoning.clone().into();
                value["tool_calls"] = tool_calls.into();
                value["reasoning_effort"] = options.reasoning_effort.as_str().into();
            }
            // Keys sorted, as specs/002 promises (serde_json keeps insertion order now that
            // llguidance turns on `preserve_order`).
            value.sort_all_objects();
            super::output::print_stdout(&format!("{}\n", serde_json::to_string_pretty(&value)?))?;
        } else if reason == FinishReason::ContextFull {
            eprintln!("note: stopped because the context of {ctx} tokens is full (raise --ctx)");
        }
        if args.verbose {
            print_stats(
                &mut std::io::stderr(),
                Some(session.loaded.load_duration),
                t0.elapsed(),
                &result.stats,
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
        session.display_name()
    );
    let mut last_kv_bytes = 0;
    let mut context_tokens = 0;
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
                    scheduler.clear_prefix_cache();
                    context_tokens = 0;
                    eprintln!("Cleared session context");
                }
                "show" => match parts.next() {
                    Some("info") => {
                        let info = session.info();
                        eprintln!("  architecture      {}", info.architecture);
                        eprintln!("  weights           {}", info.weight_format);
                        eprintln!(
                            "  context length    {} (allocated {ctx})",
                            info.context_length
                        );
                        eprintln!("  vocabulary        {}", info.vocab_size);
                        eprintln!(
                            "  kv cache          {} ({} bytes allocated)",
                            session.kv_profile(),
                            last_kv_bytes
                        );
                        eprintln!("  tokens in context {context_tokens}");
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
        let tokens = match turn_prompt(
            &session,
            options,
            system.as_deref(),
            &history,
            input.clone(),
        ) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("Error: {e:#}");
                continue;
            }
        };
        let t_turn = std::time::Instant::now();
        let mut printer = TurnPrinter::stdout(args.hide_thinking);
        let result = match run_turn(
            &mut scheduler,
            request_for(tokens.clone(), &sampling, max_tokens),
            &interrupts,
            Some(&mut printer),
        ) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("Error: {e:#}");
                continue;
            }
        };
        match result.finish {
            Some(FinishReason::Cancelled) => eprintln!("(stopped)"),
            Some(FinishReason::ContextFull) => {
                eprintln!("(the context of {ctx} tokens is full: /clear to start over)")
            }
            _ => {}
        }
        last_kv_bytes = result.stats.kv_cache_bytes;
        context_tokens = tokens.len() + result.tokens.len();
        // Only the final answer goes into the history: prior reasoning is not fed back.
        history.push(Message::new("user", input));
        history.push(Message::new("assistant", result.text.clone()));
        if args.verbose {
            print_stats(
                &mut std::io::stderr(),
                None,
                t_turn.elapsed(),
                &result.stats,
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
