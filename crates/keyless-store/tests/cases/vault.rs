//! Store suite cases: Key Vault (vaults, object names and versions, soft delete, purge), with
//! the races the database must decide (renewals, first writes, vault names), and the unit
//! helpers the tracked / cluster / activity cases share.

use crate::case;
use keyless_store::*;
use std::future::Future;
use std::sync::Arc;

pub const CASES: &[(&str, crate::CaseFn)] = &[
    case!(an_object_needs_its_vault),
    case!(versions_delete_recover_purge),
    case!(a_write_meeting_a_deleted_name_leaves_nothing),
    case!(expect_latest_makes_renewal_single),
    case!(names_keep_their_state_and_versions_their_updates),
    case!(vault_names_are_global_and_objects_go_with_the_vault),
    case!(a_group_delete_takes_its_vaults),
    case!(concurrent_renewals_write_one_version),
    case!(concurrent_first_writes_take_turns),
    case!(concurrent_vault_creates_one_wins),
];

/// `in_write!(store, |tx| tx.op(..).await)`: run in a write unit of its own, committed when
/// the result is `Ok` (rolled back otherwise, as a request's unit is).
macro_rules! in_write {
    ($s:expr, |$tx:ident| $e:expr) => {{
        let mut $tx = $s.write("test").await.unwrap();
        let out = $e;
        if out.is_ok() {
            $tx.commit().await.unwrap();
        }
        out
    }};
}
pub(crate) use in_write;

/// `in_read!(store, |tx| tx.op(..).await)`: run in a read unit of its own.
macro_rules! in_read {
    ($s:expr, |$tx:ident| $e:expr) => {{
        let mut $tx = $s.read("test").await.unwrap();
        $e
    }};
}
pub(crate) use in_read;

/// Run `n` write units at once; each is committed when its work returns `Ok`. On PostgreSQL
/// every unit is open before any of them starts working (a barrier after `write`), so their
/// statements truly interleave; a SQLite write unit excludes the others from its start, so
/// there the barrier comes before `write`. Results in task order.
pub(crate) async fn racing<T, F, Fut>(s: &Store, n: usize, work: F) -> Vec<Result<T>>
where
    T: Send + 'static,
    F: Fn(usize, Tx) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = (Tx, Result<T>)> + Send + 'static,
{
    let gate = Arc::new(tokio::sync::Barrier::new(n));
    let work = Arc::new(work);
    let after_begin = s.backend() == Backend::Postgres;
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (s, gate, work) = (s.clone(), gate.clone(), work.clone());
            tokio::spawn(async move {
                if !after_begin {
                    gate.wait().await;
                }
                let tx = s.write("race").await.unwrap();
                if after_begin {
                    gate.wait().await;
                }
                let (tx, out) = work(i, tx).await;
                if out.is_ok() {
                    tx.commit().await.unwrap();
                }
                out
            })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.expect("task"));
    }
    out
}

pub(crate) fn ver(coll: &str, name: &str, version: &str, value: &[u8]) -> KvVersionRecord {
    KvVersionRecord {
        vault: "kv1".into(),
        coll: coll.into(),
        name: name.into(),
        version: version.into(),
        created: 1,
        updated: 1,
        enabled: true,
        nbf: None,
        exp: None,
        content_type: None,
        tags: Default::default(),
        managed: false,
        public: serde_json::json!({}),
        private: Some(value.to_vec()),
    }
}

fn one(v: KvVersionRecord) -> KvWrite {
    KvWrite {
        versions: vec![v],
        extra: None,
        expect_latest: None,
    }
}

/// Vault `name` (group `rg`), created unless it exists: objects are only written into a
/// vault that exists.
pub(crate) async fn ensure_vault(s: &Store, name: &str) {
    let mut tx = s.write("test").await.unwrap();
    if tx.get_vault_by_name(name).await.unwrap().is_none() {
        tx.put_vault(&vault(name, "rg")).await.unwrap();
    }
    tx.commit().await.unwrap();
}

