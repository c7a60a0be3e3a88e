//! The contract every `LeaseStore` backend must pass. Each function takes a
//! fresh, empty store (those about recording, a [`Backend`]: the store
//! recording to the trail production gives it, and one whose trail fails);
//! [`store_contract_tests!`](crate::store_contract_tests) turns the whole
//! list into `#[tokio::test]`s for one backend, so every backend runs the
//! same suite.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use mayfly_core::{
    AgentLock, Approval, ApprovalId, ApprovalRequest, ApprovalState, ApprovalStatus, Audience,
    Envelope, Intent, Lease, LeaseDetail, LeaseId, LeaseKind, LeaseState, LeaseStatus,
    RevocationReason, SpiffeId, Task, TaskContext, TaskId, TaskState, Timestamp, parse_scopes,
};

use mayfly_broker::audit::{AuditError, AuditRecord, AuditSink, Event, verify};
use mayfly_broker::recorder::Recorder;
use mayfly_broker::store::{
    ExpiredLease, HeldLogin, LeaseFilter, LeaseStore, LeaseWrite, PageRequest, RecordBatch,
    RecordError, RevokeRequest, StoreError, TaskFilter,
};

/// Generates one `#[tokio::test]` per contract check for a backend.
/// `$make` is an expression of type `impl Future<Output =
/// (`[`Backend`]`, G)>`, evaluated per test; `G` is kept alive for the test
/// (a temp dir, a server process).
#[macro_export]
macro_rules! store_contract_tests {
    ($make:expr) => {
        $crate::store_contract_tests!(@recording $make;
            record_writes_each_lease_with_its_record_or_neither,
            record_opens_each_task_with_its_record_or_neither,
            concurrent_records_keep_leases_and_trail_in_step,
            a_failed_trail_leaves_no_active_lease
        );
        $crate::store_contract_tests!(@each $make;
            start_and_get_task,
            issue_requires_a_live_task_of_the_same_agent,
            end_task_revokes_every_live_lease_atomically,
            end_task_skips_dead_leases,
            revoke_lease,
            revoke_agent_spares_other_agents,
            revoking_a_service_ends_the_tokens_it_holds,
            a_locked_agent_gets_nothing_until_unlocked,
            list_leases_filters_and_pages,
            an_agents_leases_page_across_its_tasks,
            list_tasks_filters_and_pages,
            reap_expires_each_lease_exactly_once,
            the_active_count_follows_task_ends_and_expiry,
            reap_purges_after_retention,
            a_big_task_is_purged_over_several_passes,
            revocation_feed_is_ordered_and_resumable,
            feed_head_is_the_newest_cursor,
            approvals_are_decided_once_and_used_once,
            context_updates_bump_the_revision_and_fence_issuance,
            issue_racing_end_task_never_leaves_an_active_lease,
            delegated_tasks_need_a_live_parent_of_the_delegator,
            ending_a_task_ends_its_whole_subtree,
            revoked_lease_never_becomes_active,
            a_key_is_used_once_until_it_lapses,
            held_logins_stay_until_released,
            status_indexes_are_never_handed_out_twice,
            signal_streams_are_kept_with_their_progress
        );
    };
    (@each $make:expr; $($name:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let (backend, _guard) = $make.await;
                $crate::contract::$name(backend.store).await;
            }
        )*
    };
    (@recording $make:expr; $($name:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let (backend, _guard) = $make.await;
                $crate::contract::$name(backend).await;
            }
        )*
    };
}

pub type Store = Arc<dyn LeaseStore>;

/// Stores under test for recording, each fresh and empty.
#[derive(Debug)]
pub struct Backend {
    /// Recording to the trail the broker gives it: the Redis store's own
    /// stream, a file beside the embedded store; empty.
    pub store: Store,
    /// Recording to [`unwritable`]: every record fails.
    pub failing: Store,
}

/// A trail that takes nothing, as a full disk would: for
/// [`Backend::failing`].
pub fn unwritable() -> Arc<dyn AuditSink> {
    Arc::new(Unwritable)
}

/// The suite's time origin: the wall clock at first use, so backends that
/// give records a real expiry (Redis TTLs) see plausible times.
static T0: std::sync::LazyLock<Timestamp> =
    std::sync::LazyLock::new(|| Timestamp::now().floor_secs());

fn at(secs: u64) -> Timestamp {
    T0.plus(Duration::from_secs(secs))
}

pub fn agent(name: &str) -> SpiffeId {
    SpiffeId::new(&format!("spiffe://example.org/agent/{name}")).unwrap()
}

fn operator() -> SpiffeId {
    SpiffeId::new("spiffe://example.org/operator/admin").unwrap()
}

/// A task of `agent` created at T0 that lives `ttl` seconds.
pub fn task(agent: &SpiffeId, ttl: u64) -> Task {
    Task {
        id: TaskId::generate(),
        agent: agent.clone(),
        intent: Intent::new("contract test").unwrap(),
        context: TaskContext::new([("environment", "test")]).unwrap(),
        envelope: Envelope::new(&["https://api.example.com"], &["read", "write"]).unwrap(),
        created_at: *T0,
        expires_at: at(ttl),
        revision: 0,
        parent: None,
        delegated_by: Vec::new(),
        authenticated_by: mayfly_core::Proof::Certificate,
    }
}

/// A JWT lease under `task`, issued at T0, living `ttl` seconds.
/// Distinct status-list indexes for the tokens here (the broker takes
/// them from the store's counter).
fn next_status_index() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1 << 30);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

pub fn lease(task: &Task, ttl: u64) -> Lease {
    Lease {
        id: LeaseId::generate(),
        detail: LeaseDetail::Token {
            audience: Audience::new("https://api.example.com").unwrap(),
            binding: mayfly_core::Binding::Bearer,
            status_idx: Some(next_status_index()),
        },
        agent: task.agent.clone(),
        task_id: task.id.clone(),
        scopes: parse_scopes(&["read"]).unwrap(),
        issued_at: *T0,
        expires_at: at(ttl),
        status: LeaseStatus::Active,
        task_revision: 0,
        approval: None,
        authenticated_by: mayfly_core::Proof::Certificate,
    }
}

/// A task of `agent` delegated from `parent`, created at `created` (T0 +
/// secs), living until T0 + `ttl`.
pub fn child(parent: &Task, agent: &SpiffeId, created: u64, ttl: u64) -> Task {
    let mut t = task(agent, ttl);
    t.created_at = at(created);
    t.parent = Some(parent.id.clone());
    t.delegated_by = parent.delegated_by.clone();
    t.delegated_by.push(parent.agent.clone());
    t
}

pub fn revoke(reason: RevocationReason, child: RevocationReason, now: Timestamp) -> RevokeRequest {
    RevokeRequest {
        reason,
        child_reason: child,
        by: operator(),
        note: Some("contract".into()),
        at: now,
    }
}

fn complete(task: &Task, now: Timestamp) -> RevokeRequest {
    RevokeRequest {
        reason: RevocationReason::TaskCompleted,
        child_reason: RevocationReason::TaskCompleted,
        by: task.agent.clone(),
        note: None,
        at: now,
    }
}

async fn state(store: &Store, id: &LeaseId, now: Timestamp) -> LeaseState {
    store
        .get_lease(id)
        .await
        .unwrap()
        .expect("lease exists")
        .state_at(now)
}

async fn started(store: &Store, agent: &SpiffeId, ttl: u64) -> Task {
    let t = task(agent, ttl);
    store.start_task(&t).await.unwrap();
    t
}

async fn issued(store: &Store, task: &Task, ttl: u64) -> Lease {
    let l = lease(task, ttl);
    store.issue(&l, at(1)).await.unwrap();
    l
}

pub async fn start_and_get_task(store: Store) {
    let t = started(&store, &agent("a"), 600).await;
    let rec = store.get_task(&t.id).await.unwrap().unwrap();
    assert_eq!(rec.task, t);
    assert_eq!(rec.state_at(at(1)), TaskState::Active);
    assert_eq!(rec.state_at(at(600)), TaskState::Expired);
    let own = store.get_lease(&t.id.lease_id()).await.unwrap().unwrap();
    assert_eq!(own.kind(), Some(LeaseKind::Task));
    assert_eq!(own.expires_at, t.expires_at);
    assert!(matches!(
        store.start_task(&t).await,
        Err(StoreError::Duplicate(_))
    ));
    assert!(store.get_task(&TaskId::generate()).await.unwrap().is_none());
    store.check().await.unwrap();
}

