"""Node Key Vault conformance: the real, unmodified `@azure/keyvault-secrets` 4.11.2,
`@azure/keyvault-certificates` 4.10.3 and `@azure/keyvault-keys` 4.10.2 packages, with default
client options (challenge-resource verification ON), authenticated by `@azure/identity`
`ManagedIdentityCredential` through the Keyless host agent, against a `keyless up --dev-clock` vault
served at https://{vault}.vault.localhost:{port} with the Keyless CA trusted via NODE_EXTRA_CA_CERTS.

What it proves (each test has its own vault; node does the work in conformance/node/keyvault.mjs
and reports what it observed, this file asserts on it):
* secrets: set (contentType, tags) / get latest + by version / disable → 403 / re-enable / list with
  paging past 25 and byPage({maxPageSize: 10}) / versions / delete poller → deleted → 409 on reuse →
  recover poller → purge (204) → 404; backup → 409 on restore over a live name → restore after purge;
* certificates: create (Self, RSA, PKCS#12 → loadable by node tls) and (Keyless CA, EC P-256, PEM with
  SANs → leaf verifies against the Keyless CA), import of raw PEM text (issuer "Unknown"),
  policy update of lifetime actions, list / versions, delete poller → deleted → recover poller;
* AutoRenew: a 1-month "Keyless" certificate renews 7 days before expiry when the dev clock moves 25
  days — a second version appears and the unversioned secret serves the new certificate;
* keys: RSA/EC create, sign/verify RS256 and ES256 (checked with node:crypto too), RSA-OAEP-256
  encrypt/decrypt, RSA-OAEP wrap/unwrap;
* authorization: an identity without an access policy gets 403 Forbidden/ForbiddenByPolicy; a partial
  policy allows exactly what it grants; on an RBAC vault, 403 ForbiddenByRbac until a
  "Key Vault Secrets User" assignment exists.
"""
import base64
import datetime
import hashlib
import os
import pathlib
import secrets as pysecrets

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _node_modules():
    d = os.environ.get("KEYLESS_NODE_MODULES", str(ROOT / ".cache" / "node" / "node_modules"))
    for pkg in ("identity", "keyvault-secrets", "keyvault-certificates", "keyvault-keys"):
        if not (pathlib.Path(d) / "@azure" / pkg).is_dir():
            if os.environ.get("CI"):
                pytest.fail(f"@azure/{pkg} missing in {d} (scripts/test installs it)")
            pytest.skip("node Key Vault clients not installed (run scripts/test)")


def vault_name(prefix):
    return f"{prefix}-{pysecrets.token_hex(3)}"


def system_oid(kv):
    return kv.up.info["systemIdentity"]["principalId"]


def forbidden(res):
    assert res["ok"] is False, res
    assert res["statusCode"] == 403, res
    assert res["code"] == "Forbidden", res
    return res


def self_signed_pem(cn):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=90))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(cn)]), critical=False)
            .sign(key, hashes.SHA256()))
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    pem += cert.public_bytes(serialization.Encoding.PEM)
    return pem.decode(), cert.fingerprint(hashes.SHA1()).hex()


# ---------------------------------------------------------------- secrets

