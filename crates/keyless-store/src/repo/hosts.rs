//! Virtual machines and scale sets as hosts: VMs with their identity sets, join tokens, host credentials, scale-set instances.

use crate::repo::groups::keys;
use crate::store::{json, lower, parse};
use crate::*;

impl Tx {
    /// Write a VM, its system identity (created, kept or deleted as `system` says) and its
    /// user-assigned identity set, in one transaction. Returns true when created.
    ///
    /// Every identity of `user_keys` must exist and be user-assigned, else
    /// `Conflict::MissingReference` and nothing is written. Each is locked until the
    /// transaction ends, so a concurrent delete of it either comes first (and this write
    /// fails) or waits and then removes the assignment.
    pub async fn put_vm(
        &mut self,
        vm: &VmRecord,
        system: Option<&IdentityRecord>,
        user_keys: &[String],
    ) -> Result<bool> {
        for k in user_keys {
            let present = self.lock_row("identities", "key", k).await?
                && self
                    .query_opt(
                        "SELECT 1 FROM identities WHERE key = $1 AND system_vm IS NULL",
                        &params![k],
                    )
                    .await?
                    .is_some();
            if !present {
                return Err(StoreError::Conflict(Conflict::MissingReference(format!(
                    "identity {k} does not exist"
                ))));
            }
        }
        let body = json(vm)?;
        let created = self
            .execute(
                "INSERT INTO vms(key, subscription, rg_key, body) VALUES ($1, $2, $3, $4)
                 ON CONFLICT(key) DO NOTHING",
                &params![
                    &vm.key,
                    &lower(&vm.subscription),
                    &lower(&vm.resource_group),
                    &body
                ],
            )
            .await?
            == 1;
        if !created {
            self.execute(
                "UPDATE vms SET body = $2 WHERE key = $1",
                &params![&vm.key, &body],
            )
            .await?;
        }
        match system {
            Some(sys) => {
                self.put_identity_row(sys).await?;
            }
            None => {
                // the type dropped SystemAssigned: the identity and what it holds go
                let system = keys(
                    self,
                    "SELECT key FROM identities WHERE system_vm = $1",
                    &params![&vm.key],
                )
                .await?;
                for k in &system {
                    self.delete_identity_rows(k).await?;
                }
            }
        }
        self.execute(
            "DELETE FROM vm_identities WHERE vm_key = $1",
            &params![&vm.key],
        )
        .await?;
        for k in user_keys {
            self.execute(
                "INSERT INTO vm_identities(vm_key, identity_key) VALUES ($1, $2)
                 ON CONFLICT(vm_key, identity_key) DO NOTHING",
                &params![&vm.key, k],
            )
            .await?;
        }
        Ok(created)
    }

    pub async fn get_vm(&mut self, key: &str) -> Result<Option<VmRecord>> {
        self.query_opt("SELECT body FROM vms WHERE key = $1", &params![key])
            .await?
            .map(|r| r.json(0))
            .transpose()
    }

    pub async fn list_vms(
        &mut self,
        subscription: &str,
        rg: Option<&str>,
    ) -> Result<Vec<VmRecord>> {
        let sub = lower(subscription);
        let rows = match rg {
            Some(rg) => {
                self.query(
                    "SELECT body FROM vms WHERE subscription = $1 AND rg_key = $2 ORDER BY key",
                    &params![&sub, &lower(rg)],
                )
                .await?
            }
            None => {
                self.query(
                    "SELECT body FROM vms WHERE subscription = $1 ORDER BY key",
                    &params![&sub],
                )
                .await?
            }
        };
        rows.iter().map(|r| parse(r.str(0)?)).collect()
    }

    /// Delete a VM, its system identity, its assignments, join tokens and host credentials.
    pub async fn delete_vm(&mut self, key: &str) -> Result<bool> {
        self.delete_vm_rows(key).await
    }

    /// The user-assigned identities assigned to a VM, by key.
    pub async fn vm_user_identities(&mut self, vm_key: &str) -> Result<Vec<IdentityRecord>> {
        self.query(
            "SELECT i.body FROM vm_identities v JOIN identities i ON i.key = v.identity_key
             WHERE v.vm_key = $1 ORDER BY i.key",
            &params![vm_key],
        )
        .await?
        .iter()
        .map(|r| parse(r.str(0)?))
        .collect()
    }

    /// The system-assigned identity of a VM.
    pub async fn vm_system_identity(&mut self, vm_key: &str) -> Result<Option<IdentityRecord>> {
        self.query_opt(
            "SELECT body FROM identities WHERE system_vm = $1",
            &params![vm_key],
        )
        .await?
        .map(|r| r.json(0))
        .transpose()
    }

