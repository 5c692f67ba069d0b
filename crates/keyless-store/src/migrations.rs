//! The schema of both backends, in one place: step *n* of SQLite and step *n* of PostgreSQL
//! make the same tables. A database records how many steps ran (SQLite `PRAGMA user_version`,
//! PostgreSQL the table `keyless_schema`); a binary refuses a database newer than itself.
//!
//! PostgreSQL spells SQLite's `INTEGER` as `BIGINT`, `BLOB` as `BYTEA`, and its text columns
//! compare bytewise (`COLLATE "C"`) as SQLite's do, so both sort alike.

/// One schema step for each backend.
pub struct Migration {
    pub sqlite: &'static str,
    pub postgres: &'static str,
}

pub const MIGRATIONS: &[Migration] = &[
    Migration {
        sqlite: r#"
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
        postgres: r#"
CREATE TABLE meta(key TEXT COLLATE "C" PRIMARY KEY, value TEXT COLLATE "C" NOT NULL);
CREATE TABLE secrets(name TEXT COLLATE "C" PRIMARY KEY, sealed BYTEA NOT NULL);
CREATE TABLE signing_keys(kid TEXT COLLATE "C" PRIMARY KEY, created BIGINT NOT NULL, activate_at BIGINT NOT NULL,
    cert_der BYTEA NOT NULL, sealed_key BYTEA NOT NULL);
CREATE TABLE resource_groups(subscription TEXT COLLATE "C" NOT NULL, name_key TEXT COLLATE "C" NOT NULL, body TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY(subscription, name_key));
CREATE TABLE identities(key TEXT COLLATE "C" PRIMARY KEY, subscription TEXT COLLATE "C" NOT NULL, rg_key TEXT COLLATE "C" NOT NULL,
    principal_id TEXT COLLATE "C" NOT NULL UNIQUE, client_id TEXT COLLATE "C" NOT NULL UNIQUE, system_vm TEXT COLLATE "C", body TEXT COLLATE "C" NOT NULL);
CREATE INDEX identities_scope ON identities(subscription, rg_key);
CREATE INDEX identities_system_vm ON identities(system_vm);
CREATE TABLE vms(key TEXT COLLATE "C" PRIMARY KEY, subscription TEXT COLLATE "C" NOT NULL, rg_key TEXT COLLATE "C" NOT NULL, body TEXT COLLATE "C" NOT NULL);
CREATE INDEX vms_scope ON vms(subscription, rg_key);
CREATE TABLE vm_identities(vm_key TEXT COLLATE "C" NOT NULL, identity_key TEXT COLLATE "C" NOT NULL, PRIMARY KEY(vm_key, identity_key));
CREATE INDEX vm_identities_identity ON vm_identities(identity_key);
CREATE TABLE service_principals(client_id TEXT COLLATE "C" PRIMARY KEY, body TEXT COLLATE "C" NOT NULL);
CREATE TABLE join_tokens(hash TEXT COLLATE "C" PRIMARY KEY, vm_key TEXT COLLATE "C" NOT NULL, expires_at BIGINT NOT NULL, used_at BIGINT);
CREATE TABLE host_credentials(fingerprint TEXT COLLATE "C" PRIMARY KEY, vm_key TEXT COLLATE "C" NOT NULL, not_after BIGINT NOT NULL,
    body TEXT COLLATE "C" NOT NULL);
CREATE INDEX host_credentials_vm ON host_credentials(vm_key);
"#,
    },
    Migration {
        sqlite: r#"
CREATE TABLE role_assignments(name TEXT PRIMARY KEY, scope_key TEXT NOT NULL, principal_id TEXT NOT NULL,
    role_guid TEXT NOT NULL, body TEXT NOT NULL);
CREATE INDEX role_assignments_principal ON role_assignments(principal_id);
CREATE INDEX role_assignments_scope ON role_assignments(scope_key);
CREATE UNIQUE INDEX role_assignments_unique ON role_assignments(scope_key, principal_id, role_guid);
ALTER TABLE service_principals ADD COLUMN object_id TEXT;
UPDATE service_principals SET object_id = lower(json_extract(body, '$.object_id'));
CREATE INDEX service_principals_object ON service_principals(object_id);
"#,
        postgres: r#"
CREATE TABLE role_assignments(name TEXT COLLATE "C" PRIMARY KEY, scope_key TEXT COLLATE "C" NOT NULL, principal_id TEXT COLLATE "C" NOT NULL,
    role_guid TEXT COLLATE "C" NOT NULL, body TEXT COLLATE "C" NOT NULL);
CREATE INDEX role_assignments_principal ON role_assignments(principal_id);
CREATE INDEX role_assignments_scope ON role_assignments(scope_key);
CREATE UNIQUE INDEX role_assignments_unique ON role_assignments(scope_key, principal_id, role_guid);
ALTER TABLE service_principals ADD COLUMN object_id TEXT COLLATE "C";
UPDATE service_principals SET object_id = lower(body::json->>'object_id');
CREATE INDEX service_principals_object ON service_principals(object_id);
"#,
    },
    Migration {
        sqlite: r#"
CREATE TABLE vmss_instances(key TEXT PRIMARY KEY, vmss_key TEXT NOT NULL, instance_id INTEGER NOT NULL,
    body TEXT NOT NULL);
CREATE UNIQUE INDEX vmss_instances_id ON vmss_instances(vmss_key, instance_id);
"#,
        postgres: r#"
CREATE TABLE vmss_instances(key TEXT COLLATE "C" PRIMARY KEY, vmss_key TEXT COLLATE "C" NOT NULL, instance_id BIGINT NOT NULL,
    body TEXT COLLATE "C" NOT NULL);
CREATE UNIQUE INDEX vmss_instances_id ON vmss_instances(vmss_key, instance_id);
"#,
    },
    Migration {
        sqlite: r#"
CREATE TABLE fics(identity_key TEXT NOT NULL, name_key TEXT NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY(identity_key, name_key));
"#,
        postgres: r#"
CREATE TABLE fics(identity_key TEXT COLLATE "C" NOT NULL, name_key TEXT COLLATE "C" NOT NULL, body TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY(identity_key, name_key));
"#,
    },
    Migration {
        sqlite: r#"
CREATE TABLE vaults(key TEXT PRIMARY KEY, name_key TEXT NOT NULL UNIQUE, subscription TEXT NOT NULL,
    rg_key TEXT NOT NULL, body TEXT NOT NULL);
CREATE INDEX vaults_scope ON vaults(subscription, rg_key);
CREATE TABLE kv_names(vault TEXT NOT NULL, coll TEXT NOT NULL, name_key TEXT NOT NULL, name TEXT NOT NULL,
    deleted_at INTEGER, purge_at INTEGER, extra TEXT NOT NULL, PRIMARY KEY(vault, coll, name_key));
CREATE TABLE kv_versions(vault TEXT NOT NULL, coll TEXT NOT NULL, name_key TEXT NOT NULL, version TEXT NOT NULL,
    seq INTEGER NOT NULL, body TEXT NOT NULL, sealed BLOB, PRIMARY KEY(vault, coll, name_key, version));
CREATE UNIQUE INDEX kv_versions_seq ON kv_versions(vault, coll, name_key, seq);
"#,
        postgres: r#"
CREATE TABLE vaults(key TEXT COLLATE "C" PRIMARY KEY, name_key TEXT COLLATE "C" NOT NULL UNIQUE, subscription TEXT COLLATE "C" NOT NULL,
    rg_key TEXT COLLATE "C" NOT NULL, body TEXT COLLATE "C" NOT NULL);
CREATE INDEX vaults_scope ON vaults(subscription, rg_key);
CREATE TABLE kv_names(vault TEXT COLLATE "C" NOT NULL, coll TEXT COLLATE "C" NOT NULL, name_key TEXT COLLATE "C" NOT NULL, name TEXT COLLATE "C" NOT NULL,
    deleted_at BIGINT, purge_at BIGINT, extra TEXT COLLATE "C" NOT NULL, PRIMARY KEY(vault, coll, name_key));
CREATE TABLE kv_versions(vault TEXT COLLATE "C" NOT NULL, coll TEXT COLLATE "C" NOT NULL, name_key TEXT COLLATE "C" NOT NULL, version TEXT COLLATE "C" NOT NULL,
    seq BIGINT NOT NULL, body TEXT COLLATE "C" NOT NULL, sealed BYTEA, PRIMARY KEY(vault, coll, name_key, version));
CREATE UNIQUE INDEX kv_versions_seq ON kv_versions(vault, coll, name_key, seq);
"#,
    },
    Migration {
        sqlite: r#"
CREATE TABLE tracked(key TEXT PRIMARY KEY, type_key TEXT NOT NULL, subscription TEXT NOT NULL,
    rg_key TEXT NOT NULL, body TEXT NOT NULL);
CREATE INDEX tracked_scope ON tracked(type_key, subscription, rg_key);
"#,
        postgres: r#"
CREATE TABLE tracked(key TEXT COLLATE "C" PRIMARY KEY, type_key TEXT COLLATE "C" NOT NULL, subscription TEXT COLLATE "C" NOT NULL,
    rg_key TEXT COLLATE "C" NOT NULL, body TEXT COLLATE "C" NOT NULL);
CREATE INDEX tracked_scope ON tracked(type_key, subscription, rg_key);
"#,
    },
    Migration {
        sqlite: r#"
CREATE TABLE clusters(key TEXT PRIMARY KEY, subscription TEXT NOT NULL, rg_key TEXT NOT NULL,
    node_rg_key TEXT NOT NULL, body TEXT NOT NULL);
CREATE INDEX clusters_scope ON clusters(subscription, rg_key);
CREATE UNIQUE INDEX clusters_node_group ON clusters(subscription, node_rg_key);
"#,
        postgres: r#"
CREATE TABLE clusters(key TEXT COLLATE "C" PRIMARY KEY, subscription TEXT COLLATE "C" NOT NULL, rg_key TEXT COLLATE "C" NOT NULL,
    node_rg_key TEXT COLLATE "C" NOT NULL, body TEXT COLLATE "C" NOT NULL);
CREATE INDEX clusters_scope ON clusters(subscription, rg_key);
CREATE UNIQUE INDEX clusters_node_group ON clusters(subscription, node_rg_key);
"#,
    },
    Migration {
        sqlite: r#"
CREATE TABLE activity_log(seq INTEGER PRIMARY KEY AUTOINCREMENT, ts INTEGER NOT NULL,
    subscription TEXT NOT NULL, rg_key TEXT, resource_key TEXT NOT NULL, provider_key TEXT NOT NULL,
    correlation_key TEXT NOT NULL, caller_key TEXT NOT NULL, status_key TEXT NOT NULL, body TEXT NOT NULL);
CREATE INDEX activity_log_ts ON activity_log(ts);
CREATE INDEX activity_log_sub ON activity_log(subscription, seq);
"#,
        postgres: r#"
CREATE TABLE activity_log(seq BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, ts BIGINT NOT NULL,
    subscription TEXT COLLATE "C" NOT NULL, rg_key TEXT COLLATE "C", resource_key TEXT COLLATE "C" NOT NULL, provider_key TEXT COLLATE "C" NOT NULL,
    correlation_key TEXT COLLATE "C" NOT NULL, caller_key TEXT COLLATE "C" NOT NULL, status_key TEXT COLLATE "C" NOT NULL, body TEXT COLLATE "C" NOT NULL);
CREATE INDEX activity_log_ts ON activity_log(ts);
CREATE INDEX activity_log_sub ON activity_log(subscription, seq);
"#,
    },
    Migration {
        sqlite: r#"
CREATE TABLE leases(name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_at INTEGER NOT NULL);
"#,
        postgres: r#"
CREATE TABLE leases(name TEXT COLLATE "C" PRIMARY KEY, holder TEXT COLLATE "C" NOT NULL, expires_at BIGINT NOT NULL);
"#,
    },
    // The change feed (`repo::changes`): one row per change of what servers cache, written in
    // the transaction of the change. `ts` is in milliseconds; `txid` (PostgreSQL only) is the
    // writing transaction's id, so a reader finds rows whose `seq` committed out of order.
    Migration {
        sqlite: r#"
CREATE TABLE changes(seq INTEGER PRIMARY KEY AUTOINCREMENT, ts INTEGER NOT NULL, kind TEXT NOT NULL,
    key TEXT NOT NULL, txid INTEGER);
CREATE INDEX changes_ts ON changes(ts);
"#,
        postgres: r#"
CREATE TABLE changes(seq BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, ts BIGINT NOT NULL, kind TEXT COLLATE "C" NOT NULL,
    key TEXT COLLATE "C" NOT NULL, txid BIGINT);
CREATE INDEX changes_ts ON changes(ts);
CREATE INDEX changes_txid ON changes(txid);
"#,
    },
    // A join retried with the same key: `spent_by` is the SHA-256 of the public key that spent
    // the token and `host_key` the host it made, so a node whose join answer was lost (a
    // server dying after the commit) gets its certificate on retrying before the token expires.
    Migration {
        sqlite: r#"
ALTER TABLE join_tokens ADD COLUMN spent_by TEXT;
ALTER TABLE join_tokens ADD COLUMN host_key TEXT;
"#,
        postgres: r#"
ALTER TABLE join_tokens ADD COLUMN spent_by TEXT COLLATE "C", ADD COLUMN host_key TEXT COLLATE "C";
"#,
    },
    // The Activity Log's order on PostgreSQL (`repo::activity`): `txid` is the id of the
    // transaction that wrote the row, set by the database on every insert (a trigger: rows
    // restored from a backup take the restoring transaction's, never another cluster's); lists
    // go by (txid, seq). Rows written before this step keep 0: below every later one.
    // `written_us` is the database's clock at the insert (µs since the epoch), which bounds how
    // long a row is held back behind an older running transaction. SQLite (one writer, rows
    // visible in `seq` order) has the columns for backups alike and leaves them unused.
    Migration {
        sqlite: r#"
ALTER TABLE activity_log ADD COLUMN txid INTEGER NOT NULL DEFAULT 0;
ALTER TABLE activity_log ADD COLUMN written_us INTEGER NOT NULL DEFAULT 0;
"#,
        postgres: r#"
ALTER TABLE activity_log ADD COLUMN txid BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN written_us BIGINT NOT NULL DEFAULT 0;
CREATE FUNCTION activity_log_txid() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.txid := CAST(CAST(pg_current_xact_id() AS TEXT) AS BIGINT);
    NEW.written_us := CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000 AS BIGINT);
    RETURN NEW;
END
$$;
CREATE TRIGGER activity_log_txid BEFORE INSERT ON activity_log
    FOR EACH ROW EXECUTE FUNCTION activity_log_txid();
CREATE INDEX activity_log_sub_txid ON activity_log(subscription, txid, seq);
DROP INDEX activity_log_sub;
"#,
    },
    // Federated identity credential patterns (issue 15): an identity's subject patterns, with
    // issuer and pattern as columns so a write finds a duplicate without reading every body.
    Migration {
        sqlite: r#"
CREATE TABLE fic_patterns(identity_key TEXT NOT NULL, name_key TEXT NOT NULL, issuer TEXT NOT NULL,
    subject_pattern TEXT NOT NULL, body TEXT NOT NULL, PRIMARY KEY(identity_key, name_key));
"#,
        postgres: r#"
CREATE TABLE fic_patterns(identity_key TEXT COLLATE "C" NOT NULL, name_key TEXT COLLATE "C" NOT NULL, issuer TEXT COLLATE "C" NOT NULL,
    subject_pattern TEXT COLLATE "C" NOT NULL, body TEXT COLLATE "C" NOT NULL, PRIMARY KEY(identity_key, name_key));
"#,
    },
    // Cluster OIDC issuers (issue 15): an issuer id (the server's GUID, in the cluster's
    // `oidcIssuerProfile`) → its cluster and the service-account keys its add-on published
    // (a JWKS `keys` array as JSON, NULL until the first publish) with the service account
    // whose proof a kubelet-identity publish must carry (NULL: the next is trusted on first
    // use); and each cluster's webhook
    // CA (certificate DER, PKCS#8 key sealed with the KEK, bound to `webhook_ca:{cluster_key}`).
    Migration {
        sqlite: r#"
CREATE TABLE oidc_issuers(issuer_id TEXT PRIMARY KEY, cluster_key TEXT NOT NULL, jwks TEXT,
    updated INTEGER NOT NULL, publisher TEXT);
CREATE INDEX oidc_issuers_cluster ON oidc_issuers(cluster_key);
CREATE TABLE webhook_cas(cluster_key TEXT PRIMARY KEY, cert_der BLOB NOT NULL, sealed_key BLOB NOT NULL,
    created INTEGER NOT NULL);
"#,
        postgres: r#"
CREATE TABLE oidc_issuers(issuer_id TEXT COLLATE "C" PRIMARY KEY, cluster_key TEXT COLLATE "C" NOT NULL, jwks TEXT COLLATE "C",
    updated BIGINT NOT NULL, publisher TEXT COLLATE "C");
CREATE INDEX oidc_issuers_cluster ON oidc_issuers(cluster_key);
CREATE TABLE webhook_cas(cluster_key TEXT COLLATE "C" PRIMARY KEY, cert_der BYTEA NOT NULL, sealed_key BYTEA NOT NULL,
    created BIGINT NOT NULL);
"#,
    },
];
