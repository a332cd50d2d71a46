//! The sidecar's gRPC port, composed from a list of front ends (README,
//! "Health"; docs/architecture.md, "Adding a front end"): grpc.health.v1
//! and server reflection (v1 and v1alpha) always, then every enabled
//! [`FrontEnd`]. Every service is capped at
//! [`service::MAX_REQUEST_BYTES`](crate::service::MAX_REQUEST_BYTES) and runs
//! inside the same RPC span layer. Background tasks keep the cache honest
//! (change feed), the store informed (last-used batches) and memory bounded
//! (purges). Shutdown is passed in as a future.
//!
//! Health: the empty service name and `keystile.v1.Verifier` report
//! readiness (SERVING once the store answers and the change feed is live,
//! NOT_SERVING when the feed has been down longer than the stale window, and
//! from the moment shutdown begins); `liveness` stays SERVING while the
//! process runs.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use tonic::service::{Routes, RoutesBuilder};
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::app::App;
use crate::proto;
use crate::service::MAX_REQUEST_BYTES;
use crate::service::admin::AdminService;
use crate::service::exchange::ExchangeService;
use crate::service::fairness::Fairness;
use crate::service::load::{ConnectionGate, InflightCap};
use crate::service::verifier::VerifierService;
use crate::store::FeedEvent;

/// Service names reported by grpc.health.v1 as readiness: the empty name
/// always, and each front end's own service name.
fn readiness(front_ends: &[FrontEnd]) -> Vec<&'static str> {
    std::iter::once("").chain(front_ends.iter().filter_map(|f| f.health_name())).collect()
}
pub const LIVENESS: &str = "liveness";

/// A set of gRPC services served on the shared port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrontEnd {
    /// `keystile.v1.Verifier`.
    Verifier,
    /// `keystile.v1.KeyAdmin`.
    KeyAdmin,
    /// `keystile.v1.TokenExchange` (when tokens are on).
    TokenExchange,
    /// `envoy.service.auth.v3.Authorization` (`--ext-authz`).
    ExtAuthz,
}

impl FrontEnd {
    /// Its gRPC service name.
    fn service_name(self) -> &'static str {
        match self {
            FrontEnd::Verifier => "keystile.v1.Verifier",
            FrontEnd::KeyAdmin => "keystile.v1.KeyAdmin",
            FrontEnd::TokenExchange => "keystile.v1.TokenExchange",
            FrontEnd::ExtAuthz => "envoy.service.auth.v3.Authorization",
        }
    }

    /// The name its readiness is reported under, if any.
    fn health_name(self) -> Option<&'static str> {
        match self {
            FrontEnd::Verifier => Some("keystile.v1.Verifier"),
            FrontEnd::ExtAuthz => Some("envoy.service.auth.v3.Authorization"),
            FrontEnd::KeyAdmin | FrontEnd::TokenExchange => None,
        }
    }
}

/// TLS on the gRPC port: PEM certificate chain and key, and for mutual TLS
/// the CA that client certificates must chain to.
#[derive(Clone)]
pub struct ServerTls {
    pub cert: Vec<u8>,
    pub key: crate::secret::Secret,
    pub client_ca: Option<Vec<u8>>,
}

impl ServerTls {
    /// The rustls settings, parsed and checked (a bad certificate or key
    /// fails here, so configuration checks can call it before binding).
    pub fn check(&self) -> Result<tonic::transport::ServerTlsConfig, tonic::transport::Error> {
        let identity = tonic::transport::Identity::from_pem(&self.cert, self.key.expose());
        let mut config = tonic::transport::ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.client_ca {
            config = config.client_ca_root(tonic::transport::Certificate::from_pem(ca));
        }
        tonic::transport::Server::builder().tls_config(config.clone())?;
        Ok(config)
    }
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").field("key", &self.key).field("mutual", &self.client_ca.is_some()).finish()
    }
}

/// How the process schedules calls on its worker threads (README,
/// "Runtime").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeKind {
    /// A current-thread runtime per worker, connections dealt round-robin
    /// ([`ServerOptions::cores`]): a connection's calls and its writes stay
    /// on one core, and answers finished together go out in one write.
    PerCore,
    /// One tokio runtime whose workers steal each other's calls.
    WorkStealing,
}

