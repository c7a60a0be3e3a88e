//! Leases: the broker's record of a task or of one issued credential, and how
//! they end.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::envelope::{Audience, Scopes};
use crate::id::{LeaseId, TaskId};
use crate::proof::{Binding, Proof};
use crate::spiffe::SpiffeId;
use crate::time::Timestamp;

/// What a lease records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaseKind {
    /// The task itself (lease id = task id).
    Task,
    /// A JWT access token (lease id = `jti`).
    Jwt,
    /// An X.509 certificate.
    X509,
    /// A login in a database the broker manages (a PostgreSQL role, a
    /// Redis ACL user).
    DatabaseLogin,
}

impl LeaseKind {
    /// The lower-case name used in the CLI and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Task => "task",
            Self::Jwt => "jwt",
            Self::X509 => "x509",
            Self::DatabaseLogin => DATABASE_LOGIN,
        }
    }
}

/// The state of a lease as seen at some instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaseState {
    /// Valid until its expiry.
    Active,
    /// Ended early; never becomes active again.
    Revoked,
    /// Reached its expiry.
    Expired,
}

impl LeaseState {
    /// The lower-case name used in the CLI and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Revoked => "revoked",
            Self::Expired => "expired",
        }
    }
}

impl FromStr for LeaseState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "active" => Ok(Self::Active),
            "revoked" => Ok(Self::Revoked),
            "expired" => Ok(Self::Expired),
            _ => Err(format!(
                "unknown lease state {s:?}: expected active, revoked or expired"
            )),
        }
    }
}

/// Why a lease was revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RevocationReason {
    /// The owning agent completed the task.
    TaskCompleted,
    /// An operator revoked the task the lease belongs to.
    TaskRevoked,
    /// The task's context changed so that policy no longer allows the lease.
    ContextChanged,
    /// An operator revoked the lease itself.
    Operator,
    /// An operator revoked every lease of the agent.
    AgentRevoked,
    /// The parent of a delegated task was revoked or completed.
    ParentRevoked,
    /// The agent revoked its own token (RFC 7009).
    TokenRevoked,
}

impl RevocationReason {
    /// The snake-case name used in the CLI, logs and the feed.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TaskCompleted => "task_completed",
            Self::TaskRevoked => "task_revoked",
            Self::ContextChanged => "context_changed",
            Self::Operator => "operator",
            Self::AgentRevoked => "agent_revoked",
            Self::ParentRevoked => "parent_revoked",
            Self::TokenRevoked => "token_revoked",
        }
    }
}

impl fmt::Display for RevocationReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who ended a lease, kept for the audit trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// Why.
    pub reason: RevocationReason,
    /// When the revocation was recorded.
    pub at: Timestamp,
    /// The SPIFFE ID of the caller that caused it.
    pub by: SpiffeId,
    /// The operator's free-text note, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The stored lifecycle of a lease. `Active` leases whose expiry has passed
/// read as expired even before the reaper records it (see [`Lease::state_at`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum LeaseStatus {
    /// Issued and not ended.
    Active,
    /// Ended early, with the details.
    Revoked(Revocation),
    /// Recorded as expired by the reaper.
    Expired,
}

