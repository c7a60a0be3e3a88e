//! Secrets engines: logins in systems that cannot check a Mayfly token
//! (PostgreSQL roles, Redis ACL users), each made for one lease and gone
//! with it.
//!
//! [`Engine`] is the seam. The broker decides, records the lease and
//! queues the revocation; an engine only does what the system it manages
//! needs: [`create`](Engine::create) a login for a lease,
//! [`disable`](Engine::disable) it (no new session, its sessions told to
//! end), confirm its sessions [`ended`](Engine::ended),
//! [`remove`](Engine::remove) it, and say whether one still
//! [`exists`](Engine::exists), so
//! that a revocation is only taken as done once the login is confirmed
//! gone. [`existing`](Engine::existing) lists every login of the engine's
//! prefix, for the sweep that drops the ones no lease accounts for.
//!
//! Nothing here links the broker, and nothing here keeps a password: it
//! lives in the [`Login`] handed back, whose `Debug` redacts it.

use std::fmt;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use zeroize::Zeroizing;

pub mod config;
pub mod postgres;
pub mod redis;
mod template;

pub use config::{ConfigError, DatabaseConfig, EngineKind, load};
pub use template::{Grant, TemplateError};

/// A login to create for one lease.
#[derive(Debug, Clone)]
pub struct LoginRequest {
    /// The login's name (a [`login_name`]).
    pub user: String,
    /// The scopes it is granted, each one the engine knows.
    pub scopes: Vec<String>,
    /// When the lease expires: the system refuses the login from then on
    /// by itself where it can (PostgreSQL's `VALID UNTIL`).
    pub expires_at: SystemTime,
}

/// A secret string: its `Debug` and `Display` are redacted, and its memory
/// is wiped when dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    /// Wraps `s`.
    pub fn new(s: String) -> Self {
        Self(Zeroizing::new(s))
    }

    /// The secret itself, for the one place that hands it over.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// A login just made: what its holder needs, and nothing kept after.
#[derive(Debug, Clone)]
pub struct Login {
    /// The user (role) name.
    pub user: String,
    /// Its password.
    pub password: Secret,
    /// How to connect: a URL with the user and password in it.
    pub dsn: Secret,
}

/// Why an engine call failed. Its text never holds a password.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// The system could not be reached (or did not answer in time):
    /// retry later.
    #[error("{database} is unreachable: {detail}")]
    Unavailable {
        /// The configured database's name.
        database: String,
        /// What failed.
        detail: String,
    },
    /// The system refused a statement (a grant of a role that does not
    /// exist, a permission the manager lacks, …).
    #[error("{database} refused {step}: {detail}")]
    Refused {
        /// The configured database's name.
        database: String,
        /// Which step.
        step: &'static str,
        /// The system's message.
        detail: String,
    },
}

impl EngineError {
    /// Whether trying again later may succeed.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }
}

/// A secrets engine: one configured database.
#[async_trait]
pub trait Engine: Send + Sync + fmt::Debug {
    /// The database's name, which is the audience its logins are issued
    /// for (`postgres://orders`).
    fn name(&self) -> &str;

    /// The scopes it knows, in order.
    fn scopes(&self) -> Vec<&str>;

    /// The prefix of every login it makes.
    fn prefix(&self) -> &str;

    /// Creates the login: all of it, or nothing (a login that could not
    /// be granted its scopes is not left behind).
    async fn create(&self, req: &LoginRequest) -> Result<Login, EngineError>;

    /// Makes the logins `users` unusable at once: none can log in any
    /// more, and their open sessions are told to end. Many at a time, so
    /// that a mass revocation shuts every login before it drops any, and
    /// quick: it does not wait for the sessions to be gone
    /// ([`ended`](Self::ended) does). Done for a login already gone; an
    /// error for one is an error for the call.
    async fn disable(&self, users: &[String]) -> Result<(), EngineError>;

    /// Returns once no session of the disabled logins `users` is left,
    /// ending any still there. At once by default, for systems whose
    /// disabling ends sessions itself.
    async fn ended(&self, users: &[String]) -> Result<(), EngineError> {
        let _ = users;
        Ok(())
    }

    /// Removes a disabled login: what it owns is handled as configured,
    /// then it is dropped. Done for a login already gone.
    async fn remove(&self, user: &str) -> Result<(), EngineError>;

    /// Ends the login: [`disable`](Self::disable),
    /// [`ended`](Self::ended), then [`remove`](Self::remove). Each step
    /// stands on its own, so one that fails does not undo the ones before
    /// it, and running it again after a failure (or on a login already
    /// gone) finishes the rest.
    async fn revoke(&self, user: &str) -> Result<(), EngineError> {
        let users = [user.to_owned()];
        self.disable(&users).await?;
        self.ended(&users).await?;
        self.remove(user).await
    }

    /// Whether the login `user` exists.
    async fn exists(&self, user: &str) -> Result<bool, EngineError>;

    /// Every login that exists now with a name this engine makes
    /// ([`is_login_name`] of its prefix), never its own manager.
    async fn existing(&self) -> Result<Vec<String>, EngineError>;
}

/// A fresh login name: `prefix` and 24 random lower-case hex digits (96
/// bits), a plain identifier in every system that fits PostgreSQL's 63
/// bytes. The lease records it, so the login's lease is found by name.
pub fn login_name(prefix: &str) -> String {
    let mut bytes = [0u8; 12];
    #[allow(clippy::expect_used)] // Without randomness nothing may be issued.
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .expect("the OS has no randomness");
    let mut name = String::with_capacity(prefix.len() + 24);
    name.push_str(prefix);
    for b in bytes {
        name.push_str(&format!("{b:02x}"));
    }
    name
}

/// Whether `name` is one [`login_name`] could make with `prefix`: the
/// prefix and exactly 24 lower-case hex digits. Only such names are ever
/// listed as an engine's logins, so the sweep never touches a role that
/// merely shares the prefix (the manager's own, a person's).
pub fn is_login_name(prefix: &str, name: &str) -> bool {
    name.strip_prefix(prefix).is_some_and(|rest| {
        rest.len() == 24 && rest.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// A fresh password: 32 random bytes, base64url (43 characters, safe in a
/// URL as it is).
pub fn random_password() -> Secret {
    let mut bytes = Zeroizing::new([0u8; 32]);
    #[allow(clippy::expect_used)] // Without randomness nothing may be issued.
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), bytes.as_mut())
        .expect("the OS has no randomness");
    Secret::new(URL_SAFE_NO_PAD.encode(bytes.as_ref()))
}

/// How long an engine waits for its system before it calls it
/// unavailable.
pub const TIMEOUT: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_names_are_plain_and_differ_per_lease() {
        let a = login_name("mayfly_");
        let b = login_name("mayfly_");
        assert_ne!(a, b);
        assert_eq!(a.len(), "mayfly_".len() + 24);
        assert!(is_login_name("mayfly_", &a));
        for other in [
            "mayfly_manager",
            "mayfly_",
            "other_0123456789abcdef01234567",
            &format!("{a}0"),
        ] {
            assert!(!is_login_name("mayfly_", other), "{other}");
        }
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
        );
    }

    #[test]
    fn secrets_are_redacted() {
        let p = random_password();
        assert_eq!(p.expose().len(), 43);
        assert!(!format!("{p:?}").contains(p.expose()));
        let login = Login {
            user: "u".into(),
            password: p.clone(),
            dsn: Secret::new(format!("postgres://u:{}@h/d", p.expose())),
        };
        assert!(!format!("{login:?}").contains(p.expose()));
    }
}
