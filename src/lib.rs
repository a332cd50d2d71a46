//! keystile: an API-key verification sidecar. One engine, many front ends:
//! a Verify flows one way, parse → shed → record source → checks →
//! limiters → verdict, and every front end converts at its edge.
//! `docs/architecture.md` draws the flow and says how to add a front end,
//! a limiter or a store backend.
//!
//! # Layout
//!
//! - [`verdict`]: the vocabulary: [`verdict::Request`], [`verdict::Verdict`]
//!   and its [`verdict::Outcome`] (wire error, HTTP status, message and
//!   metric label in one place), the headers. A leaf: imports no engine.
//! - [`engine`]: the decision pipeline (`engine/mod.rs`, only the checks, in
//!   order), the record source (`engine/source.rs`: cache + store + single
//!   flight + outage breaker + change feed), the known-key filter that
//!   answers forged key_ids without the store (`engine/known.rs`), tenants' named limits
//!   (`engine/tenants.rs`) and usage, last-used times and counts by code,
//!   batched to the store (`engine/usage.rs`).
//! - [`limit`]: the [`limit::Limiter`] trait and bucket ids; named limits
//!   and which apply (`limit/named.rs`); one GCRA bucket that can give
//!   cells back (`limit/gcra.rs`); the in-process registry
//!   (`limit/local.rs`); leases from buckets shared by the fleet, with the
//!   fallback (`limit/fleet.rs`); failed-attempt shedding, with each store
//!   read charged to the caller's address (`limit/shedder.rs`); policies
//!   (`limit/policy.rs`).
//! - [`token`]: tokens exchanged for keys: signing and checking
//!   (`token/mod.rs`), signing keys sealed under the pepper and the JWKS
//!   (`token/signing.rs`), the exchange both front ends call
//!   (`token/exchange.rs`).
//! - [`auth`]: a presented credential authenticated for a purpose (admin,
//!   exchange), failures counted by transport peer, apart from Verify's.
//! - [`admin`]: key lifecycle, tenant policies and tiers, the validation of
//!   every field, within what the acting admin key may manage, and the
//!   audit trail of every mutation.
//! - [`scope`]: what a granted scope (or `resource:*` pattern) satisfies;
//!   [`origin`]: the origins a publishable key answers for.
//! - [`cache`]: the key cache, bounded in bytes: positive and stale entries
//!   in moka weighed by what each record holds, negative entries in their
//!   own share purged as they expire, and the generation fence against
//!   fill-after-revoke; a cached key also keeps the answer bytes ext_authz
//!   derives from its record alone (`CachedKey::encoded`), weighed with it
//!   under `--ext-authz`.
//! - [`store`]: one [`store::KeyStore`] trait, the in-memory store
//!   (`store/memory.rs`) and Redis (`store/redis/`: the store, named
//!   scripts, the change-feed follower, the connection, the shared
//!   rate-limit buckets).
//! - [`key`]: the key format (parse, kinds by prefix, checksum,
//!   generation) and the pepper.
//! - [`app`]: [`app::App::build`], the one place the engine is wired.
//! - [`service`]: the gRPC front ends (Verifier, KeyAdmin, TokenExchange,
//!   Envoy's ext_authz):
//!   conversions, the one error → status map, the size cap, the RPC span
//!   layer, the process-wide limits on connections and calls
//!   (`service/load.rs`) and fairness between connections
//!   (`service/fairness.rs`); Verify's request read in place
//!   (`service/verify_request.rs`); answers written straight from the verdict
//!   (`service/verify_answer.rs`, `service/ext_authz/answer.rs`, their
//!   shared protobuf rules in `service/protobuf.rs`, the server of one
//!   unary method both run on, framed without tonic's streaming codec, in
//!   `service/unary.rs`);
//!   [`proto`]: generated code.
//! - [`proxy`]: the proxy front ends' common ground ([`proxy::Gate`]): a
//!   proxied request (credential sources, route table) in, an allow with
//!   identity headers or a deny with a templated body out; Envoy's
//!   ext_authz (`service/ext_authz/`) and forward-auth (`http.rs`)
//!   convert at their edges.
//! - [`http`]: the HTTP listener (token exchange, JWKS, forward-auth on
//!   `/authz`), converting at its edge like the gRPC front ends.
//! - [`server`]: the port composed from a list of front ends, health,
//!   reflection, background tasks, graceful shutdown; one runtime, or one
//!   per core (`--runtime per-core`).
//! - [`config`]: flags, environment and file, validated (all errors at
//!   once); [`secret`]: the redacting types.
//! - [`clock`]: injectable time, read once per Verify ([`clock::Clock::now`]
//!   gives both clocks from one reading of the CPU's counter, by `quanta`);
//!   [`telemetry`]: logs and traces;
//!   [`metrics`]: the Prometheus instruments.
//!
//! The `keystile keys` / `tenants` CLI and `keystile bench` load generator
//! live in the binary's own tree (`src/cli/`); `src/main.rs` also sets
//! the allocator (mimalloc) and turns transparent huge pages off; fuzz
//! targets and their seed corpus are in `tests/fuzz.rs` and `fuzz/corpus/`
//! (README, "Fuzzing").

pub mod admin;
pub mod app;
pub mod auth;
pub mod cache;
pub mod clock;
pub mod config;
pub mod engine;
pub mod http;
pub mod key;
pub mod limit;
pub mod metrics;
pub mod origin;
pub mod proto;
pub mod proxy;
pub mod scope;
pub mod secret;
pub mod server;
pub mod service;
pub mod store;
pub mod telemetry;
pub mod token;
pub mod verdict;