/// What a lease is of, with what only that kind holds. A lease of a kind
/// this build does not know (written by a newer broker sharing the store),
/// or one that lacks what its kind needs, is [`Unrecognised`]: it is never
/// taken for a credential, and a context change revokes it.
///
/// [`Unrecognised`]: LeaseDetail::Unrecognised
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseDetail {
    /// The task itself (lease id = task id).
    Task,
    /// A JWT access token (lease id = `jti`).
    Token {
        /// Its one audience.
        audience: Audience,
        /// What it is bound to, if anything.
        binding: Binding,
        /// Its index in the Token Status List; `None` for a token issued
        /// before the broker kept lists.
        status_idx: Option<u64>,
    },
    /// A token a service got by exchanging a token of the task (RFC
    /// 8693): the lease's `agent` is the task's owner, `actor` the
    /// service that holds it.
    ExchangedToken {
        /// Its one audience.
        audience: Audience,
        /// What it is bound to, if anything.
        binding: Binding,
        /// The service that exchanged for it, and holds it.
        actor: SpiffeId,
        /// The audience of the token it was exchanged for.
        subject_audience: Audience,
        /// Its index in the Token Status List, as for a token.
        status_idx: Option<u64>,
    },
    /// An X.509 certificate.
    Certificate {
        /// Its serial number, upper-case hex.
        serial: String,
        /// The id of the issuing CA that signed it (whose CRL lists it);
        /// `None` for certificates recorded without one.
        issuing_ca: Option<String>,
    },
    /// A login in a configured database (`[[databases]]`).
    DatabaseLogin {
        /// The database's name, which is its logins' audience.
        database: Audience,
        /// The login's user (role) name; its password is never kept.
        user: String,
    },
    /// A lease this build cannot read as any kind it knows.
    Unrecognised {
        /// The kind as stored.
        kind: String,
    },
}

impl LeaseDetail {
    /// The kind, if this build knows it.
    pub fn kind(&self) -> Option<LeaseKind> {
        match self {
            Self::Task => Some(LeaseKind::Task),
            Self::Token { .. } | Self::ExchangedToken { .. } => Some(LeaseKind::Jwt),
            Self::Certificate { .. } => Some(LeaseKind::X509),
            Self::DatabaseLogin { .. } => Some(LeaseKind::DatabaseLogin),
            Self::Unrecognised { .. } => None,
        }
    }

    /// The kind's name as stored and shown (`task`, `jwt`, `x509`, or an
    /// unrecognised lease's own).
    pub fn kind_name(&self) -> &str {
        match self {
            Self::Unrecognised { kind } => kind,
            // Its own name, so a broker that predates exchange reads it as
            // a kind it does not know (and revokes it rather than decide
            // it as the owner's token).
            Self::ExchangedToken { .. } => EXCHANGED_TOKEN,
            known => known.kind().map_or("", LeaseKind::as_str),
        }
    }
}

/// The stored kind name of an exchanged token's lease.
pub const EXCHANGED_TOKEN: &str = "exchanged_jwt";

/// The stored kind name of a database login's lease.
pub const DATABASE_LOGIN: &str = "db_login";

/// One lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "StoredLease", into = "StoredLease")]
pub struct Lease {
    /// For a JWT, its `jti`; for a task, the task id.
    pub id: LeaseId,
    /// What it is of, with what only that kind holds.
    pub detail: LeaseDetail,
    /// The agent that owns it.
    pub agent: SpiffeId,
    /// The task it belongs to (itself, for a task lease).
    pub task_id: TaskId,
    /// The scopes granted (for a task: its envelope's scopes).
    pub scopes: Scopes,
    /// When it was issued.
    pub issued_at: Timestamp,
    /// When it stops being valid on its own.
    pub expires_at: Timestamp,
    /// Active, revoked or expired.
    pub status: LeaseStatus,
    /// The task's context revision the issuing decision saw.
    pub task_revision: u64,
    /// The approval it was issued under, if one was needed.
    pub approval: Option<crate::ApprovalId>,
    /// How its holder proved its SPIFFE ID when it was issued.
    pub authenticated_by: Proof,
}

/// A lease as both stores hold it (JSON): the kind as a name and its
/// fields side by side, as they have always been written, so that leases
/// written before [`LeaseDetail`] existed, and by other builds, still read.
#[derive(Serialize, Deserialize)]
struct StoredLease {
    id: LeaseId,
    kind: String,
    agent: SpiffeId,
    task_id: TaskId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    audience: Option<Audience>,
    scopes: Scopes,
    issued_at: Timestamp,
    expires_at: Timestamp,
    status: LeaseStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cert_thumbprint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dpop_jkt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    actor: Option<SpiffeId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    subject_audience: Option<Audience>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    status_idx: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    issuing_ca: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    user: Option<String>,
    #[serde(default)]
    task_revision: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    approval: Option<crate::ApprovalId>,
    #[serde(default, skip_serializing_if = "Proof::is_certificate")]
    authenticated_by: Proof,
}

