//! Parsing a presented credential. Pure and allocation-free: a key that fails
//! here is answered `MALFORMED` before any cache or store access.

use std::fmt;
use std::str::FromStr;

use super::{CHECKSUM_LEN, KEY_ID_LEN, MAX_PRESENTED_LEN, SECRET_LEN, all_base62, checksum, is_base62};

/// `_` + key_id + `_` + secret + checksum: everything after the env.
const TAIL_LEN: usize = 1 + KEY_ID_LEN + 1 + SECRET_LEN + CHECKSUM_LEN;
const ENV_LEN: usize = 4;
pub(crate) const MIN_PREFIX_LEN: usize = 2;
pub(crate) const MAX_PREFIX_LEN: usize = 12;

/// A key's environment: `live` for production, `test` for sandboxes and CI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Env {
    Live,
    Test,
}

impl Env {
    pub const ALL: [Env; 2] = [Env::Live, Env::Test];

    pub fn as_str(self) -> &'static str {
        match self {
            Env::Live => "live",
            Env::Test => "test",
        }
    }

    fn from_bytes(b: &[u8]) -> Option<Env> {
        match b {
            b"live" => Some(Env::Live),
            b"test" => Some(Env::Test),
            _ => None,
        }
    }
}

impl fmt::Display for Env {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Env {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Env::from_bytes(s.as_bytes()).ok_or_else(|| format!("unknown env {s:?}: expected \"live\" or \"test\""))
    }
}

/// What a key may be used for (README, "Key kinds"), told by its prefix
/// before any lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyKind {
    /// A server-side key: every check, every scope it holds.
    #[default]
    Secret,
    /// A site key that may sit in a browser: identifies a tenant, answers
    /// only requests for `public:` scopes (or none), optionally only from
    /// listed origins.
    Publishable,
    /// A secret key limited to an explicit list of scopes: no tiers, no
    /// wildcard patterns.
    Restricted,
}

impl KeyKind {
    pub const ALL: [KeyKind; 3] = [KeyKind::Secret, KeyKind::Publishable, KeyKind::Restricted];

    pub fn as_str(self) -> &'static str {
        match self {
            KeyKind::Secret => "secret",
            KeyKind::Publishable => "publishable",
            KeyKind::Restricted => "restricted",
        }
    }

    pub fn is_secret(&self) -> bool {
        *self == KeyKind::Secret
    }
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        KeyKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("unknown key kind {s:?}: expected \"secret\", \"publishable\" or \"restricted\""))
    }
}

/// The default prefix of each kind; `--key-prefix`,
/// `--publishable-key-prefix` and `--restricted-key-prefix` replace them.
pub const DEFAULT_PREFIXES: [(KeyKind, &str); 3] =
    [(KeyKind::Secret, "ks"), (KeyKind::Publishable, "kp"), (KeyKind::Restricted, "kr")];

/// The public, random 8-character identifier of a key. It names the key in
/// logs, listings and the admin API; it is not a secret.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct KeyId([u8; KEY_ID_LEN]);

/// Hashed as one word: a key_id is looked up in several maps per Verify
/// (README, "Performance"), and eight bytes need no length prefix.
impl std::hash::Hash for KeyId {
    #[inline]
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(u64::from_ne_bytes(self.0));
    }
}

impl KeyId {
    /// Builds a key id from 8 base62 bytes.
    pub fn from_bytes(b: &[u8]) -> Option<KeyId> {
        if b.len() != KEY_ID_LEN || !b.iter().all(|&c| is_base62(c)) {
            return None;
        }
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(b);
        Some(KeyId(id))
    }

    pub fn as_str(&self) -> &str {
        debug_assert!(self.0.iter().all(|&c| is_base62(c)));
        // SAFETY: a key id is built only from base62 bytes (`from_bytes`
        // and `KeyFormat::parse` check them), which are ASCII. Read on
        // every answer, where the check cost more than the copy of the id.
        unsafe { std::str::from_utf8_unchecked(&self.0) }
    }

