//! `mayfly audit tail|verify|trace`: read the audit trail through the
//! broker (operators), check a trail file's hash chain, and rebuild a
//! task's delegation tree with every credential and its fate.

use std::collections::{HashSet, VecDeque};
use std::io::BufRead;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use mayfly_broker::audit::{AuditRecord, Verified, line_hash, verify};
use mayfly_client::pb;
use serde_json::json;

use crate::conn::{ConnArgs, Role};
use crate::output;
use crate::trace;

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Print the latest records of the trail (operators).
    Tail {
        /// How many of the latest records to print (0: none, with --follow
        /// only new ones).
        #[arg(short = 'n', long = "lines", default_value_t = 20)]
        lines: u32,
        /// Print the whole trail from its first record.
        #[arg(long, conflicts_with = "lines")]
        all: bool,
        /// Keep printing records as they are written.
        #[arg(short, long)]
        follow: bool,
        /// Only records of this task, of the tasks delegated from it, and
        /// of what ended them.
        #[arg(long)]
        task: Option<String>,
    },
    /// Check a trail file's hash chain; reports the first broken link and
    /// exits 1.
    Verify {
        /// A JSON-lines trail (`-` for standard input), e.g. the broker's
        /// audit.jsonl or the output of `mayfly --json audit tail --all`.
        file: PathBuf,
        /// The SHA-256 of a record reported by an earlier verify: fails
        /// unless the trail still holds that record (catches a trail cut
        /// short or replaced).
        #[arg(long)]
        anchor: Option<String>,
    },
    /// Print a task's delegation tree from its root: every task, every
    /// credential issued under it and how each ended.
    Trace {
        /// Any task of the tree.
        task_id: String,
        /// Read the trail from this file instead of the broker.
        #[arg(long)]
        file: Option<PathBuf>,
    },
}

/// The chain does not hold; already reported.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ChainBroken(String);

pub async fn run(cmd: AuditCommand, conn: &ConnArgs, json: bool) -> anyhow::Result<()> {
    match cmd {
        AuditCommand::Tail {
            lines,
            all,
            follow,
            task,
        } => tail(conn, json, (!all).then_some(lines), follow, task).await,
        AuditCommand::Verify { file, anchor } => verify_file(&file, anchor.as_deref(), json),
        AuditCommand::Trace { task_id, file } => {
            let lines = match &file {
                Some(f) => read_lines(f)?,
                None => read_all(conn).await?,
            };
            trace::print(&task_id, &lines, json)
        }
    }
}

/// Opens a read of the trail; `last` as in `ReadAuditRequest`.
async fn open(
    conn: &ConnArgs,
    after_cursor: String,
    last: Option<u32>,
    follow: bool,
) -> anyhow::Result<tonic::Streaming<pb::AuditBatch>> {
    let client = conn.connect(Role::Operator).await?;
    let req = pb::ReadAuditRequest {
        after_cursor,
        last,
        follow,
    };
    Ok(client.admin().read_audit(req).await?.into_inner())
}

/// Every record in the trail, and the cursor after the last.
async fn read_to_end(conn: &ConnArgs, last: Option<u32>) -> anyhow::Result<(Vec<String>, String)> {
    let mut stream = open(conn, String::new(), last, false).await?;
    let (mut lines, mut cursor) = (Vec::new(), String::new());
    while let Some(batch) = stream.message().await? {
        lines.extend(batch.records);
        cursor = batch.cursor;
    }
    Ok((lines, cursor))
}

async fn read_all(conn: &ConnArgs) -> anyhow::Result<Vec<String>> {
    Ok(read_to_end(conn, None).await?.0)
}

/// Keeps the records of one task and its delegated descendants (and those
/// that ended them), learning the descendants as their delegations go by.
struct TaskFilter {
    tasks: HashSet<String>,
}

impl TaskFilter {
    fn new(root: &str) -> Self {
        Self {
            tasks: HashSet::from([root.to_owned()]),
        }
    }

    fn keep(&mut self, r: &AuditRecord) -> bool {
        let of = |tasks: &HashSet<String>, id: &Option<String>| {
            id.as_ref().is_some_and(|t| tasks.contains(t))
        };
        if of(&self.tasks, &r.parent_task_id)
            && let Some(t) = &r.task_id
        {
            self.tasks.insert(t.clone());
        }
        of(&self.tasks, &r.task_id) || r.revoked.iter().any(|l| self.tasks.contains(l))
    }
}

async fn tail(
    conn: &ConnArgs,
    json: bool,
    last: Option<u32>,
    follow: bool,
    task: Option<String>,
) -> anyhow::Result<()> {
    let mut filter = task.as_deref().map(TaskFilter::new);
    // A task's records can be anywhere in the trail: read it all and keep
    // the last matching ones.
    let ask = if filter.is_some() { None } else { last };
    let (lines, cursor) = read_to_end(conn, ask).await?;
    let mut shown = VecDeque::new();
    for line in lines {
        if keep(&mut filter, &line)? {
            shown.push_back(line);
            if last.is_some_and(|n| shown.len() > n as usize) {
                shown.pop_front();
            }
        }
    }
    for line in &shown {
        print_line(line, json)?;
    }
    if !follow {
        return Ok(());
    }
    let mut stream = open(conn, cursor, None, true).await?;
    while let Some(batch) = stream.message().await? {
        for line in batch.records {
            if keep(&mut filter, &line)? {
                print_line(&line, json)?;
            }
        }
    }
    Ok(())
}

