//! The verifier against a real broker: live revocation, reconnects, broker
//! restarts, the RFC 8725 attack list, certificate binding, a silent feed,
//! and the tower layer.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{EncodingKey, Header};
use mayfly_client::{Client, NewTask, pb};
use mayfly_core::SpiffeId;
use mayfly_testkit::{Credential, RedisServer, TestBroker};
use mayfly_verify::{Verifier, VerifierConfig, VerifyError};
use serde_json::{Value, json};

const API: &str = "https://api.example.com";

fn validator_identity(broker: &TestBroker) -> Credential {
    broker
        .ca()
        .issue_svid(
            &SpiffeId::new("spiffe://example.org/api/validator").unwrap(),
            Duration::from_secs(3600),
        )
        .unwrap()
}

fn config(broker: &TestBroker, feed_on: &TestBroker) -> VerifierConfig {
    let id = validator_identity(broker);
    let mut c = VerifierConfig::new(&broker.issuer(), API, broker.bundle_pem()).with_feed(
        &feed_on.url(),
        id.cert_pem.as_bytes().to_vec(),
        id.key_pem.as_bytes().to_vec(),
    );
    c.jwks_url = format!("{}/.well-known/jwks.json", feed_on.http_url());
    c
}

async fn connect(broker: &TestBroker) -> Verifier {
    let v = Verifier::connect(config(broker, broker)).await.unwrap();
    assert!(
        v.wait_for_feed(Duration::from_secs(5)).await,
        "feed synchronised"
    );
    v
}