async fn write(s: &Store, v: KvVersionRecord) -> KvWriteOutcome {
    ensure_vault(s, &v.vault).await;
    in_write!(s, |tx| tx.kv_write(&one(v)).await).unwrap()
}

pub(crate) fn vault(name: &str, rg: &str) -> VaultRecord {
    let rid =
        format!("/subscriptions/s/resourceGroups/{rg}/providers/Microsoft.KeyVault/vaults/{name}");
    VaultRecord {
        key: rid.to_lowercase(),
        resource_id: rid,
        name: name.into(),
        subscription: "s".into(),
        resource_group: rg.into(),
        location: "local".into(),
        tags: Default::default(),
        properties: serde_json::json!({}),
        created: 1,
    }
}

async fn versions_delete_recover_purge(s: Store) {
    ensure_vault(&s, "kv1").await;
    assert_eq!(
        write(&s, ver("secrets", "Db-Pass", "a1", b"one")).await,
        KvWriteOutcome::Written
    );
    assert_eq!(
        write(&s, ver("secrets", "db-pass", "a2", b"two")).await,
        KvWriteOutcome::Written
    );
    let latest = in_read!(s, |tx| tx
        .kv_version("kv1", "secrets", "DB-PASS", None)
        .await)
    .unwrap()
    .unwrap();
    assert_eq!(
        (latest.version.as_str(), latest.private.as_deref()),
        ("a2", Some(&b"two"[..]))
    );
    let first = in_read!(s, |tx| tx
        .kv_version("kv1", "secrets", "db-pass", Some("a1"))
        .await)
    .unwrap()
    .unwrap();
    assert_eq!(first.private.as_deref(), Some(&b"one"[..]));
    assert!(in_read!(s, |tx| tx
        .kv_version("kv1", "secrets", "db-pass", Some("zz"))
        .await)
    .unwrap()
    .is_none());
    assert_eq!(
        in_read!(s, |tx| tx.kv_name("kv1", "secrets", "db-pass").await)
            .unwrap()
            .unwrap()
            .name,
        "Db-Pass"
    );
    let versions = in_read!(s, |tx| tx.kv_versions("kv1", "secrets", "db-pass").await).unwrap();
    assert_eq!(
        versions
            .iter()
            .map(|v| v.version.as_str())
            .collect::<Vec<_>>(),
        ["a1", "a2"]
    );
    assert!(versions.iter().all(|v| v.private.is_none()));

    assert!(in_write!(s, |tx| tx
        .kv_delete("kv1", &["secrets"], "db-pass", 10, Some(100))
        .await)
    .unwrap());
    assert!(
        !in_write!(s, |tx| tx
            .kv_delete("kv1", &["secrets"], "db-pass", 11, Some(101))
            .await)
        .unwrap(),
        "already deleted"
    );
    assert_eq!(
        in_read!(s, |tx| tx.kv_name("kv1", "secrets", "db-pass").await)
            .unwrap()
            .unwrap()
            .deleted,
        Some((10, 100))
    );
    assert_eq!(
        write(&s, ver("secrets", "db-pass", "a3", b"x")).await,
        KvWriteOutcome::Deleted
    );
    assert!(
        in_read!(s, |tx| tx.kv_latest("kv1", "secrets", false).await)
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        in_read!(s, |tx| tx.kv_latest("kv1", "secrets", true).await)
            .unwrap()
            .len(),
        1
    );
    assert!(in_write!(s, |tx| tx.kv_recover("kv1", &["secrets"], "db-pass").await).unwrap());
    assert_eq!(
        in_read!(s, |tx| tx.kv_latest("kv1", "secrets", false).await).unwrap()[0].version,
        "a2"
    );
    // purge only applies to deleted names
    assert!(!in_write!(s, |tx| tx.kv_purge("kv1", &["secrets"], "db-pass").await).unwrap());
    in_write!(s, |tx| tx
        .kv_delete("kv1", &["secrets"], "db-pass", 10, Some(100))
        .await)
    .unwrap();
    assert_eq!(in_write!(s, |tx| tx.kv_purge_expired(99).await).unwrap(), 0);
    assert_eq!(
        in_write!(s, |tx| tx.kv_purge_expired(100).await).unwrap(),
        1
    );
    assert!(
        in_read!(s, |tx| tx.kv_name("kv1", "secrets", "db-pass").await)
            .unwrap()
            .is_none()
    );
    assert!(
        in_read!(s, |tx| tx.kv_versions("kv1", "secrets", "db-pass").await)
            .unwrap()
            .is_empty(),
        "versions go with the name"
    );
    assert_eq!(
        write(&s, ver("secrets", "db-pass", "a4", b"y")).await,
        KvWriteOutcome::Written
    );
    // purge of one deleted name, and an outright delete
    write(&s, ver("secrets", "other", "o1", b"z")).await;
    in_write!(s, |tx| tx
        .kv_delete("kv1", &["secrets"], "other", 1, Some(1_000))
        .await)
    .unwrap();
    assert!(in_write!(s, |tx| tx.kv_purge("kv1", &["secrets"], "OTHER").await).unwrap());
    assert!(
        in_read!(s, |tx| tx.kv_versions("kv1", "secrets", "other").await)
            .unwrap()
            .is_empty()
    );
    assert!(in_write!(s, |tx| tx
        .kv_delete("kv1", &["secrets"], "db-pass", 1, None)
        .await)
    .unwrap());
    assert!(
        in_read!(s, |tx| tx.kv_name("kv1", "secrets", "db-pass").await)
            .unwrap()
            .is_none()
    );
    assert!(in_read!(s, |tx| tx
        .kv_version("kv1", "secrets", "db-pass", None)
        .await)
    .unwrap()
    .is_none());
}

