//! Modes of what the processes keep on disk: every file of a data or state directory is 0600
//! and every directory 0700 (the data holds the database, the key-encryption key, host keys and
//! the bootstrap admin secret; the CA certificate too — the directory above it is 0700 anyway,
//! so readers elsewhere get a copy). The processes also run with umask 077 so files created by
//! libraries (SQLite's `-wal` / `-shm`) are private from the start.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Mode of files in a data / state directory.
pub const FILE_MODE: u32 = 0o600;
/// Mode of directories in a data / state directory.
pub const DIR_MODE: u32 = 0o700;

/// Create `dir` (and parents) 0700 if missing; an existing one is set to 0700.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DIR_MODE))
}

/// Create `path` 0600 only if it does not exist (`O_EXCL`), and write `data`.
pub fn create_new_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))?;
    f.write_all(data)?;
    f.sync_all()
}

/// Take group and other access away from everything under `dir` (files 0600, directories
/// 0700), not following symbolic links. Returns how many entries were changed.
pub fn tighten(dir: &Path) -> std::io::Result<usize> {
    let mut changed = 0;
    let meta = std::fs::symlink_metadata(dir)?;
    if meta.is_dir() {
        if meta.permissions().mode() & 0o7777 != DIR_MODE {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DIR_MODE))?;
            changed += 1;
        }
        for e in std::fs::read_dir(dir)? {
            let p = e?.path();
            let m = std::fs::symlink_metadata(&p)?;
            if m.is_dir() {
                changed += tighten(&p)?;
            } else if m.is_file() && m.permissions().mode() & 0o077 != 0 {
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(FILE_MODE))?;
                changed += 1;
            }
        }
    }
    Ok(changed)
}

/// Set the process umask to 077 (before any thread starts: the umask is process-wide).
pub fn private_umask() {
    // SAFETY: umask only sets the process file-mode creation mask; it cannot fail.
    unsafe {
        libc::umask(0o077);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn tighten_fixes_files_and_dirs_but_not_links() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("data");
        std::fs::create_dir_all(d.join("pki")).unwrap();
        std::fs::write(d.join("keyless.db"), b"x").unwrap();
        std::fs::write(d.join("pki/ca.pem"), b"x").unwrap();
        let outside = t.path().join("outside");
        std::fs::write(&outside, b"x").unwrap();
        for p in [&d, &d.join("pki")] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        for p in [&d.join("keyless.db"), &d.join("pki/ca.pem"), &outside] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        std::os::unix::fs::symlink(&outside, d.join("link")).unwrap();
        assert_eq!(tighten(&d).unwrap(), 4);
        assert_eq!(mode(&d), 0o700);
        assert_eq!(mode(&d.join("pki")), 0o700);
        assert_eq!(mode(&d.join("keyless.db")), 0o600);
        assert_eq!(mode(&d.join("pki/ca.pem")), 0o600);
        assert_eq!(mode(&outside), 0o644);
        assert_eq!(tighten(&d).unwrap(), 0);
    }

    #[test]
    fn create_new_private_is_exclusive() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("s");
        create_new_private(&p, b"one").unwrap();
        assert_eq!(mode(&p), 0o600);
        assert!(create_new_private(&p, b"two").is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"one");
    }
}