def test_node_secrets(kv):
    vault = vault_name("nsec")
    kv.create_vault(vault, principals=[system_oid(kv)])
    out = kv.node("secrets", vault)
    base = kv.url(vault)

    s = out["set"]
    assert s["value"] == "value-one" and s["name"] == "app-secret"
    assert s["id"] == f"{base}/secrets/app-secret/{s['version']}"
    assert len(s["version"]) == 32
    assert s["contentType"] == "text/plain" and s["tags"] == {"env": "test", "team": "node"}
    assert s["enabled"] is True and s["createdOn"]
    assert s["vaultUrl"] == base
    assert out["latest"] == {"value": "value-two", "version": out["version2"]}, out["latest"]  # no contentType on v2
    assert out["byVersion"]["value"] == "value-one" and out["byVersion"]["version"] == s["version"]
    assert out["byVersion"]["tags"] == {"env": "test", "team": "node"}

    # disabled latest version: 403 Forbidden (innererror SecretDisabled), older version still readable
    assert out["disabledProps"] == {"enabled": False, "hasValue": False, "version": out["version2"]}
    forbidden(out["getDisabled"])
    assert "disabled" in out["getDisabled"]["message"].lower(), out["getDisabled"]
    assert "SecretDisabled" in out["getDisabled"]["details"], out["getDisabled"]
    assert out["getOlderWhileLatestDisabled"] == {"ok": True, "value": "value-one"}
    assert out["reenabled"] == {"enabled": True, "tags": {"rotated": "yes"}, "value": "value-two"}

    # listing: 31 secrets, default page size (25) forces a nextLink; maxPageSize 10 → 10,10,10,1
    names = out["listNames"]
    assert sorted(names) == sorted(["app-secret"] + [f"bulk-{i:02d}" for i in range(30)]), names
    assert len(out["listRequests"]) >= 2, out["listRequests"]
    assert out["listItem"]["id"] == f"{base}/secrets/app-secret"
    assert out["listItem"]["tags"] == {"rotated": "yes"}  # the latest version's tags
    assert sum(out["pageSizes10"]) == 31 and max(out["pageSizes10"]) <= 10 and len(out["pageSizes10"]) >= 4, out["pageSizes10"]
    vs = out["versions"]
    assert sorted(v["version"] for v in vs) == sorted([s["version"], out["version2"]])
    assert all(v["id"] == f"{base}/secrets/app-secret/{v['version']}" for v in vs)
    assert sum(out["versionPageSizes1"]) == 2 and max(out["versionPageSizes1"]) <= 1

    # soft delete
    d = out["deleted"]
    assert d["name"] == "app-secret" and d["recoveryId"] == f"{base}/deletedsecrets/app-secret", d
    assert d["deletedOn"] and d["scheduledPurgeDate"] and d["scheduledPurgeDate"] > d["deletedOn"]
    assert "value" not in d  # a deleted secret carries no value
    assert d["propsRecoveryId"] == d["recoveryId"]
    # node's delete poller: DELETE, then GET /deletedsecrets/{name} until it is not 404
    assert [r.split(" ->")[0] for r in out["deleteRequests"]][:2] == ["DELETE /secrets/app-secret", "GET /deletedsecrets/app-secret"]
    assert out["getDeleted"]["recoveryId"] == d["recoveryId"]
    assert "app-secret" in out["listDeleted"]
    nf = out["getWhileDeleted"]
    assert nf["statusCode"] == 404 and nf["code"] == "SecretNotFound", nf
    conflict = out["setWhileDeleted"]
    assert conflict["ok"] is False and conflict["statusCode"] == 409, conflict
    assert conflict["code"] == "Conflict" and "ObjectIsDeletedButRecoverable" in conflict["details"], conflict
    assert out["recovered"]["name"] == "app-secret" and out["recovered"]["version"] == out["version2"]
    # node's recover poller: GET the secret (404), POST recover, GET the secret until it is not 404
    assert [r.split(" ->")[0] for r in out["recoverRequests"]] == [
        "GET /secrets/app-secret/", "POST /deletedsecrets/app-secret/recover", "GET /secrets/app-secret/"], out["recoverRequests"]
    assert out["afterRecover"] == "value-two"
    assert out["versionsAfterRecover"] == 2

    # purge
    assert out["purge"] == {"ok": True}, out["purge"]
    assert any(r.startswith("DELETE /deletedsecrets/app-secret") and r.endswith("-> 204") for r in out["purgeRequests"]), out["purgeRequests"]
    assert out["getAfterPurge"]["statusCode"] == 404 and out["getAfterPurge"]["code"] == "SecretNotFound"
    assert out["getDeletedAfterPurge"]["statusCode"] == 404
    assert out["setAfterPurge"] == "fresh"
    assert out["getMissingVersion"]["statusCode"] == 404


def test_node_secret_backup_restore(kv):
    """Spec §10.1 lists backup/restore; the server currently refuses it (400 BadParameter)."""
    vault = vault_name("nbak")
    kv.create_vault(vault, principals=[system_oid(kv)])
    out = kv.node("backup", vault)
    b = out["backup"]
    assert b["ok"] and b["value"] > 0, b
    # restoring over a live secret is refused with 409; after purge it brings back every version
    assert out["restoreExisting"]["ok"] is False and out["restoreExisting"]["statusCode"] == 409, out["restoreExisting"]
    assert out["restore"]["ok"] and out["restore"]["value"]["name"] == "backed-up", out["restore"]
    assert out["afterRestore"] == {"ok": True, "value": "v2"}, out["afterRestore"]
    assert out["versionsAfterRestore"] == 2


