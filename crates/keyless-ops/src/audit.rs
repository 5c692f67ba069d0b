//! The audit trail: one JSON line per token issuance or refusal, control-plane write and Key
//! Vault operation, appended to a file and chained by hashes so an edit shows.
//!
//! **Line format.** Every line is one JSON object:
//! `{"seq":N,"time":"<RFC 3339 UTC>","prev":"<hex>","type":"token|controlPlane|keyVault",…,"hash":"<hex>"}`
//! where `prev` is the SHA-256 of the previous line (its bytes without the newline; 64 zeros
//! for the first line) and `hash`, always the last field, is the SHA-256 of this line up to
//! (not including) `,"hash":`. `seq` counts from 1 without gaps. [`verify`] checks all three,
//! so a record edited in place fails at its own line (its `hash`), and one whose `hash` was
//! recomputed fails at the next line (its `prev`); a deleted or reordered line breaks `seq`
//! and `prev`. What a chain cannot show on its own is the removal of the *last* lines: the
//! `seq` of the last line and its `hash` are what to copy elsewhere to anchor it.
//!
//! **What the chain does not show.** The hash is unkeyed: whoever can write the file can
//! rewrite any part of it and recompute every `prev` and `hash` after, and [`verify`] passes.
//! The chain shows accidental damage and edits by someone who did not bother; against a writer
//! who does, only an anchor outside the file helps — ship the records off the machine as they
//! are written (a log collector tailing the file), or record the last `seq` / `hash`
//! (`keyless audit verify` prints them) somewhere the file's writers cannot change, and check
//! later that the file still holds that line.
//!
//! **What is never recorded**: a token, a secret value, key material, a client secret, an
//! assertion — only who asked, for which identity and audience, and the outcome. Record types
//! have no field that could hold one. Every string a caller can choose is cut in one place
//! ([`Event`]'s bound, applied by every emit) to [`MAX_FIELD_CHARS`] (ids, names, codes) or
//! [`MAX_LONG_FIELD_CHARS`] (resource ids, audiences, a verified issuer / subject), followed by
//! [`CUT_MARKER`], so no request can make a record large.
//!
//! **Writing.** [`Audit::open`] opens the file `O_APPEND|O_CREAT|O_NOFOLLOW`, mode 0600 (a
//! symbolic link is refused, never followed or chmodded), takes an exclusive `flock` (a second
//! writer — another process, or a second open — fails to start, naming the file and, from
//! `/proc/locks`, the holder), reads its last line to continue `seq` and `prev`, and starts one
//! sync thread. Emitting a record serializes it on the emitting task and queues it in order,
//! then takes the file (an async FIFO lock: waiting for it never blocks a thread): unless an
//! emit that held it meanwhile already wrote this record, it numbers and chains every queued
//! record and appends them with one `write(2)` (group commit) — so a request is answered only
//! after its record is in the file (the page cache), in the order the records were queued,
//! and killing the process (`kill -9`) loses no answered request's record. Nothing crosses a
//! thread per record. The sync thread `fdatasync`s at most every [`SYNC_INTERVAL`] while
//! records keep coming and once after they stop, and [`Audit::flush`] (which orderly shutdown
//! calls after the listeners stop) writes what is queued and syncs — so a power loss costs at
//! most about that much; `fdatasync` never runs on a request's task. A write error is logged
//! and counted in `keyless_audit_dropped_total` (the chain continues from the last line
//! written).
//!
//! **Repeats of a cached token are summarized**, as Entra's sign-in logs aggregate a service
//! principal's sign-ins. A node's cached token served again to the same caller (same peer
//! address and uid or pod), for the same identity and audience, on the same surface — an
//! event equal to a full record written less than [`REPEAT_WINDOW`] before — is counted, not
//! written; when the window ends (a task checks every [`SYNC_INTERVAL`]) or at
//! [`Audit::flush`], or at the next serve after it ended, one record equal to the full one
//! plus `"repeats": N` and `"since"` (the full record's `time`) stands for those N serves. So
//! every (caller, identity, audience) that got a token is in the file before its first answer
//! of each window, and a repeat is answered only once that full record is; what a `kill -9`
//! can lose is the count of the current window's repeats. A client calling IMDS in a loop writes two lines a minute, not one per
//! call. Refusals, fresh tokens and every server-side record are written one per answer. At
//! most [`MAX_REPEAT_KEYS`] windows are open; past that, serves get full records.
//!
//! Emitting also counts the event in the metrics (tokens issued / refused, Key Vault
//! operations, control-plane writes), also with [`Audit::disabled`] (tests, `--no-audit`).

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// `fdatasync` at most this often while records keep coming (and when they stop).
pub const SYNC_INTERVAL: Duration = Duration::from_secs(1);

/// How long the serves of a cached token that repeat a full record are counted before their
/// summary record is written (see the module doc).
pub const REPEAT_WINDOW: Duration = Duration::from_secs(60);

/// Distinct (caller, identity, audience, surface) repeats counted at once; past it a cached
/// serve of a new one gets a full record.
pub const MAX_REPEAT_KEYS: usize = 10_000;
/// The file name of the audit trail in a data or state directory (`--audit-file` default).
pub const DEFAULT_FILE_NAME: &str = "audit.log";
/// `prev` of the first line.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Metric names counted by [`Audit`]'s emit functions.
pub mod names {
    pub use crate::metrics::{
        CONTROL_PLANE_WRITES, KEYVAULT_OPERATIONS, TOKENS_ISSUED, TOKEN_REFUSALS,
    };
    /// Audit records lost (a write error).
    pub const AUDIT_DROPPED: &str = "keyless_audit_dropped_total";
}

/// The audit file of a data or state directory.
pub fn default_path(dir: &Path) -> PathBuf {
    dir.join(DEFAULT_FILE_NAME)
}

// ------------------------------------------------------------------ bounds

/// Longest value kept of a short field a caller may choose (client / object ids, peer, pod
/// names, certificate digest, reason, operation, correlation id, Key Vault names).
pub const MAX_FIELD_CHARS: usize = 256;
/// Longest value kept of a field whose real values can be longer (resource ids, audiences,
/// a verified issuer and subject: federated credentials allow 600 characters).
pub const MAX_LONG_FIELD_CHARS: usize = 1024;
/// Appended to a value that was cut.
pub const CUT_MARKER: &str = "…[cut]";

/// `s` cut to `max` characters, followed by [`CUT_MARKER`] when it was longer.
pub fn cap(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        None => s.to_string(),
        Some((i, _)) => format!("{}{CUT_MARKER}", &s[..i]),
    }
}

fn cap_in_place(s: &mut String, max: usize) {
    // no more bytes than `max`: no more characters either (the common case, not walked)
    if s.len() <= max {
        return;
    }
    if let Some((i, _)) = s.char_indices().nth(max) {
        s.truncate(i);
        s.push_str(CUT_MARKER);
    }
}

fn cap_opt(s: &mut Option<String>, max: usize) {
    if let Some(s) = s {
        cap_in_place(s, max);
    }
}

