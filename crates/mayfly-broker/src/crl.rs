//! The CRLs at `/crl/<ca id>` (named in each certificate) and `/crl` (the
//! CA signing now): every revoked, unexpired task certificate of that
//! issuing CA, signed by it. They are built from the revocation feed, so a
//! revocation through any replica appears in the next CRL any replica
//! serves; each is rebuilt when the feed has news or half its validity has
//! passed.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use mayfly_core::{LeaseKind, Timestamp};
use tokio::sync::Mutex;

use crate::issuer::{CaRing, IssuingCa, RevokedCert};
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
    /// Revoked certificates by serial, with their expiry and the id of the
    /// CA that signed them (`None` if not recorded: listed by every CA).
    revoked: BTreeMap<String, Revoked>,
    /// Bumped whenever `revoked` changes.
    generation: u64,
    /// The last CRL of each CA: when it was built, at which generation.
    built: HashMap<String, Built>,
}

struct Revoked {
    cert: RevokedCert,
    expires: Timestamp,
    ca: Option<String>,
}

struct Built {
    der: Arc<[u8]>,
    at: Timestamp,
    generation: u64,
}

/// Builds and caches the CRL of each issuing CA.
pub struct CrlPublisher {
    store: Arc<dyn LeaseStore>,
    cas: Arc<CaRing>,
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
    /// A publisher for the certificates of `cas` recorded in `store`.
    pub fn new(store: Arc<dyn LeaseStore>, cas: Arc<CaRing>, validity: Duration) -> Self {
        Self {
            store,
            cas,
            validity,
            state: Mutex::new(State::default()),
        }
    }

    /// The CRL of the CA that signs now, DER.
    pub async fn current(&self) -> Result<Arc<[u8]>, CrlError> {
        self.build(self.cas.current()).await
    }

    /// The CRL of the CA whose id is `ca_id`, DER; `None` for a CA the
    /// broker does not have.
    pub async fn of(&self, ca_id: &str) -> Result<Option<Arc<[u8]>>, CrlError> {
        match self.cas.get(ca_id) {
            Some(ca) => self.build(ca).await.map(Some),
            None => Ok(None),
        }
    }

    /// Applies the feed's news, then gives `ca`'s CRL: the one built last
    /// if nothing changed and less than half its validity has passed.
    async fn build(&self, ca: Arc<IssuingCa>) -> Result<Arc<[u8]>, CrlError> {
        let mut st = self.state.lock().await;
        let now = Timestamp::now();
        self.catch_up(&mut st).await?;
        let before = st.revoked.len();
        st.revoked.retain(|_, r| r.expires > now);
        if st.revoked.len() != before {
            st.generation += 1;
        }
        let fresh = st
            .built
            .get(ca.id())
            .filter(|b| b.generation == st.generation && now < b.at.plus(self.validity / 2))
            .map(|b| b.der.clone());
        if let Some(der) = fresh {
            return Ok(der);
        }
        let revoked: Vec<RevokedCert> = st
            .revoked
            .values()
            .filter(|r| r.ca.as_deref().is_none_or(|id| id == ca.id()))
            .map(|r| r.cert.clone())
            .collect();
        // thisUpdate in milliseconds is also the CRL number: it increases
        // with every CRL, whichever replica builds it.
        let der: Arc<[u8]> = ca
            .crl(&revoked, now.as_millis(), now, now.plus(self.validity))?
            .into();
        let generation = st.generation;
        st.built.insert(
            ca.id().to_owned(),
            Built {
                der: der.clone(),
                at: now,
                generation,
            },
        );
        Ok(der)
    }

    /// Reads the revocations since the last look. A certificate's CA is
    /// read from its lease, once.
    async fn catch_up(&self, st: &mut State) -> Result<(), CrlError> {
        loop {
            let events = self.store.revocations_since(st.cursor, BATCH).await?;
            for e in &events {
                if e.kind == Some(LeaseKind::X509)
                    && let Some(serial) = &e.serial
                {
                    let ca = self
                        .store
                        .get_lease(&e.lease_id)
                        .await?
                        .and_then(|l| l.issuing_ca().map(str::to_owned));
                    let cert = RevokedCert {
                        serial: serial.clone(),
                        at: e.revocation.at,
                        reason: e.revocation.reason,
                    };
                    st.revoked.insert(
                        serial.clone(),
                        Revoked {
                            cert,
                            expires: e.expires_at,
                            ca,
                        },
                    );
                    st.generation += 1;
                }
                st.cursor = e.cursor;
            }
            if events.len() < BATCH {
                return Ok(());
            }
        }
    }
}