# ---------------------------------------------------------------- certificates

def test_node_certificates(kv):
    vault = vault_name("ncert")
    kv.create_vault(vault, principals=[system_oid(kv)])
    pem, imported_sha1 = self_signed_pem("imported.node.example")
    out = kv.node("certs", vault, caFile=kv.kv_ca, importPem=pem)
    base = kv.url(vault)

    # Self / PKCS#12
    c = out["self"]
    assert c["id"] == f"{base}/certificates/self-pfx/{c['version']}"
    assert c["keyId"] == f"{base}/keys/self-pfx/{c['version']}"
    assert c["secretId"] == f"{base}/secrets/self-pfx/{c['version']}"
    assert c["thumbprint"] and c["thumbprint"] == c["cerSha1"], c
    assert c["cerSubject"] == "CN=node.example"
    p = c["policy"]
    assert p["issuerName"] == "Self" and p["subject"] == "CN=node.example"
    assert p["contentType"] == "application/x-pkcs12" and p["keyType"] == "RSA" and p["keySize"] == 2048
    sec = out["selfSecret"]
    assert sec["contentType"] == "application/x-pkcs12" and sec["managed"] is True
    assert sec["keyId"] == c["keyId"] and sec["version"] == c["version"]
    assert out["selfPfxLoaded"] is True, out.get("selfPfxError")
    key, leaf, _chain = pkcs12.load_key_and_certificates(base64.b64decode(sec["value"]), b"")
    assert leaf.fingerprint(hashes.SHA1()).hex() == c["thumbprint"]
    assert key.public_key().public_numbers() == leaf.public_key().public_numbers()
    if out.get("selfPfxLeafSha1"):
        assert out["selfPfxLeafSha1"] == c["thumbprint"]
    # first request of a client: body-less challenge (401), then the real POST (202); the node create
    # poller then GETs pending until the status leaves inProgress, then GETs the certificate
    reqs = out["createRequests"]
    assert reqs[:2] == ["POST /certificates/self-pfx/create -> 401", "POST /certificates/self-pfx/create -> 202"], reqs
    assert any(r.startswith("GET /certificates/self-pfx/pending") for r in reqs), reqs
    assert reqs[-1] == "GET /certificates/self-pfx/ -> 200", reqs
    assert all(r.endswith("-> 200") for r in reqs[2:]), reqs

    # Keyless CA / EC / PEM
    e = out["ec"]
    assert e["policy"]["issuerName"] == "Keyless" and e["policy"]["keyType"] == "EC" and e["policy"]["keyCurveName"] == "P-256"
    assert e["policy"]["subjectAlternativeNames"]["dnsNames"] == ["ec.node.example", "alt.node.example"]
    es = out["ecSecret"]
    assert es["contentType"] == "application/x-pem-file" and es["managed"] is True
    assert es["privateKeys"] == 1 and es["certificates"] == 2 and es["keyFirst"], es
    assert es["keyMatchesLeaf"] is True
    assert es["leafVerifiedByCa"] is True and es["leafCheckIssued"] is True, es
    assert es["chainSha1"] == [es["caSha1"]], es
    assert es["leafSubject"] == "CN=ec.node.example"
    assert "DNS:ec.node.example" in es["leafSan"] and "DNS:alt.node.example" in es["leafSan"]
    assert es["leafKeyType"] == "ec" and es["leafCurve"] == "prime256v1"
    assert es["leafSha1"] == e["thumbprint"]

    # import of raw PEM text
    i = out["imported"]
    assert i["thumbprint"] == imported_sha1 and i["cerSubject"] == "CN=imported.node.example"
    assert i["policy"]["issuerName"] == "Unknown", i["policy"]
    assert i["policy"]["contentType"] == "application/x-pem-file"
    assert i["tags"] == {"src": "node"}
    assert out["importedSecret"]["contentType"] == "application/x-pem-file"
    assert out["importedSecret"]["leafSha1"] == imported_sha1 and out["importedSecret"]["keyMatchesLeaf"] is True
    # without a content type node base64-encodes the PEM bytes (as python does); the service takes it too
    assert out["importedB64"]["ok"] is True, out["importedB64"]
    assert out["importedB64"]["value"]["thumbprint"] == imported_sha1

    # policy update
    assert out["policyBefore"]["lifetimeActions"] != [{"action": "AutoRenew", "daysBeforeExpiry": 10}]
    want = [{"action": "AutoRenew", "daysBeforeExpiry": 10}]
    # updateCertificatePolicy in @azure/keyvault-certificates 4.10.3 never assigns the parsed response
    # (`toPublicPolicy(parsedBody)` with parsedBody undefined), so it returns an empty policy whatever
    # the service says — read it back instead.
    assert out["policyUpdateReturned"].get("subject") is None
    for k in ("policyAfter", "policyInCert"):
        got = [{kk: vv for kk, vv in a.items() if vv is not None} for a in out[k]["lifetimeActions"]]
        assert got == want, (k, out[k])
        assert out[k]["subject"] == "CN=node.example" and out[k]["issuerName"] == "Self", (k, out[k])
        assert out[k]["keyType"] == "RSA" and out[k]["contentType"] == "application/x-pkcs12", (k, out[k])

    # listing
    assert {"self-pfx", "ec-pem", "imported", "imported-b64"} <= set(out["listNames"]), out["listNames"]
    assert out["listThumbprints"]["self-pfx"] == c["thumbprint"]
    assert out["versions"] == [c["version"]]
    assert out["getByVersion"]["thumbprint"] == c["thumbprint"]
    assert out["operation"]["ok"] and out["operation"]["value"]["status"] == "completed", out["operation"]

    # delete / recover
    d = out["deleted"]
    assert d["name"] == "imported" and d["recoveryId"] == f"{base}/deletedcertificates/imported", d
    assert d["deletedOn"] and d["scheduledPurgeDate"]
    assert out["getDeleted"]["thumbprint"] == imported_sha1
    assert "imported" in out["listDeleted"]
    assert out["secretWhileDeleted"]["statusCode"] == 404, out["secretWhileDeleted"]
    assert out["certWhileDeleted"]["statusCode"] == 404 and out["certWhileDeleted"]["code"] == "CertificateNotFound"
    assert out["recovered"]["thumbprint"] == imported_sha1
    assert out["secretAfterRecover"] == {"ok": True, "value": imported_sha1}
    assert out["purge"]["ok"] is True, out["purge"]
    assert out["getAfterPurge"]["statusCode"] == 404


