//! Managed cluster persistence (`Microsoft.ContainerService/managedClusters`): the cluster,
//! and what it owns, written together — its node resource group, its system identity, the
//! kubelet identity and one scale set per agent pool with the identities its nodes hold.

use crate::{IdentityRecord, ResourceGroupRecord, VmRecord};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A managed cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterRecord {
    /// Lookup key (lowercase canonical id).
    pub key: String,
    pub resource_id: String,
    pub name: String,
    pub subscription: String,
    pub resource_group: String,
    pub location: String,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// The node resource group's name (as created).
    pub node_resource_group: String,
    /// `SystemAssigned` or `UserAssigned`.
    pub identity_type: String,
    /// For `UserAssigned`: the key of the cluster's identity.
    pub user_identity: Option<String>,
    /// Key of the kubelet identity (a user-assigned identity in the node resource group).
    pub kubelet_identity: String,
    /// The digits in the pool scale set names (`aks-{pool}-{suffix}-vmss`).
    pub suffix: String,
    /// `properties` as stored: what the caller sent (read-only fields dropped) with the pod
    /// identity states the server keeps.
    pub properties: serde_json::Value,
    /// Incremented by every write; writes name the version they read.
    pub version: u64,
    pub created: u64,
}

/// A cluster write: everything in one transaction.
#[derive(Debug, Clone)]
pub struct ClusterWrite<'a> {
    pub cluster: &'a ClusterRecord,
    /// The stored version this write was computed from; `None`: the cluster must not exist.
    pub expect_version: Option<u64>,
    /// The node resource group, created when absent. On create it must not exist yet.
    pub node_group: &'a ResourceGroupRecord,
    /// The system identity (kept when present, else created); `None` deletes it.
    pub system_identity: Option<&'a IdentityRecord>,
    /// The kubelet identity, created when absent (never replaced).
    pub kubelet_identity: &'a IdentityRecord,
    /// Every pool's scale set with the keys of the user-assigned identities it holds
    /// (each must exist).
    pub scale_sets: &'a [(VmRecord, Vec<String>)],
    /// Scale sets of removed pools (deleted with their instances and credentials).
    pub removed_scale_sets: &'a [String],
    /// Keys of the scale sets of pools this write adds. A record already stored under such a
    /// key is not the cluster's: it is deleted first, with its instances, credentials, join
    /// tokens and role assignments, so a new pool never adopts another scale set's nodes.
    pub new_scale_sets: &'a [String],
}

/// Outcome of a [`ClusterWrite`] or a status update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterPut {
    Created,
    Updated,
    /// The stored version is not the expected one (or the cluster appeared/vanished):
    /// nothing written.
    Stale,
    /// The node resource group of a new cluster exists already: nothing written.
    NodeGroupExists,
}
