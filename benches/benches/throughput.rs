//! Closed-loop throughput of IssueToken and SignCertificate over real mTLS
//! gRPC against an in-process broker (embedded store, then Redis), with the
//! in-process signing rate measured in the same run as the yardstick. Each
//! store runs with the audit trail off and then on (the store's default
//! sink: the file for embedded, the stream for Redis), and the ratio shows
//! what recording every decision costs.
//!
//! `cargo bench -p mayfly-benches --bench throughput [-- SECONDS CONCURRENCY]`

#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mayfly_broker::config::AuditSinkKind;
use mayfly_broker::issuer::{IssuingCa, parse_csr, random_serial};
use mayfly_client::{Client, NewTask, pb};
use mayfly_core::{SpiffeId, Timestamp};
use mayfly_testkit::{RedisServer, TestBroker};

/// Calls per second of `f` on this thread for `d`.
fn rate(d: Duration, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < d {
        f();
        n += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// Runs `concurrency` loops of `call` for `d`; returns successful calls/s.
async fn closed_loop<F, Fut>(d: Duration, concurrency: usize, call: F) -> f64
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let call = Arc::new(call);
    let (done, stop) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let start = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (call, done, stop) = (call.clone(), done.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if call().await {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(d).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

async fn run(
    label: &str,
    broker: &TestBroker,
    d: Duration,
    concurrency: usize,
    csr: Vec<u8>,
) -> (f64, f64) {
    let agent: Client = broker.agent().await;
    let task = agent
        .start_task(
            NewTask::new("throughput", ["https://api.example.com"])
                .scope("read:files")
                .ttl(Duration::from_secs(3600)),
        )
        .await
        .unwrap()
        .detach();
    let tokens = {
        let (agent, id) = (agent.clone(), task.task_id.clone());
        closed_loop(d, concurrency, move || {
            let (agent, id) = (agent.clone(), id.clone());
            async move {
                agent
                    .issue_token(pb::IssueTokenRequest {
                        task_id: id,
                        audience: "https://api.example.com".into(),
                        scopes: vec!["read:files".into()],
                        ttl_seconds: 0,
                        bind_to_client_cert: false,
                        approval_id: String::new(),
                        dpop_jwk: String::new(),
                    })
                    .await
                    .is_ok()
            }
        })
        .await
    };
    let certs = {
        let (agent, id) = (agent.clone(), task.task_id.clone());
        closed_loop(d, concurrency, move || {
            let (mut b, id, csr) = (agent.broker(), id.clone(), csr.clone());
            async move {
                b.sign_certificate(pb::SignCertificateRequest {
                    task_id: id,
                    csr,
                    ttl_seconds: 0,
                    approval_id: String::new(),
                })
                .await
                .is_ok()
            }
        })
        .await
    };
    println!(
        "{label:<22} IssueToken {tokens:>8.0}/s   SignCertificate {certs:>8.0}/s   ({concurrency} concurrent, {} s each)",
        d.as_secs()
    );
    (tokens, certs)
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let secs: u64 = args.first().and_then(|a| a.parse().ok()).unwrap_or(3);
    let concurrency: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(32);
    let d = Duration::from_secs(secs);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();

    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec();

    rt.block_on(async {
        let embedded = TestBroker::start().await;
        // The yardstick, same run: one core signing in process, no network, no store.
        let ca = IssuingCa::load(
            &embedded.path("issuing-ca.pem"),
            &embedded.path("issuing-ca.key"),
        )
        .unwrap();
        let id =
            SpiffeId::new("spiffe://example.org/agent/demo/task/AAAAAAAAAAAAAAAAAAAAAA").unwrap();
        let now = Timestamp::now();
        let cert_limit = rate(Duration::from_secs(1), || {
            let k = parse_csr(&csr).unwrap();
            ca.sign_svid(
                &k,
                &id,
                now,
                now.plus(Duration::from_secs(600)),
                random_serial().0,
            )
            .unwrap();
        });
        println!("in-process, one core: CSR check + certificate signing {cert_limit:>8.0}/s");

        drop(embedded);
        let mut limits = Vec::new();
        for store in ["embedded", "redis"] {
            let mut results = Vec::new();
            for audit in [Some(AuditSinkKind::Off), None] {
                let redis = (store == "redis").then(RedisServer::start);
                let broker = TestBroker::start_with(|c| {
                    if let Some(r) = &redis {
                        c.store = mayfly_broker::config::StoreKind::Redis;
                        c.redis = Some(mayfly_broker::config::RedisConfig {
                            url: Some(r.url()),
                            key_prefix: "mayfly".into(),
                            ..Default::default()
                        });
                    }
                    c.audit.sink = audit;
                })
                .await;
                let label = format!("{store}, audit {:?}", broker.config.audit_sink());
                results.push(run(&label, &broker, d, concurrency, csr.clone()).await);
            }
            let [(t_off, c_off), (t_on, c_on)] = results[..] else {
                unreachable!()
            };
            println!(
                "{store}: with audit / without: IssueToken {:.2}, SignCertificate {:.2}",
                t_on / t_off,
                c_on / c_off
            );
            limits.push((store, c_on / cert_limit));
        }
        for (store, ratio) in limits {
            println!("SignCertificate (audit on) / in-process signing limit: {store} {ratio:.2}");
        }
    });
}
