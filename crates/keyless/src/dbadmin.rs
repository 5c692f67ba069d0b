//! `keyless admin migrate|backup|restore` (also `keyless db …`): moving a store off the
//! embedded SQLite file onto PostgreSQL, online backups, and restores into an empty database.
//!
//! Everything goes through `Store::backup` / `Store::restore` (crates/keyless-store/src/
//! backup.rs): JSON lines read in one snapshot, sealed values copied still sealed under the
//! key-encryption key (which is never in a backup), row counts checked. Nothing here prints
//! a secret value: tables and row counts, file sizes, and URLs with their passwords redacted.

use crate::CliError;
use clap::{Args, Subcommand};
use keyless_store::backup::Counts;
use keyless_store::postgres::{is_url, redact, PgOptions};
use keyless_store::{Kek, Store, StoreError};
use std::io::{BufReader, BufWriter};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Subcommand)]
pub enum AdminCmd {
    /// Move the SQLite store of a data dir into an empty PostgreSQL database (the server of
    /// that data dir must be stopped). Sealed values stay sealed: the servers on PostgreSQL
    /// need the same key-encryption key.
    Migrate(MigrateArgs),
    /// Write a consistent backup of a store to a new file (0600), while its server runs.
    Backup(BackupArgs),
    /// Restore a backup into an empty database: a PostgreSQL URL or a data dir (SQLite).
    Restore(RestoreArgs),
}

/// Where the key-encryption key comes from.
#[derive(Args)]
pub struct KekArgs {
    /// Key-encryption key (base64 of 32 bytes) [default: the `kek` file of the data dir, if
    /// there is one]. A backup only checks it (it copies sealed values as they are).
    #[arg(long, env = "KEYLESS_KEK", hide_env_values = true)]
    kek: Option<String>,
    /// A file holding the key-encryption key, as `<data-dir>/kek` does.
    #[arg(long)]
    kek_file: Option<PathBuf>,
}

#[derive(Args)]
pub struct MigrateArgs {
    /// The data dir whose SQLite store (`keyless.db`) is copied.
    #[arg(long, value_name = "DATA_DIR")]
    from: PathBuf,
    /// The PostgreSQL database to copy into (`postgres://…`); it must hold no data.
    #[arg(
        long,
        value_name = "URL",
        env = "KEYLESS_DATABASE_URL",
        hide_env_values = true
    )]
    to: String,
    /// PEM file of the CA(s) that sign the PostgreSQL server's certificate.
    #[arg(long, env = "KEYLESS_DATABASE_CA_FILE")]
    database_ca_file: Option<PathBuf>,
    #[command(flatten)]
    kek: KekArgs,
}

#[derive(Args)]
pub struct BackupArgs {
    /// The backup file to write (must not exist; created 0600).
    #[arg(long, value_name = "FILE")]
    to: PathBuf,
    /// Back up this PostgreSQL database (`postgres://…`) rather than a data dir's SQLite file.
    #[arg(
        long,
        value_name = "URL",
        env = "KEYLESS_DATABASE_URL",
        hide_env_values = true
    )]
    database: Option<String>,
    /// The data dir whose SQLite file is backed up (its server may be running).
    #[arg(long, default_value = ".keyless", env = "KEYLESS_DATA_DIR")]
    data_dir: PathBuf,
    /// PEM file of the CA(s) that sign the PostgreSQL server's certificate.
    #[arg(long, env = "KEYLESS_DATABASE_CA_FILE")]
    database_ca_file: Option<PathBuf>,
    #[command(flatten)]
    kek: KekArgs,
}

#[derive(Args)]
pub struct RestoreArgs {
    /// The backup file.
    #[arg(long, value_name = "FILE")]
    from: PathBuf,
    /// Where to restore: a PostgreSQL database (`postgres://…`) or a data dir (its SQLite
    /// file); either must hold no data.
    #[arg(long, value_name = "URL_OR_DATA_DIR")]
    to: String,
    /// PEM file of the CA(s) that sign the PostgreSQL server's certificate.
    #[arg(long, env = "KEYLESS_DATABASE_CA_FILE")]
    database_ca_file: Option<PathBuf>,
    #[command(flatten)]
    kek: KekArgs,
}

