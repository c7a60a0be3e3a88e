//! `mayfly audit trace`: the delegation tree of a task rebuilt from the
//! audit trail alone. Each task shows who opened it (and who delegated it),
//! its intent and envelope, each credential issued under it and how each
//! one ended (revoked: when, by whom, why; expired; or still live), and
//! the refusals and approvals along the way.

use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

use anyhow::bail;
use mayfly_audit::{AuditRecord, Event, verify};
use serde::Serialize;

use crate::output;

/// How a task or credential ended.
#[derive(Debug, Clone, Serialize)]
pub struct Fate {
    /// `revoked`, `completed` or `expired`.
    pub state: &'static str,
    /// The record that ended it (`task_completed`, `lease_expired`, …).
    pub event: String,
    /// When.
    pub time: String,
    /// Who (absent for expiry).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// The record's reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When it ended with another task (an ancestor's end), that task.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub with_task: Option<String>,
}

/// A token or certificate issued under a task.
#[derive(Debug, Clone, Serialize)]
pub struct Credential {
    /// `token` or `certificate`.
    pub kind: &'static str,
    pub lease_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    pub scopes: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    pub issued_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval_id: Option<String>,
    /// `None` while it lives.
    pub fate: Option<Fate>,
    /// The tool calls made with it through a gateway, in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub calls: Vec<ToolCall>,
    /// The requests it came with, as the services that validated it
    /// reported them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub requests: Vec<Served>,
}

/// A request a credential came with, as the validating service reported it.
#[derive(Debug, Clone, Serialize)]
pub struct Served {
    pub time: String,
    /// The service that reported it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    pub method: String,
    pub route: String,
    /// `accepted` or `refused`.
    pub decision: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused_because: Option<String>,
    pub status: u16,
    pub latency_us: u64,
}

/// A tool call a gateway asked about, made with a credential.
#[derive(Debug, Clone, Serialize)]
pub struct ToolCall {
    pub time: String,
    /// `<upstream>/<tool>`.
    pub tool: String,
    /// `allowed` or `denied`.
    pub decision: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub call_id: Option<String>,
    /// What the upstream answered, once the gateway reported it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
}

/// What became of an allowed call.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// The upstream's HTTP status (0: it gave none).
    pub status: u16,
    pub latency_us: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Another decision about the task: a refusal, an approval, a context
