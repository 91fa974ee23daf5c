//! The OpenAI API: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`.
//! Streams are SSE as the official client parses them: a role-only first delta (sent with the
//! first output, so time to first token is not understated), one `data:` line per chunk, the
//! finish reason in an empty delta, an optional usage chunk with no choices, then
//! `data: [DONE]`. Unknown request fields are ignored; the engine extensions benchmarks use
//! (`ignore_eos`, `min_tokens`, `top_k`, `min_p`, `repetition_penalty`) are accepted.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Extension;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};

use super::common::{
    compile_grammar, json_response, new_id, parse_tools, stop_strings, stream_response,
    template_tool_calls, text_prompt, token_text, tool_name, unix_seconds, SamplingFields,
    StopField, OPENAI_FIELDS,
};
use super::error::{body_rejection, parse_body, ApiError};
use super::generation::Generation;
use super::registry::Purpose;
use super::{AppState, RequestId};
use crate::engine::chat_template::Message;
use crate::engine::generate::FinishReason;
use crate::engine::harmony::ReasoningEffort;
use crate::engine::request::{GenerationRequest, Output, SeqEvent, TokenLogprob};
use crate::engine::scheduler::Collected;
use crate::engine::session::{ChatOptions, ModelSession};
use crate::engine::structured::Grammar;
use crate::engine::tools::{ToolChoice, ToolRequest};

/// How often an idle stream gets an SSE comment (keeps proxies open, notices gone clients).
const PING: Duration = Duration::from_secs(5);

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Fields both OpenAI generation routes accept.
#[derive(Debug, Deserialize)]
struct CommonFields {
    model: String,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    min_p: Option<f64>,
    repetition_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    stop: Option<StopField>,
    seed: Option<i64>,
    n: Option<i64>,
    ignore_eos: Option<bool>,
    min_tokens: Option<i64>,
}

impl CommonFields {
    fn sampling(&self) -> SamplingFields {
        SamplingFields {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            repeat_penalty: self.repetition_penalty,
            repeat_last_n: None,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed: self.seed,
        }
    }

    fn n(&self) -> Result<usize, ApiError> {
        match self.n {
            None => Ok(1),
            Some(n) if (1..=16).contains(&n) => Ok(n as usize),
            Some(n) => Err(ApiError::bad_param(
                "n",
                format!("n must be between 1 and 16, got {n}"),
            )),
        }
    }

    fn max_tokens(&self, default: Option<usize>) -> Result<Option<usize>, ApiError> {
        let (name, value) = match (self.max_completion_tokens, self.max_tokens) {
            (Some(v), _) => ("max_completion_tokens", v),
            (None, Some(v)) => ("max_tokens", v),
            (None, None) => return Ok(default),
        };
        if value < 1 {
            return Err(ApiError::bad_param(
                name,
                format!("{name} must be at least 1, got {value}"),
            ));
        }
        Ok(Some(value as usize))
    }

    /// One engine request per choice for `prompt`.
    fn requests(
        &self,
        session: &ModelSession,
        prompt: &[u32],
        default_max: Option<usize>,
        logprobs: Option<usize>,
        choices: usize,
        first_choice: usize,
    ) -> Result<Vec<GenerationRequest>, ApiError> {
        let max_tokens = self.max_tokens(default_max)?;
        let min_tokens = match self.min_tokens {
            None => 0,
            Some(v) if v >= 0 => v as usize,
            Some(_) => {
                return Err(ApiError::bad_param(
                    "min_tokens",
                    "min_tokens must be 0 or more",
                ))
            }
        };
        let stops = stop_strings(self.stop.clone())?;
        let fields = self.sampling();
        (0..choices)
            .map(|i| {
                let sampling =
                    fields.params(&session.loaded.sampling, &OPENAI_FIELDS, first_choice + i)?;
                let mut r = GenerationRequest::new(prompt.to_vec(), sampling);
                r.max_tokens = max_tokens;
                r.min_tokens = min_tokens;
                r.ignore_eos = self.ignore_eos.unwrap_or(false);
                r.stop_strings = stops.clone();
                r.logprobs = logprobs;
                r.output = session.output_mode_for(prompt);
                Ok(r)
            })
            .collect()
    }

    fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ChatMessage {
    role: String,
    content: Option<Content>,
    tool_calls: Option<Vec<Value>>,
    tool_call_id: Option<String>,
    name: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    messages: Vec<ChatMessage>,
    #[serde(flatten)]
    common: CommonFields,
    logprobs: Option<bool>,
    top_logprobs: Option<i64>,
    reasoning_effort: Option<String>,
    response_format: Option<Value>,
    tools: Option<Vec<Value>>,
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<bool>,
}

/// OpenAI messages as the chat template sees them.
fn messages(input: Vec<ChatMessage>) -> Result<Vec<Message>, ApiError> {
    input
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                "tool" | "function" => "tool",
                other => {
                    return Err(ApiError::bad_param(
                        &format!("messages[{i}].role"),
                        format!("unknown role '{other}' (expected system, developer, user, assistant or tool)"),
                    ))
                }
            };
            let content = match m.content {
                None => String::new(),
                Some(Content::Text(t)) => t,
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for p in parts {
                        if p.kind != "text" {
                            return Err(ApiError::bad_param(
                                &format!("messages[{i}].content"),
                                format!("content parts of type '{}' are not supported (text only)", p.kind),
                            ));
                        }
                        text.push_str(p.text.as_deref().unwrap_or(""));
                    }
                    text
                }
            };
            let mut message = Message::new(role, content);
            message.tool_calls = m
                .tool_calls
                .filter(|c| !c.is_empty())
                .map(|c| template_tool_calls(&c));
            message.tool_call_id = m.tool_call_id;
            message.name = m.name;
            Ok(message)
        })
        .collect()
}

/// `tool_choice`: `"none"`, `"auto"`, `"required"` or `{"type": "function", "function":
/// {"name"}}`; the default is `auto` with tools and `none` without.
fn tool_request(
    tools: Option<&[Value]>,
    choice: Option<&Value>,
    parallel: Option<bool>,
) -> Result<Option<ToolRequest>, ApiError> {
    let tools = parse_tools(tools.unwrap_or(&[]))?;
    let bad = || {
        ApiError::bad_param(
            "tool_choice",
            "tool_choice must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}",
        )
    };
    let choice = match choice {
        None | Some(Value::Null) if tools.is_empty() => return Ok(None),
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            _ => return Err(bad()),
        },
        Some(v) => ToolChoice::Named(
            v.pointer("/function/name")
                .and_then(Value::as_str)
                .ok_or_else(bad)?
                .to_string(),
        ),
    };
    let request = ToolRequest {
        tools,
        choice,
        parallel: parallel.unwrap_or(true),
    };
    request
        .validate()
        .map_err(|e| ApiError::bad_param("tool_choice", e))?;
    Ok(Some(request))
}

/// `reasoning_effort`: gpt-oss's level, and for `<think>` models (Nemotron) whether to reason
/// at all (`"none"` turns it off; any level turns it on; absent: the template's default).
fn reasoning_effort(value: Option<&str>) -> Result<(ReasoningEffort, Option<bool>), ApiError> {
    match value {
        None => Ok((ReasoningEffort::Medium, None)),
        Some("medium") => Ok((ReasoningEffort::Medium, Some(true))),
        Some("low" | "minimal") => Ok((ReasoningEffort::Low, Some(true))),
        Some("high") => Ok((ReasoningEffort::High, Some(true))),
        Some("none") => Ok((ReasoningEffort::Low, Some(false))),
        Some(other) => Err(ApiError::bad_param(
            "reasoning_effort",
            format!("reasoning_effort must be none, low, medium or high, got '{other}'"),
        )),
    }
}

