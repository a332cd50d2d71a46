//! Minting keys from the OS CSPRNG.

use std::fmt;

use super::format::display_prefix;
use super::{BASE62, Env, KEY_ID_LEN, KeyFormat, KeyId, KeyKind, SECRET_LEN, checksum};

/// A full key as handed to its owner, once. `Debug` and `Display` redact it;
/// [`FullKey::expose`] is the one way to read it.
#[derive(Clone, PartialEq, Eq)]
pub struct FullKey(String);

impl FullKey {
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn into_exposed(self) -> String {
        self.0
    }
}

impl fmt::Debug for FullKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FullKey({})", crate::secret::REDACTED)
    }
}

/// A freshly minted key.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub key: FullKey,
    pub key_id: KeyId,
    pub env: Env,
    /// `<prefix>_<env>_<key_id>`
    pub display_prefix: String,
}

/// Mints a secret key with the format's primary prefix.
pub fn generate(format: &KeyFormat, env: Env) -> NewKey {
    generate_kind(format, env, KeyKind::Secret)
}

/// Mints a key of `kind` with that kind's first prefix.
pub fn generate_kind(format: &KeyFormat, env: Env, kind: KeyKind) -> NewKey {
    let prefix = format.prefix_for(kind);
    let mut id = [0u8; KEY_ID_LEN];
    let mut secret = [0u8; SECRET_LEN];
    fill_base62(&mut id);
    fill_base62(&mut secret);
    let key_id = KeyId::from_bytes(&id).expect("base62 by construction");
    let key = assemble(prefix, env, key_id, &secret);
    NewKey { display_prefix: display_prefix(prefix, env, key_id), key, key_id, env }
}

/// Writes a key from its parts and appends the checksum. `secret` must be
/// base62; tests use this to build keys with a chosen key_id or secret.
pub fn assemble(prefix: &str, env: Env, key_id: KeyId, secret: &[u8]) -> FullKey {
    let mut s = String::with_capacity(prefix.len() + 54);
    s.push_str(prefix);
    s.push('_');
    s.push_str(env.as_str());
    s.push('_');
    s.push_str(key_id.as_str());
    s.push('_');
    s.push_str(std::str::from_utf8(secret).expect("ascii"));
    let sum = checksum::compute(s.as_bytes());
    s.push_str(std::str::from_utf8(&sum).expect("ascii"));
    FullKey(s)
}

/// Fills `out` with uniformly random base62 characters (rejection sampling, so
/// no character is more likely than another).
fn fill_base62(out: &mut [u8]) {
    let mut pool = [0u8; 64];
    let mut used = pool.len();
    for slot in out.iter_mut() {
        loop {
            if used == pool.len() {
                getrandom::fill(&mut pool).expect("the OS CSPRNG is unavailable");
                used = 0;
            }
            let b = pool[used];
            used += 1;
            // 248 = 4 * 62: the largest multiple of 62 that fits in a byte.
            if b < 248 {
                *slot = BASE62[(b % 62) as usize];
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_distinct_and_well_spread() {
        let f = KeyFormat::default();
        let a = generate(&f, Env::Live);
        let b = generate(&f, Env::Live);
        assert_ne!(a.key, b.key);
        assert_ne!(a.key_id, b.key_id);
        let mut seen = [false; 62];
        for _ in 0..200 {
            for c in generate(&f, Env::Live).key.expose()[17..49].bytes() {
                seen[BASE62.iter().position(|&x| x == c).unwrap()] = true;
            }
        }
        assert!(seen.iter().all(|&s| s), "every base62 character shows up");
    }

    #[test]
    fn display_prefix_is_the_part_up_to_the_key_id() {
        let k = generate(&KeyFormat::default(), Env::Test);
        assert!(k.key.expose().starts_with(&k.display_prefix));
        assert_eq!(k.display_prefix.len(), 16);
    }
}
