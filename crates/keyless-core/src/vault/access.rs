//! What each data-plane operation needs: the access-policy permission (vaults with access
//! policies) or the RBAC data action (vaults with `enableRbacAuthorization`), and the decision
//! for each model.

use super::Coll;

/// A data-plane operation, as far as authorization is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Read an object with its value (secret value, key, certificate, policy, pending op).
    Get,
    /// Read metadata: list, list versions, list deleted, get deleted.
    List,
    GetDeleted,
    /// Secrets: set a new version.
    Set,
    /// Update attributes / tags / policy.
    Update,
    Delete,
    Recover,
    Purge,
    Backup,
    Restore,
    /// Keys and certificates: create.
    Create,
    Import,
    /// Key cryptography.
    Encrypt,
    Decrypt,
    WrapKey,
    UnwrapKey,
    Sign,
    Verify,
    Rotate,
    /// Certificate contacts and issuers.
    ManageContacts,
    GetIssuers,
    ListIssuers,
    SetIssuers,
    DeleteIssuers,
}

/// What an operation on a collection needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    pub coll: Coll,
    /// Access-policy permission (lower-case as on the wire, except key crypto ops).
    pub permission: &'static str,
    /// RBAC data action.
    pub data_action: &'static str,
}

/// The permission and data action `op` on `coll` needs.
pub fn need(coll: Coll, op: Op) -> Need {
    use Op::*;
    let (permission, data_action) = match (coll, op) {
        (Coll::Secrets, Get) => ("get", "Microsoft.KeyVault/vaults/secrets/getSecret/action"),
        (Coll::Secrets, GetDeleted) => (
            "get",
            "Microsoft.KeyVault/vaults/secrets/readMetadata/action",
        ),
        (Coll::Secrets, List) => (
            "list",
            "Microsoft.KeyVault/vaults/secrets/readMetadata/action",
        ),
        (Coll::Secrets, Set) => ("set", "Microsoft.KeyVault/vaults/secrets/setSecret/action"),
        (Coll::Secrets, Update) => ("set", "Microsoft.KeyVault/vaults/secrets/update/action"),
        (Coll::Secrets, Delete) => ("delete", "Microsoft.KeyVault/vaults/secrets/delete"),
        (Coll::Secrets, Recover) => (
            "recover",
            "Microsoft.KeyVault/vaults/secrets/recover/action",
        ),
        (Coll::Secrets, Purge) => ("purge", "Microsoft.KeyVault/vaults/secrets/purge/action"),
        (Coll::Secrets, Backup) => ("backup", "Microsoft.KeyVault/vaults/secrets/backup/action"),
        (Coll::Secrets, Restore) => (
            "restore",
            "Microsoft.KeyVault/vaults/secrets/restore/action",
        ),
        (Coll::Secrets, _) => ("set", "Microsoft.KeyVault/vaults/secrets/setSecret/action"),

        (Coll::Keys, Get | GetDeleted) => ("get", "Microsoft.KeyVault/vaults/keys/read"),
        (Coll::Keys, List) => ("list", "Microsoft.KeyVault/vaults/keys/read"),
        (Coll::Keys, Update | Set) => ("update", "Microsoft.KeyVault/vaults/keys/update/action"),
        (Coll::Keys, Create) => ("create", "Microsoft.KeyVault/vaults/keys/create/action"),
        (Coll::Keys, Import) => ("import", "Microsoft.KeyVault/vaults/keys/import/action"),
        (Coll::Keys, Delete) => ("delete", "Microsoft.KeyVault/vaults/keys/delete"),
        (Coll::Keys, Recover) => ("recover", "Microsoft.KeyVault/vaults/keys/recover/action"),
        (Coll::Keys, Purge) => ("purge", "Microsoft.KeyVault/vaults/keys/purge/action"),
        (Coll::Keys, Backup) => ("backup", "Microsoft.KeyVault/vaults/keys/backup/action"),
        (Coll::Keys, Restore) => ("restore", "Microsoft.KeyVault/vaults/keys/restore/action"),
        (Coll::Keys, Encrypt) => ("encrypt", "Microsoft.KeyVault/vaults/keys/encrypt/action"),
        (Coll::Keys, Decrypt) => ("decrypt", "Microsoft.KeyVault/vaults/keys/decrypt/action"),
        (Coll::Keys, WrapKey) => ("wrapKey", "Microsoft.KeyVault/vaults/keys/wrap/action"),
        (Coll::Keys, UnwrapKey) => ("unwrapKey", "Microsoft.KeyVault/vaults/keys/unwrap/action"),
        (Coll::Keys, Sign) => ("sign", "Microsoft.KeyVault/vaults/keys/sign/action"),
        (Coll::Keys, Verify) => ("verify", "Microsoft.KeyVault/vaults/keys/verify/action"),
        (Coll::Keys, Rotate) => ("rotate", "Microsoft.KeyVault/vaults/keys/rotate/action"),
        (Coll::Keys, _) => ("update", "Microsoft.KeyVault/vaults/keys/update/action"),

        (Coll::Certificates, Get | GetDeleted) => {
            ("get", "Microsoft.KeyVault/vaults/certificates/read")
        }
        (Coll::Certificates, List) => ("list", "Microsoft.KeyVault/vaults/certificates/read"),
        (Coll::Certificates, Update | Set) => (
            "update",
            "Microsoft.KeyVault/vaults/certificates/update/action",
        ),
        (Coll::Certificates, Create) => (
            "create",
            "Microsoft.KeyVault/vaults/certificates/create/action",
        ),
        (Coll::Certificates, Import) => (
            "import",
            "Microsoft.KeyVault/vaults/certificates/import/action",
        ),
        (Coll::Certificates, Delete) => ("delete", "Microsoft.KeyVault/vaults/certificates/delete"),
        (Coll::Certificates, Recover) => (
            "recover",
            "Microsoft.KeyVault/vaults/certificates/recover/action",
        ),
        (Coll::Certificates, Purge) => (
            "purge",
            "Microsoft.KeyVault/vaults/certificates/purge/action",
        ),
        (Coll::Certificates, Backup) => (
            "backup",
            "Microsoft.KeyVault/vaults/certificates/backup/action",
        ),
        (Coll::Certificates, Restore) => (
            "restore",
            "Microsoft.KeyVault/vaults/certificates/restore/action",
        ),
        (Coll::Certificates, ManageContacts) => (
            "managecontacts",
            "Microsoft.KeyVault/vaults/certificatecontacts/write",
        ),
        (Coll::Certificates, GetIssuers) => (
            "getissuers",
            "Microsoft.KeyVault/vaults/certificatecas/read",
        ),
        (Coll::Certificates, ListIssuers) => (
            "listissuers",
            "Microsoft.KeyVault/vaults/certificatecas/read",
        ),
        (Coll::Certificates, SetIssuers) => (
            "setissuers",
            "Microsoft.KeyVault/vaults/certificatecas/write",
        ),
        (Coll::Certificates, DeleteIssuers) => (
            "deleteissuers",
            "Microsoft.KeyVault/vaults/certificatecas/delete",
        ),
        (Coll::Certificates, _) => (
            "update",
            "Microsoft.KeyVault/vaults/certificates/update/action",
        ),
    };
    Need {
        coll,
        permission,
        data_action,
    }
}

