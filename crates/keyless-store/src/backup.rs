//! Online backup and restore, and the move between backends (`keyless admin migrate` is a
//! backup of one store restored into another).
//!
//! A backup is JSON lines read in one snapshot (one read transaction: SQLite WAL readers and
//! PostgreSQL `REPEATABLE READ` see one point in time while writers go on): a header with the
//! schema version, then for each table a `{"table","columns"}` line followed by one JSON array
//! per row (integers, strings, `null`, bytes as `{"b64":…}`), then a trailer with the row count
//! of every table. Tables and columns come from the database's own catalog, so a table added
//! by a later migration is carried without a change here. Sealed values (private keys, secret
//! values) are copied as they are stored — still sealed under the key-encryption key, which is
//! not in the backup: keep it apart, and give the restored server the same key.
//! Restore writes into an empty database of the same schema version in one transaction, checks
//! every table's count against the trailer and that the target's key-encryption key opens the
//! restored data (the check value `Store::verify_kek` seals) before committing: a truncated or
//! damaged file, a non-empty target or another key leave the target as it was.

use crate::db::{Backend, Param, Value};
use crate::migrations::MIGRATIONS;
use crate::{Result, Store, StoreError, Tx};
use base64::Engine as _;
use serde_json::{json, Value as J};
use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::Path;

/// Tables that are not data: schema bookkeeping and leases (a lease held in the source means
/// nothing in the copy).
const SKIP: &[&str] = &["keyless_schema", "leases"];

/// What a backup or restore carried: rows per table.
pub type Counts = BTreeMap<String, u64>;

/// The secret `Store::verify_kek` seals to check a key-encryption key (its name there).
const KEK_CHECK: &str = "kek-check";

/// The schema version (migrations applied) of the SQLite database at `path`, read without
/// creating, migrating or locking anything: an online backup of a data dir whose server runs
/// must not change its database, so it checks the version before opening a [`Store`] on it.
pub fn sqlite_schema_version(path: &Path) -> Result<usize> {
    use rusqlite::OpenFlags;
    // read-write without CREATE: a missing file is an error, and a WAL database opens even
    // when its -shm file does not exist yet (a read-only connection could not create it)
    let conn = rusqlite::Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    let v: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    Ok(v.max(0) as usize)
}

fn bad(m: impl Into<String>) -> StoreError {
    StoreError::Corrupt(m.into())
}

async fn tables(tx: &mut Tx) -> Result<Vec<String>> {
    let sql = match tx.backend() {
        Backend::Sqlite => {
            "SELECT name FROM sqlite_master WHERE type = 'table' AND substr(name, 1, 7) <> 'sqlite_' ORDER BY name"
        }
        Backend::Postgres => {
            "SELECT CAST(table_name AS TEXT) FROM information_schema.tables WHERE table_schema = current_schema() AND table_type = 'BASE TABLE' ORDER BY table_name"
        }
    };
    let mut out = Vec::new();
    for r in tx.query(sql, &[]).await? {
        let name = r.text(0)?;
        if !SKIP.contains(&name.as_str()) {
            out.push(name);
        }
    }
    Ok(out)
}

async fn columns(tx: &mut Tx, table: &str) -> Result<Vec<String>> {
    let sql = match tx.backend() {
        Backend::Sqlite => "SELECT name FROM pragma_table_info($1) ORDER BY cid",
        Backend::Postgres => {
            "SELECT CAST(column_name AS TEXT) FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position"
        }
    };
    tx.query(sql, &[Param::Text(table)])
        .await?
        .iter()
        .map(|r| r.text(0))
        .collect()
}

/// Table and column names come from the catalog; quote them anyway.
fn ident(name: &str) -> Result<String> {
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(bad(format!("unexpected name in the schema: {name:?}")));
    }
    Ok(format!("\"{name}\""))
}

fn to_json(v: &Value) -> J {
    match v {
        Value::Null => J::Null,
        Value::Int(i) => json!(i),
        Value::Text(s) => json!(s),
        Value::Bytes(b) => json!({"b64": base64::engine::general_purpose::STANDARD.encode(b)}),
    }
}

fn from_json(v: &J) -> Result<Value> {
    Ok(match v {
        J::Null => Value::Null,
        J::Number(n) => Value::Int(
            n.as_i64()
                .ok_or_else(|| bad("a number that is not an i64"))?,
        ),
        J::String(s) => Value::Text(s.clone()),
        J::Object(o) => match o.get("b64").and_then(J::as_str) {
            Some(b) => Value::Bytes(
                base64::engine::general_purpose::STANDARD
                    .decode(b)
                    .map_err(|e| bad(format!("bytes: {e}")))?,
            ),
            None => return Err(bad("an object that is not {\"b64\":…}")),
        },
        _ => return Err(bad("a value that is not null, an integer, text or bytes")),
    })
}

