// Drive the real, unmodified @azure/keyvault-{secrets,certificates,keys} clients (default options,
// challenge-resource verification on) against a Keyless vault, authenticated by
// ManagedIdentityCredential through the Keyless host agent (AZURE_POD_IDENTITY_AUTHORITY_HOST).
// Usage: node keyvault.mjs '<json args>' — args.scenario selects the flow, args.url is the vault URL.
// Prints ONE JSON line with what the clients observed. Expected refusals are caught and reported as
// {statusCode, code, message}; anything unexpected throws (exit 1, stack on stderr).
// The SDK's own request log (@azure/logger, info level) is captured in-process — no client option
// is changed — and reported as `trace` ("METHOD /path -> status") so callers can see what the
// pollers requested.
import { createRequire } from "node:module";
import crypto from "node:crypto";
import fs from "node:fs";
import tls from "node:tls";
import util from "node:util";

const args = JSON.parse(process.argv[2]);
const require = createRequire(process.env.KEYLESS_NODE_MODULES + "/");
const { ManagedIdentityCredential } = require("@azure/identity");
const { SecretClient } = require("@azure/keyvault-secrets");
const { CertificateClient } = require("@azure/keyvault-certificates");
const { KeyClient, CryptographyClient } = require("@azure/keyvault-keys");
const azlog = require("@azure/logger");

// ------------------------------------------------------------------ request trace (read-only)
const trace = [];
const traceAt = []; // ms since start, aligned with `trace`
const t0 = Date.now();
azlog.setLogLevel("info");
azlog.AzureLogger.log = (...a) => {
  const s = util.format(...a);
  const req = s.indexOf("Request: ");
  if (req >= 0) {
    try {
      const r = JSON.parse(s.slice(req + 9));
      const u = new URL(r.url);
      const host = u.hostname.endsWith(".vault.localhost") ? "" : u.host;
      trace.push(`${r.method} ${host}${u.pathname}`);
      traceAt.push(Date.now() - t0);
    } catch {
      /* not a request line we understand */
    }
    return;
  }
  const m = s.match(/Response status code: (\d+)/);
  if (m && trace.length && !/ -> /.test(trace[trace.length - 1])) trace[trace.length - 1] += ` -> ${m[1]}`;
};

function vaultTrace(from = 0) {
  return trace.slice(from).filter((t) => t.split(" ")[1]?.startsWith("/"));
}

// the same, each with the ms elapsed since the first request of the slice: [["GET /x -> 200", 0], ...]
function vaultTraceTimed(from = 0) {
  const out = [];
  for (let i = from; i < trace.length; i++) {
    if (trace[i].split(" ")[1]?.startsWith("/")) out.push([trace[i], traceAt[i] - traceAt[from]]);
  }
  return out;
}

// ------------------------------------------------------------------ helpers
function err(e) {
  return {
    name: e?.name,
    statusCode: e?.statusCode,
    code: e?.code,
    message: String(e?.message ?? e).slice(0, 1500),
    details: e?.details ? JSON.stringify(e.details).slice(0, 1500) : undefined,
  };
}

async function attempt(fn) {
  try {
    const v = await fn();
    return { ok: true, value: v };
  } catch (e) {
    return { ok: false, ...err(e) };
  }
}

function hex(u8) {
  return u8 ? Buffer.from(u8).toString("hex") : null;
}

async function collect(iter, f = (x) => x) {
  const out = [];
  for await (const x of iter) out.push(f(x));
  return out;
}

async function pageSizes(iter, maxPageSize) {
  const sizes = [];
  for await (const page of iter.byPage({ maxPageSize })) sizes.push(page.length);
  return sizes;
}

async function timed(fn) {
  const t0 = Date.now();
  const v = await fn();
  return [v, Date.now() - t0];
}

function pemBlocks(text, label) {
  const re = new RegExp(`-----BEGIN ${label}-----[\\s\\S]+?-----END ${label}-----`, "g");
  return text.match(re) ?? [];
}

