//! Ollama's native API: `GET|HEAD /`, `/api/version`, `/api/tags`, `/api/ps`, `POST /api/show`,
//! `/api/chat`, `/api/generate`, `/api/delete` (`/api/pull` is in [`super::pull`]). Streams are
//! NDJSON and on by default; the last object carries `done: true`, `done_reason` and the
//! durations in nanoseconds. An error after streaming started is a final `{"error": …}` line.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};

use super::common::{
    chat_prompt, chat_prompt_with_tools, compile_grammar, json_response, nanos, parse_tools,
    rfc3339, stop_strings, stream_response, template_tool_calls, text_prompt, tool_name,
    SamplingFields, StopField, OLLAMA_FIELDS,
};
use super::error::{body_rejection, parse_body, ApiError};
use super::generation::Generation;
use super::registry::{KeepAlive, Lease, Purpose};
use super::{AppState, RequestId};
use crate::engine::chat_template::Message;
use crate::engine::generate::{FinishReason, GenerationStats};
use crate::engine::harmony::ReasoningEffort;
use crate::engine::request::{GenerationRequest, Output, OutputMode, SeqEvent};
use crate::engine::scheduler::Collected;
use crate::engine::session::{ChatOptions, ModelSession};
use crate::engine::structured::Grammar;
use crate::engine::tools::{ToolChoice, ToolRequest};

fn yes() -> bool {
    true
}

/// `options` keys we use (the rest, e.g. `num_thread`, are ignored like unknown fields).
#[derive(Debug, Default, Deserialize)]
struct Options {
    temperature: Option<f64>,
    top_k: Option<i64>,
    top_p: Option<f64>,
    min_p: Option<f64>,
    repeat_penalty: Option<f32>,
    repeat_last_n: Option<i64>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    seed: Option<i64>,
    num_predict: Option<i64>,
    num_ctx: Option<i64>,
    stop: Option<StopField>,
}

/// Fields `/api/chat` and `/api/generate` share.
#[derive(Debug, Deserialize)]
struct CommonFields {
    #[serde(alias = "name")]
    model: String,
    #[serde(default = "yes")]
    stream: bool,
    options: Option<Options>,
    keep_alive: Option<Value>,
    think: Option<Value>,
    format: Option<Value>,
}

impl CommonFields {
    fn keep_alive(&self) -> Result<Option<KeepAlive>, ApiError> {
        self.keep_alive
            .as_ref()
            .filter(|v| !v.is_null())
            .map(|v| KeepAlive::parse(v).map_err(|e| ApiError::bad_param("keep_alive", e)))
            .transpose()
    }

