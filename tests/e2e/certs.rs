//! Task-bound X.509 certificates from CSRs, checked with `openssl`: the
//! chain verifies, the leaf is an X.509-SVID bound to the task whatever the
//! CSR asked for, bad CSRs are refused, and revoked certificates are in the
//! CRL that `openssl verify -crl_check` uses.

use std::path::Path;
use std::process::{Command, Output};

use mayfly_client::{Client, pb};
use mayfly_testkit::{TestBroker, https_get_bytes};
use tonic::Code;

use crate::common::*;

pub(crate) fn openssl(args: &[&str], dir: &Path) -> Output {
    Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is installed")
}

pub(crate) fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A fresh P-256 key and CSR made by openssl, with `extra` request options.
pub(crate) fn openssl_csr(dir: &Path, name: &str, extra: &[&str]) -> Vec<u8> {
    let key = format!("{name}.key");
    assert!(
        openssl(
            &[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                &key
            ],
            dir
        )
        .status
        .success()
    );
    let csr = format!("{name}.csr");
    let mut args = vec![
        "req",
        "-new",
        "-key",
        &key,
        "-out",
        &csr,
        "-subj",
        "/CN=agent",
    ];
    args.extend_from_slice(extra);
    let out = openssl(&args, dir);
    assert!(out.status.success(), "{}", text(&out));
    std::fs::read(dir.join(&csr)).unwrap()
}

pub(crate) async fn sign(
    agent: &Client,
    task: &str,
    csr: Vec<u8>,
) -> Result<pb::IssuedCertificate, tonic::Status> {
    agent
        .broker()
        .sign_certificate(pb::SignCertificateRequest {
            task_id: task.into(),
            csr,
            ttl_seconds: 0,
            approval_id: String::new(),
        })
        .await
        .map(|r| r.into_inner())
}

fn save(dir: &Path, name: &str, cert: &pb::IssuedCertificate) {
    std::fs::write(dir.join(format!("{name}.pem")), &cert.certificate_pem).unwrap();
    std::fs::write(dir.join("chain.pem"), &cert.chain_pem).unwrap();
}

