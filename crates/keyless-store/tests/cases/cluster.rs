//! Store suite cases: managed clusters, their node resource groups and what they own.

use super::vault::{in_read, in_write, racing};
use crate::case;
use keyless_store::*;

pub const CASES: &[(&str, crate::CaseFn)] = &[
    case!(a_cluster_owns_its_node_group_and_goes_with_its_group),
    case!(a_cluster_delete_takes_what_it_owns),
    case!(clusters_are_listed_by_group),
    case!(concurrent_creates_make_one_cluster),
    case!(concurrent_writes_from_one_version_one_wins),
    case!(an_identity_deleted_while_a_pool_takes_it_is_not_kept),
];

const SUB: &str = "s";
const CKEY: &str =
    "/subscriptions/s/resourcegroups/rg/providers/microsoft.containerservice/managedclusters/c1";

fn rg(name: &str) -> ResourceGroupRecord {
    ResourceGroupRecord {
        subscription: SUB.into(),
        name: name.into(),
        location: "local".into(),
        tags: Default::default(),
    }
}

fn ident(name: &str, rg: &str) -> IdentityRecord {
    let rid = format!("/subscriptions/s/resourceGroups/{rg}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}");
    IdentityRecord {
        key: rid.to_lowercase(),
        resource_id: rid,
        name: name.into(),
        subscription: SUB.into(),
        resource_group: rg.into(),
        location: "local".into(),
        tags: Default::default(),
        tenant_id: "t".into(),
        principal_id: format!("p-{name}"),
        client_id: format!("c-{name}"),
        system_vm: None,
        created: 1,
    }
}

/// A pool's scale set in node group `node_rg`.
fn pool(name: &str, node_rg: &str) -> VmRecord {
    let rid = format!(
        "/subscriptions/s/resourceGroups/{node_rg}/providers/Microsoft.Compute/virtualMachineScaleSets/{name}"
    );
    VmRecord {
        key: rid.to_lowercase(),
        resource_id: rid,
        name: name.into(),
        subscription: SUB.into(),
        resource_group: node_rg.into(),
        location: "local".into(),
        tags: Default::default(),
        vm_id: "v".into(),
        identity_type: "UserAssigned".into(),
        properties: serde_json::json!({}),
        created: 1,
    }
}

/// Cluster `name` in group `rg`, with everything a write of it carries.
struct Parts {
    cluster: ClusterRecord,
    node_group: ResourceGroupRecord,
    system: IdentityRecord,
    kubelet: IdentityRecord,
}

fn parts(name: &str, group: &str) -> Parts {
    let rid = format!(
        "/subscriptions/s/resourceGroups/{group}/providers/Microsoft.ContainerService/managedClusters/{name}"
    );
    let key = rid.to_lowercase();
    let node_rg = format!("MC_{group}_{name}_local");
    let kubelet = ident(&format!("{name}-agentpool"), &node_rg);
    let mut system = ident(name, group);
    system.key = format!("{key}#system");
    system.resource_id = rid.clone();
    system.system_vm = Some(key.clone());
    Parts {
        cluster: ClusterRecord {
            key,
            resource_id: rid,
            name: name.into(),
            subscription: SUB.into(),
            resource_group: group.into(),
            location: "local".into(),
            tags: Default::default(),
            node_resource_group: node_rg.clone(),
            identity_type: "SystemAssigned".into(),
            user_identity: None,
            kubelet_identity: kubelet.key.clone(),
            suffix: "12345678".into(),
            properties: serde_json::json!({}),
            version: 1,
            created: 1,
        },
        node_group: rg(&node_rg),
        system,
        kubelet,
    }
}

impl Parts {
    fn write<'a>(&'a self, sets: &'a [(VmRecord, Vec<String>)]) -> ClusterWrite<'a> {
        ClusterWrite {
            cluster: &self.cluster,
            expect_version: None,
            node_group: &self.node_group,
            system_identity: Some(&self.system),
            kubelet_identity: &self.kubelet,
            scale_sets: sets,
            removed_scale_sets: &[],
            new_scale_sets: &[],
        }
    }
}

