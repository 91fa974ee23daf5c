//! `POST /api/pull`: downloads a Hub model into the store with our resumable, verified
//! downloader, streaming Ollama-style progress (`pulling manifest`, `pulling <file>` with
//! `total`/`completed`, `verifying sha256 digest`, `writing manifest`, `success`). Only Hub ids
//! are accepted ([`ModelRef::parse_hub`]): a request can never name a path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};

use super::common::{json_response, stream_response};
use super::error::{body_rejection, parse_body, ApiError};
use super::AppState;
use crate::hub::download::{FileProgress, Progress};
use crate::hub::HubError;
use crate::store::ModelRef;

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
struct PullRequest {
    #[serde(alias = "name")]
    model: String,
    #[serde(default = "yes")]
    stream: bool,
}

/// Progress lines go to the HTTP stream through a channel (the pull runs on a blocking thread).
struct ChannelProgress {
    tx: UnboundedSender<Value>,
}

impl Progress for ChannelProgress {
    fn start_file(&self, path: &str, total: Option<u64>, done: u64) -> Box<dyn FileProgress> {
        let file = FileLine {
            tx: self.tx.clone(),
            path: path.to_string(),
            total,
            done: AtomicU64::new(done),
            last_sent: std::sync::Mutex::new(Instant::now()),
        };
        file.send();
        Box::new(file)
    }

    fn note(&self, message: &str) {
        let _ = self.tx.send(json!({"status": message}));
    }
}

struct FileLine {
    tx: UnboundedSender<Value>,
    path: String,
    total: Option<u64>,
    done: AtomicU64,
    last_sent: std::sync::Mutex<Instant>,
}

impl FileLine {
    fn send(&self) {
        let mut v = json!({
            "status": format!("pulling {}", self.path),
            "digest": self.path,
            "completed": self.done.load(Ordering::Relaxed),
        });
        if let Some(t) = self.total {
            v["total"] = t.into();
        }
        let _ = self.tx.send(v);
    }
}

impl FileProgress for FileLine {
    fn advance(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
        // At most ten lines a second.
        let mut last = self.last_sent.lock().unwrap_or_else(|e| e.into_inner());
        if last.elapsed() >= Duration::from_millis(100) {
            *last = Instant::now();
            drop(last);
            self.send();
        }
    }

    fn restart(&self) {
        self.done.store(0, Ordering::Relaxed);
        self.send();
    }

    fn finish(&self) {
        if let Some(t) = self.total {
            self.done.store(t, Ordering::Relaxed);
        }
        self.send();
    }
}

/// The status a failed pull answers with when not streaming.
fn pull_error(e: &anyhow::Error) -> ApiError {
    let message = format!("{e:#}");
    for cause in e.chain() {
        if let Some(h) = cause.downcast_ref::<HubError>() {
            return match h {
                HubError::RepoNotFound { .. }
                | HubError::EntryNotFound { .. }
                | HubError::RevisionNotFound { .. } => ApiError::model_not_found(message),
                HubError::Gated { .. } | HubError::Unauthorized { .. } => {
                    ApiError::new(StatusCode::FORBIDDEN, "permission_error", message)
                }
                HubError::Network { .. } | HubError::Http { .. } | HubError::Offline => {
                    ApiError::new(StatusCode::BAD_GATEWAY, "server_error", message)
                }
            };
        }
    }
    if crate::store::reference::is_quant_error(e) {
        return ApiError::bad_param("model", message);
    }
    ApiError::internal(message)
}

pub async fn pull(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match pull_inner(state, body).await {
        Ok(r) => r,
        Err(e) => e.ollama(),
    }
}

async fn pull_inner(
    state: Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|r| body_rejection(r, state.body_limit))?;
    let req: PullRequest = parse_body(&body)?;
    let name = req.model.trim();
    let name = name.strip_suffix(":latest").unwrap_or(name).to_string();
    let reference = ModelRef::parse_hub(&name).map_err(|e| {
        ApiError::bad_param(
            "model",
            format!(
                "{e:#}; /api/pull downloads Hugging Face Hub models (`org/name[:quantization]`)"
            ),
        )
    })?;
    let store = state.registry.store().clone();
    let reference = reference.to_string();
    if !req.stream {
        let result = tokio::task::spawn_blocking(move || {
            crate::store::pull::pull(
                &store,
                &reference,
                "main",
                &crate::hub::download::NoProgress,
            )
        })
        .await
        .map_err(|e| ApiError::internal(format!("pull task failed: {e}")))?;
        result.map_err(|e| pull_error(&e))?;
        return Ok(json_response(StatusCode::OK, &json!({"status": "success"})));
    }
    let (tx, rx) = unbounded_channel::<Value>();
    let _ = tx.send(json!({"status": "pulling manifest"}));
    // The pull reports its outcome as the last lines; the stream ends when it drops `tx`.
    tokio::task::spawn_blocking(move || {
        let progress = ChannelProgress { tx: tx.clone() };
        match crate::store::pull::pull(&store, &reference, "main", &progress) {
            Ok(_) => {
                for status in ["verifying sha256 digest", "writing manifest", "success"] {
                    let _ = tx.send(json!({ "status": status }));
                }
            }
            Err(e) => {
                let _ = tx.send(json!({"error": format!("{e:#}")}));
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let v = rx.recv().await?;
        Some((Bytes::from(format!("{v}\n")), rx))
    });
    Ok(stream_response("application/x-ndjson", stream))
}
