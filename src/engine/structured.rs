//! Grammar-constrained decoding (structured output): a JSON Schema, "any JSON object", a regex or
//! a Lark grammar becomes a per-sequence [`Constraint`] that masks the logits before sampling and
//! advances with every sampled token; its end (an accepting state that cannot continue) ends the
//! generation with finish reason `stop`.
//!
//! The grammar engine is the `llguidance` crate (Earley parser + lexer over a token trie; the
//! same crate mistral.rs and llama.cpp's optional backend use). It needs the bytes of every
//! token; we compute them from our own tokenizer here (byte-level BPE, SentencePiece with byte
//! fallback, GGUF or tokenizer.json alike) instead of using `toktrie_hf_tokenizers`, which is
//! pinned to an older `tokenizers` than ours, or llguidance's `token_bytes_from_tokenizer_json`,
//! which panics on vocabularies it does not expect.

use std::sync::Arc;

use anyhow::bail;
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;

use super::tokenizer::TextTokenizer;

/// What the output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum Grammar {
    /// Any JSON object (OpenAI `json_object`, Ollama `format: "json"`).
    JsonObject,
    /// A JSON Schema (draft 2020-12 keywords; unsupported ones are refused by name).
    JsonSchema(Value),
    /// A regular expression (Rust `regex` syntax) the whole output must match.
    Regex(String),
    /// A grammar in llguidance's Lark syntax (`start: ...`; `%json {schema}` embeds a schema).
    Lark(String),
}

impl Grammar {
    /// The llguidance grammar. JSON is laid out with fixed separators (`", "`, `": "`, no other
    /// whitespace, like Python's `json.dumps`): free whitespace lets small models emit newlines
    /// forever instead of closing the object. A schema's own `x-guidance` options win.
    fn top_level(&self) -> TopLevelGrammar {
        match self {
            Grammar::JsonObject => TopLevelGrammar::from_json_schema(with_layout(
                serde_json::json!({"type": "object"}),
            )),
            Grammar::JsonSchema(schema) => {
                TopLevelGrammar::from_json_schema(with_layout(schema.clone()))
            }
            Grammar::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Grammar::Lark(src) => TopLevelGrammar::from_lark(src.clone()),
        }
    }
}

/// The JSON layout options llguidance reads from a schema's `x-guidance` key.
pub fn json_layout() -> Value {
    serde_json::json!({
        "whitespace_flexible": false,
        "item_separator": ", ",
        "key_separator": ": ",
    })
}

fn with_layout(mut schema: Value) -> Value {
    if let Value::Object(map) = &mut schema {
        map.entry("x-guidance").or_insert_with(json_layout);
    }
    schema
}

/// The token trie of a model's vocabulary, for llguidance. Tokenization of grammar text is
/// greedy over the trie (we never force tokens, so it need not be canonical).
struct VocabEnv {
    trie: TokTrie,
}

impl TokenizerEnv for VocabEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.greedy_tokenize(s)
    }

    fn tokenize_is_canonical(&self) -> bool {
        false
    }
}

/// How a tokenizer's token strings map to bytes (read from its decoder).
#[derive(Debug, Default)]
struct ByteScheme {
    byte_level: bool,
    byte_fallback: bool,
    /// The character that stands for a space (`▁` in SentencePiece vocabularies).
    space: Option<char>,
}

fn scheme_of(decoder: &Value, scheme: &mut ByteScheme) {
    match decoder.get("type").and_then(Value::as_str) {
        Some("ByteLevel") => scheme.byte_level = true,
        Some("ByteFallback") => scheme.byte_fallback = true,
        Some("Metaspace") => {
            scheme.space = decoder
                .get("replacement")
                .and_then(Value::as_str)
                .and_then(|s| s.chars().next())
                .or(Some('▁'))
        }
        Some("Replace") if decoder.get("content").and_then(Value::as_str) == Some(" ") => {
            if let Some(p) = decoder.pointer("/pattern/String").and_then(Value::as_str) {
                let mut chars = p.chars();
                if let (Some(c), None) = (chars.next(), chars.next()) {
                    scheme.space = Some(c);
                }
            }
        }
        Some("Sequence") => {
            for d in decoder
                .get("decoders")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                scheme_of(d, scheme);
            }
        }
        _ => {}
    }
}

/// GPT-2's byte-to-character table, inverted: the byte each printable stand-in character means.
fn byte_level_table() -> std::collections::HashMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut next = 0x100u32;
    (0..=255u8)
        .map(|b| {
            if printable(b) {
                (b as char, b)
            } else {
                let c = char::from_u32(next).expect("valid code point");
                next += 1;
                (c, b)
            }
        })
        .collect()
}

/// `<0x0A>` → 0x0A.
fn byte_token(token: &str) -> Option<u8> {
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok())?
}

