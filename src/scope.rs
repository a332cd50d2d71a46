//! Scope grants and the patterns they may hold (README, "Scopes"). A key is
//! granted scopes; a request asks for scopes; a granted `resource:*`
//! satisfies any `resource:…`, and a granted `*` satisfies anything, but
//! only where the deployment allows it (`--allow-star-scope`). The admin API
//! refuses any `*` it would not honour here, so a stored grant always means
//! what it says.

/// Whether `granted` satisfies the requested `wanted`.
#[inline]
pub fn grants(granted: &str, wanted: &str, allow_star: bool) -> bool {
    if granted == wanted {
        return true;
    }
    match granted.strip_suffix('*') {
        Some("") => allow_star,
        Some(prefix) => prefix.ends_with(':') && wanted.len() > prefix.len() && wanted.starts_with(prefix),
        None => false,
    }
}

/// Whether every requested scope is satisfied by one of the granted ones.
#[inline]
pub fn all_granted<'w>(granted: &[String], wanted: impl IntoIterator<Item = &'w str>, allow_star: bool) -> bool {
    wanted.into_iter().all(|w| granted.iter().any(|g| grants(g, w, allow_star)))
}

/// Whether a requested scope is one a publishable key may answer for
/// (README, "Key kinds"): `public:` and something after it.
#[inline]
pub fn is_public(scope: &str) -> bool {
    scope.len() > PUBLIC.len() && scope.starts_with(PUBLIC)
}

/// The resource every scope of a publishable key lies under.
pub const PUBLIC: &str = "public:";

/// Why a granted pattern would never match as written, or `None` when it
/// is a plain scope or a pattern `grants` honours.
pub fn pattern_problem(scope: &str, allow_star: bool) -> Option<String> {
    if !scope.contains('*') {
        return None;
    }
    if scope == "*" {
        return (!allow_star).then(|| {
            "scope \"*\" (every scope) is refused unless the deployment runs with --allow-star-scope".to_string()
        });
    }
    match scope.strip_suffix(":*") {
        Some(prefix) if !prefix.is_empty() && !prefix.contains('*') => None,
        _ => Some(format!("scope {scope:?}: `*` may only stand for the last part after a colon (e.g. \"read:*\")")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_matching_table() {
        // (granted, wanted, allow_star, granted?)
        let table = [
            ("read:analytics", "read:analytics", false, true),
            ("read:analytics", "read:export", false, false),
            ("read:*", "read:analytics", false, true),
            ("read:*", "read:analytics:daily", false, true),
            ("read:*", "read:", false, false),
            ("read:*", "read", false, false),
            ("read:*", "write:analytics", false, false),
            ("read:*", "reader:x", false, false),
            ("*", "anything", false, false),
            ("*", "anything", true, true),
            ("read", "read:analytics", false, false),
        ];
        for (g, w, star, want) in table {
            assert_eq!(grants(g, w, star), want, "{g} grants {w} (star {star})");
        }
    }

    #[test]
    fn public_scopes() {
        assert!(is_public("public:read"));
        assert!(is_public("public:*"));
        assert!(!is_public("public:"));
        assert!(!is_public("public"));
        assert!(!is_public("publicity:read"));
        assert!(!is_public("read:public"));
    }

    #[test]
    fn patterns_that_would_never_match_are_named() {
        assert!(pattern_problem("read:*", false).is_none());
        assert!(pattern_problem("read", false).is_none());
        assert!(pattern_problem("*", true).is_none());
        for bad in ["*", "re*d", "*:read", "read:*:x", ":*", "read*", "read:**"] {
            assert!(pattern_problem(bad, false).is_some(), "{bad}");
        }
    }
}
