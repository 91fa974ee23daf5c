//! Embeddings over HTTP: OpenAI's `POST /v1/embeddings` and Ollama's `POST /api/embed` and
//! legacy `POST /api/embeddings`. Every request is tokenized and checked here, then queued on
//! its model's embedding worker ([`EmbedHandle`]), which packs the sequences of all requests
//! waiting at the start of a pass into one batch. The vectors are exactly those `xllm embed`
//! prints for the same inputs (the same model code, pooling and normalisation).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::Extension;
use base64::Engine as _;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};

use super::common::{json_response, nanos};
use super::error::{body_rejection, parse_body, ApiError};
use super::registry::{KeepAlive, Lease, Purpose};
use super::{log_line, AppState, RequestId};
use crate::engine::embed::Overflow;
use crate::engine::embed_worker::EmbedHandle;

/// Inputs one request may carry (OpenAI's limit).
const MAX_INPUTS: usize = 2048;

/// What to embed: texts (tokenized with the model's special tokens) or token ids (as given).
#[derive(Debug)]
enum Inputs {
    Texts(Vec<String>),
    Tokens(Vec<Vec<u32>>),
}

impl Inputs {
    fn len(&self) -> usize {
        match self {
            Inputs::Texts(t) => t.len(),
            Inputs::Tokens(t) => t.len(),
        }
    }
}

/// The vectors of one request and the tokens each input used.
struct Embedded {
    vectors: Vec<Vec<f32>>,
    tokens: usize,
}

/// Tokenizes and checks `inputs` for the leased model, queues them on its worker and waits for
/// the vectors. Errors name the field (`input`, `dimensions`).
async fn embed(
    lease: &Lease,
    inputs: Inputs,
    overflow: Overflow,
    dimensions: Option<usize>,
) -> Result<Embedded, ApiError> {
    let worker: EmbedHandle = lease.model.embedder()?.clone();
    if inputs.len() == 0 {
        return Ok(Embedded {
            vectors: Vec::new(),
            tokens: 0,
        });
    }
    let model = worker.model().clone();
    let (ids, dims) = tokio::task::spawn_blocking(move || {
        let dims = model
            .check_dimensions(dimensions)
            .map_err(|e| ApiError::bad_param("dimensions", format!("{e:#}")))?;
        let ids = match inputs {
            Inputs::Texts(texts) => {
                let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
                model.tokenize(&refs, overflow)
            }
            Inputs::Tokens(ids) => Ok(ids),
        }
        .and_then(|ids| model.prepare(ids, overflow))
        .map_err(|e| ApiError::bad_param("input", format!("{e:#}")))?;
        Ok::<_, ApiError>((ids, dims))
    })
    .await
    .map_err(|e| ApiError::internal(format!("tokenizing task failed: {e}")))??;
    let tokens = ids.iter().map(Vec::len).sum();
    let (tx, rx) = tokio::sync::oneshot::channel();
    worker.submit(
        ids,
        dims,
        Box::new(move |result| {
            let _ = tx.send(result);
        }),
    )?;
    match rx.await {
        Ok(Ok(vectors)) => Ok(Embedded { vectors, tokens }),
        Ok(Err(message)) if message.contains("shutting down") => {
            Err(ApiError::unavailable(message, 5))
        }
        Ok(Err(message)) => Err(ApiError::internal(format!("embedding failed: {message}"))),
        Err(_) => Err(ApiError::unavailable(
            "the embedding worker stopped (the model was unloaded or the server is shutting down)",
            5,
        )),
    }
}

fn log_embedding(request_id: &RequestId, model: &str, inputs: usize, tokens: usize, t0: Instant) {
    log_line(json!({
        "msg": "embedding",
        "request_id": &*request_id.0,
        "model": model,
        "inputs": inputs,
        "tokens": tokens,
        "ms": (t0.elapsed().as_secs_f64() * 1e4).round() / 10.0,
    }));
}

/// `dimensions`: a positive integer, or absent.
fn dimensions(value: Option<i64>) -> Result<Option<usize>, ApiError> {
    match value {
        None => Ok(None),
        Some(n) if n >= 1 => Ok(Some(n as usize)),
        Some(n) => Err(ApiError::bad_param(
            "dimensions",
            format!("dimensions must be at least 1, got {n}"),
        )),
    }
}

fn keep_alive(value: Option<&Value>) -> Result<Option<KeepAlive>, ApiError> {
    value
        .filter(|v| !v.is_null())
        .map(|v| KeepAlive::parse(v).map_err(|e| ApiError::bad_param("keep_alive", e)))
        .transpose()
}

// ---- OpenAI ----

#[derive(Debug, Deserialize)]
struct OpenAiRequest {
    model: String,
    input: Value,
    encoding_format: Option<String>,
    dimensions: Option<i64>,
    /// Extension: `false` refuses inputs over the model's limit instead of truncating them.
    truncate: Option<bool>,
}

