//! Agent commands: `task start|delegate|get|complete|context`, `token issue|decode`, and the
//! operator's `task list|revoke` (tasks are one noun for both).

use std::collections::HashMap;
use std::io::Read;
use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use clap::Subcommand;
use mayfly_client::pb;
use serde_json::json;

use crate::conn::{ConnArgs, Role};
use crate::operator::{parse_task_state, print_revoked};
use crate::output;

#[derive(Debug, Subcommand)]
pub enum TaskCommand {
    /// Open a task (agent).
    Start {
        /// What the task is for.
        #[arg(long)]
        intent: String,
        /// Audience the task may need tokens for (repeat for more).
        #[arg(long = "audience", required = true)]
        audiences: Vec<String>,
        /// Scope the task may need (repeat for more).
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// Context for policy, key=value (repeat for more).
        #[arg(long = "context", value_parser = parse_kv)]
        context: Vec<(String, String)>,
        /// Lifetime, e.g. 10m (default: the broker's).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
    /// Hand part of one of your tasks to another agent (agent): a new task
    /// it owns, within this one's audiences, scopes and lifetime, ending
    /// with it.
    Delegate {
        /// Your task to delegate from.
        parent: String,
        /// SPIFFE ID of the agent that will own the new task.
        #[arg(long)]
        to: String,
        /// What the delegate is to do.
        #[arg(long)]
        intent: String,
        /// Audience (repeat for more); within the parent's.
        #[arg(long = "audience", required = true)]
        audiences: Vec<String>,
        /// Scope (repeat for more); within the parent's.
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// Lifetime, e.g. 10m (default: the broker's; never past the parent).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
    /// Show one of your tasks (agent).
    Get {
        /// Task id.
        id: String,
    },
    /// Complete a task, revoking all its credentials (agent).
    Complete {
        /// Task id.
        id: String,
    },
    /// List tasks (operator).
    List {
        /// Only this agent's tasks.
        #[arg(long)]
        agent: Option<String>,
        /// Only tasks in this state: active, completed, revoked, expired.
        #[arg(long, value_parser = parse_task_state)]
        state: Option<pb::TaskState>,
        /// Only tasks delegated directly from this task.
        #[arg(long)]
        parent: Option<String>,
        /// Most tasks to show.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Change one of your tasks' context; credentials policy no longer
    /// allows under it are revoked (agent).
    Context {
        /// Task id.
        id: String,
        /// Entry to add or replace, key=value (repeat for more).
        #[arg(long = "set", value_parser = parse_kv)]
        set: Vec<(String, String)>,
        /// Key to remove (repeat for more).
        #[arg(long = "unset")]
        unset: Vec<String>,
    },
    /// Revoke a task and all its credentials (operator).
    Revoke {
        /// Task id.
        id: String,
        /// Why, kept with the revocation.
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Issue an access token under a task; prints the token on stdout.
    Issue {
        /// Task id.
        #[arg(long)]
        task: String,
        /// The API the token is for.
        #[arg(long)]
        audience: String,
        /// Scope (repeat for more).
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// Lifetime, e.g. 2m (default: the broker's).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// Bind the token to your client certificate (RFC 8705).
        #[arg(long)]
        bind: bool,
        /// When policy requires approval, wait this long for an operator
        /// (e.g. 10m); without it the command ends with exit code 3.
        #[arg(long, value_parser = humantime::parse_duration)]
        wait: Option<Duration>,
        /// Collect a request an operator approved (same arguments).
        #[arg(long)]
        approval: Option<String>,
    },
    /// Print a token's header and claims WITHOUT verifying it ("-" reads stdin).
    Decode {
        /// The token, or - for stdin.
        token: String,
    },
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not key=value"))
}

pub async fn task(cmd: TaskCommand, conn: &ConnArgs, json: bool) -> anyhow::Result<()> {
    match cmd {
        TaskCommand::Start {
            intent,
            audiences,
            scopes,
            context,
            ttl,
        } => {
            let client = conn.connect(Role::Agent).await?;
            let req = pb::StartTaskRequest {
                intent,
                context: context.into_iter().collect::<HashMap<_, _>>(),
                audiences,
                scopes,
                ttl_seconds: ttl.map_or(0, mayfly_client::ttl_seconds),
            };
            let t = client.broker().start_task(req).await?.into_inner();
            show_task(&t, json);
        }
        TaskCommand::Delegate {
            parent,
            to,
            intent,
            audiences,
            scopes,
            ttl,
        } => {
            let client = conn.connect(Role::Agent).await?;
            let req = pb::DelegateTaskRequest {
                parent_task_id: parent,
                delegate_id: to,
                intent,
                audiences,
                scopes,
                ttl_seconds: ttl.map_or(0, mayfly_client::ttl_seconds),
            };
            let t = client.broker().delegate_task(req).await?.into_inner();
            show_task(&t, json);
        }
        TaskCommand::Get { id } => {
            let client = conn.connect(Role::Agent).await?;
            let t = client
                .broker()
                .get_task(pb::GetTaskRequest { task_id: id })
                .await?
                .into_inner();
            show_task(&t, json);
        }
        TaskCommand::Complete { id } => {
            let client = conn.connect(Role::Agent).await?;
            let r = client.complete_task(&id).await?;
            if json {
                output::print_json(&json!({"task_id": id, "revoked_leases": r.revoked_leases}));
            } else {
                println!("completed task {id}");
                print_revoked(&r.revoked_leases);
            }
        }
        TaskCommand::Context { id, set, unset } => {
            let client = conn.connect(Role::Agent).await?;
            let r = client
                .broker()
                .update_task_context(pb::UpdateTaskContextRequest {
                    task_id: id.clone(),
                    set: set.into_iter().collect(),
                    remove: unset,
                })
                .await?
                .into_inner();
            if json {
                let task = r.task.as_ref().map(output::task_json);
                output::print_json(&json!({"task": task, "revoked_leases": r.revoked_leases}));
            } else {
                if let Some(t) = &r.task {
                    output::print_task(t);
                }
                if r.revoked_leases.is_empty() {
                    println!("every credential is still allowed");
                } else {
                    print_revoked(&r.revoked_leases);
                }
            }
        }
        TaskCommand::List {
            agent,
            state,
            parent,
            limit,
        } => crate::operator::list_tasks(conn, json, agent, state, parent, limit).await?,
        TaskCommand::Revoke { id, reason } => {
            let client = conn.connect(Role::Operator).await?;
            let req = pb::RevokeTaskRequest {
                task_id: id.clone(),
                note: reason.unwrap_or_default(),
            };
            let r = client.admin().revoke_task(req).await?.into_inner();
            if json {
                output::print_json(&json!({"task_id": id, "revoked_leases": r.revoked_leases}));
            } else {
                println!("revoked task {id}");
                print_revoked(&r.revoked_leases);
            }
        }
    }
    Ok(())
}

fn show_task(t: &pb::Task, json: bool) {
    if json {
        output::print_json(&output::task_json(t));
    } else {
        output::print_task(t);
    }
}

pub async fn token(cmd: TokenCommand, conn: &ConnArgs, json: bool) -> anyhow::Result<()> {
    match cmd {
        TokenCommand::Issue {
            task,
            audience,
            scopes,
            ttl,
            bind,
            wait,
            approval,
        } => {
            let client = conn.connect(Role::Agent).await?;
            if let (Some(id), Some(wait)) = (&approval, wait) {
                crate::approval::await_existing(&client, id, wait).await?;
            }
            let mut req = pb::IssueTokenRequest {
                task_id: task,
                audience,
                scopes,
                ttl_seconds: ttl.map_or(0, mayfly_client::ttl_seconds),
                bind_to_client_cert: bind,
                approval_id: approval.unwrap_or_default(),
                dpop_jwk: String::new(),
            };
            let t = loop {
                let t = client.issue_token(req.clone()).await?;
                match &t.approval {
                    Some(pending) => {
                        let wait = wait.unwrap_or_default();
                        req.approval_id =
                            crate::approval::await_decision(&client, pending, wait).await?;
                    }
                    None => break t,
                }
            };
            if json {
                output::print_json(&json!({
                    "token": t.token,
                    "token_type": t.token_type,
                    "lease_id": t.lease_id,
                    "audience": t.audience,
                    "scopes": t.scopes,
                    "expires_at": output::time(t.expires_at.as_ref()),
                }));
            } else {
                // Details on stderr so `TOKEN=$(mayfly token issue …)` captures the token alone.
                eprintln!(
                    "lease {} for {} [{}], expires {}",
                    t.lease_id,
                    t.audience,
                    t.scopes.join(" "),
                    output::time(t.expires_at.as_ref())
                );
                println!("{}", t.token);
            }
        }
        TokenCommand::Decode { token } => {
            let token = if token == "-" {
                let mut s = String::new();
                std::io::stdin().read_to_string(&mut s)?;
                s.trim().to_owned()
            } else {
                token
            };
            let parts: Vec<&str> = token.split('.').collect();
            if parts.len() != 3 {
                bail!("not a compact JWS: expected three dot-separated parts");
            }
            let decode = |what: &str, part: &str| -> anyhow::Result<serde_json::Value> {
                let bytes = URL_SAFE_NO_PAD
                    .decode(part)
                    .with_context(|| format!("{what} is not base64url"))?;
                serde_json::from_slice(&bytes).with_context(|| format!("{what} is not JSON"))
            };
            let doc = json!({"header": decode("header", parts[0])?, "claims": decode("claims", parts[1])?});
            if !json {
                eprintln!("(decoded only; the signature is NOT verified)");
            }
            output::print_json(&doc);
        }
    }
    Ok(())
}
