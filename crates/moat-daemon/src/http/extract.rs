//! What every handler takes from a request: the service, a bounded JSON body and a query string,
//! each failing as an API error rather than axum's plain-text rejection.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequest, Query, Request, State};
use moat_api::{ErrorCode, MAX_BODY};
use serde::de::DeserializeOwned;

use crate::error::ServiceError;
use crate::service::Service;

/// A JSON body, bounded by [`MAX_BODY`], whose errors are API errors.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ServiceError;

    async fn from_request(req: Request, _: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::to_bytes(req.into_body(), MAX_BODY).await.map_err(|_| {
            ServiceError::new(
                ErrorCode::BodyTooLarge,
                format!("the request body is larger than {MAX_BODY} bytes"),
                "send a smaller body",
            )
        })?;
        let bytes = if bytes.is_empty() { Bytes::from_static(b"{}") } else { bytes };
        serde_json::from_slice(&bytes).map(JsonBody).map_err(|e| {
            ServiceError::new(
                ErrorCode::InvalidRequest,
                format!("the request body is not valid JSON for this endpoint: {e}"),
                "see docs/openapi.json for the request schema",
            )
        })
    }
}

/// The service, as the router's state.
pub type Svc = State<Arc<Service>>;
pub type ApiResult<T> = Result<T, ServiceError>;

/// A query string the endpoint does not take is a clear error, not a plain-text rejection.
pub fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ServiceError> {
    q.map(|q| q.0).map_err(|e| {
        ServiceError::new(
            ErrorCode::InvalidRequest,
            format!("bad query string: {e}"),
            "see /openapi.json for the parameters",
        )
    })
}
