//! Hub failures, each with a message that says what to do next.

/// Why talking to the Hub failed.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("repository '{repo}' was not found on {endpoint}: check the name{}", if *.authenticated { "" } else { "; if it is private, set HF_TOKEN to a token that can read it" })]
    RepoNotFound {
        repo: String,
        endpoint: String,
        authenticated: bool,
    },
    #[error("'{repo}' is a gated repository: {}", if *.authenticated { format!("your token has no access yet; request it at {endpoint}/{repo} and try again") } else { format!("accept its conditions at {endpoint}/{repo}, then set HF_TOKEN to a token of that account (https://huggingface.co/settings/tokens)") })]
    Gated {
        repo: String,
        endpoint: String,
        authenticated: bool,
    },
    #[error("{endpoint} refused the request for '{repo}' (HTTP {status}): {}", if *.authenticated { "HF_TOKEN is invalid or lacks access; check it" } else { "set HF_TOKEN to a token that can read it" })]
    Unauthorized {
        repo: String,
        endpoint: String,
        status: u16,
        authenticated: bool,
    },
    #[error("revision '{revision}' does not exist in '{repo}': pass an existing branch, tag or commit to --revision")]
    RevisionNotFound { repo: String, revision: String },
    #[error("file '{file}' does not exist in '{repo}' at {revision}")]
    EntryNotFound {
        repo: String,
        revision: String,
        file: String,
    },
    #[error("cannot reach {endpoint}: {detail}; check your network connection (or HF_ENDPOINT); run pulled models with HF_HUB_OFFLINE=1")]
    Network { endpoint: String, detail: String },
    #[error("HF_HUB_OFFLINE is set, so nothing can be downloaded; unset it to pull (models already in the store run offline)")]
    Offline,
    #[error("unexpected reply from {url}: HTTP {status}{}", if .message.is_empty() { String::new() } else { format!(" ({})", .message) })]
    Http {
        url: String,
        status: u16,
        message: String,
    },
}