#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The front ends to serve, besides health and reflection.
    pub front_ends: Vec<FrontEnd>,
    /// HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// A connection nothing has been read from for this long is closed
    /// (README, "Limits"); `None` = never.
    pub idle_timeout: Option<Duration>,
    /// Connections open at once; more are closed when accepted.
    pub max_connections: usize,
    /// Calls in progress in the whole process; more get RESOURCE_EXHAUSTED.
    pub max_inflight: usize,
    /// Longest a call may take before it is cancelled.
    pub request_timeout: Duration,
    /// Calls in progress per connection beyond which new ones are shed
    /// with RESOURCE_EXHAUSTED.
    pub max_inflight_per_connection: usize,
    /// How long in-flight calls may take to finish after shutdown begins.
    pub shutdown_grace: Duration,
    /// How often pending last-used timestamps are written.
    pub last_used_flush: Duration,
    /// Counts the write calls made on accepted connections (each one a
    /// write syscall): the regression check of the h2 write cliff (README,
    /// "Performance"). `None` in production.
    pub writes: Option<Arc<std::sync::atomic::AtomicU64>>,
    /// TLS; `None` = plaintext.
    pub tls: Option<ServerTls>,
    /// Largest ext_authz CheckRequest (it carries every header).
    pub ext_authz_max_request_bytes: usize,
    /// When connections over their share of queued calls stop being read
    /// (README, "Limits").
    pub fairness: crate::service::fairness::FairnessSettings,
    /// Runtimes serving gRPC connections (README, "Runtime"): 1 serves on
    /// the caller's runtime; more add a thread with a current-thread
    /// runtime per extra core, and accepted connections are dealt
    /// round-robin.
    pub cores: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            front_ends: vec![FrontEnd::Verifier, FrontEnd::KeyAdmin, FrontEnd::TokenExchange],
            max_concurrent_streams: 100,
            idle_timeout: Some(Duration::from_secs(90)),
            max_connections: 1024,
            max_inflight: 4096,
            request_timeout: Duration::from_secs(30),
            max_inflight_per_connection: 100,
            shutdown_grace: Duration::from_secs(10),
            last_used_flush: Duration::from_secs(10),
            writes: None,
            tls: None,
            ext_authz_max_request_bytes: crate::service::ext_authz::DEFAULT_MAX_CHECK_BYTES,
            fairness: Default::default(),
            cores: 1,
        }
    }
}

