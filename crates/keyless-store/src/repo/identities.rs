//! Identities (user- and system-assigned), their federated identity credentials and their
//! federated identity credential patterns.

use crate::store::{json, lower, parse};
use crate::*;

impl Tx {
    /// Insert or replace; returns true when created.
    pub async fn put_identity(&mut self, id: &IdentityRecord) -> Result<bool> {
        self.put_identity_row(id).await
    }

    pub async fn get_identity(&mut self, key: &str) -> Result<Option<IdentityRecord>> {
        self.query_opt("SELECT body FROM identities WHERE key = $1", &params![key])
            .await?
            .map(|r| r.json(0))
            .transpose()
    }

    /// User-assigned identities of a subscription, or of one of its groups, by key.
    pub async fn list_identities(
        &mut self,
        subscription: &str,
        rg: Option<&str>,
    ) -> Result<Vec<IdentityRecord>> {
        let sub = lower(subscription);
        let rows = match rg {
            Some(rg) => {
                self.query(
                    "SELECT body FROM identities
                     WHERE subscription = $1 AND rg_key = $2 AND system_vm IS NULL ORDER BY key",
                    &params![&sub, &lower(rg)],
                )
                .await?
            }
            None => {
                self.query(
                    "SELECT body FROM identities
                     WHERE subscription = $1 AND system_vm IS NULL ORDER BY key",
                    &params![&sub],
                )
                .await?
            }
        };
        rows.iter().map(|r| parse(r.str(0)?)).collect()
    }

    /// Delete a user-assigned identity, remove it from every VM, and delete the role
    /// assignments it holds or that are scoped to it. False for a system-assigned identity
    /// (it goes with its VM).
    pub async fn delete_identity(&mut self, key: &str) -> Result<bool> {
        let user = self
            .query_opt(
                "SELECT 1 FROM identities WHERE key = $1 AND system_vm IS NULL",
                &params![key],
            )
            .await?
            .is_some();
        Ok(user && self.delete_identity_rows(key).await? > 0)
    }

    /// Insert or update a FIC, enforcing `max` per identity and unique issuer+subject. The
    /// identity's row is locked first, so concurrent writers (in any process) count one after
    /// the other. A missing identity is `Conflict::MissingReference`.
    pub async fn put_fic(&mut self, fic: &FicRecord, max: usize) -> Result<FicPut> {
        if !self
            .lock_row("identities", "key", &fic.identity_key)
            .await?
        {
            return Err(StoreError::Conflict(Conflict::MissingReference(format!(
                "identity {} does not exist",
                fic.identity_key
            ))));
        }
        let name_key = lower(&fic.name);
        let existing: Vec<FicRecord> = self
            .query(
                "SELECT body FROM fics WHERE identity_key = $1",
                &params![&fic.identity_key],
            )
            .await?
            .iter()
            .map(|r| parse(r.str(0)?))
            .collect::<Result<_>>()?;
        let is_update = existing.iter().any(|f| lower(&f.name) == name_key);
        if !is_update && existing.len() >= max {
            return Ok(FicPut::LimitReached);
        }
        if existing.iter().any(|f| {
            lower(&f.name) != name_key && f.issuer == fic.issuer && f.subject == fic.subject
        }) {
            return Ok(FicPut::DuplicateIssuerSubject);
        }
        self.execute(
            "INSERT INTO fics(identity_key, name_key, body) VALUES ($1, $2, $3)
             ON CONFLICT(identity_key, name_key) DO UPDATE SET body = excluded.body",
            &params![&fic.identity_key, &name_key, &json(fic)?],
        )
        .await?;
        Ok(if is_update {
            FicPut::Updated
        } else {
            FicPut::Created
        })
    }

    pub async fn get_fic(&mut self, identity_key: &str, name: &str) -> Result<Option<FicRecord>> {
        self.query_opt(
            "SELECT body FROM fics WHERE identity_key = $1 AND name_key = $2",
            &params![identity_key, &lower(name)],
        )
        .await?
        .map(|r| r.json(0))
        .transpose()
    }

    pub async fn list_fics(&mut self, identity_key: &str) -> Result<Vec<FicRecord>> {
        self.query(
            "SELECT body FROM fics WHERE identity_key = $1 ORDER BY name_key",
            &params![identity_key],
        )
        .await?
        .iter()
        .map(|r| parse(r.str(0)?))
        .collect()
    }

    pub async fn delete_fic(&mut self, identity_key: &str, name: &str) -> Result<bool> {
        let n = self
            .execute(
                "DELETE FROM fics WHERE identity_key = $1 AND name_key = $2",
                &params![identity_key, &lower(name)],
            )
            .await?;
        Ok(n > 0)
    }

