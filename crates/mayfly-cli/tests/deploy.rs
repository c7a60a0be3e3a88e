//! The deployment files as shipped: every Kubernetes manifest checked
//! against the Kubernetes API's own schemas by `kubernetes-validate
//! --strict` (offline, from the Python test environment), and the
//! ConfigMap's `mayfly.toml` read by this build's `mayfly config check`,
//! which must find nothing wrong but the files the pod mounts.
//! (The systemd unit is rated in `cli.rs`.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod pyenv;

use std::path::{Path, PathBuf};
use std::process::Command;

fn kubernetes_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/kubernetes")
}

fn manifests() -> Vec<PathBuf> {
    let mut all: Vec<PathBuf> = std::fs::read_dir(kubernetes_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    all.sort();
    all
}

#[test]
fn the_kubernetes_manifests_are_valid_for_the_api() {
    let python = pyenv::python();
    let validate = python.with_file_name("kubernetes-validate");
    let files = manifests();
    let kinds: String = files
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect();
    for kind in [
        "kind: Deployment",
        "kind: PodDisruptionBudget",
        "kind: NetworkPolicy",
        "kind: StatefulSet",
        "kind: ConfigMap",
        "kind: Service",
    ] {
        assert!(kinds.contains(kind), "no {kind} among {files:?}");
    }
    let out = Command::new(&validate)
        .arg("--strict")
        .args(&files)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", validate.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // One verdict per document, each a pass.
    let documents: usize = files
        .iter()
        .map(|f| {
            1 + std::fs::read_to_string(f)
                .unwrap()
                .matches("\n---\n")
                .count()
        })
        .sum();
    let passed = stdout
        .lines()
        .chain(String::from_utf8_lossy(&out.stderr).lines())
        .filter(|l| l.contains(" passed for resource "))
        .count();
    assert_eq!(passed, documents, "{stdout}");

    // The check can fail: a field the API does not have is refused.
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.yaml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(kubernetes_dir().join("service.yaml"))
            .unwrap()
            .replace("  selector:", "  selectr:"),
    )
    .unwrap();
    let out = Command::new(&validate)
        .arg("--strict")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success(), "a misspelt field passed");
}

#[test]
fn the_kubernetes_configuration_is_one_the_broker_reads() {
    let configmap = std::fs::read_to_string(kubernetes_dir().join("configmap.yaml")).unwrap();
    // The block scalar under `mayfly.toml: |`, indented four spaces.
    let (_, body) = configmap.split_once("mayfly.toml: |\n").unwrap();
    let toml: String = body
        .lines()
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .map(|l| format!("{l}\n"))
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("mayfly.toml");
    std::fs::write(&path, toml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mayfly"))
        .args(["config", "check"])
        .arg(&path)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.starts_with("ok    configuration: trust domain prod.example.com"),
        "{report}"
    );
    // Only what the pod mounts is missing here.
    for line in report.lines().filter(|l| l.starts_with("FAIL")) {
        assert!(
            line.contains("/etc/mayfly/") && line.contains("No such file or directory"),
            "{line}\n{report}"
        );
    }
}
