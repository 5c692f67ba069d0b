//! Store suite cases: the change feed (what servers sharing the database learn about each
//! other's writes to cached data), and the one-statement read of a live version the cached
//! Key Vault data plane makes instead of a name lookup and a version lookup.

use super::vault::{ensure_vault, in_read, in_write, vault, ver};
use crate::case;
use keyless_store::*;
use std::sync::{Arc, Mutex};

pub const CASES: &[(&str, crate::CaseFn)] = &[
    case!(vault_writes_are_in_the_feed_once),
    case!(commit_hooks_see_committed_changes_only),
    case!(a_change_committed_out_of_seq_order_is_not_missed),
    case!(purge_keeps_readers_in_step_or_resets_them),
    case!(live_version_reads_live_names_only),
    case!(host_table_writes_are_in_the_feed),
];

/// The vault changes of a batch (the cases here are about them; host-table writes — a group
/// create or delete — add `hosts` changes, see [`host_table_writes_are_in_the_feed`]).
fn kinds(b: &ChangeBatch) -> Vec<(String, String)> {
    b.changes
        .iter()
        .filter(|c| c.kind == change_kind::VAULT)
        .map(|c| (c.kind.clone(), c.key.clone()))
        .collect()
}

fn vault_change(name: &str) -> (String, String) {
    (change_kind::VAULT.to_string(), name.to_string())
}