impl Caller {
    fn bound(&mut self) {
        for f in [
            &mut self.peer,
            &mut self.pod_namespace,
            &mut self.pod_name,
            &mut self.pod_ip,
            &mut self.certificate,
            &mut self.client_id,
            &mut self.object_id,
        ] {
            cap_opt(f, MAX_FIELD_CHARS);
        }
        for f in [&mut self.host, &mut self.issuer, &mut self.subject] {
            cap_opt(f, MAX_LONG_FIELD_CHARS);
        }
    }
}

impl Event {
    /// Cap every string of the record (see [`MAX_FIELD_CHARS`]): the one place that bounds
    /// what a caller can make a record hold, whatever surface built it.
    fn bound(&mut self) {
        match self {
            Event::Token(t) => t.bound(),
            Event::ControlPlane(c) => {
                c.caller.bound();
                cap_in_place(&mut c.operation, MAX_FIELD_CHARS);
                cap_in_place(&mut c.resource_id, MAX_LONG_FIELD_CHARS);
                cap_in_place(&mut c.result, MAX_FIELD_CHARS);
                cap_opt(&mut c.correlation_id, MAX_FIELD_CHARS);
                cap_opt(&mut c.reason, MAX_FIELD_CHARS);
            }
            Event::KeyVault(k) => {
                k.caller.bound();
                cap_in_place(&mut k.vault, MAX_FIELD_CHARS);
                cap_opt(&mut k.collection, MAX_FIELD_CHARS);
                cap_opt(&mut k.name, MAX_FIELD_CHARS);
                cap_opt(&mut k.version, MAX_FIELD_CHARS);
                cap_in_place(&mut k.operation, MAX_FIELD_CHARS);
                cap_opt(&mut k.reason, MAX_FIELD_CHARS);
            }
        }
    }
}

// ------------------------------------------------------------------ records

/// Where a token request arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Surface {
    /// The node's IMDS endpoint.
    Imds,
    /// NMI (a pod, through the redirect or `/host/token`).
    Nmi,
    /// The node's App Service endpoint.
    AppService,
    /// The node's Azure Arc endpoint.
    Arc,
    /// The node's VM-extension endpoint.
    Extension,
    /// The server's host API (a node asking for its VM's identities).
    Host,
    /// The server's token endpoint (`/oauth2/token`, `/oauth2/v2.0/token`).
    Sts,
}

impl Surface {
    pub fn as_str(self) -> &'static str {
        match self {
            Surface::Imds => "imds",
            Surface::Nmi => "nmi",
            Surface::AppService => "appservice",
            Surface::Arc => "arc",
            Surface::Extension => "extension",
            Surface::Host => "host",
            Surface::Sts => "sts",
        }
    }
}

/// Which grant a token request was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenKind {
    /// A managed identity's token (node surfaces, host API).
    ManagedIdentity,
    /// A service principal with its client secret.
    ClientCredentials,
    /// A managed identity presenting an external issuer's token (workload identity federation).
    Federated,
    /// A service principal with a certificate-signed assertion.
    ClientAssertion,
}

impl TokenKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenKind::ManagedIdentity => "managed_identity",
            TokenKind::ClientCredentials => "client_credentials",
            TokenKind::Federated => "federated",
            TokenKind::ClientAssertion => "client_assertion",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Issued,
    Refused,
}

/// Who asked. Each surface fills what it knows: the node a local process's peer address (and
/// uid when known) or a pod's namespace/name/IP; the server the host resource from the client
/// certificate, the client id of a service principal, the issuer and subject of a federated
/// assertion, the object id of a token's caller.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Caller {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub peer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub uid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub pod_namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub pod_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub pod_ip: Option<String>,
    /// The VM / scale-set instance resource id bound to a host credential.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub host: Option<String>,
    /// SHA-256 (hex) of the TLS client certificate presented (a host credential).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub certificate: Option<String>,
    /// A client's application (client) id.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub client_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub object_id: Option<String>,
    /// A federated assertion's `iss` and `sub`, once its signature verified (never from an
    /// assertion that did not: anyone can write any `iss` into an unsigned token).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub issuer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub subject: Option<String>,
    /// Whether a presented assertion's signature verified (`false`: refused before or at the
    /// signature check, so `issuer` / `subject` are absent).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub assertion_verified: Option<bool>,
}

impl Caller {
    /// A local process known by its peer address.
    pub fn peer(addr: impl ToString) -> Self {
        Caller {
            peer: Some(addr.to_string()),
            ..Default::default()
        }
    }
}

/// The identity a request named or was issued.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Identity {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub client_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub object_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub resource_id: Option<String>,
}

impl Identity {
    pub fn is_empty(&self) -> bool {
        self.client_id.is_none() && self.object_id.is_none() && self.resource_id.is_none()
    }
}

/// A token issuance or refusal.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenEvent {
    pub surface: Surface,
    pub kind: TokenKind,
    pub caller: Caller,
    #[serde(skip_serializing_if = "Identity::is_empty", default)]
    pub identity: Identity,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub audience: Option<String>,
    pub outcome: Outcome,
    /// The HTTP status of the answer.
    pub status: u16,
    /// On a refusal, the code the answer carries (`identity_not_found`, `invalid_request`,
    /// `AADSTS7000215`, …).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<String>,
    /// A node's cached token handed to this caller (still an issuance to this caller).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub cached: Option<bool>,
    /// A summary: this many more serves of a cached token, exactly like the full record of
    /// this caller, identity and audience before it, within [`REPEAT_WINDOW`] of that record
    /// (see the module doc).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub repeats: Option<u64>,
    /// On a summary: the `time` of the full record it repeats (the window's start).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub since: Option<String>,
}

impl TokenEvent {
    fn bound(&mut self) {
        self.caller.bound();
        cap_opt(&mut self.identity.client_id, MAX_FIELD_CHARS);
        cap_opt(&mut self.identity.object_id, MAX_FIELD_CHARS);
        cap_opt(&mut self.identity.resource_id, MAX_LONG_FIELD_CHARS);
        cap_opt(&mut self.audience, MAX_LONG_FIELD_CHARS);
        cap_opt(&mut self.reason, MAX_FIELD_CHARS);
    }

    /// An event not yet decided: surfaces fill it as they learn, then call
    /// [`TokenEvent::issued`] or [`TokenEvent::refused`].
    pub fn new(surface: Surface, kind: TokenKind, caller: Caller) -> Self {
        TokenEvent {
            surface,
            kind,
            caller,
            identity: Identity::default(),
            audience: None,
            outcome: Outcome::Refused,
            status: 0,
            reason: None,
            cached: None,
            repeats: None,
            since: None,
        }
    }
    pub fn issued(mut self) -> Self {
        self.outcome = Outcome::Issued;
        self.status = 200;
        self.reason = None;
        self
    }
    pub fn refused(mut self, status: u16, reason: impl Into<String>) -> Self {
        self.outcome = Outcome::Refused;
        self.status = status;
        self.reason = Some(reason.into());
        self
    }
}

