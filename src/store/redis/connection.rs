//! How the Redis store reaches Redis, in one place: [`Connection`] for
//! commands and scripts, [`FeedLink`] for the change feed's pub/sub and
//! stream reads. Today a single node behind redis-rs's `ConnectionManager`
//! (reconnects on its own); a topology that needs another client
//! (Sentinel, Cluster) is a new variant of both, and the store, the
//! scripts and the feed's logic do not change.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, Pipeline, RedisFuture, Value};

use crate::secret::RedisUrl;

/// Where the store's Redis is and how to reach it.
#[derive(Debug, Clone)]
pub struct Topology {
    /// `redis://`, `rediss://` or `unix://`.
    pub url: RedisUrl,
    /// Bounds connecting and every command.
    pub timeout: Duration,
}

/// A cloneable, multiplexed connection for commands and scripts.
#[derive(Clone)]
pub enum Connection {
    Single(ConnectionManager),
}

/// What [`open`] hands the store.
pub struct Opened {
    pub conn: Connection,
    pub feed: FeedLink,
}

/// The change feed's own connections, opened afresh on every (re)connect.
#[derive(Clone)]
pub enum FeedLink {
    Single(redis::Client),
}

impl FeedLink {
    /// A pub/sub connection.
    pub async fn pubsub(&self) -> redis::RedisResult<redis::aio::PubSub> {
        match self {
            FeedLink::Single(client) => client.get_async_pubsub().await,
        }
    }

    /// A connection for reading the event stream.
    pub async fn commands(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        match self {
            FeedLink::Single(client) => client.get_multiplexed_async_connection().await,
        }
    }
}

/// Connects lazily: a sidecar starts even when Redis is not up yet, and
/// reports NOT_SERVING until it is.
pub fn open(topology: &Topology) -> redis::RedisResult<Opened> {
    let client = redis::Client::open(topology.url.expose())?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(topology.timeout))
        .set_response_timeout(Some(topology.timeout))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(500));
    let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)?;
    Ok(Opened { conn: Connection::Single(conn), feed: FeedLink::Single(client) })
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
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
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
        }
    }
}
