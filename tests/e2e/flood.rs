//! A connection flood that renews itself cannot starve admission: 4,000
//! idle TLS connections per port from 80 source addresses, each reopened
//! as soon as the broker closes it, for a minute, on both ports at once.
//! Throughout, an agent gets a connection, a task and a token, and a
//! validator gets JWKS (then the CRL and the discovery document), each
//! within a second, every time; the flood's connections are evicted (and
//! counted), never the newcomers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mayfly_testkit::{TestBroker, https_get};
use rustls_pki_types::ServerName;
use tokio::io::AsyncReadExt;
use tokio::net::TcpSocket;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::common::*;
use crate::connections::tls_client;

/// Idle connections the flood keeps trying to hold, per port.
const HOLDERS: usize = 4000;
/// Its source addresses: 127.0.1.1 to 127.0.1.80 (Linux routes all of
/// 127/8 to the loopback interface). Fifty holders each: under the
/// per-source cap, as a careful attacker would stay.
const SOURCES: usize = 80;
/// The broker's unauthenticated pool per port: the flood is sixty times
/// its size, and renews it well within the unauthenticated idle timeout.
const POOL: usize = 64;
/// New connections per second per port while the flood opens its first
/// [`HOLDERS`] (before the tries begin)...
const RAMP_PER_SECOND: usize = 200;
/// ...and then while it renews them: the whole pool every four seconds
/// or so, few enough to leave the machine's cores (and file descriptors)
/// to the rest of the test run.
const RENEWALS_PER_SECOND: usize = 15;
/// How long the flood runs, and how many times the agent and the
/// validator try, spread over it.
const FLOOD: Duration = Duration::from_secs(60);
const TRIES: u32 = 20;
/// The bar: each try completes within this.
const BAR: Duration = Duration::from_secs(1);

/// What the flood did on one port.
#[derive(Default)]
struct Tally {
    /// TCP connections opened.
    opened: AtomicU64,
    /// TLS handshakes completed.
    handshakes: AtomicU64,
    /// Connections that failed before their handshake completed (the
    /// broker evicted them, or a handshake timed out).
    failed: AtomicU64,
}

/// One port's flood: [`HOLDERS`] tasks, each holding one idle TLS
/// connection from its source address and opening a new one as soon as
/// the broker closes it, until `stop`. New connections draw on a shared
/// budget refilled at [`RAMP_PER_SECOND`] until [`HOLDERS`] were
/// opened, then at [`RENEWALS_PER_SECOND`].
fn flood(
    tasks: &mut JoinSet<()>,
    connector: tokio_rustls::TlsConnector,
    to: SocketAddr,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) {
    let budget = Arc::new(Semaphore::new(0));
    {
        let (budget, stop) = (budget.clone(), stop.clone());
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let mut issued = 0;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let rate = if issued < HOLDERS {
                    RAMP_PER_SECOND
                } else {
                    RENEWALS_PER_SECOND
                };
                // No more than a second's worth waiting at once.
                if budget.available_permits() < rate {
                    budget.add_permits(rate / 10);
                    issued += rate / 10;
                }
            }
            budget.close();
        });
    }
    for i in 0..HOLDERS {
        let (connector, budget, stop, tally) = (
            connector.clone(),
            budget.clone(),
            stop.clone(),
            tally.clone(),
        );
        let from: SocketAddr = format!("127.0.1.{}:0", 1 + i % SOURCES).parse().unwrap();
        tasks.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let Ok(permit) = budget.acquire().await else {
                    return;
                };
                permit.forget();
                let Some(mut tls) = open(&connector, from, to, &tally).await else {
                    tally.failed.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                tally.handshakes.fetch_add(1, Ordering::Relaxed);
                // Idle until the broker closes it (EOF, a reset, or an
                // HTTP/2 GOAWAY and then EOF), or the flood ends.
                let mut buf = [0u8; 512];
                loop {
                    let read = tokio::time::timeout(Duration::from_secs(1), tls.read(&mut buf));
                    match read.await {
                        Ok(Ok(0) | Err(_)) => break,
                        Ok(Ok(_)) => {}
                        Err(_) if stop.load(Ordering::Relaxed) => return,
                        Err(_) => {}
                    }
                }
            }
        });
    }
}

/// A TLS connection (no client certificate) from `from` to `to`, or `None`
/// if the broker closed it before the handshake completed.
async fn open(
    connector: &tokio_rustls::TlsConnector,
    from: SocketAddr,
    to: SocketAddr,
    tally: &Tally,
) -> Option<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let socket = TcpSocket::new_v4().ok()?;
    socket.bind(from).ok()?;
    let tcp = socket.connect(to).await.ok()?;
    tally.opened.fetch_add(1, Ordering::Relaxed);
    let name = ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(Duration::from_secs(20), connector.connect(name, tcp))
        .await
        .ok()?
        .ok()
}

fn series(name: &str, port: &str, label: &str, value: &str) -> String {
    format!("{name}{{port=\"{port}\",{label}=\"{value}\"}}")
}

