//! Workload identity's pod mutation (the rules of `keyless wi-webhook`, which serves them as an
//! admission webhook from `keyless_k8s::webhook`), azure-workload-identity's contract
//! (`../shared/spec/pod-identity.md` §3.2, the v1.5 layout):
//! a pod labelled `azure.workload.identity/use: "true"` gets, in every container (init and
//! regular) not named in `skip-containers`, the `AZURE_*` environment and a read-only mount of
//! the projected service-account token volume `azure-identity-token` (audience
//! `api://AzureADTokenExchange`) at `/var/run/secrets/azure/tokens`. Values already there are
//! never overwritten; a variable whose value would be empty is not injected (upstream #1593).
//! The answer is an RFC 6902 JSON Patch, as `admission.k8s.io/v1` wants it.
//!
//! The pod's service account must exist: a pod that asks whose service account is not found
//! is refused (400), as upstream refuses when its lookup fails.
//!
//! Beyond the environment and the token: a readiness gate
//! (`keyless.dev/workload-identity-ready`, which the add-on sets once the pod's exchange would
//! succeed) when [`ReadinessGate`] says so, and the IMDS proxy sidecar (the pod annotation
//! `azure.workload.identity/inject-proxy-sidecar` present, whatever its value, as upstream's
//! `shouldInjectProxySidecar` reads it): the init container `azwi-proxy-init`
//! (`keyless wi-proxy init`, NET_ADMIN) prepended to the init containers and `azwi-proxy`
//! (`keyless wi-proxy serve`) prepended to the containers, both with the same environment and
//! mount; refused for `hostNetwork` pods (its iptables rules would change the node's). Pods in
//! `kube-system` are never mutated.

use serde_json::{json, Value};
use std::collections::BTreeMap;

pub const USE_LABEL: &str = "azure.workload.identity/use";
pub const CLIENT_ID_ANNOTATION: &str = "azure.workload.identity/client-id";
pub const TENANT_ID_ANNOTATION: &str = "azure.workload.identity/tenant-id";
pub const TOKEN_EXPIRATION_ANNOTATION: &str =
    "azure.workload.identity/service-account-token-expiration";
pub const SKIP_CONTAINERS_ANNOTATION: &str = "azure.workload.identity/skip-containers";
pub const INJECT_PROXY_SIDECAR_ANNOTATION: &str = "azure.workload.identity/inject-proxy-sidecar";
pub const PROXY_SIDECAR_PORT_ANNOTATION: &str = "azure.workload.identity/proxy-sidecar-port";
/// Pod annotation asking for the readiness gate (with [`ReadinessGate::Annotated`]).
pub const READINESS_GATE_ANNOTATION: &str = "keyless.dev/identity-readiness-gate";
/// The readiness gate's condition type (set by the add-on).
pub const READINESS_CONDITION: &str = "keyless.dev/workload-identity-ready";
/// The namespace whose pods are never mutated.
pub const SYSTEM_NAMESPACE: &str = "kube-system";

pub const PROXY_INIT_CONTAINER: &str = "azwi-proxy-init";
pub const PROXY_CONTAINER: &str = "azwi-proxy";
/// The proxy's port when neither the pod nor the webhook says otherwise (`wi-webhook
/// --proxy-port`, `wi-proxy init --proxy-port`, `wi-proxy serve --port`).
pub const DEFAULT_PROXY_PORT: u16 = 8000;
/// The UID the proxy runs as (the container's `runAsUser`; `wi-proxy init --proxy-uid`: the
/// init container's rules let its own traffic through).
pub const PROXY_UID: u32 = 1501;
/// The image of the proxy's two containers when the webhook names none (`--proxy-image`).
pub const DEFAULT_PROXY_IMAGE: &str = "keyless";

pub const TOKEN_VOLUME: &str = "azure-identity-token";
pub const TOKEN_MOUNT_PATH: &str = "/var/run/secrets/azure/tokens";
pub const TOKEN_FILE: &str = "azure-identity-token";
pub const DEFAULT_AUDIENCE: &str = "api://AzureADTokenExchange";
/// The projected token's lifetime: default and allowed range, in seconds (upstream's).
pub const DEFAULT_EXPIRATION: i64 = 3600;
pub const MIN_EXPIRATION: i64 = 3600;
pub const MAX_EXPIRATION: i64 = 86400;

/// When a mutated pod gets the readiness gate (`--readiness-gate`; its default is
/// `ReadinessGate::default()`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadinessGate {
    /// When the pod's annotation [`READINESS_GATE_ANNOTATION`] says `"true"`.
    #[default]
    Annotated,
    Always,
    Never,
}

impl std::str::FromStr for ReadinessGate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "annotated" => Ok(ReadinessGate::Annotated),
            "always" => Ok(ReadinessGate::Always),
            "never" => Ok(ReadinessGate::Never),
            other => Err(format!("'{other}': expected annotated, always or never")),
        }
    }
}

/// The spelling [`FromStr`](std::str::FromStr) reads back.
impl std::fmt::Display for ReadinessGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ReadinessGate::Annotated => "annotated",
            ReadinessGate::Always => "always",
            ReadinessGate::Never => "never",
        })
    }
}

