//! Every route of the server, in one place, and the layers around them: request ids and logs,
//! the API key, the body limit, CORS. A new endpoint (embeddings, …) is one line here plus its
//! handler module.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::json;
use subtle::ConstantTimeEq;

use super::common::json_response;
use super::error::{ApiError, Flavor};
use super::{embed, log_line, ollama, openai, pull, AppState, RequestId};

pub fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        // OpenAI
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/embeddings", post(embed::openai_embeddings))
        .route("/v1/models", get(openai::list_models))
        .route("/v1/models/{*id}", get(openai::get_model))
        // Ollama
        .route("/", get(ollama::root).head(ollama::root))
        .route("/api/version", get(ollama::version))
        .route("/api/tags", get(ollama::tags))
        .route("/api/ps", get(ollama::ps))
        .route("/api/show", post(ollama::show))
        .route("/api/chat", post(ollama::chat))
        .route("/api/generate", post(ollama::generate))
        .route("/api/embed", post(embed::ollama_embed))
        .route("/api/embeddings", post(embed::ollama_embeddings))
        .route("/api/pull", post(pull::pull))
        .route(
            "/api/delete",
            axum::routing::delete(ollama::delete).post(ollama::delete),
        )
        // Operations
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ))
        .layer(DefaultBodyLimit::max(state.body_limit));
    let mut app = Router::new()
        .route("/health", get(health))
        .merge(api)
        .layer(middleware::from_fn_with_state(state.clone(), request_log))
        .with_state(state.clone());
    if let Some(cors) = cors_layer(&state.cors_origins) {
        app = app.layer(cors);
    }
    app
}

/// CORS only for the origins the operator allowed (`*` for any); none configured: no CORS
/// headers, so browsers on other origins are refused.
fn cors_layer(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, Any, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok())
                .collect::<Vec<_>>(),
        )
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods(Any)
            .allow_headers(Any),
    )
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    if state.is_shutting_down() {
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"status": "shutting down"}),
        );
    }
    if !state.is_ready() {
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"status": "starting"}),
        );
    }
    json_response(StatusCode::OK, &json!({"status": "ok"}))
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let body = state.metrics.render(&state.registry);
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn not_found(request: Request) -> Response {
    let path = request.uri().path().to_string();
    ApiError::not_found(format!("no route for {} {path}", request.method()))
        .into_response_for(Flavor::of_path(&path))
}

async fn method_not_allowed(request: Request) -> Response {
    let path = request.uri().path().to_string();
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        format!("{} is not allowed on {path}", request.method()),
    )
    .into_response_for(Flavor::of_path(&path))
}

/// `Authorization: Bearer <key>` on every route but `/health` (and CORS preflights), when the
/// server has a key. The comparison is constant-time over SHA-256 digests, so neither the
/// key's bytes nor its length leak through timing.
async fn require_api_key(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(key) = &state.api_key_digest else {
        return next.run(request).await;
    };
    if request.method() == Method::OPTIONS {
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(|v| v.trim());
    let ok = given.is_some_and(|g| bool::from(super::digest(g).ct_eq(key)));
    if ok {
        next.run(request).await
    } else {
        let path = request.uri().path().to_string();
        ApiError::unauthorized().into_response_for(Flavor::of_path(&path))
    }
}

/// Gives each request an id (the client's `x-request-id` when it is sane), returns it in the
/// response, and logs one structured line per request.
async fn request_log(
    State(state): State<Arc<AppState>>,
    mut request: Request,
    next: Next,
) -> Response {
    let id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
        })
        .map(str::to_string)
        .unwrap_or_else(|| super::common::new_id("req-"));
    let id = RequestId(Arc::from(id.as_str()));
    request.extensions_mut().insert(id.clone());
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let t0 = Instant::now();
    let mut response = next.run(request).await;
    let status = response.status().as_u16();
    state.metrics.http_request(status);
    if let Ok(v) = HeaderValue::from_str(&id.0) {
        response.headers_mut().insert("x-request-id", v);
    }
    if path != "/health" && path != "/metrics" {
        log_line(json!({
            "msg": "request",
            "request_id": &*id.0,
            "method": method.as_str(),
            "path": path,
            "status": status,
            "ms": (t0.elapsed().as_secs_f64() * 1e3 * 10.0).round() / 10.0,
        }));
    }
    response
}
