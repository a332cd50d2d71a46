//! `keystile serve` configuration: flags with `KEYSTILE_*` environment
//! fallbacks and an optional TOML file, validated into a [`ServeConfig`]
//! before any port is bound. Every problem is reported at once (README,
//! "Configuration").
//!
//! Precedence is flag > environment > file > default. The file is read
//! into the same typed arguments as the flags ([`file_args`]): each setting
//! that neither a flag nor a variable gave becomes one more argument, and
//! clap parses the whole again, so a setting has one parser and one
//! meaning wherever it comes from. The process environment is never
//! changed.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::cache::CacheSettings;
use crate::engine::EngineSettings;
use crate::key::{Env, KeyFormat, Pepper, PepperSet};
use crate::limit::fleet::FleetSettings;
use crate::limit::{LimitSpec, RateLimitPolicy};
use crate::secret::{RedisUrl, Secret};
use crate::server::{FrontEnd, RuntimeKind, ServerOptions, ServerTls};
use crate::store::StoreConfig;
use crate::store::redis::connection::Topology;
use crate::telemetry::LogFormat;
use crate::token::TokenSettings;

/// Exit code for a configuration error (EX_USAGE).
pub const EX_USAGE: i32 = 64;

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (use e.g. 50ms, 5s, 1m)"))
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// TOML file of settings, keyed by flag name (`cache_ttl = "30s"`).
    /// Flags and `KEYSTILE_*` variables take precedence over it.
    #[arg(long, env = "KEYSTILE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address of the Prometheus `/metrics` endpoint (HTTP); unset = off.
    #[arg(long, env = "KEYSTILE_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Address of the HTTP listener (`POST /v1/auth/token`,
    /// `/.well-known/jwks.json`, forward-auth on `/authz`); unset = off.
    #[arg(long, env = "KEYSTILE_HTTP_LISTEN")]
    pub http_listen: Option<String>,
    /// Serve Envoy's ext_authz (`envoy.service.auth.v3.Authorization`) on
    /// the gRPC port.
    #[arg(long, env = "KEYSTILE_EXT_AUTHZ")]
    pub ext_authz: bool,
    /// Largest ext_authz CheckRequest (it carries every header).
    #[arg(long, env = "KEYSTILE_EXT_AUTHZ_MAX_REQUEST_BYTES", default_value = "65536")]
    pub ext_authz_max_request_bytes: String,
    /// Where proxied requests carry their credential, in order:
    /// `authorization` (Bearer or no scheme), header names, `query:NAME`.
    #[arg(long, env = "KEYSTILE_CREDENTIAL_SOURCES", default_value = crate::proxy::credentials::DEFAULT_SOURCES)]
    pub credential_sources: String,
    /// TOML route table for the proxy front ends: hosts to tenants, method
    /// and path prefix to scopes and limits.
    #[arg(long, env = "KEYSTILE_ROUTES")]
    pub routes: Option<PathBuf>,
    /// Template of the proxy front ends' deny body, with {code}, {error},
    /// {message}, {status} and {path}.
    #[arg(long, env = "KEYSTILE_ERROR_BODY")]
    pub error_body: Option<PathBuf>,
    /// Remove the credential from the upstream request (ext_authz).
    #[arg(long, env = "KEYSTILE_STRIP_CREDENTIAL")]
    pub strip_credential: bool,
    /// Proxies whose X-Forwarded-For entries are trusted: 0 = the client is
    /// the connection's peer (ext_authz: Envoy's source address).
    #[arg(long, env = "KEYSTILE_TRUSTED_HOPS", default_value = "0")]
    pub trusted_hops: String,
    /// Forward-auth peers (the proxy in front) whose X-Forwarded-For is
    /// believed with --trusted-hops; CIDRs or addresses.
    #[arg(long, env = "KEYSTILE_TRUSTED_PROXIES", value_delimiter = ',', default_value = "127.0.0.0/8,::1/128")]
    pub trusted_proxies: Vec<String>,
    /// Which headers name the original request on /authz: x-original
    /// (nginx), x-forwarded (Traefik, Caddy) or request (Envoy's HTTP
    /// ext_authz).
    #[arg(long, env = "KEYSTILE_FORWARD_AUTH_HEADERS", default_value = "x-original")]
    pub forward_auth_headers: String,
    /// The realm of the proxy front ends' WWW-Authenticate.
    #[arg(long, env = "KEYSTILE_AUTH_REALM", default_value = "api")]
    pub auth_realm: String,
    /// `iss` of the tokens this deployment issues, and the only one it
    /// accepts.
    #[arg(long, env = "KEYSTILE_JWT_ISSUER", default_value = "keystile")]
    pub jwt_issuer: String,
    /// Lifetime of a token when the caller asks for none.
    #[arg(long, env = "KEYSTILE_JWT_TTL", default_value = "15m")]
    pub jwt_ttl: String,
    /// Longest lifetime a caller may ask for.
    #[arg(long, env = "KEYSTILE_JWT_MAX_TTL", default_value = "1h")]
    pub jwt_max_ttl: String,
    /// Clock difference tolerated on a token's expiry.
    #[arg(long, env = "KEYSTILE_JWT_LEEWAY", default_value = "30s")]
    pub jwt_leeway: String,
    /// Ed25519 signing key, PKCS#8 PEM (`openssl genpkey -algorithm
    /// ed25519`); repeat for rotation, the first signs. Unset: keys are
    /// generated and kept in the store, sealed under the pepper.
    #[arg(long = "jwt-key-file", env = "KEYSTILE_JWT_KEY_FILES", value_delimiter = ',')]
    pub jwt_key_files: Vec<PathBuf>,
    /// gRPC address to listen on [default: 0.0.0.0:50051, or
    /// 127.0.0.1:50051 with --dev].
    #[arg(long, env = "KEYSTILE_LISTEN")]
    pub listen: Option<String>,
    /// PEM certificate chain for TLS on the gRPC port (with --tls-key).
    #[arg(long, env = "KEYSTILE_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for TLS on the gRPC port (with --tls-cert).
    #[arg(long, env = "KEYSTILE_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle: require client certificates signed by it (mutual TLS).
    #[arg(long, env = "KEYSTILE_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    #[command(flatten)]
    pub redis: RedisArgs,
    /// Development mode: mint an admin key and print it on stdout as
    /// `KEYSTILE_ADMIN_KEY=<key>`; generate a pepper if none is given.
    #[arg(long, env = "KEYSTILE_DEV")]
    pub dev: bool,
    /// File holding the 32-byte pepper (64 hex characters).
    #[arg(long, env = "KEYSTILE_PEPPER_FILE")]
    pub pepper_file: Option<PathBuf>,
    /// The pepper itself, 64 hex characters (prefer --pepper-file).
    #[arg(long = "pepper", env = "KEYSTILE_PEPPER", hide_env_values = true)]
    pub pepper: Option<Secret>,
    /// Earlier peppers, still needed to verify keys created under them.
    #[arg(long, env = "KEYSTILE_PREVIOUS_PEPPER_FILES", value_delimiter = ',')]
    pub previous_pepper_file: Vec<PathBuf>,
    /// Accepted key prefixes; the first one is used for new keys.
    #[arg(long = "key-prefix", env = "KEYSTILE_KEY_PREFIXES", value_delimiter = ',', default_value = "ks")]
    pub key_prefixes: Vec<String>,
    /// Publishable keys' prefixes (site keys, README "Key kinds"); the first
    /// is used for new ones. Default kp.
    #[arg(long = "publishable-key-prefix", env = "KEYSTILE_PUBLISHABLE_KEY_PREFIXES", value_delimiter = ',')]
    pub publishable_key_prefixes: Vec<String>,
    /// Restricted keys' prefixes; the first is used for new ones. Default kr.
    #[arg(long = "restricted-key-prefix", env = "KEYSTILE_RESTRICTED_KEY_PREFIXES", value_delimiter = ',')]
    pub restricted_key_prefixes: Vec<String>,
    /// Accepted key environments.
    #[arg(long, env = "KEYSTILE_ACCEPT_ENVS", value_delimiter = ',', default_value = "live,test")]
    pub accept_envs: Vec<String>,
    /// How long a found key is served from the cache.
    #[arg(long, env = "KEYSTILE_CACHE_TTL", default_value = "60s")]
    pub cache_ttl: String,
    /// How long an unknown key_id is remembered as unknown.
    #[arg(long, env = "KEYSTILE_NEGATIVE_TTL", default_value = "5s")]
    pub negative_ttl: String,
    /// How long cached keys keep verifying while the store is down (0 = never).
    #[arg(long, env = "KEYSTILE_STALE_WINDOW", default_value = "60s")]
    pub stale_window: String,
    /// How long cached keys stay trusted after the change feed is lost
    /// (then lookups read through to the store until it is back).
    #[arg(long, env = "KEYSTILE_FEED_GRACE", default_value = "2s")]
    pub feed_grace: String,
    /// Most keys held in the cache.
    #[arg(long, env = "KEYSTILE_CACHE_MAX_ENTRIES", default_value = "1000000")]
    pub cache_max_entries: String,
    /// Memory the cache may use, positive and negative entries together:
    /// bytes, or with a unit (`32MiB`, `512KiB`, `1GiB`).
    #[arg(long, env = "KEYSTILE_CACHE_MAX_BYTES", default_value = "32MiB")]
    pub cache_max_bytes: String,
    /// Key_ids the known-key filter is sized for (about 1.2 MB per
    /// million; 1 % false positives at that size): unknown key_ids are
    /// answered without the store. 0 turns it off.
    #[arg(long, env = "KEYSTILE_KNOWN_KEYS", default_value = "1000000")]
    pub known_keys: String,
    /// How long a Verify waits for the store before answering UNAVAILABLE.
    #[arg(long, env = "KEYSTILE_STORE_TIMEOUT", default_value = "50ms")]
    pub store_timeout: String,
    /// Limit for keys without their own, e.g. 1000/60s or 1000/60s:100
    /// (requests/window[:burst]). Unset: such keys are unlimited.
    #[arg(long, env = "KEYSTILE_DEFAULT_RATE_LIMIT")]
    pub default_rate_limit: Option<String>,
    /// A deployment-wide named limit, NAME=REQUESTS/WINDOW[:BURST][@tenant]
    /// [,auto][,open|,closed]; repeat for several (README, "Rate limits").
    /// Tenants' policies and keys override a limit of the same name.
    #[arg(long = "limit", env = "KEYSTILE_LIMITS", value_delimiter = ';')]
    pub limits: Vec<String>,
    /// Largest share of a shared limit's burst one replica may hold as a
    /// lease (0 < x <= 1).
    #[arg(long, env = "KEYSTILE_LIMIT_SLACK", default_value = "0.01")]
    pub limit_slack: String,
    /// Unspent lease cells go back to the shared bucket after this long
    /// without use.
    #[arg(long, env = "KEYSTILE_LIMIT_LEASE_IDLE", default_value = "1s")]
    pub limit_lease_idle: String,
    /// Count rate limits in this process only, even with Redis (each
    /// replica then admits the whole limit).
    #[arg(long, env = "KEYSTILE_LOCAL_LIMITS")]
    pub local_limits: bool,
    /// Failed attempts (malformed or unknown keys) per minute per client IP
    /// before that IP is shed; 0 turns shedding off.
    #[arg(long, env = "KEYSTILE_FAILED_ATTEMPTS_PER_MINUTE", default_value = "20")]
    pub failed_attempts_per_minute: String,
    /// Let a granted scope `*` satisfy every scope (refused at creation
    /// otherwise).
    #[arg(long, env = "KEYSTILE_ALLOW_STAR_SCOPE")]
    pub allow_star_scope: bool,
    /// Do not serve KeyAdmin on this sidecar.
    #[arg(long, env = "KEYSTILE_NO_ADMIN")]
    pub no_admin: bool,
    /// HTTP/2 streams per connection (README, "Limits": fewer also protect
    /// other callers from a flooding connection, but refuse bursts that a
    /// client sends on a new connection before it has the server's
    /// settings).
    #[arg(long, env = "KEYSTILE_MAX_CONCURRENT_STREAMS", default_value = "100")]
    pub max_concurrent_streams: String,
    /// Connections open at once; more are closed as soon as they are
    /// accepted.
    #[arg(long, env = "KEYSTILE_MAX_CONNECTIONS", default_value = "1024")]
    pub max_connections: String,
    /// Calls in progress in the whole process; more get RESOURCE_EXHAUSTED.
    #[arg(long, env = "KEYSTILE_MAX_INFLIGHT", default_value = "4096")]
    pub max_inflight: String,
    /// Longest a call may take before it is cancelled.
    #[arg(long, env = "KEYSTILE_REQUEST_TIMEOUT", default_value = "30s")]
    pub request_timeout: String,
    /// A connection nothing has been read from for this long is closed
    /// (live HTTP/2 clients answer keepalive pings every 30 s); 0 = never.
    #[arg(long, env = "KEYSTILE_IDLE_TIMEOUT", default_value = "90s")]
    pub idle_timeout: String,
    /// Calls in progress per connection beyond which new ones get
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "KEYSTILE_MAX_INFLIGHT_PER_CONNECTION", default_value = "100")]
    pub max_inflight_per_connection: String,
    /// Calls waiting for the CPU in the whole process beyond which a
    /// connection with its share of them waiting is not read from until
    /// half of those have started (README, "Limits": one caller's flood
    /// waits in its own socket, not ahead of everyone else).
    #[arg(long, env = "KEYSTILE_MAX_QUEUED_CALLS", default_value = "128")]
    pub max_queued_calls: String,
    /// A connection's share of waiting calls once the process is busy.
    #[arg(long, env = "KEYSTILE_QUEUED_CALLS_PER_CONNECTION", default_value = "2")]
    pub queued_calls_per_connection: String,
    /// How long in-flight calls may take to finish on SIGTERM.
    #[arg(long, env = "KEYSTILE_SHUTDOWN_GRACE", default_value = "10s")]
    pub shutdown_grace: String,
    /// How often last-used timestamps and usage counts are written to the store.
    #[arg(long, env = "KEYSTILE_LAST_USED_FLUSH", default_value = "10s")]
    pub last_used_flush: String,
    /// Runtime worker threads (default: the CPUs available to the process,
    /// which honours a container's CPU quota).
    #[arg(long, env = "KEYSTILE_WORKERS")]
    pub workers: Option<String>,
    /// How calls are scheduled on the workers: work-stealing (one runtime
    /// whose workers share the calls) or per-core (a current-thread runtime
    /// per worker, connections dealt round-robin).
    #[arg(long, env = "KEYSTILE_RUNTIME", default_value = "work-stealing")]
    pub runtime: String,
    /// Log format: plain or json.
    #[arg(long, env = "KEYSTILE_LOG_FORMAT", default_value = "plain")]
    pub log_format: String,
}

