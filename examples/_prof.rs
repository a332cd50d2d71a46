use keystile::admin::{Actor, KeySpec};
use keystile::app::App;
use keystile::clock::Clock;
use keystile::engine::EngineSettings;
use keystile::key::{Pepper, PepperSet};
use keystile::store::RateLimitPolicy;
use keystile::store::memory::MemoryStore;
use keystile::verdict::{Request, Words};
use std::sync::Arc;
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
fn main() {
    let n: usize = std::env::args().nth(1).map(|s| s.parse().unwrap()).unwrap_or(1000);
    let limited = std::env::args().nth(2).is_none();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let store = Arc::new(MemoryStore::new());
    let settings = EngineSettings::new(PepperSet::single(Pepper::parse(&[7u8; 32]).unwrap()));
    let app = App::build(settings, store, Clock::system());
    let (engine, admin) = (app.engine.clone(), app.admin.clone());
    let minted = rt.block_on(admin.create(
        KeySpec {
            name: "bench".into(),
            env: "live".into(),
            scopes: vec!["read".into(), "write".into()],
            ip_allowlist: vec!["10.0.0.0/8".into(), "192.168.0.0/16".into()],
            rate_limit: limited.then_some(RateLimitPolicy {
                requests: 1_000_000_000,
                window_seconds: 1,
                burst: 0,
                per_tenant: false,
            }),
            ..Default::default()
        },
        &Actor::deployment(),
    ));
    let key = minted.unwrap().key.expose().to_string();
    let scopes = vec!["read".to_string()];
    let hit = Request { ip: Some("10.1.2.3".parse().unwrap()), scopes: Words::Owned(&scopes), ..Request::of_key(&key) };
    rt.block_on(async {
        for _ in 0..n {
            assert!(engine.verify(std::hint::black_box(&hit)).await.unwrap().is_valid());
        }
    });
}
