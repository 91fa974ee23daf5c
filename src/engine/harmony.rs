//! The harmony response format (gpt-oss): turns the generated token stream into what the user
//! sees. The prompt ends with `<|start|>assistant`; the model then writes one or more messages
//!
//! ```text
//! <|channel|>analysis<|message|>…reasoning…<|end|>
//! <|start|>assistant<|channel|>commentary to=functions.f <|constrain|>json<|message|>{…}<|call|>
//! <|start|>assistant<|channel|>final<|message|>…answer…<|return|>
//! ```
//!
//! [`HarmonyParser`] is fed one decoded token at a time (special tokens arrive as their literal
//! text, e.g. `<|channel|>`) and emits text deltas tagged with their channel, tool calls, and the
//! stop. `analysis` is the reasoning the CLI shows dimmed (or hides); `final` is the answer.
//! Generation stops at `<|return|>`, `<|call|>` or `<|endoftext|>` ([`STOP_TOKENS`]).

use std::collections::HashMap;

use super::load::LoadedModel;

/// Control tokens of the harmony format; the generic decoder drops them, the parser needs them.
const HARMONY_SPECIALS: [&str; 9] = [
    "<|startoftext|>",
    "<|endoftext|>",
    "<|return|>",
    "<|call|>",
    "<|start|>",
    "<|end|>",
    "<|message|>",
    "<|channel|>",
    "<|constrain|>",
];

/// How much the model reasons before answering (the template's `reasoning_effort`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReasoningEffort {
    Low,
    #[default]
    Medium,
    High,
}

impl ReasoningEffort {
    pub fn as_str(self) -> &'static str {
        match self {
            ReasoningEffort::Low => "low",
            ReasoningEffort::Medium => "medium",
            ReasoningEffort::High => "high",
        }
    }
}

/// The ids of the harmony control tokens, for gpt-oss checkpoints (architecture `gpt_oss`, or a
/// template written in harmony) whose tokenizer has them; `None` for every other model.
pub fn harmony_specials(loaded: &LoadedModel) -> Option<HashMap<u32, &'static str>> {
    let template_is_harmony = loaded
        .tokenizer
        .chat_template
        .as_deref()
        .is_some_and(|t| t.contains("<|channel|>"));
    if loaded.model.info().architecture != "gpt_oss" && !template_is_harmony {
        return None;
    }
    let specials: HashMap<u32, &'static str> = HARMONY_SPECIALS
        .iter()
        .filter_map(|s| loaded.tokenizer.token_to_id(s).map(|id| (id, *s)))
        .collect();
    let required = ["<|channel|>", "<|message|>", "<|return|>"];
    required
        .iter()
        .all(|r| specials.values().any(|s| s == r))
        .then_some(specials)
}

/// Tokens that end generation in harmony.
pub const STOP_TOKENS: [&str; 3] = ["<|return|>", "<|call|>", "<|endoftext|>"];

/// Where a piece of message text belongs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Channel {
    /// Chain of thought: shown as "thinking", never fed back as content.
    Analysis,
    /// The answer.
    Final,
    /// Tool-call arguments or preambles (`commentary`).
    Commentary,
    /// A channel this parser does not know, kept by name.
    Other(String),
}

impl Channel {
    fn parse(name: &str) -> Self {
        match name {
            "analysis" => Channel::Analysis,
            "final" => Channel::Final,
            "commentary" => Channel::Commentary,
            other => Channel::Other(other.to_string()),
        }
    }
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// `<|return|>`: the answer is complete.
    Return,
    /// `<|call|>`: the model waits for a tool result.
    Call,
    /// `<|endoftext|>`.
    EndOfText,
}

/// What one token produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HarmonyEvent {
    /// Message text on a channel. Tool-call arguments are not streamed as deltas.
    Delta {
        channel: Channel,
        text: String,
    },
    /// A complete tool call (`recipient` e.g. `functions.get_weather`, arguments as written).
    ToolCall {
        recipient: String,
        arguments: String,
    },
    Stop(StopReason),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Reading a message header (role, `to=…`, channel, constraint) until `<|message|>`.
    Header,
    /// Inside a message body.
    Body,
    /// After a stop token: everything else is ignored.
    Done,
}

