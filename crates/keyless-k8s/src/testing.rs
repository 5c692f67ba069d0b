//! A real Kubernetes control plane (etcd + kube-apiserver) for tests, started with
//! `start-control-plane.sh` from `$KEYLESS_K8S_DIR` (default `<workspace>/../shared/k8s`; the
//! script itself honours `KUBEBUILDER_ASSETS`, `KUBE_APISERVER_BIN`, `ETCD_BIN`). Stopped on drop;
//! `OWNER_PID` stops it if the test process dies first.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The directory holding `start-control-plane.sh`.
pub fn assets_dir() -> PathBuf {
    std::env::var_os("KEYLESS_K8S_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/k8s"))
}

/// Why this machine cannot run a test or bench that needs root (network namespaces,
/// iptables) and `tools` on PATH, if it cannot.
pub fn missing_prerequisite(tools: &[&str]) -> Option<String> {
    let uid = Command::new("id").arg("-u").output().ok();
    if uid.map(|o| String::from_utf8_lossy(&o.stdout).trim() != "0") != Some(false) {
        return Some("not root (network namespaces and iptables need root)".into());
    }
    for tool in tools {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!("`{tool}` is not installed"));
        }
    }
    None
}

/// A running control plane; its `env` file's keys (`KUBECONFIG`, `K8S_API_URL`, `K8S_API_PORT`, …).
pub struct ControlPlane {
    pub dir: PathBuf,
    pub env: HashMap<String, String>,
}

impl ControlPlane {
    /// Start one in `dir` with extra kube-apiserver flags. `None` (with a message on stderr)
    /// when the script or etcd is missing and CI is not set; with `CI` set that is a panic.
    pub fn start(dir: &Path, extra_args: &str) -> Option<ControlPlane> {
        let script = assets_dir().join("start-control-plane.sh");
        let etcd = Command::new("sh")
            .args(["-c", "command -v etcd"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !script.exists() || !etcd {
            let why = format!(
                "no Kubernetes control plane: {} and etcd are needed (set KEYLESS_K8S_DIR)",
                script.display()
            );
            assert!(std::env::var_os("CI").is_none(), "{why}");
            eprintln!("SKIPPED: {why}");
            return None;
        }
        let out = Command::new(&script)
            .arg(dir)
            .env("OWNER_PID", std::process::id().to_string())
            .env("KUBE_APISERVER_EXTRA_ARGS", extra_args)
            .stderr(Stdio::piped())
            .output()
            .expect("run start-control-plane.sh");
        assert!(
            out.status.success(),
            "control plane did not start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let env = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Some(ControlPlane {
            dir: dir.to_path_buf(),
            env,
        })
    }

    pub fn kubeconfig(&self) -> PathBuf {
        PathBuf::from(&self.env["KUBECONFIG"])
    }

    /// A client with the admin kubeconfig.
    pub async fn client(&self) -> kube::Client {
        crate::client(Some(&self.kubeconfig()))
            .await
            .expect("kube client")
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = Command::new(assets_dir().join("start-control-plane.sh"))
            .arg("stop")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
