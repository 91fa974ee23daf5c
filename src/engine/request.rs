//! What a front end (CLI, HTTP server) hands the engine for one generation, and what it gets
//! back: a stream of [`SeqEvent`]s delivered to an [`EventSink`] as the scheduler steps.

use super::generate::{FinishReason, GenerationStats};
use super::sampler::SamplingParams;
use super::structured::Constraint;
use super::tools::ToolSyntax;

/// How the generated tokens are turned into output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputMode {
    /// Plain text (special tokens hidden).
    #[default]
    Text,
    /// The harmony format (gpt-oss): reasoning, answer and tool calls split by channel.
    Harmony,
    /// `<think>…</think>` reasoning before the answer (Nemotron-style templates); `reasoning`:
    /// the prompt left a reasoning block open, so generation starts inside it.
    Think { reasoning: bool },
}

/// One generation to run.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    /// Prompt token ids (chat template already applied).
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    /// Generated tokens at most (`None`: until a stop or the context is full).
    pub max_tokens: Option<usize>,
    /// End-of-sequence tokens are not sampled before this many tokens (vLLM's `min_tokens`).
    pub min_tokens: usize,
    /// Never stop at end-of-sequence tokens (benchmarks: `ignore_eos`).
    pub ignore_eos: bool,
    /// Text that ends the answer; it is held back while it may be forming and never emitted.
    pub stop_strings: Vec<String>,
    /// Report the chosen token's log-probability and this many alternatives (`Some(0)`: only
    /// the chosen one).
    pub logprobs: Option<usize>,
    pub output: OutputMode,
    /// Longest the sequence (prompt + answer) may grow; `None`: the engine's context size.
    pub context_limit: Option<usize>,
    /// A grammar the answer must follow (compiled by [`super::session::ModelSession::compile`]);
    /// its end ends the answer with finish reason `stop`.
    pub constraint: Option<Constraint>,
    /// Find tool calls in the answer, written in this syntax (harmony calls are always found).
    pub tool_calls: Option<ToolSyntax>,
}

impl GenerationRequest {
    /// A request with default settings for `prompt`.
    pub fn new(prompt: Vec<u32>, sampling: SamplingParams) -> Self {
        Self {
            prompt,
            sampling,
            max_tokens: None,
            min_tokens: 0,
            ignore_eos: false,
            stop_strings: Vec::new(),
            logprobs: None,
            output: OutputMode::Text,
            context_limit: None,
            constraint: None,
            tool_calls: None,
        }
    }
}

/// A piece of what the model produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Answer text.
    Text(String),
    /// Reasoning text (harmony `analysis`, or inside `<think>…</think>`).
    Reasoning(String),
    /// A complete tool call (harmony: `recipient` like `functions.get_weather`; other syntaxes:
    /// the function name), its arguments as JSON text.
    ToolCall { name: String, arguments: String },
}

/// Log-probability of one generated token, with the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    /// `(token, logprob)`, best first.
    pub top: Vec<(u32, f32)>,
}

/// What happened to one request.
#[derive(Debug, Clone)]
pub enum SeqEvent {
    /// The prompt was admitted: how many of its tokens were reused from the prefix cache.
    Started {
        prompt_tokens: usize,
        cached_tokens: usize,
    },
    /// New output, with the ids of the tokens that produced it (and their log-probabilities
    /// when asked for). `tokens` may be non-empty with no output (held-back text), and output
    /// may come with no tokens (text released at the end).
    Output {
        outputs: Vec<Output>,
        tokens: Vec<u32>,
        logprobs: Vec<TokenLogprob>,
    },
    /// The request is over (the last event).
    Finished {
        reason: FinishReason,
        stats: GenerationStats,
    },
    /// The request failed (the last event).
    Failed(String),
}

/// Receives a request's events on the engine thread. Returning `false` means nobody listens any
/// more (a client went away): the request is cancelled at the next step.
pub type EventSink = Box<dyn FnMut(SeqEvent) -> bool + Send>;

/// Why a request was refused at submission.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the server is busy: {waiting} requests are waiting; retry later")]
    Overloaded { waiting: usize },
    #[error(
        "the prompt has {prompt} tokens but the context holds {limit}; shorten it or raise the context size (--ctx)"
    )]
    ContextExceeded { prompt: usize, limit: usize },
    #[error("{0}")]
    Invalid(String),
    #[error("the engine has stopped")]
    Stopped,
}
