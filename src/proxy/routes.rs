//! The route table (`--routes FILE`; README, "Protect an API without
//! code"): which tenant a Host names, and which scopes and limits a method
//! and path need. First match wins, in file order; validated at start with
//! every problem reported at once, quoting the bad values.

use serde::Deserialize;

use crate::limit::LimitName;

/// Most entries of each list, and longest pattern or prefix.
const MAX_ENTRIES: usize = 1000;
const MAX_TEXT: usize = 255;
/// Most scopes or limits one route names (Verify's own caps).
const MAX_SCOPES: usize = 64;
const MAX_LIMITS: usize = 8;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RoutesFile {
    #[serde(default)]
    hosts: Vec<HostEntry>,
    #[serde(default)]
    routes: Vec<RouteEntry>,
    #[serde(default)]
    default: Option<Requirements>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostEntry {
    pattern: String,
    #[serde(default)]
    tenant: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteEntry {
    #[serde(default)]
    methods: Vec<String>,
    path_prefix: String,
    #[serde(default)]
    scopes: Vec<String>,
    #[serde(default)]
    limits: Vec<String>,
}

/// What a request needs: scopes granted and limits counted against.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Requirements {
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default)]
    pub limits: Vec<String>,
}

/// One label of a host pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Label {
    Exact(String),
    /// `*`: any one label.
    Any,
    /// `{tenant}`: any one label, which names the tenant.
    Tenant,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct HostRule {
    labels: Vec<Label>,
    /// A fixed tenant (none with a `{tenant}` label).
    tenant: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Route {
    /// Upper case; empty = any method.
    methods: Vec<String>,
    path_prefix: String,
    needs: Requirements,
}

/// The validated table. The empty table (no file) names no tenant and
/// needs no scope and no limit beyond the key's automatic ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteTable {
    hosts: Vec<HostRule>,
    routes: Vec<Route>,
    default: Requirements,
}

impl RouteTable {
    /// Parses and validates a routes file; every problem is reported.
    pub fn parse(text: &str) -> Result<RouteTable, Vec<String>> {
        let file: RoutesFile = toml::from_str(text).map_err(|e| vec![e.to_string().trim().replace('\n', " ")])?;
        let mut problems = Vec::new();
        if file.hosts.len() > MAX_ENTRIES || file.routes.len() > MAX_ENTRIES {
            problems.push(format!("at most {MAX_ENTRIES} hosts and {MAX_ENTRIES} routes"));
        }
        let mut hosts = Vec::with_capacity(file.hosts.len());
        for (i, h) in file.hosts.iter().enumerate() {
            match host_rule(h) {
                Ok(rule) => hosts.push(rule),
                Err(why) => problems.push(format!("hosts[{i}] pattern {:?}: {why}", h.pattern)),
            }
        }
        let mut routes = Vec::with_capacity(file.routes.len());
        for (i, r) in file.routes.iter().enumerate() {
            let at = format!("routes[{i}] (path_prefix {:?})", r.path_prefix);
            if !r.path_prefix.starts_with('/') || r.path_prefix.len() > MAX_TEXT || r.path_prefix.contains(['?', '#']) {
                problems.push(format!(
                    "{at}: path_prefix must start with '/', without '?' or '#', at most {MAX_TEXT} bytes"
                ));
            }
            let mut methods = Vec::with_capacity(r.methods.len());
            for m in &r.methods {
                if m.is_empty() || m.len() > 16 || !m.bytes().all(|c| c.is_ascii_alphabetic()) {
                    problems.push(format!("{at}: method {m:?} is not an HTTP method (GET, POST, ...)"));
                } else {
                    methods.push(m.to_ascii_uppercase());
                }
            }
            let needs = Requirements { scopes: r.scopes.clone(), limits: r.limits.clone() };
            requirement_problems(&at, &needs, &mut problems);
            routes.push(Route { methods, path_prefix: r.path_prefix.clone(), needs });
        }
        let default = file.default.unwrap_or_default();
        requirement_problems("default", &default, &mut problems);
        if problems.is_empty() { Ok(RouteTable { hosts, routes, default }) } else { Err(problems) }
    }

