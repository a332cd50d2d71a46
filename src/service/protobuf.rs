//! The few protobuf writing rules the hand-written answers share
//! (`verify_answer.rs`, `ext_authz/answer.rs`): each writes a message
//! straight into the send buffer, field by field, as prost would encode
//! the same message (README, "Performance").

use prost::bytes::BufMut;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};

/// The key and length of a nested message of `len` bytes.
pub fn message(field: u32, len: usize, buf: &mut impl BufMut) {
    encode_key(field, WireType::LengthDelimited, buf);
    encode_varint(len as u64, buf);
}

/// What a nested message of `len` bytes takes, with its key and length.
pub fn nested(field: u32, len: usize) -> usize {
    key_len(field) + encoded_len_varint(len as u64) + len
}

/// A proto3 string field; the empty string is not written.
pub fn string(field: u32, s: &str, buf: &mut impl BufMut) {
    if !s.is_empty() {
        string_always(field, s, buf);
    }
}

pub fn string_len(field: u32, s: &str) -> usize {
    if s.is_empty() { 0 } else { string_always_len(field, s) }
}

/// A string written even when empty (repeated strings, oneof members).
pub fn string_always(field: u32, s: &str, buf: &mut impl BufMut) {
    encode_key(field, WireType::LengthDelimited, buf);
    encode_varint(s.len() as u64, buf);
    buf.put_slice(s.as_bytes());
}

pub fn string_always_len(field: u32, s: &str) -> usize {
    nested(field, s.len())
}

/// A proto3 varint field; 0 is not written.
pub fn uint(field: u32, n: u64, buf: &mut impl BufMut) {
    if n != 0 {
        encode_key(field, WireType::Varint, buf);
        encode_varint(n, buf);
    }
}

pub fn uint_len(field: u32, n: u64) -> usize {
    if n == 0 { 0 } else { key_len(field) + encoded_len_varint(n) }
}
