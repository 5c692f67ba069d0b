//! The persistence boundary. [`Store`] opens units of work ([`Tx`]): a handler begins one
//! transaction (`store.read(..)` / `store.write(..)`), calls the repositories on it (the
//! `impl Tx` blocks in `repo/`, one per area, written once in the SQL both backends speak) and
//! commits. Backends: the embedded SQLite file (`sqlite`, the default of `keyless up`) and
//! PostgreSQL (`postgres`); nothing above this crate knows which one runs.
//!
//! Secrets (private keys) go through [`crypto::Kek`]: AES-256-GCM with a key-encryption key
//! kept outside the database.

pub mod activity;
pub mod backup;
pub mod cluster;
pub mod crypto;
pub mod db;
pub mod files;
pub mod migrations;
pub mod postgres;
pub mod records;
mod repo;
pub mod sqlite;
mod store;
pub mod testing;
pub mod vault;

pub use activity::*;
pub use cluster::*;
pub use crypto::Kek;
pub use db::Backend;
pub use records::*;
pub use repo::activity::ACTIVITY_HOLD_BACK_US;
pub use repo::changes::{kind as change_kind, Change, ChangeBatch, ChangeCursor};
pub use repo::lease::Claim;
pub use repo::oidc::{OidcIssuerRecord, WebhookCaRecord};
pub use store::{Store, Tx};
pub use vault::*;

/// Errors of the store, in the store's terms: no driver type crosses this boundary.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or did not answer in time (surfaces answer 503).
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    /// A statement failed for another reason (a bug or a schema mismatch).
    #[error("database error: {0}")]
    Backend(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("decryption failed (wrong key-encryption key?)")]
    Decrypt,
    #[error("key-encryption key: {0}")]
    Kek(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("conflict: {0}")]
    Conflict(Conflict),
    #[error("not found")]
    NotFound,
    /// The database's schema is not this binary's, and opening it was not to migrate it.
    #[error("the database has schema version {have}, this binary {want}")]
    SchemaVersion { have: usize, want: usize },
}

/// Why a write was refused by a rule the database holds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Conflict {
    /// A row the write refers to does not exist (e.g. an identity assigned to a VM).
    #[error("{0}")]
    MissingReference(String),
    /// The host group is at its target size.
    #[error("the host group is at its target size")]
    GroupFull,
    /// A name that must be unique is taken (e.g. a vault name).
    #[error("{0}")]
    NameTaken(String),
    /// A unique constraint of the database (named).
    #[error("unique constraint {0}")]
    Unique(String),
    /// The row changed since it was read (optimistic concurrency).
    #[error("the resource changed since it was read")]
    StaleVersion,
    /// Another writer holds the row or claim (lock not available, serialization failure).
    #[error("another write holds {0}")]
    Busy(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Outcome of consuming a join token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinTokenOutcome {
    /// The token was valid and is now spent; it names this VM.
    Accepted {
        vm_key: String,
    },
    /// The token was spent by the same public key before and has not expired: a retried join
    /// whose answer was lost. It made the host `host_key` (the VM, or the scale set instance).
    Replayed {
        vm_key: String,
        host_key: String,
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
