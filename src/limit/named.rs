//! Named limits (README, "Rate limits"): a limit has a name (`integration`,
//! `admin`, `default`, …), a quota, a scope (per key or per tenant), whether
//! it applies when a request names no limit, and what a replica does when
//! the shared buckets are out of reach. Limits come from three layers (the
//! deployment's defaults, the tenant's policy, the key's overrides); a
//! layer closer to the key wins for a name.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

use super::RateLimitPolicy;
use crate::verdict::Words;

/// Longest limit name.
pub const MAX_NAME: usize = 32;
/// Most limits one key, one tenant policy or the deployment may define.
pub const MAX_LIMITS: usize = 16;
/// Most limits one request may name.
pub const MAX_REQUESTED: usize = 8;
/// Most limits applied to one request (key, tenant and deployment layers
/// together, after overrides).
pub const MAX_APPLIED: usize = MAX_LIMITS;

/// A limit's name: `[a-z0-9_-]{1,32}`, kept inline so that bucket ids are
/// `Copy` and the hot path allocates nothing for them.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LimitName {
    len: u8,
    bytes: [u8; MAX_NAME],
}

impl LimitName {
    /// The name a key's single `rate_limit` (and `--default-rate-limit`) goes by.
    pub const DEFAULT: LimitName = {
        let mut bytes = [0u8; MAX_NAME];
        let s = b"default";
        let mut i = 0;
        while i < s.len() {
            bytes[i] = s[i];
            i += 1;
        }
        LimitName { len: s.len() as u8, bytes }
    };

    pub fn as_str(&self) -> &str {
        let bytes = &self.bytes[..self.len as usize];
        debug_assert!(bytes.is_ascii());
        // SAFETY: only `[a-z0-9_-]` is ever stored (`FromStr` and `DEFAULT`
        // are the only constructors), and ASCII is UTF-8. Read on every
        // limited answer, several times: checking again cost more than the
        // header it names.
        unsafe { std::str::from_utf8_unchecked(bytes) }
    }
}

impl std::str::FromStr for LimitName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty()
            || s.len() > MAX_NAME
            || !s.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'-')
        {
            return Err(format!(
                "limit name {:?} must be 1 to {MAX_NAME} characters of a-z, 0-9, '_' and '-'",
                s.chars().take(40).collect::<String>()
            ));
        }
        let mut bytes = [0u8; MAX_NAME];
        bytes[..s.len()].copy_from_slice(s.as_bytes());
        Ok(LimitName { len: s.len() as u8, bytes })
    }
}

impl fmt::Display for LimitName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for LimitName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl Serialize for LimitName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for LimitName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

/// Whose requests a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitScope {
    /// Each key has its own bucket.
    #[default]
    Key,
    /// The tenant's keys of one environment share a bucket (a key without a
    /// tenant counts alone).
    Tenant,
}

/// What a replica does with a limit while the shared buckets are out of
/// reach (README, "Rate limits", fallback).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitFallback {
    /// Count locally against the limit divided by the live replicas.
    #[default]
    LocalShare,
    /// Admit without counting.
    Open,
    /// Refuse (the request is answered UNAVAILABLE, not RATE_LIMITED: the
    /// caller's quota is not known to be spent).
    Closed,
}

/// One named limit as defined in a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitSpec {
    pub name: LimitName,
    pub requests: u64,
    pub window_seconds: u64,
    /// 0 = `requests`.
    #[serde(default)]
    pub burst: u64,
    #[serde(default)]
    pub per: LimitScope,
    /// Applies when a request names no limit.
    #[serde(default)]
    pub auto_apply: bool,
    #[serde(default)]
    pub fallback: LimitFallback,
}

impl LimitSpec {
    /// The quota numbers (the scope is in the bucket id, not the policy).
    pub fn policy(&self) -> RateLimitPolicy {
        RateLimitPolicy {
            requests: self.requests,
            window_seconds: self.window_seconds,
            burst: self.burst,
            per_tenant: false,
        }
    }

