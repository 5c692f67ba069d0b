//! The persistence boundary. [`Store`] is what the server needs from storage, in domain terms;
//! [`sqlite::SqliteStore`] is the embedded default (one SQLite file in the data dir). A
//! PostgreSQL backend implements the same trait; nothing above this crate knows which is used.
//!
//! Secrets (private keys) go through [`crypto::Kek`]: AES-256-GCM with a key-encryption key
//! kept outside the database file.

pub mod activity;
pub mod cluster;
pub mod crypto;
pub mod files;
pub mod records;
pub mod sqlite;
pub mod vault;

pub use activity::*;
pub use cluster::*;
pub use crypto::Kek;
pub use records::*;
pub use vault::*;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("decryption failed (wrong key-encryption key?)")]
    Decrypt,
    #[error("key-encryption key: {0}")]
    Kek(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("not found")]
    NotFound,
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Outcome of consuming a join token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinTokenOutcome {
    /// The token was valid and is now spent; it names this VM.
    Accepted {
        vm_key: String,
    },
    Unknown,
    Expired,
    AlreadyUsed,
}

/// Kinds of principal the directory knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrincipalKind {
    ServicePrincipal,
    ManagedIdentity,
}

/// A directory object (service principal or managed identity), as a Graph-like lookup shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectoryEntry {
    pub object_id: String,
    pub app_id: String,
    pub display_name: String,
    pub kind: PrincipalKind,
    /// For a managed identity: its ARM resource id.
    pub resource_id: Option<String>,
}

/// Outcome of writing a federated identity credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FicPut {
    Created,
    Updated,
    LimitReached,
    DuplicateIssuerSubject,
}

/// Outcome of inserting a role assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoleAssignmentInsert {
    Created,
    /// An assignment with this name exists (returned as stored).
    NameTaken(RoleAssignmentRecord),
    /// The same principal already has the same role at the same scope.
    Duplicate,
}

/// Everything the server persists. Methods are small and transactional on their own.
/// A tracked ARM resource kept as its JSON (Batch accounts, VM extensions): the server owns
/// its shape; the store only keys it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrackedRecord {
    /// Lookup key (lowercase canonical id).
    pub key: String,
    /// `Namespace/type[/childType]`, e.g. `Microsoft.Compute/virtualMachines/extensions`.
    pub type_name: String,
    pub subscription: String,
    pub resource_group: String,
    /// The resource as ARM shows it.
    pub body: serde_json::Value,
}

/// Tracked resources without a table of their own.
pub trait TrackedStore {
    /// Insert or replace; returns true when created.
    fn put_tracked(&self, r: &TrackedRecord) -> Result<bool>;
    fn get_tracked(&self, key: &str) -> Result<Option<TrackedRecord>>;
    fn list_tracked(
        &self,
        type_name: &str,
        subscription: &str,
        rg: Option<&str>,
    ) -> Result<Vec<TrackedRecord>>;
    /// Tracked resources of `type_name` below `parent_key` (e.g. a VM's extensions).
    fn list_tracked_under(&self, parent_key: &str, type_name: &str) -> Result<Vec<TrackedRecord>>;
    /// Delete a resource and the tracked resources below it.
    fn delete_tracked(&self, key: &str) -> Result<bool>;
}

