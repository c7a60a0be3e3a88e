//! `mayfly cert issue`: a task-bound certificate from a CSR, or from a key
//! made here that never leaves this machine.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use mayfly_client::pb;
use serde_json::json;

use crate::conn::{ConnArgs, Role};
use crate::output;

#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Have the broker sign a certificate bound to a task (agent).
    Issue {
        /// Task id.
        #[arg(long)]
        task: String,
        /// A PKCS#10 request (PEM or DER) for your own key.
        #[arg(long, conflicts_with = "new_key", required_unless_present = "new_key")]
        csr: Option<PathBuf>,
        /// Make a new P-256 key here (written to DIR/key.pem, never sent).
        #[arg(long)]
        new_key: bool,
        /// Lifetime, e.g. 10m (default: the broker's).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// Directory for cert.pem, chain.pem (and key.pem).
        #[arg(long)]
        out: PathBuf,
        /// When policy requires approval, wait this long for an operator.
        #[arg(long, value_parser = humantime::parse_duration)]
        wait: Option<Duration>,
        /// Collect a request an operator approved (same CSR and TTL).
        #[arg(long, requires = "csr")]
        approval: Option<String>,
    },
}

fn write(path: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(data)?;
    Ok(())
}

pub async fn run(cmd: CertCommand, conn: &ConnArgs, json: bool) -> anyhow::Result<()> {
    let CertCommand::Issue {
        task,
        csr,
        new_key,
        ttl,
        out,
        wait,
        approval,
    } = cmd;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&out)
        .with_context(|| format!("cannot create {}", out.display()))?;
    let key_path = out.join("key.pem");
    let (csr_bytes, key) = match csr {
        Some(path) => (
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?,
            None,
        ),
        None => {
            anyhow::ensure!(new_key, "give --csr FILE or --new-key");
            anyhow::ensure!(
                !key_path.exists(),
                "{} exists; pick another --out",
                key_path.display()
            );
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            let csr = rcgen::CertificateParams::default().serialize_request(&key)?;
            (csr.der().to_vec(), Some((key, csr.pem()?)))
        }
    };
    let client = conn.connect(Role::Agent).await?;
    if let (Some(id), Some(wait)) = (&approval, wait) {
        crate::approval::await_existing(&client, id, wait).await?;
    }
    let mut req = pb::SignCertificateRequest {
        task_id: task.clone(),
        csr: csr_bytes,
        ttl_seconds: ttl.map_or(0, mayfly_client::ttl_seconds),
        approval_id: approval.unwrap_or_default(),
    };
    let issued = loop {
        let issued = client
            .broker()
            .sign_certificate(req.clone())
            .await?
            .into_inner();
        match &issued.approval {
            Some(pending) => {
                // The approval is for this key: keep it, so the request can
                // be collected later even if no one decides while we wait.
                let kept = match &key {
                    Some((key, csr_pem)) => {
                        write(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
                        write(&out.join("request.csr"), csr_pem.as_bytes(), 0o644)?;
                        true
                    }
                    None => false,
                };
                let waited =
                    crate::approval::await_decision(&client, pending, wait.unwrap_or_default())
                        .await;
                req.approval_id = match waited {
                    Err(e) if kept && e.is::<crate::approval::StillPending>() => {
                        let id = &pending.approval_id;
                        let out = out.display();
                        return Err(crate::approval::StillPending(format!(
                            "approval {id} is still pending; the key and request are in {out}; once approved, run \
                             `mayfly cert issue --task {task} --csr {out}/request.csr --approval {id} --out {out}`"
                        ))
                        .into());
                    }
                    other => other?,
                };
            }
            None => break issued,
        }
    };
    if let Some((key, _)) = key {
        write(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    }
    write(
        &out.join("cert.pem"),
        issued.certificate_pem.as_bytes(),
        0o644,
    )?;
    write(&out.join("chain.pem"), issued.chain_pem.as_bytes(), 0o644)?;
    if json {
        output::print_json(&json!({
            "spiffe_id": issued.spiffe_id,
            "serial": issued.serial,
            "lease_id": issued.lease_id,
            "expires_at": output::time(issued.expires_at.as_ref()),
            "certificate": out.join("cert.pem"),
            "chain": out.join("chain.pem"),
            "key": new_key.then(|| out.join("key.pem")),
        }));
    } else {
        output::fields(&[
            ("spiffe id", issued.spiffe_id),
            ("serial", issued.serial),
            ("lease", issued.lease_id),
            ("expires", output::time(issued.expires_at.as_ref())),
            (
                "wrote",
                format!(
                    "{}/cert.pem, chain.pem{}",
                    out.display(),
                    if new_key { ", key.pem" } else { "" }
                ),
            ),
        ]);
    }
    Ok(())
}
