//! Per-sequence, per-token output processing of the generation loop: token ids become text
//! pieces (never half a UTF-8 character), harmony turns are split into reasoning, answer and
//! tool calls, and stop strings are held back until they can be ruled out — so a stop string
//! never reaches the client, streamed or not, whatever the model.

use std::collections::HashMap;
use std::sync::Arc;

use super::generate::FinishReason;
use super::harmony::{Channel, HarmonyEvent, HarmonyParser};
use super::request::{Output, OutputMode};
use super::think::{ThinkSplitter, ThinkStep, ThinkTags};
use super::tokenizer::{StreamDecoder, TextTokenizer};
use super::tools::{CallParser, Piece, ToolSyntax};

/// Holds back text that may be the start of a stop string.
#[derive(Debug, Default)]
pub(crate) struct StopFilter {
    stops: Vec<String>,
    held: String,
}

impl StopFilter {
    pub(crate) fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
        }
    }

    /// Adds `text`; returns what can be shown now, and `true` when a stop string was found (the
    /// text before it is returned and everything after is dropped).
    pub(crate) fn push(&mut self, text: &str) -> (String, bool) {
        self.held.push_str(text);
        if let Some(pos) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let shown = self.held[..pos].to_string();
            self.held.clear();
            return (shown, true);
        }
        let keep = self
            .stops
            .iter()
            .map(|s| longest_suffix_prefix(&self.held, s))
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let shown = self.held[..cut].to_string();
        self.held.drain(..cut);
        (shown, false)
    }

    /// The end of the answer: whatever was held back could not become a stop string.
    pub(crate) fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`.
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    (1..stop.len().min(text.len() + 1))
        .rev()
        .find(|&n| stop.is_char_boundary(n) && text.ends_with(&stop[..n]))
        .unwrap_or(0)
}

/// The harmony control tokens of a model, by id.
pub type HarmonySpecials = Arc<HashMap<u32, &'static str>>;

/// Turns one sequence's generated tokens into [`Output`]s.
pub(crate) struct OutputStream {
    decoder: StreamDecoder,
    stop: StopFilter,
    harmony: Option<(HarmonyParser, HarmonySpecials)>,
    /// Tool calls in the text (non-harmony syntaxes).
    calls: Option<CallParser>,
    think: Option<ThinkSplitter>,
    done: bool,
}

impl OutputStream {
    pub(crate) fn new(
        mode: OutputMode,
        stop_strings: &[String],
        specials: Option<&HarmonySpecials>,
        tool_calls: Option<ToolSyntax>,
        think_tags: Option<ThinkTags>,
    ) -> Self {
        let harmony = match (mode, specials) {
            (OutputMode::Harmony, Some(s)) => Some((HarmonyParser::new(), s.clone())),
            _ => None,
        };
        let calls = match (&harmony, tool_calls) {
            (None, Some(syntax)) if syntax != ToolSyntax::Harmony => Some(CallParser::new(syntax)),
            _ => None,
        };
        let think = match (mode, think_tags) {
            (OutputMode::Think { reasoning }, Some(tags)) => {
                Some(ThinkSplitter::new(tags, reasoning))
            }
            _ => None,
        };
        Self {
            decoder: StreamDecoder::default(),
            stop: StopFilter::new(stop_strings),
            harmony,
            calls,
            think,
            done: false,
        }
    }

    /// Plain text through the tool-call parser (when there is one) and the stop filter.
    /// Returns `true` when a stop string ended the answer.
    fn text(&mut self, pieces: Vec<Piece>, outputs: &mut Vec<Output>) -> bool {
        for piece in pieces {
            match piece {
                Piece::Call(name, arguments) => outputs.push(Output::ToolCall { name, arguments }),
                Piece::Text(t) => {
                    let (text, stopped) = self.stop.push(&t);
                    push_text(outputs, Output::Text(text));
                    if stopped {
                        return true;
                    }
                }
            }
        }
        false
    }

    fn pieces(&mut self, text: &str) -> Vec<Piece> {
        match &mut self.calls {
            Some(p) => p.push(text),
            None => vec![Piece::Text(text.to_string())],
        }
    }

    /// `<think>` mode: reasoning text goes out as it comes (stop strings apply to the answer
    /// only, as for harmony's analysis channel); a tag flushes the text before it to its side.
    fn push_think(
        &mut self,
        tokenizer: &TextTokenizer,
        token: u32,
    ) -> anyhow::Result<(Vec<Output>, Option<FinishReason>)> {
        let mut outputs = Vec::new();
        let splitter = self.think.as_mut().expect("think mode");
        let was_inside = splitter.inside();
        let (text, side_inside) = match splitter.step(token) {
            ThinkStep::Tag => {
                let tail = self.decoder.flush(tokenizer)?;
                self.decoder = StreamDecoder::default();
                (tail, was_inside)
            }
            ThinkStep::Reasoning => (self.decoder.push(tokenizer, token)?, true),
            ThinkStep::Answer => (self.decoder.push(tokenizer, token)?, false),
        };
        if side_inside {
            push_text(&mut outputs, Output::Reasoning(text));
            return Ok((outputs, None));
        }
        let text = splitter.answer_text(text);
        let pieces = self.pieces(&text);
        if self.text(pieces, &mut outputs) {
            self.done = true;
            return Ok((outputs, Some(FinishReason::StopString)));
        }
        Ok((outputs, None))
    }

    /// Feeds one generated token (end-of-sequence tokens are handled by the caller). Returns the
    /// outputs it completes and, when the answer is over (a stop string, a harmony stop token),
    /// why.
    pub(crate) fn push(
        &mut self,
        tokenizer: &TextTokenizer,
        token: u32,
    ) -> anyhow::Result<(Vec<Output>, Option<FinishReason>)> {
        let mut outputs = Vec::new();
        if self.done {
            return Ok((outputs, Some(FinishReason::Stop)));
        }
        if self.think.is_some() {
            return self.push_think(tokenizer, token);
        }
        if self.harmony.is_none() {
            let piece = self.decoder.push(tokenizer, token)?;
            let pieces = self.pieces(&piece);
            if self.text(pieces, &mut outputs) {
                self.done = true;
                return Ok((outputs, Some(FinishReason::StopString)));
            }
            return Ok((outputs, None));
        }
        let Some((parser, specials)) = &mut self.harmony else {
            return Ok((outputs, None));
        };
        let mut events = Vec::new();
        match specials.get(&token).copied() {
            Some(name) => {
                // Text before a control token is complete: flush it first, in order.
                let tail = self.decoder.flush(tokenizer)?;
                if !tail.is_empty() {
                    events.extend(parser.push(&tail));
                }
                self.decoder = StreamDecoder::default();
                events.extend(parser.push(name));
            }
            None => {
                let piece = self.decoder.push(tokenizer, token)?;
                if !piece.is_empty() {
                    events.extend(parser.push(&piece));
                }
            }
        }
        let mut finish = None;
        for event in events {
            match event {
                HarmonyEvent::Delta {
                    channel: Channel::Analysis,
                    text,
                } => push_text(&mut outputs, Output::Reasoning(text)),
                HarmonyEvent::Delta { text, .. } => {
                    let (text, stopped) = self.stop.push(&text);
                    push_text(&mut outputs, Output::Text(text));
                    if stopped {
                        finish = Some(FinishReason::StopString);
                        break;
                    }
                }
                HarmonyEvent::ToolCall {
                    recipient,
                    arguments,
                } => outputs.push(Output::ToolCall {
                    name: recipient,
                    arguments,
                }),
                HarmonyEvent::Stop(_) => {
                    finish = Some(FinishReason::Stop);
                    break;
                }
            }
        }
        if let Some(reason) = finish {
            self.done = true;
            if reason == FinishReason::Stop {
                push_text(&mut outputs, Output::Text(self.stop.flush()));
            }
        }
        Ok((outputs, finish))
    }

    /// The end of generation (for any reason): text still held back, cut at a stop string.
    /// Returns `true` as the second value when a stop string was found in it.
    pub(crate) fn finish(
        &mut self,
        tokenizer: &TextTokenizer,
    ) -> anyhow::Result<(Vec<Output>, bool)> {
        let mut outputs = Vec::new();
        if self.done {
            return Ok((outputs, false));
        }
        self.done = true;
        let tail = self.decoder.flush(tokenizer)?;
        if let Some(splitter) = &mut self.think {
            if splitter.inside() {
                // Generation ended inside the reasoning (a length limit): it stays reasoning.
                push_text(&mut outputs, Output::Text(self.stop.flush()));
                push_text(&mut outputs, Output::Reasoning(tail));
                return Ok((outputs, false));
            }
        }
        let tail = match &mut self.think {
            Some(splitter) => splitter.answer_text(tail),
            None => tail,
        };
        if self.harmony.is_none() && self.calls.is_some() {
            let mut pieces = self.pieces(&tail);
            if let Some(p) = &mut self.calls {
                pieces.extend(p.finish());
            }
            let stopped = self.text(pieces, &mut outputs);
            if !stopped {
                push_text(&mut outputs, Output::Text(self.stop.flush()));
            }
            return Ok((outputs, stopped));
        }
        let (tail_text, stopped) = match &mut self.harmony {
            None => self.stop.push(&tail),
            Some((parser, _)) => {
                let mut text = String::new();
                for event in parser.push(&tail) {
                    match event {
                        HarmonyEvent::Delta {
                            channel: Channel::Analysis,
                            text: t,
                        } => push_text(&mut outputs, Output::Reasoning(t)),
                        HarmonyEvent::Delta { text: t, .. } => text.push_str(&t),
                        _ => {}
                    }
                }
                self.stop.push(&text)
            }
        };
        let rest = if stopped {
            tail_text
        } else {
            tail_text + &self.stop.flush()
        };
        push_text(&mut outputs, Output::Text(rest));
        Ok((outputs, stopped))
    }
}

/// Appends text output, merging with a preceding piece of the same kind and dropping empties.
fn push_text(outputs: &mut Vec<Output>, output: Output) {
    match (outputs.last_mut(), output) {
        (_, Output::Text(t) | Output::Reasoning(t)) if t.is_empty() => {}
        (Some(Output::Text(a)), Output::Text(b)) => a.push_str(&b),
        (Some(Output::Reasoning(a)), Output::Reasoning(b)) => a.push_str(&b),
        (_, o) => outputs.push(o),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffix_prefix_overlap() {
        assert_eq!(longest_suffix_prefix("hello </", "</s>"), 2);
        assert_eq!(longest_suffix_prefix("hello", "</s>"), 0);
        assert_eq!(
            longest_suffix_prefix("a<", "<"),
            0,
            "a full match is found by find()"
        );
    }

    /// Runs the token stream of `generated` (text with harmony control tokens) through an
    /// [`OutputStream`] of the tiny gpt-oss fixture's tokenizer.
    fn harmony(generated: &str, stops: &[String]) -> (Vec<Output>, Option<FinishReason>) {
        let dir = std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/gpt_oss_tiny"
        ));
        let tokenizer = TextTokenizer::from_dir(dir, &[]).unwrap();
        let specials: HashMap<u32, &'static str> = [
            "<|start|>",
            "<|end|>",
            "<|message|>",
            "<|channel|>",
            "<|constrain|>",
            "<|return|>",
            "<|call|>",
        ]
        .iter()
        .filter_map(|s| tokenizer.token_to_id(s).map(|id| (id, *s)))
        .collect();
        let specials = Arc::new(specials);
        let mut stream = OutputStream::new(OutputMode::Harmony, stops, Some(&specials), None, None);
        let mut outputs = Vec::new();
        for id in tokenizer.encode(generated, false).unwrap() {
            let (out, finish) = stream.push(&tokenizer, id).unwrap();
            out.into_iter().for_each(|o| push_text(&mut outputs, o));
            if finish.is_some() {
                return (outputs, finish);
            }
        }
        let (out, _) = stream.finish(&tokenizer).unwrap();
        out.into_iter().for_each(|o| push_text(&mut outputs, o));
        (outputs, None)
    }

    const TURN: &str = "<|channel|>analysis<|message|>Add two and two.<|end|><|start|>assistant<|channel|>final<|message|>It is 4.<|return|>";

    #[test]
    fn harmony_reasoning_and_answer_are_separated_and_return_stops() {
        let (out, finish) = harmony(TURN, &[]);
        assert_eq!(
            out,
            vec![
                Output::Reasoning("Add two and two.".into()),
                Output::Text("It is 4.".into())
            ]
        );
        assert_eq!(finish, Some(FinishReason::Stop));
    }

    #[test]
    fn harmony_tool_call_stops_at_call() {
        let (out, finish) = harmony(
            "<|channel|>commentary to=functions.add <|constrain|>json<|message|>{\"a\":2}<|call|>ignored",
            &[],
        );
        assert_eq!(
            out,
            vec![Output::ToolCall {
                name: "functions.add".into(),
                arguments: "{\"a\":2}".into()
            }]
        );
        assert_eq!(finish, Some(FinishReason::Stop));
    }

    #[test]
    fn harmony_stop_string_in_the_answer_is_never_shown() {
        let (out, finish) = harmony(TURN, &[" 4".into()]);
        assert_eq!(out.last(), Some(&Output::Text("It is".into())));
        assert_eq!(finish, Some(FinishReason::StopString));
    }

    #[test]
    fn stop_strings_are_held_back_across_pieces_and_never_shown() {
        let mut f = StopFilter::new(&["END".into(), "".into()]);
        assert_eq!(f.push("abc E"), ("abc ".into(), false));
        assert_eq!(f.push("N"), ("".into(), false));
        assert_eq!(f.push("Dxyz"), ("".into(), true));
        let mut f = StopFilter::new(&["END".into()]);
        assert_eq!(f.push("abc EN"), ("abc ".into(), false));
        assert_eq!(f.push("ough"), ("ENough".into(), false));
        assert_eq!(f.push(" E"), (" ".into(), false));
        assert_eq!(f.flush(), "E", "held text is released at the end");
    }

    /// Runs `pieces` (text, or a tag id) through a `<think>` [`OutputStream`] of the tiny
    /// Nemotron-H fixture's tokenizer (`<think>` = 5, `</think>` = 6 there).
    fn think(
        pieces: &[Result<&str, u32>],
        reasoning: bool,
        stops: &[String],
    ) -> (Vec<Output>, Option<FinishReason>) {
        let dir = std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/nemotron_h_a"
        ));
        let tokenizer = TextTokenizer::from_dir(dir, &[]).unwrap();
        let tags = ThinkTags::detect(&tokenizer, Some("<think>")).unwrap();
        assert_eq!((tags.open, tags.close), (5, 6));
        let mut stream = OutputStream::new(
            OutputMode::Think { reasoning },
            stops,
            None,
            None,
            Some(tags),
        );
        let mut outputs = Vec::new();
        for piece in pieces {
            let ids = match piece {
                Ok(text) => tokenizer.encode(text, false).unwrap(),
                Err(id) => vec![*id],
            };
            for id in ids {
                let (out, finish) = stream.push(&tokenizer, id).unwrap();
                out.into_iter().for_each(|o| push_text(&mut outputs, o));
                if finish.is_some() {
                    return (outputs, finish);
                }
            }
        }
        let (out, _) = stream.finish(&tokenizer).unwrap();
        out.into_iter().for_each(|o| push_text(&mut outputs, o));
        (outputs, None)
    }

    #[test]
    fn think_text_before_the_close_tag_is_reasoning() {
        let (out, finish) = think(
            &[Ok("the river is long"), Err(6), Ok("\n\nit is long")],
            true,
            &[],
        );
        assert_eq!(
            out,
            vec![
                Output::Reasoning("the river is long".into()),
                Output::Text("it is long".into())
            ]
        );
        assert_eq!(finish, None);
        // Reasoning off in the prompt: all answer; a stop string applies to it.
        let (out, finish) = think(&[Ok("it is long")], false, &[" long".into()]);
        assert_eq!(out, vec![Output::Text("it is".into())]);
        assert_eq!(finish, Some(FinishReason::StopString));
        // A stop string inside the reasoning does not end it.
        let (out, _) = think(
            &[Ok("is long"), Err(6), Ok("the end")],
            true,
            &[" long".into()],
        );
        assert_eq!(
            out,
            vec![
                Output::Reasoning("is long".into()),
                Output::Text("the end".into())
            ]
        );
        // Cut off while reasoning (a length limit): it stays reasoning.
        let (out, _) = think(&[Ok("the river")], true, &[]);
        assert_eq!(out, vec![Output::Reasoning("the river".into())]);
        // The model opens a block itself.
        let (out, _) = think(
            &[Ok("so"), Err(5), Ok("hmm"), Err(6), Ok("yes")],
            false,
            &[],
        );
        assert_eq!(
            out,
            vec![
                Output::Text("so".into()),
                Output::Reasoning("hmm".into()),
                Output::Text("yes".into())
            ]
        );
    }
}
