//! The generation loop, driven step by step by the caller (CLI now, a server later): feed a
//! prompt into a sequence, then call [`Generation::step`] until it reports a finish reason.
//! Nothing here prints; text pieces are returned to the caller as they are produced.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use candle_core::Tensor;

use super::kv_cache::SequenceCache;
use super::sampler::{Sampler, SamplingParams};
use super::tokenizer::{StreamDecoder, TextTokenizer};
use crate::arch::CausalLm;

/// One sequence: its tokens and its KV cache.
pub struct Sequence {
    pub cache: SequenceCache,
    pub tokens: Vec<u32>,
    /// Longest the sequence may grow (cache capacity).
    pub max_tokens: usize,
}

impl Sequence {
    pub fn new(cache: SequenceCache, max_tokens: usize) -> Self {
        Self {
            cache,
            tokens: Vec::new(),
            max_tokens,
        }
    }

    /// Makes the sequence hold exactly `prompt`, reusing the cached prefix both share (a chat's
    /// next turn only runs the new tokens). Returns the logits of the last prompt token and the
    /// number of tokens evaluated.
    pub fn feed_prompt(
        &mut self,
        model: &dyn CausalLm,
        prompt: &[u32],
    ) -> anyhow::Result<(Vec<f32>, usize)> {
        if prompt.is_empty() {
            bail!("the prompt is empty");
        }
        if prompt.len() >= self.max_tokens {
            bail!(
                "the prompt has {} tokens but the context holds {}; shorten it or raise --ctx (the model supports {})",
                prompt.len(),
                self.max_tokens,
                model.info().context_length
            );
        }
        let common = self
            .tokens
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count()
            .min(prompt.len() - 1);
        self.cache.truncate(common);
        self.tokens.truncate(common);
        let new = &prompt[common..];
        let logits = model.forward(new, &mut self.cache, true)?;
        self.tokens.extend_from_slice(new);
        Ok((last_row(&logits)?, new.len()))
    }

    /// Appends one token and returns the logits for the next.
    pub fn advance(&mut self, model: &dyn CausalLm, token: u32) -> anyhow::Result<Vec<f32>> {
        let logits = model.forward(&[token], &mut self.cache, true)?;
        self.tokens.push(token);
        last_row(&logits)
    }

    pub fn clear(&mut self) {
        self.cache.clear();
        self.tokens.clear();
    }
}

fn last_row(logits: &Tensor) -> anyhow::Result<Vec<f32>> {
    let rows = logits.dim(0)?;
    Ok(logits.get(rows - 1)?.to_vec1::<f32>()?)
}

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

/// What ends a generation besides end-of-sequence tokens.
#[derive(Debug, Clone, Default)]
pub struct StopConditions {
    pub max_tokens: Option<usize>,
    pub stop_strings: Vec<String>,
    /// Set from another thread (Ctrl-C handler) to stop after the current token.
    pub cancel: Option<Arc<AtomicBool>>,
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

/// What one step produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// New text (may be empty while a character or a possible stop string is incomplete).
    Text(String),
    Finished(FinishReason),
}

/// One answer being generated into a [`Sequence`].
pub struct Generation<'a> {
    model: &'a dyn CausalLm,
    tokenizer: &'a TextTokenizer,
    seq: &'a mut Sequence,
    sampler: Sampler,
    stop: StopConditions,
    next_logits: Vec<f32>,
    decoder: StreamDecoder,
    /// Text decoded but not yet returned because it may begin a stop string.
    held: String,
    prompt_len: usize,
    pub generated: Vec<u32>,
    pub stats: GenerationStats,
    finished: Option<FinishReason>,
}

impl<'a> Generation<'a> {
    /// Feeds `prompt` into `seq` (prefill) and gets ready to generate.
    pub fn start(
        model: &'a dyn CausalLm,
        tokenizer: &'a TextTokenizer,
        seq: &'a mut Sequence,
        prompt: &[u32],
        sampling: SamplingParams,
        stop: StopConditions,
    ) -> anyhow::Result<Self> {
        let t0 = Instant::now();
        let (next_logits, evaluated) = seq.feed_prompt(model, prompt)?;
        let stats = GenerationStats {
            prompt_tokens: prompt.len(),
            prompt_eval_count: evaluated,
            prompt_eval_duration: t0.elapsed(),
            ..Default::default()
        };
        Ok(Self {
            model,
            tokenizer,
            prompt_len: seq.tokens.len(),
            seq,
            sampler: Sampler::new(sampling),
            stop,
            next_logits,
            decoder: StreamDecoder::default(),
            held: String::new(),
            generated: Vec::new(),
            stats,
            finished: None,
        })
    }