function policyView(p) {
  if (!p) return null;
  return {
    issuerName: p.issuerName,
    subject: p.subject,
    subjectAlternativeNames: p.subjectAlternativeNames,
    contentType: p.contentType,
    keyType: p.keyType,
    keySize: p.keySize,
    keyCurveName: p.keyCurveName,
    exportable: p.exportable,
    reuseKey: p.reuseKey,
    validityInMonths: p.validityInMonths,
    enhancedKeyUsage: p.enhancedKeyUsage,
    keyUsage: p.keyUsage,
    lifetimeActions: p.lifetimeActions,
    enabled: p.enabled,
  };
}

function certView(c) {
  return {
    name: c.name,
    id: c.properties.id,
    version: c.properties.version,
    thumbprint: hex(c.properties.x509Thumbprint),
    keyId: c.keyId,
    secretId: c.secretId,
    cerLength: c.cer?.length ?? 0,
    cerSha1: c.cer ? crypto.createHash("sha1").update(c.cer).digest("hex") : null,
    cerSubject: c.cer ? new crypto.X509Certificate(Buffer.from(c.cer)).subject : null,
    notBefore: c.properties.notBefore?.toISOString(),
    expiresOn: c.properties.expiresOn?.toISOString(),
    enabled: c.properties.enabled,
    policy: policyView(c.policy),
  };
}

function pemView(value, caPem) {
  const certs = pemBlocks(value, "CERTIFICATE");
  const keys = pemBlocks(value, "PRIVATE KEY");
  const out = { privateKeys: keys.length, certificates: certs.length, keyFirst: value.trimStart().startsWith("-----BEGIN PRIVATE KEY-----") };
  if (!certs.length) return out;
  const leaf = new crypto.X509Certificate(certs[0]);
  out.leafSubject = leaf.subject;
  out.leafIssuer = leaf.issuer;
  out.leafSan = leaf.subjectAltName;
  out.leafSha1 = leaf.fingerprint.replace(/:/g, "").toLowerCase();
  out.leafKeyType = leaf.publicKey.asymmetricKeyType;
  out.leafCurve = leaf.publicKey.asymmetricKeyDetails?.namedCurve;
  out.leafValidFrom = new Date(leaf.validFrom).toISOString();
  out.leafValidTo = new Date(leaf.validTo).toISOString();
  if (keys.length) {
    const priv = crypto.createPrivateKey(keys[0]);
    const a = crypto.createPublicKey(priv).export({ type: "spki", format: "der" });
    const b = leaf.publicKey.export({ type: "spki", format: "der" });
    out.keyMatchesLeaf = Buffer.compare(a, b) === 0;
  }
  if (caPem) {
    const ca = new crypto.X509Certificate(caPem);
    out.leafVerifiedByCa = leaf.verify(ca.publicKey);
    out.leafCheckIssued = leaf.checkIssued(ca);
    out.chainSha1 = certs.slice(1).map((c) => new crypto.X509Certificate(c).fingerprint.replace(/:/g, "").toLowerCase());
    out.caSha1 = ca.fingerprint.replace(/:/g, "").toLowerCase();
  }
  return out;
}

function credential() {
  return new ManagedIdentityCredential(args.clientId ? { clientId: args.clientId } : {});
}