fn assignment(name: &str, scope: &str, principal: &str) -> RoleAssignmentRecord {
    RoleAssignmentRecord {
        name: name.into(),
        scope: scope.into(),
        role_definition_id: "r".into(),
        principal_id: principal.into(),
        principal_type: "ServicePrincipal".into(),
        description: None,
        created: 1,
        created_by: "x".into(),
    }
}

async fn a_cluster_owns_its_node_group_and_goes_with_its_group(s: Store) {
    in_write!(s, |tx| tx.put_resource_group(&rg("rg")).await).unwrap();
    in_write!(s, |tx| tx.put_resource_group(&rg("ids")).await).unwrap();
    let app = ident("app", "ids");
    in_write!(s, |tx| tx.put_identity(&app).await).unwrap();
    let p = parts("c1", "rg");
    assert_eq!(p.cluster.key, CKEY);
    let (cluster, kubelet, system) = (&p.cluster, &p.kubelet, &p.system);
    let pool1 = pool("aks-np1-12345678-vmss", "MC_rg_c1_local");
    let sets = vec![(pool1.clone(), vec![kubelet.key.clone(), app.key.clone()])];
    let w = p.write(&sets);
    assert_eq!(
        in_write!(s, |tx| tx.put_cluster(&w).await).unwrap(),
        ClusterPut::Created
    );
    // a second create, or a write from a stale read, writes nothing
    assert_eq!(
        in_write!(s, |tx| tx.put_cluster(&w).await).unwrap(),
        ClusterPut::Stale
    );
    assert_eq!(
        in_write!(s, |tx| tx
            .put_cluster(&ClusterWrite {
                expect_version: Some(7),
                ..w.clone()
            })
            .await)
        .unwrap(),
        ClusterPut::Stale
    );
    assert_eq!(
        in_read!(s, |tx| tx.vm_user_identities(&pool1.key).await)
            .unwrap()
            .len(),
        2
    );
    assert!(in_read!(s, |tx| tx.get_identity(&system.key).await)
        .unwrap()
        .is_some());
    assert!(
        in_read!(s, |tx| tx.get_resource_group("S", "mc_rg_c1_local").await)
            .unwrap()
            .is_some()
    );
    assert_eq!(
        in_read!(s, |tx| tx
            .cluster_of_node_group("S", "mc_rg_c1_local")
            .await)
        .unwrap()
        .unwrap()
        .key,
        CKEY
    );
    // a cluster whose node group exists already is not created
    let mut squat = parts("c9", "rg");
    squat.node_group = rg("ids");
    squat.cluster.node_resource_group = "ids".into();
    assert_eq!(
        in_write!(s, |tx| tx.put_cluster(&squat.write(&[])).await).unwrap(),
        ClusterPut::NodeGroupExists
    );
    assert!(in_read!(s, |tx| tx.get_cluster(&squat.cluster.key).await)
        .unwrap()
        .is_none());
    // an identity that does not exist: the whole write rolls back
    let mut c2 = cluster.clone();
    c2.version = 2;
    let bad = vec![(pool1.clone(), vec!["/nope".to_string()])];
    let e = in_write!(s, |tx| tx
        .put_cluster(&ClusterWrite {
            cluster: &c2,
            expect_version: Some(1),
            scale_sets: &bad,
            ..w.clone()
        })
        .await);
    assert!(
        matches!(e, Err(StoreError::Conflict(Conflict::MissingReference(_)))),
        "{e:?}"
    );
    // a system identity is not a pool's to hold either
    let sys_held = vec![(pool1.clone(), vec![system.key.clone()])];
    let e = in_write!(s, |tx| tx
        .put_cluster(&ClusterWrite {
            cluster: &c2,
            expect_version: Some(1),
            scale_sets: &sys_held,
            ..w.clone()
        })
        .await);
    assert!(
        matches!(e, Err(StoreError::Conflict(Conflict::MissingReference(_)))),
        "{e:?}"
    );
    assert_eq!(
        in_read!(s, |tx| tx.get_cluster(CKEY).await)
            .unwrap()
            .unwrap()
            .version,
        1
    );
    assert_eq!(
        in_read!(s, |tx| tx.vm_user_identities(&pool1.key).await)
            .unwrap()
            .len(),
        2
    );
    // status updates name the version they read
    assert_eq!(
        in_write!(s, |tx| tx.update_cluster(&c2, 5).await).unwrap(),
        ClusterPut::Stale
    );
    assert_eq!(
        in_write!(s, |tx| tx.update_cluster(&c2, 1).await).unwrap(),
        ClusterPut::Updated
    );
    assert_eq!(
        in_read!(s, |tx| tx.get_cluster(CKEY).await)
            .unwrap()
            .unwrap()
            .version,
        2
    );
    // a host of the pool, an assignment on the node group, one held by the kubelet identity
    let inst = in_write!(s, |tx| tx
        .create_instance(&pool1.key, &pool1.resource_id, 1, None)
        .await)
    .unwrap();
    in_write!(s, |tx| tx
        .insert_host_credential(&HostCredentialRecord {
            fingerprint: "f".into(),
            vm_key: inst.key.clone(),
            not_after: 10,
            issued: 1,
        })
        .await)
    .unwrap();
    for (name, scope, principal) in [
        (
            "a1",
            "/subscriptions/s/resourcegroups/mc_rg_c1_local",
            "p-app",
        ),
        (
            "a2",
            "/subscriptions/s/resourcegroups/ids",
            "p-c1-agentpool",
        ),
        ("a3", "/subscriptions/s/resourcegroups/ids", "p-c1"),
    ] {
        in_write!(s, |tx| tx
            .insert_role_assignment(&assignment(name, scope, principal))
            .await)
        .unwrap();
    }
    // a scale set stored under a new pool's key before the pool is added, with a node: the
    // new pool replaces it and adopts neither its nodes nor their credentials
    let pool2 = pool("aks-np2-12345678-vmss", "MC_rg_c1_local");
    let mut squatter = pool2.clone();
    squatter.vm_id = "squatter".into();
    in_write!(s, |tx| tx.put_vm(&squatter, None, &[]).await).unwrap();
    let rogue = in_write!(s, |tx| tx
        .create_instance(&pool2.key, &pool2.resource_id, 1, None)
        .await)
    .unwrap();
    in_write!(s, |tx| tx
        .insert_host_credential(&HostCredentialRecord {
            fingerprint: "rogue".into(),
            vm_key: rogue.key.clone(),
            not_after: 10,
            issued: 1,
        })
        .await)
    .unwrap();
    let mut c3 = cluster.clone();
    c3.version = 3;
    let both = vec![
        (pool1.clone(), vec![kubelet.key.clone(), app.key.clone()]),
        (pool2.clone(), vec![kubelet.key.clone(), app.key.clone()]),
    ];
    assert_eq!(
        in_write!(s, |tx| tx
            .put_cluster(&ClusterWrite {
                cluster: &c3,
                expect_version: Some(2),
                scale_sets: &both,
                new_scale_sets: std::slice::from_ref(&pool2.key),
                ..w.clone()
            })
            .await)
        .unwrap(),
        ClusterPut::Updated
    );
    assert_ne!(
        in_read!(s, |tx| tx.get_vm(&pool2.key).await)
            .unwrap()
            .unwrap()
            .vm_id,
        "squatter"
    );
    assert!(in_read!(s, |tx| tx.get_instance(&rogue.key).await)
        .unwrap()
        .is_none());
    assert!(in_read!(s, |tx| tx.list_instances(&pool2.key).await)
        .unwrap()
        .is_empty());
    assert!(in_read!(s, |tx| tx.get_host_credential("rogue").await)
        .unwrap()
        .is_none());
    assert_eq!(
        in_read!(s, |tx| tx.vm_user_identities(&pool2.key).await)
            .unwrap()
            .len(),
        2
    );
    // the existing pool keeps its node
    assert!(in_read!(s, |tx| tx.get_instance(&inst.key).await)
        .unwrap()
        .is_some());
    // deleting the cluster's group takes the cluster and its node group along
    assert!(in_write!(s, |tx| tx.delete_resource_group("s", "rg").await).unwrap());
    assert!(in_read!(s, |tx| tx.get_cluster(CKEY).await)
        .unwrap()
        .is_none());
    assert!(
        in_read!(s, |tx| tx.get_resource_group("s", "MC_rg_c1_local").await)
            .unwrap()
            .is_none()
    );
    assert!(in_read!(s, |tx| tx.get_vm(&pool1.key).await)
        .unwrap()
        .is_none());
    assert!(in_read!(s, |tx| tx.get_instance(&inst.key).await)
        .unwrap()
        .is_none());
    assert!(in_read!(s, |tx| tx.get_host_credential("f").await)
        .unwrap()
        .is_none());
    assert!(in_read!(s, |tx| tx.get_identity(&kubelet.key).await)
        .unwrap()
        .is_none());
    assert!(in_read!(s, |tx| tx.get_identity(&system.key).await)
        .unwrap()
        .is_none());
    assert!(in_read!(s, |tx| tx.list_role_assignments().await)
        .unwrap()
        .is_empty());
    // the pod identity itself lives on in its own group
    assert!(in_read!(s, |tx| tx.get_identity(&app.key).await)
        .unwrap()
        .is_some());
}

