"""Workload identity federation: federated identity credentials on a user-assigned identity and
the token exchange, with the real python WorkloadIdentityCredential / DefaultAzureCredential and
a test OIDC issuer (idp.py) minting Kubernetes- and CI-style tokens."""
import json
import os
import pathlib
import shutil
import ssl
import subprocess
import tempfile
import urllib.parse
import urllib.request

import pytest

from conftest import audit_records, keyless_bin, run_client, start_up, wait_audit
from idp import OidcIssuer

ARM = "https://management.azure.com"
K8S_SUB = "system:serviceaccount:default:workload"
GH_SUB = "repo:org/repo:environment:production"


@pytest.fixture(scope="module")
def fed():
    d = tempfile.mkdtemp(prefix="keyless-fed-")
    idp = OidcIssuer(d)
    up = start_up(os.path.join(d, "data"), extra=("--issuer-ca-file", idp.ca_path))
    env = {**os.environ, "KEYLESS_DATA_DIR": os.path.join(d, "data"), "KEYLESS_CLIENT_SECRET": up.admin_secret}
    for name, issuer, sub in (("k8s-workload", idp.issuer("k8s"), K8S_SUB), ("gh-prod", idp.issuer("gh"), GH_SUB)):
        out = subprocess.run([keyless_bin(), "identity", "federated-credential", "create", "-g", "keyless",
                              "--identity-name", "keyless-demo", "-n", name, "--issuer", issuer, "--subject", sub],
                             env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
    yield up, idp, d, env
    up.stop()
    idp.stop()
    shutil.rmtree(d, ignore_errors=True)


def wi_env(up, token_file):
    return {"AZURE_AUTHORITY_HOST": up.info["serverUrl"], "AZURE_TENANT_ID": up.info["tenantId"],
            "AZURE_CLIENT_ID": up.info["demoIdentity"]["clientId"], "AZURE_FEDERATED_TOKEN_FILE": token_file,
            "REQUESTS_CA_BUNDLE": up.info["caFile"]}


def verify(up):
    return {"authority": up.authority, "ca": up.info["caFile"], "audience": ARM}


def write(d, name, token):
    p = os.path.join(d, name)
    with open(p, "w") as f:
        f.write(token)
    return p


@pytest.mark.parametrize("credential", ["wi", "dac"])
def test_kubernetes_service_account_token_exchange(fed, credential):
    up, idp, d, _ = fed
    token_file = write(d, f"k8s-{credential}", idp.mint("k8s", K8S_SUB))
    out = run_client({"credential": credential, "scope": ARM + "/.default", "verify": verify(up)}, wi_env(up, token_file))
    assert "error" not in out, out
    demo = up.info["demoIdentity"]
    assert out["claims"]["oid"] == demo["principalId"]
    assert out["claims"]["appid"] == demo["clientId"]
    assert out["claims"]["xms_mirid"] == demo["resourceId"].replace("/resourceGroups/", "/resourcegroups/", 1)
    wait_audit(pathlib.Path(up.data_dir) / "audit.log", "the exchange", lambda r: r.get("surface") == "sts"
               and r["kind"] == "federated" and r["outcome"] == "issued" and r["caller"].get("subject") == K8S_SUB
               and r["caller"].get("issuer") == idp.issuer("k8s") and r["identity"]["clientId"] == demo["clientId"])


def test_ci_token_signed_with_es256(fed):
    up, idp, d, _ = fed
    token_file = write(d, "gh", idp.mint("gh", GH_SUB, kid="ec1"))
    out = run_client({"credential": "wi", "scope": ARM + "/.default", "verify": verify(up)}, wi_env(up, token_file))
    assert "error" not in out, out
    assert out["claims"]["oid"] == up.info["demoIdentity"]["principalId"]


def exchange(up, assertion, client_id=None):
    form = urllib.parse.urlencode({
        "grant_type": "client_credentials", "client_id": client_id or up.info["demoIdentity"]["clientId"],
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": assertion, "scope": ARM + "/.default"}).encode()
    req = urllib.request.Request(f"{up.authority}/oauth2/v2.0/token", data=form)
    ctx = ssl.create_default_context(cafile=up.info["caFile"])
    try:
        with urllib.request.urlopen(req, context=ctx) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def test_refusals_carry_entra_codes(fed):
    up, idp, _, _ = fed
    cases = [
        (idp.mint("k8s", "system:serviceaccount:default:other"), 401, 700213),
        (idp.mint("k8s", "SYSTEM:serviceaccount:default:workload"), 401, 700213),
        (idp.mint("k8s", K8S_SUB, aud="api://other"), 401, 700212),
        (idp.mint("k8s", K8S_SUB, lifetime=-600), 401, 700024),
        (idp.mint("k8s", K8S_SUB, nbf_offset=3600), 401, 700024),
        (idp.mint("k8s", K8S_SUB, key=idp.rogue), 401, 700027),
        ("not.a.jwt", 400, 50027),
        ("garbage", 400, 50027),
    ]
    audit = pathlib.Path(up.data_dir) / "audit.log"
    for assertion, status, code in cases:
        before = len(audit_records(audit))
        st, body = exchange(up, assertion)
        assert (st, body.get("error_codes")) == (status, [code]), body
        assert body["error_description"].startswith(f"AADSTS{code}:")
        # recorded as a federated refusal: the identity, and who vouched (issuer, subject) only
        # once the assertion's signature verified (before that its claims are anyone's words)
        import jwt as pyjwt
        try:
            claimed = pyjwt.decode(assertion, options={"verify_signature": False})
        except pyjwt.PyJWTError:
            claimed = {}
        wait_audit(audit, f"AADSTS{code}", lambda r: r["seq"] > before and r.get("surface") == "sts"
                   and r["kind"] == "federated" and r["outcome"] == "refused" and r["status"] == status
                   and r["reason"] == f"AADSTS{code}"
                   and r["caller"]["clientId"] == up.info["demoIdentity"]["clientId"]
                   and ((r["caller"].get("issuer"), r["caller"].get("subject"))
                        == ((claimed.get("iss"), claimed.get("sub"))
                            if r["caller"].get("assertionVerified") else (None, None))))
        assert assertion not in audit.read_text(), "the assertion in the audit file"
    # an issuer the identity does not trust (trailing slash matters)
    tok = idp.mint("k8s", K8S_SUB)
    import jwt as pyjwt
    claims = pyjwt.decode(tok, options={"verify_signature": False})
    claims["iss"] = claims["iss"].rstrip("/")
    st, body = exchange(up, pyjwt.encode(claims, idp.keys["rsa1"], algorithm="RS256", headers={"kid": "rsa1"}))
    assert (st, body["error_codes"]) == (401, [700211]), body
    # the right token for an unknown client id
    st, body = exchange(up, tok, client_id="00000000-0000-0000-0000-000000000000")
    assert (st, body["error_codes"]) == (400, [700016]), body
    # a token from Keyless itself cannot be exchanged
    own = run_client({"credential": "mi", "scope": ARM + "/.default"}, {"AZURE_POD_IDENTITY_AUTHORITY_HOST": up.info["imdsUrl"]})
    st, body = exchange(up, own["token"])
    assert (st, body["error_codes"]) == (400, [700222]), body


def arm(up, env, method, path, body=None):
    from azure.identity import ClientSecretCredential

    cred = ClientSecretCredential(up.info["tenantId"], up.info["adminClientId"], env["KEYLESS_CLIENT_SECRET"],
                                  authority=up.info["serverUrl"], disable_instance_discovery=True,
                                  connection_verify=up.info["caFile"])
    tok = cred.get_token(ARM + "/.default").token
    req = urllib.request.Request(up.info["serverUrl"] + path, method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Authorization": f"Bearer {tok}", "Content-Type": "application/json"})
    ctx = ssl.create_default_context(cafile=up.info["caFile"])
    try:
        with urllib.request.urlopen(req, context=ctx) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def test_unknown_kid_unreachable_issuer_and_deleted_fic(fed):
    up, idp, d, env = fed
    # a kid the issuer does not publish, even after the JWKS is fetched again
    st, body = exchange(up, idp.mint("k8s", K8S_SUB, kid="rsa-unknown", key=idp.rogue))
    assert (st, body["error_codes"]) == (401, [700027]), body
    # a FIC whose issuer cannot be reached
    base = up.info["demoIdentity"]["resourceId"] + "/federatedIdentityCredentials"
    v = "?api-version=2023-01-31"
    dead = "https://localhost:9/dead"
    st, _ = arm(up, env, "PUT", f"{base}/dead-issuer{v}",
                {"properties": {"issuer": dead, "subject": "s", "audiences": ["api://AzureADTokenExchange"]}})
    assert st == 201
    import jwt as pyjwt
    import time
    now = int(time.time())
    tok = pyjwt.encode({"iss": dead, "sub": "s", "aud": "api://AzureADTokenExchange", "iat": now, "nbf": now, "exp": now + 600},
                       idp.keys["rsa1"], algorithm="RS256", headers={"kid": "rsa1"})
    st, body = exchange(up, tok)
    assert (st, body["error_codes"]) == (400, [50166]), body
    arm(up, env, "DELETE", f"{base}/dead-issuer{v}")
    # exchange works, the FIC is deleted, the next exchange fails
    st, _ = arm(up, env, "PUT", f"{base}/short-lived{v}",
                {"properties": {"issuer": idp.issuer("gh"), "subject": "repo:org/other:ref:refs/heads/main",
                                "audiences": ["api://AzureADTokenExchange"]}})
    assert st == 201
    tok = idp.mint("gh", "repo:org/other:ref:refs/heads/main")
    st, body = exchange(up, tok)
    assert st == 200, body
    assert isinstance(body["expires_in"], int)
    st, _ = arm(up, env, "DELETE", f"{base}/short-lived{v}")
    assert st == 200
    st, body = exchange(up, tok)
    assert (st, body["error_codes"]) == (401, [700213]), body


def test_node_workload_identity_credential(fed):
    from test_node_identity import NODE_CLIENT, node_modules

    up, idp, d, _ = fed
    nm = node_modules()
    token_file = write(d, "k8s-node", idp.mint("k8s", K8S_SUB))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tempfile.gettempdir(), "KEYLESS_NODE_MODULES": nm,
           "NODE_EXTRA_CA_CERTS": up.info["caFile"], **{k: v for k, v in wi_env(up, token_file).items() if k != "REQUESTS_CA_BUNDLE"}}
    # Client behaviour, recorded: @azure/identity 4.14.1's WorkloadIdentityCredential asks
    # login.microsoftonline.com for instance discovery unless `disableInstanceDiscovery: true`
    # (the option exists on both credentials).
    for credential in ("wi", "dac"):
        args = {"credential": credential, "options": {"disableInstanceDiscovery": True}, "scope": ARM + "/.default",
                "verify": verify(up)}
        out = subprocess.run([shutil.which("node") or "node", str(NODE_CLIENT), json.dumps(args)],
                             env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        got = json.loads(out.stdout.strip().splitlines()[-1])
        assert got.get("verified"), got
        assert got["claims"]["oid"] == up.info["demoIdentity"]["principalId"]


def test_fic_rules(fed):
    up, idp, _, env = fed
    base = up.info["demoIdentity"]["resourceId"] + "/federatedIdentityCredentials"
    v = "?api-version=2023-01-31"
    good = {"properties": {"issuer": "https://issuer.example", "subject": "s", "audiences": ["api://AzureADTokenExchange"]}}
    bad = [
        ("ab", good),
        ("two-auds", {"properties": {**good["properties"], "audiences": ["a", "b"]}}),
        ("no-aud", {"properties": {**good["properties"], "audiences": []}}),
        ("wild", {"properties": {**good["properties"], "subject": "repo:org/*"}}),
        ("plain-http", {"properties": {**good["properties"], "issuer": "http://issuer.example"}}),
        ("long-subject", {"properties": {**good["properties"], "subject": "x" * 601}}),
        ("dup", {"properties": {"issuer": idp.issuer("k8s"), "subject": K8S_SUB, "audiences": ["api://AzureADTokenExchange"]}}),
    ]
    for name, body in bad:
        st, resp = arm(up, env, "PUT", f"{base}/{name}{v}", body)
        assert st == 400, (name, resp)
    st, listed = arm(up, env, "GET", base + v)
    assert sorted(f["name"] for f in listed["value"]) == ["gh-prod", "k8s-workload"]
    # at most 20 per identity
    for i in range(18):
        st, _ = arm(up, env, "PUT", f"{base}/extra-{i}{v}", {"properties": {**good["properties"], "subject": f"s{i}"}})
        assert st == 201
    st, resp = arm(up, env, "PUT", f"{base}/one-too-many{v}", {"properties": {**good["properties"], "subject": "s99"}})
    assert st == 400 and "at most 20" in resp["error"]["message"], resp
    st, got = arm(up, env, "GET", f"{base}/k8s-workload{v}")
    assert got["properties"]["subject"] == K8S_SUB
    assert got["type"] == "Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentials"
    for i in range(18):
        st, _ = arm(up, env, "DELETE", f"{base}/extra-{i}{v}")
        assert st == 200
    # api-versions before federated credentials existed do not have them
    st, _ = arm(up, env, "GET", base + "?api-version=2018-11-30")
    assert st == 404


def self_signed(d, name):
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    both = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()) + cert_pem
    cert_path, both_path = os.path.join(d, f"{name}-cert.pem"), os.path.join(d, f"{name}.pem")
    open(cert_path, "wb").write(cert_pem)
    open(both_path, "wb").write(both)
    return cert_path, both_path


def test_registered_app_with_secret_and_certificate(fed):
    import sys

    up, _, d, env = fed
    cert, both = self_signed(d, "app1")
    _, other = self_signed(d, "not-registered")
    out = subprocess.run([keyless_bin(), "app", "create", "--display-name", "app1", "--cert-file", cert],
                         env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    app = json.loads(out.stdout)
    assert app["tenant"] == up.info["tenantId"] and app["password"]
    client_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tempfile.gettempdir(),
                  "REQUESTS_CA_BUNDLE": up.info["caFile"], "SSL_CERT_FILE": up.info["caFile"]}
    here = os.path.dirname(os.path.abspath(__file__))

    def get(kind, **extra):
        args = {"kind": kind, "authority": up.info["serverUrl"], "tenant": up.info["tenantId"],
                "client_id": app["appId"], "scope": "api://resource/.default", **extra}
        r = subprocess.run([sys.executable, os.path.join(here, "app_client.py"), json.dumps(args)], env=client_env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout.strip().splitlines()[-1])

    import jwt as pyjwt
    for kind, extra in (("secret", {"secret": app["password"]}), ("cert", {"certificate_path": both}),
                        ("cert_async", {"certificate_path": both})):
        got = get(kind, **extra)
        assert "token" in got, (kind, got)
        claims = pyjwt.decode(got["token"], options={"verify_signature": False})
        assert claims["appid"] == app["appId"] and claims["oid"] == app["objectId"], kind
        assert claims["aud"] == "api://resource"
    # a certificate that is not registered, and a wrong secret
    got = get("cert", certificate_path=other)
    assert "AADSTS700027" in got.get("message", ""), got
    got = get("cert_async", certificate_path=other)
    assert "AADSTS700027" in got.get("message", ""), got
    got = get("secret", secret="wrong")
    assert "AADSTS7000215" in got.get("message", ""), got


def test_unknown_kids_do_not_refetch_the_issuer_each_time(fed):
    # forged assertions with kids the issuer does not publish, one after another and 16 at
    # once: each is refused 401 AADSTS700027 as before, and the issuer's discovery document and
    # JWKS are fetched again at most once (one per issuer per interval, shared by concurrent
    # requests) instead of once per assertion
    from concurrent.futures import ThreadPoolExecutor
    up, idp, d, _ = fed
    jwks_path = "/k8s/jwks"
    before = idp.fetches.get(jwks_path, 0), idp.fetches.get("/k8s/.well-known/openid-configuration", 0)

    def forged(i):
        return exchange(up, idp.mint("k8s", K8S_SUB, kid=f"rsa-unknown-{i}", key=idp.rogue))

    answers = [forged(i) for i in range(8)]
    with ThreadPoolExecutor(16) as pool:
        answers += list(pool.map(forged, range(100, 116)))
    for st, body in answers:
        assert (st, body["error_codes"]) == (401, [700027]), body
    after = idp.fetches.get(jwks_path, 0), idp.fetches.get("/k8s/.well-known/openid-configuration", 0)
    assert after[0] - before[0] <= 1, (before, after)
    assert after[1] - before[1] <= 1, (before, after)
    # a genuine assertion with a known kid still exchanges (from the cache)
    st, body = exchange(up, idp.mint("k8s", K8S_SUB))
    assert st == 200, body
