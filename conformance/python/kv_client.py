"""Run one Key Vault scenario with the real python SDKs and print what they returned as JSON.

Usage: kv_client.py '<json args>'; args: scenario, url, and scenario-specific values. Clients
are unmodified and use default options (challenge-resource verification on); the credential
is ManagedIdentityCredential, served by the Keyless host agent (AZURE_POD_IDENTITY_AUTHORITY_HOST).
Expected refusals are caught and reported (status code, error code), never raised.
"""
import base64
import hashlib
import json
import sys

from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceNotFoundError
from azure.identity import ManagedIdentityCredential


def err(e):
    code = None
    if getattr(e, "error", None) is not None:
        code = e.error.code
    inner = None
    try:
        inner = e.response.json()["error"].get("innererror", {}).get("code")
    except Exception:
        pass
    return {"status": getattr(e, "status_code", None), "type": type(e).__name__, "code": code, "inner": inner,
            "message": str(getattr(e, "message", e))[:300]}


def attempt(f):
    try:
        return {"ok": f()}
    except HttpResponseError as e:
        return {"error": err(e)}


def cred(args):
    return ManagedIdentityCredential(**({"client_id": args["client_id"]} if args.get("client_id") else {}))


def secrets(args):
    from azure.keyvault.secrets import SecretClient

    c = SecretClient(args["url"], cred(args))
    out = {}
    s1 = c.set_secret("db-pass", "hunter2", content_type="text/plain", tags={"env": "ci"})
    s2 = c.set_secret("db-pass", "hunter3")
    out["set"] = {"id": s1.id, "version": s1.properties.version, "value": s1.value,
                  "content_type": s1.properties.content_type, "tags": s1.properties.tags}
    out["latest"] = c.get_secret("db-pass").value
    out["by_version"] = c.get_secret("db-pass", s1.properties.version).value
    out["created_is_int_time"] = s1.properties.created_on is not None
    p = c.update_secret_properties("db-pass", s2.properties.version, enabled=False, tags={"state": "off"})
    out["updated"] = {"enabled": p.enabled, "tags": p.tags}
    out["disabled_get"] = attempt(lambda: c.get_secret("db-pass").value)
    c.update_secret_properties("db-pass", s2.properties.version, enabled=True)
    for i in range(27):
        c.set_secret(f"bulk-{i:02d}", str(i))
    out["listed"] = sorted(p.name for p in c.list_properties_of_secrets())
    pages = c.list_properties_of_secrets(max_page_size=7).by_page()
    out["page_sizes"] = [len(list(pg)) for pg in pages]
    out["versions"] = len(list(c.list_properties_of_secret_versions("db-pass")))
    d = c.begin_delete_secret("bulk-01").result()
    out["deleted"] = {"recovery_id": d.recovery_id, "has_dates": d.deleted_date is not None and d.scheduled_purge_date is not None}
    out["get_deleted"] = c.get_deleted_secret("bulk-01").name
    out["deleted_names"] = [x.name for x in c.list_deleted_secrets()]
    out["reuse_deleted"] = attempt(lambda: c.set_secret("bulk-01", "again").id)
    out["get_after_delete"] = attempt(lambda: c.get_secret("bulk-01").value)
    r = c.begin_recover_deleted_secret("bulk-01").result()
    out["recovered"] = {"name": r.name, "value": c.get_secret("bulk-01").value}
    c.begin_delete_secret("bulk-02").result()
    c.purge_deleted_secret("bulk-02")
    out["after_purge"] = attempt(lambda: c.get_deleted_secret("bulk-02").name)
    out["reuse_after_purge"] = c.set_secret("bulk-02", "fresh").value
    import datetime
    now = datetime.datetime.now(datetime.timezone.utc)
    c.set_secret("expired", "old", expires_on=now - datetime.timedelta(hours=1))
    c.set_secret("future", "later", not_before=now + datetime.timedelta(days=1))
    c.set_secret("current", "now", not_before=now - datetime.timedelta(hours=1), expires_on=now + datetime.timedelta(days=1))
    out["expired"] = attempt(lambda: c.get_secret("expired").value)
    out["not_yet_valid"] = attempt(lambda: c.get_secret("future").value)
    out["in_window"] = c.get_secret("current").value
    blob = c.backup_secret("db-pass")
    out["restore_existing"] = attempt(lambda: c.restore_secret_backup(blob).name)
    c.begin_delete_secret("db-pass").result()
    c.purge_deleted_secret("db-pass")
    restored = c.restore_secret_backup(blob)
    out["restored"] = {"name": restored.name, "versions": len(list(c.list_properties_of_secret_versions("db-pass"))),
                       "value": c.get_secret("db-pass").value}
    out["restore_garbage"] = attempt(lambda: c.restore_secret_backup(b"garbage").name)
    out["bad_name"] = attempt(lambda: c.set_secret("bad_name!", "x").id)
    out["missing"] = attempt(lambda: c.get_secret("does-not-exist").value)
    return out


