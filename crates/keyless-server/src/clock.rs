//! The Key Vault's clock.

use keyless_core::clock::Clock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The Key Vault's clock: the server clock, moved forward by `advance` when the server runs
/// with `--dev-clock` (so certificate renewal can be shown without waiting months).
pub struct VaultClock {
    base: Arc<dyn Clock>,
    offset: AtomicU64,
    adjustable: bool,
}

impl VaultClock {
    pub fn new(base: Arc<dyn Clock>, adjustable: bool) -> Self {
        Self {
            base,
            offset: AtomicU64::new(0),
            adjustable,
        }
    }
    pub fn now(&self) -> u64 {
        self.base.now() + self.offset.load(Ordering::SeqCst)
    }
    /// Move forward by `secs`; `None` when the clock is not adjustable.
    pub fn advance(&self, secs: u64) -> Option<u64> {
        if !self.adjustable {
            return None;
        }
        self.offset.fetch_add(secs, Ordering::SeqCst);
        Some(self.now())
    }
}
