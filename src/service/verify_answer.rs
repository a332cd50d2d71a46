//! `keystile.v1.VerifyResponse` written straight from a [`Verdict`] into the
//! call's send buffer (README, "Performance"). The bytes are those prost
//! writes for [`to_response`](super::verifier::to_response)'s message, field
//! by field in field order (map entries in the order the verdict gives
//! them), but no message is built on the way: no string is copied, no map
//! is hashed, no header value is allocated. `tests/fuzz.rs` decodes what
//! this writes and compares it with `to_response` for every fuzzed verdict.

use prost::bytes::BufMut;

use super::protobuf::{message, nested, string, string_always, string_len, uint, uint_len};
use super::verifier::wire_code;
use crate::verdict::{self, AppliedLimit, Verdict};

/// A Verify answer as it will be written: the verdict and the unix second
/// its reset headers count from.
pub struct VerifyAnswer {
    pub verdict: Verdict,
    pub now_unix: i64,
}

impl VerifyAnswer {
    /// Appends the encoded `VerifyResponse` to `buf`.
    pub fn write(&self, buf: &mut impl BufMut) {
        let v = &self.verdict;
        if v.is_valid() {
            uint(1, 1, buf);
        }
        uint(2, wire_code(v.outcome) as i32 as u64, buf);
        string(3, v.outcome.error(), buf);
        uint(4, u64::from(v.outcome.http_status()), buf);
        string(5, v.outcome.message(), buf);
        if let Some(k) = &v.key {
            let r = &k.record;
            string(6, r.key_id.as_str(), buf);
            string(7, &r.name, buf);
            string(8, r.env.as_str(), buf);
            string(9, &r.tenant, buf);
            for scope in v.granted_scopes() {
                // A repeated string writes even an empty one.
                string_always(10, scope, buf);
            }
            for (name, value) in &r.metadata {
                entry(11, name, value.len(), buf, |buf| buf.put_slice(value.as_bytes()));
            }
            uint(12, r.expires_at.unwrap_or(0) as u64, buf);
        }
        if let Some(rate) = &v.rate {
            let s = &rate.state;
            let fields = [s.limit, s.remaining, s.reset_seconds, s.window_seconds, s.retry_after_ms];
            message(13, fields.iter().enumerate().map(|(i, &n)| uint_len(i as u32 + 1, n)).sum(), buf);
            for (i, n) in fields.into_iter().enumerate() {
                uint(i as u32 + 1, n, buf);
            }
        }
        if !DenialHeaders::write(v, self.now_unix, buf) {
            // The header entries are framed on the stack and copied once; a
            // value too long for it (a long scope list) is measured, then
            // written piece by piece.
            let mut block = HeaderBlock::new();
            verdict::each_header(v, self.now_unix, |name, value| {
                if !block.push(name, &value) {
                    block.flush(buf);
                    entry(14, name, value.len(), buf, |buf| value.write(&mut |b| buf.put_slice(b)));
                }
            });
            block.flush(buf);
        }
        for limit in v.applied() {
            limit_state(limit, buf);
        }
        if let Some(k) = &v.key {
            string(16, k.record.kind.as_str(), buf);
        }
    }
}

/// The `headers` map entries (field 14) of an answer, framed on the stack:
/// `put_slice` per piece (a key, a length, a name, a value) cost more than
/// the values' digits (BENCHMARKS.md, "Header entries framed on the
/// stack").
struct HeaderBlock {
    bytes: [u8; HeaderBlock::BYTES],
    at: usize,
}

impl HeaderBlock {
    /// Room for every header of a key with a rate limit and its scopes,
    /// or of a shed answer (about 200 bytes), and for all but the last of
    /// a limit with a 32-byte name and twenty-digit numbers (about 350):
    /// what does not fit is written after a flush.
    const BYTES: usize = 384;
    /// Field 14, length-delimited; a map entry's key (1) and value (2).
    const ENTRY: u8 = 14 << 3 | 2;
    const KEY: u8 = 1 << 3 | 2;
    const VALUE: u8 = 2 << 3 | 2;

    const fn new() -> HeaderBlock {
        HeaderBlock { bytes: [0; HeaderBlock::BYTES], at: 0 }
    }

