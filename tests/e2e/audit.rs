//! The audit trail: a scripted scenario puts every kind of decision on the
//! record with its ids, policy and reason, and never a token, key or CSR;
//! the chain verifies; operators read it back (whole, the last few,
//! following) through the Admin API; and a trail that cannot record stops
//! issuance instead of letting credentials out unrecorded.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use mayfly_broker::audit::{AuditRecord, Event, verify};
use mayfly_broker::config::AuditSinkKind;
use mayfly_client::{Client, pb};
use mayfly_testkit::{RedisServer, TestBroker};
use tonic::Code;

use crate::certs::openssl_csr;
use crate::common::*;

const DEMO: &str = "spiffe://example.org/agent/demo";
const BOB: &str = "spiffe://example.org/agent/bob";
const OPERATOR: &str = "spiffe://example.org/operator/admin";

/// Every line of the trail, read through the Admin API.
async fn trail(op: &Client) -> Vec<String> {
    read(op, pb::ReadAuditRequest::default()).await.unwrap().0
}

async fn read(
    op: &Client,
    req: pb::ReadAuditRequest,
) -> Result<(Vec<String>, String), tonic::Status> {
    let mut stream = op.admin().read_audit(req).await?.into_inner();
    let (mut lines, mut cursor) = (Vec::new(), String::new());
    while let Some(batch) = stream.message().await? {
        lines.extend(batch.records);
        cursor = batch.cursor;
    }
    Ok((lines, cursor))
}

