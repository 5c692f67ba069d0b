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

/// `$n` → `?n` (SQLite reads `$1` as a *named* parameter, numbered by first appearance).
fn translate(sql: &str) -> std::borrow::Cow<'_, str> {
    if !sql.contains('$') {
        return sql.into();
    }
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '$' && chars.peek().is_some_and(|d| d.is_ascii_digit()) {
            out.push('?');
        } else {
            out.push(c);
        }
    }
    out.into()
}

fn run_query(conn: &Connection, sql: &str, params: &[Param<'_>]) -> Result<Vec<Row>> {
    let mut st = conn.prepare_cached(&translate(sql))?;
    let n = st.column_count();
    let mut rows = st.query(rusqlite::params_from_iter(params.iter()))?;
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
    let mut st = conn.prepare_cached(&translate(sql))?;
    Ok(st.execute(rusqlite::params_from_iter(params.iter()))? as u64)
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
            guard.execute_batch("BEGIN IMMEDIATE")?;
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
        conn.execute_batch("BEGIN")?;
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
        if let Err(e) = self.conn.execute_batch("COMMIT") {
            let _ = self.conn.execute_batch("ROLLBACK");
            return Err(e.into());
        }
        Ok(())
    }
    fn abort(self: Box<Self>) {
        let _ = self.conn.execute_batch("ROLLBACK");
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
            if c.execute_batch("ROLLBACK").is_ok() || c.is_autocommit() {
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
    #[test]
    fn dollar_parameters_become_numbered() {
        assert_eq!(
            super::translate("SELECT a FROM t WHERE b = $2 AND c = $1 || '/'"),
            "SELECT a FROM t WHERE b = ?2 AND c = ?1 || '/'"
        );
    }
}
