//! The Activity Log (`Microsoft.Insights/eventtypes/management/values`): which control-plane
//! call is which operation, the strict `$filter` / `$select` grammar of the list, and time
//! values. Pure: the server records and the store keeps the events.
//!
//! The `$filter` is what the service documents ("No other syntax is allowed"): clauses joined
//! by `and`; `eventTimestamp ge <time>` is required, `eventTimestamp le <time>` optional (now),
//! plus at most one each of `resourceGroupName`, `resourceUri` (az sends `resourceId`),
//! `resourceProvider`, `correlationId`, `caller`, `status` compared with `eq '…'`. Times come
//! quoted (`'2014-07-16T04:36:37.6407898Z'`, the documented form) or bare (`az` formats
//! `datetime.isoformat()`: `2026-01-01T10:00:00.123456`, no zone = UTC, or `+00:00`).

use crate::clock::days_from_civil;
use crate::resource_id::{canonical_type, ArmPath, AuthorizationKind, Scope};

/// The api-versions of the events list.
pub const API_VERSIONS: &[&str] = &["2015-04-01"];

/// How long events are kept and how far back a query may start (Azure: 90 days).
pub const RETENTION_DAYS: i64 = 90;

/// Microseconds in one day.
pub const DAY_MICROS: i64 = 86_400 * 1_000_000;

/// Events per page of the list (Azure pages at 200).
pub const PAGE_SIZE: usize = 200;

/// The subscription of an events-list path
/// (`/subscriptions/{s}/providers/microsoft.insights/eventtypes/management/values`).
pub fn events_path(path: &str) -> Option<String> {
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    match segs.as_slice() {
        ["", s, sub, p, ns, et, mg, v]
            if s.eq_ignore_ascii_case("subscriptions")
                && !sub.is_empty()
                && p.eq_ignore_ascii_case("providers")
                && ns.eq_ignore_ascii_case("microsoft.insights")
                && et.eq_ignore_ascii_case("eventtypes")
                && mg.eq_ignore_ascii_case("management")
                && v.eq_ignore_ascii_case("values") =>
        {
            Some(sub.to_string())
        }
        _ => None,
    }
}

/// What a control-plane write is, as the Activity Log names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation {
    /// The authorization action, e.g. `Microsoft.ManagedIdentity/userAssignedIdentities/write`.
    pub name: String,
    /// The resource the operation is on (canonical id).
    pub resource_id: String,
    pub subscription: String,
    /// The resource group, when the resource is in one.
    pub resource_group: Option<String>,
    /// `Microsoft.ManagedIdentity`.
    pub provider: String,
    /// `Microsoft.ManagedIdentity/userAssignedIdentities`.
    pub resource_type: String,
}

/// Which HTTP methods are writes (the Activity Log's Administrative category).
pub fn is_write(method: &str) -> bool {
    matches!(method, "PUT" | "PATCH" | "DELETE" | "POST")
}

/// Child resource types Keyless serves, with their canonical spelling.
const CHILD_TYPES: &[&str] = &[
    "federatedIdentityCredentials",
    "federatedIdentityCredentialPatterns",
    "pools",
    "extensions",
    "accessPolicies",
    "virtualMachines",
    "agentPools",
];

fn canon_child(t: &str) -> Option<&'static str> {
    CHILD_TYPES
        .iter()
        .find(|c| c.eq_ignore_ascii_case(t))
        .copied()
}

/// The POST actions Keyless serves (canonical spelling); any other action name is the
/// caller's and labels no metric.
pub const ACTIONS: &[&str] = &[
    "generateJoinToken",
    "readPodIdentityProfile",
    "reportPodIdentityStatus",
    "publishServiceAccountKeys",
    "issueWebhookCertificate",
    "checkWorkloadIdentity",
];

/// Longest operation name kept (an unknown action's name is the caller's; the rest is cut).
pub const MAX_OPERATION_LEN: usize = 256;

/// The action segment of a POST, in its canonical spelling when Keyless serves it, else as
/// sent, at most [`MAX_OPERATION_LEN`] characters.
fn action_name(action: &str) -> String {
    match ACTIONS.iter().find(|a| a.eq_ignore_ascii_case(action)) {
        Some(a) => (*a).to_string(),
        None => action.chars().take(MAX_OPERATION_LEN).collect(),
    }
}

