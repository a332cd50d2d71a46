//! Values that must never be shown: [`Secret`] (the pepper given inline, an
//! admin key) and [`RedisUrl`] (which may carry a password). Their `Debug`
//! redacts; [`redact_url`] is the one place a URL's password is hidden, for
//! logs, summaries and error messages alike (STYLE.md, "Log messages").

/// What a redacted value shows.
pub const REDACTED: &str = "<redacted>";

/// Implements `Debug` for a struct whose `key` field holds a full API key:
/// the key shows as [`REDACTED`], the listed fields as they are. The one
/// way request and response types (domain and generated) hide a key.
macro_rules! debug_without_key {
    ($ty:ty, $name:literal, [$($field:ident),*]) => {
        impl std::fmt::Debug for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct($name)
                    .field("key", &$crate::secret::REDACTED)
                    $(.field(stringify!($field), &self.$field))*
                    .finish()
            }
        }
    };
}
pub(crate) use debug_without_key;

/// A secret given on the command line, in the environment or in a file.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    /// The secret itself, for the one place that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_string()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(REDACTED)
    }
}

/// A Redis URL. `Debug` and `Display` show it with the password hidden.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl(Secret);

impl RedisUrl {
    pub fn new(url: impl Into<String>) -> RedisUrl {
        RedisUrl(Secret::new(url))
    }

    /// The URL with its password, for the connection only.
    pub fn expose(&self) -> &str {
        self.0.expose()
    }
}

impl std::str::FromStr for RedisUrl {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(RedisUrl::new(s))
    }
}

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&redact_url(self.expose()))
    }
}

impl std::fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&redact_url(self.expose()))
    }
}

/// Hides the password of a Redis URL: `redis://user:secret@host` →
/// `redis://user:***@host`, and `…?pass=secret` → `…?pass=***`.
pub fn redact_url(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let base = match (base.find("://"), base.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &base[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &base[..scheme + 3], &base[at..]),
                // `redis://secret@host`: a lone userinfo is the password.
                None => format!("{}***{}", &base[..scheme + 3], &base[at..]),
            }
        }
        _ => base.to_string(),
    };
    match query {
        None => base,
        Some(q) => {
            let params: Vec<String> = q
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("pass") || k.eq_ignore_ascii_case("password") => {
                        format!("{k}=***")
                    }
                    _ => p.to_string(),
                })
                .collect();
            format!("{base}?{}", params.join("&"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted() {
        assert_eq!(redact_url("redis://app:hunter2@redis:6379/0"), "redis://app:***@redis:6379/0");
        assert_eq!(redact_url("redis://redis:6379"), "redis://redis:6379");
        assert_eq!(redact_url("unix:///run/redis.sock?db=1&pass=hunter2"), "unix:///run/redis.sock?db=1&pass=***");
        assert_eq!(redact_url("redis://hunter2@redis"), "redis://***@redis");
    }

    #[test]
    fn debug_never_shows_a_secret() {
        let shown = format!(
            "{:?} {:?} {}",
            Secret::new("hunter2"),
            RedisUrl::new("redis://:hunter2@h"),
            RedisUrl::new("redis://:hunter2@h")
        );
        assert!(!shown.contains("hunter2"), "{shown}");
    }
}
