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
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
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