    /// Frames `name: value` as [`entry`] would, when the entry's length
    /// fits in one byte and there is room for it; false, with nothing
    /// written, when not. Inlined at both callers: out of line, the call
    /// cost a fifth of what it saves.
    #[inline(always)]
    fn push(&mut self, name: &str, value: &verdict::HeaderValue) -> bool {
        let value_at = self.at + 6 + name.len();
        let Some(slot) = self.bytes.get_mut(value_at..value_at + 96) else {
            return false;
        };
        let slot: &mut [u8; 96] = slot.try_into().expect("96 bytes");
        let Some(len) = value.render(slot).map(<[u8]>::len) else {
            return false;
        };
        // An empty value is left out of the entry, as prost does.
        let value_part = if len == 0 { 0 } else { 2 + len };
        let entry_len = 2 + name.len() + value_part;
        if entry_len >= 0x80 {
            return false;
        }
        let at = self.at;
        self.bytes[at..at + 4].copy_from_slice(&[Self::ENTRY, entry_len as u8, Self::KEY, name.len() as u8]);
        self.bytes[at + 4..at + 4 + name.len()].copy_from_slice(name.as_bytes());
        if len > 0 {
            self.bytes[value_at - 2..value_at].copy_from_slice(&[Self::VALUE, len as u8]);
        }
        self.at = at + 2 + entry_len;
        true
    }

    /// Copies what was framed to `buf` and starts again.
    fn flush(&mut self, buf: &mut impl BufMut) {
        if self.at > 0 {
            buf.put_slice(&self.bytes[..self.at]);
            self.at = 0;
        }
    }
}

/// The header entries of the last denial with nothing left (a shed
/// address, a spent rate limit) answered on this thread, and what they
/// were made of. Such a denial's headers change only when the clock's
/// second or the wait's second turns, so a flood of them from one address
/// (an attacker's) is answered mostly with copies (BENCHMARKS.md, "Header
/// entries framed on the stack"). Bounded: one block per thread.
struct DenialHeaders {
    of: Option<(AppliedLimit, u64)>,
    block: HeaderBlock,
}

thread_local! {
    static DENIAL_HEADERS: std::cell::RefCell<DenialHeaders> =
        const { std::cell::RefCell::new(DenialHeaders { of: None, block: HeaderBlock::new() }) };
}

impl DenialHeaders {
    /// Writes `v`'s header entries when it is such a denial (429, no
    /// requests left, one limit, so no policy list and no scopes), from
    /// the last block when it was made of the same values; false, with
    /// nothing written, for any other verdict.
    #[inline]
    fn write(v: &Verdict, now_unix: i64, buf: &mut impl BufMut) -> bool {
        let Some(rate) = v.rate else { return false };
        if v.outcome.http_status() != 429 || rate.state.remaining != 0 || v.limits.len() >= 2 {
            return false;
        }
        // Every value `each_header` reads: the limit, the reset as a time
        // and as seconds, and the wait in the seconds `retry-after` says.
        let mut of = rate;
        of.state.retry_after_ms = of.state.retry_after_ms.div_ceil(1000);
        let of = (of, (now_unix.max(0) as u64).wrapping_add(rate.state.reset_seconds));
        DENIAL_HEADERS.with_borrow_mut(|last| {
            if last.of != Some(of) {
                last.of = None;
                last.block.at = 0;
                let mut framed = true;
                verdict::each_header(v, now_unix, |name, value| framed &= last.block.push(name, &value));
                if !framed {
                    return false;
                }
                last.of = Some(of);
            }
            buf.put_slice(&last.block.bytes[..last.block.at]);
            true
        })
    }
}

/// A `LimitState` (field 15).
fn limit_state(limit: &AppliedLimit, buf: &mut impl BufMut) {
    let s = &limit.state;
    let name = limit.name.as_str();
    let numbers = [s.limit, s.remaining, s.reset_seconds, s.window_seconds, s.retry_after_ms];
    let len = string_len(1, name) + numbers.iter().enumerate().map(|(i, &n)| uint_len(i as u32 + 2, n)).sum::<usize>();
    message(15, len, buf);
    string(1, name, buf);
    for (i, n) in numbers.into_iter().enumerate() {
        uint(i as u32 + 2, n, buf);
    }
}

