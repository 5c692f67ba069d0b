//! The change feed: servers that share a database cache what they read often (a vault with its
//! access policies) and learn from this feed what another server changed.
//!
//! A repository method whose result servers cache appends a row to `changes` (kind, key) in
//! the transaction of the change ([`Tx::record_change`]), so the row is there exactly when the
//! change is. Readers poll [`Store::changes_since`] with a [`ChangeCursor`]; each change is
//! delivered once to a cursor. In this process, [`Store::on_commit`] hooks see a unit of work's
//! changes as soon as it commits, without waiting for a poll.
//!
//! Order: `seq` is taken when the row is inserted, not when its transaction commits. On SQLite
//! writers take turns (one write transaction at a time), so rows become visible in `seq` order.
//! On PostgreSQL (`READ COMMITTED`, writers in parallel) a transaction that took `seq` 5 may
//! commit after the one that took 6: a reader asking only `seq > last` would skip 5 for ever.
//! So each row also carries its transaction id (`txid`), and every read notes the oldest
//! transaction still running in its snapshot (`pg_snapshot_xmin`): the next read asks again for
//! every row whose transaction was at or above that mark — a row that commits late is found
//! there — and skips the rows it already delivered.
//!
//! Old rows are removed by [`Store::purge_changes`], which notes the highest `seq` it removed
//! (`meta` key `changes_purged_through`): a reader that had not read that far is told to start
//! over ([`ChangeBatch::reset`]).

use crate::db::{Backend, Param};
use crate::{params, Result, Store, Tx};
use std::collections::BTreeMap;
use std::sync::RwLock;

/// Kinds of change the feed carries (the `kind` column).
pub mod kind {
    /// A vault was created, updated (properties, access policies, tags) or deleted; the key is
    /// its name, lowercase.
    pub const VAULT: &str = "vault";
    /// Something a host's token answer depends on changed — a row of one of
    /// [`super::HOST_TABLES`] was written — key `*`: a server forgets every host it cached.
    /// Recorded by [`crate::Tx`] itself for every write statement on those tables, so no
    /// repository method (present or future) can forget it.
    pub const HOSTS: &str = "hosts";
}

/// The tables a host's token answer is read from (its credential, its VM or scale set
/// instance, the identities it holds) and the group deletes that cascade to them.
pub const HOST_TABLES: &[&str] = &[
    "host_credentials",
    "vms",
    "vmss_instances",
    "vm_identities",
    "identities",
    "resource_groups",
    "clusters",
];

/// The table a write statement (`INSERT INTO t`, `UPDATE t`, `DELETE FROM t`) names, if it is
/// one.
pub(crate) fn written_table(sql: &str) -> Option<&str> {
    let mut words = sql.split_ascii_whitespace();
    let first = words.next()?;
    let table = if first.eq_ignore_ascii_case("insert") || first.eq_ignore_ascii_case("delete") {
        words.next()?; // INTO / FROM
        words.next()?
    } else if first.eq_ignore_ascii_case("update") {
        words.next()?
    } else {
        return None;
    };
    Some(table.split('(').next().unwrap_or(table))
}

/// One row of the feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub seq: i64,
    /// When the change was written, in milliseconds since the Unix epoch (the writer's clock).
    pub ts: u64,
    pub kind: String,
    pub key: String,
}

/// Where a reader of the feed stands. Start with `ChangeCursor::default()`: the first read
/// places it at the end of the feed (and answers `reset`).
#[derive(Debug, Default, Clone)]
pub struct ChangeCursor {
    /// Highest `seq` read; `None` before the first read.
    last: Option<i64>,
    /// PostgreSQL: the oldest transaction id still running when the last read took its
    /// snapshot; rows of transactions at or above it are asked for again.
    xmin: i64,
    /// Rows already delivered (or passed over at the first read) that the next read may see
    /// again: `seq` → `txid`. Dropped once their transaction is below `xmin`.
    recent: BTreeMap<i64, i64>,
}

