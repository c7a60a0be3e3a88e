//! The broker as a Shared Signals transmitter (`mayfly-ssf`): the store,
//! the revocation log and the token key as that crate's seams, and the
//! push supervisor that keeps one delivery task per enabled push stream.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use mayfly_core::{LeaseId, LeaseKind, RevocationReason, Timestamp};
use mayfly_ssf::push::{PushClient, push_stream};
use mayfly_ssf::{Credential, Delivery, Entry, Failure, Progress, Revoked, StreamStatus};
use tokio::sync::watch;

use crate::feed::FeedHub;
use crate::issuer::JwtSigner;
use crate::shutdown::Shutdown;
use crate::store::{LeaseStore, RevocationEvent, StoreError};

fn failure(e: impl std::fmt::Display) -> Failure {
    Failure(e.to_string())
}

/// The store as `mayfly-ssf` keeps streams in it.
#[derive(Debug, Clone)]
pub struct StoreStreams(pub Arc<dyn LeaseStore>);

#[async_trait]
impl mayfly_ssf::Streams for StoreStreams {
    async fn put_stream(&self, s: &mayfly_ssf::Stream) -> Result<(), Failure> {
        let body = serde_json::to_string(s).map_err(failure)?;
        self.0
            .put_stream(&s.stream_id, &body)
            .await
            .map_err(failure)
    }

    async fn get_stream(&self, id: &str) -> Result<Option<mayfly_ssf::Stream>, Failure> {
        match self.0.get_stream(id).await.map_err(failure)? {
            Some(body) => serde_json::from_str(&body).map(Some).map_err(failure),
            None => Ok(None),
        }
    }

    async fn all_streams(&self) -> Result<Vec<mayfly_ssf::Stream>, Failure> {
        let all = self.0.all_streams().await.map_err(failure)?;
        all.iter()
            .map(|b| serde_json::from_str(b).map_err(failure))
            .collect()
    }

    async fn delete_stream(&self, id: &str) -> Result<(), Failure> {
        self.0.delete_stream(id).await.map_err(failure)
    }

    async fn progress(&self, id: &str) -> Result<Progress, Failure> {
        match self.0.stream_progress(id).await.map_err(failure)? {
            Some(body) => serde_json::from_str(&body).map_err(failure),
            None => Ok(Progress::default()),
        }
    }

    async fn save_progress(&self, id: &str, p: &Progress) -> Result<(), Failure> {
        let body = serde_json::to_string(p).map_err(failure)?;
        self.0
            .save_stream_progress(id, &body)
            .await
            .map_err(failure)
    }

    async fn lead(&self, id: &str, slot: u64, until_ms: u64, now_ms: u64) -> Result<bool, Failure> {
        self.0
            .first_use(
                &format!("ssf-push:{id}:{slot}"),
                Timestamp::from_millis(until_ms),
                Timestamp::from_millis(now_ms),
            )
            .await
            .map_err(failure)
    }
}

/// Revocations read from the log, kept this many by position (each costs a
/// lease read the first time a stream meets it).
const REMEMBERED: usize = 8192;

/// The revocation log as `mayfly-ssf` reads it: each event with the agent
/// and audience of its lease.
#[derive(Debug)]
pub struct LogEvents {
    store: Arc<dyn LeaseStore>,
    seen: Mutex<Seen>,
}

/// The revocations read lately, by position, and their order.
#[derive(Debug, Default)]
struct Seen {
    by_cursor: HashMap<u64, Option<Revoked>>,
    order: VecDeque<u64>,
}

impl LogEvents {
    /// The log of `store`.
    pub fn new(store: Arc<dyn LeaseStore>) -> Self {
        Self {
            store,
            seen: Mutex::new(Seen::default()),
        }
    }

    async fn revoked(&self, e: &RevocationEvent) -> Result<Option<Revoked>, StoreError> {
        let known = self
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_cursor
            .get(&e.cursor)
            .cloned();
        if let Some(r) = known {
            return Ok(r);
        }
        let r = self.read(e).await?;
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.by_cursor.insert(e.cursor, r.clone());
        seen.order.push_back(e.cursor);
        while seen.order.len() > REMEMBERED {
            if let Some(old) = seen.order.pop_front() {
                seen.by_cursor.remove(&old);
            }
        }
        Ok(r)
    }

