//! Store suite cases: the directory (service principals, principal lookups) and role
//! assignments.

use super::groups::group;
use super::hosts::vm;
use super::identities::ident;
use super::meta::{concurrently, rtx, wtx};
use crate::case;
use keyless_store::*;

pub const CASES: &[(&str, crate::CaseFn)] = &[
    case!(service_principals_and_lookups),
    case!(role_assignments_unique_and_cascading),
    case!(assignments_below_a_scope_go_with_it),
    case!(concurrent_assignments_of_one_role_make_one),
    case!(concurrent_assignments_of_one_name_make_one),
    case!(assignments_written_while_their_scope_goes_do_not_outlive_it),
];

const READER: &str =
    "/subscriptions/s/providers/Microsoft.Authorization/roleDefinitions/acdd72a7-3385-48ef-bd42-f606fba81ae7";

fn ra(name: &str, scope: &str, principal: &str) -> RoleAssignmentRecord {
    RoleAssignmentRecord {
        name: name.into(),
        scope: scope.into(),
        role_definition_id: READER.into(),
        principal_id: principal.into(),
        principal_type: "ServicePrincipal".into(),
        description: None,
        created: 1,
        created_by: "x".into(),
    }
}

async fn service_principals_and_lookups(s: Store) {
    let mut sp = ServicePrincipalRecord {
        client_id: "c-app".into(),
        object_id: "O-APP".into(),
        display_name: "app".into(),
        secret_sha256: "00".into(),
        created: 1,
        certificates: vec![],
    };
    wtx!(s, |tx| tx.put_service_principal(&sp).await).unwrap();
    sp.display_name = "renamed".into();
    sp.certificates = vec![vec![1, 2, 3]];
    wtx!(s, |tx| tx.put_service_principal(&sp).await).unwrap();
    assert_eq!(
        rtx!(s, |tx| tx.get_service_principal("C-APP").await).unwrap(),
        Some(sp.clone())
    );
    assert!(rtx!(s, |tx| tx.get_service_principal("c-none").await)
        .unwrap()
        .is_none());
    let u = ident("u1", "rg");
    wtx!(s, |tx| tx.put_identity(&u).await).unwrap();
    let mut tx = s.read("test").await.unwrap();
    assert_eq!(
        tx.principal_kind("o-app").await.unwrap(),
        Some(PrincipalKind::ServicePrincipal)
    );
    assert_eq!(
        tx.principal_kind("P-U1").await.unwrap(),
        Some(PrincipalKind::ManagedIdentity)
    );
    assert_eq!(
        tx.principal_kind("c-u1").await.unwrap(),
        None,
        "a client id"
    );
    assert_eq!(tx.principal_kind("nobody").await.unwrap(), None);
    let by_object = tx.directory_lookup("O-App").await.unwrap().unwrap();
    assert_eq!(
        by_object,
        DirectoryEntry {
            object_id: "O-APP".into(),
            app_id: "c-app".into(),
            display_name: "renamed".into(),
            kind: PrincipalKind::ServicePrincipal,
            resource_id: None,
        }
    );
    assert_eq!(tx.directory_lookup("c-app").await.unwrap(), Some(by_object));
    let mi = DirectoryEntry {
        object_id: u.principal_id.clone(),
        app_id: u.client_id.clone(),
        display_name: "u1".into(),
        kind: PrincipalKind::ManagedIdentity,
        resource_id: Some(u.resource_id.clone()),
    };
    assert_eq!(tx.directory_lookup("p-u1").await.unwrap(), Some(mi.clone()));
    assert_eq!(tx.directory_lookup("C-U1").await.unwrap(), Some(mi));
    assert_eq!(tx.directory_lookup("nobody").await.unwrap(), None);
}

