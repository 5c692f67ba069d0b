//! Files on disk: the store directory (0700), versioned PEM files (0600, written atomically)
//! and the stable symlinks, re-pointed atomically. A reader following a link sees either the
//! previous complete file or the new complete file, never a partial one; old versions are kept.
//!
//! Write protocol: temp file `<store>/.kvagent-tmp.*` created 0600 → content → ACLs → fsync →
//! rename to `<store>/<VaultName>.<CertName>.<version>` → fsync the directory → for each link a
//! temp symlink (relative target: the file name) renamed over the link → fsync the directory.
//! Temp files left by a crash are removed when the agent starts ([`clean_temp`]).

use crate::settings::{AclEntry, ObservedCertificate, TEMP_PREFIX};
use crate::{Error, Result};
use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Temp paths being written by this process (several agents may share a store in one
/// process, e.g. the host agent running one per extension): [`clean_temp`] leaves them alone.
fn in_flight() -> &'static Mutex<HashSet<PathBuf>> {
    static SET: OnceLock<Mutex<HashSet<PathBuf>>> = OnceLock::new();
    SET.get_or_init(|| Mutex::new(HashSet::new()))
}

/// A temp path in the store, registered as in flight until dropped (then removed if it is
/// still there, i.e. the write failed before its rename).
struct TempPath(PathBuf);

impl TempPath {
    fn new(store: &Path, what: &str) -> TempPath {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let p = store.join(format!(
            "{TEMP_PREFIX}{what}.{}.{}.{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        if let Ok(mut set) = in_flight().lock() {
            set.insert(p.clone());
        }
        TempPath(p)
    }
}

impl std::ops::Deref for TempPath {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempPath {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if fs::symlink_metadata(&self.0).is_ok() {
            let _ = fs::remove_file(&self.0);
        }
        if let Ok(mut set) = in_flight().lock() {
            set.remove(&self.0);
        }
    }
}

/// Create the store directory (0700, parents too). An existing directory loses any access
/// for "other"; its owner and group bits are left as they are (ACL fallback may set 0710).
pub fn ensure_store(dir: &Path) -> Result<()> {
    match fs::metadata(dir) {
        Ok(m) if m.is_dir() => {
            let mode = m.permissions().mode() & 0o7777;
            if mode & 0o007 != 0 {
                fs::set_permissions(dir, fs::Permissions::from_mode(mode & 0o7770))
                    .map_err(io(dir))?;
            }
            Ok(())
        }
        Ok(_) => Err(Error::Io {
            path: dir.display().to_string(),
            source: std::io::Error::other("the certificate store is not a directory"),
        }),
        Err(_) => {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io(dir))?;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io(dir))
        }
    }
}

/// Remove the agent's temp files (from a crash) in `dir`; the number removed.
pub fn clean_temp(dir: &Path) -> Result<usize> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io(dir)(e)),
    };
    let busy = in_flight().lock().map(|s| s.clone()).unwrap_or_default();
    let mut n = 0;
    for entry in entries.flatten() {
        let p = entry.path();
        if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) && !busy.contains(&p) {
            fs::remove_file(&p).map_err(io(&p))?;
            n += 1;
        }
    }
    if n > 0 {
        sync_dir(dir)?;
    }
    Ok(n)
}

fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

/// The version the certificate's links point at, if a link resolves to an existing
/// `<VaultName>.<CertName>.<version>` file in the store.
pub fn installed_version(cert: &ObservedCertificate) -> Option<String> {
    let prefix = format!("{}.", cert.file_prefix());
    cert.links().iter().find_map(|link| {
        let target = fs::read_link(link).ok()?;
        let name = target.file_name()?.to_str()?;
        let version = name.strip_prefix(&prefix)?;
        (!version.is_empty() && cert.version_path(version).is_file()).then(|| version.to_string())
    })
}

/// Point `link` at `file_name` (in the same directory) atomically.
fn switch_link(store: &Path, link: &Path, file_name: &str) -> Result<()> {
    let tmp = TempPath::new(store, "link");
    std::os::unix::fs::symlink(file_name, &tmp).map_err(io(&tmp))?;
    fs::rename(&tmp, link).map_err(io(link))
}

/// Make every link of `cert` point at `version`'s file (which must exist); true when a link
/// changed.
pub fn ensure_links(cert: &ObservedCertificate, version: &str) -> Result<bool> {
    let file_name = format!("{}.{version}", cert.file_prefix());
    let mut changed = false;
    for link in cert.links() {
        let current = fs::read_link(&link).ok();
        if current.as_deref() != Some(Path::new(&file_name)) {
            switch_link(&cert.store, &link, &file_name)?;
            changed = true;
        }
    }
    if changed {
        sync_dir(&cert.store)?;
    }
    Ok(changed)
}

