//! The Activity Log.

#[allow(unused_imports)]
use crate::store::{json, lower, parse};
#[allow(unused_imports)]
use crate::*;

impl Tx {
    /// Append an event and drop events older than `purge_before` (µs) in the same transaction;
    /// returns the event's `seq`.
    pub async fn append_activity(&mut self, r: &ActivityRecord, purge_before: i64) -> Result<u64> {
        todo!("port append_activity")
    }

    /// Events matching `q`, newest first, at most `q.limit`.
    pub async fn list_activity(&mut self, q: &ActivityQuery) -> Result<Vec<ActivityRecord>> {
        todo!("port list_activity")
    }
}