pub async fn run(c: AdminCmd) -> Result<(), CliError> {
    match c {
        AdminCmd::Migrate(a) => migrate(a).await,
        AdminCmd::Backup(a) => backup(a).await,
        AdminCmd::Restore(a) => restore(a).await,
    }
}

fn usage(m: impl Into<String>) -> CliError {
    CliError::Usage(m.into())
}

/// The key's base64 text: `--kek` / `KEYLESS_KEK`, else `--kek-file`, else `data_dir`'s `kek`
/// file when it exists. `None` when none is given (never generated here: a new key opens
/// nothing that was sealed before).
fn kek_text(a: &KekArgs, data_dir: Option<&Path>) -> Result<Option<(String, String)>, CliError> {
    if a.kek.is_some() && a.kek_file.is_some() {
        return Err(usage(
            "give the key-encryption key once: --kek (or KEYLESS_KEK) or --kek-file",
        ));
    }
    if let Some(k) = &a.kek {
        return Ok(Some((k.clone(), "--kek".into())));
    }
    let file = match (&a.kek_file, data_dir) {
        (Some(f), _) => f.clone(),
        (None, Some(d)) if d.join("kek").exists() => d.join("kek"),
        _ => return Ok(None),
    };
    let text = std::fs::read_to_string(&file).map_err(crate::run::io_err(&file))?;
    Ok(Some((text, file.display().to_string())))
}

fn kek(text: &str) -> Result<Kek, CliError> {
    Kek::from_base64(text).map_err(CliError::from)
}

fn pg_options(url: &str, ca_file: &Option<PathBuf>) -> PgOptions {
    let mut o = PgOptions::new(url.to_string());
    o.ca_file = ca_file.clone();
    o.pool_size = 2;
    o
}

async fn open_pg(url: &str, ca_file: &Option<PathBuf>, kek: Kek) -> Result<Store, CliError> {
    Store::postgres(&pg_options(url, ca_file), kek)
        .await
        .map_err(|e| usage(format!("cannot open the database {}: {e}", redact(url))))
}

/// The data dir's lock (`<dir>/lock`, as `keyless server|up` take it), held until dropped:
/// refused while another keyless process runs on the dir.
fn lock_data_dir(dir: &Path) -> Result<std::fs::File, CliError> {
    let path = dir.join("lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(keyless_store::files::FILE_MODE)
        .open(&path)
        .map_err(crate::run::io_err(&path))?;
    if lock.try_lock().is_err() {
        return Err(usage(format!(
            "the data directory {} is in use by another keyless process: stop it first",
            dir.display()
        )));
    }
    Ok(lock)
}

/// A file of this process removed when dropped (the intermediate copy of a migration).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Create `path` 0600, failing if it exists.
fn create_private(path: &Path) -> Result<std::fs::File, CliError> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(keyless_store::files::FILE_MODE)
        .open(path)
        .map_err(crate::run::io_err(path))?;
    f.set_permissions(std::fs::Permissions::from_mode(
        keyless_store::files::FILE_MODE,
    ))
    .map_err(crate::run::io_err(path))?;
    Ok(f)
}

/// Back `store` up into a new 0600 file at `path` (synced); the file is removed on failure.
async fn backup_to_file(store: &Store, path: &Path) -> Result<Counts, CliError> {
    let file = create_private(path)?;
    let mut out = BufWriter::new(file);
    let written = store.backup(&mut out).await;
    let done = written.map_err(CliError::from).and_then(|counts| {
        let file = out
            .into_inner()
            .map_err(|e| e.into_error())
            .map_err(crate::run::io_err(path))?;
        file.sync_all().map_err(crate::run::io_err(path))?;
        Ok(counts)
    });
    if done.is_err() {
        let _ = std::fs::remove_file(path);
    }
    done
}

async fn restore_from_file(store: &Store, path: &Path) -> Result<Counts, CliError> {
    let file = std::fs::File::open(path).map_err(crate::run::io_err(path))?;
    let mut input = BufReader::new(file);
    Ok(store.restore(&mut input).await?)
}

fn print_counts(counts: &Counts) {
    let total: u64 = counts.values().sum();
    say!("  {:<22} {:>10}", "table", "rows");
    for (t, n) in counts {
        say!("  {t:<22} {n:>10}");
    }
    say!("  {:<22} {total:>10}", "(all)");
}

fn secs(t: Instant) -> String {
    format!("{:.2} s", t.elapsed().as_secs_f64())
}

