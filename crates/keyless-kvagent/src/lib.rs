//! `keyless-kvagent`: the certificate sync agent, Keyless's equivalent of the
//! KeyVaultForLinux VM extension (contract: `spec/keyvault-agent.md`).
//!
//! For each observed certificate it polls `GET {vault}/secrets/{name}?api-version=7.4` with a
//! managed-identity token from IMDS, and when the secret's version changes it writes
//! `<store>/<VaultName>.<CertName>.<version>` (PEM: leaf, chain, private key last; 0600,
//! atomically) and re-points the symlink `<store>/<VaultName>.<CertName>` (and
//! `customSymbolicLinkName`) at it. Progress goes to a guest-agent status file
//! (`<statusDir>/<seq>.status`); an optional reload hook runs after a round that changed
//! something.
//!
//! - [`settings`]: the extension settings, every shape they arrive in (pure).
//! - [`fetch`]: IMDS tokens (cached), the vault GET with the 401-challenge retry, PFX/PEM → PEM.
//! - [`install`]: store directory, atomic file and symlink writes, crash leftovers, ACLs.
//! - [`status`]: the handler status file.
//! - [`Agent`] / [`run`]: the poll loop, initial sync with back-off, readiness, the hook.

pub mod fetch;
pub mod install;
pub mod settings;
pub mod status;

pub use settings::{AclEntry, Authentication, ObservedCertificate, Settings};
pub use status::State;

use serde_json::Value;
use status::{Entry, StatusFile};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The settings are unusable (message in the extension's own words).
    #[error("Failed to parse the configuration settings with: {0}")]
    Settings(String),
    /// IMDS refused or answered without a token.
    #[error("cannot get a managed-identity token from {endpoint}: {message}")]
    Token { endpoint: String, message: String },
    /// Connection, TLS or timeout.
    #[error("cannot reach {url}: {message}")]
    Network { url: String, message: String },
    /// The vault answered with an error.
    #[error("GET {url}: HTTP {status} {code}{}: {message}", inner.as_ref().map(|i| format!(" ({i})")).unwrap_or_default())]
    Vault {
        url: String,
        status: u16,
        code: String,
        inner: Option<String>,
        message: String,
    },
    /// The vault's answer is not a usable certificate.
    #[error("{url}: {message}")]
    Content { url: String, message: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The HTTP client could not be built (CA file, TLS).
    #[error("HTTP client: {0}")]
    Client(String),
}

impl Error {
    /// The status `code` for this error: the HTTP status of a vault error, else 1.
    pub fn code(&self) -> i64 {
        match self {
            Error::Vault { status, .. } => i64::from(*status),
            _ => 1,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Attempts of a required initial sync before the status turns to `error`.
pub const INITIAL_SYNC_ATTEMPTS: u32 = 25;
/// Longest wait between initial sync attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// A `transitioning` status is rewritten at least this often.
pub const STATUS_REFRESH: Duration = Duration::from_secs(60);
/// A reload hook still running after this long is killed (and reported).
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(300);

/// Everything the agent needs.
#[derive(Debug, Clone, Default)]
pub struct AgentConfig {
    /// The extension settings JSON (bare, `{"settings":…}`, or the handler file form).
    pub settings: Value,
    /// Where `<seq>.status` is written (none: no status file).
    pub status_dir: Option<PathBuf>,
    pub status_seq: u64,
    /// Run with `sh -c` after a round that changed at least one certificate, with
    /// `KEYLESS_KV_CHANGED` = the changed certificates' link paths, space-separated.
    pub reload_hook: Option<String>,
    /// PEM of the CA(s) trusted for the vaults' TLS (default: the platform's roots).
    pub ca_pem: Option<String>,
    /// Host name → address overrides (like `curl --resolve`; the URL's port is used).
    pub resolve: Vec<(String, SocketAddr)>,
}

/// Whether the initial sync is done (what a dependent workload waits for).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// `requireInitialSync`: not every certificate is on disk yet.
    Syncing,
    /// Every certificate is on disk (or `requireInitialSync` is off and polling started).
    Ready,
    /// The required initial sync gave up after [`INITIAL_SYNC_ATTEMPTS`]; polling continues
    /// and turns this into `Ready` once every certificate is on disk.
    Failed(String),
}

/// What one certificate's poll did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertReport {
    /// The URL as configured.
    pub url: String,
    /// The version the links point at after this poll.
    pub installed_version: Option<String>,
    /// A new version was installed in this poll.
    pub changed: bool,
    /// Why the poll failed (the files on disk were left as they were).
    pub error: Option<String>,
    /// Non-fatal problems (ACL entries not applied).
    pub warnings: Vec<String>,
}

/// What one poll round did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PollReport {
    pub certificates: Vec<CertReport>,
    /// Links of the certificates that changed (`KEYLESS_KV_CHANGED`).
    pub changed_links: Vec<PathBuf>,
    /// `Some(result)` when the reload hook ran.
    pub hook: Option<std::result::Result<(), String>>,
    /// The top-level status written after the round.
    pub state: State,
    pub readiness: Readiness,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Initial { attempts: u32 },
    InitialFailed,
    Running,
}

/// The last status written, rewritten with a fresh timestamp while transitioning.
struct StatusWriter {
    file: StatusFile,
    last: Mutex<Option<(Entry, Vec<Entry>)>>,
}

impl StatusWriter {
    fn write_doc(&self, top: &Entry, sub: &[Entry]) {
        let doc = status::document(fetch::unix_now(), top, sub);
        if let Err(e) = self.file.write(&doc) {
            tracing::warn!("cannot write the status file: {e}");
        }
    }

    /// Write and remember (under the lock, so the refresher never writes concurrently).
    fn set(&self, top: Entry, sub: Vec<Entry>) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        self.write_doc(&top, &sub);
        *last = Some((top, sub));
    }

    fn refresh_if_transitioning(&self) {
        let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((top, sub)) = &*last {
            if top.state == State::Transitioning {
                self.write_doc(top, sub);
            }
        }
    }
}

