//! Tokenizer from a model folder (`tokenizer.json` + `tokenizer_config.json`) or built from GGUF
//! metadata (`tokenizer.ggml.*`: byte-level BPE or SentencePiece, see `gguf_tokenizer`), with the
//! special tokens and chat template the engine needs, and a streaming decoder that never emits
//! half a UTF-8 character.

use std::path::Path;
use std::str::FromStr;

use anyhow::{bail, Context};
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::model::gguf::GgufFile;

/// A tokenizer plus what generation needs from the model's tokenizer config.
pub struct TextTokenizer {
    inner: Tokenizer,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub bos_id: Option<u32>,
    /// Every token id that ends generation.
    pub eos_ids: Vec<u32>,
    /// Prepend BOS to raw prompts ourselves (GGUF `add_bos_token`; tokenizer.json models do it
    /// through their own post-processor).
    add_bos: bool,
    pub chat_template: Option<String>,
    /// Worst-case bytes the normalizer makes of one input byte (see `tokenizer_checks`).
    growth: f64,
    /// The model's vocabulary: ids at or past it are refused by `encode`.
    model_vocab: Option<usize>,
}

fn json_file(path: &Path) -> anyhow::Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(Some(serde_json::from_str(&text).with_context(|| {
        format!("{} is not valid JSON", path.display())
    })?))
}

