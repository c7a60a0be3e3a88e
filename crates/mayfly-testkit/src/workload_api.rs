//! A SPIFFE Workload API served in the test process. SPIRE is not packaged
//! on these machines, so this implements the public protocol from the
//! SPIFFE Workload API spec and its `workload.proto`
//! (`mayfly_proto::spiffe_workload`): `FetchX509SVID` and
//! `FetchX509Bundles` streams over a Unix socket, refusing calls without
//! the `workload.spiffe.io: true` header as the spec requires, serving
//! X.509-SVIDs for one SPIFFE ID from a dev CA, and pushing a fresh one to
//! every stream on [`WorkloadApi::rotate`], as an agent does on rotation;
//! and `FetchJWTBundles`, a stream of the JWT bundles (JWKS documents
//! keyed by trust domain ID) set with [`WorkloadApi::set_jwt_bundle`].

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mayfly_broker::dev::{Credential, DevCa};
use mayfly_core::SpiffeId;
use mayfly_proto::spiffe_workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use mayfly_proto::spiffe_workload::{
    JwtBundlesRequest, JwtBundlesResponse, JwtsvidRequest, JwtsvidResponse, ValidateJwtsvidRequest,
    ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse, X509svid, X509svidRequest,
    X509svidResponse,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use tokio::sync::watch;
use tokio_stream::{Stream, StreamExt, wrappers::WatchStream};
use tonic::{Request, Response, Status};

type Streamed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Trust domain → its bundle (DER certificates, concatenated).
type Bundles = std::collections::HashMap<String, Vec<u8>>;

/// What the Workload API serves now: the SVID, the bundle of its trust
/// domain and the federated ones.
#[derive(Clone)]
struct Serving {
    svid: X509svid,
    /// Its own trust domain's bundle and the federated ones.
    bundles: Bundles,
    /// The federated ones alone.
    federated: Bundles,
}

fn der_chain(pem: &str) -> Vec<u8> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .flat_map(|c| c.unwrap().to_vec())
        .collect()
}

