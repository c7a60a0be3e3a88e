//! An `application/x-www-form-urlencoded` request body as RFC 6749 §3.2
//! asks it to be read: each parameter at most once, a parameter without a
//! value as if it were absent, unknown parameters ignored.

use std::collections::BTreeMap;

use axum::http::{HeaderMap, header};

use super::errors::{Code, OAuthError};

/// The parameters of one request.
pub(super) struct Params(BTreeMap<String, String>);

/// Parameters that carry a credential; `Debug` shows only their names.
const SECRET: &[&str] = &["client_assertion", "subject_token", "actor_token", "token"];

impl std::fmt::Debug for Params {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(k, v)| {
                let shown = if SECRET.contains(&k.as_str()) {
                    "<redacted>"
                } else {
                    v.as_str()
                };
                (k, shown)
            }))
            .finish()
    }
}

impl Params {
    /// Parses `body`, refusing another content type and any parameter
    /// given twice.
    pub(super) fn parse(headers: &HeaderMap, body: &[u8]) -> Result<Self, OAuthError> {
        let form = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| {
                v.trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            });
        if !form {
            return Err(OAuthError::new(
                Code::InvalidRequest,
                "the body must be application/x-www-form-urlencoded",
            ));
        }
        let mut params = BTreeMap::new();
        for (name, value) in form_urlencoded::parse(body) {
            if value.is_empty() {
                continue;
            }
            if params
                .insert(name.to_string(), value.into_owned())
                .is_some()
            {
                return Err(OAuthError::new(
                    Code::InvalidRequest,
                    format!("parameter {name} is given more than once"),
                ));
            }
        }
        Ok(Self(params))
    }

    /// The parameter, if given.
    pub(super) fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// The parameter, or `invalid_request` naming it.
    pub(super) fn require(&self, name: &str) -> Result<&str, OAuthError> {
        self.get(name).ok_or_else(|| {
            OAuthError::new(
                Code::InvalidRequest,
                format!("parameter {name} is required"),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn form() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded; charset=UTF-8"),
        );
        h
    }

    #[test]
    fn debug_hides_credentials() {
        let p = Params::parse(
            &form(),
            b"grant_type=client_credentials&client_assertion=eyJhbGci.secret.sig&subject_token=eyJs3cret",
        )
        .unwrap();
        let shown = format!("{p:?}");
        assert!(shown.contains("client_credentials"), "{shown}");
        assert!(
            !shown.contains("secret") && !shown.contains("s3cret"),
            "{shown}"
        );
    }

    #[test]
    fn reads_each_parameter_once() {
        let p = Params::parse(
            &form(),
            b"grant_type=client_credentials&scope=a+b&empty=&x=%2F",
        )
        .unwrap();
        assert_eq!(p.get("grant_type"), Some("client_credentials"));
        assert_eq!(p.get("scope"), Some("a b"));
        assert_eq!(
            p.get("empty"),
            None,
            "a parameter without a value is absent"
        );
        assert_eq!(p.get("x"), Some("/"));
        let e = p.require("task_id").unwrap_err();
        assert_eq!(e.code(), Code::InvalidRequest);

        let twice = Params::parse(&form(), b"resource=a&resource=b").unwrap_err();
        assert_eq!(twice.code(), Code::InvalidRequest);
        let json = Params::parse(&HeaderMap::new(), b"{}").unwrap_err();
        assert_eq!(json.code(), Code::InvalidRequest);
    }
}