fn keep(filter: &mut Option<TaskFilter>, line: &str) -> anyhow::Result<bool> {
    match filter {
        None => Ok(true),
        Some(f) => Ok(f.keep(&parse(line)?)),
    }
}

fn parse(line: &str) -> anyhow::Result<AuditRecord> {
    serde_json::from_str(line).context("the broker sent a line that is not an audit record")
}

fn print_line(line: &str, json: bool) -> anyhow::Result<()> {
    if json {
        // Byte for byte as in the trail, so the output verifies.
        println!("{line}");
    } else {
        println!("{}", summary(&parse(line)?));
    }
    Ok(())
}

/// One record on one line, for people.
pub fn summary(r: &AuditRecord) -> String {
    let mut out = format!("{} {:>6} {:<20}", r.time, r.seq, r.event.as_str());
    let mut field = |name: &str, value: &Option<String>| {
        if let Some(v) = value {
            out.push_str(&format!(" {name}={v}"));
        }
    };
    field("caller", &r.caller);
    if r.agent != r.caller {
        field("agent", &r.agent);
    }
    field("task", &r.task_id);
    field("parent", &r.parent_task_id);
    field("delegate", &r.delegate);
    field("intent", &r.intent.as_ref().map(|i| format!("{i:?}")));
    field("audience", &r.audience);
    field(
        "audiences",
        &(!r.audiences.is_empty()).then(|| r.audiences.join(",")),
    );
    field(
        "scopes",
        &(!r.scopes.is_empty()).then(|| r.scopes.join(",")),
    );
    field("lease", &r.lease_id);
    field("serial", &r.serial);
    field("approval", &r.approval_id);
    field("decision", &r.decision);
    field("policy", &r.policy);
    field("reason", &r.reason.as_ref().map(|x| format!("{x:?}")));
    field(
        "revoked",
        &(!r.revoked.is_empty()).then(|| r.revoked.len().to_string()),
    );
    field("expires", &r.expires_at);
    out
}

/// The lines of a trail file, or of standard input for `-`.
fn read_lines(path: &Path) -> anyhow::Result<Vec<String>> {
    let what = path.display();
    let lines: Result<Vec<String>, _> = if path == Path::new("-") {
        std::io::stdin().lock().lines().collect()
    } else {
        let file = std::fs::File::open(path).with_context(|| format!("cannot open {what}"))?;
        std::io::BufReader::new(file).lines().collect()
    };
    lines.with_context(|| format!("cannot read {what}"))
}

fn verify_file(path: &Path, anchor: Option<&str>, json: bool) -> anyhow::Result<()> {
    let what = path.display().to_string();
    let lines = read_lines(path)?;
    let outcome = verify(lines.iter().cloned().map(Ok::<_, std::convert::Infallible>));
    let anchored = match (&outcome, anchor) {
        (Ok(_), Some(a)) => Some(lines.iter().position(|l| line_hash(l) == a)),
        _ => None,
    };
    match (outcome, anchored) {
        (Ok(v), None | Some(Some(_))) => {
            report_intact(&what, &v, anchored.flatten(), json);
            Ok(())
        }
        (Ok(v), Some(None)) => {
            let msg = format!(
                "{what}: the chain holds ({} records) but no record has the anchor's SHA-256: \
                 the trail was cut short or replaced after the anchor was taken",
                v.records
            );
            if json {
                output::print_json(&json!({"file": what, "intact": false, "error": msg}));
            }
            Err(ChainBroken(msg).into())
        }
        (Err(broken), _) => {
            let msg = format!("{what}: chain broken at {broken}");
            if json {
                output::print_json(&json!({"file": what, "intact": false, "error": msg}));
            }
            Err(ChainBroken(msg).into())
        }
    }
}

fn report_intact(what: &str, v: &Verified, anchor_line: Option<usize>, json: bool) {
    if json {
        output::print_json(&json!({
            "file": what,
            "intact": true,
            "records": v.records,
            "head_seq": v.head.seq,
            "head_sha256": v.head.hash,
            "anchor_line": anchor_line.map(|i| i + 1),
        }));
        return;
    }
    println!(
        "{what}: {} records, chain intact; head seq {} sha256 {}",
        v.records, v.head.seq, v.head.hash
    );
    if let Some(i) = anchor_line {
        println!("anchor found at line {}", i + 1);
    }
    println!(
        "keep the head's sha256 elsewhere and pass it as --anchor next time to detect a cut-off end"
    );
}