# ---------------------------------------------------------------- auto-renew

def test_node_certificate_autorenew(kv):
    vault = vault_name("nrenew")
    kv.create_vault(vault, principals=[system_oid(kv)])
    first = kv.node("renew", vault, phase="create", caFile=kv.kv_ca)
    c1 = first["cert"]
    assert c1["policy"]["validityInMonths"] == 1
    assert [{k: v for k, v in a.items() if v is not None} for a in c1["policy"]["lifetimeActions"]] == [
        {"action": "AutoRenew", "daysBeforeExpiry": 7}]
    assert first["secret"]["leafSha1"] == c1["thumbprint"] and first["secret"]["leafVerifiedByCa"]

    kv.cli("keyvault", "advance-clock", "--days", "25")
    second = kv.node("renew", vault, phase="check", caFile=kv.kv_ca)
    vs = second["versions"]
    assert len(vs) == 2, vs
    assert c1["version"] in [v["version"] for v in vs]
    c2 = second["cert"]
    assert c2["version"] != c1["version"] and c2["thumbprint"] != c1["thumbprint"], (c1, c2)
    assert c2["expiresOn"] > c1["expiresOn"]
    assert sorted(second["secretVersions"]) == sorted(v["version"] for v in vs)
    s2 = second["secret"]
    assert s2["version"] == c2["version"] and s2["leafSha1"] == c2["thumbprint"], s2
    assert s2["leafVerifiedByCa"] is True and s2["keyMatchesLeaf"] is True
    assert s2["keyId"] == c2["keyId"] == c2["keyId"].rsplit("/", 1)[0] + "/" + c2["version"]
    # the renewal was issued at the (advanced) Key Vault clock: ~25 days after the first version
    nb1 = datetime.datetime.fromisoformat(c1["notBefore"].replace("Z", "+00:00"))
    nb2 = datetime.datetime.fromisoformat(c2["notBefore"].replace("Z", "+00:00"))
    assert datetime.timedelta(days=24) < nb2 - nb1 < datetime.timedelta(days=26), (nb1, nb2)
    assert c2["policy"]["lifetimeActions"] == c1["policy"]["lifetimeActions"]


