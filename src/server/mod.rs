//! `xllm serve`: an OpenAI- and Ollama-compatible HTTP server on the continuous-batching
//! engine. HTTP is axum on a small tokio runtime; every loaded model's engine steps on a thread
//! of its own ([`EngineHandle`](crate::engine::worker::EngineHandle)); requests reach it through
//! its channel and their events come back through one channel per request, so no handler ever
//! waits for a step and every request of a model shares its batches.
//!
//! Modules: [`router`] (every route and layer), [`openai`], [`ollama`], [`pull`] (the APIs),
//! [`registry`] (which models are loaded), [`generation`] (one request on an engine),
//! [`metrics`], [`error`] (the two error envelopes), [`common`] (what the APIs share).

pub mod common;
pub mod error;
pub mod generation;
pub mod metrics;
pub mod ollama;
pub mod openai;
pub mod pull;
pub mod registry;
pub mod router;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use error::ApiError;
use metrics::Metrics;
use registry::{Alias, ModelFacts, Registry, RegistryOptions};

/// How the server runs (from `xllm serve`'s flags).
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub host: String,
    pub port: u16,
    pub api_key: Option<String>,
    pub models: Vec<Alias>,
    pub registry: RegistryOptions,
    pub cors_origins: Vec<String>,
    /// Largest request body in bytes.
    pub body_limit: usize,
    /// Models to load before `/health` says ready.
    pub preload: Vec<String>,
    /// How long running requests may finish after SIGTERM before they are cancelled.
    pub shutdown_timeout: Duration,
}

/// A request's id (from `x-request-id` or made up), in logs and the response header.
#[derive(Debug, Clone)]
pub struct RequestId(pub Arc<str>);

/// What every handler shares.
pub struct AppState {
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub api_key_digest: Option<[u8; 32]>,
    pub body_limit: usize,
    pub cors_origins: Vec<String>,
    ready: AtomicBool,
    shutting_down: AtomicBool,
}

impl AppState {
    /// The state of a server that is not yet ready (`/health` answers 503 until
    /// [`AppState::set_ready`]).
    pub fn new(
        registry: Arc<Registry>,
        api_key: Option<&str>,
        body_limit: usize,
        cors_origins: Vec<String>,
    ) -> AppState {
        AppState {
            registry,
            metrics: Arc::new(Metrics::new()),
            api_key_digest: api_key.map(digest),
            body_limit,
            cors_origins,
            ready: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
        }
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }
}

fn digest(text: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(text.as_bytes()).into()
}

/// Off while the HTTP fuzz target drives the router in-process (millions of requests).
static LOGGING: AtomicBool = AtomicBool::new(true);

/// Turns the structured request logs on or off (the fuzz driver turns them off).
pub fn set_logging(on: bool) {
    LOGGING.store(on, Ordering::Relaxed);
}

/// One structured log line on stderr (JSON, with a timestamp and level).
pub fn log_line(mut value: serde_json::Value) {
    if !LOGGING.load(Ordering::Relaxed) {
        return;
    }
    if let Some(o) = value.as_object_mut() {
        o.insert(
            "ts".into(),
            chrono::Utc::now()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                .into(),
        );
        o.entry("level").or_insert_with(|| "info".into());
    }
    eprintln!("{value}");
}

/// Logs a finished generation.
pub fn log_generation(
    request_id: &RequestId,
    model: &str,
    prompt_tokens: usize,
    completion_tokens: usize,
    elapsed: Duration,
) {
    log_line(serde_json::json!({
        "msg": "generation",
        "request_id": &*request_id.0,
        "model": model,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "ms": (elapsed.as_secs_f64() * 1e4).round() / 10.0,
    }));
}

/// A model the server offers (`/v1/models`, `/api/tags`).
pub struct ServedModel {
    pub name: String,
    pub owner: &'static str,
    /// `None` when the files could not be inspected.
    pub facts: Option<ModelFacts>,
}

