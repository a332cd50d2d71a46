//! The `keystile` binary as operators use it: `serve --dev`, `keys …`,
//! `keys bootstrap`, `config check`, reflection and SIGTERM.

mod common;

use std::process::Command;

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
        ])
        .env_remove("KEYSTILE_PEPPER")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in ["--cache-ttl", "prod", "--default-rate-limit", "pepper is required", "4 problems"] {
        assert!(err.contains(needle), "{needle:?} in {err}");
    }
    let ok = Command::new(BIN).args(["config", "check", "--dev"]).output().unwrap();
    assert!(ok.status.success());
    assert!(String::from_utf8_lossy(&ok.stdout).contains("configuration ok"));
}