/// Health, reflection and every front end in `front_ends`, each capped at
/// [`MAX_REQUEST_BYTES`].
fn routes(
    app: &App,
    front_ends: &[FrontEnd],
    ext_authz_max_request_bytes: usize,
    health: tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
) -> Routes {
    // Reflection lists what this port serves, and nothing it does not.
    let reflection = || {
        let mut builder = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("grpc.health.v1.Health")
            .with_service_name("grpc.reflection.v1.ServerReflection")
            .with_service_name("grpc.reflection.v1alpha.ServerReflection");
        // Envoy's descriptors are not embedded: ext_authz is not listed.
        for front_end in front_ends.iter().filter(|f| **f != FrontEnd::ExtAuthz) {
            if *front_end != FrontEnd::TokenExchange || app.tokens.is_some() {
                builder = builder.with_service_name(front_end.service_name());
            }
        }
        builder
    };
    let mut routes = RoutesBuilder::default();
    routes
        .add_service(health.max_decoding_message_size(MAX_REQUEST_BYTES))
        .add_service(
            reflection()
                .build_v1()
                .expect("the embedded descriptors are valid")
                .max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .add_service(
            reflection()
                .build_v1alpha()
                .expect("the embedded descriptors are valid")
                .max_decoding_message_size(MAX_REQUEST_BYTES),
        );
    for front_end in front_ends {
        match front_end {
            FrontEnd::Verifier => {
                routes.add_service(VerifierService::new(app.engine.clone()).into_server());
            }
            FrontEnd::KeyAdmin => {
                routes.add_service(
                    AdminService::new(app.admin.clone(), app.auth.clone(), app.clock.clone()).into_server(),
                );
            }
            FrontEnd::TokenExchange => {
                if let Some(tokens) = &app.tokens {
                    routes.add_service(ExchangeService::new(app.auth.clone(), tokens.clone()).into_server());
                }
            }
            FrontEnd::ExtAuthz => {
                routes.add_service(
                    crate::service::ext_authz::ExtAuthzService::new(app.gate.clone())
                        .into_server(ext_authz_max_request_bytes),
                );
            }
        }
    }
    routes.routes()
}

/// Serves on `listener` until `shutdown` completes, then drains.
pub async fn serve(
    app: Arc<App>,
    options: ServerOptions,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let health = HealthReporter::new();
    let readiness = readiness(&options.front_ends);
    for &name in &readiness {
        health.set_service_status(name, ServingStatus::NotServing).await;
    }
    health.set_service_status(LIVENESS, ServingStatus::Serving).await;

    let stop = CancellationToken::new();
    let tasks = CancellationToken::new();
    tokio::spawn(follow_feed(app.clone(), health.clone(), readiness.clone(), stop.clone(), tasks.clone()));
    tokio::spawn(flush_usage(app.clone(), options.last_used_flush, tasks.clone()));
    tokio::spawn(purge(app.clone(), tasks.clone()));
    tokio::spawn(reload_signing_keys(app.clone(), tasks.clone()));
    let stopped_at = Arc::new(std::sync::OnceLock::new());
    {
        let (stop, health, readiness) = (stop.clone(), health.clone(), readiness.clone());
        let stopped_at = stopped_at.clone();
        tokio::spawn(async move {
            shutdown.await;
            let _ = stopped_at.set(tokio::time::Instant::now());
            for &name in &readiness {
                health.set_service_status(name, ServingStatus::NotServing).await;
            }
            tracing::info!("shutting down: readiness is NOT_SERVING, draining in-flight calls");
            stop.cancel();
        });
    }

    let shared = Shared {
        gate: ConnectionGate::new(
            options.max_connections,
            options.idle_timeout,
            options.writes.clone(),
            options.tls.is_none().then(|| Fairness::new(options.fairness, app.metrics.connection_pauses.clone())),
            app.metrics.connections_refused.clone(),
        ),
        inflight: InflightCap::new(options.max_inflight, app.metrics.calls_refused.clone()),
        tls: options.tls.as_ref().map(ServerTls::check).transpose()?,
        health: tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(health.clone()),
        ),
        stop: stop.clone(),
    };
    // One current-thread runtime per core beyond this one, each serving
    // the connections dealt to it (README, "Runtime"). Each stays up until
    // `release`: the last flush below may use a store connection one of
    // them opened.
    let release = CancellationToken::new();
    // However this future ends (returned early, dropped), the drain, the
    // background tasks and the other cores end with it.
    let _ends = [stop.clone(), tasks.clone(), release.clone()].map(CancellationToken::drop_guard);
    let mut cores = Vec::new();
    for core in 1..options.cores.max(1) {
        cores.push(Core::start(core, app.clone(), options.clone(), shared.clone(), release.clone())?);
    }
    // serve_with_incoming ignores the builder's tcp_nodelay: set it here.
    let mut dealer =
        Dealer { cores: cores.iter().map(|c| c.connections.clone()).collect(), next: 0, gate: shared.gate.clone() };
    let incoming =
        tokio_stream::StreamExt::filter_map(TcpIncoming::from(listener).with_nodelay(Some(true)), move |a| match a {
            Ok(connection) => dealer.deal(connection).map(Ok),
            Err(e) => Some(Err(e)),
        });
    let gate = shared.gate.clone();
    let mut outcome = serve_connections(&app, &options, shared, gate.incoming(incoming)).await.map_err(Into::into);
    let all_done = tokio::time::Instant::now() + options.shutdown_grace;
    for core in &mut cores {
        match tokio::time::timeout_at(all_done, &mut core.outcome).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => {
                tracing::error!(core = core.index, error = %e, "a core failed");
                if outcome.is_ok() {
                    outcome = Err(e);
                }
            }
            Ok(Err(_)) => tracing::error!(core = core.index, "a core ended without an outcome (it panicked)"),
            Err(_) => tracing::warn!(core = core.index, "shutdown grace elapsed with calls still in flight"),
        }
    }
    tasks.cancel();
    let until = stopped_at.get().copied().unwrap_or_else(tokio::time::Instant::now) + options.shutdown_grace;
    flush_usage_before(&app, until).await;
    release.cancel();
    for core in cores {
        // Its runtime is shut down without waiting for blocking tasks:
        // the thread ends at once. Joined off this runtime, and given up
        // on (left detached) after a second.
        let joined = tokio::task::spawn_blocking(move || core.thread.join());
        if tokio::time::timeout(Duration::from_secs(1), joined).await.is_err() {
            tracing::warn!(core = core.index, "a core's thread did not end; leaving it");
        }
    }
    outcome
}

/// What every runtime serving gRPC connections shares: the process-wide
/// caps (README, "Limits"), TLS, health and the drain signal.
#[derive(Clone)]
struct Shared {
    gate: ConnectionGate,
    inflight: InflightCap,
    tls: Option<tonic::transport::ServerTlsConfig>,
    health: tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>,
    stop: CancellationToken,
}

