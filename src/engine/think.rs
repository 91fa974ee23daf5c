//! `<think>…</think>` reasoning, as templates like NVIDIA Nemotron's write it: the chat template
//! opens the assistant turn with `<think>\n` when reasoning is on (the model writes its reasoning,
//! then `</think>`, then the answer) and with `<think></think>` when it is off (the template's
//! `enable_thinking` variable). Both tags are single special tokens in these tokenizers, so the
//! split is made on token ids (their text is hidden when decoding): what comes before `</think>`
//! is reasoning, shown or hidden like gpt-oss's analysis channel, and the rest is the answer.

use super::tokenizer::TextTokenizer;

/// The ids of a model's `<think>` and `</think>` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThinkTags {
    pub open: u32,
    pub close: u32,
}

impl ThinkTags {
    /// The tags of a model whose chat template writes `<think>` and whose tokenizer has both tags
    /// as tokens; `None` for other models.
    pub fn detect(tokenizer: &TextTokenizer, template: Option<&str>) -> Option<Self> {
        if !template.is_some_and(|t| t.contains("<think>")) {
            return None;
        }
        Some(Self {
            open: tokenizer.token_to_id("<think>")?,
            close: tokenizer.token_to_id("</think>")?,
        })
    }

    /// Whether a generation that continues `prompt` starts inside a reasoning block: the last
    /// tag in the prompt is an opening one.
    pub fn open_at_end(&self, prompt: &[u32]) -> bool {
        prompt
            .iter()
            .rev()
            .find(|&&t| t == self.open || t == self.close)
            == Some(&self.open)
    }
}

/// Which side of `</think>` a generated token is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ThinkStep {
    /// The token is text of the reasoning.
    Reasoning,
    /// The token is text of the answer.
    Answer,
    /// The token is a tag: it switched sides and has no text of its own.
    Tag,
}

/// Follows the tags through one generation.
#[derive(Debug, Clone)]
pub(crate) struct ThinkSplitter {
    tags: ThinkTags,
    inside: bool,
    /// The answer has not started yet (its leading newlines after `</think>` are dropped).
    answer_fresh: bool,
}

impl ThinkSplitter {
    /// `inside`: the prompt left a reasoning block open.
    pub(crate) fn new(tags: ThinkTags, inside: bool) -> Self {
        Self {
            tags,
            inside,
            answer_fresh: true,
        }
    }

    pub(crate) fn inside(&self) -> bool {
        self.inside
    }

    /// Classifies `token` and moves across a tag.
    pub(crate) fn step(&mut self, token: u32) -> ThinkStep {
        if token == self.tags.close && self.inside {
            self.inside = false;
            self.answer_fresh = true;
            ThinkStep::Tag
        } else if token == self.tags.open && !self.inside {
            self.inside = true;
            ThinkStep::Tag
        } else if self.inside {
            ThinkStep::Reasoning
        } else {
            ThinkStep::Answer
        }
    }

    /// Answer text as shown: the whitespace that follows `</think>` is not part of it.
    pub(crate) fn answer_text(&mut self, text: String) -> String {
        if !self.answer_fresh {
            return text;
        }
        let trimmed = text.trim_start();
        if trimmed.is_empty() {
            return String::new();
        }
        self.answer_fresh = false;
        trimmed.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TAGS: ThinkTags = ThinkTags { open: 5, close: 6 };

    #[test]
    fn the_last_tag_of_the_prompt_decides() {
        assert!(TAGS.open_at_end(&[3, 9, 5, 10]));
        assert!(!TAGS.open_at_end(&[3, 9, 5, 6]));
        assert!(!TAGS.open_at_end(&[3, 9]));
        assert!(TAGS.open_at_end(&[5, 6, 4, 5]));
    }

    #[test]
    fn tokens_before_the_close_tag_are_reasoning() {
        let mut s = ThinkSplitter::new(TAGS, true);
        let steps: Vec<ThinkStep> = [10, 11, 6, 12, 6].iter().map(|&t| s.step(t)).collect();
        assert_eq!(
            steps,
            [
                ThinkStep::Reasoning,
                ThinkStep::Reasoning,
                ThinkStep::Tag,
                ThinkStep::Answer,
                // A stray close tag outside reasoning is ordinary (hidden) text.
                ThinkStep::Answer
            ]
        );
        assert_eq!(s.answer_text("\n\n".into()), "");
        assert_eq!(s.answer_text("\nHello".into()), "Hello");
        assert_eq!(s.answer_text("\n there".into()), "\n there");
    }

    #[test]
    fn a_model_may_open_reasoning_itself() {
        let mut s = ThinkSplitter::new(TAGS, false);
        assert_eq!(s.step(5), ThinkStep::Tag);
        assert!(s.inside());
        assert_eq!(s.step(10), ThinkStep::Reasoning);
    }
}
