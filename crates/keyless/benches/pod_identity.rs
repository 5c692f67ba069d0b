//! `cargo bench -p keyless --bench pod_identity` (as root for part 2): pod identity at scale,
//! every figure beside a baseline measured in the same run on the same machine (these machines
//! are noisy, so the ratios are the figures to compare across runs).
//!
//! 1. The agent's decision point at scale: cached IMDS tokens/s from a host agent whose VM holds
//!    1 user-assigned identity, and from one whose VM holds 1,000 (the token asked by client id
//!    is the same identity in both), each beside a bare hyper server answering the same body
//!    (same load generator, same connections; all in this process, on loopback); medians of
//!    interleaved rounds.
//! 2. NMI against a real kube-apiserver (`../shared/k8s`, or `KEYLESS_K8S_DIR`): this bench
//!    plays kubelet and CNI. The node is a network namespace with a veth to the root namespace,
//!    running `keyless node --nmi` (a separate process, caller attestation on: the default)
//!    joined to a scale set that holds the pod identities (managed mode); each pod is a network namespace with
//!    its IP on a veth into the node and a cgroup named after its Pod's UID as the kubelet names
//!    it (`tests/common/fabric.rs`), holding a `sleep` as its sandbox process; the Pod objects
//!    carry `spec.nodeName` and get `status.podIP` through the status subresource. A socket
//!    "from a pod" is made by a process of the pod (a child forked in the pod's namespace that
//!    joins the pod's cgroup, makes the socket and hands it to this process over `SCM_RIGHTS`),
//!    so NMI attests it as it would a pod's own connection (the socket records the cgroup of its
//!    maker); this process then connects it and carries the traffic.
//!    - (a) time from "the status PATCH returned" to "the pod holds a token" (one GET to
//!      `http://169.254.169.254` from a socket created in the pod's namespace, no retries),
//!      p50/p99 over the pods, beside the same GET from the node's namespace to the agent's own
//!      IMDS (the same cached token, without NMI); and a few pods with the real python SDK
//!      (`azure-identity` in `.cache/venv`), beside the same SDK run in the node namespace;
//!    - (b) cached pod tokens/s through NMI (connections opened in pod namespaces, DNAT to NMI)
//!      beside a bare hyper server in the node namespace reached from the same pod namespaces
//!      (same veths, no DNAT), and beside the agent's IMDS loaded from the node namespace;
//!    - (c) API-server requests per pod token request (`apiserver_request_total` from `/metrics`
//!      before and after, less an idle window of the same length);
//!    - (d) the agent's RSS with 1,000 pods on the node and 200 AzureIdentities + bindings, beside
//!      its RSS with no pods and no CRD objects;
//!    - (e) what caller attestation costs: requests/s through NMI with `--caller-attestation`
//!      true vs false (the same agent restarted with the flag, same node, same pods; pairs in
//!      ABBA order, the median on/off ratio reported), over keep-alive connections (attested
//!      once per connection) and with a new connection per request (`Connection: close`, over
//!      sockets the pods made before the clock starts: attested every request); each restart
//!      checks the flag took effect (a socket of the pod's namespace made outside its cgroup
//!      is refused with it on, served with it off);
//!    - (f) standard mode beside (a): the managed node's agent is stopped and its pods deleted,
//!      then a second node joins a second scale set that holds only a kubelet identity (with the
//!      seed's roles), runs `keyless node --nmi --operation-mode standard`, has a Node object
//!      whose `spec.providerID` names its VM, and runs ONE `keyless mic` (it holds the Lease at
//!      once; a second replica would only stand by). Status PATCH → token, measured as in (a)
//!      but the GET is held by NMI until MIC has attached the identity and marked the pod's
//!      AzureAssignedIdentity `Assigned`: pods one after another all bound to one identity not
//!      attached before the first pod; pods one after another each on its own identity (an
//!      attach each); and a burst (all Pod objects at once, then sandboxes and status PATCHes
//!      one after another) on one identity not yet attached. MIC's syncs and scale-set writes
//!      come from its ops listener (`keyless_mic_syncs_total`,
//!      `keyless_mic_target_writes_total`); where the time goes, from this process's own watch
//!      of the AzureAssignedIdentity objects.
//!
//!    Everything it creates (network namespaces, veths, `/etc/netns/<ns>`, pod cgroups,
//!    processes by PID, the control plane) is removed at the end, on panic and on Ctrl-C.
//!    Without root, `ip`, `iptables`, etcd or the control plane script, part 2 is skipped with
//!    a message.
//!
//! Environment: BENCH_SECS (default 5) per throughput run, BENCH_CONNS (16) connections,
//! BENCH_ROUNDS (3) interleaved rounds in parts 1 and 2b, BENCH_IDENTITIES (1000) on the big VM
//! of part 1, BENCH_PODS (200) timed pods, BENCH_SDK_PODS (5) python SDK pods,
//! BENCH_POD_IDENTITIES (200) AzureIdentities + bindings, BENCH_NODE_PODS (1000) pods on the
//! node for the RSS figure, BENCH_TOKEN_REQUESTS (5000) for the API-server count,
//! BENCH_ATTEST_PAIRS (5) on/off pairs and BENCH_CONN_REQUESTS (20000) requests per
//! new-connection round in (e), BENCH_STD_PODS (BENCH_PODS) sequential pods on one identity,
//! BENCH_STD_OWN_PODS (50) sequential pods on their own identities and BENCH_STD_BURST
//! (BENCH_PODS) burst pods in (f); BENCH_ATTEST=0 / BENCH_STANDARD=0 skip (e) / (f),
//! BENCH_K8S=0 runs part 1 only, BENCH_DECISION=0 part 2 only.

mod common;
#[path = "../tests/common/mod.rs"]
mod e2e;
#[path = "../tests/common/fabric.rs"]
mod fabric;

use common::*;
use k8s_openapi::api::core::v1::Pod;
use keyless_core::clock::SystemClock;
use keyless_k8s::crd::{AzureIdentity, AzureIdentityBinding};
use keyless_k8s::testing::ControlPlane;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const RESOURCE: &str = "https://management.azure.com/";
const IMDS: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
const NODE_NAME: &str = "bench-node";

fn main() {
    let secs = env_u64("BENCH_SECS", 5);
    let conns = env_u64("BENCH_CONNS", 16) as usize;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let t0 = Instant::now();
        tokio::select! {
            _ = run(secs, conns) => {}
            _ = tokio::signal::ctrl_c() => eprintln!("interrupted: cleaning up"),
        }
        println!("(whole run: {:.0} s)", t0.elapsed().as_secs_f64());
    });
}

async fn run(secs: u64, conns: usize) {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "pod identity bench ({secs} s per throughput run, {conns} connections, {cores} cores, \
         load average at start {}; load generator in this process)",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    if env_u64("BENCH_DECISION", 1) == 0 {
        println!("part 1 skipped (BENCH_DECISION=0)");
    } else {
        decision_point(secs, conns).await;
    }
    if env_u64("BENCH_K8S", 1) == 0 {
        println!("part 2 skipped (BENCH_K8S=0)");
        return;
    }
    match missing_prerequisite() {
        Some(why) => println!("part 2 (NMI on a real kube-apiserver) SKIPPED: {why}"),
        None => pods(secs, conns).await,
    }
}

// ------------------------------------------------------------------ 1. decision point at scale

async fn decision_point(secs: u64, conns: usize) {
    use keyless_core::resource_id::{ResourceId, UAMI, VM};
    use keyless_server::resources;
    let many = env_u64("BENCH_IDENTITIES", 1000);
    let (dir, srv) = start_server(None).await;
    let s = srv.state.clone();
    let mut tx = s.store.write("bench_setup").await.unwrap();
    resources::put_resource_group(
        &s,
        &mut tx,
        &s.subscription_id,
        "bench",
        Some("local"),
        None,
    )
    .await
    .unwrap();
    let mut ids = vec![];
    for n in 0..many {
        let id = ResourceId::new(&s.subscription_id, "bench", UAMI, &format!("id-{n}"));
        ids.push(
            resources::put_identity(&s, &mut tx, &id, Some("local"), None)
                .await
                .unwrap()
                .0,
        );
    }
    tx.commit().await.unwrap();
    // the identity asked for is the last one assigned, on both VMs
    let target = ids.last().expect("BENCH_IDENTITIES > 0").clone();
    let mut agents = vec![];
    for (name, assigned) in [("vm-one", &ids[ids.len() - 1..]), ("vm-all", &ids[..])] {
        let vm = ResourceId::new(&s.subscription_id, "bench", VM, name);
        let mut tx = s.store.write("bench_setup").await.unwrap();
        // at most 150 identities per request (as Azure): a PUT, then PATCHes that merge
        for (k, chunk) in assigned.chunks(150).enumerate() {
            let user_assigned = chunk
                .iter()
                .map(|r| (r.resource_id.clone(), json!({})))
                .collect();
            resources::write_vm(
                &s,
                &mut tx,
                &vm,
                resources::VmBody {
                    location: Some("local".into()),
                    identity: Some(resources::IdentityBody {
                        kind: Some("UserAssigned".into()),
                        user_assigned: Some(user_assigned),
                    }),
                    ..Default::default()
                },
                k > 0,
                &resources::LinkCheck::Trusted,
            )
            .await
            .unwrap();
        }
        let (join, _) = resources::create_join_token(&s, &mut tx, &vm, 60)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let node = keyless_node::start(
            keyless_node::NodeConfig {
                server_urls: vec![format!("https://localhost:{}", srv.local_addr.port())],
                ca_pem: s.ca.cert_pem(),
                state_dir: dir.path().join(name),
                join_token: Some(join),
                imds_listen: "127.0.0.1:0".parse().unwrap(),
                sync_interval: Duration::from_secs(30),
                private_ip: None,
                extension_reload_hook: None,
                local: Default::default(),
                extension_store_root: PathBuf::from("/var/lib/waagent"),
                nmi: None,
                // the bench hammers IMDS from one caller
                fair_share: keyless_node::FairShareConfig::off(),
                audit: keyless_ops::audit::Audit::disabled(),
            },
            Arc::new(SystemClock::new()),
        )
        .await
        .unwrap();
        assert_eq!(
            node.agent.view().unwrap().identities.user.len(),
            assigned.len()
        );
        agents.push(node);
    }
    let path = format!(
        "/metadata/identity/oauth2/token?api-version=2018-02-01&resource={RESOURCE}&client_id={}",
        target.client_id
    );
    let req =
        |host: SocketAddr| format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nMetadata: true\r\n\r\n");
    // warm-up (fills the cache) and, per agent, a bare server answering that agent's body
    let mut bares = vec![];
    for node in &agents {
        let (head, body) = get_once(node.imds_addr, &req(node.imds_addr)).await;
        assert!(
            head.starts_with("HTTP/1.1 200") && body.contains("access_token"),
            "{head}\n{body}"
        );
        bares.push((bare_server(body.clone(), None).await, body.len()));
    }
    // interleaved rounds (bare, 1 identity, bare, 1,000 identities), medians reported: one
    // burst of noise from elsewhere on the machine then spoils one round, not the figure
    let rounds = env_u64("BENCH_ROUNDS", 3).max(1) as usize;
    let mut runs = vec![[[0f64; 2]; 2]; rounds]; // [round][agent][bare, agent]
    for run in runs.iter_mut() {
        for (k, node) in agents.iter().enumerate() {
            let bare = bares[k].0;
            run[k][0] = load_get(bare, req(bare), conns, secs, None).await;
            run[k][1] = load_get(node.imds_addr, req(node.imds_addr), conns, secs, None).await;
        }
    }
    let median = |f: &dyn Fn(&[[f64; 2]; 2]) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "1. decision point at scale: cached IMDS tokens by client id, agent in process, loopback; \
         median of {rounds} interleaved rounds of {secs} s"
    );
    for (k, n) in [(0, 1), (1, many)] {
        let (bare, rps) = (median(&|r| r[k][0]), median(&|r| r[k][1]));
        println!(
            "  bare hyper server, same {} B body:        {bare:>9.0} req/s",
            bares[k].1
        );
        println!(
            "  agent IMDS, VM with {n:>4} user-assigned:   {rps:>9.0} req/s   ratio to bare {:.2}",
            rps / bare
        );
    }
    let per_round: Vec<String> = runs
        .iter()
        .map(|r| format!("{:.2}", r[1][1] / r[0][1]))
        .collect();
    println!(
        "  {many} identities vs 1: {:.2} raw, {:.2} each against its own bare baseline (raw per round: {})",
        median(&|r| r[1][1] / r[0][1]),
        median(&|r| (r[1][1] / r[1][0]) / (r[0][1] / r[0][0])),
        per_round.join(", ")
    );
}

