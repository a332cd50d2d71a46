//! Every verdict of the README's "Verdicts" table, produced by the real server through a real
//! socket, once on the in-memory store and once on a real Redis.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use keystile::clock::Clock;
use keystile::engine::EngineSettings;
use keystile::key::{Env, KeyFormat, assemble, generate};
use keystile::proto::{self, Code};
use keystile::server::ServerOptions;
use keystile::store::KeyStore;
use keystile::store::memory::MemoryStore;
use keystile::store::redis::RedisStore;

const START: i64 = 1_800_000_000;

async fn server(store: Arc<dyn KeyStore>) -> TestServer {
    TestServer::start_with(store, EngineSettings::new(test_pepper()), ServerOptions::default(), Clock::manual(START))
        .await
}

fn with_ip(key: &str, ip: &str) -> proto::VerifyRequest {
    proto::VerifyRequest { key: key.into(), ip: ip.into(), ..Default::default() }
}

/// One key for each check, then every verdict in order of precedence.
async fn every_code(s: &TestServer) {
    let mut admin = s.admin().await;
    let mut v = s.verifier().await;

    // VALID, with the key's attributes and the scopes header.
    let mut req = create_req("plain");
    req.scopes = vec!["read".into(), "write".into()];
    req.tenant = "acme".into();
    req.metadata = [("team".to_string(), "core".to_string())].into();
    let (key, record) = create(&mut admin, req).await;
    let r = verify(
        &mut v,
        proto::VerifyRequest {
            key: format!("Bearer {key}"),
            scopes: vec!["read".into()],
            tenant: "acme".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(code(&r), Code::Valid, "{r:?}");
    assert!(r.valid);
    assert_eq!((r.http_status, r.error.as_str()), (200, ""));
    assert_eq!(r.key_id, record.key_id);
    assert_eq!(r.name, "plain");
    assert_eq!(r.tenant, "acme");
    assert_eq!(r.metadata.get("team").map(String::as_str), Some("core"));
    assert_eq!(r.headers.get("x-api-key-scopes").map(String::as_str), Some("read,write"));
    assert!(
        r.rate_limit.is_none() && !r.headers.contains_key("x-ratelimit-limit"),
        "an unlimited key sends no rate-limit headers"
    );

    // MALFORMED: one character changed.
    let mut damaged = key.clone().into_bytes();
    damaged[30] = if damaged[30] == b'a' { b'b' } else { b'a' };
    let r = verify(&mut v, verify_req(std::str::from_utf8(&damaged).unwrap())).await;
    assert_eq!(code(&r), Code::Malformed);
    assert_eq!((r.http_status, r.error.as_str()), (401, "invalid_api_key"));
    assert!(r.key_id.is_empty(), "nothing about a malformed key is told");

    // NOT_FOUND: well-formed, unknown key_id.
    let stranger = generate(&KeyFormat::default(), Env::Live);
    let r = verify(&mut v, verify_req(stranger.key.expose())).await;
    assert_eq!(code(&r), Code::NotFound);
    assert_eq!((r.http_status, r.error.as_str()), (401, "invalid_api_key"));
    assert!(r.key_id.is_empty());

    // NOT_FOUND: known key_id, wrong secret.
    let forged = assemble("ks", Env::Live, record.key_id.parse().unwrap(), &[b'Q'; 32]);
    let r = verify(&mut v, verify_req(forged.expose())).await;
    assert_eq!(code(&r), Code::NotFound);
    assert!(r.key_id.is_empty(), "a wrong secret learns nothing about the key");

    // TENANT_MISMATCH.
    let r =
        verify(&mut v, proto::VerifyRequest { key: key.clone(), tenant: "globex".into(), ..Default::default() }).await;
    assert_eq!(code(&r), Code::TenantMismatch);
    assert_eq!((r.http_status, r.error.as_str()), (403, "wrong_tenant"));

    // INSUFFICIENT_SCOPE.
    let r = verify(
        &mut v,
        proto::VerifyRequest { key: key.clone(), scopes: vec!["read".into(), "admin".into()], ..Default::default() },
    )
    .await;
    assert_eq!(code(&r), Code::InsufficientScope);
    assert_eq!((r.http_status, r.error.as_str()), (403, "insufficient_scope"));
    assert_eq!(r.key_id, record.key_id, "an identified key is named");

    // IP_NOT_ALLOWED: outside the allowlist, and unknown.
    let mut req = create_req("office only");
    req.ip_allowlist = vec!["10.0.0.0/8".into()];
    let (office, _) = create(&mut admin, req).await;
    assert_eq!(code(&verify(&mut v, with_ip(&office, "10.1.2.3")).await), Code::Valid);
    assert_eq!(
        code(&verify(&mut v, with_ip(&office, "::ffff:10.1.2.3")).await),
        Code::Valid,
        "IPv4-mapped IPv6 is IPv4"
    );
    let r = verify(&mut v, with_ip(&office, "192.0.2.1")).await;
    assert_eq!(code(&r), Code::IpNotAllowed);
    assert_eq!((r.http_status, r.error.as_str()), (403, "ip_not_allowed"));
    assert_eq!(code(&verify(&mut v, with_ip(&office, "")).await), Code::IpNotAllowed, "unknown IP");
    assert_eq!(code(&verify(&mut v, with_ip(&office, "not an ip")).await), Code::IpNotAllowed);

    // RATE_LIMITED: five per minute, then 429 with every header in the
    // message and in the response metadata. Denials consume nothing.
    let mut req = create_req("limited");
    req.rate_limit = Some(proto::RateLimit { requests: 5, window_seconds: 60, burst: 0, per_tenant: false });
    req.scopes = vec!["read".into()];
    let (limited, _) = create(&mut admin, req).await;
    for _ in 0..3 {
        let r = verify(
            &mut v,
            proto::VerifyRequest { key: limited.clone(), scopes: vec!["write".into()], ..Default::default() },
        )
        .await;
        assert_eq!(code(&r), Code::InsufficientScope);
    }
    for left in (0..5).rev() {
        let r = verify(&mut v, verify_req(&limited)).await;
        assert_eq!(code(&r), Code::Valid);
        assert_eq!(r.rate_limit.as_ref().unwrap().remaining, left);
        assert_eq!(r.headers["x-ratelimit-remaining"], left.to_string());
        assert_eq!(r.headers["x-ratelimit-limit"], "5");
    }
    let plain = v.verify(verify_req(&limited)).await.unwrap();
    assert!(plain.metadata().get("x-ratelimit-limit").is_none(), "metadata only when asked for");
    let raw = v.verify(proto::VerifyRequest { want_metadata: true, ..verify_req(&limited) }).await.unwrap();
    let md = raw.metadata().clone();
    let r = raw.into_inner();
    assert_eq!(code(&r), Code::RateLimited);
    assert_eq!((r.http_status, r.error.as_str()), (429, "rate_limited"));
    let rl = r.rate_limit.unwrap();
    assert_eq!((rl.limit, rl.remaining, rl.window_seconds), (5, 0, 60));
    // On Redis the shared bucket runs on Redis's clock, which moved on a
    // few milliseconds since the first call.
    assert!((11_800..=12_000).contains(&rl.retry_after_ms), "one cell every 12 s: {}", rl.retry_after_ms);
    let expect = [
        ("x-ratelimit-limit", "5".to_string()),
        ("x-ratelimit-remaining", "0".to_string()),
        ("x-ratelimit-reset", (START + 12).to_string()),
        ("ratelimit-policy", "\"default\";q=5;w=60".to_string()),
        ("ratelimit", "\"default\";r=0;t=12".to_string()),
        ("retry-after", "12".to_string()),
    ];
    for (name, value) in expect {
        assert_eq!(r.headers.get(name), Some(&value), "header {name} in the message");
        assert_eq!(md.get(name).and_then(|v| v.to_str().ok()), Some(value.as_str()), "header {name} in the metadata");
    }
    assert!(!r.headers.contains_key("x-api-key-scopes"), "scopes only when valid");

    // EXCHANGE_ONLY: such a key is not a bearer credential; updating it
    // back makes it one.
    let only = proto::CreateKeyRequest { exchange_only: true, ..create_req("exchange only") };
    let (only_key, only_rec) = create(&mut admin, only).await;
    assert!(only_rec.exchange_only);
    let r = verify(&mut v, verify_req(&only_key)).await;
    assert_eq!(code(&r), Code::ExchangeOnly);
    assert_eq!((r.http_status, r.error.as_str()), (403, "exchange_only_api_key"));
    admin
        .update_key(proto::UpdateKeyRequest {
            key_id: only_rec.key_id.clone(),
            exchange_only: Some(false),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(code(&verify(&mut v, verify_req(&only_key)).await), Code::Valid);

    // EXPIRED (time moves by hand).
    let mut req = create_req("short lived");
    req.expires_at = START + 100;
    let (short, _) = create(&mut admin, req).await;
    assert_eq!(code(&verify(&mut v, verify_req(&short)).await), Code::Valid);
    s.clock.advance(Duration::from_secs(101));
    let r = verify(&mut v, verify_req(&short)).await;
    assert_eq!(code(&r), Code::Expired);
    assert_eq!((r.http_status, r.error.as_str()), (401, "expired_api_key"));

    // REVOKED, and revocation wins over expiry.
    admin.revoke_key(proto::RevokeKeyRequest { key_id: record.key_id.clone() }).await.unwrap();
    let r = verify(&mut v, verify_req(&key)).await;
    assert_eq!(code(&r), Code::Revoked);
    assert_eq!((r.http_status, r.error.as_str()), (401, "expired_api_key"));
    admin.revoke_key(proto::RevokeKeyRequest { key_id: short_id(&short) }).await.unwrap();
    assert_eq!(code(&verify(&mut v, verify_req(&short)).await), Code::Revoked);

    // RATE_LIMITED / too_many_failed_attempts: 20 failures from one IP shed
    // it (even with a good key); another IP is untouched.
    let mut req = create_req("good");
    req.scopes = vec![];
    let (good, _) = create(&mut admin, req).await;
    for _ in 0..19 {
        assert_eq!(code(&verify(&mut v, with_ip("ks_live_nope", "198.51.100.7")).await), Code::Malformed);
    }
    assert_eq!(code(&verify(&mut v, with_ip(stranger.key.expose(), "198.51.100.7")).await), Code::NotFound);
    let r = verify(&mut v, with_ip(&good, "198.51.100.7")).await;
    assert_eq!(code(&r), Code::RateLimited);
    assert_eq!((r.http_status, r.error.as_str()), (429, "too_many_failed_attempts"));
    assert!(r.headers.contains_key("retry-after"));
    assert!(r.key_id.is_empty(), "shed before the key is looked at");
    // Its headers: the shedder's limit and window, the wait as t= and
    // retry-after. The next shed answer, made of the same values, is a
    // copy of them (README, "Performance"); a second later the wait is a
    // second shorter and the reset time the same.
    let t: u64 = r.headers["ratelimit"].strip_prefix("\"default\";r=0;t=").unwrap().parse().unwrap();
    assert!((2..=3).contains(&t), "one failure back every 3 s: {t}");
    assert_eq!(r.headers["x-ratelimit-limit"], "20");
    assert_eq!(r.headers["x-ratelimit-remaining"], "0");
    assert_eq!(r.headers["ratelimit-policy"], "\"default\";q=20;w=60");
    assert_eq!(r.headers["retry-after"], t.to_string());
    let again = verify(&mut v, with_ip(&good, "198.51.100.7")).await;
    assert_eq!(again.headers, r.headers);
    s.clock.advance(Duration::from_secs(1));
    let later = verify(&mut v, with_ip(&good, "198.51.100.7")).await;
    assert_eq!(code(&later), Code::RateLimited);
    assert_eq!(later.headers["ratelimit"], format!("\"default\";r=0;t={}", t - 1));
    assert_eq!(later.headers["retry-after"], (t - 1).to_string());
    assert_eq!(later.headers["x-ratelimit-reset"], r.headers["x-ratelimit-reset"]);
    assert_eq!(code(&verify(&mut v, with_ip(&good, "198.51.100.8")).await), Code::Valid);
    assert_eq!(code(&verify(&mut v, with_ip(&good, "")).await), Code::Valid, "no IP, never shed");
    // IPv6: one /64 shares a bucket. (A key already cached is answered
    // whatever its address's failures: a fresh one shows the shedding.)
    let (fresh, _) = create(&mut admin, create_req("fresh")).await;
    for _ in 0..21 {
        verify(&mut v, with_ip(stranger.key.expose(), "2001:db8:0:7::1")).await;
    }
    assert_eq!(code(&verify(&mut v, with_ip(&fresh, "2001:db8:0:7::abcd")).await), Code::RateLimited);
    assert_eq!(code(&verify(&mut v, with_ip(&fresh, "2001:db8:0:8::1")).await), Code::Valid);
    // The block ends when a failure's cell is back (one every 3 s).
    s.clock.advance(Duration::from_secs(3));
    assert_eq!(code(&verify(&mut v, with_ip(&good, "198.51.100.7")).await), Code::Valid);

    // INVALID_ARGUMENT: a message over 16 KiB.
    let err = v.verify(verify_req(&"k".repeat(17 * 1024))).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    let err = v
        .verify(proto::VerifyRequest { key: good.clone(), scopes: vec!["s".into(); 65], ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!((err.code(), err.message()), (tonic::Code::InvalidArgument, "at most 64 scopes per request"));
    // One limit name too many: the request is read in place, its lists
    // kept only one past what a request may name.
    let err = v
        .verify(proto::VerifyRequest { key: good.clone(), limits: vec!["api".into(); 9], ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!((err.code(), err.message()), (tonic::Code::InvalidArgument, "at most 8 limits per request"));
    let eight = proto::VerifyRequest { key: good.clone(), limits: vec!["api".into(); 8], ..Default::default() };
    assert_eq!(code(&v.verify(eight).await.unwrap().into_inner()), Code::Valid);
}

fn short_id(key: &str) -> String {
    KeyFormat::default().parse(key).unwrap().key_id.to_string()
}

#[tokio::test]
async fn every_code_on_the_memory_store() {
    let s = server(Arc::new(MemoryStore::new())).await;
    every_code(&s).await;
    s.stop().await;
}

#[tokio::test]
async fn every_code_on_redis() {
    let redis = RedisServer::start();
    let store = RedisStore::open(&redis.url(), "keystile", Duration::from_secs(1)).unwrap();
    let s = server(Arc::new(store)).await;
    every_code(&s).await;
    s.stop().await;
}

#[tokio::test]
async fn unavailable_when_the_memory_store_fails_and_nothing_is_negative_cached() {
    let store = Arc::new(MemoryStore::new());
    // The store path itself: no known-key filter to answer the unknown key.
    let mut settings = EngineSettings::new(test_pepper());
    settings.cache.known_keys = 0;
    let s = TestServer::start_with(store.clone(), settings, ServerOptions::default(), Clock::manual(START)).await;
    let mut admin = s.admin().await;
    let mut v = s.verifier().await;
    let (cached, _) = create(&mut admin, create_req("cached")).await;
    let (uncached, _) = create(&mut admin, create_req("uncached")).await;
    let unknown = generate(&KeyFormat::default(), Env::Live);
    assert_eq!(code(&verify(&mut v, verify_req(&cached)).await), Code::Valid);
    assert_eq!(code(&verify(&mut v, verify_req(unknown.key.expose())).await), Code::NotFound, "negative-cached");

    store.set_failing(true);
    assert_eq!(code(&verify(&mut v, verify_req(&cached)).await), Code::Valid, "a fresh cached key needs no store");
    // Past its TTL the entry needs the store; the store fails, the outage
    // starts now, and the entry is served for the stale window (60 s).
    s.clock.advance(Duration::from_secs(61));
    assert_eq!(code(&verify(&mut v, verify_req(&cached)).await), Code::Valid, "stale, within the window");
    let err = v.verify(verify_req(&uncached)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "uncached: UNAVAILABLE, never VALID");
    s.clock.advance(Duration::from_secs(1));
    let err = v.verify(verify_req(unknown.key.expose())).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "never a cached NOT_FOUND while the store is down");
    s.clock.advance(Duration::from_secs(58));
    assert_eq!(code(&verify(&mut v, verify_req(&cached)).await), Code::Valid, "59 s into the outage");
    s.clock.advance(Duration::from_secs(2));
    let err = v.verify(verify_req(&cached)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "past the stale window");

    store.set_failing(false);
    s.clock.advance(Duration::from_millis(200));
    assert_eq!(code(&verify(&mut v, verify_req(&uncached)).await), Code::Valid, "the failure was not cached");
    assert_eq!(code(&verify(&mut v, verify_req(&cached)).await), Code::Valid);
    s.stop().await;
}

#[tokio::test]
async fn unavailable_when_the_store_is_slower_than_its_budget() {
    let store = Arc::new(MemoryStore::new());
    let s = TestServer::start(store.clone()).await;
    let mut admin = s.admin().await;
    let mut v = s.verifier().await;
    let (key, _) = create(&mut admin, create_req("slow")).await;
    store.set_latency(Duration::from_millis(500));
    let err = v.verify(verify_req(&key)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert!(err.message().contains("did not answer"), "{}", err.message());
    s.stop().await;
}

#[tokio::test]
async fn resource_exhausted_when_the_server_sheds_load() {
    let store = Arc::new(MemoryStore::new());
    let mut settings = EngineSettings::new(test_pepper());
    settings.store_timeout = Duration::from_secs(5);
    let options = ServerOptions { max_inflight_per_connection: 1, ..ServerOptions::default() };
    let s = TestServer::start_with(store.clone(), settings, options, Clock::system()).await;
    let mut admin = s.admin().await;
    let (key, _) = create(&mut admin, create_req("slow")).await;
    store.set_latency(Duration::from_millis(300));
    let channel = s.channel().await;
    let mut a = keystile::proto::verifier_client::VerifierClient::new(channel.clone());
    let mut b = keystile::proto::verifier_client::VerifierClient::new(channel);
    let first = tokio::spawn({
        let key = key.clone();
        async move { a.verify(verify_req(&key)).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let err = b.verify(verify_req(&key)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert_eq!(code(&first.await.unwrap().unwrap().into_inner()), Code::Valid, "the call in progress completes");
    s.stop().await;
}

/// Rate-limit state lives in the limiter, not in the cache entry: a key
/// whose quota is spent and that has left the cache is still limited after
/// the purge interval has passed. Forged keys cannot push it out: absences
/// have a share of the cache of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_quota_survives_eviction() {
    let mut settings = EngineSettings::new(test_pepper());
    settings.cache.max_entries = 300;
    // Without the known-key filter, which would keep forged keys out of the
    // cache altogether (tested in store_behaviour.rs).
    settings.cache.known_keys = 0;
    let store = Arc::new(MemoryStore::new());
    let s = TestServer::start_with(store.clone(), settings, ServerOptions::default(), Clock::manual(START)).await;
    let mut admin = s.admin().await;
    let mut v = s.verifier().await;
    let hourly = proto::RateLimit { requests: 5, window_seconds: 3600, burst: 0, per_tenant: false };
    let (key, rec) =
        create(&mut admin, proto::CreateKeyRequest { rate_limit: Some(hourly), ..create_req("five an hour") }).await;
    for _ in 0..5 {
        assert_eq!(code(&verify(&mut v, verify_req(&key)).await), Code::Valid);
    }
    assert_eq!(code(&verify(&mut v, verify_req(&key)).await), Code::RateLimited);

    // Forged keys: well-formed, random key_ids, no IP (never shed). Each is
    // a store read and a negative entry, in the negatives' own share.
    let format = KeyFormat::default();
    let id: keystile::key::KeyId = rec.key_id.parse().unwrap();
    let cached = |s: &TestServer| {
        !matches!(s.app.records.cache().get(id, s.app.engine.clock().mono_nanos()), keystile::cache::Cached::Missing)
    };
    for _ in 0..2_000 {
        let k = generate(&format, Env::Live).key.into_exposed();
        let r = keystile::verdict::Request::of_key(&k);
        assert_eq!(s.app.engine.verify(&r).await.unwrap().outcome, keystile::verdict::Outcome::NotFound);
    }
    s.app.records.cache().len(); // runs moka's pending evictions
    assert!(cached(&s), "2,000 forged keys pushed a cached key out");

    assert!(s.app.records.cache().len() <= 300 + 300 / 8, "the cache stays within its bound");
    // The key leaves the cache all the same (what a size eviction does).
    s.app.records.cache().invalidate(id);
    assert!(!cached(&s));

    // The purge interval passes on the injected clock (a refill of one cell
    // takes 12 minutes, so the bucket is not whole), and the purge runs.
    s.clock.advance(keystile::server::PURGE_EVERY + Duration::from_secs(1));
    s.app.purge();
    let r = verify(&mut v, verify_req(&key)).await;
    assert_eq!(code(&r), Code::RateLimited, "out of the cache, the quota is still spent");
    assert_eq!(r.rate_limit.unwrap().remaining, 0);
    s.stop().await;
}

/// Shedding protects the store, not from valid keys: a key already cached
/// is answered whatever its address's failures; an address with a port is
/// the address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shedding_spares_cached_keys_and_ip_ports_are_stripped() {
    let s = server(Arc::new(MemoryStore::new())).await;
    let mut admin = s.admin().await;
    let mut v = s.verifier().await;
    let allow = proto::CreateKeyRequest { ip_allowlist: vec!["203.0.113.0/24".into()], ..create_req("cached") };
    let (cached, _) = create(&mut admin, allow).await;
    let (uncached, _) = create(&mut admin, create_req("not yet used")).await;
    assert_eq!(code(&verify(&mut v, with_ip(&cached, "203.0.113.7:443")).await), Code::Valid, "the port is stripped");
    let unknown = generate(&KeyFormat::default(), Env::Live);
    for _ in 0..25 {
        verify(&mut v, with_ip(unknown.key.expose(), "203.0.113.7:50000")).await;
    }
    let shed = verify(&mut v, with_ip(&uncached, "203.0.113.7")).await;
    assert_eq!(code(&shed), Code::RateLimited, "an uncached key from a failing address is shed");
    assert_eq!(shed.error, "too_many_failed_attempts");
    let r = verify(&mut v, with_ip(&cached, "203.0.113.7")).await;
    assert_eq!(code(&r), Code::Valid, "a cached key is answered whatever its address's failures");
    let r = verify(&mut v, with_ip(&cached, "[::ffff:203.0.113.7]:8443")).await;
    assert_eq!(code(&r), Code::Valid, "IPv4-mapped IPv6 with a port");
    s.stop().await;
}

/// One store read that misses its budget is not an outage: the next
/// lookup asks the store again instead of answering UNAVAILABLE at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_slow_store_read_does_not_open_the_breaker() {
    let store = Arc::new(MemoryStore::new());
    let s = TestServer::start(store.clone()).await;
    let mut admin = s.admin().await;
    let mut v = s.verifier().await;
    let (first, _) = create(&mut admin, create_req("first")).await;
    let (second, _) = create(&mut admin, create_req("second")).await;
    store.set_latency(Duration::from_millis(300));
    let err = v.verify(verify_req(&first)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    store.set_latency(Duration::ZERO);
    assert_eq!(code(&verify(&mut v, verify_req(&second)).await), Code::Valid, "the store is asked again");
    assert_eq!(code(&verify(&mut v, verify_req(&first)).await), Code::Valid);
    s.stop().await;
}

/// Limits for the whole process: calls in progress beyond the cap are
/// refused at once, whatever connection they come on; connections beyond
/// theirs are closed; a body that is not the method's message is the
/// caller's INVALID_ARGUMENT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_wide_limits_and_undecodable_requests() {
    let store = Arc::new(MemoryStore::new());
    let mut settings = EngineSettings::new(test_pepper());
    settings.store_timeout = Duration::from_secs(5);
    let options = ServerOptions { max_inflight: 2, max_connections: 3, ..ServerOptions::default() };
    let s = TestServer::start_with(store.clone(), settings, options, Clock::system()).await;
    let mut admin = s.admin().await;
    let (key, _) = create(&mut admin, create_req("slow")).await;
    let (other, _) = create(&mut admin, create_req("slow too")).await;
    drop(admin);
    store.set_latency(Duration::from_millis(400));
    // Two slow calls on two connections hold both permits; a third, on a
    // third connection, is refused without waiting.
    // Two keys: two reads of the store (one key's would be shared).
    let before = store.begun();
    let mut slow = Vec::new();
    for key in [&key, &other] {
        let mut v = s.verifier().await;
        let key = key.clone();
        slow.push(tokio::spawn(async move { v.verify(verify_req(&key)).await }));
    }
    // Both are in the store (on a busy machine a fixed pause was not
    // always enough for them to get there).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while store.begun() < before + 2 {
        assert!(std::time::Instant::now() < deadline, "the two slow calls never reached the store");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut third = s.verifier().await;
    let err = third.verify(verify_req(&key)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("calls in progress"), "{}", err.message());
    for c in slow {
        assert_eq!(code(&c.await.unwrap().unwrap().into_inner()), Code::Valid);
    }
    store.set_latency(Duration::ZERO);
    // Three connections are open (the two slow ones' clients are gone, the
    // third is held): open more until one is turned away.
    let mut held = Vec::new();
    let mut refused = false;
    for _ in 0..6 {
        match tonic::transport::Channel::from_shared(s.url()).unwrap().connect().await {
            Ok(ch) => {
                let mut v = keystile::proto::verifier_client::VerifierClient::new(ch.clone());
                if v.verify(verify_req(&key)).await.is_err() {
                    refused = true;
                    break;
                }
                held.push(ch);
            }
            Err(_) => {
                refused = true;
                break;
            }
        }
    }
    assert!(refused, "a connection beyond the cap is closed");
    assert!(held.len() <= 3);
    drop(held);

    // Field 1 (key, a string) as bytes that are not UTF-8.
    #[derive(Clone, PartialEq, prost::Message)]
    struct NotAVerifyRequest {
        #[prost(bytes = "vec", tag = "1")]
        key: Vec<u8>,
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let channel = tonic::transport::Channel::from_shared(s.url()).unwrap().connect().await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<NotAVerifyRequest, proto::VerifyResponse>::default();
    let path = http::uri::PathAndQuery::from_static("/keystile.v1.Verifier/Verify");
    let request = tonic::Request::new(NotAVerifyRequest { key: vec![0xff, 0xfe, 0xfd] });
    let err = grpc.unary(request, path, codec).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert_eq!(err.message(), keystile::service::status::UNDECODABLE);
    s.stop().await;
}

/// README, "Limits": a call takes one of `--max-inflight` once its request
/// has arrived whole. Streams whose requests never end (opened to hold the
/// process's calls) hold none: a whole Verify sent after them is answered,
/// and each of them ends `DEADLINE_EXCEEDED`, none `RESOURCE_EXHAUSTED`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_never_end_hold_none_of_the_process_calls() {
    /// A request body that never sends a byte and never ends.
    struct NeverEnds;
    impl http_body::Body for NeverEnds {
        type Data = bytes::Bytes;
        type Error = tonic::Status;
        fn poll_frame(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, tonic::Status>>> {
            std::task::Poll::Pending
        }
    }
    use tower::{Service, ServiceExt};
    let store = Arc::new(MemoryStore::new());
    let options = ServerOptions { max_inflight: 2, ..ServerOptions::default() };
    let s = TestServer::start_with(store, EngineSettings::new(test_pepper()), options, Clock::system()).await;
    let mut admin = s.admin().await;
    let (key, _) = create(&mut admin, create_req("held")).await;
    // One connection, so the streams reach the server in the order sent:
    // three that never end, then a whole Verify.
    let channel = tonic::transport::Channel::from_shared(s.url()).unwrap().connect().await.unwrap();
    let mut open = Vec::new();
    for _ in 0..3 {
        let request = http::Request::builder()
            .method("POST")
            .uri(format!("{}/keystile.v1.Verifier/Verify", s.url()))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(tonic::body::Body::new(NeverEnds))
            .unwrap();
        let mut ch = channel.clone();
        let call = ch.ready().await.unwrap().call(request);
        open.push(tokio::spawn(call));
    }
    let mut v = keystile::proto::verifier_client::VerifierClient::new(channel.clone());
    let answer = v.verify(verify_req(&key)).await.expect("a whole request is answered");
    assert_eq!(code(&answer.into_inner()), Code::Valid);
    for call in open {
        let response = tokio::time::timeout(Duration::from_secs(20), call).await.unwrap().unwrap().unwrap();
        let status = response.headers().get("grpc-status").map(|v| v.to_str().unwrap().to_string());
        assert_eq!(status.as_deref(), Some("4"), "DEADLINE_EXCEEDED after the request deadline: {response:?}");
    }
    s.stop().await;
}

/// README, "Limits": a connection that sends nothing (a socket opened to
/// hold one of the connection slots) is closed after the idle timeout, and
/// its slot is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_after_the_idle_timeout() {
    use tokio::io::AsyncReadExt;
    let options = ServerOptions {
        max_connections: 2,
        idle_timeout: Some(Duration::from_millis(500)),
        ..ServerOptions::default()
    };
    let s = TestServer::start_with(
        Arc::new(MemoryStore::new()),
        EngineSettings::new(test_pepper()),
        options,
        Clock::system(),
    )
    .await;
    // The readiness check's connection is gone; two silent sockets take
    // both slots.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(tokio::net::TcpStream::connect(s.addr).await.unwrap());
    }
    let t0 = std::time::Instant::now();
    for mut socket in silent {
        let mut buf = [0u8; 64];
        // The server's HTTP/2 settings may come first; then the close.
        loop {
            let n = tokio::time::timeout(Duration::from_secs(5), socket.read(&mut buf))
                .await
                .expect("closed within the bound")
                .unwrap_or(0);
            if n == 0 {
                break;
            }
        }
    }
    let waited = t0.elapsed();
    assert!(waited >= Duration::from_millis(400), "closed after {waited:?}, before the idle timeout");
    // The slots are free: a real client is served.
    let mut v = s.verifier().await;
    assert_eq!(code(&verify(&mut v, verify_req("ks_live_nope")).await), Code::Malformed);
    s.stop().await;
}

/// A burst of calls on a connection that has just opened (before the
/// server's HTTP/2 settings reach the client) is answered, not refused
/// (README, "Limits": why the default stream limit stays at 100).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_on_new_connections_are_answered() {
    let s = server(Arc::new(MemoryStore::new())).await;
    let mut refused = 0;
    for _ in 0..50 {
        let channel = tonic::transport::Channel::from_shared(s.url()).unwrap().connect_lazy();
        let calls: Vec<_> = (0..32)
            .map(|_| {
                let mut v = keystile::proto::verifier_client::VerifierClient::new(channel.clone());
                tokio::spawn(async move { v.verify(verify_req("ks_live_nope")).await })
            })
            .collect();
        for c in calls {
            refused += usize::from(c.await.unwrap().is_err());
        }
    }
    assert_eq!(refused, 0, "calls refused on new connections");
    s.stop().await;
}

/// README, "Performance": no write cliff. A Verify answer for a realistic
/// key (three scopes, an allowlist, three named limits: well over the 256
/// bytes at which h2 would give a DATA frame a write of its own on a
/// vectored transport) costs no more write calls than a Health/Check
/// answer, counted on the accepted connection: one call at a time, and
/// many at once (README, "Runtime": answers leave in batches).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verify_answer_costs_no_more_writes_than_a_health_check() {
    use prost::Message;
    let writes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let options = ServerOptions { writes: Some(writes.clone()), ..ServerOptions::default() };
    let s = TestServer::start_with(
        Arc::new(MemoryStore::new()),
        EngineSettings::new(test_pepper()),
        options,
        Clock::system(),
    )
    .await;
    let mut admin = s.admin().await;
    let realistic = proto::CreateKeyRequest {
        scopes: vec!["read".into(), "write".into(), "export:data".into()],
        ip_allowlist: vec!["10.0.0.0/8".into(), "192.168.0.0/16".into()],
        limits: vec![limit("api=1000000/1m"), limit("export=1000000/1h"), limit("burst=1000000/1s")],
        ..create_req("a service key with a realistic name")
    };
    let (key, _) = create(&mut admin, realistic).await;
    let channel = s.channel().await;
    let mut v = keystile::proto::verifier_client::VerifierClient::new(channel.clone());
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let req = proto::VerifyRequest {
        ip: "10.1.2.3".into(),
        scopes: vec!["read".into()],
        limits: vec!["api".into(), "export".into(), "burst".into()],
        ..verify_req(&key)
    };
    let answer = verify(&mut v, req.clone()).await;
    assert_eq!(code(&answer), Code::Valid);
    assert!(answer.encoded_len() > 400, "a large answer: {} bytes", answer.encoded_len());
    health.check(tonic_health::pb::HealthCheckRequest::default()).await.unwrap();

    const CALLS: u64 = 300;
    let count = || writes.load(std::sync::atomic::Ordering::Relaxed);
    let before = count();
    for _ in 0..CALLS {
        health.check(tonic_health::pb::HealthCheckRequest::default()).await.unwrap();
    }
    let health_writes = count() - before;
    let before = count();
    for _ in 0..CALLS {
        v.verify(req.clone()).await.unwrap();
    }
    let verify_writes = count() - before;
    println!(
        "writes per call: Health/Check {:.2}, Verify ({} byte answer) {:.2}",
        health_writes as f64 / CALLS as f64,
        answer.encoded_len(),
        verify_writes as f64 / CALLS as f64
    );
    assert!(
        verify_writes <= health_writes + CALLS / 10,
        "Verify {verify_writes} writes vs Health {health_writes} for {CALLS} calls each"
    );

    // Calls in flight together on one connection: answers finished
    // together leave together (README, "Runtime"), for Verify as for
    // Health/Check. About 0.15 writes per call each here, 0.3-0.4 when
    // every finished answer woke its connection to write at once; the
    // best of three tries, so that a stalled moment does not decide.
    const CALLERS: u64 = 32;
    const EACH: u64 = 40;
    let mut best = (f64::MAX, f64::MAX);
    for _ in 0..3 {
        let before = count();
        let tasks: Vec<_> = (0..CALLERS)
            .map(|_| {
                let mut health = health.clone();
                tokio::spawn(async move {
                    for _ in 0..EACH {
                        health.check(tonic_health::pb::HealthCheckRequest::default()).await.unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let health_batched = (count() - before) as f64 / (CALLERS * EACH) as f64;
        let before = count();
        let tasks: Vec<_> = (0..CALLERS)
            .map(|_| {
                let (mut v, req) = (v.clone(), req.clone());
                tokio::spawn(async move {
                    for _ in 0..EACH {
                        v.verify(req.clone()).await.unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let verify_batched = (count() - before) as f64 / (CALLERS * EACH) as f64;
        best = (best.0.min(health_batched), best.1.min(verify_batched));
    }
    let (health_batched, verify_batched) = best;
    println!(
        "writes per call, {CALLERS} callers on one connection: Health/Check {health_batched:.2}, Verify {verify_batched:.2}"
    );
    assert!(health_batched < 0.28 && verify_batched < 0.28, "answers are not batched");
    assert!(verify_batched <= health_batched + 0.1, "a Verify answer costs more writes than a Health/Check one");
    s.stop().await;
}
