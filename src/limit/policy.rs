//! A quota as an operator writes it: `requests` per `window_seconds`, up to
//! `burst` at once, optionally shared by a tenant's keys (README, "Rate
//! limits"). Parsing, validation and the GCRA quota it becomes.

use serde::{Deserialize, Serialize};

/// A key's quota: `requests` per `window_seconds`, up to `burst` at once
/// (0 = `requests`). With `per_tenant`, every key of the tenant with the
/// same policy draws from one shared bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RateLimitPolicy {
    pub requests: u64,
    pub window_seconds: u64,
    pub burst: u64,
    #[serde(default)]
    pub per_tenant: bool,
}

/// Longest window a policy may have (a day) and largest request count; both
/// keep the GCRA arithmetic far from overflow.
pub const MAX_WINDOW_SECONDS: u64 = 86_400;
pub const MAX_REQUESTS: u64 = 1_000_000_000;

impl RateLimitPolicy {
    /// Every problem with this policy, for INVALID_ARGUMENT or a config error.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.requests == 0 || self.requests > MAX_REQUESTS {
            out.push(format!("rate_limit.requests must be between 1 and {MAX_REQUESTS}"));
        }
        if self.window_seconds == 0 || self.window_seconds > MAX_WINDOW_SECONDS {
            out.push(format!("rate_limit.window_seconds must be between 1 and {MAX_WINDOW_SECONDS}"));
        }
        if self.burst > u32::MAX as u64 {
            out.push("rate_limit.burst is too large".to_string());
        }
        out
    }

    /// The burst actually applied: `burst`, or `requests` when unset, at most
    /// `requests`.
    pub fn effective_burst(&self) -> u64 {
        if self.burst == 0 { self.requests } else { self.burst.min(self.requests) }
    }

    /// Nanoseconds between two cells coming back (at least 1).
    pub fn period_nanos(&self) -> u64 {
        ((self.window_seconds as u128 * 1_000_000_000) / self.requests.max(1) as u128).clamp(1, u64::MAX as u128) as u64
    }
}

impl std::str::FromStr for RateLimitPolicy {
    type Err = String;

    /// `1000/60s`, `100/1m`, `10/1s:20` (with a burst of 20), and any of
    /// them with `@tenant` (shared by the tenant's keys).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || {
            format!(
                "rate limit {s:?} must look like 1000/60s, 1000/60s:100 or 1000/60s@tenant (requests/window[:burst][@tenant])"
            )
        };
        let (s, per_tenant) = match s.trim().strip_suffix("@tenant") {
            Some(rest) => (rest, true),
            None => (s.trim(), false),
        };
        let (rate, burst) = match s.split_once(':') {
            Some((r, b)) => (r, b.parse::<u64>().map_err(|_| err())?),
            None => (s, 0),
        };
        let (requests, window) = rate.split_once('/').ok_or_else(err)?;
        let requests = requests.trim().parse::<u64>().map_err(|_| err())?;
        let window = humantime::parse_duration(window.trim()).map_err(|_| err())?;
        let policy = RateLimitPolicy { requests, window_seconds: window.as_secs(), burst, per_tenant };
        match policy.problems().first() {
            Some(p) => Err(format!("rate limit {s:?}: {p}")),
            None => Ok(policy),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(requests: u64, window_seconds: u64, burst: u64) -> RateLimitPolicy {
        RateLimitPolicy { requests, window_seconds, burst, per_tenant: false }
    }

    #[test]
    fn policies_parse_and_validate() {
        assert_eq!("1000/60s".parse::<RateLimitPolicy>().unwrap(), policy(1000, 60, 0));
        assert_eq!("10/1m:20".parse::<RateLimitPolicy>().unwrap(), policy(10, 60, 20));
        assert!("0/60s".parse::<RateLimitPolicy>().is_err());
        assert!("10/0s".parse::<RateLimitPolicy>().is_err());
        assert!("ten per minute".parse::<RateLimitPolicy>().is_err());
        assert_eq!(policy(10, 60, 50).effective_burst(), 10);
        assert_eq!(
            "10/1m@tenant".parse::<RateLimitPolicy>().unwrap(),
            RateLimitPolicy { per_tenant: true, ..policy(10, 60, 0) }
        );
    }
}
