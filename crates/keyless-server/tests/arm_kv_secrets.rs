//! `Microsoft.KeyVault/vaults/secrets` through the control plane (what ARM template deployments
//! create), in process on a fresh SQLite store (the harness of `tests/routes.rs`): a PUT creates
//! (201) and then writes new versions (200); a PATCH changes the metadata only; no ARM answer
//! carries the value; the control-plane right is `Microsoft.KeyVault/vaults/secrets/write`
//! (Contributor suffices, no access policy needed; Reader and a principal without a role are
//! refused); the data plane reads what ARM wrote at once, for a principal whose access policy
//! an ARM template's `accessPolicies/add` gave; the value is sealed at rest.

#[allow(dead_code)]
#[path = "routes/harness.rs"]
mod harness;

use base64::Engine;
use harness::*;
use serde_json::{json, Value};

const TOKEN: &str = "STS POST /{tenant}/oauth2/v2.0/token";
const APPS: &str = "GRAPH POST /v1.0/applications";
const GROUP: &str = "ARM PUT /subscriptions/{sub}/resourceGroups/{rg}";
const ASSIGN: &str = "ARM PUT {scope}/providers/Microsoft.Authorization/roleAssignments/{name}";
const VAULT_PUT: &str =
    "ARM PUT /subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.KeyVault/vaults/{vault}";
const POLICY_PUT: &str = "ARM PUT /subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.KeyVault/vaults/{vault}/accessPolicies/{operation}";
const SECRET_PUT: &str = "ARM PUT /subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.KeyVault/vaults/{vault}/secrets/{name}";
const SECRET_PATCH: &str = "ARM PATCH /subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.KeyVault/vaults/{vault}/secrets/{name}";
const SECRET_GET: &str = "ARM GET /subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.KeyVault/vaults/{vault}/secrets/{name}";
const SECRET_LIST: &str = "ARM GET /subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.KeyVault/vaults/{vault}/secrets";
const KV_GET: &str = "KV GET /secrets/{name}";
const KV_DELETE: &str = "KV DELETE /secrets/{name}";

const ROUTES: &[&str] = &[
    TOKEN,
    APPS,
    GROUP,
    ASSIGN,
    VAULT_PUT,
    POLICY_PUT,
    SECRET_PUT,
    SECRET_PATCH,
    SECRET_GET,
    SECRET_LIST,
    KV_GET,
    KV_DELETE,
];

const KV_ARM: &str = "api-version=2023-07-01";
const KV: &str = "api-version=7.5";
const CONTRIBUTOR: &str = "b24988ac-6180-42a0-ab88-20f7382dd24c";
const READER: &str = "acdd72a7-3385-48ef-bd42-f606fba81ae7";
const V1: &str = "first-value-7c1e9d";
const V2: &str = "second-value-4b8a2f";

/// The version at the end of a secret id.
fn version(id: &Value) -> String {
    s(id).rsplit('/').next().unwrap().to_string()
}