    /// Insert or update a credential pattern, enforcing `max` per identity and unique issuer +
    /// subject pattern. As [`Tx::put_fic`]: the identity's row is locked first, so concurrent
    /// writers (in any process) count one after the other; a missing identity is
    /// `Conflict::MissingReference`.
    pub async fn put_fic_pattern(&mut self, p: &FicPatternRecord, max: usize) -> Result<FicPut> {
        if !self.lock_row("identities", "key", &p.identity_key).await? {
            return Err(StoreError::Conflict(Conflict::MissingReference(format!(
                "identity {} does not exist",
                p.identity_key
            ))));
        }
        let name_key = lower(&p.name);
        let is_update = self
            .query_opt(
                "SELECT 1 FROM fic_patterns WHERE identity_key = $1 AND name_key = $2",
                &params![&p.identity_key, &name_key],
            )
            .await?
            .is_some();
        if !is_update {
            let count = self
                .query_one(
                    "SELECT COUNT(*) FROM fic_patterns WHERE identity_key = $1",
                    &params![&p.identity_key],
                )
                .await?
                .int(0)?;
            if count as usize >= max {
                return Ok(FicPut::LimitReached);
            }
        }
        if self
            .query_opt(
                "SELECT 1 FROM fic_patterns WHERE identity_key = $1 AND issuer = $2
                 AND subject_pattern = $3 AND name_key <> $4",
                &params![&p.identity_key, &p.issuer, &p.subject_pattern, &name_key],
            )
            .await?
            .is_some()
        {
            return Ok(FicPut::DuplicateIssuerSubject);
        }
        self.execute(
            "INSERT INTO fic_patterns(identity_key, name_key, issuer, subject_pattern, body)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT(identity_key, name_key) DO UPDATE SET issuer = excluded.issuer,
                 subject_pattern = excluded.subject_pattern, body = excluded.body",
            &params![
                &p.identity_key,
                &name_key,
                &p.issuer,
                &p.subject_pattern,
                &json(p)?
            ],
        )
        .await?;
        Ok(if is_update {
            FicPut::Updated
        } else {
            FicPut::Created
        })
    }

    pub async fn get_fic_pattern(
        &mut self,
        identity_key: &str,
        name: &str,
    ) -> Result<Option<FicPatternRecord>> {
        self.query_opt(
            "SELECT body FROM fic_patterns WHERE identity_key = $1 AND name_key = $2",
            &params![identity_key, &lower(name)],
        )
        .await?
        .map(|r| r.json(0))
        .transpose()
    }

    /// An identity's credential patterns, by name.
    pub async fn list_fic_patterns(&mut self, identity_key: &str) -> Result<Vec<FicPatternRecord>> {
        self.query(
            "SELECT body FROM fic_patterns WHERE identity_key = $1 ORDER BY name_key",
            &params![identity_key],
        )
        .await?
        .iter()
        .map(|r| parse(r.str(0)?))
        .collect()
    }

    pub async fn delete_fic_pattern(&mut self, identity_key: &str, name: &str) -> Result<bool> {
        let n = self
            .execute(
                "DELETE FROM fic_patterns WHERE identity_key = $1 AND name_key = $2",
                &params![identity_key, &lower(name)],
            )
            .await?;
        Ok(n > 0)
    }

    /// Remove an identity and what refers to it (host assignments, role assignments it holds
    /// or on its scope, its federated credentials and patterns); the number of identity rows deleted.
    ///
    /// The identity row goes first: a writer that locked it to add something under it (a VM
    /// assignment, a federated credential) has committed by the time this delete proceeds,
    /// so the statements after it see (and remove) what that writer added; a writer that
    /// comes later finds no identity.
    pub(crate) async fn delete_identity_rows(&mut self, key: &str) -> Result<usize> {
        // a principal id never changes once the row exists
        let principal = self
            .query_opt(
                "SELECT principal_id FROM identities WHERE key = $1",
                &params![key],
            )
            .await?
            .map(|r| r.text(0))
            .transpose()?;
        let n = self
            .execute("DELETE FROM identities WHERE key = $1", &params![key])
            .await?;
        if let Some(p) = principal {
            self.execute(
                "DELETE FROM role_assignments WHERE principal_id = $1",
                &params![&lower(&p)],
            )
            .await?;
        }
        self.execute(
            "DELETE FROM vm_identities WHERE identity_key = $1",
            &params![key],
        )
        .await?;
        self.execute("DELETE FROM fics WHERE identity_key = $1", &params![key])
            .await?;
        self.execute(
            "DELETE FROM fic_patterns WHERE identity_key = $1",
            &params![key],
        )
        .await?;
        if !key.ends_with("#system") {
            // a user-assigned identity is also a scope; a system identity's scope is its VM's
            self.delete_assignments_under(key).await?;
        }
        Ok(n as usize)
    }

    /// Insert or update an identity row (an update replaces only the body); true when
    /// created.
    pub(crate) async fn put_identity_row(&mut self, id: &IdentityRecord) -> Result<bool> {
        let body = json(id)?;
        let created = self
            .execute(
                "INSERT INTO identities(key, subscription, rg_key, principal_id, client_id, system_vm, body)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT(key) DO NOTHING",
                &params![
                    &id.key,
                    &lower(&id.subscription),
                    &lower(&id.resource_group),
                    &id.principal_id,
                    &id.client_id,
                    id.system_vm.as_deref(),
                    &body
                ],
            )
            .await?
            == 1;
        if !created {
            self.execute(
                "UPDATE identities SET body = $2 WHERE key = $1",
                &params![&id.key, &body],
            )
            .await?;
        }
        Ok(created)
    }
}
