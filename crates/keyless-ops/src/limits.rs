//! Listener limits: what every listener of a Keyless process (the node's IMDS, NMI, the App
//! Service / Arc / VM-extension endpoints, the server's HTTPS port) enforces so that a slow,
//! idle or noisy peer cannot take the process down for everybody else.
//!
//! - Per connection: the request head within [`defaults::HEADER_READ_TIMEOUT`] and
//!   [`defaults::MAX_HEADER_BYTES`], an answer within [`defaults::REQUEST_TIMEOUT`], a TLS
//!   handshake within [`defaults::HANDSHAKE_TIMEOUT`]. The head's limit is kept by the
//!   connection's own watchdog, not by a timer per request: a connection with no request in
//!   flight is closed [`defaults::HEADER_READ_TIMEOUT`] after its last answer (or its accept) —
//!   a head sent slowly and a keep-alive connection left idle alike.
//! - Per process ([`governor`]): the soft `RLIMIT_NOFILE` is raised to the hard limit and the
//!   listeners together hold at most that minus a reserve (the store, outbound calls, files)
//!   connections, and one caller at most [`ListenerLimits::per_caller`]. A full budget never
//!   stops the accept loop (the kernel backlog keeps draining): the new connection evicts the
//!   oldest idle connection (no request in flight) of the caller holding the most connections
//!   — or its own caller's oldest idle one when that caller is at its cap — and is closed at
//!   once only when nothing is idle. Out of descriptors (`EMFILE`), the loop evicts and backs
//!   off instead of spinning.
//! - Who is a caller ([`Caller`]): the peer IP; for a peer on this namespace's own addresses
//!   (loopback, interface addresses) the UID owning the peer socket *alone*, found with one
//!   `NETLINK_SOCK_DIAG` exact-tuple query per accepted connection — two local users are two
//!   callers, while one user binding 127.0.0.2, 127.0.0.3, … or any other own address stays
//!   one caller (every process of a UID shares its share). A local peer whose owner cannot be
//!   told (its socket already closed: orphaned or `TIME_WAIT`, which the kernel reports as
//!   UID 0) is [`Caller::UnknownLocal`], one caller of its own kind, never a real UID's.
//! - Fair share of token endpoints ([`FairShare`], [`CallerLimiter`]): a token bucket and a
//!   concurrency cap per caller (Azure's IMDS managed-identity limits, 20 requests/s and 5
//!   concurrent, per caller instead of per VM); the surfaces answer 429 + `Retry-After` in
//!   their own error shape.

use axum::body::Body;
use axum::http::{header, HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// Every default of the listener limits, in one place.
pub mod defaults {
    use std::time::Duration;

    /// A connection with no request in flight is closed this long after its last answer (or
    /// its accept): the request head must arrive within it, and it is the keep-alive idle
    /// limit.
    pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
    /// A handler must answer within this (504 otherwise).
    pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
    /// A TLS handshake must complete within this.
    pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    /// Largest request head (hyper's read buffer).
    pub const MAX_HEADER_BYTES: usize = 64 * 1024;
    /// Descriptors kept out of the listeners' budget: at least this many …
    pub const FD_RESERVE_MIN: u64 = 128;
    /// … or this fraction (1/n) of the soft `RLIMIT_NOFILE`, whichever is more.
    pub const FD_RESERVE_DIVISOR: u64 = 4;
    /// Bounds of the listeners' connection budget.
    pub const MIN_CONNECTION_BUDGET: usize = 16;
    pub const MAX_CONNECTION_BUDGET: usize = 65_536;
    /// Connections one caller may hold across the process's listeners (at most half the budget).
    pub const PER_CALLER_CONNECTIONS: usize = 256;
    /// Token requests per second per caller (Azure IMDS: 20/s per VM); 0 = off.
    pub const CALLER_RATE: u32 = 20;
    /// Concurrent token requests per caller (Azure IMDS: 5 per VM); 0 = off.
    pub const CALLER_CONCURRENCY: u32 = 5;
    /// Callers the fair-share table tracks at most (idle ones are forgotten first).
    pub const MAX_TRACKED_CALLERS: usize = 4096;
    /// The kernel accept queue of every listener (std and tokio use 128; the kernel caps it at
    /// `net.core.somaxconn`): room for a burst while the accept loop catches up.
    pub const LISTEN_BACKLOG: u32 = 4096;
    /// Pause of the accept loop after an accept error (out of descriptors and others).
    pub const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(10);
}

// ------------------------------------------------------------------ callers

/// Who is asking, for limits (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Caller {
    /// A peer that is not on this namespace's own addresses: its IP.
    Remote(IpAddr),
    /// A peer on an own address whose socket a known UID owns: that UID, whatever the own
    /// address it connected from (same-UID processes share).
    Local(u32),
    /// A peer on an own address whose owner could not be told: all of them are one caller,
    /// apart from every UID's.
    UnknownLocal,
}

impl Caller {
    /// The UID owning the peer socket, when known.
    pub fn uid(&self) -> Option<u32> {
        match self {
            Caller::Local(u) => Some(*u),
            _ => None,
        }
    }
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Remote(ip) => write!(f, "{ip}"),
            Caller::Local(u) => write!(f, "local uid {u}"),
            Caller::UnknownLocal => f.write_str("unknown-local"),
        }
    }
}

/// The peer of a served request (also in the request's extensions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub addr: SocketAddr,
    pub caller: Caller,
}

// ------------------------------------------------------------------ connection table

