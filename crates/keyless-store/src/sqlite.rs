//! The embedded SQLite backend: one file, WAL mode, migrations applied at open.
//!
//! One writer connection behind an async mutex (a write transaction is `BEGIN IMMEDIATE`, so
//! its reads and writes are one atomic unit) and a small pool of reader connections, each read
//! transaction one snapshot (WAL readers never wait for the writer).
//!
//! A reader keeps its snapshot open when its unit of work ends, and the next read unit of work
//! on it goes on in that snapshot while it is still the newest: no write committed through
//! this database since it began (a generation the writer bumps after each commit, before the
//! write's caller learns of it) and younger than [`SNAPSHOT_REUSE`] (a bound for writes by
//! another process, which the generation cannot see). So a read that follows an acknowledged
//! write always sees it, and a run of reads skips `BEGIN`, `ROLLBACK` and the WAL's
//! shared-memory lock (`fcntl`) each would take — about a fifth of a cached Key Vault GET.
//! A commit first ends the snapshots idle in the pool, so none holds back the checkpoint it
//! runs, and a reader given back after a commit ends its stale snapshot. Waiting for a connection
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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedMutexGuard, OwnedSemaphorePermit, Semaphore};

/// Reader connections per database.
const READERS: usize = 8;

/// How long a reader's snapshot serves further read units of work (module doc).
const SNAPSHOT_REUSE: std::time::Duration = std::time::Duration::from_millis(200);

/// A reader connection and, while it is in a read transaction, when that began and the
/// writer's generation then.
struct Reader {
    conn: Connection,
    snapshot: Option<(u64, std::time::Instant)>,
}

impl Reader {
    fn open(path: &Path) -> Result<Self> {
        Ok(Reader {
            conn: open_conn(path)?,
            snapshot: None,
        })
    }

    /// End its snapshot; `false` when the connection is broken (dropped then).
    fn end_snapshot(&mut self) -> bool {
        if self.snapshot.take().is_some() {
            return run_plain(&self.conn, "ROLLBACK").is_ok() || self.conn.is_autocommit();
        }
        true
    }
}

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
    readers: Arc<Mutex<Vec<Reader>>>,
    permits: Arc<Semaphore>,
    /// Bumped after every commit of the writer.
    generation: Arc<AtomicU64>,
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
            generation: Arc::new(AtomicU64::new(0)),
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
            return Ok(Box::new(WriteConn {
                conn: guard,
                generation: self.generation.clone(),
                readers: self.readers.clone(),
            }));
        }
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Unavailable("store closed".into()))?;
        let pooled = self.readers.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut reader = match pooled {
            Some(r) => r,
            None => Reader::open(&self.path)?,
        };
        // read before BEGIN: the snapshot is at least as new as the generation recorded
        let generation = self.generation.load(Ordering::Acquire);
        let current = reader
            .snapshot
            .is_some_and(|(g, at)| g == generation && at.elapsed() < SNAPSHOT_REUSE);
        if !current {
            if !reader.end_snapshot() {
                reader = Reader::open(&self.path)?;
            }
            run_plain(&reader.conn, "BEGIN")?;
            reader.snapshot = Some((generation, std::time::Instant::now()));
        }
        Ok(Box::new(ReadConn {
            reader: Some(reader),
            pool: self.readers.clone(),
            generation: self.generation.clone(),
            _permit: permit,
        }))
    }
}

