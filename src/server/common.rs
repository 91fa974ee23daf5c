//! What the OpenAI and Ollama front ends share: sampling settings checked field by field (the
//! error names the field), stop lists, ids and times, JSON and streaming responses.

use std::convert::Infallible;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::http::{header, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use futures_util::Stream;
use serde::Deserialize;

use super::error::ApiError;
use crate::engine::chat_template::Message;
use crate::engine::sampler::SamplingParams;
use crate::engine::session::ModelSession;

/// Sampling fields a request may set; unset ones keep the model's defaults
/// (generation_config.json over ours).
#[derive(Debug, Clone, Default)]
pub struct SamplingFields {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub repeat_penalty: Option<f32>,
    pub repeat_last_n: Option<i64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub seed: Option<i64>,
}

impl SamplingFields {
    /// The settings for one choice (`choice` is added to the seed so `n` choices differ).
    pub fn params(
        &self,
        defaults: &SamplingParams,
        names: &FieldNames,
        choice: usize,
    ) -> Result<SamplingParams, ApiError> {
        let mut p = defaults.clone();
        if let Some(t) = self.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err(ApiError::bad_param(
                    names.temperature,
                    format!(
                        "{} must be between 0 and 2 (0 is greedy), got {t}",
                        names.temperature
                    ),
                ));
            }
            p.temperature = t;
        }
        if let Some(v) = self.top_p {
            if !(v > 0.0 && v <= 1.0) {
                return Err(ApiError::bad_param(
                    "top_p",
                    format!("top_p must be in (0, 1], got {v}"),
                ));
            }
            p.top_p = Some(v);
        }
        if let Some(k) = self.top_k {
            // vLLM: -1 (and Ollama 0) mean no top-k.
            p.top_k = (k > 0).then_some(k as usize);
            if k < -1 {
                return Err(ApiError::bad_param(
                    "top_k",
                    "top_k must be -1 (off) or more",
                ));
            }
        }
        if let Some(v) = self.min_p {
            if !(0.0..=1.0).contains(&v) {
                return Err(ApiError::bad_param("min_p", "min_p must be in [0, 1]"));
            }
            p.min_p = (v > 0.0).then_some(v);
        }
        if let Some(v) = self.repeat_penalty {
            if v.is_nan() || v <= 0.0 {
                return Err(ApiError::bad_param(
                    names.repeat_penalty,
                    format!("{} must be positive (1 is off)", names.repeat_penalty),
                ));
            }
            p.repeat_penalty = v;
        }
        if let Some(n) = self.repeat_last_n {
            // Ollama: -1 means the whole context.
            p.repeat_last_n = if n < 0 { usize::MAX } else { n as usize };
        }
        for (name, value, slot) in [
            (
                "presence_penalty",
                self.presence_penalty,
                &mut p.presence_penalty,
            ),
            (
                "frequency_penalty",
                self.frequency_penalty,
                &mut p.frequency_penalty,
            ),
        ] {
            if let Some(v) = value {
                if !(-2.0..=2.0).contains(&v) {
                    return Err(ApiError::bad_param(
                        name,
                        format!("{name} must be between -2 and 2, got {v}"),
                    ));
                }
                *slot = v;
            }
        }
        let seed = match self.seed {
            Some(s) => s as u64,
            None => random_u64(),
        };
        p.seed = seed.wrapping_add(choice as u64);
        Ok(p)
    }
}

/// Field names as each API spells them (for error messages).
pub struct FieldNames {
    pub temperature: &'static str,
    pub repeat_penalty: &'static str,
}

pub const OPENAI_FIELDS: FieldNames = FieldNames {
    temperature: "temperature",
    repeat_penalty: "repetition_penalty",
};

pub const OLLAMA_FIELDS: FieldNames = FieldNames {
    temperature: "options.temperature",
    repeat_penalty: "options.repeat_penalty",
};

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

impl StopField {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            StopField::One(s) => vec![s],
            StopField::Many(v) => v,
        }
    }
}

/// Checks a stop list: at most 16 strings.
pub fn stop_strings(stop: Option<StopField>) -> Result<Vec<String>, ApiError> {
    let stops: Vec<String> = stop
        .map(StopField::into_vec)
        .unwrap_or_default()
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect();
    if stops.len() > 16 {
        return Err(ApiError::bad_param(
            "stop",
            "at most 16 stop strings are allowed",
        ));
    }
    Ok(stops)
}

pub fn random_u64() -> u64 {
    rand::random()
}

/// A random id with a prefix (`chatcmpl-…`).
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}{:016x}", random_u64())
}

