//! The audit record and its hash chain: what every Mayfly audit line is,
//! how lines are chained, and how a trail is checked. This is the audit
//! line format others depend on (operators' tools, `mayfly audit verify`
//! and `trace`, log pipelines); the broker writes it, anyone can check it
//! with this crate alone.
//!
//! Every record carries its position (`seq`, from 1) and `prev`, the
//! SHA-256 (hex) of the previous record's line exactly as written (64
//! zeros before the first). Editing, deleting or reordering a record
//! therefore breaks the link after it, and [`verify`] names the first
//! broken link. The chain cannot show the *last* records being cut off or
//! replaced; [`Verified::head`] is what to keep elsewhere to catch that.
//!
//! Records hold ids, names and hashes only: never a token, key or CSR.

#![forbid(unsafe_code)]

use std::fmt;

use mayfly_core::{Arguments, Envelope, LeaseId, Scopes, SpiffeId, Task, TaskId, Timestamp, Tool};
use serde::{Deserialize, Serialize};

/// `prev` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// An agent opened a task.
    TaskStarted,
    /// Policy refused to open a task.
    TaskDenied,
    /// An agent handed part of a task to another agent.
    TaskDelegated,
    /// Policy (or the limits) refused a delegation.
    DelegationDenied,
    /// The owner completed a task (with everything under it).
    TaskCompleted,
    /// The owner changed a task's context.
    TaskContextChanged,
    /// Policy no longer allows a task or credentials (after a context
    /// change or a policy reload); `revoked` lists what went.
    RevokedByPolicy,
    /// An operator revoked a task.
    TaskRevoked,
    /// An operator revoked a lease.
    LeaseRevoked,
    /// An operator revoked everything of an agent.
    AgentRevoked,
    /// An operator locked an agent out (and revoked everything of it).
    AgentLocked,
    /// An operator lifted an agent's lock.
    AgentUnlocked,
    /// A lease (a task's or a credential's) reached its expiry.
    LeaseExpired,
    /// A token was issued.
    TokenIssued,
    /// A token was refused.
    TokenDenied,
    /// A certificate was issued.
    CertificateIssued,
    /// A certificate was refused.
    CertificateDenied,
    /// A service exchanged a token of a task for one to call the next
    /// service (RFC 8693).
    TokenExchanged,
    /// A token exchange was refused.
    ExchangeDenied,
    /// Policy asked for an operator's approval.
    ApprovalRequested,
    /// An operator approved.
    ApprovalGranted,
    /// An operator refused.
    ApprovalDenied,
    /// A gateway was told to forward a tool call.
    ToolCallAllowed,
    /// A tool call was refused.
    ToolCallDenied,
    /// What became of a forwarded tool call, as its gateway reported it.
    ToolCallOutcome,
    /// A request a token came with, as the service that validated it
    /// reported it.
    RequestServed,
    /// A database login was made.
    DatabaseLoginIssued,
    /// A database login was refused.
    DatabaseLoginDenied,
    /// A database login was confirmed gone from its database, after its
    /// lease ended (or, with reason `orphan`, found with no lease).
    DatabaseLoginDropped,
    /// Dropping a database login failed; it is retried.
    DatabaseLoginDropFailed,
}

