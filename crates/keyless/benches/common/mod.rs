//! What the bench binaries share (`mod common;` in each): environment knobs, the HTTP/1.1
//! keep-alive load generator, a bare hyper server as the baseline, and an in-process Keyless
//! server on a temp data dir.
#![allow(dead_code)] // each bench uses its own subset

use keyless_core::clock::SystemClock;
use rustls::pki_types::ServerName;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub fn env_u64(k: &str, d: u64) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

/// HTTP/1.1 keep-alive GET load: `conns` connections for `secs`, over TLS when `tls` is given
/// (connector and server name); returns requests/s.
/// `baseline` and `subject` measured alternately `BENCH_ROUNDS` times (3 unless set): the pair
/// whose ratio (subject / baseline) is the median, and every ratio in measuring order — on a
/// noisy machine a disturbance lands in one pair, not in the figure.
pub async fn paired<B, BF, S, SF>(mut baseline: B, mut subject: S) -> (f64, f64, Vec<f64>)
where
    B: FnMut() -> BF,
    BF: std::future::Future<Output = f64>,
    S: FnMut() -> SF,
    SF: std::future::Future<Output = f64>,
{
    let rounds = env_u64("BENCH_ROUNDS", 3).max(1) as usize;
    let mut pairs = vec![];
    for _ in 0..rounds {
        let b = baseline().await;
        let x = subject().await;
        pairs.push((b, x));
    }
    let ratios: Vec<f64> = pairs.iter().map(|(b, x)| x / b).collect();
    let mut order: Vec<usize> = (0..rounds).collect();
    order.sort_by(|&i, &j| ratios[i].total_cmp(&ratios[j]));
    let (b, x) = pairs[order[rounds / 2]];
    (b, x, ratios)
}

/// The ratios of [`paired`] as printed: `(median of 3: 0.80 0.81 0.83)`.
pub fn rounds_note(ratios: &[f64]) -> String {
    if ratios.len() < 2 {
        return String::new();
    }
    let mut r = ratios.to_vec();
    r.sort_by(f64::total_cmp);
    let all: Vec<String> = r.iter().map(|x| format!("{x:.2}")).collect();
    format!(" (median of {}: {})", r.len(), all.join(" "))
}

pub async fn load_get(
    addr: SocketAddr,
    request: String,
    conns: usize,
    secs: u64,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
) -> f64 {
    if tls.is_none() {
        let mut streams = vec![];
        for _ in 0..conns {
            streams.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
        }
        return load_streams(streams, request, secs).await;
    }
    let done = Arc::new(AtomicU64::new(0));
    let stop = Instant::now() + Duration::from_secs(secs);
    let mut tasks = vec![];
    for _ in 0..conns {
        let done = done.clone();
        let req = request.clone();
        let (connector, name) = tls.clone().expect("TLS");
        tasks.push(tokio::spawn(async move {
            let s = tokio::net::TcpStream::connect(addr).await.expect("connect");
            s.set_nodelay(true).ok();
            let s = connector.connect(name, s).await.expect("TLS handshake");
            drive(s, req.as_bytes(), stop, &done).await
        }));
    }
    for t in tasks {
        t.await.expect("load task");
    }
    done.load(Ordering::Relaxed) as f64 / secs as f64
}

/// The same load on connections the caller opened (e.g. from another network namespace):
/// one task per stream for `secs`; returns requests/s.
pub async fn load_streams(streams: Vec<tokio::net::TcpStream>, request: String, secs: u64) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let stop = Instant::now() + Duration::from_secs(secs);
    let mut tasks = vec![];
    for s in streams {
        let done = done.clone();
        let req = request.clone();
        s.set_nodelay(true).ok();
        tasks.push(tokio::spawn(async move {
            drive(s, req.as_bytes(), stop, &done).await
        }));
    }
    for t in tasks {
        t.await.expect("load task");
    }
    done.load(Ordering::Relaxed) as f64 / secs as f64
}

/// One load connection: send `req`, read one response (headers, then Content-Length bytes),
/// repeat until `stop`.
pub async fn drive<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    req: &[u8],
    stop: Instant,
    done: &AtomicU64,
) {
    let mut buf = vec![0u8; 64 * 1024];
    while Instant::now() < stop {
        s.write_all(req).await.expect("write");
        s.flush().await.expect("flush");
        let (head, _) = read_response(&mut s, &mut buf).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        done.fetch_add(1, Ordering::Relaxed);
    }
}

