//! How the Redis store reaches Redis, in one place: [`Connection`] for
//! commands and scripts, [`FeedLink`] for the change feed's pub/sub and
//! stream reads (README, "Storage, cache and revocation").
//!
//! - **Single**: one endpoint behind redis-rs's `ConnectionManager`, which
//!   reconnects on its own; `rediss://` for TLS with the system roots or a
//!   CA file, and an optional client certificate.
//! - **Sentinel**: the sentinels are asked for the primary; its connection
//!   is dropped and the primary asked for again when it refuses a write
//!   (`READONLY`: it was demoted by a failover) or cannot be reached. The
//!   feed resolves the primary on every reconnect, so after a failover it
//!   replays from the new primary's stream, or drops the cache when that
//!   stream is behind (asynchronous replication can lose its newest
//!   entries).
//!
//! - **Cluster**: redis-rs's cluster connection follows MOVED/ASK and
//!   failovers; the store spreads records over [`CLUSTER_PARTITIONS`]
//!   hash-tagged partitions. The feed subscribes on any one node: a classic
//!   PUBLISH reaches every node of a cluster.
//!
//! Adding a topology is a variant of both types; the store, the scripts and
//! the feed's logic do not change.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{Cmd, ConnectionAddr, Pipeline, RedisError, RedisFuture, TlsCertificates, TlsMode, Value};

/// Partitions of the key space on Redis Cluster: enough hash slots that
/// records spread over every shard of a usual cluster, few enough that a
/// feed resync (three reads per partition) stays cheap.
pub const CLUSTER_PARTITIONS: u16 = 16;

use crate::secret::{RedisUrl, Secret};

/// Where the store's Redis is and how to reach it.
#[derive(Debug, Clone)]
pub struct Topology {
    pub nodes: Nodes,
    /// TLS settings; `None` = plaintext.
    pub tls: Option<RedisTls>,
    /// Bounds connecting and every command.
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
pub enum Nodes {
    /// `redis://`, `rediss://` or `unix://`.
    Single(RedisUrl),
    Sentinel {
        /// `host:port` of each sentinel.
        sentinels: Vec<String>,
        /// The name the sentinels monitor the primary under.
        master: String,
        sentinel_password: Option<Secret>,
        /// Password of the data nodes.
        password: Option<Secret>,
    },
    Cluster {
        /// `host:port` of some of the nodes; the rest are discovered.
        seeds: Vec<String>,
        password: Option<Secret>,
    },
}

/// TLS to Redis: the CA to trust (default: the system's roots), a client
/// certificate and key, and the test-only opt-out of verification.
#[derive(Clone)]
pub struct RedisTls {
    pub ca: Option<Vec<u8>>,
    pub client: Option<(Vec<u8>, Secret)>,
    pub insecure: bool,
}

impl std::fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTls")
            .field("ca", &self.ca.is_some())
            .field("client_certificate", &self.client.is_some())
            .field("insecure", &self.insecure)
            .finish()
    }
}

impl RedisTls {
    fn certificates(&self) -> TlsCertificates {
        TlsCertificates {
            client_tls: self.client.as_ref().map(|(cert, key)| redis::ClientTlsConfig {
                client_cert: cert.clone(),
                client_key: key.expose().as_bytes().to_vec(),
            }),
            root_cert: self.ca.clone(),
        }
    }
}

impl Topology {
    /// For logs and errors: where Redis is, never a password.
    pub fn describe(&self) -> String {
        let tls = if self.tls.is_some() { " (tls)" } else { "" };
        match &self.nodes {
            Nodes::Single(url) => format!("{url}{tls}"),
            Nodes::Sentinel { sentinels, master, .. } => {
                format!("primary {master:?} of sentinels {}{tls}", sentinels.join(","))
            }
            Nodes::Cluster { seeds, .. } => format!("cluster of {}{tls}", seeds.join(",")),
        }
    }

