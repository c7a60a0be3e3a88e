//! Identities from the SPIFFE Workload API (served by the testkit from the
//! public workload.proto, as SPIRE's agent would; SPIRE is not packaged
//! here): an agent's calls are made as the SVID served now, across three
//! rotations with none failing; the broker serves with the Workload API's
//! SVID and bundle, follows a rotation under load with zero failed calls,
//! and refuses a rotated-out CA's SVIDs; a federated trust domain's bundle
//! comes from the Workload API too, and follows the partner's rotation;
//! and the JWT bundle JWT-SVIDs are checked against comes from its
//! `FetchJWTBundles` stream, following a key rotation.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use mayfly_broker::dev::{Credential, DevCa};
use mayfly_client::Client;
use mayfly_core::{SpiffeId, TrustDomain};
use mayfly_testkit::{TestBroker, WorkloadApi};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::common::*;

const AGENT: &str = "spiffe://example.org/agent/demo";

fn thumbprint(cert_pem: &str) -> String {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
    mayfly_verify::cert_thumbprint(&der)
}

/// The certificate a bound token issued now is bound to.
async fn bound_to(agent: &Client, task: &str) -> String {
    let mut req = token_request(task, API, &["read:files"]);
    req.bind_to_client_cert = true;
    let token = agent
        .issue_token(req)
        .await
        .expect("no call may fail")
        .token;
    claims_unverified(&token)["cnf"]["x5t#S256"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_keeps_working_across_three_rotations() {
    let broker = TestBroker::start().await;
    let api = broker.workload_api(AGENT, Duration::from_secs(3600)).await;
    let agent = Client::connect_workload_api(&broker.url(), Some(&api.endpoint()))
        .await
        .unwrap();
    let task = start(&agent).await;
    assert_eq!(task.agent_id, AGENT);
    assert_eq!(
        bound_to(&agent, &task.task_id).await,
        thumbprint(&api.current().cert_pem)
    );

    for _ in 0..3 {
        let before = thumbprint(&api.current().cert_pem);
        let next = thumbprint(&api.rotate().cert_pem);
        assert_ne!(before, next);
        let mut seen = before.clone();
        for _ in 0..200 {
            seen = bound_to(&agent, &task.task_id).await;
            if seen == next {
                break;
            }
            assert_eq!(seen, before, "bound to a certificate nobody served");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(seen, next, "the rotated SVID was never used");
    }
    // The task outlived every rotation and completes as the agent.
    agent.complete_task(&task.task_id).await.unwrap();
}

#[tokio::test]
async fn a_workload_api_without_an_svid_is_a_clear_error() {
    let broker = TestBroker::start().await;
    let dir = tempfile::tempdir().unwrap();
    let nowhere = format!("unix://{}/missing.sock", dir.path().display());
    let err = Client::connect_workload_api(&broker.url(), Some(&nowhere))
        .await
        .unwrap_err();
    assert!(
        err.to_string().starts_with("SPIFFE Workload API: "),
        "{err}"
    );
}

/// A client that trusts `cas` for the broker and presents `svid`.
async fn connect_with(broker: &TestBroker, cas: &[&DevCa], svid: &Credential) -> Client {
    Client::connect(&mayfly_client::ClientConfig {
        broker: broker.url(),
        ca_pem: cas.iter().flat_map(|c| c.cert_pem().bytes()).collect(),
        cert_pem: svid.cert_pem.as_bytes().to_vec(),
        key_pem: svid.key_pem.as_bytes().to_vec().into(),
    })
    .await
    .unwrap()
}

/// The leaf a fresh handshake with the gRPC port is shown, trusting `cas`.
async fn presented(broker: &TestBroker, cas: &[&DevCa]) -> Option<Vec<u8>> {
    let roots: Vec<u8> = cas.iter().flat_map(|c| c.cert_pem().bytes()).collect();
    presented_leaf(broker, &roots).await
}

fn der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

/// A broker whose identity comes from a Workload API serving SVIDs of
/// `ca` (naming `localhost`, as a SPIRE entry's DNS names would), with
/// `tweak` applied to its config last.
async fn broker_on_workload_api(
    ca: Arc<DevCa>,
    tweak: impl FnOnce(&mut mayfly_broker::Config) + Send + 'static,
) -> (WorkloadApi, TestBroker) {
    let api = WorkloadApi::start_with_dns(
        ca,
        "spiffe://example.org/mayfly/broker",
        &["localhost"],
        Duration::from_secs(3600),
    )
    .await;
    let endpoint = api.endpoint();
    let broker = TestBroker::start_with(move |c| {
        c.tls.cert = Default::default();
        c.tls.key = Default::default();
        c.tls.trust_bundle = Default::default();
        c.tls.workload_api = Some(endpoint);
        tweak(c);
    })
    .await;
    (api, broker)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_serves_with_a_workload_api_identity_and_follows_it() {
    let td = TrustDomain::new("example.org").unwrap();
    let (ca1, ca2) = (
        Arc::new(DevCa::generate(&td).unwrap()),
        Arc::new(DevCa::generate(&td).unwrap()),
    );
    let (api, broker) = broker_on_workload_api(ca1.clone(), |_| {}).await;
    let agent_id = SpiffeId::new(AGENT).unwrap();
    let svid1 = ca1
        .issue_svid(&agent_id, Duration::from_secs(3600))
        .unwrap();
    let svid2 = ca2
        .issue_svid(&agent_id, Duration::from_secs(3600))
        .unwrap();
    let both = [ca1.as_ref(), ca2.as_ref()];

    // Serving as the Workload API's SVID (once the first one arrived).
    eventually(
        "the broker never presented the Workload API's SVID",
        || async { presented(&broker, &both).await == Some(der(&api.current().cert_pem)) },
    )
    .await;
    let kept = connect_with(&broker, &both, &svid1).await;
    let task = start(&kept).await;

    // Rotated under load: agents reconnecting all the time see no failure,
    // and new handshakes get the new SVID.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let calls = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for _ in 0..2 {
        let (stop, failures, calls) = (stop.clone(), failures.clone(), calls.clone());
        let (url, ca_pem, svid) = (
            broker.url(),
            [ca1.cert_pem(), ca2.cert_pem()].concat().into_bytes(),
            svid1.clone(),
        );
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let config = mayfly_client::ClientConfig {
                    broker: url.clone(),
                    ca_pem: ca_pem.clone(),
                    cert_pem: svid.cert_pem.as_bytes().to_vec(),
                    key_pem: svid.key_pem.as_bytes().to_vec().into(),
                };
                let ok = match Client::connect(&config).await {
                    Ok(c) => c
                        .broker()
                        .start_task(start_request("load", &[API], &["read:files"]))
                        .await
                        .is_ok(),
                    Err(_) => false,
                };
                let counter = if ok { &calls } else { &failures };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rotated = der(&api.rotate().cert_pem);
    let mut seen = false;
    for _ in 0..200 {
        if presented(&broker, &both).await.as_ref() == Some(&rotated) {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let at_swap = calls.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    assert!(seen, "the rotated SVID was never presented");
    assert_eq!(failures.load(Ordering::Relaxed), 0);
    assert!(calls.load(Ordering::Relaxed) > at_swap && at_swap > 0);
    issue(&kept, &task.task_id).await;

    // The Workload API moves to another CA: the old CA's SVIDs are refused
    // on new connections, the new CA's accepted, the live one kept.
    let moved = der(&api.rotate_ca(ca2.clone()).cert_pem);
    for _ in 0..200 {
        if presented(&broker, &both).await.as_ref() == Some(&moved) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let err = connect_with(&broker, &both, &svid1)
        .await
        .broker()
        .start_task(start_request("old CA", &[API], &["read:files"]))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::Unauthenticated,
        "{}",
        err.message()
    );
    start(&connect_with(&broker, &both, &svid2).await).await;
    issue(&kept, &task.task_id).await;
}

/// What the broker answers `svid` (trusting the broker through `cas`):
/// `Ok` when it authenticated the caller (policy may still deny), the
/// refusal when it did not (or no handshake, before the broker has an
/// identity).
async fn authenticated(
    broker: &TestBroker,
    cas: &[&DevCa],
    svid: &Credential,
) -> Result<(), tonic::Status> {
    let client = Client::connect(&mayfly_client::ClientConfig {
        broker: broker.url(),
        ca_pem: cas.iter().flat_map(|c| c.cert_pem().bytes()).collect(),
        cert_pem: svid.cert_pem.as_bytes().to_vec(),
        key_pem: svid.key_pem.as_bytes().to_vec().into(),
    })
    .await
    .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    match client
        .broker()
        .start_task(start_request("federated", &[API], &["read:files"]))
        .await
    {
        Err(e) if e.code() == tonic::Code::Unauthenticated => Err(e),
        _ => Ok(()),
    }
}

/// Waits (at most 5 s) until the broker authenticates `svid`; `what`
/// names the change being waited for.
async fn until_authenticated(broker: &TestBroker, cas: &[&DevCa], svid: &Credential, what: &str) {
    eventually(what, || async {
        authenticated(broker, cas, svid).await.is_ok()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_federated_bundle_comes_from_the_workload_api_and_follows_it() {
    use mayfly_testkit::bad_certs;
    let td = TrustDomain::new("example.org").unwrap();
    let ours = Arc::new(DevCa::generate(&td).unwrap());
    let partner_td = TrustDomain::new("partner.example").unwrap();
    let (partner1, partner2) = (
        DevCa::generate(&partner_td).unwrap(),
        DevCa::generate(&partner_td).unwrap(),
    );
    let (api, broker) = broker_on_workload_api(ours.clone(), move |c| {
        // No file: the Workload API's federated bundle for the domain.
        c.tls.federated = vec![mayfly_broker::config::FederatedBundle {
            trust_domain: partner_td,
            bundle: Default::default(),
        }];
    })
    .await;
    let cas = [ours.as_ref()];
    let partner_id = "spiffe://partner.example/agent/helper";
    let from1 = bad_certs::with_sans(&partner1, vec![bad_certs::uri(partner_id)]);
    let from2 = bad_certs::with_sans(&partner2, vec![bad_certs::uri(partner_id)]);
    let from_ours = bad_certs::with_sans(&ours, vec![bad_certs::uri(partner_id)]);
    let agent = ours
        .issue_svid(&SpiffeId::new(AGENT).unwrap(), Duration::from_secs(3600))
        .unwrap();
    until_authenticated(
        &broker,
        &cas,
        &agent,
        "the broker never took the Workload API's identity",
    )
    .await;

    // No bundle for the partner yet: refused, and never under our own
    // bundle in its place.
    for svid in [&from1, &from_ours] {
        let e = authenticated(&broker, &cas, svid).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{}", e.message());
        assert!(
            e.message()
                .contains("no bundle for federated trust domain partner.example"),
            "{}",
            e.message()
        );
    }

    // The Workload API federates the partner: its SVIDs get in, a partner
    // ID from our CA still does not.
    api.federate("partner.example", &partner1);
    until_authenticated(
        &broker,
        &cas,
        &from1,
        "the federated bundle was never taken",
    )
    .await;
    for svid in [&from_ours, &from2] {
        let e = authenticated(&broker, &cas, svid).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{}", e.message());
    }

    // The partner rotates its CA: the old one's SVIDs are refused, the new
    // one's accepted.
    api.federate("partner.example", &partner2);
    until_authenticated(
        &broker,
        &cas,
        &from2,
        "the partner's new bundle was never taken",
    )
    .await;
    let e = authenticated(&broker, &cas, &from1).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{}", e.message());
}

/// Opens a task as the caller a JWT-SVID signed by `by` proves, over TLS
/// trusting `ca`.
async fn start_with_jwt_svid(
    broker: &TestBroker,
    ca: &DevCa,
    by: &mayfly_testkit::TokenIssuer,
) -> Result<mayfly_client::pb::Task, tonic::Status> {
    let now = mayfly_testkit::oidc::unix_now();
    let token = by.sign(&serde_json::json!({
        "sub": "spiffe://example.org/agent/jwt-workload",
        "aud": [broker.config.issuer()], "iat": now, "exp": now + 300,
    }));
    let client = Client::connect_with_token(&broker.url(), ca.cert_pem().as_bytes(), &token)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    client
        .broker()
        .start_task(start_request("jwt-svid", &[API], &["read:files"]))
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_jwt_bundle_comes_from_the_workload_api_and_follows_it() {
    let td = TrustDomain::new("example.org").unwrap();
    let ours = Arc::new(DevCa::generate(&td).unwrap());
    let (api, broker) = broker_on_workload_api(ours.clone(), |c| {
        c.federation =
            vec![toml::from_str("workload_api = true\nalgorithms = [\"ES256\"]").unwrap()];
    })
    .await;
    let (key1, key2) = (
        mayfly_testkit::TokenIssuer::ec("", "jwt-authority-1"),
        mayfly_testkit::TokenIssuer::ec("", "jwt-authority-2"),
    );
    eventually(
        "the broker never served the Workload API's SVID",
        || async { presented(&broker, &[&ours]).await.is_some() },
    )
    .await;
    // No JWT bundle yet: the token cannot be checked, so UNAVAILABLE (a
    // retry may succeed), never accepted.
    assert_status(
        start_with_jwt_svid(&broker, &ours, &key1).await,
        tonic::Code::Unavailable,
        "has not sent the JWT bundle yet",
    );
    api.set_jwt_bundle("example.org", &mayfly_testkit::TokenIssuer::jwks(&[&key1]));
    eventually("the first JWT bundle was never used", || async {
        start_with_jwt_svid(&broker, &ours, &key1).await.is_ok()
    })
    .await;
    let task = start_with_jwt_svid(&broker, &ours, &key1).await.unwrap();
    assert_eq!(task.agent_id, "spiffe://example.org/agent/jwt-workload");

    // SPIRE rotates the JWT signing key: the new one is accepted, the
    // retired one refused, with no restart.
    api.set_jwt_bundle("example.org", &mayfly_testkit::TokenIssuer::jwks(&[&key2]));
    eventually("the rotated JWT bundle was never used", || async {
        start_with_jwt_svid(&broker, &ours, &key2).await.is_ok()
    })
    .await;
    assert_status(
        start_with_jwt_svid(&broker, &ours, &key1).await,
        tonic::Code::Unauthenticated,
        "is not one of issuer",
    );
}
