// Real @azure/arm-msi with ClientSecretCredential (custom authority host, instance discovery
// disabled) against Keyless: create / get / list / delete a user-assigned identity.
// Usage: node arm-msi.mjs '<json args>' (server, tenant, clientId, secret, subscription,
// resourceGroup, identity). NODE_EXTRA_CA_CERTS must name the Keyless CA.
import { createRequire } from "node:module";

const a = JSON.parse(process.argv[2]);
const require = createRequire(process.env.KEYLESS_NODE_MODULES + "/");
const { ClientSecretCredential } = require("@azure/identity");
const { ManagedServiceIdentityClient } = require("@azure/arm-msi");

const cred = new ClientSecretCredential(a.tenant, a.clientId, a.secret, {
  authorityHost: a.server,
  disableInstanceDiscovery: true,
});
const client = new ManagedServiceIdentityClient(cred, a.subscription, {
  endpoint: a.server,
  credentialScopes: ["https://management.azure.com/.default"],
});
const out = {};
const created = await client.userAssignedIdentities.createOrUpdate(a.resourceGroup, a.identity, { location: "local", tags: { from: "node" } });
out.created = created;
out.get = await client.userAssignedIdentities.get(a.resourceGroup, a.identity);
out.listRg = [];
for await (const i of client.userAssignedIdentities.listByResourceGroup(a.resourceGroup)) out.listRg.push(i.name);
out.listSub = [];
for await (const i of client.userAssignedIdentities.listBySubscription()) out.listSub.push(i.name);
await client.userAssignedIdentities.delete(a.resourceGroup, a.identity);
try {
  await client.userAssignedIdentities.get(a.resourceGroup, a.identity);
  out.afterDelete = "found";
} catch (e) {
  out.afterDelete = e.statusCode;
}
console.log(JSON.stringify(out));