struct CertSlot {
    spec: ObservedCertificate,
    /// Substatus entry of the last poll.
    last: Entry,
}

/// The agent: settings, clients, per-certificate state. Drive it with [`Agent::run`], or one
/// round at a time with [`Agent::poll_once`].
pub struct Agent {
    settings: Settings,
    client: fetch::VaultClient,
    status: Arc<StatusWriter>,
    hook: Option<String>,
    certs: Vec<CertSlot>,
    phase: Phase,
    next_delay: Duration,
    hook_warning: Option<String>,
    ready: watch::Sender<Readiness>,
}

/// Parse the settings and run until `shutdown` completes. Errors only for unusable settings
/// or HTTP client configuration (also written to the status file); everything else is
/// reported in the status file and retried.
pub async fn run<F: Future>(cfg: AgentConfig, shutdown: F) -> Result<()> {
    Agent::new(cfg)?.run(shutdown).await;
    Ok(())
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// Polling interval plus up to 10 % jitter (none below 10 s).
fn with_jitter(d: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let spread = d.as_millis() as u64 / 10;
    if d < Duration::from_secs(10) || spread == 0 {
        return d;
    }
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(fetch::unix_now());
    d + Duration::from_millis(h.finish() % spread)
}

/// Wait before initial sync attempt `attempts + 1`: 1 s doubling, at most [`MAX_BACKOFF`].
pub fn backoff(attempts: u32) -> Duration {
    let secs = 1u64 << attempts.saturating_sub(1).min(16);
    Duration::from_secs(secs).min(MAX_BACKOFF)
}

async fn run_hook(cmd_line: &str, changed: &[PathBuf]) -> std::result::Result<(), String> {
    let list = changed
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(" ");
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c").arg(cmd_line).env("KEYLESS_KV_CHANGED", &list);
    // the agent runs with umask 077 for its own state; the hook (a service reload, a copy)
    // gets the usual 022
    #[cfg(unix)]
    // SAFETY: umask is async-signal-safe and only changes the child's mask.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0o022);
            Ok(())
        });
    }
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start sh: {e}"))?;
    match tokio::time::timeout(HOOK_TIMEOUT, child.wait()).await {
        Ok(Ok(st)) if st.success() => Ok(()),
        Ok(Ok(st)) => Err(format!("the reload hook failed ({st})")),
        Ok(Err(e)) => Err(format!("the reload hook failed: {e}")),
        Err(_) => {
            let _ = child.kill().await;
            Err(format!(
                "the reload hook was killed after {} s",
                HOOK_TIMEOUT.as_secs()
            ))
        }
    }
}