/// An error and its causes, `outer: inner`, repeats left out. Errors of
/// TLS libraries name files and formats, never key material.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(e);
    while let Some(e) = next {
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}

/// Parses a number setting, or says what is wrong with it.
/// A size in bytes: a whole number, optionally followed by `KiB`, `MiB`
/// or `GiB` (or `Ki`/`Mi`/`Gi`, as Kubernetes writes them).
fn bytes(value: &str) -> Option<u64> {
    let value = value.trim();
    let digits = value.find(|c: char| !c.is_ascii_digit()).unwrap_or(value.len());
    let (n, unit) = value.split_at(digits);
    let shift = match unit.trim() {
        "" | "B" => 0,
        "KiB" | "Ki" => 10,
        "MiB" | "Mi" => 20,
        "GiB" | "Gi" => 30,
        _ => return None,
    };
    n.parse::<u64>().ok()?.checked_mul(1 << shift)
}

fn number<T: std::str::FromStr>(flag: &str, value: &str, errors: &mut Vec<String>) -> Option<T> {
    value.trim().parse::<T>().map_err(|_| errors.push(format!("--{flag} {value:?} must be a whole number"))).ok()
}

/// Reads a PEM file that must hold `what`.
fn read_pem(flag: &str, path: &std::path::Path, what: &str, errors: &mut Vec<String>) -> Option<Vec<u8>> {
    match std::fs::read(path) {
        Ok(bytes) if String::from_utf8_lossy(&bytes).contains(&format!("-----BEGIN {what}")) => Some(bytes),
        Ok(_) => {
            errors.push(format!("--{flag} {}: not a PEM file with a {what}", path.display()));
            None
        }
        Err(e) => {
            errors.push(format!("--{flag} {}: {e}", path.display()));
            None
        }
    }
}

