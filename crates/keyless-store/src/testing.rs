//! A real PostgreSQL server for tests: `initdb` into a temp dir, `postgres` on a free loopback
//! port as an unprivileged user (`nobody` when the tests run as root), stopped by PID when
//! dropped. Binaries come from `$KEYLESS_PG_BIN`, else the newest `/usr/lib/postgresql/*/bin`
//! (Debian's `postgresql` package), else `PATH`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The directory holding `initdb` and `postgres`, if any.
pub fn pg_bin_dir() -> Option<PathBuf> {
    if let Ok(d) = std::env::var("KEYLESS_PG_BIN") {
        return Some(PathBuf::from(d));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, b)) = versions.pop() {
        return Some(b);
    }
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p).find(|d| d.join("postgres").exists() && d.join("initdb").exists())
    })
}

/// Whether PostgreSQL tests must run (CI) rather than be skipped when no server is installed.
pub fn pg_required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true") || std::env::var_os("KEYLESS_PG_BIN").is_some()
}

/// A running PostgreSQL server owned by the test process. It runs under a shell that stops it
/// (SIGINT, by PID) as soon as its stdin closes — when this value is dropped or the test
/// process exits in any way, so a server kept in a `static` does not outlive its tests.
pub struct PgServer {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    dir: tempfile::TempDir,
    pub port: u16,
    next_db: AtomicU32,
    bin: PathBuf,
    user: Option<(u32, u32)>,
}