    /// How many partitions the store's keys are spread over.
    pub fn partitions(&self) -> u16 {
        match self.nodes {
            Nodes::Cluster { .. } => CLUSTER_PARTITIONS,
            _ => 1,
        }
    }

    fn manager_config(&self) -> ConnectionManagerConfig {
        ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500))
    }
}

/// A cloneable, multiplexed connection for commands and scripts.
#[derive(Clone)]
pub enum Connection {
    Single(ConnectionManager),
    Sentinel(Arc<SentinelLink>),
    Cluster(redis::cluster_async::ClusterConnection),
    /// One plain connection (the feed's stream reads on a single node).
    Direct(redis::aio::MultiplexedConnection),
}

/// What [`open`] hands the store.
pub struct Opened {
    pub conn: Connection,
    pub feed: FeedLink,
}

/// The change feed's own connections, opened afresh on every (re)connect.
#[derive(Clone)]
pub enum FeedLink {
    Single(Box<redis::Client>),
    Sentinel(Arc<SentinelLink>),
    Cluster { nodes: Vec<redis::Client>, commands: redis::cluster_async::ClusterConnection },
}

impl FeedLink {
    /// A pub/sub connection.
    pub async fn pubsub(&self) -> redis::RedisResult<redis::aio::PubSub> {
        match self {
            FeedLink::Single(client) => client.get_async_pubsub().await,
            FeedLink::Sentinel(link) => link.primary_client().await?.get_async_pubsub().await,
            FeedLink::Cluster { nodes, .. } => {
                // Any node will do; the first that answers.
                let mut last = None;
                for node in nodes {
                    match node.get_async_pubsub().await {
                        Ok(p) => return Ok(p),
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.unwrap_or_else(|| RedisError::from(std::io::Error::other("no cluster node given"))))
            }
        }
    }

    /// A watch that changes when the feed must reconnect because the
    /// primary changed (Sentinel); `None` for the other topologies. Taken
    /// once per feed session, before connecting, so no change is missed.
    pub fn watch_switches(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        match self {
            FeedLink::Sentinel(link) => Some(link.watch_switches()),
            _ => None,
        }
    }

    /// A connection for reading the event streams.
    pub async fn commands(&self) -> redis::RedisResult<Connection> {
        match self {
            FeedLink::Single(client) => Ok(Connection::Direct(client.get_multiplexed_async_connection().await?)),
            FeedLink::Sentinel(link) => {
                Ok(Connection::Direct(link.primary_client().await?.get_multiplexed_async_connection().await?))
            }
            FeedLink::Cluster { commands, .. } => Ok(Connection::Cluster(commands.clone())),
        }
    }
}

/// Connects lazily: a sidecar starts even when Redis is not up yet, and
/// reports NOT_SERVING (and why, in its log) until it is.
pub fn open(topology: &Topology) -> redis::RedisResult<Opened> {
    match &topology.nodes {
        Nodes::Single(url) => {
            let client = match &topology.tls {
                None => redis::Client::open(url.expose())?,
                Some(tls) => {
                    // redis-rs's switch for "verify nothing" is the URL's
                    // `#insecure` fragment.
                    let url =
                        if tls.insecure { format!("{}#insecure", url.expose()) } else { url.expose().to_string() };
                    redis::Client::build_with_tls(url, tls.certificates())?
                }
            };
            let conn = ConnectionManager::new_lazy_with_config(client.clone(), topology.manager_config())?;
            Ok(Opened { conn: Connection::Single(conn), feed: FeedLink::Single(Box::new(client)) })
        }
        Nodes::Sentinel { sentinels, master, sentinel_password, password } => {
            let tls_mode = topology.tls.as_ref().map(|t| if t.insecure { TlsMode::Insecure } else { TlsMode::Secure });
            let addrs = sentinels.iter().map(|s| {
                let (host, port) = s.rsplit_once(':').unwrap_or((s, "26379"));
                let (host, port) = (host.to_string(), port.parse().unwrap_or(26379));
                match &topology.tls {
                    None => ConnectionAddr::Tcp(host, port),
                    Some(t) => ConnectionAddr::TcpTls { host, port, insecure: t.insecure, tls_params: None },
                }
            });
            let mut builder = SentinelClientBuilder::new(addrs, master, SentinelServerType::Master)?;
            if let Some(p) = sentinel_password {
                builder = builder.set_client_to_sentinel_password(p.expose());
            }
            if let Some(p) = password {
                builder = builder.set_client_to_redis_password(p.expose());
            }
            if let (Some(mode), Some(tls)) = (tls_mode, &topology.tls) {
                builder = builder
                    .set_client_to_redis_tls_mode(mode)
                    .set_client_to_redis_certificates(tls.certificates())
                    .set_client_to_sentinel_tls_mode(mode)
                    .set_client_to_sentinel_certificates(tls.certificates());
            }
            let link = Arc::new(SentinelLink {
                sentinel: tokio::sync::Mutex::new(builder.build()?),
                current: RwLock::new(None),
                config: topology.manager_config(),
                timeout: topology.timeout,
                primary: RwLock::new(None),
                switched: tokio::sync::watch::channel(0).0,
            });
            tokio::spawn(SentinelLink::watch_primary(Arc::downgrade(&link)));
            Ok(Opened { conn: Connection::Sentinel(link.clone()), feed: FeedLink::Sentinel(link) })
        }
        Nodes::Cluster { seeds, password } => {
            let scheme = if topology.tls.is_some() { "rediss" } else { "redis" };
            let fragment = if topology.tls.as_ref().is_some_and(|t| t.insecure) { "#insecure" } else { "" };
            let urls: Vec<String> = seeds.iter().map(|s| format!("{scheme}://{s}{fragment}")).collect();
            let mut builder = redis::cluster::ClusterClientBuilder::new(urls.clone())
                .connection_timeout(topology.timeout)
                .response_timeout(topology.timeout);
            if let Some(p) = password {
                builder = builder.password(p.expose());
            }
            if let Some(tls) = &topology.tls {
                builder = builder
                    .tls(if tls.insecure { TlsMode::Insecure } else { TlsMode::Secure })
                    .certs(tls.certificates());
            }
            let client = builder.build()?;
            let config = redis::cluster::ClusterConfig::new()
                .set_connection_timeout(topology.timeout)
                .set_response_timeout(topology.timeout);
            let conn = client.get_pending_async_connection_with_config(config);
            let nodes = urls
                .iter()
                .map(|url| {
                    let mut info = redis::IntoConnectionInfo::into_connection_info(url.as_str())?;
                    if let Some(p) = password {
                        let settings = info.redis_settings().clone().set_password(p.expose());
                        info = info.set_redis_settings(settings);
                    }
                    match &topology.tls {
                        None => redis::Client::open(info),
                        Some(tls) => redis::Client::build_with_tls(info, tls.certificates()),
                    }
                })
                .collect::<redis::RedisResult<Vec<_>>>()?;
            Ok(Opened { conn: Connection::Cluster(conn.clone()), feed: FeedLink::Cluster { nodes, commands: conn } })
        }
    }
}

/// The primary as the sentinels name it, and a connection to it that is
/// dropped when it stops being the primary.
pub struct SentinelLink {
    sentinel: tokio::sync::Mutex<SentinelClient>,
    current: RwLock<Option<ConnectionManager>>,
    config: ConnectionManagerConfig,
    timeout: Duration,
    /// The primary's address as the sentinels last named it.
    primary: RwLock<Option<String>>,
    /// Bumped when the sentinels name another primary: the feed reconnects
    /// (and resyncs) on it.
    switched: tokio::sync::watch::Sender<u64>,
}

/// How often the sentinels are asked who the primary is, so that a sidecar
/// that can still reach a primary cut off from the sentinels leaves it
/// within about this long of the promotion.
const PRIMARY_CHECK_EVERY: Duration = Duration::from_secs(1);

impl SentinelLink {
    /// A client for the primary the sentinels name now.
    async fn primary_client(&self) -> redis::RedisResult<redis::Client> {
        let ask = async { self.sentinel.lock().await.async_get_client().await };
        let client = tokio::time::timeout(self.timeout * 4, ask).await.map_err(|_| {
            RedisError::from(std::io::Error::new(std::io::ErrorKind::TimedOut, "no sentinel named the primary in time"))
        })??;
        self.note_primary(&client);
        Ok(client)
    }

