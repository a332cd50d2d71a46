//! CRC32 (IEEE) of every byte before the checksum, written big-endian in six
//! base62 digits (`0-9A-Za-z`), left-padded with `0`.
//!
//! ```
//! use keystile::key::checksum;
//! assert_eq!(checksum::encode(0), *b"000000");
//! assert_eq!(checksum::encode(61), *b"00000z");
//! assert_eq!(checksum::encode(u32::MAX), *b"4gfFC3");
//! ```

use super::{BASE62, CHECKSUM_LEN};

/// The checksum of `body` (everything before the checksum) as base62 digits.
#[inline]
pub fn compute(body: &[u8]) -> [u8; CHECKSUM_LEN] {
    encode(crc32fast::hash(body))
}

/// Writes `value` as six base62 digits, most significant first.
#[inline]
pub fn encode(mut value: u32) -> [u8; CHECKSUM_LEN] {
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(value % 62) as usize];
        value /= 62;
    }
    out
}

/// Whether `checksum` is the checksum of `body`.
#[inline]
pub fn verify(body: &[u8], checksum: &[u8]) -> bool {
    checksum == compute(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_big_endian_base62() {
        assert_eq!(&encode(10), b"00000A");
        assert_eq!(&encode(36), b"00000a");
        assert_eq!(&encode(62), b"000010");
        // 62^6 > 2^32, so six digits always suffice.
        assert_eq!(&encode(u32::MAX), b"4gfFC3");
    }

    #[test]
    fn matches_crc32_ieee() {
        // The CRC32 (IEEE) check value of "123456789" is 0xCBF43926.
        assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926);
        assert_eq!(compute(b"123456789"), encode(0xCBF4_3926));
        assert!(verify(b"123456789", &encode(0xCBF4_3926)));
        assert!(!verify(b"123456780", &encode(0xCBF4_3926)));
    }
}