/// `postgres` under a shell that stops it (SIGINT) when its stdin closes; its log appends to
/// `<dir>/postgres.log`.
fn spawn_postgres(
    bin: &Path,
    user: Option<(u32, u32)>,
    dir: &Path,
    port: u16,
) -> (Child, Option<std::process::ChildStdin>) {
    let data = dir.join("data");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("postgres.log"))
        .expect("log file");
    if let Some((uid, gid)) = user {
        let _ = std::os::unix::fs::chown(dir.join("postgres.log"), Some(uid), Some(gid));
    }
    let mut child = command(Path::new("/bin/sh"), user)
        .arg("-c")
        .arg(r#""$0" "$@" & pid=$!; read _; kill -INT $pid; wait $pid"#)
        .arg(bin.join("postgres"))
        .args(["-D", data.to_str().unwrap(), "-p", &port.to_string()])
        .args([
            "-k",
            dir.to_str().unwrap(),
            "-c",
            "listen_addresses=127.0.0.1",
        ])
        .args([
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
        ])
        .args(["-c", "max_connections=300", "-c", "shared_buffers=32MB"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start postgres");
    let stdin = child.stdin.take();
    (child, stdin)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `nobody`'s uid and gid when we are root (initdb refuses to run as root).
fn unprivileged() -> Option<(u32, u32)> {
    // SAFETY: getuid has no preconditions
    if unsafe { libc::getuid() } != 0 {
        return None;
    }
    let name = std::ffi::CString::new("nobody").ok()?;
    // SAFETY: a valid C string; the result is read at once
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        return None;
    }
    // SAFETY: non-null passwd entry
    Some(unsafe { ((*pw).pw_uid, (*pw).pw_gid) })
}

fn command(bin: &Path, user: Option<(u32, u32)>) -> Command {
    use std::os::unix::process::CommandExt;
    let mut c = Command::new(bin);
    if let Some((uid, gid)) = user {
        c.uid(uid).gid(gid);
    }
    c.env_remove("PGDATA").env("LC_ALL", "C");
    c
}

impl PgServer {
    /// Start a server, or `None` when PostgreSQL is not installed (and not required).
    pub fn start() -> Option<Self> {
        let Some(bin) = pg_bin_dir() else {
            assert!(
                !pg_required(),
                "PostgreSQL is required (CI=true) but no postgres binary was found: install Debian's postgresql or set KEYLESS_PG_BIN"
            );
            eprintln!("PostgreSQL not installed: skipping its cases (set KEYLESS_PG_BIN)");
            return None;
        };
        let dir = tempfile::Builder::new()
            .prefix("keyless-pg")
            .tempdir()
            .expect("temp dir");
        let user = unprivileged();
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown temp dir");
        }
        let data = dir.path().join("data");
        let out = command(&bin.join("initdb"), user)
            .args([
                "-D",
                data.to_str().unwrap(),
                "-U",
                "keyless",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ])
            .stdout(Stdio::null())
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let (child, stdin) = spawn_postgres(&bin, user, dir.path(), port);
        let server = Self {
            child,
            stdin,
            dir,
            port,
            next_db: AtomicU32::new(0),
            bin,
            user,
        };
        server.wait_ready(&data);
        Some(server)
    }

    fn wait_ready(&self, data: &Path) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // postmaster.pid's 8th line reads "ready" once the server accepts connections
            let pid = std::fs::read_to_string(data.join("postmaster.pid")).unwrap_or_default();
            if pid.lines().nth(7).is_some_and(|l| l.trim() == "ready") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "postgres did not start: {}",
                std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The URL of the server's `postgres` database.
    pub fn admin_url(&self) -> String {
        format!("postgres://keyless@127.0.0.1:{}/postgres", self.port)
    }

    /// A new empty database of its own (for one test), as a URL.
    pub async fn database(&self) -> String {
        let name = format!(
            "t{}_{}",
            std::process::id(),
            self.next_db.fetch_add(1, Ordering::Relaxed)
        );
        let (client, conn) = tokio_postgres::connect(&self.admin_url(), tokio_postgres::NoTls)
            .await
            .expect("connect to the test server");
        let task = tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
        drop(client);
        let _ = task.await;
        format!("postgres://keyless@127.0.0.1:{}/{name}", self.port)
    }

    /// Stop the server (a "fast" shutdown: sessions are ended, open transactions roll back) —
    /// for outage tests; [`PgServer::restart`] brings it back on the same port and data.
    pub fn stop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }

    /// Start the server again after [`PgServer::stop`].
    pub fn restart(&mut self) {
        let (child, stdin) = spawn_postgres(&self.bin, self.user, self.dir.path(), self.port);
        self.child = child;
        self.stdin = stdin;
        // the old postmaster.pid is gone once it stopped; wait for the new one to be ready
        self.wait_ready(&self.data_dir());
    }

    /// The data directory (for outage tests that stop and start the server).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        // closing stdin makes the shell send postgres SIGINT ("fast" shutdown) and wait for it
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The admin URL of the PostgreSQL server a test run shares (`scripts/test` starts one and
/// sets `KEYLESS_TEST_PG_ADMIN_URL` when it runs the end-to-end suite on PostgreSQL).
pub fn shared_admin_url() -> Option<String> {
    std::env::var("KEYLESS_TEST_PG_ADMIN_URL")
        .ok()
        .filter(|u| !u.is_empty())
}

/// The database `name` on the server of `admin_url`, created if missing; its URL. Blocking
/// (runs on a thread of its own), so it can be called from sync or async test code.
pub fn ensure_database(admin_url: &str, name: &str) -> String {
    assert!(
        name.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
        "database name {name:?}"
    );
    let (admin, name2) = (admin_url.to_string(), name.to_string());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
                .await
                .expect("connect to the test PostgreSQL server");
            let task = tokio::spawn(conn);
            let exists = client
                .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name2])
                .await
                .expect("look up database")
                .is_some();
            if !exists {
                // two tests racing to create it: the loser's error is fine if it now exists
                if let Err(e) = client
                    .batch_execute(&format!("CREATE DATABASE {name2}"))
                    .await
                {
                    let now = client
                        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name2])
                        .await
                        .expect("look up database");
                    assert!(now.is_some(), "create database {name2}: {e}");
                }
            }
            drop(client);
            let _ = task.await;
        })
    })
    .join()
    .expect("database set-up thread");
    match admin_url.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{name}"),
        None => panic!("admin URL without a database: {admin_url}"),
    }
}

/// A database name for a data directory (a restarted server finds its data again).
pub fn database_for_dir(dir: &Path) -> String {
    use std::hash::{Hash, Hasher};
    let abs = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let mut h = std::collections::hash_map::DefaultHasher::new();
    abs.hash(&mut h);
    format!("k{}_{:016x}", std::process::id(), h.finish())
}
