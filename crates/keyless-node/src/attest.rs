//! Caller attestation for NMI: a pod is proven by the kernel, not by its source IP.
//!
//! NMI finds a pod by the source address of the connection (after the DNAT, the pod side's
//! address is unchanged). An address is no proof: a process that can add another pod's IP to
//! its interface and win the node's ARP entry for it (CVE-2021-1677: `NET_RAW` is enough to
//! spoof ARP) would be served as that pod. [`Attestor::verify`] asks the kernel instead: the
//! connection comes from pod `P` only if
//!
//! 1. `P`'s cgroup (the kubelet names it after the Pod's `metadata.uid`, see [`pod_dirs`])
//!    holds processes,
//! 2. in the network namespace of one of them a TCP socket is connected with the pod side's
//!    address as its local address and the metadata endpoint (`169.254.169.254:80`, or what
//!    NMI accepted the connection on, [`Attestor::verify_to`]) as its remote address (an
//!    exact `inet_diag` lookup over `NETLINK_SOCK_DIAG` in that namespace; IPv4-mapped IPv6
//!    sockets included), in a state a live descriptor holds (established or half closed), and
//! 3. the socket is the pod's: made in the pod's cgroup (cgroup v2 records the cgroup of a
//!    socket's creator, which `inet_diag` reports: `INET_DIAG_CGROUP_ID`, Linux 5.7+), or held
//!    by a process of the pod (`/proc/<pid>/fd/* -> socket:[inode]`; cgroup v1, or a socket
//!    handed to the pod). A process elsewhere that joined the pod's network namespace
//!    (`setns`, a privileged `hostPID` pod) does not pass.
//!
//! Where the cgroups are: the kubelet's names, both cgroup drivers, all QoS classes
//! ([`pod_dirs`]), under every hierarchy of the cgroup root — on cgroup v2 the root itself, on
//! v1 (or hybrid) each mounted hierarchy below it (`unified`, `systemd`, `pids`, `memory`, …).
//! A pod's directories are cached once found; a cached directory that disappeared is looked
//! for again. A pod not under the usual names is looked for in the subtrees whose names
//! start with `kube` (and their `burstable` / `besteffort`): a kubelet `--cgroup-root` such
//! as kind's `kubelet` / `kubelet.slice`.
//!
//! Cost. The fast path, once a connection of the pod was attested on cgroup v2: a pidfd of one
//! of the pod's processes is kept, and a call enters that process' network namespace
//! (`setns(2)` on the pidfd, for the `socket(2)` call only), makes one or two exact lookups,
//! and compares the socket's cgroup with the pod's: no file is read, ~10 µs whatever the
//! number of the pod's processes. Otherwise (the first connection, a refusal, cgroup v1): the
//! pod's `cgroup.procs` (its directory and every descendant), `/proc/<pid>/ns/net` of its
//! processes until the socket is found, then, unless the socket's cgroup is the pod's, the
//! descriptors of the pod's processes until the holder is found. Blocking system calls only.
//! (`/proc/<pid>/net/tcp` is not read: it walks the machine's whole established table, 3-4 ms
//! per read on a large one.)
//!
//! What the agent needs: root (reading other processes' `/proc/<pid>/fd`, entering their
//! network namespaces: `CAP_SYS_PTRACE`, `CAP_SYS_ADMIN`), the host's PID
//! namespace (`hostPID: true` in a DaemonSet) and the host's cgroup file system at the cgroup
//! root (a hostPath mount of `/sys/fs/cgroup` when the container has its own cgroup
//! namespace). [`Attestor::check`] says what is missing.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

/// The metadata endpoint pods connect to (the DNAT keeps it as the pod socket's remote).
pub const IMDS_ADDR: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)), 80);

/// Pods whose directories are remembered; beyond this the cache starts afresh.
const CACHE_MAX: usize = 8192;
/// How deep below a pod's directory processes are looked for (containers, their children).
const MAX_DEPTH: usize = 6;
/// Directories read per pod and call, at most.
const MAX_DIRS: usize = 512;
/// How deep below a hierarchy's root the fallback search goes.
const SEARCH_DEPTH: usize = 4;
/// Pods with a fast path (each holds a pidfd) at most.
const MAX_PIDFDS: usize = 512;

/// Why a connection was not attested.
#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    #[error("pod {uid} has no cgroup of the kubelet's under the cgroup root")]
    NoCgroup { uid: String },
    #[error("pod {uid}: no process in its cgroup (or none visible in /proc: does the agent run in the host's PID namespace?)")]
    NoProcess { uid: String },
    #[error("no process of pod {uid} has a TCP connection from {peer} to the metadata endpoint in its network namespace")]
    NoSocket { uid: String, peer: SocketAddr },
    #[error("the connection from {peer} is in pod {uid}'s network namespace, but no process of the pod holds it")]
    NotHeld { uid: String, peer: SocketAddr },
    #[error("caller attestation failed: {0}")]
    Io(String),
}

impl AttestError {
    /// The audit reason code of the refusal.
    pub fn reason(&self) -> &'static str {
        match self {
            AttestError::Io(_) => "attestation_failed",
            _ => "caller_not_attested",
        }
    }
}