    /// `format`: `"json"` (any JSON object) or a JSON Schema object.
    fn grammar(&self) -> Result<Option<Grammar>, ApiError> {
        match &self.format {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) if s == "json" => Ok(Some(Grammar::JsonObject)),
            Some(schema @ Value::Object(_)) => Ok(Some(Grammar::JsonSchema(schema.clone()))),
            Some(_) => Err(ApiError::bad_param(
                "format",
                "format must be \"json\" or a JSON Schema object",
            )),
        }
    }

    /// `think`: `true`/`false`, or `"low"|"medium"|"high"` (gpt-oss reasoning effort). Returns
    /// whether reasoning is shown, the effort (gpt-oss) and the template's `enable_thinking`
    /// (`<think>` models: `false` turns reasoning off; `None` keeps the template's default).
    fn think(
        &self,
        session: &ModelSession,
    ) -> Result<(bool, ReasoningEffort, Option<bool>), ApiError> {
        let harmony = session.output_mode() == OutputMode::Harmony;
        let (wanted, effort) = match &self.think {
            None | Some(Value::Null) => (None, ReasoningEffort::Medium),
            Some(Value::Bool(b)) => (Some(*b), ReasoningEffort::Medium),
            Some(Value::String(s)) => match s.as_str() {
                "low" => (Some(true), ReasoningEffort::Low),
                "medium" => (Some(true), ReasoningEffort::Medium),
                "high" => (Some(true), ReasoningEffort::High),
                other => {
                    return Err(ApiError::bad_param(
                        "think",
                        format!(
                        "think must be true, false, \"low\", \"medium\" or \"high\", got '{other}'"
                    ),
                    ))
                }
            },
            Some(_) => {
                return Err(ApiError::bad_param(
                    "think",
                    "think must be a boolean or a level",
                ))
            }
        };
        if wanted == Some(true) && !session.can_think() {
            return Err(ApiError::bad_param(
                "think",
                format!("\"{}\" does not support thinking", self.model),
            ));
        }
        if session.think.is_some() {
            // `<think>` models reason unless told not to; `think: false` turns it off.
            return Ok((wanted.unwrap_or(true), effort, wanted));
        }
        // gpt-oss always reasons; `think: false` only hides it.
        Ok((wanted.unwrap_or(harmony), effort, None))
    }

    fn request(
        &self,
        session: &ModelSession,
        prompt: Vec<u32>,
    ) -> Result<GenerationRequest, ApiError> {
        let default = Options::default();
        let o = self.options.as_ref().unwrap_or(&default);
        let fields = SamplingFields {
            temperature: o.temperature,
            top_p: o.top_p,
            top_k: o.top_k,
            min_p: o.min_p,
            repeat_penalty: o.repeat_penalty,
            repeat_last_n: o.repeat_last_n,
            presence_penalty: o.presence_penalty,
            frequency_penalty: o.frequency_penalty,
            seed: o.seed,
        };
        let sampling = fields.params(&session.loaded.sampling, &OLLAMA_FIELDS, 0)?;
        let mut r = GenerationRequest::new(prompt, sampling);
        r.max_tokens = match o.num_predict {
            None | Some(-1) | Some(-2) => None,
            Some(n) if n > 0 => Some(n as usize),
            Some(n) => {
                return Err(ApiError::bad_param(
                    "options.num_predict",
                    format!("num_predict must be positive, or -1 for no limit; got {n}"),
                ))
            }
        };
        r.context_limit = match o.num_ctx {
            None => None,
            Some(n) if n > 0 => Some(n as usize),
            Some(n) => {
                return Err(ApiError::bad_param(
                    "options.num_ctx",
                    format!("num_ctx must be positive, got {n}"),
                ))
            }
        };
        r.stop_strings = stop_strings(o.stop.clone())?;
        r.output = session.output_mode_for(&r.prompt);
        Ok(r)
    }
}

#[derive(Debug, Deserialize)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: String,
    #[serde(default)]
    images: Vec<Value>,
    tool_calls: Option<Vec<Value>>,
    tool_name: Option<String>,
    tool_call_id: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    #[serde(default)]
    messages: Vec<ChatMessage>,
    tools: Option<Vec<Value>>,
    #[serde(flatten)]
    common: CommonFields,
}

#[derive(Debug, Deserialize)]
struct GenerateRequest {
    #[serde(default)]
    prompt: String,
    system: Option<String>,
    suffix: Option<String>,
    #[serde(default)]
    raw: bool,
    #[serde(default)]
    images: Vec<Value>,
    context: Option<Vec<u32>>,
    #[serde(flatten)]
    common: CommonFields,
}

pub async fn root() -> Response {
    (StatusCode::OK, "Ollama is running").into_response()
}

pub async fn version() -> Response {
    json_response(
        StatusCode::OK,
        &json!({"version": env!("CARGO_PKG_VERSION")}),
    )
}

pub async fn chat(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let t0 = Instant::now();
    match chat_inner(state, request_id, body, t0).await {
        Ok(r) => r,
        Err(e) => e.ollama(),
    }
}

