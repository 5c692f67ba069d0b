//! Metrics: the one list of metric names (and their labels) of every Keyless process, the
//! Prometheus recorder installed once per process, and the request layer.
//!
//! Callers record with the `metrics` macros and these constants, e.g.
//! `metrics::counter!(keyless_ops::metrics::TOKENS_ISSUED, "surface" => "sts", "kind" => "client_credentials").increment(1)`.
//! Label values are always bounded sets (surface names, route templates, kinds, reasons,
//! operation names): never a raw path, an id chosen by a caller, or anything secret.

/// Counter: HTTP requests answered. Labels `surface`, `method`, `route` (the route template,
/// never the raw path), `status`.
pub const HTTP_REQUESTS: &str = "keyless_http_requests_total";
/// Histogram (seconds): HTTP request duration, same labels as [`HTTP_REQUESTS`].
pub const HTTP_REQUEST_DURATION: &str = "keyless_http_request_duration_seconds";
/// Gauge: HTTP requests in flight. Label `surface`.
pub const HTTP_REQUESTS_IN_FLIGHT: &str = "keyless_http_requests_in_flight";

/// Counter: tokens issued. Labels `surface`, `kind` (one of [`kind`]).
pub const TOKENS_ISSUED: &str = "keyless_tokens_issued_total";
/// Counter: token requests refused. Labels `surface`, `reason` (a short stable code).
pub const TOKEN_REFUSALS: &str = "keyless_token_refusals_total";
/// Counter: Key Vault data-plane operations. Labels `operation`, `result`.
pub const KEYVAULT_OPERATIONS: &str = "keyless_keyvault_operations_total";
/// Counter: control-plane (ARM / Graph) writes. Labels `operation`, `result`.
pub const CONTROL_PLANE_WRITES: &str = "keyless_control_plane_writes_total";

/// Counter: the agent's token cache answered from cache. Label `surface`.
pub const AGENT_CACHE_HITS: &str = "keyless_agent_token_cache_hits_total";
/// Counter: the agent's token cache had to ask the server. Label `surface`.
pub const AGENT_CACHE_MISSES: &str = "keyless_agent_token_cache_misses_total";
/// Counter: tokens the agent fetched from the server because a cached one was due for
/// renewal. Label `result` (`ok` | `error`).
pub const AGENT_TOKEN_RENEWALS: &str = "keyless_agent_token_renewals_total";
/// Counter: the agent's syncs with the server. Label `result` (`ok` | `error`).
pub const AGENT_SYNCS: &str = "keyless_agent_syncs_total";
/// Counter: the agent's calls to the server that moved on to the next server URL (the one
/// tried could not answer: no connection, a timeout, a 502/503/504). Labels `from`, `to`: the
/// URLs' indexes in `--server` (0-based).
pub const AGENT_SERVER_FAILOVERS: &str = "keyless_agent_server_failovers_total";

/// Histogram (seconds): store calls. Label `operation`.
pub const STORE_CALL_DURATION: &str = "keyless_store_call_duration_seconds";

/// Gauge (seconds): age of the key currently signing tokens.
pub const SIGNING_KEY_AGE: &str = "keyless_signing_key_age_seconds";
/// Gauge (seconds): time until the next signing-key rotation step.
pub const SIGNING_KEY_NEXT_ROTATION: &str = "keyless_signing_key_next_rotation_seconds";
/// Counter: signing-key rotation steps taken. Label `step` (`publish` | `activate` | `retire`).
pub const SIGNING_KEY_ROTATIONS: &str = "keyless_signing_key_rotations_total";

/// Gauge (days, fractional): days until a certificate expires. Labels `source`
/// (`keyvault` | `kvagent`), `vault`, `certificate`.
pub const CERTIFICATE_DAYS_TO_EXPIRY: &str = "keyless_certificate_days_to_expiry";
/// Counter: certificate renewals. Labels `source` (`keyvault` | `kvagent`), `result`.
pub const CERTIFICATE_RENEWALS: &str = "keyless_certificate_renewals_total";

/// Counter: MIC's syncs (as the Lease holder). Label `result` (`ok` | `error`).
pub const MIC_SYNCS: &str = "keyless_mic_syncs_total";
/// Counter: MIC's identity writes (one PATCH of a VM or scale set). Label `result`.
pub const MIC_TARGET_WRITES: &str = "keyless_mic_target_writes_total";
/// Gauge: 1 while this MIC replica holds the Lease, else 0.
pub const MIC_LEADER: &str = "keyless_mic_leader";

/// Gauge (always 1): what is running. Labels `process`, `version`.
pub const BUILD_INFO: &str = "keyless_build_info";
/// Gauge: 1 when every readiness check passes, else 0. Label `process`.
pub const READY: &str = "keyless_ready";