/// OpenAI's `input`: a string, a list of strings, a list of token ids or a list of such lists.
fn openai_inputs(input: &Value) -> Result<Inputs, ApiError> {
    let bad = || {
        ApiError::bad_param(
            "input",
            "input must be a non-empty string, a list of strings, a list of token ids or a list of such lists",
        )
    };
    let ids = |v: &Value| -> Result<Vec<u32>, ApiError> {
        let items = v.as_array().ok_or_else(bad)?;
        if items.is_empty() {
            return Err(ApiError::bad_param("input", "a token list is empty"));
        }
        items
            .iter()
            .map(|t| {
                t.as_u64()
                    .and_then(|t| u32::try_from(t).ok())
                    .ok_or_else(|| ApiError::bad_param("input", "token ids must be integers ≥ 0"))
            })
            .collect()
    };
    let inputs = match input {
        Value::String(s) => Inputs::Texts(vec![s.clone()]),
        Value::Array(items) if items.is_empty() => {
            return Err(ApiError::bad_param(
                "input",
                "input must not be an empty list",
            ))
        }
        Value::Array(items) if items.iter().all(Value::is_string) => Inputs::Texts(
            items
                .iter()
                .map(|s| s.as_str().unwrap_or_default().to_string())
                .collect(),
        ),
        Value::Array(items) if items.iter().all(Value::is_number) => {
            Inputs::Tokens(vec![ids(input)?])
        }
        Value::Array(items) if items.iter().all(Value::is_array) => {
            Inputs::Tokens(items.iter().map(ids).collect::<Result<_, _>>()?)
        }
        _ => return Err(bad()),
    };
    if let Inputs::Texts(texts) = &inputs {
        if let Some(i) = texts.iter().position(String::is_empty) {
            return Err(ApiError::bad_param(
                "input",
                format!("input {i} is an empty string"),
            ));
        }
    }
    if inputs.len() > MAX_INPUTS {
        return Err(ApiError::bad_param(
            "input",
            format!(
                "at most {MAX_INPUTS} inputs per request, got {}",
                inputs.len()
            ),
        ));
    }
    Ok(inputs)
}

/// Little-endian f32 bytes in base64: what the official client decodes (numpy `float32`).
fn base64_f32(v: &[f32]) -> String {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub async fn openai_embeddings(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match openai_inner(state, request_id, body).await {
        Ok(r) => r,
        Err(e) => e.openai(),
    }
}

async fn openai_inner(
    state: Arc<AppState>,
    request_id: RequestId,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let t0 = Instant::now();
    let body = body.map_err(|r| body_rejection(r, state.body_limit))?;
    let req: OpenAiRequest = parse_body(&body)?;
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::bad_param(
                "encoding_format",
                format!("encoding_format must be 'float' or 'base64', got '{other}'"),
            ))
        }
    };
    let dims = dimensions(req.dimensions)?;
    let inputs = openai_inputs(&req.input)?;
    let overflow = overflow(req.truncate);
    let lease = state
        .registry
        .acquire(&req.model, None, Purpose::Embed)
        .await?;
    let count = inputs.len();
    let out = embed(&lease, inputs, overflow, dims).await?;
    let data: Vec<Value> = out
        .vectors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 {
                Value::String(base64_f32(v))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    log_embedding(&request_id, &req.model, count, out.tokens, t0);
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "object": "list",
            "data": data,
            "model": req.model,
            "usage": {"prompt_tokens": out.tokens, "total_tokens": out.tokens},
        }),
    ))
}

fn overflow(truncate: Option<bool>) -> Overflow {
    if truncate == Some(false) {
        Overflow::Refuse
    } else {
        Overflow::Truncate
    }
}

// ---- Ollama ----

#[derive(Debug, Deserialize)]
struct OllamaEmbedRequest {
    #[serde(alias = "name")]
    model: String,
    input: Option<Value>,
    truncate: Option<bool>,
    dimensions: Option<i64>,
    keep_alive: Option<Value>,
    /// Accepted and ignored, like unknown fields (runner options do not change an embedding).
    #[allow(dead_code)]
    options: Option<Value>,
}