/// The operator's models, then every complete model of the store.
pub async fn models_served(registry: &Arc<Registry>) -> Result<Vec<ServedModel>, ApiError> {
    let registry = registry.clone();
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        for alias in registry.aliases() {
            let facts = registry
                .inspect(&alias.name)
                .ok()
                .map(|(_, o)| ModelFacts::of(&o));
            out.push(ServedModel {
                name: alias.name.clone(),
                owner: "local",
                facts,
            });
        }
        let entries = registry
            .store()
            .entries()
            .map_err(|e| ApiError::internal(format!("cannot read the store: {e:#}")))?;
        for entry in entries.into_iter().filter(|e| e.is_ready()) {
            if out.iter().any(|m| m.name == entry.name) {
                continue;
            }
            let facts = registry
                .inspect(&entry.name)
                .ok()
                .map(|(_, o)| ModelFacts::of(&o));
            out.push(ServedModel {
                name: entry.name,
                owner: "store",
                facts,
            });
        }
        Ok(out)
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
}

/// Runs the server until SIGTERM or Ctrl-C.
pub fn serve(options: ServerOptions) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("xllm-http")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run(options))
}

async fn run(options: ServerOptions) -> anyhow::Result<()> {
    let store = crate::store::Store::open_default()?;
    for alias in &options.models {
        // Fail at start, not at the first request, when an operator path is not a model.
        crate::store::resolve::open_model(&alias.path.display().to_string())
            .with_context(|| format!("--model {}={}", alias.name, alias.path.display()))?;
    }
    let registry = Arc::new(Registry::new(
        store,
        options.models.clone(),
        options.registry.clone(),
    )?);
    let state = Arc::new(AppState::new(
        registry.clone(),
        options.api_key.as_deref(),
        options.body_limit,
        options.cors_origins.clone(),
    ));
    let app = router::router(state.clone());
    let addr = if options.host.contains(':') && !options.host.starts_with('[') {
        format!("[{}]:{}", options.host, options.port)
    } else {
        format!("{}:{}", options.host, options.port)
    };
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {addr} (is another server using the port? pick one with --port)"
            )
        })?;
    let local: SocketAddr = listener.local_addr()?;
    log_line(serde_json::json!({"msg": "listening", "address": format!("http://{local}")}));

    // Keep-alive: unload idle models whose time has come.
    let reaper = {
        let registry = registry.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                registry.reap().await;
            }
        })
    };

    let server = {
        let state = state.clone();
        let timeout = options.shutdown_timeout;
        axum::serve(listener, app).with_graceful_shutdown(async move {
            shutdown_signal().await;
            state.shutting_down.store(true, Ordering::SeqCst);
            log_line(serde_json::json!({"msg": "shutting down: no new connections; running requests may finish", "timeout_s": timeout.as_secs_f64()}));
            // Past the timeout, running work is cancelled so the streams end.
            let registry = state.registry.clone();
            tokio::spawn(async move {
                tokio::time::sleep(timeout).await;
                log_line(serde_json::json!({"msg": "shutdown timeout: cancelling running requests", "level": "warn"}));
                let _ = tokio::task::spawn_blocking(move || registry.cancel_all()).await;
            });
        })
    };
    let server = tokio::spawn(async move { server.await });

    for name in &options.preload {
        match registry.acquire(name, None).await {
            Ok(lease) => {
                log_line(
                    serde_json::json!({"msg": "preloaded", "model": name, "load_ms": lease.model.load_duration.as_millis() as u64}),
                );
            }
            Err(e) => {
                anyhow::bail!("--preload {name}: {}", e.message);
            }
        }
    }
    state.set_ready();
    log_line(serde_json::json!({"msg": "ready"}));

    let result = server.await.context("the server task failed")?;
    reaper.abort();
    let r = registry.clone();
    let _ = tokio::task::spawn_blocking(move || r.shutdown_all(false)).await;
    log_line(serde_json::json!({"msg": "stopped"}));
    result.context("the HTTP server failed")
}

/// SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