/// Values of the `kind` label of [`TOKENS_ISSUED`].
pub mod kind {
    /// IMDS / NMI / local endpoints: a managed identity's token.
    pub const MANAGED_IDENTITY: &str = "managed_identity";
    /// `client_credentials` with a client secret.
    pub const CLIENT_CREDENTIALS: &str = "client_credentials";
    /// `client_credentials` with a federated (workload identity) assertion.
    pub const FEDERATED: &str = "federated";
    /// `client_credentials` with a certificate client assertion.
    pub const CLIENT_ASSERTION: &str = "client_assertion";
}

/// Values of the `surface` label.
pub mod surface {
    pub const ARM: &str = "arm";
    pub const STS: &str = "sts";
    pub const HOST: &str = "host";
    pub const GRAPH: &str = "graph";
    pub const KEYVAULT: &str = "keyvault";
    pub const IMDS: &str = "imds";
    pub const NMI: &str = "nmi";
    pub const APPSERVICE: &str = "appservice";
    pub const ARC: &str = "arc";
    pub const EXTENSION: &str = "extension";
    pub const OPS: &str = "ops";
}

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

/// Histogram buckets of every `*_seconds` histogram (request and store-call durations): from
/// half a millisecond (a cached token, a point read) to 30 s (the request timeout).
pub const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// A recorder with this project's settings (buckets), not installed: for [`install`] and for
/// tests that record into a local recorder.
pub fn builder() -> PrometheusBuilder {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), DURATION_BUCKETS)
        .expect("the duration buckets are not empty")
}

/// Install the process's Prometheus recorder (once; later calls return the same handle) and
/// describe every metric. `process` names what runs (`server`, `node`, `up`, `kv-agent`,
/// `pod-identity-addon`) in [`BUILD_INFO`].
///
/// If some other recorder was installed first, metrics go there and the handle returned
/// renders an empty (but valid) exposition.
pub fn install(process: &'static str) -> PrometheusHandle {
    let handle = HANDLE
        .get_or_init(|| {
            let recorder = builder().build_recorder();
            let handle = recorder.handle();
            if ::metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics stays empty");
            }
            describe();
            handle
        })
        .clone();
    ::metrics::gauge!(BUILD_INFO, "process" => process, "version" => env!("CARGO_PKG_VERSION"))
        .set(1.0);
    handle
}

/// The installed handle, if [`install`] ran.
pub fn handle() -> Option<PrometheusHandle> {
    HANDLE.get().cloned()
}

/// Help texts and units of every metric (shown as `# HELP` in the exposition).
pub fn describe() {
    use ::metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        HTTP_REQUESTS,
        "HTTP requests answered, by surface, method, route template and status."
    );
    describe_histogram!(
        HTTP_REQUEST_DURATION,
        Unit::Seconds,
        "HTTP request duration, by surface, method, route template and status."
    );
    describe_gauge!(
        HTTP_REQUESTS_IN_FLIGHT,
        "HTTP requests being answered, by surface."
    );
    describe_counter!(TOKENS_ISSUED, "Tokens issued, by surface and kind.");
    describe_counter!(MIC_SYNCS, "MIC syncs as the Lease holder, by result.");
    describe_counter!(
        MIC_TARGET_WRITES,
        "MIC identity writes (one PATCH of a VM or scale set), by result."
    );
    describe_gauge!(MIC_LEADER, "1 while this MIC replica holds the Lease.");
    describe_counter!(
        TOKEN_REFUSALS,
        "Token requests refused, by surface and reason."
    );
    describe_counter!(
        KEYVAULT_OPERATIONS,
        "Key Vault data-plane operations, by operation and result."
    );
    describe_counter!(
        CONTROL_PLANE_WRITES,
        "Control-plane writes, by operation and result."
    );
    describe_counter!(
        AGENT_CACHE_HITS,
        "Token requests the agent answered from its cache."
    );
    describe_counter!(
        AGENT_CACHE_MISSES,
        "Token requests the agent had to ask the server for."
    );
    describe_counter!(
        AGENT_TOKEN_RENEWALS,
        "Cached tokens the agent renewed (due for refresh), by result."
    );
    describe_counter!(
        AGENT_SYNCS,
        "Agent identity syncs with the server, by result."
    );
    describe_counter!(
        AGENT_SERVER_FAILOVERS,
        "Agent calls to the server that moved on to the next server URL, by from/to URL index."
    );
    describe_histogram!(
        STORE_CALL_DURATION,
        Unit::Seconds,
        "Store call duration, by operation."
    );
    describe_gauge!(
        SIGNING_KEY_AGE,
        Unit::Seconds,
        "Age of the key signing tokens now."
    );
    describe_gauge!(
        SIGNING_KEY_NEXT_ROTATION,
        Unit::Seconds,
        "Time until the next signing-key rotation step."
    );
    describe_counter!(
        SIGNING_KEY_ROTATIONS,
        "Signing-key rotation steps, by step."
    );
    describe_gauge!(
        CERTIFICATE_DAYS_TO_EXPIRY,
        "Days until a certificate expires, by source, vault and certificate."
    );
    describe_counter!(
        CERTIFICATE_RENEWALS,
        "Certificate renewals, by source and result."
    );
    describe_gauge!(BUILD_INFO, "Always 1: the process and version running.");
    describe_gauge!(
        READY,
        "1 when every readiness check of the process passes, else 0."
    );
}

