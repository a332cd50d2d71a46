//! The production store: Redis, shared by every replica.
//!
//! Layout under a namespace (default `keystile`):
//! - `<ns>:key:<key_id>` — hash `{r: record JSON, v: version, t: list token}`
//! - `<ns>:index` — sorted set of list tokens (creation time, key_id), read
//!   with ZRANGEBYLEX for stable paging
//! - `<ns>:last_used` — hash key_id → unix seconds, written in batches
//! - `<ns>:events` — stream of changes (trimmed to about [`STREAM_MAXLEN`]),
//!   and a pub/sub channel of the same name
//!
//! Each mutation is one Lua script: the record, the index, the stream entry
//! and the publish happen together, so no reader can see the new state
//! without its event being on the stream.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};
use tokio::sync::broadcast;
use tokio_stream::StreamExt;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{FEED_CAPACITY, FeedEvent, KeyRecord, KeyStore, ListPage, ListQuery, StoreError, page_token};
use crate::key::KeyId;

/// Approximate length the event stream is trimmed to.
pub const STREAM_MAXLEN: usize = 100_000;
/// How often the subscriber pings to find out that its connection is dead.
const PING_EVERY: Duration = Duration::from_secs(1);
/// Longest a listing scans the index for one page when filters skip records.
const LIST_SCAN_LIMIT: usize = 10_000;

const CREATE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
redis.call('HSET', KEYS[1], 'r', ARGV[1], 'v', ARGV[2], 't', ARGV[3])
redis.call('ZADD', KEYS[2], 0, ARGV[3])
local sid = redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'key_id', ARGV[4])
redis.call('PUBLISH', KEYS[3], sid .. ' ' .. ARGV[4])
return sid
"#;

const UPDATE: &str = r#"
local v = redis.call('HGET', KEYS[1], 'v')
if not v then return -1 end
if v ~= ARGV[3] then return -2 end
redis.call('HSET', KEYS[1], 'r', ARGV[1], 'v', ARGV[2])
local sid = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'key_id', ARGV[4])
redis.call('PUBLISH', KEYS[2], sid .. ' ' .. ARGV[4])
return 1
"#;

const DELETE: &str = r#"
local t = redis.call('HGET', KEYS[1], 't')
if not t then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], t)
redis.call('HDEL', KEYS[3], ARGV[1])
local sid = redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[2], '*', 'key_id', ARGV[1])
redis.call('PUBLISH', KEYS[4], sid .. ' ' .. ARGV[1])
return 1
"#;

const TOUCH: &str = r#"
for i = 1, #ARGV, 2 do
  local id, at = ARGV[i], tonumber(ARGV[i + 1])
  if redis.call('EXISTS', KEYS[1] .. id) == 1 then
    local cur = tonumber(redis.call('HGET', KEYS[2], id) or '0')
    if at > cur then redis.call('HSET', KEYS[2], id, at) end
  end
end
return 1
"#;

#[derive(Clone)]
struct Keys {
    ns: String,
}

impl Keys {
    fn record(&self, id: KeyId) -> String {
        format!("{}:key:{}", self.ns, id)
    }
    fn record_prefix(&self) -> String {
        format!("{}:key:", self.ns)
    }
    fn index(&self) -> String {
        format!("{}:index", self.ns)
    }
    fn last_used(&self) -> String {
        format!("{}:last_used", self.ns)
    }
    fn events(&self) -> String {
        format!("{}:events", self.ns)
    }
}

pub struct RedisStore {
    conn: ConnectionManager,
    keys: Keys,
    feed: broadcast::Sender<FeedEvent>,
    scripts: [Script; 4],
    live: Arc<AtomicBool>,
    _subscriber: DropGuard,
}

fn unavailable(e: redis::RedisError) -> StoreError {
    if e.is_timeout() { StoreError::Timeout } else { StoreError::Unavailable(e.to_string()) }
}

fn decode(json: &str) -> Result<KeyRecord, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn encode(record: &KeyRecord) -> Result<String, StoreError> {
    serde_json::to_string(record).map_err(|e| StoreError::Corrupt(e.to_string()))
}

