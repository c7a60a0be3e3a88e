//! The Python interpreter the docs and Python tests use: the one
//! `MAYFLY_PYTHON` names, else `python3` from the PATH.

use std::path::PathBuf;

/// The interpreter to run Python blocks with.
pub fn python() -> PathBuf {
    std::env::var_os("MAYFLY_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("python3"))
}
