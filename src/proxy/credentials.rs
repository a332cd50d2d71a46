//! Where a proxied request carries its credential (`--credential-sources`;
//! README, "Protect an API without code"): `authorization` (with `Bearer`
//! in any case, or no scheme), any header by name, matched without case,
//! and `query:NAME`, off unless listed. Two different credentials in one
//! request are refused, whichever sources they came from.

use std::fmt;
use std::str::FromStr;

use smallvec::SmallVec;

/// The default: the conventions of the API-token systems keystile serves.
pub const DEFAULT_SOURCES: &str = "authorization,x-api-key,x-api-token";

/// One place a credential may be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `Authorization: Bearer <credential>` or `Authorization: <credential>`;
    /// another scheme (`Basic …`) is not a credential for keystile.
    Authorization,
    /// A header, lower case.
    Header(String),
    /// A query parameter.
    Query(String),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Authorization => f.write_str("authorization"),
            Source::Header(h) => f.write_str(h),
            Source::Query(q) => write!(f, "query:{q}"),
        }
    }
}

/// The sources, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialSources(Vec<Source>);

impl Default for CredentialSources {
    fn default() -> Self {
        DEFAULT_SOURCES.parse().expect("the default parses")
    }
}

impl FromStr for CredentialSources {
    type Err = Vec<String>;
    fn from_str(s: &str) -> Result<Self, Vec<String>> {
        let mut out = Vec::new();
        let mut problems = Vec::new();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let token = |t: &str| {
                !t.is_empty() && t.len() <= 64 && t.bytes().all(|c| c.is_ascii_alphanumeric() || b"-_".contains(&c))
            };
            let source = match item.strip_prefix("query:") {
                Some(q) if token(q) => Source::Query(q.to_string()),
                Some(_) => {
                    problems.push(format!("{item:?}: a query parameter name is 1-64 characters of [A-Za-z0-9_-]"));
                    continue;
                }
                None if item.eq_ignore_ascii_case("authorization") => Source::Authorization,
                None if token(item) => Source::Header(item.to_ascii_lowercase()),
                None => {
                    problems.push(format!("{item:?}: expected authorization, a header name or query:NAME"));
                    continue;
                }
            };
            if !out.contains(&source) {
                out.push(source);
            }
        }
        if out.is_empty() && problems.is_empty() {
            problems.push("at least one credential source is needed".to_string());
        }
        if out.len() > 16 {
            problems.push("at most 16 credential sources".to_string());
        }
        if problems.is_empty() { Ok(CredentialSources(out)) } else { Err(problems) }
    }
}

impl fmt::Display for CredentialSources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{s}")?;
        }
        Ok(())
    }
}

/// A request's headers as each front end holds them; `'a` is the request's
/// own bytes, which what is read from them borrows (not the headers'
/// holder: ext_authz drops its view before the engine is asked).
pub trait RequestHeaders<'a> {
    /// Every value of header `name` (given in lower case; matched without
    /// case).
    fn values(&self, name: &str) -> impl Iterator<Item = &'a str>;
    /// Every header name, as sent, that is longer than `prefix` and starts
    /// with it (matched without case).
    fn names_with_prefix(&self, prefix: &'static str) -> impl Iterator<Item = &'a str>;
    /// Calls `each(i, value)` with every value of every header named
    /// `names[i]` (given in lower case; matched without case; an empty
    /// name matches nothing). Front ends that hold headers as a list read
    /// it once for all the names.
    fn each_value_of(&self, names: &[&str], mut each: impl FnMut(usize, &'a str)) {
        for (i, name) in names.iter().enumerate().filter(|(_, n)| !n.is_empty()) {
            for value in self.values(name) {
                each(i, value);
            }
        }
    }
}

/// What the sources found. Its `Debug` never shows the credential.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Found<'a> {
    None,
    /// One credential (possibly sent in several places), and the sources
    /// it was found in (bit `i` = source `i`).
    One(&'a str, u64),
    /// Two different credentials.
    Conflict,
}

impl std::fmt::Debug for Found<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Found::None => f.write_str("None"),
            Found::One(_, mask) => write!(f, "One({}, sources {mask:#b})", crate::secret::REDACTED),
            Found::Conflict => f.write_str("Conflict"),
        }
    }
}

