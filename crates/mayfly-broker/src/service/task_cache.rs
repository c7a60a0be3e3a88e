//! Tasks as recently read from the store, so that issuing a credential
//! costs one store round trip (the issue itself) instead of two.
//!
//! Reading a task from here is safe because everything about a task that
//! can change is checked again by the store, atomically with recording the
//! credential: its state (active, not ended), and its context revision
//! (a decision made on an older context is refused as `TaskChanged`, and
//! the broker decides again on a fresh read). What cannot change (owner,
//! envelope, intent, expiry, delegation chain) is the same in any copy.
//! Anything that is answered on the task alone, without the store's
//! check (a refusal, an approval to open), is answered on a fresh read;
//! see `Service::credential_task`.
//!
//! An entry is used for at most `ttl` after it was read. Memory is bounded
//! by two generations: entries go into the current map, and every `ttl`
//! (or when the current map is full) the previous map is dropped and the
//! current one takes its place, so nothing ever scans.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mayfly_core::{LeaseStatus, TaskId, TaskRecord};

/// How long a task read stays usable.
pub const TTL: Duration = Duration::from_secs(5);
/// Most tasks one generation holds.
pub const CAPACITY: usize = 16 * 1024;

/// The cache; cheap to share.
#[derive(Debug)]
pub struct TaskCache {
    inner: Mutex<Generations>,
    ttl: Duration,
    capacity: usize,
}

/// A task and when it was read.
type Entry = (Instant, Arc<TaskRecord>);

#[derive(Debug)]
struct Generations {
    current: HashMap<TaskId, Entry>,
    previous: HashMap<TaskId, Entry>,
    /// When `current` started.
    since: Instant,
}

impl Default for TaskCache {
    fn default() -> Self {
        Self::new(TTL, CAPACITY)
    }
}

impl TaskCache {
    /// A cache whose entries are used for `ttl` after they were read, with
    /// at most `capacity` per generation.
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            inner: Mutex::new(Generations {
                current: HashMap::new(),
                previous: HashMap::new(),
                since: Instant::now(),
            }),
            ttl,
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Generations> {
        // A panic while holding the lock cannot leave the maps inconsistent
        // (each operation is one insert or remove), so a poisoned lock is
        // still usable.
        let mut g = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if g.since.elapsed() >= self.ttl {
            g.rotate();
        }
        g
    }

    /// The task as last read, if it was active then and the read is recent.
    pub fn get(&self, id: &TaskId) -> Option<Arc<TaskRecord>> {
        let g = self.lock();
        let (read_at, record) = g.current.get(id).or_else(|| g.previous.get(id))?;
        (read_at.elapsed() < self.ttl).then(|| record.clone())
    }

    /// Keeps `record` if it is active (an ended task is read fresh: it is
    /// not on the hot path, and its answer is final anyway).
    pub fn put(&self, record: Arc<TaskRecord>) {
        if record.status != LeaseStatus::Active {
            return;
        }
        let mut g = self.lock();
        if g.current.len() >= self.capacity {
            g.rotate();
        }
        g.current
            .insert(record.task.id.clone(), (Instant::now(), record));
    }

    /// Drops the task, after this broker changed or ended it.
    pub fn forget(&self, id: &TaskId) {
        let mut g = self.lock();
        g.current.remove(id);
        g.previous.remove(id);
    }
}

impl Generations {
    /// Drops the previous generation; the current one becomes it.
    fn rotate(&mut self) {
        self.previous = std::mem::take(&mut self.current);
        self.since = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use mayfly_core::{
        Envelope, Intent, Revocation, RevocationReason, SpiffeId, Task, TaskContext, Timestamp,
    };

    use super::*;

    fn record(status: LeaseStatus) -> Arc<TaskRecord> {
        let now = Timestamp::now();
        Arc::new(TaskRecord {
            task: Task {
                id: TaskId::generate(),
                agent: SpiffeId::new("spiffe://example.org/agent/a").unwrap(),
                intent: Intent::new("x").unwrap(),
                context: TaskContext::default(),
                envelope: Envelope::new(&["https://api.example.com"], &["read"]).unwrap(),
                created_at: now,
                expires_at: now.plus(Duration::from_secs(60)),
                revision: 0,
                parent: None,
                delegated_by: Vec::new(),
                authenticated_by: mayfly_core::Proof::Certificate,
            },
            status,
        })
    }

    #[test]
    fn keeps_active_tasks_and_forgets_on_request() {
        let cache = TaskCache::new(Duration::from_secs(60), 10);
        let live = record(LeaseStatus::Active);
        cache.put(live.clone());
        assert_eq!(cache.get(&live.task.id).as_deref(), Some(&*live));
        cache.forget(&live.task.id);
        assert!(cache.get(&live.task.id).is_none());
    }

    #[test]
    fn never_keeps_an_ended_task() {
        let cache = TaskCache::new(Duration::from_secs(60), 10);
        let ended = record(LeaseStatus::Revoked(Revocation {
            reason: RevocationReason::TaskCompleted,
            at: Timestamp::now(),
            by: SpiffeId::new("spiffe://example.org/agent/a").unwrap(),
            note: None,
        }));
        cache.put(ended.clone());
        assert!(cache.get(&ended.task.id).is_none());
    }

    #[test]
    fn an_entry_is_used_for_ttl_only() {
        let cache = TaskCache::new(Duration::from_millis(200), 10);
        let t = record(LeaseStatus::Active);
        cache.put(t.clone());
        assert!(cache.get(&t.task.id).is_some());
        // Past its ttl it is not used, whichever generation holds it.
        std::thread::sleep(Duration::from_millis(250));
        assert!(cache.get(&t.task.id).is_none());
        // Read again, it is used again.
        cache.put(t.clone());
        assert!(cache.get(&t.task.id).is_some());
    }

    #[test]
    fn a_full_generation_rotates_so_memory_stays_bounded() {
        let cache = TaskCache::new(Duration::from_secs(60), 4);
        let all: Vec<_> = (0..9).map(|_| record(LeaseStatus::Active)).collect();
        for t in &all {
            cache.put(t.clone());
        }
        let kept = all
            .iter()
            .filter(|t| cache.get(&t.task.id).is_some())
            .count();
        assert!(kept <= 8, "two generations of 4 at most, kept {kept}");
        // The newest are the ones kept.
        assert!(cache.get(&all[8].task.id).is_some());
        assert!(cache.get(&all[0].task.id).is_none());
    }
}
