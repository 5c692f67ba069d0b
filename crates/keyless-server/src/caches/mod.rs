//! What the server keeps in memory between requests, each cache beside its own rules. These
//! modules import nothing of the server's contexts: the state ([`crate::state::AppState`])
//! holds them and the contexts fill and read them.

pub mod feed;
pub mod hosts;
pub mod jwks;
pub mod vaults;
pub mod verified;
