//! The embedded SQLite backend: one file, WAL mode, migrations embedded and applied at open.

use crate::*;
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use std::path::Path;
use std::sync::Mutex;

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE secrets(name TEXT PRIMARY KEY, sealed BLOB NOT NULL);
CREATE TABLE signing_keys(kid TEXT PRIMARY KEY, created INTEGER NOT NULL, activate_at INTEGER NOT NULL,
    cert_der BLOB NOT NULL, sealed_key BLOB NOT NULL);
CREATE TABLE resource_groups(subscription TEXT NOT NULL, name_key TEXT NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY(subscription, name_key));
CREATE TABLE identities(key TEXT PRIMARY KEY, subscription TEXT NOT NULL, rg_key TEXT NOT NULL,
    principal_id TEXT NOT NULL UNIQUE, client_id TEXT NOT NULL UNIQUE, system_vm TEXT, body TEXT NOT NULL);
CREATE INDEX identities_scope ON identities(subscription, rg_key);
CREATE INDEX identities_system_vm ON identities(system_vm);
CREATE TABLE vms(key TEXT PRIMARY KEY, subscription TEXT NOT NULL, rg_key TEXT NOT NULL, body TEXT NOT NULL);
CREATE INDEX vms_scope ON vms(subscription, rg_key);
CREATE TABLE vm_identities(vm_key TEXT NOT NULL, identity_key TEXT NOT NULL, PRIMARY KEY(vm_key, identity_key));
CREATE INDEX vm_identities_identity ON vm_identities(identity_key);
CREATE TABLE service_principals(client_id TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE join_tokens(hash TEXT PRIMARY KEY, vm_key TEXT NOT NULL, expires_at INTEGER NOT NULL, used_at INTEGER);
CREATE TABLE host_credentials(fingerprint TEXT PRIMARY KEY, vm_key TEXT NOT NULL, not_after INTEGER NOT NULL,
    body TEXT NOT NULL);
CREATE INDEX host_credentials_vm ON host_credentials(vm_key);
"#,
    r#"
CREATE TABLE role_assignments(name TEXT PRIMARY KEY, scope_key TEXT NOT NULL, principal_id TEXT NOT NULL,
    role_guid TEXT NOT NULL, body TEXT NOT NULL);
CREATE INDEX role_assignments_principal ON role_assignments(principal_id);
CREATE INDEX role_assignments_scope ON role_assignments(scope_key);
CREATE UNIQUE INDEX role_assignments_unique ON role_assignments(scope_key, principal_id, role_guid);
ALTER TABLE service_principals ADD COLUMN object_id TEXT;
UPDATE service_principals SET object_id = lower(json_extract(body, '$.object_id'));
CREATE INDEX service_principals_object ON service_principals(object_id);
"#,
    r#"
CREATE TABLE vmss_instances(key TEXT PRIMARY KEY, vmss_key TEXT NOT NULL, instance_id INTEGER NOT NULL,
    body TEXT NOT NULL);
CREATE UNIQUE INDEX vmss_instances_id ON vmss_instances(vmss_key, instance_id);
"#,
    r#"
CREATE TABLE fics(identity_key TEXT NOT NULL, name_key TEXT NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY(identity_key, name_key));
"#,
];

/// SQLite implementation of [`Store`].
pub struct SqliteStore {
    conn: Mutex<Connection>,
    kek: Kek,
}

