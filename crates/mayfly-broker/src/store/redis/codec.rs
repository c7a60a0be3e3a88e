//! Records to and from what Redis holds: JSON bodies, hash fields, script
//! status replies and feed entries.

use mayfly_core::{
    Approval, ApprovalState, Lease, LeaseId, LeaseKind, LeaseStatus, Revocation, TaskId, TaskState,
    Timestamp,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::keys::cursor_of;
use crate::cause::Cause;
use crate::store::{RevocationEvent, StoreError};

pub(super) fn encode<T: Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Corrupt(Cause::of(e)))
}

pub(super) fn decode<T: DeserializeOwned>(s: &str) -> Result<T, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(Cause::of(e)))
}

/// Maps a script's status reply.
pub(super) fn script_status(reply: &str) -> Result<(), StoreError> {
    match reply {
        "OK" => Ok(()),
        "NOTFOUND" => Err(StoreError::TaskNotFound),
        "DUPLICATE" => Err(StoreError::Duplicate("lease or task".into())),
        "OUTLIVES" => Err(StoreError::OutlivesTask),
        "CHANGED" => Err(StoreError::TaskChanged),
        "MISMATCH" => Err(StoreError::ApprovalMismatch),
        "LOCKED" => Err(StoreError::AgentLocked),
        "BROKEN" => Err(StoreError::Corrupt(Cause::msg(
            "a key the script writes holds another type: the store's keys were changed by hand",
        ))),
        other => match other.strip_prefix("STATE:") {
            Some(state) => Err(StoreError::TaskNotActive(parse_task_state(state)?)),
            None => Err(StoreError::Corrupt(Cause::msg(format!(
                "unexpected script reply {other:?}"
            )))),
        },
    }
}

pub(super) fn parse_approval_state(s: &str) -> Result<ApprovalState, StoreError> {
    Ok(match s {
        "pending" => ApprovalState::Pending,
        "approved" => ApprovalState::Approved,
        "denied" => ApprovalState::Denied,
        "consumed" => ApprovalState::Consumed,
        "expired" => ApprovalState::Expired,
        other => {
            return Err(StoreError::Corrupt(Cause::msg(format!(
                "approval state {other:?}"
            ))));
        }
    })
}

/// Maps an approval script's reply.
pub(super) fn approval_status(reply: &str) -> Result<(), StoreError> {
    match reply {
        "OK" => Ok(()),
        "NOTFOUND" => Err(StoreError::ApprovalNotFound),
        "MISMATCH" => Err(StoreError::ApprovalMismatch),
        other => match other.strip_prefix("STATE:") {
            Some(state) => Err(StoreError::ApprovalState(parse_approval_state(state)?)),
            None => Err(StoreError::Corrupt(Cause::msg(format!(
                "unexpected script reply {other:?}"
            )))),
        },
    }
}

/// An approval hash as fetched: body and current status.
pub(super) type ApprovalFields = (Option<String>, Option<String>);

pub(super) fn approval_from(fields: ApprovalFields) -> Result<Option<Approval>, StoreError> {
    let (Some(body), Some(status)) = fields else {
        return Ok(None);
    };
    let mut a: Approval = decode(&body)?;
    a.status = decode(&status)?;
    Ok(Some(a))
}

pub(super) fn parse_task_state(s: &str) -> Result<TaskState, StoreError> {
    s.parse()
        .map_err(|e: String| StoreError::Corrupt(Cause::msg(format!("task state: {e}"))))
}

/// A lease hash as fetched: body, state, revocation.
pub(super) type LeaseFields = (Option<String>, Option<String>, Option<String>);

/// Rebuilds a lease from its hash fields; `None` if the hash is gone.
pub(super) fn lease_from(fields: LeaseFields) -> Result<Option<Lease>, StoreError> {
    let (Some(body), Some(state)) = (fields.0, fields.1) else {
        return Ok(None);
    };
    let mut lease: Lease = decode(&body)?;
    lease.status = match state.as_str() {
        "active" => LeaseStatus::Active,
        "expired" => LeaseStatus::Expired,
        "revoked" => {
            let rev = fields.2.ok_or_else(|| {
                StoreError::Corrupt(Cause::msg("revoked lease without revocation"))
            })?;
            LeaseStatus::Revoked(decode(&rev)?)
        }
        other => {
            return Err(StoreError::Corrupt(Cause::msg(format!(
                "lease state {other:?}"
            ))));
        }
    };
    Ok(Some(lease))
}

pub(super) fn corrupt(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Corrupt(Cause::of(e))
}

/// What a lease hash's and a feed event's `serial` field hold: the
/// credential's entry in a revocation list, a certificate's serial or a
/// token's status-list index ("" for neither).
pub(super) fn list_entry(lease: &Lease) -> String {
    match (lease.serial(), lease.status_index()) {
        (Some(serial), _) => serial.to_owned(),
        (None, Some(idx)) => idx.to_string(),
        (None, None) => String::new(),
    }
}

pub(super) fn event_from(
    id: &str,
    fields: Vec<(String, String)>,
) -> Result<RevocationEvent, StoreError> {
    let get = |name: &str| {
        fields
            .iter()
            .find(|(f, _)| f == name)
            .map(|(_, v)| v.as_str())
            .ok_or_else(|| StoreError::Corrupt(Cause::msg(format!("feed event {id} lacks {name}"))))
    };
    // A kind this build does not know (a newer replica's) is carried as
    // unknown: the revocation still reaches every validator.
    let kind = match get("kind")? {
        "task" => Some(LeaseKind::Task),
        "jwt" | mayfly_core::EXCHANGED_TOKEN => Some(LeaseKind::Jwt),
        "x509" => Some(LeaseKind::X509),
        mayfly_core::DATABASE_LOGIN => Some(LeaseKind::DatabaseLogin),
        _ => None,
    };
    let corrupt_id = |e: mayfly_core::IdError| StoreError::Corrupt(Cause::of(e));
    let entry = get("serial").ok().filter(|s| !s.is_empty());
    Ok(RevocationEvent {
        cursor: cursor_of(id)?,
        lease_id: LeaseId::new(get("lease")?).map_err(corrupt_id)?,
        task_id: TaskId::new(get("task")?).map_err(corrupt_id)?,
        revocation: decode::<Revocation>(get("rev")?)?,
        expires_at: Timestamp::from_millis(
            get("exp")?.parse().map_err(|_| {
                StoreError::Corrupt(Cause::msg(format!("feed event {id}: bad exp")))
            })?,
        ),
        serial: entry
            .filter(|_| kind == Some(LeaseKind::X509))
            .map(str::to_owned),
        status_idx: match entry.filter(|_| kind == Some(LeaseKind::Jwt)) {
            Some(idx) => Some(idx.parse().map_err(|_| {
                StoreError::Corrupt(Cause::msg(format!("feed event {id}: bad status index")))
            })?),
            None => None,
        },
        kind,
    })
}