/// A `map<string, string>` entry whose value is `value_len` bytes written
/// by `value`; as prost does, an empty key or value is left out.
fn entry<B: BufMut>(field: u32, name: &str, value_len: usize, buf: &mut B, value: impl FnOnce(&mut B)) {
    let value_part = if value_len == 0 { 0 } else { nested(2, value_len) };
    message(field, string_len(1, name) + value_part, buf);
    string(1, name, buf);
    if value_len > 0 {
        message(2, value_len, buf);
        value(buf);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use prost::Message;

    use super::*;
    use crate::cache::CachedKey;
    use crate::proto;
    use crate::service::verifier::to_response;
    use crate::store::KeyRecord;
    use crate::verdict::Outcome;
    use crate::verdict::tests::applied;

    /// A cached key (the ext_authz answer's tests use it too).
    pub(crate) fn key(
        tenant: &str,
        scopes: &[&str],
        metadata: &[(&str, &str)],
        expires_at: Option<i64>,
    ) -> Arc<CachedKey> {
        let mut record = KeyRecord::for_tests("AbCdEf12".parse().unwrap(), "a key with a name", 1);
        record.tenant = tenant.into();
        record.scopes = scopes.iter().map(|s| s.to_string()).collect();
        record.metadata = metadata.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        record.expires_at = expires_at;
        Arc::new(CachedKey::new(record))
    }

    /// A denial's headers are copied from the last ones only when made of
    /// the same values: answers in a row, each a field away from the one
    /// before, each decode to the message `to_response` builds.
    #[test]
    fn a_denials_headers_are_reused_only_for_the_same_values() {
        let shed = |reset: u64, retry_ms: u64| {
            let mut v = Verdict::bare(Outcome::TooManyFailedAttempts);
            v.rate = Some(applied("default", 20, 0, reset, retry_ms));
            v
        };
        let now = 1_800_000_000;
        let mut rows = vec![
            (shed(7, 6_500), now),
            (shed(7, 6_500), now),
            (shed(7, 6_500), now + 1), // the reset time moved
            (shed(8, 6_500), now),     // the same reset time, another t=
            (shed(8, 6_001), now),     // the same retry-after second
            (shed(8, 8_001), now),     // another one
            (shed(8, 8_001), now),
        ];
        let mut other = shed(8, 8_001);
        other.rate.as_mut().unwrap().state.limit = 21;
        rows.push((other.clone(), now));
        other.rate.as_mut().unwrap().state.window_seconds = 61;
        rows.push((other.clone(), now));
        other.rate.as_mut().unwrap().name = "other".parse().unwrap();
        rows.push((other.clone(), now));
        other.outcome = Outcome::RateLimited;
        other.key = Some(key("acme", &["read"], &[], None));
        rows.push((other.clone(), now));
        // Not such a denial: written as any answer, and the next one is
        // still right.
        other.rate.as_mut().unwrap().state.remaining = 1;
        rows.push((other.clone(), now));
        // Two limits: a policy list, made of both. The first one first,
        // as the rate, alone; then with the other.
        other.limits = vec![];
        other.rate = Some(applied("a", 5, 0, 3, 2_000));
        rows.push((other.clone(), now));
        other.limits = vec![applied("a", 5, 0, 3, 2_000), applied("b", 9, 0, 3, 2_000)];
        rows.push((other, now));
        rows.push((shed(8, 8_001), now));
        // Headers too long for the block (a 32-byte name, numbers of
        // twenty digits): written as any answer.
        let mut long = shed(7, 6_500);
        long.rate = Some(applied(&"n".repeat(32), 10_000_000_000_000_000_000, 0, 10_000_000_000_000_000_000, u64::MAX));
        rows.push((long, now));
        for (verdict, now) in rows {
            let built = to_response(&verdict, now);
            let mut written = Vec::new();
            VerifyAnswer { verdict, now_unix: now }.write(&mut written);
            assert_eq!(proto::VerifyResponse::decode(&written[..]).unwrap(), built);
        }
        // And a denial like the last one is a copy of its block: a mark
        // put in the kept block shows in the next answer made of the same
        // values (the wait 700 ms shorter, the same second), not in one
        // a second later.
        let write = |verdict: Verdict, now: i64| {
            let mut written = Vec::new();
            VerifyAnswer { verdict, now_unix: now }.write(&mut written);
            written
        };
        let first = write(shed(9, 8_900), now);
        DENIAL_HEADERS.with_borrow_mut(|last| {
            let at = last.block.at;
            last.block.bytes[at - 1] = b'x';
        });
        let copy = write(shed(9, 8_200), now);
        assert_eq!(copy.len(), first.len());
        assert_ne!(copy, first, "the second answer was framed again, not copied");
        let next = write(shed(8, 7_900), now + 1);
        assert_eq!(proto::VerifyResponse::decode(&next[..]).unwrap(), to_response(&shed(8, 7_900), now + 1));
    }

    /// Written and built-then-encoded answers are the same message, the
    /// same length, for every outcome with and without a key, limits and
    /// headers; decoded back they compare equal.
    #[test]
    fn the_written_answer_is_the_message_to_response_builds() {
        let mut verdicts = Vec::new();
        for outcome in Outcome::ALL {
            verdicts.push(Verdict::bare(outcome));
            let mut shed = Verdict::bare(outcome);
            shed.rate = Some(applied("failed_attempts", 20, 0, 40, 2_500));
            verdicts.push(shed);
        }
        let rich = key("acme", &["read", "write", ""], &[("plan", "pro"), ("", "x"), ("empty", "")], Some(-5));
        for outcome in [Outcome::Valid, Outcome::RateLimited, Outcome::InsufficientScope] {
            let mut one = Verdict::bare(outcome);
            one.key = Some(rich.clone());
            one.rate = Some(applied("integration", 1000, 999, 1, 0));
            verdicts.push(one);
            let mut three = Verdict::bare(outcome);
            three.key = Some(key("", &[], &[], Some(1_900_000_000)));
            three.limits = vec![
                applied("integration", 1000, 990, 1, 0),
                applied("analytics", 100, 0, 58, 1),
                applied("x", 0, 0, 0, 0),
            ];
            three.rate = Some(three.limits[1]);
            three.token_scopes = Some(vec!["read".to_string()].into());
            verdicts.push(three);
        }
        // Scopes longer than the stack buffer: measured, then written.
        let many: Vec<String> = (0..40).map(|i| format!("scope:{i}")).collect();
        let mut long = Verdict::bare(Outcome::Valid);
        long.key = Some(key("", &many.iter().map(String::as_str).collect::<Vec<_>>(), &[], None));
        verdicts.push(long);
        // A header block with every kind of entry: an empty value (one
        // empty scope), eight 32-byte limit names (a policy list too long
        // to frame on the stack, between entries that are), and one such
        // limit with numbers of twenty digits, whose headers fill the
        // block before the last one (retry-after, or the scopes).
        let mut empty = Verdict::bare(Outcome::Valid);
        empty.key = Some(key("", &[""], &[], None));
        verdicts.push(empty);
        for big in [7, 10_000_000_000_000_000_000] {
            let mut eight = Verdict::bare(Outcome::RateLimited);
            eight.key = Some(rich.clone());
            eight.limits = (0..8).map(|i| applied(&format!("{i}{}", "n".repeat(31)), big, big, big, big)).collect();
            eight.rate = Some(eight.limits[3]);
            verdicts.push(eight);
        }
        let huge = 10_000_000_000_000_000_000;
        for outcome in [Outcome::RateLimited, Outcome::Valid] {
            let mut full = Verdict::bare(outcome);
            full.key = Some(rich.clone());
            full.rate = Some(applied(&"n".repeat(32), huge, huge, huge, u64::MAX));
            verdicts.push(full);
        }
        for verdict in verdicts {
            let built = to_response(&verdict, 1_800_000_000);
            // The header entries come in the order the verdict gives them.
            let mut names = Vec::new();
            verdict::each_header(&verdict, 1_800_000_000, |name, _| names.push(name));
            let mut written = Vec::new();
            VerifyAnswer { verdict, now_unix: 1_800_000_000 }.write(&mut written);
            let at = |name: &str| {
                let framed = [&[0x0a, name.len() as u8], name.as_bytes()].concat();
                written.windows(framed.len()).position(|w| w == framed).unwrap()
            };
            assert!(names.windows(2).all(|w| at(w[0]) < at(w[1])), "{names:?}");
            assert_eq!(written.len(), built.encoded_len(), "{built:?}");
            assert_eq!(proto::VerifyResponse::decode(&written[..]).unwrap(), built);
        }
    }
}
