//! Fuzz targets on the stable toolchain (README, "Fuzzing"): the key
//! parser, the decoding of Verify and ext_authz Check requests, and the
//! admin API's validation of new keys.
//!
//! Each target starts from its seed corpus in `fuzz/corpus/<target>/` and
//! runs property cases (proptest) on mutations of it: bit flips, inserted
//! and removed bytes, truncations, splices of two seeds and raw random
//! bytes. What a target must never do is panic; each also checks what its
//! answer must be. A failure is shrunk and kept by proptest in
//! `tests/fuzz.proptest-regressions`, which reruns it first from then on.
//!
//! CI runs a bounded number of cases (`KEYSTILE_FUZZ_CASES`, default 2000
//! per target). A long run:
//!
//! ```text
//! KEYSTILE_FUZZ_CASES=2000000 cargo test --release --test fuzz -- --nocapture
//! ```

mod common;

use std::sync::{Arc, OnceLock};

use common::test_pepper;
use keystile::admin::Actor;
use keystile::app::App;
use keystile::clock::Clock;
use keystile::engine::EngineSettings;
use keystile::key::KeyFormat;
use keystile::proto;
use keystile::store::memory::MemoryStore;
use keystile::verdict::Outcome;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::Config;
use prost::Message;

fn cases() -> u32 {
    std::env::var("KEYSTILE_FUZZ_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(2000)
}

fn config() -> Config {
    Config { cases: cases(), max_shrink_iters: 2_000, ..Config::default() }
}

/// The seed corpus of `target`, in name order.
fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let seeds: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    seeds
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(Index, u8),
    Set(Index, u8),
    Insert(Index, u8),
    Remove(Index),
    Truncate(Index),
    /// Replaces the tail from a point with the tail of another seed.
    Splice(Index, Index, Index),
    /// Repeats a slice (length fields and repeated fields).
    Repeat(Index, u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        2 => any::<Index>().prop_map(Mutation::Remove),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        1 => (any::<Index>(), any::<Index>(), any::<Index>()).prop_map(|(a, s, b)| Mutation::Splice(a, s, b)),
        1 => (any::<Index>(), 1u8..16).prop_map(|(i, n)| Mutation::Repeat(i, n)),
    ]
}

fn apply(seeds: &[Vec<u8>], mut input: Vec<u8>, m: &Mutation) -> Vec<u8> {
    let at = |i: &Index, len: usize| if len == 0 { 0 } else { i.index(len) };
    match m {
        Mutation::Flip(i, bit) if !input.is_empty() => {
            let p = at(i, input.len());
            input[p] ^= 1 << bit;
        }
        Mutation::Set(i, b) if !input.is_empty() => {
            let p = at(i, input.len());
            input[p] = *b;
        }
        Mutation::Insert(i, b) => input.insert(at(i, input.len() + 1), *b),
        Mutation::Remove(i) if !input.is_empty() => {
            input.remove(at(i, input.len()));
        }
        Mutation::Truncate(i) => input.truncate(at(i, input.len() + 1)),
        Mutation::Splice(a, s, b) => {
            let other = &seeds[s.index(seeds.len())];
            input.truncate(at(a, input.len() + 1));
            input.extend_from_slice(&other[at(b, other.len() + 1)..]);
        }
        Mutation::Repeat(i, n) if !input.is_empty() => {
            let p = at(i, input.len());
            let end = (p + *n as usize).min(input.len());
            let slice = input[p..end].to_vec();
            input.splice(p..p, slice);
        }
        _ => {}
    }
    input.truncate(1 << 16);
    input
}

/// Inputs: a seed with up to eight mutations, or (one case in ten) bytes
/// from nowhere.
fn inputs(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let seeds = Arc::new(seeds);
    let n = seeds.len();
    prop_oneof![
        9 => (0..n, prop::collection::vec(mutation(), 0..8)).prop_map(move |(s, ms)| {
            ms.iter().fold(seeds[s].clone(), |input, m| apply(&seeds, input, m))
        }),
        1 => prop::collection::vec(any::<u8>(), 0..700),
    ]
}

