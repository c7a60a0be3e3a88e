//! Output for people (aligned tables, RFC 3339 times) and for scripts
//! (`--json`, one JSON document per command).

use std::time::{Duration, UNIX_EPOCH};

use mayfly_client::pb;
use serde_json::{Value, json};

/// Ends the program after standard output failed: quietly (status 0) when
/// the reader went away (a closed pipe), else with the error on stderr.
pub fn stdout_failed(e: &std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("error: cannot write to standard output: {e}");
    std::process::exit(1);
}

/// Formats a protobuf timestamp as RFC 3339 (UTC, seconds).
pub fn time(ts: Option<&prost_types::Timestamp>) -> String {
    match ts {
        Some(t) if t.seconds > 0 => {
            let st = UNIX_EPOCH + Duration::from_secs(u64::try_from(t.seconds).unwrap_or(0));
            humantime::format_rfc3339_seconds(st).to_string()
        }
        _ => String::new(),
    }
}

fn enum_name(name: &str, prefix: &str) -> String {
    name.trim_start_matches(prefix).to_ascii_lowercase()
}

/// `task_completed` for `REVOCATION_REASON_TASK_COMPLETED`, empty if unset.
pub fn reason(v: i32) -> String {
    match pb::RevocationReason::try_from(v) {
        Ok(pb::RevocationReason::Unspecified) | Err(_) => String::new(),
        Ok(r) => enum_name(r.as_str_name(), "REVOCATION_REASON_"),
    }
}

/// The lower-case task state.
pub fn task_state(v: i32) -> String {
    pb::TaskState::try_from(v).map_or_else(
        |_| "?".into(),
        |s| enum_name(s.as_str_name(), "TASK_STATE_"),
    )
}

/// The lower-case lease state.
pub fn lease_state(v: i32) -> String {
    pb::LeaseState::try_from(v).map_or_else(
        |_| "?".into(),
        |s| enum_name(s.as_str_name(), "LEASE_STATE_"),
    )
}

/// The lower-case lease kind.
pub fn lease_kind(v: i32) -> String {
    pb::LeaseKind::try_from(v).map_or_else(
        |_| "?".into(),
        |s| enum_name(s.as_str_name(), "LEASE_KIND_"),
    )
}

/// A task as JSON.
pub fn task_json(t: &pb::Task) -> Value {
    let env = t.envelope.clone().unwrap_or_default();
    json!({
        "task_id": t.task_id,
        "agent_id": t.agent_id,
        "intent": t.intent,
        "context": t.context,
        "audiences": env.audiences,
        "scopes": env.scopes,
        "state": task_state(t.state),
        "created_at": time(t.created_at.as_ref()),
        "expires_at": time(t.expires_at.as_ref()),
        "ended_at": time(t.ended_at.as_ref()),
        "revocation_reason": reason(t.revocation_reason),
        "parent_task_id": t.parent_task_id,
        "delegated_by": t.delegated_by,
    })
}

/// A lease as JSON.
pub fn lease_json(l: &pb::Lease) -> Value {
    json!({
        "lease_id": l.lease_id,
        "kind": lease_kind(l.kind),
        "agent_id": l.agent_id,
        "task_id": l.task_id,
        "audience": l.audience,
        "scopes": l.scopes,
        "state": lease_state(l.state),
        "issued_at": time(l.issued_at.as_ref()),
        "expires_at": time(l.expires_at.as_ref()),
        "revocation_reason": reason(l.revocation_reason),
        "revoked_at": time(l.revoked_at.as_ref()),
        "revoked_by": l.revoked_by,
        "cert_thumbprint": l.cert_thumbprint,
        "serial": l.serial,
    })
}

/// Prints rows as an aligned table with a header.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// Prints `key: value` lines, aligned.
pub fn fields(pairs: &[(&str, String)]) {
    let w = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in pairs {
        if !v.is_empty() {
            println!("{:<w$}  {v}", format!("{k}:"), w = w + 1);
        }
    }
}

/// Prints a JSON document.
pub fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Prints a task for people.
pub fn print_task(t: &pb::Task) {
    let env = t.envelope.clone().unwrap_or_default();
    let mut context: Vec<String> = t.context.iter().map(|(k, v)| format!("{k}={v}")).collect();
    context.sort();
    fields(&[
        ("task", t.task_id.clone()),
        ("agent", t.agent_id.clone()),
        ("state", task_state(t.state)),
        ("intent", t.intent.clone()),
        ("context", context.join(" ")),
        ("audiences", env.audiences.join(" ")),
        ("scopes", env.scopes.join(" ")),
        ("parent", t.parent_task_id.clone()),
        ("delegated by", t.delegated_by.join(" -> ")),
        ("created", time(t.created_at.as_ref())),
        ("expires", time(t.expires_at.as_ref())),
        ("ended", time(t.ended_at.as_ref())),
        ("reason", reason(t.revocation_reason)),
    ]);
}

/// Prints a lease for people.
pub fn print_lease(l: &pb::Lease) {
    fields(&[
        ("lease", l.lease_id.clone()),
        ("kind", lease_kind(l.kind)),
        ("state", lease_state(l.state)),
        ("agent", l.agent_id.clone()),
        ("task", l.task_id.clone()),
        ("audience", l.audience.clone()),
        ("scopes", l.scopes.join(" ")),
        ("issued", time(l.issued_at.as_ref())),
        ("expires", time(l.expires_at.as_ref())),
        ("reason", reason(l.revocation_reason)),
        ("revoked", time(l.revoked_at.as_ref())),
        ("revoked by", l.revoked_by.clone()),
        ("bound to", l.cert_thumbprint.clone()),
        ("serial", l.serial.clone()),
    ]);
}
