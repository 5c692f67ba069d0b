"""Key Vault with the real python SDKs (azure-keyvault-secrets / -certificates / -keys),
unmodified and with default options, authenticated by ManagedIdentityCredential through the
Keyless host agent: the seed-002 flow end to end, the conformance list of the Key Vault notes
(§10), certificate auto-renewal under a moved clock, and the callers that must be refused."""
import base64
import json
import pathlib
import sqlite3
import subprocess
import uuid

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from conftest import keyless_bin, wait_audit


def vault_name(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def system(kv):
    return kv.up.info["systemIdentity"]["principalId"]


def demo(kv):
    return kv.up.info["demoIdentity"]


def test_seed_flow_identity_policy_token_secret(kv):
    # an operator grants the workload's identity "get" on a vault; another principal (here the
    # demo identity) writes the secret; the workload reads it with no credential in its code
    name = vault_name("seed")
    kv.create_vault(name, principals=[system(kv)], secret=("get",), key=("get",), cert=("get",))
    kv.cli("keyvault", "set-policy", "-n", name, "--object-id", demo(kv)["principalId"], "--secret-permissions", "set")
    wrote = kv.py("set_secret", name, name_="x", client_id=demo(kv)["clientId"], **{"name": "app-db-password", "value": "s3cr3t-value"})
    assert wrote == {"ok": "s3cr3t-value"}
    assert kv.py("read_secret", name, name="app-db-password") == {"ok": "s3cr3t-value"}
    # the writer may not read, the reader may not write
    denied = kv.py("read_secret", name, name="app-db-password", client_id=demo(kv)["clientId"])
    assert denied["error"]["status"] == 403 and denied["error"]["inner"] == "ForbiddenByPolicy", denied
    assert kv.py("set_secret", name, name="app-db-password", value="x")["error"]["status"] == 403
    # each operation is in the audit trail: caller, vault, object, operation, result; never the value
    audit = kv.up.data_dir / "audit.log"

    def op(operation, oid, status, reason=None):
        return lambda r: (r["type"] == "keyVault" and r["vault"] == name and r.get("name") == "app-db-password"
                          and r["collection"] == "secrets" and r["operation"] == operation
                          and r["caller"].get("objectId") == oid and r["status"] == status and r.get("reason") == reason)
    wait_audit(audit, "the writer's SecretSet", op("SecretSet", demo(kv)["principalId"], 200))
    wait_audit(audit, "the reader's SecretGet", op("SecretGet", system(kv), 200))
    wait_audit(audit, "the writer's refused SecretGet", op("SecretGet", demo(kv)["principalId"], 403, "ForbiddenByPolicy"))
    wait_audit(audit, "the reader's refused SecretSet", op("SecretSet", system(kv), 403, "ForbiddenByPolicy"))
    assert "s3cr3t-value" not in audit.read_text()


def test_secrets_conformance(kv):
    name = vault_name("sec")
    kv.create_vault(name, principals=[system(kv)])
    out = kv.py("secrets", name)
    assert out["set"]["value"] == "hunter2"
    assert out["set"]["id"].startswith(f"{kv.url(name)}/secrets/db-pass/")
    assert out["set"]["content_type"] == "text/plain" and out["set"]["tags"] == {"env": "ci"}
    assert out["latest"] == "hunter3" and out["by_version"] == "hunter2"
    assert out["updated"] == {"enabled": False, "tags": {"state": "off"}}
    assert out["disabled_get"]["error"]["status"] == 403 and out["disabled_get"]["error"]["inner"] == "SecretDisabled"
    assert len(out["listed"]) == 28 and "db-pass" in out["listed"]
    assert out["page_sizes"] == [7, 7, 7, 7]
    assert out["versions"] == 2
    assert out["deleted"]["recovery_id"] == f"{kv.url(name)}/deletedsecrets/bulk-01" and out["deleted"]["has_dates"]
    assert out["get_deleted"] == "bulk-01" and out["deleted_names"] == ["bulk-01"]
    assert out["reuse_deleted"]["error"]["status"] == 409
    assert out["reuse_deleted"]["error"]["inner"] == "ObjectIsDeletedButRecoverable"
    assert out["get_after_delete"]["error"]["status"] == 404
    assert out["recovered"] == {"name": "bulk-01", "value": "1"}
    assert out["after_purge"]["error"]["status"] == 404
    assert out["reuse_after_purge"] == "fresh"
    assert out["expired"]["error"]["status"] == 403 and out["expired"]["error"]["inner"] == "SecretExpired"
    assert out["not_yet_valid"]["error"]["status"] == 403 and out["not_yet_valid"]["error"]["inner"] == "SecretNotYetValid"
    assert out["in_window"] == "now"
    assert out["restore_existing"]["error"]["status"] == 409
    assert out["restored"] == {"name": "db-pass", "versions": 2, "value": "hunter3"}
    assert out["restore_garbage"]["error"]["status"] == 400
    assert out["bad_name"]["error"]["status"] == 400 and out["bad_name"]["error"]["code"] == "BadParameter"
    assert out["missing"]["error"]["status"] == 404 and out["missing"]["error"]["code"] == "SecretNotFound"


def test_wire_contract_and_refusals(kv):
    name = vault_name("raw")
    kv.create_vault(name, principals=[system(kv)])
    resource = f"https://vault.localhost:{kv.port}"
    out = kv.py("raw", name, resource=resource)
    nt = out["no_token"]
    assert nt["status"] == 401
    assert nt["challenge"] == f'Bearer authorization="{kv.up.info["serverUrl"]}/{kv.up.info["tenantId"]}", resource="{resource}"'
    assert nt["body"]["error"]["code"] == "Unauthorized"
    assert out["garbage_token"] == {"status": 401, "challenge": True}
    assert out["wrong_audience"]["status"] == 401 and "AKV10022" in out["wrong_audience"]["body"]["error"]["message"]
    assert out["bad_api_version"]["status"] == 400 and out["bad_api_version"]["body"]["error"]["code"] == "BadParameter"
    assert "1999-01-01" in out["bad_api_version"]["body"]["error"]["message"]
    assert out["maxresults_26"] == {"status": 400, "code": "BadParameter"}
    assert out["malformed_json"] == {"status": 400, "code": "BadParameter"}
    assert out["oversized"] == {"status": 400, "code": "BadParameter"}
    assert out["set"]["status"] == 200 and out["set"]["headers"]["Content-Type"].startswith("application/json")
    assert out["set"]["headers"]["x-ms-request-id"]
    assert out["get_old_version"] == {"status": 200, "value": "v1"}


def test_purge_needs_purge_permission(kv):
    name = vault_name("prg")
    kv.create_vault(name, principals=[system(kv)], secret=("get", "set", "delete", "list"))
    kv.py("set_secret", name, name="p1", value="v")
    out = kv.py("purge", name, name="p1")
    assert out["delete"] == {"ok": "p1"}
    assert out["purge"]["error"]["status"] == 403 and out["purge"]["error"]["inner"] == "ForbiddenByPolicy"


def test_rbac_vault(kv):
    name = vault_name("rbac")
    v = kv.create_vault(name, "--enable-rbac-authorization")
    assert v["properties"]["enableRbacAuthorization"] is True
    denied = kv.py("read_secret", name, name="anything")
    assert denied["error"]["status"] == 403 and denied["error"]["inner"] == "ForbiddenByRbac", denied
    kv.cli("role", "assignment", "create", "--assignee", demo(kv)["principalId"], "--role", "Key Vault Secrets Officer", "--scope", v["id"])
    kv.cli("role", "assignment", "create", "--assignee", system(kv), "--role", "Key Vault Secrets User", "--scope", v["id"])
    assert kv.py("set_secret", name, name="r1", value="rbac-value", client_id=demo(kv)["clientId"]) == {"ok": "rbac-value"}
    assert kv.py("read_secret", name, name="r1") == {"ok": "rbac-value"}
    assert kv.py("set_secret", name, name="r1", value="nope")["error"]["inner"] == "ForbiddenByRbac"


def test_certificates_conformance(kv):
    name = vault_name("crt")
    kv.create_vault(name, principals=[system(kv)])
    out = kv.py("certs", name, ca=kv.kv_ca)
    s = out["self_rsa"]
    assert s["policy_issuer"] == "Self" and s["key_size"] == 2048 and s["exportable"] is True
    assert s["content_type"].endswith("PKCS12") or "pkcs12" in s["content_type"]
    assert s["validity"] == 12 and len(s["lifetime"]) == 1
    assert "auto_renew" in s["lifetime"][0][0].lower().replace("autorenew", "auto_renew") and s["lifetime"][0][1] == 80
    assert s["secret_ct"] == "application/x-pkcs12"
    assert s["pfx_key"] == "RSAPrivateKey" and s["subject"] == "CN=py.example" and s["sans"] == ["py.example"]
    assert s["x5t_matches"] and s["cer_matches"]
    assert s["key_id"].split("/")[-2:] == s["secret_id"].split("/")[-2:] and s["secret_kid"] == s["key_id"]
    c = out["ca_ec"]
    assert c["pem_has_key"] and c["cert_blocks"] == 2 and c["key_curve"] == "secp256r1" and c["chain_verified"]
    assert c["issuer"] == c["ca_subject"]
    assert out["noexport"] == {"key_in_pfx": False, "cert": "CN=noexport"}
    i = out["import"]
    assert i["pfx_issuer"] == "Unknown" and i["pfx_subject"] == "CN=py.example"
    assert i["pem_issuer"] == "Unknown" and i["pem_secret_is_pem"]
    assert out["bad_import"]["error"]["status"] == 400
    assert out["policy_update"]["lifetime"][0][1] == 30 and out["policy_update"]["subject"] == "CN=py.example"
    assert out["versions"] == 2
    assert {"self-rsa", "ca-ec", "noexport", "imported-pfx", "imported-pem"} <= set(out["listed"])
    m = out["merge"]
    assert m["op_status"] == "inProgress" and m["csr_subject"] == "CN=merged.example" and m["op_after"] == "completed"
    assert out["deleted"]["recovery_id"].endswith("/deletedcertificates/imported-pfx")
    assert out["deleted"]["secret_gone"]["error"]["status"] == 404
    assert out["recovered_secret"]
    assert out["purged"]["error"]["status"] == 404
    assert out["cert_restore"] == {"name": "ca-ec", "has_policy": True, "secret_is_pem": True}
    assert out["managed_secret_delete"]["error"]["status"] == 403
    assert out["bad_policy"]["error"]["status"] == 400
    assert out["ca_refused"] == {"status": 400, "code": "BadParameter"}


def test_keys_conformance(kv):
    name = vault_name("key")
    kv.create_vault(name, principals=[system(kv)])
    out = kv.py("keys", name)
    assert out["rsa2048_n_bits"] == 2048 and out["rsa3072_n_bits"] == 3072 and out["rsa4096_n_bits"] == 4096
    assert [out["ec_P-256"], out["ec_P-384"], out["ec_P-521"]] == ["P-256", "P-384", "P-521"]
    cr = out["crypto"]
    for alg in ("RS256", "PS256", "RS512"):
        assert cr[alg] == [True, False], (alg, cr)
    for alg in ("RSA-OAEP-256", "RSA-OAEP", "RSA1_5"):
        assert cr[alg] == "plaintext", (alg, cr)
    assert cr["wrap"]
    assert cr["ES256"] == [64, True] and cr["ES384"] == [96, True] and cr["ES512"] == [132, True]
    assert out["no_private"]
    assert out["disabled_sign"]["error"]["status"] == 403
    assert out["deleted"].endswith("/deletedkeys/rsa-4096") and out["recovered"] == "rsa-4096"
    assert out["oct"]["error"]["status"] == 400 and out["bad_size"]["error"]["status"] == 400


def test_certificate_auto_renewal_under_a_moved_clock(kv, tmp_path):
    name = vault_name("ren")
    kv.create_vault(name, principals=[system(kv)])
    first = kv.py("renew", name, step="create")
    assert 28 <= first["validity_days"] <= 31
    # 20 days in: not yet due (due 7 days before expiry)
    r = kv.cli("keyvault", "advance-clock", "--days", "20")
    assert r["renewed"] == 0
    # 25 days in: due; the scheduler renews exactly once, even when it runs again
    r = kv.cli("keyvault", "advance-clock", "--days", "5")
    assert r["renewed"] == 1
    assert kv.cli("keyvault", "advance-clock", "--seconds", "1")["renewed"] == 0
    leaf_path = tmp_path / "leaf.pem"
    after = kv.py("renew", name, step="show", leaf_out=str(leaf_path))
    assert after["versions"] == 2
    assert after["version"] != first["version"] and after["x5t"] != first["x5t"]
    assert after["secret_version"] == after["version"] and after["chain"] == 1
    # the renewed certificate chains to the Keyless CA
    leaf = x509.load_pem_x509_certificate(leaf_path.read_bytes())
    ca = x509.load_pem_x509_certificate(pathlib.Path(kv.kv_ca).read_bytes())
    # and not to the platform's TLS CA
    assert leaf.issuer != x509.load_pem_x509_certificate(pathlib.Path(kv.ca).read_bytes()).subject
    ca.public_key().verify(leaf.signature, leaf.tbs_certificate_bytes, ec.ECDSA(leaf.signature_hash_algorithm))
    assert leaf.issuer == ca.subject


def test_values_and_private_keys_are_encrypted_at_rest(kv):
    name = vault_name("rest")
    kv.create_vault(name, principals=[system(kv)])
    marker = "plaintext-marker-" + uuid.uuid4().hex
    assert kv.py("set_secret", name, name="marker", value=marker) == {"ok": marker}
    kv.py("renew", name, step="create")
    data = pathlib.Path(kv.up.data_dir)
    pg = pathlib.Path(str(data) + ".pg-url")
    if pg.exists():
        # on PostgreSQL (a migrated data dir): everything stored, from an online backup
        blob, n = stored_in_backup(kv, pg.read_text().strip())
    else:
        blob = b"".join(p.read_bytes() for p in data.glob("keyless.db*"))
        # and the database is intact and readable
        con = sqlite3.connect(f"file:{data / 'keyless.db'}?mode=ro", uri=True)
        n = con.execute("SELECT count(*) FROM kv_versions WHERE sealed IS NOT NULL").fetchone()[0]
        con.close()
    assert marker.encode() not in blob
    assert b"PRIVATE KEY" not in blob
    assert n >= 3


def stored_in_backup(kv, url):
    """Every value a PostgreSQL store holds (`keyless admin backup`, bytes decoded) and the
    number of sealed Key Vault versions."""
    import base64
    import subprocess
    import tempfile
    out = pathlib.Path(tempfile.mkdtemp()) / "backup.jsonl"
    subprocess.run([keyless_bin(), "admin", "backup", "--to", str(out), "--database", url], check=True, capture_output=True)
    blob, sealed, table, cols = bytearray(), 0, None, []
    for line in out.read_text().splitlines():
        v = json.loads(line)
        if isinstance(v, dict):
            table, cols = v.get("table", table), v.get("columns", cols)
            continue
        for cell in v:
            if isinstance(cell, str):
                blob += cell.encode()
            elif isinstance(cell, dict):
                blob += base64.b64decode(cell["b64"])
        if table == "kv_versions" and v[cols.index("sealed")] is not None:
            sealed += 1
    return bytes(blob), sealed


def test_vault_control_plane(kv):
    name = vault_name("cp")
    v = kv.create_vault(name, "--retention-days", "7", "--tags", "team=infra")
    p = v["properties"]
    assert v["type"] == "Microsoft.KeyVault/vaults" and v["name"] == name and v["tags"] == {"team": "infra"}
    assert p["tenantId"] == kv.up.info["tenantId"] and p["sku"] == {"family": "A", "name": "standard"}
    assert p["vaultUri"] == f"{kv.url(name)}/" and p["enableSoftDelete"] is True and p["softDeleteRetentionInDays"] == 7
    assert p["enableRbacAuthorization"] is False and p["accessPolicies"] == []
    # access policies: add merges, delete-policy removes
    oid = system(kv)
    kv.cli("keyvault", "set-policy", "-n", name, "--object-id", oid, "--secret-permissions", "get")
    r = kv.cli("keyvault", "set-policy", "-n", name, "--object-id", oid, "--secret-permissions", "List", "--key-permissions", "sign")
    pol = r["properties"]["accessPolicies"]
    assert len(pol) == 1 and pol[0]["permissions"]["secrets"] == ["get", "list"] and pol[0]["permissions"]["keys"] == ["sign"]
    assert kv.cli("keyvault", "show", "-n", name)["properties"]["accessPolicies"] == pol
    r = kv.cli("keyvault", "delete-policy", "-n", name, "--object-id", oid)
    assert r["properties"]["accessPolicies"] == []
    assert name in [x["name"] for x in kv.cli("keyvault", "list")]
    # bad input: a clear ARM error, nothing stored changes
    for args, needle in [
        (("keyvault", "create", "-n", "1bad", "-g", "keyless"), "vault name"),
        (("keyvault", "create", "-n", "ab", "-g", "keyless"), "vault name"),
        (("keyvault", "create", "-n", name, "-g", "keyless", "--retention-days", "3"), "softDeleteRetentionInDays"),
        (("keyvault", "set-policy", "-n", name, "--object-id", oid, "--secret-permissions", "sign"), "permissions.secrets"),
        (("keyvault", "set-policy", "-n", name, "--object-id", "not-a-guid", "--secret-permissions", "get"), "ObjectId"),
        (("keyvault", "create", "-n", name, "-g", "keyless", "--enable-soft-delete", "false"), "Soft delete cannot be turned off"),
    ]:
        out = subprocess.run([keyless_bin(), *args], env=kv.admin_env(), capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and needle in out.stderr, (args, out.stderr)
    after = kv.cli("keyvault", "show", "-n", name)
    assert after["properties"]["softDeleteRetentionInDays"] == 7 and after["properties"]["accessPolicies"] == []
    # names are global: the same name in another group is a conflict
    kv.cli("group", "create", "-n", "other-rg", "-l", "local")
    out = subprocess.run([keyless_bin(), "keyvault", "create", "-n", name, "-g", "other-rg"], env=kv.admin_env(), capture_output=True, text=True)
    assert out.returncode != 0 and "VaultAlreadyExists" in out.stderr
    # purge protection: cannot be turned off, and fixes the retention
    pp = vault_name("pp")
    v = kv.create_vault(pp, "--enable-purge-protection", "--retention-days", "30")
    assert v["properties"]["enablePurgeProtection"] is True
    for args, needle in [
        (("keyvault", "create", "-n", pp, "-g", "keyless", "--enable-purge-protection", "false"), "Purge protection"),
        (("keyvault", "create", "-n", pp, "-g", "keyless", "--retention-days", "60"), "retention"),
    ]:
        out = subprocess.run([keyless_bin(), *args], env=kv.admin_env(), capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and needle in out.stderr, (args, out.stderr)
    assert kv.cli("keyvault", "show", "-n", pp)["properties"]["softDeleteRetentionInDays"] == 30
    # delete removes the vault and its data plane
    kv.cli("keyvault", "delete", "-n", name)
    assert name not in [x["name"] for x in kv.cli("keyvault", "list")]
