//! The verdict vocabulary: what a Verify asks ([`Request`]), what it answers
//! ([`Verdict`] with its [`Outcome`]), the one real failure
//! ([`VerifyError`]) and the headers a caller forwards. A leaf module: it
//! knows nothing of the engine, the store or gRPC, and everything that
//! speaks about verdicts (the engine, metrics, front ends) imports it.
//!
//! Each outcome's wire error string, HTTP status, message and metric label
//! live here together, in the order of precedence the README's "Verdicts"
//! table gives.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::cache::CachedKey;
use crate::key::Malformed;
use crate::limit::{LimitName, RateState};

/// The outcome of a verification, in order of precedence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Valid,
    Malformed,
    /// `RATE_LIMITED` because this address failed too often recently.
    TooManyFailedAttempts,
    NotFound,
    Revoked,
    Expired,
    TenantMismatch,
    IpNotAllowed,
    InsufficientScope,
    RateLimited,
    /// Disabled by an admin (checked after `Expired`).
    Disabled,
    /// An exchange-only key presented as a bearer credential (checked after
    /// `Disabled`).
    ExchangeOnly,
    /// A publishable key with an origin allowlist, asked from another origin
    /// (or none; checked after `IpNotAllowed`).
    OriginNotAllowed,
}

impl Outcome {
    /// Every outcome, indexed by discriminant (metrics keep one counter each).
    pub const ALL: [Outcome; 13] = [
        Outcome::Valid,
        Outcome::Malformed,
        Outcome::TooManyFailedAttempts,
        Outcome::NotFound,
        Outcome::Revoked,
        Outcome::Expired,
        Outcome::TenantMismatch,
        Outcome::IpNotAllowed,
        Outcome::InsufficientScope,
        Outcome::RateLimited,
        Outcome::Disabled,
        Outcome::ExchangeOnly,
        Outcome::OriginNotAllowed,
    ];

