//! The Python suites, run by `cargo test` so the one test command runs
//! them too: the MCP example's (`examples/mcp-server/tests`), which start
//! this build's `mayfly` as the broker and drive it with stock Python
//! clients (httpx, PyJWT, the official MCP SDK).
//!
//! They need an interpreter with `examples/mcp-server/requirements.txt`
//! installed: `python3`, or the one `MAYFLY_PYTHON` names (CI makes a
//! virtual environment and sets it).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

#[test]
fn the_mcp_example_suite_passes() {
    let python = std::env::var("MAYFLY_PYTHON").unwrap_or_else(|_| "python3".into());
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/mcp-server");
    let probe = Command::new(&python)
        .args(["-c", "import pytest, mcp, jwt, httpx, uvicorn"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    assert!(
        probe.status.success(),
        "the Python suites need their packages: {python} -m pip install -r \
         examples/mcp-server/requirements.txt (or set MAYFLY_PYTHON to an interpreter that has \
         them)\n{}",
        String::from_utf8_lossy(&probe.stderr)
    );
    let out = Command::new(&python)
        .args(["-B", "-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .current_dir(&dir)
        .env("MAYFLY_BIN", env!("CARGO_BIN_EXE_mayfly"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pytest failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
