//! Store suite cases: VMs and scale sets as hosts (identity sets, join tokens, host
//! credentials, scale-set instances).

use super::identities::ident;
use super::meta::{concurrently, rtx, wtx};
use crate::case;
use keyless_store::*;

pub const CASES: &[(&str, crate::CaseFn)] = &[
    case!(tokens_and_credentials_need_their_host),
    case!(vm_lifecycle_with_identities),
    case!(vms_are_listed_by_group),
    case!(a_vm_delete_takes_what_it_owns),
    case!(join_tokens_are_single_use),
    case!(a_join_retried_with_the_same_key_finds_its_host_until_the_token_expires),
    case!(concurrent_join_token_consumers_one_wins),
    case!(host_credentials_are_kept_and_revoked_with_their_instance),
    case!(instance_ids_are_never_reused_and_limits_hold),
    case!(an_instance_needs_its_scale_set),
    case!(concurrent_instances_respect_the_limit_and_never_reuse_ids),
    case!(an_identity_deleted_while_assigned_leaves_no_assignment),
];

/// A host row stored under the bare key `key` (join tokens and credentials need their host).
pub(crate) async fn bare_host(s: &Store, key: &str) {
    let mut v = vm(key);
    v.key = key.to_string();
    wtx!(s, |tx| tx.put_vm(&v, None, &[]).await).unwrap();
}

/// A VM `name` in group `rg` of subscription `s`.
pub(crate) fn vm(name: &str) -> VmRecord {
    host(name, "virtualMachines")
}

/// A scale set `name` in group `rg` of subscription `s`.
pub(crate) fn scale_set(name: &str) -> VmRecord {
    host(name, "virtualMachineScaleSets")
}

fn host(name: &str, kind: &str) -> VmRecord {
    let rid =
        format!("/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/{kind}/{name}");
    VmRecord {
        key: rid.to_lowercase(),
        resource_id: rid,
        name: name.into(),
        subscription: "s".into(),
        resource_group: "rg".into(),
        location: "local".into(),
        tags: Default::default(),
        vm_id: "v".into(),
        identity_type: "SystemAssigned, UserAssigned".into(),
        properties: serde_json::json!({}),
        created: 1,
    }
}

/// The system-assigned identity of `vm`.
pub(crate) fn system_identity(vm: &VmRecord) -> IdentityRecord {
    let mut sys = ident(&vm.name, &vm.resource_group);
    sys.key = format!("{}#system", vm.key);
    sys.resource_id = vm.resource_id.clone();
    sys.system_vm = Some(vm.key.clone());
    sys.principal_id = format!("sys-p-{}", vm.name);
    sys.client_id = format!("sys-c-{}", vm.name);
    sys
}

fn cred(fingerprint: &str, vm_key: &str) -> HostCredentialRecord {
    HostCredentialRecord {
        fingerprint: fingerprint.into(),
        vm_key: vm_key.into(),
        not_after: 10,
        issued: 1,
    }
}

