//! The Python suites, run by `cargo test` so the one test command runs
//! them too. Each starts this build's `mayfly` as the broker:
//! - the MCP example's (`examples/mcp-server/tests`), driving it with stock
//!   Python clients (httpx, PyJWT, the official MCP SDK);
//! - the Python SDK's (`sdk/python/tests`), agent and validator sides, run
//!   on the working tree's `sdk/python/src`.
//!
//! They need an interpreter with `examples/mcp-server/requirements.txt`,
//! `sdk/python/requirements-dev.txt` and the SDK's dependencies installed
//! (`pip install ./sdk/python`): `python3`, or the one `MAYFLY_PYTHON`
//! names (CI makes a virtual environment and sets it).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

/// Runs pytest in `dir` (relative to the repository) after checking that
/// `modules` import; `pythonpath` is put first on the module path.
fn pytest(dir: &str, modules: &str, requirements: &str, pythonpath: Option<&str>) {
    let python = std::env::var("MAYFLY_PYTHON").unwrap_or_else(|_| "python3".into());
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(dir);
    let probe = Command::new(&python)
        .args(["-c", &format!("import {modules}")])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    assert!(
        probe.status.success(),
        "the Python suites need their packages: {python} -m pip install {requirements} (or set \
         MAYFLY_PYTHON to an interpreter that has them)\n{}",
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
        "pytest, mcp, jwt, httpx, uvicorn",
        "-r examples/mcp-server/requirements.txt",
        None,
    );
}

#[test]
fn the_python_sdk_suite_passes() {
    pytest(
        "sdk/python",
        "pytest, grpc, grpc_tools, google.protobuf, jwt, httpx, starlette, cryptography, mcp, uvicorn",
        "./sdk/python -r sdk/python/requirements-dev.txt",
        Some("src"),
    );
}
