"""A real Kubernetes control plane (etcd + kube-apiserver from ../shared/k8s) and the network
plumbing a kubelet and a CNI plugin would do, for the pod-identity tests.

- `ControlPlane`: start-control-plane.sh (path: $KEYLESS_K8S_DIR, else <repo>/../shared/k8s;
  its binaries follow $KUBEBUILDER_ASSETS as the script documents) with the API server bound to
  every address so node namespaces reach it as `https://kubernetes:<port>`; `kubectl` wrapper.
- `NodeNs`: a network namespace with a veth to the root namespace (the server and the API server
  are reached at the root side's address), 169.254.169.254 on its loopback for the host agent,
  forwarding on, `/etc/netns/<ns>/hosts` naming `kubernetes`. Its processes (the host agent with
  NMI) start with `nsenter --net` in a private mount namespace with that hosts file bound over
  `/etc/hosts`: `ip netns exec` would mount a fresh `/sys`, hiding `/sys/fs/cgroup`, which NMI's
  caller attestation reads.
- `PodNs`: a network namespace with a veth into its node's namespace, the pod IP on it, the
  default route via the node: what a CNI plugin sets up before the kubelet reports `podIP`; and,
  given the Pod's UID, the pod's cgroup as the kubelet names it (systemd driver, BestEffort:
  `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice`, one container
  scope in it) in a writable hierarchy of this machine (`cgroup_hierarchy`). Its processes
  (`prefix()`) run in that cgroup, then in the namespace.
"""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]


def sh(*args, check=True, **kw):
    return subprocess.run([str(a) for a in args], check=check, capture_output=True, text=True, **kw)


def k8s_script():
    d = os.environ.get("KEYLESS_K8S_DIR") or str(ROOT.parent / "shared" / "k8s")
    s = pathlib.Path(d) / "start-control-plane.sh"
    return s if s.exists() else None


_HIERARCHY = []


def cgroup_hierarchy():
    """A writable cgroup hierarchy for pod cgroups: /sys/fs/cgroup when it is cgroup v2, else its
    `unified` (cgroup v2 of the hybrid layout) or `pids` hierarchy; None when there is none."""
    if not _HIERARCHY:
        root = pathlib.Path("/sys/fs/cgroup")
        found = None
        for h in (root, root / "unified", root / "pids"):
            if not (h / "cgroup.procs").exists():
                continue
            probe = h / f"keyless-probe-{os.getpid()}"
            try:
                probe.mkdir()
                probe.rmdir()
                found = h
                break
            except OSError:
                continue
        _HIERARCHY.append(found)
    return _HIERARCHY[0]


def can_run_fabric():
    return (os.geteuid() == 0 and shutil.which("ip") and shutil.which("iptables") and shutil.which("etcd")
            and shutil.which("kubectl") and shutil.which("nsenter") and shutil.which("unshare")
            and k8s_script() is not None and cgroup_hierarchy() is not None)


