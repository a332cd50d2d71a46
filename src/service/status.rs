//! The one map from domain errors to gRPC status codes.

use tonic::{Code, Status};

use crate::admin::AdminError;
use crate::auth::AuthError;
use crate::token::exchange::ExchangeError;
use crate::verdict::VerifyError;

/// `UNAVAILABLE`: the answer needs the store and the store did not answer.
pub fn from_verify(e: &VerifyError) -> Status {
    Status::unavailable(e.to_string())
}

pub fn from_auth(e: &AuthError) -> Status {
    let code = match e {
        AuthError::Unauthenticated(_) => Code::Unauthenticated,
        AuthError::PermissionDenied(_) => Code::PermissionDenied,
        AuthError::RateLimited | AuthError::TooManyFailedAttempts(_) => Code::ResourceExhausted,
        AuthError::Unavailable(_) => Code::Unavailable,
    };
    Status::new(code, e.to_string())
}

pub fn from_admin(e: &AdminError) -> Status {
    let code = match e {
        AdminError::Invalid(_) => Code::InvalidArgument,
        AdminError::PermissionDenied(_) => Code::PermissionDenied,
        AdminError::NotFound(_) => Code::NotFound,
        AdminError::FailedPrecondition(_) => Code::FailedPrecondition,
        AdminError::Conflict => Code::Aborted,
        AdminError::Unavailable(_) => Code::Unavailable,
    };
    Status::new(code, e.to_string())
}

pub fn from_exchange(e: &ExchangeError) -> Status {
    let code = match e {
        ExchangeError::Invalid(_) => Code::InvalidArgument,
        ExchangeError::Unauthenticated => Code::Unauthenticated,
        ExchangeError::Forbidden(_) => Code::PermissionDenied,
        ExchangeError::RateLimited | ExchangeError::TooManyFailedAttempts(_) => Code::ResourceExhausted,
        ExchangeError::Unavailable(_) => Code::Unavailable,
    };
    Status::new(code, e.to_string())
}

/// What a caller is told of a request that is not the message its method
/// takes (a front end that reads its request itself, or tonic's decoder
/// through `limits.rs`): the caller's mistake, `INVALID_ARGUMENT`.
pub const UNDECODABLE: &str = "the request is not a valid message of this method";

pub fn undecodable() -> Status {
    Status::invalid_argument(UNDECODABLE)
}

/// `INVALID_ARGUMENT` for a request that breaks a limit.
pub fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg)
}
