//! Fixtures for Mayfly's tests: a real broker on `127.0.0.1:0` with a fresh
//! dev PKI, clients for its identities, odd certificates for the bad-input
//! tests, a small HTTPS client, and the contract suite every lease store
//! backend must pass (`contract`, with the task and lease fixtures the
//! benches use too).

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mayfly_broker::dev::{self, DevCa, DevLayout};
use mayfly_broker::{Broker, Config};
use mayfly_client::{Client, ClientConfig};
use mayfly_core::{SpiffeId, TrustDomain};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use dpop::DpopKey;
pub use mayfly_broker::dev::Credential;
pub use oidc::{JwksServer, TokenIssuer};
pub use postgres::{ORDERS_MANAGER_PASSWORD, PgServer, psql};
pub use redis::{RedisServer, RedisTls};
pub use workload_api::WorkloadApi;

pub mod contract;
mod dpop;
pub mod oidc;
mod postgres;
mod redis;
mod workload_api;

/// The trust domain of every test broker.
pub const TRUST_DOMAIN: &str = "example.org";

/// Logs to the test output when `RUST_LOG` is set.
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A broker running in this process on ephemeral ports, with its dev PKI in
/// a temporary directory. Dropping it stops the broker.
pub struct TestBroker {
    /// The dev setup (kept across restarts).
    pub layout: DevLayout,
    /// The gRPC address.
    pub grpc_addr: std::net::SocketAddr,
    /// The HTTPS address.
    pub http_addr: std::net::SocketAddr,
    /// Plain-text gRPC health (`listen.health`).
    pub health_addr: std::net::SocketAddr,
    /// The configuration it runs with.
    pub config: Config,
    ca: Arc<DevCa>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), mayfly_broker::StartError>>>,
    _dir: Arc<tempfile::TempDir>,
}

impl std::fmt::Debug for TestBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestBroker")
            .field("grpc", &self.grpc_addr)
            .finish()
    }
}

