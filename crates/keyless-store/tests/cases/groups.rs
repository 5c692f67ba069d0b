//! Store suite cases: resource groups and the cascade of a group delete.

use super::hosts::{scale_set, system_identity, vm};
use super::identities::ident;
use super::meta::{rtx, wtx};
use crate::case;
use keyless_store::*;

pub const CASES: &[(&str, crate::CaseFn)] = &[
    case!(groups_keep_their_name_and_list_by_subscription),
    case!(resource_group_delete_cascades),
    case!(a_failure_mid_unit_leaves_no_trace),
];

pub(crate) fn group(name: &str) -> ResourceGroupRecord {
    ResourceGroupRecord {
        subscription: "s".into(),
        name: name.into(),
        location: "local".into(),
        tags: Default::default(),
    }
}

async fn groups_keep_their_name_and_list_by_subscription(s: Store) {
    assert!(wtx!(s, |tx| tx.put_resource_group(&group("Beta")).await).unwrap());
    assert!(wtx!(s, |tx| tx.put_resource_group(&group("alpha")).await).unwrap());
    let mut again = group("BETA");
    again.tags.insert("k".into(), "v".into());
    assert!(!wtx!(s, |tx| tx.put_resource_group(&again).await).unwrap());
    let stored = rtx!(s, |tx| tx.get_resource_group("S", "beta").await)
        .unwrap()
        .unwrap();
    assert_eq!(stored.name, "Beta", "the name it was created with");
    assert_eq!(stored.tags.get("k").map(String::as_str), Some("v"));
    let names: Vec<String> = rtx!(s, |tx| tx.list_resource_groups("s").await)
        .unwrap()
        .into_iter()
        .map(|g| g.name)
        .collect();
    assert_eq!(names, vec!["alpha", "Beta"]);
    assert!(rtx!(s, |tx| tx.list_resource_groups("other").await)
        .unwrap()
        .is_empty());
    assert!(rtx!(s, |tx| tx.get_resource_group("s", "gamma").await)
        .unwrap()
        .is_none());
    assert!(!wtx!(s, |tx| tx.delete_resource_group("s", "gamma").await).unwrap());
}

async fn resource_group_delete_cascades(s: Store) {
    wtx!(s, |tx| tx.put_resource_group(&group("RG")).await).unwrap();
    wtx!(s, |tx| tx.put_resource_group(&group("rg2")).await).unwrap();
    let u = ident("u1", "rg");
    let kept = ident("kept", "rg2");
    for i in [&u, &kept] {
        wtx!(s, |tx| tx.put_identity(i).await).unwrap();
    }
    let v = vm("vm1");
    let sys = system_identity(&v);
    wtx!(s, |tx| tx
        .put_vm(&v, Some(&sys), std::slice::from_ref(&u.key))
        .await)
    .unwrap();
    wtx!(s, |tx| tx
        .insert_host_credential(&HostCredentialRecord {
            fingerprint: "f".into(),
            vm_key: v.key.clone(),
            not_after: 10,
            issued: 1,
        })
        .await)
    .unwrap();
    let pool = scale_set("pool");
    wtx!(s, |tx| tx.put_vm(&pool, None, &[]).await).unwrap();
    let inst = wtx!(s, |tx| tx
        .create_instance(&pool.key, &pool.resource_id, 1, None)
        .await)
    .unwrap();
    let ra = |name: &str, scope: &str, principal: &str| RoleAssignmentRecord {
        name: name.into(),
        scope: scope.into(),
        role_definition_id: "/providers/Microsoft.Authorization/roleDefinitions/r".into(),
        principal_id: principal.into(),
        principal_type: "ServicePrincipal".into(),
        description: None,
        created: 1,
        created_by: "x".into(),
    };
    for a in [
        ra(
            "on-group",
            "/subscriptions/s/resourceGroups/RG",
            &kept.principal_id,
        ),
        ra("held", "/subscriptions/s", &u.principal_id),
        ra(
            "on-rg2",
            "/subscriptions/s/resourceGroups/rg2",
            &kept.principal_id,
        ),
    ] {
        wtx!(s, |tx| tx.insert_role_assignment(&a).await).unwrap();
    }
    assert!(wtx!(s, |tx| tx.delete_resource_group("S", "rg").await).unwrap());
    let mut tx = s.read("test").await.unwrap();
    assert!(tx.get_identity(&u.key).await.unwrap().is_none());
    assert!(tx.get_identity(&sys.key).await.unwrap().is_none());
    assert!(tx.get_vm(&v.key).await.unwrap().is_none());
    assert!(tx.get_vm(&pool.key).await.unwrap().is_none());
    assert!(tx.get_instance(&inst.key).await.unwrap().is_none());
    assert!(tx.get_host_credential("f").await.unwrap().is_none());
    assert!(tx.get_resource_group("s", "rg").await.unwrap().is_none());
    // the neighbour group and what is in it stay
    assert!(tx.get_identity(&kept.key).await.unwrap().is_some());
    let names: Vec<String> = tx
        .list_resource_groups("s")
        .await
        .unwrap()
        .into_iter()
        .map(|g| g.name)
        .collect();
    assert_eq!(names, vec!["rg2"]);
    let left: Vec<String> = tx
        .list_role_assignments()
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.name)
        .collect();
    assert_eq!(left, vec!["on-rg2"]);
}

/// A unit of work that fails after deleting a group keeps nothing of the delete: a statement
/// fails (a unique constraint) in the same unit, which is then dropped as a failed request's.
async fn a_failure_mid_unit_leaves_no_trace(s: Store) {
    wtx!(s, |tx| tx.put_resource_group(&group("rg")).await).unwrap();
    wtx!(s, |tx| tx.put_resource_group(&group("other")).await).unwrap();
    let (u1, u2, o) = (ident("u1", "rg"), ident("u2", "rg"), ident("o", "other"));
    for i in [&u1, &u2, &o] {
        wtx!(s, |tx| tx.put_identity(i).await).unwrap();
    }
    let v = vm("vm1");
    wtx!(s, |tx| tx
        .put_vm(&v, None, std::slice::from_ref(&u1.key))
        .await)
    .unwrap();
    let mut tx = s.write("test").await.unwrap();
    assert!(tx.delete_resource_group("s", "rg").await.unwrap());
    assert!(
        tx.get_vm(&v.key).await.unwrap().is_none(),
        "deleted in the unit"
    );
    let mut clash = ident("new", "rg");
    clash.client_id = o.client_id.clone();
    assert!(matches!(
        tx.put_identity(&clash).await,
        Err(StoreError::Conflict(Conflict::Unique(_)))
    ));
    drop(tx);
    let mut tx = s.read("test").await.unwrap();
    assert!(tx.get_vm(&v.key).await.unwrap().is_some());
    assert!(tx.get_identity(&u1.key).await.unwrap().is_some());
    assert!(tx.get_identity(&u2.key).await.unwrap().is_some());
    assert_eq!(tx.vm_user_identities(&v.key).await.unwrap().len(), 1);
    assert!(tx.get_resource_group("s", "rg").await.unwrap().is_some());
    drop(tx);
    assert!(wtx!(s, |tx| tx.delete_resource_group("s", "rg").await).unwrap());
    assert!(rtx!(s, |tx| tx.get_identity(&u1.key).await)
        .unwrap()
        .is_none());
    assert!(rtx!(s, |tx| tx.get_identity(&o.key).await)
        .unwrap()
        .is_some());
}