/// The permission strings an access policy may hold per collection (`all` grants every one).
pub fn known_permissions(coll: Coll) -> &'static [&'static str] {
    match coll {
        Coll::Secrets => &[
            "get", "list", "set", "delete", "backup", "restore", "recover", "purge", "all",
        ],
        Coll::Keys => &[
            "get",
            "list",
            "create",
            "update",
            "import",
            "delete",
            "backup",
            "restore",
            "recover",
            "purge",
            "encrypt",
            "decrypt",
            "wrapkey",
            "unwrapkey",
            "sign",
            "verify",
            "release",
            "rotate",
            "getrotationpolicy",
            "setrotationpolicy",
            "all",
        ],
        Coll::Certificates => &[
            "get",
            "list",
            "delete",
            "create",
            "import",
            "update",
            "managecontacts",
            "getissuers",
            "listissuers",
            "setissuers",
            "deleteissuers",
            "manageissuers",
            "recover",
            "purge",
            "backup",
            "restore",
            "all",
        ],
    }
}

/// Whether a permission string is known for `coll` (case-insensitive).
pub fn known_permission(coll: Coll, p: &str) -> bool {
    known_permissions(coll)
        .iter()
        .any(|k| k.eq_ignore_ascii_case(p))
}

/// Whether an access policy's permission list grants `permission` (case-insensitive; `all`;
/// `manageissuers` covers the four issuer permissions).
pub fn policy_grants(granted: &[String], permission: &str) -> bool {
    granted.iter().any(|g| {
        g.eq_ignore_ascii_case(permission)
            || g.eq_ignore_ascii_case("all")
            || (g.eq_ignore_ascii_case("manageissuers") && permission.ends_with("issuers"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_needs() {
        let n = need(Coll::Secrets, Op::Get);
        assert_eq!(n.permission, "get");
        assert_eq!(
            n.data_action,
            "Microsoft.KeyVault/vaults/secrets/getSecret/action"
        );
        assert_eq!(need(Coll::Secrets, Op::Update).permission, "set");
        assert_eq!(
            need(Coll::Secrets, Op::List).data_action,
            "Microsoft.KeyVault/vaults/secrets/readMetadata/action"
        );
        assert_eq!(need(Coll::Secrets, Op::Purge).permission, "purge");
    }

    #[test]
    fn key_and_cert_needs() {
        assert_eq!(
            need(Coll::Keys, Op::WrapKey).data_action,
            "Microsoft.KeyVault/vaults/keys/wrap/action"
        );
        assert_eq!(need(Coll::Certificates, Op::Create).permission, "create");
        assert_eq!(
            need(Coll::Certificates, Op::Get).data_action,
            "Microsoft.KeyVault/vaults/certificates/read"
        );
    }

    #[test]
    fn grants() {
        let g = vec!["Get".to_string(), "List".to_string()];
        assert!(policy_grants(&g, "get"));
        assert!(!policy_grants(&g, "set"));
        assert!(policy_grants(&["all".to_string()], "purge"));
        assert!(policy_grants(&["manageissuers".to_string()], "setissuers"));
        assert!(!policy_grants(&[], "get"));
        assert!(known_permission(Coll::Keys, "wrapKey"));
        assert!(!known_permission(Coll::Secrets, "sign"));
    }
}

/// One access-policy entry of a vault (ARM `properties.accessPolicies[]`).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AccessPolicy {
    pub tenant_id: String,
    pub object_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub application_id: Option<String>,
    #[serde(default)]
    pub permissions: Permissions,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Permissions {
    #[serde(default)]
    pub keys: Vec<String>,
    #[serde(default)]
    pub secrets: Vec<String>,
    #[serde(default)]
    pub certificates: Vec<String>,
    #[serde(default)]
    pub storage: Vec<String>,
}

impl Permissions {
    pub fn of(&self, coll: Coll) -> &[String] {
        match coll {
            Coll::Secrets => &self.secrets,
            Coll::Keys => &self.keys,
            Coll::Certificates => &self.certificates,
        }
    }
    fn of_mut(&mut self, coll: Coll) -> &mut Vec<String> {
        match coll {
            Coll::Secrets => &mut self.secrets,
            Coll::Keys => &mut self.keys,
            Coll::Certificates => &mut self.certificates,
        }
    }
    fn is_empty(&self) -> bool {
        self.keys.is_empty()
            && self.secrets.is_empty()
            && self.certificates.is_empty()
            && self.storage.is_empty()
    }
}

/// Largest number of access policies on a vault.
pub const MAX_ACCESS_POLICIES: usize = 1024;

/// Validate access policies: GUID-shaped ids, known permissions; returns them with
/// permissions in their canonical spelling.
pub fn validate_policies(policies: Vec<AccessPolicy>) -> Result<Vec<AccessPolicy>, String> {
    if policies.len() > MAX_ACCESS_POLICIES {
        return Err(format!(
            "A vault may hold at most {MAX_ACCESS_POLICIES} access policies."
        ));
    }
    let guid = |s: &str| {
        s.len() == 36
            && s.bytes().enumerate().all(|(i, b)| {
                if [8, 13, 18, 23].contains(&i) {
                    b == b'-'
                } else {
                    b.is_ascii_hexdigit()
                }
            })
    };
    let mut out = Vec::with_capacity(policies.len());
    for (i, mut p) in policies.into_iter().enumerate() {
        if !guid(&p.object_id) {
            return Err(format!(
                "Invalid value found at accessPolicies[{i}].ObjectId: '{}'",
                p.object_id
            ));
        }
        if !guid(&p.tenant_id) {
            return Err(format!(
                "Invalid value found at accessPolicies[{i}].TenantId: '{}'",
                p.tenant_id
            ));
        }
        if let Some(a) = &p.application_id {
            if !guid(a) {
                return Err(format!(
                    "Invalid value found at accessPolicies[{i}].ApplicationId: '{a}'"
                ));
            }
        }
        p.object_id = p.object_id.to_ascii_lowercase();
        for coll in Coll::ALL {
            let list = p.permissions.of_mut(coll);
            for perm in list.iter_mut() {
                let canon = known_permissions(coll)
                    .iter()
                    .find(|k| k.eq_ignore_ascii_case(perm))
                    .ok_or_else(|| {
                        format!(
                            "Invalid value found at accessPolicies[{i}].permissions.{}: '{perm}'",
                            coll.path()
                        )
                    })?;
                *perm = canon.to_string();
            }
            list.dedup();
        }
        out.push(p);
    }
    Ok(out)
}

/// How `accessPolicies/{kind}` changes a vault's policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyUpdate {
    Add,
    Replace,
    Remove,
}

/// Apply an `accessPolicies/add|replace|remove` request: entries match on tenant, object and
/// application id; `add` unions permissions, `replace` overwrites the entry, `remove` takes
/// the listed permissions away (an entry left with none is dropped).
pub fn update_policies(
    mut current: Vec<AccessPolicy>,
    kind: PolicyUpdate,
    changes: Vec<AccessPolicy>,
) -> Vec<AccessPolicy> {
    let same = |a: &AccessPolicy, b: &AccessPolicy| {
        a.tenant_id.eq_ignore_ascii_case(&b.tenant_id)
            && a.object_id.eq_ignore_ascii_case(&b.object_id)
            && a.application_id.as_deref().map(str::to_ascii_lowercase)
                == b.application_id.as_deref().map(str::to_ascii_lowercase)
    };
    for c in changes {
        let pos = current.iter().position(|p| same(p, &c));
        match (kind, pos) {
            (PolicyUpdate::Add, Some(i)) => {
                for coll in Coll::ALL {
                    let have = current[i].permissions.of_mut(coll);
                    for p in c.permissions.of(coll) {
                        if !have.iter().any(|h| h.eq_ignore_ascii_case(p)) {
                            have.push(p.clone());
                        }
                    }
                }
            }
            (PolicyUpdate::Add | PolicyUpdate::Replace, None) => current.push(c),
            (PolicyUpdate::Replace, Some(i)) => current[i] = c,
            (PolicyUpdate::Remove, Some(i)) => {
                let drop_all = c.permissions.is_empty();
                for coll in Coll::ALL {
                    let gone = c.permissions.of(coll).to_vec();
                    current[i]
                        .permissions
                        .of_mut(coll)
                        .retain(|h| !gone.iter().any(|g| g.eq_ignore_ascii_case(h)));
                }
                if drop_all || current[i].permissions.is_empty() {
                    current.remove(i);
                }
            }
            (PolicyUpdate::Remove, None) => {}
        }
    }
    current
}

/// The permissions `object_id` (calling as application `app_id`) holds on `coll` under
/// `policies` of tenant `tenant_id`.
pub fn permissions_of(
    policies: &[AccessPolicy],
    tenant_id: &str,
    object_id: &str,
    app_id: &str,
    coll: Coll,
) -> Vec<String> {
    policies
        .iter()
        .filter(|p| {
            p.tenant_id.eq_ignore_ascii_case(tenant_id)
                && p.object_id.eq_ignore_ascii_case(object_id)
                && p.application_id
                    .as_deref()
                    .is_none_or(|a| a.eq_ignore_ascii_case(app_id))
        })
        .flat_map(|p| p.permissions.of(coll).iter().cloned())
        .collect()
}

#[cfg(test)]
mod policy_tests {
    use super::*;

    const T: &str = "11111111-1111-1111-1111-111111111111";
    const O: &str = "22222222-2222-2222-2222-222222222222";

    fn ap(secrets: &[&str]) -> AccessPolicy {
        AccessPolicy {
            tenant_id: T.into(),
            object_id: O.into(),
            application_id: None,
            permissions: Permissions {
                secrets: secrets.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            },
        }
    }

    #[test]
    fn validate() {
        let v = validate_policies(vec![ap(&["GET", "List"])]).unwrap();
        assert_eq!(v[0].permissions.secrets, vec!["get", "list"]);
        assert!(validate_policies(vec![ap(&["sign"])]).is_err());
        let mut bad = ap(&["get"]);
        bad.object_id = "nope".into();
        assert!(validate_policies(vec![bad]).is_err());
    }

    #[test]
    fn add_replace_remove() {
        let p = update_policies(vec![], PolicyUpdate::Add, vec![ap(&["get"])]);
        let p = update_policies(p, PolicyUpdate::Add, vec![ap(&["list", "get"])]);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].permissions.secrets, vec!["get", "list"]);
        assert_eq!(
            permissions_of(&p, T, O, "app", Coll::Secrets),
            vec!["get", "list"]
        );
        assert!(permissions_of(&p, T, O, "app", Coll::Keys).is_empty());
        let p = update_policies(p, PolicyUpdate::Remove, vec![ap(&["get"])]);
        assert_eq!(p[0].permissions.secrets, vec!["list"]);
        let r = update_policies(p.clone(), PolicyUpdate::Replace, vec![ap(&["set"])]);
        assert_eq!(r[0].permissions.secrets, vec!["set"]);
        let p = update_policies(p, PolicyUpdate::Remove, vec![ap(&["list"])]);
        assert!(p.is_empty());
    }
}
