//! Azure RBAC, evaluated without IO: built-in role definitions (real GUIDs), action matching
//! with Azure's wildcards, scope inheritance, and the access decision for one principal.

/// A role definition's permissions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleDefinition {
    /// The role's GUID (the `name` of the ARM resource).
    pub id: &'static str,
    pub role_name: &'static str,
    pub description: &'static str,
    pub actions: &'static [&'static str],
    pub not_actions: &'static [&'static str],
    pub data_actions: &'static [&'static str],
    pub not_data_actions: &'static [&'static str],
}

const MONITOR_SUPPORT: [&str; 3] = [
    "Microsoft.Insights/alertRules/*",
    "Microsoft.Resources/deployments/*",
    "Microsoft.Support/*",
];

macro_rules! role {
    ($id:literal, $name:literal, $desc:literal, [$($a:expr),* $(,)?], [$($na:expr),* $(,)?], [$($da:expr),* $(,)?]) => {
        RoleDefinition { id: $id, role_name: $name, description: $desc, actions: &[$($a),*], not_actions: &[$($na),*], data_actions: &[$($da),*], not_data_actions: &[] }
    };
}

/// The built-in roles Keyless knows.
pub const BUILT_IN_ROLES: &[RoleDefinition] = &[
    role!("8e3af657-a8ff-443c-a75c-2fe8c4bcb635", "Owner", "Grants full access to manage all resources, including the ability to assign roles in Azure RBAC.", ["*"], [], []),
    role!("b24988ac-6180-42a0-ab88-20f7382dd24c", "Contributor", "Grants full access to manage all resources, but does not allow you to assign roles in Azure RBAC, manage assignments in Azure Blueprints, or share image galleries.",
        ["*"],
        ["Microsoft.Authorization/*/Delete", "Microsoft.Authorization/*/Write", "Microsoft.Authorization/elevateAccess/Action", "Microsoft.Blueprint/blueprintAssignments/write", "Microsoft.Blueprint/blueprintAssignments/delete", "Microsoft.Compute/galleries/share/action", "Microsoft.Purview/consents/write", "Microsoft.Purview/consents/delete", "Microsoft.Resources/deploymentStacks/manageDenySetting/action", "Microsoft.Subscription/cancel/action", "Microsoft.Subscription/enable/action"],
        []),
    role!("acdd72a7-3385-48ef-bd42-f606fba81ae7", "Reader", "View all resources, but does not allow you to make any changes.", ["*/read"], [], []),
    role!("18d7d88d-d35e-4fb5-a5c3-7773c20a72d9", "User Access Administrator", "Lets you manage user access to Azure resources.", ["*/read", "Microsoft.Authorization/*", "Microsoft.Support/*"], [], []),
    role!("9980e02c-c2be-4d73-94e8-173b1dc7cf3c", "Virtual Machine Contributor", "Create and manage virtual machines, manage disks, install and run software, reset password of the root user of the virtual machine using VM extensions, and manage local user accounts using VM extensions. This role does not grant you management access to the virtual network or storage account the virtual machines are connected to. This role does not allow you to assign roles in Azure RBAC.",
        ["Microsoft.Authorization/*/read", "Microsoft.Compute/availabilitySets/*", "Microsoft.Compute/locations/*", "Microsoft.Compute/virtualMachines/*", "Microsoft.Compute/virtualMachineScaleSets/*", "Microsoft.Compute/cloudServices/*", "Microsoft.Compute/disks/write", "Microsoft.Compute/disks/read", "Microsoft.Compute/disks/delete", "Microsoft.DevTestLab/schedules/*", "Microsoft.Insights/alertRules/*", "Microsoft.Network/applicationGateways/backendAddressPools/join/action", "Microsoft.Network/loadBalancers/backendAddressPools/join/action", "Microsoft.Network/loadBalancers/inboundNatPools/join/action", "Microsoft.Network/loadBalancers/inboundNatRules/join/action", "Microsoft.Network/loadBalancers/probes/join/action", "Microsoft.Network/loadBalancers/read", "Microsoft.Network/locations/*", "Microsoft.Network/networkInterfaces/*", "Microsoft.Network/networkSecurityGroups/join/action", "Microsoft.Network/networkSecurityGroups/read", "Microsoft.Network/publicIPAddresses/join/action", "Microsoft.Network/publicIPAddresses/read", "Microsoft.Network/virtualNetworks/read", "Microsoft.Network/virtualNetworks/subnets/join/action", "Microsoft.RecoveryServices/locations/*", "Microsoft.RecoveryServices/Vaults/backupFabrics/backupProtectionIntent/write", "Microsoft.RecoveryServices/Vaults/backupFabrics/protectionContainers/protectedItems/*/read", "Microsoft.RecoveryServices/Vaults/backupFabrics/protectionContainers/protectedItems/read", "Microsoft.RecoveryServices/Vaults/backupFabrics/protectionContainers/protectedItems/write", "Microsoft.RecoveryServices/Vaults/backupPolicies/read", "Microsoft.RecoveryServices/Vaults/backupPolicies/write", "Microsoft.RecoveryServices/Vaults/read", "Microsoft.RecoveryServices/Vaults/usages/read", "Microsoft.RecoveryServices/Vaults/write", "Microsoft.ResourceHealth/availabilityStatuses/read", "Microsoft.Resources/deployments/*", "Microsoft.Resources/subscriptions/resourceGroups/read", "Microsoft.SerialConsole/serialPorts/connect/action", "Microsoft.SqlVirtualMachine/*", "Microsoft.Storage/storageAccounts/listKeys/action", "Microsoft.Storage/storageAccounts/read", "Microsoft.Support/*"],
        [], []),
    role!("f1a07417-d97a-45cb-824c-7a7467783830", "Managed Identity Operator", "Read and Assign User Assigned Identity",
        ["Microsoft.ManagedIdentity/userAssignedIdentities/*/read", "Microsoft.ManagedIdentity/userAssignedIdentities/*/assign/action", "Microsoft.Authorization/*/read", "Microsoft.Insights/alertRules/*", "Microsoft.Resources/subscriptions/resourceGroups/read", MONITOR_SUPPORT[1], MONITOR_SUPPORT[2]],
        [], []),
    role!("e40ec5ca-96e0-45a2-b4ff-59039f2c2b59", "Managed Identity Contributor", "Create, Read, Update, and Delete User Assigned Identity",
        ["Microsoft.ManagedIdentity/userAssignedIdentities/read", "Microsoft.ManagedIdentity/userAssignedIdentities/write", "Microsoft.ManagedIdentity/userAssignedIdentities/delete", "Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentials/read", "Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentials/write", "Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentials/delete", "Microsoft.ManagedIdentity/userAssignedIdentities/revokeTokens/action", "Microsoft.Authorization/*/read", "Microsoft.Insights/alertRules/*", "Microsoft.Resources/subscriptions/resourceGroups/read", MONITOR_SUPPORT[1], MONITOR_SUPPORT[2]],
        [], []),
    role!("00482a5a-887f-4fb3-b363-3b7fe8e74483", "Key Vault Administrator", "Perform all data plane operations on a key vault and all objects in it, including certificates, keys, and secrets. Cannot manage key vault resources or manage role assignments.",
        ["Microsoft.Authorization/*/read", "Microsoft.Insights/alertRules/*", "Microsoft.Resources/deployments/*", "Microsoft.Resources/subscriptions/resourceGroups/read", "Microsoft.Support/*", "Microsoft.KeyVault/checkNameAvailability/read", "Microsoft.KeyVault/deletedVaults/read", "Microsoft.KeyVault/locations/*/read", "Microsoft.KeyVault/vaults/*/read", "Microsoft.KeyVault/operations/read"],
        [], ["Microsoft.KeyVault/vaults/*"]),
    role!("b86a8fe4-44ce-4948-aee5-eccb2c155cd7", "Key Vault Secrets Officer", "Perform any action on the secrets of a key vault, except manage permissions.",
        ["Microsoft.Authorization/*/read", "Microsoft.Insights/alertRules/*", "Microsoft.Resources/deployments/*", "Microsoft.Resources/subscriptions/resourceGroups/read", "Microsoft.Support/*", "Microsoft.KeyVault/checkNameAvailability/read", "Microsoft.KeyVault/deletedVaults/read", "Microsoft.KeyVault/locations/*/read", "Microsoft.KeyVault/vaults/*/read", "Microsoft.KeyVault/operations/read"],
        [], ["Microsoft.KeyVault/vaults/secrets/*"]),
    role!("4633458b-17de-408a-b874-0445c86b69e6", "Key Vault Secrets User", "Read secret contents.", [], [],
        ["Microsoft.KeyVault/vaults/secrets/getSecret/action", "Microsoft.KeyVault/vaults/secrets/readMetadata/action"]),
    role!("a4417e6f-fecd-4de8-b567-7b0420556985", "Key Vault Certificates Officer", "Perform any action on the certificates of a key vault, except manage permissions.",
        ["Microsoft.Authorization/*/read", "Microsoft.Insights/alertRules/*", "Microsoft.Resources/deployments/*", "Microsoft.Resources/subscriptions/resourceGroups/read", "Microsoft.Support/*", "Microsoft.KeyVault/checkNameAvailability/read", "Microsoft.KeyVault/deletedVaults/read", "Microsoft.KeyVault/locations/*/read", "Microsoft.KeyVault/vaults/*/read", "Microsoft.KeyVault/operations/read"],
        [], ["Microsoft.KeyVault/vaults/certificatecas/*", "Microsoft.KeyVault/vaults/certificates/*", "Microsoft.KeyVault/vaults/certificatecontacts/write"]),
    role!("db79e9a7-68ee-4b58-9aeb-b90e7c24fcba", "Key Vault Certificate User", "Read entire certificate contents including secret and key portion.", [], [],
        ["Microsoft.KeyVault/vaults/certificates/read", "Microsoft.KeyVault/vaults/secrets/getSecret/action", "Microsoft.KeyVault/vaults/secrets/readMetadata/action", "Microsoft.KeyVault/vaults/keys/read"]),
    role!("14b46e9e-c2b7-41b4-b07b-48a6ebf60603", "Key Vault Crypto Officer", "Perform any action on the keys of a key vault, except manage permissions.",
        ["Microsoft.Authorization/*/read", "Microsoft.Insights/alertRules/*", "Microsoft.Resources/deployments/*", "Microsoft.Resources/subscriptions/resourceGroups/read", "Microsoft.Support/*", "Microsoft.KeyVault/checkNameAvailability/read", "Microsoft.KeyVault/deletedVaults/read", "Microsoft.KeyVault/locations/*/read", "Microsoft.KeyVault/vaults/*/read", "Microsoft.KeyVault/operations/read"],
        [], ["Microsoft.KeyVault/vaults/keys/*", "Microsoft.KeyVault/vaults/keyrotationpolicies/*"]),
    role!("12338af0-0e69-4776-bea7-57ae8d297424", "Key Vault Crypto User", "Perform cryptographic operations using keys.", [], [],
        ["Microsoft.KeyVault/vaults/keys/read", "Microsoft.KeyVault/vaults/keys/update/action", "Microsoft.KeyVault/vaults/keys/backup/action", "Microsoft.KeyVault/vaults/keys/encrypt/action", "Microsoft.KeyVault/vaults/keys/decrypt/action", "Microsoft.KeyVault/vaults/keys/wrap/action", "Microsoft.KeyVault/vaults/keys/unwrap/action", "Microsoft.KeyVault/vaults/keys/sign/action", "Microsoft.KeyVault/vaults/keys/verify/action"]),
    role!("e147488a-f6f5-4113-8e2d-b22465e65bf6", "Key Vault Crypto Service Encryption User", "Read metadata of keys and perform wrap/unwrap operations.", [], [],
        ["Microsoft.KeyVault/vaults/keys/read", "Microsoft.KeyVault/vaults/keys/wrap/action", "Microsoft.KeyVault/vaults/keys/unwrap/action"]),
    role!("08bbd89e-9f13-488c-ac41-acfcb10c90ab", "Key Vault Crypto Service Release User", "Release keys.", [], [], ["Microsoft.KeyVault/vaults/keys/release/action"]),
    role!("21090545-7ca7-4776-b22c-e363652d74d2", "Key Vault Reader", "Read metadata of key vaults and its certificates, keys, and secrets. Cannot read sensitive values such as secret contents or key material.",
        ["Microsoft.Authorization/*/read", "Microsoft.Insights/alertRules/*", "Microsoft.Resources/deployments/*", "Microsoft.Resources/subscriptions/resourceGroups/read", "Microsoft.Support/*", "Microsoft.KeyVault/checkNameAvailability/read", "Microsoft.KeyVault/deletedVaults/read", "Microsoft.KeyVault/locations/*/read", "Microsoft.KeyVault/vaults/*/read", "Microsoft.KeyVault/operations/read"],
        [], ["Microsoft.KeyVault/vaults/*/read", "Microsoft.KeyVault/vaults/secrets/readMetadata/action"]),
    role!("8b54135c-b56d-4d72-a534-26097cfdc8d8", "Key Vault Data Access Administrator", "Manage access to Azure Key Vault by adding or removing role assignments for the Key Vault Administrator, Key Vault Certificates Officer, Key Vault Crypto Officer, Key Vault Crypto Service Encryption User, Key Vault Crypto User, Key Vault Reader, Key Vault Secrets Officer, or Key Vault Secrets User roles.",
        ["Microsoft.Authorization/roleAssignments/write", "Microsoft.Authorization/roleAssignments/delete", "Microsoft.Authorization/*/read", "Microsoft.Resources/deployments/*", "Microsoft.Resources/subscriptions/resourceGroups/read", "Microsoft.Management/managementGroups/read", "Microsoft.Resources/subscriptions/read", "Microsoft.Support/*", "Microsoft.KeyVault/vaults/*/read"],
        [], []),
];

