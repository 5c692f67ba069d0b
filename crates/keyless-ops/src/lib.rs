//! Operating Keyless: what every process exposes and records so it is boring to run.
//!
//! - [`metrics`]: the Prometheus recorder, the metric names, the request/response layer.
//! - [`health`]: `/healthz` (alive) and `/readyz` (ready = every registered check passes).
//! - [`listener`]: the separate ops listener of every process (`/metrics`, `/healthz`, `/readyz`).
//! - [`logging`]: the `tracing` subscriber (`--log-format text|json`), request ids.
//! - [`audit`]: the append-only, hash-chained audit trail (token issuances and refusals,
//!   control-plane writes, Key Vault operations), and its chain check.
//! - [`limits`]: connection caps, timeouts and per-caller fair share for listeners.
//! - [`sockdiag`]: one TCP socket by its exact 4-tuple over `NETLINK_SOCK_DIAG` (its owner UID
//!   for the listeners, its state, inode and creator's cgroup for caller attestation).
//! - [`failover`]: several URLs of one service (replicas), tried in order on retryable failures.
//!
//! This crate is a leaf: it knows nothing of the server, the node or the store.

pub mod audit;
pub mod failover;
pub mod health;
pub mod limits;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod request;
pub mod sockdiag;