impl CredentialSources {
    /// The header names the sources read (a query parameter's is none).
    pub fn header_names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().filter_map(|source| match source {
            Source::Authorization => Some("authorization"),
            Source::Header(name) => Some(name.as_str()),
            Source::Query(_) => None,
        })
    }

    pub fn sources(&self) -> &[Source] {
        &self.0
    }

    /// The credential of a request with `headers` and `query` (the part
    /// after `?`, as sent).
    pub fn find<'a, H: RequestHeaders<'a>>(&self, headers: &H, query: &'a str) -> Found<'a> {
        let mut found: Option<(&'a str, u64)> = None;
        let mut conflict = false;
        // `v` is bare: trimmed, without its `Bearer`.
        let mut take = |v: &'a str, i: usize| {
            if v.is_empty() {
                return;
            }
            let bit = 1u64 << i.min(63);
            match &mut found {
                None => found = Some((v, bit)),
                Some((seen, mask)) if *seen == v => *mask |= bit,
                Some(_) => conflict = true,
            }
        };
        // The header names, by source (a query parameter's is empty, and
        // its values are read below). Which of two equal credentials is
        // kept does not matter, so headers are read in their own order.
        let names: SmallVec<[&str; 8]> = self
            .0
            .iter()
            .map(|source| match source {
                Source::Authorization => "authorization",
                Source::Header(name) => name,
                Source::Query(_) => "",
            })
            .collect();
        headers.each_value_of(&names, |i, v| match &self.0[i] {
            Source::Authorization => {
                // Bare once more: `Bearer Bearer ks_…` is `ks_…`, as sent
                // in `x-api-key`.
                if let Some(credential) = from_authorization(v) {
                    take(bare(credential), i);
                }
            }
            Source::Header(_) => take(bare(v), i),
            Source::Query(_) => {}
        });
        for (i, source) in self.0.iter().enumerate() {
            if let Source::Query(name) = source {
                for pair in query.split('&') {
                    if let Some((k, v)) = pair.split_once('=')
                        && k == name
                    {
                        take(bare(v), i);
                    }
                }
            }
        }
        match (found, conflict) {
            (_, true) => Found::Conflict,
            (Some((v, mask)), false) => Found::One(v, mask),
            (None, false) => Found::None,
        }
    }
}