/// Serves `incoming`'s connections (admitted by the gate) on the current
/// runtime until the drain signal, then drains them within the shutdown
/// grace.
async fn serve_connections<I, IE>(
    app: &App,
    options: &ServerOptions,
    shared: Shared,
    incoming: I,
) -> Result<(), tonic::transport::Error>
where
    I: tokio_stream::Stream<Item = Result<crate::service::load::CappedConnection<TcpStream>, IE>>,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = shared.tls {
        builder = builder.tls_config(tls)?;
    }
    let router = builder
        .max_concurrent_streams(options.max_concurrent_streams)
        .concurrency_limit_per_connection(options.max_inflight_per_connection)
        .load_shed(true)
        .timeout(options.request_timeout)
        .layer(crate::service::fairness::StartedLayer::new(shared.inflight))
        .layer(crate::service::limits::oversize_is_invalid_argument())
        .layer(crate::service::span::RpcSpanLayer)
        .layer(crate::service::limits::StreamCapLayer)
        .layer(crate::service::load::EndWatchesLayer::new(shared.stop.clone()))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_routes(routes(app, &options.front_ends, options.ext_authz_max_request_bytes, shared.health));
    let stop = shared.stop;
    let served = router.serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned());
    let grace = options.shutdown_grace;
    tokio::select! {
        r = served => r,
        _ = async { stop.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(grace = ?grace, "shutdown grace elapsed with calls still in flight");
            Ok(())
        }
    }
}

/// What a core's outcome is: how its connections were served.
type Served = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// A connection dealt to a core, with the connection permit taken for it
/// where it was accepted.
type Dealt = (std::net::TcpStream, tokio::sync::OwnedSemaphorePermit);

/// A core beyond the first: a thread with a current-thread runtime serving
/// the connections dealt to it.
struct Core {
    index: usize,
    connections: tokio::sync::mpsc::Sender<Dealt>,
    outcome: tokio::sync::oneshot::Receiver<Served>,
    thread: std::thread::JoinHandle<()>,
}

impl Core {
    /// Connections waiting for a busy core beyond this many go to the
    /// first core instead.
    const BACKLOG: usize = 256;

    fn start(
        index: usize,
        app: Arc<App>,
        options: ServerOptions,
        shared: Shared,
        release: CancellationToken,
    ) -> std::io::Result<Core> {
        let (connections, received) = tokio::sync::mpsc::channel(Core::BACKLOG);
        let (done, outcome) = tokio::sync::oneshot::channel::<Served>();
        // Built on its own thread: a runtime must not be dropped on another
        // runtime's thread, as it would be if the thread failed to start.
        let thread = std::thread::Builder::new().name(format!("ks-core-{index}")).spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = done.send(Err(e.into()));
                    return;
                }
            };
            runtime.block_on(async move {
                let gate = shared.gate.clone();
                // Registered with this runtime's reactor, not the acceptor's.
                let incoming = tokio_stream::StreamExt::map(
                    tokio_stream::wrappers::ReceiverStream::new(received),
                    move |(connection, permit): Dealt| TcpStream::from_std(connection).map(|c| gate.open(c, permit)),
                );
                let served = serve_connections(&app, &options, shared, incoming).await;
                let _ = done.send(served.map_err(Into::into));
                release.cancelled().await;
            });
            runtime.shutdown_background();
        })?;
        Ok(Core { index, connections, outcome, thread })
    }
}

/// Deals accepted connections round-robin over the cores: the first keeps
/// its turn, the others' go to their runtimes (or stay here when one
/// falls behind by [`Core::BACKLOG`]).
struct Dealer {
    cores: Vec<tokio::sync::mpsc::Sender<Dealt>>,
    next: usize,
    gate: ConnectionGate,
}

impl Dealer {
    fn deal(&mut self, connection: TcpStream) -> Option<TcpStream> {
        let turn = self.next;
        self.next = (self.next + 1) % (self.cores.len() + 1);
        if turn == 0 {
            return Some(connection);
        }
        // Counted against --max-connections here, where it was accepted.
        let permit = self.gate.permit()?;
        // Leaves this runtime's reactor; the core registers it with its own.
        let connection = connection.into_std().ok()?;
        match self.cores[turn - 1].try_send((connection, permit)) {
            Ok(()) => None,
            // The first core admits it again: the permit goes back.
            Err(e) => TcpStream::from_std(e.into_inner().0).ok(),
        }
    }
}

