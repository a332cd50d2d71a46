//! The key format (README, "Key format"): `<prefix>_<env>_<key_id>_<secret><checksum>`.
//!
//! - [`format`] parses a presented credential without allocating,
//! - [`checksum`] is the CRC32-in-base62 tail that lets anyone (including
//!   secret scanners) reject a mistyped key offline,
//! - [`generate`] mints new keys from the OS CSPRNG,
//! - [`pepper`] turns a secret into the keyed hash that the store holds.

pub mod checksum;
pub mod format;
pub mod generate;
pub mod pepper;

pub use format::{Env, KeyFormat, KeyId, KeyKind, Malformed, PresentedKey};
pub use generate::{FullKey, NewKey, assemble, generate, generate_kind};
pub use pepper::{Pepper, PepperSet, SecretHash};

/// `0-9A-Za-z`: value 0 is `0`, 10 is `A`, 36 is `a`.
pub const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Length of the public key id.
pub const KEY_ID_LEN: usize = 8;
/// Length of the random secret (≈190 bits).
pub const SECRET_LEN: usize = 32;
/// Length of the base62 checksum.
pub const CHECKSUM_LEN: usize = 6;
/// Longest credential accepted before any parsing.
pub const MAX_PRESENTED_LEN: usize = 512;

#[inline]
pub(crate) fn is_base62(b: u8) -> bool {
    b.is_ascii_alphanumeric()
}

/// Whether every byte of `s` is base62, without a branch per byte: a
/// presented key's 46 characters are checked on every Verify.
#[inline]
pub(crate) fn all_base62(s: &[u8]) -> bool {
    s.iter().fold(true, |ok, &c| ok & ((c | 0x20).wrapping_sub(b'a') < 26 || c.wrapping_sub(b'0') < 10))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_branchless_alphabet_check_is_the_alphabet() {
        for c in 0..=255u8 {
            assert_eq!(super::all_base62(&[c]), super::is_base62(c), "byte {c:#x}");
            assert_eq!(super::all_base62(&[b'a', c, b'Z']), super::is_base62(c), "byte {c:#x}");
        }
        assert!(super::all_base62(b""));
    }
}