struct WriteConn {
    conn: OwnedMutexGuard<Connection>,
    generation: Arc<AtomicU64>,
    readers: Arc<Mutex<Vec<Reader>>>,
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
        // the snapshots idle in the pool end first: the checkpoint this COMMIT may run then
        // finds no reader of its frames but the ones in use (they would hold the WAL back)
        self.readers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain_mut(Reader::end_snapshot);
        let r = run_plain(&self.conn, "COMMIT");
        // before the write's caller goes on, whatever COMMIT said (a failed one may still have
        // committed): no read that starts after uses an older snapshot
        self.generation.fetch_add(1, Ordering::AcqRel);
        if let Err(e) = r {
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
    reader: Option<Reader>,
    pool: Arc<Mutex<Vec<Reader>>>,
    generation: Arc<AtomicU64>,
    _permit: OwnedSemaphorePermit,
}

impl ReadConn {
    fn c(&self) -> &Connection {
        &self
            .reader
            .as_ref()
            .expect("connection present until dropped")
            .conn
    }
    /// Give the connection back, its snapshot kept for the next read unit of work (`keep`,
    /// and still the newest: a write committed meanwhile ends it here, so no stale snapshot
    /// waits in the pool holding the WAL back) or ended; a broken one is dropped.
    #[allow(clippy::boxed_local)] // called from `Conn` methods that own the box
    fn release(mut self: Box<Self>, keep: bool) {
        if let Some(mut r) = self.reader.take() {
            if r.conn.is_autocommit() {
                // the transaction ended under it (an error): nothing to keep
                r.snapshot = None;
            }
            let current = self.generation.load(Ordering::Acquire);
            let keep = keep && r.snapshot.is_some_and(|(g, _)| g == current);
            if keep || r.end_snapshot() {
                self.pool.lock().unwrap_or_else(|p| p.into_inner()).push(r);
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
        self.release(true);
        Ok(())
    }
    fn abort(self: Box<Self>) {
        self.release(false);
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

    async fn value(db: &SqliteDb) -> i64 {
        let mut c = db.begin(false).await.unwrap();
        let rows = c.query("SELECT a FROM t", &[]).await.unwrap();
        c.commit().await.unwrap();
        match rows[0].0[0] {
            Value::Int(v) => v,
            ref v => panic!("{v:?}"),
        }
    }

    async fn set(db: &SqliteDb, v: i64) {
        let mut c = db.begin(true).await.unwrap();
        c.execute("UPDATE t SET a = $1", &[Param::Int(v)])
            .await
            .unwrap();
        c.commit().await.unwrap();
    }

    #[tokio::test]
    async fn a_kept_snapshot_never_hides_a_committed_write() {
        let dir = tempfile::tempdir().unwrap();
        let db = SqliteDb::open(&dir.path().join("db.sqlite")).unwrap();
        {
            let mut c = db.begin(true).await.unwrap();
            c.execute("CREATE TABLE t (a INTEGER)", &[]).await.unwrap();
            c.execute("INSERT INTO t VALUES (1)", &[]).await.unwrap();
            c.commit().await.unwrap();
        }
        // a run of reads on one kept snapshot
        for _ in 0..3 {
            assert_eq!(value(&db).await, 1);
        }
        assert!(db
            .readers
            .lock()
            .unwrap()
            .iter()
            .all(|r| r.snapshot.is_some()));
        // a write through this database: the next read sees it at once, and the commit ended
        // the idle snapshots
        set(&db, 2).await;
        assert!(db
            .readers
            .lock()
            .unwrap()
            .iter()
            .all(|r| r.snapshot.is_none()));
        assert_eq!(value(&db).await, 2);
        // a reader in use while a write commits ends its old snapshot when given back
        let mut busy = db.begin(false).await.unwrap();
        assert_eq!(busy.query("SELECT a FROM t", &[]).await.unwrap().len(), 1);
        set(&db, 3).await;
        busy.commit().await.unwrap();
        let now = db.generation.load(Ordering::Acquire);
        assert!(db
            .readers
            .lock()
            .unwrap()
            .iter()
            .all(|r| r.snapshot.is_none_or(|(g, _)| g == now)));
        for _ in 0..READERS + 1 {
            assert_eq!(value(&db).await, 3);
        }
        // a write by another process (another database on the file: its own generation) is
        // seen within SNAPSHOT_REUSE
        let other = SqliteDb::open(&dir.path().join("db.sqlite")).unwrap();
        set(&other, 4).await;
        tokio::time::sleep(SNAPSHOT_REUSE + std::time::Duration::from_millis(50)).await;
        assert_eq!(value(&db).await, 4);
    }
}
