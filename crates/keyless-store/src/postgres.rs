//! The PostgreSQL backend: `tokio-postgres` with a `deadpool-postgres` pool (see
//! ARCHITECTURE.md for why), statements prepared once per connection, TLS through rustls.
//!
//! A write transaction is `READ COMMITTED`; the rules that count rows under a parent (20
//! federated credentials per identity, a pool's size, instance ids) lock the parent row first
//! ([`crate::Tx::lock_row`]), and unique constraints hold the rest. A read transaction is
//! `REPEATABLE READ READ ONLY`: one snapshot, as on SQLite.

use crate::db::{Backend, Conn, Db, Param, Row, Value};
use crate::migrations::MIGRATIONS;
use crate::{Conflict, Result, StoreError};
use bytes::BytesMut;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use rustls_pki_types::pem::PemObject as _;
use std::path::PathBuf;
use std::time::Duration;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{IsNull, ToSql, Type};

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// `postgres://user:password@host:port/db?sslmode=…` (or the key=value form).
    pub url: String,
    /// CA certificates (PEM) that sign the server's certificate; without it, with `sslmode`
    /// `require`, the system's roots are used.
    pub ca_file: Option<PathBuf>,
    /// Connections in the pool.
    pub pool_size: usize,
    /// How long a request waits for a connection before the store answers "unavailable".
    pub wait_timeout: Duration,
    /// Bring the schema up to this binary's on open (servers, restore, migrate); when false, a
    /// database at another schema version is refused untouched (an online backup must not
    /// migrate a database that older servers are running on).
    pub migrate: bool,
}

impl PgOptions {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ca_file: None,
            pool_size: 16,
            wait_timeout: Duration::from_secs(5),
            migrate: true,
        }
    }
}

/// Whether `s` names a PostgreSQL database rather than a SQLite path.
pub fn is_url(s: &str) -> bool {
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

/// `url` with any password replaced by `***` (for messages and logs): the one in the
/// authority (`user:password@`) and a `password=` parameter, in the URL or the key=value form.
pub fn redact(url: &str) -> String {
    let redact_params = |q: &str, sep: char| -> String {
        q.split(sep)
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k.trim().eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => kv.to_string(),
            })
            .collect::<Vec<_>>()
            .join(&sep.to_string())
    };
    let Some((scheme, rest)) = url.split_once("://") else {
        // key=value form: host=… password=…
        return redact_params(url, ' ');
    };
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    // the authority ends at the first '/' (a '@' later in the path or query is not one)
    let (authority, path) = match before_query.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (before_query, None),
    };
    let authority = match authority.rsplit_once('@') {
        Some((auth, host)) => match auth.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => format!("{auth}@{host}"),
        },
        None => authority.to_string(),
    };
    let mut out = format!("{scheme}://{authority}");
    if let Some(p) = path {
        out.push('/');
        out.push_str(p);
    }
    if let Some(q) = query {
        out.push('?');
        out.push_str(&redact_params(q, '&'));
    }
    out
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        if let Some(db) = e.as_db_error() {
            let code = db.code();
            if *code == SqlState::UNIQUE_VIOLATION {
                return StoreError::Conflict(Conflict::Unique(
                    db.constraint().unwrap_or("unique").to_string(),
                ));
            }
            if *code == SqlState::T_R_SERIALIZATION_FAILURE
                || *code == SqlState::T_R_DEADLOCK_DETECTED
                || *code == SqlState::LOCK_NOT_AVAILABLE
            {
                return StoreError::Conflict(Conflict::Busy(db.message().to_string()));
            }
            let class = &code.code()[..2];
            // 08 connection, 53 resources, 57 operator intervention (shutdown), 58 system
            if matches!(class, "08" | "53" | "57" | "58") {
                return StoreError::Unavailable(db.message().to_string());
            }
            return StoreError::Backend(format!("{}: {}", code.code(), db.message()));
        }
        // no server answer: the connection is gone or never came up
        StoreError::Unavailable(e.to_string())
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => e.into(),
            e => StoreError::Unavailable(e.to_string()),
        }
    }
}

