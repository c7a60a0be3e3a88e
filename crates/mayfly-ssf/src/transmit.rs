//! Delivery: what the transmitter keeps per stream ([`Progress`]), the
//! answer to a poll (RFC 8936), and the push loop (RFC 8935). The broker
//! supplies the stream store ([`Streams`]), the revocation log
//! ([`Events`]) and the signer ([`Signer`]).
//!
//! A stream's progress is a floor in the revocation log: every event at or
//! below it was delivered (pushed and accepted, or polled and
//! acknowledged) or was not for the stream. It is kept in the store, so a
//! restarted broker, or another replica, resumes the stream where it
//! stood: within the log's retention nothing is lost, and a SET is sent
//! again only if the broker stopped between the receiver's acceptance and
//! the floor's write (then with the same `jti`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::event::{Revoked, Set, cursor_of};
use crate::model::{ApiError, Stream, StreamStatus};

/// A store, log or signer failure, as text (the broker's own error says
/// more in its log).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Failure(pub String);

/// One position of the revocation log: a revocation a SET can be made
/// of, or `None` for one that is not (a task's own lease).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its position.
    pub cursor: u64,
    /// What was revoked.
    pub revoked: Option<Revoked>,
}

/// The revocation log.
#[async_trait]
pub trait Events: Send + Sync + std::fmt::Debug {
    /// The newest position (0 if none).
    async fn head(&self) -> Result<u64, Failure>;
    /// The entries after `cursor`, oldest first, at most `limit`.
    async fn since(&self, cursor: u64, limit: usize) -> Result<Vec<Entry>, Failure>;
}

/// Where streams and their progress are kept.
#[async_trait]
pub trait Streams: Send + Sync + std::fmt::Debug {
    /// Stores `stream` (new or changed).
    async fn put_stream(&self, stream: &Stream) -> Result<(), Failure>;
    /// The stream `id`.
    async fn get_stream(&self, id: &str) -> Result<Option<Stream>, Failure>;
    /// Every stream.
    async fn all_streams(&self) -> Result<Vec<Stream>, Failure>;
    /// Removes the stream `id` and its progress.
    async fn delete_stream(&self, id: &str) -> Result<(), Failure>;
    /// The progress of stream `id` (the default if none is kept).
    async fn progress(&self, id: &str) -> Result<Progress, Failure>;
    /// Keeps the progress of stream `id`.
    async fn save_progress(&self, id: &str, progress: &Progress) -> Result<(), Failure>;
    /// Whether this replica leads stream `id` (pushes it) in time slot
    /// `slot`: the first replica to ask for a slot gets it, and keeps the
    /// claim until `until_ms`. One replica pushes a stream at a time.
    async fn lead(&self, id: &str, slot: u64, until_ms: u64, now_ms: u64) -> Result<bool, Failure>;
}

/// Signs SETs (`typ` `secevent+jwt`) with the broker's token key.
pub trait Signer: Send + Sync + std::fmt::Debug {
    /// The compact JWS of `claims`.
    fn sign(&self, claims: &Value) -> Result<String, Failure>;
}

/// What a stream has delivered.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Every log position at or below it is done with.
    pub floor: u64,
    /// Positions above the floor a poll receiver acknowledged already.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub acked: BTreeSet<u64>,
    /// Verification SETs waiting for a poll, by `jti` (signed).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub verifications: BTreeMap<String, String>,
}

/// Entries read per log call.
const BATCH: usize = 256;
/// Most SETs one poll answer holds.
pub const MAX_POLL_EVENTS: usize = 1000;
/// Most acknowledgements one poll takes.
const MAX_ACKS: usize = 10_000;
/// Verification SETs a poll stream keeps waiting at most.
const MAX_VERIFICATIONS: usize = 16;

/// A poll request (RFC 8936 §2.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PollRequest {
    /// `jti`s the receiver acknowledges.
    pub ack: Vec<String>,
    /// At most this many SETs back.
    pub max_events: usize,
    /// Answer at once even with nothing to send.
    pub return_immediately: bool,
}