/// change.
#[derive(Debug, Clone, Serialize)]
pub struct Note {
    pub time: String,
    pub event: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caller: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// One task of the tree.
#[derive(Debug, Clone, Serialize)]
pub struct TaskNode {
    pub task_id: String,
    pub agent: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_task_id: Option<String>,
    /// The agent that delegated it (for delegated tasks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delegated_by: Option<String>,
    pub intent: Option<String>,
    pub started_at: Option<String>,
    pub expires_at: Option<String>,
    pub audiences: Vec<String>,
    pub scopes: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// `None` while it lives.
    pub fate: Option<Fate>,
    pub credentials: Vec<Credential>,
    pub notes: Vec<Note>,
    pub children: Vec<TaskNode>,
}

impl TaskNode {
    fn new(task_id: &str) -> Self {
        Self {
            task_id: task_id.to_owned(),
            agent: None,
            parent_task_id: None,
            delegated_by: None,
            intent: None,
            started_at: None,
            expires_at: None,
            audiences: Vec::new(),
            scopes: Vec::new(),
            policy: None,
            fate: None,
            credentials: Vec::new(),
            notes: Vec::new(),
            children: Vec::new(),
        }
    }
}

/// Every task in the trail, keyed by id, with fates settled; children are
/// linked by [`tree`].
fn collect(records: &[AuditRecord], now: SystemTime) -> BTreeMap<String, TaskNode> {
    let mut tasks: BTreeMap<String, TaskNode> = BTreeMap::new();
    // Which task each credential lease belongs to.
    let mut owner: BTreeMap<String, String> = BTreeMap::new();
    let mut fates: BTreeMap<String, Fate> = BTreeMap::new();
    for r in records {
        let Some(task_id) = r.task_id.clone() else {
            settle(r, None, &mut fates);
            continue;
        };
        let node = tasks
            .entry(task_id.clone())
            .or_insert_with(|| TaskNode::new(&task_id));
        if node.agent.is_none() {
            node.agent.clone_from(&r.agent);
        }
        if node.intent.is_none() {
            node.intent.clone_from(&r.intent);
        }
        if node.parent_task_id.is_none() {
            node.parent_task_id.clone_from(&r.parent_task_id);
        }
        match r.event {
            Event::TaskStarted | Event::TaskDelegated => {
                node.started_at = Some(r.time.clone());
                node.expires_at.clone_from(&r.expires_at);
                node.audiences.clone_from(&r.audiences);
                node.scopes.clone_from(&r.scopes);
                node.policy.clone_from(&r.policy);
                if r.event == Event::TaskDelegated {
                    node.delegated_by.clone_from(&r.caller);
                }
            }
            Event::TokenIssued
            | Event::CertificateIssued
            | Event::TokenExchanged
            | Event::DatabaseLoginIssued => {
                if let Some(lease) = &r.lease_id {
                    owner.insert(lease.clone(), task_id.clone());
                    node.credentials.push(Credential {
                        kind: match r.event {
                            Event::TokenIssued => "token",
                            Event::TokenExchanged => "exchanged token",
                            Event::DatabaseLoginIssued => "database login",
                            _ => "certificate",
                        },
                        lease_id: lease.clone(),
                        audience: r.audience.clone(),
                        scopes: r.scopes.clone(),
                        serial: r.serial.clone(),
                        issued_at: r.time.clone(),
                        expires_at: r.expires_at.clone(),
                        policy: r.policy.clone(),
                        approval_id: r.approval_id.clone(),
                        fate: None,
                        calls: Vec::new(),
                        requests: Vec::new(),
                    });
                }
            }
            Event::TaskDenied
            | Event::DelegationDenied
            | Event::TokenDenied
            | Event::CertificateDenied
            | Event::ExchangeDenied
            | Event::ApprovalRequested
            | Event::ApprovalGranted
            | Event::ApprovalDenied
            | Event::TaskContextChanged
            | Event::DatabaseLoginDenied
            | Event::DatabaseLoginDropped
            | Event::DatabaseLoginDropFailed => node.notes.push(note(r)),
            Event::ToolCallAllowed | Event::ToolCallDenied => {
                let credential = r
                    .lease_id
                    .as_ref()
                    .and_then(|l| node.credentials.iter_mut().find(|c| &c.lease_id == l));
                match credential {
                    Some(c) => c.calls.push(ToolCall {
                        time: r.time.clone(),
                        tool: r.tool.clone().unwrap_or_default(),
                        decision: if r.event == Event::ToolCallAllowed {
                            "allowed"
                        } else {
                            "denied"
                        },
                        policy: r.policy.clone(),
                        approval_id: r.approval_id.clone(),
                        reason: r.reason.clone(),
                        call_id: r.call_id.clone(),
                        outcome: None,
                    }),
                    None => node.notes.push(note(r)),
                }
            }
            Event::RequestServed => {
                let served = Served {
                    time: r.time.clone(),
                    by: r.caller.clone(),
                    method: r.method.clone().unwrap_or_default(),
                    route: r.route.clone().unwrap_or_default(),
                    decision: r.decision.clone().unwrap_or_default(),
                    refused_because: r.reason.clone(),
                    status: r.status.unwrap_or(0),
                    latency_us: r.latency_us.unwrap_or(0),
                };
                if let Some(c) = node
                    .credentials
                    .iter_mut()
                    .find(|c| r.lease_id.as_ref() == Some(&c.lease_id))
                {
                    c.requests.push(served);
                }
            }
            Event::ToolCallOutcome => {
                let call = node
                    .credentials
                    .iter_mut()
                    .filter(|c| r.lease_id.as_ref() == Some(&c.lease_id))
                    .flat_map(|c| c.calls.iter_mut())
                    .find(|c| c.call_id.is_some() && c.call_id == r.call_id);
                if let Some(call) = call {
                    call.outcome = Some(Outcome {
                        status: r.status.unwrap_or(0),
                        latency_us: r.latency_us.unwrap_or(0),
                        error: r.reason.clone(),
                    });
                }
            }
            Event::TaskCompleted
            | Event::TaskRevoked
            | Event::RevokedByPolicy
            | Event::LeaseRevoked
            | Event::AgentRevoked
            | Event::AgentLocked
            | Event::AgentUnlocked
            | Event::LeaseExpired => {}
        }
        settle(r, Some(&task_id), &mut fates);
    }
    for node in tasks.values_mut() {
        node.fate = fates
            .get(&node.task_id)
            .cloned()
            .map(|f| seen_from(f, &node.task_id, true))
            .or_else(|| expired_by(node.expires_at.as_deref(), now));
        for c in &mut node.credentials {
            c.fate = fates
                .get(&c.lease_id)
                .cloned()
                .map(|f| seen_from(f, &node.task_id, false))
                .or_else(|| expired_by(c.expires_at.as_deref(), now));
        }
    }
    tasks
}

fn note(r: &AuditRecord) -> Note {
    let mut detail = Vec::new();
    if let Some(t) = &r.tool {
        detail.push(format!("tool {t}"));
    }
    if let (Some(l), Some(_)) = (&r.lease_id, &r.tool) {
        detail.push(format!("with {l}"));
    }
    if let Some(d) = &r.delegate {
        detail.push(format!("to {d}"));
    }
    if let Some(a) = &r.audience {
        detail.push(format!("audience {a}"));
    }
    if !r.scopes.is_empty() && r.event != Event::TaskContextChanged {
        detail.push(format!("scopes [{}]", r.scopes.join(" ")));
    }
    if let Some(a) = &r.approval_id {
        detail.push(format!("approval {a}"));
    }
    if let Some(p) = &r.policy {
        detail.push(format!("policy {p}"));
    }
    if let Some(x) = &r.reason {
        detail.push(x.clone());
    }
    if !r.revoked.is_empty() {
        detail.push(format!("revoked {}", r.revoked.join(" ")));
    }
    Note {
        time: r.time.clone(),
        event: r.event.as_str().to_owned(),
        caller: r.caller.clone(),
        detail: (!detail.is_empty()).then(|| detail.join("; ")),
    }
}

/// Records the first end of every lease `r` ends.
fn settle(r: &AuditRecord, task: Option<&String>, fates: &mut BTreeMap<String, Fate>) {
    let (state, by) = match r.event {
        Event::LeaseExpired => ("expired", None),
        Event::TaskCompleted => ("completed", r.caller.clone()),
        _ => ("revoked", r.caller.clone()),
    };
    let fate = Fate {
        state,
        event: r.event.as_str().to_owned(),
        time: r.time.clone(),
        by,
        reason: r.reason.clone(),
        with_task: task.cloned(),
    };
    let mut ended: Vec<&String> = r.revoked.iter().collect();
    if r.event == Event::LeaseExpired {
        ended.extend(&r.lease_id);
    }
    for lease in ended {
        fates.entry(lease.clone()).or_insert_with(|| fate.clone());
    }
}

/// `f` as seen from `task`: a fate that came from another task's record
/// (an ancestor ending) keeps that task's id, its own task's is dropped;
/// only a task is completed, its credentials and descendants are revoked.
fn seen_from(mut f: Fate, task: &str, is_task: bool) -> Fate {
    if f.with_task.as_deref() == Some(task) {
        f.with_task = None;
    }
    if f.state == "completed" && (!is_task || f.with_task.is_some()) {
        f.state = "revoked";
    }
    f
}

/// An expiry that has passed but whose record is not (yet) in the trail.
fn expired_by(expires_at: Option<&str>, now: SystemTime) -> Option<Fate> {
    let at = expires_at?;
    (humantime::parse_rfc3339_weak(at).ok()? <= now).then(|| Fate {
        state: "expired",
        event: "expiry".into(),
        time: at.to_owned(),
        by: None,
        reason: None,
        with_task: None,
    })
}

/// Links children under their parents and returns the tree holding `task`.
fn tree(mut tasks: BTreeMap<String, TaskNode>, task: &str) -> anyhow::Result<TaskNode> {
    if !tasks.contains_key(task) {
        bail!("task {task} does not appear in the audit trail");
    }
    // Up the parent links to the first task whose parent is not in the
    // trail; an edited trail may loop, so each task is visited once.
    let mut root = task.to_owned();
    let mut seen = BTreeSet::from([root.clone()]);
    while let Some(parent) = tasks[&root].parent_task_id.clone() {
        if !tasks.contains_key(&parent) || !seen.insert(parent.clone()) {
            break;
        }
        root = parent;
    }
    let mut children: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (id, node) in &tasks {
        if let Some(parent) = &node.parent_task_id {
            children.entry(parent.clone()).or_default().push(id.clone());
        }
    }
    attach(&root, &mut tasks, &children)
        .ok_or_else(|| anyhow::anyhow!("task {task} is not in the tree built from the trail"))
}

/// Takes `id` out of `tasks` with its subtree, children by start time. A
/// task already taken (a loop in an edited trail) is left out.
fn attach(
    id: &str,
    tasks: &mut BTreeMap<String, TaskNode>,
    children: &BTreeMap<String, Vec<String>>,
) -> Option<TaskNode> {
    let mut node = tasks.remove(id)?;
    for child in children.get(id).into_iter().flatten() {
        if let Some(c) = attach(child, tasks, children) {
            node.children.push(c);
        }
    }
    node.children
        .sort_by(|a, b| a.started_at.cmp(&b.started_at));
    Some(node)
}

/// The tree of `task` from `lines` (a whole trail), for people or as JSON.
pub fn print(task: &str, lines: &[String], json: bool) -> anyhow::Result<()> {
    let chain = verify(lines.iter().cloned().map(Ok::<_, std::convert::Infallible>));
    let records: Vec<AuditRecord> = lines
        .iter()
        .map(|l| serde_json::from_str(l))
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("the trail holds a line that is not an audit record: {e}"))?;
    let root = tree(collect(&records, SystemTime::now()), task)?;
    if json {
        output::print_json(&serde_json::json!({
            "chain": match &chain {
                Ok(v) => serde_json::json!({"intact": true, "records": v.records}),
                Err(b) => serde_json::json!({"intact": false, "error": b.to_string()}),
            },
            "tree": root,
        }));
        return Ok(());
    }
    match &chain {
        Ok(v) => println!("audit chain intact ({} records)", v.records),
        Err(b) => println!("WARNING: audit chain broken at {b}; what follows may be incomplete"),
    }
    let mut out = String::new();
    render(&root, task, "", &mut out);
    print!("{out}");
    Ok(())
}