// ------------------------------------------------------------------ scenarios
async function secrets() {
  const client = new SecretClient(args.url, credential());
  const out = {};
  const name = "app-secret";
  const s1 = await client.setSecret(name, "value-one", { contentType: "text/plain", tags: { env: "test", team: "node" } });
  const s2 = await client.setSecret(name, "value-two");
  out.set = { id: s1.properties.id, name: s1.name, version: s1.properties.version, value: s1.value,
    contentType: s1.properties.contentType, tags: s1.properties.tags, enabled: s1.properties.enabled,
    createdOn: s1.properties.createdOn?.toISOString(), recoveryLevel: s1.properties.recoveryLevel,
    recoverableDays: s1.properties.recoverableDays, vaultUrl: s1.properties.vaultUrl };
  out.version2 = s2.properties.version;
  const latest = await client.getSecret(name);
  out.latest = { value: latest.value, version: latest.properties.version, contentType: latest.properties.contentType };
  const v1 = await client.getSecret(name, { version: s1.properties.version });
  out.byVersion = { value: v1.value, version: v1.properties.version, contentType: v1.properties.contentType, tags: v1.properties.tags };

  const dis = await client.updateSecretProperties(name, s2.properties.version, { enabled: false });
  out.disabledProps = { enabled: dis.enabled, hasValue: dis.value !== undefined, version: dis.version };
  out.getDisabled = await attempt(() => client.getSecret(name));
  out.getOlderWhileLatestDisabled = (await attempt(async () => (await client.getSecret(name, { version: s1.properties.version })).value));
  const en = await client.updateSecretProperties(name, s2.properties.version, { enabled: true, tags: { rotated: "yes" } });
  out.reenabled = { enabled: en.enabled, tags: en.tags, value: (await client.getSecret(name)).value };

  // 30 more secrets (sequential: the request trace pairs each response with the last request)
  for (let i = 0; i < 30; i++) await client.setSecret(`bulk-${String(i).padStart(2, "0")}`, `bulk-value-${i}`);
  let t = trace.length;
  out.listNames = await collect(client.listPropertiesOfSecrets(), (p) => p.name);
  out.listRequests = vaultTrace(t).filter((x) => x.startsWith("GET /secrets"));
  out.listItem = await (async () => {
    for await (const p of client.listPropertiesOfSecrets()) if (p.name === name) return { id: p.id, version: p.version, contentType: p.contentType, tags: p.tags, enabled: p.enabled };
    return null;
  })();
  out.pageSizes10 = await pageSizes(client.listPropertiesOfSecrets(), 10);
  out.versions = await collect(client.listPropertiesOfSecretVersions(name), (p) => ({ version: p.version, enabled: p.enabled, id: p.id }));
  out.versionPageSizes1 = await pageSizes(client.listPropertiesOfSecretVersions(name), 1);

  // soft delete → get deleted → conflict → recover
  t = trace.length;
  const [deleted, deleteMs] = await timed(async () => (await client.beginDeleteSecret(name)).pollUntilDone());
  out.deleted = { name: deleted.name, recoveryId: deleted.recoveryId, deletedOn: deleted.deletedOn?.toISOString(),
    scheduledPurgeDate: deleted.scheduledPurgeDate?.toISOString(), id: deleted.properties.id, value: deleted.value,
    propsRecoveryId: deleted.properties.recoveryId, ms: deleteMs };
  out.deleteRequests = vaultTrace(t);
  out.deleteRequestsTimed = vaultTraceTimed(t);
  const gd = await client.getDeletedSecret(name);
  out.getDeleted = { name: gd.name, recoveryId: gd.recoveryId, deletedOn: gd.deletedOn?.toISOString() };
  out.listDeleted = await collect(client.listDeletedSecrets(), (d) => d.name);
  out.getWhileDeleted = await attempt(() => client.getSecret(name));
  out.setWhileDeleted = await attempt(() => client.setSecret(name, "reuse"));
  t = trace.length;
  const [recovered, recoverMs] = await timed(async () => (await client.beginRecoverDeletedSecret(name)).pollUntilDone());
  out.recovered = { name: recovered.name, version: recovered.version, enabled: recovered.enabled, ms: recoverMs };
  out.recoverRequests = vaultTrace(t);
  out.afterRecover = (await client.getSecret(name)).value;
  out.versionsAfterRecover = (await collect(client.listPropertiesOfSecretVersions(name))).length;

  // delete + purge
  await (await client.beginDeleteSecret(name)).pollUntilDone();
  t = trace.length;
  out.purge = await attempt(() => client.purgeDeletedSecret(name));
  out.purgeRequests = vaultTrace(t);
  out.getAfterPurge = await attempt(() => client.getSecret(name));
  out.getDeletedAfterPurge = await attempt(() => client.getDeletedSecret(name));
  out.setAfterPurge = (await client.setSecret(name, "fresh")).value;
  out.getMissingVersion = await attempt(() => client.getSecret("bulk-00", { version: "0123456789abcdef0123456789abcdef" }));
  return out;
}

async function backup() {
  const client = new SecretClient(args.url, credential());
  const out = {};
  await client.setSecret("backed-up", "v1", { contentType: "text/plain", tags: { k: "v" } });
  await client.setSecret("backed-up", "v2");
  out.backup = await attempt(async () => (await client.backupSecret("backed-up"))?.length ?? 0);
  if (!out.backup.ok) return out;
  const blob = await client.backupSecret("backed-up");
  out.restoreExisting = await attempt(async () => (await client.restoreSecretBackup(blob)).name);
  await (await client.beginDeleteSecret("backed-up")).pollUntilDone();
  await client.purgeDeletedSecret("backed-up");
  out.restore = await attempt(async () => {
    const p = await client.restoreSecretBackup(blob);
    return { name: p.name, contentType: p.contentType, tags: p.tags };
  });
  out.afterRestore = await attempt(async () => (await client.getSecret("backed-up")).value);
  out.versionsAfterRestore = (await collect(client.listPropertiesOfSecretVersions("backed-up"))).length;
  return out;
}