/// Result of [`ConnTable::admit`].
#[derive(Debug)]
pub enum Admit<T> {
    /// The connection is in; `evicted` are the payloads of the connections to close for it.
    /// `busy` is its request-in-flight flag: the connection's task sets it without the
    /// table's lock (a request costs no lock), the eviction rule reads it.
    Admitted {
        id: u64,
        busy: Arc<AtomicBool>,
        evicted: Vec<T>,
    },
    /// Nothing could make room: close the new connection.
    Refused,
}

#[derive(Debug)]
struct Conn<T> {
    caller: Caller,
    busy: Arc<AtomicBool>,
    payload: T,
}

/// The connections of one caller (ids grow with age).
#[derive(Debug, Default)]
struct Holder {
    all: BTreeSet<u64>,
}

/// The connections of a process's listeners by caller, and the eviction rule (pure logic).
#[derive(Debug)]
pub struct ConnTable<T> {
    next: u64,
    conns: HashMap<u64, Conn<T>>,
    by_caller: HashMap<Caller, Holder>,
}

impl<T> Default for ConnTable<T> {
    fn default() -> Self {
        ConnTable {
            next: 0,
            conns: HashMap::new(),
            by_caller: HashMap::new(),
        }
    }
}

impl<T> ConnTable<T> {
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Connections `caller` holds.
    pub fn held(&self, caller: &Caller) -> usize {
        self.by_caller.get(caller).map_or(0, |h| h.all.len())
    }

    /// Admit a new (idle) connection of `caller` within `budget` connections in all and
    /// `per_caller` per caller, evicting what the rule says (see the module doc).
    pub fn admit(
        &mut self,
        caller: Caller,
        budget: usize,
        per_caller: usize,
        payload: T,
    ) -> Admit<T> {
        let mut evicted = vec![];
        if self.held(&caller) >= per_caller.max(1) {
            match self.oldest_idle(&caller).and_then(|id| self.remove(id)) {
                Some(p) => evicted.push(p),
                None => return Admit::Refused,
            }
        } else if self.conns.len() >= budget.max(1) {
            match self.victim().and_then(|id| self.remove(id)) {
                Some(p) => evicted.push(p),
                None => return Admit::Refused,
            }
        }
        let id = self.next;
        self.next += 1;
        let busy = Arc::new(AtomicBool::new(false));
        self.conns.insert(
            id,
            Conn {
                caller,
                busy: busy.clone(),
                payload,
            },
        );
        self.by_caller.entry(caller).or_default().all.insert(id);
        Admit::Admitted { id, busy, evicted }
    }

    /// Mark a request in flight (or not) on connection `id` (as its `busy` flag does).
    pub fn set_busy(&self, id: u64, busy: bool) {
        if let Some(c) = self.conns.get(&id) {
            c.busy.store(busy, Ordering::Relaxed);
        }
    }

    /// The oldest connection of `h` with no request in flight.
    fn oldest_idle_of(&self, h: &Holder) -> Option<u64> {
        h.all.iter().copied().find(|id| {
            self.conns
                .get(id)
                .is_some_and(|c| !c.busy.load(Ordering::Relaxed))
        })
    }

    /// Forget connection `id` (closed); its payload if it was still there.
    pub fn remove(&mut self, id: u64) -> Option<T> {
        let c = self.conns.remove(&id)?;
        if let Some(h) = self.by_caller.get_mut(&c.caller) {
            h.all.remove(&id);
            if h.all.is_empty() {
                self.by_caller.remove(&c.caller);
            }
        }
        Some(c.payload)
    }

    /// Take out the connection the rule evicts first when the budget is full: the oldest idle
    /// one of the caller holding the most connections (that has an idle one).
    pub fn evict_one(&mut self) -> Option<T> {
        self.victim().and_then(|id| self.remove(id))
    }

    fn oldest_idle(&self, caller: &Caller) -> Option<u64> {
        self.oldest_idle_of(self.by_caller.get(caller)?)
    }

    /// One pass over the callers: of those with an idle connection, the one holding the most;
    /// among equals the one whose idle connection is oldest (never by who the caller is).
    fn victim(&self) -> Option<u64> {
        let mut best: Option<(usize, u64)> = None;
        for h in self.by_caller.values() {
            let Some(oldest) = self.oldest_idle_of(h) else {
                continue;
            };
            let held = h.all.len();
            if best.is_none_or(|(n, id)| held > n || (held == n && oldest < id)) {
                best = Some((held, oldest));
            }
        }
        best.map(|(_, id)| id)
    }
}

// ------------------------------------------------------------------ fair share

/// Per-caller fair share of the token endpoints. 0 turns a limit off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FairShareConfig {
    /// Requests per second (also the burst: a bucket of this many tokens).
    pub rate: u32,
    /// Requests in flight.
    pub concurrency: u32,
    /// Callers tracked at most.
    pub max_callers: usize,
}

impl Default for FairShareConfig {
    fn default() -> Self {
        FairShareConfig {
            rate: defaults::CALLER_RATE,
            concurrency: defaults::CALLER_CONCURRENCY,
            max_callers: defaults::MAX_TRACKED_CALLERS,
        }
    }
}

impl FairShareConfig {
    /// No limit (benches, tests that hammer an endpoint).
    pub fn off() -> Self {
        FairShareConfig {
            rate: 0,
            concurrency: 0,
            ..Default::default()
        }
    }

    pub fn is_off(&self) -> bool {
        self.rate == 0 && self.concurrency == 0
    }
}