    /// A key's single `rate_limit` (or `--default-rate-limit`): the limit
    /// named `default`, applied automatically.
    pub fn from_legacy(p: &RateLimitPolicy) -> LimitSpec {
        LimitSpec {
            name: LimitName::DEFAULT,
            requests: p.requests,
            window_seconds: p.window_seconds,
            burst: p.burst,
            per: if p.per_tenant { LimitScope::Tenant } else { LimitScope::Key },
            auto_apply: true,
            fallback: LimitFallback::LocalShare,
        }
    }

    /// Every problem with this limit, named, for INVALID_ARGUMENT or a
    /// config error.
    pub fn problems(&self) -> Vec<String> {
        self.policy().problems().into_iter().map(|p| format!("limit {:?}: {p}", self.name.as_str())).collect()
    }
}

/// Every problem with a layer's list: each limit's, too many, a name twice.
pub fn list_problems(limits: &[LimitSpec]) -> Vec<String> {
    let mut out: Vec<String> = limits.iter().flat_map(|l| l.problems()).collect();
    if limits.len() > MAX_LIMITS {
        out.push(format!("at most {MAX_LIMITS} limits may be defined, not {}", limits.len()));
    }
    for (i, l) in limits.iter().enumerate() {
        if limits[..i].iter().any(|o| o.name == l.name) {
            out.push(format!("limit {:?} is defined twice", l.name.as_str()));
        }
    }
    out
}

impl std::str::FromStr for LimitSpec {
    type Err = String;

    /// `NAME=REQUESTS/WINDOW[:BURST][@tenant][,auto][,open|,closed]`, as the
    /// CLI and the serve flag `--limit` write it.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, rest) = s
            .split_once('=')
            .ok_or_else(|| format!("limit {s:?} must look like NAME=REQUESTS/WINDOW[:BURST][@tenant][,auto]"))?;
        let name: LimitName = name.trim().parse()?;
        let mut parts = rest.split(',');
        let policy: RateLimitPolicy = parts.next().unwrap_or_default().parse()?;
        let mut spec = LimitSpec { name, ..LimitSpec::from_legacy(&policy) };
        spec.auto_apply = false;
        for flag in parts {
            match flag.trim() {
                "auto" => spec.auto_apply = true,
                "open" => spec.fallback = LimitFallback::Open,
                "closed" => spec.fallback = LimitFallback::Closed,
                "local-share" => spec.fallback = LimitFallback::LocalShare,
                other => {
                    return Err(format!(
                        "limit {s:?}: unknown option {other:?} (expected auto, open, closed or local-share)"
                    ));
                }
            }
        }
        Ok(spec)
    }
}

impl fmt::Display for LimitSpec {
    /// The form [`LimitSpec::from_str`] reads.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}/{}s", self.name, self.requests, self.window_seconds)?;
        if self.burst != 0 {
            write!(f, ":{}", self.burst)?;
        }
        if self.per == LimitScope::Tenant {
            f.write_str("@tenant")?;
        }
        if self.auto_apply {
            f.write_str(",auto")?;
        }
        match self.fallback {
            LimitFallback::LocalShare => Ok(()),
            LimitFallback::Open => f.write_str(",open"),
            LimitFallback::Closed => f.write_str(",closed"),
        }
    }
}