/// Where Redis is: one URL, or a Sentinel set, with TLS settings for
/// either (README, "Storage, cache and revocation"). Shared by `serve` and
/// `keys bootstrap`.
#[derive(Debug, Clone, Args)]
pub struct RedisArgs {
    /// Redis URL: `redis://[user:password@]host:port[/db]`, rediss:// for TLS,
    /// unix:///path. Without it (or --redis-sentinel, or --redis-cluster)
    /// the embedded in-memory store is used (one process, nothing
    /// persisted).
    #[arg(long, env = "KEYSTILE_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<RedisUrl>,
    /// Sentinels to ask for the primary, host:port,… (with
    /// --redis-sentinel-master).
    #[arg(long, env = "KEYSTILE_REDIS_SENTINEL", value_delimiter = ',')]
    pub redis_sentinel: Vec<String>,
    /// The name the sentinels monitor the primary under.
    #[arg(long, env = "KEYSTILE_REDIS_SENTINEL_MASTER")]
    pub redis_sentinel_master: Option<String>,
    /// Redis Cluster: some of its nodes, host:port,… (the rest are
    /// discovered).
    #[arg(long, env = "KEYSTILE_REDIS_CLUSTER", value_delimiter = ',')]
    pub redis_cluster: Vec<String>,
    /// Password of the sentinels themselves.
    #[arg(long, env = "KEYSTILE_REDIS_SENTINEL_PASSWORD", hide_env_values = true)]
    pub redis_sentinel_password: Option<Secret>,
    /// Password of the data nodes (Sentinel, Cluster; with --redis-url, put
    /// it in the URL).
    #[arg(long, env = "KEYSTILE_REDIS_PASSWORD", hide_env_values = true)]
    pub redis_password: Option<Secret>,
    /// Speak TLS to the sentinels and data nodes, or to the cluster's nodes
    /// (with --redis-url, use rediss://).
    #[arg(long, env = "KEYSTILE_REDIS_TLS")]
    pub redis_tls: bool,
    /// PEM CA bundle that Redis's certificate must chain to (default: the
    /// system's roots).
    #[arg(long, env = "KEYSTILE_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,
    /// PEM client certificate, for a Redis that requires one.
    #[arg(long, env = "KEYSTILE_REDIS_CLIENT_CERT")]
    pub redis_client_cert: Option<PathBuf>,
    /// PEM key of --redis-client-cert.
    #[arg(long, env = "KEYSTILE_REDIS_CLIENT_KEY")]
    pub redis_client_key: Option<PathBuf>,
    /// Accept any certificate and host name from Redis. For self-signed test
    /// setups only: it gives up what TLS protects.
    #[arg(long, env = "KEYSTILE_REDIS_TLS_INSECURE")]
    pub redis_tls_insecure: bool,
    /// Prefix of every Redis key keystile writes.
    #[arg(long, env = "KEYSTILE_REDIS_NAMESPACE", default_value = "keystile")]
    pub redis_namespace: String,
}

