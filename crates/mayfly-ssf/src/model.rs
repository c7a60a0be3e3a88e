//! Streams: as stored, as the management API shows them, and the checks
//! every request body passes before anything is stored.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{EVENTS_SUPPORTED, POLL, PUSH, SPEC_VERSION};

/// Longest URL accepted (a push endpoint, a subject URI).
const MAX_URL: usize = 2048;
/// Longest description.
const MAX_DESCRIPTION: usize = 256;
/// Longest `authorization_header`.
const MAX_AUTHORIZATION: usize = 4096;
/// Most events a stream may request.
const MAX_EVENTS: usize = 16;
/// Most subjects a stream may hold.
pub const MAX_SUBJECTS: usize = 1000;

/// The Transmitter Configuration Metadata at
/// `/.well-known/ssf-configuration` of the broker at `issuer`.
pub fn metadata(issuer: &str) -> Value {
    let base = issuer.trim_end_matches('/');
    json!({
        "spec_version": SPEC_VERSION,
        "issuer": base,
        "jwks_uri": format!("{base}/.well-known/jwks.json"),
        "delivery_methods_supported": [PUSH, POLL],
        "configuration_endpoint": format!("{base}/ssf/streams"),
        "status_endpoint": format!("{base}/ssf/status"),
        "add_subject_endpoint": format!("{base}/ssf/subjects:add"),
        "remove_subject_endpoint": format!("{base}/ssf/subjects:remove"),
        "verification_endpoint": format!("{base}/ssf/verify"),
        // An OAuth token of the broker's own token endpoint, or the
        // receiver's X.509-SVID (RFC 8705).
        "authorization_schemes": [
            {"spec_urn": "urn:ietf:rfc:6749"},
            {"spec_urn": "urn:ietf:rfc:8705"},
        ],
        // A stream carries the subjects its receiver added, no others.
        "default_subjects": "NONE",
    })
}

/// Why a management request is refused: the HTTP status, and the body
/// `{"err", "description"}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{err}: {description}")]
pub struct ApiError {
    /// 400, 401, 403, 404, 409 or 413.
    pub status: u16,
    /// A short code.
    pub err: &'static str,
    /// What was wrong.
    pub description: String,
}

impl ApiError {
    /// 400: the body is not what the operation takes.
    pub fn invalid(description: impl Into<String>) -> Self {
        Self {
            status: 400,
            err: "invalid_request",
            description: description.into(),
        }
    }

    /// 404: no such stream of this receiver (another receiver's stream is
    /// answered 403, see [`Stream::owned_by`]).
    pub fn not_found(stream_id: &str) -> Self {
        Self {
            status: 404,
            err: "not_found",
            description: format!("no stream {stream_id}"),
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({"err": self.err, "description": self.description})
    }
}

/// How a stream's events reach its receiver.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "method")]
pub enum Delivery {
    /// RFC 8935: the broker POSTs each SET to the receiver's endpoint.
    #[serde(rename = "urn:ietf:rfc:8935")]
    Push {
        /// The receiver's endpoint.
        endpoint_url: String,
        /// Sent as `Authorization` with each SET, as the receiver asked.
        /// Kept to deliver after a restart; never shown again.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        authorization_header: Option<String>,
    },
    /// RFC 8936: the receiver POSTs to the stream's poll endpoint.
    #[serde(rename = "urn:ietf:rfc:8936")]
    Poll,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Push {
                endpoint_url,
                authorization_header,
            } => f
                .debug_struct("Push")
                .field("endpoint_url", endpoint_url)
                .field(
                    "authorization_header",
                    &authorization_header.as_ref().map(|_| "…"),
                )
                .finish(),
            Self::Poll => f.write_str("Poll"),
        }
    }
}

/// Whether a stream delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamStatus {
    /// Events are delivered.
    Enabled,
    /// Events are held, and delivered once enabled again.
    Paused,
    /// Events are dropped.
    Disabled,
}

/// A subject a stream carries the events of: an agent's SPIFFE ID or an
/// audience, as an RFC 9493 `uri` subject identifier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subject {
    /// Always `uri`.
    pub format: String,
    /// The SPIFFE ID or audience.
    pub uri: String,
}

