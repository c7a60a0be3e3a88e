//! The agent's X.509-SVID from the SPIFFE Workload API (SPIRE's agent
//! socket; `SPIFFE_ENDPOINT_SOCKET` by convention) instead of files,
//! followed across rotations with the `spiffe` crate's `X509Source`: each
//! new SVID gets a fresh mTLS channel that new calls use, while calls in
//! flight finish on the channel they started on. The broker's certificate
//! is checked against the Workload API's bundle for the SVID's trust
//! domain.

use std::sync::{Arc, RwLock};

use mayfly_core::svid::pem;
use spiffe::X509Source;
use spiffe::bundle::BundleSource;
use zeroize::Zeroizing;

use crate::{Bearer, Client, ClientConfig, ClientError};

/// How long to wait for the first SVID before saying the Workload API
/// gave none.
const INITIAL_SYNC: std::time::Duration = std::time::Duration::from_secs(10);

/// Follows the Workload API for a [`Client`]; stops when dropped.
pub(crate) struct Rotation {
    task: tokio::task::JoinHandle<()>,
    source: X509Source,
}

impl std::fmt::Debug for Rotation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rotation").finish_non_exhaustive()
    }
}

impl Drop for Rotation {
    fn drop(&mut self) {
        self.task.abort();
        let source = self.source.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { source.shutdown().await });
        }
    }
}

fn err(e: impl std::fmt::Display) -> ClientError {
    ClientError::WorkloadApi(e.to_string())
}

/// The connection the source's current SVID and bundle give.
fn config(source: &X509Source, broker: &str) -> Result<ClientConfig, ClientError> {
    let svid = source.svid().map_err(err)?;
    let td = svid.spiffe_id().trust_domain();
    let bundle = source
        .bundle_for_trust_domain(td)
        .map_err(err)?
        .ok_or_else(|| err(format!("the Workload API has no bundle for {td}")))?;
    Ok(ClientConfig {
        broker: broker.to_owned(),
        ca_pem: bundle
            .authorities()
            .iter()
            .map(|c| pem("CERTIFICATE", c.as_bytes()))
            .collect::<String>()
            .into_bytes(),
        cert_pem: svid
            .cert_chain()
            .iter()
            .map(|c| pem("CERTIFICATE", c.as_bytes()))
            .collect::<String>()
            .into_bytes(),
        key_pem: Zeroizing::new(pem("PRIVATE KEY", svid.private_key().as_bytes()).into_bytes()),
    })
}

impl Client {
    /// Connects as the SVID the Workload API at `endpoint` (e.g.
    /// `unix:///run/spire/agent.sock`; `None`: `SPIFFE_ENDPOINT_SOCKET`)
    /// gives, and keeps connecting as each SVID it rotates to.
    pub async fn connect_workload_api(
        broker: &str,
        endpoint: Option<&str>,
    ) -> Result<Self, ClientError> {
        let builder = X509Source::builder().initial_sync_timeout(INITIAL_SYNC);
        let builder = match endpoint {
            Some(e) => builder.endpoint(e),
            None => builder,
        };
        let source = builder.build().await.map_err(err)?;
        let first = Client::connect(&config(&source, broker)?).await?;
        let channel = first.channel.clone();
        let (src, url) = (source.clone(), broker.to_owned());
        let task = tokio::spawn(follow(src, url, channel));
        Ok(Client {
            channel: first.channel,
            _rotation: Some(Arc::new(Rotation { task, source })),
            bearer: Bearer::default(),
        })
    }
}

/// On every update of `source`, a new channel for the new SVID.
async fn follow(
    source: X509Source,
    broker: String,
    channel: Arc<RwLock<tonic::transport::Channel>>,
) {
    let mut updates = source.updated();
    while updates.changed().await.is_ok() {
        let next = match config(&source, &broker) {
            Ok(c) => Client::connect(&c).await,
            Err(e) => Err(e),
        };
        match next {
            Ok(client) => {
                let fresh = client.channel();
                *channel
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = fresh;
                tracing::info!("SVID rotated; new calls use its connection");
            }
            Err(e) => {
                tracing::warn!(error = %e, "SVID rotated but the new connection failed; keeping the old one")
            }
        }
    }
}