/// Record one store call of `operation` that took `elapsed`.
pub fn store_call(operation: &'static str, elapsed: std::time::Duration) {
    ::metrics::histogram!(STORE_CALL_DURATION, "operation" => operation)
        .record(elapsed.as_secs_f64());
}

/// `result` label value of a fallible operation.
pub fn result_label<T, E>(r: &Result<T, E>) -> &'static str {
    if r.is_ok() {
        "ok"
    } else {
        "error"
    }
}

/// The `reason` of a token request refused for being over its caller's fair share (a 429).
pub const REASON_TOO_MANY_REQUESTS: &str = "too_many_requests";

/// Count a token request of `surface` refused for being over its caller's fair share. No audit
/// record is written for it (a flood would fill the audit file): throttling shows here and in
/// the access log.
pub fn token_throttled(surface: &'static str) {
    ::metrics::counter!(TOKEN_REFUSALS, "surface" => surface, "reason" => REASON_TOO_MANY_REQUESTS)
        .increment(1);
}

/// Set the days until a certificate expires (`source`: `keyvault` for the server's vaults,
/// `kvagent` for a certificate installed on a host), from its `notAfter` and `now` (Unix
/// seconds).
pub fn certificate_expiry(
    source: &'static str,
    vault: &str,
    certificate: &str,
    not_after: i64,
    now: i64,
) {
    ::metrics::gauge!(
        CERTIFICATE_DAYS_TO_EXPIRY,
        "source" => source,
        "vault" => vault.to_string(),
        "certificate" => certificate.to_string()
    )
    .set((not_after - now) as f64 / 86_400.0);
}

/// Count a certificate renewal (`result`: `ok` | `error` | …).
pub fn certificate_renewal(source: &'static str, result: &'static str) {
    ::metrics::counter!(CERTIFICATE_RENEWALS, "source" => source, "result" => result).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_render_as_histograms_with_the_buckets() {
        let recorder = builder().build_recorder();
        let handle = recorder.handle();
        ::metrics::with_local_recorder(&recorder, || {
            describe();
            store_call("get_vm", std::time::Duration::from_millis(3));
            ::metrics::counter!(TOKENS_ISSUED, "surface" => surface::STS, "kind" => kind::FEDERATED)
                .increment(2);
        });
        let text = handle.render();
        assert!(
            text.contains(
                "keyless_store_call_duration_seconds_bucket{operation=\"get_vm\",le=\"0.005\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "keyless_store_call_duration_seconds_bucket{operation=\"get_vm\",le=\"0.0025\"} 0"
            ),
            "{text}"
        );
        assert!(
            text.contains("keyless_tokens_issued_total{surface=\"sts\",kind=\"federated\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("# HELP keyless_tokens_issued_total"),
            "{text}"
        );
    }

    #[test]
    fn names_follow_prometheus_conventions() {
        for n in [
            HTTP_REQUESTS,
            TOKENS_ISSUED,
            TOKEN_REFUSALS,
            KEYVAULT_OPERATIONS,
            CONTROL_PLANE_WRITES,
            AGENT_CACHE_HITS,
            AGENT_CACHE_MISSES,
            AGENT_TOKEN_RENEWALS,
            AGENT_SYNCS,
            AGENT_SERVER_FAILOVERS,
            SIGNING_KEY_ROTATIONS,
            CERTIFICATE_RENEWALS,
        ] {
            assert!(n.starts_with("keyless_") && n.ends_with("_total"), "{n}");
        }
        for n in [
            HTTP_REQUEST_DURATION,
            STORE_CALL_DURATION,
            SIGNING_KEY_AGE,
            SIGNING_KEY_NEXT_ROTATION,
        ] {
            assert!(n.ends_with("_seconds"), "{n}");
        }
    }
}