async fn chat_inner(
    state: Arc<AppState>,
    request_id: RequestId,
    body: Result<Bytes, BytesRejection>,
    t0: Instant,
) -> Result<Response, ApiError> {
    let body = body.map_err(|r| body_rejection(r, state.body_limit))?;
    let req: ChatRequest = parse_body(&body)?;
    let keep_alive = req.common.keep_alive()?;
    let grammar = req.common.grammar()?;
    let tools = match req.tools.as_deref() {
        Some(list) if !list.is_empty() => {
            let tools = ToolRequest {
                tools: parse_tools(list)?,
                choice: ToolChoice::Auto,
                parallel: true,
            };
            tools
                .validate()
                .map_err(|e| ApiError::bad_param("tools", e))?;
            Some(tools)
        }
        _ => None,
    };
    let mut messages = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.into_iter().enumerate() {
        if !m.images.is_empty() {
            return Err(ApiError::bad_param(
                &format!("messages[{i}].images"),
                "images are not supported (text models only)",
            ));
        }
        let role = match m.role.as_str() {
            "system" | "user" | "assistant" | "tool" => m.role.clone(),
            other => {
                return Err(ApiError::bad_param(
                    &format!("messages[{i}].role"),
                    format!("unknown role '{other}' (expected system, user, assistant or tool)"),
                ))
            }
        };
        let mut message = Message::new(&role, m.content);
        message.tool_calls = m
            .tool_calls
            .filter(|c| !c.is_empty())
            .map(|c| template_tool_calls(&c));
        message.name = m.tool_name;
        message.tool_call_id = m.tool_call_id;
        messages.push(message);
    }
    if messages.is_empty() {
        return load_or_unload(&state, &req.common, keep_alive, Kind::Chat).await;
    }
    let lease = state
        .registry
        .acquire(&req.common.model, keep_alive, Purpose::Generate("chat"))
        .await?;
    let session = lease.model.session()?.clone();
    let (show_thinking, effort, thinking) = req.common.think(&session)?;
    let prompt = chat_prompt_with_tools(
        &session,
        &messages,
        ChatOptions {
            raw: false,
            reasoning_effort: effort,
            thinking,
        },
        tools.as_ref(),
    )?;
    let mut request = req.common.request(&session, prompt.clone())?;
    if let Some(g) = grammar {
        request.constraint = Some(compile_grammar(&session, g, "format").await?);
    }
    if tools.is_some() {
        request.tool_calls = Some(session.tool_syntax());
    }
    run(
        state,
        request_id,
        lease,
        request,
        req.common,
        Kind::Chat,
        show_thinking,
        prompt,
        t0,
    )
    .await
}

pub async fn generate(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let t0 = Instant::now();
    match generate_inner(state, request_id, body, t0).await {
        Ok(r) => r,
        Err(e) => e.ollama(),
    }
}

async fn generate_inner(
    state: Arc<AppState>,
    request_id: RequestId,
    body: Result<Bytes, BytesRejection>,
    t0: Instant,
) -> Result<Response, ApiError> {
    let body = body.map_err(|r| body_rejection(r, state.body_limit))?;
    let req: GenerateRequest = parse_body(&body)?;
    let keep_alive = req.common.keep_alive()?;
    let grammar = req.common.grammar()?;
    if !req.images.is_empty() {
        return Err(ApiError::bad_param(
            "images",
            "images are not supported (text models only)",
        ));
    }
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::bad_param(
            "suffix",
            "suffix (fill-in-the-middle) is not supported",
        ));
    }
    if req.prompt.is_empty() {
        return load_or_unload(&state, &req.common, keep_alive, Kind::Generate).await;
    }
    let lease = state
        .registry
        .acquire(&req.common.model, keep_alive, Purpose::Generate("generate"))
        .await?;
    let session = lease.model.session()?.clone();
    let (show_thinking, effort, thinking) = req.common.think(&session)?;
    let mut prompt = if req.raw {
        text_prompt(&session, &req.prompt)?
    } else {
        let mut messages = Vec::new();
        if let Some(s) = &req.system {
            messages.push(Message::new("system", s.clone()));
        }
        messages.push(Message::new("user", req.prompt.clone()));
        chat_prompt(
            &session,
            &messages,
            ChatOptions {
                raw: false,
                reasoning_effort: effort,
                thinking,
            },
        )?
    };
    if let Some(context) = req.context.filter(|c| !c.is_empty()) {
        // The tokens of the earlier exchange (the deprecated `context`) come first.
        prompt = context.into_iter().chain(prompt).collect();
    }
    let mut request = req.common.request(&session, prompt.clone())?;
    if let Some(g) = grammar {
        request.constraint = Some(compile_grammar(&session, g, "format").await?);
    }
    run(
        state,
        request_id,
        lease,
        request,
        req.common,
        Kind::Generate,
        show_thinking,
        prompt,
        t0,
    )
    .await
}

/// An empty prompt loads the model (`done_reason: "load"`); with `keep_alive: 0` it unloads it.
async fn load_or_unload(
    state: &Arc<AppState>,
    common: &CommonFields,
    keep_alive: Option<KeepAlive>,
    kind: Kind,
) -> Result<Response, ApiError> {
    let reason = if keep_alive == Some(KeepAlive::For(Duration::ZERO)) {
        state.registry.expire_now(&common.model)?;
        state.registry.reap().await;
        "unload"
    } else {
        let purpose = match kind {
            Kind::Chat => Purpose::Generate("chat"),
            Kind::Generate => Purpose::Generate("generate"),
        };
        drop(
            state
                .registry
                .acquire(&common.model, keep_alive, purpose)
                .await?,
        );
        "load"
    };
    let mut v = json!({
        "model": common.model,
        "created_at": rfc3339(SystemTime::now()),
        "done": true,
        "done_reason": reason,
    });
    match kind {
        Kind::Chat => v["message"] = json!({"role": "assistant", "content": ""}),
        Kind::Generate => v["response"] = "".into(),
    }
    Ok(json_response(StatusCode::OK, &v))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Generate,
}

