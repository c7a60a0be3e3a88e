//! The Shared Signals transmitter's HTTP side (SSF 1.0): discovery at
//! `/.well-known/ssf-configuration`, the stream management API under
//! `/ssf/`, and each poll stream's endpoint (RFC 8936).
//!
//! A receiver proves itself with its X.509-SVID (RFC 8705) or with a token
//! of this broker's token endpoint for the audience `<issuer>/ssf`; it must
//! be one the broker lets watch the revocation feed (`feed.watchers`), for
//! a stream carries what the feed does. It sees and changes only its own
//! streams: another's is answered 403.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use mayfly_core::{SpiffeId, SpiffeIdPattern, Timestamp};
use mayfly_ssf::{ApiError, Delivery, NewStream, PollRequest, Stream, StreamStatus, Subject};
use serde::Deserialize;
use serde_json::Value;

use super::HttpState;
use crate::auth::caller_of;
use crate::connections::PeerInfo;
use crate::signals::{Signals, new_stream_id};

/// Most streams one receiver may hold.
const MAX_STREAMS: usize = 16;
/// How long a long poll waits for news.
const LONG_POLL: Duration = Duration::from_secs(15);
/// Longest verification `state`.
const MAX_STATE: usize = 256;

/// What the routes need.
#[derive(Debug)]
pub struct SsfState {
    /// The transmitter.
    pub signals: Signals,
    /// Who may be a receiver.
    pub receivers: Vec<SpiffeIdPattern>,
    /// The audience of receivers' tokens: `<issuer>/ssf`.
    pub audience: String,
    /// Where push endpoints may be.
    pub push: mayfly_ssf::PushPolicy,
}

type Answer = Result<Response, ApiError>;

fn ssf(s: &HttpState) -> Result<&Arc<SsfState>, ApiError> {
    s.ssf.as_ref().ok_or(ApiError {
        status: 404,
        err: "not_found",
        description: "this broker transmits no shared signals".into(),
    })
}

fn respond(answer: Answer) -> Response {
    match answer {
        Ok(r) => r,
        Err(e) => {
            let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST);
            let mut r = (status, axum::Json(e.body())).into_response();
            if e.status == 401 {
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer realm=\"mayfly-ssf\""),
                );
            }
            r
        }
    }
}

fn unavailable(e: impl std::fmt::Display) -> ApiError {
    tracing::warn!(error = %e, "shared signals: store unavailable");
    ApiError {
        status: 503,
        err: "temporarily_unavailable",
        description: "the store cannot be reached; try again".into(),
    }
}

fn unauthorized(description: &str) -> ApiError {
    ApiError {
        status: 401,
        err: "unauthorized",
        description: description.into(),
    }
}

/// The receiver making a request: who it is, and the transmitter it
/// speaks to. Extracting it authenticates and authorizes the caller.
pub(super) struct Receiver {
    id: SpiffeId,
    state: Arc<SsfState>,
}

impl axum::extract::FromRequestParts<HttpState> for Receiver {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        s: &HttpState,
    ) -> Result<Self, Response> {
        let peer = parts
            .extensions
            .get::<PeerInfo>()
            .cloned()
            .ok_or_else(|| respond(Err(unauthorized("no TLS peer"))))?;
        let id = receiver(s, &peer, &parts.headers)
            .await
            .map_err(|e| respond(Err(e)))?;
        let state = ssf(s).map_err(|e| respond(Err(e)))?.clone();
        Ok(Self { id, state })
    }
}

impl Receiver {
    /// Its own stream `id`: 404 if there is none, 403 if another's.
    async fn stream(&self, id: &str) -> Result<Stream, ApiError> {
        self.state
            .signals
            .tx
            .streams
            .get_stream(id)
            .await
            .map_err(unavailable)?
            .ok_or_else(|| ApiError::not_found(id))?
            .owned_by(self.id.as_str())
    }

    /// The stream a request body names, and the body.
    async fn named(&self, body: &Bytes) -> Result<(Stream, Value), ApiError> {
        let body = json_body(body)?;
        let id = body
            .get("stream_id")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::invalid("stream_id is required"))?;
        Ok((self.stream(id).await?, body))
    }

    /// The stream a query names.
    async fn queried(&self, q: StreamQuery) -> Result<Stream, ApiError> {
        let id = q
            .stream_id
            .ok_or_else(|| ApiError::invalid("stream_id is required"))?;
        self.stream(&id).await
    }

    async fn put(&self, stream: &Stream) -> Result<(), ApiError> {
        self.state
            .signals
            .tx
            .streams
            .put_stream(stream)
            .await
            .map_err(unavailable)
    }

    fn issuer(&self) -> &str {
        &self.state.signals.tx.issuer
    }

    fn tx(&self) -> &mayfly_ssf::Transmitter {
        &self.state.signals.tx
    }
}

