//! The Token Status List (draft-ietf-oauth-status-list): each token's index,
//! and the signed lists at `/statuslists/<n>`.
//!
//! - [`StatusAllocator`] hands out indexes from blocks it reserves in the
//!   store's counter, so replicas never collide and an index is never
//!   reused (a block a replica did not finish is simply never used).
//! - [`StatusLists`] builds each list from the revocation feed, like the
//!   CRLs: a token revoked through any replica is marked in the next list
//!   any replica serves. A list is looked at again at most every
//!   [`REFRESH`], and signed again when it changed or a `ttl` has passed.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mayfly_core::status_list::{INDEXES_PER_LIST, STATUS_LIST_TYPE, StatusBits, list_of, list_uri};
use mayfly_core::{LeaseKind, Timestamp};
use serde_json::json;
use tokio::sync::Mutex;

use crate::issuer::{JwtSigner, SignError};
use crate::store::{LeaseStore, StatusIndexes, StoreError};

/// Indexes reserved per store call.
const BLOCK: u64 = 1024;

/// Events read per store call while catching up.
const BATCH: usize = 1000;

/// How often, at most, a request looks for new revocations.
pub const REFRESH: Duration = Duration::from_millis(200);

/// Hands out status-list indexes.
#[derive(Debug)]
pub struct StatusAllocator {
    store: Arc<dyn StatusIndexes>,
    /// What is left of the block reserved last.
    block: Mutex<Range<u64>>,
}

impl StatusAllocator {
    /// An allocator over `store`'s counter.
    pub fn new(store: Arc<dyn StatusIndexes>) -> Self {
        Self {
            store,
            block: Mutex::new(0..0),
        }
    }

    /// A fresh index.
    pub async fn next(&self) -> Result<u64, StoreError> {
        let mut block = self.block.lock().await;
        if block.is_empty() {
            let first = self.store.reserve_status_indexes(BLOCK).await?;
            *block = first..first.saturating_add(BLOCK);
        }
        block.next().ok_or_else(|| {
            StoreError::Corrupt(crate::cause::Cause::msg("status list indexes exhausted"))
        })
    }
}

/// Why no list could be served.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StatusListError {
    /// The store could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Signing failed.
    #[error(transparent)]
    Sign(#[from] SignError),
}

/// The revoked tokens of one list that may still be met.
struct List {
    bits: StatusBits,
    /// The latest expiry of a token marked: past it, no mark matters.
    newest: Timestamp,
}

/// A signed list, as served.
struct Built {
    jwt: Arc<str>,
    /// Its `iat`.
    at: Timestamp,
    /// The state's generation it shows.
    generation: u64,
}

#[derive(Default)]
struct State {
    /// Feed position already applied.
    cursor: u64,
    /// When the feed was last read.
    looked: Option<Instant>,
    /// Lists with a revoked token still unexpired.
    lists: BTreeMap<u64, List>,
    /// Bumped whenever a list changes.
    generation: u64,
    /// The last token of each list served.
    built: HashMap<u64, Built>,
    /// Indexes reserved, as last read: lists past it do not exist yet.
    reserved: u64,
}

/// Builds, signs and caches the status lists.
pub struct StatusLists {
    store: Arc<dyn LeaseStore>,
    signer: Arc<JwtSigner>,
    issuer: String,
    /// The lists' `ttl`: how long a validator may keep one.
    ttl: Duration,
    state: Mutex<State>,
}

impl std::fmt::Debug for StatusLists {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusLists")
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl StatusLists {
    /// Lists of the tokens recorded in `store`, signed by `signer` as
    /// `issuer`, each to be kept at most `ttl`.
    pub fn new(
        store: Arc<dyn LeaseStore>,
        signer: Arc<JwtSigner>,
        issuer: &str,
        ttl: Duration,
    ) -> Self {
        Self {
            store,
            signer,
            issuer: issuer.trim_end_matches('/').to_owned(),
            ttl,
            state: Mutex::new(State::default()),
        }
    }

    /// The lists' `ttl`.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The URIs of every list an index was reserved in.
    pub async fn uris(&self) -> Result<Vec<String>, StatusListError> {
        let reserved = self.store.status_indexes_reserved().await?;
        self.state.lock().await.reserved = reserved;
        let lists = reserved.div_ceil(INDEXES_PER_LIST);
        Ok((0..lists).map(|n| list_uri(&self.issuer, n)).collect())
    }

    /// List `n` as a signed Status List Token; `None` if no index of it
    /// was reserved yet.
    pub async fn token(&self, n: u64) -> Result<Option<Arc<str>>, StatusListError> {
        let mut st = self.state.lock().await;
        if st.looked.is_none_or(|at| at.elapsed() >= REFRESH) {
            self.catch_up(&mut st).await?;
        }
        if n.saturating_mul(INDEXES_PER_LIST) >= st.reserved {
            st.reserved = self.store.status_indexes_reserved().await?;
            if n.saturating_mul(INDEXES_PER_LIST) >= st.reserved {
                return Ok(None);
            }
        }
        let now = Timestamp::now();
        if let Some(b) = st.built.get(&n)
            && b.generation == st.generation
            && now < b.at.plus(self.ttl)
        {
            return Ok(Some(b.jwt.clone()));
        }
        let bits = st.lists.get(&n).map(|l| l.bits.claim());
        let bits = bits.unwrap_or_else(|| StatusBits::new().claim());
        let iat = now.as_secs();
        let ttl = self.ttl.as_secs().max(1);
        let uri = list_uri(&self.issuer, n);
        let claims = json!({
            "iss": self.issuer,
            "sub": uri,
            "iat": iat,
            // Twice the ttl: a copy kept as long as allowed still checks.
            "exp": iat + 2 * ttl,
            "ttl": ttl,
            "status_list": bits,
        });
        let jwt: Arc<str> = self.signer.sign_typed(STATUS_LIST_TYPE, &claims)?.into();
        let generation = st.generation;
        st.built.insert(
            n,
            Built {
                jwt: jwt.clone(),
                at: now.floor_secs(),
                generation,
            },
        );
        Ok(Some(jwt))
    }

    /// Marks the tokens revoked since the last look, and forgets lists
    /// whose marked tokens have all expired.
    async fn catch_up(&self, st: &mut State) -> Result<(), StatusListError> {
        let now = Timestamp::now();
        loop {
            let events = self.store.revocations_since(st.cursor, BATCH).await?;
            for e in &events {
                st.cursor = e.cursor;
                let (Some(LeaseKind::Jwt), Some(idx)) = (e.kind, e.status_idx) else {
                    continue;
                };
                if e.expires_at <= now {
                    continue;
                }
                let list = st.lists.entry(list_of(idx)).or_insert_with(|| List {
                    bits: StatusBits::new(),
                    newest: e.expires_at,
                });
                list.bits.set(idx);
                list.newest = list.newest.max(e.expires_at);
                st.generation += 1;
            }
            if events.len() < BATCH {
                break;
            }
        }
        let before = st.lists.len();
        st.lists.retain(|_, l| l.newest > now);
        if st.lists.len() != before {
            st.generation += 1;
        }
        let generation = st.generation;
        st.built.retain(|_, b| b.generation == generation);
        st.looked = Some(Instant::now());
        Ok(())
    }
}
