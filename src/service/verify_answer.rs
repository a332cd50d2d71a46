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
        verdict::each_header(v, self.now_unix, |name, value| {
            // Written on the stack when short; a long list is measured,
            // then written piece by piece.
            let mut stack = [0u8; 96];
            match value.render(&mut stack) {
                Some(short) => entry(14, name, short.len(), buf, |buf| buf.put_slice(short)),
                None => entry(14, name, value.len(), buf, |buf| value.write(&mut |b| buf.put_slice(b))),
            }
        });
        for limit in v.applied() {
            limit_state(limit, buf);
        }
        if let Some(k) = &v.key {
            string(16, k.record.kind.as_str(), buf);
        }
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
        for verdict in verdicts {
            let built = to_response(&verdict, 1_800_000_000);
            let mut written = Vec::new();
            VerifyAnswer { verdict, now_unix: 1_800_000_000 }.write(&mut written);
            assert_eq!(written.len(), built.encoded_len(), "{built:?}");
            assert_eq!(proto::VerifyResponse::decode(&written[..]).unwrap(), built);
        }
    }
}