    pub fn as_bytes(&self) -> &[u8; KEY_ID_LEN] {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({})", self.as_str())
    }
}

impl FromStr for KeyId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        KeyId::from_bytes(s.as_bytes()).ok_or_else(|| "key_id must be 8 characters of [0-9A-Za-z]".to_string())
    }
}

/// Why a presented credential is not a well-formed key. Carries no part of
/// the credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("the API key is empty")]
    Empty,
    #[error("the API key is longer than 512 bytes")]
    TooLong,
    #[error("the API key does not have the expected length or structure")]
    Structure,
    #[error("the API key's prefix is not accepted here")]
    Prefix,
    #[error("the API key's environment is unknown or not accepted here")]
    Env,
    #[error("the API key contains characters outside [0-9A-Za-z]")]
    Alphabet,
    #[error("the API key's checksum does not match; it was probably mistyped or truncated")]
    Checksum,
}

/// A credential that passed every offline check. Borrows the secret from the
/// request; its `Debug` never shows it.
#[derive(Clone, Copy)]
pub struct PresentedKey<'a> {
    pub prefix: &'a str,
    /// Told by the prefix; the stored record must agree.
    pub kind: KeyKind,
    pub env: Env,
    pub key_id: KeyId,
    secret: &'a [u8],
}

impl<'a> PresentedKey<'a> {
    /// The 32 secret bytes. Only the hashing code should need them.
    pub fn secret(&self) -> &'a [u8] {
        self.secret
    }
}

impl fmt::Debug for PresentedKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PresentedKey({}_{}_{}_{})", self.prefix, self.env, self.key_id, crate::secret::REDACTED)
    }
}

/// What a deployment accepts: the prefixes of each kind (the first of a
/// kind is used for new keys of that kind) and environments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFormat {
    /// Secret keys' prefixes.
    prefixes: Vec<String>,
    publishable: Vec<String>,
    restricted: Vec<String>,
    accept_live: bool,
    accept_test: bool,
}

impl Default for KeyFormat {
    fn default() -> Self {
        let of = |kind| DEFAULT_PREFIXES.iter().filter(|(k, _)| *k == kind).map(|(_, p)| p.to_string()).collect();
        KeyFormat {
            prefixes: of(KeyKind::Secret),
            publishable: of(KeyKind::Publishable),
            restricted: of(KeyKind::Restricted),
            accept_live: true,
            accept_test: true,
        }
    }
}