/// A control-plane write (PUT, PATCH, DELETE, POST action) and its result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ControlPlaneEvent {
    pub caller: Caller,
    /// E.g. `Microsoft.ManagedIdentity/userAssignedIdentities/write`.
    pub operation: String,
    pub resource_id: String,
    pub status: u16,
    /// `Succeeded` or `Failed`.
    pub result: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub correlation_id: Option<String>,
    /// The error code of a failure.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<String>,
}

/// A Key Vault data-plane operation and its result (never the value).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyVaultEvent {
    pub caller: Caller,
    pub vault: String,
    /// `secrets`, `keys`, `certificates`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub collection: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub version: Option<String>,
    /// Key Vault's `AuditEvent` operation name: `SecretGet`, `KeySign`, `CertificateCreate`, …
    pub operation: String,
    pub status: u16,
    /// The error code of a failure.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<String>,
}

/// One audit record's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum Event {
    Token(TokenEvent),
    ControlPlane(ControlPlaneEvent),
    KeyVault(KeyVaultEvent),
}

/// A line of the file, as [`read`] returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub seq: u64,
    pub time: String,
    pub prev: String,
    #[serde(flatten)]
    pub event: Event,
    #[serde(default)]
    pub hash: String,
}

/// A line as one serialized struct: what [`render_into`] writes, field by field (tests compare).
#[cfg(test)]
#[derive(Serialize)]
struct LineOut<'a> {
    seq: u64,
    time: &'a str,
    prev: &'a str,
    #[serde(flatten)]
    event: &'a Event,
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b).as_ref())
}

const HASH_FIELD: &str = ",\"hash\":\"";
/// `,"hash":"` + 64 hex digits + `"}`.
const HASH_SUFFIX_LEN: usize = HASH_FIELD.len() + 64 + 2;

/// The line (without newline) of `event` as record `seq` after a line hashing to `prev`.
#[cfg(test)]
fn render(seq: u64, time: &str, prev: &str, event: &Event) -> String {
    let mut line = String::new();
    render_into(&mut line, seq, time, prev, &event_json(event));
    line
}

/// `event` as JSON (`{"type":…,…}`), made on the emitting task before the chain is taken.
fn event_json(event: &Event) -> String {
    serde_json::to_string(event).unwrap_or_else(|_| "{}".into())
}

/// Write into `line` (cleared first) the line, without newline, of the event whose JSON is
/// `event` as record `seq` after a line hashing to `prev`: the same bytes as serializing
/// `{seq, time, prev, ..event}` (the event's fields flattened after `prev`), then `hash`.
fn render_into(line: &mut String, seq: u64, time: &str, prev: &str, event: &str) {
    use std::fmt::Write as _;
    line.clear();
    let _ = write!(line, "{{\"seq\":{seq},\"time\":");
    if time
        .bytes()
        .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
    {
        line.push('"');
        line.push_str(time);
        line.push('"');
    } else {
        line.push_str(&serde_json::to_string(time).unwrap_or_else(|_| "\"\"".into()));
    }
    line.push_str(",\"prev\":\"");
    line.push_str(prev);
    line.push('"');
    let fields = event
        .strip_prefix('{')
        .and_then(|e| e.strip_suffix('}'))
        .unwrap_or("");
    if !fields.is_empty() {
        line.push(',');
        line.push_str(fields);
    }
    let h = sha256_hex(line.as_bytes());
    line.push_str(HASH_FIELD);
    line.push_str(&h);
    line.push_str("\"}");
}

/// RFC 3339 UTC with milliseconds.
pub fn rfc3339_now() -> String {
    use std::fmt::Write as _;
    let t = time::OffsetDateTime::now_utc();
    let mut out = String::with_capacity(24);
    let _ = write!(
        out,
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    );
    out
}

// ------------------------------------------------------------------ the sink

/// The audit sink: cheap to share (`Arc<Audit>`), passed to whatever emits. Dropping the last
/// reference stops the sync thread after it synced what was written (and releases the lock).
pub struct Audit {
    chain: Option<Arc<Chain>>,
    path: Option<PathBuf>,
    syncer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// The queue of records, the file with the end of its chain, and the repeat windows.
struct Chain {
    /// Records serialized and in order, not yet written: an emit appends its own here (a
    /// short synchronous lock) and takes a ticket.
    pending: Mutex<Pending>,
    /// The file: whoever holds it writes every pending record in one `write(2)` (group
    /// commit), so records written meanwhile by other emits need no write of their own.
    writer: tokio::sync::Mutex<Writer>,
    /// Tickets up to this one are written (or were dropped by a failed write).
    done: AtomicU64,
    /// Cached serves repeating a full record, counted until their window ends.
    repeats: Mutex<HashMap<TokenEvent, RepeatWindow>>,
    /// Whether the task writing the summaries of ended windows runs.
    sweeping: AtomicBool,
    sync: Arc<SyncState>,
}

/// The serves counted since a full record (of the event the window is keyed by).
struct RepeatWindow {
    ends: Instant,
    count: u64,
    /// The full record's ticket and `time`.
    ticket: u64,
    since: String,
}

/// Records waiting for the writer: `(time, event JSON)`, in emit order; `enqueued` counts
/// every record ever appended (the last one's ticket).
#[derive(Default)]
struct Pending {
    records: Vec<(String, String)>,
    enqueued: u64,
}

struct Writer {
    f: File,
    /// The file's length after the last whole write (a failed write is cut back to it).
    len: u64,
    tail: Tail,
    /// The batch being written, and its records taken out of `pending` (allocations kept).
    batch: String,
    taken: Vec<(String, String)>,
    /// One line being rendered.
    line: String,
}

/// What the sync thread waits on: records written since the last `fdatasync`, or the stop.
#[derive(Default)]
struct SyncState {
    dirty: AtomicBool,
    stop: Mutex<bool>,
    wake: Condvar,
}

impl SyncState {
    /// Records were appended: the sync thread syncs within [`SYNC_INTERVAL`] (woken only when
    /// the file was clean, so at most once per interval).
    fn written(&self) {
        if !self.dirty.swap(true, Ordering::AcqRel) {
            let _g = self.stop.lock().unwrap_or_else(|p| p.into_inner());
            self.wake.notify_one();
        }
    }
}

impl Drop for Audit {
    fn drop(&mut self) {
        if let Some(c) = &self.chain {
            *c.sync.stop.lock().unwrap_or_else(|p| p.into_inner()) = true;
            c.sync.wake.notify_one();
        }
        let handle = self.syncer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit").field("path", &self.path).finish()
    }
}

/// The chain state the writer continues from.
struct Tail {
    seq: u64,
    prev: String,
}

/// The last line of `f` (without its newline), if any.
fn last_line(f: &mut File) -> std::io::Result<Option<Vec<u8>>> {
    let len = f.seek(SeekFrom::End(0))?;
    if len == 0 {
        return Ok(None);
    }
    let mut end = len;
    let mut buf: Vec<u8> = Vec::new();
    // skip the trailing newline
    let mut one = [0u8; 1];
    f.seek(SeekFrom::Start(len - 1))?;
    f.read_exact(&mut one)?;
    if one[0] == b'\n' {
        end -= 1;
    }
    let mut pos = end;
    const CHUNK: u64 = 64 * 1024;
    loop {
        let start = pos.saturating_sub(CHUNK);
        let mut chunk = vec![0u8; (pos - start) as usize];
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(&mut chunk)?;
        chunk.extend_from_slice(&buf);
        buf = chunk;
        if let Some(i) = buf.iter().rposition(|&b| b == b'\n') {
            return Ok(Some(buf[i + 1..].to_vec()));
        }
        if start == 0 {
            return Ok(Some(buf));
        }
        pos = start;
    }
}

fn read_tail(f: &mut File) -> std::io::Result<Tail> {
    match last_line(f)? {
        None => Ok(Tail {
            seq: 0,
            prev: GENESIS.to_string(),
        }),
        Some(line) => {
            let seq_of = |l: &[u8]| {
                serde_json::from_slice::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v.get("seq").and_then(|s| s.as_u64()))
            };
            let seq = match seq_of(&line) {
                Some(seq) => seq,
                None => {
                    // a torn or foreign last line (a power loss mid-write, an edit): keep
                    // serving — the chain continues after it, numbered after the last record
                    // that reads, and `verify` names the line
                    tracing::error!(
                        "the last line of the audit file is not an audit record; continuing after it (`keyless audit verify` names it)"
                    );
                    let mut all = Vec::new();
                    f.seek(SeekFrom::Start(0))?;
                    f.read_to_end(&mut all)?;
                    all.split(|&b| b == b'\n')
                        .rev()
                        .find_map(seq_of)
                        .unwrap_or(0)
                }
            };
            Ok(Tail {
                seq,
                prev: sha256_hex(&line),
            })
        }
    }
}