/// The answer of [`FairShare::acquire`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// Refused: try again after this long (a whole number of seconds, at least 1).
    Limited {
        retry_after: Duration,
    },
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    tokens: f64,
    at: Instant,
    in_flight: u32,
}

/// Token bucket + concurrency per caller key; pure logic, time passed in.
#[derive(Debug)]
pub struct FairShare<K> {
    cfg: FairShareConfig,
    slots: HashMap<K, Slot>,
}

impl<K: std::hash::Hash + Eq + Clone> FairShare<K> {
    pub fn new(cfg: FairShareConfig) -> Self {
        FairShare {
            cfg,
            slots: HashMap::new(),
        }
    }

    /// Callers tracked now.
    pub fn tracked(&self) -> usize {
        self.slots.len()
    }

    fn capacity(&self) -> f64 {
        f64::from(self.cfg.rate)
    }

    fn refilled(&self, s: &Slot, now: Instant) -> f64 {
        let dt = now.saturating_duration_since(s.at).as_secs_f64();
        (s.tokens + dt * self.capacity()).min(self.capacity())
    }

    /// Whether a slot says nothing a fresh one would not (no request in flight, bucket full).
    fn stale(&self, s: &Slot, now: Instant) -> bool {
        s.in_flight == 0 && (self.cfg.rate == 0 || self.refilled(s, now) >= self.capacity())
    }

    /// Start a request of `key` at `now`; on [`Verdict::Allowed`] call [`FairShare::release`]
    /// when it ends.
    pub fn acquire(&mut self, key: &K, now: Instant) -> Verdict {
        let one_second = Verdict::Limited {
            retry_after: Duration::from_secs(1),
        };
        if self.cfg.is_off() {
            return Verdict::Allowed;
        }
        if !self.slots.contains_key(key) && self.slots.len() >= self.cfg.max_callers {
            let stale: Vec<K> = self
                .slots
                .iter()
                .filter(|(_, s)| self.stale(s, now))
                .map(|(k, _)| k.clone())
                .collect();
            for k in stale {
                self.slots.remove(&k);
            }
            if self.slots.len() >= self.cfg.max_callers {
                // every tracked caller is active: bounded memory wins
                return one_second;
            }
        }
        let cap = self.capacity();
        let rate = self.cfg.rate;
        let concurrency = self.cfg.concurrency;
        let tokens = match self.slots.get(key) {
            Some(s) => self.refilled(s, now),
            None => cap,
        };
        let slot = self.slots.entry(key.clone()).or_insert(Slot {
            tokens: cap,
            at: now,
            in_flight: 0,
        });
        slot.tokens = tokens;
        slot.at = now;
        if concurrency > 0 && slot.in_flight >= concurrency {
            return one_second;
        }
        if rate > 0 {
            if slot.tokens < 1.0 {
                let wait = (1.0 - slot.tokens) / f64::from(rate);
                return Verdict::Limited {
                    retry_after: Duration::from_secs((wait.ceil() as u64).max(1)),
                };
            }
            slot.tokens -= 1.0;
        }
        slot.in_flight += 1;
        Verdict::Allowed
    }

    /// End a request [`FairShare::acquire`] allowed.
    pub fn release(&mut self, key: &K, now: Instant) {
        let stale = match self.slots.get_mut(key) {
            Some(s) => {
                s.in_flight = s.in_flight.saturating_sub(1);
                s.in_flight == 0
            }
            None => false,
        };
        if stale && self.slots.get(key).is_some_and(|s| self.stale(s, now)) {
            self.slots.remove(key);
        }
    }
}

/// A [`FairShare`] by [`Caller`] shared by the listeners of a process.
#[derive(Debug)]
pub struct CallerLimiter {
    off: bool,
    inner: Mutex<FairShare<Caller>>,
}

/// A request counted by a [`CallerLimiter`]; released when dropped.
#[derive(Debug)]
pub struct Permit {
    held: Option<(Arc<CallerLimiter>, Caller)>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some((l, c)) = self.held.take() {
            l.inner
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .release(&c, Instant::now());
        }
    }
}

impl CallerLimiter {
    pub fn new(cfg: FairShareConfig) -> Arc<Self> {
        Arc::new(CallerLimiter {
            off: cfg.is_off(),
            inner: Mutex::new(FairShare::new(cfg)),
        })
    }

    /// Count a request of `caller`, or say how long it should wait.
    pub fn acquire(self: &Arc<Self>, caller: Caller) -> Result<Permit, Duration> {
        if self.off {
            return Ok(Permit { held: None });
        }
        let v = self
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .acquire(&caller, Instant::now());
        match v {
            Verdict::Allowed => Ok(Permit {
                held: Some((self.clone(), caller)),
            }),
            Verdict::Limited { retry_after } => Err(retry_after),
        }
    }
}

/// The `Retry-After` header value of a wait.
pub fn retry_after_value(d: Duration) -> HeaderValue {
    HeaderValue::from(d.as_secs().max(1))
}

// ------------------------------------------------------------------ the process governor

/// The limits of a process's listeners.
#[derive(Debug, Clone)]
pub struct ListenerLimits {
    pub header_read_timeout: Duration,
    pub request_timeout: Duration,
    pub handshake_timeout: Duration,
    pub max_header_bytes: usize,
    /// Connections all listeners of the process hold at most.
    pub budget: usize,
    /// Connections one caller holds at most.
    pub per_caller: usize,
}