/// What the webhook is configured with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Defaults {
    /// `AZURE_TENANT_ID` when the service account names none.
    pub tenant_id: String,
    /// `AZURE_AUTHORITY_HOST`: Keyless's token service URL.
    pub authority_host: String,
    pub audience: String,
    pub readiness_gate: ReadinessGate,
    /// The image of the proxy's two containers (`--proxy-image`).
    pub proxy_image: String,
    /// The proxy's port when the pod names none (`--proxy-port`).
    pub proxy_port: u16,
}

impl Defaults {
    /// The given tenant and authority host; the rest as `keyless wi-webhook` defaults them.
    pub fn new(tenant_id: impl Into<String>, authority_host: impl Into<String>) -> Defaults {
        Defaults {
            tenant_id: tenant_id.into(),
            authority_host: authority_host.into(),
            audience: DEFAULT_AUDIENCE.to_string(),
            readiness_gate: ReadinessGate::default(),
            proxy_image: DEFAULT_PROXY_IMAGE.to_string(),
            proxy_port: DEFAULT_PROXY_PORT,
        }
    }
}

/// Why a pod is refused (the admission answer's message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MutationError {
    #[error("{TOKEN_EXPIRATION_ANNOTATION} must be a number of seconds between {MIN_EXPIRATION} and {MAX_EXPIRATION}, got '{0}'")]
    Expiration(String),
    #[error("{PROXY_SIDECAR_PORT_ANNOTATION} must be a port number (1-65535), got '{0}'")]
    ProxyPort(String),
    #[error("the proxy sidecar ({INJECT_PROXY_SIDECAR_ANNOTATION}) cannot be injected into a pod with hostNetwork: true (its iptables rules would redirect the node's own IMDS traffic)")]
    HostNetwork,
    #[error("service account \"{name}\" not found in namespace \"{namespace}\": workload identity mutates a pod from its service account's annotations ({CLIENT_ID_ANNOTATION})")]
    ServiceAccountNotFound { namespace: String, name: String },
}

/// Whether the pod asks for workload identity (its label, exactly `"true"`).
pub fn wants_identity(pod: &Value) -> bool {
    pod["metadata"]["labels"][USE_LABEL].as_str() == Some("true")
}

fn annotation<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v["metadata"]["annotations"][key]
        .as_str()
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// A boolean annotation of ours read as Go's `strconv.ParseBool` reads a true value.
fn flag(v: &Value, key: &str) -> bool {
    matches!(
        annotation(v, key),
        Some("1" | "t" | "T" | "true" | "TRUE" | "True")
    )
}

/// Whether the pod asks for the IMDS proxy sidecar: the annotation's presence, whatever its
/// value (`""` and `"false"` included), as upstream's `shouldInjectProxySidecar` reads it
/// (`_, ok := pod.Annotations[InjectProxySidecarAnnotation]; return ok`).
pub fn wants_proxy_sidecar(pod: &Value) -> bool {
    pod["metadata"]["annotations"]
        .as_object()
        .is_some_and(|a| a.contains_key(INJECT_PROXY_SIDECAR_ANNOTATION))
}

/// Whether the pod gets the readiness gate under `mode`.
pub fn wants_readiness_gate(pod: &Value, mode: ReadinessGate) -> bool {
    match mode {
        ReadinessGate::Always => true,
        ReadinessGate::Never => false,
        ReadinessGate::Annotated => flag(pod, READINESS_GATE_ANNOTATION),
    }
}

/// The proxy's port: the pod's annotation, else `default`; not a port is a refusal.
pub fn proxy_port(pod: &Value, default: u16) -> Result<u16, MutationError> {
    match annotation(pod, PROXY_SIDECAR_PORT_ANNOTATION) {
        None => Ok(default),
        Some(raw) => raw
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| MutationError::ProxyPort(raw.to_string())),
    }
}

/// The proxy's init container and container (before the environment and mount are added).
pub fn proxy_containers(image: &str, port: u16) -> (Value, Value) {
    let p = port.to_string();
    let init = json!({
        "name": PROXY_INIT_CONTAINER,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["keyless", "wi-proxy", "init", "--proxy-port", p],
        "securityContext": {
            "privileged": true,
            "runAsUser": 0,
            "capabilities": {"add": ["NET_ADMIN"], "drop": ["ALL"]},
        },
    });
    let serve = json!({
        "name": PROXY_CONTAINER,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["keyless", "wi-proxy", "serve", "--port", p],
        "ports": [{"containerPort": port, "name": "azwi-proxy", "protocol": "TCP"}],
        "securityContext": {
            "allowPrivilegeEscalation": false,
            "capabilities": {"drop": ["ALL"]},
            "privileged": false,
            "readOnlyRootFilesystem": true,
            "runAsNonRoot": true,
            "runAsUser": PROXY_UID,
        },
    });
    (init, serve)
}

/// The projected token's lifetime: the pod's annotation, else the service account's, else the
/// default; outside the range is a refusal.
pub fn token_expiration(pod: &Value, service_account: &Value) -> Result<i64, MutationError> {
    let Some(raw) = annotation(pod, TOKEN_EXPIRATION_ANNOTATION)
        .or_else(|| annotation(service_account, TOKEN_EXPIRATION_ANNOTATION))
    else {
        return Ok(DEFAULT_EXPIRATION);
    };
    match raw.parse::<i64>() {
        Ok(s) if (MIN_EXPIRATION..=MAX_EXPIRATION).contains(&s) => Ok(s),
        _ => Err(MutationError::Expiration(raw.to_string())),
    }
}

