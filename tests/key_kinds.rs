//! Key kinds (README, "Key kinds"): secret, publishable and restricted keys,
//! each with its own prefix; a publishable key answers only for `public:`
//! scopes and its origin allowlist; the kind is told by the prefix before
//! any lookup. And usage counts by code (README, "Usage"), written in
//! batches.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use keystile::clock::Clock;
use keystile::engine::EngineSettings;
use keystile::key::{Env, KeyFormat, KeyKind};
use keystile::proto::{self, Code};
use keystile::server::ServerOptions;
use keystile::store::KeyStore;
use keystile::store::memory::MemoryStore;
use keystile::store::redis::RedisStore;

fn publishable(name: &str, scopes: &[&str], origins: &[&str]) -> proto::CreateKeyRequest {
    proto::CreateKeyRequest {
        kind: proto::KeyKind::Publishable as i32,
        tenant: "shop".into(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        allowed_origins: origins.iter().map(|s| s.to_string()).collect(),
        ..create_req(name)
    }
}

fn req(key: &str, scopes: &[&str], origin: &str) -> proto::VerifyRequest {
    proto::VerifyRequest {
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        origin: origin.into(),
        ..verify_req(key)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishable_keys_answer_public_scopes_from_allowed_origins_only() {
    let store = Arc::new(MemoryStore::new());
    let s = TestServer::start(store.clone()).await;
    let mut admin = s.admin().await;
    let mut v = s.verifier().await;
    let (site, rec) =
        create(&mut admin, publishable("storefront", &["public:read", "public:cart"], &["https://*.shop.example"]))
            .await;
    assert!(site.starts_with("kp_live_"), "the default publishable prefix");
    assert_eq!(rec.kind, proto::KeyKind::Publishable as i32);
    assert_eq!(rec.allowed_origins, ["https://*.shop.example"]);

    let ok = verify(&mut v, req(&site, &["public:read"], "https://www.shop.example")).await;
    assert_eq!(code(&ok), Code::Valid);
    assert_eq!(ok.tenant, "shop", "a site key identifies its tenant");
    assert_eq!(code(&verify(&mut v, req(&site, &[], "https://WWW.shop.example/")).await), Code::Valid);
    for origin in ["https://shop.example", "https://www.shop.example.evil.net", "http://www.shop.example", ""] {
        let r = verify(&mut v, req(&site, &["public:read"], origin)).await;
        assert_eq!(code(&r), Code::OriginNotAllowed, "{origin:?}");
        assert_eq!((r.http_status, r.error.as_str()), (403, "origin_not_allowed"));
    }
    assert_eq!(
        code(&verify(&mut v, req(&site, &["public:admin"], "https://www.shop.example")).await),
        Code::InsufficientScope,
        "a public scope it does not hold"
    );

    // A secret scope is refused from the prefix alone: no cache, no store,
    // whatever the key_id (known or forged).
    let forged = keystile::key::generate_kind(&KeyFormat::default(), Env::Live, KeyKind::Publishable);
    let before = store.calls();
    for key in [site.as_str(), forged.key.expose()] {
        for _ in 0..50 {
            let r = verify(&mut v, req(key, &["read:orders"], "https://www.shop.example")).await;
            assert_eq!(code(&r), Code::InsufficientScope);
            assert!(r.key_id.is_empty(), "answered before any lookup");
        }
    }
    assert_eq!(store.calls(), before, "zero store reads for a publishable key asking a secret scope");

    // Its secret is public: re-prefixed as a secret key (the checksum is
    // public too) it finds nothing.
    let format = KeyFormat::default();
    let parsed = format.parse(&site).unwrap();
    let disguised = keystile::key::assemble("ks", Env::Live, parsed.key_id, parsed.secret());
    let r = verify(&mut v, req(disguised.expose(), &["read:orders"], "")).await;
    assert_eq!(code(&r), Code::NotFound, "a publishable key's secret never opens a secret key");
    let r = verify(&mut v, req(disguised.expose(), &[], "")).await;
    assert_eq!(code(&r), Code::NotFound);

    // Nor is it an admin key or exchanged for a token.
    let mut as_admin = admin_client(s.channel().await, &site);
    assert!(as_admin.list_keys(proto::ListKeysRequest::default()).await.is_err());

    // Origins are changed (and cleared: any origin) by an update.
    let updated = admin
        .update_key(proto::UpdateKeyRequest {
            key_id: rec.key_id.clone(),
            allowed_origins: Some(proto::StringList { values: vec![] }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .record
        .unwrap();
    assert!(updated.allowed_origins.is_empty());
    assert_eq!(code(&verify(&mut v, req(&site, &["public:read"], "")).await), Code::Valid);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_kind_is_checked_at_creation_and_update() {
    let s = TestServer::start(Arc::new(MemoryStore::new())).await;
    let mut admin = s.admin().await;
    let mut v = s.verifier().await;
    let refused = [
        (publishable("p1", &["read:orders"], &[]), "\"read:orders\" is not"),
        (
            proto::CreateKeyRequest { tiers: vec!["basic".into()], ..publishable("p2", &["public:read"], &[]) },
            "no tiers",
        ),
        (publishable("p3", &["public:read"], &["example.com"]), "scheme://host"),
        (proto::CreateKeyRequest { exchange_only: true, ..publishable("p4", &[], &[]) }, "exchange-only"),
        (proto::CreateKeyRequest { kind: proto::KeyKind::Restricted as i32, ..create_req("r1") }, "explicit list"),
        (
            proto::CreateKeyRequest {
                kind: proto::KeyKind::Restricted as i32,
                scopes: vec!["read:*".into()],
                ..create_req("r2")
            },
            "is a pattern",
        ),
        (
            proto::CreateKeyRequest { allowed_origins: vec!["https://a.example".into()], ..create_req("s1") },
            "publishable keys only",
        ),
        (proto::CreateKeyRequest { kind: 9, ..create_req("k9") }, "unknown key kind"),
    ];
    for (request, needle) in refused {
        let err = admin.create_key(request).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{needle}");
        assert!(err.message().contains(needle), "{needle:?} in {:?}", err.message());
    }

    // A restricted key: its own prefix, its explicit scopes.
    let restricted = proto::CreateKeyRequest {
        kind: proto::KeyKind::Restricted as i32,
        scopes: vec!["read:orders".into()],
        ..create_req("reporting job")
    };
    let (rk, rrec) = create(&mut admin, restricted).await;
    assert!(rk.starts_with("kr_live_"));
    assert_eq!(code(&verify(&mut v, req(&rk, &["read:orders"], "")).await), Code::Valid);
    assert_eq!(code(&verify(&mut v, req(&rk, &["write:orders"], "")).await), Code::InsufficientScope);
    let err = admin
        .update_key(proto::UpdateKeyRequest {
            key_id: rrec.key_id.clone(),
            scopes: Some(proto::StringList { values: vec![] }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("explicit list"), "{}", err.message());
    // Rotation keeps the kind and its prefix.
    let rotated = admin
        .rotate_key(proto::RotateKeyRequest { key_id: rrec.key_id.clone(), grace_seconds: Some(0) })
        .await
        .unwrap()
        .into_inner();
    assert!(rotated.key.starts_with("kr_live_"));
    assert_eq!(rotated.record.unwrap().kind, proto::KeyKind::Restricted as i32);

    // A publishable key cannot be widened by an update either.
    let (_, prec) = create(&mut admin, publishable("site", &["public:read"], &[])).await;
    let err = admin
        .update_key(proto::UpdateKeyRequest {
            key_id: prec.key_id,
            scopes: Some(proto::StringList { values: vec!["write:orders".into()] }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    s.stop().await;
}

/// Stripe-style prefixes: each kind's prefix is configured; the old
/// defaults are then malformed, with no store access.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_prefixes_mint_and_tell_each_kind() {
    let store = Arc::new(MemoryStore::new());
    let mut settings = EngineSettings::new(test_pepper());
    settings.format = KeyFormat::new(vec!["sk".into()], &Env::ALL)
        .unwrap()
        .with_kind_prefixes(vec!["pk".into()], vec!["rk".into()])
        .unwrap();
    let s = TestServer::start_with(store.clone(), settings, ServerOptions::default(), Clock::system()).await;
    let mut admin = s.admin().await;
    let mut v = s.verifier().await;
    let (sk, _) = create(&mut admin, create_req("server")).await;
    let (pk, _) = create(&mut admin, publishable("site", &["public:read"], &[])).await;
    let rk_req = proto::CreateKeyRequest {
        kind: proto::KeyKind::Restricted as i32,
        scopes: vec!["a:b".into()],
        ..create_req("r")
    };
    let (rk, _) = create(&mut admin, rk_req).await;
    assert!(sk.starts_with("sk_live_") && pk.starts_with("pk_live_") && rk.starts_with("rk_live_"));
    for k in [&sk, &pk, &rk] {
        assert_eq!(code(&verify(&mut v, verify_req(k)).await), Code::Valid);
    }
    let old = keystile::key::generate_kind(&KeyFormat::default(), Env::Live, KeyKind::Publishable);
    let before = store.calls();
    assert_eq!(code(&verify(&mut v, verify_req(old.key.expose())).await), Code::Malformed);
    assert_eq!(store.calls(), before);
    s.stop().await;
}

/// Usage (README, "Usage"): counts by code over the last day, summed over
/// the fleet, written in one batch per flush, never per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_counts_by_code_are_written_in_batches() {
    let redis = RedisServer::start();
    let open = || -> Arc<dyn KeyStore> {
        Arc::new(RedisStore::open(&redis.url(), "keystile", Duration::from_secs(1)).unwrap())
    };
    let clock = Clock::manual(1_800_000_000);
    let options = ServerOptions { last_used_flush: Duration::from_secs(3600), ..Default::default() };
    let a = TestServer::start_with(open(), EngineSettings::new(test_pepper()), options.clone(), clock.clone()).await;
    let b = TestServer::start_with(open(), EngineSettings::new(test_pepper()), options, clock.clone()).await;
    let mut admin = a.admin().await;
    let scoped = proto::CreateKeyRequest { scopes: vec!["read".into()], ..create_req("busy") };
    let (key, rec) = create(&mut admin, scoped).await;
    let (mut va, mut vb) = (a.verifier().await, b.verifier().await);
    // b learns of the key from the change feed (a probe would count usage).
    let id: keystile::key::KeyId = rec.key_id.parse().unwrap();
    let t0 = std::time::Instant::now();
    while !b.app.records.may_exist(id) {
        assert!(t0.elapsed() < Duration::from_secs(5), "b never learned of the key");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // The admin calls so far counted the admin key's use: written first.
    a.app.usage.flush().await.unwrap();
    let writes_before = redis.command_calls().get("hincrby").copied().unwrap_or(0);
    for i in 0..300 {
        let v = if i % 3 == 0 { &mut vb } else { &mut va };
        assert_eq!(code(&verify(v, req(&key, &["read"], "")).await), Code::Valid);
    }
    for _ in 0..40 {
        assert_eq!(code(&verify(&mut va, req(&key, &["write"], "")).await), Code::InsufficientScope);
    }
    assert_eq!(
        redis.command_calls().get("hincrby").copied().unwrap_or(0),
        writes_before,
        "nothing written per request"
    );
    a.app.usage.flush().await.unwrap();
    b.app.usage.flush().await.unwrap();
    let writes = redis.command_calls().get("hincrby").copied().unwrap_or(0) - writes_before;
    assert_eq!(writes, 3, "one write per (key, code) per flush: a's VALID and INSUFFICIENT_SCOPE, b's VALID");

    let got = admin.get_key(proto::GetKeyRequest { key_id: rec.key_id.clone() }).await.unwrap().into_inner();
    let usage = got.record.unwrap().usage;
    let count = |c: &str| usage.iter().find(|u| u.code == c).map_or(0, |u| u.count);
    assert_eq!(count("VALID"), 300, "both replicas' counts: {usage:?}");
    assert_eq!(count("INSUFFICIENT_SCOPE"), 40);
    assert_eq!(usage.len(), 2, "codes with no verdicts are left out");

    // A day later the counts have aged out of the window.
    clock.advance(Duration::from_secs(24 * 3600 + 1));
    assert_eq!(code(&verify(&mut va, req(&key, &["read"], "")).await), Code::Valid);
    a.app.usage.flush().await.unwrap();
    let got = admin.get_key(proto::GetKeyRequest { key_id: rec.key_id.clone() }).await.unwrap().into_inner();
    let usage = got.record.unwrap().usage;
    assert_eq!(usage.iter().map(|u| (u.code.as_str(), u.count)).collect::<Vec<_>>(), [("VALID", 1)]);
    // Redis keeps a bounded window: every hour's hash expires.
    let ttl: i64 = redis::cmd("TTL")
        .arg(format!("keystile:usage:{}", clock.unix_seconds() / 3600))
        .query(&mut redis.conn())
        .unwrap();
    assert!(ttl > 0 && ttl <= 26 * 3600, "ttl {ttl}");
    a.stop().await;
    b.stop().await;
}

/// Counts survive a store that cannot take them: kept for the next flush.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_counts_wait_for_the_store() {
    let store = Arc::new(MemoryStore::new());
    let s = TestServer::start(store.clone()).await;
    let mut admin = s.admin().await;
    let (key, rec) = create(&mut admin, create_req("k")).await;
    let mut v = s.verifier().await;
    for _ in 0..5 {
        assert_eq!(code(&verify(&mut v, verify_req(&key)).await), Code::Valid);
    }
    store.set_failing(true);
    assert!(s.app.usage.flush().await.is_err());
    store.set_failing(false);
    for _ in 0..2 {
        assert_eq!(code(&verify(&mut v, verify_req(&key)).await), Code::Valid);
    }
    s.app.usage.flush().await.unwrap();
    let got = admin.get_key(proto::GetKeyRequest { key_id: rec.key_id }).await.unwrap().into_inner();
    let usage = got.record.unwrap().usage;
    assert_eq!(usage.iter().find(|u| u.code == "VALID").map(|u| u.count), Some(7), "{usage:?}");
    s.stop().await;
}
