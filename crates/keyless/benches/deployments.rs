//! `cargo bench -p keyless --bench deployments`: ARM template deployments end to end, each
//! beside the same resources created by direct PUTs from the client in the same run (these
//! machines are noisy, so the ratios are the figures to compare across runs):
//!
//! - a template of 100 `Microsoft.ManagedIdentity/userAssignedIdentities` (written out as 100
//!   resources, no `copy` loop, as a user writes them; independent of each other), deployed
//!   with `PUT …/providers/Microsoft.Resources/deployments/{name}` (incremental mode) — timed
//!   from the PUT sent to `{"status": "Succeeded"}` seen at its `Azure-AsyncOperation` URL,
//!   polled every 20 ms (the poll interval bounds the resolution; the deployment's own
//!   `duration`, as the server records it, is printed beside) — vs the same 100 identity PUTs
//!   issued directly by the client (a) one after another and (b) all 100 at once, the
//!   parallelism the deployment uses for independent resources (HTTPS keep-alive; the 100
//!   connections opened before the clock starts);
//! - the same 100 identities as a chain (each `dependsOn` the previous, by `resourceId()`),
//!   vs the direct PUTs one after another: the engine's per-step overhead;
//! - `POST …/deployments/{name}/whatIf` of it once deployed (100 reads and comparisons), beside
//!   validate;
//! - `POST …/deployments/{name}/validate` of the 100-resource template alone (the template
//!   parsed and evaluated, the preflight; nothing deployed), beside one direct GET of an
//!   identity: the evaluator's share.
//!
//! Every round (`BENCH_ROUNDS`, default 3) measures, in this order, the direct PUTs all at
//! once, the deployment, the direct PUTs one after another, the chained deployment, then
//! validate and the GET — each write in a fresh resource group, so every PUT creates — and each
//! figure is the round whose ratio is the median. A deployment that ends `Failed` (or
//! `Canceled`) stops the bench with its status body.
//!
//! Environment: BENCH_ROUNDS (3).

mod common;

use common::*;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};

const ARM: &str = "https://management.azure.com/";
const MSI_API: &str = "api-version=2023-01-31";
const DEPLOY_API: &str = "api-version=2025-04-01";
const GROUP_API: &str = "api-version=2022-12-01";
const IDENTITY_TYPE: &str = "Microsoft.ManagedIdentity/userAssignedIdentities";
/// Resources per template (and direct PUTs per run).
const N: usize = 100;
/// How often the client polls a deployment's `Azure-AsyncOperation` URL.
const POLL: Duration = Duration::from_millis(20);
/// A deployment still running after this fails the bench.
const DEPLOY_TIMEOUT: Duration = Duration::from_secs(600);

struct Arm {
    client: reqwest::Client,
    base: String,
    subscription: String,
    token: String,
}

impl Arm {
    /// `method` on `url` (a path below the server, or an absolute URL): status, headers, body.
    async fn send(
        &self,
        method: reqwest::Method,
        url: &str,
        body: Option<&Value>,
    ) -> (reqwest::StatusCode, reqwest::header::HeaderMap, Value) {
        let url = if url.starts_with("https://") {
            url.to_string()
        } else {
            format!("{}{url}", self.base)
        };
        let mut r = self.client.request(method, url).bearer_auth(&self.token);
        if let Some(b) = body {
            r = r.json(b);
        }
        let resp = r.send().await.unwrap();
        let (status, headers) = (resp.status(), resp.headers().clone());
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        (status, headers, v)
    }

    /// [`Arm::send`], the answer a success (else the bench stops): the body.
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<&Value>) -> Value {
        let (status, _, v) = self.send(method.clone(), path, body).await;
        assert!(status.is_success(), "{method} {path}: {status} {v}");
        v
    }

    fn group(&self, rg: &str) -> String {
        format!("/subscriptions/{}/resourcegroups/{rg}", self.subscription)
    }

    /// A fresh resource group `rg`: its path.
    async fn new_group(&self, rg: &str) -> String {
        let path = self.group(rg);
        self.call(
            reqwest::Method::PUT,
            &format!("{path}?{GROUP_API}"),
            Some(&json!({"location": "local"})),
        )
        .await;
        path
    }
}