async function certs() {
  const cred = credential();
  const cc = new CertificateClient(args.url, cred);
  const sc = new SecretClient(args.url, cred);
  const caPem = fs.readFileSync(args.caFile, "utf8");
  const out = {};

  // 1. Self-signed, PKCS#12
  let t = trace.length;
  const [self, selfMs] = await timed(async () =>
    (await cc.beginCreateCertificate("self-pfx", { issuerName: "Self", subject: "CN=node.example", contentType: "application/x-pkcs12" })).pollUntilDone());
  out.self = { ...certView(self), ms: selfMs };
  out.createRequests = vaultTrace(t);
  out.createRequestsTimed = vaultTraceTimed(t);
  const pfx = await sc.getSecret("self-pfx");
  out.selfSecret = { contentType: pfx.properties.contentType, managed: pfx.properties.managed, keyId: pfx.properties.certificateKeyId,
    id: pfx.properties.id, version: pfx.properties.version, value: pfx.value };
  try {
    const ctx = tls.createSecureContext({ pfx: Buffer.from(pfx.value, "base64"), passphrase: "" });
    out.selfPfxLoaded = true;
    try {
      const der = ctx.context.getCertificate();
      out.selfPfxLeafSha1 = der ? crypto.createHash("sha1").update(der).digest("hex") : null;
    } catch {
      out.selfPfxLeafSha1 = null;
    }
  } catch (e) {
    out.selfPfxLoaded = false;
    out.selfPfxError = err(e);
  }

  // 2. Keyless CA, EC P-256, PEM with SANs
  t = trace.length;
  const [ec, ecMs] = await timed(async () =>
    (await cc.beginCreateCertificate("ec-pem", {
      issuerName: "Keyless", subject: "CN=ec.node.example", subjectAlternativeNames: { dnsNames: ["ec.node.example", "alt.node.example"] },
      contentType: "application/x-pem-file", keyType: "EC", keyCurveName: "P-256",
    })).pollUntilDone());
  out.ec = { ...certView(ec), ms: ecMs };
  out.ecCreateRequestsTimed = vaultTraceTimed(t);
  const ecSecret = await sc.getSecret("ec-pem");
  out.ecSecret = { contentType: ecSecret.properties.contentType, managed: ecSecret.properties.managed, ...pemView(ecSecret.value, caPem) };

  // 3. Import PEM text (node sends the raw PEM), and the same bytes without a content type (node sends base64)
  const [imp, impMs] = await timed(() =>
    cc.importCertificate("imported", Buffer.from(args.importPem), { policy: { contentType: "application/x-pem-file" }, tags: { src: "node" } }));
  out.imported = { ...certView(imp), tags: imp.properties.tags, ms: impMs };
  out.importedB64 = await attempt(async () => certView(await cc.importCertificate("imported-b64", Buffer.from(args.importPem))));
  const impSecret = await sc.getSecret("imported");
  out.importedSecret = { contentType: impSecret.properties.contentType, ...pemView(impSecret.value) };

  // 4. Policy update
  const pol = await cc.getCertificatePolicy("self-pfx");
  out.policyBefore = policyView(pol);
  const upd = await cc.updateCertificatePolicy("self-pfx", { ...pol, lifetimeActions: [{ action: "AutoRenew", daysBeforeExpiry: 10 }] });
  out.policyUpdateReturned = policyView(upd);
  out.policyAfter = policyView(await cc.getCertificatePolicy("self-pfx"));
  out.policyInCert = policyView((await cc.getCertificate("self-pfx")).policy);

  // 5. Listing
  out.listNames = await collect(cc.listPropertiesOfCertificates(), (p) => p.name);
  out.listThumbprints = Object.fromEntries(await collect(cc.listPropertiesOfCertificates(), (p) => [p.name, hex(p.x509Thumbprint)]));
  out.versions = await collect(cc.listPropertiesOfCertificateVersions("self-pfx"), (p) => p.version);
  out.getByVersion = certView(await cc.getCertificateVersion("self-pfx", self.properties.version));
  out.operation = await attempt(async () => {
    const p = await cc.getCertificateOperation("self-pfx");
    const op = p.getOperationState().certificateOperation;
    return { status: op?.status, target: op?.target, issuerName: op?.issuerName, hasCsr: !!op?.csr?.length };
  });

  // 6. Delete → deleted → recover
  t = trace.length;
  const [del, delMs] = await timed(async () => (await cc.beginDeleteCertificate("imported")).pollUntilDone());
  out.deleted = { name: del.name, recoveryId: del.recoveryId, deletedOn: del.deletedOn?.toISOString(),
    scheduledPurgeDate: del.scheduledPurgeDate?.toISOString(), ms: delMs };
  out.deleteRequests = vaultTrace(t);
  const gd = await cc.getDeletedCertificate("imported");
  out.getDeleted = { name: gd.name, recoveryId: gd.recoveryId, thumbprint: hex(gd.properties.x509Thumbprint) };
  out.listDeleted = await collect(cc.listDeletedCertificates(), (d) => d.name);
  out.secretWhileDeleted = await attempt(() => sc.getSecret("imported"));
  out.certWhileDeleted = await attempt(() => cc.getCertificate("imported"));
  t = trace.length;
  const [rec, recMs] = await timed(async () => (await cc.beginRecoverDeletedCertificate("imported")).pollUntilDone());
  out.recovered = { ...certView(rec), ms: recMs };
  out.recoverRequests = vaultTrace(t);
  out.secretAfterRecover = await attempt(async () => pemView((await sc.getSecret("imported")).value).leafSha1);

  // 7. Delete + purge
  await (await cc.beginDeleteCertificate("imported-b64")).pollUntilDone().catch(() => null);
  out.purge = await attempt(() => cc.purgeDeletedCertificate("imported-b64"));
  out.getAfterPurge = await attempt(() => cc.getCertificate("imported-b64"));
  return out;
}