impl From<StoredLease> for Lease {
    fn from(s: StoredLease) -> Self {
        let binding = match (s.cert_thumbprint, s.dpop_jkt) {
            (None, None) => Ok(Binding::Bearer),
            (Some(x5t_s256), None) => Ok(Binding::Certificate { x5t_s256 }),
            (None, Some(jkt)) => Ok(Binding::Dpop { jkt }),
            (Some(_), Some(_)) => Err(()),
        };
        let exchange = s.actor.zip(s.subject_audience);
        let detail = match (s.kind.as_str(), s.audience, s.serial, binding, exchange) {
            ("task", ..) => LeaseDetail::Task,
            ("jwt", Some(audience), _, Ok(binding), _) => LeaseDetail::Token {
                audience,
                binding,
                status_idx: s.status_idx,
            },
            (EXCHANGED_TOKEN, Some(audience), _, Ok(binding), Some((actor, subject_audience))) => {
                LeaseDetail::ExchangedToken {
                    audience,
                    binding,
                    actor,
                    subject_audience,
                    status_idx: s.status_idx,
                }
            }
            ("x509", _, Some(serial), ..) => LeaseDetail::Certificate {
                serial,
                issuing_ca: s.issuing_ca,
            },
            (DATABASE_LOGIN, Some(database), None, Ok(Binding::Bearer), None) => match s.user {
                Some(user) => LeaseDetail::DatabaseLogin { database, user },
                None => LeaseDetail::Unrecognised { kind: s.kind },
            },
            // A kind this build does not know, a token without its
            // audience or bound twice, or a certificate without its serial.
            _ => LeaseDetail::Unrecognised { kind: s.kind },
        };
        Self {
            id: s.id,
            detail,
            agent: s.agent,
            task_id: s.task_id,
            scopes: s.scopes,
            issued_at: s.issued_at,
            expires_at: s.expires_at,
            status: s.status,
            task_revision: s.task_revision,
            approval: s.approval,
            authenticated_by: s.authenticated_by,
        }
    }
}

impl From<Lease> for StoredLease {
    fn from(l: Lease) -> Self {
        let kind = l.detail.kind_name().to_owned();
        let (mut actor, mut subject_audience, mut issuing_ca, mut user) = (None, None, None, None);
        let mut status_idx = None;
        let (audience, binding, serial) = match l.detail {
            LeaseDetail::Token {
                audience,
                binding,
                status_idx: idx,
            } => {
                status_idx = idx;
                (Some(audience), binding, None)
            }
            LeaseDetail::ExchangedToken {
                audience,
                binding,
                actor: a,
                subject_audience: s,
                status_idx: idx,
            } => {
                (actor, subject_audience, status_idx) = (Some(a), Some(s), idx);
                (Some(audience), binding, None)
            }
            LeaseDetail::Certificate {
                serial,
                issuing_ca: ca,
            } => {
                issuing_ca = ca;
                (None, Binding::Bearer, Some(serial))
            }
            LeaseDetail::DatabaseLogin { database, user: u } => {
                user = Some(u);
                (Some(database), Binding::Bearer, None)
            }
            LeaseDetail::Task | LeaseDetail::Unrecognised { .. } => (None, Binding::Bearer, None),
        };
        let (cert_thumbprint, dpop_jkt) = match binding {
            Binding::Bearer => (None, None),
            Binding::Certificate { x5t_s256 } => (Some(x5t_s256), None),
            Binding::Dpop { jkt } => (None, Some(jkt)),
        };
        Self {
            id: l.id,
            kind,
            agent: l.agent,
            task_id: l.task_id,
            audience,
            scopes: l.scopes,
            issued_at: l.issued_at,
            expires_at: l.expires_at,
            status: l.status,
            cert_thumbprint,
            dpop_jkt,
            actor,
            subject_audience,
            serial,
            status_idx,
            issuing_ca,
            user,
            task_revision: l.task_revision,
            approval: l.approval,
            authenticated_by: l.authenticated_by,
        }
    }
}

