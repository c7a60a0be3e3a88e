//! The verifier reading revocations from the broker's Token Status Lists
//! instead of the feed: it needs no identity of its own, sees a revocation
//! within the lists' `ttl`, and fails closed once its copy is older than
//! that and the broker cannot be reached.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use mayfly_client::{Client, NewTask, pb};
use mayfly_testkit::TestBroker;
use mayfly_verify::{Verifier, VerifierConfig, VerifyError};

const API: &str = "https://api.example.com";
const TTL: Duration = Duration::from_secs(1);

async fn broker() -> TestBroker {
    TestBroker::start_with(|c| c.tokens.status_list_ttl = TTL).await
}

async fn verifier(broker: &TestBroker) -> Verifier {
    let config =
        VerifierConfig::new(&broker.issuer(), API, broker.bundle_pem()).with_status_lists();
    Verifier::connect(config).await.unwrap()
}

async fn token(agent: &Client) -> pb::IssuedToken {
    let task = agent
        .start_task(NewTask::new("status lists", [API]).scope("read:files"))
        .await
        .unwrap()
        .detach();
    agent
        .issue_token(pb::IssueTokenRequest {
            task_id: task.task_id,
            audience: API.into(),
            scopes: vec!["read:files".into()],
            ..Default::default()
        })
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_reaches_a_validator_within_the_lists_ttl() {
    let broker = broker().await;
    let (agent, op) = (broker.agent().await, broker.operator().await);
    let v = verifier(&broker).await;
    let (doomed, kept) = (token(&agent).await, token(&agent).await);
    v.verify(&doomed.token, None).await.unwrap();
    v.verify(&kept.token, None).await.unwrap();

    op.admin()
        .revoke_lease(pb::RevokeLeaseRequest {
            lease_id: doomed.lease_id.clone(),
            note: String::new(),
        })
        .await
        .unwrap();
    let start = Instant::now();
    loop {
        match v.verify(&doomed.token, None).await {
            Err(VerifyError::Revoked) => break,
            Ok(_) => {}
            Err(e) => panic!("unexpected {e}"),
        }
        assert!(
            start.elapsed() < TTL + Duration::from_secs(1),
            "the revocation did not reach the validator within the ttl"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Its neighbour in the list is untouched.
    v.verify(&kept.token, None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_synchronous_path_fetches_in_the_background_and_fails_closed() {
    let mut broker = broker().await;
    let agent = broker.agent().await;
    let v = verifier(&broker).await;
    let t = token(&agent).await;
    // Nothing held yet: refused, and fetched for the next request.
    let first = v.verify_cached(&t.token, None).unwrap_err();
    assert!(
        matches!(first, VerifyError::StatusUnavailable(_)),
        "{first}"
    );
    assert!(first.is_unavailable());
    let start = Instant::now();
    while v.verify_cached(&t.token, None).is_err() {
        assert!(start.elapsed() < Duration::from_secs(5), "never fetched");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Kept fresh in the background while the broker answers.
    tokio::time::sleep(TTL * 2).await;
    v.verify_cached(&t.token, None).unwrap();

    // The broker gone, the copy outlives its ttl and the token is refused.
    broker.stop().await;
    tokio::time::sleep(TTL + Duration::from_millis(300)).await;
    let refused = v.verify(&t.token, None).await.unwrap_err();
    assert!(
        matches!(refused, VerifyError::StatusUnavailable(_)),
        "{refused}"
    );
    assert_eq!(refused.name(), "status_unavailable");
}

/// A DPoP-bound token whose list is not held yet: the list is fetched and
/// the checks run again, and the proof, good for one use, is used once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dpop_proof_survives_the_first_fetch_of_its_list() {
    use mayfly_testkit::DpopKey;
    use mayfly_verify::DpopRequest;

    let broker = broker().await;
    let agent = broker.agent().await;
    let v = verifier(&broker).await;
    let key = DpopKey::new();
    let task = agent
        .start_task(NewTask::new("dpop", [API]).scope("read:files"))
        .await
        .unwrap()
        .detach();
    let t = agent
        .issue_token(pb::IssueTokenRequest {
            task_id: task.task_id,
            audience: API.into(),
            scopes: vec!["read:files".into()],
            dpop_jwk: key.jwk().to_string(),
            ..Default::default()
        })
        .await
        .unwrap();
    let url = format!("{API}/files");
    let proof = key.proof("GET", &url, Some(&t.token));
    let request = DpopRequest {
        proof: &proof,
        method: "GET",
        url: &url,
    };
    v.verify_dpop(&t.token, request, None).await.unwrap();
    // Used: the same proof again is a replay.
    assert_eq!(
        v.verify_dpop(&t.token, request, None)
            .await
            .unwrap_err()
            .name(),
        "dpop"
    );
}
