//! Several base URLs of one service — replicas sharing one database — and the rule a client
//! follows over them ([`Endpoints::call`]): every call goes to the current URL; when that
//! attempt could not be answered (the caller's `retry` says why: no connection, a timeout, a
//! 502/503/504), the same call tries the next URL, in order, wrapping around, each at most
//! once. The URL that gave an answer becomes current, so a healthy replica keeps the traffic
//! and a dead one costs one failed attempt per call only until the first call that moves on.
//! A definite answer — a 2xx, a 4xx refusal, any other status — ends the call where it was
//! given: a refusal is a refusal on every replica.
//!
//! This module knows no HTTP client: an attempt is any future, and the caller classifies its
//! outcome ([`retryable_status`] is the shared rule for statuses).

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Whether an HTTP answer with `status` means "this replica cannot answer now, another may":
/// 502, 503 and 504.
pub fn retryable_status(status: u16) -> bool {
    matches!(status, 502..=504)
}

/// The URLs of `values`, each of which may list several separated by commas (`--server
/// A,B --server C`): trimmed, without trailing slashes, empty entries dropped, in order.
pub fn parse_urls<I, S>(values: I) -> Vec<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    values
        .into_iter()
        .flat_map(|v| {
            v.as_ref()
                .split(',')
                .map(|u| u.trim().trim_end_matches('/').to_string())
                .filter(|u| !u.is_empty())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Why the outcome of one attempt may be tried at the next URL, or `None` when it is an answer
/// to keep.
pub fn retry_reason(r: &reqwest::Result<reqwest::Response>) -> Option<String> {
    match r {
        Ok(resp) if retryable_status(resp.status().as_u16()) => {
            Some(format!("answered {}", resp.status()))
        }
        Ok(_) => None,
        // a request that got no answer: refused or failed connection or handshake, timed out,
        // or cut before the answer (a replica that died with the connection open)
        Err(e) if e.is_connect() || e.is_timeout() || e.is_request() => Some(error_chain(e)),
        Err(_) => None,
    }
}

/// An error with its sources (`error sending request …: client error (Connect): tcp connect
/// error: Connection refused`).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// The base URLs of one service and which of them is current (see the module doc).
#[derive(Debug)]
pub struct Endpoints {
    urls: Vec<String>,
    current: AtomicUsize,
    counter: Option<&'static str>,
}

impl Endpoints {
    /// The URLs in the order they are tried (trailing slashes dropped); the first is current.
    /// `None` when there is none.
    pub fn new<I, S>(urls: I) -> Option<Self>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let urls: Vec<String> = urls
            .into_iter()
            .map(|u| u.into().trim_end_matches('/').to_string())
            .collect();
        (!urls.is_empty()).then_some(Self {
            urls,
            current: AtomicUsize::new(0),
            counter: None,
        })
    }

    /// Count every move to the next URL in the counter `metric`, labelled `from` and `to` with
    /// the URLs' indexes (0-based, in the order given).
    pub fn counting(mut self, metric: &'static str) -> Self {
        self.counter = Some(metric);
        self
    }

    /// Every URL, in the order they are tried.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// The URL the next call tries first.
    pub fn current(&self) -> &str {
        &self.urls[self.current.load(Ordering::Relaxed) % self.urls.len()]
    }

    /// Run `attempt` against the current URL and, while `retry` finds its outcome retryable
    /// (`Some(reason)`), against the next ones in order (wrapping around, each URL once). The
    /// first outcome `retry` calls definite (`None`) is returned and its URL becomes current.
    /// When every URL failed, the last outcome is returned and the current URL stays as it was.
    ///
    /// Each move to the next URL is logged as a warning naming both URLs and the reason, and
    /// counted when the endpoints were made [`Endpoints::counting`]. With one URL this is
    /// exactly one attempt.
    pub async fn call<T, F, Fut, R>(&self, mut attempt: F, retry: R) -> T
    where
        F: FnMut(&str) -> Fut,
        Fut: Future<Output = T>,
        R: Fn(&T) -> Option<String>,
    {
        let n = self.urls.len();
        let start = self.current.load(Ordering::Relaxed) % n;
        let mut i = start;
        for tried in 1..=n {
            let out = attempt(&self.urls[i]).await;
            let Some(reason) = retry(&out) else {
                self.current.store(i, Ordering::Relaxed);
                return out;
            };
            if tried == n {
                return out;
            }
            let next = (i + 1) % n;
            tracing::warn!(
                from = %self.urls[i],
                to = %self.urls[next],
                %reason,
                "server failover: trying the next server URL"
            );
            if let Some(metric) = self.counter {
                ::metrics::counter!(metric, "from" => i.to_string(), "to" => next.to_string())
                    .increment(1);
            }
            i = next;
        }
        unreachable!("the loop returns at its last attempt")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;

    /// A fake service: each URL answers from its script (`Err` = unreachable, `Ok(status)`),
    /// and every attempt is recorded.
    struct Fake {
        answers: Mutex<HashMap<String, Result<u16, &'static str>>>,
        tried: Mutex<Vec<String>>,
    }

    impl Fake {
        fn new(answers: &[(&str, Result<u16, &'static str>)]) -> Self {
            Fake {
                answers: Mutex::new(answers.iter().map(|(u, a)| (u.to_string(), *a)).collect()),
                tried: Mutex::new(vec![]),
            }
        }
        fn set(&self, url: &str, a: Result<u16, &'static str>) {
            self.answers.lock().unwrap().insert(url.into(), a);
        }
        fn take_tried(&self) -> Vec<String> {
            std::mem::take(&mut *self.tried.lock().unwrap())
        }
        async fn call(&self, ep: &Endpoints) -> (String, Result<u16, &'static str>) {
            ep.call(
                |url| {
                    self.tried.lock().unwrap().push(url.to_string());
                    let a = self.answers.lock().unwrap()[url];
                    let url = url.to_string();
                    async move { (url, a) }
                },
                |(_, a)| match a {
                    Err(e) => Some(e.to_string()),
                    Ok(s) if retryable_status(*s) => Some(format!("answered {s}")),
                    Ok(_) => None,
                },
            )
            .await
        }
    }

    #[tokio::test]
    async fn tries_in_order_wraps_around_and_sticks_to_the_url_that_answered() {
        let ep = Endpoints::new(["https://a/", "https://b", "https://c"]).unwrap();
        assert_eq!(ep.urls(), ["https://a", "https://b", "https://c"]);
        let fake = Fake::new(&[
            ("https://a", Ok(200)),
            ("https://b", Ok(200)),
            ("https://c", Ok(200)),
        ]);
        // healthy: one attempt, at the first URL
        assert_eq!(fake.call(&ep).await, ("https://a".into(), Ok(200)));
        assert_eq!(fake.take_tried(), ["https://a"]);

        // a down (connection refused), b answers 503: c answers, and becomes current
        fake.set("https://a", Err("connection refused"));
        fake.set("https://b", Ok(503));
        assert_eq!(fake.call(&ep).await, ("https://c".into(), Ok(200)));
        assert_eq!(fake.take_tried(), ["https://a", "https://b", "https://c"]);
        assert_eq!(ep.current(), "https://c");
        // sticky: the next call starts at c
        assert_eq!(fake.call(&ep).await, ("https://c".into(), Ok(200)));
        assert_eq!(fake.take_tried(), ["https://c"]);

        // c times out: wrap around to a (still down), then b (back)
        fake.set("https://c", Err("timed out"));
        fake.set("https://b", Ok(200));
        assert_eq!(fake.call(&ep).await, ("https://b".into(), Ok(200)));
        assert_eq!(fake.take_tried(), ["https://c", "https://a", "https://b"]);
        assert_eq!(ep.current(), "https://b");
    }

    #[tokio::test]
    async fn a_definite_answer_is_not_retried_elsewhere() {
        let ep = Endpoints::new(["https://a", "https://b"]).unwrap();
        let fake = Fake::new(&[("https://a", Ok(403)), ("https://b", Ok(200))]);
        assert_eq!(fake.call(&ep).await, ("https://a".into(), Ok(403)));
        assert_eq!(fake.take_tried(), ["https://a"]);
        for status in [400, 401, 404, 409, 429, 500] {
            fake.set("https://a", Ok(status));
            assert_eq!(fake.call(&ep).await.1, Ok(status));
            assert_eq!(fake.take_tried(), ["https://a"], "{status}");
        }
        // 502 / 503 / 504 are retried
        for status in [502, 503, 504] {
            fake.set("https://a", Ok(status));
            assert_eq!(fake.call(&ep).await.1, Ok(200));
            assert_eq!(fake.take_tried(), ["https://a", "https://b"], "{status}");
            // back to a for the next status
            fake.set("https://b", Err("down"));
            fake.set("https://a", Ok(200));
            assert_eq!(fake.call(&ep).await.1, Ok(200));
            fake.take_tried();
            fake.set("https://b", Ok(200));
        }
        // a refusal after a failover still ends the call there, and that URL is current
        fake.set("https://a", Err("connection refused"));
        fake.set("https://b", Ok(401));
        assert_eq!(fake.call(&ep).await, ("https://b".into(), Ok(401)));
        assert_eq!(fake.take_tried(), ["https://a", "https://b"]);
        assert_eq!(ep.current(), "https://b");
    }

    #[tokio::test]
    async fn when_every_url_fails_the_last_outcome_is_returned_and_current_stays() {
        let ep = Endpoints::new(["https://a", "https://b", "https://c"]).unwrap();
        let fake = Fake::new(&[
            ("https://a", Err("down")),
            ("https://b", Ok(200)),
            ("https://c", Ok(200)),
        ]);
        assert_eq!(fake.call(&ep).await.1, Ok(200));
        assert_eq!(ep.current(), "https://b");
        fake.take_tried();
        fake.set("https://b", Err("refused"));
        fake.set("https://c", Ok(504));
        assert_eq!(fake.call(&ep).await, ("https://a".into(), Err("down")));
        assert_eq!(fake.take_tried(), ["https://b", "https://c", "https://a"]);
        assert_eq!(ep.current(), "https://b");
    }

    #[tokio::test]
    async fn one_url_is_one_attempt() {
        let ep = Endpoints::new(["https://only"]).unwrap();
        let fake = Fake::new(&[("https://only", Err("down"))]);
        assert_eq!(fake.call(&ep).await, ("https://only".into(), Err("down")));
        assert_eq!(fake.take_tried(), ["https://only"]);
        assert!(Endpoints::new(Vec::<String>::new()).is_none());
    }

    #[test]
    fn failovers_are_counted_from_and_to() {
        let recorder = crate::metrics::builder().build_recorder();
        let handle = recorder.handle();
        let ep = Endpoints::new(["https://a", "https://b"])
            .unwrap()
            .counting(crate::metrics::AGENT_SERVER_FAILOVERS);
        let fake = Fake::new(&[("https://a", Err("down")), ("https://b", Ok(200))]);
        // the local recorder is set for a synchronous scope: drive the call inside it
        ::metrics::with_local_recorder(&recorder, || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            assert_eq!(rt.block_on(fake.call(&ep)).1, Ok(200));
        });
        let text = handle.render();
        assert!(
            text.contains("keyless_agent_server_failovers_total{from=\"0\",to=\"1\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn urls_are_split_on_commas_and_repeats() {
        assert_eq!(
            parse_urls(["https://a:1/, https://b:2", "https://c:3", ""]),
            ["https://a:1", "https://b:2", "https://c:3"]
        );
        assert_eq!(parse_urls(["https://only"]), ["https://only"]);
        assert!(parse_urls([",", " "]).is_empty());
    }
}
