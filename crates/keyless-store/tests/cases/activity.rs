//! Store suite cases: the Activity Log.

use super::vault::{in_read, in_write, racing};
use crate::case;
use keyless_core::activity_log::EventFilter;
use keyless_store::*;

pub const CASES: &[(&str, crate::CaseFn)] = &[
    case!(lists_newest_first_filters_pages_and_purges),
    case!(concurrent_appends_each_get_their_own_seq),
    case!(a_late_commit_is_never_listed_below_rows_already_shown),
    case!(an_older_running_transaction_holds_events_back_for_a_bounded_time),
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
    // newest first: by `seq` on SQLite; on PostgreSQL by writing transaction first (the
    // transactions raced: one may have taken its `seq` before an older one)
    if s.backend() == Backend::Sqlite {
        assert!(listed.windows(2).all(|w| w[0] > w[1]), "newest first");
    }
    listed.sort();
    assert_eq!(listed, seqs);
}

/// A page of the subscription's events as a client asks for it: newest first, continuing
/// after `after` (the `seq` of the previous page's last event, the server's `$skipToken`).
async fn page(s: &Store, after: Option<u64>, limit: usize) -> Vec<ActivityRecord> {
    let q = ActivityQuery {
        subscription: "sub".into(),
        filter: EventFilter {
            from: 0,
            to: 1_000,
            ..Default::default()
        },
        after,
        limit,
    };
    in_read!(s, |tx| tx.list_activity(&q).await).unwrap()
}

fn seqs(events: &[ActivityRecord]) -> Vec<u64> {
    events.iter().map(|e| e.seq).collect()
}

/// A client paging on from the pages it has read (`pass`) until a short page.
async fn page_on(s: &Store, mut pass: Vec<ActivityRecord>, limit: usize) -> Vec<ActivityRecord> {
    let mut last = pass.len();
    while last == limit {
        let next = page(s, pass.last().map(|e| e.seq), limit).await;
        last = next.len();
        pass.extend(next);
    }
    pass
}

/// A client following the log: each poll reads from the top down to the first event it was
/// already shown, and keeps the new ones.
async fn poll(s: &Store, seen: &mut Vec<u64>) {
    for e in page(s, None, 100).await {
        if seen.contains(&e.seq) {
            break;
        }
        seen.push(e.seq);
    }
}

async fn append(s: &Store, ts: i64) -> u64 {
    let e = event(ts, "rg", "w", &format!("c{ts}"));
    in_write!(s, |tx| tx.append_activity(&e, 0).await).unwrap()
}

