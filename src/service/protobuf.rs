//! The few protobuf writing rules the hand-written answers share
//! (`verify_answer.rs`, `ext_authz/answer.rs`): each writes a message
//! straight into the send buffer, field by field, as prost would encode
//! the same message (README, "Performance"). And the one reading rule the
//! requests read in place share (`verify_request.rs`, `ext_authz/mod.rs`):
//! a text field is checked as UTF-8 by [`utf8`].

use prost::bytes::BufMut;
use prost::encoding::{WireType, encoded_len_varint, key_len};

/// A varint, put in one piece: most are one byte (keys, short lengths),
/// and prost's byte-at-a-time writer, not inlined, cost more than the rest
/// of an answer.
#[inline(always)]
pub fn varint(n: u64, buf: &mut impl BufMut) {
    if n < 0x80 {
        buf.put_u8(n as u8);
    } else {
        long_varint(n, buf);
    }
}

/// [`varint`] of two bytes or more, out of line: the one-byte case is
/// inlined at each of the many places an answer writes one.
fn long_varint(mut n: u64, buf: &mut impl BufMut) {
    let mut bytes = [0u8; 10];
    let mut i = 0;
    while n >= 0x80 {
        bytes[i] = n as u8 | 0x80;
        n >>= 7;
        i += 1;
    }
    bytes[i] = n as u8;
    buf.put_slice(&bytes[..=i]);
}

/// `b` as text when it is UTF-8. Nearly every field is ASCII, which a
/// word-at-a-time check settles faster than the general validation does
/// for short strings.
#[inline]
pub fn utf8(b: &[u8]) -> Option<&str> {
    if b.is_ascii() {
        // SAFETY: ASCII is UTF-8.
        Some(unsafe { std::str::from_utf8_unchecked(b) })
    } else {
        std::str::from_utf8(b).ok()
    }
}

/// A field's key.
#[inline]
fn key(field: u32, wire_type: WireType, buf: &mut impl BufMut) {
    varint(u64::from(field << 3 | wire_type as u32), buf);
}

/// The key and length of a nested message of `len` bytes.
#[inline]
pub fn message(field: u32, len: usize, buf: &mut impl BufMut) {
    key(field, WireType::LengthDelimited, buf);
    varint(len as u64, buf);
}

/// What a nested message of `len` bytes takes, with its key and length.
#[inline]
pub fn nested(field: u32, len: usize) -> usize {
    key_len(field) + encoded_len_varint(len as u64) + len
}

/// A proto3 string field; the empty string is not written.
#[inline]
pub fn string(field: u32, s: &str, buf: &mut impl BufMut) {
    if !s.is_empty() {
        string_always(field, s, buf);
    }
}

#[inline]
pub fn string_len(field: u32, s: &str) -> usize {
    if s.is_empty() { 0 } else { string_always_len(field, s) }
}

/// A string written even when empty (repeated strings, oneof members).
#[inline]
pub fn string_always(field: u32, s: &str, buf: &mut impl BufMut) {
    key(field, WireType::LengthDelimited, buf);
    varint(s.len() as u64, buf);
    buf.put_slice(s.as_bytes());
}

#[inline]
pub fn string_always_len(field: u32, s: &str) -> usize {
    nested(field, s.len())
}

/// A proto3 varint field; 0 is not written.
#[inline]
pub fn uint(field: u32, n: u64, buf: &mut impl BufMut) {
    if n != 0 {
        key(field, WireType::Varint, buf);
        varint(n, buf);
    }
}

#[inline]
pub fn uint_len(field: u32, n: u64) -> usize {
    if n == 0 { 0 } else { key_len(field) + encoded_len_varint(n) }
}