fn param(v: &Value) -> Param<'_> {
    match v {
        Value::Null => Param::Null,
        Value::Int(i) => Param::Int(*i),
        Value::Text(s) => Param::Text(s),
        Value::Bytes(b) => Param::Bytes(b),
    }
}

fn io(e: std::io::Error) -> StoreError {
    StoreError::Io(e)
}

impl Store {
    /// Whether this store's key-encryption key opens its data, read-only (nothing is sealed
    /// or written, so it can run against the database of a running server): `Some(true)` it
    /// opens the check value, `Some(false)` it does not (another key), `None` no check value
    /// has been sealed yet.
    pub async fn kek_opens_data(&self) -> Result<Option<bool>> {
        let mut tx = self.read("kek_check").await?;
        match tx.get_secret(KEK_CHECK).await {
            Ok(Some(_)) => Ok(Some(true)),
            Ok(None) => Ok(None),
            Err(StoreError::Decrypt) => Ok(Some(false)),
            Err(e) => Err(e),
        }
    }

    /// Write a consistent backup of everything to `out`; returns the rows written per table.
    pub async fn backup(&self, out: &mut (dyn Write + Send)) -> Result<Counts> {
        let mut tx = self.read("backup").await?;
        let header = json!({"keylessBackup": 1, "schemaVersion": MIGRATIONS.len(), "backend": tx.backend().name()});
        writeln!(out, "{header}").map_err(io)?;
        let mut counts = Counts::new();
        for table in tables(&mut tx).await? {
            let cols = columns(&mut tx, &table).await?;
            writeln!(out, "{}", json!({"table": table, "columns": cols})).map_err(io)?;
            let list = cols
                .iter()
                .map(|c| ident(c))
                .collect::<Result<Vec<_>>>()?
                .join(", ");
            let sql = format!("SELECT {list} FROM {}", ident(&table)?);
            let rows = tx.query(&sql, &[]).await?;
            for r in &rows {
                let vals: Vec<J> = r.0.iter().map(to_json).collect();
                writeln!(out, "{}", J::Array(vals)).map_err(io)?;
            }
            counts.insert(table, rows.len() as u64);
        }
        writeln!(out, "{}", json!({"end": true, "counts": counts})).map_err(io)?;
        out.flush().map_err(io)?;
        Ok(counts)
    }

