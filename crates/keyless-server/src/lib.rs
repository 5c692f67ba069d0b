//! The Keyless server: one HTTPS listener serving the token service ([`sts`]), the control
//! plane ([`arm`]) and the host API ([`host`]), over a [`keyless_store::Store`].
//!
//! Request flow for a managed-identity token: workload → `keyless node` (IMDS, plain HTTP on
//! the host) → `POST /keyless/host/v1/token` here over mTLS → [`host`] resolves the VM from the
//! client certificate, asks `keyless_core::selection` which of the VM's identities the request
//! names, and [`tokens::mint`] signs the claims built by `keyless_core::claims`.

// Leaves: imported by the contexts, importing none of them.
pub mod authz;
pub mod caches;
pub mod clock;
pub mod error;
pub mod keys;
pub mod request;
pub mod state;
pub mod tokens;
pub mod util;

// The contexts, each serving one surface.
/// The control plane (Azure Resource Manager) and its resource providers.
pub mod arm;
/// The host API: joins, host credentials and managed-identity tokens for host agents.
pub mod host;
/// The Key Vault data plane.
pub mod kv;
/// The token service (Entra ID's token endpoint and discovery).
pub mod sts;

pub mod cloud;
pub mod graph;
/// The clusters' OIDC issuers (discovery and JWKS of the keys their add-ons publish).
pub mod oidc;
pub mod ops;

// The resource providers the binary and the benches drive directly.
pub use arm::{activity, batch, clusters, fics, resources, roles, vaults};

use crate::error::{Result, ServerError};
use crate::state::ServerConfig;
use axum::Router;
use keyless_core::clock::Clock;
use keyless_store::Store;
use std::net::SocketAddr;
use std::sync::Arc;
use tower::ServiceExt;

pub use host::PeerCert;
pub use state::{AdminCredential, AppState, Bootstrap, ServerConfig as Config};

/// A started server.
pub struct RunningServer {
    pub local_addr: SocketAddr,
    pub state: Arc<AppState>,
    pub bootstrap: Bootstrap,
    pub task: tokio::task::JoinHandle<()>,
    /// The background loops (key rotation, the Key Vault scheduler).
    pub background: Vec<tokio::task::JoinHandle<()>>,
}

impl RunningServer {
    /// Stop serving and hand the singletons over: the listener and the background loops stop,
    /// then this server's leases (key rotation, the Key Vault scheduler) are released, so
    /// another server sharing the database takes them at its next tick instead of when they
    /// lapse; last, every audit record emitted so far is put in the file, synced.
    pub async fn shutdown(self) {
        self.task.abort();
        let _ = self.task.await;
        for t in self.background {
            t.abort();
            let _ = t.await;
        }
        let s = &self.state;
        for lease in [keys::ROTATION_LEASE, kv::renew::LEASE] {
            if let Err(e) = s.store.release_lease(lease, &s.replica_id).await {
                tracing::warn!(lease, error = %e, "releasing a lease at shutdown failed; it lapses on its own");
            }
        }
        s.cfg.audit.flush().await;
    }
}

/// The HTTP application (without TLS), for the listener and for tests.
pub fn app(state: Arc<AppState>) -> Router {
    Router::new()
        .merge(sts::routes())
        .merge(arm::routes())
        .merge(host::routes())
        .merge(graph::routes())
        .merge(cloud::routes())
        .merge(oidc::routes())
        .route(
            "/keyless/admin/v1/vault-clock",
            axum::routing::post(kv::advance_clock),
        )
        .fallback(
            |uri: axum::http::Uri| async move { ServerError::InvalidPath(uri.path().to_string()) },
        )
        .with_state(state.clone())
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            vault_dispatch,
        ))
        // the surface's error shape for errors that have none of their own (the store's)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            error_shape,
        ))
        // outermost, per route (so the matched route template is known): request id, span,
        // metrics, access log (`keyless_ops::request`)
        .layer(axum::middleware::from_fn_with_state(
            ops::edge(state),
            keyless_ops::request::edge,
        ))
}

/// Requests for `{vault}.vault.{domain}` go to the Key Vault data plane.
async fn vault_dispatch(
    axum::extract::State(s): axum::extract::State<Arc<AppState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    match kv::vault_host(&s, req.headers()) {
        Some(vault) => kv::handle(s, vault, req).await,
        None => next.run(req).await,
    }
}

/// Serve the request in its surface's error shape (`error::in_surface`).
async fn error_shape(
    axum::extract::State(s): axum::extract::State<Arc<AppState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use keyless_ops::request as edge;
    let shape = match ops::surface(&s, &req) {
        x if x == edge::KEYVAULT => error::Shape::KeyVault,
        x if x == edge::STS => error::Shape::Sts,
        x if x == edge::HOST => error::Shape::Host,
        _ => error::Shape::Arm,
    };
    error::in_surface(shape, next.run(req)).await
}

/// HTTPS client for external OIDC issuers: the given CA only, or the system roots.
fn issuer_client(ca_pem: Option<&str>) -> Result<reqwest::Client> {
    let mut b = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(5))
        .timeout(std::time::Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .https_only(true);
    if let Some(pem) = ca_pem {
        let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes()).map_err(|e| {
            ServerError::Pki(keyless_pki::PkiError::InvalidCertificate(e.to_string()))
        })?;
        b = b.tls_certs_only(certs);
    }
    b.build()
        .map_err(|e| ServerError::Pki(keyless_pki::PkiError::InvalidCertificate(e.to_string())))
}

