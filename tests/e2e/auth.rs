//! Identity at the edge: only an X.509-SVID of the trust domain, chaining to
//! the bundle, gets in; everything else is UNAUTHENTICATED with the reason,
//! and leaves nothing behind.

use mayfly_client::{Client, pb};
use mayfly_testkit::{TestBroker, bad_certs};
use rcgen::SanType;
use tonic::Code;

use crate::common::*;

/// Every Broker and Admin RPC a rejected caller might try.
async fn assert_rejected(client: &Client, needle: &str) {
    assert_status(
        client
            .broker()
            .start_task(start_request("x", &[API], &["read:files"]))
            .await,
        Code::Unauthenticated,
        needle,
    );
    assert_status(
        client
            .issue_token(token_request("AAAAAAAAAAAAAAAAAAAAAA", API, &[]))
            .await,
        Code::Unauthenticated,
        needle,
    );
    assert_status(
        client.complete_task("AAAAAAAAAAAAAAAAAAAAAA").await,
        Code::Unauthenticated,
        needle,
    );
    assert_status(
        client
            .admin()
            .list_leases(pb::ListLeasesRequest::default())
            .await,
        Code::Unauthenticated,
        needle,
    );
}

#[tokio::test]
async fn rejects_every_kind_of_bad_client_certificate() {
    let broker = TestBroker::start().await;
    let ca = broker.ca();

    assert_rejected(&broker.anonymous_client().await, "no client certificate").await;

    let cases = [
        (
            "from another CA",
            bad_certs::from_other_ca(),
            "not issued by a CA in the broker's trust bundle",
        ),
        (
            "no URI SAN",
            bad_certs::with_sans(
                ca,
                vec![SanType::DnsName("agent.example.org".try_into().unwrap())],
            ),
            "no URI SAN",
        ),
        (
            "two URI SANs",
            bad_certs::with_sans(
                ca,
                vec![
                    bad_certs::uri("spiffe://example.org/agent/a"),
                    bad_certs::uri("spiffe://example.org/agent/b"),
                ],
            ),
            "2 URI SANs",
        ),
        (
            "non-spiffe URI",
            bad_certs::with_sans(ca, vec![bad_certs::uri("https://example.org/agent/demo")]),
            "is not a SPIFFE ID",
        ),
        (
            "another trust domain",
            bad_certs::with_sans(ca, vec![bad_certs::uri("spiffe://other.org/agent/demo")]),
            "not in trust domain example.org",
        ),
        ("expired", bad_certs::expired(ca), "expired"),
        (
            "a CA certificate",
            bad_certs::ca_as_leaf(ca),
            "CA certificate",
        ),
    ];
    for (what, cred, needle) in cases {
        let client = broker.client_with(&cred).await.unwrap_or_else(|e| {
            panic!("{what}: TLS should complete so the reason can be told: {e}")
        });
        assert_rejected(&client, needle).await;
    }

    // Nothing was created by any of them.
    let all = all_leases(&broker.operator().await, pb::ListLeasesRequest::default()).await;
    assert!(all.is_empty(), "{all:?}");
}

#[tokio::test]
async fn a_valid_svid_of_the_trust_domain_gets_in() {
    let broker = TestBroker::start().await;
    let carol = broker
        .client_as("spiffe://example.org/team-a/agent/carol")
        .await;
    let denied = carol
        .broker()
        .start_task(start_request("x", &[API], &["read:files"]))
        .await;
    // Authenticated, then refused by policy (no rule covers team-a): not UNAUTHENTICATED.
    assert_status(
        denied,
        Code::PermissionDenied,
        "no policy permits spiffe://example.org/team-a/agent/carol to start_task https://api.example.com",
    );
}

#[tokio::test]
async fn a_certificate_expiring_mid_connection_stops_working() {
    let broker = TestBroker::start().await;
    let id = mayfly_core::SpiffeId::new("spiffe://example.org/agent/demo").unwrap();
    let mut params =
        mayfly_broker::dev::DevCa::svid_params(&id, std::time::Duration::from_secs(2)).unwrap();
    // Whole seconds: X.509 validity has one-second resolution.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    params.not_after = rcgen::date_time_ymd(1970, 1, 1) + std::time::Duration::from_secs(now + 2);
    let cred = broker.ca().sign(&params).unwrap();
    let client = broker.client_with(&cred).await.unwrap();
    let task = start(&client).await;
    tokio::time::sleep(std::time::Duration::from_millis(3100)).await;
    // Same connection, certificate now expired.
    assert_status(
        client
            .issue_token(token_request(&task.task_id, API, &["read:files"]))
            .await,
        Code::Unauthenticated,
        "expired",
    );
}
