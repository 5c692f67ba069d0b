//! ARM resource ids and request paths.
//!
//! ARM treats the fixed segments (`subscriptions`, `resourceGroups`, `providers`, namespaces
//! and type names) case-insensitively, and resource names case-insensitively for lookup while
//! echoing the case they were created with. [`ResourceId::key`] is the lookup key; the
//! canonical form is what responses carry.

use crate::CoreError;

/// Resource types this build of Keyless knows, with their canonical spelling.
pub const KNOWN_TYPES: &[(&str, &str)] = &[
    ("Microsoft.ManagedIdentity", "userAssignedIdentities"),
    ("Microsoft.Compute", "virtualMachines"),
    ("Microsoft.Compute", "virtualMachineScaleSets"),
    ("Microsoft.KeyVault", "vaults"),
    ("Microsoft.Batch", "batchAccounts"),
    ("Microsoft.ContainerService", "managedClusters"),
    ("Microsoft.Resources", "deployments"),
];

/// Canonical spelling of a provider namespace and type, if known.
pub fn canonical_type(namespace: &str, type_name: &str) -> Option<(&'static str, &'static str)> {
    KNOWN_TYPES
        .iter()
        .find(|(ns, ty)| ns.eq_ignore_ascii_case(namespace) && ty.eq_ignore_ascii_case(type_name))
        .copied()
}

/// `Microsoft.ManagedIdentity/userAssignedIdentities`.
pub const UAMI: (&str, &str) = ("Microsoft.ManagedIdentity", "userAssignedIdentities");
/// `Microsoft.Compute/virtualMachines`.
pub const VM: (&str, &str) = ("Microsoft.Compute", "virtualMachines");
/// `Microsoft.Compute/virtualMachineScaleSets`.
pub const VMSS: (&str, &str) = ("Microsoft.Compute", "virtualMachineScaleSets");

/// `Microsoft.Batch/batchAccounts` (its `pools` are children).
pub const BATCH_ACCOUNT: (&str, &str) = ("Microsoft.Batch", "batchAccounts");

/// `Microsoft.ContainerService/managedClusters` (its pools are scale sets in the node group).
pub const MANAGED_CLUSTER: (&str, &str) = ("Microsoft.ContainerService", "managedClusters");

/// Whether `resource_id` names a group of hosts that join as instances and share the group's
/// identities: a scale set, or a Batch pool (`…/batchAccounts/{a}/pools/{p}`).
pub fn is_host_group(resource_id: &str) -> bool {
    match ArmPath::parse(resource_id) {
        Ok(ArmPath::Resource(r)) => r.is_type(VMSS),
        Ok(ArmPath::Child {
            parent, child_type, ..
        }) => parent.is_type(BATCH_ACCOUNT) && child_type.eq_ignore_ascii_case("pools"),
        _ => false,
    }
}

/// `Microsoft.Resources/deployments` (at resource-group scope).
pub const DEPLOYMENT: (&str, &str) = ("Microsoft.Resources", "deployments");

/// `Microsoft.KeyVault/vaults`.
pub const VAULT: (&str, &str) = ("Microsoft.KeyVault", "vaults");

/// A tracked resource inside a resource group.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ResourceId {
    pub subscription: String,
    pub resource_group: String,
    pub namespace: String,
    pub type_name: String,
    pub name: String,
}

impl ResourceId {
    pub fn new(
        subscription: &str,
        resource_group: &str,
        (namespace, type_name): (&str, &str),
        name: &str,
    ) -> Self {
        Self {
            subscription: subscription.to_string(),
            resource_group: resource_group.to_string(),
            namespace: namespace.to_string(),
            type_name: type_name.to_string(),
            name: name.to_string(),
        }
    }

    /// `/subscriptions/{s}/resourceGroups/{rg}/providers/{ns}/{type}/{name}`.
    pub fn canonical(&self) -> String {
        format!(
            "/subscriptions/{}/resourceGroups/{}/providers/{}/{}/{}",
            self.subscription, self.resource_group, self.namespace, self.type_name, self.name
        )
    }

