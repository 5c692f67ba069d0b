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
