//! The Activity Log list (`Microsoft.Insights/eventtypes/management/values`) against a real
//! `keyless up`: paging with `nextLink` over more than one page, newest first, every write
//! once; the `Microsoft.Insights/eventtypes/values/read` check; reads leave no event.
//! (`az monitor activity-log list` itself is in conformance/python/test_az_cli.py.)

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::HashSet;

const RG_API: &str = "api-version=2024-11-01";

fn events_url(up: &Up, filter: &str) -> String {
    let q =
        serde_urlencoded::to_string([("api-version", "2015-04-01"), ("$filter", filter)]).unwrap();
    format!(
        "{}/subscriptions/{}/providers/Microsoft.Insights/eventtypes/management/values?{q}",
        up.s("/serverUrl"),
        up.s("/subscriptionId")
    )
}

async fn get(c: &reqwest::Client, token: &str, url: &str) -> (u16, Value) {
    let r = c.get(url).bearer_auth(token).send().await.expect("request");
    let st = r.status().as_u16();
    (st, r.json().await.unwrap_or(Value::Null))
}

/// `eventTimestamp ge` one hour ago, in the bare form az sends.
fn since_an_hour_ago() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    let t = keyless_core::activity_log::format_time(now - 3_600_000_000);
    format!("eventTimestamp ge {}", t.trim_end_matches('Z'))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_every_write_once_newest_first_and_checks_read() {
    let dir = tempfile::tempdir().unwrap();
    let up = Up::start(dir.path(), &[]).unwrap();
    let c = https(&up.s("/caFile"));
    let (st, v) = sp_token(
        &c,
        &up.s("/serverUrl"),
        &up.s("/tenantId"),
        &up.s("/adminClientId"),
        &up.secret().expect("bootstrap admin secret"),
        "https://management.azure.com/.default",
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let token = v["access_token"].as_str().unwrap().to_string();
    let rg_url = format!(
        "{}/subscriptions/{}/resourceGroups/act-pages?{RG_API}",
        up.s("/serverUrl"),
        up.s("/subscriptionId")
    );
    let writes = 1 + keyless_core::activity_log::PAGE_SIZE + 4;
    for i in 0..writes {
        let body = json!({"location": "westeurope", "tags": {"n": i.to_string()}});
        let r = c
            .put(&rg_url)
            .bearer_auth(&token)
            .header(
                "x-ms-correlation-request-id",
                format!("00000000-0000-0000-0000-{i:012}"),
            )
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.status());
        // reads are not events
        let r = c.get(&rg_url).bearer_auth(&token).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }

    let filter = format!(
        "{} and resourceGroupName eq 'act-pages'",
        since_an_hour_ago()
    );
    let mut url = events_url(&up, &filter);
    let mut seen = vec![];
    let mut pages = 0;
    loop {
        let (st, page) = get(&c, &token, &url).await;
        assert_eq!(st, 200, "{page}");
        pages += 1;
        let items = page["value"].as_array().unwrap();
        assert!(items.len() <= keyless_core::activity_log::PAGE_SIZE);
        seen.extend(items.iter().cloned());
        match page["nextLink"].as_str() {
            Some(next) => url = next.to_string(),
            None => break,
        }
    }
    assert_eq!(pages, 2);
    assert_eq!(seen.len(), writes);
    // newest first: the correlation ids count down; each write exactly once
    let corr: Vec<String> = seen
        .iter()
        .map(|e| e["correlationId"].as_str().unwrap().to_string())
        .collect();
    let want: Vec<String> = (0..writes)
        .rev()
        .map(|i| format!("00000000-0000-0000-0000-{i:012}"))
        .collect();
    assert_eq!(corr, want);
    let ids: HashSet<&str> = seen
        .iter()
        .map(|e| e["eventDataId"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), writes);
    assert_eq!(seen.last().unwrap()["subStatus"]["value"], "Created");
    assert_eq!(seen[0]["subStatus"]["value"], "OK");
    assert!(seen
        .iter()
        .all(|e| e["operationName"]["value"]
            == "Microsoft.Resources/subscriptions/resourceGroups/write"));

    // a principal without a role (the demo managed identity) may not read the events
    let (st, mi) = imds_token(
        &up.s("/imdsUrl"),
        &format!(
            "resource=https://management.azure.com/&client_id={}",
            up.s("/demoIdentity/clientId")
        ),
    )
    .await;
    assert_eq!(st, 200, "{mi}");
    let (st, v) = get(
        &c,
        mi["access_token"].as_str().unwrap(),
        &events_url(&up, &filter),
    )
    .await;
    assert_eq!(st, 403, "{v}");
    assert_eq!(v["error"]["code"], "AuthorizationFailed", "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Microsoft.Insights/eventtypes/values/read"));

    // a malformed continuation is refused in the service's flat shape
    let (st, v) = get(
        &c,
        &token,
        &format!("{}&$skipToken=x", events_url(&up, &filter)),
    )
    .await;
    assert_eq!((st, v["code"].as_str()), (400, Some("BadRequest")), "{v}");
}
