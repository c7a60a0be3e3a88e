//! The Python interpreter the tests that run Python use: a virtual
//! environment under the target directory (`target/python/venv`), made on
//! first use by `tools/pyenv.sh` from the locked requirements
//! (`sdk/python/requirements-dev.lock`) with the SDK and its extras, and
//! reused afterwards. That script is the one definition of the
//! environment (`.ci/run` calls it too); it makes the environment anew
//! when the lockfile changes and lets one caller at a time make it, so
//! test binaries and processes running at once share one environment.
//!
//! `MAYFLY_PYTHON` names another interpreter instead, used as it is.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The interpreter of the ready environment (or `MAYFLY_PYTHON`). Panics,
/// saying what to do, when the environment cannot be made.
pub fn python() -> PathBuf {
    if let Some(python) = std::env::var_os("MAYFLY_PYTHON") {
        return python.into();
    }
    // Within one test binary the first caller makes (or checks) the
    // environment and the others wait for its answer; across processes the
    // script's lock does the same.
    static VENV: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match VENV.get_or_init(make) {
        Ok(python) => python.clone(),
        Err(why) => panic!("{why}"),
    }
}

/// Runs `tools/pyenv.sh` on `<target>/python`, whose last line of output
/// is the interpreter.
fn make() -> Result<PathBuf, String> {
    // CARGO_TARGET_TMPDIR is `<target>/tmp`, wherever CARGO_TARGET_DIR puts
    // the target directory.
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .ok_or("CARGO_TARGET_TMPDIR has no parent")?
        .join("python");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools/pyenv.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(&dir)
        .output()
        .map_err(|e| format!("cannot run bash {}: {e}", script.display()))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(format!(
            "the Python test environment could not be made in {} ({}); fix what it says \
             below and run the tests again, or set MAYFLY_PYTHON to an interpreter with \
             sdk/python/requirements-dev.lock and ./sdk/python installed:\n{stderr}",
            dir.display(),
            out.status
        ));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let python = stdout
        .lines()
        .last()
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .ok_or_else(|| format!("tools/pyenv.sh named no interpreter: {stdout}\n{stderr}"))?;
    Ok(python)
}