async fn group(s: &Store, name: &str) {
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

async fn vault_writes_are_in_the_feed_once(s: Store) {
    let mut cur = ChangeCursor::default();
    // the first read places the cursor at the end: what came before is unknown to it
    in_write!(s, |tx| tx.put_vault(&vault("Before", "rg")).await).unwrap();
    let b = s.changes_since(&mut cur).await.unwrap();
    assert!(b.reset && b.changes.is_empty(), "{b:?}");
    assert_eq!(
        s.changes_since(&mut cur).await.unwrap(),
        ChangeBatch::default()
    );

    // create, update: the lowercase name
    let mut v = vault("App-KV", "rg");
    assert!(in_write!(s, |tx| tx.put_vault(&v).await).unwrap());
    v.properties = serde_json::json!({"accessPolicies": []});
    assert!(!in_write!(s, |tx| tx.put_vault(&v).await).unwrap());
    let b = s.changes_since(&mut cur).await.unwrap();
    assert!(!b.reset);
    assert_eq!(
        kinds(&b),
        vec![vault_change("app-kv"), vault_change("app-kv")]
    );
    assert!(b.changes[0].seq < b.changes[1].seq);
    assert!(b.changes[0].ts > 1_600_000_000_000, "milliseconds: {b:?}");
    // delivered once
    assert_eq!(
        s.changes_since(&mut cur).await.unwrap(),
        ChangeBatch::default()
    );

    // a write rolled back leaves no change; a refused one neither
    {
        let mut tx = s.write("test").await.unwrap();
        tx.put_vault(&vault("Gone", "rg")).await.unwrap();
        drop(tx);
    }
    let mut taken = vault("app-kv", "other");
    taken.key = "/subscriptions/s/resourcegroups/other/x".into();
    assert!(in_write!(s, |tx| tx.put_vault(&taken).await).is_err());
    assert_eq!(
        s.changes_since(&mut cur).await.unwrap(),
        ChangeBatch::default()
    );

    // delete; a group's delete names each vault it takes
    assert!(in_write!(s, |tx| tx.delete_vault(&v.key).await).unwrap());
    assert!(!in_write!(s, |tx| tx.delete_vault(&v.key).await).unwrap());
    group(&s, "rg2").await;
    for name in ["kv-a", "kv-b"] {
        in_write!(s, |tx| tx.put_vault(&vault(name, "rg2")).await).unwrap();
    }
    assert!(in_write!(s, |tx| tx.delete_resource_group("s", "rg2").await).unwrap());
    let b = s.changes_since(&mut cur).await.unwrap();
    let mut got = kinds(&b);
    assert_eq!(got[0], vault_change("app-kv"));
    got[3..].sort();
    assert_eq!(
        got,
        vec![
            vault_change("app-kv"),
            vault_change("kv-a"),
            vault_change("kv-b"),
            vault_change("kv-a"),
            vault_change("kv-b"),
        ]
    );
    // a second cursor reads the same feed on its own
    let mut other = ChangeCursor::default();
    assert!(s.changes_since(&mut other).await.unwrap().reset);
    in_write!(s, |tx| tx.put_vault(&vault("kv-c", "rg")).await).unwrap();
    assert_eq!(
        kinds(&s.changes_since(&mut other).await.unwrap()),
        vec![vault_change("kv-c")]
    );
    assert_eq!(
        kinds(&s.changes_since(&mut cur).await.unwrap()),
        vec![vault_change("kv-c")]
    );
}

async fn commit_hooks_see_committed_changes_only(s: Store) {
    let seen: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let log = seen.clone();
    s.on_commit(move |kind, key| log.lock().unwrap().push((kind.into(), key.into())));
    let take = || std::mem::take(&mut *seen.lock().unwrap());

    let mut tx = s.write("test").await.unwrap();
    tx.put_vault(&vault("Hooked", "rg")).await.unwrap();
    assert!(take().is_empty(), "not before the commit");
    tx.commit().await.unwrap();
    // before commit() returned
    assert_eq!(take(), vec![vault_change("hooked")]);

    let mut tx = s.write("test").await.unwrap();
    tx.put_vault(&vault("Dropped", "rg")).await.unwrap();
    drop(tx);
    assert!(take().is_empty(), "a rollback is no change");

    // a write that changes nothing cached, and a read, call no hook
    let mut tx = s.write("test").await.unwrap();
    tx.set_meta("k", "v").await.unwrap();
    tx.commit().await.unwrap();
    let tx = s.read("test").await.unwrap();
    tx.commit().await.unwrap();
    assert!(take().is_empty());

    // a clone of the handle shares the hooks (every task of a server holds one)
    let c = s.clone();
    in_write!(c, |tx| tx.delete_vault(&vault("Hooked", "rg").key).await).unwrap();
    assert_eq!(take(), vec![vault_change("hooked")]);
}

/// Two writers: A takes its `seq` first, B takes the next one and commits, a reader reads (B
/// only), then A commits: the next read must find A although its `seq` is below what the reader
/// has already seen. Writers run in parallel on PostgreSQL only; on SQLite write units take
/// turns, so rows become visible in `seq` order and the case checks that sequence.
async fn a_change_committed_out_of_seq_order_is_not_missed(s: Store) {
    let mut cur = ChangeCursor::default();
    assert!(s.changes_since(&mut cur).await.unwrap().reset);
    if s.backend() == Backend::Postgres {
        let mut a = s.write("test").await.unwrap();
        a.put_vault(&vault("Slow", "rg")).await.unwrap();
        let mut b = s.write("test").await.unwrap();
        b.put_vault(&vault("Fast", "rg")).await.unwrap();
        b.commit().await.unwrap();
        let first = s.changes_since(&mut cur).await.unwrap();
        assert_eq!(kinds(&first), vec![vault_change("fast")]);
        a.commit().await.unwrap();
        let late = s.changes_since(&mut cur).await.unwrap();
        assert_eq!(kinds(&late), vec![vault_change("slow")], "the late commit");
        assert!(
            late.changes[0].seq < first.changes[0].seq,
            "{first:?} {late:?}"
        );
        // each once, also while later writes go on
        in_write!(s, |tx| tx.put_vault(&vault("Next", "rg")).await).unwrap();
        assert_eq!(
            kinds(&s.changes_since(&mut cur).await.unwrap()),
            vec![vault_change("next")]
        );
        assert_eq!(
            s.changes_since(&mut cur).await.unwrap(),
            ChangeBatch::default()
        );

        // a writer open across a cursor's first read: its change still comes
        let mut slow = s.write("test").await.unwrap();
        slow.put_vault(&vault("Open", "rg")).await.unwrap();
        let mut fresh = ChangeCursor::default();
        assert!(s.changes_since(&mut fresh).await.unwrap().reset);
        slow.commit().await.unwrap();
        assert_eq!(
            kinds(&s.changes_since(&mut fresh).await.unwrap()),
            vec![vault_change("open")]
        );
        assert_eq!(
            kinds(&s.changes_since(&mut cur).await.unwrap()),
            vec![vault_change("open")]
        );
        // many writers committing in reverse order of their seq: none missed, none twice
        let mut open = Vec::new();
        for i in 0..5 {
            let mut tx = s.write("test").await.unwrap();
            tx.put_vault(&vault(&format!("r{i}"), "rg")).await.unwrap();
            open.push(tx);
        }
        let mut got = Vec::new();
        while let Some(tx) = open.pop() {
            tx.commit().await.unwrap();
            got.extend(kinds(&s.changes_since(&mut cur).await.unwrap()));
        }
        got.extend(kinds(&s.changes_since(&mut cur).await.unwrap()));
        let want: Vec<_> = (0..5)
            .rev()
            .map(|i| vault_change(&format!("r{i}")))
            .collect();
        assert_eq!(got, want);
    } else {
        for name in ["One", "Two"] {
            in_write!(s, |tx| tx.put_vault(&vault(name, "rg")).await).unwrap();
        }
        let b = s.changes_since(&mut cur).await.unwrap();
        assert_eq!(kinds(&b), vec![vault_change("one"), vault_change("two")]);
        assert_eq!(
            s.changes_since(&mut cur).await.unwrap(),
            ChangeBatch::default()
        );
    }
}

async fn purge_keeps_readers_in_step_or_resets_them(s: Store) {
    let mut behind = ChangeCursor::default();
    let mut current = ChangeCursor::default();
    assert!(s.changes_since(&mut behind).await.unwrap().reset);
    for name in ["p1", "p2", "p3"] {
        in_write!(s, |tx| tx.put_vault(&vault(name, "rg")).await).unwrap();
    }
    assert!(s.changes_since(&mut current).await.unwrap().reset);
    // rows written before a cut-off go
    let far = 4_000_000_000_000;
    assert_eq!(s.purge_changes(1).await.unwrap(), 0);
    assert_eq!(s.purge_changes(far).await.unwrap(), 3);
    assert_eq!(s.purge_changes(far).await.unwrap(), 0);
    // a reader that never read p1 and p2 is told to start over, then goes on from the end
    let b = s.changes_since(&mut behind).await.unwrap();
    assert!(b.reset && b.changes.is_empty(), "{b:?}");
    // a reader in step is not
    in_write!(s, |tx| tx.put_vault(&vault("p4", "rg")).await).unwrap();
    for cur in [&mut behind, &mut current] {
        let b = s.changes_since(cur).await.unwrap();
        assert!(!b.reset);
        assert_eq!(kinds(&b), vec![vault_change("p4")]);
    }
}

async fn live_version_reads_live_names_only(s: Store) {
    ensure_vault(&s, "kv1").await;
    let write = |v: KvVersionRecord| {
        let s = s.clone();
        async move {
            in_write!(s, |tx| tx
                .kv_write(&KvWrite {
                    versions: vec![v],
                    extra: None,
                    expect_latest: None,
                })
                .await)
            .unwrap()
        }
    };
    write(ver("secrets", "Db-Pass", "a1", b"one")).await;
    write(ver("secrets", "db-pass", "b2", b"two")).await;
    write(ver("keys", "db-pass", "k1", b"key")).await;
    let live = |version: Option<&'static str>| {
        let s = s.clone();
        async move {
            in_read!(s, |tx| tx
                .kv_live_version("kv1", "secrets", "DB-PASS", version)
                .await)
            .unwrap()
            .map(|v| (v.version, v.private))
        }
    };
    assert_eq!(live(None).await, Some(("b2".into(), Some(b"two".to_vec()))));
    assert_eq!(
        live(Some("a1")).await,
        Some(("a1".into(), Some(b"one".to_vec())))
    );
    assert_eq!(live(Some("zz")).await, None);
    assert!(in_read!(s, |tx| tx
        .kv_live_version("kv1", "secrets", "other", None)
        .await)
    .unwrap()
    .is_none());
    assert!(in_read!(s, |tx| tx
        .kv_live_version("kv2", "secrets", "db-pass", None)
        .await)
    .unwrap()
    .is_none());
    // soft-deleted: none of its versions is live; recovered: all are again
    assert!(in_write!(s, |tx| tx
        .kv_delete("kv1", &["secrets"], "db-pass", 10, Some(20))
        .await)
    .unwrap());
    assert_eq!(live(None).await, None);
    assert_eq!(live(Some("a1")).await, None);
    let key = in_read!(s, |tx| tx
        .kv_live_version("kv1", "keys", "db-pass", None)
        .await)
    .unwrap();
    assert_eq!(
        key.map(|v| v.version),
        Some("k1".into()),
        "another collection"
    );
    assert!(in_write!(s, |tx| tx.kv_recover("kv1", &["secrets"], "db-pass").await).unwrap());
    assert_eq!(live(None).await.map(|v| v.0), Some("b2".into()));
}