/// Whether `name` is longer than `prefix` and starts with it, without case.
pub fn has_prefix(name: &[u8], prefix: &str) -> bool {
    name.len() > prefix.len() && name[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
}

/// The credential of an `Authorization` value: after `Bearer` (any case),
/// or the whole value when it has no scheme. HTTP's blanks are ASCII (RFC
/// 9110, OWS): bytes are searched, not chars.
fn from_authorization(value: &str) -> Option<&str> {
    let v = value.trim_ascii();
    match after_bearer(v) {
        Some(rest) => Some(rest),
        // Another scheme (`Basic …`) is no credential of keystile's.
        None if v.bytes().any(|b| b.is_ascii_whitespace()) => None,
        None => Some(v),
    }
}

/// What follows a leading `Bearer` (any case) and its blanks, trimmed.
/// Looked at in place: a credential is not scanned for a blank it does
/// not have.
fn after_bearer(v: &str) -> Option<&str> {
    let b = v.as_bytes();
    if b.len() > 6 && b[6].is_ascii_whitespace() && b[..6].eq_ignore_ascii_case(b"bearer") {
        Some(v[7..].trim_ascii())
    } else {
        None
    }
}

/// A value without surrounding blanks and a leading `Bearer ` (any case).
fn bare(value: &str) -> &str {
    let v = value.trim_ascii();
    after_bearer(v).unwrap_or(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Map(Vec<(&'static str, &'static str)>);
    impl RequestHeaders<'static> for Map {
        fn values(&self, name: &str) -> impl Iterator<Item = &'static str> {
            let name = name.to_string();
            self.0.iter().filter(move |(k, _)| k.eq_ignore_ascii_case(&name)).map(|(_, v)| *v)
        }
        fn names_with_prefix(&self, prefix: &'static str) -> impl Iterator<Item = &'static str> {
            self.0.iter().map(|(k, _)| *k).filter(move |k| super::has_prefix(k.as_bytes(), prefix))
        }
    }

    #[test]
    fn a_prefix_is_matched_without_case_and_only_with_more_after_it() {
        let prefix = crate::proxy::IDENTITY_PREFIX;
        for (name, want) in [
            ("x-keystile-tenant", true),
            ("X-KeyStile-A", true),
            ("x-keystile-", false),
            ("x-keystilf-tenant", false),
            ("x-keystil", false),
            ("", false),
            ("accept-encoding", false),
            ("x-keystile\u{e9}-tenant", false),
        ] {
            assert_eq!(has_prefix(name.as_bytes(), prefix), want, "{name:?}");
        }
    }

    #[test]
    fn sources_parse_and_report_every_problem() {
        let s: CredentialSources = "authorization, X-Api-Key ,query:api_key".parse().unwrap();
        assert_eq!(s.to_string(), "authorization,x-api-key,query:api_key");
        let errs = "authorization,bad header,query:".parse::<CredentialSources>().unwrap_err();
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!("".parse::<CredentialSources>().is_err());
    }

    #[test]
    fn the_seed_conventions_are_found() {
        let s = CredentialSources::default();
        let cases: [(Vec<(&str, &str)>, Found); 13] = [
            (vec![("Authorization", "Bearer ks_a")], Found::One("ks_a", 0b1)),
            (vec![("authorization", "bEaReR   ks_a ")], Found::One("ks_a", 0b1)),
            (vec![("Authorization", "ks_a")], Found::One("ks_a", 0b1)),
            (vec![("Authorization", "Basic dXNlcjpwdw==")], Found::None),
            (vec![("X-API-TOKEN", "Bearer ks_b")], Found::One("ks_b", 0b100)),
            (vec![("x-api-key", "ks_a"), ("authorization", "Bearer ks_a")], Found::One("ks_a", 0b11)),
            (vec![("x-api-key", "ks_a"), ("x-api-token", "ks_b")], Found::Conflict),
            (vec![("Authorization", "BEARER\tks_a")], Found::One("ks_a", 0b1)),
            (vec![("Authorization", "Digest ks_a")], Found::None),
            (vec![("Authorization", "Bearerks_a")], Found::One("Bearerks_a", 0b1)),
            (vec![("x-api-key", " Bearer  ks_a"), ("authorization", "ks_a")], Found::One("ks_a", 0b11)),
            (vec![("x-api-key", "Token ks_a")], Found::One("Token ks_a", 0b10)),
            (vec![("authorization", "Bearer Bearer ks_a"), ("x-api-key", "ks_a")], Found::One("ks_a", 0b11)),
        ];
        for (headers, want) in cases {
            assert_eq!(s.find(&Map(headers.clone()), ""), want, "{headers:?}");
        }
        assert!(!format!("{:?}", Found::One("ks_secret", 1)).contains("ks_secret"), "no credential in Debug");
    }

    #[test]
    fn a_query_parameter_only_when_listed() {
        let on: CredentialSources = "authorization,query:api_key".parse().unwrap();
        assert_eq!(on.find(&Map(vec![]), "a=1&api_key=ks_q"), Found::One("ks_q", 0b10));
        assert_eq!(CredentialSources::default().find(&Map(vec![]), "api_key=ks_q"), Found::None);
        assert_eq!(on.find(&Map(vec![("authorization", "ks_h")]), "api_key=ks_q"), Found::Conflict);
    }
}