fn json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn parse<T: serde::de::DeserializeOwned>(s: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn lower(s: &str) -> String {
    s.to_ascii_lowercase()
}

impl SqliteStore {
    /// Open (creating if needed) the database at `path` and apply pending migrations.
    pub fn open(path: &Path, kek: Kek) -> Result<Self> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let store = Self {
            conn: Mutex::new(conn),
            kek,
        };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&self) -> Result<()> {
        let mut conn = self.lock();
        let done: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if done as usize > MIGRATIONS.len() {
            return Err(StoreError::Corrupt(format!(
                "database schema version {done} is newer than this binary ({})",
                MIGRATIONS.len()
            )));
        }
        for (i, m) in MIGRATIONS.iter().enumerate().skip(done as usize) {
            let tx = conn.transaction()?;
            tx.execute_batch(m)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves the connection usable (SQLite rolls back).
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn tx<T>(&self, f: impl FnOnce(&Transaction<'_>) -> Result<T>) -> Result<T> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }
}

/// Remove role assignments at or below `scope_key` (lowercase).
fn delete_assignments_under(tx: &Transaction<'_>, scope_key: &str) -> Result<()> {
    tx.execute(
        "DELETE FROM role_assignments WHERE scope_key = ?1 OR substr(scope_key, 1, length(?1) + 1) = ?1 || '/'",
        [scope_key],
    )?;
    Ok(())
}

/// Remove an identity and what refers to it: its assignments to hosts, the role assignments
/// it holds and those on its scope.
fn delete_identity_rows(tx: &Transaction<'_>, key: &str) -> Result<usize> {
    let principal: Option<String> = tx
        .query_row(
            "SELECT principal_id FROM identities WHERE key = ?1",
            [key],
            |r| r.get(0),
        )
        .optional()?;
    if let Some(p) = principal {
        tx.execute(
            "DELETE FROM role_assignments WHERE principal_id = ?1",
            [p.to_ascii_lowercase()],
        )?;
    }
    tx.execute("DELETE FROM vm_identities WHERE identity_key = ?1", [key])?;
    tx.execute("DELETE FROM fics WHERE identity_key = ?1", [key])?;
    if !key.ends_with("#system") {
        // a user-assigned identity is also a scope; a system identity's scope is its VM's
        delete_assignments_under(tx, key)?;
    }
    Ok(tx.execute("DELETE FROM identities WHERE key = ?1", [key])?)
}

fn delete_vm_tx(tx: &Transaction<'_>, key: &str) -> Result<bool> {
    let n = tx.execute("DELETE FROM vms WHERE key = ?1", [key])?;
    let system: Vec<String> = {
        let mut st = tx.prepare("SELECT key FROM identities WHERE system_vm = ?1")?;
        let rows = st.query_map([key], |r| r.get(0))?;
        rows.collect::<std::result::Result<_, _>>()?
    };
    for s in &system {
        delete_identity_rows(tx, s)?;
    }
    delete_assignments_under(tx, key)?;
    // a scale set's instances and their host credentials
    tx.execute(
        "DELETE FROM host_credentials WHERE vm_key IN (SELECT key FROM vmss_instances WHERE vmss_key = ?1)",
        [key],
    )?;
    tx.execute("DELETE FROM vmss_instances WHERE vmss_key = ?1", [key])?;
    tx.execute("DELETE FROM vm_identities WHERE vm_key = ?1", [key])?;
    tx.execute("DELETE FROM join_tokens WHERE vm_key = ?1", [key])?;
    tx.execute("DELETE FROM host_credentials WHERE vm_key = ?1", [key])?;
    Ok(n > 0)
}

fn put_identity_tx(tx: &Transaction<'_>, id: &IdentityRecord) -> Result<bool> {
    let existed: bool = tx
        .query_row("SELECT 1 FROM identities WHERE key = ?1", [&id.key], |_| {
            Ok(())
        })
        .optional()?
        .is_some();
    tx.execute(
        "INSERT INTO identities(key, subscription, rg_key, principal_id, client_id, system_vm, body)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT(key) DO UPDATE SET body = excluded.body",
        params![
            id.key,
            lower(&id.subscription),
            lower(&id.resource_group),
            id.principal_id,
            id.client_id,
            id.system_vm,
            json(id)?
        ],
    )?;
    Ok(!existed)
}

impl Store for SqliteStore {
    fn get_meta(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .lock()
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    }

    fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        self.lock().execute(
            "INSERT INTO meta(key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [key, value],
        )?;
        Ok(())
    }

    fn put_secret(&self, name: &str, plaintext: &[u8]) -> Result<()> {
        let sealed = self.kek.seal(&format!("secret:{name}"), plaintext)?;
        self.lock().execute(
            "INSERT INTO secrets(name, sealed) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET sealed = excluded.sealed",
            params![name, sealed],
        )?;
        Ok(())
    }

    fn get_secret(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let sealed: Option<Vec<u8>> = self
            .lock()
            .query_row("SELECT sealed FROM secrets WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()?;
        sealed
            .map(|s| self.kek.open(&format!("secret:{name}"), &s))
            .transpose()
    }

    fn insert_signing_key(&self, k: &SigningKeyRecord) -> Result<()> {
        let sealed = self
            .kek
            .seal(&format!("signing_key:{}", k.kid), &k.key_pkcs8)?;
        self.lock().execute(
            "INSERT INTO signing_keys(kid, created, activate_at, cert_der, sealed_key) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![k.kid, k.created as i64, k.activate_at as i64, k.cert_der, sealed],
        )?;
        Ok(())
    }

    fn list_signing_keys(&self) -> Result<Vec<SigningKeyRecord>> {
        let conn = self.lock();
        let mut st = conn.prepare(
            "SELECT kid, created, activate_at, cert_der, sealed_key FROM signing_keys ORDER BY activate_at, created",
        )?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, Vec<u8>>(3)?,
                r.get::<_, Vec<u8>>(4)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (kid, created, activate_at, cert_der, sealed) = row?;
            let key_pkcs8 = self.kek.open(&format!("signing_key:{kid}"), &sealed)?;
            out.push(SigningKeyRecord {
                kid,
                created: created as u64,
                activate_at: activate_at as u64,
                cert_der,
                key_pkcs8,
            });
        }
        Ok(out)
    }

    fn delete_signing_key(&self, kid: &str) -> Result<()> {
        self.lock()
            .execute("DELETE FROM signing_keys WHERE kid = ?1", [kid])?;
        Ok(())
    }

    fn put_resource_group(&self, rg: &ResourceGroupRecord) -> Result<bool> {
        self.tx(|tx| {
            let key = (lower(&rg.subscription), lower(&rg.name));
            let existing: Option<String> = tx
                .query_row(
                    "SELECT body FROM resource_groups WHERE subscription = ?1 AND name_key = ?2",
                    [&key.0, &key.1],
                    |r| r.get(0),
                )
                .optional()?;
            // The group keeps the name it was created with.
            let mut rec = rg.clone();
            if let Some(body) = &existing {
                let old: ResourceGroupRecord = parse(body)?;
                rec.name = old.name;
            }
            tx.execute(
                "INSERT INTO resource_groups(subscription, name_key, body) VALUES (?1, ?2, ?3)
                 ON CONFLICT(subscription, name_key) DO UPDATE SET body = excluded.body",
                params![key.0, key.1, json(&rec)?],
            )?;
            Ok(existing.is_none())
        })
    }

    fn get_resource_group(
        &self,
        subscription: &str,
        name: &str,
    ) -> Result<Option<ResourceGroupRecord>> {
        let body: Option<String> = self
            .lock()
            .query_row(
                "SELECT body FROM resource_groups WHERE subscription = ?1 AND name_key = ?2",
                [lower(subscription), lower(name)],
                |r| r.get(0),
            )
            .optional()?;
        body.map(|b| parse(&b)).transpose()
    }

    fn list_resource_groups(&self, subscription: &str) -> Result<Vec<ResourceGroupRecord>> {
        let conn = self.lock();
        let mut st = conn.prepare(
            "SELECT body FROM resource_groups WHERE subscription = ?1 ORDER BY name_key",
        )?;
        let rows = st.query_map([lower(subscription)], |r| r.get::<_, String>(0))?;
        rows.map(|b| parse(&b?)).collect()
    }

    fn delete_resource_group(&self, subscription: &str, name: &str) -> Result<bool> {
        let (sub, rg) = (lower(subscription), lower(name));
        self.tx(|tx| {
            let vms: Vec<String> = {
                let mut st =
                    tx.prepare("SELECT key FROM vms WHERE subscription = ?1 AND rg_key = ?2")?;
                let rows = st.query_map([&sub, &rg], |r| r.get(0))?;
                rows.collect::<std::result::Result<_, _>>()?
            };
            for vm in &vms {
                delete_vm_tx(tx, vm)?;
            }
            let ids: Vec<String> = {
                let mut st = tx.prepare(
                    "SELECT key FROM identities WHERE subscription = ?1 AND rg_key = ?2",
                )?;
                let rows = st.query_map([&sub, &rg], |r| r.get(0))?;
                rows.collect::<std::result::Result<_, _>>()?
            };
            for id in &ids {
                delete_identity_rows(tx, id)?;
            }
            delete_assignments_under(tx, &format!("/subscriptions/{sub}/resourcegroups/{rg}"))?;
            let n = tx.execute(
                "DELETE FROM resource_groups WHERE subscription = ?1 AND name_key = ?2",
                [&sub, &rg],
            )?;
            Ok(n > 0)
        })
    }

    fn put_identity(&self, id: &IdentityRecord) -> Result<bool> {
        self.tx(|tx| put_identity_tx(tx, id))
    }

    fn get_identity(&self, key: &str) -> Result<Option<IdentityRecord>> {
        let body: Option<String> = self
            .lock()
            .query_row("SELECT body FROM identities WHERE key = ?1", [key], |r| {
                r.get(0)
            })
            .optional()?;
        body.map(|b| parse(&b)).transpose()
    }

    fn list_identities(&self, subscription: &str, rg: Option<&str>) -> Result<Vec<IdentityRecord>> {
        let conn = self.lock();
        let sub = lower(subscription);
        let rows: Vec<String> = match rg {
            Some(rg) => {
                let mut st = conn.prepare(
                    "SELECT body FROM identities WHERE subscription = ?1 AND rg_key = ?2 AND system_vm IS NULL ORDER BY key",
                )?;
                let r = st.query_map([sub, lower(rg)], |r| r.get(0))?;
                r.collect::<std::result::Result<_, _>>()?
            }
            None => {
                let mut st = conn.prepare(
                    "SELECT body FROM identities WHERE subscription = ?1 AND system_vm IS NULL ORDER BY key",
                )?;
                let r = st.query_map([sub], |r| r.get(0))?;
                r.collect::<std::result::Result<_, _>>()?
            }
        };
        rows.iter().map(|b| parse(b)).collect()
    }

    fn delete_identity(&self, key: &str) -> Result<bool> {
        self.tx(|tx| {
            let user: bool = tx
                .query_row(
                    "SELECT 1 FROM identities WHERE key = ?1 AND system_vm IS NULL",
                    [key],
                    |_| Ok(()),
                )
                .optional()?
                .is_some();
            Ok(user && delete_identity_rows(tx, key)? > 0)
        })
    }

    fn put_vm(
        &self,
        vm: &VmRecord,
        system: Option<&IdentityRecord>,
        user_keys: &[String],
    ) -> Result<bool> {
        self.tx(|tx| {
            let existed = tx
                .query_row("SELECT 1 FROM vms WHERE key = ?1", [&vm.key], |_| Ok(()))
                .optional()?
                .is_some();
            tx.execute(
                "INSERT INTO vms(key, subscription, rg_key, body) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(key) DO UPDATE SET body = excluded.body",
                params![
                    vm.key,
                    lower(&vm.subscription),
                    lower(&vm.resource_group),
                    json(vm)?
                ],
            )?;
            match system {
                Some(sys) => {
                    put_identity_tx(tx, sys)?;
                }
                None => {
                    // the type dropped SystemAssigned: the identity and what it holds go
                    let system: Option<String> = tx
                        .query_row(
                            "SELECT key FROM identities WHERE system_vm = ?1",
                            [&vm.key],
                            |r| r.get(0),
                        )
                        .optional()?;
                    if let Some(k) = system {
                        delete_identity_rows(tx, &k)?;
                    }
                }
            }
            tx.execute("DELETE FROM vm_identities WHERE vm_key = ?1", [&vm.key])?;
            for k in user_keys {
                let present = tx
                    .query_row(
                        "SELECT 1 FROM identities WHERE key = ?1 AND system_vm IS NULL",
                        [k],
                        |_| Ok(()),
                    )
                    .optional()?
                    .is_some();
                if !present {
                    return Err(StoreError::Conflict(format!("identity {k} does not exist")));
                }
                tx.execute(
                    "INSERT OR IGNORE INTO vm_identities(vm_key, identity_key) VALUES (?1, ?2)",
                    [&vm.key, k],
                )?;
            }
            Ok(!existed)
        })
    }

    fn get_vm(&self, key: &str) -> Result<Option<VmRecord>> {
        let body: Option<String> = self
            .lock()
            .query_row("SELECT body FROM vms WHERE key = ?1", [key], |r| r.get(0))
            .optional()?;
        body.map(|b| parse(&b)).transpose()
    }

    fn list_vms(&self, subscription: &str, rg: Option<&str>) -> Result<Vec<VmRecord>> {
        let conn = self.lock();
        let sub = lower(subscription);
        let rows: Vec<String> = match rg {
            Some(rg) => {
                let mut st = conn.prepare(
                    "SELECT body FROM vms WHERE subscription = ?1 AND rg_key = ?2 ORDER BY key",
                )?;
                let r = st.query_map([sub, lower(rg)], |r| r.get(0))?;
                r.collect::<std::result::Result<_, _>>()?
            }
            None => {
                let mut st =
                    conn.prepare("SELECT body FROM vms WHERE subscription = ?1 ORDER BY key")?;
                let r = st.query_map([sub], |r| r.get(0))?;
                r.collect::<std::result::Result<_, _>>()?
            }
        };
        rows.iter().map(|b| parse(b)).collect()
    }

    fn delete_vm(&self, key: &str) -> Result<bool> {
        self.tx(|tx| delete_vm_tx(tx, key))
    }

    fn vm_user_identities(&self, vm_key: &str) -> Result<Vec<IdentityRecord>> {
        let conn = self.lock();
        let mut st = conn.prepare(
            "SELECT i.body FROM vm_identities v JOIN identities i ON i.key = v.identity_key
             WHERE v.vm_key = ?1 ORDER BY i.key",
        )?;
        let rows = st.query_map([vm_key], |r| r.get::<_, String>(0))?;
        rows.map(|b| parse(&b?)).collect()
    }

    fn vm_system_identity(&self, vm_key: &str) -> Result<Option<IdentityRecord>> {
        let body: Option<String> = self
            .lock()
            .query_row(
                "SELECT body FROM identities WHERE system_vm = ?1",
                [vm_key],
                |r| r.get(0),
            )
            .optional()?;
        body.map(|b| parse(&b)).transpose()
    }

    fn put_service_principal(&self, sp: &ServicePrincipalRecord) -> Result<()> {
        self.lock().execute(
            "INSERT INTO service_principals(client_id, object_id, body) VALUES (?1, ?2, ?3)
             ON CONFLICT(client_id) DO UPDATE SET body = excluded.body, object_id = excluded.object_id",
            params![sp.client_id, lower(&sp.object_id), json(sp)?],
        )?;
        Ok(())
    }

    fn get_service_principal(&self, client_id: &str) -> Result<Option<ServicePrincipalRecord>> {
        let body: Option<String> = self
            .lock()
            .query_row(
                "SELECT body FROM service_principals WHERE client_id = ?1",
                [lower(client_id)],
                |r| r.get(0),
            )
            .optional()?;
        body.map(|b| parse(&b)).transpose()
    }

    fn insert_join_token(&self, hash: &str, vm_key: &str, expires_at: u64) -> Result<()> {
        self.lock().execute(
            "INSERT INTO join_tokens(hash, vm_key, expires_at) VALUES (?1, ?2, ?3)",
            params![hash, vm_key, expires_at as i64],
        )?;
        Ok(())
    }

    fn consume_join_token(&self, hash: &str, now: u64) -> Result<JoinTokenOutcome> {
        self.tx(|tx| {
            let row: Option<(String, i64, Option<i64>)> = tx
                .query_row(
                    "SELECT vm_key, expires_at, used_at FROM join_tokens WHERE hash = ?1",
                    [hash],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()?;
            let Some((vm_key, expires_at, used_at)) = row else {
                return Ok(JoinTokenOutcome::Unknown);
            };
            if used_at.is_some() {
                return Ok(JoinTokenOutcome::AlreadyUsed);
            }
            if (expires_at as u64) <= now {
                return Ok(JoinTokenOutcome::Expired);
            }
            tx.execute(
                "UPDATE join_tokens SET used_at = ?2 WHERE hash = ?1",
                params![hash, now as i64],
            )?;
            Ok(JoinTokenOutcome::Accepted { vm_key })
        })
    }

    fn insert_host_credential(&self, cred: &HostCredentialRecord) -> Result<()> {
        self.lock().execute(
            "INSERT INTO host_credentials(fingerprint, vm_key, not_after, body) VALUES (?1, ?2, ?3, ?4)",
            params![cred.fingerprint, cred.vm_key, cred.not_after as i64, json(cred)?],
        )?;
        Ok(())
    }

    fn get_host_credential(&self, fingerprint: &str) -> Result<Option<HostCredentialRecord>> {
        let body: Option<String> = self
            .lock()
            .query_row(
                "SELECT body FROM host_credentials WHERE fingerprint = ?1",
                [fingerprint],
                |r| r.get(0),
            )
            .optional()?;
        body.map(|b| parse(&b)).transpose()
    }

    fn principal_kind(&self, object_id: &str) -> Result<Option<PrincipalKind>> {
        let conn = self.lock();
        let oid = lower(object_id);
        if conn
            .query_row(
                "SELECT 1 FROM service_principals WHERE object_id = ?1",
                [&oid],
                |_| Ok(()),
            )
            .optional()?
            .is_some()
        {
            return Ok(Some(PrincipalKind::ServicePrincipal));
        }
        let id: Option<Option<String>> = conn
            .query_row(
                "SELECT system_vm FROM identities WHERE lower(principal_id) = ?1",
                [&oid],
                |r| r.get(0),
            )
            .optional()?;
        Ok(id.map(|_| PrincipalKind::ManagedIdentity))
    }

    fn create_instance(
        &self,
        vmss_key: &str,
        vmss_resource_id: &str,
        now: u64,
    ) -> Result<InstanceRecord> {
        self.tx(|tx| {
            let next: i64 = tx.query_row(
                "SELECT COALESCE(MAX(instance_id) + 1, 0) FROM vmss_instances WHERE vmss_key = ?1",
                [vmss_key],
                |r| r.get(0),
            )?;
            let resource_id = format!("{vmss_resource_id}/virtualMachines/{next}");
            let rec = InstanceRecord {
                key: resource_id.to_ascii_lowercase(),
                vmss_key: vmss_key.to_string(),
                instance_id: next as u64,
                resource_id,
                vm_id: format!("{:08x}-0000-4000-8000-{:012x}", now as u32, next),
                created: now,
            };
            tx.execute(
                "INSERT INTO vmss_instances(key, vmss_key, instance_id, body) VALUES (?1, ?2, ?3, ?4)",
                params![rec.key, rec.vmss_key, next, json(&rec)?],
            )?;
            Ok(rec)
        })
    }

    fn get_instance(&self, key: &str) -> Result<Option<InstanceRecord>> {
        let body: Option<String> = self
            .lock()
            .query_row(
                "SELECT body FROM vmss_instances WHERE key = ?1",
                [key],
                |r| r.get(0),
            )
            .optional()?;
        body.map(|b| parse(&b)).transpose()
    }

    fn list_instances(&self, vmss_key: &str) -> Result<Vec<InstanceRecord>> {
        let conn = self.lock();
        let mut st = conn
            .prepare("SELECT body FROM vmss_instances WHERE vmss_key = ?1 ORDER BY instance_id")?;
        let rows = st.query_map([vmss_key], |r| r.get::<_, String>(0))?;
        rows.map(|b| parse(&b?)).collect()
    }

    fn delete_instance(&self, key: &str) -> Result<bool> {
        self.tx(|tx| {
            tx.execute("DELETE FROM host_credentials WHERE vm_key = ?1", [key])?;
            Ok(tx.execute("DELETE FROM vmss_instances WHERE key = ?1", [key])? > 0)
        })
    }

    fn put_fic(&self, fic: &FicRecord, max: usize) -> Result<FicPut> {
        self.tx(|tx| {
            let name_key = lower(&fic.name);
            let existing: Vec<FicRecord> = {
                let mut st = tx.prepare("SELECT body FROM fics WHERE identity_key = ?1")?;
                let rows = st.query_map([&fic.identity_key], |r| r.get::<_, String>(0))?;
                rows.map(|b| parse(&b?)).collect::<Result<_>>()?
            };
            let is_update = existing.iter().any(|f| lower(&f.name) == name_key);
            if !is_update && existing.len() >= max {
                return Ok(FicPut::LimitReached);
            }
            if existing.iter().any(|f| {
                lower(&f.name) != name_key && f.issuer == fic.issuer && f.subject == fic.subject
            }) {
                return Ok(FicPut::DuplicateIssuerSubject);
            }
            tx.execute(
                "INSERT INTO fics(identity_key, name_key, body) VALUES (?1, ?2, ?3)
                 ON CONFLICT(identity_key, name_key) DO UPDATE SET body = excluded.body",
                params![fic.identity_key, name_key, json(fic)?],
            )?;
            Ok(if is_update {
                FicPut::Updated
            } else {
                FicPut::Created
            })
        })
    }

    fn get_fic(&self, identity_key: &str, name: &str) -> Result<Option<FicRecord>> {
        let body: Option<String> = self
            .lock()
            .query_row(
                "SELECT body FROM fics WHERE identity_key = ?1 AND name_key = ?2",
                [identity_key, &lower(name)],
                |r| r.get(0),
            )
            .optional()?;
        body.map(|b| parse(&b)).transpose()
    }

    fn list_fics(&self, identity_key: &str) -> Result<Vec<FicRecord>> {
        let conn = self.lock();
        let mut st =
            conn.prepare_cached("SELECT body FROM fics WHERE identity_key = ?1 ORDER BY name_key")?;
        let rows = st.query_map([identity_key], |r| r.get::<_, String>(0))?;
        rows.map(|b| parse(&b?)).collect()
    }

    fn delete_fic(&self, identity_key: &str, name: &str) -> Result<bool> {
        Ok(self.lock().execute(
            "DELETE FROM fics WHERE identity_key = ?1 AND name_key = ?2",
            [identity_key, &lower(name)],
        )? > 0)
    }

    fn directory_lookup(&self, id: &str) -> Result<Option<DirectoryEntry>> {
        let id = lower(id);
        let sp: Option<String> = self
            .lock()
            .query_row(
                "SELECT body FROM service_principals WHERE object_id = ?1 OR lower(client_id) = ?1",
                [&id],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(b) = sp {
            let sp: ServicePrincipalRecord = parse(&b)?;
            return Ok(Some(DirectoryEntry {
                object_id: sp.object_id,
                app_id: sp.client_id,
                display_name: sp.display_name,
                kind: PrincipalKind::ServicePrincipal,
                resource_id: None,
            }));
        }
        let mi: Option<String> = self
            .lock()
            .query_row(
                "SELECT body FROM identities WHERE lower(principal_id) = ?1 OR lower(client_id) = ?1",
                [&id],
                |r| r.get(0),
            )
            .optional()?;
        mi.map(|b| {
            let i: IdentityRecord = parse(&b)?;
            Ok(DirectoryEntry {
                object_id: i.principal_id,
                app_id: i.client_id,
                display_name: i.name,
                kind: PrincipalKind::ManagedIdentity,
                resource_id: Some(i.resource_id),
            })
        })
        .transpose()
    }

    fn insert_role_assignment(&self, ra: &RoleAssignmentRecord) -> Result<RoleAssignmentInsert> {
        self.tx(|tx| {
            let existing: Option<String> = tx
                .query_row("SELECT body FROM role_assignments WHERE name = ?1", [&ra.name], |r| r.get(0))
                .optional()?;
            if let Some(b) = existing {
                return Ok(RoleAssignmentInsert::NameTaken(parse(&b)?));
            }
            let guid = ra.role_definition_id.rsplit('/').next().unwrap_or_default().to_ascii_lowercase();
            let dup = tx
                .query_row(
                    "SELECT 1 FROM role_assignments WHERE scope_key = ?1 AND principal_id = ?2 AND role_guid = ?3",
                    params![lower(&ra.scope), lower(&ra.principal_id), guid],
                    |_| Ok(()),
                )
                .optional()?
                .is_some();
            if dup {
                return Ok(RoleAssignmentInsert::Duplicate);
            }
            tx.execute(
                "INSERT INTO role_assignments(name, scope_key, principal_id, role_guid, body) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![ra.name, lower(&ra.scope), lower(&ra.principal_id), guid, json(ra)?],
            )?;
            Ok(RoleAssignmentInsert::Created)
        })
    }

    fn get_role_assignment(&self, name: &str) -> Result<Option<RoleAssignmentRecord>> {
        let body: Option<String> = self
            .lock()
            .query_row(
                "SELECT body FROM role_assignments WHERE name = ?1",
                [lower(name)],
                |r| r.get(0),
            )
            .optional()?;
        body.map(|b| parse(&b)).transpose()
    }

    fn list_role_assignments(&self) -> Result<Vec<RoleAssignmentRecord>> {
        let conn = self.lock();
        let mut st = conn.prepare("SELECT body FROM role_assignments ORDER BY scope_key, name")?;
        let rows = st.query_map([], |r| r.get::<_, String>(0))?;
        rows.map(|b| parse(&b?)).collect()
    }

    fn role_assignments_for_principal(
        &self,
        principal_id: &str,
    ) -> Result<Vec<RoleAssignmentRecord>> {
        let conn = self.lock();
        let mut st =
            conn.prepare_cached("SELECT body FROM role_assignments WHERE principal_id = ?1")?;
        let rows = st.query_map([lower(principal_id)], |r| r.get::<_, String>(0))?;
        rows.map(|b| parse(&b?)).collect()
    }

    fn delete_role_assignment(&self, name: &str) -> Result<Option<RoleAssignmentRecord>> {
        self.tx(|tx| {
            let body: Option<String> = tx
                .query_row(
                    "SELECT body FROM role_assignments WHERE name = ?1",
                    [lower(name)],
                    |r| r.get(0),
                )
                .optional()?;
            tx.execute(
                "DELETE FROM role_assignments WHERE name = ?1",
                [lower(name)],
            )?;
            body.map(|b| parse(&b)).transpose()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &Path) -> SqliteStore {
        SqliteStore::open(&dir.join("k.db"), Kek::from_bytes(&[1u8; 32]).unwrap()).unwrap()
    }

    fn ident(name: &str, rg: &str) -> IdentityRecord {
        let rid = format!("/subscriptions/s/resourceGroups/{rg}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}");
        IdentityRecord {
            key: rid.to_lowercase(),
            resource_id: rid,
            name: name.into(),
            subscription: "s".into(),
            resource_group: rg.into(),
            location: "local".into(),
            tags: Default::default(),
            tenant_id: "t".into(),
            principal_id: format!("p-{name}"),
            client_id: format!("c-{name}"),
            system_vm: None,
            created: 1,
        }
    }

    fn vm(name: &str) -> VmRecord {
        let rid = format!(
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/{name}"
        );
        VmRecord {
            key: rid.to_lowercase(),
            resource_id: rid,
            name: name.into(),
            subscription: "s".into(),
            resource_group: "rg".into(),
            location: "local".into(),
            tags: Default::default(),
            vm_id: "v".into(),
            identity_type: "SystemAssigned, UserAssigned".into(),
            properties: serde_json::json!({}),
            created: 1,
        }
    }

    #[test]
    fn migrations_are_idempotent_and_data_survives_reopen() {
        let d = tempfile::tempdir().unwrap();
        {
            let s = store(d.path());
            s.set_meta("tenant", "t1").unwrap();
            s.put_secret("ca", b"-----BEGIN PRIVATE KEY-----").unwrap();
        }
        let s = store(d.path());
        assert_eq!(s.get_meta("tenant").unwrap().as_deref(), Some("t1"));
        assert_eq!(
            s.get_secret("ca").unwrap().unwrap(),
            b"-----BEGIN PRIVATE KEY-----"
        );
        // wrong KEK: reads fail loudly, nothing decrypts
        drop(s);
        let wrong = SqliteStore::open(&d.path().join("k.db"), Kek::from_bytes(&[2u8; 32]).unwrap())
            .unwrap();
        assert!(matches!(wrong.get_secret("ca"), Err(StoreError::Decrypt)));
    }

    #[test]
    fn vm_lifecycle_with_identities() {
        let d = tempfile::tempdir().unwrap();
        let s = store(d.path());
        let u = ident("u1", "rg");
        assert!(s.put_identity(&u).unwrap());
        assert!(!s.put_identity(&u).unwrap());
        let v = vm("vm1");
        let mut sys = ident("vm1", "rg");
        sys.key = format!("{}#system", v.key);
        sys.system_vm = Some(v.key.clone());
        sys.principal_id = "sys-p".into();
        sys.client_id = "sys-c".into();
        assert!(s
            .put_vm(&v, Some(&sys), std::slice::from_ref(&u.key))
            .unwrap());
        assert_eq!(s.vm_user_identities(&v.key).unwrap(), vec![u.clone()]);
        assert_eq!(
            s.vm_system_identity(&v.key).unwrap().unwrap().principal_id,
            "sys-p"
        );
        // system identities are not listed as user-assigned
        assert_eq!(s.list_identities("S", Some("RG")).unwrap().len(), 1);
        // assigning a missing identity fails and changes nothing
        assert!(s.put_vm(&v, Some(&sys), &["nope".into()]).is_err());
        assert_eq!(s.vm_user_identities(&v.key).unwrap().len(), 1);
        // dropping the system identity deletes it
        s.put_vm(&v, None, std::slice::from_ref(&u.key)).unwrap();
        assert!(s.vm_system_identity(&v.key).unwrap().is_none());
        // deleting the user identity removes it from the VM
        assert!(s.delete_identity(&u.key).unwrap());
        assert!(s.vm_user_identities(&v.key).unwrap().is_empty());
        assert!(s.delete_vm(&v.key).unwrap());
        assert!(!s.delete_vm(&v.key).unwrap());
    }

    #[test]
    fn join_tokens_are_single_use() {
        let d = tempfile::tempdir().unwrap();
        let s = store(d.path());
        s.insert_join_token("h", "vm", 100).unwrap();
        assert_eq!(
            s.consume_join_token("x", 10).unwrap(),
            JoinTokenOutcome::Unknown
        );
        assert_eq!(
            s.consume_join_token("h", 10).unwrap(),
            JoinTokenOutcome::Accepted {
                vm_key: "vm".into()
            }
        );
        assert_eq!(
            s.consume_join_token("h", 10).unwrap(),
            JoinTokenOutcome::AlreadyUsed
        );
        s.insert_join_token("h2", "vm", 100).unwrap();
        assert_eq!(
            s.consume_join_token("h2", 100).unwrap(),
            JoinTokenOutcome::Expired
        );
    }

    #[test]
    fn a_failure_mid_transaction_leaves_no_trace() {
        let d = tempfile::tempdir().unwrap();
        let s = store(d.path());
        s.put_resource_group(&ResourceGroupRecord {
            subscription: "s".into(),
            name: "rg".into(),
            location: "local".into(),
            tags: Default::default(),
        })
        .unwrap();
        let (u1, u2) = (ident("u1", "rg"), ident("u2", "rg"));
        s.put_identity(&u1).unwrap();
        s.put_identity(&u2).unwrap();
        let v = vm("vm1");
        s.put_vm(&v, None, std::slice::from_ref(&u1.key)).unwrap();
        // Inject a failure in the middle of the group delete: deleting u2 aborts, after the VM
        // and u1 rows were already deleted inside the same transaction.
        s.lock()
            .execute_batch(&format!(
                "CREATE TRIGGER fail BEFORE DELETE ON identities WHEN old.key = '{}' BEGIN SELECT RAISE(ABORT, 'injected'); END;",
                u2.key
            ))
            .unwrap();
        assert!(s.delete_resource_group("s", "rg").is_err());
        assert!(s.get_vm(&v.key).unwrap().is_some());
        assert!(s.get_identity(&u1.key).unwrap().is_some());
        assert_eq!(s.vm_user_identities(&v.key).unwrap().len(), 1);
        assert!(s.get_resource_group("s", "rg").unwrap().is_some());
        s.lock().execute_batch("DROP TRIGGER fail;").unwrap();
        assert!(s.delete_resource_group("s", "rg").unwrap());
        assert!(s.get_identity(&u1.key).unwrap().is_none());
    }

    #[test]
    fn role_assignments_unique_and_cascading() {
        let d = tempfile::tempdir().unwrap();
        let s = store(d.path());
        let u = ident("u1", "rg");
        s.put_identity(&u).unwrap();
        let ra = |name: &str, scope: &str| {
            RoleAssignmentRecord {
            name: name.into(),
            scope: scope.into(),
            role_definition_id: "/subscriptions/s/providers/Microsoft.Authorization/roleDefinitions/acdd72a7-3385-48ef-bd42-f606fba81ae7".into(),
            principal_id: u.principal_id.clone(),
            principal_type: "ServicePrincipal".into(),
            description: None,
            created: 1,
            created_by: "x".into(),
        }
        };
        assert_eq!(
            s.insert_role_assignment(&ra("a1", "/subscriptions/s/resourceGroups/rg"))
                .unwrap(),
            RoleAssignmentInsert::Created
        );
        assert_eq!(
            s.insert_role_assignment(&ra("a2", "/subscriptions/S/resourcegroups/RG"))
                .unwrap(),
            RoleAssignmentInsert::Duplicate
        );
        assert!(matches!(
            s.insert_role_assignment(&ra("a1", "/subscriptions/s"))
                .unwrap(),
            RoleAssignmentInsert::NameTaken(_)
        ));
        assert_eq!(
            s.insert_role_assignment(&ra("a3", "/subscriptions/s"))
                .unwrap(),
            RoleAssignmentInsert::Created
        );
        assert_eq!(
            s.role_assignments_for_principal(&u.principal_id.to_uppercase())
                .unwrap()
                .len(),
            2
        );
        assert_eq!(
            s.principal_kind(&u.principal_id).unwrap(),
            Some(PrincipalKind::ManagedIdentity)
        );
        assert_eq!(s.principal_kind("nobody").unwrap(), None);
        // deleting the identity deletes what it holds
        assert!(s.delete_identity(&u.key).unwrap());
        assert!(s.list_role_assignments().unwrap().is_empty());
    }

    #[test]
    fn fics_limits_and_uniqueness() {
        let d = tempfile::tempdir().unwrap();
        let s = store(d.path());
        let u = ident("u1", "rg");
        s.put_identity(&u).unwrap();
        let f = |name: &str, sub: &str| FicRecord {
            identity_key: u.key.clone(),
            name: name.into(),
            issuer: "https://issuer.example".into(),
            subject: sub.into(),
            audiences: vec!["api://AzureADTokenExchange".into()],
            description: None,
            created: 1,
        };
        assert_eq!(s.put_fic(&f("a1", "s1"), 2).unwrap(), FicPut::Created);
        assert_eq!(s.put_fic(&f("A1", "s1"), 2).unwrap(), FicPut::Updated);
        assert_eq!(
            s.put_fic(&f("a2", "s1"), 2).unwrap(),
            FicPut::DuplicateIssuerSubject
        );
        assert_eq!(s.put_fic(&f("a2", "s2"), 2).unwrap(), FicPut::Created);
        assert_eq!(s.put_fic(&f("a3", "s3"), 2).unwrap(), FicPut::LimitReached);
        assert_eq!(s.list_fics(&u.key).unwrap().len(), 2);
        assert!(s.delete_fic(&u.key, "A2").unwrap());
        assert!(s.delete_identity(&u.key).unwrap());
        assert!(s.list_fics(&u.key).unwrap().is_empty());
    }

    #[test]
    fn resource_group_delete_cascades() {
        let d = tempfile::tempdir().unwrap();
        let s = store(d.path());
        s.put_resource_group(&ResourceGroupRecord {
            subscription: "s".into(),
            name: "RG".into(),
            location: "local".into(),
            tags: Default::default(),
        })
        .unwrap();
        let u = ident("u1", "rg");
        s.put_identity(&u).unwrap();
        let v = vm("vm1");
        s.put_vm(&v, None, std::slice::from_ref(&u.key)).unwrap();
        s.insert_host_credential(&HostCredentialRecord {
            fingerprint: "f".into(),
            vm_key: v.key.clone(),
            not_after: 10,
            issued: 1,
        })
        .unwrap();
        assert!(s.delete_resource_group("s", "rg").unwrap());
        assert!(s.get_identity(&u.key).unwrap().is_none());
        assert!(s.get_vm(&v.key).unwrap().is_none());
        assert!(s.get_host_credential("f").unwrap().is_none());
        assert!(s.list_resource_groups("s").unwrap().is_empty());
    }
}
