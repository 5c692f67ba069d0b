//! The store suite's races run from two processes on one database: the rules the database
//! holds (20 federated credentials per identity, single-use join tokens, a scale set's size
//! and never-reused instance ids, one renewal per expected version) must hold between
//! processes — replicas of the server on one PostgreSQL — and not only between the tasks of
//! one. SQLite too: production runs one process per data dir (the `lock` file), but two
//! processes on one file must still keep the rules, `BEGIN IMMEDIATE` serializing them.
//!
//! A parent test prepares the database, then runs this test binary twice more
//! (`--exact worker --include-ignored`, the case named in the environment); each worker does
//! half of the racing writes, started together by a file handshake (both ready, then a start
//! time both wait for), and writes what each write was told to a file. The parent checks the totals and what is stored. `worker` is
//! `#[ignore]`d, so a normal run only runs the parents.

use keyless_store::testing::PgServer;
use keyless_store::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const ENV_DB: &str = "KEYLESS_TP_DB";
const ENV_CASE: &str = "KEYLESS_TP_CASE";
const ENV_WORKER: &str = "KEYLESS_TP_WORKER";
const ENV_DIR: &str = "KEYLESS_TP_DIR";

/// Racing writes per worker, by case.
const FICS: usize = 15; // 30 in all, 20 allowed
const JOINS: usize = 6; // 12 consumers of one token
const INSTANCES: usize = 6; // 12 joins, 5 places
const LIMIT: u64 = 5;
const RENEWALS: usize = 5; // 10 renewals from one version

const CASES: &[&str] = &["fic_limit", "join_token", "instances", "renewal"];

