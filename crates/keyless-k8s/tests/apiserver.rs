//! The CRDs and the add-on's object reconciliation against a real kube-apiserver (1.20): the
//! CRDs are accepted (protected group, approval annotation), the objects AKS would write appear
//! with its names and labels, a manual edit is reverted on the next pass, a pod identity
//! dropped from the profile takes its objects along, and objects the add-on does not manage
//! are left alone.

use keyless_k8s::addon::{apply_desired, desired, install_crds, Profile};
use keyless_k8s::crd::{AzureIdentity, AzureIdentityBinding, AzurePodIdentityException};
use keyless_k8s::testing::ControlPlane;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

fn profile(with_second: bool) -> Profile {
    let mut ids = vec![json!({"name": "my-pod-identity", "namespace": "my-app",
        "identity": {"resourceId": "/subscriptions/s/resourceGroups/g/providers/Microsoft.ManagedIdentity/userAssignedIdentities/a",
                     "clientId": "11111111-1111-1111-1111-111111111111", "objectId": "o1"}})];
    if with_second {
        ids.push(json!({"name": "second", "namespace": "team-b", "bindingSelector": "foo",
            "identity": {"resourceId": "/subscriptions/s/resourceGroups/g/providers/Microsoft.ManagedIdentity/userAssignedIdentities/b",
                         "clientId": "22222222-2222-2222-2222-222222222222", "objectId": "o2"}}));
    }
    Profile::parse(&json!({"enabled": true, "userAssignedIdentities": ids,
        "userAssignedIdentityExceptions": [{"name": "probe", "namespace": "my-app", "podLabels": {"app": "probe"}}]}))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_on_objects_on_a_real_api_server() {
    let dir = tempfile::tempdir().unwrap();
    let Some(cp) = ControlPlane::start(dir.path(), "") else {
        return;
    };
    let client = cp.client().await;
    install_crds(&client).await.expect("CRDs accepted");

    let failed = apply_desired(&client, &desired(&profile(true)))
        .await
        .unwrap();
    assert!(failed.is_empty(), "{failed:?}");
    let ids: Api<AzureIdentity> = Api::namespaced(client.clone(), "team-b");
    let second = ids.get("second").await.unwrap();
    assert_eq!(
        second.spec.client_id.as_deref(),
        Some("22222222-2222-2222-2222-222222222222")
    );
    assert_eq!(
        second.metadata.labels.as_ref().unwrap()["kubernetes.azure.com/managedby"],
        "aks"
    );
    let bindings: Api<AzureIdentityBinding> = Api::namespaced(client.clone(), "team-b");
    assert_eq!(
        bindings.get("second-binding").await.unwrap().spec.selector,
        "foo"
    );
    let exc: Api<AzurePodIdentityException> = Api::namespaced(client.clone(), "kube-system");
    assert_eq!(
        exc.get("aks-addon-exception")
            .await
            .unwrap()
            .spec
            .pod_labels["kubernetes.azure.com/managedby"],
        "aks"
    );

    // a manual edit (another field manager) is reverted by the next pass
    let my_bindings: Api<AzureIdentityBinding> = Api::namespaced(client.clone(), "my-app");
    my_bindings
        .patch(
            "my-pod-identity-binding",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"selector": "hijacked"}})),
        )
        .await
        .unwrap();
    // an object of the user's own, without the add-on's labels, is not touched
    let mine = AzureIdentityBinding {
        metadata: kube::api::ObjectMeta {
            name: Some("users-own".into()),
            namespace: Some("my-app".into()),
            ..Default::default()
        },
        spec: keyless_k8s::crd::AzureIdentityBindingSpec {
            azure_identity: "my-pod-identity".into(),
            selector: "mine".into(),
            weight: None,
        },
        status: None,
    };
    my_bindings
        .create(&PostParams::default(), &mine)
        .await
        .unwrap();
    apply_desired(&client, &desired(&profile(true)))
        .await
        .unwrap();
    assert_eq!(
        my_bindings
            .get("my-pod-identity-binding")
            .await
            .unwrap()
            .spec
            .selector,
        "my-pod-identity"
    );

    // dropped from the profile: its identity and binding go, the rest stays
    apply_desired(&client, &desired(&profile(false)))
        .await
        .unwrap();
    assert!(ids.get_opt("second").await.unwrap().is_none());
    assert!(bindings.get_opt("second-binding").await.unwrap().is_none());
    assert!(my_bindings.get_opt("users-own").await.unwrap().is_some());
    let my_ids: Api<AzureIdentity> = Api::namespaced(client.clone(), "my-app");
    assert!(my_ids.get_opt("my-pod-identity").await.unwrap().is_some());
}