/// Bootstrap the data dir and start serving on `cfg.listen`. Several servers may share one
/// database (`store`): bootstrap and the first signing key are made once between them (see
/// [`state::bootstrap`], [`keys`]).
pub async fn start(
    cfg: ServerConfig,
    store: Store,
    clock: Arc<dyn Clock>,
) -> Result<RunningServer> {
    keyless_pki::install_crypto_provider();
    let replica_id = util::new_guid();
    let listener = keyless_ops::limits::bind(cfg.listen)
        .await
        .map_err(|source| ServerError::Bind {
            addr: cfg.listen.to_string(),
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| ServerError::Bind {
        addr: cfg.listen.to_string(),
        source,
    })?;
    let (boot, ca, kv_ca) = state::bootstrap(&store, &cfg, &replica_id, clock.as_ref()).await?;
    let mut extra_sans = cfg.tls_sans.clone();
    // a specific listen address is one clients (the embedded agent of `keyless up`) connect to
    if !local_addr.ip().is_unspecified() {
        extra_sans.push(local_addr.ip().to_string());
    }
    extra_sans.push(format!("vault.{}", cfg.vault_domain));
    extra_sans.push(format!("*.vault.{}", cfg.vault_domain));
    let sans = state::tls_sans(&extra_sans);
    let (chain, key) = state::tls_identity(&store, &ca, &sans, clock.now()).await?;
    let tls = keyless_pki::server_tls_config(chain, &key, ca.cert_der())?;
    let base_url = cfg
        .public_url
        .clone()
        .map(|u| u.trim_end_matches('/').to_string())
        .unwrap_or_else(|| format!("https://localhost:{}", local_addr.port()));
    let http = issuer_client(cfg.issuer_ca_pem.as_deref())?;
    let vault_clock = clock::VaultClock::new(clock.clone(), cfg.dev_clock);
    let vaults = caches::vaults::VaultCache::new(cfg.vault_cache_poll);
    let hosts = caches::hosts::HostCache::new(cfg.vault_cache_poll);
    let state = Arc::new(AppState {
        store,
        clock,
        tenant_id: boot.tenant_id.clone(),
        subscription_id: boot.subscription_id.clone(),
        tenant_created: boot.tenant_created,
        issuers: state::issuers(&base_url, &boot.tenant_id),
        base_url,
        keys: keys::KeyRing::default(),
        ca,
        kv_ca,
        cfg,
        http,
        jwks: Default::default(),
        vault_clock,
        verified: Default::default(),
        replica_id,
        vaults,
        hosts,
    });
    // the vault and host caches: evicted by this server's writes at commit, and by the change
    // feed (polled every `vault_cache_poll`) for the writes of other servers
    caches::feed::follow(&state, &state.store, |s: &AppState| {
        vec![&s.vaults as &dyn caches::feed::Follower, &s.hosts]
    });
    let lease_ttl = keys::lease_ttl(state.cfg.key_check_interval);
    state
        .keys
        .start(
            &state.store,
            &state.ca,
            state.clock.as_ref(),
            &state.cfg.rotation,
            &state.replica_id,
            lease_ttl,
        )
        .await?;
    ops::record_signing_key(&state);

    // Key rotation (by the holder of its lease) and reloading the keys other servers wrote:
    // a reconcile, an error is logged and the next tick tries again.
    let rot = state.clone();
    let rotation = tokio::spawn(async move {
        let mut tick = tokio::time::interval(rot.cfg.key_check_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let r = rot
                .keys
                .check(
                    &rot.store,
                    &rot.ca,
                    rot.now(),
                    &rot.cfg.rotation,
                    &rot.replica_id,
                    lease_ttl,
                )
                .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "signing key check failed; retrying at the next tick");
            }
            ops::record_signing_key(&rot);
        }
    });

    // Certificate lifetime actions and purges of expired soft-deleted objects (the pass takes
    // the scheduler's lease itself: one server acts at a time).
    let sched = state.clone();
    let scheduler = tokio::spawn(async move {
        let mut tick = tokio::time::interval(sched.cfg.vault_check_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = kv::renew::run_once(&sched).await {
                tracing::error!(error = %e, "key vault scheduler pass failed");
            }
        }
    });

    // template deployments whose run stopped with another server (or with this one, before
    // a restart) run on here
    let resumer = tokio::spawn(arm::resume_deployments(state.clone()));

    let app = app(state.clone());
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    // Timeouts, the connection budget and per-caller caps shared with every listener of the
    // process (`keyless_ops::limits`); the handshake is bounded there too.
    let task = keyless_ops::limits::serve_with(
        listener,
        keyless_ops::limits::governor(),
        "HTTPS",
        move |tcp| {
            let acceptor = acceptor.clone();
            async move {
                let tls = acceptor.accept(tcp).await.ok()?;
                let peer = PeerCert(
                    tls.get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| keyless_pki::sha256_hex(c)),
                );
                Some((tls, peer))
            }
        },
        move |_peer, req| {
            let app = app.clone();
            async move {
                match app.oneshot(req).await {
                    Ok(r) => r,
                    Err(never) => match never {},
                }
            }
        },
    );
    Ok(RunningServer {
        local_addr,
        state,
        bootstrap: boot,
        task,
        background: vec![rotation, scheduler, resumer],
    })
}