def read_secret(args):
    from azure.keyvault.secrets import SecretClient

    c = SecretClient(args["url"], cred(args))
    return attempt(lambda: c.get_secret(args["name"]).value)


def set_secret(args):
    from azure.keyvault.secrets import SecretClient

    c = SecretClient(args["url"], cred(args))
    return attempt(lambda: c.set_secret(args["name"], args["value"]).value)


def purge(args):
    from azure.keyvault.secrets import SecretClient

    c = SecretClient(args["url"], cred(args))
    return {"delete": attempt(lambda: c.begin_delete_secret(args["name"]).result().name),
            "purge": attempt(lambda: c.purge_deleted_secret(args["name"]))}


def raw_create(args, name, policy):
    """POST /certificates/{name}/create with a raw policy; returns the status code."""
    import os
    import requests

    imds = os.environ["AZURE_POD_IDENTITY_AUTHORITY_HOST"]
    host = args["url"].split("//", 1)[1]
    resource = "https://vault." + host.split(".vault.", 1)[1]
    t = requests.get(f"{imds}/metadata/identity/oauth2/token", params={"api-version": "2018-02-01", "resource": resource},
                     headers={"Metadata": "true"}, timeout=30).json()["access_token"]
    r = requests.post(f"{args['url']}/certificates/{name}/create?api-version=7.5", json={"policy": policy},
                      headers={"Authorization": f"Bearer {t}"}, verify=os.environ["REQUESTS_CA_BUNDLE"])
    return {"status": r.status_code, "code": r.json().get("error", {}).get("code") if r.content else None}