impl Agent {
    /// Parse the settings, build the HTTP clients, remove crash leftovers from the stores.
    pub fn new(cfg: AgentConfig) -> Result<Agent> {
        let file = StatusFile::new(cfg.status_dir.clone(), cfg.status_seq);
        let fail = |e: Error| {
            let _ = file.write_simple("Enable.", State::Error, 1, &e.to_string());
            e
        };
        let settings = settings::parse(&cfg.settings).map_err(fail)?;
        let client = fetch::VaultClient::new(
            settings.authentication.clone(),
            cfg.ca_pem.as_deref(),
            &cfg.resolve,
        )
        .map_err(fail)?;
        let mut stores: Vec<PathBuf> = settings
            .observed_certificates
            .iter()
            .map(|c| c.store.clone())
            .collect();
        stores.sort();
        stores.dedup();
        for s in &stores {
            match install::clean_temp(s) {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(store = %s.display(), "removed {n} temporary file(s) left by an interrupted write")
                }
                Err(e) => tracing::warn!("cannot clean the store: {e}"),
            }
        }
        let certs = settings
            .observed_certificates
            .iter()
            .map(|c| CertSlot {
                spec: c.clone(),
                last: Entry {
                    name: c.url.clone(),
                    operation: None,
                    state: State::Transitioning,
                    code: 0,
                    message: "Not polled yet.".into(),
                },
            })
            .collect();
        let phase = if settings.require_initial_sync {
            Phase::Initial { attempts: 0 }
        } else {
            Phase::Running
        };
        let (ready, _) = watch::channel(Readiness::Syncing);
        Ok(Agent {
            next_delay: settings.polling_interval,
            settings,
            client,
            status: Arc::new(StatusWriter {
                file,
                last: Mutex::new(None),
            }),
            hook: cfg.reload_hook.filter(|h| !h.trim().is_empty()),
            certs,
            phase,
            hook_warning: None,
            ready,
        })
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The status file path, if any.
    pub fn status_path(&self) -> Option<PathBuf> {
        self.status.file.path()
    }

    /// Readiness updates (wait for [`Readiness::Ready`] to know the initial sync is done).
    pub fn readiness(&self) -> watch::Receiver<Readiness> {
        self.ready.subscribe()
    }

    fn set_ready(&self, r: Readiness) {
        self.ready.send_if_modified(|cur| {
            if *cur == r {
                false
            } else {
                *cur = r;
                true
            }
        });
    }

    /// How long [`Agent::run`] waits before the next round.
    pub fn next_delay(&self) -> Duration {
        self.next_delay
    }

    fn substatus(&self) -> Vec<Entry> {
        self.certs.iter().map(|c| c.last.clone()).collect()
    }

    fn write_start_status(&self) {
        let n = self.certs.len();
        let top = match self.phase {
            Phase::Initial { .. } => Entry {
                name: status::NAME.into(),
                operation: Some("Initial sync.".into()),
                state: State::Transitioning,
                code: 0,
                message: format!(
                    "Starting: waiting for the initial download of {n} certificate{}.",
                    plural(n)
                ),
            },
            _ => Entry {
                name: status::NAME.into(),
                operation: Some("Service start.".into()),
                state: State::Success,
                code: 0,
                message: format!(
                    "Successfully started Key Vault extension service. {}",
                    status::timestamp(fetch::unix_now())
                ),
            },
        };
        self.status.set(top, self.substatus());
    }

