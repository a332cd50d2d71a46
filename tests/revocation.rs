//! Revocation that reaches every replica (README, "Storage, cache and
//! revocation"): across three real
//! `keystile serve` processes on one Redis, after the subscriber is cut off,
//! and never undone by a lookup that started before it.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use keystile::admin::{Actor, KeySpec};
use keystile::app::App;
use keystile::clock::Clock;
use keystile::engine::EngineSettings;
use keystile::proto::{self, Code};
use keystile::store::memory::MemoryStore;
use keystile::store::redis::RedisStore;
use keystile::verdict::{Outcome as Verdict, Request};

const PEPPER: &str = "2222222222222222222222222222222222222222222222222222222222222222";

fn bootstrap(redis: &RedisServer) -> String {
    let out = Command::new(BIN)
        .args(["keys", "bootstrap", "--redis-url", &redis.url()])
        .env("KEYSTILE_PEPPER", PEPPER)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().strip_prefix("KEYSTILE_ADMIN_KEY=").unwrap().to_string()
}

async fn replicas(
    redis: &RedisServer,
    n: usize,
) -> (Vec<Sidecar>, Vec<keystile::proto::verifier_client::VerifierClient<tonic::transport::Channel>>, AdminClient) {
    let admin_key = bootstrap(redis);
    let mut sidecars = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..n {
        let mut s = Sidecar::start(&["--redis-url", &redis.url()], &[("KEYSTILE_PEPPER", PEPPER)]);
        s.admin_key = admin_key.clone();
        let channel = tonic::transport::Channel::from_shared(s.server()).unwrap().connect().await.unwrap();
        clients.push(keystile::proto::verifier_client::VerifierClient::new(channel));
        sidecars.push(s);
    }
    let channel = tonic::transport::Channel::from_shared(sidecars[0].server()).unwrap().connect().await.unwrap();
    (sidecars, clients, admin_client(channel, &admin_key))
}

