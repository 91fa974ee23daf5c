//! Parsing what the user typed into a typed model reference, before anything touches the disk or
//! the network, so that a bad name or quantization token fails fast and writes nothing.

use std::path::{Path, PathBuf};

use crate::quant::{QuantError, QuantToken};

/// A model named on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRef {
    /// `org/name[:token]` (or a bare `name`), a Hub repository.
    Hub {
        repo: String,
        token: Option<QuantToken>,
    },
    /// A directory holding config.json and safetensors, optionally with `:token`.
    LocalDir {
        path: PathBuf,
        token: Option<QuantToken>,
    },
    /// A single .gguf file, optionally with `:token`.
    LocalGguf {
        path: PathBuf,
        token: Option<QuantToken>,
    },
}

impl ModelRef {
    /// Parses a reference. Local paths win over Hub names when they exist on disk (a directory
    /// with config.json, or a file ending in `.gguf`). A malformed `:token` is
    /// [`QuantError::Invalid`].
    pub fn parse(text: &str) -> anyhow::Result<ModelRef> {
        if let Some(local) = local_ref(Path::new(text), None) {
            return Ok(local);
        }
        let (base, token) = split_hub_name(text)?;
        if token.is_some() {
            if let Some(local) = local_ref(Path::new(base), token.clone()) {
                return Ok(local);
            }
        }
        if looks_like_path(base) {
            anyhow::bail!(
                "'{base}' is not a model: a local model is a directory containing config.json or a .gguf file"
            );
        }
        validate_repo_id(base)?;
        Ok(ModelRef::Hub {
            repo: base.to_string(),
            token,
        })
    }

    /// Parses `text` as a Hub name (`org/name[:token]`) only, never looking at the disk: what
    /// the HTTP server accepts from clients, so that no request can make it open a path.
    pub fn parse_hub(text: &str) -> anyhow::Result<ModelRef> {
        let (base, token) = split_hub_name(text)?;
        validate_repo_id(base)?;
        Ok(ModelRef::Hub {
            repo: base.to_string(),
            token,
        })
    }

    pub fn token(&self) -> Option<&QuantToken> {
        match self {
            ModelRef::Hub { token, .. }
            | ModelRef::LocalDir { token, .. }
            | ModelRef::LocalGguf { token, .. } => token.as_ref(),
        }
    }
}

impl std::fmt::Display for ModelRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (base, token) = match self {
            ModelRef::Hub { repo, token } => (repo.clone(), token),
            ModelRef::LocalDir { path, token } | ModelRef::LocalGguf { path, token } => {
                (path.display().to_string(), token)
            }
        };
        match token {
            Some(t) => write!(f, "{base}:{t}"),
            None => f.write_str(&base),
        }
    }
}

/// Strips the prefixes of names copied from the Hub's web page or Ollama's `hf.co/` form and
/// splits off the `:token`.
fn split_hub_name(text: &str) -> anyhow::Result<(&str, Option<QuantToken>)> {
    let text = [
        "https://huggingface.co/",
        "http://huggingface.co/",
        "huggingface.co/",
        "hf.co/",
    ]
    .iter()
    .find_map(|p| text.strip_prefix(p))
    .unwrap_or(text);
    Ok(match text.rsplit_once(':') {
        Some((base, raw)) => (base, Some(QuantToken::parse(raw)?)),
        None => (text, None),
    })
}

fn local_ref(path: &Path, token: Option<QuantToken>) -> Option<ModelRef> {
    if path.is_dir() && path.join("config.json").is_file() {
        return Some(ModelRef::LocalDir {
            path: path.to_path_buf(),
            token,
        });
    }
    let is_gguf = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    if is_gguf && path.is_file() {
        return Some(ModelRef::LocalGguf {
            path: path.to_path_buf(),
            token,
        });
    }
    None
}

fn looks_like_path(text: &str) -> bool {
    text.starts_with('.')
        || text.starts_with('/')
        || text.starts_with('~')
        || text.contains('\\')
        || text.to_ascii_lowercase().ends_with(".gguf")
        || Path::new(text).exists()
}

