//! A downstream service with a stock rustls server, trusting the Mayfly
//! trust bundle, accepts an agent's task certificate for client auth, and
//! `task_identity` tells it the agent and the task.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use mayfly_client::{NewTask, pb};
use mayfly_testkit::TestBroker;
use mayfly_verify::{PeerCertError, task_identity};
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

fn certs(pem: &[u8]) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem)
        .map(Result::unwrap)
        .collect()
}

#[tokio::test]
async fn rustls_accepts_the_task_certificate_and_the_helper_reads_it() {
    let broker = TestBroker::start().await;
    let agent = broker.agent().await;
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
        task_identity(peer.as_ref())
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
        task_identity(der.as_ref()),
        Err(PeerCertError::NotTaskBound(_))
    ));
    let ca = certs(&broker.bundle_pem()).remove(0);
    assert_eq!(task_identity(ca.as_ref()), Err(PeerCertError::IsCa));
    assert!(matches!(
        task_identity(b"junk"),
        Err(PeerCertError::Malformed(_))
    ));
}
