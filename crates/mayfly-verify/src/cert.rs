//! Task-bound X.509-SVIDs: exactly one URI SAN, `<agent>/task/<task_id>`.
//! The leaf rules are the broker's own (`mayfly_core::svid`), so both
//! refuse the same certificates.
//!
//! [`Verifier::task_identity`](crate::Verifier::task_identity) is the
//! checked path: the form here, then the certificate's serial and its task
//! against the revocation feed (failing closed when the feed is silent).
//! [`parse_task_certificate`] checks the form alone, for callers that
//! follow revocations some other way (the broker's CRL).

use std::time::Duration;

use mayfly_core::svid::{LeafError, SvidLeaf, parse_svid_leaf};
use mayfly_core::{SpiffeId, SpiffeIdError, TaskId};

/// Who presents a task certificate, and for what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskIdentity {
    /// The certificate's SPIFFE ID, `<agent>/task/<task_id>`.
    pub spiffe_id: SpiffeId,
    /// The agent the task belongs to.
    pub agent: SpiffeId,
    /// The task.
    pub task_id: TaskId,
    /// The serial number, upper-case hex as the feed and `openssl` print it.
    pub serial: String,
}

/// Why a certificate is not a task-bound SVID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PeerCertError {
    /// Not a DER X.509 certificate.
    #[error("not an X.509 certificate: {0}")]
    Malformed(String),
    /// A CA certificate.
    #[error("a CA certificate, not a leaf")]
    IsCa,
    /// May sign certificates or CRLs, which no X.509-SVID may.
    #[error("key usage keyCertSign or cRLSign, which an X.509-SVID must not have")]
    SigningKeyUsage,
    /// Not exactly one URI SAN.
    #[error("{0} URI SANs; a task certificate has exactly one")]
    UriSans(usize),
    /// The URI SAN is not a SPIFFE ID.
    #[error("URI SAN is not a SPIFFE ID: {0}")]
    NotSpiffe(SpiffeIdError),
    /// A SPIFFE ID, but not of the form `<agent>/task/<task_id>`.
    #[error("{0} is not a task-bound SPIFFE ID (<agent>/task/<task_id>)")]
    NotTaskBound(SpiffeId),
    /// The broker revoked the certificate (or its whole task).
    #[error("task certificate {serial} has been revoked")]
    Revoked {
        /// Its serial, hex.
        serial: String,
    },
    /// No word from the revocation feed for too long; failing closed.
    #[error("revocation feed silent for {0:?}; failing closed")]
    FeedStale(Duration),
    /// The revocation feed has not delivered its first replay yet.
    #[error("revocation feed not synchronised yet; failing closed")]
    FeedNotSynced,
}

impl From<LeafError> for PeerCertError {
    fn from(e: LeafError) -> Self {
        match e {
            LeafError::IsCa => Self::IsCa,
            LeafError::SigningKeyUsage => Self::SigningKeyUsage,
            LeafError::UriSans(n) => Self::UriSans(n),
            LeafError::NotSpiffe { reason, .. } => Self::NotSpiffe(reason),
            LeafError::Malformed(m) => Self::Malformed(m),
            // A rule added to the shared check: named as it says.
            other => Self::Malformed(other.to_string()),
        }
    }
}

impl PeerCertError {
    /// Whether the problem is on the verifier's side (the feed), not the
    /// certificate's.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::FeedStale(_) | Self::FeedNotSynced)
    }
}

/// Reads the agent and task from a peer certificate (DER), checking its
/// form only: not the signature (your TLS stack validated the chain) and
/// not revocation. Prefer
/// [`Verifier::task_identity`](crate::Verifier::task_identity), which also
/// refuses revoked certificates.
pub fn parse_task_certificate(der: &[u8]) -> Result<TaskIdentity, PeerCertError> {
    let SvidLeaf {
        spiffe_id, serial, ..
    } = parse_svid_leaf(der)?;
    let not_task = || PeerCertError::NotTaskBound(spiffe_id.clone());
    let (agent_path, task) = spiffe_id
        .path()
        .rsplit_once("/task/")
        .ok_or_else(not_task)?;
    let task_id = TaskId::new(task).map_err(|_| not_task())?;
    if agent_path.is_empty() {
        return Err(not_task());
    }
    let agent = SpiffeId::new(&format!(
        "spiffe://{}{agent_path}",
        spiffe_id.trust_domain_name()
    ))
    .map_err(|_| not_task())?;
    Ok(TaskIdentity {
        spiffe_id,
        agent,
        task_id,
        serial,
    })
}
