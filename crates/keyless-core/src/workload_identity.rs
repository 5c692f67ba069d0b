//! Workload identity's pod mutation (issue 15, first step: the rules only, no webhook yet),
//! azure-workload-identity's contract (`../shared/spec/pod-identity.md` §3.2, the v1.5 layout):
//! a pod labelled `azure.workload.identity/use: "true"` gets, in every container (init and
//! regular) not named in `skip-containers`, the `AZURE_*` environment and a read-only mount of
//! the projected service-account token volume `azure-identity-token` (audience
//! `api://AzureADTokenExchange`) at `/var/run/secrets/azure/tokens`. Values already there are
//! never overwritten; a variable whose value would be empty is not injected (upstream #1593).
//! The answer is an RFC 6902 JSON Patch, as `admission.k8s.io/v1` wants it.

use serde_json::{json, Value};
use std::collections::BTreeMap;

pub const USE_LABEL: &str = "azure.workload.identity/use";
pub const CLIENT_ID_ANNOTATION: &str = "azure.workload.identity/client-id";
pub const TENANT_ID_ANNOTATION: &str = "azure.workload.identity/tenant-id";
pub const TOKEN_EXPIRATION_ANNOTATION: &str =
    "azure.workload.identity/service-account-token-expiration";
pub const SKIP_CONTAINERS_ANNOTATION: &str = "azure.workload.identity/skip-containers";

pub const TOKEN_VOLUME: &str = "azure-identity-token";
pub const TOKEN_MOUNT_PATH: &str = "/var/run/secrets/azure/tokens";
pub const TOKEN_FILE: &str = "azure-identity-token";
pub const DEFAULT_AUDIENCE: &str = "api://AzureADTokenExchange";
/// The projected token's lifetime: default and allowed range, in seconds (upstream's).
pub const DEFAULT_EXPIRATION: i64 = 3600;
pub const MIN_EXPIRATION: i64 = 3600;
pub const MAX_EXPIRATION: i64 = 86400;

/// What the webhook is configured with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Defaults {
    /// `AZURE_TENANT_ID` when the service account names none.
    pub tenant_id: String,
    /// `AZURE_AUTHORITY_HOST`: Keyless's token service URL.
    pub authority_host: String,
    pub audience: String,
}

/// Why a pod is refused (the admission answer's message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MutationError {
    #[error("{TOKEN_EXPIRATION_ANNOTATION} must be a number of seconds between {MIN_EXPIRATION} and {MAX_EXPIRATION}, got '{0}'")]
    Expiration(String),
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
pub fn patch(
    pod: &Value,
    service_account: &Value,
    d: &Defaults,
) -> Result<Vec<Value>, MutationError> {
    let expiration = token_expiration(pod, service_account)?;
    let env = environment(service_account, d);
    let skip: Vec<&str> = annotation(pod, SKIP_CONTAINERS_ANNOTATION)
        .map(|s| {
            s.split(';')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default();
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
                let m =
                    json!({"name": TOKEN_VOLUME, "mountPath": TOKEN_MOUNT_PATH, "readOnly": true});
                append(
                    &mut ops,
                    &format!("{base}/volumeMounts"),
                    c["volumeMounts"].is_array(),
                    vec![m],
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
    Ok(ops)
}

/// The `admission.k8s.io/v1` answer to an `AdmissionReview` request for a pod CREATE:
/// `service_account` is the pod's service account (looked up by the caller from the request's
/// namespace and `spec.serviceAccountName`, default `default`; None when it does not exist).
/// A pod that does not ask is allowed unchanged; a refusal is `allowed: false` with the reason
/// (status 400); otherwise the patch, base64 JSON, `patchType: JSONPatch`. The request's `uid`
/// is echoed, as the API server requires.
pub fn review(request: &Value, service_account: Option<&Value>, d: &Defaults) -> Value {
    let uid = request["request"]["uid"].clone();
    let pod = &request["request"]["object"];
    let answer = |extra: Value| {
        let mut r = json!({"uid": uid, "allowed": true});
        if let (Value::Object(r), Value::Object(x)) = (&mut r, extra) {
            r.extend(x);
        }
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": r})
    };
    if !wants_identity(pod) {
        return answer(json!({}));
    }
    let empty = json!({});
    let sa = service_account.unwrap_or(&empty);
    match patch(pod, sa, d) {
        Ok(ops) if ops.is_empty() => answer(json!({})),
        Ok(ops) => {
            use base64::Engine;
            let bytes = serde_json::to_vec(&ops).unwrap_or_default();
            answer(json!({"patchType": "JSONPatch",
                "patch": base64::engine::general_purpose::STANDARD.encode(bytes)}))
        }
        Err(e) => answer(json!({"allowed": false,
            "status": {"code": 400, "message": e.to_string(), "reason": "BadRequest"}})),
    }
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
            tenant_id: "tenant-default".into(),
            authority_host: "https://keyless.example:8443/".into(),
            audience: DEFAULT_AUDIENCE.into(),
        }
    }

    fn sa(annotations: Value) -> Value {
        json!({"metadata": {"name": "web", "namespace": "app", "annotations": annotations}})
    }

    /// Apply the ops the way the API server does (only `add` at object keys and `/-`).
    fn apply(mut doc: Value, ops: &[Value]) -> Value {
        for op in ops {
            assert_eq!(op["op"], "add");
            let path = op["path"].as_str().unwrap();
            let (parent, last) = path.rsplit_once('/').unwrap();
            let target = doc.pointer_mut(parent).expect("parent exists");
            if last == "-" {
                target.as_array_mut().unwrap().push(op["value"].clone());
            } else {
                target[last] = op["value"].clone();
            }
        }
        doc
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