    /// The stable wire error string; empty when valid.
    pub fn error(self) -> &'static str {
        match self {
            Outcome::Valid => "",
            Outcome::Malformed | Outcome::NotFound => "invalid_api_key",
            Outcome::TooManyFailedAttempts => "too_many_failed_attempts",
            Outcome::Revoked | Outcome::Expired => "expired_api_key",
            Outcome::TenantMismatch => "wrong_tenant",
            Outcome::IpNotAllowed => "ip_not_allowed",
            Outcome::InsufficientScope => "insufficient_scope",
            Outcome::RateLimited => "rate_limited",
            Outcome::Disabled => "disabled_api_key",
            Outcome::ExchangeOnly => "exchange_only_api_key",
            Outcome::OriginNotAllowed => "origin_not_allowed",
        }
    }

    pub fn http_status(self) -> u16 {
        match self {
            Outcome::Valid => 200,
            Outcome::Malformed | Outcome::NotFound | Outcome::Revoked | Outcome::Expired => 401,
            Outcome::TenantMismatch
            | Outcome::IpNotAllowed
            | Outcome::InsufficientScope
            | Outcome::Disabled
            | Outcome::ExchangeOnly
            | Outcome::OriginNotAllowed => 403,
            Outcome::TooManyFailedAttempts | Outcome::RateLimited => 429,
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Outcome::Valid => "The API key is valid.",
            Outcome::Malformed => "The API key is malformed.",
            Outcome::TooManyFailedAttempts => "Too many failed attempts from this address; try again later.",
            Outcome::NotFound => "The API key is not valid.",
            Outcome::Revoked => "The API key has been revoked.",
            Outcome::Expired => "The API key has expired.",
            Outcome::TenantMismatch => "The API key does not belong to this tenant.",
            Outcome::IpNotAllowed => "The API key may not be used from this address.",
            Outcome::InsufficientScope => "The API key lacks a scope this request needs.",
            Outcome::RateLimited => "The API key's rate limit is exceeded; try again later.",
            Outcome::Disabled => "The API key is disabled.",
            Outcome::ExchangeOnly => {
                "The API key may only be exchanged for a token (TokenExchange or POST /v1/auth/token); send the token."
            }
            Outcome::OriginNotAllowed => "The API key may not be used from this origin.",
        }
    }

    /// The `code` label value of `keystile_verify_verdicts_total`.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Valid => "valid",
            Outcome::Malformed => "malformed",
            Outcome::TooManyFailedAttempts => "too_many_failed_attempts",
            Outcome::NotFound => "not_found",
            Outcome::Revoked => "revoked",
            Outcome::Expired => "expired",
            Outcome::TenantMismatch => "tenant_mismatch",
            Outcome::IpNotAllowed => "ip_not_allowed",
            Outcome::InsufficientScope => "insufficient_scope",
            Outcome::RateLimited => "rate_limited",
            Outcome::Disabled => "disabled",
            Outcome::ExchangeOnly => "exchange_only",
            Outcome::OriginNotAllowed => "origin_not_allowed",
        }
    }

    /// The verdict code's name as the API writes it (`VALID`,
    /// `RATE_LIMITED`, ...): usage counts are kept under it.
    pub fn code_name(self) -> &'static str {
        match self {
            Outcome::Valid => "VALID",
            Outcome::Malformed => "MALFORMED",
            Outcome::TooManyFailedAttempts | Outcome::RateLimited => "RATE_LIMITED",
            Outcome::NotFound => "NOT_FOUND",
            Outcome::Revoked => "REVOKED",
            Outcome::Expired => "EXPIRED",
            Outcome::TenantMismatch => "TENANT_MISMATCH",
            Outcome::IpNotAllowed => "IP_NOT_ALLOWED",
            Outcome::InsufficientScope => "INSUFFICIENT_SCOPE",
            Outcome::Disabled => "DISABLED",
            Outcome::ExchangeOnly => "EXCHANGE_ONLY",
            Outcome::OriginNotAllowed => "ORIGIN_NOT_ALLOWED",
        }
    }

    /// The code names a key's usage can hold: the outcomes that identify a
    /// key (README, "Usage").
    pub fn usage_codes() -> Vec<&'static str> {
        let mut codes: Vec<&'static str> = Vec::new();
        for o in Outcome::ALL {
            if !matches!(o, Outcome::Malformed | Outcome::NotFound | Outcome::TooManyFailedAttempts)
                && !codes.contains(&o.code_name())
            {
                codes.push(o.code_name());
            }
        }
        codes
    }

    /// Whether the caller's address is charged a failed attempt.
    pub fn is_failed_attempt(self) -> bool {
        matches!(self, Outcome::Malformed | Outcome::NotFound)
    }
}

/// What one `Verify` asks. Its `Debug` leaves the key out.
#[derive(Clone, Copy)]
pub struct Request<'a> {
    /// The credential as presented, `Bearer ` and whitespace allowed.
    pub key: &'a str,
    /// The end client's address, already canonical (IPv4-mapped → IPv4).
    pub ip: Option<IpAddr>,
    pub scopes: Words<'a>,
    /// Empty = any tenant.
    pub tenant: &'a str,
    /// Rate-limit cells to take; at least 1.
    pub cost: u32,
    /// The named limits this request counts against; empty = the key's
    /// automatic ones (README, "Rate limits"). Valid names, checked at the
    /// front end.
    pub limits: Words<'a>,
    /// What the credential is presented as.
    pub mode: Mode,
    /// For an exchange: the email the caller named; a key whose owner is an
    /// email answers NOT_FOUND unless it matches (README, "Token
    /// exchange"), before anything else can tell a right secret apart.
    pub owner_email: &'a str,
    /// The browser's `Origin` (`scheme://host[:port]`), for publishable keys
    /// with an origin allowlist; empty = none.
    pub origin: &'a str,
}

/// A list of words a request names (its scopes, its limit names), as the
/// front end holds them: owned strings (a parsed JSON body, a route), or
/// slices of the request's own bytes (Verify's, read in place: README,
/// "Performance"), so that neither is copied to be asked.
#[derive(Clone, Copy)]
pub enum Words<'a> {
    Owned(&'a [String]),
    Borrowed(&'a [&'a str]),
}

