//! Repo info and file requests against `HF_ENDPOINT`. Redirects are followed by hand so that the
//! token is only ever sent to the Hub's own origin, never to the CDN a file redirects to, and so
//! that the metadata the Hub puts on the redirect itself (`X-Repo-Commit`, `X-Linked-Etag`,
//! `X-Linked-Size`) is kept.

use std::time::Duration;

use reqwest::blocking::{Client, Response};
use reqwest::header::{HeaderMap, AUTHORIZATION, LOCATION, RANGE};
use reqwest::{StatusCode, Url};
use serde::Deserialize;

use super::{HubConfig, HubError};

const MAX_REDIRECTS: usize = 10;

pub struct HubClient {
    config: HubConfig,
    http: Client,
    endpoint: Url,
}

/// The repo-info fields a pull needs (`GET /api/models/{repo}/revision/{rev}?blobs=true`).
#[derive(Debug, Clone, Deserialize)]
pub struct RepoInfo {
    pub id: Option<String>,
    /// The commit the revision resolved to.
    pub sha: Option<String>,
    #[serde(default)]
    pub gated: serde_json::Value,
    #[serde(default)]
    pub siblings: Vec<Sibling>,
}

/// One file of the repository, with hf-hub's LFS metadata type.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Sibling {
    pub rfilename: String,
    pub size: Option<u64>,
    pub blob_id: Option<String>,
    pub lfs: Option<hf_hub::repository::BlobLfsInfo>,
}

/// What the Hub said about a file on the `resolve` request (or its redirect).
#[derive(Debug, Clone, Default)]
pub struct FileMeta {
    pub commit: Option<String>,
    /// `X-Linked-Etag` (the sha256 of LFS files) or `ETag`, without quotes or `W/`.
    pub etag: Option<String>,
    /// `X-Linked-Size`.
    pub linked_size: Option<u64>,
    /// True when `etag` came from `X-Linked-Etag`, which for LFS files is their sha256.
    pub etag_is_linked: bool,
}