impl Event {
    /// The snake-case name, as in the record.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TaskStarted => "task_started",
            Self::TaskDenied => "task_denied",
            Self::TaskDelegated => "task_delegated",
            Self::DelegationDenied => "delegation_denied",
            Self::TaskCompleted => "task_completed",
            Self::TaskContextChanged => "task_context_changed",
            Self::RevokedByPolicy => "revoked_by_policy",
            Self::TaskRevoked => "task_revoked",
            Self::LeaseRevoked => "lease_revoked",
            Self::AgentRevoked => "agent_revoked",
            Self::AgentLocked => "agent_locked",
            Self::AgentUnlocked => "agent_unlocked",
            Self::LeaseExpired => "lease_expired",
            Self::TokenIssued => "token_issued",
            Self::TokenDenied => "token_denied",
            Self::CertificateIssued => "certificate_issued",
            Self::CertificateDenied => "certificate_denied",
            Self::TokenExchanged => "token_exchanged",
            Self::ExchangeDenied => "exchange_denied",
            Self::ApprovalRequested => "approval_requested",
            Self::ApprovalGranted => "approval_granted",
            Self::ApprovalDenied => "approval_denied",
            Self::ToolCallAllowed => "tool_call_allowed",
            Self::ToolCallDenied => "tool_call_denied",
            Self::ToolCallOutcome => "tool_call_outcome",
            Self::RequestServed => "request_served",
            Self::DatabaseLoginIssued => "database_login_issued",
            Self::DatabaseLoginDenied => "database_login_denied",
            Self::DatabaseLoginDropped => "database_login_dropped",
            Self::DatabaseLoginDropFailed => "database_login_drop_failed",
        }
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One audit record. Fields that do not apply are left out of the JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Position in the chain, from 1.
    pub seq: u64,
    /// SHA-256 (hex) of the previous record's line.
    pub prev: String,
    /// When, RFC 3339 UTC with milliseconds.
    pub time: String,
    /// What happened.
    pub event: Event,
    /// Who asked: an agent's or operator's SPIFFE ID, or the broker's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caller: Option<String>,
    /// How the caller proved its SPIFFE ID when not with a client
    /// certificate: the issuer of its workload token (`[[federation]]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authenticated_by: Option<String>,
    /// The task's owner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// The task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    /// The task it was delegated from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_task_id: Option<String>,
    /// The task's intent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intent: Option<String>,
    /// The agent a task was delegated to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegate: Option<String>,
    /// A token's audience.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    /// A task's audiences.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    /// Scopes asked for or granted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    /// The credential's or task's lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_id: Option<String>,
    /// A certificate's serial (hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// A database login's user name (never its password).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login: Option<String>,
    /// The approval involved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval_id: Option<String>,
    /// `permit`, `deny` or `pending`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<String>,
    /// The deciding policies' ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Why: a denial's message, a revocation's reason, an operator's note.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Leases this decision revoked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revoked: Vec<String>,
    /// When the credential or task expires (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// For an exchanged token: the lease of the token it was exchanged
    /// for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_lease_id: Option<String>,
    /// For a tool call: `<upstream>/<tool>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    /// For a tool call: SHA-256 (hex) of its arguments' canonical form
    /// (never the arguments).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments_sha256: Option<String>,
    /// For a forwarded tool call: its id, on its decision and its
    /// outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call_id: Option<String>,
    /// For a tool call's outcome: the upstream's HTTP status (0: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// For a tool call's outcome: microseconds from forwarding to the
    /// upstream's answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<u64>,
    /// For a served request: its HTTP method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// For a served request: its route template (or path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
}

/// RFC 3339 UTC with exactly three fractional digits, so records align
/// and sort as text.
pub fn rfc3339(t: Timestamp) -> String {
    let nanos = i128::from(t.as_millis()) * 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .map(|d| {
            format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
                d.year(),
                u8::from(d.month()),
                d.day(),
                d.hour(),
                d.minute(),
                d.second(),
                d.millisecond()
            )
        })
        .unwrap_or_default()
}

impl AuditRecord {
    /// A record of `event` by `caller`, now; the writer fills `seq` and
    /// `prev`.
    pub fn new(event: Event, caller: &SpiffeId) -> Self {
        Self {
            seq: 0,
            prev: String::new(),
            time: rfc3339(Timestamp::now()),
            event,
            caller: Some(caller.to_string()),
            authenticated_by: None,
            agent: None,
            task_id: None,
            parent_task_id: None,
            intent: None,
            delegate: None,
            audience: None,
            audiences: Vec::new(),
            scopes: Vec::new(),
            lease_id: None,
            serial: None,
            login: None,
            approval_id: None,
            decision: None,
            policy: None,
            reason: None,
            revoked: Vec::new(),
            expires_at: None,
            subject_lease_id: None,
            tool: None,
            arguments_sha256: None,
            call_id: None,
            status: None,
            latency_us: None,
            method: None,
            route: None,
        }
    }

    /// The task's owner, id, parent and intent.
    pub fn task(mut self, task: &Task) -> Self {
        self.agent = Some(task.agent.to_string());
        self.task_id = Some(task.id.to_string());
        self.parent_task_id = task.parent.as_ref().map(ToString::to_string);
        self.intent = Some(task.intent.as_str().to_owned());
        self
    }

    /// A task's envelope (granted or asked for), for records of a task
    /// starting or being refused.
    pub fn envelope(mut self, envelope: &Envelope) -> Self {
        self.audiences = envelope
            .audiences()
            .iter()
            .map(ToString::to_string)
            .collect();
        self.scopes = envelope.scopes().iter().map(ToString::to_string).collect();
        self
    }

    /// A credential's audience and scopes.
    pub fn credential(mut self, audience: Option<&str>, scopes: &Scopes) -> Self {
        self.audience = audience.map(str::to_owned);
        self.scopes = scopes.iter().map(ToString::to_string).collect();
        self
    }