/// Checks a Hub repository id: `name` or `org/name`, each part made of letters, digits, `-`, `_`
/// and `.`, no `--` or `..`, not starting or ending with `-` or `.`, at most 96 characters.
pub fn validate_repo_id(id: &str) -> anyhow::Result<()> {
    let bad = |why: &str| {
        anyhow::anyhow!(
            "invalid model name '{id}': {why}; expected `org/name` (optionally `:quantization`), a directory with config.json, or a .gguf file"
        )
    };
    if id.is_empty() {
        return Err(bad("the name is empty"));
    }
    let parts: Vec<&str> = id.split('/').collect();
    if parts.len() > 2 {
        return Err(bad("too many '/'"));
    }
    for part in &parts {
        if part.is_empty() || part.len() > 96 {
            return Err(bad("each part must have 1 to 96 characters"));
        }
        if !part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(bad("only letters, digits, '-', '_' and '.' are allowed"));
        }
        if part.contains("--") || part.contains("..") {
            return Err(bad("'--' and '..' are not allowed"));
        }
        if part.starts_with(['-', '.']) || part.ends_with(['-', '.']) {
            return Err(bad("a part cannot start or end with '-' or '.'"));
        }
    }
    Ok(())
}

/// True when the error (or its cause chain) is a quantization error.
pub fn is_quant_error(err: &anyhow::Error) -> bool {
    err.chain()
        .any(|c| c.downcast_ref::<QuantError>().is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::KvProfile;

    #[test]
    fn parses_hub_names_with_and_without_token() {
        assert_eq!(
            ModelRef::parse("openai/gpt-oss-20b").unwrap(),
            ModelRef::Hub {
                repo: "openai/gpt-oss-20b".into(),
                token: None
            }
        );
        assert_eq!(
            ModelRef::parse("openai/gpt-oss-20b:kv_fp8").unwrap(),
            ModelRef::Hub {
                repo: "openai/gpt-oss-20b".into(),
                token: Some(QuantToken::Kv(KvProfile::KvFp8))
            }
        );
        assert_eq!(
            ModelRef::parse("HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:q4_k_m").unwrap(),
            ModelRef::Hub {
                repo: "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF".into(),
                token: Some(QuantToken::Gguf("Q4_K_M".into()))
            }
        );
        assert!(matches!(
            ModelRef::parse("gpt2").unwrap(),
            ModelRef::Hub { .. }
        ));
    }

    #[test]
    fn malformed_tokens_are_invalid_quantization() {
        for bad in [
            "org/model:",
            "org/model:kv_int9",
            "org/model:q4km!",
            "org/model:a:b",
        ] {
            let err = ModelRef::parse(bad).unwrap_err();
            assert!(is_quant_error(&err), "{bad}: {err}");
            assert!(err.to_string().contains("invalid quantization"), "{err}");
        }
    }

    #[test]
    fn malformed_names_are_rejected_clearly() {
        for bad in [
            "",
            "a/b/c",
            "org/",
            "/name",
            "org/na me",
            "org/-x",
            "org/a--b",
            "org/a..b",
        ] {
            let err = ModelRef::parse(bad).unwrap_err();
            assert!(!is_quant_error(&err), "{bad}");
            let text = err.to_string();
            assert!(
                text.contains("invalid model name") || text.contains("is not a model"),
                "{bad}: {text}"
            );
        }
    }

    #[test]
    fn local_directory_and_gguf_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        let gguf = dir.path().join("m.gguf");
        std::fs::write(&gguf, b"GGUF").unwrap();
        let d = dir.path().to_str().unwrap();
        assert!(matches!(
            ModelRef::parse(d).unwrap(),
            ModelRef::LocalDir { token: None, .. }
        ));
        assert!(matches!(
            ModelRef::parse(&format!("{d}:kv_int8")).unwrap(),
            ModelRef::LocalDir {
                token: Some(QuantToken::Kv(KvProfile::KvInt8)),
                ..
            }
        ));
        assert!(matches!(
            ModelRef::parse(gguf.to_str().unwrap()).unwrap(),
            ModelRef::LocalGguf { .. }
        ));
        let missing = dir.path().join("nope.gguf");
        let err = ModelRef::parse(missing.to_str().unwrap()).unwrap_err();
        assert!(err.to_string().contains("is not a model"), "{err}");
    }
}