/// Read one HTTP/1.1 response into `buf`: the head (status line and headers, as received),
/// then Content-Length bytes of body; returns the head and where the body lies in `buf`.
pub async fn read_response<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut [u8],
) -> (String, std::ops::Range<usize>) {
    let mut have = 0;
    let (head, body) = loop {
        let n = s.read(&mut buf[have..]).await.expect("read");
        assert!(n > 0, "connection closed");
        have += n;
        if let Some(p) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..p]).into_owned();
            let len: usize = header(&head, "content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            break (head, p + 4..p + 4 + len);
        }
    };
    while have < body.end {
        let n = s.read(&mut buf[have..]).await.expect("read body");
        assert!(n > 0);
        have += n;
    }
    (head, body)
}

/// The value of header `name` (case-insensitive) in a response head.
pub fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// One GET over a fresh plain-HTTP connection: the response head and body.
pub async fn get_once(addr: SocketAddr, request: &str) -> (String, String) {
    let s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    get_on(s, request).await
}

/// One request on `s`: the response head and body.
pub async fn get_on(mut s: tokio::net::TcpStream, request: &str) -> (String, String) {
    s.write_all(request.as_bytes()).await.expect("write");
    let mut buf = vec![0u8; 64 * 1024];
    let (head, body) = read_response(&mut s, &mut buf).await;
    (head, String::from_utf8_lossy(&buf[body]).into_owned())
}

/// A bare hyper server answering every request with `body` (JSON), over TLS when `tls` is
/// given.
pub async fn bare_server(body: String, tls: Option<tokio_rustls::TlsAcceptor>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    bare_server_on(listener, body, tls)
}

/// [`bare_server`] on a listener the caller bound (e.g. in another network namespace).
pub fn bare_server_on(
    listener: tokio::net::TcpListener,
    body: String,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> SocketAddr {
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (body, tls) = (body.clone(), tls.clone());
            tokio::spawn(async move {
                match tls {
                    Some(acceptor) => {
                        tcp.set_nodelay(true).ok(); // as the Keyless listener does
                        if let Ok(s) = acceptor.accept(tcp).await {
                            serve_bare(s, body).await
                        }
                    }
                    None => serve_bare(tcp, body).await,
                }
            });
        }
    });
    addr
}

