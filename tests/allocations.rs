//! What a cached call allocates (README, "Performance"): nothing of its
//! own. A Verify read in place from its request's bytes, decided by the
//! engine and written as its answer, and an ext_authz Check read, decided
//! and written (for a key, a token and a key with tiers), are counted by an
//! allocator that counts each thread's allocations. The transport's own
//! (h2's frames, the answer's one buffer) are not part of this.
//!
//! The caches' housekeeping, which runs once every few dozen reads, hands
//! its epoch garbage on with one allocation: about one per 125 reads of a
//! cache (a token's call reads two, its own and its key's). The bound
//! below allows that and nothing per call.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use envoy_types::ext_authz::v3::pb::CheckRequest;
use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address};
use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request as AttrRequest};
use keystile::admin::{Actor, KeySpec};
use keystile::app::App;
use keystile::clock::Clock;
use keystile::engine::EngineSettings;
use keystile::key::{Pepper, PepperSet};
use keystile::limit::RateLimitPolicy;
use keystile::limit::named::MAX_REQUESTED;
use keystile::proto;
use keystile::service::ext_authz::{ExtAuthzService, wire::RawCheck};
use keystile::service::verifier::MAX_SCOPES;
use keystile::service::verify_answer::VerifyAnswer;
use keystile::service::verify_request::RawVerify;
use keystile::store::memory::MemoryStore;
use prost::Message;
use prost::bytes::Bytes;

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count() {
    let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// This thread's allocations while `f` runs.
fn allocations_of(f: impl FnOnce()) -> u64 {
    let before = ALLOCATIONS.with(Cell::get);
    f();
    ALLOCATIONS.with(Cell::get) - before
}

/// A future that must be ready at once (a cache hit waits for nothing),
/// polled here so that no other task of the runtime runs meanwhile.
fn ready<F: Future>(f: F) -> F::Output {
    match std::pin::pin!(f).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("a cached call waited"),
    }
}

fn check_request(credential: &str) -> Bytes {
    let headers = [
        (":authority", "api.example.com".to_string()),
        (":method", "GET".into()),
        (":path", "/v1/users?page=2".into()),
        ("accept", "application/json".into()),
        ("authorization", format!("Bearer {credential}")),
        ("user-agent", "example-client/2.3.1".into()),
        ("x-request-id", "7d3c1f0e-9b2a-4c55-8e31-2f6a0b9d4e17".into()),
        ("x-keystile-tenant", "forged".into()),
    ];
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(Peer {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: "10.1.2.3".into(),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            }),
            request: Some(AttrRequest {
                http: Some(HttpRequest {
                    method: "GET".into(),
                    headers: headers.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
                    path: "/v1/users?page=2".into(),
                    host: "api.example.com".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
    .encode_to_vec()
    .into()
}

const CALLS: u64 = 2_000;

/// The caches' housekeeping, amortised: fewer than one per fifty calls.
const AT_MOST: u64 = CALLS / 50;

#[test]
fn cached_calls_allocate_nothing() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let _entered = rt.enter();
    let settings = EngineSettings::new(PepperSet::single(Pepper::parse(&[7u8; 32]).unwrap()));
    let app = App::build(settings, Arc::new(MemoryStore::new()), Clock::system());
    let deployment = Actor::deployment();
    let create = |spec: KeySpec| rt.block_on(app.admin.create(spec, &deployment)).unwrap().key.expose().to_string();
    // The realistic profile: scopes, an allowlist, a rate limit.
    let key = create(KeySpec {
        name: "realistic".into(),
        env: "live".into(),
        scopes: vec!["read".into(), "write".into(), "token:exchange".into()],
        ip_allowlist: vec!["10.0.0.0/8".into(), "192.168.0.0/16".into()],
        rate_limit: Some(RateLimitPolicy { requests: 1_000_000_000, window_seconds: 1, burst: 0, per_tenant: false }),
        ..Default::default()
    });
    rt.block_on(app.admin.set_tier("acme", "pro", vec!["export:data".into()], &deployment)).unwrap();
    let tiered = create(KeySpec {
        name: "tiered".into(),
        env: "live".into(),
        tenant: "acme".into(),
        scopes: vec!["read".into()],
        tiers: vec!["pro".into()],
        ..Default::default()
    });
    let tokens = app.tokens.clone().expect("tokens are on");
    let exchange = keystile::token::exchange::ExchangeRequest {
        secret: &key,
        email: "",
        scopes: &[],
        ttl_seconds: 0,
        peer: Some("10.1.2.3".parse().unwrap()),
    };
    let token = rt.block_on(keystile::token::exchange::exchange(&app.auth, &tokens, &exchange)).unwrap();
    let token = token.token.expose().to_string();

    // Verify: the request's bytes, read in place, to the answer's bytes.
    let verify = Bytes::from(
        proto::VerifyRequest {
            key: key.clone(),
            ip: "10.1.2.3".into(),
            scopes: vec!["read".into(), "write".into()],
            ..Default::default()
        }
        .encode_to_vec(),
    );
    let mut out = Vec::with_capacity(4096);
    let mut one_verify = || {
        let raw = RawVerify(verify.clone());
        let view = raw.view(MAX_SCOPES, MAX_REQUESTED).unwrap();
        let request = keystile::verdict::Request::try_from(&view).unwrap();
        let verdict = ready(app.engine.verify(&request)).unwrap();
        assert!(verdict.is_valid(), "{:?}", verdict.outcome);
        let now_unix = verdict.decided_at;
        out.clear();
        VerifyAnswer { verdict, now_unix }.write(&mut out);
    };
    for _ in 0..100 {
        one_verify();
    }
    let n = allocations_of(|| (0..CALLS).for_each(|_| one_verify()));
    assert!(n <= AT_MOST, "{n} allocations in {CALLS} cached Verify calls");
    eprintln!("Verify: {n} allocations in {CALLS} cached calls");

    // ext_authz Check, for each kind of allow.
    let service = ExtAuthzService::new(app.gate.clone());
    for (what, credential) in [("a key", &key), ("a token", &token), ("a key with tiers", &tiered)] {
        let check = check_request(credential);
        let mut one_check = || {
            let answer = ready(service.check(RawCheck(check.clone()))).unwrap();
            assert!(matches!(answer.0, keystile::proxy::Decision::Allow(_)), "{what}: {:?}", answer.0);
            out.clear();
            answer.write(&mut out);
        };
        for _ in 0..100 {
            one_check();
        }
        let n = allocations_of(|| (0..CALLS).for_each(|_| one_check()));
        assert!(n <= AT_MOST, "{n} allocations in {CALLS} cached Checks of {what}");
        eprintln!("{what}: {n} allocations in {CALLS} cached Checks");
    }
}