async fn a_cluster_delete_takes_what_it_owns(s: Store) {
    in_write!(s, |tx| tx.put_resource_group(&rg("rg")).await).unwrap();
    let p = parts("c1", "rg");
    let pool1 = pool("aks-np1-12345678-vmss", &p.cluster.node_resource_group);
    let sets = vec![(pool1.clone(), vec![p.kubelet.key.clone()])];
    let w = p.write(&sets);
    assert_eq!(
        in_write!(s, |tx| tx.put_cluster(&w).await).unwrap(),
        ClusterPut::Created
    );
    // an update without a system identity removes it
    let mut c2 = p.cluster.clone();
    c2.version = 2;
    assert_eq!(
        in_write!(s, |tx| tx
            .put_cluster(&ClusterWrite {
                cluster: &c2,
                expect_version: Some(1),
                system_identity: None,
                ..w.clone()
            })
            .await)
        .unwrap(),
        ClusterPut::Updated
    );
    assert!(in_read!(s, |tx| tx.get_identity(&p.system.key).await)
        .unwrap()
        .is_none());
    // ... and one with it makes it again; a removed pool goes with its nodes
    let mut c3 = p.cluster.clone();
    c3.version = 3;
    let removed = [pool1.key.clone()];
    assert_eq!(
        in_write!(s, |tx| tx
            .put_cluster(&ClusterWrite {
                cluster: &c3,
                expect_version: Some(2),
                scale_sets: &[],
                removed_scale_sets: &removed,
                ..w.clone()
            })
            .await)
        .unwrap(),
        ClusterPut::Updated
    );
    assert!(in_read!(s, |tx| tx.get_identity(&p.system.key).await)
        .unwrap()
        .is_some());
    assert!(in_read!(s, |tx| tx.get_vm(&pool1.key).await)
        .unwrap()
        .is_none());
    // an extension-like child of the cluster and an assignment on its scope
    let child = TrackedRecord {
        key: format!("{CKEY}/extensions/x"),
        type_name: "Microsoft.ContainerService/managedClusters/extensions".into(),
        subscription: SUB.into(),
        resource_group: "rg".into(),
        body: serde_json::json!({}),
    };
    in_write!(s, |tx| tx.put_tracked(&child).await).unwrap();
    in_write!(s, |tx| tx
        .insert_role_assignment(&assignment("a1", CKEY, "p-someone"))
        .await)
    .unwrap();
    assert!(in_write!(s, |tx| tx.delete_cluster(CKEY).await).unwrap());
    assert!(!in_write!(s, |tx| tx.delete_cluster(CKEY).await).unwrap());
    assert!(in_read!(s, |tx| tx.get_cluster(CKEY).await)
        .unwrap()
        .is_none());
    assert!(in_read!(s, |tx| tx.get_identity(&p.system.key).await)
        .unwrap()
        .is_none());
    assert!(in_read!(s, |tx| tx.get_identity(&p.kubelet.key).await)
        .unwrap()
        .is_none());
    assert!(in_read!(s, |tx| tx
        .get_resource_group("s", &p.cluster.node_resource_group)
        .await)
    .unwrap()
    .is_none());
    assert!(in_read!(s, |tx| tx.get_tracked(&child.key).await)
        .unwrap()
        .is_none());
    assert!(in_read!(s, |tx| tx.list_role_assignments().await)
        .unwrap()
        .is_empty());
    assert!(
        in_read!(s, |tx| tx.get_resource_group("s", "rg").await)
            .unwrap()
            .is_some(),
        "the cluster's own group stays"
    );
    // the node group's name is free for a new cluster
    assert_eq!(
        in_write!(s, |tx| tx.put_cluster(&p.write(&[])).await).unwrap(),
        ClusterPut::Created
    );
}

