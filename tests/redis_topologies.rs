//! The Redis topologies beyond one plaintext node, against real servers
//! started here: TLS (with and without client certificates) and Sentinel
//! with a failover in the middle of verification. Each test drives real
//! `keystile serve` processes through the CLI and gRPC.

mod common;

use std::time::{Duration, Instant};

use common::*;
use keystile::proto::Code;

/// The failover tests start many processes and time what they see: they
/// take turns, so that one's load does not stretch the other's waits.
static FAILOVERS: std::sync::LazyLock<tokio::sync::Mutex<()>> = std::sync::LazyLock::new(Default::default);

fn pepper_file(dir: &std::path::Path) -> String {
    let path = dir.join("pepper");
    std::fs::write(&path, "cd".repeat(32)).unwrap();
    path.to_str().unwrap().to_string()
}

fn cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(BIN)
        .args(args)
        .env_remove("KEYSTILE_ADMIN_KEY")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

/// `keys bootstrap` against `redis` (the topology flags), returning the admin key.
fn bootstrap(redis: &[&str], pepper: &str) -> String {
    let mut args = vec!["keys", "bootstrap", "--pepper-file", pepper, "--quiet"];
    args.extend_from_slice(redis);
    let out = cli(&args);
    assert!(out.status.success(), "bootstrap: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn sidecar(redis: &[&str], pepper: &str, admin_key: &str) -> Sidecar {
    // A generous store budget: a TLS handshake in a debug build on a busy
    // machine can take longer than the default 50 ms.
    let mut args = vec!["--pepper-file", pepper, "--store-timeout", "2s"];
    args.extend_from_slice(redis);
    let mut s = Sidecar::start(&args, &[]);
    s.admin_key = admin_key.to_string();
    s
}

/// The verdict, or `None` when the call failed (e.g. UNAVAILABLE).
async fn code_on(s: &Sidecar, key: &str) -> Option<Code> {
    let channel = tonic::transport::Channel::from_shared(s.server()).unwrap().connect().await.ok()?;
    let mut v = keystile::proto::verifier_client::VerifierClient::new(channel);
    v.verify(verify_req(key)).await.ok().map(|r| code(&r.into_inner()))
}

/// When uncached lookups failed during a failover: the first and the last
/// `UNAVAILABLE`.
#[derive(Default)]
struct Outage(std::sync::Mutex<Option<(Instant, Instant)>>);

impl Outage {
    fn failed(&self) {
        let now = Instant::now();
        let mut w = self.0.lock().unwrap();
        *w = Some(w.map_or((now, now), |(first, _)| (first, now)));
    }

    fn window(&self) -> Duration {
        self.0.lock().unwrap().map_or(Duration::ZERO, |(first, last)| last - first)
    }
}

/// Verifies a key nobody has (a store read every time): `UNAVAILABLE` is
/// noted in `outage`; anything but `NOT_FOUND` otherwise is a wrong answer.
async fn probe_uncached(
    v: &mut keystile::proto::verifier_client::VerifierClient<tonic::transport::Channel>,
    outage: &Outage,
) {
    let unknown = keystile::key::generate(&keystile::key::KeyFormat::default(), keystile::key::Env::Live);
    match v.verify(verify_req(unknown.key.expose())).await {
        Ok(r) => assert_eq!(code(&r.into_inner()), Code::NotFound),
        Err(e) if e.code() == tonic::Code::Unavailable => outage.failed(),
        Err(e) => panic!("{e:?}"),
    }
}

/// Verification without pause on every sidecar while a failover happens:
/// `revoked` is never VALID, `valid` is VALID (or the call fails), a
/// never-seen key is NOT_FOUND or UNAVAILABLE (noted in the outage).
struct Watchers {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    rounds: std::sync::Arc<std::sync::atomic::AtomicU32>,
    outage: std::sync::Arc<Outage>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Watchers {
    async fn start(sidecars: &[Sidecar], valid: &str, revoked: &str) -> Watchers {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let rounds = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let outage = std::sync::Arc::new(Outage::default());
        let tasks = sidecars
            .iter()
            .map(|s| {
                let (server, valid, revoked) = (s.server(), valid.to_string(), revoked.to_string());
                let (stop, rounds, outage) = (stop.clone(), rounds.clone(), outage.clone());
                tokio::spawn(async move {
                    let channel = tonic::transport::Channel::from_shared(server).unwrap().connect().await.unwrap();
                    let mut v = keystile::proto::verifier_client::VerifierClient::new(channel);
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        if let Ok(r) = v.verify(verify_req(&revoked)).await {
                            assert_ne!(
                                code(&r.into_inner()),
                                Code::Valid,
                                "a revoked key was VALID during the failover"
                            );
                        }
                        if let Ok(r) = v.verify(verify_req(&valid)).await {
                            assert_eq!(code(&r.into_inner()), Code::Valid);
                        }
                        probe_uncached(&mut v, &outage).await;
                        rounds.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                })
            })
            .collect();
        let w = Watchers { stop, rounds, outage, tasks };
        wait_for("the watchers verify", Duration::from_secs(10), async || w.rounds() >= 9).await;
        w
    }

    fn rounds(&self) -> u32 {
        self.rounds.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops them; returns the rounds since `since` and the outage window.
    async fn stop(self, since: u32) -> (u32, Duration) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let during = self.rounds.load(std::sync::atomic::Ordering::Relaxed) - since;
        assert!(during > 0, "the watchers verified during the failover");
        (during, self.outage.window())
    }
}

async fn wait_for(what: &str, limit: Duration, mut check: impl AsyncFnMut() -> bool) {
    let t0 = Instant::now();
    while !check().await {
        assert!(t0.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_redis_with_a_ca_file_and_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key, client_cert, client_key) = certificates(dir.path());
    let tls_port = free_port();
    let tls = |auth: &str| {
        [
            "--tls-port",
            &tls_port.to_string(),
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            auth,
        ]
        .map(String::from)
        .to_vec()
    };
    let redis = RedisServer::start_with(&tls("no"));
    let pepper = pepper_file(dir.path());
    let url = format!("rediss://127.0.0.1:{tls_port}");
    let flags = ["--redis-url", url.as_str(), "--redis-ca-file", ca.as_str()];
    let admin = bootstrap(&flags, &pepper);
    let s = sidecar(&flags, &pepper, &admin);
    s.wait_ready().await;
    let key = s.keys_json(&["create", "--name", "over tls"])["key"].as_str().unwrap().to_string();
    assert_eq!(code_on(&s, &key).await, Some(Code::Valid));
    s.keys_json(&["revoke", &key]);
    wait_for("revoked over TLS", Duration::from_secs(2), async || code_on(&s, &key).await == Some(Code::Revoked)).await;
    assert!(redis.command_calls().contains_key("evalsha"), "the mutations went to this Redis");
    let took = revocations(std::slice::from_ref(&s), &admin, 10).await;
    println!("TLS revocation, 10 runs: p50 {:?}, max {:?}", took[5], took[9]);

    // A CA that did not sign Redis's certificate: refused, with the cause.
    let other = tempfile::tempdir().unwrap();
    let (other_ca, ..) = certificates(other.path());
    let out = cli(&["keys", "bootstrap", "--pepper-file", &pepper, "--redis-url", &url, "--redis-ca-file", &other_ca]);
    assert_eq!(out.status.code(), Some(69), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(err.contains("certificate") || err.contains("issuer"), "the cause: {err}");
    drop((s, redis));

    // A Redis that wants client certificates.
    let redis = RedisServer::start_with(&tls("yes"));
    let out = cli(&["keys", "bootstrap", "--pepper-file", &pepper, "--redis-url", &url, "--redis-ca-file", &ca]);
    assert_eq!(out.status.code(), Some(69), "no client certificate: {}", String::from_utf8_lossy(&out.stderr));
    let mutual = [
        "--redis-url",
        url.as_str(),
        "--redis-ca-file",
        ca.as_str(),
        "--redis-client-cert",
        client_cert.as_str(),
        "--redis-client-key",
        client_key.as_str(),
    ];
    let admin = bootstrap(&mutual, &pepper);
    let s = sidecar(&mutual, &pepper, &admin);
    s.wait_ready().await;
    let key = s.keys_json(&["create", "--name", "mutual"])["key"].as_str().unwrap().to_string();
    assert_eq!(code_on(&s, &key).await, Some(Code::Valid));
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_keeps_every_verdict_right() {
    let _turn = FAILOVERS.lock().await;
    let dir = tempfile::tempdir().unwrap();
    // Passwords on the data nodes and on the sentinels themselves.
    let (data_pw, sentinel_pw) = (Some("data-secret"), Some("sentinel-secret"));
    // Full resyncs start at once (the default waits 5 s for more replicas).
    // A primary without a replica refuses writes (as README, "Redis
    // topologies", advises): a write cannot land on the old primary in the
    // moment between the promotion and its demotion, to be lost after.
    let durable = ["--repl-diskless-sync-delay", "0", "--min-replicas-to-write", "1", "--min-replicas-max-lag", "10"];
    let primary = RedisServer::start_authed(&durable.map(String::from), data_pw);
    let mut replica_args = vec!["--replicaof".to_string(), "127.0.0.1".into(), primary.port.to_string()];
    replica_args.extend(durable.map(String::from));
    let replica = RedisServer::start_authed(&replica_args, data_pw);
    let sentinels: Vec<RedisServer> =
        (0..3).map(|_| RedisServer::start_sentinel_authed("main", primary.port, 2, data_pw, sentinel_pw)).collect();
    let list = sentinels.iter().map(|s| format!("127.0.0.1:{}", s.port)).collect::<Vec<_>>().join(",");
    // The sentinels must know the replica before they can fail over to it.
    let known = async || {
        sentinels.iter().all(|s| {
            let replicas: Vec<redis::Value> =
                redis::cmd("SENTINEL").arg("REPLICAS").arg("main").query(&mut s.conn()).unwrap_or_default();
            !replicas.is_empty()
        })
    };
    wait_for("sentinels see the replica", Duration::from_secs(20), known).await;

    let pepper = pepper_file(dir.path());
    let flags = [
        "--redis-sentinel",
        list.as_str(),
        "--redis-sentinel-master",
        "main",
        "--redis-password",
        "data-secret",
        "--redis-sentinel-password",
        "sentinel-secret",
    ];
    let admin = bootstrap(&flags, &pepper);
    let sidecars: Vec<Sidecar> = (0..3).map(|_| sidecar(&flags, &pepper, &admin)).collect();
    for s in &sidecars {
        s.wait_ready().await;
    }
    let before = sidecars[0].keys_json(&["create", "--name", "before"])["key"].as_str().unwrap().to_string();
    let revoked = sidecars[0].keys_json(&["create", "--name", "revoked before"])["key"].as_str().unwrap().to_string();
    sidecars[0].keys_json(&["revoke", &revoked]);
    for s in &sidecars {
        wait_for("revoked everywhere", Duration::from_secs(2), async || {
            code_on(s, &revoked).await == Some(Code::Revoked)
        })
        .await;
    }

    // Verify without pause on every sidecar while the primary changes: a
    // revoked key is never VALID, a valid one is VALID or UNAVAILABLE.
    let watchers = Watchers::start(&sidecars, &before, &revoked).await;
    let before_failover = watchers.rounds();
    // The replica has every write so far: this failover loses nothing (the
    // lossy kind is a_lost_stream_entry_drops_the_cache).
    let acked: i64 = redis::cmd("WAIT").arg(1).arg(10_000).query(&mut primary.conn()).unwrap();
    assert_eq!(acked, 1, "the replica caught up");
    let _: redis::Value = redis::cmd("SENTINEL").arg("FAILOVER").arg("main").query(&mut sentinels[0].conn()).unwrap();
    let promoted = async || {
        let addr: Vec<String> = redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg("main")
            .query(&mut sentinels[1].conn())
            .unwrap_or_default();
        addr.get(1).is_some_and(|p| p == &replica.port.to_string())
    };
    wait_for("the replica is promoted", Duration::from_secs(30), promoted).await;
    let role = async || {
        let info: String = redis::cmd("INFO").arg("replication").query(&mut replica.conn()).unwrap_or_default();
        info.contains("role:master")
    };
    wait_for("the new primary takes writes", Duration::from_secs(30), role).await;

    // Writes go to the new primary (the first one may meet the demoted one
    // and is retried there); a key revoked now is refused everywhere.
    let mut after = None;
    let t0 = Instant::now();
    while after.is_none() {
        let out = sidecars[1].keys(&["create", "--name", "after", "--json"]);
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            after = Some(v["key"].as_str().unwrap().to_string());
        } else {
            assert!(t0.elapsed() < Duration::from_secs(15), "{}", String::from_utf8_lossy(&out.stderr));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let after = after.unwrap();
    for s in &sidecars {
        // A sidecar that read the new key from the demoted primary before it
        // resynced may hold a negative entry until its feed replays.
        let t0 = Instant::now();
        loop {
            let seen = (code_on(s, &before).await, code_on(s, &after).await);
            if seen == (Some(Code::Valid), Some(Code::Valid)) {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(12), "old and new keys verify on :{}: {seen:?}", s.port);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let t0 = Instant::now();
    sidecars[2].keys_json(&["revoke", &after]);
    for s in &sidecars {
        wait_for("revoked after the failover", Duration::from_secs(2), async || {
            code_on(s, &after).await == Some(Code::Revoked)
        })
        .await;
    }
    println!("after the failover, revoked on three sidecars in {:?}", t0.elapsed());
    let took = revocations(&sidecars, &admin, 10).await;
    println!(
        "Sentinel revocation over 3 sidecars, {} runs: p50 {:?}, max {:?}",
        took.len(),
        took[took.len() / 2],
        took[took.len() - 1]
    );
    let (during, outage) = watchers.stop(before_failover).await;
    println!("{during} verification rounds during the Sentinel failover; uncached keys UNAVAILABLE for {outage:?}");
}

/// `n` keys created, verified on every sidecar, revoked through the first:
/// the sorted times until every sidecar refused each.
async fn revocations(sidecars: &[Sidecar], admin: &str, n: usize) -> Vec<Duration> {
    let channel = tonic::transport::Channel::from_shared(sidecars[0].server()).unwrap().connect().await.unwrap();
    let mut keys_admin = admin_client(channel, admin);
    let mut took = Vec::new();
    for i in 0..n {
        let (key, record) = create(&mut keys_admin, create_req(&format!("timed {i}"))).await;
        for s in sidecars {
            wait_for("the key verifies", Duration::from_secs(2), async || code_on(s, &key).await == Some(Code::Valid))
                .await;
        }
        let t0 = Instant::now();
        keys_admin.revoke_key(keystile::proto::RevokeKeyRequest { key_id: record.key_id }).await.unwrap();
        for s in sidecars {
            wait_for("revoked on every sidecar", Duration::from_secs(1), async || {
                code_on(s, &key).await == Some(Code::Revoked)
            })
            .await;
        }
        took.push(t0.elapsed());
    }
    took.sort();
    took
}

/// Six nodes, three primaries with a replica each, made a cluster by
/// `redis-cli --cluster create`.
fn cluster() -> Vec<RedisServer> {
    let nodes: Vec<RedisServer> = (0..6)
        .map(|_| {
            // The bus port is given: the default (port + 10000) overflows
            // for a port above 55535.
            let bus = free_port().to_string();
            RedisServer::start_with(
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                    "--cluster-port",
                    bus.as_str(),
                ]
                .map(String::from),
            )
        })
        .collect();
    let mut create = std::process::Command::new("redis-cli");
    create.arg("--cluster").arg("create");
    for n in &nodes {
        create.arg(format!("127.0.0.1:{}", n.port));
    }
    let out = create.args(["--cluster-replicas", "1", "--cluster-yes"]).output().expect("redis-cli");
    assert!(out.status.success(), "cluster create: {}", String::from_utf8_lossy(&out.stdout));
    let deadline = Instant::now() + Duration::from_secs(30);
    for n in &nodes {
        loop {
            let info: String = redis::cmd("CLUSTER").arg("INFO").query(&mut n.conn()).unwrap_or_default();
            if info.contains("cluster_state:ok") && info.contains("cluster_known_nodes:6") {
                break;
            }
            assert!(Instant::now() < deadline, "the cluster never came up: {info}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    nodes
}

fn is_primary(n: &RedisServer) -> bool {
    let info: String = redis::cmd("INFO").arg("replication").query(&mut n.conn()).unwrap_or_default();
    info.contains("role:master")
}

fn calls(n: &RedisServer, command: &str) -> u64 {
    n.command_calls().get(command).copied().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_spreads_keys_revokes_everywhere_and_survives_a_failover() {
    let _turn = FAILOVERS.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let nodes = tokio::task::spawn_blocking(cluster).await.unwrap();
    let seeds = nodes.iter().take(3).map(|n| format!("127.0.0.1:{}", n.port)).collect::<Vec<_>>().join(",");
    let pepper = pepper_file(dir.path());
    let flags = ["--redis-cluster", seeds.as_str()];
    let admin = bootstrap(&flags, &pepper);
    let sidecars: Vec<Sidecar> = (0..3).map(|_| sidecar(&flags, &pepper, &admin)).collect();
    for s in &sidecars {
        s.wait_ready().await;
    }

    // 1,000 keys spread over every primary.
    let channel = tonic::transport::Channel::from_shared(sidecars[0].server()).unwrap().connect().await.unwrap();
    let mut keys_admin = admin_client(channel, &admin);
    let mut keys = Vec::new();
    for i in 0..1000 {
        keys.push(create(&mut keys_admin, create_req(&format!("spread {i}"))).await.0);
    }
    let primaries: Vec<&RedisServer> = nodes.iter().filter(|n| is_primary(n)).collect();
    assert_eq!(primaries.len(), 3);
    for p in &primaries {
        let size: u64 = redis::cmd("DBSIZE").query(&mut p.conn()).unwrap();
        println!("primary :{} holds {size} keys", p.port);
        assert!(size > 100, "records spread over every shard: :{} holds {size}", p.port);
    }
    let page = keys_admin
        .list_keys(keystile::proto::ListKeysRequest { page_size: 1000, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.records.len(), 1000, "a listing merges the partitions");
    assert!(page.records.windows(2).all(|w| (w[0].created_at, &w[0].key_id) <= (w[1].created_at, &w[1].key_id)));

    // Fleet-wide limits on the Cluster (README, "Rate limits"): each
    // tenant's bucket is one key, so eight tenants spread over the shards,
    // and three sidecars together admit each tenant's limit, no more.
    let mut clients = Vec::new();
    for s in &sidecars {
        let channel = tonic::transport::Channel::from_shared(s.server()).unwrap().connect().await.unwrap();
        clients.push(keystile::proto::verifier_client::VerifierClient::new(channel));
    }
    for i in 0..8 {
        let tenant = format!("org{i}");
        keys_admin
            .set_tenant_policy(keystile::proto::SetTenantPolicyRequest {
                tenant: tenant.clone(),
                limits: vec![limit("integration=300/3600s@tenant,auto")],
            })
            .await
            .unwrap();
        let req = keystile::proto::CreateKeyRequest { tenant, ..create_req("limited") };
        let key = create(&mut keys_admin, req).await.0;
        wait_known_everywhere(&clients, &key).await;
        let run = drive(&clients, &key, &[34, 33, 33], 450).await;
        let total: u64 = run.valid.iter().sum();
        assert_eq!(run.other, 0);
        assert!((285..=305).contains(&total), "tenant org{i}: {total} admitted of 300 ({:?})", run.valid);
    }
    let mut holding = 0;
    for p in &primaries {
        let buckets: Vec<String> = redis::cmd("KEYS").arg("keystile:lim:*").query(&mut p.conn()).unwrap();
        holding += usize::from(!buckets.is_empty());
    }
    assert!(holding >= 2, "the tenants' buckets spread over the shards");

    // A malformed-key flood reaches no node. The sidecars' own background
    // reads (a cached key read again at its TTL) may fall in a round: a
    // round with no read at all is the proof, and a malformed key that
    // read the store would spoil all three.
    let mut v = keystile::proto::verifier_client::VerifierClient::new(
        tonic::transport::Channel::from_shared(sidecars[1].server()).unwrap().connect().await.unwrap(),
    );
    let mut rounds = Vec::new();
    for _ in 0..3 {
        let reads_before: Vec<u64> = nodes.iter().map(|n| calls(n, "hget")).collect();
        for i in 0..500 {
            let r = v.verify(verify_req(&format!("ks_live_forged{i}_xx"))).await.unwrap().into_inner();
            assert_eq!(code(&r), Code::Malformed);
        }
        let reads_after: Vec<u64> = nodes.iter().map(|n| calls(n, "hget")).collect();
        rounds.push((reads_before, reads_after));
        if rounds.last().is_some_and(|(b, a)| b == a) {
            break;
        }
    }
    assert!(rounds.iter().any(|(b, a)| b == a), "no store read for a malformed key, on any node: {rounds:?}");

    // Revocation through one sidecar, refused by all three: 20 runs.
    let mut took = Vec::new();
    for key in keys.iter().take(20) {
        for s in &sidecars {
            assert_eq!(code_on(s, key).await, Some(Code::Valid));
        }
        let id = keystile::key::KeyFormat::default().parse(key).unwrap().key_id.to_string();
        let t0 = Instant::now();
        keys_admin.revoke_key(keystile::proto::RevokeKeyRequest { key_id: id }).await.unwrap();
        for s in &sidecars {
            wait_for("revoked on every sidecar", Duration::from_secs(1), async || {
                code_on(s, key).await == Some(Code::Revoked)
            })
            .await;
        }
        took.push(t0.elapsed());
    }
    took.sort();
    println!("cluster revocation over 3 sidecars, 20 runs: p50 {:?}, max {:?}", took[10], took[19]);

    // A replica takes over its primary while every sidecar verifies.
    let revoked = keys[0].clone();
    let valid = keys[999].clone();
    let watchers = Watchers::start(&sidecars, &valid, &revoked).await;
    let before_failover = watchers.rounds();
    let replica = nodes.iter().find(|n| !is_primary(n)).unwrap();
    let _: String = redis::cmd("CLUSTER").arg("FAILOVER").query(&mut replica.conn()).unwrap();
    wait_for("the replica took over", Duration::from_secs(30), async || is_primary(replica)).await;
    let mut fresh = None;
    let t0 = Instant::now();
    while fresh.is_none() {
        match keys_admin.create_key(create_req("after the failover")).await {
            Ok(r) => fresh = Some(r.into_inner().key),
            Err(e) => {
                assert!(t0.elapsed() < Duration::from_secs(15), "{e:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let fresh = fresh.unwrap();
    let id = keystile::key::KeyFormat::default().parse(&fresh).unwrap().key_id.to_string();
    for s in &sidecars {
        wait_for("the new key verifies", Duration::from_secs(5), async || {
            code_on(s, &fresh).await == Some(Code::Valid)
        })
        .await;
    }
    keys_admin.revoke_key(keystile::proto::RevokeKeyRequest { key_id: id }).await.unwrap();
    for s in &sidecars {
        wait_for("revoked after the failover", Duration::from_secs(2), async || {
            code_on(s, &fresh).await == Some(Code::Revoked)
        })
        .await;
    }
    let (during, outage) = watchers.stop(before_failover).await;
    println!("{during} verification rounds during the Cluster failover; uncached keys UNAVAILABLE for {outage:?}");
}

#[test]
fn bootstrap_refuses_another_pepper_and_an_unreachable_redis_is_logged() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start();
    let pepper = pepper_file(dir.path());
    bootstrap(&["--redis-url", &redis.url()], &pepper);
    let other = dir.path().join("other");
    std::fs::write(&other, "ef".repeat(32)).unwrap();
    let out = cli(&["keys", "bootstrap", "--redis-url", &redis.url(), "--pepper-file", other.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("were hashed with pepper"), "{err}");

    // Nothing listens: the log names where (without the password) and why.
    let url = format!("redis://:hunter2@127.0.0.1:{}", free_port());
    let mut child = std::process::Command::new(BIN)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--pepper-file",
            &pepper,
            "--redis-url",
            &url,
        ])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("redis unreachable") && log.contains("127.0.0.1"), "{log}");
    assert!(log.to_lowercase().contains("refused"), "the cause: {log}");
    assert!(log.matches("redis unreachable").count() >= 2, "each retry at first: {log}");
    assert!(!log.contains("hunter2"), "no password in the log");
}

/// A failover can lose a stream's newest entries and let the new primary
/// write others after them. Simulated here: the record changes behind the
/// feed's back (no event reaches the sidecar) and the entry the sidecar saw
/// last disappears. The periodic stream check notices and drops the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_stream_entry_drops_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start();
    let pepper = pepper_file(dir.path());
    let flags = ["--redis-url", &redis.url()];
    let flags: Vec<&str> = flags.iter().map(|s| s.as_ref()).collect();
    let admin = bootstrap(&flags, &pepper);
    let s = sidecar(&flags, &pepper, &admin);
    s.wait_ready().await;
    let created = s.keys_json(&["create", "--name", "behind the feed"]);
    let key = created["key"].as_str().unwrap().to_string();
    let id = created["record"]["key_id"].as_str().unwrap().to_string();
    wait_for("the sidecar saw the creation", Duration::from_secs(2), async || {
        code_on(&s, &key).await == Some(Code::Valid)
    })
    .await;

    let mut conn = redis.conn();
    let record_key = format!("keystile:key:{id}");
    let json: String = redis::cmd("HGET").arg(&record_key).arg("r").query(&mut conn).unwrap();
    let mut record: serde_json::Value = serde_json::from_str(&json).unwrap();
    record["revoked_at"] = serde_json::json!(1);
    let _: () = redis::cmd("HSET").arg(&record_key).arg("r").arg(record.to_string()).query(&mut conn).unwrap();
    let newest: redis::streams::StreamRangeReply =
        redis::cmd("XREVRANGE").arg("keystile:events").arg("+").arg("-").arg("COUNT").arg(1).query(&mut conn).unwrap();
    let _: i64 = redis::cmd("XDEL").arg("keystile:events").arg(&newest.ids[0].id).query(&mut conn).unwrap();
    let _: String =
        redis::cmd("XADD").arg("keystile:events").arg("*").arg("key_id").arg("zzzzZZZZ").query(&mut conn).unwrap();
    assert_eq!(code_on(&s, &key).await, Some(Code::Valid), "still cached: nothing told the sidecar yet");

    wait_for("the cache is dropped and the record read again", Duration::from_secs(15), async || {
        code_on(&s, &key).await == Some(Code::Revoked)
    })
    .await;
}

/// The change feed of one sidecar is cut (its Redis user may no longer
/// subscribe) while its reads keep working: past `--feed-grace` it stops
/// trusting its cache, so a key revoked through another sidecar is refused
/// there too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_feed_stops_trusting_the_cache_after_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start();
    let _: () =
        redis::cmd("ACL").arg(&["SETUSER", "cut", "on", ">pw", "~*", "&*", "+@all"]).query(&mut redis.conn()).unwrap();
    let pepper = pepper_file(dir.path());
    let url = redis.url();
    let admin = bootstrap(&["--redis-url", &url], &pepper);
    let cut_url = format!("redis://cut:pw@127.0.0.1:{}", redis.port);
    let cut = sidecar(&["--redis-url", &cut_url, "--feed-grace", "1s"], &pepper, &admin);
    let other = sidecar(&["--redis-url", &url], &pepper, &admin);
    cut.wait_ready().await;
    other.wait_ready().await;
    let key = other.keys_json(&["create", "--name", "watched"])["key"].as_str().unwrap().to_string();
    wait_for("cached on the cut sidecar", Duration::from_secs(2), async || {
        code_on(&cut, &key).await == Some(Code::Valid)
    })
    .await;

    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "cut", "-subscribe", "-psubscribe", "-ssubscribe"])
        .query(&mut redis.conn())
        .unwrap();
    let _: i64 = redis::cmd("CLIENT").arg(&["KILL", "USER", "cut"]).query(&mut redis.conn()).unwrap();
    let cut_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    other.keys_json(&["revoke", &key]);
    wait_for("refused on the cut sidecar", Duration::from_secs(4), async || {
        code_on(&cut, &key).await == Some(Code::Revoked)
    })
    .await;
    println!(
        "revoked with the feed cut: refused {:?} after the revocation, {:?} after the cut (feed grace 1 s)",
        t0.elapsed(),
        cut_at.elapsed()
    );
    assert!(cut_at.elapsed() < Duration::from_secs(3), "refused within the grace and a few reads");
    assert_eq!(code_on(&other, &key).await, Some(Code::Revoked));
}

#[test]
fn a_redis_without_an_append_only_file_is_named_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(); // the harness runs with --appendonly no
    let pepper = pepper_file(dir.path());
    let mut child = std::process::Command::new(BIN)
        .args(["serve", "--listen", &format!("127.0.0.1:{}", free_port()), "--pepper-file", &pepper])
        .args(["--redis-url", &redis.url()])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    child.kill().unwrap();
    let log = String::from_utf8_lossy(&child.wait_with_output().unwrap().stderr).into_owned();
    assert!(log.contains("without appendonly"), "{log}");
}
