//! A watch-fed cache of one kind (kube-runtime's reflector) whose every event wakes a
//! controller's reconcile: MIC's caches and the workload-identity loops' pods and service
//! accounts.

use futures::TryStreamExt;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Resource;
use std::sync::Arc;

/// A cache of `api`'s objects, kept by a watch in a task pushed to `tasks` (with the default
/// back-off on errors, each logged as `what`'s); every event notifies `wake`.
pub(crate) fn reflect<K>(
    api: Api<K>,
    dt: K::DynamicType,
    wake: Arc<tokio::sync::Notify>,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
    what: &'static str,
) -> Store<K>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Clone + Eq + std::hash::Hash + Send + Sync + 'static,
{
    let writer = reflector::store::Writer::new(dt);
    let reader = writer.as_reader();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer);
    tasks.push(tokio::spawn(async move {
        let mut s = std::pin::pin!(stream);
        loop {
            match s.try_next().await {
                Ok(Some(_)) => wake.notify_one(),
                Ok(None) => break,
                Err(e) => tracing::warn!(error = %e, "{what} watch failed; retrying"),
            }
        }
    }));
    reader
}