impl Subject {
    /// Reads a subject identifier, refusing any but a `uri` one.
    pub fn parse(v: &Value) -> Result<Self, ApiError> {
        let s: Self = serde_json::from_value(v.clone()).map_err(|_| {
            ApiError::invalid(
                "subject must be {\"format\": \"uri\", \"uri\": …}: an agent's SPIFFE ID or an \
                 audience",
            )
        })?;
        if s.format != "uri" {
            return Err(ApiError::invalid(format!(
                "subject format {:?} is not supported: use \"uri\" (an agent's SPIFFE ID or an \
                 audience)",
                s.format
            )));
        }
        if s.uri.is_empty() || s.uri.len() > MAX_URL || s.uri.chars().any(char::is_control) {
            return Err(ApiError::invalid(
                "subject uri is empty, too long or not text",
            ));
        }
        Ok(s)
    }
}

/// A stream as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stream {
    /// Its id.
    pub stream_id: String,
    /// The receiver that made it (its SPIFFE ID): the `aud` of its SETs,
    /// and the only caller that may see or change it.
    pub receiver: String,
    /// How its events are delivered.
    pub delivery: Delivery,
    /// The events the receiver asked for.
    pub events_requested: Vec<String>,
    /// The receiver's description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Whether it delivers.
    pub status: StreamStatus,
    /// Why its status was last changed, as the receiver said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The subjects whose events it carries.
    #[serde(default)]
    pub subjects: Vec<String>,
}

/// Where the broker may push SETs: a receiver names its endpoint, and the
/// broker POSTs to it, so it must be one the operator allowed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PushPolicy {
    /// `https://` URL prefixes, each ending in `/`, an endpoint must
    /// start with (none: no `https://` endpoint is allowed).
    pub endpoints: Vec<String>,
    /// Also `http://` on a loopback address (a receiver on the broker's
    /// host, in development).
    pub loopback_http: bool,
}

impl PushPolicy {
    /// Checks the configured prefixes: each an `https://` URL with a host
    /// and a path ending in `/`, so that a prefix cannot be stretched
    /// into another host (`https://a.example` would let
    /// `https://a.example.evil.example` through).
    pub fn check(&self) -> Result<(), String> {
        for p in &self.endpoints {
            let host_and_path = p
                .strip_prefix("https://")
                .ok_or_else(|| format!("ssf.push_endpoints: {p:?} is not https://"))?;
            let (host, _) = host_and_path
                .split_once('/')
                .ok_or_else(|| format!("ssf.push_endpoints: {p:?} must end its host with /"))?;
            if host.is_empty() || host.contains('@') || !p.ends_with('/') {
                return Err(format!(
                    "ssf.push_endpoints: {p:?} must be https://host[:port]/path/ (ending in /)"
                ));
            }
        }
        Ok(())
    }
}

/// What a receiver asks for when it creates or replaces a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewStream {
    /// How its events are delivered.
    pub delivery: Delivery,
    /// The events asked for.
    pub events_requested: Vec<String>,
    /// The receiver's description.
    pub description: Option<String>,
}

impl NewStream {
    /// A create (`POST`) or replace (`PUT`) body: `delivery` is required,
    /// and a push endpoint must be one `push` allows.
    pub fn parse(body: &Value, push: &PushPolicy) -> Result<Self, ApiError> {
        let obj = body
            .as_object()
            .ok_or_else(|| ApiError::invalid("the body must be a JSON object"))?;
        let delivery = parse_delivery(
            obj.get("delivery")
                .ok_or_else(|| ApiError::invalid("delivery is required"))?,
            push,
        )?;
        Ok(Self {
            delivery,
            events_requested: parse_events(obj.get("events_requested"))?,
            description: parse_description(obj.get("description"))?,
        })
    }

    /// Applies an update (`PATCH`) body to `stream`: only the members it
    /// names change.
    pub fn patch(stream: &mut Stream, body: &Value, push: &PushPolicy) -> Result<(), ApiError> {
        let obj = body
            .as_object()
            .ok_or_else(|| ApiError::invalid("the body must be a JSON object"))?;
        let delivery = obj
            .get("delivery")
            .map(|d| parse_delivery(d, push))
            .transpose()?;
        let events = obj
            .get("events_requested")
            .map(|e| parse_events(Some(e)))
            .transpose()?;
        let description = obj
            .get("description")
            .map(|d| parse_description(Some(d)))
            .transpose()?;
        if let Some(d) = delivery {
            stream.delivery = d;
        }
        if let Some(e) = events {
            stream.events_requested = e;
        }
        if let Some(d) = description {
            stream.description = d;
        }
        Ok(())
    }
}

