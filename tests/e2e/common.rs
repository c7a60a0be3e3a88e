//! Helpers shared by the end-to-end tests.

use std::collections::HashMap;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use mayfly_client::{Client, Refusal, pb};
use mayfly_testkit::TestBroker;
use serde_json::Value;
use tonic::Code;

pub const API: &str = "https://api.example.com";
pub const TOOLS: &str = "https://tools.example.com";

/// Asserts `r` failed with `code` and a message containing `needle`.
#[track_caller]
pub fn assert_status<T: std::fmt::Debug, E: Into<Refusal>>(
    r: Result<T, E>,
    code: Code,
    needle: &str,
) {
    match r.map_err(Into::into) {
        Ok(v) => panic!("expected {code:?} ({needle}), got Ok({v:?})"),
        Err(s) => {
            assert_eq!(s.code, code, "message: {}", s.message);
            assert!(
                s.message.contains(needle),
                "message {:?} should contain {needle:?}",
                s.message
            );
        }
    }
}

pub fn start_request(intent: &str, audiences: &[&str], scopes: &[&str]) -> pb::StartTaskRequest {
    pb::StartTaskRequest {
        intent: intent.into(),
        context: HashMap::from([("environment".to_owned(), "test".to_owned())]),
        audiences: audiences.iter().map(|s| s.to_string()).collect(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        ttl_seconds: 0,
    }
}

pub fn token_request(task: &str, audience: &str, scopes: &[&str]) -> pb::IssueTokenRequest {
    pb::IssueTokenRequest {
        task_id: task.into(),
        audience: audience.into(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        ttl_seconds: 0,
        bind_to_client_cert: false,
        approval_id: String::new(),
        dpop_jwk: String::new(),
    }
}

/// Starts a task with the API audience and read/write scopes.
pub async fn start(client: &Client) -> pb::Task {
    client
        .broker()
        .start_task(start_request("e2e", &[API], &["read:files", "write:files"]))
        .await
        .unwrap()
        .into_inner()
}

pub async fn issue(client: &Client, task: &str) -> pb::IssuedToken {
    client
        .issue_token(token_request(task, API, &["read:files"]))
        .await
        .unwrap()
}

/// All leases matching a request, across pages.
pub async fn all_leases(op: &Client, mut req: pb::ListLeasesRequest) -> Vec<pb::Lease> {
    let mut out = Vec::new();
    loop {
        let r = op
            .admin()
            .list_leases(req.clone())
            .await
            .unwrap()
            .into_inner();
        out.extend(r.leases);
        if r.next_page_token.is_empty() {
            return out;
        }
        req.page_token = r.next_page_token;
    }
}

/// Every lease of a task (its own included), across pages.
pub async fn task_leases(op: &Client, task_id: &str) -> Vec<pb::Lease> {
    all_leases(
        op,
        pb::ListLeasesRequest {
            task_id: task_id.into(),
            ..Default::default()
        },
    )
    .await
}

/// Every line of the audit trail, read through the Admin API.
pub async fn audit_trail(op: &Client) -> Vec<String> {
    let mut stream = op
        .admin()
        .read_audit(pb::ReadAuditRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut lines = Vec::new();
    while let Some(batch) = stream.message().await.unwrap() {
        lines.extend(batch.records);
    }
    lines
}

pub async fn lease(op: &Client, id: &str) -> pb::Lease {
    op.admin()
        .get_lease(pb::GetLeaseRequest {
            lease_id: id.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// The token's claims, validated by the stock `jsonwebtoken` library
/// against the JWKS fetched over HTTPS (exact iss, aud, exp, typ, kid).
pub async fn validate(broker: &TestBroker, token: &str, audience: &str) -> Value {
    let (status, body) = mayfly_testkit::https_get(
        &format!("{}/.well-known/jwks.json", broker.http_url()),
        &broker.bundle_pem(),
    )
    .await;
    assert_eq!(status, 200);
    let jwks: JwkSet = serde_json::from_str(&body).unwrap();
    let header = jsonwebtoken::decode_header(token).unwrap();
    assert_eq!(header.typ.as_deref(), Some("at+jwt"));
    let kid = header.kid.expect("kid");
    let jwk = jwks.find(&kid).expect("kid in JWKS");
    let key = DecodingKey::from_jwk(jwk).unwrap();
    assert!(matches!(header.alg, Algorithm::ES256 | Algorithm::EdDSA));
    let mut v = Validation::new(header.alg);
    v.set_audience(&[audience]);
    v.set_issuer(&[broker.issuer()]);
    v.set_required_spec_claims(&["exp", "iss", "aud", "sub", "nbf"]);
    v.validate_nbf = true;
    jsonwebtoken::decode::<Value>(token, &key, &v)
        .unwrap()
        .claims
}

/// The claims without verification (for checking a rejected token's shape).
pub fn claims_unverified(token: &str) -> Value {
    let part = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

pub fn secs(ts: &Option<mayfly_client::Timestamp>) -> i64 {
    ts.as_ref().unwrap().seconds
}

/// The leaf (DER) a fresh TLS handshake with the broker's gRPC port is
/// shown, trusting `roots_pem`; `None` if the handshake fails.
pub async fn presented_leaf(broker: &TestBroker, roots_pem: &[u8]) -> Option<Vec<u8>> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(roots_pem) {
        roots.add(c.ok()?).ok()?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .ok()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let port = broker.url().rsplit(':').next()?.parse::<u16>().ok()?;
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").ok()?,
            tcp,
        )
        .await
        .ok()?;
    Some(tls.get_ref().1.peer_certificates()?.first()?.to_vec())
}

/// The value of the sample named exactly `series` (name and labels).
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.parse().unwrap())
}

/// The broker's `/metrics`, checked to be OpenMetrics text.
pub async fn scrape(broker: &TestBroker) -> String {
    let (status, body) = mayfly_testkit::https_get(
        &format!("{}/metrics", broker.http_url()),
        &broker.bundle_pem(),
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        body.ends_with("# EOF\n"),
        "OpenMetrics text ends with # EOF"
    );
    body
}

/// The value of a counter or gauge sample, 0 where it has none yet.
pub fn count(text: &str, series: &str) -> f64 {
    sample(text, series).unwrap_or(0.0)
}

/// Waits until `check` holds (checking every 25 ms, for at most 5 s);
/// panics with `what` if it never does.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..200 {
        if check().await {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("{what}");
}