/// `response_format`: `text`, `json_object`, or `json_schema` with `{name, schema, strict}`.
fn response_format(value: Option<&Value>) -> Result<Option<Grammar>, ApiError> {
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let bad = |m: &str| ApiError::bad_param("response_format", m.to_string());
    match value.get("type").and_then(Value::as_str) {
        None => Err(bad("response_format needs a 'type'")),
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Grammar::JsonObject)),
        Some("json_schema") => {
            let spec = value
                .get("json_schema")
                .filter(|v| v.is_object())
                .ok_or_else(|| bad("response_format json_schema needs a 'json_schema' object"))?;
            match spec.get("schema") {
                None | Some(Value::Null) => Ok(Some(Grammar::JsonObject)),
                Some(schema @ (Value::Object(_) | Value::Bool(_))) => {
                    Ok(Some(Grammar::JsonSchema(schema.clone())))
                }
                Some(_) => Err(bad(
                    "response_format json_schema.schema must be a JSON Schema object",
                )),
            }
        }
        Some(other) => Err(bad(&format!(
            "response_format type '{other}' is not supported (text, json_object, json_schema)"
        ))),
    }
}

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match chat_inner(state, request_id, body).await {
        Ok(r) => r,
        Err(e) => e.openai(),
    }
}

async fn chat_inner(
    state: Arc<AppState>,
    request_id: RequestId,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|r| body_rejection(r, state.body_limit))?;
    let req: ChatRequest = parse_body(&body)?;
    let n = req.common.n()?;
    let grammar = response_format(req.response_format.as_ref())?;
    let tools = tool_request(
        req.tools.as_deref(),
        req.tool_choice.as_ref(),
        req.parallel_tool_calls,
    )?;
    if grammar.is_some()
        && tools
            .as_ref()
            .is_some_and(|t| matches!(t.choice, ToolChoice::Required | ToolChoice::Named(_)))
    {
        return Err(ApiError::bad_param(
            "response_format",
            "response_format cannot be combined with a required or named tool_choice",
        ));
    }
    let top = match (req.logprobs.unwrap_or(false), req.top_logprobs) {
        (false, Some(t)) if t > 0 => {
            return Err(ApiError::bad_param(
                "top_logprobs",
                "top_logprobs needs logprobs: true",
            ))
        }
        (_, Some(t)) if !(0..=20).contains(&t) => {
            return Err(ApiError::bad_param(
                "top_logprobs",
                "top_logprobs must be between 0 and 20",
            ))
        }
        (true, t) => Some(t.unwrap_or(0) as usize),
        (false, _) => None,
    };
    let (effort, thinking) = reasoning_effort(req.reasoning_effort.as_deref())?;
    let msgs = messages(req.messages)?;
    // Parameters are checked before a model is loaded for them.
    req.common.max_tokens(None)?;
    stop_strings(req.common.stop.clone())?;
    let lease = state
        .registry
        .acquire(
            &req.common.model,
            None,
            Purpose::Generate("chat completions"),
        )
        .await?;
    let session = lease.model.session()?.clone();
    let prompt = super::common::chat_prompt_with_tools(
        &session,
        &msgs,
        ChatOptions {
            raw: false,
            reasoning_effort: effort,
            thinking,
        },
        tools.as_ref(),
    )?;
    let constraint = match (&grammar, &tools) {
        (Some(g), _) => Some(compile_grammar(&session, g.clone(), "response_format").await?),
        (None, Some(t)) => tool_constraint(&session, t).await?,
        (None, None) => None,
    };
    let syntax = tools
        .as_ref()
        .filter(|t| t.choice != ToolChoice::None)
        .map(|_| session.tool_syntax());
    let mut requests = req.common.requests(&session, &prompt, None, top, n, 0)?;
    for r in &mut requests {
        r.constraint = constraint.clone();
        r.tool_calls = syntax;
    }
    let generation = Generation::submit(lease, requests, &state.metrics)?;
    let meta = ReplyMeta {
        id: new_id("chatcmpl-"),
        created: unix_seconds(),
        model: req.common.model.clone(),
        request_id,
        logprobs: top.is_some(),
    };
    if req.common.stream {
        let stream = SseStream::new(generation, meta, Kind::Chat, req.common.include_usage(), n);
        return Ok(stream_response("text/event-stream", stream.into_stream()));
    }
    let prompt_tokens = prompt.len();
    let collected = generation.collect().await?;
    let choices: Vec<Value> = collected
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let tool_calls: Vec<Value> = c
                .tool_calls
                .iter()
                .map(|(name, args)| tool_call_json(None, name, args))
                .collect();
            let mut message = json!({
                "role": "assistant",
                "content": if c.text.is_empty() && !tool_calls.is_empty() { Value::Null } else { c.text.clone().into() },
                "refusal": null,
            });
            if !c.reasoning.is_empty() {
                message["reasoning_content"] = c.reasoning.clone().into();
                message["reasoning"] = c.reasoning.clone().into();
            }
            if !tool_calls.is_empty() {
                message["tool_calls"] = tool_calls.into();
            }
            json!({
                "index": i,
                "message": message,
                "logprobs": if meta.logprobs { json!({"content": chat_logprobs(&session, &c.logprobs)}) } else { Value::Null },
                "finish_reason": finish_reason(c),
            })
        })
        .collect();
    let body = json!({
        "id": meta.id,
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": fingerprint(),
        "choices": choices,
        "usage": usage(prompt_tokens, &collected),
    });
    Ok(json_response(StatusCode::OK, &body))
}