pub async fn issue_requires_a_live_task_of_the_same_agent(store: Store) {
    let t = started(&store, &agent("a"), 600).await;

    let mut orphan = lease(&t, 60);
    orphan.task_id = TaskId::generate();
    assert!(matches!(
        store.issue(&orphan, at(1)).await,
        Err(StoreError::TaskNotFound)
    ));

    let mut foreign = lease(&t, 60);
    foreign.agent = agent("b");
    assert!(matches!(
        store.issue(&foreign, at(1)).await,
        Err(StoreError::TaskNotFound)
    ));

    let too_long = lease(&t, 601);
    assert!(matches!(
        store.issue(&too_long, at(1)).await,
        Err(StoreError::OutlivesTask)
    ));

    let late = lease(&t, 600);
    assert!(matches!(
        store.issue(&late, at(600)).await,
        Err(StoreError::TaskNotActive(TaskState::Expired))
    ));

    let ok = issued(&store, &t, 60).await;
    assert!(matches!(
        store.issue(&ok, at(2)).await,
        Err(StoreError::Duplicate(_))
    ));

    store.end_task(&t.id, &complete(&t, at(3))).await.unwrap();
    let after = lease(&t, 60);
    assert!(matches!(
        store.issue(&after, at(4)).await,
        Err(StoreError::TaskNotActive(TaskState::Completed))
    ));
    // No failed call left a record behind.
    for l in [&orphan, &foreign, &too_long, &late, &after] {
        assert!(store.get_lease(&l.id).await.unwrap().is_none());
    }
}

pub async fn end_task_revokes_every_live_lease_atomically(store: Store) {
    let t = started(&store, &agent("a"), 600).await;
    let mut leases = Vec::new();
    for _ in 0..3 {
        leases.push(issued(&store, &t, 60).await.id);
    }
    let req = revoke(
        RevocationReason::Operator,
        RevocationReason::TaskRevoked,
        at(5),
    );
    let revoked = store.end_task(&t.id, &req).await.unwrap();
    assert_eq!(
        revoked[0],
        t.id.lease_id(),
        "the task's own lease comes first"
    );
    assert_eq!(
        revoked[1..].iter().collect::<BTreeSet<_>>(),
        leases.iter().collect::<BTreeSet<_>>()
    );
    for id in &leases {
        let l = store.get_lease(id).await.unwrap().unwrap();
        let r = l.revocation().expect("revoked");
        assert_eq!(r.reason, RevocationReason::TaskRevoked);
        assert_eq!(r.by, operator());
        assert_eq!(r.at, at(5));
    }
    let rec = store.get_task(&t.id).await.unwrap().unwrap();
    assert_eq!(rec.state_at(at(6)), TaskState::Revoked);
    assert_eq!(rec.revocation().unwrap().reason, RevocationReason::Operator);
    assert!(matches!(
        store.end_task(&t.id, &complete(&t, at(7))).await,
        Err(StoreError::TaskNotActive(TaskState::Revoked))
    ));
    assert!(matches!(
        store
            .end_task(&TaskId::generate(), &complete(&t, at(7)))
            .await,
        Err(StoreError::TaskNotFound)
    ));
    let done = started(&store, &agent("a"), 600).await;
    store
        .end_task(&done.id, &complete(&done, at(8)))
        .await
        .unwrap();
    let rec = store.get_task(&done.id).await.unwrap().unwrap();
    assert_eq!(rec.state_at(at(9)), TaskState::Completed);
}

pub async fn end_task_skips_dead_leases(store: Store) {
    let t = started(&store, &agent("a"), 600).await;
    let short = issued(&store, &t, 10).await;
    let revoked = issued(&store, &t, 60).await;
    let live = issued(&store, &t, 60).await;
    let req = revoke(
        RevocationReason::Operator,
        RevocationReason::Operator,
        at(2),
    );
    assert_eq!(
        store.revoke_lease(&revoked.id, &req).await.unwrap(),
        vec![revoked.id.clone()]
    );
    let ended = store.end_task(&t.id, &complete(&t, at(20))).await.unwrap();
    assert_eq!(ended, vec![t.id.lease_id(), live.id.clone()]);
    assert_eq!(state(&store, &short.id, at(20)).await, LeaseState::Expired);
    let first = store.get_lease(&revoked.id).await.unwrap().unwrap();
    assert_eq!(
        first.revocation().unwrap().reason,
        RevocationReason::Operator,
        "kept first reason"
    );
}

pub async fn revoke_lease(store: Store) {
    let t = started(&store, &agent("a"), 600).await;
    let a = issued(&store, &t, 60).await;
    let b = issued(&store, &t, 60).await;
    let req = revoke(
        RevocationReason::Operator,
        RevocationReason::TaskRevoked,
        at(2),
    );
    assert_eq!(
        store.revoke_lease(&a.id, &req).await.unwrap(),
        vec![a.id.clone()]
    );
    assert_eq!(state(&store, &a.id, at(2)).await, LeaseState::Revoked);
    assert_eq!(
        state(&store, &b.id, at(2)).await,
        LeaseState::Active,
        "siblings untouched"
    );
    assert!(
        store.revoke_lease(&a.id, &req).await.unwrap().is_empty(),
        "idempotent"
    );
    assert!(matches!(
        store.revoke_lease(&LeaseId::generate(), &req).await,
        Err(StoreError::LeaseNotFound)
    ));
    // Revoking a task's lease ends the task and its credentials.
    let ids = store.revoke_lease(&t.id.lease_id(), &req).await.unwrap();
    assert_eq!(ids, vec![t.id.lease_id(), b.id.clone()]);
    let b = store.get_lease(&b.id).await.unwrap().unwrap();
    assert_eq!(
        b.revocation().unwrap().reason,
        RevocationReason::TaskRevoked
    );
}

pub async fn revoke_agent_spares_other_agents(store: Store) {
    let (a, b) = (agent("a"), agent("b"));
    let t1 = started(&store, &a, 600).await;
    let t2 = started(&store, &a, 600).await;
    let tb = started(&store, &b, 600).await;
    let l1 = issued(&store, &t1, 60).await;
    let l2 = issued(&store, &t2, 60).await;
    let lb = issued(&store, &tb, 60).await;
    let req = revoke(
        RevocationReason::AgentRevoked,
        RevocationReason::AgentRevoked,
        at(3),
    );
    let ids: BTreeSet<LeaseId> = store
        .revoke_agent(&a, &req)
        .await
        .unwrap()
        .into_iter()
        .collect();
    let want: BTreeSet<LeaseId> = [
        t1.id.lease_id(),
        t2.id.lease_id(),
        l1.id.clone(),
        l2.id.clone(),
    ]
    .into();
    assert_eq!(ids, want);
    assert_eq!(state(&store, &lb.id, at(3)).await, LeaseState::Active);
    assert_eq!(
        store
            .get_task(&tb.id)
            .await
            .unwrap()
            .unwrap()
            .state_at(at(3)),
        TaskState::Active
    );
    let l1 = store.get_lease(&l1.id).await.unwrap().unwrap();
    assert_eq!(
        l1.revocation().unwrap().reason,
        RevocationReason::AgentRevoked
    );
    assert!(
        store.revoke_agent(&a, &req).await.unwrap().is_empty(),
        "nothing left to revoke"
    );
}

/// A token exchanged for by `service` under `task` (another agent's), at
/// T0, living `ttl` seconds.
pub fn exchanged(task: &Task, service: &SpiffeId, ttl: u64) -> Lease {
    let mut l = lease(task, ttl);
    l.detail = LeaseDetail::ExchangedToken {
        audience: Audience::new("https://api.example.com").unwrap(),
        binding: mayfly_core::Binding::Bearer,
        actor: service.clone(),
        subject_audience: Audience::new("https://tools.example.com").unwrap(),
        status_idx: Some(next_status_index()),
    };
    l
}