fn kek() -> Kek {
    Kek::from_bytes(&[7u8; 32]).unwrap()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn open(db: &str) -> Store {
    if keyless_store::postgres::is_url(db) {
        Store::postgres(&keyless_store::postgres::PgOptions::new(db), kek())
            .await
            .unwrap()
    } else {
        Store::sqlite(Path::new(db), kek()).unwrap()
    }
}

fn identity() -> IdentityRecord {
    let rid = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/u1";
    IdentityRecord {
        key: rid.to_lowercase(),
        resource_id: rid.into(),
        name: "u1".into(),
        subscription: "s".into(),
        resource_group: "rg".into(),
        location: "local".into(),
        tags: Default::default(),
        tenant_id: "t".into(),
        principal_id: "p-u1".into(),
        client_id: "c-u1".into(),
        system_vm: None,
        created: 1,
    }
}

fn scale_set() -> VmRecord {
    let rid =
        "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/g";
    VmRecord {
        key: rid.to_lowercase(),
        resource_id: rid.into(),
        name: "g".into(),
        subscription: "s".into(),
        resource_group: "rg".into(),
        location: "local".into(),
        tags: Default::default(),
        vm_id: "v".into(),
        identity_type: "None".into(),
        properties: serde_json::json!({}),
        created: 1,
    }
}

fn version(coll: &str, version: &str, value: &[u8]) -> KvVersionRecord {
    KvVersionRecord {
        vault: "kv1".into(),
        coll: coll.into(),
        name: "c".into(),
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

/// How long each racing unit of work stays open after its write, before it commits: the
/// processes' writes then overlap in time even when one starts a few milliseconds late (a
/// loaded machine), and the others wait on its locks meanwhile — a harder race, not an easier
/// one.
const HOLD: Duration = Duration::from_millis(2);

async fn commit_if_ok<T>(tx: Tx, out: Result<T>) -> Result<T> {
    tokio::time::sleep(HOLD).await;
    if out.is_ok() {
        tx.commit().await?;
    }
    out
}

/// What the parent writes before the race of `case`.
async fn prepare(s: &Store, case: &str) {
    let mut tx = s.write("prepare").await.unwrap();
    match case {
        "fic_limit" => {
            tx.put_identity(&identity()).await.unwrap();
        }
        "join_token" => {
            let mut host = scale_set();
            host.key = "vm".into();
            tx.put_vm(&host, None, &[]).await.unwrap();
            tx.insert_join_token("h1", "vm", 100).await.unwrap();
        }
        "instances" => {
            tx.put_vm(&scale_set(), None, &[]).await.unwrap();
        }
        "renewal" => {
            let rid = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.KeyVault/vaults/kv1";
            tx.put_vault(&VaultRecord {
                key: rid.to_lowercase(),
                resource_id: rid.into(),
                name: "kv1".into(),
                subscription: "s".into(),
                resource_group: "rg".into(),
                location: "local".into(),
                tags: Default::default(),
                properties: serde_json::json!({}),
                created: 1,
            })
            .await
            .unwrap();
            let w = KvWrite {
                versions: vec![version("certificates", "v1", b"")],
                extra: None,
                expect_latest: None,
            };
            assert_eq!(tx.kv_write(&w).await.unwrap(), KvWriteOutcome::Written);
        }
        other => panic!("no case {other}"),
    }
    tx.commit().await.unwrap();
}

/// One racing write of `case` by write `i` of worker `w`; what it was told, as a word.
async fn race_one(s: Store, case: &str, w: usize, i: usize) -> String {
    match case {
        "fic_limit" => {
            let fic = FicRecord {
                identity_key: identity().key,
                name: format!("w{w}-f{i:02}"),
                issuer: "https://issuer.example".into(),
                subject: format!("sub-{w}-{i}"),
                audiences: vec!["api://AzureADTokenExchange".into()],
                description: None,
                created: 1,
            };
            let mut tx = s.write("race").await.unwrap();
            let out = tx.put_fic(&fic, 20).await;
            match commit_if_ok(tx, out).await.unwrap() {
                FicPut::Created => format!("Created {}", fic.name),
                other => format!("{other:?}"),
            }
        }
        "join_token" => {
            let mut tx = s.write("race").await.unwrap();
            let out = tx
                .consume_join_token("h1", 10, &format!("key-{}", std::process::id()))
                .await;
            match commit_if_ok(tx, out).await.unwrap() {
                JoinTokenOutcome::Accepted { .. } => "Accepted".into(),
                other => format!("{other:?}"),
            }
        }
        "instances" => {
            let g = scale_set();
            let mut tx = s.write("race").await.unwrap();
            let out = tx
                .create_instance(&g.key, &g.resource_id, 1, Some(LIMIT))
                .await;
            match commit_if_ok(tx, out).await {
                Ok(inst) => format!("Created {}", inst.instance_id),
                Err(StoreError::Conflict(Conflict::GroupFull)) => "GroupFull".into(),
                Err(e) => panic!("{e}"),
            }
        }
        "renewal" => {
            let tag = format!("r{w}-{i}");
            let write = KvWrite {
                versions: vec![
                    version("certificates", &tag, b""),
                    version("secrets", &tag, b"pem"),
                ],
                extra: Some(("certificates".into(), serde_json::json!({ "by": tag }))),
                expect_latest: Some(("certificates".into(), Some("v1".into()))),
            };
            let mut tx = s.write("race").await.unwrap();
            let out = tx.kv_write(&write).await;
            match commit_if_ok(tx, out).await.unwrap() {
                KvWriteOutcome::Written => format!("Written {tag}"),
                other => format!("{other:?}"),
            }
        }
        other => panic!("no case {other}"),
    }
}

fn writes_per_worker(case: &str) -> usize {
    match case {
        "fic_limit" => FICS,
        "join_token" => JOINS,
        "instances" => INSTANCES,
        "renewal" => RENEWALS,
        other => panic!("no case {other}"),
    }
}

/// A worker's half of the race: its writes released together (an in-process barrier) once
/// the parent says go; on PostgreSQL each write has its transaction open before the barrier
/// lets any of them work, so statements of both processes interleave (a SQLite write
/// transaction excludes the others from its start: there the barrier comes first, as in the
/// store suite).
#[test]
#[ignore = "run by the two-process tests, as a second and third process"]
fn worker() {
    let (Ok(db), Ok(case), Ok(w), Ok(dir)) = (
        std::env::var(ENV_DB),
        std::env::var(ENV_CASE),
        std::env::var(ENV_WORKER),
        std::env::var(ENV_DIR),
    ) else {
        eprintln!("worker: not started by a two-process test; nothing to do");
        return;
    };
    let w: usize = w.parse().unwrap();
    let dir = PathBuf::from(dir);
    let n = writes_per_worker(&case);
    let out = rt().block_on(async {
        let s = open(&db).await;
        // warm up: a connection (and on PostgreSQL the pool) ready before the start
        drop(s.read("warm").await.unwrap());
        std::fs::write(dir.join(format!("ready-{w}")), b"").unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let go = loop {
            if let Ok(t) = std::fs::read_to_string(dir.join("go")) {
                if let Ok(t) = t.parse::<u128>() {
                    break t;
                }
            }
            assert!(Instant::now() < deadline, "no go from the parent");
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        // both processes start at the time the parent named, to the microsecond or so
        while micros() < go {
            std::hint::spin_loop();
        }
        let start = micros();
        let gate = Arc::new(tokio::sync::Barrier::new(n));
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let (s, gate, case) = (s.clone(), gate.clone(), case.clone());
                tokio::spawn(async move {
                    gate.wait().await;
                    race_one(s, &case, w, i).await
                })
            })
            .collect();
        let mut out = Vec::with_capacity(n);
        for t in tasks {
            out.push(t.await.expect("racing write"));
        }
        Report {
            start,
            end: micros(),
            outcomes: out,
        }
    });
    std::fs::write(
        dir.join(format!("result-{w}.json")),
        serde_json::to_vec(&out).unwrap(),
    )
    .unwrap();
}

/// What a worker did: its writes' window (microseconds of the system clock, both processes
/// on one machine) and what each write was told.
#[derive(serde::Serialize, serde::Deserialize)]
struct Report {
    start: u128,
    end: u128,
    outcomes: Vec<String>,
}

fn micros() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros()
}

/// Run `case` from two worker processes on `db`: what their writes were told, all together,
/// and whether the two workers' windows of writing overlapped.
fn two_workers(db: &str, case: &str) -> (Vec<String>, bool) {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut children: Vec<_> = (0..2)
        .map(|w| {
            let mut cmd = Command::new(&exe);
            cmd.args(["--exact", "worker", "--nocapture", "--include-ignored"])
                .env(ENV_DB, db)
                .env(ENV_CASE, case)
                .env(ENV_WORKER, w.to_string())
                .env(ENV_DIR, dir.path())
                .stdout(Stdio::from(
                    std::fs::File::create(dir.path().join(format!("out-{w}"))).unwrap(),
                ))
                .stderr(Stdio::from(
                    std::fs::File::create(dir.path().join(format!("err-{w}"))).unwrap(),
                ));
            cmd.spawn().expect("start a worker")
        })
        .collect();
    let logs = |w: usize| {
        let read = |f: &str| {
            std::fs::read_to_string(dir.path().join(format!("{f}-{w}"))).unwrap_or_default()
        };
        format!(
            "worker {w} stdout:\n{}\nstderr:\n{}",
            read("out"),
            read("err")
        )
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let kill_all = |children: &mut Vec<std::process::Child>| {
        for c in children.iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    };
    // both ready, then go
    while !(0..2).all(|w| dir.path().join(format!("ready-{w}")).exists()) {
        for (w, c) in children.iter_mut().enumerate() {
            if let Ok(Some(st)) = c.try_wait() {
                let l = logs(w);
                kill_all(&mut children);
                panic!("worker {w} ended ({st}) before the start:\n{l}");
            }
        }
        if Instant::now() > deadline {
            kill_all(&mut children);
            panic!("workers not ready:\n{}\n{}", logs(0), logs(1));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // go: a start time far enough ahead for both to read it (written whole, then renamed)
    let go = dir.path().join("go.tmp");
    std::fs::write(&go, (micros() + 30_000).to_string()).unwrap();
    std::fs::rename(&go, dir.path().join("go")).unwrap();
    let mut statuses = vec![None, None];
    while statuses.iter().any(Option::is_none) {
        for (w, c) in children.iter_mut().enumerate() {
            if statuses[w].is_none() {
                statuses[w] = c.try_wait().unwrap();
            }
        }
        if Instant::now() > deadline {
            kill_all(&mut children);
            panic!("workers did not finish:\n{}\n{}", logs(0), logs(1));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut all = vec![];
    let mut windows = vec![];
    for (w, st) in statuses.into_iter().enumerate() {
        let st = st.unwrap();
        assert!(st.success(), "worker {w} failed ({st}):\n{}", logs(w));
        let r: Report = serde_json::from_slice(
            &std::fs::read(dir.path().join(format!("result-{w}.json"))).unwrap(),
        )
        .unwrap_or_else(|e| panic!("worker {w} results: {e}\n{}", logs(w)));
        assert_eq!(r.outcomes.len(), writes_per_worker(case), "worker {w}");
        windows.push((r.start, r.end));
        all.extend(r.outcomes);
    }
    let overlap = windows.iter().map(|w| w.0).max() < windows.iter().map(|w| w.1).min();
    (all, overlap)
}

fn count(outcomes: &[String], prefix: &str) -> usize {
    outcomes.iter().filter(|o| o.starts_with(prefix)).count()
}

/// Every case, each on a fresh database from `fresh`.
fn run_cases(fresh: &mut dyn FnMut() -> String) {
    let rt = rt();
    for case in CASES {
        // the workers' writing must overlap for the race to be between processes; a start
        // slow enough for one to finish before the other begins is run again
        let mut attempts = 0;
        loop {
            attempts += 1;
            let db = fresh();
            let s = rt.block_on(open(&db));
            rt.block_on(prepare(&s, case));
            let started = Instant::now();
            let (outcomes, overlap) = two_workers(&db, case);
            eprintln!(
                "case {case} on {}: {} writes from two processes in {:.2} s (windows overlap: {overlap})",
                s.backend().name(),
                outcomes.len(),
                started.elapsed().as_secs_f64()
            );
            // the rules hold whether or not the writes overlapped
            rt.block_on(check(&s, case, &outcomes));
            if overlap {
                break;
            }
            assert!(
                attempts < 5,
                "case {case}: the two workers never wrote at the same time"
            );
        }
    }
}

async fn check(s: &Store, case: &str, outcomes: &[String]) {
    let mut tx = s.read("check").await.unwrap();
    match case {
        "fic_limit" => {
            // 30 writers of new credentials: exactly 20 stored, the rest told the limit
            assert_eq!(count(outcomes, "Created "), 20, "{outcomes:?}");
            assert_eq!(count(outcomes, "LimitReached"), 10, "{outcomes:?}");
            let mut created: Vec<String> = outcomes
                .iter()
                .filter_map(|o| o.strip_prefix("Created ").map(str::to_string))
                .collect();
            created.sort();
            let mut stored: Vec<String> = tx
                .list_fics(&identity().key)
                .await
                .unwrap()
                .into_iter()
                .map(|f| f.name)
                .collect();
            stored.sort();
            assert_eq!(stored, created, "exactly the credentials told Created");
            // both processes got some in: the race was between them
            for w in 0..2 {
                assert!(
                    stored.iter().any(|n| n.starts_with(&format!("w{w}-"))),
                    "worker {w} stored none: {stored:?}"
                );
            }
        }
        "join_token" => {
            assert_eq!(count(outcomes, "Accepted"), 1, "{outcomes:?}");
            assert_eq!(count(outcomes, "AlreadyUsed"), 11, "{outcomes:?}");
        }
        "instances" => {
            let mut ids: Vec<u64> = outcomes
                .iter()
                .filter_map(|o| o.strip_prefix("Created ")?.parse().ok())
                .collect();
            ids.sort();
            assert_eq!(ids, vec![0, 1, 2, 3, 4], "{outcomes:?}");
            assert_eq!(count(outcomes, "GroupFull"), 2 * INSTANCES - 5);
            let stored: Vec<u64> = tx
                .list_instances(&scale_set().key)
                .await
                .unwrap()
                .into_iter()
                .map(|i| i.instance_id)
                .collect();
            assert_eq!(stored, ids);
        }
        "renewal" => {
            assert_eq!(count(outcomes, "Written "), 1, "{outcomes:?}");
            assert_eq!(count(outcomes, "Stale"), 2 * RENEWALS - 1, "{outcomes:?}");
            let winner = outcomes
                .iter()
                .find_map(|o| o.strip_prefix("Written "))
                .unwrap();
            let certs: Vec<String> = tx
                .kv_versions("kv1", "certificates", "c")
                .await
                .unwrap()
                .into_iter()
                .map(|v| v.version)
                .collect();
            assert_eq!(certs, vec!["v1".to_string(), winner.to_string()]);
            let secrets: Vec<String> = tx
                .kv_versions("kv1", "secrets", "c")
                .await
                .unwrap()
                .into_iter()
                .map(|v| v.version)
                .collect();
            assert_eq!(
                secrets,
                vec![winner.to_string()],
                "the losers' too are gone"
            );
            assert_eq!(
                tx.kv_name("kv1", "certificates", "c")
                    .await
                    .unwrap()
                    .unwrap()
                    .extra,
                serde_json::json!({ "by": winner })
            );
        }
        other => panic!("no case {other}"),
    }
}

#[test]
fn postgres_two_processes_keep_the_rules() {
    let Some(pg) = PgServer::start() else { return };
    let rt = rt();
    run_cases(&mut || rt.block_on(pg.database()));
}

#[test]
fn sqlite_two_processes_keep_the_rules() {
    let dir = tempfile::tempdir().unwrap();
    let mut n = 0;
    run_cases(&mut || {
        n += 1;
        dir.path()
            .join(format!("{n}.db"))
            .to_string_lossy()
            .into_owned()
    });
}
