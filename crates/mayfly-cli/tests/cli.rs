//! The `mayfly` binary as a user runs it, against a real broker: a task's
//! life from start to completion, the token validated by a stock JWT
//! library against the JWKS URL, operator commands, errors as one line,
//! and `dev init` file modes. (The README and the guides themselves are
//! run by `tests/docs.rs`.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use mayfly_testkit::{TestBroker, https_get};
use serde_json::Value;

/// `mayfly` with the test broker's profile, not yet run.
fn command(broker: &TestBroker, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mayfly"));
    c.arg("--profile")
        .arg(&broker.layout.dir)
        .args(["--broker", &broker.url()])
        .args(args)
        .env_remove("MAYFLY_PROFILE");
    c
}

fn mayfly(broker: &TestBroker, args: &[&str]) -> Output {
    command(broker, args).output().expect("mayfly runs")
}

/// The public key (PEM) `openssl` reads with `args`.
fn openssl_pubkey(args: &[&str]) -> String {
    let o = Command::new("openssl").args(args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json(out: Output) -> Value {
    serde_json::from_str(&ok(out)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walkthrough_and_stock_jwt_validation() {
    let broker = TestBroker::start().await;
    let api = "https://api.example.com";

    let task = json(mayfly(
        &broker,
        &[
            "--json",
            "task",
            "start",
            "--intent",
            "summarise ticket 42",
            "--audience",
            api,
            "--scope",
            "read:tickets",
            "--context",
            "environment=staging",
            "--ttl",
            "10m",
        ],
    ));
    let task_id = task["task_id"].as_str().unwrap().to_owned();
    assert_eq!(task["state"], "active");
    assert_eq!(task["context"]["environment"], "staging");

    // The token alone on stdout, so it can be captured.
    let token = ok(mayfly(
        &broker,
        &[
            "token",
            "issue",
            "--task",
            &task_id,
            "--audience",
            api,
            "--scope",
            "read:tickets",
            "--bind",
        ],
    ));
    let token = token.trim();

    // A stock JWT library validates it against the JWKS URL.
    let (status, body) = https_get(
        &format!("{}/.well-known/jwks.json", broker.http_url()),
        &broker.bundle_pem(),
    )
    .await;
    assert_eq!(status, 200);
    let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_str(&body).unwrap();
    let header = jsonwebtoken::decode_header(token).unwrap();
    assert_eq!(header.typ.as_deref(), Some("at+jwt"));
    let key =
        jsonwebtoken::DecodingKey::from_jwk(jwks.find(&header.kid.unwrap()).unwrap()).unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    v.set_audience(&[api]);
    v.set_issuer(&[broker.http_url()]);
    let claims = jsonwebtoken::decode::<Value>(token, &key, &v)
        .unwrap()
        .claims;
    assert_eq!(claims["task_id"], task_id.as_str());
    assert_eq!(claims["scope"], "read:tickets");
    assert!(claims["cnf"]["x5t#S256"].is_string());

    // decode shows the same claims (unverified).
    let decoded = json(mayfly(&broker, &["--json", "token", "decode", token]));
    assert_eq!(decoded["claims"], claims);
    assert_eq!(decoded["header"]["typ"], "at+jwt");

    // Operator view, then completion revokes both leases.
    let leases = json(mayfly(
        &broker,
        &["--json", "lease", "list", "--task", &task_id],
    ));
    assert_eq!(leases.as_array().unwrap().len(), 2);
    let table = ok(mayfly(&broker, &["lease", "list", "--state", "active"]));
    assert!(table.starts_with("LEASE"), "{table}");
    assert!(table.contains(&task_id));

    let done = json(mayfly(&broker, &["--json", "task", "complete", &task_id]));
    assert_eq!(done["revoked_leases"].as_array().unwrap().len(), 2);
    let leases = json(mayfly(
        &broker,
        &["--json", "lease", "list", "--task", &task_id],
    ));
    for l in leases.as_array().unwrap() {
        assert_eq!(l["state"], "revoked");
        assert_eq!(l["revocation_reason"], "task_completed");
    }

    // Errors are one clear line and exit 1.
    let out = mayfly(
        &broker,
        &["token", "issue", "--task", &task_id, "--audience", api],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: failed precondition: task "),
        "{err}"
    );
    assert!(err.contains("is completed"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_revocations_and_extra_identities() {
    let broker = TestBroker::start().await;
    let api = "https://api.example.com";
    let dir = broker.layout.dir.to_str().unwrap().to_owned();

    // A second agent from the dev CA, used with --identity.
    let made = Command::new(env!("CARGO_BIN_EXE_mayfly"))
        .args([
            "dev",
            "identity",
            "--dir",
            &dir,
            "spiffe://example.org/agent/bob",
        ])
        .output()
        .unwrap();
    ok(made);
    let key = broker.layout.dir.join("identities/agent-bob/svid.key");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let start = |identity: &str| {
        json(mayfly(
            &broker,
            &[
                "--json",
                "--identity",
                identity,
                "task",
                "start",
                "--intent",
                "x",
                "--audience",
                api,
                "--scope",
                "read:x",
            ],
        ))["task_id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let bob_task = start("agent-bob");
    let demo_task = start("agent-demo");
    let tasks = json(mayfly(
        &broker,
        &[
            "--json",
            "task",
            "list",
            "--agent",
            "spiffe://example.org/agent/bob",
        ],
    ));
    assert_eq!(tasks.as_array().unwrap().len(), 1);
    assert_eq!(tasks[0]["task_id"], bob_task.as_str());

    let token = json(mayfly(
        &broker,
        &[
            "--json",
            "--identity",
            "agent-bob",
            "token",
            "issue",
            "--task",
            &bob_task,
            "--audience",
            api,
        ],
    ));
    let lease_id = token["lease_id"].as_str().unwrap().to_owned();
    let out = ok(mayfly(
        &broker,
        &["lease", "revoke", &lease_id, "--reason", "found in a log"],
    ));
    assert!(out.contains(&lease_id));
    let shown = json(mayfly(&broker, &["--json", "lease", "show", &lease_id]));
    assert_eq!(shown["state"], "revoked");
    assert_eq!(shown["revocation_reason"], "operator");
    assert_eq!(shown["revoked_by"], "spiffe://example.org/operator/admin");

    let revoked = json(mayfly(
        &broker,
        &[
            "--json",
            "agent",
            "revoke",
            "spiffe://example.org/agent/bob",
        ],
    ));
    assert_eq!(revoked["revoked_leases"], serde_json::json!([bob_task]));
    let revoked = json(mayfly(&broker, &["--json", "task", "revoke", &demo_task]));
    assert_eq!(revoked["revoked_leases"], serde_json::json!([demo_task]));

    // An agent may not use operator commands.
    let out = mayfly(&broker, &["--identity", "agent-demo", "lease", "list"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.starts_with(
            "error: permission denied: spiffe://example.org/agent/demo is not an operator"
        ),
        "{err}"
    );
}

#[test]
fn dev_init_writes_private_keys_and_refuses_to_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_mayfly"))
            .args(["dev", "init", "--dir"])
            .arg(&dir)
            .args(["--trust-domain", "corp.example"])
            .output()
            .unwrap()
    };
    let out = ok(run());
    assert!(
        out.contains("spiffe://corp.example/operator/admin"),
        "{out}"
    );
    for key in [
        "ca.key",
        "server.key",
        "identities/agent-demo/svid.key",
        "identities/operator-admin/svid.key",
    ] {
        let mode = std::fs::metadata(dir.join(key))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{key}");
    }
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    // The agent SVID is what openssl expects of an X.509-SVID.
    let text = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(dir.join("identities/agent-demo/svid.pem"))
        .output()
        .unwrap();
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(
        text.contains("URI:spiffe://corp.example/agent/demo"),
        "{text}"
    );
    assert!(text.contains("CA:FALSE"), "{text}");
    let verify = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(dir.join("bundle.pem"))
        .arg(dir.join("identities/agent-demo/svid.pem"))
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );

    let again = run();
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    assert!(Path::new(&dir.join("mayfly.toml")).exists());
}

#[test]
fn missing_connection_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mayfly"))
        .current_dir(tmp.path())
        .args(["lease", "list"])
        .env_remove("MAYFLY_PROFILE")
        .env_remove("MAYFLY_BROKER")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.starts_with("error: no broker connection"), "{err}");
}

#[test]
fn keygen_writes_a_private_key_once() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("jwt-es256.key");
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_mayfly"))
            .args(["keygen", "--out"])
            .arg(&out)
            .output()
            .unwrap()
    };
    let text = ok(run());
    assert!(text.contains("ES256, kid "), "{text}");
    assert_eq!(
        std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let pem = std::fs::read_to_string(&out).unwrap();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
    let again = run();
    assert_eq!(again.status.code(), Some(1), "never overwrites a key");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), pem);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cert_issue_with_a_new_key() {
    let broker = TestBroker::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("cert");
    let task = json(mayfly(
        &broker,
        &[
            "--json",
            "task",
            "start",
            "--intent",
            "mTLS",
            "--audience",
            "https://api.example.com",
        ],
    ))["task_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let issued = json(mayfly(
        &broker,
        &[
            "--json",
            "cert",
            "issue",
            "--task",
            &task,
            "--new-key",
            "--out",
            out_dir.to_str().unwrap(),
        ],
    ));
    assert_eq!(
        issued["spiffe_id"],
        format!("spiffe://example.org/agent/demo/task/{task}")
    );
    let key = out_dir.join("key.pem");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // The key made locally matches the certificate the broker signed.
    let cert_path = out_dir.join("cert.pem");
    assert_eq!(
        openssl_pubkey(&[
            "x509",
            "-noout",
            "-pubkey",
            "-in",
            cert_path.to_str().unwrap()
        ]),
        openssl_pubkey(&["pkey", "-pubout", "-in", key.to_str().unwrap()])
    );
    let leases = json(mayfly(
        &broker,
        &["--json", "lease", "list", "--task", &task, "--kind", "x509"],
    ));
    assert_eq!(leases[0]["serial"], issued["serial"]);
    // --csr and --new-key are exclusive; one is required.
    let out = mayfly(&broker, &["cert", "issue", "--task", &task, "--out", "x"]);
    assert_eq!(out.status.code(), Some(2));
}

/// Policies under which every credential needs an operator's approval.
const APPROVE_EVERYTHING: &str = r#"
@id("open-tasks")
permit (principal, action == Mayfly::Action::"start_task", resource);

@id("tokens-need-approval")
@approval("required")
permit (principal, action == Mayfly::Action::"issue_token", resource);

@id("certs-need-approval")
@approval("required")
permit (principal, action == Mayfly::Action::"sign_certificate", resource);
"#;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The single pending approval, as `approval list --json` shows it.
fn pending_approval(broker: &TestBroker) -> Value {
    let list = json(mayfly(broker, &["--json", "approval", "list"]));
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    list[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_through_the_cli() {
    let broker =
        TestBroker::start_with(|c| mayfly_testkit::use_policies(c, APPROVE_EVERYTHING)).await;
    let api = "https://api.example.com";
    let task = json(mayfly(
        &broker,
        &[
            "--json",
            "task",
            "start",
            "--intent",
            "deploy",
            "--audience",
            api,
            "--scope",
            "write:repo",
        ],
    ))["task_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let issue = [
        "token",
        "issue",
        "--task",
        &task,
        "--audience",
        api,
        "--scope",
        "write:repo",
    ];

    // No --wait: exit code 3 and the next step spelled out.
    let out = mayfly(&broker, &issue);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(out.stdout.is_empty());
    let approval = pending_approval(&broker);
    let id = approval["approval_id"].as_str().unwrap().to_owned();
    assert_eq!(approval["state"], "pending");
    assert_eq!(approval["policy_id"], "tokens-need-approval");
    assert_eq!(approval["task_intent"], "deploy");
    assert_eq!(approval["scopes"], serde_json::json!(["write:repo"]));
    assert!(
        stderr(&out).contains(&format!("repeat the command with --approval {id}")),
        "{}",
        stderr(&out)
    );

    // The agent waits on the approval while an operator approves it.
    let mut collect = issue.to_vec();
    collect.extend(["--approval", &id, "--wait", "30s"]);
    let waiting = command(&broker, &collect)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let approved = json(mayfly(
        &broker,
        &[
            "--json",
            "approval",
            "approve",
            &id,
            "--reason",
            "change CHG-7",
        ],
    ));
    assert_eq!(approved["state"], "approved");
    assert_eq!(
        approved["decided_by"],
        "spiffe://example.org/operator/admin"
    );
    assert_eq!(approved["reason"], "change CHG-7");
    let out = tokio::task::spawn_blocking(move || waiting.wait_with_output().unwrap())
        .await
        .unwrap();
    let token = ok(out);
    let decoded = json(mayfly(
        &broker,
        &["--json", "token", "decode", token.trim()],
    ));
    assert_eq!(decoded["claims"]["scope"], "write:repo");
    assert_eq!(decoded["claims"]["task_id"], task.as_str());

    // Used once.
    let mut again: Vec<&str> = issue.to_vec();
    again.extend(["--approval", &id]);
    let out = mayfly(&broker, &again);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("is consumed"), "{}", stderr(&out));

    // A denial reaches the agent with the operator's reason.
    assert_eq!(mayfly(&broker, &issue).status.code(), Some(3));
    let denied_id = pending_approval(&broker)["approval_id"]
        .as_str()
        .unwrap()
        .to_owned();
    ok(mayfly(
        &broker,
        &["approval", "deny", &denied_id, "--reason", "change freeze"],
    ));
    let mut denied: Vec<&str> = issue.to_vec();
    denied.extend(["--approval", &denied_id]);
    let out = mayfly(&broker, &denied);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!(
            "approval {denied_id} is denied by spiffe://example.org/operator/admin: change freeze"
        )),
        "{}",
        stderr(&out)
    );

    // A certificate for a key made here: the key and request are kept while
    // the approval is pending, and the printed command collects it.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cert");
    let dir_s = dir.to_str().unwrap();
    let out = mayfly(
        &broker,
        &[
            "cert",
            "issue",
            "--task",
            &task,
            "--new-key",
            "--out",
            dir_s,
        ],
    );
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let cert_id = pending_approval(&broker)["approval_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let csr = dir.join("request.csr");
    let hint = format!("--csr {dir_s}/request.csr --approval {cert_id} --out {dir_s}");
    assert!(stderr(&out).contains(&hint), "{}", stderr(&out));
    assert_eq!(
        std::fs::metadata(dir.join("key.pem"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    ok(mayfly(&broker, &["approval", "approve", &cert_id]));
    let issued = json(mayfly(
        &broker,
        &[
            "--json",
            "cert",
            "issue",
            "--task",
            &task,
            "--csr",
            csr.to_str().unwrap(),
            "--approval",
            &cert_id,
            "--out",
            dir_s,
        ],
    ));
    assert_eq!(
        issued["spiffe_id"],
        format!("spiffe://example.org/agent/demo/task/{task}")
    );
    // The certificate is for the key kept on disk.
    assert_eq!(
        openssl_pubkey(&[
            "x509",
            "-noout",
            "-pubkey",
            "-in",
            &format!("{dir_s}/cert.pem")
        ]),
        openssl_pubkey(&["pkey", "-pubout", "-in", &format!("{dir_s}/key.pem")])
    );
}

#[test]
fn policy_check_validates_like_the_broker() {
    let run = |dir: &Path| {
        Command::new(env!("CARGO_BIN_EXE_mayfly"))
            .args(["policy", "check"])
            .arg(dir)
            .output()
            .unwrap()
    };
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/policies");
    let out = ok(run(&shipped));
    assert!(
        out.ends_with("policies and 3 tools, valid against the Mayfly schema\n"),
        "{out}"
    );

    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("p.cedar"),
        "@id(\"typo\")\npermit (principal, action, resource)\nwhen { context.scope_prefix.contains(\"read\") };\n",
    )
    .unwrap();
    let out = run(tmp.path());
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    assert_eq!(
        stdout,
        format!(
            "{}/p.cedar:3:8: for policy `typo`, attribute `scope_prefix` in context not found (did you mean `scope_prefixes`?)\n",
            tmp.path().display()
        )
    );
    assert!(stderr(&out).contains("1 problem(s)"), "{}", stderr(&out));
}

/// The shipped systemd unit, rated offline by `systemd-analyze security`:
/// an overall exposure of at most 2.0 (its threshold is on a 0–100
/// scale). The same check refuses the unit the broker shipped before,
/// which rated 7.0.
#[test]
fn the_systemd_unit_is_hardened() {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/systemd/mayfly.service");
    let rate = |unit: &Path| {
        Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--threshold=20"])
            .arg(unit)
            .output()
            .expect("systemd-analyze runs (Debian's systemd; .ci/run installs it)")
    };
    let out = rate(&unit);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "exposure above 2.0:\n{report}");
    assert!(
        report.contains("Overall exposure level for mayfly.service"),
        "{report}"
    );
    // A unit that only names its user rates far above: the check can fail.
    let tmp = tempfile::tempdir().unwrap();
    let bare = tmp.path().join("mayfly.service");
    std::fs::write(
        &bare,
        "[Service]\nUser=mayfly\nExecStart=/usr/local/bin/mayfly serve\n",
    )
    .unwrap();
    assert!(!rate(&bare).status.success());
}

#[test]
fn config_check_names_what_serve_would_fail_on() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    ok(Command::new(env!("CARGO_BIN_EXE_mayfly"))
        .args(["dev", "init", "--dir"])
        .arg(&dir)
        .output()
        .unwrap());
    let config = dir.join("mayfly.toml");
    let check = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_mayfly"))
            .args(["config", "check"])
            .arg(&config)
            .args(extra)
            .output()
            .unwrap()
    };
    let out = ok(check(&[]));
    let parts: Vec<&str> = out.lines().map(|l| l.split(':').next().unwrap()).collect();
    assert_eq!(
        parts,
        [
            "ok    configuration",
            "ok    tls",
            "ok    issuing CA",
            "ok    signing key",
            "ok    policies",
            "ok    store"
        ],
        "{out}"
    );
    // Nothing was created: the signing key is only reported.
    assert!(
        out.contains("does not exist yet: serve creates it"),
        "{out}"
    );
    assert!(!dir.join("data").exists());

    let failing = |out: Output, part: &str, says: &str| {
        assert_eq!(out.status.code(), Some(1));
        let stdout = String::from_utf8(out.stdout.clone()).unwrap();
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("FAIL  {part}:")))
            .unwrap_or_else(|| panic!("no failure for {part}:\n{stdout}"));
        assert!(line.contains(says), "{line}");
        assert_eq!(stdout.matches("FAIL").count(), 1, "{stdout}");
        assert!(stderr(&out).contains("1 problem(s)"), "{}", stderr(&out));
    };

    // A wrong path.
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("\"server.pem\"", "\"missing.pem\"")).unwrap();
    failing(check(&[]), "tls", "missing.pem");
    std::fs::write(&config, &text).unwrap();

    // A key that is not a key.
    let key = dir.join("issuing-ca.key");
    let good_key = std::fs::read(&key).unwrap();
    std::fs::write(
        &key,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    failing(check(&[]), "issuing CA", "key");
    std::fs::write(&key, &good_key).unwrap();

    // An invalid policy, named by file and line.
    let bad = dir.join("policies/typo.cedar");
    std::fs::write(
        &bad,
        "@id(\"typo\")\npermit (principal, action, resource)\nwhen { context.scope_prefix.contains(\"read\") };\n",
    )
    .unwrap();
    failing(check(&[]), "policies", "typo.cedar:3:8");
    std::fs::remove_file(&bad).unwrap();

    // A workload-token issuer with a symmetric algorithm.
    std::fs::write(
        &config,
        format!(
            "{text}\n[[federation]]\nissuer = \"https://idp.example\"\njwks_file = \"policies/mayfly.cedar\"\nalgorithms = [\"HS256\"]\n"
        ),
    )
    .unwrap();
    failing(check(&[]), "workload token issuers", "asymmetric only");
    std::fs::write(&config, &text).unwrap();

    // A Redis store that does not answer, when asked to reach it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(
        &config,
        text.replace(
            "store = \"embedded\"",
            &format!("store = \"redis://127.0.0.1:{port}\""),
        ),
    )
    .unwrap();
    assert!(ok(check(&[])).contains("ok    store: Redis (not contacted"));
    failing(check(&["--store"]), "store", "Redis does not answer");

    // A file that is not a configuration: the one finding.
    std::fs::write(&config, "trust_domain = 3\n").unwrap();
    let out = check(&[]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.starts_with("FAIL  configuration: "), "{stdout}");
    assert!(stdout.contains("expected a string"), "{stdout}");
    // Nothing else is checked without a configuration.
    let findings = stdout
        .lines()
        .filter(|l| l.starts_with("ok ") || l.starts_with("FAIL "))
        .count();
    assert_eq!(findings, 1, "{stdout}");
}