/// The grammar forcing a tool call, compiled off the async threads.
async fn tool_constraint(
    session: &Arc<ModelSession>,
    tools: &ToolRequest,
) -> Result<Option<crate::engine::structured::Constraint>, ApiError> {
    let (s, t) = (session.clone(), tools.clone());
    tokio::task::spawn_blocking(move || s.tool_constraint(&t))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::bad_param("tool_choice", format!("{e:#}")))
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    prompt: Value,
    #[serde(flatten)]
    common: CommonFields,
    logprobs: Option<i64>,
    #[serde(default)]
    echo: bool,
    /// An extension (vLLM accepts it too): the completion follows the format.
    response_format: Option<Value>,
}

/// `prompt`: a string, a list of strings, a token list or a list of token lists.
fn completion_prompts(
    session: &ModelSession,
    prompt: &Value,
) -> Result<Vec<(String, Vec<u32>)>, ApiError> {
    let bad = || {
        ApiError::bad_param(
            "prompt",
            "prompt must be a string, a list of strings, a list of token ids or a list of such lists",
        )
    };
    let tokens = |v: &[Value]| -> Result<Vec<u32>, ApiError> {
        v.iter()
            .map(|t| {
                t.as_u64()
                    .filter(|&t| t <= u32::MAX as u64)
                    .map(|t| t as u32)
                    .ok_or_else(bad)
            })
            .collect()
    };
    let decode = |ids: &[u32]| session.loaded.tokenizer.decode(ids).unwrap_or_default();
    let prompts = match prompt {
        Value::String(s) => vec![(s.clone(), text_prompt(session, s)?)],
        Value::Array(items) if items.is_empty() => return Err(bad()),
        Value::Array(items) if items.iter().all(Value::is_string) => items
            .iter()
            .map(|s| {
                let s = s.as_str().unwrap_or_default();
                Ok((s.to_string(), text_prompt(session, s)?))
            })
            .collect::<Result<_, ApiError>>()?,
        Value::Array(items) if items.iter().all(Value::is_number) => {
            let ids = tokens(items)?;
            vec![(decode(&ids), ids)]
        }
        Value::Array(items) if items.iter().all(Value::is_array) => items
            .iter()
            .map(|v| {
                let ids = tokens(v.as_array().map(Vec::as_slice).unwrap_or(&[]))?;
                Ok((decode(&ids), ids))
            })
            .collect::<Result<_, ApiError>>()?,
        _ => return Err(bad()),
    };
    if prompts.len() > 16 {
        return Err(ApiError::bad_param(
            "prompt",
            "at most 16 prompts per request",
        ));
    }
    Ok(prompts)
}

pub async fn completions(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match completions_inner(state, request_id, body).await {
        Ok(r) => r,
        Err(e) => e.openai(),
    }
}