impl ToSql for Param<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match *self {
            Param::Null => Ok(IsNull::Yes),
            Param::Int(v) => match *ty {
                Type::INT2 => i16::try_from(v)?.to_sql(ty, out),
                Type::INT4 => i32::try_from(v)?.to_sql(ty, out),
                Type::BOOL => (v != 0).to_sql(ty, out),
                _ => v.to_sql(ty, out),
            },
            Param::Text(s) => s.to_sql(ty, out),
            Param::Bytes(b) => b.to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    tokio_postgres::types::to_sql_checked!();
}

fn to_row(r: &tokio_postgres::Row) -> Result<Row> {
    let mut vals = Vec::with_capacity(r.len());
    for (i, c) in r.columns().iter().enumerate() {
        let v = match *c.type_() {
            Type::INT8 => r.try_get::<_, Option<i64>>(i)?.map(Value::Int),
            Type::INT4 => r
                .try_get::<_, Option<i32>>(i)?
                .map(|v| Value::Int(v as i64)),
            Type::INT2 => r
                .try_get::<_, Option<i16>>(i)?
                .map(|v| Value::Int(v as i64)),
            Type::BOOL => r
                .try_get::<_, Option<bool>>(i)?
                .map(|v| Value::Int(v as i64)),
            Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME => {
                r.try_get::<_, Option<String>>(i)?.map(Value::Text)
            }
            Type::BYTEA => r.try_get::<_, Option<Vec<u8>>>(i)?.map(Value::Bytes),
            ref t => {
                return Err(StoreError::Backend(format!(
                    "column {} has type {t} the store does not read",
                    c.name()
                )))
            }
        };
        vals.push(v.unwrap_or(Value::Null));
    }
    Ok(Row(vals))
}