impl<'a> Words<'a> {
    /// No words.
    pub const NONE: Words<'static> = Words::Borrowed(&[]);

    pub fn len(self) -> usize {
        match self {
            Words::Owned(w) => w.len(),
            Words::Borrowed(w) => w.len(),
        }
    }

    pub fn is_empty(self) -> bool {
        self.len() == 0
    }

    pub fn iter(self) -> impl Iterator<Item = &'a str> + Clone {
        let (owned, borrowed): (&'a [String], &'a [&'a str]) = match self {
            Words::Owned(w) => (w, &[]),
            Words::Borrowed(w) => (&[], w),
        };
        owned.iter().map(String::as_str).chain(borrowed.iter().copied())
    }
}

impl<'a> From<&'a [String]> for Words<'a> {
    fn from(w: &'a [String]) -> Self {
        Words::Owned(w)
    }
}

impl<'a> From<&'a Vec<String>> for Words<'a> {
    fn from(w: &'a Vec<String>) -> Self {
        Words::Owned(w)
    }
}

impl<'a> From<&'a [&'a str]> for Words<'a> {
    fn from(w: &'a [&'a str]) -> Self {
        Words::Borrowed(w)
    }
}

impl std::fmt::Debug for Words<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// What a credential is presented as (README, "Token exchange").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// A bearer credential (Verify): a key, or a token exchanged for one;
    /// an exchange-only key is refused.
    #[default]
    Bearer,
    /// A key presented to TokenExchange: exchange-only keys are welcome,
    /// tokens are not.
    Exchange,
    /// A key presented to KeyAdmin: a key only, never a token.
    Admin,
}

