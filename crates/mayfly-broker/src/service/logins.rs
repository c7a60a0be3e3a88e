//! Database logins as a credential kind of the one pipeline: decided
//! (`issue_database_login` on the database's name), inside the task's
//! envelope, leased and recorded like a token. What differs is minting:
//! the login is first held in the store ([`LoginQueue`]), so that a crash
//! at any later point leaves work the dropper finishes, and only then
//! created in the database by its engine (`mayfly-secrets`).
//!
//! [`LoginQueue`]: crate::store::LoginQueue

use std::sync::Arc;

use mayfly_core::{Action, ApprovalRequest, Lease, LeaseDetail, Scopes, Task, Timestamp};
use mayfly_secrets::{Engine, EngineError, Login, LoginRequest, login_name};

use super::pipeline::{Kind, Lifetime};
use super::{DatabaseLoginRequest, Issuance, Issued, IssuedDatabaseLogin, TokenSigner};
use crate::audit::{AuditRecord, Event};
use crate::config::Lifetimes;
use crate::error::BrokerError;
use crate::identity::Caller;
use crate::store::{HeldLogin, LeaseStore};

/// A login request with the engine that makes it.
struct DatabaseLogin<'a> {
    req: &'a DatabaseLoginRequest,
    engine: Arc<dyn Engine>,
    store: &'a Arc<dyn LeaseStore>,
}

impl Kind for DatabaseLogin<'_> {
    type Credential = Login;
    const ISSUED: Event = Event::DatabaseLoginIssued;
    const DENIED: Event = Event::DatabaseLoginDenied;

    fn approval_request(&self) -> Option<ApprovalRequest> {
        Some(ApprovalRequest::DatabaseLogin {
            database: self.req.database.clone(),
            scopes: self.req.scopes.clone(),
            ttl_seconds: self.req.ttl.map_or(0, |d| d.as_secs()),
        })
    }

    fn lifetime(&self, lifetimes: &Lifetimes) -> Lifetime {
        let (default, max) = lifetimes.database(self.req.database.as_str());
        Lifetime {
            asked: self.req.ttl,
            default,
            max,
        }
    }

    fn check(&self, task: &Task) -> Option<BrokerError> {
        let excess = task.envelope.excess(&self.req.database, &self.req.scopes)?;
        Some(BrokerError::OutsideEnvelope(excess))
    }

    fn action(&self) -> Action<'_> {
        Action::IssueDatabaseLogin {
            database: &self.req.database,
            scopes: &self.req.scopes,
        }
    }

    fn detail(&self, _caller: &Caller, _status_idx: Option<u64>) -> LeaseDetail {
        LeaseDetail::DatabaseLogin {
            database: self.req.database.clone(),
            user: login_name(self.engine.prefix()),
        }
    }

    fn scopes(&self) -> Scopes {
        self.req.scopes.clone()
    }

    fn describe(&self, mut record: AuditRecord, lease: Option<&Lease>) -> AuditRecord {
        record.login = lease
            .and_then(Lease::database_login)
            .map(|(_, user)| user.to_owned());
        record.credential(Some(self.req.database.as_str()), &self.req.scopes)
    }

    async fn mint(
        &self,
        _tokens: &TokenSigner,
        _task: &Task,
        lease: &Lease,
    ) -> Result<Login, BrokerError> {
        let Some((database, user)) = lease.database_login() else {
            return Err(BrokerError::Internal(crate::cause::Cause::msg(
                "a database login lease without its login",
            )));
        };
        // Held first: whatever happens from here on, the dropper knows the
        // login may exist.
        self.store
            .hold_login(&HeldLogin {
                lease_id: lease.id.clone(),
                database: database.to_string(),
                user: user.to_owned(),
                held_at: Timestamp::now(),
            })
            .await?;
        self.engine
            .create(&LoginRequest {
                user: user.to_owned(),
                scopes: lease.scopes.iter().map(ToString::to_string).collect(),
                expires_at: lease.expires_at.to_system_time(),
            })
            .await
            .map_err(|e| match e {
                EngineError::Unavailable { .. } => BrokerError::DatabaseUnavailable(e.to_string()),
                EngineError::Refused { .. } => BrokerError::DatabaseRefused(e.to_string()),
            })
    }

    fn summary(&self, lease: &Lease) -> String {
        format!(
            "login {} in {} [{}]",
            lease.database_login().map_or("", |(_, u)| u),
            self.req.database,
            mayfly_core::scope_string(&self.req.scopes)
        )
    }
}

impl Issuance {
    /// Makes a login in a configured database under one of the caller's
    /// active tasks.
    pub async fn issue_database_login(
        &self,
        caller: &Caller,
        req: DatabaseLoginRequest,
    ) -> Result<Issued<IssuedDatabaseLogin>, BrokerError> {
        let engine = self
            .databases
            .iter()
            .find(|e| e.name() == req.database.as_str())
            .cloned()
            .ok_or_else(|| BrokerError::DatabaseNotFound(req.database.to_string()))?;
        let known = engine.scopes();
        if req.scopes.is_empty() {
            return Err(BrokerError::Invalid(format!(
                "scopes: ask for at least one of {}",
                known.join(", ")
            )));
        }
        if let Some(unknown) = req
            .scopes
            .iter()
            .find(|s| !known.contains(&s.to_string().as_str()))
        {
            return Err(BrokerError::Invalid(format!(
                "scope {unknown} is not one {} grants ({})",
                req.database,
                known.join(", ")
            )));
        }
        let kind = DatabaseLogin {
            req: &req,
            engine,
            store: &self.shared.store,
        };
        self.issue(caller, &kind, &req.task_id, req.approval_id.as_ref())
            .await
    }
}