async fn token(agent: &Client, scopes: &[&str], bind: bool) -> (String, pb::IssuedToken) {
    let task = agent
        .start_task(
            NewTask::new("verify", [API])
                .scope("read:files")
                .scope("write:files"),
        )
        .await
        .unwrap()
        .detach();
    let t = agent
        .issue_token(pb::IssueTokenRequest {
            task_id: task.task_id.clone(),
            audience: API.into(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            ttl_seconds: 0,
            bind_to_client_cert: bind,
            approval_id: String::new(),
            dpop_jwk: String::new(),
        })
        .await
        .unwrap();
    (task.task_id, t)
}

async fn revoke(op: &Client, lease: &str) {
    op.admin()
        .revoke_lease(pb::RevokeLeaseRequest {
            lease_id: lease.into(),
            note: String::new(),
        })
        .await
        .unwrap();
}

/// Waits until `v` rejects `token` as revoked; returns how long that took.
async fn until_revoked(v: &Verifier, token: &str) -> Duration {
    let start = Instant::now();
    loop {
        match v.verify(token, None).await {
            Err(VerifyError::Revoked) => return start.elapsed(),
            Ok(_) => {}
            Err(e) => panic!("unexpected {e}"),
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "revocation never arrived"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_is_rejected_by_a_connected_validator() {
    let broker = TestBroker::start().await;
    let (agent, op) = (broker.agent().await, broker.operator().await);
    let v = connect(&broker).await;
    let (task_id, t) = token(&agent, &["read:files"], false).await;
    let ok = v.verify(&t.token, None).await.unwrap();
    assert_eq!(ok.agent.as_str(), "spiffe://example.org/agent/demo");
    assert_eq!(ok.task_id.as_str(), task_id);
    assert_eq!(ok.lease_id.as_str(), t.lease_id);
    assert_eq!(ok.scopes, vec!["read:files".to_owned()]);
    assert!(ok.has_scope("read:files") && !ok.has_scope("write:files"));
    revoke(&op, &t.lease_id).await;
    let took = until_revoked(&v, &t.token).await;
    assert!(took < Duration::from_secs(2), "{took:?}");

    // Completing a task revokes its tokens for validators too.
    let (task2, t2) = token(&agent, &["read:files"], false).await;
    v.verify(&t2.token, None).await.unwrap();
    agent.complete_task(&task2).await.unwrap();
    until_revoked(&v, &t2.token).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_validator_disconnected_during_the_revocation_catches_up() {
    let redis = RedisServer::start();
    let a = TestBroker::start_on_redis(&redis.url()).await;
    let mut b = a.replica().await;
    let (agent, op) = (a.agent().await, a.operator().await);
    // The validator follows replica B.
    let v = Verifier::connect(config(&a, &b)).await.unwrap();
    assert!(v.wait_for_feed(Duration::from_secs(5)).await);
    let (_, t) = token(&agent, &["read:files"], false).await;
    v.verify(&t.token, None).await.unwrap();

    // B goes away; the revocation happens through A meanwhile.
    b.stop().await;
    revoke(&op, &t.lease_id).await;
    assert!(!matches!(
        v.verify(&t.token, None).await,
        Err(VerifyError::Revoked)
    ));
    // B comes back on the same address; the validator resumes from its cursor.
    let b = b.restart().await;
    until_revoked(&v, &t.token).await;
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_feed_resumes_from_the_cursor_after_a_broker_restart() {
    let broker = TestBroker::start().await;
    let (agent, op) = (broker.agent().await, broker.operator().await);
    let v = connect(&broker).await;
    let (_, t1) = token(&agent, &["read:files"], false).await;
    revoke(&op, &t1.lease_id).await;
    until_revoked(&v, &t1.token).await;
    let cursor = v.feed_cursor();
    assert!(cursor > 0);

    let broker = broker.restart().await;
    let (agent, op) = (broker.agent().await, broker.operator().await);
    let (_, t2) = token(&agent, &["read:files"], false).await;
    revoke(&op, &t2.lease_id).await;
    until_revoked(&v, &t2.token).await;
    assert!(
        v.feed_cursor() > cursor,
        "the cursor went on after the restart"
    );
    assert_eq!(
        v.verify(&t1.token, None).await,
        Err(VerifyError::Revoked),
        "still revoked"
    );
    assert_eq!(v.revocations_held(), 2, "both revocations, each once");
}

/// Signs `claims` with `header` using the broker's own ES256 key: a token
/// only the checks after the signature can catch.
fn forge(broker: &TestBroker, mut header: Header, claims: &Value) -> String {
    let pem = std::fs::read(broker.config.data_dir.join("jwt-es256.key")).unwrap();
    header.alg = jsonwebtoken::Algorithm::ES256;
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_ec_pem(&pem).unwrap()).unwrap()
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc8725_attacks_are_rejected() {
    let broker = TestBroker::start().await;
    let agent = broker.agent().await;
    let v = connect(&broker).await;
    let (_, t) = token(&agent, &["read:files"], false).await;
    let real = jsonwebtoken::decode_header(&t.token).unwrap();
    let kid = real.kid.clone().unwrap();
    let claims: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(t.token.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    let payload = t.token.split('.').nth(1).unwrap();

    // alg none, no signature.
    let none = format!(
        "{}.{payload}.",
        b64(&json!({"alg": "none", "typ": "at+jwt", "kid": kid}))
    );
    assert_eq!(
        v.verify(&none, None).await,
        Err(VerifyError::Algorithm("none".into()))
    );

    // HS256 "signed" with the public key as the HMAC secret.
    let jwks = mayfly_testkit::https_get(
        &format!("{}/.well-known/jwks.json", broker.http_url()),
        &broker.bundle_pem(),
    )
    .await
    .1;
    let hs_header = Header {
        alg: jsonwebtoken::Algorithm::HS256,
        kid: Some(kid.clone()),
        typ: Some("at+jwt".into()),
        ..Default::default()
    };
    let hs = jsonwebtoken::encode(
        &hs_header,
        &claims,
        &EncodingKey::from_secret(jwks.as_bytes()),
    )
    .unwrap();
    assert_eq!(
        v.verify(&hs, None).await,
        Err(VerifyError::Algorithm("HS256".into()))
    );

    // RS256 is not on the list either.
    let rs = format!(
        "{}.{payload}.AAAA",
        b64(&json!({"alg": "RS256", "typ": "at+jwt", "kid": kid}))
    );
    assert_eq!(
        v.verify(&rs, None).await,
        Err(VerifyError::Algorithm("RS256".into()))
    );

    // A kid of an ES256 key with an EdDSA header.
    let ed = format!(
        "{}.{payload}.AAAA",
        b64(&json!({"alg": "EdDSA", "typ": "at+jwt", "kid": kid}))
    );
    assert!(matches!(
        v.verify(&ed, None).await,
        Err(VerifyError::KeyAlgorithmMismatch { .. })
    ));

    // Correctly signed, but the wrong typ, audience, issuer or times.
    let h = |typ: &str| Header {
        kid: Some(kid.clone()),
        typ: Some(typ.into()),
        ..Default::default()
    };
    assert_eq!(
        v.verify(&forge(&broker, h("JWT"), &claims), None).await,
        Err(VerifyError::WrongType(Some("JWT".into())))
    );
    let mut other_aud = claims.clone();
    other_aud["aud"] = "https://tools.example.com".into();
    assert_eq!(
        v.verify(&forge(&broker, h("at+jwt"), &other_aud), None)
            .await,
        Err(VerifyError::WrongAudience)
    );
    let mut other_iss = claims.clone();
    other_iss["iss"] = "https://evil.example.com".into();
    assert_eq!(
        v.verify(&forge(&broker, h("at+jwt"), &other_iss), None)
            .await,
        Err(VerifyError::WrongIssuer)
    );
    let now = claims["iat"].as_u64().unwrap();
    let mut expired = claims.clone();
    expired["exp"] = (now - 120).into();
    expired["nbf"] = (now - 600).into();
    assert_eq!(
        v.verify(&forge(&broker, h("at+jwt"), &expired), None).await,
        Err(VerifyError::Expired)
    );
    let mut within_leeway = claims.clone();
    within_leeway["exp"] = (now - 10).into();
    assert!(
        v.verify(&forge(&broker, h("at+jwt"), &within_leeway), None)
            .await
            .is_ok(),
        "30 s leeway"
    );
    let mut future = claims.clone();
    future["nbf"] = (now + 600).into();
    assert_eq!(
        v.verify(&forge(&broker, h("at+jwt"), &future), None).await,
        Err(VerifyError::NotYetValid)
    );

    // A flipped signature byte; an unknown kid.
    // (A middle character: the last one also carries padding bits.)
    let sig_start = t.token.rfind('.').unwrap() + 1;
    let mut bad_sig = t.token.clone().into_bytes();
    let i = sig_start + 10;
    bad_sig[i] = if bad_sig[i] == b'A' { b'B' } else { b'A' };
    let bad_sig = String::from_utf8(bad_sig).unwrap();
    assert_eq!(
        v.verify(&bad_sig, None).await,
        Err(VerifyError::BadSignature)
    );
    let unknown = forge(
        &broker,
        Header {
            kid: Some("nope".into()),
            typ: Some("at+jwt".into()),
            ..Default::default()
        },
        &claims,
    );
    assert_eq!(
        v.verify(&unknown, None).await,
        Err(VerifyError::UnknownKey(Some("nope".into())))
    );
    assert!(matches!(
        v.verify("garbage", None).await,
        Err(VerifyError::Malformed(_))
    ));

    // And the real token still passes.
    v.verify(&t.token, None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bound_token_needs_its_own_certificate() {
    let broker = TestBroker::start().await;
    let agent = broker.agent().await;
    let v = connect(&broker).await;
    let (_, t) = token(&agent, &["read:files"], true).await;
    let der = |pem: &[u8]| {
        use rustls_pki_types::CertificateDer;
        use rustls_pki_types::pem::PemObject;
        CertificateDer::from_pem_slice(pem)
            .unwrap()
            .as_ref()
            .to_vec()
    };
    let own = der(&std::fs::read(broker.path("identities/agent-demo/svid.pem")).unwrap());
    let other = der(validator_identity(&broker).cert_pem.as_bytes());
    assert_eq!(
        v.verify(&t.token, None).await,
        Err(VerifyError::CertificateRequired)
    );
    assert_eq!(
        v.verify(&t.token, Some(&other)).await,
        Err(VerifyError::CertificateMismatch)
    );
    let ok = v.verify(&t.token, Some(&own)).await.unwrap();
    assert_eq!(
        ok.bound_to.as_deref(),
        Some(mayfly_verify::cert_thumbprint(&own).as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_feed_fails_closed() {
    let mut broker =
        TestBroker::start_with(|c| c.feed.heartbeat = Duration::from_millis(100)).await;
    let agent = broker.agent().await;
    let mut closed = config(&broker, &broker);
    closed.feed.as_mut().unwrap().max_silence = Duration::from_millis(500);
    let mut open = closed.clone();
    open.feed.as_mut().unwrap().fail_open = true;
    let (closed, open) = (
        Verifier::connect(closed).await.unwrap(),
        Verifier::connect(open).await.unwrap(),
    );
    assert!(closed.wait_for_feed(Duration::from_secs(5)).await);
    let (_, t) = token(&agent, &["read:files"], false).await;
    closed.verify(&t.token, None).await.unwrap();

    broker.stop().await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(matches!(
        closed.verify(&t.token, None).await,
        Err(VerifyError::FeedStale(_))
    ));
    open.verify(&t.token, None)
        .await
        .expect("fail_open accepts while the feed is silent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tower_layer_guards_an_axum_router() {
    use axum::Router;
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use axum::routing::get;
    use mayfly_verify::VerifiedToken;
    use mayfly_verify::layer::{VerifyLayer, require_scope};
    use tower::ServiceExt;

    let broker = TestBroker::start().await;
    let agent = broker.agent().await;
    let v = connect(&broker).await;
    async fn files(
        axum::Extension(t): axum::Extension<VerifiedToken>,
    ) -> Result<String, axum::response::Response> {
        require_scope(&t, "read:files")?;
        Ok(format!("files for task {}", t.task_id))
    }
    let app = Router::new()
        .route("/files", get(files))
        .layer(VerifyLayer::new(v));
    let call = |auth: Option<String>| {
        let app = app.clone();
        async move {
            let mut req = Request::get("/files");
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            let resp = app.oneshot(req.body(Body::empty()).unwrap()).await.unwrap();
            let www = resp
                .headers()
                .get("www-authenticate")
                .map(|h| h.to_str().unwrap().to_owned());
            (resp.status(), www)
        }
    };
    // Every 401 names the RFC 9728 document a client finds the broker in.
    let meta = "https://api.example.com/.well-known/oauth-protected-resource";
    let (status, www) = call(None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        www.as_deref(),
        Some(format!("Bearer realm=\"mayfly\", resource_metadata=\"{meta}\"").as_str())
    );
    let (status, www) = call(Some("Bearer garbage".into())).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(www.unwrap().starts_with(&format!(
        "Bearer realm=\"mayfly\", resource_metadata=\"{meta}\", error=\"invalid_token\", error_description=\"malformed token"
    )));
    // The document itself needs no token, and points at the broker.
    let resp = app
        .clone()
        .oneshot(
            Request::get("/.well-known/oauth-protected-resource")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = axum::body::to_bytes(resp.into_body(), 4096).await.unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(doc["resource"], API);
    assert_eq!(
        doc["authorization_servers"],
        serde_json::json!([broker.issuer()])
    );
    assert_eq!(
        doc["bearer_methods_supported"],
        serde_json::json!(["header"])
    );
    // Only a GET of that path: anything else there still needs a token.
    let post = app
        .clone()
        .oneshot(
            Request::post("/.well-known/oauth-protected-resource")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(post.status(), StatusCode::UNAUTHORIZED);
    let (task_id, t) = token(&agent, &["read:files"], false).await;
    let (status, _) = call(Some(format!("Bearer {}", t.token))).await;
    assert_eq!(status, StatusCode::OK);
    let resp = app
        .clone()
        .oneshot(
            Request::get("/files")
                .header("authorization", format!("bearer {}", t.token))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let body = axum::body::to_bytes(resp.into_body(), 1024).await.unwrap();
    assert_eq!(body, format!("files for task {task_id}"));
    let (_, w) = token(&agent, &["write:files"], false).await;
    let (status, www) = call(Some(format!("Bearer {}", w.token))).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        www.as_deref(),
        Some("Bearer realm=\"mayfly\", error=\"insufficient_scope\", scope=\"read:files\"")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tonic_interceptor_checks_metadata() {
    let broker = TestBroker::start().await;
    let agent = broker.agent().await;
    let v = connect(&broker).await;
    let mut check = mayfly_verify::interceptor::interceptor(v);
    let (_, t) = token(&agent, &["read:files"], false).await;
    let mut req = tonic::Request::new(());
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", t.token).parse().unwrap(),
    );
    let ok = check(req).unwrap();
    let verified = ok
        .extensions()
        .get::<mayfly_verify::VerifiedToken>()
        .unwrap();
    assert_eq!(verified.lease_id.as_str(), t.lease_id);
    let err = check(tonic::Request::new(())).unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let mut bad = tonic::Request::new(());
    bad.metadata_mut()
        .insert("authorization", "Bearer x.y.z".parse().unwrap());
    assert_eq!(check(bad).unwrap_err().code(), tonic::Code::Unauthenticated);
}

/// A DPoP-bound token (RFC 9449) is accepted only with a proof for this
/// request, signed by its key, used once; each bad proof is refused naming
/// the check, and the token sent as a bearer token is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dpop_bound_token_needs_a_fresh_proof_for_each_request() {
    use mayfly_core::dpop::DpopError;
    use mayfly_testkit::DpopKey;
    use mayfly_verify::DpopRequest;

    let broker = TestBroker::start().await;
    let agent = broker.agent().await;
    let v = connect(&broker).await;
    let key = DpopKey::new();
    let task = agent
        .start_task(NewTask::new("dpop", [API]).scope("read:files"))
        .await
        .unwrap()
        .detach();
    let t = agent
        .issue_token(pb::IssueTokenRequest {
            task_id: task.task_id.clone(),
            audience: API.into(),
            scopes: vec!["read:files".into()],
            ttl_seconds: 0,
            bind_to_client_cert: false,
            approval_id: String::new(),
            dpop_jwk: key.jwk().to_string(),
        })
        .await
        .unwrap();
    let url = format!("{API}/files");
    fn get<'a>(proof: &'a str, url: &'a str) -> DpopRequest<'a> {
        DpopRequest {
            proof,
            method: "GET",
            url,
        }
    }

    let good = key.proof("GET", &url, Some(&t.token));
    let ok = v
        .verify_dpop(&t.token, get(&good, &url), None)
        .await
        .unwrap();
    assert_eq!(ok.dpop_key.as_deref(), Some(key.thumbprint().as_str()));
    assert_eq!(ok.bound_to, None);

    let mut stale = DpopKey::claims("GET", &url, Some(&t.token));
    stale["iat"] = (stale["iat"].as_u64().unwrap() - 3600).into();
    let mut no_ath = DpopKey::claims("GET", &url, Some(&t.token));
    no_ath.as_object_mut().unwrap().remove("ath");
    let other_key = DpopKey::new();
    let cases = [
        (good.clone(), "replayed jti"),
        (
            key.proof("GET", "https://api.example.com/other", Some(&t.token)),
            "wrong htu",
        ),
        (key.proof("DELETE", &url, Some(&t.token)), "wrong htm"),
        (key.sign(&stale), "stale iat"),
        (
            key.proof("GET", &url, Some("another.token.entirely")),
            "wrong ath",
        ),
        (key.sign(&no_ath), "no ath"),
        (other_key.proof("GET", &url, Some(&t.token)), "another key"),
    ];
    for (proof, what) in cases {
        let e = v
            .verify_dpop(&t.token, get(&proof, &url), None)
            .await
            .unwrap_err();
        let want = match what {
            "replayed jti" => matches!(e, VerifyError::Dpop(DpopError::Replayed)),
            "wrong htu" => matches!(e, VerifyError::Dpop(DpopError::Url { .. })),
            "wrong htm" => matches!(e, VerifyError::Dpop(DpopError::Method { .. })),
            "stale iat" => matches!(e, VerifyError::Dpop(DpopError::Stale(_))),
            "wrong ath" => matches!(e, VerifyError::Dpop(DpopError::WrongAth)),
            "no ath" => matches!(e, VerifyError::Dpop(DpopError::MissingAth)),
            _ => matches!(e, VerifyError::Dpop(DpopError::WrongKey)),
        };
        assert!(want, "{what}: {e}");
    }

    // As a bearer token: refused; and a bearer token with the DPoP scheme.
    assert_eq!(
        v.verify(&t.token, None).await,
        Err(VerifyError::DpopRequired)
    );
    let (_, bearer) = token(&agent, &["read:files"], false).await;
    let proof = key.proof("GET", &url, Some(&bearer.token));
    assert_eq!(
        v.verify_dpop(&bearer.token, get(&proof, &url), None).await,
        Err(VerifyError::NotDpopBound)
    );

    // Through the tower layer, as a client sends it.
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;
    let app = axum::Router::new()
        .route("/files", axum::routing::get(|| async { "files" }))
        .layer(mayfly_verify::layer::VerifyLayer::new(v.clone()));
    let call = |scheme: &str, proof: Option<String>| {
        let mut r = Request::get("/files").header("authorization", format!("{scheme} {}", t.token));
        if let Some(p) = proof {
            r = r.header("dpop", p);
        }
        app.clone().oneshot(r.body(Body::empty()).unwrap())
    };
    let resp = call("DPoP", Some(key.proof("GET", &url, Some(&t.token))))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = call("Bearer", None).await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let www = resp.headers()["www-authenticate"].to_str().unwrap();
    assert!(www.starts_with("DPoP realm=\"mayfly\""), "{www}");
    assert!(www.contains("error=\"invalid_token\""), "{www}");
    let resp = call("DPoP", Some(key.proof("POST", &url, Some(&t.token))))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let www = resp.headers()["www-authenticate"].to_str().unwrap();
    assert!(
        www.contains("error=\"invalid_dpop_proof\"") && www.contains("htm"),
        "{www}"
    );
    let resp = call("DPoP", None).await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_and_the_feed_identity_come_from_the_workload_api() {
    let broker = TestBroker::start().await;
    let (agent, op) = (broker.agent().await, broker.operator().await);
    // Served by the testkit from the public workload.proto, as SPIRE would.
    let api = broker
        .workload_api(
            "spiffe://example.org/api/validator",
            Duration::from_secs(3600),
        )
        .await;
    let mut c = VerifierConfig::from_workload_api(&broker.issuer(), API, &api.endpoint())
        .with_workload_feed(&broker.url());
    c.jwks_url = format!("{}/.well-known/jwks.json", broker.http_url());
    let v = Verifier::connect(c).await.unwrap();
    assert!(v.wait_for_feed(Duration::from_secs(5)).await);
    let (_, t) = token(&agent, &["read:files"], false).await;
    v.verify(&t.token, None).await.unwrap();
    revoke(&op, &t.lease_id).await;
    until_revoked(&v, &t.token).await;

    // A Workload API whose bundle is another CA's: the broker's
    // certificate is not trusted, so nothing is fetched.
    let other = std::sync::Arc::new(
        mayfly_broker::dev::DevCa::generate(&mayfly_core::TrustDomain::new("example.org").unwrap())
            .unwrap(),
    );
    let elsewhere = mayfly_testkit::WorkloadApi::start(
        other,
        "spiffe://example.org/api/validator",
        Duration::from_secs(3600),
    )
    .await;
    let mut c = VerifierConfig::from_workload_api(&broker.issuer(), API, &elsewhere.endpoint());
    c.jwks_url = format!("{}/.well-known/jwks.json", broker.http_url());
    match Verifier::connect(c).await {
        Err(VerifyError::JwksUnavailable(e @ mayfly_verify::JwksError::Handshake(_))) => {
            assert!(e.to_string().starts_with("TLS: "), "{e}");
            assert!(std::error::Error::source(&e).is_some(), "{e:?}");
        }
        other => panic!("expected the JWKS to be unavailable, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_accepted_before_is_still_refused_once_it_expires() {
    // The verifier keeps what it checked of a token for the next request;
    // its time is checked again every time.
    let broker = TestBroker::start().await;
    let agent = broker.agent().await;
    let mut c = config(&broker, &broker);
    c.leeway = Duration::ZERO;
    let v = Verifier::connect(c).await.unwrap();
    assert!(v.wait_for_feed(Duration::from_secs(5)).await);
    let (_, t) = token(&agent, &["read:files"], false).await;
    let header = jsonwebtoken::decode_header(&t.token).unwrap();
    let mut claims: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(t.token.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    claims["exp"] = json!(now + 2);
    let short = forge(&broker, header, &claims);
    assert!(v.verify(&short, None).await.is_ok());
    assert!(
        v.verify(&short, None).await.is_ok(),
        "again, from what was kept"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(v.verify(&short, None).await, Err(VerifyError::Expired));
}