async fn a_write_meeting_a_deleted_name_leaves_nothing(s: Store) {
    ensure_vault(&s, "kv1").await;
    write(&s, ver("secrets", "c", "s1", b"x")).await;
    in_write!(s, |tx| tx
        .kv_delete("kv1", &["secrets"], "c", 1, Some(100))
        .await)
    .unwrap();
    let triple = KvWrite {
        versions: vec![
            ver("certificates", "c", "v1", b""),
            ver("keys", "c", "v1", b"key"),
            ver("secrets", "c", "v1", b"pem"),
        ],
        extra: Some(("certificates".into(), serde_json::json!({"policy": 1}))),
        expect_latest: None,
    };
    // the outcome is an answer, not an error: the unit commits, and still nothing is kept
    assert_eq!(
        in_write!(s, |tx| tx.kv_write(&triple).await).unwrap(),
        KvWriteOutcome::Deleted
    );
    for coll in ["certificates", "keys"] {
        assert!(
            in_read!(s, |tx| tx.kv_name("kv1", coll, "c").await)
                .unwrap()
                .is_none(),
            "no {coll} name left behind"
        );
        assert!(in_read!(s, |tx| tx.kv_versions("kv1", coll, "c").await)
            .unwrap()
            .is_empty());
    }
    assert_eq!(
        in_read!(s, |tx| tx.kv_versions("kv1", "secrets", "c").await)
            .unwrap()
            .len(),
        1
    );
    // once recovered, the same write goes through, with its per-object state
    in_write!(s, |tx| tx.kv_recover("kv1", &["secrets"], "c").await).unwrap();
    assert_eq!(
        in_write!(s, |tx| tx.kv_write(&triple).await).unwrap(),
        KvWriteOutcome::Written
    );
    assert_eq!(
        in_read!(s, |tx| tx.kv_name("kv1", "certificates", "c").await)
            .unwrap()
            .unwrap()
            .extra,
        serde_json::json!({"policy": 1})
    );
    let secret = in_read!(s, |tx| tx.kv_version("kv1", "secrets", "c", None).await)
        .unwrap()
        .unwrap();
    assert_eq!(
        (secret.version.as_str(), secret.private.as_deref()),
        ("v1", Some(&b"pem"[..]))
    );
}