impl HubClient {
    pub fn new(config: HubConfig) -> anyhow::Result<HubClient> {
        if config.offline {
            return Err(HubError::Offline.into());
        }
        let endpoint = Url::parse(&format!("{}/", config.endpoint)).map_err(|e| {
            anyhow::anyhow!("HF_ENDPOINT '{}' is not a valid URL: {e}", config.endpoint)
        })?;
        let http = Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(15))
            .timeout(Duration::from_secs(60))
            .user_agent(concat!("xllm/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(HubClient {
            config,
            http,
            endpoint,
        })
    }

    pub fn config(&self) -> &HubConfig {
        &self.config
    }

    /// Repo info with file sizes and LFS sha256 (`?blobs=true`) at `revision`.
    pub fn repo_info(&self, repo: &str, revision: &str) -> anyhow::Result<RepoInfo> {
        let url = format!(
            "{}/api/models/{repo}/revision/{}?blobs=true",
            self.config.endpoint,
            encode_segment(revision)
        );
        let ctx = Context::Info { repo, revision };
        let resp = match self.send(&url, None, &ctx) {
            Ok((resp, _)) => resp,
            // Servers that only implement `/api/models/{repo}` answer the revision route with a
            // 404; for the default branch that route says the same thing.
            Err(e) if revision == "main" && is_repo_not_found(&e) => {
                let plain = format!("{}/api/models/{repo}?blobs=true", self.config.endpoint);
                match self.send(&plain, None, &ctx) {
                    Ok((resp, _)) => resp,
                    Err(_) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        };
        let info: RepoInfo = resp
            .json()
            .map_err(|e| anyhow::anyhow!("the Hub's repo info for '{repo}' is not valid: {e}"))?;
        Ok(info)
    }

    /// GET a file of `repo` at `revision`, from byte `offset` on when non-zero.
    pub fn get_file(
        &self,
        repo: &str,
        revision: &str,
        file: &str,
        offset: u64,
    ) -> anyhow::Result<(Response, FileMeta)> {
        let path: Vec<String> = file.split('/').map(encode_segment).collect();
        let url = format!(
            "{}/{repo}/resolve/{}/{}",
            self.config.endpoint,
            encode_segment(revision),
            path.join("/")
        );
        let range = (offset > 0).then(|| format!("bytes={offset}-"));
        self.send(
            &url,
            range,
            &Context::File {
                repo,
                revision,
                file,
            },
        )
    }

    /// Sends a GET, following redirects by hand; fails with a [`HubError`] on error statuses.
    fn send(
        &self,
        url: &str,
        range: Option<String>,
        ctx: &Context,
    ) -> anyhow::Result<(Response, FileMeta)> {
        let mut url = Url::parse(url)?;
        let mut meta = FileMeta::default();
        for _ in 0..=MAX_REDIRECTS {
            let mut req = self.http.get(url.clone());
            if let Some(r) = &range {
                req = req.header(RANGE, r);
            }
            if let Some(token) = &self.config.token {
                if url.origin() == self.endpoint.origin() {
                    req = req.header(AUTHORIZATION, format!("Bearer {token}"));
                }
            }
            let resp = req.send().map_err(|e| self.network_error(e))?;
            merge_meta(&mut meta, resp.headers());
            let status = resp.status();
            if status.is_redirection() {
                let location = resp
                    .headers()
                    .get(LOCATION)
                    .and_then(|l| l.to_str().ok())
                    .ok_or_else(|| anyhow::anyhow!("redirect without Location from {url}"))?;
                url = url
                    .join(location)
                    .map_err(|e| anyhow::anyhow!("bad redirect '{location}' from {url}: {e}"))?;
                continue;
            }
            if status.is_success() || status == StatusCode::RANGE_NOT_SATISFIABLE {
                return Ok((resp, meta));
            }
            return Err(self.status_error(resp, ctx).into());
        }
        anyhow::bail!("too many redirects starting at {url}")
    }

    fn network_error(&self, e: reqwest::Error) -> anyhow::Error {
        let mut detail = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            detail = format!("{detail}: {s}");
            source = s.source();
        }
        HubError::Network {
            endpoint: self.config.endpoint.clone(),
            detail,
        }
        .into()
    }

    fn status_error(&self, resp: Response, ctx: &Context) -> HubError {
        let status = resp.status().as_u16();
        let header = |k: &str| {
            resp.headers()
                .get(k)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string()
        };
        let code = header("x-error-code");
        let message = header("x-error-message");
        let authenticated = self.config.token.is_some();
        let endpoint = self.config.endpoint.clone();
        let (repo, revision) = match ctx {
            Context::Info { repo, revision } => (repo.to_string(), revision.to_string()),
            Context::File { repo, revision, .. } => (repo.to_string(), revision.to_string()),
        };
        match code.as_str() {
            "GatedRepo" => {
                return HubError::Gated {
                    repo,
                    endpoint,
                    authenticated,
                }
            }
            "RepoNotFound" => {
                return HubError::RepoNotFound {
                    repo,
                    endpoint,
                    authenticated,
                }
            }
            "RevisionNotFound" => return HubError::RevisionNotFound { repo, revision },
            "EntryNotFound" => {
                if let Context::File { file, .. } = ctx {
                    return HubError::EntryNotFound {
                        repo,
                        revision,
                        file: file.to_string(),
                    };
                }
            }
            _ => {}
        }
        match (status, ctx) {
            (401, _) if !authenticated => HubError::RepoNotFound {
                repo,
                endpoint,
                authenticated,
            },
            (401, _) | (403, _) => HubError::Unauthorized {
                repo,
                endpoint,
                status,
                authenticated,
            },
            (404, Context::Info { .. }) => HubError::RepoNotFound {
                repo,
                endpoint,
                authenticated,
            },
            (404, Context::File { file, .. }) => HubError::EntryNotFound {
                repo,
                revision,
                file: file.to_string(),
            },
            _ => HubError::Http {
                url: resp.url().to_string(),
                status,
                message,
            },
        }
    }
}

fn is_repo_not_found(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<HubError>(),
        Some(HubError::RepoNotFound { .. })
    )
}

enum Context<'a> {
    Info {
        repo: &'a str,
        revision: &'a str,
    },
    File {
        repo: &'a str,
        revision: &'a str,
        file: &'a str,
    },
}

fn merge_meta(meta: &mut FileMeta, headers: &HeaderMap) {
    let get = |k: &str| {
        headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    if meta.commit.is_none() {
        meta.commit = get("x-repo-commit");
    }
    if meta.etag.is_none() {
        let linked = get("x-linked-etag");
        meta.etag_is_linked = linked.is_some();
        meta.etag = linked
            .or_else(|| get("etag"))
            .map(|e| e.trim_start_matches("W/").trim_matches('"').to_string());
    }
    if meta.linked_size.is_none() {
        meta.linked_size = get("x-linked-size").and_then(|s| s.parse().ok());
    }
}

/// Percent-encodes one URL path segment (everything but RFC 3986 unreserved characters).
pub fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_revisions_and_paths() {
        assert_eq!(encode_segment("main"), "main");
        assert_eq!(encode_segment("refs/pr/1"), "refs%2Fpr%2F1");
        assert_eq!(encode_segment("a b"), "a%20b");
    }
}