/// The environment a mutated container gets (name → value), empty values left out.
pub fn environment(service_account: &Value, d: &Defaults) -> BTreeMap<&'static str, String> {
    let mut env = BTreeMap::new();
    let mut put = |k: &'static str, v: Option<&str>| {
        if let Some(v) = v.filter(|v| !v.is_empty()) {
            env.insert(k, v.to_string());
        }
    };
    put(
        "AZURE_CLIENT_ID",
        annotation(service_account, CLIENT_ID_ANNOTATION),
    );
    put(
        "AZURE_TENANT_ID",
        annotation(service_account, TENANT_ID_ANNOTATION).or(Some(d.tenant_id.as_str())),
    );
    put(
        "AZURE_FEDERATED_TOKEN_FILE",
        Some(&format!("{TOKEN_MOUNT_PATH}/{TOKEN_FILE}")),
    );
    put("AZURE_AUTHORITY_HOST", Some(d.authority_host.as_str()));
    env
}

/// The JSON Patch that mutates `pod` (empty when nothing is missing); `service_account` is the
/// pod's service account object (its annotations). The caller checks [`wants_identity`] first.
///
/// The ops on the containers the pod has come first (their indexes as sent), then the proxy's
/// two containers prepended (index 0), so every path holds when the ops apply in order.
pub fn patch(
    pod: &Value,
    service_account: &Value,
    d: &Defaults,
) -> Result<Vec<Value>, MutationError> {
    let expiration = token_expiration(pod, service_account)?;
    let sidecar = if wants_proxy_sidecar(pod) {
        let port = proxy_port(pod, d.proxy_port)?;
        if pod["spec"]["hostNetwork"].as_bool() == Some(true) {
            return Err(MutationError::HostNetwork);
        }
        Some(port)
    } else {
        None
    };
    let env = environment(service_account, d);
    let skip: Vec<&str> = annotation(pod, SKIP_CONTAINERS_ANNOTATION)
        .map(|s| {
            s.split(';')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default();
    let mount = json!({"name": TOKEN_VOLUME, "mountPath": TOKEN_MOUNT_PATH, "readOnly": true});
    let mut ops = vec![];
    for kind in ["initContainers", "containers"] {
        let Some(containers) = pod["spec"][kind].as_array() else {
            continue;
        };
        for (i, c) in containers.iter().enumerate() {
            if c["name"].as_str().is_some_and(|n| skip.contains(&n)) {
                continue;
            }
            let base = format!("/spec/{kind}/{i}");
            // env: only the variables the container does not set itself
            let have: Vec<&str> = c["env"]
                .as_array()
                .map(|a| a.iter().filter_map(|e| e["name"].as_str()).collect())
                .unwrap_or_default();
            let missing: Vec<Value> = env
                .iter()
                .filter(|(k, _)| !have.contains(k))
                .map(|(k, v)| json!({"name": k, "value": v}))
                .collect();
            append(
                &mut ops,
                &format!("{base}/env"),
                c["env"].is_array(),
                missing,
            );
            // the token's mount, unless that volume or that path is mounted already
            let mounted = c["volumeMounts"].as_array().is_some_and(|a| {
                a.iter().any(|m| {
                    m["name"].as_str() == Some(TOKEN_VOLUME)
                        || m["mountPath"].as_str() == Some(TOKEN_MOUNT_PATH)
                })
            });
            if !mounted {
                append(
                    &mut ops,
                    &format!("{base}/volumeMounts"),
                    c["volumeMounts"].is_array(),
                    vec![mount.clone()],
                );
            }
        }
    }
    let has_volume = pod["spec"]["volumes"]
        .as_array()
        .is_some_and(|a| a.iter().any(|v| v["name"].as_str() == Some(TOKEN_VOLUME)));
    if !has_volume {
        let v = json!({"name": TOKEN_VOLUME, "projected": {"sources": [{"serviceAccountToken": {
            "path": TOKEN_FILE, "expirationSeconds": expiration, "audience": d.audience}}]}});
        append(
            &mut ops,
            "/spec/volumes",
            pod["spec"]["volumes"].is_array(),
            vec![v],
        );
    }
    if wants_readiness_gate(pod, d.readiness_gate) {
        let gated = pod["spec"]["readinessGates"].as_array().is_some_and(|a| {
            a.iter()
                .any(|g| g["conditionType"].as_str() == Some(READINESS_CONDITION))
        });
        if !gated {
            append(
                &mut ops,
                "/spec/readinessGates",
                pod["spec"]["readinessGates"].is_array(),
                vec![json!({"conditionType": READINESS_CONDITION})],
            );
        }
    }
    if let Some(port) = sidecar {
        let (init, serve) = proxy_containers(&d.proxy_image, port);
        let full_env: Vec<Value> = env
            .iter()
            .map(|(k, v)| json!({"name": k, "value": v}))
            .collect();
        for (kind, mut c) in [("initContainers", init), ("containers", serve)] {
            let name = c["name"].clone();
            let present = pod["spec"][kind]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x["name"] == name));
            if present {
                continue;
            }
            c["env"] = Value::Array(full_env.clone());
            c["volumeMounts"] = json!([mount]);
            if pod["spec"][kind].is_array() {
                ops.push(json!({"op": "add", "path": format!("/spec/{kind}/0"), "value": c}));
            } else {
                ops.push(json!({"op": "add", "path": format!("/spec/{kind}"), "value": [c]}));
            }
        }
    }
    Ok(ops)
}