/// Ollama's `input`: a string or a list of strings. An empty string or list (or none) only
/// loads the model.
fn ollama_inputs(input: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let texts = match input {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) if s.is_empty() => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| match v.as_str() {
                Some("") => Err(ApiError::bad_param(
                    "input",
                    format!("input {i} is an empty string"),
                )),
                Some(s) => Ok(s.to_string()),
                None => Err(ApiError::bad_param(
                    "input",
                    "input must be a string or a list of strings",
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(ApiError::bad_param(
                "input",
                "input must be a string or a list of strings",
            ))
        }
    };
    if texts.len() > MAX_INPUTS {
        return Err(ApiError::bad_param(
            "input",
            format!(
                "at most {MAX_INPUTS} inputs per request, got {}",
                texts.len()
            ),
        ));
    }
    Ok(texts)
}

fn load_duration(lease: &Lease) -> Duration {
    if lease.loaded_now {
        lease.model.load_duration
    } else {
        Duration::ZERO
    }
}

pub async fn ollama_embed(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let t0 = Instant::now();
    let result = async {
        let body = body.map_err(|r| body_rejection(r, state.body_limit))?;
        let req: OllamaEmbedRequest = parse_body(&body)?;
        let keep = keep_alive(req.keep_alive.as_ref())?;
        let dims = dimensions(req.dimensions)?;
        let texts = ollama_inputs(req.input.as_ref())?;
        let lease = state
            .registry
            .acquire(&req.model, keep, Purpose::Embed)
            .await?;
        let count = texts.len();
        let out = embed(&lease, Inputs::Texts(texts), overflow(req.truncate), dims).await?;
        log_embedding(&request_id, &req.model, count, out.tokens, t0);
        Ok::<_, ApiError>(json_response(
            StatusCode::OK,
            &json!({
                "model": req.model,
                "embeddings": out.vectors,
                "total_duration": nanos(t0.elapsed()),
                "load_duration": nanos(load_duration(&lease)),
                "prompt_eval_count": out.tokens,
            }),
        ))
    }
    .await;
    result.unwrap_or_else(ApiError::ollama)
}

#[derive(Debug, Deserialize)]
struct OllamaLegacyRequest {
    #[serde(alias = "name")]
    model: String,
    #[serde(default)]
    prompt: String,
    keep_alive: Option<Value>,
    #[allow(dead_code)]
    options: Option<Value>,
}

/// The legacy `/api/embeddings`: one `prompt`, one `embedding` (empty for an empty prompt,
/// which only loads the model).
pub async fn ollama_embeddings(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let t0 = Instant::now();
    let result = async {
        let body = body.map_err(|r| body_rejection(r, state.body_limit))?;
        let req: OllamaLegacyRequest = parse_body(&body)?;
        let keep = keep_alive(req.keep_alive.as_ref())?;
        let lease = state
            .registry
            .acquire(&req.model, keep, Purpose::Embed)
            .await?;
        let texts = if req.prompt.is_empty() {
            Vec::new()
        } else {
            vec![req.prompt]
        };
        let count = texts.len();
        let out = embed(&lease, Inputs::Texts(texts), Overflow::Truncate, None).await?;
        log_embedding(&request_id, &req.model, count, out.tokens, t0);
        let embedding = out.vectors.into_iter().next().unwrap_or_default();
        Ok::<_, ApiError>(json_response(
            StatusCode::OK,
            &json!({ "embedding": embedding }),
        ))
    }
    .await;
    result.unwrap_or_else(ApiError::ollama)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_inputs_take_every_documented_shape() {
        let texts = |v: Value| match openai_inputs(&v).unwrap() {
            Inputs::Texts(t) => t,
            Inputs::Tokens(t) => panic!("tokens {t:?}"),
        };
        let tokens = |v: Value| match openai_inputs(&v).unwrap() {
            Inputs::Tokens(t) => t,
            Inputs::Texts(t) => panic!("texts {t:?}"),
        };
        assert_eq!(texts(json!("a b")), vec!["a b"]);
        assert_eq!(texts(json!(["a", "b"])), vec!["a", "b"]);
        assert_eq!(tokens(json!([101, 7, 102])), vec![vec![101, 7, 102]]);
        assert_eq!(tokens(json!([[1, 2], [3]])), vec![vec![1, 2], vec![3]]);
        for bad in [
            json!([]),
            json!(""),
            json!(["a", ""]),
            json!([[]]),
            json!([-1]),
            json!([1.5]),
            json!(["a", 1]),
            json!({"text": "a"}),
            json!(null),
        ] {
            let e = openai_inputs(&bad)
                .err()
                .unwrap_or_else(|| panic!("{bad} accepted"));
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert_eq!(e.param.as_deref(), Some("input"), "{bad}");
        }
        let many = Value::Array(vec![json!("x"); MAX_INPUTS + 1]);
        assert!(openai_inputs(&many).is_err());
    }

    #[test]
    fn ollama_inputs_load_only_when_empty() {
        assert!(ollama_inputs(None).unwrap().is_empty());
        assert!(ollama_inputs(Some(&json!(""))).unwrap().is_empty());
        assert!(ollama_inputs(Some(&json!([]))).unwrap().is_empty());
        assert_eq!(
            ollama_inputs(Some(&json!(["a", "b"]))).unwrap(),
            vec!["a", "b"]
        );
        assert!(ollama_inputs(Some(&json!(["a", ""]))).is_err());
        assert!(ollama_inputs(Some(&json!([1]))).is_err());
    }

    #[test]
    fn base64_is_little_endian_f32() {
        let s = base64_f32(&[1.0, -2.5]);
        let bytes = base64::engine::general_purpose::STANDARD.decode(s).unwrap();
        assert_eq!(
            bytes,
            [1f32.to_le_bytes(), (-2.5f32).to_le_bytes()].concat()
        );
    }
}