async fn completions_inner(
    state: Arc<AppState>,
    request_id: RequestId,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|r| body_rejection(r, state.body_limit))?;
    let req: CompletionRequest = parse_body(&body)?;
    let n = req.common.n()?;
    let top = match req.logprobs {
        None => None,
        Some(t) if (0..=20).contains(&t) => Some(t as usize),
        Some(_) => {
            return Err(ApiError::bad_param(
                "logprobs",
                "logprobs must be between 0 and 20",
            ))
        }
    };
    if req.common.stream && req.echo {
        return Err(ApiError::bad_param(
            "echo",
            "echo is not supported with stream",
        ));
    }
    req.common.max_tokens(None)?;
    stop_strings(req.common.stop.clone())?;
    let lease = state
        .registry
        .acquire(&req.common.model, None, Purpose::Generate("completions"))
        .await?;
    let session = lease.model.session()?.clone();
    let prompts = completion_prompts(&session, &req.prompt)?;
    if prompts.len() * n > 16 {
        return Err(ApiError::bad_param("n", "prompts × n must be at most 16"));
    }
    let constraint = match response_format(req.response_format.as_ref())? {
        Some(g) => Some(compile_grammar(&session, g, "response_format").await?),
        None => None,
    };
    let mut requests = Vec::new();
    for (p, (_, ids)) in prompts.iter().enumerate() {
        // OpenAI's default for completions is 16 tokens.
        requests.extend(
            req.common
                .requests(&session, ids, Some(16), top, n, p * n)?,
        );
    }
    for r in &mut requests {
        r.constraint = constraint.clone();
    }
    let generation = Generation::submit(lease, requests, &state.metrics)?;
    let meta = ReplyMeta {
        id: new_id("cmpl-"),
        created: unix_seconds(),
        model: req.common.model.clone(),
        request_id,
        logprobs: top.is_some(),
    };
    if req.common.stream {
        let stream = SseStream::new(
            generation,
            meta,
            Kind::Completion,
            req.common.include_usage(),
            n,
        );
        return Ok(stream_response("text/event-stream", stream.into_stream()));
    }
    let prompt_tokens: usize = prompts.iter().map(|(_, ids)| ids.len()).sum();
    let collected = generation.collect().await?;
    let choices: Vec<Value> = collected
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let prefix = if req.echo {
                prompts[i / n].0.clone()
            } else {
                String::new()
            };
            let logprobs = if meta.logprobs {
                completion_logprobs(&session, &c.logprobs, prefix.len())
            } else {
                Value::Null
            };
            json!({
                "index": i,
                "text": prefix + &c.text,
                "logprobs": logprobs,
                "finish_reason": finish_reason(c),
            })
        })
        .collect();
    let body = json!({
        "id": meta.id,
        "object": "text_completion",
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": fingerprint(),
        "choices": choices,
        "usage": usage(prompt_tokens, &collected),
    });
    Ok(json_response(StatusCode::OK, &body))
}

pub async fn list_models(State(state): State<Arc<AppState>>) -> Response {
    match super::models_served(&state.registry).await {
        Ok(models) => {
            let data: Vec<Value> = models
                .iter()
                .map(|m| {
                    json!({
                        "id": m.name,
                        "object": "model",
                        "created": m.facts.as_ref().map(|f| super::common::system_seconds(f.modified)).unwrap_or(0),
                        "owned_by": m.owner,
                    })
                })
                .collect();
            json_response(StatusCode::OK, &json!({"object": "list", "data": data}))
        }
        Err(e) => e.openai(),
    }
}

pub async fn get_model(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    match super::models_served(&state.registry).await {
        Ok(models) => match models.iter().find(|m| m.name == id) {
            Some(m) => json_response(
                StatusCode::OK,
                &json!({
                    "id": m.name,
                    "object": "model",
                    "created": m.facts.as_ref().map(|f| super::common::system_seconds(f.modified)).unwrap_or(0),
                    "owned_by": m.owner,
                }),
            ),
            None => ApiError::model_not_found(format!("model '{id}' not found")).openai(),
        },
        Err(e) => e.openai(),
    }
}

fn fingerprint() -> String {
    format!("xllm-{}", env!("CARGO_PKG_VERSION"))
}

/// OpenAI's finish reasons: `stop`, `length`, `tool_calls`.
fn finish_reason(c: &Collected) -> &'static str {
    if !c.tool_calls.is_empty() {
        return "tool_calls";
    }
    finish_str(c.finish.unwrap_or(FinishReason::Stop))
}

fn finish_str(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length | FinishReason::ContextFull => "length",
        _ => "stop",
    }
}

