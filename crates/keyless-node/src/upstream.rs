//! The agent's way to the server when there are several replicas (`--server A,B`): every call
//! (join, rotate, identities sync, token) goes through [`send`], which runs it over
//! [`keyless_ops::failover::Endpoints`] — the current URL first, the next ones when an attempt
//! got no answer (no connection, TLS handshake failure, a timeout, the connection dropped before
//! the answer) or a 502/503/504; a definite answer (2xx, 4xx, any other status) ends the call.
//! The az-like CLI sends its requests the same way.

use keyless_ops::failover::Endpoints;
use std::time::Duration;

/// Connect timeout of each attempt when there are several URLs: a replica that does not
/// accept within it is passed over quickly. With one URL the clients keep their own.
pub const FAILOVER_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

pub use keyless_ops::failover::{error_chain, retry_reason};

/// Send the request `make` builds for the full URL `{base}{path}` of each base URL tried, over
/// `servers`; the full URL of the last attempt and its outcome.
pub async fn send<F>(
    servers: &Endpoints,
    path: &str,
    mut make: F,
) -> (String, reqwest::Result<reqwest::Response>)
where
    F: FnMut(&str) -> reqwest::RequestBuilder,
{
    servers
        .call(
            |base| {
                let url = format!("{base}{path}");
                let req = make(&url);
                async move {
                    let r = req.send().await;
                    (url, r)
                }
            },
            |(_, r)| retry_reason(r),
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plain HTTP server answering every request with `status`; its base URL.
    async fn answering(status: u16) -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let app = axum::Router::new()
            .fallback(move || async move { axum::http::StatusCode::from_u16(status).unwrap() });
        tokio::spawn(async move { axum::serve(l, app).await });
        format!("http://{addr}")
    }

    /// A server that accepts connections and closes them without answering.
    async fn hanging_up() -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                drop(s);
            }
        });
        format!("http://{addr}")
    }

    /// A port nothing listens on (connection refused).
    fn closed() -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    }

    fn client() -> reqwest::Client {
        reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(FAILOVER_CONNECT_TIMEOUT)
            .build()
            .unwrap()
    }

    #[tokio::test]
    async fn no_answer_and_502_503_504_move_on_a_definite_answer_does_not() {
        let c = client();
        let (dead, hangup, ok) = (closed(), hanging_up().await, answering(200).await);
        let mut unavailable = vec![];
        for s in [502, 503, 504] {
            unavailable.push(answering(s).await);
        }
        let mut urls = vec![dead, hangup];
        urls.extend(unavailable);
        urls.push(ok.clone());
        let servers = Endpoints::new(urls).unwrap();
        let (url, r) = send(&servers, "/x", |u| c.get(u)).await;
        assert_eq!(url, format!("{ok}/x"));
        assert_eq!(r.unwrap().status(), 200);
        assert_eq!(servers.current(), ok);
        // sticky: the next call is one attempt at the URL that answered
        let (url, _) = send(&servers, "/y", |u| c.get(u)).await;
        assert_eq!(url, format!("{ok}/y"));

        for refusal in [400, 401, 403, 404, 409, 500] {
            let first = answering(refusal).await;
            let servers = Endpoints::new([first.clone(), ok.clone()]).unwrap();
            let (url, r) = send(&servers, "/t", |u| c.post(u)).await;
            assert_eq!(url, format!("{first}/t"), "{refusal}");
            assert_eq!(r.unwrap().status().as_u16(), refusal);
            assert_eq!(servers.current(), first);
        }
    }

    #[tokio::test]
    async fn when_no_url_answers_the_last_error_comes_back() {
        let c = client();
        let (a, b) = (closed(), closed());
        let servers = Endpoints::new([a.clone(), b.clone()]).unwrap();
        let (url, r) = send(&servers, "/t", |u| c.get(u)).await;
        assert_eq!(url, format!("{b}/t"));
        let e = r.unwrap_err();
        assert!(e.is_connect(), "{}", error_chain(&e));
        assert_eq!(servers.current(), a, "the current URL stays");
    }
}
