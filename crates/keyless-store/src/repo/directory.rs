//! The directory (service principals, principal lookups) and role assignments.

use crate::repo::vault::locking;
use crate::store::{json, lower, parse};
use crate::*;

impl Tx {
    pub async fn put_service_principal(&mut self, sp: &ServicePrincipalRecord) -> Result<()> {
        self.execute(
            "INSERT INTO service_principals(client_id, object_id, body) VALUES ($1, $2, $3)
             ON CONFLICT(client_id) DO UPDATE SET body = excluded.body, object_id = excluded.object_id",
            &params![&sp.client_id, &lower(&sp.object_id), &json(sp)?],
        )
        .await?;
        Ok(())
    }

    pub async fn get_service_principal(
        &mut self,
        client_id: &str,
    ) -> Result<Option<ServicePrincipalRecord>> {
        self.query_opt(
            "SELECT body FROM service_principals WHERE client_id = $1",
            &params![&lower(client_id)],
        )
        .await?
        .map(|r| r.json(0))
        .transpose()
    }

    /// What kind of principal an object id names, if it exists.
    pub async fn principal_kind(&mut self, object_id: &str) -> Result<Option<PrincipalKind>> {
        let oid = lower(object_id);
        if self
            .query_opt(
                "SELECT 1 FROM service_principals WHERE object_id = $1",
                &params![&oid],
            )
            .await?
            .is_some()
        {
            return Ok(Some(PrincipalKind::ServicePrincipal));
        }
        Ok(self
            .query_opt(
                "SELECT 1 FROM identities WHERE principal_id = $1",
                &params![&oid],
            )
            .await?
            .map(|_| PrincipalKind::ManagedIdentity))
    }

