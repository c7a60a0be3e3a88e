//! The HTTPS side port: JWKS and RFC 8414 metadata good enough for stock
//! validators, health probes, and EdDSA as the selectable algorithm.

use mayfly_broker::issuer::Algorithm;
use mayfly_testkit::{TestBroker, https_get};
use serde_json::Value;

use crate::common::*;

#[tokio::test]
async fn metadata_jwks_and_probes() {
    let broker = TestBroker::start().await;
    let ca = broker.bundle_pem();
    let base = broker.http_url();

    let (status, body) = https_get(
        &format!("{base}/.well-known/oauth-authorization-server"),
        &ca,
    )
    .await;
    assert_eq!(status, 200);
    let meta: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(meta["issuer"], base.as_str());
    assert_eq!(meta["jwks_uri"], format!("{base}/.well-known/jwks.json"));

    let (status, body) = https_get(&format!("{base}/.well-known/jwks.json"), &ca).await;
    assert_eq!(status, 200);
    let jwks: Value = serde_json::from_str(&body).unwrap();
    let key = &jwks["keys"][0];
    assert_eq!(key["kty"], "EC");
    assert_eq!(key["crv"], "P-256");
    assert_eq!(key["alg"], "ES256");
    assert_eq!(key["use"], "sig");
    assert!(key.get("d").is_none(), "no private part");
    assert_eq!(key["x"].as_str().unwrap().len(), 43);

    assert_eq!(https_get(&format!("{base}/healthz"), &ca).await.0, 200);
    assert_eq!(
        https_get(&format!("{base}/readyz"), &ca).await,
        (200, "ready\n".to_owned())
    );
    assert_eq!(https_get(&format!("{base}/nope"), &ca).await.0, 404);
}

#[tokio::test]
async fn eddsa_tokens_validate_with_a_stock_library() {
    let broker = TestBroker::start_with(|c| c.tokens.algorithm = Algorithm::EdDSA).await;
    let agent = broker.agent().await;
    let task = start(&agent).await;
    let issued = issue(&agent, &task.task_id).await;
    let header = jsonwebtoken::decode_header(&issued.token).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::EdDSA);
    let claims = validate(&broker, &issued.token, API).await;
    assert_eq!(claims["jti"], issued.lease_id.as_str());
    let (_, body) = https_get(
        &format!("{}/.well-known/jwks.json", broker.http_url()),
        &broker.bundle_pem(),
    )
    .await;
    let jwks: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(jwks["keys"][0]["kty"], "OKP");
    assert_eq!(jwks["keys"][0]["crv"], "Ed25519");
}

#[tokio::test]
async fn a_tampered_token_fails_stock_validation() {
    let broker = TestBroker::start().await;
    let agent = broker.agent().await;
    let task = start(&agent).await;
    let issued = issue(&agent, &task.task_id).await;
    let mut claims = claims_unverified(&issued.token);
    claims["scope"] = "read:files write:files".into();
    let parts: Vec<&str> = issued.token.split('.').collect();
    use base64::Engine;
    let forged_payload =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims.to_string());
    let forged = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
    let joined = tokio::spawn({
        let http = broker.http_url();
        let ca = broker.bundle_pem();
        async move {
            let (_, body) = https_get(&format!("{http}/.well-known/jwks.json"), &ca).await;
            let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_str(&body).unwrap();
            let key = jsonwebtoken::DecodingKey::from_jwk(&jwks.keys[0]).unwrap();
            let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
            v.set_audience(&[API]);
            jsonwebtoken::decode::<Value>(&forged, &key, &v).is_err()
        }
    });
    assert!(joined.await.unwrap(), "a forged payload must not validate");
}
