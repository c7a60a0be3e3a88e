//! Operator commands: `lease list|show|revoke`, `agent
//! revoke|lock|unlock|locks`, `task list`.

use std::time::Duration;

use clap::Subcommand;
use mayfly_client::pb;
use serde_json::json;

use crate::conn::{ConnArgs, Role};
use crate::output;

#[derive(Debug, Subcommand)]
pub enum LeaseCommand {
    /// List leases.
    List {
        /// Only leases of this task.
        #[arg(long)]
        task: Option<String>,
        /// Only leases of this agent (SPIFFE ID).
        #[arg(long)]
        agent: Option<String>,
        /// Only leases in this state: active, revoked, expired.
        #[arg(long, value_parser = parse_lease_state)]
        state: Option<pb::LeaseState>,
        /// Only this kind: task, jwt, x509.
        #[arg(long, value_parser = parse_lease_kind)]
        kind: Option<pb::LeaseKind>,
        /// Most leases to show.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Show one lease.
    Show {
        /// Lease id.
        id: String,
    },
    /// Revoke a lease (a task's lease revokes the whole task).
    Revoke {
        /// Lease id.
        id: String,
        /// Why, kept with the revocation.
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Revoke every live task and lease of an agent (it may start again;
    /// `lock` keeps it out).
    Revoke {
        /// The agent's SPIFFE ID.
        id: String,
        /// Why, kept with the revocation.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Keep an agent out: revoke everything it holds and refuse it every
    /// new task and credential, on every replica, until unlocked.
    Lock {
        /// The agent's SPIFFE ID.
        id: String,
        /// Why (required; the agent is told it when refused).
        #[arg(long)]
        reason: String,
        /// Lift the lock by itself after this long (e.g. 24h); default:
        /// until `agent unlock`.
        #[arg(long = "for", value_parser = humantime::parse_duration)]
        duration: Option<Duration>,
    },
    /// Lift an agent's lock.
    Unlock {
        /// The agent's SPIFFE ID.
        id: String,
        /// Kept in the audit trail.
        #[arg(long)]
        note: Option<String>,
    },
    /// List the locks in force.
    Locks,
}

fn parse_lease_state(s: &str) -> Result<pb::LeaseState, String> {
    pb::LeaseState::from_str_name(&format!("LEASE_STATE_{}", s.to_ascii_uppercase()))
        .filter(|s| *s != pb::LeaseState::Unspecified)
        .ok_or_else(|| format!("{s:?}: expected active, revoked or expired"))
}

fn parse_lease_kind(s: &str) -> Result<pb::LeaseKind, String> {
    pb::LeaseKind::from_str_name(&format!("LEASE_KIND_{}", s.to_ascii_uppercase()))
        .filter(|s| *s != pb::LeaseKind::Unspecified)
        .ok_or_else(|| format!("{s:?}: expected task, jwt or x509"))
}

pub fn parse_task_state(s: &str) -> Result<pb::TaskState, String> {
    pb::TaskState::from_str_name(&format!("TASK_STATE_{}", s.to_ascii_uppercase()))
        .filter(|s| *s != pb::TaskState::Unspecified)
        .ok_or_else(|| format!("{s:?}: expected active, completed, revoked or expired"))
}

pub fn print_revoked(ids: &[String]) {
    if ids.is_empty() {
        println!("nothing was active");
    } else {
        println!("revoked {} lease(s):", ids.len());
        for id in ids {
            println!("  {id}");
        }
    }
}

/// Fetches up to `limit` items page by page.
async fn paged<T, F, Fut>(limit: u32, mut fetch: F) -> anyhow::Result<Vec<T>>
where
    F: FnMut(u32, String) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<T>, String), tonic::Status>>,
{
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let want = (limit as usize).saturating_sub(out.len()).min(1000) as u32;
        if want == 0 {
            break;
        }
        let (items, next) = fetch(want, token).await?;
        out.extend(items);
        if next.is_empty() {
            break;
        }
        token = next;
    }
    Ok(out)
}

pub async fn lease(cmd: LeaseCommand, conn: &ConnArgs, json: bool) -> anyhow::Result<()> {
    let client = conn.connect(Role::Operator).await?;
    let mut admin = client.admin();
    match cmd {
        LeaseCommand::List {
            task,
            agent,
            state,
            kind,
            limit,
        } => {
            let leases = paged(limit, |page_size, page_token| {
                let req = pb::ListLeasesRequest {
                    task_id: task.clone().unwrap_or_default(),
                    agent_id: agent.clone().unwrap_or_default(),
                    state: state.map_or(0, Into::into),
                    kind: kind.map_or(0, Into::into),
                    page_size,
                    page_token,
                };
                let mut admin = admin.clone();
                async move {
                    let r = admin.list_leases(req).await?.into_inner();
                    Ok((r.leases, r.next_page_token))
                }
            })
            .await?;
            if json {
                output::print_json(&json!(
                    leases.iter().map(output::lease_json).collect::<Vec<_>>()
                ));
            } else {
                let rows: Vec<Vec<String>> = leases
                    .iter()
                    .map(|l| {
                        vec![
                            l.lease_id.clone(),
                            output::lease_kind(l.kind),
                            output::lease_state(l.state),
                            l.task_id.clone(),
                            l.agent_id.clone(),
                            l.audience.clone(),
                            output::time(l.expires_at.as_ref()),
                            output::reason(l.revocation_reason),
                        ]
                    })
                    .collect();
                output::table(
                    &[
                        "LEASE", "KIND", "STATE", "TASK", "AGENT", "AUDIENCE", "EXPIRES", "REASON",
                    ],
                    &rows,
                );
            }
        }
        LeaseCommand::Show { id } => {
            let l = admin
                .get_lease(pb::GetLeaseRequest { lease_id: id })
                .await?
                .into_inner();
            if json {
                output::print_json(&output::lease_json(&l));
            } else {
                output::print_lease(&l);
            }
        }
        LeaseCommand::Revoke { id, reason } => {
            let r = admin
                .revoke_lease(pb::RevokeLeaseRequest {
                    lease_id: id.clone(),
                    note: reason.unwrap_or_default(),
                })
                .await?
                .into_inner();
            if json {
                output::print_json(&json!({"lease_id": id, "revoked_leases": r.revoked_leases}));
            } else {
                print_revoked(&r.revoked_leases);
            }
        }
    }
    Ok(())
}

pub async fn agent(cmd: AgentCommand, conn: &ConnArgs, json: bool) -> anyhow::Result<()> {
    let client = conn.connect(Role::Operator).await?;
    let mut admin = client.admin();
    match cmd {
        AgentCommand::Revoke { id, reason } => {
            let r = admin
                .revoke_agent(pb::RevokeAgentRequest {
                    agent_id: id.clone(),
                    note: reason.unwrap_or_default(),
                })
                .await?
                .into_inner();
            if json {
                output::print_json(&json!({"agent_id": id, "revoked_leases": r.revoked_leases}));
            } else {
                println!("revoked agent {id}");
                print_revoked(&r.revoked_leases);
            }
        }
        AgentCommand::Lock {
            id,
            reason,
            duration,
        } => {
            let r = admin
                .lock_agent(pb::LockAgentRequest {
                    agent_id: id.clone(),
                    reason,
                    ttl_seconds: duration.map_or(0, mayfly_client::ttl_seconds),
                })
                .await?
                .into_inner();
            let lock = r.lock.unwrap_or_default();
            if json {
                let mut v = lock_json(&lock);
                v["revoked_leases"] = json!(r.revoked_leases);
                output::print_json(&v);
            } else {
                let until = match output::time(lock.expires_at.as_ref()) {
                    t if t.is_empty() => "until unlocked".to_owned(),
                    t => format!("until {t}"),
                };
                println!("locked agent {id} {until}");
                print_revoked(&r.revoked_leases);
            }
        }
        AgentCommand::Unlock { id, note } => {
            let lock = admin
                .unlock_agent(pb::UnlockAgentRequest {
                    agent_id: id.clone(),
                    note: note.unwrap_or_default(),
                })
                .await?
                .into_inner();
            if json {
                output::print_json(&lock_json(&lock));
            } else {
                println!(
                    "unlocked agent {id} (locked by {}: {})",
                    lock.locked_by, lock.reason
                );
            }
        }
        AgentCommand::Locks => {
            let locks = admin
                .list_agent_locks(pb::ListAgentLocksRequest {})
                .await?
                .into_inner()
                .locks;
            if json {
                output::print_json(&json!(locks.iter().map(lock_json).collect::<Vec<_>>()));
            } else {
                let rows: Vec<Vec<String>> = locks
                    .iter()
                    .map(|l| {
                        vec![
                            l.agent_id.clone(),
                            l.locked_by.clone(),
                            output::time(l.locked_at.as_ref()),
                            output::time(l.expires_at.as_ref()),
                            l.reason.clone(),
                        ]
                    })
                    .collect();
                output::table(&["AGENT", "LOCKED BY", "SINCE", "UNTIL", "REASON"], &rows);
            }
        }
    }
    Ok(())
}

fn lock_json(l: &pb::AgentLock) -> serde_json::Value {
    json!({
        "agent_id": l.agent_id,
        "reason": l.reason,
        "locked_by": l.locked_by,
        "locked_at": output::time(l.locked_at.as_ref()),
        "expires_at": (l.expires_at.is_some()).then(|| output::time(l.expires_at.as_ref())),
    })
}

pub async fn list_tasks(
    conn: &ConnArgs,
    json: bool,
    agent: Option<String>,
    state: Option<pb::TaskState>,
    parent: Option<String>,
    limit: u32,
) -> anyhow::Result<()> {
    let client = conn.connect(Role::Operator).await?;
    let admin = client.admin();
    let tasks = paged(limit, |page_size, page_token| {
        let req = pb::ListTasksRequest {
            agent_id: agent.clone().unwrap_or_default(),
            state: state.map_or(0, Into::into),
            page_size,
            page_token,
            parent_task_id: parent.clone().unwrap_or_default(),
        };
        let mut admin = admin.clone();
        async move {
            let r = admin.list_tasks(req).await?.into_inner();
            Ok((r.tasks, r.next_page_token))
        }
    })
    .await?;
    if json {
        output::print_json(&json!(
            tasks.iter().map(output::task_json).collect::<Vec<_>>()
        ));
    } else {
        let rows: Vec<Vec<String>> = tasks
            .iter()
            .map(|t| {
                let intent: String = t.intent.chars().take(40).collect();
                vec![
                    t.task_id.clone(),
                    output::task_state(t.state),
                    t.agent_id.clone(),
                    output::time(t.expires_at.as_ref()),
                    intent.replace('\n', " "),
                ]
            })
            .collect();
        output::table(&["TASK", "STATE", "AGENT", "EXPIRES", "INTENT"], &rows);
    }
    Ok(())
}
