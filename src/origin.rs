//! Browser origins a publishable key answers for (README, "Key kinds"): an
//! allowlist of `scheme://host[:port]` entries, where `https://*.example.com`
//! stands for any subdomain of `example.com` (not `example.com` itself).
//! Compared without case, as browsers serialise an `Origin` in lower case.

/// Most entries in one key's allowlist.
pub const MAX_ORIGINS: usize = 32;
/// Longest entry.
pub const MAX_ORIGIN_LEN: usize = 255;

/// Whether `origin` (a request's `Origin`, empty = none) is allowed by
/// `allowlist` (already checked by [`check`]).
pub fn allowed(allowlist: &[String], origin: &str) -> bool {
    let origin = origin.trim();
    if origin.is_empty() || origin.len() > MAX_ORIGIN_LEN {
        return false;
    }
    let origin = origin.strip_suffix('/').unwrap_or(origin);
    allowlist.iter().any(|entry| matches(entry, origin))
}

fn matches(entry: &str, origin: &str) -> bool {
    let Some((scheme, rest)) = entry.split_once("://*.") else {
        return entry.eq_ignore_ascii_case(origin);
    };
    // `scheme://*.suffix`: the origin's host must end in `.suffix` with at
    // least one DNS label before it. Compared as bytes: the origin is the
    // caller's text, and may not be ASCII.
    let Some((o_scheme, o_rest)) = origin.split_once("://") else {
        return false;
    };
    let (o, r) = (o_rest.as_bytes(), rest.as_bytes());
    if !o_scheme.eq_ignore_ascii_case(scheme) || o.len() < r.len() + 2 {
        return false;
    }
    let (sub, dot_suffix) = o.split_at(o.len() - r.len() - 1);
    dot_suffix[0] == b'.'
        && dot_suffix[1..].eq_ignore_ascii_case(r)
        && sub
            .split(|&c| c == b'.')
            .all(|l| !l.is_empty() && l.len() <= 63 && l.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-'))
}

/// Validates and normalises allowlist entries (lower case, no trailing
/// slash); every problem goes to `problems`.
pub fn check(entries: &[String], problems: &mut Vec<String>) -> Vec<String> {
    if entries.len() > MAX_ORIGINS {
        problems.push(format!("at most {MAX_ORIGINS} allowed_origins"));
    }
    let mut out: Vec<String> = Vec::with_capacity(entries.len());
    for e in entries {
        let t = e.trim();
        let t = t.strip_suffix('/').unwrap_or(t).to_ascii_lowercase();
        match problem(&t) {
            Some(why) => {
                problems.push(format!("allowed_origins entry {:?} {why}", e.chars().take(80).collect::<String>()))
            }
            None if !out.contains(&t) => out.push(t),
            None => {}
        }
    }
    out
}

fn problem(entry: &str) -> Option<&'static str> {
    if entry.len() > MAX_ORIGIN_LEN {
        return Some("is longer than 255 bytes");
    }
    let Some((scheme, rest)) = entry.split_once("://") else {
        return Some("must be scheme://host[:port], e.g. https://app.example.com");
    };
    if scheme != "https" && scheme != "http" {
        return Some("must start with https:// or http://");
    }
    let host_port = rest.strip_prefix("*.").unwrap_or(rest);
    let (host, port) = match host_port.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (host_port, None),
    };
    if let Some(p) = port
        && p.parse::<u16>().map_or(true, |p| p == 0)
    {
        return Some("has a port that is not 1-65535");
    }
    let label_ok =
        |l: &str| !l.is_empty() && l.len() <= 63 && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-');
    if host.is_empty() || !host.split('.').all(label_ok) {
        return Some(
            "must be scheme://host[:port] with a DNS name or IPv4 address, no path; `*.` only as the first label",
        );
    }
    if rest.starts_with("*.") && !host.contains('.') {
        return Some("`*.` needs a domain with at least two labels after it (https://*.example.com)");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[&str]) -> Vec<String> {
        let mut problems = Vec::new();
        let out = check(&entries.iter().map(|s| s.to_string()).collect::<Vec<_>>(), &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        out
    }

    #[test]
    fn the_matching_table() {
        let l = list(&["https://App.Example.com/", "https://*.example.org", "http://localhost:3000"]);
        assert_eq!(l[0], "https://app.example.com");
        let table = [
            ("https://app.example.com", true),
            ("https://APP.example.com", true),
            ("https://app.example.com/", true),
            ("http://app.example.com", false),
            ("https://app.example.com:8443", false),
            ("https://evil-app.example.com", false),
            ("https://app.example.com.evil.net", false),
            ("https://shop.example.org", true),
            ("https://a.b.example.org", true),
            ("https://example.org", false),
            ("https://.example.org", false),
            ("https://evil.com/x.example.org", false),
            ("https://user@x.example.org", false),
            ("https://evilexample.org", false),
            ("https://ééééééé", false),
            ("https://é.example.org", false),
            ("https://a?.example.org", false),
            ("https://a b.example.org", false),
            ("https://x.example.orG", true),
            ("http://localhost:3000", true),
            ("http://localhost:3001", false),
            ("null", false),
            ("", false),
        ];
        for (origin, want) in table {
            assert_eq!(allowed(&l, origin), want, "{origin}");
        }
    }

    #[test]
    fn bad_entries_are_named() {
        let mut problems = Vec::new();
        let bad = [
            "example.com",
            "ftp://example.com",
            "https://",
            "https://a.com/path",
            "https://*.com",
            "https://a.com:0",
            "https://a*.com",
        ];
        check(&bad.iter().map(|s| s.to_string()).collect::<Vec<_>>(), &mut problems);
        assert_eq!(problems.len(), bad.len(), "{problems:?}");
    }
}