/// Revoking or locking a service ends the tokens it exchanged for under
/// other agents' tasks (it holds them as the actor), leaves the agents'
/// own credentials alone, and refuses the service any new hop.
pub async fn revoking_a_service_ends_the_tokens_it_holds(store: Store) {
    let (a, b, svc, other) = (agent("a"), agent("b"), agent("svc"), agent("other-svc"));
    let ta = started(&store, &a, 600).await;
    let tb = started(&store, &b, 600).await;
    let own = issued(&store, &ta, 60).await;
    let hop_a = exchanged(&ta, &svc, 60);
    store.issue(&hop_a, at(1)).await.unwrap();
    let hop_b = exchanged(&tb, &svc, 60);
    store.issue(&hop_b, at(1)).await.unwrap();
    let elsewhere = exchanged(&tb, &other, 60);
    store.issue(&elsewhere, at(1)).await.unwrap();
    // A hop that expired on its own is not revoked again.
    let lapsed = exchanged(&ta, &svc, 2);
    store.issue(&lapsed, at(1)).await.unwrap();

    let req = revoke(
        RevocationReason::AgentRevoked,
        RevocationReason::AgentRevoked,
        at(3),
    );
    let ids: BTreeSet<LeaseId> = store
        .revoke_agent(&svc, &req)
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(ids, [hop_a.id.clone(), hop_b.id.clone()].into());
    for id in [&own.id, &elsewhere.id, &ta.id.lease_id(), &tb.id.lease_id()] {
        assert_eq!(state(&store, id, at(3)).await, LeaseState::Active, "{id}");
    }
    let ended = store.get_lease(&hop_b.id).await.unwrap().unwrap();
    assert_eq!(
        ended.revocation().unwrap().reason,
        RevocationReason::AgentRevoked
    );
    let feed: BTreeSet<LeaseId> = store
        .revocations_since(0, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.lease_id)
        .collect();
    assert_eq!(feed, [hop_a.id.clone(), hop_b.id.clone()].into());
    assert!(store.revoke_agent(&svc, &req).await.unwrap().is_empty());

    // Locked, the service is refused a new hop, though the task's owner
    // is not locked; its hops exchanged since are revoked with the lock.
    let late = exchanged(&ta, &svc, 60);
    store.issue(&late, at(3)).await.unwrap();
    let lock = AgentLock {
        agent: svc.clone(),
        reason: "compromised".into(),
        by: operator(),
        at: at(4),
        expires_at: None,
    };
    let locked = store
        .lock_agent(
            &lock,
            &revoke(
                RevocationReason::AgentRevoked,
                RevocationReason::AgentRevoked,
                at(4),
            ),
        )
        .await
        .unwrap();
    assert_eq!(locked, vec![late.id.clone()]);
    let refused = exchanged(&ta, &svc, 60);
    assert!(matches!(
        store.issue(&refused, at(5)).await,
        Err(StoreError::AgentLocked)
    ));
    assert!(store.get_lease(&refused.id).await.unwrap().is_none());
    // The agent itself still gets its own credentials.
    let mine = lease(&ta, 60);
    store.issue(&mine, at(5)).await.unwrap();
}

pub async fn a_locked_agent_gets_nothing_until_unlocked(store: Store) {
    let (a, b) = (agent("a"), agent("b"));
    let ta = started(&store, &a, 600).await;
    let tb = started(&store, &b, 600).await;
    let la = issued(&store, &ta, 60).await;
    let lb = issued(&store, &tb, 60).await;
    let lock = AgentLock {
        agent: a.clone(),
        reason: "key leaked".into(),
        by: operator(),
        at: at(2),
        expires_at: Some(at(100)),
    };
    let req = revoke(
        RevocationReason::AgentRevoked,
        RevocationReason::AgentRevoked,
        at(2),
    );
    let revoked: BTreeSet<LeaseId> = store
        .lock_agent(&lock, &req)
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(revoked, [ta.id.lease_id(), la.id.clone()].into());
    assert_eq!(state(&store, &lb.id, at(3)).await, LeaseState::Active);
    assert_eq!(
        store.agent_lock(&a, at(3)).await.unwrap(),
        Some(lock.clone())
    );
    assert_eq!(store.agent_lock(&b, at(3)).await.unwrap(), None);
    assert_eq!(store.list_locks(at(3)).await.unwrap(), vec![lock.clone()]);

    // No new task, no credential (even under a task opened before).
    let mut fresh = task(&a, 600);
    fresh.created_at = at(3);
    assert!(matches!(
        store.start_task(&fresh).await,
        Err(StoreError::AgentLocked)
    ));
    assert!(store.get_task(&fresh.id).await.unwrap().is_none());
    let after = lease(&ta, 60);
    assert!(matches!(
        store.issue(&after, at(3)).await,
        Err(StoreError::AgentLocked)
    ));
    assert!(store.get_lease(&after.id).await.unwrap().is_none());
    // Another agent is untouched.
    issued(&store, &tb, 60).await;

    // Locking again replaces the lock; unlocking lifts it once.
    let forever = AgentLock {
        expires_at: None,
        reason: "still investigating".into(),
        ..lock.clone()
    };
    assert!(store.lock_agent(&forever, &req).await.unwrap().is_empty());
    assert_eq!(
        store.agent_lock(&a, at(500)).await.unwrap(),
        Some(forever.clone())
    );
    assert_eq!(store.unlock_agent(&a, at(5)).await.unwrap(), Some(forever));
    assert_eq!(store.unlock_agent(&a, at(5)).await.unwrap(), None);
    assert!(store.list_locks(at(5)).await.unwrap().is_empty());
    let mut back = task(&a, 600);
    back.created_at = at(5);
    store.start_task(&back).await.unwrap();
    issued(&store, &back, 60).await;

    // A lock with an expiry lifts by itself.
    let brief = AgentLock {
        agent: b.clone(),
        reason: "brief".into(),
        by: operator(),
        at: at(5),
        expires_at: Some(at(10)),
    };
    store.lock_agent(&brief, &req).await.unwrap();
    let mut early = task(&b, 600);
    early.created_at = at(9);
    assert!(matches!(
        store.start_task(&early).await,
        Err(StoreError::AgentLocked)
    ));
    let mut later = task(&b, 600);
    later.created_at = at(10);
    store.start_task(&later).await.unwrap();
    assert_eq!(store.agent_lock(&b, at(10)).await.unwrap(), None);
    assert!(store.list_locks(at(10)).await.unwrap().is_empty());
}

async fn collect_leases(store: &Store, filter: &LeaseFilter, now: Timestamp) -> Vec<LeaseId> {
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .list_leases(
                filter,
                &PageRequest {
                    after: after.clone(),
                    limit: 3,
                },
                now,
            )
            .await
            .unwrap();
        assert!(page.items.len() <= 3);
        out.extend(page.items.into_iter().map(|l| l.id));
        match page.next {
            Some(n) => after = Some(n),
            None => return out,
        }
    }
}

pub async fn list_leases_filters_and_pages(store: Store) {
    let (a, b) = (agent("a"), agent("b"));
    let ta = started(&store, &a, 600).await;
    let tb = started(&store, &b, 600).await;
    let mut of_a = vec![ta.id.lease_id()];
    for _ in 0..7 {
        of_a.push(issued(&store, &ta, 60).await.id);
    }
    let short = issued(&store, &tb, 10).await;
    let revoked = issued(&store, &tb, 60).await;
    let req = revoke(
        RevocationReason::Operator,
        RevocationReason::Operator,
        at(2),
    );
    store.revoke_lease(&revoked.id, &req).await.unwrap();
    let now = at(30);

    let all = collect_leases(&store, &LeaseFilter::default(), now).await;
    assert_eq!(all.len(), 11, "2 tasks + 9 credentials, each once");
    assert_eq!(
        all.iter().collect::<BTreeSet<_>>().len(),
        11,
        "no duplicates across pages"
    );
    // The order is the backend's own (embedded: lease ids; Redis: tasks,
    // then each task's leases); every lease comes exactly once.

    let by_task = LeaseFilter {
        task: Some(ta.id.clone()),
        ..Default::default()
    };
    let mut got = collect_leases(&store, &by_task, now).await;
    got.sort();
    of_a.sort();
    assert_eq!(got, of_a);

    let by_agent = LeaseFilter {
        agent: Some(b.clone()),
        ..Default::default()
    };
    assert_eq!(collect_leases(&store, &by_agent, now).await.len(), 3);

    let revoked_only = LeaseFilter {
        state: Some(LeaseState::Revoked),
        ..Default::default()
    };
    assert_eq!(
        collect_leases(&store, &revoked_only, now).await,
        vec![revoked.id.clone()]
    );
    let expired_only = LeaseFilter {
        state: Some(LeaseState::Expired),
        ..Default::default()
    };
    assert_eq!(
        collect_leases(&store, &expired_only, now).await,
        vec![short.id.clone()]
    );
    let tasks_only = LeaseFilter {
        kind: Some(LeaseKind::Task),
        ..Default::default()
    };
    assert_eq!(collect_leases(&store, &tasks_only, now).await.len(), 2);
    let combined = LeaseFilter {
        agent: Some(b.clone()),
        state: Some(LeaseState::Active),
        kind: Some(LeaseKind::Jwt),
        ..Default::default()
    };
    assert!(collect_leases(&store, &combined, now).await.is_empty());
}

pub async fn an_agents_leases_page_across_its_tasks(store: Store) {
    let (a, b) = (agent("a"), agent("b"));
    let mut of_a = BTreeSet::new();
    for n in 0..4 {
        let t = started(&store, &a, 600).await;
        of_a.insert(t.id.lease_id());
        for _ in 0..n {
            of_a.insert(issued(&store, &t, 60).await.id);
        }
    }
    let tb = started(&store, &b, 600).await;
    issued(&store, &tb, 60).await;
    let by_agent = LeaseFilter {
        agent: Some(a.clone()),
        ..Default::default()
    };
    // Pages of 3 over 4 tasks of 1, 2, 3 and 4 leases: every page boundary
    // falls somewhere else in a task, and each lease comes exactly once.
    let got = collect_leases(&store, &by_agent, at(30)).await;
    assert_eq!(got.len(), of_a.len(), "{got:?}");
    assert_eq!(got.iter().cloned().collect::<BTreeSet<_>>(), of_a);
}