impl PollRequest {
    /// Reads a poll body; `setErrs` count as acknowledged (the receiver
    /// is done with them).
    pub fn parse(body: &Value) -> Result<Self, ApiError> {
        let obj = body
            .as_object()
            .ok_or_else(|| ApiError::invalid("the poll body must be a JSON object"))?;
        let mut ack = Vec::new();
        if let Some(a) = obj.get("ack") {
            let list = a
                .as_array()
                .filter(|l| l.len() <= MAX_ACKS)
                .ok_or_else(|| {
                    ApiError::invalid(format!("ack must be an array of at most {MAX_ACKS}"))
                })?;
            for j in list {
                ack.push(
                    j.as_str()
                        .ok_or_else(|| ApiError::invalid("ack holds a non-string"))?
                        .to_owned(),
                );
            }
        }
        if let Some(errs) = obj.get("setErrs") {
            let map = errs
                .as_object()
                .ok_or_else(|| ApiError::invalid("setErrs must be an object"))?;
            if ack.len() + map.len() > MAX_ACKS {
                return Err(ApiError::invalid("too many acknowledgements"));
            }
            ack.extend(map.keys().cloned());
        }
        let max_events = match obj.get("maxEvents") {
            None | Some(Value::Null) => MAX_POLL_EVENTS,
            Some(v) => v
                .as_u64()
                .ok_or_else(|| ApiError::invalid("maxEvents must be a non-negative integer"))?
                .min(MAX_POLL_EVENTS as u64) as usize,
        };
        let return_immediately = match obj.get("returnImmediately") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(ApiError::invalid("returnImmediately must be a boolean")),
        };
        Ok(Self {
            ack,
            max_events,
            return_immediately,
        })
    }
}

/// The transmitter's side of delivery, over the broker's parts.
#[derive(Debug, Clone)]
pub struct Transmitter {
    /// The broker's issuer URL (`iss`).
    pub issuer: String,
    /// Streams and their progress.
    pub streams: Arc<dyn Streams>,
    /// The revocation log.
    pub events: Arc<dyn Events>,
    /// Signs SETs.
    pub signer: Arc<dyn Signer>,
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Transmitter {
    /// Signs `set`.
    pub fn sign(&self, set: &Set) -> Result<String, Failure> {
        self.signer.sign(&set.claims)
    }

    /// Applies `acks` to `stream`'s progress, then moves the floor past
    /// every entry that is done: not for the stream, or acknowledged.
    async fn settle(
        &self,
        stream: &Stream,
        p: &mut Progress,
        acks: &[String],
    ) -> Result<(), Failure> {
        for jti in acks {
            if p.verifications.remove(jti).is_some() {
                continue;
            }
            // Another stream's jti, or one already below the floor: nothing.
            if let Some(c) = cursor_of(&stream.stream_id, jti)
                && c > p.floor
            {
                p.acked.insert(c);
            }
        }
        if p.acked.is_empty() {
            return Ok(());
        }
        'outer: loop {
            let entries = self.events.since(p.floor, BATCH).await?;
            for e in &entries {
                let wanted = e.revoked.as_ref().is_some_and(|r| r.wanted_by(stream));
                if wanted && !p.acked.remove(&e.cursor) {
                    break 'outer;
                }
                p.floor = e.cursor;
            }
            if entries.len() < BATCH {
                break;
            }
        }
        // Acknowledgements of what the log no longer holds count for nothing.
        let floor = p.floor;
        p.acked.retain(|c| *c > floor);
        Ok(())
    }

    /// The SETs a poll returns: pending verifications first, then the
    /// stream's events above its floor not yet acknowledged, at most
    /// `max`; and whether more are waiting.
    async fn pending(
        &self,
        stream: &Stream,
        p: &Progress,
        max: usize,
    ) -> Result<(BTreeMap<String, String>, bool), Failure> {
        let mut sets = BTreeMap::new();
        for (jti, set) in &p.verifications {
            if sets.len() == max {
                return Ok((sets, true));
            }
            sets.insert(jti.clone(), set.clone());
        }
        let mut cursor = p.floor;
        let iat = now_secs();
        loop {
            let entries = self.events.since(cursor, BATCH).await?;
            for e in &entries {
                cursor = e.cursor;
                let Some(r) = e.revoked.as_ref().filter(|r| r.wanted_by(stream)) else {
                    continue;
                };
                if p.acked.contains(&e.cursor) {
                    continue;
                }
                if sets.len() == max {
                    return Ok((sets, true));
                }
                let set = r.set(stream, &self.issuer, iat);
                sets.insert(set.jti.clone(), self.sign(&set)?);
            }
            if entries.len() < BATCH {
                return Ok((sets, false));
            }
        }
    }