def certs(args):
    from azure.keyvault.certificates import (CertificateClient, CertificateContentType, CertificatePolicy,
                                             CertificatePolicyAction, LifetimeAction)
    from azure.keyvault.secrets import SecretClient
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, padding
    from cryptography.hazmat.primitives.serialization import pkcs12

    cc = CertificateClient(args["url"], cred(args))
    sc = SecretClient(args["url"], cred(args))
    ca = x509.load_pem_x509_certificate(open(args["ca"], "rb").read())
    out = {}

    # Self-signed RSA, PKCS#12
    pol = CertificatePolicy(issuer_name="Self", subject="CN=py.example", san_dns_names=["py.example"], validity_in_months=12)
    c1 = cc.begin_create_certificate("self-rsa", pol).result()
    s1 = sc.get_secret("self-rsa")
    key, leaf, extra = pkcs12.load_key_and_certificates(base64.b64decode(s1.value), None)
    out["self_rsa"] = {
        "policy_issuer": c1.policy.issuer_name, "key_type": str(c1.policy.key_type), "key_size": c1.policy.key_size,
        "exportable": c1.policy.exportable, "content_type": str(c1.policy.content_type),
        "validity": c1.policy.validity_in_months, "lifetime": [(str(a.action), a.lifetime_percentage) for a in c1.policy.lifetime_actions],
        "secret_ct": s1.properties.content_type, "secret_kid": s1.properties.key_id, "key_id": c1.key_id, "secret_id": c1.secret_id,
        "pfx_key": type(key).__name__, "subject": leaf.subject.rfc4514_string(),
        "x5t_matches": c1.properties.x509_thumbprint == hashlib.sha1(leaf.public_bytes(serialization.Encoding.DER)).digest(),
        "cer_matches": c1.cer == leaf.public_bytes(serialization.Encoding.DER),
        "sans": leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName),
    }

    # Keyless CA issuer, EC P-256, PEM, non-default usage
    pol2 = CertificatePolicy(issuer_name="Keyless", subject="CN=svc.internal", san_dns_names=["svc.internal"],
                             content_type=CertificateContentType.pem, key_type="EC", key_curve_name="P-256")
    c2 = cc.begin_create_certificate("ca-ec", pol2).result()
    pem = sc.get_secret("ca-ec").value
    certs_pem = [b"-----BEGIN CERTIFICATE-----" + p for p in pem.encode().split(b"-----BEGIN CERTIFICATE-----")[1:]]
    leaf2 = x509.load_pem_x509_certificate(certs_pem[0])
    k2 = serialization.load_pem_private_key(pem.encode(), None)
    ca.public_key().verify(leaf2.signature, leaf2.tbs_certificate_bytes, ec.ECDSA(leaf2.signature_hash_algorithm))
    out["ca_ec"] = {
        "pem_has_key": "BEGIN PRIVATE KEY" in pem, "cert_blocks": len(certs_pem), "key_curve": k2.curve.name,
        "issuer": leaf2.issuer.rfc4514_string(), "ca_subject": ca.subject.rfc4514_string(), "chain_verified": True,
        "policy_curve": str(c2.policy.key_curve_name),
    }

    # Non-exportable key: the secret holds the certificate only
    # (python 4.12 drops key_props unless something truthy is set: exportable=False alone is
    # never sent, so key_type goes with it)
    pol3 = CertificatePolicy(issuer_name="Self", subject="CN=noexport", exportable=False, key_type="RSA")
    cc.begin_create_certificate("noexport", pol3).result()
    k3, leaf3, extra3 = pkcs12.load_key_and_certificates(base64.b64decode(sc.get_secret("noexport").value), None)
    # without a key, cryptography reports the certificate among the additional ones
    out["noexport"] = {"key_in_pfx": k3 is not None, "cert": (leaf3 or extra3[0]).subject.rfc4514_string()}

    # Import: PFX with a password, and PEM (python sends base64 of the PEM text)
    pfx = pkcs12.serialize_key_and_certificates(b"imp", key, leaf, None, serialization.BestAvailableEncryption(b"pw"))
    i1 = cc.import_certificate("imported-pfx", pfx, password="pw")
    pem_bytes = k2.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()) + certs_pem[0]
    i2 = cc.import_certificate("imported-pem", pem_bytes, policy=CertificatePolicy(content_type=CertificateContentType.pem, issuer_name="Unknown"))
    out["import"] = {"pfx_issuer": i1.policy.issuer_name, "pfx_subject": i1.policy.subject,
                     "pem_issuer": i2.policy.issuer_name, "pem_ct": str(i2.policy.content_type),
                     "pem_secret_is_pem": sc.get_secret("imported-pem").value.startswith("-----BEGIN")}
    out["bad_import"] = attempt(lambda: cc.import_certificate("bad-import", b"not a certificate").id)

    # Policy update, versions
    cc.update_certificate_policy("self-rsa", CertificatePolicy(lifetime_actions=[LifetimeAction(CertificatePolicyAction.auto_renew, days_before_expiry=30)]))
    p = cc.get_certificate_policy("self-rsa")
    out["policy_update"] = {"lifetime": [(str(a.action), a.days_before_expiry) for a in p.lifetime_actions], "subject": p.subject}
    cc.begin_create_certificate("self-rsa", cc.get_certificate_policy("self-rsa")).result()
    out["versions"] = len(list(cc.list_properties_of_certificate_versions("self-rsa")))
    out["listed"] = sorted(x.name for x in cc.list_properties_of_certificates())

    # Unknown issuer: CSR, signed outside, merged
    op = cc.begin_create_certificate("merged", CertificatePolicy(issuer_name="Unknown", subject="CN=merged.example")).result()
    csr = x509.load_der_x509_csr(op.csr)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ext_ca_name = x509.Name.from_rfc4514_string("CN=External CA")
    import datetime
    now = datetime.datetime.now(datetime.timezone.utc)
    signed = (x509.CertificateBuilder().subject_name(csr.subject).issuer_name(ext_ca_name).public_key(csr.public_key())
              .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=90))
              .sign(ca_key, hashes.SHA256()))
    m = cc.merge_certificate("merged", [signed.public_bytes(serialization.Encoding.DER)])
    out["merge"] = {"op_status": op.status, "csr_subject": csr.subject.rfc4514_string(), "merged_id": m.id,
                    "op_after": cc.get_certificate_operation("merged").status}

    # delete / recover / purge, and the key + secret follow
    d = cc.begin_delete_certificate("imported-pfx").result()
    out["deleted"] = {"recovery_id": d.recovery_id, "secret_gone": attempt(lambda: sc.get_secret("imported-pfx").value)}
    cc.begin_recover_deleted_certificate("imported-pfx").result()
    out["recovered_secret"] = sc.get_secret("imported-pfx").value[:10] != ""
    cc.begin_delete_certificate("imported-pem").result()
    cc.purge_deleted_certificate("imported-pem")
    out["purged"] = attempt(lambda: cc.get_deleted_certificate("imported-pem").name)
    cblob = cc.backup_certificate("ca-ec")
    cc.begin_delete_certificate("ca-ec").result()
    cc.purge_deleted_certificate("ca-ec")
    rc = cc.restore_certificate_backup(cblob)
    out["cert_restore"] = {"name": rc.name, "has_policy": rc.policy is not None,
                           "secret_is_pem": sc.get_secret("ca-ec").value.startswith("-----BEGIN PRIVATE KEY")}
    out["managed_secret_delete"] = attempt(lambda: sc.begin_delete_secret("ca-ec").result().name)
    out["bad_policy"] = attempt(lambda: cc.begin_create_certificate("bad", CertificatePolicy(issuer_name="Self", subject="CN=x", key_size=1024)).result().id)
    # the Keyless issuer does not make CA certificates (python has no policy field for
    # basic constraints, so send the policy as the service's JSON)
    out["ca_refused"] = raw_create(args, "ca-cert", {"issuer": {"name": "Keyless"}, "x509_props": {"subject": "CN=evil", "basic_constraints": {"ca": True}}})
    return out


