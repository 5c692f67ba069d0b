//! Store suite cases: tracked resources (kept as their JSON, keyed by lowercase id).

use super::vault::{in_read, in_write};
use crate::case;
use keyless_store::*;

pub const CASES: &[(&str, crate::CaseFn)] = &[
    case!(tracked_resources_are_put_listed_and_deleted_with_their_children),
    case!(tracked_resources_go_with_their_group),
];

fn tracked(id: &str, type_name: &str, rg: &str, n: u64) -> TrackedRecord {
    TrackedRecord {
        key: id.to_lowercase(),
        type_name: type_name.into(),
        subscription: "S".into(),
        resource_group: rg.into(),
        body: serde_json::json!({ "id": id, "n": n }),
    }
}

const BATCH: &str = "Microsoft.Batch/batchAccounts";
const EXT: &str = "Microsoft.Compute/virtualMachines/extensions";

fn batch(name: &str, rg: &str, n: u64) -> TrackedRecord {
    tracked(
        &format!(
            "/subscriptions/S/resourceGroups/{rg}/providers/Microsoft.Batch/batchAccounts/{name}"
        ),
        BATCH,
        rg,
        n,
    )
}

fn vm_id(name: &str) -> String {
    format!("/subscriptions/S/resourceGroups/RG/providers/Microsoft.Compute/virtualMachines/{name}")
}

fn ext(vm: &str, name: &str) -> TrackedRecord {
    tracked(&format!("{}/extensions/{name}", vm_id(vm)), EXT, "RG", 0)
}

async fn tracked_resources_are_put_listed_and_deleted_with_their_children(s: Store) {
    let a = batch("acct", "RG", 1);
    assert!(in_write!(s, |tx| tx.put_tracked(&a).await).unwrap());
    let mut a2 = a.clone();
    a2.body["n"] = 2.into();
    assert!(
        !in_write!(s, |tx| tx.put_tracked(&a2).await).unwrap(),
        "replaced"
    );
    let upper = a.key.to_uppercase();
    assert_eq!(
        in_read!(s, |tx| tx.get_tracked(&upper).await).unwrap(),
        Some(a2.clone())
    );
    for r in [
        batch("b", "other", 1),
        batch("c", "rg", 1),
        ext("vm1", "kv"),
        ext("vm1", "agent"),
        ext("vm10", "kv"),
    ] {
        in_write!(s, |tx| tx.put_tracked(&r).await).unwrap();
    }
    let names = |rs: Vec<TrackedRecord>| {
        rs.into_iter()
            .map(|r| r.key.rsplit('/').next().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(
            in_read!(s, |tx| tx
                .list_tracked("microsoft.batch/BATCHACCOUNTS", "s", None)
                .await)
            .unwrap()
        ),
        ["b", "acct", "c"]
    );
    assert_eq!(
        names(in_read!(s, |tx| tx.list_tracked(BATCH, "s", Some("Rg")).await).unwrap()),
        ["acct", "c"]
    );
    assert!(
        in_read!(s, |tx| tx.list_tracked(BATCH, "other-sub", None).await)
            .unwrap()
            .is_empty()
    );
    // below a parent: its children only (vm10 is not below vm1)
    let vm1 = vm_id("vm1");
    assert_eq!(
        names(in_read!(s, |tx| tx.list_tracked_under(&vm1, EXT).await).unwrap()),
        ["agent", "kv"]
    );
    assert!(in_read!(s, |tx| tx.list_tracked_under(&vm1, BATCH).await)
        .unwrap()
        .is_empty());
    // deleting a parent that is not itself tracked takes its children
    assert!(in_write!(s, |tx| tx.delete_tracked(&vm1.to_uppercase()).await).unwrap());
    assert!(in_read!(s, |tx| tx.list_tracked_under(&vm1, EXT).await)
        .unwrap()
        .is_empty());
    assert_eq!(
        in_read!(s, |tx| tx.list_tracked_under(&vm_id("vm10"), EXT).await)
            .unwrap()
            .len(),
        1
    );
    assert!(in_write!(s, |tx| tx.delete_tracked(&a.key).await).unwrap());
    assert!(!in_write!(s, |tx| tx.delete_tracked(&a.key).await).unwrap());
    assert!(in_read!(s, |tx| tx.get_tracked(&a.key).await)
        .unwrap()
        .is_none());
}

async fn tracked_resources_go_with_their_group(s: Store) {
    for name in ["RG", "other"] {
        in_write!(s, |tx| tx
            .put_resource_group(&ResourceGroupRecord {
                subscription: "S".into(),
                name: name.into(),
                location: "local".into(),
                tags: Default::default(),
            })
            .await)
        .unwrap();
    }
    let (gone, kept) = (batch("a", "rg", 1), batch("b", "other", 1));
    for r in [&gone, &kept, &ext("vm1", "kv")] {
        in_write!(s, |tx| tx.put_tracked(r).await).unwrap();
    }
    assert!(in_write!(s, |tx| tx.delete_resource_group("s", "rg").await).unwrap());
    assert!(in_read!(s, |tx| tx.get_tracked(&gone.key).await)
        .unwrap()
        .is_none());
    assert!(
        in_read!(s, |tx| tx.list_tracked_under(&vm_id("vm1"), EXT).await)
            .unwrap()
            .is_empty()
    );
    assert!(in_read!(s, |tx| tx.get_tracked(&kept.key).await)
        .unwrap()
        .is_some());
}