    pub async fn insert_join_token(
        &mut self,
        hash: &str,
        vm_key: &str,
        expires_at: u64,
    ) -> Result<()> {
        self.hold_host(vm_key).await?;
        self.execute(
            "INSERT INTO join_tokens(hash, vm_key, expires_at) VALUES ($1, $2, $3)",
            &params![hash, vm_key, expires_at],
        )
        .await?;
        Ok(())
    }

    /// Spend a join token. One conditional update does it, so of concurrent consumers (in any
    /// process) exactly one is `Accepted`.
    /// Spend a join token for the public key whose SHA-256 is `spender`. A token this key
    /// spent before answers [`JoinTokenOutcome::Replayed`] until it expires (see
    /// [`Tx::record_join`]); any other spent token is used.
    pub async fn consume_join_token(
        &mut self,
        hash: &str,
        now: u64,
        spender: &str,
    ) -> Result<JoinTokenOutcome> {
        let spent = self
            .execute(
                "UPDATE join_tokens SET used_at = $2, spent_by = $3
                 WHERE hash = $1 AND used_at IS NULL AND expires_at > $2",
                &params![hash, now, spender],
            )
            .await?
            == 1;
        let Some(row) = self
            .query_opt(
                "SELECT vm_key, used_at, expires_at, spent_by, host_key FROM join_tokens WHERE hash = $1",
                &params![hash],
            )
            .await?
        else {
            return Ok(JoinTokenOutcome::Unknown);
        };
        let vm_key = row.text(0)?;
        Ok(if spent {
            JoinTokenOutcome::Accepted { vm_key }
        } else if row.opt_int(1)?.is_some() {
            let live = row.int(2)? > now as i64;
            match (row.opt_text(3)?, row.opt_text(4)?) {
                (Some(by), Some(host_key)) if live && by == spender => {
                    JoinTokenOutcome::Replayed { vm_key, host_key }
                }
                _ => JoinTokenOutcome::AlreadyUsed,
            }
        } else {
            JoinTokenOutcome::Expired
        })
    }

    /// The host a join token made (the VM's key, or its new scale set instance's), for a retry
    /// of the same join ([`JoinTokenOutcome::Replayed`]).
    pub async fn record_join(&mut self, hash: &str, host_key: &str) -> Result<()> {
        self.execute(
            "UPDATE join_tokens SET host_key = $2 WHERE hash = $1",
            &params![hash, host_key],
        )
        .await?;
        Ok(())
    }

    pub async fn insert_host_credential(&mut self, cred: &HostCredentialRecord) -> Result<()> {
        self.hold_host(&cred.vm_key).await?;
        self.execute(
            "INSERT INTO host_credentials(fingerprint, vm_key, not_after, body) VALUES ($1, $2, $3, $4)",
            &params![&cred.fingerprint, &cred.vm_key, cred.not_after, &json(cred)?],
        )
        .await?;
        Ok(())
    }

    pub async fn get_host_credential(
        &mut self,
        fingerprint: &str,
    ) -> Result<Option<HostCredentialRecord>> {
        self.query_opt(
            "SELECT body FROM host_credentials WHERE fingerprint = $1",
            &params![fingerprint],
        )
        .await?
        .map(|r| r.json(0))
        .transpose()
    }

