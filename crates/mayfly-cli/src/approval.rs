//! Approvals: operators list, approve and deny; agents wait for a decision
//! and collect (`token issue --wait`, `--approval`).

use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Subcommand;
use mayfly_client::{Client, pb};
use serde_json::{Value, json};

use crate::conn::{ConnArgs, Role};
use crate::output;

/// A request is still waiting for an operator: the command ends with exit
/// code 3 and says how to go on.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StillPending(pub String);

#[derive(Debug, Subcommand)]
pub enum ApprovalCommand {
    /// Approvals waiting for an operator (with --all: every recent one).
    List {
        /// Include decided, used and expired approvals.
        #[arg(long)]
        all: bool,
    },
    /// Approve a pending request; the agent may then collect it once.
    Approve {
        /// Approval id.
        id: String,
        /// Why (a change ticket, say); kept with the decision.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Deny a pending request.
    Deny {
        /// Approval id.
        id: String,
        /// Why, told to the agent.
        #[arg(long)]
        reason: Option<String>,
    },
}

pub fn state(v: i32) -> String {
    pb::ApprovalState::try_from(v).map_or_else(
        |_| "?".into(),
        |s| {
            s.as_str_name()
                .trim_start_matches("APPROVAL_STATE_")
                .to_ascii_lowercase()
        },
    )
}

pub fn approval_json(a: &pb::Approval) -> Value {
    json!({
        "approval_id": a.approval_id,
        "state": state(a.state),
        "agent_id": a.agent_id,
        "task_id": a.task_id,
        "task_intent": a.task_intent,
        "task_context": a.task_context,
        "kind": if a.tool.is_empty() { output::lease_kind(a.kind) } else { "tool_call".to_owned() },
        "audience": a.audience,
        "scopes": a.scopes,
        "ttl_seconds": a.ttl_seconds,
        "bind_to_client_cert": a.bind_to_client_cert,
        "key_sha256": a.key_sha256,
        "tool": a.tool,
        "arguments_sha256": a.arguments_sha256,
        "policy_id": a.policy_id,
        "created_at": output::time(a.created_at.as_ref()),
        "expires_at": output::time(a.expires_at.as_ref()),
        "decided_by": a.decided_by,
        "reason": a.reason,
    })
}

fn show(a: &pb::Approval, json: bool) {
    if json {
        output::print_json(&approval_json(a));
        return;
    }
    let mut context: Vec<String> = a
        .task_context
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    context.sort();
    output::fields(&[
        ("approval", a.approval_id.clone()),
        ("state", state(a.state)),
        ("agent", a.agent_id.clone()),
        ("task", a.task_id.clone()),
        ("intent", a.task_intent.clone()),
        ("context", context.join(" ")),
        (
            "kind",
            if a.tool.is_empty() {
                output::lease_kind(a.kind)
            } else {
                "tool call".to_owned()
            },
        ),
        ("audience", a.audience.clone()),
        ("scopes", a.scopes.join(" ")),
        ("tool", a.tool.clone()),
        (
            "arguments",
            match a.arguments_sha256.as_str() {
                "" => String::new(),
                h => format!("sha256:{h}"),
            },
        ),
        ("policy", a.policy_id.clone()),
        ("expires", output::time(a.expires_at.as_ref())),
        ("decided by", a.decided_by.clone()),
        ("reason", a.reason.clone()),
    ]);
}

pub async fn run(cmd: ApprovalCommand, conn: &ConnArgs, json: bool) -> anyhow::Result<()> {
    let client = conn.connect(Role::Operator).await?;
    let mut admin = client.admin();
    match cmd {
        ApprovalCommand::List { all } => {
            let list = admin
                .list_approvals(pb::ListApprovalsRequest {
                    all,
                    page_size: 1000,
                    page_token: String::new(),
                })
                .await?
                .into_inner()
                .approvals;
            if json {
                output::print_json(&json!(list.iter().map(approval_json).collect::<Vec<_>>()));
            } else {
                let rows: Vec<Vec<String>> = list
                    .iter()
                    .map(|a| {
                        vec![
                            a.approval_id.clone(),
                            state(a.state),
                            a.agent_id.clone(),
                            a.task_id.clone(),
                            if a.tool.is_empty() {
                                output::lease_kind(a.kind)
                            } else {
                                "tool".to_owned()
                            },
                            if a.tool.is_empty() {
                                a.audience.clone()
                            } else {
                                a.tool.clone()
                            },
                            a.scopes.join(" "),
                            a.policy_id.clone(),
                            a.task_intent.chars().take(40).collect(),
                        ]
                    })
                    .collect();
                output::table(
                    &[
                        "APPROVAL", "STATE", "AGENT", "TASK", "KIND", "FOR", "SCOPES", "POLICY",
                        "INTENT",
                    ],
                    &rows,
                );
            }
        }
        ApprovalCommand::Approve { id, reason } => {
            let a = admin
                .approve(pb::DecideApprovalRequest {
                    approval_id: id,
                    reason: reason.unwrap_or_default(),
                })
                .await?
                .into_inner();
            show(&a, json);
        }
        ApprovalCommand::Deny { id, reason } => {
            let a = admin
                .deny(pb::DecideApprovalRequest {
                    approval_id: id,
                    reason: reason.unwrap_or_default(),
                })
                .await?
                .into_inner();
            show(&a, json);
        }
    }
    Ok(())
}

/// Policy asked for an approval: says so, then waits up to `wait` for an
/// operator. Returns the id to collect with once approved.
pub async fn await_decision(
    client: &Client,
    pending: &pb::Approval,
    wait: Duration,
) -> anyhow::Result<String> {
    let id = &pending.approval_id;
    eprintln!(
        "approval required by policy {}: {id} (an operator runs `mayfly approval approve {id}`)",
        pending.policy_id
    );
    decided(client, pending.clone(), wait).await
}

/// Before collecting `--approval ID` with `--wait`: waits for the decision
/// first, so an agent can be started again on an approval still pending.
pub async fn await_existing(client: &Client, id: &str, wait: Duration) -> anyhow::Result<()> {
    let current = client
        .broker()
        .wait_approval(pb::WaitApprovalRequest {
            approval_id: id.to_owned(),
            wait_seconds: 0,
        })
        .await?
        .into_inner();
    decided(client, current, wait).await.map(drop)
}

/// Waits up to `wait` while `current` is pending. Fails if it is denied or
/// expired, and with [`StillPending`] if no decision came in time.
async fn decided(client: &Client, current: pb::Approval, wait: Duration) -> anyhow::Result<String> {
    let id = current.approval_id.clone();
    let mut current = current;
    let deadline = Instant::now() + wait;
    loop {
        match pb::ApprovalState::try_from(current.state) {
            Ok(pb::ApprovalState::Approved) => {
                eprintln!("approved by {}", current.decided_by);
                return Ok(id);
            }
            Ok(pb::ApprovalState::Denied) => {
                let why = if current.reason.is_empty() {
                    String::new()
                } else {
                    format!(": {}", current.reason)
                };
                bail!("approval {id} was denied by {}{why}", current.decided_by)
            }
            Ok(pb::ApprovalState::Pending) => {}
            _ => bail!("approval {id} is {}", state(current.state)),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(StillPending(format!(
                "approval {id} is still pending; once approved, repeat the command with --approval {id}"
            ))
            .into());
        }
        current = client
            .broker()
            .wait_approval(pb::WaitApprovalRequest {
                approval_id: id.clone(),
                wait_seconds: left.as_secs().clamp(1, 60) as u32,
            })
            .await?
            .into_inner();
    }
}
