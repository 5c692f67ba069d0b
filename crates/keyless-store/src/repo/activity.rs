//! The Activity Log: `seq` orders events (appended in time order), the indexed `ts` bounds the
//! window and the purge.

use crate::db::Param;
use crate::store::{json, lower};
use crate::*;

impl Tx {
    /// Append an event and drop events older than `purge_before` (µs) in the same transaction;
    /// returns the event's `seq`.
    pub async fn append_activity(&mut self, r: &ActivityRecord, purge_before: i64) -> Result<u64> {
        let body = json(r)?;
        self.execute(
            "DELETE FROM activity_log WHERE ts < $1",
            &params![purge_before],
        )
        .await?;
        let rg = r.resource_group.as_deref().map(lower);
        let row = self
            .query_one(
                "INSERT INTO activity_log(ts, subscription, rg_key, resource_key, provider_key,
                     correlation_key, caller_key, status_key, body)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING seq",
                &params![
                    r.timestamp,
                    &lower(&r.subscription),
                    rg.as_ref(),
                    &lower(&r.resource_id),
                    &lower(&r.resource_provider),
                    &lower(&r.correlation_id),
                    &lower(&r.caller),
                    &lower(&r.status),
                    &body
                ],
            )
            .await?;
        row.u64(0)
    }

    /// Events matching `q`, newest first, at most `q.limit`.
    pub async fn list_activity(&mut self, q: &ActivityQuery) -> Result<Vec<ActivityRecord>> {
        let f = &q.filter;
        let sub = lower(&q.subscription);
        let eqs: Vec<(&str, String)> = [
            ("rg_key", &f.resource_group),
            ("resource_key", &f.resource_id),
            ("provider_key", &f.resource_provider),
            ("correlation_key", &f.correlation_id),
            ("caller_key", &f.caller),
            ("status_key", &f.status),
        ]
        .into_iter()
        .filter_map(|(col, v)| v.as_deref().map(|v| (col, lower(v))))
        .collect();
        let mut sql = String::from(
            "SELECT seq, body FROM activity_log WHERE subscription = $1 AND ts >= $2 AND ts <= $3",
        );
        let mut args: Vec<Param<'_>> =
            vec![Param::Text(&sub), Param::Int(f.from), Param::Int(f.to)];
        for (col, v) in &eqs {
            args.push(Param::Text(v));
            sql.push_str(&format!(" AND {col} = ${}", args.len()));
        }
        if let Some(after) = q.after {
            args.push(Param::from(after));
            sql.push_str(&format!(" AND seq < ${}", args.len()));
        }
        args.push(Param::from(q.limit));
        sql.push_str(&format!(" ORDER BY seq DESC LIMIT ${}", args.len()));
        let rows = self.query(&sql, &args).await?;
        rows.iter()
            .map(|r| {
                let mut rec: ActivityRecord = r.json(1)?;
                rec.seq = r.u64(0)?;
                Ok(rec)
            })
            .collect()
    }
}
