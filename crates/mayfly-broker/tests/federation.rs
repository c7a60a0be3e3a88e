//! Workload tokens from issuers the test runs itself (keys made per test,
//! JWKS served over HTTPS from the test's own CA): a Kubernetes
//! service-account token, a GitHub-Actions-style OIDC token and a JWT-SVID
//! each map to their SPIFFE ID, and every hostile token is refused naming
//! the failed check.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use mayfly_broker::config::FederationConfig;
use mayfly_broker::federation::{Federation, TokenError};
use mayfly_core::TrustDomain;
use mayfly_testkit::oidc::unix_now;
use mayfly_testkit::{JwksServer, TokenIssuer};
use serde_json::{Value, json};

const BROKER: &str = "https://mayfly.example.org";
const K8S: &str = "https://kubernetes.default.svc.cluster.local";
const GITHUB: &str = "https://token.actions.githubusercontent.com";

struct Setup {
    federation: Federation,
    k8s: TokenIssuer,
    github: TokenIssuer,
    spire: TokenIssuer,
    server: JwksServer,
    _dir: tempfile::TempDir,
}

fn entry(text: &str) -> FederationConfig {
    toml::from_str(text).unwrap()
}

/// The Kubernetes-style entry: its JWKS from `server` (trusting the CA
/// written into `dir`), with `extra` lines.
fn k8s_entry(server: &JwksServer, dir: &std::path::Path, extra: &str) -> FederationConfig {
    let ca = dir.join("jwks-ca.pem");
    std::fs::write(&ca, &server.ca_pem).unwrap();
    entry(&format!(
        r#"issuer = "{K8S}"
           jwks_url = "{url}"
           ca = "{ca}"
           algorithms = ["RS256"]
           subject = "system:serviceaccount:{{ns}}:{{sa}}"
           spiffe_id = "spiffe://example.org/ns/{{ns}}/sa/{{sa}}"
           {extra}"#,
        url = server.url,
        ca = ca.display()
    ))
}

async fn setup() -> Setup {
    let k8s = TokenIssuer::rsa(K8S, "k8s-1");
    let github = TokenIssuer::rsa(GITHUB, "gh-1");
    let spire = TokenIssuer::ec("", "spire-1");
    let server = JwksServer::start(TokenIssuer::jwks(&[&k8s])).await;
    let dir = tempfile::tempdir().unwrap();
    let gh_jwks = dir.path().join("github.json");
    std::fs::write(&gh_jwks, TokenIssuer::jwks(&[&github])).unwrap();
    let bundle = dir.path().join("bundle.json");
    std::fs::write(&bundle, TokenIssuer::jwks(&[&spire])).unwrap();
    let configs = vec![
        k8s_entry(
            &server,
            dir.path(),
            "jwks_refresh = \"1s\"\nsingle_use = false",
        ),
        entry(&format!(
            r#"issuer = "{GITHUB}"
               jwks_file = "{file}"
               audience = "mayfly"
               max_age = "10m"
               subject = "repo:octo-org/{{repo}}:ref:refs/heads/{{branch}}"
               spiffe_id = "spiffe://example.org/ci/{{repo}}/{{branch}}"
               [claims]
               repository_owner = "octo-org""#,
            file = gh_jwks.display()
        )),
        entry(&format!(
            r#"spiffe_bundle = "{file}"
               algorithms = ["ES256"]"#,
            file = bundle.display()
        )),
    ];
    let td = TrustDomain::new("example.org").unwrap();
    let federation = Federation::load(&configs, BROKER, &td).unwrap();
    federation.fetch_all().await;
    Setup {
        federation,
        k8s,
        github,
        spire,
        server,
        _dir: dir,
    }
}

fn k8s_claims(sa: &str) -> Value {
    let now = unix_now();
    json!({
        "iss": K8S, "aud": [BROKER], "sub": format!("system:serviceaccount:prod:{sa}"),
        "iat": now, "nbf": now, "exp": now + 600,
        "kubernetes.io": {"namespace": "prod", "serviceaccount": {"name": sa}},
    })
}

