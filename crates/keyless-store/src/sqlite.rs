//! The embedded SQLite backend: one file, WAL mode, migrations applied at open.
//!
//! One writer connection behind an async mutex (a write transaction is `BEGIN IMMEDIATE`, so
//! its reads and writes are one atomic unit) and a small pool of reader connections, each read
//! transaction one snapshot (WAL readers never wait for the writer). Waiting for a connection
//! is async; a statement itself runs on the calling task — microseconds for the page-cached
//! lookups this store does. Prepared statements are cached per connection and the query
//! planner keeps its first plan (`SQLITE_DBCONFIG_ENABLE_QPSG`: the bundled SQLite otherwise
//! re-plans every `ORDER BY` statement on every run).

use crate::db::{Backend, Conn, Db, Param, Row, Value};
use crate::migrations::MIGRATIONS;
use crate::{Conflict, Result, StoreError};
use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, ErrorCode};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedMutexGuard, OwnedSemaphorePermit, Semaphore};

/// Reader connections per database.
const READERS: usize = 8;

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        match &e {
            rusqlite::Error::SqliteFailure(f, msg) => match f.code {
                ErrorCode::ConstraintViolation
                    if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                        || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY =>
                {
                    StoreError::Conflict(Conflict::Unique(
                        msg.clone().unwrap_or_else(|| "unique".into()),
                    ))
                }
                ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked => {
                    StoreError::Unavailable(e.to_string())
                }
                ErrorCode::CannotOpen | ErrorCode::DiskFull | ErrorCode::SystemIoFailure => {
                    StoreError::Unavailable(e.to_string())
                }
                _ => StoreError::Backend(e.to_string()),
            },
            _ => StoreError::Backend(e.to_string()),
        }
    }
}

impl rusqlite::ToSql for Param<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match *self {
            Param::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            Param::Int(v) => ToSqlOutput::Borrowed(ValueRef::Integer(v)),
            Param::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
            Param::Bytes(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
        })
    }
}

/// `sql` prepared (cached per connection) with `params` bound: `$n` (how both backends
/// write parameters; SQLite reads it as a *named* parameter, numbered by first appearance) and
/// `?n` take `params[n - 1]`, a plain `?` the next one. The statement is cached under the SQL
/// as written, so nothing is rewritten per call. As with numbered parameters, `params` must
/// hold exactly as many values as the highest number used.
fn prepare<'c>(
    conn: &'c Connection,
    sql: &str,
    params: &[Param<'_>],
) -> Result<rusqlite::CachedStatement<'c>> {
    let mut st = conn.prepare_cached(sql)?;
    let mut highest = 0;
    for i in 1..=st.parameter_count() {
        let n = match st.parameter_name(i) {
            None => i,
            Some(name) => name
                .strip_prefix(['$', '?'])
                .and_then(|d| d.parse::<usize>().ok())
                .filter(|&n| n > 0)
                .ok_or_else(|| {
                    StoreError::Backend(format!("unsupported SQL parameter {name}: use $n"))
                })?,
        };
        let p = params.get(n - 1).ok_or_else(|| {
            StoreError::Backend(format!(
                "SQL parameter {n} not given ({} given)",
                params.len()
            ))
        })?;
        st.raw_bind_parameter(i, p)?;
        highest = highest.max(n);
    }
    if highest != params.len() {
        return Err(StoreError::Backend(format!(
            "{} SQL parameters given, the statement uses {highest}",
            params.len()
        )));
    }
    Ok(st)
}

fn run_query(conn: &Connection, sql: &str, params: &[Param<'_>]) -> Result<Vec<Row>> {
    let mut st = prepare(conn, sql, params)?;
    let n = st.column_count();
    let mut rows = st.raw_query();
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        let mut vals = Vec::with_capacity(n);
        for i in 0..n {
            vals.push(match r.get_ref(i)? {
                ValueRef::Null => Value::Null,
                ValueRef::Integer(v) => Value::Int(v),
                ValueRef::Real(v) => Value::Int(v as i64),
                ValueRef::Text(t) => Value::Text(
                    std::str::from_utf8(t)
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?
                        .to_string(),
                ),
                ValueRef::Blob(b) => Value::Bytes(b.to_vec()),
            });
        }
        out.push(Row(vals));
    }
    Ok(out)
}