fn identity_name(i: usize) -> String {
    format!("id-{i:03}")
}

/// A template of `n` user-assigned identities written out one by one; with `chain`, each
/// `dependsOn` the previous.
fn template(n: usize, chain: bool) -> Value {
    let resources: Vec<Value> = (0..n)
        .map(|i| {
            let mut r = json!({
                "type": IDENTITY_TYPE,
                "apiVersion": "2023-01-31",
                "name": identity_name(i),
                "location": "local",
            });
            if chain && i > 0 {
                r["dependsOn"] = json!([format!(
                    "[resourceId('{IDENTITY_TYPE}', '{}')]",
                    identity_name(i - 1)
                )]);
            }
            r
        })
        .collect();
    json!({
        "$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentTemplate.json#",
        "contentVersion": "1.0.0.0",
        "resources": resources,
    })
}

fn deployment_body(template: &Value) -> Value {
    json!({"properties": {"mode": "Incremental", "template": template, "parameters": {}}})
}

/// One direct identity PUT in group `rg` (its path); it must create.
async fn put_identity(arm: &Arm, rg: &str, i: usize) {
    let path = format!(
        "{rg}/providers/{IDENTITY_TYPE}/{}?{MSI_API}",
        identity_name(i)
    );
    let (status, _, v) = arm
        .send(
            reqwest::Method::PUT,
            &path,
            Some(&json!({"location": "local"})),
        )
        .await;
    assert_eq!(status, 201, "PUT {path}: {v}");
}

/// `n` direct identity PUTs one after another: the time.
async fn direct_sequential(arm: &Arm, rg: &str, n: usize) -> Duration {
    let t0 = Instant::now();
    for i in 0..n {
        put_identity(arm, rg, i).await;
    }
    t0.elapsed()
}

/// `n` direct identity PUTs all at once: the time (the connections opened beforehand).
async fn direct_parallel(arm: &Arc<Arm>, rg: &str, n: usize) -> Duration {
    // open (and leave idle in the pool) one connection per PUT: no TLS handshake is timed
    let mut warm = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (arm, path) = (arm.clone(), format!("{rg}?{GROUP_API}"));
        warm.spawn(async move { arm.call(reqwest::Method::GET, &path, None).await });
    }
    warm.join_all().await;
    let t0 = Instant::now();
    let mut puts = tokio::task::JoinSet::new();
    for i in 0..n {
        let (arm, rg) = (arm.clone(), rg.to_string());
        puts.spawn(async move { put_identity(&arm, &rg, i).await });
    }
    puts.join_all().await;
    t0.elapsed()
}

/// One deployment run as the client saw it.
struct Deployed {
    /// PUT sent → `Succeeded` seen.
    total: Duration,
    /// PUT sent → its 201 read.
    accepted: Duration,
    /// The deployment's `duration` as the server recorded it.
    server: Duration,
}