/// `name` cut to [`MAX_OPERATION_LEN`] characters.
fn bounded(name: String) -> String {
    if name.chars().count() <= MAX_OPERATION_LEN {
        name
    } else {
        name.chars().take(MAX_OPERATION_LEN).collect()
    }
}

impl Operation {
    /// The operation as a metric label: its name when every part of it comes from a fixed list
    /// (a resource type Keyless serves with `write` / `delete`, or one of [`ACTIONS`]), else
    /// `other` — a label never takes a caller's free text, so the series stay bounded.
    pub fn metric_label(&self) -> String {
        let known = match self.name.rsplit_once('/') {
            Some((_, "write" | "delete")) => true,
            Some((rest, "action")) => rest
                .rsplit_once('/')
                .is_some_and(|(_, a)| ACTIONS.contains(&a)),
            _ => false,
        };
        if known {
            self.name.clone()
        } else {
            "other".to_string()
        }
    }
}

fn verb(method: &str) -> &'static str {
    match method {
        "DELETE" => "delete",
        "POST" => "action",
        _ => "write",
    }
}

/// The operation a write (`method` PUT/PATCH/DELETE/POST) on `path` performs, or `None` for
/// reads and for paths that name no operation Keyless serves (those answer 404/405 and, as in
/// Azure, leave no event).
pub fn operation(method: &str, path: &ArmPath) -> Option<Operation> {
    if !is_write(method) {
        return None;
    }
    let v = verb(method);
    match path {
        ArmPath::ResourceGroup {
            subscription,
            resource_group,
        } if method != "POST" => Some(Operation {
            name: format!("Microsoft.Resources/subscriptions/resourceGroups/{v}"),
            resource_id: format!("/subscriptions/{subscription}/resourceGroups/{resource_group}"),
            subscription: subscription.clone(),
            resource_group: Some(resource_group.clone()),
            provider: "Microsoft.Resources".into(),
            resource_type: "Microsoft.Resources/subscriptions/resourceGroups".into(),
        }),
        ArmPath::Resource(r) if method != "POST" => {
            let (ns, ty) = canonical_type(&r.namespace, &r.type_name)?;
            Some(Operation {
                name: format!("{ns}/{ty}/{v}"),
                resource_id: r.canonical(),
                subscription: r.subscription.clone(),
                resource_group: Some(r.resource_group.clone()),
                provider: ns.into(),
                resource_type: format!("{ns}/{ty}"),
            })
        }
        ArmPath::Action { resource, action } if method == "POST" => {
            let (ns, ty) = canonical_type(&resource.namespace, &resource.type_name)?;
            Some(Operation {
                name: bounded(format!("{ns}/{ty}/{}/action", action_name(action))),
                resource_id: resource.canonical(),
                subscription: resource.subscription.clone(),
                resource_group: Some(resource.resource_group.clone()),
                provider: ns.into(),
                resource_type: format!("{ns}/{ty}"),
            })
        }
        ArmPath::Child {
            parent,
            child_type,
            name,
        } if method != "POST" => {
            let (ns, ty) = canonical_type(&parent.namespace, &parent.type_name)?;
            let child = canon_child(child_type)?;
            Some(Operation {
                name: format!("{ns}/{ty}/{child}/{v}"),
                resource_id: format!("{}/{child}/{name}", parent.canonical()),
                subscription: parent.subscription.clone(),
                resource_group: Some(parent.resource_group.clone()),
                provider: ns.into(),
                resource_type: format!("{ns}/{ty}/{child}"),
            })
        }
        ArmPath::ChildAction {
            parent,
            child_type,
            name,
            action,
        } if method == "POST" => {
            let (ns, ty) = canonical_type(&parent.namespace, &parent.type_name)?;
            let child = canon_child(child_type)?;
            Some(Operation {
                name: bounded(format!("{ns}/{ty}/{child}/{}/action", action_name(action))),
                resource_id: format!("{}/{child}/{name}", parent.canonical()),
                subscription: parent.subscription.clone(),
                resource_group: Some(parent.resource_group.clone()),
                provider: ns.into(),
                resource_type: format!("{ns}/{ty}/{child}"),
            })
        }
        ArmPath::Authorization {
            scope,
            kind,
            name: Some(name),
        } if method == "PUT" || method == "DELETE" => {
            let kind = match kind {
                AuthorizationKind::RoleAssignments => "roleAssignments",
                AuthorizationKind::RoleDefinitions => "roleDefinitions",
            };
            let (subscription, resource_group) = match scope {
                Scope::Root => return None,
                Scope::Subscription(s) => (s.clone(), None),
                Scope::ResourceGroup {
                    subscription,
                    resource_group,
                } => (subscription.clone(), Some(resource_group.clone())),
                Scope::Resource(r) => (r.subscription.clone(), Some(r.resource_group.clone())),
            };
            Some(Operation {
                name: format!("Microsoft.Authorization/{kind}/{v}"),
                resource_id: format!(
                    "{}/providers/Microsoft.Authorization/{kind}/{name}",
                    scope.canonical()
                ),
                subscription,
                resource_group,
                provider: "Microsoft.Authorization".into(),
                resource_type: format!("Microsoft.Authorization/{kind}"),
            })
        }
        _ => None,
    }
}

