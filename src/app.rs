//! The one place an engine is wired: [`App::build`] turns settings, a store
//! and a clock into every part the front ends use. `main`, the load
//! generator, `keys bootstrap`, the integration tests and the benches all
//! build through it, so a new part is wired once.

use std::sync::Arc;

use crate::admin::{ADMIN_SCOPE, Actor, Admin, AdminError, KeySpec, Minted};
use crate::auth::Authenticator;
use crate::clock::Clock;
use crate::engine::source::RecordSource;
use crate::engine::usage::UsageBatcher;
use crate::engine::{Engine, EngineSettings};
use crate::key::Env;
use crate::limit::Limiter;
use crate::limit::fleet::FleetLimiter;
use crate::limit::local::LocalLimiter;
use crate::metrics::Metrics;
use crate::store::KeyStore;
use crate::token::Tokens;

/// Everything a running sidecar is made of.
pub struct App {
    pub settings: EngineSettings,
    pub clock: Clock,
    pub metrics: Metrics,
    pub store: Arc<dyn KeyStore>,
    /// Cache, single flight and outage breaker in front of `store`.
    pub records: Arc<RecordSource>,
    pub limiter: Arc<dyn Limiter>,
    /// Tokens exchanged for keys; `None` when switched off.
    pub tokens: Option<Arc<Tokens>>,
    pub usage: Arc<UsageBatcher>,
    /// The Verify pipeline.
    pub engine: Arc<Engine>,
    /// Credentials presented to KeyAdmin (and future front ends).
    pub auth: Arc<Authenticator>,
    /// Key lifecycle.
    pub admin: Arc<Admin>,
    /// The proxy front ends' engine (ext_authz, forward-auth).
    pub gate: Arc<crate::proxy::Gate>,
}

impl App {
    pub fn build(settings: EngineSettings, store: Arc<dyn KeyStore>, clock: Clock) -> App {
        let metrics = Metrics::new();
        let records = Arc::new(RecordSource::new(
            store.clone(),
            settings.cache,
            settings.store_timeout,
            metrics.clone(),
            clock.clone(),
        ));
        // Fleet-wide when the store can share buckets (README, "Rate limits").
        let limiter: Arc<dyn Limiter> = match (settings.fleet, store.shared_buckets()) {
            (Some(fleet), Some(shared)) => FleetLimiter::start(shared, fleet, clock.clone()),
            _ => Arc::new(LocalLimiter::new(clock.clone())),
        };
        let usage = Arc::new(UsageBatcher::new(store.clone(), metrics.clone(), clock.clone()));
        let tokens = settings.tokens.clone().map(|t| {
            Arc::new(
                Tokens::new(t, settings.peppers.clone(), store.clone(), clock.clone())
                    .expect("signing key files are checked by the configuration"),
            )
        });
        let engine = Arc::new(Engine::new(
            &settings,
            records.clone(),
            limiter.clone(),
            tokens.clone(),
            usage.clone(),
            metrics.clone(),
            clock.clone(),
        ));
        let auth = Arc::new(Authenticator::new(
            engine.clone(),
            settings.failed_attempts_per_minute,
            settings.allow_star_scope,
            clock.clone(),
        ));
        let admin = Arc::new(Admin::new(store.clone(), records.clone(), limiter.clone(), &settings, clock.clone()));
        let gate = Arc::new(crate::proxy::Gate::new(engine.clone(), settings.proxy.clone()));
        App { settings, clock, metrics, store, records, limiter, tokens, usage, engine, auth, admin, gate }
    }

    /// Mints a key with the admin scope (the dev key, `keys bootstrap`, the
    /// load generator and tests), in `live` where the deployment accepts it.
    pub async fn mint_admin_key(&self, name: &str) -> Result<Minted, AdminError> {
        let env = if self.settings.format.accepts_env(Env::Live) { Env::Live } else { Env::Test };
        let spec =
            KeySpec { name: name.into(), env: env.to_string(), scopes: vec![ADMIN_SCOPE.into()], ..Default::default() };
        self.admin.create(spec, &Actor::deployment()).await
    }

    /// Periodic housekeeping: forget addresses that stopped failing and
    /// buckets that are whole again.
    pub fn purge(&self) {
        self.engine.purge();
        self.auth.purge();
        self.limiter.purge();
    }
}