async fn role_assignments_unique_and_cascading(s: Store) {
    let u = ident("u1", "rg");
    wtx!(s, |tx| tx.put_identity(&u).await).unwrap();
    let insert = |r: RoleAssignmentRecord| {
        let s = s.clone();
        async move { wtx!(s, |tx| tx.insert_role_assignment(&r).await).unwrap() }
    };
    let p = u.principal_id.as_str();
    let a1 = ra("a1", "/subscriptions/s/resourceGroups/rg", p);
    assert_eq!(insert(a1.clone()).await, RoleAssignmentInsert::Created);
    assert_eq!(
        insert(ra(
            "a2",
            "/subscriptions/S/resourcegroups/RG",
            &p.to_uppercase()
        ))
        .await,
        RoleAssignmentInsert::Duplicate
    );
    assert_eq!(
        insert(ra("a1", "/subscriptions/s", p)).await,
        RoleAssignmentInsert::NameTaken(a1.clone())
    );
    assert_eq!(
        insert(ra("a3", "/subscriptions/s", p)).await,
        RoleAssignmentInsert::Created
    );
    assert_eq!(
        rtx!(s, |tx| tx.get_role_assignment("A1").await).unwrap(),
        Some(a1.clone())
    );
    assert_eq!(
        rtx!(s, |tx| tx
            .role_assignments_for_principal(&p.to_uppercase())
            .await)
        .unwrap()
        .len(),
        2
    );
    assert!(
        rtx!(s, |tx| tx.role_assignments_for_principal("nobody").await)
            .unwrap()
            .is_empty()
    );
    // listed by scope, then name
    let names: Vec<String> = rtx!(s, |tx| tx.list_role_assignments().await)
        .unwrap()
        .into_iter()
        .map(|a| a.name)
        .collect();
    assert_eq!(names, vec!["a3", "a1"]);
    assert_eq!(
        wtx!(s, |tx| tx.delete_role_assignment("A1").await).unwrap(),
        Some(a1)
    );
    assert_eq!(
        wtx!(s, |tx| tx.delete_role_assignment("a1").await).unwrap(),
        None
    );
    // deleting the identity deletes what it holds
    assert!(wtx!(s, |tx| tx.delete_identity(&u.key).await).unwrap());
    assert!(rtx!(s, |tx| tx.list_role_assignments().await)
        .unwrap()
        .is_empty());
}

/// A user-assigned identity is a scope: its delete takes the assignments at it and below it,
/// not those of a sibling whose id merely starts the same.
async fn assignments_below_a_scope_go_with_it(s: Store) {
    let (u, holder) = (ident("u1", "rg"), ident("holder", "rg"));
    for i in [&u, &holder] {
        wtx!(s, |tx| tx.put_identity(i).await).unwrap();
    }
    let p = holder.principal_id.as_str();
    for a in [
        ra("at", &u.resource_id, p),
        ra(
            "below",
            &format!("{}/federatedIdentityCredentials/f", u.resource_id),
            p,
        ),
        ra("sibling", &format!("{}0", u.resource_id), p),
        ra("above", "/subscriptions/s/resourceGroups/rg", p),
    ] {
        wtx!(s, |tx| tx.insert_role_assignment(&a).await).unwrap();
    }
    assert!(wtx!(s, |tx| tx.delete_identity(&u.key).await).unwrap());
    let mut names: Vec<String> = rtx!(s, |tx| tx.role_assignments_for_principal(p).await)
        .unwrap()
        .into_iter()
        .map(|a| a.name)
        .collect();
    names.sort();
    assert_eq!(names, vec!["above", "sibling"]);
}

async fn concurrent_assignments_of_one_role_make_one(s: Store) {
    let outcomes = concurrently(10, |i| {
        let (s, r) = (s.clone(), ra(&format!("n{i}"), "/subscriptions/s", "p"));
        async move { wtx!(s, |tx| tx.insert_role_assignment(&r).await).unwrap() }
    })
    .await;
    let created = outcomes
        .iter()
        .filter(|o| **o == RoleAssignmentInsert::Created)
        .count();
    let dup = outcomes
        .iter()
        .filter(|o| **o == RoleAssignmentInsert::Duplicate)
        .count();
    assert_eq!((created, dup), (1, 9), "{outcomes:?}");
    assert_eq!(
        rtx!(s, |tx| tx.list_role_assignments().await)
            .unwrap()
            .len(),
        1
    );
}

