//! Key names, index members and feed cursors: the layout `docs/redis.md`
//! documents.

use crate::cause::Cause;
use crate::store::StoreError;

/// Key names under a prefix. Keys of one task share the hash tag `{task}`.
#[derive(Debug, Clone)]
pub(super) struct Keys {
    pub(super) prefix: String,
}

impl Keys {
    pub(super) fn task(&self, t: &str) -> String {
        format!("{}:{{{t}}}:task", self.prefix)
    }
    pub(super) fn lease_prefix(&self, t: &str) -> String {
        format!("{}:{{{t}}}:lease:", self.prefix)
    }
    pub(super) fn lease(&self, t: &str, l: &str) -> String {
        format!("{}{l}", self.lease_prefix(t))
    }
    pub(super) fn task_leases(&self, t: &str) -> String {
        format!("{}:{{{t}}}:leases", self.prefix)
    }
    pub(super) fn children(&self, t: &str) -> String {
        format!("{}:{{{t}}}:children", self.prefix)
    }
    /// Lease id -> task id, for every lease.
    pub(super) fn lease_tasks(&self) -> String {
        format!("{}:lease-tasks", self.prefix)
    }
    /// Earlier versions' lease index (a zset of `L:T:A`): still read for
    /// leases recorded before, and emptied by the reaper.
    pub(super) fn legacy_leases(&self) -> String {
        format!("{}:leases", self.prefix)
    }
    /// Database logins to drop: a hash, lease id → the held login (JSON).
    pub(super) fn logins(&self) -> String {
        format!("{}:logins", self.prefix)
    }
    /// Shared Signals streams: a hash, stream id → the stream (JSON).
    pub(super) fn ssf_streams(&self) -> String {
        format!("{}:ssf:streams", self.prefix)
    }
    /// Shared Signals delivery: a hash, stream id → its progress (JSON).
    pub(super) fn ssf_progress(&self) -> String {
        format!("{}:ssf:progress", self.prefix)
    }
    /// An agent's issuance rate: the theoretical arrival time of its next
    /// issuance (GCRA, microseconds on the server's clock).
    pub(super) fn rate(&self, agent: &str) -> String {
        format!("{}:rate:{agent}", self.prefix)
    }
    /// The Token Status List's counter: how many indexes were reserved.
    pub(super) fn status_indexes(&self) -> String {
        format!("{}:status-indexes", self.prefix)
    }
    pub(super) fn tasks(&self) -> String {
        format!("{}:tasks", self.prefix)
    }
    pub(super) fn agent_tasks(&self, a: &str) -> String {
        format!("{}:agent:{a}:tasks", self.prefix)
    }
    /// Earlier versions' index of an agent's leases: emptied by the reaper.
    pub(super) fn agent_leases(&self, a: &str) -> String {
        format!("{}:agent:{a}:leases", self.prefix)
    }
    /// Tokens `a` exchanged for under other agents' tasks, as
    /// `lease:task` scored by expiry (ms): what revoking or locking `a`
    /// revokes besides its own tasks.
    pub(super) fn actor_leases(&self, a: &str) -> String {
        format!("{}:actor:{a}:leases", self.prefix)
    }
    pub(super) fn expiry(&self) -> String {
        format!("{}:expiry", self.prefix)
    }
    /// How many revoked leases `end_task` left in the expiry index (the
    /// reaper drops them when they come due).
    pub(super) fn expiry_ended(&self) -> String {
        format!("{}:expiry:ended", self.prefix)
    }
    pub(super) fn purge(&self) -> String {
        format!("{}:purge", self.prefix)
    }
    pub(super) fn revocations(&self) -> String {
        format!("{}:revocations", self.prefix)
    }
    pub(super) fn approval(&self, id: &str) -> String {
        format!("{}:approval:{id}", self.prefix)
    }
    pub(super) fn approvals(&self) -> String {
        format!("{}:approvals", self.prefix)
    }
    pub(super) fn approval_expiry(&self) -> String {
        format!("{}:approvals:expiry", self.prefix)
    }
    /// An operator's lock on an agent: a hash (`body`, `exp` ms or 0).
    pub(super) fn lock(&self, agent: &str) -> String {
        format!("{}:lock:{agent}", self.prefix)
    }
    /// Every locked agent, scored by the lock's expiry (ms; +inf for none).
    pub(super) fn locks(&self) -> String {
        format!("{}:locks", self.prefix)
    }
    /// A key used once (`first_use`), expiring with its record.
    pub(super) fn seen(&self, key: &str) -> String {
        format!("{}:seen:{key}", self.prefix)
    }
}

/// The member of the global lease indexes: `lease:task:agent`. Ids are
/// base64url (no `:`), so the lease id sorts first and the rest splits back.
pub(super) fn member(lease: &str, task: &str, agent: &str) -> String {
    format!("{lease}:{task}:{agent}")
}

/// (lease, task, agent) from an index member.
pub(super) fn split_member(m: &str) -> Result<(&str, &str, &str), StoreError> {
    let mut parts = m.splitn(3, ':');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(l), Some(t), Some(a)) => Ok((l, t, a)),
        _ => Err(StoreError::Corrupt(Cause::msg(format!(
            "bad index member {m:?}"
        )))),
    }
}

/// A stream id `ms-seq` as a feed cursor: `ms << 20 | seq`.
pub(super) fn cursor_of(id: &str) -> Result<u64, StoreError> {
    let bad = || StoreError::Corrupt(Cause::msg(format!("bad stream id {id:?}")));
    let (ms, seq) = id.split_once('-').ok_or_else(bad)?;
    let (ms, seq): (u64, u64) = (
        ms.parse().map_err(|_| bad())?,
        seq.parse().map_err(|_| bad())?,
    );
    if seq >= 1 << 20 {
        return Err(bad());
    }
    Ok(ms << 20 | seq)
}

pub(super) fn stream_id_of(cursor: u64) -> String {
    format!("{}-{}", cursor >> 20, cursor & ((1 << 20) - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_order() {
        for id in [
            "0-1",
            "1795432424000-0",
            "1795432424000-7",
            "1795432424001-0",
        ] {
            assert_eq!(stream_id_of(cursor_of(id).unwrap()), id);
        }
        assert!(cursor_of("1795432424000-7").unwrap() < cursor_of("1795432424001-0").unwrap());
        assert!(cursor_of("bogus").is_err());
        assert!(cursor_of("1-1048576").is_err());
    }

    #[test]
    fn members_split_back() {
        let m = member("L", "T", "spiffe://td/agent/a");
        assert_eq!(split_member(&m).unwrap(), ("L", "T", "spiffe://td/agent/a"));
    }
}