#[allow(clippy::too_many_arguments)]
async fn run(
    state: Arc<AppState>,
    request_id: RequestId,
    lease: Lease,
    request: GenerationRequest,
    common: CommonFields,
    kind: Kind,
    show_thinking: bool,
    prompt: Vec<u32>,
    t0: Instant,
) -> Result<Response, ApiError> {
    let load = if lease.loaded_now {
        lease.model.load_duration
    } else {
        Duration::ZERO
    };
    let generation = Generation::submit(lease, vec![request], &state.metrics)?;
    let mut s = NdjsonStream {
        generation,
        model: common.model.clone(),
        kind,
        show_thinking,
        t0,
        load,
        tokens: prompt,
        queue: VecDeque::new(),
        done: false,
        request_id,
        calls: 0,
    };
    if common.stream {
        return Ok(stream_response("application/x-ndjson", s.into_stream()));
    }
    // One object: everything the stream would have said, merged.
    let mut collected = Collected::default();
    while let Some((_, event)) = s.generation.next().await {
        collected.push(event);
    }
    if let Some(e) = collected.error {
        return Err(ApiError::internal(format!("generation failed: {e}")));
    }
    let reason = match collected.finish {
        Some(FinishReason::Cancelled) | None => {
            return Err(ApiError::unavailable(
                "the request was cancelled (the server is shutting down)",
                5,
            ))
        }
        Some(r) => r,
    };
    s.tokens.extend(&collected.tokens);
    let mut v = s.base();
    match kind {
        Kind::Chat => {
            let mut message = json!({"role": "assistant", "content": collected.text});
            if show_thinking && !collected.reasoning.is_empty() {
                message["thinking"] = collected.reasoning.clone().into();
            }
            if !collected.tool_calls.is_empty() {
                message["tool_calls"] = collected
                    .tool_calls
                    .iter()
                    .enumerate()
                    .map(|(i, (n, a))| tool_call(i, n, a))
                    .collect::<Vec<_>>()
                    .into();
            }
            v["message"] = message;
        }
        Kind::Generate => {
            v["response"] = collected.text.clone().into();
            if show_thinking && !collected.reasoning.is_empty() {
                v["thinking"] = collected.reasoning.clone().into();
            }
        }
    }
    s.finish_fields(&mut v, reason, &collected.stats);
    super::log_generation(
        &s.request_id,
        &s.model,
        collected.stats.prompt_tokens,
        collected.stats.eval_count,
        s.t0.elapsed(),
    );
    Ok(json_response(StatusCode::OK, &v))
}

/// A tool call as Ollama sends it: arguments as a JSON object.
fn tool_call(index: usize, recipient: &str, arguments: &str) -> Value {
    let args: Value =
        serde_json::from_str(arguments).unwrap_or_else(|_| Value::String(arguments.into()));
    json!({"function": {"index": index, "name": tool_name(recipient), "arguments": args}})
}

fn done_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length | FinishReason::ContextFull => "length",
        _ => "stop",
    }
}

struct NdjsonStream {
    generation: Generation,
    model: String,
    kind: Kind,
    show_thinking: bool,
    t0: Instant,
    load: Duration,
    /// Prompt, then generated tokens (`/api/generate`'s `context`).
    tokens: Vec<u32>,
    queue: VecDeque<Bytes>,
    done: bool,
    request_id: RequestId,
    /// Tool calls sent so far (their `index`).
    calls: usize,
}

impl NdjsonStream {
    fn base(&self) -> Value {
        json!({"model": self.model, "created_at": rfc3339(SystemTime::now())})
    }

    fn line(&mut self, value: &Value) {
        self.queue.push_back(Bytes::from(format!("{value}\n")));
    }

    fn finish_fields(&self, v: &mut Value, reason: FinishReason, stats: &GenerationStats) {
        v["done"] = true.into();
        v["done_reason"] = done_reason(reason).into();
        v["total_duration"] = nanos(self.t0.elapsed()).into();
        v["load_duration"] = nanos(self.load).into();
        v["prompt_eval_count"] = stats.prompt_tokens.into();
        v["prompt_eval_duration"] = nanos(stats.prompt_eval_duration).into();
        v["eval_count"] = stats.eval_count.into();
        v["eval_duration"] = nanos(stats.eval_duration).into();
        if self.kind == Kind::Generate {
            v["context"] = self.tokens.clone().into();
        }
    }