    /// Restore a backup into this store, which must hold no data (a new database, migrated
    /// at start). All in one transaction: on any error nothing is written.
    pub async fn restore(&self, input: &mut (dyn BufRead + Send)) -> Result<Counts> {
        let mut lines = input.lines();
        let mut line_no = 0usize;
        let mut next = || -> Result<Option<J>> {
            match lines.next() {
                None => Ok(None),
                Some(l) => {
                    line_no += 1;
                    let l = l.map_err(io)?;
                    serde_json::from_str(&l).map(Some).map_err(|e| {
                        bad(format!(
                            "backup line {line_no} is not JSON ({e}): the file is truncated or damaged"
                        ))
                    })
                }
            }
        };
        let header = next()?.ok_or_else(|| bad("empty backup"))?;
        if header["keylessBackup"] != json!(1) {
            return Err(bad("not a Keyless backup (no keylessBackup header)"));
        }
        let version = header["schemaVersion"].as_u64().unwrap_or(0) as usize;
        if version != MIGRATIONS.len() {
            return Err(bad(format!(
                "the backup has schema version {version}, this binary {}: restore it with the same version of keyless",
                MIGRATIONS.len()
            )));
        }
        let mut tx = self.write("restore").await?;
        let present = tables(&mut tx).await?;
        for t in &present {
            if tx
                .query_opt(&format!("SELECT 1 FROM {} LIMIT 1", ident(t)?), &[])
                .await?
                .is_some()
            {
                return Err(StoreError::Conflict(crate::Conflict::NameTaken(format!(
                    "the target database is not empty (table {t} has rows); restore into a new database"
                ))));
            }
        }
        let mut counts = Counts::new();
        // rows go in by batches of one multi-row INSERT each (a round trip per batch, not
        // per row): the current table's, flushed when the table changes and at the trailer
        let mut batch: Option<Batch> = None;
        let trailer = loop {
            let Some(line) = next()? else {
                return Err(bad("the backup ends without its trailer (truncated?)"));
            };
            match &line {
                J::Object(o) if o.contains_key("table") => {
                    if let Some(b) = batch.as_mut() {
                        b.flush(&mut tx).await?;
                    }
                    let table = o["table"]
                        .as_str()
                        .ok_or_else(|| bad("table name"))?
                        .to_string();
                    if !present.contains(&table) {
                        return Err(bad(format!(
                            "the backup has a table {table} this schema does not"
                        )));
                    }
                    let cols: Vec<String> = serde_json::from_value(o["columns"].clone())
                        .map_err(|e| bad(format!("columns of {table}: {e}")))?;
                    let names = cols
                        .iter()
                        .map(|c| ident(c))
                        .collect::<Result<Vec<_>>>()?
                        .join(", ");
                    if cols.is_empty() {
                        return Err(bad(format!("table {table} has no columns")));
                    }
                    counts.insert(table.clone(), 0);
                    batch = Some(Batch {
                        head: format!("INSERT INTO {} ({names}) VALUES ", ident(&table)?),
                        table,
                        columns: cols.len(),
                        rows: Vec::new(),
                    });
                }
                J::Object(o) if o.contains_key("end") => {
                    if next()?.is_some() {
                        return Err(bad("lines after the backup's trailer"));
                    }
                    if let Some(b) = batch.as_mut() {
                        b.flush(&mut tx).await?;
                    }
                    break line.clone();
                }
                J::Array(vals) => {
                    let b = batch
                        .as_mut()
                        .ok_or_else(|| bad("a row before its table"))?;
                    if vals.len() != b.columns {
                        return Err(bad(format!(
                            "a row of {} with {} values for {} columns",
                            b.table,
                            vals.len(),
                            b.columns
                        )));
                    }
                    b.rows
                        .push(vals.iter().map(from_json).collect::<Result<Vec<_>>>()?);
                    *counts.get_mut(&b.table).expect("counted") += 1;
                    if b.rows.len() >= b.capacity() {
                        b.flush(&mut tx).await?;
                    }
                }
                _ => return Err(bad("an unexpected line in the backup")),
            }
        };
        let expected: Counts = serde_json::from_value(trailer["counts"].clone())
            .map_err(|e| bad(format!("trailer: {e}")))?;
        if expected != counts {
            return Err(bad(format!(
                "row counts differ from the trailer: read {counts:?}, trailer {expected:?}"
            )));
        }
        // what the database now holds, counted again
        for (t, n) in &counts {
            let got = tx
                .query_one(&format!("SELECT COUNT(*) FROM {}", ident(t)?), &[])
                .await?
                .u64(0)?;
            if got != *n {
                return Err(bad(format!(
                    "table {t}: {got} rows after restore, {n} in the backup"
                )));
            }
        }
        // the restored data must open with this store's key: a server given this key would
        // otherwise refuse the database (`verify_kek`) after the copy was committed
        match tx.get_secret(KEK_CHECK).await {
            Ok(_) => {}
            Err(StoreError::Decrypt) => {
                return Err(StoreError::Kek(
                    "the backup was sealed under a different key-encryption key than the one given: restore it with the key of the servers it came from".into(),
                ))
            }
            Err(e) => return Err(e),
        }
        if tx.backend() == Backend::Postgres {
            // identity columns continue after the restored values
            let ids = tx
                .query(
                    "SELECT CAST(table_name AS TEXT), CAST(column_name AS TEXT) FROM information_schema.columns WHERE table_schema = current_schema() AND is_identity = 'YES'",
                    &[],
                )
                .await?;
            for r in ids {
                let (t, c) = (r.text(0)?, r.text(1)?);
                let sql = format!(
                    "SELECT setval(pg_get_serial_sequence('{t}', '{c}'), COALESCE((SELECT MAX({}) FROM {}), 0) + 1, false)",
                    ident(&c)?,
                    ident(&t)?
                );
                tx.query(&sql, &[]).await?;
            }
        }
        tx.commit().await?;
        Ok(counts)
    }
}

/// Rows of one table waiting to be restored by one multi-row INSERT.
struct Batch {
    table: String,
    /// `INSERT INTO t (c1, …) VALUES `
    head: String,
    columns: usize,
    rows: Vec<Vec<Value>>,
}

impl Batch {
    /// Rows per INSERT: at most 500, and at most 30,000 parameters (SQLite allows 32,766,
    /// PostgreSQL 65,535).
    fn capacity(&self) -> usize {
        (30_000 / self.columns).clamp(1, 500)
    }

    async fn flush(&mut self, tx: &mut Tx) -> Result<()> {
        if self.rows.is_empty() {
            return Ok(());
        }
        let mut sql = self.head.clone();
        let mut n = 0;
        for r in 0..self.rows.len() {
            if r > 0 {
                sql.push_str(", ");
            }
            sql.push('(');
            for c in 0..self.columns {
                if c > 0 {
                    sql.push_str(", ");
                }
                n += 1;
                sql.push_str(&format!("${n}"));
            }
            sql.push(')');
        }
        let params: Vec<Param<'_>> = self.rows.iter().flatten().map(param).collect();
        // the rows as they were, the change feed's included: nothing is noted in the feed
        tx.conn().execute(&sql, &params).await?;
        self.rows.clear();
        Ok(())
    }
}
