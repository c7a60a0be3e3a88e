//! Listing leases and tasks: index pages, bounded scans, batched reads.

use mayfly_core::{Lease, LeaseId, TaskRecord, Timestamp};

use super::codec::{LeaseFields, corrupt, decode, lease_from};
use super::{CHUNK, MAX_SCAN, RedisStore};
use crate::cause::Cause;
use crate::store::{LeaseFilter, Page, PageRequest, StoreError, TaskFilter};

pub(super) async fn list_leases(
    store: &RedisStore,
    filter: &LeaseFilter,
    page: &PageRequest,
    now: Timestamp,
) -> Result<Page<Lease>, StoreError> {
    let keep = |l: &Lease| filter.matches(l, now);
    if let Some(task) = &filter.task {
        let mut items = Vec::new();
        let (last, full) = store
            .read_task_leases(
                task.as_str(),
                page.after.clone(),
                page.limit.max(1),
                &keep,
                &mut items,
                &mut 0,
                usize::MAX,
            )
            .await?;
        return Ok(Page {
            items,
            next: if full { last } else { None },
        });
    }
    match &filter.agent {
        Some(a) => {
            store
                .page_task_leases(&store.keys.agent_tasks(a.as_str()), true, page, keep)
                .await
        }
        None => {
            store
                .page_task_leases(&store.keys.tasks(), false, page, keep)
                .await
        }
    }
}

pub(super) async fn list_tasks(
    store: &RedisStore,
    filter: &TaskFilter,
    page: &PageRequest,
    now: Timestamp,
) -> Result<Page<TaskRecord>, StoreError> {
    let limit = page.limit.max(1);
    let (key, id_only) = match (&filter.parent, &filter.agent) {
        (Some(p), _) => (store.keys.children(p.as_str()), true),
        (None, Some(a)) => (store.keys.agent_tasks(a.as_str()), true),
        (None, None) => (store.keys.tasks(), false),
    };
    let mut items = Vec::new();
    let mut after = page.after.clone();
    let mut scanned = 0;
    while scanned < MAX_SCAN {
        let members = store
            .members_after(&key, after.as_deref(), id_only, CHUNK)
            .await?;
        let ids: Vec<String> = members
            .iter()
            .map(|m| m.split(':').next().unwrap_or_default().to_owned())
            .collect();
        let tasks = store.fetch_tasks(&ids).await?;
        for (t, rec) in ids.iter().zip(tasks) {
            scanned += 1;
            after = Some(t.clone());
            if let Some(rec) = rec
                && filter.matches(&rec, now)
            {
                items.push(rec);
                if items.len() >= limit {
                    return Ok(Page { items, next: after });
                }
            }
        }
        if members.len() < CHUNK {
            return Ok(Page { items, next: None });
        }
    }
    Ok(Page { items, next: after })
}

impl RedisStore {
    pub(super) async fn fetch_leases(
        &self,
        refs: &[(String, String)],
    ) -> Result<Vec<Option<Lease>>, StoreError> {
        if refs.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for (t, l) in refs {
            pipe.cmd("HMGET")
                .arg(self.keys.lease(t, l))
                .arg(&["body", "state", "rev"]);
        }
        let pipe = &pipe;
        let rows: Vec<LeaseFields> = self
            .conn
            .run_idempotent(|mut c| async move { pipe.query_async(&mut c).await })
            .await?;
        rows.into_iter().map(lease_from).collect()
    }