    fn piece(&mut self, content: &str, thinking: Option<&str>, tool_calls: Option<Value>) {
        let mut v = self.base();
        match self.kind {
            Kind::Chat => {
                let mut m = json!({"role": "assistant", "content": content});
                if let Some(t) = thinking {
                    m["thinking"] = t.into();
                }
                if let Some(calls) = tool_calls {
                    m["tool_calls"] = calls;
                }
                v["message"] = m;
            }
            Kind::Generate => {
                v["response"] = content.into();
                if let Some(t) = thinking {
                    v["thinking"] = t.into();
                }
            }
        }
        v["done"] = false.into();
        self.line(&v);
    }

    fn into_stream(self) -> impl futures_util::Stream<Item = Bytes> + Send + 'static {
        futures_util::stream::unfold(self, |mut s| async move {
            loop {
                if let Some(b) = s.queue.pop_front() {
                    return Some((b, s));
                }
                if s.done {
                    return None;
                }
                s.advance().await;
            }
        })
    }

    async fn advance(&mut self) {
        let Some((_, event)) = self.generation.next().await else {
            self.done = true;
            return;
        };
        match event {
            SeqEvent::Started { .. } => {}
            SeqEvent::Output {
                outputs, tokens, ..
            } => {
                self.tokens.extend(tokens);
                for output in outputs {
                    match output {
                        Output::Text(t) => self.piece(&t, None, None),
                        Output::Reasoning(t) if self.show_thinking => {
                            self.piece("", Some(&t), None)
                        }
                        Output::Reasoning(_) => {}
                        Output::ToolCall { name, arguments } => {
                            let call = tool_call(self.calls, &name, &arguments);
                            self.calls += 1;
                            if self.kind == Kind::Chat {
                                self.piece("", None, Some(json!([call])));
                            }
                        }
                    }
                }
            }
            SeqEvent::Finished { reason, stats } => {
                if reason == FinishReason::Cancelled {
                    self.line(&json!({"error": "the request was cancelled (the server is shutting down)"}));
                } else {
                    let mut v = self.base();
                    match self.kind {
                        Kind::Chat => v["message"] = json!({"role": "assistant", "content": ""}),
                        Kind::Generate => v["response"] = "".into(),
                    }
                    self.finish_fields(&mut v, reason, &stats);
                    self.line(&v);
                }
                super::log_generation(
                    &self.request_id,
                    &self.model,
                    stats.prompt_tokens,
                    stats.eval_count,
                    self.t0.elapsed(),
                );
            }
            SeqEvent::Failed(message) => {
                self.line(&json!({"error": format!("generation failed: {message}")}));
            }
        }
    }
}

#[derive(Debug, Deserialize)]
struct ModelField {
    #[serde(alias = "name")]
    model: String,
}

/// Ollama's `details` object.
pub fn details(facts: &super::registry::ModelFacts) -> Value {
    let family = facts.metadata.architecture.clone().unwrap_or_default();
    json!({
        "parent_model": "",
        "format": crate::store::resolve::format_name(facts.format),
        "family": family,
        "families": [family],
        "parameter_size": facts.metadata.parameters.map(parameter_size).unwrap_or_default(),
        "quantization_level": facts.metadata.quantization,
    })
}