fn parse_delivery(v: &Value, push: &PushPolicy) -> Result<Delivery, ApiError> {
    let obj = v
        .as_object()
        .ok_or_else(|| ApiError::invalid("delivery must be an object"))?;
    let method = obj.get("method").and_then(Value::as_str).unwrap_or("");
    let url = obj.get("endpoint_url");
    match method {
        PUSH => {
            let url = url
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::invalid("push delivery needs endpoint_url"))?;
            check_push_url(url, push)?;
            let authorization_header = match obj.get("authorization_header") {
                None | Some(Value::Null) => None,
                Some(Value::String(h)) => {
                    if h.is_empty()
                        || h.len() > MAX_AUTHORIZATION
                        || !h.bytes().all(|b| (0x20..0x7f).contains(&b))
                    {
                        return Err(ApiError::invalid(
                            "authorization_header must be printable ASCII on one line",
                        ));
                    }
                    Some(h.clone())
                }
                Some(_) => return Err(ApiError::invalid("authorization_header must be a string")),
            };
            Ok(Delivery::Push {
                endpoint_url: url.to_owned(),
                authorization_header,
            })
        }
        POLL => {
            if url.is_some_and(|u| !u.is_null()) {
                return Err(ApiError::invalid(
                    "poll delivery: the transmitter supplies endpoint_url; leave it out",
                ));
            }
            Ok(Delivery::Poll)
        }
        other => Err(ApiError::invalid(format!(
            "delivery method {other:?} is not supported: {PUSH} or {POLL}"
        ))),
    }
}

/// A push endpoint is `https://` under one of the allowed prefixes, or
/// where allowed `http://` on a loopback address.
fn check_push_url(url: &str, push: &PushPolicy) -> Result<(), ApiError> {
    if url.len() > MAX_URL || url.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(ApiError::invalid("endpoint_url is too long or not a URL"));
    }
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| ApiError::invalid("endpoint_url is not an absolute URL"))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.is_empty() || authority.contains('@') {
        return Err(ApiError::invalid(
            "endpoint_url needs a host, and no user information",
        ));
    }
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    let loopback = host
        .parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback());
    // `..` could climb out of an allowed path.
    let climbs = rest
        .split(['?', '#'])
        .next()
        .unwrap_or("")
        .split('/')
        .any(|seg| seg == "..");
    match scheme {
        "https" if !climbs && push.endpoints.iter().any(|p| url.starts_with(p.as_str())) => Ok(()),
        "https" => Err(ApiError::invalid(
            "endpoint_url is not under an endpoint this broker pushes to (ssf.push_endpoints)",
        )),
        "http" if push.loopback_http && loopback => Ok(()),
        _ => Err(ApiError::invalid(
            "endpoint_url must be https:// under an endpoint this broker pushes to \
             (ssf.push_endpoints)",
        )),
    }
}

fn parse_events(v: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(Vec::new());
    };
    let list = v
        .as_array()
        .filter(|a| a.len() <= MAX_EVENTS)
        .ok_or_else(|| {
            ApiError::invalid(format!(
                "events_requested must be an array of at most {MAX_EVENTS}"
            ))
        })?;
    list.iter()
        .map(|e| {
            e.as_str()
                .filter(|s| s.len() <= MAX_URL)
                .map(str::to_owned)
                .ok_or_else(|| ApiError::invalid("events_requested holds a non-URI"))
        })
        .collect()
}

fn parse_description(v: Option<&Value>) -> Result<Option<String>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.len() <= MAX_DESCRIPTION => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::invalid(format!(
            "description must be a string of at most {MAX_DESCRIPTION} bytes"
        ))),
    }
}

impl Stream {
    /// A new, enabled stream of `receiver`, carrying no subject yet.
    pub fn new(stream_id: String, receiver: String, asked: NewStream) -> Self {
        Self {
            stream_id,
            receiver,
            delivery: asked.delivery,
            events_requested: asked.events_requested,
            description: asked.description,
            status: StreamStatus::Enabled,
            reason: None,
            subjects: Vec::new(),
        }
    }