/// The limits that apply to one request, by name, the key's layer first:
/// - `requested` names some: each is looked up in the key's limits, then
///   the tenant's, then the deployment's; a name no layer defines is not
///   applied (a tenant without an `analytics` limit has no such limit).
/// - none named: every limit marked auto-apply, a name taken from the
///   closest layer that defines it (even if that definition is not
///   auto-apply: a key can switch a tenant's automatic limit off by
///   redefining it).
pub fn applicable<A: smallvec::Array<Item = LimitSpec>>(
    requested: Words<'_>,
    layers: [&[LimitSpec]; 3],
    legacy: Option<LimitSpec>,
    out: &mut smallvec::SmallVec<A>,
) {
    let find = |name: LimitName| -> Option<LimitSpec> {
        layers[0]
            .iter()
            .find(|l| l.name == name)
            .copied()
            .or_else(|| legacy.filter(|l| l.name == name))
            .or_else(|| layers[1].iter().chain(layers[2]).find(|l| l.name == name).copied())
    };
    if !requested.is_empty() {
        for name in requested.iter().take(MAX_REQUESTED) {
            let Ok(name) = name.parse::<LimitName>() else { continue };
            if out.iter().any(|l| l.name == name) {
                continue;
            }
            if let Some(l) = find(name) {
                out.push(l);
            }
        }
        return;
    }
    let candidates = layers[0].iter().chain(legacy.as_ref()).chain(layers[1]).chain(layers[2]);
    for l in candidates {
        if out.iter().any(|o| o.name == l.name) || out.len() == MAX_APPLIED {
            continue;
        }
        // The closest definition of the name decides.
        if let Some(closest) = find(l.name)
            && closest.auto_apply
            && closest == *l
        {
            out.push(closest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> LimitSpec {
        s.parse().unwrap()
    }

    fn names(v: &[LimitSpec]) -> Vec<String> {
        v.iter().map(|l| l.to_string()).collect()
    }

    #[test]
    fn names_are_checked() {
        assert!("integration".parse::<LimitName>().is_ok());
        assert!("api_v2-x".parse::<LimitName>().is_ok());
        for bad in ["", "Integration", "a b", "x".repeat(33).as_str(), "é"] {
            assert!(bad.parse::<LimitName>().is_err(), "{bad:?}");
        }
        assert_eq!(LimitName::DEFAULT.as_str(), "default");
    }

    #[test]
    fn specs_parse_and_print_the_same() {
        for s in ["integration=1000/60s@tenant,auto", "admin=500/60s:50", "x=1/1s,closed", "y=5/10s@tenant,auto,open"] {
            assert_eq!(spec(s).to_string(), s);
        }
        assert!("=1/1s".parse::<LimitSpec>().is_err());
        assert!("a=1/1s,sometimes".parse::<LimitSpec>().is_err());
        assert!("a".parse::<LimitSpec>().is_err());
        assert_eq!(spec("a=1000/1m").window_seconds, 60);
    }

    #[test]
    fn lists_refuse_duplicates() {
        let l = [spec("a=1/1s"), spec("a=2/1s")];
        assert_eq!(list_problems(&l), vec!["limit \"a\" is defined twice".to_string()]);
    }

    #[test]
    fn the_closest_layer_wins_and_auto_apply_decides_when_none_is_named() {
        let key = [spec("integration=50/60s,auto")];
        let tenant = [
            spec("integration=1000/60s@tenant,auto"),
            spec("analytics=100/60s@tenant,auto"),
            spec("admin=500/60s@tenant"),
        ];
        let deployment = [spec("export=10/60s,auto")];
        let mut out = smallvec::SmallVec::<[LimitSpec; 4]>::new();
        applicable(Words::NONE, [&key, &tenant, &deployment], None, &mut out);
        assert_eq!(names(&out), ["integration=50/60s,auto", "analytics=100/60s@tenant,auto", "export=10/60s,auto"]);

        out.clear();
        let named = ["admin".to_string(), "missing".to_string(), "admin".to_string()];
        applicable(Words::from(&named[..]), [&key, &tenant, &deployment], None, &mut out);
        assert_eq!(names(&out), ["admin=500/60s@tenant"], "named: applied even if not auto; unknown names skipped");

        out.clear();
        let off = [spec("analytics=100/60s@tenant")];
        applicable(Words::NONE, [&off, &tenant, &[]], None, &mut out);
        assert_eq!(
            names(&out),
            ["integration=1000/60s@tenant,auto"],
            "a key redefining a limit without auto turns it off"
        );

        out.clear();
        let legacy = LimitSpec::from_legacy(&"10/1s".parse().unwrap());
        applicable(Words::NONE, [&[], &[], &[spec("default=99/1s,auto")]], Some(legacy), &mut out);
        assert_eq!(names(&out), ["default=10/1s,auto"], "a key's rate_limit is its `default` limit");
    }
}
