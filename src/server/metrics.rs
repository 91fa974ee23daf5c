//! Prometheus metrics (`GET /metrics`, OpenMetrics text from the `prometheus-client` crate):
//! per model, requests running and waiting, KV blocks in use, prompt/cached/generated tokens,
//! finished requests by reason, and time-to-first-token, inter-token and end-to-end latency
//! histograms (names follow vLLM's where one exists, prefixed `xllm_`). Token timings are taken
//! on the engine thread as events leave the scheduler.

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry as PromRegistry;

use std::sync::atomic::Ordering;

use super::registry::{Registry, Runtime};
use crate::engine::request::SeqEvent;

type Labels = Vec<(&'static str, String)>;

fn model_labels(model: &str) -> Labels {
    vec![("model_name", model.to_string())]
}

fn latency_histogram() -> Histogram {
    // 1 ms .. ~65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

pub struct Metrics {
    registry: PromRegistry,
    running: Family<Labels, Gauge>,
    waiting: Family<Labels, Gauge>,
    kv_used: Family<Labels, Gauge>,
    kv_total: Family<Labels, Gauge>,
    embed_requests: Family<Labels, Gauge>,
    embed_batches: Family<Labels, Gauge>,
    embed_tokens: Family<Labels, Gauge>,
    models_loaded: Gauge,
    active_generations: Gauge,
    prompt_tokens: Family<Labels, Counter>,
    cached_prompt_tokens: Family<Labels, Counter>,
    generation_tokens: Family<Labels, Counter>,
    requests: Family<Labels, Counter>,
    rejected: Family<Labels, Counter>,
    http_requests: Family<Labels, Counter>,
    ttft: Family<Labels, Histogram>,
    itl: Family<Labels, Histogram>,
    e2e: Family<Labels, Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = PromRegistry::default();
        let m = Metrics {
            running: Family::default(),
            waiting: Family::default(),
            kv_used: Family::default(),
            kv_total: Family::default(),
            embed_requests: Family::default(),
            embed_batches: Family::default(),
            embed_tokens: Family::default(),
            models_loaded: Gauge::default(),
            active_generations: Gauge::default(),
            prompt_tokens: Family::default(),
            cached_prompt_tokens: Family::default(),
            generation_tokens: Family::default(),
            requests: Family::default(),
            rejected: Family::default(),
            http_requests: Family::default(),
            ttft: Family::new_with_constructor(latency_histogram),
            itl: Family::new_with_constructor(latency_histogram),
            e2e: Family::new_with_constructor(latency_histogram),
            registry: PromRegistry::default(),
        };
        registry.register(
            "xllm_num_requests_running",
            "Sequences in the engine's running batch",
            m.running.clone(),
        );
        registry.register(
            "xllm_num_requests_waiting",
            "Sequences waiting for a slot or KV blocks",
            m.waiting.clone(),
        );
        registry.register(
            "xllm_kv_blocks_used",
            "KV cache blocks held by sequences and the prefix cache",
            m.kv_used.clone(),
        );
        registry.register(
            "xllm_kv_blocks_total",
            "KV cache blocks in the pool",
            m.kv_total.clone(),
        );
        registry.register(
            "xllm_embedding_requests",
            "Embedding requests answered since the model loaded",
            m.embed_requests.clone(),
        );
        registry.register(
            "xllm_embedding_batches",
            "Packed embedding passes since the model loaded (each packs every request waiting at its start)",
            m.embed_batches.clone(),
        );
        registry.register(
            "xllm_embedding_tokens",
            "Tokens embedded since the model loaded",
            m.embed_tokens.clone(),
        );
        registry.register(
            "xllm_models_loaded",
            "Models loaded now",
            m.models_loaded.clone(),
        );
        registry.register(
            "xllm_active_generations",
            "HTTP requests whose generations are still open",
            m.active_generations.clone(),
        );
        registry.register(
            "xllm_prompt_tokens",
            "Prompt tokens admitted",
            m.prompt_tokens.clone(),
        );
        registry.register(
            "xllm_cached_prompt_tokens",
            "Prompt tokens reused from the prefix cache",
            m.cached_prompt_tokens.clone(),
        );
        registry.register(
            "xllm_generation_tokens",
            "Tokens generated",
            m.generation_tokens.clone(),
        );
        registry.register(
            "xllm_request_success",
            "Finished generations by finish reason",
            m.requests.clone(),
        );
        registry.register(
            "xllm_requests_rejected",
            "Requests refused because the queue was full (503)",
            m.rejected.clone(),
        );
        registry.register(
            "xllm_http_requests",
            "HTTP requests by status",
            m.http_requests.clone(),
        );
        registry.register(
            "xllm_time_to_first_token_seconds",
            "Time from submission to the first generated token",
            m.ttft.clone(),
        );
        registry.register(
            "xllm_inter_token_latency_seconds",
            "Time between generated tokens of one sequence",
            m.itl.clone(),
        );
        registry.register(
            "xllm_e2e_request_latency_seconds",
            "Time from submission to the end of a generation",
            m.e2e.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn rejected(&self, model: &str) {
        self.rejected.get_or_create(&model_labels(model)).inc();
    }

    pub fn http_request(&self, status: u16) {
        self.http_requests
            .get_or_create(&vec![("status", status.to_string())])
            .inc();
    }

    pub fn generation_opened(&self) {
        self.active_generations.inc();
    }

    pub fn generation_closed(&self) {
        self.active_generations.dec();
    }

    /// The exposition text, with the gauges read from the engines now.
    pub fn render(&self, models: &Registry) -> String {
        for f in [
            &self.running,
            &self.waiting,
            &self.kv_used,
            &self.kv_total,
            &self.embed_requests,
            &self.embed_batches,
            &self.embed_tokens,
        ] {
            f.clear();
        }
        let loaded = models.loaded();
        self.models_loaded.set(loaded.len() as i64);
        for m in &loaded {
            let l = model_labels(&m.key);
            let engine = match &m.runtime {
                Runtime::Generate(e) => e,
                Runtime::Embed(e) => {
                    let s = e.stats();
                    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as i64;
                    self.running
                        .get_or_create(&l)
                        .set(s.running.load(Ordering::Relaxed) as i64);
                    self.waiting
                        .get_or_create(&l)
                        .set(s.waiting.load(Ordering::Relaxed) as i64);
                    self.embed_requests.get_or_create(&l).set(get(&s.requests));
                    self.embed_batches.get_or_create(&l).set(get(&s.batches));
                    self.embed_tokens.get_or_create(&l).set(get(&s.tokens));
                    continue;
                }
            };
            let stats = engine.stats();
            self.running.get_or_create(&l).set(stats.running as i64);
            self.waiting.get_or_create(&l).set(stats.waiting as i64);
            self.kv_used
                .get_or_create(&l)
                .set(stats.kv_blocks_used as i64);
            self.kv_total
                .get_or_create(&l)
                .set(stats.kv_blocks_total as i64);
        }
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Records one sequence's token timings and counts as its events pass (on the engine thread).
pub struct RequestTimer {
    metrics: Arc<Metrics>,
    labels: Labels,
    submitted: Instant,
    last_token: Option<Instant>,
}

impl RequestTimer {
    pub fn new(metrics: Arc<Metrics>, model: &str, submitted: Instant) -> Self {
        Self {
            metrics,
            labels: model_labels(model),
            submitted,
            last_token: None,
        }
    }

    pub fn observe(&mut self, event: &SeqEvent) {
        let m = &self.metrics;
        match event {
            SeqEvent::Started {
                prompt_tokens,
                cached_tokens,
            } => {
                m.prompt_tokens
                    .get_or_create(&self.labels)
                    .inc_by(*prompt_tokens as u64);
                m.cached_prompt_tokens
                    .get_or_create(&self.labels)
                    .inc_by(*cached_tokens as u64);
            }
            SeqEvent::Output { tokens, .. } if !tokens.is_empty() => {
                let now = Instant::now();
                match self.last_token {
                    None => m
                        .ttft
                        .get_or_create(&self.labels)
                        .observe((now - self.submitted).as_secs_f64()),
                    Some(last) => m
                        .itl
                        .get_or_create(&self.labels)
                        .observe((now - last).as_secs_f64() / tokens.len() as f64),
                }
                self.last_token = Some(now);
                m.generation_tokens
                    .get_or_create(&self.labels)
                    .inc_by(tokens.len() as u64);
            }
            SeqEvent::Output { .. } => {}
            SeqEvent::Finished { reason, .. } => {
                let mut l = self.labels.clone();
                l.push(("finished_reason", reason.as_str().to_string()));
                m.requests.get_or_create(&l).inc();
                m.e2e
                    .get_or_create(&self.labels)
                    .observe(self.submitted.elapsed().as_secs_f64());
            }
            SeqEvent::Failed(_) => {
                let mut l = self.labels.clone();
                l.push(("finished_reason", "error".to_string()));
                m.requests.get_or_create(&l).inc();
            }
        }
    }
}
