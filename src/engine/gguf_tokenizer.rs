//! A `tokenizers` tokenizer built from a GGUF file's `tokenizer.ggml.*` metadata, the way
//! llama.cpp reads it:
//!
//! - `tokenizer.ggml.model = "gpt2"`: byte-level BPE from `tokens` + `merges`, split first by the
//!   regexes llama.cpp uses for the file's `tokenizer.ggml.pre` (each pre-tokenizer has its own);
//! - `"llama"`: a SentencePiece vocabulary (`tokens`, `scores`, `token_type`). llama.cpp merges
//!   adjacent symbols whose concatenation is a token, highest score first, and falls back to
//!   `<0xNN>` byte tokens; that is a BPE whose merge ranks follow the merged token's score, so we
//!   derive those merges once and hand them to the `tokenizers` BPE model (`byte_fallback`), with
//!   `▁` for spaces and the optional space prefix as normalizers.
//!
//! Control (type 3) and user-defined (type 4) tokens are matched whole in the raw text, as
//! llama.cpp's special-token partition does.

use anyhow::{bail, Context};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::prepend::Prepend;
use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::utils::Sequence as NormalizerSequence;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use crate::model::gguf::GgufFile;

/// llama.cpp's token types (`llama_token_type`).
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;

/// The vocabulary arrays of a GGUF file.
pub(super) struct GgufVocab {
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.token_type` (normal when absent).
    pub types: Vec<i32>,
}

fn strings(file: &GgufFile, key: &str) -> anyhow::Result<Vec<String>> {
    file.get(key)
        .with_context(|| format!("{} lacks '{key}'", file.path.display()))?
        .to_vec()?
        .iter()
        .map(|v| Ok(v.to_string()?.clone()))
        .collect()
}

fn numbers(file: &GgufFile, key: &str, len: usize) -> anyhow::Result<Option<Vec<f64>>> {
    let Some(v) = file.get(key) else {
        return Ok(None);
    };
    // Matched by variant: a failed `to_f32` builds an error with a backtrace, per element.
    use candle_core::quantized::gguf_file::Value;
    let values: Vec<f64> = v
        .to_vec()?
        .iter()
        .map(|x| match x {
            Value::F32(v) => Some(*v as f64),
            Value::F64(v) => Some(*v),
            Value::I32(v) => Some(*v as f64),
            Value::U32(v) => Some(*v as f64),
            Value::I8(v) => Some(*v as f64),
            Value::U8(v) => Some(*v as f64),
            Value::I16(v) => Some(*v as f64),
            Value::U16(v) => Some(*v as f64),
            Value::I64(v) => Some(*v as f64),
            Value::U64(v) => Some(*v as f64),
            _ => None,
        })
        .collect::<Option<_>>()
        .with_context(|| format!("{}: '{key}' is not numeric", file.path.display()))?;
    if values.len() != len {
        bail!(
            "{}: '{key}' has {} entries for {len} tokens",
            file.path.display(),
            values.len()
        );
    }
    Ok(Some(values))
}

/// The tokenizer of `file` and its vocabulary.
pub(super) fn build(file: &GgufFile) -> anyhow::Result<(Tokenizer, GgufVocab)> {
    let kind = file.get_str("tokenizer.ggml.model").unwrap_or("");
    let tokens = strings(file, "tokenizer.ggml.tokens")?;
    let types = numbers(file, "tokenizer.ggml.token_type", tokens.len())?
        .map(|t| t.into_iter().map(|v| v as i32).collect())
        .unwrap_or_else(|| vec![1; tokens.len()]);
    let vocab = GgufVocab { tokens, types };
    let mut tokenizer = match kind {
        "gpt2" => byte_level_bpe(file, &vocab)?,
        "llama" => sentencepiece(file, &vocab)?,
        other => bail!(
            "{}: tokenizer type '{other}' is not supported yet (supported: gpt2 byte-level BPE, llama SentencePiece); use the safetensors model with its tokenizer.json",
            file.path.display()
        ),
    };
    let specials: Vec<AddedToken> = vocab
        .types
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == TOKEN_CONTROL || t == TOKEN_USER_DEFINED)
        .map(|(i, &t)| {
            AddedToken::from(vocab.tokens[i].clone(), t == TOKEN_CONTROL).normalized(false)
        })
        .collect();
    tokenizer
        .add_special_tokens(specials)
        .map_err(|e| anyhow::anyhow!("cannot add GGUF special tokens: {e}"))?;
    Ok((tokenizer, vocab))
}

fn vocab_map(vocab: &GgufVocab) -> tokenizers::models::bpe::Vocab {
    vocab
        .tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect()
}

fn byte_level_bpe(file: &GgufFile, vocab: &GgufVocab) -> anyhow::Result<Tokenizer> {
    let merges: Vec<(String, String)> = strings(file, "tokenizer.ggml.merges")?
        .into_iter()
        .filter_map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
        })
        .collect();
    let pre = file.get_str("tokenizer.ggml.pre").unwrap_or("default");
    let split = split_regexes(pre).with_context(|| format!("{}", file.path.display()))?;
    let map = vocab_map(vocab);
    // The `tokenizers` BPE builder panics when a merged pair is longer than every token:
    // check each merge against the vocabulary first.
    for (i, (a, b)) in merges.iter().enumerate() {
        let merged = format!("{a}{b}");
        let missing = [a, b, &merged]
            .into_iter()
            .find(|t| !map.contains_key(*t))
            .cloned();
        if let Some(missing) = missing {
            bail!(
                "{}: merge {i} of 'tokenizer.ggml.merges' ({a:?} + {b:?}) needs the token {missing:?}, which 'tokenizer.ggml.tokens' lacks",
                file.path.display()
            );
        }
    }
    let bpe = crate::guard::catch_panic("building the GGUF tokenizer", || {
        BPE::builder()
            .vocab_and_merges(map, merges)
            .ignore_merges(split.ignore_merges)
            .build()
            .map_err(|e| anyhow::anyhow!("cannot build the BPE tokenizer from GGUF: {e}"))
    })?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(split.pre_tokenizer()?));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    Ok(tokenizer)
}

fn sentencepiece(file: &GgufFile, vocab: &GgufVocab) -> anyhow::Result<Tokenizer> {
    let n = vocab.tokens.len();
    let scores = numbers(file, "tokenizer.ggml.scores", n)?.with_context(|| {
        format!(
            "{} lacks 'tokenizer.ggml.scores' (a SentencePiece vocabulary needs them)",
            file.path.display()
        )
    })?;
    let map = vocab_map(vocab);
    // Every split of a token into two tokens is a merge, ranked by the merged token's score
    // (ties: lower id, then the split's ids — the order of transformers' converter).
    let mut ranked: Vec<(f64, u32, u32, u32)> = Vec::new();
    for (id, t) in vocab.tokens.iter().enumerate() {
        if map.get(t) != Some(&(id as u32)) {
            continue;
        }
        for (at, _) in t.char_indices().skip(1) {
            if let (Some(&a), Some(&b)) = (map.get(&t[..at]), map.get(&t[at..])) {
                ranked.push((scores[id], id as u32, a, b));
            }
        }
    }
    ranked.sort_by(|x, y| {
        y.0.total_cmp(&x.0)
            .then(x.1.cmp(&y.1))
            .then(x.2.cmp(&y.2))
            .then(x.3.cmp(&y.3))
    });
    let merges: Vec<(String, String)> = ranked
        .into_iter()
        .map(|(_, _, a, b)| {
            (
                vocab.tokens[a as usize].clone(),
                vocab.tokens[b as usize].clone(),
            )
        })
        .collect();
    let mut builder = BPE::builder()
        .vocab_and_merges(map, merges)
        .byte_fallback(true);
    if let Some(unk) = file
        .get_usize("tokenizer.ggml.unknown_token_id")
        .and_then(|i| vocab.tokens.get(i))
    {
        builder = builder.unk_token(unk.clone());
    }
    let bpe = crate::guard::catch_panic("building the GGUF tokenizer", || {
        builder
            .build()
            .map_err(|e| anyhow::anyhow!("cannot build the SentencePiece tokenizer from GGUF: {e}"))
    })?;
    // llama.cpp's default for SentencePiece vocabularies is to add the space prefix.
    let add_space_prefix = file
        .get("tokenizer.ggml.add_space_prefix")
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(true);
    let space = Replace::new(" ", "▁").map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let normalizer = if add_space_prefix {
        NormalizerSequence::new(vec![Prepend::new("▁".into()).into(), space.into()]).into()
    } else {
        space.into()
    };
    tokenizer
        .with_normalizer(Some::<tokenizers::NormalizerWrapper>(normalizer))
        .map_err(|e| anyhow::anyhow!("cannot set the SentencePiece normalizer: {e}"))?;
    let unspace = Replace::new("▁", " ").map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut decoders = vec![
        unspace.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if add_space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tokenizer)
}

/// The regexes llama.cpp splits text with before byte-level BPE, for a `tokenizer.ggml.pre` name
/// (llama-vocab.cpp): each applies to the pieces the previous one made, keeping matches and the
/// text between them.
pub(super) struct SplitRegexes {
    regexes: &'static [&'static str],
    /// Words that are whole tokens skip the merges (llama3 and tekken vocabularies).
    ignore_merges: bool,
}

const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT4O: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Every `tokenizer.ggml.pre` name we split like llama.cpp, by regex set.
const PRE_TOKENIZERS: &[(&[&str], &[&str], bool)] = &[
    (
        &[
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "dbrx",
            "smaug-bpe",
        ],
        &[LLAMA3],
        true,
    ),
    (
        &[
            "qwen2",
            "deepseek-r1-qwen",
            "stablelm2",
            "hunyuan",
            "megrez",
        ],
        &[QWEN2],
        false,
    ),
    (
        &[
            "smollm",
            "starcoder",
            "refact",
            "command-r",
            "codeshell",
            "exaone",
            "minerva-7b",
        ],
        &[r"\p{N}", GPT2],
        false,
    ),
    (
        &[
            "gpt2",
            "gpt-2",
            "phi-2",
            "jina-es",
            "jina-de",
            "mpt",
            "olmo",
            "jais",
            "trillion",
            "exaone4",
            "granite-docling",
        ],
        &[GPT2],
        false,
    ),
    (
        &["falcon"],
        &[r"[\p{P}\$\+<=>\^~\|`]+", GPT2, "[0-9][0-9][0-9]"],
        false,
    ),
    (&["tekken"], &[TEKKEN], true),
    (&["gpt-4o", "minimax-m2"], &[GPT4O], false),
    (
        &["default"],
        &[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]"],
        false,
    ),
];