def renew(args):
    from azure.keyvault.certificates import CertificateClient, CertificatePolicy, CertificatePolicyAction, LifetimeAction
    from azure.keyvault.secrets import SecretClient
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import pkcs12

    cc = CertificateClient(args["url"], cred(args))
    sc = SecretClient(args["url"], cred(args))
    if args["step"] == "create":
        pol = CertificatePolicy(issuer_name="Keyless", subject="CN=renew.example", validity_in_months=1,
                                lifetime_actions=[LifetimeAction(CertificatePolicyAction.auto_renew, days_before_expiry=7)])
        c = cc.begin_create_certificate("renew-me", pol).result()
        return {"version": c.properties.version, "x5t": c.properties.x509_thumbprint.hex(),
                "validity_days": (c.properties.expires_on - c.properties.not_before).days}
    versions = list(cc.list_properties_of_certificate_versions("renew-me"))
    c = cc.get_certificate("renew-me")
    s = sc.get_secret("renew-me")
    _, leaf, chain = pkcs12.load_key_and_certificates(__import__("base64").b64decode(s.value), None)
    open(args["leaf_out"], "wb").write(leaf.public_bytes(__import__("cryptography").hazmat.primitives.serialization.Encoding.PEM))
    return {"versions": len(versions), "version": c.properties.version, "x5t": c.properties.x509_thumbprint.hex(),
            "secret_version": s.properties.version, "chain": len(chain), "not_before": int(leaf.not_valid_before_utc.timestamp())}