/// The outcome of a write as the Activity Log shows it: `(status, subStatus, level)`.
pub fn outcome(http_status: u16) -> (&'static str, &'static str, &'static str) {
    let sub = match http_status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "NoContent",
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        409 => "Conflict",
        413 => "RequestEntityTooLarge",
        429 => "TooManyRequests",
        500 => "InternalServerError",
        503 => "ServiceUnavailable",
        _ => "",
    };
    match http_status {
        202 => ("Accepted", sub, "Informational"),
        200..=299 => ("Succeeded", sub, "Informational"),
        _ => ("Failed", sub, "Error"),
    }
}

/// A `$filter` or `$select` the list does not understand; the message is the service's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryError(pub String);

/// A parsed events `$filter` (times in microseconds since the epoch).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    pub from: i64,
    pub to: i64,
    pub resource_group: Option<String>,
    pub resource_id: Option<String>,
    pub resource_provider: Option<String>,
    pub correlation_id: Option<String>,
    pub caller: Option<String>,
    pub status: Option<String>,
}

/// Longest `$filter` accepted.
pub const MAX_FILTER_LEN: usize = 4096;

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Word(String),
    Str(String),
}

fn tokenize(f: &str) -> Option<Vec<Tok>> {
    let mut out = vec![];
    let mut it = f.chars().peekable();
    while let Some(&c) = it.peek() {
        if c == ' ' {
            it.next();
        } else if c == '\'' {
            it.next();
            let mut s = String::new();
            loop {
                match it.next()? {
                    '\'' if it.peek() == Some(&'\'') => {
                        it.next();
                        s.push('\'');
                    }
                    '\'' => break,
                    c if c.is_control() => return None,
                    c => s.push(c),
                }
            }
            out.push(Tok::Str(s));
        } else if c.is_ascii_alphanumeric() {
            // a word: a field, a keyword or a bare time (digits, `-:.+TZ`)
            let mut s = String::new();
            while let Some(&c) = it.peek() {
                if c.is_ascii_alphanumeric() || matches!(c, '-' | ':' | '.' | '+' | '_') {
                    s.push(c);
                    it.next();
                } else {
                    break;
                }
            }
            out.push(Tok::Word(s));
        } else {
            return None;
        }
    }
    Some(out)
}

