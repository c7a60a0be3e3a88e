//! The CRL at `/crl`: every revoked, unexpired task certificate, signed by
//! the issuing CA. It is built from the revocation feed, so a revocation
//! through any replica appears in the next CRL any replica serves; it is
//! rebuilt when the feed has news or half its validity has passed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use mayfly_core::{LeaseKind, Timestamp};
use tokio::sync::Mutex;

use crate::issuer::IssuingCa;
use crate::issuer::RevokedCert;
use crate::store::{LeaseStore, StoreError};

/// Events read per store call while catching up.
const BATCH: usize = 1000;

/// Why no CRL could be produced.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CrlError {
    /// The feed could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Signing failed.
    #[error(transparent)]
    Sign(#[from] crate::issuer::CaError),
}

#[derive(Default)]
struct State {
    /// Feed position already applied.
    cursor: u64,
    /// Revoked certificates by serial, with their expiry.
    revoked: BTreeMap<String, (RevokedCert, Timestamp)>,
    /// The last CRL and when it was built.
    built: Option<(Arc<[u8]>, Timestamp)>,
}

/// Builds and caches the CRL.
pub struct CrlPublisher {
    store: Arc<dyn LeaseStore>,
    ca: Arc<IssuingCa>,
    /// nextUpdate − thisUpdate.
    validity: Duration,
    state: Mutex<State>,
}

impl std::fmt::Debug for CrlPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CrlPublisher")
            .field("validity", &self.validity)
            .finish()
    }
}

impl CrlPublisher {
    /// A publisher for `ca`'s certificates recorded in `store`.
    pub fn new(store: Arc<dyn LeaseStore>, ca: Arc<IssuingCa>, validity: Duration) -> Self {
        Self {
            store,
            ca,
            validity,
            state: Mutex::new(State::default()),
        }
    }

    /// The current CRL, DER.
    pub async fn current(&self) -> Result<Arc<[u8]>, CrlError> {
        let mut st = self.state.lock().await;
        let now = Timestamp::now();
        let mut changed = false;
        loop {
            let events = self.store.revocations_since(st.cursor, BATCH).await?;
            for e in &events {
                st.cursor = e.cursor;
                if e.kind != Some(LeaseKind::X509) {
                    continue;
                }
                if let Some(serial) = &e.serial {
                    let cert = RevokedCert {
                        serial: serial.clone(),
                        at: e.revocation.at,
                        reason: e.revocation.reason,
                    };
                    st.revoked.insert(serial.clone(), (cert, e.expires_at));
                    changed = true;
                }
            }
            if events.len() < BATCH {
                break;
            }
        }
        let before = st.revoked.len();
        st.revoked.retain(|_, (_, expires)| *expires > now);
        changed |= st.revoked.len() != before;
        let fresh = st
            .built
            .as_ref()
            .filter(|(_, at)| !changed && now < at.plus(self.validity / 2))
            .map(|(der, _)| der.clone());
        if let Some(der) = fresh {
            return Ok(der);
        }
        let revoked: Vec<RevokedCert> = st.revoked.values().map(|(c, _)| c.clone()).collect();
        // thisUpdate in milliseconds is also the CRL number: it increases
        // with every CRL, whichever replica builds it.
        let der: Arc<[u8]> = self
            .ca
            .crl(&revoked, now.as_millis(), now, now.plus(self.validity))?
            .into();
        st.built = Some((der.clone(), now));
        Ok(der)
    }
}