# ---------------------------------------------------------------- keys

def test_node_keys(kv):
    vault = vault_name("nkeys")
    kv.create_vault(vault, principals=[system_oid(kv)])
    out = kv.node("keys", vault)
    base = kv.url(vault)
    assert out["rsa"]["id"] == f"{base}/keys/rsa-node/{out['rsa']['version']}"
    assert out["rsa"]["kty"] == "RSA" and out["rsa"]["nBytes"] == 256
    assert out["ec"]["kty"] == "EC" and out["ec"]["crv"] == "P-256"
    assert out["got"] == out["rsa"]["id"]
    assert {"rsa-node", "ec-node"} <= set(out["listNames"])
    assert out["sign"]["algorithm"] == "RS256" and out["sign"]["length"] == 256 and out["sign"]["localVerify"] is True
    assert out["verify"] is True and out["verifyTampered"] is False
    assert out["encryptLength"] == 256
    assert out["decrypt"] == "attack at dawn" and out["decryptLocalCiphertext"] == "attack at dawn"
    assert out["unwrapMatches"] is True and out["unwrapLocalMatches"] is True
    # private-key operations go to the service
    reqs = out["rsaRequests"]
    for op in ("sign", "decrypt", "unwrapkey"):
        assert any(f"/keys/rsa-node/{out['rsa']['version']}/{op}" in r.lower() and r.endswith("-> 200") for r in reqs), (op, reqs)
    assert out["ecSign"]["length"] == 64 and out["ecSign"]["localVerify"] is True
    assert out["ecVerify"] is True and out["ecVerifyTampered"] is False
    assert out["ecEncrypt"]["ok"] is False


# ---------------------------------------------------------------- authorization

def test_node_refused_without_policy_then_partial_policy(kv):
    vault = vault_name("nref")
    kv.create_vault(vault, principals=[system_oid(kv)])
    kv.node("seed", vault, secretName="app-secret", value="seeded")
    demo = kv.up.info["demoIdentity"]
    out = kv.node("refused", vault, clientId=demo["clientId"])
    for op, perm in (("get", "secrets get"), ("set", "secrets set")):
        r = forbidden(out[op])
        assert "ForbiddenByPolicy" in r["details"], r
        assert f"does not have {perm} permission" in r["message"] and demo["principalId"] in r["message"], r
    # the node pager replaces the service message ("Pagination failed with unexpected statusCode 403")
    forbidden(out["list"])
    assert out["requests"][0].endswith("-> 401"), out["requests"]

    kv.cli("keyvault", "set-policy", "-n", vault, "--object-id", demo["principalId"], "--secret-permissions", "get")
    out = kv.node("refused", vault, clientId=demo["clientId"])
    assert out["get"] == {"ok": True, "value": "seeded"}, out["get"]
    forbidden(out["set"])
    forbidden(out["list"])


def test_node_rbac_vault(kv):
    vault = vault_name("nrbac")
    v = kv.create_vault(vault, "--enable-rbac-authorization", "true")
    sysid = system_oid(kv)
    kv.cli("role", "assignment", "create", "--assignee", sysid, "--role", "Key Vault Secrets Officer", "--scope", v["id"])
    demo = kv.up.info["demoIdentity"]
    seeded = _retry(lambda: kv.node("refused", vault, secretName="app-secret"), lambda o: o["set"]["ok"])
    assert seeded["set"]["ok"], seeded
    out = kv.node("refused", vault, clientId=demo["clientId"])
    r = forbidden(out["get"])
    assert "ForbiddenByRbac" in r["details"], r
    assert "secrets/getSecret/action" in r["message"] and demo["principalId"] in r["message"], r

    kv.cli("role", "assignment", "create", "--assignee", demo["principalId"], "--role", "Key Vault Secrets User", "--scope", v["id"])
    out = _retry(lambda: kv.node("refused", vault, clientId=demo["clientId"]), lambda o: o["get"]["ok"])
    assert out["get"] == {"ok": True, "value": "from-node"}, out["get"]
    forbidden(out["set"])


def _retry(fn, ok, tries=10):
    import time
    for _ in range(tries):
        out = fn()
        if ok(out):
            return out
        time.sleep(1)
    return out
