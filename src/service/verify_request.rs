//! `keystile.v1.VerifyRequest`, read in place: the message as received
//! ([`RawVerify`], one reference to the frame it arrived in) and its fields
//! borrowed from it ([`VerifyView`]). Decoding into the generated message
//! allocated a string per field and per scope, then freed them all, on
//! every Verify (BENCHMARKS.md, "Verify's request read in place, one
//! codegen unit"). The frame's bytes (and the read buffer they are a slice
//! of) are held while the call is decided, as a Check's are; calls in
//! progress are bounded by `--max-inflight`.
//!
//! The rules are prost's, so that a client sees no difference: a field of
//! the wrong wire type, a string that is not UTF-8 or a truncated message
//! is refused; unknown fields (of any wire type, groups included) are
//! skipped; of a repeated singular field the last wins; `cost` keeps the
//! low 32 bits of its varint, as a `uint32` does. A property test holds
//! the view equal to prost's decoding for any bytes.

use prost::bytes::Bytes;
use prost::encoding::{DecodeContext, WireType, decode_key, decode_varint, skip_field};
use smallvec::SmallVec;

/// Words (scopes, limit names) kept without an allocation.
const INLINE_WORDS: usize = 8;

/// A VerifyRequest as received. It carries the caller's key: its `Debug`
/// shows only its length.
#[derive(Clone)]
pub struct RawVerify(pub Bytes);

impl std::fmt::Debug for RawVerify {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RawVerify({} bytes, {})", self.0.len(), crate::secret::REDACTED)
    }
}

/// The fields of a VerifyRequest, borrowed from a [`RawVerify`]. No
/// `Debug`: it holds the key.
#[derive(Default)]
pub struct VerifyView<'a> {
    pub key: &'a str,
    pub ip: &'a str,
    /// The first `max_words + 1` scopes: enough to tell that there are too
    /// many without holding every one a hostile request lists.
    pub scopes: SmallVec<[&'a str; INLINE_WORDS]>,
    pub tenant: &'a str,
    pub cost: Option<u32>,
    /// The first `max_limits + 1` limit names, as for scopes.
    pub limits: SmallVec<[&'a str; INLINE_WORDS]>,
    pub origin: &'a str,
    pub want_metadata: bool,
}

/// Why a VerifyRequest cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Undecodable;

impl RawVerify {
    /// The fields, keeping at most `max_scopes + 1` scopes and
    /// `max_limits + 1` limit names (every one is still read and checked).
    pub fn view(&self, max_scopes: usize, max_limits: usize) -> Result<VerifyView<'_>, Undecodable> {
        let mut v = VerifyView::default();
        let mut buf: &[u8] = &self.0;
        while !buf.is_empty() {
            let (tag, wire_type) = decode_key(&mut buf).map_err(|_| Undecodable)?;
            match tag {
                1 => v.key = string(wire_type, &mut buf)?,
                2 => v.ip = string(wire_type, &mut buf)?,
                3 => {
                    let scope = string(wire_type, &mut buf)?;
                    if v.scopes.len() <= max_scopes {
                        v.scopes.push(scope);
                    }
                }
                4 => v.tenant = string(wire_type, &mut buf)?,
                // A `uint32` keeps the low 32 bits of its varint.
                5 => v.cost = Some(varint(wire_type, &mut buf)? as u32),
                6 => {
                    let limit = string(wire_type, &mut buf)?;
                    if v.limits.len() <= max_limits {
                        v.limits.push(limit);
                    }
                }
                7 => v.origin = string(wire_type, &mut buf)?,
                8 => v.want_metadata = varint(wire_type, &mut buf)? != 0,
                _ => skip_field(wire_type, tag, &mut buf, DecodeContext::default()).map_err(|_| Undecodable)?,
            }
        }
        Ok(v)
    }
}

/// A `string` field's value: length-delimited, in the message, UTF-8.
#[inline]
fn string<'a>(wire_type: WireType, buf: &mut &'a [u8]) -> Result<&'a str, Undecodable> {
    if wire_type != WireType::LengthDelimited {
        return Err(Undecodable);
    }
    let len = match buf.split_first() {
        Some((&n, rest)) if n < 0x80 => {
            *buf = rest;
            usize::from(n)
        }
        _ => usize::try_from(decode_varint(buf).map_err(|_| Undecodable)?).map_err(|_| Undecodable)?,
    };
    let (value, rest) = buf.split_at_checked(len).ok_or(Undecodable)?;
    *buf = rest;
    crate::service::protobuf::utf8(value).ok_or(Undecodable)
}

