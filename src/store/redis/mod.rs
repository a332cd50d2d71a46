//! The production store: Redis, shared by every replica: one node, a
//! Sentinel set or a Cluster ([`connection`]).
//!
//! Layout under a namespace (default `keystile`), per partition (one on a
//! single node or Sentinel set, named exactly so; 16 hash-tagged ones on a
//! Cluster, see `Layout`):
//! - `<ns>:key:<key_id>` — hash `{r: record JSON, v: version, t: list token}`
//! - `<ns>:index` — sorted set of list tokens (creation time, key_id), read
//!   with ZRANGEBYLEX for stable paging
//! - `<ns>:last_used` — hash key_id → unix seconds, written in batches
//! - `<ns>:events` — stream of changes (trimmed to about [`STREAM_MAXLEN`]),
//!   and a pub/sub channel of the same name
//! - `<ns>:tenant:<tenant>` — a tenant's policy (JSON), in the partition of
//!   the tenant's name
//!
//! Outside partitions: `<ns>:audit` (admin mutations, a stream trimmed to
//! about [`AUDIT_MAXLEN`]), `<ns>:signing_keys` (token signing keys, the private
//! halves sealed under the pepper), `<ns>:lim:<bucket>` (one shared rate-limit bucket,
//! [`buckets`]) and `<ns>:replicas` (the live sidecars, for the fallback's
//! local share).
//!
//! Each mutation is one Lua script: the record, the index, the stream entry
//! and the publish happen together, so no reader can see the new state
//! without its event being on the stream.

mod buckets;
pub mod connection;
mod feed;
mod scripts;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use redis::AsyncCommands;
use tokio::sync::broadcast;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{AUDIT_MAXLEN, AUDIT_SCAN_LIMIT, AuditEvent, AuditQuery, audit_matches};
use super::{
    FEED_CAPACITY, FeedEvent, KeyRecord, KeyStore, ListPage, ListQuery, StoreError, StoredSigningKey, TenantPolicy,
    USAGE_HOURS_KEPT, UsageCount, UsageWriteError, page_token,
};
use crate::key::KeyId;
use crate::secret::RedisUrl;
use connection::{Connection, Nodes, Topology};
use scripts::Scripts;

/// Approximate length the event stream is trimmed to.
pub const STREAM_MAXLEN: usize = 100_000;
/// Longest a listing scans the index for one page when filters skip records.
const LIST_SCAN_LIMIT: usize = 10_000;

/// The names of everything the store writes under its namespace, in
/// partitions. A partition's record hashes, index, last-used hash and event
/// stream share one hash slot on Redis Cluster (a `{ns:NN}` hash tag), so
/// each mutation script touches one slot, while the records of different
/// partitions spread over the shards. A single node or a Sentinel set has
/// one partition named as before partitions existed (`ns:key:<id>`,
/// `ns:index`, `ns:events`), so existing data and older sidecars keep
/// working. The pub/sub channel (`ns:events`) is one for all partitions.
#[derive(Clone)]
pub(crate) struct Layout {
    ns: String,
    partitions: u16,
}

impl Layout {
    fn new(ns: &str, partitions: u16) -> Layout {
        Layout { ns: ns.to_string(), partitions: partitions.max(1) }
    }

    fn partitions(&self) -> std::ops::Range<u16> {
        0..self.partitions
    }

    /// The partition of a key_id: stable across sidecars and versions.
    fn partition_of(&self, id: KeyId) -> u16 {
        if self.partitions == 1 { 0 } else { (crc32fast::hash(id.as_bytes()) % self.partitions as u32) as u16 }
    }

    fn base(&self, p: u16) -> String {
        if self.partitions == 1 { self.ns.clone() } else { format!("{{{}:{p:02}}}", self.ns) }
    }

