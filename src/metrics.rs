//! Prometheus metrics (README, "Metrics, traces, logs"), through the `metrics` facade. Handles are
//! registered once, when the engine is built, so the hot path only bumps
//! atomics. Without an installed recorder (tests, the CLI) they do nothing.
//!
//! Names and labels follow STYLE.md: `keystile_` prefix, base units,
//! `_total` for counters; no key material and no per-key label.

use std::net::SocketAddr;

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

use crate::verdict::Outcome;

pub const VERIFY_SECONDS: &str = "keystile_verify_duration_seconds";
const VERIFY_BUCKETS: &[f64] =
    &[0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1];

/// Whether a recorder was installed: without one, nothing times a Verify
/// (two clock reads a call for a histogram nobody reads).
static RECORDING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Serves `/metrics` on `addr` from a task of the current runtime.
pub fn install(addr: SocketAddr) -> Result<(), String> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Full(VERIFY_SECONDS.into()), VERIFY_BUCKETS)
        .map_err(|e| e.to_string())?
        .install()
        .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?;
    gauge!("keystile_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    RECORDING.store(true, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// The engine's instruments.
#[derive(Clone)]
pub struct Metrics {
    verdicts: [Counter; Outcome::ALL.len()],
    /// Whether Verify is timed: a recorder was installed before the engine
    /// was built (`install` runs first in `serve`).
    pub timed: bool,
    pub verify_seconds: Histogram,
    pub verify_unavailable: Counter,
    pub limiter_unavailable: Counter,
    pub cache_hits: Counter,
    pub cache_stale_hits: Counter,
    pub cache_misses: Counter,
    /// Lookups the known-key filter answered: no such key_id, no store read.
    pub known_key_misses: Counter,
    pub cache_evictions: Counter,
    pub store_reads: Counter,
    pub store_timeouts: Counter,
    pub store_errors: Counter,
    pub last_used_writes: Counter,
    pub usage_writes: Counter,
    pub feed_events_key: Counter,
    pub feed_events_all: Counter,
    pub feed_reconnects: Counter,
    pub feed_connected: Gauge,
    pub ready: Gauge,
    /// 1 while the store counts as down (lookups do not wait for it).
    pub breaker_open: Gauge,
    /// Bytes the key cache counts itself as holding (README, "Memory budget").
    pub cache_bytes: Gauge,
    /// Connections closed on accept: the process holds its limit.
    /// Calls answered RESOURCE_EXHAUSTED by the process-wide cap.
    pub calls_refused: Counter,
    pub connections_refused: Counter,
    /// Times a connection was not read from: it had its share of calls
    /// queued in a busy process (README, "Limits").
    pub connection_pauses: Counter,
    pub shed: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics {
            verdicts: Outcome::ALL.map(|o| counter!("keystile_verify_verdicts_total", "code" => o.label())),
            timed: RECORDING.load(std::sync::atomic::Ordering::Relaxed),
            verify_seconds: histogram!(VERIFY_SECONDS),
            verify_unavailable: counter!("keystile_verify_errors_total", "kind" => "store_unavailable"),
            limiter_unavailable: counter!("keystile_verify_errors_total", "kind" => "limiter_unavailable"),
            cache_hits: counter!("keystile_cache_lookups_total", "result" => "hit"),
            cache_stale_hits: counter!("keystile_cache_lookups_total", "result" => "stale"),
            cache_misses: counter!("keystile_cache_lookups_total", "result" => "miss"),
            known_key_misses: counter!("keystile_cache_lookups_total", "result" => "unknown_key_id"),
            cache_evictions: counter!("keystile_cache_evictions_total"),
            store_reads: counter!("keystile_store_requests_total", "op" => "get"),
            store_timeouts: counter!("keystile_store_errors_total", "kind" => "timeout"),
            store_errors: counter!("keystile_store_errors_total", "kind" => "unavailable"),
            last_used_writes: counter!("keystile_store_requests_total", "op" => "touch_last_used"),
            usage_writes: counter!("keystile_store_requests_total", "op" => "add_usage"),
            feed_events_key: counter!("keystile_revocation_events_total", "scope" => "key"),
            feed_events_all: counter!("keystile_revocation_events_total", "scope" => "all"),
            feed_reconnects: counter!("keystile_feed_reconnects_total"),
            feed_connected: gauge!("keystile_feed_connected"),
            ready: gauge!("keystile_ready"),
            breaker_open: gauge!("keystile_store_breaker_open"),
            cache_bytes: gauge!("keystile_cache_bytes"),
            connections_refused: counter!("keystile_connections_refused_total"),
            calls_refused: counter!("keystile_calls_refused_total"),
            connection_pauses: counter!("keystile_connection_pauses_total"),
            shed: counter!("keystile_shed_requests_total", "reason" => "failed_attempts"),
        }
    }

    #[inline]
    pub fn verdict(&self, outcome: Outcome) {
        self.verdicts[outcome as usize].increment(1);
    }
}
