//! The operator's experience, through the real binary: one exit-code
//! contract, errors that name their cause, TLS on the port and in the CLI,
//! a dev server that cannot trip a newcomer, and a CLI that takes a key in
//! any of its forms.

mod common;

use std::process::{Command, Output};

use common::*;
use serde_json::Value;

fn run(args: &[&str], envs: &[(&str, &str)]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("KEYSTILE_ADMIN_KEY")
        .env_remove("KEYSTILE_SERVER")
        .envs(envs.iter().copied())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn configuration_and_usage_errors_exit_64_with_every_problem() {
    let o = run(
        &["serve", "--workers", "abc", "--log-format", "xml", "--cache-max-entries", "many", "--runtime", "threads"],
        &[],
    );
    assert_eq!(o.status.code(), Some(64), "{}", stderr(&o));
    let err = stderr(&o);
    for needle in ["--workers", "--log-format", "--cache-max-entries", "pepper is required", "--runtime \"threads\""] {
        assert!(err.contains(needle), "missing {needle:?} in {err}");
    }
    let o = run(&["config", "check", "--dev"], &[("KEYSTILE_WORKERS", "x")]);
    assert_eq!(o.status.code(), Some(64), "{}", stderr(&o));
    assert!(stderr(&o).contains("--workers \"x\""), "{}", stderr(&o));

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keystile.toml");
    std::fs::write(&file, "dev = true\nworkers = \"two\"\nlog_format = \"xml\"\n").unwrap();
    let o = run(&["config", "check", "--config", file.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(64), "{}", stderr(&o));
    assert!(stderr(&o).contains("\"two\"") && stderr(&o).contains("\"xml\""), "{}", stderr(&o));

    // The file's problems and the flags' come together.
    std::fs::write(&file, "dev = true\ncache_tll = \"30s\"\n").unwrap();
    let o = run(&["config", "check", "--config", file.to_str().unwrap(), "--workers", "0"], &[]);
    assert_eq!(o.status.code(), Some(64));
    assert!(stderr(&o).contains("cache_tll") && stderr(&o).contains("--workers"), "{}", stderr(&o));

    for args in
        [&["serve", "--no-such-flag"][..], &["keys", "frobnicate"], &["serve", "--dev", "--no-admin"], &["keys"]]
    {
        let o = run(args, &[]);
        assert_eq!(o.status.code(), Some(64), "{args:?}: {}", stderr(&o));
    }
    assert_eq!(run(&["--help"], &[]).status.code(), Some(0));

    // Pepper files that must not be trusted, and a pepper on the command line.
    let check = |pepper: &std::path::Path| run(&["config", "check", "--pepper-file", pepper.to_str().unwrap()], &[]);
    let writable = dir.path().join("writable");
    std::fs::write(&writable, "ab".repeat(32)).unwrap();
    std::fs::set_permissions(&writable, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let o = check(&writable);
    assert_eq!(o.status.code(), Some(64));
    assert!(stderr(&o).contains("may write it"), "{}", stderr(&o));
    let zeros = dir.path().join("zeros");
    std::fs::write(&zeros, "0".repeat(64)).unwrap();
    assert!(stderr(&check(&zeros)).contains("all zeros"));
    let huge = dir.path().join("huge");
    std::fs::File::create(&huge).unwrap().set_len(200 << 20).unwrap();
    let o = check(&huge);
    assert_eq!(o.status.code(), Some(64));
    assert!(stderr(&o).contains("is not a pepper"), "{}", stderr(&o));
    let o = run(&["config", "check", "--dev"], &[("KEYSTILE_PEPPER", "")]);
    assert_eq!(o.status.code(), Some(0), "an empty KEYSTILE_PEPPER is unset: {}", stderr(&o));
    let o = run(&["config", "check", "--pepper", &"ab".repeat(32)], &[]);
    assert_eq!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("process list"), "a warning: {}", stderr(&o));
    assert_eq!(run(&["keys", "--help"], &[]).status.code(), Some(0));
}

#[test]
fn a_dev_server_binds_loopback_and_a_taken_port_mints_nothing() {
    let o = run(&["config", "check", "--dev"], &[]);
    assert!(stdout(&o).contains("listen=127.0.0.1:50051"), "{}", stdout(&o));
    let o = run(&["config", "check", "--dev", "--listen", "0.0.0.0:50051"], &[]);
    assert!(stdout(&o).contains("listen=0.0.0.0:50051"), "told otherwise: {}", stdout(&o));

    let first = Sidecar::start(&["--dev"], &[]);
    let o = run(&["serve", "--dev", "--listen", &format!("127.0.0.1:{}", first.port)], &[("RUST_LOG", "warn")]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).is_empty(), "no key for a server that never served: {}", stdout(&o));
    let err = stderr(&o);
    assert_eq!(err.matches("cannot listen on").count(), 1, "said once: {err}");
    assert!(err.to_lowercase().contains("address already in use") || err.contains("in use"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_follow_the_exit_code_contract() {
    let s = Sidecar::start(&["--dev"], &[]);
    let key = s.admin_key.as_str();
    let server = s.server();
    let keys = |args: &[&str]| {
        let mut all = vec!["keys", "--server", server.as_str()];
        all.extend_from_slice(args);
        run(&all, &[("KEYSTILE_ADMIN_KEY", key)])
    };
    // 64: refused before anything is sent.
    for args in [
        &["create", "--name", "x", "--rate-limit", "lots"][..],
        &["create", "--name", "x", "--meta", "novalue"],
        &["create", "--name", "x", "--meta", "=v"],
        &["get", "not-an-id"],
        &["update", "abcdEFGH"],
    ] {
        let o = keys(args);
        assert_eq!(o.status.code(), Some(64), "{args:?}: {}", stderr(&o));
    }
    // 65: the server refused the input.
    for args in [
        &["create", "--name", "x", "--allow-ip", "not-a-cidr"][..],
        &["create", "--name", "x", "--env", "prod"],
        &["create", "--name", " "],
        &["get", "abcdEFGH"],
    ] {
        let o = keys(args);
        assert_eq!(o.status.code(), Some(65), "{args:?}: {}", stderr(&o));
    }
    // 77: the credential was refused.
    let o = run(&["keys", "--server", &server, "list"], &[("KEYSTILE_ADMIN_KEY", "ks_live_abcdEFGH_nope")]);
    assert_eq!(o.status.code(), Some(77), "{}", stderr(&o));
    // An empty admin key is no admin key: 64, nothing sent.
    let o = run(&["keys", "--server", &server, "list"], &[("KEYSTILE_ADMIN_KEY", "")]);
    assert_eq!(o.status.code(), Some(64), "{}", stderr(&o));
    // 69: nothing listens there; the cause is named.
    let closed = free_port();
    let o = run(&["keys", "--server", &format!("http://127.0.0.1:{closed}"), "list"], &[("KEYSTILE_ADMIN_KEY", key)]);
    assert_eq!(o.status.code(), Some(69), "{}", stderr(&o));
    assert!(stderr(&o).to_lowercase().contains("connection refused"), "the cause: {}", stderr(&o));
    // host:port is plaintext HTTP, as grpcurl writes it; "Bearer " is fine.
    let o = run(
        &["keys", "--server", &format!("127.0.0.1:{}", s.port), "list"],
        &[("KEYSTILE_ADMIN_KEY", &format!("Bearer {key}"))],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    // keys bootstrap against a Redis that is not there: the URL (without its
    // password) and the cause.
    let pepper = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(pepper.path(), "ab".repeat(32)).unwrap();
    let dead = format!("redis://:hunter2@127.0.0.1:{}", free_port());
    let o = run(&["keys", "bootstrap", "--redis-url", &dead, "--pepper-file", pepper.path().to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(69), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("127.0.0.1") && err.to_lowercase().contains("refused"), "{err}");
    assert!(!err.contains("hunter2"), "no password: {err}");
    // No admin key in plaintext to another machine.
    let o = run(&["keys", "--server", "http://192.0.2.1:50051", "list"], &[("KEYSTILE_ADMIN_KEY", key)]);
    assert_eq!(o.status.code(), Some(64), "{}", stderr(&o));
    assert!(stderr(&o).contains("refusing to send a key in plaintext"), "{}", stderr(&o));
    assert!(!stderr(&o).contains(&key[17..]), "no secret in the message");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_in_any_form_and_every_field_of_it() {
    let s = Sidecar::start(&["--dev"], &[]);
    let created = s.keys_json(&[
        "create",
        "--name",
        "forms",
        "--scopes",
        "read,write",
        "--allow-ips",
        "10.0.0.0/8",
        "--rate-limit",
        "100/60s",
        "--meta",
        "team=billing",
    ]);
    let full = created["key"].as_str().unwrap().to_string();
    let id = created["record"]["key_id"].as_str().unwrap().to_string();
    let display = created["record"]["display_prefix"].as_str().unwrap().to_string();
    for form in [&id, &display, &full] {
        let got = s.keys_json(&["get", form]);
        assert_eq!(got["key_id"], Value::from(id.clone()), "{form}");
    }
    let table = String::from_utf8(s.keys(&["get", &display]).stdout).unwrap();
    for needle in ["key id", "ip allowlist", "10.0.0.0/8", "rate limit", "100/60s", "team=billing", "revoked"] {
        assert!(table.contains(needle), "missing {needle:?} in\n{table}");
    }
    let list = String::from_utf8(s.keys(&["list"]).stdout).unwrap();
    assert!(list.starts_with("KEY ID") && list.contains(&id), "{list}");
    let filtered = s.keys_json(&["list", "--name", "FORM", "--state", "active"]);
    assert_eq!(filtered["records"].as_array().unwrap().len(), 1);
    assert!(s.keys_json(&["list", "--state", "revoked"])["records"].as_array().unwrap().is_empty());

    let updated = s.keys_json(&["update", &full, "--scope", "read", "--expires-in", "30d"]);
    assert_eq!(updated["scopes"], serde_json::json!(["read"]));
    assert!(updated["expires_at"].as_i64().unwrap() > 0);
    let yaml = String::from_utf8(s.keys(&["get", &id, "--output", "yaml"]).stdout).unwrap();
    assert!(yaml.contains("\"key_id\": \"") && yaml.contains("\"scopes\":\n  - \"read\""), "{yaml}");
    assert_eq!(s.keys_json(&["disable", &display])["state"], "disabled");
    assert_eq!(s.keys_json(&["list", "--state", "disabled"])["records"].as_array().unwrap().len(), 1);
    assert_eq!(s.keys_json(&["enable", &full])["state"], "active");
    let owned = s.keys_json(&["create", "--name", "owned", "--owner", "dev@example.com"]);
    assert_eq!(owned["record"]["owner"], "dev@example.com");
    assert_eq!(s.keys_json(&["list", "--owner", "DEV@example.com"])["records"].as_array().unwrap().len(), 1);
    let quiet = s.keys(&["create", "--name", "quiet", "--quiet"]);
    assert_eq!(String::from_utf8(quiet.stdout).unwrap().trim().len(), full.len(), "only the key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_from_the_cli_and_completions() {
    let s = Sidecar::start(&["--dev"], &[]);
    let key = s.keys_json(&["create", "--name", "try me", "--scope", "read", "--rate-limit", "10/60s"])["key"]
        .as_str()
        .unwrap()
        .to_string();
    let server = s.server();
    let o = run(&["verify", &key, "--server", &server, "--scope", "read", "--json"], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["code"], "VALID");
    assert_eq!(v["httpStatus"], 200);
    assert_eq!(v["rateLimit"]["limit"], "10", "64-bit integers are strings in protobuf's JSON");
    assert_eq!(v["headers"]["x-api-key-scopes"], "read");
    let o = run(&["verify", &key, "--server", &server, "--scope", "admin"], &[]);
    assert_eq!(o.status.code(), Some(0), "a denial is an answer");
    assert!(stdout(&o).starts_with("INSUFFICIENT_SCOPE (403)"), "{}", stdout(&o));

    for shell in ["bash", "zsh", "fish"] {
        let o = run(&["completions", shell], &[]);
        assert_eq!(o.status.code(), Some(0));
        assert!(stdout(&o).contains("keystile"), "{shell}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_on_the_port_and_in_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key_file, _, _) = certificates(dir.path());
    let s = Sidecar::start(&["--dev", "--tls-cert", &cert, "--tls-key", &key_file], &[]);
    let https = format!("https://127.0.0.1:{}", s.port);
    let admin = s.admin_key.as_str();

    let o = run(
        &["keys", "--server", &https, "--ca-file", &ca, "create", "--name", "over tls", "--json"],
        &[("KEYSTILE_ADMIN_KEY", admin)],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let key = serde_json::from_slice::<Value>(&o.stdout).unwrap()["key"].as_str().unwrap().to_string();
    let o = run(&["verify", &key, "--server", &https, "--ca-file", &ca, "--json"], &[]);
    assert_eq!(serde_json::from_slice::<Value>(&o.stdout).unwrap()["code"], "VALID", "{}", stderr(&o));

    // The system roots do not know the test CA: refused, with the cause.
    let o = run(&["keys", "--server", &https, "list"], &[("KEYSTILE_ADMIN_KEY", admin)]);
    assert_eq!(o.status.code(), Some(69), "{}", stderr(&o));
    assert!(stderr(&o).to_lowercase().contains("certificate"), "the cause: {}", stderr(&o));
    // Plaintext against the TLS port does not get through.
    let o =
        run(&["keys", "--server", &format!("http://127.0.0.1:{}", s.port), "list"], &[("KEYSTILE_ADMIN_KEY", admin)]);
    assert_ne!(o.status.code(), Some(0), "{}", stdout(&o));

    // The load generator speaks TLS too.
    let o = run(
        &["bench", "--smoke", "--server", &https, "--ca-file", &ca, "--scenario", "health"],
        &[("KEYSTILE_ADMIN_KEY", admin)],
    );
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));

    // Bad TLS files are configuration errors, reported with the others.
    let o = run(&["config", "check", "--dev", "--tls-cert", &key_file, "--tls-key", &cert, "--workers", "0"], &[]);
    assert_eq!(o.status.code(), Some(64));
    assert!(stderr(&o).contains("--tls-cert") && stderr(&o).contains("--tls-key") && stderr(&o).contains("--workers"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_wants_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key_file, client_cert, client_key) = certificates(dir.path());
    let s = Sidecar::start(&["--dev", "--tls-cert", &cert, "--tls-key", &key_file, "--tls-client-ca", &ca], &[]);
    let https = format!("https://127.0.0.1:{}", s.port);
    let admin = s.admin_key.as_str();
    let o = run(&["keys", "--server", &https, "--ca-file", &ca, "list"], &[("KEYSTILE_ADMIN_KEY", admin)]);
    assert_ne!(o.status.code(), Some(0), "no client certificate, no call");
    let o = run(
        &[
            "keys",
            "--server",
            &https,
            "--ca-file",
            &ca,
            "--client-cert",
            &client_cert,
            "--client-key",
            &client_key,
            "list",
        ],
        &[("KEYSTILE_ADMIN_KEY", admin)],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_admin_keyadmin_is_neither_served_nor_advertised() {
    use tokio_stream::StreamExt;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let pepper = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(pepper.path(), "ab".repeat(32)).unwrap();
    let s = Sidecar::start(&["--no-admin", "--pepper-file", pepper.path().to_str().unwrap()], &[]);
    let channel = tonic::transport::Channel::from_shared(s.server()).unwrap().connect().await.unwrap();
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
    let Some(Ok(answer)) = answers.next().await else { panic!("no answer") };
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else { panic!("{answer:?}") };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"keystile.v1.Verifier".to_string()), "{names:?}");
    assert!(!names.iter().any(|n| n.contains("KeyAdmin")), "{names:?}");

    let o = run(&["keys", "--server", &s.server(), "list"], &[("KEYSTILE_ADMIN_KEY", "ks_live_abcdEFGH_x")]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("does not serve this API"), "{}", stderr(&o));
}
