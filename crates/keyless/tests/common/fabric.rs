//! What a kubelet and a container runtime add to the network plumbing of the NMI tests: pod
//! cgroups named as the kubelet names them, processes started inside them, and node agents
//! started so they see the cgroup file system (for caller attestation).
//!
//! - [`PodCgroup`] — `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice`
//!   (the systemd driver's name for a BestEffort pod; `-` in the UID becomes `_`) with one
//!   container scope in it, in a writable hierarchy of this machine ([`hierarchy`]): cgroup v2
//!   at `/sys/fs/cgroup`, else the hybrid layout's `/sys/fs/cgroup/unified`, else the v1 `pids`
//!   hierarchy. [`PodCgroup::prefix`] runs a program in the container's cgroup, then in the
//!   pod's network namespace: a shell writes its own PID to `cgroup.procs` and execs
//!   `ip netns exec` (which remounts `/sys`: the write comes first). Dropping it kills what is
//!   left inside (by PID) and removes the pod's directories (the shared parents stay).
//! - [`node_exec`] — the prefix a node agent starts with. `ip netns exec` mounts a fresh `/sys`
//!   for the namespace, hiding `/sys/fs/cgroup`; this enters only the network namespace
//!   (`nsenter --net`) in a private mount namespace where `/etc/netns/<ns>/hosts` is bound over
//!   `/etc/hosts`, as `ip netns exec` does. Every program in the chain execs the next: the
//!   child's PID is the agent's.
//!
//! And the plumbing the NMI tests (`nmi.rs`, `attestation.rs`) share: [`prerequisites_met`],
//! [`sh`] / [`sh_out`], [`Namespaces`] (nodes with their uplink to the root namespace, pods
//! with a veth into their node and their cgroup, all deleted on drop), [`curl`] as a pod or
//! node process, [`NmiAgent`] (the node agent's command line) and [`create`] for Kubernetes
//! objects from JSON.
#![allow(dead_code)]

use serde::de::DeserializeOwned;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The writable cgroup hierarchy pods are made in, if any.
pub fn hierarchy() -> Option<PathBuf> {
    static H: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    H.get_or_init(|| {
        let root = Path::new("/sys/fs/cgroup");
        [root.to_path_buf(), root.join("unified"), root.join("pids")]
            .into_iter()
            .find(|h| {
                if !h.join("cgroup.procs").exists() {
                    return false;
                }
                let probe = h.join(format!("keyless-probe-{}", std::process::id()));
                let ok = std::fs::create_dir(&probe).is_ok();
                let _ = std::fs::remove_dir(&probe);
                ok
            })
    })
    .clone()
}

/// Why this machine cannot make pod cgroups (None: it can).
pub fn missing_cgroups() -> Option<String> {
    match hierarchy() {
        Some(_) => None,
        None => Some(
            "no writable cgroup hierarchy (/sys/fs/cgroup as cgroup v2, its `unified` or `pids` hierarchy)"
                .into(),
        ),
    }
}