    /// The form Entra puts in `xms_mirid`: like [`Self::canonical`] but with a lowercase
    /// `resourcegroups` segment (as observed in real tokens).
    pub fn mirid(&self) -> String {
        format!(
            "/subscriptions/{}/resourcegroups/{}/providers/{}/{}/{}",
            self.subscription, self.resource_group, self.namespace, self.type_name, self.name
        )
    }

    /// Case-insensitive lookup key.
    pub fn key(&self) -> String {
        self.canonical().to_ascii_lowercase()
    }

    /// `{namespace}/{type}` as ARM writes it in the `type` property.
    pub fn full_type(&self) -> String {
        format!("{}/{}", self.namespace, self.type_name)
    }

    pub fn is_type(&self, (ns, ty): (&str, &str)) -> bool {
        self.namespace.eq_ignore_ascii_case(ns) && self.type_name.eq_ignore_ascii_case(ty)
    }

    /// Parse a full resource id (as found in request bodies, e.g. `userAssignedIdentities` keys).
    pub fn parse(id: &str) -> Result<Self, CoreError> {
        match ArmPath::parse(id)? {
            ArmPath::Resource(r) => Ok(r),
            _ => Err(CoreError::InvalidResourceId(id.to_string())),
        }
    }
}

impl std::fmt::Display for ResourceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.canonical())
    }
}

/// The ARM request paths Keyless routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArmPath {
    Subscriptions,
    Subscription {
        subscription: String,
    },
    ResourceGroups {
        subscription: String,
    },
    ResourceGroup {
        subscription: String,
        resource_group: String,
    },
    /// `.../providers/{ns}/{type}` under a subscription or a resource group.
    Collection {
        subscription: String,
        resource_group: Option<String>,
        namespace: String,
        type_name: String,
    },
    Resource(ResourceId),
    /// `{resource}/{segment}`: a POST action, or a GET of a child collection.
    Action {
        resource: ResourceId,
        action: String,
    },
    /// `{resource}/{childType}/{name}` (e.g. a scale set's instance).
    Child {
        parent: ResourceId,
        child_type: String,
        name: String,
    },
    /// `{resource}/{childType}/{name}/{action}` (e.g. a pool's `generateJoinToken`).
    ChildAction {
        parent: ResourceId,
        child_type: String,
        name: String,
        action: String,
    },
    /// `/subscriptions/{s}/providers/{ns}/{type}/{name}[/…]`: a resource at subscription scope
    /// (a subscription-scope deployment), with what follows its name.
    AtSubscription {
        subscription: String,
        namespace: String,
        type_name: String,
        name: String,
        rest: Vec<String>,
    },
    /// `/subscriptions/{s}[/resourceGroups/{rg}]/resources`: every resource of a subscription or
    /// a group, whatever its type.
    GenericResources {
        subscription: String,
        resource_group: Option<String>,
    },
    /// `{scope}/providers/Microsoft.Authorization/{roleAssignments|roleDefinitions}[/{name}]`,
    /// an extension resource on a scope (`/` root, subscription, group or resource).
    Authorization {
        scope: Scope,
        kind: AuthorizationKind,
        name: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthorizationKind {
    RoleAssignments,
    RoleDefinitions,
}

/// A scope for role assignments and authorization checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Root,
    Subscription(String),
    ResourceGroup {
        subscription: String,
        resource_group: String,
    },
    Resource(ResourceId),
}

impl Scope {
    /// The canonical scope string (`/` for the root).
    pub fn canonical(&self) -> String {
        match self {
            Scope::Root => "/".to_string(),
            Scope::Subscription(s) => format!("/subscriptions/{s}"),
            Scope::ResourceGroup {
                subscription,
                resource_group,
            } => {
                format!("/subscriptions/{subscription}/resourceGroups/{resource_group}")
            }
            Scope::Resource(r) => r.canonical(),
        }
    }