async fn serve_bare<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(io: S, body: String) {
    let svc = hyper::service::service_fn(move |_req| {
        let body = body.clone();
        async move {
            Ok::<_, std::convert::Infallible>(
                hyper::Response::builder()
                    .header("content-type", "application/json")
                    .body(body)
                    .unwrap(),
            )
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(io), svc)
        .await;
}

/// A Keyless server on a temp data dir, trusting `issuer_ca` for federation.
pub async fn start_server(
    issuer_ca: Option<String>,
) -> (tempfile::TempDir, keyless_server::RunningServer) {
    let dir = tempfile::tempdir().unwrap();
    let store = keyless_store::Store::sqlite(
        &dir.path().join("keyless.db"),
        keyless_store::Kek::load_or_create(&dir.path().join("kek")).unwrap(),
    )
    .unwrap();
    let mut cfg =
        keyless_server::Config::new(dir.path().to_path_buf(), "127.0.0.1:0".parse().unwrap());
    cfg.issuer_ca_pem = issuer_ca;
    let srv = keyless_server::start(cfg, store, Arc::new(SystemClock::new()))
        .await
        .unwrap();
    (dir, srv)
}

/// One timed load run: requests/s and every request's latency (request written → whole
/// response read), sorted.
#[derive(Debug, Clone)]
pub struct Timed {
    pub rps: f64,
    pub latencies: Vec<Duration>,
}

impl Timed {
    /// Nearest-rank percentile `p` (0..=100) of the latencies, in ms.
    pub fn pct_ms(&self, p: f64) -> f64 {
        let v = &self.latencies;
        if v.is_empty() {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
        v[rank.clamp(1, v.len()) - 1].as_secs_f64() * 1000.0
    }
}

/// [`load_get`] (any request: a POST with its body works the same) timing each request.
pub async fn load_timed(
    addr: SocketAddr,
    request: String,
    conns: usize,
    secs: u64,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
) -> Timed {
    let stop = Instant::now() + Duration::from_secs(secs);
    let mut tasks = vec![];
    for _ in 0..conns {
        let req = request.clone();
        let tls = tls.clone();
        tasks.push(tokio::spawn(async move {
            let s = tokio::net::TcpStream::connect(addr).await.expect("connect");
            s.set_nodelay(true).ok();
            match tls {
                Some((connector, name)) => {
                    let s = connector.connect(name, s).await.expect("TLS handshake");
                    drive_timed(s, req.as_bytes(), stop).await
                }
                None => drive_timed(s, req.as_bytes(), stop).await,
            }
        }));
    }
    let mut latencies = vec![];
    for t in tasks {
        latencies.extend(t.await.expect("load task"));
    }
    latencies.sort_unstable();
    Timed {
        rps: latencies.len() as f64 / secs as f64,
        latencies,
    }
}

/// [`drive`], returning each request's latency.
pub async fn drive_timed<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    req: &[u8],
    stop: Instant,
) -> Vec<Duration> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = vec![];
    while Instant::now() < stop {
        let t0 = Instant::now();
        s.write_all(req).await.expect("write");
        s.flush().await.expect("flush");
        let (head, _) = read_response(&mut s, &mut buf).await;
        out.push(t0.elapsed());
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    }
    out
}

/// [`paired`] for runs that yield more than a rate (e.g. [`Timed`], with latencies; `rate`
/// reads a run's rate), for `n` subjects against one baseline: each round measures the baseline right
/// before each subject (b, s0, b, s1, …), so a drift over the run lands on every subject
/// alike; per subject, the median pair and its ratios in measuring order.
pub async fn paired_each<T, B, BF, S, SF, R>(
    mut baseline: B,
    n: usize,
    mut subject: S,
    rate: R,
) -> Vec<(T, T, Vec<f64>)>
where
    B: FnMut() -> BF,
    BF: std::future::Future<Output = T>,
    S: FnMut(usize) -> SF,
    SF: std::future::Future<Output = T>,
    R: Fn(&T) -> f64,
{
    let rounds = env_u64("BENCH_ROUNDS", 3).max(1) as usize;
    let mut pairs: Vec<Vec<(T, T)>> = (0..n).map(|_| vec![]).collect();
    for _ in 0..rounds {
        for (i, p) in pairs.iter_mut().enumerate() {
            let b = baseline().await;
            let x = subject(i).await;
            p.push((b, x));
        }
    }
    pairs
        .into_iter()
        .map(|mut p| {
            let ratios: Vec<f64> = p.iter().map(|(b, x)| rate(x) / rate(b)).collect();
            let mut order: Vec<usize> = (0..rounds).collect();
            order.sort_by(|&i, &j| ratios[i].total_cmp(&ratios[j]));
            let (b, x) = p.swap_remove(order[rounds / 2]);
            (b, x, ratios)
        })
        .collect()
}

/// Raw RS256 signatures/s on `threads` threads.
pub fn raw_rs256(threads: usize, secs: u64) -> f64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let (ca, _) = keyless_pki::Ca::generate("bench", now).unwrap();
    let (key, der) = keyless_pki::SigningKey::generate(&ca, now, 86_400).unwrap();
    let cert = key.cert_der().to_vec();
    let input = vec![b'a'; 700];
    let total = Arc::new(AtomicU64::new(0));
    let stop = Instant::now() + Duration::from_secs(secs);
    std::thread::scope(|s| {
        for _ in 0..threads {
            let (der, cert, input, total) = (&der, &cert, &input, total.clone());
            s.spawn(move || {
                let k = keyless_pki::SigningKey::load(der, cert).unwrap();
                let mut n = 0;
                while Instant::now() < stop {
                    k.sign(input).unwrap();
                    n += 1;
                }
                total.fetch_add(n, Ordering::Relaxed);
            });
        }
    });
    total.load(Ordering::Relaxed) as f64 / secs as f64
}