/// Parse an events `$filter` strictly; `now` (µs) is the default end and the retention base.
pub fn parse_filter(f: &str, now: i64) -> Result<EventFilter, QueryError> {
    let invalid = || {
        QueryError(format!(
            "The $filter '{}' is not supported. Supported: eventTimestamp ge '<start>' [and eventTimestamp le '<end>'] [and (resourceGroupName | resourceUri | resourceProvider | correlationId | caller | status) eq '<value>']...",
            f.chars().take(200).collect::<String>()
        ))
    };
    if f.trim().is_empty() {
        return Err(QueryError(
            "The $filter query parameter is required and must contain at least 'eventTimestamp ge'.".into(),
        ));
    }
    if f.len() > MAX_FILTER_LEN {
        return Err(invalid());
    }
    let toks = tokenize(f).ok_or_else(invalid)?;
    let mut from = None;
    let mut to = None;
    let mut out = EventFilter::default();
    let mut i = 0;
    loop {
        let (Some(Tok::Word(field)), Some(Tok::Word(op)), Some(value)) =
            (toks.get(i), toks.get(i + 1), toks.get(i + 2))
        else {
            return Err(invalid());
        };
        let field = field.to_ascii_lowercase();
        let op = op.to_ascii_lowercase();
        match (field.as_str(), op.as_str()) {
            ("eventtimestamp", "ge" | "le") => {
                let t = match value {
                    Tok::Str(s) | Tok::Word(s) => parse_time(s).ok_or_else(|| {
                        QueryError(format!(
                            "The time value '{s}' in the $filter is not a valid date and time."
                        ))
                    })?,
                };
                let slot = if op == "ge" { &mut from } else { &mut to };
                if slot.replace(t).is_some() {
                    return Err(invalid());
                }
            }
            (_, "eq") => {
                let Tok::Str(v) = value else {
                    return Err(invalid());
                };
                let slot = match field.as_str() {
                    "resourcegroupname" => &mut out.resource_group,
                    "resourceuri" | "resourceid" => &mut out.resource_id,
                    "resourceprovider" => &mut out.resource_provider,
                    "correlationid" => &mut out.correlation_id,
                    "caller" => &mut out.caller,
                    "status" => &mut out.status,
                    _ => return Err(invalid()),
                };
                if v.is_empty() || slot.replace(v.clone()).is_some() {
                    return Err(invalid());
                }
            }
            _ => return Err(invalid()),
        }
        i += 3;
        match toks.get(i) {
            None => break,
            Some(Tok::Word(k)) if k.eq_ignore_ascii_case("and") => i += 1,
            _ => return Err(invalid()),
        }
    }
    let from = from.ok_or_else(|| {
        QueryError("The $filter must contain a start time: 'eventTimestamp ge <start>'.".into())
    })?;
    let to = to.unwrap_or(now);
    if from > to {
        return Err(QueryError(
            "The start time in the $filter is after the end time.".into(),
        ));
    }
    if from < now - RETENTION_DAYS * DAY_MICROS {
        return Err(QueryError(format!(
            "The start time in the $filter is more than {RETENTION_DAYS} days in the past; events are kept for {RETENTION_DAYS} days."
        )));
    }
    out.from = from;
    out.to = to;
    Ok(out)
}

/// EventData properties `$select` may name.
pub const SELECTABLE: &[&str] = &[
    "authorization",
    "caller",
    "category",
    "channels",
    "claims",
    "correlationId",
    "description",
    "eventDataId",
    "eventName",
    "eventTimestamp",
    "httpRequest",
    "id",
    "level",
    "operationId",
    "operationName",
    "properties",
    "resourceGroupName",
    "resourceId",
    "resourceProviderName",
    "resourceType",
    "status",
    "subStatus",
    "submissionTimestamp",
    "subscriptionId",
    "tenantId",
];

/// Parse `$select` (comma-separated property names, canonical spelling returned); an empty or
/// absent value selects everything.
pub fn parse_select(s: Option<&str>) -> Result<Option<Vec<&'static str>>, QueryError> {
    let Some(s) = s.filter(|s| !s.trim().is_empty()) else {
        return Ok(None);
    };
    let mut out = vec![];
    for name in s.split(',').map(str::trim) {
        let p = SELECTABLE
            .iter()
            .find(|p| p.eq_ignore_ascii_case(name))
            .ok_or_else(|| {
                QueryError(format!("The $select property '{name}' is not supported."))
            })?;
        if !out.contains(p) {
            out.push(*p);
        }
    }
    Ok(Some(out))
}