fn github_claims() -> Value {
    let now = unix_now();
    json!({
        "iss": GITHUB, "aud": "mayfly", "sub": "repo:octo-org/api:ref:refs/heads/main",
        "repository_owner": "octo-org", "repository": "octo-org/api",
        "iat": now, "nbf": now, "exp": now + 300, "jti": "run-1",
    })
}

fn svid_claims(sub: &str) -> Value {
    let now = unix_now();
    json!({"sub": sub, "aud": [BROKER], "iat": now, "exp": now + 300})
}

#[tokio::test]
async fn each_kind_of_token_maps_to_its_spiffe_id() {
    let s = setup().await;
    let id = s
        .federation
        .verify(&s.k8s.sign(&k8s_claims("billing")))
        .await
        .unwrap();
    assert_eq!(id.id.as_str(), "spiffe://example.org/ns/prod/sa/billing");
    assert_eq!(id.issuer, K8S);
    // Its entry takes reused tokens: the jti is not kept for a replay check.
    let mut c = k8s_claims("billing");
    c["jti"] = json!("pod-token-1");
    let id = s.federation.verify(&s.k8s.sign(&c)).await.unwrap();
    assert_eq!(id.jti, None);

    let id = s
        .federation
        .verify(&s.github.sign(&github_claims()))
        .await
        .unwrap();
    assert_eq!(id.id.as_str(), "spiffe://example.org/ci/api/main");
    assert_eq!(id.jti.as_deref(), Some("run-1"));

    let token = s
        .spire
        .sign(&svid_claims("spiffe://example.org/agent/demo"));
    let id = s.federation.verify(&token).await.unwrap();
    assert_eq!(id.id.as_str(), "spiffe://example.org/agent/demo");
    assert_eq!(id.issuer, "spiffe://example.org");
}

/// What a refusal must be.
type Expect = fn(&TokenError) -> bool;

/// Asserts `token` is refused with `want`.
async fn refused(s: &Setup, token: &str, want: impl Fn(&TokenError) -> bool, what: &str) {
    match s.federation.verify(token).await {
        Err(e) => assert!(want(&e), "{what}: {e}"),
        Ok(id) => panic!("{what}: accepted as {}", id.id),
    }
}