def keys(args):
    from azure.keyvault.keys import KeyClient
    from azure.keyvault.keys.crypto import CryptographyClient, EncryptionAlgorithm, KeyWrapAlgorithm, SignatureAlgorithm

    kc = KeyClient(args["url"], cred(args))
    out = {}
    for size in (2048, 3072, 4096):
        k = kc.create_rsa_key(f"rsa-{size}", size=size)
        out[f"rsa{size}_n_bits"] = len(k.key.n) * 8
    for crv in ("P-256", "P-384", "P-521"):
        k = kc.create_ec_key(f"ec-{crv.lower()}", curve=crv)
        out[f"ec_{crv}"] = getattr(k.key.crv, "value", k.key.crv)
    rsa = kc.get_key("rsa-2048")
    cc = CryptographyClient(rsa, cred(args))
    results = {}
    for alg, h in ((SignatureAlgorithm.rs256, hashlib.sha256), (SignatureAlgorithm.ps256, hashlib.sha256), (SignatureAlgorithm.rs512, hashlib.sha512)):
        d = h(b"message").digest()
        sig = cc.sign(alg, d).signature
        results[alg.value] = [cc.verify(alg, d, sig).is_valid, cc.verify(alg, h(b"other").digest(), sig).is_valid]
    for alg in (EncryptionAlgorithm.rsa_oaep_256, EncryptionAlgorithm.rsa_oaep, EncryptionAlgorithm.rsa1_5):
        ct = cc.encrypt(alg, b"plaintext").ciphertext
        results[alg.value] = cc.decrypt(alg, ct).plaintext.decode()
    w = cc.wrap_key(KeyWrapAlgorithm.rsa_oaep_256, b"k" * 32)
    results["wrap"] = cc.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, w.encrypted_key).key == b"k" * 32
    for crv, alg, h in (("p-256", SignatureAlgorithm.es256, hashlib.sha256), ("p-384", SignatureAlgorithm.es384, hashlib.sha384), ("p-521", SignatureAlgorithm.es512, hashlib.sha512)):
        ecc = CryptographyClient(kc.get_key(f"ec-{crv}"), cred(args))
        d = h(b"m").digest()
        s = ecc.sign(alg, d).signature
        results[alg.value] = [len(s), ecc.verify(alg, d, s).is_valid]
    out["crypto"] = results
    out["no_private"] = all(getattr(rsa.key, f, None) in (None, b"") for f in ("d", "p", "q", "dp", "dq", "qi"))
    out["listed"] = sorted(p.name for p in kc.list_properties_of_keys())
    kc.update_key_properties("rsa-3072", enabled=False)
    out["disabled_sign"] = attempt(lambda: CryptographyClient(kc.get_key("rsa-3072"), cred(args)).sign(SignatureAlgorithm.rs256, hashlib.sha256(b"x").digest()).signature.hex())
    d = kc.begin_delete_key("rsa-4096").result()
    out["deleted"] = d.recovery_id
    kc.begin_recover_deleted_key("rsa-4096").result()
    out["recovered"] = kc.get_key("rsa-4096").name
    out["oct"] = attempt(lambda: kc.create_key("oct1", "oct").id)
    out["bad_size"] = attempt(lambda: kc.create_rsa_key("bad", size=1024).id)
    return out


