//! Code generated from `proto/keystile/v1/*.proto`. Nothing outside
//! `service/` and the CLI client should need it.

#![allow(clippy::all, clippy::pedantic, missing_docs, unreachable_pub)]

tonic::include_proto!("keystile.v1");

/// The encoded descriptors, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("keystile_descriptor");