pub async fn list_tasks_filters_and_pages(store: Store) {
    let (a, b) = (agent("a"), agent("b"));
    let mut of_a = Vec::new();
    for _ in 0..5 {
        of_a.push(started(&store, &a, 600).await);
    }
    let tb = started(&store, &b, 600).await;
    store
        .end_task(&of_a[0].id, &complete(&of_a[0], at(1)))
        .await
        .unwrap();
    let now = at(2);

    let mut all = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .list_tasks(
                &TaskFilter::default(),
                &PageRequest { after, limit: 2 },
                now,
            )
            .await
            .unwrap();
        all.extend(page.items.into_iter().map(|r| r.task.id));
        match page.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    assert_eq!(all.len(), 6);
    assert_eq!(all.iter().collect::<BTreeSet<_>>().len(), 6);

    let page = |filter| {
        let store = store.clone();
        async move {
            store
                .list_tasks(
                    &filter,
                    &PageRequest {
                        after: None,
                        limit: 100,
                    },
                    now,
                )
                .await
                .unwrap()
                .items
        }
    };
    assert_eq!(
        page(TaskFilter {
            agent: Some(a.clone()),
            state: None,
            parent: None,
        })
        .await
        .len(),
        5
    );
    let completed = page(TaskFilter {
        agent: None,
        state: Some(TaskState::Completed),
        parent: None,
    })
    .await;
    assert_eq!(completed.len(), 1);
    assert_eq!(completed[0].task.id, of_a[0].id);
    let of_b = page(TaskFilter {
        agent: Some(b.clone()),
        state: Some(TaskState::Active),
        parent: None,
    })
    .await;
    assert_eq!(of_b.len(), 1);
    assert_eq!(of_b[0].task.id, tb.id);
}

pub async fn reap_expires_each_lease_exactly_once(store: Store) {
    let t = started(&store, &agent("a"), 100).await;
    let short = issued(&store, &t, 10).await;
    let revoked = issued(&store, &t, 10).await;
    let long = issued(&store, &t, 50).await;
    let req = revoke(
        RevocationReason::Operator,
        RevocationReason::Operator,
        at(2),
    );
    store.revoke_lease(&revoked.id, &req).await.unwrap();
    let retention = Duration::from_secs(3600);
    // The task, `short` and `long`; not the revoked one.
    assert_eq!(store.active_count().await.unwrap(), 3);

    assert!(
        store
            .reap(at(9), retention, 100)
            .await
            .unwrap()
            .expired
            .is_empty()
    );
    let first = store.reap(at(10), retention, 100).await.unwrap();
    assert_eq!(
        first.expired,
        vec![ExpiredLease {
            id: short.id.clone(),
            task_id: t.id.clone(),
            agent: agent("a"),
        }],
        "revoked leases are not expired; the task and owner are named"
    );
    assert!(
        store
            .reap(at(10), retention, 100)
            .await
            .unwrap()
            .expired
            .is_empty()
    );
    let stored = store.get_lease(&short.id).await.unwrap().unwrap();
    assert_eq!(stored.status, LeaseStatus::Expired);
    assert_eq!(store.active_count().await.unwrap(), 2);

    let later = store.reap(at(100), retention, 100).await.unwrap();
    let got: BTreeSet<_> = later.expired.into_iter().map(|e| e.id).collect();
    assert_eq!(got, [long.id.clone(), t.id.lease_id()].into());
    assert_eq!(
        store
            .get_task(&t.id)
            .await
            .unwrap()
            .unwrap()
            .state_at(at(100)),
        TaskState::Expired
    );
    assert_eq!(
        state(&store, &revoked.id, at(100)).await,
        LeaseState::Revoked
    );

    // A bounded pass leaves the rest for the next one.
    let t2 = started(&store, &agent("b"), 100).await;
    for _ in 0..5 {
        issued(&store, &t2, 20).await;
    }
    let a = store.reap(at(20), retention, 2).await.unwrap();
    let b = store.reap(at(20), retention, 100).await.unwrap();
    assert_eq!(a.expired.len(), 2);
    assert!(a.more, "a full pass says there may be more");
    assert_eq!(b.expired.len(), 3);
    assert!(!b.more);
    assert_eq!(store.active_count().await.unwrap(), 1, "t2 itself");
}

pub async fn the_active_count_follows_task_ends_and_expiry(store: Store) {
    let (t, u) = (
        started(&store, &agent("a"), 100).await,
        started(&store, &agent("a"), 100).await,
    );
    for _ in 0..5 {
        issued(&store, &t, 50).await;
    }
    for _ in 0..2 {
        issued(&store, &u, 50).await;
    }
    assert_eq!(store.active_count().await.unwrap(), 9);
    store.end_task(&t.id, &complete(&t, at(1))).await.unwrap();
    assert_eq!(store.active_count().await.unwrap(), 3, "u and its two");
    // Due entries that expire nothing (revoked credentials) still make a
    // full pass ask for another.
    let full = store
        .reap(at(50), Duration::from_secs(3600), 2)
        .await
        .unwrap();
    assert!(full.more);
    let retention = Duration::from_secs(3600);
    for _ in 0..2 {
        let out = store.reap(at(50), retention, 100).await.unwrap();
        assert!(out.expired.len() <= 2, "only u's credentials expire");
        assert_eq!(store.active_count().await.unwrap(), 1, "u itself");
    }
    store.reap(at(100), retention, 100).await.unwrap();
    assert_eq!(store.active_count().await.unwrap(), 0);
}

pub async fn reap_purges_after_retention(store: Store) {
    let t = started(&store, &agent("a"), 100).await;
    let l = issued(&store, &t, 10).await;
    let keep = started(&store, &agent("a"), 7200).await;
    let retention = Duration::from_secs(60);
    // Nothing goes before its own retention window has passed.
    let out = store.reap(at(69), retention, 100).await.unwrap();
    assert_eq!(out.purged, 0);
    assert!(store.get_lease(&l.id).await.unwrap().is_some());
    // After it, a credential may go on its own (embedded) or with its task
    // (Redis); the task stays until its own window has passed.
    store.reap(at(70), retention, 100).await.unwrap();
    store.reap(at(159), retention, 100).await.unwrap();
    assert!(store.get_task(&t.id).await.unwrap().is_some());
    let out = store.reap(at(160), retention, 100).await.unwrap();
    assert!(out.purged >= 1);
    assert!(store.get_lease(&l.id).await.unwrap().is_none());
    assert!(store.get_task(&t.id).await.unwrap().is_none());
    assert!(store.get_lease(&t.id.lease_id()).await.unwrap().is_none());
    let left = store
        .list_leases(
            &LeaseFilter::default(),
            &PageRequest {
                after: None,
                limit: 10,
            },
            at(160),
        )
        .await
        .unwrap();
    assert_eq!(left.items.len(), 1);
    assert_eq!(left.items[0].id, keep.id.lease_id());
}

pub async fn a_big_task_is_purged_over_several_passes(store: Store) {
    let t = started(&store, &agent("a"), 100).await;
    for _ in 0..25 {
        issued(&store, &t, 50).await;
    }
    let other = started(&store, &agent("a"), 7200).await;
    let retention = Duration::from_secs(60);
    // Ten records at most per pass: the task and its 25 credentials take
    // several passes, and then nothing of them is left.
    let mut passes = 0;
    while store.get_task(&t.id).await.unwrap().is_some() {
        let out = store.reap(at(160), retention, 10).await.unwrap();
        if store.get_task(&t.id).await.unwrap().is_some() {
            assert!(out.more, "a pass that left the task says so");
        }
        passes += 1;
        assert!(passes < 20, "the task was never purged");
    }
    let everything = store
        .list_leases(
            &LeaseFilter::default(),
            &PageRequest {
                after: None,
                limit: 100,
            },
            at(160),
        )
        .await
        .unwrap();
    assert_eq!(
        everything.items.iter().map(|l| &l.id).collect::<Vec<_>>(),
        vec![&other.id.lease_id()]
    );
}