async fn vm_lifecycle_with_identities(s: Store) {
    let u = ident("u1", "rg");
    assert!(wtx!(s, |tx| tx.put_identity(&u).await).unwrap());
    assert!(!wtx!(s, |tx| tx.put_identity(&u).await).unwrap());
    let v = vm("vm1");
    let sys = system_identity(&v);
    let users = std::slice::from_ref(&u.key);
    assert!(wtx!(s, |tx| tx.put_vm(&v, Some(&sys), users).await).unwrap());
    assert_eq!(
        rtx!(s, |tx| tx.vm_user_identities(&v.key).await).unwrap(),
        vec![u.clone()]
    );
    assert_eq!(
        rtx!(s, |tx| tx.vm_system_identity(&v.key).await)
            .unwrap()
            .unwrap()
            .principal_id,
        sys.principal_id
    );
    // system identities are not listed as user-assigned
    assert_eq!(
        rtx!(s, |tx| tx.list_identities("S", Some("RG")).await)
            .unwrap()
            .len(),
        1
    );
    // nor deleted as one
    assert!(!wtx!(s, |tx| tx.delete_identity(&sys.key).await).unwrap());
    // assigning a missing identity (or a system one) fails and changes nothing
    for bad in ["nope".to_string(), sys.key.clone()] {
        let mut renamed = v.clone();
        renamed.tags.insert("k".into(), "v".into());
        assert!(matches!(
            wtx!(s, |tx| tx
                .put_vm(&renamed, None, &[u.key.clone(), bad.clone()])
                .await),
            Err(StoreError::Conflict(Conflict::MissingReference(_)))
        ));
    }
    assert_eq!(
        rtx!(s, |tx| tx.get_vm(&v.key).await).unwrap(),
        Some(v.clone())
    );
    assert_eq!(
        rtx!(s, |tx| tx.vm_user_identities(&v.key).await)
            .unwrap()
            .len(),
        1
    );
    assert!(rtx!(s, |tx| tx.vm_system_identity(&v.key).await)
        .unwrap()
        .is_some());
    // an update; dropping the system identity deletes it and what it holds
    let mut v2 = v.clone();
    v2.identity_type = "UserAssigned".into();
    assert!(!wtx!(s, |tx| tx.put_vm(&v2, None, users).await).unwrap());
    assert_eq!(rtx!(s, |tx| tx.get_vm(&v.key).await).unwrap(), Some(v2));
    assert!(rtx!(s, |tx| tx.vm_system_identity(&v.key).await)
        .unwrap()
        .is_none());
    assert!(rtx!(s, |tx| tx.get_identity(&sys.key).await)
        .unwrap()
        .is_none());
    // deleting the user identity removes it from the VM
    assert!(wtx!(s, |tx| tx.delete_identity(&u.key).await).unwrap());
    assert!(rtx!(s, |tx| tx.vm_user_identities(&v.key).await)
        .unwrap()
        .is_empty());
    assert!(wtx!(s, |tx| tx.delete_vm(&v.key).await).unwrap());
    assert!(!wtx!(s, |tx| tx.delete_vm(&v.key).await).unwrap());
    assert!(rtx!(s, |tx| tx.get_vm(&v.key).await).unwrap().is_none());
}

async fn vms_are_listed_by_group(s: Store) {
    let (b, a) = (vm("b"), vm("a"));
    let mut elsewhere = vm("c");
    elsewhere.resource_group = "Other".into();
    elsewhere.key = elsewhere.key.replace("/rg/", "/other/");
    for v in [&b, &a, &elsewhere] {
        wtx!(s, |tx| tx.put_vm(v, None, &[]).await).unwrap();
    }
    assert_eq!(
        rtx!(s, |tx| tx.list_vms("S", Some("RG")).await).unwrap(),
        vec![a.clone(), b.clone()]
    );
    assert_eq!(
        rtx!(s, |tx| tx.list_vms("s", Some("other")).await).unwrap(),
        vec![elsewhere]
    );
    assert_eq!(rtx!(s, |tx| tx.list_vms("s", None).await).unwrap().len(), 3);
}

async fn a_vm_delete_takes_what_it_owns(s: Store) {
    let vmss = scale_set("pool");
    let sys = system_identity(&vmss);
    let u = ident("u1", "rg");
    wtx!(s, |tx| tx.put_identity(&u).await).unwrap();
    wtx!(s, |tx| tx
        .put_vm(&vmss, Some(&sys), std::slice::from_ref(&u.key))
        .await)
    .unwrap();
    let inst = wtx!(s, |tx| tx
        .create_instance(&vmss.key, &vmss.resource_id, 1, None)
        .await)
    .unwrap();
    wtx!(s, |tx| tx
        .insert_host_credential(&cred("inst", &inst.key))
        .await)
    .unwrap();
    wtx!(s, |tx| tx
        .insert_host_credential(&cred("set", &vmss.key))
        .await)
    .unwrap();
    wtx!(s, |tx| tx.insert_join_token("h", &vmss.key, 100).await).unwrap();
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
        // on the scale set's scope, held by its system identity, and one that stays
        ra("a1", &vmss.resource_id, &u.principal_id),
        ra("a2", "/subscriptions/s", &sys.principal_id),
        ra("a3", &format!("{}x", vmss.resource_id), &u.principal_id),
    ] {
        wtx!(s, |tx| tx.insert_role_assignment(&a).await).unwrap();
    }
    assert!(wtx!(s, |tx| tx.delete_vm(&vmss.key).await).unwrap());
    let mut tx = s.read("test").await.unwrap();
    assert!(tx.get_vm(&vmss.key).await.unwrap().is_none());
    assert!(tx.get_identity(&sys.key).await.unwrap().is_none());
    assert!(tx.get_identity(&u.key).await.unwrap().is_some());
    assert!(tx.list_instances(&vmss.key).await.unwrap().is_empty());
    assert!(tx.get_instance(&inst.key).await.unwrap().is_none());
    assert!(tx.get_host_credential("inst").await.unwrap().is_none());
    assert!(tx.get_host_credential("set").await.unwrap().is_none());
    assert!(tx.vm_user_identities(&vmss.key).await.unwrap().is_empty());
    let left: Vec<String> = tx
        .list_role_assignments()
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.name)
        .collect();
    assert_eq!(left, vec!["a3"]);
    drop(tx);
    assert_eq!(
        wtx!(s, |tx| tx.consume_join_token("h", 10, "k").await).unwrap(),
        JoinTokenOutcome::Unknown
    );
}