impl ListenerLimits {
    /// The defaults for a process whose soft `RLIMIT_NOFILE` is `nofile`.
    pub fn for_nofile(nofile: u64) -> Self {
        let reserve = defaults::FD_RESERVE_MIN.max(nofile / defaults::FD_RESERVE_DIVISOR);
        let budget = usize::try_from(nofile.saturating_sub(reserve))
            .unwrap_or(usize::MAX)
            .clamp(
                defaults::MIN_CONNECTION_BUDGET,
                defaults::MAX_CONNECTION_BUDGET,
            );
        ListenerLimits {
            header_read_timeout: defaults::HEADER_READ_TIMEOUT,
            request_timeout: defaults::REQUEST_TIMEOUT,
            handshake_timeout: defaults::HANDSHAKE_TIMEOUT,
            max_header_bytes: defaults::MAX_HEADER_BYTES,
            budget,
            per_caller: defaults::PER_CALLER_CONNECTIONS.min((budget / 2).max(1)),
        }
    }
}

/// Raise the soft `RLIMIT_NOFILE` to the hard limit; the soft limit in force afterwards.
pub fn raise_nofile_limit() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 1024;
        }
        if r.rlim_cur < r.rlim_max {
            let want = libc::rlimit {
                rlim_cur: if r.rlim_max == libc::RLIM_INFINITY {
                    1 << 20
                } else {
                    r.rlim_max
                },
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                r.rlim_cur = want.rlim_cur;
            }
        }
    }
    r.rlim_cur
}

/// Bind a listener on `addr` with [`defaults::LISTEN_BACKLOG`] (`SO_REUSEADDR` as tokio's
/// `TcpListener::bind`).
pub async fn bind(addr: impl tokio::net::ToSocketAddrs) -> std::io::Result<TcpListener> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        let s = if a.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        s.set_reuseaddr(true)?;
        match s.bind(a).and_then(|_| s.listen(defaults::LISTEN_BACKLOG)) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address to listen on")
    }))
}

/// One connection's signals: evicted, and when it last finished a request.
#[derive(Debug)]
struct ConnSignal {
    evict: Notify,
    last_ms: AtomicU64,
}

/// The connection budget of a process's listeners (see the module doc).
pub struct Governor {
    limits: ListenerLimits,
    epoch: Instant,
    table: Mutex<ConnTable<Arc<ConnSignal>>>,
    diag: Mutex<Option<sockdiag::SockDiag>>,
}

impl std::fmt::Debug for Governor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Governor")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// The process's governor, shared by every listener; the first call raises `RLIMIT_NOFILE`.
pub fn governor() -> Arc<Governor> {
    static G: OnceLock<Arc<Governor>> = OnceLock::new();
    G.get_or_init(|| {
        let nofile = raise_nofile_limit();
        let limits = ListenerLimits::for_nofile(nofile);
        tracing::debug!(
            nofile,
            budget = limits.budget,
            per_caller = limits.per_caller,
            "listener connection budget"
        );
        Governor::new(limits)
    })
    .clone()
}

impl Governor {
    pub fn new(limits: ListenerLimits) -> Arc<Self> {
        Arc::new(Governor {
            limits,
            epoch: Instant::now(),
            table: Mutex::new(ConnTable::default()),
            diag: Mutex::new(None),
        })
    }

    pub fn limits(&self) -> &ListenerLimits {
        &self.limits
    }

    /// Connections held now.
    pub fn connections(&self) -> usize {
        self.table().len()
    }

    fn table(&self) -> std::sync::MutexGuard<'_, ConnTable<Arc<ConnSignal>>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Who holds `tcp` (accepted from `peer`): the peer IP, or for a local peer the owner UID
    /// of its socket alone ([`Caller::UnknownLocal`] when it cannot be told).
    pub fn caller(&self, tcp: &TcpStream, peer: SocketAddr) -> Caller {
        let ip = peer.ip().to_canonical();
        if !is_own_address(ip) {
            return Caller::Remote(ip);
        }
        match tcp
            .local_addr()
            .ok()
            .and_then(|local| self.socket_uid(peer, local))
        {
            Some(uid) => Caller::Local(uid),
            None => Caller::UnknownLocal,
        }
    }

    /// The UID owning the local TCP socket `src` → `dst` (one netlink round trip).
    pub fn socket_uid(&self, src: SocketAddr, dst: SocketAddr) -> Option<u32> {
        let mut d = self.diag.lock().unwrap_or_else(|p| p.into_inner());
        if d.is_none() {
            *d = sockdiag::SockDiag::open().ok();
        }
        let diag = d.as_mut()?;
        match diag.uid_of(src, dst) {
            Ok(uid) => uid,
            Err(_) => {
                // a broken socket: open a fresh one next time
                *d = None;
                None
            }
        }
    }

    fn admit(self: &Arc<Self>, caller: Caller) -> Option<ConnHandle> {
        let signal = Arc::new(ConnSignal {
            evict: Notify::new(),
            last_ms: AtomicU64::new(self.now_ms()),
        });
        let r = self.table().admit(
            caller,
            self.limits.budget,
            self.limits.per_caller,
            signal.clone(),
        );
        match r {
            Admit::Admitted { id, busy, evicted } => {
                for e in evicted {
                    e.evict.notify_one();
                }
                Some(ConnHandle {
                    gov: self.clone(),
                    id,
                    busy,
                    signal,
                })
            }
            Admit::Refused => None,
        }
    }