pub fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// RFC 3339 time with nanoseconds, as Ollama writes `created_at`.
pub fn rfc3339(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

pub fn nanos(d: Duration) -> u64 {
    d.as_nanos().min(u64::MAX as u128) as u64
}

/// A JSON reply.
pub fn json_response(status: StatusCode, value: &serde_json::Value) -> Response {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(value.to_string()))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

/// A streamed reply (`text/event-stream` for SSE, `application/x-ndjson` for Ollama).
pub fn stream_response(
    content_type: &'static str,
    stream: impl Stream<Item = Bytes> + Send + 'static,
) -> Response {
    use futures_util::StreamExt;
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CACHE_CONTROL, "no-cache")
        .header("x-accel-buffering", "no")
        .body(Body::from_stream(stream.map(Ok::<_, Infallible>)))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

/// The text of one token for logprobs (special tokens are empty).
pub fn token_text(session: &ModelSession, token: u32) -> String {
    session
        .loaded
        .tokenizer
        .decode(&[token])
        .unwrap_or_default()
}

/// The prompt of a conversation, through the model's chat template.
pub fn chat_prompt(
    session: &ModelSession,
    messages: &[Message],
    options: crate::engine::session::ChatOptions,
) -> Result<Vec<u32>, ApiError> {
    chat_prompt_with_tools(session, messages, options, None)
}

/// The prompt of a conversation with the request's tools shown to the model.
pub fn chat_prompt_with_tools(
    session: &ModelSession,
    messages: &[Message],
    options: crate::engine::session::ChatOptions,
    tools: Option<&crate::engine::tools::ToolRequest>,
) -> Result<Vec<u32>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad_param(
            "messages",
            "messages must not be empty",
        ));
    }
    session
        .chat_prompt_with_tools(messages, options, tools)
        .map_err(|e| {
            ApiError::bad_param(
                "messages",
                format!(
                    "the conversation cannot be rendered with the model's chat template: {e:#}"
                ),
            )
        })
}

/// Raw text to prompt tokens (BOS added as the model wants).
pub fn text_prompt(session: &ModelSession, text: &str) -> Result<Vec<u32>, ApiError> {
    session
        .loaded
        .tokenizer
        .encode(text, true)
        .map_err(|e| ApiError::bad_param("prompt", format!("{e:#}")))
}

/// `functions.get_weather` (harmony recipient) → `get_weather`.
pub fn tool_name(recipient: &str) -> &str {
    recipient.strip_prefix("functions.").unwrap_or(recipient)
}

/// Seconds since the Unix epoch of `t` (OpenAI's `created`).
pub fn system_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Compiles a grammar for `session` off the async threads (the first one builds the token
/// trie); a grammar the engine refuses is a 400 on `param`.
pub async fn compile_grammar(
    session: &std::sync::Arc<ModelSession>,
    grammar: crate::engine::structured::Grammar,
    param: &str,
) -> Result<crate::engine::structured::Constraint, ApiError> {
    let s = session.clone();
    let compiled = tokio::task::spawn_blocking(move || s.compile(&grammar))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    compiled.map_err(|e| ApiError::bad_param(param, format!("{param} cannot be used: {e:#}")))
}

/// Tools from a request's `tools` list (OpenAI `{type: "function", function: {name,
/// description, parameters}}`, which Ollama also sends).
pub fn parse_tools(
    tools: &[serde_json::Value],
) -> Result<Vec<crate::engine::tools::Tool>, ApiError> {
    tools
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let bad = |what: &str| ApiError::bad_param(&format!("tools[{i}]"), what.to_string());
            if let Some(kind) = t.get("type").and_then(serde_json::Value::as_str) {
                if kind != "function" {
                    return Err(bad(&format!(
                        "tool type '{kind}' is not supported (only 'function')"
                    )));
                }
            }
            let f = t
                .get("function")
                .ok_or_else(|| bad("a tool needs a 'function' object"))?;
            let name = f
                .get("name")
                .and_then(serde_json::Value::as_str)
                .ok_or_else(|| bad("a function needs a 'name'"))?;
            Ok(crate::engine::tools::Tool {
                name: name.to_string(),
                description: f
                    .get("description")
                    .and_then(serde_json::Value::as_str)
                    .map(str::to_string),
                parameters: f
                    .get("parameters")
                    .cloned()
                    .filter(|p| !p.is_null())
                    .unwrap_or_else(|| serde_json::json!({"type": "object", "properties": {}})),
            })
        })
        .collect()
}

/// An assistant message's `tool_calls` as templates read them (arguments as objects; OpenAI
/// sends them as JSON text).
pub fn template_tool_calls(calls: &[serde_json::Value]) -> Vec<serde_json::Value> {
    calls
        .iter()
        .map(|c| {
            let mut c = c.clone();
            if let Some(args) = c
                .pointer("/function/arguments")
                .and_then(serde_json::Value::as_str)
            {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(args) {
                    c["function"]["arguments"] = v;
                }
            }
            c.as_object_mut()
                .map(|o| o.entry("type").or_insert_with(|| "function".into()));
            c
        })
        .collect()
}
