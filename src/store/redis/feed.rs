//! The change-feed follower: keeps a pub/sub subscription alive for as
//! long as the store lives and turns it into [`FeedEvent`]s. On every
//! reconnect it replays the stream from the last event it saw, or asks for
//! the whole cache to be dropped when it cannot tell what it missed (README,
//! "Storage, cache and revocation").

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::AsyncCommands;
use tokio::sync::broadcast;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use super::Layout;
use super::connection::{Connection, FeedLink};
use crate::key::KeyId;
use crate::store::FeedEvent;

/// How often the subscriber pings to find out that its connection is dead.
const PING_EVERY: Duration = Duration::from_secs(1);
/// How often the streams are read even while pub/sub is live: catches an
/// event whose publish did not reach this subscriber, and a stream that lost
/// its newest entries in a failover of a shard this subscriber is not on.
const RESYNC_EVERY: Duration = Duration::from_secs(5);

/// Follows the feed until `cancel`.
/// `redis` describes where Redis is, for the log (never a password).
pub(super) async fn follow(
    link: FeedLink,
    redis: String,
    keys: Layout,
    feed: broadcast::Sender<FeedEvent>,
    live: Arc<AtomicBool>,
    cancel: CancellationToken,
) {
    // The last stream entry seen, per partition.
    let mut last_seen: Vec<Option<String>> = keys.partitions().map(|_| None).collect();
    let mut backoff = Duration::from_millis(50);
    let mut was_connected = false;
    // Failed attempts in a row: the first few are logged, then one in 30
    // (about every half minute at the longest backoff).
    let mut failures = 0u64;
    loop {
        let session = subscribe_once(&link, &keys, &feed, &live, &mut last_seen, &mut was_connected);
        tokio::select! {
            _ = cancel.cancelled() => return,
            result = session => {
                if was_connected {
                    live.store(false, Ordering::SeqCst);
                    let _ = feed.send(FeedEvent::Disconnected);
                    backoff = Duration::from_millis(50);
                }
                if was_connected {
                    failures = 0;
                }
                was_connected = false;
                if let Err(e) = result {
                    failures += 1;
                    if failures <= 5 || failures.is_multiple_of(30) {
                        tracing::warn!(
                            redis = %redis,
                            error = %e,
                            attempts = failures,
                            retry_in = ?backoff,
                            "redis unreachable; readiness stays NOT_SERVING until the change feed connects"
                        );
                    }
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
    link: &FeedLink,
    keys: &Layout,
    feed: &broadcast::Sender<FeedEvent>,
    live: &AtomicBool,
    last_seen: &mut [Option<String>],
    was_connected: &mut bool,
) -> redis::RedisResult<()> {
    let mut switches = link.watch_switches();
    let connect = async {
        let mut pubsub = link.pubsub().await?;
        pubsub.subscribe(keys.channel()).await?;
        let mut conn = link.commands().await?;
        // Subscribed first, then look at the stream: nothing can fall between.
        let replay = resync(&mut conn, keys, last_seen).await?;
        Ok::<_, redis::RedisError>((pubsub, replay))
    };
    let (pubsub, replay) = tokio::time::timeout(Duration::from_secs(2), connect).await.map_err(|_| {
        redis::RedisError::from(std::io::Error::new(std::io::ErrorKind::TimedOut, "connecting the feed timed out"))
    })??;
    match replay {
        Replay::Events(events) => {
            for event in events {
                let _ = feed.send(event);
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
    let mut check = tokio::time::interval(RESYNC_EVERY);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    check.tick().await;
    let mut conn = link.commands().await?;
    loop {
        tokio::select! {
            _ = primary_changed(&mut switches) => {
                return Err(redis::RedisError::from(std::io::Error::other("the primary changed")));
            }
            _ = check.tick() => {
                match resync(&mut conn, keys, last_seen).await? {
                    Replay::Events(events) => {
                        for event in events {
                            let _ = feed.send(event);
                        }
                    }
                    Replay::Everything => {
                        tracing::warn!("the event stream lost entries (a failover?); dropping the whole cache");
                        let _ = feed.send(FeedEvent::InvalidateAll);
                    }
                }
            }
            msg = stream.next() => {
                let Some(msg) = msg else { return Ok(()) };
                let payload: String = msg.get_payload().unwrap_or_default();
                if let Some((sid, what)) = payload.split_once(' ') {
                    let event = match what.strip_prefix(TENANT_EVENT) {
                        Some(tenant) => Some((keys.partition_of_tenant(tenant), FeedEvent::TenantChanged(tenant.to_string()))),
                        None => what.parse::<KeyId>().ok().map(|id| (keys.partition_of(id), FeedEvent::Invalidate(id))),
                    };
                    match event {
                        Some((p, event)) => {
                            // Never backwards: a periodic read may have seen it first.
                            let seen = &mut last_seen[p as usize];
                            if seen.as_deref().is_none_or(|s| stream_id_gt(sid, s)) {
                                *seen = Some(sid.to_string());
                            }
                            let _ = feed.send(event);
                        }
                        None => { let _ = feed.send(FeedEvent::InvalidateAll); }
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

/// Resolves when the watched primary changes; never without a watch.
async fn primary_changed(switches: &mut Option<tokio::sync::watch::Receiver<u64>>) {
    match switches {
        Some(rx) => {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

/// How a tenant-policy event is told apart from a key event: in a pub/sub
/// message, `tenant=<name>` where a key_id would be (neither a key_id nor
/// a tenant name can contain `=`); on the stream, a `tenant` field.
pub(super) const TENANT_EVENT: &str = "tenant=";

enum Replay {
    Events(Vec<FeedEvent>),
    Everything,
}

/// What to drop after (re)subscribing, over every partition's stream:
/// their missed events, or everything when any partition cannot tell.
async fn resync(conn: &mut Connection, keys: &Layout, last_seen: &mut [Option<String>]) -> redis::RedisResult<Replay> {
    let mut ids = Vec::new();
    let mut everything = false;
    for p in keys.partitions() {
        match resync_stream(conn, &keys.events(p), &mut last_seen[p as usize]).await? {
            Replay::Events(some) => ids.extend(some),
            Replay::Everything => everything = true,
        }
    }
    Ok(if everything { Replay::Everything } else { Replay::Events(ids) })
}

/// One stream. With no event seen yet, the newest stream id becomes the
/// starting point and everything cached is dropped (the cache may hold
/// entries from before a disconnect).
async fn resync_stream(
    conn: &mut Connection,
    stream: &str,
    last_seen: &mut Option<String>,
) -> redis::RedisResult<Replay> {
    const REPLAY_MAX: usize = 10_000;
    let Some(from) = last_seen.clone() else {
        let newest: redis::streams::StreamRangeReply = conn.xrevrange_count(stream, "+", "-", 1).await?;
        *last_seen = Some(newest.ids.first().map_or_else(|| "0-0".to_string(), |e| e.id.clone()));
        return Ok(Replay::Everything);
    };
    let oldest: redis::streams::StreamRangeReply = conn.xrange_count(stream, "-", "+", 1).await?;
    let newest: redis::streams::StreamRangeReply = conn.xrevrange_count(stream, "+", "-", 1).await?;
    // The entry seen last must still be there: a failover can lose the
    // newest entries and the new primary then write others after them.
    let still_there = from == "0-0" || {
        let at: redis::streams::StreamRangeReply = conn.xrange_count(stream, &from, &from, 1).await?;
        !at.ids.is_empty()
    };
    let lost = !still_there
        || match (oldest.ids.first(), newest.ids.first()) {
            // Emptied (a Redis without persistence restarted, FLUSHALL): what
            // happened meanwhile cannot be known.
            (None, _) | (_, None) => from != "0-0",
            // Trimmed past what we saw, or a stream that is behind us (a
            // failover lost its newest entries, or a different Redis): either
            // way the replay would miss events.
            (Some(first), Some(last)) => {
                from != "0-0" && (stream_id_gt(&first.id, &from) || stream_id_gt(&from, &last.id))
            }
        };
    if lost {
        *last_seen = Some(newest.ids.first().map_or_else(|| "0-0".to_string(), |e| e.id.clone()));
        return Ok(Replay::Everything);
    }
    let missed: redis::streams::StreamRangeReply =
        conn.xrange_count(stream, format!("({from}"), "+", REPLAY_MAX).await?;
    if missed.ids.len() == REPLAY_MAX {
        *last_seen = None;
        return Ok(Replay::Everything);
    }
    let mut ids = Vec::with_capacity(missed.ids.len());
    for entry in &missed.ids {
        *last_seen = Some(entry.id.clone());
        if let Some(tenant) = entry.get::<String>("tenant") {
            ids.push(FeedEvent::TenantChanged(tenant));
            continue;
        }
        match entry.get::<String>("key_id").and_then(|s| s.parse::<KeyId>().ok()) {
            Some(id) => ids.push(FeedEvent::Invalidate(id)),
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
