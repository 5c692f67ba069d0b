"""A test OIDC identity provider (part of the test suite, not the product): an HTTPS issuer on
localhost with its own CA and keys, minting Kubernetes-style (`system:serviceaccount:ns:sa`) and
CI-style (`repo:org/repo:...`) tokens, RS256 or ES256."""
import datetime
import json
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID


def _cert(subject_cn, key, issuer_name, issuer_key, ca, sans=()):
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]))
         .issuer_name(issuer_name)
         .public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(s) for s in sans]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


class OidcIssuer:
    def __init__(self, tmpdir):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test IdP CA")])
        ca = _cert("Test IdP CA", ca_key, ca_name, ca_key, True)
        srv_key = ec.generate_private_key(ec.SECP256R1())
        srv = _cert("localhost", srv_key, ca_name, ca_key, False, sans=("localhost",))
        self.ca_path = f"{tmpdir}/idp-ca.pem"
        with open(self.ca_path, "wb") as f:
            f.write(ca.public_bytes(serialization.Encoding.PEM))
        chain, keyf = f"{tmpdir}/idp-cert.pem", f"{tmpdir}/idp-key.pem"
        with open(chain, "wb") as f:
            f.write(srv.public_bytes(serialization.Encoding.PEM))
        with open(keyf, "wb") as f:
            f.write(srv_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
        self.keys = {"rsa1": rsa.generate_private_key(public_exponent=65537, key_size=2048),
                     "ec1": ec.generate_private_key(ec.SECP256R1())}
        # requests served, by path (the re-fetch rate limit is counted on these)
        self.fetches = {}
        self.lock = threading.Lock()
        # a key the issuer never publishes (for forged assertions)
        self.rogue = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        idp = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                with idp.lock:
                    idp.fetches[self.path] = idp.fetches.get(self.path, 0) + 1
                for name in ("k8s", "gh"):
                    if self.path == f"/{name}/.well-known/openid-configuration":
                        return self.reply({"issuer": idp.issuer(name), "jwks_uri": f"{idp.base}/{name}/jwks",
                                           "id_token_signing_alg_values_supported": ["RS256", "ES256"]})
                    if self.path == f"/{name}/jwks":
                        return self.reply({"keys": idp.jwks()})
                self.send_response(404)
                self.end_headers()

            def reply(self, body):
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(chain, keyf)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.base = f"https://localhost:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def issuer(self, name):
        # Kubernetes issuers end with a slash (as AKS's do); CI issuers do not
        return f"{self.base}/k8s/" if name == "k8s" else f"{self.base}/gh"

    def jwks(self):
        out = []
        for kid, key in self.keys.items():
            alg = jwt.algorithms.RSAAlgorithm if kid.startswith("rsa") else jwt.algorithms.ECAlgorithm
            jwk = json.loads(alg.to_jwk(key.public_key()))
            jwk.update({"kid": kid, "use": "sig"})
            out.append(jwk)
        return out

    def mint(self, name, sub, aud="api://AzureADTokenExchange", kid="rsa1", lifetime=3600, nbf_offset=0, key=None):
        now = int(time.time())
        claims = {"iss": self.issuer(name), "sub": sub, "aud": [aud] if name == "k8s" else aud,
                  "iat": now + nbf_offset, "nbf": now + nbf_offset, "exp": now + nbf_offset + lifetime}
        alg = "RS256" if kid.startswith("rsa") else "ES256"
        return jwt.encode(claims, key or self.keys[kid], algorithm=alg, headers={"kid": kid})

    def stop(self):
        self.server.shutdown()
