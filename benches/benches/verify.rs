//! Downstream verification, measured against a real broker in one run:
//!
//! 1. throughput of `Verifier::verify_cached` next to a bare `jsonwebtoken`
//!    decode of the same token with the same key (the limit: what any
//!    validator must at least do);
//!    and, for a DPoP-bound token, `Verifier::verify_dpop` with a fresh
//!    proof each time (proofs are made before the clock starts) next to
//!    bearer verification of the same kind of token;
//!    and a verifier reading the Token Status Lists instead of the feed,
//!    next to the one following the feed;
//! 2. revocation propagation: from the moment `RevokeLease` returns to the
//!    moment a verifier following the feed rejects the token, over 1,000
//!    revocations (p50/p90/p99/max);
//! 3. from the moment `RevokeLease` returns to the moment the broker's
//!    status list marks the token (read straight from `/statuslists/<n>`),
//!    over a fifth as many revocations: what a status-list validator waits
//!    for besides its copy's `ttl`.
//!
//! `cargo bench -p mayfly-benches --bench verify [-- REVOCATIONS]`

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{DecodingKey, Validation};
use mayfly_benches::per_second;
use mayfly_client::{NewTask, pb};
use mayfly_core::status_list::StatusBits;
use mayfly_core::{AccessTokenClaims, SpiffeId};
use mayfly_testkit::TestBroker;
use mayfly_verify::{Verifier, VerifierConfig, VerifyError};