pub trait Store:
    VaultStore + TrackedStore + ClusterStore + ActivityStore + Send + Sync + 'static
{
    // -- instance metadata (tenant, subscription, settings)
    fn get_meta(&self, key: &str) -> Result<Option<String>>;
    fn set_meta(&self, key: &str, value: &str) -> Result<()>;

    // -- encrypted blobs (CA key, TLS key, ...)
    fn put_secret(&self, name: &str, plaintext: &[u8]) -> Result<()>;
    fn get_secret(&self, name: &str) -> Result<Option<Vec<u8>>>;
    /// Store a blob only if none exists under `name`; true when this call stored it.
    fn put_secret_if_absent(&self, name: &str, plaintext: &[u8]) -> Result<bool>;
    fn delete_secret(&self, name: &str) -> Result<bool>;

    // -- token signing keys
    fn insert_signing_key(&self, key: &SigningKeyRecord) -> Result<()>;
    fn list_signing_keys(&self) -> Result<Vec<SigningKeyRecord>>;
    fn delete_signing_key(&self, kid: &str) -> Result<()>;

    // -- resource groups
    fn put_resource_group(&self, rg: &ResourceGroupRecord) -> Result<bool>;
    fn get_resource_group(
        &self,
        subscription: &str,
        name: &str,
    ) -> Result<Option<ResourceGroupRecord>>;
    fn list_resource_groups(&self, subscription: &str) -> Result<Vec<ResourceGroupRecord>>;
    /// Delete a group and everything in it (identities, VMs with their system identities,
    /// assignments, join tokens; host credentials of its VMs are revoked).
    fn delete_resource_group(&self, subscription: &str, name: &str) -> Result<bool>;

    // -- identities (user-assigned and system-assigned)
    /// Insert or replace; returns true when created.
    fn put_identity(&self, id: &IdentityRecord) -> Result<bool>;
    fn get_identity(&self, key: &str) -> Result<Option<IdentityRecord>>;
    fn list_identities(&self, subscription: &str, rg: Option<&str>) -> Result<Vec<IdentityRecord>>;
    /// Delete a user-assigned identity, remove it from every VM, and delete the role
    /// assignments it holds or that are scoped to it.
    fn delete_identity(&self, key: &str) -> Result<bool>;

    // -- virtual machines
    /// Write a VM, its system identity (created, kept or deleted as `system` says) and its
    /// user-assigned identity set, in one transaction. Returns true when created.
    fn put_vm(
        &self,
        vm: &VmRecord,
        system: Option<&IdentityRecord>,
        user_keys: &[String],
    ) -> Result<bool>;
    fn get_vm(&self, key: &str) -> Result<Option<VmRecord>>;
    fn list_vms(&self, subscription: &str, rg: Option<&str>) -> Result<Vec<VmRecord>>;
    /// Delete a VM, its system identity, its assignments, join tokens and host credentials.
    fn delete_vm(&self, key: &str) -> Result<bool>;
    /// Keys of the user-assigned identities assigned to a VM.
    fn vm_user_identities(&self, vm_key: &str) -> Result<Vec<IdentityRecord>>;
    /// The system-assigned identity of a VM.
    fn vm_system_identity(&self, vm_key: &str) -> Result<Option<IdentityRecord>>;

    // -- service principals
    fn put_service_principal(&self, sp: &ServicePrincipalRecord) -> Result<()>;
    fn get_service_principal(&self, client_id: &str) -> Result<Option<ServicePrincipalRecord>>;

    // -- host join and credentials
    fn insert_join_token(&self, hash: &str, vm_key: &str, expires_at: u64) -> Result<()>;
    fn consume_join_token(&self, hash: &str, now: u64) -> Result<JoinTokenOutcome>;
    fn insert_host_credential(&self, cred: &HostCredentialRecord) -> Result<()>;
    fn get_host_credential(&self, fingerprint: &str) -> Result<Option<HostCredentialRecord>>;

    // -- scale set instances (hosts that joined a scale set)
    /// Allocate the next instance of a scale set or pool (ids are never reused); with `limit`,
    /// fail with `Conflict(sqlite::GROUP_FULL)` when the group already has that many.
    fn create_instance(
        &self,
        vmss_key: &str,
        vmss_resource_id: &str,
        now: u64,
        limit: Option<u64>,
    ) -> Result<InstanceRecord>;
    fn get_instance(&self, key: &str) -> Result<Option<InstanceRecord>>;
    fn list_instances(&self, vmss_key: &str) -> Result<Vec<InstanceRecord>>;
    /// Delete an instance and revoke its host credentials.
    fn delete_instance(&self, key: &str) -> Result<bool>;

    // -- federated identity credentials
    /// Insert or update a FIC, enforcing `max` per identity and unique issuer+subject.
    fn put_fic(&self, fic: &FicRecord, max: usize) -> Result<FicPut>;
    fn get_fic(&self, identity_key: &str, name: &str) -> Result<Option<FicRecord>>;
    fn list_fics(&self, identity_key: &str) -> Result<Vec<FicRecord>>;
    fn delete_fic(&self, identity_key: &str, name: &str) -> Result<bool>;

    // -- directory and role assignments
    /// What kind of principal an object id names, if it exists.
    fn principal_kind(&self, object_id: &str) -> Result<Option<PrincipalKind>>;
    /// A principal by object id or by app (client) id.
    fn directory_lookup(&self, id: &str) -> Result<Option<DirectoryEntry>>;
    fn insert_role_assignment(&self, ra: &RoleAssignmentRecord) -> Result<RoleAssignmentInsert>;
    fn get_role_assignment(&self, name: &str) -> Result<Option<RoleAssignmentRecord>>;
    fn list_role_assignments(&self) -> Result<Vec<RoleAssignmentRecord>>;
    /// The assignments a principal holds (the authorization hot path; indexed).
    fn role_assignments_for_principal(
        &self,
        principal_id: &str,
    ) -> Result<Vec<RoleAssignmentRecord>>;
    fn delete_role_assignment(&self, name: &str) -> Result<Option<RoleAssignmentRecord>>;
}
