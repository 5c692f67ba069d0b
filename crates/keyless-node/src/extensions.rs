//! VM extensions the host runs: the server lists them with the host's view (a pool's
//! `virtualMachineConfiguration.extensions`, a scale set's extension profile, a VM's extension
//! resources); the agent starts, restarts (settings changed) and stops them to match. Today
//! that is `KeyVaultForLinux` (publisher `Microsoft.Azure.KeyVault`), run in process by
//! `keyless-kvagent`; other extensions are reported and ignored.

use serde_json::Value;
use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;
use tokio::sync::oneshot;

/// A running extension.
struct Running {
    /// The settings it was started with (a change restarts it).
    fingerprint: String,
    stop: oneshot::Sender<()>,
}

/// Starts and stops the host's extensions.
pub struct ExtensionRunner {
    /// `<dir>/<extension name>/status/<seq>.status`.
    dir: PathBuf,
    ca_pem: String,
    reload_hook: Option<String>,
    /// Certificate stores must lie under this directory: settings come from the control
    /// plane, and the agent writes there as root.
    store_root: PathBuf,
    running: Mutex<HashMap<String, Running>>,
}

/// The default certificate store of KeyVaultForLinux.
const DEFAULT_STORE: &str = "/var/lib/waagent/Microsoft.Azure.KeyVault.Store";

/// An extension name that is safe as a directory name.
pub fn valid_extension_name(n: &str) -> bool {
    (1..=64).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && n.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
}

/// Every certificate store a KeyVaultForLinux settings object names.
fn store_locations(settings: &Value) -> Vec<String> {
    let sms = &settings["secretsManagementSettings"];
    let global = sms["certificateStoreLocation"]
        .as_str()
        .unwrap_or(DEFAULT_STORE)
        .to_string();
    let mut out = vec![global.clone()];
    for c in sms["observedCertificates"].as_array().into_iter().flatten() {
        if let Some(loc) = c["certificateStoreLocation"].as_str() {
            out.push(loc.to_string());
        }
    }
    out
}

/// Whether the settings' `msiEndpoint` (if any) is the host's own IMDS: settings come from the
/// control plane, and the agent sends requests there.
fn msi_endpoint_local(settings: &Value) -> bool {
    let Some(ep) = settings["authenticationSettings"]["msiEndpoint"].as_str() else {
        return true;
    };
    let rest = ep
        .strip_prefix("http://")
        .or_else(|| ep.strip_prefix("https://"))
        .unwrap_or("");
    let host = rest.split(['/', '?']).next().unwrap_or("");
    let host = match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    matches!(
        host,
        "169.254.169.254" | "127.0.0.1" | "localhost" | "[::1]"
    )
}

/// Whether `path` is an absolute path inside `root` without `..`.
fn confined(path: &str, root: &Path) -> bool {
    let p = Path::new(path);
    p.is_absolute() && !p.components().any(|c| c == Component::ParentDir) && p.starts_with(root)
}

/// Whether an extension entry is the Key Vault certificate extension.
pub fn is_key_vault_extension(e: &Value) -> bool {
    let s = |k: &str| e[k].as_str().unwrap_or_default().to_ascii_lowercase();
    s("publisher") == "microsoft.azure.keyvault"
        && (s("type") == "keyvaultforlinux" || s("type") == "keyvaultforwindows")
}

impl ExtensionRunner {
    pub fn new(
        dir: PathBuf,
        ca_pem: String,
        reload_hook: Option<String>,
        store_root: PathBuf,
    ) -> Self {
        Self {
            dir,
            ca_pem,
            reload_hook,
            store_root,
            running: Mutex::new(HashMap::new()),
        }
    }

    /// Names of the extensions running now.
    pub fn running(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        v.sort();
        v
    }