/// Two writers: A takes its `seq` first, B the next one and commits; a client reads a page
/// (and B's event may be on it), then A commits. Whatever the client was shown, A's event must
/// never turn up below it: neither on the next page (the page boundary already passed it) nor
/// for a client that polls the top of the list down to what it has seen. Writers run in
/// parallel on PostgreSQL only; on SQLite write units take turns, so events become visible in
/// `seq` order and the case checks the same client views over sequential writes.
async fn a_late_commit_is_never_listed_below_rows_already_shown(s: Store) {
    let p0 = append(&s, 1).await;
    let p1 = append(&s, 2).await;
    let mut seen = vec![];
    poll(&s, &mut seen).await;
    assert_eq!(seen, [p1, p0]);
    let (first, ab) = if s.backend() == Backend::Postgres {
        let mut a = s.write("test").await.unwrap();
        let sa = a
            .append_activity(&event(3, "rg", "w", "c3"), 0)
            .await
            .unwrap();
        let mut b = s.write("test").await.unwrap();
        let sb = b
            .append_activity(&event(4, "rg", "w", "c4"), 0)
            .await
            .unwrap();
        assert!(sa < sb, "{sa} {sb}");
        b.commit().await.unwrap();
        let first = page(&s, None, 2).await;
        poll(&s, &mut seen).await;
        a.commit().await.unwrap();
        (first, [sa, sb])
    } else {
        let sa = append(&s, 3).await;
        let sb = append(&s, 4).await;
        (page(&s, None, 2).await, [sa, sb])
    };
    let pass = page_on(&s, first, 2).await;
    let all = page(&s, None, 100).await;
    assert_eq!(all.len(), 4, "{:?}", seqs(&all));
    // the pass is the whole list from its first event down: nothing came in below it
    let from = all.iter().position(|e| e.seq == pass[0].seq).unwrap();
    assert_eq!(
        seqs(&all[from..]),
        seqs(&pass),
        "an event committed late is listed below events a pass already showed"
    );
    // and a client following the top sees every event, once
    poll(&s, &mut seen).await;
    let mut got = seen.clone();
    got.sort();
    assert_eq!(got, {
        let mut w = vec![p0, p1, ab[0], ab[1]];
        w.sort();
        w
    });

    // many writers committing in reverse order of their seq: a follower misses none
    if s.backend() == Backend::Postgres {
        let mut open = Vec::new();
        let mut want = seen.clone();
        for i in 0..5 {
            let mut tx = s.write("test").await.unwrap();
            want.push(
                tx.append_activity(&event(10 + i, "rg", "w", &format!("r{i}")), 0)
                    .await
                    .unwrap(),
            );
            open.push(tx);
        }
        while let Some(tx) = open.pop() {
            tx.commit().await.unwrap();
            poll(&s, &mut seen).await;
        }
        poll(&s, &mut seen).await;
        seen.sort();
        want.sort();
        assert_eq!(seen, want, "each event once");
        // a writer appending before and after another's append: the list is not in `seq`
        // order, and pages of two go the way of the whole list
        let mut a = s.write("test").await.unwrap();
        let a1 = a
            .append_activity(&event(20, "rg", "w", "a1"), 0)
            .await
            .unwrap();
        let mut b = s.write("test").await.unwrap();
        let b1 = b
            .append_activity(&event(21, "rg", "w", "b1"), 0)
            .await
            .unwrap();
        let a2 = a
            .append_activity(&event(22, "rg", "w", "a2"), 0)
            .await
            .unwrap();
        b.commit().await.unwrap();
        a.commit().await.unwrap();
        let all = page(&s, None, 100).await;
        assert_eq!(seqs(&all[..3]), [b1, a2, a1]);
        let pass = page_on(&s, page(&s, None, 2).await, 2).await;
        assert_eq!(seqs(&pass), seqs(&all));
    }

    // a page going on after an event purged since (its time is out of the retention): by
    // `seq`, with what is left
    let x = append(&s, 100).await;
    let _y = append(&s, 50).await;
    let z = append(&s, 200).await;
    let first = page(&s, None, 2).await;
    assert_eq!(times(&first), [200, 50]);
    let e = event(300, "rg", "w", "c300");
    let w = in_write!(s, |tx| tx.append_activity(&e, 60).await).unwrap();
    let next = page(&s, first.last().map(|e| e.seq), 10).await;
    assert_eq!(seqs(&next), [x]);
    assert_eq!(seqs(&page(&s, None, 10).await), [w, z, x]);
}

async fn an_older_running_transaction_holds_events_back_for_a_bounded_time(s: Store) {
    if s.backend() != Backend::Postgres {
        return;
    }
    // a transaction that wrote and stays open (anyone's, on the server)
    let mut stuck = s.write("test").await.unwrap();
    stuck
        .append_activity(&event(900, "rg", "w", "c900"), 0)
        .await
        .unwrap();
    let later = append(&s, 901).await;
    // committed after it: held back while it runs ...
    assert!(!seqs(&page(&s, None, 100).await).contains(&later));
    // ... but not for longer than the bound
    tokio::time::sleep(std::time::Duration::from_micros(
        ACTIVITY_HOLD_BACK_US as u64 + 500_000,
    ))
    .await;
    assert!(seqs(&page(&s, None, 100).await).contains(&later));
    drop(stuck);
}