async function renew() {
  const cred = credential();
  const cc = new CertificateClient(args.url, cred);
  const sc = new SecretClient(args.url, cred);
  const caPem = fs.readFileSync(args.caFile, "utf8");
  const name = "renew-me";
  if (args.phase === "create") {
    const c = await (await cc.beginCreateCertificate(name, {
      issuerName: "Keyless", subject: "CN=renew.node.example", contentType: "application/x-pem-file",
      validityInMonths: 1, lifetimeActions: [{ action: "AutoRenew", daysBeforeExpiry: 7 }],
    })).pollUntilDone();
    const s = await sc.getSecret(name);
    return { cert: certView(c), secret: { version: s.properties.version, keyId: s.properties.certificateKeyId, ...pemView(s.value, caPem) } };
  }
  const versions = await collect(cc.listPropertiesOfCertificateVersions(name), (p) => ({
    version: p.version, thumbprint: hex(p.x509Thumbprint), notBefore: p.notBefore?.toISOString(), expiresOn: p.expiresOn?.toISOString() }));
  const c = await cc.getCertificate(name);
  const s = await sc.getSecret(name);
  const secretVersions = await collect(sc.listPropertiesOfSecretVersions(name), (p) => p.version);
  return { versions, secretVersions, cert: certView(c),
    secret: { version: s.properties.version, keyId: s.properties.certificateKeyId, previousVersion: s.properties.previousVersion, ...pemView(s.value, caPem) } };
}

function jwkPublic(k) {
  const b = (x) => Buffer.from(x).toString("base64url");
  return k.kty.startsWith("RSA") ? { kty: "RSA", n: b(k.n), e: b(k.e) } : { kty: "EC", crv: k.crv, x: b(k.x), y: b(k.y) };
}

