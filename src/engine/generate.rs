//! What a generation reports: why it ended and how long it took (the loop itself is the
//! [`super::scheduler`]).

use std::time::Duration;

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token.
    Stop,
    /// One of the stop strings.
    StopString,
    /// `max_tokens` generated.
    Length,
    /// The context (KV cache) is full.
    ContextFull,
    /// Cancelled by the caller (Ctrl-C).
    Cancelled,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::StopString => "stop_string",
            FinishReason::Length => "length",
            FinishReason::ContextFull => "context_full",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// Timings in the style of `ollama run --verbose`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    /// Tokens actually evaluated for the prompt (cached prefix excluded).
    pub prompt_eval_count: usize,
    pub prompt_eval_duration: Duration,
    pub eval_count: usize,
    pub eval_duration: Duration,
    /// KV memory the sequence held when it ended (its blocks, shared ones included).
    pub kv_cache_bytes: usize,
    /// Time spent in the grammar constraint (checks, masks, advancing), inside `eval_duration`.
    pub grammar_duration: Duration,
    /// Full token masks computed (the rest of the tokens passed the cheap check).
    pub grammar_masks: usize,
}

impl GenerationStats {
    pub fn prompt_rate(&self) -> f64 {
        rate(self.prompt_eval_count, self.prompt_eval_duration)
    }
    pub fn eval_rate(&self) -> f64 {
        rate(self.eval_count, self.eval_duration)
    }
}

fn rate(n: usize, d: Duration) -> f64 {
    if d.is_zero() {
        0.0
    } else {
        n as f64 / d.as_secs_f64()
    }
}