/// The bytes every token id stands for (special tokens behind llguidance's 0xFF marker; ids
/// with no token are empty and never allowed).
pub fn token_bytes(tokenizer: &TextTokenizer, vocab: usize) -> anyhow::Result<Vec<Vec<u8>>> {
    let inner = tokenizer.inner();
    let decoder = serde_json::to_value(inner.get_decoder()).unwrap_or(Value::Null);
    let mut scheme = ByteScheme::default();
    scheme_of(&decoder, &mut scheme);
    if !scheme.byte_level && !scheme.byte_fallback && scheme.space.is_none() {
        bail!(
            "structured output needs to know which bytes each token stands for, and this tokenizer's decoder ({}) does not say (supported: byte-level BPE, SentencePiece)",
            decoder.get("type").and_then(Value::as_str).unwrap_or("none")
        );
    }
    let table = byte_level_table();
    let added = inner.get_added_tokens_decoder();
    let n = vocab.max(inner.get_vocab_size(true));
    let mut bytes = vec![Vec::new(); n];
    for (token, id) in inner.get_vocab(true) {
        let Some(slot) = bytes.get_mut(id as usize) else {
            continue;
        };
        if let Some(a) = added.get(&id) {
            let mut b = a.content.as_bytes().to_vec();
            if a.special {
                b.insert(0, TokTrie::SPECIAL_TOKEN_MARKER);
            }
            *slot = b;
            continue;
        }
        *slot = if scheme.byte_level {
            token
                .chars()
                .map(|c| table.get(&c).copied())
                .collect::<Option<Vec<u8>>>()
                // Not a byte-level string: a literal token.
                .unwrap_or_else(|| token.as_bytes().to_vec())
        } else if let Some(b) = byte_token(&token).filter(|_| scheme.byte_fallback) {
            vec![b]
        } else {
            match scheme.space {
                Some(space) => token.replace(space, " ").into_bytes(),
                None => token.into_bytes(),
            }
        };
    }
    Ok(bytes)
}

/// Compiles grammars for one model (the token trie is built once, on first use).
pub struct GrammarCompiler {
    factory: ParserFactory,
    eos: Vec<u32>,
}

impl GrammarCompiler {
    /// The compiler for `tokenizer`'s vocabulary, padded to the model's `vocab` logits.
    pub fn new(tokenizer: &TextTokenizer, vocab: usize) -> anyhow::Result<Self> {
        let words = token_bytes(tokenizer, vocab)?;
        let eos: Vec<u32> = tokenizer
            .eos_ids
            .iter()
            .copied()
            .filter(|&e| (e as usize) < words.len())
            .collect();
        let Some(&first) = eos.first() else {
            bail!("structured output needs an end-of-sequence token, and this model names none");
        };
        let mut info = TokRxInfo::new(words.len() as u32, first);
        info.tok_bos = tokenizer.bos_id;
        let trie = crate::guard::catch_panic("building the token trie", || {
            Ok(TokTrie::from(&info, &words).with_eos_tokens(&eos))
        })?;
        let env: llguidance::toktrie::TokEnv = Arc::new(VocabEnv { trie });
        let mut factory = ParserFactory::new_simple(&env)?;
        factory.quiet();
        Ok(Self { factory, eos })
    }

    /// A fresh constraint for `grammar`. Errors name what is wrong or unsupported (llguidance's
    /// warnings — e.g. a schema feature it approximates — are errors here, never dropped).
    pub fn compile(&self, grammar: &Grammar) -> anyhow::Result<Constraint> {
        let parser = self
            .factory
            .create_parser(grammar.top_level())
            .map_err(|e| anyhow::anyhow!("{}", clean_error(&e.to_string())))?;
        let mut matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            bail!("{}", clean_error(&e));
        }
        let warnings = matcher.grammar_warnings();
        if !warnings.is_empty() {
            bail!("unsupported: {}", warnings.join("; "));
        }
        Ok(Constraint {
            matcher,
            eos: self.eos.clone(),
        })
    }
}

/// llguidance's messages carry a long parser dump after the first line in some cases; keep the
/// part a user can act on.
fn clean_error(e: &str) -> String {
    e.lines().next().unwrap_or(e).trim().to_string()
}

/// One sequence's grammar state.
#[derive(Clone)]
pub struct Constraint {
    matcher: Matcher,
    eos: Vec<u32>,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("stopped", &self.matcher.is_stopped())
            .finish()
    }
}

impl Constraint {
    /// Whether `token` may come next (cheap: no mask is computed).
    pub fn allows(&mut self, token: u32) -> anyhow::Result<bool> {
        Ok(self.matcher.validate_tokens(&[token])? == 1)
    }

    /// The tokens that may come next.
    pub fn mask(&mut self) -> anyhow::Result<SimpleVob> {
        self.matcher.compute_mask()
    }

    /// Sets the logits of tokens `mask` forbids to -inf; returns how many stay allowed.
    pub fn apply(mask: &SimpleVob, logits: &mut [f32]) -> usize {
        let mut allowed = 0;
        for (i, l) in logits.iter_mut().enumerate() {
            if i < mask.len() && mask.is_allowed(i as u32) {
                allowed += 1;
            } else {
                *l = f32::NEG_INFINITY;
            }
        }
        allowed
    }

    /// Advances past `token` (which [`Self::allows`] or the mask admitted).
    pub fn commit(&mut self, token: u32) -> anyhow::Result<()> {
        self.matcher.consume_token(token)
    }

    /// The grammar is complete and nothing may follow: generation ends here.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }

    /// Whether `token` is one of the end-of-sequence tokens the constraint knows.
    pub fn is_eos(&self, token: u32) -> bool {
        self.eos.contains(&token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_table_maps_space_and_newline_like_gpt2() {
        let t = byte_level_table();
        assert_eq!(t[&'Ġ'], b' ');
        assert_eq!(t[&'Ċ'], b'\n');
        assert_eq!(t[&'a'], b'a');
        assert_eq!(t.len(), 256);
    }

    #[test]
    fn byte_tokens_parse() {
        assert_eq!(byte_token("<0x0A>"), Some(10));
        assert_eq!(byte_token("<0x0>"), None);
        assert_eq!(byte_token("<s>"), None);
    }
}