    /// Answers a poll of `stream` (RFC 8936): applies the acknowledgements,
    /// keeps the progress, and returns `{"sets", "moreAvailable"}`. With
    /// nothing to send and `returnImmediately` false, it waits up to
    /// `wait` for news (`news` resolves on any revocation).
    pub async fn poll<F, Fut>(
        &self,
        stream: &Stream,
        req: &PollRequest,
        wait: Duration,
        news: F,
    ) -> Result<Value, Failure>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let mut p = self.streams.progress(&stream.stream_id).await?;
        let before = p.clone();
        self.settle(stream, &mut p, &req.ack).await?;
        if p != before {
            self.streams.save_progress(&stream.stream_id, &p).await?;
        }
        // Paused: its events wait; disabled: they are dropped when it is
        // enabled again. Either way, nothing now.
        if stream.status != StreamStatus::Enabled {
            return Ok(json!({"sets": {}, "moreAvailable": false}));
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let (sets, more) = self.pending(stream, &p, req.max_events).await?;
            if !sets.is_empty() || req.return_immediately || req.max_events == 0 {
                return Ok(json!({"sets": sets, "moreAvailable": more}));
            }
            if tokio::time::timeout_at(deadline, news()).await.is_err() {
                return Ok(json!({"sets": {}, "moreAvailable": false}));
            }
            // The verifications may have changed meanwhile.
            p = self.streams.progress(&stream.stream_id).await?;
        }
    }

    /// Keeps a verification SET for a poll stream's next poll.
    pub async fn queue_verification(&self, stream: &Stream, set: &Set) -> Result<(), Failure> {
        let signed = self.sign(set)?;
        let mut p = self.streams.progress(&stream.stream_id).await?;
        while p.verifications.len() >= MAX_VERIFICATIONS {
            let Some(oldest) = p.verifications.keys().next().cloned() else {
                break;
            };
            p.verifications.remove(&oldest);
        }
        p.verifications.insert(set.jti.clone(), signed);
        self.streams.save_progress(&stream.stream_id, &p).await
    }

    /// A new stream starts at the log's head: it carries what is revoked
    /// from now on.
    pub async fn start_at_head(&self, stream_id: &str) -> Result<(), Failure> {
        let head = self.events.head().await?;
        self.streams
            .save_progress(
                stream_id,
                &Progress {
                    floor: head,
                    ..Progress::default()
                },
            )
            .await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::HashMap;
    use std::sync::Mutex;

    use super::*;
    use crate::event::{Credential, Revoked};
    use crate::model::NewStream;

    #[derive(Debug, Default)]
    struct Mem {
        streams: Mutex<HashMap<String, Stream>>,
        progress: Mutex<HashMap<String, Progress>>,
        log: Vec<Entry>,
    }

    #[async_trait]
    impl Streams for Mem {
        async fn put_stream(&self, s: &Stream) -> Result<(), Failure> {
            self.streams
                .lock()
                .unwrap()
                .insert(s.stream_id.clone(), s.clone());
            Ok(())
        }
        async fn get_stream(&self, id: &str) -> Result<Option<Stream>, Failure> {
            Ok(self.streams.lock().unwrap().get(id).cloned())
        }
        async fn all_streams(&self) -> Result<Vec<Stream>, Failure> {
            Ok(self.streams.lock().unwrap().values().cloned().collect())
        }
        async fn delete_stream(&self, id: &str) -> Result<(), Failure> {
            self.streams.lock().unwrap().remove(id);
            Ok(())
        }
        async fn progress(&self, id: &str) -> Result<Progress, Failure> {
            Ok(self
                .progress
                .lock()
                .unwrap()
                .get(id)
                .cloned()
                .unwrap_or_default())
        }
        async fn save_progress(&self, id: &str, p: &Progress) -> Result<(), Failure> {
            self.progress.lock().unwrap().insert(id.into(), p.clone());
            Ok(())
        }
        async fn lead(&self, _: &str, _: u64, _: u64, _: u64) -> Result<bool, Failure> {
            Ok(true)
        }
    }

    #[async_trait]
    impl Events for Mem {
        async fn head(&self) -> Result<u64, Failure> {
            Ok(self.log.last().map_or(0, |e| e.cursor))
        }
        async fn since(&self, cursor: u64, limit: usize) -> Result<Vec<Entry>, Failure> {
            Ok(self
                .log
                .iter()
                .filter(|e| e.cursor > cursor)
                .take(limit)
                .cloned()
                .collect())
        }
    }

    /// "Signs" by writing the claims out: what was sent is readable.
    #[derive(Debug)]
    struct Plain;

    impl Signer for Plain {
        fn sign(&self, claims: &Value) -> Result<String, Failure> {
            Ok(claims.to_string())
        }
    }

    fn token(cursor: u64, agent: &str) -> Entry {
        Entry {
            cursor,
            revoked: Some(Revoked {
                cursor,
                lease_id: format!("L{cursor}"),
                task_id: "T".into(),
                agent: agent.into(),
                credential: Credential::Token {
                    audience: "https://api.example.com".into(),
                },
                at: 1,
                reason: "operator".into(),
                initiating_entity: "admin",
            }),
        }
    }

    async fn setup() -> (Transmitter, Arc<Mem>, Stream) {
        let mem = Arc::new(Mem {
            log: vec![
                token(1, "spiffe://td/agent/a"),
                token(2, "spiffe://td/agent/b"),
                Entry {
                    cursor: 3,
                    revoked: None,
                },
                token(4, "spiffe://td/agent/a"),
            ],
            ..Mem::default()
        });
        let mut stream = Stream::new(
            "st".into(),
            "spiffe://td/receiver".into(),
            NewStream::parse(
                &json!({"delivery": {"method": crate::POLL},
                "events_requested": [crate::SESSION_REVOKED]}),
                &crate::model::PushPolicy::default(),
            )
            .unwrap(),
        );
        stream.subjects.push("spiffe://td/agent/a".into());
        mem.put_stream(&stream).await.unwrap();
        let tx = Transmitter {
            issuer: "https://broker.example".into(),
            streams: mem.clone(),
            events: mem.clone(),
            signer: Arc::new(Plain),
        };
        (tx, mem, stream)
    }

    async fn poll(tx: &Transmitter, stream: &Stream, body: Value) -> (Vec<String>, bool) {
        let req = PollRequest::parse(&body).unwrap();
        let answer = tx
            .poll(stream, &req, Duration::from_millis(50), || {
                std::future::pending()
            })
            .await
            .unwrap();
        let sets = answer["sets"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        (sets, answer["moreAvailable"].as_bool().unwrap())
    }

    #[tokio::test]
    async fn a_poll_returns_what_is_not_acknowledged_and_acks_move_the_floor() {
        let (tx, mem, stream) = setup().await;
        let now = json!({"returnImmediately": true});
        assert_eq!(
            poll(&tx, &stream, now.clone()).await,
            (vec!["st.1".into(), "st.4".into()], false)
        );
        // Not acknowledged: returned again, the same SETs.
        assert_eq!(
            poll(
                &tx,
                &stream,
                json!({"maxEvents": 1, "returnImmediately": true})
            )
            .await,
            (vec!["st.1".into()], true)
        );
        // An ack out of order waits above the floor.
        assert_eq!(
            poll(
                &tx,
                &stream,
                json!({"ack": ["st.4", "other.1", "st.x"], "returnImmediately": true})
            )
            .await,
            (vec!["st.1".into()], false)
        );
        assert_eq!(mem.progress("st").await.unwrap().floor, 0);
        // setErrs count as received.
        assert_eq!(
            poll(
                &tx,
                &stream,
                json!({"setErrs": {"st.1": {"err": "invalid_key"}}, "returnImmediately": true})
            )
            .await,
            (vec![], false)
        );
        let p = mem.progress("st").await.unwrap();
        assert_eq!((p.floor, p.acked.len()), (4, 0));
        // A long poll with nothing waiting answers empty once it times out.
        let started = std::time::Instant::now();
        assert_eq!(poll(&tx, &stream, json!({})).await, (vec![], false));
        assert!(started.elapsed() >= Duration::from_millis(50));
    }

    #[tokio::test]
    async fn verifications_come_first_and_a_paused_stream_sends_nothing() {
        let (tx, _mem, mut stream) = setup().await;
        let v =
            crate::event::verification_set(&stream, "https://broker.example", 1, Some("s1"), "n1");
        tx.queue_verification(&stream, &v).await.unwrap();
        let (sets, _) = poll(
            &tx,
            &stream,
            json!({"maxEvents": 1, "returnImmediately": true}),
        )
        .await;
        assert_eq!(sets, vec![v.jti.clone()]);
        let (sets, _) = poll(
            &tx,
            &stream,
            json!({"ack": [v.jti], "returnImmediately": true}),
        )
        .await;
        assert_eq!(sets, vec!["st.1".to_owned(), "st.4".to_owned()]);
        stream.status = StreamStatus::Paused;
        assert_eq!(
            poll(&tx, &stream, json!({"returnImmediately": true})).await,
            (vec![], false)
        );
    }

    #[test]
    fn hostile_poll_bodies_are_refused() {
        for bad in [
            json!([]),
            json!({"ack": "st.1"}),
            json!({"ack": [1]}),
            json!({"maxEvents": -1}),
            json!({"returnImmediately": "yes"}),
            json!({"setErrs": []}),
        ] {
            assert_eq!(PollRequest::parse(&bad).unwrap_err().status, 400, "{bad}");
        }
        assert_eq!(
            PollRequest::parse(&json!({"maxEvents": 1_000_000}))
                .unwrap()
                .max_events,
            MAX_POLL_EVENTS
        );
    }
}
