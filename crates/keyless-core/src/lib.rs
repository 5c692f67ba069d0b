//! Pure domain logic for Keyless. Nothing in this crate does IO: no sockets, no files, no
//! database, no clock reads. Time is passed in as Unix seconds (see [`clock`]), so every rule
//! here is unit tested without servers.
//!
//! - [`resource_id`]: ARM resource ids and request paths (case-insensitive like ARM).
//! - [`names`]: naming rules for resource groups, identities and VMs.
//! - [`api_version`]: the api-versions each surface accepts.
//! - [`claims`]: the claims of a managed-identity access token.
//! - [`fic`]: federated identity credential rules and assertion matching.
//! - [`imds`]: parsing and validating IMDS token requests, and the IMDS response/error shapes.
//! - [`local_endpoints`]: the VM-extension, App Service and Arc token endpoints.
//! - [`identity_type`]: the `identity` property of a host resource (PUT and PATCH rules).
//! - [`selection`]: which identity of a host a request selects (the one decision point).
//! - [`rbac`]: built-in roles, action wildcard matching, scope inheritance, the access decision.
//! - [`rotation`]: signing-key rotation plan.
//! - [`refresh`]: when a cached token must be renewed.
//! - [`aks`]: managed clusters: the `podIdentityProfile` rules (names, selectors, limits, kubenet).
//! - [`pod_identity`]: which identities a pod may use through NMI (bindings, exceptions).
//! - [`odata`]: strict `$filter` parsing of the role and directory lists.
//! - [`audience`]: what a token audience (`resource` / scope) may be.
//! - [`activity_log`]: Activity Log operations, the events list's strict `$filter`, times.
//! - [`vault`]: Key Vault names, routes, permissions, certificate policies and paging.

pub mod activity_log;
pub mod aks;
pub mod api_version;
pub mod audience;
pub mod claims;
pub mod clock;
pub mod error;
pub mod fic;
pub mod identity_type;
pub mod imds;
pub mod local_endpoints;
pub mod mic;
pub mod names;
pub mod odata;
pub mod percent;
pub mod pod_explain;
pub mod pod_identity;
pub mod rbac;
pub mod refresh;
pub mod resource_id;
pub mod rotation;
pub mod selection;
pub mod template;
pub mod vault;
pub mod workload_identity;

pub use error::CoreError;
