//! `[[databases]]`: one entry per database the broker makes logins in.
//!
//! ```toml
//! [[databases]]
//! name = "postgres://orders"             # the audience of its logins
//! url = "postgres://mayfly_manager@db.internal:5432/orders"
//! password_file = "secrets/orders-manager.password"
//! ca_file = "pki/orders-db-ca.pem"       # TLS with this CA only
//! connect = "postgres://db.internal:5432/orders?sslmode=verify-full"
//! pool = 2
//! prefix = "mayfly_"
//! connection_limit = 5
//! owned = "drop"                         # or "reassign:orders_owner"
//! default_ttl = "15m"                    # else the token lifetimes
//! max_ttl = "1h"
//! [databases.scopes]
//! "db:read" = ["GRANT orders_reader TO {role}"]
//! ```
//!
//! Everything is checked here, before the broker serves: the templates,
//! the prefix, the files. The manager's password is read from its file and
//! never from the URL.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::Engine;
use crate::template::{Grant, TemplateError};

/// Which system a database is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EngineKind {
    /// PostgreSQL roles.
    Postgres,
    /// Redis ACL users.
    Redis,
}

/// What happens to what a login owns when it is revoked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owned {
    /// `DROP OWNED`: its objects go with it (and its privileges).
    Drop,
    /// `REASSIGN OWNED … TO role`, then `DROP OWNED` for its privileges.
    Reassign(String),
}

/// One `[[databases]]` entry as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// The audience of its logins: `postgres://orders`, `redis://cache`.
    pub name: String,
    /// Which system; by default the scheme of `name`.
    #[serde(default)]
    pub engine: Option<EngineKind>,
    /// Where the broker manages logins, as its manager user (no password).
    pub url: String,
    /// A file holding the manager's password.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// TLS to the database, trusting only this CA (PEM).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// What the DSNs handed to agents point at; by default `url` without
    /// its user.
    #[serde(default)]
    pub connect: Option<String>,
    /// Connections the broker keeps to it.
    #[serde(default = "default_pool")]
    pub pool: usize,
    /// The prefix of every login (lower-case letters, digits, `_`).
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Sessions a login may hold at once (PostgreSQL).
    #[serde(default = "default_connection_limit")]
    pub connection_limit: u32,
    /// `drop` or `reassign:<role>` (PostgreSQL).
    #[serde(default = "default_owned")]
    pub owned: String,
    /// A login's lifetime when the request asks for none (`"15m"`); by
    /// default the broker's token default, within `max_ttl`.
    #[serde(default)]
    pub default_ttl: Option<String>,
    /// No login lives longer (`"1h"`); by default the broker's token
    /// maximum.
    #[serde(default)]
    pub max_ttl: Option<String>,
    /// What each scope grants: for PostgreSQL `GRANT … TO {role}`
    /// statements, for Redis ACL rules (`~orders:*`, `+@read`).
    pub scopes: BTreeMap<String, Vec<String>>,
}

fn default_pool() -> usize {
    2
}

fn default_prefix() -> String {
    "mayfly_".into()
}

fn default_connection_limit() -> u32 {
    5
}

fn default_owned() -> String {
    "drop".into()
}

