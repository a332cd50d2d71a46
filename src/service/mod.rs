//! The gRPC front ends. Generated types stop here: requests are converted
//! into domain types on the way in, verdicts and records on the way out,
//! and [`status`] is the one place where errors become a `tonic::Status`.
//! Every service is capped at [`MAX_REQUEST_BYTES`] ([`limits`]) and runs
//! inside the same RPC span ([`span`]).

pub mod admin;
pub mod exchange;
pub mod ext_authz;
pub mod fairness;
pub mod limits;
pub mod load;
pub mod protobuf;
pub mod span;
pub mod status;
pub mod unary;
pub mod verifier;
pub mod verify_answer;
pub mod verify_request;

/// Largest request message any service accepts (README, "Verdicts").
pub const MAX_REQUEST_BYTES: usize = 16 * 1024;