#[tokio::test]
async fn issued_certificates_verify_and_are_task_bound_svids() {
    let broker = TestBroker::start().await;
    let agent = broker.agent().await;
    let op = broker.operator().await;
    let (_tmp, dir) = tempdir();
    std::fs::copy(broker.path("bundle.pem"), dir.join("bundle.pem")).unwrap();
    let task = start(&agent).await;

    // The CSR asks for CA:true, other SANs (another agent's SPIFFE ID, a DNS
    // name) and its own subject; none of it may reach the certificate.
    let csr = openssl_csr(
        &dir,
        "greedy",
        &[
            "-subj",
            "/CN=evil/O=Attacker",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "subjectAltName=URI:spiffe://example.org/agent/other,DNS:evil.example.com,URI:spiffe://example.org/operator/admin",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    let cert = sign(&agent, &task.task_id, csr).await.unwrap();
    save(&dir, "leaf", &cert);
    let want_id = format!("spiffe://example.org/agent/demo/task/{}", task.task_id);
    assert_eq!(cert.spiffe_id, want_id);

    let out = openssl(
        &[
            "verify",
            "-CAfile",
            "bundle.pem",
            "-untrusted",
            "chain.pem",
            "leaf.pem",
        ],
        &dir,
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("leaf.pem: OK"));

    let out = openssl(&["x509", "-in", "leaf.pem", "-noout", "-text"], &dir);
    let t = text(&out);
    assert_eq!(t.matches("URI:spiffe://").count(), 1, "{t}");
    assert!(t.contains(&format!("URI:{want_id}")), "{t}");
    // Stock TLS stacks find the CRL from the certificate itself.
    let ca = mayfly_broker::issuer::IssuingCa::load(
        &broker.path("issuing-ca.pem"),
        &broker.path("issuing-ca.key"),
    )
    .unwrap();
    let crl_url = format!("{}/crl/{}", broker.config.issuer(), ca.id());
    assert!(
        t.contains(&format!(
            "X509v3 CRL Distribution Points: \n                Full Name:\n                  URI:{crl_url}\n"
        )),
        "{t}"
    );
    assert!(t.contains("CA:FALSE") && !t.contains("CA:TRUE"), "{t}");
    assert!(
        !t.contains("evil") && !t.contains("DNS:") && !t.contains("Attacker"),
        "{t}"
    );
    assert!(
        t.contains("X509v3 Key Usage: critical\n                Digital Signature\n"),
        "{t}"
    );
    assert!(
        !t.contains("Certificate Sign") && !t.contains("CRL Sign"),
        "{t}"
    );
    assert!(
        t.contains("TLS Web Server Authentication, TLS Web Client Authentication"),
        "{t}"
    );

    // The serial is random, at least 64 bits, and recorded on the lease.
    let out = openssl(
        &["x509", "-in", "leaf.pem", "-noout", "-serial", "-enddate"],
        &dir,
    );
    let t = text(&out);
    let serial = t.lines().find_map(|l| l.strip_prefix("serial=")).unwrap();
    assert_eq!(serial, cert.serial);
    assert!(serial.len() >= 16, "at least 64 bits: {serial}");
    let lease = lease(&op, &cert.lease_id).await;
    assert_eq!(lease.kind, pb::LeaseKind::X509 as i32);
    assert_eq!(lease.serial, cert.serial);
    assert_eq!(lease.task_id, task.task_id);
    assert!(secs(&cert.expires_at) <= secs(&task.expires_at));
    assert_eq!(secs(&lease.expires_at), secs(&cert.expires_at));

    // Another CSR gets another serial.
    let other = sign(&agent, &task.task_id, openssl_csr(&dir, "second", &[]))
        .await
        .unwrap();
    assert_ne!(other.serial, cert.serial);

    // Completing the task revokes the certificates with everything else.
    let done = agent.complete_task(&task.task_id).await.unwrap();
    assert!(
        done.revoked_leases.contains(&cert.lease_id)
            && done.revoked_leases.contains(&other.lease_id)
    );
}

#[tokio::test]
async fn certificate_lifetimes_are_capped() {
    let broker = TestBroker::start().await;
    let agent = broker.agent().await;
    let (_tmp, dir) = tempdir();
    let mut req = start_request("cert ttl", &[API], &["read:files"]);
    req.ttl_seconds = 8 * 3600;
    let long = agent.broker().start_task(req).await.unwrap().into_inner();
    let cert = agent
        .broker()
        .sign_certificate(pb::SignCertificateRequest {
            task_id: long.task_id.clone(),
            csr: openssl_csr(&dir, "a", &[]),
            ttl_seconds: 7200,
            approval_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    save(&dir, "a", &cert);
    let out = openssl(
        &["x509", "-in", "a.pem", "-noout", "-startdate", "-enddate"],
        &dir,
    );
    let t = text(&out);
    let date = |p: &str| {
        t.lines()
            .find_map(|l| l.strip_prefix(p))
            .unwrap()
            .to_owned()
    };
    let parse = |d: String| {
        let o = Command::new("date")
            .args(["-u", "-d", &d, "+%s"])
            .output()
            .unwrap();
        String::from_utf8(o.stdout)
            .unwrap()
            .trim()
            .parse::<i64>()
            .unwrap()
    };
    let (nb, na) = (parse(date("notBefore=")), parse(date("notAfter=")));
    // 1 h maximum from issuance; not-before backdated a minute for skew.
    assert_eq!(na - nb, 3600 + 60, "{t}");

    let mut req = start_request("short", &[API], &["read:files"]);
    req.ttl_seconds = 120;
    let short = agent.broker().start_task(req).await.unwrap().into_inner();
    let cert = sign(&agent, &short.task_id, openssl_csr(&dir, "b", &[]))
        .await
        .unwrap();
    assert_eq!(
        secs(&cert.expires_at),
        secs(&short.expires_at),
        "capped by the task"
    );
}

#[tokio::test]
async fn bad_csrs_are_refused_and_leave_nothing() {
    let broker = TestBroker::start().await;
    let agent = broker.agent().await;
    let (_tmp, dir) = tempdir();
    let task = start(&agent).await;
    let id = task.task_id.as_str();

    assert_status(
        sign(&agent, id, b"not a csr".to_vec()).await,
        Code::InvalidArgument,
        "not a PKCS#10",
    );
    assert_status(
        sign(&agent, id, vec![]).await,
        Code::InvalidArgument,
        "csr is empty",
    );
    assert_status(
        sign(&agent, id, vec![b'A'; 16 * 1024 + 1]).await,
        Code::InvalidArgument,
        "at most 16384",
    );
    let cert_pem = std::fs::read(broker.path("bundle.pem")).unwrap();
    assert_status(
        sign(&agent, id, cert_pem).await,
        Code::InvalidArgument,
        "expected \"CERTIFICATE REQUEST\"",
    );

    // A CSR whose signature does not match its key.
    let good = openssl_csr(&dir, "tamper", &["-outform", "DER"]);
    let mut bad = good.clone();
    let n = bad.len();
    bad[n - 2] ^= 0x40;
    assert_status(
        sign(&agent, id, bad).await,
        Code::InvalidArgument,
        "signature does not verify",
    );

    // RSA below 2048 bits.
    assert!(
        openssl(&["genrsa", "-out", "rsa1024.key", "1024"], &dir)
            .status
            .success()
    );
    assert!(
        openssl(
            &[
                "req",
                "-new",
                "-key",
                "rsa1024.key",
                "-subj",
                "/CN=x",
                "-out",
                "rsa1024.csr"
            ],
            &dir
        )
        .status
        .success()
    );
    let csr = std::fs::read(dir.join("rsa1024.csr")).unwrap();
    assert_status(
        sign(&agent, id, csr).await,
        Code::InvalidArgument,
        "1024-bit RSA key",
    );

    // An unsupported curve.
    assert!(
        openssl(
            &[
                "ecparam",
                "-name",
                "secp256k1",
                "-genkey",
                "-noout",
                "-out",
                "k1.key"
            ],
            &dir
        )
        .status
        .success()
    );
    assert!(
        openssl(
            &[
                "req", "-new", "-key", "k1.key", "-subj", "/CN=x", "-out", "k1.csr"
            ],
            &dir
        )
        .status
        .success()
    );
    let csr = std::fs::read(dir.join("k1.csr")).unwrap();
    assert_status(
        sign(&agent, id, csr).await,
        Code::InvalidArgument,
        "not supported",
    );

    // A weak signature algorithm.
    assert!(
        openssl(&["genrsa", "-out", "rsa2048.key", "2048"], &dir)
            .status
            .success()
    );
    let out = openssl(
        &[
            "req",
            "-new",
            "-sha1",
            "-key",
            "rsa2048.key",
            "-subj",
            "/CN=x",
            "-out",
            "sha1.csr",
        ],
        &dir,
    );
    if out.status.success() {
        let csr = std::fs::read(dir.join("sha1.csr")).unwrap();
        assert_status(
            sign(&agent, id, csr).await,
            Code::InvalidArgument,
            "weak algorithm",
        );
    }
    // RSA 2048 with SHA-256 is fine.
    assert!(
        openssl(
            &[
                "req",
                "-new",
                "-key",
                "rsa2048.key",
                "-subj",
                "/CN=x",
                "-out",
                "rsa.csr"
            ],
            &dir
        )
        .status
        .success()
    );
    let ok = sign(&agent, id, std::fs::read(dir.join("rsa.csr")).unwrap())
        .await
        .unwrap();

    // Someone else's task does not exist for bob.
    let bob = broker.client_as("spiffe://example.org/agent/bob").await;
    assert_status(
        sign(&bob, id, good.clone()).await,
        Code::NotFound,
        "not found",
    );

    let leases = all_leases(
        &broker.operator().await,
        pb::ListLeasesRequest {
            kind: pb::LeaseKind::X509 as i32,
            ..Default::default()
        },
    )
    .await;
    let ids: Vec<_> = leases.into_iter().map(|l| l.lease_id).collect();
    assert_eq!(
        ids,
        vec![ok.lease_id.clone()],
        "refused CSRs left no certificate leases"
    );
    agent.complete_task(id).await.unwrap();
    assert_status(
        sign(&agent, id, good).await,
        Code::FailedPrecondition,
        "is completed",
    );
}

#[tokio::test]
async fn certificates_need_a_rule_and_a_ca() {
    let broker = TestBroker::start_with(|c| {
        let without = mayfly_testkit::dev_policies_without(c, "dev-certificates");
        mayfly_testkit::use_policies(c, &without);
    })
    .await;
    let agent = broker.agent().await;
    let (_tmp, dir) = tempdir();
    let task = start(&agent).await;
    assert_status(
        sign(&agent, &task.task_id, openssl_csr(&dir, "a", &[])).await,
        Code::PermissionDenied,
        "no policy permits spiffe://example.org/agent/demo to sign_certificate task",
    );

    let broker = TestBroker::start_with(|c| c.ca = None).await;
    let agent = broker.agent().await;
    let task = start(&agent).await;
    assert_status(
        sign(&agent, &task.task_id, openssl_csr(&dir, "b", &[])).await,
        Code::FailedPrecondition,
        "no issuing CA",
    );
    let (status, _) =
        mayfly_testkit::https_get(&format!("{}/crl", broker.http_url()), &broker.bundle_pem())
            .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn revoked_certificates_are_in_the_crl() {
    let broker = TestBroker::start().await;
    let agent = broker.agent().await;
    let op = broker.operator().await;
    let (_tmp, dir) = tempdir();
    std::fs::copy(broker.path("bundle.pem"), dir.join("bundle.pem")).unwrap();
    let task = start(&agent).await;
    let revoked = sign(&agent, &task.task_id, openssl_csr(&dir, "r", &[]))
        .await
        .unwrap();
    let kept = sign(&agent, &task.task_id, openssl_csr(&dir, "k", &[]))
        .await
        .unwrap();
    save(&dir, "revoked", &revoked);
    save(&dir, "kept", &kept);

    let fetch_crl = |name: &'static str| {
        let (dir, url, ca) = (
            dir.clone(),
            format!("{}/crl", broker.http_url()),
            broker.bundle_pem(),
        );
        async move {
            let (status, der) = https_get_bytes(&url, &ca).await;
            assert_eq!(status, 200);
            std::fs::write(dir.join(format!("{name}.der")), &der).unwrap();
            let out = openssl(
                &[
                    "crl",
                    "-inform",
                    "DER",
                    "-in",
                    &format!("{name}.der"),
                    "-out",
                    &format!("{name}.pem"),
                ],
                &dir,
            );
            assert!(out.status.success(), "{}", text(&out));
            text(&openssl(
                &["crl", "-in", &format!("{name}.pem"), "-noout", "-text"],
                &dir,
            ))
        }
    };
    let before = fetch_crl("crl0").await;
    assert!(before.contains("No Revoked Certificates"), "{before}");
    assert!(before.contains("Next Update"), "{before}");

    op.admin()
        .revoke_lease(pb::RevokeLeaseRequest {
            lease_id: revoked.lease_id.clone(),
            note: "key lost".into(),
        })
        .await
        .unwrap();
    let after = fetch_crl("crl1").await;
    assert!(
        after.contains(&format!("Serial Number: {}", revoked.serial)),
        "{after}"
    );
    assert!(!after.contains(&kept.serial), "{after}");

    // The CRL's signature checks out against the issuing CA, and openssl
    // refuses the revoked certificate but accepts the other one.
    let out = openssl(
        &["crl", "-in", "crl1.pem", "-noout", "-CAfile", "chain.pem"],
        &dir,
    );
    assert!(text(&out).contains("verify OK"), "{}", text(&out));
    std::fs::write(
        dir.join("trust.pem"),
        [
            std::fs::read(dir.join("bundle.pem")).unwrap(),
            std::fs::read(dir.join("chain.pem")).unwrap(),
        ]
        .concat(),
    )
    .unwrap();
    let out = openssl(
        &[
            "verify",
            "-crl_check",
            "-CAfile",
            "trust.pem",
            "-CRLfile",
            "crl1.pem",
            "revoked.pem",
        ],
        &dir,
    );
    assert!(!out.status.success());
    assert!(text(&out).contains("certificate revoked"), "{}", text(&out));
    let out = openssl(
        &[
            "verify",
            "-crl_check",
            "-CAfile",
            "trust.pem",
            "-CRLfile",
            "crl1.pem",
            "kept.pem",
        ],
        &dir,
    );
    assert!(out.status.success(), "{}", text(&out));

    // Completing the task puts the other certificate there too.
    agent.complete_task(&task.task_id).await.unwrap();
    let last = fetch_crl("crl2").await;
    assert!(
        last.contains(&revoked.serial) && last.contains(&kept.serial),
        "{last}"
    );
    assert!(last.contains("Cessation Of Operation"), "{last}");
}

/// A temporary directory, removed when the returned guard drops.
pub(crate) fn tempdir() -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    (tmp, dir)
}
