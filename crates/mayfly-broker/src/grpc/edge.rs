//! What every gRPC request passes through before its service: a deadline
//! (the client's `grpc-timeout`, never more than the server's), and the
//! codec's "message too large" turned into the status gRPC convention
//! gives it (`RESOURCE_EXHAUSTED`, not `OUT_OF_RANGE`) with a message that
//! says what was wrong.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use mayfly_core::limits::MAX_WAIT;
use tonic::codegen::http;
use tonic::{Code, Status};

/// The server's own bound on one request (until its response starts; a
/// stream then runs on).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// `WaitApproval` may hold a request for up to [`MAX_WAIT`] by design: its
/// bound is that, plus the time to answer.
const WAIT_APPROVAL_PATH: &str = "/mayfly.v1.Broker/WaitApproval";
const WAIT_APPROVAL_TIMEOUT: Duration = MAX_WAIT.saturating_add(Duration::from_secs(5));

/// Adds [`GrpcEdge`] to a service.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcEdgeLayer;

impl<S> tower::Layer<S> for GrpcEdgeLayer {
    type Service = GrpcEdge<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcEdge { inner }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct GrpcEdge<S> {
    inner: S,
}

/// `grpc-timeout` (the gRPC over HTTP/2 spec: up to 8 digits and a unit,
/// `H M S m u n`).
fn client_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// How long the server gives a request: the client's `grpc-timeout`, never
/// more than the server's bound for that method.
fn deadline<B>(req: &http::Request<B>) -> Duration {
    let bound = if req.uri().path() == WAIT_APPROVAL_PATH {
        WAIT_APPROVAL_TIMEOUT
    } else {
        REQUEST_TIMEOUT
    };
    client_timeout(req.headers()).map_or(bound, |t| t.min(bound))
}

/// The codec's status for a message over the limit, said plainly and with
/// the conventional code; `None` for any other response.
fn oversize(headers: &http::HeaderMap) -> Option<Status> {
    if headers.get("grpc-status")?.as_bytes() != b"11" {
        return None;
    }
    let status = Status::from_header_map(headers)?;
    // "Error, decoded message length too large: found N bytes, the limit is: M bytes"
    let rest = status
        .message()
        .strip_prefix("Error, decoded message length too large: found ")?;
    let (found, rest) = rest.split_once(" bytes, the limit is: ")?;
    let limit = rest.strip_suffix(" bytes")?;
    Some(Status::resource_exhausted(format!(
        "request message is {found} bytes; at most {limit} are accepted"
    )))
}

impl<S, B, RB> tower::Service<http::Request<B>> for GrpcEdge<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let deadline = deadline(&req);
        let fut = self.inner.call(req);
        Box::pin(async move {
            match tokio::time::timeout(deadline, fut).await {
                Ok(Ok(mut res)) => {
                    if let Some(status) = oversize(res.headers()) {
                        let headers = res.headers_mut();
                        headers.remove("grpc-message");
                        // Our own message is plain ASCII: this cannot fail.
                        let _ = status.add_header(headers);
                    }
                    Ok(res)
                }
                Ok(Err(e)) => Err(e),
                Err(_) => Ok(Status::new(
                    Code::DeadlineExceeded,
                    format!(
                        "no answer within {} ms; nothing was issued",
                        deadline.as_millis()
                    ),
                )
                .into_http()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_grpc_timeout() {
        let h = |v: &'static str| {
            let mut m = http::HeaderMap::new();
            m.insert("grpc-timeout", http::HeaderValue::from_static(v));
            m
        };
        assert_eq!(client_timeout(&h("5S")), Some(Duration::from_secs(5)));
        assert_eq!(client_timeout(&h("250m")), Some(Duration::from_millis(250)));
        assert_eq!(client_timeout(&h("2H")), Some(Duration::from_secs(7200)));
        for bad in ["S", "123456789S", "5x", "-1S", ""] {
            assert_eq!(client_timeout(&h(bad)), None, "{bad}");
        }
        assert_eq!(client_timeout(&http::HeaderMap::new()), None);
    }

    #[test]
    fn a_wait_for_approval_may_outlast_other_requests() {
        let req = |path: &str, timeout: Option<&'static str>| {
            let mut r = http::Request::builder().uri(path).body(()).unwrap();
            if let Some(t) = timeout {
                r.headers_mut()
                    .insert("grpc-timeout", http::HeaderValue::from_static(t));
            }
            r
        };
        let wait = "/mayfly.v1.Broker/WaitApproval";
        assert_eq!(
            deadline(&req(wait, None)),
            MAX_WAIT + Duration::from_secs(5)
        );
        assert_eq!(deadline(&req(wait, Some("61S"))), Duration::from_secs(61));
        assert_eq!(
            deadline(&req(wait, Some("2H"))),
            MAX_WAIT + Duration::from_secs(5)
        );
        let issue = "/mayfly.v1.Broker/IssueToken";
        assert_eq!(deadline(&req(issue, None)), REQUEST_TIMEOUT);
        assert_eq!(deadline(&req(issue, Some("61S"))), REQUEST_TIMEOUT);
        assert_eq!(deadline(&req(issue, Some("5S"))), Duration::from_secs(5));
    }

    #[test]
    fn only_the_codecs_oversize_status_is_rewritten() {
        let headers = |s: Status| {
            let mut m = http::HeaderMap::new();
            s.add_header(&mut m).unwrap();
            m
        };
        let codec = Status::out_of_range(
            "Error, decoded message length too large: found 307212 bytes, the limit is: 262144 bytes",
        );
        let got = oversize(&headers(codec)).unwrap();
        assert_eq!(got.code(), Code::ResourceExhausted);
        assert_eq!(
            got.message(),
            "request message is 307212 bytes; at most 262144 are accepted"
        );
        assert!(oversize(&headers(Status::out_of_range("other"))).is_none());
        assert!(oversize(&headers(Status::invalid_argument("x"))).is_none());
    }
}