    /// Make the running set match `wanted` (the host view's `extensions`).
    pub fn reconcile(&self, wanted: &[Value]) {
        let mut want: HashMap<String, (String, Value)> = HashMap::new();
        for e in wanted {
            let name = e["name"].as_str().unwrap_or_default().to_string();
            if name.is_empty() {
                continue;
            }
            if !is_key_vault_extension(e) {
                tracing::debug!(extension = %name, "extension type not run by this agent");
                continue;
            }
            if !valid_extension_name(&name) {
                tracing::warn!(extension = %name, "extension name refused (letters, digits, '.', '_', '-')");
                continue;
            }
            let settings = e["settings"].clone();
            if !msi_endpoint_local(&settings) {
                tracing::warn!(
                    extension = %name,
                    "extension refused: authenticationSettings.msiEndpoint must be this host's IMDS (169.254.169.254 or loopback)"
                );
                continue;
            }
            if let Some(bad) = store_locations(&settings)
                .into_iter()
                .find(|l| !confined(l, &self.store_root))
            {
                tracing::warn!(
                    extension = %name,
                    store = %bad,
                    root = %self.store_root.display(),
                    "extension refused: its certificate store is outside the node's extension store root"
                );
                continue;
            }
            want.insert(name, (settings.to_string(), settings));
        }
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let stale: Vec<String> = running
            .iter()
            .filter(|(n, r)| want.get(*n).is_none_or(|(f, _)| *f != r.fingerprint))
            .map(|(n, _)| n.clone())
            .collect();
        for n in stale {
            if let Some(r) = running.remove(&n) {
                tracing::info!(extension = %n, "stopping extension");
                let _ = r.stop.send(());
            }
        }
        for (name, (fingerprint, settings)) in want {
            if running.contains_key(&name) {
                continue;
            }
            let (tx, rx) = oneshot::channel::<()>();
            let cfg = keyless_kvagent::AgentConfig {
                settings,
                status_dir: Some(self.dir.join(&name).join("status")),
                status_seq: 0,
                reload_hook: self.reload_hook.clone(),
                ca_pem: Some(self.ca_pem.clone()),
                resolve: vec![],
            };
            let n = name.clone();
            tokio::spawn(async move {
                tracing::info!(extension = %n, "starting extension");
                if let Err(e) = keyless_kvagent::run(cfg, async {
                    let _ = rx.await;
                })
                .await
                {
                    tracing::warn!(extension = %n, error = %e, "extension stopped: its settings are unusable");
                }
            });
            running.insert(
                name,
                Running {
                    fingerprint,
                    stop: tx,
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn recognises_the_key_vault_extension() {
        assert!(is_key_vault_extension(
            &json!({"publisher": "Microsoft.Azure.KeyVault", "type": "KeyVaultForLinux"})
        ));
        assert!(is_key_vault_extension(
            &json!({"publisher": "microsoft.azure.keyvault", "type": "keyvaultforlinux"})
        ));
        assert!(!is_key_vault_extension(
            &json!({"publisher": "Microsoft.ManagedIdentity", "type": "ManagedIdentityExtensionForLinux"})
        ));
        assert!(!is_key_vault_extension(
            &json!({"type": "KeyVaultForLinux"})
        ));
    }

    #[tokio::test]
    async fn starts_restarts_and_stops_to_match() {
        let dir = tempfile::tempdir().unwrap();
        let r = ExtensionRunner::new(
            dir.path().to_path_buf(),
            String::new(),
            None,
            PathBuf::from("/var/lib/waagent"),
        );
        let kv = |interval: &str| {
            json!({"name": "kv", "publisher": "Microsoft.Azure.KeyVault", "type": "KeyVaultForLinux",
                   "settings": {"secretsManagementSettings": {"pollingIntervalInS": interval, "observedCertificates": []}}})
        };
        let other = json!({"name": "mi", "publisher": "Microsoft.ManagedIdentity", "type": "ManagedIdentityExtensionForLinux", "settings": {}});
        r.reconcile(&[kv("60"), other.clone()]);
        assert_eq!(r.running(), vec!["kv"]);
        let first = r.running.lock().unwrap()["kv"].fingerprint.clone();
        r.reconcile(&[kv("60")]);
        assert_eq!(
            r.running.lock().unwrap()["kv"].fingerprint,
            first,
            "same settings: left running"
        );
        r.reconcile(&[kv("120")]);
        assert_ne!(
            r.running.lock().unwrap()["kv"].fingerprint,
            first,
            "new settings: restarted"
        );
        r.reconcile(&[other]);
        assert!(r.running().is_empty());
    }

    #[tokio::test]
    async fn refuses_stores_outside_the_root_and_bad_names() {
        let dir = tempfile::tempdir().unwrap();
        let r = ExtensionRunner::new(
            dir.path().to_path_buf(),
            String::new(),
            None,
            PathBuf::from("/var/lib/waagent"),
        );
        let kv = |name: &str, store: Value| {
            json!({"name": name, "publisher": "Microsoft.Azure.KeyVault", "type": "KeyVaultForLinux",
                   "settings": {"secretsManagementSettings": {"certificateStoreLocation": store, "observedCertificates": [
                       {"url": "https://v.vault.localhost/secrets/c", "certificateStoreLocation": "/var/lib/waagent/x"}]}}})
        };
        for bad in [
            kv("a", json!("/etc")),
            kv("b", json!("/var/lib/waagent/../../etc")),
            kv("c", json!("relative/dir")),
            kv("..", json!("/var/lib/waagent/s")),
            kv("/etc", json!("/var/lib/waagent/s")),
        ] {
            r.reconcile(std::slice::from_ref(&bad));
            assert!(r.running().is_empty(), "{bad}");
        }
        r.reconcile(&[kv("ok", json!("/var/lib/waagent/store"))]);
        assert_eq!(r.running(), vec!["ok"]);
        let mut remote = kv("e", json!("/var/lib/waagent/s"));
        remote["settings"]["authenticationSettings"] =
            json!({"msiEndpoint": "http://10.0.0.5/metadata/identity"});
        r.reconcile(&[remote]);
        assert!(r.running().is_empty(), "msiEndpoint elsewhere is refused");
        let mut local = kv("ok", json!("/var/lib/waagent/store"));
        local["settings"]["authenticationSettings"] =
            json!({"msiEndpoint": "http://169.254.169.254/metadata/identity"});
        r.reconcile(&[local]);
        assert_eq!(r.running(), vec!["ok"]);
        let mut per_cert = kv("d", json!("/var/lib/waagent/s"));
        per_cert["settings"]["secretsManagementSettings"]["observedCertificates"][0]
            ["certificateStoreLocation"] = json!("/root");
        r.reconcile(&[per_cert]);
        assert!(r.running().is_empty());
    }
}