impl RedisArgs {
    /// The store these settings name (the memory store when none), every
    /// problem pushed onto `errors`. `timeout` bounds connecting and
    /// every command.
    pub fn store(&self, timeout: Duration, errors: &mut Vec<String>) -> StoreConfig {
        use crate::store::redis::connection::Nodes;
        // Braces would make a hash tag of their own and put every partition
        // in one Cluster slot.
        if self.redis_namespace.is_empty()
            || self.redis_namespace.contains(|c: char| c.is_whitespace() || c == '{' || c == '}')
        {
            errors.push("--redis-namespace must be non-empty, without whitespace or braces".into());
        }
        let url = self.redis_url.as_ref().filter(|u| !u.expose().trim().is_empty());
        let host_port = |flag: &str, list: &[String], errors: &mut Vec<String>| {
            for s in list {
                // No user:password@ here: passwords have flags of their own
                // (and would otherwise be shown with the address).
                if s.contains('@')
                    || s.trim().rsplit_once(':').is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
                {
                    errors.push(format!(
                        "--{flag}: each node must be host:port (passwords go in --redis-password / \
                         --redis-sentinel-password)"
                    ));
                }
            }
            list.iter().map(|s| s.trim().to_string()).collect::<Vec<_>>()
        };
        if !self.redis_cluster.is_empty() {
            if url.is_some() || !self.redis_sentinel.is_empty() {
                errors.push("give one of --redis-url, --redis-sentinel and --redis-cluster".into());
            }
            let nodes = Nodes::Cluster {
                seeds: host_port("redis-cluster", &self.redis_cluster, errors),
                password: self.redis_password.clone(),
            };
            return self.with_tls(nodes, self.redis_tls, timeout, errors);
        }
        let nodes = match (url, self.redis_sentinel.is_empty(), &self.redis_sentinel_master) {
            (None, true, None) => return StoreConfig::Memory,
            (Some(url), true, None) => {
                if let Err(e) = redis::Client::open(url.expose()) {
                    errors.push(format!(
                        "--redis-url {url} is not a Redis URL (redis://host:port/db, rediss://…, unix:///path): {}",
                        e.detail().unwrap_or("")
                    ));
                }
                if self.redis_tls {
                    errors.push("--redis-tls is for Sentinel; with --redis-url, write rediss://".into());
                }
                Nodes::Single(url.clone())
            }
            (None, false, Some(master)) => {
                if master.trim().is_empty() {
                    errors.push("--redis-sentinel-master must name the monitored primary".into());
                }
                Nodes::Sentinel {
                    sentinels: host_port("redis-sentinel", &self.redis_sentinel, errors),
                    master: master.trim().to_string(),
                    sentinel_password: self.redis_sentinel_password.clone(),
                    password: self.redis_password.clone(),
                }
            }
            (Some(_), false, _) | (Some(_), _, Some(_)) => {
                errors.push("give either --redis-url or --redis-sentinel, not both".into());
                return StoreConfig::Memory;
            }
            (None, false, None) => {
                errors.push("--redis-sentinel needs --redis-sentinel-master".into());
                return StoreConfig::Memory;
            }
            (None, true, Some(_)) => {
                errors.push("--redis-sentinel-master needs --redis-sentinel host:port,…".into());
                return StoreConfig::Memory;
            }
        };
        let wants_tls = match &nodes {
            Nodes::Single(url) => url.expose().starts_with("rediss://"),
            _ => self.redis_tls,
        };
        self.with_tls(nodes, wants_tls, timeout, errors)
    }

    /// The store on `nodes`, with the TLS settings when `wants_tls`.
    fn with_tls(
        &self,
        nodes: crate::store::redis::connection::Nodes,
        wants_tls: bool,
        timeout: Duration,
        errors: &mut Vec<String>,
    ) -> StoreConfig {
        use crate::store::redis::connection::RedisTls;
        let read = |flag: &str, path: &PathBuf, errors: &mut Vec<String>| {
            std::fs::read(path).map_err(|e| errors.push(format!("--{flag} {}: {e}", path.display()))).ok()
        };
        let ca = self.redis_ca_file.as_ref().and_then(|p| read("redis-ca-file", p, errors));
        let client = match (&self.redis_client_cert, &self.redis_client_key) {
            (Some(c), Some(k)) => match (read("redis-client-cert", c, errors), read("redis-client-key", k, errors)) {
                (Some(c), Some(k)) => Some((c, Secret::new(String::from_utf8_lossy(&k).into_owned()))),
                _ => None,
            },
            (None, None) => None,
            _ => {
                errors.push("--redis-client-cert and --redis-client-key go together".into());
                None
            }
        };
        let tls_settings = ca.is_some() || client.is_some() || self.redis_tls_insecure;
        if tls_settings && !wants_tls {
            errors.push(
                "--redis-ca-file, --redis-client-cert and --redis-tls-insecure need TLS: rediss:// or --redis-tls"
                    .into(),
            );
        }
        let tls = wants_tls.then_some(RedisTls { ca, client, insecure: self.redis_tls_insecure });
        StoreConfig::Redis {
            topology: Box::new(Topology { nodes, tls, timeout }),
            namespace: self.redis_namespace.clone(),
        }
    }
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    pub http_listen: Option<SocketAddr>,
    pub store: StoreConfig,
    pub dev: bool,
    pub engine: EngineSettings,
    pub server: ServerOptions,
    pub workers: Option<usize>,
    pub runtime: RuntimeKind,
    pub log_format: LogFormat,
    /// Whether the pepper was generated (dev only): keys die with the process.
    pub pepper_generated: bool,
    /// Not errors, but worth saying at start.
    pub warnings: Vec<String>,
}

