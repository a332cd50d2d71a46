//! The few protobuf writing rules the hand-written answers share
//! (`verify_answer.rs`, `ext_authz/answer.rs`): each writes a message
//! straight into the send buffer, field by field, as prost would encode
//! the same message (README, "Performance").

use std::fmt;

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

/// Formats into a fixed array; fails when it is full.
pub struct Stack {
    bytes: [u8; 96],
    pub len: usize,
}

impl Default for Stack {
    fn default() -> Stack {
        Stack { bytes: [0; 96], len: 0 }
    }
}

impl Stack {
    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl fmt::Write for Stack {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        self.bytes.get_mut(self.len..end).ok_or(fmt::Error)?.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// A value formatted once, to be written after its length is known: on the
/// stack when it fits (numbers, a policy), on the heap when it does not.
pub enum Formatted {
    Stack(Stack),
    Heap(String),
}

impl Formatted {
    pub fn new(args: fmt::Arguments<'_>) -> Formatted {
        let mut stack = Stack::default();
        match fmt::write(&mut stack, args) {
            Ok(()) => Formatted::Stack(stack),
            Err(_) => Formatted::Heap(args.to_string()),
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Formatted::Stack(s) => s.bytes(),
            Formatted::Heap(h) => h.as_bytes(),
        }
    }
}
