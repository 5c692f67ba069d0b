"""The real Azure CLI (`azure-cli` from PyPI, its own venv: scripts/test installs it into
$KEYLESS_CACHE/az) pointed at a `keyless up` as a custom cloud.

Each `AzCli` has its own AZURE_CONFIG_DIR (profile, token cache, clouds), trusts only the
Keyless CA, and sends anything not addressed to loopback to a dead proxy, so a call az makes to
the internet fails at once instead of leaving the test (the surprises are in README "az").
"""
import json
import os
import pathlib
import subprocess
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[2]


def az_bin():
    b = os.environ.get("KEYLESS_AZ")
    if b:
        return b
    cache = os.environ.get("KEYLESS_CACHE", str(ROOT / ".cache"))
    return str(pathlib.Path(cache) / "az" / "bin" / "az")


class AzError(AssertionError):
    def __init__(self, args, proc):
        self.returncode = proc.returncode
        self.stderr = proc.stderr
        super().__init__(f"az {' '.join(args)} exited {proc.returncode}: {proc.stderr[-3000:]}")


class AzCli:
    """`az` logged in to a Keyless server as a service principal."""

    def __init__(self, up, workdir):
        self.up = up
        self.dir = pathlib.Path(workdir)
        (self.dir / "config").mkdir(parents=True, exist_ok=True)
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.dir),
            "AZURE_CONFIG_DIR": str(self.dir / "config"),
            "AZURE_EXTENSION_DIR": str(self.dir / "extensions"),
            # the server's certificate chains to the Keyless CA only
            "REQUESTS_CA_BUNDLE": up.info["caFile"],
            # MSAL validates a non-Microsoft authority against login.microsoftonline.com
            # unless instance discovery is off (the Azure Stack setting)
            "AZURE_CORE_INSTANCE_DISCOVERY": "false",
            "AZURE_CORE_COLLECT_TELEMETRY": "false",
            "AZURE_CORE_SURVEY_MESSAGE": "false",
            "AZURE_CORE_NO_COLOR": "true",
            "AZURE_CORE_OUTPUT": "json",
            # nothing leaves the machine: the internet is a closed port
            "HTTPS_PROXY": "http://127.0.0.1:9",
            "HTTP_PROXY": "http://127.0.0.1:9",
            "NO_PROXY": "127.0.0.1,localhost",
        }

    def run(self, *args, check=True, timeout=180):
        proc = subprocess.run([az_bin(), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=self.dir)
        if check and proc.returncode != 0:
            raise AzError(args, proc)
        return proc

    def __call__(self, *args, check=True):
        """Run `az …` and parse its JSON output (None when it printed nothing)."""
        proc = self.run(*args, check=check)
        out = proc.stdout.strip()
        return json.loads(out) if out else None

    def login(self, cloud="Keyless"):
        """Register the server as a cloud (endpoints discovered from its ARM metadata), select
        it and log in with the bootstrap admin service principal."""
        info = self.up.info
        self.run("cloud", "register", "-n", cloud, "--endpoint-resource-manager", info["serverUrl"])
        self.run("cloud", "set", "-n", cloud)
        return self("login", "--service-principal", "-u", info["adminClientId"],
                    f"--password={self.up.admin_secret}", "--tenant", info["tenantId"])


def new_az(up):
    return AzCli(up, tempfile.mkdtemp(prefix="keyless-az-"))
