//! The Python suites, run by `cargo test` so the one test command runs
//! them too. Each starts this build's `mayfly` as the broker:
//! - the MCP example's (`examples/mcp-server/tests`): its server checking
//!   tokens by introspection and by following the revocation feed, driven
//!   by stock Python clients (httpx, PyJWT, the official MCP SDK's OAuth
//!   flow) and by the agent opening its own task with the SDK;
//! - the gateway example's (`examples/gateway/tests`): `mayfly gateway`
//!   in front of a billing server on the official MCP SDK and an HTTP API
//!   with a key, driven by the official MCP client, httpx and the CLI;
//! - the Python SDK's (`sdk/python/tests`), agent and validator sides, run
//!   on the working tree's `sdk/python/src`.
//!
//! They run in the Python test environment (`pyenv`): a virtual
//! environment under the target directory, made on first use from the
//! locked requirements, or the interpreter `MAYFLY_PYTHON` names.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod pyenv;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

/// Runs pytest in `dir` (relative to the repository) after checking that
/// `modules` import; `pythonpath` is put first on the module path.
fn pytest(dir: &str, modules: &str, pythonpath: Option<&str>) {
    let python = pyenv::python();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(dir);
    let probe = Command::new(&python)
        .args(["-c", &format!("import {modules}")])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    // The environment has them all; an interpreter from MAYFLY_PYTHON may not.
    assert!(
        probe.status.success(),
        "{} lacks packages the Python suites need: unset MAYFLY_PYTHON to use the test \
         environment, or install sdk/python/requirements-dev.lock and ./sdk/python in it\n{}",
        python.display(),
        String::from_utf8_lossy(&probe.stderr)
    );
    let mut cmd = Command::new(&python);
    cmd.args(["-B", "-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .current_dir(&dir)
        .env("MAYFLY_BIN", env!("CARGO_BIN_EXE_mayfly"))
        .env("PYTHONDONTWRITEBYTECODE", "1");
    if let Some(path) = pythonpath {
        cmd.env("PYTHONPATH", dir.join(path));
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "pytest failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_mcp_example_suite_passes() {
    pytest(
        "examples/mcp-server",
        "pytest, mayfly, mcp, httpx2, jwt, httpx, uvicorn, cryptography",
        None,
    );
}

#[test]
fn the_gateway_example_suite_passes() {
    pytest(
        "examples/gateway",
        "pytest, mcp, httpx2, httpx, uvicorn",
        None,
    );
}

#[test]
fn the_python_sdk_suite_passes() {
    pytest(
        "sdk/python",
        "pytest, grpc, grpc_tools, google.protobuf, jwt, httpx, starlette, cryptography, uvicorn",
        Some("src"),
    );
}

#[test]
fn a_python_without_venv_is_refused_with_the_package_to_install() {
    // Debian's python3 without python3-venv: the venv module is there but
    // its ensurepip is not, played here by a module that fails to import.
    let real = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python3 runs");
    let real = String::from_utf8(real.stdout).unwrap();
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("python-without-venv");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("lib/ensurepip")).unwrap();
    std::fs::write(
        root.join("lib/ensurepip/__init__.py"),
        "raise ImportError(\"No module named 'ensurepip'\")\n",
    )
    .unwrap();
    let wrapper = root.join("bin/python3");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nPYTHONPATH='{}' exec '{}' \"$@\"\n",
            root.join("lib").display(),
            real.trim()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();

    let path = std::env::var("PATH").unwrap_or_default();
    let out = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools/pyenv.sh"))
        .arg(root.join("env"))
        .env("PATH", format!("{}:{path}", root.join("bin").display()))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(out.stdout.is_empty(), "an interpreter was named: {stderr}");
    let minor = Command::new(&wrapper)
        .args(["-c", "import sys; print(sys.version_info[1])"])
        .output()
        .unwrap();
    let package = format!(
        "python3.{}-venv",
        String::from_utf8_lossy(&minor.stdout).trim()
    );
    assert!(
        stderr.contains("cannot make virtual environments")
            && stderr.contains(&format!("apt-get install {package}")),
        "{stderr}"
    );
    // Refused before anything was made.
    assert!(!root.join("env/venv").exists());
}
