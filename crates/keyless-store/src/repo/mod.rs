//! The repositories: `impl Tx` blocks by area, each written once in the SQL both backends
//! speak (see `db.rs` for the rules).

pub mod activity;
pub mod changes;
pub mod cluster;
pub mod directory;
pub mod groups;
pub mod hosts;
pub mod identities;
pub mod lease;
pub mod meta;
pub mod oidc;
pub mod tracked;
pub mod vault;