pub async fn revocation_feed_is_ordered_and_resumable(store: Store) {
    let t = started(&store, &agent("a"), 600).await;
    let a = issued(&store, &t, 30).await;
    let b = issued(&store, &t, 500).await;
    let req = revoke(
        RevocationReason::Operator,
        RevocationReason::Operator,
        at(2),
    );
    store.revoke_lease(&a.id, &req).await.unwrap();
    store.end_task(&t.id, &complete(&t, at(3))).await.unwrap();

    let events = store.revocations_since(0, 100).await.unwrap();
    let ids: Vec<&LeaseId> = events.iter().map(|e| &e.lease_id).collect();
    assert_eq!(ids, vec![&a.id, &t.id.lease_id(), &b.id]);
    assert!(events.windows(2).all(|w| w[0].cursor < w[1].cursor));
    assert_eq!(events[0].revocation.reason, RevocationReason::Operator);
    assert_eq!(events[2].revocation.reason, RevocationReason::TaskCompleted);
    assert_eq!(events[0].expires_at, a.expires_at);
    assert_eq!(events[0].kind, Some(LeaseKind::Jwt));
    // A token's status-list index travels with its revocation, whether
    // the lease was revoked alone or with its task; a task has none.
    assert_eq!(events[0].status_idx, a.status_index());
    assert_eq!(events[2].status_idx, b.status_index());
    assert!(a.status_index().is_some() && events[1].status_idx.is_none());
    assert_eq!(events[0].serial, None);

    let rest = store
        .revocations_since(events[0].cursor, 100)
        .await
        .unwrap();
    assert_eq!(rest, events[1..].to_vec());
    assert_eq!(
        store
            .revocations_since(events[0].cursor, 1)
            .await
            .unwrap()
            .len(),
        1
    );

    // Events leave the feed only once their credential is long expired.
    store
        .reap(at(100), Duration::from_secs(60), 100)
        .await
        .unwrap();
    let kept = store.revocations_since(0, 100).await.unwrap();
    assert_eq!(kept, events[1..].to_vec());
    // Cursors are never reused.
    let t2 = started(&store, &agent("a"), 600).await;
    store
        .end_task(&t2.id, &complete(&t2, at(101)))
        .await
        .unwrap();
    let newest = store.revocations_since(0, 100).await.unwrap();
    assert!(newest.last().unwrap().cursor > events[2].cursor);
}

pub async fn feed_head_is_the_newest_cursor(store: Store) {
    assert_eq!(store.feed_head().await.unwrap(), 0);
    let t = started(&store, &agent("a"), 600).await;
    let l = issued(&store, &t, 60).await;
    let req = revoke(
        RevocationReason::Operator,
        RevocationReason::Operator,
        at(2),
    );
    store.revoke_lease(&l.id, &req).await.unwrap();
    let first = store.feed_head().await.unwrap();
    assert_eq!(
        first,
        store.revocations_since(0, 10).await.unwrap()[0].cursor
    );
    store.end_task(&t.id, &complete(&t, at(3))).await.unwrap();
    let head = store.feed_head().await.unwrap();
    assert!(head > first);
    assert!(store.revocations_since(head, 10).await.unwrap().is_empty());
}

pub async fn a_key_is_used_once_until_it_lapses(store: Store) {
    // Real time: Redis holds the record until its wall-clock expiry.
    let now = Timestamp::now();
    let until = now.plus(Duration::from_secs(60));
    assert!(store.first_use("jti-1", until, now).await.unwrap());
    assert!(!store.first_use("jti-1", until, now).await.unwrap());
    assert!(store.first_use("jti-2", until, now).await.unwrap());
    // Of many racing first uses, exactly one wins.
    let racers: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.first_use("race", until, now).await.unwrap() })
        })
        .collect();
    let mut wins = 0;
    for r in racers {
        wins += usize::from(r.await.unwrap());
    }
    assert_eq!(wins, 1);
    // A record whose time has passed holds nothing back.
    let soon = Timestamp::now().plus(Duration::from_millis(300));
    assert!(
        store
            .first_use("short", soon, Timestamp::now())
            .await
            .unwrap()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        store
            .first_use("short", until, Timestamp::now())
            .await
            .unwrap()
    );
    assert!(
        !store
            .first_use("short", until, Timestamp::now())
            .await
            .unwrap()
    );
}

fn approval(task: &Task, ttl: u64) -> Approval {
    Approval {
        id: ApprovalId::generate(),
        agent: task.agent.clone(),
        task_id: task.id.clone(),
        request: ApprovalRequest::Token {
            audience: Audience::new("https://api.example.com").unwrap(),
            scopes: parse_scopes(&["write"]).unwrap(),
            ttl_seconds: 0,
            bind: false,
            dpop_jkt: None,
        },
        policy_id: "needs-approval".into(),
        created_at: *T0,
        expires_at: at(ttl),
        status: ApprovalStatus::Pending,
    }
}