/// No ARM answer carries a value: neither a `value` property nor either value's text.
fn valueless(r: &Resp) {
    assert!(!r.text.contains(V1) && !r.text.contains(V2), "{}", r.text);
    let items = match r.body["value"].as_array() {
        Some(list) => list.clone(),
        None => vec![r.body.clone()],
    };
    for i in items {
        assert!(i["properties"].get("value").is_none(), "{i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arm_secrets_are_written_like_the_data_plane_and_never_answer_their_value() {
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
    // a vault nobody has an access policy on
    let vault = format!("{rgp}/providers/Microsoft.KeyVault/vaults/{VAULT}");
    let body = json!({"location": "local", "properties": {"tenantId": srv.tenant,
        "sku": {"family": "A", "name": "standard"}, "accessPolicies": []}});
    let v = srv
        .expect(
            srv.call(VAULT_PUT, format!("{vault}?{KV_ARM}"))
                .bearer(&admin)
                .json(&body),
            201,
        )
        .await;
    let vault_uri = s(&v["properties"]["vaultUri"]);
    assert!(vault_uri.ends_with('/'), "{vault_uri}");

    let (deployer, deployer_oid) = srv.app("deployer", ARM_SCOPE).await;
    srv.assign(&admin, &rgp, CONTRIBUTOR, &deployer_oid).await;
    let (reader, reader_oid) = srv.app("reader", ARM_SCOPE).await;
    srv.assign(&admin, &rgp, READER, &reader_oid).await;
    let (stranger, stranger_oid) = srv.app("stranger", ARM_SCOPE).await;

    let secret = format!("{vault}/secrets/db-password");
    let path = format!("{secret}?{KV_ARM}");
    let put =
        |token: &str, body: &Value| srv.call(SECRET_PUT, path.clone()).bearer(token).json(body);
    let first = json!({"properties": {"value": V1, "contentType": "text/plain",
        "attributes": {"enabled": true}}, "tags": {"env": "test"}});

    // refused: no token, no role, Reader (`*/read` only); nothing is written
    arm_unauthenticated(
        &srv,
        &srv.send(srv.call(SECRET_PUT, path.clone()).json(&first))
            .await,
    );
    arm_forbidden(&srv.send(put(&stranger, &first)).await, &stranger_oid);
    let r = srv.send(put(&reader, &first)).await;
    arm_forbidden(&r, &reader_oid);
    assert!(
        s(&r.body["error"]["message"]).contains("Microsoft.KeyVault/vaults/secrets/write"),
        "{}",
        r.text
    );
    let r = srv
        .send(srv.call(SECRET_GET, path.clone()).bearer(&admin))
        .await;
    arm_error(&r, 404, "ResourceNotFound");

    // created by a Contributor with no access policy on the vault
    let r = srv.send(put(&deployer, &first)).await;
    assert_eq!(r.status, 201, "{}", r.text);
    valueless(&r);
    let v = &r.body;
    assert_eq!(v["id"], secret.as_str());
    assert_eq!(v["name"], "db-password");
    assert_eq!(v["type"], "Microsoft.KeyVault/vaults/secrets");
    assert_eq!(v["location"], "local");
    assert_eq!(v["tags"], json!({"env": "test"}));
    let p = &v["properties"];
    assert_eq!(p["contentType"], "text/plain");
    assert_eq!(p["attributes"]["enabled"], true);
    assert!(
        p["attributes"]["created"].as_u64().unwrap() > 1_600_000_000,
        "{v}"
    );
    assert_eq!(p["attributes"]["created"], p["attributes"]["updated"]);
    assert_eq!(p["secretUri"], format!("{vault_uri}secrets/db-password"));
    let v1 = version(&p["secretUriWithVersion"]);
    assert_eq!(
        p["secretUriWithVersion"],
        format!("{vault_uri}secrets/db-password/{v1}")
    );
    assert_eq!(v1.len(), 32, "{v}");

    // a second PUT: a new version, 200
    let second = json!({"properties": {"value": V2}});
    let r = srv.send(put(&deployer, &second)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    valueless(&r);
    let v2 = version(&r.body["properties"]["secretUriWithVersion"]);
    assert_ne!(v1, v2);
    // a PUT replaces: what the second did not name is gone
    assert!(
        r.body["properties"].get("contentType").is_none(),
        "{}",
        r.text
    );

    // GET (Reader may) and list: the latest version, never the value
    let r = srv
        .send(srv.call(SECRET_GET, path.clone()).bearer(&reader))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    valueless(&r);
    assert_eq!(version(&r.body["properties"]["secretUriWithVersion"]), v2);
    arm_forbidden(
        &srv.send(srv.call(SECRET_GET, path.clone()).bearer(&stranger))
            .await,
        &stranger_oid,
    );
    let list = format!("{vault}/secrets?{KV_ARM}");
    let r = srv
        .send(srv.call(SECRET_LIST, list.clone()).bearer(&reader))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    valueless(&r);
    let items = r.body["value"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{}", r.text);
    assert_eq!(items[0]["id"], secret.as_str());
    assert_eq!(version(&items[0]["properties"]["secretUriWithVersion"]), v2);
    arm_forbidden(
        &srv.send(srv.call(SECRET_LIST, list.clone()).bearer(&stranger))
            .await,
        &stranger_oid,
    );

    // PATCH: metadata of the latest version, no new version
    let patch = json!({"properties": {"contentType": "application/json"}, "tags": {"env": "prod"}});
    let r = srv
        .send(
            srv.call(SECRET_PATCH, path.clone())
                .bearer(&deployer)
                .json(&patch),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    valueless(&r);
    assert_eq!(version(&r.body["properties"]["secretUriWithVersion"]), v2);
    assert_eq!(r.body["properties"]["contentType"], "application/json");
    assert_eq!(r.body["tags"], json!({"env": "prod"}));
    arm_forbidden(
        &srv.send(
            srv.call(SECRET_PATCH, path.clone())
                .bearer(&reader)
                .json(&patch),
        )
        .await,
        &reader_oid,
    );

    // refused requests: a bad name, a missing value, a missing vault
    for bad in ["bad_name", &"x".repeat(128)] {
        let r = srv
            .send(
                srv.call(SECRET_PUT, format!("{vault}/secrets/{bad}?{KV_ARM}"))
                    .bearer(&deployer)
                    .json(&first),
            )
            .await;
        arm_error(&r, 400, "InvalidResourceName");
    }
    let no_value = format!("{vault}/secrets/no-value?{KV_ARM}");
    let r = srv
        .send(
            srv.call(SECRET_PUT, no_value.clone())
                .bearer(&deployer)
                .json(&json!({"properties": {"contentType": "text/plain"}})),
        )
        .await;
    arm_error(&r, 400, "InvalidParameter");
    let r = srv
        .send(srv.call(SECRET_GET, no_value).bearer(&deployer))
        .await;
    arm_error(&r, 404, "ResourceNotFound");
    let elsewhere = format!("{rgp}/providers/Microsoft.KeyVault/vaults/nope");
    let r = srv
        .send(
            srv.call(
                SECRET_PUT,
                format!("{elsewhere}/secrets/db-password?{KV_ARM}"),
            )
            .bearer(&deployer)
            .json(&first),
        )
        .await;
    arm_error(&r, 404, "ResourceNotFound");
    assert!(
        s(&r.body["error"]["message"]).contains("Microsoft.KeyVault/vaults/nope"),
        "{}",
        r.text
    );
    let r = srv
        .send(
            srv.call(SECRET_LIST, format!("{elsewhere}/secrets?{KV_ARM}"))
                .bearer(&deployer),
        )
        .await;
    arm_error(&r, 404, "ResourceNotFound");

    // the data plane: refused without an access policy, then an ARM template's
    // `Microsoft.KeyVault/vaults/accessPolicies` `{vault}/add` (api-version 2022-07-01,
    // permissions as templates spell them) lets the workload read what ARM wrote
    let (workload, workload_oid) = srv.app("workload", KV_SCOPE).await;
    let read = || {
        srv.call(KV_GET, format!("/secrets/db-password?{KV}"))
            .bearer(&workload)
    };
    let r = srv.send(read()).await;
    kv_error(&r, 403, "Forbidden", Some("ForbiddenByPolicy"));
    let add = json!({"properties": {"accessPolicies": [{"tenantId": srv.tenant,
        "objectId": workload_oid.to_ascii_uppercase(),
        "permissions": {"secrets": ["Get", "Delete"]}}]}});
    let v = srv
        .expect(
            srv.call(
                POLICY_PUT,
                format!("{vault}/accessPolicies/add?api-version=2022-07-01"),
            )
            .bearer(&deployer)
            .json(&add),
            200,
        )
        .await;
    assert_eq!(v["type"], "Microsoft.KeyVault/vaults/accessPolicies");
    assert_eq!(
        v["properties"]["accessPolicies"][0]["permissions"]["secrets"],
        json!(["get", "delete"])
    );
    let v = srv.expect(read(), 200).await;
    assert_eq!(v["value"], V2);
    assert_eq!(version(&v["id"]), v2);
    assert_eq!(v["contentType"], "application/json");
    assert_eq!(v["tags"], json!({"env": "prod"}));

    // at rest: sealed, as a value set through the data plane is (the rows are in the dump,
    // the values in neither plain text nor base64)
    let mut dump = Vec::new();
    srv.s.store.backup(&mut dump).await.unwrap();
    let dump = String::from_utf8(dump).unwrap();
    assert!(dump.contains("db-password") && dump.contains("application/json"));
    let b64 = base64::engine::general_purpose::STANDARD;
    for value in [V1, V2] {
        assert!(!dump.contains(value), "{value} is stored in plain text");
        assert!(
            !dump.contains(&b64.encode(value)),
            "{value} is stored unsealed"
        );
    }

    // a soft-deleted secret: its name is refused as the data plane refuses it (409), and ARM
    // no longer finds it
    srv.expect(
        srv.call(KV_DELETE, format!("/secrets/db-password?{KV}"))
            .bearer(&workload),
        200,
    )
    .await;
    let r = srv.send(put(&deployer, &second)).await;
    arm_error(&r, 409, "ObjectIsDeletedButRecoverable");
    let r = srv
        .send(srv.call(SECRET_GET, path.clone()).bearer(&deployer))
        .await;
    arm_error(&r, 404, "ResourceNotFound");
    let v = srv
        .expect(srv.call(SECRET_LIST, list).bearer(&deployer), 200)
        .await;
    assert_eq!(v["value"], json!([]));
}
