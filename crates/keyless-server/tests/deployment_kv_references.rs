//! Deployment parameters given as Key Vault references, in process on a fresh SQLite store (the
//! harness of `tests/routes.rs`): the secret's value reaches the template, and is never
//! echoed; refused — with nothing deployed — when the vault does not allow template
//! deployments, when the deployer lacks `Microsoft.KeyVault/vaults/deploy/action` on the vault
//! (even one who may write everything the template creates), when the parameter is a plain
//! `string`, when the secret is missing or disabled.

#[allow(dead_code)]
#[path = "routes/harness.rs"]
mod harness;

use harness::*;
use serde_json::{json, Value};

const TOKEN: &str = "STS POST /{tenant}/oauth2/v2.0/token";
const APPS: &str = "GRAPH POST /v1.0/applications";
const GROUP: &str = "ARM PUT /subscriptions/{sub}/resourceGroups/{rg}";
const ASSIGN: &str = "ARM PUT {scope}/providers/Microsoft.Authorization/roleAssignments/{name}";
const VAULT_PUT: &str =
    "ARM PUT /subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.KeyVault/vaults/{vault}";
const SECRET_PUT: &str = "ARM PUT /subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.KeyVault/vaults/{vault}/secrets/{name}";
const SECRET_PATCH: &str = "ARM PATCH /subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.KeyVault/vaults/{vault}/secrets/{name}";
const DEPLOY_PUT: &str =
    "ARM PUT /subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Resources/deployments/{name}";
const DEPLOY_GET: &str =
    "ARM GET /subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Resources/deployments/{name}";
const WHAT_IF: &str =
    "ARM POST /subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Resources/deployments/{name}/whatIf";
const IDENTITY_GET: &str = "ARM GET /subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}";

const ROUTES: &[&str] = &[
    TOKEN,
    APPS,
    GROUP,
    ASSIGN,
    VAULT_PUT,
    SECRET_PUT,
    SECRET_PATCH,
    DEPLOY_PUT,
    DEPLOY_GET,
    WHAT_IF,
    IDENTITY_GET,
];

const KV_ARM: &str = "api-version=2023-07-01";
const DEPLOY: &str = "api-version=2024-11-01";
const MSI: &str = "api-version=2023-01-31";
const CONTRIBUTOR: &str = "b24988ac-6180-42a0-ab88-20f7382dd24c";
const MI_CONTRIBUTOR: &str = "e40ec5ca-96e0-45a2-b4ff-59039f2c2b59";
const VALUE: &str = "from-the-vault-5d1c7a";

