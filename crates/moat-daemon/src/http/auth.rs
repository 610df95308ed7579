//! The TCP listener's bearer token check.

use std::sync::Arc;

use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use moat_api::{ApiError, ErrorCode};

/// For the TCP listener: every request needs `Authorization: Bearer <token>`.
pub async fn require_token(token: Arc<String>, req: Request, next: Next) -> Response {
    let given =
        req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    // Compare in constant time: the token is a secret and the caller may be remote.
    let ok = given.is_some_and(|g| {
        g.len() == token.len() && g.bytes().zip(token.bytes()).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0
    });
    if !ok {
        let e = ApiError {
            code: ErrorCode::InvalidRequest,
            message: "missing or wrong bearer token".into(),
            hint: "send `Authorization: Bearer <token>` with the token from $MOAT_HOME/token".into(),
        };
        return (StatusCode::UNAUTHORIZED, Json(e)).into_response();
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::routing::get;
    use axum::Router;
    use tower::ServiceExt;

    async fn status(auth: Option<&str>) -> StatusCode {
        let token = Arc::new("s3cret-token".to_string());
        let app = Router::new()
            .route("/v1/health", get(|| async { "ok" }))
            .layer(axum::middleware::from_fn(move |req, next| require_token(token.clone(), req, next)));
        let mut req = axum::http::Request::builder().uri("/v1/health");
        if let Some(a) = auth {
            req = req.header(header::AUTHORIZATION, a);
        }
        app.oneshot(req.body(Body::empty()).unwrap()).await.unwrap().status()
    }

    #[tokio::test]
    async fn tcp_requests_need_the_bearer_token() {
        assert_eq!(status(Some("Bearer s3cret-token")).await, StatusCode::OK);
        assert_eq!(status(None).await, StatusCode::UNAUTHORIZED);
        assert_eq!(status(Some("Bearer s3cret-tokeN")).await, StatusCode::UNAUTHORIZED);
        assert_eq!(status(Some("Bearer s3cret")).await, StatusCode::UNAUTHORIZED);
        assert_eq!(status(Some("Basic s3cret-token")).await, StatusCode::UNAUTHORIZED);
    }
}
