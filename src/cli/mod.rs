//! The binary's own commands, beside `serve`: `keys` (a KeyAdmin client)
//! and `bench` (the gRPC load generator). They use the library as any
//! client would; the library holds the engine, its stores, limiters and
//! front ends.

pub mod bench;
pub mod keys;
