//! The repositories: `impl Tx` blocks by area, each written once in the SQL both backends
//! speak (see `db.rs` for the rules).

pub mod lease;
pub mod meta;
pub mod groups;
pub mod identities;
pub mod hosts;
pub mod directory;
pub mod tracked;
pub mod vault;
pub mod cluster;
pub mod activity;