pub const OWNER: &str = "8e3af657-a8ff-443c-a75c-2fe8c4bcb635";

/// A role by GUID, or by a full role definition id ending in the GUID.
pub fn role_by_id(id: &str) -> Option<&'static RoleDefinition> {
    let guid = id.rsplit('/').next().unwrap_or(id);
    BUILT_IN_ROLES
        .iter()
        .find(|r| r.id.eq_ignore_ascii_case(guid))
}

/// A role by its name (case-insensitive), as `az role assignment create --role` accepts.
pub fn role_by_name(name: &str) -> Option<&'static RoleDefinition> {
    BUILT_IN_ROLES
        .iter()
        .find(|r| r.role_name.eq_ignore_ascii_case(name))
}

/// Glob match, case-insensitive, `*` matching any run of characters (including `/`).
fn glob(p: &[u8], a: &[u8]) -> bool {
    let (mut pi, mut ai) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ai < a.len() {
        if pi < p.len() && p[pi] != b'*' && p[pi].eq_ignore_ascii_case(&a[ai]) {
            pi += 1;
            ai += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = ai;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ai = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

/// Whether an action pattern (`Microsoft.Compute/*`, `*/read`,
/// `Microsoft.ManagedIdentity/userAssignedIdentities/*/assign/action`) matches an action.
/// As in Azure, a `/*/` segment also matches a single `/` (zero segments).
pub fn action_matches(pattern: &str, action: &str) -> bool {
    if glob(pattern.as_bytes(), action.as_bytes()) {
        return true;
    }
    let mut from = 0;
    while let Some(i) = pattern[from..].find("/*/") {
        let at = from + i;
        let collapsed = format!("{}{}", &pattern[..at], &pattern[at + 2..]);
        if action_matches(&collapsed, action) {
            return true;
        }
        from = at + 1;
    }
    false
}

/// Whether a role grants `action` (control-plane actions only).
pub fn role_permits(role: &RoleDefinition, action: &str) -> bool {
    role.actions.iter().any(|p| action_matches(p, action))
        && !role.not_actions.iter().any(|p| action_matches(p, action))
}

/// Whether a role grants a data action.
pub fn role_permits_data(role: &RoleDefinition, data_action: &str) -> bool {
    role.data_actions
        .iter()
        .any(|p| action_matches(p, data_action))
        && !role
            .not_data_actions
            .iter()
            .any(|p| action_matches(p, data_action))
}

/// Whether an assignment at `assignment_scope` applies to `scope` (same scope or below it).
/// Scopes compare case-insensitively; `/` is the root.
pub fn scope_covers(assignment_scope: &str, scope: &str) -> bool {
    let a = assignment_scope.trim_end_matches('/');
    let s = scope.trim_end_matches('/');
    if a.is_empty() {
        return true;
    }
    s.len() >= a.len()
        && s[..a.len()].eq_ignore_ascii_case(a)
        && (s.len() == a.len() || s.as_bytes()[a.len()] == b'/')
}

/// One role assignment as the decision needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub scope: String,
    pub role_definition_id: String,
}

/// The assignment that grants `action` at `scope`, if any, among one principal's grants.
pub fn authorize<'a>(grants: &'a [Grant], action: &str, scope: &str) -> Option<&'a Grant> {
    grants.iter().find(|g| {
        scope_covers(&g.scope, scope)
            && role_by_id(&g.role_definition_id).is_some_and(|r| role_permits(r, action))
    })
}

