//! Leases (a singleton's right to act: key rotation, the Key Vault scheduler) and claims (one
//! writer at a time for a name, answered 409 to the next, as Entra does for the federated
//! credentials of one identity). Both are rows of `leases` with a holder and an expiry, so they
//! hold across processes and a holder that dies frees them when the expiry passes.

use crate::{params, Result, Store, Tx};

impl Store {
    /// Take lease `name` for `holder`, or renew it, until `now + ttl` (seconds). True when
    /// `holder` holds it afterwards: it was free, expired, or already `holder`'s.
    pub async fn try_lease(&self, name: &str, holder: &str, now: u64, ttl: u64) -> Result<bool> {
        let mut tx = self.write("try_lease").await?;
        let n = tx
            .execute(
                "INSERT INTO leases(name, holder, expires_at) VALUES ($1, $2, $3)
                 ON CONFLICT(name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at
                 WHERE leases.holder = excluded.holder OR leases.expires_at <= $4",
                &params![name, holder, now + ttl, now],
            )
            .await?;
        tx.commit().await?;
        Ok(n == 1)
    }

    /// Give lease `name` up if `holder` holds it.
    pub async fn release_lease(&self, name: &str, holder: &str) -> Result<()> {
        let mut tx = self.write("release_lease").await?;
        tx.execute(
            "DELETE FROM leases WHERE name = $1 AND holder = $2",
            &params![name, holder],
        )
        .await?;
        tx.commit().await
    }

    /// Who holds lease `name` and until when, if anyone holds it at `now`.
    pub async fn lease_holder(&self, name: &str, now: u64) -> Result<Option<(String, u64)>> {
        let mut tx = self.read("lease_holder").await?;
        tx.lease_holder(name, now).await
    }

    /// Claim `name` for one write (at most `ttl` seconds, in case this process dies holding
    /// it). `None` when another write holds it.
    pub async fn claim(&self, name: &str, now: u64, ttl: u64) -> Result<Option<Claim>> {
        let holder = format!("claim:{}", uuid::Uuid::new_v4());
        Ok(if self.try_lease(name, &holder, now, ttl).await? {
            Some(Claim {
                store: self.clone(),
                name: name.to_string(),
                holder,
                held: true,
            })
        } else {
            None
        })
    }
}

/// A held claim; released by [`Claim::release`] or, failing that, when dropped.
pub struct Claim {
    store: Store,
    name: String,
    holder: String,
    held: bool,
}

impl Claim {
    pub async fn release(mut self) -> Result<()> {
        self.held = false;
        self.store.release_lease(&self.name, &self.holder).await
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.held {
            return;
        }
        let (store, name, holder) = (
            self.store.clone(),
            std::mem::take(&mut self.name),
            std::mem::take(&mut self.holder),
        );
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = store.release_lease(&name, &holder).await {
                    tracing::warn!(claim = %name, error = %e, "releasing a claim failed; it expires by itself");
                }
            });
        }
    }
}

impl Tx {
    /// Who holds lease `name` and until when, if anyone holds it at `now`, read in this unit of
    /// work (a request that holds one must not wait for a second: the readers are few).
    pub async fn lease_holder(&mut self, name: &str, now: u64) -> Result<Option<(String, u64)>> {
        let row = self
            .query_opt(
                "SELECT holder, expires_at FROM leases WHERE name = $1 AND expires_at > $2",
                &params![name, now],
            )
            .await?;
        row.map(|r| Ok((r.text(0)?, r.u64(1)?))).transpose()
    }
}