impl RedisStore {
    /// Opens a store on `url` (`redis://`, `rediss://`, `unix://`). Connects
    /// lazily: a sidecar starts even when Redis is not up yet, and reports
    /// NOT_SERVING until it is. `timeout` bounds every command.
    pub fn open(url: &str, namespace: &str, timeout: Duration) -> Result<RedisStore, StoreError> {
        let client =
            redis::Client::open(url).map_err(|e| StoreError::Unavailable(format!("invalid Redis URL: {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config).map_err(unavailable)?;
        let keys = Keys { ns: namespace.to_string() };
        let (feed, _) = broadcast::channel(FEED_CAPACITY);
        let cancel = CancellationToken::new();
        let live = Arc::new(AtomicBool::new(false));
        tokio::spawn(subscribe_loop(client, keys.clone(), feed.clone(), live.clone(), cancel.clone()));
        Ok(RedisStore {
            conn,
            keys,
            feed,
            scripts: [Script::new(CREATE), Script::new(UPDATE), Script::new(DELETE), Script::new(TOUCH)],
            live,
            _subscriber: cancel.drop_guard(),
        })
    }
}

#[async_trait]
impl KeyStore for RedisStore {
    async fn get(&self, id: KeyId) -> Result<Option<KeyRecord>, StoreError> {
        let mut conn = self.conn.clone();
        let key = self.keys.record(id);
        let json: Option<String> = match conn.hget(&key, "r").await {
            // A read is safe to repeat. The first command after Redis came
            // back finds the old connection dead; the manager has already
            // started a new one.
            Err(e) if e.is_connection_dropped() || e.is_io_error() => {
                conn.hget(&key, "r").await.map_err(unavailable)?
            }
            other => other.map_err(unavailable)?,
        };
        json.as_deref().map(decode).transpose()
    }

    async fn create(&self, record: &KeyRecord) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let sid: Option<String> = self.scripts[0]
            .key(self.keys.record(record.key_id))
            .key(self.keys.index())
            .key(self.keys.events())
            .arg(encode(record)?)
            .arg(record.version)
            .arg(page_token(record))
            .arg(record.key_id.as_str())
            .arg(STREAM_MAXLEN)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        sid.map(|_| ()).ok_or(StoreError::AlreadyExists)
    }

    async fn update(&self, record: &KeyRecord, expected_version: u64) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let outcome: i64 = self.scripts[1]
            .key(self.keys.record(record.key_id))
            .key(self.keys.events())
            .arg(encode(record)?)
            .arg(record.version)
            .arg(expected_version)
            .arg(record.key_id.as_str())
            .arg(STREAM_MAXLEN)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        match outcome {
            1 => Ok(()),
            -1 => Err(StoreError::NotFound),
            _ => Err(StoreError::Conflict),
        }
    }

    async fn delete(&self, id: KeyId) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let removed: i64 = self.scripts[2]
            .key(self.keys.record(id))
            .key(self.keys.index())
            .key(self.keys.last_used())
            .key(self.keys.events())
            .arg(id.as_str())
            .arg(STREAM_MAXLEN)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(removed == 1)
    }

    async fn list(&self, query: &ListQuery) -> Result<ListPage, StoreError> {
        let mut conn = self.conn.clone();
        let mut after = query.after.clone();
        let mut records = Vec::new();
        let mut scanned = 0;
        let batch = query.limit.clamp(1, 1000);
        loop {
            let min = after.as_ref().map_or("-".to_string(), |a| format!("({a}"));
            let tokens: Vec<String> = redis::cmd("ZRANGEBYLEX")
                .arg(self.keys.index())
                .arg(&min)
                .arg("+")
                .arg("LIMIT")
                .arg(0)
                .arg(batch)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            let exhausted = tokens.len() < batch;
            let ids: Vec<&str> = tokens.iter().filter_map(|t| t.split_once(':').map(|(_, id)| id)).collect();
            let mut pipe = redis::pipe();
            for id in &ids {
                pipe.hget(format!("{}{id}", self.keys.record_prefix()), "r");
            }
            let jsons: Vec<Option<String>> =
                if ids.is_empty() { Vec::new() } else { pipe.query_async(&mut conn).await.map_err(unavailable)? };
            for (token, json) in tokens.iter().zip(jsons) {
                scanned += 1;
                after = Some(token.clone());
                let Some(json) = json else { continue };
                let record = decode(&json)?;
                if query.tenant.as_ref().is_some_and(|t| &record.tenant != t)
                    || query.env.is_some_and(|e| record.env != e)
                {
                    continue;
                }
                records.push(record);
                if records.len() == query.limit {
                    break;
                }
            }
            if records.len() == query.limit || exhausted || scanned >= LIST_SCAN_LIMIT {
                let next = if exhausted && records.len() < query.limit { None } else { after };
                if !records.is_empty() {
                    let ids: Vec<&str> = records.iter().map(|r| r.key_id.as_str()).collect();
                    let used: Vec<Option<i64>> = redis::cmd("HMGET")
                        .arg(self.keys.last_used())
                        .arg(&ids)
                        .query_async(&mut conn)
                        .await
                        .map_err(unavailable)?;
                    for (r, u) in records.iter_mut().zip(used) {
                        r.last_used_at = u;
                    }
                }
                return Ok(ListPage { records, next });
            }
        }
    }