/// The process holding a `flock` on `f`, from `/proc/locks` (Linux; None when unknown).
fn lock_holder(f: &File) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let ino = f.metadata().ok()?.ino();
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    // `1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF`
    locks.lines().find_map(|l| {
        let w: Vec<&str> = l.split_whitespace().collect();
        let at = w.iter().position(|x| *x == "FLOCK")?;
        let pid = w.get(at + 3)?.parse().ok()?;
        let file_ino: u64 = w.get(at + 4)?.rsplit(':').next()?.parse().ok()?;
        (file_ino == ino).then_some(pid)
    })
}

impl Audit {
    /// A sink that records nothing (metrics are still counted).
    pub fn disabled() -> Arc<Audit> {
        Arc::new(Audit {
            chain: None,
            path: None,
            syncer: Mutex::new(None),
        })
    }

    /// Open (or create, 0600) `path` for appending, lock it, continue its chain, start the
    /// sync thread. Refused: a symbolic link (never followed, never chmodded), anything but a
    /// regular file, and a file another writer holds (its exclusive `flock`: two writers would
    /// each continue the chain from their own `seq` / `prev`).
    pub fn open(path: &Path) -> std::io::Result<Arc<Audit>> {
        use std::io::{Error, ErrorKind};
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        use std::os::unix::io::AsRawFd;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut f = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| {
                if e.raw_os_error() == Some(libc::ELOOP) {
                    Error::new(
                        ErrorKind::InvalidInput,
                        format!(
                            "the audit file {} is a symbolic link; it is not followed (give the file's own path)",
                            path.display()
                        ),
                    )
                } else {
                    e
                }
            })?;
        if !f.metadata()?.is_file() {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("the audit file {} is not a regular file", path.display()),
            ));
        }
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(e);
            }
            let holder = lock_holder(&f)
                .map(|pid| format!(" (process {pid})"))
                .unwrap_or_default();
            return Err(Error::new(
                ErrorKind::WouldBlock,
                format!(
                    "the audit file {} is locked by another writer{holder}; two writers would break its hash chain — give each process its own --audit-file",
                    path.display()
                ),
            ));
        }
        // an existing file keeps no wider mode than ours (fchmod: the file opened, no link)
        if f.metadata()?.permissions().mode() & 0o077 != 0 {
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        }
        let tail = read_tail(&mut f)?;
        // a last line without its newline (torn) stays a line of its own
        let len = f.seek(SeekFrom::End(0))?;
        if len > 0 {
            let mut one = [0u8; 1];
            f.seek(SeekFrom::Start(len - 1))?;
            f.read_exact(&mut one)?;
            if one[0] != b'\n' {
                f.write_all(b"\n")?;
            }
        }
        let sync = Arc::new(SyncState::default());
        let handle = {
            let (f, sync) = (f.try_clone()?, sync.clone());
            std::thread::Builder::new()
                .name("keyless-audit".into())
                .spawn(move || syncer(f, &sync))?
        };
        Ok(Arc::new(Audit {
            chain: Some(Arc::new(Chain {
                pending: Mutex::new(Pending::default()),
                writer: tokio::sync::Mutex::new(Writer {
                    len: f.metadata()?.len(),
                    f,
                    tail,
                    batch: String::new(),
                    taken: Vec::new(),
                    line: String::new(),
                }),
                done: AtomicU64::new(0),
                repeats: Mutex::new(HashMap::new()),
                sweeping: AtomicBool::new(false),
                sync,
            })),
            path: Some(path.to_path_buf()),
            syncer: Mutex::new(Some(handle)),
        }))
    }

    /// Where records go (None when disabled).
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub fn is_enabled(&self) -> bool {
        self.chain.is_some()
    }

    /// Bound the record, serialize it, queue it (in order), then take the file (in turn):
    /// unless an emit that held it meanwhile already wrote this record, write every queued
    /// record — numbered, chained, one `write(2)` for all (group commit). A request is
    /// answered only once its record is in the file, so a killed process loses none that
    /// were answered. A write error is counted and logged (that batch is lost; the chain
    /// continues from the last line written).
    async fn emit(&self, event: Event) {
        if let Some(chain) = &self.chain {
            chain.emit(event).await
        }
    }

    /// Record a token issuance or refusal, and count it.
    pub async fn token(&self, ev: TokenEvent) {
        let surface = ev.surface.as_str();
        match ev.outcome {
            Outcome::Issued => {
                ::metrics::counter!(names::TOKENS_ISSUED, "surface" => surface, "kind" => ev.kind.as_str())
                    .increment(1)
            }
            Outcome::Refused => {
                let reason = ev.reason.clone().unwrap_or_default();
                ::metrics::counter!(names::TOKEN_REFUSALS, "surface" => surface, "reason" => reason)
                    .increment(1)
            }
        }
        match &self.chain {
            Some(chain) if ev.outcome == Outcome::Issued && ev.cached == Some(true) => {
                // bounded first: the window is keyed by the event as it would be written
                let mut ev = ev;
                ev.bound();
                let (ticket, _) = chain.admit_serve(ev);
                chain.wait_written(ticket).await
            }
            Some(chain) => chain.emit(Event::Token(ev)).await,
            None => {}
        }
    }

    /// Record a control-plane write, and count it under `operation_label` — a value from a
    /// fixed set (`keyless_core::activity_log::Operation::metric_label`), never the record's
    /// `operation`, which may carry a caller's action name; the result is `Succeeded`,
    /// `Accepted` or `Failed` (anything else counts as `other`).
    pub async fn control_plane(&self, ev: ControlPlaneEvent, operation_label: &str) {
        let label = if operation_label.len() <= MAX_FIELD_CHARS {
            operation_label.to_string()
        } else {
            "other".to_string()
        };
        let result = match ev.result.as_str() {
            "Succeeded" => "Succeeded",
            "Accepted" => "Accepted",
            "Failed" => "Failed",
            _ => "other",
        };
        ::metrics::counter!(names::CONTROL_PLANE_WRITES, "operation" => label, "result" => result)
            .increment(1);
        self.emit(Event::ControlPlane(ev)).await
    }

    /// Record a Key Vault operation, and count it.
    pub async fn key_vault(&self, ev: KeyVaultEvent) {
        let result = if ev.status < 400 {
            "Succeeded"
        } else {
            "Failed"
        };
        ::metrics::counter!(names::KEYVAULT_OPERATIONS, "operation" => ev.operation.clone(), "result" => result)
            .increment(1);
        self.emit(Event::KeyVault(ev)).await
    }

    /// Wait until every record emitted before this call is in the file and synced (orderly
    /// shutdown calls this after the listeners stopped).
    pub async fn flush(&self) {
        let Some(chain) = &self.chain else { return };
        // the repeats counted so far are summarized now
        for summary in chain.end_windows(None) {
            chain.emit(Event::Token(summary)).await;
        }
        // whatever was queued before this call is written (by its emit or here), then synced
        let mut w = chain.writer.lock().await;
        chain.write_pending(&mut w);
        if chain.sync.dirty.swap(false, Ordering::AcqRel) {
            sync(&w.f);
        }
    }
}