    /// Records the primary's address; a change forgets the old connection
    /// and tells the feed.
    fn note_primary(&self, client: &redis::Client) {
        let addr = client.get_connection_info().addr().to_string();
        let mut known = self.primary.write().unwrap_or_else(|e| e.into_inner());
        if known.as_deref() != Some(addr.as_str()) {
            let moved = known.is_some();
            *known = Some(addr.clone());
            drop(known);
            if moved {
                tracing::warn!(primary = %addr, "the sentinels name another primary; reconnecting");
                self.forget_primary();
                self.switched.send_modify(|n| *n += 1);
            }
        }
    }

    /// Asks the sentinels who the primary is, every [`PRIMARY_CHECK_EVERY`],
    /// for as long as the link lives.
    async fn watch_primary(link: std::sync::Weak<SentinelLink>) {
        loop {
            tokio::time::sleep(PRIMARY_CHECK_EVERY).await;
            let Some(link) = link.upgrade() else { return };
            let _ = link.primary_client().await;
        }
    }

    /// A watch on primary changes; it sees every change after this call.
    pub fn watch_switches(&self) -> tokio::sync::watch::Receiver<u64> {
        self.switched.subscribe()
    }

    async fn connection(&self) -> redis::RedisResult<ConnectionManager> {
        if let Some(c) = self.current.read().unwrap_or_else(|e| e.into_inner()).clone() {
            return Ok(c);
        }
        let client = self.primary_client().await?;
        let conn = ConnectionManager::new_lazy_with_config(client, self.config.clone())?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(conn.clone());
        Ok(conn)
    }