    async fn last_used(&self, id: KeyId) -> Result<Option<i64>, StoreError> {
        let mut conn = self.conn.clone();
        conn.hget(self.keys.last_used(), id.as_str()).await.map_err(unavailable)
    }

    async fn touch_last_used(&self, batch: &[(KeyId, i64)]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        let mut inv = self.scripts[3].key(self.keys.record_prefix());
        inv.key(self.keys.last_used());
        for (id, at) in batch {
            inv.arg(id.as_str()).arg(*at);
        }
        let _: i64 = inv.invoke_async(&mut conn).await.map_err(unavailable)?;
        Ok(())
    }

    fn feed(&self) -> broadcast::Receiver<FeedEvent> {
        self.feed.subscribe()
    }

    fn feed_is_live(&self) -> bool {
        self.live.load(Ordering::SeqCst)
    }
}

/// Keeps a pub/sub subscription alive for as long as the store lives and
/// turns it into [`FeedEvent`]s. On every reconnect it replays the stream
/// from the last event it saw, or asks for the whole cache to be dropped
/// when it cannot tell what it missed.
async fn subscribe_loop(
    client: redis::Client,
    keys: Keys,
    feed: broadcast::Sender<FeedEvent>,
    live: Arc<AtomicBool>,
    cancel: CancellationToken,
) {
    let mut last_seen: Option<String> = None;
    let mut backoff = Duration::from_millis(50);
    let mut was_connected = false;
    loop {
        let session = subscribe_once(&client, &keys, &feed, &live, &mut last_seen, &mut was_connected);
        tokio::select! {
            _ = cancel.cancelled() => return,
            result = session => {
                if was_connected {
                    live.store(false, Ordering::SeqCst);
                    let _ = feed.send(FeedEvent::Disconnected);
                    backoff = Duration::from_millis(50);
                }
                was_connected = false;
                if let Err(e) = result {
                    tracing::debug!(error = %e, "revocation feed connection lost");
                }
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

async fn subscribe_once(
    client: &redis::Client,
    keys: &Keys,
    feed: &broadcast::Sender<FeedEvent>,
    live: &AtomicBool,
    last_seen: &mut Option<String>,
    was_connected: &mut bool,
) -> redis::RedisResult<()> {
    let connect = async {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(keys.events()).await?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        // Subscribed first, then look at the stream: nothing can fall between.
        let replay = resync(&mut conn, keys, last_seen).await?;
        Ok::<_, redis::RedisError>((pubsub, replay))
    };
    let (pubsub, replay) = tokio::time::timeout(Duration::from_secs(2), connect).await.map_err(|_| {
        redis::RedisError::from(std::io::Error::new(std::io::ErrorKind::TimedOut, "connecting the feed timed out"))
    })??;
    match replay {
        Replay::Events(ids) => {
            for id in ids {
                let _ = feed.send(FeedEvent::Invalidate(id));
            }
        }
        Replay::Everything => {
            let _ = feed.send(FeedEvent::InvalidateAll);
        }
    }
    *was_connected = true;
    live.store(true, Ordering::SeqCst);
    let _ = feed.send(FeedEvent::Connected);
    tracing::info!("revocation feed connected");

    let (mut sink, mut stream) = pubsub.split();
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            msg = stream.next() => {
                let Some(msg) = msg else { return Ok(()) };
                let payload: String = msg.get_payload().unwrap_or_default();
                if let Some((sid, id)) = payload.split_once(' ') {
                    *last_seen = Some(sid.to_string());
                    match id.parse::<KeyId>() {
                        Ok(id) => { let _ = feed.send(FeedEvent::Invalidate(id)); }
                        Err(_) => { let _ = feed.send(FeedEvent::InvalidateAll); }
                    }
                }
            }
            _ = ping.tick() => {
                tokio::time::timeout(PING_EVERY, sink.ping::<redis::Value>())
                    .await
                    .map_err(|_| redis::RedisError::from(std::io::Error::new(std::io::ErrorKind::TimedOut, "feed ping timed out")))??;
            }
        }
    }
}

enum Replay {
    Events(Vec<KeyId>),
    Everything,
}

/// What to drop after (re)subscribing. With no event seen yet, the newest
/// stream id becomes the starting point and everything cached is dropped
/// (the cache may hold entries from before a disconnect).
async fn resync(
    conn: &mut redis::aio::MultiplexedConnection,
    keys: &Keys,
    last_seen: &mut Option<String>,
) -> redis::RedisResult<Replay> {
    const REPLAY_MAX: usize = 10_000;
    let Some(from) = last_seen.clone() else {
        let newest: redis::streams::StreamRangeReply = conn.xrevrange_count(keys.events(), "+", "-", 1).await?;
        *last_seen = Some(newest.ids.first().map_or_else(|| "0-0".to_string(), |e| e.id.clone()));
        return Ok(Replay::Everything);
    };
    let oldest: redis::streams::StreamRangeReply = conn.xrange_count(keys.events(), "-", "+", 1).await?;
    let newest: redis::streams::StreamRangeReply = conn.xrevrange_count(keys.events(), "+", "-", 1).await?;
    let lost = match (oldest.ids.first(), newest.ids.first()) {
        // Emptied (a Redis without persistence restarted, FLUSHALL): what
        // happened meanwhile cannot be known.
        (None, _) | (_, None) => from != "0-0",
        // Trimmed past what we saw, or a stream that is behind us (a
        // different Redis): either way the replay would miss events.
        (Some(first), Some(last)) => from != "0-0" && (stream_id_gt(&first.id, &from) || stream_id_gt(&from, &last.id)),
    };
    if lost {
        // The entry we saw last has been trimmed: events may be lost.
        *last_seen = None;
        let newest: redis::streams::StreamRangeReply = conn.xrevrange_count(keys.events(), "+", "-", 1).await?;
        *last_seen = Some(newest.ids.first().map_or_else(|| "0-0".to_string(), |e| e.id.clone()));
        return Ok(Replay::Everything);
    }
    let missed: redis::streams::StreamRangeReply =
        conn.xrange_count(keys.events(), format!("({from}"), "+", REPLAY_MAX).await?;
    if missed.ids.len() == REPLAY_MAX {
        *last_seen = None;
        return Ok(Replay::Everything);
    }
    let mut ids = Vec::with_capacity(missed.ids.len());
    for entry in &missed.ids {
        *last_seen = Some(entry.id.clone());
        match entry.get::<String>("key_id").and_then(|s| s.parse::<KeyId>().ok()) {
            Some(id) => ids.push(id),
            None => return Ok(Replay::Everything),
        }
    }
    Ok(Replay::Events(ids))
}

/// Compares two stream ids `ms-seq` numerically.
fn stream_id_gt(a: &str, b: &str) -> bool {
    fn parts(s: &str) -> (u64, u64) {
        let (ms, seq) = s.split_once('-').unwrap_or((s, "0"));
        (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
    }
    parts(a) > parts(b)
}

#[cfg(test)]
mod tests {
    use super::stream_id_gt;

    #[test]
    fn stream_ids_compare_numerically() {
        assert!(stream_id_gt("10-0", "9-5"));
        assert!(stream_id_gt("9-10", "9-9"));
        assert!(!stream_id_gt("9-9", "9-9"));
    }
}