/// The namespace of an `AdmissionReview` request (its `namespace`, else the object's).
pub fn request_namespace(request: &Value) -> &str {
    request["request"]["namespace"]
        .as_str()
        .filter(|s| !s.is_empty())
        .or_else(|| request["request"]["object"]["metadata"]["namespace"].as_str())
        .unwrap_or("")
}

/// Whether the webhook mutates this request at all: a pod (the request's `kind`, when sent)
/// being created (its `operation`, when sent), outside `kube-system`, labelled to ask.
pub fn in_scope(request: &Value) -> bool {
    let r = &request["request"];
    let kind_ok = r["kind"]["kind"].as_str().is_none_or(|k| k == "Pod");
    let op_ok = r["operation"].as_str().is_none_or(|o| o == "CREATE");
    kind_ok
        && op_ok
        && request_namespace(request) != SYSTEM_NAMESPACE
        && wants_identity(&r["object"])
}

/// The service account the webhook must read for `request` (namespace, name): None when the
/// request is not [`in_scope`] (no lookup needed).
pub fn service_account_ref(request: &Value) -> Option<(&str, &str)> {
    in_scope(request).then(|| {
        (
            request_namespace(request),
            service_account_name(&request["request"]["object"]),
        )
    })
}

/// The `admission.k8s.io/v1` answer to an `AdmissionReview` request for a pod CREATE:
/// `service_account` is the pod's service account (looked up by the caller, only when
/// [`service_account_ref`] names one, from the request's namespace and
/// `spec.serviceAccountName`, default `default`; None when it does not exist).
/// A pod that does not ask, one in `kube-system`, another kind or operation are allowed
/// unchanged (whatever `service_account`); a pod that asks without a service account, or
/// that the rules refuse, is `allowed: false` with the reason (status 400); otherwise the
/// patch, base64 JSON, `patchType: JSONPatch`. The request's `uid` is echoed, as the API
/// server requires.
pub fn review(request: &Value, service_account: Option<&Value>, d: &Defaults) -> Value {
    if !in_scope(request) {
        return allowed(request);
    }
    let pod = &request["request"]["object"];
    let Some(sa) = service_account else {
        let e = MutationError::ServiceAccountNotFound {
            namespace: request_namespace(request).to_string(),
            name: service_account_name(pod).to_string(),
        };
        return refused(request, 400, "BadRequest", &e.to_string());
    };
    match patch(pod, sa, d) {
        Ok(ops) if ops.is_empty() => allowed(request),
        Ok(ops) => {
            use base64::Engine;
            let bytes = serde_json::to_vec(&ops).unwrap_or_default();
            answer(
                request,
                json!({"patchType": "JSONPatch",
                "patch": base64::engine::general_purpose::STANDARD.encode(bytes)}),
            )
        }
        Err(e) => refused(request, 400, "BadRequest", &e.to_string()),
    }
}

/// `request` allowed unchanged.
pub fn allowed(request: &Value) -> Value {
    answer(request, json!({}))
}

/// `request` refused with `code` (an HTTP status), `reason` (a Kubernetes `StatusReason`) and
/// `message` (what the client is told).
pub fn refused(request: &Value, code: u16, reason: &str, message: &str) -> Value {
    answer(
        request,
        json!({"allowed": false, "status": {"code": code, "message": message, "reason": reason}}),
    )
}

fn answer(request: &Value, extra: Value) -> Value {
    let mut r = json!({"uid": request["request"]["uid"].clone(), "allowed": true});
    if let (Value::Object(r), Value::Object(x)) = (&mut r, extra) {
        r.extend(x);
    }
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": r})
}

/// The service account a pod runs as (`spec.serviceAccountName`, default `default`).
pub fn service_account_name(pod: &Value) -> &str {
    pod["spec"]["serviceAccountName"]
        .as_str()
        .filter(|s| !s.is_empty())
        .unwrap_or("default")
}

