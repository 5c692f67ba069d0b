//! Stored shapes. These are data, not behaviour: rules live in `keyless-core` and the server.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceGroupRecord {
    pub subscription: String,
    pub name: String,
    pub location: String,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityRecord {
    /// Lookup key (lowercase canonical id).
    pub key: String,
    /// Canonical ARM id: the identity's, or for a system-assigned identity the VM's.
    pub resource_id: String,
    pub name: String,
    pub subscription: String,
    pub resource_group: String,
    pub location: String,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    pub tenant_id: String,
    pub principal_id: String,
    pub client_id: String,
    /// For a system-assigned identity: the key of its VM.
    pub system_vm: Option<String>,
    pub created: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub key: String,
    pub resource_id: String,
    pub name: String,
    pub subscription: String,
    pub resource_group: String,
    pub location: String,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// The VM's unique id (`vmId`).
    pub vm_id: String,
    /// `None`, `SystemAssigned`, `UserAssigned` or `SystemAssigned, UserAssigned`.
    pub identity_type: String,
    /// Other `properties` the caller sent (hardwareProfile, osProfile, ...), echoed back.
    #[serde(default)]
    pub properties: serde_json::Value,
    pub created: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePrincipalRecord {
    pub client_id: String,
    pub object_id: String,
    pub display_name: String,
    /// Hex SHA-256 of the (256-bit random) client secret.
    pub secret_sha256: String,
    pub created: u64,
    /// Registered certificates (DER; public) for client assertions.
    #[serde(default)]
    pub certificates: Vec<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigningKeyRecord {
    pub kid: String,
    pub created: u64,
    pub activate_at: u64,
    pub cert_der: Vec<u8>,
    /// PKCS#8 private key (plaintext in memory; encrypted by the store at rest).
    pub key_pkcs8: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCredentialRecord {
    /// Hex SHA-256 of the client certificate DER.
    pub fingerprint: String,
    pub vm_key: String,
    pub not_after: u64,
    pub issued: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleAssignmentRecord {
    /// The assignment's GUID (lowercase).
    pub name: String,
    /// The scope as given (subscription, group or resource id; `/` for root).
    pub scope: String,
    /// Full role definition id.
    pub role_definition_id: String,
    pub principal_id: String,
    pub principal_type: String,
    pub description: Option<String>,
    pub created: u64,
    pub created_by: String,
}

/// An instance of a scale set: a host that joined with the scale set's join token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub key: String,
    pub vmss_key: String,
    pub instance_id: u64,
    /// `{scale set id}/virtualMachines/{instanceId}`.
    pub resource_id: String,
    pub vm_id: String,
    pub created: u64,
}

/// A federated identity credential of a user-assigned identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FicRecord {
    pub identity_key: String,
    pub name: String,
    pub issuer: String,
    pub subject: String,
    pub audiences: Vec<String>,
    pub description: Option<String>,
    pub created: u64,
}

/// A federated identity credential pattern of a user-assigned identity (issue 15, a Keyless
/// extension): as a [`FicRecord`], with a subject pattern (`*` = one or more characters other
/// than `:`) instead of an exact subject.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FicPatternRecord {
    pub identity_key: String,
    pub name: String,
    pub issuer: String,
    pub subject_pattern: String,
    pub audiences: Vec<String>,
    pub description: Option<String>,
    pub created: u64,
}
