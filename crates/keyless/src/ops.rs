//! The ops listener of each long-running verb (`--metrics-listen`) and `keyless status`.

use crate::CliError;
use clap::Args;
use keyless_ops::health::{Health, Report};
use keyless_ops::listener::{defaults, OpsListener};
use std::net::SocketAddr;

/// `--metrics-listen`, flattened into every long-running verb.
#[derive(Args, Clone, Debug, Default)]
pub struct OpsArgs {
    /// Ops listener (plain HTTP: /metrics, /healthz, /readyz), or `off` [default:
    /// 127.0.0.1:9464 for `server` and `up`, 9465 for `node`, 9466 for `kv-agent`, 9467 for
    /// `pod-identity-addon` / `cluster-addon`, 9468 for `mic`, 9469 for `wi-webhook`; if the
    /// default port is taken a warning is logged and the process runs without it, an address
    /// given here must bind].
    #[arg(long, env = "KEYLESS_METRICS_LISTEN", value_name = "ADDR|off")]
    pub metrics_listen: Option<String>,
}

impl OpsArgs {
    /// Install the metrics recorder of `process` and start its ops listener with `health`.
    /// Prints `Ops endpoint: http://<addr> …` on stdout (the harnesses scrape it).
    pub async fn start(
        &self,
        process: &'static str,
        default: &str,
        health: Health,
    ) -> Result<Option<OpsListener>, CliError> {
        let handle = keyless_ops::metrics::install(process);
        let (addr, explicit) = match self.metrics_listen.as_deref().map(str::trim) {
            Some("off") | Some("none") | Some("") => return Ok(None),
            Some(a) => (a, true),
            None => (default, false),
        };
        let addr: SocketAddr = addr.parse().map_err(|_| {
            CliError::Usage(format!("--metrics-listen {addr}: expected IP:PORT or off"))
        })?;
        match keyless_ops::listener::start(addr, Some(handle), health).await {
            Ok(l) => {
                say!(
                    "Ops endpoint: http://{} (/metrics, /healthz, /readyz)",
                    l.addr
                );
                Ok(Some(l))
            }
            Err(e) if !explicit => {
                tracing::warn!(%addr, error = %e, "ops listener not started (pass --metrics-listen ADDR)");
                Ok(None)
            }
            Err(e) => Err(CliError::Usage(format!(
                "cannot listen on {addr} (--metrics-listen): {e}"
            ))),
        }
    }
}

#[derive(Args)]
pub struct StatusArgs {
    /// Ops address or URL of the server (or of `keyless up`) [default: 127.0.0.1:9464].
    #[arg(long)]
    pub server_metrics: Option<String>,
    /// Ops address or URL of the host agent [default: 127.0.0.1:9465].
    #[arg(long)]
    pub node_metrics: Option<String>,
}

/// One row of `keyless status`.
struct Row {
    what: &'static str,
    url: String,
    outcome: Result<Report, String>,
}

fn base_url(s: &str) -> String {
    let s = s.trim().trim_end_matches('/');
    let s = s
        .strip_suffix("/metrics")
        .or_else(|| s.strip_suffix("/readyz"))
        .unwrap_or(s);
    if s.starts_with("http://") || s.starts_with("https://") {
        s.to_string()
    } else {
        format!("http://{s}")
    }
}

async fn read(client: &reqwest::Client, base: &str) -> Result<Report, String> {
    let resp = client
        .get(format!("{base}/readyz"))
        .send()
        .await
        .map_err(|e| format!("unreachable ({})", e.without_url()))?;
    let status = resp.status().as_u16();
    let report: Report = resp
        .json()
        .await
        .map_err(|e| format!("answered {status} without a readiness report ({e})"))?;
    Ok(report)
}

/// `keyless status`: read `/readyz` of the server and the agent (only those given, when an
/// address is given) and print a table. Fails
/// when a process that answers is not ready, when an address given on the command line does
/// not answer, or when nothing answers at all.
pub async fn status(a: StatusArgs) -> Result<(), CliError> {
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(5))
        .no_proxy()
        .build()
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let mut rows = vec![];
    // addresses given: only those (a probe of one process is not failed by another's)
    let any_given = a.server_metrics.is_some() || a.node_metrics.is_some();
    for (what, addr, default) in [
        ("server", &a.server_metrics, defaults::SERVER),
        ("node", &a.node_metrics, defaults::NODE),
    ] {
        let given = addr.is_some();
        if any_given && !given {
            continue;
        }
        let url = base_url(addr.as_deref().unwrap_or(default));
        let outcome = read(&client, &url).await;
        rows.push((given, Row { what, url, outcome }));
    }
    let mut failed = false;
    let mut answered = 0;
    say!("{:<8} {:<10} {:<24} DETAIL", "PROCESS", "STATUS", "CHECK");
    for (given, r) in &rows {
        match &r.outcome {
            Ok(rep) => {
                answered += 1;
                failed |= !rep.ready();
                say!("{:<8} {:<10} {:<24} {}", r.what, rep.status, "", r.url);
                for c in &rep.checks {
                    say!(
                        "{:<8} {:<10} {:<24} {}",
                        "",
                        if c.ok { "ok" } else { "FAILING" },
                        c.name,
                        c.message.as_deref().unwrap_or("")
                    );
                }
            }
            Err(m) => {
                failed |= *given;
                let state = if *given { "DOWN" } else { "absent" };
                say!("{:<8} {:<10} {:<24} {} {}", r.what, state, "", r.url, m);
            }
        }
    }
    if answered == 0 {
        return Err(CliError::Usage(
            "no Keyless process answered (pass --server-metrics / --node-metrics)".into(),
        ));
    }
    if failed {
        return Err(CliError::Usage("not ready".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_urls_name_the_ops_base() {
        assert_eq!(base_url("127.0.0.1:9464"), "http://127.0.0.1:9464");
        assert_eq!(base_url("http://h:1/metrics"), "http://h:1");
        assert_eq!(base_url("http://h:1/"), "http://h:1");
    }
}
