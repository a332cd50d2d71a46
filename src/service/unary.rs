//! A gRPC service of one unary method with a codec of its own, written out
//! as tonic's generated servers are: Verify's and ext_authz's Check, whose
//! answers are written straight into the send buffer (README,
//! "Performance") rather than encoded from a prost message. Each front end
//! names its instance with [`tonic::server::NamedService`].

use std::task::{Context, Poll};

use tonic::Status;
use tonic::codec::Codec;
use tonic::codegen::{BoxFuture, Service, StdError, http};
use tonic::server::UnaryService;

/// Serves `handler` on `path` (any other path is `UNIMPLEMENTED`), with
/// requests capped at `max_request_bytes`.
#[derive(Clone)]
pub struct UnaryServer<C, H> {
    path: &'static str,
    max_request_bytes: usize,
    codec: C,
    handler: H,
}

impl<C, H> UnaryServer<C, H> {
    pub fn new(path: &'static str, max_request_bytes: usize, codec: C, handler: H) -> UnaryServer<C, H> {
        UnaryServer { path, max_request_bytes, codec, handler }
    }
}

impl<C, H, B> Service<http::Request<B>> for UnaryServer<C, H>
where
    C: Codec + Clone + Send + 'static,
    C::Encode: Send + 'static,
    C::Decode: Send + 'static,
    H: UnaryService<C::Decode, Response = C::Encode> + Clone + Send + 'static,
    H::Future: Send,
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != self.path {
            return Box::pin(async { Ok(Status::unimplemented("").into_http()) });
        }
        let (codec, handler, max) = (self.codec.clone(), self.handler.clone(), self.max_request_bytes);
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(codec).apply_max_message_size_config(Some(max), None);
            Ok(grpc.unary(handler, req).await)
        })
    }
}