/// The split regexes of `pre`, or an error naming the supported ones.
pub(super) fn split_regexes(pre: &str) -> anyhow::Result<SplitRegexes> {
    for (names, regexes, ignore_merges) in PRE_TOKENIZERS {
        if names.contains(&pre) {
            return Ok(SplitRegexes {
                regexes,
                ignore_merges: *ignore_merges,
            });
        }
    }
    let known: Vec<&str> = PRE_TOKENIZERS
        .iter()
        .flat_map(|(n, _, _)| n.iter().copied())
        .collect();
    bail!(
        "pre-tokenizer '{pre}' (tokenizer.ggml.pre) is not supported yet; supported: {}",
        known.join(", ")
    )
}

impl SplitRegexes {
    /// The regex splits (matches and gaps kept), then GPT-2's byte-to-character mapping.
    fn pre_tokenizer(&self) -> anyhow::Result<PreTokenizerWrapper> {
        let mut steps: Vec<PreTokenizerWrapper> = Vec::new();
        for regex in self.regexes {
            let split = Split::new(
                SplitPattern::Regex((*regex).into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| anyhow::anyhow!("bad pre-tokenizer regex {regex:?}: {e}"))?;
            steps.push(split.into());
        }
        steps.push(ByteLevel::new(false, true, false).into());
        Ok(Sequence::new(steps).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_named_pre_tokenizer_compiles_and_unknown_ones_are_refused() {
        for (names, _, _) in PRE_TOKENIZERS {
            for name in *names {
                split_regexes(name).unwrap().pre_tokenizer().unwrap();
            }
        }
        let err = split_regexes("made-up").err().unwrap().to_string();
        assert!(err.contains("made-up") && err.contains("qwen2"), "{err}");
    }
}