impl TestBroker {
    /// A broker with the dev configuration.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// A broker with the dev configuration changed by `tweak`.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        init_logs();
        let dir = Arc::new(tempfile::tempdir().unwrap());
        let td = TrustDomain::new(TRUST_DOMAIN).unwrap();
        let layout = dev::init(&dir.path().join("dev"), &td).unwrap();
        let mut config = Config::load(&layout.config).unwrap();
        // Tests issue in bursts; the rate-limit tests turn it back on.
        config.rate_limit.per_second = 0.0;
        tweak(&mut config);
        let ca = Arc::new(dev::load_ca(&layout.dir).unwrap());
        Self::launch(layout, config, ca, dir, None, false).await
    }

    /// A broker whose leases live in the Redis at `url`.
    pub async fn start_on_redis(url: &str) -> Self {
        Self::start_on_redis_with(url, |_| {}).await
    }

    /// [`start_on_redis`](Self::start_on_redis), with `edit` applied to
    /// the configuration after the store is set.
    pub async fn start_on_redis_with(url: &str, edit: impl FnOnce(&mut Config)) -> Self {
        let url = url.to_owned();
        Self::start_with(move |c| {
            c.store = mayfly_broker::config::StoreKind::Redis;
            c.redis = Some(mayfly_broker::config::RedisConfig {
                url: Some(url),
                key_prefix: "mayfly".into(),
                ..Default::default()
            });
            edit(c);
        })
        .await
    }

    /// Another broker with the same configuration, PKI and signing key on
    /// its own ports: a replica, when the store is shared (Redis).
    pub async fn replica(&self) -> Self {
        Self::launch(
            self.layout.clone(),
            self.config.clone(),
            self.ca.clone(),
            self._dir.clone(),
            None,
            true,
        )
        .await
    }

    async fn launch(
        layout: DevLayout,
        mut config: Config,
        ca: Arc<DevCa>,
        dir: Arc<tempfile::TempDir>,
        ports: Option<(std::net::SocketAddr, std::net::SocketAddr)>,
        replica: bool,
    ) -> Self {
        let (grpc, http) = match ports {
            Some((g, h)) => (
                TcpListener::bind(g).await.unwrap(),
                TcpListener::bind(h).await.unwrap(),
            ),
            None => (
                TcpListener::bind("127.0.0.1:0").await.unwrap(),
                TcpListener::bind("127.0.0.1:0").await.unwrap(),
            ),
        };
        let (grpc_addr, http_addr) = (grpc.local_addr().unwrap(), http.local_addr().unwrap());
        let health = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let health_addr = health.local_addr().unwrap();
        config.listen.grpc = grpc_addr;
        config.listen.http = http_addr;
        config.listen.health = Some(health_addr);
        // Replicas share the first broker's issuer, as behind a load balancer.
        if ports.is_none() && !replica {
            config.issuer = Some(format!("https://localhost:{}", http_addr.port()));
        }
        let broker = Broker::build(config.clone())
            .expect("broker builds")
            .with_health_listener(health);
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(broker.serve(grpc, http, async {
            let _ = stopped.await;
        }));
        Self {
            layout,
            grpc_addr,
            http_addr,
            health_addr,
            config,
            ca,
            stop: Some(stop),
            task: Some(task),
            _dir: dir,
        }
    }

    /// Stops the broker and waits until it has released the store.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }

    /// Stops and starts the broker again on the same ports and data.
    pub async fn restart(mut self) -> Self {
        self.stop().await;
        let ports = Some((self.grpc_addr, self.http_addr));
        Self::launch(
            self.layout.clone(),
            self.config.clone(),
            self.ca.clone(),
            self._dir.clone(),
            ports,
            false,
        )
        .await
    }

    /// The broker's gRPC URL (the server certificate names `localhost`).
    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.grpc_addr.port())
    }

    /// The `iss` of its tokens (shared by replicas).
    pub fn issuer(&self) -> String {
        self.config.issuer()
    }

    /// This broker's own HTTPS base URL.
    pub fn http_url(&self) -> String {
        format!("https://localhost:{}", self.http_addr.port())
    }

    /// The trust bundle PEM (also the CA of the server certificate).
    pub fn bundle_pem(&self) -> Vec<u8> {
        self.ca.cert_pem().as_bytes().to_vec()
    }

    /// A Workload API serving SVIDs for `id` from this broker's dev CA,
    /// each living `lifetime`.
    pub async fn workload_api(&self, id: &str, lifetime: Duration) -> WorkloadApi {
        WorkloadApi::start(self.ca.clone(), id, lifetime).await
    }

    /// The dev CA, to mint more identities.
    pub fn ca(&self) -> &DevCa {
        &self.ca
    }

    /// Path of a file in the dev directory.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.layout.dir.join(rel)
    }

    /// A client presenting `cred`.
    pub async fn client_with(
        &self,
        cred: &Credential,
    ) -> Result<Client, mayfly_client::ClientError> {
        let config = ClientConfig {
            broker: self.url(),
            ca_pem: self.bundle_pem(),
            cert_pem: cred.cert_pem.as_bytes().to_vec(),
            key_pem: cred.key_pem.as_bytes().to_vec().into(),
        };
        Client::connect(&config).await
    }

    /// A client that presents no certificate at all.
    pub async fn anonymous_client(&self) -> Client {
        use tonic::transport::{Certificate, Channel, ClientTlsConfig};
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(self.bundle_pem()));
        let channel = Channel::from_shared(self.url())
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap();
        Client::from_channel(channel)
    }

    /// A client for a fresh SVID with this SPIFFE ID from the dev CA.
    pub async fn client_as(&self, id: &str) -> Client {
        let cred = self
            .ca
            .issue_svid(&SpiffeId::new(id).unwrap(), Duration::from_secs(3600))
            .unwrap();
        self.client_with(&cred).await.unwrap()
    }

    /// A client for the dev agent `spiffe://example.org/agent/demo`.
    pub async fn agent(&self) -> Client {
        self.client_from_dir(&self.path("identities/agent-demo"))
            .await
    }

    /// A client for the dev operator `spiffe://example.org/operator/admin`.
    pub async fn operator(&self) -> Client {
        self.client_from_dir(&self.path("identities/operator-admin"))
            .await
    }

    async fn client_from_dir(&self, dir: &Path) -> Client {
        let config = ClientConfig::from_files(
            &self.url(),
            self.path("bundle.pem"),
            dir.join("svid.pem"),
            dir.join("svid.key"),
        )
        .unwrap();
        Client::connect(&config).await.unwrap()
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        keep_audit_copy(&self.config);
    }
}

/// With `MAYFLY_TEST_AUDIT_DIR` set, copies the broker's audit file there
/// so that CI can search the trails of a whole test run for secrets.
fn keep_audit_copy(config: &Config) {
    let Some(dir) = std::env::var_os("MAYFLY_TEST_AUDIT_DIR") else {
        return;
    };
    let path = config.audit_path();
    if config.audit_sink() != mayfly_broker::config::AuditSinkKind::File {
        return;
    }
    let dir = PathBuf::from(dir);
    // Every segment of a rotated trail.
    let files = mayfly_broker::audit::segment_files(&path).unwrap_or_else(|_| vec![path]);
    for file in files {
        let copy = dir.join(format!("{}.jsonl", mayfly_core::LeaseId::generate()));
        if let Err(e) = std::fs::create_dir_all(&dir).and_then(|()| std::fs::copy(&file, &copy)) {
            eprintln!("audit trail not kept for CI: {e}");
        }
    }
}