// ------------------------------------------------------------------ 2. NMI, real API server

/// Why this machine cannot run part 2, if it cannot.
fn missing_prerequisite() -> Option<String> {
    if let Some(why) = keyless_k8s::testing::missing_prerequisite(&[
        "ip", "iptables", "etcd", "nsenter", "unshare",
    ])
    .or_else(fabric::missing_cgroups)
    {
        return Some(why);
    }
    let script = keyless_k8s::testing::assets_dir().join("start-control-plane.sh");
    if !script.exists() {
        return Some(format!(
            "{} is missing (set KEYLESS_K8S_DIR)",
            script.display()
        ));
    }
    None
}

/// `ip -batch -` (in network namespace `ns` when given): every line must succeed.
fn ip_batch(ns: Option<&str>, lines: &[String]) {
    if lines.is_empty() {
        return;
    }
    let mut cmd = Command::new("ip");
    if let Some(ns) = ns {
        cmd.args(["-n", ns]);
    }
    let mut child = cmd
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ip");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(lines.join("\n").as_bytes()).unwrap();
        stdin.write_all(b"\n").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "ip {ns:?} -batch: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Everything part 2 sets up, torn down on drop (also on panic and Ctrl-C): the agents and MIC
/// (SIGTERM, so an agent removes its iptables rules), the server, the network namespaces (their
/// veths go with them), `/etc/netns/<node>`, the control plane.
#[derive(Default)]
struct Fabric {
    netns: Vec<String>,
    /// the pods' sandbox processes (`sleep`, one per pod with a namespace)
    sandboxes: Vec<std::process::Child>,
    cgroups: Vec<fabric::PodCgroup>,
    etc_netns: Vec<PathBuf>,
    root_links: Vec<String>,
    /// the managed-mode node's agent (restarted by part 2e)
    agent: Option<e2e::Proc>,
    /// the standard-mode node's agent and MIC (part 2f)
    procs: Vec<e2e::Proc>,
    server: Option<e2e::ServerProc>,
    cp: Option<ControlPlane>,
}

impl Drop for Fabric {
    fn drop(&mut self) {
        if let Some(mut a) = self.agent.take() {
            a.stop();
        }
        while let Some(mut p) = self.procs.pop() {
            p.stop();
        }
        drop(self.server.take());
        for c in &mut self.sandboxes {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.cgroups.clear();
        POD_CGROUPS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        let del: Vec<String> = self
            .netns
            .iter()
            .rev()
            .map(|n| format!("netns del {n}"))
            .collect();
        let _ = std::panic::catch_unwind(|| ip_batch(None, &del));
        for l in self.root_links.drain(..) {
            // gone with the node namespace already, normally
            let _ = Command::new("ip")
                .args(["link", "del", &l])
                .stderr(Stdio::null())
                .status();
        }
        for d in self.etc_netns.drain(..) {
            let _ = std::fs::remove_dir_all(d);
        }
        drop(self.cp.take());
    }
}

/// Run `f` on a thread that has joined network namespace `ns` (setns(2) changes only the
/// calling thread's namespace; sockets keep the namespace they were created in).
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: a valid namespace fd; only this thread moves
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("network namespace thread")
}

/// Pod network namespace → its container cgroup's `cgroup.procs` ([`socket_in`]).
static POD_CGROUPS: std::sync::Mutex<Vec<(String, PathBuf)>> = std::sync::Mutex::new(Vec::new());

fn pod_procs(ns: &str) -> Option<PathBuf> {
    POD_CGROUPS
        .lock()
        .unwrap()
        .iter()
        .find(|(n, _)| n == ns)
        .map(|(_, p)| p.clone())
}

/// What a kubelet does once the Pod object (`uid`) exists and its sandbox (namespace `ns`) is
/// up: the pod's cgroup, with the sandbox process (`sleep`) in it and in the namespace.
fn pod_started(fab: &mut Fabric, ns: &str, uid: &str) {
    let cg = fabric::PodCgroup::create(uid);
    let procs = std::ffi::CString::new(cg.procs_file().into_os_string().into_vec()).unwrap();
    let sandbox = in_netns(ns, move || {
        let mut cmd = Command::new("sleep");
        cmd.arg("1000000")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        // SAFETY: join_cgroup makes only async-signal-safe calls
        unsafe {
            cmd.pre_exec(move || join_cgroup(&procs));
        }
        cmd.spawn().expect("sandbox process")
    });
    POD_CGROUPS
        .lock()
        .unwrap()
        .push((ns.to_string(), cg.procs_file()));
    fab.sandboxes.push(sandbox);
    fab.cgroups.push(cg);
}

/// In a child between fork and exec: write its PID to `procs` (a `cgroup.procs` file). Only
/// async-signal-safe calls, no allocation.
fn join_cgroup(procs: &std::ffi::CStr) -> std::io::Result<()> {
    let err = std::io::Error::last_os_error;
    // SAFETY: getpid/open/write/close on a NUL-terminated path and a stack buffer
    unsafe {
        let mut pid = libc::getpid() as u32;
        let mut buf = [0u8; 12];
        let mut i = buf.len();
        loop {
            i -= 1;
            buf[i] = b'0' + (pid % 10) as u8;
            pid /= 10;
            if pid == 0 {
                break;
            }
        }
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(err());
        }
        let n = libc::write(fd, buf[i..].as_ptr().cast(), buf.len() - i);
        let e = err();
        libc::close(fd);
        if n != (buf.len() - i) as isize {
            return Err(e);
        }
    }
    Ok(())
}

/// An unconnected TCP socket created in network namespace `ns`; in a pod's namespace, made by
/// a process of the pod: a child forked in the namespace joins the pod's cgroup, makes the
/// socket there and hands it over (`SCM_RIGHTS`) before it exits.
fn socket_in(ns: &str) -> tokio::net::TcpSocket {
    sockets_in(ns, 1).pop().expect("a socket")
}

/// `n` sockets as [`socket_in`] makes one, all by one child process of the pod.
fn sockets_in(ns: &str, n: usize) -> Vec<tokio::net::TcpSocket> {
    let Some(procs) = pod_procs(ns) else {
        return in_netns(ns, move || {
            (0..n)
                .map(|_| tokio::net::TcpSocket::new_v4().expect("socket"))
                .collect()
        });
    };
    let procs = std::ffi::CString::new(procs.into_os_string().into_vec()).unwrap();
    in_netns(ns, move || {
        let mut sv = [0i32; 2];
        // SAFETY: socketpair(2) fills `sv` with two new descriptors, owned right after
        let (ours, theirs) = unsafe {
            assert_eq!(
                libc::socketpair(
                    libc::AF_UNIX,
                    libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                    0,
                    sv.as_mut_ptr()
                ),
                0,
                "socketpair"
            );
            (OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1]))
        };
        // received while the child sends (its sends block once the pair's buffer is full);
        // the end of the child (its end of the pair closed) ends the receiving
        let receiver = std::thread::spawn(move || {
            let mut got = vec![];
            while got.len() < n {
                match recv_fd(&ours) {
                    Ok(fd) => got.push(fd),
                    Err(_) => break,
                }
            }
            got
        });
        let to = theirs.as_raw_fd();
        let mut cmd = Command::new("true");
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        // SAFETY: join_cgroup and send_new_socket make only async-signal-safe calls
        unsafe {
            cmd.pre_exec(move || {
                join_cgroup(&procs)?;
                for _ in 0..n {
                    send_new_socket(to)?;
                }
                Ok(())
            });
        }
        let st = cmd.status().expect("the pod's socket maker");
        drop(theirs);
        assert!(st.success(), "the pod's socket maker: {st}");
        let fds = receiver.join().expect("socket receiver");
        assert_eq!(fds.len(), n, "sockets received from the pod");
        fds.into_iter()
            // SAFETY: TCP socket descriptors just received, non-blocking, owned by nothing else
            .map(|fd| unsafe { tokio::net::TcpSocket::from_raw_fd(fd.into_raw_fd()) })
            .collect()
    })
}

/// In a child between fork and exec: a new non-blocking TCP socket, sent over `to`.
fn send_new_socket(to: i32) -> std::io::Result<()> {
    // SAFETY: socket/sendmsg/close with stack buffers only
    unsafe {
        let s = libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        );
        if s < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut byte = [0u8; 1];
        let mut iov = libc::iovec {
            iov_base: byte.as_mut_ptr().cast(),
            iov_len: 1,
        };
        let mut cbuf = [0u64; 4];
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(4) as _;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(4) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<i32>(), s);
        let n = libc::sendmsg(to, &msg, 0);
        let e = std::io::Error::last_os_error();
        libc::close(s);
        if n != 1 {
            return Err(e);
        }
    }
    Ok(())
}