impl<'a> Request<'a> {
    /// A request with only a key (no address, scopes, tenant or limits).
    pub fn of_key(key: &'a str) -> Request<'a> {
        Request {
            key,
            ip: None,
            scopes: Words::NONE,
            tenant: "",
            cost: 1,
            limits: Words::NONE,
            mode: Mode::Bearer,
            owner_email: "",
            origin: "",
        }
    }
}

crate::secret::debug_without_key!(Request<'_>, "Request", [ip, scopes, tenant, cost, limits, mode, origin]);

/// A caller-reported client address: empty or unparseable is unknown;
/// IPv4-mapped IPv6 is IPv4; a port (`1.2.3.4:443`, `[2001:db8::1]:443`) is
/// stripped (README, "Verdicts"). Every front end reads addresses this way.
pub fn parse_ip(ip: &str) -> Option<IpAddr> {
    let ip = trim(ip);
    if let Some(v4) = dotted_quad(ip.as_bytes()) {
        return Some(IpAddr::V4(v4));
    }
    ip.parse::<IpAddr>().or_else(|_| ip.parse::<std::net::SocketAddr>().map(|s| s.ip())).ok().map(|a| a.to_canonical())
}

/// An IPv4 address in the one form the standard parser accepts (four
/// decimal octets of at most 255, no leading zero), read octet by octet:
/// the address nearly every request carries, in about 135 instructions
/// against the general parser's 230 (`benches/instructions_per_call.sh`'s
/// profile). Anything else is `None` and goes to that parser.
#[inline]
fn dotted_quad(b: &[u8]) -> Option<std::net::Ipv4Addr> {
    let digit = |c: u8| u32::from(c - b'0');
    let mut octets = [0u8; 4];
    let mut rest = b;
    for (i, octet) in octets.iter_mut().enumerate() {
        let (n, tail) = match rest {
            [a @ b'1'..=b'9', b @ b'0'..=b'9', c @ b'0'..=b'9', tail @ ..] => {
                (digit(*a) * 100 + digit(*b) * 10 + digit(*c), tail)
            }
            [a @ b'1'..=b'9', b @ b'0'..=b'9', tail @ ..] => (digit(*a) * 10 + digit(*b), tail),
            [a @ b'0'..=b'9', tail @ ..] => (digit(*a), tail),
            _ => return None,
        };
        *octet = u8::try_from(n).ok()?;
        rest = match (i, tail) {
            (3, []) => tail,
            (0..3, [b'.', after @ ..]) => after,
            _ => return None,
        };
    }
    Some(std::net::Ipv4Addr::from(octets))
}

/// [`str::trim`], without its walk over Unicode characters when both ends
/// are visible ASCII, as the values on the hot path nearly always are.
#[inline]
pub fn trim(s: &str) -> &str {
    match s.as_bytes() {
        [first, .., last] if first.is_ascii_graphic() && last.is_ascii_graphic() => s,
        [only] if only.is_ascii_graphic() => s,
        _ => s.trim(),
    }
}

/// The state of one named limit a request was counted against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppliedLimit {
    pub name: LimitName,
    pub state: RateState,
}

/// The limit that constrains a request most: the one that denied it (the
/// longest wait), else the fewest requests left, else the longest reset.
pub fn most_constraining(limits: &[AppliedLimit]) -> Option<&AppliedLimit> {
    limits.iter().min_by_key(|l| {
        (std::cmp::Reverse(l.state.retry_after_ms), l.state.remaining, std::cmp::Reverse(l.state.reset_seconds))
    })
}

/// The answer: an outcome, the key when it was identified, the quota state.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub outcome: Outcome,
    /// Set from `REVOKED` on (never for `MALFORMED`/`NOT_FOUND`).
    pub key: Option<Arc<CachedKey>>,
    /// The most constraining limit applied (what `X-RateLimit-*` carry), or
    /// for `too_many_failed_attempts` the address's failure quota.
    pub rate: Option<AppliedLimit>,
    /// Every limit applied, in the order checked, when there were several
    /// (one allocation); empty when at most one was, which is then `rate`.
    pub limits: Vec<AppliedLimit>,
    /// Why a key was malformed (for logs; never contains key material).
    pub malformed: Option<Malformed>,
    /// The scopes granted when they are not the key's own: a token's that
    /// its key still holds, or a key's with its tiers' (what
    /// `x-api-key-scopes` shows).
    pub token_scopes: Option<Arc<[String]>>,
    /// The unix second the engine reached it at (the one clock read of a
    /// Verify): the reset headers count from it.
    pub decided_at: i64,
}

impl Verdict {
    pub fn bare(outcome: Outcome) -> Verdict {
        Verdict {
            outcome,
            key: None,
            rate: None,
            limits: Vec::new(),
            malformed: None,
            token_scopes: None,
            decided_at: 0,
        }
    }

    pub fn is_valid(&self) -> bool {
        self.outcome == Outcome::Valid
    }

    /// The scopes granted to this request's credential.
    pub fn granted_scopes(&self) -> &[String] {
        match (&self.token_scopes, &self.key) {
            (Some(t), _) => t,
            (None, Some(k)) => &k.record.scopes,
            (None, None) => &[],
        }
    }

    /// Every limit applied, in the order checked.
    pub fn applied(&self) -> &[AppliedLimit] {
        match (&self.limits[..], self.outcome) {
            ([], Outcome::TooManyFailedAttempts) => &[],
            ([], _) => self.rate.as_slice(),
            (all, _) => all,
        }
    }
}

/// A real failure, not a verdict: the answer needed the store (or a shared
/// limiter) and it did not give one in time.
#[derive(Debug, Clone, thiserror::Error)]
pub enum VerifyError {
    #[error("the key store did not answer within {0:?}")]
    StoreTimeout(Duration),
    #[error("the key store is unavailable")]
    StoreUnavailable,
    #[error("the rate limiter is unavailable: {0}")]
    LimiterUnavailable(String),
}