/// Parse an ISO-8601 date or date-time to microseconds since the epoch: `YYYY-MM-DD`,
/// `YYYY-MM-DDThh:mm[:ss[.f…]]` with `Z`, `±hh:mm`, `±hhmm` or no zone (UTC).
pub fn parse_time(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        if t.is_empty() || !t.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        t.parse().ok()
    };
    if b.len() < 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) {
        return None;
    }
    let days = days_from_civil(y, mo as u32, d as u32);
    // the date must exist (31 April is refused)
    if crate::clock::civil_from_days(days) != (y, mo as u32, d as u32) {
        return None;
    }
    let mut micros = days * DAY_MICROS;
    if b.len() == 10 {
        return Some(micros);
    }
    if b[10] != b'T' && b[10] != b't' || b.len() < 16 || b[13] != b':' {
        return None;
    }
    let (h, mi) = (num(11..13)?, num(14..16)?);
    let mut i = 16;
    let mut sec = 0;
    let mut frac = 0i64;
    if b.get(i) == Some(&b':') {
        sec = num(i + 1..i + 3)?;
        i += 3;
        if b.get(i) == Some(&b'.') {
            let start = i + 1;
            let mut end = start;
            while end < b.len() && b[end].is_ascii_digit() {
                end += 1;
            }
            if end == start || end - start > 9 {
                return None;
            }
            let digits = &s[start..end];
            let padded = format!("{digits:0<6}");
            frac = padded[..6].parse().ok()?;
            i = end;
        }
    }
    if h > 23 || mi > 59 || sec > 59 {
        return None;
    }
    micros += ((h * 60 + mi) * 60 + sec) * 1_000_000 + frac;
    let offset = match &s[i..] {
        "" | "Z" | "z" => 0,
        z => {
            let sign = match z.as_bytes()[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let rest = &z[1..];
            let (oh, om) = match rest.len() {
                5 if rest.as_bytes()[2] == b':' => (rest.get(0..2)?, rest.get(3..5)?),
                4 => (rest.get(0..2)?, rest.get(2..4)?),
                _ => return None,
            };
            let (oh, om): (i64, i64) = (oh.parse().ok()?, om.parse().ok()?);
            if oh > 23 || om > 59 || !rest.bytes().all(|c| c.is_ascii_digit() || c == b':') {
                return None;
            }
            sign * (oh * 60 + om) * 60 * 1_000_000
        }
    };
    Some(micros - offset)
}

/// `YYYY-MM-DDThh:mm:ss.fffffffZ` (seven fractional digits, as the service writes).
pub fn format_time(micros: i64) -> String {
    let days = micros.div_euclid(DAY_MICROS);
    let rest = micros.rem_euclid(DAY_MICROS);
    let (y, m, d) = crate::clock::civil_from_days(days);
    let secs = rest / 1_000_000;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:06}0Z",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60,
        rest % 1_000_000
    )
}