/// Streaming parser of one assistant turn (see the module doc).
#[derive(Debug, Clone)]
pub struct HarmonyParser {
    state: State,
    /// Header text seen before `<|channel|>` (role and maybe `to=`).
    role_part: String,
    /// Header text after `<|channel|>` (channel name, maybe `to=`, constraint).
    channel_part: String,
    in_channel: bool,
    channel: Channel,
    recipient: Option<String>,
    body: String,
}

impl Default for HarmonyParser {
    fn default() -> Self {
        Self::new()
    }
}

impl HarmonyParser {
    /// A parser for the tokens generated after the prompt's `<|start|>assistant`.
    pub fn new() -> Self {
        Self {
            state: State::Header,
            role_part: String::new(),
            channel_part: String::new(),
            in_channel: false,
            channel: Channel::Final,
            recipient: None,
            body: String::new(),
        }
    }

    /// Whether a stop token has been seen.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Feeds one decoded token.
    pub fn push(&mut self, piece: &str) -> Vec<HarmonyEvent> {
        let mut events = Vec::new();
        if self.state == State::Done {
            return events;
        }
        match piece {
            "<|return|>" | "<|call|>" | "<|endoftext|>" => {
                if let Some(recipient) = self.recipient.take() {
                    events.push(HarmonyEvent::ToolCall {
                        recipient,
                        arguments: std::mem::take(&mut self.body),
                    });
                }
                let reason = match piece {
                    "<|return|>" => StopReason::Return,
                    "<|call|>" => StopReason::Call,
                    _ => StopReason::EndOfText,
                };
                events.push(HarmonyEvent::Stop(reason));
                self.state = State::Done;
            }
            "<|end|>" => self.reset_header(),
            "<|start|>" => self.reset_header(),
            "<|channel|>" if self.state == State::Header => self.in_channel = true,
            "<|constrain|>" if self.state == State::Header => {
                // The constraint (e.g. `json`) is header text we do not need.
                self.channel_part.push(' ');
            }
            "<|message|>" if self.state == State::Header => self.open_body(),
            text => match self.state {
                State::Header if self.in_channel => self.channel_part.push_str(text),
                State::Header => self.role_part.push_str(text),
                State::Body => {
                    if self.recipient.is_some() {
                        self.body.push_str(text);
                    } else if !text.is_empty() {
                        events.push(HarmonyEvent::Delta {
                            channel: self.channel.clone(),
                            text: text.to_string(),
                        });
                    }
                }
                State::Done => {}
            },
        }
        events
    }

    fn reset_header(&mut self) {
        self.state = State::Header;
        self.role_part.clear();
        self.channel_part.clear();
        self.in_channel = false;
        self.recipient = None;
        self.body.clear();
    }

    fn open_body(&mut self) {
        let words = self
            .role_part
            .split_whitespace()
            .chain(self.channel_part.split_whitespace());
        let mut recipient = None;
        for w in words {
            if let Some(r) = w.strip_prefix("to=") {
                recipient = Some(r.to_string());
            }
        }
        let name = self
            .channel_part
            .split_whitespace()
            .next()
            .unwrap_or("final");
        self.channel = Channel::parse(name);
        self.recipient = recipient;
        self.state = State::Body;
    }
}

/// A whole assistant turn, parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HarmonyTurn {
    pub thinking: String,
    pub answer: String,
    pub tool_calls: Vec<(String, String)>,
    pub stop: Option<StopReason>,
}

