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

/// `Microsoft.ContainerService` (managedClusters): the stable versions listed in refusals. Any
/// dated version in the range of [`container_service_supported`] is accepted too, so the
/// previews az's aks-preview extension pins (`YYYY-MM-DD-preview`) work.
pub const CONTAINER_SERVICE: &[&str] = &[
    "2019-02-01",
    "2019-06-01",
    "2019-08-01",
    "2019-10-01",
    "2020-01-01",
    "2020-03-01",
    "2020-06-01",
    "2020-09-01",
    "2020-12-01",
    "2021-02-01",
    "2021-05-01",
    "2021-08-01",
    "2021-10-01",
    "2022-01-01",
    "2022-04-01",
    "2022-07-01",
    "2022-09-01",
    "2022-11-01",
    "2023-01-01",
    "2023-04-01",
    "2023-07-01",
    "2023-10-01",
    "2024-01-01",
    "2024-05-01",
    "2024-07-01",
    "2024-09-01",
    "2025-01-01",
    "2025-04-01",
    "2025-07-01",
    "2025-10-01",
    "2026-01-01",
    "2026-04-01",
    "2026-08-01",
];

/// First and last day of the ContainerService versions accepted.
pub const CONTAINER_SERVICE_RANGE: (&str, &str) = ("2019-01-01", "2026-12-31");

/// Whether `v` is a ContainerService api-version Keyless serves: `YYYY-MM-DD` or
/// `YYYY-MM-DD-preview`, a real calendar date within [`CONTAINER_SERVICE_RANGE`] (AKS publishes
/// a stable and a preview version about every month; `azure-mgmt-containerservice` 41.8.0
/// defaults to 2026-08-01).
pub fn container_service_supported(v: &str) -> bool {
    let date = v.strip_suffix("-preview").unwrap_or(v);
    let b = date.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return false;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        date.get(r)
            .filter(|s| s.bytes().all(|c| c.is_ascii_digit()))
            .and_then(|s| s.parse().ok())
    };
    let (Some(y), Some(m), Some(d)) = (num(0..4), num(5..7), num(8..10)) else {
        return false;
    };
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days = match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    (1..=days).contains(&d)
        && date >= CONTAINER_SERVICE_RANGE.0
        && date <= CONTAINER_SERVICE_RANGE.1
}

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
    // ARM compares api-versions without case (`2022-01-31-PREVIEW`, as seed 003's template has it)
    supported.iter().any(|s| s.eq_ignore_ascii_case(v))
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
    fn container_service_versions() {
        for v in CONTAINER_SERVICE {
            assert!(container_service_supported(v), "{v}");
        }
        assert!(container_service_supported("2026-08-01"));
        assert!(container_service_supported("2021-03-01"));
        assert!(container_service_supported("2024-06-02-preview"));
        assert!(container_service_supported("2024-02-29"));
        assert!(!container_service_supported("2023-02-29"));
        assert!(!container_service_supported("2018-12-01"));
        assert!(!container_service_supported("2027-01-01"));
        assert!(!container_service_supported("2024-13-01"));
        assert!(!container_service_supported("2024-01-01-beta"));
        assert!(!container_service_supported("2024-1-01"));
        assert!(!container_service_supported(""));
    }

    #[test]
    fn lists_are_sorted_and_unique() {
        for list in [
            MSI,
            COMPUTE,
            RESOURCES,
            AUTHORIZATION,
            IMDS,
            CONTAINER_SERVICE,
        ] {
            let mut s = list.to_vec();
            s.sort();
            s.dedup();
            assert_eq!(s, list.to_vec());
        }
    }
}
