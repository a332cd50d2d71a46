//! Memory per cached key (README, "Performance").
//!
//! Fills a memory store with N keys, then verifies each once so that it is
//! cached, and reports the growth of RSS between the two (the store's own
//! copy is already counted before). `cargo bench --bench footprint [N ...]`
//!
//! With `FOOTPRINT_EXT_AUTHZ=1`, as under `--ext-authz`: each key is also
//! written into an ext_authz allow once, which encodes the parts the cache
//! keeps for it, and the cache weighs them (README, "Memory budget").

use std::sync::Arc;

use keystile::app::App;
use keystile::clock::Clock;
use keystile::engine::EngineSettings;
use keystile::key::{Env, KeyFormat, Pepper, PepperSet, generate};
use keystile::proxy::{Allow, Decision};
use keystile::service::ext_authz::CheckAnswer;
use keystile::store::memory::MemoryStore;
use keystile::store::{KeyRecord, KeyStore};
use keystile::verdict::{Outcome, Request, Verdict, Words};

/// The binary's allocator (`src/main.rs`), so that the figures are its.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn main() {
    let sizes: Vec<usize> =
        std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect::<Vec<_>>().into_iter().collect();
    let sizes = if sizes.is_empty() { vec![1_000, 100_000, 1_000_000] } else { sizes };
    let ext_authz = std::env::var("FOOTPRINT_EXT_AUTHZ").is_ok_and(|v| v == "1");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    println!(
        "{:>10} {:>14} {:>14} {:>16} {:>16}",
        "keys", "rss before", "rss cached", "bytes per key", "weighed per key"
    );
    for n in sizes {
        let peppers = PepperSet::single(Pepper::parse(&[9u8; 32]).unwrap());
        let format = KeyFormat::default();
        let store = Arc::new(MemoryStore::new());
        let mut keys = Vec::with_capacity(n);
        rt.block_on(async {
            for i in 0..n {
                let new = generate(&format, Env::Live);
                let secret = format.parse(new.key.expose()).unwrap().secret().to_vec();
                let record = KeyRecord {
                    key_id: new.key_id,
                    prefix: "ks".into(),
                    secret_hash: peppers.seal(new.key_id, &secret),
                    name: format!("service {i}").into(),
                    env: Env::Live,
                    tenant: "acme".into(),
                    scopes: vec!["read".into(), "write".into()],
                    ip_allowlist: vec![],
                    rate_limit: None,
                    limits: Vec::new(),
                    metadata: Default::default(),
                    owner: String::new(),
                    disabled: false,
                    exchange_only: false,
                    kind: Default::default(),
                    allowed_origins: Vec::new(),
                    usage: Vec::new(),
                    tiers: Vec::new(),
                    created_at: 1_800_000_000,
                    expires_at: None,
                    revoked_at: None,
                    last_used_at: None,
                    version: 1,
                };
                store.create(&record).await.unwrap();
                keys.push(new.key.into_exposed());
            }
        });
        let mut settings = EngineSettings::new(peppers);
        settings.cache.max_entries = n as u64 * 1000;
        settings.cache.max_bytes = (n as u64 * 4096).max(1 << 20);
        settings.cache.encoded_answers = ext_authz;
        let app = App::build(settings, store.clone(), Clock::system());
        let engine = app.engine.clone();
        let before = rss_kib();
        rt.block_on(async {
            // A scope the keys lack: each key is looked up and cached, and
            // nothing else (no last-used entry) is kept for it.
            let scopes = ["not-granted".to_string()];
            let mut answer = Vec::with_capacity(1024);
            for key in &keys {
                let v =
                    engine.verify(&Request { scopes: Words::Owned(&scopes), ..Request::of_key(key) }).await.unwrap();
                assert_eq!(v.outcome, Outcome::InsufficientScope);
                if ext_authz {
                    let mut verdict = Verdict::bare(Outcome::Valid);
                    verdict.key = v.key;
                    let allow = Allow { verdict, remove_upstream: Default::default(), remove_query: Vec::new() };
                    CheckAnswer(Decision::Allow(allow)).write(&mut answer);
                    answer.clear();
                }
            }
        });
        let cached = app.records.cache().len();
        let weighed = app.records.cache().weighed_bytes();
        let after = rss_kib();
        println!(
            "{:>10} {:>11} KiB {:>11} KiB {:>16.0} {:>16.0}",
            cached,
            before,
            after,
            (after.saturating_sub(before) * 1024) as f64 / n as f64,
            weighed as f64 / cached.max(1) as f64
        );
        drop((engine, app));
        drop(store);
    }
}