async fn clusters_are_listed_by_group(s: Store) {
    for (name, group) in [("b", "rg"), ("a", "RG"), ("c", "other")] {
        let p = parts(name, group);
        assert_eq!(
            in_write!(s, |tx| tx.put_cluster(&p.write(&[])).await).unwrap(),
            ClusterPut::Created
        );
    }
    let names = |rg: Option<&'static str>| {
        let s = s.clone();
        async move {
            in_read!(s, |tx| tx.list_clusters("S", rg).await)
                .unwrap()
                .into_iter()
                .map(|c| c.name)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(names(None).await, ["c", "a", "b"]);
    assert_eq!(names(Some("rg")).await, ["a", "b"]);
    assert!(in_read!(s, |tx| tx.list_clusters("other", None).await)
        .unwrap()
        .is_empty());
    assert!(in_read!(s, |tx| tx.cluster_of_node_group("s", "rg").await)
        .unwrap()
        .is_none());
}

async fn concurrent_creates_make_one_cluster(s: Store) {
    let outcomes = racing(&s, 5, |i, mut tx| async move {
        let mut p = parts("c1", "rg");
        p.cluster.suffix = format!("{i}");
        let out = tx.put_cluster(&p.write(&[])).await;
        (tx, out)
    })
    .await;
    let outcomes: Vec<ClusterPut> = outcomes.into_iter().map(Result::unwrap).collect();
    let created: Vec<usize> = (0..5)
        .filter(|&i| outcomes[i] == ClusterPut::Created)
        .collect();
    assert_eq!(created.len(), 1, "{outcomes:?}");
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, ClusterPut::Created | ClusterPut::Stale)),
        "{outcomes:?}"
    );
    let stored = in_read!(s, |tx| tx.get_cluster(CKEY).await)
        .unwrap()
        .unwrap();
    assert_eq!(stored.suffix, created[0].to_string());
    // two clusters wanting one node group: one of them
    let outcomes = racing(&s, 2, |i, mut tx| async move {
        let mut p = parts(&format!("d{i}"), "rg");
        p.node_group = rg("shared-nodes");
        p.cluster.node_resource_group = "shared-nodes".into();
        let out = tx.put_cluster(&p.write(&[])).await;
        (tx, out)
    })
    .await;
    let mut outcomes: Vec<ClusterPut> = outcomes.into_iter().map(Result::unwrap).collect();
    outcomes.sort_by_key(|o| format!("{o:?}"));
    assert_eq!(
        outcomes,
        [ClusterPut::Created, ClusterPut::NodeGroupExists],
        "{outcomes:?}"
    );
    assert!(
        in_read!(s, |tx| tx.cluster_of_node_group("s", "SHARED-NODES").await)
            .unwrap()
            .is_some()
    );
}