/// The `--kek` a server on the copy needs, as a command line shows it (never the key itself):
/// none when it is the `kek` file of the data dir the server runs on.
fn kek_flag(source: &str, data_dir: Option<&Path>) -> String {
    match data_dir {
        Some(d) if source == d.join("kek").display().to_string() => String::new(),
        _ if source == "--kek" => " --kek <the same key>".to_string(),
        _ => format!(" --kek \"$(cat {source})\""),
    }
}

async fn migrate(a: MigrateArgs) -> Result<(), CliError> {
    if !is_url(&a.to) {
        return Err(usage(format!(
            "--to must be a postgres:// URL (got {:?})",
            redact(&a.to)
        )));
    }
    let db = a.from.join("keyless.db");
    if !db.is_file() {
        return Err(usage(format!(
            "{} has no SQLite store ({} does not exist)",
            a.from.display(),
            db.display()
        )));
    }
    let _lock = lock_data_dir(&a.from)?;
    let (text, source) = kek_text(&a.kek, Some(&a.from))?.ok_or_else(|| {
        usage(format!(
            "no key-encryption key: {} does not exist; give the one the server used with --kek or --kek-file",
            a.from.join("kek").display()
        ))
    })?;
    let started = Instant::now();
    let from = Store::sqlite(&db, kek(&text)?)?;
    // the key opens the source (this seals the check value if an old store has none yet)
    from.verify_kek().await.map_err(|e| {
        usage(format!(
            "the key-encryption key ({source}) does not open {}: {e}",
            db.display()
        ))
    })?;
    let to = open_pg(&a.to, &a.database_ca_file, kek(&text)?).await?;
    let scratch = Scratch(
        a.from
            .join(format!("migrate-{}.backup", uuid::Uuid::new_v4())),
    );
    let copied = backup_to_file(&from, &scratch.0).await?;
    let size = std::fs::metadata(&scratch.0).map(|m| m.len()).unwrap_or(0);
    let restored = restore_from_file(&to, &scratch.0).await.map_err(|e| {
        usage(format!(
            "restore into {} failed, nothing was written there: {e}",
            redact(&a.to)
        ))
    })?;
    drop(scratch);
    if restored != copied {
        return Err(usage(format!(
            "row counts differ: copied {copied:?}, restored {restored:?}"
        )));
    }
    to.verify_kek().await?;
    say!(
        "Migrated {} to {} in {} ({size} bytes through a 0600 scratch file, removed):",
        db.display(),
        redact(&a.to),
        secs(started)
    );
    print_counts(&restored);
    say!("Row counts checked; the key-encryption key opens the copy.");
    say!();
    say!(
        "Start the server on it with the same data dir (CA, host agent state, admin secret file):"
    );
    let dir = a.from.display();
    let url = redact(&a.to);
    let k = kek_flag(&source, Some(&a.from));
    say!("  keyless server --data-dir {dir} --database '{url}'{k}");
    say!("  (or: keyless up --data-dir {dir} --database '{url}'{k})");
    say!(
        "Every replica on the database needs the same key-encryption key{}.",
        if k.is_empty() {
            format!(" (the content of {})", a.from.join("kek").display())
        } else {
            String::new()
        }
    );
    say!(
        "{} is left as it was: a start without --database would use that old copy; move it aside once the server runs on PostgreSQL.",
        db.display()
    );
    Ok(())
}

