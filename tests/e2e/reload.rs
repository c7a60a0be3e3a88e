//! The broker's TLS files replaced while it serves: new handshakes get the
//! new server certificate with no failed call under load, live connections
//! keep working, an invalid replacement is refused and the old material
//! kept, and a trust bundle without a CA refuses that CA's SVIDs on new
//! connections while the new CA's are let in.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use mayfly_broker::dev::DevCa;
use mayfly_core::{SpiffeId, TrustDomain};
use mayfly_testkit::TestBroker;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tonic::Code;

use crate::common::*;

const RELOAD: Duration = Duration::from_millis(100);

/// The leaf a fresh TLS handshake with the gRPC port is shown (DER).
async fn presented(broker: &TestBroker) -> Vec<u8> {
    presented_leaf(broker, &broker.bundle_pem())
        .await
        .expect("the handshake completes")
}

fn der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

/// Writes `text` to `path` the way deploy tools do: a new file renamed
/// over the old one, keeping its mode.
fn replace(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    let mode = std::fs::metadata(path).unwrap().permissions();
    std::fs::set_permissions(&tmp, mode).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Polls until a fresh handshake is shown `want`.
async fn until_presented(broker: &TestBroker, want: &[u8]) {
    eventually("the new server certificate was never presented", || async {
        presented(broker).await == want
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_certificate_is_replaced_under_load_and_a_bad_one_is_refused() {
    let broker = TestBroker::start_with(|c| c.tls.reload_interval = RELOAD).await;
    let before = presented(&broker).await;
    assert_eq!(
        before,
        der(&std::fs::read_to_string(broker.path("server.pem")).unwrap())
    );

    // Load: agents that open a new connection (a new handshake) for every
    // few calls, and one that keeps its connection throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let (calls, failures) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let keeper = broker.agent().await;
    let kept_task = start(&keeper).await;
    let mut load = Vec::new();
    for _ in 0..3 {
        let (broker_url, stop, calls, failures) =
            (broker.url(), stop.clone(), calls.clone(), failures.clone());
        let dir = broker.path("identities/agent-demo");
        let bundle = broker.bundle_pem();
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let agent = match mayfly_client::Client::connect(&mayfly_client::ClientConfig {
                    broker: broker_url.clone(),
                    ca_pem: bundle.clone(),
                    cert_pem: std::fs::read(dir.join("svid.pem")).unwrap(),
                    key_pem: std::fs::read(dir.join("svid.key")).unwrap().into(),
                })
                .await
                {
                    Ok(a) => a,
                    Err(_) => {
                        failures.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                };
                let task = agent
                    .broker()
                    .start_task(start_request("load", &[API], &["read:x"]))
                    .await;
                match task {
                    Ok(t) => {
                        let t = t.into_inner();
                        for _ in 0..3 {
                            match agent
                                .issue_token(token_request(&t.task_id, API, &["read:x"]))
                                .await
                            {
                                Ok(_) => calls.fetch_add(1, Ordering::Relaxed),
                                Err(_) => failures.fetch_add(1, Ordering::Relaxed),
                            };
                        }
                    }
                    Err(_) => {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The new certificate and key, each renamed into place: between the
    // two renames the files do not match, and that set is refused too.
    let fresh = broker
        .ca()
        .issue_server(&["localhost", "127.0.0.1"], Duration::from_secs(3600))
        .unwrap();
    replace(&broker.path("server.pem"), &fresh.cert_pem);
    replace(&broker.path("server.key"), &fresh.key_pem);
    until_presented(&broker, &der(&fresh.cert_pem)).await;
    let at_swap = calls.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Garbage in place of the certificate: refused, the last good one stays.
    replace(
        &broker.path("server.pem"),
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    );
    tokio::time::sleep(RELOAD * 5).await;
    assert_eq!(presented(&broker).await, der(&fresh.cert_pem));
    // A certificate whose key is not the key file's: refused as well.
    let other = broker
        .ca()
        .issue_server(&["localhost"], Duration::from_secs(3600))
        .unwrap();
    replace(&broker.path("server.pem"), &other.cert_pem);
    tokio::time::sleep(RELOAD * 5).await;
    assert_eq!(presented(&broker).await, der(&fresh.cert_pem));

    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    // The connection made before the swap still works.
    issue(&keeper, &kept_task.task_id).await;
    assert_eq!(failures.load(Ordering::Relaxed), 0);
    assert!(
        calls.load(Ordering::Relaxed) > at_swap,
        "no load after the swap"
    );
    assert!(at_swap > 0, "no load before the swap");
}

/// A client that trusts `ca_pem` (the CA of the broker's own certificate)
/// and presents `cert_pem` with `key_pem`.
async fn connect(
    broker: &TestBroker,
    ca_pem: &[u8],
    cert_pem: &[u8],
    key_pem: &[u8],
) -> mayfly_client::Client {
    mayfly_client::Client::connect(&mayfly_client::ClientConfig {
        broker: broker.url(),
        ca_pem: ca_pem.to_vec(),
        cert_pem: cert_pem.to_vec(),
        key_pem: key_pem.to_vec().into(),
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_trust_bundle_decides_new_connections() {
    let broker = TestBroker::start_with(|c| c.tls.reload_interval = RELOAD).await;
    // The broker's own certificate stays under the first CA: clients keep
    // trusting it for the server, whatever the broker trusts for clients.
    let server_ca = broker.bundle_pem();
    let (svid, key) = (
        std::fs::read(broker.path("identities/agent-demo/svid.pem")).unwrap(),
        std::fs::read(broker.path("identities/agent-demo/svid.key")).unwrap(),
    );
    let old_agent = connect(&broker, &server_ca, &svid, &key).await;
    start(&old_agent).await;
    let td = TrustDomain::new("example.org").unwrap();
    let next = DevCa::generate(&td).unwrap();
    let agent = SpiffeId::new("spiffe://example.org/agent/demo").unwrap();
    let next_svid = next.issue_svid(&agent, Duration::from_secs(3600)).unwrap();
    let (next_cert, next_key) = (
        next_svid.cert_pem.as_bytes().to_vec(),
        next_svid.key_pem.as_bytes().to_vec(),
    );

    // The bundle now holds only the next CA: the old CA's SVIDs are refused
    // on new connections, the next CA's accepted, and the connection made
    // before keeps working.
    replace(&broker.path("bundle.pem"), next.cert_pem());
    let mut refused = None;
    for _ in 0..100 {
        let fresh = connect(&broker, &server_ca, &svid, &key).await;
        match fresh
            .broker()
            .start_task(start_request("t", &[API], &["read:x"]))
            .await
        {
            Err(s) => {
                refused = Some(s);
                break;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(25)).await,
        }
    }
    let refused = refused.expect("the rotated-out CA's SVID was still accepted");
    assert_eq!(
        refused.code(),
        Code::Unauthenticated,
        "{}",
        refused.message()
    );
    start(&connect(&broker, &server_ca, &next_cert, &next_key).await).await;
    start(&old_agent).await;

    // A bundle that holds the broker's issuing CA is refused at reload as
    // at start: the next CA stays the one trusted.
    let issuing = std::fs::read_to_string(broker.path("issuing-ca.pem")).unwrap();
    replace(&broker.path("bundle.pem"), &issuing);
    tokio::time::sleep(RELOAD * 5).await;
    start(&connect(&broker, &server_ca, &next_cert, &next_key).await).await;
}