    /// Run until `shutdown` completes: a round, then the back-off (initial sync) or the
    /// polling interval. The status file is rewritten every round, and every
    /// [`STATUS_REFRESH`] while transitioning.
    pub async fn run<F: Future>(mut self, shutdown: F) {
        let status = self.status.clone();
        let refresher = tokio::spawn(async move {
            loop {
                tokio::time::sleep(STATUS_REFRESH).await;
                status.refresh_if_transitioning();
            }
        });
        tracing::info!(
            certificates = self.certs.len(),
            interval_s = self.settings.polling_interval.as_secs(),
            require_initial_sync = self.settings.require_initial_sync,
            "kv-agent started"
        );
        self.write_start_status();
        if self.phase == Phase::Running {
            self.set_ready(Readiness::Ready);
        }
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = self.poll_once() => {}
                _ = &mut shutdown => break,
            }
            let delay = self.next_delay;
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = &mut shutdown => break,
            }
        }
        refresher.abort();
        tracing::info!("kv-agent stopped");
    }

    /// One round: every certificate, then the reload hook if something changed, then the
    /// phase (initial sync / back-off), readiness and the status file.
    pub async fn poll_once(&mut self) -> PollReport {
        let mut reports = Vec::with_capacity(self.certs.len());
        let mut changed_links = Vec::new();
        for i in 0..self.certs.len() {
            let spec = self.certs[i].spec.clone();
            let (report, entry) = self.sync_one(&spec).await;
            if report.changed {
                changed_links.extend(spec.links());
            }
            self.certs[i].last = entry;
            reports.push(report);
        }

        let mut hook = None;
        if let (Some(cmd), false) = (&self.hook, changed_links.is_empty()) {
            let r = run_hook(cmd, &changed_links).await;
            match &r {
                Ok(()) => {
                    tracing::info!("reload hook ran");
                    self.hook_warning = None;
                }
                Err(e) => {
                    tracing::warn!("{e}");
                    self.hook_warning = Some(e.clone());
                }
            }
            hook = Some(r);
        }

        let n = reports.len();
        let on_disk = reports
            .iter()
            .filter(|r| r.installed_version.is_some())
            .count();
        let all = on_disk == n;
        let first_error = reports
            .iter()
            .find_map(|r| r.error.clone())
            .unwrap_or_else(|| "a certificate is not on disk".into());
        let interval = self.settings.polling_interval;
        self.phase = match self.phase {
            _ if all => Phase::Running,
            Phase::Initial { attempts } if attempts + 1 >= INITIAL_SYNC_ATTEMPTS => {
                Phase::InitialFailed
            }
            Phase::Initial { attempts } => Phase::Initial {
                attempts: attempts + 1,
            },
            p => p,
        };
        self.next_delay = match self.phase {
            Phase::Initial { attempts } => backoff(attempts),
            _ => with_jitter(interval),
        };
        let (top, readiness) = match self.phase {
            Phase::Initial { attempts } => (
                Entry {
                    name: status::NAME.into(),
                    operation: Some("Initial sync.".into()),
                    state: State::Transitioning,
                    code: 0,
                    message: format!(
                        "Waiting for the initial sync: {on_disk} of {n} certificate{} on disk after attempt {attempts} of {INITIAL_SYNC_ATTEMPTS} ({first_error}); next attempt in {} s.",
                        plural(n),
                        self.next_delay.as_secs()
                    ),
                },
                Readiness::Syncing,
            ),
            Phase::InitialFailed => {
                let m = format!(
                    "The initial sync failed after {INITIAL_SYNC_ATTEMPTS} attempts: {on_disk} of {n} certificate{} on disk ({first_error}). Polling continues every {} s.",
                    plural(n),
                    interval.as_secs()
                );
                (
                    Entry {
                        name: status::NAME.into(),
                        operation: Some("Initial sync.".into()),
                        state: State::Error,
                        code: 1,
                        message: m.clone(),
                    },
                    Readiness::Failed(m),
                )
            }
            Phase::Running => {
                let mut problems = Vec::new();
                let failed: Vec<String> = reports
                    .iter()
                    .filter_map(|r| r.error.as_ref())
                    .cloned()
                    .collect();
                if !failed.is_empty() {
                    problems.push(format!(
                        "{} of {n} certificate{} could not be refreshed (the files on disk are kept): {}",
                        failed.len(),
                        plural(n),
                        failed.join("; ")
                    ));
                }
                for r in &reports {
                    problems.extend(r.warnings.iter().map(|w| format!("{}: {w}", r.url)));
                }
                if let Some(h) = &self.hook_warning {
                    problems.push(h.clone());
                }
                let ts = status::timestamp(fetch::unix_now());
                let top = if problems.is_empty() {
                    Entry {
                        name: status::NAME.into(),
                        operation: Some("Certificate sync.".into()),
                        state: State::Success,
                        code: 0,
                        message: format!(
                            "{n} certificate{} current as of {ts}; polling every {} s.",
                            plural(n),
                            interval.as_secs()
                        ),
                    }
                } else {
                    Entry {
                        name: status::NAME.into(),
                        operation: Some("Certificate sync.".into()),
                        state: State::Warning,
                        code: 2,
                        message: format!("{} (as of {ts})", problems.join(" ")),
                    }
                };
                (top, Readiness::Ready)
            }
        };
        let state = top.state;
        // Status first: whoever waits for readiness then reads a status that agrees.
        self.status.set(top, self.substatus());
        self.set_ready(readiness.clone());
        PollReport {
            certificates: reports,
            changed_links,
            hook,
            state,
            readiness,
        }
    }

    async fn sync_one(&mut self, spec: &ObservedCertificate) -> (CertReport, Entry) {
        let link = spec.link_path().display().to_string();
        let entry = |state: State, code: i64, message: String| Entry {
            name: spec.url.clone(),
            operation: None,
            state,
            code,
            message,
        };
        let fail = |on_disk: Option<String>, code: i64, error: String| {
            tracing::warn!(url = %spec.url, "{error}");
            let keep = match &on_disk {
                Some(v) => format!(" Version {v} stays at {link}."),
                None => " Nothing is installed yet.".into(),
            };
            (
                CertReport {
                    url: spec.url.clone(),
                    installed_version: on_disk,
                    changed: false,
                    error: Some(error.clone()),
                    warnings: vec![],
                },
                entry(State::Error, code, format!("{error}.{keep}")),
            )
        };
        let on_disk = install::installed_version(spec);
        let secret = match self.client.get_secret(spec).await {
            Ok(s) => s,
            Err(e) => return fail(on_disk, e.code(), e.to_string()),
        };
        let version = secret.version.clone();
        if let Some(na) = fetch::to_pem(secret.content_type.as_deref(), &secret.value)
            .ok()
            .and_then(|p| p.not_after)
        {
            keyless_ops::metrics::certificate_expiry(
                "kvagent",
                &spec.vault_name,
                &spec.name,
                na,
                time::OffsetDateTime::now_utc().unix_timestamp(),
            );
        }
        if on_disk.as_deref() == Some(version.as_str()) {
            let s = spec.clone();
            let v = version.clone();
            let repaired = tokio::task::spawn_blocking(move || install::ensure_links(&s, &v))
                .await
                .unwrap_or_else(|e| {
                    Err(Error::Io {
                        path: link.clone(),
                        source: std::io::Error::other(e.to_string()),
                    })
                });
            if let Err(e) = repaired {
                return fail(on_disk, e.code(), e.to_string());
            }
            return (
                CertReport {
                    url: spec.url.clone(),
                    installed_version: on_disk,
                    changed: false,
                    error: None,
                    warnings: vec![],
                },
                entry(
                    State::Success,
                    0,
                    format!("Version {version} is current at {link}."),
                ),
            );
        }
        let pem = match fetch::to_pem(secret.content_type.as_deref(), &secret.value) {
            Ok(p) => p,
            Err(m) => return fail(on_disk, 1, format!("{}: {m}", spec.url)),
        };
        drop(secret);
        let acls = if self.settings.acl_enabled {
            spec.acls.clone()
        } else {
            vec![]
        };
        let s = spec.clone();
        let v = version.clone();
        let has_key = pem.has_key;
        let installed = tokio::task::spawn_blocking(move || {
            install::install(&s, &v, pem.text.as_bytes(), &acls)
        })
        .await
        .unwrap_or_else(|e| {
            Err(Error::Io {
                path: link.clone(),
                source: std::io::Error::other(e.to_string()),
            })
        });
        keyless_ops::metrics::certificate_renewal(
            "kvagent",
            if installed.is_ok() { "ok" } else { "error" },
        );
        match installed {
            Ok(done) => {
                tracing::info!(url = %spec.url, version = %version, file = %done.file.display(), link = %link, "installed a new certificate version");
                let mut warnings = done.acl_warnings;
                if !has_key {
                    warnings.push("the secret holds no private key (the certificate's key is not exportable); certificates only".into());
                }
                let (state, extra) = if warnings.is_empty() {
                    (State::Success, String::new())
                } else {
                    (
                        State::Warning,
                        format!(" Warning: {}.", warnings.join("; ")),
                    )
                };
                (
                    CertReport {
                        url: spec.url.clone(),
                        installed_version: Some(version.clone()),
                        changed: true,
                        error: None,
                        warnings,
                    },
                    entry(
                        state,
                        0,
                        format!("Installed version {version} at {link}.{extra}"),
                    ),
                )
            }
            Err(e) => fail(install::installed_version(spec), e.code(), e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn backoff_doubles_up_to_a_minute() {
        let secs: Vec<u64> = (1..=9).map(|a| backoff(a).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(backoff(25), MAX_BACKOFF);
        assert_eq!(with_jitter(Duration::from_secs(1)), Duration::from_secs(1));
        let j = with_jitter(Duration::from_secs(3600));
        assert!(j >= Duration::from_secs(3600) && j < Duration::from_secs(3960));
    }

    #[test]
    fn bad_settings_are_written_to_the_status_file() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = AgentConfig {
            settings: json!({"settings": {"secretsManagementSettings": {}}, "authenticationSettings": {}}),
            status_dir: Some(dir.path().to_path_buf()),
            ..Default::default()
        };
        let Err(e) = Agent::new(cfg) else {
            panic!("accepted")
        };
        assert!(matches!(e, Error::Settings(_)));
        let v: Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("0.status")).unwrap()).unwrap();
        assert_eq!(v[0]["status"]["status"], "error");
        assert_eq!(v[0]["status"]["name"], "KeyVaultForLinux");
        let m = v[0]["status"]["formattedMessage"]["message"]
            .as_str()
            .unwrap();
        assert!(m.contains("Attempt to get non-existent AuthConfig"), "{m}");
    }

    /// An unreachable IMDS: the round fails per certificate, nothing is written to the store,
    /// a required initial sync stays transitioning with a growing back-off, then errors.
    #[tokio::test]
    async fn required_initial_sync_backs_off_then_errors() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let status_dir = dir.path().join("status");
        // A port nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cfg = AgentConfig {
            settings: json!({"secretsManagementSettings": {
                "pollingIntervalInS": 30, "requireInitialSync": true,
                "certificateStoreLocation": store,
                "observedCertificates": ["https://kv.vault.localhost:8443/secrets/web"]},
                "authenticationSettings": {"msiEndpoint": format!("http://127.0.0.1:{port}/metadata/identity")}}),
            status_dir: Some(status_dir.clone()),
            status_seq: 7,
            ..Default::default()
        };
        let mut agent = Agent::new(cfg).unwrap();
        let ready = agent.readiness();
        let r = agent.poll_once().await;
        assert_eq!(r.state, State::Transitioning);
        assert_eq!(r.readiness, Readiness::Syncing);
        assert_eq!(agent.next_delay(), Duration::from_secs(1));
        let e = r.certificates[0].error.clone().unwrap();
        assert!(e.contains("cannot reach http://127.0.0.1"), "{e}");
        assert!(!store.exists(), "nothing written on failure");
        let doc: Value =
            serde_json::from_slice(&std::fs::read(status_dir.join("7.status")).unwrap()).unwrap();
        assert_eq!(doc[0]["status"]["status"], "transitioning");
        assert_eq!(
            doc[0]["status"]["substatus"][0]["name"],
            "https://kv.vault.localhost:8443/secrets/web"
        );
        assert_eq!(doc[0]["status"]["substatus"][0]["status"], "error");
        agent.poll_once().await;
        assert_eq!(agent.next_delay(), Duration::from_secs(2));
        for _ in 2..INITIAL_SYNC_ATTEMPTS - 1 {
            assert_eq!(agent.poll_once().await.state, State::Transitioning);
        }
        let r = agent.poll_once().await;
        assert_eq!(r.state, State::Error);
        assert!(matches!(&*ready.borrow(), Readiness::Failed(m) if m.contains("25 attempts")));
        let d = agent.next_delay();
        assert!(
            d >= Duration::from_secs(30) && d < Duration::from_secs(33),
            "{d:?}"
        );
        let doc: Value =
            serde_json::from_slice(&std::fs::read(status_dir.join("7.status")).unwrap()).unwrap();
        assert_eq!(doc[0]["status"]["status"], "error");
        assert_eq!(doc[0]["status"]["code"], 1);
    }

    #[tokio::test]
    async fn without_required_sync_errors_are_a_warning_with_substatus() {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cfg = AgentConfig {
            settings: json!({"secretsManagementSettings": {
                "certificateStoreLocation": dir.path().join("store"),
                "observedCertificates": ["https://kv.vault.localhost:8443/secrets/web"]},
                "authenticationSettings": {"msiEndpoint": format!("http://127.0.0.1:{port}/metadata/identity")}}),
            status_dir: Some(dir.path().to_path_buf()),
            reload_hook: Some(format!("touch {}", dir.path().join("hook").display())),
            ..Default::default()
        };
        let agent = Agent::new(cfg).unwrap();
        let ready = agent.readiness();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(agent.run(async {
            let _ = rx.await;
        }));
        let path = dir.path().join("0.status");
        let mut doc = Value::Null;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            doc = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or(Value::Null);
            if doc[0]["status"]["status"] == "warning" {
                break;
            }
        }
        assert_eq!(*ready.borrow(), Readiness::Ready);
        assert_eq!(doc[0]["status"]["status"], "warning", "{doc}");
        assert_eq!(doc[0]["status"]["substatus"][0]["status"], "error");
        assert!(
            !dir.path().join("hook").exists(),
            "nothing changed: no hook"
        );
        tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
    }
}
