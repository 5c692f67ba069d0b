//! Versions of ARM resources against real processes: every single resource answers an `ETag`;
//! `If-Match` / `If-None-Match` on PUT, PATCH and DELETE hold as the ARM resource provider
//! contract says (412 `PreconditionFailed` when they do not, and then nothing is written); and
//! of writers racing with the same `If-Match` on two `keyless server` replicas sharing one
//! PostgreSQL database, exactly one wins.

mod common;

use common::*;
use reqwest::Method;
use serde_json::{json, Value};

const MSI: &str = "2023-01-31";
const RG_API: &str = "2024-11-01";
const COMPUTE: &str = "2024-11-01";
const VAULT_API: &str = "2023-07-01";

/// An ARM client with the admin's token.
#[derive(Clone)]
struct Arm {
    c: reqwest::Client,
    server: String,
    token: String,
}

/// An answer: status, `ETag` header, body.
struct Answer {
    status: u16,
    etag: Option<String>,
    body: Value,
}

impl Answer {
    fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
    fn etag(&self) -> String {
        self.etag
            .clone()
            .unwrap_or_else(|| panic!("no ETag ({}): {}", self.status, self.body))
    }
}

impl Arm {
    async fn call(
        &self,
        m: Method,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Answer {
        let mut r = self
            .c
            .request(m, format!("{}{path}", self.server))
            .bearer_auth(&self.token);
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.expect("request");
        let status = resp.status().as_u16();
        let etag = resp
            .headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        Answer {
            status,
            etag,
            body: resp.json().await.unwrap_or(Value::Null),
        }
    }
}

async fn admin_of_up(up: &Up) -> (Arm, String) {
    let c = https(&up.s("/caFile"));
    let (st, tok) = sp_token(
        &c,
        &up.s("/serverUrl"),
        &up.s("/tenantId"),
        &up.s("/adminClientId"),
        &up.secret().expect("admin secret"),
        "https://management.azure.com/.default",
    )
    .await;
    assert_eq!(st, 200, "{tok}");
    (
        Arm {
            c,
            server: up.s("/serverUrl"),
            token: tok["access_token"].as_str().unwrap().to_string(),
        },
        up.s("/subscriptionId"),
    )
}

/// One resource kind under test: its path and a body with tag `v`.
struct Kind {
    what: &'static str,
    path: Box<dyn Fn(&str) -> String>,
    body: fn(&str) -> Value,
    /// answer of a DELETE of nothing
    delete_missing: u16,
}

fn kinds(sub: &str) -> Vec<Kind> {
    let rg = format!("/subscriptions/{sub}/resourceGroups");
    let (a, b, c, d) = (rg.clone(), rg.clone(), rg.clone(), rg);
    vec![
        Kind {
            what: "identity",
            path: Box::new(move |n| {
                format!("{a}/etags/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{n}?api-version={MSI}")
            }),
            body: |v| json!({"location": "local", "tags": {"v": v}}),
            delete_missing: 204,
        },
        Kind {
            what: "vm",
            path: Box::new(move |n| {
                format!("{b}/etags/providers/Microsoft.Compute/virtualMachines/{n}?api-version={COMPUTE}")
            }),
            body: |v| json!({"location": "local", "tags": {"v": v}}),
            delete_missing: 204,
        },
        Kind {
            what: "vault",
            path: Box::new(move |n| {
                format!("{c}/etags/providers/Microsoft.KeyVault/vaults/{n}?api-version={VAULT_API}")
            }),
            body: |v| json!({"location": "local", "tags": {"v": v}, "properties": {}}),
            delete_missing: 204,
        },
        Kind {
            what: "resource group",
            path: Box::new(move |n| format!("{d}/{n}?api-version={RG_API}")),
            body: |v| json!({"location": "local", "tags": {"v": v}}),
            // ARM answers a DELETE of a missing group 404 ResourceGroupNotFound
            delete_missing: 404,
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etags_and_conditional_writes_follow_arm() {
    let dir = tempfile::tempdir().unwrap();
    let up = Up::start(dir.path(), &[]).unwrap();
    let (arm, sub) = admin_of_up(&up).await;
    let rg = format!("/subscriptions/{sub}/resourceGroups/etags?api-version={RG_API}");
    let a = arm
        .call(Method::PUT, &rg, Some(json!({"location": "local"})), &[])
        .await;
    assert_eq!(a.status, 201, "{}", a.body);

    for k in kinds(&sub) {
        let what = k.what;
        let (name, fresh, never) = match what {
            "resource group" => ("etagsgroup", "etagsgroup2", "etagsgroup3"),
            "vault" => ("etagkv1", "etagkv2", "etagkv3"),
            _ => ("one", "two", "three"),
        };
        let p = (k.path)(name);
        // created: the answer carries the version the next GET answers
        let a = arm.call(Method::PUT, &p, Some((k.body)("1")), &[]).await;
        assert_eq!(a.status, 201, "{what}: {}", a.body);
        let e1 = a.etag();
        let g = arm.call(Method::GET, &p, None, &[]).await;
        assert_eq!((g.status, g.etag()), (200, e1.clone()), "{what}");
        assert!(e1.starts_with('"') && e1.ends_with('"'), "{what}: {e1}");
        // the body carries it where Azure's does (a VM from 2023-09-01)
        if what == "vm" {
            assert_eq!(g.body["etag"], json!(e1), "{}", g.body);
        } else {
            assert!(g.body.get("etag").is_none(), "{what}: {}", g.body);
        }
        // a PUT of what is already there leaves the version as it is
        let a = arm
            .call(Method::PUT, &p, Some((k.body)("1")), &[("If-Match", &e1)])
            .await;
        assert_eq!(
            (a.status, a.etag()),
            (200, e1.clone()),
            "{what}: {}",
            a.body
        );

        // PUT with the current ETag: written, a new version
        let a = arm
            .call(Method::PUT, &p, Some((k.body)("2")), &[("If-Match", &e1)])
            .await;
        assert_eq!(a.status, 200, "{what}: {}", a.body);
        let e2 = a.etag();
        assert_ne!(e1, e2, "{what}");
        assert_eq!(arm.call(Method::GET, &p, None, &[]).await.etag(), e2);

        // the old ETag: PUT, PATCH, DELETE refused with ARM's body, nothing written
        let stale: &[(&str, &str)] = &[("If-Match", &e1)];
        for (m, body) in [
            (Method::PUT, Some((k.body)("3"))),
            (Method::PATCH, Some(json!({"tags": {"v": "3"}}))),
            (Method::DELETE, None),
        ] {
            let a = arm.call(m.clone(), &p, body, stale).await;
            assert_eq!(
                (a.status, a.code()),
                (412, "PreconditionFailed"),
                "{what} {m}: {}",
                a.body
            );
            assert!(
                a.body["error"]["message"].as_str().unwrap().contains(&e1),
                "{}",
                a.body
            );
            let g = arm.call(Method::GET, &p, None, &[]).await;
            assert_eq!(
                (g.status, g.etag(), &g.body["tags"]),
                (200, e2.clone(), &json!({"v": "2"})),
                "{what} {m}"
            );
        }
        // an unquoted ETag is the same ETag; a weak one never matches If-Match
        let a = arm
            .call(
                Method::PATCH,
                &p,
                Some(json!({"tags": {"v": "4"}})),
                &[("If-Match", e2.trim_matches('"'))],
            )
            .await;
        assert_eq!(a.status, 200, "{what}: {}", a.body);
        let e4 = a.etag();
        assert_ne!(e4, e2);
        let weak = format!("W/{e4}");
        let a = arm
            .call(Method::DELETE, &p, None, &[("If-Match", &weak)])
            .await;
        assert_eq!(a.status, 412, "{what}: {}", a.body);

        // If-None-Match: * — create only: refused on what exists
        let a = arm
            .call(
                Method::PUT,
                &p,
                Some((k.body)("5")),
                &[("If-None-Match", "*")],
            )
            .await;
        assert_eq!(
            (a.status, a.code()),
            (412, "PreconditionFailed"),
            "{what}: {}",
            a.body
        );
        assert_eq!(arm.call(Method::GET, &p, None, &[]).await.etag(), e4);
        // … and creates what does not
        let q = (k.path)(fresh);
        let a = arm
            .call(
                Method::PUT,
                &q,
                Some((k.body)("1")),
                &[("If-None-Match", "*")],
            )
            .await;
        assert_eq!(a.status, 201, "{what}: {}", a.body);
        assert_eq!(arm.call(Method::GET, &q, None, &[]).await.etag(), a.etag());

        // If-Match on what does not exist: PUT 412 and nothing created; PATCH 404; DELETE as
        // without a condition
        let r = (k.path)(never);
        for cond in ["*", e4.as_str()] {
            let a = arm
                .call(Method::PUT, &r, Some((k.body)("1")), &[("If-Match", cond)])
                .await;
            assert_eq!(
                (a.status, a.code()),
                (412, "PreconditionFailed"),
                "{what} {cond}: {}",
                a.body
            );
            let a = arm
                .call(
                    Method::PATCH,
                    &r,
                    Some(json!({"tags": {"v": "1"}})),
                    &[("If-Match", cond)],
                )
                .await;
            assert_eq!(a.status, 404, "{what} {cond}: {}", a.body);
            let a = arm
                .call(Method::DELETE, &r, None, &[("If-Match", cond)])
                .await;
            assert_eq!(a.status, k.delete_missing, "{what} {cond}: {}", a.body);
            assert_eq!(
                arm.call(Method::GET, &r, None, &[]).await.status,
                404,
                "{what}"
            );
        }

        // DELETE with the current ETag
        let a = arm
            .call(Method::DELETE, &p, None, &[("If-Match", &e4)])
            .await;
        assert_eq!(a.status, 200, "{what}: {}", a.body);
        assert_eq!(
            arm.call(Method::GET, &p, None, &[]).await.status,
            404,
            "{what}"
        );
    }

    // a child resource (a federated credential) has a version too
    let id = format!("/subscriptions/{sub}/resourceGroups/etags/providers/Microsoft.ManagedIdentity/userAssignedIdentities/two");
    let fic = format!("{id}/federatedIdentityCredentials/fic-one?api-version={MSI}");
    let body = |s: &str| json!({"properties": {"issuer": "https://issuer.example", "subject": s, "audiences": ["api://AzureADTokenExchange"]}});
    let a = arm
        .call(
            Method::PUT,
            &fic,
            Some(body("s1")),
            &[("If-None-Match", "*")],
        )
        .await;
    assert_eq!(a.status, 201, "{}", a.body);
    let f1 = a.etag();
    let a = arm
        .call(
            Method::PUT,
            &fic,
            Some(body("s2")),
            &[("If-None-Match", "*")],
        )
        .await;
    assert_eq!(a.status, 412, "{}", a.body);
    let a = arm
        .call(Method::PUT, &fic, Some(body("s2")), &[("If-Match", &f1)])
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let a = arm
        .call(Method::PUT, &fic, Some(body("s3")), &[("If-Match", &f1)])
        .await;
    assert_eq!(a.status, 412, "{}", a.body);
    let g = arm.call(Method::GET, &fic, None, &[]).await;
    assert_eq!(g.body["properties"]["subject"], "s2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_writers_with_one_etag_on_two_replicas_one_wins() {
    let Some(pg) = keyless_store::testing::PgServer::start() else {
        return;
    };
    let db = pg.database().await;
    let tmp = tempfile::tempdir().unwrap();
    let kek = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode([7u8; 32])
    };
    let port_a = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // one issuer for both, as behind a load balancer
    let public = format!("https://localhost:{port_a}");
    let extra = ["--database", &db, "--kek", &kek, "--public-url", &public];
    for d in ["a", "b"] {
        std::fs::create_dir_all(tmp.path().join(d)).unwrap();
    }
    let a = ServerProc::start_on(
        &tmp.path().join("a"),
        &format!("127.0.0.1:{port_a}"),
        &extra,
    );
    let data_b = tmp.path().join("b/server").to_string_lossy().to_string();
    let mut args = vec!["server", "--data-dir", &data_b, "--listen", "127.0.0.1:0"];
    args.extend_from_slice(&extra);
    let b = spawn_until(
        &args,
        "Keyless server listening on https://",
        &tmp.path().join("b"),
    )
    .unwrap();
    let listen_b = b.find("Keyless server listening on https://").unwrap();
    let port_b = listen_b
        .split_whitespace()
        .next()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap();
    let (c, token) = a.admin().await;
    let sub = a.proc.find("Subscription:").unwrap();
    let servers = [a.url.clone(), format!("https://localhost:{port_b}")];
    let arms: Vec<Arm> = servers
        .iter()
        .map(|s| Arm {
            c: c.clone(),
            server: s.clone(),
            token: token.clone(),
        })
        .collect();

    let rg = format!("/subscriptions/{sub}/resourceGroups/race?api-version={RG_API}");
    assert_eq!(
        arms[0]
            .call(Method::PUT, &rg, Some(json!({"location": "local"})), &[])
            .await
            .status,
        201
    );
    let id = format!("/subscriptions/{sub}/resourceGroups/race/providers/Microsoft.ManagedIdentity/userAssignedIdentities/contended?api-version={MSI}");
    let created = arms[0]
        .call(Method::PUT, &id, Some(json!({"location": "local"})), &[])
        .await;
    assert_eq!(created.status, 201, "{}", created.body);
    // both replicas answer the same version
    let mut etag = created.etag();
    assert_eq!(arms[1].call(Method::GET, &id, None, &[]).await.etag(), etag);

    const WRITERS: usize = 16;
    for round in 0..3 {
        let mut tasks = vec![];
        for i in 0..WRITERS {
            let (arm, id, etag) = (arms[i % 2].clone(), id.clone(), etag.clone());
            let (m, body) = if round == 1 {
                (
                    Method::PATCH,
                    json!({"tags": {"writer": format!("{round}-{i}")}}),
                )
            } else {
                (
                    Method::PUT,
                    json!({"location": "local", "tags": {"writer": format!("{round}-{i}")}}),
                )
            };
            tasks.push(tokio::spawn(async move {
                let a = arm.call(m, &id, Some(body), &[("If-Match", &etag)]).await;
                (i, a.status, a.etag, a.body)
            }));
        }
        let mut won = vec![];
        for t in tasks {
            let (i, status, new, body) = t.await.unwrap();
            match status {
                200 => won.push((i, new.expect("a write answers its ETag"))),
                412 => assert_eq!(body["error"]["code"], "PreconditionFailed", "{body}"),
                s => panic!("round {round} writer {i}: {s} {body}"),
            }
        }
        assert_eq!(
            won.len(),
            1,
            "round {round}: exactly one writer wins: {won:?}"
        );
        let (winner, new) = won.pop().unwrap();
        // what both replicas show is the winner's write, at the version it answered
        for arm in &arms {
            let g = arm.call(Method::GET, &id, None, &[]).await;
            assert_eq!(
                g.body["tags"],
                json!({"writer": format!("{round}-{winner}")}),
                "{}",
                g.body
            );
            assert_eq!(g.etag(), new);
        }
        etag = new;
    }
    // deletes racing with one ETag: one deletes, the others are refused (or find nothing)
    let mut tasks = vec![];
    for i in 0..WRITERS {
        let (arm, id, etag) = (arms[i % 2].clone(), id.clone(), etag.clone());
        tasks.push(tokio::spawn(async move {
            arm.call(Method::DELETE, &id, None, &[("If-Match", &etag)])
                .await
                .status
        }));
    }
    let mut statuses = vec![];
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        1,
        "{statuses:?}"
    );
    assert!(
        statuses.iter().all(|s| matches!(s, 200 | 204 | 412)),
        "{statuses:?}"
    );
    drop(b);
    drop(a);
}
