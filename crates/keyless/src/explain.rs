//! `keyless aks pod-identity explain`: why a pod gets (or does not get) an identity through
//! NMI (`keyless_core::pod_explain`). With `--agent` the agent of the pod's node answers from
//! what it sees (its watches, its node's identities, its last refusals); without, the answer is
//! built here from the API server's objects by the same rules.

use crate::CliError;
use keyless_core::mic::Existing;
use keyless_core::pod_explain as pe;
use keyless_core::pod_identity::{self as pi, ClusterView, Namespacing};
use keyless_k8s::crd::{
    read, AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding, AzurePodIdentityException,
};
use keyless_k8s::kube;
use keyless_k8s::kube::api::{Api, ApiResource, DynamicObject, ListParams};
use serde_json::Value;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct ExplainArgs {
    /// The pod's namespace.
    #[arg(long)]
    pub namespace: String,
    /// The pod's name.
    #[arg(long)]
    pub pod: String,
    /// The client id the pod asks for (default: none, as a request without `client_id`).
    #[arg(long)]
    pub identity: Option<String>,
    /// Ask the agent of the pod's node (its NMI loopback endpoint, e.g. http://127.0.0.1:2579;
    /// run on that node): its answer carries the pod's last refusals.
    #[arg(long)]
    pub agent: Option<String>,
    /// Kubeconfig (default: KUBECONFIG, then the in-cluster service account).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// NMI's mode on the cluster (without --agent).
    #[arg(long, value_enum, default_value_t = crate::run::OperationMode::Managed)]
    pub operation_mode: crate::run::OperationMode,
    /// Standard mode with --forceNamespaced (without --agent).
    #[arg(long = "forceNamespaced", visible_alias = "force-namespaced")]
    pub force_namespaced: bool,
    /// With --cluster-name: a managed cluster, whose podIdentityProfile decides which objects
    /// count (as on its nodes).
    #[arg(short = 'g', long)]
    pub resource_group: Option<String>,
    #[arg(long, requires = "resource_group")]
    pub cluster_name: Option<String>,
}

pub async fn run(a: ExplainArgs, cluster: Option<Value>, json: bool) -> Result<(), CliError> {
    let e = match &a.agent {
        Some(url) => from_agent(url, &a).await?,
        None => from_api(&a, cluster.as_ref()).await?,
    };
    if json {
        say!("{}", serde_json::to_string_pretty(&e).unwrap_or_default());
    } else {
        print!("{}", pe::render_text(&e));
    }
    Ok(())
}

async fn from_agent(url: &str, a: &ExplainArgs) -> Result<pe::Explanation, CliError> {
    let base = url.trim_end_matches('/');
    let base = if base.starts_with("http://") || base.starts_with("https://") {
        base.to_string()
    } else {
        format!("http://{base}")
    };
    let mut q = vec![("namespace", a.namespace.as_str()), ("pod", a.pod.as_str())];
    if let Some(i) = &a.identity {
        q.push(("identity", i));
    }
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .no_proxy()
        .build()
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let query = serde_urlencoded::to_string(&q).unwrap_or_default();
    let resp = http
        .get(format!("{base}{}?{query}", keyless_node::nmi::EXPLAIN_PATH))
        .send()
        .await
        .map_err(|e| CliError::Usage(format!("the agent at {base}: {e}")))?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    if !status.is_success() {
        return Err(CliError::Usage(format!(
            "the agent at {base} answered {}: {}",
            status.as_u16(),
            text.trim()
        )));
    }
    serde_json::from_str(&text)
        .map_err(|e| CliError::Usage(format!("the agent at {base}: bad answer: {e}")))
}

fn untyped(client: &kube::Client, r: ApiResource) -> Api<DynamicObject> {
    Api::all_with(client.clone(), &r)
}

async fn list<T>(
    client: &kube::Client,
    r: ApiResource,
    read: impl Fn(&DynamicObject) -> Option<T>,
) -> Result<Vec<T>, CliError> {
    let items = untyped(client, r)
        .list(&ListParams::default())
        .await
        .map_err(|e| CliError::Usage(format!("kubernetes API: {e}")))?;
    Ok(items.items.iter().filter_map(read).collect())
}

/// The trust a managed cluster's profile implies (as the host view carries it to its nodes).
fn trust_of(cluster: Option<&Value>) -> pi::Trust {
    let Some(c) = cluster else {
        return pi::Trust::Operator;
    };
    let p = &c["properties"]["podIdentityProfile"];
    let s = |v: &Value, k: &str| v[k].as_str().unwrap_or_default().to_string();
    let view = ClusterView {
        id: s(c, "id"),
        pod_identity: pi::ClusterPodIdentity {
            enabled: p["enabled"].as_bool().unwrap_or(false),
            identities: p["userAssignedIdentities"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|i| pi::ProfileIdentity {
                    namespace: s(i, "namespace"),
                    name: s(i, "name"),
                    client_id: s(&i["identity"], "clientId"),
                })
                .collect(),
            exceptions: p["userAssignedIdentityExceptions"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| pi::ProfileException {
                    namespace: s(e, "namespace"),
                    name: s(e, "name"),
                })
                .collect(),
            ..Default::default()
        },
        ..Default::default()
    };
    pi::Trust::of(Some(&view))
}

async fn from_api(a: &ExplainArgs, cluster: Option<&Value>) -> Result<pe::Explanation, CliError> {
    let client = keyless_k8s::client(a.kubeconfig.as_deref())
        .await
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let pods: Api<keyless_k8s::k8s_openapi::api::core::v1::Pod> =
        Api::namespaced(client.clone(), &a.namespace);
    let pod = pods
        .get_opt(&a.pod)
        .await
        .map_err(|e| CliError::Usage(format!("kubernetes API: {e}")))?;
    let facts = pod.as_ref().and_then(read::pod);
    let bindings = list(
        &client,
        ApiResource::erase::<AzureIdentityBinding>(&()),
        read::binding,
    )
    .await?;
    let identities = list(
        &client,
        ApiResource::erase::<AzureIdentity>(&()),
        read::identity,
    )
    .await?;
    let exceptions = list(
        &client,
        ApiResource::erase::<AzurePodIdentityException>(&()),
        read::exception,
    )
    .await?;
    let rules = if cluster.is_some() {
        pe::Rules::Managed
    } else {
        match a.operation_mode {
            crate::run::OperationMode::Managed => pe::Rules::Managed,
            crate::run::OperationMode::Standard => pe::Rules::Standard(if a.force_namespaced {
                Namespacing::Always
            } else {
                Namespacing::ByIdentity
            }),
        }
    };
    let assigned: Vec<Existing> = if matches!(rules, pe::Rules::Standard(_)) {
        list(
            &client,
            ApiResource::erase::<AzureAssignedIdentity>(&()),
            |o| read::assigned(o).map(|(_, e)| e),
        )
        .await?
        .into_iter()
        .filter(|e| e.assignment.pod == a.pod && e.assignment.pod_namespace == a.namespace)
        // the pod's node's (NMI watches only those)
        .filter(|e| facts.as_ref().is_some_and(|f| f.node == e.assignment.node))
        .collect()
    } else {
        vec![]
    };
    let trust = trust_of(cluster);
    Ok(pe::explain(&pe::Facts {
        namespace: &a.namespace,
        name: &a.pod,
        pod: facts.as_ref(),
        agent_node: None,
        rules,
        trust: &trust,
        bindings: &bindings,
        identities: &identities,
        exceptions: &exceptions,
        assigned: &assigned,
        node_identities: None,
        requested: a.identity.as_deref(),
    }))
}
