//! The Activity Log: events are listed newest first and paged by the `seq` of a page's last
//! event; the indexed `ts` bounds the window and the purge.
//!
//! Order: `seq` is taken when the row is inserted, but the row is seen when its transaction
//! commits. On SQLite writers take turns, so rows become visible in `seq` order and `seq` is
//! the order. On PostgreSQL (writers in parallel) a transaction holding `seq` 41 may commit
//! after the one holding 42 was listed: a client that had paged past 42, or that follows the
//! log by reading the top down to what it has seen, would never be shown 41. So there the
//! order is (`txid`, `seq`) — `txid` the writing transaction's id, set by the database (see
//! `migrations`) — and a list holds back the rows a later commit could still land below (see
//! [`Tx::list_activity`]).

use crate::db::{Backend, Param};
use crate::store::{json, lower};
use crate::*;

/// How long (µs) a PostgreSQL row is held back behind an older running transaction at most
/// (see [`Tx::list_activity`]).
pub const ACTIVITY_HOLD_BACK_US: i64 = 10_000_000;

impl Tx {
    /// Append an event and drop events older than `purge_before` (µs) in the same transaction;
    /// returns the event's `seq`. (On PostgreSQL the database stamps the row with this
    /// transaction's id, `txid`: see [`Tx::list_activity`].)
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

    /// Events matching `q`, newest first, at most `q.limit`; after `q.after` (the `seq` of the
    /// previous page's last event) when given.
    ///
    /// PostgreSQL: newest first is by (`txid`, `seq`), and only rows whose transaction is
    /// older than the oldest one still running in this read's snapshot (`pg_snapshot_xmin`) are
    /// listed. Every transaction below that mark has ended, so every row keyed below a listed
    /// row is final: no later page, and no later list, can find a new row under one a client
    /// was already shown. A row of a transaction at or above the mark (running, or committed
    /// while an older one still runs) is held back until every older writer has ended, then
    /// comes in above all that was listed — late, as Azure's own events do, never lost.
    /// The hold-back is bounded: a row written [`ACTIVITY_HOLD_BACK_US`] ago (the database's
    /// clock) is listed whatever still runs — the oldest running transaction may be anyone's
    /// on the PostgreSQL server (another database's, a session left idle in a transaction),
    /// and must not hide the log for as long as it runs. Only a Keyless write that commits
    /// more than that after writing its event could then be passed; units of work last
    /// milliseconds.
    /// If the event `q.after` names is gone (purged for its age), the page goes on by `seq`
    /// alone (only rows of its own age, at the retention's edge themselves, could be passed).
    pub async fn list_activity(&mut self, q: &ActivityQuery) -> Result<Vec<ActivityRecord>> {
        let pg = self.backend() == Backend::Postgres;
        // the key (txid, seq) of the previous page's last event
        let after = match q.after {
            None => None,
            Some(seq) if pg => {
                let txid = self
                    .query_opt(
                        "SELECT txid FROM activity_log WHERE seq = $1",
                        &params![seq],
                    )
                    .await?
                    .map(|r| r.int(0))
                    .transpose()?;
                Some((txid, seq))
            }
            Some(seq) => Some((None, seq)),
        };
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
        if pg {
            args.push(Param::Int(ACTIVITY_HOLD_BACK_US));
            sql.push_str(&format!(
                " AND (txid < CAST(CAST(pg_snapshot_xmin(pg_current_snapshot()) AS TEXT) AS BIGINT) \
                 OR written_us < CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000 AS BIGINT) - ${})",
                args.len()
            ));
        }
        match after {
            None => {}
            Some((Some(txid), seq)) => {
                args.push(Param::Int(txid));
                args.push(Param::from(seq));
                sql.push_str(&format!(
                    " AND (txid, seq) < (${}, ${})",
                    args.len() - 1,
                    args.len()
                ));
            }
            Some((None, seq)) => {
                args.push(Param::from(seq));
                sql.push_str(&format!(" AND seq < ${}", args.len()));
            }
        }
        args.push(Param::from(q.limit));
        sql.push_str(&format!(
            " ORDER BY {} LIMIT ${}",
            if pg {
                "txid DESC, seq DESC"
            } else {
                "seq DESC"
            },
            args.len()
        ));
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
