//! Approvals: created pending, decided once, consumed once for exactly the
//! request they cover.

use crate::store::ApprovalStore;
use mayfly_core::{
    Approval, ApprovalId, ApprovalRequest, ApprovalState, ApprovalStatus, SpiffeId, TaskId,
    Timestamp,
};

use super::codec::{ApprovalFields, approval_from, approval_status, encode};
use super::scripts::Repeat;
use super::{CHUNK, RedisStore};
use crate::cause::Cause;
use crate::store::{Page, PageRequest, StoreError, check_consumable};

pub(super) async fn create_approval(store: &RedisStore, a: &Approval) -> Result<(), StoreError> {
    let key = store.keys.approval(a.id.as_str());
    let (body, status, request) = (encode(a)?, encode(&a.status)?, encode(&a.request)?);
    let state = match a.status {
        ApprovalStatus::Pending => "pending",
        _ => {
            return Err(StoreError::Corrupt(Cause::msg(
                "a new approval must be pending",
            )));
        }
    };
    let keep = store.keep_until(a.expires_at);
    let mut pipe = redis::pipe();
    pipe.atomic()
        .cmd("HSETNX")
        .arg(&key)
        .arg("body")
        .arg(&body)
        .cmd("HSET")
        .arg(&key)
        .arg("state")
        .arg(state)
        .arg("status")
        .arg(&status)
        .arg("exp")
        .arg(a.expires_at.as_millis())
        .arg("agent")
        .arg(a.agent.as_str())
        .arg("task")
        .arg(a.task_id.as_str())
        .arg("request")
        .arg(&request)
        .ignore()
        .cmd("PEXPIREAT")
        .arg(&key)
        .arg(keep)
        .ignore()
        .cmd("ZADD")
        .arg(store.keys.approvals())
        .arg(0)
        .arg(a.id.as_str())
        .ignore()
        .cmd("ZADD")
        .arg(store.keys.approval_expiry())
        .arg(a.expires_at.as_millis())
        .arg(a.id.as_str())
        .ignore();
    let (created,): (i64,) = store
        .conn
        .run(|mut c| async move { pipe.query_async(&mut c).await })
        .await?;
    if created == 0 {
        return Err(StoreError::Duplicate(a.id.to_string()));
    }
    Ok(())
}

pub(super) async fn get_approval(
    store: &RedisStore,
    id: &ApprovalId,
) -> Result<Option<Approval>, StoreError> {
    let key = store.keys.approval(id.as_str());
    let fields: ApprovalFields = store
        .conn
        .run(|mut c| async move {
            redis::cmd("HMGET")
                .arg(&key)
                .arg(&["body", "status"])
                .query_async(&mut c)
                .await
        })
        .await?;
    approval_from(fields)
}

pub(super) async fn list_approvals(
    store: &RedisStore,
    pending_only: bool,
    page: &PageRequest,
    now: Timestamp,
) -> Result<Page<Approval>, StoreError> {
    let limit = page.limit.max(1);
    let mut items = Vec::new();
    let mut after = page.after.clone();
    loop {
        let ids = store
            .members_after(&store.keys.approvals(), after.as_deref(), true, CHUNK)
            .await?;
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("HMGET")
                .arg(store.keys.approval(id))
                .arg(&["body", "status"]);
        }
        let rows: Vec<ApprovalFields> = if ids.is_empty() {
            Vec::new()
        } else {
            store
                .conn
                .run(|mut c| async move { pipe.query_async(&mut c).await })
                .await?
        };
        for (id, row) in ids.iter().zip(rows) {
            after = Some(id.clone());
            if let Some(a) = approval_from(row)?
                && (!pending_only || a.state_at(now) == ApprovalState::Pending)
            {
                items.push(a);
                if items.len() >= limit {
                    return Ok(Page { items, next: after });
                }
            }
        }
        if ids.len() < CHUNK {
            return Ok(Page { items, next: None });
        }
    }
}

pub(super) async fn decide_approval(
    store: &RedisStore,
    id: &ApprovalId,
    decision: ApprovalStatus,
    now: Timestamp,
) -> Result<Approval, StoreError> {
    let state = match &decision {
        ApprovalStatus::Approved { .. } => "approved",
        ApprovalStatus::Denied { .. } => "denied",
        _ => {
            return Err(StoreError::Corrupt(Cause::msg(
                "a decision approves or denies",
            )));
        }
    };
    let mut inv = store.scripts.approval_decide.prepare_invoke();
    inv.key(store.keys.approval(id.as_str()))
        .arg(now.as_millis())
        .arg(state)
        .arg(encode(&decision)?);
    let reply: String = store.invoke(&inv, Repeat::Once).await?;
    approval_status(&reply)?;
    store
        .get_approval(id)
        .await?
        .ok_or(StoreError::ApprovalNotFound)
}

pub(super) async fn consume_approval(
    store: &RedisStore,
    id: &ApprovalId,
    agent: &SpiffeId,
    task: &TaskId,
    request: &ApprovalRequest,
    now: Timestamp,
) -> Result<Approval, StoreError> {
    // The consumed status names the approver, read first; the script
    // then checks the approval is still approved before using it.
    let current = store
        .get_approval(id)
        .await?
        .ok_or(StoreError::ApprovalNotFound)?;
    let consumed = check_consumable(&current, agent, task, request, now)?;
    let mut inv = store.scripts.approval_consume.prepare_invoke();
    inv.key(store.keys.approval(id.as_str()))
        .arg(now.as_millis())
        .arg(agent.as_str())
        .arg(task.as_str())
        .arg(encode(request)?)
        .arg(encode(&consumed)?);
    let reply: String = store.invoke(&inv, Repeat::Once).await?;
    approval_status(&reply)?;
    Ok(Approval {
        status: consumed,
        ..current
    })
}
