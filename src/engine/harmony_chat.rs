//! Chat with harmony models (gpt-oss): the prompt rendered with `reasoning_effort`, and a
//! generation loop that keeps the special tokens the generic loop hides, so [`HarmonyParser`]
//! can split the answer into reasoning (`analysis`), answer (`final`) and tool calls.
//!
//! Nothing here prints: [`run_turn`] hands each [`HarmonyOutput`] to a callback, like
//! [`super::generate::Generation`] does with text, so the CLI (and later a server) renders it.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::chat_template::Message;
use super::generate::{FinishReason, GenerationStats, Sequence, StopConditions};
use super::harmony::{Channel, HarmonyEvent, HarmonyParser, STOP_TOKENS};
use super::load::LoadedModel;
use super::sampler::{Sampler, SamplingParams};
use super::tokenizer::StreamDecoder;

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

/// What the user sees of a harmony turn, as it is generated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HarmonyOutput {
    /// Reasoning text (`analysis` channel).
    Thinking(String),
    /// Answer text (`final` channel, and `commentary` preambles meant for the user).
    Answer(String),
    /// A complete tool call: recipient (e.g. `functions.get_weather`) and its arguments.
    ToolCall {
        recipient: String,
        arguments: String,
    },
}

/// A finished harmony turn.
#[derive(Debug, Clone)]
pub struct HarmonyTurnResult {
    pub thinking: String,
    pub answer: String,
    pub tool_calls: Vec<(String, String)>,
    /// Generated token ids (stop token included).
    pub tokens: Vec<u32>,
    pub finish_reason: FinishReason,
    pub stats: GenerationStats,
}

/// A model that speaks harmony, with the ids of its control tokens.
#[derive(Debug, Clone)]
pub struct HarmonyChat {
    specials: HashMap<u32, &'static str>,
    pub effort: ReasoningEffort,
}

impl HarmonyChat {
    /// `Some` for gpt-oss checkpoints (architecture `gpt_oss`, or a template written in harmony)
    /// whose tokenizer has the harmony control tokens.
    pub fn detect(loaded: &LoadedModel, effort: ReasoningEffort) -> Option<Self> {
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
        if !required.iter().all(|r| specials.values().any(|s| s == r)) {
            return None;
        }
        Some(Self { specials, effort })
    }

    /// The prompt tokens for `messages`: the harmony template with `reasoning_effort`, ending
    /// with `<|start|>assistant`. Assistant messages carry only their final answers, so prior
    /// reasoning is never fed back.
    pub fn prompt_tokens(
        &self,
        loaded: &LoadedModel,
        messages: &[Message],
    ) -> anyhow::Result<Vec<u32>> {
        let template = loaded.template.as_ref().ok_or_else(|| {
            anyhow::anyhow!("this gpt-oss model has no chat template (chat_template.jinja)")
        })?;
        let extra = minijinja::context! { reasoning_effort => self.effort.as_str() };
        let text = template.render_with(messages, true, extra)?;
        loaded.tokenizer.encode(&text, false)
    }
}

