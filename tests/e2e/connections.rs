//! Connections as an attacker holds them: thousands of idle TLS
//! connections from one source neither crowd out agents nor stay open past
//! the idle timeout, on either port; authenticated callers are not held to
//! the anonymous caps; an idle agent's connection closes gracefully and
//! its client carries on; a revocation feed stream is never idle.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mayfly_client::pb;
use mayfly_testkit::{TestBroker, https_get};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::AsyncReadExt;
use tokio::net::TcpSocket;
use tokio::task::JoinSet;
use tokio_rustls::client::TlsStream;

use crate::common::*;

/// The attacker's address: another loopback address than the agents'.
const ATTACKER: &str = "127.0.0.2";

/// A TLS client of `broker` offering `alpn`, without a client certificate.
pub(crate) fn tls_client(broker: &TestBroker, alpn: &[u8]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&broker.bundle_pem()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// Opens `n` TLS connections (no client certificate) from `from` to `to`,
/// completes as many handshakes as the broker lets through, and holds
/// those open without sending anything.
async fn hold_idle_connections(
    connector: &tokio_rustls::TlsConnector,
    from: &str,
    to: SocketAddr,
    n: usize,
) -> Vec<TlsStream<tokio::net::TcpStream>> {
    let mut held = Vec::new();
    let mut pending = JoinSet::new();
    for i in 0..n {
        let connector = connector.clone();
        let from: SocketAddr = format!("{from}:0").parse().unwrap();
        pending.spawn(async move {
            let socket = TcpSocket::new_v4().ok()?;
            socket.bind(from).ok()?;
            let tcp = socket.connect(to).await.ok()?;
            let name = ServerName::try_from("localhost").unwrap();
            tokio::time::timeout(Duration::from_secs(20), connector.connect(name, tcp))
                .await
                .ok()?
                .ok()
        });
        // A few hundred handshakes at a time.
        if i % 200 == 199 {
            while let Some(r) = pending.join_next().await {
                held.extend(r.unwrap());
            }
        }
    }
    while let Some(r) = pending.join_next().await {
        held.extend(r.unwrap());
    }
    held
}

/// Waits until the broker has closed every connection in `held`.
async fn closed_by_the_broker(held: Vec<TlsStream<tokio::net::TcpStream>>, within: Duration) {
    let mut reads = JoinSet::new();
    for mut s in held {
        reads.spawn(async move {
            let mut buf = [0u8; 1024];
            loop {
                match s.read(&mut buf).await {
                    // EOF or a reset: closed. Bytes: a GOAWAY or alert first.
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        });
    }
    let all = async { while reads.join_next().await.is_some() {} };
    tokio::time::timeout(within, all)
        .await
        .expect("the broker closed every idle connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tls_connections_from_one_source_neither_crowd_out_agents_nor_stay() {
    let idle = Duration::from_secs(3);
    let broker =
        TestBroker::start_with(|c| c.connections.unauthenticated_idle_timeout = idle).await;
    let per_source = broker.config.connections.max_unauthenticated_per_source;

    let unauthenticated = |m: &str, port: &str| {
        count(
            m,
            &format!("mayfly_connections{{port=\"{port}\",state=\"unauthenticated\"}}"),
        )
    };

    // 5,000 on the gRPC port from one source: the broker holds its share,
    // no more (some it held were closed as idle while the flood went on).
    let grpc = tls_client(&broker, b"h2");
    let held = hold_idle_connections(&grpc, ATTACKER, broker.grpc_addr, 5000).await;
    let admitted_grpc = held.len();
    assert!(admitted_grpc >= per_source, "{admitted_grpc} held");
    let m = scrape(&broker).await;
    assert!(unauthenticated(&m, "grpc") <= per_source as f64, "{m}");
    // An agent (another source) is served at once: a new connection, a
    // task, a token, within the issue's bar of one second.
    let t = Instant::now();
    let agent = broker.agent().await;
    let task = start(&agent).await;
    issue(&agent, &task.task_id).await;
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "agent served in {:?}",
        t.elapsed()
    );
    // Every connection still held is closed once idle for the timeout.
    // (The idle timeout, a second's grace to close, and room for a busy
    // machine.)
    closed_by_the_broker(held, idle + Duration::from_secs(6)).await;

    // The same on the HTTPS port: JWKS still answers.
    let https = tls_client(&broker, b"http/1.1");
    let held = hold_idle_connections(&https, ATTACKER, broker.http_addr, 5000).await;
    let admitted_https = held.len();
    let m = scrape(&broker).await;
    // The scrape itself is one of the port's unauthenticated connections.
    assert!(
        unauthenticated(&m, "https") <= per_source as f64 + 1.0,
        "{m}"
    );
    let t = Instant::now();
    let (status, _) = https_get(
        &format!("{}/.well-known/jwks.json", broker.http_url()),
        &broker.bundle_pem(),
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "JWKS served in {:?}",
        t.elapsed()
    );
    closed_by_the_broker(held, idle + Duration::from_secs(6)).await;

    // Every other attempt was refused at accept, and counted.
    let m = scrape(&broker).await;
    for (port, admitted) in [("grpc", admitted_grpc), ("https", admitted_https)] {
        let refused =
            format!("mayfly_connections_refused_total{{port=\"{port}\",reason=\"source_limit\"}}");
        assert_eq!(count(&m, &refused), (5000 - admitted) as f64, "{port}: {m}");
        let idle = format!("mayfly_connections_closed_total{{port=\"{port}\",reason=\"idle\"}}");
        assert!(count(&m, &idle) >= admitted as f64, "{port}: {m}");
    }
    // And the source may connect again: nothing stays counted.
    assert_eq!(
        hold_idle_connections(&grpc, ATTACKER, broker.grpc_addr, 3)
            .await
            .len(),
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticated_callers_are_not_held_to_the_anonymous_caps() {
    let broker = TestBroker::start_with(|c| {
        c.connections.max = 64;
        c.connections.max_unauthenticated = 4;
        c.connections.max_unauthenticated_per_source = 2;
    })
    .await;
    let grpc = tls_client(&broker, b"h2");
    let held = hold_idle_connections(&grpc, ATTACKER, broker.grpc_addr, 10).await;
    assert_eq!(held.len(), 2);
    // Ten agents, each on its own connection from one address (as behind a
    // load balancer), far beyond the anonymous caps: all served at once.
    let mut agents = Vec::new();
    for _ in 0..10 {
        agents.push(broker.agent().await);
    }
    for agent in &agents {
        start(agent).await;
    }
    let m = scrape(&broker).await;
    assert_eq!(
        count(
            &m,
            "mayfly_connections{port=\"grpc\",state=\"authenticated\"}"
        ),
        10.0,
        "{m}"
    );
    assert_eq!(
        count(
            &m,
            "mayfly_connections{port=\"grpc\",state=\"unauthenticated\"}"
        ),
        2.0
    );
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_agent_connection_closes_gracefully_and_the_client_carries_on() {
    let broker =
        TestBroker::start_with(|c| c.connections.idle_timeout = Duration::from_secs(1)).await;
    let agent = broker.agent().await;
    let task = start(&agent).await;
    // A feed stream on its own connection stays open while it lasts.
    let watcher = broker.client_as("spiffe://example.org/api/watcher").await;
    let mut feed = pb::revocations_client::RevocationsClient::new(watcher.channel())
        .watch_revocations(pb::WatchRequest { from_cursor: 0 })
        .await
        .unwrap()
        .into_inner();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let m = scrape(&broker).await;
    assert!(
        count(
            &m,
            "mayfly_connections_closed_total{port=\"grpc\",reason=\"idle\"}"
        ) >= 1.0,
        "the agent's idle connection was closed: {m}"
    );
    // The client reconnects by itself: the next call just works.
    let token = issue(&agent, &task.task_id).await;
    // The feed's connection was never idle: the revocation arrives on it.
    let op = broker.operator().await;
    op.admin()
        .revoke_lease(pb::RevokeLeaseRequest {
            lease_id: token.lease_id.clone(),
            note: String::new(),
        })
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let e = tokio::time::timeout_at(deadline.into(), feed.message())
            .await
            .expect("the feed delivers")
            .unwrap()
            .expect("the stream is still open");
        if e.lease_id == token.lease_id {
            break;
        }
    }
}

#[tokio::test]
async fn oversized_http_headers_and_bodies_are_refused() {
    use tokio::io::AsyncWriteExt;
    let broker = TestBroker::start().await;
    // A header block over 16 KiB: 431 from the HTTP layer, before routing.
    let tcp = tokio::net::TcpStream::connect(broker.http_addr)
        .await
        .unwrap();
    let mut tls = tls_client(&broker, b"http/1.1")
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let request = format!(
        "GET /healthz HTTP/1.1\r\nhost: localhost\r\nx-filler: {}\r\n\r\n",
        "a".repeat(20 * 1024)
    );
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");

    // A form over 16 KiB: 413 with the RFC 6749 error code, saying why.
    let resource_server = broker
        .ca()
        .issue_svid(
            &mayfly_core::SpiffeId::new("spiffe://example.org/api/rs").unwrap(),
            Duration::from_secs(600),
        )
        .unwrap();
    let (status, _, body) = mayfly_testkit::https_post_form(
        &format!("{}/introspect", broker.http_url()),
        &broker.bundle_pem(),
        Some(&resource_server),
        &format!("token={}", "a".repeat(17 * 1024)),
    )
    .await;
    assert_eq!(status, 413, "{body}");
    assert!(
        body.contains("invalid_request") && body.contains("exceeds 16384 bytes"),
        "{body}"
    );
}