/// `mayfly ARGS`, run with no profile or broker.
fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mayfly"))
        .args(args)
        .output()
        .unwrap()
}

/// A `dev init` directory in a fresh temporary one.
fn dev_init() -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    ok(run(&["dev", "init", "--dir", dir.to_str().unwrap()]));
    (tmp, dir)
}

#[test]
fn keys_rotate_list_and_prune_follow_the_schedule() {
    let (_tmp, dir) = dev_init();
    let config = dir.join("mayfly.toml");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "default_ttl = \"5m\"\nmax_ttl = \"15m\"",
        "default_ttl = \"1s\"\nmax_ttl = \"1s\"\nretire_grace = \"1s\"",
    );
    assert!(
        text.contains("retire_grace"),
        "the dev config changed shape"
    );
    std::fs::write(&config, text).unwrap();
    let data = dir.join("data");
    std::fs::create_dir(&data).unwrap();
    let config = config.to_str().unwrap();

    // No key yet: nothing signs.
    let out = run(&["keys", "list", "--config", config]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no ES256 key signs now"),
        "{}",
        stderr(&out)
    );
    ok(run(&[
        "keygen",
        "--out",
        data.join("jwt-es256.key").to_str().unwrap(),
    ]));

    // Far enough ahead that the first list comes before it on a busy
    // machine; the second waits until it has passed.
    let rotated = std::time::Instant::now();
    let out = ok(run(&["keys", "rotate", "--config", config, "--in", "5s"]));
    assert!(out.contains("published now; signs from "), "{out}");
    let states = |out: &str| -> Vec<String> {
        out.lines()
            .map(|l| l.split_whitespace().next().unwrap().to_owned())
            .collect()
    };
    let out = ok(run(&["keys", "list", "--config", config]));
    assert_eq!(states(&out), ["signing", "next"], "{out}");
    std::thread::sleep(std::time::Duration::from_millis(6000).saturating_sub(rotated.elapsed()));
    let out = ok(run(&["keys", "list", "--config", config]));
    assert_eq!(states(&out), ["published", "signing"], "{out}");
    // Still published: nothing to prune.
    assert_eq!(ok(run(&["keys", "prune", "--config", config])), "");
    // max_ttl + retire_grace after the switch, the old key is retired.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let out = ok(run(&["keys", "list", "--config", config]));
    assert_eq!(states(&out), ["retired", "signing"], "{out}");
    let out = ok(run(&["keys", "prune", "--config", config]));
    assert!(
        out.starts_with("removed ") && out.contains("jwt-es256.key"),
        "{out}"
    );
    assert!(!data.join("jwt-es256.key").exists());
    let out = ok(run(&["keys", "list", "--config", config]));
    assert_eq!(states(&out), ["signing"], "{out}");
}

