//! Naming rules (Azure's, as documented for each resource type).

use crate::CoreError;

/// Resource group: 1–90 characters; letters (Unicode), digits, `_`, `(`, `)`, `-`, `.`;
/// must not end with `.`.
pub fn validate_resource_group(name: &str) -> Result<(), CoreError> {
    let len = name.chars().count();
    let ok = (1..=90).contains(&len)
        && name
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '_' | '(' | ')' | '-' | '.'))
        && !name.ends_with('.');
    if ok {
        Ok(())
    } else {
        Err(CoreError::InvalidResourceGroupName(name.to_string()))
    }
}

/// User-assigned identity: 3–128 characters; ASCII letters, digits, `-`, `_`; first character
/// a letter or digit.
pub fn validate_identity_name(name: &str) -> Result<(), CoreError> {
    let ok = (3..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(CoreError::InvalidName(format!(
            "Resource name '{name}' is invalid. The name can contain only letters, numbers, \
             underscores and hyphens. The name must start with a letter or number, and be \
             between 3 and 128 characters long."
        )))
    }
}

/// Virtual machine (Linux rules): 1–64 characters; no whitespace or any of
/// `` \/"'[]:|<>+=;,?*@&~!#$%^(){}` ``; must not start with `_` nor end with `.` or `-`.
pub fn validate_vm_name(name: &str) -> Result<(), CoreError> {
    const FORBIDDEN: &str = "\\/\"'[]:|<>+=;,?*@&~!#$%^(){}`";
    let ok = (1..=64).contains(&name.chars().count())
        && !name
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || FORBIDDEN.contains(c))
        && !name.starts_with('_')
        && !name.ends_with('.')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(CoreError::InvalidName(format!(
            "The virtual machine name '{name}' is invalid. Linux VM names may only contain 1-64 \
             letters, numbers, '.', '-' and '_', must not start with '_' and must not end with \
             '.' or '-'."
        )))
    }
}

/// Tags: at most 50, names ≤ 512 characters, values ≤ 256 (ARM limits).
pub fn validate_tags(tags: &std::collections::BTreeMap<String, String>) -> Result<(), CoreError> {
    if tags.len() > 50 {
        return Err(CoreError::InvalidName(
            "The number of tags exceeds the limit of 50.".into(),
        ));
    }
    for (k, v) in tags {
        if k.is_empty()
            || k.chars().count() > 512
            || k.contains(['<', '>', '%', '&', '\\', '?', '/'])
        {
            return Err(CoreError::InvalidName(format!(
                "The tag name '{k}' is invalid."
            )));
        }
        if v.chars().count() > 256 {
            return Err(CoreError::InvalidName(format!(
                "The value of tag '{k}' exceeds 256 characters."
            )));
        }
    }
    Ok(())
}

/// Location: ARM normalises to lowercase without spaces; accept short alphanumeric names.
pub fn normalize_location(location: &str) -> Result<String, CoreError> {
    let norm: String = location
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_ascii_lowercase();
    if norm.is_empty() || norm.len() > 64 || !norm.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(CoreError::InvalidName(format!(
            "The provided location '{location}' is not available for resource type."
        )));
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_groups() {
        for ok in ["a", "rg-1", "my_rg(2).x", "한국", &"a".repeat(90)] {
            assert!(validate_resource_group(ok).is_ok(), "{ok}");
        }
        for bad in ["", "rg.", "a b", "rg/x", &"a".repeat(91), "rg#"] {
            assert!(validate_resource_group(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn identities() {
        for ok in ["abc", "my-id_1", "1ab", &"a".repeat(128)] {
            assert!(validate_identity_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "ab",
            "-abc",
            "_abc",
            "a b c",
            "abc.",
            "idé",
            &"a".repeat(129),
        ] {
            assert!(validate_identity_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn vms() {
        for ok in ["vm1", "my.vm-1", "a", "vm_x"] {
            assert!(validate_vm_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "_vm",
            "vm.",
            "vm-",
            "vm 1",
            "vm/1",
            "vm@x",
            &"a".repeat(65),
        ] {
            assert!(validate_vm_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn locations_and_tags() {
        assert_eq!(normalize_location("West US").unwrap(), "westus");
        assert!(normalize_location("").is_err());
        assert!(normalize_location("x/y").is_err());
        let mut t = std::collections::BTreeMap::new();
        t.insert("env".to_string(), "dev".to_string());
        assert!(validate_tags(&t).is_ok());
        t.insert("k".to_string(), "v".repeat(257));
        assert!(validate_tags(&t).is_err());
    }
}