    fn forget_primary(&self) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// The answer says this node is not the primary any more, or could not be
/// reached: ask the sentinels again.
/// `NOREPLICAS` is a primary that lost its replicas (`min-replicas-to-write`):
/// during a failover, the old primary before the sentinels demote it.
fn primary_lost(e: &RedisError) -> bool {
    matches!(e.code(), Some("READONLY" | "NOREPLICAS"))
        || e.is_connection_refusal()
        || e.is_connection_dropped()
        || e.is_io_error()
}

/// Whether the command certainly did not run (so it may be sent again).
fn not_applied(e: &RedisError) -> bool {
    matches!(e.code(), Some("READONLY" | "NOREPLICAS")) || e.is_connection_refusal()
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
            Connection::Direct(c) => c.req_packed_command(cmd),
            Connection::Sentinel(link) => Box::pin(async move {
                let mut conn = link.connection().await?;
                match conn.req_packed_command(cmd).await {
                    Err(e) if primary_lost(&e) => {
                        link.forget_primary();
                        if !not_applied(&e) {
                            return Err(e);
                        }
                        link.connection().await?.req_packed_command(cmd).await
                    }
                    other => other,
                }
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Direct(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Sentinel(link) => Box::pin(async move {
                let mut conn = link.connection().await?;
                match conn.req_packed_commands(pipeline, offset, count).await {
                    Err(e) if primary_lost(&e) => {
                        link.forget_primary();
                        if !not_applied(&e) {
                            return Err(e);
                        }
                        link.connection().await?.req_packed_commands(pipeline, offset, count).await
                    }
                    other => other,
                }
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
            Connection::Direct(c) => c.get_db(),
            Connection::Sentinel(_) => 0,
        }
    }
}
