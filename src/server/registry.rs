//! Which models the server has loaded: a model loads on first use (by store name, or by a name
//! the operator gave a local path with `--model`), stays for its keep-alive time after its last
//! request, and the least recently used idle model is unloaded first when the memory plan or
//! the model count needs room. A client name never reaches the filesystem as a path: store
//! names are parsed with [`ModelRef::parse_hub`], and only operator aliases map to paths.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::http::StatusCode;
use candle_core::Device;

use super::error::ApiError;
use crate::device::MemoryEstimate;
use crate::engine::embed::EmbeddingModel;
use crate::engine::embed_worker::EmbedHandle;
use crate::engine::scheduler::EngineConfig;
use crate::engine::session::{self, ModelSession, OpenOptions, DEFAULT_CTX};
use crate::engine::worker::EngineHandle;
use crate::error::NotFound;
use crate::model::inspect::ModelMetadata;
use crate::store::resolve::{open_model, open_ref, OpenedModel};
use crate::store::{ModelFormat, ModelRef, Store};

/// How long a model stays loaded after its last request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepAlive {
    For(Duration),
    Forever,
}

impl KeepAlive {
    /// Ollama's forms: a number of seconds, or a Go duration (`"5m"`, `"1h30m"`, `"0"`); a
    /// negative value keeps the model forever.
    pub fn parse(value: &serde_json::Value) -> Result<KeepAlive, String> {
        let seconds = match value {
            serde_json::Value::Number(n) => n.as_f64().ok_or("keep_alive must be a number")?,
            serde_json::Value::String(s) => parse_duration(s.trim())?,
            _ => {
                return Err(
                    "keep_alive must be a number of seconds or a duration like \"5m\"".into(),
                )
            }
        };
        Ok(if seconds < 0.0 {
            KeepAlive::Forever
        } else {
            KeepAlive::For(Duration::from_secs_f64(seconds.min(1e9)))
        })
    }
}

/// A Go-style duration (`300ms`, `1.5h`, `2h45m`, `-1m`, a bare number of seconds) in seconds.
fn parse_duration(text: &str) -> Result<f64, String> {
    let bad = || format!("'{text}' is not a duration (examples: \"30s\", \"5m\", \"1h\", \"-1\")");
    if let Ok(n) = text.parse::<f64>() {
        return Ok(n);
    }
    let (sign, mut rest) = match text.strip_prefix('-') {
        Some(r) => (-1.0, r),
        None => (1.0, text.strip_prefix('+').unwrap_or(text)),
    };
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total = 0.0;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let number: f64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += number * scale;
        rest = &rest[unit_len..];
    }
    Ok(sign * total)
}

/// A local model the operator named at start (`--model PATH` or `--model NAME=PATH`).
#[derive(Debug, Clone)]
pub struct Alias {
    pub name: String,
    pub path: PathBuf,
}

impl Alias {
    /// `NAME=PATH`, or a bare `PATH` named after its file (without `.gguf`) or folder.
    pub fn parse(spec: &str) -> anyhow::Result<Alias> {
        let (name, path) = match spec.split_once('=') {
            Some((n, p)) if (!n.is_empty() && !n.contains('/')) || n.contains(':') => {
                (n.to_string(), PathBuf::from(p))
            }
            _ => {
                let path = PathBuf::from(spec);
                let stem = path
                    .file_name()
                    .map(|f| f.to_string_lossy().to_string())
                    .unwrap_or_default();
                let stem = stem
                    .strip_suffix(".gguf")
                    .or_else(|| stem.strip_suffix(".GGUF"))
                    .unwrap_or(&stem)
                    .to_string();
                (stem, path)
            }
        };
        if name.is_empty() || name.contains(':') || name.contains(char::is_whitespace) {
            anyhow::bail!(
                "--model '{spec}': the model name must be non-empty, without ':' or spaces (use NAME=PATH)"
            );
        }
        Ok(Alias { name, path })
    }
}

/// How models are opened and how many may be held.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    pub device: Option<String>,
    pub ctx: Option<usize>,
    pub threads: Option<usize>,
    /// Sequences each model runs at once.
    pub parallel: usize,
    /// Requests that may wait per model before new ones get 503.
    pub max_waiting: usize,
    /// Models loaded at once.
    pub max_models: usize,
    /// Memory all loaded models may use together (`None`: what the device reports free).
    pub memory_limit: Option<u64>,
    pub keep_alive: KeepAlive,
}