    /// A principal by object id or by app (client) id.
    pub async fn directory_lookup(&mut self, id: &str) -> Result<Option<DirectoryEntry>> {
        let id = lower(id);
        if let Some(r) = self
            .query_opt(
                "SELECT body FROM service_principals WHERE object_id = $1 OR client_id = $1",
                &params![&id],
            )
            .await?
        {
            let sp: ServicePrincipalRecord = r.json(0)?;
            return Ok(Some(DirectoryEntry {
                object_id: sp.object_id,
                app_id: sp.client_id,
                display_name: sp.display_name,
                kind: PrincipalKind::ServicePrincipal,
                resource_id: None,
            }));
        }
        self.query_opt(
            "SELECT body FROM identities WHERE principal_id = $1 OR client_id = $1",
            &params![&id],
        )
        .await?
        .map(|r| {
            let i: IdentityRecord = r.json(0)?;
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

    /// Insert an assignment unless its name is taken or the principal already has the role at
    /// the scope. Checked first, then inserted with `ON CONFLICT DO NOTHING`: a concurrent
    /// insert of the same name or triple (which the unique indexes refuse) is waited for and
    /// then reported as `NameTaken` / `Duplicate`, as if it had been seen by the check.
    pub async fn insert_role_assignment(
        &mut self,
        ra: &RoleAssignmentRecord,
    ) -> Result<RoleAssignmentInsert> {
        let guid = lower(ra.role_definition_id.rsplit('/').next().unwrap_or_default());
        let (scope, principal) = (lower(&ra.scope), lower(&ra.principal_id));
        for attempt in 0..2 {
            if let Some(r) = self
                .query_opt(
                    "SELECT body FROM role_assignments WHERE name = $1",
                    &params![&ra.name],
                )
                .await?
            {
                return Ok(RoleAssignmentInsert::NameTaken(r.json(0)?));
            }
            if self
                .query_opt(
                    "SELECT 1 FROM role_assignments
                     WHERE scope_key = $1 AND principal_id = $2 AND role_guid = $3",
                    &params![&scope, &principal, &guid],
                )
                .await?
                .is_some()
            {
                return Ok(RoleAssignmentInsert::Duplicate);
            }
            if attempt == 1 {
                break;
            }
            let n = self
                .execute(
                    "INSERT INTO role_assignments(name, scope_key, principal_id, role_guid, body)
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                    &params![&ra.name, &scope, &principal, &guid, &json(ra)?],
                )
                .await?;
            if n == 1 {
                return Ok(RoleAssignmentInsert::Created);
            }
        }
        // a conflicting row was committed and deleted again in between
        Err(db::unique_violation("role_assignments"))
    }

    pub async fn get_role_assignment(
        &mut self,
        name: &str,
    ) -> Result<Option<RoleAssignmentRecord>> {
        self.query_opt(
            "SELECT body FROM role_assignments WHERE name = $1",
            &params![&lower(name)],
        )
        .await?
        .map(|r| r.json(0))
        .transpose()
    }

    pub async fn list_role_assignments(&mut self) -> Result<Vec<RoleAssignmentRecord>> {
        self.query(
            "SELECT body FROM role_assignments ORDER BY scope_key, name",
            &params![],
        )
        .await?
        .iter()
        .map(|r| parse(r.str(0)?))
        .collect()
    }

    /// The assignments a principal holds (the authorization hot path; indexed).
    pub async fn role_assignments_for_principal(
        &mut self,
        principal_id: &str,
    ) -> Result<Vec<RoleAssignmentRecord>> {
        self.query(
            "SELECT body FROM role_assignments WHERE principal_id = $1 ORDER BY name",
            &params![&lower(principal_id)],
        )
        .await?
        .iter()
        .map(|r| parse(r.str(0)?))
        .collect()
    }

    pub async fn delete_role_assignment(
        &mut self,
        name: &str,
    ) -> Result<Option<RoleAssignmentRecord>> {
        let name = lower(name);
        let Some(row) = self
            .query_opt(
                "SELECT body FROM role_assignments WHERE name = $1",
                &params![&name],
            )
            .await?
        else {
            return Ok(None);
        };
        let n = self
            .execute(
                "DELETE FROM role_assignments WHERE name = $1",
                &params![&name],
            )
            .await?;
        // a concurrent delete that won the row reports it; this one found nothing
        if n == 0 {
            return Ok(None);
        }
        row.json(0).map(Some)
    }

    /// Hold the resource group and the resource a scope names (lowercase), `FOR KEY SHARE` on
    /// PostgreSQL (SQLite's writers take turns), until this unit of work ends: a delete of it
    /// racing on another replica waits for this one, then removes what it wrote under the
    /// scope (an assignment must not outlive its scope). False when one of them does not exist.
    /// The root and subscriptions have no row to hold.
    pub async fn hold_scope(&mut self, scope_key: &str) -> Result<bool> {
        let parts: Vec<&str> = scope_key.trim_matches('/').split('/').collect();
        if parts.len() < 4 || parts[0] != "subscriptions" || parts[2] != "resourcegroups" {
            return Ok(true);
        }
        let group = locking(
            self.backend(),
            "SELECT 1 FROM resource_groups WHERE subscription = $1 AND name_key = $2",
            "FOR KEY SHARE",
        );
        if self
            .query_opt(&group, &params![parts[1], parts[3]])
            .await?
            .is_none()
        {
            return Ok(false);
        }
        if parts.len() == 4 {
            return Ok(true);
        }
        for table in ["vms", "identities", "vaults", "clusters", "tracked"] {
            let sql = format!("SELECT 1 FROM {table} WHERE key = $1");
            let sql = locking(self.backend(), &sql, "FOR KEY SHARE");
            if self.query_opt(&sql, &params![scope_key]).await?.is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Hold the principal's row (a managed identity's or an application's) like
    /// [`Tx::hold_scope`]; false when there is none.
    pub async fn hold_principal(&mut self, object_id: &str) -> Result<bool> {
        for sql in [
            "SELECT 1 FROM identities WHERE principal_id = $1",
            "SELECT 1 FROM service_principals WHERE object_id = $1",
        ] {
            let sql = locking(self.backend(), sql, "FOR KEY SHARE");
            if self.query_opt(&sql, &params![object_id]).await?.is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Remove role assignments at or below `scope_key` (lowercase).
    pub(crate) async fn delete_assignments_under(&mut self, scope_key: &str) -> Result<()> {
        self.execute(
            "DELETE FROM role_assignments WHERE scope_key = CAST($1 AS TEXT)
             OR substr(scope_key, 1, length(CAST($1 AS TEXT)) + 1) = CAST($1 AS TEXT) || '/'",
            &params![scope_key],
        )
        .await?;
        Ok(())
    }
}