/// The receiver making the request, which must be allowed to be one.
async fn receiver(
    s: &HttpState,
    peer: &PeerInfo,
    headers: &HeaderMap,
) -> Result<SpiffeId, ApiError> {
    let state = ssf(s)?;
    let cert = caller_of(peer, Timestamp::now()).ok();
    let id = match headers.get(header::AUTHORIZATION) {
        Some(value) => {
            let token = value
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer "))
                .ok_or_else(|| unauthorized("Authorization must be a Bearer token"))?;
            s.service
                .issuance()
                .bearer_holder(
                    token.trim(),
                    &state.audience,
                    cert.as_ref().and_then(|c| c.cert_thumbprint()),
                )
                .await
                .map_err(unavailable)?
                .ok_or_else(|| {
                    unauthorized(&format!(
                        "the token is not a live token of this broker for {}",
                        state.audience
                    ))
                })?
        }
        None => {
            cert.ok_or_else(|| {
                unauthorized("present an X.509-SVID or a Bearer token of this broker")
            })?
            .id
        }
    };
    if !state.receivers.iter().any(|p| p.matches(&id)) {
        return Err(ApiError {
            status: 403,
            err: "forbidden",
            description: format!("{id} may not receive shared signals (feed.watchers)"),
        });
    }
    Ok(id)
}

fn json_body(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("the body is not JSON: {e}")))
}

fn json(status: StatusCode, v: Value) -> Response {
    (status, axum::Json(v)).into_response()
}

/// `GET /.well-known/ssf-configuration`.
pub(super) async fn configuration(State(s): State<HttpState>) -> Response {
    respond(ssf(&s).map(|state| {
        json(
            StatusCode::OK,
            mayfly_ssf::metadata(&state.signals.tx.issuer),
        )
    }))
}

#[derive(Deserialize)]
pub(super) struct StreamQuery {
    stream_id: Option<String>,
}

/// `POST /ssf/streams`: a new stream, 201.
pub(super) async fn create(r: Receiver, body: Bytes) -> Response {
    respond(
        async {
            let asked = NewStream::parse(&json_body(&body)?, &r.state.push)?;
            let all = r.tx().streams.all_streams().await.map_err(unavailable)?;
            let held = all.iter().filter(|st| st.receiver == r.id.as_str()).count();
            if held >= MAX_STREAMS {
                return Err(ApiError {
                    status: 409,
                    err: "conflict",
                    description: format!("{} holds {MAX_STREAMS} streams already", r.id),
                });
            }
            let stream = Stream::new(new_stream_id(), r.id.to_string(), asked);
            // It carries what is revoked from now on.
            r.tx()
                .start_at_head(&stream.stream_id)
                .await
                .map_err(unavailable)?;
            r.put(&stream).await?;
            Ok(json(StatusCode::CREATED, stream.config(r.issuer())))
        }
        .await,
    )
}

/// `GET /ssf/streams[?stream_id=]`: one stream, or all the caller's.
pub(super) async fn read(r: Receiver, Query(q): Query<StreamQuery>) -> Response {
    respond(
        async {
            if q.stream_id.is_some() {
                return Ok(json(StatusCode::OK, r.queried(q).await?.config(r.issuer())));
            }
            let all = r.tx().streams.all_streams().await.map_err(unavailable)?;
            let mine: Vec<Value> = all
                .iter()
                .filter(|st| st.receiver == r.id.as_str())
                .map(|st| st.config(r.issuer()))
                .collect();
            Ok(json(StatusCode::OK, Value::Array(mine)))
        }
        .await,
    )
}

/// `PATCH /ssf/streams`: the members given change.
pub(super) async fn update(r: Receiver, body: Bytes) -> Response {
    respond(
        async {
            let (mut stream, body) = r.named(&body).await?;
            NewStream::patch(&mut stream, &body, &r.state.push)?;
            r.put(&stream).await?;
            Ok(json(StatusCode::OK, stream.config(r.issuer())))
        }
        .await,
    )
}

/// `PUT /ssf/streams`: every receiver-supplied member replaced.
pub(super) async fn replace(r: Receiver, body: Bytes) -> Response {
    respond(
        async {
            let (mut stream, body) = r.named(&body).await?;
            let asked = NewStream::parse(&body, &r.state.push)?;
            stream.delivery = asked.delivery;
            stream.events_requested = asked.events_requested;
            stream.description = asked.description;
            r.put(&stream).await?;
            Ok(json(StatusCode::OK, stream.config(r.issuer())))
        }
        .await,
    )
}