    /// The tenant `host` names: the first matching host pattern's (`""`
    /// for a pattern without one). Without host patterns every host names
    /// none (`Some("")`: any tenant); with them, a host none matches is
    /// `None`, refused: a host keystile cannot place never passes any
    /// tenant's key.
    pub fn tenant_of<'h>(&'h self, host: &'h str) -> Option<&'h str> {
        if self.hosts.is_empty() {
            return Some("");
        }
        let host = host_only(host);
        self.hosts.iter().find_map(|rule| rule.matches(host))
    }

    /// What `method` on `path` (already normalised) needs: the first
    /// matching route's, else the default. A prefix matches whole
    /// segments (`/v1/export` matches `/v1/export` and `/v1/export/x`, not
    /// `/v1/exports`); a route for GET also takes HEAD.
    pub fn needs(&self, method: &str, path: &str) -> &Requirements {
        self.routes
            .iter()
            .find(|r| {
                under(path, &r.path_prefix)
                    && (r.methods.is_empty()
                        || r.methods.iter().any(|m| {
                            m.eq_ignore_ascii_case(method) || (m == "GET" && method.eq_ignore_ascii_case("HEAD"))
                        }))
            })
            .map_or(&self.default, |r| &r.needs)
    }
}

impl HostRule {
    /// The tenant when `host` (lower case, no port) matches.
    fn matches<'h>(&'h self, host: &'h str) -> Option<&'h str> {
        let mut tenant = self.tenant.as_str();
        let mut labels = host.split('.');
        for want in &self.labels {
            let got = labels.next()?;
            if got.is_empty() {
                return None;
            }
            match want {
                Label::Exact(l) if !l.eq_ignore_ascii_case(got) => return None,
                Label::Exact(_) | Label::Any => {}
                Label::Tenant => tenant = got,
            }
        }
        labels.next().is_none().then_some(tenant)
    }
}

/// Whether `path` lies under `prefix`, at a segment boundary.
fn under(path: &str, prefix: &str) -> bool {
    path.starts_with(prefix)
        && (prefix.ends_with('/') || path.len() == prefix.len() || path.as_bytes()[prefix.len()] == b'/')
}

/// The host without its port or a trailing dot.
fn host_only(host: &str) -> &str {
    let host = host.trim();
    let host = match host.rsplit_once(':') {
        Some((h, port)) if !h.contains(':') && port.bytes().all(|c| c.is_ascii_digit()) => h,
        _ => host,
    };
    host.strip_suffix('.').unwrap_or(host)
}

fn host_rule(h: &HostEntry) -> Result<HostRule, String> {
    let pattern = h.pattern.trim().to_ascii_lowercase();
    if pattern.is_empty() || pattern.len() > MAX_TEXT {
        return Err(format!("must be 1-{MAX_TEXT} bytes"));
    }
    let mut labels = Vec::new();
    for l in pattern.split('.') {
        labels.push(match l {
            "*" => Label::Any,
            "{tenant}" => Label::Tenant,
            l if !l.is_empty() && l.len() <= 63 && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-') => {
                Label::Exact(l.to_string())
            }
            _ => {
                return Err(format!(
                    "label {l:?} must be a DNS label, `*` (any one label) or `{{tenant}}` (the tenant's label)"
                ));
            }
        });
    }
    let placeholders = labels.iter().filter(|l| **l == Label::Tenant).count();
    let tenant = match (&h.tenant, placeholders) {
        (_, n) if n > 1 => return Err("names `{tenant}` more than once".into()),
        (Some(_), 1) => return Err("has both a `{tenant}` label and a fixed tenant; keep one".into()),
        (Some(t), _) => {
            if t.is_empty() || t.len() > 128 || !t.bytes().all(|c| c.is_ascii_alphanumeric() || b"._:-".contains(&c)) {
                return Err(format!("tenant {t:?} must be 1-128 characters of [A-Za-z0-9._:-]"));
            }
            t.clone()
        }
        (None, _) => String::new(),
    };
    Ok(HostRule { labels, tenant })
}