impl KeyFormat {
    /// Validates prefixes (2–12 chars of `[a-z0-9]`, at least one) and envs
    /// (at least one). Returns every problem found.
    pub fn new(prefixes: Vec<String>, envs: &[Env]) -> Result<KeyFormat, Vec<String>> {
        let mut errors = Vec::new();
        if prefixes.is_empty() {
            errors.push("at least one key prefix is required".to_string());
        }
        for p in &prefixes {
            if !valid_prefix(p) {
                errors.push(format!("key prefix {p:?} must be 2-12 characters of [a-z0-9]"));
            }
        }
        if envs.is_empty() {
            errors.push("at least one env must be accepted".to_string());
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        // The other kinds keep their defaults unless a secret prefix took one.
        let default = KeyFormat::default();
        let free = |list: Vec<String>| list.into_iter().filter(|p| !prefixes.contains(p)).collect::<Vec<_>>();
        Ok(KeyFormat {
            publishable: free(default.publishable),
            restricted: free(default.restricted),
            prefixes,
            accept_live: envs.contains(&Env::Live),
            accept_test: envs.contains(&Env::Test),
        })
    }

    /// Sets the publishable and restricted keys' prefixes (an empty list
    /// keeps the default). A prefix names one kind only. Returns every
    /// problem found.
    pub fn with_kind_prefixes(
        mut self,
        publishable: Vec<String>,
        restricted: Vec<String>,
    ) -> Result<KeyFormat, Vec<String>> {
        let mut errors = Vec::new();
        for (flag, list) in [("--publishable-key-prefix", &publishable), ("--restricted-key-prefix", &restricted)] {
            for p in list {
                if !valid_prefix(p) {
                    errors.push(format!("{flag} {p:?} must be 2-12 characters of [a-z0-9]"));
                }
            }
        }
        if !publishable.is_empty() {
            self.publishable = publishable;
        }
        if !restricted.is_empty() {
            self.restricted = restricted;
        }
        let mut seen: Vec<(&str, KeyKind)> = Vec::new();
        for kind in KeyKind::ALL {
            for p in self.prefixes_of(kind) {
                match seen.iter().find(|(q, _)| q == p) {
                    Some((_, other)) => errors.push(format!(
                        "key prefix {p:?} is given to {other} and {kind} keys; each kind needs its own prefix"
                    )),
                    None => seen.push((p, kind)),
                }
            }
        }
        if self.publishable.is_empty() || self.restricted.is_empty() {
            errors.push(
                "publishable and restricted keys need a prefix of their own: set --publishable-key-prefix and --restricted-key-prefix"
                    .to_string(),
            );
        }
        if errors.is_empty() { Ok(self) } else { Err(errors) }
    }

    /// The prefix new secret keys are minted with.
    pub fn primary_prefix(&self) -> &str {
        &self.prefixes[0]
    }

    /// Every accepted prefix of `kind`, the one new keys get first.
    pub fn prefixes_of(&self, kind: KeyKind) -> &[String] {
        match kind {
            KeyKind::Secret => &self.prefixes,
            KeyKind::Publishable => &self.publishable,
            KeyKind::Restricted => &self.restricted,
        }
    }

    /// The prefix new keys of `kind` are minted with.
    pub fn prefix_for(&self, kind: KeyKind) -> &str {
        self.prefixes_of(kind).first().map_or(self.primary_prefix(), String::as_str)
    }

    pub fn accepts_env(&self, env: Env) -> bool {
        match env {
            Env::Live => self.accept_live,
            Env::Test => self.accept_test,
        }
    }

    /// Parses a credential as presented in a header: optional `Bearer ` (any
    /// case) and surrounding whitespace are stripped.
    pub fn parse<'a>(&self, raw: &'a str) -> Result<PresentedKey<'a>, Malformed> {
        if raw.len() > super::MAX_PRESENTED_LEN {
            return Err(Malformed::TooLong);
        }
        let mut s = crate::verdict::trim(raw);
        let b = s.as_bytes();
        if b.len() >= 6 && b[..6].eq_ignore_ascii_case(b"bearer") && (b.len() == 6 || b[6].is_ascii_whitespace()) {
            s = s[6..].trim_start();
        }
        let b = s.as_bytes();
        let n = b.len();
        if n == 0 {
            return Err(Malformed::Empty);
        }
        if !(MIN_PREFIX_LEN + 1 + ENV_LEN + TAIL_LEN..=MAX_PREFIX_LEN + 1 + ENV_LEN + TAIL_LEN).contains(&n) {
            return Err(Malformed::Structure);
        }
        let body_end = n - CHECKSUM_LEN;
        let secret_start = body_end - SECRET_LEN;
        let id_start = secret_start - 1 - KEY_ID_LEN;
        let env_start = id_start - 1 - ENV_LEN;
        let prefix_end = env_start - 1;
        if b[prefix_end] != b'_' || b[id_start - 1] != b'_' || b[secret_start - 1] != b'_' {
            return Err(Malformed::Structure);
        }
        let prefix = &b[..prefix_end];
        let is = |list: &[String]| list.iter().any(|p| p.as_bytes() == prefix);
        let kind = if is(&self.prefixes) {
            KeyKind::Secret
        } else if is(&self.publishable) {
            KeyKind::Publishable
        } else if is(&self.restricted) {
            KeyKind::Restricted
        } else {
            return Err(Malformed::Prefix);
        };
        let env = Env::from_bytes(&b[env_start..id_start - 1]).ok_or(Malformed::Env)?;
        if !self.accepts_env(env) {
            return Err(Malformed::Env);
        }
        let id = &b[id_start..secret_start - 1];
        if !(all_base62(id) & all_base62(&b[secret_start..])) {
            return Err(Malformed::Alphabet);
        }
        if !checksum::verify(&b[..body_end], &b[body_end..]) {
            return Err(Malformed::Checksum);
        }
        let key_id = KeyId(id.try_into().map_err(|_| Malformed::Structure)?);
        Ok(PresentedKey { prefix: &s[..prefix_end], kind, env, key_id, secret: &b[secret_start..body_end] })
    }
}