/// One in-process app on the memory store with a real key, shared by the
/// targets that run the engine.
struct Fixture {
    rt: tokio::runtime::Runtime,
    app: App,
    key: String,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let app = App::build(EngineSettings::new(test_pepper()), Arc::new(MemoryStore::new()), Clock::system());
        let spec = keystile::admin::KeySpec {
            name: "fuzzed".into(),
            env: "live".into(),
            scopes: vec!["read".into()],
            ip_allowlist: vec!["10.0.0.0/8".into()],
            ..Default::default()
        };
        let key = rt.block_on(app.admin.create(spec, &Actor::deployment())).unwrap().key.expose().to_string();
        Fixture { rt, app, key }
    })
}

/// The key parser never panics; what it accepts is at most 512 bytes,
/// has the configured shape and a checksum that matches, and parses to the
/// same key_id again.
fn key_parser(input: &[u8]) -> Result<(), TestCaseError> {
    let text = String::from_utf8_lossy(input);
    let format = KeyFormat::default();
    if let Ok(key) = format.parse(&text) {
        prop_assert!(text.len() <= 512 + 64, "accepted {} bytes", text.len());
        let again = format.parse(&text).unwrap();
        prop_assert_eq!(again.key_id, key.key_id);
        // Every single-byte change of what was accepted is refused (the
        // checksum covers every byte before it).
        let trimmed = text.trim().trim_start_matches("Bearer ").trim();
        if let Some(last) = trimmed.len().checked_sub(1) {
            let mut damaged = trimmed.as_bytes().to_vec();
            damaged[last / 2] ^= 0x01;
            if let Ok(damaged) = String::from_utf8(damaged) {
                prop_assert!(format.parse(&damaged).is_err(), "a damaged key was accepted: {damaged:?}");
            }
        }
    }
    Ok(())
}

/// A Verify request as the gRPC front end receives it: read in place
/// (keystile's reader refuses exactly what prost refuses), converted at the
/// edge and run through the engine; the answer is a verdict (the memory
/// store cannot fail), and only the fuzzed key the fixture made can be
/// VALID.
fn verify_request(input: &[u8]) -> Result<(), TestCaseError> {
    use keystile::limit::named::MAX_REQUESTED;
    use keystile::service::verifier::MAX_SCOPES;
    let raw = keystile::service::verify_request::RawVerify(bytes::Bytes::copy_from_slice(input));
    let decoded = proto::VerifyRequest::decode(input);
    let Ok(req) = raw.view(MAX_SCOPES, MAX_REQUESTED) else {
        prop_assert!(decoded.is_err(), "prost decodes a request keystile refuses");
        return Ok(());
    };
    let Ok(decoded) = decoded else {
        return Err(TestCaseError::fail("keystile reads a request prost refuses"));
    };
    prop_assert_eq!(
        (req.key, req.ip, req.tenant, req.origin, req.cost, req.want_metadata),
        (
            &decoded.key[..],
            &decoded.ip[..],
            &decoded.tenant[..],
            &decoded.origin[..],
            decoded.cost,
            decoded.want_metadata
        )
    );
    fn kept(all: &[String], max: usize) -> Vec<&str> {
        all.iter().take(max + 1).map(String::as_str).collect()
    }
    prop_assert_eq!(req.scopes.to_vec(), kept(&decoded.scopes, MAX_SCOPES));
    prop_assert_eq!(req.limits.to_vec(), kept(&decoded.limits, MAX_REQUESTED));
    let Ok(request) = keystile::verdict::Request::try_from(&req) else { return Ok(()) };
    let f = fixture();
    let verdict = f.rt.block_on(f.app.engine.verify(&request));
    let verdict = verdict.map_err(|e| TestCaseError::fail(format!("the engine failed: {e}")))?;
    if verdict.outcome == Outcome::Valid {
        prop_assert!(req.key.contains(&f.key), "VALID for a key that is not the fixture's: {:?}", req.key);
    }
    let response = keystile::service::verifier::to_response(&verdict, 1_800_000_000);
    let _ = keystile::service::verifier::metadata_of(&verdict, 1_800_000_000);
    prop_assert!(response.encoded_len() < 8 << 10);
    // The answer the server writes is that message, byte for byte apart
    // from the order of map entries.
    let mut written = Vec::new();
    keystile::service::verify_answer::VerifyAnswer { verdict, now_unix: 1_800_000_000 }.write(&mut written);
    prop_assert_eq!(written.len(), response.encoded_len());
    prop_assert_eq!(proto::VerifyResponse::decode(&written[..]).unwrap(), response);
    Ok(())
}