    /// Allocate the next instance of a scale set or pool (ids are never reused, even after
    /// deletes); with `limit`, fail with `Conflict::GroupFull` when the group already has that
    /// many. The scale set (a row of `vms`) must exist (`Conflict::MissingReference`); its row
    /// is locked first, so concurrent allocations (in any process) count and number one after
    /// the other, and a concurrent delete of the scale set either comes first or removes the
    /// new instance too.
    pub async fn create_instance(
        &mut self,
        vmss_key: &str,
        vmss_resource_id: &str,
        now: u64,
        limit: Option<u64>,
    ) -> Result<InstanceRecord> {
        if !self.lock_row("vms", "key", vmss_key).await? {
            return Err(StoreError::Conflict(Conflict::MissingReference(format!(
                "scale set {vmss_key} does not exist"
            ))));
        }
        let r = self
            .query_one(
                "SELECT count(*), COALESCE(MAX(instance_id) + 1, 0) FROM vmss_instances
                 WHERE vmss_key = $1",
                &params![vmss_key],
            )
            .await?;
        let (count, max_next) = (r.u64(0)?, r.u64(1)?);
        if limit.is_some_and(|l| count >= l) {
            return Err(StoreError::Conflict(Conflict::GroupFull));
        }
        // the next id outlives the instances: a deleted instance's id (and with it its
        // credentials' subject) is not handed out again
        let seq_key = format!("instance_seq:{vmss_key}");
        let seq = self
            .get_meta(&seq_key)
            .await?
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|e| StoreError::Corrupt(format!("{seq_key}: {e}")))
            })
            .transpose()?
            .unwrap_or(0);
        let next = seq.max(max_next);
        self.set_meta(&seq_key, &(next + 1).to_string()).await?;
        let resource_id = format!("{vmss_resource_id}/virtualMachines/{next}");
        let rec = InstanceRecord {
            key: lower(&resource_id),
            vmss_key: vmss_key.to_string(),
            instance_id: next,
            resource_id,
            vm_id: format!("{:08x}-0000-4000-8000-{:012x}", now as u32, next),
            created: now,
        };
        self.execute(
            "INSERT INTO vmss_instances(key, vmss_key, instance_id, body) VALUES ($1, $2, $3, $4)",
            &params![&rec.key, &rec.vmss_key, next, &json(&rec)?],
        )
        .await?;
        Ok(rec)
    }

    pub async fn get_instance(&mut self, key: &str) -> Result<Option<InstanceRecord>> {
        self.query_opt(
            "SELECT body FROM vmss_instances WHERE key = $1",
            &params![key],
        )
        .await?
        .map(|r| r.json(0))
        .transpose()
    }

    pub async fn list_instances(&mut self, vmss_key: &str) -> Result<Vec<InstanceRecord>> {
        self.query(
            "SELECT body FROM vmss_instances WHERE vmss_key = $1 ORDER BY instance_id",
            &params![vmss_key],
        )
        .await?
        .iter()
        .map(|r| parse(r.str(0)?))
        .collect()
    }

    /// Delete an instance and revoke its host credentials.
    pub async fn delete_instance(&mut self, key: &str) -> Result<bool> {
        self.execute(
            "DELETE FROM host_credentials WHERE vm_key = $1",
            &params![key],
        )
        .await?;
        let n = self
            .execute("DELETE FROM vmss_instances WHERE key = $1", &params![key])
            .await?;
        Ok(n > 0)
    }

    /// Delete a VM or scale set and what it owns (system identity, instances, credentials,
    /// join tokens, extensions, assignments on its scope). The VM row goes first, so a writer
    /// that locked it (an instance being added) has committed before the rest is removed.
    pub(crate) async fn delete_vm_rows(&mut self, key: &str) -> Result<bool> {
        let n = self
            .execute("DELETE FROM vms WHERE key = $1", &params![key])
            .await?;
        let system = keys(
            self,
            "SELECT key FROM identities WHERE system_vm = $1",
            &params![key],
        )
        .await?;
        for s in &system {
            self.delete_identity_rows(s).await?;
        }
        self.delete_assignments_under(key).await?;
        // a scale set's instances and their host credentials
        self.execute(
            "DELETE FROM host_credentials
             WHERE vm_key IN (SELECT key FROM vmss_instances WHERE vmss_key = $1)",
            &params![key],
        )
        .await?;
        for sql in [
            "DELETE FROM vmss_instances WHERE vmss_key = $1",
            "DELETE FROM vm_identities WHERE vm_key = $1",
            "DELETE FROM join_tokens WHERE vm_key = $1",
            "DELETE FROM host_credentials WHERE vm_key = $1",
            // its extensions (tracked children)
            "DELETE FROM tracked
             WHERE substr(key, 1, length(CAST($1 AS TEXT)) + 1) = CAST($1 AS TEXT) || '/'",
        ] {
            self.execute(sql, &params![key]).await?;
        }
        Ok(n > 0)
    }

    /// The host a join token or credential is for (a VM or scale set, a scale-set or pool
    /// instance, or a pool) must exist, and stays until this unit of work ends: a delete of it
    /// racing on another replica waits, then removes what this one wrote — a credential must
    /// never outlive its host and pass for a host recreated under the same id.
    async fn hold_host(&mut self, key: &str) -> Result<()> {
        for table in ["vms", "vmss_instances", "tracked"] {
            let sql = match self.backend() {
                crate::db::Backend::Sqlite => format!("SELECT 1 FROM {table} WHERE key = $1"),
                crate::db::Backend::Postgres => {
                    format!("SELECT 1 FROM {table} WHERE key = $1 FOR KEY SHARE")
                }
            };
            if self.query_opt(&sql, &params![key]).await?.is_some() {
                return Ok(());
            }
        }
        Err(StoreError::Conflict(Conflict::MissingReference(format!(
            "host {key} does not exist"
        ))))
    }
}
