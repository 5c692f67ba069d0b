//! Store suite cases: the Activity Log.

use super::vault::{in_read, in_write, racing};
use crate::case;
use keyless_core::activity_log::EventFilter;
use keyless_store::*;

pub const CASES: &[(&str, crate::CaseFn)] = &[
    case!(lists_newest_first_filters_pages_and_purges),
    case!(concurrent_appends_each_get_their_own_seq),
];

fn event(ts: i64, rg: &str, op: &str, corr: &str) -> ActivityRecord {
    ActivityRecord {
        seq: 0,
        event_id: format!("e-{ts}"),
        timestamp: ts,
        subscription: "Sub".into(),
        resource_group: Some(rg.into()),
        resource_id: format!("/subscriptions/Sub/resourceGroups/{rg}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id{ts}"),
        resource_provider: "Microsoft.ManagedIdentity".into(),
        resource_type: "Microsoft.ManagedIdentity/userAssignedIdentities".into(),
        operation: op.into(),
        status: "Succeeded".into(),
        http_status: 201,
        correlation_id: corr.into(),
        caller: "oid-1".into(),
        caller_app_id: "app-1".into(),
        method: "PUT".into(),
        client_request_id: None,
        client_ip: None,
    }
}

fn times(events: &[ActivityRecord]) -> Vec<i64> {
    events.iter().map(|e| e.timestamp).collect()
}

async fn lists_newest_first_filters_pages_and_purges(s: Store) {
    let mut seqs = vec![];
    for t in 1..=5 {
        let rg = if t % 2 == 0 { "even" } else { "Odd" };
        let e = event(t * 10, rg, "w", &format!("c{t}"));
        seqs.push(in_write!(s, |tx| tx.append_activity(&e, 0).await).unwrap());
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let q = ActivityQuery {
        subscription: "sub".into(),
        filter: EventFilter {
            from: 0,
            to: 100,
            ..Default::default()
        },
        limit: 2,
        ..Default::default()
    };
    let list = |q: ActivityQuery| {
        let s = s.clone();
        async move { in_read!(s, |tx| tx.list_activity(&q).await).unwrap() }
    };
    let page = list(q.clone()).await;
    assert_eq!(times(&page), [50, 40]);
    assert_eq!(page[0].seq, seqs[4]);
    let next = list(ActivityQuery {
        after: Some(page[1].seq),
        ..q.clone()
    })
    .await;
    assert_eq!(times(&next), [30, 20]);
    let odd = list(ActivityQuery {
        filter: EventFilter {
            resource_group: Some("odd".into()),
            ..q.filter.clone()
        },
        limit: 10,
        ..q.clone()
    })
    .await;
    assert_eq!(times(&odd), [50, 30, 10]);
    let window = list(ActivityQuery {
        filter: EventFilter {
            from: 20,
            to: 30,
            ..q.filter.clone()
        },
        limit: 10,
        ..q.clone()
    })
    .await;
    assert_eq!(times(&window), [30, 20], "both ends inclusive");
    let by_corr = list(ActivityQuery {
        filter: EventFilter {
            correlation_id: Some("C3".into()),
            caller: Some("OID-1".into()),
            ..q.filter.clone()
        },
        limit: 10,
        ..q.clone()
    })
    .await;
    assert_eq!(by_corr.len(), 1);
    assert_eq!(by_corr[0], {
        let mut e = event(30, "Odd", "w", "c3");
        e.seq = by_corr[0].seq;
        e
    });
    let by_rest = list(ActivityQuery {
        filter: EventFilter {
            resource_id: Some(
                "/SUBSCRIPTIONS/sub/resourcegroups/even/providers/microsoft.managedidentity/userassignedidentities/ID40"
                    .into(),
            ),
            resource_provider: Some("microsoft.managedIdentity".into()),
            status: Some("succeeded".into()),
            ..q.filter.clone()
        },
        limit: 10,
        ..q.clone()
    })
    .await;
    assert_eq!(times(&by_rest), [40]);
    let failed = list(ActivityQuery {
        filter: EventFilter {
            status: Some("Failed".into()),
            ..q.filter.clone()
        },
        limit: 10,
        ..q.clone()
    })
    .await;
    assert!(failed.is_empty());
    let other_sub = list(ActivityQuery {
        subscription: "other".into(),
        limit: 10,
        ..q.clone()
    })
    .await;
    assert!(other_sub.is_empty());
    // an event outside any group
    let mut sub_level = event(55, "x", "w", "c55");
    sub_level.resource_group = None;
    in_write!(s, |tx| tx.append_activity(&sub_level, 0).await).unwrap();
    assert_eq!(
        list(ActivityQuery {
            limit: 10,
            ..q.clone()
        })
        .await[0]
            .resource_group,
        None
    );
    // appending purges what is older than the retention bound
    let e = event(60, "even", "w", "c6");
    in_write!(s, |tx| tx.append_activity(&e, 35).await).unwrap();
    let all = list(ActivityQuery { limit: 10, ..q }).await;
    assert_eq!(times(&all), [60, 55, 50, 40]);
}

async fn concurrent_appends_each_get_their_own_seq(s: Store) {
    let outcomes = racing(&s, 10, |i, mut tx| async move {
        let out = tx
            .append_activity(&event(100 + i as i64, "rg", "w", &format!("c{i}")), 0)
            .await;
        (tx, out)
    })
    .await;
    let mut seqs: Vec<u64> = outcomes.into_iter().map(Result::unwrap).collect();
    seqs.sort();
    seqs.dedup();
    assert_eq!(seqs.len(), 10);
    let all = in_read!(s, |tx| tx
        .list_activity(&ActivityQuery {
            subscription: "SUB".into(),
            filter: EventFilter {
                from: 0,
                to: 1_000,
                ..Default::default()
            },
            limit: 100,
            ..Default::default()
        })
        .await)
    .unwrap();
    let mut listed: Vec<u64> = all.iter().map(|e| e.seq).collect();
    assert!(listed.windows(2).all(|w| w[0] > w[1]), "newest first");
    listed.sort();
    assert_eq!(listed, seqs);
}