impl Lease {
    /// What it records, if this build knows the kind.
    pub fn kind(&self) -> Option<LeaseKind> {
        self.detail.kind()
    }

    /// A token's audience.
    pub fn audience(&self) -> Option<&Audience> {
        match &self.detail {
            LeaseDetail::Token { audience, .. } | LeaseDetail::ExchangedToken { audience, .. } => {
                Some(audience)
            }
            _ => None,
        }
    }

    /// Who holds the credential: the owner, or for an exchanged token the
    /// service that exchanged for it (the token's `client_id`).
    pub fn holder(&self) -> &SpiffeId {
        match &self.detail {
            LeaseDetail::ExchangedToken { actor, .. } => actor,
            _ => &self.agent,
        }
    }

    /// What a token is bound to; `None` for a lease that is no token.
    pub fn binding(&self) -> Option<&Binding> {
        match &self.detail {
            LeaseDetail::Token { binding, .. } | LeaseDetail::ExchangedToken { binding, .. } => {
                Some(binding)
            }
            _ => None,
        }
    }

    /// The `x5t#S256` a token is bound to.
    pub fn cert_thumbprint(&self) -> Option<&str> {
        self.binding().and_then(Binding::x5t_s256)
    }

    /// A database login's database and user.
    pub fn database_login(&self) -> Option<(&Audience, &str)> {
        match &self.detail {
            LeaseDetail::DatabaseLogin { database, user } => Some((database, user)),
            _ => None,
        }
    }

    /// A certificate's serial (upper-case hex).
    pub fn serial(&self) -> Option<&str> {
        match &self.detail {
            LeaseDetail::Certificate { serial, .. } => Some(serial),
            _ => None,
        }
    }

    /// A token's index in the Token Status List.
    pub fn status_index(&self) -> Option<u64> {
        match &self.detail {
            LeaseDetail::Token { status_idx, .. }
            | LeaseDetail::ExchangedToken { status_idx, .. } => *status_idx,
            _ => None,
        }
    }

    /// The id of the CA that signed a certificate, if recorded.
    pub fn issuing_ca(&self) -> Option<&str> {
        match &self.detail {
            LeaseDetail::Certificate { issuing_ca, .. } => issuing_ca.as_deref(),
            _ => None,
        }
    }

    /// The state at `now`: an active lease past its expiry is expired.
    pub fn state_at(&self, now: Timestamp) -> LeaseState {
        match &self.status {
            LeaseStatus::Active if now >= self.expires_at => LeaseState::Expired,
            LeaseStatus::Active => LeaseState::Active,
            LeaseStatus::Revoked(_) => LeaseState::Revoked,
            LeaseStatus::Expired => LeaseState::Expired,
        }
    }

    /// Whether the lease is usable at `now`.
    pub fn is_active_at(&self, now: Timestamp) -> bool {
        self.state_at(now) == LeaseState::Active
    }