/// Time from the start of RevokeKey until every replica refuses the key.
async fn revoke_and_wait(
    admin: &mut AdminClient,
    clients: &mut [keystile::proto::verifier_client::VerifierClient<tonic::transport::Channel>],
    key: &str,
    key_id: &str,
    limit: Duration,
) -> Duration {
    let t0 = Instant::now();
    // Right after a Redis restart the first call may find the old
    // connection dead: UNAVAILABLE, retried as an operator would.
    while let Err(e) = admin.revoke_key(proto::RevokeKeyRequest { key_id: key_id.into() }).await {
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
        assert!(t0.elapsed() < limit, "RevokeKey kept failing: {e:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut pending: Vec<usize> = (0..clients.len()).collect();
    while !pending.is_empty() {
        let mut still = Vec::new();
        for &i in &pending {
            if code(&verify(&mut clients[i], verify_req(key)).await) != Code::Revoked {
                still.push(i);
            }
        }
        pending = still;
        assert!(t0.elapsed() < limit, "replicas {pending:?} still accept a key revoked {:?} ago", t0.elapsed());
    }
    t0.elapsed()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sidecars_refuse_a_revoked_key_within_one_second() {
    let redis = RedisServer::start();
    let (sidecars, mut clients, mut admin) = replicas(&redis, 3).await;
    let mut times = Vec::new();
    for i in 0..25 {
        let (key, rec) = create(&mut admin, create_req(&format!("propagation {i}"))).await;
        wait_known_everywhere(&clients, &key).await;
        for c in clients.iter_mut() {
            assert_eq!(code(&verify(c, verify_req(&key)).await), Code::Valid, "warm every cache");
        }
        times.push(revoke_and_wait(&mut admin, &mut clients, &key, &rec.key_id, Duration::from_secs(1)).await);
    }
    times.sort();
    println!(
        "revocation reached all 3 replicas: p50 {:?}, p99 {:?}, max {:?} over {} runs",
        percentile(&times, 0.5),
        percentile(&times, 0.99),
        times.last().unwrap(),
        times.len()
    );
    for s in sidecars {
        assert_eq!(s.terminate().0, Some(0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_subscriber_catches_up_from_the_stream() {
    let redis = RedisServer::start();
    let (sidecars, mut clients, mut admin) = replicas(&redis, 2).await;
    for round in 0..5 {
        let (key, rec) = create(&mut admin, create_req(&format!("cut {round}"))).await;
        wait_known_everywhere(&clients, &key).await;
        for c in clients.iter_mut() {
            assert_eq!(code(&verify(c, verify_req(&key)).await), Code::Valid);
        }
        // Cut every subscription, then revoke at once: the publish reaches
        // nobody; the stream replay on reconnect must.
        let killed: i64 = redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub").query(&mut redis.conn()).unwrap();
        assert!(killed >= 2, "each sidecar had a subscription ({killed})");
        let took = revoke_and_wait(&mut admin, &mut clients, &key, &rec.key_id, Duration::from_secs(3)).await;
        println!("after a pub/sub cut, revoked everywhere in {took:?}");
    }
    for s in sidecars {
        assert_eq!(s.terminate().0, Some(0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_redis_is_resynced() {
    let mut redis = RedisServer::start();
    let (sidecars, mut clients, mut admin) = replicas(&redis, 2).await;
    let (key, rec) = create(&mut admin, create_req("survives a restart")).await;
    wait_known_everywhere(&clients, &key).await;
    for c in clients.iter_mut() {
        assert_eq!(code(&verify(c, verify_req(&key)).await), Code::Valid);
    }
    redis.stop();
    redis.restart();
    let took = revoke_and_wait(&mut admin, &mut clients, &key, &rec.key_id, Duration::from_secs(5)).await;
    println!("after a Redis restart, revoked everywhere in {took:?}");
    for s in sidecars {
        assert_eq!(s.terminate().0, Some(0));
    }
}

/// Lookups and revocations interleaved thousands of times. The store
/// answers 1 ms after it read, so a lookup often holds the pre-revocation
/// record while the revocation lands. Whatever the order, once the
/// revocation returns the key is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_that_began_before_a_revocation_never_refills_the_cache() {
    let store = Arc::new(MemoryStore::new());
    let app = App::build(EngineSettings::new(test_pepper()), store.clone(), Clock::system());
    let (engine, admin) = (app.engine.clone(), app.admin.clone());
    let (mut saw_valid, mut saw_revoked) = (0, 0);
    for i in 0..3000u32 {
        store.set_latency(Duration::from_millis(u64::from(i % 2)));
        let minted = admin
            .create(KeySpec { name: "race".into(), env: "live".into(), ..Default::default() }, &Actor::deployment())
            .await
            .unwrap();
        let key = minted.key.expose().to_string();
        let id = minted.record.key_id.to_string();
        let lookup = tokio::spawn({
            let (engine, key) = (engine.clone(), key.clone());
            async move { engine.verify(&Request::of_key(&key)).await.unwrap().outcome }
        });
        let revoke = tokio::spawn({
            let admin = admin.clone();
            async move {
                if i % 3 == 0 {
                    tokio::task::yield_now().await;
                }
                admin.revoke(&id, &Actor::deployment()).await.unwrap();
            }
        });
        match lookup.await.unwrap() {
            Verdict::Valid => saw_valid += 1,
            Verdict::Revoked => saw_revoked += 1,
            other => panic!("{other:?}"),
        }
        revoke.await.unwrap();
        let after = engine.verify(&Request::of_key(&key)).await.unwrap();
        assert_eq!(after.outcome, Verdict::Revoked, "iteration {i}: a stale lookup put the key back");
    }
    println!("lookups that saw the key valid: {saw_valid}, revoked: {saw_revoked}");
    assert!(saw_valid > 0 && saw_revoked > 0, "both orders were exercised");
}

/// The same race across two replicas on Redis: the one that did not revoke
/// learns it from the feed while its own lookup is in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_refill_across_replicas_on_redis() {
    let redis = RedisServer::start();
    let open = || Arc::new(RedisStore::open(&redis.url(), "keystile", Duration::from_secs(1)).unwrap());
    let a = App::build(EngineSettings::new(test_pepper()), open(), Clock::system());
    let b_app = App::build(EngineSettings::new(test_pepper()), open(), Clock::system());
    let b = b_app.engine.clone();
    let b_feed = tokio::spawn({
        let (records, mut feed) = (b_app.records.clone(), b_app.store.feed());
        async move {
            while let Ok(ev) = feed.recv().await {
                records.apply(&ev);
            }
        }
    });
    let admin = a.admin.clone();
    for i in 0..300 {
        let minted = admin
            .create(KeySpec { name: "race".into(), env: "live".into(), ..Default::default() }, &Actor::deployment())
            .await
            .unwrap();
        let key = minted.key.expose().to_string();
        let id = minted.record.key_id.to_string();
        let req = |k: &str| Request::of_key(k).key.to_string();
        let lookup = tokio::spawn({
            let (b, key) = (b.clone(), req(&key));
            async move { b.verify(&Request::of_key(&key)).await.unwrap().outcome }
        });
        admin.revoke(&id, &Actor::deployment()).await.unwrap();
        let _ = lookup.await.unwrap();
        let t0 = Instant::now();
        loop {
            let code = b.verify(&Request::of_key(&key)).await.unwrap().outcome;
            if code == Verdict::Revoked {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(1), "iteration {i}: replica b kept the key");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        for _ in 0..3 {
            let code = b.verify(&Request::of_key(&key)).await.unwrap().outcome;
            assert_eq!(code, Verdict::Revoked, "iteration {i}: refilled after the revocation was seen");
        }
    }
    b_feed.abort();
}
