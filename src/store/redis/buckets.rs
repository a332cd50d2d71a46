//! Shared rate-limit buckets in Redis (README, "Rate limits", fleet-wide):
//! the [`SharedBuckets`] the fleet limiter leases from. Each bucket is one
//! key holding a GCRA arrival time, changed only by one script on Redis's
//! clock; the live replicas are a sorted set refreshed by a heartbeat.

use std::time::Duration;

use async_trait::async_trait;
use redis::Script;

use super::Layout;
use super::connection::Connection;
use crate::limit::fleet::{Grant, SharedBuckets};
use crate::limit::{LimitError, RateLimitPolicy};

pub(super) struct RedisBuckets {
    conn: Connection,
    keys: Layout,
    lease: Script,
    heartbeat: Script,
}

impl RedisBuckets {
    pub(super) fn new(conn: Connection, keys: Layout) -> RedisBuckets {
        let scripts = super::scripts::Scripts::new();
        RedisBuckets { conn, keys, lease: scripts.lease, heartbeat: scripts.heartbeat }
    }
}

fn unavailable(e: redis::RedisError) -> LimitError {
    LimitError::Unavailable(e.to_string())
}

#[async_trait]
impl SharedBuckets for RedisBuckets {
    async fn lease(
        &self,
        name: &str,
        policy: &RateLimitPolicy,
        want: u64,
        min: u64,
        give_back: u64,
    ) -> Result<Grant, LimitError> {
        let mut conn = self.conn.clone();
        let period_us = policy.period_nanos() as f64 / 1000.0;
        let capacity_us = period_us * policy.effective_burst() as f64;
        let answer: Vec<u64> = self
            .lease
            .key(self.keys.bucket(name))
            .arg(format!("{period_us:.3}"))
            .arg(format!("{capacity_us:.3}"))
            .arg(want)
            .arg(min)
            .arg(give_back)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        match answer[..] {
            [granted, remaining, reset_ms, retry_after_ms, retry_one_ms] => {
                Ok(Grant { granted, remaining, reset_ms, retry_after_ms, retry_one_ms })
            }
            _ => Err(LimitError::Unavailable(format!("unexpected answer from the lease script: {answer:?}"))),
        }
    }

    async fn heartbeat(&self, id: &str, ttl: Duration) -> Result<u32, LimitError> {
        let mut conn = self.conn.clone();
        let n: u32 = self
            .heartbeat
            .key(self.keys.replicas())
            .arg(id)
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(n)
    }
}
