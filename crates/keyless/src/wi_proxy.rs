//! `keyless wi-proxy init|serve`: workload identity's IMDS proxy sidecar
//! (`keyless_node::wi_proxy`), what the webhook injects into pods annotated
//! `azure.workload.identity/inject-proxy-sidecar` (present, whatever its value).

use crate::run::{io_err, wait_for_signal};
use crate::CliError;
use keyless_core::workload_identity as wi;
use keyless_node::wi_proxy::{self, defaults, ProxyConfig, Redirect};
use std::path::PathBuf;

#[derive(clap::Subcommand)]
pub enum WiProxyCmd {
    /// Redirect this network namespace's TCP traffic for 169.254.169.254:80 to the proxy
    /// (iptables nat OUTPUT, chain AZWI-PROXY; the proxy's own UID is exempt). Idempotent.
    Init(InitArgs),
    /// Answer IMDS token requests on 127.0.0.1:PORT with tokens exchanged for the pod's
    /// projected service-account token (AZURE_CLIENT_ID, AZURE_TENANT_ID,
    /// AZURE_FEDERATED_TOKEN_FILE, AZURE_AUTHORITY_HOST); other IMDS paths are forwarded to
    /// the real IMDS (--imds-upstream).
    Serve(ServeArgs),
}

#[derive(clap::Args)]
pub struct InitArgs {
    /// The port the proxy listens on.
    #[arg(long, default_value_t = wi::DEFAULT_PROXY_PORT)]
    pub proxy_port: u16,
    /// The UID the proxy runs as (its traffic, the requests it forwards to IMDS included, is
    /// not redirected).
    #[arg(long, default_value_t = wi::PROXY_UID)]
    pub proxy_uid: u32,
}

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Port on 127.0.0.1 (and ::1) to listen on (0: any free port, printed).
    #[arg(long, visible_alias = "proxy-port", default_value_t = wi::DEFAULT_PROXY_PORT)]
    pub port: u16,
    /// PEM file of the CA of the token endpoint (Keyless's) [default: the system roots].
    #[arg(long, env = "KEYLESS_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Identity used when a request names no client_id.
    #[arg(long, env = "AZURE_CLIENT_ID")]
    pub client_id: Option<String>,
    /// Tenant of the token endpoint.
    #[arg(long, env = "AZURE_TENANT_ID")]
    pub tenant_id: String,
    /// Base URL of the token endpoint (Keyless's URL).
    #[arg(long, env = "AZURE_AUTHORITY_HOST", default_value = defaults::AUTHORITY_HOST)]
    pub authority_host: String,
    /// The projected service-account token (read at each exchange).
    #[arg(long, env = "AZURE_FEDERATED_TOKEN_FILE")]
    pub token_file: PathBuf,
    /// Where requests other than the token route are forwarded (http://HOST[:PORT]): the
    /// real IMDS, reached because `wi-proxy init` exempts the proxy's UID from the redirect.
    #[arg(long, default_value = defaults::IMDS_UPSTREAM)]
    pub imds_upstream: String,
}

pub async fn run(c: WiProxyCmd) -> Result<(), CliError> {
    match c {
        WiProxyCmd::Init(a) => {
            let r = Redirect {
                port: a.proxy_port,
                proxy_uid: a.proxy_uid,
            };
            let changed = r.ensure().map_err(CliError::Usage)?;
            say!(
                "wi-proxy init: tcp to 169.254.169.254:80 redirected to port {} (uid {} exempt){}",
                a.proxy_port,
                a.proxy_uid,
                if changed { "" } else { ", already in place" }
            );
            Ok(())
        }
        WiProxyCmd::Serve(a) => {
            let ca_pem = match &a.ca_file {
                Some(p) => Some(std::fs::read_to_string(p).map_err(io_err(p))?),
                None => None,
            };
            let running = wi_proxy::serve(ProxyConfig {
                port: a.port,
                client_id: a.client_id,
                tenant_id: a.tenant_id,
                authority_host: a.authority_host,
                token_file: a.token_file,
                ca_pem,
                imds_upstream: a.imds_upstream,
            })
            .await
            .map_err(|e| CliError::Usage(e.to_string()))?;
            for addr in &running.addrs {
                say!("wi-proxy: listening on http://{addr}");
            }
            wait_for_signal().await;
            running.stop();
            Ok(())
        }
    }
}
