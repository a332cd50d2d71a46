//! Envoy's `envoy.service.auth.v3.CheckRequest`, read in place: the message
//! as received ([`RawCheck`], one reference to tonic's buffer) and a view
//! of the few fields keystile reads ([`CheckView`]), borrowed from it, with
//! Envoy's field numbers. Fields keystile does not read are skipped, not
//! decoded: decoding into Envoy's own type (every header into a
//! `HashMap<String, String>`) cost more than the verification itself
//! (BENCHMARKS.md, "Proxy front ends"). Of the headers, only those a
//! [`HeaderFilter`] keeps are held (the ones the gate may ask for), and
//! nothing is copied or allocated for up to [`INLINE_HEADERS`] of them.
//!
//! Field numbers (envoy/service/auth/v3/{external_auth,attribute_context}.proto):
//! CheckRequest.attributes = 1; AttributeContext.source = 1, request = 4,
//! context_extensions = 10 (map); Peer.address = 1; Address.socket_address
//! = 1; SocketAddress.address = 2; Request.http = 2; HttpRequest.method =
//! 2, headers = 3 (map), path = 4, host = 5, header_map = 13;
//! HeaderMap.headers = 1; HeaderValue.key = 1, value = 2, raw_value = 3.

use prost::bytes::Bytes;
use smallvec::SmallVec;

/// Headers kept without an allocation; more spill to the heap.
pub const INLINE_HEADERS: usize = 32;

/// A CheckRequest as received. It carries the caller's credential among
/// its headers: its `Debug` shows only its length.
#[derive(Clone)]
pub struct RawCheck(pub Bytes);

impl std::fmt::Debug for RawCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RawCheck({} bytes, {})", self.0.len(), crate::secret::REDACTED)
    }
}

/// Why a CheckRequest cannot be read.
pub const MALFORMED: &str = "the CheckRequest is not a valid protobuf message";

/// The fields keystile reads, borrowed from a [`RawCheck`]. Text fields are
/// bytes, checked as UTF-8 where they are read. No `Debug`: the headers
/// hold the credential.
#[derive(Default)]
pub struct CheckView<'a> {
    pub has_http: bool,
    pub source_address: &'a [u8],
    pub method: &'a [u8],
    pub path: &'a [u8],
    pub host: &'a [u8],
    /// `headers` map entries and `header_map` values, in order: those the
    /// [`HeaderFilter`] it was read with keeps.
    pub headers: SmallVec<[(&'a [u8], &'a [u8]); INLINE_HEADERS]>,
    pub context_extensions: SmallVec<[(&'a [u8], &'a [u8]); 4]>,
}

impl RawCheck {
    /// The view of the fields keystile reads; [`MALFORMED`] when the bytes
    /// are not a protobuf message.
    pub fn view(&self) -> Result<CheckView<'_>, &'static str> {
        let mut v = CheckView::default();
        self.read_into(&mut v, &HeaderFilter::ALL)?;
        Ok(v)
    }

    /// [`view`](Self::view) into an empty view where it lies (a view is
    /// about a kilobyte, its inline headers, which a return would copy),
    /// with only the headers `keep` keeps.
    pub fn read_into<'a>(&'a self, v: &mut CheckView<'a>, keep: &HeaderFilter) -> Result<(), &'static str> {
        for field in Fields(&self.0) {
            if let (1, attributes) = field? {
                read_attributes(attributes, v, keep)?;
            }
        }
        Ok(())
    }
}

/// Which headers a [`CheckView`] keeps: the names a reader asks for (any
/// case) and the names with a prefix, and maybe a few more. A request's
/// other headers, most of them, are passed over as they are read, so that
/// every later search of the view (one per name asked) sees only what it
/// may find. The test is loose, never strict: a name asked for is always
/// kept, whatever its case; a name kept by chance is only searched.
pub struct HeaderFilter {
    /// For each first byte (`| 0x20`, mod 64), the lengths (mod 64) of the
    /// names that start with it, as bits: two tests pass over most names.
    by_first: [u64; 64],
    prefix: &'static str,
    /// The prefix's first eight bytes, little-endian, when it has as many.
    prefix8: Option<u64>,
    all: bool,
}