#[tokio::test]
async fn every_hostile_token_is_refused_naming_the_check() {
    let s = setup().await;
    let now = unix_now();
    let with = |mut c: Value, k: &str, v: Value| {
        c[k] = v;
        c
    };
    let without = |mut c: Value, k: &str| {
        c.as_object_mut().unwrap().remove(k);
        c
    };
    let base = k8s_claims("billing");
    use TokenError as E;

    let cases: Vec<(&str, String, Expect)> = vec![
        (
            "expired",
            s.k8s.sign(&with(base.clone(), "exp", json!(now - 120))),
            |e| matches!(e, E::Expired),
        ),
        (
            "not yet valid",
            s.k8s.sign(&with(base.clone(), "nbf", json!(now + 600))),
            |e| matches!(e, E::NotYetValid),
        ),
        (
            "issued in the future",
            s.k8s.sign(&with(base.clone(), "iat", json!(now + 600))),
            |e| matches!(e, E::NotYetValid),
        ),
        (
            "wrong audience",
            s.k8s
                .sign(&with(base.clone(), "aud", json!(["https://other.example"]))),
            |e| matches!(e, E::WrongAudience(_)),
        ),
        (
            "unknown issuer",
            s.k8s
                .sign(&with(base.clone(), "iss", json!("https://evil.example"))),
            |e| matches!(e, E::UnknownIssuer(i) if i == "https://evil.example"),
        ),
        (
            "signed by another issuer's key (GitHub's key, Kubernetes' iss)",
            s.github.sign(&base),
            |e| matches!(e, E::UnknownKey { kid, issuer } if kid == "gh-1" && issuer == K8S),
        ),
        (
            "a kid of another issuer, signed by its own key",
            {
                let mut h = Header::new(Algorithm::RS256);
                h.kid = Some("gh-1".into());
                s.k8s.sign_with(&h, &base)
            },
            |e| matches!(e, E::UnknownKey { .. }),
        ),
        (
            "no expiry",
            s.k8s.sign(&without(base.clone(), "exp")),
            |e| matches!(e, E::NoExpiry),
        ),
        (
            "no issue time",
            s.k8s.sign(&without(base.clone(), "iat")),
            |e| matches!(e, E::NoIssuedAt),
        ),
        (
            "older than max_age",
            s.github
                .sign(&with(github_claims(), "iat", json!(now - 3600))),
            |e| matches!(e, E::TooOld { max: 600, .. }),
        ),
        (
            "a required claim differs",
            s.github.sign(&with(
                github_claims(),
                "repository_owner",
                json!("evil-org"),
            )),
            |e| matches!(e, E::Claim(c) if c == "repository_owner"),
        ),
        (
            "a subject outside the pattern",
            s.github.sign(&with(
                github_claims(),
                "sub",
                json!("repo:evil-org/api:ref:refs/heads/main"),
            )),
            |e| matches!(e, E::Subject(_)),
        ),
        (
            "a part that would add path segments",
            s.k8s.sign(&with(
                base.clone(),
                "sub",
                json!("system:serviceaccount:prod:a/../../operator/admin"),
            )),
            |e| matches!(e, E::Mapping { .. }),
        ),
        (
            "a JWT-SVID of another trust domain",
            s.spire
                .sign(&svid_claims("spiffe://evil.example/agent/demo")),
            |e| matches!(e, E::Mapping { reason, .. } if reason.contains("trust domain")),
        ),
        (
            "a JWT-SVID naming a task",
            s.spire.sign(&svid_claims(
                "spiffe://example.org/agent/demo/task/AAAAAAAAAAAAAAAAAAAAAA",
            )),
            |e| matches!(e, E::Mapping { .. }),
        ),
        (
            "an algorithm the issuer does not allow (ES256 for Kubernetes)",
            {
                let mut h = Header::new(Algorithm::ES256);
                h.kid = Some("spire-1".into());
                s.spire.sign_with(&h, &base)
            },
            |e| matches!(e, E::Algorithm(a) if a == "ES256"),
        ),
        ("alg none", unsigned(&base), |e| matches!(e, E::Unsigned)),
        (
            "HS256 keyed with the issuer's public key",
            {
                let public = serde_json::to_vec(&s.k8s.jwk()).unwrap();
                let mut h = Header::new(Algorithm::HS256);
                h.kid = Some("k8s-1".into());
                jsonwebtoken::encode(&h, &base, &EncodingKey::from_secret(&public)).unwrap()
            },
            |e| matches!(e, E::Algorithm(a) if a == "HS256"),
        ),
        ("a tampered payload", tampered(&s.k8s.sign(&base)), |e| {
            matches!(e, E::BadSignature)
        }),
        ("not a JWS", "a.b".to_owned(), |e| {
            matches!(e, E::Malformed(_))
        }),
        ("too large", "a".repeat(17 * 1024), |e| {
            matches!(e, E::Malformed(_))
        }),
    ];
    for (what, token, want) in cases {
        refused(&s, &token, want, what).await;
    }
}

/// The claims with `alg: none` and no signature.
fn unsigned(claims: &Value) -> String {
    use base64::Engine;
    let b64 = |v: &Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
    };
    format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "kid": "k8s-1"})),
        b64(claims)
    )
}

/// The token with its payload's `sub` changed and the signature kept.
fn tampered(token: &str) -> String {
    use base64::Engine;
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let parts: Vec<&str> = token.split('.').collect();
    let mut claims: Value = serde_json::from_slice(&engine.decode(parts[1]).unwrap()).unwrap();
    claims["sub"] = json!("system:serviceaccount:prod:admin");
    format!(
        "{}.{}.{}",
        parts[0],
        engine.encode(serde_json::to_vec(&claims).unwrap()),
        parts[2]
    )
}

