//! Workload tokens as identity: what one costs the broker to check, next
//! to a bare `jsonwebtoken` decode of the same token with the same key
//! (the limit: what any validator must at least do), measured in one run:
//!
//! - `Federation::verify` of a Kubernetes-style RS256 token and of an
//!   ES256 JWT-SVID (every check: algorithm, `kid` of that issuer,
//!   signature, times, audience, claims, the subject mapping);
//! - the same token with a forged signature, refused: the cost an
//!   anonymous flood of made-up tokens puts on the broker per request.
//!
//! `cargo bench -p mayfly-benches --bench federation`

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{DecodingKey, Validation};
use mayfly_benches::per_second;
use mayfly_broker::config::FederationConfig;
use mayfly_broker::federation::Federation;
use mayfly_core::TrustDomain;
use mayfly_testkit::TokenIssuer;
use mayfly_testkit::oidc::unix_now;
use serde_json::json;

const BROKER: &str = "https://broker.example.org";
const K8S: &str = "https://kubernetes.default.svc.cluster.local";
const MEASURE: Duration = Duration::from_secs(3);

/// The token with its signature's first byte changed.
fn forged(token: &str) -> String {
    let (head, sig) = token.rsplit_once('.').unwrap();
    let flipped = if sig.starts_with('A') { 'B' } else { 'A' };
    format!("{head}.{flipped}{}", &sig[1..])
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let k8s = TokenIssuer::rsa(K8S, "k8s-1");
    let spire = TokenIssuer::ec("", "spire-1");
    let (k8s_jwks, bundle) = (dir.path().join("k8s.json"), dir.path().join("bundle.json"));
    std::fs::write(&k8s_jwks, TokenIssuer::jwks(&[&k8s])).unwrap();
    std::fs::write(&bundle, TokenIssuer::jwks(&[&spire])).unwrap();
    let entries: Vec<FederationConfig> = [
        format!(
            r#"issuer = "{K8S}"
               jwks_file = "{}"
               algorithms = ["RS256"]
               subject = "system:serviceaccount:{{ns}}:{{sa}}"
               spiffe_id = "spiffe://example.org/ns/{{ns}}/sa/{{sa}}""#,
            k8s_jwks.display()
        ),
        format!(
            r#"spiffe_bundle = "{}"
               algorithms = ["ES256"]"#,
            bundle.display()
        ),
    ]
    .iter()
    .map(|t| toml::from_str(t).unwrap())
    .collect();
    let federation =
        Federation::load(&entries, BROKER, &TrustDomain::new("example.org").unwrap()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(federation.fetch_all());

    let now = unix_now();
    let times = json!({"aud": [BROKER], "iat": now, "nbf": now, "exp": now + 3600});
    let claims = |extra: serde_json::Value| {
        let mut c = times.clone();
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        c
    };
    let cases = [
        (
            "kubernetes RS256",
            &k8s,
            k8s.sign(&claims(
                json!({"iss": K8S, "sub": "system:serviceaccount:prod:billing"}),
            )),
            jsonwebtoken::Algorithm::RS256,
        ),
        (
            "JWT-SVID ES256",
            &spire,
            spire.sign(&claims(json!({"sub": "spiffe://example.org/agent/demo"}))),
            jsonwebtoken::Algorithm::ES256,
        ),
    ];
    println!(
        "{:<18} {:>12} {:>12} {:>7} {:>14}",
        "token", "verify/s", "bare/s", "ratio", "forged/s"
    );
    for (name, issuer, token, alg) in cases {
        rt.block_on(federation.verify(&token)).unwrap();
        assert!(rt.block_on(federation.verify(&forged(&token))).is_err());
        let set: JwkSet = serde_json::from_str(&TokenIssuer::jwks(&[issuer])).unwrap();
        let key = DecodingKey::from_jwk(&set.keys[0]).unwrap();
        let mut v = Validation::new(alg);
        v.set_audience(&[BROKER]);
        jsonwebtoken::decode::<serde_json::Value>(&token, &key, &v).unwrap();

        let full = per_second(MEASURE, || {
            rt.block_on(federation.verify(&token)).unwrap();
        });
        let bare = per_second(MEASURE, || {
            jsonwebtoken::decode::<serde_json::Value>(&token, &key, &v).unwrap();
        });
        let bad = forged(&token);
        let refused = per_second(MEASURE, || {
            rt.block_on(federation.verify(&bad)).unwrap_err();
        });
        println!(
            "{name:<18} {full:>12.0} {bare:>12.0} {:>7.2} {refused:>14.0}",
            full / bare
        );
    }
}