async fn expect_latest_makes_renewal_single(s: Store) {
    ensure_vault(&s, "kv1").await;
    write(&s, ver("certificates", "c", "v1", b"k")).await;
    let renew = |v: &str, expect: Option<&str>| KvWrite {
        versions: vec![ver("certificates", "c", v, b"k")],
        extra: None,
        expect_latest: Some(("certificates".into(), expect.map(str::to_string))),
    };
    assert_eq!(
        in_write!(s, |tx| tx.kv_write(&renew("v2", Some("v1"))).await).unwrap(),
        KvWriteOutcome::Written
    );
    assert_eq!(
        in_write!(s, |tx| tx.kv_write(&renew("v3", Some("v1"))).await).unwrap(),
        KvWriteOutcome::Stale
    );
    assert_eq!(
        in_write!(s, |tx| tx.kv_write(&renew("v3", None)).await).unwrap(),
        KvWriteOutcome::Stale,
        "expects no version yet"
    );
    assert_eq!(
        in_read!(s, |tx| tx.kv_versions("kv1", "certificates", "c").await)
            .unwrap()
            .len(),
        2
    );
    // a first version expected to be the first, and one expected on a name that is not there
    let first = |name: &str, expect: Option<&str>| KvWrite {
        versions: vec![ver("certificates", name, "n1", b"k")],
        extra: None,
        expect_latest: Some(("certificates".into(), expect.map(str::to_string))),
    };
    assert_eq!(
        in_write!(s, |tx| tx.kv_write(&first("fresh", Some("x"))).await).unwrap(),
        KvWriteOutcome::Stale
    );
    assert!(
        in_read!(s, |tx| tx.kv_name("kv1", "certificates", "fresh").await)
            .unwrap()
            .is_none(),
        "a stale write leaves no name"
    );
    assert_eq!(
        in_write!(s, |tx| tx.kv_write(&first("fresh", None)).await).unwrap(),
        KvWriteOutcome::Written
    );
    assert_eq!(
        in_write!(s, |tx| tx.kv_write(&first("fresh", None)).await).unwrap(),
        KvWriteOutcome::Stale
    );
}