/// Facts shown by `/api/tags`, `/api/ps` and `/api/show`.
#[derive(Debug, Clone)]
pub struct ModelFacts {
    pub format: ModelFormat,
    pub metadata: ModelMetadata,
    /// Bytes of the model's files.
    pub size: u64,
    pub modified: SystemTime,
    /// A stable id for the files (the manifest's sha256, or of the path for local models).
    pub digest: String,
    pub dir: PathBuf,
    pub gguf_file: Option<PathBuf>,
}

impl ModelFacts {
    pub fn of(opened: &OpenedModel) -> ModelFacts {
        let (size, modified, digest) = match &opened.manifest {
            Some(m) => {
                let path = opened.dir.join(crate::store::manifest::MANIFEST_FILE);
                let bytes = std::fs::read(&path).unwrap_or_default();
                let modified = std::fs::metadata(&path)
                    .and_then(|m| m.modified())
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                (m.total_size(), modified, sha256_hex(&bytes))
            }
            None => {
                let file = opened
                    .gguf_file
                    .clone()
                    .unwrap_or_else(|| opened.dir.clone());
                let mut size = 0;
                let mut modified = SystemTime::UNIX_EPOCH;
                let _ = crate::store::for_each_file(&file, &mut |_, m| {
                    size += m.len();
                    if let Ok(t) = m.modified() {
                        modified = modified.max(t);
                    }
                });
                if let Ok(m) = std::fs::metadata(&file) {
                    if m.is_file() {
                        size = m.len();
                        modified = m.modified().unwrap_or(modified);
                    }
                }
                (
                    size,
                    modified,
                    sha256_hex(file.to_string_lossy().as_bytes()),
                )
            }
        };
        ModelFacts {
            format: opened.format,
            metadata: opened.metadata.clone(),
            size,
            modified,
            digest,
            dir: opened.dir.clone(),
            gguf_file: opened.gguf_file.clone(),
        }
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// When a loaded model was used and when it may go.
#[derive(Debug)]
struct Usage {
    active: usize,
    last_used: Instant,
    /// `None`: forever (or while requests run).
    expires: Option<Instant>,
}

/// What a request wants of a model; a model that cannot do it is refused (400) before it is
/// loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Chat or text generation (`what` names it in the error: `chat`, `generate`, ...).
    Generate(&'static str),
    Embed,
    /// Whatever the model does (`--preload`).
    Any,
}

/// How a loaded model runs.
pub enum Runtime {
    /// A causal LM on the continuous-batching engine.
    Generate(EngineHandle),
    /// An embedding model on its packing worker.
    Embed(EmbedHandle),
}

/// A loaded model: its engine and what the registry knows about it.
pub struct LoadedModel {
    /// The registry key (alias or store name, with its `:token`).
    pub key: String,
    pub runtime: Runtime,
    pub estimate: Option<MemoryEstimate>,
    pub facts: ModelFacts,
    pub load_duration: Duration,
    usage: Mutex<Usage>,
}

impl LoadedModel {
    /// The generation engine; an embedding model is a 400 naming what it can do.
    pub fn engine(&self) -> Result<&EngineHandle, ApiError> {
        match &self.runtime {
            Runtime::Generate(e) => Ok(e),
            Runtime::Embed(_) => Err(not_generative(&self.key, "text generation")),
        }
    }

    pub fn session(&self) -> Result<&Arc<ModelSession>, ApiError> {
        self.engine().map(EngineHandle::session)
    }

    /// The embedding worker; a model that cannot embed is a 400.
    pub fn embedder(&self) -> Result<&EmbedHandle, ApiError> {
        match &self.runtime {
            Runtime::Embed(e) => Ok(e),
            Runtime::Generate(_) => Err(cannot_embed(&self.key, None)),
        }
    }

    /// The context one sequence may hold (generation) or the input limit (embeddings).
    pub fn context_length(&self) -> usize {
        match &self.runtime {
            Runtime::Generate(e) => e.session().context,
            Runtime::Embed(e) => e.model().max_tokens,
        }
    }

    fn shutdown(&self, drain: bool) {
        match &self.runtime {
            Runtime::Generate(e) => e.shutdown(drain),
            Runtime::Embed(e) => e.shutdown(),
        }
    }

    /// When the model will be unloaded if no request comes (`None`: not planned).
    pub fn expires_at(&self) -> Option<SystemTime> {
        let u = self.usage.lock().unwrap_or_else(|e| e.into_inner());
        if u.active > 0 {
            return None;
        }
        let now = Instant::now();
        u.expires
            .map(|e| SystemTime::now() + e.saturating_duration_since(now))
    }

    fn is_idle(&self) -> bool {
        self.usage.lock().unwrap_or_else(|e| e.into_inner()).active == 0
    }

    fn last_used(&self) -> Instant {
        self.usage
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last_used
    }

    /// Bytes reserved for KV blocks that no sequence holds yet (the free-memory figure does
    /// not include them, since blocks are allocated as sequences grow).
    fn unused_kv_reservation(&self) -> u64 {
        let Some(e) = &self.estimate else { return 0 };
        let Runtime::Generate(engine) = &self.runtime else {
            return 0;
        };
        let stats = engine.stats();
        if stats.kv_blocks_total == 0 {
            return e.kv_cache;
        }
        let free = stats.kv_blocks_total.saturating_sub(stats.kv_blocks_used) as u64;
        e.kv_cache / stats.kv_blocks_total as u64 * free
    }
}

/// A model held for one request: it is not unloaded while a lease is alive; dropping it starts
/// the keep-alive clock.
pub struct Lease {
    pub model: Arc<LoadedModel>,
    keep_alive: KeepAlive,
    /// The model was loaded for this request (Ollama's `load_duration`).
    pub loaded_now: bool,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut u = self.model.usage.lock().unwrap_or_else(|e| e.into_inner());
        u.active = u.active.saturating_sub(1);
        let now = Instant::now();
        u.last_used = now;
        u.expires = match self.keep_alive {
            KeepAlive::Forever => None,
            KeepAlive::For(d) => Some(now + d),
        };
    }
}

/// What a client's model name refers to.
#[derive(Debug, Clone)]
enum Target {
    Alias {
        path: PathBuf,
        token: Option<String>,
    },
    Store(ModelRef),
}

pub struct Registry {
    store: Store,
    aliases: Vec<Alias>,
    options: RegistryOptions,
    device: Device,
    loaded: Mutex<HashMap<String, Arc<LoadedModel>>>,
    /// One load at a time, so two loads never both count on the same free memory.
    load_lock: tokio::sync::Mutex<()>,
}

impl Registry {
    pub fn new(
        store: Store,
        aliases: Vec<Alias>,
        options: RegistryOptions,
    ) -> anyhow::Result<Self> {
        let device = crate::device::select_device(options.device.as_deref())?;
        Ok(Self {
            store,
            aliases,
            options,
            device,
            loaded: Mutex::new(HashMap::new()),
            load_lock: tokio::sync::Mutex::new(()),
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn aliases(&self) -> &[Alias] {
        &self.aliases
    }

    pub fn options(&self) -> &RegistryOptions {
        &self.options
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<LoadedModel>>> {
        self.loaded.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The models loaded now, by key.
    pub fn loaded(&self) -> Vec<Arc<LoadedModel>> {
        let mut v: Vec<_> = self.map().values().cloned().collect();
        v.sort_by(|a, b| a.key.cmp(&b.key));
        v
    }

    /// The registry key and target of a client's name. `name:latest` is `name` (Ollama).
    fn target(&self, name: &str) -> Result<(String, Target), ApiError> {
        let name = name.trim();
        let name = name.strip_suffix(":latest").unwrap_or(name);
        if name.is_empty() {
            return Err(ApiError::bad_param("model", "the request names no model"));
        }
        let (base, token) = match name.rsplit_once(':') {
            Some((b, t)) => (b, Some(t.to_string())),
            None => (name, None),
        };
        if let Some(alias) = self.aliases.iter().find(|a| a.name == base) {
            return Ok((
                name.to_string(),
                Target::Alias {
                    path: alias.path.clone(),
                    token,
                },
            ));
        }
        let parsed = ModelRef::parse_hub(name).map_err(|e| {
            ApiError::model_not_found(format!(
                "model '{name}' not found: {e:#}; see GET /v1/models or /api/tags for the models served"
            ))
        })?;
        Ok((parsed.to_string(), Target::Store(parsed)))
    }

    /// Resolves and inspects a client's model name without loading it (`/api/show`).
    pub fn inspect(&self, name: &str) -> Result<(String, OpenedModel), ApiError> {
        let (key, target) = self.target(name)?;
        let opened = open_target(&target).map_err(|e| open_error(name, e))?;
        Ok((key, opened))
    }

    /// Holds `name` for one request, loading it first if needed. A model that cannot serve
    /// `purpose` is refused with a 400, before it is loaded.
    pub async fn acquire(
        self: &Arc<Self>,
        name: &str,
        keep_alive: Option<KeepAlive>,
        purpose: Purpose,
    ) -> Result<Lease, ApiError> {
        let keep_alive = keep_alive.unwrap_or(self.options.keep_alive);
        let (key, target) = self.target(name)?;
        if let Some(lease) = self.lease_loaded(&key, keep_alive) {
            check_purpose(name, &lease.model.runtime, purpose)?;
            return Ok(lease);
        }
        let _one_load = self.load_lock.lock().await;
        if let Some(lease) = self.lease_loaded(&key, keep_alive) {
            check_purpose(name, &lease.model.runtime, purpose)?;
            return Ok(lease);
        }
        let this = self.clone();
        let name_owned = name.to_string();
        let (opened, estimate, embeds) = tokio::task::spawn_blocking(move || {
            let opened = open_target(&target).map_err(|e| open_error(&name_owned, e))?;
            let embeds = opened_embeds(&opened);
            match (purpose, embeds) {
                (Purpose::Generate(what), true) => return Err(not_generative(&name_owned, what)),
                (Purpose::Embed, false) => return Err(cannot_embed(&name_owned, Some(&opened))),
                _ => {}
            }
            let estimate = if embeds {
                crate::engine::embed::memory_estimate(&opened.resolved(), &opened.metadata).ok()
            } else {
                this.estimate(&opened)
            };
            Ok::<_, ApiError>((opened, estimate, embeds))
        })
        .await
        .map_err(|e| ApiError::internal(format!("model loading task failed: {e}")))??;
        // Embedding models run on the CPU whatever the server's device: their room is RAM.
        let device = if embeds {
            Device::Cpu
        } else {
            self.device.clone()
        };
        self.make_room(name, estimate.as_ref(), &device).await?;

        let facts = ModelFacts::of(&opened);
        let resolved = opened.resolved();
        let threads = self.options.threads;
        let name_owned = name.to_string();
        let t0 = Instant::now();
        let runtime = if embeds {
            let display = name.to_string();
            let model = tokio::task::spawn_blocking(move || {
                crate::engine::threads::in_thread_pool(threads, || {
                    EmbeddingModel::load_dir(&resolved.dir, &display)
                })
            })
            .await
            .map_err(|e| ApiError::internal(format!("model loading task failed: {e}")))?
            .map_err(|e| load_error(&name_owned, e))?;
            let worker = EmbedHandle::start(
                Arc::new(model),
                self.options.threads,
                self.options.max_waiting,
            )
            .map_err(|e| ApiError::internal(format!("cannot start the embedding worker: {e:#}")))?;
            Runtime::Embed(worker)
        } else {
            let options = OpenOptions {
                device: self.options.device.clone(),
                ctx: self.options.ctx,
                activation_stats: None,
            };
            let session = tokio::task::spawn_blocking(move || {
                crate::engine::threads::in_thread_pool(threads, || {
                    session::open_resolved(resolved, &options)
                })
            })
            .await
            .map_err(|e| ApiError::internal(format!("model loading task failed: {e}")))?
            .map_err(|e| load_error(&name_owned, e))?;
            let session = Arc::new(session);
            let mut config = EngineConfig::for_sequences(self.options.parallel, session.context);
            config.max_waiting = self.options.max_waiting;
            let engine = EngineHandle::start(session, config, self.options.threads)
                .map_err(|e| ApiError::internal(format!("cannot start the engine: {e:#}")))?;
            Runtime::Generate(engine)
        };
        let model = Arc::new(LoadedModel {
            key: key.clone(),
            runtime,
            estimate,
            facts,
            load_duration: t0.elapsed(),
            usage: Mutex::new(Usage {
                active: 1,
                last_used: Instant::now(),
                expires: None,
            }),
        });
        self.map().insert(key, model.clone());
        Ok(Lease {
            model,
            keep_alive,
            loaded_now: true,
        })
    }

    fn lease_loaded(&self, key: &str, keep_alive: KeepAlive) -> Option<Lease> {
        let map = self.map();
        let model = map.get(key)?.clone();
        {
            let mut u = model.usage.lock().unwrap_or_else(|e| e.into_inner());
            u.active += 1;
            u.last_used = Instant::now();
        }
        Some(Lease {
            model,
            keep_alive,
            loaded_now: false,
        })
    }

    /// What the model will need with this server's engine settings: weights, the KV pool of
    /// `parallel` sequences, activations.
    fn estimate(&self, opened: &OpenedModel) -> Option<MemoryEstimate> {
        let resolved = opened.resolved();
        let e =
            crate::engine::memory_plan::estimate(&resolved, self.options.ctx, DEFAULT_CTX).ok()?;
        Some(MemoryEstimate::new(
            e.weights,
            e.kv_bytes_per_token,
            e.context.saturating_mul(self.options.parallel.max(1)),
            e.activations,
        ))
    }

    /// Memory the next model may use: the operator's limit less what loaded models take, or
    /// the device's free memory less KV blocks loaded models reserved but have not used yet.
    fn budget(&self, device: &Device) -> Option<u64> {
        let loaded = self.loaded();
        match self.options.memory_limit {
            Some(limit) => {
                let used: u64 = loaded
                    .iter()
                    .map(|m| m.estimate.map(|e| e.total()).unwrap_or(0))
                    .sum();
                Some(limit.saturating_sub(used))
            }
            None => {
                let free = crate::device::free_memory(device)?;
                let reserved: u64 = loaded.iter().map(|m| m.unused_kv_reservation()).sum();
                Some(free.saturating_sub(reserved))
            }
        }
    }

    /// Unloads idle models, least recently used first, until the new model fits the count and
    /// the memory plan. A model that cannot fit gets a clear error: 503 when busy models hold
    /// the room (retry later), 507 when it could never fit.
    async fn make_room(
        &self,
        name: &str,
        estimate: Option<&MemoryEstimate>,
        device: &Device,
    ) -> Result<(), ApiError> {
        loop {
            let count = self.map().len();
            let fits_memory = match (estimate, self.budget(device)) {
                (Some(e), Some(budget)) => {
                    crate::device::check_fits(&crate::device::device_label(device), e, budget)
                }
                _ => Ok(()),
            };
            let fits_count = count < self.options.max_models.max(1);
            if fits_memory.is_ok() && fits_count {
                return Ok(());
            }
            let victim = {
                let map = self.map();
                map.values()
                    .filter(|m| m.is_idle())
                    .min_by_key(|m| m.last_used())
                    .cloned()
            };
            match victim {
                Some(v) => self.unload_if_idle(&v.key).await,
                None if count > 0 => {
                    let why = match fits_memory {
                        Err(e) => format!("{e}"),
                        Ok(()) => format!("{count} models are loaded (--max-models)"),
                    };
                    return Err(ApiError::unavailable(
                        format!(
                            "cannot load '{name}' now: {why}, and every loaded model is busy; retry later"
                        ),
                        5,
                    ));
                }
                None => {
                    let mut e = ApiError::new(
                        StatusCode::INSUFFICIENT_STORAGE,
                        "insufficient_memory_error",
                        format!(
                            "model '{name}' does not fit: {}",
                            fits_memory.err().map(|e| e.to_string()).unwrap_or_default()
                        ),
                    );
                    e.code = Some("model_too_large".into());
                    e.no_retry = true;
                    return Err(e);
                }
            }
        }
    }

    /// Unloads a model now (its engine stops; running requests are cancelled).
    pub async fn unload(&self, key: &str) {
        let model = self.map().remove(key);
        if let Some(model) = model {
            let _ = tokio::task::spawn_blocking(move || model.shutdown(false)).await;
        }
    }

    /// Unloads a model unless a request took it meanwhile (checked under the map's lock, the
    /// lock leases are taken under).
    async fn unload_if_idle(&self, key: &str) {
        let model = {
            let mut map = self.map();
            match map.get(key) {
                Some(m) if m.is_idle() => map.remove(key),
                _ => None,
            }
        };
        if let Some(model) = model {
            let _ = tokio::task::spawn_blocking(move || model.shutdown(false)).await;
        }
    }

    /// Asks for `key` to be unloaded as soon as it is idle (Ollama's `keep_alive: 0`).
    pub fn expire_now(&self, name: &str) -> Result<bool, ApiError> {
        let (key, _) = self.target(name)?;
        let map = self.map();
        let Some(model) = map.get(&key) else {
            return Ok(false);
        };
        model
            .usage
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .expires = Some(Instant::now());
        Ok(true)
    }

    /// Unloads idle models whose keep-alive has run out (called every second).
    pub async fn reap(&self) {
        let now = Instant::now();
        let expired: Vec<String> = self
            .map()
            .values()
            .filter(|m| {
                let u = m.usage.lock().unwrap_or_else(|e| e.into_inner());
                u.active == 0 && u.expires.is_some_and(|e| e <= now)
            })
            .map(|m| m.key.clone())
            .collect();
        for key in expired {
            self.unload_if_idle(&key).await;
        }
    }

    /// Stops every engine: running requests finish first when `drain`, else they are cancelled.
    pub fn shutdown_all(&self, drain: bool) {
        let models: Vec<_> = self.map().drain().map(|(_, m)| m).collect();
        for m in models {
            m.shutdown(drain);
        }
    }

    /// Cancels the running work of every engine (shutdown timeout), keeping them loaded.
    pub fn cancel_all(&self) {
        for m in self.loaded() {
            m.shutdown(false);
        }
    }

    /// Removes a store model (`/api/delete`), unloading it first. Operator models are local
    /// files the server never deletes.
    pub async fn delete(&self, name: &str) -> Result<(), ApiError> {
        let (key, target) = self.target(name)?;
        let Target::Store(ModelRef::Hub { repo, .. }) = target else {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "permission_error",
                format!("'{name}' is a local model given to the server with --model; it is not in the store and is never deleted"),
            ));
        };
        let keys: Vec<String> = self
            .map()
            .keys()
            .filter(|k| **k == key || k.split(':').next() == Some(repo.as_str()))
            .cloned()
            .collect();
        for k in keys {
            self.unload(&k).await;
        }
        let store = self.store.clone();
        let removed = tokio::task::spawn_blocking(move || store.remove(&repo))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?
            .map_err(|e| ApiError::bad_request(format!("{e:#}")))?;
        match removed {
            Some(_) => Ok(()),
            None => Err(ApiError::model_not_found(format!(
                "model '{name}' not found"
            ))),
        }
    }
}

/// Whether an opened model is an embedding model (an encoder, or a decoder folder that
/// declares pooling); GGUF files are causal LMs here.
fn opened_embeds(opened: &OpenedModel) -> bool {
    opened.format == ModelFormat::Safetensors
        && opened
            .metadata
            .architecture
            .as_deref()
            .is_some_and(|a| crate::engine::embed::embeds(&opened.dir, a))
}

fn check_purpose(name: &str, runtime: &Runtime, purpose: Purpose) -> Result<(), ApiError> {
    match (purpose, runtime) {
        (Purpose::Generate(what), Runtime::Embed(_)) => Err(not_generative(name, what)),
        (Purpose::Embed, Runtime::Generate(_)) => Err(cannot_embed(name, None)),
        _ => Ok(()),
    }
}

/// A chat or generation request to an embedding-only model.
fn not_generative(name: &str, what: &str) -> ApiError {
    let mut e = ApiError::bad_param(
        "model",
        format!("\"{name}\" is an embedding model and does not support {what}; use POST /v1/embeddings or /api/embed"),
    );
    e.code = Some("model_not_generative".into());
    e
}

/// An embedding request to a model that cannot embed.
fn cannot_embed(name: &str, opened: Option<&OpenedModel>) -> ApiError {
    let why = match opened {
        Some(o) if o.format == ModelFormat::Gguf => {
            "GGUF models are served for generation only".to_string()
        }
        Some(o) => format!(
            "its architecture '{}' is a text-generation model without declared pooling (embedding models: {} encoders, or {} folders with a sentence-transformers modules.json)",
            o.metadata.architecture.as_deref().unwrap_or("?"),
            crate::arch::encoder::ENCODERS
                .iter()
                .map(|a| a.model_type)
                .collect::<Vec<_>>()
                .join("/"),
            crate::engine::embed::DECODER_EMBEDDERS.join("/"),
        ),
        None => "it is a text-generation model".to_string(),
    };
    let mut e = ApiError::bad_param(
        "model",
        format!("\"{name}\" does not support embeddings: {why}"),
    );
    e.code = Some("model_not_embedding".into());
    e
}

fn open_target(target: &Target) -> anyhow::Result<OpenedModel> {
    match target {
        Target::Alias { path, token } => {
            let reference = match token {
                Some(t) => format!("{}:{t}", path.display()),
                None => path.display().to_string(),
            };
            open_model(&reference)
        }
        Target::Store(parsed) => open_ref(parsed.clone()),
    }
}

/// A name that does not resolve: 404 when it is not there, 400 for a bad quantization token.
fn open_error(name: &str, e: anyhow::Error) -> ApiError {
    if e.chain().any(|c| c.downcast_ref::<NotFound>().is_some()) {
        ApiError::model_not_found(format!(
            "model '{name}' not found: {e:#}; pull it with POST /api/pull or `xllm pull`"
        ))
    } else if crate::store::reference::is_quant_error(&e) {
        ApiError::bad_param("model", format!("{e:#}"))
    } else {
        ApiError::internal(format!("cannot open model '{name}': {e:#}"))
    }
}

/// A load failure: the memory plan's refusal is 507 (it will not fit by retrying), the rest 500.
fn load_error(name: &str, e: anyhow::Error) -> ApiError {
    if e.chain().any(|c| {
        c.downcast_ref::<crate::device::InsufficientMemory>()
            .is_some()
    }) {
        let mut a = ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "insufficient_memory_error",
            format!("model '{name}' does not fit: {e:#}"),
        );
        a.code = Some("model_too_large".into());
        a.no_retry = true;
        return a;
    }
    if crate::store::reference::is_quant_error(&e) {
        return ApiError::bad_param("model", format!("{e:#}"));
    }
    ApiError::internal(format!("cannot load model '{name}': {e:#}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_alive_accepts_ollama_forms() {
        let p = |v: serde_json::Value| KeepAlive::parse(&v);
        assert_eq!(p("5m".into()), Ok(KeepAlive::For(Duration::from_secs(300))));
        assert_eq!(
            p("1h30m".into()),
            Ok(KeepAlive::For(Duration::from_secs(5400)))
        );
        assert_eq!(p("0".into()), Ok(KeepAlive::For(Duration::ZERO)));
        assert_eq!(
            p(serde_json::json!(10)),
            Ok(KeepAlive::For(Duration::from_secs(10)))
        );
        assert_eq!(p("-1".into()), Ok(KeepAlive::Forever));
        assert_eq!(p("-1m".into()), Ok(KeepAlive::Forever));
        assert_eq!(p(serde_json::json!(-1)), Ok(KeepAlive::Forever));
        assert!(p("5 minutes".into()).is_err());
        assert!(p(serde_json::json!(true)).is_err());
    }

    #[test]
    fn aliases_are_named_after_the_file_or_explicitly() {
        let a = Alias::parse("models/smollm2/SmolLM2.Q4_1.gguf").unwrap();
        assert_eq!(a.name, "SmolLM2.Q4_1");
        let a = Alias::parse("smol=models/smollm2/x.gguf").unwrap();
        assert_eq!(
            (a.name.as_str(), a.path.to_str().unwrap()),
            ("smol", "models/smollm2/x.gguf")
        );
        let a = Alias::parse("tests/fixtures/tiny-llama").unwrap();
        assert_eq!(a.name, "tiny-llama");
        assert!(Alias::parse("a:b=x").is_err());
    }
}