/// Bit 5 of every byte: ASCII letters' case.
const CASE: u64 = 0x2020_2020_2020_2020;

impl HeaderFilter {
    /// Keeps every header.
    pub const ALL: HeaderFilter = HeaderFilter { by_first: [0; 64], prefix: "", prefix8: None, all: true };

    /// Keeps the headers named `names` (lower case) and those longer than
    /// `prefix` (lower case) that start with it.
    pub fn new<'n>(names: impl IntoIterator<Item = &'n str>, prefix: &'static str) -> HeaderFilter {
        let mut by_first = [0u64; 64];
        for name in names.into_iter().map(str::as_bytes) {
            if let Some(b) = name.first() {
                by_first[usize::from((b | 0x20) % 64)] |= 1 << (name.len() % 64);
            }
        }
        let prefix8 = prefix.as_bytes().first_chunk::<8>().map(|c| u64::from_le_bytes(*c) | CASE);
        HeaderFilter { by_first, prefix, prefix8, all: false }
    }

    #[inline]
    pub fn keeps(&self, name: &[u8]) -> bool {
        if self.all {
            return true;
        }
        let Some(b) = name.first() else { return false };
        if self.by_first[usize::from((b | 0x20) % 64)] & 1 << (name.len() % 64) != 0 {
            return true;
        }
        if name.len() <= self.prefix.len() {
            return false;
        }
        match (self.prefix8, name.first_chunk::<8>()) {
            (Some(p), Some(c)) => u64::from_le_bytes(*c) | CASE == p,
            _ => crate::proxy::credentials::has_prefix(name, self.prefix),
        }
    }

    /// Whether every name with `prefix` is kept.
    pub fn keeps_prefix(&self, prefix: &str) -> bool {
        self.all || self.prefix == prefix
    }
}

fn read_attributes<'a>(b: &'a [u8], v: &mut CheckView<'a>, keep: &HeaderFilter) -> Result<(), &'static str> {
    for field in Fields(b) {
        match field? {
            (1, peer) => {
                for f in Fields(peer) {
                    if let (1, address) = f? {
                        for f in Fields(address) {
                            if let (1, socket) = f? {
                                for f in Fields(socket) {
                                    if let (2, a) = f? {
                                        v.source_address = a;
                                    }
                                }
                            }
                        }
                    }
                }
            }
            (4, request) => {
                for f in Fields(request) {
                    if let (2, http) = f? {
                        v.has_http = true;
                        read_http(http, v, keep)?;
                    }
                }
            }
            (10, entry) => v.context_extensions.push(pair(entry, 1, 2)?),
            _ => {}
        }
    }
    Ok(())
}

