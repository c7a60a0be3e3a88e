//! Task-bound X.509-SVIDs: exactly one URI SAN, `<agent>/task/<task_id>`.

use mayfly_core::{SpiffeId, SpiffeIdError, TaskId};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

/// Who presents a task certificate, and for what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskIdentity {
    /// The certificate's SPIFFE ID, `<agent>/task/<task_id>`.
    pub spiffe_id: SpiffeId,
    /// The agent the task belongs to.
    pub agent: SpiffeId,
    /// The task.
    pub task_id: TaskId,
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
    /// Not exactly one URI SAN.
    #[error("{0} URI SANs; a task certificate has exactly one")]
    UriSans(usize),
    /// The URI SAN is not a SPIFFE ID.
    #[error("URI SAN is not a SPIFFE ID: {0}")]
    NotSpiffe(SpiffeIdError),
    /// A SPIFFE ID, but not of the form `<agent>/task/<task_id>`.
    #[error("{0} is not a task-bound SPIFFE ID (<agent>/task/<task_id>)")]
    NotTaskBound(SpiffeId),
}

/// Reads the agent and task from a peer certificate (DER). Call it on a
/// certificate your TLS stack has already validated against the trust
/// bundle: this function checks the form, not the signature.
pub fn task_identity(der: &[u8]) -> Result<TaskIdentity, PeerCertError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| PeerCertError::Malformed(e.to_string()))?;
    let bc = cert
        .basic_constraints()
        .map_err(|e| PeerCertError::Malformed(e.to_string()))?;
    if bc.is_some_and(|b| b.value.ca) {
        return Err(PeerCertError::IsCa);
    }
    let san = cert
        .subject_alternative_name()
        .map_err(|e| PeerCertError::Malformed(e.to_string()))?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|s| s.value.general_names.iter())
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    let [uri] = uris.as_slice() else {
        return Err(PeerCertError::UriSans(uris.len()));
    };
    let spiffe_id = SpiffeId::new(uri).map_err(PeerCertError::NotSpiffe)?;
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
    })
}