    /// Out of descriptors: close the connection the budget rule would evict first.
    fn relieve(&self) {
        if let Some(e) = self.table().evict_one() {
            e.evict.notify_one();
        }
    }
}

/// An admitted connection; leaves the table when dropped.
struct ConnHandle {
    gov: Arc<Governor>,
    id: u64,
    /// A request in flight (the table reads it when it picks a connection to evict).
    busy: Arc<AtomicBool>,
    signal: Arc<ConnSignal>,
}

impl Drop for ConnHandle {
    fn drop(&mut self) {
        self.gov.table().remove(self.id);
    }
}

impl ConnHandle {
    fn busy(self: &Arc<Self>) -> BusyGuard {
        self.busy.store(true, Ordering::Relaxed);
        BusyGuard(self.clone())
    }

    /// Resolves once the connection has had no request in flight for `idle` (one timer per
    /// connection, re-armed only when it fires: a request costs none).
    async fn idle_expired(&self, idle: Duration) {
        loop {
            let last = Duration::from_millis(self.signal.last_ms.load(Ordering::Relaxed));
            let due = self.gov.epoch + last + idle;
            if !self.busy.load(Ordering::Relaxed) && Instant::now() >= due {
                return;
            }
            let wake = due.max(Instant::now() + Duration::from_millis(100));
            tokio::time::sleep_until(wake.into()).await;
        }
    }
}

/// A request in flight on a connection.
struct BusyGuard(Arc<ConnHandle>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        let c = &self.0;
        c.signal.last_ms.store(c.gov.now_ms(), Ordering::Relaxed);
        c.busy.store(false, Ordering::Relaxed);
    }
}

fn is_out_of_files(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
    )
}

/// A plain-text answer as Go's `http.Error` writes it.
pub fn plain_text(status: StatusCode, msg: &str) -> Response {
    let mut r = (status, format!("{msg}\n")).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    r
}

/// Accept plain HTTP/1.1 on `listener` under `gov` until the task is aborted, answering each
/// request with `handler(peer, request)` (the [`Peer`] is also in the request's extensions).
pub fn serve<H, Fut>(
    listener: TcpListener,
    gov: Arc<Governor>,
    what: &'static str,
    handler: H,
) -> tokio::task::JoinHandle<()>
where
    H: Fn(Peer, Request<Body>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response> + Send + 'static,
{
    serve_with(
        listener,
        gov,
        what,
        |tcp| async move { Some((tcp, ())) },
        handler,
    )
}

/// [`serve`] over a wrapped stream: `wrap` (a TLS handshake, bounded by
/// [`ListenerLimits::handshake_timeout`]) turns the accepted TCP stream into the stream HTTP is
/// spoken on and a value put in every request's extensions (the client certificate), or
/// `None` to close it.
pub fn serve_with<W, WF, Io, X, H, Fut>(
    listener: TcpListener,
    gov: Arc<Governor>,
    what: &'static str,
    wrap: W,
    handler: H,
) -> tokio::task::JoinHandle<()>
where
    W: Fn(TcpStream) -> WF + Clone + Send + Sync + 'static,
    WF: Future<Output = Option<(Io, X)>> + Send + 'static,
    Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    X: Clone + Send + Sync + 'static,
    H: Fn(Peer, Request<Body>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response> + Send + 'static,
{
    use hyper_util::rt::TokioIo;
    tokio::spawn(async move {
        let mut last_warn: Option<Instant> = None;
        loop {
            let (tcp, addr) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    if is_out_of_files(&e) {
                        gov.relieve();
                    }
                    if last_warn.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                        tracing::warn!(error = %e, "{what} accept failed");
                        last_warn = Some(Instant::now());
                    }
                    tokio::time::sleep(defaults::ACCEPT_ERROR_BACKOFF).await;
                    continue;
                }
            };
            let caller = gov.caller(&tcp, addr);
            let Some(conn) = gov.admit(caller) else {
                // nothing idle to evict: closed at once (dropped)
                continue;
            };
            let conn = Arc::new(conn);
            let _ = tcp.set_nodelay(true);
            let peer = Peer { addr, caller };
            let (wrap, handler) = (wrap.clone(), handler.clone());
            let limits = gov.limits.clone();
            tokio::spawn(async move {
                let c = conn.clone();
                let work = async move {
                    let Ok(Some((io, x))) =
                        tokio::time::timeout(limits.handshake_timeout, wrap(tcp)).await
                    else {
                        return;
                    };
                    let svc = hyper::service::service_fn(
                        move |mut req: Request<hyper::body::Incoming>| {
                            let busy = c.busy();
                            let handler = handler.clone();
                            req.extensions_mut().insert(x.clone());
                            req.extensions_mut().insert(peer);
                            let req = req.map(Body::new);
                            async move {
                                let _busy = busy;
                                let resp = tokio::time::timeout(
                                    limits.request_timeout,
                                    handler(peer, req),
                                )
                                .await
                                .unwrap_or_else(|_| {
                                    plain_text(StatusCode::GATEWAY_TIMEOUT, "request timed out")
                                });
                                Ok::<_, std::convert::Infallible>(resp)
                            }
                        },
                    );
                    // no hyper timer: the head's limit is the watchdog's below
                    let _ = hyper::server::conn::http1::Builder::new()
                        .max_buf_size(limits.max_header_bytes)
                        .serve_connection(TokioIo::new(io), svc)
                        .await;
                };
                tokio::select! {
                    _ = work => {}
                    _ = conn.signal.evict.notified() => {}
                    _ = conn.idle_expired(limits.header_read_timeout) => {}
                }
            });
        }
    })
}

