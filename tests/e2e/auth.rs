//! Identity at the edge: only an X.509-SVID of the trust domain, chaining to
//! the bundle, gets in; everything else is UNAUTHENTICATED with the reason,
//! and leaves nothing behind.

use mayfly_client::{Client, pb};
use mayfly_testkit::{TestBroker, bad_certs};
use rcgen::SanType;
use tonic::Code;

use crate::common::*;

/// Every Broker and Admin RPC a rejected caller might try.
pub(crate) async fn assert_rejected(client: &Client, needle: &str) {
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

/// Leaf and chain of a task certificate for a fresh key, as a credential a
/// client can present.
async fn task_certificate(agent: &Client, task: &str) -> mayfly_testkit::Credential {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap();
    let issued = agent
        .broker()
        .sign_certificate(pb::SignCertificateRequest {
            task_id: task.to_owned(),
            csr: csr.der().to_vec(),
            ttl_seconds: 0,
            approval_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    mayfly_testkit::Credential {
        cert_pem: format!("{}{}", issued.certificate_pem, issued.chain_pem),
        key_pem: key.serialize_pem().into(),
    }
}

/// Every edge refuses `cred`, naming `needle`: each Broker and Admin RPC,
/// the revocation feed, and `/introspect` on the HTTPS port.
async fn assert_refused_everywhere(
    broker: &TestBroker,
    cred: &mayfly_testkit::Credential,
    needle: &str,
) {
    let client = broker.client_with(cred).await.unwrap();
    assert_rejected(&client, needle).await;
    let mut b = client.broker();
    assert_status(
        b.sign_certificate(pb::SignCertificateRequest {
            task_id: "AAAAAAAAAAAAAAAAAAAAAA".into(),
            csr: vec![1],
            ttl_seconds: 0,
            approval_id: String::new(),
        })
        .await,
        Code::Unauthenticated,
        needle,
    );
    assert_status(
        b.delegate_task(pb::DelegateTaskRequest {
            parent_task_id: "AAAAAAAAAAAAAAAAAAAAAA".into(),
            delegate_id: "spiffe://example.org/agent/other".into(),
            intent: "x".into(),
            audiences: vec![API.into()],
            scopes: vec![],
            ttl_seconds: 0,
        })
        .await,
        Code::Unauthenticated,
        needle,
    );
    assert_status(
        client
            .admin()
            .revoke_agent(pb::RevokeAgentRequest {
                agent_id: "spiffe://example.org/agent/demo".into(),
                note: String::new(),
            })
            .await,
        Code::Unauthenticated,
        needle,
    );
    let mut feed = pb::revocations_client::RevocationsClient::new(client.channel());
    assert_status(
        feed.watch_revocations(pb::WatchRequest { from_cursor: 0 })
            .await,
        Code::Unauthenticated,
        needle,
    );
    let (status, _, body) = mayfly_testkit::https_post_form(
        &format!("{}/introspect", broker.http_url()),
        &broker.bundle_pem(),
        Some(cred),
        "token=x",
    )
    .await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body.contains("invalid_client") && body.contains(needle),
        "{body}"
    );
}

#[tokio::test]
async fn a_task_certificate_is_never_a_caller_before_or_after_its_task_ends() {
    let broker = TestBroker::start().await;
    let agent = broker.agent().await;
    let op = broker.operator().await;
    let task = start(&agent).await;
    let cert = task_certificate(&agent, &task.task_id).await;
    let before = all_leases(&op, pb::ListLeasesRequest::default()).await;

    // While its task is live: a credential for downstream services only.
    assert_refused_everywhere(&broker, &cert, "is a task certificate").await;
    // After the task completed and the serial is on the CRL: the same.
    agent.complete_task(&task.task_id).await.unwrap();
    assert_refused_everywhere(&broker, &cert, "is a task certificate").await;
    // Nothing was created or changed by any of the attempts.
    let after = all_leases(&op, pb::ListLeasesRequest::default()).await;
    assert_eq!(after.len(), before.len());
    assert!(
        after
            .iter()
            .all(|l| l.state == pb::LeaseState::Revoked as i32)
    );
}

#[tokio::test]
async fn anything_the_issuing_ca_signed_or_any_task_segment_is_refused() {
    let broker = TestBroker::start().await;
    // The issuing CA signing an ordinary-looking agent SVID: still no caller,
    // whatever the SAN says.
    let issuing = mayfly_broker::dev::DevCa::from_pem(
        &std::fs::read_to_string(broker.path("issuing-ca.pem")).unwrap(),
        &std::fs::read_to_string(broker.path("issuing-ca.key")).unwrap(),
    )
    .unwrap();
    let id = mayfly_core::SpiffeId::new("spiffe://example.org/agent/demo").unwrap();
    let mut cred = issuing
        .issue_svid(&id, std::time::Duration::from_secs(600))
        .unwrap();
    cred.cert_pem.push_str(issuing.cert_pem());
    assert_refused_everywhere(&broker, &cred, "issued by this broker's task CA").await;

    // The workload CA issuing an SVID with the reserved segment: refused too.
    for id in [
        "spiffe://example.org/agent/demo/task/AAAAAAAAAAAAAAAAAAAAAA",
        "spiffe://example.org/task/x",
    ] {
        let cred = broker
            .ca()
            .issue_svid(
                &mayfly_core::SpiffeId::new(id).unwrap(),
                std::time::Duration::from_secs(600),
            )
            .unwrap();
        assert_refused_everywhere(&broker, &cred, "is a task certificate").await;
    }
    let all = all_leases(&broker.operator().await, pb::ListLeasesRequest::default()).await;
    assert!(all.is_empty(), "{all:?}");
}

#[tokio::test]
async fn a_trust_bundle_holding_the_issuing_ca_stops_the_broker() {
    let dir = tempfile::tempdir().unwrap();
    let td = mayfly_core::TrustDomain::new("example.org").unwrap();
    let layout = mayfly_broker::dev::init(&dir.path().join("dev"), &td).unwrap();
    let mut config = mayfly_broker::Config::load(&layout.config).unwrap();
    let mixed = dir.path().join("mixed-bundle.pem");
    let bundle = std::fs::read_to_string(&config.tls.trust_bundle).unwrap();
    let issuing = std::fs::read_to_string(layout.dir.join("issuing-ca.pem")).unwrap();
    std::fs::write(&mixed, format!("{bundle}{issuing}")).unwrap();
    config.tls.trust_bundle = mixed;
    let e = mayfly_broker::Broker::build(config)
        .unwrap_err()
        .to_string();
    assert!(e.contains("holds the broker's issuing CA"), "{e}");
    assert!(e.contains("mixed-bundle.pem"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_federated_trust_domain_is_accepted_only_under_its_own_bundle() {
    let td = mayfly_core::TrustDomain::new("partner.example").unwrap();
    let partner = mayfly_broker::dev::DevCa::generate(&td).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("partner.pem");
    std::fs::write(&bundle, partner.cert_pem()).unwrap();
    let broker = TestBroker::start_with(move |c| {
        c.tls.federated = vec![mayfly_broker::config::FederatedBundle {
            trust_domain: td,
            bundle,
        }];
    })
    .await;
    let ours = broker.ca();
    let partner_id = "spiffe://partner.example/agent/helper";
    let start = |client: Client| async move {
        client
            .broker()
            .start_task(start_request("federated", &[API], &["read:files"]))
            .await
    };

    // The partner's SVID under the partner's bundle: authenticated, then
    // decided by policy (no dev policy names the partner: default deny).
    let good = bad_certs::with_sans(&partner, vec![bad_certs::uri(partner_id)]);
    let err = start(broker.client_with(&good).await.unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    assert!(err.message().contains(partner_id), "{}", err.message());

    // A partner ID signed by our CA, and one of ours signed by the partner:
    // each trust domain's SVIDs chain to its own bundle only.
    for (what, cred) in [
        (
            "partner ID from our CA",
            bad_certs::with_sans(ours, vec![bad_certs::uri(partner_id)]),
        ),
        (
            "our ID from the partner's CA",
            bad_certs::with_sans(
                &partner,
                vec![bad_certs::uri("spiffe://example.org/agent/demo")],
            ),
        ),
    ] {
        let err = start(broker.client_with(&cred).await.unwrap())
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::Unauthenticated,
            "{what}: {}",
            err.message()
        );
    }
    // A trust domain with no bundle stays out, as before.
    let other = bad_certs::with_sans(ours, vec![bad_certs::uri("spiffe://other.org/agent/x")]);
    let err = start(broker.client_with(&other).await.unwrap())
        .await
        .unwrap_err();
    assert!(
        err.message().contains("not in trust domain"),
        "{}",
        err.message()
    );
}
