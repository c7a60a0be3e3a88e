//! The reaper's pass: active leases past their expiry become expired (once,
//! on whichever replica gets there first), and records past retention go.

use std::time::Duration;

use mayfly_core::{LeaseId, SpiffeId, TaskId, Timestamp};

use super::RedisStore;
use super::codec::corrupt;
use super::keys::split_member;
use super::scripts::evalsha;
use crate::store::{ExpiredLease, ReapOutcome, StoreError};

pub(super) async fn reap(
    store: &RedisStore,
    now: Timestamp,
    retention: Duration,
    limit: usize,
) -> Result<ReapOutcome, StoreError> {
    let mut outcome = ReapOutcome::default();
    let due = |key: String, up_to: u64| {
        store.conn.run(move |mut c| async move {
            redis::cmd("ZRANGEBYSCORE")
                .arg(&key)
                .arg("-inf")
                .arg(up_to)
                .arg("LIMIT")
                .arg(0)
                .arg(limit)
                .query_async::<Vec<String>>(&mut c)
                .await
        })
    };
    let expiring = due(store.keys.expiry(), now.as_millis()).await?;
    outcome.more |= expiring.len() >= limit;
    if !expiring.is_empty() {
        let mut pipe = redis::pipe();
        for m in &expiring {
            let (l, t, _) = split_member(m)?;
            evalsha(
                &mut pipe,
                &store.scripts.expire,
                &[
                    store.keys.lease(t, l),
                    store.keys.expiry(),
                    store.keys.expiry_ended(),
                ],
                &[m.clone(), now.as_millis().to_string()],
            );
        }
        let results: Vec<i64> = store.run_scripts(pipe, &store.scripts.expire).await?;
        for (m, moved) in expiring.iter().zip(results) {
            if moved == 1 {
                let (l, t, a) = split_member(m)?;
                outcome.expired.push(ExpiredLease {
                    id: LeaseId::new(l).map_err(corrupt)?,
                    task_id: TaskId::new(t).map_err(corrupt)?,
                    agent: SpiffeId::new(a).map_err(corrupt)?,
                });
            }
        }
    }

    let cutoff = now.minus(retention).as_millis();
    let purging = due(store.keys.purge(), cutoff).await?;
    outcome.more |= purging.len() >= limit;
    if !purging.is_empty() {
        let mut pipe = redis::pipe();
        for m in &purging {
            let (l, t, a) = split_member(m)?;
            evalsha(
                &mut pipe,
                &store.scripts.purge,
                &[
                    store.keys.lease(t, l),
                    store.keys.task_leases(t),
                    store.keys.lease_tasks(),
                    store.keys.expiry(),
                    store.keys.purge(),
                    store.keys.task(t),
                    store.keys.tasks(),
                    store.keys.agent_tasks(a),
                    store.keys.legacy_leases(),
                    store.keys.agent_leases(a),
                    store.keys.expiry_ended(),
                ],
                &[
                    m.clone(),
                    l.to_owned(),
                    t.to_owned(),
                    a.to_owned(),
                    store.keys.prefix.clone(),
                    limit.to_string(),
                ],
            );
        }
        let done: Vec<i64> = store.run_scripts(pipe, &store.scripts.purge).await?;
        outcome.purged = done.iter().filter(|d| **d == 1).count();
        // A big task stays due until its last chunk is purged.
        outcome.more |= outcome.purged < purging.len();
    }
    store.trim_feed(cutoff).await?;
    store.purge_approvals(cutoff, limit).await?;
    Ok(outcome)
}

impl RedisStore {
    /// Removes approvals that expired before `cutoff`.
    pub(super) async fn purge_approvals(
        &self,
        cutoff: u64,
        limit: usize,
    ) -> Result<(), StoreError> {
        let index = self.keys.approval_expiry();
        let ids: Vec<String> = {
            let index = index.clone();
            self.conn
                .run(|mut c| async move {
                    redis::cmd("ZRANGEBYSCORE")
                        .arg(&index)
                        .arg("-inf")
                        .arg(cutoff)
                        .arg("LIMIT")
                        .arg(0)
                        .arg(limit)
                        .query_async(&mut c)
                        .await
                })
                .await?
        };
        if ids.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("DEL").arg(self.keys.approval(id)).ignore();
        }
        pipe.cmd("ZREM").arg(&index).arg(&ids).ignore();
        pipe.cmd("ZREM")
            .arg(self.keys.approvals())
            .arg(&ids)
            .ignore();
        self.conn
            .run(|mut c| async move { pipe.query_async::<()>(&mut c).await })
            .await
            .map_err(StoreError::from)
    }
}