/// Points `config` at a fresh policy directory holding `text` (one file),
/// in place of the dev policies.
pub fn use_policies(config: &mut Config, text: &str) {
    let dir = config
        .data_dir
        .with_file_name(format!("policies-{}", mayfly_core::LeaseId::generate()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("test.cedar"), text).unwrap();
    config.policy.dir = dir;
}

/// The dev policies of `config`, without the policy whose `@id` is `id`
/// (policies are separated by blank lines in the dev file).
pub fn dev_policies_without(config: &Config, id: &str) -> String {
    let text = std::fs::read_to_string(config.policy.dir.join("mayfly.cedar")).unwrap();
    let marker = format!("@id(\"{id}\")");
    text.split("\n\n")
        .filter(|block| !block.contains(&marker))
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// GETs an HTTPS URL trusting `ca_pem`; returns status and body as text.
pub async fn https_get(url: &str, ca_pem: &[u8]) -> (u16, String) {
    let (status, body) = https_get_bytes(url, ca_pem).await;
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// GETs an HTTPS URL trusting `ca_pem`; returns status and body.
pub async fn https_get_bytes(url: &str, ca_pem: &[u8]) -> (u16, Vec<u8>) {
    let (status, _, body) = https_request("GET", url, ca_pem, None, None, &[]).await;
    (status, body)
}

/// GETs an HTTPS URL trusting `ca_pem` with more request headers (an
/// `Accept`, say); returns status and body.
pub async fn https_get_with(url: &str, ca_pem: &[u8], headers: &[(&str, &str)]) -> (u16, String) {
    let (status, _, body) = https_request("GET", url, ca_pem, None, None, headers).await;
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// POSTs a form over HTTPS, presenting `identity` (certificate and key PEM)
/// if given; returns status, the `WWW-Authenticate` header, and body.
pub async fn https_post_form(
    url: &str,
    ca_pem: &[u8],
    identity: Option<&Credential>,
    form: &str,
) -> (u16, Option<String>, String) {
    https_post_form_with(url, ca_pem, identity, form, &[]).await
}

/// [`https_post_form`] with more request headers (a `DPoP` proof, say).
pub async fn https_post_form_with(
    url: &str,
    ca_pem: &[u8],
    identity: Option<&Credential>,
    form: &str,
    headers: &[(&str, &str)],
) -> (u16, Option<String>, String) {
    let (status, auth, body) =
        https_request("POST", url, ca_pem, identity, Some(form), headers).await;
    (status, auth, String::from_utf8_lossy(&body).into_owned())
}

async fn https_request(
    method: &str,
    url: &str,
    ca_pem: &[u8],
    identity: Option<&Credential>,
    form: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, Option<String>, Vec<u8>) {
    use http_body_util::BodyExt;
    use hyper::body::Bytes;
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;

    let uri: hyper::Uri = url.parse().unwrap();
    let host = uri.host().unwrap().to_owned();
    let port = uri.port_u16().unwrap_or(443);
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut tls = match identity {
        Some(id) => {
            use rustls_pki_types::PrivateKeyDer;
            let chain = CertificateDer::pem_slice_iter(id.cert_pem.as_bytes())
                .map(Result::unwrap)
                .collect();
            let key = PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from(host.clone()).unwrap();
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(name, tcp)
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(uri.path())
        .header("host", host);
    if form.is_some() {
        req = req.header("content-type", "application/x-www-form-urlencoded");
    }
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let body = http_body_util::Full::new(Bytes::from(form.unwrap_or_default().to_owned()));
    let resp = sender.send_request(req.body(body).unwrap()).await.unwrap();
    let status = resp.status().as_u16();
    let auth = resp
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, auth, body.to_vec())
}

/// Certificates that are not valid X.509-SVIDs of the test trust domain,
/// for the authentication tests.
pub mod bad_certs {
    use super::*;
    use rcgen::{CertificateParams, SanType};

    fn svid_params(id: &str) -> CertificateParams {
        DevCa::svid_params(&SpiffeId::new(id).unwrap(), Duration::from_secs(3600)).unwrap()
    }

    /// A valid SVID from a CA the broker does not trust.
    pub fn from_other_ca() -> Credential {
        let other = DevCa::generate(&TrustDomain::new(TRUST_DOMAIN).unwrap()).unwrap();
        other
            .sign(&svid_params("spiffe://example.org/agent/demo"))
            .unwrap()
    }

    /// Signed by `ca` with these SANs instead of one SPIFFE URI.
    pub fn with_sans(ca: &DevCa, sans: Vec<SanType>) -> Credential {
        let mut p = svid_params("spiffe://example.org/agent/demo");
        p.subject_alt_names = sans;
        ca.sign(&p).unwrap()
    }

    /// A URI SAN.
    pub fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    /// An SVID that expired an hour ago.
    pub fn expired(ca: &DevCa) -> Credential {
        let mut p = svid_params("spiffe://example.org/agent/demo");
        let now = rcgen::date_time_ymd(2020, 1, 1);
        p.not_before = now;
        p.not_after = rcgen::date_time_ymd(2020, 1, 2);
        ca.sign(&p).unwrap()
    }

    /// A CA certificate (CA:true) carrying an agent's SPIFFE ID.
    pub fn ca_as_leaf(ca: &DevCa) -> Credential {
        let mut p = svid_params("spiffe://example.org/agent/demo");
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        ca.sign(&p).unwrap()
    }
}
