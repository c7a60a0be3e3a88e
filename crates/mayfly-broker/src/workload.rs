//! The broker's own identity from the SPIFFE Workload API (`[tls]
//! workload_api`): its X.509-SVID becomes the server certificate of both
//! ports, the bundle of its trust domain the trust bundle for client
//! SVIDs, and the federated bundles of `[[tls.federated]]` entries without
//! a file the bundles of those trust domains, through the `spiffe` crate's `X509Source`, and every rotation is
//! swapped into [`LiveTls`] for new handshakes while live connections keep
//! theirs. Until the first SVID arrives, handshakes are refused.
//!
//! With a `[[federation]]` entry that says `workload_api = true`, the JWT
//! bundle of the broker's trust domain comes from the same Workload API
//! (`FetchJWTBundles`), each update replacing the keys JWT-SVIDs are
//! checked against ([`follow_jwt_bundles`]).

use std::sync::Arc;
use std::time::Duration;

use mayfly_core::TrustDomain;
use rustls_pki_types::CertificateDer;
use spiffe::X509Source;
use spiffe::bundle::BundleSource;

use crate::federation::Federation;
use crate::shutdown::Shutdown;
use crate::tls::LiveTls;

/// How long to wait for the Workload API's first answer before retrying.
const SYNC_TIMEOUT: Duration = Duration::from_secs(10);

/// Why an update from the Workload API was not taken (the material in use
/// stays).
#[derive(Debug, thiserror::Error)]
enum UpdateError {
    /// The source holds no SVID or bundle now.
    #[error("{0}")]
    Source(#[from] spiffe::X509SourceError),
    /// A trust domain the `spiffe` crate does not take.
    #[error("{0}")]
    TrustDomain(#[from] spiffe::SpiffeIdError),
    /// The SVID is of another trust domain.
    #[error("SVID {id} is not of the broker's trust domain {td}")]
    ForeignSvid {
        /// The SVID's SPIFFE ID.
        id: String,
        /// The broker's trust domain.
        td: TrustDomain,
    },
    /// No X.509 bundle for the broker's trust domain.
    #[error("no bundle for {0}")]
    NoBundle(TrustDomain),
    /// No JWT bundle for the broker's trust domain.
    #[error("no JWT bundle for {0}")]
    NoJwtBundle(TrustDomain),
    /// The SVID and bundle do not make a TLS configuration.
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
    /// A JWT authority is not a JWK, or the JWKS not serialised.
    #[error("{0}")]
    Jwks(#[from] serde_json::Error),
    /// The JWT bundle's keys were refused.
    #[error("{0}")]
    Keys(#[from] mayfly_verify::VerifyError),
}

/// Takes the source's current SVID and bundle into `live`.
fn apply(live: &LiveTls, source: &X509Source, td: &TrustDomain) -> Result<String, UpdateError> {
    let svid = source.svid()?;
    let id = svid.spiffe_id().to_string();
    if svid.spiffe_id().trust_domain().to_string() != td.as_str() {
        return Err(UpdateError::ForeignSvid { id, td: td.clone() });
    }
    let spiffe_td = spiffe::TrustDomain::new(td.as_str())?;
    let bundle = source
        .bundle_for_trust_domain(&spiffe_td)?
        .ok_or_else(|| UpdateError::NoBundle(td.clone()))?;
    let chain = svid
        .cert_chain()
        .iter()
        .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
        .collect();
    let mut federated = Vec::new();
    for td in live.federated_from_api() {
        let spiffe_td = spiffe::TrustDomain::new(td.as_str())?;
        match source.bundle_for_trust_domain(&spiffe_td)? {
            Some(b) => federated.push((td, ders(b.authorities()))),
            None => tracing::warn!(
                trust_domain = %td,
                "the Workload API gives no bundle for this federated trust domain; its SVIDs are refused"
            ),
        }
    }
    live.set_svid(
        chain,
        svid.private_key().as_bytes().to_vec(),
        ders(bundle.authorities()),
        federated,
    )?;
    Ok(id)
}

fn ders(certs: &[spiffe::cert::Certificate]) -> Vec<CertificateDer<'static>> {
    certs
        .iter()
        .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
        .collect()
}

/// Follows the Workload API at `endpoint` until `stop`, reconnecting
/// after a failure; a set that does not load is refused with a log line
/// and the one in use kept.
pub(crate) async fn follow(
    live: Arc<LiveTls>,
    endpoint: String,
    td: TrustDomain,
    mut stop: Shutdown,
) {
    loop {
        let built = tokio::select! {
            r = X509Source::builder()
                .endpoint(&endpoint)
                .initial_sync_timeout(SYNC_TIMEOUT)
                .build() => r,
            () = stop.wait() => return,
        };
        let source = match built {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, %endpoint, "SPIFFE Workload API unavailable; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    () = stop.wait() => return,
                }
            }
        };
        let mut updates = source.updated();
        loop {
            match apply(&live, &source, &td) {
                Ok(id) => tracing::info!(%id, "TLS identity from the SPIFFE Workload API"),
                Err(e) => tracing::error!(
                    error = %e,
                    "SVID from the Workload API refused; the previous identity stays in use"
                ),
            }
            tokio::select! {
                r = updates.changed() => if r.is_err() { break },
                () = stop.wait() => {
                    source.shutdown().await;
                    return;
                }
            }
        }
    }
}

/// The JWKS document of `bundle`'s keys.
fn jwks_document(bundle: &spiffe::JwtBundle) -> Result<Vec<u8>, serde_json::Error> {
    let keys = bundle
        .jwt_authorities()
        .map(|a| serde_json::from_slice::<serde_json::Value>(a.jwk_json()))
        .collect::<Result<Vec<_>, _>>()?;
    serde_json::to_vec(&serde_json::json!({ "keys": keys }))
}

/// Follows the Workload API's JWT bundles at `endpoint` until `stop`,
/// handing `federation` each update of the broker's trust domain's bundle;
/// reconnects after a failure, keeping the keys it has.
pub(crate) async fn follow_jwt_bundles(
    federation: Arc<Federation>,
    endpoint: String,
    td: TrustDomain,
    mut stop: Shutdown,
) {
    use futures_util::StreamExt;
    let spiffe_td = match spiffe::TrustDomain::new(td.as_str()) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, %td, "trust domain unusable for JWT bundles");
            return;
        }
    };
    loop {
        let opened = async {
            let client = spiffe::WorkloadApiClient::connect_to(&endpoint).await?;
            client.stream_jwt_bundles().await
        };
        let mut updates = tokio::select! {
            r = opened => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, %endpoint, "SPIFFE Workload API JWT bundles unavailable; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        () = stop.wait() => return,
                    }
                }
            },
            () = stop.wait() => return,
        };
        loop {
            let next = tokio::select! {
                n = updates.next() => n,
                () = stop.wait() => return,
            };
            let set = match next {
                Some(Ok(set)) => set,
                Some(Err(e)) => {
                    tracing::error!(error = %e, "JWT bundle update refused; the keys in use stay");
                    continue;
                }
                None => break,
            };
            let applied = set
                .get(&spiffe_td)
                .ok_or_else(|| UpdateError::NoJwtBundle(td.clone()))
                .and_then(|b| jwks_document(&b).map_err(UpdateError::from))
                .and_then(|doc| {
                    federation
                        .set_workload_bundle(&doc)
                        .map_err(UpdateError::from)
                });
            match applied {
                Ok(keys) => tracing::info!(keys, "JWT bundle from the SPIFFE Workload API"),
                Err(e) => tracing::error!(error = %e, "JWT bundle refused; the keys in use stay"),
            }
        }
    }
}