/// Every unit of work that writes a row a host's token answer is read from (credentials, VMs,
/// instances, identities and their assignment to hosts, the groups and clusters whose deletes
/// cascade to them) leaves one `hosts` change — whichever repository method wrote it; one that
/// writes none of them, or writes nothing, leaves none.
async fn host_table_writes_are_in_the_feed(s: Store) {
    let hosts = |b: &ChangeBatch| {
        b.changes
            .iter()
            .filter(|c| c.kind == change_kind::HOSTS)
            .map(|c| c.key.clone())
            .collect::<Vec<_>>()
    };
    let mut cur = ChangeCursor::default();
    s.changes_since(&mut cur).await.unwrap();
    group(&s, "hosts-rg").await;
    let u = super::identities::ident("u", "hosts-rg");
    let v = super::hosts::vm("h");
    in_write!(s, |tx| tx.put_identity(&u).await).unwrap();
    in_write!(s, |tx| tx
        .put_vm(&v, None, std::slice::from_ref(&u.key))
        .await)
    .unwrap();
    let b = s.changes_since(&mut cur).await.unwrap();
    assert_eq!(hosts(&b), vec!["*", "*", "*"], "{b:?}");
    // a unit of work writing several host rows: one change
    let mut tx = s.write("test").await.unwrap();
    tx.put_vm(&v, None, &[]).await.unwrap();
    tx.put_vm(&v, None, std::slice::from_ref(&u.key))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(hosts(&s.changes_since(&mut cur).await.unwrap()), vec!["*"]);
    // a write of nothing, a vault write, a read: none
    assert!(!in_write!(s, |tx| tx.delete_vm("no-such-vm").await).unwrap());
    in_write!(s, |tx| tx.put_vault(&vault("not-a-host", "hosts-rg")).await).unwrap();
    in_read!(s, |tx| tx.get_vm(&v.key).await).unwrap();
    assert!(hosts(&s.changes_since(&mut cur).await.unwrap()).is_empty());
    // a delete (which cascades) and the hooks of this process
    let seen = Arc::new(Mutex::new(vec![]));
    let sink = seen.clone();
    s.on_commit(move |kind, key| {
        if kind == change_kind::HOSTS {
            sink.lock().unwrap().push(key.to_string());
        }
    });
    assert!(in_write!(s, |tx| tx.delete_identity(&u.key).await).unwrap());
    assert_eq!(hosts(&s.changes_since(&mut cur).await.unwrap()), vec!["*"]);
    assert_eq!(*seen.lock().unwrap(), vec!["*"]);
}
