//! Signed `/files` URLs (`Sandbox.download_url()`, `upload_url()`): they carry no header, so the
//! signature both names the sandbox and stands for its access token. A v1 signature is
//! `v1_` + unpadded base64 of SHA-256 over `path:operation:user:envdAccessToken[:expiration]`.

use axum::http::{Method, Uri};
use base64::Engine;
use sha2::{Digest, Sha256};

use crate::{same, Front};

/// The signature parameters of a `/files` request.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Signed {
    path: String,
    user: String,
    signature: String,
    expiration: Option<String>,
    operation: &'static str,
}

impl Signed {
    /// The request's signature, when it is a signed `/files` request.
    pub(crate) fn of(method: &Method, uri: &Uri) -> Option<Signed> {
        if uri.path() != "/files" {
            return None;
        }
        let operation = match *method {
            Method::GET => "read",
            Method::POST => "write",
            _ => return None,
        };
        let mut signed = Signed { operation, ..Default::default() };
        for (k, v) in form_urlencoded::parse(uri.query()?.as_bytes()) {
            match &*k {
                "path" => signed.path = v.into_owned(),
                "username" => signed.user = v.into_owned(),
                "signature" => signed.signature = v.into_owned(),
                "signature_expiration" => signed.expiration = Some(v.into_owned()),
                _ => {}
            }
        }
        (!signed.signature.is_empty()).then_some(signed)
    }

    /// Whether `token` (a sandbox's envd access token) made this signature, and it has not expired.
    pub(crate) fn made_by(&self, token: &str, now: i64) -> bool {
        if let Some(exp) = &self.expiration {
            if exp.parse::<i64>().map_or(true, |exp| exp < now) {
                return false;
            }
        }
        let mut raw = format!("{}:{}:{}:{token}", self.path, self.operation, self.user);
        if let Some(exp) = &self.expiration {
            raw = format!("{raw}:{exp}");
        }
        let digest = Sha256::digest(raw.as_bytes());
        let expected = format!("v1_{}", base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest));
        same(&self.signature, &expected)
    }

    /// The sandbox among `ids` whose token made this signature.
    pub(crate) fn find(&self, front: &Front, ids: impl IntoIterator<Item = String>) -> Option<String> {
        let now = crate::unix_now();
        ids.into_iter().find(|id| self.made_by(&front.envd_token(id), now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed(query: &str, method: Method) -> Option<Signed> {
        Signed::of(&method, &format!("/files?{query}").parse().unwrap())
    }

    #[test]
    fn v1_signatures_check_as_the_sdk_makes_them() {
        // get_signature("/home/user/a b.txt", "read", None, "tok") from e2b 2.63.0.
        let s = signed(
            "path=%2Fhome%2Fuser%2Fa%20b.txt&signature=v1_m19cDbXO/F43G5cx59umbZW/2oYPnQHTX2ja2COKnRs",
            Method::GET,
        );
        let s = s.unwrap();
        assert!(s.made_by("tok", 0), "{s:?}");
        assert!(!s.made_by("other", 0));
        // Signed for reading, used for writing.
        let w = signed(
            "path=%2Fhome%2Fuser%2Fa%20b.txt&signature=v1_m19cDbXO/F43G5cx59umbZW/2oYPnQHTX2ja2COKnRs",
            Method::POST,
        );
        assert!(!w.unwrap().made_by("tok", 0));
    }

    #[test]
    fn expired_or_missing_signatures_do_not_count() {
        assert_eq!(signed("path=%2Fx", Method::GET), None);
        assert_eq!(signed("path=%2Fx&signature=v1_x", Method::DELETE), None);
        let s = signed("path=%2Fx&signature=v1_x&signature_expiration=10", Method::GET).unwrap();
        assert!(!s.made_by("tok", 11));
        let s = signed("path=%2Fx&signature=v1_x&signature_expiration=soon", Method::GET).unwrap();
        assert!(!s.made_by("tok", 0));
    }
}