def create_cert(args):
    """A certificate issued by the Keyless CA that renews itself 7 days before it expires."""
    from azure.keyvault.certificates import CertificateClient, CertificatePolicy, CertificatePolicyAction, LifetimeAction

    cc = CertificateClient(args["url"], cred(args))
    pol = CertificatePolicy(issuer_name="Keyless", subject=f"CN={args['name']}.example", validity_in_months=1,
                            lifetime_actions=[LifetimeAction(CertificatePolicyAction.auto_renew, days_before_expiry=7)])
    c = cc.begin_create_certificate(args["name"], pol).result()
    return {"version": c.properties.version, "x5t": c.properties.x509_thumbprint.hex()}


def raw(args):
    """The wire contract without an SDK: the challenge, audiences, api-versions, paging limits."""
    import os
    import requests

    ca = os.environ["REQUESTS_CA_BUNDLE"]
    imds = os.environ["AZURE_POD_IDENTITY_AUTHORITY_HOST"]

    def token(resource):
        r = requests.get(f"{imds}/metadata/identity/oauth2/token", params={"api-version": "2018-02-01", "resource": resource},
                         headers={"Metadata": "true"}, timeout=30)
        r.raise_for_status()
        return r.json()["access_token"]

    url = args["url"]
    out = {}
    r = requests.put(f"{url}/secrets/raw?api-version=7.5", data=b"{not json", headers={"Content-Type": "application/json"}, verify=ca)
    out["no_token"] = {"status": r.status_code, "challenge": r.headers.get("WWW-Authenticate"), "body": r.json()}
    r = requests.get(f"{url}/secrets/raw/?api-version=7.5", headers={"Authorization": "Bearer not.a.jwt"}, verify=ca)
    out["garbage_token"] = {"status": r.status_code, "challenge": r.headers.get("WWW-Authenticate") is not None}
    wrong = token("https://management.azure.com/")
    r = requests.get(f"{url}/secrets/raw/?api-version=7.5", headers={"Authorization": f"Bearer {wrong}"}, verify=ca)
    out["wrong_audience"] = {"status": r.status_code, "body": r.json()}
    good = token(args["resource"])
    h = {"Authorization": f"Bearer {good}"}
    r = requests.get(f"{url}/secrets?api-version=1999-01-01", headers=h, verify=ca)
    out["bad_api_version"] = {"status": r.status_code, "body": r.json()}
    r = requests.get(f"{url}/secrets?api-version=7.5&maxresults=26", headers=h, verify=ca)
    out["maxresults_26"] = {"status": r.status_code, "code": r.json()["error"]["code"]}
    r = requests.put(f"{url}/secrets/raw?api-version=2025-07-01", data=b"{not json", headers={**h, "Content-Type": "application/json"}, verify=ca)
    out["malformed_json"] = {"status": r.status_code, "code": r.json()["error"]["code"]}
    r = requests.put(f"{url}/secrets/raw?api-version=7.6", json={"value": "x" * (26 * 1024)}, headers=h, verify=ca)
    out["oversized"] = {"status": r.status_code, "code": r.json()["error"]["code"]}
    r = requests.put(f"{url}/secrets/raw?api-version=2026-04-01", json={"value": "v1"}, headers=h, verify=ca)
    out["set"] = {"status": r.status_code, "id": r.json().get("id"), "headers": {k: r.headers.get(k) for k in ("Content-Type", "x-ms-request-id", "Cache-Control")}}
    r = requests.get(f"{url}/secrets/raw/?api-version=7.0", headers=h, verify=ca)
    out["get_old_version"] = {"status": r.status_code, "value": r.json().get("value")}
    return out


def main():
    args = json.loads(sys.argv[1])
    fn = {"secrets": secrets, "read_secret": read_secret, "set_secret": set_secret, "purge": purge,
          "certs": certs, "renew": renew, "keys": keys, "raw": raw,
          "create_cert": create_cert}[args["scenario"]]
    print(json.dumps(fn(args), default=str))


if __name__ == "__main__":
    main()