/// Deploy `template` as deployment `name` in group `rg` (its path) and poll it to its end.
async fn deploy(arm: &Arm, rg: &str, name: &str, template: &Value, n: usize) -> Deployed {
    let path = format!("{rg}/providers/Microsoft.Resources/deployments/{name}");
    let body = deployment_body(template);
    let t0 = Instant::now();
    let (status, headers, v) = arm
        .send(
            reqwest::Method::PUT,
            &format!("{path}?{DEPLOY_API}"),
            Some(&body),
        )
        .await;
    let accepted = t0.elapsed();
    assert_eq!(status, 201, "PUT {path}: {v}");
    let status_url = headers
        .get("azure-asyncoperation")
        .unwrap_or_else(|| panic!("PUT {path}: 201 without Azure-AsyncOperation: {headers:?}"))
        .to_str()
        .unwrap()
        .to_string();
    loop {
        let (code, _, s) = arm.send(reqwest::Method::GET, &status_url, None).await;
        assert!(code.is_success(), "GET {status_url}: {code} {s}");
        match s["status"].as_str() {
            Some("Succeeded") => break,
            Some("Running" | "Accepted") => {}
            _ => {
                let ops = arm
                    .send(
                        reqwest::Method::GET,
                        &format!("{path}/operations?{DEPLOY_API}"),
                        None,
                    )
                    .await
                    .2;
                panic!(
                    "deployment {path} did not succeed: {s:#}\nits operations: {}",
                    serde_json::to_string_pretty(&ops).unwrap()
                );
            }
        }
        assert!(
            t0.elapsed() < DEPLOY_TIMEOUT,
            "deployment {path} still running after {DEPLOY_TIMEOUT:?}: {s}"
        );
        tokio::time::sleep(POLL).await;
    }
    let total = t0.elapsed();
    let d = arm
        .call(reqwest::Method::GET, &format!("{path}?{DEPLOY_API}"), None)
        .await;
    let props = &d["properties"];
    assert_eq!(props["provisioningState"], "Succeeded", "{d}");
    let outputs = props["outputResources"].as_array().map_or(0, Vec::len);
    assert_eq!(outputs, n, "outputResources of {path}: {d}");
    // the last identity exists
    arm.call(
        reqwest::Method::GET,
        &format!(
            "{rg}/providers/{IDENTITY_TYPE}/{}?{MSI_API}",
            identity_name(n - 1)
        ),
        None,
    )
    .await;
    let server = props["duration"]
        .as_str()
        .and_then(iso_duration)
        .unwrap_or_else(|| panic!("the duration of {path}: {d}"));
    Deployed {
        total,
        accepted,
        server,
    }
}

/// An ISO-8601 duration of hours, minutes and seconds (`PT1M2.5S`).
fn iso_duration(s: &str) -> Option<Duration> {
    let mut rest = s.strip_prefix("PT")?;
    let mut secs = 0.0;
    while !rest.is_empty() {
        let at = rest.find(|c: char| c.is_ascii_alphabetic())?;
        let v: f64 = rest[..at].parse().ok()?;
        secs += v * match &rest[at..at + 1] {
            "H" => 3600.0,
            "M" => 60.0,
            "S" => 1.0,
            _ => return None,
        };
        rest = &rest[at + 1..];
    }
    Some(Duration::from_secs_f64(secs))
}

/// `POST …/deployments/{name}/validate` of `template` in group `rg`: the time.
async fn validate(arm: &Arm, rg: &str, template: &Value, n: usize) -> Duration {
    let path =
        format!("{rg}/providers/Microsoft.Resources/deployments/validation/validate?{DEPLOY_API}");
    let body = deployment_body(template);
    let t0 = Instant::now();
    let (status, _, v) = arm.send(reqwest::Method::POST, &path, Some(&body)).await;
    let took = t0.elapsed();
    assert_eq!(status, 200, "POST {path}: {v}");
    let validated = v["properties"]["validatedResources"]
        .as_array()
        .map_or(0, Vec::len);
    assert_eq!(validated, n, "validatedResources: {v}");
    took
}

