//! Accepted `api-version` values per surface. Unknown versions are refused with the service's
//! error (ARM: `InvalidApiVersionParameter`; IMDS: `Bad request. api-version is invalid...`).

/// `Microsoft.ManagedIdentity` (userAssignedIdentities).
pub const MSI: &[&str] = &[
    "2015-08-31-preview",
    "2018-11-30",
    "2021-09-30-preview",
    "2022-01-31-preview",
    "2023-01-31",
    "2023-07-31-preview",
    "2024-11-30",
    "2025-01-31-preview",
    "2025-05-31-preview",
];

/// `Microsoft.Compute` (virtualMachines).
pub const COMPUTE: &[&str] = &[
    "2021-03-01",
    "2021-04-01",
    "2021-07-01",
    "2021-11-01",
    "2022-03-01",
    "2022-08-01",
    "2022-11-01",
    "2023-03-01",
    "2023-07-01",
    "2023-09-01",
    "2024-03-01",
    "2024-07-01",
    "2024-11-01",
    "2025-04-01",
    "2025-11-01",
    "2026-04-01",
];

/// `Microsoft.Batch` (batchAccounts, pools).
pub const BATCH: &[&str] = &[
    "2017-09-01",
    "2018-12-01",
    "2019-08-01",
    "2020-05-01",
    "2020-09-01",
    "2021-01-01",
    "2021-06-01",
    "2022-01-01",
    "2022-06-01",
    "2022-10-01",
    "2023-05-01",
    "2023-11-01",
    "2024-02-01",
    "2024-07-01",
    "2025-06-01",
];

/// `Microsoft.Resources` (subscriptions, resourceGroups).
pub const RESOURCES: &[&str] = &[
    "2016-06-01",
    "2018-05-01",
    "2019-10-01",
    "2020-01-01",
    "2020-06-01",
    "2021-01-01",
    "2021-04-01",
    "2022-01-01",
    "2022-09-01",
    "2022-12-01",
    "2023-07-01",
    "2024-03-01",
    "2024-07-01",
    "2024-11-01",
    "2025-03-01",
    "2025-04-01",
    "2026-06-01",
];

/// `Microsoft.Authorization` (roleAssignments, roleDefinitions).
pub const AUTHORIZATION: &[&str] = &[
    "2015-07-01",
    "2018-01-01-preview",
    "2018-09-01-preview",
    "2020-03-01-preview",
    "2020-04-01-preview",
    "2020-08-01-preview",
    "2020-10-01-preview",
    "2022-01-01-preview",
    "2022-04-01",
    "2022-05-01-preview",
];

/// Instance Metadata Service versions (2017-03-01 … 2025-04-07).
pub const IMDS: &[&str] = &[
    "2017-03-01",
    "2017-04-02",
    "2017-08-01",
    "2017-10-01",
    "2017-12-01",
    "2018-02-01",
    "2018-04-02",
    "2018-10-01",
    "2019-02-01",
    "2019-03-11",
    "2019-04-30",
    "2019-06-01",
    "2019-06-04",
    "2019-08-01",
    "2019-08-15",
    "2019-11-01",
    "2020-06-01",
    "2020-07-15",
    "2020-09-01",
    "2020-10-01",
    "2020-12-01",
    "2021-01-01",
    "2021-02-01",
    "2021-03-01",
    "2021-05-01",
    "2021-08-01",
    "2021-10-01",
    "2021-11-01",
    "2021-11-15",
    "2021-12-13",
    "2022-02-01",
    "2022-03-01",
    "2022-05-01",
    "2022-08-01",
    "2022-11-01",
    "2023-07-01",
    "2023-11-15",
    "2024-03-15",
    "2024-07-17",
    "2025-04-07",
];

/// First IMDS version that serves `/metadata/identity`.
pub const IMDS_IDENTITY_MIN: &str = "2018-02-01";

/// Whether `v` is one of `supported`.
pub fn is_supported(supported: &[&str], v: &str) -> bool {
    supported.contains(&v)
}

/// Whether `v` is a valid IMDS version for the identity endpoint.
pub fn imds_identity_supported(v: &str) -> bool {
    // Dates in ISO form compare lexically.
    is_supported(IMDS, v) && v >= IMDS_IDENTITY_MIN
}

/// The newest three IMDS versions, as IMDS lists them in its error body.
pub fn imds_newest() -> Vec<&'static str> {
    IMDS.iter().rev().take(3).copied().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imds_identity_versions() {
        assert!(imds_identity_supported("2018-02-01"));
        assert!(imds_identity_supported("2019-08-01"));
        assert!(!imds_identity_supported("2017-12-01"));
        assert!(!imds_identity_supported("2019-08-02"));
        assert!(!imds_identity_supported(""));
        assert_eq!(imds_newest()[0], "2025-04-07");
    }

    #[test]
    fn lists_are_sorted_and_unique() {
        for list in [MSI, COMPUTE, RESOURCES, AUTHORIZATION, IMDS] {
            let mut s = list.to_vec();
            s.sort();
            s.dedup();
            assert_eq!(s, list.to_vec());
        }
    }
}
