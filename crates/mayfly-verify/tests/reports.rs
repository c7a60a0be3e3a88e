//! The tower layer reports the requests tokens came with: accepted ones
//! with their route and status, refused ones with the check that refused
//! them (only for tokens of this audience whose signature verified), and
//! only as a recipient of the audience.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use mayfly_client::{Client, NewTask, pb};
use mayfly_core::SpiffeId;
use mayfly_testkit::TestBroker;
use mayfly_verify::layer::{Route, VerifyLayer};
use mayfly_verify::{Verifier, VerifierConfig};
use serde_json::Value;
use tower::ServiceExt;

const API: &str = "https://api.example.com";

/// A verifier for the API reporting requests, as `id`.
async fn verifier(broker: &TestBroker, id: &str) -> Verifier {
    let svid = broker
        .ca()
        .issue_svid(&SpiffeId::new(id).unwrap(), Duration::from_secs(3600))
        .unwrap();
    let mut c = VerifierConfig::new(&broker.issuer(), API, broker.bundle_pem())
        .with_feed(
            &broker.url(),
            svid.cert_pem.as_bytes().to_vec(),
            svid.key_pem.as_bytes().to_vec(),
        )
        .with_request_reports();
    c.jwks_url = format!("{}/.well-known/jwks.json", broker.http_url());
    let v = Verifier::connect(c).await.unwrap();
    assert!(v.wait_for_feed(Duration::from_secs(5)).await);
    v
}

fn app(v: Verifier) -> Router {
    async fn ticket() -> impl IntoResponse {
        let mut resp = "ticket".into_response();
        resp.extensions_mut()
            .insert(Route("/tickets/{id}".to_owned()));
        resp
    }
    Router::new()
        .route("/tickets/{id}", get(ticket))
        .layer(VerifyLayer::new(v))
}

async fn call(app: &Router, token: &str) -> StatusCode {
    let req = Request::get("/tickets/42?secret=never-reported")
        .header("authorization", format!("Bearer {token}"))
        .body(Body::empty())
        .unwrap();
    app.clone().oneshot(req).await.unwrap().status()
}

async fn token(agent: &Client) -> (String, pb::IssuedToken) {
    let task = agent
        .start_task(NewTask::new("read a ticket", [API]).scope("read:tickets"))
        .await
        .unwrap()
        .detach();
    let t = agent
        .issue_token(pb::IssueTokenRequest {
            task_id: task.task_id.clone(),
            audience: API.into(),
            scopes: vec!["read:tickets".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    (task.task_id, t)
}

/// The trail's `request_served` records, once there are `n`.
async fn served(op: &Client, n: usize) -> Vec<Value> {
    for _ in 0..200 {
        let mut stream = op
            .admin()
            .read_audit(pb::ReadAuditRequest::default())
            .await
            .unwrap()
            .into_inner();
        let mut found = Vec::new();
        while let Some(batch) = stream.message().await.unwrap() {
            for line in batch.records {
                let r: Value = serde_json::from_str(&line).unwrap();
                if r["event"] == "request_served" {
                    found.push(r);
                }
            }
        }
        if found.len() >= n {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("fewer than {n} request_served records");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_layer_reports_accepted_and_refused_requests_under_their_lease() {
    let broker = TestBroker::start().await;
    let agent = broker.agent().await;
    let op = broker.operator().await;
    // A recipient of the API's tokens, by the dev [[resource_servers]].
    let v = verifier(&broker, "spiffe://example.org/api/downstream").await;
    let app = app(v.clone());
    let (task, t) = token(&agent).await;

    assert_eq!(call(&app, &t.token).await, StatusCode::OK);
    agent.complete_task(&task).await.unwrap();
    let refused = loop {
        let s = call(&app, &t.token).await;
        if s != StatusCode::OK {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(refused, StatusCode::UNAUTHORIZED);
    // A forged token is refused and not reported: its jti could be anyone's.
    let forged = format!("{}x", &t.token[..t.token.len() - 1]);
    assert_eq!(call(&app, &forged).await, StatusCode::UNAUTHORIZED);

    let records = served(&op, 2).await;
    assert_eq!(records.len(), 2, "{records:?}");
    let (ok, no) = (&records[0], &records[1]);
    for r in [ok, no] {
        assert_eq!(r["lease_id"], t.lease_id.as_str());
        assert_eq!(r["task_id"], task.as_str());
        assert_eq!(r["caller"], "spiffe://example.org/api/downstream");
        assert_eq!(r["method"], "GET");
        assert!(
            !r.to_string().contains("never-reported"),
            "the query went in: {r}"
        );
    }
    assert_eq!(ok["decision"], "accepted");
    assert_eq!(ok["route"], "/tickets/{id}");
    assert_eq!(ok["status"], 200);
    assert_eq!(no["decision"], "refused");
    assert_eq!(no["reason"], "revoked");
    assert_eq!(no["route"], "/tickets/42");
    assert_eq!(no["status"], 401);
    assert_eq!(v.reports().unwrap().reported(), 2);
    assert_eq!(v.reports().unwrap().lost(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_that_does_not_receive_the_audience_cannot_report() {
    let broker = TestBroker::start().await;
    let agent = broker.agent().await;
    // In the trust domain (so it follows the feed), in no [[resource_servers]].
    let v = verifier(&broker, "spiffe://example.org/svc/bystander").await;
    let app = app(v.clone());
    let (_, t) = token(&agent).await;
    assert_eq!(call(&app, &t.token).await, StatusCode::OK);
    let reports = v.reports().unwrap();
    for _ in 0..200 {
        if reports.lost() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(reports.lost(), 1);
    assert_eq!(reports.reported(), 0);
}
