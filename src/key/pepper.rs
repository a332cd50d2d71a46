//! Secrets are stored only as a BLAKE3 keyed hash under a server pepper. The
//! pepper never reaches the store; its id does, so peppers can be rotated: new
//! keys use the current pepper, old hashes still verify under theirs.

use std::fmt;

use super::{KEY_ID_LEN, KeyId, KeyKind};

/// A 32-byte server secret. `Debug` shows only its id.
#[derive(Clone)]
pub struct Pepper {
    id: String,
    key: [u8; 32],
}

impl Pepper {
    /// The id is derived from the pepper itself (a one-way BLAKE3 derivation),
    /// so operators never have to keep the two in sync.
    pub fn new(key: [u8; 32]) -> Pepper {
        let derived = blake3::derive_key("keystile 2026 pepper id v1", &key);
        let id = derived[..4].iter().map(|b| format!("{b:02x}")).collect();
        Pepper { id, key }
    }

    /// Parses a pepper as stored in a file or environment variable: 64 hex
    /// characters (surrounding whitespace ignored) or exactly 32 raw bytes.
    pub fn parse(bytes: &[u8]) -> Result<Pepper, String> {
        if bytes.len() == 32 && std::str::from_utf8(bytes).map(|s| s.trim().len() != 64).unwrap_or(true) {
            let mut key = [0u8; 32];
            key.copy_from_slice(bytes);
            return Ok(Pepper::new(key));
        }
        let text = std::str::from_utf8(bytes)
            .map_err(|_| "the pepper must be 64 hex characters or 32 raw bytes".to_string())?;
        let hex = text.trim();
        if hex.len() != 64 || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!("the pepper must be 64 hex characters or 32 raw bytes (got {} characters)", hex.len()));
        }
        let mut key = [0u8; 32];
        for (i, slot) in key.iter_mut().enumerate() {
            *slot = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("validated hex");
        }
        Ok(Pepper::new(key))
    }

    /// Parses a pepper as an operator gives it: 64 hex characters
    /// (surrounding whitespace ignored), not all zeros.
    pub fn parse_hex(text: &str) -> Result<Pepper, String> {
        let hex = text.trim();
        if hex.len() != 64 || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!("the pepper must be 64 hex characters (got {} characters)", hex.chars().count()));
        }
        if hex.bytes().all(|c| c == b'0') {
            return Err("the pepper is all zeros: generate one with `openssl rand -hex 32`".into());
        }
        Pepper::parse(hex.as_bytes())
    }

    /// A fresh random pepper (for `serve --dev`).
    pub fn random() -> Pepper {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).expect("the OS CSPRNG is unavailable");
        Pepper::new(key)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// A 32-byte key for `context`, derived from the pepper (one-way): what
    /// seals token signing keys in the store, without the pepper itself
    /// ever serving two purposes.
    pub fn derive_key(&self, context: &str) -> [u8; 32] {
        let mut material = Vec::with_capacity(context.len() + 32);
        material.extend_from_slice(&self.key);
        material.extend_from_slice(context.as_bytes());
        blake3::derive_key("keystile 2026 pepper-derived key v1", &material)
    }

    /// The keyed hash of a key's secret. The key id is hashed in too, so a
    /// hash cannot be moved from one record to another.
    #[inline]
    pub fn hash(&self, key_id: KeyId, secret: &[u8]) -> blake3::Hash {
        self.hash_of(key_id, KeyKind::Secret, secret)
    }

    /// The keyed hash of a key of `kind`: a publishable or restricted key's
    /// kind is hashed in (README, "Key kinds"), so its secret, re-prefixed
    /// as another kind's, matches nothing even where the stored kind were
    /// not compared. A secret key's hash is as it always was.
    #[inline]
    pub fn hash_of(&self, key_id: KeyId, kind: KeyKind, secret: &[u8]) -> blake3::Hash {
        // A secret key's input (key_id and secret: 40 bytes) is one block,
        // hashed at once: the streaming hasher costs more than the
        // compression itself (BENCHMARKS, "In process (criterion)"). The
        // bytes hashed are the same either way.
        if kind == KeyKind::Secret && secret.len() <= ONE_SHOT_SECRET {
            let mut input = [0u8; KEY_ID_LEN + ONE_SHOT_SECRET];
            let n = KEY_ID_LEN + secret.len();
            input[..KEY_ID_LEN].copy_from_slice(key_id.as_bytes());
            input[KEY_ID_LEN..n].copy_from_slice(secret);
            return blake3::keyed_hash(&self.key, &input[..n]);
        }
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(key_id.as_bytes());
        if kind != KeyKind::Secret {
            h.update(b"\0kind:");
            h.update(kind.as_str().as_bytes());
            h.update(b"\0");
        }
        h.update(secret);
        h.finalize()
    }
}

/// Secrets up to this length are hashed from one buffer on the stack.
const ONE_SHOT_SECRET: usize = 56;

impl fmt::Debug for Pepper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pepper(id={}, {})", self.id, crate::secret::REDACTED)
    }
}

/// The current pepper plus older ones still needed to verify existing keys.
#[derive(Debug, Clone)]
pub struct PepperSet {
    current: Pepper,
    previous: Vec<Pepper>,
}

impl PepperSet {
    pub fn new(current: Pepper, previous: Vec<Pepper>) -> PepperSet {
        PepperSet { current, previous }
    }

    pub fn single(current: Pepper) -> PepperSet {
        PepperSet { current, previous: Vec::new() }
    }