async fn backup(a: BackupArgs) -> Result<(), CliError> {
    let started = Instant::now();
    let url = match &a.database {
        Some(url) if is_url(url) => Some(url),
        Some(other) => {
            return Err(usage(format!(
                "--database must be a postgres:// URL (got {:?}); without it the SQLite file in --data-dir is backed up",
                redact(other)
            )))
        }
        None => None,
    };
    let k = kek_text(&a.kek, url.is_none().then_some(a.data_dir.as_path()))?;
    let (store, what) = match url {
        Some(url) => {
            // online, with servers running on it: opened as it is, never migrated
            let mut o = pg_options(url, &a.database_ca_file);
            o.migrate = false;
            let store = Store::postgres(&o, backup_kek(&k)?).await.map_err(|e| match e {
                StoreError::SchemaVersion { have, want } => usage(format!(
                    "{} has schema version {have}, this keyless {want}: back it up with the keyless version that runs it",
                    redact(url)
                )),
                e => usage(format!("cannot open the database {}: {e}", redact(url))),
            })?;
            (store, redact(url))
        }
        None => {
            let db = a.data_dir.join("keyless.db");
            if !db.is_file() {
                return Err(usage(format!("{} does not exist", db.display())));
            }
            // online: no lock (the server holds it), and no migration of a database in use
            let have = keyless_store::backup::sqlite_schema_version(&db)?;
            let want = keyless_store::migrations::MIGRATIONS.len();
            if have != want {
                return Err(usage(format!(
                    "{} has schema version {have}, this keyless {want}: back it up with the keyless version that runs it",
                    db.display()
                )));
            }
            (
                Store::sqlite(&db, backup_kek(&k)?)?,
                db.display().to_string(),
            )
        }
    };
    let checked = match &k {
        Some((_, source)) => match store.kek_opens_data().await? {
            Some(true) => format!("the key-encryption key ({source}) opens it"),
            Some(false) => {
                return Err(usage(format!(
                    "the key-encryption key ({source}) does not open {what}: give the servers' key, or none"
                )))
            }
            None => "no key check value stored yet".to_string(),
        },
        None => "the key-encryption key was not checked (none given)".to_string(),
    };
    let counts = backup_to_file(&store, &a.to).await?;
    let size = std::fs::metadata(&a.to).map(|m| m.len()).unwrap_or(0);
    say!(
        "Backed up {what} to {} in {} ({size} bytes, mode 0600; {checked}):",
        a.to.display(),
        secs(started)
    );
    print_counts(&counts);
    say!("Sealed values stay sealed under the key-encryption key, which is not in the backup: keep the key apart, and restore with it (keyless admin restore --from FILE --to <empty database> --kek-file …).");
    Ok(())
}

/// The key a backup opens its store with: the one given, else a random one (the backup reads
/// sealed values as stored and opens none).
fn backup_kek(k: &Option<(String, String)>) -> Result<Kek, CliError> {
    match k {
        Some((text, _)) => kek(text),
        None => {
            let mut bytes = [0u8; 32];
            bytes[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
            bytes[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
            Ok(Kek::from_bytes(&bytes)?)
        }
    }
}

async fn restore(a: RestoreArgs) -> Result<(), CliError> {
    let started = Instant::now();
    // the file first: a missing one is said before anything is created
    std::fs::metadata(&a.from).map_err(crate::run::io_err(&a.from))?;
    let data_dir = (!is_url(&a.to)).then(|| PathBuf::from(&a.to));
    let (text, source) = kek_text(&a.kek, data_dir.as_deref())?.ok_or_else(|| {
        usage("give the key-encryption key the backup's data is sealed under: --kek, KEYLESS_KEK or --kek-file")
    })?;
    let (store, what, _lock) = match &data_dir {
        None => (
            open_pg(&a.to, &a.database_ca_file, kek(&text)?).await?,
            redact(&a.to),
            None,
        ),
        Some(dir) => {
            keyless_store::files::private_dir(dir).map_err(crate::run::io_err(dir))?;
            let lock = lock_data_dir(dir)?;
            let db = dir.join("keyless.db");
            if !db.exists() {
                // SQLite gives its -wal / -shm files the database file's mode: create it 0600
                keyless_store::files::create_new_private(&db, b"")
                    .map_err(crate::run::io_err(&db))?;
            }
            (
                Store::sqlite(&db, kek(&text)?)?,
                db.display().to_string(),
                Some(lock),
            )
        }
    };
    let counts = restore_from_file(&store, &a.from).await.map_err(|e| {
        usage(format!(
            "restore into {what} refused, nothing was written: {e}"
        ))
    })?;
    store.verify_kek().await?;
    say!(
        "Restored {} into {what} in {}:",
        a.from.display(),
        secs(started)
    );
    print_counts(&counts);
    say!("Row counts checked; the key-encryption key opens the restored data.");
    let k = kek_flag(&source, data_dir.as_deref());
    match &data_dir {
        None => say!(
            "Start the server on it: keyless server --database '{what}'{k} (every replica with the same key)"
        ),
        Some(dir) => say!(
            "Start the server on it: keyless server --data-dir {}{k}",
            dir.display()
        ),
    }
    Ok(())
}