/// What one read of the feed found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangeBatch {
    /// Changes this cursor had not seen, by `seq`.
    pub changes: Vec<Change>,
    /// The cursor cannot tell what changed before this read (its first read, or rows it never
    /// read were purged): a reader drops everything it cached.
    pub reset: bool,
}

/// A hook called with (kind, key) of every change a unit of work committed in this process.
type Hook = Box<dyn Fn(&str, &str) + Send + Sync>;

/// The hooks of [`Store::on_commit`].
#[derive(Default)]
pub(crate) struct CommitHooks(RwLock<Vec<Hook>>);

impl CommitHooks {
    pub(crate) fn notify(&self, changed: &[(&'static str, String)]) {
        let hooks = self.0.read().unwrap_or_else(|p| p.into_inner());
        for (kind, key) in changed {
            for h in hooks.iter() {
                h(kind, key);
            }
        }
    }
}

/// The `meta` key noting the highest `seq` purged.
const PURGED_THROUGH: &str = "changes_purged_through";

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Tx {
    /// Append (kind, key) to the change feed in this unit of work: it is seen by readers of
    /// the feed when, and only if, this unit commits.
    pub(crate) async fn record_change(&mut self, kind: &'static str, key: &str) -> Result<()> {
        let ts = now_ms();
        let sql = match self.backend() {
            Backend::Sqlite => "INSERT INTO changes(ts, kind, key) VALUES ($1, $2, $3)",
            Backend::Postgres => {
                "INSERT INTO changes(ts, kind, key, txid)
                 VALUES ($1, $2, $3, CAST(CAST(pg_current_xact_id() AS TEXT) AS BIGINT))"
            }
        };
        self.conn().execute(sql, &params![ts, kind, key]).await?;
        self.changed.push((kind, key.to_string()));
        Ok(())
    }

    /// After a write statement: a write to a host table records [`kind::HOSTS`] once per unit
    /// of work.
    pub(crate) async fn note_write(&mut self, sql: &str) -> Result<()> {
        let Some(table) = written_table(sql) else {
            return Ok(());
        };
        if HOST_TABLES.contains(&table) && !self.changed.iter().any(|(k, _)| *k == kind::HOSTS) {
            self.record_change(kind::HOSTS, "*").await?;
        }
        Ok(())
    }
}

impl Store {
    /// Call `hook(kind, key)` for every change a unit of work of this process writes to the
    /// feed, when it commits (before [`Tx::commit`] returns). Hooks must be quick and must not
    /// open units of work; they stay for the life of the store (all its clones share them).
    pub fn on_commit(&self, hook: impl Fn(&str, &str) + Send + Sync + 'static) {
        self.hooks
            .0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(Box::new(hook));
    }

    /// The changes committed since `cursor`'s last read (in one snapshot), each delivered once
    /// to a cursor (by `seq` within one read; a late commit comes in a later read than higher
    /// `seq`s — see the module's doc). The first read of a cursor places it at the end and
    /// answers `reset`. PostgreSQL 13 or later (`pg_current_xact_id`, `pg_snapshot_xmin`).
    pub async fn changes_since(&self, cursor: &mut ChangeCursor) -> Result<ChangeBatch> {
        let mut tx = self.read("changes_since").await?;
        let pg = tx.backend() == Backend::Postgres;
        // first statement: it takes the snapshot the reads below see
        let xmin = if pg {
            tx.query_one(
                "SELECT CAST(CAST(pg_snapshot_xmin(pg_current_snapshot()) AS TEXT) AS BIGINT)",
                &[],
            )
            .await?
            .int(0)?
        } else {
            0
        };
        let purged: i64 = tx
            .query_opt(
                "SELECT value FROM meta WHERE key = $1",
                &params![PURGED_THROUGH],
            )
            .await?
            .map(|r| r.str(0).map(|v| v.parse().unwrap_or(0)))
            .transpose()?
            .unwrap_or(0);
        let last = match cursor.last {
            // rows this cursor never read were purged: it starts over
            Some(last) if purged <= last => last,
            _ => {
                // (re)start at the end of the feed
                let end = tx
                    .query_one("SELECT coalesce(max(seq), 0) FROM changes", &[])
                    .await?
                    .int(0)?;
                let mut recent = BTreeMap::new();
                if pg {
                    for r in tx
                        .query(
                            "SELECT seq, txid FROM changes WHERE txid >= $1",
                            &params![xmin],
                        )
                        .await?
                    {
                        recent.insert(r.int(0)?, r.int(1)?);
                    }
                }
                *cursor = ChangeCursor {
                    last: Some(end.max(purged)),
                    xmin,
                    recent,
                };
                return Ok(ChangeBatch {
                    changes: vec![],
                    reset: true,
                });
            }
        };
        let rows = if pg {
            tx.query(
                "SELECT seq, ts, kind, key, txid FROM changes WHERE seq > $1 OR txid >= $2
                 ORDER BY seq",
                &params![last, cursor.xmin],
            )
            .await?
        } else {
            tx.query(
                "SELECT seq, ts, kind, key, txid FROM changes WHERE seq > $1 ORDER BY seq",
                &params![last],
            )
            .await?
        };
        drop(tx);
        let mut changes = Vec::with_capacity(rows.len());
        let mut new_last = last;
        for r in &rows {
            let seq = r.int(0)?;
            if cursor.recent.contains_key(&seq) {
                continue;
            }
            if let Some(txid) = r.opt_int(4)?.filter(|_| pg) {
                cursor.recent.insert(seq, txid);
            }
            new_last = new_last.max(seq);
            changes.push(Change {
                seq,
                ts: r.u64(1)?,
                kind: r.text(2)?,
                key: r.text(3)?,
            });
        }
        // a row whose transaction is below the new mark was visible to this read (committed
        // or never will be): it is not asked for again
        cursor.recent.retain(|_, txid| *txid >= xmin);
        cursor.last = Some(new_last);
        cursor.xmin = xmin;
        Ok(ChangeBatch {
            changes,
            reset: false,
        })
    }

    /// Remove the rows of the feed written before `before_ms` (milliseconds since the Unix
    /// epoch); the number removed. The highest `seq` removed is noted, so a reader that had
    /// not read that far is told to start over (`reset`) rather than miss changes. (A change
    /// whose transaction stays open longer than the retention a caller purges with may go
    /// unseen by readers: keep the retention far above any transaction's duration.)
    pub async fn purge_changes(&self, before_ms: u64) -> Result<u64> {
        let mut tx = self.write("purge_changes").await?;
        let gone = tx
            .query(
                "DELETE FROM changes WHERE ts < $1 RETURNING seq",
                &[Param::from(before_ms)],
            )
            .await?;
        let mut through = 0;
        for r in &gone {
            through = through.max(r.int(0)?);
        }
        if through > 0 {
            // only ever raised (purges of several servers may run at once)
            tx.execute(
                "INSERT INTO meta(key, value) VALUES ($1, $2)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value
                 WHERE CAST(meta.value AS BIGINT) < CAST(excluded.value AS BIGINT)",
                &params![PURGED_THROUGH, &through.to_string()],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(gone.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_table_of_a_write_statement() {
        use super::written_table as t;
        assert_eq!(t("INSERT INTO vms(key, body) VALUES ($1, $2)"), Some("vms"));
        assert_eq!(
            t("\n  insert into vm_identities (a) values (1)"),
            Some("vm_identities")
        );
        assert_eq!(
            t("UPDATE identities SET body = $2 WHERE key = $1"),
            Some("identities")
        );
        assert_eq!(
            t("DELETE FROM host_credentials WHERE vm_key = $1"),
            Some("host_credentials")
        );
        assert_eq!(t("SELECT 1 FROM vms"), None);
        assert_eq!(t(""), None);
    }
}
