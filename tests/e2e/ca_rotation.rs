//! Issuing-CA rotation: a CA scheduled next to the configured one (as
//! `mayfly ca install` writes it) is loaded ahead of its second and signs
//! from it on. Each CA's certificates name their own CRL, which lists only
//! them and is signed by that CA (checked with `openssl verify
//! -crl_check`); anything either CA signed is refused as a caller from the
//! moment the CA is loaded; a half-installed CA is refused with the CAs in
//! use kept.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mayfly_broker::dev::{Credential, DevCa};
use mayfly_broker::issuer::CaFiles;
use mayfly_broker::issuer::IssuingCa;
use mayfly_broker::issuer::ca_scheduled_paths as scheduled_paths;
use mayfly_client::pb;
use mayfly_testkit::{TestBroker, https_get_bytes};

use crate::certs::{openssl, openssl_csr, sign, tempdir, text};
use crate::common::*;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An ordinary-looking agent SVID signed by `ca` (an issuing CA), with its
/// chain: what an attacker holding a task CA's signature would present.
fn svid_signed_by(ca: &Credential) -> Credential {
    let issuing = DevCa::from_pem(&ca.cert_pem, &ca.key_pem).unwrap();
    let id = mayfly_core::SpiffeId::new("spiffe://example.org/agent/demo").unwrap();
    let mut cred = issuing.issue_svid(&id, Duration::from_secs(600)).unwrap();
    cred.cert_pem.push_str(issuing.cert_pem());
    cred
}

/// Every Broker and Admin RPC refuses `cred` as a caller.
async fn refused_as_caller(broker: &TestBroker, cred: &Credential) {
    let client = broker.client_with(cred).await.unwrap();
    crate::auth::assert_rejected(&client, "issued by this broker's task CA").await;
}