    fn record(&self, id: KeyId) -> String {
        format!("{}:key:{}", self.base(self.partition_of(id)), id)
    }
    fn index(&self, p: u16) -> String {
        format!("{}:index", self.base(p))
    }
    fn last_used(&self, p: u16) -> String {
        format!("{}:last_used", self.base(p))
    }
    /// One hour's verification counts of a partition's keys: a hash
    /// `<key_id>:<CODE>` → count, expiring after a day.
    fn usage(&self, p: u16, hour: i64) -> String {
        format!("{}:usage:{hour}", self.base(p))
    }
    fn events(&self, p: u16) -> String {
        format!("{}:events", self.base(p))
    }
    /// The partition of a tenant's policy.
    fn partition_of_tenant(&self, tenant: &str) -> u16 {
        if self.partitions == 1 { 0 } else { (crc32fast::hash(tenant.as_bytes()) % self.partitions as u32) as u16 }
    }
    fn tenant(&self, tenant: &str) -> String {
        format!("{}:tenant:{tenant}", self.base(self.partition_of_tenant(tenant)))
    }
    /// A shared rate-limit bucket: its own key, so that on a Cluster the
    /// buckets spread over the shards.
    fn bucket(&self, name: &str) -> String {
        format!("{}:lim:{name}", self.ns)
    }
    /// Audit events: one capped stream.
    fn audit(&self) -> String {
        format!("{}:audit", self.ns)
    }
    /// The token signing keys: a hash kid → JSON.
    fn signing_keys(&self) -> String {
        format!("{}:signing_keys", self.ns)
    }
    fn replicas(&self) -> String {
        format!("{}:replicas", self.ns)
    }
    fn channel(&self) -> String {
        format!("{}:events", self.ns)
    }
}

pub struct RedisStore {
    conn: Connection,
    keys: Layout,
    feed: broadcast::Sender<FeedEvent>,
    scripts: Scripts,
    live: Arc<AtomicBool>,
    _subscriber: DropGuard,
}