/// Why a `[[databases]]` entry was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A field is wrong.
    #[error("[[databases]] {name:?}: {detail}")]
    Invalid {
        /// The entry's name.
        name: String,
        /// What is wrong.
        detail: String,
    },
    /// A scope's template could inject.
    #[error("[[databases]] {name:?}, scope {scope:?}: {source}")]
    Template {
        /// The entry's name.
        name: String,
        /// The scope.
        scope: String,
        /// Why.
        source: TemplateError,
    },
    /// A file could not be read.
    #[error("[[databases]] {name:?}: cannot read {path}: {source}")]
    File {
        /// The entry's name.
        name: String,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl DatabaseConfig {
    pub(crate) fn invalid(&self, detail: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            name: self.name.clone(),
            detail: detail.into(),
        }
    }

    /// The engine kind, given or from the name's scheme.
    pub fn kind(&self) -> Result<EngineKind, ConfigError> {
        if let Some(k) = self.engine {
            return Ok(k);
        }
        match self.name.split_once("://").map(|(s, _)| s) {
            Some("postgres" | "postgresql") => Ok(EngineKind::Postgres),
            Some("redis" | "rediss") => Ok(EngineKind::Redis),
            _ => Err(self.invalid(
                "say which engine it is (engine = \"postgres\" or \"redis\"), or name it \
                 postgres://… or redis://…",
            )),
        }
    }

    /// Reads a file named relative to `base`.
    pub(crate) fn read(&self, base: &Path, path: &Path) -> Result<Vec<u8>, ConfigError> {
        let full = base.join(path);
        std::fs::read(&full).map_err(|source| ConfigError::File {
            name: self.name.clone(),
            path: full,
            source,
        })
    }

    /// The manager's password, from its file (trailing newline trimmed).
    pub(crate) fn password(&self, base: &Path) -> Result<Option<crate::Secret>, ConfigError> {
        let Some(path) = &self.password_file else {
            return Ok(None);
        };
        let bytes = zeroize::Zeroizing::new(self.read(base, path)?);
        let text = std::str::from_utf8(&bytes)
            .map_err(|_| self.invalid("the password file is not UTF-8"))?;
        Ok(Some(crate::Secret::new(
            text.trim_end_matches(['\r', '\n']).to_owned(),
        )))
    }

    /// Checks the parts every engine shares.
    /// `default_ttl` and `max_ttl`, each a whole number of seconds, at
    /// least 1 s, and the default within the maximum.
    pub fn lifetimes(&self) -> Result<(Option<Duration>, Option<Duration>), ConfigError> {
        let parse = |field: &str, text: &Option<String>| -> Result<Option<Duration>, ConfigError> {
            let Some(text) = text else { return Ok(None) };
            match humantime::parse_duration(text) {
                Ok(d) if d.subsec_nanos() == 0 && !d.is_zero() => Ok(Some(d)),
                Ok(_) => Err(self.invalid(format!(
                    "{field} must be a whole number of seconds, at least 1s"
                ))),
                Err(e) => Err(self.invalid(format!(
                    "{field} {text:?}: {e} (e.g. \"90s\", \"5m\", \"1h\")"
                ))),
            }
        };
        let (default, max) = (
            parse("default_ttl", &self.default_ttl)?,
            parse("max_ttl", &self.max_ttl)?,
        );
        if let (Some(d), Some(m)) = (default, max)
            && d > m
        {
            return Err(self.invalid("default_ttl is longer than max_ttl"));
        }
        Ok((default, max))
    }

    fn check_common(&self) -> Result<(), ConfigError> {
        self.lifetimes()?;
        if self.name.is_empty() || self.name.len() > 255 || self.name.contains(char::is_whitespace)
        {
            return Err(self.invalid("the name must be 1 to 255 characters, no spaces"));
        }
        let prefix_ok = !self.prefix.is_empty()
            && self.prefix.len() <= 30
            && self.prefix.starts_with(|c: char| c.is_ascii_lowercase())
            && self
                .prefix
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_');
        if !prefix_ok {
            return Err(self.invalid(
                "prefix must be 1 to 30 lower-case letters, digits or `_`, starting with a letter",
            ));
        }
        if self.pool == 0 || self.pool > 64 {
            return Err(self.invalid("pool must be 1 to 64"));
        }
        if self.scopes.is_empty() {
            return Err(self.invalid("it grants no scope: add [databases.scopes]"));
        }
        for (scope, rules) in &self.scopes {
            if scope.is_empty() || scope.contains(char::is_whitespace) {
                return Err(self.invalid(format!("scope {scope:?} is not a scope")));
            }
            if rules.is_empty() {
                return Err(self.invalid(format!("scope {scope:?} grants nothing")));
            }
        }
        Ok(())
    }

    /// The PostgreSQL grants of each scope, checked.
    pub(crate) fn grants(&self) -> Result<BTreeMap<String, Vec<Grant>>, ConfigError> {
        self.scopes
            .iter()
            .map(|(scope, templates)| {
                let grants = templates
                    .iter()
                    .map(|t| Grant::parse(t))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|source| ConfigError::Template {
                        name: self.name.clone(),
                        scope: scope.clone(),
                        source,
                    })?;
                Ok((scope.clone(), grants))
            })
            .collect()
    }

    /// What revocation does with what a login owns.
    pub(crate) fn owned(&self) -> Result<Owned, ConfigError> {
        match self.owned.split_once(':') {
            None if self.owned == "drop" => Ok(Owned::Drop),
            Some(("reassign", role)) if !role.is_empty() => Ok(Owned::Reassign(role.to_owned())),
            _ => Err(self.invalid("owned must be \"drop\" or \"reassign:<role>\"")),
        }
    }
}