fn run_execute(conn: &Connection, sql: &str, params: &[Param<'_>]) -> Result<u64> {
    Ok(prepare(conn, sql, params)?.raw_execute()? as u64)
}

/// A statement without parameters or rows (`BEGIN`, `COMMIT`, `ROLLBACK`), prepared once per
/// connection (`execute_batch` would parse it on every call).
fn run_plain(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.raw_execute().map(|_| ())
}

fn open_conn(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    conn.set_prepared_statement_cache_capacity(256);
    Ok(conn)
}

/// The SQLite database of a data dir.
pub struct SqliteDb {
    path: PathBuf,
    writer: Arc<tokio::sync::Mutex<Connection>>,
    readers: Arc<Mutex<Vec<Connection>>>,
    permits: Arc<Semaphore>,
}

impl SqliteDb {
    /// Open (creating if needed) the database at `path` and apply pending migrations.
    pub fn open(path: &Path) -> Result<Self> {
        let mut conn = open_conn(path)?;
        migrate(&mut conn)?;
        Ok(Self {
            path: path.to_path_buf(),
            writer: Arc::new(tokio::sync::Mutex::new(conn)),
            readers: Arc::new(Mutex::new(Vec::new())),
            permits: Arc::new(Semaphore::new(READERS)),
        })
    }
}

fn migrate(conn: &mut Connection) -> Result<()> {
    let done: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if done as usize > MIGRATIONS.len() {
        return Err(StoreError::Corrupt(format!(
            "database schema version {done} is newer than this binary ({})",
            MIGRATIONS.len()
        )));
    }
    for (i, m) in MIGRATIONS.iter().enumerate().skip(done as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(m.sqlite)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}

#[async_trait::async_trait]
impl Db for SqliteDb {
    fn backend(&self) -> Backend {
        Backend::Sqlite
    }

    async fn begin(&self, write: bool) -> Result<Box<dyn Conn>> {
        if write {
            let guard = self.writer.clone().lock_owned().await;
            run_plain(&guard, "BEGIN IMMEDIATE")?;
            return Ok(Box::new(WriteConn { conn: guard }));
        }
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Unavailable("store closed".into()))?;
        let pooled = self.readers.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let conn = match pooled {
            Some(c) => c,
            None => open_conn(&self.path)?,
        };
        run_plain(&conn, "BEGIN")?;
        Ok(Box::new(ReadConn {
            conn: Some(conn),
            pool: self.readers.clone(),
            _permit: permit,
        }))
    }
}

struct WriteConn {
    conn: OwnedMutexGuard<Connection>,
}

#[async_trait::async_trait]
impl Conn for WriteConn {
    fn backend(&self) -> Backend {
        Backend::Sqlite
    }
    async fn query(&mut self, sql: &str, params: &[Param<'_>]) -> Result<Vec<Row>> {
        run_query(&self.conn, sql, params)
    }
    async fn execute(&mut self, sql: &str, params: &[Param<'_>]) -> Result<u64> {
        run_execute(&self.conn, sql, params)
    }
    async fn commit(self: Box<Self>) -> Result<()> {
        if let Err(e) = run_plain(&self.conn, "COMMIT") {
            let _ = run_plain(&self.conn, "ROLLBACK");
            return Err(e.into());
        }
        Ok(())
    }
    fn abort(self: Box<Self>) {
        let _ = run_plain(&self.conn, "ROLLBACK");
    }
}

struct ReadConn {
    conn: Option<Connection>,
    pool: Arc<Mutex<Vec<Connection>>>,
    _permit: OwnedSemaphorePermit,
}

impl ReadConn {
    fn c(&self) -> &Connection {
        self.conn
            .as_ref()
            .expect("connection present until dropped")
    }
    /// End the snapshot and give the connection back (a broken one is dropped).
    #[allow(clippy::boxed_local)] // called from `Conn` methods that own the box
    fn release(mut self: Box<Self>) {
        if let Some(c) = self.conn.take() {
            if run_plain(&c, "ROLLBACK").is_ok() || c.is_autocommit() {
                self.pool.lock().unwrap_or_else(|p| p.into_inner()).push(c);
            }
        }
    }
}

#[async_trait::async_trait]
impl Conn for ReadConn {
    fn backend(&self) -> Backend {
        Backend::Sqlite
    }
    async fn query(&mut self, sql: &str, params: &[Param<'_>]) -> Result<Vec<Row>> {
        run_query(self.c(), sql, params)
    }
    async fn execute(&mut self, _sql: &str, _params: &[Param<'_>]) -> Result<u64> {
        Err(StoreError::Backend(
            "a write in a read transaction (open it with Store::write)".into(),
        ))
    }
    async fn commit(self: Box<Self>) -> Result<()> {
        self.release();
        Ok(())
    }
    fn abort(self: Box<Self>) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dollar_parameters_bind_by_number() {
        let c = Connection::open_in_memory().unwrap();
        let sql = "SELECT $2 || '/' || $1 || '/' || $2, '$1'";
        let rows = run_query(&c, sql, &[Param::Text("a"), Param::Int(7)]).unwrap();
        assert_eq!(
            rows[0].0,
            vec![Value::Text("7/a/7".into()), Value::Text("$1".into())]
        );
        // cached: the same statement with other values
        let rows = run_query(&c, sql, &[Param::Text("b"), Param::Null]).unwrap();
        assert_eq!(rows[0].0, vec![Value::Null, Value::Text("$1".into())]);
        // the highest number used must be the number of values given
        assert!(run_query(&c, sql, &[Param::Text("a")]).is_err());
        assert!(run_query(&c, sql, &[Param::Int(1), Param::Int(2), Param::Int(3)]).is_err());
        assert!(run_query(
            &c,
            "SELECT $1, $3",
            &[Param::Int(1), Param::Int(2), Param::Int(3)]
        )
        .is_ok());
        assert!(run_query(&c, "SELECT :x", &[Param::Int(1)]).is_err());
        // plain statements
        run_plain(&c, "BEGIN").unwrap();
        run_execute(&c, "CREATE TABLE t (a INTEGER)", &[]).unwrap();
        assert_eq!(
            run_execute(&c, "INSERT INTO t VALUES ($1)", &[Param::Int(3)]).unwrap(),
            1
        );
        run_plain(&c, "ROLLBACK").unwrap();
        assert!(c.is_autocommit());
    }
}