impl ServeArgs {
    /// Token settings (README, "Token exchange"), signing key files read and
    /// checked; problems go to `errors`.
    /// The proxy front ends' settings (README, "Protect an API without
    /// code"): every problem of the sources, the routes file and the error
    /// body reported, with the file it is in.
    fn proxy_settings(&self, errors: &mut Vec<String>) -> crate::proxy::ProxySettings {
        let mut proxy = crate::proxy::ProxySettings::default();
        match self.credential_sources.parse() {
            Ok(s) => proxy.sources = s,
            Err(es) => errors.extend(es.into_iter().map(|e| format!("--credential-sources {e}"))),
        }
        let read = |flag: &str, path: &PathBuf, errors: &mut Vec<String>| -> Option<String> {
            match std::fs::metadata(path) {
                Ok(m) if m.len() > 1024 * 1024 => {
                    errors.push(format!("--{flag} {}: larger than 1 MiB", path.display()));
                    None
                }
                Ok(_) => std::fs::read_to_string(path)
                    .map_err(|e| errors.push(format!("--{flag} {}: {e}", path.display())))
                    .ok(),
                Err(e) => {
                    errors.push(format!("--{flag} {}: {e}", path.display()));
                    None
                }
            }
        };
        if let Some(path) = &self.routes
            && let Some(text) = read("routes", path, errors)
        {
            match crate::proxy::RouteTable::parse(&text) {
                Ok(t) => proxy.routes = t,
                Err(es) => errors.extend(es.into_iter().map(|e| format!("--routes {}: {e}", path.display()))),
            }
        }
        if let Some(path) = &self.error_body
            && let Some(text) = read("error-body", path, errors)
        {
            match crate::proxy::ErrorBody::parse(&text) {
                Ok(b) => proxy.error_body = b,
                Err(es) => errors.extend(es.into_iter().map(|e| format!("--error-body {}: {e}", path.display()))),
            }
        }
        match self.trusted_hops.trim().parse::<u8>() {
            Ok(n) if n <= 16 => proxy.trusted_hops = n,
            _ => errors.push(format!("--trusted-hops {:?} must be a number from 0 to 16", self.trusted_hops)),
        }
        let realm = self.auth_realm.trim();
        if realm.is_empty()
            || realm.len() > 64
            || !realm.bytes().all(|c| (b' '..=b'~').contains(&c) && c != b'"' && c != b'\\')
        {
            errors.push(format!("--auth-realm {realm:?} must be 1-64 printable ASCII characters without quotes"));
        } else {
            proxy.realm = realm.to_string();
        }
        proxy.strip_credential = self.strip_credential;
        match self.forward_auth_headers.parse() {
            Ok(h) => proxy.forward_auth_headers = h,
            Err(e) => errors.push(format!("--forward-auth-headers {e}")),
        }
        let mut proxies = Vec::new();
        for p in self.trusted_proxies.iter().map(|p| p.trim()).filter(|p| !p.is_empty()) {
            match p.parse::<ipnet::IpNet>().or_else(|_| p.parse::<std::net::IpAddr>().map(ipnet::IpNet::from)) {
                Ok(net) => proxies.push(net),
                Err(_) => errors.push(format!("--trusted-proxies {p:?} is not a CIDR or an address")),
            }
        }
        proxy.trusted_proxies = proxies;
        proxy
    }

    fn token_settings(&self, errors: &mut Vec<String>) -> Option<TokenSettings> {
        let mut dur = |name: &str, v: &str| duration(v).map_err(|e| errors.push(format!("--{name} {v:?}: {e}"))).ok();
        let ttl = dur("jwt-ttl", &self.jwt_ttl);
        let max_ttl = dur("jwt-max-ttl", &self.jwt_max_ttl);
        let leeway = dur("jwt-leeway", &self.jwt_leeway);
        if let (Some(t), Some(m)) = (ttl, max_ttl)
            && (t.is_zero() || t > m || m > Duration::from_secs(24 * 3600))
        {
            errors.push("--jwt-ttl must be above 0 and at most --jwt-max-ttl, which is at most 24h".into());
        }
        if leeway.is_some_and(|l| l > Duration::from_secs(300)) {
            errors.push("--jwt-leeway must be at most 5m".into());
        }
        let issuer = self.jwt_issuer.trim();
        if issuer.is_empty() || issuer.len() > 256 {
            errors.push("--jwt-issuer must be 1 to 256 characters".into());
        }
        let mut key_pems = Vec::new();
        for path in &self.jwt_key_files {
            if let Some(pem) = read_pem("jwt-key-file", path, "PRIVATE KEY", errors) {
                let text = String::from_utf8_lossy(&pem).to_string();
                match crate::token::signing::SigningPair::from_pem(&text) {
                    Ok(_) => key_pems.push(text),
                    Err(e) => errors.push(format!("--jwt-key-file {}: {e}", path.display())),
                }
            }
        }
        Some(TokenSettings {
            issuer: issuer.to_string(),
            ttl: ttl.unwrap_or_default(),
            max_ttl: max_ttl.unwrap_or_default(),
            leeway: leeway.unwrap_or_default(),
            key_pems,
            ..TokenSettings::default()
        })
    }

