//! The `keystile` binary as operators use it: `serve --dev`, `keys …`,
//! `keys bootstrap`, `config check`, reflection and SIGTERM.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use keystile::proto::Code;
use tokio_stream::StreamExt;

async fn channel(s: &Sidecar) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(s.server()).unwrap().connect().await.unwrap()
}

async fn verify_over_grpc(port: u16, key: &str) -> Code {
    let mut v =
        keystile::proto::verifier_client::VerifierClient::connect(format!("http://127.0.0.1:{port}")).await.unwrap();
    code(&verify(&mut v, verify_req(key)).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_server_and_the_keys_cli() {
    let sidecar = Sidecar::start(&["--dev"], &[]);
    assert!(sidecar.admin_key.starts_with("ks_live_"));

    let created = sidecar.keys_json(&[
        "create",
        "--name",
        "cli key",
        "--scope",
        "read,write",
        "--tenant",
        "acme",
        "--rate-limit",
        "100/60s",
    ]);
    let key = created["key"].as_str().unwrap().to_string();
    let id = created["record"]["key_id"].as_str().unwrap().to_string();
    assert_eq!(created["record"]["scopes"], serde_json::json!(["read", "write"]));
    assert_eq!(created["record"]["rate_limit"]["requests"], 100);
    assert_eq!(verify_over_grpc(sidecar.port, &key).await, Code::Valid);

    // The table shows what operators look for, and never the full key.
    let out = sidecar.keys(&["list"]);
    let table = String::from_utf8(out.stdout).unwrap();
    for column in ["NAME", "KEY", "ENV", "TENANT", "SCOPES", "CREATED", "LAST USED", "EXPIRES", "STATE"] {
        assert!(table.contains(column), "{column} in {table}");
    }
    assert!(table.contains(&format!("ks_live_{id}")) && table.contains("cli key") && table.contains("active"));
    assert!(!table.contains(&key));

    let listed = sidecar.keys_json(&["list", "--tenant", "acme"]);
    assert_eq!(listed["records"].as_array().unwrap().len(), 1);

    let updated = sidecar.keys_json(&["update", &id, "--scopes", "read", "--name", "renamed"]);
    assert_eq!(updated["name"], "renamed");
    assert_eq!(updated["version"], 2);

    let rotated = sidecar.keys_json(&["rotate", &id, "--grace", "0s"]);
    let new_key = rotated["key"].as_str().unwrap().to_string();
    assert_eq!(verify_over_grpc(sidecar.port, &new_key).await, Code::Valid);
    assert_eq!(verify_over_grpc(sidecar.port, &key).await, Code::Revoked);

    let new_id = rotated["record"]["key_id"].as_str().unwrap().to_string();
    assert_eq!(sidecar.keys_json(&["revoke", &new_id])["state"], "revoked");
    assert_eq!(sidecar.keys_json(&["get", &new_id])["state"], "revoked");

    // Delete asks first; without a terminal it needs --yes.
    let out = sidecar.keys(&["delete", &new_id]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--yes"));
    assert!(sidecar.keys(&["delete", &new_id, "--yes"]).status.success());
    assert_eq!(verify_over_grpc(sidecar.port, &new_key).await, Code::NotFound);

    // Bad input is a clear error.
    let out = sidecar.keys(&["create", "--name", "x", "--allow-ip", "10.0.0.0/99"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("InvalidArgument"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(BIN)
        .args(["keys", "list", "--server", &sidecar.server()])
        .env_remove("KEYSTILE_ADMIN_KEY")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));

    // Exactly one stdout line in dev mode; SIGTERM exits 0.
    let (code, rest) = sidecar.terminate();
    assert_eq!(code, Some(0));
    assert_eq!(rest, "", "dev mode prints only the admin key line");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_every_service() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let sidecar = Sidecar::start(&["--dev"], &[]);
    let mut client = ServerReflectionClient::new(channel(&sidecar).await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client.server_reflection_info(tokio_stream::iter([req])).await.unwrap().into_inner();
    let resp = stream.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else { panic!("{resp:?}") };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in
        ["keystile.v1.Verifier", "keystile.v1.KeyAdmin", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"]
    {
        assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
    }

    let mut alpha =
        tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient::new(channel(&sidecar).await);
    let req = tonic_reflection::pb::v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut stream = alpha.server_reflection_info(tokio_stream::iter([req])).await.unwrap().into_inner();
    assert!(stream.next().await.unwrap().is_ok(), "v1alpha answers too");
    sidecar.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_mints_an_admin_key_into_redis() {
    let redis = RedisServer::start();
    let pepper = "11".repeat(32);
    let out = Command::new(BIN)
        .args(["keys", "bootstrap", "--redis-url", &redis.url()])
        .env("KEYSTILE_PEPPER", &pepper)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let admin_key = stdout.trim().strip_prefix("KEYSTILE_ADMIN_KEY=").unwrap().to_string();

    let mut sidecar = Sidecar::start(&["--redis-url", &redis.url()], &[("KEYSTILE_PEPPER", &pepper)]);
    sidecar.admin_key = admin_key;
    let created = sidecar.keys_json(&["create", "--name", "from bootstrap", "--env", "test"]);
    let key = created["key"].as_str().unwrap();
    assert!(key.starts_with("ks_test_"));
    assert_eq!(verify_over_grpc(sidecar.port, key).await, Code::Valid);
    assert_eq!(sidecar.terminate().0, Some(0));

    let out = Command::new(BIN)
        .args(["keys", "bootstrap", "--redis-url", &redis.url()])
        .env_remove("KEYSTILE_PEPPER")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "no pepper, no key");
}

#[test]
fn configuration_errors_are_all_reported_before_binding() {
    let port = free_port();
    let out = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--cache-ttl",
            "soon",
            "--accept-envs",
            "prod",
            "--default-rate-limit",
            "lots",
            "--limit",
            "Integration=1/1s",
            "--limit-slack",
            "2",
            "--limit-lease-idle",
            "50ms",
        ])
        .env_remove("KEYSTILE_PEPPER")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "--cache-ttl",
        "prod",
        "--default-rate-limit",
        "--limit: limit name",
        "--limit-slack",
        "pepper is required",
        "7 problems",
    ] {
        assert!(err.contains(needle), "{needle:?} in {err}");
    }
    let ok = Command::new(BIN).args(["config", "check", "--dev"]).output().unwrap();
    assert!(ok.status.success());
    assert!(String::from_utf8_lossy(&ok.stdout).contains("configuration ok"));
}

fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_without_key_material() {
    let metrics_port = free_port();
    let sidecar = Sidecar::start(&["--dev", "--metrics-listen", &format!("127.0.0.1:{metrics_port}")], &[]);
    let created = sidecar.keys_json(&["create", "--name", "metered"]);
    let key = created["key"].as_str().unwrap().to_string();
    assert_eq!(verify_over_grpc(sidecar.port, &key).await, Code::Valid);
    assert_eq!(verify_over_grpc(sidecar.port, "ks_live_nope").await, Code::Malformed);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let body = loop {
        let body = scrape(metrics_port);
        if body.contains("keystile_verify_verdicts_total{code=\"malformed\"}") {
            break body;
        }
        assert!(std::time::Instant::now() < deadline, "no verdict metrics in:\n{body}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    for needle in [
        "keystile_verify_verdicts_total{code=\"valid\"}",
        "keystile_verify_duration_seconds_bucket",
        "keystile_cache_lookups_total{result=\"miss\"}",
        "keystile_store_requests_total{op=\"get\"}",
        "keystile_build_info{version=",
        "keystile_ready 1",
    ] {
        assert!(body.contains(needle), "{needle} missing from:\n{body}");
    }
    let id = created["record"]["key_id"].as_str().unwrap();
    assert!(!body.contains(id) && !body.contains(&key[17..49]), "no key material in metrics");
    sidecar.terminate();
}

#[test]
fn a_toml_file_configures_serve_and_flags_win() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keystile.toml");
    std::fs::write(
        &file,
        "dev = true\ncache_ttl = \"30s\"\naccept-envs = [\"live\"]\nfailed_attempts_per_minute = 5\nkey_prefix = [\"ks\", \"old\"]\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["config", "check", "--config"])
        .arg(&file)
        .arg("--cache-ttl")
        .arg("45s")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(summary.contains("cache_ttl=45s"), "the flag wins: {summary}");
    assert!(summary.contains("failed_attempts_per_minute=5"), "the file applies: {summary}");

    std::fs::write(&file, "cache_tll = \"30s\"\npepper = \"00\"\n").unwrap();
    let out = Command::new(BIN).args(["config", "check", "--config"]).arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cache_tll") && err.contains("\"pepper\" cannot be set"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_fails_no_accepted_call() {
    let sidecar = Sidecar::start(&["--dev"], &[]);
    let key = sidecar.keys_json(&["create", "--name", "under load"])["key"].as_str().unwrap().to_string();
    let channel = channel(&sidecar).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let mut c = keystile::proto::verifier_client::VerifierClient::new(channel.clone());
            let (key, stop) = (key.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut ok, mut refused) = (0u32, 0u32);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match c.verify(verify_req(&key)).await {
                        Ok(r) => {
                            assert_eq!(code(&r.into_inner()), Code::Valid);
                            ok += 1;
                        }
                        // Refused at the connection level: the listener is
                        // closed, the stream came after the final GOAWAY (not
                        // processed), or the client wrote it into a
                        // connection the drained server had closed. The
                        // client sees a transport error, never an answer of
                        // the server. That calls in flight at shutdown do
                        // complete is `store_behaviour::shutdown_drains_calls_in_flight`.
                        Err(e)
                            if e.code() == tonic::Code::Unavailable
                                || format!("{e:?}").contains("tonic::transport::Error") =>
                        {
                            refused += 1
                        }
                        Err(e) => panic!("an accepted call failed during shutdown: {e:?}"),
                    }
                    if refused > 0 {
                        break;
                    }
                }
                (ok, refused)
            })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let (code, _) = tokio::task::spawn_blocking(move || sidecar.terminate()).await.unwrap();
    assert_eq!(code, Some(0));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for w in workers {
        total += w.await.unwrap().0;
    }
    assert!(total > 0, "the load ran");
}

/// The sidecar turns transparent huge pages off for itself at start, so a
/// kernel that gives them to every process does not inflate the
/// allocator's idle RSS (BENCHMARKS.md, "Allocator"). Kernels that do not
/// report `THP_enabled` (before Linux 5.0) have nothing to check.
#[test]
fn the_sidecar_runs_without_transparent_huge_pages() {
    let sidecar = Sidecar::start(&["--dev"], &[]);
    let status = std::fs::read_to_string(format!("/proc/{}/status", sidecar.child.id())).unwrap();
    if let Some(thp) = status.lines().find_map(|l| l.strip_prefix("THP_enabled:")) {
        assert_eq!(thp.trim(), "0", "THP_enabled of the sidecar");
    }
    sidecar.terminate();
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Every service on the port has a request-size cap, health and reflection
/// included: a 1 MiB message is refused with INVALID_ARGUMENT as soon as
/// its length prefix is read, so a hundred of them do not grow the heap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_health_and_reflection_messages_are_refused_without_growing_memory() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;

    let sidecar = Sidecar::start(&["--dev"], &[]);
    let ch = channel(&sidecar).await;
    let huge = "x".repeat(1 << 20);

    let mut health = HealthClient::new(ch.clone());
    let err = health.check(HealthCheckRequest { service: huge.clone() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("16 KiB"), "{}", err.message());

    let mut reflection = ServerReflectionClient::new(ch.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(huge.clone())),
    };
    let refused = match reflection.server_reflection_info(tokio_stream::iter([request])).await {
        Err(status) => status,
        Ok(resp) => resp.into_inner().next().await.expect("an answer").unwrap_err(),
    };
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");

    // A normal call still works, then a hundred 1 MiB calls at once.
    assert!(health.check(HealthCheckRequest { service: String::new() }).await.is_ok());
    let before = rss_kib(sidecar.child.id());
    let calls: Vec<_> = (0..100)
        .map(|_| {
            let (mut h, huge) = (HealthClient::new(ch.clone()), huge.clone());
            tokio::spawn(async move { h.check(HealthCheckRequest { service: huge }).await })
        })
        .collect();
    for c in calls {
        assert_eq!(c.await.unwrap().unwrap_err().code(), tonic::Code::InvalidArgument);
    }
    let after = rss_kib(sidecar.child.id());
    println!("RSS before {before} KiB, after a hundred 1 MiB requests {after} KiB");
    assert!(after < before + 32 * 1024, "RSS grew from {before} KiB to {after} KiB");
    sidecar.terminate();
}

/// An open Health/Watch stream does not hold a shutdown for the whole
/// grace: it is told NOT_SERVING and ended, and the process exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_health_watch_streams() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let sidecar = Sidecar::start(&["--dev", "--shutdown-grace", "20s"], &[]);
    let mut health = HealthClient::new(channel(&sidecar).await);
    let mut watch = health.watch(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
    watch.message().await.unwrap().expect("the current status");
    let t0 = std::time::Instant::now();
    let (code, _) = tokio::task::spawn_blocking(move || sidecar.terminate()).await.unwrap();
    assert_eq!(code, Some(0));
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(10),
        "exited in {:?}, not after the 20 s grace",
        t0.elapsed()
    );
    println!("exited {:?} after SIGTERM with a Watch stream open", t0.elapsed());
}

fn tenants(s: &Sidecar, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("tenants")
        .args(args)
        .env("KEYSTILE_ADMIN_KEY", &s.admin_key)
        .env("KEYSTILE_SERVER", s.server())
        .output()
        .unwrap()
}

#[tokio::test]
async fn named_limits_through_the_cli() {
    let sidecar = Sidecar::start(&["--dev", "--limit", "export=2/1m"], &[]);
    sidecar.wait_ready().await;
    for (name, rate) in [("integration", "1000/1m"), ("admin", "500/1m"), ("analytics", "100/1m")] {
        let auto = if name == "integration" { "--auto" } else { "--per=tenant" };
        let out = tenants(&sidecar, &["set-limit", "acme", name, rate, auto]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let out = tenants(&sidecar, &["get", "acme"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("integration=1000/60s@tenant,auto"), "{text}");
    assert!(text.contains("analytics=100/60s@tenant"), "{text}");
    let out = tenants(&sidecar, &["clear-limit", "acme", "admin", "--json"]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = doc["limits"].as_array().unwrap().iter().map(|l| l["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["integration", "analytics"]);
    assert_eq!(doc["limits"][0]["per"], "tenant");

    // Mistakes: a clear error, nothing sent or changed.
    assert_eq!(tenants(&sidecar, &["clear-limit", "acme", "admin"]).status.code(), Some(65));
    let out = tenants(&sidecar, &["set-limit", "acme", "Bad Name", "1/1s"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("limit name"));

    // A key with its own limit, and a Verify naming limits.
    let created =
        sidecar.keys_json(&["create", "--name", "partner", "--tenant", "acme", "--limit", "integration=1/1m,auto"]);
    assert_eq!(created["record"]["limits"][0]["name"], "integration");
    let key = created["key"].as_str().unwrap().to_string();
    let verify = |limits: &str| {
        let out = Command::new(BIN)
            .args(["verify", "--server", &sidecar.server(), "--json", "--limit", limits])
            .env("KEYSTILE_KEY", &key)
            .output()
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let r = verify("integration,export");
    assert_eq!(r["code"], "VALID");
    assert_eq!(r["headers"]["ratelimit-policy"], "\"integration\";q=1;w=60, \"export\";q=2;w=60");
    let r = verify("integration");
    assert_eq!(r["code"], "RATE_LIMITED", "the key's own integration limit (1/min) beats the tenant's");
}

#[tokio::test]
async fn token_exchange_and_signing_keys_through_the_cli() {
    let redis = RedisServer::start();
    let pepper = "6666666666666666666666666666666666666666666666666666666666666666";
    let signing = |args: &[&str]| {
        Command::new(BIN)
            .arg("signing-keys")
            .args(args)
            .args(["--redis-url", &redis.url()])
            .env("KEYSTILE_PEPPER", pepper)
            .output()
            .unwrap()
    };
    let out = signing(&["list"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("no signing keys yet"));
    let out = signing(&["rotate"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(listed.lines().count(), 1, "{listed}");
    let kid = listed.split_whitespace().next().unwrap().to_string();
    // Another pepper cannot add keys beside these.
    let other = Command::new(BIN)
        .args(["signing-keys", "rotate", "--redis-url", &redis.url()])
        .env("KEYSTILE_PEPPER", "7777777777777777777777777777777777777777777777777777777777777777")
        .output()
        .unwrap();
    assert_eq!(other.status.code(), Some(64));

    let mut sidecar = Sidecar::start(&["--redis-url", &redis.url()], &[("KEYSTILE_PEPPER", pepper)]);
    sidecar.wait_ready().await;
    let boot = Command::new(BIN)
        .args(["keys", "bootstrap", "--redis-url", &redis.url()])
        .env("KEYSTILE_PEPPER", pepper)
        .output()
        .unwrap();
    sidecar.admin_key =
        String::from_utf8(boot.stdout).unwrap().trim().strip_prefix("KEYSTILE_ADMIN_KEY=").unwrap().to_string();
    let created =
        sidecar.keys_json(&["create", "--name", "svc", "--owner", "ops@example.com", "--scope", "token:exchange,read"]);
    let key = created["key"].as_str().unwrap().to_string();
    let exchange = |email: &str| {
        Command::new(BIN)
            .args(["token", "exchange", "--server", &sidecar.server(), "--email", email, "--scope", "read", "-q"])
            .env("KEYSTILE_KEY", &key)
            .output()
            .unwrap()
    };
    let out = exchange("OPS@example.com");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let header = token.split('.').next().unwrap();
    assert!(
        String::from_utf8_lossy(
            &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, header).unwrap()
        )
        .contains(&kid),
        "signed with the key made by rotate"
    );
    let verified = Command::new(BIN)
        .args(["verify", "--server", &sidecar.server(), "--scope", "read", "--json"])
        .env("KEYSTILE_KEY", format!("Bearer {token}"))
        .output()
        .unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&verified.stdout).unwrap();
    assert_eq!(doc["code"], "VALID");
    assert_eq!(exchange("someone@example.com").status.code(), Some(77), "a wrong email is refused");
}

/// Key kinds with Stripe-style prefixes and usage, as an operator sees them
/// (README, "Key kinds" and "Usage").
#[tokio::test]
async fn key_kinds_and_usage_through_the_cli() {
    let sidecar = Sidecar::start(
        &[
            "--dev",
            "--key-prefix",
            "sk",
            "--publishable-key-prefix",
            "pk",
            "--restricted-key-prefix",
            "rk",
            "--last-used-flush",
            "1s",
        ],
        &[],
    );
    sidecar.wait_ready().await;
    assert!(sidecar.admin_key.starts_with("sk_live_"));
    let created = sidecar.keys_json(&[
        "create",
        "--name",
        "storefront",
        "--kind",
        "publishable",
        "--tenant",
        "shop",
        "--scope",
        "public:read",
        "--allow-origin",
        "https://shop.example",
    ]);
    let site = created["key"].as_str().unwrap().to_string();
    let id = created["record"]["key_id"].as_str().unwrap().to_string();
    assert!(site.starts_with("pk_live_"));
    assert_eq!(created["record"]["kind"], "publishable");
    assert_eq!(created["record"]["allowed_origins"], serde_json::json!(["https://shop.example"]));
    let verify = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(["verify", "--server", &sidecar.server(), "--json"])
            .args(args)
            .env("KEYSTILE_KEY", &site)
            .output()
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["code"].as_str().unwrap().to_string()
    };
    assert_eq!(verify(&["--scope", "public:read", "--origin", "https://shop.example"]), "VALID");
    assert_eq!(verify(&["--scope", "public:read", "--origin", "https://evil.example"]), "ORIGIN_NOT_ALLOWED");
    assert_eq!(verify(&["--scope", "orders:write", "--origin", "https://shop.example"]), "INSUFFICIENT_SCOPE");

    let out = sidecar.keys(&["create", "--name", "bad", "--kind", "publishable", "--scope", "orders:write"]);
    assert_eq!(out.status.code(), Some(65), "refused by the server as invalid");
    assert!(String::from_utf8_lossy(&out.stderr).contains("public:"), "{}", String::from_utf8_lossy(&out.stderr));

    // Usage reaches `keys get` after a flush.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = sidecar.keys_json(&["get", &id]);
        if got["usage"]["VALID"] == 1 && got["usage"]["ORIGIN_NOT_ALLOWED"] == 1 {
            assert_eq!(got["usage"]["INSUFFICIENT_SCOPE"], serde_json::Value::Null, "refused before any lookup");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "usage never shown: {got}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let table = String::from_utf8(sidecar.keys(&["get", &id]).stdout).unwrap();
    assert!(table.contains("publishable") && table.contains("VALID 1"), "{table}");
}

/// The proxy front ends through the binary (README, "Protect an API
/// without code"): every bad setting reported at once, quoting its value;
/// then ext_authz and forward-auth served.
#[tokio::test]
async fn proxy_front_ends_through_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let bad_routes = dir.path().join("bad.toml");
    std::fs::write(&bad_routes, "[[hosts]]\npattern = \"a_b.example.com\"\n[[routes]]\npath_prefix = \"v1\"\n")
        .unwrap();
    let bad_body = dir.path().join("bad.json");
    std::fs::write(&bad_body, r#"{"oops": "{stauts}"}"#).unwrap();
    let out = Command::new(BIN)
        .args(["config", "check", "--dev", "--ext-authz", "--routes"])
        .arg(&bad_routes)
        .arg("--error-body")
        .arg(&bad_body)
        .args(["--credential-sources", "authorization,bad header", "--trusted-hops", "99"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in ["a_b", "\"v1\"", "{stauts}", "bad header", "--trusted-hops \"99\"", "5 problems"] {
        assert!(err.contains(needle), "{needle:?} in {err}");
    }

    let routes = dir.path().join("routes.toml");
    std::fs::write(
        &routes,
        "[[routes]]\npath_prefix = \"/admin\"\nscopes = [\"keystile:admin\"]\n[default]\nscopes = [\"api:read\"]\n",
    )
    .unwrap();
    let http_port = free_port();
    let http_listen = format!("127.0.0.1:{http_port}");
    let sidecar = Sidecar::start(
        &["--dev", "--ext-authz", "--http-listen", &http_listen, "--routes", routes.to_str().unwrap()],
        &[],
    );
    sidecar.wait_ready().await;
    let admin = sidecar.admin_key.clone();
    let bearer = format!("Bearer {admin}");
    let ask = |uri: &str| {
        http(
            &http_listen,
            "GET",
            "/authz",
            &[("X-Original-URI", uri), ("X-Original-Method", "GET"), ("Authorization", &bearer)],
        )
    };
    let r = ask("/admin/keys");
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.header("x-keystile-key-id").is_some());
    let r = ask("/v1/users");
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (403, Some("insufficient_scope")),
        "the default route needs api:read"
    );

    // ext_authz answers on the gRPC port.
    let channel = channel(&sidecar).await;
    let mut client = envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient::new(channel);
    let r = client.check(envoy_types::ext_authz::v3::pb::CheckRequest::default()).await.unwrap_err();
    assert_eq!(r.code(), tonic::Code::InvalidArgument, "a CheckRequest without an HTTP request");
}

/// README, "Limits": in a busy process, a connection with its share of
/// calls queued is not read from until half of them start (counted in
/// `keystile_connection_pauses_total`), and every call is still answered:
/// small ones, and requests of about 6 KiB that take many reads each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_connections_wait_their_turn_and_every_call_is_answered() {
    let metrics_port = free_port();
    let metrics = format!("127.0.0.1:{metrics_port}");
    let sidecar = Sidecar::start(
        &["--dev", "--metrics-listen", &metrics, "--max-queued-calls", "2", "--queued-calls-per-connection", "1"],
        &[],
    );
    let created = sidecar.keys_json(&["create", "--name", "fair", "--scope", "read"]);
    let key = created["key"].as_str().unwrap().to_string();
    let large: Vec<String> = (0..64).map(|i| format!("{i:02}{}", "s".repeat(88))).collect();
    let mut calls = Vec::new();
    for connection in 0..8 {
        let channel = tonic::transport::Channel::from_shared(sidecar.server()).unwrap().connect().await.unwrap();
        for _ in 0..48 {
            let mut v = keystile::proto::verifier_client::VerifierClient::new(channel.clone());
            let scopes = if connection % 2 == 0 { vec!["read".to_string()] } else { large.clone() };
            let req = keystile::proto::VerifyRequest { scopes, ..verify_req(&key) };
            calls.push(tokio::spawn(async move {
                let answer = tokio::time::timeout(Duration::from_secs(30), v.verify(req)).await;
                code(&answer.expect("answered within 30 s").expect("a gRPC answer").into_inner())
            }));
        }
    }
    let (mut valid, mut denied) = (0, 0);
    for call in calls {
        match call.await.unwrap() {
            Code::Valid => valid += 1,
            Code::InsufficientScope => denied += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((valid, denied), (4 * 48, 4 * 48));
    let body = scrape(metrics_port);
    let pauses: f64 = body
        .lines()
        .find_map(|l| l.strip_prefix("keystile_connection_pauses_total "))
        .expect("the pause counter is exported")
        .trim()
        .parse()
        .unwrap();
    println!("connection pauses: {pauses}");
    assert!(pauses > 0.0, "8 connections of 48 calls each against a queue of 2: some waited");
}

/// README, "Runtime": `--runtime per-core` through the binary. Three cores
/// (threads `ks-core-1` and `ks-core-2` beside the first) answer every
/// connection dealt to them, and SIGTERM still exits 0; `bench` reads a
/// `--server`'s CPU per call with `--server-pid`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_core_runtime_serves_every_connection_and_stops_cleanly() {
    let sidecar = Sidecar::start(&["--dev", "--runtime", "per-core", "--workers", "3"], &[]);
    let key =
        sidecar.keys_json(&["create", "--name", "per-core", "--scope", "read"])["key"].as_str().unwrap().to_string();
    assert_eq!(common::core_threads(&sidecar.child.id().to_string()), ["ks-core-1", "ks-core-2"]);
    // Each its own connection: dealt round-robin over the three cores.
    for _ in 0..6 {
        let answered = tokio::time::timeout(Duration::from_secs(5), verify_over_grpc(sidecar.port, &key)).await;
        assert_eq!(answered.expect("every core answers"), Code::Valid);
    }

    let bench = Command::new(BIN)
        .args(["bench", "--server", &sidecar.server(), "--server-pid", &sidecar.child.id().to_string()])
        .args(["--scenario", "health", "--duration", "300ms", "--warmup", "0s", "--json"])
        .env("KEYSTILE_ADMIN_KEY", &sidecar.admin_key)
        .output()
        .unwrap();
    assert!(bench.status.success(), "{}", String::from_utf8_lossy(&bench.stderr));
    let report: serde_json::Value = serde_json::from_slice(&bench.stdout).unwrap();
    let cpu = report["scenarios"][0]["server_cpu_us_per_call"].as_f64();
    assert!(cpu.is_some_and(|c| c >= 0.0), "server CPU per call: {report}");
    let alone = Command::new(BIN).args(["bench", "--server-pid", "1", "--smoke"]).output().unwrap();
    assert!(!alone.status.success(), "--server-pid without --server is refused");

    let (code, _) = sidecar.terminate();
    assert_eq!(code, Some(0));
}