async fn concurrent_writes_from_one_version_one_wins(s: Store) {
    let p = parts("c1", "rg");
    assert_eq!(
        in_write!(s, |tx| tx.put_cluster(&p.write(&[])).await).unwrap(),
        ClusterPut::Created
    );
    // status updates from version 1
    let base = p.cluster.clone();
    let outcomes = racing(&s, 10, move |i, mut tx| {
        let mut c = base.clone();
        c.version = 2;
        c.properties = serde_json::json!({ "by": i });
        async move {
            let out = tx.update_cluster(&c, 1).await;
            (tx, out)
        }
    })
    .await;
    let outcomes: Vec<ClusterPut> = outcomes.into_iter().map(Result::unwrap).collect();
    let won: Vec<usize> = (0..10)
        .filter(|&i| outcomes[i] == ClusterPut::Updated)
        .collect();
    assert_eq!(won.len(), 1, "{outcomes:?}");
    assert!(outcomes
        .iter()
        .all(|o| matches!(o, ClusterPut::Updated | ClusterPut::Stale)));
    let stored = in_read!(s, |tx| tx.get_cluster(CKEY).await)
        .unwrap()
        .unwrap();
    assert_eq!(stored.properties, serde_json::json!({ "by": won[0] }));
    // full writes from version 2, each adding its own pool
    let outcomes = racing(&s, 5, |i, mut tx| async move {
        let p = parts("c1", "rg");
        let mut c = p.cluster.clone();
        c.version = 3;
        let set = pool(
            &format!("aks-np{i}-12345678-vmss"),
            &p.cluster.node_resource_group,
        );
        let sets = vec![(set.clone(), vec![p.kubelet.key.clone()])];
        let new = [set.key.clone()];
        let out = tx
            .put_cluster(&ClusterWrite {
                cluster: &c,
                expect_version: Some(2),
                scale_sets: &sets,
                new_scale_sets: &new,
                ..p.write(&[])
            })
            .await;
        (tx, out)
    })
    .await;
    let outcomes: Vec<ClusterPut> = outcomes.into_iter().map(Result::unwrap).collect();
    let won: Vec<usize> = (0..5)
        .filter(|&i| outcomes[i] == ClusterPut::Updated)
        .collect();
    assert_eq!(won.len(), 1, "{outcomes:?}");
    let node_rg = p.cluster.node_resource_group.clone();
    let pools = in_read!(s, |tx| tx.list_vms("s", Some(&node_rg)).await).unwrap();
    assert_eq!(
        pools.iter().map(|v| v.name.clone()).collect::<Vec<_>>(),
        [format!("aks-np{}-12345678-vmss", won[0])],
        "only the winner's pool is kept"
    );
}

