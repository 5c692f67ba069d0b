//! Certificate lifetime actions and purges of expired soft-deleted objects.

use crate::error::Result;
use crate::state::AppState;

#[derive(Debug, Default, Clone, Copy)]
pub struct Report {
    pub renewed: usize,
    pub notified: usize,
    pub purged: usize,
}

/// One pass of the scheduler.
pub async fn run_once(s: &AppState) -> Result<Report> {
    let purged = s.store.kv_purge_expired(s.vault_clock.now())?;
    Ok(Report { purged, ..Default::default() })
}