async fn join_tokens_are_single_use(s: Store) {
    bare_host(&s, "vm").await;
    wtx!(s, |tx| tx.insert_join_token("h", "vm", 100).await).unwrap();
    let consume = |hash: &'static str, now: u64| {
        let s = s.clone();
        async move { wtx!(s, |tx| tx.consume_join_token(hash, now, "k").await).unwrap() }
    };
    assert_eq!(consume("x", 10).await, JoinTokenOutcome::Unknown);
    assert_eq!(
        consume("h", 10).await,
        JoinTokenOutcome::Accepted {
            vm_key: "vm".into()
        }
    );
    assert_eq!(consume("h", 10).await, JoinTokenOutcome::AlreadyUsed);
    assert_eq!(consume("h", 200).await, JoinTokenOutcome::AlreadyUsed);
    wtx!(s, |tx| tx.insert_join_token("h2", "vm", 100).await).unwrap();
    assert_eq!(consume("h2", 100).await, JoinTokenOutcome::Expired);
    assert_eq!(
        consume("h2", 99).await,
        JoinTokenOutcome::Accepted {
            vm_key: "vm".into()
        }
    );
    // a token spent in a unit that rolls back is not spent
    wtx!(s, |tx| tx.insert_join_token("h3", "vm", 100).await).unwrap();
    let mut tx = s.write("test").await.unwrap();
    assert!(matches!(
        tx.consume_join_token("h3", 10, "k").await.unwrap(),
        JoinTokenOutcome::Accepted { .. }
    ));
    drop(tx);
    assert!(matches!(
        consume("h3", 10).await,
        JoinTokenOutcome::Accepted { .. }
    ));
}

async fn a_join_retried_with_the_same_key_finds_its_host_until_the_token_expires(s: Store) {
    bare_host(&s, "vm").await;
    wtx!(s, |tx| tx.insert_join_token("h", "vm", 100).await).unwrap();
    let consume = |now: u64, key: &'static str| {
        let s = s.clone();
        async move { wtx!(s, |tx| tx.consume_join_token("h", now, key).await).unwrap() }
    };
    // spent, but the host it made was never recorded (the join failed after): used
    let mut tx = s.write("test").await.unwrap();
    assert!(matches!(
        tx.consume_join_token("h", 10, "k1").await.unwrap(),
        JoinTokenOutcome::Accepted { .. }
    ));
    tx.commit().await.unwrap();
    assert_eq!(consume(11, "k1").await, JoinTokenOutcome::AlreadyUsed);
    // recorded: the same key finds the host, another key does not, nor the same after expiry
    wtx!(s, |tx| tx.insert_join_token("h2", "vm", 100).await).unwrap();
    let mut tx = s.write("test").await.unwrap();
    assert!(matches!(
        tx.consume_join_token("h2", 10, "k1").await.unwrap(),
        JoinTokenOutcome::Accepted { .. }
    ));
    tx.record_join("h2", "vm/instance-3").await.unwrap();
    tx.commit().await.unwrap();
    let again = |now: u64, key: &'static str| {
        let s = s.clone();
        async move { wtx!(s, |tx| tx.consume_join_token("h2", now, key).await).unwrap() }
    };
    assert_eq!(
        again(50, "k1").await,
        JoinTokenOutcome::Replayed {
            vm_key: "vm".into(),
            host_key: "vm/instance-3".into()
        }
    );
    assert_eq!(again(50, "k2").await, JoinTokenOutcome::AlreadyUsed);
    assert_eq!(again(100, "k1").await, JoinTokenOutcome::AlreadyUsed);
}