    /// Refuses a caller other than the stream's receiver (403: the stream
    /// exists, and is not theirs).
    pub fn owned_by(self, caller: &str) -> Result<Self, ApiError> {
        if self.receiver == caller {
            Ok(self)
        } else {
            Err(ApiError {
                status: 403,
                err: "forbidden",
                description: format!("stream {} belongs to another receiver", self.stream_id),
            })
        }
    }

    /// The events it delivers: those asked for that the broker sends.
    pub fn events_delivered(&self) -> Vec<&str> {
        EVENTS_SUPPORTED
            .iter()
            .copied()
            .filter(|e| self.events_requested.iter().any(|r| r == e))
            .collect()
    }

    /// The Stream Configuration as the management API shows it (never
    /// the push `authorization_header`).
    pub fn config(&self, issuer: &str) -> Value {
        let base = issuer.trim_end_matches('/');
        let delivery = match &self.delivery {
            Delivery::Push { endpoint_url, .. } => {
                json!({"method": crate::PUSH, "endpoint_url": endpoint_url})
            }
            Delivery::Poll => json!({
                "method": crate::POLL,
                "endpoint_url": format!("{base}/ssf/poll/{}", self.stream_id),
            }),
        };
        let mut config = json!({
            "stream_id": self.stream_id,
            "iss": base,
            "aud": self.receiver,
            "events_supported": EVENTS_SUPPORTED,
            "events_requested": self.events_requested,
            "events_delivered": self.events_delivered(),
            "delivery": delivery,
            "min_verification_interval": 0,
        });
        if let Some(d) = &self.description {
            config["description"] = json!(d);
        }
        config
    }

    /// The stream's status as the status endpoint shows it.
    pub fn status_body(&self) -> Value {
        let mut body = json!({"stream_id": self.stream_id, "status": self.status});
        if let Some(r) = &self.reason {
            body["reason"] = json!(r);
        }
        body
    }

    /// Adds a subject; at most [`MAX_SUBJECTS`].
    pub fn add_subject(&mut self, subject: Subject) -> Result<(), ApiError> {
        if self.subjects.contains(&subject.uri) {
            return Ok(());
        }
        if self.subjects.len() >= MAX_SUBJECTS {
            return Err(ApiError::invalid(format!(
                "a stream holds at most {MAX_SUBJECTS} subjects"
            )));
        }
        self.subjects.push(subject.uri);
        Ok(())
    }