/// The last flush of last-used times and usage counts, tried again until
/// `until` (the end of the shutdown grace) while the store fails: a Redis
/// that hiccups during a rollout loses nothing (README, "Health": shutdown).
async fn flush_usage_before(app: &App, until: tokio::time::Instant) {
    let mut pause = Duration::from_millis(50);
    loop {
        match app.usage.flush().await {
            Ok(n) => {
                tracing::info!(keys = n, "last-used timestamps flushed");
                return;
            }
            Err(e) if tokio::time::Instant::now() + pause < until => {
                tracing::warn!(error = %e, retry_in = ?pause, "could not flush last-used timestamps; retrying within the shutdown grace");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not flush last-used timestamps within the shutdown grace; they are lost");
                return;
            }
        }
    }
}

/// Applies the store's change feed to the cache and turns its state into
/// readiness.
async fn follow_feed(
    app: Arc<App>,
    health: HealthReporter,
    readiness: Vec<&'static str>,
    stop: CancellationToken,
    tasks: CancellationToken,
) {
    let mut feed = app.store.feed();
    let stale_window = app.settings.cache.stale_window;
    let metrics = &app.metrics;
    // Subscribed first, then asked: no transition can fall between.
    let mut down_since = (!app.store.feed_is_live()).then(tokio::time::Instant::now);
    if down_since.is_none() {
        // Live already: no Connected will come, so load the known key_ids now.
        app.records.apply(&FeedEvent::Connected);
    }
    metrics.feed_connected.set(if down_since.is_none() { 1.0 } else { 0.0 });
    let mut ready = false;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        let event = tokio::select! {
            _ = tasks.cancelled() => return,
            _ = tick.tick() => None,
            e = feed.recv() => Some(e),
        };
        match event {
            Some(Ok(ev)) => {
                app.records.apply(&ev);
                match ev {
                    FeedEvent::Connected => {
                        if down_since.is_some() && ready {
                            metrics.feed_reconnects.increment(1);
                        }
                        metrics.feed_connected.set(1.0);
                        down_since = None;
                    }
                    FeedEvent::Disconnected => {
                        metrics.feed_connected.set(0.0);
                        tracing::warn!("change feed lost; cached keys keep verifying for the stale window");
                        down_since = Some(tokio::time::Instant::now());
                    }
                    _ => {}
                }
            }
            Some(Err(RecvError::Lagged(n))) => {
                tracing::warn!(missed = n, "change feed lagged; dropping the whole cache");
                app.records.apply(&FeedEvent::InvalidateAll);
            }
            Some(Err(RecvError::Closed)) => return,
            None => {}
        }
        let want = !stop.is_cancelled()
            && match down_since {
                None => true,
                // Never ready before the first connection; afterwards, ready
                // while within the stale window.
                Some(since) => ready && since.elapsed() < stale_window,
            };
        if want != ready {
            ready = want;
            metrics.ready.set(if ready { 1.0 } else { 0.0 });
            let status = if ready { ServingStatus::Serving } else { ServingStatus::NotServing };
            tracing::info!(ready, "readiness changed");
            for &name in &readiness {
                health.set_service_status(name, status).await;
            }
        }
    }
}

async fn flush_usage(app: Arc<App>, every: Duration, tasks: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tasks.cancelled() => return,
            _ = tick.tick() => {
                if let Err(e) = app.usage.flush().await {
                    tracing::debug!(error = %e, "last-used flush failed; will retry");
                }
            }
        }
    }
}

/// How often every replica reads the token signing keys again (a rotated
/// key signs only after [`crate::token::PUBLISH_BEFORE_SIGNING`], longer
/// than this).
pub const RELOAD_SIGNING_KEYS_EVERY: Duration = Duration::from_secs(10);

async fn reload_signing_keys(app: Arc<App>, tasks: CancellationToken) {
    let Some(tokens) = app.tokens.clone() else { return };
    let mut tick = tokio::time::interval(RELOAD_SIGNING_KEYS_EVERY);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tasks.cancelled() => return,
            _ = tick.tick() => match tokens.reload().await {
                Ok(()) => failing = false,
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "reading the token signing keys failed; keeping the ones loaded");
                }
                Err(_) => {}
            },
        }
    }
}

/// How often idle addresses and whole buckets are forgotten.
pub const PURGE_EVERY: Duration = Duration::from_secs(10);

async fn purge(app: Arc<App>, tasks: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let every = PURGE_EVERY.as_secs().max(1);
    for n in 0u64.. {
        tokio::select! {
            _ = tasks.cancelled() => return,
            _ = tick.tick() => {
                // Expired negative entries leave memory within a second
                // (README, "Memory budget"); the rest less often.
                app.engine.purge_expired();
                if n % every == every - 1 {
                    app.purge();
                }
            }
        }
    }
}