/// `DELETE /ssf/streams?stream_id=`: 204.
pub(super) async fn delete(r: Receiver, Query(q): Query<StreamQuery>) -> Response {
    respond(
        async {
            let stream = r.queried(q).await?;
            r.tx()
                .streams
                .delete_stream(&stream.stream_id)
                .await
                .map_err(unavailable)?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        .await,
    )
}

/// `GET /ssf/status?stream_id=`.
pub(super) async fn status(r: Receiver, Query(q): Query<StreamQuery>) -> Response {
    respond(async { Ok(json(StatusCode::OK, r.queried(q).await?.status_body())) }.await)
}

/// `POST /ssf/status`: enabled, paused (events wait) or disabled (events
/// are dropped).
pub(super) async fn set_status(r: Receiver, body: Bytes) -> Response {
    respond(
        async {
            let (mut stream, body) = r.named(&body).await?;
            let status: StreamStatus = body
                .get("status")
                .cloned()
                .and_then(|v| serde_json::from_value(v).ok())
                .ok_or_else(|| ApiError::invalid("status must be enabled, paused or disabled"))?;
            let reason = short_string(&body, "reason")?.map(str::to_owned);
            // What came while it was disabled is dropped.
            if stream.status == StreamStatus::Disabled && status != StreamStatus::Disabled {
                r.tx()
                    .start_at_head(&stream.stream_id)
                    .await
                    .map_err(unavailable)?;
            }
            stream.status = status;
            stream.reason = reason;
            r.put(&stream).await?;
            Ok(json(StatusCode::OK, stream.status_body()))
        }
        .await,
    )
}

/// An optional short string member of `body`.
fn short_string<'a>(body: &'a Value, name: &str) -> Result<Option<&'a str>, ApiError> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(v)) if v.len() <= MAX_STATE => Ok(Some(v)),
        Some(_) => Err(ApiError::invalid(format!(
            "{name} must be a string of at most {MAX_STATE} bytes"
        ))),
    }
}

/// `POST /ssf/subjects:add`: 200.
pub(super) async fn add_subject(r: Receiver, body: Bytes) -> Response {
    subjects(r, body, true).await
}

/// `POST /ssf/subjects:remove`: 204.
pub(super) async fn remove_subject(r: Receiver, body: Bytes) -> Response {
    subjects(r, body, false).await
}

async fn subjects(r: Receiver, body: Bytes, add: bool) -> Response {
    respond(
        async {
            let (mut stream, body) = r.named(&body).await?;
            let subject = Subject::parse(
                body.get("subject")
                    .ok_or_else(|| ApiError::invalid("subject is required"))?,
            )?;
            let done = if add {
                stream.add_subject(subject)?;
                StatusCode::OK
            } else {
                stream.remove_subject(&subject)?;
                StatusCode::NO_CONTENT
            };
            r.put(&stream).await?;
            Ok(done.into_response())
        }
        .await,
    )
}

/// `POST /ssf/verify`: a verification SET with the receiver's `state`
/// follows on the stream (204).
pub(super) async fn verify(r: Receiver, body: Bytes) -> Response {
    respond(
        async {
            let (stream, body) = r.named(&body).await?;
            let set = mayfly_ssf::verification_set(
                &stream,
                r.issuer(),
                Timestamp::now().as_secs(),
                short_string(&body, "state")?,
                &new_stream_id(),
            );
            r.tx()
                .queue_verification(&stream, &set)
                .await
                .map_err(unavailable)?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        .await,
    )
}

/// `POST /ssf/poll/{stream_id}`: RFC 8936.
pub(super) async fn poll(r: Receiver, Path(id): Path<String>, body: Bytes) -> Response {
    respond(
        async {
            let stream = r.stream(&id).await?;
            if stream.delivery != Delivery::Poll {
                return Err(ApiError::invalid(format!(
                    "stream {id} is delivered by push, not polled"
                )));
            }
            let req = PollRequest::parse(&json_body(&body)?)?;
            let news = r.state.signals.news.clone();
            let answer = r
                .tx()
                .poll(&stream, &req, LONG_POLL, || {
                    let mut rx = news.clone();
                    async move {
                        let _ = rx.changed().await;
                    }
                })
                .await
                .map_err(unavailable)?;
            Ok(json(StatusCode::OK, answer))
        }
        .await,
    )
}
