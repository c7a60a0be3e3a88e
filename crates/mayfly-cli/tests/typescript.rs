//! The TypeScript SDK's suite (`sdk/typescript/tests`), run by `cargo
//! test` so the one test command runs it too: the agent side, the
//! Verifier and its middleware, the MCP example with the official MCP
//! TypeScript SDK, and the packed package installed in a fresh project,
//! each against this build's `mayfly` as the broker.
//!
//! It runs in the TypeScript test environment (`tools/npmenv.sh`:
//! `sdk/typescript/node_modules` from the committed lockfile, installed on
//! first use), compiled with the package's own `tsc`, on Node's test
//! runner.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

#[test]
fn the_typescript_sdk_suite_passes() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let env = Command::new("bash")
        .arg(repo.join("tools/npmenv.sh"))
        .output()
        .expect("bash runs");
    assert!(
        env.status.success(),
        "the TypeScript test environment could not be made:\n{}",
        String::from_utf8_lossy(&env.stderr)
    );
    let dir = String::from_utf8(env.stdout).unwrap();
    let out = Command::new("npm")
        .args(["test", "--silent"])
        .current_dir(dir.trim())
        .env("MAYFLY_BIN", env!("CARGO_BIN_EXE_mayfly"))
        .output()
        .expect("npm runs");
    assert!(
        out.status.success(),
        "the TypeScript suite failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
