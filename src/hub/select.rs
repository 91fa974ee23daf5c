//! Which files of a repository a pull fetches: only what running needs. Safetensors repos give
//! their config, tokenizer, chat template and top-level weights (never `original/`, `metal/` or
//! other formats); GGUF repos give the one file (or split set) the tag names.

use crate::quant::{gguf_type_in_file_name, QuantError, QuantToken};
use crate::store::ModelFormat;

use super::client::Sibling;

/// Small files a safetensors model needs besides its weights.
pub const SUPPORT_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    // sentence-transformers folders (embedding models): module list, input limit, prompts.
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "vocab.txt",
];

/// A sentence-transformers module config the embedding engine reads: `1_Pooling/config.json`
/// (any `N_Pooling`) and the config of a Normalize module, if the repo ships one.
fn is_module_config(path: &str) -> bool {
    let Some((dir, file)) = path.split_once('/') else {
        return false;
    };
    let Some((index, kind)) = dir.split_once('_') else {
        return false;
    };
    file == "config.json"
        && !index.is_empty()
        && index.bytes().all(|b| b.is_ascii_digit())
        && matches!(kind, "Pooling" | "Normalize")
}

pub const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";

/// The default GGUF tag when the user names none.
pub const DEFAULT_GGUF_TYPE: &str = "Q4_K_M";

/// A file to fetch, with what the Hub told us to verify it against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoFile {
    pub path: String,
    pub size: Option<u64>,
    /// sha256 of LFS files.
    pub sha256: Option<String>,
    pub blob_id: Option<String>,
}

impl From<&Sibling> for RepoFile {
    fn from(s: &Sibling) -> RepoFile {
        RepoFile {
            path: s.rfilename.clone(),
            size: s.lfs.as_ref().and_then(|l| l.size).or(s.size),
            sha256: s
                .lfs
                .as_ref()
                .and_then(|l| l.sha256.clone())
                .map(|h| h.to_ascii_lowercase()),
            blob_id: s.blob_id.clone(),
        }
    }
}

/// The files chosen for a pull.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    pub format: ModelFormat,
    pub files: Vec<RepoFile>,
    /// GGUF: the weight type and the file to load (first part of a split set).
    pub gguf: Option<(String, String)>,
}