/// Generates one assistant turn into `seq` from `prompt`, handing what the user should see to
/// `on_output` as it comes. Stops at `<|return|>`, `<|call|>`, `<|endoftext|>` (or any EOS id
/// of the tokenizer), a stop string in the answer, `max_tokens`, a full context or cancellation.
pub fn run_turn(
    chat: &HarmonyChat,
    loaded: &LoadedModel,
    seq: &mut Sequence,
    prompt: &[u32],
    sampling: SamplingParams,
    stop: &StopConditions,
    mut on_output: impl FnMut(&HarmonyOutput),
) -> anyhow::Result<HarmonyTurnResult> {
    let model = loaded.model.as_ref();
    let tokenizer = &loaded.tokenizer;
    let t0 = Instant::now();
    let (mut logits, evaluated) = seq.feed_prompt(model, prompt)?;
    let mut stats = GenerationStats {
        prompt_tokens: prompt.len(),
        prompt_eval_count: evaluated,
        prompt_eval_duration: t0.elapsed(),
        ..Default::default()
    };
    let mut sampler = Sampler::new(sampling);
    let mut parser = HarmonyParser::new();
    let mut decoder = StreamDecoder::default();
    let mut result = HarmonyTurnResult {
        thinking: String::new(),
        answer: String::new(),
        tool_calls: Vec::new(),
        tokens: Vec::new(),
        finish_reason: FinishReason::Stop,
        stats: GenerationStats::default(),
    };
    let mut emit = |events: Vec<HarmonyEvent>, result: &mut HarmonyTurnResult| -> bool {
        let mut stopped = false;
        for event in events {
            let output = match event {
                HarmonyEvent::Delta {
                    channel: Channel::Analysis,
                    text,
                } => {
                    result.thinking.push_str(&text);
                    HarmonyOutput::Thinking(text)
                }
                HarmonyEvent::Delta { text, .. } => {
                    result.answer.push_str(&text);
                    HarmonyOutput::Answer(text)
                }
                HarmonyEvent::ToolCall {
                    recipient,
                    arguments,
                } => {
                    result
                        .tool_calls
                        .push((recipient.clone(), arguments.clone()));
                    HarmonyOutput::ToolCall {
                        recipient,
                        arguments,
                    }
                }
                HarmonyEvent::Stop(_) => {
                    stopped = true;
                    continue;
                }
            };
            on_output(&output);
        }
        stopped
    };
    let finish_reason = loop {
        if stop
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
        {
            break FinishReason::Cancelled;
        }
        if stop.max_tokens.is_some_and(|m| result.tokens.len() >= m) {
            break FinishReason::Length;
        }
        if seq.tokens.len() + 1 >= seq.max_tokens {
            break FinishReason::ContextFull;
        }
        let t_step = Instant::now();
        let token = sampler.sample(&logits, &result.tokens);
        result.tokens.push(token);
        let special = chat.specials.get(&token).copied();
        let is_eos = tokenizer.is_eos(token);
        let ends_turn = is_eos || special.is_some_and(|s| STOP_TOKENS.contains(&s));
        if ends_turn {
            // Like the generic loop: a stop token is not run through the model.
        } else if seq.tokens.len() + 1 < seq.max_tokens {
            logits = seq.advance(model, token)?;
        } else {
            seq.tokens.push(token);
        }
        stats.eval_count += 1;
        stats.eval_duration += t_step.elapsed();
        let mut events = Vec::new();
        match special {
            Some(name) => {
                // Text before a control token is complete: flush it first, in order.
                let tail = decoder.flush(tokenizer)?;
                if !tail.is_empty() {
                    events.extend(parser.push(&tail));
                }
                decoder = StreamDecoder::default();
                events.extend(parser.push(name));
            }
            None => {
                let piece = decoder.push(tokenizer, token)?;
                if !piece.is_empty() {
                    events.extend(parser.push(&piece));
                }
            }
        }
        let answer_before = result.answer.len();
        if emit(events, &mut result) || ends_turn {
            break FinishReason::Stop;
        }
        if let Some(cut) = stop_string_cut(&result.answer, answer_before, &stop.stop_strings) {
            result.answer.truncate(cut);
            break FinishReason::StopString;
        }
    };
    result.finish_reason = finish_reason;
    result.stats = stats;
    Ok(result)
}

