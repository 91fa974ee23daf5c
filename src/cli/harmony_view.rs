//! How `xllm run` shows a harmony (gpt-oss) turn: reasoning under a `Thinking...` line, dimmed
//! on a terminal (hidden with `--hide-thinking`), then the answer; tool calls on their own line;
//! `--format json` with `thinking` and `text` apart. The engine side is
//! [`crate::engine::harmony_chat`]; `run.rs` only hands over here when the model speaks harmony.

use std::io::{IsTerminal, Write};
use std::time::Instant;

use super::{OutputFormat, ReasoningEffort as EffortArg, RunArgs};
use crate::engine::generate::{FinishReason, Sequence, StopConditions};
use crate::engine::harmony_chat::{
    run_turn, HarmonyChat, HarmonyOutput, HarmonyTurnResult, ReasoningEffort,
};
use crate::engine::load::LoadedModel;
use crate::engine::sampler::SamplingParams;
use crate::store::ResolvedModel;

const DIM: &str = "\x1b[2m";
const RESET: &str = "\x1b[0m";

/// The harmony driver for this run, or `None` when the model is not a harmony model or `--raw`
/// asks for the bare prompt. Notes on stderr when gpt-oss flags are given to another model.
pub fn chat_for(loaded: &LoadedModel, args: &RunArgs) -> Option<HarmonyChat> {
    let effort = match args.reasoning_effort {
        Some(EffortArg::Low) => ReasoningEffort::Low,
        Some(EffortArg::High) => ReasoningEffort::High,
        Some(EffortArg::Medium) | None => ReasoningEffort::Medium,
    };
    let chat = if args.raw {
        None
    } else {
        HarmonyChat::detect(loaded, effort)
    };
    if chat.is_none() && (args.hide_thinking || args.reasoning_effort.is_some()) {
        eprintln!(
            "note: --hide-thinking and --reasoning-effort apply to gpt-oss (harmony) chat only; ignored"
        );
    }
    chat
}

/// Streams a turn's visible parts to `out` (stdout in the CLI).
struct TurnPrinter<W: Write> {
    out: W,
    hide_thinking: bool,
    tty: bool,
    thinking_open: bool,
    wrote_any: bool,
    at_line_start: bool,
}

impl TurnPrinter<std::io::Stdout> {
    fn stdout(hide_thinking: bool) -> Self {
        let tty = std::io::stdout().is_terminal();
        TurnPrinter::new(std::io::stdout(), hide_thinking, tty)
    }
}

impl<W: Write> TurnPrinter<W> {
    /// `dim` styles the reasoning with ANSI dim (only for a terminal).
    fn new(out: W, hide_thinking: bool, dim: bool) -> Self {
        Self {
            out,
            hide_thinking,
            tty: dim,
            thinking_open: false,
            wrote_any: false,
            at_line_start: true,
        }
    }

    fn write(&mut self, text: &str) {
        if text.is_empty() {
            return;
        }
        // A closed pipe (`xllm run … | head`) is not an error worth stopping for.
        let _ = self.out.write_all(text.as_bytes());
        let _ = self.out.flush();
        self.wrote_any = true;
        self.at_line_start = text.ends_with('\n');
    }

    fn close_thinking(&mut self) {
        if self.thinking_open {
            self.thinking_open = false;
            let nl = if self.at_line_start { "" } else { "\n" };
            let (dim, reset) = self.styles();
            self.write(&format!("{nl}{dim}...done thinking.{reset}\n\n"));
        }
    }

    fn styles(&self) -> (&'static str, &'static str) {
        if self.tty {
            (DIM, RESET)
        } else {
            ("", "")
        }
    }

    fn show(&mut self, output: &HarmonyOutput) {
        match output {
            HarmonyOutput::Thinking(text) => {
                if self.hide_thinking {
                    return;
                }
                let (dim, reset) = self.styles();
                if !self.thinking_open {
                    self.thinking_open = true;
                    self.write(&format!("{dim}Thinking...{reset}\n"));
                }
                self.write(&format!("{dim}{text}{reset}"));
            }
            HarmonyOutput::Answer(text) => {
                self.close_thinking();
                self.write(text);
            }
            HarmonyOutput::ToolCall {
                recipient,
                arguments,
            } => {
                self.close_thinking();
                let nl = if self.at_line_start { "" } else { "\n" };
                self.write(&format!("{nl}tool call: {recipient} {arguments}\n"));
            }
        }
    }

    fn finish(&mut self) {
        self.close_thinking();
        if !self.at_line_start || !self.wrote_any {
            self.write("\n");
        }
    }
}

/// Everything a harmony turn needs from `run`.
pub struct TurnInputs<'a> {
    pub chat: &'a HarmonyChat,
    pub loaded: &'a LoadedModel,
    pub seq: &'a mut Sequence,
    pub prompt: &'a [u32],
    pub sampling: SamplingParams,
    pub stop: StopConditions,
}

