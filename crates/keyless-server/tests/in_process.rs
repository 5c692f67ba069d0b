//! Against a real server state and SQLite store, in process:
//! - the certificate scheduler: a due renewal happens exactly once even when two passes
//!   race, an issuance interrupted by a restart is finished exactly once, and an
//!   `EmailContacts` action is recorded once per version without a new version;
//! - the verified-token cache: a cached token is still checked for audience and time, and a
//!   token with the same claims but another signature is verified on its own.

use keyless_core::clock::{Clock, SystemClock};
use keyless_core::resource_id::{ResourceId, VAULT};
use keyless_core::vault::policy::Policy;
use keyless_server::kv::certs::{self, CertState, Issue, Pending};
use keyless_server::kv::renew::run_once;
use keyless_server::state::AppState;
use keyless_server::vaults::{put_vault, VaultBody};
use keyless_store::{Kek, Store};
use serde_json::json;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The system clock plus a shift the token test moves (the tests in this file share it, and
/// only that test moves it, after it has what it needs).
static CLOCK_SHIFT: AtomicU64 = AtomicU64::new(0);

struct ShiftedClock;

impl Clock for ShiftedClock {
    fn now(&self) -> u64 {
        SystemClock.now() + CLOCK_SHIFT.load(Ordering::SeqCst)
    }
}

async fn server(dir: &std::path::Path) -> Arc<AppState> {
    let mut cfg = keyless_server::Config::new(dir.to_path_buf(), "127.0.0.1:0".parse().unwrap());
    cfg.dev_clock = true;
    cfg.vault_check_interval = std::time::Duration::from_secs(3600);
    let store = Store::sqlite(&dir.join("k.db"), Kek::from_bytes(&[3u8; 32]).unwrap()).unwrap();
    let s = keyless_server::start(cfg, store, Arc::new(ShiftedClock))
        .await
        .unwrap()
        .state;
    let sub = s.subscription_id.clone();
    let mut tx = s.store.write("test_setup").await.unwrap();
    keyless_server::resources::put_resource_group(&s, &mut tx, &sub, "rg", Some("local"), None)
        .await
        .unwrap();
    let body = VaultBody {
        location: Some("local".into()),
        ..Default::default()
    };
    put_vault(
        &s,
        &mut tx,
        &ResourceId::new(&sub, "rg", VAULT, "kv1"),
        body,
        false,
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    s
}

/// How many versions `name` has in collection `coll` of `kv1`.
async fn versions(s: &AppState, coll: &str, name: &str) -> usize {
    let mut tx = s.store.read("test_read").await.unwrap();
    tx.kv_versions("kv1", coll, name).await.unwrap().len()
}

/// The certificate state of `name` in `kv1`.
async fn cert_state(s: &AppState, name: &str) -> CertState {
    let mut tx = s.store.read("test_read").await.unwrap();
    let n = tx
        .kv_name("kv1", "certificates", name)
        .await
        .unwrap()
        .unwrap();
    serde_json::from_value(n.extra).unwrap()
}

/// Issue the first version of certificate `name` in `kv1`; returns its version.
async fn first_version(s: &AppState, name: &str, p: &Policy) -> String {
    certs::issue(
        s,
        Issue {
            vault: "kv1",
            name,
            policy: p,
            enabled: true,
            tags: Default::default(),
            base_version: None,
            state: CertState {
                policy: Some(p.clone()),
                ..Default::default()
            },
            reuse: None,
        },
    )
    .await
    .unwrap()
    .expect("first version")
}

fn one_month_policy() -> Policy {
    serde_json::from_value::<Policy>(json!({
        "issuer": {"name": "Keyless"},
        "x509_props": {"subject": "CN=sched.example", "validity_months": 1},
        "lifetime_actions": [{"trigger": {"days_before_expiry": 7}, "action": {"action_type": "AutoRenew"}}],
    }))
    .unwrap()
    .normalize(true)
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_due_renewal_happens_once_when_two_passes_race() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path()).await;
    let p = one_month_policy();
    let first = first_version(&s, "c1", &p).await;

    // 20 days in: not due
    s.vault_clock.advance(20 * 86_400).unwrap();
    assert_eq!(run_once(&s).await.unwrap().renewed, 0);
    // 25 days in: due; two passes race, one renewal
    s.vault_clock.advance(5 * 86_400).unwrap();
    let (a, b) = tokio::join!(run_once(&s), run_once(&s));
    assert_eq!(a.unwrap().renewed + b.unwrap().renewed, 1);
    let all = {
        let mut tx = s.store.read("test_read").await.unwrap();
        tx.kv_versions("kv1", "certificates", "c1").await.unwrap()
    };
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].version, first);
    // the key and secret versions follow the certificate's
    assert_eq!(versions(&s, "keys", "c1").await, 2);
    assert_eq!(versions(&s, "secrets", "c1").await, 2);
    // and a later pass finds nothing due
    assert_eq!(run_once(&s).await.unwrap().renewed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_issuance_is_finished_once_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path()).await;
    let p = one_month_policy();
    // what a server that stopped right after accepting a create leaves behind
    let st = CertState {
        policy: Some(p),
        pending: Some(Pending {
            request_id: "r1".into(),
            status: "inProgress".into(),
            issuer: "Keyless".into(),
            started: 0,
            ..Default::default()
        }),
        events: vec![],
    };
    let mut tx = s.store.write("test_setup").await.unwrap();
    tx.kv_set_extra("kv1", "certificates", "c2", &json!(st))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    run_once(&s).await.unwrap();
    run_once(&s).await.unwrap();
    assert_eq!(versions(&s, "certificates", "c2").await, 1);
    let after = cert_state(&s, "c2").await;
    assert_eq!(after.pending.unwrap().status, "completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_contacts_is_recorded_once_and_issues_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path()).await;
    let p: Policy = serde_json::from_value::<Policy>(json!({
        "issuer": {"name": "Self"},
        "x509_props": {"subject": "CN=mail.example", "validity_months": 2},
        "lifetime_actions": [{"trigger": {"lifetime_percentage": 50}, "action": {"action_type": "EmailContacts"}}],
    }))
    .unwrap()
    .normalize(true)
    .unwrap();
    first_version(&s, "m1", &p).await;
    s.vault_clock.advance(40 * 86_400).unwrap();
    let first = run_once(&s).await.unwrap();
    let second = run_once(&s).await.unwrap();
    assert_eq!((first.notified, first.renewed), (1, 0));
    assert_eq!((second.notified, second.renewed), (0, 0));
    assert_eq!(versions(&s, "certificates", "m1").await, 1);
    let st = cert_state(&s, "m1").await;
    assert_eq!(st.events.len(), 1);
    assert_eq!(st.events[0]["type"], "CertificateNearExpiry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_tokens_are_still_checked() {
    use keyless_core::claims::{JwtError, Principal};
    use keyless_server::tokens::{mint, verify};
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path()).await;
    let p = Principal::ServicePrincipal {
        object_id: "00000000-0000-0000-0000-0000000000aa".into(),
        client_id: "00000000-0000-0000-0000-0000000000bb".into(),
    };
    let aud = vec!["https://vault.localhost:8443".to_string()];
    let t = mint(&s, &p, &aud[0], 600).unwrap().access_token;
    assert!(verify(&s, &t, &aud).is_ok());
    // second use (from the cache): the audience is checked again
    let other = vec!["https://management.azure.com".to_string()];
    assert!(matches!(verify(&s, &t, &other), Err(JwtError::Audience(_))));
    assert!(verify(&s, &t, &aud).is_ok());
    // same header and claims, another signature: not the cached token
    let (head, sig) = t.rsplit_once('.').unwrap();
    let flipped = if sig.starts_with('A') { "B" } else { "A" };
    let forged = format!("{head}.{flipped}{}", &sig[1..]);
    assert!(matches!(
        verify(&s, &forged, &aud),
        Err(JwtError::Signature)
    ));
    // expiry is checked on every use, cached or not
    let t2 = mint(&s, &p, &aud[0], 600).unwrap().access_token;
    assert!(verify(&s, &t2, &aud).is_ok());
    CLOCK_SHIFT.fetch_add(600 + 301, Ordering::SeqCst);
    assert!(matches!(verify(&s, &t2, &aud), Err(JwtError::Expired)));
}

/// A server stopping hands its singletons over: its rotation lease is released at shutdown
/// (another server sharing the database takes it at its next tick, not when it lapses).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_releases_the_rotation_lease() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg =
        keyless_server::Config::new(dir.path().to_path_buf(), "127.0.0.1:0".parse().unwrap());
    cfg.vault_check_interval = std::time::Duration::from_secs(3600);
    let store = Store::sqlite(
        &dir.path().join("k.db"),
        Kek::from_bytes(&[3u8; 32]).unwrap(),
    )
    .unwrap();
    let srv = keyless_server::start(cfg, store.clone(), Arc::new(SystemClock))
        .await
        .unwrap();
    let me = srv.state.replica_id.clone();
    let now = SystemClock.now();
    let holder = store
        .lease_holder("signing-key-rotation", now)
        .await
        .unwrap();
    assert_eq!(holder.map(|h| h.0), Some(me), "the only server rotates");
    srv.shutdown().await;
    assert_eq!(
        store
            .lease_holder("signing-key-rotation", now)
            .await
            .unwrap(),
        None
    );
}