async fn names_keep_their_state_and_versions_their_updates(s: Store) {
    ensure_vault(&s, "kv1").await;
    // per-object state may come before any version (a pending certificate operation)
    assert!(in_write!(s, |tx| tx
        .kv_set_extra(
            "kv1",
            "certificates",
            "Web",
            &serde_json::json!({"pending": true})
        )
        .await)
    .unwrap());
    let name = in_read!(s, |tx| tx.kv_name("kv1", "certificates", "web").await)
        .unwrap()
        .unwrap();
    assert_eq!(
        (name.name.as_str(), name.deleted, name.extra),
        ("Web", None, serde_json::json!({"pending": true}))
    );
    in_write!(s, |tx| tx
        .kv_set_extra(
            "kv1",
            "certificates",
            "WEB",
            &serde_json::json!({"pending": false})
        )
        .await)
    .unwrap();
    assert_eq!(
        in_read!(s, |tx| tx.kv_name("kv1", "certificates", "web").await)
            .unwrap()
            .unwrap()
            .extra,
        serde_json::json!({"pending": false})
    );
    write(&s, ver("certificates", "web", "w1", b"")).await;
    write(&s, ver("certificates", "api", "a1", b"")).await;
    let mut other = ver("certificates", "zeta", "z1", b"");
    other.vault = "kv2".into();
    write(&s, other).await;
    write(&s, ver("secrets", "web", "s1", b"pw")).await;
    in_write!(s, |tx| tx
        .kv_delete("kv1", &["certificates"], "api", 5, Some(50))
        .await)
    .unwrap();
    let names = |deleted| {
        let s = s.clone();
        async move {
            in_read!(s, |tx| tx.kv_names("kv1", "certificates", deleted).await)
                .unwrap()
                .into_iter()
                .map(|n| n.name)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(names(false).await, ["Web"]);
    assert_eq!(names(true).await, ["api"]);
    let all = in_read!(s, |tx| tx.kv_all_names("certificates").await).unwrap();
    assert_eq!(
        all.iter()
            .map(|n| (n.vault.as_str(), n.name.as_str()))
            .collect::<Vec<_>>(),
        [("kv1", "Web"), ("kv2", "zeta")],
        "live names of every vault, by vault"
    );
    // an update changes the stored attributes, never the sealed value
    let mut w1 = in_read!(s, |tx| tx.kv_version("kv1", "secrets", "web", None).await)
        .unwrap()
        .unwrap();
    w1.enabled = false;
    w1.tags.insert("env".into(), "prod".into());
    w1.private = Some(b"ignored".to_vec());
    assert!(in_write!(s, |tx| tx.kv_update_version(&w1).await).unwrap());
    let back = in_read!(s, |tx| tx
        .kv_version("kv1", "secrets", "web", Some("s1"))
        .await)
    .unwrap()
    .unwrap();
    assert!(!back.enabled);
    assert_eq!(back.tags.get("env").map(String::as_str), Some("prod"));
    assert_eq!(back.private.as_deref(), Some(&b"pw"[..]));
    let mut missing = w1.clone();
    missing.version = "nope".into();
    assert!(!in_write!(s, |tx| tx.kv_update_version(&missing).await).unwrap());
}

async fn vault_names_are_global_and_objects_go_with_the_vault(s: Store) {
    let v = vault("KV1", "rg");
    assert!(in_write!(s, |tx| tx.put_vault(&v).await).unwrap());
    let mut changed = v.clone();
    changed.tags.insert("a".into(), "b".into());
    assert!(!in_write!(s, |tx| tx.put_vault(&changed).await).unwrap());
    assert_eq!(
        in_read!(s, |tx| tx.get_vault(&v.resource_id).await).unwrap(),
        Some(changed.clone())
    );
    let other = vault("kv1", "rg2");
    assert!(matches!(
        in_write!(s, |tx| tx.put_vault(&other).await),
        Err(StoreError::Conflict(Conflict::NameTaken(_)))
    ));
    assert!(in_read!(s, |tx| tx.get_vault(&other.key).await)
        .unwrap()
        .is_none());
    assert_eq!(
        in_read!(s, |tx| tx.get_vault_by_name("Kv1").await)
            .unwrap()
            .map(|v| v.key),
        Some(v.key.clone())
    );
    in_write!(s, |tx| tx.put_vault(&vault("kv0", "RG")).await).unwrap();
    in_write!(s, |tx| tx.put_vault(&vault("kv9", "rg2")).await).unwrap();
    let names = |rg: Option<&'static str>| {
        let s = s.clone();
        async move {
            in_read!(s, |tx| tx.list_vaults("S", rg).await)
                .unwrap()
                .into_iter()
                .map(|v| v.name)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(names(None).await, ["kv0", "KV1", "kv9"]);
    assert_eq!(names(Some("Rg")).await, ["kv0", "KV1"]);

    write(&s, ver("secrets", "pw", "a1", b"PLAINTEXT-MARKER-93f1")).await;
    assert_eq!(
        in_read!(s, |tx| tx
            .kv_version("kv1", "secrets", "pw", Some("a1"))
            .await)
        .unwrap()
        .unwrap()
        .private
        .unwrap(),
        b"PLAINTEXT-MARKER-93f1"
    );
    assert!(in_write!(s, |tx| tx.delete_vault(&v.resource_id).await).unwrap());
    assert!(!in_write!(s, |tx| tx.delete_vault(&v.key).await).unwrap());
    assert!(in_read!(s, |tx| tx.kv_name("kv1", "secrets", "pw").await)
        .unwrap()
        .is_none());
    assert!(
        in_read!(s, |tx| tx.kv_version("kv1", "secrets", "pw", None).await)
            .unwrap()
            .is_none()
    );
    // the name is free again
    assert!(in_write!(s, |tx| tx.put_vault(&other).await).unwrap());
}

async fn a_group_delete_takes_its_vaults(s: Store) {
    for name in ["rg", "keep"] {
        in_write!(s, |tx| tx
            .put_resource_group(&ResourceGroupRecord {
                subscription: "s".into(),
                name: name.into(),
                location: "local".into(),
                tags: Default::default(),
            })
            .await)
        .unwrap();
    }
    let (gone, kept) = (vault("kv1", "rg"), vault("kv2", "keep"));
    for v in [&gone, &kept] {
        in_write!(s, |tx| tx.put_vault(v).await).unwrap();
    }
    write(&s, ver("secrets", "pw", "a1", b"x")).await;
    let mut in_kept = ver("secrets", "pw", "b1", b"y");
    in_kept.vault = "kv2".into();
    write(&s, in_kept).await;
    assert!(in_write!(s, |tx| tx.delete_resource_group("S", "RG").await).unwrap());
    assert!(in_read!(s, |tx| tx.get_vault(&gone.key).await)
        .unwrap()
        .is_none());
    assert!(in_read!(s, |tx| tx.kv_name("kv1", "secrets", "pw").await)
        .unwrap()
        .is_none());
    assert!(in_read!(s, |tx| tx.get_vault(&kept.key).await)
        .unwrap()
        .is_some());
    assert_eq!(
        in_read!(s, |tx| tx.kv_version("kv2", "secrets", "pw", None).await)
            .unwrap()
            .unwrap()
            .version,
        "b1"
    );
}

async fn concurrent_renewals_write_one_version(s: Store) {
    ensure_vault(&s, "kv1").await;
    write(&s, ver("certificates", "c", "v1", b"k")).await;
    let outcomes = racing(&s, 10, |i, mut tx| async move {
        let w = KvWrite {
            versions: vec![
                ver("certificates", "c", &format!("r{i}"), b""),
                ver("secrets", "c", &format!("r{i}"), b"pem"),
            ],
            extra: Some(("certificates".into(), serde_json::json!({ "by": i }))),
            expect_latest: Some(("certificates".into(), Some("v1".into()))),
        };
        let out = tx.kv_write(&w).await;
        (tx, out)
    })
    .await;
    let outcomes: Vec<KvWriteOutcome> = outcomes.into_iter().map(Result::unwrap).collect();
    let won: Vec<usize> = (0..10)
        .filter(|&i| outcomes[i] == KvWriteOutcome::Written)
        .collect();
    assert_eq!(won.len(), 1, "{outcomes:?}");
    assert!(outcomes
        .iter()
        .all(|o| matches!(o, KvWriteOutcome::Written | KvWriteOutcome::Stale)));
    let winner = format!("r{}", won[0]);
    let certs = in_read!(s, |tx| tx.kv_versions("kv1", "certificates", "c").await).unwrap();
    assert_eq!(
        certs.iter().map(|v| v.version.as_str()).collect::<Vec<_>>(),
        ["v1", winner.as_str()]
    );
    assert_eq!(
        in_read!(s, |tx| tx.kv_versions("kv1", "secrets", "c").await)
            .unwrap()
            .iter()
            .map(|v| v.version.clone())
            .collect::<Vec<_>>(),
        vec![winner],
        "the losers' secrets are not kept either"
    );
    assert_eq!(
        in_read!(s, |tx| tx.kv_name("kv1", "certificates", "c").await)
            .unwrap()
            .unwrap()
            .extra,
        serde_json::json!({ "by": won[0] })
    );
}

async fn concurrent_first_writes_take_turns(s: Store) {
    ensure_vault(&s, "kv1").await;
    // plain writes of a new name: every one is kept, each its own seq
    let outcomes = racing(&s, 10, |i, mut tx| async move {
        let out = tx
            .kv_write(&one(ver("secrets", "New", &format!("n{i}"), b"v")))
            .await;
        (tx, out)
    })
    .await;
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, Ok(KvWriteOutcome::Written))),
        "{outcomes:?}"
    );
    let versions = in_read!(s, |tx| tx.kv_versions("kv1", "secrets", "new").await).unwrap();
    assert_eq!(versions.len(), 10);
    let latest = in_read!(s, |tx| tx.kv_version("kv1", "secrets", "new", None).await)
        .unwrap()
        .unwrap();
    assert_eq!(latest.version, versions[9].version, "the last one written");
    // first writes that expect no version yet: one of them
    let outcomes = racing(&s, 10, |i, mut tx| async move {
        let out = tx
            .kv_write(&KvWrite {
                versions: vec![ver("certificates", "first", &format!("f{i}"), b"")],
                extra: None,
                expect_latest: Some(("certificates".into(), None)),
            })
            .await;
        (tx, out)
    })
    .await;
    let outcomes: Vec<KvWriteOutcome> = outcomes.into_iter().map(Result::unwrap).collect();
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| **o == KvWriteOutcome::Written)
            .count(),
        1,
        "{outcomes:?}"
    );
    assert_eq!(
        in_read!(s, |tx| tx.kv_versions("kv1", "certificates", "first").await)
            .unwrap()
            .len(),
        1
    );
}