fn read_http<'a>(b: &'a [u8], v: &mut CheckView<'a>, keep: &HeaderFilter) -> Result<(), &'static str> {
    for field in Fields(b) {
        match field? {
            (2, m) => v.method = m,
            (3, entry) => {
                let (name, value) = pair(entry, 1, 2)?;
                if keep.keeps(name) {
                    v.headers.push((name, value));
                }
            }
            (4, p) => v.path = p,
            (5, h) => v.host = h,
            (13, map) => {
                for f in Fields(map) {
                    if let (1, header) = f? {
                        let (mut key, mut value, mut raw): (&[u8], &[u8], &[u8]) = (b"", b"", b"");
                        for f in Fields(header) {
                            match f? {
                                (1, k) => key = k,
                                (2, x) => value = x,
                                (3, r) => raw = r,
                                _ => {}
                            }
                        }
                        if keep.keeps(key) {
                            v.headers.push((key, if value.is_empty() { raw } else { value }));
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// A map entry (or any two-field message): its fields `k` and `v`.
fn pair(b: &[u8], k: u32, v: u32) -> Result<(&[u8], &[u8]), &'static str> {
    // The shape every encoder writes for a header: the key, then the
    // value, each shorter than 128 bytes (a one-byte length). Read without
    // the general walk: a CheckRequest is mostly these.
    let tag = |field: u32| (field << 3 | 2) as u8;
    if let [t, n, rest @ ..] = b
        && *t == tag(k)
        && *n < 0x80
        && let Some((key, rest)) = rest.split_at_checked(usize::from(*n))
    {
        match rest {
            [] => return Ok((key, b"")),
            [t, n, value @ ..] if *t == tag(v) && *n < 0x80 && usize::from(*n) == value.len() => {
                return Ok((key, value));
            }
            _ => {}
        }
    }
    pair_walk(b, k, v)
}

/// [`pair`] by the general walk: any field order, repeats (the last
/// wins), unknown fields, long lengths.
fn pair_walk(b: &[u8], k: u32, v: u32) -> Result<(&[u8], &[u8]), &'static str> {
    let (mut key, mut value): (&[u8], &[u8]) = (b"", b"");
    for f in Fields(b) {
        match f? {
            (n, x) if n == k => key = x,
            (n, x) if n == v => value = x,
            _ => {}
        }
    }
    Ok((key, value))
}

/// A varint; most in a CheckRequest (keys, lengths) are one byte.
#[inline(always)]
fn varint(buf: &mut &[u8]) -> Result<u64, &'static str> {
    match buf.split_first() {
        Some((&b, rest)) if b < 0x80 => {
            *buf = rest;
            Ok(u64::from(b))
        }
        _ => prost::encoding::decode_varint(buf).map_err(|_| MALFORMED),
    }
}

/// The length-delimited fields of a message, as (number, bytes); fields of
/// other wire types are skipped. A truncated or ill-formed message yields
/// one error and ends.
struct Fields<'a>(&'a [u8]);

/// How deep unknown groups may nest (prost's own recursion limit).
const MAX_GROUP_DEPTH: u32 = 100;

/// Skips an unknown group's fields up to its end tag (`number`, wire type
/// 4), nested groups included.
fn skip_group(buf: &mut &[u8], number: u64, depth: u32) -> Result<(), &'static str> {
    if depth >= MAX_GROUP_DEPTH {
        return Err(MALFORMED);
    }
    loop {
        let key = prost::encoding::decode_varint(buf).map_err(|_| MALFORMED)?;
        let (inner, wire_type) = (key >> 3, key & 7);
        let skip = match wire_type {
            0 => {
                prost::encoding::decode_varint(buf).map_err(|_| MALFORMED)?;
                0
            }
            1 => 8,
            5 => 4,
            2 => {
                let len = prost::encoding::decode_varint(buf).map_err(|_| MALFORMED)?;
                usize::try_from(len).map_err(|_| MALFORMED)?
            }
            3 => {
                skip_group(buf, inner, depth + 1)?;
                0
            }
            4 if inner == number => return Ok(()),
            _ => return Err(MALFORMED),
        };
        if skip > buf.len() {
            return Err(MALFORMED);
        }
        *buf = &buf[skip..];
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u32, &'a [u8]), &'static str>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        // The shape of nearly every field of a CheckRequest: a one-byte key
        // of a length-delimited field, a one-byte length. Anything else
        // (longer messages, other wire types) takes the general step.
        if let [key, len, rest @ ..] = self.0
            && key & 0x87 == 2
            && len & 0x80 == 0
            && let Some((value, rest)) = rest.split_at_checked(usize::from(*len))
        {
            self.0 = rest;
            return Some(Ok((u32::from(key >> 3), value)));
        }
        // The same with a two-byte length (128 bytes to 16 KiB): the
        // messages that hold the headers.
        if let [key, low, high, rest @ ..] = self.0
            && key & 0x87 == 2
            && low & 0x80 != 0
            && high & 0x80 == 0
            && let Some((value, rest)) = rest.split_at_checked(usize::from(low & 0x7f) | usize::from(*high) << 7)
        {
            self.0 = rest;
            return Some(Ok((u32::from(key >> 3), value)));
        }
        if self.0.is_empty() {
            return None;
        }
        self.step()
    }
}

impl<'a> Fields<'a> {
    /// [`Iterator::next`], for any field.
    fn step(&mut self) -> Option<Result<(u32, &'a [u8]), &'static str>> {
        loop {
            if self.0.is_empty() {
                return None;
            }
            let step = (|| {
                let key = varint(&mut self.0)?;
                let (number, wire_type) = ((key >> 3) as u32, key & 7);
                let skip = match wire_type {
                    0 => {
                        prost::encoding::decode_varint(&mut self.0).map_err(|_| MALFORMED)?;
                        0
                    }
                    1 => 8,
                    5 => 4,
                    2 => {
                        let len = varint(&mut self.0)?;
                        let len = usize::try_from(len).map_err(|_| MALFORMED)?;
                        if len > self.0.len() {
                            return Err(MALFORMED);
                        }
                        let (value, rest) = self.0.split_at(len);
                        self.0 = rest;
                        return Ok(Some((number, value)));
                    }
                    // Groups are in none of these messages, but a decoder
                    // skips unknown ones whole, as Envoy's own does.
                    3 => {
                        skip_group(&mut self.0, u64::from(number), 0)?;
                        0
                    }
                    _ => return Err(MALFORMED),
                };
                if skip > self.0.len() {
                    return Err(MALFORMED);
                }
                self.0 = &self.0[skip..];
                Ok(None)
            })();
            match step {
                Ok(Some(field)) => return Some(Ok(field)),
                Ok(None) => continue,
                Err(e) => {
                    self.0 = &[];
                    return Some(Err(e));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::ext_authz::v3::pb::CheckRequest;
    use envoy_types::pb::envoy::config::core::v3::{Address, HeaderMap, HeaderValue, SocketAddress, address};
    use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
    use prost::Message;

    #[test]
    fn reads_what_envoy_sends_and_skips_the_rest() {
        let request = CheckRequest {
            attributes: Some(AttributeContext {
                source: Some(Peer {
                    address: Some(Address {
                        address: Some(address::Address::SocketAddress(SocketAddress {
                            address: "203.0.113.9".into(),
                            ..Default::default()
                        })),
                    }),
                    principal: "spiffe://x".into(),
                    ..Default::default()
                }),
                request: Some(Request {
                    http: Some(HttpRequest {
                        id: "1".into(),
                        method: "POST".into(),
                        headers: [("x-api-key".to_string(), "k".to_string())].into_iter().collect(),
                        header_map: Some(HeaderMap {
                            headers: vec![HeaderValue {
                                key: "authorization".into(),
                                value: String::new(),
                                raw_value: b"Bearer r".to_vec(),
                            }],
                        }),
                        path: "/v1/x?y=1".into(),
                        host: "api.example.com".into(),
                        size: 42,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                context_extensions: [("keystile.tenant".to_string(), "acme".to_string())].into_iter().collect(),
                ..Default::default()
            }),
        };
        let raw = RawCheck(request.encode_to_vec().into());
        assert!(!format!("{raw:?}").contains("Bearer r"), "no credential in Debug");
        let v = raw.view().unwrap();
        assert!(v.has_http);
        assert_eq!(v.source_address, b"203.0.113.9");
        assert_eq!((v.method, v.path, v.host), (&b"POST"[..], &b"/v1/x?y=1"[..], &b"api.example.com"[..]));
        assert_eq!(v.headers.as_slice(), [(&b"x-api-key"[..], &b"k"[..]), (&b"authorization"[..], &b"Bearer r"[..])]);
        assert_eq!(v.context_extensions.as_slice(), [(&b"keystile.tenant"[..], &b"acme"[..])]);
    }

    /// The one-byte-length shortcut reads what the general walk reads, for
    /// entries of any length and for any bytes at all.
    #[test]
    fn a_header_entry_reads_the_same_either_way() {
        use envoy_types::pb::envoy::config::core::v3::HeaderValue;
        proptest::proptest!(|(key in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
                               value in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
                               noise in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40))| {
            let key = String::from_utf8_lossy(&key).into_owned();
            let value = String::from_utf8_lossy(&value).into_owned();
            let entry = HeaderValue { key: key.clone(), value: value.clone(), raw_value: Vec::new() }.encode_to_vec();
            proptest::prop_assert_eq!(pair(&entry, 1, 2), Ok((key.as_bytes(), value.as_bytes())));
            proptest::prop_assert_eq!(pair(&noise, 1, 2), pair_walk(&noise, 1, 2));
            let mut tail = entry.clone();
            tail.extend_from_slice(&noise);
            proptest::prop_assert_eq!(pair(&tail, 1, 2), pair_walk(&tail, 1, 2));
        });
    }

    /// The filter keeps every header a reader may ask for, in any case:
    /// the names, and the names with the prefix (of eight bytes or more,
    /// or fewer).
    #[test]
    fn the_header_filter_keeps_every_name_asked_for() {
        use proptest::prelude::*;
        let names = ["authorization", "x-api-key", "origin", ":authority", "x-forwarded-for"];
        for prefix in ["x-keystile-", "x-k"] {
            let filter = HeaderFilter::new(names, prefix);
            assert!(!filter.keeps(b"user-agent") && !filter.keeps(b"x-request-id") && !filter.keeps(b""));
            assert!(!filter.keeps(prefix.as_bytes()), "only names longer than the prefix");
            // Names near the asked ones: each one's letters in any case,
            // cut or lengthened, with a byte changed.
            let near = (0..names.len() + 1, any::<u64>(), 0..40usize, any::<u8>(), any::<u8>());
            proptest!(|((i, cases, cut, at, byte) in near)| {
                let base = names.get(i).map_or_else(|| format!("{prefix}tenant"), |n| n.to_string());
                let mut name: Vec<u8> = base.bytes().enumerate()
                    .map(|(j, c)| if cases >> (j % 64) & 1 == 1 { c.to_ascii_uppercase() } else { c })
                    .collect();
                match cut % 4 {
                    0 => name.truncate(cut % (name.len() + 1)),
                    1 => name.push(byte),
                    2 => { let j = usize::from(at) % name.len(); name[j] = byte; }
                    _ => {}
                }
                let asked = names.iter().any(|n| n.as_bytes().eq_ignore_ascii_case(&name))
                    || crate::proxy::credentials::has_prefix(&name, prefix);
                prop_assert!(!asked || filter.keeps(&name), "{:?}", String::from_utf8_lossy(&name));
            });
        }
    }

    #[test]
    fn a_broken_message_is_refused_without_panicking() {
        let good = CheckRequest::default().encode_to_vec();
        assert!(RawCheck(good.into()).view().is_ok());
        for bad in
            [&[0x0a, 0x05, 0x0a][..], &[0x0b], &[0x0a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]]
        {
            assert_eq!(RawCheck(Bytes::copy_from_slice(bad)).view().err(), Some(MALFORMED), "{bad:?}");
        }
        proptest::proptest!(|(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256))| {
            let _ = RawCheck(bytes.into()).view();
        });
    }

    /// The shortcuts of [`Fields`] read what the general step reads, field
    /// for field, error for error, on any bytes (biased towards one-byte
    /// keys and one- and two-byte lengths, where the shortcuts apply).
    #[test]
    fn fields_read_the_same_with_and_without_the_shortcut() {
        fn by_step(b: &[u8]) -> Vec<Result<(u32, Vec<u8>), &'static str>> {
            let mut f = Fields(b);
            std::iter::from_fn(|| f.step()).map(|r| r.map(|(n, v)| (n, v.to_vec()))).collect()
        }
        let byte = proptest::prop_oneof![
            proptest::prelude::any::<u8>(),
            0u8..0x80,
            proptest::strategy::Just(0x0au8),
            proptest::strategy::Just(0x12u8),
            proptest::strategy::Just(0x1au8),
            // 0x81 0x01: a two-byte length, 129.
            proptest::strategy::Just(0x81u8),
            proptest::strategy::Just(0x01u8)
        ];
        proptest::proptest!(|(bytes in proptest::collection::vec(byte, 0..400))| {
            let fast: Vec<_> = Fields(&bytes).map(|r| r.map(|(n, v)| (n, v.to_vec()))).collect();
            proptest::prop_assert_eq!(fast, by_step(&bytes));
        });
    }
}