async fn concurrent_join_token_consumers_one_wins(s: Store) {
    bare_host(&s, "vm").await;
    for round in 0..3 {
        let hash = format!("h{round}");
        wtx!(s, |tx| tx.insert_join_token(&hash, "vm", 100).await).unwrap();
        let outcomes = concurrently(12, |i| {
            let (s, hash) = (s.clone(), hash.clone());
            let key = format!("key{i}");
            async move { wtx!(s, |tx| tx.consume_join_token(&hash, 10, &key).await).unwrap() }
        })
        .await;
        let accepted = outcomes
            .iter()
            .filter(|o| matches!(o, JoinTokenOutcome::Accepted { .. }))
            .count();
        let used = outcomes
            .iter()
            .filter(|o| **o == JoinTokenOutcome::AlreadyUsed)
            .count();
        assert_eq!((accepted, used), (1, 11), "{outcomes:?}");
    }
}

async fn host_credentials_are_kept_and_revoked_with_their_instance(s: Store) {
    let vmss = scale_set("pool");
    wtx!(s, |tx| tx.put_vm(&vmss, None, &[]).await).unwrap();
    let inst = wtx!(s, |tx| tx
        .create_instance(&vmss.key, &vmss.resource_id, 7, None)
        .await)
    .unwrap();
    assert_eq!(
        inst.resource_id,
        format!("{}/virtualMachines/0", vmss.resource_id)
    );
    assert_eq!(inst.key, inst.resource_id.to_lowercase());
    assert_eq!(inst.created, 7);
    assert_eq!(
        rtx!(s, |tx| tx.get_instance(&inst.key).await).unwrap(),
        Some(inst.clone())
    );
    let c = cred("f1", &inst.key);
    wtx!(s, |tx| tx.insert_host_credential(&c).await).unwrap();
    assert!(matches!(
        wtx!(s, |tx| tx.insert_host_credential(&c).await),
        Err(StoreError::Conflict(Conflict::Unique(_)))
    ));
    assert_eq!(
        rtx!(s, |tx| tx.get_host_credential("f1").await).unwrap(),
        Some(c)
    );
    assert!(wtx!(s, |tx| tx.delete_instance(&inst.key).await).unwrap());
    assert!(!wtx!(s, |tx| tx.delete_instance(&inst.key).await).unwrap());
    assert!(rtx!(s, |tx| tx.get_host_credential("f1").await)
        .unwrap()
        .is_none());
    assert!(rtx!(s, |tx| tx.get_instance(&inst.key).await)
        .unwrap()
        .is_none());
}

async fn instance_ids_are_never_reused_and_limits_hold(s: Store) {
    let g = scale_set("g");
    wtx!(s, |tx| tx.put_vm(&g, None, &[]).await).unwrap();
    let create = || {
        let (s, g) = (s.clone(), g.clone());
        async move {
            wtx!(s, |tx| tx
                .create_instance(&g.key, &g.resource_id, 1, Some(2))
                .await)
        }
    };
    let a = create().await.unwrap();
    let b = create().await.unwrap();
    assert_eq!((a.instance_id, b.instance_id), (0, 1));
    assert!(matches!(
        create().await,
        Err(StoreError::Conflict(Conflict::GroupFull))
    ));
    assert!(wtx!(s, |tx| tx.delete_instance(&b.key).await).unwrap());
    let c = create().await.unwrap();
    assert_eq!(
        c.instance_id, 2,
        "a deleted instance's id is not handed out again"
    );
    assert_ne!(c.vm_id, b.vm_id);
    // without a limit the set grows
    let d = wtx!(s, |tx| tx
        .create_instance(&g.key, &g.resource_id, 1, None)
        .await)
    .unwrap();
    assert_eq!(d.instance_id, 3);
    let ids: Vec<u64> = rtx!(s, |tx| tx.list_instances(&g.key).await)
        .unwrap()
        .into_iter()
        .map(|i| i.instance_id)
        .collect();
    assert_eq!(ids, vec![0, 2, 3]);
    // the numbering outlives the scale set: one created again under the same id goes on
    assert!(wtx!(s, |tx| tx.delete_vm(&g.key).await).unwrap());
    wtx!(s, |tx| tx.put_vm(&g, None, &[]).await).unwrap();
    assert_eq!(create().await.unwrap().instance_id, 4);
}

async fn an_instance_needs_its_scale_set(s: Store) {
    let g = scale_set("g");
    assert!(matches!(
        wtx!(s, |tx| tx
            .create_instance(&g.key, &g.resource_id, 1, None)
            .await),
        Err(StoreError::Conflict(Conflict::MissingReference(_)))
    ));
    assert!(rtx!(s, |tx| tx.list_instances(&g.key).await)
        .unwrap()
        .is_empty());
}