/// Evictions on `port`, whatever the evicted connections were doing.
fn evicted(m: &str, port: &str) -> f64 {
    ["idle", "opening", "in_flight"]
        .iter()
        .map(|r| {
            count(
                m,
                &series("mayfly_connections_evicted_total", port, "reason", r),
            )
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_connection_flood_on_both_ports_starves_no_agent_and_no_validator() {
    let broker = TestBroker::start_with(|c| c.connections.max_unauthenticated = POOL).await;
    assert!(HOLDERS / SOURCES < broker.config.connections.max_unauthenticated_per_source);
    let stop = Arc::new(AtomicBool::new(false));
    let (grpc, https) = (Arc::new(Tally::default()), Arc::new(Tally::default()));
    // The flood runs on a thread of its own, as on another machine: its
    // client side of every handshake does not queue behind the broker's
    // tasks, nor theirs behind it.
    let attacker = {
        let ports = [
            (tls_client(&broker, b"h2"), broker.grpc_addr, grpc.clone()),
            (
                tls_client(&broker, b"http/1.1"),
                broker.http_addr,
                https.clone(),
            ),
        ];
        let stop = stop.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let mut tasks = JoinSet::new();
                for (connector, to, tally) in ports {
                    flood(&mut tasks, connector, to, stop.clone(), tally);
                }
                while tasks.join_next().await.is_some() {}
            });
        })
    };

    // The flood fills both pools before the first try.
    let unauthenticated = |m: &str, port: &str| {
        count(
            m,
            &series("mayfly_connections", port, "state", "unauthenticated"),
        )
    };
    // The flood opens its first 4,000 per port (most evicted soon by the
    // next ones), filling both pools, and finishes their handshakes before
    // the first try.
    let mut ramped = false;
    for _ in 0..1200 {
        let opened = |t: &Tally| {
            let opened = t.opened.load(Ordering::Relaxed);
            let concluded = t.handshakes.load(Ordering::Relaxed) + t.failed.load(Ordering::Relaxed);
            opened >= HOLDERS as u64 && opened - concluded.min(opened) < (POOL / 4) as u64
        };
        if opened(&grpc) && opened(&https) {
            ramped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(ramped, "the flood never opened its connections");
    let before = scrape(&broker).await;

    let began = Instant::now();
    for n in 0..TRIES {
        tokio::time::sleep_until((began + FLOOD * n / TRIES).into()).await;
        let agent = async {
            let t = Instant::now();
            let client = broker.agent().await;
            let task = start(&client).await;
            issue(&client, &task.task_id).await;
            t.elapsed()
        };
        let validator = async {
            let t = Instant::now();
            let (status, body) = https_get(
                &format!("{}/.well-known/jwks.json", broker.http_url()),
                &broker.bundle_pem(),
            )
            .await;
            assert_eq!(status, 200, "try {n}: JWKS answered {status}: {body}");
            assert!(body.contains("\"keys\""), "try {n}: {body}");
            // What else validators fetch anonymously, each on a new
            // connection.
            for path in ["/crl", "/.well-known/oauth-authorization-server"] {
                let (status, _) = https_get(
                    &format!("{}{path}", broker.http_url()),
                    &broker.bundle_pem(),
                )
                .await;
                assert_eq!(status, 200, "try {n}: {path} answered {status}");
            }
            t.elapsed()
        };
        let within = BAR * 10;
        let (agent, validator) = tokio::join!(
            tokio::time::timeout(within, agent),
            tokio::time::timeout(within, validator)
        );
        let (agent, validator) = (agent.unwrap_or(within), validator.unwrap_or(within));
        println!(
            "try {n} at {:?}: agent {agent:?} validator {validator:?} grpc {} https {}",
            began.elapsed(),
            grpc.handshakes.load(Ordering::Relaxed),
            https.handshakes.load(Ordering::Relaxed)
        );
        assert!(
            agent < BAR,
            "try {n}: the agent was served in {agent:?}, over {BAR:?}"
        );
        assert!(
            validator < BAR,
            "try {n}: JWKS, the CRL and discovery were served in {validator:?}, over {BAR:?}"
        );
    }
    let after = scrape(&broker).await;
    stop.store(true, Ordering::Relaxed);

    // Throughout, the flood held the pools full and kept renewing: the
    // broker evicted its connections, never refused a newcomer, and no
    // more than the pool was ever anonymous.
    for (port, tally) in [("grpc", &grpc), ("https", &https)] {
        let opened = tally.opened.load(Ordering::Relaxed);
        let handshakes = tally.handshakes.load(Ordering::Relaxed);
        let failed = tally.failed.load(Ordering::Relaxed);
        let during = evicted(&after, port) - evicted(&before, port);
        println!(
            "{port}: {opened} flood connections, {handshakes} handshakes done, {failed} closed \
             before theirs; {during} evictions during the tries, {} in all",
            evicted(&after, port)
        );
        // Each eviction during the tries made room for a flood connection
        // or for one of the tries' own (an agent's on gRPC; JWKS, the CRL
        // and discovery, a connection each, on HTTPS).
        let own = u64::from(TRIES) * 3;
        assert!(
            opened + own >= HOLDERS as u64 + during as u64,
            "{port}: only {opened} flood connections for {during} evictions"
        );
        assert!(
            during >= POOL as f64 * 4.0,
            "{port}: the flood renewed the pool only {during} times: {after}"
        );
        // (Full but for a connection or two that just closed: a JWKS
        // fetcher's, or one that authenticated.)
        for m in [&before, &after] {
            let n = unauthenticated(m, port);
            assert!(n <= POOL as f64 && n >= POOL as f64 - 8.0, "{port}: {m}");
        }
        for reason in ["connection_limit", "source_limit"] {
            let refused = series("mayfly_connections_refused_total", port, "reason", reason);
            assert_eq!(count(&after, &refused), 0.0, "{port}: {after}");
        }
    }
    tokio::task::spawn_blocking(move || attacker.join())
        .await
        .unwrap()
        .expect("the flood ran to its end");
}