/// `134515008` → `"134.52M"`, as Ollama writes sizes.
fn parameter_size(n: u64) -> String {
    let (value, unit) = if n >= 1_000_000_000 {
        (n as f64 / 1e9, "B")
    } else if n >= 1_000_000 {
        (n as f64 / 1e6, "M")
    } else {
        (n as f64 / 1e3, "K")
    };
    let text = format!("{value:.2}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("{text}{unit}")
}

pub async fn tags(State(state): State<Arc<AppState>>) -> Response {
    match super::models_served(&state.registry).await {
        Ok(models) => {
            let list: Vec<Value> = models
                .iter()
                .filter_map(|m| {
                    let f = m.facts.as_ref()?;
                    Some(json!({
                        "name": m.name,
                        "model": m.name,
                        "modified_at": rfc3339(f.modified),
                        "size": f.size,
                        "digest": f.digest,
                        "details": details(f),
                    }))
                })
                .collect();
            json_response(StatusCode::OK, &json!({"models": list}))
        }
        Err(e) => e.ollama(),
    }
}

pub async fn ps(State(state): State<Arc<AppState>>) -> Response {
    let models: Vec<Value> = state
        .registry
        .loaded()
        .iter()
        .map(|m| {
            // Forever: Ollama shows a date far in the future.
            let expires = m
                .expires_at()
                .unwrap_or_else(|| SystemTime::now() + Duration::from_secs(100 * 365 * 86400));
            json!({
                "name": m.key,
                "model": m.key,
                "size": m.estimate.map(|e| e.total()).unwrap_or(m.facts.size),
                "digest": m.facts.digest,
                "details": details(&m.facts),
                "expires_at": rfc3339(expires),
                "size_vram": 0,
                "context_length": m.context_length(),
            })
        })
        .collect();
    json_response(StatusCode::OK, &json!({"models": models}))
}

/// The chat template shipped with a model (for `/api/show`).
fn template_source(facts: &super::registry::ModelFacts) -> String {
    if let Ok(t) = std::fs::read_to_string(facts.dir.join("chat_template.jinja")) {
        return t;
    }
    if let Some(gguf) = &facts.gguf_file {
        if let Ok(file) = crate::model::gguf::GgufFile::open(gguf) {
            if let Some(t) = file.get_str("tokenizer.chat_template") {
                return t.to_string();
            }
        }
    }
    std::fs::read_to_string(facts.dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| {
            v.get("chat_template")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or_default()
}

pub async fn show(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let body = body.map_err(|r| body_rejection(r, state.body_limit))?;
        let req: ModelField = parse_body(&body)?;
        let registry = state.registry.clone();
        let name = req.model.clone();
        let (key, opened) = tokio::task::spawn_blocking(move || registry.inspect(&name))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))??;
        let facts = super::registry::ModelFacts::of(&opened);
        let meta = &facts.metadata;
        let arch = meta.architecture.clone().unwrap_or_default();
        let mut info = serde_json::Map::new();
        info.insert("general.architecture".into(), arch.clone().into());
        if let Some(p) = meta.parameters {
            info.insert("general.parameter_count".into(), p.into());
        }
        for (k, v) in [
            ("context_length", meta.context_length),
            ("embedding_length", meta.embedding_length),
            ("block_count", meta.layers),
            ("attention.head_count", meta.attention_heads),
            ("attention.head_count_kv", meta.kv_heads),
            ("expert_count", meta.experts),
            ("expert_used_count", meta.experts_active),
        ] {
            if let Some(v) = v {
                info.insert(format!("{arch}.{k}"), v.into());
            }
        }
        let arch_name = arch.replace('-', "_");
        let embeds = facts.format == crate::store::ModelFormat::Safetensors
            && crate::engine::embed::embeds(&facts.dir, &arch);
        // Every chat model takes tools: through its template, or the generic tool prompt.
        let mut capabilities = if embeds {
            vec!["embedding"]
        } else {
            vec!["completion", "tools"]
        };
        if !embeds && (arch_name == "gpt_oss" || arch_name == "nemotron_h") {
            capabilities.push("thinking");
        }
        let template = {
            let f = facts.clone();
            tokio::task::spawn_blocking(move || template_source(&f))
                .await
                .unwrap_or_default()
        };
        Ok::<_, ApiError>(json_response(
            StatusCode::OK,
            &json!({
                "license": "",
                "modelfile": format!("# Served by xllm\nFROM {key}\n"),
                "parameters": "",
                "template": template,
                "details": details(&facts),
                "model_info": info,
                "capabilities": capabilities,
                "modified_at": rfc3339(facts.modified),
            }),
        ))
    }
    .await;
    result.unwrap_or_else(ApiError::ollama)
}

pub async fn delete(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let body = body.map_err(|r| body_rejection(r, state.body_limit))?;
        let req: ModelField = parse_body(&body)?;
        state.registry.delete(&req.model).await?;
        Ok::<_, ApiError>(StatusCode::OK.into_response())
    }
    .await;
    result.unwrap_or_else(ApiError::ollama)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_sizes_read_like_ollamas() {
        assert_eq!(parameter_size(134_515_008), "134.52M");
        assert_eq!(parameter_size(20_914_757_184), "20.91B");
        assert_eq!(parameter_size(7_000_000_000), "7B");
        assert_eq!(parameter_size(70_000), "70K");
    }
}