/// Joins racing for the last places of a pool: exactly `limit` get in, with distinct ids, and
/// ids of deleted instances are never handed out again.
async fn concurrent_instances_respect_the_limit_and_never_reuse_ids(s: Store) {
    let g = scale_set("g");
    wtx!(s, |tx| tx.put_vm(&g, None, &[]).await).unwrap();
    let race = |n: usize, limit: u64| {
        let (s, g) = (s.clone(), g.clone());
        async move {
            let outcomes = concurrently(n, |_| {
                let (s, g) = (s.clone(), g.clone());
                async move {
                    match wtx!(s, |tx| tx
                        .create_instance(&g.key, &g.resource_id, 1, Some(limit))
                        .await)
                    {
                        Ok(i) => Some(i.instance_id),
                        Err(StoreError::Conflict(Conflict::GroupFull)) => None,
                        Err(e) => panic!("{e}"),
                    }
                }
            })
            .await;
            let mut ids: Vec<u64> = outcomes.into_iter().flatten().collect();
            ids.sort();
            ids
        }
    };
    let first = race(12, 5).await;
    assert_eq!(first, vec![0, 1, 2, 3, 4]);
    for id in [1, 3] {
        let key = format!("{}/virtualmachines/{id}", g.key);
        assert!(wtx!(s, |tx| tx.delete_instance(&key).await).unwrap());
    }
    let second = race(12, 5).await;
    assert_eq!(second, vec![5, 6], "two places freed, new ids");
    let stored: Vec<u64> = rtx!(s, |tx| tx.list_instances(&g.key).await)
        .unwrap()
        .into_iter()
        .map(|i| i.instance_id)
        .collect();
    assert_eq!(stored, vec![0, 2, 4, 5, 6]);
}

/// VM writes assigning an identity while it is deleted: each either comes first (and the
/// delete removes the assignment) or finds no identity. No assignment survives it, so none
/// comes back when an identity of the same id is created again.
async fn an_identity_deleted_while_assigned_leaves_no_assignment(s: Store) {
    let v = vm("vm1");
    wtx!(s, |tx| tx.put_vm(&v, None, &[]).await).unwrap();
    for round in 0..4 {
        let u = ident("u1", "rg");
        wtx!(s, |tx| tx.put_identity(&u).await).unwrap();
        let outcomes = concurrently(7, |i| {
            let (s, v, key) = (s.clone(), v.clone(), u.key.clone());
            async move {
                if i == 3 {
                    let deleted = wtx!(s, |tx| tx.delete_identity(&key).await).unwrap();
                    return if deleted { "deleted" } else { "not found" };
                }
                match wtx!(s, |tx| tx
                    .put_vm(&v, None, std::slice::from_ref(&key))
                    .await)
                {
                    Ok(_) => "assigned",
                    Err(StoreError::Conflict(Conflict::MissingReference(_))) => "missing",
                    Err(e) => panic!("{e}"),
                }
            }
        })
        .await;
        assert_eq!(outcomes[3], "deleted");
        wtx!(s, |tx| tx.put_identity(&u).await).unwrap();
        assert!(
            rtx!(s, |tx| tx.vm_user_identities(&v.key).await)
                .unwrap()
                .is_empty(),
            "round {round}: {outcomes:?}"
        );
        assert!(wtx!(s, |tx| tx.delete_identity(&u.key).await).unwrap());
    }
}

/// A join token or host credential is only written for a host that exists, so neither can
/// outlive a host deleted on another replica and pass for one recreated under its id.
async fn tokens_and_credentials_need_their_host(s: Store) {
    assert!(matches!(
        wtx!(s, |tx| tx.insert_join_token("h", "gone", 100).await),
        Err(StoreError::Conflict(Conflict::MissingReference(_)))
    ));
    assert!(matches!(
        wtx!(s, |tx| tx.insert_host_credential(&cred("f", "gone")).await),
        Err(StoreError::Conflict(Conflict::MissingReference(_)))
    ));
    bare_host(&s, "gone").await;
    wtx!(s, |tx| tx.insert_join_token("h", "gone", 100).await).unwrap();
    wtx!(s, |tx| tx.insert_host_credential(&cred("f", "gone")).await).unwrap();
}