#[tokio::test]
async fn a_key_the_issuer_withdrew_stops_verifying_within_its_max_age() {
    let k8s = TokenIssuer::rsa(K8S, "k8s-1");
    let server = JwksServer::start(TokenIssuer::jwks(&[&k8s])).await;
    let dir = tempfile::tempdir().unwrap();
    let config = k8s_entry(&server, dir.path(), "jwks_max_age = \"1s\"");
    let td = TrustDomain::new("example.org").unwrap();
    let federation = std::sync::Arc::new(Federation::load(&[config], BROKER, &td).unwrap());
    let fresh = federation.clone();
    let keeper = tokio::spawn(async move { fresh.keep_fresh().await });
    let token = k8s.sign(&k8s_claims("billing"));
    let mut accepted = false;
    for _ in 0..100 {
        accepted = federation.verify(&token).await.is_ok();
        if accepted {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(accepted, "the key was never fetched");
    // The issuer withdraws the key (say, it leaked): no token names an
    // unknown kid, yet the next scheduled fetch drops it.
    server.set(TokenIssuer::jwks(&[&TokenIssuer::rsa(K8S, "k8s-2")]));
    let mut refused = None;
    for _ in 0..100 {
        if let Err(e) = federation.verify(&token).await {
            refused = Some(e);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let e = refused.expect("the withdrawn key kept verifying");
    assert!(matches!(e, TokenError::UnknownKey { .. }), "{e}");
    assert!(server.fetches() >= 2);
    keeper.abort();
}

#[tokio::test]
async fn an_unknown_kid_refetches_the_jwks_at_most_once_per_interval() {
    let s = setup().await;
    assert_eq!(s.server.fetches(), 1, "fetched once at start");
    // The issuer rotates to a new key; its tokens name a kid the cache
    // lacks: one fetch, then accepted.
    let next = TokenIssuer::rsa(K8S, "k8s-2");
    s.server.set(TokenIssuer::jwks(&[&s.k8s, &next]));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    s.federation
        .verify(&next.sign(&k8s_claims("billing")))
        .await
        .unwrap();
    assert_eq!(s.server.fetches(), 2);
    // A flood of tokens with made-up kids costs at most one more fetch
    // within the interval.
    for i in 0..20 {
        let mut h = Header::new(Algorithm::RS256);
        h.kid = Some(format!("made-up-{i}"));
        let e = s
            .federation
            .verify(&next.sign_with(&h, &k8s_claims("billing")))
            .await
            .unwrap_err();
        assert!(matches!(e, TokenError::UnknownKey { .. }), "{e}");
    }
    assert!(s.server.fetches() <= 3, "{} fetches", s.server.fetches());
}

#[tokio::test]
async fn an_issuer_whose_keys_cannot_be_fetched_refuses_as_unavailable() {
    let k8s = TokenIssuer::rsa(K8S, "k8s-1");
    let server = JwksServer::start(TokenIssuer::jwks(&[&k8s])).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("jwks-ca.pem");
    std::fs::write(&ca, &server.ca_pem).unwrap();
    let config = entry(&format!(
        r#"issuer = "{K8S}"
           jwks_url = "{url}"
           ca = "{ca}"
           jwks_refresh = "1s"
           subject = "system:serviceaccount:{{ns}}:{{sa}}"
           spiffe_id = "spiffe://example.org/ns/{{ns}}/sa/{{sa}}""#,
        url = server.url,
        ca = ca.display()
    ));
    // The issuer's JWKS server is gone before the first fetch.
    drop(server);
    let td = TrustDomain::new("example.org").unwrap();
    let federation = Federation::load(&[config], BROKER, &td).unwrap();
    federation.fetch_all().await;
    let e = federation
        .verify(&k8s.sign(&k8s_claims("billing")))
        .await
        .unwrap_err();
    assert!(matches!(e, TokenError::KeysUnavailable(_)), "{e}");
}

#[test]
fn a_bad_entry_is_refused_with_its_reason() {
    let td = TrustDomain::new("example.org").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.json");
    std::fs::write(&empty, r#"{"keys": []}"#).unwrap();
    for (text, want) in [
        (r#"issuer = "x""#, "exactly one of"),
        (
            r#"issuer = "x"
            jwks_url = "https://idp.example/jwks""#,
            "needs ca",
        ),
        (
            r#"issuer = "x"
            jwks_file = "/nonexistent.json""#,
            "/nonexistent.json",
        ),
        (
            r#"issuer = "x"
            jwks_file = "/dev/null"
            algorithms = ["HS256"]"#,
            "asymmetric only",
        ),
        (r#"jwks_file = "/dev/null""#, "needs issuer"),
        (
            r#"issuer = "x"
            jwks_file = "EMPTY"
            spiffe_id = "spiffe://example.org/{ns}""#,
            "does not capture",
        ),
        (
            r#"issuer = "certificate"
            jwks_file = "EMPTY""#,
            "is taken",
        ),
        (
            r#"issuer = "x"
            jwks_file = "EMPTY"
            jwks_refresh = "0s""#,
            "at least 1s",
        ),
        (
            r#"workload_api = true
            spiffe_bundle = "EMPTY""#,
            "workload_api takes its keys",
        ),
    ] {
        let text = text.replace("EMPTY", &empty.display().to_string());
        let e = Federation::load(&[entry(&text)], BROKER, &td).unwrap_err();
        assert!(e.to_string().contains(want), "{text}: {e}");
    }
    // JWT-SVIDs without `iss` are named after the trust domain: an issuer
    // of that name would be indistinguishable in policy and the trail.
    let path = empty.display();
    let both = [
        entry(&format!(r#"spiffe_bundle = "{path}""#)),
        entry(&format!(
            r#"issuer = "spiffe://example.org"
            jwks_file = "{path}""#
        )),
    ];
    let e = Federation::load(&both, BROKER, &td).unwrap_err();
    assert!(e.to_string().contains("is taken"), "{e}");
    // Two clusters mapping service accounts into the same path would make
    // a namespace in the weaker one an agent of the stronger.
    let cluster = |iss: &str, id: &str| {
        entry(&format!(
            r#"issuer = "{iss}"
            jwks_file = "{path}"
            subject = "system:serviceaccount:{{ns}}:{{sa}}"
            spiffe_id = "{id}""#
        ))
    };
    let overlapping = [
        cluster("https://a.example", "spiffe://example.org/ns/{ns}/sa/{sa}"),
        cluster("https://b.example", "spiffe://example.org/ns/{ns}/{sa}"),
    ];
    let e = Federation::load(&overlapping, BROKER, &td).unwrap_err();
    assert!(e.to_string().contains("own path"), "{e}");
    // Distinct paths, and JWT-SVIDs beside them, load.
    let apart = [
        cluster(
            "https://a.example",
            "spiffe://example.org/a/ns/{ns}/sa/{sa}",
        ),
        cluster(
            "https://b.example",
            "spiffe://example.org/b/ns/{ns}/sa/{sa}",
        ),
        entry(&format!(r#"spiffe_bundle = "{path}""#)),
    ];
    Federation::load(&apart, BROKER, &td).unwrap();
}

#[tokio::test]
async fn a_caller_lasts_no_longer_than_its_issuers_max_age() {
    let s = setup().await;
    // GitHub's entry accepts tokens up to 10 minutes old; this one is 9
    // minutes old and would not expire for another hour.
    let mut c = github_claims();
    let now = unix_now();
    c["iat"] = json!(now - 540);
    c["nbf"] = json!(now - 540);
    c["exp"] = json!(now + 3600);
    let id = s.federation.verify(&s.github.sign(&c)).await.unwrap();
    assert_eq!(id.expires_at.as_secs(), now - 540 + 600);
}

#[tokio::test]
async fn a_key_published_for_encryption_never_verifies() {
    let issuer = TokenIssuer::rsa("https://idp.example", "enc-1");
    let mut jwk = issuer.jwk();
    jwk.common.public_key_use = Some(jsonwebtoken::jwk::PublicKeyUse::Encryption);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jwks.json");
    std::fs::write(
        &file,
        serde_json::to_string(&jsonwebtoken::jwk::JwkSet { keys: vec![jwk] }).unwrap(),
    )
    .unwrap();
    let config = entry(&format!(
        r#"issuer = "https://idp.example"
           jwks_file = "{}"
           algorithms = ["RS256"]
           spiffe_id = "spiffe://example.org/idp/{{sub}}""#,
        file.display()
    ));
    let td = TrustDomain::new("example.org").unwrap();
    let federation = Federation::load(&[config], BROKER, &td).unwrap();
    let now = unix_now();
    let token = issuer.sign(&json!({
        "iss": "https://idp.example", "aud": BROKER, "sub": "worker",
        "iat": now, "exp": now + 300,
    }));
    let e = federation.verify(&token).await.unwrap_err();
    assert!(matches!(e, TokenError::UnknownKey { .. }), "{e}");
}
