//! The plain-HTTP listeners of the agent that local callers (and, through NMI's redirect, pods)
//! reach: the node's IMDS and NMI. Each connection is served by hyper with bounds a slow or
//! idle peer cannot outlast — headers within [`HEADER_READ_TIMEOUT`] (hyper runs that timer
//! whenever it waits for a request head, so it also closes a keep-alive connection idle that
//! long) and [`MAX_HEADER_BYTES`], an answer within [`REQUEST_TIMEOUT`], at most
//! [`MAX_CONNECTIONS`] connections per listener group — and the handler is given the peer's
//! address, which is what decides who is asking.

use axum::body::Body;
use axum::http::{header, HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
pub const MAX_CONNECTIONS: usize = 4096;
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// A plain-text error as Go's `http.Error` writes it.
pub(crate) fn text(status: StatusCode, msg: &str) -> Response {
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

/// Accept on `listener` until the task is aborted, answering each request with
/// `handler(peer, request)`.
pub(crate) fn serve<F, Fut>(
    listener: tokio::net::TcpListener,
    limit: Arc<tokio::sync::Semaphore>,
    what: &'static str,
    handler: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn(SocketAddr, Request<Body>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response> + Send + 'static,
{
    use hyper_util::rt::{TokioIo, TokioTimer};
    tokio::spawn(async move {
        loop {
            let Ok(permit) = limit.clone().acquire_owned().await else {
                return;
            };
            let (stream, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "{what} accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let handler = handler.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let handler = handler.clone();
                    async move {
                        let req = req.map(Body::new);
                        let resp = tokio::time::timeout(REQUEST_TIMEOUT, handler(peer, req))
                            .await
                            .unwrap_or_else(|_| {
                                text(StatusCode::GATEWAY_TIMEOUT, "request timed out")
                            });
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .max_buf_size(MAX_HEADER_BYTES)
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    })
}

/// Whether `ip` is this network namespace's own: loopback, or an address of one of its
/// interfaces (`getifaddrs`). A node's own processes reach its IMDS from such an address; a
/// pod never does (its address lives in its own namespace).
pub fn is_own_address(ip: std::net::IpAddr) -> bool {
    let ip = ip.to_canonical();
    if ip.is_loopback() {
        return true;
    }
    static OWN: std::sync::Mutex<Option<(std::time::Instant, Vec<std::net::IpAddr>)>> =
        std::sync::Mutex::new(None);
    let mut own = OWN.lock().unwrap_or_else(|p| p.into_inner());
    match own.as_ref() {
        // a known own address is trusted for a while; an unknown one rereads the interfaces
        // (an address just added), at most every OWN_ADDRESSES_TTL
        Some((at, list)) if list.contains(&ip) && at.elapsed() < OWN_ADDRESSES_TTL => true,
        Some((at, _)) if at.elapsed() < OWN_ADDRESSES_TTL / 10 => false,
        _ => {
            let list = own_addresses();
            let found = list.contains(&ip);
            *own = Some((std::time::Instant::now(), list));
            found
        }
    }
}

/// How long the node's own addresses are cached for [`is_own_address`] (node processes reach
/// the IMDS at 169.254.169.254 from that address, so every host request asks).
const OWN_ADDRESSES_TTL: Duration = Duration::from_secs(5);

/// The addresses of this namespace's interfaces (`getifaddrs`, a few tens of µs).
fn own_addresses() -> Vec<std::net::IpAddr> {
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
                        out.push(std::net::IpAddr::from(
                            u32::from_be(s.sin_addr.s_addr).to_be_bytes(),
                        ));
                    }
                    libc::AF_INET6 => {
                        let s = &*(a as *const libc::sockaddr_in6);
                        out.push(std::net::IpAddr::from(s.sin6_addr.s6_addr));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_addresses_are_this_namespaces() {
        assert!(is_own_address("127.0.0.1".parse().unwrap()));
        assert!(is_own_address("::1".parse().unwrap()));
        assert!(is_own_address("::ffff:127.0.0.1".parse().unwrap()));
        // TEST-NET-2: on no interface
        assert!(!is_own_address("198.51.100.77".parse().unwrap()));
        // an address this namespace has (the one it would reach the outside from), if any
        if let Ok(s) = std::net::UdpSocket::bind("0.0.0.0:0") {
            if s.connect("192.0.2.1:9").is_ok() {
                if let Ok(a) = s.local_addr() {
                    assert!(is_own_address(a.ip()), "{a}");
                }
            }
        }
    }
}