impl Chain {
    /// [`Audit`]'s emit (see there).
    async fn emit(&self, mut event: Event) {
        event.bound();
        let ticket = self.queue(&event);
        self.wait_written(ticket).await
    }

    /// Queue `event` (bounded) in order, recorded now; its ticket.
    fn queue(&self, event: &Event) -> u64 {
        self.queue_at(event, rfc3339_now())
    }

    /// Queue `event` (bounded) in order with the record's `time`; its ticket.
    fn queue_at(&self, event: &Event, time: String) -> u64 {
        let record = (time, event_json(event));
        let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        p.records.push(record);
        p.enqueued += 1;
        p.enqueued
    }

    /// Take the file in turn and, unless `ticket` was written meanwhile, write every queued
    /// record.
    async fn wait_written(&self, ticket: u64) {
        if self.done.load(Ordering::Acquire) >= ticket {
            return;
        }
        let mut w = self.writer.lock().await;
        if self.done.load(Ordering::Acquire) < ticket {
            self.write_pending(&mut w);
        }
    }

    /// A cached serve (`ev`, bounded): counted as a repeat of the full record of the same event
    /// while its window is open (`true`), else queued as a full record that opens a window
    /// (`false`; a window that ended and was not swept yet is summarized first, unless
    /// [`MAX_REPEAT_KEYS`] are open, when none is opened). Either way the ticket to wait for: a
    /// repeat is answered only once the full record it repeats is in the file.
    fn admit_serve(self: &Arc<Self>, ev: TokenEvent) -> (u64, bool) {
        let now = Instant::now();
        let mut repeats = self.repeats.lock().unwrap_or_else(|p| p.into_inner());
        let full = repeats.len() >= MAX_REPEAT_KEYS;
        match repeats.get_mut(&ev) {
            Some(w) if now < w.ends => {
                w.count += 1;
                return (w.ticket, true);
            }
            Some(_) => {
                if let Some((ended, w)) = repeats.remove_entry(&ev) {
                    if let Some(summary) = summary(ended, &w) {
                        self.queue(&Event::Token(summary));
                    }
                }
            }
            None if full => return (self.queue(&Event::Token(ev)), false),
            None => {}
        }
        // queued under the windows' lock: a repeat that finds the window finds its ticket
        let since = rfc3339_now();
        let ticket = self.queue_at(&Event::Token(ev.clone()), since.clone());
        repeats.insert(
            ev,
            RepeatWindow {
                ends: now + REPEAT_WINDOW,
                count: 0,
                ticket,
                since,
            },
        );
        drop(repeats);
        if !self.sweeping.swap(true, Ordering::AcqRel) {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(sweep(Arc::downgrade(self)));
                }
                Err(_) => self.sweeping.store(false, Ordering::Release),
            }
        }
        (ticket, false)
    }

    /// Take out the windows ended by `now` (all of them with `None`), returning the summaries
    /// of those that counted repeats.
    fn end_windows(&self, now: Option<Instant>) -> Vec<TokenEvent> {
        let mut repeats = self.repeats.lock().unwrap_or_else(|p| p.into_inner());
        let mut summaries = vec![];
        repeats.retain(|ev, w| {
            if now.is_some_and(|n| n < w.ends) {
                return true;
            }
            summaries.extend(summary(ev.clone(), w));
            false
        });
        summaries
    }

    /// Number, chain and append every queued record in one write (the caller holds the file).
    fn write_pending(&self, w: &mut Writer) {
        let Writer {
            f,
            len,
            tail,
            batch,
            taken,
            line,
        } = w;
        let upto = {
            let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::swap(&mut p.records, taken);
            p.enqueued
        };
        if taken.is_empty() {
            self.done.store(upto, Ordering::Release);
            return;
        }
        batch.clear();
        let (mut seq, mut prev) = (tail.seq, tail.prev.clone());
        for (time, json) in taken.iter() {
            seq += 1;
            render_into(line, seq, time, &prev, json);
            prev = sha256_hex(line.as_bytes());
            batch.push_str(line);
            batch.push('\n');
        }
        let n = taken.len();
        taken.clear();
        let written = (&*f).write_all(batch.as_bytes());
        match written {
            Ok(()) => {
                *tail = Tail { seq, prev };
                *len += batch.len() as u64;
                self.sync.written();
            }
            Err(e) => {
                // `tail` stays: the chain goes on from the last line written, and whatever part
                // of the batch reached the file is cut off (its lines would repeat `seq`s)
                let _ = f.set_len(*len);
                ::metrics::counter!(names::AUDIT_DROPPED).increment(n as u64);
                tracing::error!(error = %e, records = n, "cannot write the audit file; records dropped");
            }
        }
        self.done.store(upto, Ordering::Release);
    }
}

/// The summary record of window `w` of `ev` (none when it counted no repeat).
fn summary(mut ev: TokenEvent, w: &RepeatWindow) -> Option<TokenEvent> {
    (w.count > 0).then(|| {
        ev.repeats = Some(w.count);
        ev.since = Some(w.since.clone());
        ev
    })
}

/// Write the summaries of ended repeat windows, once a second, while the sink lives.
async fn sweep(chain: std::sync::Weak<Chain>) {
    let mut tick = tokio::time::interval(SYNC_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(chain) = chain.upgrade() else { return };
        for summary in chain.end_windows(Some(Instant::now())) {
            chain.emit(Event::Token(summary)).await;
        }
    }
}

