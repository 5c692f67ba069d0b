//! The core crate's error type.

/// Errors raised by pure domain rules. Each variant maps to one ARM / OAuth error at the HTTP
/// edge (see `keyless-server`'s error module).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoreError {
    #[error("the resource path '{0}' is not a valid resource id")]
    InvalidResourceId(String),
    #[error("{0}")]
    InvalidName(String),
    #[error("invalid resource group name '{0}'")]
    InvalidResourceGroupName(String),
    #[error("{0}")]
    InvalidIdentityType(String),
    /// More user-assigned identities than a host may hold, or than one request may add.
    #[error("{0}")]
    IdentityLimit(String),
}