/// Checks `config` and builds its engine. Connects to nothing: the first
/// login does, so a database that is down at start does not stop the
/// broker (its logins are refused until it returns).
pub fn load(config: &DatabaseConfig, base: &Path) -> Result<Arc<dyn Engine>, ConfigError> {
    config.check_common()?;
    Ok(match config.kind()? {
        EngineKind::Postgres => Arc::new(crate::postgres::Postgres::new(config, base)?),
        EngineKind::Redis => Arc::new(crate::redis::RedisAcl::new(config, base)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(toml_text: &str) -> DatabaseConfig {
        #[derive(Deserialize)]
        struct File {
            databases: Vec<DatabaseConfig>,
        }
        let file: File = toml::from_str(toml_text).unwrap();
        file.databases.into_iter().next().unwrap()
    }

    #[test]
    fn lifetimes_are_whole_seconds_and_the_default_within_the_maximum() {
        let with = |lines: &str| {
            entry(&format!(
                "[[databases]]\nname = \"postgres://orders\"\n\
                 url = \"postgres://manager@127.0.0.1:5432/orders\"\n{lines}\n\
                 [databases.scopes]\n\"db:read\" = [\"GRANT r TO {{role}}\"]\n"
            ))
            .lifetimes()
        };
        assert_eq!(with("").unwrap(), (None, None));
        assert_eq!(
            with("default_ttl = \"5m\"\nmax_ttl = \"1h\"").unwrap(),
            (
                Some(Duration::from_secs(300)),
                Some(Duration::from_secs(3600))
            )
        );
        for (lines, says) in [
            (
                "default_ttl = \"2h\"\nmax_ttl = \"1h\"",
                "longer than max_ttl",
            ),
            ("max_ttl = \"1500ms\"", "whole number of seconds"),
            ("max_ttl = \"0s\"", "whole number of seconds"),
            ("max_ttl = \"soon\"", "e.g."),
        ] {
            let e = with(lines).unwrap_err().to_string();
            assert!(e.contains(says), "{lines}: {e}");
        }
    }

    #[test]
    fn an_injecting_template_is_refused_at_load() {
        let c = entry(
            r#"
            [[databases]]
            name = "postgres://orders"
            url = "postgres://manager@127.0.0.1:5432/orders"
            [databases.scopes]
            "db:read" = ["GRANT orders_reader TO {role}; DROP TABLE orders"]
            "#,
        );
        let e = load(&c, Path::new(".")).unwrap_err().to_string();
        assert!(e.contains("db:read") && e.contains("`;`"), "{e}");
    }

    #[test]
    fn a_password_in_the_url_or_a_bad_prefix_is_refused() {
        let c = entry(
            r#"
            [[databases]]
            name = "postgres://orders"
            url = "postgres://manager:hunter2@127.0.0.1:5432/orders"
            [databases.scopes]
            "db:read" = ["GRANT orders_reader TO {role}"]
            "#,
        );
        let e = load(&c, Path::new(".")).unwrap_err().to_string();
        assert!(e.contains("password_file") && !e.contains("hunter2"), "{e}");
        let c = entry(
            r#"
            [[databases]]
            name = "postgres://orders"
            url = "postgres://manager@127.0.0.1:5432/orders"
            prefix = "Mayfly-"
            [databases.scopes]
            "db:read" = ["GRANT orders_reader TO {role}"]
            "#,
        );
        assert!(load(&c, Path::new(".")).is_err());
    }

    #[test]
    fn a_redis_rule_that_changes_the_user_is_refused() {
        for rule in [">secret", "nopass", "on", "reset", "#abc", "+@all ~*", "<x"] {
            let c = entry(&format!(
                r#"
                [[databases]]
                name = "redis://cache"
                url = "redis://manager@127.0.0.1:6379"
                [databases.scopes]
                "cache:read" = [{rule:?}]
                "#
            ));
            assert!(load(&c, Path::new(".")).is_err(), "accepted {rule:?}");
        }
    }
}
