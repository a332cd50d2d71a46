//! In-process costs of an ext_authz Check (README, "Protect an API without
//! code"): decoding Envoy's CheckRequest, the whole service call (decode
//! excluded: gate, engine, answer), and encoding the answer, beside a
//! cached Verify of the same key.
//!
//! `cargo bench --bench ext_authz`

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use envoy_types::ext_authz::v3::pb::CheckRequest;
use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address, socket_address};
use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request as AttrRequest};
use keystile::admin::{Actor, KeySpec};
use keystile::app::App;
use keystile::clock::Clock;
use keystile::engine::EngineSettings;
use keystile::key::{Pepper, PepperSet};
use keystile::service::ext_authz::{ExtAuthzService, wire};
use keystile::store::memory::MemoryStore;
use keystile::verdict::{Request, Words};
use prost::Message;

/// The binary's allocator (`src/main.rs`), so that the figures are its.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn check_request(key: &str) -> CheckRequest {
    let headers = [
        (":authority", "api.example.com".to_string()),
        (":method", "GET".into()),
        (":path", "/v1/users?page=2".into()),
        (":scheme", "https".into()),
        ("accept", "application/json".into()),
        ("accept-encoding", "gzip, deflate, br".into()),
        ("authorization", format!("Bearer {key}")),
        ("user-agent", "example-client/2.3.1 (linux; x86_64)".into()),
        ("x-forwarded-proto", "https".into()),
        ("x-request-id", "7d3c1f0e-9b2a-4c55-8e31-2f6a0b9d4e17".into()),
        ("x-envoy-expected-rq-timeout-ms", "15000".into()),
        ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
    ];
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(Peer {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: "203.0.113.9".into(),
                        port_specifier: Some(socket_address::PortSpecifier::PortValue(41000)),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            }),
            request: Some(AttrRequest {
                http: Some(HttpRequest {
                    id: "7d3c1f0e-9b2a-4c55-8e31-2f6a0b9d4e17".into(),
                    method: "GET".into(),
                    headers: headers.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
                    path: "/v1/users?page=2".into(),
                    host: "api.example.com".into(),
                    scheme: "https".into(),
                    protocol: "HTTP/2".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let settings = EngineSettings::new(PepperSet::single(Pepper::parse(&[7u8; 32]).unwrap()));
    let app = App::build(settings, Arc::new(MemoryStore::new()), Clock::system());
    let spec =
        KeySpec { name: "bench".into(), env: "live".into(), scopes: vec!["api:read".into()], ..Default::default() };
    let key = rt.block_on(app.admin.create(spec, &Actor::deployment())).unwrap().key.expose().to_string();
    let scopes = vec!["api:read".to_string()];
    let verify =
        Request { ip: Some("203.0.113.9".parse().unwrap()), scopes: Words::Owned(&scopes), ..Request::of_key(&key) };
    assert!(rt.block_on(app.engine.verify(&verify)).unwrap().is_valid());
    c.bench_function("ext_authz_verify_same_key", |b| {
        b.to_async(&rt).iter(|| async { app.engine.verify(black_box(&verify)).await.unwrap().is_valid() })
    });

    let encoded = prost::bytes::Bytes::from(check_request(&key).encode_to_vec());
    // Envoy's own type, for comparison: what keystile does not decode into.
    c.bench_function("ext_authz_decode_envoy_check_request", |b| {
        b.iter(|| CheckRequest::decode(black_box(encoded.clone())).unwrap())
    });
    c.bench_function("ext_authz_read_check_request_in_place", |b| {
        b.iter(|| wire::RawCheck(black_box(encoded.clone())).view().unwrap().headers.len())
    });
    let service = ExtAuthzService::new(app.gate.clone());
    let answer = rt.block_on(service.check(wire::RawCheck(encoded.clone()))).unwrap();
    assert!(matches!(answer.0, keystile::proxy::Decision::Allow(_)), "allowed: {:?}", answer.0);
    // Decode, gate, engine and answer: all of a Check but the transport.
    c.bench_function("ext_authz_check_call", |b| {
        b.to_async(&rt).iter(|| async { service.check(wire::RawCheck(black_box(encoded.clone()))).await.unwrap() })
    });
    // Envoy's message built and encoded, for comparison: what keystile
    // writes instead.
    c.bench_function("ext_authz_encode_check_response", |b| {
        b.iter(|| keystile::service::ext_authz::answer::to_check_response(black_box(answer.0.clone())).encode_to_vec())
    });
    c.bench_function("ext_authz_write_check_answer", |b| {
        b.iter(|| {
            let mut buf = Vec::with_capacity(512);
            black_box(&answer).write(&mut buf);
            buf.len()
        })
    });
}

criterion_group!(benches_group, benches);
criterion_main!(benches_group);