    pub fn current(&self) -> &Pepper {
        &self.current
    }

    pub fn by_id(&self, id: &str) -> Option<&Pepper> {
        std::iter::once(&self.current).chain(&self.previous).find(|p| p.id == id)
    }

    /// Hashes a new secret under the current pepper.
    pub fn seal(&self, key_id: KeyId, secret: &[u8]) -> SecretHash {
        self.seal_kind(key_id, KeyKind::Secret, secret)
    }

    /// [`PepperSet::seal`] for a key of `kind`.
    pub fn seal_kind(&self, key_id: KeyId, kind: KeyKind, secret: &[u8]) -> SecretHash {
        SecretHash { pepper_id: self.current.id.as_str().into(), hash: self.current.hash_of(key_id, kind, secret) }
    }

    /// Whether `secret` matches `stored`, in constant time.
    #[inline]
    pub fn matches(&self, stored: &SecretHash, key_id: KeyId, secret: &[u8]) -> bool {
        self.matches_kind(stored, key_id, KeyKind::Secret, secret)
    }

    /// Whether a presented key of `kind` matches `stored`, in constant time.
    #[inline]
    pub fn matches_kind(&self, stored: &SecretHash, key_id: KeyId, kind: KeyKind, secret: &[u8]) -> bool {
        let pepper = if stored.pepper_id == self.current.id {
            &self.current
        } else {
            match self.by_id(&stored.pepper_id) {
                Some(p) => p,
                None => return false,
            }
        };
        // blake3::Hash's PartialEq is constant-time.
        pepper.hash_of(key_id, kind, secret) == stored.hash
    }
}

/// What the store keeps of a secret: the keyed hash and the pepper's id.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretHash {
    pub pepper_id: compact_str::CompactString,
    pub hash: blake3::Hash,
}

impl SecretHash {
    /// `<pepper_id>:<hex>`, the stored form.
    pub fn encode(&self) -> String {
        format!("{}:{}", self.pepper_id, self.hash.to_hex())
    }

    pub fn decode(s: &str) -> Option<SecretHash> {
        let (id, hex) = s.split_once(':')?;
        Some(SecretHash { pepper_id: id.into(), hash: blake3::Hash::from_hex(hex).ok()? })
    }
}

impl fmt::Debug for SecretHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretHash(pepper={}, {})", self.pepper_id, crate::secret::REDACTED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stored hashes stay valid: the one-shot hash of a short secret is
    /// the streamed hash of the same bytes, for every length and kind.
    #[test]
    fn a_short_secret_hashes_as_it_always_did() {
        let p = Pepper::parse(&[7u8; 32]).unwrap();
        let id: KeyId = "abcdEFGH".parse().unwrap();
        for len in 0..=ONE_SHOT_SECRET + 8 {
            let secret: Vec<u8> = (0..len as u8).map(|i| b'a' + i % 26).collect();
            for kind in [KeyKind::Secret, KeyKind::Publishable, KeyKind::Restricted] {
                let mut streamed = blake3::Hasher::new_keyed(&p.key);
                streamed.update(id.as_bytes());
                if kind != KeyKind::Secret {
                    streamed.update(b"\0kind:");
                    streamed.update(kind.as_str().as_bytes());
                    streamed.update(b"\0");
                }
                streamed.update(&secret);
                assert_eq!(p.hash_of(id, kind, &secret), streamed.finalize(), "{len} bytes, {kind:?}");
            }
        }
    }

    #[test]
    fn parses_hex_and_raw_and_rejects_garbage() {
        let hex = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n";
        let a = Pepper::parse(hex.as_bytes()).unwrap();
        let b = Pepper::parse(&[7u8; 32]).unwrap();
        assert_ne!(a.id(), b.id());
        assert_eq!(a.id().len(), 8);
        let err = Pepper::parse(b"short").unwrap_err();
        assert!(err.contains("64 hex"), "{err}");
        assert!(!format!("{a:?}").contains("0011"));
    }

    #[test]
    fn seal_and_match_across_rotation() {
        let id: KeyId = "abcdEFGH".parse().unwrap();
        let old = PepperSet::single(Pepper::parse(&[1u8; 32]).unwrap());
        let sealed = old.seal(id, b"secret");
        assert!(old.matches(&sealed, id, b"secret"));
        assert!(!old.matches(&sealed, id, b"secreT"));
        assert!(!old.matches(&sealed, "abcdEFGX".parse().unwrap(), b"secret"));
        let rotated = PepperSet::new(Pepper::parse(&[2u8; 32]).unwrap(), vec![Pepper::parse(&[1u8; 32]).unwrap()]);
        assert!(rotated.matches(&sealed, id, b"secret"));
        let unknown = PepperSet::single(Pepper::parse(&[3u8; 32]).unwrap());
        assert!(!unknown.matches(&sealed, id, b"secret"));
        // The kind is hashed in for publishable and restricted keys.
        let publishable = old.seal_kind(id, crate::key::KeyKind::Publishable, b"secret");
        assert!(old.matches_kind(&publishable, id, crate::key::KeyKind::Publishable, b"secret"));
        assert!(!old.matches(&publishable, id, b"secret"), "not as a secret key");
        assert!(!old.matches_kind(&publishable, id, crate::key::KeyKind::Restricted, b"secret"));
        assert_eq!(old.seal_kind(id, crate::key::KeyKind::Secret, b"secret"), sealed, "secret keys' hashes unchanged");
        assert_eq!(SecretHash::decode(&sealed.encode()).unwrap(), sealed);
    }
}