async fn concurrent_vault_creates_one_wins(s: Store) {
    for round in 0..3 {
        let name = format!("race{round}");
        let race = name.clone();
        let outcomes = racing(&s, 2, move |i, mut tx| {
            let v = vault(&race, &format!("rg{i}"));
            async move {
                let out = tx.put_vault(&v).await;
                (tx, out)
            }
        })
        .await;
        let created = outcomes.iter().filter(|o| matches!(o, Ok(true))).count();
        let taken = outcomes
            .iter()
            .filter(|o| matches!(o, Err(StoreError::Conflict(Conflict::NameTaken(_)))))
            .count();
        assert_eq!((created, taken), (1, 1), "{outcomes:?}");
        let stored = in_read!(s, |tx| tx.get_vault_by_name(&name).await)
            .unwrap()
            .unwrap();
        let winner = outcomes.iter().position(|o| matches!(o, Ok(true))).unwrap();
        assert_eq!(stored.resource_group, format!("rg{winner}"));
        assert_eq!(
            in_read!(s, |tx| tx.list_vaults("s", None).await)
                .unwrap()
                .len(),
            round + 1
        );
    }
}

/// Objects are written only into a vault that exists (and holds until the write ends, so a
/// vault delete on another replica cannot leave them behind for the next vault of the name).
async fn an_object_needs_its_vault(s: Store) {
    let w = one(ver("secrets", "orphan", "a1", b"x"));
    assert!(matches!(
        in_write!(s, |tx| tx.kv_write(&w).await),
        Err(StoreError::Conflict(Conflict::MissingReference(_)))
    ));
    ensure_vault(&s, "kv1").await;
    assert_eq!(
        in_write!(s, |tx| tx.kv_write(&w).await).unwrap(),
        KvWriteOutcome::Written
    );
    // the vault goes, and its objects with it; a new vault of that name starts empty
    let v = in_read!(s, |tx| tx.get_vault_by_name("kv1").await)
        .unwrap()
        .unwrap();
    assert!(in_write!(s, |tx| tx.delete_vault(&v.key).await).unwrap());
    ensure_vault(&s, "kv1").await;
    assert!(in_read!(s, |tx| tx.kv_names("kv1", "secrets", false).await)
        .unwrap()
        .is_empty());
}