    /// Validates everything, reading the pepper files; returns every problem.
    pub fn validate(&self) -> Result<ServeConfig, Vec<String>> {
        let mut errors = Vec::new();
        // A dev server is for this machine only unless told otherwise.
        let default_listen = if self.dev { "127.0.0.1:50051" } else { "0.0.0.0:50051" };
        let listen_text = self.listen.as_deref().unwrap_or(default_listen);
        let listen = listen_text
            .parse::<SocketAddr>()
            .map_err(|_| errors.push(format!("--listen {listen_text:?} is not an address like 0.0.0.0:50051")))
            .ok();
        if self.dev && self.no_admin {
            errors
                .push("--dev mints an admin key for KeyAdmin, which --no-admin turns off: drop one of the two".into());
        }
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                let cert = read_pem("tls-cert", cert, "CERTIFICATE", &mut errors);
                let key = read_pem("tls-key", key, "", &mut errors).and_then(|k| {
                    if String::from_utf8_lossy(&k).contains("PRIVATE KEY") {
                        Some(k)
                    } else {
                        errors.push(format!("--tls-key {}: not a PEM private key", key.display()));
                        None
                    }
                });
                let client_ca = self
                    .tls_client_ca
                    .as_deref()
                    .and_then(|p| read_pem("tls-client-ca", p, "CERTIFICATE", &mut errors));
                match (cert, key) {
                    (Some(cert), Some(key)) => {
                        let tls =
                            ServerTls { cert, key: Secret::new(String::from_utf8_lossy(&key).into_owned()), client_ca };
                        match tls.check() {
                            Ok(_) => Some(tls),
                            Err(e) => {
                                errors.push(format!("--tls-cert/--tls-key: {}", error_chain(&e)));
                                None
                            }
                        }
                    }
                    _ => None,
                }
            }
            (None, None) => {
                if self.tls_client_ca.is_some() {
                    errors.push("--tls-client-ca needs --tls-cert and --tls-key".into());
                }
                None
            }
            _ => {
                errors.push("--tls-cert and --tls-key go together".into());
                None
            }
        };
        let cache_max_entries = number::<u64>("cache-max-entries", &self.cache_max_entries, &mut errors);
        let cache_max_bytes = match bytes(&self.cache_max_bytes) {
            Some(n) if (1 << 20..=1 << 40).contains(&n) => Some(n),
            Some(_) => {
                errors.push(format!("--cache-max-bytes {:?} must be between 1MiB and 1TiB", self.cache_max_bytes));
                None
            }
            None => {
                errors.push(format!(
                    "--cache-max-bytes {:?} must be a number of bytes, optionally with KiB, MiB or GiB",
                    self.cache_max_bytes
                ));
                None
            }
        };
        let failed_attempts_per_minute =
            number::<u32>("failed-attempts-per-minute", &self.failed_attempts_per_minute, &mut errors);
        let max_concurrent_streams = number::<u32>("max-concurrent-streams", &self.max_concurrent_streams, &mut errors);
        let max_inflight_per_connection =
            number::<usize>("max-inflight-per-connection", &self.max_inflight_per_connection, &mut errors);
        let max_connections = number::<usize>("max-connections", &self.max_connections, &mut errors);
        let max_queued_calls = number::<usize>("max-queued-calls", &self.max_queued_calls, &mut errors);
        let queued_calls_per_connection =
            number::<usize>("queued-calls-per-connection", &self.queued_calls_per_connection, &mut errors);
        if queued_calls_per_connection == Some(0) {
            errors.push("--queued-calls-per-connection must be more than 0".into());
        }
        let max_inflight = number::<usize>("max-inflight", &self.max_inflight, &mut errors);
        let request_timeout = duration(&self.request_timeout)
            .map_err(|e| errors.push(format!("--request-timeout {:?}: {e}", self.request_timeout)))
            .ok();
        let idle_timeout = match duration(&self.idle_timeout) {
            Ok(d) if d.is_zero() => Some(None),
            Ok(d) if d < Duration::from_secs(35) => {
                errors.push(format!(
                    "--idle-timeout {:?} must be 0 (never) or more than 35s: live clients are only pinged every 30s",
                    self.idle_timeout
                ));
                None
            }
            Ok(d) => Some(Some(d)),
            Err(e) => {
                errors.push(format!("--idle-timeout {:?}: {e}", self.idle_timeout));
                None
            }
        };
        if max_connections == Some(0) || max_inflight == Some(0) {
            errors.push("--max-connections and --max-inflight must be more than 0".into());
        }
        let workers = match &self.workers {
            Some(w) => number::<usize>("workers", w, &mut errors).map(Some),
            None => Some(None),
        };
        let runtime = match self.runtime.trim() {
            "per-core" => Some(RuntimeKind::PerCore),
            "work-stealing" => Some(RuntimeKind::WorkStealing),
            other => {
                errors.push(format!("--runtime {other:?} must be per-core or work-stealing"));
                None
            }
        };
        let log_format = match self.log_format.trim() {
            "plain" => Some(LogFormat::Plain),
            "json" => Some(LogFormat::Json),
            other => {
                errors.push(format!("--log-format {other:?} must be plain or json"));
                None
            }
        };
        let metrics_listen = match &self.metrics_listen {
            Some(m) if !m.trim().is_empty() => m
                .parse::<SocketAddr>()
                .map_err(|_| errors.push(format!("--metrics-listen {m:?} is not an address like 0.0.0.0:9090")))
                .ok(),
            _ => None,
        };
        if metrics_listen.is_some() && metrics_listen == listen {
            errors.push("--metrics-listen must differ from --listen".into());
        }
        let http_listen = match &self.http_listen {
            Some(h) if !h.trim().is_empty() => h
                .parse::<SocketAddr>()
                .map_err(|_| errors.push(format!("--http-listen {h:?} is not an address like 0.0.0.0:8080")))
                .ok(),
            _ => None,
        };
        if http_listen.is_some() && (http_listen == listen || http_listen == metrics_listen) {
            errors.push("--http-listen must differ from --listen and --metrics-listen".into());
        }
        let tokens = self.token_settings(&mut errors);
        let known_keys = match self.known_keys.trim().parse::<usize>() {
            Ok(n) if n <= 100_000_000 => n,
            _ => {
                errors.push(format!("--known-keys {:?} must be a number of keys from 0 to 100000000", self.known_keys));
                0
            }
        };
        let proxy = self.proxy_settings(&mut errors);
        let ext_authz_max_request_bytes = match self.ext_authz_max_request_bytes.trim().parse::<usize>() {
            Ok(n) if (1024..=4 * 1024 * 1024).contains(&n) => n,
            _ => {
                errors.push(format!(
                    "--ext-authz-max-request-bytes {:?} must be a number of bytes from 1024 to 4194304",
                    self.ext_authz_max_request_bytes
                ));
                0
            }
        };
        let mut dur = |name: &str, v: &str| duration(v).map_err(|e| errors.push(format!("--{name} {v:?}: {e}"))).ok();
        let cache_ttl = dur("cache-ttl", &self.cache_ttl);
        let negative_ttl = dur("negative-ttl", &self.negative_ttl);
        let stale_window = dur("stale-window", &self.stale_window);
        let store_timeout = dur("store-timeout", &self.store_timeout);
        let feed_grace = dur("feed-grace", &self.feed_grace);
        let shutdown_grace = dur("shutdown-grace", &self.shutdown_grace);
        let last_used_flush = dur("last-used-flush", &self.last_used_flush);
        if cache_ttl.is_some_and(|d| d.is_zero()) {
            errors.push("--cache-ttl must be more than 0".into());
        }
        if store_timeout.is_some_and(|d| d.is_zero() || d > Duration::from_secs(30)) {
            errors.push("--store-timeout must be between 1ms and 30s".into());
        }
        if last_used_flush.is_some_and(|d| d < Duration::from_secs(1)) {
            errors.push("--last-used-flush must be at least 1s".into());
        }
        let mut envs = Vec::new();
        for e in &self.accept_envs {
            match e.trim().parse::<Env>() {
                Ok(env) => envs.push(env),
                Err(msg) => errors.push(format!("--accept-envs: {msg}")),
            }
        }
        // An env that failed to parse is reported once, above.
        let checked_envs = if envs.len() == self.accept_envs.len() { envs } else { Env::ALL.to_vec() };
        let trimmed = |l: &[String]| l.iter().map(|p| p.trim().to_string()).collect::<Vec<_>>();
        let format = match KeyFormat::new(trimmed(&self.key_prefixes), &checked_envs) {
            Ok(f) => match f
                .with_kind_prefixes(trimmed(&self.publishable_key_prefixes), trimmed(&self.restricted_key_prefixes))
            {
                Ok(f) => Some(f),
                Err(es) => {
                    errors.extend(es.into_iter().map(|e| format!("key prefixes: {e}")));
                    None
                }
            },
            Err(es) => {
                errors.extend(es.into_iter().map(|e| format!("--key-prefix/--accept-envs: {e}")));
                None
            }
        };
        let default_rate_limit = match &self.default_rate_limit {
            None => None,
            Some(s) if s.trim().is_empty() || s == "none" => None,
            Some(s) => s.parse::<RateLimitPolicy>().map_err(|e| errors.push(format!("--default-rate-limit: {e}"))).ok(),
        };
        let mut limits = Vec::new();
        for l in self.limits.iter().filter(|l| !l.trim().is_empty()) {
            match l.trim().parse::<LimitSpec>() {
                Ok(spec) => limits.push(spec),
                Err(e) => errors.push(format!("--limit: {e}")),
            }
        }
        errors.extend(crate::limit::named::list_problems(&limits).into_iter().map(|e| format!("--limit: {e}")));
        let limit_slack = match self.limit_slack.trim().parse::<f64>() {
            Ok(x) if x > 0.0 && x <= 1.0 => Some(x),
            _ => {
                errors.push(format!("--limit-slack {:?} must be a number above 0 and at most 1", self.limit_slack));
                None
            }
        };
        let limit_lease_idle = duration(&self.limit_lease_idle)
            .map_err(|e| errors.push(format!("--limit-lease-idle {:?}: {e}", self.limit_lease_idle)))
            .ok();
        if limit_lease_idle.is_some_and(|d| d < Duration::from_millis(100) || d > Duration::from_secs(60)) {
            errors.push("--limit-lease-idle must be between 100ms and 60s".into());
        }
        if cache_max_entries == Some(0) {
            errors.push("--cache-max-entries must be more than 0".into());
        }
        if max_concurrent_streams == Some(0) {
            errors.push("--max-concurrent-streams must be more than 0".into());
        }
        if max_inflight_per_connection == Some(0) {
            errors.push("--max-inflight-per-connection must be more than 0".into());
        }
        if let Some(Some(w)) = workers
            && (w == 0 || w > 1024)
        {
            errors.push("--workers must be between 1 and 1024".into());
        }
        let store = self.redis.store(Duration::from_secs(1), &mut errors);

        // An empty KEYSTILE_PEPPER is no pepper (a template left blank).
        let inline = self.pepper.as_ref().filter(|p| !p.expose().trim().is_empty());
        let mut warnings = Vec::new();
        if http_listen.is_some()
            && self.routes.is_some()
            && proxy.trusted_hops == 0
            && proxy.forward_auth_headers != crate::proxy::ForwardAuthHeaders::Request
        {
            warnings.push(
                "forward-auth on /authz sees the proxy's own address as every client's (IP allowlists and \
                 failed-attempt shedding apply to the proxy): behind nginx, Traefik or Caddy run with --trusted-hops 1"
                    .to_string(),
            );
        }
        if let Some(p) = inline
            && std::env::var("KEYSTILE_PEPPER").ok().as_deref() != Some(p.expose())
        {
            warnings.push(
                "--pepper puts the pepper in the process list and the shell history: prefer --pepper-file or \
                 KEYSTILE_PEPPER"
                    .to_string(),
            );
        }
        let (current, pepper_generated) = match (&self.pepper_file, inline) {
            (Some(_), Some(_)) => {
                errors.push("give the pepper either by --pepper-file or by KEYSTILE_PEPPER, not both".into());
                (None, false)
            }
            (Some(path), None) => (read_pepper(path).map_err(|e| errors.push(e)).ok(), false),
            (None, Some(hex)) => {
                (Pepper::parse_hex(hex.expose()).map_err(|e| errors.push(format!("KEYSTILE_PEPPER: {e}"))).ok(), false)
            }
            (None, None) if self.dev => (Some(Pepper::random()), true),
            (None, None) => {
                errors.push("a pepper is required: --pepper-file <file> or KEYSTILE_PEPPER (64 hex characters; generate one with `openssl rand -hex 32`), or --dev".into());
                (None, false)
            }
        };
        let previous: Vec<Pepper> =
            self.previous_pepper_file.iter().filter_map(|p| read_pepper(p).map_err(|e| errors.push(e)).ok()).collect();

        if !errors.is_empty() {
            return Err(errors);
        }
        let (
            Some(listen),
            Some(format),
            Some(current),
            Some(cache_max_entries),
            Some(failed_attempts_per_minute),
            Some(max_concurrent_streams),
            Some(max_inflight_per_connection),
            Some(workers),
            Some(runtime),
            Some(log_format),
        ) = (
            listen,
            format,
            current,
            cache_max_entries,
            failed_attempts_per_minute,
            max_concurrent_streams,
            max_inflight_per_connection,
            workers,
            runtime,
            log_format,
        )
        else {
            return Err(vec!["invalid configuration".into()]);
        };
        let engine = EngineSettings {
            format,
            peppers: PepperSet::new(current, previous),
            cache: CacheSettings {
                ttl: cache_ttl.unwrap_or_default(),
                negative_ttl: negative_ttl.unwrap_or_default(),
                stale_window: stale_window.unwrap_or_default(),
                max_entries: cache_max_entries,
                max_bytes: cache_max_bytes.unwrap_or(crate::cache::DEFAULT_MAX_BYTES),
                feed_grace: feed_grace.unwrap_or_default(),
                known_keys,
                encoded_answers: self.ext_authz,
            },
            default_rate_limit,
            limits,
            fleet: (!self.local_limits).then(|| FleetSettings {
                slack: limit_slack.unwrap_or(0.01),
                lease_idle: limit_lease_idle.unwrap_or(Duration::from_secs(1)),
                timeout: store_timeout.unwrap_or_default(),
            }),
            failed_attempts_per_minute: NonZeroU32::new(failed_attempts_per_minute),
            store_timeout: store_timeout.unwrap_or_default(),
            allow_star_scope: self.allow_star_scope,
            tokens,
            proxy,
        };
        Ok(ServeConfig {
            listen,
            metrics_listen,
            http_listen,
            store,
            dev: self.dev,
            engine,
            server: ServerOptions {
                front_ends: [
                    Some(FrontEnd::Verifier),
                    (!self.no_admin).then_some(FrontEnd::KeyAdmin),
                    Some(FrontEnd::TokenExchange),
                    self.ext_authz.then_some(FrontEnd::ExtAuthz),
                ]
                .into_iter()
                .flatten()
                .collect(),
                ext_authz_max_request_bytes,
                max_concurrent_streams,
                max_inflight_per_connection,
                max_connections: max_connections.unwrap_or(1),
                max_inflight: max_inflight.unwrap_or(1),
                request_timeout: request_timeout.unwrap_or(Duration::from_secs(30)),
                idle_timeout: idle_timeout.flatten(),
                tls,
                shutdown_grace: shutdown_grace.unwrap_or_default(),
                last_used_flush: last_used_flush.unwrap_or_default(),
                writes: None,
                fairness: crate::service::fairness::FairnessSettings {
                    busy_above: max_queued_calls.unwrap_or(1),
                    per_connection: queued_calls_per_connection.unwrap_or(1),
                },
                cores: 1,
            },
            workers,
            runtime,
            log_format,
            pepper_generated,
            warnings,
        })
    }
}