fn requirement_problems(at: &str, needs: &Requirements, problems: &mut Vec<String>) {
    if needs.scopes.len() > MAX_SCOPES {
        problems.push(format!("{at}: at most {MAX_SCOPES} scopes"));
    }
    for s in &needs.scopes {
        if s.is_empty() || s.len() > 128 || !s.bytes().all(|c| c.is_ascii_alphanumeric() || b"._:/-".contains(&c)) {
            problems.push(format!("{at}: scope {s:?} must be 1-128 characters of [A-Za-z0-9._:/-] (no patterns)"));
        }
    }
    if needs.limits.len() > MAX_LIMITS {
        problems.push(format!("{at}: at most {MAX_LIMITS} limits"));
    }
    for l in &needs.limits {
        if let Err(e) = l.parse::<LimitName>() {
            problems.push(format!("{at}: {e}"));
        }
    }
}

/// Why a path is refused before any route is matched: what upstreams
/// read in different ways.
pub const AMBIGUOUS_PATH: &str =
    "The request path holds an encoded slash, backslash or NUL, which servers read in different ways.";

/// The path a route is matched against, read as the upstream will: no
/// query or fragment; escapes of unreserved characters decoded (`%65` is
/// `e`); `;parameters` of a segment dropped (as Java servers do); `.` and
/// `..` segments resolved and repeated slashes collapsed, so
/// `/v1/public/..;/%65xport` is matched as `/v1/export`. An encoded slash,
/// a backslash (raw or encoded) or a NUL is refused ([`AMBIGUOUS_PATH`]).
pub fn normalise_path(raw: &str) -> Result<std::borrow::Cow<'_, str>, &'static str> {
    // The common case has nothing to resolve: no copy, and one pass over
    // its bytes.
    let (path, plain) = plain_path(raw);
    if plain {
        return Ok(std::borrow::Cow::Borrowed(path));
    }
    resolve(path).map(std::borrow::Cow::Owned)
}

/// [`normalise_path`] of a path with something to resolve.
fn resolve(path: &str) -> Result<String, &'static str> {
    if path.contains(['\\', '\0']) {
        return Err(AMBIGUOUS_PATH);
    }
    let mut out: Vec<String> = Vec::new();
    for seg in path.split('/') {
        let seg = seg.split(';').next().unwrap_or("");
        let decoded = decode_unreserved(seg)?;
        match decoded.as_str() {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            _ => out.push(decoded),
        }
    }
    let mut p = String::with_capacity(path.len() + 1);
    for seg in &out {
        p.push('/');
        p.push_str(seg);
    }
    if p.is_empty() || (path.ends_with('/') && !out.is_empty()) {
        p.push('/');
    }
    Ok(p)
}

/// The path before any `?` or `#`, and whether it is already normal: it
/// starts with `/` and has no `//`, no `/.` (a `.` or `..` segment, or a
/// name starting with a dot, resolved the slow way), no escape, no `;`,
/// backslash or NUL.
fn plain_path(raw: &str) -> (&str, bool) {
    let b = raw.as_bytes();
    let mut plain = b.first() == Some(&b'/');
    let mut prev = 0u8;
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'?' | b'#' => return (&raw[..i], plain),
            b'%' | b';' | b'\\' | 0 => plain = false,
            b'/' | b'.' if prev == b'/' => plain = false,
            _ => {}
        }
        prev = c;
    }
    (raw, plain)
}