/// Runs the turn, printing through `printer` if given; returns it with the KV bytes allocated.
fn generate(
    inputs: TurnInputs<'_>,
    mut printer: Option<&mut TurnPrinter<std::io::Stdout>>,
) -> anyhow::Result<(HarmonyTurnResult, usize)> {
    let result = run_turn(
        inputs.chat,
        inputs.loaded,
        inputs.seq,
        inputs.prompt,
        inputs.sampling,
        &inputs.stop,
        |output| {
            if let Some(p) = printer.as_deref_mut() {
                p.show(output)
            }
        },
    )?;
    if let Some(p) = printer {
        p.finish();
    }
    Ok((result, inputs.seq.cache.allocated_bytes()))
}

/// A one-shot answer: streamed text, or one JSON object with `thinking` and `text` apart.
pub fn one_shot(
    inputs: TurnInputs<'_>,
    args: &RunArgs,
    resolved: &ResolvedModel,
    started: Instant,
) -> anyhow::Result<()> {
    let json = args.format == OutputFormat::Json;
    let effort = inputs.chat.effort;
    let loaded = inputs.loaded;
    let ctx = inputs.seq.max_tokens;
    let mut printer = TurnPrinter::stdout(args.hide_thinking);
    let (result, kv) = generate(inputs, (!json).then_some(&mut printer))?;
    let stats = &result.stats;
    if json {
        let tool_calls: Vec<_> = result
            .tool_calls
            .iter()
            .map(|(r, a)| serde_json::json!({"recipient": r, "arguments": a}))
            .collect();
        let value = serde_json::json!({
            "model": resolved.display_name,
            "thinking": result.thinking,
            "text": result.answer,
            "tool_calls": tool_calls,
            "reasoning_effort": effort.as_str(),
            "tokens": result.tokens,
            "finish_reason": result.finish_reason.as_str(),
            "stats": super::run::stats_json(loaded, stats, kv),
        });
        super::output::print_stdout(&format!("{}\n", serde_json::to_string_pretty(&value)?))?;
    } else if result.finish_reason == FinishReason::ContextFull {
        eprintln!("note: stopped because the context of {ctx} tokens is full (raise --ctx)");
    }
    if args.verbose {
        super::run::print_stats(
            &mut std::io::stderr(),
            Some(loaded.load_duration),
            started.elapsed(),
            stats,
            kv,
        );
    }
    Ok(())
}

/// One REPL turn; returns the final answer, the only part of the turn kept in the history
/// (prior reasoning is not fed back), or `None` when the turn could not start.
pub fn repl_turn(inputs: TurnInputs<'_>, args: &RunArgs) -> anyhow::Result<Option<String>> {
    let ctx = inputs.seq.max_tokens;
    let started = Instant::now();
    let mut printer = TurnPrinter::stdout(args.hide_thinking);
    let (result, kv) = match generate(inputs, Some(&mut printer)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("Error: {e:#}");
            return Ok(None);
        }
    };
    match result.finish_reason {
        FinishReason::Cancelled => eprintln!("(stopped)"),
        FinishReason::ContextFull => {
            eprintln!("(the context of {ctx} tokens is full: /clear to start over)")
        }
        _ => {}
    }
    if args.verbose {
        super::run::print_stats(
            &mut std::io::stderr(),
            None,
            started.elapsed(),
            &result.stats,
            kv,
        );
    }
    Ok(Some(result.answer))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(outputs: &[HarmonyOutput], hide: bool, dim: bool) -> String {
        let mut buf = Vec::new();
        let mut p = TurnPrinter::new(&mut buf, hide, dim);
        for o in outputs {
            p.show(o);
        }
        p.finish();
        String::from_utf8(buf).unwrap()
    }

    fn turn() -> Vec<HarmonyOutput> {
        vec![
            HarmonyOutput::Thinking("User greets.".into()),
            HarmonyOutput::Thinking(" Reply.".into()),
            HarmonyOutput::Answer("Hello".into()),
            HarmonyOutput::Answer(" there!".into()),
        ]
    }

    #[test]
    fn thinking_then_answer_plain_when_not_a_terminal() {
        assert_eq!(
            render(&turn(), false, false),
            "Thinking...\nUser greets. Reply.\n...done thinking.\n\nHello there!\n"
        );
    }

    #[test]
    fn thinking_is_dimmed_on_a_terminal_and_the_answer_is_not() {
        let out = render(&turn(), false, true);
        assert_eq!(
            out,
            "\x1b[2mThinking...\x1b[0m\n\x1b[2mUser greets.\x1b[0m\x1b[2m Reply.\x1b[0m\n\x1b[2m...done thinking.\x1b[0m\n\nHello there!\n"
        );
    }

    #[test]
    fn hide_thinking_leaves_only_the_answer() {
        assert_eq!(render(&turn(), true, true), "Hello there!\n");
    }

    #[test]
    fn tool_call_on_its_own_line() {
        let out = render(
            &[
                HarmonyOutput::Thinking("Need weather.".into()),
                HarmonyOutput::ToolCall {
                    recipient: "functions.get_weather".into(),
                    arguments: "{\"city\":\"Paris\"}".into(),
                },
            ],
            false,
            false,
        );
        assert_eq!(
            out,
            "Thinking...\nNeed weather.\n...done thinking.\n\ntool call: functions.get_weather {\"city\":\"Paris\"}\n"
        );
    }

    #[test]
    fn empty_turn_ends_the_line() {
        assert_eq!(render(&[], false, false), "\n");
    }
}