/// Same for a data action.
pub fn authorize_data<'a>(
    grants: &'a [Grant],
    data_action: &str,
    scope: &str,
) -> Option<&'a Grant> {
    grants.iter().find(|g| {
        scope_covers(&g.scope, scope)
            && role_by_id(&g.role_definition_id).is_some_and(|r| role_permits_data(r, data_action))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const UAMI_ASSIGN: &str = "Microsoft.ManagedIdentity/userAssignedIdentities/assign/action";

    #[test]
    fn wildcards_match_like_azure() {
        assert!(action_matches(
            "*",
            "Microsoft.Compute/virtualMachines/write"
        ));
        assert!(action_matches(
            "*/read",
            "Microsoft.Compute/virtualMachines/read"
        ));
        assert!(!action_matches(
            "*/read",
            "Microsoft.Compute/virtualMachines/write"
        ));
        assert!(action_matches(
            "Microsoft.Compute/virtualMachines/*",
            "microsoft.compute/VIRTUALMACHINES/write"
        ));
        assert!(action_matches(
            "Microsoft.ManagedIdentity/userAssignedIdentities/*/assign/action",
            UAMI_ASSIGN
        ));
        assert!(action_matches(
            "Microsoft.ManagedIdentity/userAssignedIdentities/*/read",
            "Microsoft.ManagedIdentity/userAssignedIdentities/read"
        ));
        assert!(action_matches(
            "Microsoft.ManagedIdentity/userAssignedIdentities/*/read",
            "Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentials/read"
        ));
        assert!(action_matches(
            "Microsoft.Authorization/*/Write",
            "Microsoft.Authorization/roleAssignments/write"
        ));
        assert!(!action_matches(
            "Microsoft.Compute/*",
            "Microsoft.ComputeX/y"
        ));
        assert!(!action_matches(
            "Microsoft.Authorization/*/read",
            "Microsoft.Authorization/roleAssignments/write"
        ));
    }

    #[test]
    fn built_in_roles_grant_what_azure_grants() {
        let r = |n| role_by_name(n).unwrap();
        let write_id = "Microsoft.ManagedIdentity/userAssignedIdentities/write";
        let ra_write = "Microsoft.Authorization/roleAssignments/write";
        assert!(role_permits(r("Owner"), ra_write));
        assert!(role_permits(r("Contributor"), write_id));
        assert!(!role_permits(r("Contributor"), ra_write), "notActions");
        assert!(role_permits(r("Contributor"), UAMI_ASSIGN));
        assert!(role_permits(
            r("Reader"),
            "Microsoft.ManagedIdentity/userAssignedIdentities/read"
        ));
        assert!(!role_permits(r("Reader"), write_id));
        assert!(role_permits(r("User Access Administrator"), ra_write));
        assert!(!role_permits(r("User Access Administrator"), write_id));
        assert!(role_permits(
            r("Virtual Machine Contributor"),
            "Microsoft.Compute/virtualMachines/write"
        ));
        assert!(!role_permits(r("Virtual Machine Contributor"), UAMI_ASSIGN));
        assert!(role_permits(r("Managed Identity Operator"), UAMI_ASSIGN));
        assert!(!role_permits(r("Managed Identity Operator"), write_id));
        assert!(role_permits(r("Managed Identity Contributor"), write_id));
        assert!(!role_permits(
            r("Managed Identity Contributor"),
            UAMI_ASSIGN
        ));
        assert!(role_permits_data(
            r("Key Vault Secrets User"),
            "Microsoft.KeyVault/vaults/secrets/getSecret/action"
        ));
        assert!(!role_permits_data(
            r("Key Vault Secrets User"),
            "Microsoft.KeyVault/vaults/secrets/setSecret/action"
        ));
        assert!(role_permits_data(
            r("Key Vault Administrator"),
            "Microsoft.KeyVault/vaults/keys/sign/action"
        ));
        assert!(!role_permits(
            r("Key Vault Administrator"),
            "Microsoft.KeyVault/vaults/write"
        ));
        assert_eq!(role_by_id("/subscriptions/s/providers/Microsoft.Authorization/roleDefinitions/acdd72a7-3385-48ef-bd42-f606fba81ae7").unwrap().role_name, "Reader");
        // the list has unique ids and names
        for (i, a) in BUILT_IN_ROLES.iter().enumerate() {
            for b in &BUILT_IN_ROLES[..i] {
                assert_ne!(a.id, b.id);
                assert_ne!(a.role_name, b.role_name);
            }
        }
    }

    #[test]
    fn credential_patterns_need_their_own_action() {
        // issue 15: a role that grants the federated credentials' actions one by one (Managed
        // Identity Contributor) does not grant the patterns'; `*` (Owner, Contributor) does
        let r = |n| role_by_name(n).unwrap();
        let ns = "Microsoft.ManagedIdentity/userAssignedIdentities";
        for verb in ["read", "write", "delete"] {
            let fic = format!("{ns}/federatedIdentityCredentials/{verb}");
            let pattern = format!("{ns}/federatedIdentityCredentialPatterns/{verb}");
            assert!(role_permits(r("Managed Identity Contributor"), &fic));
            assert!(!role_permits(r("Managed Identity Contributor"), &pattern));
            // Operator's `userAssignedIdentities/*/read` reads them, as it reads the FICs
            let operator_may = verb == "read";
            assert_eq!(
                role_permits(r("Managed Identity Operator"), &pattern),
                operator_may
            );
            assert!(role_permits(r("Owner"), &pattern));
            assert!(role_permits(r("Contributor"), &pattern));
        }
        assert!(!action_matches(
            &format!("{ns}/federatedIdentityCredentials/*"),
            &format!("{ns}/federatedIdentityCredentialPatterns/write")
        ));
        assert!(role_permits(
            r("Reader"),
            &format!("{ns}/federatedIdentityCredentialPatterns/read")
        ));
        assert!(!role_permits(
            r("Reader"),
            &format!("{ns}/federatedIdentityCredentialPatterns/write")
        ));
    }

    #[test]
    fn scopes_inherit_downwards_only() {
        let sub = "/subscriptions/S";
        let rg = "/subscriptions/s/resourceGroups/RG";
        let id = "/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/x";
        assert!(scope_covers("/", id));
        assert!(scope_covers(sub, id));
        assert!(scope_covers(rg, id));
        assert!(scope_covers(id, id));
        assert!(!scope_covers(id, rg));
        assert!(!scope_covers("/subscriptions/s/resourceGroups/rg2", id));
        assert!(
            !scope_covers("/subscriptions/s/resourceGroups/r", rg),
            "segment boundary"
        );
    }

    #[test]
    fn decision() {
        let rg = "/subscriptions/s/resourceGroups/rg";
        let id = format!("{rg}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/x");
        let grants = vec![
            Grant {
                scope: rg.into(),
                role_definition_id: role_by_name("Reader").unwrap().id.into(),
            },
            Grant {
                scope: id.clone(),
                role_definition_id: role_by_name("Managed Identity Operator").unwrap().id.into(),
            },
        ];
        assert!(authorize(
            &grants,
            "Microsoft.Compute/virtualMachines/read",
            &format!("{rg}/providers/Microsoft.Compute/virtualMachines/v")
        )
        .is_some());
        assert!(authorize(&grants, "Microsoft.Compute/virtualMachines/write", rg).is_none());
        assert!(authorize(&grants, UAMI_ASSIGN, &id).is_some());
        assert!(authorize(
            &grants,
            UAMI_ASSIGN,
            &format!("{rg}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/y")
        )
        .is_none());
        assert!(authorize(&[], "x/read", "/").is_none());
        // unknown role ids grant nothing
        let bogus = vec![Grant {
            scope: "/".into(),
            role_definition_id: "nope".into(),
        }];
        assert!(authorize(&bogus, "x/read", "/").is_none());
    }
}
