//! VM extensions the host runs: the server lists them with the host's view (a pool's
//! `virtualMachineConfiguration.extensions`, a scale set's extension profile, a VM's extension
//! resources); the agent starts, restarts (settings changed) and stops them to match. Today
//! that is `KeyVaultForLinux` (publisher `Microsoft.Azure.KeyVault`), run in process by
//! `keyless-kvagent`; other extensions are reported and ignored.

use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;
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
    running: Mutex<HashMap<String, Running>>,
}

/// Whether an extension entry is the Key Vault certificate extension.
pub fn is_key_vault_extension(e: &Value) -> bool {
    let s = |k: &str| e[k].as_str().unwrap_or_default().to_ascii_lowercase();
    s("publisher") == "microsoft.azure.keyvault"
        && (s("type") == "keyvaultforlinux" || s("type") == "keyvaultforwindows")
}

impl ExtensionRunner {
    pub fn new(dir: PathBuf, ca_pem: String, reload_hook: Option<String>) -> Self {
        Self {
            dir,
            ca_pem,
            reload_hook,
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
            let settings = e["settings"].clone();
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
        let r = ExtensionRunner::new(dir.path().to_path_buf(), String::new(), None);
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
}
