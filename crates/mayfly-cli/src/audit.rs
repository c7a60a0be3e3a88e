//! `mayfly audit tail|verify|trace`: read the audit trail through the
//! broker (operators), check a trail file's hash chain, and rebuild a
//! task's delegation tree with every credential and its fate.

use std::collections::{HashSet, VecDeque};
use std::io::BufRead;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use mayfly_audit::{AuditRecord, ChainCheck, Verified, line_hash};
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
    /// Check a trail's hash chain; reports the first broken link and
    /// exits 1.
    Verify {
        /// A JSON-lines trail (`-` for standard input), e.g. the broker's
        /// audit.jsonl or the output of `mayfly --json audit tail --all`; or
        /// a directory, whose `*.jsonl` files (a rotated trail's segments)
        /// are checked as one chain in the order of their records.
        file: PathBuf,
        /// The SHA-256 of a record reported by an earlier verify: fails
        /// unless the trail still holds that record (catches a trail cut
        /// short or replaced).
        #[arg(long)]
        anchor: Option<String>,
        /// Accept a trail that starts after seq 1 (its earlier records
        /// archived, deleted past retention, or trimmed from a stream): the
        /// first record's link to them cannot be checked.
        #[arg(long)]
        partial: bool,
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
        AuditCommand::Verify {
            file,
            anchor,
            partial,
        } => verify_file(&file, anchor.as_deref(), partial, json),
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

/// The files of a trail at `path`: itself, or the `*.jsonl` files of a
/// directory with records, in the order of their first records.
fn trail_files(path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if !path.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files = Vec::new();
    for entry in
        std::fs::read_dir(path).with_context(|| format!("cannot read {}", path.display()))?
    {
        let p = entry?.path();
        if p.extension().is_none_or(|e| e != "jsonl") {
            continue;
        }
        let first = read_lines(&p)?.into_iter().next();
        if let Some(line) = first {
            let seq = serde_json::from_str::<AuditRecord>(&line).map_or(0, |r| r.seq);
            files.push((seq, p));
        }
    }
    files.sort();
    anyhow::ensure!(
        !files.is_empty(),
        "{}: no trail files (*.jsonl) with records",
        path.display()
    );
    Ok(files.into_iter().map(|(_, p)| p).collect())
}

fn verify_file(path: &Path, anchor: Option<&str>, partial: bool, json: bool) -> anyhow::Result<()> {
    let what = path.display().to_string();
    // A directory's segments are named where the chain breaks; a single
    // file is named once.
    let in_dir = path.is_dir();
    let mut check: Option<ChainCheck> = None;
    let mut anchored = None;
    let mut broken = None;
    'files: for file in trail_files(path)? {
        let name = file.display().to_string();
        for (i, line) in read_lines(&file)?.iter().enumerate() {
            // From genesis, unless told the start may be gone.
            let check = check.get_or_insert_with(|| match partial {
                true => ChainCheck::from_first_record(),
                false => ChainCheck::from_genesis(),
            });
            if let Err(e) = check.line(line, i as u64 + 1) {
                let hint = match (&e, partial) {
                    (mayfly_audit::Broken::Sequence { line: 1, .. }, false) => {
                        " (if earlier records were archived or trimmed, pass --partial)"
                    }
                    _ => "",
                };
                broken = Some(match in_dir {
                    true => format!("{name}: {e}{hint}"),
                    false => format!("{e}{hint}"),
                });
                break 'files;
            }
            if anchor.is_some_and(|a| line_hash(line) == a) {
                anchored = Some((name.clone(), i + 1));
            }
        }
    }
    let fail = |msg: String| -> anyhow::Result<()> {
        if json {
            output::print_json(&json!({"file": what, "intact": false, "error": msg}));
        }
        Err(ChainBroken(msg).into())
    };
    if let Some(b) = broken {
        return fail(format!("{what}: chain broken at {b}"));
    }
    let v = check.unwrap_or_else(ChainCheck::from_genesis).finish();
    if anchor.is_some() && anchored.is_none() {
        return fail(format!(
            "{what}: the chain holds ({} records) but no record has the anchor's SHA-256: \
             the trail was cut short or replaced after the anchor was taken",
            v.records
        ));
    }
    report_intact(&what, &v, anchored, json);
    Ok(())
}

fn report_intact(what: &str, v: &Verified, anchor_at: Option<(String, usize)>, json: bool) {
    if json {
        output::print_json(&json!({
            "file": what,
            "intact": true,
            "records": v.records,
            "first_seq": v.first_seq,
            "head_seq": v.head.seq,
            "head_sha256": v.head.hash,
            "anchor_file": anchor_at.as_ref().map(|a| a.0.clone()),
            "anchor_line": anchor_at.as_ref().map(|a| a.1),
        }));
        return;
    }
    println!(
        "{what}: {} records, chain intact; head seq {} sha256 {}",
        v.records, v.head.seq, v.head.hash
    );
    if v.first_seq > 1 {
        println!(
            "starts at seq {}: the records before it are not here (archived, or past retention); \
             its own link to them is unchecked",
            v.first_seq
        );
    }
    if let Some((file, line)) = anchor_at {
        println!("anchor found at {file} line {line}");
    }
    println!(
        "keep the head's sha256 elsewhere and pass it as --anchor next time to detect a cut-off end"
    );
}