/// `/crl/<id>`: its status, and the DER when 200.
async fn crl_of(broker: &TestBroker, id: &str) -> (u16, Vec<u8>) {
    https_get_bytes(
        &format!("{}/crl/{id}", broker.http_url()),
        &broker.bundle_pem(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_issuing_ca_takes_over_with_its_own_crl() {
    let broker =
        TestBroker::start_with(|c| c.tls.reload_interval = Duration::from_millis(100)).await;
    let agent = broker.agent().await;
    let op = broker.operator().await;
    let (_tmp, dir) = tempdir();
    std::fs::copy(broker.path("bundle.pem"), dir.join("bundle.pem")).unwrap();
    let files = CaFiles {
        cert: broker.path("issuing-ca.pem"),
        key: broker.path("issuing-ca.key"),
    };
    let old = IssuingCa::load(&files.cert, &files.key).unwrap();
    let old_cred = Credential {
        cert_pem: std::fs::read_to_string(&files.cert).unwrap(),
        key_pem: std::fs::read_to_string(&files.key).unwrap().into(),
    };
    let task = start(&agent).await;
    let before = sign(&agent, &task.task_id, openssl_csr(&dir, "before", &[]))
        .await
        .unwrap();
    assert_eq!(before.chain_pem, old.chain_pem());

    // The next CA, under the same root, signing a few seconds from now.
    let td = mayfly_core::TrustDomain::new("example.org").unwrap();
    let next = mayfly_broker::dev::issuing_ca(broker.ca(), &td, Duration::from_secs(3600)).unwrap();
    let next_id = IssuingCa::from_pem(&next.cert_pem, &next.key_pem)
        .unwrap()
        .id()
        .to_owned();
    let from = now() + 4;
    let (cert_path, key_path) = scheduled_paths(&files, from);

    // Its certificate without its key: refused whole, the old CA stays.
    std::fs::write(&cert_path, &next.cert_pem).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(crl_of(&broker, &next_id).await.0, 404);
    let cert = sign(&agent, &task.task_id, openssl_csr(&dir, "meanwhile", &[]))
        .await
        .unwrap();
    assert_eq!(cert.chain_pem, old.chain_pem());

    // With its key: loaded ahead of its second, refused as a caller's CA
    // at once, and not signing yet.
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key_path)
            .unwrap();
        f.write_all(next.key_pem.as_bytes()).unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while crl_of(&broker, &next_id).await.0 != 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the next CA never loaded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(now() < from, "the machine is too slow for this schedule");
    refused_as_caller(&broker, &svid_signed_by(&next)).await;
    refused_as_caller(&broker, &svid_signed_by(&old_cred)).await;

    // From its second on, it signs, naming its own CRL.
    while now() < from {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = sign(&agent, &task.task_id, openssl_csr(&dir, "after", &[]))
        .await
        .unwrap();
    assert!(after.chain_pem.starts_with(next.cert_pem.trim_end()));
    std::fs::write(dir.join("after.pem"), &after.certificate_pem).unwrap();
    std::fs::write(dir.join("after-chain.pem"), &after.chain_pem).unwrap();
    std::fs::write(dir.join("before.pem"), &before.certificate_pem).unwrap();
    std::fs::write(dir.join("before-chain.pem"), &before.chain_pem).unwrap();
    let t = text(&openssl(
        &["x509", "-in", "after.pem", "-noout", "-text"],
        &dir,
    ));
    assert!(
        t.contains(&format!("URI:{}/crl/{next_id}\n", broker.config.issuer())),
        "{t}"
    );
    let t = text(&openssl(
        &["x509", "-in", "before.pem", "-noout", "-text"],
        &dir,
    ));
    assert!(
        t.contains(&format!(
            "URI:{}/crl/{}\n",
            broker.config.issuer(),
            old.id()
        )),
        "{t}"
    );
    // Both still refused as callers: the old CA stays in the ring.
    refused_as_caller(&broker, &svid_signed_by(&old_cred)).await;
    refused_as_caller(&broker, &svid_signed_by(&next)).await;

    // Both certificates revoked: each is on its own CA's CRL only, and
    // openssl finds each revoked with that CRL.
    for cert in [&before, &after] {
        op.admin()
            .revoke_lease(pb::RevokeLeaseRequest {
                lease_id: cert.lease_id.clone(),
                note: "rotation test".into(),
            })
            .await
            .unwrap();
    }
    for (name, id, other) in [
        ("before", old.id().to_owned(), "after.pem"),
        ("after", next_id.clone(), "before.pem"),
    ] {
        let (status, der) = crl_of(&broker, &id).await;
        assert_eq!(status, 200);
        std::fs::write(dir.join(format!("{name}-crl.der")), &der).unwrap();
        let out = openssl(
            &[
                "crl",
                "-inform",
                "DER",
                "-in",
                &format!("{name}-crl.der"),
                "-out",
                &format!("{name}-crl.pem"),
            ],
            &dir,
        );
        assert!(out.status.success(), "{}", text(&out));
        let listing = text(&openssl(
            &["crl", "-in", &format!("{name}-crl.pem"), "-noout", "-text"],
            &dir,
        ));
        let serial = |file: &str| {
            let t = text(&openssl(&["x509", "-in", file, "-noout", "-serial"], &dir));
            t.trim().trim_start_matches("serial=").to_owned()
        };
        let (mine, theirs) = (serial(&format!("{name}.pem")), serial(other));
        assert!(
            listing.contains(&format!("Serial Number: {mine}")),
            "{listing}"
        );
        assert!(!listing.contains(&theirs), "{listing}");
        let out = openssl(
            &[
                "verify",
                "-crl_check",
                "-CAfile",
                "bundle.pem",
                "-untrusted",
                &format!("{name}-chain.pem"),
                "-CRLfile",
                &format!("{name}-crl.pem"),
                &format!("{name}.pem"),
            ],
            &dir,
        );
        let t = text(&out);
        assert!(!out.status.success(), "{t}");
        assert!(t.contains("certificate revoked"), "{t}");
    }
    // `/crl` is the CRL of the CA signing now.
    let (_, current) =
        https_get_bytes(&format!("{}/crl", broker.http_url()), &broker.bundle_pem()).await;
    assert_eq!(current, crl_of(&broker, &next_id).await.1);
    assert_eq!(crl_of(&broker, "0000000000000000").await.0, 404);
}