/// What an install did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Installed {
    pub file: PathBuf,
    pub links: Vec<PathBuf>,
    /// ACL entries that could not be applied (reported as a warning).
    pub acl_warnings: Vec<String>,
}

/// Write `pem` as `version`'s file and switch the links to it.
pub fn install(
    cert: &ObservedCertificate,
    version: &str,
    pem: &[u8],
    acls: &[AclEntry],
) -> Result<Installed> {
    ensure_store(&cert.store)?;
    let file = cert.version_path(version);
    let tmp = TempPath::new(&cert.store, "file");
    let acl_warnings = write_file(&tmp, pem, &cert.store, acls)?;
    fs::rename(&tmp, &file).map_err(io(&file))?;
    drop(tmp);
    sync_dir(&cert.store)?;
    ensure_links(cert, version)?;
    Ok(Installed {
        file,
        links: cert.links(),
        acl_warnings,
    })
}

fn write_file(tmp: &Path, pem: &[u8], store: &Path, acls: &[AclEntry]) -> Result<Vec<String>> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(tmp)
        .map_err(io(tmp))?;
    f.set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(io(tmp))?;
    f.write_all(pem).map_err(io(tmp))?;
    let warnings = if acls.is_empty() {
        vec![]
    } else {
        apply_acls(tmp, store, acls)
    };
    f.sync_all().map_err(io(tmp))?;
    Ok(warnings)
}

fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn run_tool(tool: &Path, args: &[&str], target: &Path) -> std::result::Result<(), String> {
    let out = Command::new(tool)
        .args(args)
        .arg(target)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", tool.display()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} {} {}: {}",
            tool.display(),
            args.join(" "),
            target.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Give the ACL entries read access to `file` (and traverse access to `store`):
/// - with `setfacl`: `u:<user>:r` / `g:<group>:r` on the file, `…:x` on the store directory;
/// - without it: the first group entry only, by `chgrp <group>` + mode 0640 on the file and
///   `chgrp <group>` + mode 0710 on the store; user entries and further groups are reported.
///
/// Returns what could not be applied (the certificate is installed regardless, 0600).
pub fn apply_acls(file: &Path, store: &Path, acls: &[AclEntry]) -> Vec<String> {
    let mut warnings = Vec::new();
    if let Some(setfacl) = find_tool("setfacl") {
        let mut file_spec = Vec::new();
        let mut dir_spec = Vec::new();
        for a in acls {
            if let Some(u) = &a.user {
                file_spec.push(format!("u:{u}:r"));
                dir_spec.push(format!("u:{u}:x"));
            }
            if let Some(g) = &a.group {
                file_spec.push(format!("g:{g}:r"));
                dir_spec.push(format!("g:{g}:x"));
            }
        }
        for (spec, target) in [(file_spec, file), (dir_spec, store)] {
            if let Err(e) = run_tool(&setfacl, &["-m", &spec.join(",")], target) {
                warnings.push(format!("ACL not applied: {e}"));
            }
        }
        return warnings;
    }
    let mut group_done = false;
    for a in acls {
        if let Some(u) = &a.user {
            warnings.push(format!(
                "ACL entry for user '{u}' not applied: setfacl is not installed"
            ));
        }
        if let Some(g) = &a.group {
            if group_done {
                warnings.push(format!(
                    "ACL entry for group '{g}' not applied: without setfacl only one group is supported"
                ));
                continue;
            }
            group_done = true;
            let Some(chgrp) = find_tool("chgrp") else {
                warnings.push(format!(
                    "ACL entry for group '{g}' not applied: neither setfacl nor chgrp is installed"
                ));
                continue;
            };
            let applied = run_tool(&chgrp, &[g], file)
                .and_then(|_| {
                    fs::set_permissions(file, fs::Permissions::from_mode(0o640))
                        .map_err(|e| e.to_string())
                })
                .and_then(|_| run_tool(&chgrp, &[g], store))
                .and_then(|_| {
                    fs::set_permissions(store, fs::Permissions::from_mode(0o710))
                        .map_err(|e| e.to_string())
                });
            if let Err(e) = applied {
                warnings.push(format!("ACL entry for group '{g}' not applied: {e}"));
            }
        }
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings;
    use serde_json::json;

    fn cert(store: &Path, extra: serde_json::Value) -> ObservedCertificate {
        let mut o = json!({"url": "https://MyKv.vault.localhost:8443/secrets/web"});
        if let (Some(o), Some(e)) = (o.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        let s = settings::parse(&json!({"secretsManagementSettings": {
            "certificateStoreLocation": store, "observedCertificates": [o]}}))
        .unwrap();
        s.observed_certificates[0].clone()
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn install_switches_the_link_and_keeps_old_versions() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("a/store");
        let c = cert(&store, json!({"customSymbolicLinkName": "app.pem"}));
        assert_eq!(installed_version(&c), None);

        let one = install(&c, "v1", b"first", &[]).unwrap();
        assert_eq!(one.file, store.join("MyKv.web.v1"));
        assert_eq!(mode(&store), 0o700);
        assert_eq!(mode(&one.file), 0o600);
        let link = store.join("MyKv.web");
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(fs::read_link(&link).unwrap(), Path::new("MyKv.web.v1"));
        assert_eq!(fs::read(&link).unwrap(), b"first");
        assert_eq!(fs::read(store.join("app.pem")).unwrap(), b"first");
        assert_eq!(installed_version(&c).as_deref(), Some("v1"));

        let two = install(&c, "v2", b"second", &[]).unwrap();
        assert_eq!(fs::read(&link).unwrap(), b"second");
        assert_eq!(fs::read(store.join("app.pem")).unwrap(), b"second");
        assert_eq!(
            fs::read(&one.file).unwrap(),
            b"first",
            "old versions are kept"
        );
        assert_eq!(mode(&two.file), 0o600);
        assert_eq!(installed_version(&c).as_deref(), Some("v2"));
        assert!(!ensure_links(&c, "v2").unwrap(), "nothing to do");

        let names: Vec<String> = fs::read_dir(&store)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        assert!(
            names.iter().all(|n| !n.starts_with(TEMP_PREFIX)),
            "{names:?}"
        );
        assert_eq!(names.len(), 4, "{names:?}");
    }

    #[test]
    fn crash_leftovers_are_cleaned_and_links_repaired() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let c = cert(&store, json!({}));
        install(&c, "v1", b"first", &[]).unwrap();
        // A crash mid-write leaves a partial temp file and a temp link; the real link still
        // points at the complete previous version.
        fs::write(store.join(format!("{TEMP_PREFIX}file.1.2.3")), b"partial").unwrap();
        std::os::unix::fs::symlink(
            "MyKv.web.v2",
            store.join(format!("{TEMP_PREFIX}link.1.2.3")),
        )
        .unwrap();
        assert_eq!(fs::read(store.join("MyKv.web")).unwrap(), b"first");
        // A temp file another agent of this process is writing right now is left alone.
        let busy = TempPath::new(&store, "file");
        fs::write(&busy, b"being written").unwrap();
        assert_eq!(clean_temp(&store).unwrap(), 2);
        assert!(busy.exists());
        let busy_path = busy.to_path_buf();
        drop(busy);
        assert!(
            !busy_path.exists(),
            "a temp left by a failed write is removed"
        );
        assert_eq!(clean_temp(&store).unwrap(), 0);
        assert_eq!(clean_temp(&dir.path().join("missing")).unwrap(), 0);

        // A link pointing at a missing file is not an installed version.
        fs::remove_file(store.join("MyKv.web")).unwrap();
        std::os::unix::fs::symlink("MyKv.web.gone", store.join("MyKv.web")).unwrap();
        assert_eq!(installed_version(&c), None);
        assert!(ensure_links(&c, "v1").unwrap());
        assert_eq!(installed_version(&c).as_deref(), Some("v1"));
    }

    #[test]
    fn existing_store_loses_access_for_others() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        fs::create_dir(&store).unwrap();
        fs::set_permissions(&store, fs::Permissions::from_mode(0o755)).unwrap();
        ensure_store(&store).unwrap();
        assert_eq!(mode(&store), 0o750);
        let file = dir.path().join("f");
        fs::write(&file, b"x").unwrap();
        assert!(ensure_store(&file).is_err());
    }

    #[test]
    fn acl_fallback_without_setfacl() {
        if find_tool("setfacl").is_some() {
            return; // the setfacl path is taken on this machine
        }
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let c = cert(&store, json!({}));
        // The current primary group always works for chgrp.
        let group = String::from_utf8(Command::new("id").arg("-gn").output().unwrap().stdout)
            .unwrap()
            .trim()
            .to_string();
        let acls = vec![
            AclEntry {
                user: Some("app1".into()),
                group: Some(group.clone()),
            },
            AclEntry {
                user: None,
                group: Some("other".into()),
            },
        ];
        let done = install(&c, "v1", b"pem", &acls).unwrap();
        assert_eq!(mode(&done.file), 0o640);
        assert_eq!(mode(&store), 0o710);
        assert_eq!(done.acl_warnings.len(), 2, "{:?}", done.acl_warnings);
        assert!(done.acl_warnings[0].contains("user 'app1'"));
        assert!(done.acl_warnings[1].contains("group 'other'"));
    }
}