/// An ext_authz CheckRequest: keystile reads it in place (its own
/// wire-level reader); whenever Envoy's own types decode the bytes, so
/// does keystile's reader, and both see the same method, path and host.
fn check_request(input: &[u8]) -> Result<(), TestCaseError> {
    let raw = keystile::service::ext_authz::wire::RawCheck(bytes::Bytes::copy_from_slice(input));
    let view = raw.view();
    if let Ok(envoy) = envoy_types::ext_authz::v3::pb::CheckRequest::decode(input) {
        let view = view.map_err(|e| TestCaseError::fail(format!("Envoy decodes it, keystile says {e}")))?;
        let http = envoy.attributes.and_then(|a| a.request).and_then(|r| r.http).unwrap_or_default();
        // The last occurrence of a field wins in protobuf; keystile's view
        // keeps the last one too.
        prop_assert_eq!(view.method, http.method.as_bytes());
        prop_assert_eq!(view.path, http.path.as_bytes());
        prop_assert_eq!(view.host, http.host.as_bytes());
    }
    Ok(())
}

/// A CreateKey request through the admin API's validation: it is created
/// or refused with every problem named, never a store error or a panic;
/// what is created parses as a key.
fn admin_create(input: &[u8]) -> Result<(), TestCaseError> {
    let Ok(req) = proto::CreateKeyRequest::decode(input) else { return Ok(()) };
    let Ok(spec) = keystile::admin::KeySpec::try_from(req) else { return Ok(()) };
    let f = fixture();
    match f.rt.block_on(f.app.admin.create(spec, &Actor::deployment())) {
        Ok(minted) => {
            let format = KeyFormat::default();
            prop_assert!(format.parse(minted.key.expose()).is_ok(), "minted {:?}", minted.record.prefix);
        }
        Err(keystile::admin::AdminError::Invalid(problems)) => {
            prop_assert!(!problems.is_empty() && problems.iter().all(|p| !p.is_empty()));
        }
        Err(keystile::admin::AdminError::PermissionDenied(_)) => {}
        Err(other) => return Err(TestCaseError::fail(format!("refused as {other:?}"))),
    }
    Ok(())
}

/// The corpus and a request with the fixture's own key (random per run,
/// so not on disk): mutations of it reach every check after the lookup.
fn verify_seeds() -> Vec<Vec<u8>> {
    let mut seeds = corpus("verify_request");
    let f = fixture();
    let valid = proto::VerifyRequest {
        key: f.key.clone(),
        ip: "10.1.2.3".into(),
        scopes: vec!["read".into()],
        ..Default::default()
    };
    seeds.push(valid.encode_to_vec());
    seeds
}