    /// The revocation, if revoked.
    pub fn revocation(&self) -> Option<&Revocation> {
        match &self.status {
            LeaseStatus::Revoked(r) => Some(r),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::parse_scopes;

    fn lease(status: LeaseStatus) -> Lease {
        let task = TaskId::generate();
        Lease {
            id: LeaseId::generate(),
            detail: LeaseDetail::Token {
                audience: Audience::new("api").unwrap(),
                binding: Binding::Bearer,
                status_idx: Some(7),
            },
            agent: SpiffeId::new("spiffe://td/agent/a").unwrap(),
            task_id: task,
            scopes: parse_scopes(&["read"]).unwrap(),
            issued_at: Timestamp::from_secs(100),
            expires_at: Timestamp::from_secs(200),
            status,
            task_revision: 0,
            approval: None,
            authenticated_by: Proof::Certificate,
        }
    }

    #[test]
    fn state_follows_time_and_status() {
        let active = lease(LeaseStatus::Active);
        assert_eq!(
            active.state_at(Timestamp::from_secs(199)),
            LeaseState::Active
        );
        assert_eq!(
            active.state_at(Timestamp::from_secs(200)),
            LeaseState::Expired
        );
        let revoked = lease(LeaseStatus::Revoked(Revocation {
            reason: RevocationReason::Operator,
            at: Timestamp::from_secs(150),
            by: SpiffeId::new("spiffe://td/operator/admin").unwrap(),
            note: None,
        }));
        // Revoked stays revoked, before and after its expiry.
        assert_eq!(
            revoked.state_at(Timestamp::from_secs(150)),
            LeaseState::Revoked
        );
        assert_eq!(
            revoked.state_at(Timestamp::from_secs(500)),
            LeaseState::Revoked
        );
        assert!(revoked.revocation().is_some());
    }

    #[test]
    fn serde_round_trip() {
        let mut l = lease(LeaseStatus::Active);
        for detail in [
            LeaseDetail::Task,
            LeaseDetail::Token {
                audience: Audience::new("api").unwrap(),
                binding: Binding::Certificate {
                    x5t_s256: "x5t".into(),
                },
                status_idx: None,
            },
            LeaseDetail::Token {
                audience: Audience::new("api").unwrap(),
                binding: Binding::Dpop { jkt: "jkt".into() },
                status_idx: Some(1 << 40),
            },
            LeaseDetail::Certificate {
                serial: "5A39".into(),
                issuing_ca: None,
            },
            LeaseDetail::Certificate {
                serial: "5A3A".into(),
                issuing_ca: Some("0123456789abcdef".into()),
            },
            LeaseDetail::Unrecognised {
                kind: "db_login".into(),
            },
            LeaseDetail::ExchangedToken {
                audience: Audience::new("next").unwrap(),
                binding: Binding::Bearer,
                actor: SpiffeId::new("spiffe://td/api/a").unwrap(),
                subject_audience: Audience::new("api").unwrap(),
                status_idx: Some(0),
            },
        ] {
            l.detail = detail;
            let json = serde_json::to_string(&l).unwrap();
            let back: Lease = serde_json::from_str(&json).unwrap();
            assert_eq!(back, l);
        }
    }

    /// The stored form is the one leases have always been written in:
    /// the kind by name, its fields beside it.
    #[test]
    fn stored_form_is_flat() {
        let l = lease(LeaseStatus::Active);
        let json: serde_json::Value = serde_json::to_value(&l).unwrap();
        assert_eq!(json["kind"], "jwt");
        assert_eq!(json["audience"], "api");
        assert!(json.get("serial").is_none());
        assert!(json.get("detail").is_none());
    }

    /// A kind this build does not know, or a known kind without what it
    /// needs, reads as unrecognised: never as a credential.
    #[test]
    fn unknown_or_incomplete_kinds_are_unrecognised() {
        let mut json = serde_json::to_value(lease(LeaseStatus::Active)).unwrap();
        json["kind"] = "db_login".into();
        let l: Lease = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(
            l.detail,
            LeaseDetail::Unrecognised {
                kind: "db_login".into()
            }
        );
        assert_eq!(l.kind(), None);
        assert_eq!(l.audience(), None);

        json["kind"] = "jwt".into();
        json.as_object_mut().unwrap().remove("audience");
        let l: Lease = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(l.kind(), None, "a token without its audience");

        json["audience"] = "api".into();
        json["cert_thumbprint"] = "x5t".into();
        json["dpop_jkt"] = "jkt".into();
        let l: Lease = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(l.kind(), None, "a token bound twice");

        json["kind"] = "x509".into();
        let l: Lease = serde_json::from_value(json).unwrap();
        assert_eq!(l.kind(), None, "a certificate without its serial");
        assert_eq!(l.detail.kind_name(), "x509");
    }
}