    pub fn subscription(&self) -> Option<&str> {
        match self {
            Scope::Root => None,
            Scope::Subscription(s) => Some(s),
            Scope::ResourceGroup { subscription, .. } => Some(subscription),
            Scope::Resource(r) => Some(&r.subscription),
        }
    }

    /// Parse a scope string (`/`, `/subscriptions/s`, a group or a resource id).
    pub fn parse(scope: &str) -> Result<Scope, CoreError> {
        if scope.trim_end_matches('/').is_empty() {
            return Ok(Scope::Root);
        }
        match ArmPath::parse(scope)? {
            ArmPath::Subscription { subscription } => Ok(Scope::Subscription(subscription)),
            ArmPath::ResourceGroup {
                subscription,
                resource_group,
            } => Ok(Scope::ResourceGroup {
                subscription,
                resource_group,
            }),
            ArmPath::Resource(r) => Ok(Scope::Resource(r)),
            _ => Err(CoreError::InvalidResourceId(scope.to_string())),
        }
    }
}

fn percent_decode(s: &str) -> Result<String, CoreError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| CoreError::InvalidResourceId(s.to_string()))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| CoreError::InvalidResourceId(s.to_string()))
}

impl ArmPath {
    /// Parse a request path or resource id. Percent-escapes are decoded per segment; a trailing
    /// slash is ignored.
    pub fn parse(path: &str) -> Result<Self, CoreError> {
        let bad = || CoreError::InvalidResourceId(path.to_string());
        const AUTHZ: &str = "/providers/microsoft.authorization/";
        if let Some(i) = path.to_ascii_lowercase().rfind(AUTHZ) {
            let rest: Vec<&str> = path[i + AUTHZ.len()..]
                .trim_end_matches('/')
                .split('/')
                .collect();
            let kind = match rest.first().map(|k| k.to_ascii_lowercase()).as_deref() {
                Some("roleassignments") => AuthorizationKind::RoleAssignments,
                Some("roledefinitions") => AuthorizationKind::RoleDefinitions,
                _ => return Err(bad()),
            };
            let name = match rest.as_slice() {
                [_] => None,
                [_, n] if !n.is_empty() => Some(percent_decode(n)?),
                _ => return Err(bad()),
            };
            return Ok(ArmPath::Authorization {
                scope: Scope::parse(&path[..i])?,
                kind,
                name,
            });
        }
        let trimmed = path.trim_end_matches('/');
        let mut segs = Vec::new();
        for (i, s) in trimmed.split('/').enumerate() {
            if i == 0 {
                if !s.is_empty() {
                    return Err(bad());
                }
                continue;
            }
            if s.is_empty() {
                return Err(bad());
            }
            segs.push(percent_decode(s)?);
        }
        let eq = |s: &String, k: &str| s.eq_ignore_ascii_case(k);
        match segs.as_slice() {
            [s] if eq(s, "subscriptions") => Ok(ArmPath::Subscriptions),
            [s, sub] if eq(s, "subscriptions") => Ok(ArmPath::Subscription {
                subscription: sub.clone(),
            }),
            [s, sub, g] if eq(s, "subscriptions") && eq(g, "resourcegroups") => {
                Ok(ArmPath::ResourceGroups {
                    subscription: sub.clone(),
                })
            }
            [s, sub, g, rg] if eq(s, "subscriptions") && eq(g, "resourcegroups") => {
                Ok(ArmPath::ResourceGroup {
                    subscription: sub.clone(),
                    resource_group: rg.clone(),
                })
            }
            [s, sub, r] if eq(s, "subscriptions") && eq(r, "resources") => {
                Ok(ArmPath::GenericResources {
                    subscription: sub.clone(),
                    resource_group: None,
                })
            }
            [s, sub, g, rg, r]
                if eq(s, "subscriptions") && eq(g, "resourcegroups") && eq(r, "resources") =>
            {
                Ok(ArmPath::GenericResources {
                    subscription: sub.clone(),
                    resource_group: Some(rg.clone()),
                })
            }
            // a deployment's operations as the SDKs and az ask for them, without `providers/`
            // (`…/resourcegroups/{rg}/deployments/{name}/operations[/{id}]`): the same as under
            // `providers/Microsoft.Resources`
            [s, sub, g, rg, d, name, rest @ ..]
                if eq(s, "subscriptions")
                    && eq(g, "resourcegroups")
                    && eq(d, "deployments")
                    && rest.first().is_some_and(|r| eq(r, "operations")) =>
            {
                let resource = ResourceId::new(sub, rg, DEPLOYMENT, name);
                under(resource, rest).ok_or_else(bad)
            }
            [s, sub, p, ns, ty] if eq(s, "subscriptions") && eq(p, "providers") => {
                let (ns, ty) = canon(ns, ty);
                Ok(ArmPath::Collection {
                    subscription: sub.clone(),
                    resource_group: None,
                    namespace: ns,
                    type_name: ty,
                })
            }
            [s, sub, p, ns, ty, name, rest @ ..]
                if eq(s, "subscriptions") && eq(p, "providers") && rest.len() <= 2 =>
            {
                let (ns, ty) = canon(ns, ty);
                Ok(ArmPath::AtSubscription {
                    subscription: sub.clone(),
                    namespace: ns,
                    type_name: ty,
                    name: name.clone(),
                    rest: rest.to_vec(),
                })
            }
            [s, sub, g, rg, p, ns, ty]
                if eq(s, "subscriptions") && eq(g, "resourcegroups") && eq(p, "providers") =>
            {
                let (ns, ty) = canon(ns, ty);
                Ok(ArmPath::Collection {
                    subscription: sub.clone(),
                    resource_group: Some(rg.clone()),
                    namespace: ns,
                    type_name: ty,
                })
            }
            [s, sub, g, rg, p, ns, ty, name, rest @ ..]
                if eq(s, "subscriptions") && eq(g, "resourcegroups") && eq(p, "providers") =>
            {
                let (ns, ty) = canon(ns, ty);
                let resource = ResourceId {
                    subscription: sub.clone(),
                    resource_group: rg.clone(),
                    namespace: ns,
                    type_name: ty,
                    name: name.clone(),
                };
                under(resource, rest).ok_or_else(bad)
            }
            _ => Err(bad()),
        }
    }
}

