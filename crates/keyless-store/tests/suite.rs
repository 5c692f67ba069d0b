//! One store suite, run against SQLite and against a real PostgreSQL server (started here from
//! Debian's binaries; skipped with a message when none is installed, required when CI=true).
//! Every case is an `async fn(Store)`; `suite_sqlite` and `suite_postgres` run all of them, each
//! on a fresh database, and name the case that failed.

use keyless_store::testing::PgServer;
use keyless_store::{Kek, Store};
use std::future::Future;
use std::pin::Pin;

mod cases;

pub type CaseFn = fn(Store) -> Pin<Box<dyn Future<Output = ()> + Send>>;

fn kek() -> Kek {
    Kek::from_bytes(&[7u8; 32]).unwrap()
}

type Make<'a> = dyn FnMut() -> Pin<Box<dyn Future<Output = Store> + 'a>> + 'a;

fn run_all(make: &mut Make<'_>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for (name, case) in cases::all() {
        let store = rt.block_on(make());
        eprintln!("case {name} on {}", store.backend().name());
        rt.block_on(case(store));
    }
}

#[test]
fn suite_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let mut n = 0;
    run_all(&mut || {
        n += 1;
        let path = dir.path().join(format!("{n}.db"));
        Box::pin(async move { Store::sqlite(&path, kek()).unwrap() })
    });
}

#[test]
fn suite_postgres() {
    let Some(pg) = PgServer::start() else { return };
    let pg = &pg;
    run_all(&mut || {
        Box::pin(async move {
            let url = pg.database().await;
            Store::postgres(&keyless_store::postgres::PgOptions::new(url), kek())
                .await
                .unwrap()
        })
    });
}
