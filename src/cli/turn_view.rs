//! How `xllm run` shows a turn as it streams: the answer text; for models that reason (gpt-oss's
//! analysis channel, `<think>` text of Nemotron-style templates) the reasoning under a `Thinking...` line, dimmed on a terminal (hidden with `--hide-thinking`),
//! and tool calls on their own line.

use std::io::{IsTerminal, Write};

use crate::engine::request::Output;

const DIM: &str = "\x1b[2m";
const RESET: &str = "\x1b[0m";

/// Streams a turn's visible parts to `out` (stdout in the CLI).
pub(crate) struct TurnPrinter<W: Write> {
    out: W,
    hide_thinking: bool,
    tty: bool,
    thinking_open: bool,
    wrote_any: bool,
    at_line_start: bool,
}

impl TurnPrinter<std::io::Stdout> {
    pub(crate) fn stdout(hide_thinking: bool) -> Self {
        let tty = std::io::stdout().is_terminal();
        TurnPrinter::new(std::io::stdout(), hide_thinking, tty)
    }
}

impl<W: Write> TurnPrinter<W> {
    /// `dim` styles the reasoning with ANSI dim (only for a terminal).
    pub(crate) fn new(out: W, hide_thinking: bool, dim: bool) -> Self {
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

    pub(crate) fn show(&mut self, output: &Output) {
        match output {
            Output::Reasoning(text) => {
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
            Output::Text(text) => {
                self.close_thinking();
                self.write(text);
            }
            Output::ToolCall { name, arguments } => {
                self.close_thinking();
                let nl = if self.at_line_start { "" } else { "\n" };
                self.write(&format!("{nl}tool call: {name} {arguments}\n"));
            }
        }
    }

    pub(crate) fn finish(&mut self) {
        self.close_thinking();
        if !self.at_line_start || !self.wrote_any {
            self.write("\n");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(outputs: &[Output], hide: bool, dim: bool) -> String {
        let mut buf = Vec::new();
        let mut p = TurnPrinter::new(&mut buf, hide, dim);
        for o in outputs {
            p.show(o);
        }
        p.finish();
        String::from_utf8(buf).unwrap()
    }

    fn turn() -> Vec<Output> {
        vec![
            Output::Reasoning("User greets.".into()),
            Output::Reasoning(" Reply.".into()),
            Output::Text("Hello".into()),
            Output::Text(" there!".into()),
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
                Output::Reasoning("Need weather.".into()),
                Output::ToolCall {
                    name: "functions.get_weather".into(),
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