// ------------------------------------------------------------------ own addresses

/// Whether `ip` is this network namespace's own: loopback, or an address of one of its
/// interfaces (`getifaddrs`). A node's own processes reach its IMDS from such an address; a
/// pod never does (its address lives in its own namespace).
pub fn is_own_address(ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    if ip.is_loopback() {
        return true;
    }
    static OWN: Mutex<Option<(Instant, Vec<IpAddr>)>> = Mutex::new(None);
    let mut own = OWN.lock().unwrap_or_else(|p| p.into_inner());
    match own.as_ref() {
        // a known own address is trusted for a while; an unknown one rereads the interfaces
        // (an address just added), at most every OWN_ADDRESSES_TTL / 10
        Some((at, list)) if list.contains(&ip) && at.elapsed() < OWN_ADDRESSES_TTL => true,
        Some((at, _)) if at.elapsed() < OWN_ADDRESSES_TTL / 10 => false,
        _ => {
            let list = own_addresses();
            let found = list.contains(&ip);
            *own = Some((Instant::now(), list));
            found
        }
    }
}

/// How long the node's own addresses are cached for [`is_own_address`].
const OWN_ADDRESSES_TTL: Duration = Duration::from_secs(5);

/// The addresses of this namespace's interfaces (`getifaddrs`, a few tens of µs).
fn own_addresses() -> Vec<IpAddr> {
    let mut out = vec![];
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list freed below with freeifaddrs; every pointer
    // read is checked for null and only read while the list is alive.
    unsafe {
        if libc::getifaddrs(&mut head) != 0 {
            return out;
        }
        let mut cur = head;
        while !cur.is_null() {
            let a = (*cur).ifa_addr;
            if !a.is_null() {
                match i32::from((*a).sa_family) {
                    libc::AF_INET => {
                        let s = &*(a as *const libc::sockaddr_in);
                        out.push(IpAddr::from(u32::from_be(s.sin_addr.s_addr).to_be_bytes()));
                    }
                    libc::AF_INET6 => {
                        let s = &*(a as *const libc::sockaddr_in6);
                        out.push(IpAddr::from(s.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(head);
    }
    out
}

// ------------------------------------------------------------------ NETLINK_SOCK_DIAG

/// The owner of a local TCP socket by its exact 4-tuple (`inet_diag`, one round trip).
pub use crate::sockdiag;

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(last: u8) -> Caller {
        Caller::Remote(IpAddr::from([10, 0, 0, last]))
    }

    fn admitted<T: std::fmt::Debug>(a: Admit<T>) -> (u64, Vec<T>) {
        match a {
            Admit::Admitted { id, evicted, .. } => (id, evicted),
            Admit::Refused => panic!("refused"),
        }
    }

    #[test]
    fn a_full_budget_evicts_the_oldest_idle_connection_of_the_biggest_holder() {
        let (a, b, c) = (caller(1), caller(2), caller(3));
        let mut t = ConnTable::default();
        // a holds 3, b holds 2: budget 5 full
        let a0 = admitted(t.admit(a, 5, 10, "a0")).0;
        admitted(t.admit(b, 5, 10, "b0"));
        admitted(t.admit(a, 5, 10, "a1"));
        admitted(t.admit(b, 5, 10, "b1"));
        admitted(t.admit(a, 5, 10, "a2"));
        t.set_busy(a0, true);
        // c comes: a's oldest idle one goes (a0 is busy)
        let (_, ev) = admitted(t.admit(c, 5, 10, "c0"));
        assert_eq!(ev, ["a1"]);
        assert_eq!((t.len(), t.held(&a), t.held(&b), t.held(&c)), (5, 2, 2, 1));
        // a and b tie at 2: the older idle connection goes (b0, older than a2), whatever the
        // callers' addresses (a's is lower)
        let (_, ev) = admitted(t.admit(c, 5, 10, "c1"));
        assert_eq!(ev, ["b0"]);
        // a and c tie at 2: a2 is older than c0, so a2 goes
        let (_, ev) = admitted(t.admit(c, 5, 10, "c2"));
        assert_eq!(ev, ["a2"]);
        // now c holds the most (3): its own oldest idle one goes
        let (_, ev) = admitted(t.admit(b, 5, 10, "b2"));
        assert_eq!(ev, ["c0"]);
        // a busy connection turning idle is evictable again; a busy one never is
        t.set_busy(a0, false);
        t.set_busy(a0, true);
        assert_eq!(t.held(&a), 1);
    }

    #[test]
    fn ties_go_by_connection_age_not_by_caller() {
        // the same shape with the addresses the other way round: the same connection goes
        for (x, y) in [(caller(1), caller(9)), (caller(9), caller(1))] {
            let mut t = ConnTable::default();
            admitted(t.admit(y, 4, 10, "y0"));
            admitted(t.admit(x, 4, 10, "x0"));
            admitted(t.admit(x, 4, 10, "x1"));
            admitted(t.admit(y, 4, 10, "y1"));
            let (_, ev) = admitted(t.admit(caller(5), 4, 10, "new"));
            assert_eq!(ev, ["y0"], "{x} {y}");
        }
    }

    #[test]
    fn eviction_is_one_pass_over_many_callers() {
        // a budget as LimitNOFILE=65536 gives: ~49k callers holding one connection each, a
        // few holding two; every newcomer evicts at once, in the same order as the rule says
        let budget = 49_152;
        let mut t = ConnTable::default();
        for i in 0..budget - 8 {
            let ip = IpAddr::from((0x0a00_0000u32 + i as u32).to_be_bytes());
            admitted(t.admit(Caller::Remote(ip), budget, 256, i));
        }
        let big: Vec<Caller> = (0..4u8)
            .map(|k| Caller::Remote(IpAddr::from([10, 200, 0, k])))
            .collect();
        for (k, c) in big.iter().enumerate() {
            admitted(t.admit(*c, budget, 256, 1_000_000 + k));
            admitted(t.admit(*c, budget, 256, 2_000_000 + k));
        }
        assert_eq!(t.len(), budget);
        let start = Instant::now();
        let mut gone = vec![];
        for k in 0..200 {
            let ip = IpAddr::from((0x0b00_0000u32 + k).to_be_bytes());
            let (_, ev) = admitted(t.admit(Caller::Remote(ip), budget, 256, 3_000_000));
            gone.extend(ev);
        }
        // the four two-connection holders lose their older connection first, oldest first,
        // then the one-connection callers go oldest first
        assert_eq!(gone[..4], [1_000_000, 1_000_001, 1_000_002, 1_000_003]);
        assert_eq!(gone[4..8], [0, 1, 2, 3]);
        assert_eq!(t.len(), budget);
        // one pass (not a sort) per accept: generous even for a debug build
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn a_caller_at_its_cap_replaces_its_own_oldest_idle_connection() {
        let (a, b) = (Caller::Local(0), Caller::Local(1000));
        let mut t = ConnTable::default();
        let a0 = admitted(t.admit(a, 100, 2, 0)).0;
        admitted(t.admit(a, 100, 2, 1));
        // the cap is per caller: another UID is not affected
        let (_, ev) = admitted(t.admit(b, 100, 2, 10));
        assert!(ev.is_empty());
        let (_, ev) = admitted(t.admit(a, 100, 2, 2));
        assert_eq!(ev, [0]);
        assert_eq!(t.held(&a), 2);
        assert_eq!(t.remove(a0), None, "already gone");
        // nothing of a idle: the newcomer is refused, nothing is evicted
        let ids: Vec<u64> = t.by_caller[&a].all.iter().copied().collect();
        for id in ids {
            t.set_busy(id, true);
        }
        assert!(matches!(t.admit(a, 100, 2, 3), Admit::Refused));
        assert_eq!(t.held(&a), 2);
        // an unknown local owner is a caller of its own: not root's, not anybody's cap
        let (_, ev) = admitted(t.admit(Caller::UnknownLocal, 100, 2, 4));
        assert!(ev.is_empty());
        assert_eq!(
            (t.held(&Caller::Local(0)), t.held(&Caller::UnknownLocal)),
            (2, 1)
        );
    }

    #[test]
    fn nothing_idle_refuses_and_removal_frees_room() {
        let a = caller(1);
        let mut t = ConnTable::default();
        let x = admitted(t.admit(a, 1, 10, ())).0;
        t.set_busy(x, true);
        assert!(matches!(t.admit(caller(2), 1, 10, ()), Admit::Refused));
        assert_eq!(t.evict_one(), None);
        t.remove(x);
        assert!(t.is_empty());
        admitted(t.admit(caller(2), 1, 10, ()));
    }

    fn share(rate: u32, concurrency: u32, max_callers: usize) -> FairShare<u32> {
        FairShare::new(FairShareConfig {
            rate,
            concurrency,
            max_callers,
        })
    }

    #[test]
    fn the_bucket_allows_the_rate_and_says_when_to_retry() {
        let t0 = Instant::now();
        let mut f = share(20, 0, 10);
        for _ in 0..20 {
            assert_eq!(f.acquire(&1, t0), Verdict::Allowed);
            f.release(&1, t0);
        }
        let limited = Verdict::Limited {
            retry_after: Duration::from_secs(1),
        };
        assert_eq!(f.acquire(&1, t0), limited);
        // another caller has its own bucket
        assert_eq!(f.acquire(&2, t0), Verdict::Allowed);
        f.release(&2, t0);
        // 50 ms refill one token at 20/s
        let t1 = t0 + Duration::from_millis(50);
        assert_eq!(f.acquire(&1, t1), Verdict::Allowed);
        f.release(&1, t1);
        assert_eq!(f.acquire(&1, t1), limited);
        // a slow rate: the wait is rounded up to whole seconds
        let mut f = share(1, 0, 10);
        assert_eq!(f.acquire(&1, t0), Verdict::Allowed);
        assert_eq!(
            f.acquire(&1, t0 + Duration::from_millis(10)),
            Verdict::Limited {
                retry_after: Duration::from_secs(1)
            }
        );
    }

    #[test]
    fn concurrency_is_capped_per_caller() {
        let t0 = Instant::now();
        let mut f = share(0, 5, 10);
        for _ in 0..5 {
            assert_eq!(f.acquire(&1, t0), Verdict::Allowed);
        }
        assert!(matches!(f.acquire(&1, t0), Verdict::Limited { .. }));
        assert_eq!(f.acquire(&2, t0), Verdict::Allowed);
        f.release(&1, t0);
        assert_eq!(f.acquire(&1, t0), Verdict::Allowed);
    }

    #[test]
    fn memory_is_bounded_and_idle_callers_are_forgotten() {
        let t0 = Instant::now();
        let mut f = share(20, 5, 3);
        for k in 0..3 {
            assert_eq!(f.acquire(&k, t0), Verdict::Allowed);
        }
        // three callers in flight: a fourth cannot be tracked
        assert!(matches!(f.acquire(&3, t0), Verdict::Limited { .. }));
        assert_eq!(f.tracked(), 3);
        // one finishes; once its bucket is full again it is forgotten to make room
        f.release(&0, t0);
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(f.acquire(&3, t1), Verdict::Allowed);
        assert_eq!(f.tracked(), 3);
        // off: nothing tracked at all
        let mut f = share(0, 0, 1);
        for k in 0..100 {
            assert_eq!(f.acquire(&k, t0), Verdict::Allowed);
        }
        assert_eq!(f.tracked(), 0);
    }

    #[test]
    fn budget_follows_the_file_limit() {
        let l = ListenerLimits::for_nofile(1024);
        assert_eq!((l.budget, l.per_caller), (768, 256));
        let l = ListenerLimits::for_nofile(256);
        assert_eq!((l.budget, l.per_caller), (128, 64));
        let l = ListenerLimits::for_nofile(100);
        assert_eq!(l.budget, defaults::MIN_CONNECTION_BUDGET);
        let l = ListenerLimits::for_nofile(1 << 30);
        assert_eq!(l.budget, defaults::MAX_CONNECTION_BUDGET);
    }

    #[test]
    fn own_addresses_are_this_namespaces() {
        assert!(is_own_address("127.0.0.1".parse().unwrap()));
        assert!(is_own_address("::1".parse().unwrap()));
        assert!(is_own_address("::ffff:127.0.0.1".parse().unwrap()));
        // TEST-NET-2: on no interface
        assert!(!is_own_address("198.51.100.77".parse().unwrap()));
        if let Ok(s) = std::net::UdpSocket::bind("0.0.0.0:0") {
            if s.connect("192.0.2.1:9").is_ok() {
                if let Ok(a) = s.local_addr() {
                    assert!(is_own_address(a.ip()), "{a}");
                }
            }
        }
    }

    #[tokio::test]
    async fn one_uid_on_several_own_addresses_is_one_caller() {
        let gov = Governor::new(ListenerLimits::for_nofile(1024));
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        // SAFETY: getuid has no preconditions
        let me = unsafe { libc::getuid() };
        let mut held = vec![];
        for src in ["127.0.0.1", "127.0.0.2", "127.0.0.3"] {
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            s.bind(SocketAddr::new(src.parse().unwrap(), 0)).unwrap();
            held.push(s.connect(addr).await.unwrap());
            let (tcp, peer) = l.accept().await.unwrap();
            assert_eq!(peer.ip().to_string(), src);
            assert_eq!(gov.caller(&tcp, peer), Caller::Local(me), "{src}");
            held.push(tcp);
        }
        // a peer whose socket is gone (its owner cannot be told) is not a UID's
        let s = TcpStream::connect(addr).await.unwrap();
        let (tcp, peer) = l.accept().await.unwrap();
        drop(s);
        // the client end goes FIN_WAIT2 with no descriptor (inode 0), then away
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(gov.caller(&tcp, peer), Caller::UnknownLocal);
    }

    #[tokio::test]
    async fn a_slow_head_and_an_idle_keep_alive_connection_are_closed() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut limits = ListenerLimits::for_nofile(1024);
        limits.header_read_timeout = Duration::from_millis(300);
        let gov = Governor::new(limits);
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let task = serve(l, gov, "test", |_peer: Peer, _req| async move {
            (StatusCode::OK, "ok").into_response()
        });
        // (a connection the watchdog never closed would hang here: the test fails by timeout)
        let closed = |mut s: TcpStream| async move {
            let mut rest = vec![];
            tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
                .await
                .expect("the connection was not closed")
                .ok();
            String::from_utf8_lossy(&rest).into_owned()
        };
        // half a head, trickled
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n")
            .await
            .unwrap();
        // a keep-alive connection that got its answer, then says nothing
        let mut idle = TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut first = [0u8; 12];
        idle.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"HTTP/1.1 200");
        assert_eq!(closed(slow).await, "", "no answer to half a head");
        assert!(closed(idle).await.ends_with("ok"));
        // a request that keeps the connection busy longer than the head's limit is answered
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let mut limits = ListenerLimits::for_nofile(1024);
        limits.header_read_timeout = Duration::from_millis(300);
        let slow_answer = serve(
            l,
            Governor::new(limits),
            "test",
            |_peer: Peer, _req| async move {
                tokio::time::sleep(Duration::from_millis(900)).await;
                (StatusCode::OK, "late").into_response()
            },
        );
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        assert!(closed(s).await.ends_with("late"));
        task.abort();
        slow_answer.abort();
    }

    #[tokio::test]
    async fn a_full_budget_keeps_accepting_and_closes_idle_connections() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut limits = ListenerLimits::for_nofile(1024);
        limits.budget = 4;
        let gov = Governor::new(limits);
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let task = serve(l, gov.clone(), "test", |peer: Peer, _req| async move {
            (StatusCode::OK, peer.caller.to_string()).into_response()
        });
        let mut idle = vec![];
        for _ in 0..20 {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
            .await
            .unwrap()
            .unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        // SAFETY: getuid has no preconditions
        let me = unsafe { libc::getuid() };
        assert!(out.ends_with(&format!("local uid {me}")), "{out}");
        assert!(gov.connections() <= 4);
        // the oldest idle ones were closed by the server
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), idle[0].read(&mut b))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0);
        task.abort();
    }
}