/// The descriptor [`send_new_socket`] sent over `from`.
fn recv_fd(from: &OwnedFd) -> std::io::Result<OwnedFd> {
    // SAFETY: recvmsg into stack buffers; the control message is checked before it is read
    unsafe {
        let mut byte = [0u8; 1];
        let mut iov = libc::iovec {
            iov_base: byte.as_mut_ptr().cast(),
            iov_len: 1,
        };
        let mut cbuf = [0u64; 4];
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
        if libc::recvmsg(from.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) != 1 {
            return Err(std::io::Error::last_os_error());
        }
        let c = libc::CMSG_FIRSTHDR(&msg);
        if c.is_null() || (*c).cmsg_level != libc::SOL_SOCKET || (*c).cmsg_type != libc::SCM_RIGHTS
        {
            return Err(std::io::Error::other("no descriptor received"));
        }
        Ok(OwnedFd::from_raw_fd(std::ptr::read_unaligned(
            libc::CMSG_DATA(c).cast::<i32>(),
        )))
    }
}

/// `n` keep-alive connections to `addr` opened from namespace `ns`.
async fn connect_from(ns: &str, addr: SocketAddr, n: usize) -> Vec<tokio::net::TcpStream> {
    let mut v = vec![];
    for _ in 0..n {
        v.push(socket_in(ns).connect(addr).await.expect("connect"));
    }
    v
}

fn token_get(query: &str, close: bool) -> String {
    format!(
        "GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource={RESOURCE}{query} HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\n{}\r\n",
        if close { "Connection: close\r\n" } else { "" }
    )
}

/// One GET on a fresh connection from `socket`: Ok(elapsed) when it answered 200 with a token,
/// else why not. No retries.
async fn timed_get(
    socket: tokio::net::TcpSocket,
    addr: SocketAddr,
    request: &str,
    t0: Instant,
) -> Result<Duration, String> {
    timed_get_within(socket, addr, request, t0, Duration::from_secs(10))
        .await
        .map(|(d, _)| d)
}

/// [`timed_get`] waiting up to `within` for the answer; Ok(elapsed, body).
async fn timed_get_within(
    socket: tokio::net::TcpSocket,
    addr: SocketAddr,
    request: &str,
    t0: Instant,
    within: Duration,
) -> Result<(Duration, String), String> {
    let s = socket
        .connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (head, body) = tokio::time::timeout(within, try_get(s, request))
        .await
        .map_err(|_| format!("no answer within {} s", within.as_secs()))??;
    let el = t0.elapsed();
    if head.starts_with("HTTP/1.1 200") && body.contains("access_token") {
        Ok((el, body))
    } else {
        Err(format!(
            "{} {}",
            head.lines().next().unwrap_or(""),
            body.trim()
        ))
    }
}

/// One request on `s`, the response read up to its Content-Length; errors as text.
async fn try_get(mut s: tokio::net::TcpStream, request: &str) -> Result<(String, String), String> {
    s.write_all(request.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = vec![];
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = s.read(&mut chunk).await.map_err(|e| format!("read: {e}"))?;
        buf.extend_from_slice(&chunk[..n]);
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..p]).into_owned();
            let len: usize = header(&head, "content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if buf.len() >= p + 4 + len || n == 0 {
                let end = buf.len().min(p + 4 + len);
                return Ok((head, String::from_utf8_lossy(&buf[p + 4..end]).into_owned()));
            }
        }
        if n == 0 {
            return Err(format!(
                "connection closed after {} bytes: {:?}",
                buf.len(),
                String::from_utf8_lossy(&buf)
            ));
        }
    }
}

/// Nearest-rank percentile of sorted `v`, in ms.
fn pct(v: &[Duration], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0 * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    v[i].as_secs_f64() * 1e3
}

fn summary(mut ok: Vec<Duration>, failures: &[String]) -> String {
    ok.sort();
    let mut s = format!(
        "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} ok",
        pct(&ok, 50.0),
        pct(&ok, 99.0),
        pct(&ok, 100.0),
        ok.len()
    );
    if failures.is_empty() {
        s.push_str(", 0 failed)");
    } else {
        s.push_str(&format!(
            ", {} FAILED; first: {})",
            failures.len(),
            failures[0]
        ));
    }
    s
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn pod_object(name: &str, selector: &str) -> Pod {
    pod_object_on(name, selector, NODE_NAME)
}

/// A Pod object scheduled on `node` (`spec.nodeName`), its label selecting `selector`'s
/// bindings.
fn pod_object_on(name: &str, selector: &str, node: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"aadpodidbinding": selector}},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "app"}]}
    }))
    .unwrap()
}

/// What a kubelet reports once the pod's sandbox has its IP.
async fn report_ip(pods: &Api<Pod>, name: &str, ip: &str) {
    pods.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})),
    )
    .await
    .expect("status patch");
}

