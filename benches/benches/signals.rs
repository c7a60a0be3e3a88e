//! Shared Signals and the Token Status List, measured in one run:
//!
//! 1. revoke to SET: from the moment `RevokeLease` is called to the moment
//!    a push receiver (an HTTP endpoint on loopback, answering 202) holds
//!    the SET for that lease (the SET often arrives before the call
//!    returns), next to the call itself, over N revocations
//!    (p50/p90/p99/max);
//! 2. the size of one status list of 2^20 tokens (`lst`, base64url of
//!    ZLIB) with none, 0.1 %, 1 % and 10 % of them revoked, next to the
//!    128 KiB the list is uncompressed.
//!
//! `cargo bench -p mayfly-benches --bench signals [-- REVOCATIONS]`

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use mayfly_client::{NewTask, pb};
use mayfly_core::SpiffeId;
use mayfly_core::status_list::{INDEXES_PER_LIST, MAX_LIST_BYTES, StatusBits};
use mayfly_testkit::TestBroker;
use tokio::sync::mpsc;

const API: &str = "https://api.example.com";

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// The lease a pushed SET is about.
fn lease_of(set: &str) -> String {
    let claims: serde_json::Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(set.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    claims["sub_id"]["session"]["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(500);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let broker = TestBroker::start().await;
        let (agent, op) = (broker.agent().await, broker.operator().await);

        // The push receiver.
        let (got_tx, mut got) = mpsc::unbounded_channel::<(String, Instant)>();
        let app = axum::Router::new().route(
            "/events",
            axum::routing::post(move |body: String| {
                let got_tx = got_tx.clone();
                async move {
                    let _ = got_tx.send((lease_of(&body), Instant::now()));
                    axum::http::StatusCode::ACCEPTED
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

        let receiver = broker
            .ca()
            .issue_svid(
                &SpiffeId::new("spiffe://example.org/api/bench").unwrap(),
                Duration::from_secs(3600),
            )
            .unwrap();
        let base = broker.http_url();
        let ca = broker.bundle_pem();
        let stream = serde_json::json!({
            "delivery": {"method": "urn:ietf:rfc:8935",
                "endpoint_url": format!("http://127.0.0.1:{port}/events")},
            "events_requested": ["https://schemas.openid.net/secevent/caep/event-type/session-revoked"],
        });
        let (status, _, body) = mayfly_testkit::https_post_form_with(
            &format!("{base}/ssf/streams"),
            &ca,
            Some(&receiver),
            &stream.to_string(),
            &[],
        )
        .await;
        assert_eq!(status, 201, "{body}");
        let id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["stream_id"]
            .as_str()
            .unwrap()
            .to_owned();
        let subject = serde_json::json!({"stream_id": id, "subject": {"format": "uri", "uri": API}});
        let (status, _, _) = mayfly_testkit::https_post_form_with(
            &format!("{base}/ssf/subjects:add"),
            &ca,
            Some(&receiver),
            &subject.to_string(),
            &[],
        )
        .await;
        assert_eq!(status, 200);

        let task = agent
            .start_task(
                NewTask::new("bench", [API])
                    .scope("read:files")
                    .ttl(Duration::from_secs(3600)),
            )
            .await
            .unwrap()
            .detach();
        let (mut took, mut calls) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for _ in 0..n {
            let t = agent
                .issue_token(pb::IssueTokenRequest {
                    task_id: task.task_id.clone(),
                    audience: API.into(),
                    scopes: vec!["read:files".into()],
                    ..Default::default()
                })
                .await
                .unwrap();
            let asked = Instant::now();
            op.admin()
                .revoke_lease(pb::RevokeLeaseRequest {
                    lease_id: t.lease_id.clone(),
                    note: String::new(),
                })
                .await
                .unwrap();
            calls.push(asked.elapsed());
            loop {
                let (lease, at) = tokio::time::timeout(Duration::from_secs(30), got.recv())
                    .await
                    .expect("a SET within 30 s")
                    .unwrap();
                if lease == t.lease_id {
                    took.push(at.saturating_duration_since(asked));
                    break;
                }
            }
        }
        for (what, d) in [("RevokeLease call", &mut calls), ("revoke to pushed SET", &mut took)] {
            d.sort();
            println!(
                "{what:<22} over {n}: p50 {:?}  p90 {:?}  p99 {:?}  max {:?}",
                percentile(d, 0.50),
                percentile(d, 0.90),
                percentile(d, 0.99),
                d[d.len() - 1]
            );
        }
    });

    // 2. Status list sizes: revoked indexes spread as a random walk would.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for per_mille in [0u64, 1, 10, 100] {
        let mut bits = StatusBits::new();
        for _ in 0..INDEXES_PER_LIST * per_mille / 1000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            bits.set(x % INDEXES_PER_LIST);
        }
        let lst = bits.claim().lst.len();
        println!(
            "status list of {INDEXES_PER_LIST} tokens, {:>4.1} % revoked: lst {lst:>7} bytes  ({:.3} of the {MAX_LIST_BYTES} raw)",
            per_mille as f64 / 10.0,
            lst as f64 / MAX_LIST_BYTES as f64
        );
    }
}