fn usage(prompt_tokens: usize, collected: &[Collected]) -> Value {
    let completion: usize = collected.iter().map(|c| c.stats.eval_count).sum();
    let cached = collected.first().map(|c| c.cached_tokens).unwrap_or(0);
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

fn tool_call_json(index: Option<usize>, recipient: &str, arguments: &str) -> Value {
    let mut v = json!({
        "id": new_id("call_"),
        "type": "function",
        "function": {"name": tool_name(recipient), "arguments": arguments},
    });
    if let Some(i) = index {
        v["index"] = i.into();
    }
    v
}

fn logprob_entry(session: &ModelSession, token: u32, logprob: f32) -> Value {
    let text = token_text(session, token);
    json!({"token": text, "logprob": logprob, "bytes": text.as_bytes()})
}

/// Chat logprobs: `[{token, logprob, bytes, top_logprobs: [...]}]`.
fn chat_logprobs(session: &ModelSession, logprobs: &[TokenLogprob]) -> Vec<Value> {
    logprobs
        .iter()
        .map(|lp| {
            let mut v = logprob_entry(session, lp.token, lp.logprob);
            v["top_logprobs"] = lp
                .top
                .iter()
                .map(|&(t, l)| logprob_entry(session, t, l))
                .collect::<Vec<_>>()
                .into();
            v
        })
        .collect()
}

/// Completion logprobs: `{tokens, token_logprobs, top_logprobs, text_offset}`.
fn completion_logprobs(session: &ModelSession, logprobs: &[TokenLogprob], start: usize) -> Value {
    let mut offset = start;
    let (mut tokens, mut values, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
    for lp in logprobs {
        let text = token_text(session, lp.token);
        offsets.push(offset);
        offset += text.len();
        tokens.push(text);
        values.push(lp.logprob);
        let top: serde_json::Map<String, Value> = lp
            .top
            .iter()
            .map(|&(t, l)| (token_text(session, t), json!(l)))
            .collect();
        tops.push(Value::Object(top));
    }
    json!({"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets})
}

/// What every reply of one request repeats.
struct ReplyMeta {
    id: String,
    created: u64,
    model: String,
    request_id: RequestId,
    logprobs: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

/// Per-choice state of a stream.
#[derive(Default)]
struct ChoiceState {
    role_sent: bool,
    tool_calls: usize,
    /// Log-probabilities of tokens whose text is still held back: they go with the next text.
    pending_logprobs: Vec<TokenLogprob>,
    completion_tokens: usize,
}

/// Turns a generation's events into SSE chunks.
struct SseStream {
    generation: Generation,
    meta: ReplyMeta,
    kind: Kind,
    include_usage: bool,
    choices: Vec<ChoiceState>,
    /// Choices per prompt (`n`).
    per_prompt: usize,
    prompt_tokens: usize,
    cached_tokens: Option<usize>,
    queue: VecDeque<Bytes>,
    done: bool,
}

impl SseStream {
    fn new(
        generation: Generation,
        meta: ReplyMeta,
        kind: Kind,
        include_usage: bool,
        per_prompt: usize,
    ) -> Self {
        let choices = (0..generation.choices())
            .map(|_| ChoiceState::default())
            .collect();
        Self {
            generation,
            meta,
            kind,
            include_usage,
            choices,
            per_prompt: per_prompt.max(1),
            prompt_tokens: 0,
            cached_tokens: None,
            queue: VecDeque::new(),
            done: false,
        }
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

    fn data(&mut self, value: &Value) {
        self.queue
            .push_back(Bytes::from(format!("data: {value}\n\n")));
    }

    fn chunk(&mut self, index: usize, delta: Value, logprobs: Value, finish: Option<&str>) {
        let choice = match self.kind {
            Kind::Chat => {
                json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
            }
            Kind::Completion => json!({
                "index": index,
                "text": delta.get("content").and_then(Value::as_str).unwrap_or(""),
                "logprobs": logprobs,
                "finish_reason": finish,
            }),
        };
        let mut v = json!({
            "id": self.meta.id,
            "object": if self.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
            "created": self.meta.created,
            "model": self.meta.model,
            "system_fingerprint": fingerprint(),
            "choices": [choice],
        });
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        self.data(&v);
    }

    fn take_logprobs(&mut self, index: usize) -> Value {
        if !self.meta.logprobs {
            return Value::Null;
        }
        let lps = std::mem::take(&mut self.choices[index].pending_logprobs);
        let session = self.generation.session().clone();
        match self.kind {
            Kind::Chat => json!({"content": chat_logprobs(&session, &lps)}),
            Kind::Completion => completion_logprobs(&session, &lps, 0),
        }
    }

    fn role_first(&mut self, index: usize) {
        if self.kind == Kind::Chat && !self.choices[index].role_sent {
            self.choices[index].role_sent = true;
            self.chunk(
                index,
                json!({"role": "assistant", "content": ""}),
                Value::Null,
                None,
            );
        }
    }

    fn error(&mut self, message: &str) {
        let v = json!({"error": {"message": message, "type": "server_error", "param": null, "code": null}});
        self.data(&v);
    }

    async fn advance(&mut self) {
        let next = match tokio::time::timeout(PING, self.generation.next()).await {
            Err(_) => {
                self.queue.push_back(Bytes::from_static(b": ping\n\n"));
                return;
            }
            Ok(next) => next,
        };
        let Some((i, event)) = next else {
            if self.include_usage {
                let completion: usize = self.choices.iter().map(|c| c.completion_tokens).sum();
                let v = json!({
                    "id": self.meta.id,
                    "object": if self.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
                    "created": self.meta.created,
                    "model": self.meta.model,
                    "system_fingerprint": fingerprint(),
                    "choices": [],
                    "usage": {
                        "prompt_tokens": self.prompt_tokens,
                        "completion_tokens": completion,
                        "total_tokens": self.prompt_tokens + completion,
                        "prompt_tokens_details": {"cached_tokens": self.cached_tokens.unwrap_or(0)},
                    },
                });
                self.data(&v);
            }
            self.queue
                .push_back(Bytes::from_static(b"data: [DONE]\n\n"));
            self.done = true;
            super::log_generation(
                &self.meta.request_id,
                &self.meta.model,
                self.prompt_tokens,
                self.choices.iter().map(|c| c.completion_tokens).sum(),
                self.generation.started.elapsed(),
            );
            return;
        };
        match event {
            SeqEvent::Started {
                prompt_tokens,
                cached_tokens,
            } => {
                // Each prompt counts once, at its first choice.
                if i % self.per_prompt == 0 {
                    self.prompt_tokens += prompt_tokens;
                }
                self.cached_tokens.get_or_insert(cached_tokens);
            }
            SeqEvent::Output {
                outputs, logprobs, ..
            } => {
                self.choices[i].pending_logprobs.extend(logprobs);
                for output in outputs {
                    self.role_first(i);
                    match output {
                        Output::Text(t) => {
                            let lp = self.take_logprobs(i);
                            self.chunk(i, json!({"content": t}), lp, None);
                        }
                        Output::Reasoning(t) if self.kind == Kind::Chat => self.chunk(
                            i,
                            json!({"reasoning_content": t, "reasoning": t}),
                            Value::Null,
                            None,
                        ),
                        Output::Reasoning(_) => {}
                        Output::ToolCall { name, arguments } if self.kind == Kind::Chat => {
                            let k = self.choices[i].tool_calls;
                            self.choices[i].tool_calls += 1;
                            let call = tool_call_json(Some(k), &name, &arguments);
                            self.chunk(i, json!({"tool_calls": [call]}), Value::Null, None);
                        }
                        Output::ToolCall { .. } => {}
                    }
                }
            }
            SeqEvent::Finished { reason, stats } => {
                self.choices[i].completion_tokens = stats.eval_count;
                if reason == FinishReason::Cancelled {
                    self.error("the request was cancelled (the server is shutting down)");
                    return;
                }
                self.role_first(i);
                let finish = if self.choices[i].tool_calls > 0 {
                    "tool_calls"
                } else {
                    finish_str(reason)
                };
                let lp = self.take_logprobs(i);
                let delta = if self.kind == Kind::Chat {
                    json!({})
                } else {
                    json!({"content": ""})
                };
                self.chunk(i, delta, lp, Some(finish));
            }
            SeqEvent::Failed(message) => self.error(&format!("generation failed: {message}")),
        }
    }
}
