//! The backend boundary: a connection inside one transaction that runs SQL with `$n`
//! parameters and returns rows of plain values. The repositories (`repo/`) are written once
//! against it; `sqlite` and `postgres` implement it. Nothing of a driver crosses this module.

use crate::{Conflict, Result, StoreError};

/// Which database a store runs on (for the few statements whose syntax differs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

/// One statement parameter. Integers are 64-bit; PostgreSQL narrows them to the column's type.
#[derive(Debug, Clone, Copy)]
pub enum Param<'a> {
    Null,
    Int(i64),
    Text(&'a str),
    Bytes(&'a [u8]),
}

impl<'a> From<&'a str> for Param<'a> {
    fn from(v: &'a str) -> Self {
        Param::Text(v)
    }
}
impl<'a> From<&'a String> for Param<'a> {
    fn from(v: &'a String) -> Self {
        Param::Text(v)
    }
}
impl<'a> From<&'a [u8]> for Param<'a> {
    fn from(v: &'a [u8]) -> Self {
        Param::Bytes(v)
    }
}
impl<'a> From<&'a Vec<u8>> for Param<'a> {
    fn from(v: &'a Vec<u8>) -> Self {
        Param::Bytes(v)
    }
}
impl From<i64> for Param<'_> {
    fn from(v: i64) -> Self {
        Param::Int(v)
    }
}
impl From<u64> for Param<'_> {
    fn from(v: u64) -> Self {
        Param::Int(v as i64)
    }
}
impl From<u32> for Param<'_> {
    fn from(v: u32) -> Self {
        Param::Int(v as i64)
    }
}
impl From<usize> for Param<'_> {
    fn from(v: usize) -> Self {
        Param::Int(v as i64)
    }
}
impl From<bool> for Param<'_> {
    fn from(v: bool) -> Self {
        Param::Int(v as i64)
    }
}
impl<'a, T: Into<Param<'a>>> From<Option<T>> for Param<'a> {
    fn from(v: Option<T>) -> Self {
        v.map(Into::into).unwrap_or(Param::Null)
    }
}

/// `params![a, b, c]` → `[Param; 3]`.
#[macro_export]
macro_rules! params {
    () => { [] as [$crate::db::Param<'_>; 0] };
    ($($p:expr),+ $(,)?) => { [$($crate::db::Param::from($p)),+] };
}

/// One column value of a result row.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Text(String),
    Bytes(Vec<u8>),
}

/// A result row: columns in `SELECT` order.
#[derive(Debug, Clone, PartialEq)]
pub struct Row(pub Vec<Value>);

fn corrupt(i: usize, want: &str, got: &Value) -> StoreError {
    StoreError::Corrupt(format!("column {i}: expected {want}, found {got:?}"))
}

impl Row {
    fn at(&self, i: usize) -> Result<&Value> {
        self.0
            .get(i)
            .ok_or_else(|| StoreError::Corrupt(format!("row has no column {i}")))
    }
    pub fn str(&self, i: usize) -> Result<&str> {
        match self.at(i)? {
            Value::Text(s) => Ok(s),
            v => Err(corrupt(i, "text", v)),
        }
    }
    pub fn text(&self, i: usize) -> Result<String> {
        self.str(i).map(str::to_string)
    }
    pub fn opt_text(&self, i: usize) -> Result<Option<String>> {
        match self.at(i)? {
            Value::Null => Ok(None),
            _ => self.text(i).map(Some),
        }
    }
    pub fn int(&self, i: usize) -> Result<i64> {
        match self.at(i)? {
            Value::Int(v) => Ok(*v),
            v => Err(corrupt(i, "integer", v)),
        }
    }
    pub fn opt_int(&self, i: usize) -> Result<Option<i64>> {
        match self.at(i)? {
            Value::Null => Ok(None),
            _ => self.int(i).map(Some),
        }
    }
    pub fn u64(&self, i: usize) -> Result<u64> {
        self.int(i).map(|v| v as u64)
    }
    pub fn bytes(&self, i: usize) -> Result<Vec<u8>> {
        match self.at(i)? {
            Value::Bytes(b) => Ok(b.clone()),
            v => Err(corrupt(i, "bytes", v)),
        }
    }
    pub fn opt_bytes(&self, i: usize) -> Result<Option<Vec<u8>>> {
        match self.at(i)? {
            Value::Null => Ok(None),
            _ => self.bytes(i).map(Some),
        }
    }
    /// Parse a JSON text column.
    pub fn json<T: serde::de::DeserializeOwned>(&self, i: usize) -> Result<T> {
        serde_json::from_str(self.str(i)?).map_err(|e| StoreError::Corrupt(e.to_string()))
    }
}

/// A database connection inside one open transaction. Statements use `$1`, `$2`, … for their
/// parameters on both backends and stay within the SQL both understand; a statement that must
/// differ asks [`Conn::backend`].
///
/// PostgreSQL aborts a transaction at its first failed statement: repositories never catch a
/// constraint error and go on in the same transaction — they check first, or use
/// `ON CONFLICT … DO NOTHING` and look at the row count.
#[async_trait::async_trait]
pub trait Conn: Send {
    fn backend(&self) -> Backend;
    async fn query(&mut self, sql: &str, params: &[Param<'_>]) -> Result<Vec<Row>>;
    async fn execute(&mut self, sql: &str, params: &[Param<'_>]) -> Result<u64>;
    async fn commit(self: Box<Self>) -> Result<()>;
    /// Roll back without waiting (called from `Drop`).
    fn abort(self: Box<Self>);
}

/// A database: hands out connections in a transaction.
#[async_trait::async_trait]
pub trait Db: Send + Sync + 'static {
    fn backend(&self) -> Backend;
    /// Begin a transaction. A write transaction is the unit of a read-modify-write: its reads
    /// see its own writes and what it locked ([`crate::Tx::lock_row`]) stays locked until it ends.
    async fn begin(&self, write: bool) -> Result<Box<dyn Conn>>;
}

/// A constraint name → the typed conflict repositories report.
pub fn unique_violation(what: impl Into<String>) -> StoreError {
    StoreError::Conflict(Conflict::Unique(what.into()))
}