/// Parses a complete turn given as its token pieces.
pub fn parse_turn<'a>(pieces: impl IntoIterator<Item = &'a str>) -> HarmonyTurn {
    let mut parser = HarmonyParser::new();
    let mut turn = HarmonyTurn::default();
    for piece in pieces {
        for event in parser.push(piece) {
            match event {
                HarmonyEvent::Delta {
                    channel: Channel::Analysis,
                    text,
                } => turn.thinking.push_str(&text),
                HarmonyEvent::Delta { text, .. } => turn.answer.push_str(&text),
                HarmonyEvent::ToolCall {
                    recipient,
                    arguments,
                } => turn.tool_calls.push((recipient, arguments)),
                HarmonyEvent::Stop(reason) => turn.stop = Some(reason),
            }
        }
    }
    turn
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(s: &str) -> Vec<String> {
        // Split literal text into special tokens and single characters, as a tokenizer might.
        let mut out = Vec::new();
        let mut rest = s;
        while !rest.is_empty() {
            if rest.starts_with("<|") {
                let end = rest.find("|>").unwrap() + 2;
                out.push(rest[..end].to_string());
                rest = &rest[end..];
            } else {
                let c = rest.chars().next().unwrap();
                out.push(c.to_string());
                rest = &rest[c.len_utf8()..];
            }
        }
        out
    }

    fn turn(s: &str) -> HarmonyTurn {
        let p = pieces(s);
        parse_turn(p.iter().map(String::as_str))
    }

    #[test]
    fn analysis_then_final() {
        let t = turn("<|channel|>analysis<|message|>User greets. Reply.<|end|><|start|>assistant<|channel|>final<|message|>Hello there!<|return|>");
        assert_eq!(t.thinking, "User greets. Reply.");
        assert_eq!(t.answer, "Hello there!");
        assert_eq!(t.stop, Some(StopReason::Return));
        assert!(t.tool_calls.is_empty());
    }

    #[test]
    fn tool_call_with_recipient_in_channel_header() {
        let t = turn("<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{\"city\":\"Paris\"}<|call|>");
        assert_eq!(t.thinking, "Need weather.");
        assert_eq!(t.answer, "");
        assert_eq!(
            t.tool_calls,
            vec![(
                "functions.get_weather".to_string(),
                "{\"city\":\"Paris\"}".to_string()
            )]
        );
        assert_eq!(t.stop, Some(StopReason::Call));
    }

    #[test]
    fn recipient_in_role_header() {
        let t = turn(
            "<|start|>assistant to=functions.lookup<|channel|>commentary json<|message|>{}<|call|>",
        );
        assert_eq!(
            t.tool_calls,
            vec![("functions.lookup".to_string(), "{}".to_string())]
        );
    }

    #[test]
    fn final_only_and_endoftext() {
        let t = turn("<|channel|>final<|message|>42<|endoftext|>ignored");
        assert_eq!(t.answer, "42");
        assert_eq!(t.thinking, "");
        assert_eq!(t.stop, Some(StopReason::EndOfText));
    }

    #[test]
    fn streaming_emits_deltas_per_token_and_nothing_after_stop() {
        let mut p = HarmonyParser::new();
        assert!(p.push("<|channel|>").is_empty());
        assert!(p.push("analysis").is_empty());
        assert!(p.push("<|message|>").is_empty());
        assert_eq!(
            p.push("Hmm"),
            vec![HarmonyEvent::Delta {
                channel: Channel::Analysis,
                text: "Hmm".into()
            }]
        );
        assert!(p.push("<|end|>").is_empty());
        assert_eq!(
            p.push("<|return|>"),
            vec![HarmonyEvent::Stop(StopReason::Return)]
        );
        assert!(p.is_done());
        assert!(p.push("more").is_empty());
    }

    #[test]
    fn stop_tokens_are_the_three_harmony_stops() {
        for s in STOP_TOKENS {
            let mut p = HarmonyParser::new();
            let ev = p.push(s);
            assert!(matches!(ev.last(), Some(HarmonyEvent::Stop(_))), "{s}");
        }
        let mut p = HarmonyParser::new();
        assert!(
            p.push("<|end|>").is_empty(),
            "<|end|> ends a message, not the turn"
        );
        assert!(!p.is_done());
    }
}