fn fate_text(f: Option<&Fate>, live: &str) -> String {
    let Some(f) = f else {
        return live.to_owned();
    };
    let by =
        f.by.as_deref()
            .map(|b| format!(" by {b}"))
            .unwrap_or_default();
    let why = match (&f.reason, f.event.as_str()) {
        (Some(r), e) => format!("{e}: {r}"),
        (None, e) => e.to_owned(),
    };
    match (&f.with_task, f.event.as_str()) {
        (Some(t), _) => format!(
            "{} {} (parent_revoked: task {t} ended, {why}{by})",
            f.state, f.time
        ),
        (None, "expiry" | "lease_expired") => format!("{} {}", f.state, f.time),
        (None, "task_completed") if f.state == "completed" => format!("{} {}{by}", f.state, f.time),
        (None, _) => format!("{} {}{by} ({why})", f.state, f.time),
    }
}

/// Renders `node` and its subtree; `pad` is the indentation of its details.
/// One line for a tool call: when, what, the decision and the outcome.
fn call_text(c: &ToolCall) -> String {
    let mut text = format!("call {} {} {}", c.time, c.tool, c.decision);
    if let Some(p) = &c.policy {
        text.push_str(&format!(" (policy {p})"));
    }
    if let Some(a) = &c.approval_id {
        text.push_str(&format!(" (approval {a})"));
    }
    if let Some(r) = &c.reason {
        text.push_str(&format!(": {r}"));
    }
    match &c.outcome {
        Some(Outcome {
            error: Some(e),
            latency_us,
            ..
        }) => text.push_str(&format!(
            " -> no answer: {e} after {:.1} ms",
            *latency_us as f64 / 1000.0
        )),
        Some(o) => text.push_str(&format!(
            " -> {} in {:.1} ms",
            o.status,
            o.latency_us as f64 / 1000.0
        )),
        None if c.decision == "allowed" => text.push_str(" -> no outcome reported"),
        None => {}
    }
    text
}