/// The path `rest` below `resource`: itself, an action, a child, or a child's action.
fn under(resource: ResourceId, rest: &[String]) -> Option<ArmPath> {
    Some(match rest {
        [] => ArmPath::Resource(resource),
        [action] => ArmPath::Action {
            resource,
            action: action.clone(),
        },
        [child_type, child] => ArmPath::Child {
            parent: resource,
            child_type: child_type.clone(),
            name: child.clone(),
        },
        [child_type, child, action] => ArmPath::ChildAction {
            parent: resource,
            child_type: child_type.clone(),
            name: child.clone(),
            action: action.clone(),
        },
        _ => return None,
    })
}

fn canon(ns: &str, ty: &str) -> (String, String) {
    match canonical_type(ns, ty) {
        Some((n, t)) => (n.to_string(), t.to_string()),
        None => (ns.to_string(), ty.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_resource_case_insensitively_and_canonicalises() {
        let p = ArmPath::parse(
            "/SUBSCRIPTIONS/s1/resourcegroups/My-RG/providers/microsoft.managedidentity/USERASSIGNEDIDENTITIES/id1",
        )
        .unwrap();
        let ArmPath::Resource(r) = p else {
            panic!("{p:?}")
        };
        assert_eq!(
            r.canonical(),
            "/subscriptions/s1/resourceGroups/My-RG/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id1"
        );
        assert_eq!(
            r.mirid(),
            "/subscriptions/s1/resourcegroups/My-RG/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id1"
        );
        assert_eq!(r.key(), r.canonical().to_lowercase());
        assert!(r.is_type(UAMI));
    }

    #[test]
    fn parses_collections_and_groups() {
        assert_eq!(
            ArmPath::parse("/subscriptions").unwrap(),
            ArmPath::Subscriptions
        );
        assert_eq!(
            ArmPath::parse("/subscriptions/s/resourceGroups/").unwrap(),
            ArmPath::ResourceGroups {
                subscription: "s".into()
            }
        );
        assert!(matches!(
            ArmPath::parse("/subscriptions/s/providers/Microsoft.Compute/virtualMachines").unwrap(),
            ArmPath::Collection {
                resource_group: None,
                ..
            }
        ));
        assert!(matches!(
            ArmPath::parse("/subscriptions/s/resourceGroups/g/providers/Microsoft.Compute/virtualMachines/v/joinToken").unwrap(),
            ArmPath::Action { ref action, .. } if action == "joinToken"
        ));
    }

    #[test]
    fn parses_authorization_extension_paths() {
        let p = ArmPath::parse("/subscriptions/s/resourceGroups/g/providers/Microsoft.Authorization/roleAssignments/abc").unwrap();
        let ArmPath::Authorization { scope, kind, name } = p else {
            panic!("{p:?}")
        };
        assert_eq!(scope.canonical(), "/subscriptions/s/resourceGroups/g");
        assert_eq!(kind, AuthorizationKind::RoleAssignments);
        assert_eq!(name.as_deref(), Some("abc"));
        let p = ArmPath::parse("/providers/Microsoft.Authorization/roleDefinitions").unwrap();
        assert!(matches!(
            p,
            ArmPath::Authorization {
                scope: Scope::Root,
                kind: AuthorizationKind::RoleDefinitions,
                name: None
            }
        ));
        let p = ArmPath::parse(
            "/subscriptions/s/resourceGroups/g/providers/Microsoft.ManagedIdentity/userAssignedIdentities/u/providers/microsoft.authorization/roleassignments",
        )
        .unwrap();
        let ArmPath::Authorization {
            scope: Scope::Resource(r),
            ..
        } = p
        else {
            panic!()
        };
        assert_eq!(r.name, "u");
        assert!(
            ArmPath::parse("/subscriptions/s/providers/Microsoft.Authorization/locks").is_err()
        );
        assert!(ArmPath::parse("/foo/providers/Microsoft.Authorization/roleAssignments").is_err());
        assert!(Scope::parse("/subscriptions/s/resourceGroups").is_err());
    }

    #[test]
    fn rejects_garbage() {
        for p in [
            "",
            "subscriptions",
            "/subscriptions//resourceGroups",
            "/foo/bar",
            "/subscriptions/s/resourceGroups/g/providers/a/b/c/d/e/f/g",
            "/subscriptions/s/resourceGroups/g%zz",
        ] {
            assert!(ArmPath::parse(p).is_err(), "{p}");
        }
        assert!(ResourceId::parse("/subscriptions/s/resourceGroups/g").is_err());
    }

    #[test]
    fn percent_decoding() {
        let ArmPath::ResourceGroup { resource_group, .. } =
            ArmPath::parse("/subscriptions/s/resourceGroups/rg%28a%29").unwrap()
        else {
            panic!()
        };
        assert_eq!(resource_group, "rg(a)");
    }
}

#[cfg(test)]
mod host_group_tests {
    use super::*;

    #[test]
    fn pools_and_scale_sets_are_host_groups() {
        assert!(is_host_group("/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/ss"));
        assert!(is_host_group(
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Batch/batchAccounts/a/pools/p"
        ));
        assert!(!is_host_group(
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm"
        ));
        assert!(!is_host_group(
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Batch/batchAccounts/a"
        ));
        let p = ArmPath::parse("/subscriptions/s/resourceGroups/rg/providers/microsoft.batch/batchaccounts/a/pools/p/generateJoinToken").unwrap();
        assert!(
            matches!(p, ArmPath::ChildAction { ref action, .. } if action == "generateJoinToken"),
            "{p:?}"
        );
    }
}