/// The command prefix (program first) that starts a node agent in network namespace `ns`
/// with the host's `/sys` (and so `/sys/fs/cgroup`) in view.
pub fn node_exec(ns: &str) -> Vec<String> {
    [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        r#"if [ -e "/etc/netns/$0/hosts" ]; then mount --bind "/etc/netns/$0/hosts" /etc/hosts || exit 1; fi; exec nsenter --net="/run/netns/$0" "$@""#,
        ns,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A pod's cgroup as the kubelet (systemd driver, BestEffort) and containerd make it.
pub struct PodCgroup {
    pub uid: String,
    /// the pod's directory
    pub pod: PathBuf,
    /// its one container's directory, where the pod's processes go
    pub container: PathBuf,
}

impl PodCgroup {
    /// The kubelet's relative path of a BestEffort pod's cgroup (systemd driver).
    pub fn relative(uid: &str) -> String {
        let u = uid.replace('-', "_");
        format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice")
    }

    /// Make the cgroup of the pod whose `metadata.uid` is `uid`.
    pub fn create(uid: &str) -> PodCgroup {
        let h = hierarchy().expect("a writable cgroup hierarchy");
        let pod = h.join(Self::relative(uid));
        let container = pod.join(format!("cri-containerd-{}.scope", uid.replace('-', "")));
        std::fs::create_dir_all(&container)
            .unwrap_or_else(|e| panic!("{}: {e}", container.display()));
        PodCgroup {
            uid: uid.to_string(),
            pod,
            container,
        }
    }

    pub fn procs_file(&self) -> PathBuf {
        self.container.join("cgroup.procs")
    }

    /// The prefix (program first) that runs a program as a process of this pod: in its
    /// container's cgroup, in network namespace `netns`.
    pub fn prefix(&self, netns: &str) -> Vec<String> {
        let mut v = Self::enter(&self.procs_file());
        v.extend(["ip", "netns", "exec", netns].map(String::from));
        v
    }

    /// The prefix that writes the shell's PID to `procs` (a `cgroup.procs` file), then execs
    /// the rest.
    pub fn enter(procs: &Path) -> Vec<String> {
        vec![
            "sh".into(),
            "-c".into(),
            r#"echo $$ > "$0" && exec "$@""#.into(),
            procs.to_string_lossy().into_owned(),
        ]
    }

    /// The PIDs in the pod's cgroup and below.
    pub fn pids(&self) -> Vec<u32> {
        let mut out = vec![];
        for d in [&self.pod, &self.container] {
            if let Ok(s) = std::fs::read_to_string(d.join("cgroup.procs")) {
                out.extend(s.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
            }
        }
        out
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        // what the test started in the pod and left running
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let pids = self.pids();
            if pids.is_empty() || Instant::now() > deadline {
                break;
            }
            for p in pids {
                let _ = Command::new("kill")
                    .arg("-KILL")
                    .arg(p.to_string())
                    .status();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::fs::remove_dir(&self.container);
        let _ = std::fs::remove_dir(&self.pod);
    }
}

// ------------------------------------------------------------------ the NMI tests' plumbing

/// Skip (or, with CI set, fail) when the machine cannot run an NMI test: root, `ip`,
/// `iptables`, `curl`, `nsenter`, `unshare` and a writable cgroup hierarchy.
pub fn prerequisites_met(test: &str) -> bool {
    let missing = keyless_k8s::testing::missing_prerequisite(&[
        "ip", "iptables", "curl", "nsenter", "unshare",
    ])
    .or_else(missing_cgroups);
    match missing {
        None => true,
        Some(why) if std::env::var_os("CI").is_some() => panic!("{test}: {why}"),
        Some(why) => {
            eprintln!("skipping {test}: {why}");
            false
        }
    }
}

/// Run `args` (program first); it must succeed.
pub fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Run `args` (program first): its stdout, whatever its status.
pub fn sh_out(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Network namespaces (and their `/etc/netns/<name>` files) and pod cgroups a test made.
/// On drop the cgroups go first (what runs in them is killed), then the namespaces, the last
/// made first (their veths with them).
#[derive(Default)]
pub struct Namespaces {
    names: Vec<String>,
    /// pod network namespace → the pod's cgroup
    cgroups: Vec<(String, PodCgroup)>,
}

impl Namespaces {
    /// Network namespace `name` (one an earlier run left is deleted first), loopback up.
    pub fn add(&mut self, name: &str) {
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        sh(&["ip", "netns", "add", name]);
        self.names.push(name.to_string());
        sh(&["ip", "-n", name, "link", "set", "lo", "up"]);
    }

    /// A node: a namespace with a /30 veth to the root namespace (`<name>r` there with
    /// `root_ip`, `eth0` here with `node_ip`), its default route there, the node's own IMDS
    /// address 169.254.169.254 on its loopback (as on a VM), and `kubernetes` resolving to
    /// the root side (the API server's certificate names it; [`node_exec`] binds the file).
    pub fn node(&mut self, name: &str, root_ip: &str, node_ip: &str) {
        self.add(name);
        let root_if = format!("{name}r");
        let _ = Command::new("ip")
            .args(["link", "del", &root_if])
            .stderr(Stdio::null())
            .status();
        sh(&[
            "ip", "link", "add", &root_if, "type", "veth", "peer", "name", "eth0", "netns", name,
        ]);
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{root_ip}/30"),
            "dev",
            &root_if,
        ]);
        sh(&["ip", "link", "set", &root_if, "up"]);
        let n = |args: &[&str]| {
            let mut v = vec!["ip", "-n", name];
            v.extend_from_slice(args);
            sh(&v);
        };
        n(&["addr", "add", &format!("{node_ip}/30"), "dev", "eth0"]);
        n(&["link", "set", "eth0", "up"]);
        n(&["route", "add", "default", "via", root_ip]);
        n(&["addr", "add", "169.254.169.254/32", "dev", "lo"]);
        let etc = PathBuf::from("/etc/netns").join(name);
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(
            etc.join("hosts"),
            format!("127.0.0.1 localhost\n{root_ip} kubernetes\n"),
        )
        .unwrap();
    }

    /// A pod of `node`: namespace `name`, a veth whose pod side is its `eth0` and whose node
    /// side (returned: `<name>v`, down) the caller addresses or bridges; with the Pod's `uid`,
    /// its cgroup (where [`Self::prefix`] runs programs).
    pub fn pod(&mut self, node: &str, name: &str, uid: Option<&str>) -> String {
        self.add(name);
        if let Some(uid) = uid {
            self.cgroups
                .push((name.to_string(), PodCgroup::create(uid)));
        }
        let node_if = format!("{name}v");
        sh(&[
            "ip", "-n", node, "link", "add", &node_if, "type", "veth", "peer", "name", "eth0",
            "netns", name,
        ]);
        node_if
    }

    /// The prefix (program first) that runs a program in namespace `ns`: as a process of its
    /// pod (in the pod's cgroup) when it is a pod's with a cgroup.
    pub fn prefix(&self, ns: &str) -> Vec<String> {
        match self.cgroups.iter().find(|(n, _)| n == ns) {
            Some((_, cg)) => cg.prefix(ns),
            None => ["ip", "netns", "exec", ns].map(String::from).to_vec(),
        }
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        self.cgroups.clear();
        for n in self.names.iter().rev() {
            let _ = Command::new("ip")
                .args(["netns", "del", n])
                .stderr(Stdio::null())
                .status();
            let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(n));
        }
    }
}

/// A pod's own side of its veth: `cidr` on `eth0` of namespace `ns`, up, the default route
/// via `gw`.
pub fn pod_address(ns: &str, cidr: &str, gw: &str) {
    sh(&["ip", "-n", ns, "addr", "add", cidr, "dev", "eth0"]);
    sh(&["ip", "-n", ns, "link", "set", "eth0", "up"]);
    sh(&["ip", "-n", ns, "route", "add", "default", "via", gw]);
}

/// `prefix… curl -s … args… url` (no proxy, 15 s at most): (status, body).
pub fn curl(prefix: &[String], args: &[&str], url: &str) -> (u16, String) {
    let mut cmd = Command::new(&prefix[0]);
    cmd.args(&prefix[1..]).args([
        "curl",
        "-s",
        "--noproxy",
        "*",
        "-m",
        "15",
        "-w",
        "\n%{http_code}",
    ]);
    let out = cmd.args(args).arg(url).output().expect("curl");
    let s = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = s.rsplit_once('\n').unwrap_or(("", &s));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// A node agent with NMI as the NMI tests start it: joined to the server, its IMDS on
/// 169.254.169.254:80, watching the API server with `kubeconfig`.
pub struct NmiAgent<'a> {
    pub server_url: &'a str,
    pub ca_file: &'a str,
    pub state_dir: &'a str,
    pub join_token: &'a str,
    pub node_name: &'a str,
    pub kubeconfig: &'a str,
}

impl NmiAgent<'_> {
    /// `node --server …` (the program not included).
    pub fn args(&self) -> Vec<String> {
        [
            "node",
            "--server",
            self.server_url,
            "--ca-file",
            self.ca_file,
            "--state-dir",
            self.state_dir,
            "--join-token",
            self.join_token,
            "--imds-listen",
            "169.254.169.254:80",
            "--nmi",
            "--node-name",
            self.node_name,
            "--kubeconfig",
            self.kubeconfig,
        ]
        .map(String::from)
        .to_vec()
    }

    /// The command (program first) that starts the agent (`bin`, the keyless binary) in node
    /// namespace `ns` ([`node_exec`]), with `extra` arguments.
    pub fn command(&self, ns: &str, bin: &str, extra: &[&str]) -> Vec<String> {
        let mut v = node_exec(ns);
        v.push(bin.to_string());
        v.extend(self.args());
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    }
}

/// Write to `path` the control plane's admin kubeconfig for a node namespace: the API
/// server named `kubernetes` (which [`Namespaces::node`] resolves to the root side, and the
/// server's certificate names) instead of `127.0.0.1`.
pub fn node_kubeconfig(cp: &keyless_k8s::testing::ControlPlane, path: &Path) {
    let port = &cp.env["K8S_API_PORT"];
    std::fs::write(
        path,
        std::fs::read_to_string(cp.kubeconfig()).unwrap().replace(
            &format!("https://127.0.0.1:{port}"),
            &format!("https://kubernetes:{port}"),
        ),
    )
    .unwrap();
}

/// A typed object from JSON.
pub fn obj<T: DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).expect("object")
}

/// Create the object `v` through `api`.
pub async fn create<K>(api: &kube::Api<K>, v: Value) -> K
where
    K: kube::Resource + Clone + DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    api.create(&kube::api::PostParams::default(), &obj::<K>(v))
        .await
        .expect("create")
}
