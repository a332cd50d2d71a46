//! keystile: an API-key verification sidecar.
//!
//! # Layout
//!
//! - [`key`]: the key format (parse, checksum, generation) and the pepper
//!   that turns secrets into stored hashes.
//! - [`store`]: where records live: one [`store::KeyStore`] trait, an
//!   in-memory and a Redis implementation, and the change feed.
//! - [`cache`]: the moka cache with positive, negative and stale entries and
//!   the generation fence against fill-after-revoke.
//! - [`limit`]: per-key quotas and per-IP failed-attempt shedding (governor).
//! - [`verify`]: the engine: SPEC §4's checks in order. No gRPC types.
//! - [`admin`]: key lifecycle (create, update, revoke, rotate, delete) and
//!   its validation. No gRPC types.
//! - [`service`]: the gRPC edges: conversions and the one error → `Status` map.
//! - [`server`]: the listener, health, reflection, background tasks and
//!   graceful shutdown.
//! - [`config`]: flags, environment, validation (all errors at once).
//! - [`client`]: the `keystile keys …` CLI, a KeyAdmin client.
//! - [`clock`]: injectable time for expiry, cache freshness and limiters.
//! - [`telemetry`]: logging setup; [`metrics`]: the Prometheus instruments.
//! - [`loadgen`]: `keystile bench`, the gRPC load generator.

pub mod admin;
pub mod cache;
pub mod client;
pub mod clock;
pub mod config;
pub mod key;
pub mod limit;
pub mod loadgen;
pub mod metrics;
pub mod proto;
pub mod server;
pub mod service;
pub mod store;
pub mod telemetry;
pub mod verify;