/// Where the answer must be cut if a stop string appeared in it (searching only text that could
/// contain a new match).
fn stop_string_cut(answer: &str, before: usize, stops: &[String]) -> Option<usize> {
    stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| {
            let mut from = before.saturating_sub(s.len());
            while !answer.is_char_boundary(from) {
                from -= 1;
            }
            answer[from..].find(s.as_str()).map(|p| from + p)
        })
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::{CausalLm, ModelInfo};
    use crate::engine::chat_template::ChatTemplate;
    use crate::engine::kv_cache::SequenceCache;
    use crate::engine::tokenizer::TextTokenizer;
    use crate::quant::KvProfile;
    use candle_core::{DType, Device, Tensor};
    use std::path::Path;
    use std::sync::atomic::AtomicUsize;

    /// A stand-in model that "generates" a fixed token script (one-hot logits), so the loop,
    /// the parser and the stops are tested on exact token streams.
    struct Scripted {
        info: ModelInfo,
        script: Vec<u32>,
        calls: AtomicUsize,
    }

    impl CausalLm for Scripted {
        fn forward(
            &self,
            _tokens: &[u32],
            _cache: &mut SequenceCache,
            _last_only: bool,
        ) -> candle_core::Result<Tensor> {
            let i = self.calls.fetch_add(1, Ordering::SeqCst);
            let mut logits = vec![0f32; self.info.vocab_size];
            logits[self.script[i.min(self.script.len() - 1)] as usize] = 10.0;
            Tensor::from_vec(logits, (1, self.info.vocab_size), &Device::Cpu)
        }
        fn info(&self) -> &ModelInfo {
            &self.info
        }
    }

    fn fixture() -> &'static Path {
        Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/gpt_oss_tiny"
        ))
    }

    fn scripted(generated: &str) -> LoadedModel {
        let tokenizer = TextTokenizer::from_dir(fixture(), &[2, 1, 8]).unwrap();
        let script = tokenizer.encode(generated, false).unwrap();
        let template =
            ChatTemplate::new(tokenizer.chat_template.as_deref().unwrap(), None, None).unwrap();
        let info = ModelInfo {
            architecture: "gpt_oss".into(),
            vocab_size: 360,
            context_length: 4096,
            cache_layers: 1,
            kv_heads: 1,
            head_dim: 4,
            cache_dtype: DType::F32,
            device: Device::Cpu,
            weight_format: "test".into(),
        };
        LoadedModel {
            model: Box::new(Scripted {
                info,
                script,
                calls: AtomicUsize::new(0),
            }),
            tokenizer,
            template: Some(template),
            sampling: SamplingParams::default(),
            load_duration: Default::default(),
            file_bytes: 0,
        }
    }

    fn greedy() -> SamplingParams {
        SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        }
    }

    /// Runs the scripted turn with `room` tokens of context left after the prompt.
    fn run(
        generated: &str,
        stop: StopConditions,
        room: usize,
    ) -> (HarmonyTurnResult, Vec<HarmonyOutput>) {
        let loaded = scripted(generated);
        let chat = HarmonyChat::detect(&loaded, ReasoningEffort::High).expect("harmony model");
        let prompt = chat
            .prompt_tokens(&loaded, &[Message::new("user", "What is 2+2?")])
            .unwrap();
        let ctx = prompt.len() + room;
        let cache = loaded
            .model
            .info()
            .new_cache(KvProfile::Default, ctx)
            .unwrap();
        let mut seq = Sequence::new(cache, ctx);
        let mut seen = Vec::new();
        let result = run_turn(&chat, &loaded, &mut seq, &prompt, greedy(), &stop, |o| {
            seen.push(o.clone())
        })
        .unwrap();
        (result, seen)
    }

    const TURN: &str = "<|channel|>analysis<|message|>Add two and two.<|end|><|start|>assistant<|channel|>final<|message|>It is 4.<|return|>";

    #[test]
    fn reasoning_and_answer_are_separated_and_return_stops() {
        let (r, seen) = run(TURN, StopConditions::default(), 4096);
        assert_eq!(r.thinking, "Add two and two.");
        assert_eq!(r.answer, "It is 4.");
        assert_eq!(r.finish_reason, FinishReason::Stop);
        assert_eq!(r.tokens.last(), Some(&2), "ends with <|return|>");
        assert!(matches!(seen.first(), Some(HarmonyOutput::Thinking(_))));
        assert!(matches!(seen.last(), Some(HarmonyOutput::Answer(_))));
        assert_eq!(r.stats.eval_count, r.tokens.len());
    }

    #[test]
    fn tool_call_stops_at_call() {
        let (r, seen) = run(
            "<|channel|>commentary to=functions.add <|constrain|>json<|message|>{\"a\":2}<|call|>ignored",
            StopConditions::default(),
            4096,
        );
        assert_eq!(
            r.tool_calls,
            vec![("functions.add".to_string(), "{\"a\":2}".to_string())]
        );
        assert_eq!(r.answer, "");
        assert_eq!(r.finish_reason, FinishReason::Stop);
        assert!(matches!(seen.last(), Some(HarmonyOutput::ToolCall { .. })));
    }

    #[test]
    fn max_tokens_stop_strings_and_full_context() {
        let (r, _) = run(
            TURN,
            StopConditions {
                max_tokens: Some(3),
                ..Default::default()
            },
            4096,
        );
        assert_eq!((r.tokens.len(), r.finish_reason), (3, FinishReason::Length));
        let (r, _) = run(
            TURN,
            StopConditions {
                stop_strings: vec![" 4".into()],
                ..Default::default()
            },
            4096,
        );
        assert_eq!(r.answer, "It is");
        assert_eq!(r.finish_reason, FinishReason::StopString);
        let (r, _) = run(TURN, StopConditions::default(), 4);
        assert_eq!(r.finish_reason, FinishReason::ContextFull);
        assert_eq!(r.tokens.len(), 3, "the last slot is never filled");
    }

    #[test]
    fn prompt_carries_reasoning_effort_and_ends_with_assistant_start() {
        let loaded = scripted(TURN);
        for effort in [ReasoningEffort::Low, ReasoningEffort::High] {
            let chat = HarmonyChat::detect(&loaded, effort).unwrap();
            let ids = chat
                .prompt_tokens(&loaded, &[Message::new("user", "Hi")])
                .unwrap();
            let text = loaded.tokenizer.decode(&ids).unwrap();
            assert!(
                text.contains(&format!("Reasoning: {}", effort.as_str())),
                "{text}"
            );
            let tail = loaded
                .tokenizer
                .encode("<|start|>assistant", false)
                .unwrap();
            assert!(ids.ends_with(&tail), "ends with <|start|>assistant");
        }
    }

    #[test]
    fn stop_string_found_across_pieces() {
        let answer = "Hello wor";
        assert_eq!(stop_string_cut(answer, 6, &["lo w".into()]), Some(3));
        assert_eq!(stop_string_cut(answer, 9, &["xyz".into()]), None);
        assert_eq!(
            stop_string_cut("é stop", 2, &["stop".into(), "é".into()]),
            Some(0)
        );
    }

    #[test]
    fn effort_names_match_the_template() {
        assert_eq!(ReasoningEffort::default().as_str(), "medium");
        assert_eq!(ReasoningEffort::Low.as_str(), "low");
        assert_eq!(ReasoningEffort::High.as_str(), "high");
    }
}
