//! Store suite cases: meta (instance metadata, sealed blobs, signing keys), and the helpers the
//! other cases of this suite's identity/host/directory areas share.

use crate::case;
use keyless_store::*;

pub const CASES: &[(&str, crate::CaseFn)] = &[
    case!(meta_values_are_replaced),
    case!(secrets_are_sealed_and_kept_once),
    case!(signing_keys_in_activation_order),
    case!(a_read_unit_does_not_write),
    case!(an_uncommitted_unit_leaves_nothing),
];

/// `wtx!(store, |tx| tx.op(..).await)`: run in a write unit of its own, committed when the
/// result is `Ok` (dropped, i.e. rolled back, otherwise, as a request's unit is). Returns the
/// result.
macro_rules! wtx {
    ($s:expr, |$tx:ident| $e:expr) => {{
        let mut $tx = $s.write("test").await.unwrap();
        let out = $e;
        if out.is_ok() {
            $tx.commit().await.unwrap();
        }
        out
    }};
}
pub(crate) use wtx;

/// `rtx!(store, |tx| tx.op(..).await)`: run in a read unit of its own.
macro_rules! rtx {
    ($s:expr, |$tx:ident| $e:expr) => {{
        let mut $tx = $s.read("test").await.unwrap();
        $e
    }};
}
pub(crate) use rtx;

/// Run `n` tasks released together (each opens its own unit of work) and collect what they
/// return, in task order.
pub(crate) async fn concurrently<T, F, Fut>(n: usize, f: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = T> + Send + 'static,
{
    let gate = std::sync::Arc::new(tokio::sync::Barrier::new(n));
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let gate = gate.clone();
            let work = f(i);
            tokio::spawn(async move {
                gate.wait().await;
                work.await
            })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.expect("task"));
    }
    out
}

async fn meta_values_are_replaced(s: Store) {
    assert_eq!(rtx!(s, |tx| tx.get_meta("tenant").await).unwrap(), None);
    wtx!(s, |tx| tx.set_meta("tenant", "t1").await).unwrap();
    wtx!(s, |tx| tx.set_meta("tenant", "t2").await).unwrap();
    assert_eq!(
        rtx!(s, |tx| tx.get_meta("tenant").await)
            .unwrap()
            .as_deref(),
        Some("t2")
    );
}

async fn secrets_are_sealed_and_kept_once(s: Store) {
    let pem = b"-----BEGIN PRIVATE KEY-----".to_vec();
    wtx!(s, |tx| tx.put_secret("ca", &pem).await).unwrap();
    assert_eq!(
        rtx!(s, |tx| tx.get_secret("ca").await).unwrap(),
        Some(pem.clone())
    );
    wtx!(s, |tx| tx.put_secret("ca", b"other").await).unwrap();
    assert_eq!(
        rtx!(s, |tx| tx.get_secret("ca").await).unwrap().unwrap(),
        b"other"
    );
    assert!(wtx!(s, |tx| tx.put_secret_if_absent("k", b"one").await).unwrap());
    assert!(!wtx!(s, |tx| tx.put_secret_if_absent("k", b"two").await).unwrap());
    assert_eq!(
        rtx!(s, |tx| tx.get_secret("k").await).unwrap().unwrap(),
        b"one"
    );
    assert!(wtx!(s, |tx| tx.delete_secret("k").await).unwrap());
    assert!(!wtx!(s, |tx| tx.delete_secret("k").await).unwrap());
    assert!(rtx!(s, |tx| tx.get_secret("k").await).unwrap().is_none());
    // the check value every replica seals and opens
    s.verify_kek().await.unwrap();
    s.verify_kek().await.unwrap();
}

async fn signing_keys_in_activation_order(s: Store) {
    let key = |kid: &str, created: u64, activate_at: u64| SigningKeyRecord {
        kid: kid.into(),
        created,
        activate_at,
        cert_der: vec![0x30, created as u8],
        key_pkcs8: format!("pkcs8 of {kid}").into_bytes(),
    };
    let (later, first, tie) = (key("k2", 5, 100), key("k1", 9, 10), key("k3", 1, 100));
    for k in [&later, &first, &tie] {
        wtx!(s, |tx| tx.insert_signing_key(k).await).unwrap();
    }
    assert!(matches!(
        wtx!(s, |tx| tx.insert_signing_key(&later).await),
        Err(StoreError::Conflict(Conflict::Unique(_)))
    ));
    assert_eq!(
        rtx!(s, |tx| tx.list_signing_keys().await).unwrap(),
        vec![first.clone(), tie.clone(), later.clone()]
    );
    wtx!(s, |tx| tx.delete_signing_key("k3").await).unwrap();
    assert_eq!(
        rtx!(s, |tx| tx.list_signing_keys().await).unwrap(),
        vec![first, later]
    );
}

async fn a_read_unit_does_not_write(s: Store) {
    let mut tx = s.read("test").await.unwrap();
    assert!(!tx.is_write());
    assert!(tx.set_meta("tenant", "t1").await.is_err());
    drop(tx);
    assert_eq!(rtx!(s, |tx| tx.get_meta("tenant").await).unwrap(), None);
}

async fn an_uncommitted_unit_leaves_nothing(s: Store) {
    let mut tx = s.write("test").await.unwrap();
    tx.set_meta("tenant", "t1").await.unwrap();
    assert_eq!(
        tx.get_meta("tenant").await.unwrap().as_deref(),
        Some("t1"),
        "a unit reads its own writes"
    );
    drop(tx);
    assert_eq!(rtx!(s, |tx| tx.get_meta("tenant").await).unwrap(), None);
}
