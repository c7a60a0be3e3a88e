//! `mayfly db`: logins in the databases the broker manages, for agents.

use std::time::Duration;

use clap::Subcommand;
use mayfly_client::pb;
use serde_json::json;

use crate::conn::{ConnArgs, Role};
use crate::output;

#[derive(Debug, Subcommand)]
pub enum DbCommand {
    /// Make a login in a database under a task; prints its DSN on stdout
    /// (details on stderr), or with --env the variables its clients read.
    Login {
        /// Task id.
        #[arg(long)]
        task: String,
        /// The database's configured name, e.g. postgres://orders.
        #[arg(long)]
        database: String,
        /// Scope (repeat for more), e.g. db:read.
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// Lifetime, e.g. 15m (default: the broker's).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// Print `export` lines instead of the DSN: PGHOST, PGPORT,
        /// PGDATABASE, PGUSER, PGPASSWORD (and PGSSLMODE) for PostgreSQL,
        /// REDIS_URL for Redis.
        #[arg(long)]
        env: bool,
        /// When policy requires approval, wait this long for an operator
        /// (e.g. 10m); without it the command ends with exit code 3.
        #[arg(long, value_parser = humantime::parse_duration)]
        wait: Option<Duration>,
        /// Collect a request an operator approved (same arguments).
        #[arg(long)]
        approval: Option<String>,
    },
}

pub async fn run(cmd: DbCommand, conn: &ConnArgs, json: bool) -> anyhow::Result<()> {
    let DbCommand::Login {
        task,
        database,
        scopes,
        ttl,
        env,
        wait,
        approval,
    } = cmd;
    let client = conn.connect(Role::Agent).await?;
    if let (Some(id), Some(wait)) = (&approval, wait) {
        crate::approval::await_existing(&client, id, wait).await?;
    }
    let mut req = pb::IssueDatabaseCredentialRequest {
        task_id: task,
        database,
        scopes,
        ttl_seconds: ttl.map_or(0, mayfly_client::ttl_seconds),
        approval_id: approval.unwrap_or_default(),
    };
    let login = loop {
        let login = client
            .broker()
            .issue_database_credential(req.clone())
            .await?
            .into_inner();
        match &login.approval {
            Some(pending) => {
                req.approval_id =
                    crate::approval::await_decision(&client, pending, wait.unwrap_or_default())
                        .await?;
            }
            None => break login,
        }
    };
    if json {
        output::print_json(&json!({
            "lease_id": login.lease_id,
            "database": login.database,
            "user": login.user,
            "password": login.password,
            "dsn": login.dsn,
            "expires_at": output::time(login.expires_at.as_ref()),
        }));
        return Ok(());
    }
    // Details on stderr, so `DSN=$(mayfly db login …)` or
    // `eval "$(mayfly db login --env …)"` captures the secret alone.
    eprintln!(
        "lease {} login {} in {}, expires {}",
        login.lease_id,
        login.user,
        login.database,
        output::time(login.expires_at.as_ref())
    );
    if env {
        for (name, value) in env_lines(&login.dsn)? {
            println!("export {name}={}", shell_quote(&value));
        }
    } else {
        println!("{}", login.dsn);
    }
    Ok(())
}

/// The variables a database's own clients read, from its DSN.
fn env_lines(dsn: &str) -> anyhow::Result<Vec<(&'static str, String)>> {
    let url = url::Url::parse(dsn)?;
    if url.scheme().starts_with("redis") {
        return Ok(vec![("REDIS_URL", dsn.to_owned())]);
    }
    let decode = |s: &str| {
        percent_decode(s)
            .ok_or_else(|| anyhow::anyhow!("the DSN the broker answered is not well formed"))
    };
    let mut out = vec![
        ("PGHOST", url.host_str().unwrap_or_default().to_owned()),
        ("PGPORT", url.port().unwrap_or(5432).to_string()),
        ("PGDATABASE", decode(url.path().trim_start_matches('/'))?),
        ("PGUSER", decode(url.username())?),
        ("PGPASSWORD", decode(url.password().unwrap_or_default())?),
    ];
    if let Some((_, mode)) = url.query_pairs().find(|(k, _)| k == "sslmode") {
        out.push(("PGSSLMODE", mode.into_owned()));
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `s` in single quotes for a POSIX shell.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_postgres_dsn_becomes_the_pg_variables() {
        let lines =
            env_lines("postgres://mayfly_ab:p-w_1@db.internal:6543/orders?sslmode=verify-full")
                .unwrap();
        assert_eq!(
            lines,
            vec![
                ("PGHOST", "db.internal".to_owned()),
                ("PGPORT", "6543".to_owned()),
                ("PGDATABASE", "orders".to_owned()),
                ("PGUSER", "mayfly_ab".to_owned()),
                ("PGPASSWORD", "p-w_1".to_owned()),
                ("PGSSLMODE", "verify-full".to_owned()),
            ]
        );
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        let redis = env_lines("redis://u:p@127.0.0.1:6379").unwrap();
        assert_eq!(
            redis,
            vec![("REDIS_URL", "redis://u:p@127.0.0.1:6379".to_owned())]
        );
    }
}