/// The arguments a TOML settings file adds to the command line `matches`
/// were parsed from: one `--flag=value` per setting that neither a flag nor
/// an environment variable gave (so precedence is flag > environment > file
/// > default). Returns every problem in the file.
pub fn file_args(path: &std::path::Path, matches: &clap::ArgMatches) -> Result<Vec<String>, Vec<String>> {
    use clap::CommandFactory;
    use clap::parser::ValueSource;
    #[derive(clap::Parser)]
    struct Probe {
        #[command(flatten)]
        serve: ServeArgs,
    }
    let file = || format!("config file {}", path.display());
    let text = std::fs::read_to_string(path).map_err(|e| vec![format!("{}: {e}", file())])?;
    let table: toml::Table = text.parse().map_err(|e| vec![format!("{}: {e}", file())])?;
    let command = Probe::command();
    let mut errors = Vec::new();
    let mut args = Vec::new();
    for (key, value) in &table {
        let name = key.replace('-', "_");
        let Some(arg) = command.get_arguments().find(|a| a.get_long().is_some_and(|l| l.replace('-', "_") == name))
        else {
            errors.push(format!("{}: unknown setting {key:?}", file()));
            continue;
        };
        let id = arg.get_id().as_str();
        if id == "config" || id == "pepper" {
            errors.push(format!("{}: {key:?} cannot be set in a file (use pepper_file for the pepper)", file()));
            continue;
        }
        if matches!(matches.value_source(id), Some(ValueSource::CommandLine | ValueSource::EnvVariable)) {
            continue;
        }
        let long = arg.get_long().expect("filtered on a long name");
        let is_switch = matches!(arg.get_action(), clap::ArgAction::SetTrue);
        let text = match value {
            toml::Value::Boolean(on) if is_switch => {
                if *on {
                    args.push(format!("--{long}"));
                }
                continue;
            }
            _ if is_switch => {
                errors.push(format!("{}: {key:?} must be true or false", file()));
                continue;
            }
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Array(items) => items
                .iter()
                .map(|v| match v {
                    toml::Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect::<Vec<_>>()
                .join(","),
            other => {
                errors.push(format!("{}: {key:?} has an unsupported value {other}", file()));
                continue;
            }
        };
        args.push(format!("--{long}={text}"));
    }
    if errors.is_empty() { Ok(args) } else { Err(errors) }
}

/// Reads a pepper file; the error names the file, never its content.
/// The file is refused when others may write it (anyone who can change the
/// pepper can make every key fail), when it is larger than a pepper can be,
/// or when it is not 64 hex characters of a non-zero pepper.
pub fn read_pepper(path: &PathBuf) -> Result<Pepper, String> {
    const MAX_PEPPER_FILE: u64 = 1024;
    let fail = |e: &dyn std::fmt::Display| format!("pepper file {}: {e}", path.display());
    let meta = std::fs::metadata(path).map_err(|e| fail(&e))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o022 != 0 {
            return Err(fail(&"group or others may write it; make it writable by its owner only (chmod 600)"));
        }
    }
    if meta.len() > MAX_PEPPER_FILE {
        return Err(fail(&format_args!("{} bytes is not a pepper (64 hex characters)", meta.len())));
    }
    let text = std::fs::read_to_string(path).map_err(|e| fail(&e))?;
    Pepper::parse_hex(&text).map_err(|e| fail(&e))
}

impl ServeConfig {
    /// The effective configuration as log fields, secrets left out.
    pub fn summary(&self) -> String {
        let store = self.store.describe();
        format!(
            "listen={} tls={} metrics={} store={} pepper_id={} cache_ttl={:?} negative_ttl={:?} stale_window={:?} store_timeout={:?} default_rate_limit={} failed_attempts_per_minute={} admin={} max_concurrent_streams={}",
            self.listen,
            match &self.server.tls {
                None => "off",
                Some(t) if t.client_ca.is_some() => "mutual",
                Some(_) => "on",
            },
            self.metrics_listen.map_or("off".to_string(), |a| a.to_string()),
            store,
            self.engine.peppers.current().id(),
            self.engine.cache.ttl,
            self.engine.cache.negative_ttl,
            self.engine.cache.stale_window,
            self.engine.store_timeout,
            self.engine.default_rate_limit.map_or("none".to_string(), |p| format!(
                "{}/{}s:{}",
                p.requests,
                p.window_seconds,
                p.effective_burst()
            )),
            self.engine.failed_attempts_per_minute.map_or(0, |n| n.get()),
            self.server.front_ends.contains(&FrontEnd::KeyAdmin),
            self.server.max_concurrent_streams,
        )
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn args(a: &[&str]) -> ServeArgs {
        Cli::parse_from(std::iter::once("keystile").chain(a.iter().copied())).serve
    }

    #[test]
    fn dev_needs_nothing_else() {
        let c = args(&["--dev"]).validate().unwrap();
        assert!(c.pepper_generated);
        assert!(matches!(c.store, StoreConfig::Memory));
        assert!(!c.summary().contains("Pepper("));
    }

    /// Keys are weighed with the answer parts ext_authz keeps for them
    /// only when ext_authz is served (README, "Memory budget").
    #[test]
    fn ext_authz_weighs_the_answer_parts_it_keeps() {
        assert!(!args(&["--dev"]).validate().unwrap().engine.cache.encoded_answers);
        assert!(args(&["--dev", "--ext-authz"]).validate().unwrap().engine.cache.encoded_answers);
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let errs = args(&[
            "--listen",
            "nowhere",
            "--cache-ttl",
            "forever",
            "--key-prefix",
            "A",
            "--accept-envs",
            "prod",
            "--default-rate-limit",
            "lots",
            "--redis-url",
            "http://x",
        ])
        .validate()
        .unwrap_err();
        let text = errs.join("\n");
        for needle in
            ["--listen", "--cache-ttl", "prefix", "prod", "--default-rate-limit", "--redis-url", "pepper is required"]
        {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
    }

    #[test]
    fn debug_of_the_arguments_shows_no_secret() {
        use ed25519_dalek::pkcs8::EncodePrivateKey;
        let dir = std::env::temp_dir().join(format!("keystile-debug-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pem = ed25519_dalek::SigningKey::from_bytes(&[3u8; 32]).to_pkcs8_pem(Default::default()).unwrap();
        let file = dir.join("signing.pem");
        std::fs::write(&file, pem.as_bytes()).unwrap();
        let a = args(&[
            "--redis-url",
            "redis://app:hunter2@redis:6379",
            "--pepper",
            &"ab".repeat(32),
            "--jwt-key-file",
            file.to_str().unwrap(),
        ]);
        let shown = format!("{a:?} {:?}", a.validate().unwrap());
        let pem_body = pem.lines().nth(1).unwrap().to_string();
        assert!(!shown.contains("hunter2") && !shown.contains(&"ab".repeat(32)), "{shown}");
        assert!(!shown.contains(&pem_body), "no signing key in Debug: {shown}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