/// `apiserver_request_total` series (label set → count) from the API server's `/metrics`.
async fn request_counts(c: &reqwest::Client, url: &str, token: &str) -> BTreeMap<String, f64> {
    let text = c
        .get(format!("{url}/metrics"))
        .bearer_auth(token)
        .send()
        .await
        .expect("/metrics")
        .text()
        .await
        .unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("apiserver_request_total"))
        .filter_map(|l| {
            let (labels, v) = l.rsplit_once(' ')?;
            Some((labels.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// Series that grew from `a` to `b`, with how much.
fn grown(a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>) -> Vec<(String, f64)> {
    b.iter()
        .filter_map(|(k, v)| {
            let d = v - a.get(k).copied().unwrap_or(0.0);
            (d > 0.0).then(|| (k.clone(), d))
        })
        .collect()
}

/// `verb/resource/subresource (contentType)` of a series, for printing.
fn short(labels: &str) -> String {
    let get = |k: &str| {
        labels
            .split(&format!("{k}=\""))
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or("")
            .to_string()
    };
    format!(
        "{} {}{} ({}, {})",
        get("verb"),
        get("resource"),
        match get("subresource").as_str() {
            "" => String::new(),
            s => format!("/{s}"),
        },
        get("code"),
        get("contentType")
    )
}

/// Pod addresses inside the node: pod `i` (with a namespace) has `10.232.x.(4i+2)/30`, the
/// node side of its veth `4i+1`.
fn pod_net(i: usize) -> (String, String) {
    pod_net_in(232, i)
}

/// [`pod_net`] in `10.<base>.0.0/16` (one range per node).
fn pod_net_in(base: u8, i: usize) -> (String, String) {
    let b = 4 * i;
    (
        format!("10.{base}.{}.{}", b / 256, b % 256 + 1),
        format!("10.{base}.{}.{}", b / 256, b % 256 + 2),
    )
}

/// `n` pod network namespaces `first..first+n` of `node`, each with its IP on a veth into it.
fn add_pod_netns(fab: &mut Fabric, tag: &str, node: &str, first: usize, n: usize) -> Vec<String> {
    add_pod_netns_in(fab, tag, node, 232, first, n)
}

/// [`add_pod_netns`] with names `<prefix>p<i>` / `<prefix>v<i>` and addresses in `10.<base>/16`.
fn add_pod_netns_in(
    fab: &mut Fabric,
    prefix: &str,
    node: &str,
    base: u8,
    first: usize,
    n: usize,
) -> Vec<String> {
    let names: Vec<String> = (first..first + n)
        .map(|i| format!("{prefix}p{i}"))
        .collect();
    let root: Vec<String> = names.iter().map(|p| format!("netns add {p}")).collect();
    ip_batch(None, &root);
    fab.netns.extend(names.iter().cloned());
    let mut in_node = vec![];
    for (k, p) in names.iter().enumerate() {
        let i = first + k;
        let (gw, _) = pod_net_in(base, i);
        in_node.push(format!(
            "link add {prefix}v{i} type veth peer name eth0 netns {p}"
        ));
        in_node.push(format!("addr add {gw}/30 dev {prefix}v{i}"));
        in_node.push(format!("link set {prefix}v{i} up"));
    }
    ip_batch(Some(node), &in_node);
    for (k, p) in names.iter().enumerate() {
        let (gw, ip) = pod_net_in(base, first + k);
        ip_batch(
            Some(p),
            &[
                "link set lo up".into(),
                format!("addr add {ip}/30 dev eth0"),
                "link set eth0 up".into(),
                format!("route add default via {gw}"),
            ],
        );
    }
    names
}

/// A node: network namespace `name` with a /30 veth (`link` on the root side) to the root
/// namespace, 169.254.169.254 on its loopback for the agent's own IMDS, and `kubernetes`
/// naming the root side (the API server's certificate carries that name).
fn add_node(fab: &mut Fabric, name: &str, link: &str, root_ip: &str, node_ip: &str) {
    ip_batch(None, &[format!("netns add {name}")]);
    fab.netns.push(name.to_string());
    fab.root_links.push(link.to_string());
    ip_batch(
        None,
        &[
            format!("link add {link} type veth peer name eth0 netns {name}"),
            format!("addr add {root_ip}/30 dev {link}"),
            format!("link set {link} up"),
        ],
    );
    ip_batch(
        Some(name),
        &[
            "link set lo up".into(),
            format!("addr add {IMDS}/32 dev lo"),
            format!("addr add {node_ip}/30 dev eth0"),
            "link set eth0 up".into(),
            format!("route add default via {root_ip}"),
        ],
    );
    let etc = PathBuf::from("/etc/netns").join(name);
    std::fs::create_dir_all(&etc).unwrap();
    fab.etc_netns.push(etc.clone());
    std::fs::write(
        etc.join("hosts"),
        format!("127.0.0.1 localhost\n{root_ip} kubernetes\n"),
    )
    .unwrap();
}

/// `keyless node` with `args` in node namespace `ns`, started with the host's `/sys` in view
/// (not `ip netns exec`, whose fresh /sys hides /sys/fs/cgroup from caller attestation); ready
/// once it printed its NMI endpoint (the watches listed, the redirect in place).
fn spawn_agent(ns: &str, args: &[String], log_dir: &Path) -> e2e::Proc {
    let exec = fabric::node_exec(ns);
    let mut all: Vec<&str> = exec[1..].iter().map(String::as_str).collect();
    all.push(e2e::bin());
    all.extend(args.iter().map(String::as_str));
    let agent = e2e::spawn_program_until(&exec[0], &all, "NMI endpoint:", log_dir)
        .expect("keyless node --nmi");
    // every program of `exec` execs the next: its PID is the agent's
    let pid = agent.child.id();
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    assert_eq!(comm.trim(), "keyless", "the agent's PID");
    agent
}

/// The real python SDK (`ManagedIdentityCredential`, no environment at all) in namespace `ns`:
/// Ok(time from `t0`) when it printed a token.
async fn python_sdk(ns: &str, kwargs: Value, t0: Instant) -> Result<Duration, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let python = root.join(".cache/venv/bin/python");
    let client = root.join("conformance/python/client.py");
    let args =
        json!({"credential": "mi", "kwargs": kwargs, "scope": format!("{RESOURCE}.default")});
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        {
            // a pod's process: in the pod's cgroup first
            let mut pre = match pod_procs(ns) {
                Some(procs) => fabric::PodCgroup::enter(&procs),
                None => vec![],
            };
            pre.extend(["ip", "netns", "exec", ns, "env", "-i"].map(String::from));
            let mut c = tokio::process::Command::new(&pre[0]);
            c.args(&pre[1..]);
            c
        }
        .arg(&python)
        .arg(&client)
        .arg(args.to_string())
        .kill_on_drop(true)
        .output(),
    )
    .await
    .map_err(|_| "python client timed out".to_string())?
    .map_err(|e| format!("python client: {e}"))?;
    let el = t0.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().rfind(|l| l.starts_with('{')).unwrap_or("");
    let v: Value = serde_json::from_str(last).unwrap_or(Value::Null);
    if v["token"].is_string() {
        Ok(el)
    } else {
        Err(format!(
            "{last} {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        ))
    }
}

async fn pods(secs: u64, conns: usize) {
    let n_pods = env_u64("BENCH_PODS", 200) as usize;
    let n_sdk = env_u64("BENCH_SDK_PODS", 5) as usize;
    let n_ids = env_u64("BENCH_POD_IDENTITIES", 200).max(1) as usize;
    let n_node_pods = env_u64("BENCH_NODE_PODS", 1000) as usize;
    let n_tokens = env_u64("BENCH_TOKEN_REQUESTS", 5000).max(1) as usize;
    let t_setup = Instant::now();
    // declared before the fabric, so dropped after it: the control plane's `stop` reads the
    // PIDs from its directory
    let dir = tempfile::tempdir().unwrap();
    let mut fab = Fabric::default();

    // ---- the control plane, bound to every address so the node namespace reaches it
    let Some(cp) = ControlPlane::start(&dir.path().join("k8s"), "--bind-address=0.0.0.0") else {
        println!("part 2 SKIPPED: no control plane");
        return;
    };
    let api_url = cp.env["K8S_API_URL"].clone();
    let api_port = cp.env["K8S_API_PORT"].clone();
    let admin_token = std::fs::read_to_string(&cp.env["K8S_ADMIN_TOKEN_FILE"])
        .unwrap()
        .trim()
        .to_string();
    let metrics_client = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(
            &std::fs::read(&cp.env["K8S_CA_FILE"]).unwrap(),
        )
        .unwrap()])
        .build()
        .unwrap();
    let kube = cp.client().await;
    let node_kubeconfig = dir.path().join("node-kubeconfig");
    std::fs::write(
        &node_kubeconfig,
        std::fs::read_to_string(cp.kubeconfig()).unwrap().replace(
            &format!("https://127.0.0.1:{api_port}"),
            &format!("https://kubernetes:{api_port}"),
        ),
    )
    .unwrap();
    fab.cp = Some(cp);

    // ---- the node: a namespace with a /30 veth to the root namespace ([`add_node`])
    let pid = std::process::id();
    let tag = format!("kb{:04x}", pid & 0xffff);
    let k = 20 + pid % 200;
    let (root_ip, node_ip) = (format!("10.231.{k}.1"), format!("10.231.{k}.2"));
    let node = format!("{tag}n");
    add_node(&mut fab, &node, &format!("{tag}r"), &root_ip, &node_ip);

    // ---- Keyless: the server (a process, on every address), a scale set holding the pod
    // identities
    let server = e2e::ServerProc::start_on(dir.path(), "0.0.0.0:0", &["--tls-san", &root_ip]);
    let port = server.url.rsplit(':').next().unwrap().to_string();
    let ca = server.ca.clone();
    let group = server.cli(&["group", "create", "-n", "pods"]);
    let group_id = group["id"].as_str().unwrap().to_string();
    let (arm, arm_token) = server.admin().await;
    let mut ids = vec![];
    for i in 0..n_ids {
        ids.push(
            put_identity(
                &arm,
                &server.url,
                &arm_token,
                &group_id,
                &format!("pod-id-{i}"),
            )
            .await,
        );
    }
    // at most 150 identities per request (as Azure): create, then assign the rest
    let names: Vec<String> = (0..n_ids).map(|i| format!("pod-id-{i}")).collect();
    for (k, chunk) in names.chunks(150).enumerate() {
        let mut args = if k == 0 {
            vec![
                "vmss",
                "create",
                "-g",
                "pods",
                "-n",
                "nodes",
                "--assign-identity",
            ]
        } else {
            vec![
                "vmss",
                "identity",
                "assign",
                "-g",
                "pods",
                "-n",
                "nodes",
                "--identities",
            ]
        };
        args.extend(chunk.iter().map(String::as_str));
        server.cli(&args);
    }
    let join = server.cli(&["vmss", "join-token", "-g", "pods", "-n", "nodes"])["joinToken"]
        .as_str()
        .unwrap()
        .to_string();
    fab.server = Some(server);

    // ---- the CRDs (no objects yet), then the agent with NMI in the node namespace
    keyless_k8s::addon::install_crds(&kube).await.expect("CRDs");
    let state = dir.path().join("node").to_string_lossy().to_string();
    let server_url = format!("https://{root_ip}:{port}");
    let kc = node_kubeconfig.to_string_lossy().to_string();
    let nmi_listen = format!("{node_ip}:2579");
    let imds_listen = format!("{IMDS}:80");
    let t_agent = Instant::now();
    let agent_args: Vec<String> = [
        "node",
        "--server",
        &server_url,
        "--ca-file",
        &ca,
        "--state-dir",
        &state,
        "--join-token",
        &join,
        "--imds-listen",
        &imds_listen,
        "--nmi",
        "--node-name",
        NODE_NAME,
        "--kubeconfig",
        &kc,
        "--nmi-listen",
        &nmi_listen,
        // throughput, not fair share (as part 1's agent: FairShareConfig::off())
        "--caller-rps",
        "0",
        "--caller-concurrency",
        "0",
    ]
    .map(String::from)
    .to_vec();
    let agent = spawn_agent(&node, &agent_args, dir.path());
    let agent_ready = t_agent.elapsed();
    let agent_pid = agent.child.id();
    fab.agent = Some(agent);
    let imds = SocketAddr::from((IMDS, 80));
    let cid0 = ids[0].1.clone();

    // ---- (a) baseline: the node's own IMDS from the node namespace, one fresh connection per
    // GET, the same cached token the pods get (the first GET fills the cache)
    let node_get = token_get(&format!("&client_id={cid0}"), true);
    timed_get(socket_in(&node), imds, &node_get, Instant::now())
        .await
        .expect("node IMDS warm-up");
    let (mut node_ok, mut node_fail) = (vec![], vec![]);
    for _ in 0..n_pods {
        let sock = socket_in(&node);
        match timed_get(sock, imds, &node_get, Instant::now()).await {
            Ok(d) => node_ok.push(d),
            Err(e) => node_fail.push(e),
        }
    }
    // the agent's RSS with nothing on the node is taken after a load run on its IMDS, as the
    // full one is taken after load runs through NMI
    let keep_alive = token_get(&format!("&client_id={cid0}"), false);
    load_streams(
        connect_from(&node, imds, conns).await,
        keep_alive.clone(),
        secs,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_empty = rss_kb(agent_pid);

    // ---- the pod identities in Kubernetes: an AzureIdentity and a binding (selector sel-<i>)
    // for each, in `default` (whose service account exists)
    let az_ids: Api<AzureIdentity> = Api::namespaced(kube.clone(), "default");
    let bindings: Api<AzureIdentityBinding> = Api::namespaced(kube.clone(), "default");
    let mut set = tokio::task::JoinSet::new();
    for (i, (rid, cid)) in ids.iter().enumerate() {
        let (az_ids, bindings) = (az_ids.clone(), bindings.clone());
        let id: AzureIdentity = serde_json::from_value(json!({
            "apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentity",
            "metadata": {"name": format!("pod-id-{i}")},
            "spec": {"type": 0, "resourceID": rid, "clientID": cid}
        }))
        .unwrap();
        let b: AzureIdentityBinding = serde_json::from_value(json!({
            "apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentityBinding",
            "metadata": {"name": format!("pod-id-{i}-binding")},
            "spec": {"azureIdentity": format!("pod-id-{i}"), "selector": format!("sel-{i}")}
        }))
        .unwrap();
        set.spawn(async move {
            az_ids
                .create(&PostParams::default(), &id)
                .await
                .expect("AzureIdentity");
            bindings
                .create(&PostParams::default(), &b)
                .await
                .expect("AzureIdentityBinding");
        });
        while set.len() >= 8 {
            set.join_next().await.unwrap().unwrap();
        }
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }

    // ---- pod namespaces: a warm-up pod, the timed ones, the SDK ones, a last one
    let pods: Api<Pod> = Api::namespaced(kube.clone(), "default");
    let with_ns = 1 + n_pods + n_sdk + 1;
    let pod_ns = add_pod_netns(&mut fab, &tag, &node, 0, with_ns);
    let mut created = 0usize;

    // warm-up pod bound to the last binding: once it gets a token, NMI's watches have seen
    // every identity and binding (each watch delivers in order); setup, so retries are fine
    let last_sel = format!("sel-{}", n_ids - 1);
    let p = pods
        .create(&PostParams::default(), &pod_object("warm", &last_sel))
        .await
        .unwrap();
    pod_started(&mut fab, &pod_ns[0], &p.metadata.uid.unwrap());
    report_ip(&pods, "warm", &pod_net(0).1).await;
    created += 1;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut warm_tries = 0;
    loop {
        warm_tries += 1;
        let r = timed_get(
            socket_in(&pod_ns[0]),
            imds,
            &token_get("", true),
            Instant::now(),
        )
        .await;
        match r {
            Ok(_) => break,
            Err(e) if Instant::now() > deadline => panic!("warm-up pod never got a token: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let setup = t_setup.elapsed();

    // ---- (a) pod IP reported → token in the pod, no retries
    let (mut pod_ok, mut pod_fail) = (vec![], vec![]);
    let pod_get = token_get("", true);
    for (i, ns) in pod_ns.iter().enumerate().skip(1).take(n_pods) {
        let name = format!("bench-{i}");
        let p = pods
            .create(&PostParams::default(), &pod_object(&name, "sel-0"))
            .await
            .unwrap();
        pod_started(&mut fab, ns, &p.metadata.uid.unwrap());
        created += 1;
        let sock = socket_in(ns);
        report_ip(&pods, &name, &pod_net(i).1).await;
        match timed_get(sock, imds, &pod_get, Instant::now()).await {
            Ok(d) => pod_ok.push(d),
            Err(e) => pod_fail.push(format!("{name}: {e}")),
        }
    }
    // the same GET from the same pods once NMI knows them: what the NMI path itself costs
    let (mut known_ok, mut known_fail) = (vec![], vec![]);
    for ns in pod_ns.iter().skip(1).take(n_pods) {
        match timed_get(socket_in(ns), imds, &pod_get, Instant::now()).await {
            Ok(d) => known_ok.push(d),
            Err(e) => known_fail.push(format!("{ns}: {e}")),
        }
    }
    // the python SDK: in pods (NMI picks the pod's identity), and in the node namespace (the
    // node's IMDS, the same identity by client id)
    let (mut sdk_ok, mut sdk_fail, mut sdk_node_ok, mut sdk_node_fail) =
        (vec![], vec![], vec![], vec![]);
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/venv/bin/python");
    if python.exists() {
        for (i, ns) in pod_ns.iter().enumerate().skip(1 + n_pods).take(n_sdk) {
            let name = format!("sdk-{i}");
            let p = pods
                .create(&PostParams::default(), &pod_object(&name, "sel-0"))
                .await
                .unwrap();
            pod_started(&mut fab, ns, &p.metadata.uid.unwrap());
            created += 1;
            report_ip(&pods, &name, &pod_net(i).1).await;
            match python_sdk(ns, json!({}), Instant::now()).await {
                Ok(d) => sdk_ok.push(d),
                Err(e) => sdk_fail.push(format!("{name}: {e}")),
            }
            match python_sdk(&node, json!({"client_id": cid0}), Instant::now()).await {
                Ok(d) => sdk_node_ok.push(d),
                Err(e) => sdk_node_fail.push(e),
            }
        }
    }

    // ---- (b) cached pod tokens/s through NMI: connections from pod namespaces (one per timed
    // pod, round robin), vs a bare hyper server in the node namespace reached over the same
    // veths without the DNAT
    let from = |c: usize| pod_ns[1 + c % n_pods.max(1)].clone();
    let (head, pod_body) = get_on(
        socket_in(&from(0)).connect(imds).await.unwrap(),
        &token_get("", true),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}\n{pod_body}");
    let served: Value = serde_json::from_str(&pod_body).unwrap();
    assert_eq!(
        served["client_id"],
        cid0.as_str(),
        "the pod's bound identity"
    );
    let bare_listener = {
        let addr: SocketAddr = format!("{node_ip}:0").parse().unwrap();
        let l = in_netns(&node, move || {
            let l = std::net::TcpListener::bind(addr).expect("bind in node");
            l.set_nonblocking(true).unwrap();
            l
        });
        tokio::net::TcpListener::from_std(l).unwrap()
    };
    let bare = bare_server_on(bare_listener, pod_body.clone(), None);
    let bare_req = token_get("", false).replace("Host: 169.254.169.254", &format!("Host: {bare}"));
    // interleaved rounds (bare, node IMDS, NMI), medians reported
    let rounds = env_u64("BENCH_ROUNDS", 3).max(1) as usize;
    let mut runs = vec![[0f64; 3]; rounds]; // [round][bare, IMDS, NMI]
    for run in runs.iter_mut() {
        let mut streams = vec![];
        for c in 0..conns {
            streams.extend(connect_from(&from(c), bare, 1).await);
        }
        run[0] = load_streams(streams, bare_req.clone(), secs).await;
        let streams = connect_from(&node, imds, conns).await;
        run[1] = load_streams(streams, keep_alive.clone(), secs).await;
        let mut streams = vec![];
        for c in 0..conns {
            streams.extend(connect_from(&from(c), imds, 1).await);
        }
        run[2] = load_streams(streams, token_get("", false), secs).await;
    }
    let median = |f: &dyn Fn(&[f64; 3]) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (bare_rps, imds_rps, nmi_rps) = (median(&|r| r[0]), median(&|r| r[1]), median(&|r| r[2]));
    let (nmi_to_bare, nmi_to_imds) = (median(&|r| r[2] / r[0]), median(&|r| r[2] / r[1]));

    // ---- (c) API-server requests per pod token request: N requests, then an idle window of
    // the same length (the API server's own controllers make requests of their own)
    let m0 = request_counts(&metrics_client, &api_url, &admin_token).await;
    let t_tokens = Instant::now();
    let mut tasks = vec![];
    let per_conn = n_tokens.div_ceil(conns);
    for c in 0..conns {
        let s = connect_from(&from(c), imds, 1).await.pop().unwrap();
        let req = token_get("", false);
        tasks.push(tokio::spawn(async move {
            let mut s = s;
            let mut buf = vec![0u8; 64 * 1024];
            for _ in 0..per_conn {
                s.write_all(req.as_bytes()).await.unwrap();
                let (head, _) = read_response(&mut s, &mut buf).await;
                assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let tokens_sent = per_conn * conns;
    let window = t_tokens.elapsed();
    let m1 = request_counts(&metrics_client, &api_url, &admin_token).await;
    tokio::time::sleep(window.max(Duration::from_millis(200))).await;
    let m2 = request_counts(&metrics_client, &api_url, &admin_token).await;
    let during = grown(&m0, &m1);
    let idle = grown(&m1, &m2);
    let sum = |v: &[(String, f64)], f: &dyn Fn(&str) -> bool| {
        v.iter()
            .filter(|(k, _)| f(k))
            .map(|(_, d)| *d as i64)
            .sum::<i64>()
    };
    let all = |_: &str| true;
    let not_watch = |k: &str| !k.contains("verb=\"WATCH\"");
    // kube-rs (NMI, this bench) asks for JSON; the API server's loopback client for protobuf
    let json_clients = |k: &str| not_watch(k) && !k.contains("protobuf");

    // ---- (d) RSS with the node full of pods: the rest as objects only (distinct IPs, bound
    // to the identities round robin), then one more real pod as the sync point (the pod watch
    // delivers in order: once it is served, NMI has seen all of them)
    let rest = n_node_pods.saturating_sub(created + 1);
    let mut set = tokio::task::JoinSet::new();
    for j in 0..rest {
        let pods = pods.clone();
        let name = format!("obj-{j}");
        let ip = format!("10.233.{}.{}", j / 250, j % 250 + 1);
        let sel = format!("sel-{}", j % n_ids);
        set.spawn(async move {
            pods.create(&PostParams::default(), &pod_object(&name, &sel))
                .await
                .unwrap();
            report_ip(&pods, &name, &ip).await;
        });
        while set.len() >= 8 {
            set.join_next().await.unwrap().unwrap();
        }
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
    created += rest;
    let last = with_ns - 1;
    let p = pods
        .create(&PostParams::default(), &pod_object("last", "sel-1"))
        .await
        .unwrap();
    pod_started(&mut fab, &pod_ns[last], &p.metadata.uid.unwrap());
    created += 1;
    report_ip(&pods, "last", &pod_net(last).1).await;
    let last_ok = timed_get(
        socket_in(&pod_ns[last]),
        imds,
        &token_get("", true),
        Instant::now(),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_full = rss_kb(agent_pid);
    let on_node = pods
        .list(&kube::api::ListParams::default().fields(&format!("spec.nodeName={NODE_NAME}")))
        .await
        .unwrap()
        .items
        .len();

    // ---- report
    let mut managed_sorted = pod_ok.clone();
    managed_sorted.sort();
    println!(
        "2. NMI on a real kube-apiserver (v1.20.2): node = network namespace with `keyless node --nmi` \
         (separate process), pods = network namespaces on veths into it; setup {:.1} s (agent ready \
         in {:.2} s, warm-up pod served after {warm_tries} tries)",
        setup.as_secs_f64(),
        agent_ready.as_secs_f64()
    );
    println!("  a. first token, one GET, fresh connection, no retries:");
    println!(
        "     node namespace → agent IMDS (baseline, same cached token): {}",
        summary(node_ok, &node_fail)
    );
    println!(
        "     pod: status PATCH returned → token in the pod ({n_pods} pods): {}",
        summary(pod_ok, &pod_fail)
    );
    println!(
        "     the same pods again, already known to NMI (same GET through the DNAT): {}",
        summary(known_ok, &known_fail)
    );
    if python.exists() {
        sdk_ok.sort();
        sdk_node_ok.sort();
        println!(
            "     python azure-identity ManagedIdentityCredential (process start + import + token; \
             python start-up dominates): pod, PATCH returned → token: p50 {:.0} ms ({} ok, {} failed{}); \
             node namespace → IMDS (baseline): p50 {:.0} ms ({} ok, {} failed{})",
            pct(&sdk_ok, 50.0),
            sdk_ok.len(),
            sdk_fail.len(),
            sdk_fail.first().map(|e| format!("; {e}")).unwrap_or_default(),
            pct(&sdk_node_ok, 50.0),
            sdk_node_ok.len(),
            sdk_node_fail.len(),
            sdk_node_fail.first().map(|e| format!("; {e}")).unwrap_or_default(),
        );
    } else {
        println!("     python SDK: not run ({} missing)", python.display());
    }
    println!(
        "  b. cached pod tokens, {conns} keep-alive connections from pod namespaces; median of {rounds} interleaved rounds of {secs} s:"
    );
    println!(
        "     bare hyper server in the node namespace, same {} B body, same veths, no DNAT: {bare_rps:>8.0} req/s",
        pod_body.len()
    );
    println!(
        "     agent IMDS from the node namespace (no NMI, same agent, same token):  {imds_rps:>8.0} req/s"
    );
    println!(
        "     NMI (DNAT 169.254.169.254:80 → {nmi_listen}): \
          \
         {nmi_rps:>8.0} req/s   ratio to bare {:.2}, to IMDS {:.2}",
        nmi_to_bare, nmi_to_imds
    );
    let per_token = sum(&during, &not_watch) as f64 / tokens_sent as f64;
    println!(
        "  c. API-server requests per pod token request: (after − before)/N = {}/{tokens_sent} = {per_token:.4} \
         (WATCH left out: long-running, counted when a watch ends; N requests from pod namespaces in {:.2} s; \
         all series +{}, from JSON clients — NMI, this bench — +{}, the rest is the API server's own protobuf loopback); \
         baseline, an idle window of the same length right after: +{} ({} without WATCH)",
        sum(&during, &not_watch),
        window.as_secs_f64(),
        sum(&during, &all),
        sum(&during, &json_clients),
        sum(&idle, &all),
        sum(&idle, &not_watch),
    );
    for (k, d) in &during {
        println!("       during the token requests: +{d} {}", short(k));
    }
    for (k, d) in &idle {
        println!("       during the idle window:    +{d} {}", short(k));
    }
    println!(
        "  d. agent RSS: {} pods on the node ({on_node} listed by spec.nodeName) and {n_ids} AzureIdentities + bindings: {:.1} MiB; \
         with 0 pods and no CRD objects (after the IMDS load run): {:.1} MiB; ratio {:.2}{}",
        created,
        rss_full as f64 / 1024.0,
        rss_empty as f64 / 1024.0,
        rss_full as f64 / rss_empty.max(1) as f64,
        match last_ok {
            Ok(_) => String::new(),
            Err(e) => format!(" (the last pod was NOT served: {e})"),
        }
    );
    // ---- (e) caller attestation on vs off, (f) standard mode
    if env_u64("BENCH_ATTEST", 1) == 0 || n_pods == 0 {
        println!("  e. caller attestation cost: skipped (BENCH_ATTEST=0 or BENCH_PODS=0)");
    } else {
        attestation_cost(
            &mut fab,
            &node,
            &agent_args,
            dir.path(),
            &pod_ns[1..1 + n_pods],
            imds,
            conns,
            secs,
        )
        .await;
    }
    if env_u64("BENCH_STANDARD", 1) == 0 {
        println!("  f. standard mode: skipped (BENCH_STANDARD=0)");
    } else {
        let cx = StdCtx {
            dir: dir.path(),
            kube: kube.clone(),
            arm,
            arm_token,
            agent_server_url: server_url.clone(),
            ca: ca.clone(),
            kubeconfig: kc.clone(),
            tag: tag.clone(),
            k,
            watch_client: metrics_client.clone(),
            api_url: api_url.clone(),
            admin_token: admin_token.clone(),
            managed: managed_sorted,
        };
        standard_mode(&mut fab, cx).await;
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "  load average at the end: {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    // the processes stopped first, so their logs are complete
    drop(fab);
    if let Some(to) = std::env::var_os("BENCH_KEEP_LOGS") {
        keep_logs(dir.path(), Path::new(&to));
    }
}

/// BENCH_KEEP_LOGS=DIR: the stderr logs of every process part 2 started (agents, MIC, server)
/// copied to DIR before the temporary directory goes.
fn keep_logs(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "log") {
            let _ = std::fs::copy(&p, to.join(e.file_name()));
        }
    }
    println!("  logs kept in {}", to.display());
}

/// A user-assigned identity `name` in resource group `group_id` (an ARM id), through ARM: its
/// resource id and client id.
async fn put_identity(
    arm: &reqwest::Client,
    url: &str,
    token: &str,
    group_id: &str,
    name: &str,
) -> (String, String) {
    let r = arm
        .put(format!(
            "{url}{group_id}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}?api-version=2023-01-31"
        ))
        .bearer_auth(token)
        .json(&json!({"location": "local"}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "identity: {}", r.status());
    let v: Value = r.json().await.unwrap();
    (
        v["id"].as_str().unwrap().to_string(),
        v["properties"]["clientId"].as_str().unwrap().to_string(),
    )
}

/// The median of `v` (any order), NaN when empty.
fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `a − b` in ms, negative when `a` came first.
fn signed_ms(a: Instant, b: Instant) -> f64 {
    if a >= b {
        (a - b).as_secs_f64() * 1e3
    } else {
        -((b - a).as_secs_f64() * 1e3)
    }
}

// ------------------------------------------------------------------ 2e. caller attestation cost

/// Requests/s through NMI with caller attestation on and off: the managed node's agent
/// restarted with `--caller-attestation true|false` for each round (same node, same pods, same
/// binary), pairs in ABBA order, on/off ratios per pair, their median reported. Each round:
/// `conns` keep-alive connections for `secs` (attestation paid once per connection), then
/// BENCH_CONN_REQUESTS requests each on a new connection (`Connection: close`; paid every
/// request), `conns` at a time, over sockets the pods made before the clock starts.
#[allow(clippy::too_many_arguments)]
async fn attestation_cost(
    fab: &mut Fabric,
    node: &str,
    agent_args: &[String],
    log_dir: &Path,
    from: &[String],
    imds: SocketAddr,
    conns: usize,
    secs: u64,
) {
    let pairs = env_u64("BENCH_ATTEST_PAIRS", 5).max(1) as usize;
    let n_close = env_u64("BENCH_CONN_REQUESTS", 20000).max(1) as usize;
    let keep = token_get("", false);
    let close = token_get("", true);
    // [pair] → [on, off]
    let mut results = vec![[Round::default(); 2]; pairs];
    let mut restarts = vec![];
    for (p, result) in results.iter_mut().enumerate() {
        let order = if p % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for on in order {
            if let Some(mut a) = fab.agent.take() {
                a.stop();
            }
            let mut args = agent_args.to_vec();
            args.extend(["--caller-attestation".to_string(), on.to_string()]);
            let t = Instant::now();
            let agent = spawn_agent(node, &args, log_dir);
            let pid = agent.child.id();
            fab.agent = Some(agent);
            // warm-up: the token cache starts empty
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match timed_get(socket_in(&from[0]), imds, &close, Instant::now()).await {
                    Ok(_) => break,
                    Err(e) if Instant::now() > deadline => {
                        panic!("no token after the restart (attestation {on}): {e}")
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
            restarts.push(t.elapsed());
            // the flag took effect: a socket of the pod's network namespace made by this
            // process (not by a process of the pod's cgroup) is refused only with it on
            let ns = from[0].clone();
            let stranger = in_netns(&ns, || tokio::net::TcpSocket::new_v4().expect("socket"));
            let r = timed_get(stranger, imds, &close, Instant::now()).await;
            match (on, &r) {
                (true, Err(e)) if e.starts_with("HTTP/1.1 403") => {}
                (false, Ok(_)) => {}
                _ => panic!(
                    "caller attestation {on}: a socket from outside the pod's cgroup got {r:?}"
                ),
            }
            let mut streams = vec![];
            for c in 0..conns {
                streams.extend(connect_from(&from[c % from.len()], imds, 1).await);
            }
            let cpu0 = cpu_secs(pid);
            let ka = load_streams(streams, keep.clone(), secs).await;
            let ka_cpu = cpu_secs(pid) - cpu0;
            // in batches of at most 10,000 sockets (the descriptors are held until used); the
            // sockets of a batch are made before its clock starts
            let (mut done, mut busy, mut pc_cpu) = (0usize, Duration::ZERO, 0.0);
            while done < n_close {
                let batch = (n_close - done).min(10_000);
                let mut socks = vec![];
                for (j, ns) in from.iter().enumerate() {
                    let n = batch / from.len() + usize::from(j < batch % from.len());
                    if n > 0 {
                        socks.extend(sockets_in(ns, n));
                    }
                }
                let cpu0 = cpu_secs(pid);
                busy += per_connection(socks, imds, close.clone(), conns).await;
                pc_cpu += cpu_secs(pid) - cpu0;
                done += batch;
            }
            result[usize::from(!on)] = Round {
                ka_rps: ka,
                ka_cpu_us: ka_cpu * 1e6 / (ka * secs as f64).max(1.0),
                pc_rps: n_close as f64 / busy.as_secs_f64(),
                pc_cpu_us: pc_cpu * 1e6 / n_close as f64,
            };
        }
    }
    // the median over pairs of f(on) / f(off), every pair's ratio; the medians of f(on), f(off)
    let ratio = |f: &dyn Fn(&Round) -> f64| {
        let v: Vec<f64> = results.iter().map(|r| f(&r[0]) / f(&r[1])).collect();
        (median(v.clone()), rounds_note(&v))
    };
    let abs =
        |k: usize, f: &dyn Fn(&Round) -> f64| median(results.iter().map(|r| f(&r[k])).collect());
    let restart_ms: Vec<f64> = restarts.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    println!(
        "  e. caller attestation cost: NMI on the managed node, agent restarted with --caller-attestation true|false \
         for each round ({pairs} pairs, ABBA order; restart → first pod token p50 {:.0} ms), same {} pods, {conns} concurrent \
         connections; requests/s (noisy: other work on the machine) and the agent's CPU time per request (user + system, \
         /proc/<pid>/stat: what the agent itself spent):",
        median(restart_ms),
        from.len()
    );
    let line = |what: &str, rps: &dyn Fn(&Round) -> f64, cpu: &dyn Fn(&Round) -> f64| {
        let (r, rn) = ratio(rps);
        let (c, cn) = ratio(cpu);
        println!(
            "     {what}: on {:>6.0} req/s, off {:>6.0} req/s, ratio on/off {r:.3}{rn}; agent CPU per request on {:.1} µs, \
             off {:.1} µs, ratio on/off {c:.3}{cn}",
            abs(0, rps),
            abs(1, rps),
            abs(0, cpu),
            abs(1, cpu)
        );
    };
    line(
        &format!("keep-alive ({secs} s per round; attested once per connection)"),
        &|r| r.ka_rps,
        &|r| r.ka_cpu_us,
    );
    line(
        &format!(
            "new connection per request ({n_close} requests per round, `Connection: close`, sockets made by the pods \
             beforehand; attested every request)"
        ),
        &|r| r.pc_rps,
        &|r| r.pc_cpu_us,
    );
}

/// One round of [`attestation_cost`].
#[derive(Clone, Copy, Default)]
struct Round {
    ka_rps: f64,
    ka_cpu_us: f64,
    pc_rps: f64,
    pc_cpu_us: f64,
}

/// CPU time (user + system, every thread) process `pid` has used, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // fields after the command (which may hold spaces) in parentheses: state is field 3,
    // utime 14, stime 15
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    // SAFETY: sysconf has no preconditions
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    f.iter().sum::<u64>() as f64 / tick
}

/// `socks.len()` requests, each on its own new connection from one of `socks` (`conns` at a
/// time), every answer a 200; how long they took.
async fn per_connection(
    socks: Vec<tokio::net::TcpSocket>,
    addr: SocketAddr,
    request: String,
    conns: usize,
) -> Duration {
    let queue = Arc::new(std::sync::Mutex::new(socks));
    let t0 = Instant::now();
    let mut tasks = vec![];
    for _ in 0..conns.max(1) {
        let (queue, req) = (queue.clone(), request.clone());
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let Some(sock) = queue.lock().unwrap().pop() else {
                    break;
                };
                let mut s = sock.connect(addr).await.expect("connect");
                s.set_nodelay(true).ok();
                s.write_all(req.as_bytes()).await.expect("write");
                let (head, _) = read_response(&mut s, &mut buf).await;
                assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            }
        }));
    }
    for t in tasks {
        t.await.expect("per-connection task");
    }
    t0.elapsed()
}

// ------------------------------------------------------------------ 2f. standard mode

const STD_NODE: &str = "bench-std-node";

/// What part 2f takes over from part 2's set-up.
struct StdCtx<'a> {
    dir: &'a Path,
    kube: kube::Client,
    arm: reqwest::Client,
    arm_token: String,
    /// the Keyless server as the nodes reach it
    agent_server_url: String,
    ca: String,
    /// the nodes' kubeconfig (`kubernetes` resolves to the root namespace)
    kubeconfig: String,
    tag: String,
    k: u32,
    /// the API server's watch, from this process
    watch_client: reqwest::Client,
    api_url: String,
    admin_token: String,
    /// row a's pod latencies (managed mode), sorted
    managed: Vec<Duration>,
}

/// When this process saw each AzureAssignedIdentity (by name) first, and first `Assigned`.
type Seen = Arc<std::sync::Mutex<std::collections::HashMap<String, [Option<Instant>; 2]>>>;

/// Watch every AzureAssignedIdentity (raw watch over HTTPS, resumed from the last
/// resourceVersion when the API server ends it), noting into `seen` when each was first seen
/// and first seen `Assigned`.
async fn watch_assigned(c: reqwest::Client, api: String, token: String, seen: Seen) {
    let mut rv = String::new();
    loop {
        let mut url =
            format!("{api}/apis/aadpodidentity.k8s.io/v1/azureassignedidentities?watch=1");
        if !rv.is_empty() {
            url.push_str(&format!("&resourceVersion={rv}"));
        }
        let Ok(mut resp) = c.get(&url).bearer_auth(&token).send().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut buf: Vec<u8> = vec![];
        while let Ok(Some(chunk)) = resp.chunk().await {
            let now = Instant::now();
            buf.extend_from_slice(&chunk);
            while let Some(p) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=p).collect();
                let Ok(ev) = serde_json::from_slice::<Value>(&line) else {
                    continue;
                };
                if ev["type"] == "ERROR" {
                    rv.clear(); // expired: list again
                    continue;
                }
                let o = &ev["object"];
                if let Some(v) = o["metadata"]["resourceVersion"].as_str() {
                    rv = v.to_string();
                }
                let Some(name) = o["metadata"]["name"].as_str() else {
                    continue;
                };
                let mut seen = seen.lock().unwrap();
                let e = seen.entry(name.to_string()).or_default();
                e[0].get_or_insert(now);
                if o["status"]["status"] == "Assigned" {
                    e[1].get_or_insert(now);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Counters of the standard-mode processes' ops listeners: MIC's syncs, its scale-set writes
/// (ok, failed), and the node agent's host-view fetches.
#[derive(Clone, Copy, Default)]
struct StdCounts {
    syncs: f64,
    writes_ok: f64,
    writes_failed: f64,
    host_views: f64,
}

impl StdCounts {
    async fn read(mic: &str, agent: &str) -> StdCounts {
        let scrape = |url: String| async move {
            reqwest::get(&url)
                .await
                .unwrap_or_else(|e| panic!("{url}: {e}"))
                .text()
                .await
                .unwrap()
        };
        let (m, a) = (
            scrape(mic.to_string()).await,
            scrape(agent.to_string()).await,
        );
        // the samples of `name` whose labels contain `with`
        let sum = |text: &str, name: &str, with: &str| -> f64 {
            text.lines()
                .filter(|l| l.starts_with(name) && l.contains(with))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        use keyless_ops::metrics::{AGENT_SYNCS, MIC_SYNCS, MIC_TARGET_WRITES};
        StdCounts {
            syncs: sum(&m, MIC_SYNCS, ""),
            writes_ok: sum(&m, MIC_TARGET_WRITES, "result=\"ok\""),
            writes_failed: sum(&m, MIC_TARGET_WRITES, "result=\"error\""),
            host_views: sum(&a, AGENT_SYNCS, ""),
        }
    }

    /// What happened between `self` and `later`, as printed.
    fn until(self, later: StdCounts) -> String {
        format!(
            "MIC: {} scale-set writes ok ({} failed) over {} syncs; the node's host-view fetches: {}",
            later.writes_ok - self.writes_ok,
            later.writes_failed - self.writes_failed,
            later.syncs - self.syncs,
            later.host_views - self.host_views
        )
    }
}

/// One standard-mode pod's run: when its object was created, when its status PATCH returned,
/// and when its first GET (sent right after the PATCH) was answered with a token.
struct PodRun {
    /// its AzureAssignedIdentity's name (`<pod>-default-<identity>`)
    assigned: String,
    created: Instant,
    patched: Instant,
    token: Result<Instant, String>,
}

/// A token answer (`body`) for client id `cid`, as Ok(when) or why not.
fn token_for(
    r: Result<(Duration, String), String>,
    t0: Instant,
    cid: &str,
) -> Result<Instant, String> {
    let (d, body) = r?;
    let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
    if v["client_id"] == cid {
        Ok(t0 + d)
    } else {
        Err(format!("a token for {} instead of {cid}", v["client_id"]))
    }
}

/// p50 / p99 / max of the PATCH → token times of `runs`, and the failures.
fn std_summary(runs: &[PodRun]) -> String {
    std_summary_of(&runs.iter().collect::<Vec<_>>())
}

fn std_summary_of(runs: &[&PodRun]) -> String {
    let ok: Vec<Duration> = runs
        .iter()
        .filter_map(|r| r.token.as_ref().ok().map(|t| *t - r.patched))
        .collect();
    let failed: Vec<String> = runs
        .iter()
        .filter_map(|r| r.token.as_ref().err().cloned())
        .collect();
    summary(ok, &failed)
}

/// Where the time of sequential pods goes (medians; the object times are this process's own
/// watch, which the API server feeds as it feeds NMI's). MIC acts on the Pod object (its
/// `spec.nodeName` is set when it is created), so its part runs from the POST, beside the
/// sandbox start and the status PATCH.
fn breakdown(runs: &[PodRun], seen: &Seen) -> String {
    let seen = seen.lock().unwrap();
    let (mut c2p, mut c2o, mut o2a, mut a2t, mut c2t) = (vec![], vec![], vec![], vec![], vec![]);
    for r in runs {
        let Ok(done) = r.token else { continue };
        c2p.push(signed_ms(r.patched, r.created));
        c2t.push(signed_ms(done, r.created));
        let Some([Some(o), a]) = seen.get(&r.assigned).copied() else {
            continue;
        };
        c2o.push(signed_ms(o, r.created));
        if let Some(a) = a {
            o2a.push(signed_ms(a, o));
            a2t.push(signed_ms(done, a));
        }
    }
    format!(
        "Pod POST returned → token {:.0} ms, of which: POST → status PATCH returned {:.0} ms (sandbox, cgroup, PATCH; the \
         GET starts there); POST → AzureAssignedIdentity seen {:.0} ms (MIC: debounce from the pod event, then the sync \
         writes the object); object → seen Assigned {:.0} ms; Assigned seen → token in the pod {:.1} ms",
        median(c2t),
        median(c2p),
        median(c2o),
        median(o2a),
        median(a2t)
    )
}

/// Pods one after another on the standard node: each created, started (cgroup, sandbox),
/// its IP reported, then one GET; `(pod name, identity name, client id)` per pod.
async fn std_sequential(
    fab: &mut Fabric,
    pods: &Api<Pod>,
    ns: &[String],
    first: usize,
    which: &[(String, String, String)],
    imds: SocketAddr,
) -> Vec<PodRun> {
    let get = token_get("", true);
    let mut runs = vec![];
    for (j, (name, identity, cid)) in which.iter().enumerate() {
        let i = first + j;
        let p = pods
            .create(
                &PostParams::default(),
                &pod_object_on(name, identity, STD_NODE),
            )
            .await
            .unwrap();
        let created = Instant::now();
        pod_started(fab, &ns[i], &p.metadata.uid.unwrap());
        let sock = socket_in(&ns[i]);
        report_ip(pods, name, &pod_net_in(234, i).1).await;
        let patched = Instant::now();
        let r = timed_get_within(sock, imds, &get, patched, Duration::from_secs(120)).await;
        runs.push(PodRun {
            assigned: format!("{name}-default-{identity}"),
            created,
            patched,
            token: token_for(r, patched, cid),
        });
    }
    runs
}

async fn standard_mode(fab: &mut Fabric, cx: StdCtx<'_>) {
    let n_pods = env_u64("BENCH_PODS", 200) as usize;
    let n_seq = env_u64("BENCH_STD_PODS", n_pods as u64) as usize;
    let n_own = env_u64("BENCH_STD_OWN_PODS", 50) as usize;
    let n_burst = env_u64("BENCH_STD_BURST", n_pods as u64) as usize;
    let t_setup = Instant::now();
    let pods: Api<Pod> = Api::namespaced(cx.kube.clone(), "default");
    let imds = SocketAddr::from((IMDS, 80));

    // ---- the managed node's agent stopped and its pods deleted: MIC would otherwise take
    // every pod its bindings select (1,000 here) and place them on a node with no Node object
    if let Some(mut a) = fab.agent.take() {
        a.stop();
    }
    let on_managed = kube::api::ListParams::default().fields(&format!("spec.nodeName={NODE_NAME}"));
    pods.delete_collection(
        &kube::api::DeleteParams::default().grace_period(0),
        &on_managed,
    )
    .await
    .expect("delete the managed node's pods");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !pods.list(&on_managed).await.unwrap().items.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the managed node's pods not deleted"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // ---- Keyless: a node resource group with a scale set holding only the kubelet identity,
    // a group of identities none of which is attached anywhere; the kubelet identity gets the
    // seed's roles (Virtual Machine Contributor on the node group, Managed Identity Operator on
    // the identities' group)
    let server = fab.server.as_ref().expect("the server");
    let mc_id = server.cli(&["group", "create", "-n", "std-mc"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let ids_id = server.cli(&["group", "create", "-n", "std-ids"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, kubelet_cid) = put_identity(
        &cx.arm,
        &server.url,
        &cx.arm_token,
        &mc_id,
        "kubelet-identity",
    )
    .await;
    server.cli(&[
        "vmss",
        "create",
        "-g",
        "std-mc",
        "-n",
        "std-pool",
        "--assign-identity",
        "kubelet-identity",
    ]);
    for (role, scope) in [
        ("Virtual Machine Contributor", &mc_id),
        ("Managed Identity Operator", &ids_id),
    ] {
        server.cli(&[
            "role",
            "assignment",
            "create",
            "--role",
            role,
            "--assignee",
            &kubelet_cid,
            "--scope",
            scope,
        ]);
    }
    let join = server.cli(&["vmss", "join-token", "-g", "std-mc", "-n", "std-pool"])["joinToken"]
        .as_str()
        .unwrap()
        .to_string();
    let mut names = vec!["std-warm".to_string(), "std-one".into(), "std-burst".into()];
    names.extend((0..n_own).map(|j| format!("std-own-{j}")));
    let mut cids = BTreeMap::new();
    for n in &names {
        let (rid, cid) = put_identity(&cx.arm, &server.url, &cx.arm_token, &ids_id, n).await;
        cids.insert(n.clone(), (rid, cid));
    }
    // in Kubernetes: an AzureIdentity and a binding (selector = its name) each
    let az_ids: Api<AzureIdentity> = Api::namespaced(cx.kube.clone(), "default");
    let bindings: Api<AzureIdentityBinding> = Api::namespaced(cx.kube.clone(), "default");
    for (n, (rid, cid)) in &cids {
        let id: AzureIdentity = serde_json::from_value(json!({
            "apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentity",
            "metadata": {"name": n},
            "spec": {"type": 0, "resourceID": rid, "clientID": cid}
        }))
        .unwrap();
        az_ids
            .create(&PostParams::default(), &id)
            .await
            .expect("AzureIdentity");
        let b: AzureIdentityBinding = serde_json::from_value(json!({
            "apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentityBinding",
            "metadata": {"name": format!("{n}-binding")},
            "spec": {"azureIdentity": n, "selector": n}
        }))
        .unwrap();
        bindings
            .create(&PostParams::default(), &b)
            .await
            .expect("AzureIdentityBinding");
    }

    // ---- the standard node: namespace, agent (--operation-mode standard), Node object
    let (tag, k) = (&cx.tag, cx.k);
    let std_node = format!("{tag}m");
    let (sroot, snode) = (format!("10.231.{k}.5"), format!("10.231.{k}.6"));
    add_node(fab, &std_node, &format!("{tag}q"), &sroot, &snode);
    let state = cx.dir.join("std-node").to_string_lossy().to_string();
    let args: Vec<String> = [
        "node",
        "--server",
        &cx.agent_server_url,
        "--ca-file",
        &cx.ca,
        "--state-dir",
        &state,
        "--join-token",
        &join,
        "--imds-listen",
        &format!("{IMDS}:80"),
        "--nmi",
        "--operation-mode",
        "standard",
        "--node-name",
        STD_NODE,
        "--kubeconfig",
        &cx.kubeconfig,
        "--nmi-listen",
        &format!("{snode}:2579"),
        "--caller-rps",
        "0",
        "--caller-concurrency",
        "0",
        "--metrics-listen",
        &format!("{snode}:9465"),
    ]
    .map(String::from)
    .to_vec();
    let agent_metrics = format!("http://{snode}:9465/metrics");
    let agent = spawn_agent(&std_node, &args, cx.dir);
    let vm = agent.find("VM:").expect("the agent's VM");
    fab.procs.push(agent);
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(cx.kube.clone());
    nodes
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": STD_NODE},
                "spec": {"providerID": format!("azure://{vm}")}
            }))
            .unwrap(),
        )
        .await
        .expect("Node");

    // ---- pod namespaces on it: the warm-up pod, the sequential rows, the burst
    let total = 1 + n_seq + n_own + n_burst;
    let ns = add_pod_netns_in(fab, &format!("{tag}s"), &std_node, 234, 0, total);

    // ---- this process's own watch of the assigned identities, then MIC (one replica: it
    // holds the Lease at once), acting as the kubelet identity through this node's IMDS
    let seen: Seen = Default::default();
    let watch = tokio::spawn(watch_assigned(
        cx.watch_client.clone(),
        cx.api_url.clone(),
        cx.admin_token.clone(),
        seen.clone(),
    ));
    let exec = fabric::node_exec(&std_node);
    let mic_listen = format!("{snode}:9468");
    let mut mic_args: Vec<&str> = exec[1..].iter().map(String::as_str).collect();
    mic_args.extend([
        e2e::bin(),
        "mic",
        "--server",
        &cx.agent_server_url,
        "--ca-file",
        &cx.ca,
        "--client-id",
        &kubelet_cid,
        "--kubeconfig",
        &cx.kubeconfig,
        "--lease-namespace",
        "kube-system",
        "--holder",
        "bench-mic",
        "--metrics-listen",
        &mic_listen,
    ]);
    let mic = e2e::spawn_program_until(&exec[0], &mic_args, "MIC: caches listed", cx.dir)
        .expect("keyless mic");
    fab.procs.push(mic);
    let mic_metrics = format!("http://{mic_listen}/metrics");

    // ---- warm-up: a pod on its own identity, asked until served (MIC leading, NMI listed,
    // the first attach done); setup, so retries are fine
    let p = pods
        .create(
            &PostParams::default(),
            &pod_object_on("std-warm", "std-warm", STD_NODE),
        )
        .await
        .unwrap();
    pod_started(fab, &ns[0], &p.metadata.uid.unwrap());
    report_ip(&pods, "std-warm", &pod_net_in(234, 0).1).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    let get = token_get("", true);
    loop {
        let r = timed_get_within(
            socket_in(&ns[0]),
            imds,
            &get,
            Instant::now(),
            Duration::from_secs(120),
        )
        .await;
        match r {
            Ok(_) => break,
            Err(e) if Instant::now() > deadline => {
                panic!("standard-mode warm-up pod never got a token: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    let setup = t_setup.elapsed();

    // ---- (1) pods one after another, all bound to std-one (not attached before the first)
    let one_cid = cids["std-one"].1.clone();
    let which: Vec<(String, String, String)> = (0..n_seq)
        .map(|j| (format!("seq-{j}"), "std-one".to_string(), one_cid.clone()))
        .collect();
    let m0 = StdCounts::read(&mic_metrics, &agent_metrics).await;
    let seq = std_sequential(fab, &pods, &ns, 1, &which, imds).await;
    let m1 = StdCounts::read(&mic_metrics, &agent_metrics).await;

    // ---- (2) pods one after another, each on its own identity (an attach each)
    let which: Vec<(String, String, String)> = (0..n_own)
        .map(|j| {
            let id = format!("std-own-{j}");
            let cid = cids[&id].1.clone();
            (format!("own-{j}"), id, cid)
        })
        .collect();
    let m2 = StdCounts::read(&mic_metrics, &agent_metrics).await;
    let own = std_sequential(fab, &pods, &ns, 1 + n_seq, &which, imds).await;
    let m3 = StdCounts::read(&mic_metrics, &agent_metrics).await;

    // ---- (3) a burst: every Pod object created at once (16 POSTs in flight) on std-burst (not
    // attached), then each pod's sandbox started, its IP reported and its GET sent (not awaited)
    // one pod after another, as a kubelet reports sandboxes as they come up
    let burst_cid = cids["std-burst"].1.clone();
    let first = 1 + n_seq + n_own;
    let m4 = StdCounts::read(&mic_metrics, &agent_metrics).await;
    let t_first = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    let mut uids = vec![String::new(); n_burst];
    for j in 0..n_burst {
        let pods = pods.clone();
        set.spawn(async move {
            let p = pods
                .create(
                    &PostParams::default(),
                    &pod_object_on(&format!("burst-{j}"), "std-burst", STD_NODE),
                )
                .await
                .unwrap();
            (j, p.metadata.uid.unwrap())
        });
        while set.len() >= 16 {
            let (j, uid) = set.join_next().await.unwrap().unwrap();
            uids[j] = uid;
        }
    }
    while let Some(r) = set.join_next().await {
        let (j, uid) = r.unwrap();
        uids[j] = uid;
    }
    let objects_in = t_first.elapsed();
    let mut gets = tokio::task::JoinSet::new();
    let mut burst = vec![];
    for (j, uid) in uids.iter().enumerate() {
        let i = first + j;
        let sock = tokio::task::block_in_place(|| {
            pod_started(fab, &ns[i], uid);
            socket_in(&ns[i])
        });
        let name = format!("burst-{j}");
        report_ip(&pods, &name, &pod_net_in(234, i).1).await;
        let patched = Instant::now();
        let (get, cid) = (get.clone(), burst_cid.clone());
        gets.spawn(async move {
            let r = timed_get_within(sock, imds, &get, patched, Duration::from_secs(120)).await;
            (j, token_for(r, patched, &cid))
        });
        burst.push(PodRun {
            assigned: format!("{name}-default-std-burst"),
            created: t_first,
            patched,
            token: Err("not answered".into()),
        });
    }
    let patches_in = t_first.elapsed() - objects_in;
    while let Some(r) = gets.join_next().await {
        let (j, t) = r.unwrap();
        burst[j].token = t;
    }
    let m5 = StdCounts::read(&mic_metrics, &agent_metrics).await;
    watch.abort();
    let last = burst
        .iter()
        .filter_map(|r| r.token.as_ref().ok().copied())
        .max()
        .map(|t| (t - t_first).as_secs_f64())
        .unwrap_or(f64::NAN);
    let (first_patch, first_token) = burst
        .first()
        .map(|r| match &r.token {
            Ok(t) => (
                (r.patched - t_first).as_secs_f64() * 1e3,
                (*t - r.patched).as_secs_f64() * 1e3,
            ),
            Err(_) => (f64::NAN, f64::NAN),
        })
        .unwrap_or((f64::NAN, f64::NAN));

    // ---- report
    let first_of = |runs: &[PodRun]| match runs.first().map(|r| &r.token) {
        Some(Ok(t)) => format!("{:.0} ms", (*t - runs[0].patched).as_secs_f64() * 1e3),
        Some(Err(e)) => format!("FAILED: {e}"),
        None => "-".into(),
    };
    let p50 = |runs: &[PodRun]| {
        let mut v: Vec<Duration> = runs
            .iter()
            .filter_map(|r| r.token.as_ref().ok().map(|t| *t - r.patched))
            .collect();
        v.sort();
        (pct(&v, 50.0), pct(&v, 99.0))
    };
    let (mp50, mp99) = (pct(&cx.managed, 50.0), pct(&cx.managed, 99.0));
    println!(
        "  f. standard mode: a second node (namespace) joined to scale set std-pool, which holds only a kubelet identity (Virtual Machine \
         Contributor on its group, Managed Identity Operator on the identities' group); `keyless node --nmi --operation-mode standard`; \
         ONE `keyless mic` replica (holds the Lease; syncs debounced {} ms); the managed node's agent stopped and its pods deleted first; \
         setup {:.1} s. Status PATCH returned → token in the pod, one GET sent right after the PATCH (NMI holds it until the pod's \
         AzureAssignedIdentity is Assigned), fresh connection, no retries:",
        keyless_k8s::mic::defaults::DEBOUNCE.as_millis(),
        setup.as_secs_f64()
    );
    println!(
        "     managed mode, same run (row a: {} pods, identities attached beforehand): \
           p50 {mp50:.2} ms, p99 {mp99:.2} ms",
        cx.managed.len()
    );
    let (s50, s99) = p50(&seq);
    println!(
        "     standard, {n_seq} pods one after another, one identity attached by the first: {}; first pod {}; \
         p50/p99 vs managed ×{:.0}/×{:.0}; {}",
        std_summary(&seq),
        first_of(&seq),
        s50 / mp50,
        s99 / mp99,
        m0.until(m1)
    );
    println!("        where it goes (p50): {}", breakdown(&seq, &seen));
    println!(
        "     standard, {n_own} pods one after another, each its own identity (an attach each): {}; {}",
        std_summary(&own),
        m2.until(m3)
    );
    println!("        where it goes (p50): {}", breakdown(&own, &seen));
    // the burst's pods whose object was Assigned before their PATCH returned (MIC works from
    // the POST) and those whose GET waited for it
    let (pre, waited): (Vec<&PodRun>, Vec<&PodRun>) = {
        let seen = seen.lock().unwrap();
        burst.iter().partition(|r| {
            seen.get(&r.assigned)
                .and_then(|e| e[1])
                .is_some_and(|a| a <= r.patched)
        })
    };
    println!(
        "     standard, {n_burst} pods at once on one identity not yet attached (objects POSTed in {:.2} s, then sandboxes + status \
         PATCHes one after another over {:.2} s): {}; the first pod PATCHed {:.0} ms after the first POST, served {:.0} ms after its \
         PATCH; all served {:.2} s after the first POST; {}",
        objects_in.as_secs_f64(),
        patches_in.as_secs_f64(),
        std_summary(&burst),
        first_patch,
        first_token,
        last,
        m4.until(m5)
    );
    println!(
        "        of which {} pods were already Assigned when their PATCH returned: {}; {} pods waited for MIC: {}",
        pre.len(),
        std_summary_of(&pre),
        waited.len(),
        std_summary_of(&waited)
    );
}