class ControlPlane:
    def __init__(self, workdir, extra_args=()):
        self.dir = pathlib.Path(workdir) / "k8s"
        env = dict(os.environ, OWNER_PID=str(os.getpid()),
                   KUBE_APISERVER_EXTRA_ARGS=" ".join(["--bind-address=0.0.0.0", *extra_args]))
        out = subprocess.run([str(k8s_script()), str(self.dir)], env=env, capture_output=True, text=True, timeout=180)
        if out.returncode != 0:
            raise RuntimeError(f"control plane did not start: {out.stderr[-3000:]}")
        self.env = dict(l.split("=", 1) for l in out.stdout.splitlines() if "=" in l)
        self.port = self.env["K8S_API_PORT"]
        self.kubeconfig = self.env["KUBECONFIG"]

    def node_kubeconfig(self, path):
        """The admin kubeconfig, pointing at `https://kubernetes:<port>` (a name the serving
        certificate carries), for processes in node namespaces."""
        text = pathlib.Path(self.kubeconfig).read_text()
        text = text.replace(f"https://127.0.0.1:{self.port}", f"https://kubernetes:{self.port}")
        pathlib.Path(path).write_text(text)
        return str(path)

    def kubectl(self, *args, input=None, check=True):
        out = subprocess.run(["kubectl", "--kubeconfig", self.kubeconfig, *args], input=input,
                             capture_output=True, text=True, timeout=60)
        if check and out.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)}: {out.stderr}")
        return out

    def apply(self, obj):
        return self.kubectl("apply", "-f", "-", input=json.dumps(obj))

    def get(self, *args):
        out = self.kubectl("get", *args, "-o", "json", check=False)
        return json.loads(out.stdout) if out.returncode == 0 else None

    def rotate_signing_key(self):
        """Restart kube-apiserver with a new service-account signing key, as an operator rotating
        it does: the new key signs, the old and new public keys both verify (the overlap). etcd
        keeps running, so every object stays. Returns the new key's path."""
        env_file = self.dir / "env"
        pid = int(self.env["KUBE_APISERVER_PID"])
        argv = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
        n = len(list(self.dir.glob("sa-rotated-*.key"))) + 1
        key, pub = self.dir / f"sa-rotated-{n}.key", self.dir / f"sa-rotated-{n}.pub"
        subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True)
        subprocess.run(["openssl", "rsa", "-in", str(key), "-pubout", "-out", str(pub)], check=True,
                       capture_output=True)
        args = []
        for a in (x.decode() for x in argv):
            if a.startswith("--service-account-signing-key-file="):
                a = f"--service-account-signing-key-file={key}"
            elif a.startswith("--service-account-key-file="):
                # old keys still verify: the previous signing key stays listed
                args.append(a)
                a = f"--service-account-key-file={pub}"
            args.append(a)
        os.kill(pid, signal.SIGTERM)
        deadline = time.time() + 20
        while pathlib.Path(f"/proc/{pid}").exists() and time.time() < deadline:
            time.sleep(0.1)
        log = open(self.dir / f"kube-apiserver-{n}.log", "w")
        p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        self.env["KUBE_APISERVER_PID"] = str(p.pid)
        text = env_file.read_text()
        env_file.write_text("\n".join(f"KUBE_APISERVER_PID={p.pid}" if l.startswith("KUBE_APISERVER_PID=") else l
                                      for l in text.splitlines()) + "\n")
        token = (self.dir / "admin.token").read_text().strip()
        deadline = time.time() + 60
        while time.time() < deadline:
            out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "2",
                                  "--cacert", str(self.dir / "ca.pem"), "-H", f"Authorization: Bearer {token}",
                                  f"https://127.0.0.1:{self.port}/readyz"], capture_output=True, text=True)
            if out.stdout == "200":
                return key
            if p.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError("kube-apiserver did not come back after the key rotation")

    def request(self, method, path, body=None):
        """One API call as the admin (for what kubectl cannot say, e.g. the TokenRequest API)."""
        import ssl
        import urllib.request
        token = (self.dir / "admin.token").read_text().strip()
        ctx = ssl.create_default_context(cafile=str(self.dir / "ca.pem"))
        req = urllib.request.Request(f"https://127.0.0.1:{self.port}{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, context=ctx, timeout=30) as r:
            return json.load(r)

    def stop(self):
        subprocess.run([str(k8s_script()), "stop", str(self.dir)], capture_output=True, timeout=60)


class NodeNs:
    """A Kubernetes node: a network namespace holding a host agent (IMDS at 169.254.169.254:80,
    NMI at <ns_ip>:2579) and the pods' veths."""

    def __init__(self, i, uid):
        self.i = i
        self.ns = f"kpn{i}{uid}"
        b = int(uid[:2], 16)
        self.host_ip = f"10.{210 + i}.{b}.1"
        self.ns_ip = f"10.{210 + i}.{b}.2"
        self.pod_net = f"10.{220 + i}.{b}"
        self.veth = (f"kh{i}{uid}"[:15], f"kn{i}{uid}"[:15])
        self.pods = 0
        sh("ip", "netns", "add", self.ns)
        sh("ip", "link", "add", self.veth[0], "type", "veth", "peer", "name", self.veth[1])
        sh("ip", "link", "set", self.veth[1], "netns", self.ns)
        sh("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.veth[0])
        sh("ip", "link", "set", self.veth[0], "up")
        sh("ip", "route", "add", f"{self.pod_net}.0/24", "via", self.ns_ip)
        self.run("ip", "addr", "add", f"{self.ns_ip}/30", "dev", self.veth[1])
        self.run("ip", "link", "set", self.veth[1], "up")
        self.run("ip", "link", "set", "lo", "up")
        self.run("ip", "addr", "add", "169.254.169.254/32", "dev", "lo")
        self.run("ip", "route", "add", "default", "via", self.host_ip)
        self.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        os.makedirs(f"/etc/netns/{self.ns}", exist_ok=True)
        pathlib.Path(f"/etc/netns/{self.ns}/hosts").write_text(
            f"127.0.0.1 localhost\n{self.host_ip} kubernetes\n")

    def prefix(self):
        # `ip netns exec` without its fresh /sys: the network namespace only, /etc/hosts from
        # /etc/netns/<ns>/hosts in a private mount namespace; every program execs the next
        return ("unshare", "--mount", "--propagation", "private", "sh", "-c",
                'if [ -e "/etc/netns/$0/hosts" ]; then mount --bind "/etc/netns/$0/hosts" /etc/hosts || exit 1; fi; '
                'exec nsenter --net="/run/netns/$0" "$@"',
                self.ns)

    def run(self, *args, check=True):
        return sh(*self.prefix(), *args, check=check)

    def nat_rules(self):
        return self.run("iptables", "-t", "nat", "-S", check=False).stdout

    def destroy(self):
        subprocess.run(["ip", "route", "del", f"{self.pod_net}.0/24"], capture_output=True)
        subprocess.run(["ip", "link", "del", self.veth[0]], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
        shutil.rmtree(f"/etc/netns/{self.ns}", ignore_errors=True)


class PodCgroup:
    """A pod's cgroup as the kubelet (systemd driver, BestEffort) and containerd make it. Removing
    it kills (by PID) what is left inside, then removes the pod's directories (the shared parent
    slices stay: other tests' pods may be in them)."""

    def __init__(self, pod_uid):
        u = pod_uid.replace("-", "_")
        self.pod = (cgroup_hierarchy() / "kubepods.slice" / "kubepods-besteffort.slice"
                    / f"kubepods-besteffort-pod{u}.slice")
        self.container = self.pod / f"cri-containerd-{pod_uid.replace('-', '')}.scope"
        self.container.mkdir(parents=True, exist_ok=True)
        self.procs = self.container / "cgroup.procs"

    def prefix(self):
        """Run the rest as a process of the pod: the shell writes its PID, then execs."""
        return ("sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.procs))

    def pids(self):
        out = []
        for d in (self.pod, self.container):
            try:
                out += [int(l) for l in (d / "cgroup.procs").read_text().split()]
            except OSError:
                pass
        return out

    def destroy(self):
        deadline = time.time() + 5
        while self.pids() and time.time() < deadline:
            for p in self.pids():
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.02)
        for d in (self.container, self.pod):
            try:
                d.rmdir()
            except OSError:
                pass


class PodNs:
    """The network side of one pod: its IP (/32, `.n+1` of the node's pod /24 for its n-th pod,
    up to 253 pods a node) on a veth into its node, whose node side holds the gateway `.1` (the
    same on every pod's veth, as Calico does), default route via it; with `pod_uid` (the Pod's
    metadata.uid), its cgroup. What a constructor that fails half way made is removed."""

    def __init__(self, node, uid, ip_override=None, pod_uid=None):
        node.pods += 1
        n = node.pods
        if n > 253:
            raise ValueError(f"node {node.ns}: at most 253 pods")
        self.node = node
        self.ns = f"kpp{node.i}{n}{uid}"[:15]
        self.gw = f"{node.pod_net}.1"
        self.ip = ip_override or f"{node.pod_net}.{n + 1}"
        self.veth = (f"pn{node.i}{n}{uid}"[:15], f"pp{node.i}{n}{uid}"[:15])
        self.cgroup = None
        try:
            self.cgroup = PodCgroup(pod_uid) if pod_uid else None
            sh("ip", "netns", "add", self.ns)
            node.run("ip", "link", "add", self.veth[0], "type", "veth", "peer", "name", self.veth[1])
            node.run("ip", "link", "set", self.veth[1], "netns", self.ns)
            node.run("ip", "addr", "add", f"{self.gw}/32", "dev", self.veth[0])
            node.run("ip", "link", "set", self.veth[0], "up")
            node.run("ip", "route", "add", f"{self.ip}/32", "dev", self.veth[0])
            ip = ("ip", "-n", self.ns)
            sh(*ip, "link", "set", "lo", "up")
            sh(*ip, "addr", "add", f"{self.ip}/32", "dev", self.veth[1])
            sh(*ip, "link", "set", self.veth[1], "up")
            sh(*ip, "route", "add", f"{self.gw}/32", "dev", self.veth[1])
            sh(*ip, "route", "add", "default", "via", self.gw)
        except BaseException:
            self.destroy()
            raise

    def prefix(self):
        """Run the rest as a process of the pod: in its cgroup (when it has one), then in its
        network namespace."""
        cg = self.cgroup.prefix() if self.cgroup else ()
        return (*cg, "ip", "netns", "exec", self.ns)

    def run(self, *args, check=True):
        return sh(*self.prefix(), *args, check=check)

    def curl(self, path, headers=("Metadata: true",)):
        """GET http://169.254.169.254<path> from inside the pod: (status, body)."""
        args = ["curl", "-s", "-m", "10", "-o", "-", "-w", "\n%{http_code}"]
        for h in headers:
            args += ["-H", h]
        out = self.run(*args, f"http://169.254.169.254{path}", check=False)
        body, _, code = out.stdout.rpartition("\n")
        return int(code or 0), body

    def destroy(self):
        if self.cgroup:
            self.cgroup.destroy()
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)


def pod_manifest(name, namespace, node, labels=None):
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
        "spec": {"nodeName": node, "containers": [{"name": "demo", "image": "mcr.microsoft.com/oss/azure/aad-pod-identity/demo:v1.6.3"}]},
    }


class Proc:
    """A long-running process started with a marker line on stdout."""

    def __init__(self, cmd, marker, log_path, timeout=90, env=None):
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        self.lines = []
        deadline = time.time() + timeout
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{cmd[:6]} exited: {self.lines} {pathlib.Path(log_path).read_text()[-3000:]}")
                continue
            self.lines.append(line.rstrip("\n"))
            if marker in line:
                return
        self.stop()
        raise RuntimeError(f"{cmd[:6]} did not print {marker!r}: {self.lines}")

    def find(self, prefix):
        for l in self.lines:
            if l.startswith(prefix):
                return l[len(prefix):].strip()
        return None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