    pub(super) async fn fetch_tasks(
        &self,
        ids: &[String],
    ) -> Result<Vec<Option<TaskRecord>>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for t in ids {
            pipe.cmd("HGET").arg(self.keys.task(t)).arg("body");
            pipe.cmd("HMGET")
                .arg(self.keys.lease(t, t))
                .arg(&["body", "state", "rev"]);
        }
        let pipe = &pipe;
        let values: Vec<redis::Value> = self
            .conn
            .run_idempotent(|mut c| async move { pipe.query_async(&mut c).await })
            .await?;
        let mut out = Vec::with_capacity(ids.len());
        for pair in values.chunks(2) {
            let body: Option<String> = redis::from_redis_value(pair[0].clone()).map_err(corrupt)?;
            let lease: LeaseFields = redis::from_redis_value(pair[1].clone()).map_err(corrupt)?;
            out.push(match (body, lease_from(lease)?) {
                (Some(body), Some(lease)) => Some(TaskRecord {
                    task: decode(&body)?,
                    status: lease.status,
                }),
                _ => None,
            });
        }
        Ok(out)
    }

    /// Members of a lex-ordered index after `after` (an id), `count` at most.
    pub(super) async fn members_after(
        &self,
        key: &str,
        after: Option<&str>,
        id_only: bool,
        count: usize,
    ) -> Result<Vec<String>, StoreError> {
        // For `id:...` members, everything with a larger id sorts at or after
        // `id;` (';' follows ':').
        let lo = match after {
            None => "-".to_owned(),
            Some(a) if id_only => format!("({a}"),
            Some(a) => format!("[{a};"),
        };
        let key = &key;
        let lo = &lo;
        let key = key.to_owned();
        self.conn
            .run_idempotent(|mut c| async move {
                redis::cmd("ZRANGEBYLEX")
                    .arg(key)
                    .arg(lo)
                    .arg("+")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(count)
                    .query_async(&mut c)
                    .await
            })
            .await
            .map_err(StoreError::from)
    }

    /// Pages over the leases of the tasks in `tasks_key` (a lex index of
    /// task ids, or of `T:A` members when `ids_only` is false): the tasks
    /// in id order, each task's leases in id order. `after` (a lease id)
    /// resumes after that lease in its task; a lease purged since then is
    /// `LeaseNotFound`.
    pub(super) async fn page_task_leases(
        &self,
        tasks_key: &str,
        ids_only: bool,
        page: &PageRequest,
        keep: impl Fn(&Lease) -> bool,
    ) -> Result<Page<Lease>, StoreError> {
        let limit = page.limit.max(1);
        let mut items = Vec::new();
        // Tasks still to read, and where to start in the first of them.
        let mut tasks = Vec::new();
        let mut lease_after = None;
        if let Some(a) = &page.after {
            let id = LeaseId::new(a).map_err(|e| StoreError::Corrupt(Cause::of(e)))?;
            tasks.push(self.task_of(&id).await?.ok_or(StoreError::LeaseNotFound)?);
            lease_after = Some(a.clone());
        }
        let mut tasks_after: Option<String> = tasks.first().cloned();
        let mut last: Option<String> = None;
        let mut scanned = 0;
        loop {
            if tasks.is_empty() {
                tasks = self
                    .members_after(tasks_key, tasks_after.as_deref(), ids_only, CHUNK)
                    .await?
                    .into_iter()
                    .map(|m| match m.split_once(':') {
                        Some((t, _)) if !ids_only => t.to_owned(),
                        _ => m,
                    })
                    .collect();
                tasks.reverse();
            }
            let Some(t) = tasks.pop() else {
                return Ok(Page { items, next: None });
            };
            tasks_after = Some(t.clone());
            let (read, stopped) = self
                .read_task_leases(
                    &t,
                    lease_after.take(),
                    limit,
                    &keep,
                    &mut items,
                    &mut scanned,
                    MAX_SCAN,
                )
                .await?;
            if read.is_some() {
                last = read;
            }
            if stopped {
                return Ok(Page { items, next: last });
            }
        }
    }

    /// Reads task `t`'s leases after `after` (a lease id), in id order,
    /// keeping in `items` those `keep` wants, until `items` holds `limit`,
    /// `scanned` (leases read, counted on) reaches `max_scan`, or the set
    /// ends. Returns the last lease read, and whether it stopped before the
    /// set ended.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn read_task_leases(
        &self,
        t: &str,
        mut after: Option<String>,
        limit: usize,
        keep: &impl Fn(&Lease) -> bool,
        items: &mut Vec<Lease>,
        scanned: &mut usize,
        max_scan: usize,
    ) -> Result<(Option<String>, bool), StoreError> {
        let key = self.keys.task_leases(t);
        loop {
            let ids = self
                .members_after(&key, after.as_deref(), true, CHUNK)
                .await?;
            let refs: Vec<(String, String)> =
                ids.iter().map(|l| (t.to_owned(), l.clone())).collect();
            for (l, lease) in ids.iter().zip(self.fetch_leases(&refs).await?) {
                *scanned += 1;
                after = Some(l.clone());
                if let Some(lease) = lease
                    && keep(&lease)
                {
                    items.push(lease);
                    if items.len() >= limit {
                        return Ok((after, true));
                    }
                }
            }
            if *scanned >= max_scan {
                return Ok((after, true));
            }
            if ids.len() < CHUNK {
                return Ok((after, false));
            }
        }
    }
}
