//! The revocation feed: a Redis stream, read by cursor and trimmed once its
//! events' credentials have expired.

use super::codec::event_from;
use super::keys::{cursor_of, stream_id_of};
use super::{CHUNK, RedisStore};
use crate::redis_conn::Towards;
use crate::store::{RevocationEvent, StoreError};

pub(super) async fn feed_head(store: &RedisStore) -> Result<u64, StoreError> {
    let last: Vec<(String, Vec<(String, String)>)> = store
        .conn
        .stream_range(&store.keys.revocations(), Towards::Older, ("+", "-"), 1)
        .await?;
    last.first().map_or(Ok(0), |(id, _)| cursor_of(id))
}

pub(super) async fn revocations_since(
    store: &RedisStore,
    cursor: u64,
    limit: usize,
) -> Result<Vec<RevocationEvent>, StoreError> {
    let start = format!("({}", stream_id_of(cursor));
    let rows: Vec<(String, Vec<(String, String)>)> = store
        .conn
        .stream_range(
            &store.keys.revocations(),
            Towards::Newer,
            (&start, "+"),
            limit,
        )
        .await?;
    rows.into_iter()
        .map(|(id, fields)| event_from(&id, fields))
        .collect()
}

impl RedisStore {
    /// Drops feed events whose credentials expired before `cutoff`, from the
    /// oldest end.
    pub(super) async fn trim_feed(&self, cutoff: u64) -> Result<(), StoreError> {
        let key = self.keys.revocations();
        loop {
            let rows: Vec<(String, Vec<(String, String)>)> = self
                .conn
                .stream_range(&key, Towards::Newer, ("-", "+"), CHUNK)
                .await?;
            let mut old = Vec::new();
            let mut done = rows.len() < CHUNK;
            for (id, fields) in &rows {
                let exp = fields
                    .iter()
                    .find(|(f, _)| f == "exp")
                    .and_then(|(_, v)| v.parse::<u64>().ok())
                    .unwrap_or(0);
                if exp > cutoff {
                    done = true;
                    break;
                }
                old.push(id.clone());
            }
            if !old.is_empty() {
                let k = key.clone();
                self.conn
                    .run(|mut c| async move {
                        redis::cmd("XDEL")
                            .arg(&k)
                            .arg(&old)
                            .query_async::<i64>(&mut c)
                            .await
                    })
                    .await?;
            }
            if done {
                return Ok(());
            }
        }
    }
}
