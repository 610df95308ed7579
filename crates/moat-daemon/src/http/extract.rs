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
        let invalid = |e: serde_json::Error| {
            ServiceError::new(
                ErrorCode::InvalidRequest,
                format!("the request body is not valid JSON for this endpoint: {e}"),
                "see docs/openapi.json for the request schema",
            )
        };
        let mut value: serde_json::Value = serde_json::from_slice(&bytes).map_err(invalid)?;
        // serde also reads a struct from an array of its fields in order, so `[]` would pass for
        // `{}`: every request body is an object.
        if !value.is_object() {
            return Err(ServiceError::new(
                ErrorCode::InvalidRequest,
                "the request body is not a JSON object",
                "send a JSON object (or no body where every field is optional)",
            ));
        }
        whole_numbers_as_integers(&mut value);
        T::deserialize(value).map(JsonBody).map_err(invalid)
    }
}

/// JSON has one kind of number, and JSON Schema's `integer` admits `2.0`: clients that write
/// every number as a float (JavaScript's and Python's do for computed values) send integers
/// so. serde takes only `2` for an integer field, so a number with no fraction becomes the
/// integer it spells first; one out of the integers' range stays a float and is refused.
fn whole_numbers_as_integers(value: &mut serde_json::Value) {
    use serde_json::{Number, Value};
    match value {
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().expect("is_f64");
            // 2^63 and 2^64 are exact as f64; every whole float below them is an exact integer.
            let integer = if f.fract() != 0.0 {
                None
            } else if (0.0..18_446_744_073_709_551_616.0).contains(&f) {
                Some(Number::from(f as u64))
            } else if (-9_223_372_036_854_775_808.0..0.0).contains(&f) {
                Some(Number::from(f as i64))
            } else {
                None
            };
            if let Some(integer) = integer {
                *n = integer;
            }
        }
        Value::Array(items) => items.iter_mut().for_each(whole_numbers_as_integers),
        Value::Object(fields) => fields.values_mut().for_each(whole_numbers_as_integers),
        _ => {}
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

#[cfg(test)]
mod tests {
    use super::*;

    async fn body<T: DeserializeOwned>(json: &str) -> Result<T, ServiceError> {
        let req = Request::builder().body(axum::body::Body::from(json.to_string())).unwrap();
        JsonBody::<T>::from_request(req, &()).await.map(|b| b.0)
    }

    #[tokio::test]
    async fn a_body_is_an_object_or_nothing() {
        assert!(body::<moat_api::Fork>("").await.is_ok());
        assert_eq!(body::<moat_api::Fork>(r#"{"count": 2.0}"#).await.unwrap().count, Some(2));
        for not_an_object in ["[]", "[null, null]", "null", "3", r#""x""#] {
            let e = body::<moat_api::Fork>(not_an_object).await.expect_err(not_an_object);
            assert_eq!(e.code, ErrorCode::InvalidRequest, "{not_an_object}");
        }
    }

    #[test]
    fn whole_floats_are_the_integers_they_spell() {
        let mut v: serde_json::Value =
            serde_json::from_str(r#"{"a": 2.0, "b": [-3.0, 0.5, 1e300, 18446744073709551615.0], "c": {"d": -0.0}}"#)
                .unwrap();
        whole_numbers_as_integers(&mut v);
        assert_eq!(v["a"], serde_json::json!(2));
        assert_eq!(v["b"][0], serde_json::json!(-3));
        assert!(v["b"][1].is_f64() && v["b"][2].is_f64(), "a fraction or a number out of range stays a float");
        // The nearest f64 is 2^64, past u64: refused rather than wrapped.
        assert!(v["b"][3].is_f64());
        assert_eq!(v["c"]["d"], serde_json::json!(0));
        #[derive(serde::Deserialize)]
        struct Mode {
            mode: u32,
        }
        let mut v = serde_json::json!({"mode": 420.0});
        whole_numbers_as_integers(&mut v);
        assert_eq!(<Mode as serde::Deserialize>::deserialize(v).unwrap().mode, 420);
    }
}