    /// Only the task's id, when the task itself is not at hand.
    pub fn task_id(mut self, id: &TaskId) -> Self {
        self.task_id = Some(id.to_string());
        self
    }

    /// A tool call: its tool and its arguments' hash.
    pub fn tool_call(mut self, tool: &Tool, arguments: &Arguments) -> Self {
        self.tool = Some(tool.to_string());
        self.arguments_sha256 = Some(arguments.sha256_hex());
        self
    }

    /// The lease.
    pub fn lease(mut self, id: &LeaseId) -> Self {
        self.lease_id = Some(id.to_string());
        self
    }

    /// The decision and the deciding policies.
    pub fn decided(mut self, decision: &str, policy: Option<&str>) -> Self {
        self.decision = Some(decision.to_owned());
        self.policy = policy.filter(|p| !p.is_empty()).map(str::to_owned);
        self
    }

    /// Why.
    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    /// The leases revoked.
    pub fn revoked(mut self, ids: &[LeaseId]) -> Self {
        self.revoked = ids.iter().map(ToString::to_string).collect();
        self
    }

    /// The expiry.
    pub fn expires(mut self, at: Timestamp) -> Self {
        self.expires_at = Some(rfc3339(at));
        self
    }
}

/// Where the chain stands: the last record's `seq` and hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// 0 before the first record.
    pub seq: u64,
    /// SHA-256 (hex) of the last line; [`GENESIS`] before the first.
    pub hash: String,
}

impl Head {
    /// An empty chain.
    pub fn genesis() -> Self {
        Self {
            seq: 0,
            hash: GENESIS.to_owned(),
        }
    }
}

/// SHA-256 of `line`, hex.
pub fn line_hash(line: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = ring::digest::digest(&ring::digest::SHA256, line.as_bytes());
    let mut hex = String::with_capacity(64);
    for b in digest.as_ref() {
        hex.push(char::from(HEX[usize::from(b >> 4)]));
        hex.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    hex
}

/// Places `records` after `head`: numbers them, links each to the one
/// before, and returns their lines and the new head.
pub fn chain(
    records: &[AuditRecord],
    head: &Head,
) -> Result<(Vec<String>, Head), serde_json::Error> {
    let mut head = head.clone();
    let mut lines = Vec::with_capacity(records.len());
    for r in records {
        let mut r = r.clone();
        r.seq = head.seq + 1;
        r.prev = head.hash.clone();
        let line = serde_json::to_string(&r)?;
        head = Head {
            seq: r.seq,
            hash: line_hash(&line),
        };
        lines.push(line);
    }
    Ok((lines, head))
}

/// A chain that holds together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// How many records.
    pub records: u64,
    /// The seq the checked records start at: 1 from genesis, more when
    /// earlier records were archived or trimmed (their link is not checked).
    pub first_seq: u64,
    /// The last record's position and hash: keep it elsewhere to detect
    /// later truncation.
    pub head: Head,
}

/// The first place a chain does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Broken {
    /// A line that is not a record.
    #[error("line {line}: not an audit record: {error}")]
    NotARecord {
        /// 1-based line number.
        line: u64,
        /// The parse error.
        error: String,
    },
    /// A record out of sequence: one before it is missing, or they were
    /// reordered.
    #[error(
        "line {line}: record seq {found} where seq {expected} was due: a record is missing or out of order"
    )]
    Sequence {
        /// 1-based line number.
        line: u64,
        /// The seq due.
        expected: u64,
        /// The seq found.
        found: u64,
    },
    /// A record whose `prev` is not the hash of the line before it.
    #[error("line {line} (seq {seq}): prev does not match the SHA-256 of line {}: the record before it was edited, removed or replaced", line - 1)]
    Link {
        /// 1-based line number.
        line: u64,
        /// Its seq.
        seq: u64,
    },
}

/// Checks a chain record by record, across files if need be.
#[derive(Debug, Clone)]
pub struct ChainCheck {
    /// Where the chain stands; `None` until the first record when the
    /// check starts wherever the records do.
    head: Option<Head>,
    first_seq: Option<u64>,
    records: u64,
}

impl ChainCheck {
    /// A check of a whole chain: the first record must be seq 1 after
    /// genesis.
    pub fn from_genesis() -> Self {
        Self {
            head: Some(Head::genesis()),
            first_seq: None,
            records: 0,
        }
    }

    /// A check that starts at whatever record comes first (a trail whose
    /// earlier segments were archived, or a trimmed stream): its own link
    /// to the record before cannot be checked, every later one is.
    pub fn from_first_record() -> Self {
        Self {
            head: None,
            first_seq: None,
            records: 0,
        }
    }

