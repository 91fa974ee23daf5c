//! Errors of the HTTP API, in the two envelopes clients parse: OpenAI's
//! `{"error":{"message","type","param","code"}}` and Ollama's `{"error":"message"}`, each with
//! the status the clients (and their retry logic) expect.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::engine::request::SubmitError;

/// Which API a route belongs to (decides the error envelope).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    OpenAi,
    Ollama,
}

impl Flavor {
    /// `/v1/...` routes speak OpenAI, everything else Ollama's API.
    pub fn of_path(path: &str) -> Flavor {
        if path == "/v1" || path.starts_with("/v1/") {
            Flavor::OpenAi
        } else {
            Flavor::Ollama
        }
    }
}

/// An error reply.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    /// OpenAI's `type` (llama.cpp's names: `invalid_request_error`, `not_found_error`, ...).
    pub kind: &'static str,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<String>,
    /// Seconds for `Retry-After` (overload).
    pub retry_after: Option<u64>,
    /// Tell the OpenAI SDK not to retry (`x-should-retry: false`) a 5xx that cannot succeed.
    pub no_retry: bool,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            param: None,
            code: None,
            retry_after: None,
            no_retry: false,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// A bad value of one request field.
    pub fn bad_param(param: &str, message: impl Into<String>) -> Self {
        let mut e = Self::bad_request(message);
        e.param = Some(param.to_string());
        e
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found_error", message)
    }

    pub fn model_not_found(message: impl Into<String>) -> Self {
        let mut e = Self::not_found(message);
        e.param = Some("model".into());
        e.code = Some("model_not_found".into());
        e
    }

    pub fn unauthorized() -> Self {
        let mut e = Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "missing or wrong API key: send `Authorization: Bearer <key>`",
        );
        e.code = Some("invalid_api_key".into());
        e
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    pub fn unavailable(message: impl Into<String>, retry_after: u64) -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable_error",
            message,
        );
        e.retry_after = Some(retry_after);
        e
    }

    /// The JSON body of this error in `flavor`'s envelope.
    pub fn body(&self, flavor: Flavor) -> serde_json::Value {
        match flavor {
            Flavor::OpenAi => serde_json::json!({
                "error": {
                    "message": self.message,
                    "type": self.kind,
                    "param": self.param,
                    "code": self.code,
                }
            }),
            Flavor::Ollama => serde_json::json!({ "error": self.message }),
        }
    }

    pub fn into_response_for(self, flavor: Flavor) -> Response {
        let mut response = (
            self.status,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            self.body(flavor).to_string(),
        )
            .into_response();
        let headers = response.headers_mut();
        if let Some(s) = self.retry_after {
            headers.insert(axum::http::header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.no_retry {
            headers.insert("x-should-retry", HeaderValue::from_static("false"));
        }
        response
    }

    pub fn openai(self) -> Response {
        self.into_response_for(Flavor::OpenAi)
    }

    pub fn ollama(self) -> Response {
        self.into_response_for(Flavor::Ollama)
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match &e {
            SubmitError::Overloaded { .. } => ApiError::unavailable(e.to_string(), 1),
            SubmitError::ContextExceeded { .. } => {
                let mut a = ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "exceed_context_size_error",
                    e.to_string(),
                );
                a.code = Some("context_length_exceeded".into());
                a.param = Some("messages".into());
                a
            }
            SubmitError::Invalid(_) => ApiError::bad_request(e.to_string()),
            SubmitError::Stopped => ApiError::unavailable(e.to_string(), 1),
        }
    }
}

/// A request body that is not the JSON a route expects.
pub fn bad_json(err: serde_json::Error) -> ApiError {
    ApiError::bad_request(format!(
        "the request body is not valid JSON for this route: {err}"
    ))
}

/// Parses a JSON body, with our error for bad JSON.
pub fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad_request(
            "the request body is empty; send a JSON object",
        ));
    }
    serde_json::from_slice(body).map_err(bad_json)
}

/// Maps the body extractor's rejection (too large, unreadable) to our error.
pub fn body_rejection(
    rejection: axum::extract::rejection::BytesRejection,
    limit: usize,
) -> ApiError {
    let status = rejection.status();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        let mut e = ApiError::new(
            status,
            "invalid_request_error",
            format!("the request body is larger than the server's limit of {limit} bytes"),
        );
        e.code = Some("request_too_large".into());
        e
    } else {
        ApiError::new(status, "invalid_request_error", rejection.body_text())
    }
}
