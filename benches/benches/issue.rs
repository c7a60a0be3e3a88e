//! What one IssueToken costs, piece by piece: signing the JWT (ES256,
//! EdDSA), checking a CSR and signing its certificate, recording a lease in
//! each store (embedded with fsync; Redis, one script, on a real
//! `redis-server` with `appendfsync always`), and the whole call over mTLS
//! gRPC against an in-process broker (one client, sequential), so the round
//! trip can be read against the sum of its parts.
//!
//! `cargo bench -p mayfly-benches`

#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use mayfly_broker::issuer::Algorithm;
use mayfly_broker::issuer::{IssuingCa, JwtSigner, SigningKey, parse_csr, random_serial};
use mayfly_broker::store::{EmbeddedStore, LeaseStore, RedisStore, RedisTarget};
use mayfly_core::{AccessTokenClaims, SpiffeId, Timestamp};
use mayfly_testkit::RedisServer;
use mayfly_testkit::contract::{agent, lease, task};

fn claims() -> AccessTokenClaims {
    AccessTokenClaims {
        iss: "https://localhost:8711".into(),
        sub: "spiffe://example.org/agent/demo".into(),
        aud: "https://api.example.com".into(),
        exp: 1_800_000_300,
        iat: 1_800_000_000,
        nbf: 1_800_000_000,
        jti: "p_mMsUbnboE9enWz_ooAFw".into(),
        client_id: "spiffe://example.org/agent/demo".into(),
        scope: Some("read:tickets write:tickets".into()),
        task_id: "lbaPf1dJlLwnMXaf5bpjpA".into(),
        cnf: None,
        act: None,
        status: Some(mayfly_core::status_list::status_claim(
            "https://localhost:8711",
            1 << 20,
        )),
    }
}

fn signer(alg: Algorithm) -> JwtSigner {
    let rcgen_alg = match alg {
        Algorithm::ES256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        Algorithm::EdDSA => &rcgen::PKCS_ED25519,
    };
    let der = rcgen::KeyPair::generate_for(rcgen_alg)
        .unwrap()
        .serialize_der();
    JwtSigner::new(SigningKey::from_pkcs8(&der, alg).unwrap(), Vec::new())
}

fn sign(c: &mut Criterion) {
    let claims = claims();
    for (name, alg) in [
        ("jwt_sign_es256", Algorithm::ES256),
        ("jwt_sign_eddsa", Algorithm::EdDSA),
    ] {
        let s = signer(alg);
        c.bench_function(name, |b| b.iter(|| s.sign(&claims).unwrap()));
    }
}

fn store_issue(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn LeaseStore> =
        Arc::new(EmbeddedStore::open(&dir.path().join("bench.redb")).unwrap());
    let t = task(&agent("bench"), 3600);
    rt.block_on(store.start_task(&t)).unwrap();
    c.bench_function("embedded_store_issue_fsync", |b| {
        b.iter(|| {
            let l = lease(&t, 60);
            rt.block_on(store.issue(&l, t.created_at)).unwrap();
        })
    });
}

fn csr_sign(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let broker = rt.block_on(mayfly_testkit::TestBroker::start());
    let ca = IssuingCa::load(
        &broker.path("issuing-ca.pem"),
        &broker.path("issuing-ca.key"),
    )
    .unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec();
    let id = SpiffeId::new("spiffe://example.org/agent/demo/task/AAAAAAAAAAAAAAAAAAAAAA").unwrap();
    let now = Timestamp::now();
    c.bench_function("csr_check_and_certificate_sign", |b| {
        b.iter(|| {
            let k = parse_csr(&csr).unwrap();
            ca.sign_svid(
                &k,
                &id,
                now,
                now.plus(std::time::Duration::from_secs(600)),
                random_serial().0,
            )
            .unwrap()
        })
    });
    drop(broker);
}

fn redis_store_issue(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let server = RedisServer::start();
    let target = RedisTarget::Url {
        url: server.url(),
        ca_pem: None,
    };
    let store: Arc<dyn LeaseStore> =
        Arc::new(RedisStore::new(target, "bench", std::time::Duration::from_secs(3600)).unwrap());
    let t = task(&agent("bench"), 3600);
    rt.block_on(store.start_task(&t)).unwrap();
    c.bench_function("redis_store_issue", |b| {
        b.iter(|| {
            let l = lease(&t, 60);
            rt.block_on(store.issue(&l, t.created_at)).unwrap();
        })
    });
}

fn issue_over_mtls(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let broker = rt.block_on(mayfly_testkit::TestBroker::start());
    let agent = rt.block_on(broker.agent());
    let task = rt
        .block_on(
            agent.start_task(
                mayfly_client::NewTask::new("bench", ["https://api.example.com"])
                    .scope("read:files")
                    .ttl(std::time::Duration::from_secs(3600)),
            ),
        )
        .unwrap();
    c.bench_function("issue_token_grpc_mtls", |b| {
        b.iter(|| {
            rt.block_on(task.issue_token("https://api.example.com", ["read:files"]))
                .unwrap()
        })
    });
    drop(task);
    drop(broker);
}

criterion_group!(
    benches,
    sign,
    csr_sign,
    store_issue,
    redis_store_issue,
    issue_over_mtls
);
criterion_main!(benches);
