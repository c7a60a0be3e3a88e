//! A downstream service with a stock rustls server, trusting the Mayfly
//! trust bundle, accepts an agent's task certificate for client auth, and
//! `Verifier::task_identity` tells it the agent and the task, until the
//! broker revokes the certificate or ends its task.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use std::time::Duration;

use mayfly_client::{Client, NewTask, pb};
use mayfly_core::SpiffeId;
use mayfly_testkit::TestBroker;
use mayfly_verify::{PeerCertError, Verifier, VerifierConfig, parse_task_certificate};
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

fn certs(pem: &[u8]) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem)
        .map(Result::unwrap)
        .collect()
}

/// A verifier following `broker`'s revocation feed as a downstream API.
async fn verifier(broker: &TestBroker) -> Verifier {
    let id = broker
        .ca()
        .issue_svid(
            &SpiffeId::new("spiffe://example.org/api/billing").unwrap(),
            Duration::from_secs(3600),
        )
        .unwrap();
    let mut c = VerifierConfig::new(
        &broker.issuer(),
        "https://api.example.com",
        broker.bundle_pem(),
    )
    .with_feed(
        &broker.url(),
        id.cert_pem.as_bytes().to_vec(),
        id.key_pem.as_bytes().to_vec(),
    );
    c.jwks_url = format!("{}/.well-known/jwks.json", broker.http_url());
    let v = Verifier::connect(c).await.unwrap();
    assert!(v.wait_for_feed(Duration::from_secs(5)).await);
    v
}

/// A task certificate for a fresh key under `task`: (issued, key).
async fn task_certificate(agent: &Client, task: &str) -> (pb::IssuedCertificate, rcgen::KeyPair) {
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
    (issued, key)
}

/// Polls until `check` holds (the feed delivers within milliseconds).
async fn eventually(mut check: impl FnMut() -> bool) {
    for _ in 0..500 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not reached within 5 s");
}

#[tokio::test]
async fn a_revoked_task_certificate_or_one_whose_task_ended_is_refused() {
    let broker = TestBroker::start().await;
    let agent = broker.agent().await;
    let op = broker.operator().await;
    let v = verifier(&broker).await;
    let api = ["https://api.example.com"];
    let task = agent
        .start_task(NewTask::new("two certificates", api).scope("read:x"))
        .await
        .unwrap()
        .detach();
    let (first, _) = task_certificate(&agent, &task.task_id).await;
    let (second, _) = task_certificate(&agent, &task.task_id).await;
    let der = |c: &pb::IssuedCertificate| certs(c.certificate_pem.as_bytes()).remove(0);
    let (first_der, second_der) = (der(&first), der(&second));
    let id = v.task_identity(first_der.as_ref()).unwrap();
    assert_eq!(id.serial, first.serial);
    assert_eq!(id.task_id.as_str(), task.task_id);

    // One certificate revoked by an operator: that one goes, the other stays.
    op.admin()
        .revoke_lease(pb::RevokeLeaseRequest {
            lease_id: first.lease_id.clone(),
            note: "key left on a laptop".into(),
        })
        .await
        .unwrap();
    eventually(|| v.task_identity(first_der.as_ref()).is_err()).await;
    assert_eq!(
        v.task_identity(first_der.as_ref()),
        Err(PeerCertError::Revoked {
            serial: first.serial.clone()
        })
    );
    assert!(v.task_identity(second_der.as_ref()).is_ok());

    // The task completes: its remaining certificate goes with it.
    agent.complete_task(&task.task_id).await.unwrap();
    eventually(|| v.task_identity(second_der.as_ref()).is_err()).await;
    assert!(matches!(
        v.task_identity(second_der.as_ref()),
        Err(PeerCertError::Revoked { .. })
    ));
    // The form-only parse still reads it: it is not the checked path.
    assert!(parse_task_certificate(second_der.as_ref()).is_ok());
}

#[tokio::test]
async fn rustls_accepts_the_task_certificate_and_the_helper_reads_it() {
    let broker = TestBroker::start().await;
    let agent = broker.agent().await;
    let v = verifier(&broker).await;
    let task = agent
        .start_task(
            NewTask::new("call billing over mTLS", ["https://api.example.com"]).scope("read:x"),
        )
        .await
        .unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap();
    let issued = agent
        .broker()
        .sign_certificate(pb::SignCertificateRequest {
            task_id: task.id().to_owned(),
            csr: csr.der().to_vec(),
            ttl_seconds: 0,
            approval_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();

    // The downstream service: trusts the bundle, requires client certificates.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(&broker.bundle_pem()) {
        roots.add(c).unwrap();
    }
    let roots = Arc::new(roots);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .unwrap();
    let server_cert = std::fs::read(broker.path("server.pem")).unwrap();
    let server_key = PrivateKeyDer::from_pem_file(broker.path("server.key")).unwrap();
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(&server_cert), server_key)
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let accepted = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let tls = acceptor
            .accept(tcp)
            .await
            .expect("handshake with the task certificate");
        let peer = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        v.task_identity(peer.as_ref())
    });

    // The agent presents leaf + chain with its own key.
    let mut chain = certs(issued.certificate_pem.as_bytes());
    chain.extend(certs(issued.chain_pem.as_bytes()));
    let client_key = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, client_key)
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _tls = tokio_rustls::TlsConnector::from(Arc::new(client))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();

    let identity = accepted.await.unwrap().unwrap();
    assert_eq!(identity.task_id.as_str(), task.id());
    assert_eq!(identity.agent.as_str(), "spiffe://example.org/agent/demo");
    assert_eq!(identity.spiffe_id.as_str(), issued.spiffe_id);
}

#[tokio::test]
async fn an_agent_svid_is_not_task_bound() {
    let broker = TestBroker::start().await;
    let pem = std::fs::read(broker.path("identities/agent-demo/svid.pem")).unwrap();
    let der = certs(&pem).remove(0);
    assert!(matches!(
        parse_task_certificate(der.as_ref()),
        Err(PeerCertError::NotTaskBound(_))
    ));
    let ca = certs(&broker.bundle_pem()).remove(0);
    assert_eq!(
        parse_task_certificate(ca.as_ref()),
        Err(PeerCertError::IsCa)
    );
    assert!(matches!(
        parse_task_certificate(b"junk"),
        Err(PeerCertError::Malformed(_))
    ));
}
