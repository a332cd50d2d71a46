//! KeyAdmin through a real socket: authorization, validation, paging,
//! updates that apply at once, rotation with a grace window, deletion, and
//! last-used timestamps. Run on the memory store and on Redis.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use keystile::clock::Clock;
use keystile::engine::EngineSettings;
use keystile::proto::{self, Code, KeyState};
use keystile::server::ServerOptions;
use keystile::store::KeyStore;
use keystile::store::memory::MemoryStore;
use keystile::store::redis::RedisStore;

const START: i64 = 1_800_000_000;

async fn server(store: Arc<dyn KeyStore>) -> TestServer {
    TestServer::start_with(store, EngineSettings::new(test_pepper()), ServerOptions::default(), Clock::manual(START))
        .await
}

async fn lifecycle(s: &TestServer) {
    let mut admin = s.admin().await;
    let mut v = s.verifier().await;

    // Authorization.
    let mut anonymous = keystile::proto::key_admin_client::KeyAdminClient::new(s.channel().await);
    let err = anonymous.list_keys(proto::ListKeysRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let (plain, plain_rec) = create(&mut admin, create_req("not an admin")).await;
    let mut pretender = admin_client(s.channel().await, &plain);
    let err = pretender.list_keys(proto::ListKeysRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let mut garbage = admin_client(s.channel().await, "ks_live_garbage");
    assert_eq!(
        garbage.list_keys(proto::ListKeysRequest::default()).await.unwrap_err().code(),
        tonic::Code::Unauthenticated
    );
    assert!(!err.message().contains(&plain), "no key material in errors");

    // Validation reports every problem at once.
    let bad = proto::CreateKeyRequest {
        name: "  ".into(),
        env: "prod".into(),
        scopes: vec!["has space".into()],
        ip_allowlist: vec!["10.0.0.0/33".into()],
        rate_limit: Some(proto::RateLimit { requests: 0, window_seconds: 60, burst: 0, per_tenant: false }),
        expires_at: START - 1,
        ..Default::default()
    };
    let err = admin.create_key(bad).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    for needle in ["name", "prod", "has space", "10.0.0.0/33", "requests", "expires_at"] {
        assert!(err.message().contains(needle), "{needle:?} missing from {:?}", err.message());
    }
    assert_eq!(
        admin.get_key(proto::GetKeyRequest { key_id: "short".into() }).await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    assert_eq!(
        admin.get_key(proto::GetKeyRequest { key_id: "abcdEFGH".into() }).await.unwrap_err().code(),
        tonic::Code::NotFound
    );

    // Get shows the record, never a secret.
    let got = admin
        .get_key(proto::GetKeyRequest { key_id: plain_rec.key_id.clone() })
        .await
        .unwrap()
        .into_inner()
        .record
        .unwrap();
    assert_eq!(got.display_prefix, format!("ks_live_{}", plain_rec.key_id));
    assert_eq!(got.state, KeyState::Active as i32);
    assert_eq!(got.version, 1);

    // Listing: sorted by creation, paged, filtered.
    for i in 0..5 {
        s.clock.advance(Duration::from_secs(1));
        let mut req = create_req(&format!("tenant key {i}"));
        req.tenant = "paged".into();
        req.env = if i % 2 == 0 { "live" } else { "test" }.into();
        create(&mut admin, req).await;
    }
    let mut names = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = admin
            .list_keys(proto::ListKeysRequest {
                page_size: 2,
                page_token: token.clone(),
                tenant: "paged".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        names.extend(page.records.into_iter().map(|r| r.name));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(names, (0..5).map(|i| format!("tenant key {i}")).collect::<Vec<_>>());
    assert_eq!(pages, 3);
    let tests = admin
        .list_keys(proto::ListKeysRequest { tenant: "paged".into(), env: "test".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(tests.records.len(), 2);
    let err = admin
        .list_keys(proto::ListKeysRequest { page_token: "forged".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    // Updates apply on the next call and bump the version.
    let mut req = create_req("evolving");
    req.scopes = vec!["read".into()];
    let (evolving, rec) = create(&mut admin, req).await;
    let scoped = |key: &str, scope: &str| proto::VerifyRequest {
        key: key.into(),
        scopes: vec![scope.into()],
        ..Default::default()
    };
    assert_eq!(code(&verify(&mut v, scoped(&evolving, "write")).await), Code::InsufficientScope);
    let updated = admin
        .update_key(proto::UpdateKeyRequest {
            key_id: rec.key_id.clone(),
            scopes: Some(proto::StringList { values: vec!["read".into(), "write".into()] }),
            rate_limit: Some(proto::RateLimit { requests: 1, window_seconds: 60, burst: 0, per_tenant: false }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .record
        .unwrap();
    assert_eq!(updated.version, 2);
    assert_eq!(updated.name, "evolving", "fields left unset are kept");
    assert_eq!(code(&verify(&mut v, scoped(&evolving, "write")).await), Code::Valid);
    assert_eq!(
        code(&verify(&mut v, scoped(&evolving, "write")).await),
        Code::RateLimited,
        "the new limit applies at once"
    );
    let err = admin
        .update_key(proto::UpdateKeyRequest {
            key_id: rec.key_id.clone(),
            ip_allowlist: Some(proto::StringList { values: vec!["nope".into()] }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    // Rotation: both keys work inside the grace window, the old one is
    // REVOKED after it.
    let (old, old_rec) = create(&mut admin, create_req("rotating")).await;
    let rotated = admin
        .rotate_key(proto::RotateKeyRequest { key_id: old_rec.key_id.clone(), grace_seconds: Some(30) })
        .await
        .unwrap()
        .into_inner();
    let previous = rotated.previous.unwrap();
    assert_eq!(previous.state, KeyState::Rotating as i32);
    assert_eq!(previous.revoked_at, START + 5 + 30);
    assert_eq!(rotated.record.as_ref().unwrap().name, "rotating");
    assert_eq!(code(&verify(&mut v, verify_req(&old)).await), Code::Valid);
    assert_eq!(code(&verify(&mut v, verify_req(&rotated.key)).await), Code::Valid);
    s.clock.advance(Duration::from_secs(30));
    assert_eq!(code(&verify(&mut v, verify_req(&old)).await), Code::Revoked);
    assert_eq!(code(&verify(&mut v, verify_req(&rotated.key)).await), Code::Valid);
    let err = admin
        .rotate_key(proto::RotateKeyRequest { key_id: old_rec.key_id.clone(), grace_seconds: None })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "a revoked key cannot be rotated");

    // Revoke is idempotent and changes nothing the second time.
    let r1 = admin
        .revoke_key(proto::RevokeKeyRequest { key_id: plain_rec.key_id.clone() })
        .await
        .unwrap()
        .into_inner()
        .record
        .unwrap();
    let r2 = admin
        .revoke_key(proto::RevokeKeyRequest { key_id: plain_rec.key_id.clone() })
        .await
        .unwrap()
        .into_inner()
        .record
        .unwrap();
    assert_eq!(r1.version, r2.version);
    assert_eq!(r2.state, KeyState::Revoked as i32);

    // Delete: gone for good, NOT_FOUND rather than REVOKED.
    admin.delete_key(proto::DeleteKeyRequest { key_id: plain_rec.key_id.clone() }).await.unwrap();
    assert_eq!(code(&verify(&mut v, verify_req(&plain)).await), Code::NotFound);
    let err = admin.delete_key(proto::DeleteKeyRequest { key_id: plain_rec.key_id.clone() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    // Last used: recorded on VALID, written in one batch.
    let (used, used_rec) = create(&mut admin, create_req("used")).await;
    for _ in 0..10 {
        verify(&mut v, verify_req(&used)).await;
    }
    let last_used = async |admin: &mut AdminClient| {
        let req = proto::GetKeyRequest { key_id: used_rec.key_id.clone() };
        admin.get_key(req).await.unwrap().into_inner().record.unwrap().last_used_at
    };
    assert_eq!(last_used(&mut admin).await, 0, "not written per request");
    let written = s.app.usage.flush().await.unwrap();
    assert!(written >= 1);
    assert_eq!(last_used(&mut admin).await, s.clock.unix_seconds());
}

#[tokio::test]
async fn lifecycle_on_the_memory_store() {
    let s = server(Arc::new(MemoryStore::new())).await;
    lifecycle(&s).await;
    s.stop().await;
}

#[tokio::test]
async fn lifecycle_on_redis() {
    let redis = RedisServer::start();
    let s = server(Arc::new(RedisStore::open(&redis.url(), "keystile", Duration::from_secs(1)).unwrap())).await;
    lifecycle(&s).await;
    s.stop().await;
}

#[tokio::test]
async fn redis_holds_no_plaintext_key() {
    let redis = RedisServer::start();
    let s =
        TestServer::start(Arc::new(RedisStore::open(&redis.url(), "keystile", Duration::from_secs(1)).unwrap())).await;
    let mut admin = s.admin().await;
    let (key, rec) = create(&mut admin, create_req("secret")).await;
    let secret = &key[17..49];
    let mut conn = redis.conn();
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut conn).unwrap();
    let mut everything = String::new();
    for k in &keys {
        let dump: Vec<u8> = redis::cmd("DUMP").arg(k).query(&mut conn).unwrap();
        everything.push_str(&String::from_utf8_lossy(&dump));
    }
    assert!(everything.contains(&rec.key_id), "the test does see the data");
    assert!(!everything.contains(secret), "the secret must never be stored");
    s.stop().await;
}

/// Verify's failed-attempt shedding counts the address a caller reports;
/// admin authentication counts the transport peer, in a bucket of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_failures_and_admin_failures_do_not_share_a_bucket() {
    let loopback = |key: &str| proto::VerifyRequest { key: key.into(), ip: "127.0.0.1".into(), ..Default::default() };

    // 25 bad Verify calls naming 127.0.0.1: that address is shed for
    // Verify, and the operator at 127.0.0.1 still administers.
    let s = server(Arc::new(MemoryStore::new())).await;
    let mut admin = s.admin().await;
    let mut v = s.verifier().await;
    let (good, _) = create(&mut admin, create_req("good")).await;
    for _ in 0..25 {
        let r = verify(&mut v, loopback("ks_live_forged")).await;
        assert!(matches!(code(&r), Code::Malformed | Code::RateLimited));
    }
    let shed = verify(&mut v, loopback(&good)).await;
    assert_eq!(code(&shed), Code::RateLimited, "Verify sheds the reported address");
    assert_eq!(shed.error, "too_many_failed_attempts");
    admin.list_keys(proto::ListKeysRequest::default()).await.expect("KeyAdmin from 127.0.0.1 is not shed");
    s.stop().await;

    // 25 bad admin keys from 127.0.0.1: admin calls from that peer are
    // shed with their own message, and Verify for 127.0.0.1 is untouched.
    let s = server(Arc::new(MemoryStore::new())).await;
    let mut admin = s.admin().await;
    let (good, _) = create(&mut admin, create_req("good")).await;
    // Well-formed keys that do not exist (a malformed one is refused before
    // the shedder is asked, and costs nothing to refuse).
    let forged = keystile::key::generate(&keystile::key::KeyFormat::default(), keystile::key::Env::Live);
    let mut intruder = admin_client(s.channel().await, forged.key.expose());
    let mut last = None;
    for _ in 0..25 {
        last = Some(intruder.list_keys(proto::ListKeysRequest::default()).await.unwrap_err());
    }
    let last = last.unwrap();
    assert_eq!(last.code(), tonic::Code::ResourceExhausted, "{last:?}");
    assert!(last.message().contains("too many failed attempts from this address"), "{}", last.message());
    // The operator's admin key is cached: forged failures from its address
    // do not lock it out (README, "Rate limits").
    admin.list_keys(proto::ListKeysRequest::default()).await.expect("a cached admin key is not shed");
    let mut v = s.verifier().await;
    assert_eq!(code(&verify(&mut v, loopback(&good)).await), Code::Valid, "Verify for 127.0.0.1 is not shed");
    // The peer's block ends as its failures refill.
    s.clock.advance(Duration::from_secs(61));
    admin.list_keys(proto::ListKeysRequest::default()).await.expect("unblocked after a minute");
    s.stop().await;
}

fn spec(name: &str, tenant: &str, env: &str, scopes: &[&str]) -> proto::CreateKeyRequest {
    proto::CreateKeyRequest {
        name: name.into(),
        env: env.into(),
        tenant: tenant.into(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// The tenant-admin matrix: who may call which KeyAdmin RPC on whose keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_manage_only_their_tenant_their_env_and_their_rights() {
    use tonic::Code::PermissionDenied as Denied;
    let s = server(Arc::new(MemoryStore::new())).await;
    let mut root = s.admin().await;
    let (acme_admin, _) = create(&mut root, spec("acme admin", "acme", "live", &["keystile:admin"])).await;
    let (test_admin, _) = create(&mut root, spec("test admin", "", "test", &["keystile:admin"])).await;
    let (reader, _) = create(&mut root, spec("dashboard", "", "live", &["keys:read"])).await;
    let (writer, _) = create(&mut root, spec("provisioner", "", "live", &["keys:write"])).await;
    let (plain, _) = create(&mut root, spec("plain", "", "live", &["read"])).await;
    let (_, globex) = create(&mut root, spec("globex key", "globex", "live", &[])).await;
    let (_, acme) = create(&mut root, spec("acme key", "acme", "live", &[])).await;
    let (_, test_key) = create(&mut root, spec("test key", "", "test", &[])).await;

    // A tenant admin: its tenant only, for every RPC.
    let mut a = admin_client(s.channel().await, &acme_admin);
    let made = a.create_key(spec("made by acme", "", "live", &[])).await.unwrap().into_inner().record.unwrap();
    assert_eq!(made.tenant, "acme", "a tenant admin's keys are its tenant's");
    assert_eq!(a.create_key(spec("x", "globex", "live", &[])).await.unwrap_err().code(), Denied);
    let other = globex.key_id.clone();
    assert_eq!(a.get_key(proto::GetKeyRequest { key_id: other.clone() }).await.unwrap_err().code(), Denied);
    let update = proto::UpdateKeyRequest { key_id: other.clone(), name: Some("taken".into()), ..Default::default() };
    assert_eq!(a.update_key(update).await.unwrap_err().code(), Denied);
    assert_eq!(a.revoke_key(proto::RevokeKeyRequest { key_id: other.clone() }).await.unwrap_err().code(), Denied);
    let rotate = proto::RotateKeyRequest { key_id: other.clone(), grace_seconds: None };
    assert_eq!(a.rotate_key(rotate).await.unwrap_err().code(), Denied);
    assert_eq!(a.delete_key(proto::DeleteKeyRequest { key_id: other.clone() }).await.unwrap_err().code(), Denied);
    let listed = a.list_keys(proto::ListKeysRequest::default()).await.unwrap().into_inner().records;
    assert!(!listed.is_empty() && listed.iter().all(|r| r.tenant == "acme"), "{listed:?}");
    let foreign = proto::ListKeysRequest { tenant: "globex".into(), ..Default::default() };
    assert_eq!(a.list_keys(foreign).await.unwrap_err().code(), Denied);
    a.get_key(proto::GetKeyRequest { key_id: acme.key_id.clone() }).await.expect("its own tenant's key");
    a.revoke_key(proto::RevokeKeyRequest { key_id: acme.key_id.clone() }).await.expect("its own tenant's key");

    // A test admin: test keys only.
    let mut t = admin_client(s.channel().await, &test_admin);
    assert_eq!(t.create_key(spec("live one", "", "live", &[])).await.unwrap_err().code(), Denied);
    t.create_key(spec("test one", "", "test", &[])).await.expect("a test key");
    assert_eq!(t.get_key(proto::GetKeyRequest { key_id: other.clone() }).await.unwrap_err().code(), Denied);
    t.get_key(proto::GetKeyRequest { key_id: test_key.key_id.clone() }).await.expect("a test key");
    let listed = t.list_keys(proto::ListKeysRequest::default()).await.unwrap().into_inner().records;
    assert!(listed.iter().all(|r| r.env == "test"), "{listed:?}");

    // A reader reads; a writer writes but makes no admins; a plain key is no admin.
    let mut r = admin_client(s.channel().await, &reader);
    r.list_keys(proto::ListKeysRequest::default()).await.expect("keys:read lists");
    assert_eq!(r.create_key(spec("x", "", "live", &[])).await.unwrap_err().code(), Denied);
    assert_eq!(r.revoke_key(proto::RevokeKeyRequest { key_id: other.clone() }).await.unwrap_err().code(), Denied);
    let mut w = admin_client(s.channel().await, &writer);
    w.create_key(spec("by writer", "", "live", &["read"])).await.expect("keys:write creates");
    for grant in ["keystile:admin", "keys:write", "keys:*"] {
        let err = w.create_key(spec("escalation", "", "live", &[grant])).await.unwrap_err();
        assert_eq!(err.code(), Denied, "{grant}: {err:?}");
    }
    let mut p = admin_client(s.channel().await, &plain);
    assert_eq!(p.list_keys(proto::ListKeysRequest::default()).await.unwrap_err().code(), Denied);

    // The deployment admin manages everything.
    root.get_key(proto::GetKeyRequest { key_id: other }).await.expect("a deployment admin");
    s.stop().await;
}

/// Grant × request → verdict, and the patterns refused at creation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_scopes_match_and_unmatchable_patterns_are_refused() {
    let s = server(Arc::new(MemoryStore::new())).await;
    let mut admin = s.admin().await;
    let mut v = s.verifier().await;
    let (key, _) = create(&mut admin, spec("reader", "", "live", &["read:*", "export:data"])).await;
    let ask = |scopes: &[&str]| proto::VerifyRequest {
        key: key.clone(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    for (scopes, want) in [
        (&["read:analytics"][..], Code::Valid),
        (&["read:analytics", "export:data"], Code::Valid),
        (&["read:analytics:daily"], Code::Valid),
        (&["write:analytics"], Code::InsufficientScope),
        (&["read"], Code::InsufficientScope),
        (&["export:other"], Code::InsufficientScope),
    ] {
        assert_eq!(code(&verify(&mut v, ask(scopes)).await), want, "{scopes:?}");
    }
    for bad in ["*", "re*d", "*:read", "read:*:x"] {
        let err = admin.create_key(spec("bad", "", "live", &[bad])).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad}");
        assert!(err.message().contains('*'), "{}", err.message());
    }
    s.stop().await;

    // With --allow-star-scope, `*` is accepted and grants every scope.
    let mut settings = EngineSettings::new(test_pepper());
    settings.allow_star_scope = true;
    let s =
        TestServer::start_with(Arc::new(MemoryStore::new()), settings, ServerOptions::default(), Clock::manual(START))
            .await;
    let mut admin = s.admin().await;
    let mut v = s.verifier().await;
    let (key, _) = create(&mut admin, spec("everything", "", "live", &["*"])).await;
    let r = verify(&mut v, proto::VerifyRequest { key, scopes: vec!["any:thing".into()], ..Default::default() }).await;
    assert_eq!(code(&r), Code::Valid);
    s.stop().await;
}

/// Disable and enable reach every replica through the change feed; a
/// disabled key that is revoked stays revoked. Owners filter listings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_enable_across_replicas_and_owners() {
    let redis = RedisServer::start();
    let open = || -> Arc<dyn KeyStore> {
        Arc::new(RedisStore::open(&redis.url(), "keystile", Duration::from_secs(1)).unwrap())
    };
    let a = TestServer::start(open()).await;
    let b = TestServer::start(open()).await;
    let mut admin = a.admin().await;
    let (mut va, mut vb) = (a.verifier().await, b.verifier().await);
    let mine = proto::CreateKeyRequest { owner: "Dev@Example.com".into(), ..create_req("mine") };
    let (key, rec) = create(&mut admin, mine).await;
    create(&mut admin, proto::CreateKeyRequest { owner: "other@example.com".into(), ..create_req("theirs") }).await;
    wait_known_everywhere(&[va.clone(), vb.clone()], &key).await;
    for v in [&mut va, &mut vb] {
        assert_eq!(code(&verify(v, verify_req(&key)).await), Code::Valid);
    }

    let r = admin.disable_key(proto::DisableKeyRequest { key_id: rec.key_id.clone() }).await.unwrap().into_inner();
    assert!(r.record.as_ref().unwrap().disabled);
    assert_eq!(r.record.unwrap().state, KeyState::Disabled as i32);
    for v in [&mut va, &mut vb] {
        let t0 = std::time::Instant::now();
        loop {
            let resp = verify(v, verify_req(&key)).await;
            if code(&resp) == Code::Disabled {
                assert_eq!((resp.http_status, resp.error.as_str()), (403, "disabled_api_key"));
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(1), "disabled everywhere within the revocation bound");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    admin.enable_key(proto::EnableKeyRequest { key_id: rec.key_id.clone() }).await.unwrap();
    for v in [&mut va, &mut vb] {
        until_code(v, verify_req(&key), Code::Valid, "enabled everywhere").await;
    }
    admin.disable_key(proto::DisableKeyRequest { key_id: rec.key_id.clone() }).await.unwrap();
    admin.revoke_key(proto::RevokeKeyRequest { key_id: rec.key_id.clone() }).await.unwrap();
    let err = admin.enable_key(proto::EnableKeyRequest { key_id: rec.key_id.clone() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "revocation is final");
    until_code(&mut vb, verify_req(&key), Code::Revoked, "revoked").await;

    let listed = admin
        .list_keys(proto::ListKeysRequest { owner: "dev@example.com".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .records;
    assert_eq!(listed.len(), 1, "owners compare without case");
    assert_eq!(listed[0].owner, "Dev@Example.com");
    a.stop().await;
    b.stop().await;
}

/// Tiers (README, "Tiers"): a tenant's tier and a deployment-wide one add
/// their scopes to the keys holding them; a change reaches every replica
/// within the revocation bound; who may set them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiers_add_scopes_and_changes_reach_every_replica() {
    let redis = RedisServer::start();
    let open = || -> Arc<dyn KeyStore> {
        Arc::new(RedisStore::open(&redis.url(), "keystile", Duration::from_secs(1)).unwrap())
    };
    let a = TestServer::start(open()).await;
    let b = TestServer::start(open()).await;
    let mut admin = a.admin().await;
    let (mut va, mut vb) = (a.verifier().await, b.verifier().await);
    let tier = |tenant: &str, name: &str, scopes: &[&str]| proto::SetTierRequest {
        tenant: tenant.into(),
        name: name.into(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
    };
    admin.set_tier(tier("", "basic", &["read:analytics"])).await.unwrap();
    admin.set_tier(tier("acme", "premium", &["read:analytics", "export:data"])).await.unwrap();
    let held = |name: &str, tenant: &str, tiers: &[&str]| proto::CreateKeyRequest {
        tenant: tenant.into(),
        scopes: vec!["profile".into()],
        tiers: tiers.iter().map(|s| s.to_string()).collect(),
        ..create_req(name)
    };
    let (premium, rec) = create(&mut admin, held("premium", "acme", &["premium"])).await;
    assert_eq!(rec.tiers, ["premium"]);
    let (basic, _) = create(&mut admin, held("basic", "globex", &["basic"])).await;
    wait_known_everywhere(&[va.clone(), vb.clone()], &premium).await;
    wait_known_everywhere(&[va.clone(), vb.clone()], &basic).await;
    let asks = |key: &str, scope: &str| proto::VerifyRequest { scopes: vec![scope.into()], ..verify_req(key) };
    for v in [&mut va, &mut vb] {
        let r = verify(v, asks(&premium, "export:data")).await;
        assert_eq!(code(&r), Code::Valid);
        assert_eq!(r.headers["x-api-key-scopes"], "profile,read:analytics,export:data", "the effective scopes");
        assert_eq!(code(&verify(v, asks(&basic, "read:analytics")).await), Code::Valid, "a deployment tier");
        assert_eq!(code(&verify(v, asks(&basic, "export:data")).await), Code::InsufficientScope);
    }

    // Premium loses export:data: every replica refuses it within the bound.
    admin.set_tier(tier("acme", "premium", &["read:analytics"])).await.unwrap();
    for v in [&mut va, &mut vb] {
        until_code(v, asks(&premium, "export:data"), Code::InsufficientScope, "the tier change reached every replica")
            .await;
    }
    let listed = admin.list_tiers(proto::ListTiersRequest { tenant: "acme".into() }).await.unwrap().into_inner();
    let names: Vec<(&str, &str)> = listed.tiers.iter().map(|t| (t.tenant.as_str(), t.name.as_str())).collect();
    assert_eq!(names, [("acme", "premium"), ("", "basic")]);

    // A deployment-wide tier changes too: a cached key holding it follows
    // on every replica (its merged scopes are kept per policy, README
    // "Tiers").
    admin.set_tier(tier("", "basic", &["read:reports"])).await.unwrap();
    for v in [&mut va, &mut vb] {
        let what = "the deployment tier change reached every replica";
        until_code(v, asks(&basic, "read:reports"), Code::Valid, what).await;
        assert_eq!(code(&verify(v, asks(&basic, "read:analytics")).await), Code::InsufficientScope);
    }

    // Who may: a tenant's admin its own tiers only, never the deployment's;
    // no tier grants admin rights.
    let (globex_admin, _) = create(
        &mut admin,
        proto::CreateKeyRequest { tenant: "globex".into(), scopes: vec!["keystile:admin".into()], ..create_req("g") },
    )
    .await;
    let mut globex = admin_client(a.channel().await, &globex_admin);
    assert!(globex.set_tier(tier("globex", "gold", &["read:analytics"])).await.is_ok());
    for denied in [tier("acme", "x", &["a"]), tier("", "x", &["a"])] {
        let err = globex.set_tier(denied).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
    }
    let err = admin.set_tier(tier("acme", "root", &["keystile:admin"])).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = admin.set_tier(tier("acme", "Bad Name", &["a"])).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    // The audit trail on Redis: the tier changes, newest first, paged.
    let audit = admin
        .list_audit_events(proto::ListAuditEventsRequest { page_size: 2, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(audit.events.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(), ["set_tier", "create"]);
    assert!(audit.events[0].fields[0].starts_with("gold="));
    let older = admin
        .list_audit_events(proto::ListAuditEventsRequest {
            page_size: 1000,
            page_token: audit.next_page_token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(older.events.iter().any(|e| e.action == "set_tier" && e.fields[0] == "premium=read:analytics"));
    assert!(older.next_page_token.is_empty(), "the last page");

    // An exchange hands a token the key's effective scopes, tiers included.
    let exchanging =
        proto::CreateKeyRequest { scopes: vec!["token:exchange".into()], ..held("exchanging", "acme", &["premium"]) };
    let (key, _) = create(&mut admin, exchanging).await;
    let mut ex = proto::token_exchange_client::TokenExchangeClient::new(a.channel().await);
    let token = ex
        .exchange(proto::ExchangeRequest { secret: key, scopes: vec!["read:analytics".into()], ..Default::default() })
        .await
        .expect("a tier's scope may be asked for")
        .into_inner()
        .token;
    let r = verify(&mut va, asks(&token, "read:analytics")).await;
    assert_eq!(code(&r), Code::Valid);
}

/// Audit (README, "Audit"): every mutation kept with its actor and address,
/// no secret in any event, a tenant's admin sees its tenant's events only;
/// the same through `keystile audit`.
#[tokio::test]
async fn every_mutation_is_audited_with_its_actor() {
    async fn events(
        client: &mut AdminClient,
        req: proto::ListAuditEventsRequest,
    ) -> Result<proto::ListAuditEventsResponse, tonic::Status> {
        client.list_audit_events(req).await.map(|r| r.into_inner())
    }
    let s = TestServer::start(Arc::new(MemoryStore::new())).await;
    let mut admin = s.admin().await;
    let (acme_admin_key, acme_admin) = create(
        &mut admin,
        proto::CreateKeyRequest {
            tenant: "acme".into(),
            scopes: vec!["keystile:admin".into()],
            ..create_req("acme admin")
        },
    )
    .await;
    let mut acme = admin_client(s.channel().await, &acme_admin_key);
    let (secret, rec) = create(&mut acme, create_req("k")).await;
    let id = rec.key_id.clone();
    acme.update_key(proto::UpdateKeyRequest {
        key_id: id.clone(),
        name: Some("renamed".into()),
        scopes: Some(proto::StringList { values: vec!["read".into()] }),
        ..Default::default()
    })
    .await
    .unwrap();
    acme.disable_key(proto::DisableKeyRequest { key_id: id.clone() }).await.unwrap();
    acme.enable_key(proto::EnableKeyRequest { key_id: id.clone() }).await.unwrap();
    let rotated =
        acme.rotate_key(proto::RotateKeyRequest { key_id: id.clone(), grace_seconds: Some(0) }).await.unwrap();
    let new_id = rotated.into_inner().record.unwrap().key_id;
    acme.revoke_key(proto::RevokeKeyRequest { key_id: new_id.clone() }).await.unwrap();
    acme.delete_key(proto::DeleteKeyRequest { key_id: new_id.clone() }).await.unwrap();
    acme.set_tenant_policy(proto::SetTenantPolicyRequest {
        tenant: "acme".into(),
        limits: vec![limit("api=5/1m,auto")],
    })
    .await
    .unwrap();
    create(&mut admin, proto::CreateKeyRequest { tenant: "globex".into(), ..create_req("other") }).await;

    let mine = events(&mut acme, proto::ListAuditEventsRequest::default()).await.unwrap();
    let actions: Vec<&str> = mine.events.iter().map(|e| e.action.as_str()).collect();
    // Newest first; the acme admin key's own creation (by the deployment
    // admin) is an acme event too.
    assert_eq!(
        actions,
        ["set_tenant_policy", "delete", "revoke", "rotate", "enable", "disable", "update", "create", "create"]
    );
    for e in &mine.events[..mine.events.len() - 1] {
        assert_eq!(e.actor, acme_admin.key_id, "{e:?}");
        assert_eq!(e.peer, "127.0.0.1");
        assert_eq!(e.tenant, "acme");
    }
    let update = mine.events.iter().find(|e| e.action == "update").unwrap();
    assert_eq!(update.fields, ["name", "scopes"], "field names, not values");
    let shown = format!("{:?}", mine.events);
    assert!(!shown.contains(&secret[secret.len() - 20..]), "no secret in any event");

    // A tenant's admin sees nothing of another tenant's.
    let err = events(&mut acme, proto::ListAuditEventsRequest { tenant: "globex".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let all = events(&mut admin, proto::ListAuditEventsRequest::default()).await.unwrap();
    assert!(all.events.iter().any(|e| e.tenant == "globex"), "the deployment admin sees every tenant");
    let by_key =
        events(&mut admin, proto::ListAuditEventsRequest { key_id: id.clone(), ..Default::default() }).await.unwrap();
    assert!(by_key.events.iter().all(|e| e.key_id == id) && by_key.events.len() >= 4);
    let paged = events(&mut admin, proto::ListAuditEventsRequest { page_size: 2, ..Default::default() }).await.unwrap();
    assert_eq!(paged.events.len(), 2);
    let next = events(
        &mut admin,
        proto::ListAuditEventsRequest { page_size: 2, page_token: paged.next_page_token.clone(), ..Default::default() },
    )
    .await
    .unwrap();
    assert!(next.events.iter().all(|e| e.id < paged.events[1].id), "the next page is older");
    s.stop().await;
}
