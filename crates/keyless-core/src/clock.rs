//! Time as a dependency. Domain functions take `now` (Unix seconds); the edges get it from a
//! [`Clock`], which tests replace with a fixed or stepped clock.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

/// Source of the current time in Unix seconds.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> u64;
}

/// The wall clock, optionally shifted by an offset (useful to move a whole process in time in
/// end-to-end tests without touching the OS clock).
#[derive(Debug, Default, Clone)]
pub struct SystemClock {
    offset: Arc<AtomicI64>,
}

impl SystemClock {
    pub fn new() -> Self {
        Self::default()
    }
    /// Shift this clock by `secs` (can be negative).
    pub fn advance(&self, secs: i64) {
        self.offset.fetch_add(secs, Ordering::SeqCst);
    }
}

impl Clock for SystemClock {
    fn now(&self) -> u64 {
        // The only place in the core that reads the OS clock.
        let base = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        (base + self.offset.load(Ordering::SeqCst)).max(0) as u64
    }
}

/// A clock that only moves when told to.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<AtomicI64>);

impl ManualClock {
    pub fn at(now: u64) -> Self {
        Self(Arc::new(AtomicI64::new(now as i64)))
    }
    pub fn advance(&self, secs: i64) {
        self.0.fetch_add(secs, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> u64 {
        self.0.load(Ordering::SeqCst).max(0) as u64
    }
}