/// A running Workload API on a Unix socket in a temporary directory.
pub struct WorkloadApi {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    ca: Mutex<Arc<DevCa>>,
    id: SpiffeId,
    /// DNS SANs beside the SPIFFE ID (for a server's SVID).
    dns: Vec<String>,
    lifetime: Duration,
    current: Mutex<Credential>,
    /// Federated trust domains' bundles, served beside the SVID.
    federated: Mutex<Bundles>,
    tx: watch::Sender<Serving>,
    /// JWT bundles: trust domain ID → JWKS document.
    jwt_tx: watch::Sender<Bundles>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for WorkloadApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadApi")
            .field("socket", &self.socket)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

struct Service {
    rx: watch::Receiver<Serving>,
    jwt_rx: watch::Receiver<Bundles>,
}

fn check_header<T>(req: &Request<T>) -> Result<(), Status> {
    match req.metadata().get("workload.spiffe.io") {
        Some(v) if v == "true" => Ok(()),
        _ => Err(Status::invalid_argument(
            "security header missing from request",
        )),
    }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for Service {
    type FetchX509SVIDStream = Streamed<X509svidResponse>;
    type FetchX509BundlesStream = Streamed<X509BundlesResponse>;
    type FetchJWTBundlesStream = Streamed<JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        req: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        check_header(&req)?;
        let stream = WatchStream::new(self.rx.clone()).map(|s| {
            Ok(X509svidResponse {
                svids: vec![s.svid],
                crl: Vec::new(),
                federated_bundles: s.federated,
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn fetch_x509_bundles(
        &self,
        req: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        check_header(&req)?;
        let stream = WatchStream::new(self.rx.clone()).map(|s| {
            Ok(X509BundlesResponse {
                crl: Vec::new(),
                bundles: s.bundles,
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn fetch_jwtsvid(
        &self,
        _: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        Err(Status::unimplemented("JWT-SVIDs are not served here"))
    }

    async fn fetch_jwt_bundles(
        &self,
        req: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        check_header(&req)?;
        // Nothing is sent until there is a bundle, as an agent waits for
        // its first sync.
        let stream = WatchStream::new(self.jwt_rx.clone())
            .filter(|b| !b.is_empty())
            .map(|bundles| Ok(JwtBundlesResponse { bundles }));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn validate_jwtsvid(
        &self,
        _: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        Err(Status::unimplemented("JWT-SVIDs are not served here"))
    }
}

impl WorkloadApi {
    /// Serves X.509-SVIDs for `id` from `ca` (each living `lifetime`), with
    /// `ca` as the bundle of `id`'s trust domain.
    pub async fn start(ca: Arc<DevCa>, id: &str, lifetime: Duration) -> Self {
        Self::start_with_dns(ca, id, &[], lifetime).await
    }

    /// The same, with `dns` names in each SVID too (as SPIRE puts a
    /// registration entry's DNS names), for a server's identity.
    pub async fn start_with_dns(
        ca: Arc<DevCa>,
        id: &str,
        dns: &[&str],
        lifetime: Duration,
    ) -> Self {
        let id = SpiffeId::new(id).unwrap();
        let dns: Vec<String> = dns.iter().map(|d| (*d).to_owned()).collect();
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("api.sock");
        let first = issue(&ca, &id, &dns, lifetime);
        let (tx, rx) = watch::channel(Self::serving(&ca, &id, &first, &Bundles::new()));
        let (jwt_tx, jwt_rx) = watch::channel(Bundles::new());
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(SpiffeWorkloadApiServer::new(Service { rx, jwt_rx }))
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
                .await;
        });
        Self {
            _dir: dir,
            socket,
            ca: Mutex::new(ca),
            id,
            dns,
            lifetime,
            current: Mutex::new(first),
            federated: Mutex::new(Bundles::new()),
            tx,
            jwt_tx,
            task,
        }
    }

    fn serving(ca: &DevCa, id: &SpiffeId, svid: &Credential, federated: &Bundles) -> Serving {
        let key = PrivatePkcs8KeyDer::from_pem_slice(svid.key_pem.as_bytes()).unwrap();
        let td = id.trust_domain().as_str().to_owned();
        let bundle = der_chain(ca.cert_pem());
        Serving {
            svid: X509svid {
                spiffe_id: id.as_str().to_owned(),
                x509_svid: der_chain(&svid.cert_pem),
                x509_svid_key: key.secret_pkcs8_der().to_vec(),
                bundle: bundle.clone(),
                hint: String::new(),
            },
            bundles: federated
                .clone()
                .into_iter()
                .chain([(td, bundle)])
                .collect(),
            federated: federated.clone(),
        }
    }

    /// The endpoint address, as `SPIFFE_ENDPOINT_SOCKET` holds it.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// The SVID served now.
    pub fn current(&self) -> Credential {
        self.current.lock().unwrap().clone()
    }

    /// Issues a fresh SVID and pushes it to every open stream.
    pub fn rotate(&self) -> Credential {
        let ca = self.ca.lock().unwrap().clone();
        self.push(&ca)
    }

    /// Moves to another CA: the SVID and the bundle both come from `ca`
    /// from now on (the old CA is rotated out).
    pub fn rotate_ca(&self, ca: Arc<DevCa>) -> Credential {
        *self.ca.lock().unwrap() = ca.clone();
        self.push(&ca)
    }

    /// Serves `ca` as the bundle of federated trust domain `td` (replacing
    /// any before, as when the partner rotates its CA), pushed to every
    /// open stream with a fresh SVID.
    pub fn federate(&self, td: &str, ca: &DevCa) {
        self.federated
            .lock()
            .unwrap()
            .insert(td.to_owned(), der_chain(ca.cert_pem()));
        self.rotate();
    }

    /// Serves `jwks` (a JWKS document) as the JWT bundle of trust domain
    /// `td` (e.g. `example.org`), replacing any before, pushed to every
    /// open `FetchJWTBundles` stream.
    pub fn set_jwt_bundle(&self, td: &str, jwks: &str) {
        self.jwt_tx.send_modify(|b| {
            b.insert(format!("spiffe://{td}"), jwks.as_bytes().to_vec());
        });
    }

    fn push(&self, ca: &DevCa) -> Credential {
        let next = issue(ca, &self.id, &self.dns, self.lifetime);
        *self.current.lock().unwrap() = next.clone();
        let federated = self.federated.lock().unwrap().clone();
        self.tx
            .send_replace(Self::serving(ca, &self.id, &next, &federated));
        next
    }
}

/// An SVID for `id` (and `dns`) from `ca`.
fn issue(ca: &DevCa, id: &SpiffeId, dns: &[String], lifetime: Duration) -> Credential {
    let mut params = DevCa::svid_params(id, lifetime).unwrap();
    for name in dns {
        params
            .subject_alt_names
            .push(rcgen::SanType::DnsName(name.as_str().try_into().unwrap()));
    }
    ca.sign(&params).unwrap()
}

impl Drop for WorkloadApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}