pub async fn approvals_are_decided_once_and_used_once(store: Store) {
    let t = started(&store, &agent("a"), 600).await;
    let a = approval(&t, 60);
    store.create_approval(&a).await.unwrap();
    assert!(matches!(
        store.create_approval(&a).await,
        Err(StoreError::Duplicate(_))
    ));
    assert_eq!(store.get_approval(&a.id).await.unwrap().unwrap(), a);
    let pending = store
        .list_approvals(
            true,
            &PageRequest {
                after: None,
                limit: 10,
            },
            at(1),
        )
        .await
        .unwrap();
    assert_eq!(pending.items.len(), 1);

    // Not usable before it is approved.
    assert!(matches!(
        store
            .consume_approval(&a.id, &t.agent, &t.id, &a.request, at(1))
            .await,
        Err(StoreError::ApprovalState(ApprovalState::Pending))
    ));
    let op = operator();
    let approved = store
        .decide_approval(
            &a.id,
            ApprovalStatus::Approved {
                by: op.clone(),
                at: at(2),
                reason: Some("change CHG-7".into()),
            },
            at(2),
        )
        .await
        .unwrap();
    assert_eq!(approved.state_at(at(2)), ApprovalState::Approved);
    // Decided once.
    assert!(matches!(
        store
            .decide_approval(
                &a.id,
                ApprovalStatus::Denied {
                    by: op.clone(),
                    at: at(3),
                    reason: None
                },
                at(3)
            )
            .await,
        Err(StoreError::ApprovalState(ApprovalState::Approved))
    ));
    assert!(
        store
            .list_approvals(
                true,
                &PageRequest {
                    after: None,
                    limit: 10
                },
                at(3)
            )
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert_eq!(
        store
            .list_approvals(
                false,
                &PageRequest {
                    after: None,
                    limit: 10
                },
                at(3)
            )
            .await
            .unwrap()
            .items
            .len(),
        1
    );

    // Only for exactly the request, by the same agent and task.
    let other_request = ApprovalRequest::Token {
        audience: Audience::new("https://api.example.com").unwrap(),
        scopes: parse_scopes(&["write", "admin"]).unwrap(),
        ttl_seconds: 0,
        bind: false,
        dpop_jkt: None,
    };
    assert!(matches!(
        store
            .consume_approval(&a.id, &t.agent, &t.id, &other_request, at(4))
            .await,
        Err(StoreError::ApprovalMismatch)
    ));
    assert!(matches!(
        store
            .consume_approval(&a.id, &agent("b"), &t.id, &a.request, at(4))
            .await,
        Err(StoreError::ApprovalNotFound)
    ));
    let used = store
        .consume_approval(&a.id, &t.agent, &t.id, &a.request, at(4))
        .await
        .unwrap();
    assert_eq!(used.state_at(at(4)), ApprovalState::Consumed);
    // The approver and their reason stay on record once it is used.
    assert_eq!(
        store.get_approval(&a.id).await.unwrap().unwrap().status,
        ApprovalStatus::Consumed {
            by: op.clone(),
            at: at(4),
            reason: Some("change CHG-7".into()),
        }
    );
    // Used once.
    assert!(matches!(
        store
            .consume_approval(&a.id, &t.agent, &t.id, &a.request, at(5))
            .await,
        Err(StoreError::ApprovalState(ApprovalState::Consumed))
    ));

    // Denied stays denied; expired cannot be decided or used.
    let d = approval(&t, 60);
    store.create_approval(&d).await.unwrap();
    store
        .decide_approval(
            &d.id,
            ApprovalStatus::Denied {
                by: op.clone(),
                at: at(6),
                reason: Some("no".into()),
            },
            at(6),
        )
        .await
        .unwrap();
    assert!(matches!(
        store
            .consume_approval(&d.id, &t.agent, &t.id, &d.request, at(7))
            .await,
        Err(StoreError::ApprovalState(ApprovalState::Denied))
    ));
    let late = approval(&t, 10);
    store.create_approval(&late).await.unwrap();
    assert!(matches!(
        store
            .decide_approval(
                &late.id,
                ApprovalStatus::Approved {
                    by: op.clone(),
                    at: at(10),
                    reason: None,
                },
                at(10)
            )
            .await,
        Err(StoreError::ApprovalState(ApprovalState::Expired))
    ));
    assert!(matches!(
        store
            .decide_approval(
                &ApprovalId::generate(),
                ApprovalStatus::Approved {
                    by: op,
                    at: at(1),
                    reason: None,
                },
                at(1)
            )
            .await,
        Err(StoreError::ApprovalNotFound)
    ));
    // Approvals are purged after their retention window.
    store
        .reap(at(200), Duration::from_secs(60), 100)
        .await
        .unwrap();
    assert!(store.get_approval(&a.id).await.unwrap().is_none());
}

pub async fn context_updates_bump_the_revision_and_fence_issuance(store: Store) {
    let t = started(&store, &agent("a"), 600).await;
    let before = lease(&t, 60);
    let ctx = TaskContext::new([("environment", "production")]).unwrap();
    let updated = store
        .update_task_context(&t.id, &t.agent, &ctx, at(1))
        .await
        .unwrap();
    assert_eq!(updated.revision, 1);
    assert_eq!(updated.context, ctx);
    let stored = store.get_task(&t.id).await.unwrap().unwrap().task;
    assert_eq!((stored.revision, stored.context), (1, ctx.clone()));
    // A credential decided on the old context is not recorded.
    assert!(matches!(
        store.issue(&before, at(2)).await,
        Err(StoreError::TaskChanged)
    ));
    let mut after = lease(&t, 60);
    after.task_revision = 1;
    store.issue(&after, at(2)).await.unwrap();
    // Only the owner, only while active.
    assert!(matches!(
        store
            .update_task_context(&t.id, &agent("b"), &ctx, at(3))
            .await,
        Err(StoreError::TaskNotFound)
    ));
    store.end_task(&t.id, &complete(&t, at(4))).await.unwrap();
    assert!(matches!(
        store
            .update_task_context(&t.id, &t.agent, &ctx, at(5))
            .await,
        Err(StoreError::TaskNotActive(TaskState::Completed))
    ));
}

pub async fn issue_racing_end_task_never_leaves_an_active_lease(store: Store) {
    for _round in 0..5 {
        let t = started(&store, &agent("racer"), 600).await;
        let mut issuers = Vec::new();
        for _ in 0..24 {
            let store = store.clone();
            let l = lease(&t, 60);
            issuers.push(tokio::spawn(async move {
                store.issue(&l, at(1)).await.map(|()| l.id)
            }));
        }
        tokio::task::yield_now().await;
        let ended = store.end_task(&t.id, &complete(&t, at(1))).await.unwrap();
        let mut ok = Vec::new();
        for h in issuers {
            match h.await.unwrap() {
                Ok(id) => ok.push(id),
                Err(StoreError::TaskNotActive(TaskState::Completed)) => {}
                Err(e) => panic!("unexpected error {e}"),
            }
        }
        for id in &ok {
            assert_eq!(state(&store, id, at(2)).await, LeaseState::Revoked, "{id}");
            assert!(ended.contains(id));
        }
        let active = LeaseFilter {
            task: Some(t.id.clone()),
            state: Some(LeaseState::Active),
            ..Default::default()
        };
        let page = store
            .list_leases(
                &active,
                &PageRequest {
                    after: None,
                    limit: 100,
                },
                at(2),
            )
            .await
            .unwrap();
        assert!(page.items.is_empty());
    }
}

pub async fn revoked_lease_never_becomes_active(store: Store) {
    let t = started(&store, &agent("a"), 600).await;
    let l = issued(&store, &t, 60).await;
    let req = revoke(
        RevocationReason::Operator,
        RevocationReason::Operator,
        at(2),
    );
    store.revoke_lease(&l.id, &req).await.unwrap();
    assert!(matches!(
        store.issue(&l, at(3)).await,
        Err(StoreError::Duplicate(_))
    ));
    store
        .reap(at(61), Duration::from_secs(3600), 100)
        .await
        .unwrap();
    let after = store.get_lease(&l.id).await.unwrap().unwrap();
    assert_eq!(after.state_at(at(61)), LeaseState::Revoked);
    assert_eq!(
        after.revocation().unwrap().reason,
        RevocationReason::Operator
    );
}

pub async fn delegated_tasks_need_a_live_parent_of_the_delegator(store: Store) {
    let parent = task(&agent("a"), 100);
    store.start_task(&parent).await.unwrap();

    // No such parent; a parent the delegator does not own.
    let mut orphan = child(&parent, &agent("b"), 1, 50);
    orphan.parent = Some(TaskId::generate());
    assert!(matches!(
        store.start_task(&orphan).await,
        Err(StoreError::TaskNotFound)
    ));
    let mut forged = child(&parent, &agent("b"), 1, 50);
    forged.delegated_by = vec![agent("c")];
    assert!(matches!(
        store.start_task(&forged).await,
        Err(StoreError::TaskNotFound)
    ));
    // Outliving the parent.
    assert!(matches!(
        store.start_task(&child(&parent, &agent("b"), 1, 101)).await,
        Err(StoreError::OutlivesTask)
    ));
    // Refused attempts leave nothing behind.
    for t in [&orphan, &forged] {
        assert!(store.get_task(&t.id).await.unwrap().is_none());
    }

    let ok = child(&parent, &agent("b"), 1, 100);
    store.start_task(&ok).await.unwrap();
    let got = store.get_task(&ok.id).await.unwrap().unwrap();
    assert_eq!(got.task, ok);
    let children = store
        .list_tasks(
            &TaskFilter {
                parent: Some(parent.id.clone()),
                ..Default::default()
            },
            &PageRequest {
                after: None,
                limit: 10,
            },
            at(2),
        )
        .await
        .unwrap();
    assert_eq!(
        children
            .items
            .iter()
            .map(|r| &r.task.id)
            .collect::<Vec<_>>(),
        vec![&ok.id]
    );

    // Under an ended parent.
    store
        .end_task(&parent.id, &complete(&parent, at(3)))
        .await
        .unwrap();
    assert!(matches!(
        store.start_task(&child(&parent, &agent("b"), 4, 50)).await,
        Err(StoreError::TaskNotActive(TaskState::Completed))
    ));
}

pub async fn ending_a_task_ends_its_whole_subtree(store: Store) {
    // a -> b -> c, with a credential under each, and an unrelated task.
    let a = task(&agent("a"), 100);
    let b = child(&a, &agent("b"), 1, 90);
    let c = child(&b, &agent("c"), 2, 80);
    let other = task(&agent("a"), 100);
    for t in [&a, &b, &c, &other] {
        store.start_task(t).await.unwrap();
    }
    let mut leases = Vec::new();
    for t in [&a, &b, &c, &other] {
        let l = lease(t, 60);
        store.issue(&l, at(3)).await.unwrap();
        leases.push(l);
    }
    let head = store.feed_head().await.unwrap();

    // Revoking b's task lease ends b and c, not a.
    let revoked = store
        .revoke_lease(
            &b.id.lease_id(),
            &revoke(
                RevocationReason::TaskRevoked,
                RevocationReason::TaskRevoked,
                at(4),
            ),
        )
        .await
        .unwrap();
    let expect: BTreeSet<LeaseId> = [
        b.id.lease_id(),
        leases[1].id.clone(),
        c.id.lease_id(),
        leases[2].id.clone(),
    ]
    .into();
    assert_eq!(revoked.iter().cloned().collect::<BTreeSet<_>>(), expect);
    assert_eq!(revoked[0], b.id.lease_id(), "the task's own lease first");
    let reason = |l: Lease| match l.status {
        LeaseStatus::Revoked(r) => Some(r.reason),
        _ => None,
    };
    let get = |id: LeaseId| {
        let store = store.clone();
        async move { store.get_lease(&id).await.unwrap().unwrap() }
    };
    assert_eq!(
        reason(get(b.id.lease_id()).await),
        Some(RevocationReason::TaskRevoked)
    );
    assert_eq!(
        reason(get(leases[1].id.clone()).await),
        Some(RevocationReason::TaskRevoked)
    );
    assert_eq!(
        reason(get(c.id.lease_id()).await),
        Some(RevocationReason::ParentRevoked)
    );
    assert_eq!(
        reason(get(leases[2].id.clone()).await),
        Some(RevocationReason::ParentRevoked)
    );
    assert!(get(a.id.lease_id()).await.is_active_at(at(4)));
    assert!(get(leases[0].id.clone()).await.is_active_at(at(4)));
    // The feed carries every one of them.
    let events = store.revocations_since(head, 100).await.unwrap();
    assert_eq!(
        events
            .iter()
            .map(|e| e.lease_id.clone())
            .collect::<BTreeSet<_>>(),
        expect
    );

    // A new grandchild under a; completing a ends it and a's own, once.
    let b2 = child(&a, &agent("b"), 5, 90);
    let c2 = child(&b2, &agent("c"), 5, 90);
    store.start_task(&b2).await.unwrap();
    store.start_task(&c2).await.unwrap();
    let l2 = lease(&c2, 60);
    store.issue(&l2, at(5)).await.unwrap();
    let revoked = store.end_task(&a.id, &complete(&a, at(6))).await.unwrap();
    assert_eq!(
        revoked.iter().cloned().collect::<BTreeSet<_>>(),
        BTreeSet::from([
            a.id.lease_id(),
            leases[0].id.clone(),
            b2.id.lease_id(),
            c2.id.lease_id(),
            l2.id.clone(),
        ])
    );
    assert_eq!(
        reason(get(l2.id.clone()).await),
        Some(RevocationReason::ParentRevoked)
    );
    assert_eq!(
        store
            .get_task(&c2.id)
            .await
            .unwrap()
            .unwrap()
            .state_at(at(6)),
        TaskState::Revoked
    );
    assert!(
        get(leases[3].id.clone()).await.is_active_at(at(6)),
        "unrelated task untouched"
    );

    // Revoking an agent ends its delegated tasks' subtrees too.
    let x = task(&agent("x"), 100);
    let y = child(&x, &agent("y"), 7, 90);
    let z = child(&y, &agent("z"), 7, 90);
    for t in [&x, &y, &z] {
        store.start_task(t).await.unwrap();
    }
    let revoked = store
        .revoke_agent(
            &agent("y"),
            &revoke(
                RevocationReason::AgentRevoked,
                RevocationReason::AgentRevoked,
                at(8),
            ),
        )
        .await
        .unwrap();
    assert_eq!(
        revoked.iter().cloned().collect::<BTreeSet<_>>(),
        BTreeSet::from([y.id.lease_id(), z.id.lease_id()])
    );
    assert!(get(x.id.lease_id()).await.is_active_at(at(8)));
}

/// Every line of `trail`, checked as one intact chain from genesis, and the
/// lease each record names.
async fn trail_leases(trail: &dyn AuditSink) -> Vec<Option<String>> {
    trail_records(trail)
        .await
        .into_iter()
        .map(|r| r.lease_id)
        .collect()
}

/// Every record of `trail`, checked as one intact chain from genesis.
async fn trail_records(trail: &dyn AuditSink) -> Vec<AuditRecord> {
    let mut lines = Vec::new();
    let mut cursor = String::new();
    loop {
        let (page, next) = trail.read(&cursor, 500).await.unwrap();
        if page.is_empty() {
            break;
        }
        lines.extend(page);
        cursor = next;
    }
    if !lines.is_empty() {
        let v = verify(lines.iter().cloned().map(Ok::<_, String>)).unwrap();
        assert_eq!((v.first_seq, v.records), (1, lines.len() as u64));
    }
    lines
        .iter()
        .map(|l| serde_json::from_str::<AuditRecord>(l).unwrap())
        .collect()
}

fn issued_record(lease: &Lease) -> AuditRecord {
    AuditRecord::new(Event::TokenIssued, &lease.agent).lease(&lease.id)
}

fn broker() -> SpiffeId {
    SpiffeId::new("spiffe://example.org/mayfly/broker").unwrap()
}

/// One batch mixing a record without a lease, leases the store takes and
/// one it refuses: the refused one fails alone (its record is not written
/// either), every other record is in the trail in order, in one chain, and
/// every other lease is in the store.
pub async fn record_writes_each_lease_with_its_record_or_neither(backend: Backend) {
    let Backend { store, .. } = backend;
    let trail = store.trail();
    let live = started(&store, &agent("a"), 600).await;
    let ended = started(&store, &agent("a"), 600).await;
    store
        .end_task(&ended.id, &complete(&ended, at(1)))
        .await
        .unwrap();
    let (first, refused, last) = (lease(&live, 60), lease(&ended, 60), lease(&live, 60));
    let mut locked = lease(&live, 60);
    locked.agent = agent("b");
    let records = vec![
        AuditRecord::new(Event::TaskStarted, &live.agent),
        issued_record(&first),
        issued_record(&refused),
        issued_record(&locked),
        issued_record(&last),
    ];
    let write = |l: &Lease| {
        Some(LeaseWrite::Credential {
            lease: l.clone(),
            now: at(2),
        })
    };
    let leases = vec![
        None,
        write(&first),
        write(&refused),
        write(&locked),
        write(&last),
    ];
    let by = broker();
    let batch = RecordBatch {
        records: &records,
        leases: &leases,
        undo_by: &by,
    };
    let outcomes = store.record(&batch).await;
    assert_eq!(outcomes.len(), 5);
    assert!(
        outcomes[0].is_ok() && outcomes[1].is_ok() && outcomes[4].is_ok(),
        "{outcomes:?}"
    );
    assert!(
        matches!(
            outcomes[2],
            Err(RecordError::Store(StoreError::TaskNotActive(
                TaskState::Completed
            )))
        ),
        "{:?}",
        outcomes[2]
    );
    assert!(
        matches!(
            outcomes[3],
            Err(RecordError::Store(StoreError::TaskNotFound))
        ),
        "{:?}",
        outcomes[3]
    );
    assert_eq!(
        trail_leases(&*trail).await,
        [None, Some(first.id.to_string()), Some(last.id.to_string())]
    );
    for l in [&first, &last] {
        assert_eq!(state(&store, &l.id, at(3)).await, LeaseState::Active);
    }
    for l in [&refused, &locked] {
        assert!(store.get_lease(&l.id).await.unwrap().is_none());
    }

    // The same lease again: refused as a duplicate, nothing more written.
    let again = [issued_record(&first)];
    let leases = [write(&first)];
    let batch = RecordBatch {
        records: &again,
        leases: &leases,
        undo_by: &by,
    };
    let outcomes = store.record(&batch).await;
    assert!(
        matches!(
            outcomes[..],
            [Err(RecordError::Store(StoreError::Duplicate(_)))]
        ),
        "{outcomes:?}"
    );
    assert_eq!(trail_leases(&*trail).await.len(), 3);
}

/// Tasks opened through `record`: each new task (its task and task lease)
/// is written with its record, a refused one (a duplicate, a child of an
/// ended parent, a locked agent's) fails alone with neither, and a child
/// written this way still ends with its parent. On a trail that fails, no
/// task of the batch is left active: each is ended as `task_revoked`.
pub async fn record_opens_each_task_with_its_record_or_neither(backend: Backend) {
    let Backend { store, failing } = backend;
    let trail = store.trail();
    let parent = started(&store, &agent("a"), 600).await;
    let ended = started(&store, &agent("a"), 600).await;
    store
        .end_task(&ended.id, &complete(&ended, at(1)))
        .await
        .unwrap();
    let lock = AgentLock {
        agent: agent("c"),
        by: operator(),
        reason: "contract".into(),
        at: at(0),
        expires_at: None,
    };
    store
        .lock_agent(
            &lock,
            &revoke(
                RevocationReason::AgentRevoked,
                RevocationReason::AgentRevoked,
                at(0),
            ),
        )
        .await
        .unwrap();
    let (root, kid) = (task(&agent("a"), 600), child(&parent, &agent("b"), 2, 300));
    let (orphan, locked) = (child(&ended, &agent("b"), 2, 300), task(&agent("c"), 600));
    let credential = lease(&parent, 60);
    let opened = |t: &Task| AuditRecord::new(Event::TaskStarted, &t.agent).task(t);
    let records = [
        opened(&root),
        opened(&kid),
        opened(&parent),
        opened(&orphan),
        opened(&locked),
        issued_record(&credential),
    ];
    let leases = [
        Some(LeaseWrite::Task(root.clone())),
        Some(LeaseWrite::Task(kid.clone())),
        Some(LeaseWrite::Task(parent.clone())),
        Some(LeaseWrite::Task(orphan.clone())),
        Some(LeaseWrite::Task(locked.clone())),
        Some(LeaseWrite::Credential {
            lease: credential.clone(),
            now: at(2),
        }),
    ];
    let by = broker();
    let batch = RecordBatch {
        records: &records,
        leases: &leases,
        undo_by: &by,
    };
    let outcomes = store.record(&batch).await;
    assert!(
        matches!(
            &outcomes[..],
            [
                Ok(()),
                Ok(()),
                Err(RecordError::Store(StoreError::Duplicate(_))),
                Err(RecordError::Store(StoreError::TaskNotActive(
                    TaskState::Completed
                ))),
                Err(RecordError::Store(StoreError::AgentLocked)),
                Ok(()),
            ]
        ),
        "{outcomes:?}"
    );
    let written: Vec<(Option<String>, Option<String>)> = trail_records(&*trail)
        .await
        .into_iter()
        .map(|r| (r.task_id, r.lease_id))
        .collect();
    assert_eq!(
        written,
        [
            (Some(root.id.to_string()), None),
            (Some(kid.id.to_string()), None),
            (None, Some(credential.id.to_string())),
        ]
    );
    for t in [&root, &kid] {
        let got = store.get_task(&t.id).await.unwrap().expect("task written");
        assert_eq!(&got.task, t);
        assert_eq!(got.state_at(at(3)), TaskState::Active);
    }
    for t in [&orphan, &locked] {
        assert!(store.get_task(&t.id).await.unwrap().is_none());
        assert!(store.get_lease(&t.id.lease_id()).await.unwrap().is_none());
    }
    let ended_with_parent = store
        .end_task(&parent.id, &complete(&parent, at(4)))
        .await
        .unwrap();
    assert!(
        ended_with_parent.contains(&kid.id.lease_id()),
        "{ended_with_parent:?}"
    );

    // A trail that fails: the task is not left active.
    let lost = task(&agent("a"), 600);
    let records = [opened(&lost)];
    let leases = [Some(LeaseWrite::Task(lost.clone()))];
    let batch = RecordBatch {
        records: &records,
        leases: &leases,
        undo_by: &by,
    };
    let outcomes = failing.record(&batch).await;
    assert!(
        matches!(outcomes[..], [Err(RecordError::Audit(_))]),
        "{outcomes:?}"
    );
    // Written, then ended again by the broker as any unseen task is.
    let got = failing
        .get_task(&lost.id)
        .await
        .unwrap()
        .expect("task written");
    assert_ne!(
        got.state_at(at(5)),
        TaskState::Active,
        "unrecorded task left active"
    );
    match &got.status {
        LeaseStatus::Revoked(r) => {
            assert_eq!(r.reason, RevocationReason::TaskRevoked);
            assert_eq!(r.by, by);
        }
        other => panic!("unrecorded task left {other:?}"),
    }
}

/// Many requests through the broker's recorder at once, half of them under
/// a task that ends meanwhile: every credential answered `Ok` has its
/// lease and its record, every other has neither (or, issued before the
/// task ended, a lease the end revoked with the rest), and the trail is one
/// chain.
pub async fn concurrent_records_keep_leases_and_trail_in_step(backend: Backend) {
    let Backend { store, .. } = backend;
    let trail = store.trail();
    let live = started(&store, &agent("a"), 600).await;
    let ending = started(&store, &agent("a"), 600).await;
    let recorder = Recorder::start(store.clone(), broker(), None);
    let mut writers = Vec::new();
    for i in 0..200 {
        let t = if i % 2 == 0 {
            live.clone()
        } else {
            ending.clone()
        };
        let recorder = recorder.clone();
        writers.push(tokio::spawn(async move {
            let l = lease(&t, 60);
            let got = recorder
                .record_issued(issued_record(&l), l.clone(), at(2))
                .await;
            (l, got)
        }));
        if i == 100 {
            store
                .end_task(&ending.id, &complete(&ending, at(2)))
                .await
                .unwrap();
        }
    }
    let (mut ok, mut refused) = (BTreeSet::new(), 0);
    for w in writers {
        match w.await.unwrap() {
            (l, Ok(())) => {
                ok.insert(l.id.to_string());
            }
            (l, Err(RecordError::Store(StoreError::TaskNotActive(TaskState::Completed)))) => {
                assert_eq!(l.task_id, ending.id);
                assert!(store.get_lease(&l.id).await.unwrap().is_none());
                refused += 1;
            }
            (_, Err(e)) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!(ok.len() + refused, 200);
    assert!(
        ok.len() >= 100,
        "every lease under the live task is recorded"
    );
    let recorded: BTreeSet<String> = trail_leases(&*trail).await.into_iter().flatten().collect();
    assert_eq!(
        recorded, ok,
        "the trail holds exactly the credentials handed out"
    );
    for id in &ok {
        let l = store
            .get_lease(&LeaseId::new(id).unwrap())
            .await
            .unwrap()
            .unwrap();
        let want = if l.task_id == live.id {
            LeaseState::Active
        } else {
            LeaseState::Revoked
        };
        assert_eq!(l.state_at(at(3)), want, "{id}");
    }
}

/// A trail that takes nothing.
#[derive(Debug)]
struct Unwritable;

#[async_trait::async_trait]
impl AuditSink for Unwritable {
    async fn append(&self, _: &[AuditRecord]) -> Result<(), AuditError> {
        Err(AuditError::Failed(mayfly_broker::Cause::msg("disk full")))
    }

    async fn read(&self, _: &str, _: usize) -> Result<(Vec<String>, String), AuditError> {
        Ok((Vec::new(), String::new()))
    }

    async fn cursor_before_last(&self, _: usize) -> Result<String, AuditError> {
        Ok(String::new())
    }
}

/// A trail that fails: every record fails for it, and no lease of the
/// batch is left active (each was written, then revoked by the broker, or
/// never written); a refused lease still fails for its own reason.
pub async fn a_failed_trail_leaves_no_active_lease(backend: Backend) {
    let store = backend.failing;
    let live = started(&store, &agent("a"), 600).await;
    let (one, two) = (lease(&live, 60), lease(&live, 60));
    let mut foreign = lease(&live, 60);
    foreign.agent = agent("b");
    let records = [
        issued_record(&one),
        issued_record(&foreign),
        issued_record(&two),
    ];
    let write = |l: &Lease| {
        Some(LeaseWrite::Credential {
            lease: l.clone(),
            now: at(2),
        })
    };
    let leases = [write(&one), write(&foreign), write(&two)];
    let by = broker();
    let batch = RecordBatch {
        records: &records,
        leases: &leases,
        undo_by: &by,
    };
    let outcomes = store.record(&batch).await;
    assert!(
        matches!(outcomes[0], Err(RecordError::Audit(_))),
        "{outcomes:?}"
    );
    assert!(
        matches!(
            outcomes[1],
            Err(RecordError::Store(StoreError::TaskNotFound))
        ),
        "{outcomes:?}"
    );
    assert!(
        matches!(outcomes[2], Err(RecordError::Audit(_))),
        "{outcomes:?}"
    );
    for l in [&one, &two] {
        if let Some(stored) = store.get_lease(&l.id).await.unwrap() {
            match &stored.status {
                LeaseStatus::Revoked(r) => assert_eq!(r.by, by),
                other => panic!("unrecorded lease left {other:?}"),
            }
        }
    }
    assert!(store.get_lease(&foreign.id).await.unwrap().is_none());
}

/// A held database login is listed until it is released, once; holding
/// it again replaces it; releasing one that is not held changes nothing.
pub async fn held_logins_stay_until_released(store: Store) {
    assert!(store.held_logins().await.unwrap().is_empty());
    let hold = |user: &str| HeldLogin {
        lease_id: LeaseId::generate(),
        database: "postgres://orders".into(),
        user: user.into(),
        held_at: Timestamp::from_secs(1_000),
    };
    let (a, b) = (hold("mayfly_a"), hold("mayfly_b"));
    store.hold_login(&a).await.unwrap();
    store.hold_login(&b).await.unwrap();
    store.hold_login(&a).await.unwrap();
    let mut expected = vec![a.clone(), b.clone()];
    expected.sort_by(|x, y| x.lease_id.as_str().cmp(y.lease_id.as_str()));
    assert_eq!(store.held_logins().await.unwrap(), expected);
    assert!(store.is_held(&a.lease_id).await.unwrap());
    store.release_login(&a.lease_id).await.unwrap();
    store.release_login(&a.lease_id).await.unwrap();
    store.release_login(&LeaseId::generate()).await.unwrap();
    assert!(!store.is_held(&a.lease_id).await.unwrap());
    assert!(store.is_held(&b.lease_id).await.unwrap());
    assert_eq!(store.held_logins().await.unwrap(), vec![b]);
}

pub async fn status_indexes_are_never_handed_out_twice(store: Store) {
    assert_eq!(store.status_indexes_reserved().await.unwrap(), 0);
    let first = store.reserve_status_indexes(10).await.unwrap();
    assert_eq!(first, 0);
    assert_eq!(store.status_indexes_reserved().await.unwrap(), 10);
    // Replicas reserving at once get disjoint blocks.
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let store = store.clone();
        tasks.spawn(async move { store.reserve_status_indexes(100).await.unwrap() });
    }
    let mut starts: Vec<u64> = tasks.join_all().await;
    starts.sort_unstable();
    assert!(starts.windows(2).all(|w| w[1] >= w[0] + 100), "{starts:?}");
    assert!(starts[0] >= 10);
    assert_eq!(store.status_indexes_reserved().await.unwrap(), 810);
}

pub async fn signal_streams_are_kept_with_their_progress(store: Store) {
    assert!(store.all_streams().await.unwrap().is_empty());
    assert_eq!(store.get_stream("s1").await.unwrap(), None);
    store.put_stream("s1", r#"{"v":1}"#).await.unwrap();
    store.put_stream("s2", r#"{"v":2}"#).await.unwrap();
    store.put_stream("s1", r#"{"v":3}"#).await.unwrap();
    assert_eq!(
        store.get_stream("s1").await.unwrap().as_deref(),
        Some(r#"{"v":3}"#)
    );
    let mut all = store.all_streams().await.unwrap();
    all.sort();
    assert_eq!(all, vec![r#"{"v":2}"#.to_owned(), r#"{"v":3}"#.to_owned()]);
    assert_eq!(store.stream_progress("s1").await.unwrap(), None);
    store
        .save_stream_progress("s1", r#"{"floor":7}"#)
        .await
        .unwrap();
    assert_eq!(
        store.stream_progress("s1").await.unwrap().as_deref(),
        Some(r#"{"floor":7}"#)
    );
    // Deleting a stream takes its progress with it, and no other's.
    store
        .save_stream_progress("s2", r#"{"floor":9}"#)
        .await
        .unwrap();
    store.delete_stream("s1").await.unwrap();
    assert_eq!(store.get_stream("s1").await.unwrap(), None);
    assert_eq!(store.stream_progress("s1").await.unwrap(), None);
    assert!(store.stream_progress("s2").await.unwrap().is_some());
    store.delete_stream("s1").await.unwrap();
}