/// The sync thread: `fdatasync` within [`SYNC_INTERVAL`] of a write (at most once per
/// interval), and a last time when the sink is dropped.
fn syncer(f: File, st: &SyncState) {
    let mut last_sync = Instant::now();
    let mut stop = st.stop.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        if *stop {
            break;
        }
        if !st.dirty.load(Ordering::Acquire) {
            stop = st.wake.wait(stop).unwrap_or_else(|p| p.into_inner());
            continue;
        }
        let due = last_sync + SYNC_INTERVAL;
        let now = Instant::now();
        if now < due {
            stop = st
                .wake
                .wait_timeout(stop, due - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            continue;
        }
        drop(stop);
        if st.dirty.swap(false, Ordering::AcqRel) {
            sync(&f);
        }
        last_sync = Instant::now();
        stop = st.stop.lock().unwrap_or_else(|p| p.into_inner());
    }
    drop(stop);
    if st.dirty.swap(false, Ordering::AcqRel) {
        sync(&f);
    }
}

fn sync(f: &File) {
    if let Err(e) = f.sync_data() {
        tracing::error!(error = %e, "cannot sync the audit file");
    }
}

// ------------------------------------------------------------------ reading and checking

/// Why a chain check failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    #[error("line {line}: {why}")]
    Broken { line: usize, why: String },
}

/// A chain that checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub records: u64,
    /// `hash` of the last line (what to keep elsewhere to anchor the end).
    pub last_hash: String,
}

/// Check every line of `text` (see the module doc); the first broken line, numbered from 1.
pub fn verify_text(text: &str) -> Result<Verified, VerifyError> {
    let mut prev = GENESIS.to_string();
    let mut seq = 0u64;
    let mut last_hash = String::new();
    let broken = |line: usize, why: String| VerifyError::Broken { line, why };
    let mut lines = text.split('\n').enumerate().peekable();
    while let Some((i, line)) = lines.next() {
        let n = i + 1;
        if line.is_empty() && lines.peek().is_none() {
            break; // the final newline
        }
        if !text[..].ends_with('\n') && lines.peek().is_none() {
            return Err(broken(n, "incomplete last line (no newline)".into()));
        }
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| broken(n, format!("not a JSON record: {e}")))?;
        if line.len() < HASH_SUFFIX_LEN || !line.is_char_boundary(line.len() - HASH_SUFFIX_LEN) {
            return Err(broken(n, "no hash field at the end".into()));
        }
        let (body, suffix) = line.split_at(line.len() - HASH_SUFFIX_LEN);
        let hash = suffix
            .strip_prefix(HASH_FIELD)
            .and_then(|s| s.strip_suffix("\"}"))
            .filter(|h| h.len() == 64)
            .ok_or_else(|| broken(n, "no hash field at the end".into()))?;
        if sha256_hex(body.as_bytes()) != hash {
            return Err(broken(
                n,
                "the record does not match its hash (edited in place)".into(),
            ));
        }
        let got_seq = v.get("seq").and_then(|s| s.as_u64());
        if got_seq != Some(seq + 1) {
            return Err(broken(
                n,
                format!(
                    "seq is {} where {} was expected (a record deleted, inserted or moved)",
                    got_seq.map(|s| s.to_string()).unwrap_or("missing".into()),
                    seq + 1
                ),
            ));
        }
        if v.get("prev").and_then(|p| p.as_str()) != Some(prev.as_str()) {
            return Err(broken(
                n,
                "prev does not match the previous line (a record before it changed)".into(),
            ));
        }
        seq += 1;
        prev = sha256_hex(line.as_bytes());
        last_hash = hash.to_string();
    }
    Ok(Verified {
        records: seq,
        last_hash,
    })
}

