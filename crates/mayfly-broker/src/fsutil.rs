//! Files that hold secrets: created owner-only (0600, directories 0700).

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Creates `dir` (and parents) owner-only if missing.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Writes a new secret file with mode 0600. Fails if it exists, so two
/// processes racing to create a key cannot both win.
pub fn write_new_private(path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents)?;
    f.sync_all()
}

/// Writes a public file (certificates, configuration), replacing it.
pub fn write_public(path: &Path, contents: &[u8]) -> io::Result<()> {
    fs::write(path, contents)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o644))
}

/// Refuses a secret file that anyone besides its owner and group can use,
/// or that its group can change. Group read is allowed, as for keys owned
/// `root:mayfly 0640` or Kubernetes secrets mounted with an `fsGroup`.
pub fn check_private(path: &Path) -> io::Result<()> {
    let mode = fs::metadata(path)?.permissions().mode();
    if mode & 0o037 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} has mode {:o}; a private key must not be readable by others or writable by its group (chmod 600)",
                path.display(),
                mode & 0o777
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_modes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        write_new_private(&path, b"x").unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(write_new_private(&path, b"y").is_err(), "never overwrites");
        for (mode, ok) in [
            (0o600, true),
            (0o400, true),
            (0o440, true),
            (0o640, true),
            (0o644, false),
            (0o660, false),
            (0o604, false),
        ] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(check_private(&path).is_ok(), ok, "{mode:o}");
        }
    }
}