fn records(lines: &[String]) -> Vec<AuditRecord> {
    lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The one record of `event` that `pick` accepts.
#[track_caller]
fn one(records: &[AuditRecord], event: Event, pick: impl Fn(&AuditRecord) -> bool) -> &AuditRecord {
    let found: Vec<&AuditRecord> = records
        .iter()
        .filter(|r| r.event == event && pick(r))
        .collect();
    assert_eq!(found.len(), 1, "{event} records: {found:#?}");
    found[0]
}

fn s(v: &str) -> Option<String> {
    Some(v.to_owned())
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_decision_is_on_the_record_and_no_secret_is() {
    let broker = TestBroker::start_with(|c| c.reaper.interval = Duration::from_millis(100)).await;
    let demo = broker.agent().await;
    let bob = broker.client_as(BOB).await;
    let op = broker.operator().await;
    let mut secrets: Vec<String> = Vec::new();

    // A task, and one that policy refuses.
    let mut req = start_request("release 1.2", &[API], &["read:files", "write:files"]);
    req.context = HashMap::from([("environment".to_owned(), "staging".to_owned())]);
    let root = demo.broker().start_task(req).await.unwrap().into_inner();
    let mut export = start_request("export report", &[API], &["export:files"]);
    export
        .context
        .insert("data_sensitivity".into(), "restricted".into());
    assert_status(
        demo.broker().start_task(export).await,
        Code::PermissionDenied,
        "dev-no-export-of-restricted-data",
    );

    // A delegation, and one wider than its parent.
    let child = demo
        .broker()
        .delegate_task(pb::DelegateTaskRequest {
            parent_task_id: root.task_id.clone(),
            delegate_id: BOB.into(),
            intent: "summarise the changelog".into(),
            audiences: strings(&[API]),
            scopes: strings(&["read:files"]),
            ttl_seconds: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_status(
        demo.broker()
            .delegate_task(pb::DelegateTaskRequest {
                parent_task_id: root.task_id.clone(),
                delegate_id: BOB.into(),
                intent: "too much".into(),
                audiences: strings(&[API]),
                scopes: strings(&["admin:all"]),
                ttl_seconds: 0,
            })
            .await,
        Code::PermissionDenied,
        "narrower than its parent",
    );

    // Tokens issued and refused, and a certificate.
    let read = issue(&demo, &root.task_id).await;
    let write = demo
        .issue_token(token_request(&root.task_id, API, &["write:files"]))
        .await
        .unwrap();
    let bobs = issue(&bob, &child.task_id).await;
    assert_status(
        bob.issue_token(token_request(&child.task_id, API, &["write:files"]))
            .await,
        Code::PermissionDenied,
        "outside the task's envelope",
    );
    let dir = tempfile::tempdir().unwrap();
    let csr = openssl_csr(dir.path(), "agent", &[]);
    secrets.push(String::from_utf8(csr.clone()).unwrap());
    let cert = demo
        .broker()
        .sign_certificate(pb::SignCertificateRequest {
            task_id: root.task_id.clone(),
            csr,
            ttl_seconds: 0,
            approval_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    secrets.push(std::fs::read_to_string(dir.path().join("agent.key")).unwrap());
    secrets.push(cert.certificate_pem.clone());
    secrets.extend([read.token.clone(), write.token.clone(), bobs.token.clone()]);

    // Production: the write token goes; writes now wait for an operator.
    let changed = demo
        .broker()
        .update_task_context(pb::UpdateTaskContextRequest {
            task_id: root.task_id.clone(),
            set: HashMap::from([("environment".to_owned(), "production".to_owned())]),
            remove: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(changed.revoked_leases, vec![write.lease_id.clone()]);
    let write_req = token_request(&root.task_id, API, &["write:files"]);
    let pending = demo.issue_token(write_req.clone()).await.unwrap();
    let granted_id = pending.approval.unwrap().approval_id;
    op.admin()
        .approve(pb::DecideApprovalRequest {
            approval_id: granted_id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap();
    let mut collect = write_req.clone();
    collect.approval_id = granted_id.clone();
    let approved = demo.issue_token(collect).await.unwrap();
    secrets.push(approved.token.clone());
    let refused_id = demo
        .issue_token(write_req)
        .await
        .unwrap()
        .approval
        .unwrap()
        .approval_id;
    op.admin()
        .deny(pb::DecideApprovalRequest {
            approval_id: refused_id.clone(),
            reason: "not during the freeze".into(),
        })
        .await
        .unwrap();

    // An operator revokes a token; the owner completes the task, which
    // takes the delegated task with it.
    op.admin()
        .revoke_lease(pb::RevokeLeaseRequest {
            lease_id: read.lease_id.clone(),
            note: "rotating".into(),
        })
        .await
        .unwrap();
    let done = demo.complete_task(&root.task_id).await.unwrap();
    assert!(done.revoked_leases.contains(&bobs.lease_id));

    // Operators revoke a task and an agent; a short task expires.
    let doomed = start(&demo).await;
    op.admin()
        .revoke_task(pb::RevokeTaskRequest {
            task_id: doomed.task_id.clone(),
            note: String::new(),
        })
        .await
        .unwrap();
    let bobs_own = start(&bob).await;
    op.admin()
        .revoke_agent(pb::RevokeAgentRequest {
            agent_id: BOB.into(),
            note: "compromised".into(),
        })
        .await
        .unwrap();
    let mut short = start_request("brief", &[API], &["read:files"]);
    short.ttl_seconds = 1;
    let short = demo.broker().start_task(short).await.unwrap().into_inner();
    let deadline = Instant::now() + Duration::from_secs(15);
    let lines = loop {
        let lines = trail(&op).await;
        let expired = records(&lines).iter().any(|r| {
            r.event == Event::LeaseExpired && r.lease_id.as_deref() == Some(&short.task_id)
        });
        if expired {
            break lines;
        }
        assert!(Instant::now() < deadline, "no lease_expired record");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let rs = records(&lines);

    // Each decision, with who, what task, what and which policy.
    let started = one(&rs, Event::TaskStarted, |r| r.task_id == s(&root.task_id));
    assert_eq!(started.caller, s(DEMO));
    assert_eq!(started.agent, s(DEMO));
    assert_eq!(started.intent, s("release 1.2"));
    assert_eq!(started.audiences, strings(&[API]));
    assert_eq!(started.scopes, strings(&["read:files", "write:files"]));
    assert_eq!(started.policy, s("dev-open-tasks"));
    assert_eq!(started.decision, s("permit"));
    assert!(started.expires_at.is_some());

    let denied = one(&rs, Event::TaskDenied, |_| true);
    assert_eq!(denied.intent, s("export report"));
    assert_eq!(denied.decision, s("deny"));
    assert_eq!(denied.policy, s("dev-no-export-of-restricted-data"));
    assert_eq!(denied.task_id, None, "no task was opened");

    let delegated = one(&rs, Event::TaskDelegated, |_| true);
    assert_eq!(delegated.caller, s(DEMO));
    assert_eq!(delegated.agent, s(BOB));
    assert_eq!(delegated.delegate, s(BOB));
    assert_eq!(delegated.task_id, s(&child.task_id));
    assert_eq!(delegated.parent_task_id, s(&root.task_id));
    assert_eq!(delegated.policy, s("dev-delegation"));
    let refused = one(&rs, Event::DelegationDenied, |_| true);
    assert_eq!(refused.task_id, s(&root.task_id));
    assert_eq!(refused.scopes, strings(&["admin:all"]));
    assert!(refused.reason.as_deref().unwrap().contains("admin:all"));

    let issued = |lease: &str| one(&rs, Event::TokenIssued, |r| r.lease_id == s(lease));
    let r = issued(&read.lease_id);
    assert_eq!(
        (r.audience.as_deref(), r.policy.as_deref()),
        (Some(API), Some("dev-read"))
    );
    assert_eq!(r.scopes, strings(&["read:files"]));
    assert_eq!(issued(&write.lease_id).policy, s("dev-write"));
    let b = issued(&bobs.lease_id);
    assert_eq!(
        (b.caller.as_deref(), b.agent.as_deref()),
        (Some(BOB), Some(BOB))
    );
    assert_eq!(b.parent_task_id, s(&root.task_id));
    let a = issued(&approved.lease_id);
    assert_eq!(a.approval_id, s(&granted_id));
    assert_eq!(a.policy, s("dev-write-production"));
    let no = one(&rs, Event::TokenDenied, |_| true);
    assert_eq!(
        (no.caller.as_deref(), no.task_id.as_deref()),
        (Some(BOB), Some(child.task_id.as_str()))
    );
    assert_eq!(no.scopes, strings(&["write:files"]));

    let c = one(&rs, Event::CertificateIssued, |_| true);
    assert_eq!(c.lease_id, s(&cert.lease_id));
    assert_eq!(c.serial, s(&cert.serial));
    assert_eq!(c.policy, s("dev-certificates"));

    let ctx = one(&rs, Event::TaskContextChanged, |_| true);
    assert_eq!(ctx.revoked, vec![write.lease_id.clone()]);
    assert!(ctx.reason.as_deref().unwrap().contains("environment"));

    let asked = one(&rs, Event::ApprovalRequested, |r| {
        r.approval_id == s(&granted_id)
    });
    assert_eq!(asked.decision, s("pending"));
    assert_eq!(asked.policy, s("dev-write-production"));
    assert_eq!(asked.scopes, strings(&["write:files"]));
    one(&rs, Event::ApprovalRequested, |r| {
        r.approval_id == s(&refused_id)
    });
    let yes = one(&rs, Event::ApprovalGranted, |_| true);
    assert_eq!(
        (yes.caller.as_deref(), yes.approval_id.as_deref()),
        (Some(OPERATOR), Some(granted_id.as_str()))
    );
    let nay = one(&rs, Event::ApprovalDenied, |_| true);
    assert_eq!(nay.reason, s("not during the freeze"));

    let revoked = one(&rs, Event::LeaseRevoked, |_| true);
    assert_eq!(revoked.caller, s(OPERATOR));
    assert_eq!(revoked.revoked, vec![read.lease_id.clone()]);
    assert!(revoked.reason.as_deref().unwrap().contains("rotating"));

    let completed = one(&rs, Event::TaskCompleted, |_| true);
    for lease in [
        &root.task_id,
        &child.task_id,
        &bobs.lease_id,
        &cert.lease_id,
    ] {
        assert!(completed.revoked.contains(lease), "{lease} ended with it");
    }
    let by_op = one(&rs, Event::TaskRevoked, |_| true);
    assert_eq!(by_op.task_id, s(&doomed.task_id));
    let expired = one(&rs, Event::LeaseExpired, |r| {
        r.lease_id == s(&short.task_id)
    });
    assert_eq!(
        (expired.task_id.as_deref(), expired.agent.as_deref()),
        (Some(short.task_id.as_str()), Some(DEMO))
    );
    assert_eq!(expired.caller, s("spiffe://example.org/mayfly/broker"));
    let agent = one(&rs, Event::AgentRevoked, |_| true);
    assert_eq!(agent.agent, s(BOB));
    assert!(agent.revoked.contains(&bobs_own.task_id));
    assert!(agent.reason.as_deref().unwrap().contains("compromised"));

    // One chain; exactly the broker's file; no secret anywhere in it.
    let v = verify(lines.iter().cloned().map(Ok::<_, String>)).unwrap();
    assert_eq!(v.records, lines.len() as u64);
    let file = std::fs::read_to_string(broker.config.audit_path()).unwrap();
    assert!(file.starts_with(&lines.join("\n")));
    assert!(!holds_compact_jws(&file), "the trail holds a token");
    for needle in ["PRIVATE KEY", "CERTIFICATE", "-----BEGIN"] {
        assert!(!file.contains(needle), "the trail holds {needle:?}");
    }
    for secret in &secrets {
        let body: String = secret.lines().filter(|l| !l.starts_with("-----")).collect();
        assert!(!file.contains(&body[..body.len().min(40)]));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_read_the_last_records_and_follow_new_ones() {
    let broker = TestBroker::start().await;
    let demo = broker.agent().await;
    let op = broker.operator().await;
    for _ in 0..5 {
        start(&demo).await;
    }
    let all = trail(&op).await;
    assert_eq!(all.len(), 5);

    let last = |n| pb::ReadAuditRequest {
        last: Some(n),
        ..Default::default()
    };
    assert_eq!(read(&op, last(2)).await.unwrap().0, all[3..]);
    assert_eq!(read(&op, last(50)).await.unwrap().0, all);
    let (none, end) = read(&op, last(0)).await.unwrap();
    assert!(none.is_empty() && !end.is_empty(), "a cursor, no records");

    // Following from the end: the next record arrives as it is written.
    let mut stream = op
        .admin()
        .read_audit(pb::ReadAuditRequest {
            after_cursor: end.clone(),
            follow: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(first.records.is_empty());
    let task = start(&demo).await;
    let next = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let rs = records(&next.records);
    assert_eq!(rs.len(), 1);
    assert_eq!(rs[0].task_id, s(&task.task_id));
    assert_eq!(rs[0].seq, 6);

    // Only operators; cursors from elsewhere are refused.
    assert_status(
        read(&demo, pb::ReadAuditRequest::default()).await,
        Code::PermissionDenied,
        "not an operator",
    );
    for bad in ["yesterday", "99999999"] {
        assert_status(
            read(
                &op,
                pb::ReadAuditRequest {
                    after_cursor: bad.into(),
                    ..Default::default()
                },
            )
            .await,
            Code::InvalidArgument,
            "bad audit cursor",
        );
    }
    assert_status(
        read(
            &op,
            pb::ReadAuditRequest {
                after_cursor: end,
                last: Some(1),
                follow: false,
            },
        )
        .await,
        Code::InvalidArgument,
        "not both",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trail_that_is_not_kept_here_cannot_be_read_here() {
    for (sink, says) in [
        (AuditSinkKind::Stdout, "standard output"),
        (AuditSinkKind::Off, "is off"),
    ] {
        let broker = TestBroker::start_with(|c| c.audit.sink = Some(sink)).await;
        let demo = broker.agent().await;
        let task = start(&demo).await;
        issue(&demo, &task.task_id).await;
        assert_status(
            read(&broker.operator().await, pb::ReadAuditRequest::default()).await,
            Code::FailedPrecondition,
            says,
        );
        assert!(!broker.config.audit_path().exists());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_issued_that_cannot_be_recorded() {
    let redis = RedisServer::start();
    let broker = TestBroker::start_on_redis(&redis.url()).await;
    let demo = broker.agent().await;
    let op = broker.operator().await;
    let task = start(&demo).await;
    // With Redis the trail defaults to the store's stream.
    let before = trail(&op).await;
    assert_eq!(before.len(), 1);
    assert_eq!(redis.cli(&["XLEN", "mayfly:audit"]).trim(), "1");

    // Break the stream: the store works, the trail does not.
    redis.cli(&["DEL", "mayfly:audit"]);
    redis.cli(&["SET", "mayfly:audit", "not a stream"]);
    assert_status(
        demo.issue_token(token_request(&task.task_id, API, &["read:files"]))
            .await,
        Code::Unavailable,
        "audit trail unavailable",
    );
    assert_status(
        demo.broker()
            .start_task(start_request("unrecorded", &[API], &["read:files"]))
            .await,
        Code::Unavailable,
        "audit trail unavailable",
    );
    // Whatever the store took in the meantime is dead.
    let live = all_leases(
        &op,
        pb::ListLeasesRequest {
            state: pb::LeaseState::Active as i32,
            ..Default::default()
        },
    )
    .await;
    let ids: Vec<&str> = live.iter().map(|l| l.lease_id.as_str()).collect();
    assert_eq!(ids, vec![task.task_id.as_str()], "only the recorded task");

    // Once the trail works again, so does issuance.
    redis.cli(&["DEL", "mayfly:audit"]);
    let token = issue(&demo, &task.task_id).await;
    let after = records(&trail(&op).await);
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].lease_id, s(&token.lease_id));
    assert_eq!(after[0].seq, 2, "the chain goes on from its head");
}

/// The issue's sequence: the trail is replaced under a running broker (as
/// `sed -i` does). Issuance stops at once with an error naming the file;
/// after a restart the broker refuses to start on a trail that does not
/// continue its last head; restored, it goes on without reusing a seq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_or_truncated_trail_stops_issuance_at_start_and_while_running() {
    let broker = TestBroker::start().await;
    let demo = broker.agent().await;
    let task = start(&demo).await;
    issue(&demo, &task.task_id).await;
    let path = broker.config.audit_path();
    let original = std::fs::read_to_string(&path).unwrap();

    // sed -i: a new file, edited, renamed over the old one.
    let tmp = path.with_extension("sed");
    std::fs::write(&tmp, original.replace("e2e", "e2f")).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    for _ in 0..2 {
        assert_status(
            demo.issue_token(token_request(&task.task_id, API, &["read:files"]))
                .await,
            Code::Unavailable,
            "audit trail audit.jsonl was replaced (another file now has its name) under the running broker",
        );
    }
    assert_status(
        demo.broker()
            .start_task(start_request("x", &[API], &["read:files"]))
            .await,
        Code::Unavailable,
        "nothing is issued until the trail is restored",
    );

    // Restarted on the edited file: refused, naming the file.
    let mut broker = broker;
    broker.stop().await;
    let e = match mayfly_broker::Broker::build(broker.config.clone()) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("the broker started on a replaced trail"),
    };
    assert!(
        e.contains(&path.display().to_string()) && e.contains("does not continue"),
        "{e}"
    );
    // Truncated (its last record cut off): refused the same way.
    let lines: Vec<&str> = original.lines().collect();
    std::fs::write(&path, format!("{}\n", lines[..lines.len() - 1].join("\n"))).unwrap();
    let e = match mayfly_broker::Broker::build(broker.config.clone()) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("the broker started on a truncated trail"),
    };
    assert!(e.contains("ends at seq 1"), "{e}");

    // Restored: it starts, and the chain goes on from seq 3. First come
    // the records the replaced trail could not take, kept in the store's
    // outbox: the refused token's (its lease was written with it) and the
    // broker's revocation of that token, which was never handed out.
    std::fs::write(&path, &original).unwrap();
    let broker = broker.restart().await;
    let demo = broker.agent().await;
    start(&demo).await;
    let text = std::fs::read_to_string(&path).unwrap();
    let v = verify(text.lines().map(|l| Ok::<_, String>(l.to_owned()))).unwrap();
    assert_eq!(v.records, 5);
    let lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let after = records(&lines[2..]);
    let events: Vec<Event> = after.iter().map(|r| r.event).collect();
    assert_eq!(
        events,
        [Event::TokenIssued, Event::LeaseRevoked, Event::TaskStarted]
    );
    let refused = after[0].lease_id.clone().unwrap();
    assert_eq!(after[1].revoked, std::slice::from_ref(&refused));
    assert!(
        after[1]
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("not handed out")),
        "{:?}",
        after[1]
    );
    let op = broker.operator().await;
    let lease = all_leases(&op, pb::ListLeasesRequest::default())
        .await
        .into_iter()
        .find(|l| l.lease_id == refused)
        .unwrap();
    assert_eq!(lease.state, pb::LeaseState::Revoked as i32);
}

/// A broker with a small rotation size writes its trail in segments; the
/// trail reads back whole through the Admin API and verifies as one chain
/// with `mayfly audit verify DIR`'s checker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_trail_reads_back_and_verifies_as_one_chain() {
    let dir = tempfile::tempdir().unwrap();
    let trail_path = dir.path().join("audit.jsonl");
    let p = trail_path.clone();
    let broker = TestBroker::start_with(move |c| {
        c.audit.path = Some(p);
        c.audit.rotate_size = 4096;
    })
    .await;
    let demo = broker.agent().await;
    let op = broker.operator().await;
    let task = start(&demo).await;
    for _ in 0..30 {
        issue(&demo, &task.task_id).await;
    }
    let files = mayfly_broker::audit::segment_files(&trail_path).unwrap();
    assert!(files.len() >= 3, "{files:?}");
    let all = trail(&op).await;
    assert_eq!(all.len(), 31);
    let mut on_disk = Vec::new();
    for f in &files {
        on_disk.extend(
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(str::to_owned),
        );
    }
    assert_eq!(on_disk, all);
    let v = verify(all.iter().cloned().map(Ok::<_, String>)).unwrap();
    assert_eq!(v.records, 31);
    let last = read(
        &op,
        pb::ReadAuditRequest {
            last: Some(25),
            ..Default::default()
        },
    )
    .await
    .unwrap()
    .0;
    assert_eq!(last, all[6..]);
}

/// Whether `text` holds a compact JWS: a base64url JSON header (`eyJ…`), a
/// dot, and a base64url JSON payload (`eyJ…`). A random id may hold `eyJ`
/// by chance, never followed by `.eyJ`, as `.ci/run` also reasons.
fn holds_compact_jws(text: &str) -> bool {
    let b64 = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    text.match_indices("eyJ").any(|(at, _)| {
        let rest = &text[at..];
        let header = rest.find(|c: char| !b64(c)).unwrap_or(rest.len());
        rest[header..].starts_with(".eyJ")
    })
}

#[test]
fn a_compact_jws_is_told_from_an_id_that_holds_eyj() {
    assert!(holds_compact_jws(
        r#"{"x":"eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"}"#
    ));
    assert!(!holds_compact_jws(
        r#"{"lease_id":"Ab1eyJzQ9xYz-_0123456789"}"#
    ));
    assert!(!holds_compact_jws("eyJ"));
}