/// Decodes `%XX` escapes of unreserved characters (letters, digits,
/// `-._~`); other escapes stay as written, except `/`, `\` and NUL, which
/// are refused.
fn decode_unreserved(seg: &str) -> Result<String, &'static str> {
    let b = seg.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = ((b[i + 1] as char).to_digit(16), (b[i + 2] as char).to_digit(16))
        {
            let c = (h * 16 + l) as u8;
            match c {
                b'/' | b'\\' | 0 => return Err(AMBIGUOUS_PATH),
                c if c.is_ascii_alphanumeric() || b"-._~".contains(&c) => out.push(c),
                _ => out.extend_from_slice(&b[i..i + 3]),
            }
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../deploy/routes.example.toml");

    /// The one-pass check never calls a path normal that the resolution
    /// would change.
    #[test]
    fn a_path_called_plain_is_what_resolving_it_gives() {
        let alphabet = proptest::sample::select(vec!['/', '.', 'a', '%', '2', 'f', 'e', ';', '?', '#', '\\', '\0']);
        proptest::proptest!(|(chars in proptest::collection::vec(alphabet, 0..12))| {
            let raw: String = chars.into_iter().collect();
            let (path, plain) = plain_path(&raw);
            let cut = raw.find(['?', '#']).unwrap_or(raw.len());
            proptest::prop_assert_eq!(path, &raw[..cut]);
            if plain {
                let resolved = resolve(path);
                proptest::prop_assert_eq!(resolved.as_deref(), Ok(path), "{:?}", raw);
            }
        });
        assert!(plain_path("/v1/things/42").1);
        assert!(!plain_path("/v1/../x").1 && !plain_path("//x").1 && !plain_path("/a%2fb").1 && !plain_path("x").1);
    }

    #[test]
    fn the_readme_example_matches_as_documented() {
        let t = RouteTable::parse(EXAMPLE).unwrap();
        assert_eq!(t.tenant_of("acme.api.example.com"), Some("acme"));
        assert_eq!(t.tenant_of("ACME.api.example.com:8443"), Some("ACME"));
        assert_eq!(t.tenant_of("partner.example.org"), Some("partner"));
        for unknown in ["x.acme.api.example.com", "api.example.com", "evil.com", "acme.api.example.com:x", ""] {
            assert_eq!(t.tenant_of(unknown), None, "{unknown}");
        }
        assert_eq!(RouteTable::default().tenant_of("anything"), Some(""), "no host patterns: no tenant");
        assert_eq!(t.needs("POST", "/v1/export/daily").scopes, ["export:data"]);
        assert_eq!(t.needs("post", "/v1/export").limits, ["analytics"]);
        assert_eq!(t.needs("GET", "/v1/export").scopes, ["api:read"], "method filters");
        assert_eq!(t.needs("POST", "/v1/exports").scopes, ["api:read"], "whole segments only");
        assert_eq!(t.needs("GET", "/v1/users").scopes, ["api:read"]);
        assert!(t.needs("GET", "/health").scopes.is_empty(), "the default");
        let get =
            RouteTable::parse("[[routes]]\nmethods = [\"GET\"]\npath_prefix = \"/a\"\nscopes = [\"r\"]\n").unwrap();
        assert_eq!(get.needs("HEAD", "/a").scopes, ["r"], "HEAD goes with GET");
    }

    #[test]
    fn every_problem_is_reported_with_its_value() {
        let bad = r#"
[[hosts]]
pattern = "{tenant}.{tenant}.example.com"
[[hosts]]
pattern = "a_b.example.com"
[[hosts]]
pattern = "{tenant}.example.com"
tenant = "fixed"
[[routes]]
path_prefix = "v1"
methods = ["GE T"]
scopes = ["read:*"]
limits = ["Bad Name"]
"#;
        let errs = RouteTable::parse(bad).unwrap_err();
        assert_eq!(errs.len(), 7, "{errs:#?}");
        for needle in ["{tenant}.{tenant}", "a_b", "fixed", "\"v1\"", "GE T", "read:*", "Bad Name"] {
            assert!(errs.iter().any(|e| e.contains(needle)), "{needle} in {errs:#?}");
        }
        let errs = RouteTable::parse("[[routes]]\npath = \"/x\"\n").unwrap_err();
        assert!(errs[0].contains("unknown field `path`"), "{errs:?}");
    }

    #[test]
    fn paths_are_matched_as_the_upstream_reads_them() {
        for bad in ["/v1%2Fexport", "/v1/%5cexport", "/v1\\export", "/v1/%00x", "/v1/a%2f"] {
            assert_eq!(normalise_path(bad), Err(AMBIGUOUS_PATH), "{bad}");
        }
        for (raw, want) in [
            ("/v1/%65xport", "/v1/export"),
            ("/v1/public/..;/export", "/v1/export"),
            ("/v1/export;jsessionid=1/x", "/v1/export/x"),
            ("/v1/a%20b", "/v1/a%20b"),
            ("/v1/users?x=1", "/v1/users"),
            ("/v1/public/../admin", "/v1/admin"),
            ("/v1/public/../../admin", "/admin"),
            ("/v1/public/%2e%2E/admin", "/v1/admin"),
            ("//v1///users/", "/v1/users/"),
            ("/../../etc", "/etc"),
            ("/", "/"),
            ("", "/"),
            ("/./v1/./x", "/v1/x"),
        ] {
            assert_eq!(normalise_path(raw).unwrap(), want, "{raw}");
        }
    }
}
