// Run one real @azure/identity credential and print what it returned as JSON, with the token
// verified against the tenant's JWKS (node:crypto, RS256).
// Usage: node client.mjs '<json args>'  — args: credential ("mi" | "wi" | "dac"), options, scope,
// verify {authority, audience}. The CA comes from NODE_EXTRA_CA_CERTS.
import { createRequire } from "node:module";
import crypto from "node:crypto";

const args = JSON.parse(process.argv[2]);
const require = createRequire(process.env.KEYLESS_NODE_MODULES + "/");
const identity = require("@azure/identity");

function b64json(s) {
  return JSON.parse(Buffer.from(s, "base64url").toString());
}

async function main() {
  const cred = args.credential === "mi"
    ? new identity.ManagedIdentityCredential(args.options ?? {})
    : args.credential === "wi"
      ? new identity.WorkloadIdentityCredential(args.options ?? {})
      : new identity.DefaultAzureCredential(args.options ?? {});
  let tok;
  try {
    tok = await cred.getToken(args.scope);
  } catch (e) {
    console.log(JSON.stringify({ error: e.name, message: String(e.message) }));
    return;
  }
  const again = await cred.getToken(args.scope);
  const out = { token: tok.token, expiresOnTimestamp: tok.expiresOnTimestamp, second_token_same: again.token === tok.token };
  if (args.verify) {
    const oidc = await (await fetch(args.verify.authority + "/.well-known/openid-configuration")).json();
    const jwks = await (await fetch(oidc.jwks_uri)).json();
    const [h, p, s] = tok.token.split(".");
    const header = b64json(h);
    const jwk = jwks.keys.find((k) => k.kid === header.kid);
    if (!jwk) throw new Error("kid not in JWKS");
    const key = crypto.createPublicKey({ key: jwk, format: "jwk" });
    const ok = crypto.verify("RSA-SHA256", Buffer.from(`${h}.${p}`), key, Buffer.from(s, "base64url"));
    const claims = b64json(p);
    const now = Date.now() / 1000;
    out.verified = ok && claims.iss === oidc.issuer && claims.aud === args.verify.audience && claims.exp > now && claims.nbf <= now + 300;
    out.claims = claims;
  }
  console.log(JSON.stringify(out));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