    /// Removes a subject; 404 if the stream does not hold it.
    pub fn remove_subject(&mut self, subject: &Subject) -> Result<(), ApiError> {
        let before = self.subjects.len();
        self.subjects.retain(|s| s != &subject.uri);
        if self.subjects.len() == before {
            return Err(ApiError {
                status: 404,
                err: "not_found",
                description: format!("stream {} does not hold {}", self.stream_id, subject.uri),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn push(url: &str) -> Value {
        json!({"delivery": {"method": PUSH, "endpoint_url": url}})
    }

    /// The development policy: one https prefix, and loopback http.
    fn dev() -> PushPolicy {
        PushPolicy {
            endpoints: vec!["https://receiver.example/".into()],
            loopback_http: true,
        }
    }

    #[test]
    fn push_endpoints_are_https_or_loopback() {
        for ok in [
            "https://receiver.example/events",
            "http://127.0.0.1:8080/ssf",
            "http://[::1]:9/x",
        ] {
            NewStream::parse(&push(ok), &dev()).unwrap();
        }
        // Without the development switch, allowed https only.
        let prod = PushPolicy {
            loopback_http: false,
            ..dev()
        };
        let e = NewStream::parse(&push("http://127.0.0.1:8080/ssf"), &prod).unwrap_err();
        assert!(
            e.description.starts_with("endpoint_url must be https://"),
            "{e}"
        );
        NewStream::parse(&push("https://receiver.example/events"), &prod).unwrap();
        // Nothing configured: no https endpoint at all.
        let e = NewStream::parse(
            &push("https://receiver.example/events"),
            &PushPolicy::default(),
        )
        .unwrap_err();
        assert!(e.description.contains("ssf.push_endpoints"), "{e}");
        for bad in [
            "http://receiver.example/events",
            "http://127.0.0.1.evil.example/x",
            "https://receiver.example.evil.example/events",
            "https://elsewhere.example/events",
            "https://receiver.example/../admin",
            "https://user@receiver.example/",
            "ftp://receiver.example/",
            "https:///nohost",
            "receiver.example/events",
            "https://receiver.example/a b",
        ] {
            let e = NewStream::parse(&push(bad), &dev()).unwrap_err();
            assert_eq!(e.status, 400, "{bad}");
        }
    }

    #[test]
    fn configured_prefixes_cannot_be_stretched() {
        for ok in [
            vec![],
            vec!["https://siem.example/".to_owned()],
            vec!["https://siem.example:8443/ssf/".to_owned()],
        ] {
            PushPolicy {
                endpoints: ok,
                loopback_http: false,
            }
            .check()
            .unwrap();
        }
        for bad in [
            "https://siem.example",
            "http://siem.example/",
            "https:///",
            "https://u@siem.example/",
            "https://siem.example/ssf",
        ] {
            let p = PushPolicy {
                endpoints: vec![bad.into()],
                loopback_http: false,
            };
            assert!(p.check().is_err(), "{bad}");
        }
    }

    #[test]
    fn hostile_bodies_are_refused_saying_why() {
        let cases = [
            (json!([]), "object"),
            (json!({}), "delivery is required"),
            (
                json!({"delivery": {"method": "urn:example:smtp"}}),
                "not supported",
            ),
            (
                json!({"delivery": {"method": POLL, "endpoint_url": "https://x.example/"}}),
                "transmitter supplies",
            ),
            (
                json!({"delivery": {"method": PUSH, "endpoint_url": "https://receiver.example/",
                    "authorization_header": "Bearer a\r\nX-Injected: 1"}}),
                "one line",
            ),
            (
                json!({"delivery": {"method": POLL}, "events_requested": vec!["e"; 17]}),
                "at most",
            ),
            (
                json!({"delivery": {"method": POLL}, "description": "d".repeat(300)}),
                "description",
            ),
        ];
        for (body, says) in cases {
            let e = NewStream::parse(&body, &dev()).unwrap_err();
            assert!(e.description.contains(says), "{body}: {e}");
        }
    }

    #[test]
    fn a_stream_shows_no_secret_and_only_its_receiver_may_touch_it() {
        let asked = NewStream::parse(
            &json!({
                "delivery": {"method": PUSH, "endpoint_url": "https://r.example/ssf",
                    "authorization_header": "Bearer s3cret"},
                "events_requested": [crate::SESSION_REVOKED, "https://example.com/unknown"],
            }),
            &PushPolicy {
                endpoints: vec!["https://r.example/".into()],
                loopback_http: false,
            },
        )
        .unwrap();
        let s = Stream::new("s1".into(), "spiffe://td/receiver".into(), asked);
        let shown = s.config("https://broker.example/").to_string();
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(!format!("{s:?}").contains("s3cret"));
        assert_eq!(s.events_delivered(), vec![crate::SESSION_REVOKED]);
        let stored = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Stream>(&stored).unwrap(), s);
        assert_eq!(
            s.clone().owned_by("spiffe://td/other").unwrap_err().status,
            403
        );
        assert!(s.owned_by("spiffe://td/receiver").is_ok());
    }

    #[test]
    fn subjects_are_uris_added_once_and_removed_once() {
        let mut s = Stream::new(
            "s1".into(),
            "r".into(),
            NewStream::parse(
                &json!({"delivery": {"method": POLL}}),
                &PushPolicy::default(),
            )
            .unwrap(),
        );
        let agent =
            Subject::parse(&json!({"format": "uri", "uri": "spiffe://td/agent/a"})).unwrap();
        s.add_subject(agent.clone()).unwrap();
        s.add_subject(agent.clone()).unwrap();
        assert_eq!(s.subjects.len(), 1);
        s.remove_subject(&agent).unwrap();
        assert_eq!(s.remove_subject(&agent).unwrap_err().status, 404);
        for bad in [
            json!({"format": "email", "email": "a@b.example"}),
            json!({"format": "uri"}),
            json!({"format": "uri", "uri": ""}),
            json!("spiffe://td/agent/a"),
        ] {
            assert_eq!(Subject::parse(&bad).unwrap_err().status, 400, "{bad}");
        }
    }
}