async fn an_identity_deleted_while_a_pool_takes_it_is_not_kept(s: Store) {
    let p = parts("c1", "rg");
    let pool1 = pool("aks-np1-12345678-vmss", &p.cluster.node_resource_group);
    let sets = vec![(pool1.clone(), vec![p.kubelet.key.clone()])];
    assert_eq!(
        in_write!(s, |tx| tx.put_cluster(&p.write(&sets)).await).unwrap(),
        ClusterPut::Created
    );
    let app = ident("app", "ids");
    in_write!(s, |tx| tx.put_identity(&app).await).unwrap();
    // a cluster write assigning the identity is open when its delete comes
    let mut writer = s.write("test").await.unwrap();
    let mut c2 = p.cluster.clone();
    c2.version = 2;
    let taking = vec![(pool1.clone(), vec![p.kubelet.key.clone(), app.key.clone()])];
    assert_eq!(
        writer
            .put_cluster(&ClusterWrite {
                cluster: &c2,
                expect_version: Some(1),
                ..p.write(&taking)
            })
            .await
            .unwrap(),
        ClusterPut::Updated
    );
    let delete = tokio::spawn({
        let (s, key) = (s.clone(), app.key.clone());
        async move { in_write!(s, |tx| tx.delete_identity(&key).await) }
    });
    // time for the delete to run ahead if nothing holds it back
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    writer.commit().await.unwrap();
    assert!(delete.await.unwrap().unwrap());
    // an identity made again under the same id starts with no assignment of the old one
    in_write!(s, |tx| tx.put_identity(&app).await).unwrap();
    let held: Vec<String> = in_read!(s, |tx| tx.vm_user_identities(&pool1.key).await)
        .unwrap()
        .into_iter()
        .map(|i| i.key)
        .collect();
    assert_eq!(
        held,
        std::slice::from_ref(&p.kubelet.key),
        "no assignment outlives its identity"
    );
}