/// Proves connections to NMI come from the pod their address names. `Send + Sync`; share it
/// in an `Arc`.
pub struct Attestor {
    root: PathBuf,
    /// pod uid → what is known of it
    cache: RwLock<HashMap<String, Arc<PodEntry>>>,
    /// this process' network namespace, where a thread returns after a lookup
    home: Option<std::fs::File>,
    /// pidfds held by fast paths (each [`Fast`] holds one)
    pidfds: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Attestor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attestor")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

/// A pod's cgroup directories (best hierarchy first) and, once a connection of it was attested
/// on cgroup v2, what attests the next one cheaply.
#[derive(Debug)]
struct PodEntry {
    dirs: Arc<[PodDir]>,
    fast: RwLock<Option<Arc<Fast>>>,
}

/// The fast path: a process of the pod (by pidfd: never another process with its number)
/// whose network namespace is the pod's, and the cgroup v2 ids of the pod's cgroups. A socket
/// found in that namespace whose creator's cgroup is one of them is the pod's.
#[derive(Debug)]
struct Fast {
    pidfd: std::os::fd::OwnedFd,
    cgroup_ids: Vec<u64>,
    held: Arc<AtomicUsize>,
}

impl Drop for Fast {
    fn drop(&mut self) {
        self.held.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Attestor {
    /// An attestor reading the cgroup file system at `cgroup_root` (normally `/sys/fs/cgroup`).
    pub fn new(cgroup_root: PathBuf) -> Attestor {
        Attestor {
            root: cgroup_root,
            cache: RwLock::new(HashMap::new()),
            home: std::fs::File::open("/proc/thread-self/ns/net").ok(),
            pidfds: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Whether attestation can work on this node; `Err(why)` names what is missing.
    pub fn check(&self) -> Result<(), String> {
        let h = hierarchies(&self.root);
        if h.is_empty() {
            return Err(format!(
                "no cgroup hierarchy under {} (neither cgroup v2 there nor v1 hierarchies below it); \
                 mount the host's cgroup file system there or pass --cgroup-root",
                self.root.display()
            ));
        }
        if let Err(e) = std::fs::read_link("/proc/self/ns/net") {
            return Err(format!("cannot read /proc/self/ns/net: {e}"));
        }
        match diag::open_in(&diag::Target::Pid(std::process::id()), self.home.as_ref()) {
            Ok(Some(_)) => {}
            Ok(None) => return Err("/proc/self is not this process (is /proc mounted?)".into()),
            Err(e) => {
                return Err(format!(
                    "cannot open a sock_diag socket in a network namespace (setns: {e}): \
                     attestation needs CAP_SYS_ADMIN"
                ))
            }
        }
        if let Err(e) = std::fs::read_dir("/proc/1/fd") {
            return Err(format!(
                "cannot read other processes' descriptors (/proc/1/fd: {e}): attestation needs root \
                 (CAP_SYS_PTRACE) in the host's PID namespace"
            ));
        }
        Ok(())
    }

    /// Prove that the TCP connection accepted from `peer` (the pod side's address) comes from
    /// the pod whose `metadata.uid` is `pod_uid`: a process of the pod's cgroup holds a
    /// connected socket from `peer` to the metadata endpoint [`IMDS_ADDR`] (where the DNAT
    /// sends pods, and where the node's own IMDS listener answers them) in its network
    /// namespace. A connection made straight to NMI's own address needs [`Self::verify_to`].
    /// Blocking (system calls only, no waiting).
    pub fn verify(&self, pod_uid: &str, peer: SocketAddr) -> Result<(), AttestError> {
        self.attest(pod_uid, peer, None)
    }

    /// As [`Self::verify`], the pod's socket connected to [`IMDS_ADDR`] or to `local` (the
    /// address the connection was accepted on: a pod that connects to NMI's address directly).
    pub fn verify_to(
        &self,
        pod_uid: &str,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Result<(), AttestError> {
        self.attest(pod_uid, peer, Some(canonical(local)))
    }

    fn attest(
        &self,
        uid: &str,
        peer: SocketAddr,
        local: Option<SocketAddr>,
    ) -> Result<(), AttestError> {
        let peer = canonical(peer);
        if !valid_uid(uid) {
            return Err(AttestError::NoCgroup {
                uid: uid.to_string(),
            });
        }
        let cached = self
            .cache
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(uid)
            .cloned();
        if let Some(entry) = &cached {
            if self.fast(entry, peer, local) {
                return Ok(());
            }
        }
        self.full(uid, cached, peer, local)
    }

    /// The fast path: one lookup in the anchor's namespace, the socket's cgroup among the
    /// pod's. `false`: not attested this way (the full path decides).
    fn fast(&self, entry: &PodEntry, peer: SocketAddr, local: Option<SocketAddr>) -> bool {
        let fast = entry.fast.read().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(fast) = fast else {
            return false;
        };
        let mut found = vec![];
        let target = diag::Target::Pidfd(&fast.pidfd);
        match sockets_in(&target, self.home.as_ref(), peer, local, &mut found) {
            Ok(()) => found
                .iter()
                .any(|f| f.cgroup.is_some_and(|c| fast.cgroup_ids.contains(&c))),
            Err(_) => false,
        }
    }

    /// Everything read afresh: the pod's processes, their namespaces, the socket, its cgroup
    /// or its holder. Remembers the fast path on success.
    fn full(
        &self,
        uid: &str,
        cached: Option<Arc<PodEntry>>,
        peer: SocketAddr,
        local: Option<SocketAddr>,
    ) -> Result<(), AttestError> {
        let no_cgroup = || AttestError::NoCgroup {
            uid: uid.to_string(),
        };
        let (entry, pod) = match cached {
            Some(e) => match procs_of(&e.dirs)? {
                Some(p) => (e, p),
                None => {
                    // gone since (or emptied): look again
                    self.forget(uid);
                    let e = self.search(uid).ok_or_else(no_cgroup)?;
                    let p = procs_of(&e.dirs)?.unwrap_or_default();
                    (e, p)
                }
            },
            None => {
                let e = self.search(uid).ok_or_else(no_cgroup)?;
                let p = procs_of(&e.dirs)?.unwrap_or_default();
                (e, p)
            }
        };
        // the socket, in the network namespace of a process of the pod (normally the first
        // process' namespace is every process' one: one lookup)
        let mut namespaces: Vec<u64> = Vec::with_capacity(2);
        let mut found: Vec<Found> = Vec::with_capacity(1);
        let mut anchor = None;
        for &pid in &pod.pids {
            let Some(ns) = netns_of(pid) else { continue };
            if namespaces.contains(&ns) {
                continue;
            }
            namespaces.push(ns);
            sockets_in(
                &diag::Target::Pid(pid),
                self.home.as_ref(),
                peer,
                local,
                &mut found,
            )?;
            if !found.is_empty() {
                anchor = Some(pid);
                break;
            }
        }
        if namespaces.is_empty() {
            return Err(AttestError::NoProcess {
                uid: uid.to_string(),
            });
        }
        if found.is_empty() {
            return Err(AttestError::NoSocket {
                uid: uid.to_string(),
                peer,
            });
        }
        // made in the pod's cgroup (cgroup v2: the kernel records the creator's cgroup in the
        // socket), else held by a process of the pod
        let made_here = found
            .iter()
            .any(|f| f.cgroup.is_some_and(|c| pod.cgroup_ids.contains(&c)));
        let links: Vec<String> = found
            .iter()
            .map(|f| format!("socket:[{}]", f.inode))
            .collect();
        if !made_here && !pod.pids.iter().any(|&pid| holds(pid, &links)) {
            return Err(AttestError::NotHeld {
                uid: uid.to_string(),
                peer,
            });
        }
        // the next connection of the pod made by the pod: attested by the fast path
        if let Some(pid) = anchor.filter(|_| made_here) {
            let mut slot = entry.fast.write().unwrap_or_else(|p| p.into_inner());
            let replacing = slot.is_some();
            if replacing || self.pidfds.load(Ordering::Relaxed) < MAX_PIDFDS {
                *slot = anchor_fast(pid, &entry.dirs, pod.cgroup_ids, &self.pidfds).map(Arc::new);
            }
        }
        Ok(())
    }

    fn forget(&self, uid: &str) {
        self.cache
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(uid);
    }

    /// Find (and remember) the pod's cgroup directories.
    fn search(&self, uid: &str) -> Option<Arc<PodEntry>> {
        let dirs: Arc<[PodDir]> = find_pod_dirs(&self.root, uid).into();
        if dirs.is_empty() {
            return None;
        }
        let entry = Arc::new(PodEntry {
            dirs,
            fast: RwLock::new(None),
        });
        let mut c = self.cache.write().unwrap_or_else(|p| p.into_inner());
        // pods gone (their directories removed) are forgotten as new ones are found
        if c.len() >= 64 {
            c.retain(|_, e| e.dirs.first().is_some_and(|d| d.path.exists()));
        }
        if c.len() >= CACHE_MAX {
            c.clear();
        }
        c.insert(uid.to_string(), entry.clone());
        Some(entry)
    }
}

/// The fast path through process `pid` of the pod: a pidfd for it, kept only if the pod's
/// cgroup still lists `pid` once the pidfd is open (so the pidfd is not of a process that
/// took over a recycled number).
fn anchor_fast(
    pid: u32,
    dirs: &[PodDir],
    cgroup_ids: Vec<u64>,
    held: &Arc<AtomicUsize>,
) -> Option<Fast> {
    let pidfd = diag::pidfd_open(pid)?;
    held.fetch_add(1, Ordering::Relaxed);
    let fast = Fast {
        pidfd,
        cgroup_ids,
        held: held.clone(),
    };
    let still = procs_of(dirs).ok()??;
    still.pids.contains(&pid).then_some(fast)
}

/// One cgroup directory of a pod, and whether it is in a cgroup v2 hierarchy (whose cgroup
/// ids sockets carry).
#[derive(Debug, Clone, PartialEq, Eq)]
struct PodDir {
    path: PathBuf,
    v2: bool,
}

/// A pod's processes (its directory and every descendant) and, on cgroup v2, the ids of
/// those cgroups.
#[derive(Debug, Default)]
struct PodProcs {
    pids: Vec<u32>,
    cgroup_ids: Vec<u64>,
}

/// A socket found in a pod's network namespace.
#[derive(Debug, Clone, Copy)]
struct Found {
    inode: u32,
    /// the cgroup v2 id of the cgroup its creator was in
    cgroup: Option<u64>,
}

/// A Kubernetes UID as the kubelet puts it in a cgroup name (hex digits and dashes): nothing
/// else is ever joined to a path.
fn valid_uid(uid: &str) -> bool {
    !uid.is_empty() && uid.len() <= 64 && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

/// IPv4-mapped IPv6 addresses as IPv4.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// The kubelet's cgroup directories of pod `uid`, relative to a hierarchy's root, for both
/// cgroup drivers and every QoS class (`pkg/kubelet/cm`: `pod<uid>` below `kubepods`,
/// `kubepods/burstable` or `kubepods/besteffort`; the systemd driver escapes `-` to `_` and
/// names each level `<parent>-<name>.slice`).
pub fn pod_dirs(uid: &str) -> [String; 6] {
    let s = uid.replace('-', "_");
    [
        format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{s}.slice"),
        format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{s}.slice"),
        format!("kubepods.slice/kubepods-pod{s}.slice"),
        format!("kubepods/besteffort/pod{uid}"),
        format!("kubepods/burstable/pod{uid}"),
        format!("kubepods/pod{uid}"),
    ]
}

/// The hierarchies under `root`, best first: `root` itself when it is cgroup v2, else the
/// v1 (or hybrid) hierarchies below it — the unified one, `systemd`, `pids`, then the rest by
/// name.
fn hierarchies(root: &Path) -> Vec<PathBuf> {
    if root.join("cgroup.controllers").exists() {
        return vec![root.to_path_buf()];
    }
    let Ok(rd) = std::fs::read_dir(root) else {
        return vec![];
    };
    let mut v: Vec<(u8, String, PathBuf)> = rd
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("cgroup.procs").exists())
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let rank = match name.as_str() {
                "unified" => 0,
                "systemd" => 1,
                "pids" => 2,
                _ => 3,
            };
            (rank, name, e.path())
        })
        .collect();
    v.sort();
    v.into_iter().map(|(_, _, p)| p).collect()
}

/// Pod `uid`'s directories in every hierarchy under `root`, best hierarchy first: the
/// kubelet's usual names, else a search of the `kube*` subtrees.
fn find_pod_dirs(root: &Path, uid: &str) -> Vec<PodDir> {
    let hs = hierarchies(root);
    let names = pod_dirs(uid);
    let mut found = vec![];
    let v2 = |h: &Path| h.join("cgroup.controllers").exists();
    for h in &hs {
        for n in &names {
            let p = h.join(n);
            if p.is_dir() {
                found.push(PodDir { path: p, v2: v2(h) });
                break;
            }
        }
    }
    if found.is_empty() {
        let plain = format!("pod{uid}");
        let systemd = format!("-pod{}.slice", uid.replace('-', "_"));
        for h in &hs {
            if let Some(p) = search_kube(h, &plain, &systemd, 0) {
                found.push(PodDir { path: p, v2: v2(h) });
            }
        }
    }
    found
}

fn search_kube(dir: &Path, plain: &str, systemd: &str, depth: usize) -> Option<PathBuf> {
    if depth >= SEARCH_DEPTH {
        return None;
    }
    let mut subtrees = vec![];
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        if !e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            continue;
        }
        let name = e.file_name();
        let name = name.to_string_lossy();
        if depth > 0 && (name == plain || name.ends_with(systemd)) {
            return Some(e.path());
        }
        if name.starts_with("kube") || name == "burstable" || name == "besteffort" {
            subtrees.push(e.path());
        }
    }
    subtrees
        .iter()
        .find_map(|s| search_kube(s, plain, systemd, depth + 1))
}

/// The processes of the first of `dirs` that has any (each with its descendants). `None`
/// when a directory is gone or none has a process (the caller looks for the pod again).
fn procs_of(dirs: &[PodDir]) -> Result<Option<PodProcs>, AttestError> {
    for d in dirs {
        let mut out = PodProcs::default();
        let mut budget = MAX_DIRS;
        let top = if d.v2 {
            match std::fs::metadata(&d.path) {
                Ok(m) => Some(std::os::unix::fs::MetadataExt::ino(&m)),
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(AttestError::Io(format!("{}: {e}", d.path.display()))),
            }
        } else {
            None
        };
        match collect_procs(&d.path, top, 0, &mut budget, &mut out) {
            Ok(()) if !out.pids.is_empty() => return Ok(Some(out)),
            // empty, or gone: the next hierarchy's
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => {
                return Err(AttestError::Io(format!("{}: {e}", d.path.display())));
            }
        }
    }
    Ok(None)
}

/// The processes of cgroup `dir` and its descendants; `ino`: its cgroup id (cgroup v2; the
/// directory's inode number is the cgroup's id).
fn collect_procs(
    dir: &Path,
    ino: Option<u64>,
    depth: usize,
    budget: &mut usize,
    out: &mut PodProcs,
) -> std::io::Result<()> {
    if *budget == 0 {
        return Ok(());
    }
    *budget -= 1;
    let procs = std::fs::read(dir.join("cgroup.procs"))?;
    out.pids.extend(
        procs
            .split(|b| *b == b'\n')
            .filter_map(|l| std::str::from_utf8(l).ok()?.trim().parse::<u32>().ok())
            .filter(|p| *p != 0),
    );
    out.cgroup_ids.extend(ino);
    if depth >= MAX_DEPTH {
        return Ok(());
    }
    for e in std::fs::read_dir(dir)?.flatten() {
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            let ino = ino.map(|_| std::os::unix::fs::DirEntryExt::ino(&e));
            // a child removed meanwhile is no error
            match collect_procs(&e.path(), ino, depth + 1, budget, out) {
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                r => r?,
            }
        }
    }
    Ok(())
}

/// The inode of `pid`'s network namespace (None: the process is gone).
fn netns_of(pid: u32) -> Option<u64> {
    let l = std::fs::read_link(format!("/proc/{pid}/ns/net")).ok()?;
    let l = l.to_str()?;
    l.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

/// The sockets in `target`'s network namespace whose local address is `peer` and whose
/// remote address is the metadata endpoint (or `local`), in a state a descriptor holds
/// ([`keyless_ops::sockdiag::Diag::is_held`]). One exact `inet_diag` lookup per remote
/// candidate (a hash lookup in the kernel; `/proc/<pid>/net/tcp` would walk the whole
/// established table of the machine, milliseconds on a large one), over a
/// `NETLINK_SOCK_DIAG` socket opened in that namespace.
fn sockets_in(
    target: &diag::Target<'_>,
    home: Option<&std::fs::File>,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    out: &mut Vec<Found>,
) -> Result<(), AttestError> {
    let mut nl = match diag::open_in(target, home) {
        Ok(Some(nl)) => nl,
        // the process exited meanwhile
        Ok(None) => return Ok(()),
        Err(e) => {
            return Err(AttestError::Io(format!(
                "sock_diag in a pod's network namespace: {e}"
            )))
        }
    };
    let mut remotes = [Some(IMDS_ADDR), local.filter(|l| *l != IMDS_ADDR)];
    for remote in remotes.iter_mut().filter_map(|r| r.take()) {
        match diag::lookup(&mut nl, peer, remote) {
            Ok(Some(r)) if r.is_held() => out.push(Found {
                inode: r.inode,
                cgroup: r.cgroup_id,
            }),
            Ok(_) => {}
            Err(e) => return Err(AttestError::Io(format!("sock_diag lookup: {e}"))),
        }
    }
    Ok(())
}

/// `NETLINK_SOCK_DIAG` in another process' network namespace (the lookups themselves:
/// [`keyless_ops::sockdiag`]).
mod diag {
    use keyless_ops::sockdiag::{Diag, SockDiag};
    use std::fs::File;
    use std::io::{Error, ErrorKind, Result};
    use std::net::{IpAddr, SocketAddr};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    fn setns(f: &(impl AsRawFd + ?Sized)) -> Result<()> {
        // SAFETY: setns(2) on an open namespace descriptor; it moves only this thread
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(Error::last_os_error());
        }
        Ok(())
    }

    /// Whose network namespace to look in.
    pub(super) enum Target<'a> {
        /// `/proc/<pid>/ns/net`
        Pid(u32),
        /// a pidfd (`setns(2)` takes one since Linux 5.8)
        Pidfd(&'a OwnedFd),
    }

    /// A pidfd for `pid` (None: gone, or a kernel without `pidfd_open`).
    pub(super) fn pidfd_open(pid: u32) -> Option<OwnedFd> {
        // SAFETY: pidfd_open(2) returns a new descriptor or -1
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        // SAFETY: a descriptor just returned, owned by nothing else
        (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    /// A `NETLINK_SOCK_DIAG` socket in `target`'s network namespace (`None`: no such
    /// process): a netlink socket answers for the namespace it was made in. The calling
    /// thread enters the namespace for [`SockDiag::open`] only and returns to `home` (this
    /// thread's own namespace when not given); if it cannot return, the process aborts
    /// rather than run on in a pod's namespace.
    pub(super) fn open_in(target: &Target<'_>, home: Option<&File>) -> Result<Option<SockDiag>> {
        let opened;
        let ns: &dyn AsRawFd = match target {
            Target::Pid(pid) => match File::open(format!("/proc/{pid}/ns/net")) {
                Ok(f) => {
                    opened = f;
                    &opened
                }
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            },
            Target::Pidfd(fd) => *fd,
        };
        let own;
        let home: &File = match home {
            Some(h) => h,
            None => {
                own = File::open("/proc/thread-self/ns/net")?;
                &own
            }
        };
        if let Err(e) = setns(ns) {
            // a pidfd of a process that exited
            return match e.raw_os_error() {
                Some(libc::ESRCH) => Ok(None),
                _ => Err(e),
            };
        }
        let nl = SockDiag::open();
        if let Err(e) = setns(home) {
            eprintln!("caller attestation: cannot return to the agent's network namespace: {e}");
            std::process::abort();
        }
        nl.map(Some)
    }

    /// The TCP socket of `nl`'s namespace whose local end is `src` and remote end `dst`. An
    /// IPv4 pair is looked up as IPv4, then as v4-mapped IPv6 (a dual-stack socket's
    /// connection).
    pub(super) fn lookup(
        nl: &mut SockDiag,
        src: SocketAddr,
        dst: SocketAddr,
    ) -> Result<Option<Diag>> {
        match (src.ip(), dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                if let Some(r) = nl.query(src, dst)? {
                    return Ok(Some(r));
                }
                let m = |ip: std::net::Ipv4Addr, port| {
                    SocketAddr::new(ip.to_ipv6_mapped().into(), port)
                };
                nl.query(m(s, src.port()), m(d, dst.port()))
            }
            // IPv6 as IPv6; mixed families: nothing to ask
            _ => nl.query(src, dst),
        }
    }
}

/// Whether one of `pid`'s descriptors is one of the sockets `links` (`socket:[inode]`).
fn holds(pid: u32, links: &[String]) -> bool {
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    rd.flatten().any(|e| {
        std::fs::read_link(e.path())
            .ok()
            .and_then(|l| l.to_str().map(|l| links.iter().any(|s| s == l)))
            .unwrap_or(false)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::process::{Child, Command, Stdio};
    use std::time::Instant;

    #[test]
    fn v4_mapped_peers_are_ipv4() {
        let v4: SocketAddr = "10.1.2.3:5000".parse().unwrap();
        assert_eq!(canonical("[::ffff:10.1.2.3]:5000".parse().unwrap()), v4);
        assert_eq!(canonical(v4), v4);
        let v6: SocketAddr = "[fd00::1]:80".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }

    #[test]
    fn uids_become_paths_only_when_they_are_uids() {
        assert!(valid_uid("0f5c3a7e-1b2c-4d5e-8f90-123456789abc"));
        for bad in ["", "../x", "a/b", "0f5c 3a7e", "pod1", &"a".repeat(65)] {
            assert!(!valid_uid(bad), "{bad}");
        }
        let a = Attestor::new(PathBuf::from("/nonexistent"));
        let e = a
            .verify("../../etc", "10.0.0.1:1".parse().unwrap())
            .unwrap_err();
        assert!(matches!(e, AttestError::NoCgroup { .. }), "{e}");
        assert_eq!(e.reason(), "caller_not_attested");
        assert!(a.check().unwrap_err().contains("no cgroup hierarchy"));
    }

    /// A fake cgroup tree: `cgroup.procs` files in plain directories.
    fn tree(root: &Path, v2: bool) -> Vec<PathBuf> {
        if v2 {
            std::fs::write(root.join("cgroup.controllers"), "").unwrap();
            std::fs::write(root.join("cgroup.procs"), "").unwrap();
            vec![root.to_path_buf()]
        } else {
            ["cpu", "memory", "pids", "systemd", "unified"]
                .iter()
                .map(|h| {
                    let p = root.join(h);
                    std::fs::create_dir_all(&p).unwrap();
                    std::fs::write(p.join("cgroup.procs"), "").unwrap();
                    if *h == "unified" {
                        std::fs::write(p.join("cgroup.controllers"), "").unwrap();
                    }
                    p
                })
                .collect()
        }
    }

    #[test]
    fn the_kubelets_names_are_found_for_both_drivers_and_cgroup_versions() {
        let uid = "0f5c3a7e-1b2c-4d5e-8f90-123456789abc";
        for v2 in [true, false] {
            for (i, rel) in pod_dirs(uid)
                .iter()
                .map(String::as_str)
                .chain([
                    // kind: kubelet --cgroup-root=/kubelet, both drivers
                    "kubelet/kubepods/burstable/pod0f5c3a7e-1b2c-4d5e-8f90-123456789abc",
                    "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod0f5c3a7e_1b2c_4d5e_8f90_123456789abc.slice",
                ])
                .enumerate()
            {
                let d = tempfile::tempdir().unwrap();
                let hs = tree(d.path(), v2);
                // v1: the tree in two hierarchies (the kubelet makes it in each); the better
                // one first
                let used: Vec<&PathBuf> = if v2 {
                    hs.iter().collect()
                } else {
                    vec![&hs[2], &hs[4]] // pids, unified
                };
                for h in &used {
                    let pod = h.join(rel);
                    std::fs::create_dir_all(pod.join("cri-containerd-abc.scope")).unwrap();
                    std::fs::write(pod.join("cgroup.procs"), "").unwrap();
                    std::fs::write(pod.join("cri-containerd-abc.scope/cgroup.procs"), "7\n9\n")
                        .unwrap();
                }
                let found = find_pod_dirs(d.path(), uid);
                let dir = |h: &PathBuf, v2| PodDir {
                    path: h.join(rel),
                    v2,
                };
                let want = if v2 {
                    vec![dir(&hs[0], true)]
                } else {
                    vec![dir(&hs[4], true), dir(&hs[2], false)]
                };
                assert_eq!(found, want, "layout {i} {rel} v2={v2}");
                let procs = procs_of(&found).unwrap().unwrap();
                assert_eq!(procs.pids, [7, 9], "{rel}");
                assert_eq!(procs.cgroup_ids.len(), 2, "v2: the pod's and the container's ids");
                if !v2 {
                    let procs = procs_of(&found[1..]).unwrap().unwrap();
                    assert_eq!(procs.pids, [7, 9], "{rel}");
                    assert!(procs.cgroup_ids.is_empty(), "v1: no cgroup ids");
                }
                // another pod is not this one
                assert!(find_pod_dirs(d.path(), "0f5c3a7e-1b2c-4d5e-8f90-000000000000").is_empty());
            }
        }
    }

    #[test]
    fn a_removed_pod_directory_is_looked_for_again() {
        let uid = "11111111-2222-3333-4444-555555555555";
        let d = tempfile::tempdir().unwrap();
        tree(d.path(), true);
        let a = Attestor::new(d.path().to_path_buf());
        let peer: SocketAddr = "10.0.0.1:1".parse().unwrap();
        assert!(matches!(
            a.verify(uid, peer),
            Err(AttestError::NoCgroup { .. })
        ));
        let burst = d.path().join(&pod_dirs(uid)[1]);
        std::fs::create_dir_all(&burst).unwrap();
        std::fs::write(burst.join("cgroup.procs"), "").unwrap();
        assert!(matches!(
            a.verify(uid, peer),
            Err(AttestError::NoProcess { .. })
        ));
        // the pod's cgroup moves (a restarted node, another QoS class): found again
        std::fs::remove_dir_all(&burst).unwrap();
        let guaranteed = d.path().join(&pod_dirs(uid)[2]);
        std::fs::create_dir_all(&guaranteed).unwrap();
        // a process that cannot hold the peer's socket (pid 1's namespace has no such row)
        std::fs::write(guaranteed.join("cgroup.procs"), "1\n").unwrap();
        match a.verify(uid, peer) {
            Err(AttestError::NoSocket { uid: u, peer: p }) => {
                assert_eq!((u.as_str(), p), (uid, peer))
            }
            Err(AttestError::NoProcess { .. }) => {} // /proc/1 not visible (not root)
            r => panic!("{r:?}"),
        }
        let cached = a.cache.read().unwrap().get(uid).cloned().unwrap();
        assert_eq!(
            &cached.dirs[..],
            &[PodDir {
                path: guaranteed.clone(),
                v2: true
            }]
        );
    }

    // ---------------------------------------------------------------- real kernel objects

    fn skip(test: &str, why: &str) -> bool {
        if std::env::var_os("CI").is_some() {
            panic!("{test}: {why}");
        }
        eprintln!("skipping {test}: {why}");
        true
    }

    /// A writable hierarchy of this machine: cgroup v2 at /sys/fs/cgroup, else its `unified`
    /// hierarchy, else the v1 `pids` one.
    fn writable_hierarchy() -> Option<PathBuf> {
        let root = Path::new("/sys/fs/cgroup");
        for h in [root.to_path_buf(), root.join("unified"), root.join("pids")] {
            if h.join("cgroup.procs").exists() {
                let probe = h.join(format!("keyless-probe-{}", std::process::id()));
                if std::fs::create_dir(&probe).is_ok() {
                    let _ = std::fs::remove_dir(&probe);
                    return Some(h);
                }
            }
        }
        None
    }

    fn root_and_tools(test: &str) -> Option<PathBuf> {
        // SAFETY: geteuid has no preconditions
        if unsafe { libc::geteuid() } != 0 {
            skip(test, "needs root");
            return None;
        }
        if Command::new("ip").arg("-V").output().is_err() {
            skip(test, "needs `ip`");
            return None;
        }
        match writable_hierarchy() {
            Some(h) => Some(h),
            None => {
                skip(test, "no writable cgroup hierarchy under /sys/fs/cgroup");
                None
            }
        }
    }

    fn uid() -> String {
        uuid::Uuid::new_v4().to_string()
    }

    /// A pod's cgroup as the kubelet (systemd driver, BestEffort) and containerd make it:
    /// the pod's slice and one container scope in it. Killed and removed on drop.
    struct PodCg {
        uid: String,
        pod: PathBuf,
        container: PathBuf,
        procs: Vec<Child>,
    }

    impl PodCg {
        fn new(h: &Path) -> PodCg {
            let uid = uid();
            let pod = h.join(&pod_dirs(&uid)[0]);
            let container = pod.join(format!("cri-containerd-{}.scope", uid.replace('-', "")));
            std::fs::create_dir_all(&container).unwrap();
            PodCg {
                uid,
                pod,
                container,
                procs: vec![],
            }
        }

        /// A process of the pod (`sleep`), in namespace `netns` (None: this process'),
        /// holding `fds` (as its descriptors 3, 4, …).
        fn spawn(&mut self, netns: Option<&str>, fds: &[i32]) -> u32 {
            self.spawn_sh(netns, fds, "exec sleep 600")
        }

        /// A process of the pod that connects to the metadata endpoint itself (bash's
        /// `/dev/tcp`) and keeps the connection open: the connection as `listener` accepts it.
        fn connect(
            &mut self,
            netns: &str,
            listener: &std::net::TcpListener,
        ) -> std::net::TcpStream {
            self.spawn_sh(
                Some(netns),
                &[],
                "exec 3<>/dev/tcp/169.254.169.254/80 && exec sleep 600",
            );
            listener.accept().unwrap().0
        }

        fn spawn_sh(&mut self, netns: Option<&str>, fds: &[i32], then: &str) -> u32 {
            let procs = self.container.join("cgroup.procs");
            let fds = fds.to_vec();
            let netns = netns.map(|n| format!("/run/netns/{n}"));
            let child = std::thread::scope(|s| {
                s.spawn(|| {
                    if let Some(p) = &netns {
                        let f = std::fs::File::open(p).unwrap();
                        // SAFETY: a namespace fd; only this thread moves
                        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
                        assert_eq!(rc, 0, "setns {p}");
                    }
                    let mut cmd = Command::new("bash");
                    cmd.args(["-c", &format!(r#"echo $$ > "$0" && {then}"#)])
                        .arg(&procs)
                        .stdin(Stdio::null())
                        .stdout(Stdio::null());
                    // SAFETY: only dup2 (async-signal-safe) between fork and exec
                    unsafe {
                        use std::os::unix::process::CommandExt;
                        cmd.pre_exec(move || {
                            for (i, fd) in fds.iter().enumerate() {
                                let to = 3 + i as i32;
                                // dup2 onto itself keeps FD_CLOEXEC: clear it then
                                let rc = if *fd == to {
                                    libc::fcntl(to, libc::F_SETFD, 0)
                                } else {
                                    libc::dup2(*fd, to)
                                };
                                if rc < 0 {
                                    return Err(std::io::Error::last_os_error());
                                }
                            }
                            Ok(())
                        });
                    }
                    cmd.spawn().unwrap()
                })
                .join()
                .unwrap()
            });
            let pid = child.id();
            self.procs.push(child);
            // in the cgroup once sh wrote itself there
            let deadline = Instant::now() + std::time::Duration::from_secs(5);
            while !std::fs::read_to_string(&procs)
                .unwrap_or_default()
                .lines()
                .any(|l| l.trim() == pid.to_string())
            {
                assert!(
                    Instant::now() < deadline,
                    "pid {pid} never joined {procs:?}"
                );
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            pid
        }
    }

    impl Drop for PodCg {
        fn drop(&mut self) {
            for c in &mut self.procs {
                let _ = c.kill();
                let _ = c.wait();
            }
            let _ = std::fs::remove_dir(&self.container);
            let _ = std::fs::remove_dir(&self.pod);
        }
    }

    /// A network namespace with the metadata address and `addrs` on its loopback.
    struct Netns(String);

    impl Netns {
        fn new(tag: &str, addrs: &[&str]) -> Netns {
            let name = format!("kla{tag}{:x}", std::process::id() & 0xfffff);
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
            let ok = |args: &[&str]| {
                let o = Command::new("ip").args(args).output().unwrap();
                assert!(
                    o.status.success(),
                    "ip {args:?}: {}",
                    String::from_utf8_lossy(&o.stderr)
                );
            };
            ok(&["netns", "add", &name]);
            let n = Netns(name);
            ok(&["-n", &n.0, "link", "set", "lo", "up"]);
            for a in ["169.254.169.254/32"].iter().chain(addrs) {
                ok(&["-n", &n.0, "addr", "add", a, "dev", "lo"]);
            }
            ok(&[
                "-n",
                &n.0,
                "-6",
                "addr",
                "add",
                "fd00:7a::2/128",
                "dev",
                "lo",
            ]);
            n
        }

        fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
            let p = format!("/run/netns/{}", self.0);
            std::thread::scope(|s| {
                s.spawn(|| {
                    let file = std::fs::File::open(&p).unwrap();
                    // SAFETY: a namespace fd; only this thread moves
                    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(rc, 0, "setns {p}");
                    f()
                })
                .join()
                .unwrap()
            })
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
        }
    }

    fn connect(ns: &Netns, from: &str, to: SocketAddr) -> std::net::TcpStream {
        let from: IpAddr = from.parse().unwrap();
        ns.run(move || {
            let s = match from {
                IpAddr::V4(_) => libc::AF_INET,
                IpAddr::V6(_) => libc::AF_INET6,
            };
            // a std socket bound to `from` first: the pod side's address
            let sock = socket2_like(s);
            bind(sock, SocketAddr::new(from, 0));
            connect_fd(sock, to);
            // SAFETY: `sock` is an open, connected socket owned by nobody else
            unsafe { <std::net::TcpStream as std::os::fd::FromRawFd>::from_raw_fd(sock) }
        })
    }

    fn socket2_like(family: i32) -> i32 {
        // SAFETY: plain socket(2)
        let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        assert!(fd >= 0);
        fd
    }

    fn sockaddr(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
        // SAFETY: zeroed sockaddr_storage is valid; filled below per family
        let mut st: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let len = match a {
            SocketAddr::V4(v4) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as _,
                    sin_port: v4.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(v4.ip().octets()),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_in fits in sockaddr_storage
                unsafe { std::ptr::write((&mut st as *mut libc::sockaddr_storage).cast(), sin) };
                std::mem::size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(v6) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as _,
                    sin6_port: v6.port().to_be(),
                    sin6_flowinfo: 0,
                    sin6_addr: libc::in6_addr {
                        s6_addr: v6.ip().octets(),
                    },
                    sin6_scope_id: 0,
                };
                // SAFETY: sockaddr_in6 fits in sockaddr_storage
                unsafe { std::ptr::write((&mut st as *mut libc::sockaddr_storage).cast(), sin6) };
                std::mem::size_of::<libc::sockaddr_in6>()
            }
        };
        (st, len as libc::socklen_t)
    }

    fn bind(fd: i32, a: SocketAddr) {
        let (st, len) = sockaddr(a);
        // SAFETY: a valid sockaddr of `len` bytes
        let rc = unsafe { libc::bind(fd, (&st as *const libc::sockaddr_storage).cast(), len) };
        assert_eq!(rc, 0, "bind {a}: {}", std::io::Error::last_os_error());
    }

    fn connect_fd(fd: i32, a: SocketAddr) {
        let (st, len) = sockaddr(a);
        // SAFETY: a valid sockaddr of `len` bytes
        let rc = unsafe { libc::connect(fd, (&st as *const libc::sockaddr_storage).cast(), len) };
        assert_eq!(rc, 0, "connect {a}: {}", std::io::Error::last_os_error());
    }

    #[test]
    fn a_connection_is_attested_to_the_pod_whose_process_holds_it() {
        let test = "a_connection_is_attested_to_the_pod_whose_process_holds_it";
        let Some(h) = root_and_tools(test) else {
            return;
        };
        let root = h
            .parent()
            .filter(|_| h.ends_with("unified") || h.ends_with("pids"));
        let root = root.unwrap_or(&h).to_path_buf();
        let a = Attestor::new(root.clone());
        a.check().expect("attestation works here");

        // pod A: its network namespace, the metadata endpoint and NMI's address listening
        // there (as the node's would be, reached through the DNAT)
        let ns_a = Netns::new("a", &["10.77.0.2/32", "10.77.0.5/32"]);
        let ns_b = Netns::new("b", &["10.77.0.2/32"]);
        let imds = ns_a.run(|| std::net::TcpListener::bind(IMDS_ADDR).unwrap());
        let nmi = ns_a.run(|| std::net::TcpListener::bind("10.77.0.5:2579").unwrap());
        let imds6 = ns_a.run(|| std::net::TcpListener::bind("[fd00:7a::2]:80").unwrap());
        let mut pod_a = PodCg::new(&h);
        let mut pod_b = PodCg::new(&h);

        // the pod's request: a socket from its IP to 169.254.169.254:80, held by a process
        // of the pod (sh → sleep, in the pod's container cgroup and network namespace)
        // (bash's /dev/tcp: the socket is made in the pod's cgroup, which the kernel records)
        let own = pod_a.connect(&ns_a.0, &imds);
        let own_peer = own.peer_addr().unwrap();
        a.verify(&pod_a.uid, own_peer)
            .expect("pod A's own connection");
        let entry = a.cache.read().unwrap().get(&pod_a.uid).cloned();
        let entry = entry.expect("its directories are remembered");
        assert!(
            entry.fast.read().unwrap().is_some(),
            "cgroup v2: the next one takes the fast path"
        );
        a.verify(&pod_a.uid, own_peer)
            .expect("again, the fast path");
        // a connection made elsewhere and handed to a process of the pod: its holder is found
        let req = connect(&ns_a, "10.77.0.2", IMDS_ADDR);
        let peer = req.local_addr().unwrap();
        let _accepted = imds.accept().unwrap();
        pod_a.spawn(Some(&ns_a.0), &[req.as_raw_fd()]);
        a.verify(&pod_a.uid, peer)
            .expect("pod A holds the connection");
        a.verify(
            &pod_a.uid,
            SocketAddr::new(
                match peer.ip() {
                    IpAddr::V4(v4) => v4.to_ipv6_mapped().into(),
                    v6 => v6,
                },
                peer.port(),
            ),
        )
        .expect("the peer as a v4-mapped address (a dual-stack listener)");

        // the same address from pod B's namespace (B added A's IP): not A's connection
        let b_imds = ns_b.run(|| std::net::TcpListener::bind(IMDS_ADDR).unwrap());
        let spoof = connect(&ns_b, "10.77.0.2", IMDS_ADDR);
        let _b_acc = b_imds.accept().unwrap();
        pod_b.spawn(Some(&ns_b.0), &[spoof.as_raw_fd()]);
        let spoof_peer = spoof.local_addr().unwrap();
        let e = a.verify(&pod_a.uid, spoof_peer).unwrap_err();
        assert!(matches!(e, AttestError::NoSocket { .. }), "{e}");
        assert_eq!(e.reason(), "caller_not_attested");
        a.verify(&pod_b.uid, spoof_peer)
            .expect("B's own socket is B's");
        let e = a.verify(&pod_b.uid, peer).unwrap_err();
        assert!(
            matches!(e, AttestError::NoSocket { .. }),
            "A's port from B: {e}"
        );

        // a socket in A's namespace made by a process outside A's cgroup (this test: a
        // privileged process that joined the namespace)
        let intruder = connect(&ns_a, "10.77.0.2", IMDS_ADDR);
        let _acc = imds.accept().unwrap();
        let e = a
            .verify(&pod_a.uid, intruder.local_addr().unwrap())
            .unwrap_err();
        assert!(matches!(e, AttestError::NotHeld { .. }), "{e}");

        // a connection of the pod to elsewhere from the same local port does not count: only
        // one to the metadata endpoint (or, with verify_to, to NMI's own address)
        let direct = connect(&ns_a, "10.77.0.2", "10.77.0.5:2579".parse().unwrap());
        let _acc = nmi.accept().unwrap();
        pod_a.spawn(Some(&ns_a.0), &[direct.as_raw_fd()]);
        let dp = direct.local_addr().unwrap();
        let e = a.verify(&pod_a.uid, dp).unwrap_err();
        assert!(matches!(e, AttestError::NoSocket { .. }), "{e}");
        a.verify_to(&pod_a.uid, dp, "10.77.0.5:2579".parse().unwrap())
            .expect("straight to NMI's address, told so");
        let e = a
            .verify_to(&pod_a.uid, dp, "10.77.0.5:9999".parse().unwrap())
            .unwrap_err();
        assert!(matches!(e, AttestError::NoSocket { .. }), "{e}");

        // IPv6, and an IPv4 request from a dual-stack (AF_INET6) socket
        let v6 = connect(&ns_a, "fd00:7a::2", "[fd00:7a::2]:80".parse().unwrap());
        let _acc6 = imds6.accept().unwrap();
        pod_a.spawn(Some(&ns_a.0), &[v6.as_raw_fd()]);
        let v6p = v6.local_addr().unwrap();
        a.verify_to(&pod_a.uid, v6p, "[fd00:7a::2]:80".parse().unwrap())
            .expect("IPv6");
        let dual = connect(
            &ns_a,
            "::ffff:10.77.0.2",
            "[::ffff:169.254.169.254]:80".parse().unwrap(),
        );
        let _acc = imds.accept().unwrap();
        pod_a.spawn(Some(&ns_a.0), &[dual.as_raw_fd()]);
        let dual_peer = canonical(dual.local_addr().unwrap());
        assert!(dual_peer.is_ipv4());
        a.verify(&pod_a.uid, dual_peer)
            .expect("v4 through an AF_INET6 socket");

        // the connection closed by the pod: no longer attested
        let before_close = peer;
        drop(req);
        for c in &mut pod_a.procs[1..2] {
            let _ = c.kill();
            let _ = c.wait();
        }
        let e = a.verify(&pod_a.uid, before_close).unwrap_err();
        assert!(
            matches!(
                e,
                AttestError::NoSocket { .. } | AttestError::NotHeld { .. }
            ),
            "{e}"
        );

        // an unknown pod; a pod with no process
        let e = a.verify(&uid(), peer).unwrap_err();
        assert!(matches!(e, AttestError::NoCgroup { .. }), "{e}");
        let empty = PodCg::new(&h);
        let e = a.verify(&empty.uid, peer).unwrap_err();
        assert!(matches!(e, AttestError::NoProcess { .. }), "{e}");
    }

    /// What one verify() costs with N processes in the pod's cgroup (printed; not asserted).
    #[test]
    fn verify_cost() {
        let test = "verify_cost";
        let Some(h) = root_and_tools(test) else {
            return;
        };
        let root = if h.ends_with("unified") || h.ends_with("pids") {
            h.parent().unwrap().to_path_buf()
        } else {
            h.clone()
        };
        let a = Attestor::new(root);
        let ns = Netns::new("c", &["10.78.0.2/32"]);
        let imds = ns.run(|| std::net::TcpListener::bind(IMDS_ADDR).unwrap());
        for n in [1usize, 10, 50] {
            let mut pod = PodCg::new(&h);
            for _ in 1..n {
                pod.spawn(Some(&ns.0), &[]);
            }
            // the pod's own connection (its creator's cgroup is in the socket)
            let own = pod.connect(&ns.0, &imds);
            let own_peer = own.peer_addr().unwrap();
            // one made by this process and handed to a process of the pod: the holder is
            // looked for among the descriptors (spawned last: every other process' first)
            let req = connect(&ns, "10.78.0.2", IMDS_ADDR);
            let _acc = imds.accept().unwrap();
            pod.spawn(Some(&ns.0), &[req.as_raw_fd()]);
            let held_peer = req.local_addr().unwrap();
            for (what, peer) in [
                ("made by the pod", own_peer),
                ("handed to the pod (descriptors read)", held_peer),
            ] {
                a.verify(&pod.uid, peer).unwrap();
                let rounds = 2000 / n.max(1) + 200;
                let t = Instant::now();
                for _ in 0..rounds {
                    a.verify(&pod.uid, peer).unwrap();
                }
                let per = t.elapsed().as_secs_f64() * 1e6 / rounds as f64;
                println!(
                    "verify(): {per:.1} µs per call, {n} process(es) in the pod's cgroup, connection {what}"
                );
            }
        }
    }
}
