//! The gRPC edges. Generated types stop here: requests are converted into
//! domain types on the way in, verdicts and records on the way out, and
//! [`status`] is the one place where errors become a `tonic::Status`.

pub mod admin;
pub mod limits;
pub mod status;
pub mod verifier;

/// Largest request message accepted (SPEC §4).
pub const MAX_REQUEST_BYTES: usize = 16 * 1024;