/// .NET ticks (100 ns since 0001-01-01), which the event `id` carries.
pub fn ticks(micros: i64) -> i64 {
    const EPOCH_TICKS: i64 = 621_355_968_000_000_000;
    EPOCH_TICKS + micros * 10
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_780_000_000 * 1_000_000;

    #[test]
    fn times_in_the_forms_clients_send() {
        let t = parse_time("2026-01-18T00:16:16Z").unwrap();
        assert_eq!(t, 1_768_695_376 * 1_000_000);
        assert_eq!(parse_time("2026-01-18T00:16:16").unwrap(), t);
        assert_eq!(parse_time("2026-01-18T01:16:16+01:00").unwrap(), t);
        assert_eq!(parse_time("2026-01-17T23:16:16-0100").unwrap(), t);
        assert_eq!(parse_time("2026-01-18T00:16:16.5").unwrap(), t + 500_000);
        assert_eq!(
            parse_time("2026-01-18T00:16:16.6407898Z").unwrap(),
            t + 640_789
        );
        assert_eq!(
            parse_time("2026-01-18T00:16:16.123456").unwrap(),
            t + 123_456
        );
        assert_eq!(parse_time("2026-01-18T00:16").unwrap(), t - 16_000_000);
        assert_eq!(parse_time("2026-01-18").unwrap(), 1_768_694_400 * 1_000_000);
        for bad in [
            "",
            "2026-1-18",
            "2026-02-30",
            "2026-01-18T25:00:00Z",
            "2026-01-18T00:16:16Q",
            "2026-01-18T00:16:16.Z",
            "2026-01-18 00:16:16",
            "2026-01-18T00:16:16+1",
            "yesterday",
        ] {
            assert_eq!(parse_time(bad), None, "{bad}");
        }
        assert_eq!(format_time(t + 640_789), "2026-01-18T00:16:16.6407890Z");
        assert_eq!(parse_time(&format_time(t + 640_789)).unwrap(), t + 640_789);
    }

    #[test]
    fn filters_as_az_and_the_documentation_write_them() {
        // az: `datetime.utcnow().isoformat()` bare, then `… and resourceGroupName eq 'rg'`
        let f = parse_filter(
            "eventTimestamp ge 2026-05-28T19:00:00.123456 and eventTimestamp le 2026-05-28T20:00:00.123456 and resourceGroupName eq 'My-RG' and caller eq 'x' and status eq 'Failed'",
            NOW,
        )
        .unwrap();
        assert_eq!(f.resource_group.as_deref(), Some("My-RG"));
        assert_eq!(f.caller.as_deref(), Some("x"));
        assert_eq!(f.status.as_deref(), Some("Failed"));
        assert_eq!(f.to - f.from, 3600 * 1_000_000);
        let f = parse_filter(
            "eventTimestamp ge '2026-05-28T19:00:00Z' and resourceUri eq '/subscriptions/s/resourceGroups/g'",
            NOW,
        )
        .unwrap();
        assert_eq!(f.to, NOW);
        assert_eq!(
            f.resource_id.as_deref(),
            Some("/subscriptions/s/resourceGroups/g")
        );
        let f = parse_filter(
            "EventTimestamp GE '2026-05-28' AND correlationId eq 'c' and resourceProvider eq 'Microsoft.ManagedIdentity'",
            NOW,
        )
        .unwrap();
        assert_eq!(f.correlation_id.as_deref(), Some("c"));
        assert_eq!(
            f.resource_provider.as_deref(),
            Some("Microsoft.ManagedIdentity")
        );
    }

    #[test]
    fn anything_else_is_refused() {
        for bad in [
            "",
            "resourceGroupName eq 'g'",
            "eventTimestamp le '2026-05-28T19:00:00Z'",
            "eventTimestamp ge '2026-05-28T19:00:00Z' or 1=1",
            "eventTimestamp ge '2026-05-28T19:00:00Z' and resourceGroupNam eq 'g'",
            "eventTimestamp ge '2026-05-28T19:00:00Z' and resourceGroupName eq g",
            "eventTimestamp ge '2026-05-28T19:00:00Z' and resourceGroupName eq ''",
            "eventTimestamp ge '2026-05-28T19:00:00Z' and resourceGroupName eq 'a' and resourceGroupName eq 'b'",
            "eventTimestamp ge '2026-05-28T19:00:00Z' and eventTimestamp ge '2026-05-28T19:00:00Z'",
            "eventTimestamp ge '2026-05-28T19:00:00Z' and",
            "eventTimestamp ge '2026-05-28T19:00:00Z' and (caller eq 'x')",
            "eventTimestamp gt '2026-05-28T19:00:00Z'",
            "eventTimestamp ge 'soon'",
            "eventTimestamp ge '2026-05-28T20:00:00Z' and eventTimestamp le '2026-05-28T19:00:00Z'",
            "eventTimestamp ge '2025-01-01T00:00:00Z'",
            "eventTimestamp ge '2026-05-28T19:00:00Z' and caller eq 'unterminated",
            "eventTimestamp ge '2026-05-28T19:00:00Z' and eventChannels eq 'Admin, Operation'",
        ] {
            assert!(parse_filter(bad, NOW).is_err(), "{bad}");
        }
    }

    #[test]
    fn select_names_known_properties() {
        assert_eq!(parse_select(None).unwrap(), None);
        assert_eq!(
            parse_select(Some("caller , operationName,CALLER")).unwrap(),
            Some(vec!["caller", "operationName"])
        );
        assert!(parse_select(Some("caller,password")).is_err());
    }

    #[test]
    fn operations_are_the_authorization_actions() {
        let op = |m: &str, p: &str| operation(m, &ArmPath::parse(p).unwrap());
        let rg = "/subscriptions/s/resourceGroups/g";
        let o = op(
            "PUT",
            &format!("{rg}/providers/microsoft.managedidentity/userassignedidentities/id1"),
        )
        .unwrap();
        assert_eq!(
            o.name,
            "Microsoft.ManagedIdentity/userAssignedIdentities/write"
        );
        assert_eq!(
            o.resource_id,
            format!("{rg}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id1")
        );
        assert_eq!(o.resource_group.as_deref(), Some("g"));
        assert_eq!(o.provider, "Microsoft.ManagedIdentity");
        assert_eq!(
            op("DELETE", rg).unwrap().name,
            "Microsoft.Resources/subscriptions/resourceGroups/delete"
        );
        let ra = op(
            "PUT",
            &format!("{rg}/providers/Microsoft.Authorization/roleAssignments/ra1"),
        )
        .unwrap();
        assert_eq!(ra.name, "Microsoft.Authorization/roleAssignments/write");
        assert_eq!(
            ra.resource_id,
            format!("{rg}/providers/Microsoft.Authorization/roleAssignments/ra1")
        );
        let fic = op(
            "PUT",
            &format!("{rg}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id1/federatedidentitycredentials/f"),
        )
        .unwrap();
        assert_eq!(
            fic.name,
            "Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentials/write"
        );
        assert_eq!(
            op(
                "POST",
                &format!("{rg}/providers/Microsoft.ContainerService/managedClusters/c/agentPools/p/generateJoinToken")
            )
            .unwrap()
            .name,
            "Microsoft.ContainerService/managedClusters/agentPools/generateJoinToken/action"
        );
        assert_eq!(
            op(
                "POST",
                &format!("{rg}/providers/Microsoft.Compute/virtualMachines/vm/generateJoinToken")
            )
            .unwrap()
            .name,
            "Microsoft.Compute/virtualMachines/generateJoinToken/action"
        );
        // reads, unknown types and method/path pairs that are not operations
        assert!(op("GET", rg).is_none());
        assert!(op("PUT", &format!("{rg}/providers/Microsoft.Foo/bars/b")).is_none());
        assert!(op("POST", rg).is_none());
        assert!(op("PUT", "/subscriptions/s").is_none());
    }

    #[test]
    fn a_metric_label_never_takes_a_callers_action_name() {
        let op = |m: &str, p: &str| operation(m, &ArmPath::parse(p).unwrap());
        let vm = "/subscriptions/s/resourceGroups/g/providers/Microsoft.Compute/virtualMachines/v";
        let known = op("POST", &format!("{vm}/GENERATEJOINTOKEN")).unwrap();
        assert_eq!(
            known.name,
            "Microsoft.Compute/virtualMachines/generateJoinToken/action"
        );
        assert_eq!(known.metric_label(), known.name);
        let put = op("PUT", vm).unwrap();
        assert_eq!(
            put.metric_label(),
            "Microsoft.Compute/virtualMachines/write"
        );
        // any other action: the name keeps it (cut), the label does not
        let random = op("POST", &format!("{vm}/x7f3a9")).unwrap();
        assert_eq!(
            random.name,
            "Microsoft.Compute/virtualMachines/x7f3a9/action"
        );
        assert_eq!(random.metric_label(), "other");
        let long = op("POST", &format!("{vm}/{}", "a".repeat(5000))).unwrap();
        assert!(long.name.chars().count() <= MAX_OPERATION_LEN);
        assert_eq!(long.metric_label(), "other");
        let child = op(
            "POST",
            "/subscriptions/s/resourceGroups/g/providers/Microsoft.Batch/batchAccounts/a/pools/p/nope",
        )
        .unwrap();
        assert_eq!(child.metric_label(), "other");
    }

    #[test]
    fn outcomes_and_paths() {
        assert_eq!(outcome(201), ("Succeeded", "Created", "Informational"));
        assert_eq!(outcome(403), ("Failed", "Forbidden", "Error"));
        assert_eq!(
            events_path(
                "/subscriptions/s1/providers/microsoft.insights/eventtypes/management/values"
            ),
            Some("s1".into())
        );
        assert_eq!(
            events_path("/subscriptions/s1/providers/Microsoft.Insights/eventtypes/management"),
            None
        );
        assert_eq!(ticks(0), 621_355_968_000_000_000);
    }
}
