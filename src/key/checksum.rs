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

/// Whether `checksum` is the checksum of `body`. The digits are read as a
/// number and compared with the CRC: the same answer as comparing with
/// [`compute`]'s digits (six digits name each number below 62^6 once), at
/// a third of the cost on every key presented (BENCHMARKS, "In process
/// (criterion)").
#[inline]
pub fn verify(body: &[u8], checksum: &[u8]) -> bool {
    decode(checksum) == Some(crc32fast::hash(body) as u64)
}

/// The number six base62 digits write; `None` for any other input.
#[inline]
fn decode(digits: &[u8]) -> Option<u64> {
    let digits: &[u8; CHECKSUM_LEN] = digits.try_into().ok()?;
    let mut value = 0u64;
    let mut bad = 0u8;
    for &c in digits {
        let d = DIGIT[c as usize];
        bad |= d;
        value = value * 62 + (d & 63) as u64;
    }
    (bad & 0x80 == 0).then_some(value)
}

/// Each byte's value as a base62 digit; 0xFF for a byte that is none.
const DIGIT: [u8; 256] = {
    let mut t = [0xFFu8; 256];
    let mut i = 0;
    while i < BASE62.len() {
        t[BASE62[i] as usize] = i as u8;
        i += 1;
    }
    t
};

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

    /// Reading the digits answers as comparing them with `compute`'s:
    /// every digit string of the right length whose number is the CRC, and
    /// nothing else (a wrong length, a byte outside the alphabet, a number
    /// past `u32::MAX` with the CRC's low bits).
    #[test]
    fn verify_answers_as_comparing_the_digits() {
        let body = b"sk_live_0123abcd_secretsecretsecretsecretsecret12";
        let sum = compute(body);
        assert!(verify(body, &sum));
        assert!(!verify(body, &sum[..5]));
        assert!(!verify(body, &[&sum[..], b"0"].concat()));
        for i in 0..CHECKSUM_LEN {
            for c in 0..=255u8 {
                let mut other = sum;
                other[i] = c;
                assert_eq!(verify(body, &other), other == sum, "digit {i} as byte {c}");
            }
        }
        // 62^6 > 2^32: a number that wraps to the CRC in 32 bits is not it.
        let crc = crc32fast::hash(body) as u64 + (1u64 << 32);
        let mut past = [b'0'; CHECKSUM_LEN];
        let mut v = crc;
        for slot in past.iter_mut().rev() {
            *slot = BASE62[(v % 62) as usize];
            v /= 62;
        }
        assert!(!verify(body, &past));
        // A byte outside the alphabet is no digit, even where reading it
        // as the digit 63 would make the CRC's number: "…a1" as "…(a-1)!".
        let body = (0u32..)
            .map(|i| format!("body {i}").into_bytes())
            .find(|b| {
                let crc = crc32fast::hash(b);
                crc % 62 == 1 && (crc / 62) % 62 >= 1
            })
            .unwrap();
        let mut forged = compute(&body);
        forged[4] = BASE62[BASE62.iter().position(|&c| c == forged[4]).unwrap() - 1];
        forged[5] = b'!';
        assert!(!verify(&body, &forged));
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