async fn concurrent_assignments_of_one_name_make_one(s: Store) {
    let outcomes = concurrently(10, |i| {
        let (s, r) = (s.clone(), ra("same", "/subscriptions/s", &format!("p{i}")));
        async move { wtx!(s, |tx| tx.insert_role_assignment(&r).await).unwrap() }
    })
    .await;
    let created: Vec<usize> = (0..10)
        .filter(|i| outcomes[*i] == RoleAssignmentInsert::Created)
        .collect();
    assert_eq!(created.len(), 1, "{outcomes:?}");
    let winner = ra("same", "/subscriptions/s", &format!("p{}", created[0]));
    for o in &outcomes {
        assert!(
            *o == RoleAssignmentInsert::Created
                || *o == RoleAssignmentInsert::NameTaken(winner.clone()),
            "{o:?}"
        );
    }
    assert_eq!(
        rtx!(s, |tx| tx.list_role_assignments().await).unwrap(),
        vec![winner]
    );
}

/// An assignment written (scope held, as the server does) while its scope is deleted on
/// another connection never outlives it: the delete waits for the hold, then takes the
/// assignment with the rest under the scope; or the writer finds the scope gone.
async fn assignments_written_while_their_scope_goes_do_not_outlive_it(s: Store) {
    let holders: Vec<IdentityRecord> = (0..9).map(|i| ident(&format!("holder{i}"), "rg")).collect();
    wtx!(s, |tx| tx.put_resource_group(&group("rg")).await).unwrap();
    for u in &holders {
        wtx!(s, |tx| tx.put_identity(u).await).unwrap();
    }
    let u = holders[0].clone();
    for round in 0..4 {
        let v = vm("scoped");
        wtx!(s, |tx| tx.put_vm(&v, None, &[]).await).unwrap();
        let outcomes = concurrently(9, |i| {
            let (s, v, principal) = (s.clone(), v.clone(), holders[i].principal_id.clone());
            async move {
                if i == 4 {
                    let deleted = wtx!(s, |tx| tx.delete_vm(&v.key).await).unwrap();
                    return if deleted { "deleted" } else { "not found" };
                }
                let mut tx = s.write("test").await.unwrap();
                if !tx.hold_scope(&v.key).await.unwrap() {
                    return "gone";
                }
                let a = ra(&format!("r{round}-{i}"), &v.resource_id, &principal);
                match tx.insert_role_assignment(&a).await.unwrap() {
                    RoleAssignmentInsert::Created => {}
                    o => panic!("{o:?}"),
                }
                tx.commit().await.unwrap();
                "created"
            }
        })
        .await;
        assert_eq!(outcomes[4], "deleted");
        let left: Vec<String> = rtx!(s, |tx| tx.list_role_assignments().await)
            .unwrap()
            .into_iter()
            .filter(|a| a.scope.eq_ignore_ascii_case(&v.resource_id))
            .map(|a| a.name)
            .collect();
        assert!(
            left.is_empty(),
            "round {round}: {left:?} outlived the VM ({outcomes:?})"
        );
    }
    // the principal is held the same way
    assert!(wtx!(s, |tx| tx
        .hold_principal(&u.principal_id.to_lowercase())
        .await)
    .unwrap());
    assert!(!wtx!(s, |tx| tx.hold_principal("no-such-principal").await).unwrap());
    assert!(!wtx!(s, |tx| tx
        .hold_scope("/subscriptions/s/resourcegroups/none")
        .await)
    .unwrap());
    assert!(wtx!(s, |tx| tx.hold_scope("/subscriptions/s").await).unwrap());
}