/// `"<s>"` or `{"content": "<s>", ...}` in tokenizer_config.json.
fn token_text(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl TextTokenizer {
    /// Loads from a model folder. `extra_eos` adds ids from config.json/generation_config.json.
    pub fn from_dir(dir: &Path, extra_eos: &[u32]) -> anyhow::Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            bail!("{} has no tokenizer.json", dir.display());
        }
        let text = crate::model::files::read_text(&path, crate::model::files::MAX_TEXT_FILE)?;
        let config = json_file(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
        let template_file = dir.join("chat_template.jinja");
        let template_file = match template_file.exists() {
            true => Some(crate::model::files::read_text(
                &template_file,
                crate::model::files::MAX_TEXT_FILE,
            )?),
            false => None,
        };
        Self::from_parts(&path, &text, &config, template_file, extra_eos)
    }

    /// Builds from the contents of tokenizer.json (`text`, read from `path`),
    /// tokenizer_config.json and chat_template.jinja (which wins over the config's template).
    pub fn from_parts(
        path: &Path,
        text: &str,
        config: &Value,
        template_file: Option<String>,
        extra_eos: &[u32],
    ) -> anyhow::Result<Self> {
        let json: Value = serde_json::from_str(text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        super::tokenizer_checks::check_tokenizer_json(&json)
            .with_context(|| format!("{} is malformed", path.display()))?;
        let growth = json
            .get("normalizer")
            .filter(|n| !n.is_null())
            .map_or(1.0, super::tokenizer_checks::normalizer_growth);
        // Last resort: the checks above cover the malformations known to panic inside the
        // `tokenizers` crate, not every one it may have.
        let mut inner = crate::guard::catch_panic("loading the tokenizer", || {
            Tokenizer::from_str(text)
                .map_err(|e| anyhow::anyhow!("cannot load {}: {e}", path.display()))
        })?;
        // Generation wants every prompt token: truncation would cut prompts silently (and a
        // `stride` ≥ `max_length` makes the crate panic), padding would add tokens.
        inner
            .with_truncation(None)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        inner.with_padding(None);
        let bos_token = token_text(config.get("bos_token"));
        let eos_token = token_text(config.get("eos_token"));
        let chat_template = match template_file {
            Some(t) => Some(t),
            None => match config.get("chat_template") {
                Some(Value::String(t)) => Some(t.clone()),
                // A list of named templates: take "default".
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .or(list.first())
                    .and_then(|t| t.get("template"))
                    .and_then(Value::as_str)
                    .map(str::to_string),
                _ => None,
            },
        };
        let mut eos_ids: Vec<u32> = extra_eos.to_vec();
        if let Some(id) = eos_token.as_deref().and_then(|t| inner.token_to_id(t)) {
            eos_ids.push(id);
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();
        Ok(Self {
            bos_id: bos_token.as_deref().and_then(|t| inner.token_to_id(t)),
            inner,
            bos_token,
            eos_token,
            eos_ids,
            add_bos: false,
            chat_template,
            growth,
            model_vocab: None,
        })
    }

    /// Builds the tokenizer a GGUF file describes (`engine::gguf_tokenizer`).
    pub fn from_gguf(file: &GgufFile) -> anyhow::Result<Self> {
        let (inner, vocab) = super::gguf_tokenizer::build(file)?;
        let tokens = &vocab.tokens;
        let id = |key: &str| file.get_usize(key).and_then(|v| u32::try_from(v).ok());
        let bos_id = id("tokenizer.ggml.bos_token_id");
        let eos_id = id("tokenizer.ggml.eos_token_id");
        let mut eos_ids: Vec<u32> = eos_id.into_iter().collect();
        eos_ids.extend(id("tokenizer.ggml.eot_token_id"));
        eos_ids.extend(id("tokenizer.ggml.eom_token_id"));
        // End-of-turn tokens llama.cpp also stops at (its end-of-generation heuristics) when the
        // file names none: Gemma's `<end_of_turn>` is not its `eos_token_id`.
        for text in ["<end_of_turn>", "<|eot_id|>", "<|im_end|>", "<|end|>"] {
            if let Some(i) = inner.token_to_id(text) {
                if vocab.types.get(i as usize) == Some(&3) {
                    eos_ids.push(i);
                }
            }
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();
        let name = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize).cloned());
        Ok(Self {
            bos_token: name(bos_id),
            eos_token: name(eos_id),
            bos_id,
            eos_ids,
            // llama.cpp's default: SentencePiece vocabularies add BOS, BPE ones do not.
            add_bos: file
                .get("tokenizer.ggml.add_bos_token")
                .and_then(|v| v.to_bool().ok())
                .unwrap_or(file.get_str("tokenizer.ggml.model") == Some("llama")),
            chat_template: file.get_str("tokenizer.chat_template").map(str::to_string),
            inner,
            growth: 1.0,
            model_vocab: None,
        })
    }

    /// Makes `encode` refuse token ids the model has no embedding for (a tokenizer with more
    /// tokens than the model's vocabulary).
    pub fn limit_to_vocab(&mut self, vocab: usize) {
        self.model_vocab = Some(vocab);
    }

    /// Refuses texts whose tokenization would be unbounded: longer than
    /// [`super::tokenizer_checks::MAX_ENCODE_BYTES`], or growing through the normalizer past
    /// [`super::tokenizer_checks::normalized_limit`] (measured piece by piece when the worst
    /// case says it might).
    fn check_text_size(&self, text: &str) -> anyhow::Result<()> {
        use super::tokenizer_checks::{normalized_limit, MAX_ENCODE_BYTES};
        use tokenizers::{NormalizedString, Normalizer};
        if text.len() > MAX_ENCODE_BYTES {
            bail!(
                "the text is {} bytes; at most {MAX_ENCODE_BYTES} are tokenized at once",
                text.len()
            );
        }
        let limit = normalized_limit(text.len());
        let Some(normalizer) = self.inner.get_normalizer() else {
            return Ok(());
        };
        if (text.len() as f64) * self.growth <= limit as f64 {
            return Ok(());
        }
        // Pieces small enough that even the worst case of one stays small.
        let piece = ((1usize << 20) as f64 / self.growth).max(1.0) as usize;
        let mut total = 0usize;
        let mut start = 0;
        while start < text.len() {
            let mut end = (start + piece).min(text.len());
            while !text.is_char_boundary(end) {
                end += 1;
            }
            let mut normalized = NormalizedString::from(&text[start..end]);
            crate::guard::catch_panic("normalizing the text", || {
                normalizer
                    .normalize(&mut normalized)
                    .map_err(|e| anyhow::anyhow!("normalization failed: {e}"))
            })?;
            total += normalized.get().len();
            if total > limit {
                bail!(
                    "the tokenizer's normalizer grows this {}-byte text past {limit} bytes; refusing to tokenize it",
                    text.len()
                );
            }
            start = end;
        }
        Ok(())
    }

    /// Tokens of `text`. `add_special` adds what the model adds to a raw prompt (BOS); rendered
    /// chat templates already contain it.
    pub fn encode(&self, text: &str, add_special: bool) -> anyhow::Result<Vec<u32>> {
        self.check_text_size(text)?;
        // Last resort against panics inside `tokenizers` on malformed tokenizer data.
        let enc = crate::guard::catch_panic("tokenization", || {
            self.inner
                .encode(text, add_special)
                .map_err(|e| anyhow::anyhow!("tokenization failed: {e}"))
        })?;
        let mut ids = enc.get_ids().to_vec();
        if add_special && self.add_bos {
            if let Some(bos) = self.bos_id {
                if ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                }
            }
        }
        if let Some(vocab) = self.model_vocab {
            if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
                bail!(
                    "the tokenizer produced token id {bad} ({:?}), but the model's vocabulary has {vocab} entries: the tokenizer does not match the model",
                    self.inner.id_to_token(bad).unwrap_or_default()
                );
            }
        }
        Ok(ids)
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> anyhow::Result<String> {
        crate::guard::catch_panic("detokenization", || {
            self.inner
                .decode(ids, true)
                .map_err(|e| anyhow::anyhow!("detokenization failed: {e}"))
        })
    }

    /// Writes the tokenizer as a tokenizer.json (e.g. when converting a GGUF to a folder).
    pub fn save_json(&self, path: &Path) -> anyhow::Result<()> {
        self.inner
            .save(path, false)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))
    }

    /// The text one token stands for, special tokens included (`xllm tokenize`).
    pub fn piece(&self, id: u32) -> anyhow::Result<String> {
        self.inner
            .decode(&[id], false)
            .map_err(|e| anyhow::anyhow!("detokenization failed: {e}"))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The `tokenizers` tokenizer (structured output reads its vocabulary and decoder).
    pub(crate) fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_ids.contains(&id)
    }
}

/// Turns a growing list of token ids into text pieces, holding back incomplete characters.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    /// Start of the window re-decoded each step (keeps the cost per token constant).
    prefix: usize,
    /// Tokens whose text has been emitted.
    read: usize,
}

impl StreamDecoder {
    /// Adds a token and returns the new text it completes (maybe empty).
    pub fn push(&mut self, tokenizer: &TextTokenizer, id: u32) -> anyhow::Result<String> {
        self.ids.push(id);
        let before = tokenizer.decode(&self.ids[self.prefix..self.read])?;
        let now = tokenizer.decode(&self.ids[self.prefix..])?;
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') && now.starts_with(&before) {
            let piece = now[before.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(piece)
        } else {
            Ok(String::new())
        }
    }

    /// Whatever is still held back (at the end of generation).
    pub fn flush(&mut self, tokenizer: &TextTokenizer) -> anyhow::Result<String> {
        let before = tokenizer.decode(&self.ids[self.prefix..self.read])?;
        let now = tokenizer.decode(&self.ids[self.prefix..])?;
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        Ok(now.get(before.len()..).unwrap_or("").to_string())
    }
}