/// The HTTP headers a caller can forward (README "Headers"), lower-case:
/// the most constraining limit in `x-ratelimit-*` and `ratelimit`, every
/// applied limit in `ratelimit-policy` (IETF draft syntax, one item each).
pub fn headers(verdict: &Verdict, now_unix: i64) -> Vec<(&'static str, String)> {
    let mut out = Vec::with_capacity(7);
    each_header(verdict, now_unix, |name, value| out.push((name, value.to_string())));
    out
}

/// Calls `each` with every header of [`headers`], in its order: a front end
/// that writes the values straight into its answer allocates nothing for
/// them, and measures and writes them without `core::fmt` (README,
/// "Performance").
pub fn each_header<'v>(verdict: &'v Verdict, now_unix: i64, mut each: impl FnMut(&'static str, HeaderValue<'v>)) {
    if let Some(AppliedLimit { name, state: r }) = &verdict.rate {
        each("x-ratelimit-limit", HeaderValue::Number(r.limit));
        each("x-ratelimit-remaining", HeaderValue::Number(r.remaining));
        each("x-ratelimit-reset", HeaderValue::Number(now_unix.max(0) as u64 + r.reset_seconds));
        if verdict.limits.len() < 2 {
            each(
                "ratelimit-policy",
                HeaderValue::Item { name: name.as_str(), params: [("q", r.limit), ("w", r.window_seconds)] },
            );
        } else {
            each("ratelimit-policy", HeaderValue::Policies(&verdict.limits));
        }
        each(
            "ratelimit",
            HeaderValue::Item { name: name.as_str(), params: [("r", r.remaining), ("t", r.reset_seconds)] },
        );
        if verdict.outcome.http_status() == 429 {
            each("retry-after", HeaderValue::Number(r.retry_after_ms.div_ceil(1000).max(1)));
        }
    }
    if verdict.outcome == Outcome::Valid && verdict.key.is_some() {
        each("x-api-key-scopes", HeaderValue::Scopes(verdict.granted_scopes()));
    }
}

