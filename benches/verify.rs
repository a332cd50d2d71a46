//! In-process costs of the hot path (README, "Performance"): parsing, malformed
//! rejection, a cache-hit verify with every check, a negative-cache hit and
//! a miss against the memory store.
//!
//! `cargo bench --bench verify`

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use keystile::admin::{Actor, KeySpec};
use keystile::app::App;
use keystile::clock::Clock;
use keystile::engine::EngineSettings;
use keystile::key::{Env, KeyFormat, Pepper, PepperSet, generate};
use keystile::store::RateLimitPolicy;
use keystile::store::memory::MemoryStore;
use keystile::verdict::{Request, Words};

/// The binary's allocator (`src/main.rs`), so that the figures are its.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let format = KeyFormat::default();
    let good = generate(&format, Env::Live).key.expose().to_string();
    let mut bad = good.clone().into_bytes();
    bad[40] = if bad[40] == b'x' { b'y' } else { b'x' };
    let bad = String::from_utf8(bad).unwrap();

    c.bench_function("parse_valid_key", |b| b.iter(|| format.parse(black_box(&good)).is_ok()));
    c.bench_function("reject_malformed_key", |b| b.iter(|| format.parse(black_box(&bad)).is_err()));

    let store = Arc::new(MemoryStore::new());
    let settings = EngineSettings::new(PepperSet::single(Pepper::parse(&[7u8; 32]).unwrap()));
    let app = App::build(settings, store, Clock::system());
    let (engine, admin) = (app.engine.clone(), app.admin.clone());
    let minted = rt.block_on(admin.create(
        KeySpec {
            name: "bench".into(),
            env: "live".into(),
            scopes: vec!["read".into(), "write".into()],
            ip_allowlist: vec!["10.0.0.0/8".into(), "192.168.0.0/16".into()],
            rate_limit: Some(RateLimitPolicy {
                requests: 1_000_000_000,
                window_seconds: 1,
                burst: 0,
                per_tenant: false,
            }),
            ..Default::default()
        },
        &Actor::deployment(),
    ));
    let key = minted.unwrap().key.expose().to_string();
    let scopes = vec!["read".to_string()];
    let hit = Request { ip: Some("10.1.2.3".parse().unwrap()), scopes: Words::Owned(&scopes), ..Request::of_key(&key) };
    assert!(rt.block_on(engine.verify(&hit)).unwrap().is_valid());
    c.bench_function("verify_cache_hit_scopes_ip_limit", |b| {
        b.to_async(&rt).iter(|| async { engine.verify(black_box(&hit)).await.unwrap().is_valid() })
    });

    // The same without a rate limit: the difference is what the limiter adds.
    let unlimited = rt
        .block_on(admin.create(
            KeySpec {
                name: "bench unlimited".into(),
                env: "live".into(),
                scopes: vec!["read".into(), "write".into()],
                ip_allowlist: vec!["10.0.0.0/8".into(), "192.168.0.0/16".into()],
                ..Default::default()
            },
            &Actor::deployment(),
        ))
        .unwrap()
        .key
        .expose()
        .to_string();
    let hit_unlimited = Request { key: &unlimited, ..hit };
    assert!(rt.block_on(engine.verify(&hit_unlimited)).unwrap().is_valid());
    c.bench_function("verify_cache_hit_scopes_ip_no_limit", |b| {
        b.to_async(&rt).iter(|| async { engine.verify(black_box(&hit_unlimited)).await.unwrap().is_valid() })
    });

    // The same limited key with the fleet limiter: buckets shared through
    // the store, spent from a lease (no store call with a lease in hand).
    let shared = Arc::new(MemoryStore::sharing_buckets(Clock::system()));
    let settings = EngineSettings::new(PepperSet::single(Pepper::parse(&[7u8; 32]).unwrap()));
    let fleet_app = rt.block_on(async { App::build(settings, shared.clone(), Clock::system()) });
    let fleet_key = rt
        .block_on(fleet_app.admin.create(
            KeySpec {
                name: "bench fleet".into(),
                env: "live".into(),
                scopes: vec!["read".into(), "write".into()],
                ip_allowlist: vec!["10.0.0.0/8".into(), "192.168.0.0/16".into()],
                rate_limit: Some(RateLimitPolicy {
                    requests: 1_000_000_000,
                    window_seconds: 1,
                    burst: 0,
                    per_tenant: false,
                }),
                ..Default::default()
            },
            &Actor::deployment(),
        ))
        .unwrap()
        .key
        .expose()
        .to_string();
    let fleet_engine = fleet_app.engine.clone();
    let fleet_hit = Request { key: &fleet_key, ..hit };
    for _ in 0..10_000 {
        assert!(rt.block_on(fleet_engine.verify(&fleet_hit)).unwrap().is_valid());
    }
    let calls = shared.buckets().unwrap().calls();
    c.bench_function("verify_cache_hit_scopes_ip_fleet_lease", |b| {
        b.to_async(&rt).iter(|| async { fleet_engine.verify(black_box(&fleet_hit)).await.unwrap().is_valid() })
    });
    println!("shared-bucket calls during the fleet bench: {}", shared.buckets().unwrap().calls() - calls);

    // Tokens exchanged for a key (README, "Token exchange"): a cached
    // token, a first-seen one (signature checked), and the exchange itself.
    let exchanger = rt
        .block_on(admin.create(
            KeySpec {
                name: "bench exchanger".into(),
                env: "live".into(),
                scopes: vec!["token:exchange".into(), "read".into(), "write".into()],
                ip_allowlist: vec!["10.0.0.0/8".into(), "192.168.0.0/16".into()],
                ..Default::default()
            },
            &Actor::deployment(),
        ))
        .unwrap()
        .key
        .expose()
        .to_string();
    let tokens = app.tokens.clone().unwrap();
    let exchange_req = keystile::token::exchange::ExchangeRequest {
        secret: &exchanger,
        email: "",
        scopes: &[],
        ttl_seconds: 0,
        peer: Some("10.1.2.3".parse().unwrap()),
    };
    let issue = || {
        rt.block_on(keystile::token::exchange::exchange(&app.auth, &tokens, &exchange_req))
            .unwrap()
            .token
            .expose()
            .to_string()
    };
    let token = issue();
    let token_hit = Request { key: &token, ..hit_unlimited };
    assert!(rt.block_on(engine.verify(&token_hit)).unwrap().is_valid());
    c.bench_function("verify_cached_token_scopes_ip_no_limit", |b| {
        b.to_async(&rt).iter(|| async { engine.verify(black_box(&token_hit)).await.unwrap().is_valid() })
    });
    c.bench_function("verify_first_seen_token_signature", |b| {
        b.iter_batched(issue, |t| tokens.verify(black_box(&t)).is_ok(), criterion::BatchSize::SmallInput)
    });
    c.bench_function("exchange_key_for_token", |b| {
        b.to_async(&rt).iter(|| async {
            keystile::token::exchange::exchange(&app.auth, &tokens, black_box(&exchange_req)).await.unwrap().expires_in
        })
    });

    let verdict = rt.block_on(engine.verify(&hit_unlimited)).unwrap();
    c.bench_function("response_build_and_encode", |b| {
        b.iter(|| {
            let resp = keystile::service::verifier::to_response(black_box(&verdict), 1_800_000_000);
            let mut buf = Vec::with_capacity(256);
            prost::Message::encode(&resp, &mut buf).unwrap();
            buf.len()
        })
    });
    // What the server does instead: the same bytes, written straight from
    // the verdict (src/service/verify_answer.rs).
    let answer = keystile::service::verify_answer::VerifyAnswer { verdict: verdict.clone(), now_unix: 1_800_000_000 };
    c.bench_function("response_written", |b| {
        b.iter(|| {
            let mut buf = Vec::with_capacity(256);
            black_box(&answer).write(&mut buf);
            buf.len()
        })
    });

    let stranger = generate(&format, Env::Live).key.expose().to_string();
    let negative = Request::of_key(&stranger);
    rt.block_on(engine.verify(&negative)).unwrap();
    c.bench_function("verify_negative_cache_hit", |b| {
        b.to_async(&rt).iter(|| async { engine.verify(black_box(&negative)).await.unwrap().outcome })
    });

    let id = format.parse(&key).unwrap().key_id;
    c.bench_function("verify_miss_memory_store", |b| {
        b.to_async(&rt).iter(|| async {
            app.records.invalidate(id);
            engine.verify(black_box(&hit)).await.unwrap().is_valid()
        })
    });
}

criterion_group!(name = verify; config = Criterion::default().sample_size(50).measurement_time(std::time::Duration::from_secs(3)); targets = benches);
criterion_main!(verify);
