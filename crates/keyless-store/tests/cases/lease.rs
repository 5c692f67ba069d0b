use crate::case;
use keyless_store::Store;

pub const CASES: &[(&str, crate::CaseFn)] = &[
    case!(one_holder_at_a_time),
    case!(claims_exclude_and_release),
];

async fn one_holder_at_a_time(s: Store) {
    assert!(s.try_lease("rotation", "a", 100, 30).await.unwrap());
    assert!(
        !s.try_lease("rotation", "b", 110, 30).await.unwrap(),
        "b while a holds it"
    );
    assert!(
        s.try_lease("rotation", "a", 120, 30).await.unwrap(),
        "a renews"
    );
    assert!(!s.try_lease("rotation", "b", 149, 30).await.unwrap());
    assert!(
        s.try_lease("rotation", "b", 150, 30).await.unwrap(),
        "b once a's expired"
    );
    assert_eq!(
        s.lease_holder("rotation", 151).await.unwrap(),
        Some(("b".into(), 180))
    );
    s.release_lease("rotation", "a").await.unwrap();
    assert_eq!(
        s.lease_holder("rotation", 151).await.unwrap().map(|h| h.0),
        Some("b".into())
    );
    s.release_lease("rotation", "b").await.unwrap();
    assert!(s.try_lease("rotation", "c", 152, 30).await.unwrap());
}

async fn claims_exclude_and_release(s: Store) {
    let c = s.claim("fic:x", 100, 30).await.unwrap().expect("free");
    assert!(s.claim("fic:x", 101, 30).await.unwrap().is_none());
    assert!(s.claim("fic:y", 101, 30).await.unwrap().is_some());
    c.release().await.unwrap();
    assert!(s.claim("fic:x", 102, 30).await.unwrap().is_some());
}