/// [`verify_text`] on the file at `path`.
pub fn verify(path: &Path) -> Result<Verified, VerifyError> {
    let text = std::fs::read_to_string(path).map_err(|e| VerifyError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    verify_text(&text)
}

/// Every record of the file at `path` (lines that do not parse are skipped; use [`verify`]
/// to check the file).
pub fn read(path: &Path) -> std::io::Result<Vec<Record>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(n: usize) -> TokenEvent {
        let mut e = TokenEvent::new(
            Surface::Imds,
            TokenKind::ManagedIdentity,
            Caller::peer(format!("127.0.0.1:{n}")),
        );
        e.audience = Some("https://management.azure.com/".into());
        if n.is_multiple_of(2) {
            e.issued()
        } else {
            e.refused(400, "identity_not_found")
        }
    }

    async fn write_n(path: &Path, from: usize, n: usize) {
        let a = Audit::open(path).unwrap();
        for i in from..from + n {
            a.token(ev(i)).await;
        }
        a.flush().await;
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn write_lines(path: &Path, lines: &[String]) {
        let mut s = lines.join("\n");
        s.push('\n');
        std::fs::write(path, s).unwrap();
    }

    fn broken_line(path: &Path) -> usize {
        match verify(path) {
            Err(VerifyError::Broken { line, .. }) => line,
            other => panic!("expected a broken chain, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn the_chain_continues_across_reopen_and_the_file_is_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/audit.log");
        write_n(&path, 0, 3).await;
        write_n(&path, 3, 2).await;
        let v = verify(&path).unwrap();
        assert_eq!(v.records, 5);
        let recs = read(&path).unwrap();
        assert_eq!(
            recs.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5]
        );
        assert_eq!(recs[0].prev, GENESIS);
        assert_eq!(recs[4].hash, v.last_hash);
        let Event::Token(t) = &recs[3].event else {
            panic!("a token record")
        };
        assert_eq!(t.caller.peer.as_deref(), Some("127.0.0.1:3"));
        assert_eq!(t.reason.as_deref(), Some("identity_not_found"));
        assert!(recs[3].time.ends_with('Z') && recs[3].time.contains('T'));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // an empty file verifies (nothing to check)
        let empty = dir.path().join("empty.log");
        std::fs::write(&empty, "").unwrap();
        assert_eq!(verify(&empty).unwrap().records, 0);
    }

    #[tokio::test]
    async fn an_edit_in_place_a_deleted_line_or_a_reorder_breaks_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        write_n(&path, 0, 5).await;
        let good = lines(&path);
        assert!(verify(&path).is_ok());

        // edited in place: that line fails
        let mut l = good.clone();
        l[2] = l[2].replace("\"issued\"", "\"refused\"");
        assert_ne!(l[2], good[2]);
        write_lines(&path, &l);
        assert_eq!(broken_line(&path), 3);

        // edited with its own hash recomputed: the next line fails
        let mut l = good.clone();
        let body = &l[2][..l[2].len() - HASH_SUFFIX_LEN].replace("127.0.0.1:2", "127.0.0.1:9");
        l[2] = format!("{body}{HASH_FIELD}{}\"}}", sha256_hex(body.as_bytes()));
        write_lines(&path, &l);
        assert_eq!(broken_line(&path), 4);

        // the last line edited
        let mut l = good.clone();
        l[4] = l[4].replace("127.0.0.1:4", "127.0.0.1:5");
        write_lines(&path, &l);
        assert_eq!(broken_line(&path), 5);

        // a line deleted
        let mut l = good.clone();
        l.remove(1);
        write_lines(&path, &l);
        assert_eq!(broken_line(&path), 2);

        // two lines swapped
        let mut l = good.clone();
        l.swap(1, 3);
        write_lines(&path, &l);
        assert_eq!(broken_line(&path), 2);

        // a line inserted (a copy)
        let mut l = good.clone();
        l.insert(2, good[1].clone());
        write_lines(&path, &l);
        assert_eq!(broken_line(&path), 3);

        // a torn last line
        let mut s = good.join("\n");
        s.push_str("\n{\"seq\":6");
        std::fs::write(&path, s).unwrap();
        assert_eq!(broken_line(&path), 6);
    }

    #[tokio::test]
    async fn a_torn_last_line_does_not_stop_the_sink_and_verify_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        write_n(&path, 0, 3).await;
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{\"seq\":4,\"time\":\"2026");
        std::fs::write(&path, &text).unwrap();
        write_n(&path, 3, 2).await;
        let recs = read(&path).unwrap();
        assert_eq!(
            recs.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5]
        );
        assert_eq!(broken_line(&path), 4);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn many_concurrent_writers_make_one_valid_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let a = Audit::open(&path).unwrap();
        let tasks: Vec<_> = (0..64)
            .map(|t| {
                let a = a.clone();
                tokio::spawn(async move {
                    for i in 0..50 {
                        a.token(ev(t * 1000 + i)).await;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        a.flush().await;
        assert_eq!(verify(&path).unwrap().records, 64 * 50);
        let mut peers: Vec<String> = read(&path)
            .unwrap()
            .into_iter()
            .map(|r| match r.event {
                Event::Token(t) => t.caller.peer.unwrap(),
                _ => panic!("a token record"),
            })
            .collect();
        peers.sort();
        peers.dedup();
        assert_eq!(peers.len(), 64 * 50, "every record once");
    }

    #[test]
    fn cap_cuts_at_a_char_boundary_and_marks_it() {
        assert_eq!(cap("abc", 3), "abc");
        assert_eq!(cap("abcd", 3), format!("abc{CUT_MARKER}"));
        assert_eq!(cap("ééééé", 2), format!("éé{CUT_MARKER}"));
        assert_eq!(cap("", 0), "");
    }

    #[tokio::test]
    async fn every_caller_chosen_string_is_capped_in_the_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let a = Audit::open(&path).unwrap();
        let huge = "x".repeat(2 * 1024 * 1024);
        let mut t = TokenEvent::new(
            Surface::Sts,
            TokenKind::Federated,
            Caller {
                client_id: Some(huge.clone()),
                issuer: Some(huge.clone()),
                subject: Some(huge.clone()),
                peer: Some(huge.clone()),
                ..Default::default()
            },
        );
        t.identity.client_id = Some(huge.clone());
        t.identity.resource_id = Some(huge.clone());
        t.audience = Some(huge.clone());
        a.token(t.refused(400, huge.clone())).await;
        a.control_plane(
            ControlPlaneEvent {
                caller: Caller {
                    object_id: Some(huge.clone()),
                    ..Default::default()
                },
                operation: huge.clone(),
                resource_id: huge.clone(),
                status: 404,
                result: "Failed".into(),
                correlation_id: Some(huge.clone()),
                reason: None,
            },
            "other",
        )
        .await;
        a.key_vault(KeyVaultEvent {
            caller: Caller::default(),
            vault: huge.clone(),
            collection: None,
            name: Some(huge.clone()),
            version: Some(huge.clone()),
            operation: "SecretGet".into(),
            status: 404,
            reason: None,
        })
        .await;
        a.flush().await;
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(verify(&path).unwrap().records, 3);
        for line in text.lines() {
            assert!(line.len() < 16 * 1024, "a record of {} bytes", line.len());
        }
        let recs = read(&path).unwrap();
        let Event::Token(t) = &recs[0].event else {
            panic!("a token record")
        };
        let cid = t.caller.client_id.as_deref().unwrap();
        assert_eq!(
            cid.chars().count(),
            MAX_FIELD_CHARS + CUT_MARKER.chars().count()
        );
        assert!(cid.ends_with(CUT_MARKER));
        assert!(t
            .audience
            .as_deref()
            .unwrap()
            .starts_with(&"x".repeat(MAX_LONG_FIELD_CHARS)));
        assert!(t.caller.subject.as_deref().unwrap().ends_with(CUT_MARKER));
        let Event::ControlPlane(c) = &recs[1].event else {
            panic!("a control-plane record")
        };
        assert!(c.operation.ends_with(CUT_MARKER) && c.resource_id.ends_with(CUT_MARKER));
    }

    #[tokio::test]
    async fn a_second_writer_is_refused_until_the_first_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let first = Audit::open(&path).unwrap();
        first.token(ev(0)).await;
        let err = Audit::open(&path).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock);
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("locked by another writer"), "{msg}");
        assert!(
            msg.contains(&format!("process {}", std::process::id())),
            "the holder named: {msg}"
        );
        // the first writer's chain is untouched; once it is dropped, the file opens again
        drop(first);
        write_n(&path, 1, 2).await;
        assert_eq!(verify(&path).unwrap().records, 3);
    }

    #[tokio::test]
    async fn a_symlinked_audit_file_is_refused_and_its_target_untouched() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, "precious\n").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
        let link = dir.path().join("audit.log");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = Audit::open(&link).unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious\n");
        let mode = std::fs::metadata(&target).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644, "not chmodded through the link");
        // a directory is no audit file either
        let d = dir.path().join("adir");
        std::fs::create_dir(&d).unwrap();
        assert!(Audit::open(&d).is_err());
    }

    #[tokio::test]
    async fn an_emit_returns_once_its_record_is_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let a = Audit::open(&path).unwrap();
        for i in 0..20 {
            a.token(ev(i)).await;
            // no flush: the record is written (page cache) when the emit returns
            assert_eq!(lines(&path).len(), i + 1);
        }
    }

    #[test]
    fn a_line_is_the_serialized_record_then_its_hash() {
        let mut cp = ControlPlaneEvent {
            caller: Caller {
                client_id: Some("c\"q\\é".into()),
                ..Default::default()
            },
            operation: "Microsoft.ManagedIdentity/userAssignedIdentities/write".into(),
            resource_id: "/subscriptions/s/x".into(),
            status: 200,
            result: "Succeeded".into(),
            correlation_id: None,
            reason: None,
        };
        let kv = KeyVaultEvent {
            caller: Caller::default(),
            vault: "v".into(),
            collection: Some("secrets".into()),
            name: Some("n\u{1}".into()),
            version: None,
            operation: "SecretGet".into(),
            status: 200,
            reason: None,
        };
        let mut events = vec![
            Event::Token(ev(1)),
            Event::Token(ev(2)),
            Event::KeyVault(kv),
            Event::ControlPlane(cp.clone()),
        ];
        cp.correlation_id = Some("corr".into());
        events.push(Event::ControlPlane(cp));
        for (i, e) in events.iter().enumerate() {
            for time in ["2026-01-02T03:04:05.678Z", "odd \"time\""] {
                let mut want = serde_json::to_string(&LineOut {
                    seq: i as u64 + 1,
                    time,
                    prev: GENESIS,
                    event: e,
                })
                .unwrap();
                want.pop();
                let h = sha256_hex(want.as_bytes());
                want.push_str(&format!(",\"hash\":\"{h}\"}}"));
                assert_eq!(render(i as u64 + 1, time, GENESIS, e), want);
                if i == 0 {
                    assert_eq!(verify_text(&format!("{want}\n")).unwrap().records, 1);
                }
            }
        }
    }

    fn cached(peer: &str, audience: &str) -> TokenEvent {
        let mut e = TokenEvent::new(
            Surface::Imds,
            TokenKind::ManagedIdentity,
            Caller::peer(peer),
        );
        e.audience = Some(audience.into());
        e.cached = Some(true);
        e.issued()
    }

    fn tokens(path: &Path) -> Vec<TokenEvent> {
        read(path)
            .unwrap()
            .into_iter()
            .filter_map(|r| match r.event {
                Event::Token(t) => Some(t),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn repeated_cached_serves_are_one_record_and_a_summary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let a = Audit::open(&path).unwrap();
        let arm = "https://management.azure.com/";
        for _ in 0..5 {
            a.token(cached("127.0.0.1:1000", arm)).await;
        }
        // the first serve is in the file before its answer, the repeats are not yet
        assert_eq!(tokens(&path), [cached("127.0.0.1:1000", arm)]);
        // another caller, another audience, a fresh token and a refusal: full records each
        a.token(cached("127.0.0.1:2000", arm)).await;
        a.token(cached("127.0.0.1:1000", "https://vault.azure.net"))
            .await;
        let mut fresh = cached("127.0.0.1:1000", arm);
        fresh.cached = Some(false);
        a.token(fresh.clone()).await;
        a.token(fresh.clone()).await;
        let refused = ev(1);
        a.token(refused.clone()).await;
        a.token(refused.clone()).await;
        a.token(cached("127.0.0.1:1000", arm)).await;
        assert_eq!(tokens(&path).len(), 7);
        // flush (orderly shutdown) writes the summary of the open window
        a.flush().await;
        let got = tokens(&path);
        let mut summary = cached("127.0.0.1:1000", arm);
        summary.repeats = Some(5);
        // the window's start: the time of the full record it repeats
        summary.since = Some(read(&path).unwrap()[0].time.clone());
        assert_eq!(got.len(), 8);
        assert_eq!(got[7], summary);
        assert_eq!(verify(&path).unwrap().records, 8);
        // the window is gone with its summary: the next serve is a full record again
        a.token(cached("127.0.0.1:1000", arm)).await;
        assert_eq!(tokens(&path)[8], cached("127.0.0.1:1000", arm));
    }

    #[tokio::test]
    async fn an_ended_window_is_summarized_and_the_next_serve_opens_another() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let a = Audit::open(&path).unwrap();
        let chain = a.chain.clone().unwrap();
        let arm = "https://management.azure.com/";
        for _ in 0..3 {
            a.token(cached("10.0.0.1:1", arm)).await;
        }
        a.token(cached("10.0.0.2:1", arm)).await;
        // nothing ended yet
        assert!(chain.end_windows(Some(Instant::now())).is_empty());
        // at the end of the window: one summary (the caller with no repeat has none)
        let mut summary = cached("10.0.0.1:1", arm);
        summary.repeats = Some(2);
        summary.since = Some(read(&path).unwrap()[0].time.clone());
        assert_eq!(
            chain.end_windows(Some(Instant::now() + REPEAT_WINDOW)),
            [summary]
        );
        assert!(chain.repeats.lock().unwrap().is_empty());
        a.token(cached("10.0.0.1:1", arm)).await;
        assert_eq!(
            tokens(&path).len(),
            3,
            "a new window opens with a full record"
        );
    }

    #[tokio::test]
    async fn a_serve_after_its_window_ended_writes_the_summary_then_opens_another() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let a = Audit::open(&path).unwrap();
        let chain = a.chain.clone().unwrap();
        let arm = "https://management.azure.com/";
        for _ in 0..3 {
            a.token(cached("10.0.0.1:1", arm)).await;
        }
        // the window ends before the sweep came by
        for w in chain.repeats.lock().unwrap().values_mut() {
            w.ends = Instant::now();
        }
        a.token(cached("10.0.0.1:1", arm)).await;
        let mut summary = cached("10.0.0.1:1", arm);
        summary.repeats = Some(2);
        summary.since = Some(read(&path).unwrap()[0].time.clone());
        assert_eq!(
            tokens(&path),
            [
                cached("10.0.0.1:1", arm),
                summary,
                cached("10.0.0.1:1", arm)
            ]
        );
        // and the new window counts
        a.token(cached("10.0.0.1:1", arm)).await;
        assert_eq!(tokens(&path).len(), 3);
        assert_eq!(verify(&path).unwrap().records, 3);
    }

    #[tokio::test]
    async fn repeat_windows_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let a = Audit::open(&path).unwrap();
        let chain = a.chain.clone().unwrap();
        let arm = "https://management.azure.com/";
        for i in 0..MAX_REPEAT_KEYS {
            assert!(!chain.admit_serve(cached(&format!("10.0.0.1:{i}"), arm)).1);
        }
        // past the bound a new caller's serves are full records, every one
        let extra = cached("10.0.0.2:1", arm);
        assert!(!chain.admit_serve(extra.clone()).1);
        assert!(!chain.admit_serve(extra).1);
        // the open ones still count
        assert!(chain.admit_serve(cached("10.0.0.1:0", arm)).1);
    }

    #[tokio::test]
    async fn a_write_error_is_counted_and_the_chain_continues() {
        // a read-only descriptor in place of the file: the write fails, nothing is numbered
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let a = Audit::open(&path).unwrap();
        a.token(ev(0)).await;
        let chain = a.chain.as_ref().unwrap();
        let good = {
            let mut w = chain.writer.lock().await;
            let ro = File::open(&path).unwrap();
            std::mem::replace(&mut w.f, ro)
        };
        a.token(ev(1)).await;
        chain.writer.lock().await.f = good;
        a.token(ev(2)).await;
        a.flush().await;
        let v = verify(&path).unwrap();
        assert_eq!(v.records, 2, "the failed record is not in the chain");
    }

    #[tokio::test]
    async fn disabled_records_nothing_and_never_a_token() {
        let a = Audit::disabled();
        a.token(ev(1)).await;
        a.flush().await;
        assert!(a.path().is_none());
        // the record types have no field for a token: what a refused record looks like
        let line = render(1, "t", GENESIS, &Event::Token(ev(1)));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort();
        let mut want = [
            "seq", "time", "prev", "type", "surface", "kind", "caller", "audience", "outcome",
            "status", "reason", "hash",
        ];
        want.sort();
        assert_eq!(keys, want);
    }
}