/// A path from the server is safe when it stays inside the model folder: relative, `/`-separated,
/// no `.`/`..`/empty components, no backslashes or drive letters.
pub fn is_safe_relative_path(path: &str) -> bool {
    !path.is_empty()
        && !path.starts_with('/')
        && !path.contains('\\')
        && !path.contains(':')
        && !path.contains('\0')
        && path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

/// Chooses files for `repo` given its listing and the optional `:token`.
pub fn select_files(
    repo: &str,
    siblings: &[Sibling],
    token: Option<&QuantToken>,
) -> anyhow::Result<Selection> {
    if let Some(bad) = siblings
        .iter()
        .find(|s| !is_safe_relative_path(&s.rfilename))
    {
        anyhow::bail!(
            "refusing to pull '{repo}': the server listed a file name that would escape the model folder: {:?}",
            bad.rfilename
        );
    }
    let top_level = |s: &&Sibling| !s.rfilename.contains('/');
    let has_config = siblings.iter().any(|s| s.rfilename == "config.json");
    let weights: Vec<&Sibling> = siblings
        .iter()
        .filter(top_level)
        .filter(|s| s.rfilename.ends_with(".safetensors"))
        .collect();
    let is_safetensors = has_config && !weights.is_empty();
    let ggufs: Vec<&Sibling> = siblings
        .iter()
        .filter(|s| s.rfilename.to_ascii_lowercase().ends_with(".gguf"))
        .filter(|s| {
            let base = s.rfilename.rsplit('/').next().unwrap_or_default();
            !base.to_ascii_lowercase().starts_with("mmproj")
        })
        .collect();
    let gguf_types = available_gguf_types(&ggufs);
    let unsupported =
        |t: &QuantToken, reason: String, alternatives: String| QuantError::Unsupported {
            token: t.to_string(),
            subject: format!("'{repo}'"),
            reason,
            alternatives,
        };
    let kv_alternatives = "available: kv_int8, kv_fp8 (or no suffix)".to_string();
    let gguf_alternatives = || {
        if gguf_types.is_empty() {
            "it ships no GGUF files".to_string()
        } else {
            format!("available: {}", gguf_types.join(", "))
        }
    };

    match token {
        Some(t @ QuantToken::Kv(_)) if !is_safetensors => {
            if ggufs.is_empty() {
                anyhow::bail!("'{repo}' has no config.json + safetensors weights or GGUF files that xllm can run");
            }
            Err(unsupported(
                t,
                "KV-cache profiles apply to safetensors models, and this repository ships GGUF"
                    .into(),
                gguf_alternatives(),
            )
            .into())
        }
        Some(t @ QuantToken::Gguf(name)) => {
            if ggufs.is_empty() {
                return Err(unsupported(
                    t,
                    "GGUF types select a file of a GGUF repository, and this one ships safetensors"
                        .into(),
                    if is_safetensors {
                        kv_alternatives
                    } else {
                        gguf_alternatives()
                    },
                )
                .into());
            }
            pick_gguf(&ggufs, name).ok_or_else(|| {
                unsupported(
                    t,
                    format!("the repository does not ship a {name} file"),
                    gguf_alternatives(),
                )
                .into()
            })
        }
        Some(QuantToken::Kv(_)) | None if is_safetensors => {
            Ok(safetensors_selection(siblings, &weights))
        }
        None if !ggufs.is_empty() => {
            if let Some(sel) = pick_gguf(&ggufs, DEFAULT_GGUF_TYPE) {
                return Ok(sel);
            }
            if ggufs.len() == 1 && gguf_types.is_empty() {
                let only = RepoFile::from(ggufs[0]);
                return Ok(Selection {
                    format: ModelFormat::Gguf,
                    gguf: Some(("unknown".into(), only.path.clone())),
                    files: vec![only],
                });
            }
            anyhow::bail!(
                "'{repo}' has no {DEFAULT_GGUF_TYPE} GGUF file (the default); pick one with a tag, e.g. `xllm pull {repo}:{}` (available: {})",
                gguf_types.first().map(String::as_str).unwrap_or("Q8_0"),
                gguf_types.join(", ")
            )
        }
        _ => anyhow::bail!(
            "'{repo}' has no config.json + safetensors weights or GGUF files that xllm can run"
        ),
    }
}

fn safetensors_selection(siblings: &[Sibling], weights: &[&Sibling]) -> Selection {
    let mut files: Vec<RepoFile> = siblings
        .iter()
        .filter(|s| {
            SUPPORT_FILES.contains(&s.rfilename.as_str())
                || s.rfilename == SAFETENSORS_INDEX
                || is_module_config(&s.rfilename)
        })
        .map(RepoFile::from)
        .collect();
    // Mistral-style repos ship `consolidated.safetensors` beside the transformers shards: skip it
    // when other weights exist.
    let has_transformers_shards = weights
        .iter()
        .any(|w| !w.rfilename.starts_with("consolidated"));
    files.extend(
        weights
            .iter()
            .filter(|w| !(has_transformers_shards && w.rfilename.starts_with("consolidated")))
            .map(|w| RepoFile::from(*w)),
    );
    Selection {
        format: ModelFormat::Safetensors,
        files,
        gguf: None,
    }
}

/// GGUF types found in the file names, sorted and without duplicates.
pub fn available_gguf_types(ggufs: &[&Sibling]) -> Vec<String> {
    let found: std::collections::BTreeSet<&str> = ggufs
        .iter()
        .filter_map(|s| gguf_type_in_file_name(&s.rfilename))
        .collect();
    found.into_iter().map(str::to_string).collect()
}

fn pick_gguf(ggufs: &[&Sibling], ty: &str) -> Option<Selection> {
    let mut files: Vec<RepoFile> = ggufs
        .iter()
        .filter(|s| gguf_type_in_file_name(&s.rfilename) == Some(ty))
        .map(|s| RepoFile::from(*s))
        .collect();
    if files.is_empty() {
        return None;
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    // Several matches that are not one split set (`-00001-of-00003`): take the shortest name,
    // which is the plain file rather than a variant.
    let split = files.iter().all(|f| f.path.contains("-of-"));
    if !split {
        files.sort_by_key(|f| (f.path.len(), f.path.clone()));
        files.truncate(1);
    }
    let main = files[0].path.clone();
    Some(Selection {
        format: ModelFormat::Gguf,
        files,
        gguf: Some((ty.to_string(), main)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::KvProfile;

    fn sib(name: &str) -> Sibling {
        Sibling {
            rfilename: name.into(),
            size: Some(10),
            blob_id: None,
            lfs: None,
        }
    }

    fn names(sel: &Selection) -> Vec<&str> {
        sel.files.iter().map(|f| f.path.as_str()).collect()
    }

    #[test]
    fn gpt_oss_layout_skips_original_and_metal() {
        let s: Vec<Sibling> = [
            "config.json",
            "generation_config.json",
            "chat_template.jinja",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "model.safetensors.index.json",
            "model-00000-of-00002.safetensors",
            "model-00001-of-00002.safetensors",
            "README.md",
            "original/model.safetensors",
            "original/config.json",
            "metal/model.bin",
            ".gitattributes",
        ]
        .iter()
        .map(|n| sib(n))
        .collect();
        let sel = select_files("openai/gpt-oss-20b", &s, None).unwrap();
        assert_eq!(sel.format, ModelFormat::Safetensors);
        assert_eq!(
            names(&sel),
            vec![
                "config.json",
                "generation_config.json",
                "chat_template.jinja",
                "tokenizer.json",
                "tokenizer_config.json",
                "special_tokens_map.json",
                "model.safetensors.index.json",
                "model-00000-of-00002.safetensors",
                "model-00001-of-00002.safetensors",
            ]
        );
        let kv = select_files("o/m", &s, Some(&QuantToken::Kv(KvProfile::KvFp8))).unwrap();
        assert_eq!(kv, sel);
        let err = select_files("o/m", &s, Some(&QuantToken::Gguf("Q4_K_M".into()))).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("unsupported quantization 'Q4_K_M'") && text.contains("kv_int8"),
            "{text}"
        );
    }

    #[test]
    fn gguf_tag_picks_the_file_case_insensitively() {
        let s: Vec<Sibling> = [
            "smollm2-135m-instruct-q4_k_m.gguf",
            "smollm2-135m-instruct-q8_0.gguf",
            "README.md",
        ]
        .iter()
        .map(|n| sib(n))
        .collect();
        let sel = select_files("o/m-GGUF", &s, Some(&QuantToken::Gguf("Q8_0".into()))).unwrap();
        assert_eq!(names(&sel), vec!["smollm2-135m-instruct-q8_0.gguf"]);
        let sel = select_files("o/m-GGUF", &s, None).unwrap();
        assert_eq!(
            sel.gguf,
            Some(("Q4_K_M".into(), "smollm2-135m-instruct-q4_k_m.gguf".into()))
        );
        let err = select_files("o/m-GGUF", &s, Some(&QuantToken::Gguf("Q6_K".into())))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unsupported quantization 'Q6_K'")
                && err.contains("available: Q4_K_M, Q8_0"),
            "{err}"
        );
        let err = select_files("o/m-GGUF", &s, Some(&QuantToken::Kv(KvProfile::KvInt8)))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unsupported quantization 'kv_int8'") && err.contains("Q4_K_M, Q8_0"),
            "{err}"
        );
    }

    #[test]
    fn no_tag_without_q4_k_m_lists_tags() {
        let s: Vec<Sibling> = ["m-Q8_0.gguf", "m-F16.gguf"]
            .iter()
            .map(|n| sib(n))
            .collect();
        let err = select_files("o/m", &s, None).unwrap_err().to_string();
        assert!(err.contains("available: F16, Q8_0"), "{err}");
    }

    #[test]
    fn split_gguf_sets_are_fetched_together() {
        let s: Vec<Sibling> = [
            "Q4_K_M/m-Q4_K_M-00002-of-00002.gguf",
            "Q4_K_M/m-Q4_K_M-00001-of-00002.gguf",
            "mmproj-Q4_K_M.gguf",
        ]
        .iter()
        .map(|n| sib(n))
        .collect();
        let sel = select_files("o/m", &s, None).unwrap();
        assert_eq!(sel.files.len(), 2);
        assert_eq!(sel.gguf.unwrap().1, "Q4_K_M/m-Q4_K_M-00001-of-00002.gguf");
    }

    #[test]
    fn path_traversal_is_refused() {
        for bad in [
            "../evil.safetensors",
            "/etc/passwd",
            "a/../../b",
            "a\\b",
            "C:/x",
            "a//b",
            "./x",
        ] {
            assert!(!is_safe_relative_path(bad), "{bad}");
            let s = vec![sib("config.json"), sib("model.safetensors"), sib(bad)];
            let err = select_files("o/m", &s, None).unwrap_err().to_string();
            assert!(err.contains("escape the model folder"), "{err}");
        }
        assert!(is_safe_relative_path("Q4_K_M/model.gguf"));
    }

    /// sentence-transformers/all-MiniLM-L6-v2's listing: the pooling config and module list come
    /// along; ONNX/OpenVINO exports and other weight formats do not.
    #[test]
    fn embedding_repo_brings_its_sentence_transformers_modules() {
        let s: Vec<Sibling> = [
            ".gitattributes",
            "1_Pooling/config.json",
            "README.md",
            "config.json",
            "config_sentence_transformers.json",
            "data_config.json",
            "model.safetensors",
            "modules.json",
            "onnx/model.onnx",
            "onnx/model_O1.onnx",
            "openvino/openvino_model.bin",
            "pytorch_model.bin",
            "rust_model.ot",
            "sentence_bert_config.json",
            "special_tokens_map.json",
            "tf_model.h5",
            "tokenizer.json",
            "tokenizer_config.json",
            "train_script.py",
            "vocab.txt",
            "2_Dense/pytorch_model.bin",
        ]
        .iter()
        .map(|n| sib(n))
        .collect();
        let sel = select_files("sentence-transformers/all-MiniLM-L6-v2", &s, None).unwrap();
        assert_eq!(
            names(&sel),
            vec![
                "1_Pooling/config.json",
                "config.json",
                "config_sentence_transformers.json",
                "modules.json",
                "sentence_bert_config.json",
                "special_tokens_map.json",
                "tokenizer.json",
                "tokenizer_config.json",
                "vocab.txt",
                "model.safetensors",
            ]
        );
        assert!(!is_module_config("x_Pooling/config.json"));
        assert!(!is_module_config("1_Pooling/other.json"));
    }

    #[test]
    fn repos_without_runnable_weights_are_refused() {
        let s = vec![
            sib("README.md"),
            sib("pytorch_model.bin"),
            sib("config.json"),
        ];
        let err = select_files("o/m", &s, None).unwrap_err().to_string();
        assert!(err.contains("no config.json + safetensors"), "{err}");
    }
}