pub(crate) fn valid_prefix(p: &str) -> bool {
    (MIN_PREFIX_LEN..=MAX_PREFIX_LEN).contains(&p.len())
        && p.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
}

/// `<prefix>_<env>_<key_id>`: how a key is shown everywhere but at creation.
pub fn display_prefix(prefix: &str, env: Env, key_id: KeyId) -> String {
    format!("{prefix}_{env}_{key_id}")
}

#[allow(dead_code)]
const _: () = assert!(MAX_PREFIX_LEN + 1 + ENV_LEN + TAIL_LEN <= MAX_PRESENTED_LEN);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::generate;

    fn fmt() -> KeyFormat {
        KeyFormat::default()
    }

    #[test]
    fn parses_a_generated_key_with_bearer_and_whitespace() {
        let k = generate(&fmt(), Env::Live);
        let raw = format!("  bEaReR   {}\n", k.key.expose());
        let p = fmt().parse(&raw).unwrap();
        assert_eq!(p.key_id, k.key_id);
        assert_eq!(p.env, Env::Live);
        assert_eq!(p.prefix, "ks");
        assert_eq!(p.secret().len(), 32);
    }

    #[test]
    fn default_key_is_55_characters() {
        let k = generate(&fmt(), Env::Test);
        assert_eq!(k.key.expose().len(), 55);
        assert!(k.key.expose().starts_with("ks_test_"));
    }

    #[test]
    fn rejects_each_kind_of_damage() {
        let f = fmt();
        let k = generate(&f, Env::Live);
        let s = k.key.expose().to_string();
        assert_eq!(f.parse("").unwrap_err(), Malformed::Empty);
        assert_eq!(f.parse("Bearer ").unwrap_err(), Malformed::Empty);
        assert_eq!(f.parse(&"a".repeat(513)).unwrap_err(), Malformed::TooLong);
        assert_eq!(f.parse(&s[..54]).unwrap_err(), Malformed::Structure);
        assert_eq!(f.parse(&s.replacen("ks_", "xx_", 1)).unwrap_err(), Malformed::Prefix);
        assert_eq!(f.parse(&s.replacen("_live_", "_prod_", 1)).unwrap_err(), Malformed::Env);
        let mut bad = s.clone().into_bytes();
        bad[20] = b'-';
        assert_eq!(f.parse(std::str::from_utf8(&bad).unwrap()).unwrap_err(), Malformed::Alphabet);
        let mut bad = s.clone().into_bytes();
        bad[54] = if bad[54] == b'0' { b'1' } else { b'0' };
        assert_eq!(f.parse(std::str::from_utf8(&bad).unwrap()).unwrap_err(), Malformed::Checksum);
    }

    #[test]
    fn refused_env_and_extra_prefixes() {
        let f = KeyFormat::new(vec!["acme".into(), "ks".into()], &[Env::Live]).unwrap();
        let live = generate(&fmt(), Env::Live);
        let test = generate(&fmt(), Env::Test);
        assert!(f.parse(live.key.expose()).is_ok(), "secondary prefix accepted");
        assert_eq!(f.parse(test.key.expose()).unwrap_err(), Malformed::Env);
        let acme = generate(&f, Env::Live);
        assert!(acme.key.expose().starts_with("acme_live_"));
        assert!(f.parse(acme.key.expose()).is_ok());
    }

    #[test]
    fn the_prefix_tells_the_kind() {
        let f = KeyFormat::new(vec!["sk".into()], &Env::ALL)
            .unwrap()
            .with_kind_prefixes(vec!["pk".into()], vec!["rk".into()])
            .unwrap();
        for kind in KeyKind::ALL {
            let k = crate::key::generate_kind(&f, Env::Live, kind);
            assert!(k.key.expose().starts_with(&format!("{}_live_", f.prefix_for(kind))));
            assert_eq!(f.prefix_for(kind).as_bytes()[0], kind.as_str().as_bytes()[0], "sk, pk, rk");
            assert_eq!(f.parse(k.key.expose()).unwrap().kind, kind);
        }
        let default = generate(&fmt(), Env::Live);
        assert_eq!(f.parse(default.key.expose()).unwrap_err(), Malformed::Prefix, "ks is no longer accepted");
        assert_eq!(
            fmt().parse(crate::key::generate_kind(&fmt(), Env::Test, KeyKind::Publishable).key.expose()).unwrap().kind,
            KeyKind::Publishable
        );
    }

    #[test]
    fn a_prefix_names_one_kind() {
        let errs = KeyFormat::new(vec!["sk".into()], &Env::ALL)
            .unwrap()
            .with_kind_prefixes(vec!["sk".into()], vec!["Rk".into()])
            .unwrap_err();
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs.iter().any(|e| e.contains("\"sk\" is given to secret and publishable")), "{errs:?}");
        // A secret prefix that takes a kind's default leaves that kind without
        // one, said at start.
        let errs =
            KeyFormat::new(vec!["kp".into()], &Env::ALL).unwrap().with_kind_prefixes(vec![], vec![]).unwrap_err();
        assert!(errs[0].contains("--publishable-key-prefix"), "{errs:?}");
    }

    #[test]
    fn format_validation_reports_every_error() {
        let errs = KeyFormat::new(vec!["A".into(), "toolongprefix1".into()], &[]).unwrap_err();
        assert_eq!(errs.len(), 3, "{errs:?}");
    }

    #[test]
    fn debug_redacts_the_secret() {
        let k = generate(&fmt(), Env::Live);
        let p = fmt().parse(k.key.expose()).unwrap();
        let secret = std::str::from_utf8(p.secret()).unwrap().to_string();
        assert!(!format!("{p:?}").contains(&secret));
        assert!(!format!("{k:?}").contains(&secret));
    }

    #[test]
    fn key_id_from_str() {
        assert!("7Hq2mZp0".parse::<KeyId>().is_ok());
        assert!("7Hq2mZp".parse::<KeyId>().is_err());
        assert!("7Hq2mZp_".parse::<KeyId>().is_err());
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn every_generated_key_parses(live in any::<bool>()) {
                let env = if live { Env::Live } else { Env::Test };
                let k = generate(&fmt(), env);
                let p = fmt().parse(k.key.expose()).unwrap();
                prop_assert_eq!(p.key_id, k.key_id);
            }

            #[test]
            fn any_single_character_change_is_rejected(pos in 0usize..55, c in proptest::char::range('!', '~')) {
                let k = generate(&fmt(), Env::Live);
                let mut bytes = k.key.expose().as_bytes().to_vec();
                prop_assume!(bytes[pos] != c as u8);
                bytes[pos] = c as u8;
                let s = String::from_utf8(bytes).unwrap();
                prop_assert!(fmt().parse(&s).is_err(), "accepted a damaged key");
            }
        }
    }
}