/// The value of one of a verdict's headers, measured and written digit by
/// digit: `core::fmt`'s general machinery (padding, a call per piece) cost
/// more than the rest of a Verify's answer (BENCHMARKS.md, "Header values
/// without core::fmt"). `Display` writes the same bytes.
#[derive(Clone, Copy)]
pub enum HeaderValue<'a> {
    Number(u64),
    /// A structured-field item: `"name";k1=v1;k2=v2`.
    Item {
        name: &'a str,
        params: [(&'static str, u64); 2],
    },
    /// Every applied limit's `"name";q=…;w=…`, joined by `, `.
    Policies(&'a [AppliedLimit]),
    /// The granted scopes, joined by `,`.
    Scopes(&'a [String]),
}

/// The decimal digits of `n`.
fn digits(n: u64) -> usize {
    n.checked_ilog10().map_or(1, |d| d as usize + 1)
}

impl HeaderValue<'_> {
    /// The length of the value in bytes.
    pub fn len(&self) -> usize {
        fn item(name: &str, params: &[(&str, u64); 2]) -> usize {
            name.len() + 2 + params.iter().map(|(k, v)| 2 + k.len() + digits(*v)).sum::<usize>()
        }
        match self {
            HeaderValue::Number(n) => digits(*n),
            HeaderValue::Item { name, params } => item(name, params),
            HeaderValue::Policies(all) => {
                all.iter().map(|l| item(l.name.as_str(), &policy(l))).sum::<usize>() + 2 * all.len().saturating_sub(1)
            }
            HeaderValue::Scopes(all) => all.iter().map(String::len).sum::<usize>() + all.len().saturating_sub(1),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The value written into `out` when it fits (every value but long
    /// policy and scope lists), with its length: measured as it is
    /// written, digits straight into place, so that a short value costs
    /// one pass and its buffer one copy (`put_slice` per piece and
    /// `core::fmt` each cost more than the pieces).
    #[inline]
    pub fn render<'o>(&self, out: &'o mut [u8; 96]) -> Option<&'o [u8]> {
        let mut c = Cursor { out, at: 0 };
        match self {
            HeaderValue::Number(n) => c.number(*n),
            HeaderValue::Item { name, params } => c.item(name, params)?,
            HeaderValue::Policies(_) | HeaderValue::Scopes(_) => {
                let mut fits = true;
                self.write(&mut |b| fits = fits && c.bytes(b).is_some());
                if !fits {
                    return None;
                }
            }
        }
        let at = c.at;
        Some(&c.out[..at])
    }

    /// Hands the value's bytes to `put`, piece by piece, in order.
    pub fn write(&self, put: &mut impl FnMut(&[u8])) {
        fn number(n: u64, put: &mut impl FnMut(&[u8])) {
            put(itoa::Buffer::new().format(n).as_bytes());
        }
        fn item(name: &str, params: &[(&str, u64); 2], put: &mut impl FnMut(&[u8])) {
            put(b"\"");
            put(name.as_bytes());
            put(b"\"");
            for (k, v) in params {
                put(b";");
                put(k.as_bytes());
                put(b"=");
                number(*v, put);
            }
        }
        match self {
            HeaderValue::Number(n) => number(*n, put),
            HeaderValue::Item { name, params } => item(name, params, put),
            HeaderValue::Policies(all) => {
                for (i, l) in all.iter().enumerate() {
                    if i > 0 {
                        put(b", ");
                    }
                    item(l.name.as_str(), &policy(l), put);
                }
            }
            HeaderValue::Scopes(all) => {
                for (i, s) in all.iter().enumerate() {
                    if i > 0 {
                        put(b",");
                    }
                    put(s.as_bytes());
                }
            }
        }
    }
}

/// Writes into a fixed array; a piece that does not fit is refused.
struct Cursor<'o> {
    out: &'o mut [u8; 96],
    at: usize,
}

impl Cursor<'_> {
    #[inline]
    fn bytes(&mut self, b: &[u8]) -> Option<()> {
        self.out.get_mut(self.at..self.at + b.len())?.copy_from_slice(b);
        self.at += b.len();
        Some(())
    }

    /// Up to 20 digits: a lone number, or an item's, which [`Cursor::item`]
    /// makes room for.
    #[inline]
    fn number(&mut self, mut n: u64) {
        const PAIRS: &[u8; 200] = b"0001020304050607080910111213141516171819\
            2021222324252627282930313233343536373839\
            4041424344454647484950515253545556575859\
            6061626364656667686970717273747576777879\
            8081828384858687888990919293949596979899";
        let end = self.at + digits(n);
        let mut i = end;
        while n >= 100 {
            let pair = (n % 100) as usize * 2;
            n /= 100;
            i -= 2;
            self.out[i..i + 2].copy_from_slice(&PAIRS[pair..pair + 2]);
        }
        if n >= 10 {
            i -= 2;
            self.out[i..i + 2].copy_from_slice(&PAIRS[n as usize * 2..n as usize * 2 + 2]);
        } else {
            i -= 1;
            self.out[i] = b'0' + n as u8;
        }
        self.at = end;
    }

    /// `"name";k1=v1;k2=v2`, for a name of up to 32 bytes and parameter
    /// names of up to 18 together (the item then fits whatever its
    /// numbers: 2 + 32 + 2 × 3 + 18 + 2 × 20 ≤ 96).
    #[inline]
    fn item(&mut self, name: &str, params: &[(&'static str, u64); 2]) -> Option<()> {
        if name.len() > 32 || params[0].0.len() + params[1].0.len() > 18 {
            return None;
        }
        self.bytes(b"\"")?;
        self.bytes(name.as_bytes())?;
        self.bytes(b"\"")?;
        for (k, v) in params {
            self.bytes(b";")?;
            self.bytes(k.as_bytes())?;
            self.bytes(b"=")?;
            self.number(*v);
        }
        Some(())
    }
}

/// A limit's `ratelimit-policy` parameters.
fn policy(l: &AppliedLimit) -> [(&'static str, u64); 2] {
    [("q", l.state.limit), ("w", l.state.window_seconds)]
}

impl std::fmt::Display for HeaderValue<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut result = Ok(());
        self.write(&mut |bytes| {
            if result.is_ok() {
                // Every piece is ASCII digits, punctuation or a whole name.
                result = f.write_str(std::str::from_utf8(bytes).unwrap_or(""));
            }
        });
        result
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Header values are measured and written digit by digit: the bytes
    /// are those `core::fmt` wrote before, and the length is theirs, for
    /// any numbers (0, 9, 10, `u64::MAX`…), names and scope lists.
    #[test]
    fn header_values_are_what_format_wrote() {
        use proptest::prelude::*;
        let number = prop_oneof![
            any::<u64>(),
            (0u32..20).prop_map(|e| 10u64.saturating_pow(e)),
            (1u32..20).prop_map(|e| 10u64.saturating_pow(e) - 1),
            Just(0u64),
            Just(u64::MAX)
        ];
        let state = (number.clone(), number.clone(), number.clone(), number.clone(), number.clone()).prop_map(
            |(limit, remaining, reset_seconds, window_seconds, retry_after_ms)| RateState {
                limit,
                remaining,
                reset_seconds,
                window_seconds,
                retry_after_ms,
            },
        );
        let limit =
            ("[a-z0-9_-]{1,32}", state).prop_map(|(name, state)| AppliedLimit { name: name.parse().unwrap(), state });
        proptest!(|(n in number, limits in proptest::collection::vec(limit, 0..4),
                    scopes in proptest::collection::vec("[a-z:*é-]{0,12}", 0..5))| {
            let expect = |v: HeaderValue<'_>, text: String| -> Result<(), TestCaseError> {
                let mut written = Vec::new();
                v.write(&mut |b| written.extend_from_slice(b));
                prop_assert_eq!(String::from_utf8(written).unwrap(), text.clone());
                let mut stack = [0u8; 96];
                match v.render(&mut stack) {
                    Some(short) => prop_assert_eq!(short, text.as_bytes()),
                    None => prop_assert!(text.len() > 96),
                }
                prop_assert_eq!(v.to_string(), text.clone());
                prop_assert_eq!(v.len(), text.len());
                Ok(())
            };
            expect(HeaderValue::Number(n), format!("{n}"))?;
            for l in &limits {
                let (name, s) = (l.name.as_str(), &l.state);
                expect(HeaderValue::Item { name, params: [("q", s.limit), ("w", s.window_seconds)] },
                    format!("\"{name}\";q={};w={}", s.limit, s.window_seconds))?;
            }
            let policies: Vec<String> =
                limits.iter().map(|l| format!("\"{}\";q={};w={}", l.name, l.state.limit, l.state.window_seconds)).collect();
            expect(HeaderValue::Policies(&limits), policies.join(", "))?;
            expect(HeaderValue::Scopes(&scopes), scopes.join(","))?;
        });
    }

    #[test]
    fn trim_is_str_trim() {
        let chars = proptest::sample::select(vec!['a', ' ', '\t', '\u{a0}', '\u{2003}', 'é', '_', '\n', '\u{0}']);
        proptest::proptest!(|(s in proptest::collection::vec(chars, 0..8))| {
            let s: String = s.into_iter().collect();
            proptest::prop_assert_eq!(trim(&s), s.trim());
        });
    }

    /// The IPv4 fast path reads what the standard parser reads, and
    /// nothing it refuses (leading zeros, a fifth octet, 256, blanks).
    #[test]
    fn a_dotted_quad_is_what_the_standard_parser_reads() {
        for ip in ["0.0.0.0", "255.255.255.255", "203.0.113.9", "10.0.0.10", "01.2.3.4", "1.2.3.04", "1.2.3.256"] {
            assert_eq!(dotted_quad(ip.as_bytes()), ip.parse().ok(), "{ip:?}");
        }
        let chars = proptest::sample::select(vec!['0', '1', '2', '5', '9', '.', ' ', ':', 'a']);
        proptest::proptest!(proptest::test_runner::Config::with_cases(20_000), |(s in proptest::collection::vec(chars, 0..17))| {
            let s: String = s.into_iter().collect();
            proptest::prop_assert_eq!(dotted_quad(s.as_bytes()), s.parse::<std::net::Ipv4Addr>().ok(), "{:?}", s);
        });
    }

    #[test]
    fn a_key_is_never_taken_for_a_token() {
        use crate::token::looks_like_token;
        for not in ["ks_live_x.y.z", "", " ", "x", "Basic eyJ.a.b"] {
            assert!(!looks_like_token(not), "{not:?}");
        }
        for token in ["eyJh.eyJi.c2ln", " eyJh.eyJi.c2ln", "bearer eyJh.eyJi.c2ln", "\u{a0}eyJh.eyJi.c2ln"] {
            assert!(looks_like_token(token), "{token:?}");
        }
    }

    /// A limit as applied, with a 60-second window (the front ends' answer
    /// tests use it too).
    pub(crate) fn applied(name: &str, limit: u64, remaining: u64, reset: u64, retry_ms: u64) -> AppliedLimit {
        AppliedLimit {
            name: name.parse().unwrap(),
            state: RateState { limit, remaining, reset_seconds: reset, window_seconds: 60, retry_after_ms: retry_ms },
        }
    }

    fn with_limits(outcome: Outcome, limits: &[AppliedLimit]) -> Verdict {
        let mut v = Verdict::bare(outcome);
        v.limits = if limits.len() > 1 { limits.to_vec() } else { Vec::new() };
        v.rate = most_constraining(limits).copied();
        v
    }

    #[test]
    fn headers_with_one_limit() {
        let v = with_limits(Outcome::Valid, &[applied("integration", 1000, 999, 1, 0)]);
        assert_eq!(
            headers(&v, 1_700_000_000),
            vec![
                ("x-ratelimit-limit", "1000".to_string()),
                ("x-ratelimit-remaining", "999".to_string()),
                ("x-ratelimit-reset", "1700000001".to_string()),
                ("ratelimit-policy", "\"integration\";q=1000;w=60".to_string()),
                ("ratelimit", "\"integration\";r=999;t=1".to_string()),
            ]
        );
    }

    #[test]
    fn headers_with_three_limits_carry_the_most_constraining() {
        let limits = [
            applied("integration", 1000, 990, 1, 0),
            applied("analytics", 100, 3, 58, 0),
            applied("export", 10, 9, 6, 0),
        ];
        let h = headers(&with_limits(Outcome::Valid, &limits), 1_700_000_000);
        assert_eq!(h[0], ("x-ratelimit-limit", "100".to_string()));
        assert_eq!(h[1], ("x-ratelimit-remaining", "3".to_string()));
        assert_eq!(h[2], ("x-ratelimit-reset", "1700000058".to_string()));
        assert_eq!(
            h[3],
            (
                "ratelimit-policy",
                "\"integration\";q=1000;w=60, \"analytics\";q=100;w=60, \"export\";q=10;w=60".to_string()
            )
        );
        assert_eq!(h[4], ("ratelimit", "\"analytics\";r=3;t=58".to_string()));

        let denied = [applied("integration", 1000, 990, 1, 0), applied("export", 10, 0, 6, 6000)];
        let h = headers(&with_limits(Outcome::RateLimited, &denied), 1_700_000_000);
        assert_eq!(h[4], ("ratelimit", "\"export\";r=0;t=6".to_string()));
        assert_eq!(h[5], ("retry-after", "6".to_string()));
    }

    #[test]
    fn usage_codes_are_the_identifying_ones() {
        assert_eq!(Outcome::usage_codes().len(), 10);
        assert!(!Outcome::usage_codes().contains(&"NOT_FOUND"));
        assert_eq!(Outcome::ALL.len(), crate::cache::OUTCOMES);
    }

    #[test]
    fn outcomes_are_indexed_by_discriminant() {
        for (i, o) in Outcome::ALL.iter().enumerate() {
            assert_eq!(*o as usize, i);
        }
    }
}