#[test]
fn ca_install_schedules_the_next_issuing_ca_and_list_shows_it() {
    use std::os::unix::fs::PermissionsExt;
    let (tmp, dir) = dev_init();
    let config = dir.join("mayfly.toml");
    let config = config.to_str().unwrap();
    // The next CA, made under the dev root as an operator's PKI would.
    let root = mayfly_broker::dev::load_ca(&dir).unwrap();
    let td = mayfly_core::TrustDomain::new("example.org").unwrap();
    let next =
        mayfly_broker::dev::issuing_ca(&root, &td, std::time::Duration::from_secs(3600)).unwrap();
    let (cert, key) = (tmp.path().join("next.pem"), tmp.path().join("next.key"));
    std::fs::write(&cert, &next.cert_pem).unwrap();
    std::fs::write(&key, next.key_pem.as_bytes()).unwrap();
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let install = |lead: &str| {
        run(&[
            "ca", "install", "--config", config, "--cert", cert, "--key", key, "--in", lead,
        ])
    };

    // A key others can read, and a lead the replicas might not see in
    // time, are refused before anything is written.
    std::fs::set_permissions(key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = install("5m");
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("chmod 600"), "{}", stderr(&out));
    std::fs::set_permissions(key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = install("1s");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("not longer than tls.reload_interval"),
        "{}",
        stderr(&out)
    );
    let states = |out: &str| -> Vec<String> {
        out.lines()
            .map(|l| l.split_whitespace().next().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        states(&ok(run(&["ca", "list", "--config", config]))),
        ["signing"]
    );

    let out = ok(install("5m"));
    assert!(out.contains("signs from "), "{out}");
    let written: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().into_string().unwrap())
        .filter(|n| n.starts_with("issuing-ca-"))
        .collect();
    assert_eq!(written.len(), 2, "{written:?}");
    let key_file = written.iter().find(|n| n.ends_with(".key")).unwrap();
    assert_eq!(
        std::fs::metadata(dir.join(key_file))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let out = ok(run(&["ca", "list", "--config", config]));
    assert_eq!(states(&out), ["signing", "next"], "{out}");
    // The same CA twice is refused.
    let out = install("5m");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("already scheduled"),
        "{}",
        stderr(&out)
    );
    // `config check` loads the whole schedule.
    let out = ok(run(&["config", "check", config]));
    assert!(out.contains("and 1 scheduled"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_takes_its_identity_from_the_workload_api() {
    let broker = TestBroker::start().await;
    // Served by the testkit from the public workload.proto, as SPIRE would.
    let api = broker
        .workload_api(
            "spiffe://example.org/agent/from-spire",
            std::time::Duration::from_secs(3600),
        )
        .await;
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_mayfly"))
            .args(["--broker", &broker.url()])
            .args(args)
            .env("SPIFFE_ENDPOINT_SOCKET", api.endpoint())
            .env_remove("MAYFLY_PROFILE")
            .current_dir(std::env::temp_dir())
            .output()
            .unwrap()
    };
    let task = json(run(&[
        "--json",
        "task",
        "start",
        "--intent",
        "from the Workload API",
        "--audience",
        "https://api.example.com",
        "--scope",
        "read:x",
    ]));
    assert_eq!(task["agent_id"], "spiffe://example.org/agent/from-spire");
    // The same flag by name, and a bad endpoint named in the error.
    let out = run(&[
        "--workload-api",
        "unix:///nonexistent/agent.sock",
        "task",
        "get",
        task["task_id"].as_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("SPIFFE Workload API"),
        "{}",
        stderr(&out)
    );
}

/// `mayfly dev identity` for `id` in the test broker's profile.
fn identity(broker: &TestBroker, id: &str) {
    let dir = broker.layout.dir.to_str().unwrap().to_owned();
    ok(Command::new(env!("CARGO_BIN_EXE_mayfly"))
        .args(["dev", "identity", "--dir", &dir, id])
        .output()
        .unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_trace_tail_and_verify() {
    let broker = TestBroker::start().await;
    let api = "https://api.example.com";
    identity(&broker, "spiffe://example.org/agent/bob");
    identity(&broker, "spiffe://example.org/agent/carol");

    // demo -> bob -> carol, a token at every hop, then demo completes.
    let root = json(mayfly(
        &broker,
        &[
            "--json",
            "task",
            "start",
            "--intent",
            "release 1.2",
            "--audience",
            api,
            "--scope",
            "read:files",
        ],
    ))["task_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let delegate = |as_id: &str, parent: &str, to: &str| {
        json(mayfly(
            &broker,
            &[
                "--json",
                "--identity",
                as_id,
                "task",
                "delegate",
                parent,
                "--to",
                to,
                "--intent",
                "help",
                "--audience",
                api,
                "--scope",
                "read:files",
            ],
        ))["task_id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let child = delegate("agent-demo", &root, "spiffe://example.org/agent/bob");
    let grandchild = delegate("agent-bob", &child, "spiffe://example.org/agent/carol");
    let token = |as_id: &str, task: &str| {
        let out = mayfly(
            &broker,
            &[
                "--identity",
                as_id,
                "token",
                "issue",
                "--task",
                task,
                "--audience",
                api,
                "--scope",
                "read:files",
            ],
        );
        let lease = stderr(&out).split_whitespace().nth(1).unwrap().to_owned();
        ok(out);
        lease
    };
    let root_token = token("agent-demo", &root);
    let carol_token = token("agent-carol", &grandchild);
    ok(mayfly(&broker, &["task", "complete", &root]));

    // The tree, from the root, whichever task is asked for.
    let tree = ok(mayfly(&broker, &["audit", "trace", &grandchild]));
    let lines: Vec<&str> = tree.lines().collect();
    assert_eq!(lines[0], "audit chain intact (6 records)");
    assert!(lines[1].starts_with(&format!(
        "task {root} spiffe://example.org/agent/demo \"release 1.2\""
    )));
    let at = |needle: &str| {
        lines
            .iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("{needle:?} not in\n{tree}"))
    };
    assert!(
        lines[at(&format!("└─ task {child} spiffe://example.org/agent/bob"))].starts_with("  └─")
    );
    let carol = at(&format!(
        "└─ task {grandchild} spiffe://example.org/agent/carol"
    ));
    assert!(lines[carol].starts_with("       └─ task") && lines[carol].ends_with("<=="));
    assert!(lines[at(&format!("token {root_token}"))].contains("-> revoked"));
    let carols = lines[at(&format!("token {carol_token}"))];
    assert!(
        carols.contains(&format!(
            "(parent_revoked: task {root} ended, task_completed by spiffe://example.org/agent/demo)"
        )),
        "{carols}"
    );
    assert!(at(&format!("token {carol_token}")) > carol);

    let tree = json(mayfly(&broker, &["--json", "audit", "trace", &root]));
    assert_eq!(tree["chain"]["intact"], true);
    let t = &tree["tree"];
    assert_eq!(t["task_id"], root.as_str());
    assert_eq!(t["fate"]["state"], "completed");
    let c = &t["children"][0];
    assert_eq!(c["delegated_by"], "spiffe://example.org/agent/demo");
    let g = &c["children"][0];
    assert_eq!(g["task_id"], grandchild.as_str());
    assert_eq!(g["agent"], "spiffe://example.org/agent/carol");
    assert_eq!(g["credentials"][0]["lease_id"], carol_token.as_str());
    assert_eq!(g["credentials"][0]["fate"]["state"], "revoked");
    assert_eq!(g["credentials"][0]["fate"]["with_task"], root.as_str());
    let missing = mayfly(&broker, &["audit", "trace", "AAAAAAAAAAAAAAAAAAAAAA"]);
    assert!(!missing.status.success());
    assert!(stderr(&missing).contains("does not appear in the audit trail"));

    // tail: the last records, one task's subtree, and the raw trail.
    let last = ok(mayfly(&broker, &["audit", "tail", "-n", "2"]));
    let last: Vec<&str> = last.lines().collect();
    assert_eq!(last.len(), 2);
    assert!(last[0].contains("token_issued") && last[0].contains(&carol_token));
    assert!(last[1].contains("task_completed") && last[1].contains("revoked=5"));
    let raw = ok(mayfly(&broker, &["--json", "audit", "tail", "--all"]));
    let file = std::fs::read_to_string(broker.config.audit_path()).unwrap();
    assert_eq!(raw, file, "--json prints the trail byte for byte");
    let sub = ok(mayfly(
        &broker,
        &["--json", "audit", "tail", "--task", &child],
    ));
    let tasks: Vec<String> = sub
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["task_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    // The delegations, carol's token, and the completion that ended them.
    assert_eq!(
        tasks,
        [&child, &grandchild, &grandchild, &root].map(String::as_str)
    );

    // verify: the intact trail, then an edit, a deletion and a reordering.
    let dir = tempfile::tempdir().unwrap();
    let check = |name: &str, lines: &[&str]| {
        let path = dir.path().join(name);
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        Command::new(env!("CARGO_BIN_EXE_mayfly"))
            .args(["audit", "verify", path.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let good: Vec<&str> = file.lines().collect();
    let out = ok(check("good.jsonl", &good));
    assert!(
        out.contains("6 records, chain intact; head seq 6 sha256 "),
        "{out}"
    );
    let head = out
        .split("sha256 ")
        .nth(1)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_owned();

    let edited_line = good[2].replace("\"help\"", "\"harmless\"");
    assert_ne!(edited_line, good[2]);
    let mut edited = good.clone();
    edited[2] = &edited_line;
    let mut deleted = good.clone();
    deleted.remove(3);
    let mut reordered = good.clone();
    reordered.swap(1, 2);
    for (name, lines, says) in [
        (
            "edited",
            &edited,
            "line 4 (seq 4): prev does not match the SHA-256 of line 3",
        ),
        (
            "deleted",
            &deleted,
            "line 4: record seq 5 where seq 4 was due",
        ),
        (
            "reordered",
            &reordered,
            "line 2: record seq 3 where seq 2 was due",
        ),
    ] {
        let out = check(name, lines);
        assert_eq!(out.status.code(), Some(1), "{name}");
        let path = dir.path().join(name);
        let want = format!("error: {}: chain broken at {says}", path.display());
        assert!(stderr(&out).starts_with(&want), "{name}: {}", stderr(&out));
    }

    // A trail cut short still chains; the anchor catches it.
    let path = dir.path().join("cut.jsonl");
    std::fs::write(&path, good[..4].join("\n") + "\n").unwrap();
    let cut = Command::new(env!("CARGO_BIN_EXE_mayfly"))
        .args(["audit", "verify", path.to_str().unwrap(), "--anchor", &head])
        .output()
        .unwrap();
    assert_eq!(cut.status.code(), Some(1));
    assert!(stderr(&cut).contains("cut short"), "{}", stderr(&cut));
    let whole = dir.path().join("good.jsonl");
    ok(Command::new(env!("CARGO_BIN_EXE_mayfly"))
        .args([
            "audit",
            "verify",
            whole.to_str().unwrap(),
            "--anchor",
            &head,
        ])
        .output()
        .unwrap());

    // A directory of segments is one chain, in the order of its records
    // (names sort otherwise here); a segment missing breaks it.
    let segs = tempfile::tempdir().unwrap();
    let write = |name: &str, lines: &[&str]| {
        std::fs::write(segs.path().join(name), lines.join("\n") + "\n").unwrap();
    };
    write("b-first.jsonl", &good[..2]);
    write("a-second.jsonl", &good[2..4]);
    write("c-third.jsonl", &good[4..]);
    std::fs::write(segs.path().join("audit.jsonl.head"), "not a trail file").unwrap();
    let verify_dir = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_mayfly"))
            .args(["audit", "verify", segs.path().to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = ok(verify_dir(&["--anchor", &head]));
    assert!(out.contains("6 records, chain intact"), "{out}");
    assert!(out.contains("anchor found at"), "{out}");
    std::fs::remove_file(segs.path().join("a-second.jsonl")).unwrap();
    let out = verify_dir(&[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("c-third.jsonl: line 1: record seq 5 where seq 3 was due"),
        "{}",
        stderr(&out)
    );
    // A trail whose start was archived: refused, unless --partial says so.
    std::fs::remove_file(segs.path().join("b-first.jsonl")).unwrap();
    let out = verify_dir(&[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("pass --partial"), "{}", stderr(&out));
    let out = ok(verify_dir(&["--partial"]));
    assert!(out.contains("starts at seq 5"), "{out}");
}

/// The sequence an attacker tries: a task certificate joined with its
/// chain, used as the CLI's client certificate. Every step is refused with
/// the reason, while the task is live and after it completed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_certificate_is_refused_as_the_clis_identity() {
    let broker = TestBroker::start().await;
    let api = "https://api.example.com";
    let task = json(mayfly(
        &broker,
        &[
            "--json",
            "task",
            "start",
            "--intent",
            "x",
            "--audience",
            api,
            "--scope",
            "read:x",
        ],
    ))["task_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let tc = tempfile::tempdir().unwrap();
    let out_dir = tc.path().join("tc");
    ok(mayfly(
        &broker,
        &[
            "cert",
            "issue",
            "--task",
            &task,
            "--new-key",
            "--out",
            out_dir.to_str().unwrap(),
        ],
    ));
    let full = out_dir.join("full.pem");
    let mut pem = std::fs::read_to_string(out_dir.join("cert.pem")).unwrap();
    pem.push_str(&std::fs::read_to_string(out_dir.join("chain.pem")).unwrap());
    std::fs::write(&full, pem).unwrap();
    let key = out_dir.join("key.pem");
    let nested = tc.path().join("nested");
    let as_task_cert = |args: &[&str]| {
        let mut all = vec![
            "--cert",
            full.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ];
        all.extend_from_slice(args);
        let out = mayfly(&broker, &all);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains("is a task certificate"), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    };
    let attempts: [&[&str]; 3] = [
        &[
            "task",
            "start",
            "--intent",
            "after",
            "--audience",
            api,
            "--scope",
            "read:x",
        ],
        &[
            "token",
            "issue",
            "--task",
            &task,
            "--audience",
            api,
            "--scope",
            "read:x",
        ],
        &[
            "cert",
            "issue",
            "--task",
            &task,
            "--new-key",
            "--out",
            nested.to_str().unwrap(),
        ],
    ];
    for args in attempts {
        as_task_cert(args);
    }
    ok(mayfly(&broker, &["task", "complete", &task]));
    for args in attempts {
        as_task_cert(args);
    }
    // The refusals left nothing behind: only the task and its certificate.
    let leases = json(mayfly(&broker, &["--json", "lease", "list"]));
    assert_eq!(leases.as_array().unwrap().len(), 2, "{leases}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_locks_an_agent_out_and_lets_it_back() {
    let broker = TestBroker::start().await;
    let api = "https://api.example.com";
    let demo = "spiffe://example.org/agent/demo";
    let start = [
        "task",
        "start",
        "--intent",
        "x",
        "--audience",
        api,
        "--scope",
        "read:x",
    ];
    ok(mayfly(&broker, &start));
    let locked = ok(mayfly(
        &broker,
        &[
            "agent",
            "lock",
            demo,
            "--reason",
            "key leaked",
            "--for",
            "2h",
        ],
    ));
    assert!(
        locked.starts_with(&format!("locked agent {demo} until ")),
        "{locked}"
    );
    assert!(locked.contains("revoked 1 lease(s)"), "{locked}");
    let out = mayfly(&broker, &start);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.starts_with("error: permission denied: agent spiffe://example.org/agent/demo is locked by spiffe://example.org/operator/admin (key leaked)"),
        "{err}"
    );
    let locks = json(mayfly(&broker, &["--json", "agent", "locks"]));
    assert_eq!(locks[0]["agent_id"], demo);
    assert_eq!(locks[0]["reason"], "key leaked");
    assert!(locks[0]["expires_at"].is_string());
    let table = ok(mayfly(&broker, &["agent", "locks"]));
    assert!(table.starts_with("AGENT"), "{table}");
    ok(mayfly(
        &broker,
        &["agent", "unlock", demo, "--note", "rotated"],
    ));
    ok(mayfly(&broker, &start));
    let out = mayfly(&broker, &["agent", "unlock", demo]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("is not locked"), "{}", stderr(&out));
    // The trail has both decisions.
    let trail = ok(mayfly(&broker, &["audit", "tail", "-n", "20"]));
    assert!(
        trail.contains("agent_locked") && trail.contains("agent_unlocked"),
        "{trail}"
    );
}

/// `mayfly task complete T | head -2` with the reader gone before the
/// output comes: the command still does its work and ends quietly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_output_pipe_ends_the_cli_quietly() {
    let broker = TestBroker::start().await;
    let api = "https://api.example.com";
    let task = json(mayfly(
        &broker,
        &[
            "--json",
            "task",
            "start",
            "--intent",
            "x",
            "--audience",
            api,
            "--scope",
            "read:x",
        ],
    ))["task_id"]
        .as_str()
        .unwrap()
        .to_owned();
    for _ in 0..3 {
        ok(mayfly(
            &broker,
            &[
                "token",
                "issue",
                "--task",
                &task,
                "--audience",
                api,
                "--scope",
                "read:x",
            ],
        ));
    }
    let mut child = command(&broker, &["task", "complete", &task])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.code(), Some(0), "{err}");
    let got = json(mayfly(&broker, &["--json", "task", "get", &task]));
    assert_eq!(got["state"], "completed");
}

/// Without its `broker` feature the CLI links no broker, store or server:
/// the agent's and operator's commands and `audit verify`/`trace` (on
/// mayfly-audit alone). `.ci/run` builds it that way and checks a trail.
#[test]
fn the_cli_without_the_broker_feature_links_no_broker() {
    let tree = |features: &[&str]| {
        let out = Command::new(env!("CARGO"))
            .args([
                "tree",
                "-p",
                "mayfly-cli",
                "-e",
                "normal",
                "--prefix",
                "none",
            ])
            .args(["--locked", "--offline"])
            .args(features)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        String::from_utf8(out.stdout).unwrap()
    };
    let crates = |tree: &str| -> std::collections::BTreeSet<String> {
        tree.lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_owned)
            .collect()
    };
    let full = crates(&tree(&[]));
    let alone = crates(&tree(&["--no-default-features"]));
    assert!(
        full.contains("mayfly-broker") && full.contains("redb"),
        "{full:?}"
    );
    for heavy in ["mayfly-broker", "redb", "redis", "mimalloc"] {
        assert!(
            !alone.contains(heavy),
            "{heavy} linked without the broker feature"
        );
    }
    assert!(alone.contains("mayfly-audit") && alone.contains("mayfly-client"));
    // The gateway is part of that CLI: it is on verify, core, client and
    // the proto, never the broker.
    assert!(alone.contains("mayfly-gateway"), "{alone:?}");
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "-p",
            "mayfly-gateway",
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .args(["--locked", "--offline"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let gateway = crates(&String::from_utf8(out.stdout).unwrap());
    for heavy in [
        "mayfly-broker",
        "mayfly-policy",
        "cedar-policy",
        "redb",
        "redis",
    ] {
        assert!(!gateway.contains(heavy), "the gateway links {heavy}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_without_a_certificate_uses_its_workload_token() {
    let k8s =
        mayfly_testkit::TokenIssuer::rsa("https://kubernetes.default.svc.cluster.local", "k8s-1");
    let jwks = mayfly_testkit::TokenIssuer::jwks(&[&k8s]);
    let broker = TestBroker::start_with(move |c| {
        let file = c.data_dir.with_file_name("k8s-jwks.json");
        std::fs::write(&file, &jwks).unwrap();
        c.federation = vec![
            toml::from_str(&format!(
                "issuer = \"https://kubernetes.default.svc.cluster.local\"\n\
                 jwks_file = \"{}\"\nalgorithms = [\"RS256\"]\n\
                 subject = \"system:serviceaccount:{{ns}}:{{sa}}\"\n\
                 spiffe_id = \"spiffe://example.org/agent/{{ns}}/{{sa}}\"\n",
                file.display()
            ))
            .unwrap(),
        ];
    })
    .await;
    let now = mayfly_testkit::oidc::unix_now();
    let token = k8s.sign(&serde_json::json!({
        "iss": "https://kubernetes.default.svc.cluster.local",
        "aud": [broker.config.issuer()], "sub": "system:serviceaccount:prod:billing",
        "iat": now, "exp": now + 600,
    }));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token");
    std::fs::write(&path, format!("{token}\n")).unwrap();
    let as_pod = |args: &[&str]| {
        let mut all = vec!["--workload-token", path.to_str().unwrap()];
        all.extend_from_slice(args);
        mayfly(&broker, &all)
    };
    let api = "https://api.example.com";
    let task = json(as_pod(&[
        "--json",
        "task",
        "start",
        "--intent",
        "bill",
        "--audience",
        api,
        "--scope",
        "read:x",
    ]));
    assert_eq!(task["agent_id"], "spiffe://example.org/agent/prod/billing");
    let issued = ok(as_pod(&[
        "token",
        "issue",
        "--task",
        task["task_id"].as_str().unwrap(),
        "--audience",
        api,
        "--scope",
        "read:x",
    ]));
    let payload = issued.trim().split('.').nth(1).unwrap();
    let claims: Value = serde_json::from_slice(
        &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, payload)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["sub"], "spiffe://example.org/agent/prod/billing");
    assert!(claims.get("cnf").is_none(), "a bearer token: {claims}");
    // Operator commands need a certificate.
    let refused = as_pod(&["lease", "list"]);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains(
            "authenticated with a workload token; the Admin API needs a client certificate"
        ),
        "{}",
        stderr(&refused)
    );
    // A missing token file is one clear line.
    let missing = mayfly(
        &broker,
        &["--workload-token", "/nonexistent/token", "task", "get", "x"],
    );
    assert!(
        stderr(&missing).contains("cannot read /nonexistent/token"),
        "{}",
        stderr(&missing)
    );
}
