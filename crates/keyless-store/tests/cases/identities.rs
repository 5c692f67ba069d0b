//! Store suite cases: identities and their federated identity credentials.

use super::meta::{concurrently, rtx, wtx};
use crate::case;
use keyless_store::*;

pub const CASES: &[(&str, crate::CaseFn)] = &[
    case!(identities_are_put_listed_and_deleted),
    case!(fics_limits_and_uniqueness),
    case!(a_fic_needs_its_identity),
    case!(concurrent_fics_stop_at_the_limit),
    case!(concurrent_fics_keep_issuer_and_subject_unique),
    case!(fics_written_while_their_identity_goes_do_not_outlive_it),
];

/// A user-assigned identity `name` in group `rg` of subscription `s`.
pub(crate) fn ident(name: &str, rg: &str) -> IdentityRecord {
    let rid = format!("/subscriptions/s/resourceGroups/{rg}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}");
    IdentityRecord {
        key: rid.to_lowercase(),
        resource_id: rid,
        name: name.into(),
        subscription: "s".into(),
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

fn fic(identity: &IdentityRecord, name: &str, subject: &str) -> FicRecord {
    FicRecord {
        identity_key: identity.key.clone(),
        name: name.into(),
        issuer: "https://issuer.example".into(),
        subject: subject.into(),
        audiences: vec!["api://AzureADTokenExchange".into()],
        description: None,
        created: 1,
    }
}

async fn identities_are_put_listed_and_deleted(s: Store) {
    let (a, b, other) = (ident("a", "rg"), ident("b", "RG"), ident("c", "other"));
    for i in [&b, &a, &other] {
        assert!(wtx!(s, |tx| tx.put_identity(i).await).unwrap(), "created");
    }
    let mut tagged = a.clone();
    tagged.tags.insert("k".into(), "v".into());
    assert!(
        !wtx!(s, |tx| tx.put_identity(&tagged).await).unwrap(),
        "replaced"
    );
    assert_eq!(
        rtx!(s, |tx| tx.get_identity(&a.key).await).unwrap(),
        Some(tagged.clone())
    );
    // by group (any case), by key; or the whole subscription
    assert_eq!(
        rtx!(s, |tx| tx.list_identities("S", Some("rg")).await).unwrap(),
        vec![tagged.clone(), b.clone()]
    );
    assert_eq!(
        rtx!(s, |tx| tx.list_identities("s", None).await)
            .unwrap()
            .len(),
        3
    );
    assert!(rtx!(s, |tx| tx.list_identities("s2", None).await)
        .unwrap()
        .is_empty());
    // principal and client ids are unique across identities
    let mut clash = ident("d", "rg");
    clash.client_id = a.client_id.clone();
    assert!(matches!(
        wtx!(s, |tx| tx.put_identity(&clash).await),
        Err(StoreError::Conflict(Conflict::Unique(_)))
    ));
    assert!(rtx!(s, |tx| tx.get_identity(&clash.key).await)
        .unwrap()
        .is_none());
    assert!(wtx!(s, |tx| tx.delete_identity(&a.key).await).unwrap());
    assert!(!wtx!(s, |tx| tx.delete_identity(&a.key).await).unwrap());
    assert!(rtx!(s, |tx| tx.get_identity(&a.key).await)
        .unwrap()
        .is_none());
}

async fn fics_limits_and_uniqueness(s: Store) {
    let u = ident("u1", "rg");
    wtx!(s, |tx| tx.put_identity(&u).await).unwrap();
    let f = |name: &str, sub: &str| fic(&u, name, sub);
    let put = |r: FicRecord| {
        let s = s.clone();
        async move { wtx!(s, |tx| tx.put_fic(&r, 2).await).unwrap() }
    };
    assert_eq!(put(f("a1", "s1")).await, FicPut::Created);
    assert_eq!(put(f("A1", "s1")).await, FicPut::Updated);
    assert_eq!(put(f("a2", "s1")).await, FicPut::DuplicateIssuerSubject);
    assert_eq!(put(f("a2", "s2")).await, FicPut::Created);
    assert_eq!(put(f("a3", "s3")).await, FicPut::LimitReached);
    // an update of an existing name is not a new credential
    assert_eq!(put(f("a2", "s9")).await, FicPut::Updated);
    let names: Vec<String> = rtx!(s, |tx| tx.list_fics(&u.key).await)
        .unwrap()
        .into_iter()
        .map(|f| f.name)
        .collect();
    assert_eq!(names, vec!["A1", "a2"]);
    assert_eq!(
        rtx!(s, |tx| tx.get_fic(&u.key, "a1").await)
            .unwrap()
            .unwrap()
            .name,
        "A1"
    );
    assert!(wtx!(s, |tx| tx.delete_fic(&u.key, "A2").await).unwrap());
    assert!(!wtx!(s, |tx| tx.delete_fic(&u.key, "a2").await).unwrap());
    assert_eq!(put(f("a3", "s3")).await, FicPut::Created);
    assert!(wtx!(s, |tx| tx.delete_identity(&u.key).await).unwrap());
    assert!(rtx!(s, |tx| tx.list_fics(&u.key).await).unwrap().is_empty());
}

async fn a_fic_needs_its_identity(s: Store) {
    let u = ident("u1", "rg");
    assert!(matches!(
        wtx!(s, |tx| tx.put_fic(&fic(&u, "a", "s"), 20).await),
        Err(StoreError::Conflict(Conflict::MissingReference(_)))
    ));
    assert!(rtx!(s, |tx| tx.list_fics(&u.key).await).unwrap().is_empty());
}

/// Thirty writers of new credentials at once, each in its own unit of work: exactly `max` get
/// in, none is lost, the rest are told the limit is reached.
async fn concurrent_fics_stop_at_the_limit(s: Store) {
    let u = ident("u1", "rg");
    wtx!(s, |tx| tx.put_identity(&u).await).unwrap();
    let outcomes = concurrently(30, |i| {
        let (s, f) = (s.clone(), fic(&u, &format!("f{i:02}"), &format!("sub{i}")));
        async move { wtx!(s, |tx| tx.put_fic(&f, 20).await).unwrap() }
    })
    .await;
    let created: Vec<String> = outcomes
        .iter()
        .enumerate()
        .filter(|(_, o)| **o == FicPut::Created)
        .map(|(i, _)| format!("f{i:02}"))
        .collect();
    assert_eq!(created.len(), 20, "{outcomes:?}");
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| **o == FicPut::LimitReached)
            .count(),
        10,
        "{outcomes:?}"
    );
    let stored: Vec<String> = rtx!(s, |tx| tx.list_fics(&u.key).await)
        .unwrap()
        .into_iter()
        .map(|f| f.name)
        .collect();
    assert_eq!(stored, created, "exactly the credentials told Created");
}

