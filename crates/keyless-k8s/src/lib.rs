//! The Kubernetes side of pod identity (seed 000): the `aadpodidentity.k8s.io/v1` CRDs
//! ([`crd`]), building an API client from a kubeconfig or the in-cluster environment
//! ([`client`]), and the AKS-style add-on controller that keeps the CRDs in step with the
//! cluster resource's `podIdentityProfile` ([`addon`]). NMI itself is a caller kind of the host
//! agent (`keyless-node`), which uses the types and client from here.

pub mod addon;
pub mod arm;
pub mod crd;
pub mod lease;
pub mod mic;
mod reflect;
pub mod testing;
pub mod webhook;
pub mod wi_addon;

pub use k8s_openapi;
pub use kube;

/// Errors talking to the Kubernetes API.
#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    #[error("kubeconfig {path}: {message}")]
    Config { path: String, message: String },
    #[error("kubernetes API: {0}")]
    Api(#[from] kube::Error),
}

/// A client from `kubeconfig` (a file), or from the environment (`KUBECONFIG`, in-cluster
/// service account) when `None`.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client, K8sError> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| K8sError::Config {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| K8sError::Config {
                    path: path.display().to_string(),
                    message: e.to_string(),
                })?
        }
        None => kube::Config::infer().await.map_err(|e| K8sError::Config {
            path: "(environment)".to_string(),
            message: e.to_string(),
        })?,
    };
    Ok(kube::Client::try_from(config)?)
}