/// A varint field's value.
#[inline]
fn varint(wire_type: WireType, buf: &mut &[u8]) -> Result<u64, Undecodable> {
    if wire_type != WireType::Varint {
        return Err(Undecodable);
    }
    decode_varint(buf).map_err(|_| Undecodable)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limit::named::MAX_REQUESTED;
    use crate::proto::VerifyRequest;
    use crate::service::verifier::MAX_SCOPES;
    use proptest::prelude::*;
    use prost::Message;

    /// Every field as prost reads it, the lists cut where the view cuts them.
    fn same(raw: &[u8], max: usize) -> Result<(), TestCaseError> {
        let raw_verify = RawVerify(Bytes::copy_from_slice(raw));
        let ours = raw_verify.view(max, max);
        let theirs = VerifyRequest::decode(raw);
        match (ours, theirs) {
            (Ok(v), Ok(m)) => {
                prop_assert_eq!(v.key, m.key.as_str());
                prop_assert_eq!(v.ip, m.ip.as_str());
                fn cut(w: &[String], max: usize) -> Vec<&str> {
                    w.iter().take(max + 1).map(String::as_str).collect()
                }
                prop_assert_eq!(v.scopes.to_vec(), cut(&m.scopes, max));
                prop_assert_eq!(v.tenant, m.tenant.as_str());
                prop_assert_eq!(v.cost, m.cost);
                prop_assert_eq!(v.limits.to_vec(), cut(&m.limits, max));
                prop_assert_eq!(v.origin, m.origin.as_str());
                prop_assert_eq!(v.want_metadata, m.want_metadata);
            }
            (Err(Undecodable), Err(_)) => {}
            (ours, theirs) => {
                return Err(TestCaseError::fail(format!("{:?} vs {theirs:?}", ours.map(|_| "a view"))));
            }
        }
        Ok(())
    }

    /// One field as any encoder (or attacker) might write it: mostly one of
    /// the message's eight with its own wire type and a UTF-8 payload (so
    /// that most messages decode and repeat fields), else any number (0,
    /// unknown ones), any wire type, bytes that are not UTF-8, groups with
    /// content and mismatched ends, and overlong varints.
    fn field() -> impl Strategy<Value = Vec<u8>> {
        let text = prop_oneof![
            10 => "[a-z:*_-]{0,12}".prop_map(String::into_bytes),
            1 => proptest::collection::vec(any::<u8>(), 0..6),
            // Two-byte lengths.
            1 => "[a-z]{128,140}".prop_map(String::into_bytes),
        ];
        let number = prop_oneof![12 => 1u64..=8, 1 => 0u64..16];
        let wire_type = prop_oneof![12 => Just(None), 1 => (0u64..8).prop_map(Some)];
        (number, wire_type, text, any::<u64>(), 0u8..8).prop_map(|(number, wire_type, payload, n, shape)| {
            let own = if matches!(number, 5 | 8) { 0 } else { 2 };
            let wire_type = wire_type.unwrap_or(own);
            let mut out = Vec::new();
            prost::encoding::encode_varint(number << 3 | wire_type, &mut out);
            match wire_type {
                // An overlong varint (11 bytes), now and then.
                0 if shape == 0 => out.extend_from_slice(&[0xff; 11]),
                0 => prost::encoding::encode_varint(if shape < 4 { n % 4 } else { n }, &mut out),
                1 => out.extend_from_slice(&n.to_le_bytes()),
                2 => {
                    prost::encoding::encode_varint(payload.len() as u64, &mut out);
                    out.extend_from_slice(&payload);
                }
                // A group: with a field inside, closed by its own end, by
                // another number's, or left open.
                3 => {
                    if shape % 2 == 0 {
                        prost::encoding::encode_varint(1 << 3, &mut out);
                        prost::encoding::encode_varint(n, &mut out);
                    }
                    match shape % 4 {
                        0 | 1 => prost::encoding::encode_varint(number << 3 | 4, &mut out),
                        2 => prost::encoding::encode_varint((number + 1) << 3 | 4, &mut out),
                        _ => {}
                    }
                }
                5 => out.extend_from_slice(&n.to_le_bytes()[..4]),
                _ => {}
            }
            out
        })
    }

    #[test]
    fn reads_what_prost_reads_for_any_bytes() {
        use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
        // How many generated messages decode with a known field repeated:
        // the cases the reader's rules are about, not only its refusals.
        let (cases, repeated) = (AtomicUsize::new(0), AtomicUsize::new(0));
        proptest!(ProptestConfig::with_cases(4000), |(fields in proptest::collection::vec(field(), 0..12),
                                                       cut in any::<prop::sample::Index>(),
                                                       whole in proptest::bool::weighted(0.8),
                                                       noise in proptest::collection::vec(any::<u8>(), 0..64),
                                                       max in 0usize..4)| {
            let mut raw: Vec<u8> = fields.concat();
            if !whole {
                raw.truncate(cut.index(raw.len() + 1));
            }
            cases.fetch_add(1, Relaxed);
            if VerifyRequest::decode(&raw[..]).is_ok() && known_field_repeats(&raw) {
                repeated.fetch_add(1, Relaxed);
            }
            same(&raw, max)?;
            same(&noise, max)?;
        });
        let (cases, repeated) = (cases.load(Relaxed), repeated.load(Relaxed));
        assert!(repeated * 8 > cases, "only {repeated} of {cases} cases decode with a field repeated");
    }

    /// Whether one of the message's own fields occurs twice in a message
    /// that decodes.
    fn known_field_repeats(mut raw: &[u8]) -> bool {
        let mut seen = [false; 9];
        while !raw.is_empty() {
            let Ok((tag, wire_type)) = prost::encoding::decode_key(&mut raw) else { return false };
            if (1..=8).contains(&tag) {
                if seen[tag as usize] {
                    return true;
                }
                seen[tag as usize] = true;
            }
            if prost::encoding::skip_field(wire_type, tag, &mut raw, Default::default()).is_err() {
                return false;
            }
        }
        false
    }

    /// A `bool` is true for any varint but zero, as prost reads it.
    #[test]
    fn want_metadata_is_any_varint_but_zero() {
        for (n, want) in [(0u64, false), (1, true), (2, true), (u64::MAX, true)] {
            let mut raw = Vec::new();
            prost::encoding::encode_varint(8 << 3, &mut raw);
            prost::encoding::encode_varint(n, &mut raw);
            let raw = RawVerify(raw.into());
            assert_eq!(raw.view(MAX_SCOPES, MAX_REQUESTED).unwrap().want_metadata, want, "{n}");
        }
    }

    /// Of a field given twice the last wins; lists gather every entry, in
    /// order, and are cut one past their limit.
    #[test]
    fn the_last_value_wins_and_lists_gather_up_to_one_past_their_limit() {
        let a = VerifyRequest {
            key: "first".into(),
            ip: "10.0.0.1".into(),
            scopes: vec!["a".into(), "b".into()],
            limits: (0..12).map(|i| format!("l{i}")).collect(),
            cost: Some(3),
            ..Default::default()
        };
        let b =
            VerifyRequest { key: "second".into(), scopes: vec!["c".into()], want_metadata: true, ..Default::default() };
        let mut raw = a.encode_to_vec();
        raw.extend_from_slice(&b.encode_to_vec());
        // `cost` once more, as a varint wider than 32 bits.
        prost::encoding::encode_varint(5 << 3, &mut raw);
        prost::encoding::encode_varint(1 << 33 | 9, &mut raw);
        let raw = RawVerify(raw.into());
        let v = raw.view(MAX_SCOPES, MAX_REQUESTED).unwrap();
        assert_eq!((v.key, v.ip), ("second", "10.0.0.1"));
        assert_eq!(v.scopes.as_slice(), ["a", "b", "c"]);
        assert_eq!(v.limits.len(), MAX_REQUESTED + 1);
        assert_eq!(v.limits[MAX_REQUESTED], format!("l{MAX_REQUESTED}"));
        // A uint32 keeps the low 32 bits of a longer varint.
        assert_eq!((v.cost, v.want_metadata), (Some(9), true));
    }

    #[test]
    fn reads_every_field_of_a_message_and_keeps_the_key_out_of_debug() {
        let m = VerifyRequest {
            key: "ks_live_secret".into(),
            ip: "203.0.113.9".into(),
            scopes: vec!["read".into(), "write".into(), "x".repeat(200)],
            tenant: "acme".into(),
            cost: Some(7),
            limits: vec!["api".into()],
            origin: "https://app.example.com".into(),
            want_metadata: true,
        };
        let raw = RawVerify(m.encode_to_vec().into());
        assert!(!format!("{raw:?}").contains("secret"));
        let v = raw.view(MAX_SCOPES, MAX_REQUESTED).unwrap();
        assert_eq!(
            (v.key, v.ip, v.tenant, v.origin),
            ("ks_live_secret", "203.0.113.9", "acme", "https://app.example.com")
        );
        assert_eq!(v.scopes.as_slice(), ["read", "write", "x".repeat(200).as_str()]);
        assert_eq!((v.cost, v.limits.as_slice(), v.want_metadata), (Some(7), &["api"][..], true));
        let nothing = RawVerify(Bytes::new());
        let empty = nothing.view(MAX_SCOPES, MAX_REQUESTED).unwrap();
        assert_eq!((empty.key, empty.cost, empty.scopes.len()), ("", None, 0));
    }

    /// A hostile list is counted past the limit, never held whole.
    #[test]
    fn a_long_list_is_kept_only_past_its_limit() {
        let m =
            VerifyRequest { scopes: vec![String::new(); 5000], limits: vec!["api".into(); 5000], ..Default::default() };
        let raw = RawVerify(m.encode_to_vec().into());
        let v = raw.view(MAX_SCOPES, MAX_REQUESTED).unwrap();
        assert_eq!((v.scopes.len(), v.limits.len()), (MAX_SCOPES + 1, MAX_REQUESTED + 1));
    }
}