/// A template whose identity carries the parameter in a tag (so the test can see it arrived).
fn body(vault: &str, secret: &str, param_type: &str, identity: &str) -> Value {
    json!({"properties": {"mode": "Incremental",
        "template": {
            "$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentTemplate.json#",
            "contentVersion": "1.0.0.0",
            "parameters": {"password": {"type": param_type}},
            "resources": [{"type": "Microsoft.ManagedIdentity/userAssignedIdentities",
                "apiVersion": "2023-01-31", "name": identity, "location": "local",
                "tags": {"seen": "[parameters('password')]"}}],
        },
        "parameters": {"password": {"reference": {"keyVault": {"id": vault}, "secretName": secret}}},
    }})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_vault_reference_passes_the_secret_only_to_who_may_and_where_the_vault_allows() {
    let srv = Srv::start(ROUTES).await;
    let admin = srv.admin_token(ARM_SCOPE).await;
    let rgp = format!("/subscriptions/{}/resourceGroups/rg1", srv.sub);
    srv.expect(
        srv.call(GROUP, format!("{rgp}?api-version=2022-12-01"))
            .bearer(&admin)
            .json(&json!({"location": "local"})),
        201,
    )
    .await;
    let vault = format!("{rgp}/providers/Microsoft.KeyVault/vaults/refvault");
    let put_vault = |enabled: bool| {
        srv.call(VAULT_PUT, format!("{vault}?{KV_ARM}"))
            .bearer(&admin)
            .json(
                &json!({"location": "local", "properties": {"tenantId": srv.tenant,
                "sku": {"family": "A", "name": "standard"}, "accessPolicies": [],
                "enabledForTemplateDeployment": enabled}}),
            )
    };
    srv.expect(put_vault(false), 201).await;
    let secret = format!("{vault}/secrets/db-password");
    let v1 = srv
        .expect(
            srv.call(SECRET_PUT, format!("{secret}?{KV_ARM}"))
                .bearer(&admin)
                .json(&json!({"properties": {"value": VALUE}})),
            201,
        )
        .await;
    let first_version = s(&v1["properties"]["secretUriWithVersion"])
        .rsplit('/')
        .next()
        .unwrap()
        .to_string();
    let deploy = |token: &str, name: &str, b: &Value| {
        srv.call(
            DEPLOY_PUT,
            format!("{rgp}/providers/Microsoft.Resources/deployments/{name}?{DEPLOY}"),
        )
        .bearer(token)
        .json(b)
    };
    let identity = |name: &str| {
        srv.call(
            IDENTITY_GET,
            format!(
                "{rgp}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}?{MSI}"
            ),
        )
        .bearer(&admin)
    };
    let refused = |r: &Resp, status: u16, code: &str, words: &str| {
        arm_error(r, status, code);
        assert!(r.text.contains(words), "{}", r.text);
        assert!(!r.text.contains(VALUE), "{}", r.text);
    };

    // the vault does not allow template deployments
    let b = body(&vault, "db-password", "securestring", "id-a");
    let r = srv.send(deploy(&admin, "d1", &b)).await;
    refused(
        &r,
        400,
        "KeyVaultParameterReferenceSecretRetrieveFailed",
        "enabledForTemplateDeployment",
    );
    assert_eq!(srv.send(identity("id-a")).await.status, 404);
    srv.expect(put_vault(true), 200).await;

    // a deployer who may write identities and deploy, but not `vaults/deploy/action`
    let (mi, mi_oid) = srv.app("mi-contributor", ARM_SCOPE).await;
    srv.assign(&admin, &rgp, MI_CONTRIBUTOR, &mi_oid).await;
    let r = srv.send(deploy(&mi, "d1", &b)).await;
    arm_forbidden(&r, &mi_oid);
    assert!(
        r.text.contains("Microsoft.KeyVault/vaults/deploy/action"),
        "{}",
        r.text
    );
    assert!(!r.text.contains(VALUE));
    // a plain string parameter would echo the value; a missing secret; another subscription
    let r = srv
        .send(deploy(
            &admin,
            "d1",
            &body(&vault, "db-password", "string", "id-a"),
        ))
        .await;
    refused(
        &r,
        400,
        "InvalidTemplate",
        "'securestring' or 'secureobject'",
    );
    let r = srv
        .send(deploy(
            &admin,
            "d1",
            &body(&vault, "nope", "securestring", "id-a"),
        ))
        .await;
    refused(
        &r,
        400,
        "KeyVaultParameterReferenceSecretRetrieveFailed",
        "was not found",
    );
    let elsewhere = vault.replace(&srv.sub, "00000000-0000-0000-0000-000000000000");
    let r = srv
        .send(deploy(
            &admin,
            "d1",
            &body(&elsewhere, "db-password", "securestring", "id-a"),
        ))
        .await;
    arm_error(&r, 403, "AuthorizationFailed");
    assert_eq!(
        srv.send(identity("id-a")).await.status,
        404,
        "nothing deployed"
    );

    // a Contributor (who has `deploy/action`): the value reaches the template, echoed nowhere
    let (dep, dep_oid) = srv.app("deployer", ARM_SCOPE).await;
    srv.assign(&admin, &rgp, CONTRIBUTOR, &dep_oid).await;
    let r = srv.send(deploy(&dep, "d1", &b)).await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert!(!r.text.contains(VALUE), "{}", r.text);
    let mut shown = Value::Null;
    for _ in 0..200 {
        let r = srv
            .send(
                srv.call(
                    DEPLOY_GET,
                    format!("{rgp}/providers/Microsoft.Resources/deployments/d1?{DEPLOY}"),
                )
                .bearer(&admin),
            )
            .await;
        assert!(!r.text.contains(VALUE), "{}", r.text);
        if r.body["properties"]["provisioningState"] == "Succeeded" {
            shown = r.body;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert_eq!(
        shown["properties"]["parameters"]["password"],
        json!({"type": "SecureString"}),
        "{shown}"
    );
    let id = srv.expect(identity("id-a"), 200).await;
    assert_eq!(id["tags"]["seen"], VALUE);

    // a what-if of a new identity tagged from the secret: Create, the value in no part of it
    let r = srv
        .send(
            srv.call(
                WHAT_IF,
                format!("{rgp}/providers/Microsoft.Resources/deployments/w/whatIf?{DEPLOY}"),
            )
            .bearer(&dep)
            .json(&body(&vault, "db-password", "securestring", "id-w")),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    // (the group's id-a is Ignore, showing its tag as any GET of it would)
    let change = &r.body["properties"]["changes"][0];
    assert!(!change.to_string().contains(VALUE), "{}", r.text);
    assert_eq!(change["changeType"], "Create", "{}", r.text);
    assert!(change["after"]["tags"].get("seen").is_none(), "{}", r.text);
    assert_eq!(srv.send(identity("id-w")).await.status, 404);

    // a version by its id (a newer one exists); an unknown version; a secure object from a
    // secret's JSON (not JSON: refused)
    srv.expect(
        srv.call(SECRET_PUT, format!("{secret}?{KV_ARM}"))
            .bearer(&admin)
            .json(&json!({"properties": {"value": "second-5d1c7a"}})),
        200,
    )
    .await;
    let mut pinned = body(&vault, "db-password", "securestring", "id-v");
    pinned["properties"]["parameters"]["password"]["reference"]["secretVersion"] =
        json!(first_version);
    let r = srv.send(deploy(&dep, "d3", &pinned)).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let mut bogus = pinned.clone();
    bogus["properties"]["parameters"]["password"]["reference"]["secretVersion"] =
        json!("0123456789abcdef0123456789abcdef");
    let r = srv.send(deploy(&dep, "d4", &bogus)).await;
    refused(
        &r,
        400,
        "KeyVaultParameterReferenceSecretRetrieveFailed",
        "was not found",
    );
    srv.expect(
        srv.call(SECRET_PUT, format!("{vault}/secrets/settings?{KV_ARM}"))
            .bearer(&admin)
            .json(&json!({"properties": {"value": "{\"pin\": 4242}"}})),
        201,
    )
    .await;
    let mut obj = body(&vault, "settings", "secureObject", "id-o");
    obj["properties"]["template"]["resources"][0]["tags"]["seen"] =
        json!("[string(parameters('password').pin)]");
    let r = srv.send(deploy(&dep, "d5", &obj)).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let r = srv
        .send(deploy(
            &dep,
            "d6",
            &body(&vault, "db-password", "secureObject", "id-x"),
        ))
        .await;
    refused(
        &r,
        400,
        "KeyVaultParameterReferenceSecretRetrieveFailed",
        "not a JSON object",
    );

    // a disabled secret is not read
    srv.expect(
        srv.call(SECRET_PATCH, format!("{secret}?{KV_ARM}"))
            .bearer(&admin)
            .json(&json!({"properties": {"attributes": {"enabled": false}}})),
        200,
    )
    .await;
    let r = srv
        .send(deploy(
            &dep,
            "d2",
            &body(&vault, "db-password", "securestring", "id-b"),
        ))
        .await;
    refused(
        &r,
        400,
        "KeyVaultParameterReferenceSecretRetrieveFailed",
        "disabled",
    );
    assert_eq!(srv.send(identity("id-b")).await.status, 404);
    // the pinned version and the object's member arrived
    for (name, want) in [("id-v", VALUE), ("id-o", "4242")] {
        let mut got = Value::Null;
        for _ in 0..200 {
            let r = srv.send(identity(name)).await;
            if r.status == 200 {
                got = r.body["tags"]["seen"].clone();
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        assert_eq!(got, want, "{name}");
    }
}
