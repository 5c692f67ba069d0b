//! Health: `/healthz` answers while the process is alive; `/readyz` runs every registered
//! readiness check and answers 200 when all pass, else 503 with a JSON body naming the failing
//! ones.
//!
//! A process registers named checks once at start ([`Health::register`]; a check is a cheap,
//! synchronous function — a point read, a flag) or a [`Flag`] that some task sets when a
//! milestone is reached (first sync done). `keyless status` reads `/readyz` of each process.

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

type CheckFn = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// The readiness checks of one process (cheap to clone: shared).
#[derive(Clone, Default)]
pub struct Health {
    checks: Arc<RwLock<Vec<(String, CheckFn)>>>,
}

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResult {
    pub name: String,
    pub ok: bool,
    /// Why it fails (absent when it passes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// `/readyz`'s body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// `ready` or `not ready`.
    pub status: String,
    pub checks: Vec<CheckResult>,
    /// Names of the failing checks.
    pub failing: Vec<String>,
}

impl Report {
    pub fn ready(&self) -> bool {
        self.failing.is_empty()
    }
}

impl Health {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a check named `name` (a later check of the same name replaces it).
    pub fn register(
        &self,
        name: impl Into<String>,
        check: impl Fn() -> Result<(), String> + Send + Sync + 'static,
    ) {
        let name = name.into();
        let mut checks = self.checks.write().unwrap_or_else(|p| p.into_inner());
        checks.retain(|(n, _)| *n != name);
        checks.push((name, Arc::new(check)));
    }

    /// A check that passes once the returned flag is set; `pending` says what it waits for.
    pub fn flag(&self, name: impl Into<String>, pending: &'static str) -> Flag {
        let flag = Flag::default();
        let f = flag.clone();
        self.register(name, move || {
            if f.is_set() {
                Ok(())
            } else {
                Err(pending.to_string())
            }
        });
        flag
    }

    /// Names of the registered checks, in registration order.
    pub fn names(&self) -> Vec<String> {
        let checks = self.checks.read().unwrap_or_else(|p| p.into_inner());
        checks.iter().map(|(n, _)| n.clone()).collect()
    }

    /// Run every check (a panicking check fails, it does not take the caller down).
    pub fn report(&self) -> Report {
        let checks: Vec<(String, CheckFn)> = self
            .checks
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let results: Vec<CheckResult> = checks
            .into_iter()
            .map(|(name, f)| {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f()))
                    .unwrap_or_else(|_| Err("the check panicked".into()));
                CheckResult {
                    name,
                    ok: r.is_ok(),
                    message: r.err(),
                }
            })
            .collect();
        let failing: Vec<String> = results
            .iter()
            .filter(|c| !c.ok)
            .map(|c| c.name.clone())
            .collect();
        ::metrics::gauge!(crate::metrics::READY).set(if failing.is_empty() { 1.0 } else { 0.0 });
        Report {
            status: if failing.is_empty() {
                "ready"
            } else {
                "not ready"
            }
            .into(),
            checks: results,
            failing,
        }
    }
}

/// A milestone flag behind a readiness check (see [`Health::flag`]).
#[derive(Clone, Default, Debug)]
pub struct Flag(Arc<AtomicBool>);

impl Flag {
    pub fn set(&self) {
        self.0.store(true, Ordering::Release);
    }
    pub fn clear(&self) {
        self.0.store(false, Ordering::Release);
    }
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_check_passes() {
        let h = Health::new();
        assert!(h.report().ready(), "no checks: ready");
        let synced = h.flag("first sync", "the first sync has not completed");
        h.register("store", || Ok(()));
        let r = h.report();
        assert!(!r.ready());
        assert_eq!(r.status, "not ready");
        assert_eq!(r.failing, ["first sync"]);
        assert_eq!(
            r.checks[0].message.as_deref(),
            Some("the first sync has not completed")
        );
        assert!(r.checks[1].ok && r.checks[1].message.is_none());
        synced.set();
        let r = h.report();
        assert!(r.ready(), "{r:?}");
        assert_eq!(r.status, "ready");
        synced.clear();
        assert!(!h.report().ready());
    }

    #[test]
    fn a_panicking_check_fails_and_a_name_registers_once() {
        let h = Health::new();
        h.register("x", || panic!("boom"));
        let r = h.report();
        assert_eq!(r.failing, ["x"]);
        h.register("x", || Ok(()));
        assert_eq!(h.names(), ["x"]);
        assert!(h.report().ready());
        let json = serde_json::to_value(h.report()).unwrap();
        assert_eq!(json["status"], "ready");
        assert_eq!(json["checks"][0]["name"], "x");
    }
}