    /// A check that continues from `head`, the last record before the
    /// first line checked (the previous segment's end).
    pub fn from_head(head: Head) -> Self {
        Self {
            head: Some(head),
            first_seq: None,
            records: 0,
        }
    }

    /// The next line (`line` is its 1-based number, for errors).
    pub fn line(&mut self, text: &str, line: u64) -> Result<(), Broken> {
        let r: AuditRecord = serde_json::from_str(text).map_err(|e| Broken::NotARecord {
            line,
            error: e.to_string(),
        })?;
        // Starting wherever the records do, the first one's link is taken
        // on trust, except that seq 1 always follows genesis.
        let head = match &self.head {
            Some(h) => h,
            None if r.seq == 1 => &Head::genesis(),
            None => &Head {
                seq: r.seq.saturating_sub(1),
                hash: r.prev.clone(),
            },
        };
        if r.seq != head.seq + 1 {
            return Err(Broken::Sequence {
                line,
                expected: head.seq + 1,
                found: r.seq,
            });
        }
        if r.prev != head.hash {
            return Err(Broken::Link { line, seq: r.seq });
        }
        self.first_seq.get_or_insert(r.seq);
        self.records += 1;
        self.head = Some(Head {
            seq: r.seq,
            hash: line_hash(text),
        });
        Ok(())
    }

    /// Where the chain stands now.
    pub fn head(&self) -> Option<&Head> {
        self.head.as_ref()
    }

    /// What was checked.
    pub fn finish(self) -> Verified {
        let head = self.head.unwrap_or_else(Head::genesis);
        Verified {
            records: self.records,
            first_seq: self.first_seq.unwrap_or(head.seq + 1),
            head,
        }
    }
}

/// Checks a whole chain from its first record, line by line.
pub fn verify<I, E>(lines: I) -> Result<Verified, Broken>
where
    I: IntoIterator<Item = Result<String, E>>,
    E: fmt::Display,
{
    let mut check = ChainCheck::from_genesis();
    for (i, line) in lines.into_iter().enumerate() {
        let n = i as u64 + 1;
        let line = line.map_err(|e| Broken::NotARecord {
            line: n,
            error: e.to_string(),
        })?;
        check.line(&line, n)?;
    }
    Ok(check.finish())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn records(n: usize) -> Vec<String> {
        let op = SpiffeId::new("spiffe://example.org/operator/admin").unwrap();
        let rs: Vec<AuditRecord> = (0..n)
            .map(|i| AuditRecord::new(Event::LeaseRevoked, &op).reason(format!("r{i}")))
            .collect();
        chain(&rs, &Head::genesis()).unwrap().0
    }

    fn check(lines: &[String]) -> Result<Verified, Broken> {
        verify(lines.iter().cloned().map(Ok::<_, String>))
    }

    #[test]
    fn line_hashes_are_lower_case_hex_sha256() {
        // FIPS 180-2 test vector.
        assert_eq!(
            line_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(GENESIS.len(), line_hash("").len());
    }

    #[test]
    fn an_intact_chain_verifies_and_reports_its_head() {
        let lines = records(5);
        let v = check(&lines).unwrap();
        assert_eq!(v.records, 5);
        assert_eq!(v.head.seq, 5);
        assert_eq!(v.head.hash, line_hash(&lines[4]));
        assert_eq!(check(&[]).unwrap().head, Head::genesis());
    }

    #[test]
    fn edits_deletions_and_reorders_break_the_next_link() {
        let lines = records(5);
        let mut edited = lines.clone();
        edited[2] = edited[2].replace("r2", "r9");
        assert_eq!(check(&edited), Err(Broken::Link { line: 4, seq: 4 }));

        let mut deleted = lines.clone();
        deleted.remove(2);
        assert_eq!(
            check(&deleted),
            Err(Broken::Sequence {
                line: 3,
                expected: 3,
                found: 4
            })
        );

        let mut reordered = lines.clone();
        reordered.swap(1, 2);
        assert_eq!(
            check(&reordered),
            Err(Broken::Sequence {
                line: 2,
                expected: 2,
                found: 3
            })
        );

        // A renumbered deletion still breaks the link.
        let mut forged = lines.clone();
        forged.remove(2);
        let mut r: AuditRecord = serde_json::from_str(&forged[2]).unwrap();
        r.seq = 3;
        forged[2] = serde_json::to_string(&r).unwrap();
        assert_eq!(check(&forged), Err(Broken::Link { line: 3, seq: 3 }));

        let mut garbage = lines;
        garbage[0] = "not json".into();
        assert!(matches!(
            check(&garbage),
            Err(Broken::NotARecord { line: 1, .. })
        ));
    }
}