/// `POST …/deployments/{name}/whatIf` of `template` in group `rg`, where all its `n` resources
/// exist as it deploys them: the time (every change must be NoChange).
async fn what_if(arm: &Arm, rg: &str, template: &Value, n: usize) -> Duration {
    let path = format!("{rg}/providers/Microsoft.Resources/deployments/whatif/whatIf?{DEPLOY_API}");
    let body = deployment_body(template);
    let t0 = Instant::now();
    let (status, _, v) = arm.send(reqwest::Method::POST, &path, Some(&body)).await;
    let took = t0.elapsed();
    assert_eq!(status, 200, "POST {path}: {v}");
    let changes = v["properties"]["changes"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(changes.len(), n, "changes: {v}");
    assert!(
        changes.iter().all(|c| c["changeType"] == "NoChange"),
        "changes: {v}"
    );
    took
}

/// One direct GET of identity 0 in group `rg`: the time.
async fn get_identity(arm: &Arm, rg: &str) -> Duration {
    let path = format!(
        "{rg}/providers/{IDENTITY_TYPE}/{}?{MSI_API}",
        identity_name(0)
    );
    let t0 = Instant::now();
    let (status, _, v) = arm.send(reqwest::Method::GET, &path, None).await;
    let took = t0.elapsed();
    assert_eq!(status, 200, "GET {path}: {v}");
    took
}

/// Of `(baseline, subject)` time pairs, one per round: the pair whose ratio (subject /
/// baseline) is the median, and every ratio in measuring order.
fn median_pair(pairs: &[(Duration, Duration)]) -> (Duration, Duration, Vec<f64>) {
    let ratios: Vec<f64> = pairs
        .iter()
        .map(|(b, x)| x.as_secs_f64() / b.as_secs_f64())
        .collect();
    let mut order: Vec<usize> = (0..pairs.len()).collect();
    order.sort_by(|&i, &j| ratios[i].total_cmp(&ratios[j]));
    let (b, x) = pairs[order[pairs.len() / 2]];
    (b, x, ratios)
}

/// One table row: label, a rate of resources, the rest.
fn row(label: &str, per_sec: f64, rest: &str) -> String {
    format!("  {label:<58}{per_sec:>7.0} /s   {rest}")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Resources/s of `n` in `d`.
fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

struct Round {
    parallel: Duration,
    deployed: Deployed,
    sequential: Duration,
    chained: Deployed,
    validate: Duration,
    what_if: Duration,
    get: Duration,
}

fn main() {
    let rounds = env_u64("BENCH_ROUNDS", 3).max(1) as usize;
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        keyless_ops::metrics::install("bench");
        let (_dir, srv) = start_server(None).await;
        let s = srv.state.clone();
        let admin = srv.bootstrap.new_admin.clone().unwrap();
        let base = format!("https://localhost:{}", srv.local_addr.port());
        let client = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(s.ca.cert_pem().as_bytes()).unwrap()])
            .build()
            .unwrap();
        let token: Value = client
            .post(format!("{base}/{}/oauth2/v2.0/token", s.tenant_id))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", admin.client_id.as_str()),
                ("client_secret", admin.client_secret.as_str()),
                ("scope", &format!("{ARM}.default")),
            ])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let arm = Arc::new(Arm {
            client,
            base,
            subscription: s.subscription_id.clone(),
            token: token["access_token"]
                .as_str()
                .unwrap_or_else(|| panic!("no token: {token}"))
                .to_string(),
        });
        let flat = template(N, false);
        let chain = template(N, true);

        // warm: a small deployment and a few direct PUTs, not counted
        eprintln!("bench phase: warm-up");
        let rg = arm.new_group("bench-warm").await;
        direct_sequential(&arm, &rg, 5).await;
        let rg = arm.new_group("bench-warm-deploy").await;
        deploy(&arm, &rg, "warm", &template(5, true), 5).await;

        let mut measured: Vec<Round> = vec![];
        for r in 0..rounds {
            eprintln!("bench phase: round {} of {rounds}", r + 1);
            let rg = arm.new_group(&format!("bench-{r}-parallel")).await;
            let parallel = direct_parallel(&arm, &rg, N).await;
            let rg_flat = arm.new_group(&format!("bench-{r}-deployment")).await;
            let deployed = deploy(&arm, &rg_flat, "identities", &flat, N).await;
            let rg_seq = arm.new_group(&format!("bench-{r}-sequential")).await;
            let sequential = direct_sequential(&arm, &rg_seq, N).await;
            let rg = arm.new_group(&format!("bench-{r}-chain")).await;
            let chained = deploy(&arm, &rg, "chain", &chain, N).await;
            let validate = validate(&arm, &rg_flat, &flat, N).await;
            let what_if = what_if(&arm, &rg_flat, &flat, N).await;
            let get = get_identity(&arm, &rg_seq).await;
            measured.push(Round {
                parallel,
                deployed,
                sequential,
                chained,
                validate,
                what_if,
                get,
            });
        }

        let pairs = |b: fn(&Round) -> Duration, x: fn(&Round) -> Duration| {
            median_pair(&measured.iter().map(|m| (b(m), x(m))).collect::<Vec<_>>())
        };
        let (par, dep_p, r_par) = pairs(|m| m.parallel, |m| m.deployed.total);
        let (seq, dep_s, r_seq) = pairs(|m| m.sequential, |m| m.deployed.total);
        let (seq_c, chain_t, r_chain) = pairs(|m| m.sequential, |m| m.chained.total);
        let (get, val, r_val) = pairs(|m| m.get, |m| m.validate);
        let (val_w, wif, r_wif) = pairs(|m| m.validate, |m| m.what_if);
        let by_total = |t: Duration, f: fn(&Round) -> &Deployed| {
            measured.iter().map(f).find(|d| d.total == t).unwrap()
        };
        let d = by_total(dep_p, |m| &m.deployed);
        let c = by_total(chain_t, |m| &m.chained);

        println!(
            "deployments bench ({N} user-assigned identities per run, {rounds} rounds, a fresh resource group per run; status polled every {} ms; {threads} cores; client in the same process)",
            POLL.as_millis()
        );
        println!(
            "{}",
            row(
                &format!("direct PUTs, all {N} at once (HTTPS keep-alive)"),
                rate(N, par),
                &format!("{:.0} ms", ms(par))
            )
        );
        println!(
            "{}",
            row(
                &format!("deployment, {N} independent resources"),
                rate(N, dep_p),
                &format!(
                    "{:.0} ms (server's duration {:.0} ms; 201 in {:.1} ms)   time ratio to all at once {:.2}{}",
                    ms(dep_p),
                    ms(d.server),
                    ms(d.accepted),
                    dep_p.as_secs_f64() / par.as_secs_f64(),
                    rounds_note(&r_par)
                )
            )
        );
        println!(
            "{}",
            row(
                &format!("direct PUTs, {N} one after another"),
                rate(N, seq),
                &format!("{:.0} ms", ms(seq))
            )
        );
        println!(
            "{}",
            row(
                &format!("deployment, {N} independent resources, same rounds"),
                rate(N, dep_s),
                &format!(
                    "{:.0} ms   time ratio to one after another {:.2}{}",
                    ms(dep_s),
                    dep_s.as_secs_f64() / seq.as_secs_f64(),
                    rounds_note(&r_seq)
                )
            )
        );
        println!(
            "{}",
            row(
                &format!("deployment, {N} resources chained by dependsOn"),
                rate(N, chain_t),
                &format!(
                    "{:.0} ms (server's duration {:.0} ms)   time ratio to one after another {:.2}{}",
                    ms(chain_t),
                    ms(c.server),
                    chain_t.as_secs_f64() / seq_c.as_secs_f64(),
                    rounds_note(&r_chain)
                )
            )
        );
        println!(
            "    per step: {:.2} ms chained vs {:.2} ms per direct PUT one after another (+{:.2} ms the engine's)",
            ms(chain_t) / N as f64,
            ms(seq_c) / N as f64,
            (ms(chain_t) - ms(seq_c)) / N as f64
        );
        println!(
            "  validate (POST …/validate) of the {N}-resource template: {:.2} ms; one direct GET of an identity: {:.2} ms; ratio {:.1}{}",
            ms(val),
            ms(get),
            val.as_secs_f64() / get.as_secs_f64(),
            rounds_note(&r_val)
        );
        println!(
            "  what-if (POST …/whatIf) of it where all {N} exist ({N} NoChange): {:.2} ms; ratio to validate {:.1}{}; {:.3} ms per resource vs {:.2} ms for one direct GET",
            ms(wif),
            wif.as_secs_f64() / val_w.as_secs_f64(),
            rounds_note(&r_wif),
            ms(wif) / N as f64,
            ms(get)
        );
        srv.shutdown().await;
    });
}
