//! Starting the gateway: a verifier per upstream (each following the
//! revocation feed), the broker connection, the upstream clients, then
//! the listener, over TLS unless it is a loopback address.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use mayfly_verify::{Verifier, VerifierConfig};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::config::{GatewayConfig, Protocol};
use crate::credential::UpstreamCredential;
use crate::decide::Decider;
use crate::framing::{Ambiguous, Watched};
use crate::proxy::{self, State, Upstream};
use crate::report::{Metrics, Reporter};
use crate::route::Routes;
use crate::sessions::Sessions;
use crate::tls;

/// How long the start waits for each verifier's revocation feed.
const FEED_SYNC: Duration = Duration::from_secs(30);

/// Why the gateway did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A file or value in the configuration.
    #[error("{0}")]
    Config(String),
    /// The broker could not be reached, or refused the gateway.
    #[error("{0}")]
    Broker(String),
    /// The listener.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// A running gateway.
#[derive(Debug)]
pub struct Running {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Running {
    /// Stops accepting, and lets requests in flight finish (up to 10 s).
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }

    /// Runs until the process is asked to stop (Ctrl-C or SIGTERM).
    pub async fn wait_for_signal(self) {
        shutdown_signal().await;
        tracing::info!("stopping");
        self.stop().await;
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Starts the gateway `config` describes.
pub async fn start(config: GatewayConfig) -> Result<Running, StartError> {
    config
        .check()
        .map_err(|e| StartError::Config(e.to_string()))?;
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| StartError::Config(format!("{}: {e}", p.display())))
    };
    let ca_pem = read(&config.broker.ca)?;
    let cert_pem = read(&config.broker.cert)?;
    let key_pem = read(&config.broker.key)?;
    let mut upstreams = Vec::new();
    for u in &config.upstreams {
        let mut vc = VerifierConfig::new(&config.broker.issuer, &u.audience, ca_pem.clone())
            .with_feed(&config.broker.url, cert_pem.clone(), key_pem.clone());
        if let Some(feed) = &mut vc.feed {
            feed.max_silence = config.broker.feed_max_silence;
        }
        let verifier = Verifier::connect(vc).await.map_err(|e| {
            StartError::Broker(format!(
                "upstream {}: cannot verify tokens for {}: {e}",
                u.name, u.audience
            ))
        })?;
        // Calls are refused (503) until the feed has replayed what it
        // holds: wait for that before taking any.
        if !verifier.wait_for_feed(FEED_SYNC).await {
            tracing::warn!(
                upstream = %u.name,
                "the revocation feed has not synchronised yet; calls are refused until it has"
            );
        }
        let credential = UpstreamCredential::load(&u.credential, &config.broker)
            .map_err(|e| StartError::Config(format!("upstream {}: credential: {e}", u.name)))?;
        let routes = match u.protocol {
            Protocol::Mcp => None,
            Protocol::Http => Some(
                Routes::new(&u.name, &u.routes)
                    .map_err(|e| StartError::Config(format!("upstream {}: {e}", u.name)))?,
            ),
        };
        upstreams.push(Upstream {
            name: u.name.clone(),
            protocol: u.protocol,
            path: u.path.clone(),
            url: u
                .url
                .parse()
                .map_err(|_| StartError::Config(format!("upstream {}: bad url", u.name)))?,
            verifier,
            credential,
            http: tls::client(u.ca.as_deref(), None)
                .map_err(|e| StartError::Config(format!("upstream {}: {e}", u.name)))?,
            timeout: u.timeout,
            routes,
        });
    }
    let decider = Decider::connect(&config.broker, config.approval_wait)
        .await
        .map_err(StartError::Broker)?;
    let acceptor = match (&config.listen.cert, &config.listen.key) {
        (Some(cert), Some(key)) => {
            let client_roots = if config.listen.client_certificates {
                Some(tls::roots(&config.broker.ca).map_err(StartError::Config)?)
            } else {
                None
            };
            Some(TlsAcceptor::from(Arc::new(
                tls::server(cert, key, client_roots).map_err(StartError::Config)?,
            )))
        }
        _ => None,
    };
    let listener = TcpListener::bind(config.listen.addr)
        .await
        .map_err(|source| StartError::Listen {
            addr: config.listen.addr,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| StartError::Listen {
        addr: config.listen.addr,
        source,
    })?;
    let reporter = Reporter::start(decider.channel());
    if let Some(at) = config.listen.metrics {
        serve_metrics(at, reporter.metrics().clone()).await?;
    }
    let state = Arc::new(State {
        public_url: config.public_url(addr.port()),
        max_body: config.max_body,
        upstreams,
        decider,
        reporter,
        sessions: Sessions::default(),
        approval_url: config.approval_url.clone(),
    });
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(serve(listener, acceptor, state, stopped));
    tracing::info!(%addr, "gateway listening");
    Ok(Running { addr, stop, task })
}

async fn serve(
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    state: Arc<State>,
    mut stopped: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    loop {
        let (tcp, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped.changed() => break,
        };
        let _ = tcp.set_nodelay(true);
        let state = state.clone();
        let acceptor = acceptor.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let ambiguous = Ambiguous::default();
            match acceptor {
                None => {
                    let io = TokioIo::new(Watched::new(tcp, ambiguous.clone()));
                    connection(io, None, ambiguous, state, watcher).await;
                }
                Some(acceptor) => {
                    let accepted =
                        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await;
                    let Ok(Ok(tls)) = accepted else {
                        return;
                    };
                    let peer = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| Arc::new(c.to_vec()));
                    let io = TokioIo::new(Watched::new(tls, ambiguous.clone()));
                    connection(io, peer, ambiguous, state, watcher).await;
                }
            }
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(Duration::from_secs(10), graceful.shutdown()).await;
}

async fn connection<I>(
    io: TokioIo<I>,
    peer: Option<Arc<Vec<u8>>>,
    ambiguous: Ambiguous,
    state: Arc<State>,
    watcher: hyper_util::server::graceful::Watcher,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let state = state.clone();
        let peer = peer.clone();
        let ambiguous = ambiguous.is_set();
        async move {
            Ok::<_, std::convert::Infallible>(proxy::handle(state, req, peer, ambiguous).await)
        }
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection(io, service);
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!(error = %e, "connection ended");
    }
}

/// Serves `GET /metrics` at `addr`, plain HTTP.
async fn serve_metrics(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<(), StartError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Listen { addr, source })?;
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let metrics = metrics.clone();
                    async move {
                        let (status, body) = if req.uri().path() == "/metrics" {
                            (http::StatusCode::OK, metrics.encode())
                        } else {
                            (http::StatusCode::NOT_FOUND, "not found\n".to_owned())
                        };
                        let resp = http::Response::builder()
                            .status(status)
                            .header(
                                http::header::CONTENT_TYPE,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )
                            .body(http_body_util::Full::new(bytes::Bytes::from(body)));
                        resp.map_err(|e| e.to_string())
                    }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    Ok(())
}