/// Ops adding `items` to the array at `path`: the whole array when there is none yet, else
/// one `/-` append each.
fn append(ops: &mut Vec<Value>, path: &str, exists: bool, items: Vec<Value>) {
    if items.is_empty() {
        return;
    }
    if exists {
        for it in items {
            ops.push(json!({"op": "add", "path": format!("{path}/-"), "value": it}));
        }
    } else {
        ops.push(json!({"op": "add", "path": path, "value": items}));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Defaults {
        Defaults {
            proxy_image: "registry.example/keyless:1".into(),
            ..Defaults::new("tenant-default", "https://keyless.example:8443/")
        }
    }

    fn sa(annotations: Value) -> Value {
        json!({"metadata": {"name": "web", "namespace": "app", "annotations": annotations}})
    }

    /// Apply the ops the way the API server does (RFC 6902 `add`: at an object key, at `/-`, or
    /// inserted at an array index).
    fn apply(mut doc: Value, ops: &[Value]) -> Value {
        for op in ops {
            assert_eq!(op["op"], "add");
            let path = op["path"].as_str().unwrap();
            let (parent, last) = path.rsplit_once('/').unwrap();
            let target = doc.pointer_mut(parent).expect("parent exists");
            if let Some(a) = target.as_array_mut() {
                if last == "-" {
                    a.push(op["value"].clone());
                } else {
                    let i: usize = last.parse().expect("an index");
                    assert!(i <= a.len(), "{path}: index out of range");
                    a.insert(i, op["value"].clone());
                }
            } else {
                assert!(target.is_object(), "{path}: parent is not an object");
                target[last] = op["value"].clone();
            }
        }
        doc
    }

    fn env_of(c: &Value) -> BTreeMap<String, String> {
        c["env"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|e| {
                        (
                            e["name"].as_str().unwrap().to_string(),
                            e["value"].as_str().unwrap().to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn request(pod: Value, ns: &str) -> Value {
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "u", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "operation": "CREATE", "namespace": ns, "object": pod}})
    }

    fn patched(r: &Value) -> Vec<Value> {
        use base64::Engine;
        match r["response"]["patch"].as_str() {
            None => vec![],
            Some(p) => serde_json::from_slice(
                &base64::engine::general_purpose::STANDARD.decode(p).unwrap(),
            )
            .unwrap(),
        }
    }

    #[test]
    fn the_readiness_gate_when_asked_and_once() {
        let pod = |ann: Value, gates: Option<Value>| {
            let mut p = json!({"metadata": {"labels": {USE_LABEL: "true"}, "annotations": ann},
                "spec": {"containers": [{"name": "app"}]}});
            if let Some(g) = gates {
                p["spec"]["readinessGates"] = g;
            }
            p
        };
        let gate = json!({"conditionType": READINESS_CONDITION});
        let sa = sa(json!({CLIENT_ID_ANNOTATION: "cid"}));
        let gates_of = |p: Value, mode: ReadinessGate| {
            let d = Defaults {
                readiness_gate: mode,
                ..defaults()
            };
            let ops = patch(&p, &sa, &d).unwrap();
            let out = apply(p, &ops);
            // reinvocation adds nothing
            assert!(patch(&out, &sa, &d).unwrap().is_empty());
            out["spec"]["readinessGates"].clone()
        };
        let asked = json!({READINESS_GATE_ANNOTATION: "true"});
        assert_eq!(
            gates_of(pod(asked.clone(), None), ReadinessGate::Annotated),
            json!([gate])
        );
        assert_eq!(
            gates_of(pod(json!({}), None), ReadinessGate::Annotated),
            Value::Null
        );
        assert_eq!(
            gates_of(
                pod(json!({READINESS_GATE_ANNOTATION: "false"}), None),
                ReadinessGate::Annotated
            ),
            Value::Null
        );
        assert_eq!(
            gates_of(pod(json!({}), None), ReadinessGate::Always),
            json!([gate])
        );
        assert_eq!(
            gates_of(pod(asked.clone(), None), ReadinessGate::Never),
            Value::Null
        );
        // another gate kept, ours appended; ours already there: not twice
        let other = json!({"conditionType": "example.com/other"});
        assert_eq!(
            gates_of(
                pod(asked.clone(), Some(json!([other]))),
                ReadinessGate::Annotated
            ),
            json!([other, gate])
        );
        assert_eq!(
            gates_of(pod(asked, Some(json!([gate]))), ReadinessGate::Always),
            json!([gate])
        );
        assert_eq!("ALWAYS".parse::<ReadinessGate>(), Ok(ReadinessGate::Always));
        assert!("sometimes".parse::<ReadinessGate>().is_err());
        // the CLI's default_value_t prints the default and parses it back
        for g in [
            ReadinessGate::Annotated,
            ReadinessGate::Always,
            ReadinessGate::Never,
        ] {
            assert_eq!(g.to_string().parse::<ReadinessGate>(), Ok(g));
        }
        assert_eq!(ReadinessGate::default().to_string(), "annotated");
        let d = Defaults::new("t", "https://a/");
        assert_eq!(
            (d.readiness_gate, d.proxy_image.as_str(), d.proxy_port),
            (
                ReadinessGate::Annotated,
                DEFAULT_PROXY_IMAGE,
                DEFAULT_PROXY_PORT
            )
        );
    }

    #[test]
    fn the_proxy_sidecar_is_prepended_with_the_same_environment() {
        let pod = |ann: Value| {
            json!({"metadata": {"labels": {USE_LABEL: "true"}, "annotations": ann},
                "spec": {"initContainers": [{"name": "setup"}],
                         "containers": [{"name": "app", "env": [{"name": "X", "value": "1"}]}]}})
        };
        let sa = sa(json!({CLIENT_ID_ANNOTATION: "cid"}));
        let p = pod(json!({INJECT_PROXY_SIDECAR_ANNOTATION: "true",
            PROXY_SIDECAR_PORT_ANNOTATION: "8123"}));
        let ops = patch(&p, &sa, &defaults()).unwrap();
        let out = apply(p, &ops);
        let init = &out["spec"]["initContainers"];
        let cs = &out["spec"]["containers"];
        assert_eq!(
            (
                init[0]["name"].as_str(),
                init[1]["name"].as_str(),
                cs[0]["name"].as_str(),
                cs[1]["name"].as_str()
            ),
            (
                Some(PROXY_INIT_CONTAINER),
                Some("setup"),
                Some(PROXY_CONTAINER),
                Some("app")
            )
        );
        assert_eq!(
            init[0]["command"],
            json!(["keyless", "wi-proxy", "init", "--proxy-port", "8123"])
        );
        assert_eq!(
            init[0]["securityContext"]["capabilities"]["add"],
            json!(["NET_ADMIN"])
        );
        assert_eq!(init[0]["securityContext"]["privileged"], true);
        assert_eq!(
            cs[0]["command"],
            json!(["keyless", "wi-proxy", "serve", "--port", "8123"])
        );
        assert_eq!(cs[0]["securityContext"]["runAsUser"], PROXY_UID);
        assert_eq!(cs[0]["image"], "registry.example/keyless:1");
        // every container, the proxy's included, has the same environment and mount
        let want = env_of(&cs[0]);
        assert_eq!(want["AZURE_CLIENT_ID"], "cid");
        assert_eq!(want.len(), 4);
        for c in [&init[0], &init[1], &cs[0], &cs[1]] {
            let e = env_of(c);
            for (k, v) in &want {
                assert_eq!(e.get(k), Some(v), "{}: {k}", c["name"]);
            }
            assert!(c["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["name"] == TOKEN_VOLUME && m["mountPath"] == TOKEN_MOUNT_PATH));
        }
        assert_eq!(env_of(&cs[1])["X"], "1");
        // reinvocation: nothing more
        assert!(patch(&out, &sa, &defaults()).unwrap().is_empty());

        // no init containers yet; the webhook's default port
        let p = json!({"metadata": {"labels": {USE_LABEL: "true"},
                "annotations": {INJECT_PROXY_SIDECAR_ANNOTATION: "true"}},
            "spec": {"containers": [{"name": "app"}]}});
        let d = Defaults {
            proxy_port: 9000,
            ..defaults()
        };
        let out = apply(p.clone(), &patch(&p, &sa, &d).unwrap());
        assert_eq!(
            out["spec"]["initContainers"][0]["command"][4], "9000",
            "{out}"
        );
        assert_eq!(out["spec"]["containers"][1]["name"], "app");
        // the annotation's presence asks, whatever its value (upstream's
        // shouldInjectProxySidecar): "", "false" and "no" inject too; absent does not
        for v in ["", "false", "no", "true"] {
            let p = pod(json!({INJECT_PROXY_SIDECAR_ANNOTATION: v}));
            assert!(wants_proxy_sidecar(&p), "{v:?}");
            let out = apply(p.clone(), &patch(&p, &sa, &defaults()).unwrap());
            let names: Vec<&str> = out["spec"]["containers"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|c| c["name"].as_str())
                .collect();
            assert_eq!(names, [PROXY_CONTAINER, "app"], "{v:?}");
            assert_eq!(
                out["spec"]["initContainers"][0]["name"], PROXY_INIT_CONTAINER,
                "{v:?}"
            );
        }
        for p in [
            pod(json!({})),
            pod(json!({PROXY_SIDECAR_PORT_ANNOTATION: "8123"})),
            json!({"metadata": {"labels": {USE_LABEL: "true"}},
                "spec": {"containers": [{"name": "app"}]}}),
        ] {
            assert!(!wants_proxy_sidecar(&p), "{p}");
            let out = apply(p.clone(), &patch(&p, &sa, &defaults()).unwrap());
            assert_eq!(out["spec"]["containers"].as_array().unwrap().len(), 1);
        }
        // a bad port and hostNetwork: refused
        for bad in ["0", "65536", "http", "-1"] {
            let p = pod(json!({INJECT_PROXY_SIDECAR_ANNOTATION: "true",
                PROXY_SIDECAR_PORT_ANNOTATION: bad}));
            assert_eq!(
                patch(&p, &sa, &defaults()),
                Err(MutationError::ProxyPort(bad.into()))
            );
        }
        let mut p = pod(json!({INJECT_PROXY_SIDECAR_ANNOTATION: "true"}));
        p["spec"]["hostNetwork"] = json!(true);
        assert_eq!(patch(&p, &sa, &defaults()), Err(MutationError::HostNetwork));
        let r = review(&request(p.clone(), "app"), Some(&sa), &defaults());
        assert_eq!(r["response"]["allowed"], false);
        assert_eq!(r["response"]["status"]["code"], 400);
        assert!(r["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("hostNetwork"));
        // hostNetwork without the sidecar is mutated as any pod
        p["metadata"]["annotations"] = json!({});
        assert!(!patch(&p, &sa, &defaults()).unwrap().is_empty());
    }

    #[test]
    fn kube_system_other_kinds_and_operations_are_left_alone() {
        let pod = json!({"metadata": {"labels": {USE_LABEL: "true"}},
            "spec": {"serviceAccountName": "web", "containers": [{"name": "app"}]}});
        let sa = sa(json!({CLIENT_ID_ANNOTATION: "cid"}));
        let r = review(&request(pod.clone(), "app"), Some(&sa), &defaults());
        assert!(!patched(&r).is_empty());
        assert_eq!(
            service_account_ref(&request(pod.clone(), "app")),
            Some(("app", "web"))
        );
        let sys = request(pod.clone(), SYSTEM_NAMESPACE);
        assert_eq!(service_account_ref(&sys), None);
        let r = review(&sys, Some(&sa), &defaults());
        assert_eq!(
            (r["response"]["allowed"].as_bool(), patched(&r).len()),
            (Some(true), 0)
        );
        // the namespace from the object when the request has none
        let mut sys2 = request(pod.clone(), "");
        sys2["request"]["object"]["metadata"]["namespace"] = json!(SYSTEM_NAMESPACE);
        assert_eq!(request_namespace(&sys2), SYSTEM_NAMESPACE);
        assert!(patched(&review(&sys2, Some(&sa), &defaults())).is_empty());
        let mut upd = request(pod.clone(), "app");
        upd["request"]["operation"] = json!("UPDATE");
        assert!(patched(&review(&upd, Some(&sa), &defaults())).is_empty());
        let mut other = request(pod.clone(), "app");
        other["request"]["kind"]["kind"] = json!("Deployment");
        assert!(patched(&review(&other, Some(&sa), &defaults())).is_empty());
        // unlabelled: no lookup, no patch
        let plain = request(
            json!({"metadata": {}, "spec": {"containers": [{"name": "a"}]}}),
            "app",
        );
        assert_eq!(service_account_ref(&plain), None);
        assert!(patched(&review(&plain, None, &defaults())).is_empty());
        // refusals echo the uid in the v1 shape
        let r = refused(&plain, 500, "InternalError", "no");
        assert_eq!(
            r,
            json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                "response": {"uid": "u", "allowed": false,
                    "status": {"code": 500, "message": "no", "reason": "InternalError"}}})
        );
    }

    #[test]
    fn a_pod_whose_service_account_is_missing_is_refused() {
        let pod = json!({"metadata": {"labels": {USE_LABEL: "true"}},
            "spec": {"serviceAccountName": "ghost", "containers": [{"name": "app"}]}});
        let req = request(pod.clone(), "app");
        assert_eq!(service_account_ref(&req), Some(("app", "ghost")));
        let r = review(&req, None, &defaults());
        assert_eq!(r["response"]["uid"], "u");
        assert_eq!(r["response"]["allowed"], false, "{r}");
        assert_eq!(r["response"]["status"]["code"], 400, "{r}");
        assert_eq!(r["response"]["status"]["reason"], "BadRequest", "{r}");
        assert!(r["response"].get("patch").is_none(), "{r}");
        let msg = r["response"]["status"]["message"].as_str().unwrap();
        assert!(
            msg.contains("\"ghost\"") && msg.contains("namespace \"app\""),
            "{msg}"
        );
        // the default service account when the pod names none
        let mut unnamed = pod.clone();
        unnamed["spec"]
            .as_object_mut()
            .unwrap()
            .remove("serviceAccountName");
        let r = review(&request(unnamed, "app"), None, &defaults());
        assert_eq!(r["response"]["status"]["code"], 400, "{r}");
        assert!(r["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("\"default\""));
        // with the service account: mutated
        let sa = sa(json!({CLIENT_ID_ANNOTATION: "cid"}));
        assert!(!patched(&review(&req, Some(&sa), &defaults())).is_empty());
        // not in scope: allowed unchanged without a service account (none is looked up)
        let sys = request(pod.clone(), SYSTEM_NAMESPACE);
        assert_eq!(service_account_ref(&sys), None);
        let r = review(&sys, None, &defaults());
        assert_eq!(
            (r["response"]["allowed"].as_bool(), patched(&r).len()),
            (Some(true), 0)
        );
        let mut plain = pod.clone();
        plain["metadata"]["labels"] = json!({});
        let plain = request(plain, "app");
        assert_eq!(service_account_ref(&plain), None);
        assert_eq!(
            review(&plain, None, &defaults())["response"]["allowed"],
            true
        );
        let mut upd = req.clone();
        upd["request"]["operation"] = json!("UPDATE");
        assert_eq!(service_account_ref(&upd), None);
        assert_eq!(review(&upd, None, &defaults())["response"]["allowed"], true);
    }

    #[test]
    fn every_container_gets_the_environment_and_the_token() {
        let pod = json!({"metadata": {"labels": {USE_LABEL: "true"}},
            "spec": {"initContainers": [{"name": "init"}],
                     "containers": [{"name": "app", "env": [{"name": "AZURE_CLIENT_ID", "value": "mine"}]},
                                    {"name": "side", "volumeMounts": [{"name": "x", "mountPath": "/x"}]}]}});
        assert!(wants_identity(&pod));
        let sa = sa(json!({CLIENT_ID_ANNOTATION: "cid", TOKEN_EXPIRATION_ANNOTATION: "7200"}));
        let ops = patch(&pod, &sa, &defaults()).unwrap();
        let out = apply(pod, &ops);
        for c in [
            "/spec/initContainers/0",
            "/spec/containers/0",
            "/spec/containers/1",
        ] {
            let c = out.pointer(c).unwrap();
            let env: BTreeMap<&str, &str> = c["env"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| (e["name"].as_str().unwrap(), e["value"].as_str().unwrap()))
                .collect();
            assert_eq!(env["AZURE_TENANT_ID"], "tenant-default");
            assert_eq!(
                env["AZURE_FEDERATED_TOKEN_FILE"],
                "/var/run/secrets/azure/tokens/azure-identity-token"
            );
            assert_eq!(env["AZURE_AUTHORITY_HOST"], "https://keyless.example:8443/");
            assert!(c["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["name"] == TOKEN_VOLUME
                    && m["mountPath"] == TOKEN_MOUNT_PATH
                    && m["readOnly"] == true));
        }
        // the container's own value is kept, not duplicated
        let app = &out["spec"]["containers"][0]["env"];
        assert_eq!(
            app.as_array()
                .unwrap()
                .iter()
                .filter(|e| e["name"] == "AZURE_CLIENT_ID")
                .count(),
            1
        );
        assert_eq!(app[0]["value"], "mine");
        assert_eq!(
            out["spec"]["containers"][1]["env"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["name"] == "AZURE_CLIENT_ID")
                .unwrap()["value"],
            "cid"
        );
        let v = &out["spec"]["volumes"][0];
        assert_eq!(v["name"], TOKEN_VOLUME);
        let t = &v["projected"]["sources"][0]["serviceAccountToken"];
        assert_eq!(
            (
                t["audience"].as_str(),
                t["expirationSeconds"].as_i64(),
                t["path"].as_str()
            ),
            (Some(DEFAULT_AUDIENCE), Some(7200), Some(TOKEN_FILE))
        );
        // mutating the mutated pod changes nothing (reinvocation)
        assert!(patch(&out, &sa, &defaults()).unwrap().is_empty());
    }

    #[test]
    fn annotations_as_upstream_reads_them() {
        let pod = |ann: Value| {
            json!({"metadata": {"labels": {USE_LABEL: "true"}, "annotations": ann},
            "spec": {"containers": [{"name": "app"}, {"name": "skip-me"}, {"name": "too"}]}})
        };
        // skip-containers: ';'-separated
        let ops = patch(
            &pod(json!({SKIP_CONTAINERS_ANNOTATION: "skip-me; too"})),
            &sa(json!({})),
            &defaults(),
        )
        .unwrap();
        let out = apply(
            pod(json!({SKIP_CONTAINERS_ANNOTATION: "skip-me; too"})),
            &ops,
        );
        assert!(out["spec"]["containers"][0]["env"].is_array());
        assert!(out["spec"]["containers"][1].get("env").is_none());
        assert!(out["spec"]["containers"][2].get("env").is_none());
        // no client id annotation: no empty AZURE_CLIENT_ID; the SA's tenant wins the default
        let env = environment(&sa(json!({TENANT_ID_ANNOTATION: "t2"})), &defaults());
        assert!(!env.contains_key("AZURE_CLIENT_ID"));
        assert_eq!(env["AZURE_TENANT_ID"], "t2");
        // expiration: the pod's annotation wins; out of range refused
        let s = sa(json!({TOKEN_EXPIRATION_ANNOTATION: "4000"}));
        assert_eq!(
            token_expiration(&pod(json!({TOKEN_EXPIRATION_ANNOTATION: "5000"})), &s),
            Ok(5000)
        );
        assert_eq!(token_expiration(&pod(json!({})), &s), Ok(4000));
        assert_eq!(
            token_expiration(&pod(json!({})), &sa(json!({}))),
            Ok(DEFAULT_EXPIRATION)
        );
        for bad in ["3599", "86401", "1h", "-1"] {
            assert!(
                token_expiration(&pod(json!({TOKEN_EXPIRATION_ANNOTATION: bad})), &s).is_err(),
                "{bad}"
            );
        }
        // the label must say exactly "true"
        for v in [json!("false"), json!("True"), json!(true)] {
            assert!(!wants_identity(
                &json!({"metadata": {"labels": {USE_LABEL: v}}})
            ));
        }
        assert!(!wants_identity(&json!({"metadata": {}})));
    }

    #[test]
    fn admission_reviews_echo_the_uid_and_carry_the_patch() {
        use base64::Engine;
        let pod = json!({"metadata": {"labels": {USE_LABEL: "true"}},
            "spec": {"serviceAccountName": "web", "containers": [{"name": "app"}]}});
        assert_eq!(service_account_name(&pod), "web");
        assert_eq!(service_account_name(&json!({"spec": {}})), "default");
        let req = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "u-1", "object": pod}});
        let sa = sa(json!({CLIENT_ID_ANNOTATION: "cid"}));
        let r = review(&req, Some(&sa), &defaults());
        assert_eq!(r["kind"], "AdmissionReview");
        assert_eq!(r["response"]["uid"], "u-1");
        assert_eq!(r["response"]["allowed"], true);
        assert_eq!(r["response"]["patchType"], "JSONPatch");
        let ops: Vec<Value> = serde_json::from_slice(
            &base64::engine::general_purpose::STANDARD
                .decode(r["response"]["patch"].as_str().unwrap())
                .unwrap(),
        )
        .unwrap();
        let out = apply(req["request"]["object"].clone(), &ops);
        assert_eq!(out["spec"]["volumes"][0]["name"], TOKEN_VOLUME);
        // not asking: allowed, no patch
        let plain = json!({"request": {"uid": "u-2", "object": {"metadata": {}, "spec": {"containers": []}}}});
        let r = review(&plain, None, &defaults());
        assert_eq!(
            (
                r["response"]["allowed"].as_bool(),
                r["response"].get("patch")
            ),
            (Some(true), None)
        );
        // a bad expiration: refused with the reason
        let bad = json!({"request": {"uid": "u-3", "object": {"metadata": {"labels": {USE_LABEL: "true"},
            "annotations": {TOKEN_EXPIRATION_ANNOTATION: "10"}}, "spec": {"containers": [{"name": "a"}]}}}});
        let r = review(&bad, Some(&sa), &defaults());
        assert_eq!(r["response"]["allowed"], false);
        assert_eq!(r["response"]["uid"], "u-3");
        assert_eq!(r["response"]["status"]["code"], 400);
        assert!(r["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("3600"));
    }
}