const API: &str = "https://api.example.com";

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let broker = TestBroker::start().await;
        let (agent, op) = (broker.agent().await, broker.operator().await);
        let id = broker
            .ca()
            .issue_svid(
                &SpiffeId::new("spiffe://example.org/api/bench").unwrap(),
                Duration::from_secs(3600),
            )
            .unwrap();
        let config = VerifierConfig::new(&broker.issuer(), API, broker.bundle_pem()).with_feed(
            &broker.url(),
            id.cert_pem.as_bytes().to_vec(),
            id.key_pem.as_bytes().to_vec(),
        );
        let verifier = Verifier::connect(config).await.unwrap();
        assert!(verifier.wait_for_feed(Duration::from_secs(5)).await);
        let task = agent
            .start_task(
                NewTask::new("bench", [API])
                    .scope("read:files")
                    .ttl(Duration::from_secs(3600)),
            )
            .await
            .unwrap()
            .detach();
        let issue = || {
            agent.issue_token(pb::IssueTokenRequest {
                task_id: task.task_id.clone(),
                audience: API.into(),
                scopes: vec!["read:files".into()],
                ttl_seconds: 0,
                bind_to_client_cert: false,
                approval_id: String::new(),
                dpop_jwk: String::new(),
            })
        };

        // 1. Throughput against a bare decode.
        let token = issue().await.unwrap().token;
        let jwks: JwkSet = serde_json::from_str(
            &mayfly_testkit::https_get(
                &format!("{}/.well-known/jwks.json", broker.http_url()),
                &broker.bundle_pem(),
            )
            .await
            .1,
        )
        .unwrap();
        let key = DecodingKey::from_jwk(&jwks.keys[0]).unwrap();
        let mut v = Validation::new(jsonwebtoken::Algorithm::ES256);
        v.set_issuer(&[broker.issuer()]);
        v.set_audience(&[API]);
        let bare = per_second(Duration::from_secs(2), || {
            jsonwebtoken::decode::<serde_json::Value>(&token, &key, &v).unwrap();
        });
        let full = per_second(Duration::from_secs(2), || {
            verifier.verify_cached(&token, None).unwrap();
        });
        let listed = Verifier::connect(
            VerifierConfig::new(&broker.issuer(), API, broker.bundle_pem()).with_status_lists(),
        )
        .await
        .unwrap();
        listed.verify(&token, None).await.unwrap();
        let lists = per_second(Duration::from_secs(2), || {
            listed.verify_cached(&token, None).unwrap();
        });
        println!("bare jsonwebtoken decode  {bare:>9.0}/s (one core)");
        println!(
            "mayfly-verify             {full:>9.0}/s (one core)  ratio {:.2}",
            full / bare
        );
        println!(
            "mayfly-verify, lists      {lists:>9.0}/s (one core)  ratio to the feed {:.2}",
            lists / full
        );

        // DPoP: the same checks, plus a proof per request (each used once).
        let key = mayfly_testkit::DpopKey::new();
        let req = pb::IssueTokenRequest {
            task_id: task.task_id.clone(),
            audience: API.into(),
            scopes: vec!["read:files".into()],
            ttl_seconds: 0,
            bind_to_client_cert: false,
            approval_id: String::new(),
            dpop_jwk: key.jwk().to_string(),
        };
        let bound = agent.issue_token(req).await.unwrap().token;
        let url = format!("{API}/files");
        let proofs: Vec<String> = (0..20_000)
            .map(|_| key.proof("GET", &url, Some(&bound)))
            .collect();
        let start = Instant::now();
        for p in &proofs {
            let r = mayfly_verify::DpopRequest {
                proof: p,
                method: "GET",
                url: &url,
            };
            verifier.verify_dpop(&bound, r, None).await.unwrap();
        }
        let dpop = proofs.len() as f64 / start.elapsed().as_secs_f64();
        println!(
            "mayfly-verify, DPoP       {dpop:>9.0}/s (one core)  ratio to bearer {:.2}",
            dpop / full
        );

        // 2. Revocation propagation.
        let mut took = Vec::with_capacity(n);
        for _ in 0..n {
            let t = issue().await.unwrap();
            verifier.verify_cached(&t.token, None).unwrap();
            op.admin()
                .revoke_lease(pb::RevokeLeaseRequest {
                    lease_id: t.lease_id.clone(),
                    note: String::new(),
                })
                .await
                .unwrap();
            let start = Instant::now();
            loop {
                match verifier.verify_cached(&t.token, None) {
                    Err(VerifyError::Revoked) => break,
                    Ok(_) => tokio::task::yield_now().await,
                    Err(e) => panic!("{e}"),
                }
                assert!(start.elapsed() < Duration::from_secs(10));
            }
            took.push(start.elapsed());
        }
        took.sort();
        println!(
            "revocation propagation over {n}: p50 {:?}  p90 {:?}  p99 {:?}  max {:?}",
            percentile(&took, 0.50),
            percentile(&took, 0.90),
            percentile(&took, 0.99),
            took[took.len() - 1]
        );

        // 3. Revoke to the broker's status list.
        let m = (n / 5).max(1);
        let mut took = Vec::with_capacity(m);
        for _ in 0..m {
            let t = issue().await.unwrap();
            let claims: AccessTokenClaims = serde_json::from_slice(
                &URL_SAFE_NO_PAD
                    .decode(t.token.split('.').nth(1).unwrap())
                    .unwrap(),
            )
            .unwrap();
            let r = claims.status.unwrap().status_list;
            let url = r.uri.replace(&broker.issuer(), &broker.http_url());
            let marked = || async {
                let (_, body) = mayfly_testkit::https_get(&url, &broker.bundle_pem()).await;
                let list: serde_json::Value = serde_json::from_slice(
                    &URL_SAFE_NO_PAD
                        .decode(body.split('.').nth(1).unwrap())
                        .unwrap(),
                )
                .unwrap();
                let claim = serde_json::from_value(list["status_list"].clone()).unwrap();
                StatusBits::from_claim(&claim).unwrap().is_set(r.idx)
            };
            assert!(!marked().await);
            op.admin()
                .revoke_lease(pb::RevokeLeaseRequest {
                    lease_id: t.lease_id.clone(),
                    note: String::new(),
                })
                .await
                .unwrap();
            let start = Instant::now();
            while !marked().await {
                assert!(start.elapsed() < Duration::from_secs(10));
            }
            took.push(start.elapsed());
        }
        took.sort();
        println!(
            "revoke to status list over {m}: p50 {:?}  p90 {:?}  p99 {:?}  max {:?}",
            percentile(&took, 0.50),
            percentile(&took, 0.90),
            percentile(&took, 0.99),
            took[took.len() - 1]
        );
    });
}