/// Every seed alone first: the corpus itself must pass.
#[test]
fn the_seed_corpora_pass() {
    for (target, run) in [
        ("key_parser", key_parser as fn(&[u8]) -> Result<(), TestCaseError>),
        ("verify_request", verify_request),
        ("check_request", check_request),
        ("admin_create", admin_create),
    ] {
        for seed in corpus(target) {
            run(&seed).unwrap_or_else(|e| panic!("{target}: seed {seed:?}: {e}"));
        }
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fuzz_key_parser(input in inputs(corpus("key_parser"))) {
        key_parser(&input)?;
    }

    #[test]
    fn fuzz_verify_request(input in inputs(verify_seeds())) {
        verify_request(&input)?;
    }

    #[test]
    fn fuzz_check_request(input in inputs(corpus("check_request"))) {
        check_request(&input)?;
    }

    #[test]
    fn fuzz_admin_create(input in inputs(corpus("admin_create"))) {
        admin_create(&input)?;
    }
}

/// Writes the seed corpus (run once when the request types change):
/// `cargo test --test fuzz -- --ignored write_seed_corpus`.
#[test]
#[ignore]
fn write_seed_corpus() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let write = |target: &str, name: &str, bytes: &[u8]| {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    };
    let format = KeyFormat::default();
    let live = keystile::key::generate(&format, keystile::key::Env::Live).key.into_exposed();
    let test = keystile::key::generate(&format, keystile::key::Env::Test).key.into_exposed();
    for (name, key) in [
        ("live", live.clone()),
        ("test", test.clone()),
        ("bearer", format!("Bearer {live}")),
        ("spaces", format!("  {test}\n")),
        ("short", live[..20].to_string()),
        ("prefix-only", "ks_live_".to_string()),
        ("jwt", "eyJhbGciOiJFZERTQSIsImtpZCI6ImsxIn0.eyJzdWIiOiJ4In0.c2ln".to_string()),
    ] {
        write("key_parser", name, key.as_bytes());
    }
    let verify = |key: &str| proto::VerifyRequest {
        key: key.into(),
        ip: "10.1.2.3".into(),
        scopes: vec!["read".into(), "write:*".into()],
        tenant: "acme".into(),
        origin: "https://app.example.com".into(),
        limits: vec!["analytics".into()],
        cost: Some(3),
        want_metadata: true,
    };
    write("verify_request", "full", &verify(&live).encode_to_vec());
    write("verify_request", "bare", &proto::VerifyRequest { key: test.clone(), ..Default::default() }.encode_to_vec());
    write(
        "verify_request",
        "ipv6-port",
        &proto::VerifyRequest { ip: "[2001:db8::1]:443".into(), ..verify(&live) }.encode_to_vec(),
    );

    use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, attribute_context};
    let check = |headers: Vec<(&str, &str)>, path: &str| envoy_types::ext_authz::v3::pb::CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(attribute_context::Request {
                http: Some(attribute_context::HttpRequest {
                    method: "POST".into(),
                    path: path.into(),
                    host: "acme.api.example.com".into(),
                    headers: headers.into_iter().map(|(k, v)| (k.into(), v.into())).collect(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            context_extensions: [("keystile.scopes".to_string(), "api:read".to_string())].into(),
            ..Default::default()
        }),
    };
    let bearer = format!("Bearer {live}");
    write("check_request", "bearer", &check(vec![("authorization", &bearer)], "/v1/export?x=1").encode_to_vec());
    write("check_request", "x-api-key", &check(vec![("x-api-key", &test), ("x-other", "1")], "/v1/").encode_to_vec());
    write("check_request", "empty", &check(vec![], "").encode_to_vec());

    let create = |kind: i32| proto::CreateKeyRequest {
        name: "seed".into(),
        env: "live".into(),
        tenant: "acme".into(),
        scopes: vec!["read".into(), "public:read".into()],
        ip_allowlist: vec!["10.0.0.0/8".into(), "2001:db8::/32".into()],
        rate_limit: Some(proto::RateLimit { requests: 100, window_seconds: 60, burst: 10, per_tenant: false }),
        metadata: [("team".to_string(), "billing".to_string())].into(),
        owner: "a@example.com".into(),
        kind,
        ..Default::default()
    };
    write("admin_create", "secret", &create(0).encode_to_vec());
    write(
        "admin_create",
        "publishable",
        &proto::CreateKeyRequest {
            allowed_origins: vec!["https://*.example.com".into()],
            scopes: vec!["public:read".into()],
            ip_allowlist: vec![],
            ..create(1)
        }
        .encode_to_vec(),
    );
    write("admin_create", "restricted", &create(2).encode_to_vec());
    write("admin_create", "empty", &proto::CreateKeyRequest::default().encode_to_vec());
}