async fn concurrent_fics_keep_issuer_and_subject_unique(s: Store) {
    let u = ident("u1", "rg");
    wtx!(s, |tx| tx.put_identity(&u).await).unwrap();
    let outcomes = concurrently(12, |i| {
        let (s, f) = (s.clone(), fic(&u, &format!("f{i:02}"), "same-subject"));
        async move { wtx!(s, |tx| tx.put_fic(&f, 20).await).unwrap() }
    })
    .await;
    let created = outcomes.iter().filter(|o| **o == FicPut::Created).count();
    let dup = outcomes
        .iter()
        .filter(|o| **o == FicPut::DuplicateIssuerSubject)
        .count();
    assert_eq!((created, dup), (1, 11), "{outcomes:?}");
    assert_eq!(rtx!(s, |tx| tx.list_fics(&u.key).await).unwrap().len(), 1);
}

/// Credentials written while their identity is deleted either come first (and go with it) or
/// find no identity: none survives it, so none comes back if the name is created again.
async fn fics_written_while_their_identity_goes_do_not_outlive_it(s: Store) {
    for round in 0..4 {
        let u = ident("u1", "rg");
        wtx!(s, |tx| tx.put_identity(&u).await).unwrap();
        let outcomes = concurrently(9, |i| {
            let (s, f, key) = (
                s.clone(),
                fic(&u, &format!("f{round}-{i}"), &format!("sub{round}-{i}")),
                u.key.clone(),
            );
            async move {
                if i == 4 {
                    let deleted = wtx!(s, |tx| tx.delete_identity(&key).await).unwrap();
                    return if deleted { "deleted" } else { "not found" };
                }
                match wtx!(s, |tx| tx.put_fic(&f, 20).await) {
                    Ok(FicPut::Created) => "created",
                    Ok(o) => panic!("{o:?}"),
                    Err(StoreError::Conflict(Conflict::MissingReference(_))) => "missing",
                    Err(e) => panic!("{e}"),
                }
            }
        })
        .await;
        assert_eq!(outcomes[4], "deleted");
        wtx!(s, |tx| tx.put_identity(&u).await).unwrap();
        assert!(
            rtx!(s, |tx| tx.list_fics(&u.key).await).unwrap().is_empty(),
            "round {round}: {outcomes:?}"
        );
        assert!(wtx!(s, |tx| tx.delete_identity(&u.key).await).unwrap());
    }
}