async function keys() {
  const cred = credential();
  const kc = new KeyClient(args.url, cred);
  const out = {};
  const rsa = await kc.createRsaKey("rsa-node", { keySize: 2048 });
  const ec = await kc.createEcKey("ec-node", { curve: "P-256" });
  out.rsa = { id: rsa.id, kty: rsa.keyType, ops: rsa.keyOperations, nBytes: rsa.key?.n?.length, version: rsa.properties.version };
  out.ec = { id: ec.id, kty: ec.keyType, crv: ec.key?.crv, ops: ec.keyOperations };
  out.got = (await kc.getKey("rsa-node")).id;
  out.listNames = await collect(kc.listPropertiesOfKeys(), (p) => p.name);

  const data = Buffer.from("keyless conformance payload");
  const digest = crypto.createHash("sha256").update(data).digest();
  const rsaPub = crypto.createPublicKey({ key: jwkPublic(rsa.key), format: "jwk" });
  const crsa = new CryptographyClient(rsa.id, cred);
  let t = trace.length;
  const sig = await crsa.sign("RS256", digest);
  out.sign = { kid: sig.keyID, algorithm: sig.algorithm, length: sig.result.length,
    localVerify: crypto.verify("sha256", data, rsaPub, Buffer.from(sig.result)) };
  out.verify = (await crsa.verify("RS256", digest, sig.result)).result;
  const bad = Buffer.from(digest); bad[0] ^= 1;
  out.verifyTampered = (await crsa.verify("RS256", bad, sig.result)).result;
  const plain = Buffer.from("attack at dawn");
  const enc = await crsa.encrypt("RSA-OAEP-256", plain);
  out.encryptLength = enc.result.length;
  out.decrypt = Buffer.from((await crsa.decrypt("RSA-OAEP-256", enc.result)).result).toString();
  const localEnc = crypto.publicEncrypt({ key: rsaPub, padding: crypto.constants.RSA_PKCS1_OAEP_PADDING, oaepHash: "sha256" }, plain);
  out.decryptLocalCiphertext = Buffer.from((await crsa.decrypt({ algorithm: "RSA-OAEP-256", ciphertext: localEnc })).result).toString();
  const cek = crypto.randomBytes(32);
  const wrapped = await crsa.wrapKey("RSA-OAEP", cek);
  out.unwrapMatches = Buffer.compare(Buffer.from((await crsa.unwrapKey("RSA-OAEP", wrapped.result)).result), cek) === 0;
  const localWrapped = crypto.publicEncrypt({ key: rsaPub, padding: crypto.constants.RSA_PKCS1_OAEP_PADDING, oaepHash: "sha1" }, cek);
  out.unwrapLocalMatches = Buffer.compare(Buffer.from((await crsa.unwrapKey("RSA-OAEP", localWrapped)).result), cek) === 0;
  out.rsaRequests = vaultTrace(t);

  const cec = new CryptographyClient(ec.id, cred);
  const ecPub = crypto.createPublicKey({ key: jwkPublic(ec.key), format: "jwk" });
  const esig = await cec.sign("ES256", digest);
  out.ecSign = { length: esig.result.length,
    localVerify: crypto.verify("sha256", data, { key: ecPub, dsaEncoding: "ieee-p1363" }, Buffer.from(esig.result)) };
  out.ecVerify = (await cec.verify("ES256", digest, esig.result)).result;
  out.ecVerifyTampered = (await cec.verify("ES256", bad, esig.result)).result;
  out.ecEncrypt = await attempt(() => cec.encrypt("RSA-OAEP", plain));
  return out;
}

async function refused() {
  const sc = new SecretClient(args.url, credential());
  const out = {};
  out.get = await attempt(async () => (await sc.getSecret(args.secretName ?? "app-secret")).value);
  out.set = await attempt(async () => (await sc.setSecret(args.secretName ?? "app-secret", "from-node")).value);
  out.list = await attempt(async () => (await collect(sc.listPropertiesOfSecrets(), (p) => p.name)));
  out.requests = vaultTrace(0);
  return out;
}

async function seed() {
  const sc = new SecretClient(args.url, credential());
  const s = await sc.setSecret(args.secretName, args.value);
  return { version: s.properties.version };
}

const scenarios = { secrets, backup, certs, renew, keys, refused, seed };

async function main() {
  const fn = scenarios[args.scenario];
  if (!fn) throw new Error(`unknown scenario ${args.scenario}`);
  const out = await fn();
  out.trace = trace;
  console.log(JSON.stringify(out));
}

main().catch((e) => {
  console.error(e);
  console.error("trace:", JSON.stringify(trace.slice(-30)));
  process.exit(1);
});
