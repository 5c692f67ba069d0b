//! Tracked resources without a table of their own (Batch accounts, VM extensions).

use crate::store::{json, lower};
use crate::*;

impl Tx {
    /// Insert or replace; returns true when created.
    pub async fn put_tracked(&mut self, r: &TrackedRecord) -> Result<bool> {
        if self.insert_tracked(r).await? {
            return Ok(true);
        }
        self.execute(
            "UPDATE tracked SET body = $2 WHERE key = $1",
            &params![&lower(&r.key), &json(r)?],
        )
        .await?;
        Ok(false)
    }

    /// Insert only: false (nothing written) when the key exists — also when another unit of
    /// work inserted it after this one read it absent (a missing row cannot be locked; on
    /// PostgreSQL this waits for that unit of work and sees its commit).
    pub async fn insert_tracked(&mut self, r: &TrackedRecord) -> Result<bool> {
        let n = self
            .execute(
                "INSERT INTO tracked(key, type_key, subscription, rg_key, body) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT(key) DO NOTHING",
                &params![
                    &lower(&r.key),
                    &lower(&r.type_name),
                    &lower(&r.subscription),
                    &lower(&r.resource_group),
                    &json(r)?
                ],
            )
            .await?;
        Ok(n > 0)
    }

    pub async fn get_tracked(&mut self, key: &str) -> Result<Option<TrackedRecord>> {
        let row = self
            .query_opt(
                "SELECT body FROM tracked WHERE key = $1",
                &params![&lower(key)],
            )
            .await?;
        row.map(|r| r.json(0)).transpose()
    }

    pub async fn list_tracked(
        &mut self,
        type_name: &str,
        subscription: &str,
        rg: Option<&str>,
    ) -> Result<Vec<TrackedRecord>> {
        let rg = rg.map(lower);
        let rows = self
            .query(
                "SELECT body FROM tracked WHERE type_key = $1 AND subscription = $2
                 AND (CAST($3 AS TEXT) IS NULL OR rg_key = $3) ORDER BY key",
                &params![&lower(type_name), &lower(subscription), rg.as_ref()],
            )
            .await?;
        rows.iter().map(|r| r.json(0)).collect()
    }

    /// Tracked resources of `type_name` below `parent_key` (e.g. a VM's extensions).
    pub async fn list_tracked_under(
        &mut self,
        parent_key: &str,
        type_name: &str,
    ) -> Result<Vec<TrackedRecord>> {
        let rows = self
            .query(
                "SELECT body FROM tracked WHERE type_key = $2
                 AND substr(key, 1, length(CAST($1 AS TEXT)) + 1) = CAST($1 AS TEXT) || '/' ORDER BY key",
                &params![&lower(parent_key), &lower(type_name)],
            )
            .await?;
        rows.iter().map(|r| r.json(0)).collect()
    }

    /// Delete a resource and the tracked resources below it.
    pub async fn delete_tracked(&mut self, key: &str) -> Result<bool> {
        let n = self
            .execute(
                "DELETE FROM tracked WHERE key = $1
                 OR substr(key, 1, length(CAST($1 AS TEXT)) + 1) = CAST($1 AS TEXT) || '/'",
                &params![&lower(key)],
            )
            .await?;
        Ok(n > 0)
    }
}
