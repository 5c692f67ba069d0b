//! [`Store`] (a cheap handle shared by every task) and [`Tx`] (one unit of work).

use crate::db::{Backend, Conn, Db, Param, Row};
use crate::{Kek, Result, StoreError};
use std::sync::Arc;
use std::time::Instant;

/// The store: a database plus the key-encryption key. Clone it freely.
#[derive(Clone)]
pub struct Store {
    pub(crate) db: Arc<dyn Db>,
    pub(crate) kek: Arc<Kek>,
    /// Called with what a unit of work wrote to the change feed once it commits
    /// ([`Store::on_commit`]).
    pub(crate) hooks: Arc<crate::repo::changes::CommitHooks>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.db.backend())
            .finish()
    }
}

impl Store {
    pub(crate) fn new(db: Arc<dyn Db>, kek: Kek) -> Self {
        Self {
            db,
            kek: Arc::new(kek),
            hooks: Default::default(),
        }
    }

    /// The embedded default: one SQLite file (created and migrated if needed).
    pub fn sqlite(path: &std::path::Path, kek: Kek) -> Result<Self> {
        Ok(Self::new(
            Arc::new(crate::sqlite::SqliteDb::open(path)?),
            kek,
        ))
    }

    /// A PostgreSQL database (`postgres://…`), migrated if needed.
    pub async fn postgres(opts: &crate::postgres::PgOptions, kek: Kek) -> Result<Self> {
        Ok(Self::new(
            Arc::new(crate::postgres::PgDb::connect(opts).await?),
            kek,
        ))
    }

    pub fn backend(&self) -> Backend {
        self.db.backend()
    }

    /// Begin a read-only unit of work: one consistent view of the database.
    pub async fn read(&self, operation: &'static str) -> Result<Tx> {
        self.begin(operation, false).await
    }

    /// Begin a read-modify-write unit of work; nothing is kept unless [`Tx::commit`] is called.
    pub async fn write(&self, operation: &'static str) -> Result<Tx> {
        self.begin(operation, true).await
    }

    async fn begin(&self, operation: &'static str, write: bool) -> Result<Tx> {
        let started = Instant::now();
        let conn = self.db.begin(write).await?;
        Ok(Tx {
            conn: Some(conn),
            kek: self.kek.clone(),
            hooks: self.hooks.clone(),
            changed: Vec::new(),
            operation,
            started,
            write,
        })
    }

    /// Check that this process's key-encryption key is the one the database was sealed with
    /// (the first process seals a check value): replicas given different keys would each
    /// seal what the others cannot open.
    pub async fn verify_kek(&self) -> Result<()> {
        const NAME: &str = "kek-check";
        const VALUE: &[u8] = b"keyless key-encryption key check";
        let mut tx = self.write("verify_kek").await?;
        tx.put_secret_if_absent(NAME, VALUE).await?;
        match tx.get_secret(NAME).await {
            Ok(Some(v)) if v == VALUE => tx.commit().await,
            Ok(_) | Err(StoreError::Decrypt) => Err(StoreError::Kek(
                "the database was sealed with a different key-encryption key: give every server the same --kek / KEYLESS_KEK (or the same <data-dir>/kek)".into(),
            )),
            Err(e) => Err(e),
        }
    }

    /// The key-encryption key (sealing outside a transaction, e.g. for a backup).
    pub fn kek(&self) -> &Kek {
        &self.kek
    }
}

/// One unit of work. Dropped without [`Tx::commit`] it rolls back. Its duration, from the wait
/// for a connection to its end, is recorded as `keyless_store_call_duration_seconds{operation}`.
pub struct Tx {
    conn: Option<Box<dyn Conn>>,
    pub(crate) kek: Arc<Kek>,
    pub(crate) hooks: Arc<crate::repo::changes::CommitHooks>,
    /// What this unit of work wrote to the change feed (kind, key), for the commit hooks.
    pub(crate) changed: Vec<(&'static str, String)>,
    operation: &'static str,
    started: Instant,
    write: bool,
}

impl Tx {
    /// `plaintext` sealed with the key-encryption key, bound to `aad` (what it belongs to):
    /// for a value a caller of the store keeps in a record of its own.
    pub fn seal(&self, aad: &str, plaintext: &[u8]) -> Result<Vec<u8>> {
        self.kek.seal(aad, plaintext)
    }

    /// What [`Tx::seal`] sealed for `aad`.
    pub fn open_sealed(&self, aad: &str, sealed: &[u8]) -> Result<Vec<u8>> {
        self.kek.open(aad, sealed)
    }

    pub(crate) fn conn(&mut self) -> &mut Box<dyn Conn> {
        self.conn.as_mut().expect("transaction already ended")
    }

    pub fn backend(&self) -> Backend {
        self.conn
            .as_ref()
            .expect("transaction already ended")
            .backend()
    }

    pub fn is_write(&self) -> bool {
        self.write
    }

    pub(crate) async fn query(&mut self, sql: &str, params: &[Param<'_>]) -> Result<Vec<Row>> {
        let rows = self.conn().query(sql, params).await?;
        // a write statement answering rows (`… RETURNING`)
        if self.write && !rows.is_empty() {
            self.note_write(sql).await?;
        }
        Ok(rows)
    }

    /// The first row, if any.
    pub(crate) async fn query_opt(
        &mut self,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<Option<Row>> {
        Ok(self.query(sql, params).await?.into_iter().next())
    }

    /// Exactly one row.
    pub(crate) async fn query_one(&mut self, sql: &str, params: &[Param<'_>]) -> Result<Row> {
        self.query_opt(sql, params)
            .await?
            .ok_or_else(|| StoreError::Corrupt(format!("no row from: {sql}")))
    }

    pub(crate) async fn execute(&mut self, sql: &str, params: &[Param<'_>]) -> Result<u64> {
        let n = self.conn().execute(sql, params).await?;
        if n > 0 {
            self.note_write(sql).await?;
        }
        Ok(n)
    }

    /// Lock one row until the transaction ends, so a read-modify-write under that row (the
    /// federated credentials of an identity, the instances of a scale set) is not raced by
    /// another writer in any process. `table` and `column` are literals of the caller. On
    /// SQLite a write transaction already excludes every other writer; the query only tells
    /// whether the row exists. True when the row exists.
    pub async fn lock_row(
        &mut self,
        table: &'static str,
        column: &'static str,
        key: &str,
    ) -> Result<bool> {
        let sql = match self.backend() {
            Backend::Sqlite => format!("SELECT 1 FROM {table} WHERE {column} = $1"),
            Backend::Postgres => format!("SELECT 1 FROM {table} WHERE {column} = $1 FOR UPDATE"),
        };
        Ok(self.query_opt(&sql, &[Param::Text(key)]).await?.is_some())
    }

    /// Make the unit of work durable. What it wrote to the change feed is then handed to this
    /// process's commit hooks ([`Store::on_commit`]) before this returns — also when the commit
    /// failed, as a failed `COMMIT` may still have committed (forgetting a cached value is
    /// always safe).
    pub async fn commit(mut self) -> Result<()> {
        let conn = self.conn.take().expect("transaction already ended");
        let r = conn.commit().await;
        if !self.changed.is_empty() {
            self.hooks.notify(&self.changed);
        }
        r
    }
}

impl Drop for Tx {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            conn.abort();
        }
        keyless_ops::metrics::store_call(self.operation, self.started.elapsed());
    }
}

pub(crate) fn json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

pub(crate) fn parse<T: serde::de::DeserializeOwned>(s: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(e.to_string()))
}

pub(crate) fn lower(s: &str) -> String {
    s.to_ascii_lowercase()
}