    /// A task's own lease, or one purged since, is no SET.
    async fn read(&self, e: &RevocationEvent) -> Result<Option<Revoked>, StoreError> {
        let credential = match (e.kind, &e.serial) {
            (Some(LeaseKind::X509), Some(serial)) => Some(Credential::Certificate {
                serial: serial.clone(),
            }),
            (Some(LeaseKind::Jwt | LeaseKind::DatabaseLogin), _) => None,
            _ => return Ok(None),
        };
        let Some(lease) = self.store.get_lease(&e.lease_id).await? else {
            return Ok(None);
        };
        let credential = match (credential, lease.audience(), lease.database_login()) {
            (Some(c), ..) => c,
            (None, Some(audience), _) => Credential::Token {
                audience: audience.to_string(),
            },
            (None, None, Some((database, _))) => Credential::DatabaseLogin {
                database: database.to_string(),
            },
            (None, None, None) => return Ok(None),
        };
        Ok(Some(Revoked {
            cursor: e.cursor,
            lease_id: e.lease_id.to_string(),
            task_id: e.task_id.to_string(),
            agent: lease.agent.to_string(),
            credential,
            at: e.revocation.at.as_secs(),
            reason: e.revocation.reason.as_str().to_owned(),
            initiating_entity: initiating(e.revocation.reason),
        }))
    }
}

/// Who ended a credential, in CAEP's words.
fn initiating(reason: RevocationReason) -> &'static str {
    match reason {
        RevocationReason::Operator
        | RevocationReason::TaskRevoked
        | RevocationReason::AgentRevoked => "admin",
        RevocationReason::TaskCompleted | RevocationReason::TokenRevoked => "user",
        RevocationReason::ContextChanged => "policy",
        RevocationReason::ParentRevoked => "system",
    }
}

#[async_trait]
impl mayfly_ssf::Events for LogEvents {
    async fn head(&self) -> Result<u64, Failure> {
        self.store.feed_head().await.map_err(failure)
    }

    async fn since(&self, cursor: u64, limit: usize) -> Result<Vec<Entry>, Failure> {
        let events = self
            .store
            .revocations_since(cursor, limit)
            .await
            .map_err(failure)?;
        let mut out = Vec::with_capacity(events.len());
        for e in &events {
            out.push(Entry {
                cursor: e.cursor,
                revoked: self.revoked(e).await.map_err(failure)?,
            });
        }
        Ok(out)
    }
}

/// SETs signed with the token key.
#[derive(Debug)]
pub struct SetSigner(pub Arc<JwtSigner>);

impl mayfly_ssf::Signer for SetSigner {
    fn sign(&self, claims: &serde_json::Value) -> Result<String, Failure> {
        self.0
            .sign_typed(mayfly_ssf::SET_TYPE, claims)
            .map_err(failure)
    }
}

/// The transmitter: what the HTTP side serves, and push delivery.
#[derive(Debug, Clone)]
pub struct Signals {
    /// Streams, log and signer.
    pub tx: mayfly_ssf::Transmitter,
    /// Changes on every revocation this broker sees in the log.
    pub news: watch::Receiver<u64>,
    push: PushClient,
}

/// How often the push supervisor looks for streams to start.
const SUPERVISE: Duration = Duration::from_secs(1);

impl Signals {
    /// The transmitter of the broker at `issuer`, over `store`, signing
    /// with `signer`, pushing to receivers whose certificates chain to
    /// `push_ca_pem`.
    pub fn new(
        issuer: &str,
        store: Arc<dyn LeaseStore>,
        signer: Arc<JwtSigner>,
        feed: &FeedHub,
        push_ca_pem: &[u8],
    ) -> Result<Self, Failure> {
        let (news_tx, news) = watch::channel(0);
        let mut events = feed.subscribe();
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(e) => {
                        if news_tx.send(e.cursor).is_err() {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        news_tx.send_modify(|c| *c = c.wrapping_add(1));
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Self {
            tx: mayfly_ssf::Transmitter {
                issuer: issuer.trim_end_matches('/').to_owned(),
                streams: Arc::new(StoreStreams(store.clone())),
                events: Arc::new(LogEvents::new(store)),
                signer: Arc::new(SetSigner(signer)),
            },
            news,
            push: PushClient::new(push_ca_pem)?,
        })
    }

    /// Keeps one push task per enabled push stream until `stop`.
    pub async fn supervise(self, mut stop: Shutdown) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut running: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
        loop {
            running.retain(|_, t| !t.is_finished());
            match self.tx.streams.all_streams().await {
                Ok(all) => {
                    for s in all {
                        let pushed = matches!(s.delivery, Delivery::Push { .. })
                            && s.status == StreamStatus::Enabled;
                        if pushed && !running.contains_key(&s.stream_id) {
                            let task = tokio::spawn(push_stream(
                                self.tx.clone(),
                                self.push.clone(),
                                s.stream_id.clone(),
                                self.news.clone(),
                                stop_rx.clone(),
                            ));
                            running.insert(s.stream_id, task);
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "shared signals: cannot list streams"),
            }
            tokio::select! {
                _ = tokio::time::sleep(SUPERVISE) => {}
                () = stop.wait() => {
                    let _ = stop_tx.send(true);
                    return;
                }
            }
        }
    }
}

/// A new stream's id: 128 random bits, base64url.
pub fn new_stream_id() -> String {
    LeaseId::generate().to_string()
}
