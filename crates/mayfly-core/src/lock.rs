//! Agent locks: an operator keeps a compromised agent out. While a lock
//! holds, the store refuses every new task and credential of the agent, on
//! every replica, atomically with the write it refuses.

use serde::{Deserialize, Serialize};

use crate::spiffe::SpiffeId;
use crate::time::Timestamp;

/// Longest reason an operator may give for a lock.
pub const MAX_LOCK_REASON_BYTES: usize = crate::limits::MAX_NOTE_BYTES;

/// One agent kept out by an operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentLock {
    /// The agent kept out (an exact SPIFFE ID).
    pub agent: SpiffeId,
    /// Why, as the operator said it (shown to the agent when refused).
    pub reason: String,
    /// The operator who locked it.
    pub by: SpiffeId,
    /// When.
    pub at: Timestamp,
    /// When the lock lifts by itself; `None` holds until an operator
    /// unlocks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Timestamp>,
}

impl AgentLock {
    /// Whether the lock holds at `now`.
    pub fn holds_at(&self, now: Timestamp) -> bool {
        self.expires_at.is_none_or(|e| now < e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_holds_until_it_expires_or_forever() {
        let id = SpiffeId::new("spiffe://td/agent/a").unwrap();
        let mut lock = AgentLock {
            agent: id.clone(),
            reason: "key leaked".into(),
            by: id,
            at: Timestamp::from_secs(10),
            expires_at: None,
        };
        assert!(lock.holds_at(Timestamp::from_secs(u64::MAX / 2000)));
        lock.expires_at = Some(Timestamp::from_secs(20));
        assert!(lock.holds_at(Timestamp::from_secs(19)));
        assert!(!lock.holds_at(Timestamp::from_secs(20)));
        let json = serde_json::to_string(&lock).unwrap();
        assert_eq!(serde_json::from_str::<AgentLock>(&json).unwrap(), lock);
    }
}
