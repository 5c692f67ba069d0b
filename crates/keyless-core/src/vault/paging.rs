//! List paging: at most 25 items per page, an opaque `$skiptoken` in an absolute `nextLink`.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

/// Default and largest page size.
pub const MAX_PAGE: usize = 25;

/// `maxresults`: absent → 25; must be 1..=25.
pub fn page_size(maxresults: Option<&str>) -> Result<usize, String> {
    match maxresults {
        None => Ok(MAX_PAGE),
        Some(s) => match s.parse::<usize>() {
            Ok(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
            _ => Err(format!(
                "Invalid value '{s}' for maxresults: it must be an integer between 1 and {MAX_PAGE}."
            )),
        },
    }
}

/// The skip token for "continue after the item whose sort key is `last`".
pub fn encode_token(last: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("k1:{last}"))
}

/// The sort key a skip token continues after.
pub fn decode_token(token: &str) -> Result<String, String> {
    URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.strip_prefix("k1:").map(str::to_string))
        .ok_or_else(|| "The skip token is invalid.".to_string())
}

/// One page of `items` (sorted by `key`), continuing after `after`; returns the page and the
/// key to continue after, if more items follow.
pub fn page<'a, T>(
    items: &'a [T],
    key: impl Fn(&T) -> String,
    after: Option<&str>,
    size: usize,
) -> (&'a [T], Option<String>) {
    let start = match after {
        Some(a) => items.partition_point(|i| key(i).as_str() <= a),
        None => 0,
    };
    let end = (start + size).min(items.len());
    let slice = &items[start..end];
    let next = (end < items.len()).then(|| key(&items[end - 1]));
    (slice, next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(page_size(None), Ok(25));
        assert_eq!(page_size(Some("1")), Ok(1));
        assert!(page_size(Some("26")).is_err());
        assert!(page_size(Some("0")).is_err());
        assert!(page_size(Some("x")).is_err());
    }

    #[test]
    fn tokens_round_trip() {
        assert_eq!(decode_token(&encode_token("abc-1")).unwrap(), "abc-1");
        assert!(decode_token("!!").is_err());
        assert!(decode_token(&URL_SAFE_NO_PAD.encode("zz")).is_err());
    }

    #[test]
    fn pages_cover_everything_once() {
        let items: Vec<String> = (0..53).map(|i| format!("n{i:03}")).collect();
        let mut seen = vec![];
        let mut after: Option<String> = None;
        loop {
            let (p, next) = page(&items, |s| s.clone(), after.as_deref(), 25);
            seen.extend(p.iter().cloned());
            match next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        assert_eq!(seen, items);
        // an item deleted between pages does not shift the next page
        let (p, _) = page(&items[..10], |s| s.clone(), Some("n004"), 3);
        assert_eq!(p, &items[5..8]);
    }
}