/// Revocations live in Redis: without an append-only file, a restart loses
/// every one since the last snapshot (README, "Redis topologies", RPO). Says
/// so once at start, where `CONFIG GET` is allowed (managed Redis often
/// refuses it; then nothing is said).
async fn warn_if_not_durable(conn: &mut Connection) {
    let answer: redis::RedisResult<Vec<String>> =
        redis::cmd("CONFIG").arg("GET").arg("appendonly").query_async(conn).await;
    if let Ok(pair) = answer
        && pair.get(1).is_some_and(|v| v == "no")
    {
        tracing::warn!(
            "redis runs without appendonly: a Redis restart loses every revocation since its last snapshot \
             (run it with appendonly yes, appendfsync everysec)"
        );
    }
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
        RedisStore::connect(&Topology { nodes: Nodes::Single(RedisUrl::new(url)), tls: None, timeout }, namespace)
    }

    /// Opens a store on `topology`.
    pub fn connect(topology: &Topology, namespace: &str) -> Result<RedisStore, StoreError> {
        let opened = connection::open(topology)
            .map_err(|e| StoreError::Unavailable(format!("cannot open Redis at {}: {e}", topology.describe())))?;
        let keys = Layout::new(namespace, topology.partitions());
        let (feed, _) = broadcast::channel(FEED_CAPACITY);
        let cancel = CancellationToken::new();
        let live = Arc::new(AtomicBool::new(false));
        tokio::spawn(feed::follow(
            opened.feed,
            topology.describe(),
            keys.clone(),
            feed.clone(),
            live.clone(),
            cancel.clone(),
        ));
        // Connect (and, over TLS, shake hands) now rather than on the first
        // Verify, whose store budget is tens of milliseconds.
        tokio::spawn({
            let mut conn = opened.conn.clone();
            async move {
                let _: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut conn).await;
                warn_if_not_durable(&mut conn).await;
            }
        });
        Ok(RedisStore {
            conn: opened.conn,
            keys,
            feed,
            scripts: Scripts::new(),
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
        let p = self.keys.partition_of(record.key_id);
        let sid: Option<String> = self
            .scripts
            .create
            .key(self.keys.record(record.key_id))
            .key(self.keys.index(p))
            .key(self.keys.events(p))
            .arg(encode(record)?)
            .arg(record.version)
            .arg(page_token(record))
            .arg(record.key_id.as_str())
            .arg(STREAM_MAXLEN)
            .arg(self.keys.channel())
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        sid.map(|_| ()).ok_or(StoreError::AlreadyExists)
    }

    async fn update(&self, record: &KeyRecord, expected_version: u64) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let p = self.keys.partition_of(record.key_id);
        let outcome: i64 = self
            .scripts
            .update
            .key(self.keys.record(record.key_id))
            .key(self.keys.events(p))
            .arg(encode(record)?)
            .arg(record.version)
            .arg(expected_version)
            .arg(record.key_id.as_str())
            .arg(STREAM_MAXLEN)
            .arg(self.keys.channel())
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
        let p = self.keys.partition_of(id);
        let removed: i64 = self
            .scripts
            .delete
            .key(self.keys.record(id))
            .key(self.keys.index(p))
            .key(self.keys.last_used(p))
            .key(self.keys.events(p))
            .arg(id.as_str())
            .arg(STREAM_MAXLEN)
            .arg(self.keys.channel())
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(removed == 1)
    }

    /// Merges the partitions' indexes in token order (creation time, then
    /// key_id), so a page is the same whatever the partitioning.
    async fn list(&self, query: &ListQuery) -> Result<ListPage, StoreError> {
        let mut conn = self.conn.clone();
        let mut after = query.after.clone();
        let mut records = Vec::new();
        let mut scanned = 0;
        let batch = query.limit.clamp(1, 1000);
        loop {
            let min = after.as_ref().map_or("-".to_string(), |a| format!("({a}"));
            let mut tokens: Vec<String> = Vec::new();
            let mut exhausted = true;
            for p in self.keys.partitions() {
                let some: Vec<String> = redis::cmd("ZRANGEBYLEX")
                    .arg(self.keys.index(p))
                    .arg(&min)
                    .arg("+")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(batch)
                    .query_async(&mut conn)
                    .await
                    .map_err(unavailable)?;
                exhausted &= some.len() < batch;
                tokens.extend(some);
            }
            tokens.sort();
            // Beyond the first `batch` tokens of the merge, a partition may
            // hold earlier ones not fetched yet: keep only those.
            tokens.truncate(batch);
            if tokens.len() == batch {
                exhausted = false;
            }
            let ids: Vec<KeyId> =
                tokens.iter().filter_map(|t| t.split_once(':').and_then(|(_, id)| id.parse().ok())).collect();
            // One pipeline per partition (its keys share a slot).
            let mut jsons: Vec<Option<String>> = vec![None; ids.len()];
            for p in self.keys.partitions() {
                let at: Vec<usize> = (0..ids.len()).filter(|&i| self.keys.partition_of(ids[i]) == p).collect();
                if at.is_empty() {
                    continue;
                }
                let mut pipe = redis::pipe();
                for &i in &at {
                    pipe.hget(self.keys.record(ids[i]), "r");
                }
                let got: Vec<Option<String>> = pipe.query_async(&mut conn).await.map_err(unavailable)?;
                for (i, json) in at.into_iter().zip(got) {
                    jsons[i] = json;
                }
            }
            for (token, json) in tokens.iter().zip(jsons) {
                scanned += 1;
                after = Some(token.clone());
                let Some(json) = json else { continue };
                let record = decode(&json)?;
                if query.tenant.as_ref().is_some_and(|t| record.tenant != t)
                    || query.owner.as_ref().is_some_and(|o| !record.owner.eq_ignore_ascii_case(o))
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
                for p in self.keys.partitions() {
                    let at: Vec<usize> =
                        (0..records.len()).filter(|&i| self.keys.partition_of(records[i].key_id) == p).collect();
                    if at.is_empty() {
                        continue;
                    }
                    let ids: Vec<&str> = at.iter().map(|&i| records[i].key_id.as_str()).collect();
                    let used: Vec<Option<i64>> = redis::cmd("HMGET")
                        .arg(self.keys.last_used(p))
                        .arg(&ids)
                        .query_async(&mut conn)
                        .await
                        .map_err(unavailable)?;
                    for (i, u) in at.into_iter().zip(used) {
                        records[i].last_used_at = u;
                    }
                }
                return Ok(ListPage { records, next });
            }
        }
    }

    async fn key_ids(&self, cursor: &str, limit: usize) -> Result<(Vec<KeyId>, Option<String>), StoreError> {
        // The cursor is `<partition>|<last index token>`: each partition's
        // index is read in order, one after the other.
        let mut conn = self.conn.clone();
        let (mut p, mut after) = match cursor.split_once('|') {
            Some((p, t)) => (p.parse::<u16>().map_err(|_| StoreError::Corrupt("bad cursor".into()))?, t.to_string()),
            None => (0, String::new()),
        };
        let limit = limit.clamp(1, 10_000);
        let mut ids = Vec::new();
        while p < self.keys.partitions().end {
            let min = if after.is_empty() { "-".to_string() } else { format!("({after}") };
            let tokens: Vec<String> = redis::cmd("ZRANGEBYLEX")
                .arg(self.keys.index(p))
                .arg(&min)
                .arg("+")
                .arg("LIMIT")
                .arg(0)
                .arg(limit - ids.len())
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            let full = tokens.len() == limit - ids.len();
            ids.extend(tokens.iter().filter_map(|t| t.split_once(':').and_then(|(_, id)| id.parse::<KeyId>().ok())));
            if full {
                let last = tokens.last().cloned().unwrap_or_default();
                return Ok((ids, Some(format!("{p}|{last}"))));
            }
            p += 1;
            after.clear();
        }
        Ok((ids, None))
    }

    async fn last_used(&self, id: KeyId) -> Result<Option<i64>, StoreError> {
        let mut conn = self.conn.clone();
        let p = self.keys.partition_of(id);
        conn.hget(self.keys.last_used(p), id.as_str()).await.map_err(unavailable)
    }

    async fn touch_last_used(&self, batch: &[(KeyId, i64)]) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        // One script per partition: all its keys in one slot.
        for p in self.keys.partitions() {
            let mine: Vec<&(KeyId, i64)> = batch.iter().filter(|(id, _)| self.keys.partition_of(*id) == p).collect();
            if mine.is_empty() {
                continue;
            }
            let mut inv = self.scripts.touch.key(self.keys.last_used(p));
            for (id, at) in &mine {
                inv.key(self.keys.record(*id)).arg(id.as_str()).arg(*at);
            }
            let _: i64 = inv.invoke_async(&mut conn).await.map_err(unavailable)?;
        }
        Ok(())
    }

    async fn add_usage(&self, hour: i64, batch: &[(KeyId, Vec<UsageCount>)]) -> Result<(), UsageWriteError> {
        let mut conn = self.conn.clone();
        let mut written = Vec::new();
        // One transaction per partition (one hash, one slot): a partition's
        // counts are written whole or not at all, with the hash's expiry.
        for p in self.keys.partitions() {
            let key = self.keys.usage(p, hour);
            let mine: Vec<&(KeyId, Vec<UsageCount>)> =
                batch.iter().filter(|(id, _)| self.keys.partition_of(*id) == p).collect();
            if mine.is_empty() {
                continue;
            }
            let mut pipe = redis::pipe();
            pipe.atomic();
            for (id, counts) in &mine {
                for c in counts {
                    pipe.hincr(&key, format!("{id}:{}", c.code), c.count).ignore();
                }
            }
            pipe.expire(&key, USAGE_HOURS_KEPT * 3600).ignore();
            if let Err(e) = pipe.query_async::<()>(&mut conn).await {
                return Err(UsageWriteError { error: unavailable(e), written });
            }
            written.extend(mine.iter().map(|(id, _)| *id));
        }
        Ok(())
    }

    async fn usage(&self, id: KeyId, from: i64, to: i64, codes: &[&str]) -> Result<Vec<UsageCount>, StoreError> {
        let mut conn = self.conn.clone();
        let p = self.keys.partition_of(id);
        // Only this key's fields of each hour: other keys' counts share the hash.
        let fields: Vec<String> = codes.iter().map(|c| format!("{id}:{c}")).collect();
        let mut pipe = redis::pipe();
        for hour in from..=to {
            pipe.cmd("HMGET").arg(self.keys.usage(p, hour)).arg(&fields);
        }
        let hours: Vec<Vec<Option<u64>>> = pipe.query_async(&mut conn).await.map_err(unavailable)?;
        let mut out: Vec<UsageCount> = Vec::new();
        for (i, code) in codes.iter().enumerate() {
            let count: u64 = hours.iter().filter_map(|h| h.get(i).copied().flatten()).sum();
            if count > 0 {
                out.push(UsageCount { code: code.to_string(), count });
            }
        }
        Ok(out)
    }

    async fn tenant_policy(&self, tenant: &str) -> Result<Option<TenantPolicy>, StoreError> {
        let mut conn = self.conn.clone();
        let json: Option<String> = conn.get(self.keys.tenant(tenant)).await.map_err(unavailable)?;
        json.map(|j| serde_json::from_str(&j).map_err(|e| StoreError::Corrupt(e.to_string()))).transpose()
    }

    async fn set_tenant_policy(&self, policy: &TenantPolicy) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let json = if policy.limits.is_empty() && policy.tiers.is_empty() {
            String::new()
        } else {
            serde_json::to_string(policy).map_err(|e| StoreError::Corrupt(e.to_string()))?
        };
        let p = self.keys.partition_of_tenant(&policy.tenant);
        let _: i64 = self
            .scripts
            .set_tenant
            .key(self.keys.tenant(&policy.tenant))
            .key(self.keys.events(p))
            .arg(json)
            .arg(&policy.tenant)
            .arg(STREAM_MAXLEN)
            .arg(self.keys.channel())
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn append_audit(&self, event: &AuditEvent) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let json = serde_json::to_string(event).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let _: String = redis::cmd("XADD")
            .arg(self.keys.audit())
            .arg("MAXLEN")
            .arg("~")
            .arg(AUDIT_MAXLEN)
            .arg("*")
            .arg("e")
            .arg(json)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn list_audit(&self, query: &AuditQuery) -> Result<(Vec<AuditEvent>, Option<String>), StoreError> {
        let mut conn = self.conn.clone();
        let mut out = Vec::new();
        let mut before = query.before.clone();
        let mut scanned = 0;
        loop {
            let end = before.as_ref().map_or("+".to_string(), |b| format!("({b}"));
            let batch: redis::streams::StreamRangeReply = redis::cmd("XREVRANGE")
                .arg(self.keys.audit())
                .arg(&end)
                .arg("-")
                .arg("COUNT")
                .arg(500)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            if batch.ids.is_empty() {
                return Ok((out, None));
            }
            for entry in &batch.ids {
                scanned += 1;
                before = Some(entry.id.clone());
                let Some(json) = entry.get::<String>("e") else { continue };
                let mut e: AuditEvent = serde_json::from_str(&json).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                e.id = entry.id.clone();
                if audit_matches(&e, query) {
                    out.push(e);
                }
                if out.len() == query.limit || scanned >= AUDIT_SCAN_LIMIT {
                    return Ok((out, before));
                }
            }
        }
    }

    async fn signing_keys(&self) -> Result<Vec<StoredSigningKey>, StoreError> {
        let mut conn = self.conn.clone();
        let all: std::collections::HashMap<String, String> =
            conn.hgetall(self.keys.signing_keys()).await.map_err(unavailable)?;
        let mut keys = all
            .values()
            .map(|j| serde_json::from_str::<StoredSigningKey>(j).map_err(|e| StoreError::Corrupt(e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        keys.sort_by_key(|k| k.created_at);
        Ok(keys)
    }

    async fn add_signing_key(&self, key: &StoredSigningKey, keep: usize) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let json = serde_json::to_string(key).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let added: bool = conn.hset_nx(self.keys.signing_keys(), &key.kid, json).await.map_err(unavailable)?;
        if !added {
            return Err(StoreError::AlreadyExists);
        }
        let keys = self.signing_keys().await?;
        let extra = keys.len().saturating_sub(keep.max(1));
        for old in &keys[..extra] {
            let _: i64 = conn.hdel(self.keys.signing_keys(), &old.kid).await.map_err(unavailable)?;
        }
        Ok(())
    }

    fn shared_buckets(&self) -> Option<Arc<dyn crate::limit::fleet::SharedBuckets>> {
        Some(Arc::new(buckets::RedisBuckets::new(self.conn.clone(), self.keys.clone())))
    }

    fn feed(&self) -> broadcast::Receiver<FeedEvent> {
        self.feed.subscribe()
    }

    fn feed_is_live(&self) -> bool {
        self.live.load(Ordering::SeqCst)
    }
}