fn render(node: &TaskNode, asked: &str, pad: &str, out: &mut String) {
    let mark = if node.task_id == asked { "  <==" } else { "" };
    out.push_str(&format!(
        "task {} {} {:?}{mark}\n",
        node.task_id,
        node.agent.as_deref().unwrap_or("?"),
        node.intent.as_deref().unwrap_or("?"),
    ));
    let line = |out: &mut String, text: String| out.push_str(&format!("{pad}  {text}\n"));
    if let Some(by) = &node.delegated_by {
        line(out, format!("delegated by {by}"));
    }
    line(
        out,
        format!(
            "started {}{}, expires {}",
            node.started_at.as_deref().unwrap_or("(before the trail)"),
            node.policy
                .as_deref()
                .map(|p| format!(" (policy {p})"))
                .unwrap_or_default(),
            node.expires_at.as_deref().unwrap_or("?"),
        ),
    );
    if !node.audiences.is_empty() || !node.scopes.is_empty() {
        line(
            out,
            format!(
                "envelope audiences [{}] scopes [{}]",
                node.audiences.join(" "),
                node.scopes.join(" ")
            ),
        );
    }
    for c in &node.credentials {
        let what = match (&c.audience, &c.serial) {
            (Some(a), _) => format!("for {a} [{}]", c.scopes.join(" ")),
            (None, Some(s)) => format!("serial {s}"),
            (None, None) => String::new(),
        };
        line(
            out,
            format!(
                "{} {} {what} issued {}{} -> {}",
                c.kind,
                c.lease_id,
                c.issued_at,
                c.approval_id
                    .as_deref()
                    .map(|a| format!(" (approval {a})"))
                    .unwrap_or_default(),
                fate_text(
                    c.fate.as_ref(),
                    &format!("live until {}", c.expires_at.as_deref().unwrap_or("?"))
                ),
            ),
        );
        for call in &c.calls {
            line(out, format!("  {}", call_text(call)));
        }
        for r in &c.requests {
            line(
                out,
                format!(
                    "  request {} {} {} at {} {}{} -> {} in {:.1} ms",
                    r.time,
                    r.method,
                    r.route,
                    r.by.as_deref().unwrap_or("?"),
                    r.decision,
                    r.refused_because
                        .as_deref()
                        .map(|why| format!(" ({why})"))
                        .unwrap_or_default(),
                    r.status,
                    r.latency_us as f64 / 1000.0
                ),
            );
        }
    }
    for n in &node.notes {
        line(
            out,
            format!(
                "{} {}{}{}",
                n.event,
                n.time,
                n.caller
                    .as_deref()
                    .map(|c| format!(" by {c}"))
                    .unwrap_or_default(),
                n.detail
                    .as_deref()
                    .map(|d| format!(": {d}"))
                    .unwrap_or_default(),
            ),
        );
    }
    line(
        out,
        format!(
            "ended {}",
            fate_text(node.fate.as_ref(), "no: still active")
        ),
    );
    for (i, child) in node.children.iter().enumerate() {
        let last = i + 1 == node.children.len();
        out.push_str(&format!("{pad}  {}", if last { "└─ " } else { "├─ " }));
        let child_pad = format!("{pad}  {}", if last { "   " } else { "│  " });
        render(child, asked, &child_pad, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, parent: Option<&str>) -> (String, TaskNode) {
        let mut n = TaskNode::new(id);
        n.parent_task_id = parent.map(str::to_owned);
        (id.to_owned(), n)
    }

    #[test]
    fn an_edited_trail_with_a_parent_loop_still_makes_a_tree() {
        // A's parent is B, B's is C, and C's is B again.
        let tasks = BTreeMap::from([
            node("A", Some("B")),
            node("B", Some("C")),
            node("C", Some("B")),
        ]);
        let root = tree(tasks, "A").unwrap();
        assert_eq!(root.task_id, "C");
        assert_eq!(root.children.len(), 1);
        let b = &root.children[0];
        assert_eq!(b.task_id, "B");
        let ids: Vec<&str> = b.children.iter().map(|c| c.task_id.as_str()).collect();
        assert_eq!(ids, ["A"], "C is not taken twice");
    }

    fn record(seq: u64, event: Event, fields: serde_json::Value) -> AuditRecord {
        let mut v = serde_json::json!({
            "seq": seq, "prev": "", "time": format!("2026-12-07T00:00:0{seq}.000Z"),
            "event": event.as_str(), "task_id": "T", "agent": "spiffe://td/agent/a",
        });
        for (k, x) in fields.as_object().unwrap() {
            v[k] = x.clone();
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn calls_and_requests_show_under_the_credential_that_made_them() {
        use serde_json::json;
        let trail = [
            record(1, Event::TaskStarted, json!({"intent": "pay"})),
            record(
                2,
                Event::TokenIssued,
                json!({"lease_id": "L", "audience": "https://a"}),
            ),
            record(
                3,
                Event::ToolCallAllowed,
                json!({"lease_id": "L", "tool": "b/pay", "policy": "p", "call_id": "C1"}),
            ),
            record(
                4,
                Event::ToolCallDenied,
                json!({"lease_id": "L", "tool": "b/delete", "policy": "no", "reason": "forbidden"}),
            ),
            record(
                5,
                Event::ToolCallOutcome,
                json!({"lease_id": "L", "tool": "b/pay", "call_id": "C1", "status": 201, "latency_us": 1500, "caller": "spiffe://td/gw"}),
            ),
            record(
                6,
                Event::RequestServed,
                json!({"lease_id": "L", "method": "GET", "route": "/x/{id}", "decision": "refused", "reason": "revoked", "status": 401, "latency_us": 200, "caller": "spiffe://td/api/x"}),
            ),
            // An outcome for a call the trail does not hold is not shown.
            record(
                7,
                Event::ToolCallOutcome,
                json!({"lease_id": "L", "tool": "b/pay", "call_id": "C9", "status": 500, "latency_us": 1}),
            ),
        ];
        let tasks = collect(&trail, SystemTime::now());
        let c = &tasks["T"].credentials[0];
        assert_eq!(c.calls.len(), 2);
        assert_eq!(c.calls[0].outcome.as_ref().unwrap().status, 201);
        assert!(c.calls[1].outcome.is_none());
        assert!(tasks["T"].notes.is_empty(), "calls are not notes");
        let mut out = String::new();
        render(&tree(tasks, "T").unwrap(), "T", "", &mut out);
        let lines: Vec<&str> = out.lines().map(str::trim).collect();
        assert!(
            lines.contains(
                &"call 2026-12-07T00:00:03.000Z b/pay allowed (policy p) -> 201 in 1.5 ms"
            ),
            "{out}"
        );
        assert!(
            lines.contains(&"call 2026-12-07T00:00:04.000Z b/delete denied (policy no): forbidden"),
            "{out}"
        );
        assert!(lines.contains(&"request 2026-12-07T00:00:06.000Z GET /x/{id} at spiffe://td/api/x refused (revoked) -> 401 in 0.2 ms"), "{out}");
    }
}