fn tls(opts: &PgOptions) -> Result<tokio_postgres_rustls::MakeRustlsConnect> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = match &opts.ca_file {
        Some(p) => std::fs::read(p).map_err(|e| {
            StoreError::Unavailable(format!("database CA file {}: {e}", p.display()))
        })?,
        None => std::fs::read("/etc/ssl/certs/ca-certificates.crt").unwrap_or_default(),
    };
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| StoreError::Unavailable(format!("database CA file: {e}")))?;
        let _ = roots.add(cert);
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Backend(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// Without an `sslmode` in the URL, a server on another machine is reached over TLS only:
/// tokio-postgres's default, `prefer`, falls back to plain text when the other end answers
/// "no TLS" — which anyone on the path can answer. Loopback and Unix sockets keep `prefer`.
/// An explicit `sslmode` (even `disable`) is the operator's choice.
fn secure_default(cfg: &mut tokio_postgres::Config, url: &str) {
    use tokio_postgres::config::{Host, SslMode};
    if url.to_ascii_lowercase().contains("sslmode=") {
        return;
    }
    let local = cfg.get_hosts().iter().all(|h| match h {
        Host::Tcp(name) => {
            name.eq_ignore_ascii_case("localhost")
                || name
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        Host::Unix(_) => true,
    });
    if !local {
        cfg.ssl_mode(SslMode::Require);
    }
}

/// A PostgreSQL database.
pub struct PgDb {
    pool: Pool,
}

impl PgDb {
    /// Connect, check the server answers and apply pending migrations (under an advisory lock,
    /// so replicas starting together migrate once).
    pub async fn connect(opts: &PgOptions) -> Result<Self> {
        let mut cfg: tokio_postgres::Config =
            opts.url.parse().map_err(|e: tokio_postgres::Error| {
                StoreError::Backend(format!("database URL: {e}"))
            })?;
        secure_default(&mut cfg, &opts.url);
        let mgr = Manager::from_config(
            cfg,
            tls(opts)?,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(mgr)
            .max_size(opts.pool_size.max(1))
            .wait_timeout(Some(opts.wait_timeout))
            .create_timeout(Some(opts.wait_timeout))
            .recycle_timeout(Some(opts.wait_timeout))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        let db = Self { pool };
        if opts.migrate {
            db.migrate().await?;
        } else {
            db.require_current().await?;
        }
        Ok(db)
    }

    /// Refuse a database whose schema is not this binary's, changing nothing.
    async fn require_current(&self) -> Result<()> {
        let client = self.pool.get().await?;
        let exists = client
            .query_opt("SELECT to_regclass('keyless_schema') IS NOT NULL", &[])
            .await?
            .is_some_and(|r| r.get::<_, bool>(0));
        let have: i64 = if exists {
            client
                .query_opt("SELECT version FROM keyless_schema", &[])
                .await?
                .map_or(0, |r| r.get(0))
        } else {
            0
        };
        if have as usize != MIGRATIONS.len() {
            return Err(StoreError::SchemaVersion {
                have: have as usize,
                want: MIGRATIONS.len(),
            });
        }
        Ok(())
    }

    async fn migrate(&self) -> Result<()> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.batch_execute(
            "SELECT pg_advisory_xact_lock(7415126); \
             CREATE TABLE IF NOT EXISTS keyless_schema(version BIGINT NOT NULL); \
             INSERT INTO keyless_schema(version) SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM keyless_schema)",
        )
        .await?;
        let done: i64 = tx
            .query_one("SELECT version FROM keyless_schema", &[])
            .await?
            .get(0);
        if done as usize > MIGRATIONS.len() {
            return Err(StoreError::Corrupt(format!(
                "database schema version {done} is newer than this binary ({})",
                MIGRATIONS.len()
            )));
        }
        for (i, m) in MIGRATIONS.iter().enumerate().skip(done as usize) {
            tx.batch_execute(m.postgres).await?;
            tx.execute(
                "UPDATE keyless_schema SET version = $1",
                &[&((i + 1) as i64)],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl Db for PgDb {
    fn backend(&self) -> Backend {
        Backend::Postgres
    }

    async fn begin(&self, write: bool) -> Result<Box<dyn Conn>> {
        let client = self.pool.get().await?;
        if !write {
            // a read's BEGIN goes out with its first statement: one round trip for both
            return Ok(Box::new(PgConn {
                client: Some(client),
                read: true,
                begun: false,
            }));
        }
        let client = Unsettled(Some(client));
        client
            .get()
            .batch_execute("BEGIN ISOLATION LEVEL READ COMMITTED")
            .await?;
        Ok(Box::new(PgConn {
            client: Some(client.settle()),
            read: false,
            begun: true,
        }))
    }
}

/// A pooled connection while a `BEGIN` or `COMMIT` is in flight: if the caller's future is
/// dropped (a timeout) or the statement fails, the connection's transaction state is unknown,
/// so it is detached from the pool and closed rather than handed to the next request inside
/// a transaction.
struct Unsettled(Option<deadpool_postgres::Object>);

impl Unsettled {
    fn get(&self) -> &deadpool_postgres::Object {
        self.0.as_ref().expect("present until settled")
    }
    fn settle(mut self) -> deadpool_postgres::Object {
        self.0.take().expect("present until settled")
    }
}

impl Drop for Unsettled {
    fn drop(&mut self) {
        if let Some(o) = self.0.take() {
            let _ = deadpool_postgres::Object::take(o);
        }
    }
}

/// The snapshot a read unit of work sees.
const READ_BEGIN: &str = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY";

struct PgConn {
    client: Option<deadpool_postgres::Object>,
    /// A read-only unit of work: its `BEGIN` goes out pipelined with its first statement
    /// (sent first, so the server runs the statement in the snapshot), and it ends without
    /// waiting for the server (it has nothing to make durable). A write confirms its `BEGIN`
    /// before it sends anything else.
    read: bool,
    /// Whether `BEGIN` has been sent.
    begun: bool,
}

impl PgConn {
    fn c(&self) -> &deadpool_postgres::Object {
        self.client.as_ref().expect("client present until the end")
    }

    /// Whether the next statement is the first (a read's `BEGIN` goes out with it).
    fn start(&mut self) -> bool {
        !std::mem::replace(&mut self.begun, true)
    }
}

/// Run `statement` on `c`; when `first`, pipelined behind a read's `BEGIN` (`join!` polls the
/// `BEGIN` first, so it is queued on the connection before the statement).
async fn behind_begin<T>(
    c: &deadpool_postgres::Object,
    first: bool,
    statement: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    if !first {
        return statement.await;
    }
    let (begun, out) = tokio::join!(c.batch_execute(READ_BEGIN), statement);
    begun?;
    out
}

#[async_trait::async_trait]
impl Conn for PgConn {
    fn backend(&self) -> Backend {
        Backend::Postgres
    }

    async fn query(&mut self, sql: &str, params: &[Param<'_>]) -> Result<Vec<Row>> {
        let first = self.start();
        let c = self.c();
        let args: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as _).collect();
        let rows = behind_begin(c, first, async {
            let st = c.prepare_cached(sql).await?;
            Ok(c.query(&st, &args).await?)
        })
        .await?;
        rows.iter().map(to_row).collect()
    }

    async fn execute(&mut self, sql: &str, params: &[Param<'_>]) -> Result<u64> {
        let first = self.start();
        let c = self.c();
        let args: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as _).collect();
        behind_begin(c, first, async {
            let st = c.prepare_cached(sql).await?;
            Ok(c.execute(&st, &args).await?)
        })
        .await
    }

    async fn commit(mut self: Box<Self>) -> Result<()> {
        if self.read {
            // nothing to make durable: ended like an abort, without waiting for the server
            self.abort();
            return Ok(());
        }
        let client = Unsettled(self.client.take());
        client.get().batch_execute("COMMIT").await?;
        // back to the pool only once the commit answered
        drop(client.settle());
        Ok(())
    }

    fn abort(mut self: Box<Self>) {
        let Some(client) = self.client.take() else {
            return;
        };
        if !self.begun {
            // nothing was sent: back to the pool as it came
            return;
        }
        match tokio::runtime::Handle::try_current() {
            // the connection goes back to the pool only once it is out of the transaction
            Ok(rt) => {
                rt.spawn(async move {
                    if client.batch_execute("ROLLBACK").await.is_err() {
                        let _ = deadpool_postgres::Object::take(client);
                    }
                });
            }
            Err(_) => {
                // no runtime to roll back on: close the connection (the server rolls back)
                let _ = deadpool_postgres::Object::take(client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn tls_is_required_for_remote_servers_unless_the_url_says_otherwise() {
        use tokio_postgres::config::SslMode;
        let mode = |url: &str| {
            let mut cfg: tokio_postgres::Config = url.parse().unwrap();
            super::secure_default(&mut cfg, url);
            cfg.get_ssl_mode()
        };
        assert_eq!(mode("postgres://k@db.example/keyless"), SslMode::Require);
        assert_eq!(mode("postgres://k@10.0.0.5:5432/keyless"), SslMode::Require);
        assert_eq!(mode("postgres://k@127.0.0.1:5432/keyless"), SslMode::Prefer);
        assert_eq!(mode("postgres://k@localhost/keyless"), SslMode::Prefer);
        assert_eq!(
            mode("postgres://k@db.example/keyless?sslmode=disable"),
            SslMode::Disable
        );
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            super::redact("postgres://app:s3cret@db:5432/keyless?sslmode=require"),
            "postgres://app:***@db:5432/keyless?sslmode=require"
        );
        assert_eq!(
            super::redact("postgres://app@db/k?password=s3cret&sslmode=disable"),
            "postgres://app@db/k?password=***&sslmode=disable"
        );
        assert_eq!(super::redact("postgres://db/k"), "postgres://db/k");
        assert_eq!(
            super::redact("postgres://db/keyless?user=k&password=s3cret"),
            "postgres://db/keyless?user=k&password=***"
        );
        assert_eq!(
            super::redact("postgres://app:pw@db/k?application_name=a@b"),
            "postgres://app:***@db/k?application_name=a@b"
        );
        assert_eq!(
            super::redact("host=db user=app password=s3cret"),
            "host=db user=app password=***"
        );
    }
}