    /// Generates one token; returns its text, or why generation is over (after which it keeps
    /// returning the same reason).
    pub fn step(&mut self) -> anyhow::Result<Step> {
        if let Some(reason) = self.finished {
            return Ok(Step::Finished(reason));
        }
        if let Some(reason) = self.check_limits() {
            return self.finish(reason);
        }
        let t0 = Instant::now();
        let token = self.sampler.sample(
            &self.next_logits,
            &self.seq.tokens[self.prompt_len.min(self.seq.tokens.len())..],
        );
        if self.tokenizer.is_eos(token) {
            self.stats.eval_duration += t0.elapsed();
            return self.finish(FinishReason::Stop);
        }
        self.generated.push(token);
        let piece = self.decoder.push(self.tokenizer, token)?;
        // Logits for the next token are computed now so the token's cost is counted here.
        if self.seq.tokens.len() + 1 < self.seq.max_tokens {
            self.next_logits = self.seq.advance(self.model, token)?;
        } else {
            self.seq.tokens.push(token);
        }
        self.stats.eval_count += 1;
        self.stats.eval_duration += t0.elapsed();
        self.held.push_str(&piece);
        match self.take_text() {
            Some((text, true)) => {
                self.finished = Some(FinishReason::StopString);
                Ok(Step::Text(text))
            }
            Some((text, false)) => Ok(Step::Text(text)),
            None => Ok(Step::Text(String::new())),
        }
    }

    fn check_limits(&self) -> Option<FinishReason> {
        if self
            .stop
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
        {
            return Some(FinishReason::Cancelled);
        }
        if self
            .stop
            .max_tokens
            .is_some_and(|m| self.generated.len() >= m)
        {
            return Some(FinishReason::Length);
        }
        if self.seq.tokens.len() + 1 >= self.seq.max_tokens {
            return Some(FinishReason::ContextFull);
        }
        None
    }

    /// Splits off the text that can be shown: everything before a stop string (then `true`), or
    /// everything except a tail that could still grow into one.
    fn take_text(&mut self) -> Option<(String, bool)> {
        if self.held.is_empty() {
            return None;
        }
        if let Some(pos) = self
            .stop
            .stop_strings
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let text = self.held[..pos].to_string();
            self.held.clear();
            return Some((text, true));
        }
        let keep = self
            .stop
            .stop_strings
            .iter()
            .map(|s| longest_suffix_prefix(&self.held, s))
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let text = self.held[..cut].to_string();
        self.held.drain(..cut);
        Some((text, false))
    }

    fn finish(&mut self, reason: FinishReason) -> anyhow::Result<Step> {
        self.finished = Some(reason);
        // Text held back (incomplete characters, possible stop-string starts) is released now,
        // still cut at a stop string.
        let tail = self.decoder.flush(self.tokenizer)?;
        self.held.push_str(&tail);
        let rest = match self.take_text() {
            Some((text, true)) => {
                self.finished = Some(FinishReason::StopString);
                text
            }
            Some((text, false)) => text + &std::mem::take(&mut self.held),
            None => String::new(),
        };
        if rest.is_empty() {
            Ok(Step::Finished(self.finished.unwrap_or(reason)))
        } else {
            Ok(Step::Text(rest))
        }
    }

    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finished
    }

    /// Runs to the end, handing each text piece to `on_text`.
    pub fn run(&mut self, mut on_text: impl FnMut(&str)) -> anyhow::Result<FinishReason> {
        loop {
            match self.step()? {
                Step::Text(t) => {
                    if !t.is_empty() {
                        on_text(&t)
                    }
                }
                Step::Finished(reason) => return Ok(reason),
            }
        }
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`.
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    (1..stop.len().min(text.len() + 1))
        .rev()
        .find(|&n| stop.is_char_boundary(n) && text.ends_with(&stop[..n]))
        .unwrap_or(0)
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
}
